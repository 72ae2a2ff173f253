//! Interoperability with the real thin-provisioning-tools (Debian 0.9.0):
//! * metadata written by randomized workloads passes `thin_check`, and `thin_dump`,
//!   `thin_delta` and `thin_ls` see exactly what the engine reports;
//! * metadata made by `thin_restore` opens in the engine with the right devices,
//!   mappings and data, and keeps working;
//! * a metadata snapshot shows the state at reservation time to `thin_dump -m`,
//!   `thin_delta -m` and `thin_ls -m`, and its data blocks are never reused while it
//!   is held;
//! * a pool that ran out of data space still passes the tools.
//!
//! Writes are also checked block by block against a model of sharing: a block is
//! written in place exactly when no other mapping shares it and it was mapped after
//! its device was last snapshotted (the kernel's rule), otherwise it is copied; and
//! `thin_dump`'s mapping times are the pool times at which the model provisioned them.
//!
//! thin_check 0.9.0 does not verify data space-map reference counts, so every
//! check here is paired with the engine's own `pool.check()`.
//!
//! All tests print SKIP and pass when the tools are not installed.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thinvol_engine::format::{DataBlock, DataBlockSize, ThinId};
use thinvol_engine::storage::FileStorage;
use thinvol_engine::{delta_runs, Error, OpenOptions, Pool, PoolConfig, SpaceKind};
use thinvol_testkit as tk;

const BS: u64 = 64 * 1024;
const BSU: usize = BS as usize;
const MAX_ID: u64 = (1 << 24) - 1;

macro_rules! require_tools {
    () => {
        if !tk::tools_available() {
            eprintln!("SKIP: thin-provisioning-tools not found");
            return;
        }
    };
}

/// A directory for pool files: on tmpfs when there is one (commits fsync), else the
/// default temp dir.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    shm.is_dir()
        .then(|| {
            tempfile::Builder::new()
                .prefix("thinvol-interop-")
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

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The recognizable contents of a whole block identified by `tag`.
fn block_pattern(tag: u64) -> Vec<u8> {
    let mut v = vec![0u8; BSU];
    let a = mix(tag);
    for (i, w) in v.chunks_exact_mut(8).enumerate() {
        let x = a ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ (tag << 40);
        w.copy_from_slice(&x.to_le_bytes());
    }
    v
}

fn kind_of(k: thinvol_engine::DeltaKind) -> tk::DeltaKind {
    match k {
        thinvol_engine::DeltaKind::Same => tk::DeltaKind::Same,
        thinvol_engine::DeltaKind::Different => tk::DeltaKind::Different,
        thinvol_engine::DeltaKind::LeftOnly => tk::DeltaKind::LeftOnly,
        thinvol_engine::DeltaKind::RightOnly => tk::DeltaKind::RightOnly,
    }
}

// ---------------------------------------------------------------------------
// A block-level model: which virtual blocks are mapped, sharing, mapping times
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Dev {
    /// virtual block -> token (a stand-in for a data block)
    map: BTreeMap<u64, u64>,
    snap_time: u32,
}

#[derive(Clone, Debug)]
struct Tok {
    refs: u32,
    time: u32,
}

/// What the model predicts for the metadata (contents are checked in tests/model.rs).
#[derive(Clone, Debug, Default)]
struct Model {
    devs: BTreeMap<u64, Dev>,
    toks: HashMap<u64, Tok>,
    next_tok: u64,
    time: u32,
    /// Data block of each live token, learned from the pool.
    loc: HashMap<u64, u64>,
}

impl Model {
    fn new_tok(&mut self, time: u32) -> u64 {
        self.next_tok += 1;
        self.toks.insert(self.next_tok, Tok { refs: 1, time });
        self.next_tok
    }

    fn dec(&mut self, t: u64) {
        let tok = self.toks.get_mut(&t).unwrap();
        tok.refs -= 1;
        if tok.refs == 0 {
            self.toks.remove(&t);
            self.loc.remove(&t);
        }
    }

    fn create(&mut self, id: u64) {
        self.devs.insert(
            id,
            Dev {
                map: BTreeMap::new(),
                snap_time: self.time,
            },
        );
    }

    fn snap(&mut self, id: u64, origin: u64) {
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
                snap_time: self.time,
            },
        );
    }

    fn delete(&mut self, id: u64) {
        let d = self.devs.remove(&id).unwrap();
        for t in d.map.values() {
            self.dec(*t);
        }
    }

    /// Write (data) or zero (discard) part of block `vb`; `whole` = the whole block.
    /// Returns true if the block got a new data block (copy-on-write or provisioning).
    fn touch(&mut self, id: u64, vb: u64, whole: bool, discard: bool) -> bool {
        let cur = self.devs[&id].map.get(&vb).copied();
        if discard && (whole || cur.is_none()) {
            if let Some(t) = cur {
                self.devs.get_mut(&id).unwrap().map.remove(&vb);
                self.dec(t);
            }
            return false;
        }
        if let Some(t) = cur {
            let tok = &self.toks[&t];
            if tok.refs == 1 && tok.time >= self.devs[&id].snap_time {
                return false; // written in place
            }
        }
        let nt = self.new_tok(self.time);
        self.devs.get_mut(&id).unwrap().map.insert(vb, nt);
        if let Some(t) = cur {
            self.dec(t);
        }
        true
    }

    /// Apply a write or discard; returns the virtual blocks that got a new data block.
    fn range(&mut self, id: u64, off: u64, len: u64, discard: bool) -> Vec<u64> {
        let mut fresh = Vec::new();
        let mut pos = off;
        while pos < off + len {
            let vb = pos / BS;
            let o = pos % BS;
            let n = (BS - o).min(off + len - pos);
            if self.touch(id, vb, n == BS, discard) {
                fresh.push(vb);
            }
            pos += n;
        }
        fresh
    }

    /// A model of restored metadata: one token per data block.
    fn from_dump(md: &tk::Metadata) -> Model {
        let mut m = Model {
            time: md.superblock.time,
            ..Default::default()
        };
        let mut by_block: HashMap<u64, u64> = HashMap::new();
        for d in &md.devices {
            let mut map = BTreeMap::new();
            for (v, (b, t)) in d.block_time_map() {
                let tok = *by_block.entry(b).or_insert_with(|| {
                    m.next_tok += 1;
                    m.toks.insert(m.next_tok, Tok { refs: 0, time: t });
                    m.loc.insert(m.next_tok, b);
                    m.next_tok
                });
                m.toks.get_mut(&tok).unwrap().refs += 1;
                map.insert(v, tok);
            }
            m.devs.insert(
                d.dev_id,
                Dev {
                    map,
                    snap_time: d.snap_time,
                },
            );
        }
        m
    }
}

