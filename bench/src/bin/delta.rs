//! Delta between two devices against `thin_delta` on the same metadata file.
//!
//! For each `--mapped` size N, the origin (device 0, virtual blocks 0..N on data blocks
//! 0..N) is built with `thin_restore`, then with our engine:
//! 1. snapshot 0 as 1;
//! 2. `--changed` blocks of 0 rewritten (whole 64 KiB blocks) in one contiguous run in
//!    the middle ("clustered"), commit;
//! 3. snapshot 0 as 2;
//! 4. `--changed` distinct blocks of 0 rewritten at uniformly random positions
//!    ("uniform"), commit, close.
//!
//! So (1, 2) differ by the clustered change and (2, 0) by the uniform one, each on a
//! tree of N mappings. Both pairs are first checked against `thin_delta`'s own output
//! (same blocks changed, the rest the same), then timed, in alternating order, `--reps`
//! times each (`--reps-large` above 2 M mapped):
//! * `thin_delta --snap1 A --snap2 B METADATA` as a process, output to /dev/null;
//! * ours: `Pool::open` + `delta(A, B, include_same = false)` (changes only: the
//!   replication use case);
//! * ours: `Pool::open` + `delta(A, B, true)` + coalescing into runs (the same
//!   information thin_delta prints: like for like);
//! * ours: `delta(A, B, false)` alone on an open pool, first call (nodes read from the
//!   page cache) and repeated (nodes in the engine's cache);
//! * ours: open + delta after dropping the metadata file from the page cache
//!   (`thin_delta` 0.9.0 opens the metadata with O_DIRECT and never uses the page
//!   cache, so this is its I/O condition).
//!
//! CPU time (user + system) of the thin_delta process and of our process during open +
//! delta is reported too: unlike wall time it hardly depends on other load.
//!
//! Goal (issue): >= 10x faster than thin_delta at 1 M mapped / 1 % changed, and flat as
//! the mapped count grows at a fixed change.
//!
//! `cargo run --release -p thinvol-bench --bin delta -- --mapped 100K,1M,4M --changed 10000`

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thinvol_bench::fixture::{restore_identity, BLOCK_BYTES};
use thinvol_bench::{
    cpu_children, cpu_self, drop_file_cache, fail, fmt_dur, human_count, median_f64, time, verdict,
    work_dir, Args, Report, SplitMix64, Stats,
};
use thinvol_engine::format::ThinId;
use thinvol_engine::{delta_runs, DeltaKind, OpenOptions, Pool, METADATA_FILE};
use thinvol_testkit::DeltaKind as ToolKind;

const GOAL: f64 = 10.0;

fn fail_on<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| fail(&e.to_string()))
}

/// `changed` distinct blocks of 0..n, in random order.
fn uniform_blocks(n: u64, changed: u64, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    let mut seen = std::collections::HashSet::new();
    let mut v = Vec::new();
    while (v.len() as u64) < changed.min(n) {
        let b = rng.below(n);
        if seen.insert(b) {
            v.push(b);
        }
    }
    v
}

fn write_blocks(pool: &Pool, blocks: &[u64], tag: u64) {
    let mut buf = vec![0x3Cu8; BLOCK_BYTES as usize];
    for &b in blocks {
        buf[0..8].copy_from_slice(&b.to_le_bytes());
        buf[8..16].copy_from_slice(&tag.to_le_bytes());
        fail_on(pool.write(ThinId(0), b * BLOCK_BYTES, &buf));
    }
}

fn no_commit() -> OpenOptions {
    OpenOptions {
        commit_interval: Duration::ZERO,
        ..OpenOptions::default()
    }
}

/// (wall, CPU) time of `thin_delta --snap1 a --snap2 b META > /dev/null`.
fn run_thin_delta(tool: &Path, meta: &Path, a: u64, b: u64) -> (Duration, Duration) {
    let c0 = cpu_children();
    let t0 = Instant::now();
    let st = Command::new(tool)
        .args(["--snap1", &a.to_string(), "--snap2", &b.to_string()])
        .arg(meta)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let t = t0.elapsed();
    match st {
        Ok(s) if s.success() => (t, cpu_children().saturating_sub(c0)),
        Ok(s) => fail(&format!("thin_delta failed: {s}")),
        Err(e) => fail(&format!("thin_delta: {e}")),
    }
}

