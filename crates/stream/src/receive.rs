//! Receiving a stream into a pool.
//!
//! Each part is written into a hidden thin device (named in the catalog's `hidden`
//! map, not in any listing): a snapshot of the base snapshot, of the previous part's
//! device (`--from-each`), or a fresh thin device (full stream). Progress is
//! checkpointed in `POOLDIR/receive/<target>.json` after a pool commit, so an
//! interrupted receive resumes from its last checkpoint (re-applying a record is
//! idempotent). When every part's totals and content digest verified and END matched,
//! one catalog change publishes all parts: the hidden devices become the snapshots
//! (with the source's names and uuids) and each target volume becomes a fresh
//! snapshot of its newest one. Before that change the targets are untouched.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thinvol_catalog::model::{new_uuid, now};
use thinvol_catalog::{CatalogError, CatalogPool, Snapshot, Volume};
use thinvol_engine::format::ThinId;

use crate::chunk_cache::ChunkCache;
use crate::digest::{self, hex, unhex, LtHash, CHUNK};
use crate::digest_worker::{DigestWorker, Sources};
use crate::error::{io, Result, StreamError};
use crate::format::{Begin, Body, Part, BEGIN_FLAG_GROUP};
use crate::reader::{ReadError, StreamReader};
use crate::token::Token;
use std::sync::Arc;

/// Checkpoints (pool commit + state file) come at most every CHECKPOINT_SECS, once
/// CHECKPOINT_BYTES of data arrived since the last, or after CHECKPOINT_MAX_BYTES:
/// each commit waits for the data written since the last to reach the disk, so
/// frequent ones stall the stream. `THINVOL_CHECKPOINT_BYTES` (tests) sets a pure
/// byte interval.
const CHECKPOINT_BYTES: u64 = 64 << 20;
const CHECKPOINT_MAX_BYTES: u64 = 4 << 30;
const CHECKPOINT_SECS: u64 = 10;

/// (bytes, minimum interval) between checkpoints.
fn checkpoint_policy() -> (u64, std::time::Duration) {
    match std::env::var("THINVOL_CHECKPOINT_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(b) => (b, std::time::Duration::ZERO),
        None => (
            CHECKPOINT_BYTES,
            std::time::Duration::from_secs(CHECKPOINT_SECS),
        ),
    }
}

