//! Delta between two mapping trees from metadata alone, skipping shared subtrees.
//!
//! Committed nodes are immutable and a block number names its contents while it is
//! referenced, so when both walks reach the same node block S (under key range R_a in
//! one tree and R_b in the other), every key of S lies in R_a ∩ R_b and the two devices
//! map those keys identically: S is skipped unread. Node boundaries of the two trees
//! need not line up, so each side is a frontier of (key range, node) items and entries
//! in key order; the walk expands nodes only where the blocks differ. Cost grows with
//! the nodes on changed paths, not with the mapped size (dmthin-format.md §9).
//!
//! Nodes the walk reads from the device are validated in place in one reusable buffer
//! per side (`Tm::view_node`: no decoding into vectors, no allocation, no cache
//! insertion); two leaves over the same key range — the usual case after
//! copy-on-write changes — are compared entry by entry directly, and skipped
//! altogether when their bytes are equal.

use thinvol_format::block_time::BlockTime;
use thinvol_format::btree_node::{NodeAccess, NodeRef};
use thinvol_format::{zeroed_block, Block, DataBlock, MetaBlock};

use std::time::{Duration, Instant};

use crate::btree::MAX_DEPTH;
use crate::error::{Error, Result};
use crate::tm::{NodeView, Tm};

type BlockSet =
    std::collections::HashSet<u64, std::hash::BuildHasherDefault<crate::tm::BlockHasher>>;

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
    /// Nodes asked for ahead of reading (cold metadata only; a hint).
    pub nodes_prefetched: u64,
}

/// Reading a pair of nodes slower than this means they came from the disk, not the
/// page cache (a cached pair takes a few µs): the metadata is cold.
const COLD_PAIR: Duration = Duration::from_micros(40);

/// Two internal nodes over the same key range were just expanded onto the stacks'
/// tops (`new_a`, `new_b`, smallest key last). Child pairs over equal key ranges whose
/// blocks differ will both be read — all of them, in key order, one at a time — so on
/// cold metadata ask for all of them at once: the reads then overlap instead of
/// waiting one after another (thin_delta keeps many reads in flight for the same
/// reason). Equal blocks are skipped unread and not asked for. Only a hint.
fn prefetch_differing(
    tm: &Tm,
    new_a: &[Item],
    new_b: &[Item],
    hinted: &mut BlockSet,
    stats: &mut DeltaStats,
) {
    let mut want = Vec::new();
    for (x, y) in new_a.iter().rev().zip(new_b.iter().rev()) {
        match (x, y) {
            (
                Item::Node {
                    b: bx,
                    lo: l1,
                    hi: h1,
                    ..
                },
                Item::Node {
                    b: by,
                    lo: l2,
                    hi: h2,
                    ..
                },
            ) if l1 == l2 && h1 == h2 => {
                if bx != by {
                    want.push(*bx);
                    want.push(*by);
                }
            }
            // The layouts part: what follows is read on demand.
            _ => break,
        }
    }
    stats.nodes_prefetched += want.len() as u64;
    hinted.extend(want.iter().map(|b| b.0));
    tm.prefetch(&mut want);
}

/// Read a node of the walk into `buf` (counted in the statistics).
fn read<'t>(
    tm: &'t Tm,
    b: MetaBlock,
    depth: usize,
    buf: &'t mut Block,
    stats: &mut DeltaStats,
) -> Result<NodeView<'t>> {
    if depth >= MAX_DEPTH {
        return Err(Error::Inconsistent {
            block: b,
            reason: "mapping tree too deep".into(),
        });
    }
    let n = tm.view_node(b, 8, buf)?;
    stats.nodes_read += 1;
    Ok(n)
}

/// Replace the node item on top of `stack` by its contents, in order.
fn expand_top(
    tm: &Tm,
    stack: &mut Vec<Item>,
    buf: &mut Block,
    stats: &mut DeltaStats,
) -> Result<()> {
    if let Some(Item::Node { b, lo, hi, depth }) = stack.pop() {
        let n = read(tm, b, depth, buf, stats)?;
        push_view(stack, n, lo, hi, depth);
    }
    Ok(())
}

