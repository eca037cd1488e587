//! How `Xs::open` / `Watcher::open` find xenstored (XENSTORED_PATH,
//! XENSTORED_RUNDIR), and the device transport. The environment is set
//! for a child process (this test binary re-run on one test), never
//! mutated in the threaded test process.

mod common;

use std::process::Command;

use common::Env;
use xenstore::{Watcher, Xs};

const CHILD: &str = "XS_TEST_CHILD";

fn run_child(test: &str, envs: &[(&str, &std::path::Path)]) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove("XENSTORED_PATH")
        .env_remove("XENSTORED_RUNDIR");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "child {test} failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

#[test]
fn xenstored_path_names_a_socket() {
    let env = Env::new(&[0, 4]);
    run_child(
        "child_expects_domain_4",
        &[("XENSTORED_PATH", &env.server.socket_path(4))],
    );
}

#[test]
fn xenstored_rundir_socket() {
    let env = Env::new(&[0, 4]);
    std::os::unix::fs::symlink(env.server.socket_path(4), env.dir.path().join("socket")).unwrap();
    run_child(
        "child_expects_domain_4",
        &[("XENSTORED_RUNDIR", env.dir.path())],
    );
}

#[test]
fn child_expects_domain_4() {
    if !in_child() {
        return;
    }
    let xs = Xs::open().unwrap();
    assert_eq!(xs.own_domid().unwrap(), 4);
    let w = Watcher::open().unwrap();
    w.watch("domid", "d").unwrap();
    assert_eq!(w.next_event().unwrap().path, "domid");
}

/// A FIFO opened read-write stands in for `/dev/xen/xenbus`: what we write
/// comes back, so a READ "reply" echoes the request. It exercises opening a
/// non-socket path, writing a whole message and reading it back framed.
#[test]
fn device_transport_over_a_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("xenbus");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let xs = Xs::open_device(&fifo).unwrap();
    assert_eq!(xs.read("domid").unwrap(), b"domid\0");
    assert_eq!(xs.read("a/b").unwrap(), b"a/b\0");
    run_child("child_fifo_via_env", &[("XENSTORED_PATH", &fifo)]);
}

#[test]
fn child_fifo_via_env() {
    if !in_child() {
        return;
    }
    let xs = Xs::open().unwrap();
    assert_eq!(xs.read("x").unwrap(), b"x\0");
}

#[test]
fn missing_paths_are_open_errors() {
    let dir = tempfile::tempdir().unwrap();
    let nothing = dir.path().join("nothing");
    assert!(
        matches!(Xs::connect_unix(&nothing), Err(xenstore::Error::Open { path, .. }) if path == nothing)
    );
    assert!(matches!(
        Xs::open_device(&nothing),
        Err(xenstore::Error::Open { .. })
    ));
    assert!(matches!(
        Watcher::connect_unix(&nothing),
        Err(xenstore::Error::Open { .. })
    ));
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Xs>();
    check::<Watcher>();
    check::<xenstore::server::Server>();
    check::<xenstore::Error>();
}
