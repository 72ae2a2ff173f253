//! Exit codes (documented in README.md and `thinvol --help`):
//! 0 success; 1 error; 2 usage (bad arguments, names, sizes); 3 no such pool, volume,
//! snapshot or device; 4 no space; 5 corrupt metadata, catalog and pool disagree, a
//! check that found problems, a corrupt replication stream or a verify mismatch; 6 refused (held, has dependents, not empty, in use);
//! 7 already exists; 10, 11, 12 `pool status --check`: usage at or above the lowest,
//! middle, highest threshold (10 + index of the highest threshold reached).

use std::process::ExitCode;

use thinvol_catalog::CatalogError;

pub const ERROR: u8 = 1;
pub const USAGE: u8 = 2;
pub const NOT_FOUND: u8 = 3;
pub const NO_SPACE: u8 = 4;
pub const CORRUPT: u8 = 5;
pub const REFUSED: u8 = 6;
pub const EXISTS: u8 = 7;
/// `pool status --check`: 10 + index of the highest threshold reached.
pub const THRESHOLD_BASE: u8 = 10;

/// Shown at the end of `thinvol --help`.
pub const HELP: &str = "Exit codes: 0 success, 1 error, 2 usage (bad arguments, names or sizes), \
3 no such pool/volume/snapshot/device, 4 no space, 5 corrupt metadata or a check that found \
problems, 6 refused (held, has dependents, not empty, in use), 7 already exists; \
'pool status --check': 10, 11, 12 = usage at or above the lowest, middle, highest threshold \
(default 80, 90, 95 %).";

fn engine_code(err: &thinvol_engine::Error) -> u8 {
    use thinvol_engine::Error as E;
    match err {
        E::NoSuchDevice(_) => NOT_FOUND,
        E::NoSpace(_) => NO_SPACE,
        E::Corrupt(_) | E::Inconsistent { .. } | E::Unformatted => CORRUPT,
        _ => ERROR,
    }
}

/// The exit code for a pool status whose usage reached `level` thresholds (0 = none).
pub fn threshold_code(level: usize) -> ExitCode {
    if level == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(THRESHOLD_BASE + (level - 1).min(50) as u8)
    }
}

fn catalog_code(c: &CatalogError) -> u8 {
    match c {
        CatalogError::Engine(err) => engine_code(err),
        CatalogError::Io { .. } => ERROR,
        CatalogError::BadName { .. } | CatalogError::BadArgument { .. } => USAGE,
        CatalogError::NotFound { .. } => NOT_FOUND,
        CatalogError::Exists { .. } => EXISTS,
        CatalogError::Refused { .. } => REFUSED,
        CatalogError::BadCatalog { .. } | CatalogError::Diverged { .. } => CORRUPT,
        #[allow(unreachable_patterns)]
        _ => ERROR,
    }
}

pub fn code_for(e: &anyhow::Error) -> ExitCode {
    for cause in e.chain() {
        if cause.downcast_ref::<crate::common::UsageError>().is_some() {
            return ExitCode::from(USAGE);
        }
        if let Some(s) = cause.downcast_ref::<thinvol_stream::StreamError>() {
            use thinvol_stream::StreamError as S;
            match s {
                S::Format(_) | S::Corrupt(_) => return ExitCode::from(CORRUPT),
                S::Refused(_) | S::BadToken(_) => return ExitCode::from(REFUSED),
                S::NotFound(_) => return ExitCode::from(NOT_FOUND),
                S::Engine(err) => return ExitCode::from(engine_code(err)),
                S::Catalog(c) => return ExitCode::from(catalog_code(c)),
                _ => return ExitCode::from(ERROR),
            }
        }
        if let Some(c) = cause.downcast_ref::<CatalogError>() {
            return ExitCode::from(catalog_code(c));
        }
        let engine = cause.downcast_ref::<thinvol_engine::Error>().or_else(|| {
            match cause.downcast_ref::<thinvol_ops::copy::CopyError>() {
                Some(thinvol_ops::copy::CopyError::Pool(p)) => Some(p),
                _ => None,
            }
        });
        if let Some(err) = engine {
            return ExitCode::from(engine_code(err));
        }
    }
    ExitCode::from(ERROR)
}
