//! Shared support for the thinvol benchmarks (`bench/src/bin/*.rs`).
//!
//! Every benchmark measures thinvol against a *peer* in the same run (a plain file, the
//! real `thin_delta`, or the same operation at a small size) and reports the ratio, so
//! that the noise of a shared machine cancels out as far as possible. Nothing here
//! asserts on timings.
//!
//! * [`Args`]: a tiny `--key value` / `--flag` parser (no dependencies).
//! * [`facts`]: machine facts for the report (CPU, cores, memory, kernel, filesystem).
//! * [`Stats`]: median / min / max of a set of durations.
//! * [`fixture`]: pools whose origin device maps N blocks, built with `thin_restore`.
//! * [`Report`]: markdown tables plus `SUMMARY` lines that `bench/run-all.sh` collects.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use thinvol_testkit::SplitMix64;

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

/// Command-line options: `--key value`, `--key=value` and bare `--flag`s.
#[derive(Debug, Default, Clone)]
pub struct Args {
    map: HashMap<String, String>,
    /// The command line as given (program name and arguments), for the report.
    pub command_line: String,
    /// Program name (file name of argv[0]).
    pub prog: String,
    /// The arguments after the program name.
    pub rest: Vec<String>,
}

impl Args {
    /// Parse `std::env::args()`. `flags` lists the options that take no value.
    pub fn parse(flags: &[&str]) -> Args {
        let v: Vec<String> = std::env::args().collect();
        Self::parse_from(&v, flags)
    }

