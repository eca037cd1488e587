//! The local side of a call: where service output goes, where our input
//! comes from, and the local program (docs/qrexec.md §8.2, §8.3, §12).
//!
//! Inherited descriptors are never switched to `O_NONBLOCK` (issue #6069):
//! output is written by a writer thread with ordinary blocking writes, and the
//! pump applies backpressure by not reading the data channel while that
//! thread has a chunk pending. Input is read only after `poll` reported it
//! readable (sockets with `MSG_DONTWAIT`). "Closing" fd 0 or 1 replaces it
//! with `/dev/null`, which releases the open file description exactly like
//! `close()` while keeping the descriptor number valid.

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{MsgFlags, Shutdown, recv, shutdown};
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A local descriptor the pump reads or writes.
#[derive(Debug)]
pub enum LocalFd {
    /// The process's fd 0.
    Stdin(io::Stdin),
    /// The process's fd 1.
    Stdout(io::Stdout),
    /// A descriptor we own (a local-program socket, or a test double).
    Owned(Arc<OwnedFd>),
}

impl LocalFd {
    /// fd 0.
    pub fn stdin() -> LocalFd {
        LocalFd::Stdin(io::stdin())
    }

    /// fd 1.
    pub fn stdout() -> LocalFd {
        LocalFd::Stdout(io::stdout())
    }
}

impl Clone for LocalFd {
    fn clone(&self) -> LocalFd {
        match self {
            LocalFd::Stdin(_) => LocalFd::stdin(),
            LocalFd::Stdout(_) => LocalFd::stdout(),
            LocalFd::Owned(fd) => LocalFd::Owned(Arc::clone(fd)),
        }
    }
}

impl AsFd for LocalFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            LocalFd::Stdin(s) => s.as_fd(),
            LocalFd::Stdout(s) => s.as_fd(),
            LocalFd::Owned(fd) => fd.as_fd(),
        }
    }
}

/// How one direction of a local descriptor is ended (docs/qrexec.md §8.3 half-close
/// rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseMode {
    /// `shutdown(SHUT_RD/SHUT_WR)`: a socket used in both directions
    /// (`--use-stdin-socket`) or a local-program socket; the other direction
    /// keeps working.
    Shutdown,
    /// Replace fd 0/1 with `/dev/null`: the `close()` of the C client.
    DevNull,
}

