//! The thin superblock (`struct thin_disk_superblock`, block 0; 364 bytes used).
//!
//! ```text
//! 0    u32  csum                  salt SUPERBLOCK_CSUM_XOR
//! 4    u32  flags                 bit 0: needs_check
//! 8    u64  blocknr               own location (0 for the live superblock)
//! 16   [16] uuid                  zero
//! 32   u64  magic                 27022010
//! 40   u32  version               2
//! 44   u32  time                  snapshot clock
//! 48   u64  trans_id              userspace transaction id
//! 56   u64  held_root             metadata snapshot superblock copy, 0 = none
//! 64   [128] data_space_map_root
//! 192  [128] metadata_space_map_root
//! 320  u64  data_mapping_root     two-level mapping tree
//! 328  u64  device_details_root
//! 336  u32  data_block_size       sectors
//! 340  u32  metadata_block_size   sectors, 8
//! 344  u64  metadata_nr_blocks    set at format time only
//! 352  u32  compat_flags
//! 356  u32  compat_ro_flags
//! 360  u32  incompat_flags
//! ```
//! The struct fits in the first 512-byte sector, so its write is the atomic commit
//! point (`__commit_transaction`).

use crate::checksum::{self, BlockKind};
use crate::error::{FormatError, NodeError};
use crate::sm_root::{SmRoot, SM_ROOT_SLOT};
use crate::{le, zeroed_block, Block, MetaBlock};

pub const CSUM_OFFSET: usize = 0;
pub const FLAGS_OFFSET: usize = CSUM_OFFSET + 4;
pub const BLOCKNR_OFFSET: usize = FLAGS_OFFSET + 4;
pub const UUID_OFFSET: usize = BLOCKNR_OFFSET + 8;
pub const MAGIC_OFFSET: usize = UUID_OFFSET + 16;
pub const VERSION_OFFSET: usize = MAGIC_OFFSET + 8;
pub const TIME_OFFSET: usize = VERSION_OFFSET + 4;
pub const TRANS_ID_OFFSET: usize = TIME_OFFSET + 4;
pub const HELD_ROOT_OFFSET: usize = TRANS_ID_OFFSET + 8;
pub const DATA_SM_ROOT_OFFSET: usize = HELD_ROOT_OFFSET + 8;
pub const METADATA_SM_ROOT_OFFSET: usize = DATA_SM_ROOT_OFFSET + SM_ROOT_SLOT;
pub const DATA_MAPPING_ROOT_OFFSET: usize = METADATA_SM_ROOT_OFFSET + SM_ROOT_SLOT;
pub const DEVICE_DETAILS_ROOT_OFFSET: usize = DATA_MAPPING_ROOT_OFFSET + 8;
pub const DATA_BLOCK_SIZE_OFFSET: usize = DEVICE_DETAILS_ROOT_OFFSET + 8;
pub const METADATA_BLOCK_SIZE_OFFSET: usize = DATA_BLOCK_SIZE_OFFSET + 4;
pub const METADATA_NR_BLOCKS_OFFSET: usize = METADATA_BLOCK_SIZE_OFFSET + 4;
pub const COMPAT_FLAGS_OFFSET: usize = METADATA_NR_BLOCKS_OFFSET + 8;
pub const COMPAT_RO_FLAGS_OFFSET: usize = COMPAT_FLAGS_OFFSET + 4;
pub const INCOMPAT_FLAGS_OFFSET: usize = COMPAT_RO_FLAGS_OFFSET + 4;
pub const SUPERBLOCK_SIZE: usize = INCOMPAT_FLAGS_OFFSET + 4;
const _: () = assert!(SUPERBLOCK_SIZE == 364 && SUPERBLOCK_SIZE <= 512);

/// `THIN_SUPERBLOCK_MAGIC`.
pub const THIN_MAGIC: u64 = 27_022_010;
/// `THIN_VERSION` written by current kernels; version 1 is also readable.
pub const THIN_VERSION: u32 = 2;
/// `THIN_METADATA_NEEDS_CHECK_FLAG`.
pub const NEEDS_CHECK_FLAG: u32 = 1;
/// Metadata block size in sectors (always 8).
pub const METADATA_BLOCK_SECTORS: u32 = 8;

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Superblock {
    pub flags: u32,
    pub blocknr: MetaBlock,
    pub uuid: [u8; 16],
    pub version: u32,
    pub time: u32,
    pub trans_id: u64,
    pub held_root: MetaBlock,
    pub data_sm_root: SmRoot,
    pub metadata_sm_root: SmRoot,
    pub data_mapping_root: MetaBlock,
    pub device_details_root: MetaBlock,
    pub data_block_size: u32,
    pub metadata_nr_blocks: u64,
    pub compat_flags: u32,
    pub compat_ro_flags: u32,
    pub incompat_flags: u32,
}

impl Superblock {
    pub fn needs_check(&self) -> bool {
        self.flags & NEEDS_CHECK_FLAG != 0
    }

