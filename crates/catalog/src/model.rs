//! The catalog: what dm-thin does not store. Volume names and sizes, snapshots and
//! their holds, clone origins, creation times, uuids (identities for send/receive), the
//! pool's settings, and the pool transaction id this catalog corresponds to.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{CatalogError, Result};
use crate::names::suggest;

pub const CATALOG_FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Settings {
    /// Restore points always kept.
    pub retain_min: u32,
    /// Restore points younger than this are kept too.
    pub retain_days: u32,
    /// Usage percentages that trigger a warning, ascending.
    pub thresholds: Vec<u8>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            retain_min: 10,
            retain_days: 30,
            thresholds: vec![80, 90, 95],
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    pub thin_id: u64,
    pub uuid: String,
    /// Volume size when the snapshot was taken.
    pub size: u64,
    /// Unix seconds.
    pub created: u64,
    #[serde(default)]
    pub holds: BTreeSet<String>,
    /// Set when taken together with other volumes' snapshots in one transaction.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Volume {
    pub thin_id: u64,
    pub uuid: String,
    pub size: u64,
    pub created: u64,
    /// `VOLUME@SNAPSHOT` this volume was cloned from, if any.
    #[serde(default)]
    pub origin: Option<String>,
    #[serde(default)]
    pub snapshots: BTreeMap<String, Snapshot>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Catalog {
    pub format: u32,
    pub pool_uuid: String,
    /// The dm-thin superblock transaction id this catalog matches.
    pub transaction_id: u64,
    pub next_thin_id: u64,
    pub settings: Settings,
    pub volumes: BTreeMap<String, Volume>,
    /// Thin devices that belong to no volume yet: the devices an unfinished `thinvol
    /// receive` writes into (thin id -> what they are for). Listings do not show them;
    /// a receive publishes (renames) or aborts (deletes) them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hidden: BTreeMap<u64, String>,
}

impl Catalog {
    pub fn new(transaction_id: u64, settings: Settings) -> Catalog {
        Catalog {
            format: CATALOG_FORMAT,
            pool_uuid: new_uuid(),
            transaction_id,
            next_thin_id: 1,
            settings,
            volumes: BTreeMap::new(),
            hidden: BTreeMap::new(),
        }
    }

    pub fn volume(&self, pool: &str, vol: &str) -> Result<&Volume> {
        self.volumes.get(vol).ok_or_else(|| CatalogError::NotFound {
            kind: "volume",
            name: format!("{pool}/{vol}"),
            hint: suggest(vol, self.volumes.keys().map(String::as_str)),
        })
    }

    pub fn volume_mut(&mut self, pool: &str, vol: &str) -> Result<&mut Volume> {
        self.volume(pool, vol)?;
        Ok(self.volumes.get_mut(vol).expect("checked"))
    }

    pub fn snapshot(&self, pool: &str, vol: &str, snap: &str) -> Result<&Snapshot> {
        let v = self.volume(pool, vol)?;
        v.snapshots.get(snap).ok_or_else(|| CatalogError::NotFound {
            kind: "snapshot",
            name: format!("{pool}/{vol}@{snap}"),
            hint: suggest(snap, v.snapshots.keys().map(String::as_str)),
        })
    }

    pub fn snapshot_mut(&mut self, pool: &str, vol: &str, snap: &str) -> Result<&mut Snapshot> {
        self.snapshot(pool, vol, snap)?;
        Ok(self
            .volumes
            .get_mut(vol)
            .and_then(|v| v.snapshots.get_mut(snap))
            .expect("checked"))
    }

    /// A fresh thin id (never reused within this catalog).
    pub fn alloc_thin_id(&mut self) -> Result<u64> {
        let id = self.next_thin_id;
        if id > thinvol_format::MAX_THIN_ID {
            return Err(CatalogError::Refused {
                reason: "the pool has used all 2^24 thin device ids".into(),
            });
        }
        self.next_thin_id += 1;
        Ok(id)
    }

    /// Volumes cloned from `vol@snap`.
    pub fn clones_of(&self, vol: &str, snap: &str) -> Vec<String> {
        let o = format!("{vol}@{snap}");
        self.volumes
            .iter()
            .filter(|(_, v)| v.origin.as_deref() == Some(o.as_str()))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Every thin id the catalog names, with its name.
    pub fn thin_ids(&self) -> BTreeMap<u64, String> {
        let mut m = BTreeMap::new();
        for (vn, v) in &self.volumes {
            m.insert(v.thin_id, vn.clone());
            for (sn, s) in &v.snapshots {
                m.insert(s.thin_id, format!("{vn}@{sn}"));
            }
        }
        for (id, what) in &self.hidden {
            m.insert(*id, format!("(hidden: {what})"));
        }
        m
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random RFC 4122 version-4 uuid.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        // Fall back to time and pid mixing; uniqueness, not secrecy, is what matters.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b[..16].copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    b[6] = (b[6] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
