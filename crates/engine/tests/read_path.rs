//! The read path's shortcuts (shared metadata lock, cached bottom roots, the per-device
//! mapping cache) never return a stale mapping: every operation that changes a mapping
//! — provisioning, copy-on-write after a snapshot, discard, delete and re-create,
//! `transaction` (committed or aborted) — is followed by reads of every affected
//! block. Debug builds additionally compare every cache hit with the B-tree. And a read
//! in flight never sees its block freed and reused by another device, nor mixed bytes
//! of a racing in-place rewrite, discard, copy-on-write or `transaction`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thinvol_engine::format::{DataBlockSize, ThinId, VBlock};
use thinvol_engine::storage::{MemStorage, Storage};
use thinvol_engine::{default_metadata_size, Error, Pool, PoolConfig};

const BS: u64 = 65536;

fn pool(dir: &std::path::Path, blocks: u64) -> Pool {
    Pool::create(
        &dir.join("pool"),
        &PoolConfig {
            data_size: blocks * BS,
            commit_interval: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Block `vb` of `id` holds `tag` in every byte (0 = unmapped or discarded).
fn expect(p: &Pool, id: u64, vb: u64, tag: u8) {
    let mut b = vec![0xEEu8; BS as usize];
    p.read(ThinId(id), vb * BS, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == tag),
        "device {id} block {vb}: expected {tag:#x}, found {:#x}",
        b.iter().find(|&&x| x != tag).copied().unwrap_or(0)
    );
}

fn fill(p: &Pool, id: u64, vb: u64, tag: u8) {
    p.write(ThinId(id), vb * BS, &vec![tag; BS as usize])
        .unwrap();
}

#[test]
fn every_mapping_change_is_seen_by_reads() {
    let t = tempfile::tempdir().unwrap();
    let p = pool(t.path(), 512);
    p.create_thin(ThinId(1)).unwrap();
    for vb in 0..40 {
        fill(&p, 1, vb, 0x11);
    }
    for vb in 0..40 {
        expect(&p, 1, vb, 0x11); // fills the mapping cache
    }
    expect(&p, 1, 1000, 0);

    // Copy-on-write after a snapshot: the origin gets new blocks, the snapshot keeps
    // the old ones; both were read (cached) before.
    p.create_snap(ThinId(2), ThinId(1)).unwrap();
    expect(&p, 2, 3, 0x11);
    for vb in (0..40).step_by(3) {
        fill(&p, 1, vb, 0x22);
    }
    for vb in 0..40 {
        expect(&p, 1, vb, if vb % 3 == 0 { 0x22 } else { 0x11 });
        expect(&p, 2, vb, 0x11);
    }
    // Partial write into a shared block (copy + merge).
    p.write(ThinId(2), 5 * BS + 4096, &[0x33; 4096]).unwrap();
    let mut b = vec![0u8; BS as usize];
    p.read(ThinId(2), 5 * BS, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0x11));
    assert!(b[4096..8192].iter().all(|&x| x == 0x33));
    assert!(b[8192..].iter().all(|&x| x == 0x11));
    expect(&p, 1, 5, 0x11);

    // Discard: whole blocks unmapped.
    p.discard(ThinId(1), 6 * BS, 3 * BS).unwrap();
    for vb in 6..9 {
        expect(&p, 1, vb, 0);
        expect(&p, 2, vb, 0x11);
    }
    fill(&p, 1, 7, 0x44);
    expect(&p, 1, 7, 0x44);
    p.commit().unwrap();
    for vb in (0..40).filter(|&vb| vb != 5) {
        expect(&p, 2, vb, 0x11);
    }

    // Delete and re-create the same id: nothing of the old device may show through.
    p.delete_thin(ThinId(2)).unwrap();
    assert!(matches!(
        p.read(ThinId(2), 0, &mut b),
        Err(Error::NoSuchDevice(_))
    ));
    p.create_thin(ThinId(2)).unwrap();
    for vb in 0..40 {
        expect(&p, 2, vb, 0);
    }
    // Re-created as a snapshot of another device.
    p.delete_thin(ThinId(2)).unwrap();
    p.create_snap(ThinId(2), ThinId(1)).unwrap();
    for vb in 0..40 {
        let want = match vb {
            6 | 8 => 0,
            7 => 0x44,
            v if v % 3 == 0 => 0x22,
            _ => 0x11,
        };
        expect(&p, 2, vb, want);
        expect(&p, 1, vb, want);
    }

    // A transaction that deletes and re-creates, then one that aborts after doing so.
    p.transaction(|tx| {
        tx.delete(ThinId(2))?;
        tx.create_thin(ThinId(2))
    })
    .unwrap();
    for vb in 0..40 {
        expect(&p, 2, vb, 0);
    }
    fill(&p, 2, 1, 0x55);
    expect(&p, 2, 1, 0x55);
    let r: Result<(), Error> = p.transaction(|tx| {
        tx.delete(ThinId(2))?;
        tx.create_snap(ThinId(2), ThinId(1))?;
        tx.create_thin(ThinId(1)) // exists: aborts
    });
    assert!(matches!(r, Err(Error::DeviceExists(_))));
    expect(&p, 2, 1, 0x55);
    expect(&p, 2, 2, 0);
    assert_eq!(p.mappings(ThinId(2)).unwrap().len(), 1);
    assert_eq!(p.mappings(ThinId(2)).unwrap()[0].0, VBlock(1));
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn reads_survive_reopen_and_many_devices() {
    let t = tempfile::tempdir().unwrap();
    let p = pool(t.path(), 1024);
    for id in 0..20u64 {
        p.create_thin(ThinId(id)).unwrap();
        for vb in 0..10 {
            fill(&p, id, vb * 7, id as u8 + 1);
        }
    }
    for id in 0..20u64 {
        for vb in 0..70 {
            expect(&p, id, vb, if vb % 7 == 0 { id as u8 + 1 } else { 0 });
        }
    }
    p.close().unwrap();
    let p = Pool::open(&t.path().join("pool")).unwrap();
    for id in (0..20u64).rev() {
        for vb in 0..70 {
            expect(&p, id, vb, if vb % 7 == 0 { id as u8 + 1 } else { 0 });
        }
    }
}

/// A data device whose reads take a while, in two halves: a write racing with a read
/// shows up as mixed bytes.
#[derive(Debug)]
struct SlowReads(MemStorage);

impl Storage for SlowReads {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let half = buf.len() / 2;
        self.0.read_at(&mut buf[..half], offset)?;
        std::thread::sleep(Duration::from_micros(300));
        self.0.read_at(&mut buf[half..], offset + half as u64)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn grow(&self, len: u64) -> std::io::Result<()> {
        self.0.grow(len)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len)
    }
}

/// Readers of device A race with deleting A, committing, and reusing A's freed blocks
/// for device B: a read returns A's bytes or fails with NoSuchDevice, never B's bytes.
#[test]
fn delete_waits_for_reads_in_flight() {
    let blocks = 64u64;
    let block = DataBlockSize::DEFAULT;
    let p = Pool::format_on(
        Arc::new(MemStorage::new(default_metadata_size(blocks * BS, block))),
        Arc::new(SlowReads(MemStorage::new(blocks * BS))),
        block,
        Duration::ZERO,
        None,
    )
    .unwrap();
    for round in 0..20u64 {
        let (a, b) = (2 * round + 1, 2 * round + 2);
        p.create_thin(ThinId(a)).unwrap();
        for vb in 0..blocks / 2 {
            fill(&p, a, vb, 0xAA);
        }
        p.commit().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (p, stop, reads) = (p.clone(), stop.clone(), reads.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; BS as usize];
                    let mut vb = r;
                    while !stop.load(Ordering::Relaxed) {
                        match p.read(ThinId(a), (vb % (blocks / 2)) * BS, &mut buf) {
                            Ok(()) => {
                                assert!(
                                    buf.iter().all(|&x| x == 0xAA),
                                    "read another device's data"
                                );
                                reads.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(Error::NoSuchDevice(_)) => {}
                            Err(e) => panic!("{e}"),
                        }
                        vb += 1;
                    }
                })
            })
            .collect();
        while reads.load(Ordering::Relaxed) < 10 {
            std::thread::yield_now();
        }
        p.delete_thin(ThinId(a)).unwrap();
        p.commit().unwrap();
        p.create_thin(ThinId(b)).unwrap();
        for vb in 0..blocks / 2 {
            fill(&p, b, vb, 0xBB);
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        p.delete_thin(ThinId(b)).unwrap();
        p.commit().unwrap();
    }
    assert!(p.check().unwrap().is_clean());
}

