//! Volume and snapshot operations. Each is one [`CatalogPool::change`]: the catalog
//! edit and the thin-device operations commit together or not at all.

use thinvol_engine::format::ThinId;

use crate::bound::CatalogPool;
use crate::error::{CatalogError, Result};
use crate::model::{new_uuid, now, Snapshot, Volume};
use crate::names::Name;

fn refused(reason: impl Into<String>) -> CatalogError {
    CatalogError::Refused {
        reason: reason.into(),
    }
}

fn same_pool(cp: &CatalogPool, n: &Name) -> Result<()> {
    if n.pool != cp.name {
        return Err(refused(format!("'{n}' is not in pool '{}'", cp.name)));
    }
    Ok(())
}

/// Create an empty volume of `size` bytes.
pub fn create_volume(cp: &mut CatalogPool, n: &Name, size: u64) -> Result<()> {
    same_pool(cp, n)?;
    if size == 0 {
        return Err(refused("a volume needs a size above zero"));
    }
    let vol = n.vol().to_string();
    let pool = cp.name.clone();
    let what = format!("create {n} ({})", thinvol_engine::format::human_bytes(size));
    cp.change_described(&what, |c, tx| {
        if c.volumes.contains_key(&vol) {
            return Err(CatalogError::Exists {
                kind: "volume",
                name: format!("{pool}/{vol}"),
            });
        }
        let id = c.alloc_thin_id()?;
        tx.create_thin(ThinId(id))?;
        c.volumes.insert(
            vol,
            Volume {
                thin_id: id,
                uuid: new_uuid(),
                size,
                created: now(),
                origin: None,
                snapshots: Default::default(),
            },
        );
        Ok(())
    })
}

