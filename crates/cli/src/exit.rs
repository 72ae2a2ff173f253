//! Exit codes (documented in README.md):
//! 0 success; 1 error; 2 usage; 3 no such device/pool; 4 no space;
//! 5 corrupt metadata or a check that found problems.

use std::process::ExitCode;

pub const ERROR: u8 = 1;
pub const NOT_FOUND: u8 = 3;
pub const NO_SPACE: u8 = 4;
pub const CORRUPT: u8 = 5;

pub fn code_for(e: &anyhow::Error) -> ExitCode {
    use thinvol_engine::Error as E;
    for cause in e.chain() {
        let engine = cause.downcast_ref::<E>().or_else(|| {
            match cause.downcast_ref::<thinvol_ops::copy::CopyError>() {
                Some(thinvol_ops::copy::CopyError::Pool(p)) => Some(p),
                _ => None,
            }
        });
        if let Some(err) = engine {
            return ExitCode::from(match err {
                E::NoSuchDevice(_) => NOT_FOUND,
                E::NoSpace(_) => NO_SPACE,
                E::Corrupt(_) | E::Inconsistent { .. } | E::Unformatted => CORRUPT,
                _ => ERROR,
            });
        }
    }
    ExitCode::from(ERROR)
}
