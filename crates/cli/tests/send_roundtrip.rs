//! send | receive round trips through the real binary (issue #5): random workloads,
//! chains of incrementals into a pool and into a raw file, `--from-each`, a group
//! stream, zstd, `--dry-run` exactness; every replica compared byte for byte with the
//! source snapshot (`export` + compare, and `verify --full`).

mod send_common;

use send_common::*;

const SIZE: usize = 8 * MIB;

#[test]
fn chain_of_incrementals_into_pool_and_file() {
    let e = Env::new();
    e.pool("src");
    e.pool("dst");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(0x5eed_1234);
    let mut img = vec![0u8; SIZE];
    let file = e.p("replica.raw");
    for round in 1..=5 {
        mutate(&mut img, &mut rng, 12);
        e.set_image("src/vm", &img);
        let snap = format!("src/vm@s{round}");
        e.ok(&["snapshot", &snap]);
        let compress = round % 2 == 0;
        let mut args = vec![snap.as_str()];
        let from = format!("@s{}", round - 1);
        if round > 1 {
            args.extend_from_slice(&["--from", &from]);
        }
        if compress {
            args.push("-c");
        }
        // Exact --dry-run: the uncompressed stream length.
        let mut dry = args.clone();
        dry.retain(|a| *a != "-c");
        dry.push("--dry-run");
        let n: u64 = e
            .ok(&[&["send"], dry.as_slice()].concat())
            .trim()
            .parse()
            .unwrap();
        let plain = e.send(&dry[..dry.len() - 1]);
        assert_eq!(n, plain.len() as u64, "round {round}: dry-run is exact");
        e.pipe(&args, &["dst/vm"]);
        e.pipe(&args, &["--to-file", &file]);
        let d = format!("dst/vm@s{round}");
        assert_eq!(e.export(&d), img, "round {round}: pool replica");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            img,
            "round {round}: file replica"
        );
        e.verify_full(&snap, &d);
        e.verify_full(&snap, &format!("file:{file}"));
    }
    // The receiving volume moved forward with its snapshots and reads like the source.
    assert_eq!(e.export("dst/vm"), img);
    assert_eq!(e.snapshots("dst/vm").len(), 5);
    e.thin_check("dst");
}

#[test]
fn from_each_recreates_every_intermediate_snapshot() {
    let e = Env::new();
    e.pool("src");
    e.pool("dst");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(77);
    let mut img = vec![0u8; SIZE];
    let mut images = Vec::new();
    for i in 1..=4 {
        mutate(&mut img, &mut rng, 8);
        e.set_image("src/vm", &img);
        e.ok(&["snapshot", &format!("src/vm@s{i}")]);
        images.push(img.clone());
    }
    e.pipe(&["src/vm@s1"], &["dst/vm"]);
    e.pipe(&["src/vm@s4", "--from-each", "@s1"], &["dst/vm"]);
    for (i, im) in images.iter().enumerate() {
        let n = format!("dst/vm@s{}", i + 1);
        assert_eq!(&e.export(&n), im, "{n}");
        e.verify_full(&format!("src/vm@s{}", i + 1), &n);
    }
    // Into a file too: the file ends at the last snapshot.
    let file = e.p("f.raw");
    e.pipe(&["src/vm@s1"], &["--to-file", &file]);
    e.pipe(&["src/vm@s4", "--from-each", "@s1"], &["--to-file", &file]);
    assert_eq!(std::fs::read(&file).unwrap(), images[3]);
    e.thin_check("dst");
}

#[test]
fn group_stream_is_received_as_one_unit() {
    let e = Env::new();
    e.pool("src");
    e.pool("dst");
    e.ok(&["create", "src/db", "--size", "8M"]);
    e.ok(&["create", "src/log", "--size", "4M"]);
    let mut rng = Rng(99);
    let mut db = vec![0u8; SIZE];
    let mut log = vec![0u8; 4 * MIB];
    mutate(&mut db, &mut rng, 10);
    mutate(&mut log, &mut rng, 10);
    e.set_image("src/db", &db);
    e.set_image("src/log", &log);
    e.ok(&["snapshot", "src/db@g1", "src/log@g1"]);
    e.pipe(&["src/db@g1", "src/log@g1"], &["dst"]);
    mutate(&mut db, &mut rng, 5);
    mutate(&mut log, &mut rng, 5);
    e.set_image("src/db", &db);
    e.set_image("src/log", &log);
    e.ok(&["snapshot", "src/db@g2", "src/log@g2"]);
    e.pipe(&["src/db@g2", "src/log@g2", "--from", "@g1"], &["dst"]);
    assert_eq!(e.export("dst/db@g2"), db);
    assert_eq!(e.export("dst/log@g2"), log);
    e.verify_full("src/db@g2", "dst/db@g2");
    e.verify_full("src/log@g2", "dst/log@g2");
    // Snapshots not taken together do not make a group stream.
    e.ok(&["snapshot", "src/db@lone"]);
    e.ok(&["snapshot", "src/log@lone"]);
    e.fails(&["send", "src/db@lone", "src/log@lone", "-o", &e.p("x")], 6);
    // A group whose second member's base is wrong is refused as a whole.
    e.ok(&["snapshot", "dst/log@extra"]);
    e.ok(&["snapshot", "src/db@g3", "src/log@g3"]);
    let s = e.send(&["src/db@g3", "src/log@g3", "--from", "@g2"]);
    let o = e.receive(&["dst"], &s);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!e.snapshots("dst/db").iter().any(|n| n.ends_with("@g3")));
    e.ok(&["receive", "--abort", "dst"]);
    e.thin_check("dst");
}

#[test]
fn zero_and_discarded_ranges_travel_as_ranges() {
    let e = Env::new();
    e.pool("src");
    e.pool("dst");
    e.ok(&["create", "src/vm", "--size", "64M"]);
    let mut img = vec![0u8; 64 * MIB];
    let mut rng = Rng(5);
    rng.fill(&mut img[..32 * MIB]);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@a"]);
    img[..32 * MIB].fill(0);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@b"]);
    let full = e.send(&["src/vm@a"]);
    assert!(
        full.len() < 33 * MIB,
        "full: unmapped half is one ZERO range"
    );
    let inc = e.send(&["src/vm@b", "--from", "@a"]);
    assert!(
        inc.len() < 64 * 1024,
        "discarded 32 MiB travels as ranges: {}",
        inc.len()
    );
    e.receive_ok(&["dst/vm"], &full);
    e.receive_ok(&["dst/vm"], &inc);
    assert_eq!(e.export("dst/vm@b"), img);
    e.verify_full("src/vm@b", "dst/vm@b");
}