// ---------------------------------------------------------------------------
// The engine's view, and comparisons with the tools
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
struct View {
    time: u32,
    transaction: u64,
    nr_data_blocks: u64,
    /// id -> (mapped_blocks, transaction, creation_time, snap_time)
    details: BTreeMap<u64, (u64, u64, u32, u32)>,
    maps: BTreeMap<u64, BTreeMap<u64, u64>>,
}

fn view(pool: &Pool) -> View {
    let st = pool.status().unwrap();
    let mut details = BTreeMap::new();
    let mut maps = BTreeMap::new();
    for d in pool.devices().unwrap() {
        details.insert(
            d.id.0,
            (
                d.mapped_blocks,
                d.transaction_id,
                d.creation_time,
                d.snapshotted_time,
            ),
        );
        let m: BTreeMap<u64, u64> = pool
            .mappings(d.id)
            .unwrap()
            .into_iter()
            .map(|(v, b)| (v.0, b.0))
            .collect();
        assert_eq!(
            m.len() as u64,
            d.mapped_blocks,
            "mapped_blocks of {}",
            d.id.0
        );
        maps.insert(d.id.0, m);
    }
    View {
        time: st.time,
        transaction: st.transaction_id,
        nr_data_blocks: st.data_blocks_total,
        details,
        maps,
    }
}

/// The engine's view agrees with the model: same devices, mapped blocks, sharing
/// (tokens and data blocks in bijection, tokens never move) and snapshot times.
fn check_model(v: &View, m: &mut Model, ctx: &str) {
    assert_eq!(
        v.maps.keys().collect::<Vec<_>>(),
        m.devs.keys().collect::<Vec<_>>(),
        "{ctx}: device ids"
    );
    assert_eq!(v.time, m.time, "{ctx}: pool time");
    let mut owner: HashMap<u64, u64> = HashMap::new();
    for (id, d) in &m.devs {
        let maps = &v.maps[id];
        assert_eq!(
            maps.keys().collect::<Vec<_>>(),
            d.map.keys().collect::<Vec<_>>(),
            "{ctx}: mapped blocks of device {id}"
        );
        assert_eq!(v.details[id].3, d.snap_time, "{ctx}: snap time of {id}");
        for (vb, &b) in maps {
            let t = d.map[vb];
            let known = *m.loc.entry(t).or_insert(b);
            assert_eq!(known, b, "{ctx}: device {id} vblock {vb}: token moved");
            let o = *owner.entry(b).or_insert(t);
            assert_eq!(o, t, "{ctx}: data block {b} shared by unrelated mappings");
        }
    }
    assert_eq!(owner.len(), m.toks.len(), "{ctx}: live data blocks");
}

