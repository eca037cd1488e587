//! Our endpoint against a peer that behaves like MirageOS's ocaml-vchan
//! (`Compat::OcamlVchan`) over the Local transport: both roles, every ring
//! size class, stream and packet I/O; the ocaml-vchan behaviours a peer can
//! observe; and what a survivor sees when a Mirage peer dies (no
//! unmap-notify).

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use vchan::compat::ocaml_server_orders;
use vchan::{Compat, LocalXen, PortName, State, Vchan};

const T: Duration = Duration::from_secs(20);

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 7 + i / 251) as u8).wrapping_add(seed))
        .collect()
}

/// Every size class either implementation distinguishes, with both
/// in-page sizes, a request of 0, the asymmetric pairs that give ocaml-
/// vchan's overlapping (10, 20) layout, and (for an ocaml server only)
/// requests above 1 MiB.
fn sizes(ocaml_server: bool) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = [0usize, 1024, 2048, 4096, 1 << 13, 1 << 14, 1 << 15]
        .into_iter()
        .chain([1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20])
        .map(|s| (s, s))
        .collect();
    v.extend([(1024, 1 << 20), (1 << 20, 1024), (2048, 1024), (1025, 4097)]);
    if ocaml_server {
        v.extend([(1 << 21, 1 << 21), (usize::MAX, 0)]);
    }
    v
}

fn expected_orders(srv: Compat, read: usize, write: usize) -> (u8, u8) {
    match srv {
        Compat::OcamlVchan => ocaml_server_orders(read, write),
        Compat::Libxenvchan => vchan::control::server_orders(read, write).unwrap(),
    }
}

fn write_all(v: &mut Vchan, data: &[u8], packet: Option<usize>) {
    match packet {
        None => v.write_all(data).unwrap(),
        Some(p) => {
            for chunk in data.chunks(p) {
                assert_eq!(v.send(chunk).unwrap(), chunk.len());
            }
        }
    }
}

fn read_all(v: &mut Vchan, n: usize, packet: Option<usize>) -> Vec<u8> {
    let mut got = vec![0u8; n];
    match packet {
        None => v.read_exact(&mut got).unwrap(),
        Some(p) => {
            for chunk in got.chunks_mut(p) {
                assert_eq!(v.recv(chunk).unwrap(), chunk.len());
            }
        }
    }
    got
}

/// One connection: the server sends, the client checks and sends back, the
/// client closes and the server sees the end of the stream.
fn transfer(
    xen: &LocalXen,
    port: u32,
    srv_compat: Compat,
    cli_compat: Compat,
    (read, write): (usize, usize),
    packet: bool,
) {
    let what =
        format!("{srv_compat:?} server, {cli_compat:?} client, {read}/{write}, packet {packet}");
    let (lo, ro) = expected_orders(srv_compat, read, write);
    let bytes = (3usize << lo.max(ro)).clamp(100_003, 3 << 20);
    let pname = PortName::from(port);
    let mut srv = Vchan::server_with(&xen.transport(1), 2, &pname, read, write, srv_compat)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(srv.compat(), srv_compat);
    assert_eq!(
        (srv.read_ring_size(), srv.write_ring_size()),
        (1 << lo, 1 << ro),
        "{what}"
    );
    let t2 = xen.transport(2);
    let w2 = what.clone();
    let client = thread::spawn(move || {
        let mut c = Vchan::client_with(&t2, 1, &pname, T, cli_compat).unwrap();
        c.set_io_timeout(Some(T));
        assert_eq!(
            (c.read_ring_size(), c.write_ring_size()),
            (1 << ro, 1 << lo)
        );
        // Packets: odd sizes up to just over half the ring they cross.
        let down = packet.then(|| (1usize << ro) / 2 + 3);
        let up = packet.then(|| (1usize << lo) / 2 + 3);
        let got = read_all(&mut c, bytes, down);
        assert!(got == pattern(bytes, 7), "{w2}: server→client data differs");
        write_all(&mut c, &pattern(bytes, 9), up);
    });
    srv.set_io_timeout(Some(T));
    srv.wait_connected(Some(T)).unwrap();
    let down = packet.then(|| (1usize << ro) / 2 + 3);
    let up = packet.then(|| (1usize << lo) / 2 + 3);
    write_all(&mut srv, &pattern(bytes, 7), down);
    let back = read_all(&mut srv, bytes, up);
    assert!(
        back == pattern(bytes, 9),
        "{what}: client→server data differs"
    );
    client.join().unwrap();
    // The client has closed (its way): end of stream, then writes fail.
    let mut b = [0u8; 1];
    assert_eq!(srv.read(&mut b).unwrap(), 0, "{what}");
    assert_eq!(srv.state(), State::Closed, "{what}");
    assert!(srv.write(b"x").is_err(), "{what}");
}

