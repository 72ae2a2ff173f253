//! Kernel interop: run the real Linux dm-thin (Debian 6.1 kernel in qemu,
//! `shared/lvm-vm`) against pool files on the host.
//!
//! A pool here is two plain files: `metadata` (dm-thin metadata) and `data`
//! (data blocks of `data_block_sectors` sectors each). They are attached to
//! the VM as `/dev/vda` and `/dev/vdb` and driven by the guest scripts in
//! `tests/vm/` (`read-pool.sh`, `write-pool.sh`); see `tests/vm/README.md`.
//!
//! * [`kernel_read_devices`]: the kernel activates the pool read-only
//!   (`read_only` feature, read-only disks) and returns the sha256 of each
//!   thin device's whole content. The files are not changed.
//! * [`kernel_run_ops`]: the kernel activates the pool read-write (or formats
//!   a fresh one from zeroed metadata), runs [`KernelOp`]s, reports each
//!   device's sha256 and removes the pool, so that its metadata is committed
//!   to the host file.
//! * [`model_ops`] / [`write_payload`]: the bytes the devices must hold
//!   afterwards, computed on the host, and [`sha256_hex`] to compare.
//!
//! Every VM run boots a fresh guest (~5 s under TCG) and holds a host-wide
//! lock (`flock` on [`LOCK_FILE`]), so parallel tests take turns.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Host-wide lock file serializing VM runs (override: `THINVOL_VM_LOCK`).
pub const LOCK_FILE: &str = "/tmp/thinvol-lvmvm.lock";

/// Default `--timeout` of one VM run in seconds (override: `THINVOL_VM_TIMEOUT`).
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

const SECTOR: u64 = 512;
const THIN_SUPERBLOCK_MAGIC: u64 = 27_022_010;

/// The pool files given to the kernel.
#[derive(Debug, Clone, Copy)]
pub struct VmPool<'a> {
    pub metadata: &'a Path,
    pub data: &'a Path,
    /// Data block size in 512-byte sectors (e.g. 128 = 64 KiB).
    pub data_block_sectors: u32,
}

/// One dm-thin operation for [`kernel_run_ops`]. Offsets and lengths are in
/// bytes and must be multiples of 512; writes and discards must stay inside
/// the device size given for the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelOp {
    /// `create_thin DEV`.
    Create(u64),
    /// `create_snap DEV ORIGIN` (an active origin is suspended around it).
    Snap { dev: u64, origin: u64 },
    /// `delete DEV` (the device is deactivated first).
    Delete(u64),
    /// Write `len` bytes at `offset_bytes`: the bytes are
    /// [`write_payload`]`(index of this op, len)`.
    Write {
        dev: u64,
        offset_bytes: u64,
        len: u64,
    },
    /// `blkdiscard`: dm-thin unmaps the data blocks wholly inside the range
    /// and ignores partial blocks.
    Discard {
        dev: u64,
        offset_bytes: u64,
        len: u64,
    },
    /// `reserve_metadata_snap`.
    ReserveMetadataSnap,
    /// `release_metadata_snap`.
    ReleaseMetadataSnap,
    /// `set_transaction_id OLD NEW`.
    SetTransactionId { old: u64, new: u64 },
}

/// Result of [`kernel_run_ops`].
#[derive(Debug, Clone)]
pub struct KernelRun {
    /// sha256 (hex) of every listed device that exists after the ops.
    pub devices: BTreeMap<u64, String>,
    /// `dmsetup status pool` just before the pool was removed, e.g.
    /// `0 8192 thin-pool 5 114/1024 3/64 61 rw discard_passdown queue_if_no_space - 256`
    /// (transaction id, used/total metadata blocks, used/total data blocks,
    /// held metadata root or `-`, mode, ...).
    pub pool_status: String,
    /// Guest stdout (result lines) and stderr (log) as received.
    pub stdout: String,
    pub stderr: String,
    /// Wall time of the VM run, including waiting for the lock.
    pub elapsed: Duration,
}

