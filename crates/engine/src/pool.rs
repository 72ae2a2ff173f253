//! The public pool: thin device management, byte-addressed data I/O and the commit
//! schedule.
//!
//! Locking (outermost first):
//! 1. a pool-wide I/O gate: writes and discards hold it shared; snapshot takes it
//!    exclusively (O(1)), so a snapshot contains exactly the writes completed before
//!    it; delete and `transaction` take it exclusively *and* every stripe (below), so
//!    they also wait for in-flight reads (a read must never see its block freed and
//!    reused by another device). Sharded per thread, so concurrent writers do not
//!    contend on one lock word. Reads do not take it.
//! 2. a striped per-(device, virtual block) RwLock (a write or discard of a block
//!    excludes reads and other writes of that block, so two writers never both
//!    provision it and a read never sees a half-written block). Each stripe also
//!    caches the mappings of a few of its blocks, in the lock's cache line (`Stripe`):
//!    a read that finds its block there takes no other lock;
//! 3. the metadata lock, held only for metadata lookups and updates — data I/O runs
//!    outside it. A reader-writer lock sharded per thread (`StateLock`): lookups
//!    answered from memory (the per-device mapping cache, cached nodes) take it
//!    shared; anything that changes metadata or must read a node from the device
//!    takes it exclusively.
//!
//! Durability: a write is durable once `flush` (or `commit`) returns. Data of a newly
//! provisioned block is written before the mapping is inserted, and every commit flushes
//! the data device before it writes metadata.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use thinvol_format::MAX_THIN_ID;
use thinvol_format::{DataBlock, DataBlockSize, MetaBlock, ThinId, VBlock, METADATA_BLOCK_SIZE};

use crate::error::{io_err, Error, Result};
use crate::metadata::{Mapped, Metadata};
use crate::storage::{FileStorage, Storage};

/// File names inside a pool directory.
pub const METADATA_FILE: &str = "metadata";
pub const DATA_FILE: &str = "data";

const STRIPES: usize = 8192;

/// Mappings cached in each stripe.
const STRIPE_ENTRIES: usize = 3;
/// Stripe cache value: bit 63 valid, bit 62 unmapped, bits 40..62 the gate's
/// generation when filled, bits 0..40 the data block.
const SC_VALID: u64 = 1 << 63;
const SC_UNMAPPED: u64 = 1 << 62;
const SC_GEN_BITS: u32 = 22;
const SC_GEN_MASK: u64 = (1 << SC_GEN_BITS) - 1;
const SC_BLOCK_MASK: u64 = (1 << 40) - 1;

/// One stripe: the lock of the blocks that hash to it and a small cache of their
/// mappings, together in one 64-byte cache line, so that a read finds lock and mapping
/// in one place (one cache miss instead of two).
///
/// The cache is exact: an entry is written only while `lock` is held exclusively — by
/// a write or discard of that block, which updates it with the mapping it makes, or by
/// a read that fills it from the metadata — and read only while `lock` is held, so a
/// reader (shared) never sees an entry change. Operations that change mappings without
/// the block's stripe (delete, `transaction`) hold every stripe and advance the gate's
/// generation, which invalidates every entry at once.
#[repr(align(64))]
struct Stripe {
    lock: RwLock<()>,
    /// Round-robin replacement cursor.
    next: AtomicU32,
    /// (key, value): key `thin id << 40 | virtual block` (ids are 24 bits, virtual
    /// blocks below 2^40), value as described at `SC_VALID`.
    entries: [(AtomicU64, AtomicU64); STRIPE_ENTRIES],
}

// Lock and entries share one cache line.
const _: () = assert!(std::mem::size_of::<Stripe>() == 64);

impl Stripe {
    fn new() -> Self {
        Stripe {
            lock: RwLock::new(()),
            next: AtomicU32::new(0),
            entries: std::array::from_fn(|_| (AtomicU64::new(0), AtomicU64::new(0))),
        }
    }

    #[inline]
    fn current(v: u64, gen: u64) -> bool {
        v & SC_VALID != 0 && (v >> 40) & SC_GEN_MASK == gen & SC_GEN_MASK
    }

    /// The cached mapping of `key` (`Some(None)`: unmapped). `lock` must be held.
    #[inline]
    fn find(&self, key: u64, gen: u64) -> Option<Option<DataBlock>> {
        for (k, v) in &self.entries {
            if k.load(Ordering::Relaxed) == key {
                let v = v.load(Ordering::Relaxed);
                if Self::current(v, gen) {
                    return Some((v & SC_UNMAPPED == 0).then_some(DataBlock(v & SC_BLOCK_MASK)));
                }
            }
        }
        None
    }

