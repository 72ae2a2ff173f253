//! Delta between two mapping trees from metadata alone, skipping shared subtrees.
//!
//! Committed nodes are immutable and a block number names its contents while it is
//! referenced, so when both walks reach the same node block S (under key range R_a in
//! one tree and R_b in the other), every key of S lies in R_a ∩ R_b and the two devices
//! map those keys identically: S is skipped unread. Node boundaries of the two trees
//! need not line up, so each side is a frontier of (key range, node) items and entries
//! in key order; the walk expands nodes only where the blocks differ. Cost grows with
//! the nodes on changed paths, not with the mapped size (dmthin-format.md §9).

use std::sync::Arc;

use thinvol_format::block_time::BlockTime;
use thinvol_format::btree_node::Node;
use thinvol_format::{DataBlock, MetaBlock};

use crate::btree::MAX_DEPTH;
use crate::error::{Error, Result};
use crate::tm::Tm;

/// How one virtual block differs between the left and right device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDelta {
    pub vblock: u64,
    pub left: Option<DataBlock>,
    pub right: Option<DataBlock>,
}

impl BlockDelta {
    pub fn kind(&self) -> DeltaKind {
        match (self.left, self.right) {
            (Some(l), Some(r)) if l == r => DeltaKind::Same,
            (Some(_), Some(_)) => DeltaKind::Different,
            (Some(_), None) => DeltaKind::LeftOnly,
            _ => DeltaKind::RightOnly,
        }
    }
}

/// `thin_delta`'s four kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeltaKind {
    Same,
    Different,
    LeftOnly,
    RightOnly,
}

/// A run of consecutive virtual blocks of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaRun {
    pub kind: DeltaKind,
    pub begin: u64,
    pub len: u64,
}

/// Coalesce per-block deltas (sorted by vblock) into runs of adjacent blocks.
pub fn runs(deltas: &[BlockDelta]) -> Vec<DeltaRun> {
    let mut out: Vec<DeltaRun> = Vec::new();
    for d in deltas {
        let k = d.kind();
        match out.last_mut() {
            Some(r) if r.kind == k && r.begin + r.len == d.vblock => r.len += 1,
            _ => out.push(DeltaRun {
                kind: k,
                begin: d.vblock,
                len: 1,
            }),
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Item {
    Node {
        b: MetaBlock,
        lo: u64,
        hi: u64,
        depth: usize,
    },
    Entry {
        key: u64,
        block: DataBlock,
    },
}

/// Statistics of one delta walk (how much of the trees was read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaStats {
    pub nodes_read: u64,
    pub subtrees_skipped: u64,
}

struct Walker<'a> {
    tm: &'a mut Tm,
    stats: DeltaStats,
}

impl Walker<'_> {
    /// Replace a node item on `stack` (already popped) by its contents, in order.
    fn expand(
        &mut self,
        stack: &mut Vec<Item>,
        b: MetaBlock,
        lo: u64,
        hi: u64,
        depth: usize,
    ) -> Result<()> {
        let n = self.read(b, depth)?;
        push_contents(stack, &n, lo, hi, depth);
        Ok(())
    }

    /// Read a node of the walk (counted in the statistics).
    fn read(&mut self, b: MetaBlock, depth: usize) -> Result<Arc<Node>> {
        if depth >= MAX_DEPTH {
            return Err(Error::Inconsistent {
                block: b,
                reason: "mapping tree too deep".into(),
            });
        }
        let n = self.tm.read_node(b, 8)?;
        self.stats.nodes_read += 1;
        Ok(n)
    }

    fn expand_top(&mut self, stack: &mut Vec<Item>) -> Result<()> {
        if let Some(Item::Node { b, lo, hi, depth }) = stack.pop() {
            self.expand(stack, b, lo, hi, depth)?;
        }
        Ok(())
    }

    /// Push every entry under a node as `Same` (used when the caller wants them).
    fn emit_all(
        &mut self,
        b: MetaBlock,
        lo: u64,
        hi: u64,
        depth: usize,
        out: &mut Vec<BlockDelta>,
    ) -> Result<()> {
        let mut stack = Vec::new();
        self.expand(&mut stack, b, lo, hi, depth)?;
        while let Some(it) = stack.pop() {
            match it {
                Item::Entry { key, block } => out.push(BlockDelta {
                    vblock: key,
                    left: Some(block),
                    right: Some(block),
                }),
                Item::Node { b, lo, hi, depth } => self.expand(&mut stack, b, lo, hi, depth)?,
            }
        }
        Ok(())
    }
}

