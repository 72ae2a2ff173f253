//! Diagnostic for the random-read row of engine-io: where does the thin side's time
//! go? Builds the same pool and plain file as engine-io (first writes in random block
//! order, drop both from the page cache, 64 KiB sequential fill, random 4 KiB writes,
//! write-back), plus extra plain files that each reproduce one property of the pool's
//! data file, then times 4 KiB preads on every variant in rotated rounds (thread CPU
//! time per read, same offsets for every variant within a round).
//!
//! `cargo run --release -p thinvol-bench --bin read-diag -- --rounds 40`

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use thinvol_bench::{drop_file_cache, fail, work_dir, Args};
use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::{Pool, PoolConfig};

const IO: usize = 4096;
const BLOCK: u64 = 64 << 10;

fn first_write_offsets(size: u64, seed: u64) -> Vec<u64> {
    thinvol_bench::offsets::first_write(size, BLOCK, IO as u64, seed)
}

fn random_offsets(size: u64, n: u64, seed: u64) -> Vec<u64> {
    thinvol_bench::offsets::random(size, IO as u64, n, seed)
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| fail(&e.to_string()))
}

fn create(path: &Path, size: u64) -> File {
    let f = ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path));
    ok(f.set_len(size));
    f
}

/// Histogram of folio sizes (in pages) over `[0, len)` of `f`'s page cache: map the
/// file, touch every page (page-cache hits), read the PFNs from /proc/self/pagemap and
/// the compound flags from /proc/kpageflags. Needs root; returns "" otherwise.
fn folio_histogram(f: &File, len: u64) -> String {
    use std::os::fd::AsRawFd;
    let pages = (len / 4096) as usize;
    // SAFETY: read-only shared mapping of an open file; unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return "mmap failed".into();
    }
    let mut sum = 0u64;
    for i in 0..pages {
        // SAFETY: inside the mapping.
        sum = sum.wrapping_add(u64::from(unsafe {
            std::ptr::read_volatile((p as *const u8).add(i * 4096))
        }));
    }
    std::hint::black_box(sum);
    let out = (|| -> std::io::Result<String> {
        let pm = File::open("/proc/self/pagemap")?;
        let kf = File::open("/proc/kpageflags")?;
        let mut raw = vec![0u8; pages * 8];
        pm.read_exact_at(&mut raw, (p as u64 / 4096) * 8)?;
        let mut hist = std::collections::BTreeMap::<u64, u64>::new();
        let mut run = 0u64;
        let mut b = [0u8; 8];
        for i in 0..pages {
            let e = u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            let pfn = e & ((1 << 55) - 1);
            if e >> 63 == 0 || pfn == 0 {
                *hist.entry(0).or_default() += 1;
                continue;
            }
            kf.read_exact_at(&mut b, pfn * 8)?;
            let flags = u64::from_le_bytes(b);
            let head = flags & (1 << 15) != 0;
            let tail = flags & (1 << 16) != 0;
            if !tail {
                if run > 0 {
                    *hist.entry(run).or_default() += 1;
                }
                run = if head { 1 } else { 0 };
                if !head {
                    *hist.entry(1).or_default() += 1;
                }
            } else {
                run += 1;
            }
        }
        if run > 0 {
            *hist.entry(run).or_default() += 1;
        }
        Ok(hist
            .iter()
            .map(|(k, v)| format!("{}KiB:{v}", k * 4))
            .collect::<Vec<_>>()
            .join(" "))
    })();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, len as usize) };
    out.unwrap_or_else(|e| format!("pagemap: {e}"))
}

#[derive(Clone, Copy)]
enum V<'a> {
    /// A file read at the same offset.
    File(&'a File),
    /// A file read at the data-file offset of the thin device's mapping.
    Mapped(&'a File, &'a [u64]),
    Thin(&'a Pool),
    /// `File` at mapped offsets, with the map read from `table` at `stride` words per
    /// entry.
    Strided(&'a File, &'a [u64], usize),
    /// `File` at the same offsets, after a dependent load from the table (its value,
    /// always below 2^40, shifted away).
    DummyLoad(&'a File, &'a [u64]),
    /// `File` at mapped offsets, the mapping taken from a table shaped like the pool's
    /// stripes (8 192 lines of 64 bytes: a lock and two mappings), the line's lock
    /// held shared across the pread.
    Locked(&'a File, &'a [LockLine]),
}

/// One line of [`V::Locked`]'s table.
#[repr(align(64))]
struct LockLine {
    lock: std::sync::RwLock<()>,
    map: [u64; 2],
}

/// A zeroed table of `words` u64 in anonymous memory, 2 MiB aligned, on transparent
/// huge pages if `huge`.
fn table(words: usize, huge: bool) -> &'static mut [u64] {
    let len = (words * 8).next_multiple_of(2 << 20);
    // SAFETY: anonymous mapping, never unmapped (leaked for the process).
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len + (2 << 20),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert!(p != libc::MAP_FAILED);
        let a = (p as usize).next_multiple_of(2 << 20) as *mut libc::c_void;
        libc::madvise(
            a,
            len,
            if huge {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            },
        );
        std::slice::from_raw_parts_mut(a as *mut u64, words)
    }
}

