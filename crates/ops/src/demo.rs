//! The end-to-end demo on the embedded default (a pool in a directory of plain files):
//! create a pool, write a volume, snapshot it, change the volume, show the delta from
//! metadata alone, verify both devices byte for byte, check the pool.

use std::path::{Path, PathBuf};
use std::time::Instant;

use thinvol_engine::format::{human_bytes, ThinId};
use thinvol_engine::{delta_runs, DeltaKind, Pool, PoolConfig};

const MIB: u64 = 1 << 20;

/// What the demo did and found.
#[derive(Debug, serde::Serialize)]
pub struct DemoReport {
    pub dir: PathBuf,
    pub volume_bytes: u64,
    pub changed_blocks: u64,
    pub delta_runs: Vec<(String, u64, u64)>,
    pub delta_micros: u128,
    pub snapshot_intact: bool,
    pub volume_correct: bool,
    pub check_clean: bool,
    pub check_problems: Vec<String>,
    pub data_used_bytes: u64,
    pub data_total_bytes: u64,
    pub metadata_used_bytes: u64,
    pub metadata_total_bytes: u64,
}

/// Deterministic pseudo-random bytes (xorshift), so the demo can verify what it wrote.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Run the demo in `dir` (must not hold a pool yet). `say` receives progress lines.
pub fn run(dir: &Path, say: &mut dyn FnMut(&str)) -> thinvol_engine::Result<DemoReport> {
    let cfg = PoolConfig {
        data_size: 256 * MIB,
        ..Default::default()
    };
    let pool = Pool::create(dir, &cfg)?;
    let bs = pool.block_size();
    say(&format!(
        "created pool in {} ({} data, {} blocks, metadata {})",
        dir.display(),
        human_bytes(cfg.data_size),
        human_bytes(bs),
        human_bytes(thinvol_engine::default_metadata_size(
            cfg.data_size,
            cfg.data_block_size
        ))
    ));
    let vol = ThinId(1);
    let snap = ThinId(2);
    let vol_len = 64 * MIB;
    pool.create_thin(vol)?;
    let mut image = vec![0u8; vol_len as usize];
    fill(&mut image[..32 * MIB as usize], 1);
    pool.write(vol, 0, &image[..32 * MIB as usize])?;
    pool.commit()?;
    say("thin device 1: wrote 32 MiB");
    pool.create_snap(snap, vol)?;
    say("thin device 2: snapshot of device 1 (O(1): shares the whole mapping tree)");
    let original = image.clone();
    // Rewrite 1 MiB in place of old data, add 2 MiB beyond, discard 1 MiB.
    fill(&mut image[(8 * MIB) as usize..(9 * MIB) as usize], 2);
    pool.write(vol, 8 * MIB, &image[(8 * MIB) as usize..(9 * MIB) as usize])?;
    fill(&mut image[(40 * MIB) as usize..(42 * MIB) as usize], 3);
    pool.write(
        vol,
        40 * MIB,
        &image[(40 * MIB) as usize..(42 * MIB) as usize],
    )?;
    image[(20 * MIB) as usize..(21 * MIB) as usize].fill(0);
    pool.discard(vol, 20 * MIB, MIB)?;
    pool.commit()?;
    say("thin device 1: rewrote 1 MiB at 8 MiB, wrote 2 MiB at 40 MiB, discarded 1 MiB at 20 MiB");
    let t = Instant::now();
    let (deltas, stats) = pool.delta(snap, vol, false)?;
    let delta_micros = t.elapsed().as_micros();
    let runs = delta_runs(&deltas);
    say(&format!(
        "delta snapshot -> volume from metadata: {} changed blocks in {} runs, {} nodes read, {} shared subtrees skipped, {} µs",
        deltas.len(),
        runs.len(),
        stats.nodes_read,
        stats.subtrees_skipped,
        delta_micros
    ));
    let mut out_runs = Vec::new();
    for r in &runs {
        let kind = match r.kind {
            DeltaKind::Same => "same",
            DeltaKind::Different => "different",
            DeltaKind::LeftOnly => "left_only",
            DeltaKind::RightOnly => "right_only",
        };
        say(&format!(
            "  {kind:<10} blocks {}..{} ({})",
            r.begin,
            r.begin + r.len,
            human_bytes(r.len * bs)
        ));
        out_runs.push((kind.to_string(), r.begin, r.len));
    }
    let mut buf = vec![0u8; vol_len as usize];
    pool.read(snap, 0, &mut buf)?;
    let snapshot_intact = buf == original;
    pool.read(vol, 0, &mut buf)?;
    let volume_correct = buf == image;
    say(&format!(
        "verified: snapshot {} the original, volume {} what was written",
        if snapshot_intact {
            "equals"
        } else {
            "DIFFERS FROM"
        },
        if volume_correct {
            "equals"
        } else {
            "DIFFERS FROM"
        }
    ));
    let report = pool.check()?;
    say(&format!(
        "check: {} ({} devices, {} mappings, {} metadata blocks, {} data blocks referenced)",
        if report.is_clean() {
            "clean"
        } else {
            "PROBLEMS FOUND"
        },
        report.devices,
        report.mappings,
        report.metadata_blocks_referenced,
        report.data_blocks_referenced
    ));
    let st = pool.status()?;
    pool.close()?;
    Ok(DemoReport {
        dir: dir.to_path_buf(),
        volume_bytes: vol_len,
        changed_blocks: deltas.len() as u64,
        delta_runs: out_runs,
        delta_micros,
        snapshot_intact,
        volume_correct,
        check_clean: report.is_clean(),
        check_problems: report.problems.iter().map(|p| p.to_string()).collect(),
        data_used_bytes: st.data_blocks_used * bs,
        data_total_bytes: st.data_blocks_total * bs,
        metadata_used_bytes: st.metadata_blocks_used * 4096,
        metadata_total_bytes: st.metadata_blocks_total * 4096,
    })
}
