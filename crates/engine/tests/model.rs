//! Model-based tests: random operation sequences run against a pool on files and
//! against an in-memory model that knows every byte of every thin device.
//!
//! The model tracks, per device, which virtual blocks are mapped and to which abstract
//! "token" (a stand-in for a data block): snapshots share tokens, a write to a token
//! referenced once and mapped since the device was last snapshotted is done in place,
//! any other write that needs a block gets a fresh token (copy-on-write). Each token carries the exact contents of its block. That lets
//! the test check, besides every byte read back:
//! * the mapped virtual blocks and `mapped_blocks` of every device, device times and
//!   transaction ids, the pool's time, transaction id and used data blocks;
//! * sharing: tokens and data blocks are in bijection, a token never moves, and a block
//!   freed since the last commit is never handed out again before the next commit;
//! * `delta` lists exactly the blocks whose mappings differ, and every block it leaves
//!   out has identical contents on both sides;
//! * exactly when a write fails with `NoSpace(Data)` and how much of a multi-block
//!   write was done by then (a prefix of its blocks).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::{
    delta_runs, DeltaKind, DeltaRun, Error, OpenOptions, Pool, PoolConfig, SpaceKind,
};

const BS: u64 = 64 * 1024;
const BSU: usize = BS as usize;
const MAX_ID: u64 = (1 << 24) - 1;

// ---------------------------------------------------------------------------
// Contents
// ---------------------------------------------------------------------------

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Bytes a write with `stamp` puts at device byte offsets `abs..abs + out.len()`:
/// one 64-bit word per aligned 8 bytes, different for every stamp and position.
fn fill_pattern(stamp: u64, abs: u64, out: &mut [u8]) {
    let a = mix(stamp);
    let mut i = 0;
    while i < out.len() {
        let x = abs + i as u64;
        let w = a
            .wrapping_add((x >> 3).wrapping_mul(0xD6E8_FEB8_6659_FD93))
            .rotate_left((x >> 3) as u32 & 63)
            .to_le_bytes();
        let s = (x & 7) as usize;
        let n = (8 - s).min(out.len() - i);
        out[i..i + n].copy_from_slice(&w[s..s + n]);
        i += n;
    }
}

fn pattern(stamp: u64, abs: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(stamp, abs, &mut v);
    v
}

/// What a write puts down.
#[derive(Clone, Copy, Debug)]
enum Src {
    Pattern(u64),
    Zero,
}

/// Exact contents of one data block.
#[derive(Clone, Debug)]
enum Content {
    Zero,
    /// `fill_pattern(stamp, base + i)` at block offset i (a whole-block write at
    /// device offset `base`).
    Pattern {
        stamp: u64,
        base: u64,
    },
    Bytes(Box<[u8]>),
}

impl Content {
    fn read(&self, off: usize, out: &mut [u8]) {
        match self {
            Content::Zero => out.fill(0),
            Content::Pattern { stamp, base } => fill_pattern(*stamp, base + off as u64, out),
            Content::Bytes(b) => out.copy_from_slice(&b[off..off + out.len()]),
        }
    }

    fn apply(&mut self, vb: u64, off: usize, n: usize, src: Src) {
        if off == 0 && n == BSU {
            *self = match src {
                Src::Pattern(s) => Content::Pattern {
                    stamp: s,
                    base: vb * BS,
                },
                Src::Zero => Content::Zero,
            };
            return;
        }
        let mut b = match std::mem::replace(self, Content::Zero) {
            Content::Bytes(b) => b,
            other => {
                let mut v = vec![0u8; BSU].into_boxed_slice();
                other.read(0, &mut v);
                v
            }
        };
        match src {
            Src::Pattern(s) => fill_pattern(s, vb * BS + off as u64, &mut b[off..off + n]),
            Src::Zero => b[off..off + n].fill(0),
        }
        *self = Content::Bytes(b);
    }
}

/// (virtual block, offset in block, length) pieces of a byte range.
fn segments(off: u64, len: u64) -> Vec<(u64, usize, usize)> {
    let mut v = Vec::new();
    let mut pos = off;
    let end = off + len;
    while pos < end {
        let vb = pos / BS;
        let o = pos % BS;
        let n = (BS - o).min(end - pos);
        v.push((vb, o as usize, n as usize));
        pos += n;
    }
    v
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Tok {
    content: Content,
    refs: u32,
    /// Pool time when the mapping was inserted (shared by all sharers).
    time: u32,
}

#[derive(Clone, Debug)]
struct Dev {
    map: BTreeMap<u64, u64>,
    creation_time: u32,
    snap_time: u32,
    trans: u64,
}

/// Errors the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    NoSpace(SpaceKind),
    Exists(u64),
    NoSuch(u64),
    BadId(u64),
    TransMismatch,
}

fn matches_expect(e: &Error, x: Expect) -> bool {
    match (e, x) {
        (Error::NoSpace(a), Expect::NoSpace(b)) => *a == b,
        (Error::DeviceExists(a), Expect::Exists(b)) => a.0 == b,
        (Error::NoSuchDevice(a), Expect::NoSuch(b)) => a.0 == b,
        (Error::BadDeviceId(a), Expect::BadId(b)) => a.0 == b,
        (Error::TransactionIdMismatch { .. }, Expect::TransMismatch) => true,
        _ => false,
    }
}

#[derive(Debug)]
struct Model {
    nr_data_blocks: u64,
    devs: BTreeMap<u64, Dev>,
    toks: HashMap<u64, Tok>,
    next_tok: u64,
    time: u32,
    trans: u64,
    /// Metadata changed since the last commit.
    dirty: bool,
    /// Tokens alive at the last commit (their blocks cannot be reused before the next).
    pinned: HashSet<u64>,
    /// Pinned tokens that died since (still occupying a block).
    dead_pinned: u64,
    /// Data blocks of dead pinned tokens, where known.
    dead_pinned_blocks: HashSet<u64>,
    /// Data block of each live token, learned from the pool.
    loc: HashMap<u64, u64>,
    /// The pool commits by itself when a write finds no allocatable block (as the
    /// kernel's `alloc_data_block` does), making blocks freed since usable.
    commit_on_full: bool,
    auto_commits: usize,
    /// Check that blocks freed since the last commit are not reused. Off where the pool
    /// commits at moments the model cannot see (metadata nearly full).
    check_reuse: bool,
    /// Blocks the last `write` wrote in place / gave a new data block.
    last_in_place: Vec<u64>,
    last_fresh: Vec<u64>,
}

