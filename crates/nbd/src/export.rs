//! Exports: a volume (read-write) or a snapshot (read-only) of a pool the server holds
//! open, and the pools behind them.
//!
//! Invariant: every request runs under the shared lock of its pool's slot; pausing
//! (control socket) takes it exclusively, so a pause waits for in-flight requests and
//! holds new ones until the pool is reopened.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use thinvol_catalog::manage::{self, Opened};
use thinvol_catalog::registry::Registry;
use thinvol_catalog::Name;
use thinvol_engine::format::ThinId;
use thinvol_engine::{Error as EngineError, Pool};

use crate::proto::{EINVAL, EIO, ENOSPC, EPERM, ESHUTDOWN};
use crate::{NbdError, Result};

/// One open pool.
pub struct PoolSlot {
    pub name: String,
    pub dir: PathBuf,
    /// Opened read-only (every export of it is a snapshot, or `--read-only`).
    pub read_only: bool,
    pub block_size: u64,
    /// `None` while paused (briefly) or after shutdown.
    pub state: RwLock<Option<Opened>>,
}

impl PoolSlot {
    pub fn open(name: &str, dir: PathBuf, read_only: bool) -> Result<PoolSlot> {
        let o = manage::open_dir(name, &dir, read_only)?;
        Ok(PoolSlot {
            name: name.to_string(),
            block_size: o.pool.block_size(),
            dir,
            read_only,
            state: RwLock::new(Some(o)),
        })
    }

    /// Commit and close (shutdown). Waits for in-flight requests.
    pub fn close(&self) -> Result<()> {
        if let Some(o) = self.state.write().take() {
            o.close()?;
        }
        Ok(())
    }
}

/// One export.
pub struct Export {
    /// `POOL/VOL` or `POOL/VOL@SNAP`: what clients ask for.
    pub name: String,
    pub slot: Arc<PoolSlot>,
    pub thin: ThinId,
    pub size: u64,
    pub read_only: bool,
}

/// The NBD errno for an engine error.
pub fn errno(e: &EngineError) -> u32 {
    match e {
        EngineError::NoSpace(_) => ENOSPC,
        EngineError::ReadOnly => EPERM,
        EngineError::InvalidArgument(_) => EINVAL,
        _ => EIO,
    }
}

impl Export {
    /// Run `f` on the pool under the slot's shared lock; errors become NBD errnos.
    #[inline]
    pub fn with_pool<T>(
        &self,
        f: impl FnOnce(&Pool) -> thinvol_engine::Result<T>,
    ) -> std::result::Result<T, u32> {
        let g = self.slot.state.read();
        match g.as_ref() {
            Some(o) => f(&o.pool).map_err(|e| errno(&e)),
            None => Err(ESHUTDOWN),
        }
    }
}

/// Open the pools of `names` (volumes and snapshots) and describe their exports.
/// Snapshots are read-only; with `read_only`, everything is.
pub fn open_exports(reg: &Registry, names: &[String], read_only: bool) -> Result<Vec<Arc<Export>>> {
    let mut parsed = Vec::new();
    for n in names {
        let name = Name::parse(n)?;
        if parsed
            .iter()
            .any(|(p, _): &(Name, String)| p.to_string() == name.to_string())
        {
            return Err(NbdError::Invalid(format!("'{n}' is given twice")));
        }
        parsed.push((name, n.clone()));
    }
    // Group by pool: a pool is opened once, read-only if none of its exports writes.
    let mut pools: BTreeMap<String, bool> = BTreeMap::new();
    for (n, _) in &parsed {
        let writes = !read_only && n.snapshot.is_none();
        *pools.entry(n.pool.clone()).or_insert(false) |= writes;
    }
    let mut slots = BTreeMap::new();
    for (pool, writes) in pools {
        let r = reg.get(&pool)?;
        slots.insert(
            pool.clone(),
            Arc::new(PoolSlot::open(&pool, r.dir, !writes)?),
        );
    }
    let mut out = Vec::new();
    for (n, _) in parsed {
        let slot = slots[&n.pool].clone();
        let (thin, size) = {
            let g = slot.state.read();
            let o = g.as_ref().expect("just opened");
            let v = o.catalog.volume(&n.pool, n.vol())?;
            match &n.snapshot {
                Some(s) => {
                    let s = o.catalog.snapshot(&n.pool, n.vol(), s)?;
                    (s.thin_id, s.size)
                }
                None => (v.thin_id, v.size),
            }
        };
        out.push(Arc::new(Export {
            name: n.to_string(),
            read_only: read_only || n.snapshot.is_some(),
            slot,
            thin: ThinId(thin),
            size,
        }));
    }
    Ok(out)
}

/// The distinct pools behind `exports`.
pub fn slots(exports: &[Arc<Export>]) -> Vec<Arc<PoolSlot>> {
    let mut out: Vec<Arc<PoolSlot>> = Vec::new();
    for e in exports {
        if !out.iter().any(|s| Arc::ptr_eq(s, &e.slot)) {
            out.push(e.slot.clone());
        }
    }
    out
}
