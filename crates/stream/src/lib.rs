//! thinvol send/receive (docs/stream-format.md, docs/design.md "Send and receive").
//!
//! * [`format`]: the stream codec (pure); [`reader`]: records from a byte stream.
//! * [`plan`]: the exact record list from the metadata delta; [`send`]: writing it.
//! * [`receive`]: into a pool (hidden device, checkpoints, atomic publish);
//!   [`file_target`]: into a raw file or block device (sidecar state, undo journal).
//! * [`token`]: resume tokens; [`digest`]: per-snapshot content digests in O(change);
//!   [`verify`]: comparing a replica with its source; [`ssh`]: the ssh transport.

pub mod chunk_cache;
pub mod digest;
pub mod digest_worker;
pub mod error;
pub mod file_target;
pub mod format;
#[doc(hidden)]
pub mod fuzz_support;
pub mod plan;
pub mod reader;
pub mod receive;
pub mod send;
pub mod token;
pub mod writeback;

pub use error::{FormatError, Result, StreamError};
