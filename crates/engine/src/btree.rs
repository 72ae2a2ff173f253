//! Copy-on-write B-trees in the dm-btree on-disk format.
//!
//! Every mutation shadows the path from the root (so committed nodes are never
//! modified) and returns the new root. Shapes kept for `thin_check` (dmthin-format.md
//! §3.4): keys strictly increasing; an internal node's key is <= the first key of its
//! child; every non-root node holds at least max_entries/3 entries; all leaves at one
//! depth; the only empty node is an empty leaf root.
//!
//! Algorithms are ours (bottom-up split on overflow, sibling merge/redistribute on
//! underflow); reference counting follows dm-btree exactly: a node's count is the
//! number of pointers to it, shadowing a shared node increments its children, and a
//! leaf value's references are managed through [`ValueOps`].

use std::collections::HashSet;
use std::sync::Arc;

use thinvol_format::btree_node::Node;
use thinvol_format::MetaBlock;

use crate::error::{Error, Result};
use crate::tm::{Tm, ValueOps};

/// Deepest tree we will descend; far beyond any real tree, guards against cycles in
/// corrupt metadata (the kernel uses 64 for deletion).
pub(crate) const MAX_DEPTH: usize = 64;

fn too_deep(b: MetaBlock) -> Error {
    Error::Inconsistent {
        block: b,
        reason: format!("tree deeper than {MAX_DEPTH} levels (a cycle?)"),
    }
}

fn empty_internal(b: MetaBlock) -> Error {
    Error::Inconsistent {
        block: b,
        reason: "internal node with no entries".into(),
    }
}

/// Create an empty tree (an empty leaf root, `dm_btree_empty`).
pub(crate) fn empty(tm: &mut Tm, value_size: u32) -> Result<MetaBlock> {
    tm.new_node(Node::new_leaf(value_size))
}

/// Look up `key`; returns a copy of its value.
pub(crate) fn lookup(tm: &mut Tm, root: MetaBlock, vs: u32, key: u64) -> Result<Option<Vec<u8>>> {
    let mut b = root;
    for _ in 0..MAX_DEPTH {
        let n = tm.node(b, vs)?;
        if n.is_leaf() {
            return Ok(n.find(key).map(|i| n.value(i).to_vec()));
        }
        if n.is_empty() {
            return Err(empty_internal(b));
        }
        match n.lower_bound(key) {
            Some(i) => b = n.child(i),
            None => return Ok(None),
        }
    }
    Err(too_deep(root))
}

/// Look up `key` in a tree of 8-byte values, without copying the value out.
pub(crate) fn lookup_u64(tm: &mut Tm, root: MetaBlock, key: u64) -> Result<Option<u64>> {
    Ok(lookup_u64_exclusive(tm, root, key)?.map(|(v, _)| v))
}

/// Look up a u64 value and report whether every node on the path has count 1.
pub(crate) fn lookup_u64_exclusive(
    tm: &mut Tm,
    root: MetaBlock,
    key: u64,
) -> Result<Option<(u64, bool)>> {
    let mut b = root;
    let mut exclusive = true;
    for _ in 0..MAX_DEPTH {
        exclusive &= tm.count(b) == 1;
        let n = tm.node(b, 8)?;
        if n.is_leaf() {
            return Ok(n.find(key).map(|i| (n.value_u64(i), exclusive)));
        }
        if n.is_empty() {
            return Err(empty_internal(b));
        }
        match n.lower_bound(key) {
            Some(i) => b = n.child(i),
            None => return Ok(None),
        }
    }
    Err(too_deep(root))
}

/// `lookup_u64_exclusive` for a shared lock: only dirty and cached nodes (no I/O, no
/// cache change). `None` when the lookup cannot be answered that way — a node would
/// have to be read, or something is wrong (then `lookup_u64_exclusive`, under the
/// exclusive lock, reports it).
#[inline]
pub(crate) fn peek_u64_exclusive(
    tm: &Tm,
    root: MetaBlock,
    key: u64,
) -> Option<Option<(u64, bool)>> {
    let mut b = root;
    let mut exclusive = true;
    for _ in 0..MAX_DEPTH {
        exclusive &= tm.count(b) == 1;
        let n = tm.peek_node(b)?;
        if n.is_leaf() {
            if n.value_size != 8 {
                return None;
            }
            return Some(n.find(key).map(|i| (n.value_u64(i), exclusive)));
        }
        if n.is_empty() {
            return None;
        }
        match n.lower_bound(key) {
            Some(i) => b = n.child(i),
            None => return Some(None),
        }
    }
    None
}

/// `lookup_u64` for a shared lock; see `peek_u64_exclusive`.
#[inline]
pub(crate) fn peek_u64(tm: &Tm, root: MetaBlock, key: u64) -> Option<Option<u64>> {
    let mut b = root;
    for _ in 0..MAX_DEPTH {
        let n = tm.peek_node(b)?;
        if n.is_leaf() {
            if n.value_size != 8 {
                return None;
            }
            return Some(n.find(key).map(|i| n.value_u64(i)));
        }
        if n.is_empty() {
            return None;
        }
        match n.lower_bound(key) {
            Some(i) => b = n.child(i),
            None => return Some(None),
        }
    }
    None
}

