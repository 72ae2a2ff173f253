//! Soak: the classic snapshot lifecycle, many thousand times, through the catalog
//! library on one open pool: snapshot `vm@s`, write 4 KiB into the volume, roll the
//! volume back to `vm@s`, destroy `vm@s`. Every step is a catalog change, so each
//! iteration also records three restore points in the archive and prunes it.
//!
//! Goal (issue): time per iteration and memory stay flat from the first thousand
//! iterations to the last, the archive stays within its retention, `thin_check` passes
//! at the end. The peer is the first thousand iterations of the same run.
//!
//! The archive clock is simulated (`--clock-step` seconds per iteration, default one
//! hour) so that the days-based retention really prunes during the run: with the
//! default `retain_days` 30 the archive reaches its steady state (30 days of points)
//! after 720 iterations. `--clock-step 0` uses the real clock: nothing is then old
//! enough to prune and the archive grows by three points per iteration, which is the
//! test of "no command slows down as history grows".
//!
//! `cargo run --release -p thinvol-bench --bin soak -- --iters 60000`

use std::path::Path;
use std::time::{Duration, Instant};

use thinvol_bench::{cpu_self, fail, fmt_dur, verdict, work_dir, Args, Report, SplitMix64};
use thinvol_catalog::archive;
use thinvol_catalog::{ops, CatalogPool, Name, Settings};
use thinvol_engine::PoolConfig;

/// Last-thousand / first-thousand ratio at or below which we call the cost flat.
const FLAT: f64 = 1.5;
const BS: u64 = 64 << 10;

/// Anonymous resident memory (`RssAnon`): what a leak grows. `VmRSS` also counts the
/// page-cache pages of the pool's files that small reads copy from a mapping
/// (docs/design.md §4.1), which are the page cache's, not ours.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut files = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                bytes += m.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}

fn name(s: &str) -> Name {
    Name::parse(s).unwrap_or_else(|e| fail(&e.to_string()))
}

/// Figures of `every` iterations. The per-iteration times live in one buffer reused for
/// every bucket (keeping them all would grow this process by 16 bytes per iteration
/// and show up as the RSS growth we are looking for).
#[derive(Default)]
struct Bucket {
    end: u64,
    n: u32,
    mean: Duration,
    median: Duration,
    p99: Duration,
    /// Process CPU time (user + system) over the bucket.
    cpu: Duration,
    ops: [Duration; 4],
    rss_kib: u64,
    points: u64,
    archive_bytes: u64,
    archive_files: u64,
}