/// Whether `fd` is a socket.
pub fn is_socket(fd: BorrowedFd<'_>) -> bool {
    nix::sys::stat::fstat(fd)
        .map(|st| (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK)
        .unwrap_or(false)
}

fn replace_with_dev_null(target: &LocalFd) -> io::Result<()> {
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    match target {
        LocalFd::Stdin(_) => nix::unistd::dup2_stdin(&null)?,
        LocalFd::Stdout(_) => nix::unistd::dup2_stdout(&null)?,
        // An owned descriptor is released when its last Arc goes.
        LocalFd::Owned(_) => {}
    }
    Ok(())
}

fn end_direction(fd: &LocalFd, mode: CloseMode, how: Shutdown) {
    let r = match mode {
        CloseMode::Shutdown => match shutdown(fd.as_fd().as_raw_fd(), how) {
            Ok(()) | Err(Errno::ENOTCONN) => Ok(()),
            // Not a socket after all: nothing to half-close.
            Err(Errno::ENOTSOCK) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        },
        CloseMode::DevNull => replace_with_dev_null(fd),
    };
    if let Err(e) = r {
        log::debug!("closing local {fd:?} ({how:?}): {e}");
    }
}

/// Write all of `buf` to `fd` with blocking semantics, also when someone
/// else made the descriptor non-blocking (then wait for POLLOUT).
pub fn write_all_fd(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Read from a local input: sockets with `MSG_DONTWAIT` (never blocks),
/// others with `read` (call only after poll said readable). `ECONNRESET`
/// counts as EOF (docs/qrexec.md §8.2).
pub fn read_input(fd: BorrowedFd<'_>, socket: bool, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let r = if socket {
            recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT)
        } else {
            nix::unistd::read(fd, buf)
        };
        match r {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => {}
            Err(Errno::ECONNRESET) => return Ok(0),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Local input: what we read and send as `MSG_DATA_STDIN`.
#[derive(Debug, Clone)]
pub struct LocalInput {
    /// The descriptor.
    pub fd: LocalFd,
    /// How to end it.
    pub close: CloseMode,
    socket: bool,
}

impl LocalInput {
    /// An input on `fd`, ended with `close`.
    pub fn new(fd: LocalFd, close: CloseMode) -> LocalInput {
        let socket = is_socket(fd.as_fd());
        LocalInput { fd, close, socket }
    }

    /// Whether the descriptor is a socket.
    pub fn is_socket(&self) -> bool {
        self.socket
    }

    /// Read what is available (see [`read_input`]).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_input(self.fd.as_fd(), self.socket, buf)
    }

    /// End this direction (`SHUT_RD` or replace with /dev/null).
    pub fn close(&self) {
        end_direction(&self.fd, self.close, Shutdown::Read);
    }
}

/// Local output: where service stdout goes.
#[derive(Debug, Clone)]
pub struct LocalOutput {
    /// The descriptor.
    pub fd: LocalFd,
    /// How to end it.
    pub close: CloseMode,
}

impl LocalOutput {
    /// End this direction (`SHUT_WR` or replace with /dev/null), for a
    /// caller that writes it itself (the service side's direct sink).
    pub fn close(&self) {
        end_direction(&self.fd, self.close, Shutdown::Write);
    }
}

#[derive(Debug, Default)]
struct WriterState {
    queue: VecDeque<Vec<u8>>,
    /// Written buffers kept for the pump to fill again
    /// ([`OutputWriter::write`] hands one back), at most [`SPARE_BUFFERS`].
    spare: Vec<Vec<u8>>,
    pending: usize,
    close_requested: bool,
    closed: bool,
    broken: Option<String>,
}

#[derive(Debug)]
struct WriterShared {
    state: Mutex<WriterState>,
    cond: Condvar,
    wake: EventFd,
}

impl WriterShared {
    fn lock(&self) -> MutexGuard<'_, WriterState> {
        // A poisoned lock only means the writer thread panicked; the state
        // itself is still consistent enough to report and shut down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify_main(&self) {
        let _ = self.wake.write(1);
    }
}

/// Pending-output level above which the pump stops reading the channel:
/// four full chunks, so that the pump can drain the ring while the writer
/// thread writes (with one chunk the two threads took turns per message).
pub const OUTPUT_HIGH_WATER: usize = 4 * crate::proto::MAX_DATA_CHUNK_V3;

/// Pending-output level at or below which the writer wakes a pump that
/// stopped at [`OUTPUT_HIGH_WATER`]: half of it. Waking it as soon as
/// the level fell below the high-water mark (one chunk written) made the
/// pump take one message per wake-up whenever the output was the slower
/// end and the ring held more than the mark (a 1 MiB ring: one eventfd
/// write, one wake-up and one poll per 64 KiB); from half way it takes
/// two chunks or more per wake-up while the writer still has two queued.
pub const OUTPUT_LOW_WATER: usize = OUTPUT_HIGH_WATER / 2;

/// How many written buffers the writer keeps for reuse: one more than the
/// chunks the high-water mark lets queue up, so that the pump never has to
/// allocate a payload buffer while the output keeps up.
pub const SPARE_BUFFERS: usize = OUTPUT_HIGH_WATER / crate::proto::MAX_DATA_CHUNK_V3 + 2;

/// A writer thread for one local output (see the module documentation).
#[derive(Debug)]
pub struct OutputWriter {
    shared: Arc<WriterShared>,
    thread: Option<JoinHandle<()>>,
    output: LocalOutput,
}

