// Why this file is long (~1180 lines): it is the one data pump of both
// roles (client and service side) and must stay readable as one loop; about
// 220 lines are docs and comments, ~190 are the local ends (sources and
// sinks) the loop drives, ~530 the loop itself. A split of the local ends
// into their own file is the next natural cut.
//! The qrexec data pump, for both ends of a data channel:
//! docs/qrexec.md §6, §8, §14. HELLO, then local input → data messages,
//! data messages → local output, the EOF and half-close rules,
//! backpressure, the exit code.
//! One loop, parameterised by [`Role`] (as upstream's one `process_io` for
//! the agent and the client):
//!
//! | | [`Role::Client`] (`qrexec-client-vm`) | [`Role::Service`] (a VM's agent) |
//! |---|---|---|
//! | sends | local input as `MSG_DATA_STDIN` | the service's stdout and stderr as `MSG_DATA_STDOUT`, `MSG_DATA_STDERR` |
//! | receives | `STDOUT` → local output, `STDERR` → stderr, `EXIT_CODE` | `STDIN` → the service's stdin |
//! | ends | exit code received, both directions closed, local program reaped | all output sent, stdin closed: waits for the service and sends its exit code |
//!
//! The client side adds escape filtering, `--prefix-data`, SIGUSR1 and the
//! exit status. Payloads go from a local pipe or file straight into the
//! ring ([`DataChannel::send_message_from_fd`]); the loop's one wait is
//! [`DataChannel::wait_ready`] (look, spin, ask for an event and look
//! again, sleep: docs/vchan.md §5.4).
//!
//! Generic over [`DataChannel`], whose one implementation is the vchan
//! (`crate::transport::VchanChannel`, any transport).

use crate::channel::{DataChannel, FromFd, FromFdError};
use crate::filter::replace_escape_chars;
use crate::local::{
    CloseMode, LocalFd, LocalInput, LocalOutput, LocalProgram, OUTPUT_HIGH_WATER, OutputWriter,
    SPARE_BUFFERS, SignalWatch, WriterStatus, write_all_fd,
};
use crate::proto::{
    DecoderMode, MSG_HEADER_SIZE, Message, MessageDecoder, MsgHeader, MsgType, ProtoError,
    chunk_limit, encode_exit_code, encode_hello, negotiate,
};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::PollFlags;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;
use vchan::{Interest, Watch};

/// Poll timeout of the pump loop: only a safety net, every state change
/// that matters wakes the loop through a descriptor.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the service side looks whether the service exited, while it
/// has nothing else to wait for (no SIGCHLD watch there): its output has
/// ended, or it still runs.
const REAP_IDLE: Duration = Duration::from_millis(20);
const REAP_BUSY: Duration = Duration::from_millis(100);

/// Which end of the data channel the pump runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The calling side (`qrexec-client-vm`, the vchan server): local
    /// input goes out as `MSG_DATA_STDIN`, the service's stdout and stderr
    /// come in, then its exit code.
    Client,
    /// The service side (the target VM's agent, the vchan client): the
    /// service's stdout and stderr go out, `MSG_DATA_STDIN` comes in; the
    /// pump sends the service's exit code at the end.
    Service,
}

/// A failure that ends the call with exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The service broke the protocol (bad HELLO, too big chunk, unknown
    /// type, too old version).
    #[error("protocol error from the service: {0}")]
    Protocol(#[from] ProtoError),
    /// The data channel closed before the HELLO exchange completed.
    #[error("data vchan closed during the HELLO exchange")]
    ClosedDuringHandshake,
    /// A data channel operation failed.
    #[error("error while vchan {op}: {source}")]
    Channel {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A local operation (poll, thread start) failed.
    #[error("{op}: {source}")]
    Local {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

fn chan_err(op: &'static str) -> impl FnOnce(io::Error) -> PumpError {
    move |source| PumpError::Channel { op, source }
}

/// Whether a data-channel error says the peer corrupted the shared ring
/// (the vchan crate's `Error::Ring`, which converts to `InvalidData`): it
/// ends the call, unlike a peer that merely went away.
fn is_ring_corruption(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData
}

/// How the pump treats data.
#[derive(Debug, Clone, Default)]
pub struct PumpConfig {
    /// Replace escape characters in service stdout (docs/qrexec.md §10).
    pub filter_stdout: bool,
    /// Replace escape characters in service stderr (docs/qrexec.md §10).
    pub filter_stderr: bool,
    /// `--prefix-data`: sent as STDIN before any local input.
    pub prefix: Vec<u8>,
}

/// Writes service stderr to fd 2 with blocking writes (no backpressure, as
/// in the C client), also when fd 2 was made non-blocking by someone else.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_all_fd(io::stderr().as_fd(), buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The local side of the call.
pub struct LocalSide {
    /// Where STDIN data comes from.
    pub input: LocalInput,
    /// Where service STDOUT goes.
    pub output: LocalOutput,
    /// Where service STDERR goes (normally [`Stderr`]).
    pub stderr: Box<dyn Write + Send>,
    /// The local program, if any.
    pub program: Option<LocalProgram>,
    /// SIGCHLD/SIGUSR1 watch (local-program mode).
    pub signals: Option<SignalWatch>,
}

impl std::fmt::Debug for LocalSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSide")
            .field("input", &self.input)
            .field("output", &self.output)
            .field("program", &self.program)
            .field("signals", &self.signals)
            .finish_non_exhaustive()
    }
}

/// What happened, for the exit status (docs/qrexec.md §8.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PumpOutcome {
    /// The service's exit code, if one arrived.
    pub remote_status: Option<i32>,
    /// The local program's status (code or 128 + signal), if there was one.
    pub local_status: Option<i32>,
    /// Whether a local program was involved.
    pub had_local_program: bool,
    /// Whether the peer closed the channel before the call ended (the
    /// client: no exit code came; the service: none was sent).
    pub closed_early: bool,
}

