//! Receiving into a raw image file or block device.
//!
//! `PATH.thinvol-state.json` (for a block device: in `STATE_DIR/targets/`, see
//! [`state_path`]) records which snapshot the file holds (uuid, name, size,
//! content digest); incrementals must start from it. `PATH.thinvol-journal` is an undo
//! journal: before a range of the file changes, its old contents (the data segments,
//! then the range itself as "was zero elsewhere") are appended with a crc32c each and
//! fsynced. When the END record verified, a COMPLETE entry carrying the new state is
//! appended, then the state file is replaced and the journal deleted. `--recover`
//! finishes a journal that has COMPLETE, and otherwise undoes it entry by entry in
//! reverse order, so the file is at the old snapshot or the new one.
//!
//! Journal: magic "TVJRNL01", then entries `kind u8 | offset u64 | len u64 | dlen u32 |
//! data[dlen] | crc32c u32` (crc over the entry before it). Kinds: 1 OLD_SIZE (len =
//! old file size), 2 OLD_BYTES (data = old bytes at offset), 3 ZEROED (the range read
//! as zero before, except for the OLD_BYTES entries just before it), 4 COMPLETE (data =
//! the new state JSON). A torn last entry fails its crc and is ignored: the file was
//! not touched for it (the journal is fsynced before every file write).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{hex, read_full_at, unhex, LtHash, CHUNK};
use crate::error::{io, Result, StreamError};
use crate::format::{Body, BEGIN_FLAG_GROUP};
use crate::reader::{ReadError, StreamReader};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileState {
    pub volume: String,
    pub volume_uuid: String,
    pub snapshot: String,
    pub snapshot_uuid: String,
    pub size: u64,
    /// LtHash, hex.
    pub digest: String,
    /// The digest definition `digest` follows (absent in files of thinvol before v2: 1).
    #[serde(default = "v1")]
    pub digest_version: u32,
}

fn v1() -> u32 {
    1
}

impl FileState {
    pub fn lthash(&self) -> Option<LtHash> {
        unhex(&self.digest).and_then(|b| LtHash::from_bytes(&b))
    }
    /// The digest of the file's snapshot in the current definition: the recorded one,
    /// or, when it follows an older definition, recomputed from the file `path`.
    pub fn current_lthash(&self, path: &Path) -> Result<LtHash> {
        if self.digest_version == crate::digest::DIGEST_VERSION {
            self.lthash()
                .ok_or_else(|| StreamError::Other("bad digest in the state file".into()))
        } else {
            Ok(crate::digest::file_chunk_hashes(path, self.size)?.1)
        }
    }
}

/// The directory holding the sidecar files of block-device targets.
pub fn device_sidecar_dir() -> PathBuf {
    thinvol_catalog::home::state_dir().join("targets")
}

/// What the sidecar names are built from. A regular file keeps its sidecars beside it.
/// A block device cannot: device nodes live on a tmpfs that is emptied at every boot,
/// and /dev is no place for state. Its sidecars live in [`device_sidecar_dir`], named
/// after the device path as given (made absolute, symlinks *not* resolved, so a stable
/// name such as /dev/disk/by-id/... or /dev/VG/LV keys the state, not a /dev/sdX that
/// may name another disk after a reboot), with `%` and `/` percent-escaped.
fn sidecar_base(p: &Path) -> PathBuf {
    let is_dev = std::fs::metadata(p)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if !is_dev {
        return p.to_path_buf();
    }
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut name = String::new();
    for c in abs.to_string_lossy().chars() {
        match c {
            '%' => name.push_str("%25"),
            '/' => name.push_str("%2F"),
            c => name.push(c),
        }
    }
    device_sidecar_dir().join(name)
}

/// `PATH.thinvol-state.json` (for a block device, in [`device_sidecar_dir`]).
pub fn state_path(p: &Path) -> PathBuf {
    let mut s = sidecar_base(p).into_os_string();
    s.push(".thinvol-state.json");
    PathBuf::from(s)
}