/// Errors of the VM driver.
#[derive(Debug)]
pub enum VmError {
    /// The VM harness is not set up (or `THINVOL_SKIP_VM=1`).
    Unavailable(String),
    /// Bad arguments, rejected on the host before booting.
    Invalid(String),
    /// Host I/O on the pool files or temp files.
    Io { what: String, source: io::Error },
    /// The run did not succeed: the guest script failed (its status), the VM
    /// timed out (124), died / oopsed (125), or `run` itself failed.
    Failed {
        status: Option<i32>,
        stdout: String,
        stderr: String,
    },
    /// The guest succeeded but its output did not have the expected lines.
    BadOutput {
        reason: String,
        stdout: String,
        stderr: String,
    },
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Unavailable(why) => write!(f, "lvm-vm unavailable: {why}"),
            VmError::Invalid(why) => write!(f, "invalid lvm-vm request: {why}"),
            VmError::Io { what, source } => write!(f, "{what}: {source}"),
            VmError::Failed {
                status,
                stdout,
                stderr,
            } => {
                let what = match status {
                    Some(124) => "VM run timed out (124)".to_string(),
                    Some(125) => "VM died before the script finished (125)".to_string(),
                    Some(s) => format!("guest script failed with status {s}"),
                    None => "VM run killed by a signal".to_string(),
                };
                write!(
                    f,
                    "{what}\n--- stdout:\n{}\n--- stderr (tail):\n{}",
                    stdout,
                    tail(stderr, 60)
                )
            }
            VmError::BadOutput {
                reason,
                stdout,
                stderr,
            } => write!(
                f,
                "unexpected guest output: {reason}\n--- stdout:\n{stdout}\n--- stderr (tail):\n{}",
                tail(stderr, 60)
            ),
        }
    }
}

impl std::error::Error for VmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VmError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// `shared/` (holding `lvm-vm/`): `THINVOL_SHARED_DIR`, else
/// `<workspace>/../shared`.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("THINVOL_SHARED_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

/// The guest scripts: `THINVOL_VM_SCRIPTS`, else `<workspace>/tests/vm`.
pub fn scripts_dir() -> PathBuf {
    match std::env::var_os("THINVOL_VM_SCRIPTS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vm"),
    }
}

fn run_path() -> PathBuf {
    shared_dir().join("lvm-vm/run")
}

fn lock_path() -> PathBuf {
    match std::env::var_os("THINVOL_VM_LOCK") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(LOCK_FILE),
    }
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Why VM tests cannot run here (`None`: they can). `THINVOL_SKIP_VM=1`
/// disables them; otherwise `lvm-vm/run`, its `setup` output (kernel and
/// initramfs in `$LVM_VM_CACHE`, default `/var/cache/lvm-vm`), qemu, the
/// guest scripts and `flock(1)` must be there.
pub fn vm_skip_reason() -> Option<String> {
    if std::env::var("THINVOL_SKIP_VM").is_ok_and(|v| v == "1") {
        return Some("THINVOL_SKIP_VM=1".into());
    }
    let run = run_path();
    if !run.is_file() {
        return Some(format!(
            "{} not found (set THINVOL_SHARED_DIR)",
            run.display()
        ));
    }
    let cache = std::env::var_os("LVM_VM_CACHE")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/lvm-vm"));
    let kernel = cache.join("vmlinux").is_file() || cache.join("vmlinuz").is_file();
    if !kernel || !cache.join("initramfs.cpio").is_file() {
        return Some(format!(
            "no kernel/initramfs in {}: run {}/lvm-vm/setup first",
            cache.display(),
            shared_dir().display()
        ));
    }
    if !on_path("qemu-system-x86_64") {
        return Some("qemu-system-x86_64 not on PATH (run lvm-vm/setup)".into());
    }
    if !on_path("flock") {
        return Some("flock(1) not on PATH (util-linux)".into());
    }
    let scripts = scripts_dir();
    for s in ["read-pool.sh", "write-pool.sh"] {
        if !scripts.join(s).is_file() {
            return Some(format!(
                "guest script {} missing",
                scripts.join(s).display()
            ));
        }
    }
    None
}

