//! Content digests on a real pool: the digest maintained from the base through the
//! engine delta equals the digest recomputed from scratch, across writes, discards,
//! unaligned writes and size changes, and differs when the content differs.

use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::{Pool, PoolConfig};
use thinvol_stream::chunk_cache::ChunkCache;
use thinvol_stream::digest::{
    chunk_hash, full_pool, full_pool_cached, update_pool, update_pool_cached, LtHash, CHUNK,
};

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

/// Every recorded cache entry of `thin`'s whole chunks equals the chunk's content hash.
fn entries_true(pool: &Pool, cache: &ChunkCache, thin: u64, size: u64) -> usize {
    let bs = pool.block_size();
    let mut buf = vec![0u8; bs as usize];
    let mut known = 0;
    for (vb, pb) in pool
        .mappings_range(ThinId(thin), 0, size.div_ceil(bs))
        .unwrap()
    {
        pool.read_data_block(pb, &mut buf).unwrap();
        let n = (size - vb.0 * bs).min(bs) / CHUNK;
        let got = cache.get_run(pb.0 * bs, n as usize);
        for (k, h) in got.iter().enumerate() {
            if let Some(h) = h {
                let c = k * CHUNK as usize;
                assert_eq!(
                    *h,
                    chunk_hash(&buf[c..c + CHUNK as usize]),
                    "block {}",
                    pb.0
                );
                known += 1;
            }
        }
    }
    known
}

/// Digests derived through the content-hash cache (old chunks not read) equal the
/// from-scratch digests, also when blocks of deleted snapshots are reused by later
/// writes (their stale entries are recorded anew before a digest relies on them), and
/// when the cache is lost or emptied (unknown entries: the old chunks are read).
#[test]
fn cached_derivation_equals_full_and_survives_reuse_and_cache_loss() {
    let t = tempfile::tempdir().unwrap();
    let cfg = PoolConfig {
        // Small: freed blocks are reused soon.
        data_size: 12 << 20,
        data_block_size: DataBlockSize::from_bytes(128 << 10).unwrap(),
        ..Default::default()
    };
    let pool = Pool::create(t.path(), &cfg).unwrap();
    let size = 4u64 << 20;
    pool.create_thin(ThinId(1)).unwrap();
    let mut seed = 7u64;
    let mut buf = vec![0u8; 200_000];
    let mut prev: Option<(u64, u64, LtHash)> = None;
    let mut older: Vec<u64> = Vec::new();
    for round in 0..10u64 {
        for _ in 0..12 {
            let n = 1 + (rnd(&mut seed) % buf.len() as u64) as usize;
            let off = rnd(&mut seed) % (size - n as u64);
            for b in buf[..n].iter_mut() {
                *b = rnd(&mut seed) as u8;
            }
            pool.write(ThinId(1), off, &buf[..n]).unwrap();
        }
        let off = rnd(&mut seed) % size;
        pool.discard(ThinId(1), off, (size - off).min(300_000))
            .unwrap();
        let snap = 10 + round;
        pool.create_snap(ThinId(snap), ThinId(1)).unwrap();
        match round {
            4 => std::fs::remove_file(ChunkCache::path(t.path())).unwrap(),
            7 => std::fs::File::create(ChunkCache::path(t.path()))
                .unwrap()
                .set_len(0)
                .unwrap(),
            _ => {}
        }
        let cache = ChunkCache::open(t.path()).unwrap();
        let full = full_pool(&pool, snap, size).unwrap();
        let d = match &prev {
            None => full_pool_cached(&pool, Some(&cache), snap, size).unwrap(),
            Some((pid, psize, pd)) => {
                update_pool_cached(&pool, Some(&cache), (*pid, *psize, pd), (snap, size)).unwrap()
            }
        };
        assert_eq!(d, full, "round {round}");
        // The new snapshot's changed chunks are recorded, and every entry of its blocks
        // is true.
        assert!(entries_true(&pool, &cache, snap, size) > 0, "round {round}");
        // Keep two snapshots: the older ones are deleted and their blocks freed.
        older.push(snap);
        if older.len() > 2 {
            pool.delete_thin(ThinId(older.remove(0))).unwrap();
        }
        prev = Some((snap, size, d));
    }
}

/// The element depends on the content only through its hash, and the all-zero chunk
/// (whatever its length) contributes nothing.
#[test]
fn element_is_a_function_of_the_content_hash() {
    let c = vec![9u8; 1000];
    let mut a = LtHash::default();
    a.add_chunk(3, &c);
    let mut b = LtHash::default();
    b.apply_hash(3, &chunk_hash(&c), false);
    assert_eq!(a, b);
    // Padding: a short chunk equals the same bytes padded to 64 KiB.
    let mut padded = c.clone();
    padded.resize(CHUNK as usize, 0);
    assert_eq!(chunk_hash(&c), chunk_hash(&padded));
    assert!(LtHash::element(3, &chunk_hash(&[0u8; 100])).is_none());
    assert!(LtHash::element(3, &chunk_hash(&c)).is_some());
}