impl PumpOutcome {
    /// The process exit status: the remote code if non-zero (255 when none
    /// arrived), else the local program's status, else 0. Only the low 8 bits
    /// survive, as with `exit()`.
    ///
    /// ```
    /// # use qrexec::pump::PumpOutcome;
    /// let o = |r, l, p| PumpOutcome { remote_status: r, local_status: l, had_local_program: p, ..PumpOutcome::default() };
    /// assert_eq!(o(Some(42), Some(0), true).exit_code(), 42);
    /// assert_eq!(o(Some(0), Some(1), true).exit_code(), 1);
    /// assert_eq!(o(None, Some(0), true).exit_code(), 255);
    /// assert_eq!(o(Some(0), None, false).exit_code(), 0);
    /// assert_eq!(o(Some(256), None, false).exit_code(), 0);
    /// ```
    pub fn exit_code(&self) -> u8 {
        let remote = self.remote_status.unwrap_or(-1);
        let code = if remote != 0 {
            remote
        } else if self.had_local_program {
            self.local_status.unwrap_or(-1)
        } else {
            0
        };
        code as u8
    }
}

/// The local side of a call on the service side: the service's stdio.
#[derive(Debug)]
pub struct ServiceSide {
    /// The service's stdout (sent as `MSG_DATA_STDOUT`). A pipe read until
    /// it is empty when non-blocking, else once per poll.
    pub stdout: LocalInput,
    /// The service's stderr (sent as `MSG_DATA_STDERR`), if it is captured.
    pub stderr: Option<LocalInput>,
    /// The service's stdin (what `MSG_DATA_STDIN` brings), ended with the
    /// caller's EOF. Written directly from the loop when non-blocking, else
    /// by an output thread.
    pub stdin: LocalOutput,
    /// The service itself: reaped while the pump runs (its stdin is closed
    /// then), waited for at the end, its status sent as the exit code.
    pub program: LocalProgram,
}

impl ServiceSide {
    /// A started service's stdio as the pump takes it: `stdout` and
    /// `stderr` are read (and shut down at their EOF), `stdin` is written
    /// (and shut down at the caller's EOF), `child` is reaped while the pump
    /// runs and its status sent as the exit code. The descriptors' modes
    /// are the caller's choice: non-blocking ones are read until empty and
    /// written from the loop, blocking ones once per poll and by an output
    /// thread.
    ///
    /// ```
    /// use std::os::fd::OwnedFd;
    /// use std::os::unix::net::UnixStream;
    /// use std::process::{Command, Stdio};
    /// let (ours, theirs) = UnixStream::pair()?;
    /// let mut child = Command::new("cat")
    ///     .stdin(Stdio::from(OwnedFd::from(theirs)))
    ///     .stdout(Stdio::piped())
    ///     .spawn()?;
    /// let stdout = OwnedFd::from(child.stdout.take().unwrap());
    /// let side = qrexec::pump::ServiceSide::new(stdout, None, OwnedFd::from(ours), child);
    /// assert!(side.stderr.is_none() && side.program.status.is_none());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new(stdout: OwnedFd, stderr: Option<OwnedFd>, stdin: OwnedFd, child: Child) -> Self {
        let stdout = Arc::new(stdout);
        let stdin = Arc::new(stdin);
        ServiceSide {
            stdout: LocalInput::new(LocalFd::Owned(stdout.clone()), CloseMode::Shutdown),
            stderr: stderr
                .map(|e| LocalInput::new(LocalFd::Owned(Arc::new(e)), CloseMode::Shutdown)),
            stdin: LocalOutput {
                fd: LocalFd::Owned(stdin.clone()),
                close: CloseMode::Shutdown,
            },
            program: LocalProgram {
                child: Some(child),
                status: None,
                to_child: stdin,
                from_child: stdout,
            },
        }
    }
}

