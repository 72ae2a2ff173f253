//! Fuzz the replication stream parser: see crates/stream/src/fuzz_support.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thinvol_stream::fuzz_support::parse(data);
});