/// `thin_dump` shows exactly `v`; mapping times are those the model predicts.
fn compare_dump(dump: &tk::Metadata, v: &View, m: Option<&Model>, ctx: &str) {
    let sb = &dump.superblock;
    assert_eq!(sb.time, v.time, "{ctx}: superblock time");
    assert_eq!(
        sb.transaction, v.transaction,
        "{ctx}: superblock transaction"
    );
    assert_eq!(u64::from(sb.data_block_size) * 512, BS, "{ctx}");
    assert_eq!(sb.nr_data_blocks, v.nr_data_blocks, "{ctx}: nr_data_blocks");
    let ids: Vec<u64> = dump.devices.iter().map(|d| d.dev_id).collect();
    assert_eq!(
        ids,
        v.maps.keys().copied().collect::<Vec<_>>(),
        "{ctx}: devices"
    );
    for d in &dump.devices {
        let (mapped, trans, ctime, stime) = v.details[&d.dev_id];
        assert_eq!(
            (d.mapped_blocks, d.transaction, d.creation_time, d.snap_time),
            (mapped, trans, ctime, stime),
            "{ctx}: details of device {} (mapped, transaction, creation_time, snap_time)",
            d.dev_id
        );
        let bm = d.block_map();
        if bm != v.maps[&d.dev_id] {
            let ours = &v.maps[&d.dev_id];
            let diff: Vec<_> = bm
                .keys()
                .chain(ours.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|k| bm.get(k) != ours.get(k))
                .take(10)
                .map(|k| (k, bm.get(k), ours.get(k)))
                .collect();
            panic!(
                "{ctx}: thin_dump mappings of device {} differ from ours (vblock, dump, ours): {diff:?}",
                d.dev_id
            );
        }
        if let Some(m) = m {
            let dm = &m.devs[&d.dev_id];
            for (v, (_, t)) in d.block_time_map() {
                let want = m.toks[&dm.map[&v]].time;
                assert_eq!(t, want, "{ctx}: time of device {} vblock {v}", d.dev_id);
            }
        }
    }
}

/// `thin_ls` numbers from our own mappings.
fn our_thin_ls(v: &View) -> Vec<tk::ThinLsRow> {
    let mut uses: HashMap<u64, u64> = HashMap::new();
    for m in v.maps.values() {
        for b in m.values() {
            *uses.entry(*b).or_default() += 1;
        }
    }
    v.maps
        .iter()
        .map(|(&id, m)| {
            let excl = m.values().filter(|b| uses[b] == 1).count() as u64;
            tk::ThinLsRow {
                dev: id,
                mapped_blocks: v.details[&id].0,
                exclusive_blocks: excl,
                shared_blocks: v.details[&id].0 - excl,
            }
        })
        .collect()
}

/// Our delta (include_same, coalesced by `delta_runs`) as thin_delta runs.
fn our_delta(pool: &Pool, a: u64, b: u64) -> Vec<tk::DeltaRun> {
    let (d, _) = pool.delta(ThinId(a), ThinId(b), true).unwrap();
    delta_runs(&d)
        .into_iter()
        .map(|r| tk::DeltaRun {
            kind: kind_of(r.kind),
            begin: r.begin,
            length: r.len,
        })
        .collect()
}

fn pick_pairs(v: &View, rng: &mut StdRng, n: usize) -> Vec<(u64, u64)> {
    let ids: Vec<u64> = v.maps.keys().copied().collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let mut pairs = vec![(ids[0], ids[ids.len() - 1]), (ids[0], ids[0])];
    while pairs.len() < n {
        pairs.push((
            ids[rng.gen_range(0..ids.len())],
            ids[rng.gen_range(0..ids.len())],
        ));
    }
    pairs
}

/// Everything the tools can tell about a closed pool's metadata file, compared with
/// the engine's view `v` and (for mapping times) the model. `deltas` are our delta
/// runs for some device pairs, computed before the pool was closed.
fn tools_agree(
    meta: &Path,
    v: &View,
    m: Option<&Model>,
    deltas: &[((u64, u64), Vec<tk::DeltaRun>)],
    ctx: &str,
) {
    tk::thin_check(meta).unwrap().assert_clean();
    let dump = tk::thin_dump(meta, false).unwrap();
    assert_eq!(dump.superblock.flags, Some(0), "{ctx}: superblock flags");
    assert_eq!(dump.superblock.version, Some(2), "{ctx}: metadata version");
    compare_dump(&dump, v, m, ctx);
    for ((a, b), ours) in deltas {
        let theirs = tk::thin_delta(meta, *a, *b, false).unwrap();
        let from_dump = tk::delta_from_maps(
            &dump.device(*a).unwrap().block_map(),
            &dump.device(*b).unwrap().block_map(),
        );
        assert_eq!(
            &theirs, &from_dump,
            "{ctx}: thin_delta {a} {b} vs testkit's rule"
        );
        assert_eq!(
            ours, &theirs,
            "{ctx}: our delta_runs({a}, {b}) vs thin_delta"
        );
    }
    let ls = tk::thin_ls(meta, false).unwrap();
    assert_eq!(ls, tk::expected_thin_ls(&dump), "{ctx}: thin_ls vs dump");
    assert_eq!(ls, our_thin_ls(v), "{ctx}: thin_ls vs our mappings");
}

