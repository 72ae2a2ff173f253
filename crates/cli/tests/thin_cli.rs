//! The `thinvol thin ...` plumbing and `thinvol demo`, through the real binary.

use assert_cmd::Command;
use std::path::Path;

fn thinvol() -> Command {
    Command::cargo_bin("thinvol").unwrap()
}

fn run_ok(args: &[&str]) -> String {
    let out = thinvol().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "thinvol {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&run_ok(args)).unwrap()
}

fn thin_check_ok(dir: &Path) {
    if let Ok(out) = std::process::Command::new("thin_check")
        .arg(dir.join("metadata"))
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn format_import_snapshot_delta_export_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let pool = t.path().join("pool");
    let p = pool.to_str().unwrap();
    let f = json(&["thin", "format", p, "--size", "64M", "--json"]);
    assert_eq!(f["data_blocks"], 1024);
    // A sparse image: 1 MiB of data at 0, a hole, 64 KiB at 5 MiB, 8 MiB long.
    let img = t.path().join("img");
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data[..1 << 20].iter_mut().enumerate() {
        *b = (i % 253) as u8 + 1;
    }
    data[5 << 20..(5 << 20) + 65536].fill(9);
    std::fs::write(&img, &data).unwrap();
    let st = json(&["thin", "import", p, "1", img.to_str().unwrap(), "--json"]);
    assert_eq!(st["bytes"], 8 << 20);
    assert_eq!(st["bytes_written"], (1 << 20) + 65536);
    let list = json(&["thin", "list", p, "--json"]);
    assert_eq!(list[0]["id"], 1);
    assert_eq!(list[0]["mapped_blocks"], 17);
    run_ok(&["thin", "snapshot", p, "2", "1"]);
    // Change one block of the origin through a second import.
    data[65536..2 * 65536].fill(0xEE);
    std::fs::write(&img, &data).unwrap();
    run_ok(&["thin", "import", p, "1", img.to_str().unwrap(), "-q"]);
    let d = json(&["thin", "delta", p, "2", "1", "--json"]);
    let runs = d["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{d}");
    assert_eq!(runs[0]["kind"], "different");
    assert_eq!(runs[0]["begin"], 1);
    assert_eq!(runs[0]["length"], 1);
    // Export both and compare.
    let out1 = t.path().join("out1");
    run_ok(&[
        "thin",
        "export",
        p,
        "1",
        out1.to_str().unwrap(),
        "--size",
        "8M",
        "-q",
    ]);
    assert_eq!(std::fs::read(&out1).unwrap(), data);
    let out2 = thinvol()
        .args(["thin", "export", p, "2", "-", "--size", "8M"])
        .output()
        .unwrap();
    assert!(out2.status.success());
    assert_eq!(
        &out2.stdout[..65536],
        &std::fs::read(&img).unwrap()[..65536]
    );
    assert_ne!(&out2.stdout[65536..131072], &data[65536..131072]);
    let c = json(&["thin", "check", p, "--json"]);
    assert_eq!(c["clean"], true);
    let s = json(&["thin", "status", p, "--json"]);
    assert_eq!(s["devices"], 2);
    thin_check_ok(&pool);
}

#[test]
fn errors_have_meaningful_exit_codes() {
    let t = tempfile::tempdir().unwrap();
    let pool = t.path().join("pool");
    let p = pool.to_str().unwrap();
    run_ok(&["thin", "format", p, "--size", "1M", "--block-size", "64K"]);
    // No such device: exit 3, message names the device.
    let out = thinvol().args(["thin", "delete", p, "7"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("thin device 7 does not exist"));
    // Bad block size: exit 1 with a hint.
    let out = thinvol()
        .args([
            "thin",
            "format",
            t.path().join("x").to_str().unwrap(),
            "--size",
            "1M",
            "--block-size",
            "96K",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiples of 64K"));
    // Pool full: 16 blocks of data, import 2 MiB of non-zero bytes -> exit 4.
    run_ok(&["thin", "create", p, "1"]);
    let img = t.path().join("big");
    std::fs::write(&img, vec![1u8; 2 << 20]).unwrap();
    let out = thinvol()
        .args(["thin", "import", p, "1", img.to_str().unwrap(), "-q"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no space"));
    // The pool is still consistent and usable.
    assert_eq!(json(&["thin", "check", p, "--json"])["clean"], true);
    run_ok(&["thin", "delete", p, "1"]);
    // Not a pool: exit 1 (cannot open), corrupt metadata: exit 5.
    let out = thinvol()
        .args(["thin", "status", t.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let meta = pool.join("metadata");
    let mut m = std::fs::read(&meta).unwrap();
    m[100] ^= 0xFF;
    std::fs::write(&meta, &m).unwrap();
    let out = thinvol().args(["thin", "status", p]).output().unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metadata block 0 (superblock)"));
}

#[test]
fn demo_runs_clean_and_keeps_the_pool() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("demo");
    let r = json(&["demo", dir.to_str().unwrap(), "--json"]);
    assert_eq!(r["snapshot_intact"], true);
    assert_eq!(r["volume_correct"], true);
    assert_eq!(r["check_clean"], true);
    assert_eq!(r["changed_blocks"], 64);
    assert!(dir.join("metadata").exists() && dir.join("data").exists());
    thin_check_ok(&dir);
    // The demo refuses to reuse a pool directory.
    let out = thinvol()
        .args(["demo", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
