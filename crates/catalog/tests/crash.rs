//! Crash tests between the catalog and the pool's thin metadata.
//!
//! A catalog change (`CatalogPool::change`) writes `catalog.pending.json`, commits the
//! pool (its superblock write is the commit point) and renames the pending catalog over
//! `catalog.json`; opening recovers from a crash anywhere in between. Three tests kill
//! that sequence at every step:
//!
//! * `failpoint_at_every_step`: every operation (create, snapshot, group snapshot,
//!   destroy of a snapshot / a volume / a clone / `-r`, clone, rollback with and without
//!   `--keep-current`, rename of a volume and of a snapshot, hold, release, resize,
//!   settings, restore of an archived point) runs in a child process (this test binary, re-executed) that aborts at
//!   each failpoint of the change (`thinvol_catalog::failpoint`): before anything, with
//!   the thin operations applied in memory, with the pending catalog's temporary file
//!   fsynced, with the pending catalog durable, after the pool commit, after the rename.
//!   Points after the pool commit are also followed by a second crash inside the
//!   recovery at open. Then the pool must open, name exactly its thin devices, equal the
//!   state before the operation (crash before the commit point) or after it (crash
//!   after), byte for byte on every named device; `Pool::check` and `thin_check` must be
//!   clean, and the recovered pool must take a further change and reopen.
//! * `power_loss_at_every_pool_event`: the same operations on a pool whose devices are
//!   the engine's power-loss simulator (`CrashStorage`), cut at every write and flush
//!   event of the operation (data flushes, metadata writes, the superblock write, the
//!   hole punches after it). Each post-crash image (only flushed writes, all pending
//!   writes, random torn subsets) is reopened with the catalog files as they were at the
//!   instant of the crash, and as the failed operation left them after handling the I/O
//!   error. The state must be the one before or the one after the operation (after,
//!   whenever the operation reported success).
//! * `kill_9_soak`: a child process runs random operations with data writes in a loop
//!   and is SIGKILLed at random times (30 kills); each time the pool must open, name
//!   exactly its devices, and show the last state the child reported committed, or the
//!   one change it was making.
//!
//! Restore (`thinvol restore`) is not covered yet: the archive is not part of the
//! catalog crate yet.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thinvol_catalog::bound::{CATALOG_FILE, PENDING_FILE};
use thinvol_catalog::{ops, CatalogError, CatalogPool, Name, Settings};
use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::storage::{CrashMode, CrashSim, CrashStorage, MemStorage, Storage};
use thinvol_engine::{OpenOptions, Pool, PoolConfig};

const POOL: &str = "tank";
const BS: u64 = 64 << 10;
const DATA_SIZE: u64 = 4 << 20;

const CHILD_ENV: &str = "THINVOL_CRASH_CHILD";
const DIR_ENV: &str = "THINVOL_CRASH_DIR";
const OP_ENV: &str = "THINVOL_CRASH_OP";
const SEED_ENV: &str = "THINVOL_CRASH_SEED";

type Res = thinvol_catalog::Result<()>;