/// Snapshot of the writer's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterStatus {
    /// Bytes queued or being written.
    pub pending: usize,
    /// The close action has been performed.
    pub closed: bool,
    /// A write failed (EPIPE etc.): later data is discarded.
    pub broken: Option<String>,
}

impl OutputWriter {
    /// Start the writer thread for `output`.
    pub fn start(output: LocalOutput) -> io::Result<OutputWriter> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let shared = Arc::new(WriterShared {
            state: Mutex::new(WriterState::default()),
            cond: Condvar::new(),
            wake,
        });
        let thread_shared = Arc::clone(&shared);
        let thread_output = output.clone();
        let thread = std::thread::Builder::new()
            .name("qrexec-output".into())
            .spawn(move || writer_thread(&thread_shared, &thread_output))?;
        Ok(OutputWriter {
            shared,
            thread: Some(thread),
            output,
        })
    }

    /// The descriptor the pump polls to learn about writer progress.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.shared.wake.as_fd()
    }

    /// Consume pending wake-ups.
    pub fn clear_wake(&self) {
        let _ = self.shared.wake.read();
    }

    /// The output descriptor (polled for POLLHUP/POLLERR while idle).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.output.fd.as_fd()
    }

    /// Queue data; discarded once closing, closed or broken. Returns a
    /// buffer the thread has written out, if it kept one, for the caller to
    /// fill again (its length and contents are left over from before): a
    /// stream of payloads then reuses a few allocations instead of one new
    /// one per message.
    ///
    /// ```
    /// use qrexec::local::{CloseMode, LocalFd, LocalOutput, OutputWriter};
    /// use std::os::fd::OwnedFd;
    /// use std::sync::Arc;
    /// let (a, b) = std::os::unix::net::UnixStream::pair()?;
    /// let out = LocalOutput { fd: LocalFd::Owned(Arc::new(OwnedFd::from(a))), close: CloseMode::Shutdown };
    /// let w = OutputWriter::start(out)?;
    /// let first = b"hello".to_vec();
    /// let at = first.as_ptr();
    /// assert!(w.write(first).is_none());
    /// while w.status().pending > 0 { std::thread::yield_now(); }
    /// assert_eq!(w.write(b" world".to_vec()).map(|b| b.as_ptr()), Some(at));
    /// w.finish();
    /// let mut got = String::new();
    /// std::io::Read::read_to_string(&mut &b, &mut got)?;
    /// assert_eq!(got, "hello world");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn write(&self, data: Vec<u8>) -> Option<Vec<u8>> {
        if data.is_empty() {
            return None;
        }
        let mut st = self.shared.lock();
        if st.close_requested || st.broken.is_some() {
            return None;
        }
        st.pending += data.len();
        st.queue.push_back(data);
        let spare = st.spare.pop();
        drop(st);
        self.shared.cond.notify_one();
        spare
    }

    /// Ask the thread to end the output once everything queued is written.
    pub fn request_close(&self) {
        let mut st = self.shared.lock();
        st.close_requested = true;
        drop(st);
        self.shared.cond.notify_one();
    }

    /// Close was requested (maybe not done yet).
    pub fn close_requested(&self) -> bool {
        self.shared.lock().close_requested
    }

    /// Current state.
    pub fn status(&self) -> WriterStatus {
        let st = self.shared.lock();
        WriterStatus {
            pending: st.pending,
            closed: st.closed,
            broken: st.broken.clone(),
        }
    }

    /// Close (after draining) and wait for the thread.
    pub fn finish(mut self) {
        self.request_close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for OutputWriter {
    /// Dropped without [`OutputWriter::finish`] (the pump ended with an
    /// error): the thread still writes what is queued and then ends the
    /// output, instead of waiting forever with the descriptor open (which
    /// kept the local reader from ever seeing EOF). Does not wait for it.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.request_close();
        }
    }
}

