//! `receive --to-file` and `thinvol verify`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use thinvol_stream::digest::{self, hex, unhex, ChunkHashes, LtHash};
use thinvol_stream::file_target::{self, Recovered};
use thinvol_stream::StreamError;

use crate::common::{self, usage};
use crate::send_cmd::{ReceiveArgs, VerifyArgs};
use crate::send_ssh::Remote;

pub fn receive_file(a: &ReceiveArgs, path: &Path) -> Result<ExitCode> {
    if a.recover {
        let r = file_target::recover(path)?;
        eprintln!(
            "thinvol: {}: {}",
            path.display(),
            match r {
                Recovered::Nothing => "nothing to recover",
                Recovered::Finished => "the interrupted apply had verified; finished it",
                Recovered::RolledBack => "rolled back to the snapshot it held before",
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    if a.abort || a.token || a.target.is_some() {
        return Err(usage(
            "--to-file takes no target, --abort or --token (a file apply is undone with --recover)",
        ));
    }
    let inp: Box<dyn std::io::Read> = match &a.input {
        Some(p) => Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        None => Box::new(std::io::BufReader::with_capacity(1 << 20, std::io::stdin())),
    };
    let t0 = std::time::Instant::now();
    let sum = file_target::receive_file(path, inp, a.force)?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let mut j = serde_json::to_value(&sum)?;
        j["seconds"] = serde_json::json!(secs);
        common::print_json(&j)?;
    } else if !a.quiet {
        eprintln!(
            "received {} into {}: {} data, {} zero, {} unmapped in {} records in {secs:.2} s",
            sum.snapshot,
            path.display(),
            thinvol_engine::format::human_bytes(sum.data_bytes),
            thinvol_engine::format::human_bytes(sum.zero_bytes),
            thinvol_engine::format::human_bytes(sum.unmap_bytes),
            sum.records
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What one side of a verify reports (also the `--emit-hashes` JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SideReport {
    pub name: String,
    pub snapshot_uuid: String,
    pub size: u64,
    /// Stored (incrementally maintained) LtHash, hex.
    pub digest: String,
    /// With --full: LtHash recomputed from the content, hex.
    #[serde(default)]
    pub full_digest: Option<String>,
    /// With --full: (chunk index, BLAKE3 hex) of every non-zero 64 KiB chunk.
    #[serde(default)]
    pub chunks: Option<Vec<(u64, String)>>,
}

fn with_full(mut r: SideReport, full: Option<(ChunkHashes, LtHash)>) -> SideReport {
    if let Some((c, d)) = full {
        r.full_digest = Some(hex(&d.to_bytes()));
        r.chunks = Some(c.into_iter().map(|(i, h)| (i, hex(&h))).collect());
    }
    r
}

fn local_side(spec: &str, full: bool) -> Result<SideReport> {
    if let Some(p) = spec.strip_prefix("file:") {
        let path = PathBuf::from(p);
        let st = file_target::load_state(&path)?.ok_or_else(|| {
            StreamError::NotFound(format!(
                "{} (no {} next to it)",
                path.display(),
                file_target::state_path(&path).display()
            ))
        })?;
        let fullv = if full {
            Some(digest::file_chunk_hashes(&path, st.size)?)
        } else {
            None
        };
        return Ok(with_full(
            SideReport {
                name: spec.to_string(),
                snapshot_uuid: st.snapshot_uuid.clone(),
                size: st.size,
                digest: hex(&st.current_lthash(&path)?.to_bytes()),
                full_digest: None,
                chunks: None,
            },
            fullv,
        ));
    }
    let n = common::snapshot_name(spec)?;
    common::read_pool(&n.pool, |h| {
        let v = h.catalog.volume(&n.pool, n.vol())?;
        let s = h.catalog.snapshot(&n.pool, n.vol(), n.snap())?;
        let d = digest::snapshot_digest(&h.pool, &h.dir, v, s)?;
        let fullv = if full {
            Some(digest::pool_chunk_hashes(&h.pool, s.thin_id, s.size)?)
        } else {
            None
        };
        Ok(with_full(
            SideReport {
                name: spec.to_string(),
                snapshot_uuid: s.uuid.clone(),
                size: s.size,
                digest: hex(&d.to_bytes()),
                full_digest: None,
                chunks: None,
            },
            fullv,
        ))
    })
}

fn side(spec: &str, a: &VerifyArgs) -> Result<SideReport> {
    if spec.starts_with("ssh://") {
        let r = Remote::parse(spec)?;
        let mut args = vec!["verify", "--emit-hashes", r.path.as_str()];
        if a.full {
            args.push("--full");
        }
        let out = r.output(&a.ssh_opt, &a.remote_thinvol, &args)?;
        let mut rep: SideReport =
            serde_json::from_slice(&out).context("reading the remote side's report")?;
        rep.name = spec.to_string();
        return Ok(rep);
    }
    local_side(spec, a.full)
}

fn short(hexd: &str) -> String {
    unhex(hexd)
        .and_then(|b| LtHash::from_bytes(&b))
        .map_or_else(|| "?".into(), |d| d.short())
}

pub fn verify_cmd(a: VerifyArgs) -> Result<ExitCode> {
    if a.emit_hashes {
        if a.b.is_some() {
            return Err(usage("--emit-hashes takes one side"));
        }
        let r = local_side(&a.a, a.full)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let b =
        a.b.clone()
            .ok_or_else(|| usage("give two sides: SOURCE@SNAP TARGET@SNAP"))?;
    let x = side(&a.a, &a)?;
    let y = side(&b, &a)?;
    let mut problems = Vec::new();
    if x.size != y.size {
        problems.push(format!("sizes differ: {} vs {}", x.size, y.size));
    }
    if x.digest != y.digest {
        problems.push(format!(
            "content digests differ: {} vs {}",
            short(&x.digest),
            short(&y.digest)
        ));
    }
    let mut ranges = Vec::new();
    if a.full {
        for s in [&x, &y] {
            if s.full_digest.as_deref() != Some(s.digest.as_str()) {
                problems.push(format!(
                    "{}: the stored digest {} does not match the content ({})",
                    s.name,
                    short(&s.digest),
                    s.full_digest.as_deref().map_or("?".into(), short)
                ));
            }
        }
        let conv = |c: &Option<Vec<(u64, String)>>| -> ChunkHashes {
            c.iter()
                .flatten()
                .map(|(i, h)| {
                    let mut a = [0u8; 32];
                    if let Some(b) = unhex(h).filter(|b| b.len() == 32) {
                        a.copy_from_slice(&b);
                    }
                    (*i, a)
                })
                .collect()
        };
        ranges = digest::differing_ranges(&conv(&x.chunks), &conv(&y.chunks));
        if !ranges.is_empty() {
            problems.push(format!("{} differing range(s)", ranges.len()));
        }
    }
    let ok = problems.is_empty();
    if a.json {
        common::print_json(&serde_json::json!({
            "equal": ok,
            "mode": if a.full { "full" } else { "digest" },
            "a": {"name": x.name, "snapshot_uuid": x.snapshot_uuid, "size": x.size, "digest": short(&x.digest)},
            "b": {"name": y.name, "snapshot_uuid": y.snapshot_uuid, "size": y.size, "digest": short(&y.digest)},
            "problems": problems,
            "differing_ranges": ranges.iter().map(|(o, l)| serde_json::json!({"offset": o, "length": l})).collect::<Vec<_>>(),
        }))?;
    } else if ok {
        println!(
            "equal ({}): {} = {} (digest {}, {} bytes{})",
            if a.full {
                "full re-read"
            } else {
                "stored digests"
            },
            x.name,
            y.name,
            short(&x.digest),
            x.size,
            if x.snapshot_uuid == y.snapshot_uuid {
                ", same snapshot uuid".to_string()
            } else {
                format!(
                    ", snapshot uuids differ: {} vs {}",
                    x.snapshot_uuid, y.snapshot_uuid
                )
            }
        );
    } else {
        println!("DIFFERENT: {} vs {}", x.name, y.name);
        for p in &problems {
            println!("  {p}");
        }
        for (o, l) in &ranges {
            println!("  differs at bytes {o}..{} ({l} bytes)", o + l);
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::CORRUPT)
    })
}
