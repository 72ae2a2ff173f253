//! 4 KiB random I/O on a thin device, in-process, against pread/pwrite on a plain file
//! of the same size in the same directory (same filesystem, both buffered).
//!
//! Phases, each run with 1 and with 2 threads (`--threads`):
//! * first-write: one 4 KiB write into every (unprovisioned) 64 KiB block, in random
//!   order — the thin device provisions a block per write; the plain file is sparse,
//!   so it allocates filesystem blocks too. Commit / fdatasync are timed separately.
//! * random-write: `--ops` 4 KiB writes at random 4 KiB-aligned offsets into the
//!   fully written (provisioned) device / file.
//! * random-read: `--ops` 4 KiB reads at random offsets, same conditions.
//!
//! Diagnostics (1 thread, against the plain file): random writes and reads straight on
//! the pool's data file at the offsets device 0 maps to (engine bypassed, but each
//! offset goes through the benchmark's 128 KiB block table); reads of the data file at
//! the plain file's own offsets (the file without the table); reads of the plain file
//! after the same dependent table load (the table without the file); the thin device
//! against the plain file read through a mapping of it (`memcpy`: no system call on
//! either side, since the engine copies small reads from a mapping of its data file;
//! `THINVOL_MAPPED_READS=0` makes it `pread` like the plain side); and the engine
//! alone on a null data device.
//!
//! Both sides get exactly the same offsets and contents. The work is split into
//! `--slices` slices (default 20) run alternately plain-first and thin-first, so that changes of the
//! machine's background load hit both sides alike; the ratio is thin throughput divided
//! by plain throughput over all slices. After the run the thin device and the plain
//! file are compared byte for byte.
//!
//! `cargo run --release -p thinvol-bench --bin engine-io -- --ops 200000`

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::Arc;
use thinvol_bench::{cpu_self, drop_file_cache, thin_read_method, work_dir, FileMap};
use thinvol_bench::{fail, fmt_dur, human_count, median_f64, time, verdict, Args, Report};
use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::storage::{MemStorage, Storage};
use thinvol_engine::{default_metadata_size, Pool, PoolConfig};

const IO: usize = 4096;
const BLOCK: u64 = 64 << 10;

fn first_write_offsets(size: u64, seed: u64) -> Vec<u64> {
    thinvol_bench::offsets::first_write(size, BLOCK, IO as u64, seed)
}

fn random_offsets(size: u64, n: u64, seed: u64) -> Vec<u64> {
    thinvol_bench::offsets::random(size, IO as u64, n, seed)
}