/// Visit every (key, value) with lo <= key < hi in key order.
pub(crate) fn walk_range(
    tm: &mut Tm,
    root: MetaBlock,
    vs: u32,
    lo: u64,
    hi: u64,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    walk_rec(tm, root, vs, lo, hi, f, 0, &mut HashSet::new())
}

/// `seen`: nodes already visited in this walk. Within one tree every node has exactly
/// one parent pointer, so a second visit means corrupt metadata; without this check a
/// chain of nodes whose children repeat would cost 2^depth visits.
#[allow(clippy::too_many_arguments)]
fn walk_rec(
    tm: &mut Tm,
    b: MetaBlock,
    vs: u32,
    lo: u64,
    hi: u64,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    depth: usize,
    seen: &mut HashSet<u64>,
) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    if !seen.insert(b.0) {
        return Err(Error::Inconsistent {
            block: b,
            reason: "node reached twice in one tree (a cycle or a shared child)".into(),
        });
    }
    let n = tm.read_node(b, vs)?;
    if n.is_leaf() {
        let start = n.keys.partition_point(|&k| k < lo);
        for i in start..n.len() {
            if n.keys[i] >= hi {
                break;
            }
            f(n.keys[i], n.value(i))?;
        }
        return Ok(());
    }
    if n.is_empty() {
        return Err(empty_internal(b));
    }
    let first = n.lower_bound(lo).unwrap_or(0);
    for i in first..n.len() {
        if n.keys[i] >= hi {
            break;
        }
        walk_rec(tm, n.child(i), vs, lo, hi, f, depth + 1, seen)?;
    }
    Ok(())
}

/// Collect all entries (small trees: details, index).
pub(crate) fn collect(tm: &mut Tm, root: MetaBlock, vs: u32) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    walk_range(tm, root, vs, 0, u64::MAX, &mut |k, v| {
        out.push((k, v.to_vec()));
        Ok(())
    })?;
    Ok(out)
}

/// Insert or overwrite. Returns the new root and the previous value, if any; the caller
/// owns the previous value's reference (decrement it if it differs).
pub(crate) fn insert(
    tm: &mut Tm,
    vops: &mut dyn ValueOps,
    root: MetaBlock,
    key: u64,
    value: &[u8],
) -> Result<(MetaBlock, Option<Vec<u8>>)> {
    let (nr, split, old) = insert_rec(tm, vops, root, key, value, 0)?;
    match split {
        None => Ok((nr, old)),
        Some((rkey, rb)) => {
            let first = first_key(tm.node_mut(nr));
            let mut top = Node::new_internal();
            top.insert_at(0, first, &nr.0.to_le_bytes());
            top.insert_at(1, rkey, &rb.0.to_le_bytes());
            Ok((tm.new_node(top)?, old))
        }
    }
}

fn first_key(n: &Node) -> u64 {
    n.keys.first().copied().unwrap_or(0)
}

type InsertOut = (MetaBlock, Option<(u64, MetaBlock)>, Option<Vec<u8>>);

fn insert_rec(
    tm: &mut Tm,
    vops: &mut dyn ValueOps,
    b: MetaBlock,
    key: u64,
    value: &[u8],
    depth: usize,
) -> Result<InsertOut> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    let nb = tm.shadow(b, vops)?;
    let mut old = None;
    if tm.node_mut(nb).is_leaf() {
        let n = tm.node_mut(nb);
        match n.keys.binary_search(&key) {
            Ok(i) => {
                old = Some(n.value(i).to_vec());
                n.value_mut(i).copy_from_slice(value);
                return Ok((nb, None, old));
            }
            Err(i) => n.insert_at(i, key, value),
        }
    } else {
        let n = tm.node_mut(nb);
        if n.is_empty() {
            return Err(empty_internal(b));
        }
        let i = match n.lower_bound(key) {
            Some(i) => i,
            None => {
                n.keys[0] = key;
                0
            }
        };
        let child = n.child(i);
        let (nc, split, o) = insert_rec(tm, vops, child, key, value, depth + 1)?;
        old = o;
        let n = tm.node_mut(nb);
        n.set_value_u64(i, nc.0);
        if let Some((k, r)) = split {
            n.insert_at(i + 1, k, &r.0.to_le_bytes());
        }
    }
    let n = tm.node_mut(nb);
    if n.len() > n.max_entries as usize {
        let right = n.split_off(n.len() / 2);
        let rkey = first_key(&right);
        let rb = tm.new_node(right)?;
        return Ok((nb, Some((rkey, rb)), old));
    }
    Ok((nb, None, old))
}

