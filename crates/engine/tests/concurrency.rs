//! Concurrency: many threads on many devices; writers racing for the same unprovisioned
//! block; readers never see a half-written block; the background commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thinvol_engine::format::ThinId;
use thinvol_engine::{Pool, PoolConfig};

const BS: u64 = 65536;

fn pool(dir: &std::path::Path, blocks: u64) -> Pool {
    Pool::create(
        &dir.join("pool"),
        &PoolConfig {
            data_size: blocks * BS,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn racing_writers_provision_a_block_once() {
    let t = tempfile::tempdir().unwrap();
    let p = pool(t.path(), 4096);
    p.create_thin(ThinId(1)).unwrap();
    for round in 0..50u64 {
        let vb = round * 3;
        let handles: Vec<_> = (0..4u8)
            .map(|w| {
                let p = p.clone();
                std::thread::spawn(move || {
                    // Each writer writes a different 4 KiB slice of the same block.
                    let buf = vec![w + 1; 4096];
                    p.write(ThinId(1), vb * BS + u64::from(w) * 4096, &buf)
                        .unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut b = vec![0u8; BS as usize];
        p.read(ThinId(1), vb * BS, &mut b).unwrap();
        for w in 0..4usize {
            assert!(
                b[w * 4096..(w + 1) * 4096]
                    .iter()
                    .all(|&x| x == w as u8 + 1),
                "round {round} writer {w} lost"
            );
        }
        assert!(b[4 * 4096..].iter().all(|&x| x == 0));
    }
    assert_eq!(p.device(ThinId(1)).unwrap().mapped_blocks, 50);
    let st = p.status().unwrap();
    assert_eq!(st.data_blocks_used, 50, "a block was provisioned twice");
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn readers_never_see_a_torn_block() {
    let t = tempfile::tempdir().unwrap();
    let p = pool(t.path(), 1024);
    p.create_thin(ThinId(1)).unwrap();
    p.write(ThinId(1), 0, &vec![1u8; BS as usize]).unwrap();
    p.create_snap(ThinId(2), ThinId(1)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut v = 2u8;
            // Full-block writes: first one breaks sharing with the snapshot (COW), the
            // rest go in place.
            while !stop.load(Ordering::Relaxed) {
                p.write(ThinId(1), 0, &vec![v; BS as usize]).unwrap();
                v = v.wrapping_add(1).max(2);
            }
        })
    };
    let mut buf = vec![0u8; BS as usize];
    for _ in 0..3000 {
        p.read(ThinId(1), 0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&x| x == buf[0]),
            "torn read: {} vs {}",
            buf[0],
            buf[BS as usize - 1]
        );
        p.read(ThinId(2), 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 1), "snapshot changed");
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn many_threads_many_devices() {
    let t = tempfile::tempdir().unwrap();
    let p = pool(t.path(), 8192);
    for d in 0..4 {
        p.create_thin(ThinId(d)).unwrap();
    }
    let handles: Vec<_> = (0..8u64)
        .map(|th| {
            let p = p.clone();
            std::thread::spawn(move || {
                let dev = ThinId(th % 4);
                let mut x = th * 7919 + 1;
                for i in 0..400u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Each thread owns virtual blocks th*1000 .. th*1000+200 of its device.
                    let vb = th * 1000 + x % 200;
                    let off = vb * BS + (x >> 20) % (BS - 512);
                    let tag = [(th as u8) << 4 | (i % 16) as u8; 512];
                    p.write(dev, off, &tag).unwrap();
                    let mut back = [0u8; 512];
                    p.read(dev, off, &mut back).unwrap();
                    assert_eq!(back, tag);
                    if i % 97 == 0 {
                        p.discard(dev, vb * BS, BS).unwrap();
                    }
                    if i % 50 == 0 {
                        p.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let r = p.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}

#[test]
fn background_commit_within_the_interval() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("pool");
    let p = Pool::create(
        &dir,
        &PoolConfig {
            data_size: 64 * BS,
            commit_interval: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .unwrap();
    p.create_thin(ThinId(5)).unwrap();
    p.write(ThinId(5), 0, b"hello").unwrap();
    // No explicit commit: the committer must persist it within ~the interval.
    let committed = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let other = Pool::open_with(
            &dir,
            &thinvol_engine::OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let ok = other.exists(ThinId(5)).unwrap() && {
            let mut b = [0u8; 5];
            other.read(ThinId(5), 0, &mut b).unwrap();
            &b == b"hello"
        };
        assert!(matches!(
            other.write(ThinId(5), 0, b"x"),
            Err(thinvol_engine::Error::ReadOnly)
        ));
        ok
    });
    assert!(committed, "nothing was committed within 5 s");
}
