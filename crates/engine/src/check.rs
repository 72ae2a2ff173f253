//! Full consistency check of committed metadata, as `thin_check` does: walk every tree
//! from the live superblock and the held metadata snapshot, validate every node, count
//! references, and compare with both space maps.
//!
//! Expected counts (dmthin-format.md §6.5): a metadata block's count is the number of
//! pointers to it (parents, roots, top-level values); a data block's count is the number
//! of distinct bottom-level leaves that contain it.

use std::collections::{BTreeMap, HashMap, HashSet};

use thinvol_format::bitmap::ENTRIES_PER_BITMAP;
use thinvol_format::block_time::BlockTime;
use thinvol_format::device_details::{DeviceDetails, DEVICE_DETAILS_SIZE};
use thinvol_format::superblock::Superblock;
use thinvol_format::MetaBlock;

use crate::btree::MAX_DEPTH;
use crate::error::Result;
use crate::metadata::{u64_of, Metadata};
use crate::tm::DataChunks;

/// One problem found by the checker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub block: Option<MetaBlock>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.block {
            Some(b) => write!(f, "metadata block {b}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// What the checker saw.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub problems: Vec<Problem>,
    pub devices: usize,
    pub mappings: u64,
    pub metadata_blocks_referenced: u64,
    pub data_blocks_referenced: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tree {
    Top,
    Bottom,
    Details,
    DataIndex,
    Overflow,
}

impl Tree {
    fn value_size(self) -> u32 {
        match self {
            Tree::Top | Tree::Bottom => 8,
            Tree::Details => DEVICE_DETAILS_SIZE as u32,
            Tree::DataIndex => 16,
            Tree::Overflow => 4,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Tree::Top => "top-level mapping tree",
            Tree::Bottom => "device mapping tree",
            Tree::Details => "device details tree",
            Tree::DataIndex => "data space map index",
            Tree::Overflow => "reference count tree",
        }
    }
}

struct Checker<'a> {
    md: &'a mut Metadata,
    meta_counts: HashMap<u64, u32>,
    data_counts: HashMap<u64, u32>,
    /// Nodes already walked (their subtree is counted once; later visits only add a
    /// reference). Value: number of leaf entries below.
    walked: HashMap<u64, u64>,
    problems: Vec<Problem>,
    leaf_depth: HashMap<u64, usize>,
}

