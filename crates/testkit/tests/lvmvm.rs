//! Proves the lvm-vm harness (`thinvol_testkit::lvmvm`) against pools made
//! with `thin_restore` + plain file writes, and against pools the kernel
//! formats itself. Each VM test boots the real 6.1 kernel in qemu (~5-10 s
//! under TCG); they skip with a message when the VM is not set up or
//! `THINVOL_SKIP_VM=1`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use thinvol_testkit::lvmvm::{
    kernel_read_devices, kernel_run_ops, model_ops, sha256_hex, sha256_map, vm_skip_reason,
    write_payload, KernelOp, VmError, VmPool,
};

const KIB: u64 = 1024;
const BLOCK_SECTORS: u32 = 128;
const BLOCK: u64 = 64 * KIB;
const NR_DATA_BLOCKS: u64 = 64;

/// Skip (return) unless the VM and the host thin tools are usable.
macro_rules! require_vm {
    () => {
        if let Some(why) = vm_skip_reason() {
            eprintln!("SKIPPED: lvm-vm test: {why}");
            return;
        }
        if !on_path("thin_restore") || !on_path("thin_check") || !on_path("thin_dump") {
            eprintln!("SKIPPED: lvm-vm test: host thin-provisioning-tools missing");
            return;
        }
    };
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("spawn thin tool");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The mappings of `thin_dump` XML: dev id -> (virtual block -> data block).
#[derive(Debug, Default)]
struct Dump {
    transaction: u64,
    devices: BTreeMap<u64, BTreeMap<u64, u64>>,
}

fn attr(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = line[start..].find('"')?;
    line[start..start + len].parse().ok()
}

fn parse_dump(xml: &str) -> Dump {
    let mut dump = Dump::default();
    let mut cur = None;
    for line in xml.lines().map(str::trim) {
        if line.starts_with("<superblock") {
            dump.transaction = attr(line, "transaction").unwrap();
        } else if line.starts_with("<device") {
            let id = attr(line, "dev_id").unwrap();
            dump.devices.insert(id, BTreeMap::new());
            cur = Some(id);
        } else if line.starts_with("<single_mapping") {
            let m = dump.devices.get_mut(&cur.unwrap()).unwrap();
            m.insert(
                attr(line, "origin_block").unwrap(),
                attr(line, "data_block").unwrap(),
            );
        } else if line.starts_with("<range_mapping") {
            let m = dump.devices.get_mut(&cur.unwrap()).unwrap();
            let (o, d) = (
                attr(line, "origin_begin").unwrap(),
                attr(line, "data_begin").unwrap(),
            );
            for i in 0..attr(line, "length").unwrap() {
                m.insert(o + i, d + i);
            }
        }
    }
    dump
}

/// A thin device's content as the mapping and the data file say: mapped
/// blocks from the data file, zeros elsewhere, cut to `size` bytes.
fn contents(mapping: &BTreeMap<u64, u64>, data: &[u8], size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    for (&virt, &phys) in mapping {
        let dst = (virt * BLOCK) as usize;
        if dst >= out.len() {
            continue;
        }
        let n = (BLOCK as usize).min(out.len() - dst);
        let src = (phys * BLOCK) as usize;
        out[dst..dst + n].copy_from_slice(&data[src..src + n]);
    }
    out
}

/// The pool used by the thin_restore tests: device 1 (1 MiB + 32 KiB: its
/// last block only half visible), device 7 (512 KiB; shares data block 10
/// with device 1, as a snapshot would; one mapping beyond its size) and
/// device 9 (64 KiB, no mappings). Every data block holds distinct bytes.
const POOL_XML: &str = r#"<superblock uuid="" time="1" transaction="3" data_block_size="128" nr_data_blocks="64">
  <device dev_id="1" mapped_blocks="6" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="10" length="4" time="0"/>
    <single_mapping origin_block="7" data_block="40" time="0"/>
    <single_mapping origin_block="16" data_block="3" time="1"/>
  </device>
  <device dev_id="7" mapped_blocks="4" transaction="0" creation_time="1" snap_time="1">
    <single_mapping origin_block="0" data_block="10" time="0"/>
    <single_mapping origin_block="1" data_block="20" time="1"/>
    <single_mapping origin_block="5" data_block="63" time="1"/>
    <single_mapping origin_block="20" data_block="30" time="1"/>
  </device>
  <device dev_id="9" mapped_blocks="0" transaction="0" creation_time="1" snap_time="1">
  </device>
</superblock>
"#;
const POOL_DEVICES: [(u64, u64); 3] = [(1, 1024 * KIB + 32 * KIB), (7, 512 * KIB), (9, 64 * KIB)];

/// Write the thin_restore pool into `dir`; returns the host's view of each
/// device's content.
fn make_restored_pool(dir: &Path) -> BTreeMap<u64, Vec<u8>> {
    let (meta, data, xml) = (dir.join("metadata"), dir.join("data"), dir.join("pool.xml"));
    fs::write(&xml, POOL_XML).unwrap();
    fs::File::create(&meta)
        .unwrap()
        .set_len(4 * 1024 * KIB)
        .unwrap();
    tool(
        "thin_restore",
        &[
            "-q",
            "-i",
            xml.to_str().unwrap(),
            "-o",
            meta.to_str().unwrap(),
        ],
    );
    let mut bytes = Vec::new();
    for b in 0..NR_DATA_BLOCKS {
        bytes.extend(write_payload(10_000 + b as usize, BLOCK));
    }
    fs::write(&data, &bytes).unwrap();
    let dump = parse_dump(&tool("thin_dump", &[meta.to_str().unwrap()]));
    POOL_DEVICES
        .iter()
        .map(|&(dev, size)| (dev, contents(&dump.devices[&dev], &bytes, size)))
        .collect()
}

fn pool<'a>(meta: &'a Path, data: &'a Path) -> VmPool<'a> {
    VmPool {
        metadata: meta,
        data,
        data_block_sectors: BLOCK_SECTORS,
    }
}

#[test]
fn invalid_requests_are_rejected_on_the_host() {
    // No VM needed: these fail before booting.
    let dir = tempfile::tempdir().unwrap();
    let (meta, data) = (dir.path().join("metadata"), dir.path().join("data"));
    fs::write(&meta, vec![0u8; 8192]).unwrap();
    fs::write(&data, vec![0u8; (4 * BLOCK) as usize]).unwrap();
    let p = pool(&meta, &data);
    let devs = [(1, 128 * KIB)];
    for op in [
        KernelOp::Write {
            dev: 1,
            offset_bytes: 100,
            len: 512,
        },
        KernelOp::Write {
            dev: 1,
            offset_bytes: 0,
            len: 0,
        },
        KernelOp::Discard {
            dev: 1,
            offset_bytes: 128 * KIB,
            len: 512,
        },
        KernelOp::Write {
            dev: 2,
            offset_bytes: 0,
            len: 512,
        },
    ] {
        let err = kernel_run_ops(&p, true, 0, &devs, &[KernelOp::Create(1), op.clone()]);
        assert!(matches!(err, Err(VmError::Invalid(_))), "{op:?}: {err:?}");
    }
    let err = kernel_read_devices(&p, &[(1, 1000)]);
    assert!(matches!(err, Err(VmError::Invalid(_))), "{err:?}");
    // nothing was touched
    assert!(fs::read(&meta).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn kernel_reads_thin_restore_pool_read_only() {
    require_vm!();
    let dir = tempfile::tempdir().unwrap();
    let expected = make_restored_pool(dir.path());
    let (meta, data) = (dir.path().join("metadata"), dir.path().join("data"));
    let before = (fs::read(&meta).unwrap(), fs::read(&data).unwrap());

    let t = std::time::Instant::now();
    let got =
        kernel_read_devices(&pool(&meta, &data), &POOL_DEVICES).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("kernel_read_devices: {:.1} s", t.elapsed().as_secs_f64());

    assert_eq!(got, sha256_map(&expected));
    // the kernel saw the shared block and the half-visible last block
    assert_ne!(got[&1], sha256_hex(&vec![0; (1056 * KIB) as usize]));
    assert_eq!(got[&9], sha256_hex(&vec![0; (64 * KIB) as usize]));
    assert!(
        fs::read(&meta).unwrap() == before.0 && fs::read(&data).unwrap() == before.1,
        "read-only kernel read changed the pool files"
    );
}

#[test]
fn kernel_formats_fresh_pool_and_host_tools_read_it() {
    require_vm!();
    let dir = tempfile::tempdir().unwrap();
    let (meta, data) = (dir.path().join("metadata"), dir.path().join("data"));
    // junk in the superblock: `fresh` must zero it so the kernel formats
    let mut m = vec![0u8; (4 * 1024 * KIB) as usize];
    m[..4096].fill(0xa5);
    fs::write(&meta, &m).unwrap();
    fs::File::create(&data)
        .unwrap()
        .set_len(NR_DATA_BLOCKS * BLOCK)
        .unwrap();

    let devices = [(1, 1024 * KIB), (2, 1024 * KIB), (3, 256 * KIB)];
    let ops = [
        KernelOp::Create(1),
        KernelOp::Write {
            dev: 1,
            offset_bytes: 0,
            len: 192 * KIB,
        },
        KernelOp::Write {
            dev: 1,
            offset_bytes: 300 * KIB,
            len: 4 * KIB,
        }, // partial block: zeroed rest
        KernelOp::Snap { dev: 2, origin: 1 },
        KernelOp::Write {
            dev: 1,
            offset_bytes: 64 * KIB,
            len: 64 * KIB,
        }, // breaks sharing
        KernelOp::Write {
            dev: 2,
            offset_bytes: 512 * KIB,
            len: 512,
        },
        KernelOp::Create(3),
        KernelOp::Write {
            dev: 3,
            offset_bytes: 0,
            len: 128 * KIB,
        },
        KernelOp::Delete(3),
        KernelOp::Discard {
            dev: 1,
            offset_bytes: 32 * KIB,
            len: 160 * KIB,
        }, // whole blocks 1, 2
        KernelOp::SetTransactionId { old: 0, new: 1 },
        KernelOp::ReserveMetadataSnap,
        KernelOp::Write {
            dev: 1,
            offset_bytes: 896 * KIB,
            len: 64 * KIB,
        }, // after the snap
    ];
    let model = model_ops(BLOCK, &devices, BTreeMap::new(), &ops).unwrap();
    let run = kernel_run_ops(&pool(&meta, &data), true, 0, &devices, &ops)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "kernel_run_ops (fresh, {} ops): {:.1} s",
        ops.len(),
        run.elapsed.as_secs_f64()
    );
    eprintln!("pool status: {}", run.pool_status);
    assert_eq!(
        run.devices,
        sha256_map(&model),
        "guest stderr:\n{}",
        run.stderr
    );
    let status: Vec<&str> = run.pool_status.split_whitespace().collect();
    assert_eq!(
        &status[..4],
        ["0", "8192", "thin-pool", "1"],
        "{}",
        run.pool_status
    );
    assert_ne!(status[6], "-", "no held metadata root: {}", run.pool_status);

    // The host tools accept what the kernel wrote ...
    let (meta_s, data_bytes) = (meta.to_str().unwrap(), fs::read(&data).unwrap());
    tool("thin_check", &[meta_s]);
    let live = parse_dump(&tool("thin_dump", &[meta_s]));
    assert_eq!(live.transaction, 1);
    assert_eq!(live.devices.keys().copied().collect::<Vec<_>>(), [1, 2]);
    // ... and the mappings + data file give the same bytes the kernel read.
    for (dev, size) in [(1, 1024 * KIB), (2, 1024 * KIB)] {
        assert_eq!(
            contents(&live.devices[&dev], &data_bytes, size),
            model[&dev],
            "device {dev}"
        );
    }
    // The metadata snapshot: taken after set_transaction_id, before the last write.
    let snap = parse_dump(&tool("thin_dump", &["-m", meta_s]));
    assert_eq!(snap.transaction, 1);
    assert_eq!(snap.devices.keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert!(live.devices[&1].contains_key(&14) && !snap.devices[&1].contains_key(&14));

    // A second boot reads the committed pool back read-only.
    let again =
        kernel_read_devices(&pool(&meta, &data), &devices[..2]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, run.devices);
}

#[test]
fn kernel_changes_thin_restore_pool() {
    require_vm!();
    let dir = tempfile::tempdir().unwrap();
    let initial = make_restored_pool(dir.path());
    let (meta, data) = (dir.path().join("metadata"), dir.path().join("data"));

    let mut devices = POOL_DEVICES.to_vec();
    devices.push((5, 512 * KIB));
    let ops = [
        KernelOp::Write {
            dev: 1,
            offset_bytes: 2 * BLOCK,
            len: BLOCK,
        }, // in place: data block 12
        KernelOp::Write {
            dev: 1,
            offset_bytes: 0,
            len: 4 * KIB,
        }, // block 0 -> data 10, shared with 7
        KernelOp::Snap { dev: 5, origin: 7 },
        KernelOp::Discard {
            dev: 7,
            offset_bytes: 0,
            len: 2 * BLOCK,
        },
        KernelOp::Delete(9),
        KernelOp::SetTransactionId { old: 3, new: 4 },
    ];
    let model = model_ops(BLOCK, &devices, initial, &ops).unwrap();
    assert!(!model.contains_key(&9));
    let run = kernel_run_ops(&pool(&meta, &data), false, 0, &devices, &ops)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "kernel_run_ops (thin_restore pool, {} ops): {:.1} s",
        ops.len(),
        run.elapsed.as_secs_f64()
    );
    assert_eq!(
        run.devices,
        sha256_map(&model),
        "guest stderr:\n{}",
        run.stderr
    );

    let meta_s = meta.to_str().unwrap();
    tool("thin_check", &[meta_s]);
    let live = parse_dump(&tool("thin_dump", &[meta_s]));
    assert_eq!(live.transaction, 4);
    assert_eq!(live.devices.keys().copied().collect::<Vec<_>>(), [1, 5, 7]);
    // device 7 kept block 20 (discarded blocks 0, 1 -> gone), device 5 kept both
    assert_eq!(
        live.devices[&7].keys().copied().collect::<Vec<_>>(),
        [5, 20]
    );
    assert_eq!(
        live.devices[&5].keys().copied().collect::<Vec<_>>(),
        [0, 1, 5, 20]
    );
    assert_eq!(
        live.devices[&5][&0], 10,
        "snapshot still shares data block 10"
    );
    assert_ne!(
        live.devices[&1][&0], 10,
        "write to shared block 0 must break sharing"
    );
    let data_bytes = fs::read(&data).unwrap();
    for &(dev, size) in &devices {
        if let Some(m) = live.devices.get(&dev) {
            assert_eq!(contents(m, &data_bytes, size), model[&dev], "device {dev}");
        }
    }
}

#[test]
fn kernel_errors_come_back_with_the_kernel_log() {
    require_vm!();
    let dir = tempfile::tempdir().unwrap();
    let (meta, data) = (dir.path().join("metadata"), dir.path().join("data"));
    fs::File::create(&meta)
        .unwrap()
        .set_len(4 * 1024 * KIB)
        .unwrap();
    fs::File::create(&data)
        .unwrap()
        .set_len(NR_DATA_BLOCKS * BLOCK)
        .unwrap();
    // dm-thin refuses to create a device id twice
    let ops = [KernelOp::Create(1), KernelOp::Create(1)];
    match kernel_run_ops(&pool(&meta, &data), true, 0, &[(1, BLOCK)], &ops) {
        Err(VmError::Failed {
            status: Some(1),
            stderr,
            ..
        }) => {
            assert!(stderr.contains("pool message 'create_thin 1'"), "{stderr}");
            assert!(stderr.contains("dmesg:"), "{stderr}");
        }
        other => panic!("expected a guest failure, got {other:?}"),
    }
}
