//! Content digests of snapshots, maintained in time proportional to the change.
//!
//! The digest is a homomorphic set hash (LtHash): the volume is cut into fixed 64 KiB
//! chunks (independent of any pool's block size; the last chunk is padded with zeros);
//! each chunk that is not all zeros contributes the element `BLAKE3-XOF(derive_key(
//! "thinvol lthash v2"), index_le64 ‖ BLAKE3(chunk padded to 64 KiB))` expanded to 2048
//! bytes = 1024 u16 lanes, and the digest is the lane-wise sum mod 2^16. Zero and
//! unmapped chunks contribute nothing, so unmapped space costs nothing, and a
//! snapshot's digest follows from its base's by subtracting the old contributions of
//! the changed chunks and adding the new ones. The element depends on the content only
//! through its hash, so an old contribution can come from the pool's content-hash
//! cache ([`crate::chunk_cache`]) instead of reading the old data.
//! Digests live in `POOLDIR/digests/<snapshot uuid>.lthash` (see [`store`]/[`load`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use thinvol_engine::format::{DataBlock, ThinId};
use thinvol_engine::Pool;

use crate::chunk_cache::ChunkCache;
use crate::error::{io, Result};
use crate::format::DIGEST_LEN;

pub const CHUNK: u64 = 64 * 1024;
const LANES: usize = DIGEST_LEN / 2;
const CONTEXT: &str = "thinvol lthash v2";
/// The digest definition (docs/stream-format.md "Content digest").
pub const DIGEST_VERSION: u32 = 2;
/// Stored digests of another definition (v1: the element hashed the chunk itself) have
/// another magic and are ignored, so they are derived again.
const FILE_MAGIC: &[u8; 16] = b"thinvol-lthash2\n";

/// BLAKE3 of a chunk's content padded to 64 KiB.
pub type ChunkHash = [u8; 32];

/// The content hash of a chunk (≤ CHUNK bytes, padded with zeros).
pub fn chunk_hash(chunk: &[u8]) -> ChunkHash {
    let mut h = blake3::Hasher::new();
    h.update(chunk);
    if (chunk.len() as u64) < CHUNK {
        h.update(&ZEROS[..(CHUNK as usize) - chunk.len()]);
    }
    *h.finalize().as_bytes()
}

static ZEROS: [u8; CHUNK as usize] = [0u8; CHUNK as usize];

/// The content hash of an all-zero chunk (which contributes nothing).
pub fn zero_chunk_hash() -> &'static ChunkHash {
    static Z: OnceLock<ChunkHash> = OnceLock::new();
    Z.get_or_init(|| chunk_hash(&[]))
}

/// The content hash of a chunk, computed without hashing when it is all zeros.
pub fn chunk_hash_fast(chunk: &[u8]) -> ChunkHash {
    if is_zero(chunk) {
        *zero_chunk_hash()
    } else {
        chunk_hash(chunk)
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct LtHash(Box<[u16; LANES]>);

impl std::fmt::Debug for LtHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LtHash({})", self.short())
    }
}

impl Default for LtHash {
    fn default() -> Self {
        LtHash(Box::new([0u16; LANES]))
    }
}

/// Whether every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (words, rest) = b.split_at(b.len() / 8 * 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && rest.iter().all(|&x| x == 0)
}

