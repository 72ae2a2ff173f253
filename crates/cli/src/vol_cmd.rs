//! Volume and snapshot commands by name: create, snapshot, clone, list, rename, resize,
//! destroy, hold, release, rollback.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use thinvol_catalog::listing::{self, format_time_utc, Kind};
use thinvol_catalog::{ops, CatalogError};
use thinvol_engine::format::human_bytes;

use crate::common::{
    name, print_json, read_pool, refuse_served, registry, size, snapshot_name, usage, volume_name,
    with_pool,
};

#[derive(Subcommand)]
pub enum VolCmd {
    /// Create an empty volume: POOL/VOL --size SIZE.
    Create {
        name: String,
        /// Volume size, e.g. 10G.
        #[arg(long)]
        size: String,
    },
    /// Snapshot volumes of one pool in one transaction (all or none).
    ///
    /// POOL/VOL@SNAP [POOL/VOL2@SNAP ...]: every snapshot comes from the same commit.
    Snapshot {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// A writable volume from a snapshot: POOL/VOL@SNAP POOL/NEWVOL.
    Clone { snapshot: String, new: String },
    /// List volumes and snapshots with their space, origin, creation time and holds.
    ///
    /// Columns: size, used (mapped), exclusive and shared bytes (as thin_ls counts them),
    /// origin, creation time (UTC), holds. POOL, POOL/VOL or POOL/VOL@SNAP narrows the list.
    List {
        name: Option<String>,
        /// Only volumes or only snapshots.
        #[arg(short = 't', long = "type", value_name = "volume|snapshot")]
        kind: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Rename a volume (POOL/A POOL/B) or a snapshot (POOL/V@A POOL/V@B).
    Rename { old: String, new: String },
    /// Change a volume's size.
    ///
    /// Shrinking discards the data beyond the new end and needs --shrink.
    Resize {
        name: String,
        #[arg(long)]
        size: String,
        /// Confirm that shrinking may discard data.
        #[arg(long)]
        shrink: bool,
    },
    /// Destroy a volume or snapshot.
    ///
    /// Refuses, with the reason, when held or when other names depend on it.
    Destroy {
        name: String,
        /// Also destroy the volume's snapshots.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Destroy even while 'thinvol serve' exports it (its clients then get I/O errors).
        #[arg(long)]
        force: bool,
    },
    /// Hold a snapshot: it cannot be destroyed until every hold is released.
    Hold {
        snapshot: String,
        #[arg(long, default_value = "hold")]
        tag: String,
    },
    /// Release a hold.
    Release {
        snapshot: String,
        #[arg(long, default_value = "hold")]
        tag: String,
    },
    /// Revert a volume to a snapshot in O(1), online; newer snapshots are kept.
    Rollback {
        snapshot: String,
        /// Keep the pre-rollback state as this snapshot of the volume.
        #[arg(long, value_name = "SNAPNAME")]
        keep_current: Option<String>,
        /// Roll back even while 'thinvol serve' exports the volume.
        #[arg(long)]
        force: bool,
    },
}

fn list(target: Option<String>, kind: Option<String>, as_json: bool) -> Result<ExitCode> {
    let kind = kind.map(|k| Kind::parse(&k)).transpose()?;
    let (pools, only) = match &target {
        Some(t) => {
            let n = name(t)?;
            let only = n.volume.is_some().then(|| n.clone());
            (vec![n.pool], only)
        }
        None => (
            registry().list()?.into_iter().map(|r| r.name).collect(),
            None,
        ),
    };
    let mut all = Vec::new();
    for p in &pools {
        match read_pool(p, |h| Ok(listing::entries(h, only.as_ref(), kind)?)) {
            Ok(es) => all.extend(es),
            Err(e) if target.is_none() => {
                eprintln!("thinvol: pool '{p}' skipped: {e:#}");
            }
            Err(e) => return Err(e),
        }
    }
    if as_json {
        print_json(&all)?;
        return Ok(ExitCode::SUCCESS);
    }
    if pools.is_empty() {
        eprintln!(
            "no pools registered; create one with 'thinvol pool create POOL --dir DIR --size SIZE'"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let w = all.iter().map(|e| e.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<w$}  {:>10}  {:>10}  {:>10}  {:>10}  {:<20}  {:<19}  HOLDS",
        "NAME", "SIZE", "USED", "EXCL", "SHARED", "ORIGIN", "CREATED (UTC)"
    );
    for e in &all {
        println!(
            "{:<w$}  {:>10}  {:>10}  {:>10}  {:>10}  {:<20}  {:<19}  {}",
            e.name,
            human_bytes(e.size),
            human_bytes(e.used),
            human_bytes(e.exclusive),
            human_bytes(e.shared),
            e.origin.as_deref().unwrap_or("-"),
            format_time_utc(e.created),
            if e.holds.is_empty() {
                "-".to_string()
            } else {
                e.holds.join(",")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: VolCmd) -> Result<ExitCode> {
    match cmd {
        VolCmd::Create { name: n, size: s } => {
            let n = volume_name(&n)?;
            let bytes = size(&s, "size")?;
            with_pool(&n.pool, |h| Ok(ops::create_volume(h, &n, bytes)?))?;
            println!("created {n} ({})", human_bytes(bytes));
        }
        VolCmd::Snapshot { names } => {
            let ns = names
                .iter()
                .map(|s| snapshot_name(s))
                .collect::<Result<Vec<_>>>()?;
            let pool = ns[0].pool.clone();
            if let Some(other) = ns.iter().find(|n| n.pool != pool) {
                return Err(CatalogError::Refused {
                    reason: format!(
                        "a snapshot group is one transaction of one pool: '{}' and '{other}' \
                         are in different pools; run one snapshot command per pool",
                        ns[0]
                    ),
                }
                .into());
            }
            with_pool(&pool, |h| Ok(ops::snapshot(h, &ns)?))?;
            for n in &ns {
                println!("snapshot {n}");
            }
        }
        VolCmd::Clone { snapshot, new } => {
            let from = snapshot_name(&snapshot)?;
            let to = volume_name(&new)?;
            with_pool(&from.pool, |h| Ok(ops::clone(h, &from, &to)?))?;
            println!("cloned {from} as {to}");
        }
        VolCmd::List {
            name: n,
            kind,
            json: as_json,
        } => return list(n, kind, as_json),
        VolCmd::Rename { old, new } => {
            let from = name(&old)?;
            let to = name(&new)?;
            if from.volume.is_none() || to.volume.is_none() {
                return Err(usage(
                    "rename takes POOL/VOL POOL/NEWVOL or POOL/VOL@SNAP POOL/VOL@NEWSNAP \
                     (pools are renamed by 'pool destroy' + 'pool import' of the directory)",
                ));
            }
            with_pool(&from.pool, |h| Ok(ops::rename(h, &from, &to)?))?;
            println!("renamed {from} to {to}");
        }
        VolCmd::Resize {
            name: n,
            size: s,
            shrink,
        } => {
            let n = volume_name(&n)?;
            let bytes = size(&s, "size")?;
            let old = with_pool(&n.pool, |h| {
                let old = h.catalog.volume(&n.pool, n.vol())?.size;
                if bytes < old && !shrink {
                    return Err(CatalogError::Refused {
                        reason: format!(
                            "shrinking {n} from {} to {} discards the data beyond {}; \
                             add --shrink to confirm",
                            human_bytes(old),
                            human_bytes(bytes),
                            human_bytes(bytes)
                        ),
                    }
                    .into());
                }
                ops::resize(h, &n, bytes)?;
                Ok(old)
            })?;
            println!(
                "resized {n} from {} to {}",
                human_bytes(old),
                human_bytes(bytes)
            );
        }
        VolCmd::Destroy {
            name: n,
            recursive,
            force,
        } => {
            let n = name(&n)?;
            if n.volume.is_none() {
                return Err(usage(format!(
                    "'{n}' is a pool; destroy pools with 'thinvol pool destroy {n}'"
                )));
            }
            with_pool(&n.pool, |h| {
                let mut ids = vec![h.thin_of(&n)?.0];
                if recursive && n.snapshot.is_none() {
                    let v = h.catalog.volume(&n.pool, n.vol())?;
                    ids.extend(v.snapshots.values().map(|s| s.thin_id));
                }
                refuse_served(h, &ids, &format!("destroy {n}"), force)?;
                Ok(ops::destroy(h, &n, recursive)?)
            })?;
            println!("destroyed {n}");
        }
        VolCmd::Hold { snapshot, tag } => {
            let n = snapshot_name(&snapshot)?;
            with_pool(&n.pool, |h| Ok(ops::hold(h, &n, &tag)?))?;
            println!("held {n} ({tag})");
        }
        VolCmd::Release { snapshot, tag } => {
            let n = snapshot_name(&snapshot)?;
            with_pool(&n.pool, |h| Ok(ops::release(h, &n, &tag)?))?;
            println!("released {n} ({tag})");
        }
        VolCmd::Rollback {
            snapshot,
            keep_current,
            force,
        } => {
            let n = snapshot_name(&snapshot)?;
            with_pool(&n.pool, |h| {
                let vol = h.catalog.volume(&n.pool, n.vol())?.thin_id;
                refuse_served(
                    h,
                    &[vol],
                    &format!("roll back {}/{}", n.pool, n.vol()),
                    force,
                )?;
                Ok(ops::rollback(h, &n, keep_current.as_deref())?)
            })?;
            match keep_current {
                Some(k) => println!(
                    "rolled {}/{} back to {n}; the previous state is {}/{}@{k}",
                    n.pool,
                    n.vol(),
                    n.pool,
                    n.vol()
                ),
                None => println!("rolled {}/{} back to {n}", n.pool, n.vol()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
