//! The `nbd_proto` fuzz target's inputs (fuzz/seeds/nbd_proto and any
//! fuzz/regressions/nbd_proto) run through the same body, `proto::fuzz_one`, in CI.

use std::path::Path;

use thinvol_nbd::proto::fuzz_one;

#[test]
fn nbd_proto_seeds_and_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["seeds/nbd_proto", "regressions/nbd_proto"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for f in rd {
            let data = std::fs::read(f.unwrap().path()).unwrap();
            fuzz_one(&data);
            n += 1;
        }
    }
    assert!(n >= 6, "nbd_proto seeds missing ({n})");
}