impl Model {
    fn new(nr_data_blocks: u64) -> Self {
        Model {
            nr_data_blocks,
            devs: BTreeMap::new(),
            toks: HashMap::new(),
            next_tok: 1,
            time: 0,
            trans: 0,
            dirty: false,
            pinned: HashSet::new(),
            dead_pinned: 0,
            dead_pinned_blocks: HashSet::new(),
            loc: HashMap::new(),
            commit_on_full: true,
            auto_commits: 0,
            check_reuse: true,
            last_in_place: Vec::new(),
            last_fresh: Vec::new(),
        }
    }

    fn commit_point(&mut self) {
        self.pinned = self.toks.keys().copied().collect();
        self.dead_pinned = 0;
        self.dead_pinned_blocks.clear();
        self.dirty = false;
    }

    fn allocatable(&self) -> u64 {
        self.nr_data_blocks - self.toks.len() as u64 - self.dead_pinned
    }

    fn can_alloc(&mut self) -> bool {
        if self.allocatable() == 0 && self.commit_on_full && self.dirty {
            self.commit_point();
            self.auto_commits += 1;
        }
        self.allocatable() > 0
    }

    fn dec(&mut self, t: u64) {
        let tok = self.toks.get_mut(&t).expect("live token");
        tok.refs -= 1;
        if tok.refs == 0 {
            self.toks.remove(&t);
            let b = self.loc.remove(&t);
            if self.pinned.contains(&t) {
                self.dead_pinned += 1;
                if let Some(b) = b {
                    self.dead_pinned_blocks.insert(b);
                }
            }
        }
    }

    fn create(&mut self, id: u64) -> Result<(), Expect> {
        if id > MAX_ID {
            return Err(Expect::BadId(id));
        }
        if self.devs.contains_key(&id) {
            return Err(Expect::Exists(id));
        }
        self.devs.insert(
            id,
            Dev {
                map: BTreeMap::new(),
                creation_time: self.time,
                snap_time: self.time,
                trans: self.trans,
            },
        );
        self.dirty = true;
        Ok(())
    }

    fn snap_unchecked(&mut self, id: u64, origin: u64) {
        self.time += 1;
        let o = self.devs.get_mut(&origin).unwrap();
        o.snap_time = self.time;
        let map = o.map.clone();
        for t in map.values() {
            self.toks.get_mut(t).unwrap().refs += 1;
        }
        self.devs.insert(
            id,
            Dev {
                map,
                creation_time: self.time,
                snap_time: self.time,
                trans: self.trans,
            },
        );
        self.dirty = true;
    }

    fn snaps(&mut self, pairs: &[(u64, u64)]) -> Result<(), Expect> {
        for (i, &(id, origin)) in pairs.iter().enumerate() {
            if id > MAX_ID {
                return Err(Expect::BadId(id));
            }
            if self.devs.contains_key(&id) || pairs[..i].iter().any(|p| p.0 == id) {
                return Err(Expect::Exists(id));
            }
            if !self.devs.contains_key(&origin) {
                return Err(Expect::NoSuch(origin));
            }
        }
        for &(id, origin) in pairs {
            self.snap_unchecked(id, origin);
        }
        Ok(())
    }

    fn delete(&mut self, id: u64) -> Result<(), Expect> {
        let d = self.devs.remove(&id).ok_or(Expect::NoSuch(id))?;
        for t in d.map.values() {
            self.dec(*t);
        }
        self.dirty = true;
        Ok(())
    }

    /// A write (`Src::Pattern`) or discard (`Src::Zero`) of a byte range, block by
    /// block in order, stopping at the first block that finds no free data block.
    fn write(&mut self, id: u64, off: u64, len: u64, src: Src) -> Result<(), Expect> {
        self.last_in_place.clear();
        self.last_fresh.clear();
        if !self.devs.contains_key(&id) {
            return Err(Expect::NoSuch(id));
        }
        for (vb, o, n) in segments(off, len) {
            let cur = self.devs[&id].map.get(&vb).copied();
            if let Src::Zero = src {
                if n == BSU {
                    if let Some(t) = cur {
                        self.devs.get_mut(&id).unwrap().map.remove(&vb);
                        self.dec(t);
                        self.dirty = true;
                    }
                    continue;
                }
                if cur.is_none() {
                    continue;
                }
            }
            match cur {
                // In place only when no other mapping shares the block and it was
                // mapped after the device was last snapshotted (the kernel's
                // `__snapshotted_since`: the last commit may still share older blocks).
                Some(t)
                    if self.toks[&t].refs == 1
                        && self.toks[&t].time >= self.devs[&id].snap_time =>
                {
                    self.toks.get_mut(&t).unwrap().content.apply(vb, o, n, src);
                    self.last_in_place.push(vb);
                }
                _ => {
                    if !self.can_alloc() {
                        return Err(Expect::NoSpace(SpaceKind::Data));
                    }
                    let mut content = match cur {
                        Some(t) if !(o == 0 && n == BSU) => self.toks[&t].content.clone(),
                        _ => Content::Zero,
                    };
                    content.apply(vb, o, n, src);
                    let nt = self.next_tok;
                    self.next_tok += 1;
                    self.toks.insert(
                        nt,
                        Tok {
                            content,
                            refs: 1,
                            time: self.time,
                        },
                    );
                    self.devs.get_mut(&id).unwrap().map.insert(vb, nt);
                    if let Some(t) = cur {
                        self.dec(t);
                    }
                    self.dirty = true;
                    self.last_fresh.push(vb);
                }
            }
        }
        Ok(())
    }

