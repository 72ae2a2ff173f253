//! `receive --to-file` into a real block device (a loop device over a file): full and
//! incremental streams land byte for byte and verify; the sidecar state and journal
//! live in STATE_DIR/targets, never in /dev; a stream for the wrong base, a cut stream
//! and a device too small are refused with the device left at its snapshot. Needs root
//! and losetup; skips with a reason otherwise.

mod send_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use send_common::*;

const SIZE: usize = 8 * MIB;

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (losetup)".into());
    }
    match Command::new("losetup").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("losetup is missing".into()),
    }
}

/// A loop device over a file of `bytes`, detached on drop.
struct Loop(String);

impl Loop {
    fn over(file: &Path, bytes: u64) -> Option<Loop> {
        std::fs::File::create(file).unwrap().set_len(bytes).unwrap();
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .unwrap();
        if !o.status.success() {
            eprintln!(
                "skipped: losetup failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Some(Loop(
            String::from_utf8(o.stdout).unwrap().trim().to_string(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The first `n` bytes of the device, read through the device node.
fn head(dev: &str, n: usize) -> Vec<u8> {
    let mut b = std::fs::read(dev).unwrap();
    b.truncate(n);
    b
}

fn sidecar(e: &Env, dev: &str) -> PathBuf {
    e.path("home")
        .join("targets")
        .join(format!("{}.thinvol-state.json", dev.replace('/', "%2F")))
}

#[test]
fn block_device_target_round_trip_and_faults() {
    if let Some(r) = skip_reason() {
        eprintln!("skipped: {r}");
        return;
    }
    let e = Env::new();
    e.pool("src");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(0xb10c_de40);
    let mut img = vec![0u8; SIZE];
    mutate(&mut img, &mut rng, 10);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s1"]);
    let s1 = img.clone();

    // A device smaller than the volume is refused before anything is written.
    let Some(small) = Loop::over(&e.path("small.img"), 4 * MIB as u64) else {
        return;
    };
    let full = e.send(&["src/vm@s1"]);
    let o = e.receive(&["--to-file", &small.0], &full);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds"));
    assert!(!sidecar(&e, &small.0).exists());

    // Full stream into a 12 MiB device (larger than the volume: the tail is untouched).
    let Some(dev) = Loop::over(&e.path("disk.img"), 12 * MIB as u64) else {
        return;
    };
    let d = dev.0.as_str();
    e.pipe(&["src/vm@s1"], &["--to-file", d]);
    assert_eq!(head(d, SIZE), s1);
    assert!(sidecar(&e, d).exists(), "state in STATE_DIR/targets");
    assert!(!Path::new(&format!("{d}.thinvol-state.json")).exists());
    e.verify_full("src/vm@s1", &format!("file:{d}"));

    // Incremental with writes and discards.
    mutate(&mut img, &mut rng, 10);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s2"]);
    let s2 = img.clone();
    e.pipe(&["src/vm@s2", "--from", "@s1"], &["--to-file", d]);
    assert_eq!(head(d, SIZE), s2);
    e.verify_full("src/vm@s2", &format!("file:{d}"));

    // A stream whose base is not what the device holds: refused, device unchanged.
    mutate(&mut img, &mut rng, 10);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s3"]);
    let o = e.receive(&["--to-file", d], &e.send(&["src/vm@s3", "--from", "@s1"]));
    assert_eq!(o.status.code(), Some(6));
    assert_eq!(head(d, SIZE), s2);

    // A cut stream rolls the device back to @s2 and leaves no journal.
    let s = e.send(&["src/vm@s3", "--from", "@s2"]);
    for cut in [s.len() / 3, s.len() - 7] {
        let o = e.receive(&["--to-file", d], &s[..cut]);
        assert!(!o.status.success());
        assert_eq!(head(d, SIZE), s2, "cut at {cut}");
        let journal = e
            .path("home")
            .join("targets")
            .join(format!("{}.thinvol-journal", d.replace('/', "%2F")));
        assert!(!journal.exists());
    }
    e.verify_full("src/vm@s2", &format!("file:{d}"));

    // The whole stream then applies.
    e.receive_ok(&["--to-file", d], &s);
    assert_eq!(head(d, SIZE), img);
    e.verify_full("src/vm@s3", &format!("file:{d}"));
}
