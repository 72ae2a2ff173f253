//! `thinvol serve` (issue 4) with real NBD clients: qemu-img info/convert/compare,
//! qemu-io patterns read back, nbdinfo --list/--map against our allocation, nbdcopy in
//! and out, read-only snapshots, and other commands (snapshot) while serving.

mod nbd_common;

use nbd_common::*;
use serde_json::Value;

fn skip() -> bool {
    for t in ["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"] {
        if !have(t) {
            eprintln!("skipping: {t} not installed (scripts/test.sh installs it)");
            return true;
        }
    }
    false
}

/// A 64 MiB source image: random data with holes and a zero run that is allocated.
fn source(e: &Env) -> (String, Vec<u8>) {
    let mut img = vec![0u8; 64 * MIB as usize];
    img[..3 * MIB as usize + 5000].copy_from_slice(&pattern(1, 3 * MIB as usize + 5000));
    let at = 40 * MIB as usize + 4096;
    img[at..at + 2 * MIB as usize].copy_from_slice(&pattern(2, 2 * MIB as usize));
    let tail = img.len() - 100;
    img[tail..].copy_from_slice(&pattern(3, 100));
    let p = e.p("src.raw");
    std::fs::write(&p, &img).unwrap();
    (p, img)
}

#[test]
fn qemu_img_and_nbdcopy_round_trip() {
    if skip() {
        return;
    }
    let e = Env::new();
    e.pool("512M");
    e.ok(&["create", "tank/v", "--size", "64M"]);
    let _s = e.serve(&["tank/v"], &[]);
    let u = e.uri("tank/v");
    let info = tool("qemu-img", &["info", "--output=json", &u]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB);

    // nbdcopy in (sparse: zeros of the source become zero requests), out, compare.
    let (src, img) = source(&e);
    tool("nbdcopy", &[&src, &u]);
    let out = e.p("out.raw");
    tool("nbdcopy", &[&u, &out]);
    assert!(std::fs::read(&out).unwrap() == img, "nbdcopy out differs");
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &src, &u]);

    // qemu-img convert out (uses block status) and in to a second volume.
    let conv = e.p("conv.qcow2");
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &u, &conv],
    );
    tool("qemu-img", &["compare", "-F", "raw", &conv, &src]);
    drop(_s);
    e.ok(&["create", "tank/w", "--size", "64M"]);
    let _s = e.serve(&["tank/v", "tank/w"], &[]);
    let w = e.uri("tank/w");
    tool(
        "qemu-img",
        &["convert", "-n", "-f", "qcow2", "-O", "raw", &conv, &w],
    );
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &src, &w]);
    // Only the data was written: tank/w maps what tank/v maps, not 64 MiB.
    let map = tool("nbdinfo", &["--map", "--json", &w]);
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["type"] == 0)
        .map(|x| x["length"].as_u64().unwrap())
        .sum();
    assert!(data <= 8 * MIB, "convert allocated {data} bytes");
}

#[test]
fn nbdinfo_map_is_our_allocation_and_snapshots_are_read_only() {
    if skip() {
        return;
    }
    let e = Env::new();
    e.pool("256M");
    e.ok(&["create", "tank/v", "--size", "32M"]);
    let s = e.serve(&["tank/v"], &[]);
    let u = e.uri("tank/v");
    // Blocks are 64 KiB: 5 bytes at 1 MiB map one block; 3 blocks at 8 MiB.
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 1M 5",
            "-c",
            "write -P 0x22 8M 192k",
            "-c",
            "flush",
            &u,
        ],
    );
    let map = tool("nbdinfo", &["--map", "--json", &u]);
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let got: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["offset"].as_u64().unwrap(),
                x["length"].as_u64().unwrap(),
                x["type"].as_u64().unwrap(),
            )
        })
        .collect();
    let k = 64 << 10;
    assert_eq!(
        got,
        vec![
            (0, MIB, 3),
            (MIB, k, 0),
            (MIB + k, 7 * MIB - k, 3),
            (8 * MIB, 3 * k, 0),
            (8 * MIB + 3 * k, 24 * MIB - 3 * k, 3)
        ]
    );
    // Snapshot while serving (the server pauses), then serve both.
    e.ok(&["snapshot", "tank/v@s"]);
    assert!(s.log().contains("paused"), "{}", s.log());
    tool("qemu-io", &["-f", "raw", "-c", "write -P 0x33 8M 64k", &u]);
    drop(s);
    let _s = e.serve(&["tank/v", "tank/v@s"], &[]);
    let list = tool("nbdinfo", &["--list", "--json", &e.uri("")]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tank/v", "tank/v@s"]);
    let su = e.uri("tank/v@s");
    let info = tool("nbdinfo", &["--json", &su]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    // The snapshot kept the old data; the volume has the new; writes to it fail.
    tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x22 8M 64k", &su],
    );
    tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x33 8M 64k", &u],
    );
    let w = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x44 0 4k", &su])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !w.status.success()
            || text.contains("ermission")
            || text.contains("read-only")
            || text.contains("failed"),
        "{text}"
    );
    tool("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0 0 4k", &su]);
}

