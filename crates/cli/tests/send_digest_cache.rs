//! The pools' content-hash caches (`POOLDIR/digests/chunks.b3`, docs/design.md §13.5):
//! digests derived through them (old chunks not read) equal `verify --full`'s
//! from-scratch digests on both sides, across snapshots destroyed and their blocks
//! reused, caches deleted or emptied on either side (unknown entries: the old data is
//! read), a receiver with larger blocks than the sender, and a receive interrupted and
//! resumed.

mod send_common;

use std::io::Write;
use std::process::Stdio;

use send_common::*;

const SIZE: usize = 8 * MIB;

fn small_pool(e: &Env, name: &str, block: &str) {
    // Small pools, so the blocks of destroyed snapshots are reused soon.
    let dir = e.p(name);
    e.ok(&[
        "pool",
        "create",
        name,
        "--dir",
        &dir,
        "--size",
        "40M",
        "--block-size",
        block,
    ]);
}

fn cache(e: &Env, pool: &str) -> std::path::PathBuf {
    e.path(pool).join("digests").join("chunks.b3")
}

#[test]
fn cached_digests_verify_across_reuse_and_lost_caches() {
    let e = Env::new();
    small_pool(&e, "src", "64K");
    // Larger blocks on the receiver: a block the stream changes only in part is
    // completed from the base by copy-on-write, and those chunks' hashes are read back.
    small_pool(&e, "dst", "256K");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(0xcac4e);
    let mut img = vec![0u8; SIZE];
    for round in 1..=7 {
        mutate(&mut img, &mut rng, 14);
        e.set_image("src/vm", &img);
        let snap = format!("src/vm@s{round}");
        e.ok(&["snapshot", &snap]);
        match round {
            3 => std::fs::remove_file(cache(&e, "src")).unwrap(),
            4 => std::fs::remove_file(cache(&e, "dst")).unwrap(),
            5 => {
                for p in ["src", "dst"] {
                    std::fs::File::create(cache(&e, p)).unwrap();
                }
            }
            _ => {}
        }
        let from = format!("@s{}", round - 1);
        let mut args = vec![snap.as_str()];
        if round > 1 {
            args.extend_from_slice(&["--from", &from]);
        }
        e.pipe(&args, &["dst/vm"]);
        let d = format!("dst/vm@s{round}");
        assert_eq!(e.export(&d), img, "round {round}");
        // The stored (cache-derived) digests equal the from-scratch ones on both sides.
        e.verify_full(&snap, &d);
        for p in ["src", "dst"] {
            let n = std::fs::metadata(cache(&e, p)).unwrap().len();
            assert!(n > 0, "round {round}: {p} recorded content hashes");
        }
        if round >= 3 {
            // Free the blocks only the older snapshots held; later writes reuse them.
            e.ok(&["destroy", &format!("src/vm@s{}", round - 2)]);
            e.ok(&["destroy", &format!("dst/vm@s{}", round - 2)]);
        }
    }
    e.thin_check("src");
    e.thin_check("dst");
}

#[test]
fn resumed_receive_records_hashes_for_the_next_incremental() {
    let e = Env::new();
    e.pool("src");
    e.pool("dst");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(0x5e5e);
    let mut img = vec![0u8; SIZE];
    mutate(&mut img, &mut rng, 10);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s1"]);
    e.pipe(&["src/vm@s1"], &["dst/vm"]);
    mutate(&mut img, &mut rng, 30);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s2"]);
    // Cut the s1 -> s2 stream in the middle: the receiver checkpoints (every 256 KiB)
    // and stops with a token.
    let s = e.send(&["src/vm@s2", "--from", "@s1"]);
    let mut ch = e
        .cmd()
        .env("THINVOL_CHECKPOINT_BYTES", "262144")
        .args(["receive", "dst/vm"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut si = ch.stdin.take().unwrap();
    let _ = si.write_all(&s[..s.len() / 2]);
    drop(si);
    let o = ch.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let t = token_in(&o.stderr).expect("a resume token");
    let rest = e.send(&["src/vm@s2", "--from", "@s1", "--resume", &t]);
    assert!(rest.len() < s.len());
    e.receive_ok(&["dst/vm"], &rest);
    e.verify_full("src/vm@s2", "dst/vm@s2");
    // The next incremental subtracts s2's old chunks through dst's cache, including
    // those received before the interruption.
    mutate(&mut img, &mut rng, 30);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s3"]);
    e.pipe(&["src/vm@s3", "--from", "@s2"], &["dst/vm"]);
    assert_eq!(e.export("dst/vm@s3"), img);
    e.verify_full("src/vm@s3", "dst/vm@s3");
}

/// A raw-file target whose state records a digest of the v1 definition (no
/// `digest_version`): verify and the next incremental recompute it from the file
/// instead of comparing or extending a digest of another definition.
#[test]
fn file_state_with_a_v1_digest_is_recomputed() {
    let e = Env::new();
    e.pool("src");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(0xf11e);
    let mut img = vec![0u8; SIZE];
    mutate(&mut img, &mut rng, 10);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s1"]);
    let file = e.p("replica.raw");
    e.pipe(&["src/vm@s1"], &["--to-file", &file]);
    let sp = format!("{file}.thinvol-state.json");
    let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&sp).unwrap()).unwrap();
    assert_eq!(st["digest_version"], 2);
    // What a state file of the v1 definition looks like: another digest, no version.
    st.as_object_mut().unwrap().remove("digest_version");
    st["digest"] = serde_json::Value::String("ab".repeat(2048));
    std::fs::write(&sp, serde_json::to_vec(&st).unwrap()).unwrap();
    e.verify_full("src/vm@s1", &format!("file:{file}"));
    mutate(&mut img, &mut rng, 20);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s2"]);
    e.pipe(&["src/vm@s2", "--from", "@s1"], &["--to-file", &file]);
    assert_eq!(std::fs::read(&file).unwrap(), img);
    e.verify_full("src/vm@s2", &format!("file:{file}"));
}

/// A damaged cache on the receiver (entries that are not the chunks' hashes: disk
/// damage, or a bug breaking invariant C) must not make a correct replica fail: the
/// derived digest disagrees with the stream's, the receiver hashes the received
/// snapshot from scratch, finds it equal, clears its cache, warns, and publishes.
#[test]
fn receiver_recovers_from_a_damaged_cache() {
    let e = Env::new();
    small_pool(&e, "src", "64K");
    small_pool(&e, "dst", "64K");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(0xbad_cac4e);
    let mut img = vec![0u8; SIZE];
    mutate(&mut img, &mut rng, 14);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s1"]);
    e.pipe(&["src/vm@s1"], &["dst/vm"]);
    // Every entry of the receiver's cache now names other content.
    let c = cache(&e, "dst");
    let n = std::fs::metadata(&c).unwrap().len() as usize;
    assert!(n > 0, "the full receive recorded hashes");
    let mut junk = vec![0u8; n];
    rng.fill(&mut junk);
    std::fs::write(&c, &junk).unwrap();
    mutate(&mut img, &mut rng, 14);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s2"]);
    let s = e.send(&["src/vm@s2", "--from", "@s1"]);
    let o = e.receive(&["dst/vm"], &s);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning: dst/vm@s2: the digest derived"),
        "{err}"
    );
    assert_eq!(e.export("dst/vm@s2"), img);
    e.verify_full("src/vm@s2", "dst/vm@s2");
    e.thin_check("dst");
}
