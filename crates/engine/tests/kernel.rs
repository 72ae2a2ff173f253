//! The real kernel, in the test suite: pools written by this engine are read and
//! changed by Linux 6.1 dm-thin (booted in qemu by `thinvol_testkit::lvmvm`), and
//! pools the kernel wrote are opened, checked and changed by this engine.
//!
//! Each test skips (prints SKIP and returns) when the VM is not set up or
//! `THINVOL_SKIP_VM=1`. VM runs boot a fresh guest (~5 s under TCG) and are
//! serialized host-wide, so pools are 32 MiB and devices 4 or 17 MiB.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use thinvol_engine::format::{DataBlockSize, MetaBlock, ThinId};
use thinvol_engine::{Pool, PoolConfig};
use thinvol_testkit::lvmvm::{
    kernel_read_devices, kernel_run_ops, model_ops, sha256_hex, sha256_map, vm_available,
    vm_skip_reason, write_payload, KernelOp, VmPool,
};
use thinvol_testkit::thintools;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BLOCK_SECTORS: u32 = 128;
const BLOCK: u64 = 64 * KIB;
/// 512 data blocks: the pool table length is exactly nr_data_blocks x block size.
const DATA_SIZE: u64 = 32 * MIB;
const DEV: u64 = 4 * MIB;
/// A device with more mappings (272) than one B-tree leaf holds (252), so its
/// mapping tree has internal nodes. Filled in order, its leaves split at block 126.
const BIG: u64 = 17 * MIB;

macro_rules! require_vm {
    () => {
        if !vm_available() {
            eprintln!(
                "SKIP: kernel interop test: {}",
                vm_skip_reason().unwrap_or_default()
            );
            return;
        }
    };
}

fn vm_pool(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.join("metadata"), dir.join("data"))
}

fn vm<'a>(meta: &'a Path, data: &'a Path) -> VmPool<'a> {
    VmPool {
        metadata: meta,
        data,
        data_block_sectors: BLOCK_SECTORS,
    }
}

fn config() -> PoolConfig {
    PoolConfig {
        data_block_size: DataBlockSize::from_sectors(BLOCK_SECTORS).unwrap(),
        data_size: DATA_SIZE,
        metadata_size: None,
        // no background commits: the tests decide when to commit
        commit_interval: Duration::ZERO,
    }
}

/// Files for a pool the kernel formats: zeroed 4 MiB metadata, zeroed data.
fn blank_pool_files(dir: &Path) {
    let (meta, data) = vm_pool(dir);
    fs::File::create(&meta).unwrap().set_len(4 * MIB).unwrap();
    fs::File::create(&data).unwrap().set_len(DATA_SIZE).unwrap();
}

/// `thin_check` (host tools) must be clean; skipped with a note if the tools
/// are missing.
fn thin_check_clean(meta: &Path) {
    if !thintools::tools_available() {
        eprintln!("note: thin-provisioning-tools missing, thin_check skipped");
        return;
    }
    thintools::thin_check(meta).unwrap().assert_clean();
}

