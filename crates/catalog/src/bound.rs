//! A pool with its catalog, bound by the dm-thin transaction id (LVM's technique: the
//! pool's `transaction_id` names the catalog version it belongs to).
//!
//! Change protocol (`CatalogPool::change`), all inside one pool transaction:
//! 1. compute the next catalog (transaction T+1) and apply the thin-device operations;
//! 2. set the pool's transaction id T -> T+1;
//! 3. write the next catalog to `catalog.pending.json` (atomically, fsynced);
//! 4. commit the pool (the superblock write is the commit point of the whole change);
//! 5. rename `catalog.pending.json` over `catalog.json`;
//! 6. record the change's restore point in the archive ([`crate::archive`]; captured
//!    inside the transaction, written last: a crash before it loses only the point).
//!
//! Recovery at open: a pending catalog whose transaction id equals the pool's is the
//! truth (the crash hit between 4 and 5) and is promoted; any other pending catalog is
//! discarded (the pool never committed it). Then the catalog must match the pool's
//! transaction id and name exactly the pool's thin devices.
//!
//! A failed change never removes the pending catalog: when the pool commit fails after
//! step 3, whether the superblock reached the disk is unknown until the next open.
//! Crash tests (`crates/catalog/tests/crash.rs`) kill a change at each step through the
//! failpoints of [`crate::failpoint`] and cut power at every pool write and flush.

use std::path::{Path, PathBuf};

use thinvol_engine::format::ThinId;
use thinvol_engine::{Pool, PoolConfig, Tx};

use crate::error::{io, CatalogError, Result};
use crate::failpoint::failpoint;
use crate::model::{Catalog, Settings};
use crate::store::{remove_durable, rename_durable, write_atomic};

pub const CATALOG_FILE: &str = "catalog.json";
pub const PENDING_FILE: &str = "catalog.pending.json";

pub struct CatalogPool {
    pub name: String,
    pub dir: PathBuf,
    pub pool: Pool,
    pub catalog: Catalog,
    warnings: Vec<String>,
}