fn matrix(srv: Compat, cli: Compat, packet: bool) {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    for (i, s) in sizes(srv == Compat::OcamlVchan).into_iter().enumerate() {
        transfer(&xen, 100 + i as u32, srv, cli, s, packet);
    }
}

#[test]
fn ours_server_mirage_client_every_size_stream() {
    matrix(Compat::Libxenvchan, Compat::OcamlVchan, false);
}

#[test]
fn ours_server_mirage_client_every_size_packet() {
    matrix(Compat::Libxenvchan, Compat::OcamlVchan, true);
}

#[test]
fn mirage_server_ours_client_every_size_stream() {
    matrix(Compat::OcamlVchan, Compat::Libxenvchan, false);
}

#[test]
fn mirage_server_ours_client_every_size_packet() {
    matrix(Compat::OcamlVchan, Compat::Libxenvchan, true);
}

#[test]
fn mirage_server_mirage_client_default_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    transfer(
        &xen,
        7,
        Compat::OcamlVchan,
        Compat::OcamlVchan,
        (1024, 1024),
        false,
    );
}

/// A connected pair in one process: (server in dom1, client in dom2).
fn pair(
    xen: &LocalXen,
    port: &PortName,
    srv: Compat,
    cli: Compat,
    r: usize,
    w: usize,
) -> (Vchan, Vchan) {
    let mut s = Vchan::server_with(&xen.transport(1), 2, port, r, w, srv).unwrap();
    let t2 = xen.transport(2);
    let p = port.clone();
    let c = thread::spawn(move || Vchan::client_with(&t2, 1, &p, T, cli).unwrap());
    s.wait_connected(Some(T)).unwrap();
    let c = c.join().unwrap();
    (s, c)
}

#[test]
fn mirage_reader_acknowledges_at_its_next_read() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let port = PortName::from(9);
    // Mirage client: its read ring is the server's 2 KiB write ring.
    let (mut s, mut c) = pair(
        &xen,
        &port,
        Compat::Libxenvchan,
        Compat::OcamlVchan,
        1024,
        1024,
    );
    assert_eq!(s.write_ring_size(), 2048);
    s.write_all(&[5u8; 2048]).unwrap();
    assert_eq!(s.peek_buffer_space().unwrap(), 0);
    let mut buf = [0u8; 4096];
    assert_eq!(c.read(&mut buf).unwrap(), 2048);
    assert_eq!(
        s.peek_buffer_space().unwrap(),
        0,
        "a Mirage reader must not free the space before its next read"
    );
    c.set_blocking(false);
    assert!(c.read_some(&mut buf).is_err(), "empty: would block");
    assert_eq!(
        s.peek_buffer_space().unwrap(),
        2048,
        "the next read acknowledged"
    );

    // Our reader frees the space at once.
    let port = PortName::from(10);
    let (mut s, mut c) = pair(
        &xen,
        &port,
        Compat::Libxenvchan,
        Compat::Libxenvchan,
        1024,
        1024,
    );
    s.write_all(&[5u8; 2048]).unwrap();
    assert_eq!(c.read(&mut buf).unwrap(), 2048);
    assert_eq!(s.peek_buffer_space().unwrap(), 2048);
}

#[test]
fn mirage_reads_stop_at_the_wrap_point() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    for (port, cli, expect) in [
        (11u32, Compat::OcamlVchan, vec![48, 52]),
        (12, Compat::Libxenvchan, vec![100]),
    ] {
        let (mut s, mut c) = pair(
            &xen,
            &PortName::from(port),
            Compat::Libxenvchan,
            cli,
            1024,
            1024,
        );
        s.write_all(&[1u8; 2000]).unwrap();
        let mut buf = vec![0u8; 4096];
        c.read_exact(&mut buf[..2000]).unwrap();
        // A Mirage reader frees those 2000 bytes only at its next read.
        c.set_blocking(false);
        assert!(c.read_some(&mut buf).is_err(), "nothing more yet");
        c.set_blocking(true);
        // 100 bytes from offset 2000 of a 2048-byte ring: 48, then 52.
        s.write_all(&pattern(100, 3)).unwrap();
        let mut sizes = Vec::new();
        let mut got = Vec::new();
        while got.len() < 100 {
            let n = c.read(&mut buf).unwrap();
            sizes.push(n);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(sizes, expect, "{cli:?}");
        assert_eq!(got, pattern(100, 3));
    }
}

