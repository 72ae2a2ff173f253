//! Errors of the stream library: each names what is wrong and where.

use thiserror::Error;

/// A malformed stream (exit code 5 in the CLI).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a thinvol stream (bad magic)")]
    BadMagic,
    #[error("stream format version {0} is not supported (this thinvol reads version 2; sender and receiver must run the same stream version)")]
    Version(u16),
    #[error("stream truncated in {what} at byte {at}")]
    Truncated { what: String, at: u64 },
    #[error("record {seq} at byte {at}: checksum mismatch")]
    Checksum { seq: u64, at: u64 },
    #[error("unknown mandatory record kind {0:#x} (the stream needs a newer thinvol)")]
    UnknownKind(u16),
    #[error("malformed {what} payload: {reason}")]
    Payload { what: &'static str, reason: String },
    #[error("stream byte {at}: {reason}")]
    Invalid { at: u64, reason: String },
}

pub type FormatResult<T> = std::result::Result<T, FormatError>;

#[derive(Debug, Error)]
pub enum StreamError {
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The stream parsed but its content does not add up (totals, digest, order).
    #[error("stream rejected: {0}")]
    Corrupt(String),
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
    /// The operation is refused as asked (wrong base, target changed, ...): exit 6.
    #[error("refusing: {0}")]
    Refused(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("invalid resume token: {0}")]
    BadToken(String),
    /// The receiver stopped before the end; resume with the token.
    #[error("stream ended early: {reason}; resume with: thinvol send ... --resume {token}")]
    Interrupted { reason: String, token: String },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, StreamError>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StreamError {
    let what = what.into();
    move |source| StreamError::Io { what, source }
}
