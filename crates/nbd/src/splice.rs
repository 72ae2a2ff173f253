//! Zero-copy READ replies: data file → pipe → socket with `splice(2)`, so the server
//! copies no data bytes (docs/design.md §12, "Zero-copy reads", which argues why this
//! is safe; read it before changing anything here).
//!
//! One reply is laid out as pieces (a header and/or a range of the export); each piece
//! is filled into the worker's pipe under [`Pool::read_with`] — i.e. while the block's
//! stripe is held shared, exactly when the copying path would `pread` — and the pipe is
//! drained into the socket under the connection's writer lock, outside the pool's
//! locks (a slow client never holds up writers, pauses or deletes). Structured and
//! extended replies send unmapped runs as `OFFSET_HOLE` chunks (no bytes at all).
//!
//! Anything unusual falls back to the copying path before a byte is sent: no pipe,
//! a pool without a zero-copy descriptor (read-only, block device, no hole punching),
//! a splice that moved less than asked. An error after part of a reply went out
//! closes the connection (the reply cannot be finished).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use thinvol_engine::Pool;

use crate::export::Export;
use crate::server::Stream;

use crate::proto::*;

/// Pipe size asked for (the unprivileged maximum, `/proc/sys/fs/pipe-max-size`).
const PIPE_BYTES: libc::c_int = 1 << 20;
/// Below this a pipe is not worth it (fall back to copying).
const MIN_PIPE_BYTES: usize = 256 << 10;
/// Reads shorter than this are copied: for small reads the copy is cheap and the
/// copying path needs fewer system calls.
pub const MIN_SPLICE_READ: u64 = 64 << 10;

/// Longest header a piece carries: an extended OFFSET_HOLE chunk (32 + 12 bytes).
const HDR_MAX: usize = 48;

static ZEROES: [u8; 64 << 10] = [0u8; 64 << 10];