#[derive(Clone, Debug, Default)]
pub struct ReceiveOptions {
    /// Accept a target written to since its newest snapshot (the writes are dropped,
    /// like a rollback) and a full stream into an existing volume with no snapshots.
    pub force: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReceiveSummary {
    pub snapshots: Vec<String>,
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub unmap_bytes: u64,
    pub resumed_at: u64,
    /// Snapshots whose digest, derived from the base's stored digest and the
    /// content-hash cache, disagreed with the stream's while the received content,
    /// hashed from scratch, agreed: the stored inputs were stale; the cache was
    /// cleared (docs/design.md §13.5).
    pub digests_recomputed: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct PartState {
    /// PART payload, hex.
    header: String,
    hidden: u64,
    data_bytes: u64,
    zero_bytes: u64,
    unmap_bytes: u64,
    records: u64,
    /// Verified content digest, hex, once PART_END checked.
    digest: Option<String>,
    /// Furthest byte written (records arrive in offset order).
    end: u64,
    /// Device the part's base content is read from (digest derived while applying).
    #[serde(default)]
    base_thin: Option<u64>,
    /// The digest derived so far, hex, as of the checkpoint; None: derive at the end.
    #[serde(default)]
    running: Option<String>,
    /// The content hashes of the part's new chunks below this volume byte are recorded
    /// in the pool's content-hash cache (and synced).
    #[serde(default)]
    recorded: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    target: String,
    /// BEGIN payload, hex.
    begin: String,
    parts: Vec<PartState>,
    next_seq: u64,
    data_done: u64,
}

fn key_for(target: Option<&str>) -> String {
    target.map_or_else(|| "@group".to_string(), str::to_string)
}

fn state_path(dir: &Path, key: &str) -> PathBuf {
    dir.join("receive").join(format!("{key}.json"))
}

fn load_state(dir: &Path, key: &str) -> Result<Option<State>> {
    let p = state_path(dir, key);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| StreamError::Other(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", p.display()))(e)),
    }
}

fn save_state(dir: &Path, key: &str, s: &State) -> Result<()> {
    let d = dir.join("receive");
    std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
    let b = serde_json::to_vec_pretty(s).map_err(|e| StreamError::Other(e.to_string()))?;
    thinvol_catalog::store::write_atomic(&state_path(dir, key), &b)?;
    Ok(())
}

fn remove_state(dir: &Path, key: &str) -> Result<()> {
    match std::fs::remove_file(state_path(dir, key)) {
        Ok(()) => thinvol_catalog::store::sync_dir(&dir.join("receive")).map_err(Into::into),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing receive state")(e)),
    }
}

fn hidden_tag(pool: &str, key: &str, part: u32, uuid: &str) -> String {
    format!("receive {pool}/{key} part {part} {uuid}")
}

fn hidden_prefix(pool: &str, key: &str) -> String {
    format!("receive {pool}/{key} part ")
}

fn decode_part(hexs: &str) -> Result<Part> {
    let b = unhex(hexs).ok_or_else(|| StreamError::Other("receive state: bad part".into()))?;
    match crate::format::decode_payload(crate::format::KIND_PART, 0, &b)? {
        Body::Part(p) => Ok(p),
        _ => Err(StreamError::Other("receive state: bad part".into())),
    }
}

/// The newest snapshot of a volume: latest creation time, then highest thin id.
pub fn newest(v: &Volume) -> Option<(&String, &Snapshot)> {
    v.snapshots
        .iter()
        .max_by_key(|(_, s)| (s.created, s.thin_id))
}

/// Whether `vol` was written since its newest snapshot (metadata delta, O(change)).
pub fn written_since(cp: &CatalogPool, v: &Volume) -> Result<bool> {
    match newest(v) {
        None => Ok(cp
            .pool
            .devices()?
            .iter()
            .any(|d| d.id.0 == v.thin_id && d.mapped_blocks > 0)),
        Some((_, s)) => {
            if s.size != v.size {
                return Ok(true);
            }
            let (d, _) = cp.pool.delta(ThinId(s.thin_id), ThinId(v.thin_id), false)?;
            Ok(!d.is_empty())
        }
    }
}

/// The current resume token of an unfinished receive into `target`.
pub fn current_token(cp: &CatalogPool, target: Option<&str>) -> Result<Option<String>> {
    let key = key_for(target);
    Ok(load_state(&cp.dir, &key)?.map(|s| token_of(&s).encode()))
}

fn token_of(s: &State) -> Token {
    let mut id = [0u8; 32];
    if let (Ok(b), Ok(parts)) = (
        unhex(&s.begin).ok_or(()).and_then(|b| {
            match crate::format::decode_payload(crate::format::KIND_BEGIN, 0, &b) {
                Ok(Body::Begin(x)) => Ok(x),
                _ => Err(()),
            }
        }),
        s.parts
            .iter()
            .map(|p| decode_part(&p.header))
            .collect::<Result<Vec<_>>>(),
    ) {
        if parts.len() == b.nr_parts as usize {
            id = crate::plan::stream_id(&b, &parts);
        } else {
            // Not every PART seen yet: the id is completed by the sender from the
            // prefix; name the prefix (the sender checks it).
            id = crate::plan::prefix_id(&b, &parts);
        }
    }
    Token {
        stream_id: id,
        next_seq: s.next_seq,
        data_done: s.data_done,
    }
}

/// Delete the hidden devices and the state of an unfinished receive.
pub fn abort(cp: &mut CatalogPool, target: Option<&str>) -> Result<bool> {
    let key = key_for(target);
    let prefix = hidden_prefix(&cp.name, &key);
    let ids: Vec<u64> = cp
        .catalog
        .hidden
        .iter()
        .filter(|(_, t)| t.starts_with(&prefix))
        .map(|(i, _)| *i)
        .collect();
    let had = !ids.is_empty() || load_state(&cp.dir, &key)?.is_some();
    if !ids.is_empty() {
        cp.change_described(&format!("receive abort {}/{key}", cp.name), |c, tx| {
            for id in &ids {
                tx.delete(ThinId(*id))?;
                c.hidden.remove(id);
            }
            Ok(())
        })?;
    }
    remove_state(&cp.dir, &key)?;
    Ok(had)
}

struct Rx<'c> {
    cp: &'c mut CatalogPool,
    key: String,
    target: Option<String>,
    opts: ReceiveOptions,
    state: State,
    begin: Begin,
    parts: Vec<Part>,
    since_checkpoint: u64,
    sum: ReceiveSummary,
    /// Derives the open part's digest (base − old contents + new contents) on a
    /// second thread; `deriving` says whether it is valid for the open part.
    worker: DigestWorker,
    deriving: bool,
    cache: Arc<ChunkCache>,
    writeback: crate::writeback::Writeback,
}

fn refused(m: impl Into<String>) -> StreamError {
    StreamError::Refused(m.into())
}

impl Rx<'_> {
    fn checkpoint(&mut self, next_seq: u64) -> Result<()> {
        self.cp.pool.commit()?;
        if let Some(ps) = self.state.parts.last().filter(|p| p.digest.is_none()) {
            let upto = ps.end;
            self.record_hashes(upto)?;
        }
        let running = match self.state.parts.last() {
            Some(ps) if ps.digest.is_none() && self.deriving => {
                Some(hex(&self.worker.get()?.to_bytes()))
            }
            _ => None,
        };
        if let Some(ps) = self.state.parts.last_mut() {
            if ps.digest.is_none() {
                ps.running = running;
            }
        }
        self.state.next_seq = next_seq;
        save_state(&self.cp.dir, &self.key, &self.state)?;
        self.since_checkpoint = 0;
        Ok(())
    }