impl LtHash {
    /// The lanes contributed by chunk `index` with content `chunk` (≤ CHUNK bytes,
    /// padded with zeros); None when the chunk is all zeros.
    pub fn contribution(index: u64, chunk: &[u8]) -> Option<LtHash> {
        if is_zero(chunk) {
            return None;
        }
        Self::element(index, &chunk_hash(chunk))
    }
    /// The lanes contributed by chunk `index` whose content hash is `content`; None for
    /// the all-zero chunk.
    pub fn element(index: u64, content: &ChunkHash) -> Option<LtHash> {
        if content == zero_chunk_hash() {
            return None;
        }
        let mut h = blake3::Hasher::new_derive_key(CONTEXT);
        h.update(&index.to_le_bytes());
        h.update(content);
        let mut out = [0u8; DIGEST_LEN];
        h.finalize_xof().fill(&mut out);
        let mut l = LtHash::default();
        for (i, v) in l.0.iter_mut().enumerate() {
            *v = u16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
        }
        Some(l)
    }
    pub fn add(&mut self, o: &LtHash) {
        for (a, b) in self.0.iter_mut().zip(o.0.iter()) {
            *a = a.wrapping_add(*b);
        }
    }
    pub fn sub(&mut self, o: &LtHash) {
        for (a, b) in self.0.iter_mut().zip(o.0.iter()) {
            *a = a.wrapping_sub(*b);
        }
    }
    pub fn add_chunk(&mut self, index: u64, chunk: &[u8]) {
        if let Some(c) = Self::contribution(index, chunk) {
            self.add(&c);
        }
    }
    pub fn sub_chunk(&mut self, index: u64, chunk: &[u8]) {
        if let Some(c) = Self::contribution(index, chunk) {
            self.sub(&c);
        }
    }
    /// Add (or subtract) the element of chunk `index` with content hash `content`.
    pub fn apply_hash(&mut self, index: u64, content: &ChunkHash, subtract: bool) {
        if let Some(c) = Self::element(index, content) {
            if subtract {
                self.sub(&c);
            } else {
                self.add(&c);
            }
        }
    }
    /// Add (or subtract) every chunk of `bytes`, which start at byte `offset` (a
    /// multiple of CHUNK) and end at or before `size`.
    pub fn apply_range(&mut self, offset: u64, bytes: &[u8], size: u64, subtract: bool) {
        let mut pos = 0usize;
        while pos < bytes.len() {
            let off = offset + pos as u64;
            if off >= size {
                break;
            }
            let n = (CHUNK as usize)
                .min(bytes.len() - pos)
                .min((size - off) as usize);
            let c = &bytes[pos..pos + n];
            if subtract {
                self.sub_chunk(off / CHUNK, c);
            } else {
                self.add_chunk(off / CHUNK, c);
            }
            pos += CHUNK as usize;
        }
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
    pub fn from_bytes(b: &[u8]) -> Option<LtHash> {
        if b.len() != DIGEST_LEN {
            return None;
        }
        let mut l = LtHash::default();
        for (i, v) in l.0.iter_mut().enumerate() {
            *v = u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
        }
        Some(l)
    }
    /// A short printable fingerprint: BLAKE3 of the lanes, 32 hex digits.
    pub fn short(&self) -> String {
        hex(&blake3::hash(&self.to_bytes()).as_bytes()[..16])
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn digest_path(pool_dir: &Path, uuid: &str) -> PathBuf {
    pool_dir.join("digests").join(format!("{uuid}.lthash"))
}

/// The stored digest of snapshot `uuid`, if any (a damaged file counts as none).
pub fn load(pool_dir: &Path, uuid: &str) -> Option<LtHash> {
    let b = std::fs::read(digest_path(pool_dir, uuid)).ok()?;
    if b.len() != 16 + DIGEST_LEN + 32 || &b[..16] != FILE_MAGIC {
        return None;
    }
    let body = &b[..16 + DIGEST_LEN];
    if blake3::hash(body).as_bytes() != &b[16 + DIGEST_LEN..] {
        return None;
    }
    LtHash::from_bytes(&b[16..16 + DIGEST_LEN])
}

/// Store the digest of snapshot `uuid` (atomically).
pub fn store(pool_dir: &Path, uuid: &str, d: &LtHash) -> Result<()> {
    let dir = pool_dir.join("digests");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut b = FILE_MAGIC.to_vec();
    b.extend(d.to_bytes());
    let h = blake3::hash(&b);
    b.extend_from_slice(h.as_bytes());
    thinvol_catalog::store::write_atomic(&digest_path(pool_dir, uuid), &b)?;
    Ok(())
}

fn read_block(pool: &Pool, b: DataBlock, buf: &mut [u8]) -> Result<()> {
    pool.read_data_block(b, buf)?;
    Ok(())
}

/// Add (or subtract) the chunks of data block `pb`, mapped at volume byte `off` of a
/// device of `size` bytes. With `lookup`, whole chunks whose content hash the cache
/// knows are not read (when every chunk of the block is known, nothing is read); with
/// `record`, the hashes of the whole chunks hashed are recorded in the cache.
#[allow(clippy::too_many_arguments)]
fn apply_block(
    pool: &Pool,
    cache: Option<&ChunkCache>,
    pb: DataBlock,
    off: u64,
    size: u64,
    subtract: bool,
    lookup: bool,
    buf: &mut [u8],
    d: &mut LtHash,
) -> Result<()> {
    let bs = pool.block_size();
    let phys = pb.0 * bs;
    let n = (size - off).min(bs) as usize;
    let nchunks = n.div_ceil(CHUNK as usize);
    let full = n / CHUNK as usize;
    let first = off / CHUNK;
    if lookup && full == nchunks {
        if let Some(c) = cache {
            let known = c.get_run(phys, full);
            if known.iter().all(Option::is_some) {
                for (k, h) in known.iter().enumerate() {
                    if let Some(h) = h {
                        d.apply_hash(first + k as u64, h, subtract);
                    }
                }
                return Ok(());
            }
        }
    }
    read_block(pool, pb, buf)?;
    let mut hashes = Vec::with_capacity(full);
    for k in 0..nchunks {
        let c = &buf[k * CHUNK as usize..((k + 1) * CHUNK as usize).min(n)];
        let h = chunk_hash_fast(c);
        d.apply_hash(first + k as u64, &h, subtract);
        if k < full {
            hashes.push(h);
        }
    }
    if let Some(c) = cache.filter(|c| c.writable()) {
        c.put_run(phys, &hashes)?;
    }
    Ok(())
}

/// Digest of a thin device's first `size` bytes, from scratch (reads every mapped
/// block).
pub fn full_pool(pool: &Pool, thin: u64, size: u64) -> Result<LtHash> {
    full_pool_cached(pool, None, thin, size)
}

/// [`full_pool`], recording the content hashes in `cache` (when writable).
pub fn full_pool_cached(
    pool: &Pool,
    cache: Option<&ChunkCache>,
    thin: u64,
    size: u64,
) -> Result<LtHash> {
    let bs = pool.block_size();
    let mut d = LtHash::default();
    let mut buf = vec![0u8; bs as usize];
    for (vb, pb) in pool.mappings_range(ThinId(thin), 0, size.div_ceil(bs))? {
        let off = vb.0 * bs;
        if off >= size {
            break;
        }
        apply_block(pool, cache, pb, off, size, false, false, &mut buf, &mut d)?;
    }
    Ok(d)
}

/// Digest of device `new` from the digest of device `base`, reading only the blocks
/// whose mapping differs (the engine delta) plus those in the size change.
pub fn update_pool(pool: &Pool, base: (u64, u64, &LtHash), new: (u64, u64)) -> Result<LtHash> {
    update_pool_cached(pool, None, base, new)
}

/// [`update_pool`] with the content-hash cache: the base's old chunks come from the
/// cache where it knows them (`base` must be a digest-bearing snapshot, invariant C of
/// docs/design.md §13.5), and the new chunks' hashes are recorded.
pub fn update_pool_cached(
    pool: &Pool,
    cache: Option<&ChunkCache>,
    base: (u64, u64, &LtHash),
    new: (u64, u64),
) -> Result<LtHash> {
    let (bthin, bsize, bdigest) = base;
    let (nthin, nsize) = new;
    let bs = pool.block_size();
    let (deltas, _) = pool.delta(ThinId(bthin), ThinId(nthin), false)?;
    let mut changed: BTreeSet<u64> = deltas.iter().map(|d| d.vblock).collect();
    if bsize != nsize {
        let lo = bsize.min(nsize) / bs;
        let hi = bsize.max(nsize).div_ceil(bs);
        for t in [bthin, nthin] {
            for (vb, _) in pool.mappings_range(ThinId(t), lo, hi)? {
                changed.insert(vb.0);
            }
        }
    }
    let mut d = bdigest.clone();
    let mut buf = vec![0u8; bs as usize];
    for vb in changed {
        let off = vb * bs;
        for (t, size, sub) in [(bthin, bsize, true), (nthin, nsize, false)] {
            if off >= size {
                continue;
            }
            if let Some((_, pb)) = pool.mappings_range(ThinId(t), vb, vb + 1)?.first() {
                apply_block(pool, cache, *pb, off, size, sub, sub, &mut buf, &mut d)?;
            }
        }
    }
    Ok(d)
}

/// The digest of a catalog snapshot: stored, else derived from the nearest older
/// snapshot of the same volume that has one (cost ∝ delta; old chunks from the
/// content-hash cache), else from scratch; stored afterwards when the content hashes
/// it read could be recorded (invariant C, docs/design.md §13.5).
pub fn snapshot_digest(
    pool: &Pool,
    pool_dir: &Path,
    vol: &thinvol_catalog::Volume,
    snap: &thinvol_catalog::Snapshot,
) -> Result<LtHash> {
    if let Some(d) = load(pool_dir, &snap.uuid) {
        return Ok(d);
    }
    let mut older: Vec<&thinvol_catalog::Snapshot> = vol
        .snapshots
        .values()
        .filter(|s| (s.created, s.thin_id) < (snap.created, snap.thin_id))
        .collect();
    older.sort_by_key(|s| std::cmp::Reverse((s.created, s.thin_id)));
    // A read-only pool only looks up; it does not store (the next run derives again).
    let cache = if pool.is_read_only() {
        ChunkCache::open_read_only(pool_dir)
    } else {
        ChunkCache::open(pool_dir).ok()
    };
    let cache = cache.as_ref();
    let d = match older
        .iter()
        .find_map(|s| load(pool_dir, &s.uuid).map(|d| (*s, d)))
    {
        Some((b, bd)) => update_pool_cached(
            pool,
            cache,
            (b.thin_id, b.size, &bd),
            (snap.thin_id, snap.size),
        )?,
        None => full_pool_cached(pool, cache, snap.thin_id, snap.size)?,
    };
    if let Some(c) = cache.filter(|c| c.writable()) {
        // Best effort: without the records synced the digest is not stored, and the
        // next run derives it again.
        if c.sync().is_ok() {
            let _ = store(pool_dir, &snap.uuid, &d);
        }
    }
    Ok(d)
}

/// Per-chunk hashes of non-zero chunks (for `verify --full`): (chunk index, BLAKE3).
pub type ChunkHashes = Vec<(u64, [u8; 32])>;

/// Chunk hashes and the from-scratch LtHash of a thin device's first `size` bytes.
pub fn pool_chunk_hashes(pool: &Pool, thin: u64, size: u64) -> Result<(ChunkHashes, LtHash)> {
    let bs = pool.block_size();
    let mut out = Vec::new();
    let mut d = LtHash::default();
    let mut buf = vec![0u8; bs as usize];
    for (vb, pb) in pool.mappings_range(ThinId(thin), 0, size.div_ceil(bs))? {
        let off = vb.0 * bs;
        if off >= size {
            break;
        }
        read_block(pool, pb, &mut buf)?;
        let n = ((size - off).min(bs)) as usize;
        chunks_of(off, &buf[..n], &mut out, &mut d);
    }
    Ok((out, d))
}

fn chunks_of(off: u64, bytes: &[u8], out: &mut ChunkHashes, d: &mut LtHash) {
    for (i, c) in bytes.chunks(CHUNK as usize).enumerate() {
        if is_zero(c) {
            continue;
        }
        let idx = off / CHUNK + i as u64;
        let h = chunk_hash(c);
        out.push((idx, h));
        d.apply_hash(idx, &h, false);
    }
}

/// Chunk hashes and LtHash of the first `size` bytes of a file or block device.
pub fn file_chunk_hashes(path: &Path, size: u64) -> Result<(ChunkHashes, LtHash)> {
    let f = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut out = Vec::new();
    let mut d = LtHash::default();
    let step = 16 * CHUNK;
    let mut buf = vec![0u8; step as usize];
    let mut off = 0u64;
    while off < size {
        let n = step.min(size - off) as usize;
        read_full_at(&f, &mut buf[..n], off).map_err(io(format!("reading {}", path.display())))?;
        chunks_of(off, &buf[..n], &mut out, &mut d);
        off += n as u64;
    }
    Ok((out, d))
}

/// Read exactly `buf.len()` bytes at `off`; bytes past the end of the file read as 0.
pub fn read_full_at(f: &std::fs::File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

/// Ranges (byte offset, length) where two chunk hash lists differ.
pub fn differing_ranges(a: &ChunkHashes, b: &ChunkHashes) -> Vec<(u64, u64)> {
    let ma: std::collections::BTreeMap<u64, [u8; 32]> = a.iter().copied().collect();
    let mb: std::collections::BTreeMap<u64, [u8; 32]> = b.iter().copied().collect();
    let keys: BTreeSet<u64> = ma.keys().chain(mb.keys()).copied().collect();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for k in keys {
        if ma.get(&k) == mb.get(&k) {
            continue;
        }
        let off = k * CHUNK;
        match out.last_mut() {
            Some((o, l)) if *o + *l == off => *l += CHUNK,
            _ => out.push((off, CHUNK)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homomorphic_update_equals_full() {
        let mut a = LtHash::default();
        a.add_chunk(0, &[1u8; 100]);
        a.add_chunk(5, &[2u8; 100]);
        a.add_chunk(7, &[0u8; 100]);
        // Change chunk 5, drop chunk 0, add chunk 9.
        let mut b = a.clone();
        b.sub_chunk(5, &[2u8; 100]);
        b.add_chunk(5, &[3u8; 100]);
        b.sub_chunk(0, &[1u8; 100]);
        b.add_chunk(9, &[4u8; 10]);
        let mut full = LtHash::default();
        full.add_chunk(9, &[4u8; 10]);
        full.add_chunk(5, &[3u8; 100]);
        assert_eq!(b, full);
        assert_ne!(a, b);
        assert_eq!(LtHash::from_bytes(&b.to_bytes()).unwrap(), b);
    }

    #[test]
    fn position_matters_and_zero_is_nothing() {
        let mut a = LtHash::default();
        a.add_chunk(1, &[1u8; 10]);
        let mut b = LtHash::default();
        b.add_chunk(2, &[1u8; 10]);
        assert_ne!(a, b);
        assert!(LtHash::contribution(3, &[0u8; 65536]).is_none());
        assert!(is_zero(&[0u8; 13]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
        assert!(!is_zero(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    }
}
