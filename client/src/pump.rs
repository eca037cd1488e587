//! The data-channel pump of qrexec-client-vm (docs/qrexec.md §6, §8): HELLO, then
//! local input → `MSG_DATA_STDIN`, `MSG_DATA_STDOUT` → local output,
//! `MSG_DATA_STDERR` → stderr, `MSG_DATA_EXIT_CODE`, EOF and half-close
//! rules, escape filtering, backpressure, SIGUSR1 and the exit status.
//!
//! Generic over [`DataChannel`], whose one implementation is the vchan
//! (`crate::transport::VchanChannel`, any transport).

use crate::channel::{DataChannel, FromFd, FromFdError};
use crate::filter::replace_escape_chars;
use crate::local::{
    CloseMode, LocalFd, LocalInput, LocalOutput, LocalProgram, OUTPUT_HIGH_WATER, OutputWriter,
    SignalWatch, write_all_fd,
};
use crate::proto::{
    DecoderMode, MSG_HEADER_SIZE, Message, MessageDecoder, MsgHeader, MsgType, ProtoError,
    chunk_limit, encode_hello, negotiate,
};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::io::{self, Write};
use std::os::fd::AsFd;

/// Poll timeout of the pump loop: only a safety net, every state change
/// that matters wakes the loop through a descriptor.
const POLL_TIMEOUT_MS: u16 = 10_000;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PumpOutcome {
    /// The service's exit code, if one arrived.
    pub remote_status: Option<i32>,
    /// The local program's status (code or 128 + signal), if there was one.
    pub local_status: Option<i32>,
    /// Whether a local program was involved.
    pub had_local_program: bool,
}

impl PumpOutcome {
    /// The process exit status: the remote code if non-zero (255 when none
    /// arrived), else the local program's status, else 0. Only the low 8 bits
    /// survive, as with `exit()`.
    ///
    /// ```
    /// # use qrexec::pump::PumpOutcome;
    /// let o = |r, l, p| PumpOutcome { remote_status: r, local_status: l, had_local_program: p };
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

fn poll_fds(fds: &mut [PollFd<'_>], timeout: PollTimeout) -> Result<(), PumpError> {
    match poll(fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(PumpError::Local {
            op: "poll",
            source: e.into(),
        }),
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
        let ev = ch.poll_events();
        let mut fds = [PollFd::new(ch.as_fd(), ev)];
        poll_fds(&mut fds, PollTimeout::from(POLL_TIMEOUT_MS))?;
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            ch.wait().map_err(chan_err("wait"))?;
        }
    }
}

/// Payloads at least this large are read from the ring straight into the
/// message's buffer (see `Pump::receive`); smaller ones are batched.
const DIRECT_PAYLOAD: usize = 4096;

/// Build a STDIN message in `tx` (payload already at `tx[8..8 + n]`).
fn stdin_header(tx: &mut [u8], n: usize) {
    tx[..MSG_HEADER_SIZE].copy_from_slice(&MsgHeader::new(MsgType::DataStdin, n as u32).encode());
}

struct Pump<'a, C: DataChannel + ?Sized> {
    ch: &'a mut C,
    limit: usize,
    cfg: &'a PumpConfig,
    writer: OutputWriter,
    stderr: Box<dyn Write + Send>,
    input: Option<LocalInput>,
    input_readable: bool,
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

