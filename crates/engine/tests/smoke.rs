use thinvol_engine::format::ThinId;
use thinvol_engine::{Pool, PoolConfig};

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pool");
    let pool = Pool::create(
        &p,
        &PoolConfig {
            data_size: 64 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    pool.create_thin(ThinId(1)).unwrap();
    let buf: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    pool.write(ThinId(1), 0, &buf).unwrap();
    pool.create_snap(ThinId(2), ThinId(1)).unwrap();
    pool.write(ThinId(1), 4096, &[7u8; 8192]).unwrap();
    pool.commit().unwrap();
    let mut r = vec![0u8; 1 << 20];
    pool.read(ThinId(2), 0, &mut r).unwrap();
    assert_eq!(r, buf);
    pool.close().unwrap();
    let out = std::process::Command::new("thin_check")
        .arg(p.join("metadata"))
        .output()
        .unwrap();
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    let out = std::process::Command::new("thin_dump")
        .arg(p.join("metadata"))
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    let pool = Pool::open(&p).unwrap();
    let mut r = vec![0u8; 1 << 20];
    pool.read(ThinId(2), 0, &mut r).unwrap();
    assert_eq!(r, buf);
}
