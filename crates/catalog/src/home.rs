//! The state directory: `$THINVOL_HOME`, else `/var/lib/thinvol` for root, else
//! `$XDG_STATE_HOME/thinvol`, else `~/.local/state/thinvol`.

use std::path::PathBuf;

pub fn state_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("THINVOL_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/thinvol");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("thinvol");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/state/thinvol")
}
