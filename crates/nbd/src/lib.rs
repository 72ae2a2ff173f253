//! NBD server for thinvol volumes and snapshots (docs/design.md, "Serving and the
//! control socket").
//!
//! * [`proto`]: the wire codec (pure, fuzzed);
//! * [`export`]: exports (a volume or snapshot of an open pool) and the pools behind
//!   them, paused and resumed through the control socket ([`control`]);
//! * [`block_status`]: `base:allocation` extents from the mapping tree;
//! * [`server`]: listener, handshake, transmission (pipelined, out of order);
//! * `splice`: zero-copy READ replies (data file → pipe → socket), whose safety
//!   argument is docs/design.md §12, "Zero-copy reads".

// NBD is big-endian on the wire (unlike the on-disk format the workspace lint guards).
#![allow(clippy::big_endian_bytes)]

pub mod block_status;
pub mod control;
pub mod export;
pub mod proto;
pub mod server;
mod splice;

pub use export::{Export, PoolSlot};
pub use server::{Config, Listener, Server};

/// Errors of setting up a server (per-request errors become NBD error replies).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Catalog(#[from] thinvol_catalog::CatalogError),
    #[error(transparent)]
    Engine(#[from] thinvol_engine::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, NbdError>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NbdError {
    let what = what.into();
    move |source| NbdError::Io { what, source }
}

/// One log line on stderr: no colour, one event per line (journald-friendly).
pub fn log(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "thinvol serve: {msg}");
}

#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::log(format_args!($($t)*)) };
}
