//! Faults during send/receive (issue #5): a stream cut at random points, a flipped
//! bit, a stream for the wrong base, a receiver killed with SIGKILL, a target written
//! to since its snapshot, tampered resume tokens; into a pool and into a raw file.
//! After each fault the target is at its previous snapshot, readable and
//! thin_check-clean; resuming completes the transfer and the result verifies.

mod send_common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use send_common::*;

const SIZE: usize = 8 * MIB;

/// src/vm@s1 (received into dst/vm) and src/vm@s2 (a few MiB changed); returns the images.
fn setup(e: &Env) -> (Vec<u8>, Vec<u8>) {
    e.pool("src");
    e.pool("dst");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(0xfa17);
    let mut a = vec![0u8; SIZE];
    mutate(&mut a, &mut rng, 10);
    e.set_image("src/vm", &a);
    e.ok(&["snapshot", "src/vm@s1"]);
    let mut b = a.clone();
    mutate(&mut b, &mut rng, 25);
    e.set_image("src/vm", &b);
    e.ok(&["snapshot", "src/vm@s2"]);
    e.pipe(&["src/vm@s1"], &["dst/vm"]);
    (a, b)
}

/// The target still holds exactly @s1 and is consistent.
fn at_s1(e: &Env, a: &[u8]) {
    assert_eq!(e.snapshots("dst/vm"), vec!["dst/vm@s1".to_string()]);
    assert_eq!(e.export("dst/vm@s1"), a);
    assert_eq!(e.export("dst/vm"), a);
    e.thin_check("dst");
}

