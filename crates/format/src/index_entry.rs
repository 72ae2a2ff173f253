//! Space-map index entry (`struct disk_index_entry`, 16 bytes): where one bitmap lives
//! and allocation hints for it.
//!
//! ```text
//! 0   u64 blocknr            metadata block holding the bitmap
//! 8   u32 nr_free            zero entries in the bitmap (a hint, not validated)
//! 12  u32 none_free_before   no free entry below this index (a hint)
//! ```

use crate::le;

pub const BLOCKNR_OFFSET: usize = 0;
pub const NR_FREE_OFFSET: usize = BLOCKNR_OFFSET + 8;
pub const NONE_FREE_BEFORE_OFFSET: usize = NR_FREE_OFFSET + 4;
pub const INDEX_ENTRY_SIZE: usize = NONE_FREE_BEFORE_OFFSET + 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IndexEntry {
    pub blocknr: u64,
    pub nr_free: u32,
    pub none_free_before: u32,
}

impl IndexEntry {
    pub fn pack(&self) -> [u8; INDEX_ENTRY_SIZE] {
        let mut b = [0u8; INDEX_ENTRY_SIZE];
        le::put_u64(&mut b, BLOCKNR_OFFSET, self.blocknr);
        le::put_u32(&mut b, NR_FREE_OFFSET, self.nr_free);
        le::put_u32(&mut b, NONE_FREE_BEFORE_OFFSET, self.none_free_before);
        b
    }

    pub fn unpack(b: &[u8]) -> Option<Self> {
        Some(IndexEntry {
            blocknr: le::u64_at(b, BLOCKNR_OFFSET)?,
            nr_free: le::u32_at(b, NR_FREE_OFFSET)?,
            none_free_before: le::u32_at(b, NONE_FREE_BEFORE_OFFSET)?,
        })
    }
}