/// Metadata storage whose writes and flushes can be made to fail.
#[derive(Debug)]
struct Failing(MemStorage, AtomicBool);

impl Storage for Failing {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.1.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("injected write failure"));
        }
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self.1.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("injected flush failure"));
        }
        self.0.flush()
    }
    fn grow(&self, len: u64) -> std::io::Result<()> {
        self.0.grow(len)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len)
    }
}

/// After a failed commit poisons the pool, reads fail too — also of blocks whose
/// mappings the read path has cached.
#[test]
fn poisoned_pool_refuses_cached_reads() {
    let blocks = 64u64;
    let block = DataBlockSize::DEFAULT;
    let meta = Arc::new(Failing(
        MemStorage::new(default_metadata_size(blocks * BS, block)),
        AtomicBool::new(false),
    ));
    let p = Pool::format_on(
        meta.clone(),
        Arc::new(MemStorage::new(blocks * BS)),
        block,
        Duration::ZERO,
        None,
    )
    .unwrap();
    p.create_thin(ThinId(1)).unwrap();
    for vb in 0..8 {
        fill(&p, 1, vb, 0x66);
    }
    p.commit().unwrap();
    for _ in 0..2 {
        for vb in 0..10 {
            expect(&p, 1, vb, if vb < 8 { 0x66 } else { 0 });
        }
    }
    fill(&p, 1, 9, 0x77);
    meta.1.store(true, Ordering::Relaxed);
    assert!(p.commit().is_err());
    let mut b = vec![0u8; BS as usize];
    for vb in 0..10 {
        assert!(
            matches!(p.read(ThinId(1), vb * BS, &mut b), Err(Error::Poisoned(_))),
            "block {vb}"
        );
    }
}

