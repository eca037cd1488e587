//! The pump used as a library, in process, over socket pairs: shows that it
//! is generic over `DataChannel` and pins flow-control details that are
//! awkward to reach through the binary.

use nix::poll::PollFlags;
use qrexec::channel::DataChannel;
use qrexec::local::{CloseMode, LocalFd, LocalInput, LocalOutput};
use qrexec::proto::{MsgHeader, MsgType, encode_data, encode_exit_code, encode_hello};
use qrexec::pump::{LocalSide, PumpConfig, PumpError, run_session};
use qrexec::socket_vchan::SocketChannel;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A channel whose free space is capped: every message must fit `cap`.
#[derive(Debug)]
struct Capped {
    inner: SocketChannel,
    cap: usize,
}

impl AsFd for Capped {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl DataChannel for Capped {
    fn wait_connected(&mut self, t: Duration) -> io::Result<()> {
        self.inner.wait_connected(t)
    }
    fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        assert!(
            buf.len() <= self.cap,
            "pump sent {} > space {}",
            buf.len(),
            self.cap
        );
        self.inner.send_all(buf)
    }
    fn read_ready(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_ready(buf)
    }
    fn data_ready(&mut self) -> usize {
        self.inner.data_ready()
    }
    fn buffer_space(&mut self) -> usize {
        self.inner.buffer_space().min(self.cap)
    }
    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }
    fn poll_events(&self) -> PollFlags {
        self.inner.poll_events()
    }
    fn wait(&mut self) -> io::Result<()> {
        self.inner.wait()
    }
}

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

fn read_msg(s: &mut UnixStream) -> Option<(u32, Vec<u8>)> {
    let mut h = [0u8; 8];
    if s.read_exact(&mut h).is_err() {
        return None;
    }
    let h = MsgHeader::decode(&h).unwrap();
    let mut b = vec![0u8; h.len as usize];
    s.read_exact(&mut b).unwrap();
    Some((h.ty, b))
}

#[test]
fn capped_space_bounds_every_message_and_prefix_goes_first() {
    let (ours, mut svc) = UnixStream::pair().unwrap();
    svc.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut ch = Capped {
        inner: SocketChannel::from_stream(ours, 65536, 65536).unwrap(),
        cap: 100,
    };
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
        feeder.write_all(&[b'z'; 1000]).unwrap();
        feeder.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let cfg = PumpConfig {
        prefix: b"P".repeat(150),
        ..PumpConfig::default()
    };
    let outcome = run_session(&mut ch, 4, &cfg, ends.local).unwrap();
    writer.join().unwrap();
    assert_eq!(outcome.exit_code(), 9);
    let (data, sizes) = service.join().unwrap();
    assert!(sizes.iter().all(|&s| s <= 92), "{sizes:?}");
    assert_eq!(&data[..150], &b"P".repeat(150)[..]);
    assert_eq!(&data[150..], &[b'z'; 1000][..]);
    let mut out = Vec::new();
    ends.output_peer.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"done");
    assert_eq!(*ends.stderr.0.lock().unwrap(), b"warn");
}

/// A channel whose sends start failing after `ok_sends` successful ones
/// (a peer that went away), while receiving keeps working.
#[derive(Debug)]
struct FailingSend {
    inner: SocketChannel,
    ok_sends: usize,
    failed: Option<std::sync::mpsc::Sender<()>>,
}

impl AsFd for FailingSend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl DataChannel for FailingSend {
    fn wait_connected(&mut self, t: Duration) -> io::Result<()> {
        self.inner.wait_connected(t)
    }
    fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.ok_sends == 0 {
            if let Some(tx) = self.failed.take() {
                tx.send(()).unwrap();
            }
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.ok_sends -= 1;
        self.inner.send_all(buf)
    }
    fn read_ready(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_ready(buf)
    }
    fn data_ready(&mut self) -> usize {
        self.inner.data_ready()
    }
    fn buffer_space(&mut self) -> usize {
        self.inner.buffer_space()
    }
    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }
    fn poll_events(&self) -> PollFlags {
        self.inner.poll_events()
    }
    fn wait(&mut self) -> io::Result<()> {
        self.inner.wait()
    }
}

#[test]
fn send_failure_stops_sending_but_keeps_receiving_the_exit_code() {
    // Our sends fail before the service's result arrives: no EOF is sent,
    // input is no longer read, and the exit code is still reported
    // (66c1519) instead of 1.
    let (ours, mut svc) = UnixStream::pair().unwrap();
    svc.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut ch = FailingSend {
        inner: SocketChannel::from_stream(ours, 65536, 65536).unwrap(),
        ok_sends: 3, // HELLO and two STDIN chunks
        failed: Some(tx),
    };
    let ends = local_ends();
    let mut feeder = ends.input_peer.try_clone().unwrap();
    let service = std::thread::spawn(move || {
        svc.write_all(&encode_hello(4)).unwrap();
        assert_eq!(read_msg(&mut svc).unwrap().0, 0x300);
        rx.recv_timeout(TIMEOUT).expect("no send failed");
        svc.write_all(&encode_data(MsgType::DataStdout, b"bye"))
            .unwrap();
        svc.write_all(&encode_data(MsgType::DataStdout, b""))
            .unwrap();
        svc.write_all(&encode_exit_code(5)).unwrap();
        let mut got = Vec::new();
        while let Some(m) = read_msg(&mut svc) {
            got.push(m);
        }
        got
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
    drop(ch);
    let got = service.join().unwrap();
    assert_eq!(got.len(), 2, "two STDIN chunks and no EOF: {:?}", got.len());
    assert!(got.iter().all(|(t, b)| *t == 0x190 && !b.is_empty()));
}

#[test]
fn closed_channel_during_handshake_is_an_error() {
    let (ours, svc) = UnixStream::pair().unwrap();
    drop(svc);
    let mut ch = SocketChannel::from_stream(ours, 65536, 65536).unwrap();
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
