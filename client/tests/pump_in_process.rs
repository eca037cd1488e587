//! The pump used as a library, in process, over the vchan crate's real
//! transports (the same code `qrexec-client-vm` ships): the socket
//! transport with a scripted peer on the raw byte stream (which is what a
//! `qubes-core-vchan-socket` peer sends), and the Local shared-memory
//! transport with a peer that is a real vchan client. Pins flow-control
//! details that are awkward to reach through the binary.

use qrexec::channel::DataChannel;
use qrexec::local::{CloseMode, LocalFd, LocalInput, LocalOutput};
use qrexec::proto::{MsgHeader, MsgType, encode_data, encode_exit_code, encode_hello};
use qrexec::pump::{LocalSide, PumpConfig, PumpError, run_session};
use qrexec::transport::VchanChannel;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vchan::{LocalXen, Transport, Vchan};

const TIMEOUT: Duration = Duration::from_secs(20);
const PEER: u16 = 5;
const PORT: u32 = 513;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Ends {
    local: LocalSide,
    input_peer: UnixStream,
    output_peer: UnixStream,
    stderr: Sink,
}

fn local_ends() -> Ends {
    let (input_ours, input_peer) = UnixStream::pair().unwrap();
    let (output_ours, output_peer) = UnixStream::pair().unwrap();
    input_peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    output_peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    let stderr = Sink::default();
    Ends {
        local: LocalSide {
            input: LocalInput::new(
                LocalFd::Owned(Arc::new(OwnedFd::from(input_ours))),
                CloseMode::Shutdown,
            ),
            output: LocalOutput {
                fd: LocalFd::Owned(Arc::new(OwnedFd::from(output_ours))),
                close: CloseMode::Shutdown,
            },
            stderr: Box::new(stderr.clone()),
            program: None,
            signals: None,
        },
        input_peer,
        output_peer,
        stderr,
    }
}

fn read_msg(s: &mut impl Read) -> Option<(u32, Vec<u8>)> {
    let mut h = [0u8; 8];
    if s.read_exact(&mut h).is_err() {
        return None;
    }
    let h = MsgHeader::decode(&h).unwrap();
    let mut b = vec![0u8; h.len as usize];
    s.read_exact(&mut b).unwrap();
    Some((h.ty, b))
}

/// Our data vchan server on the socket transport (domain 0, rings of
/// `ring` bytes each way) and a raw stream connected to it as the peer in
/// domain 5: the bytes a `qubes-core-vchan-socket` service would send.
fn socket_pair(dir: &Path, ring: usize) -> (VchanChannel, UnixStream) {
    let t = Transport::Socket {
        dir: dir.to_path_buf(),
        domid: 0,
    };
    let srv = Vchan::server(&t, PEER, PORT, ring, ring).unwrap();
    let mut ch = VchanChannel(srv);
    let peer = UnixStream::connect(vchan::socket_path(dir, 0, PEER, PORT)).unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    ch.wait_connected(TIMEOUT).unwrap();
    (ch, peer)
}

#[test]
fn small_ring_bounds_every_message_and_prefix_goes_first() {
    // A 1024-byte ring (the smallest): every STDIN message must fit it.
    let dir = tempfile::tempdir().unwrap();
    let (mut ch, mut svc) = socket_pair(dir.path(), 1024);
    let mut ends = local_ends();
    let service = std::thread::spawn(move || {
        svc.write_all(&encode_hello(4)).unwrap();
        assert_eq!(read_msg(&mut svc).unwrap().0, 0x300);
        let mut data = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let (ty, b) = read_msg(&mut svc).unwrap();
            assert_eq!(ty, 0x190);
            if b.is_empty() {
                break;
            }
            sizes.push(b.len());
            data.extend(b);
        }
        svc.write_all(&encode_data(MsgType::DataStderr, b"warn"))
            .unwrap();
        svc.write_all(&encode_data(MsgType::DataStdout, b"done"))
            .unwrap();
        svc.write_all(&encode_data(MsgType::DataStdout, b""))
            .unwrap();
        svc.write_all(&encode_exit_code(9)).unwrap();
        (data, sizes)
    });
    let mut feeder = ends.input_peer.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        feeder.write_all(&[b'z'; 5000]).unwrap();
        feeder.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let cfg = PumpConfig {
        prefix: b"P".repeat(1500),
        ..PumpConfig::default()
    };
    let outcome = run_session(&mut ch, 4, &cfg, ends.local).unwrap();
    writer.join().unwrap();
    assert_eq!(outcome.exit_code(), 9);
    let (data, sizes) = service.join().unwrap();
    assert!(sizes.iter().all(|&s| s <= 1024 - 8), "{sizes:?}");
    assert!(
        sizes.len() >= 7,
        "6500 bytes in ≤1016-byte messages: {sizes:?}"
    );
    assert_eq!(&data[..1500], &b"P".repeat(1500)[..]);
    assert_eq!(&data[1500..], &[b'z'; 5000][..]);
    let mut out = Vec::new();
    ends.output_peer.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"done");
    assert_eq!(*ends.stderr.0.lock().unwrap(), b"warn");
}