/// Send our HELLO at once, then read the peer's (docs/qrexec.md §6: sending first is
/// required for dom0 services). Returns the negotiated version.
pub fn handshake<C: DataChannel + ?Sized>(ch: &mut C, own_version: u32) -> Result<u32, PumpError> {
    ch.send_all(&encode_hello(own_version))
        .map_err(chan_err("send(HELLO)"))?;
    let mut decoder = MessageDecoder::new(DecoderMode::Handshake);
    let mut buf = [0u8; MSG_HEADER_SIZE + 4];
    loop {
        // is_open before data_ready: a HELLO that arrived just before the
        // close must not be lost.
        let open = ch.is_open();
        let ready = ch.data_ready().map_err(chan_err("look at the ring"))?;
        if ready > 0 {
            let want = decoder.wanted().min(ready).min(buf.len());
            let n = ch.read_ready(&mut buf[..want]).map_err(chan_err("read"))?;
            let (_, msg) = decoder.feed(&buf[..n])?;
            if let Some(Message::Hello(peer)) = msg {
                let v = negotiate(own_version, peer)?;
                log::debug!("service announced version {peer}, using {v}");
                return Ok(v);
            }
            continue;
        }
        if !open {
            return Err(PumpError::ClosedDuringHandshake);
        }
        ch.wait_ready(Interest::data(1), &mut [], Some(POLL_TIMEOUT))
            .map_err(chan_err("wait"))?;
    }
}

/// Payloads at least this large are read from the ring straight into the
/// message's buffer (see `Pump::receive`); smaller ones are batched.
const DIRECT_PAYLOAD: usize = 4096;

/// One local descriptor whose data the pump sends, as messages of type `ty`.
#[derive(Debug)]
struct Source {
    /// `None` once it has ended.
    input: Option<LocalInput>,
    ty: MsgType,
    /// Known to have data (or EOF) to read now.
    readable: bool,
    /// Read until `EAGAIN` (a socket, read with `MSG_DONTWAIT`, or a
    /// non-blocking descriptor) instead of once per poll.
    drain: bool,
}

impl Source {
    fn new(input: LocalInput, ty: MsgType) -> Source {
        let mut s = Source {
            input: None,
            ty,
            readable: false,
            drain: false,
        };
        s.set(input);
        s
    }

    fn set(&mut self, input: LocalInput) {
        self.drain = input.is_socket() || is_nonblocking(input.fd.as_fd());
        self.input = Some(input);
        self.readable = false;
    }
}

fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
    fcntl(fd, FcntlArg::F_GETFL)
        .is_ok_and(|f| OFlag::from_bits_retain(f).contains(OFlag::O_NONBLOCK))
}

/// Where the payload of incoming stream messages goes.
///
/// The client writes its stdout from a thread ([`OutputWriter`]): the
/// descriptor is shared and may block. A non-blocking descriptor of our
/// own (the service's stdin on the service side) is written directly from
/// the loop, without a thread and its wake-ups: what does not fit waits
/// here and the loop polls for `POLLOUT`.
#[derive(Debug)]
enum Sink {
    Thread(OutputWriter),
    Direct(DirectSink),
}

#[derive(Debug)]
struct DirectSink {
    out: LocalOutput,
    queue: std::collections::VecDeque<Vec<u8>>,
    /// Written buffers, for the pump to fill again (as the thread's).
    spare: Vec<Vec<u8>>,
    /// Bytes of `queue[0]` already written.
    head: usize,
    pending: usize,
    close_requested: bool,
    closed: bool,
    broken: Option<String>,
}

impl DirectSink {
    /// Write what is queued until done or the descriptor is full, then
    /// close if that was asked for and nothing is left.
    fn flush(&mut self) {
        while let Some(buf) = self.queue.front() {
            if self.broken.is_some() {
                self.queue.clear();
                self.pending = 0;
                break;
            }
            match nix::unistd::write(self.out.fd.as_fd(), &buf[self.head..]) {
                Ok(n) => {
                    self.head += n;
                    self.pending -= n;
                    if self.head == buf.len() {
                        if let Some(done) = self.queue.pop_front()
                            && self.spare.len() < SPARE_BUFFERS
                        {
                            self.spare.push(done);
                        }
                        self.head = 0;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    // EPIPE and friends: nobody reads any more; discard.
                    log::debug!("write to local output: {e}");
                    self.broken = Some(e.to_string());
                }
            }
        }
        if self.close_requested && !self.closed && self.queue.is_empty() {
            self.out.close();
            self.closed = true;
        }
    }
}

impl Sink {
    fn start(output: LocalOutput) -> io::Result<Sink> {
        if is_nonblocking(output.fd.as_fd()) {
            return Ok(Sink::Direct(DirectSink {
                out: output,
                queue: Default::default(),
                spare: Vec::new(),
                head: 0,
                pending: 0,
                close_requested: false,
                closed: false,
                broken: None,
            }));
        }
        OutputWriter::start(output).map(Sink::Thread)
    }

    fn status(&self) -> WriterStatus {
        match self {
            Sink::Thread(w) => w.status(),
            Sink::Direct(d) => WriterStatus {
                pending: d.pending,
                closed: d.closed,
                broken: d.broken.clone(),
            },
        }
    }

    fn close_requested(&self) -> bool {
        match self {
            Sink::Thread(w) => w.close_requested(),
            Sink::Direct(d) => d.close_requested,
        }
    }

    fn request_close(&mut self) {
        match self {
            Sink::Thread(w) => w.request_close(),
            Sink::Direct(d) => {
                d.close_requested = true;
                d.flush();
            }
        }
    }

    /// Queue `data`; returns a written buffer to fill again, if one was
    /// kept (see [`OutputWriter::write`]).
    fn write(&mut self, data: Vec<u8>) -> Option<Vec<u8>> {
        match self {
            Sink::Thread(w) => w.write(data),
            Sink::Direct(d) => {
                if data.is_empty() || d.close_requested || d.broken.is_some() {
                    return None;
                }
                d.pending += data.len();
                d.queue.push_back(data);
                d.flush();
                d.spare.pop()
            }
        }
    }

