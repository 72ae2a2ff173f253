//! Zero-copy reads (docs/design.md §12, "Zero-copy reads"): page-cache pages of the
//! data file that a reader spliced into a pipe (as the NBD server does for READ
//! replies) keep the bytes they had when a data block is freed and reused by another
//! device — whether the block was punched after the commit that freed it (the normal
//! case) or that punch never happened (failed, or the process died first): then the
//! write that reuses the block punches it first. Real kernel pipes and page cache, no
//! mocks: without the punch before reuse, the pipe would show the new device's bytes.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use thinvol_engine::format::ThinId;
use thinvol_engine::{Pool, PoolConfig};

const BS: u64 = 65536;

/// A pool with exactly one data block: every new mapping reuses it.
fn pool(dir: &std::path::Path) -> Pool {
    Pool::create(
        &dir.join("pool"),
        &PoolConfig {
            data_size: BS,
            commit_interval: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A pipe holding `BS` bytes spliced from `fd` at `pos` (page references).
fn splice_into_pipe(fd: i32, pos: u64) -> OwnedFd {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors, owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our pipe.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    let mut off = pos as libc::loff_t;
    let mut done = 0u64;
    while done < BS {
        // SAFETY: splice between valid descriptors.
        let n = unsafe {
            libc::splice(
                fd,
                &mut off,
                w.as_raw_fd(),
                std::ptr::null_mut(),
                (BS - done) as usize,
                libc::SPLICE_F_MOVE,
            )
        };
        assert!(n > 0, "splice: {}", std::io::Error::last_os_error());
        done += n as u64;
    }
    r
}

fn drain(r: OwnedFd) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    let mut done = 0;
    while done < b.len() {
        // SAFETY: read into our buffer.
        let n = unsafe { libc::read(r.as_raw_fd(), b[done..].as_mut_ptr().cast(), b.len() - done) };
        assert!(n > 0);
        done += n as usize;
    }
    b
}

fn data_block(p: &Pool, id: u64) -> u64 {
    let m = p.mappings(ThinId(id)).unwrap();
    assert_eq!(m.len(), 1);
    m[0].1 .0
}

#[test]
fn spliced_pages_keep_their_bytes_when_the_block_is_freed_and_reused() {
    let t = tempfile::tempdir().unwrap();
    let p = pool(t.path());
    let fd = p
        .zero_copy_fd()
        .expect("a writable pool file on ext4/tmpfs allows zero-copy reads");
    p.create_thin(ThinId(1)).unwrap();
    p.create_thin(ThinId(2)).unwrap();
    p.write(ThinId(1), 0, &[0xAA; BS as usize]).unwrap();
    p.commit().unwrap();
    let d = data_block(&p, 1);
    // A reader of device 1 spliced the block (still held by "the socket").
    let mut pipe = None;
    p.read_with(ThinId(1), 0, BS, |pos, n| {
        assert_eq!((pos, n), (Some(d * BS), BS));
        pipe = Some(splice_into_pipe(fd, d * BS));
        Ok(())
    })
    .unwrap();
    // Device 1 lets the block go; the commit frees (and punches) it; device 2 gets it.
    p.discard(ThinId(1), 0, BS).unwrap();
    p.commit().unwrap();
    p.write(ThinId(2), 0, &[0xBB; BS as usize]).unwrap();
    assert_eq!(data_block(&p, 2), d, "the only data block is reused");
    let got = drain(pipe.unwrap());
    assert!(
        got.iter().all(|&x| x == 0xAA),
        "a reply of device 1 shows device 2's bytes"
    );
}

#[test]
fn a_reused_block_that_was_never_punched_is_punched_before_the_write() {
    for partial in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let p = pool(t.path());
        let fd = p.zero_copy_fd().unwrap();
        p.create_thin(ThinId(1)).unwrap();
        p.create_thin(ThinId(2)).unwrap();
        p.write(ThinId(1), 0, &[0xAA; BS as usize]).unwrap();
        p.commit().unwrap();
        let d = data_block(&p, 1);
        p.discard(ThinId(1), 0, BS).unwrap();
        p.commit().unwrap();
        // As if the punch after that commit had failed (or the server died before
        // it): the free block still holds device 1's bytes in the page cache, and a
        // reply still references those pages.
        let f = OpenOptions::new()
            .write(true)
            .open(t.path().join("pool").join(thinvol_engine::DATA_FILE))
            .unwrap();
        f.write_all_at(&[0xAA; BS as usize], d * BS).unwrap();
        let pipe = splice_into_pipe(fd, d * BS);
        // Device 2 provisions the block: whole, or 4 KiB of it (rest reads as zeros).
        let (off, len) = if partial { (8192, 4096) } else { (0, BS) };
        p.write(ThinId(2), off, &vec![0xBB; len as usize]).unwrap();
        assert_eq!(data_block(&p, 2), d);
        let got = drain(pipe);
        assert!(
            got.iter().all(|&x| x == 0xAA),
            "partial={partial}: the write went into pages a reply still references"
        );
        let mut b = vec![0u8; BS as usize];
        p.read(ThinId(2), 0, &mut b).unwrap();
        for (i, &x) in b.iter().enumerate() {
            let want = if (off..off + len).contains(&(i as u64)) {
                0xBB
            } else {
                0
            };
            assert_eq!(x, want, "partial={partial}: device 2 byte {i}");
        }
    }
}
