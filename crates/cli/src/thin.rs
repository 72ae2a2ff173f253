//! `thinvol thin ...`: pool and thin device plumbing by directory and numeric id
//! (the name-based commands build on the same library calls).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;
use thinvol_engine::format::{human_bytes, parse_size, DataBlockSize, ThinId};
use thinvol_engine::{delta_runs, DeltaKind, Pool, PoolConfig};

use crate::progress::Bar;

#[derive(Subcommand)]
pub enum ThinCmd {
    /// Create a pool directory holding `metadata` and `data` files.
    Format {
        dir: PathBuf,
        /// Data size, e.g. 10G.
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
    /// Create an empty thin device.
    Create { dir: PathBuf, id: u64 },
    /// Snapshot ORIGIN as ID (O(1)).
    Snapshot { dir: PathBuf, id: u64, origin: u64 },
    /// Delete a thin device.
    Delete { dir: PathBuf, id: u64 },
    /// List thin devices.
    List {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Copy a file (or - for stdin) into a device from byte 0; zero blocks are not stored.
    Import {
        dir: PathBuf,
        id: u64,
        file: PathBuf,
        #[arg(long, short)]
        quiet: bool,
        #[arg(long)]
        json: bool,
    },
    /// Copy a device out to a file (sparse) or - for stdout.
    Export {
        dir: PathBuf,
        id: u64,
        file: PathBuf,
        /// Bytes to copy; default: up to the last mapped block.
        #[arg(long)]
        size: Option<String>,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Differences between two devices, from metadata alone.
    Delta {
        dir: PathBuf,
        left: u64,
        right: u64,
        /// Also list identically mapped ranges (reads the shared subtrees).
        #[arg(long)]
        same: bool,
        #[arg(long)]
        json: bool,
    },
    /// Verify every tree and both space maps.
    Check {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Pool usage.
    Status {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Grow the data file to SIZE.
    Grow {
        dir: PathBuf,
        #[arg(long)]
        size: String,
    },
    /// Hold the pool's metadata snapshot (for thin_dump -m / thin_delta -m).
    ReserveMetadataSnap { dir: PathBuf },
    /// Release the metadata snapshot.
    ReleaseMetadataSnap { dir: PathBuf },
}

fn size(s: &str, what: &str) -> Result<u64> {
    parse_size(s).with_context(|| format!("invalid {what} '{s}' (examples: 512M, 10G, 64K)"))
}

fn open(dir: &Path) -> Result<Pool> {
    Pool::open(dir).with_context(|| format!("opening pool {}", dir.display()))
}

fn kind_name(k: DeltaKind) -> &'static str {
    match k {
        DeltaKind::Same => "same",
        DeltaKind::Different => "different",
        DeltaKind::LeftOnly => "left_only",
        DeltaKind::RightOnly => "right_only",
    }
}

pub fn demo(dir: Option<PathBuf>, as_json: bool) -> Result<ExitCode> {
    let tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path().join("pool")
        }
    };
    if dir.join(thinvol_engine::METADATA_FILE).exists() {
        bail!(
            "{} already holds a pool; give an empty or new directory",
            dir.display()
        );
    }
    let mut say = |s: &str| {
        if !as_json {
            println!("{s}");
        }
    };
    let r = thinvol_ops::demo::run(&dir, &mut say)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "summary: data {} of {}, metadata {} of {}; snapshot intact: {}; volume correct: {}; check: {}",
            human_bytes(r.data_used_bytes),
            human_bytes(r.data_total_bytes),
            human_bytes(r.metadata_used_bytes),
            human_bytes(r.metadata_total_bytes),
            r.snapshot_intact,
            r.volume_correct,
            if r.check_clean { "clean" } else { "PROBLEMS" }
        );
    }
    if r.snapshot_intact && r.volume_correct && r.check_clean {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(crate::exit::CORRUPT))
    }
}

