//! Transaction manager: metadata block I/O, the node cache, the shadow (dirty) set and
//! the metadata space map.
//!
//! Invariants (dm-transaction-manager.c, dmthin-format.md §6):
//! * A block in `dirty` was allocated in the current transaction; it may be modified in
//!   place while its count is 1. Any other block is copied before modification.
//! * Committed blocks are immutable, so the clean cache never needs invalidation except
//!   when a block is reallocated.
//! * Nothing is written to the metadata device before commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thinvol_format::btree_node::{Node, NodeRef};
use thinvol_format::{bitmap, metadata_index, zeroed_block, Block, MetaBlock, METADATA_BLOCK_SIZE};

use crate::error::{io_err, Error, Result, SpaceKind};
use crate::space_map::{ChunkSource, Resident, SpaceMap};
use crate::storage::Storage;
use thinvol_format::index_entry::IndexEntry;

/// A block written in this transaction.
#[derive(Clone)]
pub(crate) enum Dirty {
    Node(Arc<Node>),
    Raw(Box<Block>),
}

/// Value reference-count callbacks for a tree's leaf values (`dm_btree_value_type`).
pub(crate) trait ValueOps {
    fn value_size(&self) -> u32;
    fn inc(&mut self, tm: &mut Tm, v: &[u8]) -> Result<()>;
    fn dec(&mut self, tm: &mut Tm, v: &[u8]) -> Result<()>;
}

/// Leaf values that hold no references (details, index entries, overflow counts).
pub(crate) struct NoRc(pub u32);