/// Check that ours and thin_delta agree on this pair: `changed` blocks differ, the
/// other `mapped - changed` are the same. Returns (nodes read, subtrees skipped).
fn cross_check(dir: &Path, a: u64, b: u64, mapped: u64, changed: u64) -> (u64, u64) {
    let meta = dir.join(METADATA_FILE);
    let runs = thinvol_testkit::thin_delta(&meta, a, b, false)
        .unwrap_or_else(|e| fail(&format!("thin_delta: {e}")));
    let count =
        |k: ToolKind| -> u64 { runs.iter().filter(|r| r.kind == k).map(|r| r.length).sum() };
    let (same, diff) = (count(ToolKind::Same), count(ToolKind::Different));
    let other = count(ToolKind::LeftOnly) + count(ToolKind::RightOnly);
    if diff != changed || same != mapped - changed || other != 0 {
        fail(&format!(
            "thin_delta {a} {b}: {diff} different, {same} same, {other} one-sided; \
             expected {changed} different, {} same",
            mapped - changed
        ));
    }
    let pool = fail_on(Pool::open_with(dir, &no_commit()));
    let (d, stats) = fail_on(pool.delta(ThinId(a), ThinId(b), false));
    let ours_diff = d
        .iter()
        .filter(|x| x.kind() == DeltaKind::Different)
        .count() as u64;
    if ours_diff != changed || d.len() as u64 != changed {
        fail(&format!(
            "our delta {a} {b}: {} entries, {ours_diff} different; expected {changed}",
            d.len()
        ));
    }
    let (all, _) = fail_on(pool.delta(ThinId(a), ThinId(b), true));
    let same_ours = all.iter().filter(|x| x.kind() == DeltaKind::Same).count() as u64;
    if same_ours != mapped - changed {
        fail(&format!(
            "our delta {a} {b} with same: {same_ours} same, expected {}",
            mapped - changed
        ));
    }
    // Blocks of the same kind coalesce the way thin_delta prints them.
    let ours_runs = delta_runs(&all);
    if ours_runs.len() != runs.len() {
        fail(&format!(
            "our delta {a} {b}: {} runs, thin_delta printed {}",
            ours_runs.len(),
            runs.len()
        ));
    }
    (stats.nodes_read, stats.subtrees_skipped)
}

struct Case {
    mapped: u64,
    pattern: &'static str,
    a: u64,
    b: u64,
    nodes_read: u64,
    skipped: u64,
    tool: Stats,
    tool_cpu: Stats,
    open_delta: Stats,
    open_delta_cpu: Stats,
    open_delta_same: Stats,
    delta_first: Stats,
    delta_warm: Stats,
    cold: Stats,
    ratio_per_rep: Vec<f64>,
}