pub fn run(cmd: ThinCmd) -> Result<ExitCode> {
    match cmd {
        ThinCmd::Format {
            dir,
            size: s,
            block_size,
            metadata_size,
            json: as_json,
        } => {
            let bs = size(&block_size, "block size")?;
            let block = DataBlockSize::from_bytes(bs).with_context(|| {
                format!("block size {block_size} is not 64K..1G in multiples of 64K")
            })?;
            let cfg = PoolConfig {
                data_block_size: block,
                data_size: size(&s, "size")?,
                metadata_size: metadata_size
                    .map(|m| size(&m, "metadata size"))
                    .transpose()?,
                ..Default::default()
            };
            if dir.join(thinvol_engine::METADATA_FILE).exists() {
                bail!("{} already holds a pool", dir.display());
            }
            let pool = Pool::create(&dir, &cfg)
                .with_context(|| format!("creating pool in {}", dir.display()))?;
            let st = pool.status()?;
            pool.close()?;
            if as_json {
                println!(
                    "{}",
                    json!({"dir": dir, "data_block_size": st.data_block_size, "data_blocks": st.data_blocks_total,
                           "metadata_blocks": st.metadata_blocks_total})
                );
            } else {
                println!(
                    "created pool {}: {} data in {} blocks, {} metadata",
                    dir.display(),
                    human_bytes(st.data_blocks_total * st.data_block_size),
                    human_bytes(st.data_block_size),
                    human_bytes(st.metadata_blocks_total * 4096)
                );
            }
        }
        ThinCmd::Create { dir, id } => {
            let p = open(&dir)?;
            p.create_thin(ThinId(id))?;
            p.close()?;
        }
        ThinCmd::Snapshot { dir, id, origin } => {
            let p = open(&dir)?;
            p.create_snap(ThinId(id), ThinId(origin))?;
            p.close()?;
        }
        ThinCmd::Delete { dir, id } => {
            let p = open(&dir)?;
            p.delete_thin(ThinId(id))?;
            p.close()?;
        }
        ThinCmd::List { dir, json: as_json } => {
            let p = open(&dir)?;
            let bs = p.block_size();
            let devs = p.devices()?;
            if as_json {
                let v: Vec<_> = devs
                    .iter()
                    .map(|d| json!({"id": d.id.0, "mapped_blocks": d.mapped_blocks, "mapped_bytes": d.mapped_blocks * bs,
                                    "transaction_id": d.transaction_id, "creation_time": d.creation_time,
                                    "snapshotted_time": d.snapshotted_time}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:>8}  {:>12}  {:>10}  {:>10}",
                    "ID", "MAPPED", "CREATED", "SNAPPED"
                );
                for d in devs {
                    println!(
                        "{:>8}  {:>12}  {:>10}  {:>10}",
                        d.id.0,
                        human_bytes(d.mapped_blocks * bs),
                        d.creation_time,
                        d.snapshotted_time
                    );
                }
            }
        }
        ThinCmd::Import {
            dir,
            id,
            file,
            quiet,
            json: as_json,
        } => {
            let p = open(&dir)?;
            if !p.exists(ThinId(id))? {
                p.create_thin(ThinId(id))?;
            }
            let mut bar = Bar::new(quiet);
            let stats = if file.as_os_str() == "-" {
                thinvol_ops::copy::reader_into_device(
                    &p,
                    ThinId(id),
                    &mut std::io::stdin().lock(),
                    &mut bar,
                )?
            } else {
                thinvol_ops::copy::file_into_device(&p, ThinId(id), &file, &mut bar)?
            };
            p.close()?;
            if as_json {
                println!("{}", serde_json::to_string(&stats)?);
            } else if !quiet {
                eprintln!(
                    "imported {} ({} written, {} zero or hole)",
                    human_bytes(stats.bytes),
                    human_bytes(stats.bytes_written),
                    human_bytes(stats.bytes_skipped)
                );
            }
        }
        ThinCmd::Export {
            dir,
            id,
            file,
            size: s,
            quiet,
        } => {
            let p = open(&dir)?;
            let len = match s {
                Some(s) => size(&s, "size")?,
                None => p
                    .mappings(ThinId(id))?
                    .last()
                    .map_or(0, |(vb, _)| (vb.0 + 1) * p.block_size()),
            };
            let mut bar = Bar::new(quiet);
            if file.as_os_str() == "-" {
                thinvol_ops::copy::device_to_writer(
                    &p,
                    ThinId(id),
                    len,
                    &mut std::io::stdout().lock(),
                    &mut bar,
                )?;
            } else {
                thinvol_ops::copy::device_to_file(&p, ThinId(id), len, &file, &mut bar)?;
            }
        }
        ThinCmd::Delta {
            dir,
            left,
            right,
            same,
            json: as_json,
        } => {
            let p = open(&dir)?;
            let (d, stats) = p.delta(ThinId(left), ThinId(right), same)?;
            let runs = delta_runs(&d);
            if as_json {
                let v: Vec<_> = runs
                    .iter()
                    .map(|r| json!({"kind": kind_name(r.kind), "begin": r.begin, "length": r.len}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"left": left, "right": right, "block_size": p.block_size(),
                        "runs": v, "nodes_read": stats.nodes_read, "subtrees_skipped": stats.subtrees_skipped})
                    )?
                );
            } else {
                for r in runs {
                    println!("{:<10} {:>12} {:>10}", kind_name(r.kind), r.begin, r.len);
                }
            }
        }
        ThinCmd::Check { dir, json: as_json } => {
            let p = open(&dir)?;
            let r = p.check()?;
            if as_json {
                let probs: Vec<String> = r.problems.iter().map(|x| x.to_string()).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"clean": r.is_clean(), "devices": r.devices,
                        "mappings": r.mappings, "problems": probs})
                    )?
                );
            } else if r.is_clean() {
                println!("clean: {} devices, {} mappings", r.devices, r.mappings);
            } else {
                for x in &r.problems {
                    println!("{x}");
                }
            }
            if !r.is_clean() {
                return Ok(ExitCode::from(crate::exit::CORRUPT));
            }
        }
        ThinCmd::Status { dir, json: as_json } => {
            let p = open(&dir)?;
            let s = p.status()?;
            let pct = |u: u64, t: u64| {
                if t == 0 {
                    0.0
                } else {
                    100.0 * u as f64 / t as f64
                }
            };
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "data_block_size": s.data_block_size,
                        "data_blocks_total": s.data_blocks_total, "data_blocks_used": s.data_blocks_used,
                        "data_used_percent": pct(s.data_blocks_used, s.data_blocks_total),
                        "metadata_blocks_total": s.metadata_blocks_total, "metadata_blocks_used": s.metadata_blocks_used,
                        "metadata_used_percent": pct(s.metadata_blocks_used, s.metadata_blocks_total),
                        "transaction_id": s.transaction_id, "time": s.time, "devices": s.devices,
                        "held_metadata_root": s.held_metadata_root.map(|b| b.0), "needs_check": s.needs_check}))?
                );
            } else {
                println!(
                    "data:     {} of {} used ({:.1}%), {} blocks",
                    human_bytes(s.data_blocks_used * s.data_block_size),
                    human_bytes(s.data_blocks_total * s.data_block_size),
                    pct(s.data_blocks_used, s.data_blocks_total),
                    human_bytes(s.data_block_size)
                );
                println!(
                    "metadata: {} of {} used ({:.1}%)",
                    human_bytes(s.metadata_blocks_used * 4096),
                    human_bytes(s.metadata_blocks_total * 4096),
                    pct(s.metadata_blocks_used, s.metadata_blocks_total)
                );
                println!(
                    "devices: {}  transaction: {}  held metadata snapshot: {}",
                    s.devices,
                    s.transaction_id,
                    s.held_metadata_root
                        .map_or("-".to_string(), |b| b.0.to_string())
                );
            }
        }
        ThinCmd::Grow { dir, size: s } => {
            let p = open(&dir)?;
            p.grow_data(size(&s, "size")?)?;
            p.close()?;
        }
        ThinCmd::ReserveMetadataSnap { dir } => {
            let p = open(&dir)?;
            let b = p.reserve_metadata_snap()?;
            p.close()?;
            println!("{}", b.0);
        }
        ThinCmd::ReleaseMetadataSnap { dir } => {
            let p = open(&dir)?;
            p.release_metadata_snap()?;
            p.close()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