/// A data device that reads and writes in two halves with a pause in between, so that
/// a read racing a write of the same range sees mixed bytes unless the engine stops it.
#[derive(Debug)]
struct SplitIo(MemStorage);

impl Storage for SplitIo {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let half = buf.len() / 2;
        self.0.read_at(&mut buf[..half], offset)?;
        std::thread::yield_now();
        self.0.read_at(&mut buf[half..], offset + half as u64)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let half = buf.len() / 2;
        self.0.write_at(&buf[..half], offset)?;
        std::thread::yield_now();
        self.0.write_at(&buf[half..], offset + half as u64)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn grow(&self, len: u64) -> std::io::Result<()> {
        self.0.grow(len)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len)
    }
}

fn split_pool(blocks: u64) -> Pool {
    let block = DataBlockSize::DEFAULT;
    Pool::format_on(
        Arc::new(MemStorage::new(default_metadata_size(blocks * BS, block))),
        Arc::new(SplitIo(MemStorage::new(blocks * BS))),
        block,
        Duration::ZERO,
        None,
    )
    .unwrap()
}

/// While a writer rewrites blocks in place with ever new patterns, readers of whole
/// blocks and of 4 KiB pieces only ever see one whole pattern — also the reads the
/// stripe cache answers, and on a device that splits every I/O in two (so a read path
/// that let a write overlap its data read, e.g. an optimistic one that failed to
/// detect it, would show mixed bytes here).
#[test]
fn reads_never_see_a_torn_rewrite() {
    let p = split_pool(64);
    p.create_thin(ThinId(1)).unwrap();
    for vb in 0..4 {
        fill(&p, 1, vb, 1);
    }
    p.commit().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut v = 2u8;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // In place: the blocks are provisioned and not shared.
                fill(&p, 1, n % 4, v);
                v = v.wrapping_add(1).max(1);
                n += 1;
            }
            n
        })
    };
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut whole = vec![0u8; BS as usize];
                let mut piece = vec![0u8; 4096];
                for i in 0..4000u64 {
                    let vb = (i + r) % 4;
                    p.read(ThinId(1), vb * BS, &mut whole).unwrap();
                    assert!(
                        whole.iter().all(|&x| x == whole[0] && x != 0),
                        "torn block read: {:#x} vs {:#x}",
                        whole[0],
                        whole.iter().find(|&&x| x != whole[0]).copied().unwrap_or(0)
                    );
                    // 4 KiB straddling the middle, where the device splits its I/O.
                    p.read(ThinId(1), vb * BS + BS / 2 - 2048, &mut piece)
                        .unwrap();
                    assert!(
                        piece.iter().all(|&x| x == piece[0] && x != 0),
                        "torn 4 KiB read"
                    );
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    assert!(p.check().unwrap().is_clean());
}

/// Reads racing every other kind of mapping change on the same blocks: snapshot +
/// copy-on-write, discard, re-provisioning freed blocks, deleting the snapshot, and
/// `transaction`. A read of the origin returns one whole pattern or zeros (discarded),
/// a read of the snapshot one whole pattern or NoSuchDevice.
#[test]
fn reads_race_snapshot_discard_delete() {
    let p = split_pool(128);
    p.create_thin(ThinId(1)).unwrap();
    for vb in 0..4 {
        fill(&p, 1, vb, 1);
    }
    p.commit().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let changer = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut v = 2u8;
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                p.create_snap(ThinId(2), ThinId(1)).unwrap();
                for vb in 0..4 {
                    fill(&p, 1, vb, v); // copy-on-write
                }
                p.discard(ThinId(1), 0, 2 * BS).unwrap();
                p.delete_thin(ThinId(2)).unwrap();
                p.commit().unwrap();
                for vb in 0..2 {
                    fill(&p, 1, vb, v); // re-provision freed blocks
                }
                p.transaction(|tx| {
                    tx.create_snap(ThinId(3), ThinId(1))?;
                    tx.delete(ThinId(3))
                })
                .unwrap();
                v = v.wrapping_add(1).max(1);
                rounds += 1;
            }
            rounds
        })
    };
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; BS as usize];
                for i in 0..3000u64 {
                    let vb = (i + r) % 4;
                    p.read(ThinId(1), vb * BS, &mut buf).unwrap();
                    assert!(
                        buf.iter().all(|&x| x == buf[0]),
                        "torn origin read of block {vb}"
                    );
                    match p.read(ThinId(2), vb * BS, &mut buf) {
                        Ok(()) => assert!(
                            buf.iter().all(|&x| x == buf[0] && x != 0),
                            "torn or zero snapshot read of block {vb}"
                        ),
                        Err(Error::NoSuchDevice(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(changer.join().unwrap() > 0);
    assert!(p.check().unwrap().is_clean());
}