fn assert_check_clean(pool: &Pool, ctx: &str) {
    let rep = pool.check().unwrap();
    assert!(
        rep.is_clean(),
        "{ctx}: pool.check(): {:?}",
        &rep.problems[..rep.problems.len().min(20)]
    );
}

// ---------------------------------------------------------------------------
// Randomized workload
// ---------------------------------------------------------------------------

struct Workload {
    rng: StdRng,
    vblocks: u64,
    max_devs: usize,
    next_id: u64,
    trans: u64,
    ops: usize,
    /// Require the engine to write in place exactly where the model does. Off while a
    /// metadata snapshot is held (see `metadata_snapshot_is_seen_by_tools`).
    strict: bool,
    /// Copies the engine made where the model would have written in place.
    extra_copies: usize,
}

impl Workload {
    fn new(seed: u64, vblocks: u64, max_devs: usize, next_id: u64, trans: u64) -> Self {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            vblocks,
            max_devs,
            next_id,
            trans,
            ops: 0,
            strict: true,
            extra_copies: 0,
        }
    }

    /// Follow the engine where it copied a block the model would have written in place.
    fn adopt(&mut self, m: &mut Model, id: u64, vbs: &[u64]) {
        for &vb in vbs {
            self.extra_copies += 1;
            let old = m.devs[&id].map[&vb];
            let nt = m.new_tok(m.time);
            m.devs.get_mut(&id).unwrap().map.insert(vb, nt);
            m.dec(old);
        }
    }

    fn fresh_id(&mut self, m: &Model) -> u64 {
        loop {
            let id = if self.rng.gen_bool(0.2) {
                self.rng.gen_range(0..=MAX_ID)
            } else {
                self.next_id += 1 + self.rng.gen_range(0..3);
                self.next_id
            };
            if !m.devs.contains_key(&id) {
                return id;
            }
        }
    }

    fn pick(&mut self, m: &Model) -> u64 {
        let ids: Vec<u64> = m.devs.keys().copied().collect();
        ids[self.rng.gen_range(0..ids.len())]
    }

    /// `n` random operations on `pool`, mirrored in `m`.
    fn run(&mut self, pool: &Pool, m: &mut Model, n: usize) {
        for _ in 0..n {
            self.ops += 1;
            if m.devs.is_empty() {
                let id = self.fresh_id(m);
                pool.create_thin(ThinId(id)).unwrap();
                m.create(id);
                continue;
            }
            let r = self.rng.gen_range(0..100);
            let id = self.pick(m);
            let vs = self.vblocks * BS;
            match r {
                0..=44 => {
                    // Mostly whole-block runs, some unaligned partial writes.
                    let (off, len) = if self.rng.gen_bool(0.7) {
                        let vb = self.rng.gen_range(0..self.vblocks);
                        let n = self.rng.gen_range(1..=16).min(self.vblocks - vb);
                        (vb * BS, n * BS)
                    } else {
                        let off = self.rng.gen_range(0..vs);
                        (off, self.rng.gen_range(1..2 * BS).min(vs - off))
                    };
                    let buf = vec![(self.ops % 251) as u8 + 1; len as usize];
                    let before = block_range(pool, id, off, len);
                    pool.write(ThinId(id), off, &buf).unwrap();
                    let fresh = m.range(id, off, len, false);
                    let extra =
                        check_fresh(pool, id, off, len, &before, &fresh, self.ops, self.strict);
                    self.adopt(m, id, &extra);
                }
                45..=64 => {
                    let (off, len) = if self.rng.gen_bool(0.6) {
                        let vb = self.rng.gen_range(0..self.vblocks);
                        let n = self.rng.gen_range(1..=24).min(self.vblocks - vb);
                        (vb * BS, n * BS)
                    } else {
                        let off = self.rng.gen_range(0..vs);
                        (off, self.rng.gen_range(1..3 * BS).min(vs - off))
                    };
                    let before = block_range(pool, id, off, len);
                    pool.discard(ThinId(id), off, len).unwrap();
                    let fresh = m.range(id, off, len, true);
                    let extra =
                        check_fresh(pool, id, off, len, &before, &fresh, self.ops, self.strict);
                    self.adopt(m, id, &extra);
                }
                65..=74 => {
                    if m.devs.len() < self.max_devs {
                        let new = self.fresh_id(m);
                        pool.create_snap(ThinId(new), ThinId(id)).unwrap();
                        m.snap(new, id);
                    }
                }
                75..=78 => {
                    let k = self.rng.gen_range(2..=4);
                    if m.devs.len() + k <= self.max_devs {
                        let mut pairs = Vec::new();
                        for _ in 0..k {
                            let mut new = self.fresh_id(m);
                            while pairs.iter().any(|p: &(u64, u64)| p.0 == new) {
                                new = self.fresh_id(m);
                            }
                            pairs.push((new, self.pick(m)));
                        }
                        let tp: Vec<(ThinId, ThinId)> =
                            pairs.iter().map(|&(a, b)| (ThinId(a), ThinId(b))).collect();
                        pool.create_snaps(&tp).unwrap();
                        for (a, b) in pairs {
                            m.snap(a, b);
                        }
                    }
                }
                79..=82 => {
                    if m.devs.len() < self.max_devs {
                        let new = self.fresh_id(m);
                        pool.create_thin(ThinId(new)).unwrap();
                        m.create(new);
                    }
                }
                83..=88 => {
                    if m.devs.len() > 2 {
                        pool.delete_thin(ThinId(id)).unwrap();
                        m.delete(id);
                    }
                }
                89..=95 => pool.commit().unwrap(),
                _ => {
                    let new = self.trans + 1 + self.rng.gen_range(0..3);
                    pool.set_transaction_id(self.trans, new).unwrap();
                    self.trans = new;
                }
            }
        }
    }
}

