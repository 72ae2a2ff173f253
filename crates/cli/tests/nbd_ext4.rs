//! A served volume as a real disk: nbdfuse exposes the export as a file, losetup makes
//! it a block device, mkfs.ext4 + mount, files copied in; a snapshot taken while
//! mounted (sync + fsfreeze; the server pauses for `thinvol snapshot`), unmount; then
//! the snapshot served read-only: `e2fsck -fn` clean, mounted, files intact. Needs root,
//! /dev/fuse and loop devices; skips with a reason otherwise.

mod nbd_common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_common::*;

fn skip() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (losetup, mount)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    for t in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "fsfreeze",
    ] {
        if !have(t) {
            return Some(format!("{t} not installed"));
        }
    }
    None
}

/// Undo mounts, loop devices and FUSE mounts in reverse order, also on panic.
#[derive(Default)]
struct Cleanup {
    steps: Vec<Vec<String>>,
    fuse: Vec<Child>,
}

impl Cleanup {
    fn push(&mut self, cmd: &[&str]) {
        self.steps.push(cmd.iter().map(|s| s.to_string()).collect());
    }
    fn run_all(&mut self) {
        while let Some(s) = self.steps.pop() {
            let _ = Command::new(&s[0])
                .args(&s[1..])
                .stderr(Stdio::null())
                .status();
        }
        for mut c in self.fuse.drain(..) {
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run_all();
    }
}

/// nbdfuse `uri` at `dir` (file `dir/nbd`); waits for its pid file.
fn fuse(e: &Env, cl: &mut Cleanup, dir: &str, uri: &str, ro: bool) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let pid = format!("{dir}.pid");
    let mut c = Command::new("nbdfuse");
    if ro {
        c.arg("-r");
    }
    c.args(["-P", &pid, dir, uri]);
    let child = c.spawn().unwrap();
    cl.fuse.push(child);
    cl.push(&["fusermount3", "-u", dir]);
    let t = Instant::now();
    while !Path::new(&pid).exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "nbdfuse not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = e;
    format!("{dir}/nbd")
}

fn losetup(cl: &mut Cleanup, file: &str, ro: bool) -> String {
    let mut args = vec!["-f", "--show"];
    if ro {
        args.push("-r");
    }
    args.push(file);
    let out = tool("losetup", &args);
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    cl.push(&["losetup", "-d", &dev]);
    dev
}

fn files() -> Vec<(String, Vec<u8>)> {
    (0..6)
        .map(|i| {
            (
                format!("f{i}.bin"),
                pattern(100 + i, (1 << 20) * (i as usize + 1) + 777),
            )
        })
        .collect()
}

#[test]
fn ext4_on_nbdfuse_snapshot_while_mounted() {
    if let Some(why) = skip() {
        eprintln!("skipping: {why}");
        return;
    }
    let e = Env::new();
    e.pool("1G");
    e.ok(&["create", "tank/v", "--size", "256M"]);
    let mut cl = Cleanup::default();
    let mut server = e.serve(&["tank/v"], &[]);
    let img = fuse(&e, &mut cl, &e.p("fuse"), &e.uri("tank/v"), false);
    let dev = losetup(&mut cl, &img, false);
    tool("mkfs.ext4", &["-q", "-F", &dev]);
    let mnt = e.p("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    tool("mount", &[&dev, &mnt]);
    cl.push(&["umount", &mnt]);
    let fs = files();
    for (n, d) in &fs {
        std::fs::write(format!("{mnt}/{n}"), d).unwrap();
    }
    tool("sync", &[]);
    tool("fsfreeze", &["-f", &mnt]);
    let snap = e.run(&["snapshot", "tank/v@s"]);
    tool("fsfreeze", &["-u", &mnt]);
    assert!(
        snap.status.success(),
        "{}",
        String::from_utf8_lossy(&snap.stderr)
    );
    // Changes after the snapshot must not show in it.
    std::fs::write(format!("{mnt}/f0.bin"), b"changed").unwrap();
    std::fs::write(format!("{mnt}/late.bin"), b"late").unwrap();
    cl.run_all();
    assert!(server.stop(), "server did not stop cleanly");
    assert!(server.log().contains("resumed"));

    let _server = e.serve(&["tank/v@s"], &[]);
    let img = fuse(&e, &mut cl, &e.p("fuse2"), &e.uri("tank/v@s"), true);
    let dev = losetup(&mut cl, &img, true);
    tool("e2fsck", &["-fn", &dev]);
    tool("mount", &["-o", "ro,noload", &dev, &mnt]);
    cl.push(&["umount", &mnt]);
    for (n, d) in &fs {
        assert!(
            std::fs::read(format!("{mnt}/{n}")).unwrap() == *d,
            "{n} differs"
        );
    }
    assert!(!Path::new(&format!("{mnt}/late.bin")).exists());
    cl.run_all();
}
