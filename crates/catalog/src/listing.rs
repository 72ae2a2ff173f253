//! What `thinvol list` shows: one entry per volume and snapshot, with sizes from the
//! catalog and space from the pool's mappings ([`crate::space`]).

use serde::Serialize;

use crate::bound::CatalogPool;
use crate::error::{CatalogError, Result};
use crate::names::{suggest, Name};
use crate::space::{device_space, of};
use thinvol_engine::format::ThinId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        match s {
            "volume" | "volumes" | "vol" => Ok(Kind::Volume),
            "snapshot" | "snapshots" | "snap" => Ok(Kind::Snapshot),
            _ => Err(CatalogError::BadName {
                name: s.to_string(),
                reason: format!(
                    "unknown type{}; use 'volume' or 'snapshot'",
                    suggest(s, ["volume", "snapshot"])
                ),
            }),
        }
    }
}

/// One line of `thinvol list`. Byte counts are multiples of the pool's block size,
/// except `size` (the catalog's size of the volume or snapshot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub size: u64,
    /// Mapped bytes.
    pub used: u64,
    /// Mapped bytes no other device shares.
    pub exclusive: u64,
    /// Mapped bytes shared with another device.
    pub shared: u64,
    /// For a snapshot: the volume it belongs to. For a clone: `POOL/VOLUME@SNAPSHOT`.
    pub origin: Option<String>,
    /// Unix seconds.
    pub created: u64,
    pub holds: Vec<String>,
    /// Snapshots taken together share a group id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub thin_id: u64,
    pub uuid: String,
}

/// Entries of pool `cp`, volumes each followed by their snapshots (by creation time,
/// then name). `only` restricts to one volume (`POOL/VOLUME`) and its snapshots.
pub fn entries(cp: &CatalogPool, only: Option<&Name>, kind: Option<Kind>) -> Result<Vec<Entry>> {
    let c = &cp.catalog;
    let pool = &cp.name;
    if let Some(n) = only {
        if n.pool != *pool {
            return Err(CatalogError::Refused {
                reason: format!("'{n}' is not in pool '{pool}'"),
            });
        }
        match &n.snapshot {
            Some(s) => {
                c.snapshot(pool, n.vol(), s)?;
            }
            None => {
                c.volume(pool, n.vol())?;
            }
        }
    }
    let space = device_space(&cp.pool)?;
    let bs = cp.pool.block_size();
    let mut out = Vec::new();
    for (vn, v) in &c.volumes {
        if only.is_some_and(|n| n.vol() != vn) {
            continue;
        }
        let only_snap = only.and_then(|n| n.snapshot.as_deref());
        let wants_snap = |sn: &str| only_snap.is_none_or(|s| s == sn);
        if kind != Some(Kind::Snapshot) && only_snap.is_none() {
            let s = of(&space, ThinId(v.thin_id));
            out.push(Entry {
                name: format!("{pool}/{vn}"),
                kind: Kind::Volume,
                size: v.size,
                used: s.mapped_blocks * bs,
                exclusive: s.exclusive_blocks * bs,
                shared: s.shared_blocks * bs,
                origin: v.origin.as_ref().map(|o| format!("{pool}/{o}")),
                created: v.created,
                holds: Vec::new(),
                group: None,
                thin_id: v.thin_id,
                uuid: v.uuid.clone(),
            });
        }
        if kind == Some(Kind::Volume) {
            continue;
        }
        let mut snaps: Vec<_> = v
            .snapshots
            .iter()
            .filter(|(sn, _)| wants_snap(sn))
            .collect();
        snaps.sort_by(|a, b| (a.1.created, a.0).cmp(&(b.1.created, b.0)));
        for (sn, sv) in snaps {
            let s = of(&space, ThinId(sv.thin_id));
            out.push(Entry {
                name: format!("{pool}/{vn}@{sn}"),
                kind: Kind::Snapshot,
                size: sv.size,
                used: s.mapped_blocks * bs,
                exclusive: s.exclusive_blocks * bs,
                shared: s.shared_blocks * bs,
                origin: Some(format!("{pool}/{vn}")),
                created: sv.created,
                holds: sv.holds.iter().cloned().collect(),
                group: sv.group.clone(),
                thin_id: sv.thin_id,
                uuid: sv.uuid.clone(),
            });
        }
    }
    Ok(out)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of unix seconds.
pub fn format_time_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Settings;
    use crate::ops;
    use thinvol_engine::PoolConfig;

    #[test]
    fn times() {
        assert_eq!(format_time_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_time_utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_time_utc(1_700_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn kinds() {
        assert_eq!(Kind::parse("snapshot").unwrap(), Kind::Snapshot);
        assert_eq!(Kind::parse("volume").unwrap(), Kind::Volume);
        let e = Kind::parse("snapshto").unwrap_err().to_string();
        assert!(e.contains("did you mean 'snapshot'"), "{e}");
    }

    #[test]
    fn entries_with_space_origin_and_filters() {
        let t = tempfile::tempdir().unwrap();
        let cfg = PoolConfig {
            data_size: 16 << 20,
            ..Default::default()
        };
        let mut cp = CatalogPool::create("tank", t.path(), &cfg, Settings::default()).unwrap();
        let bs = cp.pool.block_size();
        let v = Name::parse("tank/v").unwrap();
        ops::create_volume(&mut cp, &v, 1 << 20).unwrap();
        let id = cp.thin_of(&v).unwrap();
        cp.pool.write(id, 0, &vec![1u8; 3 * bs as usize]).unwrap();
        ops::snapshot(&mut cp, &[Name::parse("tank/v@s").unwrap()]).unwrap();
        ops::hold(&mut cp, &Name::parse("tank/v@s").unwrap(), "keep").unwrap();
        cp.pool.write(id, 0, &vec![2u8; bs as usize]).unwrap();
        ops::clone(
            &mut cp,
            &Name::parse("tank/v@s").unwrap(),
            &Name::parse("tank/c").unwrap(),
        )
        .unwrap();
        let all = entries(&cp, None, None).unwrap();
        let names: Vec<_> = all.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["tank/c", "tank/v", "tank/v@s"]);
        let vol = &all[1];
        assert_eq!((vol.used, vol.exclusive, vol.shared), (3 * bs, bs, 2 * bs));
        let snap = &all[2];
        assert_eq!(snap.holds, ["keep"]);
        assert_eq!(snap.origin.as_deref(), Some("tank/v"));
        // The snapshot's first block is shared with the clone; the others with both.
        assert_eq!(
            (snap.used, snap.exclusive, snap.shared),
            (3 * bs, 0, 3 * bs)
        );
        assert_eq!(all[0].origin.as_deref(), Some("tank/v@s"));
        let snaps = entries(&cp, None, Some(Kind::Snapshot)).unwrap();
        assert_eq!(snaps.len(), 1);
        let only = entries(&cp, Some(&v), None).unwrap();
        assert_eq!(only.len(), 2);
        let e = entries(&cp, Some(&Name::parse("tank/vv").unwrap()), None).unwrap_err();
        assert!(e.to_string().contains("did you mean 'v'"), "{e}");
        cp.close().unwrap();
    }
}
