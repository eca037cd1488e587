//! The full server/client rendezvous over the Local transport (grant hub,
//! event hub, xenstored with per-domain permissions), in one process with
//! threads playing domains.

use std::io::{Read, Write};
use std::thread;
use std::time::Duration;

use vchan::{LocalXen, State, Vchan};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn round_trip(read_min: usize, write_min: usize, bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let t1 = xen.transport(1);
    let t2 = xen.transport(2);
    let mut srv = Vchan::server(&t1, 2, 4242, read_min, write_min).unwrap();
    assert_eq!(srv.state(), State::Waiting);
    let client = thread::spawn(move || {
        let mut c = Vchan::client(&t2, 1, 4242, Duration::from_secs(10)).unwrap();
        assert_eq!(c.state(), State::Connected);
        let mut got = vec![0u8; bytes];
        c.read_exact(&mut got).unwrap();
        assert!(got == pattern(bytes, 7), "server→client data differs");
        c.write_all(&pattern(bytes, 9)).unwrap();
        c
    });
    srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(srv.state(), State::Connected);
    assert_eq!(srv.read_ring_size(), expected_size(read_min, true));
    srv.write_all(&pattern(bytes, 7)).unwrap();
    let mut back = vec![0u8; bytes];
    srv.read_exact(&mut back).unwrap();
    assert!(back == pattern(bytes, 9), "client→server data differs");
    let c = client.join().unwrap();
    drop(c);
    // The client is gone: reads see EOF, writes fail with BrokenPipe.
    let mut b = [0u8; 1];
    assert_eq!(srv.read(&mut b).unwrap(), 0);
    assert_eq!(srv.state(), State::Closed);
    assert_eq!(
        srv.write(b"x").unwrap_err().kind(),
        std::io::ErrorKind::BrokenPipe
    );
}

fn expected_size(min: usize, left: bool) -> usize {
    let (l, r) = vchan::control::server_orders(min, min).unwrap();
    1 << if left { l } else { r }
}

#[test]
fn in_page_rings() {
    round_trip(0, 0, 100_000);
}

#[test]
fn qrexec_control_sizes() {
    round_trip(4096, 4096, 100_000);
}

#[test]
fn sixty_four_k_rings() {
    round_trip(65536, 65536, 1 << 20);
}

#[test]
fn one_meg_rings() {
    round_trip(1 << 20, 1 << 20, 4 << 20);
}

#[test]
fn server_removes_its_xenstore_nodes_on_connect() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let mut srv = Vchan::server(&xen.transport(1), 2, 600, 4096, 4096).unwrap();
    let dom0 = xenstore::Xs::connect_unix(&vchan::local_xenstore_socket(dir.path(), 0)).unwrap();
    let base = "/local/domain/1/data/vchan/2/600";
    assert!(!dom0.read(&format!("{base}/ring-ref")).unwrap().is_empty());
    let perms = dom0.get_perms(&format!("{base}/event-channel")).unwrap();
    assert_eq!(
        perms.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["n1", "r2"],
        "nodes owned by the server, readable by the client only"
    );
    // A third domain cannot read them.
    let dom0_3 = LocalXen::add_domain(&xen, 3);
    dom0_3.unwrap();
    let xs3 = xenstore::Xs::connect_unix(&vchan::local_xenstore_socket(dir.path(), 3)).unwrap();
    assert!(xs3.read(&format!("{base}/ring-ref")).is_err());
    let t2 = xen.transport(2);
    let c = thread::spawn(move || Vchan::client(&t2, 1, 600, Duration::from_secs(10)).unwrap());
    srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
    let _c = c.join().unwrap();
    assert!(
        dom0.read(base).unwrap_err().is_enoent(),
        "nodes removed on connect"
    );
    assert!(
        dom0.read("/local/domain/1/data/vchan/2")
            .unwrap_err()
            .is_enoent(),
        "empty per-peer directory removed too"
    );
}

#[test]
fn client_times_out_without_server() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let e = Vchan::client(&xen.transport(2), 1, 5, Duration::from_millis(400)).unwrap_err();
    assert!(matches!(e, vchan::Error::Timeout { .. }), "{e}");
}

#[test]
fn client_waiting_for_a_destroyed_domain_ends() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let t2 = xen.transport(2);
    let c = thread::spawn(move || Vchan::client(&t2, 1, 5, Duration::from_secs(30)));
    thread::sleep(Duration::from_millis(200));
    xen.remove_domain(1).unwrap();
    let e = c.join().unwrap().unwrap_err();
    assert!(matches!(e, vchan::Error::PeerGone { domid: 1, .. }), "{e}");
}

#[test]
fn server_waiting_for_a_destroyed_domain_ends() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let mut srv = Vchan::server(&xen.transport(1), 2, 5, 0, 0).unwrap();
    xen.remove_domain(2).unwrap();
    let e = srv
        .wait_connected(Some(Duration::from_secs(30)))
        .unwrap_err();
    assert!(matches!(e, vchan::Error::PeerGone { domid: 2, .. }), "{e}");
}

