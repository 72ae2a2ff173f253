//! Writing a planned stream. The data is read straight from the pool's data device at
//! the physical blocks the plan recorded, with no pool lock held: a held snapshot's
//! blocks are never overwritten (writers copy shared blocks) nor freed (it cannot be
//! destroyed while held).

use std::io::Write;
use std::path::Path;

use crate::chunk_cache::ChunkCache;
use crate::digest::{LtHash, CHUNK};
use crate::digest_worker::{DigestWorker, Sources};
use std::sync::Arc;

/// Records whose blocks are being read ahead.
const READ_AHEAD: usize = 32;
use crate::error::{io, Result, StreamError};
use crate::format::{
    encode_preamble, encode_record, Body, End, PartEnd, DATA_BYTES, KIND_DATA, PRE_FLAG_ZSTD,
};
use crate::plan::{info, Item, PartDigest, Plan};

#[derive(Clone, Copy, Debug, Default)]
pub struct SendOptions {
    /// zstd level (1–19), None = uncompressed.
    pub zstd: Option<i32>,
    /// First record to send (a resume position); 0 = the whole stream.
    pub start_seq: u64,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SendSummary {
    pub records: u64,
    /// Uncompressed stream bytes written (records and preamble).
    pub stream_bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub unmap_bytes: u64,
    pub start_seq: u64,
    /// Digests derived while streaming: (snapshot uuid, LtHash bytes), to store.
    #[serde(skip)]
    pub computed: Vec<(String, Vec<u8>)>,
}

/// Counts the bytes going through.
struct Counting<W: Write> {
    w: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Where the data blocks are read from.
pub struct DataSource {
    file: std::fs::File,
    /// The pool's content-hash cache: the base's old chunks it knows are not read
    /// (the base is digest-bearing: invariant C, docs/design.md §13.5), and the new
    /// chunks' hashes are recorded. None when it cannot be opened for writing.
    cache: Option<Arc<ChunkCache>>,
}

impl DataSource {
    pub fn open(pool_dir: &Path) -> Result<DataSource> {
        let p = pool_dir.join(thinvol_engine::DATA_FILE);
        let file = std::fs::File::open(&p).map_err(io(format!("opening {}", p.display())))?;
        let cache = ChunkCache::open(pool_dir).ok().map(Arc::new);
        Ok(DataSource { file, cache })
    }

