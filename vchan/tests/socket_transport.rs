//! The socket transport against plain unix-socket peers written here, with no
//! library of ours on the other side (the conventions of
//! qubes-core-vchan-socket: `<dir>/vchan.<server>.<client>.<port>.sock`).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::Duration;

use vchan::{State, Transport, Vchan};

fn transport(dir: &std::path::Path, domid: u16) -> Transport {
    Transport::Socket {
        dir: dir.to_path_buf(),
        domid,
    }
}

#[test]
fn our_server_round_trip_with_plain_socket_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Vchan::server(&transport(dir.path(), 0), 5, 513, 65536, 65536).unwrap();
    assert_eq!(srv.state(), State::Waiting);
    let path = dir.path().join("vchan.0.5.513.sock");
    assert!(
        path.exists(),
        "server socket at the qubes-core-vchan-socket path"
    );

    let peer = thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        s.write_all(b"world!").unwrap();
        // Close: the server must still read what was sent, then see EOF.
    });

    srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(srv.state(), State::Connected);
    assert!(
        !dir.path().join("vchan.0.5.513.sock").exists(),
        "one connection only: the socket is gone once a client is in"
    );
    srv.send(b"hello").unwrap();
    let mut got = [0u8; 6];
    srv.recv(&mut got).unwrap();
    assert_eq!(&got, b"world!");
    peer.join().unwrap();
    let mut rest = [0u8; 16];
    assert_eq!(srv.read(&mut rest).unwrap(), 0, "EOF after the peer closed");
    assert_eq!(srv.state(), State::Closed);
    let e = srv.write(b"x").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
}

/// Output a server wrote before its client came reaches the client while
/// the server makes no further call (qubes-core-vchan-socket's
/// `test_write_then_connect`, where its I/O thread sends it): the accept
/// helper takes the client and sends it; the server's fd turns readable,
/// and its next call takes the connection over with the count sent.
#[test]
fn output_written_before_the_client_came_arrives_without_a_further_call() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Vchan::server(&transport(dir.path(), 0), 5, 514, 4096, 4096).unwrap();
    assert_eq!(srv.write(b"early bytes").unwrap(), 11);
    assert_eq!(srv.buffer_space().unwrap(), 4096 - 11);
    let mut s = UnixStream::connect(dir.path().join("vchan.0.5.514.sock")).unwrap();
    // A bounded wait: a server that only sends in its own calls never does.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = [0u8; 11];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early bytes");
    // The server's fd says something happened (the helper accepted).
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&srv),
        srv.poll_interest(),
    )];
    assert_eq!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap(),
        1
    );
    assert_eq!(srv.state(), State::Connected);
    assert_eq!(srv.buffer_space().unwrap(), 4096, "what went out is gone");
    srv.write_all(b"later").unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"later");
    s.write_all(b"back").unwrap();
    let mut back = [0u8; 4];
    srv.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"back");
}

/// A server that queued output and is closed before any client came: the
/// helper stops, nothing hangs, the socket is gone.
#[test]
fn closing_a_server_with_early_output_and_no_client_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Vchan::server(&transport(dir.path(), 0), 5, 515, 4096, 4096).unwrap();
    srv.write_all(b"nobody reads this").unwrap();
    drop(srv);
    assert!(!dir.path().join("vchan.0.5.515.sock").exists());
}

#[test]
fn our_client_retries_until_plain_server_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vchan.7.3.1000.sock");
    let p2 = path.clone();
    let server = thread::spawn(move || {
        thread::sleep(Duration::from_millis(350));
        let l = UnixListener::bind(&p2).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 100_000];
        s.read_exact(&mut buf).unwrap();
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        s.write_all(&buf[..1000]).unwrap();
    });
    let mut cli =
        Vchan::client(&transport(dir.path(), 3), 7, 1000, Duration::from_secs(10)).unwrap();
    let data: Vec<u8> = (0..100_000).map(|i| (i % 251) as u8).collect();
    cli.write_all(&data).unwrap();
    let mut back = vec![0u8; 1000];
    cli.read_exact(&mut back).unwrap();
    assert_eq!(back, data[..1000]);
    server.join().unwrap();
    drop(path);
}

#[test]
fn client_times_out_when_no_server() {
    let dir = tempfile::tempdir().unwrap();
    let e = Vchan::client(&transport(dir.path(), 3), 7, 1, Duration::from_millis(250)).unwrap_err();
    assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::TimedOut);
}

#[test]
fn loopback_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Vchan::server(&transport(dir.path(), 4), 4, 1, 0, 0),
        Err(vchan::Error::Loopback { domid: 4 })
    ));
    assert!(matches!(
        Vchan::client(&transport(dir.path(), 4), 4, 1, Duration::from_secs(1)),
        Err(vchan::Error::Loopback { domid: 4 })
    ));
}

#[test]
fn packets_larger_than_the_ring_are_errors_not_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Vchan::server(&transport(dir.path(), 0), 1, 9, 1024, 1024).unwrap();
    let path = dir.path().join("vchan.0.1.9.sock");
    let _c = UnixStream::connect(&path).unwrap();
    srv.wait_connected(Some(Duration::from_secs(5))).unwrap();
    assert!(srv.send(&[0u8; 4096]).is_err());
    let mut big = [0u8; 4096];
    assert!(srv.recv(&mut big).is_err());
}