    /// Stop reading local input; `send_eof` says whether to tell the service.
    fn close_input(&mut self, send_eof: bool) -> Result<(), PumpError> {
        if let Some(inp) = self.input.take() {
            if send_eof && self.sending {
                // An EOF that cannot be sent is ignored (QubesOS/qubes-core-qrexec@4c51f26): the peer
                // has usually gone already. Never block on it.
                if self
                    .ch
                    .buffer_space()
                    .map_err(chan_err("look at the ring"))?
                    >= MSG_HEADER_SIZE
                {
                    let hdr = MsgHeader::new(MsgType::DataStdin, 0).encode();
                    if let Err(e) = self.ch.send_all(&hdr) {
                        log::debug!("sending STDIN EOF failed (ignored): {e}");
                    }
                } else {
                    log::debug!("no room for STDIN EOF in the vchan: not sent");
                }
            }
            inp.close();
            self.input_readable = false;
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
        match self.input.take() {
            Some(old) => {
                old.close();
                self.input = Some(LocalInput::new(socket, CloseMode::Shutdown));
                self.input_readable = false;
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
                    log::debug!("service stdout EOF");
                    self.writer.request_close();
                    return Ok(());
                }
                if self.cfg.filter_stdout {
                    replace_escape_chars(&mut data);
                }
                self.writer.write(data);
            }
            Message::Stderr(mut data) => {
                if data.is_empty() {
                    return Ok(());
                }
                if self.cfg.filter_stderr {
                    replace_escape_chars(&mut data);
                }
                if let Err(e) = self.stderr.write_all(&data) {
                    log::debug!("writing service stderr: {e}");
                }
            }
            Message::ExitCode(code) => {
                log::debug!("service exit code {code}");
                self.remote_status = Some(code);
                self.close_input(true)?;
            }
            // The data-mode decoder rejects HELLO before it gets here.
            Message::Hello(_) => {}
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
        if matches!(m, Message::Stdin(_)) && !self.warned_stdin_type {
            self.warned_stdin_type = true;
            log::debug!("service sent MSG_DATA_STDIN (old agent): treated as stdout");
        }
        self.handle(m)
    }

    /// Send a STDIN message whose payload is at `tx[8..8 + n]`. A failure
    /// stops sending but not receiving (QubesOS/qubes-core-qrexec@66c1519): no EOF is sent then.
    fn send_stdin(&mut self, n: usize) -> Result<(), PumpError> {
        stdin_header(&mut self.tx, n);
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
        self.close_input(false)
    }

    /// Move prefix data and local input into the channel while it has room.
    fn send(&mut self) -> Result<(), PumpError> {
        while self.sending && self.input.is_some() {
            let space = self
                .ch
                .peek_buffer_space()
                .map_err(chan_err("look at the ring"))?;
            if space <= MSG_HEADER_SIZE {
                break;
            }
            let max = (space - MSG_HEADER_SIZE).min(self.limit);
            let left = self.prefix_left();
            if left > 0 {
                let n = left.min(max);
                let start = self.prefix_sent;
                self.tx[MSG_HEADER_SIZE..MSG_HEADER_SIZE + n]
                    .copy_from_slice(&self.cfg.prefix[start..start + n]);
                self.prefix_sent += n;
                self.send_stdin(n)?;
                continue;
            }
            if !self.input_readable {
                break;
            }
            let Some(inp) = self.input.as_ref() else {
                break;
            };
            let socket = inp.is_socket();
            if !socket {
                // Pipes and files: the payload goes from the descriptor
                // straight into the ring, the header in front of it from
                // private memory (one copy, no bounce buffer). Sockets keep
                // the buffered path: they are read with MSG_DONTWAIT.
                if self.send_from_input(max)? {
                    continue;
                }
                break;
            }
            let r = inp.read(&mut self.tx[MSG_HEADER_SIZE..MSG_HEADER_SIZE + max]);
            // Non-sockets are read once per poll; sockets until EAGAIN.
            self.input_readable = socket;
            match r {
                Ok(0) => {
                    // A SIGUSR1 sent before the program closed its stdout
                    // wins over that EOF.
                    if self.check_signals() {
                        continue;
                    }
                    log::debug!("local input EOF");
                    self.close_input(true)?;
                }
                Ok(n) => self.send_stdin(n)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.input_readable = false;
                }
                Err(e) => {
                    log::error!("error reading local input: {e}");
                    self.close_input(true)?;
                }
            }
        }
        Ok(())
    }

