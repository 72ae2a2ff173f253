//! Space-map root (`struct disk_sm_root`), stored in a 128-byte superblock slot.
//!
//! ```text
//! 0   u64 nr_blocks       size of the managed device, in blocks
//! 8   u64 nr_allocated    blocks with a count > 0
//! 16  u64 bitmap_root     metadata sm: index block; data sm: index btree root
//! 24  u64 ref_count_root  overflow btree root (block -> u32 count, counts >= 3)
//! ```

use crate::le;

pub const NR_BLOCKS_OFFSET: usize = 0;
pub const NR_ALLOCATED_OFFSET: usize = NR_BLOCKS_OFFSET + 8;
pub const BITMAP_ROOT_OFFSET: usize = NR_ALLOCATED_OFFSET + 8;
pub const REF_COUNT_ROOT_OFFSET: usize = BITMAP_ROOT_OFFSET + 8;
pub const SM_ROOT_USED: usize = REF_COUNT_ROOT_OFFSET + 8;
/// Size of the superblock slot holding a root (`SPACE_MAP_ROOT_SIZE`).
pub const SM_ROOT_SLOT: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    pub bitmap_root: u64,
    pub ref_count_root: u64,
}

impl SmRoot {
    pub fn pack(&self) -> [u8; SM_ROOT_SLOT] {
        let mut b = [0u8; SM_ROOT_SLOT];
        le::put_u64(&mut b, NR_BLOCKS_OFFSET, self.nr_blocks);
        le::put_u64(&mut b, NR_ALLOCATED_OFFSET, self.nr_allocated);
        le::put_u64(&mut b, BITMAP_ROOT_OFFSET, self.bitmap_root);
        le::put_u64(&mut b, REF_COUNT_ROOT_OFFSET, self.ref_count_root);
        b
    }

    pub fn unpack(b: &[u8]) -> Option<Self> {
        Some(SmRoot {
            nr_blocks: le::u64_at(b, NR_BLOCKS_OFFSET)?,
            nr_allocated: le::u64_at(b, NR_ALLOCATED_OFFSET)?,
            bitmap_root: le::u64_at(b, BITMAP_ROOT_OFFSET)?,
            ref_count_root: le::u64_at(b, REF_COUNT_ROOT_OFFSET)?,
        })
    }

    pub fn is_zero(&self) -> bool {
        *self == SmRoot::default()
    }
}
