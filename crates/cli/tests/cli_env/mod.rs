//! The test environment the CLI test families share: a temporary state directory and
//! the real `thinvol` binary run against it. Each family (`nbd_common`, `send_common`)
//! adds its own helpers to [`Env`] in its module.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_thinvol")
}

pub struct Env {
    pub tmp: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    pub fn p(&self, p: &str) -> String {
        self.path(p).to_str().unwrap().to_string()
    }

    /// `thinvol` with `THINVOL_HOME` in this environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("THINVOL_HOME", self.path("home"));
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Run, expect success, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "thinvol {args:?} failed ({:?}): {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run, expect exit `code`, return stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "thinvol {args:?}: stdout {} stderr {err}",
            String::from_utf8_lossy(&out.stdout)
        );
        err
    }
}
