//! A thread that maintains a running LtHash while the caller streams, so hashing (and,
//! on the receiver, reading the base's old contents) overlaps with the stream I/O on a
//! second core. Jobs are applied in order; `get` waits for every job before it.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use thinvol_engine::format::ThinId;
use thinvol_engine::Pool;

use crate::digest::LtHash;
use crate::error::{Result, StreamError};

enum Job {
    /// Add (or subtract) the chunks of `data` at volume offset `off`.
    Bytes {
        off: u64,
        data: Arc<Vec<u8>>,
        size: u64,
        sub: bool,
    },
    /// Subtract the contents of `[off, off+len)` of thin device `thin`.
    SubDevice {
        off: u64,
        len: u64,
        thin: u64,
        size: u64,
    },
    Set(LtHash),
    Get(SyncSender<Result<LtHash>>),
}

pub struct DigestWorker {
    tx: Option<SyncSender<Job>>,
    handle: Option<JoinHandle<()>>,
}

fn run(rx: Receiver<Job>, pool: Option<Pool>) {
    let mut d = LtHash::default();
    let mut err: Option<String> = None;
    let mut buf = Vec::new();
    for job in rx {
        match job {
            Job::Bytes {
                off,
                data,
                size,
                sub,
            } => d.apply_range(off, &data, size, sub),
            Job::SubDevice {
                off,
                len,
                thin,
                size,
            } => {
                let Some(pool) = &pool else { continue };
                let end = off + len;
                let mut pos = off;
                while pos < end && err.is_none() {
                    let n = (end - pos).min(1 << 20);
                    buf.resize(n as usize, 0);
                    match pool.read(ThinId(thin), pos, &mut buf) {
                        Ok(()) => d.apply_range(pos, &buf, size, true),
                        Err(e) => err = Some(format!("reading the base for the digest: {e}")),
                    }
                    pos += n;
                }
            }
            Job::Set(x) => {
                d = x;
                err = None;
            }
            Job::Get(reply) => {
                let _ = reply.send(match &err {
                    Some(e) => Err(StreamError::Other(e.clone())),
                    None => Ok(d.clone()),
                });
            }
        }
    }
}

impl DigestWorker {
    pub fn new(pool: Option<Pool>) -> DigestWorker {
        // A bounded queue: the caller is held back when hashing falls behind.
        let (tx, rx) = sync_channel(64);
        let handle = std::thread::Builder::new()
            .name("thinvol-digest".into())
            .spawn(move || run(rx, pool))
            .ok();
        DigestWorker {
            tx: Some(tx),
            handle,
        }
    }
    fn send(&self, j: Job) -> Result<()> {
        self.tx
            .as_ref()
            .and_then(|t| t.send(j).ok())
            .ok_or_else(|| StreamError::Other("the digest thread stopped".into()))
    }
    pub fn set(&self, d: LtHash) -> Result<()> {
        self.send(Job::Set(d))
    }
    pub fn bytes(&self, off: u64, data: Arc<Vec<u8>>, size: u64, sub: bool) -> Result<()> {
        self.send(Job::Bytes {
            off,
            data,
            size,
            sub,
        })
    }
    pub fn sub_device(&self, off: u64, len: u64, thin: u64, size: u64) -> Result<()> {
        self.send(Job::SubDevice {
            off,
            len,
            thin,
            size,
        })
    }
    /// The digest after every job sent so far.
    pub fn get(&self) -> Result<LtHash> {
        let (tx, rx) = sync_channel(1);
        self.send(Job::Get(tx))?;
        rx.recv()
            .map_err(|_| StreamError::Other("the digest thread stopped".into()))?
    }
}

impl Drop for DigestWorker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
