//! Resume tokens. A token names a position in one stream identity and nothing else:
//! `1-` + hex(stream id 32 | next record u64 | data bytes done u64 | check 16), the
//! check being a keyed BLAKE3 of the rest. The sender recomputes the stream id from
//! its own snapshots and refuses a token for any other stream, so a token (tampered or
//! not) can only select a starting record of the stream the sender would send anyway;
//! the receiver refuses a stream that does not start where its state says.

use crate::digest::{hex, unhex};
use crate::error::{Result, StreamError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub stream_id: [u8; 32],
    pub next_seq: u64,
    pub data_done: u64,
}

const BODY: usize = 32 + 8 + 8;

fn check(b: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new_derive_key("thinvol resume token v1");
    h.update(b);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

impl Token {
    pub fn encode(&self) -> String {
        let mut b = Vec::with_capacity(BODY + 16);
        b.extend_from_slice(&self.stream_id);
        b.extend_from_slice(&self.next_seq.to_le_bytes());
        b.extend_from_slice(&self.data_done.to_le_bytes());
        let c = check(&b);
        b.extend_from_slice(&c);
        format!("1-{}", hex(&b))
    }

    pub fn decode(s: &str) -> Result<Token> {
        let bad = |r: &str| StreamError::BadToken(r.to_string());
        let h = s
            .trim()
            .strip_prefix("1-")
            .ok_or_else(|| bad("it does not start with '1-'"))?;
        let b = unhex(h).ok_or_else(|| bad("not hexadecimal"))?;
        if b.len() != BODY + 16 {
            return Err(bad("wrong length"));
        }
        if check(&b[..BODY]) != b[BODY..] {
            return Err(bad("check value mismatch (damaged or altered)"));
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[32..40]);
        let next_seq = u64::from_le_bytes(x);
        x.copy_from_slice(&b[40..48]);
        Ok(Token {
            stream_id: id,
            next_seq,
            data_done: u64::from_le_bytes(x),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let t = Token {
            stream_id: [3; 32],
            next_seq: 77,
            data_done: 1 << 20,
        };
        let s = t.encode();
        assert_eq!(Token::decode(&s).unwrap(), t);
        let mut b: Vec<char> = s.chars().collect();
        for i in 2..b.len() {
            let o = b[i];
            b[i] = if o == '0' { '1' } else { '0' };
            let x: String = b.iter().collect();
            assert!(Token::decode(&x).is_err(), "{i}");
            b[i] = o;
        }
    }
}
