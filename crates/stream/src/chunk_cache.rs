//! The pool's content-hash cache: `POOLDIR/digests/chunks.b3` holds, for each 64 KiB
//! chunk of the pool's data file, the BLAKE3 of its content (32 bytes at offset
//! `data_offset / 64 KiB * 32`; a sparse file). An all-zero entry means "unknown".
//!
//! It lets a digest derivation subtract the old contribution of a chunk without
//! reading the chunk (docs/design.md §13.5, invariant C): every path that stores a
//! snapshot's digest first records (and fsyncs) the content hash of every chunk it
//! hashed at that snapshot's data offsets; a data block mapped by a snapshot is never
//! written in place, so the entry of a block that a digest-bearing snapshot maps stays
//! true while that snapshot exists; and a freed-and-reused block enters a
//! digest-bearing snapshot only through a derivation that records it anew. Entries of
//! other blocks may be stale: they are consulted only for blocks of digest-bearing
//! snapshots. Only whole chunks are recorded (a volume's partial last chunk is always
//! read).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::digest::{ChunkHash, CHUNK};
use crate::error::{io, Result};

pub const CACHE_FILE: &str = "chunks.b3";
const ENTRY: u64 = 32;

pub struct ChunkCache {
    file: File,
    path: PathBuf,
    writable: bool,
}

impl ChunkCache {
    pub fn path(pool_dir: &Path) -> PathBuf {
        pool_dir.join("digests").join(CACHE_FILE)
    }

    /// Open (creating it) for lookups and records.
    pub fn open(pool_dir: &Path) -> Result<ChunkCache> {
        let dir = pool_dir.join("digests");
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let path = Self::path(pool_dir);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        Ok(ChunkCache {
            file,
            path,
            writable: true,
        })
    }

    /// Open for lookups only (None when there is no cache).
    pub fn open_read_only(pool_dir: &Path) -> Option<ChunkCache> {
        let path = Self::path(pool_dir);
        let file = File::open(&path).ok()?;
        Some(ChunkCache {
            file,
            path,
            writable: false,
        })
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The recorded hashes of the `n` chunks starting at data-file byte `phys` (a
    /// multiple of 64 KiB; otherwise every entry is unknown). None = unknown.
    pub fn get_run(&self, phys: u64, n: usize) -> Vec<Option<ChunkHash>> {
        if !phys.is_multiple_of(CHUNK) || n == 0 {
            return vec![None; n];
        }
        let mut buf = vec![0u8; n * ENTRY as usize];
        if crate::digest::read_full_at(&self.file, &mut buf, phys / CHUNK * ENTRY).is_err() {
            return vec![None; n];
        }
        buf.chunks_exact(ENTRY as usize)
            .map(|e| {
                let mut h = [0u8; 32];
                h.copy_from_slice(e);
                (h != [0u8; 32]).then_some(h)
            })
            .collect()
    }

    /// Record the hashes of consecutive chunks starting at data-file byte `phys` (a
    /// multiple of 64 KiB).
    pub fn put_run(&self, phys: u64, hashes: &[ChunkHash]) -> Result<()> {
        if hashes.is_empty() || !phys.is_multiple_of(CHUNK) {
            return Ok(());
        }
        let b: Vec<u8> = hashes.iter().flatten().copied().collect();
        self.file
            .write_all_at(&b, phys / CHUNK * ENTRY)
            .map_err(io(format!("writing {}", self.path.display())))
    }

    /// Forget every entry (all become unknown, which is always safe), durably. Every
    /// open handle of the pool's cache sees it: the file is cut, not replaced.
    pub fn clear(&self) -> Result<()> {
        self.file
            .set_len(0)
            .map_err(io(format!("clearing {}", self.path.display())))?;
        self.sync()
    }

    /// Make the records durable (before a digest that relies on them is stored).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(io(format!("syncing {}", self.path.display())))
    }
}
