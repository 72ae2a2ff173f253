//! The metadata archive: a restore point after every catalog change, with retention,
//! history and restore (docs/design.md §11.3).
//!
//! `DIR/archive/` holds
//! * `NNNNNNNNNNNN.point`, one file per point (zero-padded decimal id): the catalog of
//!   that moment (JSON) and the mappings of every catalogued thin device as run-length
//!   runs with varints, closed by a CRC-32C; written to a temporary file, fsynced and
//!   renamed;
//! * `index`: a 64-byte header (`base` = id of the first slot, `first` = oldest live
//!   point) and one fixed 160-byte slot per point (id, time, transaction, pool time,
//!   sizes, description, CRC). Point `id` is slot `id - base`, so recording appends one
//!   slot, pruning reads the oldest slots and moves `first`, and `history` reads the
//!   live slots without opening any point. When the dead prefix outgrows the live part
//!   (and 1024 slots) the index is rewritten without it: amortised O(1) per point.
//!
//! Costs: recording is O(mappings of the catalogued devices) (the dump) plus three
//! fsyncs; pruning is O(points pruned); `history` is O(points listed). Nothing ever
//! lists the directory (except to rebuild a damaged index).
//!
//! Which blocks a point may reuse. A point records the pool's snapshot clock `t_P`
//! such that every mapping it holds has time <= `t_P` and every mapping created after
//! it gets a later time: when the change itself mapped blocks at the current clock
//! value (writes since the last snapshot, or a restore), the clock is advanced inside
//! the change's transaction with a throw-away snapshot of a throw-away empty device
//! ([`capture`]). A data block a point needs is still the same allocation iff some
//! current mapping of it has time <= `t_P`: such a mapping existed before the point and
//! kept the block's count above zero ever since, so the block was never freed and
//! never handed out again. Blocks that fail the test were freed (count 0, hole-punched)
//! or reused; restore refuses. Blocks of writable volumes written in place since the
//! point hold their current bytes (like LVM's `vgcfgrestore`); snapshot blocks are
//! exact.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thinvol_engine::format::{DataBlock, ThinId, VBlock, MAX_THIN_ID, MAX_TIME};
use thinvol_engine::Tx;

use crate::bound::CatalogPool;
use crate::error::{io, CatalogError, Result};
use crate::model::Catalog;
use crate::store::sync_dir;

pub const ARCHIVE_DIR: &str = "archive";
pub const INDEX_FILE: &str = "index";
/// Environment variable that fixes the archive clock (Unix seconds), for tests.
pub const NOW_ENV: &str = "THINVOL_NOW";

const POINT_MAGIC: &[u8; 8] = b"TVPOINT1";
const INDEX_MAGIC: &[u8; 8] = b"TVARIDX1";
const POINT_VERSION: u64 = 1;
const HEADER_LEN: u64 = 64;
const SLOT_LEN: u64 = 160;
/// Bytes of the description kept in an index slot (the point file keeps all of it).
pub const DESC_MAX: usize = 106;
const DAY: u64 = 86_400;
/// Compaction threshold for the dead prefix of the index.
const COMPACT_MIN: u64 = 1024;

// ---------------------------------------------------------------------------
// Clock
// ---------------------------------------------------------------------------

type ClockFn = Box<dyn Fn() -> u64>;

thread_local! {
    static CLOCK: RefCell<Option<ClockFn>> = const { RefCell::new(None) };
}

/// Replace the archive clock of the calling thread (tests and benchmarks simulate the
/// passing of days with it); `None` restores the default.
pub fn set_clock(clock: Option<ClockFn>) {
    CLOCK.with(|c| *c.borrow_mut() = clock);
}

/// The archive's notion of now (Unix seconds): the thread's clock if set, else
/// `$THINVOL_NOW`, else the system clock.
pub fn now() -> u64 {
    if let Some(t) = CLOCK.with(|c| c.borrow().as_ref().map(|f| f())) {
        return t;
    }
    if let Some(t) = std::env::var(NOW_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return t;
    }
    crate::model::now()
}

// ---------------------------------------------------------------------------
// Varints
// ---------------------------------------------------------------------------

fn put_var(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn var(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.b.get(self.pos) else {
                return Err("truncated".into());
            };
            self.pos += 1;
            v |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 64 bits".into())
    }

    fn bytes(&mut self, n: u64) -> std::result::Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| "length overflows".to_string())?;
        let end = self.pos.checked_add(n).ok_or("length overflows")?;
        let s = self.b.get(self.pos..end).ok_or("truncated")?;
        self.pos = end;
        Ok(s)
    }
}

// ---------------------------------------------------------------------------
// Capture (inside the change's pool transaction)
// ---------------------------------------------------------------------------

