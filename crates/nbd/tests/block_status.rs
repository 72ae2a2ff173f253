//! `base:allocation` extents against a pool's mappings: holes and data at block
//! granularity, clipping to the request and the export, merging, REQ_ONE.

use thinvol_engine::format::ThinId;
use thinvol_engine::{Pool, PoolConfig};
use thinvol_nbd::block_status::extents;

const K: u64 = 64 << 10; // the default block size
const HZ: u32 = 3; // HOLE | ZERO

#[test]
fn extents_follow_the_mapping_tree() {
    let d = tempfile::tempdir().unwrap();
    let pool = Pool::create(d.path(), &PoolConfig::default()).unwrap();
    let t = ThinId(1);
    pool.create_thin(t).unwrap();
    let size = 100 * K;
    // Blocks 2, 3 (adjacent: one extent) and 10 mapped.
    pool.write(t, 2 * K + 5, b"x").unwrap();
    pool.write(t, 3 * K, b"y").unwrap();
    pool.write(t, 10 * K, b"z").unwrap();
    assert_eq!(
        extents(&pool, t, size, 0, size, false).unwrap(),
        vec![(2 * K, HZ), (2 * K, 0), (6 * K, HZ), (K, 0), (89 * K, HZ)]
    );
    // From the middle of a block, clipped to the request.
    assert_eq!(
        extents(&pool, t, size, 3 * K - 100, 7 * K + 200, false).unwrap(),
        vec![(K + 100, 0), (6 * K, HZ), (100, 0)]
    );
    // REQ_ONE: only the first extent; past the end of the export: clipped.
    assert_eq!(
        extents(&pool, t, size, K, size, true).unwrap(),
        vec![(K, HZ)]
    );
    assert_eq!(
        extents(&pool, t, size, 99 * K, u64::MAX, false).unwrap(),
        vec![(K, HZ)]
    );
    // An empty device: one hole.
    pool.create_thin(ThinId(2)).unwrap();
    assert_eq!(
        extents(&pool, ThinId(2), size, 0, size, false).unwrap(),
        vec![(size, HZ)]
    );
    pool.close().unwrap();
}
