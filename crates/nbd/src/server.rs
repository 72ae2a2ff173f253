//! Listener, handshake and transmission.
//!
//! Per connection: the connection's thread does the handshake, then reads requests
//! (and WRITE payloads) and hands them to a few worker threads through a bounded
//! channel; workers run them on the pool and write each reply whole under the
//! connection's writer lock, so replies go out in completion order (pipelined, out of
//! order). READs of 64 KiB or more are sent by `splice` (`splice.rs`; why that is safe:
//! docs/design.md §12, "Zero-copy reads"). A protocol violation closes that connection
//! only.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::block_status;
use crate::export::Export;
use crate::info;
use crate::proto::*;
use crate::splice::{self, Outcome, Pipe, Scratch};

/// Server limits and sizes.
#[derive(Clone, Debug)]
pub struct Config {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Worker threads per connection (requests in flight beyond them wait queued).
    pub workers: usize,
    /// Requests read ahead of the workers per connection.
    pub queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            workers: 2,
            queue: 64,
        }
    }
}

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A client connection of either kind.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(d),
            Stream::Tcp(s) => s.set_read_timeout(d),
        }
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(d),
            Stream::Tcp(s) => s.set_write_timeout(d),
        }
    }
    pub(crate) fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// Wait until `fd` is readable or `ms` passed. True if readable.
pub(crate) fn poll_readable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