#[test]
fn held_back_output_is_flushed_without_waiting_for_the_peer() {
    // The socket transport keeps what the socket does not take in a private
    // buffer; the pump must poll for POLLOUT and flush it. 16 MiB upload to
    // a peer that only reads, then answers. (Before the fix this stalled
    // for the pump's 10 s poll timeout again and again; that the interest
    // includes POLLOUT is pinned without clocks in the vchan crate's
    // `socket_poll_interest` tests, and the real-stack cases bound it.)
    let dir = tempfile::tempdir().unwrap();
    let (mut ch, mut svc) = socket_pair(dir.path(), 65536);
    let ends = local_ends();
    const N: usize = 16 << 20;
    let service = std::thread::spawn(move || {
        svc.write_all(&encode_hello(4)).unwrap();
        assert_eq!(read_msg(&mut svc).unwrap().0, 0x300);
        let mut n = 0usize;
        loop {
            let (ty, b) = read_msg(&mut svc).unwrap();
            assert_eq!(ty, 0x190);
            if b.is_empty() {
                break;
            }
            n += b.len();
        }
        svc.write_all(&encode_data(MsgType::DataStdout, b""))
            .unwrap();
        svc.write_all(&encode_exit_code(0)).unwrap();
        n
    });
    let mut feeder = ends.input_peer.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![7u8; 65536];
        for _ in 0..N / chunk.len() {
            feeder.write_all(&chunk).unwrap();
        }
        feeder.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let outcome = run_session(&mut ch, 4, &PumpConfig::default(), ends.local).unwrap();
    writer.join().unwrap();
    assert_eq!(outcome.exit_code(), 0);
    assert_eq!(service.join().unwrap(), N);
}

#[test]
fn send_failure_stops_sending_but_keeps_receiving_the_exit_code() {
    // The peer stops reading (shutdown of its receiving side) while our
    // input is endless: our sends fail, no EOF is sent, input is no longer
    // read, and the exit code it sends afterwards is still reported
    // (QubesOS/qubes-core-qrexec@66c1519) instead of 1.
    let dir = tempfile::tempdir().unwrap();
    let (mut ch, mut svc) = socket_pair(dir.path(), 65536);
    let ends = local_ends();
    let mut feeder = ends.input_peer.try_clone().unwrap();
    let service = std::thread::spawn(move || {
        svc.write_all(&encode_hello(4)).unwrap();
        assert_eq!(read_msg(&mut svc).unwrap().0, 0x300);
        let first = read_msg(&mut svc).unwrap();
        assert_eq!(first.0, 0x190);
        assert!(!first.1.is_empty());
        svc.shutdown(std::net::Shutdown::Read).unwrap();
        // Give our side time to hit the failing send.
        std::thread::sleep(Duration::from_millis(200));
        svc.write_all(&encode_data(MsgType::DataStdout, b"bye"))
            .unwrap();
        svc.write_all(&encode_data(MsgType::DataStdout, b""))
            .unwrap();
        svc.write_all(&encode_exit_code(5)).unwrap();
    });
    let writer = std::thread::spawn(move || {
        // endless input; ends when the pump stops reading it
        let chunk = [1u8; 4096];
        while feeder.write_all(&chunk).is_ok() {}
    });
    let outcome = run_session(&mut ch, 4, &PumpConfig::default(), ends.local).unwrap();
    assert_eq!(outcome.remote_status, Some(5));
    assert_eq!(outcome.exit_code(), 5);
    let mut out = Vec::new();
    let mut op = ends.output_peer;
    op.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"bye");
    drop(ends.input_peer);
    writer.join().unwrap();
    service.join().unwrap();
}

#[test]
fn closed_channel_during_handshake_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ch, svc) = socket_pair(dir.path(), 65536);
    drop(svc);
    let ends = local_ends();
    let e = run_session(&mut ch, 4, &PumpConfig::default(), ends.local).unwrap_err();
    assert!(
        matches!(
            e,
            PumpError::ClosedDuringHandshake | PumpError::Channel { .. }
        ),
        "{e}"
    );
}