    fn volume_name<'a>(&'a self, p: &'a Part) -> &'a str {
        match &self.target {
            Some(t) => t,
            None => &p.volume,
        }
    }

    /// Validate a PART against the target and create (or find) its hidden device.
    fn start_part(&mut self, p: &Part) -> Result<()> {
        if p.index as usize != self.state.parts.len() {
            return Err(StreamError::Corrupt(format!(
                "PART {} out of order (expected part {})",
                p.index,
                self.state.parts.len()
            )));
        }
        if p.index >= self.begin.nr_parts {
            return Err(StreamError::Corrupt(format!(
                "PART {} beyond the {} parts BEGIN announced",
                p.index, self.begin.nr_parts
            )));
        }
        if p.block_size == 0 || p.volume_size == 0 {
            return Err(StreamError::Corrupt(
                "PART with zero block or volume size".into(),
            ));
        }
        let pool = self.cp.name.clone();
        let vname = self.volume_name(p).to_string();
        thinvol_catalog::names::check_component(&vname, "volume", &vname)?;
        thinvol_catalog::names::check_component(&p.snapshot, "snapshot", &p.snapshot)?;
        // The previous part of the same volume in this stream, if any.
        let prev = self
            .parts
            .iter()
            .zip(&self.state.parts)
            .rev()
            .find(|(q, _)| self.volume_name(q) == vname)
            .map(|(q, s)| (q.clone(), s.hidden));
        let origin: Option<u64> = match (&prev, self.cp.catalog.volumes.get(&vname)) {
            (Some((q, hid)), _) => {
                if p.base_uuid != q.snapshot_uuid {
                    return Err(StreamError::Corrupt(format!(
                        "part {} is based on {} but the previous part is {}",
                        p.index, p.base_uuid, q.snapshot_uuid
                    )));
                }
                Some(*hid)
            }
            (None, None) => {
                if !p.is_full() {
                    return Err(StreamError::NotFound(format!(
                        "volume '{pool}/{vname}' (an incremental stream needs the target to hold its base @{})",
                        p.base
                    )));
                }
                None
            }
            (None, Some(v)) => {
                if p.is_full() {
                    return Err(CatalogError::Exists {
                        kind: "volume",
                        name: format!("{pool}/{vname}"),
                    }
                    .into());
                }
                let (nn, ns) = newest(v).ok_or_else(|| {
                    refused(format!(
                        "'{pool}/{vname}' has no snapshot; the stream's base is @{}",
                        p.base
                    ))
                })?;
                if ns.uuid != p.base_uuid {
                    let has = v.snapshots.iter().find(|(_, s)| s.uuid == p.base_uuid);
                    return Err(refused(match has {
                        Some((n, _)) => format!(
                            "the stream's base @{} is not the newest snapshot of '{pool}/{vname}' (@{n} is older than @{nn}); destroy the newer snapshots or send from @{nn}",
                            p.base
                        ),
                        None => format!(
                            "the stream's base @{} ({}) is not on '{pool}/{vname}' (its newest snapshot is @{nn}, {})",
                            p.base, p.base_uuid, ns.uuid
                        ),
                    }));
                }
                if !self.opts.force && written_since(self.cp, v)? {
                    return Err(refused(format!(
                        "'{pool}/{vname}' was written to since @{nn}; receive with --force to roll it back"
                    )));
                }
                Some(ns.thin_id)
            }
        };
        if let Some(v) = self.cp.catalog.volumes.get(&vname) {
            if v.snapshots.contains_key(&p.snapshot) {
                return Err(CatalogError::Exists {
                    kind: "snapshot",
                    name: format!("{pool}/{vname}@{}", p.snapshot),
                }
                .into());
            }
        }
        let tag = hidden_tag(&pool, &self.key, p.index, &p.snapshot_uuid);
        let existing = self
            .cp
            .catalog
            .hidden
            .iter()
            .find(|(_, t)| **t == tag)
            .map(|(i, _)| *i);
        let hidden = match existing {
            Some(id) => id,
            None => self.cp.change_described(
                &format!("receive into {pool}/{vname}@{}", p.snapshot),
                |c, tx| {
                    let id = c.alloc_thin_id()?;
                    match origin {
                        Some(o) => tx.create_snap(ThinId(id), ThinId(o))?,
                        None => tx.create_thin(ThinId(id))?,
                    }
                    c.hidden.insert(id, tag.clone());
                    Ok(id)
                },
            )?,
        };
        // A shrunk volume: drop what lies beyond the new end.
        let base_size = match (&prev, self.cp.catalog.volumes.get(&vname)) {
            (Some((q, _)), _) => q.volume_size,
            (None, Some(v)) => newest(v).map_or(0, |(_, s)| s.size),
            _ => 0,
        };
        if base_size > p.volume_size {
            self.cp
                .pool
                .discard(ThinId(hidden), p.volume_size, base_size - p.volume_size)?;
        }
        // Derive the digest while applying when the size stays (the common case);
        // otherwise from the delta at PART_END.
        let base_digest: Option<LtHash> = if p.is_full() {
            Some(LtHash::default())
        } else if base_size != p.volume_size {
            None
        } else if let Some(j) = (0..self.parts.len())
            .rev()
            .find(|&j| self.volume_name(&self.parts[j]) == vname)
        {
            self.state.parts[j]
                .digest
                .as_deref()
                .and_then(unhex)
                .and_then(|b| LtHash::from_bytes(&b))
        } else {
            let v = self.cp.catalog.volumes.get(&vname).cloned();
            match v
                .as_ref()
                .and_then(|v| newest(v).map(|(_, s)| (v, s.clone())))
            {
                Some((v, s)) => Some(digest::snapshot_digest(&self.cp.pool, &self.cp.dir, v, &s)?),
                None => None,
            }
        };
        self.deriving = base_digest.is_some();
        let running = base_digest.as_ref().map(|d| hex(&d.to_bytes()));
        if let Some(d) = base_digest {
            self.worker.set(d)?;
        }
        self.parts.push(p.clone());
        self.state.parts.push(PartState {
            header: hex(&p.payload()),
            hidden,
            data_bytes: 0,
            zero_bytes: 0,
            unmap_bytes: 0,
            records: 1,
            digest: None,
            end: 0,
            base_thin: origin,
            running,
            recorded: 0,
        });
        Ok(())
    }

