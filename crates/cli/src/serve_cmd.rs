//! `thinvol serve`: export volumes (read-write) and snapshots (read-only) over NBD.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use thinvol_nbd::{control, export, Config, Listener, NbdError, Server};

use crate::common::{registry, usage};

#[derive(Args)]
pub struct ServeArgs {
    /// Volumes (POOL/VOL, read-write) and snapshots (POOL/VOL@SNAP, read-only) to
    /// export; each export is named like its volume or snapshot.
    #[arg(required = true)]
    names: Vec<String>,
    /// Listen on this unix socket (nbd+unix:///POOL/VOL?socket=PATH).
    #[arg(long, conflicts_with = "listen", required_unless_present = "listen")]
    socket: Option<PathBuf>,
    /// Listen on TCP ADDR:PORT (loopback only unless --allow-remote).
    #[arg(long)]
    listen: Option<String>,
    /// Allow --listen on a non-loopback address (no TLS, no authentication).
    #[arg(long)]
    allow_remote: bool,
    /// Export everything read-only.
    #[arg(long)]
    read_only: bool,
    /// Most client connections at once; more are refused.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// Seconds a client has to finish the handshake.
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// Worker threads per connection (requests in flight at once).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Seconds another command may hold a paused pool (control socket) before the
    /// server takes it back.
    #[arg(long, default_value_t = 300)]
    pause_limit: u64,
    /// Write the server's pid here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Print the ready line as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Stay in the foreground (the only mode; for systemd units).
    #[arg(long)]
    foreground: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn nbd_err(e: NbdError) -> anyhow::Error {
    match e {
        NbdError::Catalog(c) => c.into(),
        NbdError::Engine(c) => c.into(),
        other => other.into(),
    }
}

fn bind(a: &ServeArgs) -> Result<(Listener, String)> {
    if let Some(p) = &a.socket {
        if p.exists() {
            // A live server answers; a stale socket (killed server) is replaced.
            if UnixStream::connect(p).is_ok() {
                return Err(usage(format!(
                    "{} is in use by a running server",
                    p.display()
                )));
            }
            let _ = std::fs::remove_file(p);
        }
        let l = UnixListener::bind(p).with_context(|| format!("binding {}", p.display()))?;
        return Ok((
            Listener::Unix(l),
            format!("nbd+unix:///?socket={}", p.display()),
        ));
    }
    let s = a.listen.as_deref().unwrap_or_default();
    let addr: SocketAddr = s.parse().map_err(|_| {
        usage(format!(
            "invalid --listen '{s}': give ADDR:PORT, e.g. 127.0.0.1:10809"
        ))
    })?;
    if !addr.ip().is_loopback() && !a.allow_remote {
        return Err(usage(format!(
            "{addr} is not a loopback address; NBD has no authentication here: add --allow-remote to serve it anyway"
        )));
    }
    let l = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    let local = l.local_addr()?;
    Ok((Listener::Tcp(l), format!("nbd://{local}/")))
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    if a.max_connections == 0 || a.workers == 0 {
        return Err(usage("--max-connections and --workers must be at least 1"));
    }
    let exports = export::open_exports(&registry(), &a.names, a.read_only).map_err(nbd_err)?;
    let slots = export::slots(&exports);
    let (listener, uri) = bind(&a)?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let ctl_stop = Arc::new(AtomicBool::new(false));
    let mut ctl = Vec::new();
    for s in &slots {
        let l = control::bind(s).map_err(nbd_err)?;
        let (s, ex, stop) = (s.clone(), exports.clone(), ctl_stop.clone());
        let limit = Duration::from_secs(a.pause_limit);
        ctl.push(std::thread::spawn(move || {
            control::run(s, ex, l, stop, limit)
        }));
    }
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"ready": true, "uri": uri, "exports": names, "pid": std::process::id()})
        );
    }
    thinvol_nbd::info!("ready: {uri} exports {}", names.join(" "));
    let server = Server::new(
        exports,
        Config {
            max_connections: a.max_connections,
            handshake_timeout: Duration::from_secs(a.handshake_timeout),
            workers: a.workers,
            ..Config::default()
        },
    );
    server.run(&listener, &STOP);
    thinvol_nbd::info!("stopping: connections closed, committing");
    ctl_stop.store(true, Ordering::SeqCst);
    for t in ctl {
        let _ = t.join();
    }
    let mut failed = None;
    for s in &slots {
        if let Err(e) = s.close() {
            thinvol_nbd::info!("pool {}: close failed: {e}", s.name);
            failed = Some(e);
        }
    }
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    if let Some(e) = failed {
        return Err(nbd_err(e));
    }
    thinvol_nbd::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
