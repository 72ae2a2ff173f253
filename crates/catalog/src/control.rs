//! The control socket of a served pool (docs/design.md, "Serving and the control
//! socket"): a process that keeps a pool open for a long time (`thinvol serve`) listens
//! on `POOLDIR/control.sock` (mode 0600), so that other commands can still use the pool.
//!
//! Protocol: one text line each way.
//!
//! ```text
//! C: pause\n          S: (drains requests, commits, closes the pool, releases the flock)
//!                     S: paused ID,ID,...\n       (thin ids it exports)
//! C: resume\n         S: (reopens the pool)  resumed\n
//! ```
//!
//! The client's connection closing (it finished, or died) resumes too. The server
//! resumes by itself after its pause limit; if the client still holds the pool then,
//! the server waits for the lock like any other command.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::{io, CatalogError, Result};

/// The socket's file name in a pool directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// How long a client waits for `paused` (the server drains in-flight requests and
/// commits first).
pub const PAUSE_REPLY_WAIT: Duration = Duration::from_secs(30);
/// How long dropping a guard waits for `resumed`.
pub const RESUME_REPLY_WAIT: Duration = Duration::from_secs(10);
/// Longest line either side sends.
pub const MAX_LINE: usize = 1 << 20;

/// A paused server: the pool is free for this process until the guard is dropped.
#[derive(Debug)]
pub struct PauseGuard {
    stream: Option<UnixStream>,
    /// Thin ids the server exports (to refuse destroying them without `--force`).
    pub exported: Vec<u64>,
}

/// Read one `\n`-terminated line (without the newline). `None` at EOF before any byte.
pub fn read_line(s: &mut UnixStream) -> std::io::Result<Option<String>> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 if out.is_empty() => return Ok(None),
            0 => break,
            _ if b[0] == b'\n' => break,
            _ => {
                if out.len() >= MAX_LINE {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "control line too long",
                    ));
                }
                out.push(b[0]);
            }
        }
    }
    Ok(Some(String::from_utf8_lossy(&out).into_owned()))
}

/// Parse the server's `paused ID,ID` reply.
pub fn parse_paused(line: &str) -> Option<Vec<u64>> {
    let rest = line.strip_prefix("paused")?.trim();
    if rest.is_empty() {
        return Some(Vec::new());
    }
    rest.split(',').map(|t| t.trim().parse().ok()).collect()
}

/// Format the server's `paused` reply.
pub fn paused_line(ids: &[u64]) -> String {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!("paused {}\n", ids.join(","))
}

/// Ask the process serving the pool in `dir` to pause. `Ok(None)` when nobody
/// listens (no socket, or a stale one left by a killed server).
pub fn pause(dir: &Path) -> Result<Option<PauseGuard>> {
    let path = dir.join(CONTROL_SOCKET);
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTDIR)
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io(format!("connecting to {}", path.display()))(e)),
    };
    let what = format!("pausing the server of {}", dir.display());
    s.set_read_timeout(Some(PAUSE_REPLY_WAIT))
        .map_err(io(what.clone()))?;
    s.write_all(b"pause\n").map_err(io(what.clone()))?;
    let line = read_line(&mut s).map_err(io(what.clone()))?;
    match line.as_deref().and_then(parse_paused) {
        Some(exported) => Ok(Some(PauseGuard {
            stream: Some(s),
            exported,
        })),
        None => Err(CatalogError::Refused {
            reason: format!(
                "{what}: unexpected answer {:?}",
                line.unwrap_or_else(|| "(closed)".into())
            ),
        }),
    }
}

impl PauseGuard {
    /// Resume the server now and wait (bounded) until it serves again.
    pub fn resume(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(mut s) = self.stream.take() {
            let _ = s.set_read_timeout(Some(RESUME_REPLY_WAIT));
            if s.write_all(b"resume\n").is_ok() {
                let _ = read_line(&mut s);
            }
        }
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paused_line_round_trip() {
        assert_eq!(parse_paused(&paused_line(&[1, 7])).unwrap(), vec![1, 7]);
        assert_eq!(parse_paused("paused ").unwrap(), Vec::<u64>::new());
        assert_eq!(parse_paused("paused x"), None);
        assert_eq!(parse_paused("nope"), None);
    }

    #[test]
    fn no_server_means_none() {
        let d = tempfile::tempdir().unwrap();
        assert!(pause(d.path()).unwrap().is_none());
        // A stale socket file (server killed): connection refused, also None.
        let l = std::os::unix::net::UnixListener::bind(d.path().join(CONTROL_SOCKET)).unwrap();
        drop(l);
        assert!(pause(d.path()).unwrap().is_none());
    }
}