/// Snapshot one or more volumes in one transaction (a consistency group).
pub fn snapshot(cp: &mut CatalogPool, names: &[Name]) -> Result<()> {
    for n in names {
        same_pool(cp, n)?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        if !seen.insert(n.vol()) {
            return Err(refused(format!(
                "volume '{}/{}' appears twice in one snapshot group",
                n.pool,
                n.vol()
            )));
        }
    }
    let group = (names.len() > 1).then(new_uuid);
    let pool = cp.name.clone();
    let what = format!(
        "snapshot {}",
        names
            .iter()
            .map(Name::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    cp.change_described(&what, |c, tx| {
        let t = now();
        for n in names {
            let v = c.volume(&pool, n.vol())?;
            if v.snapshots.contains_key(n.snap()) {
                return Err(CatalogError::Exists {
                    kind: "snapshot",
                    name: n.to_string(),
                });
            }
            let (origin, size) = (v.thin_id, v.size);
            let id = c.alloc_thin_id()?;
            tx.create_snap(ThinId(id), ThinId(origin))?;
            c.volume_mut(&pool, n.vol())?.snapshots.insert(
                n.snap().to_string(),
                Snapshot {
                    thin_id: id,
                    uuid: new_uuid(),
                    size,
                    created: t,
                    holds: Default::default(),
                    group: group.clone(),
                },
            );
        }
        Ok(())
    })
}

/// A writable volume from a snapshot.
pub fn clone(cp: &mut CatalogPool, from: &Name, to: &Name) -> Result<()> {
    same_pool(cp, from)?;
    same_pool(cp, to)?;
    let pool = cp.name.clone();
    cp.change_described(&format!("clone {from} as {to}"), |c, tx| {
        let s = c.snapshot(&pool, from.vol(), from.snap())?.clone();
        if c.volumes.contains_key(to.vol()) {
            return Err(CatalogError::Exists {
                kind: "volume",
                name: to.to_string(),
            });
        }
        let id = c.alloc_thin_id()?;
        tx.create_snap(ThinId(id), ThinId(s.thin_id))?;
        c.volumes.insert(
            to.vol().to_string(),
            Volume {
                thin_id: id,
                uuid: new_uuid(),
                size: s.size,
                created: now(),
                origin: Some(format!("{}@{}", from.vol(), from.snap())),
                snapshots: Default::default(),
            },
        );
        Ok(())
    })
}

/// Rename a volume (`POOL/A` -> `POOL/B`) or a snapshot (`POOL/V@A` -> `POOL/V@B`).
pub fn rename(cp: &mut CatalogPool, from: &Name, to: &Name) -> Result<()> {
    same_pool(cp, from)?;
    same_pool(cp, to)?;
    let pool = cp.name.clone();
    let what = format!("rename {from} to {to}");
    match (&from.snapshot, &to.snapshot) {
        (None, None) => cp.change_described(&what, |c, _| {
            let v = c.volume(&pool, from.vol())?.clone();
            if c.volumes.contains_key(to.vol()) {
                return Err(CatalogError::Exists {
                    kind: "volume",
                    name: to.to_string(),
                });
            }
            c.volumes.remove(from.vol());
            // Clones name their origin by volume: keep them pointing at it.
            for other in c.volumes.values_mut() {
                if let Some(o) = &other.origin {
                    if let Some((ov, os)) = o.split_once('@') {
                        if ov == from.vol() {
                            other.origin = Some(format!("{}@{os}", to.vol()));
                        }
                    }
                }
            }
            c.volumes.insert(to.vol().to_string(), v);
            Ok(())
        }),
        (Some(_), Some(_)) if from.vol() == to.vol() => cp.change_described(&what, |c, _| {
            let s = c.snapshot(&pool, from.vol(), from.snap())?.clone();
            let v = c.volume_mut(&pool, from.vol())?;
            if v.snapshots.contains_key(to.snap()) {
                return Err(CatalogError::Exists {
                    kind: "snapshot",
                    name: to.to_string(),
                });
            }
            v.snapshots.remove(from.snap());
            v.snapshots.insert(to.snap().to_string(), s);
            let (old, new) = (
                format!("{}@{}", from.vol(), from.snap()),
                format!("{}@{}", to.vol(), to.snap()),
            );
            for other in c.volumes.values_mut() {
                if other.origin.as_deref() == Some(old.as_str()) {
                    other.origin = Some(new.clone());
                }
            }
            Ok(())
        }),
        _ => Err(refused(
            "rename a volume to a volume, or a snapshot to another snapshot of the same volume",
        )),
    }
}

/// Change a volume's size. Shrinking discards the blocks beyond the new end.
pub fn resize(cp: &mut CatalogPool, n: &Name, size: u64) -> Result<()> {
    same_pool(cp, n)?;
    if n.snapshot.is_some() {
        return Err(refused(
            "snapshots are read-only; resize the volume or a clone",
        ));
    }
    if size == 0 {
        return Err(refused("a volume needs a size above zero"));
    }
    let pool = cp.name.clone();
    let v = cp.catalog.volume(&pool, n.vol())?.clone();
    if size < v.size {
        // Discard what falls beyond the new end (outside the catalog transaction: the
        // blocks are unreachable through the catalog once the size shrinks, and a
        // crash in between leaves the volume at its old size with zeros at the end).
        let bs = cp.pool.block_size();
        let from = size.div_ceil(bs) * bs;
        if v.size > from {
            cp.pool.discard(ThinId(v.thin_id), from, v.size - from)?;
        }
        if !size.is_multiple_of(bs) {
            cp.pool.discard(ThinId(v.thin_id), size, from - size)?;
        }
    }
    let what = format!(
        "resize {n} to {}",
        thinvol_engine::format::human_bytes(size)
    );
    cp.change_described(&what, |c, _| {
        c.volume_mut(&pool, n.vol())?.size = size;
        Ok(())
    })
}

/// Why `n` cannot be destroyed, if anything stands in the way.
fn destroy_blockers(cp: &CatalogPool, n: &Name, recursive: bool) -> Result<Vec<String>> {
    let c = &cp.catalog;
    let pool = &cp.name;
    let mut why = Vec::new();
    match &n.snapshot {
        Some(s) => {
            let sn = c.snapshot(pool, n.vol(), s)?;
            if !sn.holds.is_empty() {
                why.push(format!(
                    "'{n}' is held ({}); release it with 'thinvol release {n}'",
                    sn.holds.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            for cl in c.clones_of(n.vol(), s) {
                why.push(format!(
                    "volume '{pool}/{cl}' is a clone of '{n}'; destroy it first"
                ));
            }
        }
        None => {
            let v = c.volume(pool, n.vol())?;
            if !v.snapshots.is_empty() && !recursive {
                why.push(format!(
                    "'{n}' has {} snapshot(s); destroy them first or use -r",
                    v.snapshots.len()
                ));
            }
            if recursive {
                for (sn, s) in &v.snapshots {
                    if !s.holds.is_empty() {
                        why.push(format!("'{n}@{sn}' is held; release it first"));
                    }
                    for cl in c.clones_of(n.vol(), sn) {
                        why.push(format!(
                            "volume '{pool}/{cl}' is a clone of '{n}@{sn}'; destroy it first"
                        ));
                    }
                }
            }
        }
    }
    Ok(why)
}

/// Destroy a volume (with `recursive`, its snapshots too) or a snapshot.
pub fn destroy(cp: &mut CatalogPool, n: &Name, recursive: bool) -> Result<()> {
    same_pool(cp, n)?;
    let why = destroy_blockers(cp, n, recursive)?;
    if !why.is_empty() {
        return Err(refused(why.join("; ")));
    }
    let pool = cp.name.clone();
    let what = format!("destroy {}{n}", if recursive { "-r " } else { "" });
    cp.change_described(&what, |c, tx| {
        match &n.snapshot {
            Some(s) => {
                let id = c.snapshot(&pool, n.vol(), s)?.thin_id;
                tx.delete(ThinId(id))?;
                c.volume_mut(&pool, n.vol())?.snapshots.remove(s.as_str());
            }
            None => {
                let v = c.volume(&pool, n.vol())?.clone();
                for s in v.snapshots.values() {
                    tx.delete(ThinId(s.thin_id))?;
                }
                tx.delete(ThinId(v.thin_id))?;
                c.volumes.remove(n.vol());
            }
        }
        Ok(())
    })
}

pub fn hold(cp: &mut CatalogPool, n: &Name, tag: &str) -> Result<()> {
    same_pool(cp, n)?;
    let pool = cp.name.clone();
    cp.change_described(&format!("hold {n} ({tag})"), |c, _| {
        let s = c.snapshot_mut(&pool, n.vol(), n.snap())?;
        if !s.holds.insert(tag.to_string()) {
            return Err(refused(format!("'{n}' already has hold '{tag}'")));
        }
        Ok(())
    })
}

pub fn release(cp: &mut CatalogPool, n: &Name, tag: &str) -> Result<()> {
    same_pool(cp, n)?;
    let pool = cp.name.clone();
    cp.change_described(&format!("release {n} ({tag})"), |c, _| {
        let s = c.snapshot_mut(&pool, n.vol(), n.snap())?;
        if !s.holds.remove(tag) {
            let have: Vec<_> = s.holds.iter().cloned().collect();
            return Err(refused(format!(
                "'{n}' has no hold '{tag}' (holds: {})",
                if have.is_empty() {
                    "none".into()
                } else {
                    have.join(", ")
                }
            )));
        }
        Ok(())
    })
}

/// Revert a volume to one of its snapshots in O(1): the volume's name moves to a new
/// thin device that shares the snapshot's mapping tree; the old device is deleted, or
/// kept as snapshot `keep_current`. Newer snapshots stay.
pub fn rollback(cp: &mut CatalogPool, n: &Name, keep_current: Option<&str>) -> Result<()> {
    same_pool(cp, n)?;
    let pool = cp.name.clone();
    let what = match keep_current {
        Some(k) => format!("rollback {n} (previous state kept as @{k})"),
        None => format!("rollback {n}"),
    };
    cp.change_described(&what, |c, tx| {
        let s = c.snapshot(&pool, n.vol(), n.snap())?.clone();
        let v = c.volume(&pool, n.vol())?.clone();
        if let Some(k) = keep_current {
            crate::names::check_component(k, "snapshot", k)?;
            if v.snapshots.contains_key(k) {
                return Err(CatalogError::Exists {
                    kind: "snapshot",
                    name: format!("{pool}/{}@{k}", n.vol()),
                });
            }
        }
        let id = c.alloc_thin_id()?;
        tx.create_snap(ThinId(id), ThinId(s.thin_id))?;
        let vm = c.volume_mut(&pool, n.vol())?;
        match keep_current {
            Some(k) => {
                vm.snapshots.insert(
                    k.to_string(),
                    Snapshot {
                        thin_id: v.thin_id,
                        uuid: new_uuid(),
                        size: v.size,
                        created: now(),
                        holds: Default::default(),
                        group: None,
                    },
                );
            }
            None => tx.delete(ThinId(v.thin_id))?,
        }
        vm.thin_id = id;
        vm.size = s.size;
        Ok(())
    })
}
