//! Crash-consistency tests, in the style of redb's `crash_consistency.rs`.
//!
//! A pool is formatted on two [`CrashStorage`] devices of one [`CrashSim`] (metadata
//! 2 MiB, data 8 MiB, 64 KiB blocks, no background committer). A deterministic
//! workload (creates, snapshots, whole- and sub-block writes into unprovisioned,
//! exclusive and snapshot-shared blocks, discards, deletes, a commit every few ops)
//! runs once as a *reference* run that counts the sim's events and records the model
//! state at every successful commit. It is then replayed from scratch with
//! `set_crash_after(n)` for every event `n` after the format (or a stride of them);
//! the replay stops at the first error (the power loss). For each crash mode
//! (Durable, AllPending, several Random seeds) the post-crash images of both devices
//! are wrapped in `MemStorage` and reopened with `Pool::open_on`.
//!
//! # What is asserted
//! Every commit `k` is preceded by `set_transaction_id(k - 1, k)`, so the reopened
//! pool's transaction id names the commit it shows. With `k` = the number of commits
//! that returned Ok before the crash:
//! * the pool opens;
//! * its transaction id is `k`, or `k + 1` only if the crash hit inside commit `k + 1`;
//! * for id `k + 1` the pool must equal committed state `k + 1` *exactly*;
//! * for id `k` the pool must equal committed state `k`: the same set of devices,
//!   exactly the same mappings (virtual block -> data block; the engine is
//!   deterministic, so a replay allocates the same blocks as the reference run), and
//!   the same content of every device read through the pool, byte for byte, with one
//!   precisely bounded exception below;
//! * engine-side checks: every device's `mapped_blocks` equals its number of
//!   mappings, every mapped data block is inside the data device, and the data space
//!   map's used count equals the number of distinct mapped data blocks (no leak, no
//!   double use; thin_check 0.9.0 does not check data space-map counts);
//! * on a sample of crash points (every 7th, and every point inside a commit):
//!   `thin_check` on every distinct metadata image exits 0 with no warnings, and the
//!   recovered pool (Durable and AllPending images) is *usable*: writes (in-place,
//!   COW and provisioning) to every device plus a new device, a commit and a reopen
//!   give exactly the expected contents (this catches space maps that hand out blocks
//!   still in use after recovery); on every 7th point thin_check also checks the
//!   metadata of that first post-recovery commit.
//!
//! Identical image pairs (e.g. every mode when nothing was pending) are verified once.
//! `THINVOL_CRASH_STRIDE=s` checks only every s-th crash point (default: all).
//!
//! # Uncommitted in-place writes (the one exception)
//! A write to a block that is provisioned and exclusive is done in place on the data
//! device, and is durable only at the next commit; a crash before then may keep any
//! subset of its sectors. Such writes may therefore show through in committed state
//! `k`, but only where that is legitimate. The model tracks, per (device, virtual
//! block), whether the block may be written in place *without touching anything
//! else committed state `k` can see*: the block is mapped in state `k` to a data block
//! no other mapping of state `k` references, and since commit `k` the device has not
//! been snapshotted, nor the block discarded whole, nor the device deleted. Writes
//! (and partial-block discards, which zero in place) to such blocks since commit `k`,
//! including the op the crash interrupted, are recorded; a byte of state `k` may
//! differ from the model only if one of those recorded writes put exactly that value
//! at exactly that byte. Everything else — other devices, blocks shared in state `k`,
//! blocks provisioned or COW-copied since — must match exactly. (Per byte, not per
//! sector: `CrashMode::Random` can combine partial-sector writes in any order.)
//! Device ids are never reused, so a write to a re-created device can never be
//! mistaken for a legitimate write to its predecessor.
//!
//! `uncommitted_in_place_writes` checks the same rule on small focused scenarios, and
//! `crash_during_format` checks that a crash at every event of `Pool::format_on`
//! leaves metadata that either opens as an empty pool or fails with a clean
//! `Unformatted` / `Corrupt` / `Inconsistent` error (never a panic).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::storage::{CrashMode, CrashSim, CrashStorage, MemStorage, Storage};
use thinvol_engine::{Error, OpenOptions, Pool};
use thinvol_testkit::SplitMix64;

const BS: u64 = 64 << 10;
const META_SIZE: u64 = 2 << 20;
const DATA_SIZE: u64 = 8 << 20;
/// Size of every thin device in the model (16 blocks).
const DEV_SIZE: u64 = 1 << 20;
const DEV_BLOCKS: u64 = DEV_SIZE / BS;
/// Random crash modes per crash point.
const RANDOM_SEEDS: u64 = 3;