    /// Record the mapping of `key`: in its entry, else a free or outdated one, else
    /// round-robin. `lock` must be held exclusively.
    fn set(&self, key: u64, gen: u64, m: Option<DataBlock>) {
        let v = SC_VALID
            | (gen & SC_GEN_MASK) << 40
            | match m {
                Some(b) if b.0 <= SC_BLOCK_MASK => b.0,
                Some(_) => return self.forget(key),
                None => SC_UNMAPPED,
            };
        let e = &self.entries;
        let i = (0..STRIPE_ENTRIES)
            .find(|&i| e[i].0.load(Ordering::Relaxed) == key)
            .or_else(|| {
                (0..STRIPE_ENTRIES).find(|&i| !Self::current(e[i].1.load(Ordering::Relaxed), gen))
            })
            .unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed) as usize % STRIPE_ENTRIES);
        e[i].0.store(key, Ordering::Relaxed);
        e[i].1.store(v, Ordering::Relaxed);
    }

    /// Drop the entry of `key`. `lock` must be held exclusively.
    fn forget(&self, key: u64) {
        for (k, v) in &self.entries {
            if k.load(Ordering::Relaxed) == key {
                v.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Drop every entry. `lock` must be held exclusively.
    fn clear(&self) {
        for (_, v) in &self.entries {
            v.store(0, Ordering::Relaxed);
        }
    }
}

/// Stripe cache key of a block; None for ids that do not fit (never valid devices).
#[inline]
fn stripe_key(id: ThinId, vb: u64) -> Option<u64> {
    (id.0 <= MAX_THIN_ID && vb <= SC_BLOCK_MASK).then_some(id.0 << 40 | vb)
}

/// Shards of the I/O gate.
const GATE_SHARDS: usize = 16;

/// One shard of the I/O gate, alone in its cache lines.
#[repr(align(128))]
struct GateShard(RwLock<()>);

/// The pool-wide I/O gate and the block stripes (see the module doc). A writer takes
/// only its thread's gate shard, so concurrent writers do not bounce one lock word
/// between CPUs; exclusive use locks every shard, in order.
struct IoGate {
    shards: Box<[GateShard]>,
    stripes: Box<[Stripe]>,
    /// Advanced by every exclusive `write` (which may change any mapping); stripe
    /// cache entries of older generations are invalid. Read and changed only with a
    /// stripe lock held (readers) or all of them (`write`).
    generation: AtomicU64,
}

/// The gate held exclusively: every shard, and for `write` every stripe too.
struct IoGateWrite<'a> {
    _shards: Vec<RwLockWriteGuard<'a, ()>>,
    _stripes: Vec<RwLockWriteGuard<'a, ()>>,
}

static NEXT_GATE_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard of the gate and of the metadata lock, handed out
    /// round-robin.
    static GATE_SHARD: usize = NEXT_GATE_SHARD.fetch_add(1, Ordering::Relaxed) % GATE_SHARDS;
}

/// Shards of the metadata lock.
const STATE_SHARDS: usize = 8;

/// The metadata lock: a reader-writer lock whose readers lock only their thread's
/// shard, so that lookups on different CPUs (every read does one) do not bounce one
/// lock word between them; a writer locks every shard, in order. Writers are rare on
/// the read path and infrequent on the write path (provisioning, commit).
struct StateLock<T> {
    shards: [GateShard; STATE_SHARDS],
    data: UnsafeCell<T>,
}

// SAFETY: `data` is reached only through the guards below: shared references while
// one shard is read-locked, the mutable reference while every shard is write-locked,
// so a mutable reference never coexists with any other reference (the usual RwLock
// argument, with "locked" meaning "all shards" for writers). Hence the same bounds as
// `RwLock<T>`.
unsafe impl<T: Send> Send for StateLock<T> {}
unsafe impl<T: Send + Sync> Sync for StateLock<T> {}

struct StateRead<'a, T> {
    _shard: RwLockReadGuard<'a, ()>,
    data: &'a T,
}

struct StateWrite<'a, T> {
    _shards: [RwLockWriteGuard<'a, ()>; STATE_SHARDS],
    data: &'a mut T,
}

impl<T> StateLock<T> {
    fn new(v: T) -> Self {
        StateLock {
            shards: std::array::from_fn(|_| GateShard(RwLock::new(()))),
            data: UnsafeCell::new(v),
        }
    }

    #[inline]
    fn read(&self) -> StateRead<'_, T> {
        let i = GATE_SHARD.with(|s| *s) % STATE_SHARDS;
        let shard = self.shards[i].0.read();
        // SAFETY: a shard is read-locked for the guard's lifetime, so no writer (which
        // needs every shard) holds the mutable reference; see the `Sync` impl.
        let data = unsafe { &*self.data.get() };
        StateRead {
            _shard: shard,
            data,
        }
    }

    fn write(&self) -> StateWrite<'_, T> {
        let shards = std::array::from_fn(|i| self.shards[i].0.write());
        // SAFETY: every shard is write-locked for the guard's lifetime: no reader and
        // no other writer holds a reference; see the `Sync` impl.
        let data = unsafe { &mut *self.data.get() };
        StateWrite {
            _shards: shards,
            data,
        }
    }

    fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

impl<T> Deref for StateRead<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data
    }
}

impl<T> Deref for StateWrite<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.data
    }
}

impl<T> DerefMut for StateWrite<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.data
    }
}

impl IoGate {
    fn new() -> Self {
        IoGate {
            shards: (0..GATE_SHARDS)
                .map(|_| GateShard(RwLock::new(())))
                .collect(),
            stripes: (0..STRIPES).map(|_| Stripe::new()).collect(),
            generation: AtomicU64::new(0),
        }
    }

    /// Shared, for a write or discard.
    #[inline]
    fn read(&self) -> RwLockReadGuard<'_, ()> {
        let i = GATE_SHARD.with(|s| *s);
        self.shards[i].0.read()
    }

    /// Exclusive against writes and discards (not reads): snapshots.
    fn block_writes(&self) -> IoGateWrite<'_> {
        IoGateWrite {
            _shards: self.shards.iter().map(|s| s.0.write()).collect(),
            _stripes: Vec::new(),
        }
    }

    /// Exclusive against all I/O, reads included: delete, `transaction`. Invalidates
    /// every stripe cache entry (the holder may change any mapping).
    fn write(&self) -> IoGateWrite<'_> {
        let shards = self.shards.iter().map(|s| s.0.write()).collect();
        let stripes = self.stripes.iter().map(|s| s.lock.write()).collect();
        let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        if g & SC_GEN_MASK == 0 {
            // The stored generation wrapped: entries 2^22 generations old would match.
            for s in self.stripes.iter() {
                s.clear();
            }
        }
        IoGateWrite {
            _shards: shards,
            _stripes: stripes,
        }
    }

    #[inline]
    fn stripe(&self, id: ThinId, vb: u64) -> &Stripe {
        let h = (id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ vb.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
            as usize;
        &self.stripes[h % STRIPES]
    }

    /// The current generation; call with a stripe lock held.
    #[inline]
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

/// Parameters of a new pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub data_block_size: DataBlockSize,
    /// Data device size in bytes (rounded down to whole blocks).
    pub data_size: u64,
    /// Metadata device size in bytes; derived from the data size when None.
    pub metadata_size: Option<u64>,
    /// Commit at most this long after the first uncommitted change.
    pub commit_interval: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            data_block_size: DataBlockSize::DEFAULT,
            data_size: 1 << 30,
            metadata_size: None,
            commit_interval: Duration::from_secs(1),
        }
    }
}

