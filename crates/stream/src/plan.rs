//! The exact record list of a stream, from metadata alone: the engine delta between
//! base and snapshot (or the snapshot's mappings for a full stream) becomes DATA runs
//! (with the physical data blocks to read), UNMAP runs (mapped in the base, not in the
//! snapshot) and, in full streams, ZERO runs for the unmapped gaps. Record boundaries
//! are deterministic, so the byte count (`send --dry-run`, the progress bar) is exact
//! and a resumed stream regenerates the same records without reading skipped data.

use thinvol_engine::format::ThinId;
use thinvol_engine::{DeltaKind, Pool};

use crate::error::Result;
use crate::format::{
    data_record_len, encode_record, Begin, Body, Part, END_RECORD_LEN, MAX_DATA,
    PART_END_RECORD_LEN, PREAMBLE_LEN, RANGE_RECORD_LEN,
};

/// One record of a part, before its data is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// `len` bytes at volume byte `offset`, read from the data device at the given
    /// (byte offset, length) segments, in order.
    Data {
        offset: u64,
        len: u64,
        src: Vec<(u64, u64)>,
        /// The base's data at the changed blocks: (volume offset, data device byte
        /// offset, length), for deriving the digest while streaming.
        old: Vec<(u64, u64, u64)>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Unmap {
        offset: u64,
        len: u64,
        old: Vec<(u64, u64, u64)>,
    },
}

/// How a part's content digest is obtained.
#[derive(Clone, Debug)]
pub enum PartDigest {
    /// Already known (stored, or computed before streaming).
    Known(Vec<u8>),
    /// Derived while streaming: this base digest (zero for a full stream), minus the
    /// old contents the items name, plus the data sent.
    FromBase(Vec<u8>),
    /// Like `FromBase`, the base being the previous part's snapshot (`--from-each`).
    FromPrevious,
}

/// What to send for one snapshot.
#[derive(Clone, Debug)]
pub struct PartSpec {
    pub volume: String,
    pub volume_uuid: String,
    pub snapshot: String,
    pub snap: thinvol_catalog::Snapshot,
    pub base: Option<(String, thinvol_catalog::Snapshot)>,
}

#[derive(Clone, Debug)]
pub struct PartPlan {
    pub header: Part,
    pub items: Vec<Item>,
    pub zero_bytes: u64,
    pub unmap_bytes: u64,
    /// Content digest of the snapshot (PART_END).
    pub digest: PartDigest,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub begin: Begin,
    pub parts: Vec<PartPlan>,
    /// Exact uncompressed stream length in bytes.
    pub stream_bytes: u64,
    pub stream_id: [u8; 32],
}

fn push_old(old: &mut Vec<(u64, u64, u64)>, offset: u64, phys: Option<u64>, len: u64) {
    let Some(phys) = phys else { return };
    match old.last_mut() {
        Some((o, p, n)) if *o + *n == offset && *p + *n == phys => *n += len,
        _ => old.push((offset, phys, len)),
    }
}

fn push_data(items: &mut Vec<Item>, offset: u64, len: u64, phys: u64, old_phys: Option<u64>) {
    // Extend the previous DATA item when contiguous in the volume and under MAX_DATA.
    if let Some(Item::Data {
        offset: o,
        len: l,
        src,
        old,
    }) = items.last_mut()
    {
        if *o + *l == offset && *l + len <= MAX_DATA {
            *l += len;
            match src.last_mut() {
                Some((p, n)) if *p + *n == phys => *n += len,
                _ => src.push((phys, len)),
            }
            push_old(old, offset, old_phys, len);
            return;
        }
    }
    let mut old = Vec::new();
    push_old(&mut old, offset, old_phys, len);
    items.push(Item::Data {
        offset,
        len,
        src: vec![(phys, len)],
        old,
    });
}

fn push_range(items: &mut Vec<Item>, zero: bool, offset: u64, len: u64, old_phys: Option<u64>) {
    if len == 0 {
        return;
    }
    match items.last_mut() {
        Some(Item::Zero { offset: o, len: l }) if zero && *o + *l == offset => *l += len,
        Some(Item::Unmap {
            offset: o,
            len: l,
            old,
        }) if !zero && *o + *l == offset => {
            *l += len;
            push_old(old, offset, old_phys, len);
        }
        _ => items.push(if zero {
            Item::Zero { offset, len }
        } else {
            let mut old = Vec::new();
            push_old(&mut old, offset, old_phys, len);
            Item::Unmap { offset, len, old }
        }),
    }
}

/// Add a mapped block `vb` (physical `pb`) clipped to `size`, split at MAX_DATA.
fn push_block(items: &mut Vec<Item>, bs: u64, size: u64, vb: u64, pb: u64, old: Option<u64>) {
    let off = vb * bs;
    if off >= size {
        return;
    }
    let len = bs.min(size - off);
    let mut done = 0;
    while done < len {
        let n = (MAX_DATA - (off + done) % MAX_DATA).min(len - done);
        push_data(
            items,
            off + done,
            n,
            pb * bs + done,
            old.map(|o| o * bs + done),
        );
        done += n;
    }
}

