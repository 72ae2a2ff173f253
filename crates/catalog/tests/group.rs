//! A multi-volume snapshot is atomic: with writes running on two volumes, both
//! snapshots of one `thinvol snapshot A@s B@s` come from one commit.
//!
//! Two writer threads write through clones of the pool handle in a fixed interleaving,
//! coordinated by a shared turn counter: A writes record 1, then B writes record 1, then
//! A record 2, B record 2, ... Record `n` of a volume goes to block `n % NB` (a 4 KiB
//! write in place, or every third one a whole-block write that provisions or copies),
//! and the writers flush (commit) now and then. Any single instant of this history has
//! `nA - nB` in {0, 1}, where `nX` is the last record volume X has received, and every
//! block of X holds the newest record `<= nX` that maps to it.
//!
//! The main thread takes group snapshots (`ops::snapshot` with both names: one catalog
//! change, one pool transaction, which drains in-flight writes and holds new ones off
//! until it has committed) while the writers run, reads both snapshots back and checks
//! them against that rule, then destroys them. `checker_detects_separate_snapshots`
//! shows the check is not vacuous: two separate snapshots with writes in between fail
//! it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinvol_catalog::{ops, CatalogPool, Name, Settings};
use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::{OpenOptions, Pool, PoolConfig};

const POOL: &str = "tank";
const BS: u64 = 64 << 10;
/// Blocks of each volume the writers cycle through.
const NB: u64 = 8;
const RECORD: usize = 4096;
const MAGIC: u64 = 0x7468_696e_766f_6c67; // "thinvolg"

fn name(s: &str) -> Name {
    Name::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("thinvol-catalog-group")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// Record `n` of volume `vol` (0 = A, 1 = B): magic, vol, n, then bytes derived from
/// them, so a torn or misplaced record is detected.
fn record(vol: u64, n: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&vol.to_le_bytes());
    b[16..24].copy_from_slice(&n.to_le_bytes());
    let mut x = (vol << 40) ^ n;
    for c in b[24..].iter_mut() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *c = (x >> 56) as u8;
    }
    b
}

/// The last record a snapshot of volume `vol` shows, after checking that every block
/// holds exactly what the history prefix ending at that record puts there.
fn last_record(pool: &Pool, id: ThinId, vol: u64, label: &str) -> u64 {
    let mut found = [0u64; NB as usize];
    for (j, slot) in found.iter_mut().enumerate() {
        let mut buf = vec![0u8; BS as usize];
        pool.read(id, j as u64 * BS, &mut buf)
            .expect("read snapshot");
        if buf.iter().all(|&x| x == 0) {
            continue;
        }
        let n = u64::from_le_bytes(buf[16..24].try_into().expect("8"));
        assert_eq!(
            &buf[..RECORD],
            &record(vol, n, RECORD)[..],
            "{label}: block {j} holds a damaged record"
        );
        assert_eq!(n % NB, j as u64, "{label}: record {n} in block {j}");
        *slot = n;
    }
    let last = found.iter().copied().max().unwrap_or(0);
    for (j, &n) in found.iter().enumerate() {
        // The newest record <= last that maps to block j.
        let want = (0..=last)
            .rev()
            .find(|m| *m > 0 && m % NB == j as u64)
            .unwrap_or(0);
        assert_eq!(
            n, want,
            "{label}: block {j} holds record {n}, but the last record is {last} (expected {want}): not a single instant"
        );
    }
    last
}

struct Writers {
    turn: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Start the two writers on volumes `a` and `b`.
fn start_writers(pool: &Pool, a: ThinId, b: ThinId) -> Writers {
    let turn = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads = [(0u64, a), (1u64, b)]
        .into_iter()
        .map(|(me, id)| {
            let (pool, turn, stop) = (pool.clone(), turn.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut writes = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let t = turn.load(Ordering::Acquire);
                    if t % 2 != me {
                        std::thread::yield_now();
                        continue;
                    }
                    let n = t / 2 + 1;
                    let len = if n % 3 == 0 { BS as usize } else { RECORD };
                    pool.write(id, (n % NB) * BS, &record(me, n, len))
                        .expect("writer");
                    writes += 1;
                    if writes.is_multiple_of(32) {
                        pool.flush().expect("flush");
                    }
                    turn.store(t + 1, Ordering::Release);
                }
            })
        })
        .collect();
    Writers {
        turn,
        stop,
        threads,
    }
}

impl Writers {
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().expect("writer thread");
        }
        self.turn.load(Ordering::Acquire)
    }

    /// Wait until the writers have made `k` more writes.
    fn advance(&self, k: u64) {
        let t0 = self.turn.load(Ordering::Acquire);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.turn.load(Ordering::Acquire) < t0 + k {
            assert!(Instant::now() < deadline, "writers stalled");
            std::thread::yield_now();
        }
    }
}

