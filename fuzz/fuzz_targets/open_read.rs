//! Fuzz target: an arbitrary metadata image (plus a control byte) opened as a pool and
//! read through every read path. The body lives in `thinvol_engine::fuzz_support` so
//! that `cargo test` runs it over the seeds on a stable toolchain; see fuzz/README.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thinvol_engine::fuzz_support::open_read(data);
});