impl ValueOps for NoRc {
    fn value_size(&self) -> u32 {
        self.0
    }
    fn inc(&mut self, _: &mut Tm, _: &[u8]) -> Result<()> {
        Ok(())
    }
    fn dec(&mut self, _: &mut Tm, _: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// Hasher for metadata block numbers (multiply-rotate, as in FxHash): the node cache
/// and the dirty set are looked up several times per I/O, where SipHash dominated.
#[derive(Default, Clone, Copy)]
pub(crate) struct BlockHasher(u64);

impl std::hash::Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

pub(crate) type BlockMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<BlockHasher>>;

struct CacheEntry {
    node: Arc<Node>,
    /// Last `tick` at which the node was used. Atomic so that lookups under a shared
    /// lock (`peek_node`) can refresh it too.
    used: AtomicU64,
}

/// A node as a read-only walk sees it: decoded (dirty or cached) or a view over bytes
/// read from the device into the caller's buffer (nothing cached, nothing allocated).
#[derive(Clone, Copy)]
pub(crate) enum NodeView<'a> {
    Decoded(&'a Node),
    Raw(NodeRef<'a>),
}

impl NodeView<'_> {
    pub fn is_leaf(&self) -> bool {
        match self {
            NodeView::Decoded(n) => n.is_leaf(),
            NodeView::Raw(n) => n.is_leaf(),
        }
    }
}

pub(crate) struct Tm {
    pub store: Arc<dyn Storage>,
    cache: BlockMap<CacheEntry>,
    cache_capacity: usize,
    tick: u64,
    pub dirty: BlockMap<Dirty>,
    pub msm: SpaceMap,
    /// Metadata blocks that must stay free for the commit itself.
    pub reserve: u64,
    /// Set when an allocation failed part-way through an operation: the in-memory
    /// transaction is then unusable and the pool must be poisoned.
    pub alloc_failed: bool,
}

impl Tm {
    pub fn new(store: Arc<dyn Storage>, msm: SpaceMap) -> Self {
        let reserve = (msm.nr_blocks / 10).clamp(32, 4096);
        Tm {
            store,
            cache: BlockMap::default(),
            cache_capacity: 65_536,
            tick: 0,
            dirty: BlockMap::default(),
            msm,
            reserve,
            alloc_failed: false,
        }
    }

    /// Read a raw committed block, checking the location is inside the device.
    pub fn read_raw(&self, b: MetaBlock) -> Result<Box<Block>> {
        let mut buf = zeroed_block();
        self.read_raw_into(b, &mut buf)?;
        Ok(buf)
    }

    /// Read a committed block into `buf`, checking the location like `read_raw`.
    pub fn read_raw_into(&self, b: MetaBlock, buf: &mut Block) -> Result<()> {
        if b.0 >= self.msm.nr_blocks.max(1) {
            return Err(Error::Inconsistent {
                block: b,
                reason: format!(
                    "reference to block {} beyond the metadata device ({} blocks)",
                    b.0, self.msm.nr_blocks
                ),
            });
        }
        self.store
            .read_at(&mut buf[..], b.0 * METADATA_BLOCK_SIZE as u64)
            .map_err(|e| io_err(format!("metadata block {}", b.0))(e))
    }

    /// Hint that `blocks` (sorted or not) will be read soon; neighbours are merged into
    /// one request. Blocks in memory (dirty or cached) or beyond the device are left out.
    pub fn prefetch(&self, blocks: &mut [MetaBlock]) {
        blocks.sort_unstable_by_key(|b| b.0);
        let bs = METADATA_BLOCK_SIZE as u64;
        let mut run: Option<(u64, u64)> = None; // [first, end) in blocks
        let wanted = blocks.iter().map(|b| b.0).filter(|&b| {
            b < self.msm.nr_blocks && !self.dirty.contains_key(&b) && !self.cache.contains_key(&b)
        });
        for b in wanted {
            run = match run {
                Some((first, end)) if b <= end => Some((first, end.max(b + 1))),
                Some((first, end)) => {
                    self.store.prefetch(first * bs, (end - first) * bs);
                    Some((b, b + 1))
                }
                None => Some((b, b + 1)),
            };
        }
        if let Some((first, end)) = run {
            self.store.prefetch(first * bs, (end - first) * bs);
        }
    }

    /// Read and validate a node. `leaf_vs` is the tree's leaf value size.
    pub fn read_node(&mut self, b: MetaBlock, leaf_vs: u32) -> Result<Arc<Node>> {
        self.node_arc(b, leaf_vs).cloned()
    }

    /// Like `read_node`, borrowing the node instead of sharing it (no reference count
    /// traffic on lookups).
    #[inline]
    pub fn node(&mut self, b: MetaBlock, leaf_vs: u32) -> Result<&Node> {
        self.node_arc(b, leaf_vs).map(|n| &**n)
    }

    fn node_arc(&mut self, b: MetaBlock, leaf_vs: u32) -> Result<&Arc<Node>> {
        if let Some(d) = self.dirty.get(&b.0) {
            return match d {
                Dirty::Node(n) => Ok(n),
                Dirty::Raw(_) => Err(not_a_node(b)),
            };
        }
        self.tick += 1;
        let tick = self.tick;
        if !self.cache.contains_key(&b.0) {
            let raw = self.read_raw(b)?;
            let node = Arc::new(Node::unpack(&raw, b, Some(leaf_vs))?);
            Self::cache_insert_in(&mut self.cache, self.cache_capacity, tick, b.0, node);
            // Just validated with `leaf_vs`.
            return Ok(&self.cache[&b.0].node);
        }
        let e = self.cache.get_mut(&b.0).expect("checked above");
        *e.used.get_mut() = tick;
        check_leaf_vs(&e.node, b, leaf_vs)?;
        Ok(&e.node)
    }

    /// A node that is dirty or cached, for lookups under a shared lock: no I/O, no
    /// cache change other than the recency mark. None when the node would have to be
    /// read (or is not a node); the caller then uses `read_node` under an exclusive
    /// lock, which also reports any error.
    #[inline]
    pub fn peek_node(&self, b: MetaBlock) -> Option<&Node> {
        // A block is never both cached and dirty: `alloc` evicts it from the cache
        // before it becomes dirty, and `read_node` caches only blocks that are not.
        if let Some(e) = self.cache.get(&b.0) {
            if e.used.load(Ordering::Relaxed) != self.tick {
                e.used.store(self.tick, Ordering::Relaxed);
            }
            return Some(&e.node);
        }
        match self.dirty.get(&b.0) {
            Some(Dirty::Node(n)) => Some(n),
            _ => None,
        }
    }

    /// A node for a read-only walk that may touch many nodes once (delta): dirty and
    /// cached nodes are used as they are; any other is read into `buf` and validated
    /// in place (exactly as `read_node` validates), without filling the cache with
    /// nodes the walk will not need again.
    pub fn view_node<'a>(
        &'a self,
        b: MetaBlock,
        leaf_vs: u32,
        buf: &'a mut Block,
    ) -> Result<NodeView<'a>> {
        if let Some(d) = self.dirty.get(&b.0) {
            return match d {
                Dirty::Node(n) => Ok(NodeView::Decoded(n)),
                Dirty::Raw(_) => Err(not_a_node(b)),
            };
        }
        if let Some(e) = self.cache.get(&b.0) {
            check_leaf_vs(&e.node, b, leaf_vs)?;
            return Ok(NodeView::Decoded(&e.node));
        }
        self.read_raw_into(b, buf)?;
        Ok(NodeView::Raw(NodeRef::parse(buf, b, Some(leaf_vs))?))
    }