fn setup(dir: &Path) -> (CatalogPool, ThinId, ThinId) {
    let cfg = PoolConfig {
        data_block_size: DataBlockSize::from_bytes(BS).expect("bs"),
        data_size: 64 << 20,
        metadata_size: None,
        commit_interval: Duration::ZERO,
    };
    let mut cp = CatalogPool::create(POOL, dir, &cfg, Settings::default()).expect("create");
    ops::create_volume(&mut cp, &name("tank/a"), NB * BS).expect("a");
    ops::create_volume(&mut cp, &name("tank/b"), NB * BS).expect("b");
    let a = cp.thin_of(&name("tank/a")).expect("a");
    let b = cp.thin_of(&name("tank/b")).expect("b");
    (cp, a, b)
}

/// Check a pair of snapshots; returns (nA, nB).
fn check_pair(cp: &CatalogPool, sa: &str, sb: &str, label: &str) -> (u64, u64) {
    let na = last_record(&cp.pool, cp.thin_of(&name(sa)).expect("sa"), 0, label);
    let nb = last_record(&cp.pool, cp.thin_of(&name(sb)).expect("sb"), 1, label);
    (na, nb)
}

#[test]
fn group_snapshot_is_one_instant_under_writes() {
    let t0 = Instant::now();
    let root = scratch();
    let dir = root.path().join("pool");
    let (mut cp, a, b) = setup(&dir);
    let w = start_writers(&cp.pool, a, b);
    w.advance(10);

    const ITER: u64 = 1000;
    let mut seen = BTreeSet::new();
    let (mut equal, mut ahead) = (0, 0);
    let mut rng = 0x1234_5678_u64;
    for i in 0..ITER {
        // Let the writers run a little, a varying amount.
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        w.advance(1 + (rng >> 60));
        let (sa, sb) = (format!("tank/a@g{i}"), format!("tank/b@g{i}"));
        ops::snapshot(&mut cp, &[name(&sa), name(&sb)]).expect("group snapshot");
        let label = format!("group snapshot {i}");
        let (na, nb) = check_pair(&cp, &sa, &sb, &label);
        assert!(
            na == nb || na == nb + 1,
            "{label}: a shows record {na}, b shows record {nb}: not one commit"
        );
        if na == nb {
            equal += 1;
        } else {
            ahead += 1;
        }
        seen.insert(na + nb);
        let ga = &cp
            .catalog
            .snapshot(POOL, "a", &format!("g{i}"))
            .expect("a")
            .group;
        let gb = &cp
            .catalog
            .snapshot(POOL, "b", &format!("g{i}"))
            .expect("b")
            .group;
        assert!(
            ga.is_some() && ga == gb,
            "{label}: not recorded as one group"
        );
        // Keep the last one; destroy the others (keeps the pool small).
        if i + 1 < ITER {
            ops::destroy(&mut cp, &name(&sa), false).expect("destroy");
            ops::destroy(&mut cp, &name(&sb), false).expect("destroy");
        }
    }
    let writes = w.stop();
    assert!(
        seen.len() as u64 > ITER / 2,
        "snapshots caught too few distinct instants: {}",
        seen.len()
    );
    assert!(
        equal > 0 && ahead > 0,
        "snapshots never fell between A's and B's write ({equal} equal, {ahead} ahead)"
    );

    // The last group survives a reopen unchanged.
    let last = ITER - 1;
    let (sa, sb) = (format!("tank/a@g{last}"), format!("tank/b@g{last}"));
    let before = check_pair(&cp, &sa, &sb, "last group");
    cp.close().expect("close");
    let opts = OpenOptions {
        commit_interval: Duration::ZERO,
        read_only: false,
    };
    let cp = CatalogPool::open_with(POOL, &dir, &opts).expect("reopen");
    cp.verify_devices().expect("verify");
    assert_eq!(check_pair(&cp, &sa, &sb, "last group after reopen"), before);
    let rep = cp.pool.check().expect("check");
    assert!(rep.is_clean(), "pool check: {:?}", rep.problems);
    cp.close().expect("close");
    if thinvol_testkit::tools_available() {
        let out = thinvol_testkit::thin_check(&dir.join(thinvol_engine::METADATA_FILE))
            .expect("thin_check");
        assert!(out.is_clean(), "thin_check: {:?}", out.problems());
    }
    eprintln!(
        "group snapshots: {ITER} under {writes} interleaved writes: {equal} between rounds, {ahead} between A and B, {} distinct instants, {:.1}s",
        seen.len(),
        t0.elapsed().as_secs_f64()
    );
}

/// The check above can fail: two separate snapshots with writes between them show
/// records that no single instant had.
#[test]
fn checker_detects_separate_snapshots() {
    let root = scratch();
    let (mut cp, a, b) = setup(&root.path().join("pool"));
    let w = start_writers(&cp.pool, a, b);
    for i in 0..5 {
        w.advance(3);
        let (sa, sb) = (format!("tank/a@s{i}"), format!("tank/b@s{i}"));
        ops::snapshot(&mut cp, &[name(&sa)]).expect("snapshot a");
        w.advance(4);
        ops::snapshot(&mut cp, &[name(&sb)]).expect("snapshot b");
        let (na, nb) = check_pair(&cp, &sa, &sb, "separate");
        assert!(
            !(na == nb || na == nb + 1),
            "separate snapshots {na}/{nb} passed the one-instant check"
        );
    }
    w.stop();
    cp.close().expect("close");
}
