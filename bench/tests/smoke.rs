//! Each benchmark runs to completion at a tiny size and prints its summary. Nothing
//! here looks at timings: this only keeps the benchmarks working as the engine changes.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(bin)
        .args(args)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SUMMARY "), "{bin}: no summary\n{stdout}");
    stdout
}

#[test]
fn engine_io_small() {
    let out = run(
        env!("CARGO_BIN_EXE_engine-io"),
        &["--ops", "2000", "--size-mib", "4", "--slices", "2"],
    );
    assert!(out.contains("device 0: identical"), "{out}");
}

#[test]
fn cold_read_small() {
    let out = run(
        env!("CARGO_BIN_EXE_cold-read"),
        &["--ops", "200", "--size-mib", "4", "--rounds", "2"],
    );
    assert!(
        out.contains("| random |") && out.contains("| sequential |"),
        "{out}"
    );
}

#[test]
fn snapshot_small() {
    if !thinvol_testkit::tools_available() {
        eprintln!("thin-provisioning-tools not installed: skipped");
        return;
    }
    run(
        env!("CARGO_BIN_EXE_snapshot"),
        &["--mapped", "100,1K", "--snaps", "3"],
    );
}

#[test]
fn open_small() {
    if !thinvol_testkit::tools_available() {
        eprintln!("thin-provisioning-tools not installed: skipped");
        return;
    }
    run(
        env!("CARGO_BIN_EXE_open"),
        &["--mapped", "100,2K", "--reps", "2"],
    );
}

#[test]
fn delta_small() {
    if !thinvol_testkit::tools_available() {
        eprintln!("thin-provisioning-tools not installed: skipped");
        return;
    }
    // The benchmark cross-checks both pairs against thin_delta before timing them.
    run(
        env!("CARGO_BIN_EXE_delta"),
        &["--mapped", "2K,5K", "--changed", "100", "--reps", "1"],
    );
}

#[test]
fn soak_small() {
    let out = run(
        env!("CARGO_BIN_EXE_soak"),
        &[
            "--iters",
            "300",
            "--every",
            "100",
            "--clock-step",
            "86400",
            "--retain-days",
            "2",
        ],
    );
    assert!(out.contains("volume content intact: true"), "{out}");
    assert!(out.contains("within retention met"), "{out}");
}

#[test]
fn archive_cost_small() {
    run(
        env!("CARGO_BIN_EXE_archive-cost"),
        &["--mapped", "100,2K", "--reps", "2"],
    );
}
