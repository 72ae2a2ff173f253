//! On cold metadata the delta walk asks for the child nodes it is about to read all at
//! once (`Storage::prefetch`), so their reads overlap. Here the metadata device is slow
//! (every read sleeps, as a disk would), and the test checks that the hints were given,
//! that each hinted block was then really read (no reads wasted on shared subtrees),
//! and that the result is the same as on a fast device.

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use thinvol_engine::format::{DataBlockSize, ThinId};
use thinvol_engine::storage::{FileStorage, MemStorage, Storage};
use thinvol_engine::{DeltaKind, OpenOptions, Pool};

const META_BLOCK: u64 = 4096;
const BS: u64 = 64 << 10;

/// Metadata storage that can be made slow, and records reads and prefetch hints.
#[derive(Debug)]
struct Recording {
    inner: MemStorage,
    slow: AtomicBool,
    reads: Mutex<Vec<u64>>,
    hints: Mutex<Vec<(u64, u64)>>,
}

impl Storage for Recording {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.slow.load(Ordering::Relaxed) {
            let b = offset / META_BLOCK;
            // Like a disk under a page cache: a block hinted before is there at once.
            let hinted = (self.hints.lock().unwrap().iter())
                .any(|&(off, len)| (off..off + len).contains(&offset));
            if !hinted {
                std::thread::sleep(Duration::from_micros(100));
            }
            self.reads.lock().unwrap().push(b);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn grow(&self, len: u64) -> io::Result<()> {
        self.inner.grow(len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) {
        self.hints.lock().unwrap().push((offset, len));
    }
}

#[test]
fn cold_delta_prefetches_exactly_the_nodes_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Arc::new(Recording {
        inner: MemStorage::new(32 << 20),
        slow: AtomicBool::new(false),
        reads: Mutex::new(Vec::new()),
        hints: Mutex::new(Vec::new()),
    });
    // Enough for three levels (root, internal nodes, leaves), so that hints also
    // have to reach the leaves under internal nodes that were themselves hinted.
    const MAPPED: u64 = 80_000;
    let data: Arc<dyn Storage> =
        Arc::new(FileStorage::create(&dir.path().join("data"), (MAPPED + 1000) * BS).unwrap());
    let pool = Pool::format_on(
        meta.clone(),
        data.clone(),
        DataBlockSize::DEFAULT,
        Duration::ZERO,
        None,
    )
    .unwrap();
    pool.create_thin(ThinId(0)).unwrap();
    for vb in 0..MAPPED {
        pool.write(ThinId(0), vb * BS, &vb.to_le_bytes()).unwrap();
    }
    pool.create_snap(ThinId(1), ThinId(0)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut changed = BTreeSet::new();
    // Changes in the first third only: the leaves over the rest stay shared, and
    // must be neither read nor hinted.
    while changed.len() < 600 {
        changed.insert(rng.gen_range(0..MAPPED / 3));
    }
    for &vb in &changed {
        pool.write(ThinId(0), vb * BS, b"changed").unwrap();
    }
    pool.close().unwrap();

    let check = |deltas: &[thinvol_engine::BlockDelta]| {
        let got: BTreeSet<u64> = deltas.iter().map(|d| d.vblock).collect();
        assert_eq!(got, changed, "delta reports other blocks than were changed");
        assert!(deltas.iter().all(|d| d.kind() == DeltaKind::Different));
    };

    // Fast device (whether it hints depends on timing: not checked).
    let pool = Pool::open_on(meta.clone(), data.clone(), &OpenOptions::default()).unwrap();
    let (fast, _) = pool.delta(ThinId(1), ThinId(0), false).unwrap();
    check(&fast);
    pool.close().unwrap();

    // Slow device, reopened so no node is in memory.
    let pool = Pool::open_on(meta.clone(), data.clone(), &OpenOptions::default()).unwrap();
    meta.slow.store(true, Ordering::Relaxed);
    meta.hints.lock().unwrap().clear();
    let (slow, stats) = pool.delta(ThinId(1), ThinId(0), false).unwrap();
    meta.slow.store(false, Ordering::Relaxed);
    assert_eq!(slow, fast);
    assert!(
        stats.nodes_prefetched > 0,
        "no hints on cold metadata: {stats:?}"
    );
    assert!(
        stats.subtrees_skipped > 0,
        "the test wants shared leaves: {stats:?}"
    );
    // Every node but the two roots was hinted: the hints also reached the leaves under
    // internal nodes that were themselves hinted (and hence fast to read).
    let unhinted = stats.nodes_read - stats.nodes_prefetched;
    assert!(
        unhinted <= 2,
        "{unhinted} nodes read without a hint: {stats:?}"
    );

    let reads: BTreeSet<u64> = meta.reads.lock().unwrap().iter().copied().collect();
    let hinted: BTreeSet<u64> = meta
        .hints
        .lock()
        .unwrap()
        .iter()
        .flat_map(|&(off, len)| off / META_BLOCK..(off + len) / META_BLOCK)
        .collect();
    assert_eq!(
        hinted.len() as u64,
        stats.nodes_prefetched,
        "hinted blocks vs stats"
    );
    let wasted: Vec<_> = hinted.difference(&reads).collect();
    assert!(wasted.is_empty(), "hinted but never read: {wasted:?}");
    pool.close().unwrap();
}
