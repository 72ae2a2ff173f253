//! Snapshot creation time against the number of mapped blocks of the origin.
//!
//! For each `--mapped` size, the origin (device 0, mapping blocks 0..N) is built with
//! `thin_restore`, the pool is opened with our engine, and `--snaps` snapshots of the
//! origin are taken one after another. Only `create_snap` is timed; each is followed by
//! a commit, timed separately. The peer is the smallest size in the same run: a
//! snapshot is O(1) when the ratio of medians stays near 1 as N grows.
//!
//! Goal (issue): flat, under 1 ms.
//!
//! `cargo run --release -p thinvol-bench --bin snapshot -- --mapped 1K,100K,1M --snaps 50`

use std::time::Duration;

use thinvol_bench::fixture::restore_identity;
use thinvol_bench::{fail, fmt_dur, human_count, time, verdict, work_dir, Args, Report, Stats};
use thinvol_engine::format::ThinId;
use thinvol_engine::{OpenOptions, Pool};

/// Median ratio to the smallest size at or below which we call the cost flat.
const FLAT: f64 = 2.0;

fn main() {
    let args = Args::parse(&[]);
    let sizes = args.list_or("mapped", &[1_000, 100_000, 1_000_000]);
    let snaps = args.u64_or("snaps", 50).max(1);
    let tmp = work_dir(&args);
    let mut rep = Report::start("snapshot", &args, tmp.path());
    rep.note(&format!(
        "origin device 0 maps virtual blocks 0..N to data blocks 0..N (built with thin_restore); \
         {snaps} snapshots of it, ids 1..={snaps}, each followed by a commit; only create_snap is \
         timed for the snapshot columns"
    ));

    struct Res {
        mapped: u64,
        snap: Stats,
        commit: Stats,
        restore: Duration,
    }
    let mut results = Vec::new();
    for &n in &sizes {
        let dir = tmp.path().join(format!("pool-{n}"));
        let restore = restore_identity(&dir, n, n + 1024, 4096);
        let opts = OpenOptions {
            commit_interval: Duration::ZERO,
            ..OpenOptions::default()
        };
        let pool = Pool::open_with(&dir, &opts).unwrap_or_else(|e| fail(&e.to_string()));
        let mut st = Vec::new();
        let mut ct = Vec::new();
        for i in 1..=snaps {
            let (r, t) = time(|| pool.create_snap(ThinId(i), ThinId(0)));
            r.unwrap_or_else(|e| fail(&format!("snapshot {i} of {n} mappings: {e}")));
            st.push(t);
            let (r, t) = time(|| pool.commit());
            r.unwrap_or_else(|e| fail(&e.to_string()));
            ct.push(t);
        }
        // The snapshots really share the origin's mappings.
        let last = pool
            .device(ThinId(snaps))
            .unwrap_or_else(|e| fail(&e.to_string()));
        if last.mapped_blocks != n {
            fail(&format!(
                "snapshot {snaps} reports {} mapped blocks, expected {n}",
                last.mapped_blocks
            ));
        }
        pool.close().unwrap_or_else(|e| fail(&e.to_string()));
        let _ = std::fs::remove_dir_all(&dir);
        results.push(Res {
            mapped: n,
            snap: Stats::new(st),
            commit: Stats::new(ct),
            restore,
        });
    }

    let base = results.first().map(|r| r.snap.median()).unwrap_or_default();
    let base_n = results.first().map_or(0, |r| r.mapped);
    let mut rows = Vec::new();
    for r in &results {
        let ratio = r.snap.median().as_secs_f64() / base.as_secs_f64();
        let under = r.snap.max() < Duration::from_millis(1);
        let flat = ratio <= FLAT;
        let met = under && flat;
        rows.push(vec![
            human_count(r.mapped),
            r.snap.len().to_string(),
            fmt_dur(r.snap.median()),
            fmt_dur(r.snap.min()),
            fmt_dur(r.snap.max()),
            format!("{ratio:.2}"),
            fmt_dur(r.commit.median()),
            fmt_dur(r.commit.max()),
            fmt_dur(r.restore),
            verdict(met).to_string(),
        ]);
        rep.summary(format!(
            "create_snap with {} mapped: median {} max {} (ratio to {} mapped {ratio:.2}); \
             goal < 1 ms and flat (ratio <= {FLAT}) {}",
            human_count(r.mapped),
            fmt_dur(r.snap.median()),
            fmt_dur(r.snap.max()),
            human_count(base_n),
            verdict(met)
        ));
    }
    rep.table(
        "Snapshot creation",
        &[
            "mapped blocks",
            "snapshots",
            "create_snap median",
            "min",
            "max",
            &format!("median ratio to {} mapped", human_count(base_n)),
            "commit median",
            "commit max",
            "thin_restore (setup)",
            "goal < 1 ms (max) and flat",
        ],
        &rows,
    );
    rep.finish();
}