/// Our engine's own checker (tree structure, metadata and data ref counts).
#[track_caller]
fn engine_check_clean(pool: &Pool) {
    let r = pool.check().unwrap();
    assert!(
        r.is_clean(),
        "engine check found problems:\n{}",
        r.problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn read_dev(pool: &Pool, id: u64, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    pool.read(ThinId(id), 0, &mut buf).unwrap();
    buf
}

/// sha256 of what our engine reads for each `(device, size)`.
fn engine_shas(pool: &Pool, devices: &[(u64, u64)]) -> BTreeMap<u64, String> {
    devices
        .iter()
        .map(|&(id, size)| (id, sha256_hex(&read_dev(pool, id, size))))
        .collect()
}

fn device_ids(pool: &Pool) -> Vec<u64> {
    pool.devices().unwrap().iter().map(|d| d.id.0).collect()
}

/// `dmsetup status` of the pool: `0 LEN thin-pool TRANS META DATA HELD ...`.
fn status_field(status: &str, i: usize) -> &str {
    status
        .split_whitespace()
        .nth(i)
        .unwrap_or_else(|| panic!("pool status {status:?} has no field {i}"))
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Our engine plus a host-side byte model of what every device must hold
/// (engine semantics: a discard zeroes its whole range).
struct Driven {
    pool: Pool,
    model: BTreeMap<u64, Vec<u8>>,
    seed: usize,
}

impl Driven {
    fn new(pool: Pool, model: BTreeMap<u64, Vec<u8>>) -> Self {
        Driven {
            pool,
            model,
            seed: 50_000,
        }
    }

    /// A new device of `DEV` bytes.
    fn create(&mut self, id: u64) {
        self.create_sized(id, DEV);
    }

    fn create_sized(&mut self, id: u64, size: u64) {
        self.pool.create_thin(ThinId(id)).unwrap();
        assert!(self.model.insert(id, vec![0; size as usize]).is_none());
    }

    /// A snapshot (same size as its origin).
    fn snap(&mut self, id: u64, origin: u64) {
        self.pool.create_snap(ThinId(id), ThinId(origin)).unwrap();
        let bytes = self.model[&origin].clone();
        assert!(self.model.insert(id, bytes).is_none());
    }

    /// A `BIG` device with every block provisioned by a 4 KiB write (at varying
    /// offsets inside the block, the rest zero-filled): a multi-level tree.
    fn create_big(&mut self, id: u64) {
        self.create_sized(id, BIG);
        for b in 0..BIG / BLOCK {
            self.write(id, b * BLOCK + (b % 16) * 4 * KIB, 4 * KIB);
        }
    }

    fn delete(&mut self, id: u64) {
        self.pool.delete_thin(ThinId(id)).unwrap();
        self.model.remove(&id).unwrap();
    }

    fn write(&mut self, id: u64, off: u64, len: u64) {
        self.seed += 1;
        let bytes = write_payload(self.seed, len);
        self.pool.write(ThinId(id), off, &bytes).unwrap();
        self.model.get_mut(&id).unwrap()[off as usize..(off + len) as usize]
            .copy_from_slice(&bytes);
    }

    fn discard(&mut self, id: u64, off: u64, len: u64) {
        self.pool.discard(ThinId(id), off, len).unwrap();
        self.model.get_mut(&id).unwrap()[off as usize..(off + len) as usize].fill(0);
    }

    /// Every device reads back as the model says (first `size` bytes of each
    /// listed device), and no other device exists.
    #[track_caller]
    fn verify(&self, devices: &[(u64, u64)]) {
        let ids: Vec<u64> = self.model.keys().copied().collect();
        assert_eq!(device_ids(&self.pool), ids);
        for &(id, size) in devices {
            let got = read_dev(&self.pool, id, size);
            let want = &self.model[&id][..size as usize];
            if let Some(first) = (0..got.len()).find(|&i| got[i] != want[i]) {
                let last = (0..got.len()).rev().find(|&i| got[i] != want[i]).unwrap();
                panic!(
                    "device {id}: engine reads differ from the host model in bytes \
                     {first}..={last} (blocks {}..={})",
                    first as u64 / BLOCK,
                    last as u64 / BLOCK
                );
            }
        }
    }
}

/// Test 1's engine side: a pool in `dir` made by our engine with snapshots of
/// snapshots, whole and partial writes, writes into shared blocks, discards,
/// deleted devices and several commits. Returns it with the devices to read.
fn build_engine_pool(dir: &Path) -> (Driven, [(u64, u64); 7]) {
    let pool = Pool::create(dir, &config()).unwrap();
    let mut d = Driven::new(pool, BTreeMap::new());

    d.create(1);
    d.write(1, 0, MIB); // 16 whole blocks
    d.write(1, MIB + 1000, 5000); // unaligned, inside one new block
    d.write(1, 2 * MIB - 100, 200); // straddles two new blocks
    d.pool.commit().unwrap();

    d.snap(2, 1);
    d.write(1, BLOCK + 4096, 8192); // partial write into a shared block
    d.write(2, 2 * BLOCK, BLOCK); // whole-block write over a shared block
    d.write(2, 3 * MIB + MIB / 2, 100 * KIB); // new blocks in the snapshot
    d.snap(3, 2); // snapshot of a snapshot
    d.snap(4, 3); // ... and of that one
    d.write(3, 0, 512); // block 0 is shared four ways
    d.write(4, 200 * KIB, 300 * KIB);
    d.pool.commit().unwrap();

    // whole blocks 3 and 4 are unmapped, the partial edges (blocks 2 and 5) zeroed
    d.discard(1, 2 * BLOCK + 512, 3 * BLOCK);
    d.discard(2, 512 * KIB, 512 * KIB);
    d.discard(4, 0, BLOCK); // shared by 1, 2, 3: only 4 loses it

    d.create(5);
    d.write(5, 0, 512 * KIB);
    d.snap(6, 5);
    d.write(6, 64 * KIB + 3, 10); // tiny unaligned write into a shared block
    d.delete(5); // its blocks stay referenced by 6
    d.create(7);
    d.write(7, 0, 256 * KIB);
    d.pool.commit().unwrap();
    d.delete(7); // all its blocks are freed
    d.write(1, 3 * MIB, 256 * KIB); // may reuse the freed blocks

    // multi-level mapping trees, shared by a snapshot, then changed on both sides
    d.create_big(8);
    d.pool.commit().unwrap();
    d.snap(9, 8);
    d.write(9, 100 * BLOCK + 5, 3000);
    d.write(8, 260 * BLOCK, BLOCK);
    d.discard(8, 50 * BLOCK, 10 * BLOCK);
    d.discard(9, 120 * BLOCK, 20 * BLOCK); // across the leaf boundary

    d.pool.set_transaction_id(0, 5).unwrap();
    d.pool.commit().unwrap();

    // device 4 is 3 MiB + 32 KiB: its last block is half visible to the kernel
    let devices = [
        (1, DEV),
        (2, DEV),
        (3, DEV),
        (4, 3 * MIB + 32 * KIB),
        (6, DEV),
        (8, BIG),
        (9, BIG),
    ];
    (d, devices)
}

/// Test 1: a pool made by our engine (snapshots of snapshots, whole and partial
/// writes, writes into shared blocks, discards, deleted devices, multi-level
/// mapping trees, several commits) is read by the kernel, which must see exactly
/// our bytes; thin_check and thin_dump agree with us.
#[test]
fn kernel_reads_engine_pool() {
    require_vm!();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let (d, devices) = build_engine_pool(&dir);
    d.verify(&devices);
    engine_check_clean(&d.pool);
    let ours = engine_shas(&d.pool, &devices);
    let st = d.pool.status().unwrap();
    assert_eq!(st.transaction_id, 5);
    assert_eq!(st.data_blocks_total, DATA_SIZE / BLOCK);
    let mappings: BTreeMap<u64, Vec<(u64, u64)>> = devices
        .iter()
        .map(|&(id, _)| {
            let m = d.pool.mappings(ThinId(id)).unwrap();
            (id, m.iter().map(|(v, b)| (v.0, b.0)).collect())
        })
        .collect();
    d.pool.close().unwrap();

    let (meta, data) = vm_pool(&dir);
    thin_check_clean(&meta);
    if thintools::tools_available() {
        // the host tools see our mappings
        let dump = thintools::thin_dump(&meta, false).unwrap();
        assert_eq!(dump.superblock.transaction, 5);
        for (id, m) in &mappings {
            let got: Vec<(u64, u64)> = dump
                .device(*id)
                .unwrap_or_else(|| panic!("thin_dump lacks device {id}"))
                .block_map()
                .into_iter()
                .collect();
            assert_eq!(&got, m, "device {id}: thin_dump mappings");
        }
    }
    let before = (fs::read(&meta).unwrap(), fs::read(&data).unwrap());

    let t = Instant::now();
    let kernel = kernel_read_devices(&vm(&meta, &data), &devices).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("kernel_read_devices: {}", secs(t.elapsed()));
    assert_eq!(kernel, ours, "the kernel reads other bytes than our engine");
    assert!(
        fs::read(&meta).unwrap() == before.0 && fs::read(&data).unwrap() == before.1,
        "the read-only kernel run changed the pool files"
    );
    // and our engine still opens it unchanged
    let pool = Pool::open(&dir).unwrap();
    assert_eq!(engine_shas(&pool, &devices), ours);
    pool.close().unwrap();
    eprintln!("kernel_reads_engine_pool: {}", secs(t0.elapsed()));
}

/// Test 1's engine side alone (no VM): our reads match the host model and our
/// checker and thin_check are clean.
#[test]
fn engine_pool_for_the_kernel_is_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let (d, devices) = build_engine_pool(&dir);
    d.verify(&devices);
    engine_check_clean(&d.pool);
    d.pool.close().unwrap();
    thin_check_clean(&dir.join("metadata"));
    let pool = Pool::open(&dir).unwrap();
    let d = Driven::new(pool, d.model);
    d.verify(&devices);
}

/// Test 2a: a pool the kernel formats and changes opens in our engine with the
/// same devices and bytes, and our checker (which also checks data reference
/// counts) finds it clean.
#[test]
fn engine_opens_kernel_pool() {
    require_vm!();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    blank_pool_files(dir);
    let (meta, data) = vm_pool(dir);

    let devices = [(1, DEV), (2, DEV), (3, DEV), (4, DEV), (5, 2 * MIB)];
    let ops = [
        KernelOp::Create(1),
        KernelOp::Write {
            dev: 1,
            offset_bytes: 0,
            len: MIB,
        },
        KernelOp::Write {
            dev: 1,
            offset_bytes: MIB + 4 * KIB,
            len: 4 * KIB,
        }, // partial block, rest zeroed
        KernelOp::Snap { dev: 2, origin: 1 },
        KernelOp::Write {
            dev: 1,
            offset_bytes: BLOCK,
            len: BLOCK,
        }, // breaks sharing
        KernelOp::Write {
            dev: 2,
            offset_bytes: 100 * KIB,
            len: 8 * KIB,
        }, // partial write into a shared block
        KernelOp::Snap { dev: 3, origin: 2 }, // snapshot of a snapshot
        KernelOp::Write {
            dev: 3,
            offset_bytes: 0,
            len: 512,
        },
        KernelOp::Write {
            dev: 3,
            offset_bytes: 3 * MIB,
            len: 128 * KIB,
        },
        KernelOp::Create(4),
        KernelOp::Write {
            dev: 4,
            offset_bytes: 0,
            len: 256 * KIB,
        },
        KernelOp::Snap { dev: 5, origin: 4 },
        KernelOp::Delete(4),
        KernelOp::Discard {
            dev: 1,
            offset_bytes: 32 * KIB,
            len: 192 * KIB,
        }, // whole blocks 1, 2
        KernelOp::Discard {
            dev: 3,
            offset_bytes: 256 * KIB,
            len: 256 * KIB,
        },
        KernelOp::SetTransactionId { old: 0, new: 7 },
    ];
    let model = model_ops(BLOCK, &devices, BTreeMap::new(), &ops).unwrap();
    let run = kernel_run_ops(&vm(&meta, &data), true, 0, &devices, &ops)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "kernel_run_ops (fresh, {} ops): {}; {}",
        ops.len(),
        secs(run.elapsed),
        run.pool_status
    );
    let expected = sha256_map(&model);
    assert_eq!(run.devices, expected, "kernel vs model");
    assert_eq!(status_field(&run.pool_status, 3), "7");
    thin_check_clean(&meta);

    let pool = Pool::open(dir).unwrap();
    assert_eq!(device_ids(&pool), [1, 2, 3, 5]);
    let st = pool.status().unwrap();
    assert_eq!(st.transaction_id, 7);
    assert_eq!(st.data_blocks_total, DATA_SIZE / BLOCK);
    assert_eq!(st.held_metadata_root, None);
    // used data blocks agree with the kernel's count
    let kernel_data = status_field(&run.pool_status, 5);
    assert_eq!(
        kernel_data,
        format!("{}/{}", st.data_blocks_used, st.data_blocks_total),
        "data blocks used/total: kernel {kernel_data}"
    );
    let live: Vec<(u64, u64)> = devices
        .iter()
        .copied()
        .filter(|d| model.contains_key(&d.0))
        .collect();
    assert_eq!(engine_shas(&pool, &live), expected, "engine vs kernel");
    for info in pool.devices().unwrap() {
        assert_eq!(
            info.mapped_blocks,
            pool.mappings(info.id).unwrap().len() as u64,
            "device {}: mapped_blocks",
            info.id
        );
    }
    engine_check_clean(&pool);
    pool.close().unwrap();
    eprintln!("engine_opens_kernel_pool: {}", secs(t0.elapsed()));
}

/// Test 2b: the kernel leaves a metadata snapshot held; our engine opens the
/// pool, sees the held root, stays clean while writing with the snapshot held,
/// and releases it.
#[test]
fn engine_opens_kernel_pool_with_held_metadata_snap() {
    require_vm!();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    blank_pool_files(dir);
    let (meta, data) = vm_pool(dir);

    let devices = [(1, DEV), (2, DEV)];
    let ops = [
        KernelOp::Create(1),
        KernelOp::Write {
            dev: 1,
            offset_bytes: 0,
            len: 512 * KIB,
        },
        KernelOp::Snap { dev: 2, origin: 1 },
        KernelOp::Write {
            dev: 1,
            offset_bytes: 0,
            len: BLOCK,
        },
        KernelOp::Write {
            dev: 2,
            offset_bytes: MIB,
            len: 4 * KIB,
        },
        KernelOp::SetTransactionId { old: 0, new: 1 },
        KernelOp::ReserveMetadataSnap, // last: the held root stays in the pool
    ];
    let model = model_ops(BLOCK, &devices, BTreeMap::new(), &ops).unwrap();
    let run = kernel_run_ops(&vm(&meta, &data), true, 0, &devices, &ops)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "kernel_run_ops (fresh, held snapshot): {}; {}",
        secs(run.elapsed),
        run.pool_status
    );
    assert_eq!(run.devices, sha256_map(&model), "kernel vs model");
    let held: u64 = status_field(&run.pool_status, 6)
        .parse()
        .unwrap_or_else(|_| panic!("no held root in {:?}", run.pool_status));
    thin_check_clean(&meta);

    let pool = Pool::open(dir).unwrap();
    let st = pool.status().unwrap();
    assert_eq!(st.held_metadata_root, Some(MetaBlock(held)));
    assert_eq!(st.transaction_id, 1);
    assert_eq!(
        engine_shas(&pool, &devices),
        run.devices,
        "engine vs kernel"
    );
    engine_check_clean(&pool);

    // Change shared structures while the snapshot holds them.
    let mut d = Driven::new(pool, model);
    d.write(1, BLOCK + 7, 1000); // block shared with 2 (and the held tree)
    d.write(2, 0, 2 * BLOCK);
    d.snap(3, 2);
    d.write(3, 4 * BLOCK, 4 * KIB);
    d.discard(1, 2 * BLOCK, 2 * BLOCK);
    d.pool.commit().unwrap();
    engine_check_clean(&d.pool);
    let devices = [(1, DEV), (2, DEV), (3, DEV)];
    d.verify(&devices);
    assert_eq!(
        d.pool.status().unwrap().held_metadata_root,
        Some(MetaBlock(held)),
        "writes must not move the held root"
    );
    d.pool.close().unwrap();
    thin_check_clean(&meta);
    if thintools::tools_available() {
        // the held snapshot still shows the kernel's two devices
        let snap = thintools::thin_dump(&meta, true).unwrap();
        let ids: Vec<u64> = snap.devices.iter().map(|d| d.dev_id).collect();
        assert_eq!(ids, [1, 2]);
    }

    let pool = Pool::open(dir).unwrap();
    engine_check_clean(&pool);
    pool.release_metadata_snap().unwrap();
    assert_eq!(pool.status().unwrap().held_metadata_root, None);
    engine_check_clean(&pool);
    d.pool = pool;
    d.verify(&devices);
    d.pool.close().unwrap();
    thin_check_clean(&meta);
    eprintln!(
        "engine_opens_kernel_pool_with_held_metadata_snap: {}",
        secs(t0.elapsed())
    );
}