/// `PATH.thinvol-journal` (for a block device, in [`device_sidecar_dir`]).
pub fn journal_path(p: &Path) -> PathBuf {
    let mut s = sidecar_base(p).into_os_string();
    s.push(".thinvol-journal");
    PathBuf::from(s)
}

pub fn load_state(p: &Path) -> Result<Option<FileState>> {
    let sp = state_path(p);
    match std::fs::read(&sp) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| StreamError::Other(format!("{}: {e}", sp.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", sp.display()))(e)),
    }
}

const J_MAGIC: &[u8; 8] = b"TVJRNL01";
const J_OLD_SIZE: u8 = 1;
const J_OLD_BYTES: u8 = 2;
const J_ZEROED: u8 = 3;
const J_COMPLETE: u8 = 4;

struct Journal {
    f: File,
}

impl Journal {
    fn create(p: &Path) -> Result<Journal> {
        let jp = journal_path(p);
        if let Some(d) = jp.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let mut f = File::options()
            .create_new(true)
            .write(true)
            .open(&jp)
            .map_err(io(format!("creating {}", jp.display())))?;
        f.write_all(J_MAGIC).map_err(io("writing the journal"))?;
        Ok(Journal { f })
    }
    fn entry(&mut self, kind: u8, off: u64, len: u64, data: &[u8]) -> Result<()> {
        let mut e = Vec::with_capacity(25 + data.len() + 4);
        e.push(kind);
        e.extend_from_slice(&off.to_le_bytes());
        e.extend_from_slice(&len.to_le_bytes());
        e.extend_from_slice(&(data.len() as u32).to_le_bytes());
        e.extend_from_slice(data);
        let c = crc32c::crc32c(&e);
        e.extend_from_slice(&c.to_le_bytes());
        self.f.write_all(&e).map_err(io("writing the journal"))
    }
    fn sync(&mut self) -> Result<()> {
        self.f.sync_data().map_err(io("syncing the journal"))
    }
}

struct Entry {
    kind: u8,
    off: u64,
    len: u64,
    data: Vec<u8>,
}

fn read_journal(p: &Path) -> Result<Vec<Entry>> {
    let jp = journal_path(p);
    let mut b = Vec::new();
    File::open(&jp)
        .and_then(|mut f| f.read_to_end(&mut b))
        .map_err(io(format!("reading {}", jp.display())))?;
    if b.len() < 8 || &b[..8] != J_MAGIC {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut pos = 8usize;
    while pos + 25 <= b.len() {
        let kind = b[pos];
        let rd = |a: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[a..a + 8]);
            u64::from_le_bytes(x)
        };
        let off = rd(pos + 1);
        let len = rd(pos + 9);
        let dlen =
            u32::from_le_bytes([b[pos + 17], b[pos + 18], b[pos + 19], b[pos + 20]]) as usize;
        let end = pos + 21 + dlen;
        if end + 4 > b.len() {
            break;
        }
        let c = u32::from_le_bytes([b[end], b[end + 1], b[end + 2], b[end + 3]]);
        if crc32c::crc32c(&b[pos..end]) != c {
            break;
        }
        out.push(Entry {
            kind,
            off,
            len,
            data: b[pos + 21..end].to_vec(),
        });
        pos = end + 4;
    }
    Ok(out)
}

fn is_blockdev(f: &File) -> bool {
    f.metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Make `[off, off+len)` read as zeros: punch a hole, else write zeros.
fn zero_range(f: &File, off: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a valid descriptor with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let z = vec![0u8; (1 << 20).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (z.len() as u64).min(len - done) as usize;
        f.write_all_at(&z[..n], off + done)
            .map_err(io("writing zeros"))?;
        done += n as u64;
    }
    Ok(())
}

/// Data segments of `[off, off+len)` (SEEK_DATA/SEEK_HOLE; the whole range if the
/// file system cannot tell).
fn data_segments(f: &File, off: u64, len: u64, fsize: u64) -> Vec<(u64, u64)> {
    let end = (off + len).min(fsize);
    if off >= end {
        return Vec::new();
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end {
        // SAFETY: lseek on a valid descriptor.
        let d = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return vec![(off, end - off)];
        }
        let d = d as u64;
        if d >= end {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d as libc::off_t, libc::SEEK_HOLE) };
        let h = if h < 0 { end } else { (h as u64).min(end) };
        out.push((d, h - d));
        pos = h;
    }
    out
}