#[derive(Clone, Copy)]
enum Side<'a> {
    Plain(&'a File),
    Thin(&'a Pool, ThinId),
    /// The thin device's data file accessed directly at the offsets the device maps
    /// to (virtual block -> data block table taken from the pool): the kernel's share
    /// of the thin side's cost, with the engine bypassed.
    Direct(&'a File, &'a [u64]),
    /// A file read at the same offsets as the plain file, but each offset first goes
    /// through a dependent load from the thin device's block table (whose values are
    /// below 2^40: shifted right by 40 they add 0): the cost of translating a virtual
    /// block through a table of the device's size, with nothing else changed.
    Loaded(&'a File, &'a [u64]),
    /// The plain file read through a shared mapping of it (`memcpy`, no system call):
    /// the like-for-like peer of the engine's mapped reads. Reads only.
    Mapped(&'a [u8]),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
}

impl Side<'_> {
    fn write(&self, off: u64, buf: &[u8]) {
        match self {
            Side::Plain(f) => f
                .write_all_at(buf, off)
                .unwrap_or_else(|e| fail(&format!("pwrite at {off}: {e}"))),
            Side::Thin(p, id) => p
                .write(*id, off, buf)
                .unwrap_or_else(|e| fail(&format!("thin write at {off}: {e}"))),
            Side::Direct(f, map) => f
                .write_all_at(buf, direct_offset(map, off))
                .unwrap_or_else(|e| fail(&format!("direct pwrite at {off}: {e}"))),
            Side::Loaded(f, map) => f
                .write_all_at(buf, off + (map[(off / BLOCK) as usize] >> 40))
                .unwrap_or_else(|e| fail(&format!("pwrite at {off}: {e}"))),
            Side::Mapped(_) => fail("the mapped plain side is read-only"),
        }
    }

    fn read(&self, off: u64, buf: &mut [u8]) {
        match self {
            Side::Plain(f) => f
                .read_exact_at(buf, off)
                .unwrap_or_else(|e| fail(&format!("pread at {off}: {e}"))),
            Side::Thin(p, id) => p
                .read(*id, off, buf)
                .unwrap_or_else(|e| fail(&format!("thin read at {off}: {e}"))),
            Side::Direct(f, map) => f
                .read_exact_at(buf, direct_offset(map, off))
                .unwrap_or_else(|e| fail(&format!("direct pread at {off}: {e}"))),
            Side::Loaded(f, map) => f
                .read_exact_at(buf, off + (map[(off / BLOCK) as usize] >> 40))
                .unwrap_or_else(|e| fail(&format!("pread at {off}: {e}"))),
            Side::Mapped(m) => buf.copy_from_slice(&m[off as usize..off as usize + buf.len()]),
        }
    }
}

/// Data-file offset of virtual byte `off` (4 KiB I/O never crosses a block).
fn direct_offset(map: &[u64], off: u64) -> u64 {
    map[(off / BLOCK) as usize] * BLOCK + off % BLOCK
}

/// The 4 KiB written at `off` in generation `gen`: the same bytes on both sides, and
/// independent of the order in which threads get to an offset.
fn stamp(buf: &mut [u8], off: u64, gen: u64) {
    buf[0..8].copy_from_slice(&off.to_le_bytes());
    buf[8..16].copy_from_slice(&gen.to_le_bytes());
}

fn worker(side: Side<'_>, ops: &[u64], t: usize, threads: usize, kind: Kind, gen: u64) -> u64 {
    let mut buf = vec![0xA5u8; IO];
    let mut sum = 0u64;
    for &off in ops.iter().skip(t).step_by(threads) {
        match kind {
            Kind::Write => {
                stamp(&mut buf, off, gen);
                side.write(off, &buf);
            }
            Kind::Read => {
                side.read(off, &mut buf);
                sum = sum.wrapping_add(u64::from(buf[0]));
            }
        }
    }
    sum
}

/// Run `ops` on one side with `threads` threads; (wall time, process CPU time).
fn run(side: Side<'_>, ops: &[u64], threads: usize, kind: Kind, gen: u64) -> (Duration, Duration) {
    let cpu0 = cpu_self();
    let start = Instant::now();
    if threads == 1 {
        std::hint::black_box(worker(side, ops, 0, 1, kind, gen));
    } else {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|t| s.spawn(move || worker(side, ops, t, threads, kind, gen)))
                .collect();
            for h in hs {
                std::hint::black_box(h.join().unwrap_or(0));
            }
        });
    }
    let wall = start.elapsed();
    (wall, cpu_self().saturating_sub(cpu0))
}

struct PhaseResult {
    ops: usize,
    plain: Duration,
    thin: Duration,
    plain_cpu: Duration,
    thin_cpu: Duration,
    slice_ratios: Vec<f64>,
}

impl PhaseResult {
    /// Thin throughput / plain throughput (wall clock).
    fn ratio(&self) -> f64 {
        self.plain.as_secs_f64() / self.thin.as_secs_f64()
    }

    /// Plain CPU time / thin CPU time: the ratio with other processes' load removed.
    fn cpu_ratio(&self) -> f64 {
        self.plain_cpu.as_secs_f64() / self.thin_cpu.as_secs_f64()
    }
}