/// The state a change is about to commit, taken inside its pool transaction.
pub struct Capture {
    catalog: Vec<u8>,
    /// Encoded devices: per device thin id, mapped blocks, run count, runs.
    body: Vec<u8>,
    pool_time: u32,
    devices: u32,
    mappings: u64,
    /// Why no point can be recorded for this change, if so.
    unusable: Option<String>,
}

/// Dump every catalogued device of `next` and make sure the pool clock moves past the
/// point (see the module doc). Called by `CatalogPool::change` after the change's
/// operations, inside its transaction. O(mappings); one buffer per call, none per block.
pub fn capture(next: &Catalog, tx: &mut Tx<'_>) -> Result<Capture> {
    let ids = next.thin_ids();
    let mut body = Vec::with_capacity(64 + 16 * ids.len());
    let mut runs = Vec::new();
    let mut mappings = 0u64;
    let mut max_time: Option<u32> = None;
    for &id in ids.keys() {
        let ms = tx.mappings(ThinId(id))?;
        mappings += ms.len() as u64;
        runs.clear();
        let (mut nr_runs, mut vb_end, mut db_end) = (0u64, 0u64, 0u64);
        let mut cur: Option<(u64, u64, u64)> = None;
        let mut flush = |r: (u64, u64, u64), runs: &mut Vec<u8>| {
            put_var(runs, r.0 - vb_end);
            put_var(runs, zigzag(r.1 as i64 - db_end as i64));
            put_var(runs, r.2);
            vb_end = r.0 + r.2;
            db_end = r.1 + r.2;
            nr_runs += 1;
        };
        for &(VBlock(vb), DataBlock(db), t) in &ms {
            max_time = Some(max_time.map_or(t, |m| m.max(t)));
            cur = match cur {
                Some((v, d, n)) if v + n == vb && d + n == db => Some((v, d, n + 1)),
                Some(r) => {
                    flush(r, &mut runs);
                    Some((vb, db, 1))
                }
                None => Some((vb, db, 1)),
            };
        }
        if let Some(r) = cur {
            flush(r, &mut runs);
        }
        put_var(&mut body, id);
        put_var(&mut body, ms.len() as u64);
        put_var(&mut body, nr_runs);
        body.extend_from_slice(&runs);
    }
    let catalog = serde_json::to_vec(next).map_err(|e| CatalogError::BadCatalog {
        path: "(restore point)".into(),
        reason: e.to_string(),
    })?;
    let c = tx.time();
    let mut unusable = None;
    let pool_time = match max_time {
        // Every mapping predates the current clock value: later ones get >= c.
        Some(m) if m < c => c - 1,
        None => c.saturating_sub(1),
        Some(_) => match advance_clock(tx)? {
            true => c,
            false => {
                unusable = Some(
                    "the pool's snapshot clock could not be advanced (clock exhausted or \
                     metadata full), so this point could not be told apart from later writes"
                        .to_string(),
                );
                c
            }
        },
    };
    Ok(Capture {
        catalog,
        body,
        pool_time,
        devices: ids.len() as u32,
        mappings,
        unusable,
    })
}

/// Move the pool's snapshot clock one step: snapshot a new empty device and delete
/// both. Nothing else changes (the origin's `snapshotted_time` is the throw-away
/// device's). False when the clock is exhausted or metadata is at its reserve.
fn advance_clock(tx: &mut Tx<'_>) -> Result<bool> {
    use thinvol_engine::Error as E;
    if tx.time() >= MAX_TIME {
        return Ok(false);
    }
    let mut free = (0..=MAX_THIN_ID)
        .rev()
        .map(ThinId)
        .filter(|&i| !tx.exists(i));
    let (Some(a), Some(b)) = (free.next(), free.next()) else {
        return Ok(false);
    };
    match tx.create_thin(a) {
        Ok(()) => {}
        Err(E::NoSpace(_)) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    if let Err(e) = tx.create_snap(b, a) {
        tx.delete(a)?;
        return match e {
            E::NoSpace(_) | E::InvalidArgument(_) => Ok(false),
            e => Err(e.into()),
        };
    }
    tx.delete(b)?;
    tx.delete(a)?;
    Ok(true)
}

// ---------------------------------------------------------------------------
// Index
// ---------------------------------------------------------------------------

/// One restore point as `history` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PointInfo {
    pub id: u64,
    /// Unix seconds.
    pub created: u64,
    /// The pool transaction id the point's catalog matches.
    pub transaction: u64,
    /// The pool's snapshot clock the point's mappings are not later than.
    pub pool_time: u32,
    pub devices: u32,
    pub mappings: u64,
    /// Size of the point file.
    pub bytes: u64,
    pub description: String,
}