impl Bucket {
    /// Take the statistics of `times` (sorted in place).
    fn close(&mut self, times: &mut [Duration]) {
        self.n = times.len().max(1) as u32;
        self.mean = times.iter().sum::<Duration>() / self.n;
        times.sort_unstable();
        let at = |p: f64| {
            times
                .get(((times.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        self.median = at(0.5);
        self.p99 = at(0.99);
    }
    fn cpu_per_iter(&self) -> Duration {
        self.cpu / self.n.max(1)
    }
}

fn main() {
    let args = Args::parse(&[]);
    let iters = args.u64_or("iters", 60_000).max(1);
    let every = args.u64_or("every", 1_000).max(1);
    let step = args.u64_or("clock-step", 3_600);
    let retain_min = args.u64_or("retain-min", 10) as u32;
    let retain_days = args.u64_or("retain-days", 30) as u32;
    let fill_blocks = args.u64_or("fill-blocks", 256).max(1);
    let seed = args.u64_or("seed", 1);
    let tmp = work_dir(&args);
    let mut rep = Report::start("soak", &args, tmp.path());
    let dir = tmp.path().join("pool");

    let start_clock = 1_700_000_000u64;
    let clock = std::rc::Rc::new(std::cell::Cell::new(start_clock));
    if step > 0 {
        let c = clock.clone();
        archive::set_clock(Some(Box::new(move || c.get())));
    }
    let cfg = PoolConfig {
        data_size: 1 << 30,
        commit_interval: Duration::ZERO,
        ..PoolConfig::default()
    };
    let settings = Settings {
        retain_min,
        retain_days,
        ..Settings::default()
    };
    let mut cp = CatalogPool::create("soak", &dir, &cfg, settings)
        .unwrap_or_else(|e| fail(&format!("creating the pool: {e}")));
    let vm = name("soak/vm");
    let snap = name("soak/vm@s");
    ops::create_volume(&mut cp, &vm, 4 * fill_blocks * BS).unwrap_or_else(|e| fail(&e.to_string()));
    let mut image = vec![0u8; (fill_blocks * BS) as usize];
    let mut rng = SplitMix64::new(seed);
    for c in image.chunks_mut(8) {
        c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]);
    }
    let id = cp.thin_of(&vm).unwrap_or_else(|e| fail(&e.to_string()));
    cp.pool
        .write(id, 0, &image)
        .unwrap_or_else(|e| fail(&e.to_string()));
    rep.note(&format!(
        "pool: 1 GiB data, 64 KiB blocks; volume soak/vm of {} blocks, the first {fill_blocks} \
         written; each iteration: snapshot vm@s, write 4 KiB at a random offset of the \
         written part (copy-on-write of one block), rollback vm@s, destroy vm@s \
         ({iters} iterations, figures per {every}); retention: retain_min {retain_min}, \
         retain_days {retain_days}; archive clock: {}",
        4 * fill_blocks,
        if step > 0 {
            format!("simulated, +{step} s per iteration")
        } else {
            "real".to_string()
        }
    ));

    let buf = [0xA5u8; 4096];
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut cur = Bucket::default();
    let mut times: Vec<Duration> = Vec::with_capacity(every as usize);
    let adir = dir.join(archive::ARCHIVE_DIR);
    let run_start = Instant::now();
    let mut max_points = 0u64;
    let mut cpu0 = cpu_self();
    for i in 0..iters {
        clock.set(start_clock + i * step);
        let t0 = Instant::now();
        ops::snapshot(&mut cp, std::slice::from_ref(&snap))
            .unwrap_or_else(|e| fail(&format!("iteration {i}: snapshot: {e}")));
        let t1 = Instant::now();
        let id = cp
            .thin_of(&vm)
            .unwrap_or_else(|e| fail(&format!("iteration {i}: {e}")));
        let off = rng.below(fill_blocks * BS / 4096) * 4096;
        cp.pool
            .write(id, off, &buf)
            .unwrap_or_else(|e| fail(&format!("iteration {i}: write: {e}")));
        let t2 = Instant::now();
        ops::rollback(&mut cp, &snap, None)
            .unwrap_or_else(|e| fail(&format!("iteration {i}: rollback: {e}")));
        let t3 = Instant::now();
        ops::destroy(&mut cp, &snap, false)
            .unwrap_or_else(|e| fail(&format!("iteration {i}: destroy: {e}")));
        let t4 = Instant::now();
        for w in cp.take_warnings() {
            eprintln!("iteration {i}: warning: {w}");
        }
        times.push(t4 - t0);
        cur.ops[0] += t1 - t0;
        cur.ops[1] += t2 - t1;
        cur.ops[2] += t3 - t2;
        cur.ops[3] += t4 - t3;
        if (i + 1) % every == 0 || i + 1 == iters {
            cur.end = i + 1;
            cur.cpu = cpu_self() - cpu0;
            cur.close(&mut times);
            times.clear();
            cur.rss_kib = rss_kib();
            // O(1): the index header and length (history() would read every slot).
            cur.points = archive::point_count(&dir).unwrap_or_else(|e| fail(&e.to_string()));
            max_points = max_points.max(cur.points);
            (cur.archive_bytes, cur.archive_files) = dir_bytes(&adir);
            eprintln!(
                "{:>6} iterations  {:>10}/iter (median {}, cpu {})  anon rss {} KiB  archive {} points {} files {} KiB  ({:.0} s)",
                cur.end,
                fmt_dur(cur.mean),
                fmt_dur(cur.median),
                fmt_dur(cur.cpu_per_iter()),
                cur.rss_kib,
                cur.points,
                cur.archive_files,
                cur.archive_bytes >> 10,
                run_start.elapsed().as_secs_f64()
            );
            buckets.push(std::mem::take(&mut cur));
            // The statistics above (a directory listing) are not the benchmark's work.
            cpu0 = cpu_self();
        }
    }
    let total = run_start.elapsed();

    // The volume must hold exactly the image: every write was rolled back.
    let mut back = vec![0u8; image.len()];
    let id = cp.thin_of(&vm).unwrap_or_else(|e| fail(&e.to_string()));
    cp.pool
        .read(id, 0, &mut back)
        .unwrap_or_else(|e| fail(&e.to_string()));
    let content_ok = back == image;
    let status = cp.pool.status().unwrap_or_else(|e| fail(&e.to_string()));
    let our_check = cp.pool.check().map(|r| r.is_clean()).unwrap_or(false);
    let final_tx = cp.catalog.transaction_id;
    cp.close().unwrap_or_else(|e| fail(&e.to_string()));
    let tc = thinvol_testkit::thin_check(&dir.join(thinvol_engine::METADATA_FILE));
    let (tc_ok, tc_text) = match &tc {
        Ok(o) => (o.is_clean(), o.problems().join("; ")),
        Err(e) => (false, e.to_string()),
    };

    let rows: Vec<Vec<String>> = buckets
        .iter()
        .map(|b| {
            let n = b.n.max(1);
            vec![
                b.end.to_string(),
                fmt_dur(b.mean),
                fmt_dur(b.median),
                fmt_dur(b.p99),
                fmt_dur(b.cpu_per_iter()),
                fmt_dur(b.ops[0] / n),
                fmt_dur(b.ops[1] / n),
                fmt_dur(b.ops[2] / n),
                fmt_dur(b.ops[3] / n),
                format!("{:.1}", b.rss_kib as f64 / 1024.0),
                b.points.to_string(),
                b.archive_files.to_string(),
                format!("{:.1}", b.archive_bytes as f64 / 1024.0),
            ]
        })
        .collect();
    rep.table(
        &format!("Per {every} iterations"),
        &[
            "iterations",
            "mean / iter",
            "median",
            "p99",
            "CPU / iter",
            "snapshot",
            "write",
            "rollback",
            "destroy",
            "anon RSS MiB",
            "archive points",
            "archive files",
            "archive KiB",
        ],
        &rows,
    );
    let first = buckets.first().expect("at least one bucket");
    let last = buckets.last().expect("at least one bucket");
    let tratio = last.mean.as_secs_f64() / first.mean.as_secs_f64();
    let mratio = last.median.as_secs_f64() / first.median.as_secs_f64();
    let cratio = last.cpu_per_iter().as_secs_f64() / first.cpu_per_iter().as_secs_f64();
    let rss_ratio = last.rss_kib as f64 / first.rss_kib.max(1) as f64;
    // Points younger than retain_days: 3 per iteration over the window, plus the
    // boundary iteration; never fewer than retain_min.
    let bound = match (u64::from(retain_days) * 86_400).checked_div(step) {
        Some(window) => (3 * (window + 1)).max(u64::from(retain_min)),
        None => 3 * iters + 1,
    };
    let within = max_points <= bound;
    // Wall time per iteration is mostly fsync latency, which other processes' I/O moves
    // by 10x on a shared machine: the median and the CPU time judge flatness.
    let time_flat = mratio <= FLAT && cratio <= FLAT;
    let rss_flat = rss_ratio <= FLAT;
    rep.note(&format!(
        "total {} for {iters} iterations; final transaction id {final_tx}; pool data used {} \
         of {} blocks, metadata {} of {} blocks; volume content equals the written image: \
         {content_ok}; our checker clean: {our_check}; thin_check clean: {tc_ok}{}",
        fmt_dur(total),
        status.data_blocks_used,
        status.data_blocks_total,
        status.metadata_blocks_used,
        status.metadata_blocks_total,
        if tc_text.is_empty() {
            String::new()
        } else {
            format!(" ({tc_text})")
        }
    ));
    rep.summary(format!(
        "time/iter first {every}: mean {} median {} CPU {} -> last {every}: mean {} median {} \
         CPU {} (ratios: mean {tratio:.2}, median {mratio:.2}, CPU {cratio:.2}); flat (median \
         and CPU <= {FLAT}) {}",
        fmt_dur(first.mean),
        fmt_dur(first.median),
        fmt_dur(first.cpu_per_iter()),
        fmt_dur(last.mean),
        fmt_dur(last.median),
        fmt_dur(last.cpu_per_iter()),
        verdict(time_flat)
    ));
    rep.summary(format!(
        "anonymous RSS first {:.1} MiB -> last {:.1} MiB (ratio {rss_ratio:.2}); flat (<= {FLAT}) {}",
        first.rss_kib as f64 / 1024.0,
        last.rss_kib as f64 / 1024.0,
        verdict(rss_flat)
    ));
    rep.summary(format!(
        "archive at most {max_points} points (retention bound {bound}), {} files, {:.1} KiB at \
         the end; within retention {}",
        last.archive_files,
        last.archive_bytes as f64 / 1024.0,
        verdict(within)
    ));
    rep.summary(format!(
        "thin_check at the end: {}; our checker: {}; volume content intact: {} -> {}",
        if tc_ok { "clean" } else { "FAILED" },
        if our_check { "clean" } else { "FAILED" },
        content_ok,
        verdict(tc_ok && our_check && content_ok)
    ));
    rep.finish();
}
