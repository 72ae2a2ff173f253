//! Backing store over a regular file or a block device.
//!
//! All I/O is positional (`pread`/`pwrite` through [`FileExt`]), so one
//! [`FileStorage`] can be used from many threads at once through `&self`. After
//! [`FileStorage::map_for_reads`] (the pool's data file), small reads of a regular file
//! are copied from a read-only mapping of it instead of `pread` (same page cache, no
//! system call; see [`super::mapped`]), unless the environment sets
//! `THINVOL_MAPPED_READS=0`.
//!
//! Discard semantics (the range must read back as zeros afterwards):
//! * Regular file: `fallocate(PUNCH_HOLE | KEEP_SIZE)`; if the filesystem does not
//!   support hole punching, the range is overwritten with zeros instead.
//! * Block device: the part of the range aligned to the logical sector size is given
//!   to `fallocate(PUNCH_HOLE | KEEP_SIZE)` (Linux >= 4.9: the kernel unmaps the range
//!   and *guarantees* it reads as zeros, or fails), then `BLKZEROOUT` (guaranteed
//!   zeros, may write them), then plain zero writes. Plain `BLKDISCARD` is not used:
//!   it does not promise that the range reads back as zeros. Any unaligned head or
//!   tail is written with zeros.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::mapped::{ReadMap, MAPPED_READ_MAX};
use super::mem::{check_range, Access};
use super::Storage;

/// Largest buffer used when a range has to be zeroed by writing.
const ZERO_CHUNK: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    /// A block device and its logical sector size in bytes.
    Block {
        sector: u64,
    },
}

/// A regular file or a block device used as a pool device.
pub struct FileStorage {
    file: File,
    path: PathBuf,
    kind: Kind,
    writable: bool,
    /// Size used for bounds checks: the file length (kept current by `grow` and
    /// refreshed by `len`) or the block device size.
    len: AtomicU64,
    /// Serialises `grow` so two concurrent calls can never shrink the file.
    grow_lock: Mutex<()>,
    /// A writable regular file whose filesystem punches holes (probed at open):
    /// zero-copy reads may splice from it (see [`Storage::splice_fd`]).
    punches: bool,
    /// Small reads of a regular file come from this mapping (None: all use `pread`).
    map: Option<ReadMap>,
}

/// Whether small reads may use a mapping: yes unless `THINVOL_MAPPED_READS=0`.
fn mapped_reads_enabled() -> bool {
    std::env::var_os("THINVOL_MAPPED_READS").is_none_or(|v| v != "0")
}

impl FileStorage {
    /// Opens an existing regular file or block device, read-only unless `writable`.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Self::from_file(file, path, writable)
    }

    /// Creates a new regular file of `len` bytes (sparse); fails if `path` exists.
    pub fn create(path: &Path, len: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(len)?;
        Self::from_file(file, path, true)
    }

    fn from_file(file: File, path: &Path, writable: bool) -> io::Result<Self> {
        let meta = file.metadata()?;
        let file_type = meta.file_type();
        let (kind, len) = if file_type.is_file() {
            (Kind::File, meta.len())
        } else if file_type.is_block_device() {
            let sector = sys::logical_sector_size(&file).unwrap_or(512);
            (Kind::Block { sector }, sys::block_device_size(&file)?)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        // Probe hole punching where it changes nothing: a range past the end of the
        // file (KEEP_SIZE). Filesystems without it answer EOPNOTSUPP.
        let punches = writable
            && kind == Kind::File
            && sys::punch_hole(&file, len.max(1 << 20), 4096).is_ok();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            kind,
            writable,
            len: AtomicU64::new(len),
            grow_lock: Mutex::new(()),
            punches,
            map: None,
        })
    }

    /// The path this storage was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, copy reads of up to 32 KiB from a read-only mapping of the file
    /// rather than `pread` them: regular files on x86-64 Linux, unless the environment
    /// sets `THINVOL_MAPPED_READS=0`; otherwise (or if the mapping fails) nothing
    /// changes. Worth it for hot, random small reads (the data file); a fresh mapping
    /// pays a page fault per first touch and the kernel's readaround on cold pages,
    /// which is why the metadata file is not mapped (docs/design.md §4.1).
    pub fn map_for_reads(mut self) -> Self {
        if self.kind == Kind::File && self.map.is_none() && mapped_reads_enabled() {
            self.map = ReadMap::new(&self.file, self.len.load(Ordering::Acquire));
        }
        self
    }

    /// Whether small reads are copied from a mapping ([`FileStorage::map_for_reads`]).
    pub fn mapped_reads(&self) -> bool {
        self.map.is_some()
    }

    /// Whether this is a block device (as opposed to a regular file).
    pub fn is_block_device(&self) -> bool {
        matches!(self.kind, Kind::Block { .. })
    }

    /// Bytes actually allocated on the host (`st_blocks * 512`); lets tests check that
    /// `discard` punched holes. Meaningless (usually 0) for block devices.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks().saturating_mul(512))
    }

    fn check_writable(&self, what: &str) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{what} on {} opened read-only", self.path.display()),
            ))
        }
    }

    /// Overwrites `[offset, offset + len)` with zeros.
    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len);
        let zeros = vec![0u8; usize::try_from(len.min(ZERO_CHUNK)).unwrap_or(1 << 20)];
        while offset < end {
            let n = usize::try_from(end - offset)
                .unwrap_or(zeros.len())
                .min(zeros.len());
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Zeroes an aligned range of a block device, unmapping it where possible.
    fn zero_block_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if sys::punch_hole(&self.file, offset, len).is_ok()
            || sys::blk_zeroout(&self.file, offset, len).is_ok()
        {
            return Ok(());
        }
        self.write_zeros(offset, len)
    }
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStorage")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("writable", &self.writable)
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("mapped_reads", &self.map.is_some())
            .finish()
    }
}

