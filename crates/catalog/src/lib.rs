//! Names and history on top of the engine.
//!
//! * [`home`]: where the state directory is; [`registry`]: pools registered by name.
//! * [`names`]: `POOL/VOLUME` and `POOL/VOLUME@SNAPSHOT`, validation, suggestions.
//! * [`model`]: the catalog (volumes, sizes, snapshots, origins, holds, settings).
//! * [`store`]: atomic files; [`bound`]: the catalog bound to the pool's transaction id,
//!   with crash recovery at open (docs/design.md §11).

pub mod archive;
pub mod bound;
pub mod control;
pub mod error;
pub mod failpoint;
pub mod home;
pub mod listing;
pub mod manage;
pub mod model;
pub mod names;
pub mod ops;
pub mod registry;
pub mod space;
pub mod store;

pub use bound::CatalogPool;
pub use error::{CatalogError, Result};
pub use model::{Catalog, Settings, Snapshot, Volume};
pub use names::Name;