#[test]
fn non_blocking_mode_would_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Vchan::server(&transport(dir.path(), 0), 1, 10, 1024, 1024).unwrap();
    let path = dir.path().join("vchan.0.1.10.sock");
    let _c = UnixStream::connect(&path).unwrap();
    srv.wait_connected(Some(Duration::from_secs(5))).unwrap();
    srv.set_blocking(false);
    let mut b = [0u8; 8];
    assert_eq!(
        srv.read(&mut b).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    assert_eq!(srv.data_ready().unwrap(), 0);
    assert!(srv.buffer_space().unwrap() > 0);
}

#[test]
fn oversized_ring_request_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Vchan::server(&transport(dir.path(), 0), 1, 1, (1 << 20) + 1, 0).unwrap_err();
    assert!(e.to_string().contains("maximum"), "{e}");
}

#[test]
fn non_blocking_connect_retries_on_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = Vchan::client_start(&transport(dir.path(), 3), 7, 55).unwrap();
    assert_eq!(conn.retry_interval(), Some(Duration::from_millis(100)));
    assert!(conn.poll().unwrap().is_none());
    let l = UnixListener::bind(dir.path().join("vchan.7.3.55.sock")).unwrap();
    let mut v = conn
        .poll()
        .unwrap()
        .expect("connects once the server is there");
    let (mut s, _) = l.accept().unwrap();
    s.write_all(b"ok").unwrap();
    let mut b = [0u8; 2];
    v.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ok");
}

/// Fills the peer's socket buffer with non-blocking sends until our end
/// holds bytes back; returns how many bytes the vchan accepted.
fn send_until_held_back(v: &mut Vchan) -> usize {
    v.set_blocking(false);
    let chunk = vec![0xabu8; 4096];
    let mut sent = 0;
    for _ in 0..100_000 {
        match v.send(&chunk) {
            Ok(n) => sent += n,
            Err(vchan::Error::WouldBlock) => break,
            Err(e) => panic!("send: {e}"),
        }
        if v.poll_interest().contains(nix::poll::PollFlags::POLLOUT) {
            break;
        }
    }
    sent
}

#[test]
fn socket_poll_interest_asks_for_pollout_while_output_is_held_back() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Vchan::server(&transport(dir.path(), 0), 5, 513, 65536, 65536).unwrap();
    // Listening: the new connection makes the socket readable.
    assert_eq!(srv.poll_interest(), PollFlags::POLLIN);
    let path = dir.path().join("vchan.0.5.513.sock");
    let mut peer = UnixStream::connect(&path).unwrap();
    srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
    let idle = srv.poll_interest();
    assert!(idle.contains(PollFlags::POLLIN), "{idle:?}");
    assert!(
        !idle.contains(PollFlags::POLLOUT),
        "nothing held back: {idle:?}"
    );

    // The peer reads nothing: the socket fills up and our end holds bytes.
    let sent = send_until_held_back(&mut srv);
    let held = srv.poll_interest();
    assert!(
        held.contains(PollFlags::POLLOUT),
        "{held:?} after {sent} bytes"
    );

    // The peer drains everything; the fd turns writable for exactly the
    // interest we were given, and consume_events flushes the rest.
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; sent];
        peer.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0xab));
        peer
    });
    for _ in 0..1000 {
        let want = srv.poll_interest();
        if !want.contains(PollFlags::POLLOUT) {
            break;
        }
        let mut fds = [PollFd::new(srv.as_fd(), want)];
        let n = poll(&mut fds, PollTimeout::from(10_000u16)).unwrap();
        assert_eq!(n, 1, "the fd must fire for the interest it gave");
        srv.consume_events().unwrap();
    }
    assert!(!srv.poll_interest().contains(PollFlags::POLLOUT));
    reader.join().unwrap();
}

#[test]
fn socket_poll_interest_drops_pollin_while_the_receive_buffer_is_full() {
    use nix::poll::PollFlags;
    let dir = tempfile::tempdir().unwrap();
    // 1024-byte buffers: the peer's 4 KiB fills ours.
    let mut srv = Vchan::server(&transport(dir.path(), 0), 5, 513, 1024, 1024).unwrap();
    let path = dir.path().join("vchan.0.5.513.sock");
    let mut peer = UnixStream::connect(&path).unwrap();
    srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
    peer.write_all(&[1u8; 4096]).unwrap();
    for _ in 0..1000 {
        if srv.data_ready().unwrap() == 1024 {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(srv.data_ready().unwrap(), 1024);
    // A slow reader of ours must not make a poll loop spin on POLLIN.
    let full = srv.poll_interest();
    assert!(!full.contains(PollFlags::POLLIN), "{full:?}");
    let mut buf = [0u8; 1024];
    srv.recv(&mut buf).unwrap();
    assert!(srv.poll_interest().contains(PollFlags::POLLIN));
    // Once the peer is gone and that is known, nothing is asked for (a
    // hang-up would make poll return at once, forever).
    drop(peer);
    let mut rest = Vec::new();
    srv.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), 4096 - 1024);
    assert_eq!(srv.poll_interest(), PollFlags::empty());
}
