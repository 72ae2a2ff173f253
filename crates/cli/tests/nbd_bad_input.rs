//! Bad input over a raw socket: garbage magic, absurd option lengths, requests before
//! the handshake ends, oversized and out-of-range requests, unknown commands and flags,
//! a stalled handshake, too many connections. Each bad client gets an error reply or
//! is disconnected alone; a client connected all along keeps being served.

#![allow(clippy::big_endian_bytes)] // NBD is big-endian on the wire.

mod nbd_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nbd_common::*;
use thinvol_nbd::proto::*;

/// The server closed the connection (EOF or reset) within a few seconds.
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn still_serving(c: &mut Client, round: u8) {
    let d = vec![round; 4096];
    assert_eq!(c.write(round as u64 * 4096, &d, 0).unwrap(), 0);
    let mut b = vec![0u8; 4096];
    assert_eq!(c.read(round as u64 * 4096, &mut b).unwrap(), 0);
    assert_eq!(b, d);
}

#[test]
fn garbage_is_contained_and_others_keep_working() {
    let e = Env::new();
    e.pool("256M");
    e.ok(&["create", "tank/v", "--size", "16M"]);
    let _s = e.serve(
        &["tank/v"],
        &["--handshake-timeout", "2", "--max-connections", "4"],
    );
    let sock = e.sock();
    let path = Path::new(&sock);
    let mut good = Client::connect(path, "tank/v").unwrap();
    still_serving(&mut good, 1);

    // Bad client flags.
    let mut s = UnixStream::connect(path).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert!(closed(&mut s), "bad client flags");
    still_serving(&mut good, 2);

    // Garbage instead of an option; a request before the handshake ended.
    let mut s = greet(path).unwrap();
    s.write_all(&[0xde; 64]).unwrap();
    assert!(closed(&mut s), "garbage option magic");
    let mut s = greet(path).unwrap();
    let r = Request {
        flags: 0,
        typ: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
        payload: 0,
    };
    s.write_all(&encode_request(&r, false)).unwrap();
    assert!(closed(&mut s), "request during the handshake");

    // Absurd option length: disconnect (not a 4 GiB allocation).
    let mut s = greet(path).unwrap();
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&h).unwrap();
    assert!(closed(&mut s), "absurd option length");

    // Unknown option, malformed GO, unknown export: error replies, then GO works.
    let mut s = greet(path).unwrap();
    option(&mut s, 77, b"xyz").unwrap();
    assert_eq!(read_opt_reply(&mut s).unwrap().1, REP_ERR_UNSUP);
    option(&mut s, OPT_GO, &[0, 0, 0xff, 0xff, 1]).unwrap();
    assert_eq!(read_opt_reply(&mut s).unwrap().1, REP_ERR_INVALID);
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    option(&mut s, OPT_GO, &d).unwrap();
    assert_eq!(read_opt_reply(&mut s).unwrap().1, REP_ERR_UNKNOWN);
    option(&mut s, OPT_LIST_META_CONTEXT, &[]).unwrap();
    assert_eq!(
        read_opt_reply(&mut s).unwrap().1,
        REP_ERR_INVALID,
        "meta context without SR"
    );
    option(&mut s, OPT_ABORT, &[]).unwrap();
    assert_eq!(read_opt_reply(&mut s).unwrap().1, REP_ACK);
    still_serving(&mut good, 3);

    // After GO: bad requests get error replies, the connection stays usable.
    let mut c = Client::connect(path, "tank/v").unwrap();
    let mut b = vec![0u8; 4096];
    assert_eq!(
        c.read(16 << 20, &mut b).unwrap(),
        EINVAL,
        "read past the end"
    );
    assert_eq!(
        c.read(u64::MAX - 100, &mut b).unwrap(),
        EINVAL,
        "offset overflow"
    );
    assert_eq!(
        c.write((16 << 20) - 100, &[1u8; 4096], 0).unwrap(),
        ENOSPC,
        "write past the end"
    );
    c.send(99, 0, 0, 512, &[]).unwrap();
    assert_eq!(c.reply(None).unwrap().1, EINVAL, "unknown command");
    c.send(CMD_READ, 1 << 12, 0, 512, &[]).unwrap();
    assert_eq!(c.reply(None).unwrap().1, EINVAL, "unknown flag");
    c.send(CMD_BLOCK_STATUS, 0, 0, 512, &[]).unwrap();
    assert_eq!(
        c.reply(None).unwrap().1,
        EINVAL,
        "block status without a context"
    );
    c.send(CMD_READ, 0, 0, 64 << 20, &[]).unwrap();
    assert_eq!(
        c.reply(None).unwrap().1,
        EINVAL,
        "read above the maximum payload"
    );
    assert_eq!(c.read(4096, &mut b).unwrap(), 0);
    // Oversized WRITE payload: disconnect.
    c.send(CMD_WRITE, 0, 0, 64 << 20, &[]).unwrap();
    assert!(closed(&mut c.s), "oversized write");
    // Garbage request magic: disconnect.
    let mut c = Client::connect(path, "tank/v").unwrap();
    c.s.write_all(&[0x55; 28]).unwrap();
    assert!(closed(&mut c.s), "bad request magic");
    still_serving(&mut good, 4);

    // Stalled handshake: closed after --handshake-timeout.
    let mut s = UnixStream::connect(path).unwrap();
    let t = Instant::now();
    assert!(closed(&mut s), "stalled handshake");
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );

    // Connection cap (4): good + 3 idle ones; the next is refused (closed at once).
    let _idle: Vec<UnixStream> = (0..3).map(|_| greet(path).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut s = UnixStream::connect(path).unwrap();
    assert!(closed(&mut s), "connection over the cap");
    still_serving(&mut good, 5);
    drop(_idle);
    good.disconnect();
}