/// Metadata size for a data device, like `thin_metadata_size`: room for every data block
/// mapped in half-full leaves, twice over for snapshots, plus space maps, at least 2 MiB,
/// at most dm-thin's 15.9 GiB limit.
pub fn default_metadata_size(data_size: u64, block: DataBlockSize) -> u64 {
    let blocks = data_size / block.bytes();
    let bytes = 48u64.saturating_mul(blocks).saturating_add(1 << 20);
    let max = thinvol_format::metadata_index::MAX_METADATA_BLOCKS * METADATA_BLOCK_SIZE as u64;
    bytes
        .clamp(2 << 20, max)
        .div_ceil(METADATA_BLOCK_SIZE as u64)
        * METADATA_BLOCK_SIZE as u64
}

/// What the pool knows about one thin device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: ThinId,
    pub mapped_blocks: u64,
    pub transaction_id: u64,
    pub creation_time: u32,
    pub snapshotted_time: u32,
}

#[derive(Clone, Debug)]
pub struct PoolStatus {
    pub data_block_size: u64,
    pub data_blocks_total: u64,
    pub data_blocks_used: u64,
    pub metadata_blocks_total: u64,
    pub metadata_blocks_used: u64,
    pub transaction_id: u64,
    pub time: u32,
    pub held_metadata_root: Option<MetaBlock>,
    pub devices: usize,
    pub needs_check: bool,
}

struct State {
    md: Metadata,
    /// Set through `Pool::poison`, which also stops reads answered from the stripe
    /// caches; or while the I/O gate is held exclusively, which invalidates them.
    poisoned: Option<String>,
    first_dirty: Option<Instant>,
}

struct Inner {
    state: StateLock<State>,
    data: Arc<dyn Storage>,
    block_bytes: u64,
    /// The I/O gate and the block stripes (see module doc).
    io_gate: IoGate,
    /// Set with `State::poisoned` (`Pool::poison`): reads answered from a stripe cache
    /// check this instead of taking the metadata lock.
    poisoned: AtomicBool,
    stop: AtomicBool,
    committer: Mutex<Option<JoinHandle<()>>>,
    commit_interval: Duration,
    read_only: bool,
    dir: Option<PathBuf>,
}

/// A thin pool. Cheap to clone; all methods take `&self` and are safe from many threads.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// Options for opening an existing pool.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub commit_interval: Duration,
    /// Open without ever writing: mutations fail with `Error::ReadOnly`, nothing is
    /// committed, the files are opened read-only.
    pub read_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            commit_interval: Duration::from_secs(1),
            read_only: false,
        }
    }
}

impl Pool {
    /// Create a pool in `dir` (created if missing; must not already hold a pool):
    /// sparse files `metadata` and `data`.
    pub fn create(dir: &Path, cfg: &PoolConfig) -> Result<Pool> {
        std::fs::create_dir_all(dir)
            .map_err(io_err(format!("pool directory {}", dir.display())))?;
        let bs = cfg.data_block_size.bytes();
        let nr_blocks = cfg.data_size / bs;
        if nr_blocks == 0 {
            return Err(Error::InvalidArgument(format!(
                "data size {} is smaller than one data block ({})",
                cfg.data_size, bs
            )));
        }
        let msize = cfg
            .metadata_size
            .unwrap_or_else(|| default_metadata_size(cfg.data_size, cfg.data_block_size));
        let mpath = dir.join(METADATA_FILE);
        let dpath = dir.join(DATA_FILE);
        let meta = FileStorage::create(&mpath, msize)
            .map_err(io_err(format!("creating {}", mpath.display())))?;
        let data = match FileStorage::create(&dpath, nr_blocks * bs) {
            Ok(d) => d.map_for_reads(),
            Err(e) => {
                let _ = std::fs::remove_file(&mpath);
                return Err(io_err(format!("creating {}", dpath.display()))(e));
            }
        };
        let pool = Self::format_on(
            Arc::new(meta),
            Arc::new(data),
            cfg.data_block_size,
            cfg.commit_interval,
            Some(dir),
        );
        if pool.is_err() {
            let _ = std::fs::remove_file(&mpath);
            let _ = std::fs::remove_file(&dpath);
        }
        pool
    }

    /// Open the pool in `dir`.
    pub fn open(dir: &Path) -> Result<Pool> {
        Self::open_with(dir, &OpenOptions::default())
    }

    pub fn open_with(dir: &Path, opts: &OpenOptions) -> Result<Pool> {
        let mpath = dir.join(METADATA_FILE);
        let dpath = dir.join(DATA_FILE);
        let meta = FileStorage::open(&mpath, true)
            .map_err(io_err(format!("opening {}", mpath.display())))?;
        let data = FileStorage::open(&dpath, true)
            .map_err(io_err(format!("opening {}", dpath.display())))?
            .map_for_reads();
        Self::open_on_inner(Arc::new(meta), Arc::new(data), opts, Some(dir))
    }

    /// Format a pool on arbitrary storage (files, block devices, test backends). The
    /// data device's size decides the number of data blocks.
    pub fn format_on(
        meta: Arc<dyn Storage>,
        data: Arc<dyn Storage>,
        block: DataBlockSize,
        commit_interval: Duration,
        dir: Option<&Path>,
    ) -> Result<Pool> {
        let nr_blocks = data.len().map_err(io_err("data device"))? / block.bytes();
        let md = Metadata::format(meta, &*data, block.sectors(), nr_blocks)?;
        Ok(Self::start(md, data, commit_interval, false, dir))
    }

    /// Open a pool on arbitrary storage.
    pub fn open_on(
        meta: Arc<dyn Storage>,
        data: Arc<dyn Storage>,
        opts: &OpenOptions,
    ) -> Result<Pool> {
        Self::open_on_inner(meta, data, opts, None)
    }