fn writer_thread(shared: &WriterShared, output: &LocalOutput) {
    loop {
        let mut st = shared.lock();
        while st.queue.is_empty() && !st.close_requested {
            st = shared.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(buf) = st.queue.pop_front() {
            let broken = st.broken.is_some();
            drop(st);
            let result = if broken {
                Ok(())
            } else {
                write_all_fd(output.fd.as_fd(), &buf)
            };
            let mut st = shared.lock();
            let before = st.pending;
            st.pending -= buf.len();
            if st.spare.len() < SPARE_BUFFERS {
                st.spare.push(buf);
            }
            if let Err(e) = result {
                let quiet = matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET));
                if !quiet {
                    log::error!("write to local output: {e}");
                }
                st.broken = Some(e.to_string());
                let dropped: usize = st.queue.iter().map(Vec::len).sum();
                st.pending -= dropped;
                st.queue.clear();
            }
            // Wake the pump only for what it may be waiting for: room
            // again (down to the low-water mark: the pump stopped at the
            // high-water mark and takes a batch), all written, or broken
            // (one eventfd write and one wake-up less per chunk otherwise).
            let wake = st.broken.is_some()
                || st.pending == 0
                || (before > OUTPUT_LOW_WATER && st.pending <= OUTPUT_LOW_WATER);
            drop(st);
            if wake {
                shared.notify_main();
            }
            continue;
        }
        // queue empty and close requested
        drop(st);
        end_direction(&output.fd, output.close, Shutdown::Write);
        shared.lock().closed = true;
        shared.notify_main();
        return;
    }
}

/// The shell-convention status of a finished process, as the C client
/// reports a local program's and the C agent a service's: the exit code,
/// or 128 + the signal number (255 for a status that is neither, which
/// `wait` never returns for a finished process). The one home of this
/// rule: the simulated agent uses it too.
pub fn status_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    }
}

/// Signals the pump watches in local-program mode (SIGCHLD, SIGUSR1),
/// received through a signalfd. Blocking them must happen before the local
/// program is spawned and before any other thread starts (the mask is
/// inherited by threads; `std::process::Command` resets it in the child).
#[derive(Debug)]
pub struct SignalWatch {
    fd: SignalFd,
}

impl SignalWatch {
    /// Block SIGCHLD and SIGUSR1 in this thread and open a signalfd for them.
    pub fn new() -> io::Result<SignalWatch> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.add(Signal::SIGUSR1);
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(SignalWatch { fd })
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Drain pending signals: which of SIGUSR1 and SIGCHLD were among them.
    pub fn take(&self) -> Received {
        let mut r = Received::default();
        while let Ok(Some(info)) = self.fd.read_signal() {
            if info.ssi_signo == Signal::SIGUSR1 as u32 {
                r.usr1 = true;
            } else if info.ssi_signo == Signal::SIGCHLD as u32 {
                r.chld = true;
            }
        }
        r
    }
}

/// Signals drained from a [`SignalWatch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// SIGUSR1 arrived.
    pub usr1: bool,
    /// SIGCHLD arrived.
    pub chld: bool,
}

/// A started (or failed) local program and our ends of its sockets.
#[derive(Debug)]
pub struct LocalProgram {
    /// The running child; `None` if it could not be started.
    pub child: Option<Child>,
    /// Its status once known (255 when it could not be started).
    pub status: Option<i32>,
    /// Our end of pair A: we write service output here; it is the child's
    /// stdin (and, after SIGUSR1, also our input).
    pub to_child: Arc<OwnedFd>,
    /// Our end of pair B: the child's stdout, our input.
    pub from_child: Arc<OwnedFd>,
}

