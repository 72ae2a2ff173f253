//! Content digests on a real pool: the digest maintained from the base through the
//! engine delta equals the digest recomputed from scratch, across writes, discards,
//! unaligned writes and size changes, and differs when the content differs.

use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::{Pool, PoolConfig};
use thinvol_stream::digest::{full_pool, update_pool, LtHash};

fn rnd(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn incremental_digest_equals_full_digest() {
    let t = tempfile::tempdir().unwrap();
    let cfg = PoolConfig {
        data_size: 64 << 20,
        data_block_size: DataBlockSize::from_bytes(128 << 10).unwrap(),
        ..Default::default()
    };
    let pool = Pool::create(t.path(), &cfg).unwrap();
    let size = 8u64 << 20;
    pool.create_thin(ThinId(1)).unwrap();
    let mut seed = 42u64;
    let mut buf = vec![0u8; 300_000];
    let mut prev: Option<(u64, u64, LtHash)> = None;
    for round in 0..6 {
        for _ in 0..20 {
            let n = 1 + (rnd(&mut seed) % buf.len() as u64) as usize;
            let off = rnd(&mut seed) % (size - n as u64);
            for b in buf[..n].iter_mut() {
                *b = rnd(&mut seed) as u8;
            }
            pool.write(ThinId(1), off, &buf[..n]).unwrap();
        }
        for _ in 0..3 {
            let off = rnd(&mut seed) % size;
            let len = (rnd(&mut seed) % 1_000_000).min(size - off);
            pool.discard(ThinId(1), off, len).unwrap();
        }
        // A size change in one round: the snapshot is smaller.
        let ssize = if round == 3 { size - 100_000 } else { size };
        let snap = 2 + round;
        pool.create_snap(ThinId(snap), ThinId(1)).unwrap();
        let full = full_pool(&pool, snap, ssize).unwrap();
        if let Some((pid, psize, pd)) = &prev {
            let inc = update_pool(&pool, (*pid, *psize, pd), (snap, ssize)).unwrap();
            assert_eq!(inc, full, "round {round}");
            assert_ne!(inc, *pd, "round {round}: content changed");
        }
        prev = Some((snap, ssize, full));
    }
}
