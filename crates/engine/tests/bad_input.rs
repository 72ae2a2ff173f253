//! Bad input: truncated files, a flipped bit in every metadata block, wrong superblock
//! fields, out-of-range block numbers, cycles and exponential fan-out in the trees.
//! Whatever the metadata holds, opening and reading a pool must end in `Ok` or a typed
//! error — never a panic, a hang or unbounded memory.
//!
//! Every scenario runs under [`guarded`]: on its own thread inside `catch_unwind`, with
//! a time limit, so a panic or a hang fails the test with the case's name instead of
//! killing or stalling the run.
//!
//! Crafted corruptions re-seal the block they change (`checksum::seal` through
//! `Node::pack` / `Superblock::pack`), so only the structural check under test can
//! catch them.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hasher;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use thinvol_engine::format::bitmap::{self, ENTRIES_PER_BITMAP};
use thinvol_engine::format::block_time::BlockTime;
use thinvol_engine::format::btree_node::Node;
use thinvol_engine::format::checksum::{self, BlockKind};
use thinvol_engine::format::index_entry::IndexEntry;
use thinvol_engine::format::metadata_index;
use thinvol_engine::format::superblock::{self, Superblock, THIN_MAGIC};
use thinvol_engine::format::{
    le, Block, DataBlock, DataBlockSize, FormatError, MetaBlock, NodeError, ThinId, VBlock,
    MAX_DATA_BLOCK, METADATA_BLOCK_SIZE,
};
use thinvol_engine::fuzz_support;
use thinvol_engine::storage::{MemStorage, Storage};
use thinvol_engine::{BlockDelta, DeviceInfo, Error, OpenOptions, Pool, PoolConfig};

const BS: u64 = 64 << 10;
/// Virtual blocks read from every device (covers every written block).
const EXTENT: u64 = 2600;
const MB: usize = METADATA_BLOCK_SIZE;

// ---------------------------------------------------------------------------
// Harness: panics and hangs become test failures naming the case.
// ---------------------------------------------------------------------------

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

/// Run `f` on its own thread; fail naming `what` if it panics or takes longer than
/// `secs`. (A hung thread is left behind; the test fails and the process ends.)
fn guarded<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(what.chars().take(60).collect())
        .spawn(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        })
        .expect("spawn");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => panic!("{what}: PANIC: {}", panic_text(&*p)),
        Err(_) => panic!("{what}: no result within {secs} s (hang or runaway work)"),
    }
}

