//! Power-loss simulator, in the style of redb's crash-consistency test backend.
//!
//! A [`CrashSim`] is the shared "power supply" of one or more [`CrashStorage`]
//! devices (typically the pool's metadata and data devices), so a crash cuts every
//! device at the same instant.
//!
//! # Model
//! Each device keeps two images:
//! * `durable`: what is guaranteed to survive power loss;
//! * `live`: what reads return, i.e. `durable` with every pending operation applied
//!   in issue order.
//!
//! `write_at` and `discard` append to the device's list of *pending* operations;
//! `flush` makes that device's pending operations durable (other devices are not
//! affected: ordering across devices exists only through flushes, as on real
//! hardware). `grow` is modelled as a durable metadata operation: both images are
//! extended with zeros at once, and it is not an event.
//!
//! # Events and crashes
//! Every `write_at`, `discard` and `flush` on any device of a sim is an *event* and
//! gets the next global sequence number, starting at 0. [`CrashSim::events`] is the
//! number of events that have taken effect. After [`CrashSim::set_crash_after`]`(n)`,
//! events `0..n` succeed and event `n` puts the sim into the crashed state: that
//! operation has no effect, and it and every later operation on every device (reads,
//! `len` and `grow` included) fail with `io::ErrorKind::Other`, "simulated power
//! loss", like a device that vanished. A test can run a workload once to count its
//! events `N`, then replay it with a crash at each `n` in `0..N`.
//!
//! Out-of-range accesses fail with the usual bounds errors and are not events.
//!
//! # Crash images
//! [`CrashStorage::image`] (one device) and [`CrashSim::images`] (all devices, in
//! creation order) return what a device could contain after power loss *now* (or at
//! the crash, if one happened), per [`CrashMode`]:
//! * [`CrashMode::Durable`]: pending operations all lost;
//! * [`CrashMode::AllPending`]: pending operations all applied in issue order (the
//!   live image);
//! * [`CrashMode::Random`]: a random subset of the pending operations, applied in a
//!   random order, each one dropped, applied whole, or torn at 512-byte sector
//!   granularity (each sector it touches independently kept or lost). So every sector
//!   ends up holding its durable contents or the contents of any one pending
//!   operation that touched it. Deterministic for a given seed; different devices of
//!   a sim use independent streams.
//!
//! Feed an image to [`super::MemStorage::from_bytes`] or [`CrashStorage::from_bytes`]
//! to reopen the pool.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::mem::{check_mem_range, len_u64, mem_len, Access};
use super::Storage;

/// Torn-write granularity in bytes.
const SECTOR: usize = 512;

/// Post-crash contents of one device.
pub type CrashImage = Vec<u8>;

/// Which post-crash image to build; see the [module documentation](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashMode {
    /// Only flushed data survives.
    Durable,
    /// Every pending write and discard survives (in issue order).
    AllPending,
    /// A seeded random subset of pending operations, reordered and torn per sector.
    Random { seed: u64 },
}

/// Shared controller of a set of [`CrashStorage`] devices: the global event counter,
/// the crash trigger and every device's state.
pub struct CrashSim {
    state: Mutex<SimState>,
}

struct SimState {
    /// Events that have taken effect.
    events: u64,
    /// Sequence number of the event that will crash the sim.
    crash_at: Option<u64>,
    crashed: bool,
    devices: Vec<Device>,
}

struct Device {
    durable: Vec<u8>,
    live: Vec<u8>,
    pending: Vec<PendingOp>,
}

enum PendingOp {
    Write { offset: usize, data: Vec<u8> },
    Discard { offset: usize, len: usize },
}

impl PendingOp {
    fn range(&self) -> (usize, usize) {
        match self {
            PendingOp::Write { offset, data } => (*offset, offset + data.len()),
            PendingOp::Discard { offset, len } => (*offset, offset + len),
        }
    }

    /// Applies the part of the operation that falls in `[from, to)`.
    fn apply_part(&self, img: &mut [u8], from: usize, to: usize) {
        match self {
            PendingOp::Write { offset, data } => {
                img[from..to].copy_from_slice(&data[from - offset..to - offset]);
            }
            PendingOp::Discard { .. } => img[from..to].fill(0),
        }
    }

    fn apply(&self, img: &mut [u8]) {
        let (from, to) = self.range();
        self.apply_part(img, from, to);
    }
}

fn power_loss() -> io::Error {
    io::Error::other("simulated power loss")
}

