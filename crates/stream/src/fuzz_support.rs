//! The body of the `stream_parse` fuzz target (fuzz/fuzz_targets/stream_parse.rs), kept
//! here so plain `cargo test` runs it over the seed corpus and mutations on a stable
//! toolchain (crates/stream/tests/fuzz_seeds.rs).
//!
//! Each input is parsed twice: as a whole stream through [`StreamReader`] (preamble,
//! zstd body, framing, checksums, payloads), and re-sealed (every record's crc32c
//! recomputed over the mutated bytes, the preamble repaired) so that mutations reach
//! the payload decoders behind the checksums. Whatever the input, parsing returns:
//! no panic, bounded memory (payloads are capped), bounded time (records are capped).

use crate::format::{parse_all, PREAMBLE_LEN, REC_CRC_LEN, REC_HEADER_LEN, REC_LEN};
use crate::reader::StreamReader;

/// Records read per input at most.
pub const MAX_RECORDS: usize = 4096;

/// Fuzz entry point.
pub fn parse(input: &[u8]) {
    let _ = through_reader(input);
    let _ = parse_all(&reseal(input));
}

/// Records a reader accepts before the first error or the end.
pub fn through_reader(input: &[u8]) -> usize {
    let Ok(mut r) = StreamReader::new(Box::new(input)) else {
        return 0;
    };
    let mut n = 0;
    while n < MAX_RECORDS {
        match r.next_record() {
            Ok(Some(_)) => n += 1,
            _ => break,
        }
    }
    n
}

/// The records of `input` (after a preamble) with valid crcs.
pub fn reseal(input: &[u8]) -> Vec<u8> {
    let body = input.get(PREAMBLE_LEN..).unwrap_or(&[]);
    let mut out = Vec::with_capacity(body.len());
    let mut pos = 0;
    let mut n = 0;
    while pos + REC_HEADER_LEN <= body.len() && n < MAX_RECORDS {
        let mut h = [0u8; REC_HEADER_LEN];
        h.copy_from_slice(&body[pos..pos + REC_HEADER_LEN]);
        let want = u32::from_le_bytes([h[REC_LEN], h[REC_LEN + 1], h[REC_LEN + 2], h[REC_LEN + 3]]);
        let avail = body.len() - pos - REC_HEADER_LEN;
        let len = (want as usize)
            .min(avail.saturating_sub(REC_CRC_LEN))
            .min(avail);
        h[REC_LEN..REC_LEN + 4].copy_from_slice(&(len as u32).to_le_bytes());
        let start = out.len();
        out.extend_from_slice(&h);
        out.extend_from_slice(&body[pos + REC_HEADER_LEN..pos + REC_HEADER_LEN + len]);
        let c = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&c.to_le_bytes());
        pos += REC_HEADER_LEN + len + REC_CRC_LEN;
        n += 1;
    }
    out
}