/// The items of one part.
pub fn part_items(pool: &Pool, spec: &PartSpec) -> Result<Vec<Item>> {
    let bs = pool.block_size();
    let size = spec.snap.size;
    let mut items = Vec::new();
    match &spec.base {
        None => {
            let mut pos = 0u64;
            for (vb, pb) in pool.mappings_range(ThinId(spec.snap.thin_id), 0, size.div_ceil(bs))? {
                let off = vb.0 * bs;
                if off >= size {
                    break;
                }
                push_range(&mut items, true, pos, off - pos, None);
                push_block(&mut items, bs, size, vb.0, pb.0, None);
                pos = (off + bs).min(size);
            }
            push_range(&mut items, true, pos, size - pos, None);
        }
        Some((_, b)) => {
            let (deltas, _) = pool.delta(ThinId(b.thin_id), ThinId(spec.snap.thin_id), false)?;
            for d in deltas {
                let off = d.vblock * bs;
                if off >= size {
                    break;
                }
                let old = d.left.map(|b| b.0);
                match (d.kind(), d.right) {
                    (DeltaKind::Different | DeltaKind::RightOnly, Some(pb)) => {
                        push_block(&mut items, bs, size, d.vblock, pb.0, old)
                    }
                    (DeltaKind::LeftOnly, _) => push_range(
                        &mut items,
                        false,
                        off,
                        bs.min(size - off),
                        old.map(|o| o * bs),
                    ),
                    _ => {}
                }
            }
            // A shrunk volume: the receiver drops what lies beyond the new end itself.
        }
    }
    Ok(items)
}

fn item_len(i: &Item) -> u64 {
    match i {
        Item::Data { len, .. } => data_record_len(*len),
        _ => RANGE_RECORD_LEN,
    }
}

/// Identity of a stream: BLAKE3 of the BEGIN payload and every PART payload.
pub fn stream_id(begin: &Begin, parts: &[Part]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("thinvol stream id v1");
    h.update(&begin.payload());
    for p in parts {
        h.update(&p.payload());
    }
    *h.finalize().as_bytes()
}

/// Identity of a stream known only up to its first PARTs (a receiver interrupted
/// before the last PART): BLAKE3 of BEGIN and the known PARTs, marked as a prefix.
pub fn prefix_id(b: &Begin, parts: &[Part]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("thinvol stream prefix v1");
    h.update(&b.payload());
    h.update(&(parts.len() as u64).to_le_bytes());
    for p in parts {
        h.update(&p.payload());
    }
    *h.finalize().as_bytes()
}

impl Plan {
    /// Whether a resume token's stream id names this stream (whole, or the prefix a
    /// receiver knew when it stopped).
    pub fn matches_id(&self, id: &[u8; 32]) -> bool {
        if *id == self.stream_id {
            return true;
        }
        let headers: Vec<Part> = self.parts.iter().map(|p| p.header.clone()).collect();
        (0..headers.len()).any(|k| prefix_id(&self.begin, &headers[..k]) == *id)
    }
}

/// Build the full plan. `digests` gives each part's snapshot digest bytes.
pub fn build(
    pool: &Pool,
    pool_uuid: &str,
    pool_name: &str,
    flags: u32,
    specs: &[PartSpec],
    digests: Vec<PartDigest>,
) -> Result<Plan> {
    let bs = pool.block_size();
    let mut parts = Vec::new();
    for ((i, spec), digest) in specs.iter().enumerate().zip(digests) {
        let items = part_items(pool, spec)?;
        let mut data_bytes = 0;
        let mut zero_bytes = 0;
        let mut unmap_bytes = 0;
        for it in &items {
            match it {
                Item::Data { len, .. } => data_bytes += len,
                Item::Zero { len, .. } => zero_bytes += len,
                Item::Unmap { len, .. } => unmap_bytes += len,
            }
        }
        let (base, base_uuid) = spec
            .base
            .as_ref()
            .map(|(n, s)| (n.clone(), s.uuid.clone()))
            .unwrap_or_default();
        let header = Part {
            index: i as u32,
            volume: spec.volume.clone(),
            volume_uuid: spec.volume_uuid.clone(),
            snapshot: spec.snapshot.clone(),
            snapshot_uuid: spec.snap.uuid.clone(),
            created: spec.snap.created,
            group: spec.snap.group.clone().unwrap_or_default(),
            base,
            base_uuid,
            block_size: bs,
            volume_size: spec.snap.size,
            data_bytes,
            nr_records: items.len() as u64 + 2,
        };
        parts.push(PartPlan {
            header,
            items,
            zero_bytes,
            unmap_bytes,
            digest,
        });
    }
    let begin = Begin {
        flags,
        pool_uuid: pool_uuid.to_string(),
        pool_name: pool_name.to_string(),
        nr_parts: parts.len() as u32,
        nr_records: 3 + parts.iter().map(|p| p.header.nr_records).sum::<u64>(),
        data_bytes: parts.iter().map(|p| p.header.data_bytes).sum(),
    };
    let mut bytes = PREAMBLE_LEN as u64
        + encode_record(0, &Body::Begin(begin.clone())).len() as u64
        + encode_record(1, &Body::Info(info())).len() as u64
        + END_RECORD_LEN;
    for p in &parts {
        bytes += encode_record(0, &Body::Part(p.header.clone())).len() as u64;
        bytes += p.items.iter().map(item_len).sum::<u64>();
        bytes += PART_END_RECORD_LEN;
    }
    let headers: Vec<Part> = parts.iter().map(|p| p.header.clone()).collect();
    let id = stream_id(&begin, &headers);
    Ok(Plan {
        begin,
        parts,
        stream_bytes: bytes,
        stream_id: id,
    })
}

/// The optional INFO record's text (fixed per version so the length is exact).
pub fn info() -> String {
    format!("thinvol {}", env!("CARGO_PKG_VERSION"))
}