impl Checker<'_> {
    fn problem(&mut self, block: Option<MetaBlock>, message: String) {
        if self.problems.len() < 1000 {
            self.problems.push(Problem { block, message });
        }
    }

    fn refer(&mut self, b: MetaBlock) {
        *self.meta_counts.entry(b.0).or_insert(0) += 1;
    }

    /// Walk a tree; returns the number of leaf entries, or None if unreadable.
    /// `values` receives the leaf values of nodes walked for the first time.
    fn walk(
        &mut self,
        root: MetaBlock,
        tree: Tree,
        values: &mut dyn FnMut(&mut Self, u64, &[u8]),
    ) -> Option<u64> {
        self.walk_node(root, tree, 0, u64::MAX, true, 0, values)
            .map(|(n, _)| n)
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_node(
        &mut self,
        b: MetaBlock,
        tree: Tree,
        lo: u64,
        hi: u64,
        is_root: bool,
        depth: usize,
        values: &mut dyn FnMut(&mut Self, u64, &[u8]),
    ) -> Option<(u64, usize)> {
        self.refer(b);
        if let Some(&n) = self.walked.get(&b.0) {
            return Some((n, self.leaf_depth.get(&b.0).copied().unwrap_or(0)));
        }
        if depth >= MAX_DEPTH {
            self.problem(
                Some(b),
                format!("{}: deeper than {MAX_DEPTH} levels", tree.name()),
            );
            return None;
        }
        let node = match self.md.tm.read_node(b, tree.value_size()) {
            Ok(n) => n,
            Err(e) => {
                self.problem(Some(b), format!("{}: {e}", tree.name()));
                return None;
            }
        };
        if node.max_entries % 3 != 0 {
            self.problem(
                Some(b),
                format!("max_entries {} is not a multiple of 3", node.max_entries),
            );
        }
        let min = (node.max_entries / 3) as usize;
        let underfull_ok = is_root || (tree == Tree::Bottom && node.is_leaf());
        if !underfull_ok && node.len() < min {
            self.problem(
                Some(b),
                format!("{}: {} entries, fewer than {min}", tree.name(), node.len()),
            );
        }
        if !node.is_leaf() && node.is_empty() {
            self.problem(
                Some(b),
                format!("{}: internal node with no entries", tree.name()),
            );
            return None;
        }
        if let (Some(&first), Some(&last)) = (node.keys.first(), node.keys.last()) {
            if first < lo || last >= hi {
                self.problem(
                    Some(b),
                    format!(
                        "{}: keys {first}..={last} outside the parent's range {lo}..{hi}",
                        tree.name()
                    ),
                );
            }
        }
        let (total, height) = if node.is_leaf() {
            for i in 0..node.len() {
                values(self, node.keys[i], node.value(i));
            }
            (node.len() as u64, 0)
        } else {
            let mut total = 0;
            let mut heights = HashSet::new();
            for i in 0..node.len() {
                let clo = node.keys[i];
                let chi = node.keys.get(i + 1).copied().unwrap_or(hi);
                match self.walk_node(node.child(i), tree, clo, chi, false, depth + 1, values) {
                    Some((n, h)) => {
                        total += n;
                        heights.insert(h);
                    }
                    None => return None,
                }
            }
            if heights.len() > 1 {
                self.problem(
                    Some(b),
                    format!("{}: leaves at different depths", tree.name()),
                );
            }
            (total, heights.into_iter().next().unwrap_or(0) + 1)
        };
        self.walked.insert(b.0, total);
        self.leaf_depth.insert(b.0, height);
        Some((total, height))
    }

    /// Walk the trees hanging off one superblock (live or held copy).
    fn walk_roots(
        &mut self,
        sb: &Superblock,
        live: bool,
    ) -> Option<(BTreeMap<u64, DeviceDetails>, BTreeMap<u64, u64>)> {
        let mut details = BTreeMap::new();
        self.walk(sb.device_details_root, Tree::Details, &mut |_, k, v| {
            details.insert(k, DeviceDetails::unpack(v).unwrap_or_default());
        });
        let mut roots = Vec::new();
        self.walk(sb.data_mapping_root, Tree::Top, &mut |_, k, v| {
            roots.push((k, u64_of(v)))
        });
        let mut mapped = BTreeMap::new();
        let nr_data = self.md.dsm.nr_blocks;
        for (dev, root) in roots {
            let n = self.walk(MetaBlock(root), Tree::Bottom, &mut |c, _k, v| {
                let bt = BlockTime::unpack(u64_of(v));
                if bt.block.0 >= nr_data {
                    c.problem(
                        None,
                        format!(
                            "device {dev}: data block {} beyond the data device ({nr_data} blocks)",
                            bt.block.0
                        ),
                    );
                }
                *c.data_counts.entry(bt.block.0).or_insert(0) += 1;
            })?;
            mapped.insert(dev, n);
        }
        let what = if live { "" } else { " (metadata snapshot)" };
        let dk: Vec<u64> = details.keys().copied().collect();
        let mk: Vec<u64> = mapped.keys().copied().collect();
        if dk != mk {
            self.problem(
                None,
                format!(
                    "details tree devices {dk:?} differ from mapping tree devices {mk:?}{what}"
                ),
            );
        }
        for (dev, n) in &mapped {
            if let Some(d) = details.get(dev) {
                if d.mapped_blocks != *n {
                    self.problem(
                        None,
                        format!(
                            "device {dev}: mapped_blocks {} but {n} mappings{what}",
                            d.mapped_blocks
                        ),
                    );
                }
            }
        }
        Some((details, mapped))
    }
}