// ---------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Create(u64),
    Snap {
        id: u64,
        origin: u64,
    },
    Write {
        id: u64,
        off: u64,
        len: u64,
        seed: u64,
    },
    Discard {
        id: u64,
        off: u64,
        len: u64,
    },
    Delete(u64),
    /// `set_transaction_id(k - 1, k)` then `commit()`.
    Commit,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xabcd);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The scripted prefix: one instance of every interesting case, in order.
fn scripted_ops() -> Vec<Op> {
    use Op::*;
    let mut s = 0;
    let mut seed = || {
        s += 1;
        s
    };
    let w = |id, off, len, seed: u64| Write { id, off, len, seed };
    vec![
        Create(1),
        w(1, 0, 4 * BS, seed()),           // provision whole blocks 0..4
        w(1, 5 * BS + 1000, 3000, seed()), // sub-block into an unprovisioned block
        Commit,
        w(1, BS + 512, 4096, seed()), // in place, exclusive committed block
        w(1, 2 * BS + 100, 50, seed()),
        w(1, 3 * BS, BS, seed()), // whole-block overwrite of an exclusive block
        Commit,
        Snap { id: 2, origin: 1 },
        w(1, 7, 1000, seed()),           // origin: COW of a shared block
        w(2, BS + 3000, 2000, seed()),   // snapshot: COW of a shared block
        w(2, 500, 700, seed()),          // snapshot, block the origin already broke away from
        w(2, 6 * BS + 10, 20, seed()),   // snapshot, unprovisioned block
        w(1, 5 * BS - 100, 300, seed()), // origin, across a block boundary
        Commit,
        Create(3),
        w(3, 0, 2 * BS, seed()),
        w(3, 3 * BS - 1000, 3000, seed()),
        Discard {
            id: 1,
            off: 2 * BS,
            len: BS,
        }, // whole block shared with the snapshot
        Discard {
            id: 2,
            off: 3 * BS + 100,
            len: 1000,
        }, // partial, shared: COW + zero
        Discard {
            id: 3,
            off: 0,
            len: BS + 4096,
        }, // whole block + partial exclusive
        w(1, 8 * BS, 3 * BS, seed()), // provisioning in a txn that freed blocks
        Commit,
        w(3, BS + 100, 300, seed()), // in place, exclusive committed block
        Snap { id: 4, origin: 2 },
        Delete(2),                  // the snapshot now owns the origin's tree alone
        w(4, BS + 10, 100, seed()), // ... and must still not write in place
        w(4, 6 * BS + 20, 40, seed()),
        Commit,
        Snap { id: 5, origin: 1 },
        Commit,
        Delete(5),                 // origin's blocks were shared at the last commit
        w(1, 100, 200, seed()),    // ... so this must not be in place
        w(1, 15 * BS, BS, seed()), // last block of the device
        Discard {
            id: 1,
            off: 0,
            len: 4 * BS,
        }, // multi-block discard
        Commit,
        Discard {
            id: 3,
            off: 0,
            len: DEV_SIZE,
        },
        Delete(3),
        Commit,
    ]
}

/// Scripted prefix followed by a seeded random phase. Never reuses a device id.
fn workload() -> Vec<Op> {
    let mut v = scripted_ops();
    let mut live: BTreeSet<u64> = [1, 4].into_iter().collect();
    let mut next_id = 6;
    let mut rng = SplitMix64::new(0x7417_c0de);
    let mut seed = 1000;
    let mut since_commit = 0;
    let mut commits = 0;
    while commits < 40 {
        let pick = |rng: &mut SplitMix64, live: &BTreeSet<u64>| {
            *live
                .iter()
                .nth(rng.below(live.len() as u64) as usize)
                .unwrap()
        };
        let r = rng.below(100);
        let op = if r < 45 {
            let id = pick(&mut rng, &live);
            seed += 1;
            if rng.chance(40) {
                let n = 1 + rng.below(3);
                let vb = rng.below(DEV_BLOCKS - n + 1);
                Op::Write {
                    id,
                    off: vb * BS,
                    len: n * BS,
                    seed,
                }
            } else {
                let len = 1 + rng.below(10_000);
                let off = rng.below(DEV_SIZE - len);
                Op::Write { id, off, len, seed }
            }
        } else if r < 60 {
            let id = pick(&mut rng, &live);
            if rng.chance(50) {
                let n = 1 + rng.below(2);
                let vb = rng.below(DEV_BLOCKS - n + 1);
                Op::Discard {
                    id,
                    off: vb * BS,
                    len: n * BS,
                }
            } else {
                let len = 1 + rng.below(2 * BS);
                let off = rng.below(DEV_SIZE - len);
                Op::Discard { id, off, len }
            }
        } else if r < 70 && live.len() < 5 {
            let origin = pick(&mut rng, &live);
            next_id += 1;
            live.insert(next_id);
            Op::Snap {
                id: next_id,
                origin,
            }
        } else if r < 76 && live.len() > 2 {
            let id = pick(&mut rng, &live);
            live.remove(&id);
            Op::Delete(id)
        } else if r < 80 && live.len() < 5 {
            next_id += 1;
            live.insert(next_id);
            Op::Create(next_id)
        } else {
            continue;
        };
        v.push(op);
        since_commit += 1;
        if since_commit >= 2 + rng.below(5) {
            v.push(Op::Commit);
            since_commit = 0;
            commits += 1;
        }
    }
    v.push(Op::Commit);
    v
}

