//! The replication stream codec (docs/stream-format.md). Pure: bytes in, typed values
//! out, every read bounds-checked, no panics (the fuzz target `stream_parse` drives it).
//!
//! ```text
//! stream   := preamble body
//! preamble := magic "THINVOLS" (8) | version u16 | flags u16 | reserved u32   = 16 bytes
//! body     := record*        (zstd-compressed as one frame when flags bit 0 is set)
//! record   := kind u16 | rflags u16 | len u32 | seq u64 | payload[len] | crc32c u32
//!             offsets  0          2          4        8        16          16+len
//! ```
//! The crc32c covers the 16-byte record header and the payload (the uncompressed
//! bytes). `seq` numbers records from 0 (BEGIN) without gaps. All integers are
//! little-endian. A record kind the receiver does not know is skipped when its rflags
//! bit 0 (OPTIONAL) is set and refused otherwise.

use crate::error::{FormatError, FormatResult};

pub const MAGIC: &[u8; 8] = b"THINVOLS";
/// 2 since the content digest definition v2 (docs/stream-format.md, "Content digest"):
/// the record layout is that of 1, but the END digests mean something else.
pub const VERSION: u16 = 2;

// Preamble layout.
pub const PRE_MAGIC: usize = 0;
pub const PRE_VERSION: usize = PRE_MAGIC + 8;
pub const PRE_FLAGS: usize = PRE_VERSION + 2;
pub const PRE_RESERVED: usize = PRE_FLAGS + 2;
pub const PREAMBLE_LEN: usize = PRE_RESERVED + 4;
/// Preamble flag: the body is one zstd frame.
pub const PRE_FLAG_ZSTD: u16 = 1;

// Record header layout.
pub const REC_KIND: usize = 0;
pub const REC_FLAGS: usize = REC_KIND + 2;
pub const REC_LEN: usize = REC_FLAGS + 2;
pub const REC_SEQ: usize = REC_LEN + 4;
pub const REC_HEADER_LEN: usize = REC_SEQ + 8;
pub const REC_CRC_LEN: usize = 4;
/// Framing bytes around every payload.
pub const REC_OVERHEAD: u64 = (REC_HEADER_LEN + REC_CRC_LEN) as u64;
/// Record flag: may be skipped by a receiver that does not know the kind.
pub const RFLAG_OPTIONAL: u16 = 1;

/// Largest data bytes in one DATA record.
pub const MAX_DATA: u64 = 1 << 20;
/// Largest payload accepted (a DATA record plus its fixed fields, or a header).
pub const MAX_PAYLOAD: u32 = (MAX_DATA as u32) + 4096;

pub const KIND_BEGIN: u16 = 1;
pub const KIND_PART: u16 = 2;
pub const KIND_DATA: u16 = 3;
pub const KIND_ZERO: u16 = 4;
pub const KIND_UNMAP: u16 = 5;
pub const KIND_PART_END: u16 = 6;
pub const KIND_END: u16 = 7;
/// Optional: free-form sender information (skipped by receivers that ignore it).
pub const KIND_INFO: u16 = 0x100;

/// LtHash digest: 1024 u16 lanes.
pub const DIGEST_LEN: usize = 2048;

// DATA payload: part u32 | reserved u32 | offset u64 | bytes.
pub const DATA_PART: usize = 0;
pub const DATA_OFFSET: usize = DATA_PART + 8;
pub const DATA_BYTES: usize = DATA_OFFSET + 8;
// ZERO / UNMAP payload: part u32 | reserved u32 | offset u64 | len u64.
pub const RANGE_LEN: usize = DATA_BYTES + 8;

/// Stream-level header (BEGIN).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// BEGIN_FLAG_*.
    pub flags: u32,
    pub pool_uuid: String,
    pub pool_name: String,
    pub nr_parts: u32,
    /// Records in the stream, BEGIN and END included.
    pub nr_records: u64,
    /// DATA bytes in the whole stream.
    pub data_bytes: u64,
}
pub const BEGIN_FLAG_FROM_EACH: u32 = 1;
pub const BEGIN_FLAG_GROUP: u32 = 2;