/// Check committed metadata. The caller must have committed (no dirty blocks).
pub(crate) fn check(md: &mut Metadata) -> Result<CheckReport> {
    let sb = md.sb.clone();
    let mut c = Checker {
        md,
        meta_counts: HashMap::new(),
        data_counts: HashMap::new(),
        walked: HashMap::new(),
        problems: Vec::new(),
        leaf_depth: HashMap::new(),
    };
    c.refer(MetaBlock(0));
    let mut report = CheckReport::default();
    if let Some((details, mapped)) = c.walk_roots(&sb, true) {
        report.devices = details.len();
        report.mappings = mapped.values().sum();
    }
    if sb.held_root.0 != 0 {
        c.refer(sb.held_root);
        match c.md.held_superblock() {
            Ok(Some(h)) => {
                c.walk_roots(&h, false);
            }
            Ok(None) => {}
            Err(e) => c.problem(
                Some(sb.held_root),
                format!("metadata snapshot superblock: {e}"),
            ),
        }
    }
    // Space map structures.
    let dindex = c.md.dsm.bitmap_root;
    let mut bitmaps = Vec::new();
    c.walk(dindex, Tree::DataIndex, &mut |_, _, v| {
        bitmaps.push(
            thinvol_format::index_entry::IndexEntry::unpack(v)
                .unwrap_or_default()
                .blocknr,
        )
    });
    for b in bitmaps {
        c.refer(MetaBlock(b));
    }
    let dovf = c.md.dsm.overflow_root;
    c.walk(dovf, Tree::Overflow, &mut |_, _, _| {});
    let movf = c.md.tm.msm.overflow_root;
    c.walk(movf, Tree::Overflow, &mut |_, _, _| {});
    c.refer(c.md.tm.msm.bitmap_root);
    let mentries: Vec<u64> = c.md.tm.msm.entries.iter().map(|e| e.blocknr).collect();
    for b in mentries {
        c.refer(MetaBlock(b));
    }
    // Compare metadata counts.
    let nr_meta = c.md.tm.msm.nr_blocks;
    let mut meta_problems = Vec::new();
    for b in 0..nr_meta {
        let on_disk = c.md.tm.count(MetaBlock(b));
        let expected = c.meta_counts.get(&b).copied().unwrap_or(0);
        if on_disk != expected {
            let kind = if expected == 0 {
                "leaked"
            } else {
                "bad reference count"
            };
            meta_problems.push(Problem {
                block: Some(MetaBlock(b)),
                message: format!("{kind}: space map says {on_disk}, {expected} references found"),
            });
        }
    }
    for p in meta_problems {
        c.problem(p.block, p.message);
    }
    // Compare data counts (loads every data bitmap).
    let nr_data = c.md.dsm.nr_blocks;
    let mut b = 0;
    while b < nr_data {
        let end = (b + ENTRIES_PER_BITMAP).min(nr_data);
        for x in b..end {
            let on_disk = match c.md.dsm.count(x, &mut DataChunks { tm: &mut c.md.tm }) {
                Ok(n) => n,
                Err(e) => {
                    c.problem(None, format!("data space map: {e}"));
                    break;
                }
            };
            let expected = c.data_counts.get(&x).copied().unwrap_or(0);
            if on_disk != expected {
                let kind = if expected == 0 {
                    "leaked data block"
                } else {
                    "bad data reference count"
                };
                c.problem(
                    None,
                    format!("{kind} {x}: space map says {on_disk}, {expected} leaves reference it"),
                );
            }
        }
        b = end;
    }
    let alloc_meta = c.meta_counts.len() as u64;
    if c.md.tm.msm.nr_allocated
        != (0..nr_meta)
            .filter(|&b| c.md.tm.count(MetaBlock(b)) > 0)
            .count() as u64
    {
        c.problem(
            None,
            "metadata space map nr_allocated does not match its bitmaps".into(),
        );
    }
    report.metadata_blocks_referenced = alloc_meta;
    report.data_blocks_referenced = c.data_counts.len() as u64;
    report.problems = c.problems;
    Ok(report)
}