struct Target {
    f: File,
    path: PathBuf,
    blockdev: bool,
    /// Logical size (the volume size the file currently represents).
    size: u64,
    j: Journal,
    digest: LtHash,
}

impl Target {
    fn fsize(&self) -> u64 {
        if self.blockdev {
            self.size
        } else {
            self.f.metadata().map(|m| m.len()).unwrap_or(self.size)
        }
    }

    /// Journal the old contents of `[off, off+len)` and subtract the digest of the
    /// chunks it touches.
    fn before(&mut self, off: u64, len: u64) -> Result<(u64, u64)> {
        let fsize = self.fsize();
        let mut segs = data_segments(&self.f, off, len, fsize);
        for (o, l) in &segs {
            let mut done = 0;
            while done < *l {
                let n = (1u64 << 20).min(l - done);
                let mut b = vec![0u8; n as usize];
                read_full_at(&self.f, &mut b, o + done).map_err(io("reading the file"))?;
                self.j.entry(J_OLD_BYTES, o + done, n, &b)?;
                done += n;
            }
        }
        self.j.entry(J_ZEROED, off, len, &[])?;
        self.j.sync()?;
        // Digest over the chunk-aligned span, old contents.
        let lo = off / CHUNK * CHUNK;
        let hi = (off + len).div_ceil(CHUNK) * CHUNK;
        segs = data_segments(&self.f, lo, hi - lo, fsize);
        self.digest_segments(&segs, true)?;
        Ok((lo, hi))
    }

    fn after(&mut self, lo: u64, hi: u64) -> Result<()> {
        let segs = data_segments(&self.f, lo, hi - lo, self.fsize());
        self.digest_segments(&segs, false)
    }

    fn digest_segments(&mut self, segs: &[(u64, u64)], subtract: bool) -> Result<()> {
        // Whole chunks covering the segments, each once.
        let mut last_chunk: Option<u64> = None;
        for &(o, l) in segs {
            let mut c = o / CHUNK;
            while c * CHUNK < o + l {
                if last_chunk != Some(c) && c * CHUNK < self.size {
                    let mut b = vec![0u8; CHUNK as usize];
                    read_full_at(&self.f, &mut b, c * CHUNK).map_err(io("reading the file"))?;
                    let n = (self.size - c * CHUNK).min(CHUNK) as usize;
                    if subtract {
                        self.digest.sub_chunk(c, &b[..n]);
                    } else {
                        self.digest.add_chunk(c, &b[..n]);
                    }
                    last_chunk = Some(c);
                }
                c += 1;
            }
        }
        Ok(())
    }

    fn resize(&mut self, new: u64) -> Result<()> {
        let old = self.size;
        if new == old {
            return Ok(());
        }
        if self.blockdev {
            let cap = block_size_of(&self.f)?;
            if new > cap {
                return Err(StreamError::Refused(format!(
                    "{} holds {cap} bytes; the volume needs {new}",
                    self.path.display()
                )));
            }
        }
        if new < old {
            // Everything beyond the new end goes: journal it, then cut.
            let (lo, hi) = self.before(new, old - new)?;
            if self.blockdev {
                zero_range(&self.f, new, old - new)?;
            } else {
                self.f.set_len(new).map_err(io("truncating the file"))?;
            }
            self.size = new;
            self.after(lo, hi.min(new.div_ceil(CHUNK) * CHUNK))?;
        } else {
            if !self.blockdev {
                self.f.set_len(new).map_err(io("extending the file"))?;
            }
            self.size = new;
        }
        Ok(())
    }
}

