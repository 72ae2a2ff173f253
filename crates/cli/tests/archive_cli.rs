//! `thinvol history` and `thinvol restore` through the real binary, each test with its
//! own state directory (`THINVOL_HOME`) and archive clock (`THINVOL_NOW`).

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use serde_json::Value;

struct Env {
    tmp: tempfile::TempDir,
    now: std::cell::Cell<u64>,
}

impl Env {
    fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().unwrap(),
            now: std::cell::Cell::new(1_700_000_000),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn p(&self, p: &str) -> String {
        self.path(p).to_str().unwrap().to_string()
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::cargo_bin("thinvol")
            .unwrap()
            .env("THINVOL_HOME", self.path("home"))
            .env("THINVOL_NOW", self.now.get().to_string())
            .args(args)
            .output()
            .unwrap()
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

    fn export(&self, name: &str) -> Vec<u8> {
        let out = self.p("export.out");
        self.ok(&["export", name, &out, "-q"]);
        std::fs::read(out).unwrap()
    }

    fn history(&self, pool: &str) -> Vec<Value> {
        self.json(&["history", pool, "--json"])
            .as_array()
            .unwrap()
            .clone()
    }

    fn last_point(&self, pool: &str) -> String {
        self.history(pool).last().unwrap()["id"].to_string()
    }
}

fn image(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ seed ^ (i % 253) as u8)
        .collect()
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

fn descriptions(h: &[Value]) -> Vec<String> {
    h.iter()
        .map(|p| p["description"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn history_lists_every_change_and_restore_brings_back_a_destroyed_snapshot() {
    let e = Env::new();
    assert!(e.ok(&["history", "--help"]).contains("restore points"));
    e.ok(&[
        "pool",
        "create",
        "tank",
        "--dir",
        &e.p("tank"),
        "--size",
        "64M",
    ]);
    let h = e.ok(&["history", "tank"]);
    assert!(h.contains("no restore points yet"), "{h}");
    e.ok(&["create", "tank/vm", "--size", "4M"]);
    let img = e.path("img");
    std::fs::write(&img, image(4 << 20, 1)).unwrap();
    e.ok(&["import", "tank/vm", img.to_str().unwrap(), "-q"]);
    e.now.set(e.now.get() + 60);
    e.ok(&["snapshot", "tank/vm@a"]);
    e.ok(&["hold", "tank/vm@a", "--tag", "backup"]);
    let h = e.history("tank");
    assert_eq!(
        descriptions(&h),
        [
            "create tank/vm (4 MiB)",
            "snapshot tank/vm@a",
            "hold tank/vm@a (backup)"
        ]
    );
    assert_eq!(h[0]["time"], 1_700_000_000u64);
    assert_eq!(h[1]["time_utc"], "2023-11-14 22:14:20");
    let ids: Vec<u64> = h.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let tx: Vec<u64> = h
        .iter()
        .map(|p| p["transaction"].as_u64().unwrap())
        .collect();
    assert!(tx.windows(2).all(|w| w[0] < w[1]), "{tx:?}");
    let point = e.last_point("tank");
    // The text listing has a header and one line per point.
    let text = e.ok(&["history", "tank"]);
    assert!(text.starts_with("      ID  TIME (UTC)"), "{text}");
    assert!(text.contains("snapshot tank/vm@a"), "{text}");
    assert_eq!(text.lines().count(), 4);

    // The snapshot's blocks are still the volume's: destroying it frees nothing, and
    // the restore brings it back byte for byte, hold included.
    e.ok(&["release", "tank/vm@a", "--tag", "backup"]);
    e.ok(&["destroy", "tank/vm@a"]);
    e.ok(&["rename", "tank/vm", "tank/web"]);
    let r = e.json(&["restore", "tank", &point, "--json"]);
    assert_eq!(r["point"].to_string(), point);
    assert_eq!(r["names"], serde_json::json!(["vm", "vm@a"]));
    // tank/web is tank/vm renamed: the same device, kept and named vm again.
    assert_eq!(r["removed"], serde_json::json!([]));
    assert_eq!(
        (r["kept"].as_u64(), r["rebuilt"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(e.export("tank/vm@a"), image(4 << 20, 1));
    assert_eq!(e.export("tank/vm"), image(4 << 20, 1));
    let list = e.json(&["list", "tank", "--json"]);
    let snap = list
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "tank/vm@a")
        .unwrap();
    assert!(snap.to_string().contains("backup"), "{snap}");
    let h = e.history("tank");
    assert!(h.last().unwrap()["description"]
        .as_str()
        .unwrap()
        .starts_with(&format!("restore point {point} (2023-11-14 22:14:20 UTC")));
    e.ok(&["check", "tank"]);
    thin_check_ok(&e.path("tank"));

    // Text output of a restore.
    let again = e.ok(&["restore", "tank", &point]);
    assert!(
        again.contains(&format!("restored pool 'tank' to point {point}")),
        "{again}"
    );
}

#[test]
fn restore_refuses_when_blocks_were_freed_or_reused() {
    let e = Env::new();
    e.ok(&[
        "pool",
        "create",
        "tank",
        "--dir",
        &e.p("tank"),
        "--size",
        "4M",
    ]);
    e.ok(&["create", "tank/vm", "--size", "2M"]);
    e.ok(&["create", "tank/other", "--size", "4M"]);
    let img = e.path("img");
    std::fs::write(&img, image(2 << 20, 7)).unwrap();
    e.ok(&["import", "tank/vm", img.to_str().unwrap(), "-q"]);
    e.ok(&["snapshot", "tank/vm@a"]);
    let point = e.last_point("tank");
    e.ok(&["destroy", "-r", "tank/vm"]);
    let err = e.fails(&["restore", "tank", &point], 6);
    assert!(
        err.contains("32 of the 32 data blocks it needs have since been freed (32)"),
        "{err}"
    );
    assert!(err.contains("tank/vm (32 of 32 blocks)"), "{err}");
    assert!(err.contains("tank/vm@a (32 of 32 blocks)"), "{err}");
    // Reused: another volume's data now lives in those blocks.
    std::fs::write(&img, image(4 << 20, 9)).unwrap();
    e.ok(&["import", "tank/other", img.to_str().unwrap(), "-q"]);
    let err = e.fails(&["restore", "tank", &point], 6);
    assert!(err.contains("reused for other data (32)"), "{err}");
    // Nothing changed.
    assert_eq!(e.export("tank/other"), image(4 << 20, 9));
    e.ok(&["check", "tank"]);
}

#[test]
fn errors_and_retention() {
    let e = Env::new();
    let err = e.fails(&["history", "tnak"], 3);
    assert!(err.contains("pool 'tnak' does not exist"), "{err}");
    e.ok(&[
        "pool",
        "create",
        "tank",
        "--dir",
        &e.p("tank"),
        "--size",
        "64M",
    ]);
    let err = e.fails(&["history", "tnak"], 3);
    assert!(err.contains("did you mean 'tank'"), "{err}");
    e.fails(&["restore", "tank", "x"], 2);
    let err = e.fails(&["restore", "tank", "5"], 3);
    assert!(err.contains("restore point '5' does not exist"), "{err}");
    assert!(err.contains("the archive is empty"), "{err}");

    e.ok(&["pool", "set", "tank", "retain_min=2", "retain_days=1"]);
    e.ok(&["create", "tank/vm", "--size", "1M"]);
    for i in 0..4 {
        e.ok(&["snapshot", &format!("tank/vm@s{i}")]);
    }
    // Young points all stay.
    assert_eq!(e.history("tank").len(), 6);
    // Two days later the next change prunes all but the newest two.
    e.now.set(e.now.get() + 2 * 86_400);
    e.ok(&["destroy", "tank/vm@s0"]);
    let h = e.history("tank");
    assert_eq!(
        descriptions(&h),
        ["snapshot tank/vm@s3", "destroy tank/vm@s0"]
    );
    let err = e.fails(&["restore", "tank", "1"], 3);
    assert!(err.contains("the archive holds points 6 to 7"), "{err}");
    let files = std::fs::read_dir(e.path("tank").join("archive"))
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".point")
        })
        .count();
    assert_eq!(files, 2);
    // pool destroy removes the archive with the pool.
    e.ok(&["pool", "destroy", "tank", "--force"]);
    assert!(!e.path("tank").join("archive").exists());
}

#[test]
fn restore_repairs_a_pool_changed_behind_the_catalog() {
    let e = Env::new();
    e.ok(&[
        "pool",
        "create",
        "tank",
        "--dir",
        &e.p("tank"),
        "--size",
        "64M",
    ]);
    e.ok(&["create", "tank/vm", "--size", "1M"]);
    let point = e.last_point("tank");
    // A thin device made with the plumbing commands has no name: the pool no longer
    // opens by name, and the error points to restore.
    e.ok(&["thin", "create", &e.p("tank"), "40"]);
    let err = e.fails(&["create", "tank/other", "--size", "1M"], 5);
    assert!(err.contains("thin device 40"), "{err}");
    let r = e.json(&["restore", "tank", &point, "--json"]);
    assert_eq!(r["removed"], serde_json::json!(["thin-40"]));
    assert_eq!(r["kept"], 1);
    e.ok(&["create", "tank/other", "--size", "1M"]);
    e.ok(&["check", "tank"]);
}
