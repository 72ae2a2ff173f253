//! The metadata archive: restore points after every change, retention, history order,
//! restore (byte-identical where the data is still there, refused where it is not).

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use thinvol_catalog::archive::{self, ARCHIVE_DIR, INDEX_FILE};
use thinvol_catalog::{ops, CatalogError, CatalogPool, Name, Settings};
use thinvol_engine::PoolConfig;

const BS: u64 = 64 << 10;
const DAY: u64 = 86_400;

fn pool(dir: &Path, data_blocks: u64, settings: Settings) -> CatalogPool {
    let cfg = PoolConfig {
        data_size: data_blocks * BS,
        commit_interval: Duration::ZERO,
        ..PoolConfig::default()
    };
    CatalogPool::create("tank", dir, &cfg, settings).unwrap()
}

fn n(s: &str) -> Name {
    Name::parse(s).unwrap()
}

/// A clock the test moves by hand.
fn fake_clock(start: u64) -> Rc<Cell<u64>> {
    let t = Rc::new(Cell::new(start));
    let c = t.clone();
    archive::set_clock(Some(Box::new(move || c.get())));
    t
}

fn fill(cp: &CatalogPool, name: &str, block: u64, blocks: u64, seed: u8) {
    let id = cp.thin_of(&n(name)).unwrap();
    let mut buf = vec![0u8; (blocks * BS) as usize];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i / 4096) as u8 ^ seed ^ (i % 251) as u8 | 1;
    }
    cp.pool.write(id, block * BS, &buf).unwrap();
}

fn content(cp: &CatalogPool, name: &str) -> Vec<u8> {
    let nm = n(name);
    let size = match &nm.snapshot {
        Some(s) => cp.catalog.snapshot("tank", nm.vol(), s).unwrap().size,
        None => cp.catalog.volume("tank", nm.vol()).unwrap().size,
    };
    let mut buf = vec![0u8; size as usize];
    cp.pool.read(cp.thin_of(&nm).unwrap(), 0, &mut buf).unwrap();
    buf
}

fn point_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join(ARCHIVE_DIR))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".point")
        })
        .count()
}

