//! Test support for thinvol.
//!
//! * [`thintools`]: drivers for the real thin-provisioning-tools binaries
//!   (`thin_check`, `thin_dump`, `thin_restore`, `thin_delta`, `thin_ls`,
//!   `thin_metadata_size`), a plain model of `thin_dump` XML, and a random
//!   model generator for interop tests.

pub mod thintools;

pub use thintools::*;
pub mod lvmvm;