/// One snapshot's transfer (PART).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub index: u32,
    pub volume: String,
    pub volume_uuid: String,
    pub snapshot: String,
    pub snapshot_uuid: String,
    pub created: u64,
    /// Consistency group uuid, empty if none.
    pub group: String,
    /// Base snapshot name and uuid; empty for a full stream.
    pub base: String,
    pub base_uuid: String,
    /// Sender's pool block size (the granularity of the plan; offsets are bytes).
    pub block_size: u64,
    pub volume_size: u64,
    pub data_bytes: u64,
    /// Records of this part, PART and PART_END included.
    pub nr_records: u64,
}

/// Totals of one part and the digest of the snapshot's whole content (PART_END).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartEnd {
    pub index: u32,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub unmap_bytes: u64,
    pub nr_records: u64,
    pub digest: Vec<u8>,
}

/// Totals of the stream (END).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    pub nr_records: u64,
    pub data_bytes: u64,
    pub stream_id: [u8; 32],
}

/// A decoded record payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Begin(Begin),
    Part(Part),
    Data {
        part: u32,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        part: u32,
        offset: u64,
        len: u64,
    },
    Unmap {
        part: u32,
        offset: u64,
        len: u64,
    },
    PartEnd(PartEnd),
    End(End),
    /// An optional record of a kind this version does not interpret.
    Skipped {
        kind: u16,
    },
    Info(String),
}

/// A decoded record with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub body: Body,
}

/// Preamble bytes.
pub fn encode_preamble(flags: u16) -> [u8; PREAMBLE_LEN] {
    let mut b = [0u8; PREAMBLE_LEN];
    b[PRE_MAGIC..PRE_VERSION].copy_from_slice(MAGIC);
    b[PRE_VERSION..PRE_FLAGS].copy_from_slice(&VERSION.to_le_bytes());
    b[PRE_FLAGS..PRE_RESERVED].copy_from_slice(&flags.to_le_bytes());
    b
}

/// Parse a preamble; returns its flags.
pub fn decode_preamble(b: &[u8]) -> FormatResult<u16> {
    if b.len() < PREAMBLE_LEN {
        return Err(FormatError::Truncated {
            what: "preamble".into(),
            at: 0,
        });
    }
    if &b[PRE_MAGIC..PRE_VERSION] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let v = u16::from_le_bytes([b[PRE_VERSION], b[PRE_VERSION + 1]]);
    if v != VERSION {
        return Err(FormatError::Version(v));
    }
    let flags = u16::from_le_bytes([b[PRE_FLAGS], b[PRE_FLAGS + 1]]);
    if flags & !PRE_FLAG_ZSTD != 0 {
        return Err(FormatError::Invalid {
            at: PRE_FLAGS as u64,
            reason: format!("unknown preamble flags {flags:#x}"),
        });
    }
    Ok(flags)
}

/// Little-endian payload writer.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        let b = s.as_bytes();
        let n = b.len().min(u16::MAX as usize);
        self.0.extend_from_slice(&(n as u16).to_le_bytes());
        self.0.extend_from_slice(&b[..n]);
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// Bounds-checked payload reader.
struct R<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> FormatResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(e) => {
                let s = &self.b[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => Err(FormatError::Payload {
                what: self.what,
                reason: format!(
                    "needs {n} bytes at payload offset {} of {}",
                    self.pos,
                    self.b.len()
                ),
            }),
        }
    }
    fn u32(&mut self) -> FormatResult<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> FormatResult<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> FormatResult<String> {
        let s = self.take(2)?;
        let n = u16::from_le_bytes([s[0], s[1]]) as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| FormatError::Payload {
            what: self.what,
            reason: "a string is not UTF-8".into(),
        })
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.pos..];
        self.pos = self.b.len();
        s
    }
    fn done(&self) -> FormatResult<()> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(FormatError::Payload {
                what: self.what,
                reason: format!("{} trailing bytes", self.b.len() - self.pos),
            })
        }
    }
}

impl Begin {
    pub fn payload(&self) -> Vec<u8> {
        let mut w = W::default();
        w.u32(self.flags)
            .str(&self.pool_uuid)
            .str(&self.pool_name)
            .u32(self.nr_parts)
            .u64(self.nr_records)
            .u64(self.data_bytes);
        w.0
    }
}