/// Test 3: kernel -> engine -> kernel -> engine. The kernel formats a pool and
/// takes a metadata snapshot; our engine continues (writes into shared blocks,
/// snapshots of snapshots, deletes, discards, with the snapshot held); the
/// kernel reads exactly our bytes, writes more (into blocks our snapshot
/// shares, so it must detect sharing from our block times) and releases the
/// snapshot; our engine reads the kernel's latest writes.
#[test]
fn round_trip_kernel_engine_kernel() {
    require_vm!();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    blank_pool_files(dir);
    let (meta, data) = vm_pool(dir);

    // 1. kernel
    let devices1 = [(1, DEV), (2, DEV)];
    let ops1 = [
        KernelOp::Create(1),
        KernelOp::Write {
            dev: 1,
            offset_bytes: 0,
            len: MIB,
        },
        KernelOp::Snap { dev: 2, origin: 1 },
        KernelOp::Write {
            dev: 2,
            offset_bytes: 8 * KIB,
            len: 16 * KIB,
        },
        KernelOp::ReserveMetadataSnap,
        KernelOp::Write {
            dev: 1,
            offset_bytes: 256 * KIB,
            len: BLOCK,
        },
        KernelOp::SetTransactionId { old: 0, new: 1 },
    ];
    let model1 = model_ops(BLOCK, &devices1, BTreeMap::new(), &ops1).unwrap();
    let run1 = kernel_run_ops(&vm(&meta, &data), true, 0, &devices1, &ops1)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "kernel_run_ops 1 (fresh): {}; {}",
        secs(run1.elapsed),
        run1.pool_status
    );
    assert_eq!(run1.devices, sha256_map(&model1), "kernel vs model");
    assert_ne!(status_field(&run1.pool_status, 6), "-");

    // 2. our engine, with the kernel's metadata snapshot held
    let pool = Pool::open(dir).unwrap();
    assert!(pool.status().unwrap().held_metadata_root.is_some());
    let mut d = Driven::new(pool, model1);
    d.verify(&devices1);
    engine_check_clean(&d.pool);
    d.write(1, 3 * KIB, 2 * KIB); // partial, into a block shared with 2
    d.write(2, 2 * BLOCK, BLOCK); // whole block, shared with 1
    d.snap(3, 2);
    d.snap(4, 3); // snapshot of a snapshot
    d.write(4, 5 * BLOCK + 100, BLOCK); // straddles two shared blocks
    d.write(3, 2 * MIB, 300 * KIB); // new blocks
    d.create(5);
    d.write(5, 0, 192 * KIB);
    d.pool.commit().unwrap();
    d.delete(2); // still in the held snapshot
    d.discard(3, 9 * BLOCK, 3 * BLOCK);
    d.snap(6, 1); // no writes after: the kernel must see 1 and 6 share everything
    d.create_big(10); // a multi-level mapping tree ...
    d.pool.commit().unwrap();
    d.snap(11, 10); // ... shared whole by a snapshot
    d.write(10, 5 * BLOCK, 4 * KIB);
    d.pool.set_transaction_id(1, 2).unwrap();
    d.pool.commit().unwrap();
    engine_check_clean(&d.pool);
    let devices2 = [
        (1, DEV),
        (3, DEV),
        (4, DEV),
        (5, DEV),
        (6, DEV),
        (10, BIG),
        (11, BIG),
    ];
    d.verify(&devices2);
    let ours = engine_shas(&d.pool, &devices2);
    let initial: BTreeMap<u64, Vec<u8>> = d.model.clone();
    d.pool.close().unwrap();
    thin_check_clean(&meta);

    // 3a. the kernel reads exactly our bytes
    let t = Instant::now();
    let kernel =
        kernel_read_devices(&vm(&meta, &data), &devices2).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("kernel_read_devices: {}", secs(t.elapsed()));
    assert_eq!(kernel, ours, "the kernel reads other bytes than our engine");

    // 3b. the kernel writes more (into blocks our snapshots share, so it must
    // see the sharing from our mapping times), and releases the snapshot
    let devices3 = [
        (1, DEV),
        (3, DEV),
        (4, DEV),
        (5, DEV),
        (6, DEV),
        (7, DEV),
        (8, DEV),
        (10, BIG),
        (11, BIG),
    ];
    let ops3 = [
        KernelOp::Write {
            dev: 1,
            offset_bytes: 0,
            len: BLOCK,
        }, // shared with 6 (our snapshot)
        KernelOp::Write {
            dev: 6,
            offset_bytes: 512 * KIB + 4 * KIB,
            len: 4 * KIB,
        }, // partial, shared with 1
        KernelOp::Write {
            dev: 4,
            offset_bytes: 0,
            len: 2 * BLOCK,
        }, // shared with 3
        KernelOp::Write {
            dev: 3,
            offset_bytes: 2 * MIB,
            len: 4 * KIB,
        }, // our exclusive block: in place
        KernelOp::Snap { dev: 7, origin: 4 },
        KernelOp::Write {
            dev: 7,
            offset_bytes: 6 * BLOCK,
            len: 4 * KIB,
        },
        KernelOp::Discard {
            dev: 3,
            offset_bytes: 0,
            len: 4 * BLOCK,
        },
        KernelOp::Write {
            dev: 10,
            offset_bytes: 200 * BLOCK + 8 * KIB,
            len: 8 * KIB,
        }, // shared with 11, deep in a multi-level tree
        KernelOp::Write {
            dev: 11,
            offset_bytes: 260 * BLOCK,
            len: BLOCK,
        },
        KernelOp::Discard {
            dev: 11,
            offset_bytes: 0,
            len: 64 * BLOCK,
        },
        KernelOp::Delete(5),
        KernelOp::ReleaseMetadataSnap,
        KernelOp::SetTransactionId { old: 2, new: 3 },
        KernelOp::Create(8),
        KernelOp::Write {
            dev: 8,
            offset_bytes: 128 * KIB,
            len: 128 * KIB,
        },
    ];
    let model3 = model_ops(BLOCK, &devices3, initial, &ops3).unwrap();
    let run3 = kernel_run_ops(&vm(&meta, &data), false, 0, &devices3, &ops3)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "kernel_run_ops 3 (on our pool): {}; {}",
        secs(run3.elapsed),
        run3.pool_status
    );
    assert_eq!(run3.devices, sha256_map(&model3), "kernel vs model");
    assert_eq!(status_field(&run3.pool_status, 3), "3");
    assert_eq!(status_field(&run3.pool_status, 6), "-");
    thin_check_clean(&meta);

    // 4. our engine reads the kernel's latest writes
    let pool = Pool::open(dir).unwrap();
    let st = pool.status().unwrap();
    assert_eq!(st.transaction_id, 3);
    assert_eq!(st.held_metadata_root, None);
    let mut d = Driven::new(pool, model3);
    d.verify(
        &devices3
            .iter()
            .copied()
            .filter(|x| x.0 != 5)
            .collect::<Vec<_>>(),
    );
    engine_check_clean(&d.pool);
    // and keeps working on it
    d.write(8, 0, BLOCK);
    d.snap(9, 8);
    d.write(9, 128 * KIB, 4 * KIB);
    d.pool.commit().unwrap();
    engine_check_clean(&d.pool);
    d.pool.close().unwrap();
    thin_check_clean(&meta);
    eprintln!("round_trip_kernel_engine_kernel: {}", secs(t0.elapsed()));
}
