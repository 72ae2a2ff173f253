//! The body of the `open_read` fuzz target (fuzz/fuzz_targets/open_read.rs), kept in
//! the engine so that plain `cargo test` runs it over the seed corpus on a stable
//! toolchain (crates/engine/tests/bad_input.rs) and the fuzzer and CI exercise exactly
//! the same code.
//!
//! Input layout: byte 0 is a control byte, the rest is a metadata image.
//!
//! | control bits | meaning |
//! |---|---|
//! | bit 0 | re-seal: give every non-zero block its own location and a valid checksum, so mutations reach the structural checks behind the checksums |
//! | bit 1 | pad the image with zeros up to the size its superblock claims |
//! | bits 2-3 | data device size: 4 MiB, 1 MiB, 16 MiB, 0 bytes |
//! | bit 4 | after the reads, write to the first device, commit and check again |
//! | bit 5 | open read-only (`OpenOptions::read_only`) |
//!
//! The image is cut to a multiple of 4 KiB and to at most [`MAX_IMAGE`]. Whatever the
//! input, every call must return (Ok or a typed error): no panic, no hang, bounded
//! memory.

use std::sync::Arc;
use std::time::Duration;

use thinvol_format::checksum::{self, BlockKind};
use thinvol_format::{le, superblock, ThinId, METADATA_BLOCK_SIZE};

use crate::storage::{MemStorage, Storage};
use crate::{Error, OpenOptions, Pool, Result};

/// Largest metadata image the target builds (256 blocks).
pub const MAX_IMAGE: usize = 1 << 20;

/// Bit 0 of the control byte: re-seal every block.
pub const RESEAL: u8 = 1;
/// Bit 1: pad to the size claimed by the superblock.
pub const PAD: u8 = 2;
/// Bit 4: write after reading.
pub const WRITE: u8 = 16;
/// Bit 5: open read-only.
pub const READ_ONLY: u8 = 32;

/// What one run saw (for the seed test; the fuzzer ignores it).
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub devices: usize,
    pub mappings: u64,
    pub check_clean: bool,
    /// Errors returned by calls after a successful open (Display strings).
    pub errors: Vec<String>,
}

/// Fuzz entry point: never panics on any input (a panic is a bug to fix).
pub fn open_read(input: &[u8]) {
    let _ = run(input);
}

/// Build the metadata image and data device an input describes.
pub fn image(input: &[u8]) -> (Vec<u8>, u64) {
    let (ctl, body) = match input.split_first() {
        Some((c, b)) => (*c, b),
        None => (0, &[][..]),
    };
    let bs = METADATA_BLOCK_SIZE;
    let mut img = body[..body.len().min(MAX_IMAGE) / bs * bs].to_vec();
    if ctl & PAD != 0 && img.len() >= bs {
        let claimed = le::u64_at(&img, superblock::METADATA_SM_ROOT_OFFSET).unwrap_or(0);
        let want = usize::try_from(claimed)
            .unwrap_or(usize::MAX)
            .min(MAX_IMAGE / bs)
            * bs;
        if want > img.len() {
            img.resize(want, 0);
        }
    }
    if ctl & RESEAL != 0 {
        reseal(&mut img);
    }
    let data_len = match (ctl >> 2) & 3 {
        0 => 4 << 20,
        1 => 1 << 20,
        2 => 16 << 20,
        _ => 0,
    };
    (img, data_len)
}

/// Give every non-zero block its own location and a valid checksum of the kind it
/// looks like: block 0 a superblock, the block the superblock names as metadata space
/// map index an index, a block with node flags a btree node, anything else a bitmap.
fn reseal(img: &mut [u8]) {
    let bs = METADATA_BLOCK_SIZE;
    let index_at = le::u64_at(img, superblock::METADATA_SM_ROOT_OFFSET + 16).unwrap_or(0);
    for (i, blk) in img.chunks_exact_mut(bs).enumerate() {
        if blk.iter().all(|&b| b == 0) {
            continue;
        }
        let i = i as u64;
        le::put_u64(blk, 8, i);
        let kind = if i == 0 {
            BlockKind::Superblock
        } else if i == index_at {
            BlockKind::MetadataIndex
        } else if matches!(le::u32_at(blk, 4), Some(1..=3)) {
            BlockKind::BtreeNode
        } else {
            BlockKind::Bitmap
        };
        checksum::seal(blk, kind);
    }
}