    /// Record in the content-hash cache (synced) the hashes of the open part's new
    /// whole chunks in `[recorded, upto)` (invariant C, docs/design.md §13.5): the
    /// chunks of the hidden device's blocks that differ from its base. Chunks below
    /// `upto` are final (records come in offset order), so each is recorded once; a
    /// chunk whose bytes the digest thread did not hash (resumed receive, a block
    /// partly copied from the base, a partial discard) is read back. Parts whose
    /// digest is derived at PART_END record there (`update_pool_cached`).
    fn record_hashes(&mut self, upto: u64) -> Result<()> {
        if !self.deriving {
            return Ok(());
        }
        let i = self.parts.len() - 1;
        let size = self.parts[i].volume_size;
        let ps = &self.state.parts[i];
        let (from, hidden, base) = (ps.recorded, ps.hidden, ps.base_thin);
        let upto = if upto >= size {
            size
        } else {
            upto / CHUNK * CHUNK
        };
        if upto <= from {
            return Ok(());
        }
        let known = self.worker.take_hashes()?;
        let pool = &self.cp.pool;
        let bs = pool.block_size();
        let (vlo, vhi) = (from / bs, upto.div_ceil(bs));
        let blocks: Vec<(u64, u64)> = match base {
            Some(b) => pool
                .delta(ThinId(b), ThinId(hidden), false)?
                .0
                .into_iter()
                .filter(|d| d.vblock >= vlo && d.vblock < vhi)
                .filter_map(|d| d.right.map(|pb| (d.vblock, pb.0)))
                .collect(),
            None => pool
                .mappings_range(ThinId(hidden), vlo, vhi)?
                .into_iter()
                .map(|(vb, pb)| (vb.0, pb.0))
                .collect(),
        };
        let mut buf = vec![0u8; bs as usize];
        for (vb, pb) in blocks {
            let mut read = false;
            for k in 0..bs / CHUNK {
                let coff = vb * bs + k * CHUNK;
                if coff < from || coff + CHUNK > upto || coff + CHUNK > size {
                    continue;
                }
                let h = match known.get(&(coff / CHUNK)) {
                    Some(h) => *h,
                    None => {
                        if !read {
                            pool.read_data_block(thinvol_engine::format::DataBlock(pb), &mut buf)?;
                            read = true;
                        }
                        let c = (k * CHUNK) as usize;
                        digest::chunk_hash_fast(&buf[c..c + CHUNK as usize])
                    }
                };
                self.cache.put_run(pb * bs + k * CHUNK, &[h])?;
            }
        }
        self.cache.sync()?;
        self.state.parts[i].recorded = upto;
        Ok(())
    }

