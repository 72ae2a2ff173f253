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

/// Copy `len` bytes of `path` (whole file when None) into device `id` at byte 0.
pub fn file_into_device(
    pool: &Pool,
    id: ThinId,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<CopyStats, CopyError> {
    let f = File::open(path).map_err(ferr(path))?;
    let len = f.metadata().map_err(ferr(path))?.len();
    let bs = pool.block_size();
    progress.start("import", len);
    let mut stats = CopyStats {
        bytes: len,
        ..Default::default()
    };
    let extents = data_extents(&f, len);
    // Blocks entirely inside holes: make sure the device has nothing there.
    let mut covered = 0u64;
    let mut buf = vec![0u8; bs as usize];
    let mut cur = vec![0u8; bs as usize];
    // Blocks the device maps now: only those can already hold equal bytes.
    let mapped: std::collections::HashSet<u64> = pool
        .mappings_range(id, 0, len.div_ceil(bs))?
        .into_iter()
        .map(|(v, _)| v.0)
        .collect();
    let clear = |from: u64, to: u64, stats: &mut CopyStats| -> Result<(), CopyError> {
        if to > from {
            pool.discard(id, from, to - from)?;
            stats.bytes_skipped += to - from;
        }
        Ok(())
    };
    for (off, elen) in extents {
        // Align the extent outward to blocks.
        let start = off / bs * bs;
        let end = ((off + elen).div_ceil(bs) * bs).min(len.div_ceil(bs) * bs);
        if start > covered {
            clear(covered, start, &mut stats)?;
            progress.advance(start - covered);
        }
        let mut pos = start.max(covered);
        while pos < end {
            let n = bs.min(len - pos.min(len)) as usize;
            let chunk = &mut buf[..n];
            f.read_exact_at(chunk, pos).map_err(ferr(path))?;
            let is_mapped = mapped.contains(&(pos / bs));
            if chunk.iter().all(|&b| b == 0) {
                if is_mapped {
                    pool.discard(id, pos, n as u64)?;
                }
                stats.bytes_skipped += n as u64;
            } else {
                let same = is_mapped && {
                    pool.read(id, pos, &mut cur[..n])?;
                    cur[..n] == *chunk
                };
                if same {
                    stats.bytes_unchanged += n as u64;
                } else {
                    pool.write(id, pos, chunk)?;
                    stats.bytes_written += n as u64;
                }
            }
            progress.advance(n as u64);
            pos += bs;
        }
        covered = covered.max(end);
    }
    if covered < len {
        clear(covered, len, &mut stats)?;
        progress.advance(len - covered);
    }
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
