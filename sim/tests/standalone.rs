//! `qubes-sim agent` and `qubes-sim daemon` on their own, without the
//! supervisor, as the Xen lab runs them (an agent per domU, a daemon per
//! domU in dom0 with the VM list from `--config`): here on the Local
//! transport, with the hubs in this test process.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Member processes, killed and reaped on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What `cksum` prints for the data (read from stdin).
fn cksum(data: &[u8]) -> String {
    let out = common::call_with(Command::new("cksum"), data);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(p: &Path, procs: &mut Procs) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        for c in &mut procs.0 {
            if let Some(st) = c.try_wait().unwrap() {
                panic!("a member exited early: {st}");
            }
        }
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn standalone_agents_and_daemons_route_calls() {
    let tmp = tempfile::Builder::new().prefix("qsa").tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("sim");
    let xen_dir = dir.join("xen");
    let _xen = vchan::LocalXen::start(&xen_dir, &[0, 5, 9]).unwrap();
    let rpc = root.join("rpc");
    std::fs::create_dir(&rpc).unwrap();
    common::script(&rpc, "test.Sum", "#!/bin/sh\nexec cksum\n");
    common::script(&rpc, "test.Exit", "#!/bin/sh\necho out; exit 3\n");
    std::fs::write(
        root.join("policy"),
        "test.Sum * a b allow\ntest.Exit * a b allow\n* * @anyvm @anyvm deny\n",
    )
    .unwrap();
    std::fs::write(
        root.join("sim.conf"),
        "vm a domid=5\nvm b domid=9\npolicy policy\n",
    )
    .unwrap();
    let exe = env!("CARGO_BIN_EXE_qubes-sim");
    let mut procs = Procs(Vec::new());
    let sock = |vm: &str| root.join(format!("{vm}.sock"));
    for (vm, domid) in [("a", 5), ("b", 9)] {
        let c = Command::new(exe)
            .args(["agent", "--transport", "local", "--vm", vm])
            .args(["--domid", &domid.to_string()])
            .arg("--dir")
            .arg(&dir)
            .arg("--socket")
            .arg(sock(vm))
            .arg("--home")
            .arg(root)
            .arg("--services")
            .arg(&rpc)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        procs.0.push(c);
    }
    for (vm, domid) in [("a", 5), ("b", 9)] {
        let c = Command::new(exe)
            .args(["daemon", "--transport", "local", "--vm", vm])
            .args(["--domid", &domid.to_string()])
            .arg("--dir")
            .arg(&dir)
            .arg("--config")
            .arg(root.join("sim.conf"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        procs.0.push(c);
    }
    for domid in [5, 9] {
        wait_for(&dir.join(format!("run/qrexec.{domid}")), &mut procs);
    }
    let call = |args: &[&str], input: &[u8]| {
        let mut c = Command::new(common::client_vm());
        c.env("VCHAN_LOCAL_DIR", &xen_dir)
            .env("VCHAN_DOMAIN", "5")
            .env_remove("VCHAN_SOCKET_DIR")
            .env_remove("VCHAN_TRANSPORT")
            .env("QREXEC_AGENT_SOCKET", sock("a"))
            .args(args);
        common::call_with(c, input)
    };
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| ((i * 7) >> 3) as u8).collect();
    let out = call(&["b", "test.Sum"], &data);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let want = cksum(&data);
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let out = call(&["--buffer-size=1048576", "b", "test.Sum"], &data);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let out = call(&["b", "test.Exit"], b"");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"out\n");
    // Denied by the policy; and a target the fixed VM list does not know.
    for target in ["b", "c"] {
        let out = call(&[target, "test.Other"], b"");
        assert_eq!(out.status.code(), Some(126), "{target}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Request refused"));
    }
    // Nothing exited on the way.
    for c in &mut procs.0 {
        assert!(c.try_wait().unwrap().is_none());
    }
}

#[test]
fn local_transport_needs_dir_and_domid() {
    let exe = env!("CARGO_BIN_EXE_qubes-sim");
    let out = Command::new(exe)
        .args(["agent", "--vm", "a", "--socket", "/nonexistent/x.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--transport local needs"));
    let out = Command::new(exe)
        .args([
            "daemon",
            "--vm",
            "a",
            "--domid",
            "3",
            "--dir",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--policy or --config"));
}