    fn open_on_inner(
        meta: Arc<dyn Storage>,
        data: Arc<dyn Storage>,
        opts: &OpenOptions,
        dir: Option<&Path>,
    ) -> Result<Pool> {
        let md = Metadata::open(meta)?;
        if md.sb.compat_ro_flags != 0 && !opts.read_only {
            // The kernel refuses a read-write open with unknown compat_ro features.
            return Err(Error::Inconsistent {
                block: MetaBlock(0),
                reason: format!(
                    "unknown read-only-compatible features {:#x}: open the pool read-only",
                    md.sb.compat_ro_flags
                ),
            });
        }
        let need = md
            .nr_data_blocks()
            .checked_mul(md.data_block_bytes)
            .ok_or_else(|| Error::Inconsistent {
                block: MetaBlock(0),
                reason: format!(
                    "data space map of {} blocks of {} bytes exceeds 2^64 bytes",
                    md.nr_data_blocks(),
                    md.data_block_bytes
                ),
            })?;
        let have = data.len().map_err(io_err("data device"))?;
        if have < need {
            return Err(Error::InvalidArgument(format!(
                "data device is {have} bytes but the pool's metadata describes {need} bytes"
            )));
        }
        Ok(Self::start(
            md,
            data,
            opts.commit_interval,
            opts.read_only,
            dir,
        ))
    }

    fn start(
        md: Metadata,
        data: Arc<dyn Storage>,
        commit_interval: Duration,
        read_only: bool,
        dir: Option<&Path>,
    ) -> Pool {
        let block_bytes = md.data_block_bytes;
        let inner = Arc::new(Inner {
            state: StateLock::new(State {
                md,
                poisoned: None,
                first_dirty: None,
            }),
            data,
            block_bytes,
            io_gate: IoGate::new(),
            poisoned: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            committer: Mutex::new(None),
            commit_interval,
            read_only,
            dir: dir.map(Path::to_path_buf),
        });
        if !commit_interval.is_zero() && !read_only {
            let weak = Arc::downgrade(&inner);
            let tick = (commit_interval / 10).max(Duration::from_millis(10));
            let h = std::thread::Builder::new()
                .name("thinvol-commit".into())
                .spawn(move || committer(weak, tick))
                .ok();
            *inner.committer.lock() = h;
        }
        Pool { inner }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// Data block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.inner.block_bytes
    }