    /// Digest bookkeeping for a range about to change: subtract the base's old
    /// contents (and, for DATA, add the new bytes). Ranges that do not start on a
    /// 64 KiB chunk or end on one (other than the volume's end) fall back to the
    /// derivation at PART_END.
    fn note_range(&mut self, off: u64, len: u64, new: Option<Arc<Vec<u8>>>) -> Result<()> {
        if !self.deriving {
            return Ok(());
        }
        let i = self.parts.len() - 1;
        let size = self.parts[i].volume_size;
        let end = off + len;
        if !off.is_multiple_of(digest::CHUNK) || (!end.is_multiple_of(digest::CHUNK) && end != size)
        {
            self.deriving = false;
            return Ok(());
        }
        if let Some(base) = self.state.parts[i].base_thin {
            self.worker.sub_device(off, len, base, size)?;
        }
        if let Some(b) = new {
            self.worker.add(off, b, size, Vec::new())?;
        }
        Ok(())
    }

    fn cur(&mut self, part: u32, off: u64, len: u64, what: &str) -> Result<u64> {
        let i = self.state.parts.len();
        let Some(ps) = self.state.parts.last() else {
            return Err(StreamError::Corrupt(format!("{what} before any PART")));
        };
        if part as usize + 1 != i || ps.digest.is_some() {
            return Err(StreamError::Corrupt(format!(
                "{what} for part {part} while part {} is open",
                i.saturating_sub(1)
            )));
        }
        let size = self.parts[i - 1].volume_size;
        if off < ps.end || off.checked_add(len).is_none_or(|e| e > size) {
            return Err(StreamError::Corrupt(format!(
                "{what} range {off}+{len} out of order or beyond the volume size {size}"
            )));
        }
        Ok(ps.hidden)
    }

    fn apply(&mut self, body: Body) -> Result<()> {
        match body {
            Body::Part(p) => self.start_part(&p)?,
            Body::Data { part, offset, data } => {
                let n = data.len() as u64;
                let h = self.cur(part, offset, n, "DATA")?;
                let data = Arc::new(data);
                self.note_range(offset, n, Some(data.clone()))?;
                self.cp.pool.write(ThinId(h), offset, &data)?;
                let ps = self.state.parts.last_mut().expect("cur checked");
                ps.data_bytes += n;
                ps.records += 1;
                ps.end = offset + n;
                self.state.data_done += n;
                self.since_checkpoint += n;
                self.writeback.wrote(n);
                self.sum.data_bytes += n;
            }
            Body::Zero { part, offset, len } | Body::Unmap { part, offset, len } => {
                let zero = matches!(body, Body::Zero { .. });
                let h = self.cur(part, offset, len, if zero { "ZERO" } else { "UNMAP" })?;
                self.note_range(offset, len, None)?;
                self.cp.pool.discard(ThinId(h), offset, len)?;
                let ps = self.state.parts.last_mut().expect("cur checked");
                if zero {
                    ps.zero_bytes += len;
                    self.sum.zero_bytes += len;
                } else {
                    ps.unmap_bytes += len;
                    self.sum.unmap_bytes += len;
                }
                ps.records += 1;
                ps.end = offset + len;
            }
            Body::PartEnd(e) => {
                let i = self.state.parts.len();
                let ok_part = i > 0 && e.index as usize == i - 1;
                let Some(ps) = self.state.parts.last().cloned().filter(|_| ok_part) else {
                    return Err(StreamError::Corrupt(format!(
                        "PART_END {} without its PART",
                        e.index
                    )));
                };
                let p = self.parts[i - 1].clone();
                let got = (ps.data_bytes, ps.zero_bytes, ps.unmap_bytes, ps.records + 1);
                let want = (e.data_bytes, e.zero_bytes, e.unmap_bytes, e.nr_records);
                if got != want || e.nr_records != p.nr_records || e.data_bytes != p.data_bytes {
                    return Err(StreamError::Corrupt(format!(
                        "part {} totals (data, zero, unmap, records) received {got:?}, stream says {want:?}",
                        e.index
                    )));
                }
                self.cp.pool.commit()?;
                let d = if self.deriving {
                    let d = self.worker.get()?;
                    let size = p.volume_size;
                    self.record_hashes(size)?;
                    self.deriving = false;
                    d
                } else {
                    let d = self.part_digest(i - 1)?;
                    self.cache.sync()?;
                    d
                };
                let theirs = LtHash::from_bytes(&e.digest)
                    .ok_or_else(|| StreamError::Corrupt("bad digest length".into()))?;
                let d = if d != theirs {
                    self.recheck_digest(i - 1, d, &theirs)?
                } else {
                    d
                };
                if d != theirs {
                    return Err(StreamError::Corrupt(format!(
                        "content digest of {}@{} mismatch: received content {}, source {}",
                        p.volume,
                        p.snapshot,
                        d.short(),
                        theirs.short()
                    )));
                }
                digest::store(&self.cp.dir, &p.snapshot_uuid, &d)?;
                let ps = self.state.parts.last_mut().expect("checked");
                ps.records += 1;
                ps.digest = Some(hex(&d.to_bytes()));
            }
            Body::Info(_) | Body::Skipped { .. } => {}
            Body::Begin(_) => return Err(StreamError::Corrupt("a second BEGIN".into())),
            Body::End(_) => unreachable!("handled by the caller"),
        }
        Ok(())
    }

