//! The `xenstored-sim` binary: serves the requested domains until SIGTERM,
//! then removes its sockets and exits 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("xenstored-sim did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serves_until_sigterm_and_cleans_up() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_xenstored-sim"))
            .args(["--dir", dir.path().to_str().unwrap(), "--domains", "0,1,7"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line == "ready" {
                break;
            }
            seen.push(line);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        let sock7 = dir.path().join("7.sock");
        let xs = xenstore::Xs::connect_unix(&sock7).unwrap();
        xs.set_reply_timeout(Some(Duration::from_secs(10)));
        assert_eq!(xs.own_domid().unwrap(), 7);
        xs.write("data/x", b"1").unwrap();
        let xs0 = xenstore::Xs::connect_unix(&dir.path().join("0.sock")).unwrap();
        assert_eq!(xs0.read("/local/domain/7/data/x").unwrap(), b"1");

        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        assert!(wait_exit(&mut child).success());
        for d in [0, 1, 7] {
            assert!(!dir.path().join(format!("{d}.sock")).exists());
        }
        assert!(xs.read("domid").is_err());
    }
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["--domains", "0"][..],
        &["--dir", "/tmp/x"],
        &["--dir", "/tmp/x", "--domains", "0,05"],
        &["--bogus"],
    ] {
        let st = Command::new(env!("CARGO_BIN_EXE_xenstored-sim"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(2), "{args:?}");
    }
}