impl SimState {
    fn check_alive(&self) -> io::Result<()> {
        if self.crashed {
            Err(power_loss())
        } else {
            Ok(())
        }
    }

    /// Starts an event: fails (and crashes the sim) if it is the crash point.
    fn begin_event(&mut self) -> io::Result<()> {
        self.check_alive()?;
        if self.crash_at.is_some_and(|n| self.events >= n) {
            self.crashed = true;
            return Err(power_loss());
        }
        self.events += 1;
        Ok(())
    }

    fn image(&self, dev: usize, mode: CrashMode) -> CrashImage {
        let d = &self.devices[dev];
        match mode {
            CrashMode::Durable => d.durable.clone(),
            CrashMode::AllPending => d.live.clone(),
            CrashMode::Random { seed } => {
                let mut rng = SplitMix64::new(seed ^ 0x5bd1_e995_u64.wrapping_mul(dev as u64 + 1));
                let mut img = d.durable.clone();
                let mut order: Vec<usize> = (0..d.pending.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                for &i in &order {
                    let op = &d.pending[i];
                    match rng.below(3) {
                        0 => {}
                        1 => op.apply(&mut img),
                        _ => {
                            let (start, end) = op.range();
                            let mut pos = start;
                            while pos < end {
                                let next = ((pos / SECTOR + 1) * SECTOR).min(end);
                                if rng.next() & 1 == 1 {
                                    op.apply_part(&mut img, pos, next);
                                }
                                pos = next;
                            }
                        }
                    }
                }
                img
            }
        }
    }
}

impl CrashSim {
    /// A sim with no devices, no events and no crash scheduled.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SimState {
                events: 0,
                crash_at: None,
                crashed: false,
                devices: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of events (writes, discards, flushes on any device) that have taken
    /// effect so far; also the sequence number the next event will get.
    pub fn events(&self) -> u64 {
        self.lock().events
    }

    /// Schedules the crash: events `0..n` succeed, event `n` and everything after it
    /// fail. If `n` has already passed, the next event crashes.
    pub fn set_crash_after(&self, n: u64) {
        self.lock().crash_at = Some(n);
    }

    /// Cuts the power now: every later operation fails.
    pub fn crash_now(&self) {
        self.lock().crashed = true;
    }

    /// Whether the power has been cut.
    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Number of devices created on this sim.
    pub fn device_count(&self) -> usize {
        self.lock().devices.len()
    }

    /// One post-crash image per device, in the order the devices were created; the
    /// same as calling [`CrashStorage::image`] on each.
    pub fn images(&self, mode: CrashMode) -> Vec<CrashImage> {
        let state = self.lock();
        (0..state.devices.len())
            .map(|dev| state.image(dev, mode))
            .collect()
    }
}

impl fmt::Debug for CrashSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("CrashSim")
            .field("events", &state.events)
            .field("crash_at", &state.crash_at)
            .field("crashed", &state.crashed)
            .field("devices", &state.devices.len())
            .finish()
    }
}

/// One simulated device of a [`CrashSim`]; see the [module documentation](self).
pub struct CrashStorage {
    sim: Arc<CrashSim>,
    dev: usize,
}

impl CrashStorage {
    /// A zero-filled device of `len` bytes (all durable).
    ///
    /// # Panics
    /// If `len` bytes cannot be allocated (as `vec![0; len]` would); test-only type.
    pub fn new(sim: &Arc<CrashSim>, len: u64) -> Self {
        Self::from_bytes(sim, vec![0; usize::try_from(len).unwrap_or(usize::MAX)])
    }

    /// A device whose durable (and live) contents are `bytes`.
    pub fn from_bytes(sim: &Arc<CrashSim>, bytes: Vec<u8>) -> Self {
        let mut state = sim.lock();
        state.devices.push(Device {
            live: bytes.clone(),
            durable: bytes,
            pending: Vec::new(),
        });
        Self {
            sim: Arc::clone(sim),
            dev: state.devices.len() - 1,
        }
    }

    /// The sim this device belongs to.
    pub fn sim(&self) -> &Arc<CrashSim> {
        &self.sim
    }

    /// Index of this device in [`CrashSim::images`].
    pub fn device_index(&self) -> usize {
        self.dev
    }

    /// Number of writes and discards issued since the last successful flush.
    pub fn pending_ops(&self) -> usize {
        self.sim.lock().devices[self.dev].pending.len()
    }