fn apply(pool: &Pool, op: &Op, commits_done: u64) -> thinvol_engine::Result<()> {
    match *op {
        Op::Create(id) => pool.create_thin(ThinId(id)),
        Op::Snap { id, origin } => pool.create_snap(ThinId(id), ThinId(origin)),
        Op::Write { id, off, len, seed } => {
            pool.write(ThinId(id), off, &pattern(seed, len as usize))
        }
        Op::Discard { id, off, len } => pool.discard(ThinId(id), off, len),
        Op::Delete(id) => pool.delete_thin(ThinId(id)),
        Op::Commit => {
            pool.set_transaction_id(commits_done, commits_done + 1)?;
            pool.commit()
        }
    }
}

fn no_committer() -> OpenOptions {
    OpenOptions {
        commit_interval: Duration::ZERO,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// Model and reference run
// ---------------------------------------------------------------------------

type Contents = BTreeMap<u64, Arc<Vec<u8>>>;
type Mappings = BTreeMap<u64, Vec<(u64, u64)>>;

/// The pool as of one successful commit.
struct Committed {
    devices: Contents,
    mappings: Mappings,
}

/// Bytes an uncommitted in-place write may have put into the last committed state.
#[derive(Clone, Debug)]
struct Leak {
    op: usize,
    dev: u64,
    off: u64,
    data: Vec<u8>,
}

struct Reference {
    ops: Vec<Op>,
    /// `commits[k]` = state with transaction id k (0 = freshly formatted).
    commits: Vec<Committed>,
    /// Legitimate in-place bytes recorded by each op (relative to the last commit).
    leaks: Vec<Vec<Leak>>,
    /// Op index of commit k (k >= 1) is `commit_ops[k - 1]`.
    commit_ops: Vec<usize>,
    format_events: u64,
    total_events: u64,
    /// Event counter before/after every op.
    op_events: Vec<(u64, u64)>,
}

fn segments(off: u64, len: u64) -> Vec<(u64, u64, u64)> {
    let mut v = Vec::new();
    let mut pos = off;
    while pos < off + len {
        let vb = pos / BS;
        let o = pos % BS;
        let n = (BS - o).min(off + len - pos);
        v.push((vb, o, n));
        pos += n;
    }
    v
}

fn read_all_mappings(pool: &Pool) -> Mappings {
    let mut m = BTreeMap::new();
    for d in pool.devices().unwrap() {
        let v = pool.mappings(d.id).unwrap();
        m.insert(d.id.0, v.into_iter().map(|(vb, db)| (vb.0, db.0)).collect());
    }
    m
}

/// (device, virtual block) pairs whose data block no other mapping references.
fn exclusive_blocks(m: &Mappings) -> HashSet<(u64, u64)> {
    let mut refs: HashMap<u64, u32> = HashMap::new();
    for v in m.values() {
        for &(_, db) in v {
            *refs.entry(db).or_default() += 1;
        }
    }
    m.iter()
        .flat_map(|(&dev, v)| v.iter().map(move |&(vb, db)| (dev, vb, db)))
        .filter(|(_, _, db)| refs[db] == 1)
        .map(|(dev, vb, _)| (dev, vb))
        .collect()
}

fn new_sim() -> (Arc<CrashSim>, Arc<CrashStorage>, Arc<CrashStorage>) {
    let sim = CrashSim::new();
    let meta = Arc::new(CrashStorage::new(&sim, META_SIZE));
    let data = Arc::new(CrashStorage::new(&sim, DATA_SIZE));
    (sim, meta, data)
}

fn format(meta: &Arc<CrashStorage>, data: &Arc<CrashStorage>) -> thinvol_engine::Result<Pool> {
    Pool::format_on(
        meta.clone() as Arc<dyn Storage>,
        data.clone() as Arc<dyn Storage>,
        DataBlockSize::DEFAULT,
        Duration::ZERO,
        None,
    )
}

fn reference_run(ops: Vec<Op>) -> Reference {
    let (sim, meta, data) = new_sim();
    let pool = format(&meta, &data).expect("format");
    let format_events = sim.events();
    let mut devices: Contents = BTreeMap::new();
    let mut commits = vec![Committed {
        devices: devices.clone(),
        mappings: BTreeMap::new(),
    }];
    let mut inplace_ok: HashSet<(u64, u64)> = HashSet::new();
    let mut leaks = Vec::new();
    let mut commit_ops = Vec::new();
    let mut op_events = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let before = sim.events();
        let k = commits.len() as u64 - 1;
        apply(&pool, op, k).unwrap_or_else(|e| panic!("reference run: op {i} {op:?}: {e}"));
        op_events.push((before, sim.events()));
        let mut op_leaks = Vec::new();
        match *op {
            Op::Create(id) => {
                devices.insert(id, Arc::new(vec![0; DEV_SIZE as usize]));
            }
            Op::Snap { id, origin } => {
                let c = devices[&origin].clone();
                devices.insert(id, c);
                inplace_ok.retain(|&(d, _)| d != origin);
            }
            Op::Delete(id) => {
                devices.remove(&id);
                inplace_ok.retain(|&(d, _)| d != id);
            }
            Op::Write { id, off, len, seed } => {
                let buf = pattern(seed, len as usize);
                let dev = Arc::make_mut(devices.get_mut(&id).unwrap());
                dev[off as usize..(off + len) as usize].copy_from_slice(&buf);
                for (vb, o, n) in segments(off, len) {
                    if inplace_ok.contains(&(id, vb)) {
                        let a = (vb * BS + o - off) as usize;
                        op_leaks.push(Leak {
                            op: i,
                            dev: id,
                            off: vb * BS + o,
                            data: buf[a..a + n as usize].to_vec(),
                        });
                    }
                }
            }
            Op::Discard { id, off, len } => {
                let dev = Arc::make_mut(devices.get_mut(&id).unwrap());
                dev[off as usize..(off + len) as usize].fill(0);
                for (vb, o, n) in segments(off, len) {
                    if n == BS {
                        inplace_ok.remove(&(id, vb));
                    } else if inplace_ok.contains(&(id, vb)) {
                        op_leaks.push(Leak {
                            op: i,
                            dev: id,
                            off: vb * BS + o,
                            data: vec![0; n as usize],
                        });
                    }
                }
            }
            Op::Commit => {
                let mappings = read_all_mappings(&pool);
                inplace_ok = exclusive_blocks(&mappings);
                commits.push(Committed {
                    devices: devices.clone(),
                    mappings,
                });
                commit_ops.push(i);
            }
        }
        leaks.push(op_leaks);
        // The workload must never make the pool commit on its own (a discard does when
        // metadata runs low): every commit must be one of ours.
        let st = pool.status().unwrap();
        assert!(
            st.metadata_blocks_total - st.metadata_blocks_used > 200,
            "op {i}: metadata nearly full ({st:?}); shrink the workload"
        );
    }
    // Sanity of the reference itself: the live pool matches the model.
    let last = commits.last().unwrap();
    check_state(&pool, last, &[], "reference").unwrap();
    drop(pool);
    Reference {
        ops,
        commits,
        leaks,
        commit_ops,
        format_events,
        total_events: sim.events(),
        op_events,
    }
}

/// Result of a replay with a crash.
struct Replay {
    sim: Arc<CrashSim>,
    /// Commits that returned Ok.
    ok_commits: usize,
    /// Index of the op that failed (None: format failed or nothing failed).
    failed_op: Option<usize>,
}

fn replay(r: &Reference, crash_after: u64) -> Result<Replay, String> {
    let (sim, meta, data) = new_sim();
    sim.set_crash_after(crash_after);
    let pool = match format(&meta, &data) {
        Ok(p) => p,
        Err(_) if sim.is_crashed() => {
            return Ok(Replay {
                sim,
                ok_commits: 0,
                failed_op: None,
            });
        }
        Err(e) => return Err(format!("format failed without a crash: {e}")),
    };
    let mut ok_commits = 0;
    let mut failed_op = None;
    for (i, op) in r.ops.iter().enumerate() {
        match apply(&pool, op, ok_commits as u64) {
            Ok(()) => {
                if matches!(op, Op::Commit) {
                    ok_commits += 1;
                }
            }
            Err(e) => {
                if !sim.is_crashed() {
                    return Err(format!("op {i} {op:?} failed without a crash: {e}"));
                }
                failed_op = Some(i);
                break;
            }
        }
    }
    // After the crash the pool only sees errors; dropping it tries a final commit that
    // fails harmlessly.
    drop(pool);
    Ok(Replay {
        sim,
        ok_commits,
        failed_op,
    })
}

// ---------------------------------------------------------------------------
// Checks of a reopened pool
// ---------------------------------------------------------------------------

/// Compares a reopened pool with committed state `c`; `leaks` are the in-place bytes
/// that may show through.
fn check_state(pool: &Pool, c: &Committed, leaks: &[&Leak], what: &str) -> Result<(), String> {
    let infos = pool
        .devices()
        .map_err(|e| format!("{what}: devices(): {e}"))?;
    let ids: Vec<u64> = infos.iter().map(|d| d.id.0).collect();
    let want: Vec<u64> = c.devices.keys().copied().collect();
    if ids != want {
        return Err(format!("{what}: devices {ids:?}, expected {want:?}"));
    }
    let st = pool
        .status()
        .map_err(|e| format!("{what}: status(): {e}"))?;
    let mut distinct = HashSet::new();
    for d in &infos {
        let m = pool
            .mappings(d.id)
            .map_err(|e| format!("{what}: mappings({}): {e}", d.id))?;
        let m: Vec<(u64, u64)> = m.into_iter().map(|(v, b)| (v.0, b.0)).collect();
        if d.mapped_blocks != m.len() as u64 {
            return Err(format!(
                "{what}: device {} says {} mapped blocks but has {} mappings",
                d.id,
                d.mapped_blocks,
                m.len()
            ));
        }
        for &(vb, db) in &m {
            if db >= st.data_blocks_total {
                return Err(format!(
                    "{what}: device {} block {vb} maps data block {db} beyond the device",
                    d.id
                ));
            }
            distinct.insert(db);
        }
        // `mappings` is empty for states whose block numbers are not known.
        if let Some(cm) = c.mappings.get(&d.id.0) {
            if *cm != m {
                return Err(format!(
                    "{what}: device {} mappings differ from the commit's:\n  got      {m:?}\n  expected {cm:?}",
                    d.id
                ));
            }
        }
        let mut buf = vec![0u8; DEV_SIZE as usize];
        pool.read(d.id, 0, &mut buf)
            .map_err(|e| format!("{what}: read({}): {e}", d.id))?;
        let exp = &c.devices[&d.id.0];
        if buf != **exp {
            let dl: Vec<&&Leak> = leaks.iter().filter(|l| l.dev == d.id.0).collect();
            for (o, (&got, &e)) in buf.iter().zip(exp.iter()).enumerate() {
                if got == e {
                    continue;
                }
                let o = o as u64;
                let ok = dl.iter().any(|l| {
                    o >= l.off
                        && o < l.off + l.data.len() as u64
                        && l.data[(o - l.off) as usize] == got
                });
                if !ok {
                    let ops: BTreeSet<usize> = dl.iter().map(|l| l.op).collect();
                    return Err(format!(
                        "{what}: device {} byte {o} (block {}, offset {}) is {got:#04x}, \
                         committed {e:#04x}; legitimate in-place writes to this device \
                         came from ops {ops:?}",
                        d.id,
                        o / BS,
                        o % BS
                    ));
                }
            }
        }
    }
    if st.data_blocks_used != distinct.len() as u64 {
        return Err(format!(
            "{what}: data space map says {} blocks used, mappings reference {} distinct blocks",
            st.data_blocks_used,
            distinct.len()
        ));
    }
    Ok(())
}

fn run_thin_check(meta: &[u8], dir: &Path) -> Result<(), String> {
    static FILES: AtomicUsize = AtomicUsize::new(0);
    let path = dir.join(format!("meta-{}", FILES.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, meta).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let out = thinvol_testkit::thin_check(&path).map_err(|e| format!("thin_check: {e}"))?;
    let _ = std::fs::remove_file(&path);
    let p = out.problems();
    if p.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "thin_check not clean: {}\n--- stdout ---\n{}--- stderr ---\n{}",
            p.join("; "),
            out.stdout,
            out.stderr
        ))
    }
}