#[test]
fn qemu_io_patterns_survive_restart() {
    if skip() {
        return;
    }
    let e = Env::new();
    e.pool("256M");
    e.ok(&["create", "tank/v", "--size", "16M"]);
    let mut s = e.serve(&["tank/v"], &[]);
    let u = e.uri("tank/v");
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa1 0 1M",
            "-c",
            "write -P 0xa2 100k 3000", // unaligned, inside a block
            "-c",
            "write -f -P 0xa3 2M 64k", // FUA
            "-c",
            "discard 512k 256k", // whole blocks freed
            "-c",
            "write -z 3M 1M", // zeroes (may punch)
            "-c",
            "write -P 0xa4 5M 1M",
            "-c",
            "write -z -u 5M 128k", // zeroes, may unmap
            "-c",
            "aio_write -P 0xa5 8M 64k",
            "-c",
            "aio_write -P 0xa6 9M 64k",
            "-c",
            "aio_flush",
            "-c",
            "flush",
            &u,
        ],
    );
    let checks = [
        "read -P 0xa1 0 100k",
        "read -P 0xa2 100k 3000",
        "read -P 0xa1 105400 408888",
        "read -P 0 512k 256k",
        "read -P 0xa1 768k 256k",
        "read -P 0xa3 2M 64k",
        "read -P 0 3M 1M",
        "read -P 0 5M 128k",
        "read -P 0xa4 5248k 896k",
        "read -P 0xa5 8M 64k",
        "read -P 0xa6 9M 64k",
        "read -P 0 10M 6M",
    ];
    let mut args = vec!["-r", "-f", "raw"];
    for c in &checks {
        args.extend(["-c", c]);
    }
    args.push(&u);
    let out = tool("qemu-io", &args);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
    assert!(s.stop(), "server did not stop cleanly");
    // After SIGTERM (commit) the data is in the pool: check it and serve it again.
    e.ok(&["check", "tank"]);
    let _s = e.serve(&["tank/v"], &[]);
    let out = tool("qemu-io", &args);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
    // Reads past the end fail, the server keeps serving.
    let bad = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 16M 4k", &u])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&bad.stdout);
    assert!(!t.contains("read 4096/4096"), "{t}");
    tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0xa1 0 4k", &u],
    );
}

#[test]
fn commands_while_serving_pause_the_server() {
    if skip() {
        return;
    }
    let e = Env::new();
    e.pool("256M");
    e.ok(&["create", "tank/v", "--size", "16M"]);
    let s = e.serve(&["tank/v"], &["--pause-limit", "1"]);
    let u = e.uri("tank/v");
    tool("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 64k", &u]);
    // Other commands work on the served pool; destroying an export is refused.
    e.ok(&["create", "tank/w", "--size", "16M"]);
    e.ok(&["list"]);
    let d = e.run(&["destroy", "tank/v"]);
    assert_eq!(
        d.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&d.stderr)
    );
    assert!(String::from_utf8_lossy(&d.stderr).contains("exported"));
    e.ok(&["snapshot", "tank/v@a"]);
    let d = e.run(&["rollback", "tank/v@a"]);
    assert_eq!(d.status.code(), Some(6));
    tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", &u],
    );

    // A pausing client that dies: the server resumes when its connection closes.
    let ctl = e.path("tank").join("control.sock");
    let mut c = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
    std::io::Write::write_all(&mut c, b"pause\n").unwrap();
    let line = thinvol_catalog::control::read_line(&mut c)
        .unwrap()
        .unwrap();
    assert_eq!(thinvol_catalog::control::parse_paused(&line), Some(vec![1]));
    drop(c);
    tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", &u],
    );

    // A pause held past --pause-limit (1 s): the server takes the pool back.
    let mut c = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
    std::io::Write::write_all(&mut c, b"pause\n").unwrap();
    thinvol_catalog::control::read_line(&mut c)
        .unwrap()
        .unwrap();
    let t = std::time::Instant::now();
    tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", &u],
    );
    assert!(t.elapsed() >= std::time::Duration::from_millis(800));
    assert!(s.log().contains("longer than"), "{}", s.log());
    drop(c);
}

#[test]
fn full_pool_gives_enospc_and_keeps_serving() {
    if skip() {
        return;
    }
    let e = Env::new();
    e.pool("16M");
    e.ok(&["create", "tank/v", "--size", "64M"]);
    let _s = e.serve(&["tank/v"], &[]);
    let u = e.uri("tank/v");
    let w = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 32M", &u])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(t.contains("No space left on device"), "{t}");
    // Already mapped blocks stay writable and readable.
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 7 0 1M",
            "-c",
            "write -P 8 0 64k",
            "-c",
            "read -P 8 0 64k",
            &u,
        ],
    );
}