#[test]
fn mirage_server_keeps_named_nodes_under_its_absolute_path_until_close() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let dom0 = xenstore::Xs::connect_unix(&vchan::local_xenstore_socket(dir.path(), 0)).unwrap();
    let port = PortName::new("mirage-fw_1").unwrap();
    let base = "/local/domain/1/data/vchan/2/mirage-fw_1";
    let (s, c) = pair(
        &xen,
        &port,
        Compat::OcamlVchan,
        Compat::Libxenvchan,
        1024,
        1024,
    );
    assert!(
        !dom0.read(&format!("{base}/ring-ref")).unwrap().is_empty(),
        "kept while connected"
    );
    let perms = dom0.get_perms(&format!("{base}/event-channel")).unwrap();
    assert_eq!(
        perms.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["n1", "r2"]
    );
    drop(c);
    drop(s);
    assert!(dom0.read(base).unwrap_err().is_enoent(), "removed at close");
    assert!(
        dom0.read("/local/domain/1/data/vchan/2")
            .unwrap_err()
            .is_enoent(),
        "and the empty per-client directory"
    );
    // Ours removes them as soon as the client connects.
    let (mut s, _c) = pair(
        &xen,
        &PortName::from(13),
        Compat::Libxenvchan,
        Compat::OcamlVchan,
        1024,
        1024,
    );
    assert_eq!(s.state(), State::Connected);
    assert!(
        dom0.read("/local/domain/1/data/vchan/2/13")
            .unwrap_err()
            .is_enoent()
    );
}

#[test]
fn mirage_server_closing_ends_our_client_stream_after_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let (mut s, mut c) = pair(
        &xen,
        &PortName::from(14),
        Compat::OcamlVchan,
        Compat::Libxenvchan,
        4096,
        4096,
    );
    s.write_all(b"last words").unwrap();
    drop(s);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    assert_eq!(c.state(), State::Closed);
}

#[test]
fn port_names_outside_ocaml_vchans_alphabet_are_refused() {
    for bad in ["", "a/b", "x y", "a.b"] {
        assert!(PortName::new(bad).is_err(), "{bad:?}");
    }
    let sock = vchan::Transport::Socket {
        dir: std::env::temp_dir(),
        domid: 1,
    };
    let e = Vchan::server_with(&sock, 2, &PortName::from(5), 0, 0, Compat::OcamlVchan).unwrap_err();
    assert!(e.to_string().contains("socket"), "{e}");
    let e = Vchan::server_with(
        &sock,
        2,
        &PortName::new("name").unwrap(),
        0,
        0,
        Compat::Libxenvchan,
    )
    .unwrap_err();
    assert!(e.to_string().contains("numeric"), "{e}");
}

// ---------------------------------------------------------------------------
// Death of a peer process (no unmap-notify for a Mirage one).

const PEER: &str = env!("CARGO_BIN_EXE_vchan-peer");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `vchan-peer` server in dom2 waiting to receive (so it sits blocked),
/// and our client in dom1 connected to it.
fn peer_server(xen: &LocalXen, port: &str, compat: &str) -> (Kill, Vchan) {
    let child = Command::new(PEER)
        .args(["server", "1", port, "recv", "1", "4", "--compat", compat])
        .env("VCHAN_LOCAL_DIR", xen.dir())
        .env("VCHAN_DOMAIN", "2")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let k = Kill(child);
    let c = Vchan::client_with(
        &xen.transport(1),
        2,
        &PortName::new(port).unwrap(),
        T,
        Compat::Libxenvchan,
    )
    .unwrap();
    (k, c)
}

#[test]
fn killed_libxenvchan_peer_is_seen_closed_through_unmap_notify() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let (mut k, mut c) = peer_server(&xen, "21", "libxenvchan");
    assert_eq!(c.state(), State::Connected);
    k.0.kill().unwrap();
    k.0.wait().unwrap();
    c.set_io_timeout(Some(T));
    let mut b = [0u8; 8];
    assert_eq!(c.read(&mut b).unwrap(), 0, "EOF from the cleared live byte");
    assert_eq!(c.state(), State::Closed);
}