impl Storage for FileStorage {
    fn len(&self) -> io::Result<u64> {
        let len = match self.kind {
            Kind::File => self.file.metadata()?.len(),
            Kind::Block { .. } => sys::block_device_size(&self.file)?,
        };
        self.len.store(len, Ordering::Release);
        Ok(len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let dev_len = self.len.load(Ordering::Acquire);
        check_range(Access::Read, offset, buf.len() as u64, dev_len)?;
        if buf.len() <= MAPPED_READ_MAX {
            if let Some(map) = &self.map {
                // A range the mapping cannot serve (past its reserve, or a page that
                // faulted) is read again with pread, which reports the real error.
                if map.read(buf, offset) {
                    return Ok(());
                }
            }
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable("write")?;
        let dev_len = self.len.load(Ordering::Acquire);
        check_range(Access::Write, offset, buf.len() as u64, dev_len)?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        match self.kind {
            Kind::File => {
                let _guard = self.grow_lock.lock().unwrap_or_else(|e| e.into_inner());
                let current = self.file.metadata()?.len();
                if len > current {
                    self.check_writable("grow")?;
                    self.file.set_len(len)?;
                }
                self.len.store(len.max(current), Ordering::Release);
                Ok(())
            }
            Kind::Block { .. } => {
                // Re-read the size: the device may have been resized (lvextend).
                let size = sys::block_device_size(&self.file)?;
                self.len.store(size, Ordering::Release);
                if len <= size {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!(
                            "cannot grow block device {} to {len} bytes: it has {size} bytes",
                            self.path.display()
                        ),
                    ))
                }
            }
        }
    }

    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if self.is_block_device() {
            return Ok(false);
        }
        // SAFETY: lseek on our own open descriptor; no memory is passed.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let r = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data at or after offset.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(true)
            } else {
                Ok(false)
            };
        }
        Ok(r as u64 >= offset.saturating_add(len))
    }

    fn prefetch(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: an advisory call on our own descriptor; no memory is passed.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                off,
                len,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }

    fn splice_fd(&self) -> Option<std::os::fd::RawFd> {
        self.punches
            .then(|| std::os::fd::AsRawFd::as_raw_fd(&self.file))
    }

    fn evict(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable("evict")?;
        let dev_len = self.len.load(Ordering::Acquire);
        check_range(Access::Discard, offset, len, dev_len)?;
        if len == 0 {
            return Ok(());
        }
        match self.kind {
            Kind::File => sys::punch_hole(&self.file, offset, len),
            // Never spliced from (`splice_fd` is None): nothing to evict.
            Kind::Block { .. } => Ok(()),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable("discard")?;
        let dev_len = self.len.load(Ordering::Acquire);
        let end = check_range(Access::Discard, offset, len, dev_len)?;
        if len == 0 {
            return Ok(());
        }
        match self.kind {
            Kind::File => match sys::punch_hole(&self.file, offset, len) {
                Ok(()) => Ok(()),
                Err(e) if sys::is_unsupported(&e) => self.write_zeros(offset, len),
                Err(e) => Err(e),
            },
            Kind::Block { sector } => {
                // `sector` is a power of two (the kernel's logical block size).
                let start = offset.checked_next_multiple_of(sector).unwrap_or(end);
                let stop = end - end % sector;
                if start >= stop {
                    return self.write_zeros(offset, len);
                }
                self.write_zeros(offset, start - offset)?;
                self.zero_block_range(start, stop - start)?;
                self.write_zeros(stop, end - stop)
            }
        }
    }
}