/// Run a phase in alternating slices.
fn phase(
    plain: Side<'_>,
    thin: Side<'_>,
    offsets: &[u64],
    slices: usize,
    threads: usize,
    kind: Kind,
    gen: u64,
) -> PhaseResult {
    let chunk = offsets.len().div_ceil(slices.max(1)).max(1);
    let mut r = PhaseResult {
        ops: offsets.len(),
        plain: Duration::ZERO,
        thin: Duration::ZERO,
        plain_cpu: Duration::ZERO,
        thin_cpu: Duration::ZERO,
        slice_ratios: Vec::new(),
    };
    for (i, sl) in offsets.chunks(chunk).enumerate() {
        let ((tp, cp), (tt, ct)) = if i % 2 == 0 {
            let p = run(plain, sl, threads, kind, gen);
            (p, run(thin, sl, threads, kind, gen))
        } else {
            let t = run(thin, sl, threads, kind, gen);
            (run(plain, sl, threads, kind, gen), t)
        };
        r.plain += tp;
        r.thin += tt;
        r.plain_cpu += cp;
        r.thin_cpu += ct;
        r.slice_ratios.push(tp.as_secs_f64() / tt.as_secs_f64());
    }
    r
}

/// Write back and drop every cached page of these files, so that the next writes
/// build their page cache from scratch.
fn drop_caches(paths: &[&Path]) {
    for p in paths {
        drop_file_cache(p).unwrap_or_else(|e| fail(&format!("{}: {e}", p.display())));
    }
}

/// Sequential writes of `chunk` bytes over the whole device / file.
fn fill(side: Side<'_>, size: u64, chunk: usize) -> Duration {
    let mut buf = vec![0x5Au8; chunk];
    let (_, t) = time(|| {
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            stamp(&mut buf, off, 1);
            side.write(off, &buf[..n]);
            off += n as u64;
        }
    });
    t
}

/// Compare the thin device with the plain file; returns the first differing offset.
fn compare(plain: Side<'_>, thin: Side<'_>, size: u64) -> Option<u64> {
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(a.len() as u64) as usize;
        plain.read(off, &mut a[..n]);
        thin.read(off, &mut b[..n]);
        if a[..n] != b[..n] {
            let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
            return Some(off + i as u64);
        }
        off += n as u64;
    }
    None
}

fn create_plain(path: &Path, size: u64) -> File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
    f.set_len(size)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
    f
}

/// A data device that stores nothing: reads leave the buffer as it is, writes are
/// dropped. A pool on it measures the engine's own cost per I/O (locks, mapping
/// lookups, bookkeeping) without any data copy or system call.
#[derive(Debug)]
struct NullData(u64);

impl Storage for NullData {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0)
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn grow(&self, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// Engine cost per 4 KiB op on a provisioned device over [`NullData`] (metadata in
/// memory), single-threaded: (write ns, read ns, first-write ns).
fn engine_overhead(size: u64, ops: u64, seed: u64) -> (f64, f64, f64) {
    let meta = Arc::new(MemStorage::new(default_metadata_size(
        size,
        DataBlockSize::DEFAULT,
    )));
    let pool = Pool::format_on(
        meta,
        Arc::new(NullData(size)),
        DataBlockSize::DEFAULT,
        Duration::ZERO,
        None,
    )
    .unwrap_or_else(|e| fail(&e.to_string()));
    pool.create_thin(ThinId(0))
        .unwrap_or_else(|e| fail(&e.to_string()));
    let side = Side::Thin(&pool, ThinId(0));
    let first = first_write_offsets(size, seed);
    let (_, tf) = time(|| worker(side, &first, 0, 1, Kind::Write, 0));
    pool.commit().unwrap_or_else(|e| fail(&e.to_string()));
    let offs = random_offsets(size, ops, seed + 1);
    let (_, tw) = time(|| worker(side, &offs, 0, 1, Kind::Write, 1));
    let (_, tr) = time(|| worker(side, &offs, 0, 1, Kind::Read, 0));
    let ns = |t: Duration, n: usize| t.as_nanos() as f64 / n as f64;
    (ns(tw, offs.len()), ns(tr, offs.len()), ns(tf, first.len()))
}

fn kiops(ops: usize, d: Duration) -> String {
    format!("{:.1}", ops as f64 / d.as_secs_f64() / 1e3)
}

struct Row {
    name: &'static str,
    threads: usize,
    r: PhaseResult,
    goal: Option<f64>,
}

fn fail_on<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| fail(&e.to_string()))
}