/// Whether the VM can be used: [`vm_skip_reason`] is `None`.
pub fn vm_available() -> bool {
    vm_skip_reason().is_none()
}

/// Boot the VM once (under the host-wide lock) with these disks and run a
/// guest script from [`scripts_dir`]. Returns (stdout, stderr, elapsed).
fn run_vm(
    disks: &[(&Path, bool)],
    script: &str,
    args: &[String],
) -> Result<(String, String, Duration), VmError> {
    if let Some(why) = vm_skip_reason() {
        return Err(VmError::Unavailable(why));
    }
    let timeout = std::env::var("THINVOL_VM_TIMEOUT")
        .ok()
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(DEFAULT_TIMEOUT_SECS);
    let mut cmd = Command::new("flock");
    cmd.arg(lock_path())
        .arg(run_path())
        .arg("--timeout")
        .arg(timeout.to_string());
    for (disk, read_only) in disks {
        cmd.arg(if *read_only { "--ro-disk" } else { "--disk" })
            .arg(disk);
    }
    cmd.arg("--").arg(scripts_dir().join(script)).args(args);
    let start = Instant::now();
    let out = cmd.output().map_err(io_err("running flock + lvm-vm/run"))?;
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(VmError::Failed {
            status: out.status.code(),
            stdout,
            stderr,
        });
    }
    Ok((stdout, stderr, elapsed))
}

/// `(nr_data_blocks, data_block_size)` from a dm-thin superblock, or `None`
/// if the file does not start with one (bad magic).
fn superblock_geometry(metadata: &Path) -> Result<Option<(u64, u32)>, VmError> {
    let mut sb = [0u8; 512];
    let mut f = File::open(metadata).map_err(io_err(format!("opening {}", metadata.display())))?;
    if f.read_exact(&mut sb).is_err() {
        return Ok(None);
    }
    let le64 = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&sb[o..o + 8]);
        u64::from_le_bytes(b)
    };
    if le64(32) != THIN_SUPERBLOCK_MAGIC {
        return Ok(None);
    }
    let mut b = [0u8; 4];
    b.copy_from_slice(&sb[336..340]);
    Ok(Some((le64(64), u32::from_le_bytes(b))))
}

/// `x` is a multiple of `to` (`to` > 0).
fn aligned(x: u64, to: u64) -> bool {
    x.checked_rem(to) == Some(0)
}

fn file_len(p: &Path) -> Result<u64, VmError> {
    Ok(fs::metadata(p)
        .map_err(io_err(format!("stat {}", p.display())))?
        .len())
}

fn check_pool(pool: &VmPool) -> Result<(), VmError> {
    if pool.data_block_sectors == 0 {
        return Err(VmError::Invalid("data_block_sectors is 0".into()));
    }
    for p in [pool.metadata, pool.data] {
        if !p.is_file() {
            return Err(VmError::Invalid(format!("{} is not a file", p.display())));
        }
    }
    Ok(())
}

/// Pool table length when the caller gives none: the superblock's
/// nr_data_blocks, else the data file's whole blocks.
fn auto_pool_sectors(pool: &VmPool) -> Result<u64, VmError> {
    let bs = u64::from(pool.data_block_sectors);
    match superblock_geometry(pool.metadata)? {
        Some((nr_blocks, _)) if nr_blocks > 0 => Ok(nr_blocks * bs),
        _ => Ok(file_len(pool.data)? / SECTOR / bs * bs),
    }
}

fn check_devices(devices: &[(u64, u64)]) -> Result<(), VmError> {
    let mut seen = BTreeMap::new();
    for &(dev, size) in devices {
        if size == 0 || !aligned(size, SECTOR) {
            return Err(VmError::Invalid(format!(
                "device {dev}: size {size} is not a positive multiple of 512"
            )));
        }
        if seen.insert(dev, ()).is_some() {
            return Err(VmError::Invalid(format!("device {dev} listed twice")));
        }
    }
    Ok(())
}