/// Push a node's entries (leaf) or children (internal) within [lo, hi) on `stack`, so
/// that the smallest key ends on top.
fn push_contents(stack: &mut Vec<Item>, n: &Node, lo: u64, hi: u64, depth: usize) {
    if n.is_leaf() {
        for i in (0..n.len()).rev() {
            let k = n.keys[i];
            if k >= lo && k < hi {
                stack.push(Item::Entry {
                    key: k,
                    block: BlockTime::unpack(n.value_u64(i)).block,
                });
            }
        }
    } else {
        for i in (0..n.len()).rev() {
            let clo = n.keys[i].max(lo);
            let chi = n.keys.get(i + 1).copied().unwrap_or(u64::MAX).min(hi);
            if clo < chi {
                stack.push(Item::Node {
                    b: n.child(i),
                    lo: clo,
                    hi: chi,
                    depth: depth + 1,
                });
            }
        }
    }
}

/// Merge two leaves that cover the same key range [lo, hi) of their trees: every key
/// below `lo` is already done on both sides, so their entries in the range are all
/// there is to compare there.
fn merge_leaves(
    na: &Node,
    nb: &Node,
    lo: u64,
    hi: u64,
    include_same: bool,
    out: &mut Vec<BlockDelta>,
) {
    let mut i = na.keys.partition_point(|&k| k < lo);
    let mut j = nb.keys.partition_point(|&k| k < lo);
    let block = |n: &Node, i: usize| BlockTime::unpack(n.value_u64(i)).block;
    loop {
        let ka = na.keys.get(i).copied().filter(|&k| k < hi);
        let kb = nb.keys.get(j).copied().filter(|&k| k < hi);
        match (ka, kb) {
            (None, None) => break,
            (Some(x), None) => {
                out.push(BlockDelta {
                    vblock: x,
                    left: Some(block(na, i)),
                    right: None,
                });
                i += 1;
            }
            (None, Some(y)) => {
                out.push(BlockDelta {
                    vblock: y,
                    left: None,
                    right: Some(block(nb, j)),
                });
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                out.push(BlockDelta {
                    vblock: x,
                    left: Some(block(na, i)),
                    right: None,
                });
                i += 1;
            }
            (Some(x), Some(y)) if y < x => {
                out.push(BlockDelta {
                    vblock: y,
                    left: None,
                    right: Some(block(nb, j)),
                });
                j += 1;
            }
            (Some(x), Some(_)) => {
                let (ba, bb) = (block(na, i), block(nb, j));
                if ba != bb || include_same {
                    out.push(BlockDelta {
                        vblock: x,
                        left: Some(ba),
                        right: Some(bb),
                    });
                }
                i += 1;
                j += 1;
            }
        }
    }
}

