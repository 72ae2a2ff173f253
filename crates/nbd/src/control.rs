//! Server side of the control socket (protocol in `thinvol_catalog::control`): one
//! thread per served pool answers `pause` by draining that pool's requests, committing
//! and closing it (which releases the flock), and reopens it on `resume`, when the
//! client's connection closes, or after `pause_limit`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinvol_catalog::control::{paused_line, read_line, CONTROL_SOCKET};
use thinvol_catalog::manage;

use crate::export::{Export, PoolSlot};
use crate::server::poll_readable;
use crate::{info, io_err, Result};

/// Bind `POOLDIR/control.sock` (mode 0600). A stale socket (the previous server was
/// killed) is replaced: we hold the pool's lock, so no live server owns it.
pub fn bind(slot: &PoolSlot) -> Result<UnixListener> {
    let path = slot.dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(io_err(format!("binding {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    Ok(l)
}

/// Serve pause requests for `slot` until `stop` is set; then remove the socket.
pub fn run(
    slot: Arc<PoolSlot>,
    exports: Vec<Arc<Export>>,
    l: UnixListener,
    stop: Arc<AtomicBool>,
    pause_limit: Duration,
) {
    let ids: Vec<u64> = exports
        .iter()
        .filter(|e| Arc::ptr_eq(&e.slot, &slot))
        .map(|e| e.thin.0)
        .collect();
    while !stop.load(Ordering::SeqCst) {
        if !poll_readable(l.as_raw_fd(), 200) {
            continue;
        }
        let Ok((s, _)) = l.accept() else { continue };
        handle(&slot, &ids, s, &stop, pause_limit);
    }
    let _ = std::fs::remove_file(slot.dir.join(CONTROL_SOCKET));
}

fn handle(
    slot: &PoolSlot,
    ids: &[u64],
    mut s: UnixStream,
    stop: &AtomicBool,
    pause_limit: Duration,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    match read_line(&mut s) {
        Ok(Some(l)) if l.trim() == "pause" => {}
        Ok(Some(l)) => {
            let _ = s.write_all(format!("error unknown command {:?}\n", l).as_bytes());
            return;
        }
        _ => return,
    }
    // Exclusive: waits for in-flight requests; new ones wait for the resume.
    let mut g = slot.state.write();
    if let Some(o) = g.take() {
        if let Err(e) = o.close() {
            info!("pool {}: commit before pause failed: {e}", slot.name);
        }
    }
    info!("pool {}: paused for another command", slot.name);
    if s.write_all(paused_line(ids).as_bytes()).is_ok() {
        // Wait for `resume`, EOF (client done or dead), or the limit.
        let _ = s.set_read_timeout(Some(pause_limit));
        match read_line(&mut s) {
            Ok(_) => {}
            Err(_) => info!(
                "pool {}: pause held longer than {:?}; resuming",
                slot.name, pause_limit
            ),
        }
    }
    // Reopen; the client may still hold the lock (waits), or be slow to close.
    let started = Instant::now();
    loop {
        match manage::open_dir(&slot.name, &slot.dir, slot.read_only) {
            Ok(o) => {
                for &id in ids {
                    if !o
                        .pool
                        .exists(thinvol_engine::format::ThinId(id))
                        .unwrap_or(false)
                    {
                        info!(
                            "pool {}: exported device {id} no longer exists; its clients get EIO",
                            slot.name
                        );
                    }
                }
                *g = Some(o);
                break;
            }
            Err(e) => {
                if stop.load(Ordering::SeqCst) && started.elapsed() > Duration::from_secs(30) {
                    info!(
                        "pool {}: cannot reopen after pause: {e}; giving up",
                        slot.name
                    );
                    break;
                }
                info!("pool {}: cannot reopen yet: {e}", slot.name);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    drop(g);
    info!("pool {}: resumed", slot.name);
    let _ = s.write_all(b"resumed\n");
}