fn device_args(devices: &[(u64, u64)]) -> Vec<String> {
    devices
        .iter()
        .map(|(dev, size)| format!("{dev}:{}", size / SECTOR))
        .collect()
}

/// Parse the guest's `DEV_ID SHA256` lines (other lines are returned).
fn parse_shas(stdout: &str, stderr: &str) -> Result<(BTreeMap<u64, String>, Vec<String>), VmError> {
    let mut map = BTreeMap::new();
    let mut other = Vec::new();
    for line in stdout.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some(id), Some(sha), None)
                if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                let id = id.parse::<u64>().map_err(|_| VmError::BadOutput {
                    reason: format!("bad device id in {line:?}"),
                    stdout: stdout.into(),
                    stderr: stderr.into(),
                })?;
                map.insert(id, sha.to_ascii_lowercase());
            }
            _ => other.push(line.to_string()),
        }
    }
    Ok((map, other))
}

/// Have the kernel read the pool READ-ONLY and return the sha256 of every
/// listed thin device `(dev id, size in bytes)`. The size is the thin table
/// length (a multiple of 512; need not be a multiple of the block size). The
/// pool table's length is nr_data_blocks from the metadata superblock (or the
/// data file's whole blocks). The files are attached read-only and not changed.
pub fn kernel_read_devices(
    pool: &VmPool,
    devices: &[(u64, u64)],
) -> Result<BTreeMap<u64, String>, VmError> {
    check_pool(pool)?;
    check_devices(devices)?;
    let pool_sectors = auto_pool_sectors(pool)?;
    let mut args = vec![
        "--pool-sectors".to_string(),
        pool_sectors.to_string(),
        pool.data_block_sectors.to_string(),
    ];
    args.extend(device_args(devices));
    let (stdout, stderr, _) = run_vm(
        &[(pool.metadata, true), (pool.data, true)],
        "read-pool.sh",
        &args,
    )?;
    let (map, _) = parse_shas(&stdout, &stderr)?;
    for (dev, _) in devices {
        if !map.contains_key(dev) {
            return Err(VmError::BadOutput {
                reason: format!("no sha256 for device {dev}"),
                stdout,
                stderr,
            });
        }
    }
    Ok(map)
}