/// Thin wrappers around the Linux system calls `std` does not expose.
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    // Request numbers from <linux/fs.h>, built inline with libc's `_IO`/`_IOR` so the
    // per-architecture encoding is right:
    //   BLKSSZGET    = _IO(0x12, 104)            -> int
    //   BLKGETSIZE64 = _IOR(0x12, 114, size_t)   -> u64
    //   BLKZEROOUT   = _IO(0x12, 127)            <- u64[2] {offset, len}

    fn cvt(ret: libc::c_int) -> io::Result<()> {
        if ret == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn off_t(v: u64) -> io::Result<libc::off_t> {
        libc::off_t::try_from(v).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {v} does not fit in off_t"),
            )
        })
    }

    /// Size in bytes of a block device (`BLKGETSIZE64`).
    pub(super) fn block_device_size(file: &File) -> io::Result<u64> {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid and
        // properly aligned for the duration of the call.
        cvt(unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::_IOR::<libc::size_t>(0x12, 114),
                &mut size as *mut u64,
            )
        })?;
        Ok(size)
    }

    /// Logical sector size of a block device (`BLKSSZGET`).
    pub(super) fn logical_sector_size(file: &File) -> io::Result<u64> {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which is valid and
        // properly aligned for the duration of the call.
        cvt(unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::_IO(0x12, 104),
                &mut size as *mut libc::c_int,
            )
        })?;
        match u64::try_from(size) {
            Ok(s) if s.is_power_of_two() && s >= 512 => Ok(s),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("implausible logical sector size {size}"),
            )),
        }
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the range reads as zeros afterwards.
    pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = (off_t(offset)?, off_t(len)?);
        // SAFETY: plain system call on an open descriptor; no memory is passed.
        cvt(unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        })
    }

    /// `BLKZEROOUT` on a sector-aligned range of a block device.
    pub(super) fn blk_zeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads two u64s through the pointer, which is valid for
        // the duration of the call.
        cvt(unsafe { libc::ioctl(file.as_raw_fd(), libc::_IO(0x12, 127), range.as_ptr()) })
    }

    /// Whether `fallocate` failed because the filesystem cannot punch holes.
    pub(super) fn is_unsupported(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn create_write_read_reopen() {
        let dir = tmp();
        let path = dir.path().join("dev");
        let s = FileStorage::create(&path, 1 << 20).unwrap();
        assert_eq!(s.len().unwrap(), 1 << 20);
        assert_eq!(s.path(), path);
        assert!(!s.is_block_device());
        s.write_at(b"thin pool", 4096).unwrap();
        s.flush().unwrap();
        drop(s);

        let s = FileStorage::open(&path, false).unwrap();
        let mut buf = [0u8; 9];
        s.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"thin pool");
        let dbg = format!("{s:?}");
        assert!(dbg.contains("FileStorage") && dbg.contains("dev"), "{dbg}");
    }

    #[test]
    fn create_fails_if_exists() {
        let dir = tmp();
        let path = dir.path().join("dev");
        FileStorage::create(&path, 4096).unwrap();
        let e = FileStorage::create(&path, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn create_is_sparse() {
        let dir = tmp();
        let s = FileStorage::create(&dir.path().join("dev"), 64 << 20).unwrap();
        assert!(s.allocated_bytes().unwrap() < 1 << 20);
    }

    #[test]
    fn open_rejects_directories() {
        let dir = tmp();
        let e = FileStorage::open(dir.path(), false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn read_only_rejects_writes() {
        let dir = tmp();
        let path = dir.path().join("dev");
        FileStorage::create(&path, 4096).unwrap();
        let s = FileStorage::open(&path, false).unwrap();
        let kind = s.write_at(&[1], 0).unwrap_err().kind();
        assert_eq!(kind, io::ErrorKind::PermissionDenied);
        let kind = s.discard(0, 512).unwrap_err().kind();
        assert_eq!(kind, io::ErrorKind::PermissionDenied);
        let kind = s.grow(8192).unwrap_err().kind();
        assert_eq!(kind, io::ErrorKind::PermissionDenied);
        s.grow(100).unwrap();
        s.flush().unwrap();
    }

    #[test]
    fn bounds_errors() {
        let dir = tmp();
        let s = FileStorage::create(&dir.path().join("dev"), 8192).unwrap();
        let mut buf = [0u8; 4096];
        let e = s.read_at(&mut buf, 4097).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("4097"), "{e}");
        assert!(e.to_string().contains("4096"), "{e}");
        let e = s.write_at(&buf, 8000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("8000"), "{e}");
        let e = s.write_at(&buf, u64::MAX - 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = s.discard(4096, 4097).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = s.discard(u64::MAX, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // The failed write must not have extended the file.
        assert_eq!(s.len().unwrap(), 8192);
        s.read_at(&mut buf, 4096).unwrap();
        s.write_at(&buf, 4096).unwrap();
    }

    #[test]
    fn grow_extends_and_never_shrinks() {
        let dir = tmp();
        let s = FileStorage::create(&dir.path().join("dev"), 4096).unwrap();
        assert!(s.write_at(&[1; 512], 4096).is_err());
        s.grow(1 << 20).unwrap();
        assert_eq!(s.len().unwrap(), 1 << 20);
        s.write_at(&[1; 512], 4096).unwrap();
        s.grow(4096).unwrap();
        assert_eq!(s.len().unwrap(), 1 << 20);
        let mut buf = [0u8; 512];
        s.read_at(&mut buf, (1 << 20) - 512).unwrap();
        assert_eq!(buf, [0; 512]);
    }

    #[test]
    fn concurrent_grow_and_io() {
        let dir = tmp();
        let s = std::sync::Arc::new(FileStorage::create(&dir.path().join("dev"), 0).unwrap());
        let handles: Vec<_> = (1..=8u8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let off = u64::from(i) * 4096;
                    s.grow(off + 4096).unwrap();
                    s.write_at(&[i; 4096], off).unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(s.len().unwrap(), 9 * 4096);
        let mut buf = [0u8; 4096];
        for i in 1..=8u8 {
            s.read_at(&mut buf, u64::from(i) * 4096).unwrap();
            assert!(buf.iter().all(|&b| b == i));
        }
    }

    #[test]
    fn discard_zeroes_and_releases_space() {
        let dir = tmp();
        let s = FileStorage::create(&dir.path().join("dev"), 4 << 20).unwrap();
        let data = vec![0xa5u8; 4 << 20];
        s.write_at(&data, 0).unwrap();
        s.flush().unwrap();
        let before = s.allocated_bytes().unwrap();
        assert!(before >= 4 << 20, "allocated {before}");

        s.discard(1 << 20, 2 << 20).unwrap();
        s.flush().unwrap();
        let mut buf = vec![0u8; 4 << 20];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1 << 20].iter().all(|&b| b == 0xa5));
        assert!(buf[1 << 20..3 << 20].iter().all(|&b| b == 0));
        assert!(buf[3 << 20..].iter().all(|&b| b == 0xa5));
        assert_eq!(s.len().unwrap(), 4 << 20, "discard must keep the size");

        let after = s.allocated_bytes().unwrap();
        // Filesystems without hole punching fall back to writing zeros; everything
        // used for tests here (ext4, xfs, btrfs, tmpfs) supports it.
        assert!(
            after <= before - (1 << 20),
            "hole punch did not release space: {before} -> {after}"
        );
    }

    #[test]
    fn discard_unaligned_range() {
        let dir = tmp();
        let s = FileStorage::create(&dir.path().join("dev"), 16384).unwrap();
        s.write_at(&[0xff; 16384], 0).unwrap();
        s.discard(100, 9000).unwrap();
        s.discard(0, 0).unwrap();
        let mut buf = vec![0u8; 16384];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0xff));
        assert!(buf[100..9100].iter().all(|&b| b == 0));
        assert!(buf[9100..].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn write_zeros_fallback() {
        let dir = tmp();
        let s = FileStorage::create(&dir.path().join("dev"), 3 << 20).unwrap();
        s.write_at(&vec![0x11; 3 << 20], 0).unwrap();
        s.write_zeros(10, (3 << 20) - 20).unwrap();
        let mut buf = vec![0u8; 3 << 20];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..10].iter().all(|&b| b == 0x11));
        assert!(buf[10..(3 << 20) - 10].iter().all(|&b| b == 0));
        assert!(buf[(3 << 20) - 10..].iter().all(|&b| b == 0x11));
    }

    #[test]
    fn block_device_if_available() {
        // Exercised only where a test loop device is provided; the path must be a
        // block device the test may overwrite.
        let Some(path) = std::env::var_os("THINVOL_TEST_BLOCK_DEVICE") else {
            return;
        };
        let s = FileStorage::open(Path::new(&path), true).unwrap();
        assert!(s.is_block_device());
        let size = s.len().unwrap();
        assert!(size >= 1 << 20);
        s.grow(size).unwrap();
        assert_eq!(
            s.grow(size + 1).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        s.write_at(&[0x5a; 65536], 0).unwrap();
        s.discard(1000, 60000).unwrap();
        let mut buf = vec![0u8; 65536];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1000].iter().all(|&b| b == 0x5a));
        assert!(buf[1000..61000].iter().all(|&b| b == 0));
        assert!(buf[61000..].iter().all(|&b| b == 0x5a));
        // The BLKZEROOUT fallback on its own.
        s.write_at(&[0x5a; 8192], 0).unwrap();
        sys::blk_zeroout(&s.file, 4096, 4096).unwrap();
        s.read_at(&mut buf[..8192], 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0x5a));
        assert!(buf[4096..8192].iter().all(|&b| b == 0));
        s.flush().unwrap();
        let mut buf = [0u8; 16];
        assert!(s.read_at(&mut buf, size - 8).is_err());
    }
}
