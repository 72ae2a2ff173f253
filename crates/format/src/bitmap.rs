//! Space-map bitmap blocks (`struct disk_bitmap_header` + 2-bit entries).
//!
//! ```text
//! 0   u32 csum        salt BITMAP_CSUM_XOR
//! 4   u32 not_used    0
//! 8   u64 blocknr     own location
//! 16  510 little-endian u64 words, 32 entries each (16 320 entries)
//! ```
//! Entry i is in word i/32 at bit pair 2k (k = i%32): bit 2k is the HIGH bit of the
//! count and bit 2k+1 the LOW bit (`sm_lookup_bitmap`): count 1 is raw 0b10, count 2 is
//! raw 0b01, 3 means "look in the overflow tree".

use crate::checksum::{self, BlockKind};
use crate::error::{FormatError, NodeError};
use crate::{le, zeroed_block, Block, MetaBlock};

pub const CSUM_OFFSET: usize = 0;
pub const NOT_USED_OFFSET: usize = CSUM_OFFSET + 4;
pub const BLOCKNR_OFFSET: usize = NOT_USED_OFFSET + 4;
pub const WORDS_OFFSET: usize = BLOCKNR_OFFSET + 8;
/// Entries per bitmap block: (4096 - 16) * 4.
pub const ENTRIES_PER_BITMAP: u64 = ((crate::METADATA_BLOCK_SIZE - WORDS_OFFSET) * 4) as u64;

/// Read the 2-bit entry `i` (0..=3) from bitmap block bytes.
pub fn get_entry(block: &Block, i: usize) -> u8 {
    let byte = block[WORDS_OFFSET + (2 * i) / 8];
    let shift = (2 * i) % 8;
    let hi = (byte >> shift) & 1;
    let lo = (byte >> (shift + 1)) & 1;
    (hi << 1) | lo
}

/// Set the 2-bit entry `i` to `count.min(3)`.
pub fn set_entry(block: &mut Block, i: usize, count: u32) {
    let c = count.min(3) as u8;
    let idx = WORDS_OFFSET + (2 * i) / 8;
    let shift = (2 * i) % 8;
    let hi = (c >> 1) & 1;
    let lo = c & 1;
    let mut byte = block[idx] & !(0b11 << shift);
    byte |= (hi << shift) | (lo << (shift + 1));
    block[idx] = byte;
}

/// Validate a bitmap block read from `loc` and decode its entries (0..=3 each).
pub fn unpack(block: &Block, loc: MetaBlock) -> Result<Vec<u8>, FormatError> {
    let err = |r| FormatError::new(loc, BlockKind::Bitmap, r);
    let recorded = le::u64_at(block, BLOCKNR_OFFSET).unwrap_or(u64::MAX);
    if recorded != loc.0 {
        return Err(err(NodeError::BlockNrMismatch {
            recorded,
            actual: loc.0,
        }));
    }
    checksum::verify(block, BlockKind::Bitmap)
        .map_err(|(stored, computed)| err(NodeError::Checksum { stored, computed }))?;
    Ok((0..ENTRIES_PER_BITMAP as usize)
        .map(|i| get_entry(block, i))
        .collect())
}

/// Encode `counts` (clamped to 3; missing entries are 0) as a sealed bitmap for `loc`.
pub fn pack<I: IntoIterator<Item = u32>>(counts: I, loc: MetaBlock) -> Box<Block> {
    let mut b = zeroed_block();
    for (i, c) in counts
        .into_iter()
        .take(ENTRIES_PER_BITMAP as usize)
        .enumerate()
    {
        if c != 0 {
            set_entry(&mut b, i, c);
        }
    }
    le::put_u64(&mut b[..], BLOCKNR_OFFSET, loc.0);
    checksum::seal(&mut b[..], BlockKind::Bitmap);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_order_matches_kernel() {
        // dmthin-format.md §13: 32 entries of count 1 read 0xAAAA..., count 2 0x5555....
        let b = pack(std::iter::repeat_n(1, 32), MetaBlock(9));
        assert_eq!(
            le::u64_at(&b[..], WORDS_OFFSET),
            Some(0xAAAA_AAAA_AAAA_AAAA)
        );
        let b = pack(std::iter::repeat_n(2, 32), MetaBlock(9));
        assert_eq!(
            le::u64_at(&b[..], WORDS_OFFSET),
            Some(0x5555_5555_5555_5555)
        );
    }

    #[test]
    fn round_trip() {
        let counts: Vec<u32> = (0..ENTRIES_PER_BITMAP as u32).map(|i| i % 5).collect();
        let b = pack(counts.iter().copied(), MetaBlock(3));
        let got = unpack(&b, MetaBlock(3)).unwrap();
        for (i, c) in counts.iter().enumerate() {
            assert_eq!(u32::from(got[i]), (*c).min(3));
        }
        assert!(unpack(&b, MetaBlock(4)).is_err());
    }
}
