//! Metadata block checksums (`dm_bm_checksum`, dm-block-manager.c).
//!
//! stored = crc32c_raw(!0, block[4..4096]) ^ salt, where crc32c_raw has no final
//! inversion; with a standard CRC-32C (seed !0, final !) that is `crc ^ !0 ^ salt`.

use crate::le;

/// Superblock salt (`SUPERBLOCK_CSUM_XOR`, dm-thin-metadata.c).
pub const SUPERBLOCK_CSUM_XOR: u32 = 160_774;
/// B-tree node salt (`BTREE_CSUM_XOR`, dm-btree-spine.c).
pub const BTREE_CSUM_XOR: u32 = 121_107;
/// Space-map bitmap salt (`BITMAP_CSUM_XOR`, dm-space-map-common.c).
pub const BITMAP_CSUM_XOR: u32 = 240_779;
/// Metadata space-map index salt (`INDEX_CSUM_XOR`, dm-space-map-common.c).
pub const INDEX_CSUM_XOR: u32 = 160_478;

/// The kind of block a salt identifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Superblock,
    BtreeNode,
    Bitmap,
    MetadataIndex,
}

impl BlockKind {
    pub fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => SUPERBLOCK_CSUM_XOR,
            BlockKind::BtreeNode => BTREE_CSUM_XOR,
            BlockKind::Bitmap => BITMAP_CSUM_XOR,
            BlockKind::MetadataIndex => INDEX_CSUM_XOR,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BlockKind::Superblock => "superblock",
            BlockKind::BtreeNode => "btree node",
            BlockKind::Bitmap => "space map bitmap",
            BlockKind::MetadataIndex => "metadata space map index",
        }
    }
}

/// The checksum a block of `kind` must carry, computed over bytes 4.. of `block`.
pub fn compute(block: &[u8], kind: BlockKind) -> u32 {
    crc32c::crc32c(block.get(4..).unwrap_or(&[])) ^ 0xFFFF_FFFF ^ kind.salt()
}

/// Store the checksum of `kind` at offset 0.
pub fn seal(block: &mut [u8], kind: BlockKind) {
    let c = compute(block, kind);
    le::put_u32(block, 0, c);
}

/// Whether the stored checksum matches. Returns (stored, computed) on mismatch.
pub fn verify(block: &[u8], kind: BlockKind) -> Result<(), (u32, u32)> {
    let stored = le::u32_at(block, 0).unwrap_or(0);
    let computed = compute(block, kind);
    if stored == computed {
        Ok(())
    } else {
        Err((stored, computed))
    }
}

/// Identify a block by which salt makes its checksum valid (thinp `metadata_block_type`).
pub fn identify(block: &[u8]) -> Option<BlockKind> {
    let stored = le::u32_at(block, 0)?;
    let x = crc32c::crc32c(block.get(4..)?) ^ 0xFFFF_FFFF ^ stored;
    [
        BlockKind::Superblock,
        BlockKind::BtreeNode,
        BlockKind::Bitmap,
        BlockKind::MetadataIndex,
    ]
    .into_iter()
    .find(|k| k.salt() == x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from dmthin-format.md §1.1: block whose bytes 4..4096 are zero.
    #[test]
    fn vectors() {
        let b = [0u8; 4096];
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c::crc32c(&b[4..]) ^ 0xFFFF_FFFF, 0x58CD_A791);
        assert_eq!(compute(&b, BlockKind::Superblock), 0x58CF_D397);
        assert_eq!(compute(&b, BlockKind::BtreeNode), 0x58CC_7E82);
        assert_eq!(compute(&b, BlockKind::Bitmap), 0x58CE_0B1A);
        assert_eq!(compute(&b, BlockKind::MetadataIndex), 0x58CF_D54F);
    }

    #[test]
    fn seal_verify_identify() {
        let mut b = [7u8; 4096];
        seal(&mut b, BlockKind::Bitmap);
        assert!(verify(&b, BlockKind::Bitmap).is_ok());
        assert!(verify(&b, BlockKind::BtreeNode).is_err());
        assert_eq!(identify(&b), Some(BlockKind::Bitmap));
        b[100] ^= 1;
        assert!(verify(&b, BlockKind::Bitmap).is_err());
    }
}
