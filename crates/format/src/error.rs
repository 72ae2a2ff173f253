//! Typed validation errors. Each names the block and what is wrong with it, so a
//! report can say "metadata block 1234 (btree node): checksum mismatch".

use crate::checksum::BlockKind;
use crate::MetaBlock;
use thiserror::Error;

/// Why a block failed validation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NodeError {
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("block records location {recorded}, but was read from {actual}")]
    BlockNrMismatch { recorded: u64, actual: u64 },
    #[error("bad magic {0}")]
    BadMagic(u64),
    #[error("unsupported version {0}")]
    BadVersion(u32),
    #[error("unsupported feature flags: {0}")]
    UnsupportedFeatures(String),
    #[error("node flags {0:#x} are neither internal nor leaf")]
    BadFlags(u32),
    #[error("max_entries {max_entries} with value size {value_size} does not fit a block")]
    MaxEntriesTooLarge { max_entries: u32, value_size: u32 },
    #[error("nr_entries {nr} exceeds max_entries {max}")]
    TooManyEntries { nr: u32, max: u32 },
    #[error("value size {found}, expected {expected}")]
    ValueSizeMismatch { found: u32, expected: u32 },
    #[error("internal node has value size {0}, expected 8")]
    InternalValueSize(u32),
    #[error("keys out of order at entry {0}")]
    KeysOutOfOrder(usize),
    #[error("{0}")]
    Other(String),
}

/// A validation error bound to the block it was found in.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("metadata block {block} ({kind}): {reason}", kind = .kind.name())]
pub struct FormatError {
    pub block: MetaBlock,
    pub kind: BlockKind,
    pub reason: NodeError,
}

impl FormatError {
    pub fn new(block: MetaBlock, kind: BlockKind, reason: NodeError) -> Self {
        FormatError {
            block,
            kind,
            reason,
        }
    }
}
