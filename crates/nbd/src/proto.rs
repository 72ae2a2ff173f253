//! The NBD wire codec: constants, handshake option parsing, request header parsing
//! (compact and extended), reply encoding. Pure: no I/O, bounds-checked, never panics
//! on any input (the `nbd_proto` fuzz target drives [`fuzz_one`]).
//!
//! Layouts and numbers from the NBD protocol (`doc/proto.md` of NetworkBlockDevice/nbd,
//! extended headers from its `extension-ext-header` branch), summarised in
//! shared/docs/nbd-protocol.md. Everything on the wire is big-endian.

use thiserror::Error;

// ---- handshake (nbd-protocol.md §1) ----

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR + 10;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (the `u16` of `INFO_EXPORT`), §2.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Longest option payload we read; longer is a hard disconnect. Strings are at most
/// 4096 bytes, so INFO/GO and META_CONTEXT with a few queries fit easily.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, context query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest READ/WRITE payload; advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The only context we offer, and the id we give it.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

// ---- transmission (§2, §5) ----

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;
pub const REQUEST_LEN: usize = 28;
pub const EXT_REQUEST_LEN: usize = 32;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
pub const CMD_FLAGS_KNOWN: u16 = (1 << 6) - 1;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Room before a payload for the longest reply header (extended chunk + u64 offset),
/// so a READ reply is one contiguous buffer: header written in front of the data.
pub const REPLY_HEADROOM: usize = 40;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("client flags {0:#x} include unknown bits or lack FIXED_NEWSTYLE")]
    BadClientFlags(u32),
    #[error("option length {0} exceeds the limit")]
    OptionTooLong(u32),
    #[error("malformed option data: {0}")]
    BadOption(&'static str),
    #[error("truncated input")]
    Truncated,
}

type Result<T> = std::result::Result<T, ProtoError>;

// ---- readers over a byte slice ----

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(ProtoError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    /// A `u32 len` + UTF-8 string of at most [`MAX_STRING`] bytes.
    fn string(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(ProtoError::BadOption("string longer than 4096 bytes"));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| ProtoError::BadOption("string is not UTF-8"))
    }
}

// ---- handshake parsing ----

/// The client's flags word: must have FIXED_NEWSTYLE and no unknown bits.
/// Returns whether NO_ZEROES was agreed.
pub fn parse_client_flags(f: u32) -> Result<bool> {
    if f & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 || f & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::BadClientFlags(f));
    }
    Ok(f & CLIENT_NO_ZEROES != 0)
}

/// An option header: `u64 IHAVEOPT, u32 option, u32 length`. Returns (option, length).
pub fn parse_option_header(h: &[u8]) -> Result<(u32, u32)> {
    let mut c = Cursor { b: h };
    let magic = c.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let opt = c.u32()?;
    let len = c.u32()?;
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok((opt, len))
}

/// `INFO`/`GO` data: `u32 namelen, name, u16 n, n x u16`.
pub fn parse_info(data: &[u8]) -> Result<(String, Vec<u16>)> {
    let mut c = Cursor { b: data };
    let name = c.string()?;
    let n = c.u16()? as usize;
    let mut reqs = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        reqs.push(c.u16()?);
    }
    if !c.b.is_empty() {
        return Err(ProtoError::BadOption("trailing bytes in INFO/GO"));
    }
    Ok((name, reqs))
}

/// `LIST/SET_META_CONTEXT` data: `u32 namelen, name, u32 n, n x (u32 len, query)`.
pub fn parse_meta_context(data: &[u8]) -> Result<(String, Vec<String>)> {
    let mut c = Cursor { b: data };
    let name = c.string()?;
    let n = c.u32()? as usize;
    let mut qs = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        qs.push(c.string()?);
    }
    if !c.b.is_empty() {
        return Err(ProtoError::BadOption("trailing bytes in META_CONTEXT"));
    }
    Ok((name, qs))
}

/// Which contexts of ours a LIST query matches (zero queries = all; `base:` = all of
/// the base namespace). SET uses the same rule with `list = false`: only exact names.
pub fn matches_base_allocation(queries: &[String], list: bool) -> bool {
    if queries.is_empty() {
        return list;
    }
    queries
        .iter()
        .any(|q| q == BASE_ALLOCATION || (list && q == "base:"))
}

// ---- handshake encoding ----