    /// Parse an argument vector (the first element is the program name).
    pub fn parse_from(argv: &[String], flags: &[&str]) -> Args {
        let mut map = HashMap::new();
        let mut it = argv.iter().skip(1).peekable();
        while let Some(a) = it.next() {
            let Some(key) = a.strip_prefix("--") else {
                eprintln!("ignoring stray argument {a:?}");
                continue;
            };
            if let Some((k, v)) = key.split_once('=') {
                map.insert(k.to_string(), v.to_string());
            } else if flags.contains(&key) {
                map.insert(key.to_string(), "true".to_string());
            } else if let Some(v) = it.next() {
                map.insert(key.to_string(), v.clone());
            } else {
                eprintln!("option --{key} needs a value");
                std::process::exit(2);
            }
        }
        let prog = argv
            .first()
            .map(|p| {
                Path::new(p)
                    .file_name()
                    .map_or(p.clone(), |f| f.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
        let rest: Vec<String> = argv.iter().skip(1).cloned().collect();
        let mut command_line = prog.clone();
        for a in &rest {
            command_line.push(' ');
            command_line.push_str(a);
        }
        Args {
            map,
            command_line,
            prog,
            rest,
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn str_or(&self, key: &str, default: &str) -> String {
        self.map
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    /// An unsigned number; accepts `_` separators and k/K, m/M, g/G suffixes (decimal:
    /// `1M` = 1 000 000; `1Mi` = 1 048 576).
    pub fn u64_or(&self, key: &str, default: u64) -> u64 {
        match self.map.get(key) {
            None => default,
            Some(s) => parse_count(s).unwrap_or_else(|| {
                eprintln!("--{key}: cannot parse {s:?} as a number");
                std::process::exit(2);
            }),
        }
    }

    /// A comma-separated list of numbers (same syntax as [`Args::u64_or`]).
    pub fn list_or(&self, key: &str, default: &[u64]) -> Vec<u64> {
        match self.map.get(key) {
            None => default.to_vec(),
            Some(s) => s
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| {
                    parse_count(p.trim()).unwrap_or_else(|| {
                        eprintln!("--{key}: cannot parse {p:?} as a number");
                        std::process::exit(2);
                    })
                })
                .collect(),
        }
    }
}

/// Parse `200000`, `200_000`, `200k`, `1M`, `4M`, `1Gi`, `64Ki`.
pub fn parse_count(s: &str) -> Option<u64> {
    let s: String = s.chars().filter(|&c| c != '_').collect();
    let (num, mult) = if let Some(n) = s.strip_suffix("Ki") {
        (n, 1u64 << 10)
    } else if let Some(n) = s.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("Gi") {
        (n, 1 << 30)
    } else if let Some(n) = s.strip_suffix(['k', 'K']) {
        (n, 1_000)
    } else if let Some(n) = s.strip_suffix(['m', 'M']) {
        (n, 1_000_000)
    } else if let Some(n) = s.strip_suffix(['g', 'G']) {
        (n, 1_000_000_000)
    } else {
        (s.as_str(), 1)
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// `1000` → `1K`, `1000000` → `1M`, otherwise the number with separators.
pub fn human_count(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}K", n / 1_000)
    } else {
        n.to_string()
    }
}

// ---------------------------------------------------------------------------
// Machine facts
// ---------------------------------------------------------------------------

/// Facts about the machine and the benchmark directory, one `key: value` per line.
pub fn facts(dir: &Path) -> String {
    let mut s = String::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_string(), |(_, v)| v.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map_or("unknown".to_string(), |kib| {
            format!("{:.1} GiB", kib as f64 / (1u64 << 20) as f64)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".to_string(), |k| k.trim().to_string());
    let load = std::fs::read_to_string("/proc/loadavg").map_or("unknown".to_string(), |l| {
        l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    });
    let tools = thinvol_testkit::tools_version().unwrap_or_else(|_| "not found".into());
    let _ = writeln!(
        s,
        "date: {}",
        command_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
    );
    let _ = writeln!(s, "cpu: {model}");
    let _ = writeln!(s, "cores: {cores}");
    let _ = writeln!(s, "memory: {mem}");
    let _ = writeln!(s, "kernel: {kernel}");
    let _ = writeln!(s, "load average at start: {load}");
    let _ = writeln!(s, "bench dir: {} ({})", dir.display(), filesystem_of(dir));
    let _ = writeln!(s, "thin-provisioning-tools: {tools}");
    let _ = writeln!(s, "rustc: {}", command_output("rustc", &["-V"]));
    s
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".to_string(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        })
}

/// Filesystem type and device of the mount holding `dir` (longest mount-point prefix
/// in /proc/self/mounts).
pub fn filesystem_of(dir: &Path) -> String {
    let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = Path::new(f[1]);
        if path.starts_with(mp) {
            let len = f[1].len();
            if best.as_ref().is_none_or(|(b, _)| len >= *b) {
                best = Some((len, format!("{} on {} at {}", f[2], f[0], f[1])));
            }
        }
    }
    best.map_or("unknown filesystem".to_string(), |(_, s)| s)
}

/// The directory benchmarks work in: `--dir`, else `$THINVOL_BENCH_DIR`, else the
/// system temporary directory. A fresh subdirectory is created (and removed on drop).
pub fn work_dir(args: &Args) -> tempfile::TempDir {
    let base = if args.has("dir") {
        PathBuf::from(args.str_or("dir", "."))
    } else if let Some(d) = std::env::var_os("THINVOL_BENCH_DIR") {
        PathBuf::from(d)
    } else {
        std::env::temp_dir()
    };
    std::fs::create_dir_all(&base).unwrap_or_else(|e| fail(&format!("{}: {e}", base.display())));
    tempfile::Builder::new()
        .prefix("thinvol-bench-")
        .tempdir_in(&base)
        .unwrap_or_else(|e| fail(&format!("temp dir in {}: {e}", base.display())))
}

/// Print an error and exit 1.
pub fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// A sorted sample of durations.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    sorted: Vec<Duration>,
}

impl Stats {
    pub fn new(mut v: Vec<Duration>) -> Stats {
        v.sort_unstable();
        Stats { sorted: v }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    pub fn median(&self) -> Duration {
        let n = self.sorted.len();
        match n {
            0 => Duration::ZERO,
            _ if n % 2 == 1 => self.sorted[n / 2],
            _ => (self.sorted[n / 2 - 1] + self.sorted[n / 2]) / 2,
        }
    }

    pub fn min(&self) -> Duration {
        self.sorted.first().copied().unwrap_or_default()
    }

    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }

    pub fn total(&self) -> Duration {
        self.sorted.iter().sum()
    }
}

/// User + system CPU time of this process (all threads, joined ones included).
pub fn cpu_self() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// User + system CPU time of every waited-for child process.
pub fn cpu_children() -> Duration {
    rusage(libc::RUSAGE_CHILDREN)
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the zeroed struct we pass and has no other effect.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| {
        Duration::new(
            t.tv_sec.max(0) as u64,
            (t.tv_usec.max(0) as u32).min(999_999) * 1000,
        )
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Median of plain numbers (ratios).
pub fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Time one call.
pub fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// A duration in the most readable unit: `12.3 µs`, `4.56 ms`, `1.23 s`.
pub fn fmt_dur(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// `ok` / `MISSED` for a goal.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

// ---------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------

/// Collects a benchmark's output: a header with machine facts, markdown tables and
/// one-line summaries (`SUMMARY <bench>: ...`) that `run-all.sh` greps.
pub struct Report {
    name: String,
    summaries: Vec<String>,
}

impl Report {
    /// Print the header (benchmark name, command line, machine facts).
    pub fn start(name: &str, args: &Args, dir: &Path) -> Report {
        println!("# thinvol-bench {name}");
        println!();
        let mut cmd = format!("cargo run --release -p thinvol-bench --bin {}", args.prog);
        if !args.rest.is_empty() {
            cmd.push_str(" -- ");
            cmd.push_str(&args.rest.join(" "));
        }
        println!("command: {cmd}");
        for l in facts(dir).lines() {
            println!("{l}");
        }
        println!();
        Report {
            name: name.to_string(),
            summaries: Vec::new(),
        }
    }

    /// Print a markdown table.
    pub fn table(&self, title: &str, header: &[&str], rows: &[Vec<String>]) {
        println!("## {title}");
        println!();
        println!("| {} |", header.join(" | "));
        println!(
            "|{}|",
            header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        );
        for r in rows {
            println!("| {} |", r.join(" | "));
        }
        println!();
    }

    /// A free-form note under the tables.
    pub fn note(&self, text: &str) {
        println!("{text}");
        println!();
    }

    /// Record a summary line (printed at the end by [`Report::finish`]).
    pub fn summary(&mut self, text: String) {
        self.summaries.push(text);
    }

    pub fn finish(self) {
        for s in &self.summaries {
            println!("SUMMARY {}: {s}", self.name);
        }
    }
}

/// Flush the page cache's copy of a file (write back, then drop clean pages). Makes
/// the next reads come from the disk (or the host's cache under a VM): "cold-ish".
pub fn drop_file_cache(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    f.sync_all()?;
    // SAFETY: a valid open fd; POSIX_FADV_DONTNEED only affects this file's cache.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// A read-only shared mapping of a whole file: the like-for-like peer of the engine's
/// mapped reads (engine-io), and a way to ask which pages are cached (cold-read).
pub struct FileMap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl FileMap {
    /// Maps the first `len` bytes of `f` (exits the benchmark if that fails).
    pub fn new(f: &std::fs::File, len: u64) -> FileMap {
        let len = len as usize;
        // SAFETY: a fresh read-only shared mapping of an open file, unmapped in
        // `drop`; callers do not truncate the file while it lives.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(f),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            fail(&format!("mmap: {}", std::io::Error::last_os_error()));
        }
        FileMap { ptr, len }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` mapped, readable bytes that live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// Pages of the mapped range that are in the page cache (`mincore`).
    pub fn resident_pages(&self) -> u64 {
        let mut v = vec![0u8; self.len.div_ceil(4096)];
        // SAFETY: `v` has one byte per page of the mapped range.
        if unsafe { libc::mincore(self.ptr, self.len, v.as_mut_ptr()) } != 0 {
            fail(&format!("mincore: {}", std::io::Error::last_os_error()));
        }
        v.iter().filter(|b| *b & 1 == 1).count() as u64
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: exactly the range mapped in `new`.
        unsafe { libc::munmap(self.ptr, self.len.max(1)) };
    }
}

/// How the engine reads small blocks in this process, for the report: from a mapping
/// of the data file unless `THINVOL_MAPPED_READS=0` (docs/design.md §4.1).
pub fn thin_read_method() -> &'static str {
    if std::env::var_os("THINVOL_MAPPED_READS").is_some_and(|v| v == "0") {
        "with pread (THINVOL_MAPPED_READS=0)"
    } else {
        "copied from a mapping of the data file (x86-64 Linux; THINVOL_MAPPED_READS=0 for pread)"
    }
}

// ---------------------------------------------------------------------------
// Fixtures built with thin_restore
// ---------------------------------------------------------------------------

pub mod fixture {
    use std::path::Path;
    use std::time::Duration;

    use thinvol_engine::{DATA_FILE, METADATA_FILE};
    use thinvol_testkit::{Device, Mapping, Metadata, Superblock};

    /// 64 KiB data blocks (128 sectors), the dm-thin default.
    pub const BLOCK_SECTORS: u32 = 128;
    pub const BLOCK_BYTES: u64 = 64 << 10;

    /// The model of a pool whose device 0 maps virtual blocks `0..mapped` to data
    /// blocks `0..mapped` (one range mapping) in a data device of `nr_data_blocks`.
    pub fn identity_model(mapped: u64, nr_data_blocks: u64) -> Metadata {
        let mappings = if mapped == 0 {
            Vec::new()
        } else {
            vec![Mapping {
                origin_begin: 0,
                data_begin: 0,
                length: mapped,
                time: 0,
            }]
        };
        Metadata {
            superblock: Superblock {
                uuid: String::new(),
                time: 0,
                transaction: 1,
                data_block_size: BLOCK_SECTORS,
                nr_data_blocks,
                flags: None,
                version: None,
            },
            devices: vec![Device {
                dev_id: 0,
                mapped_blocks: mapped,
                transaction: 0,
                creation_time: 0,
                snap_time: 0,
                mappings,
            }],
        }
    }

    /// Build `dir/metadata` with `thin_restore` and a sparse `dir/data` of
    /// `nr_data_blocks` 64 KiB blocks. The metadata file gets room for the restored
    /// trees plus `extra_meta_blocks` for later changes. Returns the restore time.
    pub fn restore_identity(
        dir: &Path,
        mapped: u64,
        nr_data_blocks: u64,
        extra_meta_blocks: u64,
    ) -> Duration {
        assert!(
            nr_data_blocks > mapped,
            "the data device must exceed the mapped blocks"
        );
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| super::fail(&format!("{}: {e}", dir.display())));
        let model = identity_model(mapped, nr_data_blocks);
        let size = thinvol_testkit::suggested_meta_size_bytes(&model) + extra_meta_blocks * 4096;
        let meta = dir.join(METADATA_FILE);
        let (r, t) = super::time(|| thinvol_testkit::thin_restore(&model, &meta, size));
        if let Err(e) = r {
            super::fail(&format!("thin_restore of {mapped} mappings: {e}"));
        }
        let data = std::fs::File::create(dir.join(DATA_FILE))
            .and_then(|f| f.set_len(nr_data_blocks * BLOCK_BYTES));
        if let Err(e) = data {
            super::fail(&format!("creating the data file: {e}"));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse() {
        assert_eq!(parse_count("200000"), Some(200_000));
        assert_eq!(parse_count("200_000"), Some(200_000));
        assert_eq!(parse_count("200k"), Some(200_000));
        assert_eq!(parse_count("1M"), Some(1_000_000));
        assert_eq!(parse_count("1Gi"), Some(1 << 30));
        assert_eq!(parse_count("64Ki"), Some(65_536));
        assert_eq!(parse_count("x"), None);
        assert_eq!(human_count(1_000_000), "1M");
        assert_eq!(human_count(100_000), "100K");
        assert_eq!(human_count(1234), "1234");
    }

    #[test]
    fn args_parse() {
        let v: Vec<String> = ["prog", "--ops", "10k", "--quick", "--mapped=1K,1M"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let a = Args::parse_from(&v, &["quick"]);
        assert_eq!(a.u64_or("ops", 1), 10_000);
        assert!(a.has("quick"));
        assert_eq!(a.list_or("mapped", &[]), vec![1_000, 1_000_000]);
        assert_eq!(a.u64_or("missing", 7), 7);
        assert_eq!(a.command_line, "prog --ops 10k --quick --mapped=1K,1M");
    }

    #[test]
    fn stats() {
        let s = Stats::new(vec![
            Duration::from_millis(3),
            Duration::from_millis(1),
            Duration::from_millis(2),
        ]);
        assert_eq!(s.median(), Duration::from_millis(2));
        assert_eq!(s.max(), Duration::from_millis(3));
        assert_eq!(s.min(), Duration::from_millis(1));
        assert_eq!(median_f64(&[1.0, 4.0, 2.0, 3.0]), 2.5);
    }
}

/// The 4 KiB workloads of `engine-io` and `read-diag` (both files and thin devices
/// get the same offsets from the same seed).
pub mod offsets {
    use super::SplitMix64;

    fn shuffle(v: &mut [u64], rng: &mut SplitMix64) {
        for i in (1..v.len()).rev() {
            v.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }

    /// One `io`-aligned offset inside every `block`, blocks in random order.
    pub fn first_write(size: u64, block: u64, io: u64, seed: u64) -> Vec<u64> {
        let mut rng = SplitMix64::new(seed);
        let mut blocks: Vec<u64> = (0..size / block).collect();
        shuffle(&mut blocks, &mut rng);
        blocks
            .into_iter()
            .map(|b| b * block + rng.below(block / io) * io)
            .collect()
    }

    /// `n` random `io`-aligned offsets below `size`.
    pub fn random(size: u64, io: u64, n: u64, seed: u64) -> Vec<u64> {
        let mut rng = SplitMix64::new(seed);
        (0..n).map(|_| rng.below(size / io) * io).collect()
    }
}