    fn writable_state(&self) -> Result<StateWrite<'_, State>> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        self.state()
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// The metadata state, exclusively.
    fn state(&self) -> Result<StateWrite<'_, State>> {
        let st = self.inner.state.write();
        if let Some(p) = &st.poisoned {
            return Err(Error::Poisoned(p.clone()));
        }
        Ok(st)
    }

    /// The metadata state, shared: for lookups that need no change (see module doc).
    #[inline]
    fn state_shared(&self) -> Result<StateRead<'_, State>> {
        let st = self.inner.state.read();
        if let Some(p) = &st.poisoned {
            return Err(Error::Poisoned(p.clone()));
        }
        Ok(st)
    }

    /// Run a metadata mutation; failures that may have left partial in-memory state
    /// poison the pool (the device still holds the last commit).
    fn mutate<T>(&self, f: impl FnOnce(&mut Metadata) -> Result<T>) -> Result<T> {
        let mut st = self.writable_state()?;
        self.mutate_locked(&mut st, f)
    }

    /// Poison the pool handle (see `mutate`): every later call fails.
    fn poison(&self, st: &mut State, why: String) {
        st.poisoned = Some(why);
        self.inner.poisoned.store(true, Ordering::Relaxed);
    }

    /// `mutate` with the state already locked exclusively (and not poisoned).
    fn mutate_locked<T>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut Metadata) -> Result<T>,
    ) -> Result<T> {
        let r = f(&mut st.md);
        match &r {
            Ok(_) => {
                if st.md.changed && st.first_dirty.is_none() {
                    st.first_dirty = Some(Instant::now());
                }
            }
            Err(e) => {
                let partial = st.md.tm.alloc_failed
                    || matches!(
                        e,
                        Error::Io { .. } | Error::Inconsistent { .. } | Error::Corrupt(_)
                    );
                if partial {
                    self.poison(st, e.to_string());
                }
            }
        }
        r
    }

    #[inline]
    fn stripe(&self, id: ThinId, vb: u64) -> &Stripe {
        self.inner.io_gate.stripe(id, vb)
    }

    // ---- thin devices ----

    pub fn create_thin(&self, id: ThinId) -> Result<()> {
        self.mutate(|md| md.create_thin(id))
    }

    /// Snapshot `origin` as `id` in O(1). Waits for in-flight writes.
    pub fn create_snap(&self, id: ThinId, origin: ThinId) -> Result<()> {
        let _g = self.inner.io_gate.block_writes();
        self.mutate(|md| md.create_snap(id, origin))
    }

    /// Snapshot several devices in one metadata transaction: all or none.
    pub fn create_snaps(&self, pairs: &[(ThinId, ThinId)]) -> Result<()> {
        let _g = self.inner.io_gate.block_writes();
        // Validate everything and check the metadata reserve once, up front, so the
        // batch never half-applies (a later pair failing with NoSpace(Metadata) would
        // otherwise leave the earlier snapshots in the transaction).
        self.mutate(|md| {
            for (i, (id, origin)) in pairs.iter().enumerate() {
                if !id.is_valid() {
                    return Err(Error::BadDeviceId(*id));
                }
                if md.exists(*id) || pairs[..i].iter().any(|p| p.0 == *id) {
                    return Err(Error::DeviceExists(*id));
                }
                if !md.exists(*origin) {
                    return Err(Error::NoSuchDevice(*origin));
                }
            }
            if u64::from(md.sb.time) + pairs.len() as u64 > u64::from(thinvol_format::MAX_TIME) {
                return Err(Error::InvalidArgument(
                    "the pool's snapshot clock is exhausted (2^24 snapshots)".into(),
                ));
            }
            md.ensure_metadata_space()?;
            for (id, origin) in pairs {
                md.create_snap_in_batch(*id, *origin)?;
            }
            Ok(())
        })
    }

    /// Delete a device. Waits for in-flight I/O, reads included (see module doc).
    pub fn delete_thin(&self, id: ThinId) -> Result<()> {
        let _g = self.inner.io_gate.write();
        self.mutate(|md| md.delete(id))
    }

    pub fn exists(&self, id: ThinId) -> Result<bool> {
        Ok(self.state()?.md.exists(id))
    }

    pub fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let st = self.state()?;
        Ok(st
            .md
            .details
            .iter()
            .map(|(&id, d)| DeviceInfo {
                id: ThinId(id),
                mapped_blocks: d.mapped_blocks,
                transaction_id: d.transaction_id,
                creation_time: d.creation_time,
                snapshotted_time: d.snapshotted_time,
            })
            .collect())
    }

    pub fn device(&self, id: ThinId) -> Result<DeviceInfo> {
        self.devices()?
            .into_iter()
            .find(|d| d.id == id)
            .ok_or(Error::NoSuchDevice(id))
    }

    /// All mappings of a device as (virtual block, data block), in order.
    pub fn mappings(&self, id: ThinId) -> Result<Vec<(VBlock, DataBlock)>> {
        self.mappings_range(id, 0, u64::MAX)
    }

    pub fn mappings_range(&self, id: ThinId, lo: u64, hi: u64) -> Result<Vec<(VBlock, DataBlock)>> {
        let mut st = self.state()?;
        Ok(st
            .md
            .mappings(id, lo, hi)?
            .into_iter()
            .map(|(v, bt)| (v, bt.block))
            .collect())
    }

    // ---- data I/O ----

    /// The per-block pieces (virtual block, offset in block, length) of a byte range.
    fn segments(&self, offset: u64, len: u64) -> Result<impl Iterator<Item = (u64, u64, u64)>> {
        let bs = self.inner.block_bytes;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument("offset + length overflows".into()))?;
        if end.div_ceil(bs) > thinvol_format::MAX_DATA_BLOCK {
            return Err(Error::InvalidArgument(format!(
                "range ends at byte {end}, beyond the largest thin device"
            )));
        }
        let mut pos = offset;
        Ok(std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let vb = pos / bs;
            let off = pos % bs;
            let n = (bs - off).min(end - pos);
            pos += n;
            Some((vb, off, n))
        }))
    }

    fn check_device(&self, id: ThinId) -> Result<()> {
        if self.state()?.md.exists(id) {
            Ok(())
        } else {
            Err(Error::NoSuchDevice(id))
        }
    }

    /// Read `buf.len()` bytes at byte `offset`; unmapped ranges read as zeros.
    pub fn read(&self, id: ThinId, offset: u64, buf: &mut [u8]) -> Result<()> {
        // No I/O gate: the stripe is enough (delete and `transaction` take every
        // stripe; a snapshot changes nothing a read sees). A block whose mapping the
        // stripe caches needs nothing else; otherwise the stripe is taken exclusively
        // for the metadata lookup that fills its cache, then shared for the data read.
        if buf.is_empty() {
            // Non-empty reads check the device in their first lookup.
            self.check_device(id)?;
        }
        let bs = self.inner.block_bytes;
        let mut done = 0usize;
        for (vb, off, n) in self.segments(offset, buf.len() as u64)? {
            let seg = &mut buf[done..done + n as usize];
            done += n as usize;
            let (_s, m) = self.hold_for_read(id, vb)?;
            match m {
                None => seg.fill(0),
                Some(b) => self
                    .inner
                    .data
                    .read_at(seg, b.0 * bs + off)
                    .map_err(|e| io_err(format!("data block {}", b.0))(e))?,
            }
        }
        Ok(())
    }

    /// Block `vb`'s stripe held shared, and its data block (None: unmapped). A block
    /// whose mapping the stripe caches needs nothing else (no metadata lock: the
    /// stripe lock keeps the entry current); otherwise the stripe is taken
    /// exclusively for the metadata lookup that fills its cache, then downgraded.
    /// Shared by [`Pool::read`] and [`Pool::read_with`]: both touch the data only
    /// while the guard lives.
    #[inline]
    fn hold_for_read(
        &self,
        id: ThinId,
        vb: u64,
    ) -> Result<(RwLockReadGuard<'_, ()>, Option<DataBlock>)> {
        let stripe = self.stripe(id, vb);
        let key = stripe_key(id, vb);
        let guard = stripe.lock.read();
        let gen = self.inner.io_gate.generation();
        match key.and_then(|k| stripe.find(k, gen)) {
            Some(m) if !self.inner.poisoned.load(Ordering::Relaxed) => {
                if cfg!(debug_assertions) {
                    self.check_stripe_entry(id, vb, m);
                }
                Ok((guard, m))
            }
            _ => {
                drop(guard);
                let w = stripe.lock.write();
                let m = self.lookup_for_read(id, vb)?;
                if let Some(k) = key {
                    stripe.set(k, self.inner.io_gate.generation(), m);
                }
                Ok((RwLockWriteGuard::downgrade(w), m))
            }
        }
    }

    /// The descriptor of the data file when zero-copy reads ([`Pool::read_with`]) are
    /// allowed on this pool: a writable regular file on a filesystem that punches holes
    /// (see [`Storage::splice_fd`] and docs/design.md §12, "Zero-copy reads").
    pub fn zero_copy_fd(&self) -> Option<std::os::fd::RawFd> {
        if self.inner.read_only {
            return None;
        }
        self.inner.data.splice_fd()
    }

    /// Visit the pieces of the byte range `[offset, offset + len)` in order, each within
    /// one block: `f(Some(pos), n)` for `n` bytes at byte `pos` of the data file
    /// ([`Pool::zero_copy_fd`]), `f(None, n)` for `n` bytes that read as zeros. `f` runs
    /// while the block's stripe is held shared, exactly as [`Pool::read`] copies: no
    /// write or discard of that block runs meanwhile, and the block cannot be freed
    /// (delete and `transaction` take every stripe). `f` must not block on anything
    /// but the data file (it holds the stripe). An error of `f` ends the visit.
    pub fn read_with(
        &self,
        id: ThinId,
        offset: u64,
        len: u64,
        mut f: impl FnMut(Option<u64>, u64) -> std::io::Result<()>,
    ) -> Result<()> {
        if len == 0 {
            return self.check_device(id);
        }
        let bs = self.inner.block_bytes;
        for (vb, off, n) in self.segments(offset, len)? {
            let (_s, m) = self.hold_for_read(id, vb)?;
            let r = match m {
                None => f(None, n),
                Some(b) => f(Some(b.0 * bs + off), n),
            };
            r.map_err(|e| io_err(format!("reading block {vb} of device {id}"))(e))?;
        }
        Ok(())
    }

    /// The data block of `vb` from the metadata: under the shared lock when it can be
    /// answered from memory, else under the exclusive lock.
    fn lookup_for_read(&self, id: ThinId, vb: u64) -> Result<Option<DataBlock>> {
        let m = self.state_shared()?.md.lookup_block_shared(id, VBlock(vb));
        match m {
            Some(m) => Ok(m),
            None => self.state()?.md.lookup_block(id, VBlock(vb)),
        }
    }

    /// Debug builds: a stripe cache hit must agree with the metadata.
    fn check_stripe_entry(&self, id: ThinId, vb: u64, m: Option<DataBlock>) {
        let Ok(mut st) = self.state() else { return };
        match st.md.lookup(id, VBlock(vb)) {
            Ok(bt) => assert_eq!(
                bt.map(|bt| bt.block),
                m,
                "stripe cache of device {id} block {vb} is stale"
            ),
            Err(Error::NoSuchDevice(_)) => {
                panic!("stripe cache has block {vb} of device {id}, which does not exist")
            }
            Err(_) => {}
        }
    }

    /// Write `buf` at byte `offset`. Durable after the next `flush`.
    pub fn write(&self, id: ThinId, offset: u64, buf: &[u8]) -> Result<()> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.inner.io_gate.read();
        if buf.is_empty() {
            self.check_device(id)?;
        }
        let mut done = 0usize;
        for (vb, off, n) in self.segments(offset, buf.len() as u64)? {
            let seg = &buf[done..done + n as usize];
            done += n as usize;
            self.write_block(id, vb, off, n, Some(seg))?;
        }
        Ok(())
    }

    /// Write zeros. Whole blocks are unmapped (reads return zeros; space is freed).
    pub fn write_zeroes(&self, id: ThinId, offset: u64, len: u64) -> Result<()> {
        self.discard(id, offset, len)
    }

    /// Discard a byte range: whole blocks are unmapped and their space released once no
    /// device references them; partial blocks at the edges are zeroed, so the range
    /// always reads back as zeros.
    pub fn discard(&self, id: ThinId, offset: u64, len: u64) -> Result<()> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.inner.io_gate.read();
        self.check_device(id)?;
        let bs = self.inner.block_bytes;
        for (vb, off, n) in self.segments(offset, len)? {
            if n == bs {
                let stripe = self.stripe(id, vb);
                let _s = stripe.lock.write();
                let mut st = self.state()?;
                if st.md.lookup(id, VBlock(vb))?.is_none() {
                    continue;
                }
                drop(st);
                if let Some(k) = stripe_key(id, vb) {
                    stripe.forget(k);
                }
                self.mutate(|md| {
                    md.ensure_metadata_space()?;
                    md.remove_mapping(id, VBlock(vb))
                })?;
                st = self.state()?;
                // Keep long discards from exhausting metadata before a commit.
                if st.md.tm.free_blocks() < 2 * st.md.tm.reserve {
                    self.commit_locked(&mut st)?;
                }
            } else {
                self.write_block(id, vb, off, n, None)?;
            }
        }
        Ok(())
    }

    /// Write the `n` bytes at `off` within block `vb` (`data` None = zeros).
    fn write_block(
        &self,
        id: ThinId,
        vb: u64,
        off: u64,
        n: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let bs = self.inner.block_bytes;
        let stripe = self.stripe(id, vb);
        let _s = stripe.lock.write();
        let key = stripe_key(id, vb);
        let m = self
            .state_shared()?
            .md
            .lookup_for_write_shared(id, VBlock(vb));
        let m = match m {
            Some(m) => m,
            None => self.writable_state()?.md.lookup_for_write(id, VBlock(vb))?,
        };
        if let Some(k) = key {
            // The stripe is held exclusively: record the mapping for reads, or, when
            // it is about to change, drop it until the change is done.
            match m {
                Mapped::Exclusive(b) => stripe.set(k, self.inner.io_gate.generation(), Some(b)),
                Mapped::Unmapped if data.is_none() => {
                    stripe.set(k, self.inner.io_gate.generation(), None)
                }
                _ => stripe.forget(k),
            }
        }
        let io = &self.inner.data;
        match (m, data) {
            (Mapped::Exclusive(b), Some(d)) => {
                return io
                    .write_at(d, b.0 * bs + off)
                    .map_err(|e| io_err(format!("data block {}", b.0))(e));
            }
            (Mapped::Exclusive(b), None) => {
                let z = vec![0u8; n as usize];
                return io
                    .write_at(&z, b.0 * bs + off)
                    .map_err(|e| io_err(format!("data block {}", b.0))(e));
            }
            (Mapped::Unmapped, None) => return Ok(()),
            _ => {}
        }
        let nb = {
            let mut st = self.state()?;
            let mut r = st
                .md
                .ensure_metadata_space()
                .and_then(|_| st.md.reserve_data_block());
            // Blocks freed since the last commit (discards, deletes, copy-on-write) can
            // be reused only once that commit is durable: when out of space, commit and
            // try once more before failing, like the kernel's `alloc_data_block`.
            if matches!(r, Err(Error::NoSpace(_))) && st.md.changed {
                self.commit_locked(&mut st)?;
                r = st
                    .md
                    .ensure_metadata_space()
                    .and_then(|_| st.md.reserve_data_block());
            }
            r?
        };
        let r = (|| {
            let whole = off == 0 && n == bs && data.is_some();
            // Zero-copy readers (docs/design.md §12, "Zero-copy reads") may still hold
            // references to this block's page-cache pages from when it was last mapped
            // (it was freed, then reused). Make it a hole first, so this write lands in
            // fresh pages: the punch drops the old pages from the file, and pages still
            // referenced keep their old contents. Normally the punch after the commit
            // that freed it already did (then this is one `lseek`); if that punch failed,
            // or the process died before it, it happens here, and if it fails the write
            // fails. Never skip it while `splice_fd` is Some.
            let zero_copy = io.splice_fd().is_some();
            let mut hole = false;
            if zero_copy || (m == Mapped::Unmapped && !whole) {
                hole = io.is_hole(nb.0 * bs, bs)?;
            }
            if zero_copy && !hole {
                io.evict(nb.0 * bs, bs)?;
                hole = true;
            }
            if whole {
                if let Some(d) = data {
                    return io.write_at(d, nb.0 * bs);
                }
            }
            // A new block that is a hole in the data file already reads as zeros:
            // write only the new bytes instead of a zero-filled whole block.
            if m == Mapped::Unmapped && hole {
                return match data {
                    Some(d) => io.write_at(d, nb.0 * bs + off),
                    None => Ok(()),
                };
            }
            let mut blk = vec![0u8; bs as usize];
            if let Mapped::Shared(old) = m {
                io.read_at(&mut blk, old.0 * bs)?;
            }
            match data {
                Some(d) => blk[off as usize..(off + n) as usize].copy_from_slice(d),
                None => blk[off as usize..(off + n) as usize].fill(0),
            }
            io.write_at(&blk, nb.0 * bs)
        })();
        // Unreserve and map in one exclusive section.
        let mut st = self.inner.state.write();
        st.md.unreserve_data_block(nb);
        r.map_err(|e| io_err(format!("data block {}", nb.0))(e))?;
        if let Some(p) = &st.poisoned {
            return Err(Error::Poisoned(p.clone()));
        }
        self.mutate_locked(&mut st, |md| {
            md.insert_mapping(id, VBlock(vb), nb).map(|_| ())
        })?;
        if let Some(k) = key {
            stripe.set(k, self.inner.io_gate.generation(), Some(nb));
        }
        Ok(())
    }

    // ---- transactions ----

    /// Commit: everything written before this call is durable when it returns.
    pub fn commit(&self) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        // Write the data device back before taking the metadata lock: the fdatasync
        // can take long, and writers that provision blocks need that lock. The flush
        // inside the commit (step 1, under the lock) still covers every mapping it
        // commits, but now only has the data written in between left to do (§5).
        if let Err(e) = self.inner.data.flush() {
            // A failed fdatasync is reported once; a later one may succeed although
            // the data is lost (§10). Never commit after it.
            let mut st = self.inner.state.write();
            let e = io_err("data device flush")(e);
            if st.poisoned.is_none() {
                self.poison(&mut st, format!("commit failed: {e}"));
            }
            return Err(e);
        }
        let mut st = self.state()?;
        self.commit_locked(&mut st)
    }

    /// Same as [`Pool::commit`]; the name block-device front ends use.
    pub fn flush(&self) -> Result<()> {
        self.commit()
    }

    fn commit_locked(&self, st: &mut State) -> Result<()> {
        match st.md.commit(&*self.inner.data) {
            Ok(freed) => {
                st.first_dirty = None;
                self.release_data(&freed);
                Ok(())
            }
            Err(e) => {
                self.poison(st, format!("commit failed: {e}"));
                Err(e)
            }
        }
    }

    /// Give freed data blocks' space back to the host (hole punch / discard). Only
    /// after the commit that freed them is durable: before that, the previous commit
    /// may still map them.
    fn release_data(&self, freed: &[DataBlock]) {
        let bs = self.inner.block_bytes;
        let mut i = 0;
        while i < freed.len() {
            let start = freed[i].0;
            let mut end = start + 1;
            while i + 1 < freed.len() && freed[i + 1].0 == end {
                end += 1;
                i += 1;
            }
            i += 1;
            // Best effort: a failed punch leaves stale bytes in a free block, which is
            // harmless (free blocks are fully rewritten before they are mapped).
            let _ = self.inner.data.discard(start * bs, (end - start) * bs);
        }
    }

    pub fn set_transaction_id(&self, old: u64, new: u64) -> Result<()> {
        self.mutate(|md| md.set_transaction_id(old, new))
    }

    /// Take the pool's single metadata snapshot (commits before and after).
    pub fn reserve_metadata_snap(&self) -> Result<MetaBlock> {
        let mut st = self.writable_state()?;
        self.commit_locked(&mut st)?;
        let b = st.md.reserve_metadata_snap();
        if b.is_err() && st.md.tm.alloc_failed {
            self.poison(&mut st, "metadata snapshot reservation failed".into());
        }
        let b = b?;
        self.commit_locked(&mut st)?;
        Ok(b)
    }

    pub fn release_metadata_snap(&self) -> Result<()> {
        let mut st = self.writable_state()?;
        if let Err(e) = st.md.release_metadata_snap() {
            if !matches!(e, Error::NoMetadataSnap) {
                self.poison(&mut st, e.to_string());
            }
            return Err(e);
        }
        self.commit_locked(&mut st)
    }

    /// Grow the data device to `bytes` (whole blocks) and commit.
    pub fn grow_data(&self, bytes: u64) -> Result<()> {
        let bs = self.inner.block_bytes;
        let nr = bytes / bs;
        let mut st = self.writable_state()?;
        if nr < st.md.nr_data_blocks() {
            return Err(Error::InvalidArgument(format!(
                "cannot shrink the data device ({} blocks) to {nr} blocks",
                st.md.nr_data_blocks()
            )));
        }
        self.inner
            .data
            .grow(nr * bs)
            .map_err(io_err("growing the data device"))?;
        st.md.extend_data(nr)?;
        self.commit_locked(&mut st)
    }

    /// Grow the metadata space map after the metadata device was enlarged.
    pub fn grow_metadata(&self, bytes: u64) -> Result<()> {
        let mut st = self.writable_state()?;
        st.md
            .tm
            .store
            .grow(bytes)
            .map_err(io_err("growing the metadata device"))?;
        st.md.extend_metadata()?;
        self.commit_locked(&mut st)
    }

    pub fn status(&self) -> Result<PoolStatus> {
        let st = self.state()?;
        let (mu, mt) = st.md.metadata_blocks();
        Ok(PoolStatus {
            data_block_size: self.inner.block_bytes,
            data_blocks_total: st.md.nr_data_blocks(),
            data_blocks_used: st.md.data_blocks_used(),
            metadata_blocks_total: mt,
            metadata_blocks_used: mu,
            transaction_id: st.md.sb.trans_id,
            time: st.md.sb.time,
            held_metadata_root: (st.md.sb.held_root.0 != 0).then_some(st.md.sb.held_root),
            devices: st.md.details.len(),
            needs_check: st.md.sb.needs_check(),
        })
    }

    /// Commit and stop the background committer.
    pub fn close(self) -> Result<()> {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.inner.committer.lock().take() {
            let _ = h.join();
        }
        self.commit()
    }
}

