//! The name-based commands (issue 3) through the real binary, each test with its own
//! state directory (`THINVOL_HOME`): every command, its `--json` output, error cases
//! with suggestions and exit codes, group snapshots, rollback, write-image of an ext4
//! image, a sparse 8 GiB round trip, usage thresholds.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use assert_cmd::Command;
use serde_json::Value;

const BS: usize = 64 << 10;
const MIB: u64 = 1 << 20;

struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn p(&self, p: &str) -> String {
        self.path(p).to_str().unwrap().to_string()
    }

    fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("thinvol").unwrap();
        c.env("THINVOL_HOME", self.path("home"));
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "thinvol {args:?} failed ({:?}): {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let s = self.ok(args);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: {e}: {s}"))
    }

    /// Run, expect exit `code`, return stderr.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "thinvol {args:?}: stdout {} stderr {err}",
            String::from_utf8_lossy(&out.stdout)
        );
        err
    }

    fn pool(&self, name: &str, size: &str) {
        self.ok(&[
            "pool",
            "create",
            name,
            "--dir",
            &self.p(name),
            "--size",
            size,
        ]);
    }

    fn write(&self, name: &str, data: &[u8]) -> String {
        let p = self.p(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    fn export(&self, name: &str) -> Vec<u8> {
        let out = self.p("export.out");
        self.ok(&["export", name, &out, "-q"]);
        std::fs::read(out).unwrap()
    }

    fn entry(&self, name: &str) -> Value {
        let l = self.json(&["list", name, "--json"]);
        l.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {l}"))
            .clone()
    }
}

/// Deterministic pseudo-random bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn thin_check_ok(dir: &Path) {
    if let Ok(out) = std::process::Command::new("thin_check")
        .arg(dir.join("metadata"))
        .output()
    {
        assert!(
            out.status.success(),
            "thin_check: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.exists())
}

#[test]
fn pool_create_list_status_grow_set_destroy() {
    let e = Env::new();
    let c = e.json(&[
        "pool",
        "create",
        "tank",
        "--dir",
        &e.p("tank"),
        "--size",
        "64M",
        "--block-size",
        "128K",
        "--json",
    ]);
    assert_eq!(c["name"], "tank");
    assert_eq!(c["data_total"], 64 * MIB);
    assert_eq!(c["data_block_size"], 128 << 10);
    assert_eq!(c["thresholds"], serde_json::json!([80, 90, 95]));
    // Taken name: exit 7; taken directory: refused (6); bad sizes: usage (2).
    let err = e.fails(
        &[
            "pool",
            "create",
            "tank",
            "--dir",
            &e.p("x"),
            "--size",
            "64M",
        ],
        7,
    );
    assert!(err.contains("pool 'tank' already exists"), "{err}");
    let err = e.fails(
        &[
            "pool",
            "create",
            "other",
            "--dir",
            &e.p("tank"),
            "--size",
            "64M",
        ],
        6,
    );
    assert!(err.contains("already registered as pool 'tank'"), "{err}");
    let err = e.fails(
        &[
            "pool",
            "create",
            "p2",
            "--dir",
            &e.p("p2"),
            "--size",
            "lots",
        ],
        2,
    );
    assert!(
        err.contains("invalid size 'lots'") && err.contains("10G"),
        "{err}"
    );
    let err = e.fails(
        &[
            "pool",
            "create",
            "p2",
            "--dir",
            &e.p("p2"),
            "--size",
            "1G",
            "--block-size",
            "96K",
        ],
        2,
    );
    assert!(err.contains("multiples of 64K"), "{err}");
    let err = e.fails(
        &[
            "pool",
            "create",
            "bad/name",
            "--dir",
            &e.p("p3"),
            "--size",
            "1G",
        ],
        2,
    );
    assert!(err.contains("'/' is not allowed"), "{err}");
    // list and status.
    let l = e.json(&["pool", "list", "--json"]);
    assert_eq!(l.as_array().unwrap().len(), 1);
    assert_eq!(l[0]["name"], "tank");
    assert_eq!(l[0]["ok"], true);
    assert_eq!(l[0]["volumes"], 0);
    assert!(e.ok(&["pool", "list"]).contains("tank"));
    let s = e.json(&["pool", "status", "tank", "--json"]);
    assert_eq!(s["data_used"], 0);
    assert_eq!(s["level"], 0);
    assert!(s["metadata_used_percent"].as_f64().unwrap() > 0.0);
    assert!(e
        .ok(&["pool", "status", "tank"])
        .contains("thresholds: 80%, 90%, 95%"));
    // Misspelt pool: exit 3 with the suggestion.
    let err = e.fails(&["pool", "status", "tnak"], 3);
    assert!(
        err.contains("pool 'tnak' does not exist (did you mean 'tank'?)"),
        "{err}"
    );
    // grow.
    let g = e.json(&["pool", "grow", "tank", "--size", "1G", "--json"]);
    assert_eq!(
        (g["data_before"].as_u64(), g["data_after"].as_u64()),
        (Some(64 * MIB), Some(1 << 30))
    );
    let err = e.fails(&["pool", "grow", "tank", "--size", "32M"], 6);
    assert!(err.contains("pools do not shrink"), "{err}");
    assert_eq!(
        e.json(&["pool", "status", "tank", "--json"])["data_total"],
        1u64 << 30
    );
    // set: show, change, reject with suggestions.
    let st = e.json(&["pool", "set", "tank", "--json"]);
    assert_eq!(st["retain_min"], 10);
    let st = e.json(&[
        "pool",
        "set",
        "tank",
        "retain_min=3",
        "retain_days=7",
        "thresholds=70,85",
        "--json",
    ]);
    assert_eq!(
        (st["retain_min"].as_u64(), st["retain_days"].as_u64()),
        (Some(3), Some(7))
    );
    assert_eq!(st["thresholds"], serde_json::json!([70, 85]));
    assert!(e.ok(&["pool", "set", "tank"]).contains("thresholds=70,85"));
    let err = e.fails(&["pool", "set", "tank", "retain_mni=3"], 2);
    assert!(err.contains("did you mean 'retain_min'"), "{err}");
    let err = e.fails(&["pool", "set", "tank", "thresholds=90,80"], 2);
    assert!(err.contains("ascending"), "{err}");
    // destroy: refused with volumes (6), then --force; an empty pool goes without.
    e.ok(&["create", "tank/v", "--size", "1M"]);
    let err = e.fails(&["pool", "destroy", "tank"], 6);
    assert!(
        err.contains("has 1 volume(s)") && err.contains("--force"),
        "{err}"
    );
    let d = e.json(&["pool", "destroy", "tank", "--force", "--json"]);
    assert_eq!(d["volumes"], 1);
    assert!(!e.path("tank").exists());
    assert_eq!(e.json(&["pool", "list", "--json"]), serde_json::json!([]));
    e.pool("empty", "16M");
    e.ok(&["pool", "destroy", "empty"]);
    e.fails(&["pool", "destroy", "empty"], 3);
}

#[test]
fn pool_import_registers_or_adopts() {
    let e = Env::new();
    // A pool made with the plumbing commands has no catalog: adopted.
    let raw = e.p("raw");
    e.ok(&["thin", "format", &raw, "--size", "64M"]);
    e.ok(&["thin", "create", &raw, "7"]);
    let img = e.write("img", &noise(3 * BS, 1));
    e.ok(&["thin", "import", &raw, "7", &img, "-q"]);
    let r = e.json(&["pool", "import", "old", "--dir", &raw, "--json"]);
    assert_eq!(r["how"], "adopted");
    assert_eq!(r["volumes"], serde_json::json!(["thin-7"]));
    let v = e.entry("old/thin-7");
    assert_eq!(v["size"], 3 * BS);
    assert_eq!(v["thin_id"], 7);
    assert_eq!(e.export("old/thin-7"), std::fs::read(&img).unwrap());
    // A thinvol pool whose registration is gone: registered again, names kept.
    e.ok(&["create", "old/named", "--size", "1M"]);
    std::fs::remove_dir_all(e.path("home")).unwrap();
    e.fails(&["pool", "status", "old"], 3);
    let r = e.json(&["pool", "import", "again", "--dir", &raw, "--json"]);
    assert_eq!(r["how"], "registered");
    assert_eq!(r["volumes"], serde_json::json!(["named", "thin-7"]));
    // Not a pool, already registered, name taken.
    let err = e.fails(&["pool", "import", "x", "--dir", &e.p("nothing")], 6);
    assert!(
        err.contains("holds no pool") && err.contains("pool create"),
        "{err}"
    );
    let err = e.fails(&["pool", "import", "x", "--dir", &raw], 6);
    assert!(err.contains("already registered as pool 'again'"), "{err}");
    e.pool("p", "16M");
    e.fails(&["pool", "import", "p", "--dir", &raw], 7);
    assert!(e.ok(&["pool", "import", "--help"]).contains("adopted"));
}

#[test]
fn volumes_snapshots_clones_holds_rename_resize_destroy() {
    let e = Env::new();
    e.pool("tank", "64M");
    e.ok(&["create", "tank/vm1", "--size", "1M"]);
    let img = e.write("img", &noise(3 * BS, 2));
    e.ok(&["import", "tank/vm1", &img, "-q"]);
    e.ok(&["snapshot", "tank/vm1@a"]);
    // Change one block: 1 exclusive block each for volume and snapshot, 2 shared.
    let mut d = noise(3 * BS, 2);
    d[BS..2 * BS].fill(7);
    let img2 = e.write("img2", &d);
    e.ok(&["write-image", "tank/vm1", &img2, "-q"]);
    let v = e.entry("tank/vm1");
    assert_eq!(v["type"], "volume");
    assert_eq!(v["size"], MIB);
    assert_eq!(
        (
            v["used"].as_u64(),
            v["exclusive"].as_u64(),
            v["shared"].as_u64()
        ),
        (Some(3 * BS as u64), Some(BS as u64), Some(2 * BS as u64))
    );
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let s = e.entry("tank/vm1@a");
    assert_eq!(s["type"], "snapshot");
    assert_eq!(s["origin"], "tank/vm1");
    assert_eq!(s["exclusive"], BS);
    // Clone, holds, listing by type and by volume.
    e.ok(&["clone", "tank/vm1@a", "tank/c1"]);
    assert_eq!(e.entry("tank/c1")["origin"], "tank/vm1@a");
    assert_eq!(e.export("tank/c1")[..3 * BS], noise(3 * BS, 2)[..]);
    e.ok(&["hold", "tank/vm1@a"]);
    e.ok(&["hold", "tank/vm1@a", "--tag", "backup"]);
    assert_eq!(
        e.entry("tank/vm1@a")["holds"],
        serde_json::json!(["backup", "hold"])
    );
    let snaps = e.json(&["list", "tank", "-t", "snapshot", "--json"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    let vols = e.json(&["list", "-t", "volume", "--json"]);
    let names: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tank/c1", "tank/vm1"]);
    assert_eq!(
        e.json(&["list", "tank/vm1", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let table = e.ok(&["list"]);
    assert!(
        table.contains("EXCL") && table.contains("tank/vm1@a") && table.contains("backup,hold"),
        "{table}"
    );
    let err = e.fails(&["list", "-t", "snapshto"], 2);
    assert!(err.contains("did you mean 'snapshot'"), "{err}");
    // Refusals with reasons: held, clone depends on it, has snapshots.
    let err = e.fails(&["destroy", "tank/vm1@a"], 6);
    assert!(
        err.contains("is held (backup, hold)") && err.contains("thinvol release tank/vm1@a"),
        "{err}"
    );
    assert!(err.contains("volume 'tank/c1' is a clone"), "{err}");
    let err = e.fails(&["destroy", "tank/vm1"], 6);
    assert!(
        err.contains("has 1 snapshot(s)") && err.contains("-r"),
        "{err}"
    );
    let err = e.fails(&["release", "tank/vm1@a", "--tag", "nope"], 6);
    assert!(
        err.contains("has no hold 'nope' (holds: backup, hold)"),
        "{err}"
    );
    e.ok(&["release", "tank/vm1@a"]);
    e.ok(&["release", "tank/vm1@a", "--tag", "backup"]);
    // Misspelt names: exit 3 with suggestions.
    let err = e.fails(&["destroy", "tank/vm2"], 3);
    assert!(
        err.contains("volume 'tank/vm2' does not exist (did you mean 'vm1'?)"),
        "{err}"
    );
    let err = e.fails(&["hold", "tank/vm1@b"], 3);
    assert!(err.contains("did you mean 'a'?"), "{err}");
    let err = e.fails(&["create", "tnak/x", "--size", "1M"], 3);
    assert!(err.contains("did you mean 'tank'?"), "{err}");
    // Bad names and sizes: exit 2.
    let err = e.fails(&["create", "tank/x", "--size", "10Q"], 2);
    assert!(err.contains("invalid size '10Q'"), "{err}");
    let err = e.fails(&["create", "tank/x@s", "--size", "1M"], 2);
    assert!(err.contains("expected POOL/VOLUME"), "{err}");
    e.fails(&["create", "tank/x", "--size", "0"], 6);
    e.fails(&["destroy", "tank"], 2);
    e.fails(&["create", "tank/vm1", "--size", "1M"], 7);
    e.fails(&["snapshot", "tank/vm1@a"], 7);
    // rename a volume (clone origins follow) and a snapshot.
    e.ok(&["rename", "tank/vm1", "tank/web"]);
    assert_eq!(e.entry("tank/c1")["origin"], "tank/web@a");
    e.ok(&["rename", "tank/web@a", "tank/web@first"]);
    assert_eq!(e.entry("tank/c1")["origin"], "tank/web@first");
    e.fails(&["rename", "tank/web", "tank/c1"], 7);
    e.fails(&["rename", "tank/web@first", "tank/c1@x"], 6);
    // resize: grow, shrink needs --shrink, snapshots cannot.
    e.ok(&["resize", "tank/web", "--size", "2M"]);
    assert_eq!(e.entry("tank/web")["size"], 2 * MIB);
    let err = e.fails(&["resize", "tank/web", "--size", "64K"], 6);
    assert!(err.contains("--shrink"), "{err}");
    e.ok(&["resize", "tank/web", "--size", "64K", "--shrink"]);
    let w = e.entry("tank/web");
    assert_eq!(
        (w["size"].as_u64(), w["used"].as_u64()),
        (Some(BS as u64), Some(BS as u64))
    );
    assert_eq!(e.export("tank/web"), noise(BS, 2));
    e.fails(&["resize", "tank/web@first", "--size", "1M"], 2);
    // destroy the clone, then the volume with its snapshot.
    e.ok(&["destroy", "tank/c1"]);
    e.ok(&["destroy", "-r", "tank/web"]);
    assert_eq!(e.json(&["list", "--json"]), serde_json::json!([]));
    let c = e.json(&["check", "tank", "--json"]);
    assert_eq!(c["clean"], true, "{c}");
    assert_eq!(
        e.json(&["pool", "status", "tank", "--json"])["data_used"],
        0
    );
    thin_check_ok(&e.path("tank"));
}

#[test]
fn multi_volume_snapshot_is_one_transaction() {
    let e = Env::new();
    e.pool("tank", "64M");
    e.pool("other", "16M");
    for v in ["a", "b", "c"] {
        e.ok(&["create", &format!("tank/{v}"), "--size", "1M"]);
    }
    e.ok(&["create", "other/x", "--size", "1M"]);
    let before = e.json(&["pool", "status", "tank", "--json"])["transaction_id"]
        .as_u64()
        .unwrap();
    e.ok(&["snapshot", "tank/a@s", "tank/b@s", "tank/c@s"]);
    let after = e.json(&["pool", "status", "tank", "--json"])["transaction_id"]
        .as_u64()
        .unwrap();
    assert_eq!(after, before + 1, "one transaction for the group");
    let snaps = e.json(&["list", "tank", "-t", "snapshot", "--json"]);
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 3);
    let g = &snaps[0]["group"];
    assert!(g.is_string());
    assert!(snaps.iter().all(|s| s["group"] == *g));
    // All or none: a missing volume or an existing snapshot fails the whole group.
    let err = e.fails(&["snapshot", "tank/a@t", "tank/bb@t"], 3);
    assert!(err.contains("did you mean 'b'"), "{err}");
    e.fails(&["snapshot", "tank/a@u", "tank/b@s"], 7);
    e.fails(&["snapshot", "tank/a@v", "tank/a@w"], 6);
    let err = e.fails(&["snapshot", "tank/a@x", "other/x@x"], 6);
    assert!(err.contains("different pools"), "{err}");
    let snaps = e.json(&["list", "tank", "-t", "snapshot", "--json"]);
    assert_eq!(snaps.as_array().unwrap().len(), 3, "{snaps}");
    assert_eq!(
        e.json(&["pool", "status", "tank", "--json"])["transaction_id"]
            .as_u64()
            .unwrap(),
        after
    );
    assert_eq!(e.json(&["check", "tank", "--json"])["clean"], true);
}

#[test]
fn rollback_restores_content_and_keeps_newer_snapshots() {
    let e = Env::new();
    e.pool("tank", "64M");
    let a = noise(10 * BS + 123, 3);
    let ia = e.write("a", &a);
    e.ok(&["import", "tank/v", &ia, "-q"]);
    e.ok(&["snapshot", "tank/v@one"]);
    let mut b = a.clone();
    b[..4 * BS].copy_from_slice(&noise(4 * BS, 4));
    let ib = e.write("b", &b);
    e.ok(&["write-image", "tank/v", &ib, "-q"]);
    e.ok(&["snapshot", "tank/v@two"]);
    let mut c = b.clone();
    c[5 * BS..6 * BS].fill(0);
    let ic = e.write("c", &c);
    e.ok(&["write-image", "tank/v", &ic, "-q"]);
    assert_eq!(e.export("tank/v"), c);
    // Roll back to the first snapshot keeping the current state.
    e.ok(&["rollback", "tank/v@one", "--keep-current", "before"]);
    assert_eq!(e.export("tank/v"), a);
    assert_eq!(e.export("tank/v@two"), b, "newer snapshots are kept");
    assert_eq!(e.export("tank/v@before"), c);
    assert_eq!(e.export("tank/v@one"), a);
    // Writes after the rollback do not touch the snapshot.
    e.ok(&["write-image", "tank/v", &ib, "-q"]);
    assert_eq!(e.export("tank/v@one"), a);
    // Roll back again without keeping.
    e.ok(&["rollback", "tank/v@two"]);
    assert_eq!(e.export("tank/v"), b);
    let err = e.fails(&["rollback", "tank/v@too"], 3);
    assert!(err.contains("did you mean 'two'"), "{err}");
    e.fails(&["rollback", "tank/v@one", "--keep-current", "two"], 7);
    e.fails(&["rollback", "tank/v"], 2);
    assert_eq!(e.json(&["check", "tank", "--json"])["clean"], true);
    thin_check_ok(&e.path("tank"));
}

#[test]
fn import_export_errors_and_stdout() {
    let e = Env::new();
    e.pool("tank", "64M");
    let d = noise(2 * BS + 7, 5);
    let img = e.write("img", &d);
    let r = e.json(&["import", "tank/v", &img, "--json"]);
    assert_eq!(r["created"], true);
    assert_eq!(r["size"], d.len());
    assert_eq!(r["bytes_written"], d.len());
    assert_eq!(r["blocks_changed"], 3);
    // Again: nothing differs.
    let r = e.json(&["import", "tank/v", &img, "--json"]);
    assert_eq!(
        (r["created"].as_bool(), r["bytes_changed"].as_u64()),
        (Some(false), Some(0))
    );
    assert_eq!(r["bytes_unchanged"], d.len());
    let out = e.run(&["export", "tank/v", "-"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, d);
    // A larger image than the volume: refused with the resize command to run.
    let big = e.write("big", &noise(4 * BS, 6));
    let err = e.fails(&["import", "tank/v", &big], 6);
    assert!(err.contains("thinvol resize tank/v --size 262144"), "{err}");
    let err = e.fails(&["write-image", "tank/v@s", &big], 6);
    assert!(err.contains("read-only"), "{err}");
    let err = e.fails(&["write-image", "tank/w", &big], 3);
    assert!(err.contains("did you mean 'v'"), "{err}");
    e.fails(&["import", "tank/n", &e.p("missing")], 1);
    e.fails(&["import", "tank/n", "-"], 6);
    let empty = e.write("empty", &[]);
    e.fails(&["import", "tank/n", &empty], 6);
    e.fails(&["export", "tank/v@nope", &e.p("x")], 3);
    e.fails(&["export", "tank", &e.p("x")], 2);
}

#[test]
fn write_image_of_ext4_writes_only_changed_blocks() {
    let (Some(mkfs), Some(debugfs)) = (tool("mkfs.ext4"), tool("debugfs")) else {
        eprintln!("skipping: mkfs.ext4/debugfs (e2fsprogs) not found");
        return;
    };
    let e = Env::new();
    let fs = e.p("fs.img");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let st = std::process::Command::new(&mkfs)
        .args(["-F", "-q", "-E", "nodiscard", &fs])
        .status()
        .unwrap();
    assert!(st.success());
    let debugfs_w = |cmds: &str| {
        let f = e.write("cmds", cmds.as_bytes());
        let out = std::process::Command::new(&debugfs)
            .args(["-w", "-f", &f, &fs])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut cmds = String::new();
    for i in 0..8 {
        let src = e.write(
            &format!("src{i}"),
            &noise(200_000 + i * 50_000, 10 + i as u64),
        );
        cmds.push_str(&format!("write {src} f{i}\n"));
    }
    debugfs_w(&cmds);
    let old = std::fs::read(&fs).unwrap();
    e.pool("tank", "256M");
    e.ok(&["import", "tank/root", &fs, "-q"]);
    e.ok(&["snapshot", "tank/root@a"]);
    // Change a few files: replace one, delete one, add one.
    let changed = e.write("changed", &noise(120_000, 99));
    let added = e.write("added", &noise(300_000, 98));
    debugfs_w(&format!(
        "rm f2\nwrite {changed} f2\nrm f5\nwrite {added} new\n"
    ));
    let new = std::fs::read(&fs).unwrap();
    let r = e.json(&["write-image", "tank/root", &fs, "--json"]);
    let differing = old
        .chunks(BS)
        .zip(new.chunks(BS))
        .filter(|(a, b)| a != b)
        .count() as u64;
    assert!(differing > 0 && differing < 64, "{differing} blocks differ");
    assert_eq!(r["blocks_changed"], differing, "{r}");
    assert_eq!(r["bytes_changed"], differing * BS as u64, "{r}");
    assert_eq!(r["block_size"], BS);
    assert!(e
        .ok(&["write-image", "tank/root", &fs])
        .contains("0 B changed in 0 block(s)"));
    assert_eq!(e.export("tank/root"), new);
    assert_eq!(e.export("tank/root@a"), old);
    // Only the changed blocks cost space: the volume's exclusive bytes are about them.
    let v = e.entry("tank/root");
    assert!(
        v["exclusive"].as_u64().unwrap() <= differing * BS as u64,
        "{v}"
    );
    assert_eq!(e.json(&["check", "tank", "--json"])["clean"], true);
    thin_check_ok(&e.path("tank"));
}

#[test]
fn sparse_8g_image_round_trip_stores_only_the_data() {
    let e = Env::new();
    let src = e.p("sparse.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(8 << 30).unwrap();
    // 100 MiB of data in 10 runs of 10 MiB spread over the 8 GiB, at unaligned offsets.
    let runs: Vec<(u64, Vec<u8>)> = (0..10u64)
        .map(|i| (i * 800 * MIB + i * 4097, noise(10 * MIB as usize, 100 + i)))
        .collect();
    {
        use std::os::unix::fs::FileExt;
        for (off, d) in &runs {
            f.write_all_at(d, *off).unwrap();
        }
        f.sync_all().unwrap();
    }
    e.pool("tank", "1G");
    let t = Instant::now();
    let r = e.json(&["import", "tank/big", &src, "--json"]);
    let import_time = t.elapsed();
    assert_eq!(r["size"], 8u64 << 30);
    let used = e.json(&["pool", "status", "tank", "--json"])["data_used"]
        .as_u64()
        .unwrap();
    // Each run starts and ends inside a block: at most 2 partial blocks per run.
    assert!(
        used >= 100 * MIB && used <= 100 * MIB + 20 * BS as u64,
        "data used {used}"
    );
    // Whole blocks are written: the data's blocks, no more.
    assert_eq!(r["bytes_written"].as_u64(), Some(used));
    let out = e.p("out.img");
    let t = Instant::now();
    e.ok(&["export", "tank/big", &out, "-q"]);
    let export_time = t.elapsed();
    eprintln!("8 GiB sparse image, 100 MiB data: import {import_time:?}, export {export_time:?}");
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 8 << 30);
    {
        use std::os::unix::fs::{FileExt, MetadataExt};
        // Sparse: only the data's blocks are allocated (holes read as zeros).
        assert!(
            meta.blocks() * 512 <= 100 * MIB + 20 * BS as u64,
            "allocated {}",
            meta.blocks() * 512
        );
        let o = std::fs::File::open(&out).unwrap();
        for (off, d) in &runs {
            let mut buf = vec![0u8; d.len() + 2 * BS];
            let start = off - (off % BS as u64);
            o.read_exact_at(&mut buf, start).unwrap();
            let lead = (off - start) as usize;
            assert!(buf[..lead].iter().all(|&b| b == 0));
            assert!(buf[lead..lead + d.len()] == d[..], "run at {off}");
            assert!(buf[lead + d.len()..].iter().all(|&b| b == 0));
        }
    }
    let v = e.entry("tank/big");
    assert_eq!(v["used"].as_u64(), Some(used));
}

#[test]
fn thresholds_warn_on_stderr_and_status_check_exit_codes() {
    let e = Env::new();
    // 1 MiB of 64 KiB blocks: 16 blocks; each block is 6.25 %.
    e.pool("tiny", "1M");
    let fill = |blocks: usize| {
        let img = e.write("fill", &noise(blocks * BS, 7));
        let out = e.run(&["import", "tiny/v", &img, "-q"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    e.ok(&["create", "tiny/v", "--size", "1M"]);
    let err = fill(12); // 75 %
    assert!(!err.contains("warning"), "{err}");
    e.ok(&["pool", "status", "tiny", "--check"]);
    let err = fill(13); // 81.25 %
    assert!(
        err.contains("warning: pool 'tiny' data usage crossed 80% (now 81.2%)"),
        "{err}"
    );
    e.fails(&["pool", "status", "tiny", "--check"], 10);
    let s = e.json(&["pool", "status", "tiny", "--json"]);
    assert_eq!(
        (s["level"].as_u64(), s["reached"].as_u64()),
        (Some(1), Some(80))
    );
    assert!(s["warnings"][0]
        .as_str()
        .unwrap()
        .contains("at or above the 80% threshold"));
    let out = e.run(&["pool", "status", "tiny", "--check"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("WARNING"));
    let err = fill(15); // 93.75 %
    assert!(
        err.contains("crossed 90%") && !err.contains("crossed 80%"),
        "{err}"
    );
    e.fails(&["pool", "status", "tiny", "--check"], 11);
    let err = fill(16); // 100 %
    assert!(err.contains("crossed 95%"), "{err}");
    e.fails(&["pool", "status", "tiny", "--check"], 12);
    // A snapshot (a catalog change) does not cross anything new: no warning.
    let out = e.run(&["snapshot", "tiny/v@s"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
    // Thresholds are settings.
    e.ok(&["pool", "set", "tiny", "thresholds=99"]);
    e.fails(&["pool", "status", "tiny", "--check"], 10);
    e.ok(&["pool", "set", "tiny", "thresholds=none"]);
    e.ok(&["pool", "status", "tiny", "--check"]);
    // Writing into a full pool: no space (4), the pool stays consistent.
    e.ok(&["create", "tiny/w", "--size", "1M"]);
    let img = e.write("other", &noise(2 * BS, 8));
    e.fails(&["import", "tiny/w", &img, "-q"], 4);
    assert_eq!(e.json(&["check", "tiny", "--json"])["clean"], true);
    // Growing the pool brings the usage down.
    e.ok(&["pool", "set", "tiny", "thresholds=80,90,95"]);
    e.ok(&["pool", "grow", "tiny", "--size", "4M"]);
    e.ok(&["pool", "status", "tiny", "--check"]);
}

#[test]
fn check_finds_catalog_problems() {
    let e = Env::new();
    e.pool("tank", "64M");
    e.ok(&["create", "tank/v", "--size", "64K"]);
    let c = e.json(&["check", "tank", "--json"]);
    assert_eq!(c["clean"], true);
    assert_eq!(
        (c["volumes"].as_u64(), c["devices"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(e.ok(&["check", "tank"]).starts_with("clean"));
    // Data beyond the volume's size, written behind the catalog's back.
    let dir = e.p("tank");
    let img = e.write("img", &noise(2 * BS, 9));
    e.ok(&["thin", "import", &dir, "1", &img, "-q"]);
    let out = e.run(&["check", "tank", "--json"]);
    assert_eq!(out.status.code(), Some(5));
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        c["catalog_problems"][0]
            .as_str()
            .unwrap()
            .contains("beyond its size"),
        "{c}"
    );
    // A device the catalog does not name: the pool refuses to open by name (5).
    e.ok(&["thin", "create", &dir, "99"]);
    let err = e.fails(&["check", "tank"], 5);
    assert!(
        err.contains("thin device 99 exists in the pool but has no name"),
        "{err}"
    );
    e.fails(&["list", "tank"], 5);
}

#[test]
fn help_documents_commands_and_exit_codes() {
    let e = Env::new();
    let h = e.ok(&["--help"]);
    for w in [
        "pool",
        "snapshot",
        "write-image",
        "rollback",
        "Exit codes",
        "10, 11, 12",
    ] {
        assert!(h.contains(w), "{w} missing from --help: {h}");
    }
    let h = e.ok(&["pool", "status", "--help"]);
    assert!(h.contains("10 at or above the lowest"), "{h}");
    // The plumbing still works beside the names.
    let dir = e.p("plain");
    e.ok(&["thin", "format", &dir, "--size", "16M"]);
    e.ok(&["thin", "create", &dir, "1"]);
    assert_eq!(e.json(&["thin", "list", &dir, "--json"])[0]["id"], 1);
    // No pools yet: listings are empty, not errors.
    assert_eq!(e.json(&["list", "--json"]), serde_json::json!([]));
    assert_eq!(e.json(&["pool", "list", "--json"]), serde_json::json!([]));
}
