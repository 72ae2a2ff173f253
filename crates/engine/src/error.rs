//! Engine errors. Each variant says what failed and, where it matters, what state the
//! pool was left in.

use std::io;
use thinvol_format::{FormatError, MetaBlock, ThinId};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpaceKind {
    Data,
    Metadata,
}

impl std::fmt::Display for SpaceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpaceKind::Data => "data",
            SpaceKind::Metadata => "metadata",
        })
    }
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A metadata block failed validation; the pool was not modified.
    #[error("corrupt metadata: {0}")]
    Corrupt(#[from] FormatError),
    /// The metadata is structurally inconsistent (bad reference, ref count underflow).
    #[error("inconsistent metadata at block {block}: {reason}")]
    Inconsistent { block: MetaBlock, reason: String },
    /// No free block; the operation did nothing and the pool stays usable.
    #[error("no space left in the pool's {0} device")]
    NoSpace(SpaceKind),
    #[error("thin device {0} does not exist")]
    NoSuchDevice(ThinId),
    #[error("thin device {0} already exists")]
    DeviceExists(ThinId),
    #[error("thin device id {0} is out of range (0..=16777215)")]
    BadDeviceId(ThinId),
    #[error("a metadata snapshot is already held")]
    MetadataSnapHeld,
    #[error("no metadata snapshot is held")]
    NoMetadataSnap,
    #[error("device is not a pool: block 0 of the metadata is all zeros (unformatted)")]
    Unformatted,
    #[error("transaction id mismatch: expected {expected}, pool has {actual}")]
    TransactionIdMismatch { expected: u64, actual: u64 },
    #[error("the pool is open read-only")]
    ReadOnly,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An earlier failure left in-memory state that must not be committed. The on-disk
    /// pool is at its last commit; reopen it to continue.
    #[error("pool stopped after an earlier error ({0}); the on-disk pool is at its last commit, reopen it")]
    Poisoned(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

impl Error {
    /// Errno-style classification for front ends (NBD, CLI exit codes).
    pub fn is_no_space(&self) -> bool {
        matches!(self, Error::NoSpace(_))
    }
}
