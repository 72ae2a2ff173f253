//! The pool's metadata as one transaction-scoped object: open/format, thin device
//! operations on the two-level mapping tree, the metadata snapshot, and commit.
//!
//! Commit protocol (dmthin-format.md §7; crash analysis in docs/design.md):
//! 1. flush the data device (data of every mapping about to commit is durable);
//! 2. write changed device details into the details tree;
//! 3. data space map: overflow tree, relocated bitmaps, index tree;
//! 4. metadata space map: fixed point of overflow tree + bitmap relocation + index
//!    block (those updates allocate blocks, which change counts again);
//! 5. write every new metadata block, flush;
//! 6. write the superblock (one sector), flush — the commit point.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thinvol_format::bitmap::{self, ENTRIES_PER_BITMAP};
use thinvol_format::block_time::BlockTime;
use thinvol_format::device_details::{DeviceDetails, DEVICE_DETAILS_SIZE};
use thinvol_format::index_entry::IndexEntry;
use thinvol_format::metadata_index::{self, MAX_METADATA_BLOCKS};
use thinvol_format::sm_root::SmRoot;
use thinvol_format::superblock::{self, Superblock, THIN_VERSION};
use thinvol_format::{DataBlock, MetaBlock, ThinId, VBlock, MAX_TIME, METADATA_BLOCK_SIZE};

use crate::btree;
use crate::error::{io_err, Error, Result, SpaceKind};
use crate::space_map::SpaceMap;
use crate::storage::Storage;
use crate::tm::{load_chunk, pack_metadata_index, BlockMap, DataChunks, NoRc, Tm, ValueOps};

/// Bottom-level mapping leaves: values are block_time, each holding one data reference.
pub(crate) struct BlockTimeRc<'a> {
    pub dsm: &'a mut SpaceMap,
}

impl ValueOps for BlockTimeRc<'_> {
    fn value_size(&self) -> u32 {
        8
    }
    fn inc(&mut self, tm: &mut Tm, v: &[u8]) -> Result<()> {
        let bt = BlockTime::unpack(u64_of(v));
        self.dsm.inc(bt.block.0, &mut DataChunks { tm })
    }
    fn dec(&mut self, tm: &mut Tm, v: &[u8]) -> Result<()> {
        let bt = BlockTime::unpack(u64_of(v));
        self.dsm.dec(bt.block.0, &mut DataChunks { tm }).map(|_| ())
    }
}

/// Top-level mapping leaves: values are bottom-tree roots.
pub(crate) struct SubtreeRc<'a> {
    pub dsm: &'a mut SpaceMap,
}

impl ValueOps for SubtreeRc<'_> {
    fn value_size(&self) -> u32 {
        8
    }
    fn inc(&mut self, tm: &mut Tm, v: &[u8]) -> Result<()> {
        tm.inc(MetaBlock(u64_of(v)))
    }
    fn dec(&mut self, tm: &mut Tm, v: &[u8]) -> Result<()> {
        btree::del(tm, &mut BlockTimeRc { dsm: self.dsm }, MetaBlock(u64_of(v)))
    }
}