/// Push every entry under a node as `Same` (used when the caller wants them).
#[allow(clippy::too_many_arguments)]
fn emit_all(
    tm: &Tm,
    b: MetaBlock,
    lo: u64,
    hi: u64,
    depth: usize,
    buf: &mut Block,
    stats: &mut DeltaStats,
    out: &mut Vec<BlockDelta>,
) -> Result<()> {
    let mut stack = vec![Item::Node { b, lo, hi, depth }];
    while let Some(it) = stack.pop() {
        match it {
            Item::Entry { key, block } => out.push(BlockDelta {
                vblock: key,
                left: Some(block),
                right: Some(block),
            }),
            Item::Node { b, lo, hi, depth } => {
                let n = read(tm, b, depth, buf, stats)?;
                push_view(&mut stack, n, lo, hi, depth);
            }
        }
    }
    Ok(())
}

#[inline]
fn block_of(v: u64) -> DataBlock {
    BlockTime::unpack(v).block
}

fn push_view(stack: &mut Vec<Item>, n: NodeView<'_>, lo: u64, hi: u64, depth: usize) {
    match n {
        NodeView::Decoded(n) => push_contents(stack, n, lo, hi, depth),
        NodeView::Raw(n) => push_contents(stack, &n, lo, hi, depth),
    }
}

