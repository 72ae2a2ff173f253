//! Sparse-aware copies between files and thin devices.
//!
//! Into a device: holes in the source (SEEK_DATA/SEEK_HOLE) and all-zero blocks are not
//! stored; where the device already maps such a block it is discarded, so the device
//! ends up byte-identical to the file. Blocks whose bytes already match the device are
//! not rewritten, so blocks shared with snapshots stay shared (only what differs costs
//! space). Out of a device: only mapped blocks are read;
//! a regular-file target is made sparse (holes are not written).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use thinvol_engine::format::ThinId;
use thinvol_engine::Pool;

use crate::progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Pool(#[from] thinvol_engine::Error),
}

fn ferr(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::File {
        path: path.display().to_string(),
        source,
    }
}

/// What a copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyStats {
    /// Bytes of the source covered.
    pub bytes: u64,
    /// Bytes actually written (non-zero data).
    pub bytes_written: u64,
    /// Bytes skipped as holes or zeros.
    pub bytes_skipped: u64,
    /// Bytes already equal on the device (not rewritten, so still shared with snapshots).
    pub bytes_unchanged: u64,
    /// Bytes whose content on the device differed and was rewritten or cleared.
    pub bytes_changed: u64,
    /// Blocks whose content differed (the pool's block size; a last block may be partial).
    pub blocks_changed: u64,
}

/// Data extents of a file: (offset, len) runs from SEEK_DATA/SEEK_HOLE, or the whole
/// file if the filesystem does not support them.
fn data_extents(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        // SAFETY: lseek on a valid fd has no memory-safety requirements.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no more data
            }
            return vec![(0, len)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        if hole > data {
            out.push((data as u64, (hole - data) as u64));
        }
        pos = hole;
    }
    out
}

