//! Reading records from a byte stream (stdin, a file, an ssh pipe), decompressing a
//! zstd body, tracking the uncompressed byte position for error messages.

use std::io::Read;

use crate::error::FormatError;
use crate::format::{
    decode_body, decode_header, decode_preamble, Body, Record, DATA_BYTES, DATA_OFFSET, KIND_DATA,
    PREAMBLE_LEN, PRE_FLAG_ZSTD, REC_CRC_LEN, REC_HEADER_LEN,
};

pub struct StreamReader<'a> {
    r: Box<dyn Read + 'a>,
    /// Uncompressed stream position of the next record.
    pub pos: u64,
    pub flags: u16,
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The stream is malformed at this point (checksum, truncation, bad payload).
    Format(FormatError),
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Format(e) => write!(f, "{e}"),
            ReadError::Io(e) => write!(f, "reading the stream: {e}"),
        }
    }
}

/// Fill `buf`; Ok(false) at a clean end (nothing read), Truncated on a partial read.
fn fill(r: &mut dyn Read, buf: &mut [u8], what: &str, at: u64) -> Result<bool, ReadError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => {
                if done == 0 {
                    return Ok(false);
                }
                return Err(ReadError::Format(FormatError::Truncated {
                    what: what.to_string(),
                    at,
                }));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // zstd reports a cut frame as an I/O error: the stream was truncated.
                return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    ReadError::Format(FormatError::Truncated {
                        what: what.to_string(),
                        at,
                    })
                } else {
                    ReadError::Io(e)
                });
            }
        }
    }
    Ok(true)
}

impl<'a> StreamReader<'a> {
    pub fn new(mut r: Box<dyn Read + 'a>) -> Result<StreamReader<'a>, ReadError> {
        let mut pre = [0u8; PREAMBLE_LEN];
        if !fill(&mut r, &mut pre, "preamble", 0)? {
            return Err(ReadError::Format(FormatError::Truncated {
                what: "preamble (empty input)".into(),
                at: 0,
            }));
        }
        let flags = decode_preamble(&pre).map_err(ReadError::Format)?;
        let r: Box<dyn Read + 'a> = if flags & PRE_FLAG_ZSTD != 0 {
            Box::new(zstd::stream::read::Decoder::new(r).map_err(ReadError::Io)?)
        } else {
            r
        };
        Ok(StreamReader {
            r,
            pos: PREAMBLE_LEN as u64,
            flags,
        })
    }

    /// The next record; None at a clean end of input.
    pub fn next_record(&mut self) -> Result<Option<(Record, u64)>, ReadError> {
        let at = self.pos;
        let mut hb = [0u8; REC_HEADER_LEN];
        if !fill(&mut self.r, &mut hb, "record header", at)? {
            return Ok(None);
        }
        let h = decode_header(&hb, at).map_err(ReadError::Format)?;
        let what = format!("record {}", h.seq);
        let len = (REC_HEADER_LEN + h.len as usize + REC_CRC_LEN) as u64;
        let body = if h.kind == KIND_DATA && h.len as usize > DATA_BYTES {
            // The hot path: the data is read straight into its own buffer (no copy),
            // then the crc is checked.
            let mut pre = [0u8; DATA_BYTES];
            let mut data = vec![0u8; h.len as usize - DATA_BYTES];
            let mut cb = [0u8; REC_CRC_LEN];
            for b in [&mut pre[..], &mut data[..], &mut cb[..]] {
                if !fill(&mut self.r, b, &what, at)? {
                    return Err(ReadError::Format(FormatError::Truncated { what, at }));
                }
            }
            let crc = u32::from_le_bytes(cb);
            let c = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&hb), &pre), &data);
            if c != crc {
                return Err(ReadError::Format(FormatError::Checksum { seq: h.seq, at }));
            }
            let part = u32::from_le_bytes([pre[0], pre[1], pre[2], pre[3]]);
            let mut o = [0u8; 8];
            o.copy_from_slice(&pre[DATA_OFFSET..DATA_BYTES]);
            let offset = u64::from_le_bytes(o);
            if offset.checked_add(data.len() as u64).is_none() {
                return Err(ReadError::Format(FormatError::Invalid {
                    at,
                    reason: format!("record {} (DATA): overflowing range", h.seq),
                }));
            }
            Body::Data { part, offset, data }
        } else {
            let mut p = vec![0u8; h.len as usize + REC_CRC_LEN];
            if !fill(&mut self.r, &mut p, &what, at)? {
                return Err(ReadError::Format(FormatError::Truncated { what, at }));
            }
            let n = p.len() - REC_CRC_LEN;
            let crc = u32::from_le_bytes([p[n], p[n + 1], p[n + 2], p[n + 3]]);
            decode_body(&h, &hb, &p[..n], crc, at).map_err(ReadError::Format)?
        };
        self.pos += len;
        Ok(Some((Record { seq: h.seq, body }, len)))
    }
}
