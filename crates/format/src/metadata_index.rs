//! The metadata space map's index block (`struct disk_metadata_index`).
//!
//! ```text
//! 0   u32 csum       salt INDEX_CSUM_XOR
//! 4   u32 padding    0
//! 8   u64 blocknr    own location
//! 16  255 x disk_index_entry (16 bytes each); unused slots are zero
//! ```
//! One index block can describe at most 255 bitmaps, hence the 255 * 16 320 block cap on
//! the metadata device (`DM_SM_METADATA_MAX_BLOCKS`).

use crate::bitmap::ENTRIES_PER_BITMAP;
use crate::checksum::{self, BlockKind};
use crate::error::{FormatError, NodeError};
use crate::index_entry::{IndexEntry, INDEX_ENTRY_SIZE};
use crate::{le, zeroed_block, Block, MetaBlock};

pub const CSUM_OFFSET: usize = 0;
pub const PADDING_OFFSET: usize = CSUM_OFFSET + 4;
pub const BLOCKNR_OFFSET: usize = PADDING_OFFSET + 4;
pub const ENTRIES_OFFSET: usize = BLOCKNR_OFFSET + 8;
/// `MAX_METADATA_BITMAPS`.
pub const MAX_METADATA_BITMAPS: usize = 255;
/// `DM_SM_METADATA_MAX_BLOCKS`.
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;

/// Validate and decode the first `nr_bitmaps` entries.
pub fn unpack(
    block: &Block,
    loc: MetaBlock,
    nr_bitmaps: usize,
) -> Result<Vec<IndexEntry>, FormatError> {
    let err = |r| FormatError::new(loc, BlockKind::MetadataIndex, r);
    let recorded = le::u64_at(block, BLOCKNR_OFFSET).unwrap_or(u64::MAX);
    if recorded != loc.0 {
        return Err(err(NodeError::BlockNrMismatch {
            recorded,
            actual: loc.0,
        }));
    }
    checksum::verify(block, BlockKind::MetadataIndex)
        .map_err(|(stored, computed)| err(NodeError::Checksum { stored, computed }))?;
    if nr_bitmaps > MAX_METADATA_BITMAPS {
        return Err(err(NodeError::Other(format!(
            "{nr_bitmaps} bitmaps needed, an index block holds {MAX_METADATA_BITMAPS}"
        ))));
    }
    (0..nr_bitmaps)
        .map(|i| {
            IndexEntry::unpack(&block[ENTRIES_OFFSET + i * INDEX_ENTRY_SIZE..])
                .ok_or_else(|| err(NodeError::Other("short index entry".into())))
        })
        .collect()
}

/// Encode and seal an index block for `loc`. At most 255 entries are written.
pub fn pack(entries: &[IndexEntry], loc: MetaBlock) -> Box<Block> {
    let mut b = zeroed_block();
    for (i, e) in entries.iter().take(MAX_METADATA_BITMAPS).enumerate() {
        let off = ENTRIES_OFFSET + i * INDEX_ENTRY_SIZE;
        b[off..off + INDEX_ENTRY_SIZE].copy_from_slice(&e.pack());
    }
    le::put_u64(&mut b[..], BLOCKNR_OFFSET, loc.0);
    checksum::seal(&mut b[..], BlockKind::MetadataIndex);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let e = vec![
            IndexEntry {
                blocknr: 3,
                nr_free: 4078,
                none_free_before: 18,
            };
            2
        ];
        let b = pack(&e, MetaBlock(1));
        assert_eq!(unpack(&b, MetaBlock(1), 2).unwrap(), e);
        assert!(unpack(&b, MetaBlock(2), 2).is_err());
        assert_eq!(MAX_METADATA_BLOCKS, 4_161_600);
    }
}
