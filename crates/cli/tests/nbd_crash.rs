//! Crash: kill -9 the server in the middle of a write loop that flushes every few
//! (pipelined) writes. Every write acknowledged before a successful FLUSH must be there
//! after a restart, and `thin_check` must accept the metadata as the crash left it.

mod nbd_common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nbd_common::*;
use thinvol_nbd::proto::{CMD_FLAG_FUA, CMD_WRITE};

const CHUNK: usize = 16 << 10;
const BATCH: usize = 4;

fn thin_check(dir: &std::path::Path) {
    let Ok(out) = std::process::Command::new("thin_check")
        .arg(dir.join("metadata"))
        .output()
    else {
        eprintln!("thin_check not installed; skipping that check");
        return;
    };
    assert!(
        out.status.success(),
        "thin_check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Slot `i` of the volume: distinct for i < 6000 (7919 is coprime to 2000), spread
/// over many blocks.
fn offset(i: u64) -> u64 {
    // 3 slots per 64 KiB block, blocks in a scattered order.
    let block = (i / 3).wrapping_mul(7919) % 2000;
    block * (64 << 10) + (i % 3) * CHUNK as u64
}

#[test]
fn kill9_mid_write_loop_keeps_flushed_writes() {
    let e = Env::new();
    e.pool("512M");
    e.ok(&["create", "tank/v", "--size", "200M"]);
    let mut next = 0u64;
    let mut durable: Vec<u64> = Vec::new();
    for (round, delay_ms) in [150u64, 400, 900].into_iter().enumerate() {
        let mut s = e.serve(&["tank/v"], &[]);
        let mut c = Client::connect(std::path::Path::new(&e.sock()), "tank/v").unwrap();
        let pid = s.pid();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            // SAFETY: SIGKILL to our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let t = Instant::now();
        'outer: while t.elapsed() < Duration::from_secs(20) && next + (BATCH as u64) < 6000 {
            let ids: Vec<u64> = (next..next + BATCH as u64).collect();
            next += BATCH as u64;
            for &i in &ids {
                let fua = if i % 11 == 0 { CMD_FLAG_FUA } else { 0 };
                if c.send(CMD_WRITE, fua, offset(i), CHUNK as u32, &pattern(i, CHUNK))
                    .is_err()
                {
                    break 'outer;
                }
            }
            let mut acked = HashSet::new();
            for _ in &ids {
                match c.reply(None) {
                    Ok((cookie, 0)) => {
                        acked.insert(cookie);
                    }
                    _ => break 'outer,
                }
            }
            // FUA writes are durable on their own reply.
            match c.flush() {
                Ok(0) => durable.extend(&ids),
                _ => {
                    durable.extend(ids.iter().filter(|&&i| i % 11 == 0));
                    break 'outer;
                }
            }
            let _ = acked;
        }
        killer.join().unwrap();
        s.kill9();
        eprintln!("round {round}: {} writes durable so far", durable.len());
        // The metadata as the crash left it.
        thin_check(&e.path("tank"));
    }
    assert!(
        durable.len() > 20,
        "too few writes before the kill: {}",
        durable.len()
    );
    // Restart (stale sockets replaced) and read every durable write back.
    let mut s = e.serve(&["tank/v"], &[]);
    let mut c = Client::connect(std::path::Path::new(&e.sock()), "tank/v").unwrap();
    let mut buf = vec![0u8; CHUNK];
    for &i in &durable {
        assert_eq!(c.read(offset(i), &mut buf).unwrap(), 0);
        assert!(
            buf == pattern(i, CHUNK),
            "write {i} (acknowledged before a flush) lost"
        );
    }
    c.disconnect();
    assert!(s.stop());
    e.ok(&["check", "tank"]);
    thin_check(&e.path("tank"));
}

/// Multi-conn: a FLUSH on one connection makes writes acknowledged on another durable
/// (one pool behind every connection); kill -9 right after it.
#[test]
fn flush_on_one_connection_covers_writes_on_another() {
    let e = Env::new();
    e.pool("256M");
    e.ok(&["create", "tank/v", "--size", "64M"]);
    let mut s = e.serve(&["tank/v"], &[]);
    let sock = e.sock();
    let path = std::path::Path::new(&sock);
    let mut a = Client::connect(path, "tank/v").unwrap();
    let mut b = Client::connect(path, "tank/v").unwrap();
    assert_ne!(a.tflags & thinvol_nbd::proto::TF_CAN_MULTI_CONN, 0);
    for i in 0..32u64 {
        assert_eq!(a.write(i * (64 << 10), &pattern(i, CHUNK), 0).unwrap(), 0);
    }
    assert_eq!(b.flush().unwrap(), 0);
    s.kill9();
    let _s = e.serve(&["tank/v"], &[]);
    let mut c = Client::connect(path, "tank/v").unwrap();
    let mut buf = vec![0u8; CHUNK];
    for i in 0..32u64 {
        assert_eq!(c.read(i * (64 << 10), &mut buf).unwrap(), 0);
        assert!(
            buf == pattern(i, CHUNK),
            "write {i} on connection A lost after B's flush"
        );
    }
}

/// SIGTERM with requests in flight: every write the server replied to (it finishes
/// the requests it has read) is in the pool after the clean exit (commit on close).
#[test]
fn sigterm_finishes_in_flight_writes_and_commits() {
    let e = Env::new();
    e.pool("256M");
    e.ok(&["create", "tank/v", "--size", "64M"]);
    let mut s = e.serve(&["tank/v"], &[]);
    let sock = e.sock();
    let path = std::path::Path::new(&sock);
    let mut c = Client::connect(path, "tank/v").unwrap();
    // Cookies start at 1: write i has cookie i + 1.
    let n = 400u64;
    let sender = {
        let mut w = c.s.try_clone().unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            for i in 0..n {
                let r = thinvol_nbd::proto::Request {
                    flags: 0,
                    typ: CMD_WRITE,
                    cookie: i + 1,
                    offset: offset(i),
                    length: CHUNK as u64,
                    payload: 0,
                };
                let mut b = thinvol_nbd::proto::encode_request(&r, false);
                b.extend_from_slice(&pattern(i, CHUNK));
                if w.write_all(&b).is_err() {
                    break;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(30));
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(s.pid(), libc::SIGTERM) };
    let mut acked = Vec::new();
    while let Ok((cookie, err)) = c.reply(None) {
        if err == 0 {
            acked.push(cookie - 1);
        }
    }
    let _ = sender.join();
    assert!(s.stop(), "server did not exit cleanly after SIGTERM");
    std::thread::sleep(Duration::from_millis(200)); // the log reader drains the pipe
    assert!(s.log().contains("stopped"), "{}", s.log());
    assert!(!acked.is_empty(), "no write was acknowledged");
    let _s = e.serve(&["tank/v"], &[]);
    let mut c = Client::connect(path, "tank/v").unwrap();
    let mut buf = vec![0u8; CHUNK];
    for &i in &acked {
        assert_eq!(c.read(offset(i), &mut buf).unwrap(), 0);
        assert!(
            buf == pattern(i, CHUNK),
            "acknowledged write {i} lost across SIGTERM"
        );
    }
    eprintln!(
        "{} of {n} writes acknowledged before the shutdown",
        acked.len()
    );
}