    fn read(&self, id: u64, off: u64, out: &mut [u8]) {
        let map = &self.devs[&id].map;
        let mut done = 0;
        for (vb, o, n) in segments(off, out.len() as u64) {
            let seg = &mut out[done..done + n];
            done += n;
            match map.get(&vb) {
                Some(t) => self.toks[t].content.read(o, seg),
                None => seg.fill(0),
            }
        }
    }

    fn set_trans(&mut self, old: u64, new: u64) -> Result<(), Expect> {
        if old != self.trans {
            return Err(Expect::TransMismatch);
        }
        self.trans = new;
        self.dirty = true;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Harness: pool + model + the checks
// ---------------------------------------------------------------------------

struct Harness {
    _tmp: tempfile::TempDir,
    path: PathBuf,
    pool: Option<Pool>,
    m: Model,
    /// Device size used by the workload (bytes).
    vsize: u64,
    max_devs: usize,
    /// Longest aligned write or discard, in blocks.
    max_run: u64,
    next_small_id: u64,
    stamp: u64,
    step: usize,
    /// Accept `NoSpace(Metadata)` from single-block operations (metadata-full tests).
    allow_meta_full: bool,
    meta_full_hits: usize,
    /// Writes/discards that failed with NoSpace(Data), as predicted.
    data_full_hits: usize,
}

/// A directory for pool files: on tmpfs when there is one (commits fsync, and on a
/// shared disk that dominates the run time), else the default temp dir.
fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    shm.is_dir()
        .then(|| {
            tempfile::Builder::new()
                .prefix("thinvol-model-")
                .tempdir_in(shm)
                .ok()
        })
        .flatten()
        .unwrap_or_else(|| tempfile::tempdir().unwrap())
}

fn open_opts() -> OpenOptions {
    OpenOptions {
        commit_interval: Duration::ZERO,
        ..Default::default()
    }
}

impl Harness {
    fn new(nr_data_blocks: u64, metadata_size: Option<u64>, vblocks: u64, max_devs: usize) -> Self {
        let tmp = scratch_dir();
        let path = tmp.path().join("pool");
        let pool = Pool::create(
            &path,
            &PoolConfig {
                data_block_size: DataBlockSize::from_bytes(BS).unwrap(),
                data_size: nr_data_blocks * BS,
                metadata_size,
                commit_interval: Duration::ZERO,
            },
        )
        .unwrap();
        Harness {
            _tmp: tmp,
            path,
            pool: Some(pool),
            m: Model::new(nr_data_blocks),
            vsize: vblocks * BS,
            max_devs,
            max_run: 4,
            next_small_id: 0,
            stamp: 0,
            step: 0,
            allow_meta_full: false,
            meta_full_hits: 0,
            data_full_hits: 0,
        }
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().unwrap()
    }

    fn ctx(&self) -> String {
        format!("step {}", self.step)
    }