/// After recovery the pool must keep working: write to every device (in place, COW or
/// provisioning, whatever each block needs) and to a new device, commit, reopen, and
/// find exactly what was written, with everything else untouched.
/// With `thin_check_dir`, also runs thin_check on the metadata the engine wrote.
fn check_usable(
    meta: Arc<MemStorage>,
    data: Arc<MemStorage>,
    thin_check_dir: Option<&Path>,
    what: &str,
) -> Result<(), String> {
    let pool = Pool::open_on(meta.clone(), data.clone(), &no_committer())
        .map_err(|e| format!("{what}: reopen: {e}"))?;
    let mut expect: Contents = BTreeMap::new();
    for d in pool.devices().map_err(|e| e.to_string())? {
        let mut buf = vec![0u8; DEV_SIZE as usize];
        pool.read(d.id, 0, &mut buf).map_err(|e| e.to_string())?;
        expect.insert(d.id.0, Arc::new(buf));
    }
    let mut writes = Vec::new();
    for (i, &id) in expect.keys().enumerate() {
        let i = i as u64;
        writes.push((id, (i % DEV_BLOCKS) * BS + 777, 5000, 90_000 + i));
        writes.push((id, ((i + 7) % DEV_BLOCKS) * BS, BS, 91_000 + i));
    }
    let new_id = 1_000_000;
    pool.create_thin(ThinId(new_id))
        .map_err(|e| format!("{what}: create after recovery: {e}"))?;
    expect.insert(new_id, Arc::new(vec![0; DEV_SIZE as usize]));
    writes.push((new_id, 0, 2 * BS, 92_000));
    writes.push((new_id, 5 * BS + 3, 10, 92_001));
    for &(id, off, len, seed) in &writes {
        let buf = pattern(seed, len as usize);
        match pool.write(ThinId(id), off, &buf) {
            Ok(()) => {}
            // A nearly full data device is not a recovery failure.
            Err(Error::NoSpace(_)) => return Ok(()),
            Err(e) => return Err(format!("{what}: write after recovery: {e}")),
        }
        Arc::make_mut(expect.get_mut(&id).unwrap())[off as usize..(off + len) as usize]
            .copy_from_slice(&buf);
    }
    pool.commit()
        .map_err(|e| format!("{what}: commit after recovery: {e}"))?;
    drop(pool);
    let pool = Pool::open_on(meta.clone(), data, &no_committer())
        .map_err(|e| format!("{what}: reopen after recovery commit: {e}"))?;
    let c = Committed {
        devices: expect,
        mappings: BTreeMap::new(),
    };
    check_state(
        &pool,
        &c,
        &[],
        &format!("{what} (after writes post recovery)"),
    )?;
    drop(pool);
    if let Some(dir) = thin_check_dir {
        run_thin_check(&meta.snapshot(), dir)
            .map_err(|e| format!("{what}: after the first commit post recovery: {e}"))?;
    }
    Ok(())
}