fn checks_pass(cp: &CatalogPool, dir: &Path) {
    let r = cp.pool.check().unwrap();
    assert!(r.is_clean(), "{r:?}");
    cp.verify_devices().unwrap();
    if let Ok(out) = std::process::Command::new("thin_check")
        .arg(dir.join("metadata"))
        .output()
    {
        assert!(
            out.status.success(),
            "thin_check: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_change_records_a_point_in_order() {
    let t = tempfile::tempdir().unwrap();
    let clock = fake_clock(1_000_000);
    let mut cp = pool(t.path(), 256, Settings::default());
    ops::create_volume(&mut cp, &n("tank/vm"), 4 * BS).unwrap();
    clock.set(1_000_010);
    fill(&cp, "tank/vm", 0, 2, 1);
    ops::snapshot(&mut cp, &[n("tank/vm@daily")]).unwrap();
    clock.set(1_000_020);
    ops::hold(&mut cp, &n("tank/vm@daily"), "keep").unwrap();
    ops::rename(&mut cp, &n("tank/vm"), &n("tank/web")).unwrap();
    // A refused change records nothing.
    assert!(ops::destroy(&mut cp, &n("tank/web@daily"), false).is_err());
    let h = archive::history(t.path()).unwrap();
    let d: Vec<&str> = h.iter().map(|p| p.description.as_str()).collect();
    assert_eq!(
        d,
        [
            "create tank/vm (256 KiB)",
            "snapshot tank/vm@daily",
            "hold tank/vm@daily (keep)",
            "rename tank/vm to tank/web"
        ]
    );
    let ids: Vec<u64> = h.iter().map(|p| p.id).collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    assert!(h.windows(2).all(|w| w[0].transaction < w[1].transaction));
    assert_eq!(h.last().unwrap().transaction, cp.catalog.transaction_id);
    assert_eq!(
        h.iter().map(|p| p.created).collect::<Vec<_>>(),
        [1_000_000, 1_000_010, 1_000_020, 1_000_020]
    );
    // The snapshot point holds both devices and their 2 + 2 mappings.
    assert_eq!((h[1].devices, h[1].mappings), (2, 4));
    let p = archive::load_point(t.path(), 2).unwrap();
    assert_eq!(p.catalog.volumes["vm"].snapshots.len(), 1);
    assert_eq!(p.info.description, "snapshot tank/vm@daily");
    checks_pass(&cp, t.path());
}

#[test]
fn retention_keeps_retain_min_and_retain_days() {
    let t = tempfile::tempdir().unwrap();
    let clock = fake_clock(10 * DAY);
    let mut cp = pool(
        t.path(),
        64,
        Settings {
            retain_min: 3,
            retain_days: 2,
            ..Settings::default()
        },
    );
    ops::create_volume(&mut cp, &n("tank/vm"), BS).unwrap();
    ops::snapshot(&mut cp, &[n("tank/vm@s")]).unwrap();
    for i in 0..6 {
        let tag = format!("t{i}");
        ops::hold(&mut cp, &n("tank/vm@s"), &tag).unwrap();
    }
    // Everything is younger than two days: all 8 points stay.
    assert_eq!(archive::history(t.path()).unwrap().len(), 8);
    assert_eq!(point_files(t.path()), 8);
    // One day later: still young.
    clock.set(11 * DAY);
    ops::release(&mut cp, &n("tank/vm@s"), "t0").unwrap();
    assert_eq!(archive::history(t.path()).unwrap().len(), 9);
    // 12.5 days: the first 8 (day 10) are older than 2 days, the one from day 11 is
    // not; retain_min keeps the newest 3, so point 8 stays too.
    clock.set(12 * DAY + DAY / 2);
    ops::release(&mut cp, &n("tank/vm@s"), "t1").unwrap();
    let h = archive::history(t.path()).unwrap();
    assert_eq!(h.iter().map(|p| p.id).collect::<Vec<_>>(), [8, 9, 10]);
    // ...but retain_min keeps the newest 3 even when all are old.
    clock.set(40 * DAY);
    ops::release(&mut cp, &n("tank/vm@s"), "t2").unwrap();
    let h = archive::history(t.path()).unwrap();
    assert_eq!(h.iter().map(|p| p.id).collect::<Vec<_>>(), [9, 10, 11]);
    assert_eq!(point_files(t.path()), 3);
    // A pruned point is gone; a live one loads.
    let e = archive::load_point(t.path(), 2).unwrap_err();
    assert!(e.to_string().contains("points 9 to 11"), "{e}");
    archive::load_point(t.path(), 10).unwrap();
}

#[test]
fn index_stays_bounded_over_many_points() {
    let t = tempfile::tempdir().unwrap();
    let clock = fake_clock(DAY);
    let mut cp = pool(
        t.path(),
        64,
        Settings {
            retain_min: 5,
            retain_days: 0,
            ..Settings::default()
        },
    );
    ops::create_volume(&mut cp, &n("tank/vm"), BS).unwrap();
    ops::snapshot(&mut cp, &[n("tank/vm@s")]).unwrap();
    let mut max_index = 0;
    for i in 0..1030u64 {
        clock.set(DAY + i);
        ops::hold(&mut cp, &n("tank/vm@s"), &format!("h{i}")).unwrap();
        max_index = max_index.max(
            std::fs::metadata(t.path().join(ARCHIVE_DIR).join(INDEX_FILE))
                .unwrap()
                .len(),
        );
    }
    let h = archive::history(t.path()).unwrap();
    assert_eq!(h.len(), 5);
    assert_eq!(h.last().unwrap().id, 1032);
    assert_eq!(point_files(t.path()), 5);
    // Compaction drops the dead prefix once it reaches 1024 slots.
    assert!(max_index <= 64 + (1024 + 5) * 160, "{max_index}");
}

#[test]
fn damaged_index_is_rebuilt_from_the_points() {
    let t = tempfile::tempdir().unwrap();
    let _clock = fake_clock(DAY);
    let mut cp = pool(t.path(), 64, Settings::default());
    ops::create_volume(&mut cp, &n("tank/vm"), BS).unwrap();
    ops::snapshot(&mut cp, &[n("tank/vm@a")]).unwrap();
    ops::snapshot(&mut cp, &[n("tank/vm@b")]).unwrap();
    let ix = t.path().join(ARCHIVE_DIR).join(INDEX_FILE);
    // A torn append: half a slot at the end is ignored.
    let mut bytes = std::fs::read(&ix).unwrap();
    bytes.extend_from_slice(&[7u8; 80]);
    std::fs::write(&ix, &bytes).unwrap();
    assert_eq!(archive::history(t.path()).unwrap().len(), 3);
    // A damaged header: history lists from the point files, the next change rebuilds.
    bytes[20] ^= 0xFF;
    std::fs::write(&ix, &bytes).unwrap();
    assert_eq!(archive::history(t.path()).unwrap().len(), 3);
    ops::snapshot(&mut cp, &[n("tank/vm@c")]).unwrap();
    let h = archive::history(t.path()).unwrap();
    assert_eq!(h.iter().map(|p| p.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(h[3].description, "snapshot tank/vm@c");
}

#[test]
fn restore_brings_back_destroyed_snapshots_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let _clock = fake_clock(DAY);
    let mut cp = pool(t.path(), 256, Settings::default());
    ops::create_volume(&mut cp, &n("tank/vm"), 16 * BS).unwrap();
    fill(&cp, "tank/vm", 0, 8, 1);
    ops::snapshot(&mut cp, &[n("tank/vm@a")]).unwrap();
    fill(&cp, "tank/vm", 4, 8, 2); // overwrites 4..8 (copy-on-write), adds 8..12
    ops::snapshot(&mut cp, &[n("tank/vm@b")]).unwrap();
    ops::clone(&mut cp, &n("tank/vm@a"), &n("tank/dev")).unwrap();
    fill(&cp, "tank/vm", 13, 1, 4);
    ops::hold(&mut cp, &n("tank/vm@b"), "keep").unwrap();
    let point = archive::history(t.path()).unwrap().last().unwrap().id;
    let before: Vec<(String, Vec<u8>)> = ["tank/vm", "tank/vm@a", "tank/vm@b", "tank/dev"]
        .iter()
        .map(|s| (s.to_string(), content(&cp, s)))
        .collect();
    let catalog_before = cp.catalog.clone();

    // Mistakes that free no data block: the clone and a snapshot destroyed (every block
    // they map is still mapped elsewhere), the volume written where a snapshot still
    // holds the old blocks (copy-on-write), another snapshot renamed, a volume created.
    ops::destroy(&mut cp, &n("tank/dev"), false).unwrap();
    ops::release(&mut cp, &n("tank/vm@b"), "keep").unwrap();
    ops::destroy(&mut cp, &n("tank/vm@b"), false).unwrap();
    fill(&cp, "tank/vm", 0, 4, 9);
    ops::rename(&mut cp, &n("tank/vm@a"), &n("tank/vm@old")).unwrap();
    ops::create_volume(&mut cp, &n("tank/new"), BS).unwrap();
    assert_ne!(content(&cp, "tank/vm"), before[0].1);

    let r = archive::restore(&mut cp, point).unwrap();
    assert_eq!(r.point, point);
    // vm@old is vm@a renamed: kept, and named vm@a again.
    assert_eq!(r.removed, ["new"]);
    assert_eq!(r.transaction, cp.catalog.transaction_id);
    for (name, bytes) in &before {
        assert!(content(&cp, name) == *bytes, "{name} differs after restore");
    }
    // Names, sizes, holds, origins are the point's; thin ids are new where rebuilt.
    let mut c = cp.catalog.clone();
    assert_eq!(c.volumes["dev"].origin.as_deref(), Some("vm@a"));
    assert!(c.volumes["vm"].snapshots["b"].holds.contains("keep"));
    c.transaction_id = catalog_before.transaction_id;
    c.next_thin_id = catalog_before.next_thin_id;
    for (vn, v) in c.volumes.iter_mut() {
        v.thin_id = catalog_before.volumes[vn].thin_id;
        for (sn, s) in v.snapshots.iter_mut() {
            s.thin_id = catalog_before.volumes[vn].snapshots[sn].thin_id;
        }
    }
    assert_eq!(c, catalog_before);
    // The restore is itself a point.
    let h = archive::history(t.path()).unwrap();
    assert!(h
        .last()
        .unwrap()
        .description
        .starts_with(&format!("restore point {point} (")));
    checks_pass(&cp, t.path());
    // And the pool reopens with the restored catalog.
    cp.close().unwrap();
    let cp = CatalogPool::open("tank", t.path()).unwrap();
    for (name, bytes) in &before {
        assert!(content(&cp, name) == *bytes, "{name} differs after reopen");
    }
}

#[test]
fn restore_undoes_a_rollback_that_kept_the_current_state() {
    let t = tempfile::tempdir().unwrap();
    let _clock = fake_clock(DAY);
    let mut cp = pool(t.path(), 256, Settings::default());
    ops::create_volume(&mut cp, &n("tank/vm"), 8 * BS).unwrap();
    fill(&cp, "tank/vm", 0, 4, 1);
    ops::snapshot(&mut cp, &[n("tank/vm@a")]).unwrap();
    fill(&cp, "tank/vm", 2, 4, 2);
    ops::hold(&mut cp, &n("tank/vm@a"), "x").unwrap();
    let point = archive::history(t.path()).unwrap().last().unwrap().id;
    let vm = content(&cp, "tank/vm");
    ops::rollback(&mut cp, &n("tank/vm@a"), Some("pre")).unwrap();
    assert_ne!(content(&cp, "tank/vm"), vm);
    let r = archive::restore(&mut cp, point).unwrap();
    // The pre-rollback device is the point's volume: kept (O(1)), named vm again.
    assert_eq!((r.kept, r.rebuilt), (2, 0));
    assert!(r.removed.is_empty(), "{:?}", r.removed);
    assert_eq!(content(&cp, "tank/vm"), vm);
    checks_pass(&cp, t.path());
}

#[test]
fn restore_refused_when_blocks_were_freed_or_reused() {
    let t = tempfile::tempdir().unwrap();
    let _clock = fake_clock(DAY);
    // 32 data blocks: writing 32 blocks after the destroy reuses every freed one.
    let mut cp = pool(t.path(), 32, Settings::default());
    ops::create_volume(&mut cp, &n("tank/vm"), 32 * BS).unwrap();
    fill(&cp, "tank/vm", 0, 6, 1);
    ops::snapshot(&mut cp, &[n("tank/vm@a")]).unwrap();
    fill(&cp, "tank/vm", 0, 2, 2);
    ops::create_volume(&mut cp, &n("tank/other"), 32 * BS).unwrap();
    let point = archive::history(t.path()).unwrap().last().unwrap().id;

    // Destroyed: the blocks are freed (and hole-punched).
    ops::destroy(&mut cp, &n("tank/vm"), true).unwrap();
    let e = archive::restore(&mut cp, point).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CatalogError::Refused { .. }), "{msg}");
    assert!(
        msg.contains("8 of the 8 data blocks it needs have since been freed (8) or reused for other data (0)"),
        "{msg}"
    );
    assert!(msg.contains("tank/vm (6 of 6 blocks)"), "{msg}");
    assert!(msg.contains("tank/vm@a (6 of 6 blocks)"), "{msg}");
    // Nothing changed: the refusal aborted the transaction.
    assert!(cp.catalog.volumes.contains_key("other"));
    assert!(!cp.catalog.volumes.contains_key("vm"));

    // Reused: the freed blocks now hold another volume's data.
    fill(&cp, "tank/other", 0, 32, 5);
    let e = archive::restore(&mut cp, point).unwrap_err().to_string();
    assert!(
        e.contains("8 of the 8 data blocks it needs have since been freed (0) or reused for other data (8)"),
        "{e}"
    );
    checks_pass(&cp, t.path());
}

#[test]
fn restoring_a_point_twice_points_at_the_restore() {
    let t = tempfile::tempdir().unwrap();
    let _clock = fake_clock(DAY);
    let mut cp = pool(t.path(), 64, Settings::default());
    ops::create_volume(&mut cp, &n("tank/vm"), 4 * BS).unwrap();
    fill(&cp, "tank/vm", 0, 2, 1);
    ops::snapshot(&mut cp, &[n("tank/vm@a")]).unwrap();
    fill(&cp, "tank/vm", 0, 1, 2);
    ops::hold(&mut cp, &n("tank/vm@a"), "x").unwrap();
    let p = archive::history(t.path()).unwrap().last().unwrap().id;
    let vm = content(&cp, "tank/vm");
    fill(&cp, "tank/vm", 1, 1, 3);
    archive::restore(&mut cp, p).unwrap();
    assert_eq!(content(&cp, "tank/vm"), vm);
    let r1 = archive::history(t.path()).unwrap().last().unwrap().id;
    // Restoring the restore point is a no-op that keeps every device.
    let r = archive::restore(&mut cp, r1).unwrap();
    assert_eq!((r.kept, r.rebuilt), (2, 0));
    // The rebuilt volume's block 0 is mapped only by the restore (a later time): the
    // original point can no longer prove it; the message names the restore point.
    fill(&cp, "tank/vm", 1, 1, 4);
    let e = archive::restore(&mut cp, p).unwrap_err().to_string();
    assert!(
        e.contains(&format!("brought back before as point {r1}")),
        "{e}"
    );
    archive::restore(&mut cp, r1).unwrap();
    assert_eq!(content(&cp, "tank/vm"), vm);
    checks_pass(&cp, t.path());
}

#[test]
fn restore_keeps_held_snapshots() {
    let t = tempfile::tempdir().unwrap();
    let _clock = fake_clock(DAY);
    let mut cp = pool(t.path(), 64, Settings::default());
    ops::create_volume(&mut cp, &n("tank/vm"), 4 * BS).unwrap();
    let p = archive::history(t.path()).unwrap().last().unwrap().id;
    ops::snapshot(&mut cp, &[n("tank/vm@keep")]).unwrap();
    ops::hold(&mut cp, &n("tank/vm@keep"), "backup").unwrap();
    let e = archive::restore(&mut cp, p).unwrap_err().to_string();
    assert!(
        e.contains("'tank/vm@keep' is held (backup) and is not in point 1"),
        "{e}"
    );
    ops::release(&mut cp, &n("tank/vm@keep"), "backup").unwrap();
    archive::restore(&mut cp, p).unwrap();
    assert!(cp.catalog.volumes["vm"].snapshots.is_empty());
    let e = archive::restore(&mut cp, 999).unwrap_err().to_string();
    assert!(e.contains("restore point '999' does not exist"), "{e}");
}

#[test]
fn restore_repairs_a_pool_changed_outside_the_catalog() {
    let t = tempfile::tempdir().unwrap();
    let _clock = fake_clock(DAY);
    let mut cp = pool(t.path(), 64, Settings::default());
    ops::create_volume(&mut cp, &n("tank/vm"), 4 * BS).unwrap();
    fill(&cp, "tank/vm", 0, 2, 1);
    ops::snapshot(&mut cp, &[n("tank/vm@a")]).unwrap();
    let point = archive::history(t.path()).unwrap().last().unwrap().id;
    let vm = content(&cp, "tank/vm");
    // Behind the catalog's back: a new device and a transaction id bump.
    let tid = cp.catalog.transaction_id;
    cp.pool
        .create_thin(thinvol_engine::format::ThinId(77))
        .unwrap();
    cp.pool.set_transaction_id(tid, tid + 5).unwrap();
    cp.close().unwrap();
    let e = CatalogPool::open("tank", t.path()).err().unwrap();
    assert!(matches!(e, CatalogError::Diverged { .. }), "{e}");
    let mut cp = CatalogPool::open_for_restore("tank", t.path()).unwrap();
    let r = archive::restore(&mut cp, point).unwrap();
    assert_eq!((r.kept, r.rebuilt), (2, 0));
    assert_eq!(r.removed, ["thin-77"]);
    assert_eq!(r.transaction, tid + 6);
    assert_eq!(content(&cp, "tank/vm"), vm);
    cp.close().unwrap();
    let cp = CatalogPool::open("tank", t.path()).unwrap();
    assert_eq!(content(&cp, "tank/vm@a"), vm);
    checks_pass(&cp, t.path());
}

#[test]
fn archive_survives_a_crash_inside_recording() {
    let t = tempfile::tempdir().unwrap();
    let clock = fake_clock(DAY);
    let mut cp = pool(
        t.path(),
        64,
        Settings {
            retain_min: 2,
            retain_days: 0,
            ..Settings::default()
        },
    );
    ops::create_volume(&mut cp, &n("tank/vm"), BS).unwrap();
    ops::snapshot(&mut cp, &[n("tank/vm@a")]).unwrap();
    let adir = t.path().join(ARCHIVE_DIR);
    // A point file written but its slot not (crash between rename and index write):
    // the next point takes the id and replaces the file.
    std::fs::write(adir.join("000000000003.point"), b"garbage").unwrap();
    // Pruned files whose header update was lost: the slot is there, the file is not.
    std::fs::remove_file(adir.join("000000000001.point")).unwrap();
    clock.set(DAY + 10);
    ops::hold(&mut cp, &n("tank/vm@a"), "x").unwrap();
    let h = archive::history(t.path()).unwrap();
    assert_eq!(h.iter().map(|p| p.id).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(
        archive::load_point(t.path(), 3).unwrap().info.description,
        "hold tank/vm@a (x)"
    );
    assert_eq!(point_files(t.path()), 2);
    // A damaged point file is refused by its checksum.
    let p3 = adir.join("000000000003.point");
    let mut b = std::fs::read(&p3).unwrap();
    let last = b.len() - 10;
    b[last] ^= 0x55;
    std::fs::write(&p3, &b).unwrap();
    let e = archive::restore(&mut cp, 3).unwrap_err().to_string();
    assert!(
        e.contains("restore point 3 is damaged: checksum mismatch"),
        "{e}"
    );
}
