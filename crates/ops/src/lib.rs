//! Operations built on the engine that front ends share: copying images into and out of
//! thin devices (sparse-aware), the same by name ([`image`]: import, export,
//! write-image), and the end-to-end demo scenario.

pub mod copy;
pub mod demo;
pub mod image;
pub mod progress;

pub use progress::{NoProgress, Progress};