    /// What this device could contain after power loss now (or at the crash).
    /// Works whether or not the sim has crashed.
    pub fn image(&self, mode: CrashMode) -> CrashImage {
        self.sim.lock().image(self.dev, mode)
    }
}

impl fmt::Debug for CrashStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.sim.lock();
        let d = &state.devices[self.dev];
        f.debug_struct("CrashStorage")
            .field("dev", &self.dev)
            .field("len", &d.live.len())
            .field("pending", &d.pending.len())
            .field("crashed", &state.crashed)
            .finish()
    }
}

impl Storage for CrashStorage {
    fn len(&self) -> io::Result<u64> {
        let state = self.sim.lock();
        state.check_alive()?;
        Ok(len_u64(state.devices[self.dev].live.len()))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.sim.lock();
        state.check_alive()?;
        let live = &state.devices[self.dev].live;
        let range = check_mem_range(Access::Read, offset, buf.len(), live.len())?;
        buf.copy_from_slice(&live[range]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.sim.lock();
        state.check_alive()?;
        let range = check_mem_range(
            Access::Write,
            offset,
            buf.len(),
            state.devices[self.dev].live.len(),
        )?;
        state.begin_event()?;
        let d = &mut state.devices[self.dev];
        d.live[range.clone()].copy_from_slice(buf);
        if !buf.is_empty() {
            d.pending.push(PendingOp::Write {
                offset: range.start,
                data: buf.to_vec(),
            });
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.sim.lock();
        state.begin_event()?;
        let d = &mut state.devices[self.dev];
        for op in d.pending.drain(..) {
            op.apply(&mut d.durable);
        }
        Ok(())
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        let mut state = self.sim.lock();
        state.check_alive()?;
        let len = mem_len(len)?;
        let d = &mut state.devices[self.dev];
        if len > d.live.len() {
            d.live.resize(len, 0);
            d.durable.resize(len, 0);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.sim.lock();
        state.check_alive()?;
        let dev_len = state.devices[self.dev].live.len();
        super::mem::check_range(Access::Discard, offset, len, len_u64(dev_len))?;
        let range = check_mem_range(Access::Discard, offset, mem_len(len)?, dev_len)?;
        state.begin_event()?;
        let d = &mut state.devices[self.dev];
        d.live[range.clone()].fill(0);
        if !range.is_empty() {
            d.pending.push(PendingOp::Discard {
                offset: range.start,
                len: range.len(),
            });
        }
        Ok(())
    }
}

/// splitmix64: tiny, good-enough PRNG for picking crash images.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough value in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift range reduction: bias is negligible for the small n used here.
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_power_loss(e: &io::Error) -> bool {
        e.kind() == io::ErrorKind::Other && e.to_string() == "simulated power loss"
    }

    #[test]
    fn reads_see_live_state() {
        let sim = CrashSim::new();
        let s = CrashStorage::new(&sim, 4096);
        s.write_at(b"abc", 10).unwrap();
        let mut buf = [0u8; 3];
        s.read_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"abc");
        s.discard(11, 1).unwrap();
        s.read_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"a\0c");
        assert_eq!(s.pending_ops(), 2);
        assert_eq!(sim.events(), 2);
    }

    #[test]
    fn durable_loses_unflushed_writes_all_pending_keeps_them() {
        let sim = CrashSim::new();
        let s = CrashStorage::new(&sim, 4096);
        s.write_at(&[1; 512], 0).unwrap();
        s.flush().unwrap();
        assert_eq!(s.pending_ops(), 0);
        s.write_at(&[2; 512], 512).unwrap();
        s.discard(0, 256).unwrap();

        let durable = s.image(CrashMode::Durable);
        assert!(durable[..512].iter().all(|&b| b == 1));
        assert!(durable[512..].iter().all(|&b| b == 0));

        let all = s.image(CrashMode::AllPending);
        assert!(all[..256].iter().all(|&b| b == 0));
        assert!(all[256..512].iter().all(|&b| b == 1));
        assert!(all[512..1024].iter().all(|&b| b == 2));
        assert!(all[1024..].iter().all(|&b| b == 0));

        s.flush().unwrap();
        assert_eq!(s.image(CrashMode::Durable), all);
        assert_eq!(sim.events(), 5);
    }

