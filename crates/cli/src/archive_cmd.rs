//! `thinvol history POOL` and `thinvol restore POOL POINT_ID`: the metadata archive
//! (restore points recorded after every change; docs/design.md §11.3).

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use thinvol_catalog::archive;
use thinvol_catalog::listing::format_time_utc;
use thinvol_catalog::manage;
use thinvol_catalog::{CatalogPool, Name};

use crate::common::{print_json, registry};

#[derive(Args)]
pub struct HistoryArgs {
    pub pool: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RestoreArgs {
    pub pool: String,
    /// A restore point id from 'thinvol history POOL'.
    pub point: u64,
    #[arg(long)]
    pub json: bool,
}

/// List the restore points, oldest first. Reads only the archive index (the pool is
/// not opened).
pub fn history(a: HistoryArgs) -> Result<ExitCode> {
    Name::pool(&a.pool)?;
    let r = registry().get(&a.pool)?;
    let _lock = manage::lock_dir(&r.dir, &a.pool, false)?;
    let points = archive::history(&r.dir)?;
    if a.json {
        let v: Vec<_> = points
            .iter()
            .map(|p| {
                json!({
                    "id": p.id,
                    "time": p.created,
                    "time_utc": format_time_utc(p.created),
                    "transaction": p.transaction,
                    "description": p.description,
                    "devices": p.devices,
                    "mappings": p.mappings,
                    "bytes": p.bytes,
                })
            })
            .collect();
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    if points.is_empty() {
        println!("pool '{}' has no restore points yet", a.pool);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>8}  {:<19}  {:>11}  DESCRIPTION",
        "ID", "TIME (UTC)", "TRANSACTION"
    );
    for p in &points {
        println!(
            "{:>8}  {:<19}  {:>11}  {}",
            p.id,
            format_time_utc(p.created),
            p.transaction,
            p.description
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Bring back the catalog and devices of a restore point in one transaction. Works
/// also on a pool whose catalog no longer matches its devices (changed outside thinvol,
/// catalog lost): that is what the "catalog and pool disagree" error points to.
pub fn restore(a: RestoreArgs) -> Result<ExitCode> {
    Name::pool(&a.pool)?;
    let reg = registry().get(&a.pool)?;
    let _lock = manage::lock_dir(&reg.dir, &a.pool, true)?;
    let mut cp = CatalogPool::open_for_restore(&a.pool, &reg.dir)?;
    let r = archive::restore(&mut cp, a.point);
    for w in cp.take_warnings() {
        eprintln!("thinvol: warning: {w}");
    }
    let closed = cp.close();
    let r = r?;
    closed?;
    if a.json {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "restored pool '{}' to point {} (transaction {}): {} device(s) rebuilt, {} kept, {} \
         mapping(s) re-created",
        a.pool, r.point, r.transaction, r.rebuilt, r.kept, r.mappings
    );
    if !r.names.is_empty() {
        println!("names now: {}", r.names.join(", "));
    }
    if !r.removed.is_empty() {
        println!("removed (not in the point): {}", r.removed.join(", "));
    }
    println!(
        "note: blocks of writable volumes written in place since the point hold their current \
         data; snapshots are exact"
    );
    Ok(ExitCode::SUCCESS)
}
