//! thinvol engine: a userspace thin pool whose metadata is byte-compatible with the
//! kernel's dm-thin target.
//!
//! Layers: [`storage`] (byte devices) → `tm` (metadata blocks, shadowing, metadata
//! space map) → `btree` (copy-on-write B-trees) → `metadata` (thin devices, commit) →
//! [`Pool`] (data I/O, locking, background commit). See docs/design.md.

pub mod error;
pub mod storage;

mod btree;
mod metadata;
mod space_map;
mod tm;

pub use error::{Error, Result, SpaceKind};
pub use thinvol_format as format;
mod pool;

pub use pool::{
    default_metadata_size, DeviceInfo, OpenOptions, Pool, PoolConfig, PoolStatus, Tx, DATA_FILE,
    METADATA_FILE,
};
mod check;
mod delta;

pub use check::{CheckReport, Problem};
pub use delta::{runs as delta_runs, BlockDelta, DeltaKind, DeltaRun, DeltaStats};
#[doc(hidden)]
pub mod fuzz_support;