fn block_size_of(f: &File) -> Result<u64> {
    let mut f2 = f.try_clone().map_err(io("file"))?;
    let n =
        std::io::Seek::seek(&mut f2, std::io::SeekFrom::End(0)).map_err(io("sizing the device"))?;
    Ok(n)
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FileSummary {
    pub snapshot: String,
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub unmap_bytes: u64,
}

fn fmt_read(e: ReadError) -> StreamError {
    match e {
        ReadError::Format(f) => StreamError::Format(f),
        ReadError::Io(e) => io("reading the stream")(e),
    }
}

/// Apply a stream to a raw file or block device (see the module comment).
pub fn receive_file(path: &Path, input: Box<dyn Read + '_>, force: bool) -> Result<FileSummary> {
    let abs = std::path::absolute(path).map_err(io(format!("resolving {}", path.display())))?;
    let path = abs.as_path();
    if journal_path(path).exists() {
        return Err(StreamError::Refused(format!(
            "{} has an interrupted apply; run 'thinvol receive --to-file {} --recover' first",
            path.display(),
            path.display()
        )));
    }
    let state = load_state(path)?;
    let mut rd = StreamReader::new(input).map_err(fmt_read)?;
    let begin = match rd.next_record().map_err(fmt_read)? {
        Some((r, _)) if r.seq == 0 => match r.body {
            Body::Begin(b) => b,
            _ => {
                return Err(StreamError::Corrupt(
                    "the stream does not start with BEGIN".into(),
                ))
            }
        },
        _ => {
            return Err(StreamError::Corrupt(
                "the stream does not start with BEGIN".into(),
            ))
        }
    };
    if begin.flags & BEGIN_FLAG_GROUP != 0 {
        return Err(StreamError::Refused(
            "a group stream carries several volumes; receive it into a pool".into(),
        ));
    }
    // Read the first PART before touching the file, to check the base.
    let mut expected = 1u64;
    let first = loop {
        let (r, _) = rd
            .next_record()
            .map_err(fmt_read)?
            .ok_or_else(|| StreamError::Corrupt("the stream ended before its first PART".into()))?;
        if r.seq != expected {
            return Err(StreamError::Corrupt(format!(
                "record {} where {expected} was expected",
                r.seq
            )));
        }
        expected += 1;
        match r.body {
            Body::Part(p) => break p,
            Body::Info(_) | Body::Skipped { .. } => {}
            _ => return Err(StreamError::Corrupt("expected PART".into())),
        }
    };
    let exists = std::fs::metadata(path).is_ok();
    let (start_digest, start_size) = if first.is_full() {
        if state.is_some() && !force {
            return Err(StreamError::Refused(format!(
                "{} already holds {}; a full stream replaces it only with --force",
                path.display(),
                state
                    .as_ref()
                    .map_or(String::new(), |s| format!("{}@{}", s.volume, s.snapshot))
            )));
        }
        (LtHash::default(), 0)
    } else {
        let s = state.as_ref().ok_or_else(|| {
            StreamError::Refused(format!(
                "{} has no {} recording its snapshot; an incremental stream needs the file to hold @{}",
                path.display(),
                state_path(path).display(),
                first.base
            ))
        })?;
        if s.snapshot_uuid != first.base_uuid {
            return Err(StreamError::Refused(format!(
                "{} holds @{} ({}); the stream's base is @{} ({})",
                path.display(),
                s.snapshot,
                s.snapshot_uuid,
                first.base,
                first.base_uuid
            )));
        }
        (s.current_lthash(path)?, s.size)
    };
    let f = File::options()
        .read(true)
        .write(true)
        .create(!exists)
        .truncate(false)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    let blockdev = is_blockdev(&f);
    let mut j = Journal::create(path)?;
    let old_size = if blockdev {
        start_size
    } else {
        f.metadata().map_err(io("stat"))?.len()
    };
    j.entry(J_OLD_SIZE, 0, old_size, &[])?;
    j.sync()?;
    let mut t = Target {
        f,
        path: path.to_path_buf(),
        blockdev,
        size: start_size,
        j,
        digest: start_digest,
    };
    if first.is_full() && !blockdev && old_size > 0 {
        // Replacing with --force: the old contents are not kept (documented).
        t.f.set_len(0).map_err(io("truncating the file"))?;
    }
    if first.is_full() {
        t.size = 0;
    }
    let r = apply_all(&mut t, &mut rd, first, expected);
    match r {
        Ok((sum, new_state)) => {
            t.f.sync_all().map_err(io("syncing the file"))?;
            let js = serde_json::to_vec_pretty(&new_state)
                .map_err(|e| StreamError::Other(e.to_string()))?;
            t.j.entry(J_COMPLETE, 0, 0, &js)?;
            t.j.sync()?;
            finish(path, &js)?;
            Ok(sum)
        }
        Err(e) => {
            drop(t);
            let rolled = recover(path);
            Err(match rolled {
                Ok(_) => e,
                Err(r) => {
                    StreamError::Other(format!("{e}; rolling back failed too: {r} (run --recover)"))
                }
            })
        }
    }
}

fn finish(path: &Path, state_json: &[u8]) -> Result<()> {
    thinvol_catalog::store::write_atomic(&state_path(path), state_json)?;
    let jp = journal_path(path);
    std::fs::remove_file(&jp).map_err(io(format!("removing {}", jp.display())))?;
    if let Some(d) = jp.parent() {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        thinvol_catalog::store::sync_dir(d)?;
    }
    Ok(())
}

fn apply_all(
    t: &mut Target,
    rd: &mut StreamReader<'_>,
    first: crate::format::Part,
    mut expected: u64,
) -> Result<(FileSummary, FileState)> {
    let mut sum = FileSummary::default();
    let mut part = Some(first);
    let mut parts = Vec::new();
    let mut counts = (0u64, 0u64, 0u64, 1u64);
    let mut end_pos = 0u64;
    let mut last_state: Option<FileState> = None;
    if let Some(p) = &part {
        t.resize(p.volume_size)?;
        parts.push(p.clone());
    }
    loop {
        let (r, _) = rd
            .next_record()
            .map_err(fmt_read)?
            .ok_or_else(|| StreamError::Corrupt("the stream ended before END".into()))?;
        if r.seq != expected {
            return Err(StreamError::Corrupt(format!(
                "record {} where {expected} was expected",
                r.seq
            )));
        }
        expected += 1;
        sum.records += 1;
        let check = |p: &Option<crate::format::Part>,
                     idx: u32,
                     off: u64,
                     len: u64,
                     end_pos: u64|
         -> Result<()> {
            match p {
                Some(p)
                    if p.index == idx
                        && off >= end_pos
                        && off.checked_add(len).is_some_and(|e| e <= p.volume_size) =>
                {
                    Ok(())
                }
                _ => Err(StreamError::Corrupt(format!(
                    "record {} range {off}+{len} does not fit the open part",
                    r.seq
                ))),
            }
        };
        match r.body {
            Body::Part(p) => {
                let prev = last_state
                    .as_ref()
                    .ok_or_else(|| StreamError::Corrupt("PART inside a part".into()))?;
                if part.is_some()
                    || p.base_uuid != prev.snapshot_uuid
                    || p.index as usize != parts.len()
                {
                    return Err(StreamError::Corrupt(
                        "PART does not follow the previous part".into(),
                    ));
                }
                t.resize(p.volume_size)?;
                parts.push(p.clone());
                part = Some(p);
                counts = (0, 0, 0, 1);
                end_pos = 0;
            }
            Body::Data {
                part: idx,
                offset,
                data,
            } => {
                let n = data.len() as u64;
                check(&part, idx, offset, n, end_pos)?;
                let (lo, hi) = t.before(offset, n)?;
                t.f.write_all_at(&data, offset)
                    .map_err(io("writing the file"))?;
                t.after(lo, hi)?;
                counts.0 += n;
                counts.3 += 1;
                sum.data_bytes += n;
                end_pos = offset + n;
            }
            Body::Zero {
                part: idx,
                offset,
                len,
            }
            | Body::Unmap {
                part: idx,
                offset,
                len,
            } => {
                let zero = matches!(r.body, Body::Zero { .. });
                check(&part, idx, offset, len, end_pos)?;
                let (lo, hi) = t.before(offset, len)?;
                zero_range(&t.f, offset, len)?;
                t.after(lo, hi)?;
                if zero {
                    counts.1 += len;
                    sum.zero_bytes += len;
                } else {
                    counts.2 += len;
                    sum.unmap_bytes += len;
                }
                counts.3 += 1;
                end_pos = offset + len;
            }
            Body::PartEnd(e) => {
                let p = part
                    .take()
                    .filter(|p| p.index == e.index)
                    .ok_or_else(|| StreamError::Corrupt("PART_END without its PART".into()))?;
                let got = (counts.0, counts.1, counts.2, counts.3 + 1);
                let want = (e.data_bytes, e.zero_bytes, e.unmap_bytes, e.nr_records);
                if got != want {
                    return Err(StreamError::Corrupt(format!(
                        "part {} totals (data, zero, unmap, records) received {got:?}, stream says {want:?}",
                        e.index
                    )));
                }
                let theirs = LtHash::from_bytes(&e.digest)
                    .ok_or_else(|| StreamError::Corrupt("bad digest length".into()))?;
                if theirs != t.digest {
                    return Err(StreamError::Corrupt(format!(
                        "content digest of {}@{} mismatch: received content {}, source {}",
                        p.volume,
                        p.snapshot,
                        t.digest.short(),
                        theirs.short()
                    )));
                }
                sum.snapshot = format!("{}@{}", p.volume, p.snapshot);
                last_state = Some(FileState {
                    volume: p.volume.clone(),
                    volume_uuid: p.volume_uuid.clone(),
                    snapshot: p.snapshot.clone(),
                    snapshot_uuid: p.snapshot_uuid.clone(),
                    size: p.volume_size,
                    digest: hex(&t.digest.to_bytes()),
                    digest_version: crate::digest::DIGEST_VERSION,
                });
            }
            Body::End(e) => {
                if part.is_some() || e.nr_records != expected || parts.is_empty() {
                    return Err(StreamError::Corrupt(
                        "END before the last part ended".into(),
                    ));
                }
                let st = last_state.ok_or_else(|| StreamError::Corrupt("no part".into()))?;
                return Ok((sum, st));
            }
            Body::Info(_) | Body::Skipped { .. } => {}
            Body::Begin(_) => return Err(StreamError::Corrupt("a second BEGIN".into())),
        }
    }
}

/// What `--recover` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovered {
    Nothing,
    /// The apply had verified: the state now names the new snapshot.
    Finished,
    /// The file is back at the old snapshot.
    RolledBack,
}