    /// Compare an engine result with the model's prediction.
    #[track_caller]
    fn agree(&mut self, what: &str, got: thinvol_engine::Result<()>, want: Result<(), Expect>) {
        if let Err(Error::NoSpace(SpaceKind::Data)) = got {
            self.data_full_hits += 1;
        }
        match (&got, want) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(x)) if matches_expect(e, x) => {}
            _ => panic!(
                "{}: {what}: engine returned {got:?}, model expected {want:?}",
                self.ctx()
            ),
        }
    }

    fn dev_ids(&self) -> Vec<u64> {
        self.m.devs.keys().copied().collect()
    }

    fn pick_dev(&self, a: u64) -> Option<u64> {
        let ids = self.dev_ids();
        (!ids.is_empty()).then(|| ids[(a % ids.len() as u64) as usize])
    }

    fn fresh_id(&mut self, a: u64) -> u64 {
        if a & 3 == 0 {
            let id = (a >> 2) % (MAX_ID + 1);
            if !self.m.devs.contains_key(&id) {
                return id;
            }
        }
        if a & 3 == 1 {
            let id = MAX_ID - (a >> 2) % 4;
            if !self.m.devs.contains_key(&id) {
                return id;
            }
        }
        while self.m.devs.contains_key(&self.next_small_id) {
            self.next_small_id += 1;
        }
        self.next_small_id
    }

    fn range(&self, b: u64, c: u64) -> (u64, u64) {
        let vs = self.vsize;
        let nb = vs / BS;
        let r = c >> 8;
        let (off, len) = match c % 6 {
            0 => (b % vs, 1 + r % 512),
            1 => (b % vs, 1 + r % BS),
            2 => (b % vs, 1 + r % (4 * BS)),
            3 => ((b % nb) * BS, (1 + r % self.max_run) * BS),
            4 => ((b % nb) * BS + r % BS, BS),
            _ => ((b % nb) * BS, BS),
        };
        (off, len.min(vs - off))
    }

    // ---- operations (each runs on the pool and the model and compares) ----

    fn create(&mut self, id: u64) -> thinvol_engine::Result<()> {
        let got = self.pool().create_thin(ThinId(id));
        if self.meta_full(&got) {
            return got;
        }
        let want = self.m.create(id);
        self.agree(&format!("create_thin({id})"), clone_res(&got), want);
        got
    }

    fn snaps(&mut self, pairs: &[(u64, u64)]) -> thinvol_engine::Result<()> {
        let tp: Vec<(ThinId, ThinId)> =
            pairs.iter().map(|&(a, b)| (ThinId(a), ThinId(b))).collect();
        let got = if pairs.len() == 1 {
            self.pool().create_snap(tp[0].0, tp[0].1)
        } else {
            self.pool().create_snaps(&tp)
        };
        if self.meta_full(&got) {
            return got;
        }
        let want = self.m.snaps(pairs);
        self.agree(&format!("create_snaps({pairs:?})"), clone_res(&got), want);
        got
    }

    fn delete(&mut self, id: u64) -> thinvol_engine::Result<()> {
        let got = self.pool().delete_thin(ThinId(id));
        let want = self.m.delete(id);
        self.agree(&format!("delete_thin({id})"), clone_res(&got), want);
        got
    }

    fn write(&mut self, id: u64, off: u64, len: u64) -> thinvol_engine::Result<()> {
        self.stamp += 1;
        let stamp = self.stamp ^ 0x5157_0000_0000;
        let buf = pattern(stamp, off, len as usize);
        let before = self.block_range(id, off, len);
        let got = self.pool().write(ThinId(id), off, &buf);
        if self.meta_full(&got) {
            assert_eq!(
                segments(off, len).len(),
                1,
                "{}: NoSpace(Metadata) mid-write",
                self.ctx()
            );
            return got;
        }
        let want = self.m.write(id, off, len, Src::Pattern(stamp));
        self.agree(&format!("write({id}, {off}, {len})"), clone_res(&got), want);
        self.check_placement(id, off, len, &before);
        got
    }

    fn block_range(&self, id: u64, off: u64, len: u64) -> BTreeMap<u64, u64> {
        if !self.m.devs.contains_key(&id) {
            return BTreeMap::new();
        }
        self.pool()
            .mappings_range(ThinId(id), off / BS, (off + len).div_ceil(BS))
            .unwrap()
            .into_iter()
            .map(|(v, b)| (v.0, b.0))
            .collect()
    }

    /// The blocks the model wrote in place kept their data block; those it gave a new
    /// token got a different one (copy-on-write or provisioning).
    fn check_placement(&self, id: u64, off: u64, len: u64, before: &BTreeMap<u64, u64>) {
        let after = self.block_range(id, off, len);
        for vb in &self.m.last_in_place {
            assert_eq!(
                after.get(vb),
                before.get(vb),
                "{}: device {id} vblock {vb} should have been written in place",
                self.ctx()
            );
        }
        for vb in &self.m.last_fresh {
            assert!(
                after.contains_key(vb),
                "{}: vblock {vb} not mapped",
                self.ctx()
            );
            assert_ne!(
                after.get(vb),
                before.get(vb),
                "{}: device {id} vblock {vb} should have been copied, not written in place",
                self.ctx()
            );
        }
    }

    fn discard(&mut self, id: u64, off: u64, len: u64) -> thinvol_engine::Result<()> {
        let before = self.block_range(id, off, len);
        let got = self.pool().discard(ThinId(id), off, len);
        if self.meta_full(&got) {
            assert_eq!(
                segments(off, len).len(),
                1,
                "{}: NoSpace(Metadata) mid-discard",
                self.ctx()
            );
            return got;
        }
        let want = self.m.write(id, off, len, Src::Zero);
        self.agree(
            &format!("discard({id}, {off}, {len})"),
            clone_res(&got),
            want,
        );
        self.check_placement(id, off, len, &before);
        got
    }

    fn meta_full(&mut self, r: &thinvol_engine::Result<()>) -> bool {
        if self.allow_meta_full && matches!(r, Err(Error::NoSpace(SpaceKind::Metadata))) {
            self.meta_full_hits += 1;
            true
        } else {
            false
        }
    }

    fn commit(&mut self) {
        self.pool().commit().unwrap();
        self.m.commit_point();
        self.learn();
    }

    fn reopen(&mut self, by_drop: bool) {
        let pool = self.pool.take().unwrap();
        if by_drop {
            drop(pool);
        } else {
            pool.close().unwrap();
        }
        self.pool = Some(Pool::open_with(&self.path, &open_opts()).unwrap());
        self.m.commit_point();
        self.learn();
    }

    fn check(&mut self) {
        let rep = self.pool().check().unwrap();
        self.m.commit_point();
        assert!(
            rep.is_clean(),
            "{}: pool.check() found problems: {:?}",
            self.ctx(),
            &rep.problems[..rep.problems.len().min(20)]
        );
        assert_eq!(rep.devices, self.m.devs.len(), "{}", self.ctx());
        let maps: u64 = self.m.devs.values().map(|d| d.map.len() as u64).sum();
        assert_eq!(rep.mappings, maps, "{}: checker mapping count", self.ctx());
        assert_eq!(
            rep.data_blocks_referenced,
            self.m.toks.len() as u64,
            "{}: checker data block count",
            self.ctx()
        );
        self.learn();
    }

    /// Compare devices, mappings and pool status with the model; learn where new
    /// tokens live and check the sharing structure.
    fn learn(&mut self) {
        let ctx = self.ctx();
        let pool = self.pool.as_ref().unwrap();
        let devs = pool.devices().unwrap();
        let got: Vec<(u64, u64, u64, u32, u32)> = devs
            .iter()
            .map(|d| {
                (
                    d.id.0,
                    d.mapped_blocks,
                    d.transaction_id,
                    d.creation_time,
                    d.snapshotted_time,
                )
            })
            .collect();
        let want: Vec<(u64, u64, u64, u32, u32)> = self
            .m
            .devs
            .iter()
            .map(|(&id, d)| {
                (
                    id,
                    d.map.len() as u64,
                    d.trans,
                    d.creation_time,
                    d.snap_time,
                )
            })
            .collect();
        assert_eq!(
            got, want,
            "{ctx}: devices (id, mapped, trans, ctime, stime)"
        );
        let mut owner: HashMap<u64, u64> = HashMap::new();
        for (&id, d) in &self.m.devs {
            let maps = pool.mappings(ThinId(id)).unwrap();
            let keys: Vec<u64> = maps.iter().map(|m| m.0 .0).collect();
            let want_keys: Vec<u64> = d.map.keys().copied().collect();
            assert_eq!(keys, want_keys, "{ctx}: mapped blocks of device {id}");
            for (vb, db) in maps {
                let db = db.0;
                assert!(
                    db < self.m.nr_data_blocks,
                    "{ctx}: data block {db} out of range"
                );
                let t = d.map[&vb.0];
                match self.m.loc.get(&t) {
                    Some(&b) => assert_eq!(
                        b, db,
                        "{ctx}: dev {id} vblock {}: token {t} moved from data block {b} to {db}",
                        vb.0
                    ),
                    None => {
                        assert!(
                            !self.m.check_reuse || !self.m.dead_pinned_blocks.contains(&db),
                            "{ctx}: data block {db} freed since the last commit was reused \
                             (dev {id} vblock {})",
                            vb.0
                        );
                        self.m.loc.insert(t, db);
                    }
                }
                if let Some(&o) = owner.get(&db) {
                    assert_eq!(
                        o, t,
                        "{ctx}: data block {db} holds two different contents (tokens {o} and {t}); \
                         dev {id} vblock {}",
                        vb.0
                    );
                }
                owner.insert(db, t);
            }
        }
        assert_eq!(
            owner.len(),
            self.m.toks.len(),
            "{ctx}: tokens vs data blocks"
        );
        let st = pool.status().unwrap();
        assert_eq!(
            st.data_blocks_used,
            self.m.toks.len() as u64,
            "{ctx}: data_blocks_used"
        );
        assert_eq!(st.data_blocks_total, self.m.nr_data_blocks, "{ctx}");
        assert_eq!(st.time, self.m.time, "{ctx}: pool time");
        assert_eq!(st.transaction_id, self.m.trans, "{ctx}: transaction id");
        assert_eq!(st.devices, self.m.devs.len(), "{ctx}");
    }

    fn verify_range(&self, id: u64, off: u64, len: u64) {
        let mut got = vec![0u8; len as usize];
        self.pool().read(ThinId(id), off, &mut got).unwrap();
        let mut want = vec![0u8; len as usize];
        self.m.read(id, off, &mut want);
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            let at = off + i as u64;
            panic!(
                "{}: device {id} differs from the model at byte {at} (vblock {}, offset {}): \
                 got {:#04x}, want {:#04x}; mapping now {:?}",
                self.ctx(),
                at / BS,
                at % BS,
                got[i],
                want[i],
                self.m.devs[&id].map.get(&(at / BS))
            );
        }
    }

    /// Read every device completely (its workload range plus one block past it).
    fn verify_all_data(&self) {
        let chunk = 1 << 20;
        for id in self.dev_ids() {
            let end = self.vsize + BS;
            let mut off = 0;
            while off < end {
                let n = chunk.min(end - off);
                self.verify_range(id, off, n);
                off += n;
            }
        }
    }

    /// `delta(a, b)` against mappings and the model, with and without `same`.
    fn verify_delta(&self, a: u64, b: u64) {
        let ctx = self.ctx();
        let pool = self.pool();
        let ma: BTreeMap<u64, u64> = pool
            .mappings(ThinId(a))
            .unwrap()
            .into_iter()
            .map(|(v, d)| (v.0, d.0))
            .collect();
        let mb: BTreeMap<u64, u64> = pool
            .mappings(ThinId(b))
            .unwrap()
            .into_iter()
            .map(|(v, d)| (v.0, d.0))
            .collect();
        let keys: BTreeSet<u64> = ma.keys().chain(mb.keys()).copied().collect();
        let (d, _) = pool.delta(ThinId(a), ThinId(b), false).unwrap();
        let listed: Vec<u64> = d.iter().map(|x| x.vblock).collect();
        let want: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|k| ma.get(k) != mb.get(k))
            .collect();
        assert_eq!(listed, want, "{ctx}: delta({a}, {b}) vs mappings");
        let (ta, tb) = (&self.m.devs[&a].map, &self.m.devs[&b].map);
        let want_model: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|k| ta.get(k) != tb.get(k))
            .collect();
        assert_eq!(
            listed, want_model,
            "{ctx}: delta({a}, {b}) vs model sharing"
        );
        for x in &d {
            assert_eq!(x.left.map(|v| v.0), ma.get(&x.vblock).copied(), "{ctx}");
            assert_eq!(x.right.map(|v| v.0), mb.get(&x.vblock).copied(), "{ctx}");
        }
        // Blocks not listed hold the same bytes on both sides (model and pool).
        let listed: HashSet<u64> = listed.into_iter().collect();
        let mut pa = vec![0u8; BSU];
        let mut pb = vec![0u8; BSU];
        let mut checked = 0;
        for &k in keys.iter().filter(|k| !listed.contains(k)) {
            self.m.read(a, k * BS, &mut pa);
            self.m.read(b, k * BS, &mut pb);
            assert!(
                pa == pb,
                "{ctx}: delta({a}, {b}) omits vblock {k} but model contents differ"
            );
            if checked < 16 {
                checked += 1;
                pool.read(ThinId(a), k * BS, &mut pa).unwrap();
                pool.read(ThinId(b), k * BS, &mut pb).unwrap();
                assert!(
                    pa == pb,
                    "{ctx}: delta({a}, {b}) omits vblock {k} but pool contents differ"
                );
            }
        }
        // include_same: every block mapped on either side, coalesced like thin_delta.
        let (all, _) = pool.delta(ThinId(a), ThinId(b), true).unwrap();
        let allk: Vec<u64> = all.iter().map(|x| x.vblock).collect();
        assert_eq!(
            allk,
            keys.iter().copied().collect::<Vec<_>>(),
            "{ctx}: delta include_same"
        );
        assert_eq!(
            delta_runs(&all),
            runs_from_maps(&ma, &mb),
            "{ctx}: delta_runs"
        );
    }

    // ---- random driver ----

    fn random_step(&mut self, op: (u8, u64, u64, u64)) {
        self.step += 1;
        let (k, a, b, c) = op;
        let mut k = k % 100;
        if self.m.devs.is_empty() && !(79..87).contains(&k) {
            k = 55;
        }
        match k {
            0..=39 => {
                let id = self.pick_dev(a).unwrap();
                let (off, len) = self.range(b, c);
                let _ = self.write(id, off, len);
            }
            40..=54 => {
                let id = self.pick_dev(a).unwrap();
                let (off, len) = self.range(b, c);
                let _ = self.discard(id, off, len);
            }
            55..=61 => {
                if self.m.devs.len() < self.max_devs {
                    let id = self.fresh_id(a);
                    self.create(id).unwrap();
                } else {
                    let id = self.pick_dev(a).unwrap();
                    let _ = self.create(id);
                }
            }
            62..=73 => {
                let n = if k < 70 { 1 } else { 2 + (c % 3) as usize };
                let n = n.min(self.max_devs.saturating_sub(self.m.devs.len()));
                if n == 0 {
                    return;
                }
                let mut pairs = Vec::new();
                let mut x = a;
                for i in 0..n {
                    let origin = self
                        .pick_dev(b.wrapping_add((i as u64).wrapping_mul(c | 1)))
                        .unwrap();
                    let mut id = self.fresh_id(x);
                    while pairs.iter().any(|p: &(u64, u64)| p.0 == id) {
                        self.next_small_id += 1;
                        id = self.fresh_id(2);
                    }
                    pairs.push((id, origin));
                    x = mix(x);
                }
                self.snaps(&pairs).unwrap();
            }
            74..=78 => {
                if self.m.devs.len() > 1 || a % 4 == 0 {
                    let id = self.pick_dev(a).unwrap();
                    self.delete(id).unwrap();
                }
            }
            79..=83 => self.commit(),
            84..=86 => {
                self.reopen(a % 3 == 0);
                if a % 2 == 0 && self.vsize <= 64 * BS {
                    self.verify_all_data();
                } else {
                    // Big devices: sample each one after reopening.
                    let mut x = b;
                    for id in self.dev_ids() {
                        for _ in 0..4 {
                            x = mix(x);
                            let off = x % self.vsize;
                            self.verify_range(id, off, (2 * BS).min(self.vsize - off));
                        }
                    }
                }
            }
            87..=91 => {
                let x = self.pick_dev(a).unwrap();
                let y = self.pick_dev(b).unwrap();
                self.verify_delta(x, y);
            }
            92..=94 => {
                let id = self.pick_dev(a).unwrap();
                let off = b % (self.vsize + BS);
                let len = (1 + c % (3 * BS)).min(self.vsize + BS - off);
                self.verify_range(id, off, len);
            }
            95..=96 => self.check(),
            97..=98 => {
                let t = self.m.trans;
                let old = if a % 4 == 0 { t + 1 + a % 7 } else { t };
                let new = t + 1 + (b % 5);
                let got = self.pool().set_transaction_id(old, new);
                let want = self.m.set_trans(old, new);
                self.agree("set_transaction_id", got, want);
            }
            _ => self.error_probes(a, b),
        }
    }

    /// Operations that must fail and change nothing.
    fn error_probes(&mut self, a: u64, b: u64) {
        let missing = (0..)
            .map(|i| (a + i) % (MAX_ID + 1))
            .find(|i| !self.m.devs.contains_key(i))
            .unwrap();
        let existing = self.pick_dev(b).unwrap();
        match a % 9 {
            0 => {
                let _ = self.create(existing);
            }
            1 => {
                let _ = self.create(MAX_ID + 1 + a % 100);
            }
            2 => {
                let _ = self.snaps(&[(existing, existing)]);
            }
            3 => {
                let _ = self.snaps(&[(missing, missing.wrapping_add(1) % (MAX_ID + 1))]);
            }
            4 => {
                let _ = self.delete(missing);
            }
            5 => {
                let _ = self.write(missing, 0, 10);
                let _ = self.discard(missing, 0, BS);
                let mut buf = [0u8; 10];
                assert!(matches!(
                    self.pool().read(ThinId(missing), 0, &mut buf),
                    Err(Error::NoSuchDevice(_))
                ));
            }
            6 => {
                // A multi-snapshot with a duplicate new id creates nothing.
                let _ = self.snaps(&[(missing, existing), (missing, existing)]);
            }
            7 => {
                // ... and one with a missing origin after a valid pair creates nothing.
                let other = (0..)
                    .map(|i| (missing + 1 + i) % (MAX_ID + 1))
                    .find(|i| !self.m.devs.contains_key(i) && *i != missing)
                    .unwrap();
                let _ = self.snaps(&[(missing, existing), (other, other)]);
            }
            _ => {
                assert!(matches!(
                    self.pool().delta(ThinId(missing), ThinId(existing), false),
                    Err(Error::NoSuchDevice(_))
                ));
            }
        }
        self.learn();
    }

    fn finish(&mut self) {
        self.check();
        self.verify_all_data();
        let ids = self.dev_ids();
        for &x in &ids {
            for &y in &ids {
                self.verify_delta(x, y);
            }
        }
        self.reopen(false);
        self.verify_all_data();
        self.check();
        let pool = self.pool.take().unwrap();
        pool.close().unwrap();
        eprintln!(
            "model run: {} steps, {} devices at the end (largest maps {} blocks), \
             {} data blocks used, {} NoSpace(Data), {} automatic commits, \
             {} NoSpace(Metadata)",
            self.step,
            self.m.devs.len(),
            self.m.devs.values().map(|d| d.map.len()).max().unwrap_or(0),
            self.m.toks.len(),
            self.data_full_hits,
            self.m.auto_commits,
            self.meta_full_hits
        );
    }
}

