//! In-memory reference counts for one device (metadata or data), in the kernel's
//! "ll_disk" shape: one chunk per on-disk bitmap (16 320 blocks), index entries with
//! allocation hints, and exact counts (the on-disk overflow tree is reconciled at commit).
//!
//! Allocation rule (`sm_ll_find_common_free_block`, dmthin-format.md §5.7): a block may
//! be handed out only if its count is zero now AND was zero at the last commit, and it
//! is not reserved by an in-flight data write. So nothing the last commit references is
//! ever overwritten before the next commit.

use std::collections::{BTreeSet, HashMap, HashSet};
use thinvol_format::bitmap::ENTRIES_PER_BITMAP;
use thinvol_format::index_entry::IndexEntry;
use thinvol_format::MetaBlock;

use crate::error::{Error, Result};

const CHUNK: u64 = ENTRIES_PER_BITMAP;

/// Where chunk contents come from when a chunk is first touched.
pub(crate) trait ChunkSource {
    /// Exact counts of chunk `index` whose bitmap lives at `entry.blocknr`.
    fn load_chunk(
        &mut self,
        index: usize,
        entry: &IndexEntry,
        overflow_root: MetaBlock,
    ) -> Result<Vec<u32>>;
}

/// A source for space maps whose chunks are all resident.
pub(crate) struct Resident;