/// Mappings of the virtual blocks a byte range touches.
fn block_range(pool: &Pool, id: u64, off: u64, len: u64) -> BTreeMap<u64, u64> {
    pool.mappings_range(ThinId(id), off / BS, (off + len).div_ceil(BS))
        .unwrap()
        .into_iter()
        .map(|(v, b)| (v.0, b.0))
        .collect()
}

/// After a write or discard: the blocks the model says got a new data block
/// (copy-on-write, provisioning) map somewhere new, and (when `strict`) the others kept
/// their block. Returns blocks the engine copied although the model would have written
/// them in place (possible only when not `strict`).
#[allow(clippy::too_many_arguments)]
fn check_fresh(
    pool: &Pool,
    id: u64,
    off: u64,
    len: u64,
    before: &BTreeMap<u64, u64>,
    fresh: &[u64],
    op: usize,
    strict: bool,
) -> Vec<u64> {
    let after = block_range(pool, id, off, len);
    let mut extra = Vec::new();
    for (vb, b) in &after {
        let was = before.get(vb);
        if fresh.contains(vb) {
            assert_ne!(
                was,
                Some(b),
                "op {op}: device {id} vblock {vb} should have been copied (model), \
                 but was written in place in data block {b}"
            );
        } else if was != Some(b) {
            assert!(
                !strict,
                "op {op}: device {id} vblock {vb} should have been written in place in data \
                 block {was:?} (model), but was copied to {b}"
            );
            extra.push(*vb);
        }
    }
    extra
}

// ---------------------------------------------------------------------------
// a. randomized workloads vs thin_check / thin_dump / thin_delta / thin_ls
// ---------------------------------------------------------------------------

