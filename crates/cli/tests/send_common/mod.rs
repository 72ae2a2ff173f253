//! Shared by the send/receive tests: a state directory per test, pools, random
//! workloads applied through `write-image`, piping `send` into `receive`.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

pub const MIB: usize = 1 << 20;

#[path = "../cli_env/mod.rs"]
mod cli_env;
#[allow(unused_imports)]
pub use cli_env::{bin, Env};

impl Env {
    pub fn pool(&self, name: &str) {
        self.ok(&[
            "pool",
            "create",
            name,
            "--dir",
            &self.p(name),
            "--size",
            "256M",
        ]);
    }
    /// Make volume `vol` hold `img` (only differing blocks are written).
    pub fn set_image(&self, vol: &str, img: &[u8]) {
        let p = self.p("set-image.raw");
        std::fs::write(&p, img).unwrap();
        self.ok(&["write-image", vol, &p]);
    }
    pub fn export(&self, name: &str) -> Vec<u8> {
        let out = self.p("export.out");
        let _ = std::fs::remove_file(&out);
        self.ok(&["export", name, &out, "-q"]);
        std::fs::read(out).unwrap()
    }
    /// `thinvol send ARGS` into a byte vector.
    pub fn send(&self, args: &[&str]) -> Vec<u8> {
        let out = self.p("stream.out");
        let mut a: Vec<&str> = vec!["send", "-q"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", &out]);
        self.ok(&a);
        std::fs::read(out).unwrap()
    }
    /// `thinvol receive ARGS` with `stream` on stdin.
    pub fn receive(&self, args: &[&str], stream: &[u8]) -> Output {
        let mut c = self
            .cmd()
            .arg("receive")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = c.stdin.take().unwrap();
        let _ = stdin.write_all(stream);
        drop(stdin);
        c.wait_with_output().unwrap()
    }
    pub fn receive_ok(&self, args: &[&str], stream: &[u8]) {
        let o = self.receive(args, stream);
        assert!(
            o.status.success(),
            "receive {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    /// A real shell pipe: `thinvol send S | thinvol receive R`.
    pub fn pipe(&self, send: &[&str], recv: &[&str]) {
        let mut s = self
            .cmd()
            .arg("send")
            .arg("-q")
            .args(send)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let r = self
            .cmd()
            .arg("receive")
            .arg("-q")
            .args(recv)
            .stdin(s.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(s.wait().unwrap().success(), "send {send:?}");
        assert!(
            r.status.success(),
            "receive {recv:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
    pub fn verify_full(&self, a: &str, b: &str) {
        let out = self.ok(&["verify", "--full", a, b]);
        assert!(out.starts_with("equal"), "{out}");
        let out = self.ok(&["verify", a, b]);
        assert!(out.starts_with("equal"), "{out}");
    }
    pub fn snapshots(&self, vol: &str) -> Vec<String> {
        let out = self.ok(&["list", vol, "-t", "snapshot", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    }
    pub fn thin_check(&self, pool: &str) {
        thin_check_ok(&self.path(pool));
        self.ok(&["check", pool]);
    }
}

pub fn thin_check_ok(dir: &Path) {
    if let Ok(out) = Command::new("thin_check")
        .arg(dir.join("metadata"))
        .output()
    {
        assert!(
            out.status.success(),
            "thin_check: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// xorshift64*.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

/// A random workload: `n` writes of random bytes at random offsets (some unaligned),
/// and a few zeroed ranges (which `write-image` turns into discards of whole blocks).
pub fn mutate(img: &mut [u8], rng: &mut Rng, n: usize) {
    let len = img.len();
    for _ in 0..n {
        let l = 1 + rng.below(300_000);
        let o = rng.below(len - l);
        rng.fill(&mut img[o..o + l]);
    }
    for _ in 0..n / 4 + 1 {
        let l = 1 + rng.below(400_000);
        let o = rng.below(len - l);
        img[o..o + l].fill(0);
    }
}

/// The resume token a failed receive printed.
pub fn token_in(stderr: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stderr).lines().find_map(|l| {
        l.strip_prefix("thinvol: resume token: ")
            .map(str::to_string)
    })
}
