//! A hostile service under `qrexec-client-vm`, over the Local transport
//! (real shared memory): after the HELLO exchange it corrupts an index the
//! client reads (`right.cons`, its free space), then wakes the client. The call must
//! end with a clear message and a non-zero status, never hang on a ring
//! that can no longer be trusted (libxenvchan's silent hang,
//! qubes-issues #10833).

mod common;

use common::*;
use qrexec::proto::{ConnectionParams, MsgType, RequestFormat, encode_data, encode_hello};
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};
use vchan::control::{RIGHT_CONS, SharedHeader};
use vchan::{LocalXen, Vchan};

/// The client's own domain and the (hostile) service's domain.
const OWN: u16 = 1;
const SVC: u16 = 5;

#[test]
fn corrupted_ring_index_ends_the_call_with_an_error() {
    let h = Harness::new();
    let xen_dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(xen_dir.path(), &[0, OWN, SVC]).unwrap();
    let _agent = h.agent(
        RequestFormat::V4,
        AgentReply::Accept(ConnectionParams {
            connect_domain: SVC.into(),
            connect_port: PORT,
        }),
    );
    let mut cmd = h.client(&["target", "test.Service"]);
    cmd.env_remove("VCHAN_SOCKET_DIR")
        .env("VCHAN_LOCAL_DIR", xen_dir.path())
        .env("VCHAN_DOMAIN", OWN.to_string())
        // Input that never ends: the client has no reason to stop on its own.
        .stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let chunk = [0u8; 4096];
        while stdin.write_all(&chunk).is_ok() {}
    });

    // The service: map the client's control page as a second mapping of
    // ours, then connect as a normal vchan client.
    let page = xen
        .map_control_page(SVC, OWN, PORT, TIMEOUT)
        .unwrap_or_else(|e| panic!("no data vchan server appeared: {e}"));
    let mut v = Vchan::client(&xen.transport(SVC), OWN, PORT, TIMEOUT).unwrap();
    v.set_io_timeout(Some(TIMEOUT));
    v.write_all(&encode_hello(4)).unwrap();
    let mut hello = [0u8; 12];
    v.read_exact(&mut hello).unwrap();

    // right.cons: how far we, the service, consumed the ring
    // the client writes STDIN into; the client reads it to learn its free
    // space. A jump of 2^30 is more than any ring holds: a lie the client
    // must catch. Then a normal STDOUT message wakes the client up.
    std::thread::sleep(Duration::from_millis(200)); // the client fills the ring
    page.store_u32(RIGHT_CONS, page.load_u32(RIGHT_CONS).wrapping_add(1 << 30));

    let t0 = Instant::now();
    v.write_all(&encode_data(MsgType::DataStdout, b"x"))
        .unwrap();

    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = t0.elapsed();
    let err = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    let status =
        status.unwrap_or_else(|| panic!("the client hung on the corrupted ring; stderr: {err}"));
    assert_eq!(status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("corrupt") || err.contains("invalid"),
        "the message must say the ring is corrupt: {err}"
    );
    eprintln!("client ended {took:?} after the corruption: {}", err.trim());
    feeder.join().unwrap();
    drop(v);
    drop(page);
    drop(xen);
}