    fn cache_insert(&mut self, b: u64, node: Arc<Node>) {
        Self::cache_insert_in(&mut self.cache, self.cache_capacity, self.tick, b, node);
    }

    fn cache_insert_in(
        cache: &mut BlockMap<CacheEntry>,
        capacity: usize,
        tick: u64,
        b: u64,
        node: Arc<Node>,
    ) {
        if cache.len() >= capacity {
            // Drop the older half: amortised O(1) per insert.
            let mut ticks: Vec<u64> = cache.values_mut().map(|e| *e.used.get_mut()).collect();
            let mid = ticks.len() / 2;
            let (_, cut, _) = ticks.select_nth_unstable(mid);
            let cut = *cut;
            cache.retain(|_, e| *e.used.get_mut() > cut);
        }
        cache.insert(
            b,
            CacheEntry {
                node,
                used: AtomicU64::new(tick),
            },
        );
    }

    pub fn count(&self, b: MetaBlock) -> u32 {
        self.msm.count_resident(b.0)
    }

    pub fn inc(&mut self, b: MetaBlock) -> Result<()> {
        self.msm.inc(b.0, &mut Resident)
    }

    /// Decrement; a block that reaches zero and was allocated in this transaction is
    /// forgotten (never written).
    pub fn dec(&mut self, b: MetaBlock) -> Result<()> {
        if self.msm.dec(b.0, &mut Resident)? == 0 {
            self.dirty.remove(&b.0);
        }
        Ok(())
    }

    pub fn free_blocks(&self) -> u64 {
        self.msm.nr_free_now()
    }

    /// Allocate a block (count 1) for new contents.
    pub fn alloc(&mut self) -> Result<MetaBlock> {
        match self.msm.alloc(&mut Resident)? {
            Some(b) => {
                self.cache.remove(&b);
                Ok(MetaBlock(b))
            }
            None => {
                self.alloc_failed = true;
                Err(Error::NoSpace(SpaceKind::Metadata))
            }
        }
    }

    pub fn new_node(&mut self, node: Node) -> Result<MetaBlock> {
        let b = self.alloc()?;
        self.dirty.insert(b.0, Dirty::Node(Arc::new(node)));
        Ok(b)
    }

    pub fn put_raw(&mut self, b: MetaBlock, raw: Box<Block>) {
        self.dirty.insert(b.0, Dirty::Raw(raw));
    }

    /// Mutable access to a node this transaction owns (after `shadow`/`new_node`).
    pub fn node_mut(&mut self, b: MetaBlock) -> &mut Node {
        match self.dirty.get_mut(&b.0) {
            Some(Dirty::Node(n)) => Arc::make_mut(n),
            _ => panic!("node_mut on block {} that is not shadowed", b.0),
        }
    }

    /// Make `b` writable (`dm_tm_shadow_block`): returns `b` itself if this transaction
    /// owns it exclusively, otherwise a copy. A shared original keeps its children
    /// alive by incrementing them (`inc_children`).
    pub fn shadow(&mut self, b: MetaBlock, vops: &mut dyn ValueOps) -> Result<MetaBlock> {
        let count = self.count(b);
        if count == 1 && matches!(self.dirty.get(&b.0), Some(Dirty::Node(_))) {
            return Ok(b);
        }
        let node = self.read_node(b, vops.value_size())?;
        if count == 0 {
            return Err(Error::Inconsistent {
                block: b,
                reason: "node is referenced but has reference count 0".into(),
            });
        }
        let nb = self.alloc()?;
        let copy: Node = (*node).clone();
        if count > 1 {
            if copy.is_leaf() {
                for i in 0..copy.len() {
                    vops.inc(self, copy.value(i))?;
                }
            } else {
                for i in 0..copy.len() {
                    self.inc(copy.child(i))?;
                }
            }
        }
        self.dec(b)?;
        self.dirty.insert(nb.0, Dirty::Node(Arc::new(copy)));
        Ok(nb)
    }