    /// The derived digest `derived` of part `i` disagrees with the stream's. The
    /// derivation trusted the base's stored digest and the content-hash cache
    /// (invariant C, docs/design.md §13.5); before calling the received content wrong,
    /// hash the hidden device from scratch (cost ∝ its mapped size, on this failure
    /// path only). If that agrees, the stored inputs were stale: the cache is
    /// cleared (every entry becomes unknown, which is always safe) and the fresh
    /// digest is used. Otherwise the content really differs and `derived` is kept.
    fn recheck_digest(&mut self, i: usize, derived: LtHash, theirs: &LtHash) -> Result<LtHash> {
        let p = &self.parts[i];
        let hidden = self.state.parts[i].hidden;
        let fresh = digest::full_pool(&self.cp.pool, hidden, p.volume_size)?;
        if &fresh != theirs {
            return Ok(derived);
        }
        self.cache.clear()?;
        let name = format!("{}/{}@{}", self.cp.name, self.volume_name(p), p.snapshot);
        self.sum.digests_recomputed.push(name);
        Ok(fresh)
    }

    /// Digest of part `i`'s hidden device, from its base's digest (cost ∝ delta).
    fn part_digest(&mut self, i: usize) -> Result<LtHash> {
        let p = &self.parts[i];
        let hidden = self.state.parts[i].hidden;
        let vname = self.volume_name(p).to_string();
        let prev = (0..i)
            .rev()
            .find(|&j| self.volume_name(&self.parts[j]) == vname);
        let base: Option<(u64, u64, LtHash)> = match prev {
            Some(j) => {
                let d = self.state.parts[j]
                    .digest
                    .as_deref()
                    .and_then(unhex)
                    .and_then(|b| LtHash::from_bytes(&b))
                    .ok_or_else(|| StreamError::Other("previous part digest missing".into()))?;
                Some((self.state.parts[j].hidden, self.parts[j].volume_size, d))
            }
            None if p.is_full() => None,
            None => {
                let v = self
                    .cp
                    .catalog
                    .volumes
                    .get(&vname)
                    .cloned()
                    .ok_or_else(|| StreamError::NotFound(format!("volume {vname}")))?;
                let (_, s) = newest(&v).ok_or_else(|| refused("target lost its snapshots"))?;
                let d = digest::snapshot_digest(&self.cp.pool, &self.cp.dir, &v, s)?;
                Some((s.thin_id, s.size, d))
            }
        };
        let cache = Some(&*self.cache);
        match base {
            Some((bt, bs, bd)) => digest::update_pool_cached(
                &self.cp.pool,
                cache,
                (bt, bs, &bd),
                (hidden, p.volume_size),
            ),
            None => digest::full_pool_cached(&self.cp.pool, cache, hidden, p.volume_size),
        }
    }