    #[test]
    fn flush_is_per_device_and_images_cover_all_devices() {
        let sim = CrashSim::new();
        let meta = CrashStorage::new(&sim, 1024);
        let data = CrashStorage::new(&sim, 2048);
        assert_eq!((meta.device_index(), data.device_index()), (0, 1));
        assert_eq!(sim.device_count(), 2);
        data.write_at(&[7; 100], 0).unwrap();
        meta.write_at(&[9; 100], 0).unwrap();
        data.flush().unwrap();

        let imgs = sim.images(CrashMode::Durable);
        assert_eq!(imgs.len(), 2);
        assert_eq!(imgs[0], vec![0; 1024], "metadata was not flushed");
        assert!(imgs[1][..100].iter().all(|&b| b == 7));
        assert_eq!(imgs[1].len(), 2048);
        assert_eq!(imgs[0], meta.image(CrashMode::Durable));

        let seed = CrashMode::Random { seed: 42 };
        assert_eq!(sim.images(seed), vec![meta.image(seed), data.image(seed)]);
    }

    #[test]
    fn crash_after_n_fails_nth_op_and_everything_after() {
        // Workload: 6 events across two devices.
        fn workload(meta: &CrashStorage, data: &CrashStorage) -> io::Result<()> {
            data.write_at(&[1; 512], 0)?; // 0
            data.flush()?; // 1
            meta.write_at(&[2; 512], 0)?; // 2
            meta.discard(0, 512)?; // 3
            meta.write_at(&[3; 512], 512)?; // 4
            meta.flush() // 5
        }
        let sim = CrashSim::new();
        workload(
            &CrashStorage::new(&sim, 4096),
            &CrashStorage::new(&sim, 4096),
        )
        .unwrap();
        let total = sim.events();
        assert_eq!(total, 6);

        for n in 0..=total {
            let sim = CrashSim::new();
            let meta = CrashStorage::new(&sim, 4096);
            let data = CrashStorage::new(&sim, 4096);
            sim.set_crash_after(n);
            let res = workload(&meta, &data);
            assert_eq!(sim.events(), n, "n = {n}");
            if n == total {
                res.unwrap();
                assert!(!sim.is_crashed());
                continue;
            }
            assert!(is_power_loss(&res.unwrap_err()), "n = {n}");
            assert!(sim.is_crashed());
            // Everything fails from now on, on both devices.
            let mut buf = [0u8; 1];
            assert!(is_power_loss(&meta.write_at(&[0], 0).unwrap_err()));
            assert!(is_power_loss(&data.flush().unwrap_err()));
            assert!(is_power_loss(&data.discard(0, 1).unwrap_err()));
            assert!(is_power_loss(&meta.read_at(&mut buf, 0).unwrap_err()));
            assert!(is_power_loss(&meta.len().unwrap_err()));
            assert!(is_power_loss(&meta.grow(8192).unwrap_err()));
            assert_eq!(sim.events(), n);

            // The crashing op had no effect; images are frozen at the crash.
            let imgs = sim.images(CrashMode::AllPending);
            let data_written = n >= 1;
            assert_eq!(imgs[1][0] == 1, data_written, "n = {n}");
            let data_durable = sim.images(CrashMode::Durable)[1][0] == 1;
            assert_eq!(data_durable, n >= 2, "n = {n}");
            assert_eq!(imgs[0][0] == 2, n == 3, "n = {n}");
            assert_eq!(imgs[0][512] == 3, n >= 5, "n = {n}");
            assert_eq!(sim.images(CrashMode::Durable)[0], vec![0; 4096]);
        }
    }

    #[test]
    fn crash_now_and_late_schedule() {
        let sim = CrashSim::new();
        let s = CrashStorage::new(&sim, 1024);
        s.write_at(&[1; 10], 0).unwrap();
        s.write_at(&[1; 10], 0).unwrap();
        sim.set_crash_after(1); // already passed: the next event crashes
        assert!(!sim.is_crashed());
        assert!(is_power_loss(&s.flush().unwrap_err()));
        assert!(sim.is_crashed());

        let sim = CrashSim::new();
        let s = CrashStorage::new(&sim, 1024);
        sim.crash_now();
        assert!(is_power_loss(&s.write_at(&[1], 0).unwrap_err()));
        assert_eq!(sim.events(), 0);
    }