    /// Before the loop's checks: consume the thread's wake-ups, or write
    /// what waits for the direct descriptor.
    fn refresh(&mut self, woken: bool) {
        match self {
            Sink::Thread(w) if woken => w.clear_wake(),
            Sink::Thread(_) => {}
            Sink::Direct(d) => d.flush(),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Sink::Thread(w) => w.fd(),
            Sink::Direct(d) => d.out.fd.as_fd(),
        }
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Sink::Thread(w) => Some(w.wake_fd()),
            Sink::Direct(_) => None,
        }
    }

    /// Write and close what is left (the client waits for its output
    /// thread; the direct sink closes now, discarding what would block).
    fn finish(self) {
        match self {
            Sink::Thread(w) => w.finish(),
            Sink::Direct(mut d) => {
                d.flush();
                if !d.closed {
                    d.out.close();
                }
            }
        }
    }
}

struct Pump<'a, C: DataChannel + ?Sized> {
    role: Role,
    ch: &'a mut C,
    limit: usize,
    cfg: &'a PumpConfig,
    writer: Sink,
    /// Whether a source's data went out in this round (then local input
    /// is streaming: the wait does not spin for the peer).
    sent_local: bool,
    /// Whether the output thread's wake-up descriptor fired in the last
    /// wait (then its counter is read once).
    woken: bool,
    /// When the program was last looked at without a SIGCHLD watch.
    last_reap: std::time::Instant,
    /// Where incoming `MSG_DATA_STDERR` goes (the service side discards it).
    stderr: Option<Box<dyn Write + Send>>,
    /// What we send: `sources[0]` is the main stream (local input, or the
    /// service's stdout), `--prefix-data` and SIGUSR1 apply to it.
    sources: Vec<Source>,
    prefix_sent: usize,
    sending: bool,
    remote_status: Option<i32>,
    program: Option<LocalProgram>,
    signals: Option<SignalWatch>,
    switched: bool,
    sigchld_seen: bool,
    warned_stdin_type: bool,
    decoder: MessageDecoder,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

