//! Quick randomized stress: thousands of block writes/discards with snapshots and
//! deletes on small blocks, checked by our checker, `thin_check` and a byte model.
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::{Pool, PoolConfig};

#[test]
fn random_ops_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pool");
    let bs = 65536u64;
    let pool = Pool::create(
        &p,
        &PoolConfig {
            data_size: 20000 * bs,
            data_block_size: DataBlockSize::DEFAULT,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // model: dev -> vblock -> tag byte (blocks are filled with one byte value)
    let mut model: HashMap<u64, HashMap<u64, u8>> = HashMap::new();
    let mut next_id = 1u64;
    pool.create_thin(ThinId(0)).unwrap();
    model.insert(0, HashMap::new());
    let nvb = 3000u64;
    for step in 0..6000 {
        let devs: Vec<u64> = model.keys().copied().collect();
        let d = devs[rng.gen_range(0..devs.len())];
        let r = rng.gen_range(0..100);
        if r < 70 {
            let vb = rng.gen_range(0..nvb);
            let tag = rng.gen_range(1..=255u8);
            pool.write(ThinId(d), vb * bs, &vec![tag; bs as usize])
                .unwrap();
            model.get_mut(&d).unwrap().insert(vb, tag);
        } else if r < 88 {
            let vb = rng.gen_range(0..nvb);
            let n = rng.gen_range(1..64);
            pool.discard(ThinId(d), vb * bs, n * bs).unwrap();
            let m = model.get_mut(&d).unwrap();
            for x in vb..vb + n {
                m.remove(&x);
            }
        } else if r < 94 && model.len() < 8 {
            let id = next_id;
            next_id += 1;
            pool.create_snap(ThinId(id), ThinId(d)).unwrap();
            let m = model[&d].clone();
            model.insert(id, m);
        } else if r < 97 && model.len() > 1 {
            pool.delete_thin(ThinId(d)).unwrap();
            model.remove(&d);
        } else {
            pool.commit().unwrap();
        }
        if step % 1500 == 1499 {
            let rep = pool.check().unwrap();
            assert!(
                rep.is_clean(),
                "step {step}: {:?}",
                &rep.problems[..rep.problems.len().min(10)]
            );
        }
    }
    for (d, m) in &model {
        let maps = pool.mappings(ThinId(*d)).unwrap();
        assert_eq!(maps.len(), m.len(), "dev {d}");
        for (vb, _) in &maps {
            let mut b = vec![0u8; 16];
            pool.read(ThinId(*d), vb.0 * bs + 100, &mut b).unwrap();
            assert_eq!(b[0], m[&vb.0], "dev {d} vb {}", vb.0);
        }
        assert_eq!(
            pool.device(ThinId(*d)).unwrap().mapped_blocks,
            m.len() as u64
        );
    }
    // delta between every pair against the model
    let devs: Vec<u64> = model.keys().copied().collect();
    for &a in &devs {
        for &b in &devs {
            let (d, _) = pool.delta(ThinId(a), ThinId(b), false).unwrap();
            let la: HashMap<u64, _> = pool
                .mappings(ThinId(a))
                .unwrap()
                .into_iter()
                .map(|(v, x)| (v.0, x))
                .collect();
            let lb: HashMap<u64, _> = pool
                .mappings(ThinId(b))
                .unwrap()
                .into_iter()
                .map(|(v, x)| (v.0, x))
                .collect();
            let mut expect: Vec<u64> = la
                .keys()
                .chain(lb.keys())
                .copied()
                .filter(|k| la.get(k) != lb.get(k))
                .collect();
            expect.sort();
            expect.dedup();
            let got: Vec<u64> = d.iter().map(|x| x.vblock).collect();
            assert_eq!(got, expect, "delta {a} {b}");
        }
    }
    let rep = pool.check().unwrap();
    assert!(
        rep.is_clean(),
        "{:?}",
        &rep.problems[..rep.problems.len().min(10)]
    );
    pool.close().unwrap();
    let out = std::process::Command::new("thin_check")
        .arg(p.join("metadata"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
}