impl ChunkSource for Resident {
    fn load_chunk(&mut self, index: usize, _: &IndexEntry, _: MetaBlock) -> Result<Vec<u32>> {
        Err(Error::Inconsistent {
            block: MetaBlock(0),
            reason: format!("space map chunk {index} is not resident"),
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SpaceMap {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    /// Current index entries; `blocknr` is the committed location until the chunk is
    /// relocated at commit.
    pub entries: Vec<IndexEntry>,
    /// Index entries as of the last commit (to find which changed).
    pub committed_entries: Vec<IndexEntry>,
    chunks: Vec<Option<Box<[u32]>>>,
    /// Count at the last commit of every block changed since.
    orig: HashMap<u64, u32>,
    pub overflow_root: MetaBlock,
    /// Data: root of the index btree. Metadata: location of the index block.
    pub bitmap_root: MetaBlock,
    pub dirty_chunks: BTreeSet<usize>,
    /// Chunks given a new bitmap location in the commit under way.
    pub relocated: HashSet<usize>,
    /// Blocks handed out for in-flight writes but not yet counted.
    reserved: HashSet<u64>,
    cursor: u64,
}

impl SpaceMap {
    /// A space map whose chunks are all present and zero (a fresh device).
    pub fn new_zeroed(nr_blocks: u64) -> Self {
        let n = nr_blocks.div_ceil(CHUNK) as usize;
        let mut sm = SpaceMap {
            nr_blocks,
            nr_allocated: 0,
            entries: Vec::new(),
            committed_entries: Vec::new(),
            chunks: Vec::new(),
            orig: HashMap::new(),
            overflow_root: MetaBlock(0),
            bitmap_root: MetaBlock(0),
            dirty_chunks: BTreeSet::new(),
            relocated: HashSet::new(),
            reserved: HashSet::new(),
            cursor: 0,
        };
        sm.push_zero_chunks(n);
        sm
    }

    fn push_zero_chunks(&mut self, n: usize) {
        for _ in 0..n {
            let i = self.chunks.len();
            self.entries.push(IndexEntry {
                blocknr: 0,
                nr_free: CHUNK as u32,
                none_free_before: 0,
            });
            self.committed_entries.push(IndexEntry::default());
            self.chunks
                .push(Some(vec![0u32; CHUNK as usize].into_boxed_slice()));
            self.dirty_chunks.insert(i);
        }
    }

    /// A space map read from disk: entries known, chunks loaded on demand.
    pub fn from_disk(
        nr_blocks: u64,
        nr_allocated: u64,
        entries: Vec<IndexEntry>,
        bitmap_root: MetaBlock,
        overflow_root: MetaBlock,
    ) -> Self {
        let n = entries.len();
        SpaceMap {
            nr_blocks,
            nr_allocated,
            committed_entries: entries.clone(),
            entries,
            chunks: vec![None; n],
            orig: HashMap::new(),
            overflow_root,
            bitmap_root,
            dirty_chunks: BTreeSet::new(),
            relocated: HashSet::new(),
            reserved: HashSet::new(),
            cursor: 0,
        }
    }

    /// Recount `nr_allocated` from the chunks, all of which must be resident (the
    /// metadata space map): thin_restore 0.9.0 writes a value one too high.
    pub fn recount_allocated(&mut self) {
        self.nr_allocated = self
            .chunks
            .iter()
            .flatten()
            .map(|c| c.iter().filter(|&&n| n > 0).count() as u64)
            .sum();
    }

    pub fn set_chunk(&mut self, i: usize, counts: Vec<u32>) {
        self.chunks[i] = Some(counts.into_boxed_slice());
    }

    fn check_range(&self, b: u64) -> Result<()> {
        if b >= self.nr_blocks {
            return Err(Error::Inconsistent {
                block: MetaBlock(b),
                reason: format!(
                    "block {b} is beyond the space map's {} blocks",
                    self.nr_blocks
                ),
            });
        }
        Ok(())
    }

    fn chunk(&mut self, i: usize, src: &mut dyn ChunkSource) -> Result<&mut [u32]> {
        if self.chunks[i].is_none() {
            let counts = src.load_chunk(i, &self.entries[i], self.overflow_root)?;
            self.chunks[i] = Some(counts.into_boxed_slice());
        }
        Ok(self.chunks[i].as_deref_mut().expect("chunk loaded above"))
    }

    pub fn count(&mut self, b: u64, src: &mut dyn ChunkSource) -> Result<u32> {
        self.check_range(b)?;
        let c = self.chunk((b / CHUNK) as usize, src)?;
        Ok(c[(b % CHUNK) as usize])
    }

    /// Count of a block whose chunk is resident (metadata space map).
    pub fn count_resident(&self, b: u64) -> u32 {
        self.chunks
            .get((b / CHUNK) as usize)
            .and_then(|c| c.as_deref())
            .map_or(0, |c| c[(b % CHUNK) as usize])
    }

    fn set(&mut self, b: u64, new: u32, src: &mut dyn ChunkSource) -> Result<u32> {
        self.check_range(b)?;
        let ci = (b / CHUNK) as usize;
        let off = (b % CHUNK) as usize;
        let old = self.chunk(ci, src)?[off];
        self.orig.entry(b).or_insert(old);
        self.chunk(ci, src)?[off] = new;
        self.dirty_chunks.insert(ci);
        let e = &mut self.entries[ci];
        if old == 0 && new > 0 {
            self.nr_allocated += 1;
            e.nr_free = e.nr_free.saturating_sub(1);
            if e.none_free_before as usize == off {
                e.none_free_before += 1;
            }
        } else if old > 0 && new == 0 {
            // Saturating: a corrupt on-disk nr_allocated must not panic.
            self.nr_allocated = self.nr_allocated.saturating_sub(1);
            e.nr_free += 1;
            e.none_free_before = e.none_free_before.min(off as u32);
        }
        Ok(old)
    }

    pub fn inc(&mut self, b: u64, src: &mut dyn ChunkSource) -> Result<()> {
        let c = self.count(b, src)?;
        let n = c.checked_add(1).ok_or_else(|| Error::Inconsistent {
            block: MetaBlock(b),
            reason: "reference count overflow".into(),
        })?;
        self.set(b, n, src)?;
        Ok(())
    }

    /// Decrement; returns the new count. Underflow means the metadata is inconsistent.
    pub fn dec(&mut self, b: u64, src: &mut dyn ChunkSource) -> Result<u32> {
        let c = self.count(b, src)?;
        if c == 0 {
            return Err(Error::Inconsistent {
                block: MetaBlock(b),
                reason: format!("reference count of block {b} would drop below zero"),
            });
        }
        self.set(b, c - 1, src)?;
        Ok(c - 1)
    }

    /// Whether `b` may be handed out now (§5.7 rule plus reservations).
    fn allocatable(&self, b: u64, count: u32) -> bool {
        count == 0 && self.orig.get(&b).is_none_or(|&o| o == 0) && !self.reserved.contains(&b)
    }

    /// Find a block that may be allocated, starting at the cursor. Does not count it.
    pub fn find_free(&mut self, src: &mut dyn ChunkSource) -> Result<Option<u64>> {
        let n = self.entries.len();
        if n == 0 {
            return Ok(None);
        }
        let start_chunk = ((self.cursor / CHUNK) as usize).min(n - 1);
        for step in 0..=n {
            let ci = (start_chunk + step) % n;
            if self.entries[ci].nr_free == 0 {
                continue;
            }
            let base = ci as u64 * CHUNK;
            let end = (base + CHUNK).min(self.nr_blocks);
            let hint = base + u64::from(self.entries[ci].none_free_before);
            let from = if step == 0 {
                self.cursor.max(hint)
            } else {
                hint
            };
            self.chunk(ci, src)?;
            let counts = self.chunks[ci].as_deref().expect("loaded");
            for b in from.max(base)..end {
                if self.allocatable(b, counts[(b - base) as usize]) {
                    self.cursor = b + 1;
                    return Ok(Some(b));
                }
            }
            if step == 0 && from > hint {
                // Wrapped within the starting chunk: scan its head too.
                for b in hint.max(base)..from.min(end) {
                    if self.allocatable(b, counts[(b - base) as usize]) {
                        self.cursor = b + 1;
                        return Ok(Some(b));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Allocate (count 0 -> 1) a free block.
    pub fn alloc(&mut self, src: &mut dyn ChunkSource) -> Result<Option<u64>> {
        match self.find_free(src)? {
            Some(b) => {
                self.set(b, 1, src)?;
                Ok(Some(b))
            }
            None => Ok(None),
        }
    }

    /// Reserve a free block for an in-flight write; it stays at count 0 until
    /// [`SpaceMap::unreserve`] and a separate `inc`.
    pub fn reserve(&mut self, src: &mut dyn ChunkSource) -> Result<Option<u64>> {
        let b = self.find_free(src)?;
        if let Some(b) = b {
            self.reserved.insert(b);
        }
        Ok(b)
    }

    pub fn unreserve(&mut self, b: u64) {
        self.reserved.remove(&b);
    }

    /// Free blocks that may be allocated in this transaction (excludes blocks freed
    /// since the last commit and reservations).
    pub fn nr_free_now(&self) -> u64 {
        let quarantined = self
            .orig
            .iter()
            .filter(|(b, o)| **o > 0 && self.count_resident_or(**b, 1) == 0)
            .count() as u64;
        self.nr_blocks
            .saturating_sub(self.nr_allocated)
            .saturating_sub(quarantined + self.reserved.len() as u64)
    }

    fn count_resident_or(&self, b: u64, default: u32) -> u32 {
        self.chunks
            .get((b / CHUNK) as usize)
            .and_then(|c| c.as_deref())
            .map_or(default, |c| c[(b % CHUNK) as usize])
    }

    /// Blocks changed since the last commit with their (original, current) counts.
    pub fn changes(&self) -> Vec<(u64, u32, u32)> {
        let mut v: Vec<_> = self
            .orig
            .iter()
            .map(|(&b, &o)| (b, o, self.count_resident_or(b, o)))
            .collect();
        v.sort_unstable();
        v
    }

    /// Blocks whose count dropped to zero in this transaction and were referenced at
    /// the last commit (their contents may be released once the commit is durable).
    pub fn freed_since_commit(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .orig
            .iter()
            .filter(|(&b, &o)| o > 0 && self.count_resident_or(b, 1) == 0)
            .map(|(&b, _)| b)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn chunk_counts(&self, i: usize) -> Option<&[u32]> {
        self.chunks[i].as_deref()
    }

    /// Forget transaction state after a successful commit.
    pub fn committed(&mut self) {
        self.orig.clear();
        self.dirty_chunks.clear();
        self.relocated.clear();
        self.committed_entries = self.entries.clone();
    }

    /// Grow to `nr_blocks` (never shrinks). New chunks start zero and dirty.
    pub fn extend(&mut self, nr_blocks: u64) {
        if nr_blocks <= self.nr_blocks {
            return;
        }
        // The old last bitmap may be partial, and writers disagree on its nr_free: the
        // kernel (and we) count the entries past the end as free, thin_restore and
        // thin_repair count only real blocks. With the latter, blocks added to that
        // bitmap would be skipped as soon as nr_free reached 0. Recount it (kernel
        // convention) when resident; otherwise credit the added blocks, an upper bound
        // being harmless since nr_free only lets `find_free` skip full bitmaps.
        if let Some(last) = self.entries.len().checked_sub(1) {
            let base = last as u64 * CHUNK;
            let added = nr_blocks.min(base + CHUNK) - self.nr_blocks.min(base + CHUNK);
            if added > 0 {
                let free = match self.chunks[last].as_deref() {
                    Some(c) => c.iter().filter(|&&n| n == 0).count() as u32,
                    None => (self.entries[last].nr_free + added as u32).min(CHUNK as u32),
                };
                self.entries[last].nr_free = free;
            }
        }
        let have = self.entries.len();
        let need = nr_blocks.div_ceil(CHUNK) as usize;
        self.nr_blocks = nr_blocks;
        self.push_zero_chunks(need.saturating_sub(have));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_respects_commit_rule() {
        let mut sm = SpaceMap::new_zeroed(100);
        let a = sm.alloc(&mut Resident).unwrap().unwrap();
        sm.committed();
        assert_eq!(sm.dec(a, &mut Resident).unwrap(), 0);
        // a was referenced at the last commit: not reusable before the next one.
        for _ in 0..99 {
            let b = sm.alloc(&mut Resident).unwrap().unwrap();
            assert_ne!(a, b);
        }
        assert_eq!(sm.alloc(&mut Resident).unwrap(), None);
        assert_eq!(sm.freed_since_commit(), vec![a]);
        sm.committed();
        assert_eq!(sm.alloc(&mut Resident).unwrap(), Some(a));
    }

    #[test]
    fn block_allocated_and_freed_in_one_txn_is_reusable() {
        let mut sm = SpaceMap::new_zeroed(1);
        let a = sm.alloc(&mut Resident).unwrap().unwrap();
        sm.dec(a, &mut Resident).unwrap();
        sm.cursor = 0;
        assert_eq!(sm.alloc(&mut Resident).unwrap(), Some(a));
    }

    #[test]
    fn reservations_are_skipped() {
        let mut sm = SpaceMap::new_zeroed(2);
        let r = sm.reserve(&mut Resident).unwrap().unwrap();
        let b = sm.alloc(&mut Resident).unwrap().unwrap();
        assert_ne!(r, b);
        assert_eq!(sm.alloc(&mut Resident).unwrap(), None);
        sm.unreserve(r);
        sm.inc(r, &mut Resident).unwrap();
        assert_eq!(sm.nr_allocated, 2);
    }
}