/// Push a node's entries (leaf) or children (internal) within [lo, hi) on `stack`, so
/// that the smallest key ends on top.
fn push_contents<N: NodeAccess>(stack: &mut Vec<Item>, n: &N, lo: u64, hi: u64, depth: usize) {
    if n.is_leaf() {
        let (start, end) = (n.count_lt(lo), n.count_lt(hi));
        for i in (start..end).rev() {
            stack.push(Item::Entry {
                key: n.key(i),
                block: block_of(n.value_u64(i)),
            });
        }
    } else {
        for i in (0..n.len()).rev() {
            let clo = n.key(i).max(lo);
            let next = if i + 1 < n.len() {
                n.key(i + 1)
            } else {
                u64::MAX
            };
            let chi = next.min(hi);
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

fn merge_views(
    na: NodeView<'_>,
    nb: NodeView<'_>,
    lo: u64,
    hi: u64,
    include_same: bool,
    out: &mut Vec<BlockDelta>,
) {
    match (na, nb) {
        (NodeView::Raw(a), NodeView::Raw(b)) => {
            merge_raw(&a, &b, lo, hi, include_same, out);
        }
        (NodeView::Raw(a), NodeView::Decoded(b)) => merge_leaves(&a, b, lo, hi, include_same, out),
        (NodeView::Decoded(a), NodeView::Raw(b)) => merge_leaves(a, &b, lo, hi, include_same, out),
        (NodeView::Decoded(a), NodeView::Decoded(b)) => {
            merge_leaves(a, b, lo, hi, include_same, out)
        }
    }
}

/// `merge_leaves` for two leaves read from the device: when both hold the same keys
/// (the normal case: a copy-on-write change rewrites values, not keys), compare the
/// value words directly, and equal value bytes mean nothing to report.
fn merge_raw(
    a: &NodeRef<'_>,
    b: &NodeRef<'_>,
    lo: u64,
    hi: u64,
    include_same: bool,
    out: &mut Vec<BlockDelta>,
) {
    if a.key_bytes() != b.key_bytes() {
        return merge_leaves(a, b, lo, hi, include_same, out);
    }
    let (start, end) = (a.count_lt(lo), a.count_lt(hi));
    // Same keys, hence the same value size (8, checked when read) and count.
    let (va, vb) = (
        &a.value_bytes()[start * 8..end * 8],
        &b.value_bytes()[start * 8..end * 8],
    );
    // Groups of entries whose bytes are equal hold nothing to report (unless asked
    // for `Same` entries): one memcmp per group instead of a test per entry.
    const GROUP: usize = 16 * 8;
    for (g, (ga, gb)) in va.chunks(GROUP).zip(vb.chunks(GROUP)).enumerate() {
        if ga == gb && !include_same {
            continue;
        }
        for (k, (x, y)) in ga.chunks_exact(8).zip(gb.chunks_exact(8)).enumerate() {
            if x == y && !include_same {
                continue;
            }
            let x = u64::from_le_bytes(x.try_into().expect("8-byte chunk"));
            let y = u64::from_le_bytes(y.try_into().expect("8-byte chunk"));
            let (bx, by) = (block_of(x), block_of(y));
            if bx != by || include_same {
                out.push(BlockDelta {
                    vblock: a.key(start + g * (GROUP / 8) + k),
                    left: Some(bx),
                    right: Some(by),
                });
            }
        }
    }
}

/// Merge two leaves that cover the same key range [lo, hi) of their trees: every key
/// below `lo` is already done on both sides, so their entries in the range are all
/// there is to compare there.
fn merge_leaves<A: NodeAccess, B: NodeAccess>(
    na: &A,
    nb: &B,
    lo: u64,
    hi: u64,
    include_same: bool,
    out: &mut Vec<BlockDelta>,
) {
    let (mut i, ea) = (na.count_lt(lo), na.count_lt(hi));
    let (mut j, eb) = (nb.count_lt(lo), nb.count_lt(hi));
    while i < ea && j < eb {
        let (x, y) = (na.key(i), nb.key(j));
        if x < y {
            out.push(BlockDelta {
                vblock: x,
                left: Some(block_of(na.value_u64(i))),
                right: None,
            });
            i += 1;
        } else if y < x {
            out.push(BlockDelta {
                vblock: y,
                left: None,
                right: Some(block_of(nb.value_u64(j))),
            });
            j += 1;
        } else {
            let (va, vb) = (na.value_u64(i), nb.value_u64(j));
            if va != vb || include_same {
                let (ba, bb) = (block_of(va), block_of(vb));
                if ba != bb || include_same {
                    out.push(BlockDelta {
                        vblock: x,
                        left: Some(ba),
                        right: Some(bb),
                    });
                }
            }
            i += 1;
            j += 1;
        }
    }
    for i in i..ea {
        out.push(BlockDelta {
            vblock: na.key(i),
            left: Some(block_of(na.value_u64(i))),
            right: None,
        });
    }
    for j in j..eb {
        out.push(BlockDelta {
            vblock: nb.key(j),
            left: None,
            right: Some(block_of(nb.value_u64(j))),
        });
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
    let tm: &Tm = tm;
    let mut stats = DeltaStats::default();
    // One read buffer per side: a node read from the device is used (expanded or
    // merged) before the next one of its side is read.
    let (mut buf_a, mut buf_b) = (zeroed_block(), zeroed_block());
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
    // Blocks hinted by `prefetch_differing` (cold metadata).
    let mut hinted = BlockSet::default();
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
                stats.subtrees_skipped += 1;
                if include_same {
                    emit_all(tm, x, lo, hi, depth, &mut buf_a, &mut stats, &mut out)?;
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
                let started = Instant::now();
                let na = read(tm, x, da, &mut buf_a, &mut stats)?;
                let nb = read(tm, y, db, &mut buf_b, &mut stats)?;
                if na.is_leaf() && nb.is_leaf() {
                    merge_views(na, nb, lo, hi, include_same, &mut out);
                } else {
                    // Cold: slow to read, or hinted as a child of a cold pair (then
                    // fast to read because of the hint, but its children are cold).
                    let cold = started.elapsed() >= COLD_PAIR || hinted.contains(&x.0);
                    let (la, lb) = (a.len(), b.len());
                    push_view(&mut a, na, lo, hi, da);
                    push_view(&mut b, nb, lo, hi, db);
                    if cold {
                        prefetch_differing(tm, &a[la..], &b[lb..], &mut hinted, &mut stats);
                    }
                }
            }
            (Some(Item::Node { .. }), None) => expand_top(tm, &mut a, &mut buf_a, &mut stats)?,
            (None, Some(Item::Node { .. })) => expand_top(tm, &mut b, &mut buf_b, &mut stats)?,
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
                    expand_top(tm, &mut a, &mut buf_a, &mut stats)?
                } else {
                    expand_top(tm, &mut b, &mut buf_b, &mut stats)?
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
                    expand_top(tm, &mut a, &mut buf_a, &mut stats)?;
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
                    expand_top(tm, &mut b, &mut buf_b, &mut stats)?;
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
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinvol_format::btree_node::Node;

    /// A bottom-level leaf from (key, data block, time) triples.
    fn leaf(entries: &[(u64, u64, u32)]) -> Node {
        let mut n = Node::new_leaf(8);
        for &(k, b, t) in entries {
            let v = BlockTime {
                block: DataBlock(b),
                time: t,
            }
            .pack();
            n.insert_at(n.len(), k, &v.to_le_bytes());
        }
        n
    }

    /// The in-place merge of two leaves read from the device agrees with the generic
    /// merge over decoded nodes, for equal and unequal key sets, sub-ranges, values
    /// differing only in time, and with and without `Same` entries.
    #[test]
    fn raw_leaf_merge_agrees_with_decoded_merge() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..300 {
            let len = rnd(253) as usize;
            let base: Vec<(u64, u64, u32)> = (0..len as u64)
                .map(|i| (i * 2 + rnd(2), rnd(50), rnd(4) as u32))
                .collect();
            let mut other = base.clone();
            for e in other.iter_mut() {
                match rnd(20) {
                    0 => e.1 += 1000, // different block
                    1 => e.2 += 1,    // same block, different time
                    _ => {}
                }
            }
            if round % 3 == 0 {
                // Different key sets too.
                other.retain(|_| rnd(10) != 0);
                if let Some(last) = other.last().copied() {
                    other.push((last.0 + 5, 7, 0));
                }
            }
            let (na, nb) = (leaf(&base), leaf(&other));
            let (pa, pb) = (na.pack(MetaBlock(10)), nb.pack(MetaBlock(11)));
            let ra = NodeRef::parse(&pa, MetaBlock(10), Some(8)).unwrap();
            let rb = NodeRef::parse(&pb, MetaBlock(11), Some(8)).unwrap();
            let lo = if round % 2 == 0 { 0 } else { rnd(100) };
            let hi = if round % 5 == 0 {
                u64::MAX
            } else {
                lo + rnd(600)
            };
            for include_same in [false, true] {
                let mut want = Vec::new();
                merge_leaves(&na, &nb, lo, hi, include_same, &mut want);
                let mut got = Vec::new();
                merge_raw(&ra, &rb, lo, hi, include_same, &mut got);
                assert_eq!(got, want, "round {round} same {include_same}");
                let mut mixed = Vec::new();
                merge_views(
                    NodeView::Raw(ra),
                    NodeView::Decoded(&nb),
                    lo,
                    hi,
                    include_same,
                    &mut mixed,
                );
                assert_eq!(mixed, want, "round {round} same {include_same}");
                // Against a plain model of the two maps.
                let ma: std::collections::BTreeMap<u64, u64> =
                    base.iter().map(|e| (e.0, e.1)).collect();
                let mb: std::collections::BTreeMap<u64, u64> =
                    other.iter().map(|e| (e.0, e.1)).collect();
                let keys: std::collections::BTreeSet<u64> = ma
                    .keys()
                    .chain(mb.keys())
                    .copied()
                    .filter(|&k| k >= lo && k < hi)
                    .collect();
                let model: Vec<u64> = keys
                    .into_iter()
                    .filter(|k| include_same || ma.get(k) != mb.get(k))
                    .collect();
                let listed: Vec<u64> = want.iter().map(|d| d.vblock).collect();
                assert_eq!(listed, model, "round {round} same {include_same}");
            }
        }
    }
}
