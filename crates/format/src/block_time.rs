//! Mapping-tree leaf values: data block (40 bits) and pool time (24 bits) in one u64
//! (`pack_block_time`, dm-thin-metadata.c): value = (block << 24) | time.

use crate::{DataBlock, MAX_DATA_BLOCK, MAX_TIME};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockTime {
    pub block: DataBlock,
    pub time: u32,
}

impl BlockTime {
    /// Packs; `block` must be ≤ 2^40-1 and `time` ≤ 2^24-1 (callers enforce both).
    pub fn pack(self) -> u64 {
        debug_assert!(self.block.0 <= MAX_DATA_BLOCK && self.time <= MAX_TIME);
        (self.block.0 << 24) | u64::from(self.time & MAX_TIME)
    }

    pub fn unpack(v: u64) -> Self {
        BlockTime {
            block: DataBlock(v >> 24),
            time: (v & u64::from(MAX_TIME)) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bt = BlockTime {
            block: DataBlock(MAX_DATA_BLOCK),
            time: MAX_TIME,
        };
        assert_eq!(BlockTime::unpack(bt.pack()), bt);
        assert_eq!(
            BlockTime::unpack(5 << 24 | 3),
            BlockTime {
                block: DataBlock(5),
                time: 3
            }
        );
    }
}