#[test]
fn loopback_refused() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1]).unwrap();
    assert!(matches!(
        Vchan::server(&xen.transport(1), 1, 5, 0, 0),
        Err(vchan::Error::Loopback { domid: 1 })
    ));
}

#[test]
fn packets_larger_than_the_ring_fail_fast() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let mut srv = Vchan::server(&xen.transport(1), 2, 9, 1024, 2048).unwrap();
    let t2 = xen.transport(2);
    let c = thread::spawn(move || Vchan::client(&t2, 1, 9, Duration::from_secs(10)).unwrap());
    srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
    let _c = c.join().unwrap();
    assert!(srv.send(&[0u8; 2049]).is_err());
    assert!(srv.send(&[0u8; 2048]).is_ok());
    let mut big = [0u8; 1025];
    assert!(srv.recv(&mut big).is_err());
}

#[test]
fn blocking_read_ends_when_the_peer_domain_is_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let mut srv = Vchan::server(&xen.transport(1), 2, 31, 4096, 4096).unwrap();
    let t2 = xen.transport(2);
    let c = thread::spawn(move || Vchan::client(&t2, 1, 31, Duration::from_secs(10)).unwrap());
    srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
    let mut cli = c.join().unwrap();
    // "xl destroy" of the server's domain: no event, no live-byte change.
    xen.remove_domain(1).unwrap();
    let started = std::time::Instant::now();
    let mut b = [0u8; 8];
    let e = cli.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(srv);
}

#[test]
fn non_blocking_connect_driven_from_poll() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let mut conn = Vchan::client_start(&xen.transport(2), 1, 44).unwrap();
    assert!(conn.poll().unwrap().is_none(), "no server yet");
    let t1 = xen.transport(1);
    let srv = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        let mut s = Vchan::server(&t1, 2, 44, 0, 0).unwrap();
        s.wait_connected(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"ping").unwrap();
        s
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut polls = 0;
    let mut v = loop {
        if let Some(v) = conn.poll().unwrap() {
            break v;
        }
        polls += 1;
        assert!(std::time::Instant::now() < deadline, "never connected");
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(1000u16)).unwrap();
    };
    assert!(
        polls < 50,
        "woken by the watch, not spinning ({polls} polls)"
    );
    let mut b = [0u8; 4];
    v.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    drop(srv.join().unwrap());
}

/// A server that goes away while its domain's xenstore transactions are
/// all taken (C xenstored's quota, held here by another process of the
/// domain) still removes its ring-ref/event-channel nodes, so that a storm
/// of calls does not pile stale nodes up against the node quota.
#[test]
fn server_nodes_go_even_without_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let srv = Vchan::server(&xen.transport(1), 2, 4343, 1024, 1024).unwrap();
    let dom0 = xenstore::Xs::connect_unix(&vchan::local_xenstore_socket(dir.path(), 0)).unwrap();
    let base = "/local/domain/1/data/vchan/2/4343";
    assert!(dom0.read(&format!("{base}/ring-ref")).is_ok());

    let hog = xenstore::Xs::connect_unix(&vchan::local_xenstore_socket(dir.path(), 1)).unwrap();
    let mut held = Vec::new();
    while let Ok(tx) = hog.begin() {
        held.push(tx);
        assert!(
            held.len() <= 11,
            "more transactions than C xenstored allows"
        );
    }
    drop(srv);
    let e = dom0.read(base).unwrap_err();
    assert!(e.is_enoent(), "{base} still there: {e}");
    drop(held);
}

/// The connect fd is readable at once when the server is already there:
/// a caller that waits on the fd before its first `poll()` (Qubes' C
/// agent does: `ppoll` on the watch fd, then `..._async_finish`) must not
/// sleep through a server that published before it started. xenstored's
/// registration events may arrive together with the WATCH replies and be
/// queued in user space, where the socket no longer shows them.
#[test]
fn connect_fd_is_readable_at_once_when_the_server_is_there() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let mut srv = Vchan::server(&xen.transport(1), 2, 45, 0, 0).unwrap();
    for round in 0..20 {
        let mut conn = Vchan::client_start(&xen.transport(2), 1, 45).unwrap();
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::from(3000u16)).unwrap();
        assert_eq!(
            n, 1,
            "round {round}: the fd stayed quiet with the server up"
        );
        // poll() may need more than one turn (the first one registers the
        // watch on the server's node); each turn the fd says when.
        let mut turns = 0;
        let mut v = loop {
            if let Some(v) = conn.poll().unwrap() {
                break v;
            }
            turns += 1;
            assert!(
                turns < 10,
                "round {round}: not connected after {turns} turns"
            );
            let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut fds, PollTimeout::from(3000u16)).unwrap();
            assert_eq!(n, 1, "round {round}, turn {turns}: the fd stayed quiet");
        };
        srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
        v.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        srv.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        drop(v);
        // The server of a closed client: a new one for the next round.
        srv = Vchan::server(&xen.transport(1), 2, 45, 0, 0).unwrap();
    }
}
