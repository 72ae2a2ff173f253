//! In-memory backing store for tests.
//!
//! Every write is immediately "durable": there is no volatile cache, so `flush` is a
//! no-op. Use [`super::CrashStorage`] when a test needs to tell written bytes from
//! durable bytes.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::RwLock;

use super::Storage;

/// Which kind of access a range check is for; decides the error kind and message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    Read,
    Write,
    Discard,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Discard => "discard",
        }
    }
}

/// Checks that `[offset, offset + len)` lies inside a device of `dev_len` bytes and
/// returns the end of the range.
///
/// Reads past the end fail with `UnexpectedEof` (the [`Storage`] contract); writes and
/// discards past the end, and ranges whose end overflows `u64`, fail with
/// `InvalidInput`. The message names the offset, the length and the device size.
pub(super) fn check_range(access: Access, offset: u64, len: u64, dev_len: u64) -> io::Result<u64> {
    match offset.checked_add(len) {
        Some(end) if end <= dev_len => Ok(end),
        Some(_) => {
            let kind = if access == Access::Read {
                io::ErrorKind::UnexpectedEof
            } else {
                io::ErrorKind::InvalidInput
            };
            Err(io::Error::new(
                kind,
                format!(
                    "{} of {len} bytes at offset {offset} extends past the end of the \
                     device ({dev_len} bytes)",
                    access.name()
                ),
            ))
        }
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} of {len} bytes at offset {offset} overflows a 64-bit offset",
                access.name()
            ),
        )),
    }
}

/// Like [`check_range`] for a device held in memory: returns the range as indices
/// into the byte vector.
pub(super) fn check_mem_range(
    access: Access,
    offset: u64,
    len: usize,
    dev_len: usize,
) -> io::Result<Range<usize>> {
    let len64 = u64::try_from(len).map_err(|_| too_large(len))?;
    let dev_len64 = u64::try_from(dev_len).map_err(|_| too_large(dev_len))?;
    check_range(access, offset, len64, dev_len64)?;
    // offset + len <= dev_len, which fits in usize, so neither conversion can fail.
    let start = usize::try_from(offset).map_err(|_| too_large(len))?;
    Ok(start..start + len)
}

/// Converts a byte count from the [`Storage`] API (`u64`) to an in-memory length.
pub(super) fn mem_len(len: u64) -> io::Result<usize> {
    usize::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes do not fit in memory on this host"),
        )
    })
}

fn too_large(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("length {len} does not fit in 64 bits"),
    )
}

/// Length of an in-memory device as the `u64` the [`Storage`] API uses.
pub(super) fn len_u64(len: usize) -> u64 {
    // usize is at most 64 bits on every supported target.
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// A device held in a `Vec<u8>`. Cheap to create, thread safe, never fails except for
/// out-of-range accesses.
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// A zero-filled device of `len` bytes.
    ///
    /// # Panics
    /// If `len` bytes cannot be allocated (as `vec![0; len]` would); test-only type.
    pub fn new(len: u64) -> Self {
        Self::from_bytes(vec![0; usize::try_from(len).unwrap_or(usize::MAX)])
    }

    /// A device whose contents are `bytes` (for example a crash image).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.bytes.read().unwrap_or_else(|e| e.into_inner()).len();
        f.debug_struct("MemStorage").field("len", &len).finish()
    }
}

impl Storage for MemStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(len_u64(
            self.bytes.read().unwrap_or_else(|e| e.into_inner()).len(),
        ))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        let range = check_mem_range(Access::Read, offset, buf.len(), bytes.len())?;
        buf.copy_from_slice(&bytes[range]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        let range = check_mem_range(Access::Write, offset, buf.len(), bytes.len())?;
        bytes[range].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        let len = mem_len(len)?;
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        if len > bytes.len() {
            bytes.resize(len, 0);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        check_range(Access::Discard, offset, len, len_u64(bytes.len()))?;
        let range = check_mem_range(Access::Discard, offset, mem_len(len)?, bytes.len())?;
        bytes[range].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_roundtrip() {
        let s = MemStorage::new(4096);
        assert_eq!(s.len().unwrap(), 4096);
        s.write_at(b"hello", 100).unwrap();
        let mut buf = [0u8; 5];
        s.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"hello");
        s.flush().unwrap();
        assert_eq!(&s.snapshot()[100..105], b"hello");
    }

    #[test]
    fn from_bytes_and_snapshot() {
        let s = MemStorage::from_bytes(vec![7; 10]);
        assert_eq!(s.len().unwrap(), 10);
        assert_eq!(s.snapshot(), vec![7; 10]);
    }

    #[test]
    fn bounds_errors() {
        let s = MemStorage::new(1024);
        let mut buf = [0u8; 16];
        let e = s.read_at(&mut buf, 1020).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("1020"), "{e}");
        assert!(e.to_string().contains("16"), "{e}");
        assert_eq!(
            s.write_at(&buf, 1009).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            s.write_at(&buf, u64::MAX).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            s.read_at(&mut buf, u64::MAX - 3).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            s.discard(1000, 25).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            s.discard(u64::MAX, 2).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // Exactly up to the end is fine, and so is an empty access at the end.
        s.write_at(&buf, 1008).unwrap();
        s.read_at(&mut [], 1024).unwrap();
        assert!(s.read_at(&mut [], 1025).is_err());
    }

    #[test]
    fn discard_zeroes() {
        let s = MemStorage::from_bytes(vec![0xff; 2048]);
        s.discard(512, 1000).unwrap();
        let img = s.snapshot();
        assert!(img[..512].iter().all(|&b| b == 0xff));
        assert!(img[512..1512].iter().all(|&b| b == 0));
        assert!(img[1512..].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn grow_never_shrinks() {
        let s = MemStorage::new(100);
        s.write_at(&[1; 100], 0).unwrap();
        s.grow(200).unwrap();
        assert_eq!(s.len().unwrap(), 200);
        s.grow(50).unwrap();
        assert_eq!(s.len().unwrap(), 200);
        let img = s.snapshot();
        assert!(img[..100].iter().all(|&b| b == 1));
        assert!(img[100..].iter().all(|&b| b == 0));
        s.write_at(&[2; 100], 100).unwrap();
    }

    #[test]
    fn usable_as_trait_object_from_threads() {
        let s: std::sync::Arc<dyn Storage> = std::sync::Arc::new(MemStorage::new(8 * 1024));
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    s.write_at(&[i; 1024], u64::from(i) * 1024).unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut buf = [0u8; 1024];
        for i in 0..8u8 {
            s.read_at(&mut buf, u64::from(i) * 1024).unwrap();
            assert!(buf.iter().all(|&b| b == i));
        }
    }
}