impl Part {
    pub fn payload(&self) -> Vec<u8> {
        let mut w = W::default();
        w.u32(self.index)
            .str(&self.volume)
            .str(&self.volume_uuid)
            .str(&self.snapshot)
            .str(&self.snapshot_uuid)
            .u64(self.created)
            .str(&self.group)
            .str(&self.base)
            .str(&self.base_uuid)
            .u64(self.block_size)
            .u64(self.volume_size)
            .u64(self.data_bytes)
            .u64(self.nr_records);
        w.0
    }
    pub fn is_full(&self) -> bool {
        self.base_uuid.is_empty()
    }
}

/// Payload bytes of a body (DATA data included).
pub fn payload(body: &Body) -> Vec<u8> {
    match body {
        Body::Begin(b) => b.payload(),
        Body::Part(p) => p.payload(),
        Body::Data { part, offset, data } => {
            let mut w = W::default();
            w.u32(*part).u32(0).u64(*offset).bytes(data);
            w.0
        }
        Body::Zero { part, offset, len } | Body::Unmap { part, offset, len } => {
            let mut w = W::default();
            w.u32(*part).u32(0).u64(*offset).u64(*len);
            w.0
        }
        Body::PartEnd(e) => {
            let mut w = W::default();
            w.u32(e.index)
                .u64(e.data_bytes)
                .u64(e.zero_bytes)
                .u64(e.unmap_bytes)
                .u64(e.nr_records)
                .bytes(&e.digest);
            w.0
        }
        Body::End(e) => {
            let mut w = W::default();
            w.u64(e.nr_records).u64(e.data_bytes).bytes(&e.stream_id);
            w.0
        }
        Body::Info(s) => s.as_bytes().to_vec(),
        Body::Skipped { .. } => Vec::new(),
    }
}

pub fn kind_of(body: &Body) -> (u16, u16) {
    match body {
        Body::Begin(_) => (KIND_BEGIN, 0),
        Body::Part(_) => (KIND_PART, 0),
        Body::Data { .. } => (KIND_DATA, 0),
        Body::Zero { .. } => (KIND_ZERO, 0),
        Body::Unmap { .. } => (KIND_UNMAP, 0),
        Body::PartEnd(_) => (KIND_PART_END, 0),
        Body::End(_) => (KIND_END, 0),
        Body::Info(_) => (KIND_INFO, RFLAG_OPTIONAL),
        Body::Skipped { kind } => (*kind, RFLAG_OPTIONAL),
    }
}

/// Frame a record: header, payload, crc32c.
pub fn encode_record(seq: u64, body: &Body) -> Vec<u8> {
    let (kind, flags) = kind_of(body);
    let p = payload(body);
    frame(kind, flags, seq, &p)
}

/// Frame an already encoded payload.
pub fn frame(kind: u16, flags: u16, seq: u64, p: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(REC_HEADER_LEN + p.len() + REC_CRC_LEN);
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(p);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A parsed record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u16,
    pub flags: u16,
    pub len: u32,
    pub seq: u64,
}

