//! A thread that maintains a running LtHash while the caller streams, so hashing (and
//! looking up or reading the base's old contents) overlaps with the stream I/O on a
//! second core. Jobs are applied in order; `get` waits for every job before it.
//!
//! Old contents are subtracted through the pool's content-hash cache
//! ([`crate::chunk_cache`]): a whole chunk whose hash the cache knows is not read. That
//! is sound because the old contents are always those of a digest-bearing snapshot
//! (the stream's base): invariant C of docs/design.md §13.5.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use thinvol_engine::format::{DataBlock, ThinId};
use thinvol_engine::Pool;

use crate::chunk_cache::ChunkCache;
use crate::digest::{chunk_hash_fast, read_full_at, ChunkHash, LtHash, CHUNK};
use crate::error::{Result, StreamError};

/// Content hashes of the whole chunks added since the last `set`: chunk index → hash.
pub type NewHashes = BTreeMap<u64, ChunkHash>;

enum Job {
    /// Add the chunks of `data` at volume offset `off` (a multiple of CHUNK). `phys`:
    /// the data-file segments the bytes were read from (sender), to record their
    /// content hashes in the cache; empty: not recorded (receiver: kept in memory).
    Add {
        off: u64,
        data: Arc<Vec<u8>>,
        size: u64,
        phys: Vec<(u64, u64)>,
    },
    /// Subtract the old contents at (volume offset, data-file byte, length) segments
    /// (sender: the base's blocks, read from the data file on a cache miss).
    SubPhys {
        segs: Vec<(u64, u64, u64)>,
        size: u64,
    },
    /// Subtract the contents of `[off, off+len)` of thin device `thin` (receiver).
    SubDevice {
        off: u64,
        len: u64,
        thin: u64,
        size: u64,
    },
    Set(LtHash),
    Get(SyncSender<Result<LtHash>>),
    Take(SyncSender<NewHashes>),
}

/// Where the worker finds old contents.
pub struct Sources {
    /// The pool (receiver: mappings of the base device, reads of its blocks).
    pub pool: Option<Pool>,
    /// The pool's data file (sender: reads at data-file offsets).
    pub data: Option<File>,
    pub cache: Option<Arc<ChunkCache>>,
    /// Keep the hashes of added chunks for [`DigestWorker::take_hashes`] (receiver).
    pub collect: bool,
}

/// Reads old contents at a data-file byte offset (on a cache miss).
type ReadFn<'a> = dyn Fn(u64, &mut [u8]) -> std::result::Result<(), String> + 'a;

struct State {
    src: Sources,
    d: LtHash,
    err: Option<String>,
    new: NewHashes,
    buf: Vec<u8>,
}

impl State {
    /// Subtract a run of `len` bytes at volume offset `voff` (a multiple of CHUNK) that
    /// lies at data-file byte `phys`; `read(phys, buf)` reads it on a cache miss.
    fn sub_run(
        &mut self,
        voff: u64,
        phys: u64,
        len: u64,
        size: u64,
        read: &ReadFn<'_>,
    ) -> std::result::Result<(), String> {
        let len = len.min(size.saturating_sub(voff));
        let full = (len / CHUNK) as usize;
        let known = match &self.src.cache {
            Some(c) => c.get_run(phys, full),
            None => vec![None; full],
        };
        let nchunks = len.div_ceil(CHUNK) as usize;
        for k in 0..nchunks {
            let idx = voff / CHUNK + k as u64;
            match known.get(k) {
                Some(Some(h)) => self.d.apply_hash(idx, h, true),
                _ => {
                    let n = (len - k as u64 * CHUNK).min(CHUNK) as usize;
                    self.buf.resize(n, 0);
                    let mut b = std::mem::take(&mut self.buf);
                    let r = read(phys + k as u64 * CHUNK, &mut b);
                    if r.is_ok() {
                        self.d.apply_hash(idx, &chunk_hash_fast(&b), true);
                    }
                    self.buf = b;
                    r?;
                }
            }
        }
        Ok(())
    }

    fn add(&mut self, off: u64, data: &[u8], size: u64, phys: &[(u64, u64)]) -> Result<()> {
        let mut hashes: Vec<(u64, ChunkHash)> = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let o = off + pos as u64;
            if o >= size {
                break;
            }
            let n = (CHUNK as usize)
                .min(data.len() - pos)
                .min((size - o) as usize);
            let h = chunk_hash_fast(&data[pos..pos + n]);
            self.d.apply_hash(o / CHUNK, &h, false);
            if n == CHUNK as usize {
                hashes.push((pos as u64, h));
                if self.src.collect {
                    self.new.insert(o / CHUNK, h);
                }
            }
            pos += CHUNK as usize;
        }
        if let Some(c) = self.src.cache.as_ref().filter(|c| c.writable()) {
            // Byte `pos` of `data` lies in segment `phys[i]`.
            let mut seg_start = 0u64;
            let mut segs = phys.iter();
            let mut cur = segs.next();
            for (pos, h) in hashes {
                while let Some(&(_, n)) = cur {
                    if pos < seg_start + n {
                        break;
                    }
                    seg_start += n;
                    cur = segs.next();
                }
                let Some(&(p, n)) = cur else { break };
                if pos + CHUNK <= seg_start + n {
                    c.put_run(p + (pos - seg_start), &[h])?;
                }
            }
        }
        Ok(())
    }
}

