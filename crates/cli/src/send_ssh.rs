//! The ssh transport: `ssh://[user@]host[:port]/PATH` runs `thinvol` on the remote host
//! through the system's ssh client (options passed through with --ssh-opt).

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use crate::common::usage;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// `[user@]host`.
    pub host: String,
    pub port: Option<u16>,
    /// What follows the first '/': POOL/VOL, POOL/VOL@SNAP or POOL.
    pub path: String,
}

impl Remote {
    pub fn parse(s: &str) -> Result<Remote> {
        let rest = s
            .strip_prefix("ssh://")
            .ok_or_else(|| usage(format!("'{s}' is not ssh://[user@]host[:port]/POOL/VOL")))?;
        let (hp, path) = rest
            .split_once('/')
            .ok_or_else(|| usage(format!("'{s}' names no POOL/VOL after the host")))?;
        let (userhost, port) = match hp.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                Some(
                    p.parse::<u16>()
                        .map_err(|_| usage(format!("bad port in '{s}'")))?,
                ),
            ),
            None => (hp.to_string(), None),
        };
        if userhost.is_empty() || path.is_empty() {
            return Err(usage(format!(
                "'{s}' is not ssh://[user@]host[:port]/POOL/VOL"
            )));
        }
        Ok(Remote {
            host: userhost,
            port,
            path: path.to_string(),
        })
    }

    /// `ssh [-p port] [-o opt]... host -- thinvol ARGS...` (arguments shell-quoted).
    pub fn command(&self, opts: &[String], thinvol: &str, args: &[&str]) -> Command {
        let mut c = Command::new(std::env::var("THINVOL_SSH").unwrap_or_else(|_| "ssh".into()));
        if let Some(p) = self.port {
            c.arg("-p").arg(p.to_string());
        }
        for o in opts {
            c.arg("-o").arg(o);
        }
        c.arg(&self.host).arg("--");
        let mut line = quote(thinvol);
        for a in args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        c.arg(line);
        c
    }

    pub fn spawn_receive(&self, opts: &[String], thinvol: &str, force: bool) -> Result<Child> {
        let mut args = vec!["receive", self.path.as_str()];
        if force {
            args.push("--force");
        }
        self.command(opts, thinvol, &args)
            .stdin(Stdio::piped())
            .spawn()
            .context("starting ssh")
    }

    /// The remote receiver's resume token.
    pub fn query_token(&self, opts: &[String], thinvol: &str) -> Result<Option<String>> {
        let out = self
            .command(opts, thinvol, &["receive", "--token", &self.path])
            .stdin(Stdio::null())
            .output()
            .context("running ssh")?;
        if !out.status.success() {
            anyhow::bail!(
                "asking the remote receiver for its resume token failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Some(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }

    /// Run a remote command and return its stdout.
    pub fn output(&self, opts: &[String], thinvol: &str, args: &[&str]) -> Result<Vec<u8>> {
        let out = self
            .command(opts, thinvol, args)
            .stdin(Stdio::null())
            .output()
            .context("running ssh")?;
        if !out.status.success() {
            anyhow::bail!(
                "remote 'thinvol {}' failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }
}

/// Quote for the remote POSIX shell.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./@:=+,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let r = Remote::parse("ssh://root@h:2222/tank/vm").unwrap();
        assert_eq!(r.host, "root@h");
        assert_eq!(r.port, Some(2222));
        assert_eq!(r.path, "tank/vm");
        assert!(Remote::parse("ssh://h").is_err());
        assert_eq!(quote("a b'c"), "'a b'\\''c'");
    }
}