fn committer(weak: Weak<Inner>, tick: Duration) {
    loop {
        std::thread::sleep(tick);
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let pool = Pool { inner };
        let due = {
            let st = pool.inner.state.read();
            st.poisoned.is_none()
                && st
                    .first_dirty
                    .is_some_and(|t| t.elapsed() >= pool.inner.commit_interval)
        };
        if due {
            let _ = pool.commit();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        if !self.read_only && st.poisoned.is_none() && st.md.changed {
            let _ = st.md.commit(&*self.data);
        }
    }
}

impl Pool {
    /// Per-block differences between two devices, from metadata alone. Shared subtrees
    /// are skipped unread; `include_same` also lists identically mapped blocks (which
    /// requires reading them).
    pub fn delta(
        &self,
        left: ThinId,
        right: ThinId,
        include_same: bool,
    ) -> Result<(Vec<crate::BlockDelta>, crate::DeltaStats)> {
        let mut st = self.state()?;
        let l = st.md.device_root(left)?;
        let r = st.md.device_root(right)?;
        crate::delta::delta(&mut st.md.tm, l, r, include_same)
    }

    /// Commit, then verify every tree and both space maps like `thin_check`.
    pub fn check(&self) -> Result<crate::CheckReport> {
        let mut st = self.state()?;
        if !self.inner.read_only {
            self.commit_locked(&mut st)?;
        } else if st.md.changed {
            return Err(Error::ReadOnly);
        }
        crate::check::check(&mut st.md)
    }

    /// Read from the data device directly (replication and tests).
    pub fn read_data_block(&self, b: DataBlock, buf: &mut [u8]) -> Result<()> {
        self.inner
            .data
            .read_at(buf, b.0 * self.inner.block_bytes)
            .map_err(|e| io_err(format!("data block {}", b.0))(e))
    }
}

/// Metadata operations inside one atomic pool transaction ([`Pool::transaction`]).
pub struct Tx<'a> {
    md: &'a mut Metadata,
}