fn run(rx: Receiver<Job>, src: Sources) {
    let mut st = State {
        src,
        d: LtHash::default(),
        err: None,
        new: NewHashes::new(),
        buf: Vec::new(),
    };
    for job in rx {
        match job {
            Job::Add {
                off,
                data,
                size,
                phys,
            } => {
                if let Err(e) = st.add(off, &data, size, &phys) {
                    st.err.get_or_insert(e.to_string());
                }
            }
            Job::SubPhys { segs, size } => {
                let Some(f) = st.src.data.as_ref().and_then(|f| f.try_clone().ok()) else {
                    st.err.get_or_insert("no data file for the digest".into());
                    continue;
                };
                let read = move |p: u64, b: &mut [u8]| {
                    read_full_at(&f, b, p)
                        .map_err(|e| format!("reading the base for the digest: {e}"))
                };
                for (voff, phys, len) in segs {
                    if !voff.is_multiple_of(CHUNK) {
                        st.err
                            .get_or_insert("old contents not on a 64 KiB chunk".into());
                        continue;
                    }
                    if let Err(e) = st.sub_run(voff, phys, len, size, &read) {
                        st.err.get_or_insert(e);
                    }
                }
            }
            Job::SubDevice {
                off,
                len,
                thin,
                size,
            } => {
                let Some(pool) = st.src.pool.clone() else {
                    continue;
                };
                let bs = pool.block_size();
                let end = (off + len).min(size);
                let maps = match pool.mappings_range(ThinId(thin), off / bs, end.div_ceil(bs)) {
                    Ok(m) => m,
                    Err(e) => {
                        st.err
                            .get_or_insert(format!("reading the base for the digest: {e}"));
                        continue;
                    }
                };
                for (vb, pb) in maps {
                    let lo = off.max(vb.0 * bs);
                    let hi = end.min(vb.0 * bs + bs);
                    if lo >= hi {
                        continue;
                    }
                    let block_phys = pb.0 * bs;
                    let pool = pool.clone();
                    // A miss reads the whole block once and serves its chunks from it.
                    let block: std::cell::RefCell<Option<Vec<u8>>> = Default::default();
                    let read = move |p: u64, b: &mut [u8]| -> std::result::Result<(), String> {
                        let mut blk = block.borrow_mut();
                        if blk.is_none() {
                            let mut v = vec![0u8; bs as usize];
                            pool.read_data_block(DataBlock(pb.0), &mut v)
                                .map_err(|e| format!("reading the base for the digest: {e}"))?;
                            *blk = Some(v);
                        }
                        let v = blk.as_ref().expect("read");
                        let at = (p - block_phys) as usize;
                        b.copy_from_slice(&v[at..at + b.len()]);
                        Ok(())
                    };
                    let phys = block_phys + (lo - vb.0 * bs);
                    if let Err(e) = st.sub_run(lo, phys, hi - lo, size, &read) {
                        st.err.get_or_insert(e);
                    }
                }
            }
            Job::Set(x) => {
                st.d = x;
                st.err = None;
                st.new.clear();
            }
            Job::Get(reply) => {
                let _ = reply.send(match &st.err {
                    Some(e) => Err(StreamError::Other(e.clone())),
                    None => Ok(st.d.clone()),
                });
            }
            Job::Take(reply) => {
                let _ = reply.send(std::mem::take(&mut st.new));
            }
        }
    }
}

pub struct DigestWorker {
    tx: Option<SyncSender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl DigestWorker {
    pub fn new(src: Sources) -> DigestWorker {
        // A bounded queue: the caller is held back when hashing falls behind.
        let (tx, rx) = sync_channel(64);
        let handle = std::thread::Builder::new()
            .name("thinvol-digest".into())
            .spawn(move || run(rx, src))
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
    /// Start from digest `d` (and forget the collected hashes).
    pub fn set(&self, d: LtHash) -> Result<()> {
        self.send(Job::Set(d))
    }
    /// Add the chunks of `data` at volume offset `off`; `phys` as in the job.
    pub fn add(
        &self,
        off: u64,
        data: Arc<Vec<u8>>,
        size: u64,
        phys: Vec<(u64, u64)>,
    ) -> Result<()> {
        self.send(Job::Add {
            off,
            data,
            size,
            phys,
        })
    }
    pub fn sub_phys(&self, segs: Vec<(u64, u64, u64)>, size: u64) -> Result<()> {
        self.send(Job::SubPhys { segs, size })
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
    /// The content hashes of the whole chunks added since the last `set` (taken).
    pub fn take_hashes(&self) -> Result<NewHashes> {
        let (tx, rx) = sync_channel(1);
        self.send(Job::Take(tx))?;
        rx.recv()
            .map_err(|_| StreamError::Other("the digest thread stopped".into()))
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