fn quiet() -> OpenOptions {
    OpenOptions {
        commit_interval: Duration::ZERO,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// A sparse in-memory data device: keeps only non-zero 4 KiB pages, so the fixture's
// few hundred MiB of data blocks cost a few MiB of memory and can be shared by tests.
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct SparseMem {
    len: RwLock<u64>,
    pages: RwLock<HashMap<u64, Box<[u8]>>>,
}

impl SparseMem {
    fn new(len: u64) -> Self {
        SparseMem {
            len: RwLock::new(len),
            pages: RwLock::default(),
        }
    }

    fn deep_clone(&self, len: u64) -> Self {
        SparseMem {
            len: RwLock::new(len),
            pages: RwLock::new(self.pages.read().unwrap().clone()),
        }
    }

    fn range(&self, off: u64, n: usize, read: bool) -> io::Result<()> {
        let len = *self.len.read().unwrap();
        match off.checked_add(n as u64) {
            Some(end) if end <= len => Ok(()),
            _ => Err(io::Error::new(
                if read {
                    io::ErrorKind::UnexpectedEof
                } else {
                    io::ErrorKind::InvalidInput
                },
                format!("{n} bytes at {off} past the end ({len})"),
            )),
        }
    }

    fn each_page(off: u64, n: usize, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut pos = off;
        let end = off + n as u64;
        while pos < end {
            let page = pos / MB as u64;
            let in_page = (pos % MB as u64) as usize;
            let k = (MB - in_page).min((end - pos) as usize);
            f(page, in_page, (pos - off) as usize, k);
            pos += k as u64;
        }
    }
}

impl Storage for SparseMem {
    fn len(&self) -> io::Result<u64> {
        Ok(*self.len.read().unwrap())
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.range(off, buf.len(), true)?;
        let pages = self.pages.read().unwrap();
        Self::each_page(off, buf.len(), |p, ip, bp, k| match pages.get(&p) {
            Some(pg) => buf[bp..bp + k].copy_from_slice(&pg[ip..ip + k]),
            None => buf[bp..bp + k].fill(0),
        });
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.range(off, buf.len(), false)?;
        let mut pages = self.pages.write().unwrap();
        Self::each_page(off, buf.len(), |p, ip, bp, k| {
            let pg = pages
                .entry(p)
                .or_insert_with(|| vec![0u8; MB].into_boxed_slice());
            pg[ip..ip + k].copy_from_slice(&buf[bp..bp + k]);
            if pg.iter().all(|&b| b == 0) {
                pages.remove(&p);
            }
        });
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn grow(&self, len: u64) -> io::Result<()> {
        let mut l = self.len.write().unwrap();
        *l = (*l).max(len);
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.range(off, len as usize, false)?;
        let mut pages = self.pages.write().unwrap();
        Self::each_page(off, len as usize, |p, ip, _, k| {
            if let Some(pg) = pages.get_mut(&p) {
                pg[ip..ip + k].fill(0);
                if pg.iter().all(|&b| b == 0) {
                    pages.remove(&p);
                }
            }
        });
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Metadata image helpers (through the format crate, independent of the engine).
// ---------------------------------------------------------------------------

fn blk(img: &[u8], b: u64) -> &Block {
    img[b as usize * MB..][..MB].try_into().unwrap()
}

fn put_blk(img: &mut [u8], b: u64, data: &Block) {
    img[b as usize * MB..][..MB].copy_from_slice(data);
}

fn sb(img: &[u8]) -> Superblock {
    Superblock::unpack(blk(img, 0), MetaBlock(0)).unwrap()
}

fn put_sb(img: &mut [u8], s: &Superblock) {
    put_blk(img, 0, &s.pack());
}

/// Change superblock bytes in place, then re-seal its checksum.
fn patch_sb(img: &mut [u8], f: impl FnOnce(&mut [u8])) {
    f(&mut img[..MB]);
    checksum::seal(&mut img[..MB], BlockKind::Superblock);
}

fn node(img: &[u8], b: u64) -> Node {
    Node::unpack(blk(img, b), MetaBlock(b), None).unwrap()
}

fn put_node(img: &mut [u8], b: u64, n: &Node) {
    put_blk(img, b, &n.pack(MetaBlock(b)));
}

/// Blocks from the root to the leaf that holds (or would hold) `key`.
fn path(img: &[u8], root: u64, key: u64) -> Vec<u64> {
    let mut p = vec![root];
    loop {
        let n = node(img, *p.last().unwrap());
        if n.is_leaf() {
            return p;
        }
        p.push(n.child(n.lower_bound(key).unwrap_or(0)).0);
    }
}

fn top_leaf_slot(img: &[u8], dev: u64) -> (u64, usize) {
    let leaf = *path(img, sb(img).data_mapping_root.0, dev).last().unwrap();
    let i = node(img, leaf).find(dev).expect("device in top-level tree");
    (leaf, i)
}

fn bottom_root(img: &[u8], dev: u64) -> u64 {
    let (leaf, i) = top_leaf_slot(img, dev);
    node(img, leaf).value_u64(i)
}

/// Blocks with a non-zero count in the committed metadata space map. On a pool whose
/// check() is clean these are exactly the blocks the metadata references.
fn live_blocks(img: &[u8]) -> BTreeSet<u64> {
    let m = sb(img).metadata_sm_root;
    let nr_bitmaps = m.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
    let entries = metadata_index::unpack(
        blk(img, m.bitmap_root),
        MetaBlock(m.bitmap_root),
        nr_bitmaps,
    )
    .unwrap();
    let mut live = BTreeSet::new();
    for (i, e) in entries.iter().enumerate() {
        let counts = bitmap::unpack(blk(img, e.blocknr), MetaBlock(e.blocknr)).unwrap();
        for (j, c) in counts.iter().enumerate() {
            let b = i as u64 * ENTRIES_PER_BITMAP + j as u64;
            if *c != 0 && b < m.nr_blocks {
                live.insert(b);
            }
        }
    }
    live
}

/// Unreferenced blocks inside the metadata device, for planting crafted nodes.
fn free_blocks(img: &[u8]) -> Vec<u64> {
    let live = live_blocks(img);
    (1..sb(img).metadata_sm_root.nr_blocks)
        .filter(|b| !live.contains(b))
        .collect()
}

// ---------------------------------------------------------------------------
// The fixture: a real pool built with Pool::create, then loaded into memory.
// ---------------------------------------------------------------------------

/// Data written at the start of (dev, vblock) in generation `gen`.
fn tag(dev: u64, vb: u64, gen: u64) -> Vec<u8> {
    let mut v = vec![(dev * 31 + vb * 7 + gen) as u8 | 1; 512];
    v[..8].copy_from_slice(&dev.to_le_bytes());
    v[8..16].copy_from_slice(&vb.to_le_bytes());
    v[16..24].copy_from_slice(&gen.to_le_bytes());
    v
}

struct Fixture {
    meta: Vec<u8>,
    data: Arc<SparseMem>,
    nr_data_blocks: u64,
    live: BTreeSet<u64>,
    baseline: Observed,
    build_time: Duration,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build_fixture)
}

fn build_fixture() -> Fixture {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pool");
    let nr_data_blocks = 4096;
    let pool = Pool::create(
        &p,
        &PoolConfig {
            data_block_size: DataBlockSize::DEFAULT,
            data_size: nr_data_blocks * BS,
            metadata_size: None,
            commit_interval: Duration::ZERO,
        },
    )
    .unwrap();
    let mut model: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    let write = |model: &mut BTreeMap<(u64, u64), Vec<u8>>, pool: &Pool, dev, vb, gen| {
        let t = tag(dev, vb, gen);
        pool.write(ThinId(dev), vb * BS, &t).unwrap();
        model.insert((dev, vb), t);
    };
    pool.create_thin(ThinId(1)).unwrap();
    for vb in 0..2500 {
        write(&mut model, &pool, 1, vb, 0);
    }
    pool.create_thin(ThinId(3)).unwrap();
    for i in 0..400 {
        write(&mut model, &pool, 3, i * 5, 0);
    }
    // A metadata snapshot keeps this state's trees live alongside the current ones.
    pool.reserve_metadata_snap().unwrap();
    pool.create_snap(ThinId(2), ThinId(1)).unwrap();
    let shared: Vec<_> = model
        .range((1, 0)..(2, 0))
        .map(|(&(_, vb), v)| (vb, v.clone()))
        .collect();
    for (vb, v) in shared {
        model.insert((2, vb), v);
    }
    for vb in (0..2500).step_by(7) {
        write(&mut model, &pool, 1, vb, 1);
    }
    pool.create_snap(ThinId(4), ThinId(2)).unwrap();
    let shared: Vec<_> = model
        .range((2, 0)..(3, 0))
        .map(|(&(_, vb), v)| (vb, v.clone()))
        .collect();
    for (vb, v) in shared {
        model.insert((4, vb), v);
    }
    for vb in 1000..1300 {
        write(&mut model, &pool, 4, vb, 2);
    }
    // Unmap a stretch of device 3 (removals and rebalancing).
    pool.discard(ThinId(3), 500 * BS, 300 * BS).unwrap();
    model.retain(|&(d, vb), _| !(d == 3 && (500..800).contains(&vb)));
    // A device that lives and dies: its freed blocks keep stale contents.
    pool.create_thin(ThinId(5)).unwrap();
    for vb in 0..300 {
        pool.write(ThinId(5), vb * BS, &tag(5, vb, 0)).unwrap();
    }
    pool.commit().unwrap();
    pool.delete_thin(ThinId(5)).unwrap();
    let rep = pool.check().unwrap();
    assert!(rep.is_clean(), "fixture pool not clean: {:?}", rep.problems);
    pool.close().unwrap();

    let meta = std::fs::read(p.join("metadata")).unwrap();
    let raw = std::fs::read(p.join("data")).unwrap();
    let data = SparseMem::new(raw.len() as u64);
    for (i, page) in raw.chunks(MB).enumerate() {
        if page.iter().any(|&b| b != 0) {
            data.write_at(page, (i * MB) as u64).unwrap();
        }
    }
    drop(raw);
    let data = Arc::new(data);

    // The pool reads back what was written, and the checker agrees with the space map.
    let pool = Pool::open_on(
        Arc::new(MemStorage::from_bytes(meta.clone())),
        data.clone(),
        &quiet(),
    )
    .unwrap();
    let mut buf = vec![0u8; 512];
    for ((dev, vb), want) in &model {
        pool.read(ThinId(*dev), vb * BS, &mut buf).unwrap();
        assert_eq!(&buf, want, "dev {dev} vblock {vb}");
    }
    let rep = pool.check().unwrap();
    assert!(rep.is_clean());
    drop(pool);
    let live = live_blocks(&meta);
    assert_eq!(live.len() as u64, rep.metadata_blocks_referenced);
    let (baseline, errors) = exercise(meta.clone(), data.clone());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(baseline.devices.len(), 4);
    // Multi-level trees: device 1's mapping tree has an internal root.
    assert!(!node(&meta, bottom_root(&meta, 1)).is_leaf());
    Fixture {
        meta,
        data,
        nr_data_blocks,
        live,
        baseline,
        build_time: t0.elapsed(),
    }
}

// ---------------------------------------------------------------------------
// The full read-side sequence: open, devices, every block of every device, mappings,
// deltas, check.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, PartialEq)]
struct Observed {
    devices: Vec<DeviceInfo>,
    mappings: BTreeMap<u64, Vec<(VBlock, DataBlock)>>,
    reads: BTreeMap<u64, u64>,
    deltas: Vec<Vec<BlockDelta>>,
    check_problems: Vec<String>,
}

/// Runs the whole sequence; returns what it saw and every error (Display strings,
/// the open error first). Each call continues after an error to reach more code.
fn exercise(meta: Vec<u8>, data: Arc<dyn Storage>) -> (Observed, Vec<String>) {
    let mut obs = Observed::default();
    let mut errors = Vec::new();
    let pool = match Pool::open_on(Arc::new(MemStorage::from_bytes(meta)), data, &quiet()) {
        Ok(p) => p,
        Err(e) => {
            errors.push(format!("open: {e}"));
            return (obs, errors);
        }
    };
    match pool.devices() {
        Ok(d) => obs.devices = d,
        Err(e) => errors.push(format!("devices: {e}")),
    }
    let mut buf = [0u8; 512];
    for d in obs.devices.clone() {
        match pool.mappings(d.id) {
            Ok(m) => {
                obs.mappings.insert(d.id.0, m);
            }
            Err(e) => errors.push(format!("mappings {}: {e}", d.id)),
        }
        let mut h = DefaultHasher::new();
        let mut read_errors = 0;
        for vb in 0..EXTENT {
            match pool.read(d.id, vb * BS, &mut buf) {
                Ok(()) => h.write(&buf),
                Err(e) => {
                    h.write_u8(0xEE);
                    if read_errors < 3 {
                        errors.push(format!("read {} vblock {vb}: {e}", d.id));
                    }
                    read_errors += 1;
                }
            }
        }
        obs.reads.insert(d.id.0, h.finish());
    }
    for (l, r, same) in [(1, 2, false), (2, 4, false), (1, 3, false), (2, 4, true)] {
        match pool.delta(ThinId(l), ThinId(r), same) {
            Ok((d, _)) => obs.deltas.push(d),
            Err(e) => {
                obs.deltas.push(Vec::new());
                errors.push(format!("delta {l} {r}: {e}"));
            }
        }
    }
    match pool.check() {
        Ok(rep) => obs.check_problems = rep.problems.iter().map(|p| p.to_string()).collect(),
        Err(e) => errors.push(format!("check: {e}")),
    }
    if let Err(e) = pool.close() {
        errors.push(format!("close: {e}"));
    }
    (obs, errors)
}

/// Whether some error or check problem names metadata block `b`.
fn names_block(texts: &[String], b: u64) -> bool {
    let pats = [
        format!("metadata block {b} "),
        format!("metadata block {b}:"),
        format!("at block {b}:"),
    ];
    texts.iter().any(|t| pats.iter().any(|p| t.contains(p)))
}

fn open_mem(meta: Vec<u8>) -> thinvol_engine::Result<Pool> {
    let f = fixture();
    Pool::open_on(
        Arc::new(MemStorage::from_bytes(meta)),
        f.data.clone(),
        &quiet(),
    )
}

fn open_err(meta: Vec<u8>) -> Error {
    match open_mem(meta) {
        Ok(_) => panic!("open succeeded on bad metadata"),
        Err(e) => e,
    }
}

fn corrupt_reason(e: &Error) -> (u64, BlockKind, NodeError) {
    match e {
        Error::Corrupt(FormatError {
            block,
            kind,
            reason,
        }) => (block.0, *kind, reason.clone()),
        other => panic!("expected Error::Corrupt, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 1. Every referenced metadata block, a flipped bit: detected, or (for blocks nothing
//    references) provably harmless.
// ---------------------------------------------------------------------------

/// Criterion (sound, no guessing): a block is *live* iff the committed metadata space
/// map gives it a non-zero count; the fixture's check() is clean, so these are exactly
/// the blocks reachable from the superblock (trees of the live superblock and of the
/// held metadata snapshot, both space maps' bitmaps, index block and index/overflow
/// trees). open + check() read every live block, and every block type's checksum
/// covers bytes 4..4096 with the checksum itself in 0..4, so every flip in a live
/// block must be reported (an error or a check problem) and the report must name
/// the block. A flip in a block nothing references (stale contents of freed blocks,
/// or zeros) may go unnoticed, but then everything observable — device list, every
/// read, mappings, deltas, check — must equal the uncorrupted pool's.
#[test]
fn every_flipped_bit_is_detected_or_harmless() {
    let f = fixture();
    let t0 = Instant::now();
    let nr_blocks = f.meta.len() as u64 / MB as u64;
    let nonzero: Vec<u64> = (0..nr_blocks)
        .filter(|&b| blk(&f.meta, b).iter().any(|&x| x != 0))
        .collect();
    let zero: Vec<u64> = (0..nr_blocks)
        .filter(|&b| blk(&f.meta, b).iter().all(|&x| x == 0))
        .step_by(97)
        .collect();
    assert!(f.live.iter().all(|b| nonzero.contains(b)));
    let stale = nonzero.iter().filter(|b| !f.live.contains(b)).count();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xB17F_11B5);
    // Three flips per non-zero block (one in the header bytes, two anywhere), one per
    // sampled zero block.
    let mut cases = Vec::new();
    for &b in &nonzero {
        cases.push((b, rng.gen_range(0..64 * 8)));
        cases.push((b, rng.gen_range(0..MB * 8)));
        cases.push((b, rng.gen_range(0..MB * 8)));
    }
    for &b in &zero {
        cases.push((b, rng.gen_range(0..MB * 8)));
    }
    let (mut detected, mut harmless) = (0, 0);
    for (b, bit) in cases.iter().copied() {
        let what = format!("flip block {b} bit {bit}");
        let mut img = f.meta.clone();
        img[b as usize * MB + bit / 8] ^= 1 << (bit % 8);
        let data: Arc<dyn Storage> = f.data.clone();
        let (obs, errors) = guarded(&what, 120, move || exercise(img, data));
        let mut reports = errors.clone();
        reports.extend(obs.check_problems.iter().cloned());
        if f.live.contains(&b) {
            assert!(
                !reports.is_empty(),
                "{what}: live block, corruption not reported"
            );
            assert!(
                names_block(&reports, b),
                "{what}: reports do not name the block: {reports:?}"
            );
        }
        if reports.is_empty() {
            assert!(
                obs == f.baseline,
                "{what}: nothing reported but results differ from the clean pool"
            );
            harmless += 1;
        } else {
            detected += 1;
        }
    }
    eprintln!(
        "bit flips: {} cases over {} non-zero blocks ({} live, {stale} stale) and {} zero \
         blocks: {detected} reported, {harmless} harmless; {:.1} s (fixture built in {:.1} s)",
        cases.len(),
        nonzero.len(),
        f.live.len(),
        zero.len(),
        t0.elapsed().as_secs_f64(),
        f.build_time.as_secs_f64()
    );
    assert!(detected >= 3 * f.live.len());
}

// ---------------------------------------------------------------------------
// 2. Truncated metadata, short data file (real files, Pool::open).
// ---------------------------------------------------------------------------

/// A pool directory holding `meta` and a sparse data file of `data_len` bytes.
fn pool_dir(root: &Path, name: &str, meta: &[u8], data_len: u64) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("metadata"), meta).unwrap();
    let data = std::fs::File::create(d.join("data")).unwrap();
    data.set_len(data_len).unwrap();
    d
}

#[test]
fn truncated_metadata_file() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let full = f.meta.len();
    let data_len = f.nr_data_blocks * BS;
    let ok = pool_dir(tmp.path(), "full", &f.meta, data_len);
    Pool::open_with(&ok, &quiet()).unwrap().close().unwrap();
    for len in [
        0,
        100,
        4095,
        4096,
        4096 + 100,
        full / 2,
        full / 2 + 100,
        full - MB,
    ] {
        let d = pool_dir(tmp.path(), &format!("t{len}"), &f.meta[..len], data_len);
        let what = format!("metadata truncated to {len} bytes");
        let e = guarded(&what, 60, move || Pool::open_with(&d, &quiet()).err());
        let e = e.unwrap_or_else(|| panic!("{what}: opened"));
        let msg = e.to_string();
        if len < MB {
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.contains("smaller than one 4 KiB block")),
                "{what}: {e:?}"
            );
        } else {
            assert!(
                matches!(&e, Error::Inconsistent { block: MetaBlock(0), reason }
                    if reason.contains("metadata space map covers 512 blocks")
                        && reason.contains(&format!("holds {}", len / MB))),
                "{what}: {e:?}"
            );
        }
        eprintln!("{what}: {msg}");
    }
}

#[test]
fn data_file_shorter_than_metadata_says() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let need = f.nr_data_blocks * BS;
    for len in [0, 4096, need / 2, need - 1] {
        let d = pool_dir(tmp.path(), &format!("d{len}"), &f.meta, len);
        let what = format!("data file of {len} bytes");
        let e = guarded(&what, 60, move || Pool::open_with(&d, &quiet()).err());
        match e {
            Some(Error::InvalidArgument(m)) => {
                assert!(
                    m.contains(&format!("data device is {len} bytes"))
                        && m.contains(&format!("describes {need} bytes")),
                    "{what}: {m}"
                );
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // Longer than needed is fine (the pool just does not use the tail).
    let d = pool_dir(tmp.path(), "longer", &f.meta, need + BS);
    Pool::open_with(&d, &quiet()).unwrap().close().unwrap();
}

// ---------------------------------------------------------------------------
// 3. Superblock fields: each wrong value gets its own error.
// ---------------------------------------------------------------------------

#[test]
fn superblock_field_errors() {
    let f = fixture();
    let put32 = |o: usize, v: u32| move |b: &mut [u8]| le::put_u32(b, o, v);

    // Wrong magic, with and without a valid checksum.
    let mut img = f.meta.clone();
    patch_sb(&mut img, |b| le::put_u64(b, superblock::MAGIC_OFFSET, 1234));
    let (blk0, kind, r) = corrupt_reason(&open_err(img));
    assert_eq!(
        (blk0, kind, r),
        (0, BlockKind::Superblock, NodeError::BadMagic(1234))
    );
    let mut img = f.meta.clone();
    img[superblock::MAGIC_OFFSET] ^= 0x40;
    let (_, _, r) = corrupt_reason(&open_err(img));
    assert_eq!(r, NodeError::BadMagic(THIN_MAGIC ^ 0x40));

    for v in [0, 3, 7, u32::MAX] {
        let mut img = f.meta.clone();
        patch_sb(&mut img, put32(superblock::VERSION_OFFSET, v));
        let (b, _, r) = corrupt_reason(&open_err(img));
        assert_eq!((b, r), (0, NodeError::BadVersion(v)));
    }
    // Version 1 is readable.
    let mut img = f.meta.clone();
    patch_sb(&mut img, put32(superblock::VERSION_OFFSET, 1));
    open_mem(img).unwrap();

    for v in [1, 0x10, 0x8000_0000] {
        let mut img = f.meta.clone();
        patch_sb(&mut img, put32(superblock::INCOMPAT_FLAGS_OFFSET, v));
        let (_, _, r) = corrupt_reason(&open_err(img));
        assert!(
            matches!(&r, NodeError::UnsupportedFeatures(s) if s.contains(&format!("{v:#x}"))),
            "{r:?}"
        );
    }

    for v in [0, 1, 16, 4096] {
        let mut img = f.meta.clone();
        patch_sb(&mut img, put32(superblock::METADATA_BLOCK_SIZE_OFFSET, v));
        let (_, _, r) = corrupt_reason(&open_err(img));
        assert!(
            matches!(&r, NodeError::Other(s) if s.contains(&format!("metadata block size {v} sectors"))),
            "{r:?}"
        );
    }

    for v in [0, 1, 64, 127, 129, 192, 4 << 20, u32::MAX] {
        let mut img = f.meta.clone();
        patch_sb(&mut img, put32(superblock::DATA_BLOCK_SIZE_OFFSET, v));
        match open_err(img) {
            Error::Inconsistent {
                block: MetaBlock(0),
                reason,
            } => assert!(
                reason.contains(&format!("data block size {v} sectors")),
                "{reason}"
            ),
            e => panic!("data block size {v}: {e:?}"),
        }
    }

    // Superblock that claims another location; broken checksum.
    let mut img = f.meta.clone();
    patch_sb(&mut img, |b| le::put_u64(b, superblock::BLOCKNR_OFFSET, 7));
    let (_, _, r) = corrupt_reason(&open_err(img));
    assert_eq!(
        r,
        NodeError::BlockNrMismatch {
            recorded: 7,
            actual: 0
        }
    );
    let mut img = f.meta.clone();
    img[200] ^= 1;
    let (_, _, r) = corrupt_reason(&open_err(img));
    assert!(matches!(r, NodeError::Checksum { .. }), "{r:?}");
}

#[test]
fn zeros_garbage_and_foreign_metadata() {
    let f = fixture();
    // All zeros: an unformatted device, not corruption.
    assert!(matches!(
        open_err(vec![0; f.meta.len()]),
        Error::Unformatted
    ));
    // Only the superblock zeroed.
    let mut img = f.meta.clone();
    img[..MB].fill(0);
    assert!(matches!(open_err(img), Error::Unformatted));
    // Random garbage, several sizes.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for len in [MB, 10 * MB, f.meta.len()] {
        let img: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let (b, kind, _) = corrupt_reason(&open_err(img));
        assert_eq!((b, kind), (0, BlockKind::Superblock));
    }
    // A valid superblock and nothing else: the index block is the first casualty.
    let mut img = vec![0; f.meta.len()];
    img[..MB].copy_from_slice(&f.meta[..MB]);
    let idx = sb(&f.meta).metadata_sm_root.bitmap_root;
    let (b, kind, r) = corrupt_reason(&open_err(img));
    assert_eq!((b, kind), (idx, BlockKind::MetadataIndex), "{r:?}");
    // Other block types where the superblock should be (salt mismatch).
    for b in f.live.iter().copied().filter(|&b| b != 0).take(4) {
        let mut img = f.meta.clone();
        let mut other: Block = *blk(&f.meta, b);
        le::put_u64(&mut other, 8, 0);
        let kind = checksum::identify(blk(&f.meta, b)).unwrap();
        checksum::seal(&mut other, kind);
        put_blk(&mut img, 0, &other);
        let e = open_err(img);
        assert!(
            matches!(e, Error::Corrupt(_)),
            "block {b} as superblock: {e:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 4. Out-of-range block numbers.
// ---------------------------------------------------------------------------

fn expect_inconsistent(e: &Error, block: u64, words: &str) {
    match e {
        Error::Inconsistent { block: b, reason } if b.0 == block && reason.contains(words) => {}
        other => panic!("expected Inconsistent at block {block} ({words}), got {other:?}"),
    }
}

#[test]
fn child_pointer_beyond_metadata_device() {
    let f = fixture();
    let nr = sb(&f.meta).metadata_sm_root.nr_blocks;
    let root = bottom_root(&f.meta, 1);
    for bad in [nr, nr + 5, u64::MAX / 4096, u64::MAX] {
        let mut img = f.meta.clone();
        let mut n = node(&img, root);
        assert!(!n.is_leaf());
        n.set_value_u64(0, bad);
        put_node(&mut img, root, &n);
        let what = format!("child pointer {bad}");
        let data: Arc<dyn Storage> = f.data.clone();
        guarded(&what, 60, move || {
            let pool = Pool::open_on(Arc::new(MemStorage::from_bytes(img)), data, &quiet())
                .expect("the mapping trees are read lazily");
            let mut buf = [0u8; 512];
            let e = pool.read(ThinId(1), 0, &mut buf).unwrap_err();
            expect_inconsistent(&e, bad, "beyond the metadata device");
            let e = pool.mappings(ThinId(1)).unwrap_err();
            expect_inconsistent(&e, bad, "beyond the metadata device");
            assert!(pool.delta(ThinId(1), ThinId(2), false).is_err());
            // Blocks outside the bad child still read.
            pool.read(ThinId(1), 2400 * BS, &mut buf).unwrap();
            let rep = pool.check().unwrap();
            assert!(
                rep.problems.iter().any(|p| p.block == Some(MetaBlock(bad))
                    && p.message.contains("beyond the metadata device")),
                "{:?}",
                rep.problems
            );
        });
    }
}

#[test]
fn superblock_roots_beyond_metadata_device() {
    let f = fixture();
    let good = sb(&f.meta);
    let nr = good.metadata_sm_root.nr_blocks;
    let bad = nr + 1000;

    // Read at open: details tree, data space map index, metadata space map index,
    // metadata bitmaps.
    let mut s = good.clone();
    s.device_details_root = MetaBlock(bad);
    let mut img = f.meta.clone();
    put_sb(&mut img, &s);
    expect_inconsistent(&open_err(img), bad, "beyond the metadata device");

    let mut s = good.clone();
    s.data_sm_root.bitmap_root = bad;
    let mut img = f.meta.clone();
    put_sb(&mut img, &s);
    expect_inconsistent(&open_err(img), bad, "beyond the metadata device");

    let mut s = good.clone();
    s.metadata_sm_root.bitmap_root = bad;
    let mut img = f.meta.clone();
    put_sb(&mut img, &s);
    expect_inconsistent(
        &open_err(img),
        0,
        "metadata space map index at invalid block",
    );

    let mut s = good.clone();
    s.metadata_sm_root.nr_blocks = nr * 4;
    let mut img = f.meta.clone();
    put_sb(&mut img, &s);
    expect_inconsistent(&open_err(img), 0, "metadata space map covers");

    let mut img = f.meta.clone();
    let idx = good.metadata_sm_root.bitmap_root;
    let mut entries = metadata_index::unpack(blk(&img, idx), MetaBlock(idx), 1).unwrap();
    entries[0].blocknr = bad;
    put_blk(
        &mut img,
        idx,
        &metadata_index::pack(&entries, MetaBlock(idx)),
    );
    expect_inconsistent(&open_err(img), bad, "beyond the metadata device");

    // Read lazily: the top-level mapping tree, the held snapshot, the overflow trees.
    let mut s = good.clone();
    s.data_mapping_root = MetaBlock(bad);
    let mut img = f.meta.clone();
    put_sb(&mut img, &s);
    let pool = open_mem(img).unwrap();
    let mut buf = [0u8; 512];
    expect_inconsistent(
        &pool.read(ThinId(1), 0, &mut buf).unwrap_err(),
        bad,
        "beyond the metadata device",
    );
    assert!(pool.delta(ThinId(1), ThinId(2), false).is_err());
    assert!(!pool.check().unwrap().is_clean());

    for which in ["held", "data overflow", "metadata overflow"] {
        let mut s = good.clone();
        match which {
            "held" => s.held_root = MetaBlock(bad),
            "data overflow" => s.data_sm_root.ref_count_root = bad,
            _ => s.metadata_sm_root.ref_count_root = bad,
        }
        let mut img = f.meta.clone();
        put_sb(&mut img, &s);
        let data: Arc<dyn Storage> = f.data.clone();
        let (obs, errors) = guarded(which, 60, move || exercise(img, data));
        let mut all = errors.clone();
        all.extend(obs.check_problems);
        assert!(
            all.iter().any(|t| t.contains("beyond the metadata device")),
            "{which}: {all:?}"
        );
    }
}

/// Put `bt` at `vb` in device `dev`'s mapping tree (the leaf is re-sealed).
fn set_mapping(img: &mut [u8], dev: u64, vb: u64, block: u64) {
    let leaf = *path(img, bottom_root(img, dev), vb).last().unwrap();
    let mut n = node(img, leaf);
    let i = n.find(vb).expect("mapped");
    let time = BlockTime::unpack(n.value_u64(i)).time;
    n.set_value_u64(
        i,
        BlockTime {
            block: DataBlock(block),
            time,
        }
        .pack(),
    );
    put_node(img, leaf, &n);
}

#[test]
fn mapping_beyond_data_device() {
    let f = fixture();
    let nr = f.nr_data_blocks;
    for (bad, data_len) in [
        (nr, nr * BS),
        (nr + 3, nr * BS),
        (MAX_DATA_BLOCK, nr * BS),
        // The data device is bigger than the metadata says: the block exists on disk
        // but is not the pool's; reading it would return stray bytes.
        (nr, (nr + 10) * BS),
    ] {
        let mut img = f.meta.clone();
        set_mapping(&mut img, 1, 5, bad);
        let data = Arc::new(f.data.deep_clone(data_len));
        let what = format!("mapping to data block {bad} (data device {data_len} bytes)");
        guarded(&what, 60, move || {
            let pool =
                Pool::open_on(Arc::new(MemStorage::from_bytes(img)), data, &quiet()).unwrap();
            let mut buf = [0u8; 512];
            let e = pool.read(ThinId(1), 5 * BS, &mut buf).unwrap_err();
            assert!(
                matches!(&e, Error::Inconsistent { reason, .. }
                    if reason.contains(&format!("data block {bad}"))
                        && reason.contains("beyond the data device")),
                "{e:?}"
            );
            // The neighbours are fine.
            pool.read(ThinId(1), 4 * BS, &mut buf).unwrap();
            assert_eq!(buf.to_vec(), tag(1, 4, 0));
            let rep = pool.check().unwrap();
            assert!(
                rep.problems
                    .iter()
                    .any(|p| p.message.contains(&format!("data block {bad} beyond"))),
                "{:?}",
                rep.problems
            );
        });
    }
}

/// With 32 MiB data blocks, block 2^40-1 times the block size does not fit 64 bits.
#[test]
fn mapping_offset_overflow_with_large_blocks() {
    let bs = DataBlockSize::from_bytes(32 << 20).unwrap();
    let meta = Arc::new(MemStorage::new(1 << 20));
    let data = Arc::new(SparseMem::new(2 * bs.bytes()));
    let pool = Pool::format_on(meta.clone(), data.clone(), bs, Duration::ZERO, None).unwrap();
    pool.create_thin(ThinId(7)).unwrap();
    pool.write(ThinId(7), 0, b"hello").unwrap();
    pool.close().unwrap();
    let mut img = meta.snapshot();
    set_mapping(&mut img, 7, 0, MAX_DATA_BLOCK);
    guarded(
        "mapping to block 2^40-1 with 32 MiB blocks",
        60,
        move || {
            let pool =
                Pool::open_on(Arc::new(MemStorage::from_bytes(img)), data, &quiet()).unwrap();
            let mut buf = [0u8; 16];
            let e = pool.read(ThinId(7), 0, &mut buf).unwrap_err();
            assert!(matches!(e, Error::Inconsistent { .. }), "{e:?}");
            // A write to the block must not use it either.
            assert!(pool.write(ThinId(7), 0, b"x").is_err());
        },
    );
}

/// A data space map index that claims so many data blocks that blocks x block size
/// overflows 64 bits: open must refuse, not overflow.
#[test]
fn data_space_map_claiming_more_than_64_bits_of_bytes() {
    let f = fixture();
    let mut img = f.meta.clone();
    // Room for the crafted index tree: one metadata bitmap covers 16 320 blocks.
    let meta_blocks = ENTRIES_PER_BITMAP;
    img.resize(meta_blocks as usize * MB, 0);
    let mut s = sb(&img);
    s.metadata_sm_root.nr_blocks = meta_blocks;
    s.data_block_size = 2 << 20; // 1 GiB blocks
    let nr_entries = (1u64 << 34) / ENTRIES_PER_BITMAP + 1;
    let mut next = 600u64;
    let mut level: Vec<(u64, u64)> = Vec::new(); // (first key, block)
    for chunk in (0..nr_entries).collect::<Vec<_>>().chunks(168) {
        let mut n = Node::new_leaf(16);
        for &k in chunk {
            n.insert_at(n.len(), k, &IndexEntry::default().pack());
        }
        put_node(&mut img, next, &n);
        level.push((chunk[0], next));
        next += 1;
    }
    while level.len() > 1 {
        let mut up = Vec::new();
        for chunk in level.chunks(252) {
            let mut n = Node::new_internal();
            for &(k, b) in chunk {
                n.insert_at(n.len(), k, &b.to_le_bytes());
            }
            put_node(&mut img, next, &n);
            up.push((chunk[0].0, next));
            next += 1;
        }
        level = up;
    }
    assert!(next < meta_blocks);
    s.data_sm_root.bitmap_root = level[0].1;
    s.data_sm_root.nr_blocks = nr_entries * ENTRIES_PER_BITMAP;
    put_sb(&mut img, &s);
    let e = guarded("huge data space map", 120, move || {
        Pool::open_on(
            Arc::new(MemStorage::from_bytes(img)),
            Arc::new(SparseMem::new(1 << 40)),
            &quiet(),
        )
        .err()
    });
    assert!(
        matches!(&e, Some(Error::Inconsistent { block: MetaBlock(0), reason })
            if reason.contains("exceeds 2^64 bytes")),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------
// 5. Cycles and fan-out: errors, not hangs, stack overflows or exponential work.
// ---------------------------------------------------------------------------

#[test]
fn cycles_in_trees_are_errors() {
    let f = fixture();
    let root = bottom_root(&f.meta, 1);
    let free = free_blocks(&f.meta);

    // A child pointing at its parent (self-loop at the root of device 1's tree).
    let mut self_loop = f.meta.clone();
    let mut n = node(&self_loop, root);
    let i = n.len() / 2;
    n.set_value_u64(i, root);
    put_node(&mut self_loop, root, &n);
    let vb_in_loop = n.keys[i];

    // A two-node cycle: root -> X -> root.
    let mut two = f.meta.clone();
    let x = free[0];
    let mut xn = Node::new_internal();
    xn.insert_at(0, 0, &root.to_le_bytes());
    put_node(&mut two, x, &xn);
    let mut n = node(&two, root);
    n.set_value_u64(0, x);
    put_node(&mut two, root, &n);

    for (name, img, vb) in [
        ("self loop", self_loop, vb_in_loop),
        ("two-node cycle", two, 0),
    ] {
        let data: Arc<dyn Storage> = f.data.clone();
        guarded(name, 60, move || {
            let pool = Pool::open_on(
                Arc::new(MemStorage::from_bytes(img.clone())),
                data.clone(),
                &quiet(),
            )
            .unwrap();
            let mut buf = [0u8; 512];
            let e = pool.read(ThinId(1), vb * BS, &mut buf).unwrap_err();
            assert!(matches!(e, Error::Inconsistent { .. }), "{name}: {e:?}");
            assert!(pool.mappings(ThinId(1)).is_err(), "{name}");
            assert!(pool.delta(ThinId(1), ThinId(2), false).is_err(), "{name}");
            assert!(!pool.check().unwrap().is_clean(), "{name}");
            drop(pool);
            let (_, errors) = exercise(img, data);
            assert!(!errors.is_empty());
        });
    }

    // The top-level tree and the details tree pointing at themselves.
    let y = free[1];
    let mut yn = Node::new_internal();
    yn.insert_at(0, 0, &y.to_le_bytes());
    let mut img = f.meta.clone();
    put_node(&mut img, y, &yn);
    let mut s = sb(&img);
    s.data_mapping_root = MetaBlock(y);
    put_sb(&mut img, &s);
    let data: Arc<dyn Storage> = f.data.clone();
    let (obs, errors) = guarded("top-level self loop", 60, move || exercise(img, data));
    assert!(errors.iter().any(|e| e.starts_with("read ")), "{errors:?}");
    assert!(!obs.check_problems.is_empty());

    let mut img = f.meta.clone();
    put_node(&mut img, y, &yn);
    let mut s = sb(&img);
    s.device_details_root = MetaBlock(y);
    put_sb(&mut img, &s);
    let e = guarded("details self loop", 60, move || open_mem(img).err());
    assert!(matches!(e, Some(Error::Inconsistent { .. })), "{e:?}");
}

/// A chain of internal nodes whose two children are the same next node: no cycle,
/// but 2^depth paths. A walk that does not notice the sharing does 2^40 work.
fn fan_out_chain(img: &mut [u8], bottom: u64, depth: usize) -> u64 {
    let free = free_blocks(img);
    let mut below = bottom;
    for &b in free[..depth].iter() {
        let mut n = Node::new_internal();
        n.insert_at(0, 0, &below.to_le_bytes());
        n.insert_at(1, 1, &below.to_le_bytes());
        put_node(img, b, &n);
        below = b;
    }
    below
}

#[test]
fn shared_subtree_fan_out_is_an_error_not_exponential_work() {
    let f = fixture();
    // Details tree (collected at open).
    let mut img = f.meta.clone();
    let bottom = sb(&img).device_details_root.0;
    let top = fan_out_chain(&mut img, bottom, 40);
    let mut s = sb(&img);
    s.device_details_root = MetaBlock(top);
    put_sb(&mut img, &s);
    let e = guarded("details fan-out", 60, move || open_mem(img).err());
    assert!(
        matches!(&e, Some(Error::Inconsistent { reason, .. }) if reason.contains("twice")),
        "{e:?}"
    );

    // Data space map index tree (collected at open).
    let mut img = f.meta.clone();
    let bottom = sb(&img).data_sm_root.bitmap_root;
    let top = fan_out_chain(&mut img, bottom, 40);
    let mut s = sb(&img);
    s.data_sm_root.bitmap_root = top;
    put_sb(&mut img, &s);
    let e = guarded("data index fan-out", 60, move || open_mem(img).err());
    assert!(matches!(&e, Some(Error::Inconsistent { .. })), "{e:?}");

    // Device 1's mapping tree (walked by mappings, check, delta; looked up by reads).
    let mut img = f.meta.clone();
    let bottom = bottom_root(&img, 1);
    let top = fan_out_chain(&mut img, bottom, 40);
    let (leaf, i) = top_leaf_slot(&img, 1);
    let mut n = node(&img, leaf);
    n.set_value_u64(i, top);
    put_node(&mut img, leaf, &n);
    let data: Arc<dyn Storage> = f.data.clone();
    let (obs, errors) = guarded("mapping tree fan-out", 120, move || exercise(img, data));
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("mappings 1:") && e.contains("twice")),
        "{errors:?}"
    );
    assert!(!obs.check_problems.is_empty());
}

// ---------------------------------------------------------------------------
// 6. Space map roots and the pool clock out of range, then writes.
// ---------------------------------------------------------------------------

/// A small writable pool (metadata and data in memory).
fn small_pool() -> (Vec<u8>, Arc<SparseMem>) {
    let meta = Arc::new(MemStorage::new(1 << 20));
    let data = Arc::new(SparseMem::new(16 << 20));
    let pool = Pool::format_on(
        meta.clone(),
        data.clone(),
        DataBlockSize::DEFAULT,
        Duration::ZERO,
        None,
    )
    .unwrap();
    pool.create_thin(ThinId(1)).unwrap();
    for vb in 0..40 {
        pool.write(ThinId(1), vb * BS, &tag(1, vb, 0)).unwrap();
    }
    pool.create_snap(ThinId(2), ThinId(1)).unwrap();
    pool.close().unwrap();
    (meta.snapshot(), data)
}

#[test]
fn implausible_counters_then_writes() {
    let (meta, data) = small_pool();
    let good = sb(&meta);
    // (name, superblock, Some(words) if open must refuse with Inconsistent naming them)
    type Case = (&'static str, Superblock, Option<&'static str>);
    let with = |f: fn(&mut Superblock)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    let cases: Vec<Case> = vec![
        (
            "metadata nr_allocated 0",
            with(|s| s.metadata_sm_root.nr_allocated = 0),
            None,
        ),
        (
            "metadata nr_allocated > nr_blocks",
            with(|s| s.metadata_sm_root.nr_allocated = u64::MAX),
            Some("metadata space map has 18446744073709551615 of its"),
        ),
        (
            "data nr_allocated 0",
            with(|s| s.data_sm_root.nr_allocated = 0),
            None,
        ),
        (
            "data nr_allocated > nr_blocks",
            with(|s| s.data_sm_root.nr_allocated = 257),
            Some("data space map has 257 of its 256 blocks"),
        ),
        ("time 2^24 - 1", with(|s| s.time = (1 << 24) - 1), None),
        (
            "time 2^24",
            with(|s| s.time = 1 << 24),
            Some("pool time 16777216 does not fit in 24 bits"),
        ),
        (
            "time u32::MAX",
            with(|s| s.time = u32::MAX),
            Some("does not fit in 24 bits"),
        ),
    ];
    for (name, s, refuse) in cases {
        let mut img = meta.clone();
        put_sb(&mut img, &s);
        let data = Arc::new(data.deep_clone(16 << 20));
        guarded(name, 60, move || {
            let opened = Pool::open_on(Arc::new(MemStorage::from_bytes(img)), data, &quiet());
            let pool = match (opened, refuse) {
                (Ok(p), None) => p,
                (Err(Error::Inconsistent { block, reason }), Some(words)) => {
                    assert!(block.0 == 0 && reason.contains(words), "{name}: {reason}");
                    return;
                }
                (Ok(_), Some(_)) => panic!("{name}: opened"),
                (Err(e), _) => panic!("{name}: {e:?}"),
            };
            let r = (|| {
                for vb in 0..60 {
                    pool.write(ThinId(1), vb * BS + 7, b"new data")?;
                    pool.discard(ThinId(2), vb * BS, BS)?;
                }
                pool.create_snap(ThinId(3), ThinId(1))?;
                pool.commit()?;
                pool.delete_thin(ThinId(1))?;
                pool.check()
            })();
            eprintln!("{name}: {:?}", r.map(|rep| rep.problems.len()));
        });
    }
}

// ---------------------------------------------------------------------------
// 7. The fuzz target's body over the seed corpus, plus deterministic mutations, so CI
//    runs the fuzz logic without a nightly toolchain.
// ---------------------------------------------------------------------------

fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/open_read")
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(seed_dir())
        .expect("fuzz/seeds/open_read")
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn fuzz_seeds_open_and_check_clean() {
    let seeds = seeds();
    assert!(seeds.len() >= 4, "seed corpus missing");
    for (name, input) in seeds {
        let out = guarded(&name, 60, move || fuzz_support::run(&input));
        let out = out.unwrap_or_else(|e| panic!("seed {name}: {e}"));
        assert!(out.check_clean, "seed {name}: {out:?}");
        assert!(out.errors.is_empty(), "seed {name}: {:?}", out.errors);
    }
}

/// Inputs that once broke the target (fuzz/regressions/open_read/, see fuzz/README.md):
/// each must now end without a panic or a hang.
#[test]
fn fuzz_regressions_do_not_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/open_read");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        let input = std::fs::read(&p).unwrap();
        let name = p.display().to_string();
        guarded(&name, 60, move || fuzz_support::open_read(&input));
    }
}

/// A cheap stand-in for the fuzzer: every seed with every control byte, then random
/// byte, bit and block-level mutations, with and without re-sealing.
#[test]
fn fuzz_logic_over_mutated_seeds() {
    let seeds = seeds();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xF022);
    let mut inputs = Vec::new();
    for (name, input) in &seeds {
        for ctl in [0u8, 1, 2, 3, 4, 8, 12, 16 | 2, 16 | 3, 32 | 2, 32 | 16 | 2] {
            let mut i = input.clone();
            i[0] = (i[0] & 0b1100) | ctl;
            inputs.push((format!("{name} ctl {ctl:#x}"), i));
        }
        for m in 0..150 {
            let mut i = input.clone();
            let nblocks = (i.len() - 1) / MB;
            match m % 4 {
                0 => {
                    for _ in 0..rng.gen_range(1..8) {
                        let at = rng.gen_range(1..i.len());
                        i[at] ^= 1 << rng.gen_range(0..8);
                    }
                }
                1 => {
                    // A header field of some block set to a random small value.
                    let b = rng.gen_range(0..nblocks.max(1));
                    let at = 1 + b * MB + rng.gen_range(0..64);
                    i[at] = rng.gen();
                }
                2 if nblocks >= 2 => {
                    // Copy one block over another.
                    let (a, b) = (rng.gen_range(0..nblocks), rng.gen_range(0..nblocks));
                    let src = i[1 + a * MB..1 + (a + 1) * MB].to_vec();
                    i[1 + b * MB..1 + (b + 1) * MB].copy_from_slice(&src);
                }
                _ => {
                    // A random u64 written over a key/value area.
                    let b = rng.gen_range(0..nblocks.max(1));
                    let at = 1 + b * MB + 32 + 8 * rng.gen_range(0..500);
                    if at + 8 <= i.len() {
                        let v: u64 = if rng.gen() {
                            rng.gen_range(0..600)
                        } else {
                            rng.gen()
                        };
                        i[at..at + 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
            i[0] |= rng.gen_range(0..2u8) | (rng.gen_range(0..4u8) << 4);
            inputs.push((format!("{name} mutation {m}"), i));
        }
    }
    let t0 = Instant::now();
    let n = inputs.len();
    for (name, input) in inputs {
        guarded(&name, 60, move || fuzz_support::open_read(&input));
    }
    eprintln!("{n} fuzz inputs in {:.1} s", t0.elapsed().as_secs_f64());
}

/// Regenerates fuzz/seeds/open_read/ (run with `--ignored`). Each seed is the control
/// byte PAD (plus a data-size choice) followed by a formatted image with its trailing
/// zero blocks cut off; the target pads it back to the size the superblock claims.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = seed_dir();
    std::fs::create_dir_all(&dir).unwrap();
    type Build = fn(&Pool);
    let builds: Vec<(&str, u8, Build)> = vec![
        ("empty", 0, |_| {}),
        ("one-thin", 0, |p| {
            p.create_thin(ThinId(1)).unwrap();
            for vb in [0u64, 1, 2, 5, 9, 33, 63] {
                p.write(ThinId(1), vb * BS, &tag(1, vb, 0)).unwrap();
            }
        }),
        ("snapshots-held-root", 0, |p| {
            p.create_thin(ThinId(1)).unwrap();
            for vb in 0..20 {
                p.write(ThinId(1), vb * BS, &tag(1, vb, 0)).unwrap();
            }
            p.reserve_metadata_snap().unwrap();
            p.create_snap(ThinId(2), ThinId(1)).unwrap();
            p.create_snap(ThinId(3), ThinId(2)).unwrap();
            for vb in 0..6 {
                p.write(ThinId(1), vb * BS, &tag(1, vb, 1)).unwrap();
                p.write(ThinId(3), (vb + 10) * BS, &tag(3, vb, 1)).unwrap();
            }
            p.discard(ThinId(2), 15 * BS, 3 * BS).unwrap();
        }),
        // 16 MiB data device (control bits 2-3 = 2): 254 mappings, a two-level tree.
        ("two-level-mapping-tree", 8, |p| {
            p.create_thin(ThinId(1)).unwrap();
            for vb in 0..254 {
                p.write(ThinId(1), vb * BS, &tag(1, vb, 0)).unwrap();
            }
            p.create_snap(ThinId(2), ThinId(1)).unwrap();
            p.write(ThinId(1), 100 * BS, b"changed").unwrap();
        }),
        ("many-devices", 0, |p| {
            for id in 0..150 {
                p.create_thin(ThinId(id * 3)).unwrap();
            }
            p.write(ThinId(0), 0, &tag(0, 0, 0)).unwrap();
            p.create_snap(ThinId(1), ThinId(0)).unwrap();
        }),
    ];
    for (name, ctl, build) in builds {
        let data_len = if ctl & 12 == 8 { 16 << 20 } else { 4 << 20 };
        let meta_len = if name == "many-devices" {
            1 << 20
        } else {
            256 << 10
        };
        let meta = Arc::new(MemStorage::new(meta_len));
        let data = Arc::new(MemStorage::new(data_len));
        let pool = Pool::format_on(
            meta.clone(),
            data.clone(),
            DataBlockSize::DEFAULT,
            Duration::ZERO,
            None,
        )
        .unwrap();
        build(&pool);
        assert!(pool.check().unwrap().is_clean(), "{name}");
        pool.close().unwrap();
        let mut img = meta.snapshot();
        while img.len() > MB && img[img.len() - MB..].iter().all(|&b| b == 0) {
            img.truncate(img.len() - MB);
        }
        let mut input = vec![fuzz_support::PAD | ctl];
        input.extend_from_slice(&img);
        let out = fuzz_support::run(&input).unwrap();
        assert!(out.check_clean && out.errors.is_empty(), "{name}: {out:?}");
        std::fs::write(dir.join(name), &input).unwrap();
        eprintln!("seed {name}: {} bytes, {out:?}", input.len());
    }
}

/// A fuzz input: control byte `ctl` and the image cut after its last non-zero block.
fn fuzz_input(ctl: u8, img: &[u8]) -> Vec<u8> {
    let mut img = img.to_vec();
    while img.len() > MB && img[img.len() - MB..].iter().all(|&b| b == 0) {
        img.truncate(img.len() - MB);
    }
    let mut input = vec![ctl];
    input.extend_from_slice(&img);
    input
}

/// Regenerates fuzz/regressions/open_read/ (run with `--ignored`): the corruptions
/// that broke the engine before the fixes in this file's history, as inputs to the
/// fuzz target (4 MiB data device, padded image), so the fuzzer's own corpus and
/// `fuzz_regressions_do_not_panic` keep them covered.
#[test]
#[ignore]
fn write_fuzz_regressions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/open_read");
    std::fs::create_dir_all(&dir).unwrap();
    let fresh = |bs: DataBlockSize, data_len: u64, build: fn(&Pool)| {
        let meta = Arc::new(MemStorage::new(256 << 10));
        let data = Arc::new(MemStorage::new(data_len));
        let pool = Pool::format_on(meta.clone(), data, bs, Duration::ZERO, None).unwrap();
        build(&pool);
        pool.close().unwrap();
        meta.snapshot()
    };
    let one_thin = |p: &Pool| {
        p.create_thin(ThinId(1)).unwrap();
        for vb in 0..10 {
            p.write(ThinId(1), vb * BS, &tag(1, vb, 0)).unwrap();
        }
    };
    let pad = fuzz_support::PAD;
    let mut out: Vec<(&str, Vec<u8>)> = Vec::new();

    // 2^depth paths through a chain of nodes whose two children are the same node.
    let mut img = fresh(DataBlockSize::DEFAULT, 4 << 20, one_thin);
    let depth = free_blocks(&img).len().min(40);
    assert!(depth >= 30);
    let bottom = sb(&img).device_details_root.0;
    let top = fan_out_chain(&mut img, bottom, depth);
    let mut s = sb(&img);
    s.device_details_root = MetaBlock(top);
    put_sb(&mut img, &s);
    out.push(("details-fan-out", fuzz_input(pad, &img)));

    // A mapping to block 2^40-1 with 32 MiB blocks: block x block size overflows.
    let big = DataBlockSize::from_bytes(32 << 20).unwrap();
    let mut img = fresh(big, 4 << 20, |p| p.create_thin(ThinId(1)).unwrap());
    let root = bottom_root(&img, 1);
    let mut n = node(&img, root);
    let bt = BlockTime {
        block: DataBlock(MAX_DATA_BLOCK),
        time: 0,
    };
    n.insert_at(0, 0, &bt.pack().to_le_bytes());
    put_node(&mut img, root, &n);
    out.push(("mapping-offset-overflow", fuzz_input(pad, &img)));

    // Counters the writer cannot live with, followed by writes (control bit 4).
    let img = fresh(DataBlockSize::DEFAULT, 4 << 20, one_thin);
    let mut a = img.clone();
    let mut s = sb(&a);
    s.time = 1 << 24;
    put_sb(&mut a, &s);
    out.push((
        "time-2-24-then-write",
        fuzz_input(pad | fuzz_support::WRITE, &a),
    ));
    let mut a = img.clone();
    let mut s = sb(&a);
    s.metadata_sm_root.nr_allocated = u64::MAX;
    put_sb(&mut a, &s);
    out.push((
        "nr-allocated-overflow-then-write",
        fuzz_input(pad | fuzz_support::WRITE, &a),
    ));

    for (name, input) in out {
        let r = fuzz_support::run(&input);
        eprintln!("regression {name}: {} bytes: {r:?}", input.len());
        assert!(r.is_err() || !r.unwrap().errors.is_empty(), "{name}");
        std::fs::write(dir.join(name), &input).unwrap();
    }
}

/// A data device whose flush fails when told to (a failed fdatasync: the kernel reports
/// a lost write-back once, and a later fdatasync may succeed).
#[derive(Debug)]
struct FailingFlush {
    inner: MemStorage,
    fail: std::sync::atomic::AtomicBool,
}

impl Storage for FailingFlush {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if self.fail.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other("write-back lost (EIO)"));
        }
        self.inner.flush()
    }
    fn grow(&self, len: u64) -> io::Result<()> {
        self.inner.grow(len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
}

/// A failed data flush fails the commit and poisons the pool — also when the flush
/// that failed is the one `commit` runs before taking the metadata lock: a second
/// fdatasync could succeed although the write-back was lost, so nothing written since
/// the last commit may be committed. The device keeps the last commit.
#[test]
fn failed_data_flush_poisons_and_keeps_the_last_commit() {
    let bs = DataBlockSize::from_bytes(64 << 10).unwrap();
    let meta = Arc::new(MemStorage::new(4 << 20));
    let data = Arc::new(FailingFlush {
        inner: MemStorage::new(64 * bs.bytes()),
        fail: std::sync::atomic::AtomicBool::new(false),
    });
    let pool = Pool::format_on(meta.clone(), data.clone(), bs, Duration::ZERO, None).unwrap();
    pool.create_thin(ThinId(1)).unwrap();
    pool.write(ThinId(1), 0, &[0xAA; 4096]).unwrap();
    pool.commit().unwrap();
    pool.write(ThinId(1), 1 << 20, &[0xBB; 4096]).unwrap();
    data.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = pool.commit().unwrap_err();
    assert!(e.to_string().contains("data device flush"), "{e}");
    // Poisoned: the retry (whose fdatasync would now succeed) must not commit.
    assert!(matches!(pool.commit(), Err(Error::Poisoned(_))));
    assert!(pool.write(ThinId(1), 0, b"x").is_err());
    drop(pool);
    let pool = Pool::open_on(meta, data, &quiet()).unwrap();
    let mut buf = vec![0u8; 4096];
    pool.read(ThinId(1), 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0xAA; 4096], "the committed write survives");
    pool.read(ThinId(1), 1 << 20, &mut buf).unwrap();
    assert_eq!(
        buf,
        vec![0; 4096],
        "the write whose flush failed was never committed"
    );
    assert!(pool.check().unwrap().is_clean());
}