/// Open the image and exercise the read paths: device list, reads, mappings, status,
/// check, delta; optionally a write and commit.
pub fn run(input: &[u8]) -> Result<Outcome> {
    let ctl = input.first().copied().unwrap_or(0);
    let (img, data_len) = image(input);
    let meta: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(img));
    let data: Arc<dyn Storage> = Arc::new(MemStorage::new(data_len));
    let opts = OpenOptions {
        commit_interval: Duration::ZERO,
        read_only: ctl & READ_ONLY != 0,
    };
    let pool = Pool::open_on(meta.clone(), data.clone(), &opts)?;
    let mut out = Outcome::default();
    let note = |r: Result<()>, out: &mut Outcome| {
        if let Err(e) = r {
            out.errors.push(e.to_string());
        }
    };
    let devs = pool.devices()?;
    out.devices = devs.len();
    let bs = pool.block_size();
    let mut buf = vec![0u8; 4096];
    for d in devs.iter().take(8) {
        // A few fixed blocks, mapped or not.
        for vb in [0u64, 1, 2, 63, 1 << 20] {
            let r = pool.read(d.id, vb.saturating_mul(bs), &mut buf[..512]);
            note(r, &mut out);
        }
        match pool.mappings(d.id) {
            Ok(m) => {
                out.mappings += m.len() as u64;
                for (vb, _) in m.iter().take(16) {
                    let r = pool.read(d.id, vb.0.saturating_mul(bs), &mut buf);
                    note(r, &mut out);
                }
                // A read that spans two blocks.
                if let Some((vb, _)) = m.first() {
                    let off = (vb.0 + 1).saturating_mul(bs).saturating_sub(100);
                    note(pool.read(d.id, off, &mut buf[..200]), &mut out);
                }
            }
            Err(e) => out.errors.push(e.to_string()),
        }
        note(pool.mappings_range(d.id, 10, 20).map(|_| ()), &mut out);
    }
    note(pool.status().map(|_| ()), &mut out);
    if devs.len() >= 2 {
        for same in [false, true] {
            let r = pool.delta(devs[0].id, devs[1].id, same);
            note(r.map(|_| ()), &mut out);
        }
    }
    match pool.check() {
        Ok(rep) => out.check_clean = rep.is_clean(),
        Err(e) => out.errors.push(e.to_string()),
    }
    if ctl & WRITE != 0 {
        note(write_phase(&pool, &devs), &mut out);
        drop(pool);
        // Whatever was committed must open again or fail cleanly.
        if let Ok(p) = Pool::open_on(meta, data, &opts) {
            note(p.check().map(|_| ()), &mut out);
        }
    } else {
        note(pool.close(), &mut out);
    }
    Ok(out)
}

fn write_phase(pool: &Pool, devs: &[crate::DeviceInfo]) -> Result<()> {
    let bs = pool.block_size();
    let id = match devs.first() {
        Some(d) => d.id,
        None => {
            pool.create_thin(ThinId(1))?;
            ThinId(1)
        }
    };
    pool.write(id, 0, &[0xA5; 4096])?;
    pool.write(id, 3 * bs + 100, &[0x5A; 300])?;
    pool.create_snap(ThinId(999), id)?;
    pool.write(id, 0, &[0x11; 512])?;
    pool.discard(id, 3 * bs, bs)?;
    pool.commit()?;
    pool.delete_thin(ThinId(999))?;
    let rep = pool.check()?;
    if rep.is_clean() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "check after writes found {} problems",
            rep.problems.len()
        )))
    }
}