fn truncate_desc(s: &str) -> &str {
    if s.len() <= DESC_MAX {
        return s;
    }
    let mut end = DESC_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn encode_slot(p: &PointInfo) -> [u8; SLOT_LEN as usize] {
    let mut s = [0u8; SLOT_LEN as usize];
    s[0..8].copy_from_slice(&p.id.to_le_bytes());
    s[8..16].copy_from_slice(&p.created.to_le_bytes());
    s[16..24].copy_from_slice(&p.transaction.to_le_bytes());
    s[24..28].copy_from_slice(&p.pool_time.to_le_bytes());
    s[28..32].copy_from_slice(&p.devices.to_le_bytes());
    s[32..40].copy_from_slice(&p.mappings.to_le_bytes());
    s[40..48].copy_from_slice(&p.bytes.to_le_bytes());
    let d = truncate_desc(&p.description).as_bytes();
    s[48..50].copy_from_slice(&(d.len() as u16).to_le_bytes());
    s[50..50 + d.len()].copy_from_slice(d);
    let crc = crc32c::crc32c(&s[..156]);
    s[156..160].copy_from_slice(&crc.to_le_bytes());
    s
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn decode_slot(s: &[u8]) -> Option<PointInfo> {
    if le32(s, 156) != crc32c::crc32c(&s[..156]) {
        return None;
    }
    let n = usize::from(u16::from_le_bytes([s[48], s[49]])).min(DESC_MAX);
    Some(PointInfo {
        id: le64(s, 0),
        created: le64(s, 8),
        transaction: le64(s, 16),
        pool_time: le32(s, 24),
        devices: le32(s, 28),
        mappings: le64(s, 32),
        bytes: le64(s, 40),
        description: String::from_utf8_lossy(&s[50..50 + n]).into_owned(),
    })
}

fn encode_header(base: u64, first: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(INDEX_MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&(SLOT_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&base.to_le_bytes());
    h[24..32].copy_from_slice(&first.to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

fn decode_header(h: &[u8]) -> Option<(u64, u64)> {
    (h.len() == HEADER_LEN as usize
        && &h[0..8] == INDEX_MAGIC
        && le32(h, 8) == 1
        && u64::from(le32(h, 12)) == SLOT_LEN
        && le32(h, 60) == crc32c::crc32c(&h[..60]))
    .then(|| (le64(h, 16), le64(h, 24)))
}

fn point_path(adir: &Path, id: u64) -> PathBuf {
    adir.join(format!("{id:012}.point"))
}

/// The open index of an archive directory.
struct Index {
    f: File,
    adir: PathBuf,
    base: u64,
    /// Oldest live point.
    first: u64,
    /// Id the next point gets.
    next: u64,
}

impl Index {
    /// Open (`write`: creating or repairing as needed). `Ok(None)`: no index, or a
    /// damaged one when not writing (the caller falls back to scanning point files).
    fn open(adir: &Path, write: bool) -> Result<Option<Index>> {
        let path = adir.join(INDEX_FILE);
        let f = if write {
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
        } else {
            match File::open(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                r => r,
            }
        }
        .map_err(io(format!("opening {}", path.display())))?;
        let len = f
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        if len == 0 && write {
            return Self::rebuild(adir, f).map(Some);
        }
        let mut h = [0u8; HEADER_LEN as usize];
        let header = if len >= HEADER_LEN {
            f.read_exact_at(&mut h, 0)
                .map_err(io(format!("reading {}", path.display())))?;
            decode_header(&h)
        } else {
            None
        };
        let Some((base, first)) = header else {
            return if write {
                Self::rebuild(adir, f).map(Some)
            } else {
                Ok(None)
            };
        };
        let mut n = (len - HEADER_LEN) / SLOT_LEN;
        // A crash during an append leaves a partial or unchecksummed last slot.
        if n > 0 {
            let mut s = [0u8; SLOT_LEN as usize];
            f.read_exact_at(&mut s, HEADER_LEN + (n - 1) * SLOT_LEN)
                .map_err(io(format!("reading {}", path.display())))?;
            if decode_slot(&s).is_none_or(|p| p.id != base + n - 1) {
                n -= 1;
            }
        }
        if write && len != HEADER_LEN + n * SLOT_LEN {
            f.set_len(HEADER_LEN + n * SLOT_LEN)
                .map_err(io(format!("truncating {}", path.display())))?;
        }
        let next = base + n;
        Ok(Some(Index {
            f,
            adir: adir.to_path_buf(),
            base,
            first: first.clamp(base, next),
            next,
        }))
    }

    /// Rebuild from the point files (a missing or damaged index): the only place that
    /// lists the directory.
    fn rebuild(adir: &Path, f: File) -> Result<Index> {
        let mut pts = scan_points(adir)?;
        pts.sort_by_key(|p| p.id);
        // Keep the newest contiguous run of ids: slots are positional.
        let mut start = pts.len();
        while start > 0 && (start == pts.len() || pts[start - 1].id + 1 == pts[start].id) {
            start -= 1;
        }
        let live = &pts[start..];
        let base = live
            .first()
            .map_or_else(|| pts.last().map_or(1, |p| p.id + 1), |p| p.id);
        let mut bytes = Vec::with_capacity(HEADER_LEN as usize + live.len() * SLOT_LEN as usize);
        bytes.extend_from_slice(&encode_header(base, base));
        for p in live {
            bytes.extend_from_slice(&encode_slot(p));
        }
        let path = adir.join(INDEX_FILE);
        f.set_len(0)
            .and_then(|()| f.write_all_at(&bytes, 0))
            .and_then(|()| f.sync_all())
            .map_err(io(format!("rebuilding {}", path.display())))?;
        // Point files outside the live run (older ids) are unreachable: remove them.
        for p in &pts[..start] {
            let _ = fs::remove_file(point_path(adir, p.id));
        }
        Ok(Index {
            f,
            adir: adir.to_path_buf(),
            base,
            first: base,
            next: base + live.len() as u64,
        })
    }

    fn read(&self, from: u64, to: u64) -> Result<Vec<PointInfo>> {
        if to <= from {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; ((to - from) * SLOT_LEN) as usize];
        self.f
            .read_exact_at(&mut buf, HEADER_LEN + (from - self.base) * SLOT_LEN)
            .map_err(io(format!(
                "reading {}",
                self.adir.join(INDEX_FILE).display()
            )))?;
        Ok(buf
            .chunks_exact(SLOT_LEN as usize)
            .zip(from..)
            .map(|(s, id)| {
                decode_slot(s)
                    .filter(|p| p.id == id)
                    .unwrap_or_else(|| PointInfo {
                        id,
                        created: 0,
                        transaction: 0,
                        pool_time: 0,
                        devices: 0,
                        mappings: 0,
                        bytes: 0,
                        description: "(damaged index slot)".into(),
                    })
            })
            .collect())
    }

    fn write_at(&self, bytes: &[u8], at: u64) -> Result<()> {
        self.f.write_all_at(bytes, at).map_err(io(format!(
            "writing {}",
            self.adir.join(INDEX_FILE).display()
        )))
    }

    fn sync(&self) -> Result<()> {
        self.f.sync_data().map_err(io(format!(
            "syncing {}",
            self.adir.join(INDEX_FILE).display()
        )))
    }

    /// Rewrite the index without the dead prefix.
    fn compact(&mut self) -> Result<()> {
        let live = self.read(self.first, self.next)?;
        let mut bytes = Vec::with_capacity(HEADER_LEN as usize + live.len() * SLOT_LEN as usize);
        bytes.extend_from_slice(&encode_header(self.first, self.first));
        for p in &live {
            bytes.extend_from_slice(&encode_slot(p));
        }
        let path = self.adir.join(INDEX_FILE);
        crate::store::write_atomic(&path, &bytes)?;
        self.f = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        self.base = self.first;
        Ok(())
    }
}

/// Point headers of every point file in `adir` (damaged files are skipped).
fn scan_points(adir: &Path) -> Result<Vec<PointInfo>> {
    let rd = match fs::read_dir(adir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("reading {}", adir.display()))(e)),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".point"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if let Ok(p) = read_point(adir, id) {
            out.push(p.info);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Recording and pruning
// ---------------------------------------------------------------------------

/// Record the point a committed change captured, then prune by the catalog's
/// retention settings. Called by `CatalogPool::change` after the catalog rename; a
/// failure here leaves the change committed (the caller turns it into a warning).
pub fn record(
    dir: &Path,
    catalog: &Catalog,
    block_size: u64,
    cap: Capture,
    what: &str,
) -> Result<u64> {
    if let Some(why) = cap.unusable {
        return Err(CatalogError::Refused { reason: why });
    }
    let adir = dir.join(ARCHIVE_DIR);
    if !adir.is_dir() {
        fs::create_dir_all(&adir).map_err(io(format!("creating {}", adir.display())))?;
        sync_dir(dir)?;
    }
    let mut ix = Index::open(&adir, true)?.expect("opened for writing");
    let id = ix.next;
    let created = now();

    // Retention, counting the new point: keep the newest retain_min, and every point
    // younger than retain_days; the new point itself always stays.
    let keep_min = u64::from(catalog.settings.retain_min).max(1);
    let max_age = u64::from(catalog.settings.retain_days) * DAY;
    let mut prune_to = ix.first;
    let mut live = id + 1 - ix.first;
    'scan: while live > keep_min && prune_to < id {
        let chunk = ix.read(prune_to, (prune_to + 64).min(id))?;
        for p in chunk {
            if live <= keep_min || created.saturating_sub(p.created) < max_age {
                break 'scan;
            }
            prune_to += 1;
            live -= 1;
        }
    }
    for pid in ix.first..prune_to {
        let p = point_path(&adir, pid);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", p.display()))(e)),
        }
    }

    // The point file.
    let desc = what.replace(['\n', '\r'], " ");
    let mut head = Vec::with_capacity(64 + desc.len() + cap.catalog.len());
    head.extend_from_slice(POINT_MAGIC);
    for v in [
        POINT_VERSION,
        id,
        created,
        catalog.transaction_id,
        u64::from(cap.pool_time),
        block_size,
        u64::from(cap.devices),
        cap.mappings,
    ] {
        put_var(&mut head, v);
    }
    put_var(&mut head, desc.len() as u64);
    head.extend_from_slice(desc.as_bytes());
    put_var(&mut head, cap.catalog.len() as u64);
    head.extend_from_slice(&cap.catalog);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &cap.body);
    let bytes = (head.len() + cap.body.len() + 4) as u64;
    let path = point_path(&adir, id);
    let tmp = adir.join(".point.tmp");
    {
        let mut f = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        f.write_all(&head)
            .and_then(|()| f.write_all(&cap.body))
            .and_then(|()| f.write_all(&crc.to_le_bytes()))
            .and_then(|()| f.sync_all())
            .map_err(io(format!("writing {}", tmp.display())))?;
    }
    fs::rename(&tmp, &path).map_err(io(format!("renaming {}", path.display())))?;
    // One directory sync covers the pruned files and the new point.
    sync_dir(&adir)?;

    let info = PointInfo {
        id,
        created,
        transaction: catalog.transaction_id,
        pool_time: cap.pool_time,
        devices: cap.devices,
        mappings: cap.mappings,
        bytes,
        description: desc,
    };
    ix.write_at(&encode_slot(&info), HEADER_LEN + (id - ix.base) * SLOT_LEN)?;
    ix.next = id + 1;
    if prune_to > ix.first {
        ix.first = prune_to;
        ix.write_at(&encode_header(ix.base, ix.first), 0)?;
    }
    ix.sync()?;
    if ix.first - ix.base >= COMPACT_MIN.max(ix.next - ix.first) {
        ix.compact()?;
    }
    Ok(id)
}

/// The live restore points of the pool in `dir`, oldest first. Reads only the index.
pub fn history(dir: &Path) -> Result<Vec<PointInfo>> {
    let adir = dir.join(ARCHIVE_DIR);
    match Index::open(&adir, false)? {
        Some(ix) => ix.read(ix.first, ix.next),
        None if adir.join(INDEX_FILE).exists() => {
            // Damaged index: list from the point files (the next change rebuilds it).
            let mut pts = scan_points(&adir)?;
            pts.sort_by_key(|p| p.id);
            Ok(pts)
        }
        None => Ok(Vec::new()),
    }
}

/// Number of live restore points, from the index header and length alone: O(1).
pub fn point_count(dir: &Path) -> Result<u64> {
    let adir = dir.join(ARCHIVE_DIR);
    Ok(match Index::open(&adir, false)? {
        Some(ix) => ix.next - ix.first,
        None => history(dir)?.len() as u64,
    })
}

/// Size and count of the archive of the pool in `dir` (bytes of live point files plus
/// the index, number of live points).
pub fn usage(dir: &Path) -> Result<(u64, u64)> {
    let h = history(dir)?;
    let index = fs::metadata(dir.join(ARCHIVE_DIR).join(INDEX_FILE)).map_or(0, |m| m.len());
    Ok((
        h.iter().map(|p| p.bytes).sum::<u64>() + index,
        h.len() as u64,
    ))
}

// ---------------------------------------------------------------------------
// Points
// ---------------------------------------------------------------------------

/// A run of consecutive virtual blocks mapped to consecutive data blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub vblock: u64,
    pub block: u64,
    pub len: u64,
}

#[derive(Clone, Debug)]
pub struct DeviceDump {
    pub thin_id: u64,
    pub mapped: u64,
    pub runs: Vec<Run>,
}

/// A restore point read back.
#[derive(Clone, Debug)]
pub struct Point {
    pub info: PointInfo,
    pub block_size: u64,
    pub catalog: Catalog,
    pub devices: Vec<DeviceDump>,
}

fn read_point(adir: &Path, id: u64) -> Result<Point> {
    let path = point_path(adir, id);
    let bytes = fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
    decode_point(&bytes).map_err(|reason| CatalogError::BadCatalog {
        path: path.display().to_string(),
        reason: format!("restore point {id} is damaged: {reason}"),
    })
}

fn decode_point(bytes: &[u8]) -> std::result::Result<Point, String> {
    if bytes.len() < 12 || &bytes[..8] != POINT_MAGIC {
        return Err("not a thinvol restore point".into());
    }
    let (data, tail) = bytes.split_at(bytes.len() - 4);
    if le32(tail, 0) != crc32c::crc32c(data) {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader { b: data, pos: 8 };
    let version = r.var()?;
    if version != POINT_VERSION {
        return Err(format!("unknown format version {version}"));
    }
    let id = r.var()?;
    let created = r.var()?;
    let transaction = r.var()?;
    let pool_time = u32::try_from(r.var()?).map_err(|_| "pool time out of range")?;
    let block_size = r.var()?;
    let devices = u32::try_from(r.var()?).map_err(|_| "device count out of range")?;
    let mappings = r.var()?;
    let n = r.var()?;
    let description = String::from_utf8_lossy(r.bytes(n)?).into_owned();
    let n = r.var()?;
    let catalog: Catalog =
        serde_json::from_slice(r.bytes(n)?).map_err(|e| format!("catalog: {e}"))?;
    let mut devs = Vec::with_capacity(devices as usize);
    for _ in 0..devices {
        let thin_id = r.var()?;
        let mapped = r.var()?;
        let nr = r.var()?;
        let mut runs = Vec::with_capacity(nr.min(1 << 20) as usize);
        let (mut vb_end, mut db_end) = (0u64, 0u64);
        for _ in 0..nr {
            let vb = vb_end.checked_add(r.var()?).ok_or("vblock overflow")?;
            let db = db_end
                .checked_add_signed(unzigzag(r.var()?))
                .ok_or("data block out of range")?;
            let len = r.var()?;
            vb_end = vb.checked_add(len).ok_or("run overflow")?;
            db_end = db.checked_add(len).ok_or("run overflow")?;
            runs.push(Run {
                vblock: vb,
                block: db,
                len,
            });
        }
        devs.push(DeviceDump {
            thin_id,
            mapped,
            runs,
        });
    }
    if r.pos != data.len() {
        return Err("trailing bytes".into());
    }
    Ok(Point {
        info: PointInfo {
            id,
            created,
            transaction,
            pool_time,
            devices,
            mappings,
            bytes: bytes.len() as u64,
            description,
        },
        block_size,
        catalog,
        devices: devs,
    })
}

/// Read restore point `id` of the pool in `dir` (must be live in the index).
pub fn load_point(dir: &Path, id: u64) -> Result<Point> {
    let adir = dir.join(ARCHIVE_DIR);
    let live = history(dir)?;
    if !live.iter().any(|p| p.id == id) {
        let hint = match (live.first(), live.last()) {
            (Some(a), Some(b)) => format!(
                " (the archive holds points {} to {}; see 'thinvol history')",
                a.id, b.id
            ),
            _ => " (the archive is empty)".to_string(),
        };
        return Err(CatalogError::NotFound {
            kind: "restore point",
            name: id.to_string(),
            hint,
        });
    }
    let p = read_point(&adir, id)?;
    if p.info.id != id {
        return Err(CatalogError::BadCatalog {
            path: point_path(&adir, id).display().to_string(),
            reason: format!("holds point {} instead of {id}", p.info.id),
        });
    }
    Ok(p)
}

// ---------------------------------------------------------------------------
// Restore
// ---------------------------------------------------------------------------

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct Restored {
    pub point: u64,
    /// The pool transaction the restore committed.
    pub transaction: u64,
    /// Names (`VOL`, `VOL@SNAP`) the pool has now.
    pub names: Vec<String>,
    /// Names the pool had before that the point does not have (devices kept under
    /// another name are not listed).
    pub removed: Vec<String>,
    /// Devices rebuilt from the dump (new thin ids).
    pub rebuilt: usize,
    /// Devices whose current mappings already equalled the point's (kept as they are).
    pub kept: usize,
    /// Mappings re-created.
    pub mappings: u64,
}

/// Data blocks a point needs, as merged ranges with a bit per block.
struct Needed {
    /// (start, end, rank of start).
    ranges: Vec<(u64, u64, u64)>,
    ok: Vec<u64>,
    total: u64,
}

impl Needed {
    fn new(devs: &[DeviceDump]) -> Needed {
        let mut r: Vec<(u64, u64)> = devs
            .iter()
            .flat_map(|d| d.runs.iter().map(|r| (r.block, r.block + r.len)))
            .collect();
        r.sort_unstable();
        let mut ranges: Vec<(u64, u64, u64)> = Vec::new();
        let mut total = 0;
        for (s, e) in r {
            match ranges.last_mut() {
                Some(last) if s <= last.1 => {
                    if e > last.1 {
                        total += e - last.1;
                        last.1 = e;
                    }
                }
                _ => {
                    ranges.push((s, e, total));
                    total += e - s;
                }
            }
        }
        Needed {
            ranges,
            ok: vec![0; total.div_ceil(64) as usize],
            total,
        }
    }

    fn rank(&self, b: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|r| r.0 <= b).checked_sub(1)?;
        let (s, e, k) = self.ranges[i];
        (b < e).then_some(k + b - s)
    }

    fn mark(&mut self, b: u64) {
        if let Some(k) = self.rank(b) {
            self.ok[(k / 64) as usize] |= 1 << (k % 64);
        }
    }

    fn is_ok(&self, b: u64) -> bool {
        self.rank(b)
            .is_some_and(|k| self.ok[(k / 64) as usize] & (1 << (k % 64)) != 0)
    }

    fn bad(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(|&(s, e, _)| s..e)
            .filter(|&b| !self.is_ok(b))
    }
}

fn same_mappings(ms: &[(VBlock, DataBlock, u32)], runs: &[Run]) -> bool {
    let mut it = ms.iter();
    for r in runs {
        for i in 0..r.len {
            match it.next() {
                Some(&(VBlock(v), DataBlock(d), _)) if v == r.vblock + i && d == r.block + i => {}
                _ => return false,
            }
        }
    }
    it.next().is_none()
}

/// Content digests and the content-hash cache (`POOLDIR/digests`, docs/design.md §13.5
/// rule 5) name snapshots by uuid and chunks by data block; a restore rebuilds devices
/// and changes which device maps which block, so it removes them before its transaction
/// commits rather than trust anything derived before it. They are derived data: the
/// next send or verify derives them again, and a crash after the removal leaves
/// nothing stale.
fn drop_derived_digests(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => dir.parent().map_or(Ok(()), sync_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing {}", dir.display()))(e)),
    }
}

/// Bring back the catalog and every device of restore point `point_id`, in one pool
/// transaction: devices whose current mappings equal the point's are kept, the others
/// are rebuilt (a new thin device mapping the recorded data blocks), every other current
/// device is deleted; the catalog becomes the point's (with the current settings and
/// the new thin ids) at transaction T+1. Refuses when a data block the point needs was
/// freed or reused since (see the module doc), or when a held snapshot would be lost.
pub fn restore(cp: &mut CatalogPool, point_id: u64) -> Result<Restored> {
    let point = load_point(&cp.dir, point_id)?;
    let pool = cp.name.clone();
    if point.block_size != cp.pool.block_size() {
        return Err(CatalogError::Refused {
            reason: format!(
                "restore point {point_id} was taken with {}-byte data blocks; the pool has {}",
                point.block_size,
                cp.pool.block_size()
            ),
        });
    }
    // Held snapshots must survive: refuse to drop one the point does not have.
    let kept_uuids: BTreeSet<&str> = point
        .catalog
        .volumes
        .values()
        .flat_map(|v| v.snapshots.values().map(|s| s.uuid.as_str()))
        .collect();
    let mut held = Vec::new();
    for (vn, v) in &cp.catalog.volumes {
        for (sn, s) in &v.snapshots {
            if !s.holds.is_empty() && !kept_uuids.contains(s.uuid.as_str()) {
                held.push(format!(
                    "'{pool}/{vn}@{sn}' is held ({}) and is not in point {point_id}; \
                     release it first ('thinvol release {pool}/{vn}@{sn}')",
                    s.holds.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    if !held.is_empty() {
        return Err(CatalogError::Refused {
            reason: held.join("; "),
        });
    }
    let restores_of = history(&cp.dir)?
        .into_iter()
        .filter(|p| {
            p.description
                .starts_with(&format!("restore point {point_id} "))
        })
        .map(|p| p.id)
        .collect::<Vec<_>>();
    let desc = format!(
        "restore point {point_id} ({} UTC, transaction {})",
        crate::listing::format_time_utc(point.info.created),
        point.info.transaction
    );
    let pt = point.info.pool_time;
    let names_before = cp.catalog.thin_ids();
    let mut kept_ids = BTreeSet::new();
    let point_names = point.catalog.thin_ids();
    let mut report = Restored {
        point: point_id,
        transaction: 0,
        names: point_names.values().cloned().collect(),
        removed: Vec::new(),
        rebuilt: 0,
        kept: 0,
        mappings: 0,
    };
    let digests = cp.dir.join("digests");
    cp.change_described(&desc, |c, tx| {
        let by_id: BTreeMap<u64, &DeviceDump> =
            point.devices.iter().map(|d| (d.thin_id, d)).collect();
        let mut needed = Needed::new(&point.devices);
        let mut keep = BTreeSet::new();
        let current = c.thin_ids();
        for &id in current.keys() {
            let ms = tx.mappings(ThinId(id))?;
            for &(_, DataBlock(b), t) in &ms {
                if t <= pt {
                    needed.mark(b);
                }
            }
            if by_id.get(&id).is_some_and(|d| same_mappings(&ms, &d.runs)) {
                keep.insert(id);
            }
        }
        let bad: Vec<u64> = needed.bad().collect();
        if !bad.is_empty() {
            let mut freed = 0u64;
            for &b in &bad {
                if tx.data_block_refs(DataBlock(b))? == 0 {
                    freed += 1;
                }
            }
            let mut per = Vec::new();
            for d in &point.devices {
                let n: u64 = d
                    .runs
                    .iter()
                    .flat_map(|r| r.block..r.block + r.len)
                    .filter(|&b| !needed.is_ok(b))
                    .count() as u64;
                if n > 0 {
                    let name = point_names.get(&d.thin_id).map_or("?", String::as_str);
                    per.push(format!("{pool}/{name} ({n} of {} blocks)", d.mapped));
                }
            }
            let hint = match restores_of.last() {
                Some(r) => format!(
                    " Point {point_id} was brought back before as point {r}: restore that one instead."
                ),
                None => format!(" Choose a newer point ('thinvol history {pool}')."),
            };
            return Err(CatalogError::Refused {
                reason: format!(
                    "cannot restore point {point_id}: {} of the {} data blocks it needs have \
                     since been freed ({freed}) or reused for other data ({}); these volumes \
                     would come back with wrong contents: {}.{hint}",
                    bad.len(),
                    needed.total,
                    bad.len() as u64 - freed,
                    per.join(", ")
                ),
            });
        }
        drop_derived_digests(&digests)?;
        // Rebuild what cannot be kept, then drop the rest (mapping first keeps every
        // needed block's count above zero throughout).
        let mut new_id = BTreeMap::new();
        for d in &point.devices {
            if keep.contains(&d.thin_id) {
                report.kept += 1;
                continue;
            }
            let id = c.alloc_thin_id()?;
            tx.create_thin(ThinId(id))?;
            for r in &d.runs {
                for i in 0..r.len {
                    tx.map_existing(ThinId(id), VBlock(r.vblock + i), DataBlock(r.block + i))?;
                }
            }
            report.rebuilt += 1;
            report.mappings += d.mapped;
            new_id.insert(d.thin_id, id);
        }
        for &id in current.keys() {
            if !keep.contains(&id) {
                tx.delete(ThinId(id))?;
            }
        }
        let remap = |id: u64| new_id.get(&id).copied().unwrap_or(id);
        let mut volumes = point.catalog.volumes.clone();
        for v in volumes.values_mut() {
            v.thin_id = remap(v.thin_id);
            for s in v.snapshots.values_mut() {
                s.thin_id = remap(s.thin_id);
            }
        }
        c.volumes = volumes;
        report.transaction = c.transaction_id;
        kept_ids = keep;
        Ok(())
    })?;
    // Names gone: not in the point, and not a kept device (that one only changed name).
    let after: BTreeSet<&String> = point_names.values().collect();
    report.removed = names_before
        .into_iter()
        .filter(|(id, n)| !after.contains(n) && !kept_ids.contains(id))
        .map(|(_, n)| n)
        .collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        let mut b = Vec::new();
        let vals = [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX];
        for v in vals {
            put_var(&mut b, v);
        }
        let mut r = Reader { b: &b, pos: 0 };
        for v in vals {
            assert_eq!(r.var().unwrap(), v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX, -12345] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn slots_round_trip() {
        let p = PointInfo {
            id: 7,
            created: 99,
            transaction: 12,
            pool_time: 3,
            devices: 2,
            mappings: 40,
            bytes: 1234,
            description: "é".repeat(80),
        };
        let s = encode_slot(&p);
        let q = decode_slot(&s).unwrap();
        assert_eq!(q.description, "é".repeat(53));
        assert_eq!(q.id, 7);
        let mut bad = s;
        bad[3] ^= 1;
        assert!(decode_slot(&bad).is_none());
    }

    #[test]
    fn needed_ranges() {
        let d = |runs: Vec<(u64, u64)>| DeviceDump {
            thin_id: 1,
            mapped: 0,
            runs: runs
                .into_iter()
                .map(|(b, len)| Run {
                    vblock: 0,
                    block: b,
                    len,
                })
                .collect(),
        };
        let mut n = Needed::new(&[d(vec![(10, 5), (30, 2)]), d(vec![(12, 6), (31, 3)])]);
        assert_eq!(n.total, 8 + 4);
        for b in [10, 11, 12, 17, 30, 33] {
            assert!(n.rank(b).is_some(), "{b}");
        }
        for b in [9, 18, 29, 34] {
            assert!(n.rank(b).is_none(), "{b}");
        }
        for b in 10..18 {
            n.mark(b);
        }
        n.mark(31);
        assert_eq!(n.bad().collect::<Vec<_>>(), vec![30, 32, 33]);
    }
}