impl Tx<'_> {
    pub fn create_thin(&mut self, id: ThinId) -> Result<()> {
        self.md.create_thin(id)
    }

    pub fn create_snap(&mut self, id: ThinId, origin: ThinId) -> Result<()> {
        self.md.create_snap(id, origin)
    }

    pub fn delete(&mut self, id: ThinId) -> Result<()> {
        self.md.delete(id)
    }

    pub fn exists(&self, id: ThinId) -> bool {
        self.md.exists(id)
    }

    pub fn transaction_id(&self) -> u64 {
        self.md.sb.trans_id
    }

    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        self.md.set_transaction_id(old, new)
    }

    /// All mappings of a device as (virtual block, data block, time).
    pub fn mappings(&mut self, id: ThinId) -> Result<Vec<(VBlock, DataBlock, u32)>> {
        Ok(self
            .md
            .mappings(id, 0, u64::MAX)?
            .into_iter()
            .map(|(v, bt)| (v, bt.block, bt.time))
            .collect())
    }

    /// Map `vb` of `id` to a data block another device (or an archived state) already
    /// uses; the block gains a reference. Used to rebuild a device from a restore point.
    pub fn map_existing(&mut self, id: ThinId, vb: VBlock, block: DataBlock) -> Result<()> {
        if block.0 >= self.md.nr_data_blocks() {
            return Err(Error::InvalidArgument(format!(
                "data block {} is beyond the data device",
                block.0
            )));
        }
        self.md.ensure_metadata_space()?;
        self.md.insert_mapping(id, vb, block).map(|_| ())
    }

    /// Current reference count of a data block (0 = free).
    pub fn data_block_refs(&mut self, block: DataBlock) -> Result<u32> {
        self.md.data_block_refs(block)
    }

    /// The pool's snapshot clock.
    pub fn time(&self) -> u32 {
        self.md.sb.time
    }
}

impl Pool {
    /// Run several metadata operations as one transaction: all of them are committed
    /// together, or — if `f` fails — none (the in-memory state is reloaded from the
    /// last commit, which this call made just before `f` ran, so nothing else is lost).
    /// In-flight I/O is drained first and waits until the commit.
    pub fn transaction<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.inner.io_gate.write();
        let mut st = self.writable_state()?;
        self.commit_locked(&mut st)?;
        let r = f(&mut Tx { md: &mut st.md });
        match r {
            Ok(v) => {
                self.commit_locked(&mut st)?;
                Ok(v)
            }
            Err(e) => {
                let store = st.md.tm.store.clone();
                match Metadata::open(store) {
                    Ok(md) => {
                        st.md = md;
                        st.first_dirty = None;
                    }
                    Err(reload) => {
                        st.poisoned = Some(format!("aborting a transaction failed: {reload}"));
                    }
                }
                Err(e)
            }
        }
    }
}
