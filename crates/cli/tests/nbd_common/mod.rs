//! Shared by the NBD tests: a state directory with a pool, `thinvol serve` as a child
//! process (waits for its ready line, SIGTERM on drop), and a minimal NBD client over a
//! unix socket (fixed newstyle, GO, simple replies) for tests that need exact control.

#![allow(dead_code)]
// NBD is big-endian on the wire.
#![allow(clippy::big_endian_bytes)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thinvol_nbd::proto::*;

pub const MIB: u64 = 1 << 20;

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[path = "../cli_env/mod.rs"]
mod cli_env;
pub use cli_env::Env;

impl Env {
    /// A pool `tank` (64 KiB blocks) of `size`.
    pub fn pool(&self, size: &str) {
        self.ok(&[
            "pool",
            "create",
            "tank",
            "--dir",
            &self.p("tank"),
            "--size",
            size,
        ]);
    }

    pub fn sock(&self) -> String {
        self.p("nbd.sock")
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock())
    }

    /// Start `thinvol serve NAMES --socket` and wait until it is ready.
    pub fn serve(&self, names: &[&str], extra: &[&str]) -> Server {
        let mut c = self.cmd();
        c.arg("serve")
            .args(names)
            .args(["--socket", &self.sock()])
            .args(extra);
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
                if line.contains("ready:") {
                    let _ = tx.send(());
                }
                l2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("server not ready: {}", log.lock().unwrap());
        }
        Server {
            child: Some(child),
            log,
        }
    }
}

pub struct Server {
    pub child: Option<Child>,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.success();
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn tool(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---- a minimal client ----

pub struct Client {
    pub s: UnixStream,
    pub size: u64,
    pub tflags: u16,
    cookie: u64,
}

pub fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

pub fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub fn option(s: &mut UnixStream, opt: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Read one option reply: (option, type, data).
pub fn read_opt_reply(s: &mut UnixStream) -> std::io::Result<(u32, u32, Vec<u8>)> {
    assert_eq!(read_u64(s)?, OPT_REPLY_MAGIC);
    let opt = read_u32(s)?;
    let typ = read_u32(s)?;
    let len = read_u32(s)?;
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d)?;
    Ok((opt, typ, d))
}

/// Connect and read the greeting; send the client flags.
pub fn greet(path: &Path) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())?;
    Ok(s)
}

impl Client {
    /// Handshake with GO on `name`; simple replies.
    pub fn connect(path: &Path, name: &str) -> std::io::Result<Client> {
        let mut s = greet(path)?;
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        option(&mut s, OPT_GO, &d)?;
        let (mut size, mut tflags) = (0, 0);
        loop {
            let (_, typ, data) = read_opt_reply(&mut s)?;
            match typ {
                REP_ACK => break,
                REP_INFO if data.len() == 12 && data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    tflags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                t => {
                    return Err(std::io::Error::other(format!("GO failed: {t:#x}")));
                }
            }
        }
        Ok(Client {
            s,
            size,
            tflags,
            cookie: 1,
        })
    }

    pub fn send(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<u64> {
        let c = self.cookie;
        self.cookie += 1;
        let r = Request {
            flags,
            typ,
            cookie: c,
            offset,
            length: len as u64,
            payload: 0,
        };
        let mut b = encode_request(&r, false);
        b.extend_from_slice(payload);
        self.s.write_all(&b)?;
        Ok(c)
    }

    /// Read one simple reply: (cookie, error); `data` is filled for READ replies.
    pub fn reply(&mut self, data: Option<&mut [u8]>) -> std::io::Result<(u64, u32)> {
        assert_eq!(read_u32(&mut self.s)?, SIMPLE_REPLY_MAGIC);
        let err = read_u32(&mut self.s)?;
        let cookie = read_u64(&mut self.s)?;
        if err == 0 {
            if let Some(d) = data {
                self.s.read_exact(d)?;
            }
        }
        Ok((cookie, err))
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> std::io::Result<u32> {
        self.send(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        Ok(self.reply(None)?.1)
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<u32> {
        self.send(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        Ok(self.reply(Some(buf))?.1)
    }

    pub fn flush(&mut self) -> std::io::Result<u32> {
        self.send(CMD_FLUSH, 0, 0, 0, &[])?;
        Ok(self.reply(None)?.1)
    }

    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0, &[]);
    }
}
