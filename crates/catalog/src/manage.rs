//! Pools by name: create, import (register an existing directory), open with a lock,
//! status with usage thresholds, grow, settings, destroy, and the consistency check of
//! catalog and devices.
//!
//! One process at a time uses a pool: opening takes an `flock` on `DIR/lock`
//! (exclusive to change, shared to read). A second command waits a few seconds for
//! the first, then refuses with the reason.

use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use thinvol_engine::format::{human_bytes, DataBlockSize, ThinId};
use thinvol_engine::{default_metadata_size, OpenOptions, PoolConfig, METADATA_FILE};

use crate::bound::{CatalogPool, CATALOG_FILE, PENDING_FILE};
use crate::control;
use crate::error::{io, CatalogError, Result};
use crate::model::Settings;
use crate::names::{suggest, Name};
use crate::registry::Registry;

/// The lock file in a pool directory.
pub const LOCK_FILE: &str = "lock";

/// Files of a pool directory that `pool destroy` removes (besides the directory when it
/// is then empty). Modules that keep more files beside the pool add them here.
pub const POOL_FILES: &[&str] = &[
    METADATA_FILE,
    thinvol_engine::DATA_FILE,
    CATALOG_FILE,
    PENDING_FILE,
    ".catalog.json.tmp",
    ".catalog.pending.json.tmp",
    LOCK_FILE,
    control::CONTROL_SOCKET,
];

/// Directories of a pool directory that `pool destroy` removes with their contents
/// (`digests` and `receive`: send/receive, crates/stream).
pub const POOL_DIRS: &[&str] = &["archive", "digests", "receive"];

/// How long a command waits for another one using the same pool.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

fn refused(reason: impl Into<String>) -> CatalogError {
    CatalogError::Refused {
        reason: reason.into(),
    }
}

/// An `flock` on a pool directory's lock file, released when dropped. Where the lock
/// file cannot be created (a read-only directory), no lock is taken.
#[derive(Debug)]
pub struct PoolLock {
    _file: Option<File>,
}