/// Our survivor in dom1 plays a restricted domU (no privcmd, so it cannot
/// see its event-channel port turn unbound when the peer process dies):
/// the case where nothing but a bound can end a wait.
fn restricted_dom1(dir: &std::path::Path) -> LocalXen {
    let config = vchan::LocalXenConfig {
        restricted: vec![1],
        ..Default::default()
    };
    LocalXen::start_with(dir, &[0, 1, 2], config).unwrap()
}

#[test]
fn killed_mirage_peer_leaves_its_live_byte_and_only_our_io_timeout_ends_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let xen = restricted_dom1(dir.path());
    let (mut k, mut c) = peer_server(&xen, "mirage-22", "ocaml");
    k.0.kill().unwrap();
    k.0.wait().unwrap();
    c.set_io_timeout(Some(Duration::from_millis(2500)));
    let mut b = [0u8; 8];
    let e = c.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert_eq!(
        c.state(),
        State::Connected,
        "no unmap-notify: the dead Mirage peer still looks connected"
    );
}

#[test]
fn killed_mirage_peer_whose_domain_is_destroyed_ends_by_the_liveness_checks() {
    let dir = tempfile::tempdir().unwrap();
    let xen = restricted_dom1(dir.path());
    let (mut k, mut c) = peer_server(&xen, "mirage-23", "ocaml");
    k.0.kill().unwrap();
    k.0.wait().unwrap();
    xen.remove_domain(2).unwrap();
    // No I/O timeout: the liveness checks alone end the wait.
    let mut b = [0u8; 8];
    let e = c.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
}

#[test]
fn killed_mirage_client_leaves_our_server_waiting_until_its_io_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let xen = restricted_dom1(dir.path());
    let port = PortName::new("mirage-24").unwrap();
    let mut s =
        Vchan::server_with(&xen.transport(1), 2, &port, 4096, 4096, Compat::Libxenvchan).unwrap();
    let child = Command::new(PEER)
        .args(["client", "1", "mirage-24", "recv", "1", "--compat", "ocaml"])
        .env("VCHAN_LOCAL_DIR", xen.dir())
        .env("VCHAN_DOMAIN", "2")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut k = Kill(child);
    s.wait_connected(Some(T)).unwrap();
    k.0.kill().unwrap();
    k.0.wait().unwrap();
    s.set_io_timeout(Some(Duration::from_millis(2500)));
    let mut b = [0u8; 8];
    let e = s.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert_eq!(s.state(), State::Connected, "cli_live is still 1");
}

#[test]
fn connect_driven_from_poll_reaches_a_mirage_server() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let port = PortName::new("polled").unwrap();
    let mut s =
        Vchan::server_with(&xen.transport(1), 2, &port, 1024, 1024, Compat::OcamlVchan).unwrap();
    let mut c = Vchan::client_start_with(&xen.transport(2), 1, &port, Compat::Libxenvchan).unwrap();
    let deadline = std::time::Instant::now() + T;
    let mut c = loop {
        if let Some(v) = c.poll().unwrap() {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "no connect");
        let _ = s.poll_connected();
        thread::sleep(Duration::from_millis(5));
    };
    s.wait_connected(Some(T)).unwrap();
    assert_eq!((c.read_ring_size(), c.write_ring_size()), (2048, 1024));
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

/// The library does not print: a client that meets ocaml-vchan's (10, 20)
/// layout, whose grant list runs into the in-page ring, emits a `log`
/// warning, and a program that installed `vchan::stderr_log` (here
/// `vchan-peer`) shows it as one line on stderr, as users saw it before.
#[test]
fn overlapping_grant_list_is_one_warning_line_on_the_programs_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let port = PortName::from(25);
    let (read, write) = (1024, 1 << 20);
    assert_eq!(ocaml_server_orders(read, write), (10, 20));
    let mut s =
        Vchan::server_with(&xen.transport(1), 2, &port, read, write, Compat::OcamlVchan).unwrap();
    let child = Command::new(PEER)
        .args(["client", "1", "25", "recv", "1"])
        .env("VCHAN_LOCAL_DIR", xen.dir())
        .env("VCHAN_DOMAIN", "2")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.wait_connected(Some(T)).unwrap();
    // The peer waits for a transfer; closing ends it (with an error).
    drop(s);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("grant list runs into an in-page ring"))
        .collect();
    assert_eq!(
        warnings,
        [
            "vchan: warning: server's grant list runs into an in-page ring (orders 10/20; ocaml-vchan layout)"
        ],
        "{stderr}"
    );
}
