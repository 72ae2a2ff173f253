//! Zero-copy READ replies (`crates/nbd/src/splice.rs`, docs/design.md §12 "Zero-copy
//! reads"): byte-exact through real clients — nbdcopy (structured replies, with and
//! without extents, large requests), qemu-img and qemu-io (extended headers; unaligned
//! ranges over data and holes), and simple replies of a minimal client (unaligned,
//! multi-piece up to the 32 MiB maximum) — and reads racing discards, rewrites and
//! block reuse by another volume on other connections see only their own volume's
//! old or new block contents. Each test checks the server's log that replies really
//! went out by splice.

mod nbd_common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nbd_common::*;
use thinvol_nbd::proto::{CMD_FLUSH, CMD_TRIM};

fn skip() -> bool {
    for t in ["qemu-img", "qemu-io", "nbdcopy"] {
        if !have(t) {
            eprintln!("skipping: {t} not installed (scripts/test.sh installs it)");
            return true;
        }
    }
    false
}

/// Sum of "N reads sent zero-copy" over the server's log.
fn spliced(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split(": ").nth(2))
        .filter_map(|l| l.strip_suffix(" copied"))
        .filter_map(|l| l.split(" reads sent zero-copy").next())
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

/// 64 MiB: data from 0 to 3 MiB + 5000 (ends mid-block), a hole, 2 MiB of data at
/// 40 MiB + 4096 (starts and ends mid-block), 100 bytes at the very end.
fn source(e: &Env) -> (String, Vec<u8>) {
    let mut img = vec![0u8; 64 * MIB as usize];
    img[..3 * MIB as usize + 5000].copy_from_slice(&pattern(11, 3 * MIB as usize + 5000));
    let at = 40 * MIB as usize + 4096;
    img[at..at + 2 * MIB as usize].copy_from_slice(&pattern(12, 2 * MIB as usize));
    let tail = img.len() - 100;
    img[tail..].copy_from_slice(&pattern(13, 100));
    let p = e.p("src.raw");
    std::fs::write(&p, &img).unwrap();
    (p, img)
}

/// `qemu-io -c 'read -v OFF LEN'`: the bytes of its hex dump.
fn qemu_io_read(uri: &str, off: u64, len: u64) -> Vec<u8> {
    let out = tool(
        "qemu-io",
        &["-f", "raw", "-c", &format!("read -v {off} {len}"), uri],
    );
    let mut b = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((addr, rest)) = line.split_once(":  ") else {
            continue;
        };
        if u64::from_str_radix(addr, 16).is_err() {
            continue;
        }
        for h in rest.split_whitespace().take(16) {
            match u8::from_str_radix(h, 16) {
                Ok(x) if h.len() == 2 => b.push(x),
                _ => break,
            }
        }
    }
    b
}

#[test]
fn zero_copy_reads_are_byte_exact_through_real_clients() {
    if skip() {
        return;
    }
    let e = Env::new();
    e.pool("512M");
    e.ok(&["create", "tank/v", "--size", "64M"]);
    let mut s = e.serve(&["tank/v"], &[]);
    let u = e.uri("tank/v");
    let (src, img) = source(&e);
    tool("nbdcopy", &[&src, &u]);

    // nbdcopy out: with extents (reads the data only), without (holes come back as
    // OFFSET_HOLE chunks), and with 32 MiB requests (replies of several pipe loads).
    for extra in [
        &[][..],
        &["--no-extents"][..],
        &["--no-extents", "--request-size=33554432"][..],
    ] {
        let out = e.p("out.raw");
        let _ = std::fs::remove_file(&out);
        let mut args: Vec<&str> = extra.to_vec();
        args.extend([u.as_str(), out.as_str()]);
        tool("nbdcopy", &args);
        assert!(
            std::fs::read(&out).unwrap() == img,
            "nbdcopy {extra:?} out differs"
        );
    }
    // qemu (extended headers): whole image, then unaligned ranges across data/hole
    // edges and blocks.
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &src, &u]);
    for (off, len) in [
        (3 * MIB + 5000 - 70_000, 200_000),
        (40 * MIB + 4096 - 50_000, 150_000),
        (1000, 3 * 65536 + 77),
        (64 * MIB - 65536 - 3, 65536 + 3),
    ] {
        let got = qemu_io_read(&u, off, len);
        assert!(
            got == img[off as usize..(off + len) as usize],
            "qemu-io read {off} {len}: {} bytes, differ",
            got.len()
        );
    }
    // Simple replies (one header, then the payload in pipe loads), unaligned.
    let mut c = Client::connect(Path::new(&e.sock()), "tank/v").unwrap();
    for (off, len) in [
        (1000u64, 5 * MIB + 333),
        (65536 - 1, 65536 + 2),
        (20 * MIB + 1, 32 * MIB),
        (39 * MIB, 4 * MIB),
    ] {
        let mut b = vec![0xEEu8; len as usize];
        assert_eq!(c.read(off, &mut b).unwrap(), 0);
        assert!(
            b == img[off as usize..(off + len) as usize],
            "simple read {off} {len} differs"
        );
    }
    c.disconnect();
    assert!(s.stop());
    assert!(spliced(&s.log()) > 0, "no reply went out by splice");
}