    /// Validate (blocknr, checksum, magic, version, feature flags, block sizes) and
    /// decode a superblock read from `loc`, as the kernel's `sb_check` does.
    pub fn unpack(b: &Block, loc: MetaBlock) -> Result<Self, FormatError> {
        let err = |r| FormatError::new(loc, BlockKind::Superblock, r);
        let u32f = |o| le::u32_at(b, o).unwrap_or(0);
        let u64f = |o| le::u64_at(b, o).unwrap_or(0);
        let recorded = u64f(BLOCKNR_OFFSET);
        if recorded != loc.0 {
            return Err(err(NodeError::BlockNrMismatch {
                recorded,
                actual: loc.0,
            }));
        }
        let magic = u64f(MAGIC_OFFSET);
        if magic != THIN_MAGIC {
            return Err(err(NodeError::BadMagic(magic)));
        }
        checksum::verify(b, BlockKind::Superblock)
            .map_err(|(stored, computed)| err(NodeError::Checksum { stored, computed }))?;
        let version = u32f(VERSION_OFFSET);
        if !(1..=THIN_VERSION).contains(&version) {
            return Err(err(NodeError::BadVersion(version)));
        }
        let incompat = u32f(INCOMPAT_FLAGS_OFFSET);
        if incompat != 0 {
            return Err(err(NodeError::UnsupportedFeatures(format!(
                "incompat_flags {incompat:#x}"
            ))));
        }
        let mbs = u32f(METADATA_BLOCK_SIZE_OFFSET);
        if mbs != METADATA_BLOCK_SECTORS {
            return Err(err(NodeError::Other(format!(
                "metadata block size {mbs} sectors, expected {METADATA_BLOCK_SECTORS}"
            ))));
        }
        let sm = |o: usize| SmRoot::unpack(&b[o..o + SM_ROOT_SLOT]).unwrap_or_default();
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[UUID_OFFSET..UUID_OFFSET + 16]);
        Ok(Superblock {
            flags: u32f(FLAGS_OFFSET),
            blocknr: loc,
            uuid,
            version,
            time: u32f(TIME_OFFSET),
            trans_id: u64f(TRANS_ID_OFFSET),
            held_root: MetaBlock(u64f(HELD_ROOT_OFFSET)),
            data_sm_root: sm(DATA_SM_ROOT_OFFSET),
            metadata_sm_root: sm(METADATA_SM_ROOT_OFFSET),
            data_mapping_root: MetaBlock(u64f(DATA_MAPPING_ROOT_OFFSET)),
            device_details_root: MetaBlock(u64f(DEVICE_DETAILS_ROOT_OFFSET)),
            data_block_size: u32f(DATA_BLOCK_SIZE_OFFSET),
            metadata_nr_blocks: u64f(METADATA_NR_BLOCKS_OFFSET),
            compat_flags: u32f(COMPAT_FLAGS_OFFSET),
            compat_ro_flags: u32f(COMPAT_RO_FLAGS_OFFSET),
            incompat_flags: incompat,
        })
    }

    /// Encode and seal at `self.blocknr`. Bytes 364..4096 are zero.
    pub fn pack(&self) -> Box<Block> {
        let mut b = zeroed_block();
        let s = &mut b[..];
        le::put_u32(s, FLAGS_OFFSET, self.flags);
        le::put_u64(s, BLOCKNR_OFFSET, self.blocknr.0);
        s[UUID_OFFSET..UUID_OFFSET + 16].copy_from_slice(&self.uuid);
        le::put_u64(s, MAGIC_OFFSET, THIN_MAGIC);
        le::put_u32(s, VERSION_OFFSET, self.version);
        le::put_u32(s, TIME_OFFSET, self.time);
        le::put_u64(s, TRANS_ID_OFFSET, self.trans_id);
        le::put_u64(s, HELD_ROOT_OFFSET, self.held_root.0);
        s[DATA_SM_ROOT_OFFSET..DATA_SM_ROOT_OFFSET + SM_ROOT_SLOT]
            .copy_from_slice(&self.data_sm_root.pack());
        s[METADATA_SM_ROOT_OFFSET..METADATA_SM_ROOT_OFFSET + SM_ROOT_SLOT]
            .copy_from_slice(&self.metadata_sm_root.pack());
        le::put_u64(s, DATA_MAPPING_ROOT_OFFSET, self.data_mapping_root.0);
        le::put_u64(s, DEVICE_DETAILS_ROOT_OFFSET, self.device_details_root.0);
        le::put_u32(s, DATA_BLOCK_SIZE_OFFSET, self.data_block_size);
        le::put_u32(s, METADATA_BLOCK_SIZE_OFFSET, METADATA_BLOCK_SECTORS);
        le::put_u64(s, METADATA_NR_BLOCKS_OFFSET, self.metadata_nr_blocks);
        le::put_u32(s, COMPAT_FLAGS_OFFSET, self.compat_flags);
        le::put_u32(s, COMPAT_RO_FLAGS_OFFSET, self.compat_ro_flags);
        le::put_u32(s, INCOMPAT_FLAGS_OFFSET, self.incompat_flags);
        checksum::seal(s, BlockKind::Superblock);
        b
    }
}

/// Whether a block is entirely zero (an unformatted device, `__superblock_all_zeroes`).
pub fn is_all_zero(b: &Block) -> bool {
    b.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            version: THIN_VERSION,
            time: 3,
            trans_id: 9,
            data_block_size: 128,
            metadata_nr_blocks: 4096,
            data_sm_root: SmRoot {
                nr_blocks: 1000,
                nr_allocated: 450,
                bitmap_root: 4,
                ref_count_root: 5,
            },
            data_mapping_root: MetaBlock(7),
            device_details_root: MetaBlock(8),
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_and_rejects() {
        let sb = sample();
        let b = sb.pack();
        assert_eq!(Superblock::unpack(&b, MetaBlock(0)).unwrap(), sb);
        assert!(matches!(
            Superblock::unpack(&b, MetaBlock(1)).unwrap_err().reason,
            NodeError::BlockNrMismatch { .. }
        ));
        for bit in [0usize, 40 * 8, 100 * 8 + 3, 363 * 8 + 7, 4095 * 8] {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(Superblock::unpack(&c, MetaBlock(0)).is_err(), "bit {bit}");
        }
    }
}
