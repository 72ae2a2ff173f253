//! Small reads of a regular file come from a mapping of it once
//! `FileStorage::map_for_reads` was called, as the pool does for its data file (storage/mapped.rs,
//! docs/design.md §4.1). These tests hold the mapping to the promises of `pread`:
//! the same bytes at every instant, and a failed page is an error, not a dead
//! process — while a SIGBUS that is not ours still kills the process.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::process::Command;

use rand::{Rng, SeedableRng};
use thinvol_engine::storage::{FileStorage, Storage};

const MIB: u64 = 1 << 20;

fn mapped(s: &FileStorage) {
    if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        assert!(
            s.mapped_reads(),
            "expected mapped reads on this platform: {s:?}"
        );
    }
}

/// Random small reads equal a model while writes, discards (hole punches) and
/// writes through a second descriptor go on between them.
#[test]
fn mapped_reads_see_every_write_and_punch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let len = 16 * MIB;
    let s = FileStorage::create(&path, len).unwrap().map_for_reads();
    mapped(&s);
    let other = OpenOptions::new().write(true).open(&path).unwrap();
    let mut model = vec![0u8; len as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..4000u32 {
        let off = rng.gen_range(0..len - 40_000);
        let n = rng.gen_range(1..40_000usize);
        match round % 4 {
            0 => {
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                s.write_at(&bytes, off).unwrap();
                model[off as usize..off as usize + n].copy_from_slice(&bytes);
            }
            1 => {
                let bytes = vec![(round % 251) as u8 | 1; n];
                other.write_all_at(&bytes, off).unwrap();
                model[off as usize..off as usize + n].copy_from_slice(&bytes);
            }
            2 => {
                s.discard(off, n as u64).unwrap();
                model[off as usize..off as usize + n].fill(0);
            }
            _ => {}
        }
        // Reads at the same place, then elsewhere; small (mapped) and large (pread).
        for (o, m) in [
            (off, n),
            (rng.gen_range(0..len - 70_000), rng.gen_range(1..70_000)),
        ] {
            let mut buf = vec![0xeeu8; m];
            s.read_at(&mut buf, o).unwrap();
            assert!(
                buf == model[o as usize..o as usize + m],
                "round {round}: {m} bytes at {o} differ from the model"
            );
        }
    }
}

/// A file truncated behind the storage's back: the mapped copy faults past the new
/// end (SIGBUS), the fault is caught, and the read fails as `pread` would.
#[test]
fn truncated_file_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let s = FileStorage::create(&path, 8 * MIB).unwrap().map_for_reads();
    mapped(&s);
    s.write_at(&[0x5a; 4096], 4 * MIB).unwrap();
    let mut buf = [0u8; 4096];
    s.read_at(&mut buf, 4 * MIB).unwrap();
    assert_eq!(buf, [0x5a; 4096]);

    // Someone else shrinks the file; our bounds still say 8 MiB.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    for off in [4 * MIB, 2 * MIB, MIB, 8 * MIB - 4096] {
        let e = s.read_at(&mut buf, off).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "read at {off}: {e}");
    }
    // A read straddling the new end copies part of it, faults, and fails too.
    let e = s.read_at(&mut buf, MIB - 2048).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    // What is still there still reads.
    s.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0; 4096]);
    // And it grows back: the same mapping serves the regrown range.
    s.grow(8 * MIB).unwrap();
    s.write_at(&[0xa5; 4096], 4 * MIB).unwrap();
    s.read_at(&mut buf, 4 * MIB).unwrap();
    assert_eq!(buf, [0xa5; 4096]);
}

/// Reads past the address space reserved for the mapping (the file grew more than
/// twofold, to over 1 GiB) use `pread`.
#[test]
fn growth_past_the_reservation_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let s = FileStorage::create(&path, MIB).unwrap().map_for_reads();
    mapped(&s);
    s.grow(3 << 30).unwrap(); // sparse
    for off in [MIB, (1 << 30) - 4096, (2 << 30) - 2048, (3 << 30) - 4096] {
        let bytes: Vec<u8> = (0..4096).map(|i| (i as u64 ^ off) as u8).collect();
        s.write_at(&bytes, off).unwrap();
        let mut buf = vec![0u8; 4096];
        s.read_at(&mut buf, off).unwrap();
        assert_eq!(buf, bytes, "at {off}");
    }
}

/// Child half of `a_sigbus_that_is_not_ours_still_kills`: map a file ourselves,
/// truncate it, touch the lost page.
#[test]
#[ignore = "run by a_sigbus_that_is_not_ours_still_kills in a child process"]
fn child_faults_outside_our_copy() {
    if std::env::var_os("THINVOL_SIGBUS_CHILD").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    // Installs our handler.
    let s = FileStorage::create(&path, MIB).unwrap().map_for_reads();
    mapped(&s);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("data"))
        .unwrap();
    // SAFETY: a private read-only mapping of a file we own; we then touch a page past
    // its end on purpose, which must raise SIGBUS.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            MIB as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        f.set_len(0).unwrap();
        let v = std::ptr::read_volatile((p as *const u8).add(8192));
        println!("read {v} past the end and lived");
    }
    std::process::exit(0);
}

#[test]
fn a_sigbus_that_is_not_ours_still_kills() {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_faults_outside_our_copy",
            "--ignored",
            "--nocapture",
        ])
        .env("THINVOL_SIGBUS_CHILD", "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGBUS),
        "child should die of SIGBUS: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Through the pool: a data file cut short behind the pool's back makes reads of the
/// lost blocks fail with an error naming the data block; the process lives on.
#[test]
fn pool_read_of_a_lost_page_is_an_error() {
    use std::time::Duration;
    use thinvol_engine::format::{DataBlockSize, ThinId};
    use thinvol_engine::{Pool, PoolConfig};
    let dir = tempfile::tempdir().unwrap();
    let cfg = PoolConfig {
        data_block_size: DataBlockSize::DEFAULT,
        data_size: 64 * MIB,
        metadata_size: None,
        commit_interval: Duration::ZERO,
    };
    let pool = Pool::create(dir.path(), &cfg).unwrap();
    pool.create_thin(ThinId(0)).unwrap();
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    for vb in 0..64u64 {
        pool.write(ThinId(0), vb * 65536 + 4096, &bytes).unwrap();
    }
    pool.commit().unwrap();
    let mut buf = vec![0u8; 4096];
    pool.read(ThinId(0), 63 * 65536 + 4096, &mut buf).unwrap();
    assert_eq!(buf, bytes);

    let data = dir.path().join(thinvol_engine::DATA_FILE);
    OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let mut failed = 0;
    // Backwards: forward reads this close together would count as a sequential stream
    // and go to pread, and this test is about the mapping.
    for vb in (0..64u64).rev() {
        match pool.read(ThinId(0), vb * 65536 + 4096, &mut buf) {
            Ok(()) => assert_eq!(buf, bytes, "block {vb} read back wrong bytes"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("data block"),
                    "error should name the data block: {msg}"
                );
                failed += 1;
            }
        }
    }
    // 1 MiB is 16 blocks of 64 KiB: every block past it is lost.
    assert!(failed >= 64 - 16, "only {failed} of 64 reads failed");
}