fn main() {
    let args = Args::parse(&[]);
    let sizes = args.list_or("mapped", &[100_000, 1_000_000, 4_000_000]);
    let changed = args.u64_or("changed", 10_000);
    let reps = args.u64_or("reps", 7).max(1) as usize;
    let reps_large = args.u64_or("reps-large", 3).max(1) as usize;
    let seed = args.u64_or("seed", 7);
    let Some(tool) = thinvol_testkit::tool_path("thin_delta") else {
        fail("thin_delta not found (install thin-provisioning-tools)");
    };
    let tmp = work_dir(&args);
    let mut rep = Report::start("delta", &args, tmp.path());
    rep.note(&format!(
        "origin: device 0 maps N blocks (thin_restore); {} blocks changed per pair through our \
         engine (whole 64 KiB writes, committed); pairs: clustered = (1, 2), uniform = (2, 0); \
         {reps} timed repetitions of each measurement ({reps_large} above 2M mapped), \
         alternating ours and thin_delta; times are medians; CPU = user + system time of \
         the thin_delta process / of our process during open + delta",
        human_count(changed)
    ));

    let mut cases: Vec<Case> = Vec::new();
    let mut setup_rows = Vec::new();
    for &n in &sizes {
        if changed == 0 || changed > n {
            fail("--changed must be between 1 and every --mapped size");
        }
        let dir = tmp.path().join(format!("pool-{n}"));
        // Data blocks for both change sets plus slack; metadata room for the changes.
        let restore = restore_identity(&dir, n, n + 2 * changed + 1024, 4 * changed + 4096);
        let (_, setup) = time(|| {
            let pool = fail_on(Pool::open_with(&dir, &no_commit()));
            fail_on(pool.create_snap(ThinId(1), ThinId(0)));
            let start = n / 2 - changed / 2;
            let clustered: Vec<u64> = (start..start + changed).collect();
            write_blocks(&pool, &clustered, 1);
            fail_on(pool.commit());
            fail_on(pool.create_snap(ThinId(2), ThinId(0)));
            write_blocks(&pool, &uniform_blocks(n, changed, seed ^ n), 2);
            fail_on(pool.close());
        });
        setup_rows.push(vec![
            human_count(n),
            fmt_dur(restore),
            fmt_dur(setup),
            format!(
                "{:.0} MiB",
                std::fs::metadata(dir.join(METADATA_FILE)).map_or(0, |m| m.len()) as f64
                    / (1u64 << 20) as f64
            ),
        ]);
        let meta = dir.join(METADATA_FILE);
        for (pattern, a, b) in [("clustered", 1u64, 2u64), ("uniform", 2, 0)] {
            let (nodes_read, skipped) = cross_check(&dir, a, b, n, changed);
            let mut c = Case {
                mapped: n,
                pattern,
                a,
                b,
                nodes_read,
                skipped,
                tool: Stats::default(),
                tool_cpu: Stats::default(),
                open_delta: Stats::default(),
                open_delta_cpu: Stats::default(),
                open_delta_same: Stats::default(),
                delta_first: Stats::default(),
                delta_warm: Stats::default(),
                cold: Stats::default(),
                ratio_per_rep: Vec::new(),
            };
            let (mut tt, mut od, mut ods, mut df, mut dw) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut tc, mut oc, mut cold) = (Vec::new(), Vec::new(), Vec::new());
            let reps = if n > 2_000_000 { reps_large } else { reps };
            for r in 0..reps {
                let ours = || {
                    let c0 = cpu_self();
                    let (res, t) = time(|| {
                        let p = fail_on(Pool::open(&dir));
                        let d = fail_on(p.delta(ThinId(a), ThinId(b), false));
                        (p, d)
                    });
                    let c = cpu_self().saturating_sub(c0);
                    drop(res);
                    (t, c)
                };
                let ((t_tool, c_tool), (t_ours, c_ours)) = if r % 2 == 0 {
                    let x = run_thin_delta(&tool, &meta, a, b);
                    (x, ours())
                } else {
                    let y = ours();
                    (run_thin_delta(&tool, &meta, a, b), y)
                };
                tt.push(t_tool);
                tc.push(c_tool);
                od.push(t_ours);
                oc.push(c_ours);
                c.ratio_per_rep
                    .push(t_tool.as_secs_f64() / t_ours.as_secs_f64());
                let (res, t) = time(|| {
                    let p = fail_on(Pool::open(&dir));
                    let (d, _) = fail_on(p.delta(ThinId(a), ThinId(b), true));
                    let runs = delta_runs(&d);
                    (p, d, runs)
                });
                drop(res);
                ods.push(t);
                let p = fail_on(Pool::open_with(&dir, &no_commit()));
                let (res, t) = time(|| p.delta(ThinId(a), ThinId(b), false));
                drop(fail_on(res));
                df.push(t);
                let (res, t) = time(|| p.delta(ThinId(a), ThinId(b), false));
                drop(fail_on(res));
                dw.push(t);
                drop(p);
                // Cold-ish: thin_delta reads with O_DIRECT, so it never uses the page
                // cache; the same for ours: drop the metadata file's cached pages first.
                fail_on(drop_file_cache(&meta));
                let (res, t) = time(|| {
                    let p = fail_on(Pool::open(&dir));
                    let d = fail_on(p.delta(ThinId(a), ThinId(b), false));
                    (p, d)
                });
                drop(res);
                cold.push(t);
                // Warm the page cache again (every node) for the next repetition.
                let p = fail_on(Pool::open_with(&dir, &no_commit()));
                drop(fail_on(p.delta(ThinId(a), ThinId(b), true)));
            }
            c.tool = Stats::new(tt);
            c.tool_cpu = Stats::new(tc);
            c.open_delta = Stats::new(od);
            c.open_delta_cpu = Stats::new(oc);
            c.open_delta_same = Stats::new(ods);
            c.delta_first = Stats::new(df);
            c.delta_warm = Stats::new(dw);
            c.cold = Stats::new(cold);
            cases.push(c);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    let ratio =
        |tool: &Stats, ours: &Stats| tool.median().as_secs_f64() / ours.median().as_secs_f64();
    let mut rows = Vec::new();
    for c in &cases {
        let r = ratio(&c.tool, &c.open_delta);
        rows.push(vec![
            human_count(c.mapped),
            format!("{} ({} -> {})", c.pattern, c.a, c.b),
            format!("{:.2}%", 100.0 * changed as f64 / c.mapped as f64),
            fmt_dur(c.tool.median()),
            fmt_dur(c.open_delta.median()),
            format!("{r:.1}x"),
            format!("{:.1}x", median_f64(&c.ratio_per_rep)),
            format!(
                "{:.1}x ({} / {})",
                ratio(&c.tool_cpu, &c.open_delta_cpu),
                fmt_dur(c.tool_cpu.median()),
                fmt_dur(c.open_delta_cpu.median())
            ),
            fmt_dur(c.open_delta_same.median()),
            format!("{:.1}x", ratio(&c.tool, &c.open_delta_same)),
            fmt_dur(c.delta_first.median()),
            fmt_dur(c.delta_warm.median()),
            fmt_dur(c.cold.median()),
            format!("{:.1}x", ratio(&c.tool, &c.cold)),
            c.nodes_read.to_string(),
            c.skipped.to_string(),
        ]);
    }
    rep.table(
        "Delta: ours vs thin_delta (same metadata file, page cache warm for both)",
        &[
            "mapped",
            "change (pair)",
            "changed",
            "thin_delta (process)",
            "ours: open + delta",
            "speed-up",
            "speed-up, median of per-rep ratios",
            "CPU-time speed-up (thin_delta / ours)",
            "ours: open + delta incl. same + runs",
            "speed-up (like for like)",
            "ours: delta alone, first",
            "ours: delta alone, repeated",
            "ours: open + delta, metadata not cached",
            "speed-up (uncached)",
            "nodes read",
            "shared subtrees skipped",
        ],
        &rows,
    );

    // Flatness at a fixed change: each size against the smallest, per pattern. The
    // delta walk itself is "delta alone, first call" (open is reported above; it grows
    // with the metadata device's size: every metadata space map bitmap is loaded).
    let mut flat_rows = Vec::new();
    for pattern in ["clustered", "uniform"] {
        let pc: Vec<&Case> = cases.iter().filter(|c| c.pattern == pattern).collect();
        let Some(first) = pc.first() else { continue };
        let g = |x: &Stats, y: &Stats| x.median().as_secs_f64() / y.median().as_secs_f64();
        for c in &pc {
            flat_rows.push(vec![
                pattern.to_string(),
                human_count(c.mapped),
                format!("{:.0}", c.mapped as f64 / first.mapped as f64),
                fmt_dur(c.delta_first.median()),
                format!("{:.2}", g(&c.delta_first, &first.delta_first)),
                fmt_dur(c.open_delta.median()),
                format!("{:.2}", g(&c.open_delta, &first.open_delta)),
                format!(
                    "{} ({:.2})",
                    c.nodes_read,
                    c.nodes_read as f64 / first.nodes_read as f64
                ),
                format!(
                    "{:.1} µs",
                    c.delta_first.median().as_secs_f64() * 1e6 / c.nodes_read.max(1) as f64
                ),
                fmt_dur(c.tool.median()),
                format!("{:.2}", g(&c.tool, &first.tool)),
            ]);
        }
    }
    rep.table(
        &format!(
            "Growth with the mapped count at a fixed change of {} blocks (each size against the smallest)",
            human_count(changed)
        ),
        &[
            "change",
            "mapped",
            "mapped growth",
            "ours: delta alone (first)",
            "growth",
            "ours: open + delta",
            "growth",
            "nodes read (growth)",
            "time per node read",
            "thin_delta",
            "growth",
        ],
        &flat_rows,
    );
    rep.table(
        "Setup (not timed in the comparison)",
        &[
            "mapped",
            "thin_restore",
            "engine: 2 snapshots + 2 change sets + commits",
            "metadata file (sparse)",
        ],
        &setup_rows,
    );

    for c in &cases {
        let r = ratio(&c.tool, &c.open_delta);
        let headline = c.mapped == 1_000_000 && changed == 10_000;
        let goal = if headline {
            format!("goal >= {GOAL}x {}", verdict(r >= GOAL))
        } else {
            "no goal at this size".to_string()
        };
        rep.summary(format!(
            "{} mapped, {} changed {}: thin_delta {} vs open+delta {} = {r:.1}x \
             (CPU time {:.1}x; incl. same {:.1}x; metadata uncached {:.1}x); {goal}",
            human_count(c.mapped),
            human_count(changed),
            c.pattern,
            fmt_dur(c.tool.median()),
            fmt_dur(c.open_delta.median()),
            ratio(&c.tool_cpu, &c.open_delta_cpu),
            ratio(&c.tool, &c.open_delta_same),
            ratio(&c.tool, &c.cold),
        ));
    }
    for pattern in ["clustered", "uniform"] {
        let pc: Vec<&Case> = cases.iter().filter(|c| c.pattern == pattern).collect();
        if let (Some(f), Some(l)) = (pc.first(), pc.last()) {
            if f.mapped < l.mapped {
                let g = l.delta_first.median().as_secs_f64() / f.delta_first.median().as_secs_f64();
                rep.summary(format!(
                    "{pattern}: delta grows {g:.2}x from {} to {} mapped ({:.0}x more mappings; \
                     nodes read {:.2}x; thin_delta grows {:.2}x); flat (<= 2x) {}",
                    human_count(f.mapped),
                    human_count(l.mapped),
                    l.mapped as f64 / f.mapped as f64,
                    l.nodes_read as f64 / f.nodes_read.max(1) as f64,
                    l.tool.median().as_secs_f64() / f.tool.median().as_secs_f64(),
                    verdict(g <= 2.0)
                ));
            }
        }
    }
    rep.finish();
}