fn set_buffers(fd: RawFd) {
    let sz: libc::c_int = 4 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a valid int option on an open socket.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &sz as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// The server: exports, limits, live connections.
pub struct Server {
    exports: Vec<Arc<Export>>,
    cfg: Config,
    shutdown: AtomicBool,
    active: AtomicUsize,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Stream>>,
}

/// What the handshake agreed.
struct Agreed {
    export: Arc<Export>,
    mode: ReplyMode,
    meta: bool,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Server {
    pub fn new(exports: Vec<Arc<Export>>, cfg: Config) -> Arc<Server> {
        Arc::new(Server {
            exports,
            cfg,
            shutdown: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
        })
    }

    pub fn exports(&self) -> &[Arc<Export>] {
        &self.exports
    }

    /// Stop accepting; connections stop reading, finish in-flight requests, close.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().values() {
            s.shutdown(Shutdown::Read);
        }
    }

    pub fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Accept until [`Server::stop`] (or `stop_flag`, polled), then wait for every
    /// connection to finish.
    pub fn run(self: &Arc<Self>, listener: &Listener, stop_flag: &AtomicBool) {
        let mut threads = Vec::new();
        while !self.stopping() {
            if stop_flag.load(Ordering::SeqCst) {
                self.stop();
                break;
            }
            if !poll_readable(listener.as_raw_fd(), 200) {
                continue;
            }
            let s = match listener {
                Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
            };
            let s = match s {
                Ok(s) => s,
                Err(e) => {
                    info!("accept failed: {e}");
                    continue;
                }
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if self.active.load(Ordering::SeqCst) >= self.cfg.max_connections {
                info!(
                    "client {id}: refused, {} connections open (--max-connections)",
                    self.cfg.max_connections
                );
                continue;
            }
            self.active.fetch_add(1, Ordering::SeqCst);
            if let Ok(c) = s.try_clone() {
                self.conns.lock().unwrap().insert(id, c);
            }
            let me = self.clone();
            threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
            let t = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    match me.serve_conn(s, id) {
                        Ok(()) => info!("client {id}: closed"),
                        Err(e) => info!("client {id}: disconnected: {e}"),
                    }
                    me.conns.lock().unwrap().remove(&id);
                    me.active.fetch_sub(1, Ordering::SeqCst);
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    info!("client {id}: cannot start a thread: {e}");
                    self.conns.lock().unwrap().remove(&id);
                    self.active.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        for t in threads {
            let _ = t.join();
        }
    }

    fn serve_conn(&self, mut s: Stream, id: u64) -> io::Result<()> {
        if let Stream::Tcp(t) = &s {
            set_buffers(t.as_raw_fd());
        }
        if let Stream::Unix(u) = &s {
            set_buffers(u.as_raw_fd());
        }
        let deadline = Instant::now() + self.cfg.handshake_timeout;
        s.set_write_timeout(Some(self.cfg.handshake_timeout))?;
        let Some(agreed) = self.handshake(&mut s, deadline)? else {
            return Ok(());
        };
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        info!(
            "client {id}: serving {} ({}{})",
            agreed.export.name,
            match agreed.mode {
                ReplyMode::Simple => "simple replies",
                ReplyMode::Structured => "structured replies",
                ReplyMode::Extended => "extended headers",
            },
            if agreed.export.read_only {
                ", read-only"
            } else {
                ""
            }
        );
        self.transmission(s, agreed, id)
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() && self.exports.len() == 1 {
            return Some(self.exports[0].clone());
        }
        self.exports.iter().find(|e| e.name == name).cloned()
    }

    fn tflags(e: &Export, mode: ReplyMode) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
        if e.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        if mode != ReplyMode::Simple {
            f |= TF_SEND_DF;
        }
        f
    }

    /// Fixed newstyle negotiation. `Ok(None)`: the client aborted.
    fn handshake(&self, s: &mut Stream, deadline: Instant) -> io::Result<Option<Agreed>> {
        let read_by = |s: &mut Stream, b: &mut [u8]| -> io::Result<()> {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake deadline passed",
                ));
            }
            s.set_read_timeout(Some(left))?;
            s.read_exact(b).map_err(|e| {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed")
                } else {
                    e
                }
            })
        };
        s.write_all(&server_greeting())?;
        let mut f = [0u8; 4];
        read_by(s, &mut f)?;
        let no_zeroes =
            parse_client_flags(u32::from_be_bytes(f)).map_err(|e| bad(e.to_string()))?;
        let mut sr = false;
        let mut eh = false;
        // (export name, base:allocation selected) from SET_META_CONTEXT.
        let mut meta: Option<(String, bool)> = None;
        let mut out = Vec::with_capacity(256);
        loop {
            let mut h = [0u8; 16];
            read_by(s, &mut h)?;
            let (opt, len) = parse_option_header(&h).map_err(|e| bad(e.to_string()))?;
            let mut data = vec![0u8; len as usize];
            read_by(s, &mut data)?;
            out.clear();
            if self.stopping() && opt != OPT_ABORT {
                opt_reply(&mut out, opt, REP_ERR_SHUTDOWN, b"server shutting down");
                s.write_all(&out)?;
                continue;
            }
            match opt {
                OPT_EXPORT_NAME => {
                    if eh {
                        return Err(bad("EXPORT_NAME after extended headers"));
                    }
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(e) = self.find(&name) else {
                        return Err(bad(format!("no export '{name}'")));
                    };
                    let mode = if sr {
                        ReplyMode::Structured
                    } else {
                        ReplyMode::Simple
                    };
                    out.extend_from_slice(&e.size.to_be_bytes());
                    out.extend_from_slice(&Self::tflags(&e, mode).to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&out)?;
                    let meta_on = matches!(&meta, Some((n, true)) if *n == name);
                    return Ok(Some(Agreed {
                        export: e,
                        mode,
                        meta: meta_on,
                    }));
                }
                OPT_ABORT => {
                    opt_reply(&mut out, opt, REP_ACK, &[]);
                    let _ = s.write_all(&out);
                    return Ok(None);
                }
                OPT_LIST => {
                    if len != 0 {
                        opt_reply(&mut out, opt, REP_ERR_INVALID, b"LIST takes no data");
                    } else {
                        for e in &self.exports {
                            opt_reply(&mut out, opt, REP_SERVER, &server_entry(&e.name));
                        }
                        opt_reply(&mut out, opt, REP_ACK, &[]);
                    }
                }
                OPT_INFO | OPT_GO => match parse_info(&data) {
                    Err(e) => opt_reply(&mut out, opt, REP_ERR_INVALID, e.to_string().as_bytes()),
                    Ok((name, reqs)) => match self.find(&name) {
                        None => opt_reply(
                            &mut out,
                            opt,
                            REP_ERR_UNKNOWN,
                            format!("no export '{name}'").as_bytes(),
                        ),
                        Some(e) => {
                            let mode = if eh {
                                ReplyMode::Extended
                            } else if sr {
                                ReplyMode::Structured
                            } else {
                                ReplyMode::Simple
                            };
                            if reqs.contains(&INFO_NAME) {
                                opt_reply(&mut out, opt, REP_INFO, &info_name(&e.name));
                            }
                            let bs = e.slot.block_size.clamp(512, MAX_PAYLOAD as u64) as u32;
                            opt_reply(
                                &mut out,
                                opt,
                                REP_INFO,
                                &info_block_size(1, bs, MAX_PAYLOAD),
                            );
                            opt_reply(
                                &mut out,
                                opt,
                                REP_INFO,
                                &info_export(e.size, Self::tflags(&e, mode)),
                            );
                            opt_reply(&mut out, opt, REP_ACK, &[]);
                            if opt == OPT_GO {
                                s.write_all(&out)?;
                                let meta_on = matches!(&meta, Some((n, true)) if *n == name);
                                return Ok(Some(Agreed {
                                    export: e,
                                    mode,
                                    meta: meta_on,
                                }));
                            }
                        }
                    },
                },
                OPT_STRUCTURED_REPLY => {
                    if len != 0 {
                        opt_reply(
                            &mut out,
                            opt,
                            REP_ERR_INVALID,
                            b"STRUCTURED_REPLY takes no data",
                        );
                    } else if eh {
                        opt_reply(
                            &mut out,
                            opt,
                            REP_ERR_EXT_HEADER_REQD,
                            b"extended headers already negotiated",
                        );
                    } else {
                        sr = true;
                        opt_reply(&mut out, opt, REP_ACK, &[]);
                    }
                }
                OPT_EXTENDED_HEADERS => {
                    if len != 0 {
                        opt_reply(
                            &mut out,
                            opt,
                            REP_ERR_INVALID,
                            b"EXTENDED_HEADERS takes no data",
                        );
                    } else {
                        eh = true;
                        opt_reply(&mut out, opt, REP_ACK, &[]);
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let list = opt == OPT_LIST_META_CONTEXT;
                    if !list {
                        meta = None;
                    }
                    if !(sr || eh) {
                        opt_reply(
                            &mut out,
                            opt,
                            REP_ERR_INVALID,
                            b"structured replies not negotiated",
                        );
                    } else {
                        match parse_meta_context(&data) {
                            Err(e) => {
                                opt_reply(&mut out, opt, REP_ERR_INVALID, e.to_string().as_bytes())
                            }
                            Ok((name, qs)) => {
                                if self.find(&name).is_none() {
                                    opt_reply(
                                        &mut out,
                                        opt,
                                        REP_ERR_UNKNOWN,
                                        format!("no export '{name}'").as_bytes(),
                                    );
                                } else {
                                    let hit = matches_base_allocation(&qs, list);
                                    if hit {
                                        let id = if list { 0 } else { BASE_ALLOCATION_ID };
                                        opt_reply(
                                            &mut out,
                                            opt,
                                            REP_META_CONTEXT,
                                            &meta_context_entry(id, BASE_ALLOCATION),
                                        );
                                    }
                                    if !list {
                                        meta = Some((name, hit));
                                    }
                                    opt_reply(&mut out, opt, REP_ACK, &[]);
                                }
                            }
                        }
                    }
                }
                OPT_STARTTLS => opt_reply(&mut out, opt, REP_ERR_POLICY, b"TLS is not supported"),
                _ => opt_reply(&mut out, opt, REP_ERR_UNSUP, b"unknown option"),
            }
            s.write_all(&out)?;
        }
    }

    fn transmission(&self, mut s: Stream, a: Agreed, id: u64) -> io::Result<()> {
        let conn = Conn {
            writer: Mutex::new(s.try_clone()?),
            export: a.export,
            mode: a.mode,
            meta: a.meta,
            bufs: Mutex::new(Bufs::default()),
            inflight: Mutex::new(0),
            drained: Condvar::new(),
            broken: AtomicBool::new(false),
            spliced: AtomicU64::new(0),
            copied: AtomicU64::new(0),
        };
        let ext = a.mode == ReplyMode::Extended;
        let hlen = if ext { EXT_REQUEST_LEN } else { REQUEST_LEN };
        let (tx, rx) = sync_channel::<Job>(self.cfg.queue.max(1));
        let rx = Mutex::new(rx);
        std::thread::scope(|sc| {
            for _ in 0..self.cfg.workers.max(1) {
                sc.spawn(|| worker(&conn, &rx));
            }
            let r = (|| -> io::Result<()> {
                let mut h = [0u8; EXT_REQUEST_LEN];
                loop {
                    match s.read_exact(&mut h[..hlen]) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                        Err(e) => return Err(e),
                    }
                    let req = parse_request(&h[..hlen], ext).map_err(|e| bad(e.to_string()))?;
                    if req.payload > MAX_PAYLOAD as u64 {
                        return Err(bad(format!(
                            "payload of {} bytes exceeds the maximum",
                            req.payload
                        )));
                    }
                    if req.typ == CMD_DISC {
                        return Ok(());
                    }
                    let mut buf = conn.take_buf();
                    if req.payload > 0 {
                        conn.admit(req.payload);
                        let n = req.payload as usize;
                        if buf.len() < n {
                            buf.resize(n, 0);
                        }
                        s.read_exact(&mut buf[..n])?;
                    }
                    if conn.broken.load(Ordering::Relaxed) {
                        return Err(bad("reply could not be sent"));
                    }
                    if tx.send(Job { req, buf }).is_err() {
                        return Ok(());
                    }
                }
            })();
            drop(tx);
            r
        })?;
        let (sp, cp) = (
            conn.spliced.load(Ordering::Relaxed),
            conn.copied.load(Ordering::Relaxed),
        );
        if sp + cp > 0 {
            info!("client {id}: {sp} reads sent zero-copy, {cp} copied");
        }
        Ok(())
    }
}

