//! Images by name: `import` (creating the volume, sized to the image, when missing),
//! `write-image` (bring a volume to an image's content writing only the blocks that
//! differ) and `export` (a volume or snapshot, at its catalog size, sparse).
//!
//! Writes go straight to the pool (not through a catalog change: the catalog does not
//! change); the usage before and after is given to [`CatalogPool::note_thresholds`] so
//! a threshold crossed by the data is reported like one crossed by a catalog change.

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use thinvol_catalog::{ops, CatalogError, CatalogPool, Name, Result};
use thinvol_engine::format::human_bytes;

use crate::copy::{self, CopyError, CopyStats};
use crate::progress::Progress;

fn from_copy(e: CopyError) -> CatalogError {
    match e {
        CopyError::Pool(p) => CatalogError::Engine(p),
        CopyError::File { path, source } => CatalogError::Io { what: path, source },
    }
}

fn refused(reason: impl Into<String>) -> CatalogError {
    CatalogError::Refused {
        reason: reason.into(),
    }
}

/// What `import` and `write-image` did.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ImageReport {
    pub name: String,
    /// The volume was created for this import.
    pub created: bool,
    /// Volume size.
    pub size: u64,
    pub block_size: u64,
    /// Image length.
    pub bytes: u64,
    /// Non-zero bytes written.
    pub bytes_written: u64,
    /// Bytes already equal on the volume (not rewritten: still shared with snapshots).
    pub bytes_unchanged: u64,
    /// Zero bytes and holes of the image (not stored).
    pub bytes_skipped: u64,
    /// Bytes whose content differed: written, or cleared to zeros.
    pub bytes_changed: u64,
    pub blocks_changed: u64,
}

fn check_target(n: &Name, verb: &str) -> Result<()> {
    if n.volume.is_none() {
        return Err(CatalogError::BadName {
            name: n.to_string(),
            reason: format!("{verb} needs POOL/VOLUME"),
        });
    }
    if n.snapshot.is_some() {
        return Err(refused(format!(
            "'{n}' is a snapshot, and snapshots are read-only; {verb} into a volume \
             (make a writable one with 'thinvol clone {n} {}/NEWVOL')",
            n.pool
        )));
    }
    Ok(())
}

fn image_len(path: &Path) -> Result<u64> {
    if path.as_os_str() == "-" {
        return Err(refused(
            "images are read from a file (its length sizes the volume), not from stdin; \
             save the stream to a file first",
        ));
    }
    copy::source_len(path).map_err(from_copy)
}

/// Copy the image into the existing volume `n` (see [`copy::image_into_device`]).
fn copy_in(
    cp: &mut CatalogPool,
    n: &Name,
    path: &Path,
    len: u64,
    created: bool,
    progress: &mut dyn Progress,
) -> Result<ImageReport> {
    let v = cp.catalog.volume(&n.pool, n.vol())?.clone();
    if len > v.size {
        return Err(refused(format!(
            "the image is {} ({len} bytes) but '{n}' is {} ({} bytes); grow the volume \
             first: thinvol resize {n} --size {len}",
            human_bytes(len),
            human_bytes(v.size),
            v.size
        )));
    }
    let id = cp.thin_of(n)?;
    let before = cp.usage()?;
    let r = copy::image_into_device(&cp.pool, id, path, Some(v.size), progress);
    if let Ok(after) = cp.usage() {
        cp.note_thresholds(&before, &after);
    }
    let s: CopyStats = r.map_err(from_copy)?;
    Ok(ImageReport {
        name: n.to_string(),
        created,
        size: v.size,
        block_size: cp.pool.block_size(),
        bytes: s.bytes,
        bytes_written: s.bytes_written,
        bytes_unchanged: s.bytes_unchanged,
        bytes_skipped: s.bytes_skipped,
        bytes_changed: s.bytes_changed,
        blocks_changed: s.blocks_changed,
    })
}