/// Compare the bottom-level trees rooted at `left` and `right`. Blocks mapped
/// identically are reported only when `include_same`.
pub(crate) fn delta(
    tm: &mut Tm,
    left: MetaBlock,
    right: MetaBlock,
    include_same: bool,
) -> Result<(Vec<BlockDelta>, DeltaStats)> {
    let mut w = Walker {
        tm,
        stats: DeltaStats::default(),
    };
    let mut a = vec![Item::Node {
        b: left,
        lo: 0,
        hi: u64::MAX,
        depth: 0,
    }];
    let mut b = vec![Item::Node {
        b: right,
        lo: 0,
        hi: u64::MAX,
        depth: 0,
    }];
    let mut out = Vec::new();
    loop {
        match (a.last().copied(), b.last().copied()) {
            (None, None) => break,
            (
                Some(Item::Node {
                    b: x,
                    lo,
                    hi,
                    depth,
                }),
                Some(Item::Node { b: y, .. }),
            ) if x == y => {
                a.pop();
                b.pop();
                w.stats.subtrees_skipped += 1;
                if include_same {
                    w.emit_all(x, lo, hi, depth, &mut out)?;
                }
            }
            (Some(Item::Entry { key, block }), None) => {
                a.pop();
                out.push(BlockDelta {
                    vblock: key,
                    left: Some(block),
                    right: None,
                });
            }
            (None, Some(Item::Entry { key, block })) => {
                b.pop();
                out.push(BlockDelta {
                    vblock: key,
                    left: None,
                    right: Some(block),
                });
            }
            (
                Some(Item::Node {
                    b: x,
                    lo,
                    hi,
                    depth: da,
                }),
                Some(Item::Node {
                    b: y,
                    lo: blo,
                    hi: bhi,
                    depth: db,
                }),
            ) if lo == blo && hi == bhi => {
                // Same key range on both sides (the usual case after copy-on-write
                // changes): two leaves are merged directly instead of entry by entry
                // through the stacks; anything else is expanded on both sides.
                a.pop();
                b.pop();
                let na = w.read(x, da)?;
                let nb = w.read(y, db)?;
                if na.is_leaf() && nb.is_leaf() {
                    merge_leaves(&na, &nb, lo, hi, include_same, &mut out);
                } else {
                    push_contents(&mut a, &na, lo, hi, da);
                    push_contents(&mut b, &nb, lo, hi, db);
                }
            }
            (Some(Item::Node { .. }), None) => w.expand_top(&mut a)?,
            (None, Some(Item::Node { .. })) => w.expand_top(&mut b)?,
            (
                Some(Item::Node {
                    lo: alo, hi: ahi, ..
                }),
                Some(Item::Node {
                    lo: blo, hi: bhi, ..
                }),
            ) => {
                let expand_a = if ahi <= blo {
                    true
                } else if bhi <= alo {
                    false
                } else if alo != blo {
                    alo < blo
                } else {
                    ahi - alo >= bhi - blo
                };
                if expand_a {
                    w.expand_top(&mut a)?
                } else {
                    w.expand_top(&mut b)?
                }
            }
            (Some(Item::Node { lo, .. }), Some(Item::Entry { key, block })) => {
                if key < lo {
                    b.pop();
                    out.push(BlockDelta {
                        vblock: key,
                        left: None,
                        right: Some(block),
                    });
                } else {
                    w.expand_top(&mut a)?;
                }
            }
            (Some(Item::Entry { key, block }), Some(Item::Node { lo, .. })) => {
                if key < lo {
                    a.pop();
                    out.push(BlockDelta {
                        vblock: key,
                        left: Some(block),
                        right: None,
                    });
                } else {
                    w.expand_top(&mut b)?;
                }
            }
            (
                Some(Item::Entry { key: ka, block: ba }),
                Some(Item::Entry { key: kb, block: bb }),
            ) => {
                if ka < kb {
                    a.pop();
                    out.push(BlockDelta {
                        vblock: ka,
                        left: Some(ba),
                        right: None,
                    });
                } else if kb < ka {
                    b.pop();
                    out.push(BlockDelta {
                        vblock: kb,
                        left: None,
                        right: Some(bb),
                    });
                } else {
                    a.pop();
                    b.pop();
                    if ba != bb || include_same {
                        out.push(BlockDelta {
                            vblock: ka,
                            left: Some(ba),
                            right: Some(bb),
                        });
                    }
                }
            }
        }
    }
    Ok((out, w.stats))
}
