//! B-tree nodes (`struct node_header` + keys + values, dm-btree-internal.h).
//!
//! ```text
//! 0   u32 csum          salt BTREE_CSUM_XOR
//! 4   u32 flags         INTERNAL_NODE = 1, LEAF_NODE = 2
//! 8   u64 blocknr       own location
//! 16  u32 nr_entries
//! 20  u32 max_entries   multiple of 3 (calc_max_entries)
//! 24  u32 value_size    8 for internal nodes
//! 28  u32 padding
//! 32  max_entries x u64 keys
//! 32 + 8*max_entries    max_entries x value_size values
//! ```
//! Values start after `max_entries` keys, not after `nr_entries` (`value_base`).
//!
//! Two representations: [`Node`], decoded into vectors (what the B-tree code edits),
//! and [`NodeRef`], a validated view over the block's bytes that decodes keys and
//! values on access (for read-only walks: no copy, no allocation). Both validate a
//! block identically ([`Node::unpack`] is [`NodeRef::parse`] plus a copy) and both
//! implement [`NodeAccess`], the read-only accessors generic walks use.

use crate::checksum::{self, BlockKind};
use crate::error::{FormatError, NodeError};
use crate::{le, zeroed_block, Block, MetaBlock, METADATA_BLOCK_SIZE};

pub const CSUM_OFFSET: usize = 0;
pub const FLAGS_OFFSET: usize = CSUM_OFFSET + 4;
pub const BLOCKNR_OFFSET: usize = FLAGS_OFFSET + 4;
pub const NR_ENTRIES_OFFSET: usize = BLOCKNR_OFFSET + 8;
pub const MAX_ENTRIES_OFFSET: usize = NR_ENTRIES_OFFSET + 4;
pub const VALUE_SIZE_OFFSET: usize = MAX_ENTRIES_OFFSET + 4;
pub const PADDING_OFFSET: usize = VALUE_SIZE_OFFSET + 4;
pub const KEYS_OFFSET: usize = PADDING_OFFSET + 4;

pub const INTERNAL_NODE: u32 = 1;
pub const LEAF_NODE: u32 = 2;

/// `calc_max_entries`: as many (key, value) pairs as fit, rounded down to a multiple of 3.
pub const fn calc_max_entries(value_size: usize) -> u32 {
    let n = (METADATA_BLOCK_SIZE - KEYS_OFFSET) / (8 + value_size);
    (n / 3 * 3) as u32
}

/// Max entries of internal nodes and of u64-valued leaves (252).
pub const INTERNAL_MAX_ENTRIES: u32 = calc_max_entries(8);

/// Read-only access to a node's entries, shared by [`Node`] and [`NodeRef`].
pub trait NodeAccess {
    fn is_leaf(&self) -> bool;
    fn len(&self) -> usize;
    /// Key `i`; `i < len()`.
    fn key(&self, i: usize) -> u64;
    /// Value `i` as a u64 (internal nodes: child block; u64 leaves).
    fn value_u64(&self, i: usize) -> u64;

    #[inline]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Child block of an internal node.
    #[inline]
    fn child(&self, i: usize) -> MetaBlock {
        MetaBlock(self.value_u64(i))
    }

    /// Number of keys <= `key` (branch-free binary search).
    #[inline]
    fn count_le(&self, key: u64) -> usize {
        let mut size = self.len();
        if size == 0 {
            return 0;
        }
        let mut base = 0;
        while size > 1 {
            let half = size / 2;
            // Arithmetic instead of a branch: the outcome is unpredictable for random
            // keys, and a mispredicted branch costs more than the whole step.
            base += usize::from(self.key(base + half) <= key) * half;
            size -= half;
        }
        base + usize::from(self.key(base) <= key)
    }

    /// Number of keys < `key`: the index of the first key >= `key`.
    #[inline]
    fn count_lt(&self, key: u64) -> usize {
        match key.checked_sub(1) {
            Some(k) => self.count_le(k),
            None => 0,
        }
    }