pub fn server_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Append an option reply: `u64 magic, u32 option, u32 type, u32 len, data`.
pub fn opt_reply(out: &mut Vec<u8>, opt: u32, typ: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

pub fn info_export(size: u64, tflags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&tflags.to_be_bytes());
    d
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut d = INFO_NAME.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// A `SERVER` reply for LIST: `u32 namelen, name`.
pub fn server_entry(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// A `META_CONTEXT` reply: `u32 id, name`.
pub fn meta_context_entry(id: u32, name: &str) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

// ---- requests ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
    /// Bytes of payload that follow the header (WRITE, or extended PAYLOAD_LEN).
    pub payload: u64,
}

/// Parse a request header: 28 bytes compact or 32 bytes extended. Only the magic is
/// checked here; the server validates type, flags and range (and disconnects when
/// `payload` exceeds [`MAX_PAYLOAD`]).
pub fn parse_request(h: &[u8], extended: bool) -> Result<Request> {
    let mut c = Cursor { b: h };
    let magic = c.u32()?;
    let want = if extended {
        EXT_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    let flags = c.u16()?;
    let typ = c.u16()?;
    let cookie = c.u64()?;
    let offset = c.u64()?;
    let length = if extended { c.u64()? } else { c.u32()? as u64 };
    let payload = if extended {
        if flags & CMD_FLAG_PAYLOAD_LEN != 0 || typ == CMD_WRITE {
            length
        } else {
            0
        }
    } else if typ == CMD_WRITE {
        length
    } else {
        0
    };
    Ok(Request {
        flags,
        typ,
        cookie,
        offset,
        length,
        payload,
    })
}

/// Encode a request header (used by tests and the fuzz target's round trip).
pub fn encode_request(r: &Request, extended: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(EXT_REQUEST_LEN);
    b.extend_from_slice(
        &(if extended {
            EXT_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        })
        .to_be_bytes(),
    );
    b.extend_from_slice(&r.flags.to_be_bytes());
    b.extend_from_slice(&r.typ.to_be_bytes());
    b.extend_from_slice(&r.cookie.to_be_bytes());
    b.extend_from_slice(&r.offset.to_be_bytes());
    if extended {
        b.extend_from_slice(&r.length.to_be_bytes());
    } else {
        b.extend_from_slice(&(r.length as u32).to_be_bytes());
    }
    b
}

// ---- replies ----

/// Which reply format the connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyMode {
    Simple,
    Structured,
    Extended,
}

/// Write a reply header ending exactly at `buf[REPLY_HEADROOM]`, for a payload of
/// `len` bytes placed at `buf[REPLY_HEADROOM..]`. For structured/extended chunks of
/// type OFFSET_DATA the 8-byte offset is part of the header. Returns where the reply
/// starts in `buf`.
pub fn put_data_header(
    buf: &mut [u8; REPLY_HEADROOM],
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    len: u64,
) -> usize {
    match mode {
        ReplyMode::Simple => {
            let s = REPLY_HEADROOM - 16;
            put_simple(&mut buf[s..], 0, cookie);
            s
        }
        ReplyMode::Structured => {
            let s = REPLY_HEADROOM - 28;
            let b = &mut buf[s..];
            b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            b[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            b[6..8].copy_from_slice(&CHUNK_OFFSET_DATA.to_be_bytes());
            b[8..16].copy_from_slice(&cookie.to_be_bytes());
            b[16..20].copy_from_slice(&((len + 8) as u32).to_be_bytes());
            b[20..28].copy_from_slice(&offset.to_be_bytes());
            s
        }
        ReplyMode::Extended => {
            let b = &mut buf[..];
            b[..4].copy_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
            b[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            b[6..8].copy_from_slice(&CHUNK_OFFSET_DATA.to_be_bytes());
            b[8..16].copy_from_slice(&cookie.to_be_bytes());
            b[16..24].copy_from_slice(&offset.to_be_bytes());
            b[24..32].copy_from_slice(&(len + 8).to_be_bytes());
            b[32..40].copy_from_slice(&offset.to_be_bytes());
            0
        }
    }
}

fn put_simple(b: &mut [u8], error: u32, cookie: u64) {
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Append a chunk header (structured or extended) for `len` bytes of payload.
pub fn chunk_header(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    if extended {
        out.extend_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// A complete reply without payload: success or an error. `chunked` (READ and
/// BLOCK_STATUS) forces a structured chunk for errors once structured replies are on;
/// other commands may get simple replies then (as qemu does).
pub fn status_reply(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    chunked: bool,
    cookie: u64,
    offset: u64,
    error: u32,
) {
    match mode {
        ReplyMode::Simple => {
            let mut b = [0u8; 16];
            put_simple(&mut b, error, cookie);
            out.extend_from_slice(&b);
        }
        ReplyMode::Structured if error == 0 || !chunked => {
            let mut b = [0u8; 16];
            put_simple(&mut b, error, cookie);
            out.extend_from_slice(&b);
        }
        _ => {
            let ext = mode == ReplyMode::Extended;
            if error == 0 {
                chunk_header(out, ext, REPLY_FLAG_DONE, CHUNK_NONE, cookie, offset, 0);
            } else {
                chunk_header(out, ext, REPLY_FLAG_DONE, CHUNK_ERROR, cookie, offset, 6);
                out.extend_from_slice(&error.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes());
            }
        }
    }
}

/// An OFFSET_HOLE chunk with DONE: `u64 offset, u32 size` (extended: same payload).
pub fn hole_reply(out: &mut Vec<u8>, extended: bool, cookie: u64, offset: u64, size: u32) {
    chunk_header(
        out,
        extended,
        REPLY_FLAG_DONE,
        CHUNK_OFFSET_HOLE,
        cookie,
        offset,
        12,
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
}

/// A block-status chunk with DONE for one context: `extents` are (length, flags).
pub fn block_status_reply(
    out: &mut Vec<u8>,
    extended: bool,
    cookie: u64,
    offset: u64,
    ctx: u32,
    extents: &[(u64, u32)],
) {
    if extended {
        let len = 8 + 16 * extents.len() as u64;
        chunk_header(
            out,
            true,
            REPLY_FLAG_DONE,
            CHUNK_BLOCK_STATUS_EXT,
            cookie,
            offset,
            len,
        );
        out.extend_from_slice(&ctx.to_be_bytes());
        out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for &(l, f) in extents {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&(f as u64).to_be_bytes());
        }
    } else {
        let len = 4 + 8 * extents.len() as u64;
        chunk_header(
            out,
            false,
            REPLY_FLAG_DONE,
            CHUNK_BLOCK_STATUS,
            cookie,
            offset,
            len,
        );
        out.extend_from_slice(&ctx.to_be_bytes());
        for &(l, f) in extents {
            // Compact extents are u32: callers keep each extent below 4 GiB.
            out.extend_from_slice(&(l.min(u32::MAX as u64) as u32).to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
    }
}

/// The fuzz target's body: every parser over arbitrary bytes, plus a request
/// round trip. Must return (never panic, never allocate unboundedly) on any input.
pub fn fuzz_one(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 6 {
        0 => {
            let _ = parse_option_header(rest);
        }
        1 => {
            let _ = parse_info(rest);
        }
        2 => {
            if let Ok((_, qs)) = parse_meta_context(rest) {
                let _ = matches_base_allocation(&qs, sel & 8 != 0);
            }
        }
        3 | 4 => {
            let ext = sel % 6 == 4;
            if let Ok(r) = parse_request(rest, ext) {
                let enc = encode_request(&r, ext);
                let again = parse_request(&enc, ext).expect("round trip");
                assert_eq!(
                    (
                        again.flags,
                        again.typ,
                        again.cookie,
                        again.offset,
                        again.length
                    ),
                    (r.flags, r.typ, r.cookie, r.offset, r.length)
                );
            }
        }
        _ => {
            if rest.len() >= 4 {
                let _ =
                    parse_client_flags(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
            payload: 512,
        };
        for ext in [false, true] {
            let mut r2 = r;
            if ext {
                r2.flags |= CMD_FLAG_PAYLOAD_LEN;
            }
            let b = encode_request(&r2, ext);
            assert_eq!(b.len(), if ext { EXT_REQUEST_LEN } else { REQUEST_LEN });
            assert_eq!(parse_request(&b, ext).unwrap(), r2);
        }
    }

    #[test]
    fn options_parse_and_reject() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"a/b");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info(&d).unwrap(), ("a/b".into(), vec![3]));
        assert!(parse_info(&d[..d.len() - 1]).is_err());
        assert!(parse_info(&[0xff; 8]).is_err());
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&7u32.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_option_header(&h),
            Err(ProtoError::OptionTooLong(u32::MAX))
        );
        assert!(parse_client_flags(0).is_err());
        assert!(parse_client_flags(4 | 1).is_err());
        assert!(parse_client_flags(3).unwrap());
    }

    #[test]
    fn fuzz_smoke() {
        for i in 0..2000u32 {
            let mut v: Vec<u8> = (0..(i % 70))
                .map(|j| (i.wrapping_mul(31) ^ (j * 7)) as u8)
                .collect();
            v.insert(0, i as u8);
            fuzz_one(&v);
        }
    }
}