fn main() {
    let args = Args::parse(&["engine-only"]);
    let ops = args.u64_or("ops", 200_000);
    let size = args.u64_or("size-mib", 1024) << 20;
    if args.has("engine-only") {
        // For profiling (perf / callgrind): only the null-data-device run.
        let (w, r, f) = engine_overhead(size, ops, args.u64_or("seed", 42));
        println!("engine alone per op: random-write {w:.0} ns, random-read {r:.0} ns, first-write {f:.0} ns");
        return;
    }
    let slices = args.u64_or("slices", 20) as usize;
    let threads_list = args.list_or("threads", &[1, 2]);
    let seed = args.u64_or("seed", 42);
    let fill_chunk = (args.u64_or("fill-kib", 64) << 10) as usize;
    if fill_chunk < IO || !fill_chunk.is_multiple_of(IO) {
        fail("--fill-kib must be a multiple of 4");
    }
    if size < BLOCK || !size.is_multiple_of(BLOCK) {
        fail("--size-mib must give whole 64 KiB blocks");
    }
    if threads_list.is_empty() || threads_list.contains(&0) {
        fail("--threads needs a list of thread counts >= 1");
    }
    let tmp = work_dir(&args);
    let dir = tmp.path();
    let mut rep = Report::start("engine-io", &args, dir);
    rep.note(&format!(
        "device size {} MiB (64 KiB blocks: {}), {} random ops per phase, {} slices, \
         threads {:?}, buffered I/O on both sides, pool commit interval 0 (explicit commits only); \
         thin reads {}",
        size >> 20,
        size / BLOCK,
        human_count(ops),
        slices,
        threads_list,
        thin_read_method()
    ));

    let devs = threads_list.len() as u64;
    let cfg = PoolConfig {
        data_block_size: DataBlockSize::DEFAULT,
        data_size: devs * size + 16 * BLOCK,
        metadata_size: None,
        commit_interval: Duration::ZERO,
    };
    let pool = fail_on(Pool::create(&dir.join("pool"), &cfg));
    for d in 0..devs {
        fail_on(pool.create_thin(ThinId(d)));
    }
    fail_on(pool.commit());
    let files: Vec<File> = (0..devs)
        .map(|d| create_plain(&dir.join(format!("plain{d}.img")), size))
        .collect();
    let mut results: Vec<Row> = Vec::new();

    // First writes: a fresh device / sparse file per thread count.
    let mut sync_rows: Vec<Vec<String>> = Vec::new();
    for (i, &threads) in threads_list.iter().enumerate() {
        let plain = Side::Plain(&files[i]);
        let thin = Side::Thin(&pool, ThinId(i as u64));
        let offs = first_write_offsets(size, seed + 100 + i as u64);
        let r = phase(plain, thin, &offs, slices, threads as usize, Kind::Write, 0);
        let (res, tc) = time(|| pool.commit());
        fail_on(res);
        let (res, ts) = time(|| files[i].sync_data());
        fail_on(res);
        sync_rows.push(vec![
            format!("first-write {threads}T"),
            fmt_dur(r.plain + ts),
            fmt_dur(r.thin + tc),
            fmt_dur(ts),
            fmt_dur(tc),
            format!(
                "{:.2}",
                (r.plain + ts).as_secs_f64() / (r.thin + tc).as_secs_f64()
            ),
        ]);
        results.push(Row {
            name: "first-write (provisioning)",
            threads: threads as usize,
            r,
            goal: None,
        });
    }

    // Fill device / file 0 completely, then random I/O on provisioned blocks.
    let plain = Side::Plain(&files[0]);
    let thin = Side::Thin(&pool, ThinId(0));
    // Same page-cache history for both: drop what the first writes cached (the thin
    // data file would keep the 64 KiB folios of its provisioning writes, the plain
    // file 4 KiB ones), then fill both with the same write size, which decides the
    // folio size the kernel uses (ext4's buffered 4 KiB write costs more in a larger
    // folio; see docs/benchmarks.md).
    let data_path = dir.join("pool").join(thinvol_engine::DATA_FILE);
    let p0 = dir.join("plain0.img");
    drop_caches(&[&p0, &data_path]);
    let tp = fill(plain, size, fill_chunk);
    let tt = fill(thin, size, fill_chunk);
    let (res, tc) = time(|| pool.commit());
    fail_on(res);
    let (res, ts) = time(|| files[0].sync_data());
    fail_on(res);
    sync_rows.push(vec![
        format!("sequential {} KiB fill (provisioned)", fill_chunk >> 10),
        fmt_dur(tp + ts),
        fmt_dur(tt + tc),
        fmt_dur(ts),
        fmt_dur(tc),
        format!("{:.2}", (tp + ts).as_secs_f64() / (tt + tc).as_secs_f64()),
    ]);
    for &threads in &threads_list {
        let offs = random_offsets(size, ops, seed + 200 + threads);
        let r = phase(
            plain,
            thin,
            &offs,
            slices,
            threads as usize,
            Kind::Write,
            2 + threads,
        );
        results.push(Row {
            name: "random-write (provisioned)",
            threads: threads as usize,
            r,
            goal: Some(0.7),
        });
    }
    // The write phases leave most pages of both files dirty (the system's dirty level
    // sat at the background-writeback threshold, ~2.2 GiB, through the read phases):
    // write them back first, untimed, so that the read phases time reads from a clean,
    // warm page cache on both sides rather than the flusher threads' writeback of
    // whichever file they pick, on a 2-CPU machine.
    fail_on(pool.commit());
    fail_on(files[0].sync_data());
    for &threads in &threads_list {
        let offs = random_offsets(size, ops, seed + 300 + threads);
        let r = phase(plain, thin, &offs, slices, threads as usize, Kind::Read, 0);
        results.push(Row {
            name: "random-read",
            threads: threads as usize,
            r,
            goal: Some(0.9),
        });
    }

    // Diagnostic: the same random I/O straight on the data file at the mapped offsets
    // (engine bypassed) against the plain file, single-threaded.
    let map: Vec<u64> = {
        let mut m = vec![0u64; (size / BLOCK) as usize];
        for (vb, db) in fail_on(pool.mappings(ThinId(0))) {
            m[vb.0 as usize] = db.0;
        }
        m
    };
    let data_file = fail_on(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path),
    );
    let direct = Side::Direct(&data_file, &map);
    let offs = random_offsets(size, ops, seed + 500);
    let r = phase(plain, direct, &offs, slices, 1, Kind::Write, 9);
    results.push(Row {
        name: "diagnostic: random-write on the data file directly",
        threads: 1,
        r,
        goal: None,
    });
    let offs = random_offsets(size, ops, seed + 600);
    let r = phase(plain, direct, &offs, slices, 1, Kind::Read, 0);
    results.push(Row {
        name: "diagnostic: random-read on the data file directly",
        threads: 1,
        r,
        goal: None,
    });
    // Which part of that is the file and which the translation: the data file read at
    // the plain file's own offsets (its first GiB, device 0's blocks, all cached), and
    // the plain file read at its own offsets after the same table lookup.
    let offs = random_offsets(size, ops, seed + 700);
    let r = phase(
        plain,
        Side::Plain(&data_file),
        &offs,
        slices,
        1,
        Kind::Read,
        0,
    );
    results.push(Row {
        name: "diagnostic: random-read on the data file at the plain file's offsets (no table)",
        threads: 1,
        r,
        goal: None,
    });
    let offs = random_offsets(size, ops, seed + 800);
    let r = phase(
        plain,
        Side::Loaded(&files[0], &map),
        &offs,
        slices,
        1,
        Kind::Read,
        0,
    );
    results.push(Row {
        name: "diagnostic: random-read on the plain file after a block-table load",
        threads: 1,
        r,
        goal: None,
    });
    // Like for like: the plain file through a mapping, against the thin device.
    let plain_map = FileMap::new(&files[0], size);
    let offs = random_offsets(size, ops, seed + 900);
    let r = phase(
        Side::Mapped(plain_map.bytes()),
        thin,
        &offs,
        slices,
        1,
        Kind::Read,
        0,
    );
    results.push(Row {
        name: "diagnostic: random-read, thin device against the plain file through a mapping (memcpy)",
        threads: 1,
        r,
        goal: None,
    });
    drop(plain_map);

    // The same bytes must be on both sides, or the comparison is void.
    let mut verified = Vec::new();
    for (i, f) in files.iter().enumerate() {
        match compare(Side::Plain(f), Side::Thin(&pool, ThinId(i as u64)), size) {
            None => verified.push(format!("device {i}: identical")),
            Some(off) => fail(&format!(
                "device {i} differs from its plain file at byte {off}"
            )),
        }
    }
    fail_on(pool.close());

    let mut rows: Vec<Vec<String>> = Vec::new();
    for Row {
        name,
        threads,
        r,
        goal,
    } in &results
    {
        let ratio = r.ratio();
        let sr = &r.slice_ratios;
        let min = sr.iter().copied().fold(f64::INFINITY, f64::min);
        let max = sr.iter().copied().fold(0.0, f64::max);
        let (g, res) = match goal {
            Some(g) => (format!(">= {g}x"), verdict(ratio >= *g).to_string()),
            None => ("none".to_string(), "-".to_string()),
        };
        rows.push(vec![
            name.to_string(),
            threads.to_string(),
            human_count(r.ops as u64),
            fmt_dur(r.plain),
            fmt_dur(r.thin),
            kiops(r.ops, r.plain),
            kiops(r.ops, r.thin),
            format!("{ratio:.2}"),
            format!("{min:.2} / {:.2} / {max:.2}", median_f64(sr)),
            format!("{:.2}", r.cpu_ratio()),
            g.clone(),
            res.clone(),
        ]);
        rep.summary(format!(
            "{name} {threads}T ratio {ratio:.2} (plain {} kIOPS, thin {} kIOPS; \
             CPU-time ratio {:.2}) goal {g} {res}",
            kiops(r.ops, r.plain),
            kiops(r.ops, r.thin),
            r.cpu_ratio()
        ));
    }

    // Where the thin side's extra time goes: the engine alone, on a null data device,
    // next to the plain side's single-threaded time per op in this run.
    let (ow, or, of) = engine_overhead(size, ops, seed + 400);
    let mut ovh_rows = Vec::new();
    for (name, ns) in [
        ("random-write (provisioned)", ow),
        ("random-read", or),
        ("first-write (provisioning)", of),
    ] {
        let Some(row) = results.iter().find(|r| r.name == name && r.threads == 1) else {
            continue;
        };
        let plain_ns = row.r.plain.as_nanos() as f64 / row.r.ops as f64;
        let thin_ns = row.r.thin.as_nanos() as f64 / row.r.ops as f64;
        ovh_rows.push(vec![
            name.to_string(),
            format!("{ns:.0} ns"),
            format!("{plain_ns:.0} ns"),
            format!("{thin_ns:.0} ns"),
            format!("{:.2}", plain_ns / (plain_ns + ns)),
        ]);
    }

    rep.table(
        "4 KiB I/O: thin device vs plain file",
        &[
            "phase",
            "threads",
            "ops",
            "plain time",
            "thin time",
            "plain kIOPS",
            "thin kIOPS",
            "ratio thin/plain",
            "slice ratios min / median / max",
            "CPU-time ratio",
            "goal",
            "result",
        ],
        &rows,
    );
    rep.table(
        "Including durability (commit vs fdatasync, timed after each phase)",
        &[
            "phase",
            "plain incl. fdatasync",
            "thin incl. commit",
            "fdatasync",
            "commit",
            "ratio thin/plain",
        ],
        &sync_rows,
    );
    rep.table(
        "Engine cost per op (pool on a null data device, metadata in memory, 1 thread)",
        &[
            "phase",
            "engine alone per op",
            "plain per op (this run)",
            "thin per op (this run)",
            "ratio bound plain/(plain+engine)",
        ],
        &ovh_rows,
    );
    rep.note(&format!(
        "page cache: before the random phases both files were written back and dropped \
         from the page cache (POSIX_FADV_DONTNEED), then filled sequentially with {} KiB \
         writes (this decides the kernel's folio size; --fill-kib)",
        fill_chunk >> 10
    ));
    rep.note(&format!(
        "content check after the run: {} (every byte of each thin device equals its plain file)",
        verified.join(", ")
    ));
    rep.finish();
}
