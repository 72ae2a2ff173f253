//! Failpoints for crash tests: `THINVOL_FAILPOINT=NAME[:N]` makes the process abort
//! (SIGABRT: no unwinding, no destructors, no final commit — as if it were killed) the
//! `N`-th time (1-based, default 1) execution reaches `failpoint("NAME")`.
//!
//! Always compiled in; when the variable is unset a failpoint costs one atomic load.
//! Points (in the order a catalog change reaches them, see [`crate::bound`]):
//!
//! | name | where |
//! |---|---|
//! | `change:begin` | a change starts; nothing done yet |
//! | `change:ops-applied` | thin-device operations and the new transaction id applied in memory; pending catalog not written |
//! | `store:tmp-synced` | inside `write_atomic`: the temporary file is written and fsynced, not yet renamed |
//! | `change:pending-written` | `catalog.pending.json` durable; the pool not committed |
//! | `change:pool-committed` | the pool's superblock committed (the commit point); pending not yet renamed |
//! | `change:renamed` | `catalog.pending.json` renamed over `catalog.json` |
//! | `open:promote` | opening: a pending catalog matching the pool is about to be promoted |
//! | `open:discard` | opening: a stale pending catalog is about to be removed |

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

/// Name of the environment variable.
pub const ENV: &str = "THINVOL_FAILPOINT";

/// 0 = not yet read, 1 = unset, 2 = set.
static STATE: AtomicU8 = AtomicU8::new(0);
static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn spec() -> Option<&'static (String, u64)> {
    SPEC.get_or_init(|| {
        let v = std::env::var(ENV).ok()?;
        let v = v.trim();
        if v.is_empty() {
            return None;
        }
        Some(match v.rsplit_once(':') {
            Some((name, n)) if n.parse::<u64>().is_ok() => {
                (name.to_string(), n.parse::<u64>().unwrap_or(1).max(1))
            }
            _ => (v.to_string(), 1),
        })
    })
    .as_ref()
}

/// Abort the process if `name` is the armed failpoint and this is its `N`-th hit.
#[inline]
pub fn failpoint(name: &str) {
    if STATE.load(Ordering::Relaxed) == 1 {
        return;
    }
    hit(name);
}

#[cold]
fn hit(name: &str) {
    let Some((armed, n)) = spec() else {
        STATE.store(1, Ordering::Relaxed);
        return;
    };
    STATE.store(2, Ordering::Relaxed);
    if armed == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        eprintln!("thinvol: failpoint '{name}' reached: aborting");
        std::process::abort();
    }
}
