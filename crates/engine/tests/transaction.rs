//! `Pool::transaction`: several metadata operations commit together or not at all.

use thinvol_engine::format::{DataBlock, ThinId, VBlock};
use thinvol_engine::{Error, Pool, PoolConfig};

fn pool() -> (tempfile::TempDir, Pool) {
    let t = tempfile::tempdir().unwrap();
    let p = Pool::create(
        &t.path().join("p"),
        &PoolConfig {
            data_size: 256 << 16,
            ..Default::default()
        },
    )
    .unwrap();
    (t, p)
}

#[test]
fn all_or_nothing() {
    let (t, p) = pool();
    p.create_thin(ThinId(1)).unwrap();
    p.write(ThinId(1), 0, &[7u8; 70000]).unwrap(); // not committed yet: the txn commits it first
    let r: Result<(), Error> = p.transaction(|tx| {
        tx.create_snap(ThinId(2), ThinId(1))?;
        tx.delete(ThinId(1))?;
        tx.set_transaction_id(0, 1)?;
        tx.create_thin(ThinId(2)) // exists: fails, so nothing above may survive
    });
    assert!(matches!(r, Err(Error::DeviceExists(ThinId(2)))));
    assert!(p.exists(ThinId(1)).unwrap());
    assert!(!p.exists(ThinId(2)).unwrap());
    assert_eq!(p.status().unwrap().transaction_id, 0);
    let mut b = vec![0u8; 70000];
    p.read(ThinId(1), 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    assert!(p.check().unwrap().is_clean());

    p.transaction(|tx| {
        tx.create_snap(ThinId(2), ThinId(1))?;
        tx.delete(ThinId(1))?;
        tx.set_transaction_id(0, 1)
    })
    .unwrap();
    drop(p);
    let p = Pool::open(&t.path().join("p")).unwrap();
    assert_eq!(p.status().unwrap().transaction_id, 1);
    assert!(!p.exists(ThinId(1)).unwrap());
    p.read(ThinId(2), 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn rebuild_a_device_from_recorded_mappings() {
    let (_t, p) = pool();
    p.create_thin(ThinId(1)).unwrap();
    p.write(ThinId(1), 0, &[1u8; 3 * 65536]).unwrap();
    p.create_snap(ThinId(2), ThinId(1)).unwrap();
    let maps = p.transaction(|tx| tx.mappings(ThinId(2))).unwrap();
    // Rebuild device 3 from device 2's mappings, then drop device 2.
    p.transaction(|tx| {
        tx.create_thin(ThinId(3))?;
        for (vb, b, _) in &maps {
            assert!(tx.data_block_refs(*b)? > 0);
            tx.map_existing(ThinId(3), *vb, *b)?;
        }
        tx.delete(ThinId(2))
    })
    .unwrap();
    let mut b = vec![0u8; 3 * 65536];
    p.read(ThinId(3), 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    assert!(p.check().unwrap().is_clean());
    let r = p.transaction(|tx| tx.map_existing(ThinId(3), VBlock(9), DataBlock(1 << 30)));
    assert!(r.is_err());
    assert!(p.check().unwrap().is_clean());
}