fn name(s: &str) -> Name {
    Name::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A directory for pool files: on tmpfs when there is one (changes fsync), else the
/// default temp dir.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("thinvol-catalog-crash")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// Deterministic bytes for (tag, block).
fn pattern(tag: u8, block: u64, len: usize) -> Vec<u8> {
    let mut x = u64::from(tag) << 32 | block;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

fn write(cp: &CatalogPool, n: &str, block: u64, off: u64, len: usize, tag: u8) {
    let id = cp.thin_of(&name(n)).expect("thin of");
    cp.pool
        .write(id, block * BS + off, &pattern(tag, block, len))
        .expect("write");
}

// ---------------------------------------------------------------------------
// State: what a user can observe through names
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Entry {
    size: u64,
    origin: Option<String>,
    holds: Vec<String>,
    /// The other members of the snapshot's consistency group.
    group: Vec<String>,
    /// sha256 of the device's `size` bytes (None when not compared).
    content: Option<String>,
}

type State = BTreeMap<String, Entry>;

/// A fast 128-bit content digest (not cryptographic; tells test states apart).
fn digest(b: &[u8]) -> String {
    let (mut h1, mut h2) = (0x243f_6a88_85a3_08d3_u64, 0x1319_8a2e_0370_7344_u64);
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h1 = (h1 ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
        h2 = (h2 ^ w.rotate_left(17))
            .wrapping_mul(0xbf58_476d_1ce4_e5b9)
            .rotate_left(31);
    }
    for &x in chunks.remainder() {
        h1 = (h1 ^ u64::from(x)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    h1 ^= b.len() as u64;
    format!("{h1:016x}{h2:016x}")
}

fn read_all(pool: &Pool, id: ThinId, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(size).expect("size")];
    pool.read(id, 0, &mut buf).expect("read device");
    buf
}

/// Every name with its size, origin, holds, group and (when `volumes` / always for
/// snapshots) a digest of its content.
fn state_with(cp: &CatalogPool, volume_contents: bool) -> State {
    state_cached(cp, volume_contents, &mut BTreeMap::new())
}

/// `state_with`, reusing snapshot digests by thin id (snapshots never change).
fn state_cached(
    cp: &CatalogPool,
    volume_contents: bool,
    cache: &mut BTreeMap<u64, String>,
) -> State {
    let c = &cp.catalog;
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (vn, v) in &c.volumes {
        for (sn, s) in &v.snapshots {
            if let Some(g) = &s.group {
                groups
                    .entry(g.clone())
                    .or_default()
                    .push(format!("{vn}@{sn}"));
            }
        }
    }
    let mut st = State::new();
    // The pool's settings, as a pseudo-name (volume names start with a letter or digit).
    st.insert(
        "(settings)".into(),
        Entry {
            size: 0,
            origin: Some(serde_json::to_string(&c.settings).expect("json")),
            holds: Vec::new(),
            group: Vec::new(),
            content: None,
        },
    );
    for (vn, v) in &c.volumes {
        st.insert(
            vn.clone(),
            Entry {
                size: v.size,
                origin: v.origin.clone(),
                holds: Vec::new(),
                group: Vec::new(),
                content: volume_contents
                    .then(|| digest(&read_all(&cp.pool, ThinId(v.thin_id), v.size))),
            },
        );
        for (sn, s) in &v.snapshots {
            let full = format!("{vn}@{sn}");
            let group = s
                .group
                .as_ref()
                .map(|g| groups[g].iter().filter(|m| **m != full).cloned().collect())
                .unwrap_or_default();
            st.insert(
                full,
                Entry {
                    size: s.size,
                    origin: None,
                    holds: s.holds.iter().cloned().collect(),
                    group,
                    content: Some(
                        cache
                            .entry(s.thin_id)
                            .or_insert_with(|| {
                                digest(&read_all(&cp.pool, ThinId(s.thin_id), s.size))
                            })
                            .clone(),
                    ),
                },
            );
        }
    }
    st
}

fn state(cp: &CatalogPool) -> State {
    state_with(cp, true)
}

fn diff(a: &State, b: &State) -> String {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = String::new();
    for k in keys {
        if a.get(k) != b.get(k) {
            out += &format!("  {k}: {:?}\n   vs {:?}\n", a.get(k), b.get(k));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The template pool and the operations
// ---------------------------------------------------------------------------

/// Volumes a (8 blocks; snapshots s1, s2 held "keep", s3), b (4 blocks; b@s1), c (a
/// clone of a@s1, written), d (4 blocks, no snapshots), e (4 blocks; e@x, e@y).
fn build_template(cp: &mut CatalogPool) {
    let create = |cp: &mut CatalogPool, n: &str, blocks: u64| {
        ops::create_volume(cp, &name(n), blocks * BS).expect("create");
    };
    create(cp, "tank/a", 8);
    for b in 0..4 {
        write(cp, "tank/a", b, 0, BS as usize, 1);
    }
    ops::snapshot(cp, &[name("tank/a@s1")]).expect("snap");
    for b in 2..6 {
        write(cp, "tank/a", b, 0, BS as usize, 2);
    }
    ops::snapshot(cp, &[name("tank/a@s2")]).expect("snap");
    ops::hold(cp, &name("tank/a@s2"), "keep").expect("hold");
    write(cp, "tank/a", 7, 1000, 5000, 3);
    ops::snapshot(cp, &[name("tank/a@s3")]).expect("snap");
    create(cp, "tank/b", 4);
    write(cp, "tank/b", 0, 0, BS as usize, 4);
    write(cp, "tank/b", 1, 512, 4096, 4);
    ops::snapshot(cp, &[name("tank/b@s1")]).expect("snap");
    ops::clone(cp, &name("tank/a@s1"), &name("tank/c")).expect("clone");
    write(cp, "tank/c", 1, 0, BS as usize, 5);
    create(cp, "tank/d", 4);
    for b in 0..3 {
        write(cp, "tank/d", b, 0, BS as usize, 6);
    }
    create(cp, "tank/e", 4);
    write(cp, "tank/e", 0, 0, BS as usize, 7);
    ops::snapshot(cp, &[name("tank/e@x")]).expect("snap");
    write(cp, "tank/e", 1, 0, BS as usize, 8);
    ops::snapshot(cp, &[name("tank/e@y")]).expect("snap");
    cp.pool.commit().expect("commit");
}

/// Writes made (and committed) just before the operation: into a block of `a` shared
/// with its snapshots (copy-on-write) and an exclusive block of `d` (in place).
fn pre_writes(cp: &CatalogPool) {
    write(cp, "tank/a", 0, 100, 3000, 9);
    write(cp, "tank/d", 2, 0, BS as usize, 10);
    write(cp, "tank/d", 3, 0, 700, 10);
    cp.pool.commit().expect("commit");
}

struct Op {
    name: &'static str,
    run: fn(&mut CatalogPool) -> Res,
}

fn operations() -> Vec<Op> {
    vec![
        Op {
            name: "create",
            run: |cp| ops::create_volume(cp, &name("tank/f"), 4 * BS),
        },
        Op {
            name: "snapshot",
            run: |cp| ops::snapshot(cp, &[name("tank/a@new")]),
        },
        Op {
            name: "group-snapshot",
            run: |cp| ops::snapshot(cp, &[name("tank/a@g"), name("tank/b@g"), name("tank/d@g")]),
        },
        Op {
            name: "destroy-snapshot",
            run: |cp| ops::destroy(cp, &name("tank/a@s3"), false),
        },
        Op {
            name: "destroy-volume",
            run: |cp| ops::destroy(cp, &name("tank/d"), false),
        },
        Op {
            name: "destroy-clone",
            run: |cp| ops::destroy(cp, &name("tank/c"), false),
        },
        Op {
            name: "destroy-r",
            run: |cp| ops::destroy(cp, &name("tank/e"), true),
        },
        Op {
            name: "clone",
            run: |cp| ops::clone(cp, &name("tank/a@s2"), &name("tank/a2")),
        },
        Op {
            name: "rollback",
            run: |cp| ops::rollback(cp, &name("tank/a@s1"), None),
        },
        Op {
            name: "rollback-keep-current",
            run: |cp| ops::rollback(cp, &name("tank/a@s1"), Some("before")),
        },
        Op {
            name: "rename-volume",
            run: |cp| ops::rename(cp, &name("tank/a"), &name("tank/z")),
        },
        Op {
            name: "rename-snapshot",
            run: |cp| ops::rename(cp, &name("tank/a@s1"), &name("tank/a@first")),
        },
        Op {
            name: "hold",
            run: |cp| ops::hold(cp, &name("tank/a@s3"), "backup"),
        },
        Op {
            name: "release",
            run: |cp| ops::release(cp, &name("tank/a@s2"), "keep"),
        },
        Op {
            name: "resize",
            run: |cp| ops::resize(cp, &name("tank/b"), 6 * BS),
        },
        Op {
            // Restore point 4 of the template (after `hold tank/a@s2`): rebuilds a
            // (rewritten since), keeps a@s1 and a@s2, deletes everything newer.
            name: "restore",
            run: |cp| thinvol_catalog::archive::restore(cp, 4).map(|_| ()),
        },
        Op {
            name: "settings",
            run: |cp| {
                cp.set_settings(Settings {
                    retain_min: 3,
                    ..Settings::default()
                })
            },
        },
    ]
}

fn config() -> PoolConfig {
    config_sized(DATA_SIZE)
}

fn config_sized(data_size: u64) -> PoolConfig {
    PoolConfig {
        data_block_size: DataBlockSize::from_bytes(BS).expect("block size"),
        data_size,
        metadata_size: None,
        commit_interval: Duration::ZERO,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("file type").is_dir() {
            // The metadata archive (`archive/`).
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

fn tools() -> bool {
    static NOTED: std::sync::Once = std::sync::Once::new();
    let ok = thinvol_testkit::tools_available();
    if !ok {
        NOTED.call_once(|| eprintln!("note: thin-provisioning-tools missing; thin_check skipped"));
    }
    ok
}

fn thin_check_file(meta: &Path, label: &str) {
    if !tools() {
        return;
    }
    let out = thinvol_testkit::thin_check(meta).expect("run thin_check");
    assert!(
        out.is_clean(),
        "{label}: thin_check: {:?}\n{}{}",
        out.problems(),
        out.stdout,
        out.stderr
    );
}

/// Open a recovered pool directory and check everything; returns its state.
fn check_recovered(dir: &Path, label: &str) -> State {
    let cp = open_fast(dir).unwrap_or_else(|e| panic!("{label}: open: {e}"));
    cp.verify_devices()
        .unwrap_or_else(|e| panic!("{label}: names vs devices: {e}"));
    assert!(
        !dir.join(PENDING_FILE).exists(),
        "{label}: pending catalog left after recovery"
    );
    let st = state(&cp);
    let rep = cp.pool.check().expect("check");
    assert!(rep.is_clean(), "{label}: pool check: {:?}", rep.problems);
    cp.close().expect("close");
    thin_check_file(&dir.join(thinvol_engine::METADATA_FILE), label);
    st
}

/// The recovered pool takes another change and reopens with it.
fn check_usable(dir: &Path, expect: &State, label: &str) {
    let mut cp = open_fast(dir).expect("reopen");
    ops::create_volume(&mut cp, &name("tank/post"), 2 * BS).expect("create after recovery");
    write(&cp, "tank/post", 1, 0, BS as usize, 77);
    ops::snapshot(&mut cp, &[name("tank/post@p")]).expect("snapshot after recovery");
    let mut want = state(&cp);
    cp.close().expect("close");
    let cp = open_fast(dir).expect("reopen");
    cp.verify_devices().expect("verify");
    assert_eq!(state(&cp), want, "{label}: state after a further change");
    want.remove("post");
    want.remove("post@p");
    assert_eq!(
        &want, expect,
        "{label}: further change disturbed other names"
    );
    cp.close().expect("close");
}

// ---------------------------------------------------------------------------
// Child process entry
// ---------------------------------------------------------------------------

/// Not a test by itself: the entry point of the child processes the crash tests spawn
/// (does nothing unless THINVOL_CRASH_CHILD is set).
#[test]
fn crash_child() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR_ENV).expect("dir"));
    match role.as_str() {
        "op" => {
            let idx: usize = std::env::var(OP_ENV).expect("op").parse().expect("op");
            let mut cp = CatalogPool::open(POOL, &dir).expect("child open");
            pre_writes(&cp);
            (operations()[idx].run)(&mut cp).expect("child op");
            cp.close().expect("child close");
        }
        "open" => {
            let cp = open_fast(&dir).expect("child open");
            cp.close().expect("child close");
        }
        "soak" => {
            let seed: u64 = std::env::var(SEED_ENV)
                .expect("seed")
                .parse()
                .expect("seed");
            soak_child(&dir, seed);
        }
        r => panic!("unknown child role {r}"),
    }
    std::process::exit(0);
}

fn child(role: &str, dir: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("current exe"));
    c.args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .env(DIR_ENV, dir)
        .env_remove(thinvol_catalog::failpoint::ENV);
    c
}

/// Run a child to completion; `failpoint` set: it must abort there.
fn run_child(mut cmd: Command, failpoint: Option<&str>, label: &str) {
    if let Some(fp) = failpoint {
        cmd.env(thinvol_catalog::failpoint::ENV, fp);
    }
    let out = cmd.output().expect("spawn child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match failpoint {
        Some(fp) => assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "{label}: child did not abort at failpoint {fp}: {:?}\n{stderr}",
            out.status
        ),
        None => assert!(
            out.status.success(),
            "{label}: child failed: {:?}\n{stderr}",
            out.status
        ),
    }
}

// ---------------------------------------------------------------------------
// (a) failpoints in child processes
// ---------------------------------------------------------------------------

/// Failpoints of one change, in order, and whether the change is committed there.
const STEPS: &[(&str, bool)] = &[
    ("change:begin", false),
    ("change:ops-applied", false),
    ("store:tmp-synced", false),
    ("change:pending-written", false),
    ("change:pool-committed", true),
    ("change:renamed", true),
];

#[test]
fn failpoint_at_every_step() {
    let t0 = Instant::now();
    let root = scratch();
    let template = root.path().join("template");
    let mut cp =
        CatalogPool::create(POOL, &template, &config(), Settings::default()).expect("create");
    build_template(&mut cp);
    cp.close().expect("close");

    let mut points = 0;
    for (i, op) in operations().iter().enumerate() {
        // Reference states, in process.
        let refdir = root.path().join(format!("{}-ref", op.name));
        copy_dir(&template, &refdir);
        let mut cp = open_fast(&refdir).expect("open");
        pre_writes(&cp);
        let before = state(&cp);
        (op.run)(&mut cp).unwrap_or_else(|e| panic!("{}: {e}", op.name));
        let after = state(&cp);
        assert_ne!(
            before, after,
            "{}: the operation changes nothing visible",
            op.name
        );
        cp.close().expect("close");

        let cmd = |dir: &Path| {
            let mut c = child("op", dir);
            c.env(OP_ENV, i.to_string());
            c
        };
        // No crash: the child's result is the reference result.
        let dir = root.path().join(format!("{}-none", op.name));
        copy_dir(&template, &dir);
        run_child(cmd(&dir), None, op.name);
        let got = check_recovered(&dir, op.name);
        assert_eq!(got, after, "{}: no crash\n{}", op.name, diff(&got, &after));

        for &(fp, committed) in STEPS {
            let label = format!("{} at {fp}", op.name);
            let want = if committed { &after } else { &before };
            let dir = root
                .path()
                .join(format!("{}-{}", op.name, fp.replace(':', "-")));
            copy_dir(&template, &dir);
            run_child(cmd(&dir), Some(fp), &label);
            points += 1;
            // A second crash inside the recovery at open, where there is one.
            let second = match fp {
                "change:pool-committed" => Some("open:promote"),
                "change:pending-written" => Some("open:discard"),
                _ => None,
            };
            if let Some(fp2) = second {
                let dir2 = root
                    .path()
                    .join(format!("{}-{}-2", op.name, fp.replace(':', "-")));
                copy_dir(&dir, &dir2);
                run_child(
                    child("open", &dir2),
                    Some(fp2),
                    &format!("{label}, then at {fp2}"),
                );
                points += 1;
                let got = check_recovered(&dir2, &label);
                assert_eq!(&got, want, "{label}, then {fp2}\n{}", diff(&got, want));
            }
            let got = check_recovered(&dir, &label);
            assert_eq!(
                &got,
                want,
                "{label}: expected the state {} the operation\n{}",
                if committed { "after" } else { "before" },
                diff(&got, want)
            );
            check_usable(&dir, want, &label);
            std::fs::remove_dir_all(&dir).ok();
        }
        std::fs::remove_dir_all(&refdir).ok();
    }
    eprintln!(
        "failpoint_at_every_step: {} operations, {points} crash points, {:.1}s",
        operations().len(),
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// (b) power loss at every pool write/flush event
// ---------------------------------------------------------------------------

type Files = BTreeMap<String, Vec<u8>>;

fn catalog_files(dir: &Path) -> Files {
    let mut m = Files::new();
    for f in [CATALOG_FILE, PENDING_FILE] {
        if let Ok(b) = std::fs::read(dir.join(f)) {
            m.insert(f.to_string(), b);
        }
    }
    // The metadata archive (restore reads its points).
    if let Ok(rd) = std::fs::read_dir(dir.join(thinvol_catalog::archive::ARCHIVE_DIR)) {
        for e in rd.flatten() {
            if let Ok(b) = std::fs::read(e.path()) {
                let name = e.file_name().to_string_lossy().into_owned();
                m.insert(
                    format!("{}/{name}", thinvol_catalog::archive::ARCHIVE_DIR),
                    b,
                );
            }
        }
    }
    m
}

/// Write catalog (and archive) files into a pool directory.
fn put_files(files: &Files, dir: &Path) {
    for (f, b) in files {
        let p = dir.join(f);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, b).expect("write catalog file");
    }
}

/// A simulated device that photographs the catalog files at the instant power is lost
/// (the first operation that fails because of it).
#[derive(Debug)]
struct Probe {
    dev: CrashStorage,
    dir: PathBuf,
    at_crash: Arc<Mutex<Option<Files>>>,
}

impl Probe {
    fn seen<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        if r.is_err() && self.dev.sim().is_crashed() {
            let mut g = self.at_crash.lock().expect("lock");
            if g.is_none() {
                *g = Some(catalog_files(&self.dir));
            }
        }
        r
    }
}

impl Storage for Probe {
    fn len(&self) -> std::io::Result<u64> {
        self.seen(self.dev.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.seen(self.dev.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.seen(self.dev.write_at(buf, offset))
    }
    fn flush(&self) -> std::io::Result<()> {
        self.seen(self.dev.flush())
    }
    fn grow(&self, len: u64) -> std::io::Result<()> {
        self.seen(self.dev.grow(len))
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.seen(self.dev.discard(offset, len))
    }
}

/// Open without the background committer (whose thread `close` would wait for).
fn open_fast(dir: &Path) -> thinvol_catalog::Result<CatalogPool> {
    CatalogPool::open_with(POOL, dir, &no_committer())
}

fn no_committer() -> OpenOptions {
    OpenOptions {
        commit_interval: Duration::ZERO,
        read_only: false,
    }
}

struct SimRun {
    sim: Arc<CrashSim>,
    cp: CatalogPool,
    at_crash: Arc<Mutex<Option<Files>>>,
}

/// Open the template (device images + catalog files) on a fresh simulator.
fn sim_open(meta: &[u8], data: &[u8], files: &Files, dir: &Path) -> SimRun {
    std::fs::create_dir_all(dir).expect("mkdir");
    put_files(files, dir);
    let sim = CrashSim::new();
    let at_crash = Arc::new(Mutex::new(None));
    let dev = |bytes: &[u8]| {
        Arc::new(Probe {
            dev: CrashStorage::from_bytes(&sim, bytes.to_vec()),
            dir: dir.to_path_buf(),
            at_crash: at_crash.clone(),
        })
    };
    let (m, d) = (dev(meta), dev(data));
    let pool = Pool::open_on(m, d, &no_committer()).expect("open sim pool");
    let cp = CatalogPool::open_on_pool(POOL, dir, pool).expect("bind catalog");
    SimRun { sim, cp, at_crash }
}

fn sim_state(
    meta: Vec<u8>,
    data: Vec<u8>,
    files: &Files,
    dir: &Path,
) -> thinvol_catalog::Result<(State, Vec<u8>)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).expect("clean");
    }
    std::fs::create_dir_all(dir).expect("mkdir");
    put_files(files, dir);
    let mstore = Arc::new(MemStorage::from_bytes(meta));
    let pool = Pool::open_on(
        mstore.clone(),
        Arc::new(MemStorage::from_bytes(data)),
        &no_committer(),
    )?;
    let cp = CatalogPool::open_on_pool(POOL, dir, pool)?;
    cp.verify_devices()?;
    if dir.join(PENDING_FILE).exists() {
        return Err(CatalogError::Refused {
            reason: "pending catalog left after recovery".into(),
        });
    }
    let st = state(&cp);
    let rep = cp.pool.check()?;
    if !rep.is_clean() {
        return Err(CatalogError::Refused {
            reason: format!("pool check: {:?}", rep.problems),
        });
    }
    cp.close()?;
    Ok((st, mstore.snapshot()))
}

#[test]
fn power_loss_at_every_pool_event() {
    let t0 = Instant::now();
    let root = scratch();
    let tdir = root.path().join("template");
    let mut cp = CatalogPool::create(POOL, &tdir, &config(), Settings::default()).expect("create");
    build_template(&mut cp);
    pre_writes(&cp);
    cp.close().expect("close");
    let meta = std::fs::read(tdir.join(thinvol_engine::METADATA_FILE)).expect("meta");
    let data = std::fs::read(tdir.join(thinvol_engine::DATA_FILE)).expect("data");
    let files = catalog_files(&tdir);

    let modes = [
        CrashMode::Durable,
        CrashMode::AllPending,
        CrashMode::Random { seed: 1 },
        CrashMode::Random { seed: 2 },
        CrashMode::Random { seed: 3 },
    ];
    let (mut points, mut images, mut checked) = (0, 0, 0);
    let mut metas_checked = BTreeSet::new();
    let mut outcomes: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for op in operations() {
        let dir = root.path().join(op.name);
        let mut r = sim_open(&meta, &data, &files, &dir.join("ref"));
        let before = state(&r.cp);
        let e0 = r.sim.events();
        (op.run)(&mut r.cp).unwrap_or_else(|e| panic!("{}: {e}", op.name));
        let e1 = r.sim.events();
        let after = state(&r.cp);
        drop(r);
        assert!(e1 > e0, "{}: no device events", op.name);

        for n in e0..e1 {
            points += 1;
            let run_dir = dir.join(format!("run-{n}"));
            let mut r = sim_open(&meta, &data, &files, &run_dir);
            r.sim.set_crash_after(n);
            let res = (op.run)(&mut r.cp);
            assert!(r.sim.is_crashed(), "{}: event {n} not reached", op.name);
            let at_crash = r.at_crash.lock().expect("lock").clone().expect("photo");
            let after_error = catalog_files(&run_dir);
            let sim = r.sim.clone();
            drop(r);
            let mut variants = vec![("files at the crash", at_crash)];
            if variants[0].1 != after_error {
                variants.push(("files after the failed operation", after_error));
            }
            for mode in modes {
                let img = sim.images(mode);
                images += 1;
                for (what, f) in &variants {
                    checked += 1;
                    let label = format!(
                        "{}: power loss at event {n} ({} of the op), {mode:?}, {what} ({})",
                        op.name,
                        n - e0,
                        f.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                    let (got, m) = sim_state(img[0].clone(), img[1].clone(), f, &dir.join("check"))
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    let is_after = got == after;
                    assert!(
                        is_after || got == before,
                        "{label}: neither the state before nor after\nvs before:\n{}vs after:\n{}",
                        diff(&got, &before),
                        diff(&got, &after)
                    );
                    if res.is_ok() {
                        assert!(is_after, "{label}: the operation succeeded but is lost");
                    }
                    let o = outcomes.entry(op.name).or_default();
                    if is_after {
                        o.1 += 1;
                    } else {
                        o.0 += 1;
                    }
                    if tools() && metas_checked.insert(digest(&m)) {
                        let p = dir.join("meta.check");
                        std::fs::write(&p, &m).expect("write meta");
                        thin_check_file(&p, &label);
                    }
                }
            }
            std::fs::remove_dir_all(&run_dir).ok();
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    for (op, (b, a)) in &outcomes {
        assert!(
            *b > 0 && *a > 0,
            "{op}: outcomes before/after = {b}/{a}: expected both"
        );
    }
    eprintln!(
        "power_loss_at_every_pool_event: {points} crash points, {images} images, {checked} recoveries, {} distinct metadata thin_checked, {:.1}s",
        metas_checked.len(),
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// (c) kill -9 soak
// ---------------------------------------------------------------------------

const SOAK_LOG: &str = "soak.log";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, v: &'a [String]) -> Option<&'a String> {
        (!v.is_empty()).then(|| &v[self.below(v.len() as u64) as usize])
    }
}

/// A line of the soak log: the state after a change returned (volume contents are not
/// compared: later uncommitted writes in place may show after a kill).
#[derive(serde::Serialize, serde::Deserialize)]
struct LogLine {
    txid: u64,
    state: State,
}

fn log_state(log: &mut std::fs::File, cp: &CatalogPool, cache: &mut BTreeMap<u64, String>) {
    let line = LogLine {
        txid: cp.catalog.transaction_id,
        state: state_cached(cp, false, cache),
    };
    let mut s = serde_json::to_string(&line).expect("json");
    s.push('\n');
    log.write_all(s.as_bytes()).expect("log");
}

fn soak_child(dir: &Path, seed: u64) {
    let mut rng = Rng(seed);
    let mut cp = CatalogPool::open(POOL, dir).expect("soak open");
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join(SOAK_LOG))
        .expect("log");
    let mut cache = BTreeMap::new();
    log_state(&mut log, &cp, &mut cache);
    for i in 0u64.. {
        let vols: Vec<String> = cp.catalog.volumes.keys().cloned().collect();
        let snaps: Vec<String> = cp
            .catalog
            .volumes
            .iter()
            .flat_map(|(v, vv)| vv.snapshots.keys().map(move |s| format!("{v}@{s}")))
            .collect();
        let held: Vec<String> = cp
            .catalog
            .volumes
            .iter()
            .flat_map(|(v, vv)| {
                vv.snapshots
                    .iter()
                    .filter(|(_, s)| !s.holds.is_empty())
                    .map(move |(s, _)| format!("{v}@{s}"))
            })
            .collect();
        let tag = format!("{seed}x{i}");
        // A few writes to a random volume, then one catalog change.
        if let Some(v) = rng.pick(&vols) {
            let size = cp.catalog.volumes[v].size;
            for _ in 0..1 + rng.below(3) {
                let b = rng.below(size / BS);
                let off = rng.below(BS / 512) * 512;
                let len = (BS - off).min(512 * (1 + rng.below(64))) as usize;
                write(
                    &cp,
                    &format!("{POOL}/{v}"),
                    b,
                    off,
                    len,
                    rng.below(250) as u8,
                );
            }
        }
        let full = |s: &str| name(&format!("{POOL}/{s}"));
        let r: Res = match rng.below(10) {
            0 if vols.len() < 6 => {
                ops::create_volume(&mut cp, &full(&format!("v{tag}")), (1 + rng.below(6)) * BS)
            }
            1 | 2 if snaps.len() < 12 => match (rng.pick(&vols), rng.pick(&vols)) {
                (Some(a), Some(b)) if a != b && rng.below(2) == 0 => ops::snapshot(
                    &mut cp,
                    &[full(&format!("{a}@g{tag}")), full(&format!("{b}@g{tag}"))],
                ),
                (Some(a), _) => ops::snapshot(&mut cp, &[full(&format!("{a}@s{tag}"))]),
                _ => Ok(()),
            },
            3 | 4 => match rng.pick(&snaps) {
                Some(s) => ops::destroy(&mut cp, &full(s), false),
                None => Ok(()),
            },
            5 => match rng.pick(&vols) {
                Some(v) if vols.len() > 1 => ops::destroy(&mut cp, &full(v), true),
                _ => Ok(()),
            },
            6 if vols.len() < 6 => match rng.pick(&snaps) {
                Some(s) => ops::clone(&mut cp, &full(s), &full(&format!("c{tag}"))),
                None => Ok(()),
            },
            7 => match rng.pick(&snaps) {
                Some(s) if rng.below(2) == 0 => ops::rollback(&mut cp, &full(s), None),
                Some(s) => ops::rollback(&mut cp, &full(s), Some(&format!("k{tag}"))),
                None => Ok(()),
            },
            8 => match (rng.pick(&vols), rng.pick(&snaps)) {
                (Some(v), _) if rng.below(2) == 0 => {
                    ops::rename(&mut cp, &full(v), &full(&format!("r{tag}")))
                }
                (_, Some(s)) => {
                    let (v, _) = s.split_once('@').expect("snapshot");
                    ops::rename(&mut cp, &full(s), &full(&format!("{v}@r{tag}")))
                }
                _ => Ok(()),
            },
            _ => match (rng.pick(&held), rng.pick(&snaps)) {
                (Some(h), _) if rng.below(2) == 0 => {
                    let t = cp
                        .catalog
                        .snapshot(
                            POOL,
                            h.split_once('@').expect("s").0,
                            h.split_once('@').expect("s").1,
                        )
                        .expect("snap")
                        .holds
                        .iter()
                        .next()
                        .cloned()
                        .expect("hold");
                    ops::release(&mut cp, &full(h), &t)
                }
                (_, Some(s)) => ops::hold(&mut cp, &full(s), "h"),
                _ => Ok(()),
            },
        };
        match r {
            Ok(()) => {}
            Err(CatalogError::Refused { .. } | CatalogError::Exists { .. }) => {}
            Err(e) => panic!("soak op failed: {e}"),
        }
        log_state(&mut log, &cp, &mut cache);
    }
}

fn last_logged(dir: &Path) -> LogLine {
    let text = std::fs::read_to_string(dir.join(SOAK_LOG)).expect("log");
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    let line = complete.lines().last().expect("a complete log line");
    serde_json::from_str(line).expect("log line")
}

#[test]
fn kill_9_soak() {
    let t0 = Instant::now();
    let root = scratch();
    let dir = root.path().join("soak");
    let mut cp = CatalogPool::create(POOL, &dir, &config_sized(64 << 20), Settings::default())
        .expect("create");
    ops::create_volume(&mut cp, &name("tank/base"), 4 * BS).expect("create");
    cp.close().expect("close");
    let mut rng = Rng(0x50a4);
    let (mut at_last, mut one_more) = (0, 0);
    const KILLS: u64 = 30;
    for k in 0..KILLS {
        let mut c = child("soak", &dir);
        c.env(SEED_ENV, (k + 1).to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut proc = c.spawn().expect("spawn soak child");
        std::thread::sleep(Duration::from_millis(40 + rng.below(400)));
        if let Some(st) = proc.try_wait().expect("try_wait") {
            let out = proc.wait_with_output().expect("output");
            panic!(
                "soak child exited by itself: {st:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        proc.kill().expect("kill -9");
        let st = proc.wait().expect("wait");
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        let label = format!("kill {k}");
        let logged = last_logged(&dir);
        let cp = open_fast(&dir).unwrap_or_else(|e| panic!("{label}: open: {e}"));
        cp.verify_devices()
            .unwrap_or_else(|e| panic!("{label}: names vs devices: {e}"));
        let txid = cp.catalog.transaction_id;
        let got = state_with(&cp, false);
        if txid == logged.txid {
            at_last += 1;
            assert_eq!(
                got,
                logged.state,
                "{label}: committed state lost\n{}",
                diff(&got, &logged.state)
            );
        } else {
            one_more += 1;
            assert_eq!(
                txid,
                logged.txid + 1,
                "{label}: catalog at transaction {txid}, last change reported at {}",
                logged.txid
            );
        }
        let rep = cp.pool.check().expect("check");
        assert!(rep.is_clean(), "{label}: pool check: {:?}", rep.problems);
        cp.close().expect("close");
        thin_check_file(&dir.join(thinvol_engine::METADATA_FILE), &label);
    }
    let logged = last_logged(&dir);
    eprintln!(
        "kill_9_soak: {KILLS} kills ({at_last} at the last reported change, {one_more} one change later), catalog transaction {}, {} names, {:.1}s",
        logged.txid,
        logged.state.len(),
        t0.elapsed().as_secs_f64()
    );
}
