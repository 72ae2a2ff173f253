//! Fuzz target: the NBD wire codec (handshake options, INFO/GO and META_CONTEXT data,
//! compact and extended request headers with a round trip). Byte 0 picks the parser.
//! The body is `thinvol_nbd::proto::fuzz_one`, which `cargo test` also runs over the
//! seeds (crates/nbd/tests/fuzz_seeds.rs); see fuzz/README.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thinvol_nbd::proto::fuzz_one(data);
});
