//! Time to open a pool against the number of mapped blocks.
//!
//! For each `--mapped` size the origin (device 0, blocks 0..N) is built with
//! `thin_restore`; then `Pool::open` is timed `--reps` times with the metadata in the
//! page cache (warm), and as many times after writing back and dropping the metadata
//! file's cached pages (`POSIX_FADV_DONTNEED`, "cold-ish": under a VM the host may still
//! cache it). Peers in the same run: the smallest size (flatness) and
//! `thin_check --skip-mappings` on the same metadata (superblock, space maps and
//! device details: about what an open has to read).
//!
//! Goal (issue): under 100 ms with 1 M mappings (median, warm).
//!
//! `cargo run --release -p thinvol-bench --bin open -- --mapped 1K,1M --reps 10`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thinvol_bench::fixture::restore_identity;
use thinvol_bench::{
    drop_file_cache, fail, fmt_dur, human_count, time, verdict, work_dir, Args, Report, Stats,
};
use thinvol_engine::format::ThinId;
use thinvol_engine::{Pool, METADATA_FILE};

const GOAL: Duration = Duration::from_millis(100);

fn main() {
    let args = Args::parse(&[]);
    let sizes = args.list_or("mapped", &[1_000, 1_000_000]);
    let reps = args.u64_or("reps", 10).max(1);
    let tmp = work_dir(&args);
    let mut rep = Report::start("open", &args, tmp.path());
    rep.note(&format!(
        "Pool::open (default options: starts the background committer) on a pool whose device 0 \
         maps N blocks (built with thin_restore); {reps} opens per size and cache state; the pool \
         is dropped outside the timed region"
    ));
    let check = thinvol_testkit::tool_path("thin_check");

    let mut rows = Vec::new();
    let mut base: Option<(u64, Duration)> = None;
    for &n in &sizes {
        let dir = tmp.path().join(format!("pool-{n}"));
        restore_identity(&dir, n, n + 1024, 1024);
        let meta = dir.join(METADATA_FILE);
        let mut warm = Vec::new();
        let mut cold = Vec::new();
        // One untimed open first, so that "warm" means warm.
        drop(Pool::open(&dir).unwrap_or_else(|e| fail(&e.to_string())));
        for i in 0..reps * 2 {
            let is_cold = i % 2 == 1;
            if is_cold {
                drop_file_cache(&meta).unwrap_or_else(|e| fail(&e.to_string()));
            }
            let (p, t) = time(|| Pool::open(&dir));
            let p = p.unwrap_or_else(|e| fail(&format!("open with {n} mappings: {e}")));
            if i == 0 {
                let d = p.device(ThinId(0)).unwrap_or_else(|e| fail(&e.to_string()));
                if d.mapped_blocks != n {
                    fail(&format!(
                        "device 0 has {} mapped blocks, expected {n}",
                        d.mapped_blocks
                    ));
                }
            }
            drop(p);
            if is_cold {
                cold.push(t);
            } else {
                warm.push(t);
            }
        }
        let mut tc = Vec::new();
        if let Some(c) = &check {
            for _ in 0..reps.min(5) {
                let t0 = Instant::now();
                let st = Command::new(c)
                    .arg("--skip-mappings")
                    .arg(&meta)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let t = t0.elapsed();
                match st {
                    Ok(s) if s.success() => tc.push(t),
                    Ok(s) => fail(&format!("thin_check --skip-mappings failed: {s}")),
                    Err(e) => fail(&format!("thin_check: {e}")),
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let (warm, cold, tc) = (Stats::new(warm), Stats::new(cold), Stats::new(tc));
        let (bn, bt) = *base.get_or_insert((n, warm.median()));
        let flat = warm.median().as_secs_f64() / bt.as_secs_f64();
        let check_ratio = if tc.is_empty() {
            "-".to_string()
        } else {
            format!(
                "{:.1}x",
                tc.median().as_secs_f64() / warm.median().as_secs_f64()
            )
        };
        let met = warm.median() < GOAL;
        rows.push(vec![
            human_count(n),
            fmt_dur(warm.median()),
            fmt_dur(warm.max()),
            fmt_dur(cold.median()),
            fmt_dur(cold.max()),
            format!("{flat:.2}"),
            if tc.is_empty() {
                "not installed".to_string()
            } else {
                fmt_dur(tc.median())
            },
            check_ratio.clone(),
            verdict(met).to_string(),
        ]);
        rep.summary(format!(
            "Pool::open with {} mapped: median {} warm, {} cold-ish (ratio to {} mapped {flat:.2}; \
             thin_check --skip-mappings / open {check_ratio}); goal < 100 ms {}",
            human_count(n),
            fmt_dur(warm.median()),
            fmt_dur(cold.median()),
            human_count(bn),
            verdict(met)
        ));
    }
    let bn = base.map_or(0, |b| b.0);
    rep.table(
        "Pool::open",
        &[
            "mapped blocks",
            "open median (warm)",
            "max (warm)",
            "open median (cold-ish)",
            "max (cold-ish)",
            &format!("warm median ratio to {} mapped", human_count(bn)),
            "thin_check --skip-mappings (process)",
            "thin_check / open",
            "goal < 100 ms",
        ],
        &rows,
    );
    rep.finish();
}
