//! `base:allocation` from the mapping tree: a mapped block is allocated data (flags 0),
//! an unmapped one reads as zeros and writes there may need space (HOLE|ZERO).

use thinvol_engine::format::ThinId;
use thinvol_engine::Pool;

use crate::proto::{STATE_HOLE, STATE_ZERO};

/// Most bytes one reply describes (the request length is only a hint). Keeps the
/// mapping walk bounded and every compact (u32) extent length valid.
pub const MAX_SPAN: u64 = 1 << 30;

/// Extents (length, flags) from `offset` for up to `length` bytes (clipped to `size`
/// and to [`MAX_SPAN`]); adjacent extents differ in flags. With `req_one`, one
/// extent. `offset < size` and `length > 0` are the caller's to check.
pub fn extents(
    pool: &Pool,
    thin: ThinId,
    size: u64,
    offset: u64,
    length: u64,
    req_one: bool,
) -> thinvol_engine::Result<Vec<(u64, u32)>> {
    let bs = pool.block_size();
    let end = offset.saturating_add(length.min(MAX_SPAN)).min(size);
    let maps = pool.mappings_range(thin, offset / bs, end.div_ceil(bs))?;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut push = |len: u64, flags: u32| {
        if len == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += len,
            _ => out.push((len, flags)),
        }
    };
    let mut pos = offset;
    for (vb, _) in maps {
        let start = (vb.0 * bs).max(offset);
        let stop = ((vb.0 + 1) * bs).min(end);
        if start >= stop {
            continue;
        }
        if start > pos {
            push(start - pos, STATE_HOLE | STATE_ZERO);
        }
        push(stop - start, 0);
        pos = stop;
    }
    if end > pos {
        push(end - pos, STATE_HOLE | STATE_ZERO);
    }
    if req_one {
        out.truncate(1);
    }
    Ok(out)
}