fn main() {
    let args = Args::parse(&["folios", "refill", "no-writes"]);
    let size = args.u64_or("size-mib", 1024) << 20;
    let rounds = args.u64_or("rounds", 30);
    let per = args.u64_or("per-round", 20000);
    let seed = args.u64_or("seed", 42);
    let tmp = work_dir(&args);
    let dir = tmp.path();
    let cfg = PoolConfig {
        data_block_size: DataBlockSize::DEFAULT,
        data_size: 2 * size + 16 * BLOCK,
        metadata_size: None,
        commit_interval: Duration::ZERO,
    };
    let pool = ok(Pool::create(&dir.join("pool"), &cfg));
    ok(pool.create_thin(ThinId(0)));
    ok(pool.create_thin(ThinId(1)));
    ok(pool.commit());
    let data_path = dir.join("pool").join(thinvol_engine::DATA_FILE);
    let data_len = ok(std::fs::metadata(&data_path)).len();
    // plain: like engine-io's plain0. big: same, but as long as the data file.
    // scat: 64 KiB fill in the data file's block order (a random permutation).
    // hist: the data file's whole write history replayed at the same offsets.
    let plain = create(&dir.join("plain.img"), size);
    let big = create(&dir.join("big.img"), data_len);
    let scat = create(&dir.join("scat.img"), size);
    let hist = create(&dir.join("hist.img"), data_len);
    let twin = create(&dir.join("twin.img"), size);
    let buf4 = vec![0xA5u8; IO];
    for d in 0..2u64 {
        for off in first_write_offsets(size, seed + 100 + d) {
            ok(pool.write(ThinId(d), off, &buf4));
            if d == 0 {
                ok(plain.write_all_at(&buf4, off));
                ok(big.write_all_at(&buf4, off));
                ok(scat.write_all_at(&buf4, off));
                ok(twin.write_all_at(&buf4, off));
            }
        }
        ok(pool.commit());
    }
    let map: Vec<u64> = {
        let mut m = vec![0u64; (size / BLOCK) as usize];
        for (vb, db) in ok(pool.mappings(ThinId(0))) {
            m[vb.0 as usize] = db.0;
        }
        m
    };
    // hist: first writes at the data-file offsets of both devices, in provisioning order
    // (device 0's 4 KiB writes went to block map[vb] in the order of its first writes).
    for d in 0..2u64 {
        let m: Vec<u64> = {
            let mut m = vec![0u64; (size / BLOCK) as usize];
            for (vb, db) in ok(pool.mappings(ThinId(d))) {
                m[vb.0 as usize] = db.0;
            }
            m
        };
        for off in first_write_offsets(size, seed + 100 + d) {
            ok(hist.write_all_at(&buf4, m[(off / BLOCK) as usize] * BLOCK + off % BLOCK));
        }
    }
    let paths = ["plain.img", "big.img", "scat.img", "hist.img", "twin.img"].map(|n| dir.join(n));
    for p in paths.iter().chain([&data_path]) {
        ok(drop_file_cache(p));
    }
    let mut buf = vec![0x5Au8; BLOCK as usize];
    for vb in 0..size / BLOCK {
        ok(pool.write(ThinId(0), vb * BLOCK, &buf));
        ok(plain.write_all_at(&buf, vb * BLOCK));
        ok(big.write_all_at(&buf, vb * BLOCK));
        ok(twin.write_all_at(&buf, vb * BLOCK));
        ok(hist.write_all_at(&buf, map[vb as usize] * BLOCK));
    }
    // scat: blocks in data-block order, i.e. virtual blocks by increasing data block.
    let mut order: Vec<u64> = (0..size / BLOCK).collect();
    order.sort_by_key(|&vb| map[vb as usize]);
    for &vb in &order {
        ok(scat.write_all_at(&buf, vb * BLOCK));
    }
    let data_file = ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data_path));
    buf.truncate(IO);
    if !args.has("no-writes") {
        for off in random_offsets(size, 200_000, seed + 201) {
            ok(pool.write(ThinId(0), off, &buf));
            ok(plain.write_all_at(&buf, off));
            ok(big.write_all_at(&buf, off));
            ok(scat.write_all_at(&buf, off));
            ok(twin.write_all_at(&buf, off));
            ok(hist.write_all_at(&buf, map[(off / BLOCK) as usize] * BLOCK + off % BLOCK));
        }
    }
    ok(pool.commit());
    for f in [&plain, &big, &scat, &hist, &twin] {
        ok(f.sync_data());
    }
    if args.has("refill") {
        // Same page cache for both: drop and re-read sequentially with 64 KiB preads.
        for p in paths.iter().chain([&data_path]) {
            ok(drop_file_cache(p));
        }
        for f in [&plain, &big, &scat, &hist, &twin, &data_file] {
            let len = size;
            let mut b = vec![0u8; BLOCK as usize];
            let mut o = 0;
            while o < len {
                ok(f.read_exact_at(&mut b, o));
                o += BLOCK;
            }
        }
    }
    let variants: Vec<(&str, V<'_>)> = vec![
        ("plain", V::File(&plain)),
        ("twin (plain's history)", V::File(&twin)),
        ("big (data-file size)", V::File(&big)),
        ("scat (fill in data-block order)", V::File(&scat)),
        ("hist (data file's history)", V::Mapped(&hist, &map)),
        ("data file direct", V::Mapped(&data_file, &map)),
        ("plain at mapped offsets", V::Mapped(&plain, &map)),
        ("hist at plain offsets", V::File(&hist)),
        ("data file at plain offsets", V::File(&data_file)),
        ("Pool::read", V::Thin(&pool)),
    ];
    if args.has("folios") {
        for (name, f, len) in [
            ("plain", &plain, size),
            ("scat", &scat, size),
            ("data", &data_file, size),
            ("hist", &hist, size),
            ("twin", &twin, size),
            ("big", &big, size),
        ] {
            println!("folios {name}: {}", folio_histogram(f, len));
        }
    }
    let t128 = table(map.len(), false);
    let h128 = table(map.len(), true);
    let t512 = table(map.len() * 4, false);
    let h512 = table(map.len() * 4, true);
    for (i, &m) in map.iter().enumerate() {
        t128[i] = m;
        h128[i] = m;
        t512[i * 4] = m;
        h512[i * 4] = m;
    }
    let mut variants = variants;
    variants.push(("mapped: 128K table, 4K pages", V::Strided(&plain, t128, 1)));
    variants.push(("mapped: 128K table, huge page", V::Strided(&plain, h128, 1)));
    variants.push(("mapped: 512K table, 4K pages", V::Strided(&plain, t512, 4)));
    variants.push(("mapped: 512K table, huge page", V::Strided(&plain, h512, 4)));
    variants.push((
        "plain + dependent load, 128K table",
        V::DummyLoad(&plain, t128),
    ));
    let lines: Vec<LockLine> = (0..8192)
        .map(|i| LockLine {
            lock: std::sync::RwLock::new(()),
            map: [map[i], map.get(i + 8192).copied().unwrap_or(0)],
        })
        .collect();
    variants.push((
        "mapped: 512K lock+map lines, locked",
        V::Locked(&plain, &lines),
    ));
    if let Ok(s) = std::fs::read_to_string("/proc/self/smaps_rollup") {
        for l in s.lines().filter(|l| l.starts_with("AnonHugePages")) {
            println!("{l}");
        }
    }
    let n = variants.len();
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut b = vec![0u8; IO];
    for r in 0..rounds {
        let offs = random_offsets(size, per, seed + 1000 + r);
        for k in 0..n {
            let i = (k + r as usize) % n;
            let v = variants[i].1;
            let c0 = thread_cpu();
            for &off in &offs {
                match v {
                    V::File(f) => ok(f.read_exact_at(&mut b, off)),
                    V::Mapped(f, m) => ok(
                        f.read_exact_at(&mut b, m[(off / BLOCK) as usize] * BLOCK + off % BLOCK)
                    ),
                    V::Thin(p) => ok(p.read(ThinId(0), off, &mut b)),
                    V::Strided(f, t, k) => {
                        let i = (off / BLOCK) as usize * k;
                        ok(f.read_exact_at(&mut b, t[i] * BLOCK + off % BLOCK))
                    }
                    V::Locked(f, t) => {
                        let vb = (off / BLOCK) as usize;
                        let line = &t[vb % 8192];
                        let _g = line.lock.read();
                        let m = line.map[vb / 8192];
                        ok(f.read_exact_at(&mut b, m * BLOCK + off % BLOCK))
                    }
                    V::DummyLoad(f, t) => {
                        let x = t[(off / BLOCK) as usize] >> 40;
                        ok(f.read_exact_at(&mut b, off + x))
                    }
                }
                std::hint::black_box(&b);
            }
            let c = thread_cpu() - c0;
            ns[i].push(c.as_nanos() as f64 / per as f64);
        }
    }
    println!("{rounds} rounds x {per} random 4 KiB reads, thread CPU ns per read:");
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = med(&mut ns[0].clone());
    for (i, (name, _)) in variants.iter().enumerate() {
        let mut v = ns[i].clone();
        let m = med(&mut v);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        println!(
            "  {name:34} median {m:7.0}  mean {mean:7.0}  min {:7.0}  ratio plain/this {:.3}",
            v[0],
            base / m
        );
    }
    let st = std::process::Command::new("fincore")
        .arg("-b")
        .args(paths.iter().chain([&data_path]))
        .output();
    if let Ok(o) = st {
        print!("{}", String::from_utf8_lossy(&o.stdout));
    }
    ok(pool.close());
}