#[test]
fn workload_metadata_matches_tools() {
    require_tools!();
    let t0 = Instant::now();
    for (seed, vblocks, max_devs, rounds, ops) in [(1u64, 1500, 12, 3, 1200), (2, 300, 20, 2, 1500)]
    {
        let tmp = scratch_dir();
        let dir = tmp.path().join("pool");
        let meta = dir.join(thinvol_engine::METADATA_FILE);
        let pool = Pool::create(
            &dir,
            &PoolConfig {
                data_block_size: DataBlockSize::from_bytes(BS).unwrap(),
                data_size: 60_000 * BS,
                metadata_size: None,
                commit_interval: Duration::ZERO,
            },
        )
        .unwrap();
        let mut m = Model::default();
        let mut w = Workload::new(seed, vblocks, max_devs, 0, 0);
        let mut pool = Some(pool);
        for round in 0..rounds {
            let ctx = format!("seed {seed} round {round}");
            let p = pool.take().unwrap();
            w.run(&p, &mut m, ops);
            assert_check_clean(&p, &ctx);
            let v = view(&p);
            check_model(&v, &mut m, &ctx);
            assert_eq!(v.transaction, w.trans, "{ctx}");
            let pairs = pick_pairs(&v, &mut w.rng, 8);
            let deltas: Vec<_> = pairs
                .iter()
                .map(|&(a, b)| ((a, b), our_delta(&p, a, b)))
                .collect();
            p.close().unwrap();
            tools_agree(&meta, &v, Some(&m), &deltas, &ctx);
            // Reopen: the same view, still clean.
            let p = Pool::open_with(&dir, &open_opts()).unwrap();
            assert_eq!(view(&p), v, "{ctx}: view after reopen");
            assert_check_clean(&p, &ctx);
            let total: usize = v.maps.values().map(|x| x.len()).sum();
            eprintln!(
                "{ctx}: {} devices, {total} mappings, {} data blocks, tools agree",
                v.maps.len(),
                m.toks.len()
            );
            pool = Some(p);
        }
        pool.take().unwrap().close().unwrap();
    }
    eprintln!("workload_metadata_matches_tools: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// b. thin_restore'd metadata in the engine
// ---------------------------------------------------------------------------

/// Data file with `block_pattern(b)` in every data block mapped by `md`.
fn make_data_file(path: &Path, md: &tk::Metadata) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(md.superblock.nr_data_blocks * BS).unwrap();
    let used: BTreeSet<u64> = md
        .devices
        .iter()
        .flat_map(|d| d.block_map().into_values())
        .collect();
    for b in used {
        f.write_all_at(&block_pattern(b), b * BS).unwrap();
    }
}

fn open_files(dir: &Path) -> Pool {
    let meta = FileStorage::open(&dir.join("meta"), true).unwrap();
    let data = FileStorage::open(&dir.join("data"), true).unwrap();
    Pool::open_on(Arc::new(meta), Arc::new(data), &open_opts()).unwrap()
}

#[test]
fn restored_metadata_opens_and_works() {
    require_tools!();
    let t0 = Instant::now();
    // (seed, devices, max virtual blocks, data blocks)
    let cases = [
        (1u64, 1usize, 100u64, 200u64),
        (2, 4, 400, 1500),
        (3, 8, 700, 2500),
        (4, 12, 300, 900),
        (5, 3, 2000, 6000),
    ];
    for (seed, nr_devs, max_blocks, nr_data) in cases {
        let ctx = format!("restore seed {seed}");
        let md = tk::random_metadata(seed, nr_devs, max_blocks, nr_data);
        let tmp = scratch_dir();
        let dir = tmp.path();
        let meta_path = dir.join("meta");
        tk::thin_restore(&md, &meta_path, tk::suggested_meta_size_bytes(&md)).unwrap();
        tk::thin_check(&meta_path).unwrap().assert_clean();
        make_data_file(&dir.join("data"), &md);

        let pool = open_files(dir);
        assert_check_clean(&pool, &ctx);
        let v = view(&pool);
        compare_dump(&md, &v, None, &ctx);
        let mut m = Model::from_dump(&md);
        check_model(&v, &mut m, &ctx);
        let st = pool.status().unwrap();
        assert_eq!(
            st.data_blocks_used,
            m.toks.len() as u64,
            "{ctx}: data blocks used"
        );
        // Every mapped block reads as its data block's pattern; the rest as zeros.
        let mut buf = vec![0u8; 16 * BSU];
        for d in &md.devices {
            let bm = d.block_map();
            let end = max_blocks + 2;
            let mut vb = 0;
            while vb < end {
                let n = 16.min(end - vb);
                let chunk = &mut buf[..(n * BS) as usize];
                pool.read(ThinId(d.dev_id), vb * BS, chunk).unwrap();
                for i in 0..n {
                    let got = &chunk[(i * BS) as usize..((i + 1) * BS) as usize];
                    match bm.get(&(vb + i)) {
                        Some(&b) => assert!(
                            got == &block_pattern(b)[..],
                            "{ctx}: device {} vblock {} should read data block {b}",
                            d.dev_id,
                            vb + i
                        ),
                        None => assert!(
                            got.iter().all(|&x| x == 0),
                            "{ctx}: unmapped vblock {} of device {} is not zero",
                            vb + i,
                            d.dev_id
                        ),
                    }
                }
                vb += n;
            }
        }
        // A sub-block read spanning two mapped blocks.
        if let Some(d) = md.devices.iter().find(|d| {
            let bm = d.block_map();
            bm.keys().any(|k| bm.contains_key(&(k + 1)))
        }) {
            let bm = d.block_map();
            let k = *bm.keys().find(|k| bm.contains_key(&(*k + 1))).unwrap();
            let mut got = vec![0u8; 1000];
            pool.read(ThinId(d.dev_id), (k + 1) * BS - 500, &mut got)
                .unwrap();
            assert_eq!(&got[..500], &block_pattern(bm[&k])[BSU - 500..], "{ctx}");
            assert_eq!(&got[500..], &block_pattern(bm[&(k + 1)])[..500], "{ctx}");
        }

        // Room for the workload below: grow the data device (and space map).
        pool.grow_data((nr_data + 6000) * BS).unwrap();
        assert_eq!(pool.status().unwrap().data_blocks_total, nr_data + 6000);
        assert_check_clean(&pool, &ctx);
        // Keep working on the restored pool: the first write to a block shared with a
        // snapshot (or mapped before the device's last snapshot) copies it.
        let mut w = Workload::new(
            seed + 100,
            max_blocks,
            nr_devs + 6,
            md.devices.last().map_or(0, |d| d.dev_id),
            md.superblock.transaction,
        );
        // Partial writes into shared blocks keep the rest of the old contents.
        let shared = md.devices.iter().find_map(|d| {
            let dm = &m.devs[&d.dev_id];
            dm.map
                .iter()
                .find(|(_, t)| m.toks[*t].refs > 1)
                .map(|(&vb, t)| (d.dev_id, vb, m.loc[t]))
        });
        if let Some((id, vb, b)) = shared {
            pool.write(ThinId(id), vb * BS + 10, &[0xEE; 20]).unwrap();
            assert_eq!(m.range(id, vb * BS + 10, 20, false), vec![vb]);
            let mut got = vec![0u8; BSU];
            pool.read(ThinId(id), vb * BS, &mut got).unwrap();
            let mut want = block_pattern(b);
            want[10..30].fill(0xEE);
            assert!(
                got == want,
                "{ctx}: copy-on-write of a restored shared block"
            );
            let mut raw = vec![0u8; BSU];
            pool.read_data_block(DataBlock(b), &mut raw).unwrap();
            assert!(
                raw == block_pattern(b),
                "{ctx}: the shared block itself changed"
            );
        }
        w.run(&pool, &mut m, 600);
        assert_check_clean(&pool, &ctx);
        let v = view(&pool);
        check_model(&v, &mut m, &ctx);
        let pairs = pick_pairs(&v, &mut w.rng, 5);
        let deltas: Vec<_> = pairs
            .iter()
            .map(|&(a, b)| ((a, b), our_delta(&pool, a, b)))
            .collect();
        pool.close().unwrap();
        tools_agree(&meta_path, &v, Some(&m), &deltas, &ctx);
        let pool = open_files(dir);
        assert_eq!(view(&pool), v, "{ctx}: view after reopen");
        assert_check_clean(&pool, &ctx);
        pool.close().unwrap();
    }
    eprintln!("restored_metadata_opens_and_works: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// c. metadata snapshot
// ---------------------------------------------------------------------------

#[test]
fn metadata_snapshot_is_seen_by_tools() {
    require_tools!();
    let t0 = Instant::now();
    let tmp = scratch_dir();
    let dir = tmp.path().join("pool");
    let meta = dir.join(thinvol_engine::METADATA_FILE);
    let pool = Pool::create(
        &dir,
        &PoolConfig {
            data_block_size: DataBlockSize::from_bytes(BS).unwrap(),
            data_size: 20_000 * BS,
            metadata_size: None,
            commit_interval: Duration::ZERO,
        },
    )
    .unwrap();
    let mut m = Model::default();
    let mut w = Workload::new(77, 800, 10, 0, 0);
    assert!(matches!(
        pool.release_metadata_snap(),
        Err(Error::NoMetadataSnap)
    ));
    w.run(&pool, &mut m, 800);
    let held = pool.reserve_metadata_snap().unwrap();
    assert!(matches!(
        pool.reserve_metadata_snap(),
        Err(Error::MetadataSnapHeld)
    ));
    assert_eq!(pool.status().unwrap().held_metadata_root, Some(held));
    let at_reserve = view(&pool);
    let m_at_reserve = m.clone();
    let deltas_at_reserve: Vec<_> = pick_pairs(&at_reserve, &mut w.rng, 6)
        .into_iter()
        .map(|(a, b)| ((a, b), our_delta(&pool, a, b)))
        .collect();
    // Every data block the snapshot maps. They may be written in place later (as in
    // the kernel, the metadata snapshot does not make blocks shared), but they stay
    // allocated: none may be handed out for a new mapping while the snapshot is held.
    let held_blocks: BTreeSet<u64> = at_reserve
        .maps
        .values()
        .flat_map(|mp| mp.values().copied())
        .collect();
    // Change a lot: deletes, discards, overwrites and new snapshots, many commits.
    // While the snapshot is held the engine copies blocks it shares with the held trees
    // once the live top-level tree has been shadowed, where the kernel (time rule only)
    // writes in place: the model follows the engine there (blocks are never written in
    // place where the model requires a copy).
    w.strict = false;
    w.run(&pool, &mut m, 1500);
    for id in at_reserve.maps.keys().take(3) {
        if m.devs.contains_key(id) && m.devs.len() > 1 {
            pool.delete_thin(ThinId(*id)).unwrap();
            m.delete(*id);
        }
    }
    pool.commit().unwrap();
    w.run(&pool, &mut m, 500);
    assert_check_clean(&pool, "with a held metadata snapshot");
    let now = view(&pool);
    check_model(&now, &mut m, "after reservation");
    let deltas_now: Vec<_> = pick_pairs(&now, &mut w.rng, 4)
        .into_iter()
        .map(|(a, b)| ((a, b), our_delta(&pool, a, b)))
        .collect();
    pool.close().unwrap();
    eprintln!(
        "metadata snapshot held: {} writes copied a block the kernel would write in place",
        w.extra_copies
    );

    // Live metadata: as usual. (thin_check also walks the held root.)
    tools_agree(&meta, &now, Some(&m), &deltas_now, "live, snapshot held");
    // The snapshot: the state at reservation.
    let snap = tk::thin_dump(&meta, true).unwrap();
    let mut expect = at_reserve.clone();
    // The held superblock copy has zeroed space-map roots: no data block count.
    expect.nr_data_blocks = snap.superblock.nr_data_blocks;
    compare_dump(&snap, &expect, Some(&m_at_reserve), "thin_dump -m");
    for ((a, b), ours) in &deltas_at_reserve {
        let theirs = tk::thin_delta(&meta, *a, *b, true).unwrap();
        assert_eq!(ours, &theirs, "thin_delta -m --snap1 {a} --snap2 {b}");
    }
    let ls = tk::thin_ls(&meta, true).unwrap();
    assert_eq!(ls, our_thin_ls(&at_reserve), "thin_ls -m");
    // No block of the snapshot was reused for a mapping made after the reservation.
    for (t, b) in &m.loc {
        if !m_at_reserve.toks.contains_key(t) {
            assert!(
                !held_blocks.contains(b),
                "data block {b} of the metadata snapshot was reused while the snapshot was held"
            );
        }
    }
    // Reopen, release, close: clean, and the snapshot is gone.
    let pool = Pool::open_with(&dir, &open_opts()).unwrap();
    assert_eq!(pool.status().unwrap().held_metadata_root, Some(held));
    pool.release_metadata_snap().unwrap();
    assert_eq!(pool.status().unwrap().held_metadata_root, None);
    assert_check_clean(&pool, "after release");
    let v = view(&pool);
    assert_eq!(v, now);
    pool.close().unwrap();
    tools_agree(&meta, &v, Some(&m), &[], "after release");
    assert!(
        tk::thin_dump(&meta, true).is_err(),
        "thin_dump -m after release"
    );
    // After the release, the blocks only the snapshot kept are free again.
    let pool = Pool::open_with(&dir, &open_opts()).unwrap();
    assert_eq!(pool.status().unwrap().data_blocks_used, m.toks.len() as u64);
    pool.close().unwrap();
    eprintln!("metadata_snapshot_is_seen_by_tools: {:?}", t0.elapsed());
}

/// The tools accept a pool that ran out of data space, with blocks freed and reused
/// through the automatic commit.
#[test]
fn full_pool_metadata_matches_tools() {
    require_tools!();
    let tmp = scratch_dir();
    let dir = tmp.path().join("pool");
    let meta = dir.join(thinvol_engine::METADATA_FILE);
    let pool = Pool::create(
        &dir,
        &PoolConfig {
            data_block_size: DataBlockSize::from_bytes(BS).unwrap(),
            data_size: 120 * BS,
            metadata_size: None,
            commit_interval: Duration::ZERO,
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    for id in 0..4u64 {
        pool.create_thin(ThinId(id)).unwrap();
    }
    let mut full = 0;
    let mut snaps = 10u64;
    for i in 0..3000u64 {
        let id = rng.gen_range(0..4u64);
        let vb = rng.gen_range(0..200u64);
        match rng.gen_range(0..10) {
            0..=5 => match pool.write(ThinId(id), vb * BS + 3, &[7u8; 100]) {
                Ok(()) => {}
                Err(Error::NoSpace(SpaceKind::Data)) => full += 1,
                Err(e) => panic!("{e}"),
            },
            6..=8 => pool.discard(ThinId(id), vb * BS, 8 * BS).unwrap(),
            _ => {
                if i % 50 == 0 {
                    pool.create_snap(ThinId(snaps), ThinId(id)).unwrap();
                    let victim = snaps;
                    snaps += 1;
                    pool.write(ThinId(victim), 0, &[1u8; 10]).ok();
                    if rng.gen_bool(0.7) {
                        pool.delete_thin(ThinId(victim)).unwrap();
                    }
                }
            }
        }
    }
    assert!(full > 0, "the pool never filled up");
    assert_check_clean(&pool, "full pool");
    let v = view(&pool);
    pool.close().unwrap();
    tools_agree(&meta, &v, None, &[], "full pool");
    eprintln!("full pool: {full} writes failed with NoSpace(Data); tools agree");
}
