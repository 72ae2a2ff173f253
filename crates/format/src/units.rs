//! Newtypes for the kinds of numbers the format mixes, so they cannot be confused:
//! metadata block numbers, data block numbers, virtual (thin) block numbers, thin
//! device ids, 512-byte sectors and bytes.

use std::fmt;

macro_rules! unit {
    ($(#[$m:meta])* $name:ident, $inner:ty) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

unit!(
    /// A 4 KiB block of the metadata device. Block 0 is the superblock.
    MetaBlock, u64
);
unit!(
    /// A block of the data device, in units of the pool's data block size.
    DataBlock, u64
);
unit!(
    /// A block of a thin device's virtual address space (data block sized).
    VBlock, u64
);
unit!(
    /// A thin device id; dm-thin accepts 0 ..= 2^24 - 1 (`MAX_DEV_ID`).
    ThinId, u64
);
unit!(
    /// 512-byte sectors.
    Sectors, u64
);
unit!(
    /// Bytes.
    Bytes, u64
);

/// Largest thin device id dm-thin accepts (`MAX_DEV_ID` in dm-thin.c: 24 bits).
pub const MAX_THIN_ID: u64 = (1 << 24) - 1;

/// Largest data block number a mapping can hold (40 bits, `pack_block_time`).
pub const MAX_DATA_BLOCK: u64 = (1 << 40) - 1;

/// Largest pool time a mapping can hold (24 bits).
pub const MAX_TIME: u32 = (1 << 24) - 1;

/// Data block size bounds, in sectors (`DATA_DEV_BLOCK_SIZE_{MIN,MAX}_SECTORS`).
pub const MIN_DATA_BLOCK_SECTORS: u32 = 128;
pub const MAX_DATA_BLOCK_SECTORS: u32 = 2_097_152;

impl Sectors {
    pub fn bytes(self) -> Bytes {
        Bytes(self.0 * 512)
    }
}

impl ThinId {
    pub fn is_valid(self) -> bool {
        self.0 <= MAX_THIN_ID
    }
}

/// A data block size known to be valid for dm-thin: 64 KiB ..= 1 GiB, a multiple of
/// 64 KiB (128 sectors). Only valid values can be constructed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DataBlockSize(u32);

impl DataBlockSize {
    pub const DEFAULT: DataBlockSize = DataBlockSize(128);

    pub fn from_sectors(s: u32) -> Option<Self> {
        (MIN_DATA_BLOCK_SECTORS..=MAX_DATA_BLOCK_SECTORS)
            .contains(&s)
            .then_some(s)
            .filter(|s| s % 128 == 0)
            .map(DataBlockSize)
    }

    pub fn from_bytes(b: u64) -> Option<Self> {
        if !b.is_multiple_of(512) {
            return None;
        }
        u32::try_from(b / 512).ok().and_then(Self::from_sectors)
    }

    pub fn sectors(self) -> u32 {
        self.0
    }

    pub fn bytes(self) -> u64 {
        u64::from(self.0) * 512
    }
}

/// Human-readable byte count with binary units ("1.5 GiB").
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parse "64K", "64KiB", "1G", "512", "1.5GiB", "4096b", "8s" (sectors) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "s" => 512,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        _ => return None,
    };
    if num.contains('.') {
        let v: f64 = num.parse().ok()?;
        let r = v * mult as f64;
        (r.is_finite() && r >= 0.0 && r < u64::MAX as f64).then_some(r as u64)
    } else {
        num.parse::<u64>().ok()?.checked_mul(mult)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_block_size_bounds() {
        assert!(DataBlockSize::from_sectors(128).is_some());
        assert!(DataBlockSize::from_sectors(64).is_none());
        assert!(DataBlockSize::from_sectors(192).is_none());
        assert!(DataBlockSize::from_sectors(256).is_some());
        assert!(DataBlockSize::from_bytes(1 << 30).is_some());
        assert!(DataBlockSize::from_bytes(2 << 30).is_none());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("x"), None);
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(10), "10 B");
    }
}
