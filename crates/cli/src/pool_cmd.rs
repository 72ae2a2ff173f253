//! `thinvol pool ...` and `thinvol check`: pools by name.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;
use thinvol_catalog::manage::{self, Imported};
use thinvol_catalog::Settings;
use thinvol_engine::format::{human_bytes, DataBlockSize};
use thinvol_engine::PoolConfig;

use crate::common::{pct, print_json, print_warnings, read_pool, registry, size, usage, with_pool};
use crate::exit;

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Create a pool in DIR (two sparse files, `metadata` and `data`) and register it.
    Create {
        pool: String,
        /// Directory for the pool's files (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Data size, e.g. 100G.
        #[arg(long)]
        size: String,
        /// Data block size: 64K..1G in multiples of 64K.
        #[arg(long, default_value = "64K")]
        block_size: String,
        /// Metadata size; derived from the data size when omitted.
        #[arg(long)]
        metadata_size: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List registered pools with their usage.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Data and metadata use, thresholds, settings.
    #[command(
        after_help = "With --check the exit code tells the usage level: 0 below every \
threshold, 10 at or above the lowest (default 80%), 11 the middle (90%), 12 the highest \
(95%); with more thresholds, 10 + the index of the highest one reached."
    )]
    Status {
        pool: String,
        /// Exit with 10, 11, 12 when data or metadata use reached the lowest, middle,
        /// highest threshold (for monitoring).
        #[arg(long)]
        check: bool,
        #[arg(long)]
        json: bool,
    },
    /// Grow the pool's data to SIZE (metadata grows with it when needed).
    Grow {
        pool: String,
        #[arg(long)]
        size: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove the pool's files and its registration. Refuses while it has volumes.
    Destroy {
        pool: String,
        /// Destroy the pool with all its volumes and snapshots.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Register an existing pool directory.
    ///
    /// A pool without a catalog (made by `thinvol thin format` or the kernel) is
    /// adopted: each thin device becomes volume thin-ID.
    Import {
        pool: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show or change settings.
    ///
    /// retain_min=N retain_days=N thresholds=80,90,95 (ascending percentages, or none).
    Set {
        pool: String,
        /// KEY=VALUE assignments; none to show the settings.
        settings: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `thinvol check POOL`.
#[derive(Args)]
pub struct CheckArgs {
    pub pool: String,
    #[arg(long)]
    pub json: bool,
}

fn print_report(r: &manage::PoolReport) {
    println!("pool:      {}  ({})", r.name, r.dir.display());
    println!(
        "data:      {} of {} used ({}), {} blocks",
        human_bytes(r.data_used),
        human_bytes(r.data_total),
        pct(r.data_used_percent),
        human_bytes(r.data_block_size)
    );
    println!(
        "metadata:  {} of {} used ({})",
        human_bytes(r.metadata_used),
        human_bytes(r.metadata_total),
        pct(r.metadata_used_percent)
    );
    let th: Vec<String> = r.thresholds.iter().map(|t| format!("{t}%")).collect();
    println!(
        "thresholds: {}",
        if th.is_empty() {
            "none".into()
        } else {
            th.join(", ")
        }
    );
    println!(
        "volumes:   {}  snapshots: {}  retain_min: {}  retain_days: {}",
        r.volumes, r.snapshots, r.settings.retain_min, r.settings.retain_days
    );
    for w in &r.warnings {
        println!("WARNING:   {w}");
    }
}

pub fn run(cmd: PoolCmd) -> Result<ExitCode> {
    let reg = registry();
    match cmd {
        PoolCmd::Create {
            pool,
            dir,
            size: s,
            block_size,
            metadata_size,
            json: as_json,
        } => {
            let bs = size(&block_size, "block size")?;
            let block = DataBlockSize::from_bytes(bs).ok_or_else(|| {
                usage(format!(
                    "block size {block_size} is not 64K..1G in multiples of 64K"
                ))
            })?;
            let cfg = PoolConfig {
                data_block_size: block,
                data_size: size(&s, "size")?,
                metadata_size: metadata_size
                    .map(|m| size(&m, "metadata size"))
                    .transpose()?,
                ..Default::default()
            };
            let h = manage::create_pool(&reg, &pool, &dir, &cfg, Settings::default())?;
            let r = manage::report(&h)?;
            h.close()?;
            if as_json {
                print_json(&r)?;
            } else {
                println!(
                    "created pool '{pool}' in {}: {} data in {} blocks, {} metadata",
                    r.dir.display(),
                    human_bytes(r.data_total),
                    human_bytes(r.data_block_size),
                    human_bytes(r.metadata_total)
                );
            }
        }
        PoolCmd::List { json: as_json } => {
            let regs = reg.list()?;
            let mut rows = Vec::new();
            for r in &regs {
                rows.push(
                    match read_pool(&r.name, |h| Ok(manage::report(h)?)) {
                        Ok(rep) => json!({"name": r.name, "dir": r.dir, "ok": true,
                            "data_total": rep.data_total, "data_used": rep.data_used,
                            "data_used_percent": rep.data_used_percent,
                            "metadata_total": rep.metadata_total, "metadata_used": rep.metadata_used,
                            "metadata_used_percent": rep.metadata_used_percent,
                            "volumes": rep.volumes, "snapshots": rep.snapshots, "level": rep.level}),
                        Err(e) => json!({"name": r.name, "dir": r.dir, "ok": false,
                            "error": format!("{e:#}")}),
                    },
                );
            }
            if as_json {
                print_json(&rows)?;
            } else if rows.is_empty() {
                eprintln!(
                    "no pools registered in {}; create one with 'thinvol pool create POOL --dir DIR --size SIZE'",
                    thinvol_catalog::home::state_dir().display()
                );
            } else {
                println!(
                    "{:<16} {:>10} {:>10} {:>7} {:>7} {:>5} {:>6}  DIR",
                    "NAME", "SIZE", "USED", "USED%", "META%", "VOLS", "SNAPS"
                );
                for r in &rows {
                    if r["ok"] == true {
                        println!(
                            "{:<16} {:>10} {:>10} {:>7} {:>7} {:>5} {:>6}  {}",
                            r["name"].as_str().unwrap_or(""),
                            human_bytes(r["data_total"].as_u64().unwrap_or(0)),
                            human_bytes(r["data_used"].as_u64().unwrap_or(0)),
                            pct(r["data_used_percent"].as_f64().unwrap_or(0.0)),
                            pct(r["metadata_used_percent"].as_f64().unwrap_or(0.0)),
                            r["volumes"].as_u64().unwrap_or(0),
                            r["snapshots"].as_u64().unwrap_or(0),
                            r["dir"].as_str().unwrap_or("")
                        );
                    } else {
                        println!(
                            "{:<16} unavailable: {}  {}",
                            r["name"].as_str().unwrap_or(""),
                            r["error"].as_str().unwrap_or(""),
                            r["dir"].as_str().unwrap_or("")
                        );
                    }
                }
            }
        }
        PoolCmd::Status {
            pool,
            check,
            json: as_json,
        } => {
            let r = read_pool(&pool, |h| Ok(manage::report(h)?))?;
            if as_json {
                print_json(&r)?;
            } else {
                print_report(&r);
            }
            if check {
                return Ok(exit::threshold_code(r.level));
            }
        }
        PoolCmd::Grow {
            pool,
            size: s,
            json: as_json,
        } => {
            let bytes = size(&s, "size")?;
            let g = with_pool(&pool, |h| Ok(manage::grow_pool(h, bytes)?))?;
            if as_json {
                print_json(&g)?;
            } else {
                println!(
                    "pool '{pool}': data {} -> {}, metadata {} -> {}",
                    human_bytes(g.data_before),
                    human_bytes(g.data_after),
                    human_bytes(g.metadata_before),
                    human_bytes(g.metadata_after)
                );
            }
        }
        PoolCmd::Destroy {
            pool,
            force,
            json: as_json,
        } => {
            let d = manage::destroy_pool(&reg, &pool, force)?;
            if as_json {
                print_json(&d)?;
            } else {
                println!(
                    "destroyed pool '{pool}' ({} volume(s), {} snapshot(s)) in {}",
                    d.volumes,
                    d.snapshots,
                    d.dir.display()
                );
                if !d.left.is_empty() {
                    eprintln!(
                        "thinvol: note: left in place in {}: {}",
                        d.dir.display(),
                        d.left.join(", ")
                    );
                }
            }
        }
        PoolCmd::Import {
            pool,
            dir,
            json: as_json,
        } => {
            let (mut h, how) = manage::import_pool(&reg, &pool, &dir)?;
            let vols: Vec<String> = h.catalog.volumes.keys().cloned().collect();
            let r = manage::report(&h)?;
            print_warnings(&mut h);
            h.close()?;
            for w in &r.warnings {
                eprintln!("thinvol: warning: pool '{pool}': {w}");
            }
            if as_json {
                print_json(
                    &json!({"name": pool, "dir": r.dir, "how": how, "volumes": vols,
                    "snapshots": r.snapshots}),
                )?;
            } else {
                match how {
                    Imported::Registered => println!(
                        "registered pool '{pool}' ({} volume(s), {} snapshot(s)) from {}",
                        r.volumes,
                        r.snapshots,
                        r.dir.display()
                    ),
                    Imported::Adopted => println!(
                        "adopted pool '{pool}' from {}: {} thin device(s) became volume(s) {}",
                        r.dir.display(),
                        vols.len(),
                        vols.join(", ")
                    ),
                }
            }
        }
        PoolCmd::Set {
            pool,
            settings,
            json: as_json,
        } => {
            let s = if settings.is_empty() {
                read_pool(&pool, |h| Ok(h.catalog.settings.clone()))?
            } else {
                with_pool(&pool, |h| Ok(manage::set(h, &settings)?))?
            };
            if as_json {
                print_json(&s)?;
            } else {
                let th: Vec<String> = s.thresholds.iter().map(u8::to_string).collect();
                println!(
                    "retain_min={} retain_days={} thresholds={}",
                    s.retain_min,
                    s.retain_days,
                    if th.is_empty() {
                        "none".into()
                    } else {
                        th.join(",")
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `thinvol check POOL`: the pool's metadata check plus catalog/device consistency.
pub fn check(a: CheckArgs) -> Result<ExitCode> {
    let r = with_pool(&a.pool, |h| Ok(manage::check(h)?))?;
    if a.json {
        print_json(&r)?;
    } else if r.clean {
        println!(
            "clean: {} volume(s), {} snapshot(s), {} devices, {} mappings",
            r.volumes, r.snapshots, r.devices, r.mappings
        );
    } else {
        for p in &r.pool_problems {
            println!("pool: {p}");
        }
        for p in &r.catalog_problems {
            println!("catalog: {p}");
        }
    }
    Ok(if r.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::CORRUPT)
    })
}
