//! send/receive/verify over ssh with a real sshd on loopback (issue #5): the test
//! starts its own `sshd -D` on a free port with a generated host key and an
//! authorized client key, and a `--remote-thinvol` wrapper that points the remote
//! thinvol at the receiving side's state directory. Skipped (with a note) when sshd or
//! ssh is missing or the test does not run as root (scripts/test.sh installs them).

mod send_common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use send_common::*;

struct Sshd {
    child: Child,
    port: u16,
    opts: Vec<String>,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(p: &str) -> bool {
    Path::new(p).exists()
}

fn start_sshd(dir: &Path) -> Option<Sshd> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !have("/usr/sbin/sshd") || !have("/usr/bin/ssh") {
        eprintln!("note: skipping the ssh test (needs root, /usr/sbin/sshd and ssh)");
        return None;
    }
    std::fs::create_dir_all("/run/sshd").ok();
    let keygen = |f: &Path| {
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(f)
            .status()
            .unwrap()
            .success();
        assert!(ok, "ssh-keygen");
    };
    let host = dir.join("host_key");
    let id = dir.join("id");
    keygen(&host);
    keygen(&id);
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\n\
             PidFile {}\nLogLevel ERROR\n",
            host.display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let opts = vec![
        format!("IdentityFile={}", id.display()),
        "StrictHostKeyChecking=no".to_string(),
        "UserKnownHostsFile=/dev/null".to_string(),
        "BatchMode=yes".to_string(),
        "LogLevel=ERROR".to_string(),
    ];
    let s = Sshd { child, port, opts };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "sshd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(s)
}

#[test]
fn send_receive_verify_over_ssh_with_resume() {
    let e = Env::new();
    let Some(sshd) = start_sshd(e.tmp.path()) else {
        return;
    };
    // The remote side: its own state directory, reached through a wrapper.
    let remote_home = e.path("remote-home");
    let wrapper = e.path("remote-thinvol");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nTHINVOL_HOME={} exec {} \"$@\"\n",
            remote_home.display(),
            bin()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let remote = |args: &[&str]| {
        let o = Command::new(&wrapper).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let dst_dir = e.p("dst");
    remote(&["pool", "create", "dst", "--dir", &dst_dir, "--size", "256M"]);
    e.pool("src");
    e.ok(&["create", "src/vm", "--size", "8M"]);
    let mut rng = Rng(0x55);
    let mut img = vec![0u8; 8 * MIB];
    mutate(&mut img, &mut rng, 10);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s1"]);
    mutate(&mut img, &mut rng, 30);
    e.set_image("src/vm", &img);
    e.ok(&["snapshot", "src/vm@s2"]);

    let url = format!("ssh://root@127.0.0.1:{}/dst/vm", sshd.port);
    let mut common: Vec<String> = Vec::new();
    for o in &sshd.opts {
        common.push("--ssh-opt".into());
        common.push(o.clone());
    }
    common.push("--remote-thinvol".into());
    common.push(wrapper.to_str().unwrap().into());
    let c: Vec<&str> = common.iter().map(String::as_str).collect();

    // Full stream with --to.
    e.ok(&[&["send", "-q", "src/vm@s1", "--to", &url], c.as_slice()].concat());
    // An interrupted incremental through a plain `| ssh host thinvol receive` pipe.
    let s = e.send(&["src/vm@s2", "--from", "@s1"]);
    let mut ssh = Command::new("ssh");
    ssh.arg("-p").arg(sshd.port.to_string());
    for o in &sshd.opts {
        ssh.arg("-o").arg(o);
    }
    let mut ch = ssh
        .arg("root@127.0.0.1")
        .arg(format!(
            "THINVOL_CHECKPOINT_BYTES=131072 {} receive dst/vm",
            wrapper.display()
        ))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut si = ch.stdin.take().unwrap();
    si.write_all(&s[..s.len() * 3 / 4]).unwrap();
    drop(si);
    let o = ch.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(
        token_in(&o.stderr).is_some(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The remote still holds @s1 only.
    let list = String::from_utf8(remote(&["list", "dst", "-t", "snapshot"])).unwrap();
    assert!(
        list.contains("dst/vm@s1") && !list.contains("dst/vm@s2"),
        "{list}"
    );
    // Resume: the sender asks the remote for its token and continues.
    let out = e.ok(&[
        &[
            "send",
            "src/vm@s2",
            "--from",
            "@s1",
            "--to",
            &url,
            "--resume",
            "--json",
        ],
        c.as_slice(),
    ]
    .concat());
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(j["start_seq"].as_u64().unwrap() > 1, "resumed: {j}");
    // Verify across ssh, cheap and full; and the bytes.
    let rs = format!("ssh://root@127.0.0.1:{}/dst/vm@s2", sshd.port);
    for mode in [None, Some("--full")] {
        let mut args = vec!["verify", "src/vm@s2", rs.as_str()];
        args.extend(mode);
        let out = e.ok(&[args.as_slice(), c.as_slice()].concat());
        assert!(out.starts_with("equal"), "{out}");
    }
    let exported = e.p("r.raw");
    remote(&["export", "dst/vm@s2", &exported, "-q"]);
    assert_eq!(std::fs::read(&exported).unwrap(), img);
    // A mismatch is reported with its ranges: s1 against the replica's s2.
    let o = e.run(
        &[
            &["verify", "--full", "src/vm@s1", rs.as_str()],
            c.as_slice(),
        ]
        .concat(),
    );
    assert_eq!(o.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&o.stdout).contains("differs at bytes"));
    thin_check_ok(Path::new(&dst_dir));
}