fn read_catalog(path: &Path) -> Result<Option<Catalog>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CatalogError::BadCatalog {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

fn encode(c: &Catalog, path: &Path) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(c).map_err(|e| CatalogError::BadCatalog {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

impl CatalogPool {
    /// Create a pool and an empty catalog in `dir`.
    pub fn create(
        name: &str,
        dir: &Path,
        cfg: &PoolConfig,
        settings: Settings,
    ) -> Result<CatalogPool> {
        if dir.join(CATALOG_FILE).exists() || dir.join(thinvol_engine::METADATA_FILE).exists() {
            return Err(CatalogError::Refused {
                reason: format!("{} already holds a pool (use 'pool import')", dir.display()),
            });
        }
        let pool = Pool::create(dir, cfg)?;
        let catalog = Catalog::new(pool.status()?.transaction_id, settings);
        let path = dir.join(CATALOG_FILE);
        write_atomic(&path, &encode(&catalog, &path)?)?;
        Ok(CatalogPool {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            pool,
            catalog,
            warnings: Vec::new(),
        })
    }

    /// Adopt a pool directory that has no catalog yet (made by `thinvol thin format`, or
    /// a pool written by the kernel): each thin device becomes volume `thin-ID` whose
    /// size is its highest mapped block.
    pub fn adopt(name: &str, dir: &Path, settings: Settings) -> Result<CatalogPool> {
        if dir.join(CATALOG_FILE).exists() {
            return Self::open(name, dir);
        }
        let pool = Pool::open(dir)?;
        let st = pool.status()?;
        let mut catalog = Catalog::new(st.transaction_id, settings);
        let bs = pool.block_size();
        for d in pool.devices()? {
            let size = pool
                .mappings(d.id)?
                .last()
                .map_or(0, |(vb, _)| (vb.0 + 1) * bs);
            catalog.volumes.insert(
                format!("thin-{}", d.id.0),
                crate::model::Volume {
                    thin_id: d.id.0,
                    uuid: crate::model::new_uuid(),
                    size,
                    created: crate::model::now(),
                    origin: None,
                    snapshots: Default::default(),
                },
            );
            catalog.next_thin_id = catalog.next_thin_id.max(d.id.0 + 1);
        }
        let path = dir.join(CATALOG_FILE);
        write_atomic(&path, &encode(&catalog, &path)?)?;
        Ok(CatalogPool {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            pool,
            catalog,
            warnings: Vec::new(),
        })
    }

    /// Open, recovering from a crash between pool commit and catalog rename.
    pub fn open(name: &str, dir: &Path) -> Result<CatalogPool> {
        Self::open_with(name, dir, &thinvol_engine::OpenOptions::default())
    }

    pub fn open_with(
        name: &str,
        dir: &Path,
        opts: &thinvol_engine::OpenOptions,
    ) -> Result<CatalogPool> {
        let pool = Pool::open_with(dir, opts)?;
        Self::open_on_pool(name, dir, pool)
    }

    /// Bind an already open pool (on any storage) to the catalog files in `dir`, with
    /// the same recovery as [`CatalogPool::open`]; read-only when the pool is.
    pub fn open_on_pool(name: &str, dir: &Path, pool: Pool) -> Result<CatalogPool> {
        let read_only = pool.is_read_only();
        let tpool = pool.status()?.transaction_id;
        let cpath = dir.join(CATALOG_FILE);
        let ppath = dir.join(PENDING_FILE);
        let mut catalog = read_catalog(&cpath)?.ok_or_else(|| CatalogError::BadCatalog {
            path: cpath.display().to_string(),
            reason: "missing; register the directory with 'thinvol pool import'".into(),
        })?;
        if let Some(p) = read_catalog(&ppath).unwrap_or(None) {
            if read_only {
                if p.transaction_id == tpool {
                    catalog = p;
                }
            } else if p.transaction_id == tpool {
                failpoint("open:promote");
                rename_durable(&ppath, &cpath)?;
                catalog = p;
            } else {
                failpoint("open:discard");
                remove_durable(&ppath)?;
            }
        } else if ppath.exists() && !read_only {
            // Unreadable pending file: the crash hit while writing it, before the pool
            // commit (step 3 precedes step 4).
            remove_durable(&ppath)?;
        }
        if catalog.transaction_id != tpool {
            return Err(CatalogError::Diverged {
                catalog: catalog.transaction_id,
                pool: tpool,
            });
        }
        let cp = CatalogPool {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            pool,
            catalog,
            warnings: Vec::new(),
        };
        cp.verify_devices()?;
        Ok(cp)
    }

    /// Open for a restore ([`crate::archive::restore`]) even when [`CatalogPool::open`]
    /// refuses because catalog and pool disagree (the pool was changed outside thinvol)
    /// or the catalog is missing or damaged. The catalog in memory then names every thin
    /// device of the pool `thin-ID`, at the pool's transaction id, keeping the settings,
    /// pool uuid and thin-id counter of the old catalog when it can be read; the restore
    /// replaces it. Nothing is written until the restore commits.
    pub fn open_for_restore(name: &str, dir: &Path) -> Result<CatalogPool> {
        match Self::open(name, dir) {
            Err(CatalogError::Diverged { .. } | CatalogError::BadCatalog { .. }) => {}
            r => return r,
        }
        let pool = Pool::open(dir)?;
        let old = read_catalog(&dir.join(CATALOG_FILE)).ok().flatten();
        let mut catalog = Catalog::new(
            pool.status()?.transaction_id,
            old.as_ref().map(|c| c.settings.clone()).unwrap_or_default(),
        );
        if let Some(o) = &old {
            catalog.pool_uuid.clone_from(&o.pool_uuid);
            catalog.next_thin_id = o.next_thin_id;
        }
        for d in pool.devices()? {
            catalog.volumes.insert(
                format!("thin-{}", d.id.0),
                crate::model::Volume {
                    thin_id: d.id.0,
                    uuid: crate::model::new_uuid(),
                    size: 0,
                    created: 0,
                    origin: None,
                    snapshots: Default::default(),
                },
            );
            catalog.next_thin_id = catalog.next_thin_id.max(d.id.0 + 1);
        }
        Ok(CatalogPool {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            pool,
            catalog,
            warnings: Vec::new(),
        })
    }

    /// Every catalog name has its thin device and every thin device has a name.
    pub fn verify_devices(&self) -> Result<()> {
        let named = self.catalog.thin_ids();
        let devs: std::collections::BTreeSet<u64> =
            self.pool.devices()?.iter().map(|d| d.id.0).collect();
        for (id, n) in &named {
            if !devs.contains(id) {
                return Err(CatalogError::BadCatalog {
                    path: self.dir.join(CATALOG_FILE).display().to_string(),
                    reason: format!(
                        "'{}/{n}' names thin device {id}, which the pool does not have",
                        self.name
                    ),
                });
            }
        }
        if let Some(orphan) = devs.iter().find(|d| !named.contains_key(d)) {
            return Err(CatalogError::BadCatalog {
                path: self.dir.join(CATALOG_FILE).display().to_string(),
                reason: format!(
                    "thin device {orphan} exists in the pool but has no name in the catalog"
                ),
            });
        }
        Ok(())
    }

    /// Apply one catalog change and its thin-device operations atomically.
    pub fn change<T>(
        &mut self,
        f: impl FnOnce(&mut Catalog, &mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        self.change_described("catalog change", f)
    }

    /// [`CatalogPool::change`], recording a restore point described by `what` (e.g.
    /// "snapshot tank/vm@daily") in the archive (`crate::archive`). The point is written
    /// after the commit; if that fails, the change stands and a warning says so.
    pub fn change_described<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Catalog, &mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        failpoint("change:begin");
        let before = self.usage().ok();
        let t = self.catalog.transaction_id;
        let mut next = self.catalog.clone();
        next.transaction_id = t + 1;
        let ppath = self.dir.join(PENDING_FILE);
        let mut failure: Option<CatalogError> = None;
        let mut point = None;
        let r = self.pool.transaction(|tx| {
            let fail = |e: CatalogError, failure: &mut Option<CatalogError>| {
                let msg = e.to_string();
                *failure = Some(e);
                thinvol_engine::Error::InvalidArgument(msg)
            };
            let v = match f(&mut next, tx) {
                Ok(v) => v,
                Err(e) => return Err(fail(e, &mut failure)),
            };
            point = Some(crate::archive::capture(&next, tx).map_err(|e| fail(e, &mut failure))?);
            tx.set_transaction_id(t, t + 1)?;
            failpoint("change:ops-applied");
            let bytes = encode(&next, &ppath).map_err(|e| fail(e, &mut failure))?;
            write_atomic(&ppath, &bytes).map_err(|e| fail(e, &mut failure))?;
            failpoint("change:pending-written");
            Ok(v)
        });
        let v = match r {
            Ok(v) => v,
            Err(e) => {
                // Leave any pending catalog where it is: if the pool commit failed after
                // it was written, the superblock may still have reached the disk, and
                // only the recovery at open (comparing transaction ids) can tell. A
                // pending catalog left by an earlier failed rename is the committed
                // truth. Removing either could leave the pool ahead of its catalog.
                return Err(failure.unwrap_or(CatalogError::Engine(e)));
            }
        };
        failpoint("change:pool-committed");
        rename_durable(&ppath, &self.dir.join(CATALOG_FILE))?;
        failpoint("change:renamed");
        self.catalog = next;
        if let Some(p) = point {
            let bs = self.pool.block_size();
            if let Err(e) = crate::archive::record(&self.dir, &self.catalog, bs, p, what) {
                self.warnings.push(format!(
                    "pool '{}': no restore point recorded: {e}",
                    self.name
                ));
            }
        }
        if let (Some(b), Ok(a)) = (before, self.usage()) {
            self.note_thresholds(&b, &a);
        }
        Ok(v)
    }

    /// Pool usage in percent (data, metadata).
    pub fn usage(&self) -> Result<(f64, f64)> {
        let s = self.pool.status()?;
        let pct = |u: u64, t: u64| {
            if t == 0 {
                0.0
            } else {
                100.0 * u as f64 / t as f64
            }
        };
        Ok((
            pct(s.data_blocks_used, s.data_blocks_total),
            pct(s.metadata_blocks_used, s.metadata_blocks_total),
        ))
    }

    /// Record a warning for every threshold crossed upward between two usage readings.
    pub fn note_thresholds(&mut self, before: &(f64, f64), after: &(f64, f64)) {
        for &t in &self.catalog.settings.thresholds {
            let t = f64::from(t);
            if before.0 < t && after.0 >= t {
                self.warnings.push(format!(
                    "pool '{}' data usage crossed {t:.0}% (now {:.1}%)",
                    self.name, after.0
                ));
            }
            if before.1 < t && after.1 >= t {
                self.warnings.push(format!(
                    "pool '{}' metadata usage crossed {t:.0}% (now {:.1}%)",
                    self.name, after.1
                ));
            }
        }
    }

    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// Persist the catalog's settings (a catalog change with no device operation).
    pub fn set_settings(&mut self, s: crate::model::Settings) -> Result<()> {
        self.change_described("settings", |c, _| {
            c.settings = s;
            Ok(())
        })
    }

    /// The thin device of a name.
    pub fn thin_of(&self, n: &crate::Name) -> Result<ThinId> {
        let v = self.catalog.volume(&n.pool, n.vol())?;
        Ok(ThinId(match &n.snapshot {
            Some(s) => self.catalog.snapshot(&n.pool, n.vol(), s)?.thin_id,
            None => v.thin_id,
        }))
    }

    pub fn close(self) -> Result<()> {
        self.pool.close()?;
        Ok(())
    }
}
