//! 4 KiB reads of data that is not in the page cache: a thin device against `pread`
//! of a plain file of the same size, same offsets, both dropped from the page cache
//! before each measurement.
//!
//! Why: small reads of the data file are copied from a mapping of it (docs/design.md
//! §4.1), which wins for cached data (engine-io). For cold data the kernel decides how
//! much to read per miss, and a mapping's default readaround read most of a 1 GiB file
//! for 2 000 random 4 KiB reads; the mapping is therefore `MADV_RANDOM`, and reads that
//! continue a sequential stream use `pread` (readahead). This benchmark checks both
//! patterns against `pread`:
//! * random: `--ops` reads at random 4 KiB-aligned offsets;
//! * sequential: `--ops` consecutive 4 KiB reads from the start.
//!
//! Each pattern runs `--rounds` times, alternating which side goes first; medians are
//! reported, with the pages each side left cached (`mincore` over a fresh mapping)
//! — the bytes the kernel read to answer the requests.
//!
//! `cargo run --release -p thinvol-bench --bin cold-read -- --ops 20000`

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use thinvol_bench::{drop_file_cache, fail, fmt_dur, human_count, median_f64, work_dir};
use thinvol_bench::{thin_read_method, Args, FileMap, Report};
use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::{Pool, PoolConfig};

const IO: u64 = 4096;
const BLOCK: u64 = 64 << 10;

fn fail_on<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| fail(&e.to_string()))
}

/// Pages of `path` in the page cache.
fn cached_pages(path: &Path) -> u64 {
    let f = fail_on(File::open(path));
    FileMap::new(&f, fail_on(f.metadata()).len()).resident_pages()
}

/// One side of the comparison. The thin side opens the pool for each measurement and
/// closes it after: pages mapped by a live process are not dropped by
/// `POSIX_FADV_DONTNEED`, so a pool kept open would keep its data warm.
enum Side<'a> {
    Plain(&'a Path),
    Thin(&'a Path),
}

fn measure(side: &Side<'_>, offs: &[u64]) -> (Duration, u64) {
    let mut buf = vec![0u8; IO as usize];
    match side {
        Side::Plain(path) => {
            let f = fail_on(File::open(path));
            fail_on(drop_file_cache(path));
            let t = Instant::now();
            for &o in offs {
                fail_on(f.read_exact_at(&mut buf, o));
            }
            let d = t.elapsed();
            (d, cached_pages(path))
        }
        Side::Thin(dir) => {
            let data = dir.join(thinvol_engine::DATA_FILE);
            let pool = fail_on(Pool::open(dir));
            fail_on(drop_file_cache(&data));
            let t = Instant::now();
            for &o in offs {
                fail_on(pool.read(ThinId(0), o, &mut buf));
                if u64::from_le_bytes(buf[..8].try_into().unwrap_or_default()) != o {
                    fail(&format!("thin read at {o} returned the wrong bytes"));
                }
            }
            let d = t.elapsed();
            fail_on(pool.close());
            (d, cached_pages(&data))
        }
    }
}

fn main() {
    let args = Args::parse(&[]);
    let ops = args.u64_or("ops", 20_000);
    let size = args.u64_or("size-mib", 1024) << 20;
    let rounds = args.u64_or("rounds", 3).max(1);
    let seed = args.u64_or("seed", 42);
    if size < BLOCK || !size.is_multiple_of(BLOCK) || ops * IO > size {
        fail("--size-mib must give whole 64 KiB blocks and hold --ops reads");
    }
    let tmp = work_dir(&args);
    let dir = tmp.path();
    let mut rep = Report::start("cold-read", &args, dir);
    rep.note(&format!(
        "device size {} MiB, {} reads of 4 KiB per measurement, {rounds} rounds; both files \
         written back and dropped from the page cache (POSIX_FADV_DONTNEED) before each; \
         thin reads {}",
        size >> 20,
        human_count(ops),
        thin_read_method()
    ));

    let cfg = PoolConfig {
        data_block_size: DataBlockSize::DEFAULT,
        data_size: size + 16 * BLOCK,
        metadata_size: None,
        commit_interval: Duration::ZERO,
    };
    let pool = fail_on(Pool::create(&dir.join("pool"), &cfg));
    fail_on(pool.create_thin(ThinId(0)));
    let plain_path = dir.join("plain.img");
    let plain = fail_on(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&plain_path),
    );
    fail_on(plain.set_len(size));
    let mut chunk = vec![0u8; BLOCK as usize];
    for b in 0..size / BLOCK {
        for (i, w) in chunk.chunks_mut(8).enumerate() {
            w.copy_from_slice(&(b * BLOCK + i as u64 * 8).to_le_bytes());
        }
        fail_on(plain.write_all_at(&chunk, b * BLOCK));
        fail_on(pool.write(ThinId(0), b * BLOCK, &chunk));
    }
    fail_on(pool.commit());
    fail_on(pool.close());
    fail_on(plain.sync_data());
    drop(plain);
    let pool_dir = dir.join("pool");
    let sides = [Side::Plain(&plain_path), Side::Thin(&pool_dir)];

    let random = thinvol_bench::offsets::random(size, IO, ops, seed);
    let sequential: Vec<u64> = (0..ops).map(|i| i * IO).collect();
    let mut rows = Vec::new();
    for (pattern, offs) in [("random", &random), ("sequential", &sequential)] {
        let mut times = [Vec::new(), Vec::new()];
        let mut pages = [Vec::new(), Vec::new()];
        let mut ratios = Vec::new();
        for r in 0..rounds {
            let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut round = [Duration::ZERO; 2];
            for i in order {
                let (d, p) = measure(&sides[i], offs);
                round[i] = d;
                times[i].push(d.as_secs_f64());
                pages[i].push(p as f64);
            }
            ratios.push(round[0].as_secs_f64() / round[1].as_secs_f64());
        }
        let per_read = |v: &[f64]| fmt_dur(Duration::from_secs_f64(median_f64(v) / ops as f64));
        let ratio = median_f64(&ratios);
        rows.push(vec![
            pattern.to_string(),
            human_count(ops),
            per_read(&times[0]),
            per_read(&times[1]),
            format!("{:.0}", median_f64(&pages[0])),
            format!("{:.0}", median_f64(&pages[1])),
            format!("{ratio:.2}"),
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" / "),
        ]);
        rep.summary(format!(
            "cold {pattern} 4 KiB reads: thin/plain speed ratio {ratio:.2} (plain {} per read, \
             thin {}; pages cached after: plain {:.0}, thin {:.0})",
            per_read(&times[0]),
            per_read(&times[1]),
            median_f64(&pages[0]),
            median_f64(&pages[1]),
        ));
    }
    rep.table(
        "Cold 4 KiB reads: thin device vs pread of a plain file",
        &[
            "pattern",
            "reads",
            "plain per read",
            "thin per read",
            "plain: pages cached after",
            "thin: pages cached after",
            "ratio (plain time / thin time), median",
            "per round",
        ],
        &rows,
    );
    rep.finish();
}