impl<C: DataChannel + ?Sized> Pump<'_, C> {
    fn prefix_left(&self) -> usize {
        self.cfg.prefix.len().saturating_sub(self.prefix_sent)
    }

    fn has_input(&self) -> bool {
        self.sources.iter().any(|s| s.input.is_some())
    }

    /// Stop reading source `i`; `send_eof` says whether to tell the peer
    /// (an empty message of the source's type).
    fn close_input(&mut self, i: usize, send_eof: bool) -> Result<(), PumpError> {
        if let Some(inp) = self.sources[i].input.take() {
            if send_eof && self.sending {
                // An EOF that cannot be sent is ignored (QubesOS/qubes-core-qrexec@4c51f26): the peer
                // has usually gone already. Never block on it.
                if self
                    .ch
                    .buffer_space()
                    .map_err(chan_err("look at the ring"))?
                    >= MSG_HEADER_SIZE
                {
                    let hdr = MsgHeader::new(self.sources[i].ty, 0).encode();
                    if let Err(e) = self.ch.send_all(&hdr) {
                        log::debug!("sending EOF failed (ignored): {e}");
                    }
                } else {
                    log::debug!("no room for EOF in the vchan: not sent");
                }
            }
            inp.close();
            self.sources[i].readable = false;
        }
        Ok(())
    }

    fn close_inputs(&mut self, send_eof: bool) -> Result<(), PumpError> {
        for i in 0..self.sources.len() {
            self.close_input(i, send_eof)?;
        }
        Ok(())
    }

    /// SIGUSR1: read from the local program's stdin socket instead (docs/qrexec.md §12).
    /// Returns true if the input was switched now.
    fn check_signals(&mut self) -> bool {
        let Some(sig) = &self.signals else {
            return false;
        };
        let got = sig.take();
        // A SIGCHLD drained here must still lead to a reap before we sleep.
        self.sigchld_seen |= got.chld;
        if !got.usr1 || self.switched {
            return false;
        }
        self.switched = true;
        let Some(program) = &self.program else {
            return false;
        };
        let socket = LocalFd::Owned(program.to_child.clone());
        match self.sources[0].input.take() {
            Some(old) => {
                old.close();
                self.sources[0].set(LocalInput::new(socket, CloseMode::Shutdown));
                log::debug!("SIGUSR1: using the local program's stdin socket both ways");
                true
            }
            None => {
                log::debug!("SIGUSR1 after local input ended: ignored");
                false
            }
        }
    }

    fn handle(&mut self, msg: Message) -> Result<(), PumpError> {
        match msg {
            Message::Stdout(mut data) | Message::Stdin(mut data) => {
                if self.writer.close_requested() {
                    return Ok(()); // output already ended: discard
                }
                if data.is_empty() {
                    log::debug!("peer's stream EOF");
                    self.writer.request_close();
                    return Ok(());
                }
                if self.cfg.filter_stdout {
                    replace_escape_chars(&mut data);
                }
                // The buffer of a payload written earlier comes back to
                // be filled again: no allocation per message.
                if let Some(buf) = self.writer.write(data) {
                    self.decoder.recycle(buf);
                }
            }
            Message::Stderr(mut data) => {
                let Some(stderr) = self.stderr.as_mut() else {
                    return Ok(());
                };
                if data.is_empty() {
                    return Ok(());
                }
                if self.cfg.filter_stderr {
                    replace_escape_chars(&mut data);
                }
                if let Err(e) = stderr.write_all(&data) {
                    log::debug!("writing service stderr: {e}");
                }
                self.decoder.recycle(data);
            }
            Message::ExitCode(code) if self.role == Role::Client => {
                log::debug!("service exit code {code}");
                self.remote_status = Some(code);
                self.close_inputs(true)?;
            }
            // The caller sends no exit code; the data-mode decoder rejects
            // HELLO before it gets here.
            Message::ExitCode(_) | Message::Hello(_) => {}
        }
        Ok(())
    }

    /// Read and handle messages while the local output is not congested.
    ///
    /// Looks without asking the peer for events (the run loop asks right
    /// before it sleeps). A large payload (at least [`DIRECT_PAYLOAD`]
    /// bytes) is read from the ring straight into the message's own buffer,
    /// which goes to the output thread as is: no intermediate copy. Small
    /// messages are read in batches: all that is ready, up to one buffer,
    /// in one ring operation, split up here in private memory.
    fn receive(&mut self) -> Result<(), PumpError> {
        while self.writer.status().pending < OUTPUT_HIGH_WATER {
            let ready = self
                .ch
                .peek_data_ready()
                .map_err(chan_err("look at the ring"))?;
            if ready == 0 {
                break;
            }
            match self.decoder.payload_missing() {
                Some(missing) if missing >= DIRECT_PAYLOAD => {
                    let ch = &mut *self.ch;
                    let msg = self
                        .decoder
                        .fill_payload(ready, |b| ch.read_ready(b))
                        .map_err(chan_err("read"))?;
                    if let Some(m) = msg {
                        self.dispatch(m)?;
                    }
                    continue;
                }
                Some(_) => {}
                None => {
                    // A message boundary: take the header alone, to learn
                    // whether its payload is worth reading directly.
                    let want = self.decoder.wanted().min(ready);
                    let n = self
                        .ch
                        .read_ready(&mut self.rx[..want])
                        .map_err(chan_err("read"))?;
                    if n == 0 {
                        break;
                    }
                    let (_, msg) = self.decoder.feed(&self.rx[..n])?;
                    if let Some(m) = msg {
                        self.dispatch(m)?;
                    }
                    if self
                        .decoder
                        .payload_missing()
                        .is_none_or(|m| m >= DIRECT_PAYLOAD)
                    {
                        continue;
                    }
                }
            }
            // A small payload: batch it with what follows.
            let ready = self
                .ch
                .peek_data_ready()
                .map_err(chan_err("look at the ring"))?;
            let want = ready.min(self.rx.len());
            if want == 0 {
                break;
            }
            let n = self
                .ch
                .read_ready(&mut self.rx[..want])
                .map_err(chan_err("read"))?;
            if n == 0 {
                break;
            }
            let mut off = 0;
            while off < n {
                let (used, msg) = self.decoder.feed(&self.rx[off..n])?;
                off += used;
                if let Some(m) = msg {
                    self.dispatch(m)?;
                } else if used == 0 {
                    break; // cannot happen (feed takes at least one byte)
                }
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, m: Message) -> Result<(), PumpError> {
        if self.role == Role::Client && matches!(m, Message::Stdin(_)) && !self.warned_stdin_type {
            self.warned_stdin_type = true;
            log::debug!("service sent MSG_DATA_STDIN (old agent): treated as stdout");
        }
        self.handle(m)
    }

    /// Send a message of source `i`'s type whose payload is at
    /// `tx[8..8 + n]`. A failure stops sending but not receiving (QubesOS/qubes-core-qrexec@66c1519):
    /// no EOF is sent then.
    fn send_buffered(&mut self, i: usize, n: usize) -> Result<(), PumpError> {
        self.tx[..MSG_HEADER_SIZE]
            .copy_from_slice(&MsgHeader::new(self.sources[i].ty, n as u32).encode());
        match self.ch.send_all(&self.tx[..MSG_HEADER_SIZE + n]) {
            Ok(()) => Ok(()),
            Err(e) => self.send_failed(e),
        }
    }

    /// A send failed. A corrupted ring ends the call; anything else (the
    /// peer went away) is like #5597: not worth an error line when the exit
    /// code still arrives ("closed early" is reported if it does not), and
    /// it stops sending but not receiving (QubesOS/qubes-core-qrexec@66c1519): no EOF is sent then.
    fn send_failed(&mut self, e: io::Error) -> Result<(), PumpError> {
        if is_ring_corruption(&e) {
            return Err(PumpError::Channel {
                op: "send",
                source: e,
            });
        }
        log::debug!("error while vchan send (stop sending, keep receiving): {e}");
        self.sending = false;
        self.close_inputs(false)
    }

    /// Move prefix data and local input into the channel while it has room.
    fn send(&mut self) -> Result<(), PumpError> {
        for i in 0..self.sources.len() {
            self.send_source(i)?;
        }
        Ok(())
    }

    fn send_source(&mut self, i: usize) -> Result<(), PumpError> {
        while self.sending && self.sources[i].input.is_some() {
            let space = self
                .ch
                .peek_buffer_space()
                .map_err(chan_err("look at the ring"))?;
            if space <= MSG_HEADER_SIZE {
                break;
            }
            let max = (space - MSG_HEADER_SIZE).min(self.limit);
            let left = if i == 0 { self.prefix_left() } else { 0 };
            if left > 0 {
                let n = left.min(max);
                let start = self.prefix_sent;
                self.tx[MSG_HEADER_SIZE..MSG_HEADER_SIZE + n]
                    .copy_from_slice(&self.cfg.prefix[start..start + n]);
                self.prefix_sent += n;
                self.send_buffered(i, n)?;
                continue;
            }
            if !self.sources[i].readable {
                break;
            }
            let Some(inp) = self.sources[i].input.as_ref() else {
                break;
            };
            let socket = inp.is_socket();
            if !socket {
                // Pipes and files: the payload goes from the descriptor
                // straight into the ring, the header in front of it from
                // private memory (one copy, no bounce buffer). Sockets keep
                // the buffered path: they are read with MSG_DONTWAIT.
                if self.send_from_input(i, max)? {
                    continue;
                }
                break;
            }
            let r = inp.read(&mut self.tx[MSG_HEADER_SIZE..MSG_HEADER_SIZE + max]);
            match r {
                Ok(0) => {
                    // A SIGUSR1 sent before the program closed its stdout
                    // wins over that EOF.
                    if i == 0 && self.check_signals() {
                        continue;
                    }
                    log::debug!("local input EOF");
                    self.close_input(i, true)?;
                }
                Ok(n) => {
                    self.sent_local = true;
                    self.send_buffered(i, n)?
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sources[i].readable = false;
                }
                Err(e) => {
                    log::error!("error reading local input: {e}");
                    self.close_input(i, true)?;
                }
            }
        }
        Ok(())
    }

    /// One message read from a non-socket source straight into the channel
    /// (read once per poll unless the descriptor is non-blocking). Returns
    /// whether to go on sending in this round.
    fn send_from_input(&mut self, i: usize, max: usize) -> Result<bool, PumpError> {
        let src = &mut self.sources[i];
        let Some(inp) = src.input.as_ref() else {
            return Ok(false);
        };
        let ty = src.ty;
        let header = |n: usize| MsgHeader::new(ty, n as u32).encode();
        let r = self.ch.send_message_from_fd(inp.fd.as_fd(), max, &header);
        src.readable = src.drain;
        match r {
            Ok(FromFd::Sent(_)) => {
                self.sent_local = true;
                Ok(true)
            }
            Ok(FromFd::NoRoom) => {
                // Nothing was read: the input is still readable.
                src.readable = true;
                Ok(false)
            }
            Ok(FromFd::Eof) => {
                // A SIGUSR1 sent before the program closed its stdout wins
                // over that EOF.
                if i != 0 || !self.check_signals() {
                    log::debug!("local input EOF");
                    self.close_input(i, true)?;
                }
                Ok(true)
            }
            Err(FromFdError::Fd(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                src.readable = false;
                Ok(false)
            }
            Err(FromFdError::Fd(e)) if e.kind() == io::ErrorKind::Interrupted => {
                src.readable = true;
                Ok(true)
            }
            Err(FromFdError::Fd(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                self.close_input(i, true)?;
                Ok(true)
            }
            Err(FromFdError::Fd(e)) => {
                log::error!("error reading local input: {e}");
                self.close_input(i, true)?;
                Ok(true)
            }
            Err(FromFdError::Channel(e)) => {
                self.send_failed(e)?;
                Ok(false)
            }
        }
    }

    fn child_running(&self) -> bool {
        self.program.as_ref().is_some_and(|p| p.child.is_some())
    }

    /// Runs until the call is over; `Ok(true)` when the peer closed the
    /// channel first.
    fn run(&mut self) -> Result<bool, PumpError> {
        loop {
            self.check_signals();
            // Reap on SIGCHLD; without a signal watch (the service side)
            // now and then, and at once when its output has ended.
            let reap = if self.signals.is_some() {
                std::mem::take(&mut self.sigchld_seen) || self.last_reap.elapsed() >= POLL_TIMEOUT
            } else {
                !self.has_input() || self.last_reap.elapsed() >= REAP_BUSY
            };
            self.sigchld_seen = false;
            if reap {
                self.last_reap = std::time::Instant::now();
            }
            if reap
                && let Some(p) = self.program.as_mut()
                && p.child.is_some()
                && let Some(code) = p.try_reap()
            {
                log::debug!("local program exited with status {code}");
                // Stop writing to the program's stdin (docs/qrexec.md §12).
                self.writer.request_close();
            }
            self.writer.refresh(std::mem::take(&mut self.woken));
            if self.writer.status().broken.is_some() && !self.writer.close_requested() {
                // EPIPE etc.: local output ended; discard further data.
                self.writer.request_close();
            }

            self.receive()?;
            self.sent_local = false;
            self.send()?;

            // All done: both local directions closed, and on the client
            // side the exit code received and the local program reaped.
            let ws = self.writer.status();
            if ws.closed
                && !self.has_input()
                && (self.role == Role::Service
                    || (self.remote_status.is_some() && !self.child_running()))
            {
                return Ok(false);
            }
            // The peer has gone: is_open before data_ready (QubesOS/qubes-core-qrexec@bd07c52).
            let open = self.ch.is_open();
            if !open
                && self.ch.data_ready().map_err(chan_err("look at the ring"))? == 0
                && ws.pending == 0
            {
                if self.role == Role::Client && self.remote_status.is_none() {
                    log::error!("vchan connection closed early (no exit code from the service)");
                }
                return Ok(true);
            }
            self.wait(&ws)?;
        }
    }

    /// Sleep until something to do: the one wait of the loop
    /// ([`DataChannel::wait_ready`]). Data is waited for while the output
    /// takes more; space while a source has data but the ring has no room
    /// (then the source is not polled), the sources while there is room.
    /// The channel spins only when it is all the loop waits for.
    fn wait(&mut self, ws: &WriterStatus) -> Result<(), PumpError> {
        let has_input = self.sending && self.has_input();
        let room = has_input
            && self
                .ch
                .peek_buffer_space()
                .map_err(chan_err("look at the ring"))?
                > MSG_HEADER_SIZE;
        let any_readable = self.sources.iter().any(|s| s.input.is_some() && s.readable);
        let take_data = ws.pending < OUTPUT_HIGH_WATER;
        let mut want = Interest::NONE;
        if take_data {
            want.data = 1;
        }
        if has_input && !room {
            // Wait for half a chunk of room (batching), at most half the
            // ring: always reachable, also when the peer has read it all.
            want.space = MSG_HEADER_SIZE + self.limit.min(self.ch.write_ring_size()) / 2;
        }
        // Spin before sleeping when the ring is what moves: for space when
        // it is full, for data when no local input came this round. Not
        // while local input streams (then that input is what comes next:
        // a spin for the peer's data would burn its whole bound on every
        // chunk), nor with a signal to handle.
        want.spin = !self.sigchld_seen && (!room || !self.sent_local);
        // Something to do at once: only look, never sleep. A readable
        // source counts only while the ring has room for it (else it is
        // space we wait for).
        let timeout = if (any_readable && room)
            || self.sigchld_seen
            || (room && self.prefix_left() > 0 && self.sources[0].input.is_some())
        {
            Duration::ZERO
        } else if self.signals.is_none() && self.child_running() {
            // No SIGCHLD here: look for the program's exit now and then.
            if has_input { REAP_BUSY } else { REAP_IDLE }
        } else {
            POLL_TIMEOUT
        };
        // The output: its reader gone (POLLHUP/POLLERR, asked for with
        // no events) while idle, or room again in a direct sink.
        let direct = matches!(self.writer, Sink::Direct(_));
        let out_events = if direct && ws.pending > 0 {
            Some(PollFlags::POLLOUT)
        } else if !self.writer.close_requested() && ws.pending == 0 {
            Some(PollFlags::empty())
        } else {
            None
        };
        let prefix_left = self.prefix_left();
        let mut watches: Vec<Watch<'_>> = Vec::with_capacity(self.sources.len() + 3);
        let mut idx_in = [None; 2];
        if room {
            for (i, s) in self.sources.iter().enumerate().take(2) {
                if let Some(inp) = &s.input
                    && !s.readable
                    && (i != 0 || prefix_left == 0)
                {
                    idx_in[i] = Some(watches.len());
                    watches.push(Watch::new(inp.fd.as_fd(), PollFlags::POLLIN));
                }
            }
        }
        let idx_out = out_events.map(|ev| {
            watches.push(Watch::new(self.writer.fd(), ev));
            watches.len() - 1
        });
        let idx_wake = self.writer.wake_fd().map(|fd| {
            watches.push(Watch::new(fd, PollFlags::POLLIN));
            watches.len() - 1
        });
        if let Some(sig) = &self.signals {
            watches.push(Watch::new(sig.fd(), PollFlags::POLLIN));
        }
        self.ch
            .wait_ready(want, &mut watches, Some(timeout))
            .map_err(chan_err("wait"))?;
        let fired = |i: Option<usize>| i.map_or(PollFlags::empty(), |i| watches[i].revents());
        let in_fired = idx_in.map(|i| !fired(i).is_empty());
        let out_gone = fired(idx_out)
            .intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL);
        self.woken = !fired(idx_wake).is_empty();
        drop(watches);
        for (i, f) in in_fired.into_iter().enumerate() {
            if f {
                self.sources[i].readable = true;
            }
        }
        if out_gone {
            log::debug!("local output was closed by its reader");
            self.writer.request_close();
        }
        Ok(())
    }
}

/// One side's local ends, whichever the role.
struct Ends {
    output: LocalOutput,
    stderr: Option<Box<dyn Write + Send>>,
    sources: Vec<Source>,
    program: Option<LocalProgram>,
    signals: Option<SignalWatch>,
}

/// The pump for `role` over a connected channel whose HELLO exchange gave
/// `version`.
fn start<'a, C: DataChannel + ?Sized>(
    role: Role,
    ch: &'a mut C,
    version: u32,
    cfg: &'a PumpConfig,
    ends: Ends,
) -> Result<Pump<'a, C>, PumpError> {
    let Ends {
        output,
        stderr,
        sources,
        program,
        signals,
    } = ends;
    let limit = chunk_limit(version);
    let writer = Sink::start(output).map_err(|source| PumpError::Local {
        op: "starting the output thread",
        source,
    })?;
    Ok(Pump {
        role,
        ch,
        limit,
        cfg,
        writer,
        sent_local: false,
        woken: true,
        last_reap: std::time::Instant::now(),
        stderr,
        sources,
        prefix_sent: 0,
        sending: true,
        remote_status: None,
        program,
        signals,
        switched: false,
        sigchld_seen: false,
        warned_stdin_type: false,
        decoder: MessageDecoder::new(DecoderMode::Data { chunk_limit: limit }),
        rx: vec![0u8; limit + MSG_HEADER_SIZE],
        tx: vec![0u8; limit + MSG_HEADER_SIZE],
    })
}