/// Have the kernel activate the pool read-write and run `ops`, then report
/// and commit (the pool is removed, so dm-thin writes its metadata to the
/// host file).
///
/// * `fresh`: the first 4 KiB of the metadata file are zeroed first, so the
///   kernel formats new metadata (the file keeps its size).
/// * `pool_sectors`: the pool table length (a multiple of the block size, at
///   most the data file's size). 0: nr_data_blocks from the superblock, or
///   for a fresh pool the data file's whole blocks. Longer than the
///   metadata's nr_data_blocks grows the pool.
/// * `devices`: `(dev id, size in bytes)` for every device the ops write or
///   discard and every device to hash at the end; the result has the sha256
///   of those that exist after the ops.
pub fn kernel_run_ops(
    pool: &VmPool,
    fresh: bool,
    pool_sectors: u64,
    devices: &[(u64, u64)],
    ops: &[KernelOp],
) -> Result<KernelRun, VmError> {
    check_pool(pool)?;
    check_devices(devices)?;
    let bs = u64::from(pool.data_block_sectors);
    let sizes: BTreeMap<u64, u64> = devices.iter().copied().collect();

    // Validate the ops and build the payload disk for the writes.
    let payload_dir = tempfile::tempdir().map_err(io_err("creating a temp dir"))?;
    let payload_path = payload_dir.path().join("payload.img");
    let mut payload = Vec::new();
    let mut op_args = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let range = |dev: u64, off: u64, len: u64| -> Result<(), VmError> {
            let size = sizes.get(&dev).ok_or_else(|| {
                VmError::Invalid(format!(
                    "op {i} ({op:?}): device {dev} has no size in `devices`"
                ))
            })?;
            if len == 0 || !aligned(off, SECTOR) || !aligned(len, SECTOR) {
                return Err(VmError::Invalid(format!(
                    "op {i} ({op:?}): offset and length must be multiples of 512, length > 0"
                )));
            }
            if off.checked_add(len).filter(|end| end <= size).is_none() {
                return Err(VmError::Invalid(format!(
                    "op {i} ({op:?}): beyond the device size {size}"
                )));
            }
            Ok(())
        };
        op_args.push(match *op {
            KernelOp::Create(dev) => format!("create:{dev}"),
            KernelOp::Snap { dev, origin } => format!("snap:{dev}:{origin}"),
            KernelOp::Delete(dev) => format!("delete:{dev}"),
            KernelOp::Write {
                dev,
                offset_bytes,
                len,
            } => {
                range(dev, offset_bytes, len)?;
                let src = payload.len();
                payload.extend_from_slice(&write_payload(i, len));
                format!("write:{dev}:{offset_bytes}:{len}:{src}")
            }
            KernelOp::Discard {
                dev,
                offset_bytes,
                len,
            } => {
                range(dev, offset_bytes, len)?;
                format!("discard:{dev}:{offset_bytes}:{len}")
            }
            KernelOp::ReserveMetadataSnap => "reserve_metadata_snap".into(),
            KernelOp::ReleaseMetadataSnap => "release_metadata_snap".into(),
            KernelOp::SetTransactionId { old, new } => format!("set_transaction_id:{old}:{new}"),
        });
    }

    let pool_sectors = match pool_sectors {
        0 if fresh => file_len(pool.data)? / SECTOR / bs * bs,
        0 => auto_pool_sectors(pool)?,
        n => n,
    };
    if pool_sectors == 0 || !aligned(pool_sectors, bs) {
        return Err(VmError::Invalid(format!(
            "pool length {pool_sectors} sectors is not a positive multiple of the block size {bs}"
        )));
    }
    if pool_sectors * SECTOR > file_len(pool.data)? {
        return Err(VmError::Invalid(format!(
            "pool length {pool_sectors} sectors is longer than {}",
            pool.data.display()
        )));
    }

    // Boot only when the VM is there, and touch no file before knowing so.
    if let Some(why) = vm_skip_reason() {
        return Err(VmError::Unavailable(why));
    }
    if fresh {
        let mut f = OpenOptions::new()
            .write(true)
            .open(pool.metadata)
            .map_err(io_err(format!("opening {}", pool.metadata.display())))?;
        if file_len(pool.metadata)? < 4096 {
            return Err(VmError::Invalid("metadata file shorter than 4 KiB".into()));
        }
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(&[0u8; 4096]))
            .and_then(|_| f.sync_all())
            .map_err(io_err(format!(
                "zeroing the superblock of {}",
                pool.metadata.display()
            )))?;
    }

    let mut disks = vec![(pool.metadata, false), (pool.data, false)];
    if !payload.is_empty() {
        fs::write(&payload_path, &payload).map_err(io_err("writing the payload disk"))?;
        disks.push((payload_path.as_path(), true));
    }
    let mut args = Vec::new();
    if fresh {
        args.push("--fresh".to_string());
    }
    args.extend([
        "--pool-sectors".to_string(),
        pool_sectors.to_string(),
        bs.to_string(),
    ]);
    args.extend(device_args(devices));
    args.push("--".into());
    args.extend(op_args);

    let (stdout, stderr, elapsed) = run_vm(&disks, "write-pool.sh", &args)?;
    let (devices, other) = parse_shas(&stdout, &stderr)?;
    let Some(pool_status) = other.iter().find_map(|l| l.strip_prefix("pool-status ")) else {
        return Err(VmError::BadOutput {
            reason: "no pool-status line".into(),
            stdout,
            stderr,
        });
    };
    Ok(KernelRun {
        devices,
        pool_status: pool_status.trim().to_string(),
        stdout,
        stderr,
        elapsed,
    })
}

