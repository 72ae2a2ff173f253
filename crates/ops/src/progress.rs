//! Progress reporting seam: the library reports, front ends draw.

/// Receives progress of long operations. `total` is known up front (sizes come from
/// metadata), so front ends can show an exact bar.
pub trait Progress {
    fn start(&mut self, _what: &str, _total_bytes: u64) {}
    fn advance(&mut self, _bytes: u64) {}
    fn finish(&mut self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