    /// Write every dirty block that is still referenced. Returns how many.
    pub fn write_dirty(&mut self) -> Result<usize> {
        let mut blocks: Vec<u64> = self.dirty.keys().copied().collect();
        blocks.sort_unstable();
        let mut n = 0;
        for b in blocks {
            if self.msm.count_resident(b) == 0 {
                continue;
            }
            let packed = match &self.dirty[&b] {
                Dirty::Node(node) => node.pack(MetaBlock(b)),
                Dirty::Raw(raw) => raw.clone(),
            };
            self.store
                .write_at(&packed[..], b * METADATA_BLOCK_SIZE as u64)
                .map_err(|e| io_err(format!("metadata block {b}"))(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// After a durable commit: dirty nodes become clean cache entries.
    pub fn forget_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for (b, d) in dirty {
            if let Dirty::Node(n) = d {
                if self.msm.count_resident(b) > 0 {
                    self.cache_insert(b, n);
                }
            }
        }
    }
}

fn not_a_node(b: MetaBlock) -> Error {
    Error::Inconsistent {
        block: b,
        reason: "expected a btree node, found a space map block".into(),
    }
}

/// A cached node was validated with the value size of the tree that first read it;
/// a different tree reaching it must agree (`read_node` for a block read anew checks
/// this in `Node::unpack`).
fn check_leaf_vs(n: &Node, b: MetaBlock, leaf_vs: u32) -> Result<()> {
    if n.is_leaf() && n.value_size != leaf_vs {
        return Err(thinvol_format::FormatError::new(
            b,
            thinvol_format::checksum::BlockKind::BtreeNode,
            thinvol_format::NodeError::ValueSizeMismatch {
                found: n.value_size,
                expected: leaf_vs,
            },
        )
        .into());
    }
    Ok(())
}

/// Loads data space map chunks through the metadata device.
pub(crate) struct DataChunks<'a> {
    pub tm: &'a mut Tm,
}

impl ChunkSource for DataChunks<'_> {
    fn load_chunk(
        &mut self,
        index: usize,
        entry: &IndexEntry,
        overflow_root: MetaBlock,
    ) -> Result<Vec<u32>> {
        load_chunk(self.tm, index, entry, overflow_root)
    }
}

/// Exact counts of one bitmap: 2-bit entries, with 3 resolved in the overflow tree.
pub(crate) fn load_chunk(
    tm: &mut Tm,
    index: usize,
    entry: &IndexEntry,
    overflow_root: MetaBlock,
) -> Result<Vec<u32>> {
    let per = bitmap::ENTRIES_PER_BITMAP;
    let loc = MetaBlock(entry.blocknr);
    if entry.blocknr == 0 {
        return Err(Error::Inconsistent {
            block: loc,
            reason: format!("space map bitmap {index} has no location"),
        });
    }
    let raw = match tm.dirty.get(&loc.0) {
        Some(Dirty::Raw(r)) => r.clone(),
        _ => tm.read_raw(loc)?,
    };
    let small = bitmap::unpack(&raw, loc)?;
    let mut counts: Vec<u32> = small.iter().map(|&c| u32::from(c)).collect();
    if small.contains(&3) {
        let base = index as u64 * per;
        let mut seen = vec![false; counts.len()];
        crate::btree::walk_range(tm, overflow_root, 4, base, base + per, &mut |k, v| {
            let c = u32::from_le_bytes(v.try_into().unwrap_or([0; 4]));
            let i = (k - base) as usize;
            counts[i] = c;
            seen[i] = true;
            Ok(())
        })?;
        if let Some(i) = (0..counts.len()).find(|&i| small[i] == 3 && !seen[i]) {
            return Err(Error::Inconsistent {
                block: loc,
                reason: format!(
                    "bitmap says block {} has count >= 3 but the overflow tree has no entry",
                    base + i as u64
                ),
            });
        }
    }
    Ok(counts)
}

/// Pack the metadata index block.
pub(crate) fn pack_metadata_index(entries: &[IndexEntry], loc: MetaBlock) -> Box<Block> {
    metadata_index::pack(entries, loc)
}
