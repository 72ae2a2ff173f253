//! The dm-thin on-disk metadata format: pure structures, codecs, checksums and
//! validation. No I/O and no policy live here; the engine composes these pieces.
//!
//! Every multi-byte integer is little-endian. Every metadata block is 4096 bytes,
//! starts with a CRC-32C checksum of bytes 4..4096 XOR a per-type salt, and records its
//! own block number. See `docs/design.md` and `shared/docs/dmthin-format.md`.

pub mod bitmap;
pub mod block_time;
pub mod btree_node;
pub mod checksum;
pub mod device_details;
pub mod error;
pub mod index_entry;
pub mod le;
pub mod metadata_index;
pub mod sm_root;
pub mod superblock;
pub mod units;

pub use error::{FormatError, NodeError};
pub use units::*;

/// Size of every metadata block (`DM_SM_METADATA_BLOCK_SIZE`, 8 sectors).
pub const METADATA_BLOCK_SIZE: usize = 4096;

/// One metadata block's bytes.
pub type Block = [u8; METADATA_BLOCK_SIZE];

/// A zero-filled metadata block on the heap.
pub fn zeroed_block() -> Box<Block> {
    Box::new([0u8; METADATA_BLOCK_SIZE])
}