pub(crate) fn u64_of(v: &[u8]) -> u64 {
    v.get(..8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Recently looked-up mappings of one device, direct-mapped by virtual block: the
/// read path's shortcut past the B-tree (a lookup there touches one cache line, a
/// B-tree lookup a dozen). Exact, never stale: entries are filled from the tree and
/// changed or dropped by every operation that changes the device's mappings (see
/// `Metadata::mcache`).
///
/// Entry: 0 = empty; else bit 63 set, bits 40..63 = `vblock >> bits` (the tag), bits
/// 0..40 = data block. One word, so lookups and fills under the shared metadata lock
/// are plain atomic loads and stores and never see half an entry.
struct MapCache {
    slots: Box<[AtomicU64]>,
    bits: u32,
}

const MC_VALID: u64 = 1 << 63;
const MC_TAG_BITS: u32 = 23;
const MC_BLOCK_MASK: u64 = (1 << 40) - 1;
const MC_MIN_BITS: u32 = 10;
const MC_MAX_BITS: u32 = 20;
/// All devices' caches together hold at most this many entries (64 MiB).
const MC_BUDGET: usize = 1 << 23;

impl MapCache {
    fn new(bits: u32) -> Self {
        MapCache {
            slots: (0..1usize << bits).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// Slot index and tag of `vb`; None when the tag does not fit (not cached).
    #[inline]
    fn slot(&self, vb: u64) -> Option<(usize, u64)> {
        let tag = vb >> self.bits;
        if tag >= 1 << MC_TAG_BITS {
            return None;
        }
        Some(((vb & ((1 << self.bits) - 1)) as usize, tag))
    }

    #[inline]
    fn get(&self, vb: u64) -> Option<DataBlock> {
        let (i, tag) = self.slot(vb)?;
        let e = self.slots[i].load(Ordering::Relaxed);
        let hit = e & MC_VALID != 0 && (e >> 40) & ((1 << MC_TAG_BITS) - 1) == tag;
        hit.then_some(DataBlock(e & MC_BLOCK_MASK))
    }

    #[inline]
    fn put(&self, vb: u64, b: DataBlock) {
        if let Some((i, tag)) = self.slot(vb) {
            if b.0 <= MC_BLOCK_MASK {
                self.slots[i].store(MC_VALID | tag << 40 | b.0, Ordering::Relaxed);
            }
        }
    }

    fn forget(&self, vb: u64) {
        if let Some((i, _)) = self.slot(vb) {
            self.slots[i].store(0, Ordering::Relaxed);
        }
    }
}

/// Result of a mapping lookup for a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapped {
    Unmapped,
    /// Mapped, and no other device or metadata snapshot can see the block.
    Exclusive(DataBlock),
    Shared(DataBlock),
}

pub(crate) struct Metadata {
    pub tm: Tm,
    pub dsm: SpaceMap,
    pub sb: Superblock,
    pub details: BTreeMap<u64, DeviceDetails>,
    details_dirty: BTreeSet<u64>,
    details_deleted: BTreeSet<u64>,
    /// Something changed since the last commit.
    pub changed: bool,
    /// Bottom-tree root of devices looked up since their last change: a copy of the
    /// top-level tree's value, so lookups skip the top-level tree. Exact: every change
    /// of a top-level value goes through a method below that updates or drops the
    /// entry (`insert_mapping`, `remove_mapping`, `create_*`, `delete`); debug builds
    /// compare it with the tree on every use under the exclusive lock.
    roots: BlockMap<MetaBlock>,
    /// Per-device mapping caches (`MapCache`), created by the first read of a device
    /// under the exclusive lock (`None`: no room within `MC_BUDGET`, the device is
    /// read through the tree alone), filled by lookups (also under the shared lock),
    /// updated by `insert_mapping` / `remove_mapping`, dropped by `create_*` and
    /// `delete`. Debug builds check every hit against the tree.
    mcache: BlockMap<Option<MapCache>>,
    /// Entries in all of `mcache` (bounded by `MC_BUDGET`).
    mcache_slots: usize,
    pub data_block_bytes: u64,
}

impl Metadata {
    /// Format fresh metadata on `store` for `nr_data_blocks` data blocks and commit it.
    pub fn format(
        store: Arc<dyn Storage>,
        data: &dyn Storage,
        data_block_sectors: u32,
        nr_data_blocks: u64,
    ) -> Result<Self> {
        let len = store.len().map_err(io_err("metadata device"))?;
        let meta_blocks = (len / METADATA_BLOCK_SIZE as u64).min(MAX_METADATA_BLOCKS);
        if meta_blocks < 64 {
            return Err(Error::InvalidArgument(format!(
                "metadata device of {len} bytes is too small (at least 256 KiB)"
            )));
        }
        let mut msm = SpaceMap::new_zeroed(meta_blocks);
        msm.inc(0, &mut crate::space_map::Resident)?; // the superblock
        let mut tm = Tm::new(store, msm);
        let mut dsm = SpaceMap::new_zeroed(nr_data_blocks);
        dsm.bitmap_root = btree::empty(&mut tm, 16)?;
        dsm.overflow_root = btree::empty(&mut tm, 4)?;
        tm.msm.overflow_root = btree::empty(&mut tm, 4)?;
        let sb = Superblock {
            version: THIN_VERSION,
            data_block_size: data_block_sectors,
            metadata_nr_blocks: meta_blocks,
            data_mapping_root: btree::empty(&mut tm, 8)?,
            device_details_root: btree::empty(&mut tm, DEVICE_DETAILS_SIZE as u32)?,
            ..Default::default()
        };
        let mut md = Metadata {
            tm,
            dsm,
            sb,
            details: BTreeMap::new(),
            details_dirty: BTreeSet::new(),
            details_deleted: BTreeSet::new(),
            changed: true,
            roots: BlockMap::default(),
            mcache: BlockMap::default(),
            mcache_slots: 0,
            data_block_bytes: u64::from(data_block_sectors) * 512,
        };
        md.commit(data)?;
        Ok(md)
    }

    /// Open committed metadata: superblock, metadata space map (all bitmaps),
    /// data space map index (bitmaps load on demand), device details.
    pub fn open(store: Arc<dyn Storage>) -> Result<Self> {
        let len = store.len().map_err(io_err("metadata device"))?;
        if len < METADATA_BLOCK_SIZE as u64 {
            return Err(Error::InvalidArgument(format!(
                "metadata device is {len} bytes, smaller than one 4 KiB block"
            )));
        }
        let mut raw = thinvol_format::zeroed_block();
        store
            .read_at(&mut raw[..], 0)
            .map_err(io_err("metadata superblock"))?;
        if superblock::is_all_zero(&raw) {
            return Err(Error::Unformatted);
        }
        let sb = Superblock::unpack(&raw, MetaBlock(0))?;
        if thinvol_format::DataBlockSize::from_sectors(sb.data_block_size).is_none() {
            return Err(Error::Inconsistent {
                block: MetaBlock(0),
                reason: format!(
                    "data block size {} sectors is not valid for dm-thin",
                    sb.data_block_size
                ),
            });
        }
        let mroot = sb.metadata_sm_root;
        let dev_blocks = len / METADATA_BLOCK_SIZE as u64;
        if mroot.nr_blocks == 0
            || mroot.nr_blocks > MAX_METADATA_BLOCKS
            || mroot.nr_blocks > dev_blocks
        {
            return Err(Error::Inconsistent {
                block: MetaBlock(0),
                reason: format!(
                    "metadata space map covers {} blocks but the device holds {dev_blocks}",
                    mroot.nr_blocks
                ),
            });
        }
        if sb.time > MAX_TIME {
            // Mappings hold 24 bits of time (block_time); a larger clock cannot be
            // stored and would corrupt the data block bits of new mappings.
            return Err(Error::Inconsistent {
                block: MetaBlock(0),
                reason: format!("pool time {} does not fit in 24 bits", sb.time),
            });
        }
        for (what, r) in [("metadata", &mroot), ("data", &sb.data_sm_root)] {
            if r.nr_allocated > r.nr_blocks {
                return Err(Error::Inconsistent {
                    block: MetaBlock(0),
                    reason: format!(
                        "{what} space map has {} of its {} blocks allocated",
                        r.nr_allocated, r.nr_blocks
                    ),
                });
            }
        }
        let nr_bitmaps = mroot.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        // Read the index block before the space map exists: bound the location by hand.
        if mroot.bitmap_root >= mroot.nr_blocks || mroot.bitmap_root == 0 {
            return Err(Error::Inconsistent {
                block: MetaBlock(0),
                reason: format!(
                    "metadata space map index at invalid block {}",
                    mroot.bitmap_root
                ),
            });
        }
        let mut ib = thinvol_format::zeroed_block();
        store
            .read_at(&mut ib[..], mroot.bitmap_root * METADATA_BLOCK_SIZE as u64)
            .map_err(io_err("metadata space map index"))?;
        let entries = metadata_index::unpack(&ib, MetaBlock(mroot.bitmap_root), nr_bitmaps)?;
        let msm = SpaceMap::from_disk(
            mroot.nr_blocks,
            mroot.nr_allocated,
            entries.clone(),
            MetaBlock(mroot.bitmap_root),
            MetaBlock(mroot.ref_count_root),
        );
        let mut tm = Tm::new(store, msm);
        for (i, e) in entries.iter().enumerate() {
            let counts = load_chunk(&mut tm, i, e, MetaBlock(mroot.ref_count_root))?;
            tm.msm.set_chunk(i, counts);
        }
        tm.msm.recount_allocated();
        // Data space map: index btree keyed 0..n.
        let droot = sb.data_sm_root;
        let dentries = btree::collect(&mut tm, MetaBlock(droot.bitmap_root), 16)?;
        let want = droot.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        if dentries.len() != want
            || dentries
                .iter()
                .enumerate()
                .any(|(i, (k, _))| *k != i as u64)
        {
            return Err(Error::Inconsistent {
                block: MetaBlock(droot.bitmap_root),
                reason: format!(
                    "data space map index has {} entries, expected bitmaps 0..{want}",
                    dentries.len()
                ),
            });
        }
        let dentries: Vec<IndexEntry> = dentries
            .iter()
            .map(|(_, v)| IndexEntry::unpack(v).unwrap_or_default())
            .collect();
        let dsm = SpaceMap::from_disk(
            droot.nr_blocks,
            droot.nr_allocated,
            dentries,
            MetaBlock(droot.bitmap_root),
            MetaBlock(droot.ref_count_root),
        );
        let mut details = BTreeMap::new();
        for (k, v) in btree::collect(&mut tm, sb.device_details_root, DEVICE_DETAILS_SIZE as u32)? {
            details.insert(k, DeviceDetails::unpack(&v).unwrap_or_default());
        }
        Ok(Metadata {
            tm,
            dsm,
            data_block_bytes: u64::from(sb.data_block_size) * 512,
            sb,
            details,
            details_dirty: BTreeSet::new(),
            details_deleted: BTreeSet::new(),
            changed: false,
            roots: BlockMap::default(),
            mcache: BlockMap::default(),
            mcache_slots: 0,
        })
    }

    fn check_id(id: ThinId) -> Result<()> {
        if id.is_valid() {
            Ok(())
        } else {
            Err(Error::BadDeviceId(id))
        }
    }

    /// Refuse a metadata-changing operation when the commit might not fit.
    pub fn ensure_metadata_space(&self) -> Result<()> {
        if self.tm.free_blocks() <= self.tm.reserve {
            return Err(Error::NoSpace(SpaceKind::Metadata));
        }
        Ok(())
    }

    fn touch(&mut self, id: u64) {
        self.details_dirty.insert(id);
        self.details_deleted.remove(&id);
        self.changed = true;
    }

    fn bottom_root(&mut self, id: ThinId) -> Result<MetaBlock> {
        if let Some(&r) = self.roots.get(&id.0) {
            if cfg!(debug_assertions) {
                if let Ok(v) = btree::lookup_u64(&mut self.tm, self.sb.data_mapping_root, id.0) {
                    assert_eq!(v, Some(r.0), "cached bottom root of device {id} is stale");
                }
            }
            return Ok(r);
        }
        match btree::lookup_u64(&mut self.tm, self.sb.data_mapping_root, id.0)? {
            Some(v) => {
                self.roots.insert(id.0, MetaBlock(v));
                Ok(MetaBlock(v))
            }
            None => Err(Error::NoSuchDevice(id)),
        }
    }

    pub fn exists(&self, id: ThinId) -> bool {
        self.details.contains_key(&id.0)
    }

    pub fn create_thin(&mut self, id: ThinId) -> Result<()> {
        Self::check_id(id)?;
        if self.exists(id) {
            return Err(Error::DeviceExists(id));
        }
        self.ensure_metadata_space()?;
        self.roots.remove(&id.0);
        self.mcache_drop(id);
        let root = btree::empty(&mut self.tm, 8)?;
        let (nr, old) = btree::insert(
            &mut self.tm,
            &mut SubtreeRc { dsm: &mut self.dsm },
            self.sb.data_mapping_root,
            id.0,
            &root.0.to_le_bytes(),
        )?;
        debug_assert!(old.is_none());
        self.sb.data_mapping_root = nr;
        self.details.insert(
            id.0,
            DeviceDetails {
                mapped_blocks: 0,
                transaction_id: self.sb.trans_id,
                creation_time: self.sb.time,
                snapshotted_time: self.sb.time,
            },
        );
        self.touch(id.0);
        Ok(())
    }

    /// O(1) snapshot: the new device shares the origin's whole mapping tree
    /// (`__create_snap`).
    pub fn create_snap(&mut self, id: ThinId, origin: ThinId) -> Result<()> {
        self.create_snap_inner(id, origin, true)
    }

    /// One snapshot of a multi-snapshot batch whose caller checked the metadata reserve
    /// once for the whole batch: the reserve covers the batch's allocations, so it
    /// cannot stop half-way with `NoSpace(Metadata)` and leave some snapshots behind.
    pub fn create_snap_in_batch(&mut self, id: ThinId, origin: ThinId) -> Result<()> {
        self.create_snap_inner(id, origin, false)
    }

    fn create_snap_inner(&mut self, id: ThinId, origin: ThinId, check_space: bool) -> Result<()> {
        Self::check_id(id)?;
        if self.exists(id) {
            return Err(Error::DeviceExists(id));
        }
        if !self.exists(origin) {
            return Err(Error::NoSuchDevice(origin));
        }
        if self.sb.time >= MAX_TIME {
            return Err(Error::InvalidArgument(
                "the pool's snapshot clock is exhausted (2^24 snapshots)".into(),
            ));
        }
        if check_space {
            self.ensure_metadata_space()?;
        }
        let root = self.bottom_root(origin)?;
        self.roots.remove(&id.0);
        self.mcache_drop(id);
        self.tm.inc(root)?;
        let (nr, _) = btree::insert(
            &mut self.tm,
            &mut SubtreeRc { dsm: &mut self.dsm },
            self.sb.data_mapping_root,
            id.0,
            &root.0.to_le_bytes(),
        )?;
        self.sb.data_mapping_root = nr;
        self.sb.time += 1;
        let time = self.sb.time;
        let o = self.details.get_mut(&origin.0).expect("checked above");
        o.snapshotted_time = time;
        let mapped = o.mapped_blocks;
        self.touch(origin.0);
        self.details.insert(
            id.0,
            DeviceDetails {
                mapped_blocks: mapped,
                transaction_id: self.sb.trans_id,
                creation_time: time,
                snapshotted_time: time,
            },
        );
        self.touch(id.0);
        Ok(())
    }

    pub fn delete(&mut self, id: ThinId) -> Result<()> {
        if !self.exists(id) {
            return Err(Error::NoSuchDevice(id));
        }
        self.roots.remove(&id.0);
        self.mcache_drop(id);
        let (nr, old) = btree::remove(
            &mut self.tm,
            &mut SubtreeRc { dsm: &mut self.dsm },
            self.sb.data_mapping_root,
            id.0,
        )?;
        self.sb.data_mapping_root = nr;
        if let Some(v) = old {
            SubtreeRc { dsm: &mut self.dsm }.dec(&mut self.tm, &v)?;
        }
        self.details.remove(&id.0);
        self.details_dirty.remove(&id.0);
        self.details_deleted.insert(id.0);
        self.changed = true;
        Ok(())
    }

    /// Where `vblock` of `id` lives, and whether writing it in place is safe.
    pub fn lookup_for_write(&mut self, id: ThinId, vb: VBlock) -> Result<Mapped> {
        // The top-level path counts too: while a metadata snapshot is held it shares the
        // top-level tree, and every block it can see is written by copy, never in place
        // (deterministic, unlike a check of the bottom tree alone).
        let (root, top_exclusive) =
            match btree::lookup_u64_exclusive(&mut self.tm, self.sb.data_mapping_root, id.0)? {
                Some((r, e)) => (MetaBlock(r), e),
                None => return Err(Error::NoSuchDevice(id)),
            };
        match btree::lookup_u64_exclusive(&mut self.tm, root, vb.0)? {
            None => Ok(Mapped::Unmapped),
            Some((v, bottom_exclusive)) => {
                let path_exclusive = top_exclusive && bottom_exclusive;
                let bt = BlockTime::unpack(v);
                let b = bt.block;
                let data_exclusive =
                    self.dsm.count(b.0, &mut DataChunks { tm: &mut self.tm })? == 1;
                // Current counts alone are not enough: the last commit may still map
                // the block elsewhere (a snapshot deleted since, or an origin whose
                // tree a new snapshot took over), and an in-place write would change
                // that committed device if we crash before the next commit. Like the
                // kernel (`__snapshotted_since`), a block mapped before the device was
                // last snapshotted is shared.
                let snapshotted = self.details.get(&id.0).map_or(0, |d| d.snapshotted_time);
                let fresh = bt.time >= snapshotted;
                // `count` above checked that `b` is on the data device.
                self.mcache_put(id, vb, b);
                Ok(if path_exclusive && data_exclusive && fresh {
                    Mapped::Exclusive(b)
                } else {
                    Mapped::Shared(b)
                })
            }
        }
    }

    pub fn data_block_refs(&mut self, b: DataBlock) -> Result<u32> {
        self.dsm.count(b.0, &mut DataChunks { tm: &mut self.tm })
    }

    /// Current reference count of data block `b` if its space map chunk is loaded.
    fn data_count_resident(&self, b: u64) -> Option<u32> {
        if b >= self.dsm.nr_blocks {
            return None;
        }
        let per = ENTRIES_PER_BITMAP;
        self.dsm
            .chunk_counts((b / per) as usize)
            .and_then(|c| c.get((b % per) as usize).copied())
    }

    /// `lookup_for_write` under a shared lock: from dirty and cached nodes and loaded
    /// space map chunks only. `None` when that is not enough (or something is wrong):
    /// the caller then calls `lookup_for_write` under the exclusive lock.
    pub fn lookup_for_write_shared(&self, id: ThinId, vb: VBlock) -> Option<Mapped> {
        let (root, top_exclusive) =
            btree::peek_u64_exclusive(&self.tm, self.sb.data_mapping_root, id.0)??;
        if cfg!(debug_assertions) {
            if let Some(&r) = self.roots.get(&id.0) {
                assert_eq!(r.0, root, "cached bottom root of device {id} is stale");
            }
        }
        match btree::peek_u64_exclusive(&self.tm, MetaBlock(root), vb.0)? {
            None => Some(Mapped::Unmapped),
            Some((v, bottom_exclusive)) => {
                let bt = BlockTime::unpack(v);
                // None also when the block is beyond the data device.
                let data_exclusive = self.data_count_resident(bt.block.0)? == 1;
                let snapshotted = self.details.get(&id.0).map_or(0, |d| d.snapshotted_time);
                let fresh = bt.time >= snapshotted;
                // The caller holds the block's stripe exclusively: the mapping is
                // current, and any change to it updates the cache (`insert_mapping`).
                self.mcache_put(id, vb, bt.block);
                // Same rule as `lookup_for_write`.
                Some(
                    if top_exclusive && bottom_exclusive && data_exclusive && fresh {
                        Mapped::Exclusive(bt.block)
                    } else {
                        Mapped::Shared(bt.block)
                    },
                )
            }
        }
    }

    /// The data block of `vb` for a read, under a shared lock: the device's mapping
    /// cache, else the B-tree from the cached bottom root through dirty and cached
    /// nodes only (filling the mapping cache). `None` when that is not enough (root not
    /// cached, a node not in memory, anything wrong): the caller then calls
    /// `lookup_block` under the exclusive lock, which reads what is missing and
    /// reports any error.
    #[inline]
    pub fn lookup_block_shared(&self, id: ThinId, vb: VBlock) -> Option<Option<DataBlock>> {
        // No decision about a cache for this device yet: the exclusive path makes it.
        let cache = self.mcache.get(&id.0)?.as_ref();
        if let Some(b) = cache.and_then(|c| c.get(vb.0)) {
            if cfg!(debug_assertions) {
                self.check_cached(id, vb, b);
            }
            return Some(Some(b));
        }
        let root = *self.roots.get(&id.0)?;
        if cfg!(debug_assertions) {
            if let Some(Some(r)) = btree::peek_u64(&self.tm, self.sb.data_mapping_root, id.0) {
                assert_eq!(r, root.0, "cached bottom root of device {id} is stale");
            }
        }
        let Some(v) = btree::peek_u64(&self.tm, root, vb.0)? else {
            return Some(None);
        };
        let b = BlockTime::unpack(v).block;
        if b.0 >= self.dsm.nr_blocks {
            return None;
        }
        if let Some(c) = cache {
            c.put(vb.0, b);
        }
        Some(Some(b))
    }

    /// `lookup` for a read, under the exclusive lock: also creates the device's
    /// mapping cache and fills the entry.
    pub fn lookup_block(&mut self, id: ThinId, vb: VBlock) -> Result<Option<DataBlock>> {
        let Some(bt) = self.lookup(id, vb)? else {
            return Ok(None);
        };
        if cfg!(debug_assertions) {
            if let Some(b) = self.mcache_of(id).and_then(|c| c.get(vb.0)) {
                assert_eq!(b, bt.block, "mapping cache of device {id} is stale at {vb}");
            }
        }
        self.mcache_ensure(id);
        self.mcache_put(id, vb, bt.block);
        Ok(Some(bt.block))
    }

    /// Debug builds: a mapping cache hit must agree with the tree (when the tree can
    /// be read without I/O).
    fn check_cached(&self, id: ThinId, vb: VBlock, b: DataBlock) {
        let Some(&root) = self.roots.get(&id.0) else {
            return;
        };
        if let Some(v) = btree::peek_u64(&self.tm, root, vb.0) {
            assert_eq!(
                v.map(|v| BlockTime::unpack(v).block),
                Some(b),
                "mapping cache of device {id} is stale at {vb}"
            );
        }
    }

    fn mcache_of(&self, id: ThinId) -> Option<&MapCache> {
        self.mcache.get(&id.0).and_then(Option::as_ref)
    }

    fn mcache_put(&self, id: ThinId, vb: VBlock, b: DataBlock) {
        if let Some(c) = self.mcache_of(id) {
            c.put(vb.0, b);
        }
    }

    fn mcache_forget(&mut self, id: ThinId, vb: VBlock) {
        if let Some(c) = self.mcache_of(id) {
            c.forget(vb.0);
        }
    }

    fn mcache_drop(&mut self, id: ThinId) {
        if let Some(Some(c)) = self.mcache.remove(&id.0) {
            self.mcache_slots -= c.slots.len();
            // Room again: devices refused a cache get another chance.
            self.mcache.retain(|_, c| c.is_some());
        }
    }

    /// Give `id` a mapping cache sized for its mapped blocks (a direct map for devices
    /// of up to 2^20 blocks), growing one that became too small, within `MC_BUDGET`
    /// for all devices together (no room: `None`, reads use the tree alone).
    fn mcache_ensure(&mut self, id: ThinId) {
        let mapped = self.details.get(&id.0).map_or(0, |d| d.mapped_blocks);
        let want = mapped
            .max(1)
            .next_power_of_two()
            .trailing_zeros()
            .clamp(MC_MIN_BITS, MC_MAX_BITS);
        let have = match self.mcache.get(&id.0) {
            Some(Some(c)) if c.bits + 1 >= want => return,
            Some(Some(c)) => c.slots.len(),
            Some(None) => return,
            None => 0,
        };
        let n = 1usize << want;
        if self.mcache_slots - have + n > MC_BUDGET {
            if have == 0 {
                self.mcache.insert(id.0, None);
            }
            return;
        }
        self.mcache_slots = self.mcache_slots - have + n;
        self.mcache.insert(id.0, Some(MapCache::new(want)));
    }

    pub fn lookup(&mut self, id: ThinId, vb: VBlock) -> Result<Option<BlockTime>> {
        let root = self.bottom_root(id)?;
        let Some(v) = btree::lookup_u64(&mut self.tm, root, vb.0)? else {
            return Ok(None);
        };
        let bt = BlockTime::unpack(v);
        // Never hand out a block outside the data device (a read would fail, overflow
        // the byte offset, or return bytes that are not the pool's).
        if bt.block.0 >= self.dsm.nr_blocks {
            return Err(Error::Inconsistent {
                block: root,
                reason: format!(
                    "thin device {id} maps virtual block {vb} to data block {}, beyond the \
                     data device ({} blocks)",
                    bt.block.0, self.dsm.nr_blocks
                ),
            });
        }
        Ok(Some(bt))
    }

    /// Map `vb` to `block` (whose count the caller has NOT yet taken; this takes it).
    /// Returns the block previously mapped there, whose reference is released.
    pub fn insert_mapping(
        &mut self,
        id: ThinId,
        vb: VBlock,
        block: DataBlock,
    ) -> Result<Option<DataBlock>> {
        self.roots.remove(&id.0);
        self.mcache_forget(id, vb);
        let Some((top, leaf, idx)) = btree::shadow_to(
            &mut self.tm,
            &mut SubtreeRc { dsm: &mut self.dsm },
            self.sb.data_mapping_root,
            id.0,
        )?
        else {
            return Err(Error::NoSuchDevice(id));
        };
        self.sb.data_mapping_root = top;
        let root = MetaBlock(self.tm.node_mut(leaf).value_u64(idx));
        let bt = BlockTime {
            block,
            time: self.sb.time,
        };
        let (nr, old) = btree::insert(
            &mut self.tm,
            &mut BlockTimeRc { dsm: &mut self.dsm },
            root,
            vb.0,
            &bt.pack().to_le_bytes(),
        )?;
        self.tm.node_mut(leaf).set_value_u64(idx, nr.0);
        self.roots.insert(id.0, nr);
        self.dsm
            .inc(block.0, &mut DataChunks { tm: &mut self.tm })?;
        let old = old.map(|v| BlockTime::unpack(u64_of(&v)).block);
        if let Some(o) = old {
            self.dsm.dec(o.0, &mut DataChunks { tm: &mut self.tm })?;
        } else if let Some(d) = self.details.get_mut(&id.0) {
            d.mapped_blocks += 1;
        }
        self.touch(id.0);
        self.mcache_put(id, vb, block);
        Ok(old)
    }

    /// Unmap `vb`; returns the block that was mapped (its reference released).
    pub fn remove_mapping(&mut self, id: ThinId, vb: VBlock) -> Result<Option<DataBlock>> {
        let root = self.bottom_root(id)?;
        if btree::lookup(&mut self.tm, root, 8, vb.0)?.is_none() {
            return Ok(None);
        }
        let (top, leaf, idx) = btree::shadow_to(
            &mut self.tm,
            &mut SubtreeRc { dsm: &mut self.dsm },
            self.sb.data_mapping_root,
            id.0,
        )?
        .ok_or(Error::NoSuchDevice(id))?;
        self.roots.remove(&id.0);
        self.mcache_forget(id, vb);
        self.sb.data_mapping_root = top;
        let root = MetaBlock(self.tm.node_mut(leaf).value_u64(idx));
        let (nr, old) = btree::remove(
            &mut self.tm,
            &mut BlockTimeRc { dsm: &mut self.dsm },
            root,
            vb.0,
        )?;
        self.tm.node_mut(leaf).set_value_u64(idx, nr.0);
        self.roots.insert(id.0, nr);
        let old = old.map(|v| BlockTime::unpack(u64_of(&v)).block);
        if let Some(o) = old {
            self.dsm.dec(o.0, &mut DataChunks { tm: &mut self.tm })?;
            if let Some(d) = self.details.get_mut(&id.0) {
                d.mapped_blocks = d.mapped_blocks.saturating_sub(1);
            }
        }
        self.touch(id.0);
        Ok(old)
    }

    /// Every mapping of `id` in [lo, hi), in order.
    pub fn mappings(&mut self, id: ThinId, lo: u64, hi: u64) -> Result<Vec<(VBlock, BlockTime)>> {
        let root = self.bottom_root(id)?;
        let mut out = Vec::new();
        btree::walk_range(&mut self.tm, root, 8, lo, hi, &mut |k, v| {
            out.push((VBlock(k), BlockTime::unpack(u64_of(v))));
            Ok(())
        })?;
        Ok(out)
    }

    pub fn device_root(&mut self, id: ThinId) -> Result<MetaBlock> {
        self.bottom_root(id)
    }

    /// Reserve a data block for an in-flight write.
    pub fn reserve_data_block(&mut self) -> Result<DataBlock> {
        match self.dsm.reserve(&mut DataChunks { tm: &mut self.tm })? {
            Some(b) => Ok(DataBlock(b)),
            None => Err(Error::NoSpace(SpaceKind::Data)),
        }
    }

    pub fn unreserve_data_block(&mut self, b: DataBlock) {
        self.dsm.unreserve(b.0);
    }

    /// Keep a consistent copy of the mapping and details trees (`__reserve_metadata_snap`).
    /// The caller commits before and after.
    pub fn reserve_metadata_snap(&mut self) -> Result<MetaBlock> {
        if self.sb.held_root.0 != 0 {
            return Err(Error::MetadataSnapHeld);
        }
        self.ensure_metadata_space()?;
        let b = self.tm.alloc()?;
        let copy = Superblock {
            blocknr: b,
            held_root: MetaBlock(0),
            data_sm_root: SmRoot::default(),
            metadata_sm_root: SmRoot::default(),
            ..self.sb.clone()
        };
        self.tm.put_raw(b, copy.pack());
        self.tm.inc(self.sb.data_mapping_root)?;
        self.tm.inc(self.sb.device_details_root)?;
        self.sb.held_root = b;
        self.changed = true;
        Ok(b)
    }

    /// Drop the metadata snapshot (`__release_metadata_snap`).
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        let b = self.sb.held_root;
        if b.0 == 0 {
            return Err(Error::NoMetadataSnap);
        }
        let copy = self.held_superblock()?.ok_or(Error::NoMetadataSnap)?;
        self.sb.held_root = MetaBlock(0);
        btree::del(
            &mut self.tm,
            &mut SubtreeRc { dsm: &mut self.dsm },
            copy.data_mapping_root,
        )?;
        btree::del(
            &mut self.tm,
            &mut NoRc(DEVICE_DETAILS_SIZE as u32),
            copy.device_details_root,
        )?;
        self.tm.dec(b)?;
        self.changed = true;
        Ok(())
    }

    pub fn held_superblock(&mut self) -> Result<Option<Superblock>> {
        let b = self.sb.held_root;
        if b.0 == 0 {
            return Ok(None);
        }
        let raw = match self.tm.dirty.get(&b.0) {
            Some(crate::tm::Dirty::Raw(r)) => r.clone(),
            _ => self.tm.read_raw(b)?,
        };
        Ok(Some(Superblock::unpack(&raw, b)?))
    }

    /// Grow the data space map (never shrinks).
    pub fn extend_data(&mut self, nr_blocks: u64) -> Result<()> {
        if nr_blocks < self.dsm.nr_blocks {
            return Err(Error::InvalidArgument(format!(
                "cannot shrink the data device from {} to {nr_blocks} blocks",
                self.dsm.nr_blocks
            )));
        }
        if nr_blocks > thinvol_format::MAX_DATA_BLOCK + 1 {
            return Err(Error::InvalidArgument(
                "data device larger than 2^40 blocks".into(),
            ));
        }
        if nr_blocks > self.dsm.nr_blocks {
            // Load the last bitmap so that `extend` can recount its free entries.
            if let Some(last) = self.dsm.nr_blocks.checked_sub(1) {
                self.dsm.count(last, &mut DataChunks { tm: &mut self.tm })?;
            }
            self.dsm.extend(nr_blocks);
            self.changed = true;
        }
        Ok(())
    }

    /// Grow the metadata space map to the device's size (capped at dm-thin's limit).
    pub fn extend_metadata(&mut self) -> Result<()> {
        let len = self.tm.store.len().map_err(io_err("metadata device"))?;
        let blocks = (len / METADATA_BLOCK_SIZE as u64).min(MAX_METADATA_BLOCKS);
        if blocks > self.tm.msm.nr_blocks {
            self.tm.msm.extend(blocks);
            self.tm.reserve = (blocks / 10).clamp(32, 4096);
            self.changed = true;
        }
        Ok(())
    }

    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        if self.sb.trans_id != old {
            return Err(Error::TransactionIdMismatch {
                expected: old,
                actual: self.sb.trans_id,
            });
        }
        self.sb.trans_id = new;
        self.changed = true;
        Ok(())
    }

    /// Run the commit protocol. On error the caller must poison the pool: in-memory
    /// state may be half-way through the commit; the device still holds the last commit.
    pub fn commit(&mut self, data: &dyn Storage) -> Result<Vec<DataBlock>> {
        data.flush().map_err(io_err("data device flush"))?;
        if !self.changed {
            return Ok(Vec::new());
        }
        self.write_details()?;
        self.commit_data_sm()?;
        self.commit_metadata_sm()?;
        let freed: Vec<DataBlock> = self
            .dsm
            .freed_since_commit()
            .into_iter()
            .map(DataBlock)
            .collect();
        self.tm.write_dirty()?;
        self.tm
            .store
            .flush()
            .map_err(io_err("metadata device flush"))?;
        self.sb.data_sm_root = SmRoot {
            nr_blocks: self.dsm.nr_blocks,
            nr_allocated: self.dsm.nr_allocated,
            bitmap_root: self.dsm.bitmap_root.0,
            ref_count_root: self.dsm.overflow_root.0,
        };
        self.sb.metadata_sm_root = SmRoot {
            nr_blocks: self.tm.msm.nr_blocks,
            nr_allocated: self.tm.msm.nr_allocated,
            bitmap_root: self.tm.msm.bitmap_root.0,
            ref_count_root: self.tm.msm.overflow_root.0,
        };
        self.sb.blocknr = MetaBlock(0);
        let packed = self.sb.pack();
        self.tm
            .store
            .write_at(&packed[..], 0)
            .map_err(io_err("metadata superblock"))?;
        self.tm
            .store
            .flush()
            .map_err(io_err("metadata device flush"))?;
        self.tm.forget_dirty();
        self.dsm.committed();
        self.tm.msm.committed();
        self.details_dirty.clear();
        self.details_deleted.clear();
        self.changed = false;
        Ok(freed)
    }

    fn write_details(&mut self) -> Result<()> {
        let mut root = self.sb.device_details_root;
        let mut ops = NoRc(DEVICE_DETAILS_SIZE as u32);
        for id in std::mem::take(&mut self.details_deleted) {
            root = btree::remove(&mut self.tm, &mut ops, root, id)?.0;
        }
        for id in std::mem::take(&mut self.details_dirty) {
            if let Some(d) = self.details.get(&id) {
                let v = d.pack();
                root = btree::insert(&mut self.tm, &mut ops, root, id, &v)?.0;
            }
        }
        self.sb.device_details_root = root;
        Ok(())
    }

    /// Sync one space map's overflow tree with its exact counts.
    fn sync_overflow(
        tm: &mut Tm,
        root: MetaBlock,
        changes: &[(u64, u32, u32)],
        written: &mut HashMap<u64, u32>,
    ) -> Result<(MetaBlock, bool)> {
        let mut root = root;
        let mut progress = false;
        let mut ops = NoRc(4);
        for &(b, orig, now) in changes {
            let in_tree = written
                .get(&b)
                .copied()
                .unwrap_or(if orig >= 3 { orig } else { 0 });
            let want = if now >= 3 { now } else { 0 };
            if in_tree == want {
                continue;
            }
            root = if want > 0 {
                btree::insert(tm, &mut ops, root, b, &want.to_le_bytes())?.0
            } else {
                btree::remove(tm, &mut ops, root, b)?.0
            };
            written.insert(b, want);
            progress = true;
        }
        Ok((root, progress))
    }

    fn commit_data_sm(&mut self) -> Result<()> {
        let changes = self.dsm.changes();
        let mut written = HashMap::new();
        let (root, _) =
            Self::sync_overflow(&mut self.tm, self.dsm.overflow_root, &changes, &mut written)?;
        self.dsm.overflow_root = root;
        let dirty: Vec<usize> = self.dsm.dirty_chunks.iter().copied().collect();
        for ci in dirty {
            let nb = self.tm.alloc()?;
            let old = self.dsm.entries[ci].blocknr;
            if old != 0 {
                self.tm.dec(MetaBlock(old))?;
            }
            self.dsm.entries[ci].blocknr = nb.0;
            let counts = self
                .dsm
                .chunk_counts(ci)
                .ok_or_else(|| Error::Inconsistent {
                    block: nb,
                    reason: format!("dirty data bitmap {ci} not resident"),
                })?;
            self.tm
                .put_raw(nb, bitmap::pack(counts.iter().copied(), nb));
        }
        let mut root = self.dsm.bitmap_root;
        let mut ops = NoRc(16);
        for ci in 0..self.dsm.entries.len() {
            let e = self.dsm.entries[ci];
            if self.dsm.committed_entries.get(ci) != Some(&e) {
                root = btree::insert(&mut self.tm, &mut ops, root, ci as u64, &e.pack())?.0;
            }
        }
        self.dsm.bitmap_root = root;
        Ok(())
    }

    fn commit_metadata_sm(&mut self) -> Result<()> {
        let mut written = HashMap::new();
        let mut index_relocated = false;
        for _round in 0..1000 {
            let changes = self.tm.msm.changes();
            let ovf = self.tm.msm.overflow_root;
            let (root, mut progress) =
                Self::sync_overflow(&mut self.tm, ovf, &changes, &mut written)?;
            self.tm.msm.overflow_root = root;
            let pending: Vec<usize> = self
                .tm
                .msm
                .dirty_chunks
                .iter()
                .copied()
                .filter(|c| !self.tm.msm.relocated.contains(c))
                .collect();
            for ci in pending {
                let nb = self.tm.alloc()?;
                let old = self.tm.msm.entries[ci].blocknr;
                self.tm.msm.relocated.insert(ci);
                if old != 0 {
                    self.tm.dec(MetaBlock(old))?;
                }
                self.tm.msm.entries[ci].blocknr = nb.0;
                progress = true;
            }
            if !index_relocated {
                let nb = self.tm.alloc()?;
                let old = self.tm.msm.bitmap_root;
                if old.0 != 0 {
                    self.tm.dec(old)?;
                }
                self.tm.msm.bitmap_root = nb;
                index_relocated = true;
                progress = true;
            }
            if !progress {
                // Counts are final: serialise bitmaps and the index.
                let dirty: Vec<usize> = self.tm.msm.dirty_chunks.iter().copied().collect();
                for ci in dirty {
                    let loc = MetaBlock(self.tm.msm.entries[ci].blocknr);
                    let counts = self
                        .tm
                        .msm
                        .chunk_counts(ci)
                        .expect("metadata chunks are resident");
                    let packed = bitmap::pack(counts.iter().copied(), loc);
                    self.tm.put_raw(loc, packed);
                }
                let loc = self.tm.msm.bitmap_root;
                let packed = pack_metadata_index(&self.tm.msm.entries, loc);
                self.tm.put_raw(loc, packed);
                return Ok(());
            }
        }
        Err(Error::Inconsistent {
            block: MetaBlock(0),
            reason: "metadata space map commit did not converge".into(),
        })
    }

    pub fn nr_data_blocks(&self) -> u64 {
        self.dsm.nr_blocks
    }

    pub fn data_blocks_used(&self) -> u64 {
        self.dsm.nr_allocated
    }

    pub fn metadata_blocks(&self) -> (u64, u64) {
        (self.tm.msm.nr_allocated, self.tm.msm.nr_blocks)
    }
}