/// Copy the whole file at `path` into device `id` from byte 0.
pub fn file_into_device(
    pool: &Pool,
    id: ThinId,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<CopyStats, CopyError> {
    image_into_device(pool, id, path, None, progress)
}

/// Length of a regular file or block device (seeking to its end).
pub fn source_len(path: &Path) -> Result<u64, CopyError> {
    let mut f = File::open(path).map_err(ferr(path))?;
    io::Seek::seek(&mut f, io::SeekFrom::End(0)).map_err(ferr(path))
}

/// Bring device `id` to the content of the image at `path`: afterwards the device's
/// first `max(file length, device_len)` bytes equal the file followed by zeros.
///
/// Only blocks whose content differs are touched: a block already equal is not
/// rewritten (it stays shared with snapshots), a zero block or hole in the file is not
/// stored, and where the device maps non-zero bytes there they are discarded.
/// `bytes_changed`/`blocks_changed` count the blocks whose content differed — what a
/// block-by-block comparison of the old and the new content finds.
pub fn image_into_device(
    pool: &Pool,
    id: ThinId,
    path: &Path,
    device_len: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<CopyStats, CopyError> {
    let len = source_len(path)?;
    let f = File::open(path).map_err(ferr(path))?;
    let total = device_len.unwrap_or(len).max(len);
    let bs = pool.block_size();
    progress.start("import", total);
    let mut stats = CopyStats {
        bytes: len,
        ..Default::default()
    };
    let extents = data_extents(&f, len);
    let mut buf = vec![0u8; bs as usize];
    let mut cur = vec![0u8; bs as usize];
    // Blocks the device maps now: only those can hold non-zero or equal bytes.
    let mapped: std::collections::BTreeSet<u64> = pool
        .mappings_range(id, 0, total.div_ceil(bs))?
        .into_iter()
        .map(|(v, _)| v.0)
        .collect();
    // Make [from, to) read as zeros, touching only mapped blocks that are not zero
    // there (whole zero blocks are unmapped to free their space).
    let clear = |from: u64, to: u64, cur: &mut [u8], stats: &mut CopyStats| {
        if to <= from {
            return Ok::<(), CopyError>(());
        }
        for &b in mapped.range(from / bs..to.div_ceil(bs)) {
            let s = (b * bs).max(from);
            let e = ((b + 1) * bs).min(to);
            let part = &mut cur[..(e - s) as usize];
            pool.read(id, s, part)?;
            if part.iter().any(|&x| x != 0) {
                stats.bytes_changed += e - s;
                stats.blocks_changed += 1;
                pool.discard(id, s, e - s)?;
            } else if e - s == bs {
                pool.discard(id, s, bs)?;
            }
        }
        Ok(())
    };
    let mut covered = 0u64;
    for (off, elen) in extents {
        // Align the extent outward to blocks.
        let start = off / bs * bs;
        let end = ((off + elen).div_ceil(bs) * bs).min(len.div_ceil(bs) * bs);
        if start > covered {
            clear(covered, start, &mut cur, &mut stats)?;
            progress.advance(start - covered);
        }
        let mut pos = start.max(covered);
        while pos < end {
            let n = bs.min(len - pos) as usize;
            let chunk = &mut buf[..n];
            f.read_exact_at(chunk, pos).map_err(ferr(path))?;
            if chunk.iter().all(|&b| b == 0) {
                clear(pos, pos + n as u64, &mut cur, &mut stats)?;
            } else {
                let same = mapped.contains(&(pos / bs)) && {
                    pool.read(id, pos, &mut cur[..n])?;
                    cur[..n] == *chunk
                };
                if same {
                    stats.bytes_unchanged += n as u64;
                } else {
                    pool.write(id, pos, chunk)?;
                    stats.bytes_written += n as u64;
                    stats.bytes_changed += n as u64;
                    stats.blocks_changed += 1;
                }
            }
            progress.advance(n as u64);
            pos += bs;
        }
        covered = covered.max(end);
    }
    // The rest of the file after its last data, then the device beyond the file
    // (including the end of a last, partial block).
    let from = covered.min(len);
    clear(from, total, &mut cur, &mut stats)?;
    progress.advance(total - from);
    stats.bytes_skipped = len - stats.bytes_written - stats.bytes_unchanged;
    pool.commit()?;
    progress.finish();
    Ok(stats)
}

/// Copy `len` bytes of device `id` to a file (created or truncated), sparse.
pub fn device_to_file(
    pool: &Pool,
    id: ThinId,
    len: u64,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<CopyStats, CopyError> {
    let f = File::create(path).map_err(ferr(path))?;
    f.set_len(len).map_err(ferr(path))?;
    let bs = pool.block_size();
    progress.start("export", len);
    let mut stats = CopyStats {
        bytes: len,
        ..Default::default()
    };
    let mut buf = vec![0u8; bs as usize];
    let mut done = 0;
    for (vb, _) in pool.mappings_range(id, 0, len.div_ceil(bs))? {
        let off = vb.0 * bs;
        let n = bs.min(len - off) as usize;
        pool.read(id, off, &mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            f.write_all_at(&buf[..n], off).map_err(ferr(path))?;
            stats.bytes_written += n as u64;
        }
        progress.advance(off + n as u64 - done);
        done = off + n as u64;
    }
    progress.advance(len - done);
    stats.bytes_skipped = len - stats.bytes_written;
    f.sync_all().map_err(ferr(path))?;
    progress.finish();
    Ok(stats)
}

/// Stream `len` bytes of device `id` to a writer (holes become zeros).
pub fn device_to_writer(
    pool: &Pool,
    id: ThinId,
    len: u64,
    out: &mut dyn Write,
    progress: &mut dyn Progress,
) -> Result<CopyStats, CopyError> {
    let bs = pool.block_size();
    progress.start("export", len);
    let mut buf = vec![0u8; bs as usize];
    let mut pos = 0;
    let stdout = Path::new("-");
    while pos < len {
        let n = bs.min(len - pos) as usize;
        pool.read(id, pos, &mut buf[..n])?;
        out.write_all(&buf[..n]).map_err(ferr(stdout))?;
        progress.advance(n as u64);
        pos += n as u64;
    }
    out.flush().map_err(ferr(stdout))?;
    progress.finish();
    Ok(CopyStats {
        bytes: len,
        bytes_written: len,
        ..Default::default()
    })
}

/// Read a whole stream into device `id` from byte 0 (zero blocks are not stored).
pub fn reader_into_device(
    pool: &Pool,
    id: ThinId,
    input: &mut dyn Read,
    progress: &mut dyn Progress,
) -> Result<CopyStats, CopyError> {
    let bs = pool.block_size() as usize;
    let mut buf = vec![0u8; bs];
    let mut pos = 0u64;
    let mut stats = CopyStats::default();
    let stdin = Path::new("-");
    progress.start("import", 0);
    loop {
        let mut n = 0;
        while n < bs {
            let r = input.read(&mut buf[n..]).map_err(ferr(stdin))?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            pool.discard(id, pos, n as u64)?;
            stats.bytes_skipped += n as u64;
        } else {
            pool.write(id, pos, &buf[..n])?;
            stats.bytes_written += n as u64;
        }
        pos += n as u64;
        progress.advance(n as u64);
        if n < bs {
            break;
        }
    }
    stats.bytes = pos;
    pool.commit()?;
    progress.finish();
    Ok(stats)
}