    #[test]
    fn bounds_errors_are_not_events() {
        let sim = CrashSim::new();
        let s = CrashStorage::new(&sim, 1024);
        let mut buf = [0u8; 8];
        assert_eq!(
            s.read_at(&mut buf, 1020).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            s.write_at(&buf, 1020).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            s.write_at(&buf, u64::MAX).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            s.discard(1000, 100).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            s.discard(1, u64::MAX).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(sim.events(), 0);
    }

    #[test]
    fn grow_is_immediately_durable() {
        let sim = CrashSim::new();
        let s = CrashStorage::from_bytes(&sim, vec![5; 512]);
        s.grow(2048).unwrap();
        s.grow(100).unwrap();
        assert_eq!(s.len().unwrap(), 2048);
        s.write_at(&[6; 512], 1536).unwrap();
        let durable = s.image(CrashMode::Durable);
        assert_eq!(durable.len(), 2048);
        assert!(durable[..512].iter().all(|&b| b == 5));
        assert!(durable[512..].iter().all(|&b| b == 0));
        assert_eq!(sim.events(), 1);
    }

    #[test]
    fn random_images_are_deterministic_and_sometimes_torn() {
        let sim = CrashSim::new();
        let s = CrashStorage::new(&sim, 8 * 512);
        s.write_at(&[0xaa; 8 * 512], 0).unwrap();

        let (mut none, mut whole, mut torn) = (0, 0, 0);
        for seed in 0..300 {
            let img = s.image(CrashMode::Random { seed });
            assert_eq!(img, s.image(CrashMode::Random { seed }), "seed {seed}");
            let mut kept = 0;
            for sector in img.chunks(512) {
                // Sector writes are atomic: a sector is all old or all new.
                assert!(
                    sector.iter().all(|&b| b == 0) || sector.iter().all(|&b| b == 0xaa),
                    "seed {seed}: torn inside a sector"
                );
                kept += usize::from(sector[0] == 0xaa);
            }
            match kept {
                0 => none += 1,
                8 => whole += 1,
                _ => torn += 1,
            }
        }
        assert!(none > 0 && whole > 0 && torn > 0, "{none} {whole} {torn}");
    }

    #[test]
    fn random_torn_at_absolute_sector_boundaries() {
        let sim = CrashSim::new();
        let s = CrashStorage::new(&sim, 4 * 512);
        // Unaligned write covering parts of sectors 0 and 3.
        s.write_at(&[0xcc; 1400], 300).unwrap();
        for seed in 0..200 {
            let img = s.image(CrashMode::Random { seed });
            assert!(img[..300].iter().all(|&b| b == 0));
            assert!(img[1700..].iter().all(|&b| b == 0));
            let pieces = [300..512, 512..1024, 1024..1536, 1536..1700];
            for r in pieces {
                let part = &img[r];
                assert!(
                    part.iter().all(|&b| b == 0) || part.iter().all(|&b| b == 0xcc),
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn random_reorders_overlapping_writes() {
        let sim = CrashSim::new();
        let s = CrashStorage::new(&sim, 512);
        s.write_at(&[1; 512], 0).unwrap();
        s.write_at(&[2; 512], 0).unwrap();
        s.discard(0, 512).unwrap();
        s.write_at(&[3; 512], 0).unwrap();
        let mut seen = [false; 4];
        for seed in 0..200 {
            let img = s.image(CrashMode::Random { seed });
            let v = img[0];
            assert!(img.iter().all(|&b| b == v));
            seen[usize::from(v)] = true;
        }
        assert_eq!(
            seen, [true; 4],
            "every version should be a possible outcome"
        );
        assert!(s.image(CrashMode::AllPending).iter().all(|&b| b == 3));
    }

    #[test]
    fn random_with_nothing_pending_is_durable() {
        let sim = CrashSim::new();
        let s = CrashStorage::from_bytes(&sim, (0..=255).collect());
        s.write_at(&[9; 16], 16).unwrap();
        s.flush().unwrap();
        for seed in 0..10 {
            assert_eq!(
                s.image(CrashMode::Random { seed }),
                s.image(CrashMode::Durable)
            );
        }
    }

    #[test]
    fn shared_across_threads() {
        let sim = CrashSim::new();
        let s: Arc<dyn Storage> = Arc::new(CrashStorage::new(&sim, 8 * 512));
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    s.write_at(&[i; 512], u64::from(i) * 512).unwrap();
                    s.flush().unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(sim.events(), 16);
        let img = sim.images(CrashMode::Durable).remove(0);
        for i in 0..8u8 {
            assert!(img[usize::from(i) * 512..][..512].iter().all(|&b| b == i));
        }
        assert!(format!("{s:?}").contains("CrashStorage"));
    }
}