/// Everything about one post-crash image pair.
#[allow(clippy::too_many_arguments)]
fn verify_image(
    r: &Reference,
    rep: &Replay,
    meta: Vec<u8>,
    data: Vec<u8>,
    thin_check: bool,
    usable: bool,
    usable_thin_check: bool,
    dir: &Path,
    what: &str,
) -> Result<(), String> {
    let k = rep.ok_commits;
    let in_commit = rep
        .failed_op
        .is_some_and(|i| matches!(r.ops[i], Op::Commit));
    let meta_img = thin_check.then(|| meta.clone());
    let ms = Arc::new(MemStorage::from_bytes(meta));
    let ds = Arc::new(MemStorage::from_bytes(data));
    let pool = Pool::open_on(ms.clone(), ds.clone(), &no_committer())
        .map_err(|e| format!("{what}: open failed: {e}"))?;
    let tid = pool.status().map_err(|e| e.to_string())?.transaction_id as usize;
    if tid == k + 1 && in_commit {
        check_state(&pool, &r.commits[k + 1], &[], what)?;
    } else if tid == k {
        // Legitimate in-place writes since commit k, up to and including the failed op.
        let first = if k == 0 { 0 } else { r.commit_ops[k - 1] + 1 };
        let end = rep.failed_op.map_or(r.ops.len(), |i| i + 1);
        let leaks: Vec<&Leak> = r.leaks[first..end.max(first)].iter().flatten().collect();
        check_state(&pool, &r.commits[k], &leaks, what)?;
    } else {
        return Err(format!(
            "{what}: pool is at transaction {tid}; {k} commits returned Ok{}",
            if in_commit {
                format!(" and commit {} was in progress", k + 1)
            } else {
                String::new()
            }
        ));
    }
    drop(pool);
    if let Some(m) = meta_img {
        run_thin_check(&m, dir).map_err(|e| format!("{what}: {e}"))?;
    }
    if usable {
        check_usable(ms, ds, usable_thin_check.then_some(dir), what)?;
    }
    Ok(())
}

