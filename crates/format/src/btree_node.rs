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

    pub fn is_leaf(&self) -> bool {
        self.kind == NodeKind::Leaf
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn vs(&self) -> usize {
        self.value_size as usize
    }

    pub fn value(&self, i: usize) -> &[u8] {
        &self.values[i * self.vs()..(i + 1) * self.vs()]
    }

    pub fn value_mut(&mut self, i: usize) -> &mut [u8] {
        let vs = self.vs();
        &mut self.values[i * vs..(i + 1) * vs]
    }

    /// Value `i` as a u64 (internal nodes: child block; u64 leaves).
    pub fn value_u64(&self, i: usize) -> u64 {
        le::u64_at(self.value(i), 0).unwrap_or(0)
    }

    pub fn set_value_u64(&mut self, i: usize, v: u64) {
        self.value_mut(i).copy_from_slice(&v.to_le_bytes());
    }

    /// Child block of an internal node.
    pub fn child(&self, i: usize) -> MetaBlock {
        MetaBlock(self.value_u64(i))
    }

    /// Index of the last key <= `key` (`lower_bound` in dm-btree.c), if any.
    pub fn lower_bound(&self, key: u64) -> Option<usize> {
        match self.keys.binary_search(&key) {
            Ok(i) => Some(i),
            Err(0) => None,
            Err(i) => Some(i - 1),
        }
    }

    /// Exact-match index.
    pub fn find(&self, key: u64) -> Option<usize> {
        self.keys.binary_search(&key).ok()
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
        let keys: Vec<u64> = (0..nr)
            .map(|i| le::u64_at(b, KEYS_OFFSET + 8 * i).unwrap_or(0))
            .collect();
        if let Some(i) = keys.windows(2).position(|w| w[0] >= w[1]) {
            return Err(err(NodeError::KeysOutOfOrder(i + 1)));
        }
        let vbase = KEYS_OFFSET + 8 * max as usize;
        let values = b[vbase..vbase + nr * vsz as usize].to_vec();
        Ok(Node {
            kind,
            max_entries: max,
            value_size: vsz,
            keys,
            values,
        })
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
        for bit in (0..4096 * 8).step_by(37) {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Node::unpack(&c, MetaBlock(42), Some(8)).is_err(),
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
}
