//! Device-details tree values (`struct disk_device_details`, 24 bytes).
//!
//! ```text
//! 0   u64 mapped_blocks       exact number of mappings of the device
//! 8   u64 transaction_id      pool trans_id when the device was created
//! 16  u32 creation_time       pool time at creation
//! 20  u32 snapshotted_time    pool time when last snapshotted (or created)
//! ```

use crate::le;

pub const MAPPED_BLOCKS_OFFSET: usize = 0;
pub const TRANSACTION_ID_OFFSET: usize = MAPPED_BLOCKS_OFFSET + 8;
pub const CREATION_TIME_OFFSET: usize = TRANSACTION_ID_OFFSET + 8;
pub const SNAPSHOTTED_TIME_OFFSET: usize = CREATION_TIME_OFFSET + 4;
pub const DEVICE_DETAILS_SIZE: usize = SNAPSHOTTED_TIME_OFFSET + 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeviceDetails {
    pub mapped_blocks: u64,
    pub transaction_id: u64,
    pub creation_time: u32,
    pub snapshotted_time: u32,
}

impl DeviceDetails {
    pub fn pack(&self) -> [u8; DEVICE_DETAILS_SIZE] {
        let mut b = [0u8; DEVICE_DETAILS_SIZE];
        le::put_u64(&mut b, MAPPED_BLOCKS_OFFSET, self.mapped_blocks);
        le::put_u64(&mut b, TRANSACTION_ID_OFFSET, self.transaction_id);
        le::put_u32(&mut b, CREATION_TIME_OFFSET, self.creation_time);
        le::put_u32(&mut b, SNAPSHOTTED_TIME_OFFSET, self.snapshotted_time);
        b
    }

    /// None if `b` is shorter than 24 bytes.
    pub fn unpack(b: &[u8]) -> Option<Self> {
        Some(DeviceDetails {
            mapped_blocks: le::u64_at(b, MAPPED_BLOCKS_OFFSET)?,
            transaction_id: le::u64_at(b, TRANSACTION_ID_OFFSET)?,
            creation_time: le::u32_at(b, CREATION_TIME_OFFSET)?,
            snapshotted_time: le::u32_at(b, SNAPSHOTTED_TIME_OFFSET)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let d = DeviceDetails {
            mapped_blocks: 400,
            transaction_id: 7,
            creation_time: 1,
            snapshotted_time: 2,
        };
        assert_eq!(DeviceDetails::unpack(&d.pack()), Some(d));
        assert_eq!(DeviceDetails::unpack(&[0u8; 23]), None);
    }
}