    /// Index of the last key <= `key` (`lower_bound` in dm-btree.c), if any.
    #[inline]
    fn lower_bound(&self, key: u64) -> Option<usize> {
        self.count_le(key).checked_sub(1)
    }

    /// Exact-match index.
    #[inline]
    fn find(&self, key: u64) -> Option<usize> {
        self.lower_bound(key).filter(|&i| self.key(i) == key)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Internal,
    Leaf,
}

/// A decoded node. Invariant once validated: `keys.len() * value_size == values.len()`,
/// keys strictly increasing, `keys.len() <= max_entries`. Mutators may temporarily
/// overfill a node; the B-tree code splits it before it is packed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub max_entries: u32,
    pub value_size: u32,
    pub keys: Vec<u64>,
    pub values: Vec<u8>,
}

impl Node {
    pub fn new_leaf(value_size: u32) -> Self {
        Node {
            kind: NodeKind::Leaf,
            max_entries: calc_max_entries(value_size as usize),
            value_size,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    pub fn new_internal() -> Self {
        Node {
            kind: NodeKind::Internal,
            max_entries: INTERNAL_MAX_ENTRIES,
            value_size: 8,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    #[inline]
    pub fn is_leaf(&self) -> bool {
        self.kind == NodeKind::Leaf
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    #[inline]
    fn vs(&self) -> usize {
        self.value_size as usize
    }

    #[inline]
    pub fn value(&self, i: usize) -> &[u8] {
        &self.values[i * self.vs()..(i + 1) * self.vs()]
    }

    #[inline]
    pub fn value_mut(&mut self, i: usize) -> &mut [u8] {
        let vs = self.vs();
        &mut self.values[i * vs..(i + 1) * vs]
    }

    /// Value `i` as a u64 (internal nodes: child block; u64 leaves).
    #[inline]
    pub fn value_u64(&self, i: usize) -> u64 {
        le::u64_at(self.value(i), 0).unwrap_or(0)
    }

    #[inline]
    pub fn set_value_u64(&mut self, i: usize, v: u64) {
        self.value_mut(i).copy_from_slice(&v.to_le_bytes());
    }

    /// Child block of an internal node.
    #[inline]
    pub fn child(&self, i: usize) -> MetaBlock {
        MetaBlock(self.value_u64(i))
    }

    /// Index of the last key <= `key` (`lower_bound` in dm-btree.c), if any.
    #[inline]
    pub fn lower_bound(&self, key: u64) -> Option<usize> {
        NodeAccess::lower_bound(self, key)
    }

    /// Exact-match index.
    #[inline]
    pub fn find(&self, key: u64) -> Option<usize> {
        NodeAccess::find(self, key)
    }

    pub fn insert_at(&mut self, i: usize, key: u64, value: &[u8]) {
        debug_assert_eq!(value.len(), self.vs());
        self.keys.insert(i, key);
        let at = i * self.vs();
        self.values.splice(at..at, value.iter().copied());
    }

    pub fn remove_at(&mut self, i: usize) {
        self.keys.remove(i);
        let vs = self.vs();
        self.values.drain(i * vs..(i + 1) * vs);
    }

    /// Move entries `at..` into a new node of the same shape.
    pub fn split_off(&mut self, at: usize) -> Node {
        let keys = self.keys.split_off(at);
        let values = self.values.split_off(at * self.vs());
        Node {
            kind: self.kind,
            max_entries: self.max_entries,
            value_size: self.value_size,
            keys,
            values,
        }
    }

    /// Append all of `other`'s entries.
    pub fn append(&mut self, other: &mut Node) {
        self.keys.append(&mut other.keys);
        self.values.append(&mut other.values);
    }

    /// Encode and seal for location `loc`. Panics if the node is overfull: that is a
    /// bug in the caller, never a property of input data.
    pub fn pack(&self, loc: MetaBlock) -> Box<Block> {
        assert!(
            self.keys.len() <= self.max_entries as usize,
            "overfull node"
        );
        let mut b = zeroed_block();
        let s = &mut b[..];
        let flags = match self.kind {
            NodeKind::Internal => INTERNAL_NODE,
            NodeKind::Leaf => LEAF_NODE,
        };
        le::put_u32(s, FLAGS_OFFSET, flags);
        le::put_u64(s, BLOCKNR_OFFSET, loc.0);
        le::put_u32(s, NR_ENTRIES_OFFSET, self.keys.len() as u32);
        le::put_u32(s, MAX_ENTRIES_OFFSET, self.max_entries);
        le::put_u32(s, VALUE_SIZE_OFFSET, self.value_size);
        for (i, k) in self.keys.iter().enumerate() {
            le::put_u64(s, KEYS_OFFSET + 8 * i, *k);
        }
        let vbase = KEYS_OFFSET + 8 * self.max_entries as usize;
        s[vbase..vbase + self.values.len()].copy_from_slice(&self.values);
        checksum::seal(s, BlockKind::BtreeNode);
        b
    }

    /// Validate and decode a node read from `loc` (`node_check` + thinp
    /// `unpack_node`): location, checksum, flags, geometry, value size of leaves
    /// (when `leaf_value_size` is given), strictly increasing keys.
    pub fn unpack(
        b: &Block,
        loc: MetaBlock,
        leaf_value_size: Option<u32>,
    ) -> Result<Node, FormatError> {
        NodeRef::parse(b, loc, leaf_value_size).map(|n| n.to_node())
    }
}

impl NodeAccess for Node {
    #[inline]
    fn is_leaf(&self) -> bool {
        Node::is_leaf(self)
    }
    #[inline]
    fn len(&self) -> usize {
        self.keys.len()
    }
    #[inline]
    fn key(&self, i: usize) -> u64 {
        self.keys[i]
    }
    #[inline]
    fn value_u64(&self, i: usize) -> u64 {
        Node::value_u64(self, i)
    }
}

/// A validated node read in place from its block's bytes: keys and values are decoded
/// on access; nothing is copied or allocated. Same validation as [`Node::unpack`].
#[derive(Clone, Copy, Debug)]
pub struct NodeRef<'a> {
    kind: NodeKind,
    max_entries: u32,
    value_size: u32,
    /// `nr_entries` little-endian keys.
    keys: &'a [u8],
    /// `nr_entries` values of `value_size` bytes.
    values: &'a [u8],
}

impl<'a> NodeRef<'a> {
    /// Validate a node read from `loc` (`node_check` + thinp `unpack_node`): location,
    /// checksum, flags, geometry, value size of leaves (when `leaf_value_size` is
    /// given), strictly increasing keys.
    pub fn parse(
        b: &'a Block,
        loc: MetaBlock,
        leaf_value_size: Option<u32>,
    ) -> Result<NodeRef<'a>, FormatError> {
        let err = |r| FormatError::new(loc, BlockKind::BtreeNode, r);
        let u32f = |o| le::u32_at(b, o).unwrap_or(0);
        let recorded = le::u64_at(b, BLOCKNR_OFFSET).unwrap_or(u64::MAX);
        if recorded != loc.0 {
            return Err(err(NodeError::BlockNrMismatch {
                recorded,
                actual: loc.0,
            }));
        }
        checksum::verify(b, BlockKind::BtreeNode)
            .map_err(|(stored, computed)| err(NodeError::Checksum { stored, computed }))?;
        let flags = u32f(FLAGS_OFFSET);
        let kind = if flags & INTERNAL_NODE != 0 {
            NodeKind::Internal
        } else if flags & LEAF_NODE != 0 {
            NodeKind::Leaf
        } else {
            return Err(err(NodeError::BadFlags(flags)));
        };
        let nr = u32f(NR_ENTRIES_OFFSET);
        let max = u32f(MAX_ENTRIES_OFFSET);
        let vsz = u32f(VALUE_SIZE_OFFSET);
        let fits = (8u64 + u64::from(vsz)) * u64::from(max) + KEYS_OFFSET as u64
            <= METADATA_BLOCK_SIZE as u64;
        if !fits || vsz == 0 {
            return Err(err(NodeError::MaxEntriesTooLarge {
                max_entries: max,
                value_size: vsz,
            }));
        }
        if nr > max {
            return Err(err(NodeError::TooManyEntries { nr, max }));
        }
        match kind {
            NodeKind::Internal if vsz != 8 => return Err(err(NodeError::InternalValueSize(vsz))),
            NodeKind::Leaf => {
                if let Some(expected) = leaf_value_size {
                    if vsz != expected {
                        return Err(err(NodeError::ValueSizeMismatch {
                            found: vsz,
                            expected,
                        }));
                    }
                }
            }
            _ => {}
        }
        let nr = nr as usize;
        // In bounds: (8 + vsz) * max + KEYS_OFFSET <= block size and nr <= max.
        let keys = &b[KEYS_OFFSET..KEYS_OFFSET + 8 * nr];
        let vbase = KEYS_OFFSET + 8 * max as usize;
        let values = &b[vbase..vbase + nr * vsz as usize];
        let n = NodeRef {
            kind,
            max_entries: max,
            value_size: vsz,
            keys,
            values,
        };
        let mut prev: Option<u64> = None;
        for (i, k) in n.keys().enumerate() {
            if prev.is_some_and(|p| p >= k) {
                return Err(err(NodeError::KeysOutOfOrder(i)));
            }
            prev = Some(k);
        }
        Ok(n)
    }

    #[inline]
    pub fn kind(&self) -> NodeKind {
        self.kind
    }

    #[inline]
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    #[inline]
    pub fn value_size(&self) -> u32 {
        self.value_size
    }

    #[inline]
    pub fn is_leaf(&self) -> bool {
        self.kind == NodeKind::Leaf
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.keys.len() / 8
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Key `i`; `i < len()`.
    #[inline]
    pub fn key(&self, i: usize) -> u64 {
        let k: [u8; 8] = self.keys[8 * i..8 * i + 8]
            .try_into()
            .expect("8-byte slice");
        u64::from_le_bytes(k)
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + 'a {
        self.keys
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")))
    }

    /// The raw little-endian key bytes (8 per entry).
    #[inline]
    pub fn key_bytes(&self) -> &'a [u8] {
        self.keys
    }

    /// The raw value bytes (`value_size` per entry).
    #[inline]
    pub fn value_bytes(&self) -> &'a [u8] {
        self.values
    }

    #[inline]
    pub fn value(&self, i: usize) -> &'a [u8] {
        let vs = self.value_size as usize;
        &self.values[i * vs..(i + 1) * vs]
    }

    /// Value `i` as a u64 (internal nodes: child block; u64 leaves).
    #[inline]
    pub fn value_u64(&self, i: usize) -> u64 {
        le::u64_at(self.value(i), 0).unwrap_or(0)
    }

    /// Child block of an internal node.
    #[inline]
    pub fn child(&self, i: usize) -> MetaBlock {
        MetaBlock(self.value_u64(i))
    }

    /// Index of the last key <= `key` (`lower_bound` in dm-btree.c), if any.
    #[inline]
    pub fn lower_bound(&self, key: u64) -> Option<usize> {
        NodeAccess::lower_bound(self, key)
    }

    /// Exact-match index.
    #[inline]
    pub fn find(&self, key: u64) -> Option<usize> {
        NodeAccess::find(self, key)
    }

    /// Decode into an owned [`Node`].
    pub fn to_node(&self) -> Node {
        Node {
            kind: self.kind,
            max_entries: self.max_entries,
            value_size: self.value_size,
            keys: self.keys().collect(),
            values: self.values.to_vec(),
        }
    }
}

impl NodeAccess for NodeRef<'_> {
    #[inline]
    fn is_leaf(&self) -> bool {
        NodeRef::is_leaf(self)
    }
    #[inline]
    fn len(&self) -> usize {
        NodeRef::len(self)
    }
    #[inline]
    fn key(&self, i: usize) -> u64 {
        NodeRef::key(self, i)
    }
    #[inline]
    fn value_u64(&self, i: usize) -> u64 {
        NodeRef::value_u64(self, i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_entries_table() {
        assert_eq!(calc_max_entries(8), 252);
        assert_eq!(calc_max_entries(24), 126);
        assert_eq!(calc_max_entries(16), 168);
        assert_eq!(calc_max_entries(4), 336);
    }

    #[test]
    fn round_trip_and_every_bit_flip_detected() {
        let mut n = Node::new_leaf(8);
        for k in 0..100u64 {
            n.insert_at(n.len(), k * 3, &(k * 7).to_le_bytes());
        }
        let b = n.pack(MetaBlock(42));
        assert_eq!(Node::unpack(&b, MetaBlock(42), Some(8)).unwrap(), n);
        assert!(Node::unpack(&b, MetaBlock(42), Some(24)).is_err());
        let r = NodeRef::parse(&b, MetaBlock(42), Some(8)).unwrap();
        assert_eq!(r.to_node(), n);
        assert_eq!(r.keys().collect::<Vec<_>>(), n.keys);
        for i in 0..n.len() {
            assert_eq!(r.key(i), n.keys[i]);
            assert_eq!(r.value(i), n.value(i));
            assert_eq!(r.value_u64(i), n.value_u64(i));
        }
        for bit in (0..4096 * 8).step_by(37) {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Node::unpack(&c, MetaBlock(42), Some(8)).is_err(),
                "bit {bit}"
            );
            assert!(
                NodeRef::parse(&c, MetaBlock(42), Some(8)).is_err(),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn lower_bound() {
        let mut n = Node::new_leaf(8);
        for k in [10u64, 20, 30] {
            n.insert_at(n.len(), k, &[0; 8]);
        }
        assert_eq!(n.lower_bound(5), None);
        assert_eq!(n.lower_bound(10), Some(0));
        assert_eq!(n.lower_bound(25), Some(1));
        assert_eq!(n.lower_bound(99), Some(2));
    }

    #[test]
    fn searches_agree_with_std_binary_search() {
        for len in 0..40u64 {
            let mut n = Node::new_leaf(8);
            for k in 0..len {
                n.insert_at(n.len(), 10 + k * 3, &k.to_le_bytes());
            }
            let b = n.pack(MetaBlock(7));
            let r = NodeRef::parse(&b, MetaBlock(7), Some(8)).unwrap();
            for key in 0..(len * 3 + 20) {
                let want_lb = match n.keys.binary_search(&key) {
                    Ok(i) => Some(i),
                    Err(0) => None,
                    Err(i) => Some(i - 1),
                };
                let want_find = n.keys.binary_search(&key).ok();
                let want_lt = n.keys.partition_point(|&k| k < key);
                assert_eq!(n.lower_bound(key), want_lb, "len {len} key {key}");
                assert_eq!(r.lower_bound(key), want_lb, "len {len} key {key}");
                assert_eq!(n.find(key), want_find);
                assert_eq!(r.find(key), want_find);
                assert_eq!(n.count_lt(key), want_lt);
                assert_eq!(r.count_lt(key), want_lt);
            }
            assert_eq!(n.count_le(u64::MAX), n.len());
            assert_eq!(r.count_lt(0), 0);
        }
    }

    #[test]
    fn out_of_order_keys_rejected_in_place() {
        let mut n = Node::new_leaf(8);
        for k in [1u64, 5, 9] {
            n.insert_at(n.len(), k, &[0; 8]);
        }
        n.keys[2] = 5;
        let b = n.pack(MetaBlock(3));
        let e = NodeRef::parse(&b, MetaBlock(3), Some(8)).unwrap_err();
        assert_eq!(e.reason, NodeError::KeysOutOfOrder(2));
    }
}