/// Run the data phase of the client side over a connected channel whose
/// HELLO exchange gave `version`. Returns when the call is over
/// (docs/qrexec.md §8.4); the caller turns the outcome into the exit
/// status. Local descriptors are closed and the local program waited for
/// before returning.
pub fn run<C: DataChannel + ?Sized>(
    ch: &mut C,
    version: u32,
    cfg: &PumpConfig,
    local: LocalSide,
) -> Result<PumpOutcome, PumpError> {
    let had_local_program = local.program.is_some();
    let mut pump = start(
        Role::Client,
        ch,
        version,
        cfg,
        Ends {
            output: local.output,
            stderr: Some(local.stderr),
            sources: vec![Source::new(local.input, MsgType::DataStdin)],
            program: local.program,
            signals: local.signals,
        },
    )?;
    // A fatal error ends the call at once (exit 1), as in the C client: the
    // local program is not waited for and sees EOF when we exit.
    let closed_early = pump.run()?;
    // Close both local directions so a local program sees EOF, then wait
    // for it.
    for s in &mut pump.sources {
        if let Some(inp) = s.input.take() {
            inp.close();
        }
    }
    let Pump {
        writer,
        program,
        remote_status,
        ..
    } = pump;
    writer.finish();
    let local_status = program.map(|mut p| p.wait());
    Ok(PumpOutcome {
        remote_status,
        local_status,
        had_local_program,
        closed_early: closed_early && remote_status.is_none(),
    })
}