    /// One catalog change: hidden devices become snapshots, volumes move forward.
    fn publish(&mut self) -> Result<()> {
        let pool = self.cp.name.clone();
        let mut by_vol: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, p) in self.parts.iter().enumerate() {
            by_vol
                .entry(self.volume_name(p).to_string())
                .or_default()
                .push(i);
        }
        for vn in by_vol.keys() {
            if let Some(v) = self.cp.catalog.volumes.get(vn) {
                if !self.opts.force && written_since(self.cp, v)? {
                    return Err(refused(format!(
                        "'{pool}/{vn}' was written to during the receive; receive with --force to roll it back"
                    )));
                }
            }
        }
        let parts = self.parts.clone();
        let states = self.state.parts.clone();
        let names: Vec<String> = parts
            .iter()
            .map(|p| format!("{pool}/{}@{}", self.volume_name(p), p.snapshot))
            .collect();
        let what = format!("receive {}", names.join(", "));
        self.cp.change_described(&what, |c, tx| {
            for (vn, idx) in &by_vol {
                let mut last = (0u64, 0u64);
                for &i in idx {
                    let p = &parts[i];
                    let s = &states[i];
                    c.hidden.remove(&s.hidden);
                    let snap = Snapshot {
                        thin_id: s.hidden,
                        uuid: p.snapshot_uuid.clone(),
                        size: p.volume_size,
                        created: p.created,
                        holds: Default::default(),
                        group: (!p.group.is_empty()).then(|| p.group.clone()),
                    };
                    if !c.volumes.contains_key(vn) {
                        c.volumes.insert(
                            vn.clone(),
                            Volume {
                                thin_id: 0,
                                uuid: new_uuid(),
                                size: p.volume_size,
                                created: now(),
                                origin: None,
                                snapshots: Default::default(),
                            },
                        );
                    }
                    let v = c.volumes.get_mut(vn).expect("inserted");
                    if v.snapshots.insert(p.snapshot.clone(), snap).is_some() {
                        return Err(CatalogError::Exists {
                            kind: "snapshot",
                            name: format!("{pool}/{vn}@{}", p.snapshot),
                        });
                    }
                    last = (s.hidden, p.volume_size);
                }
                let id = c.alloc_thin_id()?;
                tx.create_snap(ThinId(id), ThinId(last.0))?;
                let v = c.volumes.get_mut(vn).expect("inserted");
                if v.thin_id != 0 {
                    tx.delete(ThinId(v.thin_id))?;
                }
                v.thin_id = id;
                v.size = last.1;
            }
            Ok(())
        })?;
        self.sum.snapshots = names;
        Ok(())
    }
}

/// Interrupted: commit what was applied, checkpoint, and return the resume error.
fn interrupted(rx: &mut Rx<'_>, next_seq: u64, reason: String) -> StreamError {
    match rx.checkpoint(next_seq) {
        Ok(()) => StreamError::Interrupted {
            reason,
            token: token_of(&rx.state).encode(),
        },
        Err(e) => StreamError::Other(format!(
            "{reason}; saving the receive state failed too: {e}"
        )),
    }
}