pub fn lock_dir(dir: &Path, pool: &str, exclusive: bool) -> Result<PoolLock> {
    let path = dir.join(LOCK_FILE);
    let f = match File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e)
            if e.kind() == std::io::ErrorKind::PermissionDenied
                || e.raw_os_error() == Some(libc::EROFS) =>
        {
            return Ok(PoolLock { _file: None })
        }
        Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
    };
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    let start = Instant::now();
    loop {
        // SAFETY: flock on a valid, open file descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(PoolLock { _file: Some(f) });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io(format!("locking {}", path.display()))(e));
        }
        if start.elapsed() >= LOCK_WAIT {
            return Err(refused(format!(
                "pool '{pool}' is in use by another thinvol process (lock {}); \
                 retry when that command has finished",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pool opened by name, with its lock. Derefs to [`CatalogPool`].
pub struct Opened {
    pub cp: CatalogPool,
    _lock: PoolLock,
    /// A server that had the pool open, paused until this is dropped (after the pool
    /// and the lock: fields drop in order).
    pause: Option<control::PauseGuard>,
}

impl Deref for Opened {
    type Target = CatalogPool;
    fn deref(&self) -> &CatalogPool {
        &self.cp
    }
}

impl DerefMut for Opened {
    fn deref_mut(&mut self) -> &mut CatalogPool {
        &mut self.cp
    }
}

impl Opened {
    /// Thin ids exported by a server paused for this command (empty if none).
    pub fn served(&self) -> &[u64] {
        self.pause.as_ref().map_or(&[], |p| &p.exported)
    }

    /// Commit and close the pool, then release the lock.
    pub fn close(self) -> Result<()> {
        self.cp.close()
    }
}

/// Open a registered pool for changes. If a server (`thinvol serve`) has it open,
/// it is paused through its control socket until the returned handle is dropped.
pub fn open(reg: &Registry, name: &str) -> Result<Opened> {
    let r = reg.get(name)?;
    let pause = control::pause(&r.dir)?;
    let mut o = open_dir(name, &r.dir, false)?;
    o.pause = pause;
    Ok(o)
}

/// Open a registered pool to read it (listings, status): nothing is written. Pauses
/// a server like [`open`].
pub fn open_read_only(reg: &Registry, name: &str) -> Result<Opened> {
    let r = reg.get(name)?;
    let pause = control::pause(&r.dir)?;
    let mut o = open_dir(name, &r.dir, true)?;
    o.pause = pause;
    Ok(o)
}

/// Open the pool in `dir` with its lock, without asking a server to pause (what the
/// server itself uses).
pub fn open_dir(name: &str, dir: &Path, read_only: bool) -> Result<Opened> {
    let lock = lock_dir(dir, name, !read_only)?;
    let opts = OpenOptions {
        read_only,
        ..Default::default()
    };
    let cp = CatalogPool::open_with(name, dir, &opts)?;
    Ok(Opened {
        cp,
        _lock: lock,
        pause: None,
    })
}

fn ensure_unregistered(reg: &Registry, name: &str, dir: &Path) -> Result<()> {
    Name::pool(name)?;
    match reg.get(name) {
        Ok(_) => {
            return Err(CatalogError::Exists {
                kind: "pool",
                name: name.to_string(),
            })
        }
        Err(CatalogError::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    if let Ok(canon) = std::fs::canonicalize(dir) {
        if let Some(other) = reg.list()?.into_iter().find(|r| r.dir == canon) {
            return Err(refused(format!(
                "{} is already registered as pool '{}'",
                canon.display(),
                other.name
            )));
        }
    }
    Ok(())
}

/// Create a pool in `dir` and register it as `name`.
pub fn create_pool(
    reg: &Registry,
    name: &str,
    dir: &Path,
    cfg: &PoolConfig,
    settings: Settings,
) -> Result<Opened> {
    ensure_unregistered(reg, name, dir)?;
    let existed = dir.exists();
    if existed && (dir.join(METADATA_FILE).exists() || dir.join(CATALOG_FILE).exists()) {
        return Err(refused(format!(
            "{} already holds a pool; register it with 'thinvol pool import {name} --dir {}'",
            dir.display(),
            dir.display()
        )));
    }
    let cp = CatalogPool::create(name, dir, cfg, settings)?;
    let lock = lock_dir(dir, name, true)?;
    if let Err(e) = reg.add(name, dir) {
        let _ = cp.close();
        remove_pool_files(dir, !existed);
        return Err(e);
    }
    Ok(Opened {
        cp,
        _lock: lock,
        pause: None,
    })
}

/// How `pool import` took a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Imported {
    /// It had a catalog (a thinvol pool registered elsewhere or unregistered).
    Registered,
    /// It had none: every thin device became volume `thin-ID`.
    Adopted,
}

/// Register an existing pool directory as `name`; a pool without a catalog (made by
/// `thinvol thin format`, or written by the kernel) is adopted.
pub fn import_pool(reg: &Registry, name: &str, dir: &Path) -> Result<(Opened, Imported)> {
    ensure_unregistered(reg, name, dir)?;
    if !dir.join(METADATA_FILE).exists() {
        return Err(refused(format!(
            "{} holds no pool (no '{METADATA_FILE}' file); create one with \
             'thinvol pool create {name} --dir {} --size SIZE'",
            dir.display(),
            dir.display()
        )));
    }
    let lock = lock_dir(dir, name, true)?;
    let how = if dir.join(CATALOG_FILE).exists() {
        Imported::Registered
    } else {
        Imported::Adopted
    };
    let cp = match how {
        Imported::Registered => CatalogPool::open(name, dir)?,
        Imported::Adopted => CatalogPool::adopt(name, dir, Settings::default())?,
    };
    reg.add(name, dir)?;
    Ok((
        Opened {
            cp,
            _lock: lock,
            pause: None,
        },
        how,
    ))
}

/// What `pool destroy` removed.
#[derive(Clone, Debug, Serialize)]
pub struct Destroyed {
    pub name: String,
    pub dir: PathBuf,
    pub volumes: usize,
    pub snapshots: usize,
    /// Entries of the directory that were not the pool's and were left in place.
    pub left: Vec<String>,
}

/// Remove the pool's files (and the directory when it ends up empty and `rmdir`).
/// Returns what is left in the directory.
fn remove_pool_files(dir: &Path, rmdir: bool) -> Vec<String> {
    for f in POOL_FILES {
        let _ = std::fs::remove_file(dir.join(f));
    }
    for d in POOL_DIRS {
        let _ = std::fs::remove_dir_all(dir.join(d));
    }
    let left: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if left.is_empty() && rmdir {
        let _ = std::fs::remove_dir(dir);
    }
    left
}

/// Destroy a registered pool: its files and its registration. Refuses while it has
/// volumes unless `force`; with `force` a pool that no longer opens is removed too.
pub fn destroy_pool(reg: &Registry, name: &str, force: bool) -> Result<Destroyed> {
    let r = reg.get(name)?;
    let (volumes, snapshots) = match open(reg, name) {
        Ok(h) => {
            let v = h.catalog.volumes.len();
            let s: usize = h.catalog.volumes.values().map(|v| v.snapshots.len()).sum();
            if v > 0 && !force {
                let mut names: Vec<String> = h
                    .catalog
                    .volumes
                    .keys()
                    .take(5)
                    .map(|n| format!("{name}/{n}"))
                    .collect();
                if v > 5 {
                    names.push("...".into());
                }
                return Err(refused(format!(
                    "pool '{name}' has {v} volume(s) and {s} snapshot(s) ({}); destroy them \
                     first, or use --force to destroy the pool with everything in it",
                    names.join(", ")
                )));
            }
            h.close()?;
            (v, s)
        }
        Err(e) if force => {
            // Refused (in use) stays a refusal even with --force.
            if matches!(e, CatalogError::Refused { .. }) {
                return Err(e);
            }
            (0, 0)
        }
        Err(e) => {
            return Err(refused(format!(
                "pool '{name}' does not open ({e}); use --force to remove it anyway"
            )))
        }
    };
    let left = if r.dir.exists() {
        remove_pool_files(&r.dir, true)
    } else {
        Vec::new()
    };
    reg.remove(name)?;
    Ok(Destroyed {
        name: name.to_string(),
        dir: r.dir,
        volumes,
        snapshots,
        left,
    })
}

/// Sizes before and after `pool grow`.
#[derive(Clone, Debug, Serialize)]
pub struct Grown {
    pub data_before: u64,
    pub data_after: u64,
    pub metadata_before: u64,
    pub metadata_after: u64,
}

/// Grow the pool's data to `size` bytes (whole blocks); the metadata grows with it when
/// the default for the new size is larger than what the pool has.
pub fn grow_pool(cp: &CatalogPool, size: u64) -> Result<Grown> {
    let s = cp.pool.status()?;
    let bs = s.data_block_size;
    let data_before = s.data_blocks_total * bs;
    let metadata_before = s.metadata_blocks_total * 4096;
    let data_after = size / bs * bs;
    if data_after < data_before {
        return Err(refused(format!(
            "pools do not shrink: '{}' has {} of data, asked for {}",
            cp.name,
            human_bytes(data_before),
            human_bytes(size)
        )));
    }
    if data_after == data_before {
        return Err(refused(format!(
            "'{}' already has {} of data; give a larger --size",
            cp.name,
            human_bytes(data_before)
        )));
    }
    let block = DataBlockSize::from_bytes(bs).ok_or_else(|| CatalogError::BadCatalog {
        path: cp.dir.display().to_string(),
        reason: format!("the pool's block size {bs} is not a dm-thin block size"),
    })?;
    let want_meta = default_metadata_size(data_after, block);
    if want_meta > metadata_before {
        cp.pool.grow_metadata(want_meta)?;
    }
    cp.pool.grow_data(data_after)?;
    let s = cp.pool.status()?;
    Ok(Grown {
        data_before,
        data_after: s.data_blocks_total * bs,
        metadata_before,
        metadata_after: s.metadata_blocks_total * 4096,
    })
}

/// The settings `pool set` knows.
pub const SETTING_KEYS: &[&str] = &["retain_min", "retain_days", "thresholds"];

fn bad(arg: &str, reason: impl Into<String>) -> CatalogError {
    CatalogError::BadArgument {
        arg: arg.to_string(),
        reason: reason.into(),
    }
}

/// Apply `KEY=VALUE` assignments to `s`: `retain_min=N`, `retain_days=N`,
/// `thresholds=80,90,95` (1 to 5 ascending percentages, or `none`).
pub fn apply_settings(s: &mut Settings, assignments: &[String]) -> Result<()> {
    if assignments.is_empty() {
        return Err(bad(
            "",
            format!("give KEY=VALUE, one of: {}", SETTING_KEYS.join(", ")),
        ));
    }
    for a in assignments {
        let Some((k, v)) = a.split_once('=') else {
            return Err(bad(
                a,
                format!(
                    "expected KEY=VALUE, with KEY one of {}",
                    SETTING_KEYS.join(", ")
                ),
            ));
        };
        let num = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| bad(a, format!("'{v}' is not a whole number")))
        };
        match k.trim() {
            "retain_min" => s.retain_min = num(v)?,
            "retain_days" => s.retain_days = num(v)?,
            "thresholds" => s.thresholds = parse_thresholds(a, v)?,
            other => {
                return Err(bad(
                    a,
                    format!(
                        "unknown setting '{other}'{}; settings: {}",
                        suggest(other, SETTING_KEYS.iter().copied()),
                        SETTING_KEYS.join(", ")
                    ),
                ))
            }
        }
    }
    Ok(())
}

fn parse_thresholds(a: &str, v: &str) -> Result<Vec<u8>> {
    if v.trim() == "none" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for p in v.split(',') {
        let p = p.trim().trim_end_matches('%');
        let t: u8 = p
            .parse()
            .ok()
            .filter(|t| (1..=100).contains(t))
            .ok_or_else(|| bad(a, format!("'{p}' is not a percentage from 1 to 100")))?;
        if out.last().is_some_and(|&l| l >= t) {
            return Err(bad(
                a,
                "thresholds must be strictly ascending, e.g. 80,90,95",
            ));
        }
        out.push(t);
    }
    if out.len() > 5 {
        return Err(bad(a, "at most 5 thresholds"));
    }
    Ok(out)
}

/// Change settings (one catalog change). Returns the new settings.
pub fn set(cp: &mut CatalogPool, assignments: &[String]) -> Result<Settings> {
    let mut s = cp.catalog.settings.clone();
    apply_settings(&mut s, assignments)?;
    cp.set_settings(s.clone())?;
    Ok(s)
}

/// How many of `thresholds` (ascending percentages) `pct` has reached.
pub fn threshold_level(thresholds: &[u8], pct: f64) -> usize {
    thresholds.iter().filter(|&&t| pct >= f64::from(t)).count()
}

/// `pool status`.
#[derive(Clone, Debug, Serialize)]
pub struct PoolReport {
    pub name: String,
    pub dir: PathBuf,
    pub data_block_size: u64,
    pub data_total: u64,
    pub data_used: u64,
    pub data_used_percent: f64,
    pub metadata_total: u64,
    pub metadata_used: u64,
    pub metadata_used_percent: f64,
    pub thresholds: Vec<u8>,
    /// Thresholds reached by data or metadata use, whichever is higher (0 = none).
    pub level: usize,
    /// The highest threshold reached, if any.
    pub reached: Option<u8>,
    /// One line per space at or above a threshold.
    pub warnings: Vec<String>,
    pub volumes: usize,
    pub snapshots: usize,
    pub settings: Settings,
    pub transaction_id: u64,
    pub held_metadata_snapshot: Option<u64>,
}

pub fn report(cp: &CatalogPool) -> Result<PoolReport> {
    let s = cp.pool.status()?;
    let (dp, mp) = cp.usage()?;
    let th = cp.catalog.settings.thresholds.clone();
    let (dl, ml) = (threshold_level(&th, dp), threshold_level(&th, mp));
    let level = dl.max(ml);
    let mut warnings = Vec::new();
    for (what, l, p) in [("data", dl, dp), ("metadata", ml, mp)] {
        if l > 0 {
            warnings.push(format!(
                "{what} use {p:.1}% is at or above the {}% threshold",
                th[l - 1]
            ));
        }
    }
    let bs = s.data_block_size;
    Ok(PoolReport {
        name: cp.name.clone(),
        dir: cp.dir.clone(),
        data_block_size: bs,
        data_total: s.data_blocks_total * bs,
        data_used: s.data_blocks_used * bs,
        data_used_percent: dp,
        metadata_total: s.metadata_blocks_total * 4096,
        metadata_used: s.metadata_blocks_used * 4096,
        metadata_used_percent: mp,
        reached: (level > 0).then(|| th[level - 1]),
        thresholds: th,
        level,
        warnings,
        volumes: cp.catalog.volumes.len(),
        snapshots: cp.catalog.volumes.values().map(|v| v.snapshots.len()).sum(),
        settings: cp.catalog.settings.clone(),
        transaction_id: s.transaction_id,
        held_metadata_snapshot: s.held_metadata_root.map(|b| b.0),
    })
}

/// `thinvol check`: the pool's own check plus catalog/device consistency.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub clean: bool,
    pub devices: usize,
    pub mappings: u64,
    pub volumes: usize,
    pub snapshots: usize,
    /// Problems in the pool metadata (trees, space maps).
    pub pool_problems: Vec<String>,
    /// Problems between catalog and devices.
    pub catalog_problems: Vec<String>,
}

pub fn check(cp: &CatalogPool) -> Result<CheckReport> {
    let r = cp.pool.check()?;
    let pool_problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    let mut cat = Vec::new();
    if let Err(e) = cp.verify_devices() {
        cat.push(e.to_string());
    }
    let c = &cp.catalog;
    let pool = &cp.name;
    let bs = cp.pool.block_size();
    let mut names = 0usize;
    let mut max_id = 0u64;
    let mut check_extent = |label: String, id: u64, size: u64, cat: &mut Vec<String>| {
        names += 1;
        max_id = max_id.max(id);
        if let Ok(beyond) = cp
            .pool
            .mappings_range(ThinId(id), size.div_ceil(bs), u64::MAX)
        {
            if !beyond.is_empty() {
                cat.push(format!(
                    "'{label}' maps {} block(s) beyond its size {}",
                    beyond.len(),
                    human_bytes(size)
                ));
            }
        }
    };
    for (vn, v) in &c.volumes {
        check_extent(format!("{pool}/{vn}"), v.thin_id, v.size, &mut cat);
        for (sn, s) in &v.snapshots {
            check_extent(format!("{pool}/{vn}@{sn}"), s.thin_id, s.size, &mut cat);
        }
        if let Some(o) = &v.origin {
            let ok = o
                .split_once('@')
                .and_then(|(ov, os)| c.volumes.get(ov).map(|x| x.snapshots.contains_key(os)))
                .unwrap_or(false);
            if !ok {
                cat.push(format!(
                    "'{pool}/{vn}' names origin '{pool}/{o}', which does not exist"
                ));
            }
        }
    }
    // Hidden devices (an unfinished receive) are named too, with no size to check.
    names += c.hidden.len();
    max_id = max_id.max(c.hidden.keys().copied().max().unwrap_or(0));
    let ids = c.thin_ids();
    if ids.len() != names {
        cat.push(format!(
            "{} names share {} thin device(s): two names point at one device",
            names,
            ids.len()
        ));
    }
    if names > 0 && c.next_thin_id <= max_id {
        cat.push(format!(
            "next thin id {} is not above the highest id in use ({max_id})",
            c.next_thin_id
        ));
    }
    Ok(CheckReport {
        clean: pool_problems.is_empty() && cat.is_empty(),
        devices: r.devices,
        mappings: r.mappings,
        volumes: c.volumes.len(),
        snapshots: c.volumes.values().map(|v| v.snapshots.len()).sum(),
        pool_problems,
        catalog_problems: cat,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;

    fn cfg(size: u64) -> PoolConfig {
        PoolConfig {
            data_size: size,
            ..Default::default()
        }
    }

    #[test]
    fn settings_parse_and_reject() {
        let mut s = Settings::default();
        apply_settings(
            &mut s,
            &["retain_min=3".into(), "thresholds=50,75%,99".into()],
        )
        .unwrap();
        assert_eq!((s.retain_min, s.thresholds.clone()), (3, vec![50, 75, 99]));
        apply_settings(&mut s, &["thresholds=none".into()]).unwrap();
        assert!(s.thresholds.is_empty());
        let e = apply_settings(&mut s, &["retian_min=1".into()]).unwrap_err();
        assert!(e.to_string().contains("did you mean 'retain_min'"), "{e}");
        for bad in [
            "thresholds=90,80",
            "thresholds=0",
            "thresholds=101",
            "retain_days=x",
            "x",
        ] {
            assert!(apply_settings(&mut s, &[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn levels() {
        let th = [80, 90, 95];
        assert_eq!(threshold_level(&th, 79.9), 0);
        assert_eq!(threshold_level(&th, 80.0), 1);
        assert_eq!(threshold_level(&th, 94.0), 2);
        assert_eq!(threshold_level(&th, 100.0), 3);
        assert_eq!(threshold_level(&[], 100.0), 0);
    }

    #[test]
    fn create_import_destroy_by_name() {
        let t = tempfile::tempdir().unwrap();
        let reg = Registry::new(&t.path().join("state"));
        let dir = t.path().join("p1");
        let mut h = create_pool(&reg, "tank", &dir, &cfg(16 << 20), Settings::default()).unwrap();
        ops::create_volume(&mut h, &Name::parse("tank/v").unwrap(), 1 << 20).unwrap();
        // A second process-level open waits for the lock, then refuses.
        let e = lock_dir(&dir, "tank", false).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        h.close().unwrap();
        // Name taken, directory taken.
        assert!(matches!(
            create_pool(
                &reg,
                "tank",
                &t.path().join("p2"),
                &cfg(16 << 20),
                Settings::default()
            ),
            Err(CatalogError::Exists { .. })
        ));
        assert!(import_pool(&reg, "other", &dir).is_err());
        // Not empty: refused, then forced.
        let e = destroy_pool(&reg, "tank", false).err().unwrap();
        assert!(e.to_string().contains("--force"), "{e}");
        let d = destroy_pool(&reg, "tank", true).unwrap();
        assert_eq!(d.volumes, 1);
        assert!(!dir.exists());
        assert!(reg.list().unwrap().is_empty());
        // Adopt a pool made without a catalog.
        let raw = t.path().join("raw");
        let p = thinvol_engine::Pool::create(&raw, &cfg(16 << 20)).unwrap();
        p.create_thin(ThinId(5)).unwrap();
        p.write(ThinId(5), 0, &[1u8; 4096]).unwrap();
        p.close().unwrap();
        let (h, how) = import_pool(&reg, "raw", &raw).unwrap();
        assert_eq!(how, Imported::Adopted);
        assert!(h.catalog.volumes.contains_key("thin-5"));
        assert!(check(&h).unwrap().clean);
        h.close().unwrap();
        let e = open(&reg, "rwa").err().unwrap();
        assert!(e.to_string().contains("did you mean 'raw'"), "{e}");
    }

    #[test]
    fn grow_report_and_check() {
        let t = tempfile::tempdir().unwrap();
        let reg = Registry::new(&t.path().join("state"));
        let mut h = create_pool(
            &reg,
            "tank",
            &t.path().join("p"),
            &cfg(1 << 20),
            Settings::default(),
        )
        .unwrap();
        let bs = h.pool.block_size();
        let v = Name::parse("tank/v").unwrap();
        ops::create_volume(&mut h, &v, 1 << 20).unwrap();
        let id = h.thin_of(&v).unwrap();
        h.pool.write(id, 0, &vec![1u8; 13 * bs as usize]).unwrap();
        let r = report(&h).unwrap();
        assert_eq!((r.level, r.reached), (1, Some(80)));
        assert_eq!(r.warnings.len(), 1);
        assert!(grow_pool(&h, 1 << 19).is_err());
        let g = grow_pool(&h, 64 << 20).unwrap();
        assert_eq!((g.data_before, g.data_after), (1 << 20, 64 << 20));
        assert_eq!(report(&h).unwrap().level, 0);
        let c = check(&h).unwrap();
        assert!(c.clean, "{c:?}");
        // A mapping beyond the volume's size is a catalog problem.
        h.pool.write(id, 2 << 20, &[1u8; 512]).unwrap();
        let c = check(&h).unwrap();
        assert!(!c.clean);
        assert!(c.catalog_problems[0].contains("beyond its size"), "{c:?}");
        let s = set(&mut h, &["thresholds=10".into()]).unwrap();
        assert_eq!(s.thresholds, vec![10]);
        h.close().unwrap();
    }
}