/// HELLO, then [`run`]: the whole data phase over a connected channel.
/// On a HELLO failure the local program (if any) is not waited for: like the
/// C client, the caller exits at once and the program sees EOF.
pub fn run_session<C: DataChannel + ?Sized>(
    ch: &mut C,
    own_version: u32,
    cfg: &PumpConfig,
    local: LocalSide,
) -> Result<PumpOutcome, PumpError> {
    let version = handshake(ch, own_version)?;
    run(ch, version, cfg, local)
}

/// Run the data phase of the service side (a VM's agent) over a connected
/// channel whose HELLO exchange gave `version`: the service's stdout and
/// stderr go out, the caller's stdin comes in, until the service's output
/// has ended and its stdin is closed; then the service is waited for and
/// its status sent as `MSG_DATA_EXIT_CODE` (docs/qrexec.md §8.3, §14). If
/// the caller closes the channel first, nothing more is sent
/// (`closed_early`); the service's descriptors are closed and it is waited
/// for either way. `local_status` is the service's status.
pub fn serve<C: DataChannel + ?Sized>(
    ch: &mut C,
    version: u32,
    side: ServiceSide,
) -> Result<PumpOutcome, PumpError> {
    let cfg = PumpConfig::default();
    let mut sources = vec![Source::new(side.stdout, MsgType::DataStdout)];
    if let Some(e) = side.stderr {
        sources.push(Source::new(e, MsgType::DataStderr));
    }
    let mut pump = start(
        Role::Service,
        ch,
        version,
        &cfg,
        Ends {
            output: side.stdin,
            stderr: None,
            sources,
            program: Some(side.program),
            signals: None,
        },
    )?;
    let result = pump.run();
    // Whatever happened: end our side of the service's stdio so it sees
    // EOF, and reap it.
    for s in &mut pump.sources {
        s.input = None;
    }
    let Pump {
        ch,
        writer,
        program,
        ..
    } = pump;
    match writer {
        // Closes now: the service sees EOF whatever is left.
        Sink::Direct(_) => writer.finish(),
        // Not `finish`: after an error the service may never read its
        // stdin; the thread ends the stream once what is queued is written
        // or fails.
        Sink::Thread(w) => drop(w),
    }
    let status = program.map(|mut p| p.wait()).unwrap_or(255);
    let closed_early = result?;
    if !closed_early {
        ch.send_all(&encode_exit_code(status))
            .map_err(chan_err("send(exit code)"))?;
    }
    Ok(PumpOutcome {
        remote_status: None,
        local_status: Some(status),
        had_local_program: true,
        closed_early,
    })
}