/// Shadow the path to `key` and return (new root, leaf block, index of key in leaf).
/// The caller may then edit the value in place through `tm.node_mut(leaf)`; reference
/// ownership of the value does not change. Returns None (nothing modified) if absent.
pub(crate) fn shadow_to(
    tm: &mut Tm,
    vops: &mut dyn ValueOps,
    root: MetaBlock,
    key: u64,
) -> Result<Option<(MetaBlock, MetaBlock, usize)>> {
    if lookup(tm, root, vops.value_size(), key)?.is_none() {
        return Ok(None);
    }
    let new_root = tm.shadow(root, vops)?;
    let mut b = new_root;
    for _ in 0..MAX_DEPTH {
        let n = tm.node_mut(b);
        if n.is_leaf() {
            let i = n.find(key).expect("lookup found key");
            return Ok(Some((new_root, b, i)));
        }
        let i = n.lower_bound(key).expect("lookup found key");
        let child = n.child(i);
        let nc = tm.shadow(child, vops)?;
        tm.node_mut(b).set_value_u64(i, nc.0);
        b = nc;
    }
    Err(too_deep(root))
}

/// Remove `key`. Returns the new root and the removed value (the caller owns its
/// reference), or None and the unchanged root if the key is absent.
pub(crate) fn remove(
    tm: &mut Tm,
    vops: &mut dyn ValueOps,
    root: MetaBlock,
    key: u64,
) -> Result<(MetaBlock, Option<Vec<u8>>)> {
    if lookup(tm, root, vops.value_size(), key)?.is_none() {
        return Ok((root, None));
    }
    let (nr, removed) = remove_rec(tm, vops, root, key, 0)?;
    // A root with a single child is replaced by that child: the root's pointer to the
    // child becomes the tree's root reference, so only the old root is released.
    let mut root = nr;
    for _ in 0..MAX_DEPTH {
        let n = tm.read_node(root, vops.value_size())?;
        if n.is_leaf() || n.len() != 1 {
            break;
        }
        let child = n.child(0);
        tm.dec(root)?;
        root = child;
    }
    Ok((root, Some(removed)))
}

fn remove_rec(
    tm: &mut Tm,
    vops: &mut dyn ValueOps,
    b: MetaBlock,
    key: u64,
    depth: usize,
) -> Result<(MetaBlock, Vec<u8>)> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    let nb = tm.shadow(b, vops)?;
    let n = tm.node_mut(nb);
    if n.is_leaf() {
        let i = n.find(key).expect("caller checked presence");
        let v = n.value(i).to_vec();
        n.remove_at(i);
        return Ok((nb, v));
    }
    let i = n.lower_bound(key).expect("caller checked presence");
    let child = n.child(i);
    let (nc, v) = remove_rec(tm, vops, child, key, depth + 1)?;
    tm.node_mut(nb).set_value_u64(i, nc.0);
    let cn = tm.node_mut(nc);
    if cn.len() < (cn.max_entries / 3) as usize {
        rebalance(tm, vops, nb, i)?;
    }
    Ok((nb, v))
}

/// Fix an underfull child `i` of the (shadowed) internal node `parent` by merging with
/// or borrowing from a neighbour.
fn rebalance(tm: &mut Tm, vops: &mut dyn ValueOps, parent: MetaBlock, i: usize) -> Result<()> {
    let p = tm.node_mut(parent);
    if p.len() < 2 {
        return Ok(()); // Only child: the root collapse in `remove` handles it.
    }
    let (l, r) = if i + 1 < p.len() {
        (i, i + 1)
    } else {
        (i - 1, i)
    };
    let (lb, rb) = (p.child(l), p.child(r));
    let lb = tm.shadow(lb, vops)?;
    let rb = tm.shadow(rb, vops)?;
    {
        let p = tm.node_mut(parent);
        p.set_value_u64(l, lb.0);
        p.set_value_u64(r, rb.0);
    }
    let mut right: Node = tm.node_mut(rb).clone();
    let left = tm.node_mut(lb);
    let total = left.len() + right.len();
    if total <= left.max_entries as usize {
        left.append(&mut right);
        tm.node_mut(parent).remove_at(r);
        // Entries moved to `left`; the right node had count 1 after shadowing.
        tm.dec(rb)?;
    } else {
        let target_left = total / 2;
        if left.len() < target_left {
            // Move the head of right onto the tail of left.
            let take = target_left - left.len();
            let rest = right.split_off(take);
            left.append(&mut right);
            right = rest;
        } else {
            let mut tail = left.split_off(target_left);
            tail.append(&mut right);
            right = tail;
        }
        let rkey = first_key(&right);
        *tm.node_mut(rb) = right;
        tm.node_mut(parent).keys[r] = rkey;
    }
    Ok(())
}

/// Delete a whole tree (`dm_btree_del`): shared subtrees are only decremented; values
/// of leaves that die are released through `vops`.
pub(crate) fn del(tm: &mut Tm, vops: &mut dyn ValueOps, root: MetaBlock) -> Result<()> {
    del_rec(tm, vops, root, 0)
}

fn del_rec(tm: &mut Tm, vops: &mut dyn ValueOps, b: MetaBlock, depth: usize) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    if tm.count(b) > 1 {
        return tm.dec(b);
    }
    let n: Arc<Node> = tm.read_node(b, vops.value_size())?;
    if n.is_leaf() {
        for i in 0..n.len() {
            vops.dec(tm, n.value(i))?;
        }
    } else {
        for i in 0..n.len() {
            del_rec(tm, vops, n.child(i), depth + 1)?;
        }
    }
    tm.dec(b)
}