fn page() -> u64 {
    // SAFETY: sysconf has no memory arguments.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// A worker's pipe and what is in it.
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    page: u64,
    /// Capacity in pipe buffers (one page each).
    slots: u64,
    /// Bytes in the pipe not yet sent, and an upper bound of the buffers they use.
    pending: u64,
    used: u64,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here only.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on our own descriptor, integer argument. Failure (a user over
        // the pipe page limit) leaves the default size, checked below.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
        // SAFETY: as above.
        let cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if cap < 0 || (cap as usize) < MIN_PIPE_BYTES {
            return Err(io::Error::other("pipe too small for zero-copy reads"));
        }
        let page = page();
        Ok(Pipe {
            r,
            w,
            page,
            slots: cap as u64 / page,
            pending: 0,
            used: 0,
        })
    }

    /// Largest data piece: its pages plus a header and partial pages at both ends.
    fn max_piece(&self) -> u64 {
        (self.slots - 8) * self.page
    }

    fn pages(&self, pos: u64, n: u64) -> u64 {
        (pos + n).div_ceil(self.page) - pos / self.page
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        // SAFETY: write from a valid slice to our pipe.
        let n = unsafe { libc::write(self.w.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != b.len() {
            return Err(io::Error::other("short write into the pipe"));
        }
        self.pending += b.len() as u64;
        self.used += (b.len() as u64).div_ceil(self.page) + 1;
        Ok(())
    }

    fn put_zeroes(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            let k = n.min(ZEROES.len() as u64);
            self.put(&ZEROES[..k as usize])?;
            n -= k;
        }
        Ok(())
    }

    /// Move `n` bytes at `pos` of `fd` into the pipe: page references, no copy.
    fn splice_in(&mut self, fd: RawFd, pos: u64, n: u64) -> io::Result<()> {
        self.used += self.pages(pos, n);
        let mut off = pos as libc::loff_t;
        let end = pos + n;
        while (off as u64) < end {
            let want = (end - off as u64) as usize;
            // SAFETY: splice between our descriptors; `off` is a valid loff_t.
            let k = unsafe {
                libc::splice(
                    fd,
                    &mut off,
                    self.w.as_raw_fd(),
                    std::ptr::null_mut(),
                    want,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if k < 0 {
                return Err(io::Error::last_os_error());
            }
            if k == 0 {
                return Err(io::Error::other("splice from the data file moved nothing"));
            }
            self.pending += k as u64;
        }
        Ok(())
    }

    /// Send everything in the pipe to `sock`.
    fn drain(&mut self, sock: RawFd, more: bool) -> io::Result<()> {
        while self.pending > 0 {
            let flags = libc::SPLICE_F_MOVE | if more { libc::SPLICE_F_MORE } else { 0 };
            // SAFETY: splice between our descriptors, no offsets.
            let k = unsafe {
                libc::splice(
                    self.r.as_raw_fd(),
                    std::ptr::null_mut(),
                    sock,
                    std::ptr::null_mut(),
                    self.pending as usize,
                    flags,
                )
            };
            if k < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if k == 0 {
                return Err(io::Error::other("socket closed"));
            }
            self.pending -= k as u64;
        }
        self.used = 0;
        Ok(())
    }
}

/// What [`read_reply`] did.
pub enum Outcome {
    /// The reply was sent (or the connection is broken and was shut down).
    Sent,
    /// Nothing was sent: answer with the copying path.
    Fallback,
    /// Nothing was sent: the pool answered with this NBD error.
    Error(u32),
}

/// One piece of a reply: a header, then (for `data`) `len` bytes of the export at
/// `off`, read from the pool (zeros where unmapped).
struct Piece {
    hdr: [u8; HDR_MAX],
    hdr_len: usize,
    off: u64,
    len: u64,
}

/// Per-worker scratch space (no allocation per request).
#[derive(Default)]
pub struct Scratch {
    runs: Vec<(bool, u64, u64)>,
    pieces: Vec<Piece>,
}

fn lock(w: &Mutex<Stream>) -> MutexGuard<'_, Stream> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

fn mark_broken(g: &MutexGuard<'_, Stream>, broken: &AtomicBool) {
    broken.store(true, Ordering::Relaxed);
    g.shutdown(Shutdown::Both);
}

/// Header of an OFFSET_DATA chunk for `len` bytes at `off`.
fn data_chunk(mode: ReplyMode, flags: u16, cookie: u64, off: u64, len: u64) -> Piece {
    let mut v = Vec::with_capacity(REPLY_HEADROOM);
    chunk_header(
        &mut v,
        mode == ReplyMode::Extended,
        flags,
        CHUNK_OFFSET_DATA,
        cookie,
        off,
        len + 8,
    );
    v.extend_from_slice(&off.to_be_bytes());
    piece(&v, off, len)
}

fn piece(h: &[u8], off: u64, len: u64) -> Piece {
    let mut hdr = [0u8; HDR_MAX];
    hdr[..h.len()].copy_from_slice(h);
    Piece {
        hdr,
        hdr_len: h.len(),
        off,
        len,
    }
}

/// Reply to READ `r` (already range-checked) of device `e_thin` with splice.
/// `with_pool` runs a closure on the pool under the export's slot lock.
/// `writer` is the connection's socket under its writer lock, `broken` its flag.
#[allow(clippy::too_many_arguments)]
pub fn read_reply(
    writer: &Mutex<Stream>,
    broken: &AtomicBool,
    pipe: &mut Option<Pipe>,
    scratch: &mut Scratch,
    mode: ReplyMode,
    r: &Request,
    export: &Export,
) -> Outcome {
    let thin = export.thin;
    let with_pool =
        |f: &mut dyn FnMut(&Pool) -> thinvol_engine::Result<()>| export.with_pool(|p| f(p));
    let Some(p) = pipe.as_mut() else {
        return Outcome::Fallback;
    };
    let Scratch { runs, pieces } = scratch;
    // Plan: runs of mapped (true) / unmapped ranges, in export offsets.
    runs.clear();
    let chunked = mode != ReplyMode::Simple && r.flags & CMD_FLAG_DF == 0;
    let mut usable = true;
    let planned = with_pool(&mut |pool: &Pool| {
        if pool.zero_copy_fd().is_none() {
            usable = false;
            return Ok(());
        }
        if !chunked {
            runs.push((true, r.offset, r.length));
            return Ok(());
        }
        let mut pos = r.offset;
        pool.read_with(thin, r.offset, r.length, |m, n| {
            let data = m.is_some();
            match runs.last_mut() {
                Some(last) if last.0 == data => last.2 += n,
                _ => runs.push((data, pos, n)),
            }
            pos += n;
            Ok(())
        })
    });
    if let Err(e) = planned {
        return Outcome::Error(e);
    }
    if !usable {
        return Outcome::Fallback;
    }
    // Pieces: headers and data ranges, each small enough for the pipe and split only
    // at block boundaries: each block is read under one hold of its stripe, so it is
    // all old or all new (a block larger than a pipe load falls back to copying).
    pieces.clear();
    let max = p.max_piece();
    let bs = export.slot.block_size.max(1);
    let split = |o: u64, end: u64| -> Option<u64> {
        if end - o <= max {
            return Some(end);
        }
        let e = (o + max) / bs * bs;
        (e > o).then_some(e)
    };
    let nruns = runs.len();
    for (i, &(data, off, len)) in runs.iter().enumerate() {
        let last_run = i + 1 == nruns;
        if !chunked {
            let mut h = [0u8; REPLY_HEADROOM];
            let s = put_data_header(&mut h, mode, r.cookie, r.offset, r.length);
            let mut o = off;
            let mut first = true;
            while o < off + len {
                let Some(e) = split(o, off + len) else {
                    return Outcome::Fallback;
                };
                let n = e - o;
                let hp = if first { &h[s..] } else { &[][..] };
                pieces.push(piece(hp, o, n));
                first = false;
                o += n;
            }
        } else if !data {
            let mut v = Vec::with_capacity(32);
            let flags = if last_run { REPLY_FLAG_DONE } else { 0 };
            chunk_header(
                &mut v,
                mode == ReplyMode::Extended,
                flags,
                CHUNK_OFFSET_HOLE,
                r.cookie,
                off,
                12,
            );
            v.extend_from_slice(&off.to_be_bytes());
            v.extend_from_slice(&(len as u32).to_be_bytes());
            pieces.push(piece(&v, off, 0));
        } else {
            let mut o = off;
            while o < off + len {
                let Some(e) = split(o, off + len) else {
                    return Outcome::Fallback;
                };
                let n = e - o;
                let done = last_run && o + n == off + len;
                let flags = if done { REPLY_FLAG_DONE } else { 0 };
                pieces.push(data_chunk(mode, flags, r.cookie, o, n));
                o += n;
            }
        }
    }
    // Fill and send.
    let mut guard: Option<MutexGuard<'_, Stream>> = None;
    let mut sent = false;
    for pc in pieces.iter() {
        let need = 2 + pc.hdr_len as u64 / p.page + p.pages(pc.off, pc.len) + 2;
        if p.used + need > p.slots {
            let g = guard.get_or_insert_with(|| lock(writer));
            if p.drain(g.as_raw_fd(), true).is_err() {
                mark_broken(g, broken);
                *pipe = None;
                return Outcome::Sent;
            }
            sent = true;
        }
        let mut failed: Option<io::Error> = None;
        let mut r2 = Ok(());
        if pc.hdr_len > 0 {
            if let Err(e) = p.put(&pc.hdr[..pc.hdr_len]) {
                failed = Some(e);
            }
        }
        if failed.is_none() && pc.len > 0 {
            r2 = with_pool(&mut |pool: &Pool| {
                let Some(fd) = pool.zero_copy_fd() else {
                    failed = Some(io::Error::other("zero-copy no longer possible"));
                    return Ok(());
                };
                pool.read_with(thin, pc.off, pc.len, |m, n| {
                    let res = match m {
                        Some(pos) => p.splice_in(fd, pos, n),
                        None => p.put_zeroes(n),
                    };
                    if let Err(e) = &res {
                        failed = Some(io::Error::new(e.kind(), e.to_string()));
                    }
                    res
                })
            });
        }
        if failed.is_some() || r2.is_err() {
            if sent {
                // Part of the reply is out: it cannot be finished.
                let g = guard.get_or_insert_with(|| lock(writer));
                mark_broken(g, broken);
                *pipe = None;
                return Outcome::Sent;
            }
            // Nothing sent: drop the pipe (it holds a partial reply) and answer
            // another way.
            *pipe = None;
            return match (failed, r2) {
                (Some(_), _) => Outcome::Fallback,
                (None, Err(e)) => Outcome::Error(e),
                (None, Ok(())) => Outcome::Fallback,
            };
        }
    }
    let g = guard.get_or_insert_with(|| lock(writer));
    if p.drain(g.as_raw_fd(), false).is_err() {
        mark_broken(g, broken);
        *pipe = None;
    }
    Outcome::Sent
}