/// Receive a stream into `target` (a volume name; None for a group stream, whose
/// volumes keep their source names).
pub fn receive(
    cp: &mut CatalogPool,
    target: Option<&str>,
    input: Box<dyn Read + '_>,
    opts: &ReceiveOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReceiveSummary> {
    let key = key_for(target);
    let mut rd = StreamReader::new(input).map_err(|e| match e {
        ReadError::Format(f) => StreamError::Format(f),
        ReadError::Io(e) => StreamError::Io {
            what: "reading the stream".into(),
            source: e,
        },
    })?;
    let (first, _) = match rd.next_record() {
        Ok(Some(r)) => r,
        Ok(None) => return Err(StreamError::Corrupt("no BEGIN record".into())),
        Err(ReadError::Format(f)) => return Err(f.into()),
        Err(ReadError::Io(e)) => return Err(io("reading the stream")(e)),
    };
    let begin = match first.body {
        Body::Begin(b) if first.seq == 0 => b,
        _ => {
            return Err(StreamError::Corrupt(
                "the stream does not start with BEGIN".into(),
            ))
        }
    };
    let group = begin.flags & BEGIN_FLAG_GROUP != 0;
    if group && target.is_some() {
        return Err(refused(
            "a group stream is received into a pool: give POOL, not POOL/VOLUME",
        ));
    }
    if !group && target.is_none() {
        return Err(refused("give the target volume as POOL/VOLUME"));
    }
    let begin_hex = hex(&begin.payload());
    let state = match load_state(&cp.dir, &key)? {
        Some(s) if s.begin == begin_hex => s,
        Some(_) => {
            return Err(refused(format!(
                "an unfinished receive of another stream into '{}/{key}' exists; resume it (thinvol receive --token {}/{key}) or drop it (thinvol receive --abort {}/{key})",
                cp.name, cp.name, cp.name
            )))
        }
        None => State {
            target: key.clone(),
            begin: begin_hex,
            parts: Vec::new(),
            next_seq: 1,
            data_done: 0,
        },
    };
    let parts = state
        .parts
        .iter()
        .map(|p| decode_part(&p.header))
        .collect::<Result<Vec<_>>>()?;
    let resume_at = state.next_seq;
    let total = begin.data_bytes;
    let cp_pool = cp.pool.clone();
    let cache = Arc::new(ChunkCache::open(&cp.dir)?);
    let writeback = crate::writeback::Writeback::new(&cp.dir);
    let mut rx = Rx {
        cp,
        key,
        target: target.map(str::to_string),
        opts: opts.clone(),
        state,
        begin,
        parts,
        since_checkpoint: 0,
        worker: DigestWorker::new(Sources {
            pool: Some(cp_pool),
            data: None,
            cache: Some(cache.clone()),
            collect: true,
        }),
        deriving: false,
        cache,
        writeback,
        sum: ReceiveSummary {
            resumed_at: if resume_at > 1 { resume_at } else { 0 },
            ..Default::default()
        },
    };
    if let Some(d) = rx
        .state
        .parts
        .last()
        .filter(|p| p.digest.is_none())
        .and_then(|p| p.running.as_deref())
        .and_then(unhex)
        .and_then(|b| LtHash::from_bytes(&b))
    {
        rx.worker.set(d)?;
        rx.deriving = true;
    }
    progress(rx.state.data_done, total);
    let mut expected = resume_at;
    let (every, min_interval) = checkpoint_policy();
    let mut last_checkpoint = std::time::Instant::now();
    loop {
        let (rec, _) = match rd.next_record() {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(interrupted(
                    &mut rx,
                    expected,
                    "the stream ended before END".into(),
                ))
            }
            Err(e) => return Err(interrupted(&mut rx, expected, e.to_string())),
        };
        if rec.seq < expected {
            // Already applied (a stream re-sent from an earlier point): skip.
            continue;
        }
        if rec.seq > expected {
            return Err(StreamError::Corrupt(format!(
                "record {} where record {expected} was expected (a resumed stream must start where this receive stopped; thinvol receive --token shows where)",
                rec.seq
            )));
        }
        rx.sum.records += 1;
        if let Body::End(e) = &rec.body {
            let id = crate::plan::stream_id(&rx.begin, &rx.parts);
            if e.nr_records != rec.seq + 1
                || e.nr_records != rx.begin.nr_records
                || e.data_bytes != rx.begin.data_bytes
                || rx.parts.len() != rx.begin.nr_parts as usize
                || rx.state.parts.iter().any(|p| p.digest.is_none())
                || e.stream_id != id
            {
                return Err(StreamError::Corrupt(format!(
                    "END does not match the stream: {} records, {} parts complete of {}",
                    rec.seq + 1,
                    rx.state.parts.iter().filter(|p| p.digest.is_some()).count(),
                    rx.begin.nr_parts
                )));
            }
            rx.checkpoint(rec.seq)?;
            if let Err(e) = rx.publish() {
                if matches!(e, StreamError::Catalog(CatalogError::Exists { .. })) {
                    // Published already (a crash before the state file went), or the
                    // names were taken meanwhile: nothing left to resume.
                    let _ = abort(rx.cp, target);
                }
                return Err(e);
            }
            remove_state(&rx.cp.dir, &rx.key)?;
            return Ok(rx.sum);
        }
        let is_end_of_part = matches!(rec.body, Body::PartEnd(_));
        match rx.apply(rec.body) {
            Ok(()) => {}
            Err(e @ StreamError::Corrupt(_)) if is_end_of_part => {
                // Applied content does not match the source: nothing to resume.
                let _ = abort(rx.cp, target);
                return Err(e);
            }
            Err(
                e @ (StreamError::Refused(_) | StreamError::NotFound(_) | StreamError::Catalog(_)),
            ) => {
                // The target does not fit this stream: nothing worth resuming.
                let _ = abort(rx.cp, target);
                return Err(e);
            }
            Err(e) => {
                let _ = rx.checkpoint(expected);
                return Err(e);
            }
        }
        expected += 1;
        progress(rx.state.data_done, total);
        let due = rx.since_checkpoint >= every && last_checkpoint.elapsed() >= min_interval;
        if is_end_of_part || due || rx.since_checkpoint >= CHECKPOINT_MAX_BYTES {
            last_checkpoint = std::time::Instant::now();
            rx.checkpoint(expected)?;
        }
    }
}