fn clone_res(r: &thinvol_engine::Result<()>) -> thinvol_engine::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(Error::NoSpace(k)) => Err(Error::NoSpace(*k)),
        Err(Error::DeviceExists(i)) => Err(Error::DeviceExists(*i)),
        Err(Error::NoSuchDevice(i)) => Err(Error::NoSuchDevice(*i)),
        Err(Error::BadDeviceId(i)) => Err(Error::BadDeviceId(*i)),
        Err(Error::TransactionIdMismatch { expected, actual }) => {
            Err(Error::TransactionIdMismatch {
                expected: *expected,
                actual: *actual,
            })
        }
        Err(e) => Err(Error::InvalidArgument(format!("{e}"))),
    }
}

/// thin_delta's coalescing: consecutive virtual blocks of one kind; a gap or a change
/// of kind ends a run.
fn runs_from_maps(l: &BTreeMap<u64, u64>, r: &BTreeMap<u64, u64>) -> Vec<DeltaRun> {
    let keys: BTreeSet<u64> = l.keys().chain(r.keys()).copied().collect();
    let mut out: Vec<DeltaRun> = Vec::new();
    for k in keys {
        let kind = match (l.get(&k), r.get(&k)) {
            (Some(a), Some(b)) if a == b => DeltaKind::Same,
            (Some(_), Some(_)) => DeltaKind::Different,
            (Some(_), None) => DeltaKind::LeftOnly,
            _ => DeltaKind::RightOnly,
        };
        match out.last_mut() {
            Some(x) if x.kind == kind && x.begin + x.len == k => x.len += 1,
            _ => out.push(DeltaRun {
                kind,
                begin: k,
                len: 1,
            }),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

fn raw_op() -> impl Strategy<Value = (u8, u64, u64, u64)> {
    (any::<u8>(), any::<u64>(), any::<u64>(), any::<u64>())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        max_shrink_iters: 2000,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// Small devices (3 MiB), a small data device (so it fills up now and then).
    #[test]
    fn model_small(ops in prop::collection::vec(raw_op(), 1..300)) {
        let mut h = Harness::new(64, None, 48, 8);
        for op in ops {
            h.random_step(op);
        }
        h.finish();
    }
}

/// A long seeded run on bigger devices (multi-level mapping trees).
#[test]
fn model_long_seeded() {
    // (seed, data blocks, longest aligned write): small pools fill up often; the big
    // one grows multi-level mapping trees (over 252 mappings per device).
    for (seed, data_blocks, vblocks, max_run) in
        [(1u64, 420, 700, 4), (2, 420, 700, 4), (3, 4000, 1000, 64)]
    {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut h = Harness::new(data_blocks, None, vblocks, 10);
        h.max_run = max_run;
        for i in 0..3000 {
            let op = (rng.gen::<u8>(), rng.gen(), rng.gen(), rng.gen());
            h.random_step(op);
            if i % 1000 == 999 {
                h.check();
                h.verify_all_data();
            }
        }
        h.finish();
    }
}

/// Fill the data device, then free space and write again.
#[test]
fn data_full() {
    let mut h = Harness::new(40, None, 64, 8);
    h.create(1).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut full = 0;
    // Unaligned writes of 1 byte .. 3 blocks until the pool is full.
    for _ in 0..10_000 {
        h.step += 1;
        let off = rng.gen_range(0..h.vsize - 1);
        let len = rng.gen_range(1..3 * BS).min(h.vsize - off);
        match h.write(1, off, len) {
            Ok(()) => {}
            Err(Error::NoSpace(SpaceKind::Data)) => {
                full += 1;
                if full == 5 {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(full, 5, "the pool never filled up");
    assert_eq!(h.m.toks.len(), 40);
    h.learn();
    h.verify_all_data();
    h.check();
    // Overwrites of mapped, exclusive blocks still work when full.
    let mapped: Vec<u64> = h.m.devs[&1].map.keys().copied().collect();
    for &vb in mapped.iter().take(5) {
        h.write(1, vb * BS + 100, 5000).unwrap();
    }
    // A snapshot needs no data; writing to either side then needs a block.
    h.snaps(&[(2, 1)]).unwrap();
    let vb = mapped[0];
    assert!(matches!(
        h.write(2, vb * BS, 10),
        Err(Error::NoSpace(SpaceKind::Data))
    ));
    assert!(matches!(
        h.write(1, vb * BS, BS),
        Err(Error::NoSpace(SpaceKind::Data))
    ));
    // A partial discard of a shared block must copy it, so it fails too; a whole-block
    // discard just unmaps.
    assert!(matches!(
        h.discard(1, vb * BS + 1, 10),
        Err(Error::NoSpace(SpaceKind::Data))
    ));
    h.discard(2, vb * BS, BS).unwrap();
    h.verify_all_data();
    h.check();
    // Discarding shared blocks frees nothing; deleting the snapshot then does.
    h.discard(1, 0, 16 * BS).unwrap();
    h.learn();
    let before = h.m.toks.len();
    h.delete(2).unwrap();
    let freed_by_delete = before - h.m.toks.len();
    assert!(freed_by_delete > 0);
    h.learn();
    // Blocks freed since the last commit are reusable once a commit makes that durable;
    // a write that finds no free block commits by itself, so it succeeds right away.
    h.step += 1;
    h.write(1, 0, 2 * BS).unwrap();
    h.learn();
    h.verify_all_data();
    h.step += 1;
    h.write(1, 3 * BS, 2 * BS).unwrap();
    h.verify_all_data();
    h.check();
    h.reopen(false);
    h.verify_all_data();
    // Fill again; growing the data device makes room for exactly the added blocks.
    loop {
        h.step += 1;
        let off = rng.gen_range(0..h.vsize - 1);
        if h.write(1, off, BS).is_err() {
            break;
        }
    }
    h.pool().grow_data(56 * BS).unwrap();
    h.m.nr_data_blocks = 56;
    h.m.commit_point();
    h.learn();
    let mut added = 0;
    for vb in 0..h.vsize / BS {
        h.step += 1;
        if !h.m.devs[&1].map.contains_key(&vb) {
            match h.write(1, vb * BS + 1, 10) {
                Ok(()) => added += 1,
                Err(Error::NoSpace(SpaceKind::Data)) => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(added, 16, "blocks provisioned after growing by 16");
    h.check();
    h.reopen(false);
    h.verify_all_data();
    // Delete everything.
    h.delete(1).unwrap();
    h.commit();
    assert_eq!(h.pool().status().unwrap().data_blocks_used, 0);
    h.create(3).unwrap();
    h.write(3, 0, 10 * BS).unwrap();
    h.finish();
}

/// Exhaust a 256 KiB metadata device with many small scattered writes across many
/// snapshots: the error is NoSpace(Metadata), nothing half-done, the pool consistent.
#[test]
fn metadata_full() {
    let nvb = 600u64;
    let mut h = Harness::new(4096, Some(256 << 10), nvb, 64);
    h.allow_meta_full = true;
    h.m.check_reuse = false;
    h.create(0).unwrap();
    // A base device with several mapping leaves.
    for vb in 0..nvb {
        h.step += 1;
        if h.write(0, vb * BS, BS).is_err() {
            break;
        }
        if vb % 64 == 63 {
            h.commit();
        }
    }
    h.commit();
    let mut snaps = 0u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut first_error_at = None;
    'outer: for round in 0..200u64 {
        let id = round + 1;
        h.step += 1;
        let origin = *h.dev_ids().last().unwrap();
        match h.snaps(&[(id, origin)]) {
            Ok(()) => {}
            Err(Error::NoSpace(SpaceKind::Metadata)) => {
                first_error_at.get_or_insert(round);
                break;
            }
            Err(e) => panic!("{e}"),
        }
        snaps += 1;
        // Touch every leaf of the new snapshot with a small write.
        for k in 0..nvb / 50 {
            h.step += 1;
            let vb = k * 50 + rng.gen_range(0..50);
            let off = vb * BS + rng.gen_range(0..BS - 600);
            match h.write(id, off, 512) {
                Ok(()) => {}
                Err(Error::NoSpace(SpaceKind::Metadata)) => {
                    first_error_at.get_or_insert(round);
                    break 'outer;
                }
                Err(e) => panic!("{e}"),
            }
        }
        if round % 3 == 2 {
            h.commit();
        }
    }
    assert!(
        first_error_at.is_some(),
        "metadata never filled ({snaps} snapshots)"
    );
    eprintln!(
        "metadata full after {snaps} snapshots, status {:?}",
        h.pool().status().unwrap()
    );
    // Everything that succeeded is there; the pool is consistent and still usable.
    h.learn();
    h.verify_all_data();
    h.check();
    h.reopen(false);
    h.check();
    h.verify_all_data();
    // Still full after reopening? Writes fail cleanly or work; either way consistent.
    let ids = h.dev_ids();
    for i in 0..50 {
        h.step += 1;
        let d = ids[i % ids.len()];
        let _ = h.write(d, rng.gen_range(0..nvb) * BS + 7, 100);
        let _ = h.snaps(&[(10_000 + i as u64, d), (20_000 + i as u64, d)]);
        h.learn();
    }
    h.check();
    // Deleting snapshots frees metadata; then everything works again.
    for &d in ids.iter().skip(1) {
        h.delete(d).unwrap();
    }
    for d in h.dev_ids().into_iter().filter(|&d| d != 0) {
        h.delete(d).unwrap();
    }
    h.commit();
    h.allow_meta_full = false;
    h.snaps(&[(1, 0), (2, 0)]).unwrap();
    for k in 0..nvb / 50 {
        h.write(1, k * 50 * BS + 3, 700).unwrap();
    }
    h.finish();
}

/// A create_snaps that runs out of metadata part-way must not leave some of the
/// snapshots behind ("all or none").
#[test]
fn metadata_full_create_snaps_is_atomic() {
    let nvb = 600u64;
    let mut h = Harness::new(4096, Some(256 << 10), nvb, 64);
    h.allow_meta_full = true;
    h.m.check_reuse = false;
    h.create(0).unwrap();
    for vb in 0..nvb {
        if h.write(0, vb * BS, BS).is_err() {
            break;
        }
        if vb % 64 == 63 {
            h.commit();
        }
    }
    h.commit();
    // Approach the metadata reserve (a 64-block device keeps 32 blocks for commits)
    // until exactly one block above it is free, then ask for several snapshots at once:
    // the first one needs a block, leaving none above the reserve for the second.
    let reserve = (h.pool().status().unwrap().metadata_blocks_total / 10).clamp(32, 4096);
    let mut tried = 0;
    for round in 0..400u64 {
        let id = round + 1;
        h.step += 1;
        h.commit();
        let st = h.pool().status().unwrap();
        let free = st.metadata_blocks_total - st.metadata_blocks_used;
        if free <= reserve {
            break;
        }
        if free == reserve + 1 {
            let before: Vec<u64> = h.dev_ids();
            let pairs: Vec<(u64, u64)> = (0..4).map(|i| (100_000 + i, 0)).collect();
            let r = h.snaps(&pairs);
            let after: Vec<u64> = h.pool().devices().unwrap().iter().map(|d| d.id.0).collect();
            match r {
                // The batch was admitted as a whole: all of it happened.
                Ok(()) => assert!(pairs.iter().all(|p| after.contains(&p.0))),
                Err(Error::NoSpace(SpaceKind::Metadata)) => assert_eq!(
                    after, before,
                    "create_snaps failed with NoSpace(Metadata) but left some of its \
                     snapshots behind"
                ),
                Err(e) => panic!("{e}"),
            }
            tried += 1;
            h.learn();
            break;
        }
        if free >= reserve + 3 {
            // A snapshot with one changed leaf: about two more blocks.
            let origin = *h.dev_ids().last().unwrap();
            if h.snaps(&[(id, origin)]).is_ok() {
                let _ = h.write(id, (round * 37 % nvb) * BS + 1, 10);
            }
        } else {
            // An empty thin device: one more block (its root).
            let _ = h.create(id);
        }
    }
    assert!(tried > 0, "never reached the metadata reserve");
    h.learn();
    h.check();
    h.reopen(false);
    h.check();
    h.verify_all_data();
}
