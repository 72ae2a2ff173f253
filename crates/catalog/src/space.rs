//! Space accounting per thin device, as `thin_ls` computes it: a device's mapped blocks
//! whose data block no other mapping (of any device) uses are *exclusive*; the rest are
//! *shared*. Computed from every device's mappings: O(total mappings) time and memory.

use std::collections::{BTreeMap, HashMap};

use thinvol_engine::format::{DataBlock, ThinId, VBlock};
use thinvol_engine::Pool;

use crate::error::Result;

/// Blocks of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceSpace {
    pub mapped_blocks: u64,
    pub exclusive_blocks: u64,
    pub shared_blocks: u64,
}

/// Space of every device of `pool`, by thin id.
pub fn device_space(pool: &Pool) -> Result<BTreeMap<u64, DeviceSpace>> {
    let mut maps: Vec<(u64, Vec<(VBlock, DataBlock)>)> = Vec::new();
    for d in pool.devices()? {
        maps.push((d.id.0, pool.mappings(d.id)?));
    }
    Ok(space_of(&maps))
}

/// The computation, on mappings already read: (thin id, [(virtual, data block)]).
pub fn space_of(maps: &[(u64, Vec<(VBlock, DataBlock)>)]) -> BTreeMap<u64, DeviceSpace> {
    let mut refs: HashMap<u64, u32> = HashMap::new();
    for (_, m) in maps {
        for (_, b) in m {
            *refs.entry(b.0).or_insert(0) += 1;
        }
    }
    maps.iter()
        .map(|(id, m)| {
            let exclusive = m.iter().filter(|(_, b)| refs[&b.0] == 1).count() as u64;
            let mapped = m.len() as u64;
            (
                *id,
                DeviceSpace {
                    mapped_blocks: mapped,
                    exclusive_blocks: exclusive,
                    shared_blocks: mapped - exclusive,
                },
            )
        })
        .collect()
}

/// Space of one device, or zeros if the pool does not have it.
pub fn of(space: &BTreeMap<u64, DeviceSpace>, id: ThinId) -> DeviceSpace {
    space.get(&id.0).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinvol_engine::PoolConfig;

    fn m(pairs: &[(u64, u64)]) -> Vec<(VBlock, DataBlock)> {
        pairs
            .iter()
            .map(|&(v, d)| (VBlock(v), DataBlock(d)))
            .collect()
    }

    #[test]
    fn exclusive_and_shared_from_mappings() {
        let maps = vec![
            (1, m(&[(0, 10), (1, 11), (2, 12)])),
            (2, m(&[(0, 10), (1, 20)])),
            (3, m(&[])),
        ];
        let s = space_of(&maps);
        assert_eq!(
            s[&1],
            DeviceSpace {
                mapped_blocks: 3,
                exclusive_blocks: 2,
                shared_blocks: 1
            }
        );
        assert_eq!(
            s[&2],
            DeviceSpace {
                mapped_blocks: 2,
                exclusive_blocks: 1,
                shared_blocks: 1
            }
        );
        assert_eq!(s[&3], DeviceSpace::default());
        assert_eq!(of(&s, ThinId(9)), DeviceSpace::default());
    }

    #[test]
    fn snapshot_then_write_splits_sharing() {
        let t = tempfile::tempdir().unwrap();
        let cfg = PoolConfig {
            data_size: 16 << 20,
            ..Default::default()
        };
        let p = Pool::create(t.path(), &cfg).unwrap();
        let bs = p.block_size();
        p.create_thin(ThinId(1)).unwrap();
        p.write(ThinId(1), 0, &vec![7u8; 4 * bs as usize]).unwrap();
        p.create_snap(ThinId(2), ThinId(1)).unwrap();
        p.write(ThinId(1), 0, &vec![8u8; bs as usize]).unwrap();
        let s = device_space(&p).unwrap();
        assert_eq!((s[&1].exclusive_blocks, s[&1].shared_blocks), (1, 3));
        assert_eq!((s[&2].exclusive_blocks, s[&2].shared_blocks), (1, 3));
        p.close().unwrap();
    }
}