#[test]
fn whole_session_over_local_shared_memory() {
    // The Local transport: real shared-memory rings between our server in
    // domain 0 and a vchan client in domain 5 that plays a `cat` service.
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, PEER]).unwrap();
    let srv = Vchan::server(&xen.transport(0), PEER, PORT, 4096, 4096).unwrap();
    let mut ch = VchanChannel(srv);
    let peer_t = xen.transport(PEER);
    let service = std::thread::spawn(move || {
        let mut v = Vchan::client(&peer_t, 0, PORT, TIMEOUT).unwrap();
        v.set_io_timeout(Some(TIMEOUT));
        v.write_all(&encode_hello(4)).unwrap();
        assert_eq!(read_msg(&mut v).unwrap().0, 0x300);
        let mut n = 0usize;
        let mut sizes = Vec::new();
        loop {
            let (ty, b) = read_msg(&mut v).unwrap();
            assert_eq!(ty, 0x190);
            if b.is_empty() {
                break;
            }
            n += b.len();
            sizes.push(b.len());
            v.write_all(&encode_data(MsgType::DataStdout, &b)).unwrap();
        }
        v.write_all(&encode_data(MsgType::DataStdout, b"")).unwrap();
        v.write_all(&encode_exit_code(3)).unwrap();
        // Every message fits the 4 KiB ring with its header.
        assert!(sizes.iter().all(|&s| s <= 4096 - 8), "{sizes:?}");
        n
    });
    ch.wait_connected(TIMEOUT).unwrap();
    let mut ends = local_ends();
    // Input from a pipe: the pump's one-copy path (payload read from the
    // pipe straight into the shared ring, header written in front).
    let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
    ends.local.input = LocalInput::new(LocalFd::Owned(Arc::new(pipe_r)), CloseMode::Shutdown);
    let mut feeder = std::fs::File::from(pipe_w);
    const N: usize = 1 << 20;
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
        feeder.write_all(&data).unwrap();
    });
    let mut op = ends.output_peer.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        op.read_to_end(&mut out).unwrap();
        out
    });
    let outcome = run_session(&mut ch, 4, &PumpConfig::default(), ends.local).unwrap();
    writer.join().unwrap();
    assert_eq!(outcome.exit_code(), 3);
    assert_eq!(service.join().unwrap(), N);
    let out = reader.join().unwrap();
    assert_eq!(out.len(), N);
    assert!(out.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    drop(xen);
}

/// The service side of the same pump (`serve`, `Role::Service`, what the
/// simulated agent runs) with a real service process, over the Local
/// transport: the caller's STDIN (a payload, then EOF) reaches the
/// service's stdin socket and is echoed back as STDOUT, the service's
/// stderr comes as STDERR, both streams end with an empty message, and the
/// service's exit status arrives last as the exit code.
#[test]
fn service_side_runs_a_service_and_sends_its_exit_code() {
    use qrexec::pump::{ServiceSide, serve};
    use std::os::fd::AsFd;
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1]).unwrap();
    // The caller: a vchan server with a raw peer that speaks the protocol.
    let mut caller = Vchan::server(&xen.transport(0), 1, 600, 65536, 65536).unwrap();
    let agent = Vchan::client(&xen.transport(1), 0, 600, TIMEOUT).unwrap();
    caller.wait_connected(Some(TIMEOUT)).unwrap();
    caller.set_io_timeout(Some(TIMEOUT));

    let (stdin_ours, stdin_theirs) = UnixStream::pair().unwrap();
    stdin_ours.set_nonblocking(true).unwrap();
    let mut child = Command::new("sh")
        .args(["-c", "cat; echo oops >&2; exit 3"])
        .stdin(Stdio::from(OwnedFd::from(stdin_theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = OwnedFd::from(child.stdout.take().unwrap());
    let stderr = OwnedFd::from(child.stderr.take().unwrap());
    // The sim's agent builds it the same way (with non-blocking fds).
    let side = ServiceSide::new(stdout, Some(stderr), OwnedFd::from(stdin_ours), child);
    assert!(!qrexec::local::is_socket(side.stdout.fd.as_fd()));
    let agent_thread = std::thread::spawn(move || {
        let mut ch = VchanChannel(agent);
        serve(&mut ch, 3, side)
    });

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in payload.chunks(65536) {
        caller
            .write_all(&encode_data(MsgType::DataStdin, chunk))
            .unwrap();
    }
    caller
        .write_all(&encode_data(MsgType::DataStdin, &[]))
        .unwrap();

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_eof, mut err_eof) = (false, false);
    let code = loop {
        let (ty, body) = read_msg(&mut caller).expect("the service side closed early");
        match MsgType::from_u32(ty) {
            Some(MsgType::DataStdout) if body.is_empty() => out_eof = true,
            Some(MsgType::DataStdout) => out.extend_from_slice(&body),
            Some(MsgType::DataStderr) if body.is_empty() => err_eof = true,
            Some(MsgType::DataStderr) => err.extend_from_slice(&body),
            Some(MsgType::DataExitCode) => {
                break i32::from_le_bytes(body[..4].try_into().unwrap());
            }
            other => panic!("unexpected message {other:?}"),
        }
    };
    let outcome = agent_thread.join().unwrap().unwrap();
    assert_eq!(out, payload);
    assert_eq!(err, b"oops\n");
    assert!(out_eof && err_eof, "both streams end before the exit code");
    assert_eq!(code, 3);
    assert_eq!(outcome.local_status, Some(3));
    assert!(!outcome.closed_early);
}