    /// Whether the cache knows every whole chunk of the old segments (so they need
    /// not be read).
    fn old_known(&self, old: &[(u64, u64, u64)]) -> bool {
        let Some(c) = &self.cache else { return false };
        old.iter().all(|&(_, p, n)| {
            n.is_multiple_of(CHUNK)
                && c.get_run(p, (n / CHUNK) as usize)
                    .iter()
                    .all(Option::is_some)
        })
    }
    /// Ask the kernel to start reading an item's blocks (POSIX_FADV_WILLNEED).
    fn prefetch(&self, it: &Item, old_too: bool) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let advise = |off: u64, len: u64| {
            // SAFETY: posix_fadvise on a valid descriptor with integer arguments.
            unsafe {
                libc::posix_fadvise(
                    fd,
                    off as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        };
        match it {
            Item::Data { src, old, .. } => {
                for &(p, n) in src {
                    advise(p, n);
                }
                if old_too && !self.old_known(old) {
                    for &(_, p, n) in old {
                        advise(p, n);
                    }
                }
            }
            Item::Unmap { old, .. } if old_too && !self.old_known(old) => {
                for &(_, p, n) in old {
                    advise(p, n);
                }
            }
            _ => {}
        }
    }

    fn read(&self, src: &[(u64, u64)], out: &mut Vec<u8>) -> Result<()> {
        use std::os::unix::fs::FileExt;
        out.clear();
        for &(phys, len) in src {
            let start = out.len();
            out.resize(start + len as usize, 0);
            self.file
                .read_exact_at(&mut out[start..], phys)
                .map_err(io(format!("reading the data device at byte {phys}")))?;
        }
        Ok(())
    }
}

/// Write the stream for `plan` (from `opts.start_seq`) to `out`. `progress` gets the
/// uncompressed bytes of every record written.
pub fn send(
    plan: &Plan,
    data: &DataSource,
    out: &mut dyn Write,
    opts: SendOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<SendSummary> {
    let wio = |e: std::io::Error| StreamError::Io {
        what: "writing the stream".into(),
        source: e,
    };
    let pre = encode_preamble(if opts.zstd.is_some() {
        PRE_FLAG_ZSTD
    } else {
        0
    });
    out.write_all(&pre).map_err(wio)?;
    let mut sum = SendSummary {
        start_seq: opts.start_seq,
        stream_bytes: pre.len() as u64,
        ..Default::default()
    };
    progress(pre.len() as u64);
    let mut body: Box<dyn Write + '_> = match opts.zstd {
        Some(level) => Box::new(
            zstd::stream::write::Encoder::new(&mut *out, level)
                .map_err(wio)?
                .auto_finish(),
        ),
        None => Box::new(&mut *out),
    };
    let mut w = Counting { w: &mut body, n: 0 };
    let mut seq = 0u64;
    // A record written from parts (DATA: header and prefix, the data, the crc), so
    // the data is not copied into a record buffer.
    let mut emit = |parts: &[&[u8]], w: &mut Counting<_>, sum: &mut SendSummary| -> Result<()> {
        let mut n = 0u64;
        for b in parts {
            w.write_all(b).map_err(wio)?;
            n += b.len() as u64;
        }
        sum.records += 1;
        sum.stream_bytes += n;
        progress(n);
        Ok(())
    };
    emit(
        &[&encode_record(0, &Body::Begin(plan.begin.clone()))],
        &mut w,
        &mut sum,
    )?;
    seq += 1;
    if opts.start_seq <= 1 {
        emit(&[&encode_record(1, &Body::Info(info()))], &mut w, &mut sum)?;
    }
    seq += 1;
    let mut buf = Vec::new();
    let mut payload = Vec::new();
    let mut prev: Option<LtHash> = None;
    let worker = DigestWorker::new(Sources {
        pool: None,
        data: data.file.try_clone().ok(),
        cache: data.cache.clone(),
        collect: false,
    });
    // Read-ahead: the kernel fetches the next records' blocks while this one is sent.
    let mut ahead;
    for p in &plan.parts {
        let part = p.header.index;
        let size = p.header.volume_size;
        // The digest to derive while streaming, if it is not known yet.
        let start: Option<LtHash> = match &p.digest {
            PartDigest::Known(_) => None,
            PartDigest::FromBase(b) => Some(
                LtHash::from_bytes(b)
                    .ok_or_else(|| StreamError::Other("bad base digest".into()))?,
            ),
            PartDigest::FromPrevious => Some(
                prev.clone()
                    .ok_or_else(|| StreamError::Other("no previous part digest".into()))?,
            ),
        };
        let deriving = start.is_some();
        if let Some(d) = start {
            worker.set(d)?;
        }
        ahead = 0;
        if seq >= opts.start_seq {
            let b = encode_record(seq, &Body::Part(p.header.clone()));
            emit(&[&b], &mut w, &mut sum)?;
        }
        seq += 1;
        for (j, it) in p.items.iter().enumerate() {
            while ahead < p.items.len() && ahead < j + READ_AHEAD {
                data.prefetch(&p.items[ahead], deriving);
                ahead += 1;
            }
            let mut sent_buf: Option<std::sync::Arc<Vec<u8>>> = None;
            if deriving {
                // Old contents out, new contents in (a record a resumed stream skips
                // is read for this alone).
                let old = match it {
                    Item::Data { old, .. } | Item::Unmap { old, .. } => old.as_slice(),
                    Item::Zero { .. } => &[],
                };
                if !old.is_empty() {
                    worker.sub_phys(old.to_vec(), size)?;
                }
                if let Item::Data { offset, src, .. } = it {
                    let mut nb = Vec::new();
                    data.read(src, &mut nb)?;
                    let nb = Arc::new(nb);
                    worker.add(*offset, nb.clone(), size, src.clone())?;
                    sent_buf = Some(nb);
                }
            }
            if seq >= opts.start_seq {
                match it {
                    Item::Data {
                        offset, len, src, ..
                    } => {
                        if sent_buf.is_none() {
                            data.read(src, &mut buf)?;
                        }
                        let d = sent_buf.as_deref().map_or(&buf[..], |b| &b[..]);
                        // Header and payload prefix exactly as `frame` lays them out.
                        payload.clear();
                        payload.extend_from_slice(&KIND_DATA.to_le_bytes());
                        payload.extend_from_slice(&0u16.to_le_bytes());
                        let plen = u32::try_from(DATA_BYTES + d.len())
                            .map_err(|_| StreamError::Other("DATA record too long".into()))?;
                        payload.extend_from_slice(&plen.to_le_bytes());
                        payload.extend_from_slice(&seq.to_le_bytes());
                        payload.extend_from_slice(&part.to_le_bytes());
                        payload.extend_from_slice(&0u32.to_le_bytes());
                        payload.extend_from_slice(&offset.to_le_bytes());
                        let crc = crc32c::crc32c_append(crc32c::crc32c(&payload), d);
                        sum.data_bytes += len;
                        emit(&[&payload, d, &crc.to_le_bytes()], &mut w, &mut sum)?;
                    }
                    Item::Zero { offset, len } => {
                        sum.zero_bytes += len;
                        let b = Body::Zero {
                            part,
                            offset: *offset,
                            len: *len,
                        };
                        emit(&[&encode_record(seq, &b)], &mut w, &mut sum)?;
                    }
                    Item::Unmap { offset, len, .. } => {
                        sum.unmap_bytes += len;
                        let b = Body::Unmap {
                            part,
                            offset: *offset,
                            len: *len,
                        };
                        emit(&[&encode_record(seq, &b)], &mut w, &mut sum)?;
                    }
                }
            }
            seq += 1;
        }
        let digest_bytes = match &p.digest {
            PartDigest::Known(b) => b.clone(),
            _ => {
                let b = worker.get()?.to_bytes();
                sum.computed
                    .push((p.header.snapshot_uuid.clone(), b.clone()));
                b
            }
        };
        if seq >= opts.start_seq {
            let e = Body::PartEnd(PartEnd {
                index: part,
                data_bytes: p.header.data_bytes,
                zero_bytes: p.zero_bytes,
                unmap_bytes: p.unmap_bytes,
                nr_records: p.header.nr_records,
                digest: digest_bytes.clone(),
            });
            emit(&[&encode_record(seq, &e)], &mut w, &mut sum)?;
        }
        seq += 1;
        prev = LtHash::from_bytes(&digest_bytes);
    }
    if !sum.computed.is_empty() {
        // The derived digests may be stored only once the content hashes recorded
        // while deriving them are durable (invariant C); otherwise they are derived
        // again next time.
        if data.cache.as_ref().is_none_or(|c| c.sync().is_err()) {
            sum.computed.clear();
        }
    }
    let end = Body::End(End {
        nr_records: plan.begin.nr_records,
        data_bytes: plan.begin.data_bytes,
        stream_id: plan.stream_id,
    });
    emit(&[&encode_record(seq, &end)], &mut w, &mut sum)?;
    w.flush().map_err(wio)?;
    drop(body);
    out.flush().map_err(wio)?;
    Ok(sum)
}