/// The bytes [`KernelOp::Write`] number `op_index` (its index in the ops
/// slice) writes: a splitmix64 stream seeded by the index.
pub fn write_payload(op_index: usize, len: u64) -> Vec<u8> {
    let len = usize::try_from(len).expect("payload length fits in memory");
    let mut state = (op_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x7468_696e_766f_6c00;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What the devices hold after `ops`, computed on the host, mirroring
/// [`kernel_run_ops`]: `initial` holds the devices that exist before (a
/// fresh pool: none), each as its whole content; devices are sized by
/// `devices` (unlisted ones: 0 bytes); a snapshot copies its origin
/// (zero-extended or cut to its own size); discards zero the data blocks of
/// `block_bytes` wholly inside the range. Returns every existing device.
pub fn model_ops(
    block_bytes: u64,
    devices: &[(u64, u64)],
    initial: BTreeMap<u64, Vec<u8>>,
    ops: &[KernelOp],
) -> Result<BTreeMap<u64, Vec<u8>>, VmError> {
    let sizes: BTreeMap<u64, u64> = devices.iter().copied().collect();
    let size_of = |dev: u64| -> Result<usize, VmError> {
        usize::try_from(sizes.get(&dev).copied().unwrap_or(0))
            .map_err(|_| VmError::Invalid(format!("device {dev} too big to model")))
    };
    let mut state = initial;
    for (i, op) in ops.iter().enumerate() {
        let bad = |why: &str| VmError::Invalid(format!("model: op {i} ({op:?}): {why}"));
        match *op {
            KernelOp::Create(dev) => {
                if state.insert(dev, vec![0; size_of(dev)?]).is_some() {
                    return Err(bad("device exists"));
                }
            }
            KernelOp::Snap { dev, origin } => {
                let mut bytes = state.get(&origin).ok_or_else(|| bad("no origin"))?.clone();
                bytes.resize(size_of(dev)?, 0);
                if state.insert(dev, bytes).is_some() {
                    return Err(bad("device exists"));
                }
            }
            KernelOp::Delete(dev) => {
                state.remove(&dev).ok_or_else(|| bad("no such device"))?;
            }
            KernelOp::Write {
                dev,
                offset_bytes,
                len,
            } => {
                let bytes = state.get_mut(&dev).ok_or_else(|| bad("no such device"))?;
                let (off, end) =
                    span(offset_bytes, len, bytes.len()).ok_or_else(|| bad("range"))?;
                bytes[off..end].copy_from_slice(&write_payload(i, len));
            }
            KernelOp::Discard {
                dev,
                offset_bytes,
                len,
            } => {
                let bytes = state.get_mut(&dev).ok_or_else(|| bad("no such device"))?;
                if block_bytes == 0 {
                    return Err(bad("block size 0"));
                }
                let first = offset_bytes.div_ceil(block_bytes) * block_bytes;
                let end = (offset_bytes + len) / block_bytes * block_bytes;
                if end > first {
                    let end = usize::try_from(end).unwrap_or(usize::MAX).min(bytes.len());
                    let first = usize::try_from(first).unwrap_or(usize::MAX).min(end);
                    bytes[first..end].fill(0);
                }
            }
            KernelOp::ReserveMetadataSnap
            | KernelOp::ReleaseMetadataSnap
            | KernelOp::SetTransactionId { .. } => {}
        }
    }
    Ok(state)
}

fn span(off: u64, len: u64, size: usize) -> Option<(usize, usize)> {
    let off = usize::try_from(off).ok()?;
    let end = off.checked_add(usize::try_from(len).ok()?)?;
    (end <= size).then_some((off, end))
}

/// sha256 of every device's content (for comparing a model with a run).
pub fn sha256_map(contents: &BTreeMap<u64, Vec<u8>>) -> BTreeMap<u64, String> {
    contents
        .iter()
        .map(|(dev, bytes)| (*dev, sha256_hex(bytes)))
        .collect()
}

/// SHA-256 of `bytes` as lowercase hex (FIPS 180-4; no dependencies).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finish().iter().map(|b| format!("{b:02x}")).collect()
}

/// Incremental SHA-256 (for hashing device contents piece by piece).
#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    buf: [u8; 64],
    buf_len: usize,
    total: u64,
}

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Sha256 {
            state: [
                0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                0x5be0cd19,
            ],
            buf: [0; 64],
            buf_len: 0,
            total: 0,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total = self.total.wrapping_add(data.len() as u64);
        if self.buf_len > 0 {
            let n = (64 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + n].copy_from_slice(&data[..n]);
            self.buf_len += n;
            data = &data[n..];
            if self.buf_len < 64 {
                return;
            }
            let block = self.buf;
            self.compress(&block);
            self.buf_len = 0;
        }
        let mut chunks = data.chunks_exact(64);
        for block in &mut chunks {
            self.compress(block);
        }
        let rest = chunks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    pub fn finish(mut self) -> [u8; 32] {
        // SHA-256 is big-endian by definition: bytes are assembled by shifts.
        let bits = self.total.wrapping_mul(8);
        let mut pad = vec![0x80u8];
        pad.resize((55usize.wrapping_sub(self.buf_len) % 64) + 1, 0);
        pad.extend((0..8).map(|i| (bits >> (56 - 8 * i)) as u8));
        let total = self.total;
        self.update(&pad);
        self.total = total;
        let mut out = [0u8; 32];
        for (i, word) in self.state.iter().enumerate() {
            for j in 0..4 {
                out[4 * i + j] = (word >> (24 - 8 * j)) as u8;
            }
        }
        out
    }

    fn compress(&mut self, block: &[u8]) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = (u32::from(c[0]) << 24)
                | (u32::from(c[1]) << 16)
                | (u32::from(c[2]) << 8)
                | u32::from(c[3]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = self.state;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = h
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            h = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (s, v) in self.state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *s = s.wrapping_add(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_vectors() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            sha256_hex(&vec![b'a'; 1_000_000]),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
        // incremental == one-shot, across odd split points
        let data = write_payload(3, 1000);
        for split in [0, 1, 55, 56, 63, 64, 65, 999, 1000] {
            let mut h = Sha256::new();
            h.update(&data[..split]);
            h.update(&data[split..]);
            let hex: String = h.finish().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, sha256_hex(&data), "split {split}");
        }
    }

    #[test]
    fn model_semantics() {
        let kib = 1024;
        let ops = [
            KernelOp::Create(1),
            KernelOp::Write {
                dev: 1,
                offset_bytes: 0,
                len: 192 * kib,
            },
            KernelOp::Snap { dev: 2, origin: 1 },
            KernelOp::Discard {
                dev: 1,
                offset_bytes: 32 * kib,
                len: 128 * kib,
            },
            KernelOp::ReserveMetadataSnap,
        ];
        let m = model_ops(
            64 * kib,
            &[(1, 256 * kib), (2, 128 * kib)],
            BTreeMap::new(),
            &ops,
        )
        .unwrap();
        let w = write_payload(1, 192 * kib);
        assert_eq!(m[&2], w[..128 * kib as usize]);
        // only block 1 (64..128 KiB) lies wholly inside 32..160 KiB
        let d1 = &m[&1];
        assert_eq!(d1[..64 * kib as usize], w[..64 * kib as usize]);
        assert!(d1[64 * kib as usize..128 * kib as usize]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            d1[128 * kib as usize..192 * kib as usize],
            w[128 * kib as usize..]
        );
        assert!(d1[192 * kib as usize..].iter().all(|&b| b == 0));
        assert_ne!(write_payload(0, 64), write_payload(1, 64));
    }
}
