//! The `stream_parse` fuzz target's body over its seed corpus (fuzz/seeds/stream_parse,
//! real streams: full, incremental, zstd, --from-each, group) and deterministic
//! mutations (bit flips, truncations, overwritten lengths), so CI runs the fuzz logic
//! without a nightly toolchain. Regressions go to fuzz/regressions/stream_parse/.

use std::path::Path;

use thinvol_stream::format::{parse_all, Body, PREAMBLE_LEN};
use thinvol_stream::fuzz_support;

fn dir(which: &str) -> Vec<(String, Vec<u8>)> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz")
        .join(which)
        .join("stream_parse");
    let mut v: Vec<(String, Vec<u8>)> = match std::fs::read_dir(&d) {
        Ok(rd) => rd
            .map(|e| {
                let p = e.unwrap().path();
                (p.display().to_string(), std::fs::read(&p).unwrap())
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn seeds_parse_completely() {
    let seeds = dir("seeds");
    assert!(seeds.len() >= 5, "seed corpus present");
    for (name, s) in &seeds {
        let n = fuzz_support::through_reader(s);
        assert!(n > 3, "{name}: {n} records");
        if !name.ends_with("zstd") {
            let recs = parse_all(&s[PREAMBLE_LEN..]).unwrap();
            assert!(
                matches!(recs.first().unwrap().body, Body::Begin(_)),
                "{name}"
            );
            assert!(matches!(recs.last().unwrap().body, Body::End(_)), "{name}");
            assert_eq!(recs.len(), n, "{name}");
            // Re-sealing a valid stream changes nothing.
            assert_eq!(
                fuzz_support::reseal(s),
                s[PREAMBLE_LEN..].to_vec(),
                "{name}"
            );
        }
    }
}

#[test]
fn mutations_never_panic() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let t0 = std::time::Instant::now();
    let mut n = 0;
    for (_, s) in dir("seeds").iter().chain(dir("regressions").iter()) {
        fuzz_support::parse(s);
        for _ in 0..300 {
            let mut m = s.clone();
            match rnd() % 4 {
                0 => {
                    let at = (rnd() as usize) % m.len();
                    m[at] ^= 1 << (rnd() % 8);
                }
                1 => m.truncate((rnd() as usize) % m.len()),
                2 => {
                    // A random 32-bit value somewhere (often a length field).
                    let at = (rnd() as usize) % m.len().saturating_sub(4).max(1);
                    let v = (rnd() as u32).to_le_bytes();
                    for (i, b) in v.iter().enumerate() {
                        if at + i < m.len() {
                            m[at + i] = *b;
                        }
                    }
                }
                _ => {
                    let at = (rnd() as usize) % m.len();
                    let len = ((rnd() as usize) % 64).min(m.len() - at);
                    m.drain(at..at + len);
                }
            }
            fuzz_support::parse(&m);
            n += 1;
        }
    }
    eprintln!("{n} mutated inputs in {:.1} s", t0.elapsed().as_secs_f64());
}
