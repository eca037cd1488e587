//! Fuzz target: a whole data-channel session as a hostile service sends it,
//! through the code `qrexec-client-vm` ships: `qrexec::pump::run_session`
//! (handshake, the receive loop with `MessageDecoder::feed` and
//! `fill_payload`, output, exit code) over a real `vchan::Vchan` of the
//! socket transport (`qrexec::transport::VchanChannel`). The fuzz input is
//! what the service writes on its end of the stream; the first byte picks
//! our protocol version and the ring size.
//!
//! Errors are expected; panics, hangs (the peer closes after the input, so
//! every session must end) and unbounded allocation are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qrexec::channel::DataChannel;
use qrexec::local::{CloseMode, LocalFd, LocalInput, LocalOutput};
use qrexec::pump::{LocalSide, PumpConfig, run_session};
use qrexec::transport::VchanChannel;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

const PEER: u16 = 5;
const PORT: u32 = 513;

/// Discards what the pump writes to stderr.
struct Discard;

impl Write for Discard {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn drain(mut s: UnixStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut b = [0u8; 65536];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    })
}

/// `qrexec-client-vm` runs with SIGPIPE ignored (the Rust runtime does
/// that before `main`); libFuzzer's `main` does not, so do it here, or a
/// write to a service that went away would kill the fuzzer.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SIG_IGN installs no handler code; nothing else in this process changes SIGPIPE's disposition.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigIgn,
            )
        }
        .expect("ignore SIGPIPE");
    });
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fuzz_target!(|data: &[u8]| {
    ignore_sigpipe();
    let threads_before = threads();
    let Some((&sel, service_bytes)) = data.split_first() else {
        return;
    };
    let own_version = 2 + u32::from(sel % 3);
    let ring = [1024, 4096, 65536][usize::from(sel / 3 % 3)];

    let dir = tempfile::tempdir().unwrap();
    let t = vchan::Transport::Socket {
        dir: dir.path().to_path_buf(),
        domid: 0,
    };
    let mut ch = VchanChannel(vchan::Vchan::server(&t, PEER, PORT, ring, ring).unwrap());
    let peer = UnixStream::connect(vchan::socket_path(dir.path(), 0, PEER, PORT)).unwrap();
    ch.wait_connected(Duration::from_secs(10)).unwrap();

    // The service: writes the input, then closes its sending side; what
    // the pump sends is read and dropped.
    let mut writer = peer.try_clone().unwrap();
    let input = service_bytes.to_vec();
    let service = std::thread::spawn(move || {
        let _ = writer.write_all(&input);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let peer_reader = drain(peer);

    // Local side: stdin at EOF at once, stdout read and dropped.
    let (input_ours, input_peer) = UnixStream::pair().unwrap();
    drop(input_peer);
    let (output_ours, output_peer) = UnixStream::pair().unwrap();
    let output_reader = drain(output_peer);
    let local = LocalSide {
        input: LocalInput::new(
            LocalFd::Owned(Arc::new(OwnedFd::from(input_ours))),
            CloseMode::Shutdown,
        ),
        output: LocalOutput {
            fd: LocalFd::Owned(Arc::new(OwnedFd::from(output_ours))),
            close: CloseMode::Shutdown,
        },
        stderr: Box::new(Discard),
        program: None,
        signals: None,
    };
    let _ = run_session(&mut ch, own_version, &PumpConfig::default(), local);
    drop(ch);
    service.join().unwrap();
    peer_reader.join().unwrap();
    output_reader.join().unwrap();
    // Every thread the pump started must be gone once its output ended
    // (a parked writer thread holding the output open was a bug); waiting
    // here also keeps LeakSanitizer from seeing a thread mid-exit.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while threads() > threads_before {
        assert!(
            std::time::Instant::now() < deadline,
            "a thread of the pump outlived the session"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
});