impl LocalProgram {
    /// Poll for the child's exit without blocking; returns the status once.
    pub fn try_reap(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => {
                let code = status_code(st);
                self.status = Some(code);
                self.child = None;
                Some(code)
            }
            Ok(None) => None,
            Err(e) => {
                log::error!("waiting for the local program: {e}");
                self.status = Some(255);
                self.child = None;
                self.status
            }
        }
    }

    /// Wait for the child (blocking) and return its status.
    pub fn wait(&mut self) -> i32 {
        if let Some(mut child) = self.child.take() {
            self.status = Some(match child.wait() {
                Ok(st) => status_code(st),
                Err(e) => {
                    log::error!("waiting for the local program: {e}");
                    255
                }
            });
        }
        self.status.unwrap_or(255)
    }
}

/// Duplicates of our fds 0 and 1 (and 2 if `PASS_LOCAL_STDERR` is set) for
/// the local program's `SAVED_FD_n` variables. Make them first thing in the
/// process, so they get small numbers (3, 4, ...) as in the C client, which
/// shell redirections like `>&$SAVED_FD_1` need (dash takes one digit).
#[derive(Debug)]
pub struct SavedFds(Vec<(&'static str, OwnedFd)>);

impl SavedFds {
    /// `dup()` fds 0, 1 and (if `pass_stderr`) 2. `dup` never sets
    /// `FD_CLOEXEC`, so the program inherits them; we close ours after the
    /// spawn.
    pub fn dup_stdio(pass_stderr: bool) -> io::Result<SavedFds> {
        let mut saved = vec![
            ("SAVED_FD_0", nix::unistd::dup(io::stdin())?),
            ("SAVED_FD_1", nix::unistd::dup(io::stdout())?),
        ];
        if pass_stderr {
            saved.push(("SAVED_FD_2", nix::unistd::dup(io::stderr())?));
        }
        Ok(SavedFds(saved))
    }
}

/// Start `program` with `args` as the C client does (docs/qrexec.md §12): stdin and
/// stdout on two socketpairs, stderr inherited, `argv[0]` = basename, no PATH
/// search, `SAVED_FD_n` naming the [`SavedFds`], plus `QREXEC_AGENT_PID`. If
/// it cannot be started, the error is reported and the program counts as
/// having exited with 255 (the C child's `exit(-1)`).
pub fn spawn_local_program(
    program: &OsStr,
    args: &[OsString],
    saved: SavedFds,
) -> io::Result<LocalProgram> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (to_child, child_stdin) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let (from_child, child_stdout) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;

    let bytes = program.as_bytes();
    let arg0 = match bytes.iter().rposition(|&c| c == b'/') {
        Some(i) => OsStr::from_bytes(&bytes[i + 1..]).to_os_string(),
        None => program.to_os_string(),
    };
    // execv() semantics: a name without '/' is relative to the current
    // directory, never searched in PATH.
    let path = if bytes.contains(&b'/') {
        PathBuf::from(program)
    } else {
        PathBuf::from(".").join(program)
    };
    let mut cmd = Command::new(&path);
    cmd.arg0(&arg0)
        .args(args)
        .stdin(Stdio::from(child_stdin))
        .stdout(Stdio::from(child_stdout))
        .stderr(Stdio::inherit())
        .env("QREXEC_AGENT_PID", std::process::id().to_string());
    for (name, fd) in &saved.0 {
        cmd.env(name, fd.as_raw_fd().to_string());
    }
    let spawned = cmd.spawn();
    drop(cmd); // closes the child's socket ends in this process
    drop(saved);
    let (child, status) = match spawned {
        Ok(c) => (Some(c), None),
        Err(e) => {
            log::error!("cannot execute local program {}: {e}", path.display());
            (None, Some(255))
        }
    };
    Ok(LocalProgram {
        child,
        status,
        to_child: Arc::new(to_child),
        from_child: Arc::new(from_child),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    #[test]
    fn writer_writes_in_order_and_half_closes() {
        let (a, b) = UnixStream::pair().unwrap();
        let out = LocalOutput {
            fd: LocalFd::Owned(Arc::new(OwnedFd::from(a))),
            close: CloseMode::Shutdown,
        };
        let w = OutputWriter::start(out).unwrap();
        w.write(b"hello ".to_vec());
        w.write(b"world".to_vec());
        w.request_close();
        w.write(b"discarded".to_vec());
        let mut got = Vec::new();
        let mut b = b;
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello world");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.status().closed {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(w.status().pending, 0);
        w.finish();
    }

    /// The writer wakes a pump that stopped at the high-water mark only
    /// once the output fell to the low-water mark (and when all is written
    /// or the output ends), not every time one chunk fell below the mark:
    /// the test plays the pump that refills to the mark after each chunk.
    /// Through a 64 KiB pipe read 64 KiB at a time, the writer completes
    /// exactly one 64 KiB chunk per read, so every level is known.
    #[test]
    fn writer_wakes_the_pump_at_the_low_water_mark() {
        const C: usize = crate::proto::MAX_DATA_CHUNK_V3;
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(C as i32)).unwrap();
        let out = LocalOutput {
            fd: LocalFd::Owned(Arc::new(w)),
            close: CloseMode::Shutdown,
        };
        let writer = OutputWriter::start(out).unwrap();
        let wake = writer.wake_fd().try_clone_to_owned().unwrap();
        let mut r = std::fs::File::from(r);
        let wait_pending = |want: usize| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while writer.status().pending != want {
                assert!(
                    Instant::now() < deadline,
                    "pending stuck at {:?}",
                    writer.status()
                );
                std::thread::yield_now();
            }
        };
        let mut read_chunk = || {
            let mut buf = vec![0u8; C];
            r.read_exact(&mut buf).unwrap();
        };
        // A full pipe first, so that no chunk is written before all are
        // queued.
        assert_eq!(nix::unistd::write(writer.fd(), &[0u8; C]).unwrap(), C);
        for _ in 0..OUTPUT_HIGH_WATER / C {
            writer.write(vec![1u8; C]);
        }
        read_chunk();
        wait_pending(OUTPUT_HIGH_WATER - C);
        // Oscillate around the high-water mark, as a pump that reads one
        // more message whenever it may.
        for _ in 0..3 {
            writer.write(vec![2u8; C]);
            read_chunk();
            wait_pending(OUTPUT_HIGH_WATER - C);
        }
        // Drain: through the low-water mark, then to empty.
        let mut level = OUTPUT_HIGH_WATER - C;
        while level > 0 {
            read_chunk();
            level -= C;
            wait_pending(level);
        }
        read_chunk();
        writer.finish();
        let mut count = [0u8; 8];
        assert_eq!(nix::unistd::read(&wake, &mut count).unwrap(), 8);
        // Low-water mark, empty, closed: three wake-ups (waking as soon as
        // the level fell below the high-water mark made it six: one for
        // each of the four chunks written from the mark, then empty and
        // closed).
        assert_eq!(u64::from_ne_bytes(count), 3);
    }

    #[test]
    fn dropped_writer_still_writes_and_ends_the_output() {
        let (a, b) = UnixStream::pair().unwrap();
        let out = LocalOutput {
            fd: LocalFd::Owned(Arc::new(OwnedFd::from(a))),
            close: CloseMode::Shutdown,
        };
        let w = OutputWriter::start(out).unwrap();
        w.write(b"said before the error".to_vec());
        drop(w);
        let mut got = Vec::new();
        let mut b = b;
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"said before the error");
    }

    #[test]
    fn writer_reports_broken_output() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let out = LocalOutput {
            fd: LocalFd::Owned(Arc::new(OwnedFd::from(a))),
            close: CloseMode::Shutdown,
        };
        let w = OutputWriter::start(out).unwrap();
        w.write(vec![1u8; 10]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.status().broken.is_none() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(w.status().pending, 0);
        w.write(vec![2u8; 10]);
        assert_eq!(w.status().pending, 0);
        w.finish();
    }

    #[test]
    fn status_codes() {
        assert_eq!(status_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(status_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(status_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(status_code(ExitStatus::from_raw(15)), 143);
    }
}