pub fn decode_header(h: &[u8; REC_HEADER_LEN], at: u64) -> FormatResult<Header> {
    let kind = u16::from_le_bytes([h[REC_KIND], h[REC_KIND + 1]]);
    let flags = u16::from_le_bytes([h[REC_FLAGS], h[REC_FLAGS + 1]]);
    let len = u32::from_le_bytes([h[REC_LEN], h[REC_LEN + 1], h[REC_LEN + 2], h[REC_LEN + 3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&h[REC_SEQ..REC_HEADER_LEN]);
    let seq = u64::from_le_bytes(s);
    if len > MAX_PAYLOAD {
        return Err(FormatError::Invalid {
            at,
            reason: format!("record {seq}: payload length {len} exceeds {MAX_PAYLOAD}"),
        });
    }
    Ok(Header {
        kind,
        flags,
        len,
        seq,
    })
}

/// Check the crc and decode a payload. `at` is the record's stream byte offset.
pub fn decode_body(h: &Header, hdr: &[u8], p: &[u8], crc: u32, at: u64) -> FormatResult<Body> {
    let mut c = crc32c::crc32c(hdr);
    c = crc32c::crc32c_append(c, p);
    if c != crc {
        return Err(FormatError::Checksum { seq: h.seq, at });
    }
    decode_payload(h.kind, h.flags, p).map_err(|e| match e {
        FormatError::Payload { what, reason } => FormatError::Invalid {
            at,
            reason: format!("record {} ({what}): {reason}", h.seq),
        },
        e => e,
    })
}

pub fn decode_payload(kind: u16, flags: u16, p: &[u8]) -> FormatResult<Body> {
    let body = match kind {
        KIND_BEGIN => {
            let mut r = R {
                b: p,
                pos: 0,
                what: "BEGIN",
            };
            let b = Begin {
                flags: r.u32()?,
                pool_uuid: r.str()?,
                pool_name: r.str()?,
                nr_parts: r.u32()?,
                nr_records: r.u64()?,
                data_bytes: r.u64()?,
            };
            r.done()?;
            Body::Begin(b)
        }
        KIND_PART => {
            let mut r = R {
                b: p,
                pos: 0,
                what: "PART",
            };
            let x = Part {
                index: r.u32()?,
                volume: r.str()?,
                volume_uuid: r.str()?,
                snapshot: r.str()?,
                snapshot_uuid: r.str()?,
                created: r.u64()?,
                group: r.str()?,
                base: r.str()?,
                base_uuid: r.str()?,
                block_size: r.u64()?,
                volume_size: r.u64()?,
                data_bytes: r.u64()?,
                nr_records: r.u64()?,
            };
            r.done()?;
            Body::Part(x)
        }
        KIND_DATA => {
            let mut r = R {
                b: p,
                pos: 0,
                what: "DATA",
            };
            let part = r.u32()?;
            r.u32()?;
            let offset = r.u64()?;
            let data = r.rest().to_vec();
            if data.is_empty() || offset.checked_add(data.len() as u64).is_none() {
                return Err(FormatError::Payload {
                    what: "DATA",
                    reason: "empty or overflowing range".into(),
                });
            }
            Body::Data { part, offset, data }
        }
        KIND_ZERO | KIND_UNMAP => {
            let what = if kind == KIND_ZERO { "ZERO" } else { "UNMAP" };
            let mut r = R { b: p, pos: 0, what };
            let part = r.u32()?;
            r.u32()?;
            let offset = r.u64()?;
            let len = r.u64()?;
            r.done()?;
            if len == 0 || offset.checked_add(len).is_none() {
                return Err(FormatError::Payload {
                    what,
                    reason: "empty or overflowing range".into(),
                });
            }
            if kind == KIND_ZERO {
                Body::Zero { part, offset, len }
            } else {
                Body::Unmap { part, offset, len }
            }
        }
        KIND_PART_END => {
            let mut r = R {
                b: p,
                pos: 0,
                what: "PART_END",
            };
            let e = PartEnd {
                index: r.u32()?,
                data_bytes: r.u64()?,
                zero_bytes: r.u64()?,
                unmap_bytes: r.u64()?,
                nr_records: r.u64()?,
                digest: r.take(DIGEST_LEN)?.to_vec(),
            };
            r.done()?;
            Body::PartEnd(e)
        }
        KIND_END => {
            let mut r = R {
                b: p,
                pos: 0,
                what: "END",
            };
            let nr_records = r.u64()?;
            let data_bytes = r.u64()?;
            let mut stream_id = [0u8; 32];
            stream_id.copy_from_slice(r.take(32)?);
            r.done()?;
            Body::End(End {
                nr_records,
                data_bytes,
                stream_id,
            })
        }
        KIND_INFO => Body::Info(String::from_utf8_lossy(p).into_owned()),
        k if flags & RFLAG_OPTIONAL != 0 => Body::Skipped { kind: k },
        k => return Err(FormatError::UnknownKind(k)),
    };
    Ok(body)
}

/// Bytes a DATA record of `n` data bytes occupies in the stream.
pub fn data_record_len(n: u64) -> u64 {
    REC_OVERHEAD + DATA_BYTES as u64 + n
}

/// Bytes a ZERO/UNMAP record occupies.
pub const RANGE_RECORD_LEN: u64 = REC_OVERHEAD + RANGE_LEN as u64;
/// Bytes a PART_END record occupies.
pub const PART_END_RECORD_LEN: u64 = REC_OVERHEAD + (4 + 8 * 4 + DIGEST_LEN) as u64;
/// Bytes an END record occupies.
pub const END_RECORD_LEN: u64 = REC_OVERHEAD + 8 + 8 + 32;

/// Parse a whole uncompressed body (records after the preamble) from a byte slice,
/// stopping at the first error. For the fuzz target and tests.
pub fn parse_all(mut b: &[u8]) -> FormatResult<Vec<Record>> {
    let mut out = Vec::new();
    let mut at = PREAMBLE_LEN as u64;
    while !b.is_empty() {
        if b.len() < REC_HEADER_LEN {
            return Err(FormatError::Truncated {
                what: "record header".into(),
                at,
            });
        }
        let mut hb = [0u8; REC_HEADER_LEN];
        hb.copy_from_slice(&b[..REC_HEADER_LEN]);
        let h = decode_header(&hb, at)?;
        let total = REC_HEADER_LEN + h.len as usize + REC_CRC_LEN;
        if b.len() < total {
            return Err(FormatError::Truncated {
                what: format!("record {}", h.seq),
                at,
            });
        }
        let p = &b[REC_HEADER_LEN..REC_HEADER_LEN + h.len as usize];
        let cb = &b[REC_HEADER_LEN + h.len as usize..total];
        let crc = u32::from_le_bytes([cb[0], cb[1], cb[2], cb[3]]);
        let body = decode_body(&h, &hb, p, crc, at)?;
        out.push(Record { seq: h.seq, body });
        b = &b[total..];
        at += total as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Body> {
        vec![
            Body::Begin(Begin {
                flags: BEGIN_FLAG_GROUP,
                pool_uuid: "p".into(),
                pool_name: "tank".into(),
                nr_parts: 1,
                nr_records: 6,
                data_bytes: 3,
            }),
            Body::Info("hello".into()),
            Body::Part(Part {
                index: 0,
                volume: "vm".into(),
                volume_uuid: "vu".into(),
                snapshot: "s1".into(),
                snapshot_uuid: "su".into(),
                created: 5,
                group: String::new(),
                base: String::new(),
                base_uuid: String::new(),
                block_size: 65536,
                volume_size: 1 << 20,
                data_bytes: 3,
                nr_records: 4,
            }),
            Body::Data {
                part: 0,
                offset: 7,
                data: vec![1, 2, 3],
            },
            Body::Unmap {
                part: 0,
                offset: 65536,
                len: 65536,
            },
            Body::PartEnd(PartEnd {
                index: 0,
                data_bytes: 3,
                zero_bytes: 0,
                unmap_bytes: 65536,
                nr_records: 4,
                digest: vec![9; DIGEST_LEN],
            }),
            Body::End(End {
                nr_records: 6,
                data_bytes: 3,
                stream_id: [7; 32],
            }),
        ]
    }

    #[test]
    fn round_trip_and_lengths() {
        let mut bytes = Vec::new();
        for (i, b) in sample().iter().enumerate() {
            let r = encode_record(i as u64, b);
            match b {
                Body::Data { data, .. } => {
                    assert_eq!(r.len() as u64, data_record_len(data.len() as u64))
                }
                Body::Unmap { .. } => assert_eq!(r.len() as u64, RANGE_RECORD_LEN),
                Body::PartEnd(_) => assert_eq!(r.len() as u64, PART_END_RECORD_LEN),
                Body::End(_) => assert_eq!(r.len() as u64, END_RECORD_LEN),
                _ => {}
            }
            bytes.extend(r);
        }
        let recs = parse_all(&bytes).unwrap();
        let bodies: Vec<Body> = recs.into_iter().map(|r| r.body).collect();
        assert_eq!(bodies, sample());
    }

    #[test]
    fn bit_flips_are_caught() {
        let r = encode_record(3, &sample()[3]);
        for bit in 0..r.len() * 8 {
            let mut x = r.clone();
            x[bit / 8] ^= 1 << (bit % 8);
            assert!(parse_all(&x).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn unknown_optional_kind_is_skipped_and_mandatory_refused() {
        let opt = frame(0x7777, RFLAG_OPTIONAL, 1, b"xyz");
        assert_eq!(
            parse_all(&opt).unwrap()[0].body,
            Body::Skipped { kind: 0x7777 }
        );
        let man = frame(0x7777, 0, 1, b"xyz");
        assert!(matches!(
            parse_all(&man),
            Err(FormatError::UnknownKind(0x7777))
        ));
    }

    #[test]
    fn preamble() {
        assert_eq!(decode_preamble(&encode_preamble(PRE_FLAG_ZSTD)).unwrap(), 1);
        assert!(decode_preamble(b"THINVOLX").is_err());
    }
}