const BS: u64 = 65536;
const BLOCKS: u64 = 64;
const A: u64 = 0xA;
const B: u64 = 0xB;

/// A whole block of volume `tag`, generation `gen`, block `i`: one 8-byte word
/// repeated.
fn block(tag: u64, gen: u64, i: u64) -> Vec<u8> {
    let w = (tag << 56 | gen << 32 | i).to_le_bytes();
    w.iter().copied().cycle().take(BS as usize).collect()
}

fn cmd(c: &mut Client, typ: u16, off: u64, len: u64) {
    c.send(typ, 0, off, len as u32, &[]).unwrap();
    assert_eq!(c.reply(None).unwrap().1, 0);
}

#[test]
fn reads_racing_discards_and_reuse_see_only_their_volume() {
    let e = Env::new();
    // Room for both volumes and little more: freed blocks are reused soon.
    e.pool("10M");
    e.ok(&["create", "tank/a", "--size", "4M"]);
    e.ok(&["create", "tank/b", "--size", "4M"]);
    let mut s = e.serve(&["tank/a", "tank/b"], &[]);
    let sock = e.sock();
    let mut a = Client::connect(Path::new(&sock), "tank/a").unwrap();
    for i in 0..BLOCKS {
        assert_eq!(a.write(i * BS, &block(A, 0, i), 0).unwrap(), 0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Readers of tank/a: 1 MiB reads (16 blocks, zero-copy), every block must be one
    // generation of tank/a's own block, or zeros (discarded).
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let sock = sock.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(Path::new(&sock), "tank/a").unwrap();
                let mut buf = vec![0u8; MIB as usize];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 50 {
                    let off = ((n * 5 + r) % (BLOCKS - 16)) * BS;
                    assert_eq!(c.read(off, &mut buf).unwrap(), 0);
                    for (k, blk) in buf.chunks(BS as usize).enumerate() {
                        let i = off / BS + k as u64;
                        if blk.iter().all(|&x| x == 0) {
                            continue;
                        }
                        let w = u64::from_le_bytes(blk[..8].try_into().unwrap());
                        assert!(
                            w >> 56 == A && w & 0xffff_ffff == i,
                            "read of tank/a block {i} shows word {w:#x} (not tank/a's)"
                        );
                        if let Some(j) = blk.chunks(8).position(|x| x != &blk[..8]) {
                            let o = u64::from_le_bytes(blk[j * 8..j * 8 + 8].try_into().unwrap());
                            let runs = blk.chunks(8).zip(blk.chunks(8).skip(1)).filter(|(x, y)| x != y).count();
                            panic!(
                                "read of tank/a block {i} (offset {off}) mixes {w:#x} and, from byte {}, {o:#x} ({runs} changes)",
                                j * 8
                            );
                        }
                    }
                    n += 1;
                }
                c.disconnect();
                n
            })
        })
        .collect();
    // tank/b: whole-block writes, discards and flushes (commits: freed blocks of
    // tank/a become reusable), on its own connection.
    let bw = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(Path::new(&sock), "tank/b").unwrap();
            for round in 0..40u64 {
                for i in 0..BLOCKS {
                    assert_eq!(c.write(i * BS, &block(B, round, i), 0).unwrap(), 0);
                }
                cmd(&mut c, CMD_FLUSH, 0, 0);
                cmd(&mut c, CMD_TRIM, 0, BLOCKS * BS);
                cmd(&mut c, CMD_FLUSH, 0, 0);
            }
            c.disconnect();
        })
    };
    // tank/a: discard a block, then write its next generation (a new data block: no
    // in-place overwrite, so a mixed block would be a reuse bug), flush now and then.
    for gen in 1..=30u64 {
        for i in (0..BLOCKS).step_by(3).chain((1..BLOCKS).step_by(3)) {
            cmd(&mut a, CMD_TRIM, i * BS, BS);
            assert_eq!(a.write(i * BS, &block(A, gen, i), 0).unwrap(), 0);
        }
        cmd(&mut a, CMD_FLUSH, 0, 0);
    }
    bw.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(reads >= 100);
    a.disconnect();
    assert!(s.stop());
    assert!(spliced(&s.log()) > 0, "no reply went out by splice");
}