/// Finish or undo an interrupted apply.
pub fn recover(path: &Path) -> Result<Recovered> {
    let abs = std::path::absolute(path).map_err(io(format!("resolving {}", path.display())))?;
    let path = abs.as_path();
    let jp = journal_path(path);
    if !jp.exists() {
        return Ok(Recovered::Nothing);
    }
    let entries = read_journal(path)?;
    if let Some(c) = entries.iter().find(|e| e.kind == J_COMPLETE) {
        finish(path, &c.data)?;
        return Ok(Recovered::Finished);
    }
    if let Ok(f) = File::options().read(true).write(true).open(path) {
        let blockdev = is_blockdev(&f);
        for e in entries.iter().rev() {
            match e.kind {
                J_OLD_BYTES => f
                    .write_all_at(&e.data, e.off)
                    .map_err(io("restoring old bytes"))?,
                J_ZEROED => zero_range(&f, e.off, e.len)?,
                J_OLD_SIZE if !blockdev => f.set_len(e.len).map_err(io("restoring the size"))?,
                _ => {}
            }
        }
        f.sync_all().map_err(io("syncing the file"))?;
    }
    std::fs::remove_file(&jp).map_err(io(format!("removing {}", jp.display())))?;
    Ok(Recovered::RolledBack)
}