fn modes(n: u64) -> Vec<CrashMode> {
    let mut v = vec![CrashMode::Durable, CrashMode::AllPending];
    for i in 0..RANDOM_SEEDS {
        v.push(CrashMode::Random {
            seed: n.wrapping_mul(1000) + i,
        });
    }
    v
}

fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn crash_consistency_workload() {
    let t0 = Instant::now();
    let r = reference_run(workload());
    let n_ops = r.ops.len();
    let n_commits = r.commits.len() - 1;
    // Crash points: every event after the format (crashes inside the format are
    // `crash_during_format`'s job), or a stride when there are too many.
    let stride: u64 = std::env::var("THINVOL_CRASH_STRIDE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let in_commit: HashSet<u64> = r
        .commit_ops
        .iter()
        .flat_map(|&i| r.op_events[i].0..r.op_events[i].1)
        .collect();
    let points: Vec<u64> = (r.format_events..r.total_events)
        .filter(|n| (n - r.format_events).is_multiple_of(stride))
        .collect();
    eprintln!(
        "workload: {n_ops} ops, {n_commits} commits, {} events ({} in format), {} crash points",
        r.total_events,
        r.format_events,
        points.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<String>::new());
    let images = AtomicUsize::new(0);
    let distinct = AtomicUsize::new(0);
    let thin_checks = AtomicUsize::new(0);
    let usables = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers() {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&n) = points.get(i) else { break };
                // thin_check and the usability check are slow: sample them.
                let every7th = (n - r.format_events).is_multiple_of(7);
                let sample = every7th || in_commit.contains(&n);
                let res = catch(|| {
                    let rep = replay(&r, n).map_err(|e| format!("crash after {n}: {e}"))?;
                    let mut seen: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                    let mut checked_meta: Vec<Vec<u8>> = Vec::new();
                    for mode in modes(n) {
                        let mut imgs = rep.sim.images(mode);
                        let data = imgs.pop().unwrap();
                        let meta = imgs.pop().unwrap();
                        images.fetch_add(1, Ordering::Relaxed);
                        if seen.iter().any(|(m, d)| *m == meta && *d == data) {
                            continue; // same bytes as a mode already checked
                        }
                        distinct.fetch_add(1, Ordering::Relaxed);
                        // thin_check each distinct metadata image of a sampled point;
                        // check usability of the Durable and AllPending images.
                        let tc = sample && !checked_meta.contains(&meta);
                        if tc {
                            checked_meta.push(meta.clone());
                            thin_checks.fetch_add(1, Ordering::Relaxed);
                        }
                        let us =
                            sample && matches!(mode, CrashMode::Durable | CrashMode::AllPending);
                        if us {
                            usables.fetch_add(1, Ordering::Relaxed);
                        }
                        let op = rep
                            .failed_op
                            .map_or("-".to_string(), |i| format!("{i} {:?}", r.ops[i]));
                        let what = format!(
                            "crash after event {n} (op {op}, {} commits ok), {mode:?}",
                            rep.ok_commits
                        );
                        verify_image(
                            &r,
                            &rep,
                            meta.clone(),
                            data.clone(),
                            tc,
                            us,
                            us && every7th,
                            dir.path(),
                            &what,
                        )?;
                        seen.push((meta, data));
                    }
                    Ok(())
                });
                if let Err(e) = res {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "{} crash points x {} modes = {} images ({} distinct) verified, {} thin_check runs, \
         {} usability checks, in {:.1?}; {} failures",
        points.len(),
        modes(0).len(),
        images.load(Ordering::Relaxed),
        distinct.load(Ordering::Relaxed),
        thin_checks.load(Ordering::Relaxed),
        usables.load(Ordering::Relaxed),
        t0.elapsed(),
        failures.len()
    );
    if !failures.is_empty() {
        let mut f = failures;
        f.sort();
        panic!(
            "{} crash points failed; first ones:\n{}",
            f.len(),
            f.iter().take(15).cloned().collect::<Vec<_>>().join("\n\n")
        );
    }
}

/// Focused scenarios for writes after the last commit: a block written in place may
/// show old or new bytes after a crash, but a block that the last commit shows through
/// another device (or through the same device before a snapshot) must be untouched.
#[test]
fn uncommitted_in_place_writes() {
    use Op::*;
    let w = |id, off, len, seed| Write { id, off, len, seed };
    let scenarios: Vec<(&str, Vec<Op>)> = vec![
        (
            "in-place sub-block writes to an exclusive committed block",
            vec![
                Create(1),
                w(1, 0, BS, 1),
                Commit,
                w(1, 100, 1000, 2),
                w(1, 600, 3000, 3), // overlaps the previous one
                w(1, BS - 7, 7, 4),
                Discard {
                    id: 1,
                    off: 2000,
                    len: 100,
                },
                Commit,
            ],
        ),
        (
            "snapshot, origin breaks sharing, then the snapshot writes the old block",
            vec![
                Create(1),
                w(1, 0, 2 * BS, 1),
                Commit,
                Snap { id: 2, origin: 1 },
                w(1, 10, 10, 2),
                w(2, 1000, 2000, 3),
                Commit,
            ],
        ),
        (
            "snapshot deleted after the commit, origin writes a block it shared",
            vec![
                Create(1),
                w(1, 0, 2 * BS, 1),
                Snap { id: 2, origin: 1 },
                Commit,
                Delete(2),
                w(1, BS + 5, 500, 2),
                Commit,
            ],
        ),
        (
            "origin deleted after snapshotting it, snapshot writes the origin's block",
            vec![
                Create(1),
                w(1, 0, 2 * BS, 1),
                Commit,
                Snap { id: 2, origin: 1 },
                Delete(1),
                w(2, 5, 500, 2),
                Commit,
            ],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut report = Vec::new();
    let mut total = 0;
    for (name, ops) in scenarios {
        let r = reference_run(ops);
        let before = failures.len();
        for n in r.format_events..r.total_events {
            let res = catch(|| {
                let rep = replay(&r, n)?;
                for mode in modes(n)
                    .into_iter()
                    .chain((10..20).map(|seed| CrashMode::Random { seed }))
                {
                    total += 1;
                    let mut imgs = rep.sim.images(mode);
                    let data = imgs.pop().unwrap();
                    let meta = imgs.pop().unwrap();
                    let what = format!("{name}: crash after event {n}, {mode:?}");
                    verify_image(
                        &r,
                        &rep,
                        meta,
                        data,
                        mode == CrashMode::AllPending,
                        mode == CrashMode::AllPending,
                        mode == CrashMode::AllPending,
                        dir.path(),
                        &what,
                    )?;
                }
                Ok(())
            });
            if let Err(e) = res {
                failures.push(e);
            }
        }
        // The first failing crash point of each scenario.
        if failures.len() > before {
            report.push(format!(
                "{} of {} crash points failed; first: {}",
                failures.len() - before,
                r.total_events - r.format_events,
                failures[before]
            ));
        }
    }
    eprintln!("{total} images checked, {} failures", failures.len());
    assert!(
        report.is_empty(),
        "{} crash points failed:\n{}",
        failures.len(),
        report.join("\n\n")
    );
}

/// A crash at any event of `Pool::format_on` leaves metadata that opens as an empty
/// pool, or is refused with a clean error; never a panic, never garbage.
#[test]
fn crash_during_format() {
    let (sim, meta, data) = new_sim();
    drop(format(&meta, &data).unwrap());
    let n_events = sim.events();
    drop((meta, data));
    assert!(n_events > 3, "format has only {n_events} events");
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let (mut opened, mut refused) = (0, 0);
    for n in 0..=n_events {
        let (sim, meta, data) = new_sim();
        sim.set_crash_after(n);
        let r = format(&meta, &data);
        let formatted = r.is_ok();
        if n < n_events {
            assert!(!formatted, "format survived a crash at event {n}");
        }
        drop(r);
        for mode in modes(n)
            .into_iter()
            .chain((10..20).map(|seed| CrashMode::Random { seed }))
        {
            let what = format!("crash after format event {n}/{n_events}, {mode:?}");
            let mut imgs = sim.images(mode);
            let data = imgs.pop().unwrap();
            let meta_img = imgs.pop().unwrap();
            let res = catch(|| {
                let ms = Arc::new(MemStorage::from_bytes(meta_img.clone()));
                let ds = Arc::new(MemStorage::from_bytes(data));
                match Pool::open_on(ms.clone(), ds.clone(), &no_committer()) {
                    Ok(pool) => {
                        let st = pool.status().map_err(|e| e.to_string())?;
                        let devs = pool.devices().map_err(|e| e.to_string())?;
                        if !devs.is_empty() || st.transaction_id != 0 || st.data_blocks_used != 0 {
                            return Err(format!(
                                "{what}: opened a non-empty pool: {st:?} {devs:?}"
                            ));
                        }
                        drop(pool);
                        run_thin_check(&meta_img, dir.path())
                            .map_err(|e| format!("{what}: {e}"))?;
                        check_usable(ms, ds, Some(dir.path()), &what)?;
                        Ok(true)
                    }
                    Err(Error::Unformatted | Error::Corrupt(_) | Error::Inconsistent { .. }) => {
                        if formatted {
                            return Err(format!("{what}: a completed format does not open"));
                        }
                        Ok(false)
                    }
                    Err(e) => Err(format!(
                        "{what}: open failed with an unexpected error: {e:?}"
                    )),
                }
            });
            match res {
                Ok(true) => opened += 1,
                Ok(false) => refused += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    eprintln!("format: {n_events} events; {opened} images opened empty, {refused} refused cleanly");
    assert!(
        failures.is_empty(),
        "{} failures; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    assert!(opened > 0 && refused > 0);
}
