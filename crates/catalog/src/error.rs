//! Catalog errors: each says what is wrong and what to do.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error(transparent)]
    Engine(#[from] thinvol_engine::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid name '{name}': {reason}")]
    BadName { name: String, reason: String },
    #[error("{kind} '{name}' does not exist{hint}")]
    NotFound {
        kind: &'static str,
        name: String,
        /// " (did you mean 'x'?)" or empty.
        hint: String,
    },
    #[error("{kind} '{name}' already exists")]
    Exists { kind: &'static str, name: String },
    #[error("refusing: {reason}")]
    Refused { reason: String },
    /// A command argument (size, setting, type) that cannot be used; says what would be.
    #[error("invalid argument '{arg}': {reason}")]
    BadArgument { arg: String, reason: String },
    #[error("catalog {path}: {reason}")]
    BadCatalog { path: String, reason: String },
    #[error(
        "catalog and pool disagree: catalog is at transaction {catalog}, pool metadata at {pool}; \
         the pool was changed outside thinvol's catalog (restore a point with 'thinvol restore' or re-import it)"
    )]
    Diverged { catalog: u64, pool: u64 },
}

pub type Result<T> = std::result::Result<T, CatalogError>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CatalogError {
    let what = what.into();
    move |source| CatalogError::Io { what, source }
}
