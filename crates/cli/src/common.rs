//! Shared by the name-based commands: argument conversions, opening pools by name,
//! threshold warnings on stderr.

use anyhow::Result;
use thinvol_catalog::manage::{self, Opened};
use thinvol_catalog::registry::Registry;
use thinvol_catalog::Name;
use thinvol_engine::format::parse_size;

/// A command line that cannot work as given (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// A size like 10G, 512M, 64K, 1.5T, 4096.
pub fn size(s: &str, what: &str) -> Result<u64> {
    parse_size(s).ok_or_else(|| {
        usage(format!(
            "invalid {what} '{s}': give a number with an optional unit, e.g. 512M, 10G, 64K, 1.5T"
        ))
    })
}

pub fn registry() -> Registry {
    Registry::open_default()
}

pub fn name(s: &str) -> Result<Name> {
    Ok(Name::parse(s)?)
}

pub fn volume_name(s: &str) -> Result<Name> {
    Ok(Name::parse_volume(s)?)
}

pub fn snapshot_name(s: &str) -> Result<Name> {
    Ok(Name::parse_snapshot(s)?)
}

/// Print threshold warnings collected by the pool.
pub fn print_warnings(h: &mut Opened) {
    for w in h.take_warnings() {
        eprintln!("thinvol: warning: {w}");
    }
}

/// Open `pool` for changes, run `f`, print the warnings (also when `f` failed), close.
pub fn with_pool<T>(pool: &str, f: impl FnOnce(&mut Opened) -> Result<T>) -> Result<T> {
    let mut h = manage::open(&registry(), pool)?;
    let r = f(&mut h);
    print_warnings(&mut h);
    let closed = h.close();
    let v = r?;
    closed?;
    Ok(v)
}

/// Refuse `what` when a server paused for this command exports one of `ids` (its
/// clients would get I/O errors), unless `force`.
pub fn refuse_served(h: &Opened, ids: &[u64], what: &str, force: bool) -> Result<()> {
    if !force && ids.iter().any(|i| h.served().contains(i)) {
        return Err(thinvol_catalog::CatalogError::Refused {
            reason: format!(
                "cannot {what}: it is exported by 'thinvol serve'; stop the server or add --force"
            ),
        }
        .into());
    }
    Ok(())
}

/// Open `pool` to read it.
pub fn read_pool<T>(pool: &str, f: impl FnOnce(&Opened) -> Result<T>) -> Result<T> {
    let h = manage::open_read_only(&registry(), pool)?;
    f(&h)
}

pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn pct(p: f64) -> String {
    format!("{p:.1}%")
}

/// Die quietly on a closed output pipe (`thinvol list | head`), like other Unix tools,
/// instead of panicking in `println!`.
pub fn default_sigpipe() {
    // SAFETY: resetting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
