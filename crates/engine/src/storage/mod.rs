//! Byte-addressed backing stores for the metadata and data devices.
//!
//! The engine sees a device only through [`Storage`]. Implementations:
//! [`FileStorage`] (a regular file or a block device), [`MemStorage`] (tests) and
//! [`CrashStorage`] (a simulator that separates written bytes from durable bytes, so a
//! test can cut power at any write or flush and look at what survives).
//!
//! Contract shared by every implementation:
//! * `write_at` may be reordered with other writes and is not durable until `flush`
//!   returns Ok; a crash may keep any subset of the writes issued since the last
//!   flush (torn at 512-byte sector granularity).
//! * `read_at` past the end of the device is an error (`UnexpectedEof`).
//! * `discard` makes the range read as zeros and, where the host supports it, gives the
//!   space back (hole punch / BLKDISCARD). Like a write, it is durable only after `flush`.

mod crash;
mod file;
mod mapped;
mod mem;

pub use crash::{CrashImage, CrashMode, CrashSim, CrashStorage};
pub use file::FileStorage;
pub use mem::MemStorage;

use std::io;

// `len` is fallible and a device is never meaningfully "empty"; no `is_empty` wanted.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Current size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Fill `buf` from `offset`; error if the range extends past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`; error if the range extends past the end.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write and discard durable.
    fn flush(&self) -> io::Result<()>;
    /// Grow (never shrink) a file-backed device to `len` bytes; block devices return
    /// `Unsupported` unless `len` is at most their size.
    fn grow(&self, len: u64) -> io::Result<()>;
    /// Zero a range, releasing its space where possible.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether the range is known to read as zeros without having been written (a hole
    /// in a sparse file). `false` when unknown; callers then write zeros themselves.
    fn is_hole(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// The descriptor zero-copy readers may `splice` page-cache pages from, or `None`
    /// (the default) when they must copy. `Some` only for a regular file opened writable
    /// on a filesystem that punches holes, because of the rule that comes with it
    /// (docs/design.md §12, "Zero-copy reads"): a data block given to a new mapping is
    /// first made a hole with [`Storage::evict`], so writes to it land in fresh pages and
    /// never in pages an earlier reply may still reference.
    fn splice_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// A hint that `[offset, offset + len)` will be read soon: start reading it in the
    /// background. Never fails and changes no data; the default does nothing.
    fn prefetch(&self, _offset: u64, _len: u64) {}
    /// Punch `[offset, offset + len)`: it reads as zeros and its page-cache pages leave
    /// the file (pages still referenced by a pipe or socket keep their contents).
    /// Errors, rather than writing zeros in place, when the range cannot be punched.
    /// Only needed where [`Storage::splice_fd`] is `Some`; the default does nothing.
    fn evict(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}