/// Import an image into volume `n`, creating it (sized to the image) when missing. An
/// existing volume must be at least as large; beyond the image it reads as zeros.
pub fn import(
    cp: &mut CatalogPool,
    n: &Name,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<ImageReport> {
    check_target(n, "import")?;
    let len = image_len(path)?;
    let created = !cp.catalog.volumes.contains_key(n.vol());
    if created {
        if len == 0 {
            return Err(refused(format!(
                "{} is empty: a new volume needs a size; create it with \
                 'thinvol create {n} --size SIZE'",
                path.display()
            )));
        }
        ops::create_volume(cp, n, len)?;
    }
    copy_in(cp, n, path, len, created, progress)
}

/// Bring the existing volume `n` to the image's content, writing only the blocks that
/// differ; the report counts them.
pub fn write_image(
    cp: &mut CatalogPool,
    n: &Name,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<ImageReport> {
    check_target(n, "write-image")?;
    cp.catalog.volume(&n.pool, n.vol())?;
    let len = image_len(path)?;
    copy_in(cp, n, path, len, false, progress)
}

/// Catalog size of a volume or snapshot.
pub fn size_of(cp: &CatalogPool, n: &Name) -> Result<u64> {
    if n.volume.is_none() {
        return Err(CatalogError::BadName {
            name: n.to_string(),
            reason: "export needs POOL/VOLUME or POOL/VOLUME@SNAPSHOT".into(),
        });
    }
    Ok(match &n.snapshot {
        Some(s) => cp.catalog.snapshot(&n.pool, n.vol(), s)?.size,
        None => cp.catalog.volume(&n.pool, n.vol())?.size,
    })
}

/// Export a volume or snapshot (its catalog size) to a file, sparse.
pub fn export_to_file(
    cp: &CatalogPool,
    n: &Name,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<CopyStats> {
    let len = size_of(cp, n)?;
    let id = cp.thin_of(n)?;
    copy::device_to_file(&cp.pool, id, len, path, progress).map_err(from_copy)
}

/// Export a volume or snapshot to a stream (holes become zeros).
pub fn export_to_writer(
    cp: &CatalogPool,
    n: &Name,
    out: &mut dyn Write,
    progress: &mut dyn Progress,
) -> Result<CopyStats> {
    let len = size_of(cp, n)?;
    let id = cp.thin_of(n)?;
    copy::device_to_writer(&cp.pool, id, len, out, progress).map_err(from_copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoProgress;
    use thinvol_catalog::Settings;
    use thinvol_engine::PoolConfig;

    const BS: usize = 64 << 10;

    fn pool(t: &Path) -> CatalogPool {
        let cfg = PoolConfig {
            data_size: 16 << 20,
            ..Default::default()
        };
        CatalogPool::create("tank", &t.join("pool"), &cfg, Settings::default()).unwrap()
    }

    fn export(cp: &CatalogPool, n: &str, t: &Path) -> Vec<u8> {
        let out = t.join("out");
        export_to_file(cp, &Name::parse(n).unwrap(), &out, &mut NoProgress).unwrap();
        std::fs::read(out).unwrap()
    }

    fn blocks_differing(a: &[u8], b: &[u8]) -> u64 {
        a.chunks(BS)
            .zip(b.chunks(BS))
            .filter(|(x, y)| x != y)
            .count() as u64
    }

    #[test]
    fn import_creates_sized_then_write_image_counts_changes() {
        let t = tempfile::tempdir().unwrap();
        let mut cp = pool(t.path());
        let v = Name::parse("tank/v").unwrap();
        // 1 MiB + 100 bytes: a partial last block.
        let mut old = vec![0u8; (1 << 20) + 100];
        for (i, b) in old.iter_mut().enumerate().take(600_000) {
            *b = (i % 251) as u8 + 1;
        }
        old[(1 << 20) + 50] = 7;
        let img = t.path().join("img");
        std::fs::write(&img, &old).unwrap();
        let r = import(&mut cp, &v, &img, &mut NoProgress).unwrap();
        assert!(r.created);
        assert_eq!(r.size, old.len() as u64);
        assert_eq!(export(&cp, "tank/v", t.path()), old);
        ops::snapshot(&mut cp, &[Name::parse("tank/v@a").unwrap()]).unwrap();
        // Change: one byte in block 1, zero out block 3 (was data), data in block 12,
        // and clear the partial last block.
        let mut new = old.clone();
        new[BS + 5] ^= 0xFF;
        new[3 * BS..4 * BS].fill(0);
        new[12 * BS + 9] = 1;
        new[(1 << 20) + 50] = 0;
        std::fs::write(&img, &new).unwrap();
        let r = write_image(&mut cp, &v, &img, &mut NoProgress).unwrap();
        assert_eq!(r.blocks_changed, blocks_differing(&old, &new));
        assert_eq!(r.blocks_changed, 4);
        assert_eq!(r.bytes_changed, 3 * BS as u64 + 100);
        assert_eq!(export(&cp, "tank/v", t.path()), new);
        assert_eq!(export(&cp, "tank/v@a", t.path()), old);
        // Nothing differs now: nothing is written.
        let r = write_image(&mut cp, &v, &img, &mut NoProgress).unwrap();
        assert_eq!((r.bytes_changed, r.bytes_written), (0, 0));
        cp.close().unwrap();
    }

    #[test]
    fn shorter_image_zeroes_the_rest_and_larger_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut cp = pool(t.path());
        let v = Name::parse("tank/v").unwrap();
        ops::create_volume(&mut cp, &v, 4 * BS as u64).unwrap();
        let id = cp.thin_of(&v).unwrap();
        cp.pool.write(id, 0, &vec![5u8; 4 * BS]).unwrap();
        let img = t.path().join("img");
        std::fs::write(&img, vec![5u8; BS + 10]).unwrap();
        let r = write_image(&mut cp, &v, &img, &mut NoProgress).unwrap();
        // Block 1 loses its tail, blocks 2 and 3 are cleared.
        assert_eq!(r.blocks_changed, 3);
        assert_eq!(r.bytes_changed, (BS - 10) as u64 + 2 * BS as u64);
        let mut want = vec![0u8; 4 * BS];
        want[..BS + 10].fill(5);
        assert_eq!(export(&cp, "tank/v", t.path()), want);
        std::fs::write(&img, vec![5u8; 5 * BS]).unwrap();
        let e = write_image(&mut cp, &v, &img, &mut NoProgress).unwrap_err();
        assert!(e.to_string().contains("thinvol resize tank/v"), "{e}");
        let e = import(
            &mut cp,
            &Name::parse("tank/v@s").unwrap(),
            &img,
            &mut NoProgress,
        )
        .unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
        let e = write_image(
            &mut cp,
            &Name::parse("tank/w").unwrap(),
            &img,
            &mut NoProgress,
        )
        .unwrap_err();
        assert!(e.to_string().contains("did you mean 'v'"), "{e}");
        cp.close().unwrap();
    }

    #[test]
    fn crossing_a_threshold_by_import_warns() {
        let t = tempfile::tempdir().unwrap();
        let cfg = PoolConfig {
            data_size: 1 << 20,
            ..Default::default()
        };
        let mut cp =
            CatalogPool::create("tank", &t.path().join("p"), &cfg, Settings::default()).unwrap();
        let img = t.path().join("img");
        std::fs::write(&img, vec![1u8; 13 * BS]).unwrap();
        import(
            &mut cp,
            &Name::parse("tank/v").unwrap(),
            &img,
            &mut NoProgress,
        )
        .unwrap();
        let w = cp.take_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("data usage crossed 80%"), "{w:?}");
        cp.close().unwrap();
    }
}