/// The receiver's token, if it kept state.
fn token(e: &Env) -> Option<String> {
    let o = e.run(&["receive", "--token", "dst/vm"]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The s1 -> s2 stream, from the receiver's resume position if it has one.
fn stream(e: &Env) -> Vec<u8> {
    match token(e) {
        Some(t) => e.send(&["src/vm@s2", "--from", "@s1", "--resume", &t]),
        None => e.send(&["src/vm@s2", "--from", "@s1"]),
    }
}

#[test]
fn cut_streams_and_bit_flips_leave_the_target_and_resume() {
    let e = Env::new();
    let (a, b) = setup(&e);
    let mut rng = Rng(4242);
    let full_len = e.send(&["src/vm@s2", "--from", "@s1"]).len();
    let mut resumed_once = false;
    for i in 0..8 {
        let s = stream(&e);
        let mut cut = s.clone();
        if i % 2 == 0 {
            cut.truncate(rng.below(s.len()));
        } else {
            // Flip one bit after the preamble.
            let at = 16 + rng.below(s.len() - 16);
            cut[at] ^= 1 << rng.below(8);
        }
        let mut c = e.cmd();
        c.env("THINVOL_CHECKPOINT_BYTES", "262144");
        let o = {
            let mut ch = c
                .args(["receive", "dst/vm"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut si = ch.stdin.take().unwrap();
            let _ = si.write_all(&cut);
            drop(si);
            ch.wait_with_output().unwrap()
        };
        assert!(!o.status.success(), "fault {i} went unnoticed");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            [1, 5].contains(&o.status.code().unwrap()),
            "fault {i}: {:?} {err}",
            o.status.code()
        );
        at_s1(&e, &a);
        if s.len() < full_len {
            resumed_once = true;
        }
    }
    assert!(resumed_once, "some attempt resumed from a checkpoint");
    // A resumed stream is shorter than the whole one and completes the transfer.
    let s = stream(&e);
    e.receive_ok(&["dst/vm"], &s);
    assert_eq!(e.export("dst/vm@s2"), b);
    e.verify_full("src/vm@s2", "dst/vm@s2");
    e.thin_check("dst");
}

#[test]
fn sigkilled_receiver_resumes() {
    let e = Env::new();
    let (a, b) = setup(&e);
    let s = e.send(&["src/vm@s2", "--from", "@s1"]);
    let mut ch = e
        .cmd()
        .env("THINVOL_CHECKPOINT_BYTES", "131072")
        .args(["receive", "dst/vm", "-q"])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut si = ch.stdin.take().unwrap();
    si.write_all(&s[..s.len() * 2 / 3]).unwrap();
    si.flush().unwrap();
    let state = e.path("dst/receive/vm.json");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if std::fs::read_to_string(&state).is_ok_and(|x| !x.contains("\"next_seq\": 1,")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(ch.id() as i32, libc::SIGKILL);
    }
    let _ = ch.wait();
    drop(si);
    at_s1(&e, &a);
    let t = token(&e).expect("the killed receive left a checkpoint");
    let r = e.send(&["src/vm@s2", "--from", "@s1", "--resume", &t]);
    assert!(
        r.len() < s.len(),
        "resumed stream {} < {}",
        r.len(),
        s.len()
    );
    e.receive_ok(&["dst/vm"], &r);
    assert_eq!(e.export("dst/vm@s2"), b);
    e.verify_full("src/vm@s2", "dst/vm@s2");
    e.thin_check("dst");
}

#[test]
fn wrong_base_written_target_and_tampered_tokens_are_refused() {
    let e = Env::new();
    let (a, b) = setup(&e);
    // Wrong base: dst holds s1, the stream is s2 -> s3.
    let mut img = b.clone();
    let mut rng = Rng(3);
    mutate(&mut img, &mut rng, 3);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s3"]);
    let s = e.send(&["src/vm@s3", "--from", "@s2"]);
    let o = e.receive(&["dst/vm"], &s);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    at_s1(&e, &a);
    // A stream of another format version (1: digest v1) is refused before any record.
    let mut v1 = e.send(&["src/vm@s2", "--from", "@s1"]);
    v1[8] = 1;
    let o = e.receive(&["dst/vm"], &v1);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("version 1 is not supported"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    at_s1(&e, &a);
    // Written since @s1: refused, then --force rolls the writes back.
    let mut w = a.clone();
    w[..4096].fill(0xAB);
    e.set_image("dst/vm", &w);
    let s2 = e.send(&["src/vm@s2", "--from", "@s1"]);
    let o = e.receive(&["dst/vm"], &s2);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("written to since"));
    assert_eq!(
        e.export("dst/vm"),
        w,
        "refused receive left the writes alone"
    );
    e.receive_ok(&["dst/vm", "--force"], &s2);
    assert_eq!(e.export("dst/vm"), b);
    assert_eq!(e.export("dst/vm@s2"), b);
    // Tokens: a damaged one, and one for another stream, are refused by the sender.
    let cut = &s[..s.len() / 2];
    let o = e.receive(&["dst/vm"], cut);
    assert!(!o.status.success());
    let t = token_in(&o.stderr).expect("token printed");
    let mut bad: Vec<char> = t.chars().collect();
    let k = bad.len() - 5;
    bad[k] = if bad[k] == '0' { '1' } else { '0' };
    let bad: String = bad.into_iter().collect();
    let out = e.p("x.s");
    e.fails(
        &[
            "send",
            "src/vm@s3",
            "--from",
            "@s2",
            "--resume",
            &bad,
            "-o",
            &out,
        ],
        6,
    );
    e.fails(
        &[
            "send",
            "src/vm@s2",
            "--from",
            "@s1",
            "--resume",
            &t,
            "-o",
            &out,
        ],
        6,
    );
    // The right stream resumes.
    let r = e.send(&["src/vm@s3", "--from", "@s2", "--resume", &t]);
    e.receive_ok(&["dst/vm"], &r);
    assert_eq!(e.export("dst/vm@s3"), img);
    e.verify_full("src/vm@s3", "dst/vm@s3");
    // A sender's holds are released afterwards.
    let l = e.ok(&["list", "src", "--json"]);
    assert!(!l.contains("send."), "{l}");
    e.thin_check("dst");
}

#[test]
fn file_target_faults_roll_back_or_recover() {
    let e = Env::new();
    let (a, b) = setup(&e);
    let f = e.p("img.raw");
    e.pipe(&["src/vm@s1"], &["--to-file", &f]);
    let s = e.send(&["src/vm@s2", "--from", "@s1"]);
    let state_before = std::fs::read(format!("{f}.thinvol-state.json")).unwrap();
    // Cut: the receive rolls the file back itself.
    let mut rng = Rng(11);
    for _ in 0..3 {
        let o = e.receive(&["--to-file", &f], &s[..rng.below(s.len())]);
        assert!(!o.status.success());
        assert_eq!(std::fs::read(&f).unwrap(), a);
        assert_eq!(
            std::fs::read(format!("{f}.thinvol-state.json")).unwrap(),
            state_before
        );
    }
    // SIGKILL midway: the journal stays; receive refuses until --recover.
    let mut ch = e
        .cmd()
        .args(["receive", "--to-file", &f, "-q"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut si = ch.stdin.take().unwrap();
    si.write_all(&s[..s.len() / 2]).unwrap();
    si.flush().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(ch.id() as i32, libc::SIGKILL);
    }
    let _ = ch.wait();
    drop(si);
    let journal = std::path::PathBuf::from(format!("{f}.thinvol-journal"));
    assert!(journal.exists());
    let o = e.receive(&["--to-file", &f], &s);
    assert_eq!(o.status.code(), Some(6));
    e.ok(&["receive", "--to-file", &f, "--recover"]);
    assert!(!journal.exists());
    assert_eq!(std::fs::read(&f).unwrap(), a);
    e.verify_full("src/vm@s1", &format!("file:{f}"));
    // Wrong base for the file: refused.
    let o = e.receive(&["--to-file", &f], &e.send(&["src/vm@s2"]));
    assert_eq!(o.status.code(), Some(6));
    e.receive_ok(&["--to-file", &f], &s);
    assert_eq!(std::fs::read(&f).unwrap(), b);
    e.verify_full("src/vm@s2", &format!("file:{f}"));
}

/// A sender killed with SIGKILL leaves its `send.PID` hold; the next send releases the
/// holds of senders that no longer run, and keeps the others.
#[test]
fn next_send_releases_holds_of_dead_senders() {
    let e = Env::new();
    let _ = setup(&e);
    // PIDs above pid_max never exist; 1 always does.
    e.ok(&["hold", "src/vm@s1", "--tag", "send.4294967295"]);
    e.ok(&["hold", "src/vm@s1", "--tag", "send.1"]);
    e.ok(&["hold", "src/vm@s1", "--tag", "keep"]);
    let _ = e.send(&["src/vm@s2", "--from", "@s1"]);
    let l = e.ok(&["list", "src", "--json"]);
    assert!(!l.contains("send.4294967295"), "{l}");
    assert!(l.contains("send.1"), "{l}");
    assert!(l.contains("keep"), "{l}");
}

/// Restore rebuilds devices and so changes which device maps which data block; it
/// drops the derived digests and the content-hash cache (docs/design.md §13.5, rule 5)
/// so that nothing derived before it is trusted after it. The next send derives the
/// restored snapshot's digest from the data, and its replica verifies.
#[test]
fn restore_drops_derived_digests() {
    let e = Env::new();
    e.pool("src");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(0x7e57);
    let mut a = vec![0u8; SIZE];
    mutate(&mut a, &mut rng, 10);
    e.set_image("src/vm", &a);
    e.ok(&["snapshot", "src/vm@s"]);
    // A send stores @s's digest (and records the cache).
    e.send(&["src/vm@s"]);
    let digests = e.path("src").join("digests");
    assert!(std::fs::read_dir(&digests).unwrap().count() > 0);
    let h: serde_json::Value = serde_json::from_str(&e.ok(&["history", "src", "--json"])).unwrap();
    let point = h
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["description"] == "snapshot src/vm@s")
        .unwrap()["id"]
        .to_string();
    // Destroy @s (its blocks stay the volume's) and bring it back: a rebuilt device.
    e.ok(&["destroy", "src/vm@s"]);
    e.ok(&["restore", "src", &point]);
    assert!(!digests.exists(), "restore removed POOLDIR/digests");
    assert_eq!(e.export("src/vm@s"), a);
    let f = e.p("replica.raw");
    e.pipe(&["src/vm@s"], &["--to-file", &f]);
    assert_eq!(std::fs::read(&f).unwrap(), a);
    e.verify_full("src/vm@s", &format!("file:{f}"));
    e.thin_check("src");
}