struct Job {
    req: Request,
    buf: Vec<u8>,
}

struct Conn {
    writer: Mutex<Stream>,
    export: Arc<Export>,
    mode: ReplyMode,
    meta: bool,
    bufs: Mutex<Bufs>,
    /// WRITE payload bytes read but not yet written to the pool.
    inflight: Mutex<u64>,
    drained: Condvar,
    broken: AtomicBool,
    /// READ replies sent by splice / by copying (logged when the connection ends).
    spliced: AtomicU64,
    copied: AtomicU64,
}

/// Buffers kept per connection for reuse (no allocation per request), at most
/// [`KEEP_BYTES`] of them.
#[derive(Default)]
struct Bufs {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

const KEEP_BYTES: usize = 64 << 20;
/// WRITE payload bytes a connection may have queued; the reader waits above it (a
/// single payload up to the 32 MiB maximum is always admitted when nothing is queued).
const INFLIGHT_BYTES: u64 = 64 << 20;

impl Conn {
    fn take_buf(&self) -> Vec<u8> {
        let mut g = self.bufs.lock().unwrap();
        match g.free.pop() {
            Some(b) => {
                g.bytes -= b.capacity();
                b
            }
            None => Vec::new(),
        }
    }
    fn give_buf(&self, b: Vec<u8>) {
        let mut g = self.bufs.lock().unwrap();
        if g.bytes + b.capacity() <= KEEP_BYTES {
            g.bytes += b.capacity();
            g.free.push(b);
        }
    }
    /// Wait until `n` more payload bytes fit the connection's budget, then take them.
    fn admit(&self, n: u64) {
        let mut g = self.inflight.lock().unwrap();
        while *g > 0 && *g + n > INFLIGHT_BYTES {
            g = self.drained.wait(g).unwrap();
        }
        *g += n;
    }
    fn release(&self, n: u64) {
        if n > 0 {
            *self.inflight.lock().unwrap() -= n;
            self.drained.notify_all();
        }
    }
    fn send(&self, b: &[u8]) {
        let mut w = self.writer.lock().unwrap();
        if w.write_all(b).is_err() {
            self.broken.store(true, Ordering::Relaxed);
            w.shutdown(Shutdown::Both);
        }
    }
    fn status(&self, out: &mut Vec<u8>, r: &Request, err: u32) {
        out.clear();
        let chunked = r.typ == CMD_READ || r.typ == CMD_BLOCK_STATUS;
        status_reply(out, self.mode, chunked, r.cookie, r.offset, err);
        self.send(out);
    }
}

/// A worker's zero-copy state: its pipe (made on its first large read) and scratch.
#[derive(Default)]
struct ZeroCopy {
    pipe: Option<Pipe>,
    /// No pipe could be made: this worker copies.
    off: bool,
    scratch: Scratch,
}

fn worker(c: &Conn, rx: &Mutex<Receiver<Job>>) {
    let mut out = Vec::with_capacity(256);
    let mut zc = ZeroCopy::default();
    loop {
        let job = match rx.lock().unwrap().recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let Job { req, buf } = job;
        let buf = run(c, &req, buf, &mut out, &mut zc);
        c.release(req.payload);
        c.give_buf(buf);
    }
}

/// Check a request's range against the export: READ-like commands past the end are
/// EINVAL, writes past the end ENOSPC.
fn range_error(r: &Request, size: u64, write: bool) -> Option<u32> {
    match r.offset.checked_add(r.length) {
        Some(end) if end <= size => None,
        _ if write => Some(ENOSPC),
        _ => Some(EINVAL),
    }
}

static ZEROES: [u8; 64 << 10] = [0u8; 64 << 10];

/// A READ by splice (`splice.rs`; safety: docs/design.md §12, "Zero-copy reads").
/// `None`: not attempted or nothing was sent — use the copying path. `Some(Ok)`: the
/// reply is sent (a failure after part of it closed the connection). `Some(Err)`:
/// nothing was sent, reply with this error.
fn read_zero_copy(c: &Conn, r: &Request, zc: &mut ZeroCopy) -> Option<Result<(), u32>> {
    let e = &*c.export;
    if r.length < splice::MIN_SPLICE_READ || e.slot.read_only || zc.off {
        return None;
    }
    if zc.pipe.is_none() {
        match Pipe::new() {
            Ok(p) => zc.pipe = Some(p),
            Err(err) => {
                info!("zero-copy reads off for a worker: {err}");
                zc.off = true;
                return None;
            }
        }
    }
    match splice::read_reply(
        &c.writer,
        &c.broken,
        &mut zc.pipe,
        &mut zc.scratch,
        c.mode,
        r,
        e,
    ) {
        Outcome::Sent => {
            c.spliced.fetch_add(1, Ordering::Relaxed);
            Some(Ok(()))
        }
        Outcome::Fallback => None,
        Outcome::Error(err) => Some(Err(err)),
    }
}

/// Run one request and send its reply. Returns the buffer for reuse.
fn run(c: &Conn, r: &Request, mut buf: Vec<u8>, out: &mut Vec<u8>, zc: &mut ZeroCopy) -> Vec<u8> {
    let e = &*c.export;
    let fua = r.flags & CMD_FLAG_FUA != 0;
    if r.flags & !CMD_FLAGS_KNOWN != 0 {
        c.status(out, r, EINVAL);
        return buf;
    }
    // An unexpected payload (extended PAYLOAD_LEN on a non-write) was read: EINVAL.
    if r.payload > 0 && r.typ != CMD_WRITE {
        c.status(out, r, EINVAL);
        return buf;
    }
    let writes = matches!(r.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && e.read_only {
        c.status(out, r, EPERM);
        return buf;
    }
    let res: Result<(), u32> = match r.typ {
        CMD_READ => {
            if let Some(err) = range_error(r, e.size, false) {
                Err(err)
            } else if r.length > MAX_PAYLOAD as u64 {
                Err(EINVAL)
            } else if let Some(res) = read_zero_copy(c, r, zc) {
                match res {
                    Ok(()) => return buf,
                    Err(err) => Err(err),
                }
            } else {
                c.copied.fetch_add(1, Ordering::Relaxed);
                let n = r.length as usize;
                let need = REPLY_HEADROOM + n;
                if buf.len() < need {
                    buf.resize(need, 0);
                }
                match e.with_pool(|p| p.read(e.thin, r.offset, &mut buf[REPLY_HEADROOM..need])) {
                    Ok(()) => {
                        let mut hdr = [0u8; REPLY_HEADROOM];
                        let start = put_data_header(&mut hdr, c.mode, r.cookie, r.offset, r.length);
                        buf[start..REPLY_HEADROOM].copy_from_slice(&hdr[start..]);
                        c.send(&buf[start..need]);
                        return buf;
                    }
                    Err(err) => Err(err),
                }
            }
        }
        CMD_WRITE => match range_error(r, e.size, true) {
            Some(err) => Err(err),
            None => e.with_pool(|p| {
                p.write(e.thin, r.offset, &buf[..r.length as usize])?;
                if fua {
                    p.flush()?;
                }
                Ok(())
            }),
        },
        CMD_FLUSH => e.with_pool(|p| p.flush()),
        CMD_TRIM => match range_error(r, e.size, false) {
            Some(err) => Err(err),
            None => e.with_pool(|p| {
                p.discard(e.thin, r.offset, r.length)?;
                if fua {
                    p.flush()?;
                }
                Ok(())
            }),
        },
        CMD_WRITE_ZEROES => match range_error(r, e.size, true) {
            Some(err) => Err(err),
            None if r.flags & CMD_FLAG_NO_HOLE != 0 && r.flags & CMD_FLAG_FAST_ZERO != 0 => {
                Err(ENOTSUP)
            }
            None => e.with_pool(|p| {
                if r.flags & CMD_FLAG_NO_HOLE != 0 {
                    // Must end up allocated: write real zeros.
                    let mut pos = r.offset;
                    let end = r.offset + r.length;
                    while pos < end {
                        let n = (end - pos).min(ZEROES.len() as u64);
                        p.write(e.thin, pos, &ZEROES[..n as usize])?;
                        pos += n;
                    }
                } else {
                    p.write_zeroes(e.thin, r.offset, r.length)?;
                }
                if fua {
                    p.flush()?;
                }
                Ok(())
            }),
        },
        CMD_CACHE => match range_error(r, e.size, false) {
            Some(err) => Err(err),
            None => Ok(()),
        },
        CMD_BLOCK_STATUS => {
            if !c.meta || r.length == 0 || range_error(r, e.size, false).is_some() {
                Err(EINVAL)
            } else {
                match e.with_pool(|p| {
                    block_status::extents(
                        p,
                        e.thin,
                        e.size,
                        r.offset,
                        r.length,
                        r.flags & CMD_FLAG_REQ_ONE != 0,
                    )
                }) {
                    Ok(ext) => {
                        out.clear();
                        block_status_reply(
                            out,
                            c.mode == ReplyMode::Extended,
                            r.cookie,
                            r.offset,
                            BASE_ALLOCATION_ID,
                            &ext,
                        );
                        c.send(out);
                        return buf;
                    }
                    Err(err) => Err(err),
                }
            }
        }
        _ => Err(EINVAL),
    };
    c.status(out, r, res.err().unwrap_or(0));
    buf
}
