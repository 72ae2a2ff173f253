//! What the metadata archive costs per catalog change, against the number of mappings
//! the pool's devices hold: every change dumps every catalogued device's mappings into
//! a restore point (docs/design.md §11.3), so it is O(mappings).
//!
//! For each `--mapped` size a volume mapping N virtual blocks is built in one
//! transaction (`Tx::map_existing`, data blocks sparse and never written), with data
//! blocks either in one run (`sequential`, the dump is a few bytes) or shuffled
//! (`random`, the worst case: one run per block). Then `--reps` catalog-only changes
//! (a settings write) are timed; each records a point. The peer is the smallest size:
//! the difference is the dump. Point file size per mapping is reported too.
//!
//! `cargo run --release -p thinvol-bench --bin archive-cost -- --mapped 1K,100K,1M`

use std::time::Duration;

use thinvol_bench::{fail, fmt_dur, human_count, time, work_dir, Args, Report, SplitMix64, Stats};
use thinvol_catalog::archive;
use thinvol_catalog::{CatalogPool, Settings, Volume};
use thinvol_engine::format::{DataBlock, ThinId, VBlock};
use thinvol_engine::PoolConfig;

const BS: u64 = 64 << 10;

fn main() {
    let args = Args::parse(&[]);
    let sizes = args.list_or("mapped", &[1_000, 100_000, 1_000_000]);
    let reps = args.u64_or("reps", 10).max(1);
    let tmp = work_dir(&args);
    let mut rep = Report::start("archive-cost", &args, tmp.path());
    rep.note(&format!(
        "one volume mapping N blocks; {reps} catalog-only changes (settings write: pool \
         transaction with two commits, catalog files, restore point) timed per size and layout"
    ));
    let mut rows = Vec::new();
    let mut base: Option<Duration> = None;
    for layout in ["sequential", "random"] {
        for &n in &sizes {
            let dir = tmp.path().join(format!("{layout}-{n}"));
            let cfg = PoolConfig {
                data_size: (2 * n + 1024) * BS,
                commit_interval: Duration::ZERO,
                ..PoolConfig::default()
            };
            let mut cp = CatalogPool::create("cost", &dir, &cfg, Settings::default())
                .unwrap_or_else(|e| fail(&e.to_string()));
            let mut perm: Vec<u64> = (0..n).collect();
            if layout == "random" {
                let mut rng = SplitMix64::new(n);
                for i in (1..perm.len()).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    perm.swap(i, j);
                }
            }
            let (r, build) = time(|| {
                cp.change(|c, tx| {
                    let id = c.alloc_thin_id()?;
                    tx.create_thin(ThinId(id))?;
                    for (v, &d) in perm.iter().enumerate() {
                        tx.map_existing(ThinId(id), VBlock(v as u64), DataBlock(d))?;
                    }
                    c.volumes.insert(
                        "vm".into(),
                        Volume {
                            thin_id: id,
                            uuid: String::new(),
                            size: n * BS,
                            created: 0,
                            origin: None,
                            snapshots: Default::default(),
                        },
                    );
                    Ok(())
                })
            });
            r.unwrap_or_else(|e| fail(&format!("building {n} mappings: {e}")));
            let s = cp.catalog.settings.clone();
            let mut ts = Vec::new();
            for _ in 0..reps {
                let (r, t) = time(|| cp.set_settings(s.clone()));
                r.unwrap_or_else(|e| fail(&e.to_string()));
                ts.push(t);
            }
            for w in cp.take_warnings() {
                eprintln!("warning: {w}");
            }
            let h = archive::history(&dir).unwrap_or_else(|e| fail(&e.to_string()));
            let last = h.last().unwrap_or_else(|| fail("no restore point"));
            if last.mappings != n {
                fail(&format!(
                    "the last point holds {} mappings, expected {n}",
                    last.mappings
                ));
            }
            // Reading the point back (what restore does first).
            let (p, load) = time(|| archive::load_point(&dir, last.id));
            let p = p.unwrap_or_else(|e| fail(&e.to_string()));
            let runs: usize = p.devices.iter().map(|d| d.runs.len()).sum();
            cp.close().unwrap_or_else(|e| fail(&e.to_string()));
            let _ = std::fs::remove_dir_all(&dir);
            let st = Stats::new(ts);
            let b = *base.get_or_insert(st.median());
            rows.push(vec![
                layout.to_string(),
                human_count(n),
                runs.to_string(),
                fmt_dur(st.median()),
                fmt_dur(st.min()),
                format!("{:.2}", st.median().as_secs_f64() / b.as_secs_f64()),
                last.bytes.to_string(),
                format!("{:.2}", last.bytes as f64 / n as f64),
                fmt_dur(load),
                fmt_dur(build),
            ]);
            rep.summary(format!(
                "{layout} {}: change with restore point median {} ({} point bytes, {:.2} B/mapping)",
                human_count(n),
                fmt_dur(st.median()),
                last.bytes,
                last.bytes as f64 / n as f64
            ));
        }
        base = None;
    }
    rep.table(
        "Catalog change cost against mapped blocks",
        &[
            "layout",
            "mapped",
            "runs",
            "change median",
            "min",
            "ratio to smallest",
            "point bytes",
            "bytes / mapping",
            "load point",
            "build (setup)",
        ],
        &rows,
    );
    rep.finish();
}