    /// One STDIN message read from a non-socket input straight into the
    /// channel (read once per poll, as before). Returns whether to go on
    /// sending in this round.
    fn send_from_input(&mut self, max: usize) -> Result<bool, PumpError> {
        let Some(inp) = self.input.as_ref() else {
            return Ok(false);
        };
        let header = |n: usize| MsgHeader::new(MsgType::DataStdin, n as u32).encode();
        let r = self.ch.send_message_from_fd(inp.fd.as_fd(), max, &header);
        self.input_readable = false;
        match r {
            Ok(FromFd::Sent(_)) => Ok(true),
            Ok(FromFd::NoRoom) => {
                // Nothing was read: the input is still readable.
                self.input_readable = true;
                Ok(false)
            }
            Ok(FromFd::Eof) => {
                // A SIGUSR1 sent before the program closed its stdout wins
                // over that EOF.
                if !self.check_signals() {
                    log::debug!("local input EOF");
                    self.close_input(true)?;
                }
                Ok(true)
            }
            Err(FromFdError::Fd(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(FromFdError::Fd(e)) if e.kind() == io::ErrorKind::Interrupted => {
                self.input_readable = true;
                Ok(true)
            }
            Err(FromFdError::Fd(e)) => {
                log::error!("error reading local input: {e}");
                self.close_input(true)?;
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

    fn run(&mut self) -> Result<(), PumpError> {
        loop {
            self.check_signals();
            self.sigchld_seen = false;
            if let Some(p) = self.program.as_mut()
                && p.child.is_some()
                && let Some(code) = p.try_reap()
            {
                log::debug!("local program exited with status {code}");
                // Stop writing to the program's stdin (docs/qrexec.md §12).
                self.writer.request_close();
            }
            self.writer.clear_wake();
            if self.writer.status().broken.is_some() && !self.writer.close_requested() {
                // EPIPE etc.: local output ended; discard further data.
                self.writer.request_close();
            }

            self.receive()?;
            self.send()?;

            // All done: both local directions closed, exit code received,
            // local program reaped.
            let ws = self.writer.status();
            if ws.closed
                && self.input.is_none()
                && self.remote_status.is_some()
                && !self.child_running()
            {
                return Ok(());
            }
            // The peer has gone: is_open before data_ready (QubesOS/qubes-core-qrexec@bd07c52).
            let open = self.ch.is_open();
            if !open
                && self.ch.data_ready().map_err(chan_err("look at the ring"))? == 0
                && ws.pending == 0
            {
                if self.remote_status.is_none() {
                    log::error!("vchan connection closed early (no exit code from the service)");
                }
                return Ok(());
            }

            // Wait for something to happen. Ask the peer for an event only
            // for what we would sleep on, and only now, then look again
            // (request, re-check, sleep: docs/vchan.md §5.4): the busy path above
            // only peeks, so the peer sends no event per message.
            let has_input = self.sending && self.input.is_some();
            // Before asking for events, spin a little (adaptive, none on one
            // CPU) when the ring is all we would wait for: the peer usually
            // moves within microseconds, far sooner than an event and two
            // wake-ups.
            if has_input
                && self
                    .ch
                    .peek_buffer_space()
                    .map_err(chan_err("look at the ring"))?
                    <= MSG_HEADER_SIZE
            {
                self.ch
                    .spin_for_space(MSG_HEADER_SIZE + self.limit / 2)
                    .map_err(chan_err("spin for space"))?;
            } else if !has_input
                && !self.sigchld_seen
                && ws.pending < OUTPUT_HIGH_WATER
                && self
                    .ch
                    .peek_data_ready()
                    .map_err(chan_err("look at the ring"))?
                    == 0
            {
                self.ch
                    .spin_for_data(1)
                    .map_err(chan_err("spin for data"))?;
            }
            let room = has_input
                && (self
                    .ch
                    .peek_buffer_space()
                    .map_err(chan_err("look at the ring"))?
                    > MSG_HEADER_SIZE
                    || self
                        .ch
                        .buffer_space()
                        .map_err(chan_err("look at the ring"))?
                        > MSG_HEADER_SIZE);
            let want_input = room && self.prefix_left() == 0 && !self.input_readable;
            let data_now = ws.pending < OUTPUT_HIGH_WATER
                && (self
                    .ch
                    .peek_data_ready()
                    .map_err(chan_err("look at the ring"))?
                    > 0
                    || self.ch.data_ready().map_err(chan_err("look at the ring"))? > 0);
            let ch_events = self.ch.poll_events();
            let timeout = if self.input_readable
                || self.sigchld_seen
                || data_now
                || (room && self.prefix_left() > 0)
            {
                PollTimeout::ZERO
            } else {
                PollTimeout::from(POLL_TIMEOUT_MS)
            };
            let watch_output = !self.writer.close_requested() && ws.pending == 0;
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(5);
            let mut idx_ch = None;
            let mut idx_in = None;
            let mut idx_out = None;
            if !ch_events.is_empty() {
                idx_ch = Some(fds.len());
                fds.push(PollFd::new(self.ch.as_fd(), ch_events));
            }
            if want_input && let Some(inp) = &self.input {
                idx_in = Some(fds.len());
                fds.push(PollFd::new(inp.fd.as_fd(), PollFlags::POLLIN));
            }
            if watch_output {
                // No events requested: only POLLHUP/POLLERR (reader gone).
                idx_out = Some(fds.len());
                fds.push(PollFd::new(self.writer.fd(), PollFlags::empty()));
            }
            fds.push(PollFd::new(self.writer.wake_fd(), PollFlags::POLLIN));
            if let Some(sig) = &self.signals {
                fds.push(PollFd::new(sig.fd(), PollFlags::POLLIN));
            }
            poll_fds(&mut fds, timeout)?;
            let fired = |i: Option<usize>| -> PollFlags {
                i.and_then(|i| fds[i].revents())
                    .unwrap_or(PollFlags::empty())
            };
            let ch_fired = !fired(idx_ch).is_empty();
            let in_fired = !fired(idx_in).is_empty();
            let out_gone = fired(idx_out)
                .intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL);
            drop(fds);
            if ch_fired {
                self.ch.wait().map_err(chan_err("wait"))?;
            }
            if in_fired {
                self.input_readable = true;
            }
            if out_gone {
                log::debug!("local output was closed by its reader");
                self.writer.request_close();
            }
        }
    }
}

/// Run the data phase over a connected channel whose HELLO exchange gave
/// `version`. Returns when the call is over (docs/qrexec.md §8.4); the caller turns
/// the outcome into the exit status. Local descriptors are closed and the
/// local program waited for before returning.
pub fn run<C: DataChannel + ?Sized>(
    ch: &mut C,
    version: u32,
    cfg: &PumpConfig,
    local: LocalSide,
) -> Result<PumpOutcome, PumpError> {
    let limit = chunk_limit(version);
    let writer = OutputWriter::start(local.output).map_err(|source| PumpError::Local {
        op: "starting the output thread",
        source,
    })?;
    let had_local_program = local.program.is_some();
    let mut pump = Pump {
        ch,
        limit,
        cfg,
        writer,
        stderr: local.stderr,
        input: Some(local.input),
        input_readable: false,
        prefix_sent: 0,
        sending: true,
        remote_status: None,
        program: local.program,
        signals: local.signals,
        switched: false,
        sigchld_seen: false,
        warned_stdin_type: false,
        decoder: MessageDecoder::new(DecoderMode::Data { chunk_limit: limit }),
        rx: vec![0u8; limit + MSG_HEADER_SIZE],
        tx: vec![0u8; limit + MSG_HEADER_SIZE],
    };
    // A fatal error ends the call at once (exit 1), as in the C client: the
    // local program is not waited for and sees EOF when we exit.
    pump.run()?;
    // Close both local directions so a local program sees EOF, then wait
    // for it.
    if let Some(inp) = pump.input.take() {
        inp.close();
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
