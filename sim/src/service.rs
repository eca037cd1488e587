//! The target side of a call, as a VM's agent runs it (docs/qrexec.md §12, §13,
//! docs/qrexec.md §14): parse the command line from dom0, connect the data vchan as its
//! client, HELLO, find and start the service, pump stdin/stdout/stderr and
//! send the exit code.
//!
//! Services are looked up in the VM's service directories like
//! `/etc/qubes-rpc`: an executable named `SERVICE+ARGUMENT` (tried first in
//! every directory) or `SERVICE`. It runs in the VM's home directory with
//! the argument (when not empty) as `argv[1]` and this environment:
//! `QREXEC_REMOTE_DOMAIN` (the caller), `QREXEC_SERVICE_FULL_NAME`
//! (`service+argument`), `QREXEC_SERVICE_ARGUMENT` (when the descriptor has
//! a `+`, possibly empty), `QREXEC_REQUESTED_TARGET_TYPE` (empty, as in
//! VMs), `QREXEC_AGENT_PID`, `HOME`, `USER`, `LOGNAME`, `SHELL`; every
//! other inherited `QREXEC*` variable is removed except
//! `QREXEC_SERVICE_PATH`. The simulation adds `QUBES_SIM_VM_NAME` (the
//! VM's name) and `QUBES_SIM_AGENT_SOCKET` (its agent socket), and keeps
//! `VCHAN_LOCAL_DIR`/`VCHAN_DOMAIN`, so a service can itself call
//! `qrexec-client-vm`.
//!
//! Not simulated: `rpc-config` files, socket services, the fork server,
//! PAM sessions (`user` only sets `USER`/`LOGNAME`).

use crate::{Error, Result};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use qrexec::proto::{
    ConnectionParams, MSG_HEADER_SIZE, MsgHeader, MsgType, QREXEC_EXIT_PROBLEM,
    QREXEC_EXIT_SERVICE_NOT_FOUND, RPC_REQUEST_COMMAND, chunk_limit, encode_exit_code,
    encode_hello, negotiate,
};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vchan::{State, Transport, Vchan};

/// How long the target waits for the caller's data vchan server (docs/qrexec.md §8.1).
pub const DATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest service name (without argument) the agent runs (`NAME_MAX`).
pub const MAX_SERVICE_FILE_NAME: usize = 255;

/// Pipe buffer size asked for the service's stdio (fewer wake-ups).
const PIPE_SIZE: i32 = 1 << 20;

/// What a VM's agent knows when it runs a call.
#[derive(Debug, Clone)]
pub struct VmContext {
    /// The VM's name.
    pub name: String,
    /// The transport this VM plays its domain on.
    pub transport: Transport,
    /// Service directories, first match wins.
    pub services: Vec<PathBuf>,
    /// Home directory (services run there).
    pub home: PathBuf,
    /// The VM's agent socket (given to services).
    pub agent_socket: PathBuf,
    /// The data protocol version announced in HELLO.
    pub version: u32,
    /// How long to wait for the caller's vchan server.
    pub connect_timeout: Duration,
}

/// A command line from dom0, parsed (docs/qrexec.md §14 item 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmdline {
    /// `user:[nogui:]QUBESRPC service[+arg] source`.
    Rpc {
        /// The user to run as.
        user: String,
        /// `service[+arg]` as sent.
        descriptor: String,
        /// The calling VM.
        source: String,
    },
    /// `user:command` run by a shell (legacy, dom0-initiated).
    Shell {
        /// The user to run as.
        user: String,
        /// The shell command.
        command: String,
    },
}

/// Parse a command line (without its NUL). `DEFAULT:` has already been
/// replaced by the daemon.
///
/// ```
/// use qubes_sim::service::{parse_cmdline, Cmdline};
/// assert_eq!(parse_cmdline(b"user:QUBESRPC demo.Echo+ work").unwrap(),
///            Cmdline::Rpc { user: "user".into(), descriptor: "demo.Echo+".into(), source: "work".into() });
/// assert!(matches!(parse_cmdline(b"root:nogui:echo hi").unwrap(), Cmdline::Shell { .. }));
/// assert!(parse_cmdline(b"no colon").is_err());
/// ```
pub fn parse_cmdline(cmdline: &[u8]) -> Result<Cmdline> {
    let text = std::str::from_utf8(cmdline)
        .map_err(|_| Error::protocol("dom0", "command line is not UTF-8"))?;
    let (user, rest) = text
        .split_once(':')
        .ok_or_else(|| Error::protocol("dom0", "bad command from dom0: no colon"))?;
    if user.is_empty() {
        return Err(Error::protocol("dom0", "empty user name"));
    }
    let rest = rest
        .strip_prefix(qrexec::proto::NOGUI_CMD_PREFIX)
        .unwrap_or(rest);
    let Some(rpc) = rest
        .strip_prefix(RPC_REQUEST_COMMAND)
        .and_then(|r| r.strip_prefix(' '))
    else {
        return Ok(Cmdline::Shell {
            user: user.to_string(),
            command: rest.to_string(),
        });
    };
    let (descriptor, source) = rpc
        .split_once(' ')
        .ok_or_else(|| Error::protocol("dom0", "bad command from dom0: no remote domain"))?;
    let source = source.split(' ').next().unwrap_or("");
    if descriptor.is_empty() || source.is_empty() {
        return Err(Error::protocol("dom0", "empty service or source"));
    }
    if descriptor.len() > qrexec::proto::MAX_SERVICE_NAME_LEN {
        return Err(Error::protocol("dom0", "absurdly long service descriptor"));
    }
    Ok(Cmdline::Rpc {
        user: user.to_string(),
        descriptor: descriptor.to_string(),
        source: source.to_string(),
    })
}

/// Why a service could not be started.
#[derive(Debug)]
pub enum StartError {
    /// No such service: exit code 127.
    NotFound(String),
    /// Anything else: exit code 125.
    Problem(String),
}

impl StartError {
    /// The exit code sent to the caller.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::NotFound(_) => QREXEC_EXIT_SERVICE_NOT_FOUND,
            StartError::Problem(_) => QREXEC_EXIT_PROBLEM,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::NotFound(m) | StartError::Problem(m) => f.write_str(m),
        }
    }
}

/// Find a service: `svc+arg` in every directory first (when its name is
/// not too long), then `svc`. The first existing entry wins.
///
/// ```no_run
/// let p = qubes_sim::service::find_service(&["/etc/qubes-rpc".into()], "qubes.Filecopy+");
/// ```
pub fn find_service(dirs: &[PathBuf], descriptor: &str) -> Result<PathBuf, StartError> {
    let name = descriptor.split('+').next().unwrap_or("");
    if name.is_empty() {
        return Err(StartError::Problem("service path empty".into()));
    }
    if name.len() > MAX_SERVICE_FILE_NAME {
        return Err(StartError::Problem(format!(
            "service path too long to execute: {}",
            name.len()
        )));
    }
    if name == "." || name == ".." || descriptor.contains('/') {
        return Err(StartError::NotFound(format!("no service '{descriptor}'")));
    }
    let mut candidates = Vec::new();
    if descriptor.len() <= MAX_SERVICE_FILE_NAME && descriptor != name {
        candidates.push(descriptor);
    }
    candidates.push(name);
    for c in candidates {
        for d in dirs {
            let p = d.join(c);
            if std::fs::symlink_metadata(&p).is_ok() {
                return Ok(p);
            }
        }
    }
    Err(StartError::NotFound(format!(
        "service '{descriptor}' not found in {}",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    )))
}

/// The command that runs a parsed command line in this VM.
pub fn build_command(ctx: &VmContext, cmd: &Cmdline) -> Result<Command, StartError> {
    let (mut c, user) = match cmd {
        Cmdline::Rpc {
            user, descriptor, ..
        } => {
            let path = find_service(&ctx.services, descriptor)?;
            let mut c = Command::new(&path);
            if let Some((_, a)) = descriptor.split_once('+')
                && !a.is_empty()
            {
                c.arg(a);
            }
            (c, user)
        }
        Cmdline::Shell { user, command } => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(command);
            (c, user)
        }
    };
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("QREXEC") && k != "QREXEC_SERVICE_PATH" {
            c.env_remove(&*k);
        }
    }
    if let Cmdline::Rpc {
        descriptor, source, ..
    } = cmd
    {
        c.env("QREXEC_REMOTE_DOMAIN", source)
            .env("QREXEC_SERVICE_FULL_NAME", descriptor)
            .env("QREXEC_REQUESTED_TARGET_TYPE", "");
        if let Some((_, a)) = descriptor.split_once('+') {
            c.env("QREXEC_SERVICE_ARGUMENT", a);
        }
    }
    c.env("QREXEC_AGENT_PID", std::process::id().to_string())
        .env("HOME", &ctx.home)
        .env("USER", user)
        .env("LOGNAME", user)
        .env("SHELL", "/bin/sh")
        .env("QUBES_SIM_VM_NAME", &ctx.name)
        .env("QUBES_SIM_AGENT_SOCKET", &ctx.agent_socket)
        .env("QREXEC_AGENT_SOCKET", &ctx.agent_socket)
        .current_dir(&ctx.home);
    Ok(c)
}

fn start_error(e: io::Error, what: &Path) -> StartError {
    if e.kind() == io::ErrorKind::NotFound {
        StartError::NotFound(format!("{}: {e}", what.display()))
    } else {
        StartError::Problem(format!("cannot run {}: {e}", what.display()))
    }
}

fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL)?;
    fcntl(
        fd.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

fn grow_pipe(fd: impl AsFd) {
    let _ = fcntl(fd.as_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
}

/// Connect the data vchan for a call and do the HELLO exchange (we send
/// first). Returns the channel and the chunk limit.
pub fn connect_data(ctx: &VmContext, params: ConnectionParams) -> Result<(Vchan, usize)> {
    let domid = u16::try_from(params.connect_domain)
        .ok()
        .filter(|&d| d < 0x7FF0)
        .ok_or_else(|| {
            Error::protocol(
                "dom0",
                format!("invalid connect_domain {}", params.connect_domain),
            )
        })?;
    let what = format!("data vchan to domain {domid} port {}", params.connect_port);
    // A connect refused for a resource other calls hold (the domain's
    // xenstore watches, qubes-issues #5343; grants, ports) is retried
    // until the connect deadline, as the client does for its set-up.
    use qrexec::retry;
    let deadline = Instant::now() + ctx.connect_timeout;
    let mut ch = retry::retry(
        deadline,
        &retry::Backoff::default(),
        &retry::SystemClock,
        &mut retry::XorShift::from_entropy(),
        retry::classify,
        |w| crate::vlog!("{what}: {w}"),
        || {
            Vchan::client(
                &ctx.transport,
                domid,
                params.connect_port,
                deadline.saturating_duration_since(Instant::now()),
            )
        },
    )
    .map_err(|e| match e {
        retry::RetryError::Fatal(e) => Error::vchan(format!("connect {what}"), e),
        retry::RetryError::GaveUp(g) => Error::other(format!("connect {what}: {g}")),
    })?;
    ch.set_io_timeout(Some(crate::ctrl::HELLO_TIMEOUT));
    ch.send(&encode_hello(ctx.version))
        .map_err(|e| Error::vchan(format!("send HELLO on {what}"), e))?;
    let mut b = [0u8; 12];
    ch.recv(&mut b)
        .map_err(|e| Error::vchan(format!("receive HELLO on {what}"), e))?;
    let hdr = MsgHeader::decode(&b).map_err(|e| Error::protocol("caller", e.to_string()))?;
    if hdr.ty != MsgType::Hello.as_u32() || hdr.len != 4 {
        return Err(Error::protocol(
            "caller",
            format!("expected HELLO, got type {:#x} len {}", hdr.ty, hdr.len),
        ));
    }
    let v = negotiate(ctx.version, u32::from_le_bytes([b[8], b[9], b[10], b[11]]))
        .map_err(|e| Error::protocol("caller", e.to_string()))?;
    ch.set_io_timeout(Some(Duration::from_secs(30)));
    Ok((ch, chunk_limit(v)))
}

/// Send the failure sequence: empty STDOUT, empty STDERR, then `code`.
fn send_failure(ch: &mut Vchan, code: i32) -> Result<()> {
    let mut m = Vec::with_capacity(28);
    m.extend_from_slice(&MsgHeader::new(MsgType::DataStdout, 0).encode());
    m.extend_from_slice(&MsgHeader::new(MsgType::DataStderr, 0).encode());
    m.extend_from_slice(&encode_exit_code(code));
    ch.set_blocking(true);
    ch.send(&m).map_err(|e| Error::vchan("send exit code", e))?;
    Ok(())
}

/// Run one call from `MSG_EXEC_CMDLINE` (or `MSG_JUST_EXEC` when
/// `just_exec`) to its end. Errors are the agent's to log; the caller sees
/// them as exit codes 125/127 or, when the channel itself failed, as a
/// closed vchan.
pub fn run_call(
    ctx: &VmContext,
    params: ConnectionParams,
    cmdline: &[u8],
    just_exec: bool,
) -> Result<()> {
    let (mut ch, chunk) = connect_data(ctx, params)?;
    let cmd = match parse_cmdline(cmdline) {
        Ok(c) => c,
        Err(e) => {
            send_failure(&mut ch, QREXEC_EXIT_PROBLEM)?;
            return Err(e);
        }
    };
    let mut command = match build_command(ctx, &cmd) {
        Ok(c) => c,
        Err(e) => {
            crate::vlog!("call {cmd:?}: {e}");
            return send_failure(&mut ch, e.exit_code());
        }
    };
    let program = PathBuf::from(command.get_program());
    if just_exec {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        return match command.spawn() {
            Ok(mut child) => {
                ch.set_blocking(true);
                let r = ch
                    .send(&encode_exit_code(0))
                    .map(|_| ())
                    .map_err(|e| Error::vchan("send exit code", e));
                drop(ch);
                let _ = child.wait();
                r
            }
            Err(e) => send_failure(&mut ch, start_error(e, &program).exit_code()),
        };
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let e = start_error(e, &program);
            crate::vlog!("call {cmd:?}: {e}");
            return send_failure(&mut ch, e.exit_code());
        }
    };
    crate::vlog!(
        "call {cmd:?}: started {} (chunk {chunk})",
        program.display()
    );
    let r = Pump::new(ch, chunk, child)?.run();
    crate::vlog!("call {cmd:?}: finished: {r:?}");
    r.map(|_| ())
}

/// Incoming-message parser state.
#[derive(Debug)]
enum Rx {
    Header {
        got: usize,
        buf: [u8; MSG_HEADER_SIZE],
    },
    Payload {
        ty: u32,
        remaining: usize,
    },
}

impl Rx {
    fn header() -> Rx {
        Rx::Header {
            got: 0,
            buf: [0; MSG_HEADER_SIZE],
        }
    }
}

/// The service side of a data channel: child stdio ⇄ vchan messages.
#[derive(Debug)]
struct Pump {
    ch: Vchan,
    chunk: usize,
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: Option<std::process::ChildStdout>,
    stderr: Option<std::process::ChildStderr>,
    status: Option<i32>,
    rx: Rx,
    /// What one ring read brought (headers and payloads of several
    /// messages): `inbuf[raw_pos..raw_len]` is not parsed yet.
    inbuf: Vec<u8>,
    raw_pos: usize,
    raw_len: usize,
    /// Payload for the child's stdin, inside `inbuf`: `inbuf[in_pos..in_len]`
    /// is still to be written.
    in_pos: usize,
    in_len: usize,
    /// Header + payload of the next outgoing message.
    outbuf: Vec<u8>,
    /// Whether the client's vchan has been seen closed.
    peer_closed: bool,
}

impl Pump {
    fn new(mut ch: Vchan, chunk: usize, mut child: Child) -> Result<Pump> {
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let nb = |r: io::Result<()>| r.map_err(|e| Error::io("set O_NONBLOCK on a pipe", e));
        if let Some(s) = &stdin {
            grow_pipe(s);
            nb(set_nonblocking(s))?;
        }
        if let Some(s) = &stdout {
            grow_pipe(s);
            nb(set_nonblocking(s))?;
        }
        if let Some(s) = &stderr {
            nb(set_nonblocking(s))?;
        }
        ch.set_blocking(false);
        ch.set_io_timeout(None);
        // One ring read takes up to a whole message with its header, or
        // several small ones.
        let inlen = (MSG_HEADER_SIZE + chunk).min(ch.read_ring_size().max(MSG_HEADER_SIZE));
        Ok(Pump {
            ch,
            chunk,
            child,
            stdin,
            stdout,
            stderr,
            status: None,
            rx: Rx::header(),
            inbuf: vec![0; inlen],
            raw_pos: 0,
            raw_len: 0,
            in_pos: 0,
            in_len: 0,
            outbuf: vec![0; MSG_HEADER_SIZE + chunk],
            peer_closed: false,
        })
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
        self.in_pos = 0;
        self.in_len = 0;
    }

    fn reap(&mut self) -> Result<()> {
        if self.status.is_none()
            && let Some(st) = self
                .child
                .try_wait()
                .map_err(|e| Error::io("wait for the service", e))?
        {
            self.status = Some(qrexec::local::status_code(st));
            // The service is gone: nobody reads its stdin any more.
            self.close_stdin();
        }
        Ok(())
    }

    /// Write pending stdin data; `Ok(true)` when nothing is pending.
    fn flush_stdin(&mut self) -> bool {
        while self.in_pos < self.in_len {
            let Some(s) = &mut self.stdin else {
                self.in_pos = 0;
                self.in_len = 0;
                return true;
            };
            match s.write(&self.inbuf[self.in_pos..self.in_len]) {
                Ok(n) => self.in_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // EPIPE and friends: the service stopped reading.
                    self.close_stdin();
                    return true;
                }
            }
        }
        self.in_pos = 0;
        self.in_len = 0;
        true
    }

    /// Handle what the client sent, as long as the child keeps up.
    ///
    /// One ring read takes everything that is ready (up to `inbuf`), the
    /// messages in it are split up here in private memory, and stdin
    /// payload is written to the child straight from `inbuf`; the ring is
    /// read again only when all of that is done (backpressure).
    fn receive(&mut self) -> Result<()> {
        loop {
            if !self.flush_stdin() {
                return Ok(());
            }
            if self.raw_pos == self.raw_len {
                self.raw_pos = 0;
                self.raw_len = 0;
                // Look without asking for an event: `poll_once` asks
                // only after its spin, right before it sleeps.
                if self
                    .ch
                    .peek_data_ready()
                    .map_err(ring("look at the ring"))?
                    == 0
                {
                    return Ok(());
                }
                match self.ch.read_some(&mut self.inbuf[..]) {
                    Ok(0) => return Ok(()),
                    Err(ref e) if crate::ctrl::would_block(e) => return Ok(()),
                    Ok(n) => self.raw_len = n,
                    Err(e) => return Err(Error::vchan("read from the caller", e)),
                }
            }
            let avail = self.raw_len - self.raw_pos;
            match &mut self.rx {
                Rx::Header { got, buf } => {
                    let take = (MSG_HEADER_SIZE - *got).min(avail);
                    buf[*got..*got + take]
                        .copy_from_slice(&self.inbuf[self.raw_pos..self.raw_pos + take]);
                    *got += take;
                    self.raw_pos += take;
                    if *got < MSG_HEADER_SIZE {
                        continue;
                    }
                    let hdr = MsgHeader::decode(&buf[..])
                        .map_err(|e| Error::protocol("caller", e.to_string()))?;
                    let len = hdr.len as usize;
                    if len > self.chunk {
                        return Err(Error::protocol(
                            "caller",
                            format!("too big data chunk received: {len} > {}", self.chunk),
                        ));
                    }
                    match MsgType::from_u32(hdr.ty) {
                        Some(MsgType::DataStdin | MsgType::DataStdout) if len == 0 => {
                            self.close_stdin()
                        }
                        Some(
                            MsgType::DataStdin
                            | MsgType::DataStdout
                            | MsgType::DataStderr
                            | MsgType::DataExitCode,
                        ) => {}
                        _ => {
                            return Err(Error::protocol(
                                "caller",
                                format!("unexpected message type {:#x}", hdr.ty),
                            ));
                        }
                    }
                    self.rx = if len == 0 {
                        Rx::header()
                    } else {
                        Rx::Payload {
                            ty: hdr.ty,
                            remaining: len,
                        }
                    };
                }
                Rx::Payload { ty, remaining } => {
                    let to_stdin = (*ty == MsgType::DataStdin.as_u32()
                        || *ty == MsgType::DataStdout.as_u32())
                        && self.stdin.is_some();
                    let take = (*remaining).min(avail);
                    *remaining -= take;
                    if *remaining == 0 {
                        self.rx = Rx::header();
                    }
                    if to_stdin {
                        self.in_pos = self.raw_pos;
                        self.in_len = self.raw_pos + take;
                    }
                    self.raw_pos += take;
                }
            }
        }
    }

    /// Forward one output stream while the ring has room. Returns whether
    /// it reached EOF (after sending the empty message).
    fn forward(&mut self, which: MsgType) -> Result<bool> {
        loop {
            // Peek: the poll loop asks for a space event only before it
            // sleeps for space.
            let space = self
                .ch
                .peek_buffer_space()
                .map_err(ring("look at the ring"))?;
            if space <= MSG_HEADER_SIZE {
                return Ok(false);
            }
            let want = (space - MSG_HEADER_SIZE).min(self.chunk);
            let fd = match which {
                MsgType::DataStdout => self.stdout.as_ref().map(|s| s.as_fd()),
                _ => self.stderr.as_ref().map(|s| s.as_fd()),
            };
            let Some(fd) = fd else {
                return Ok(true);
            };
            // The service's output goes from its pipe straight into the
            // ring, the header written in front (one copy).
            let header = |n: usize| MsgHeader::new(which, n as u32).encode();
            match self.ch.send_framed_from_fd(fd, want, header) {
                Ok(0) => return self.send_eof(which),
                Ok(_) => {}
                Err(vchan::Error::WouldBlock) => return Ok(false),
                Err(vchan::Error::Io {
                    step: "read from fd",
                    source,
                }) => match source.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::ConnectionReset => return self.send_eof(which),
                    _ => return Err(Error::io("read from the service", source)),
                },
                Err(e) => {
                    self.peer_closed = true;
                    return Err(Error::vchan("send to the caller", e));
                }
            }
        }
    }

    /// The empty message that ends one output stream.
    fn send_eof(&mut self, which: MsgType) -> Result<bool> {
        self.outbuf[..MSG_HEADER_SIZE].copy_from_slice(&MsgHeader::new(which, 0).encode());
        self.send(MSG_HEADER_SIZE)?;
        Ok(true)
    }

    fn send(&mut self, len: usize) -> Result<()> {
        match self.ch.send(&self.outbuf[..len]) {
            Ok(_) => Ok(()),
            Err(ref e) if crate::ctrl::would_block(e) => {
                // Cannot happen (we are the only writer and checked the
                // space), but never lose data over it.
                self.ch.set_blocking(true);
                let r = self.ch.send(&self.outbuf[..len]);
                self.ch.set_blocking(false);
                r.map(|_| ())
                    .map_err(|e| Error::vchan("send to the caller", e))
            }
            Err(e) => {
                self.peer_closed = true;
                Err(Error::vchan("send to the caller", e))
            }
        }
    }

    /// Run to the end: `Ok(Some(code))` when the exit code was sent,
    /// `Ok(None)` when the caller went away first.
    fn run(mut self) -> Result<Option<i32>> {
        let result = self.run_inner();
        // Whatever happened: close our ends so the service sees EOF, and
        // reap it.
        self.close_stdin();
        self.stdout = None;
        self.stderr = None;
        if self.status.is_none()
            && let Ok(st) = self.child.wait()
        {
            self.status = Some(qrexec::local::status_code(st));
        }
        result
    }

    fn run_inner(&mut self) -> Result<Option<i32>> {
        let mut last_reap = Instant::now();
        loop {
            let outputs_done = self.stdout.is_none() && self.stderr.is_none();
            if outputs_done || last_reap.elapsed() >= Duration::from_millis(100) {
                self.reap()?;
                last_reap = Instant::now();
            }
            if outputs_done && self.stdin.is_none() {
                let code = match self.status {
                    Some(c) => c,
                    None => qrexec::local::status_code(
                        self.child
                            .wait()
                            .map_err(|e| Error::io("wait for the service", e))?,
                    ),
                };
                self.status = Some(code);
                self.ch.set_blocking(true);
                self.ch
                    .send(&encode_exit_code(code))
                    .map_err(|e| Error::vchan("send exit code", e))?;
                return Ok(Some(code));
            }
            // The caller is gone and nothing of it is left to handle.
            let open = self.ch.state() == State::Connected;
            if !open
                && self.ch.data_ready().map_err(ring("look at the ring"))? == 0
                && self.in_pos == self.in_len
                && self.raw_pos == self.raw_len
            {
                crate::vlog!("caller closed the vchan early");
                return Ok(None);
            }
            self.receive()?;
            if self.stdout.is_some() && self.forward(MsgType::DataStdout)? {
                self.stdout = None;
            }
            if self.stderr.is_some() && self.forward(MsgType::DataStderr)? {
                self.stderr = None;
            }
            self.poll_once()?;
        }
    }

    fn poll_once(&mut self) -> Result<()> {
        // Request, re-check, sleep (docs/vchan.md §5.4), and request only what we
        // would sleep on: space when an output has no room (then its pipe
        // is not polled), data when nothing is pending for stdin.
        let outputs = self.stdout.is_some() || self.stderr.is_some();
        let pending_in = self.in_pos < self.in_len || self.raw_pos < self.raw_len;
        // Spin a little first (adaptive, none on one CPU) when the ring is
        // what we would wait for: the caller usually moves within
        // microseconds, far sooner than an event and two wake-ups.
        if outputs
            && self
                .ch
                .peek_buffer_space()
                .map_err(ring("look at the ring"))?
                <= MSG_HEADER_SIZE
        {
            self.ch
                .spin_for_space(MSG_HEADER_SIZE + self.chunk / 2)
                .map_err(ring("spin for space"))?;
        } else if !pending_in
            && self.stdin.is_some()
            && self
                .ch
                .peek_data_ready()
                .map_err(ring("look at the ring"))?
                == 0
        {
            self.ch.spin_for_data(1).map_err(ring("spin for data"))?;
        }
        let space = outputs
            && (self
                .ch
                .peek_buffer_space()
                .map_err(ring("look at the ring"))?
                > MSG_HEADER_SIZE
                || self.ch.buffer_space().map_err(ring("look at the ring"))? > MSG_HEADER_SIZE);
        let busy = !pending_in
            && (self
                .ch
                .peek_data_ready()
                .map_err(ring("look at the ring"))?
                > 0
                || self.ch.data_ready().map_err(ring("look at the ring"))? > 0);
        let mut fds = Vec::with_capacity(4);
        fds.push(PollFd::new(self.ch.as_fd(), PollFlags::POLLIN));
        if let Some(s) = &self.stdin {
            // POLLERR/POLLHUP are always reported: the service closed stdin.
            let ev = if pending_in {
                PollFlags::POLLOUT
            } else {
                PollFlags::empty()
            };
            fds.push(PollFd::new(s.as_fd(), ev));
        }
        let stdin_idx = self.stdin.as_ref().map(|_| fds.len() - 1);
        if space {
            if let Some(s) = &self.stdout {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
            }
            if let Some(s) = &self.stderr {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
            }
        }
        let timeout = if busy {
            PollTimeout::ZERO
        } else if self.stdout.is_none() && self.stderr.is_none() {
            PollTimeout::from(20u16)
        } else {
            PollTimeout::from(100u16)
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::io("poll", e.into())),
        }
        let vchan_ev = fds[0].revents().is_some_and(|r| !r.is_empty());
        let stdin_gone = stdin_idx.is_some_and(|i| {
            fds[i]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
        });
        drop(fds);
        if vchan_ev {
            let _ = self.ch.wait_timeout(Some(Duration::ZERO));
        }
        if stdin_gone {
            self.close_stdin();
        }
        Ok(())
    }
}

/// Maps a vchan error (a corrupted ring among them) to this crate's error,
/// naming what was being done: such an error ends the service call.
fn ring(op: &'static str) -> impl FnOnce(vchan::Error) -> Error {
    move |e| Error::vchan(op, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_forms() {
        assert_eq!(
            parse_cmdline(b"user:nogui:QUBESRPC a.B+x src extra").unwrap(),
            Cmdline::Rpc {
                user: "user".into(),
                descriptor: "a.B+x".into(),
                source: "src".into()
            }
        );
        assert_eq!(
            parse_cmdline(b"root:ls -l").unwrap(),
            Cmdline::Shell {
                user: "root".into(),
                command: "ls -l".into()
            }
        );
        for bad in [
            &b"QUBESRPC a b"[..],
            b":QUBESRPC a b",
            b"u:QUBESRPC a",
            b"u:QUBESRPC  b",
            b"u:\xff",
        ] {
            assert!(parse_cmdline(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lookup_order() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let dirs = vec![d1.path().to_path_buf(), d2.path().to_path_buf()];
        std::fs::write(d1.path().join("a.B"), "").unwrap();
        std::fs::write(d2.path().join("a.B+x"), "").unwrap();
        // svc+arg anywhere beats svc
        assert_eq!(
            find_service(&dirs, "a.B+x").unwrap(),
            d2.path().join("a.B+x")
        );
        assert_eq!(find_service(&dirs, "a.B+y").unwrap(), d1.path().join("a.B"));
        assert_eq!(find_service(&dirs, "a.B").unwrap(), d1.path().join("a.B"));
        assert!(matches!(
            find_service(&dirs, "a.C+x"),
            Err(StartError::NotFound(_))
        ));
        assert!(matches!(
            find_service(&dirs, "+x"),
            Err(StartError::Problem(_))
        ));
        let long = "a".repeat(256);
        assert!(matches!(
            find_service(&dirs, &long),
            Err(StartError::Problem(_))
        ));
        assert!(matches!(
            find_service(&dirs, "../etc"),
            Err(StartError::NotFound(_))
        ));
    }
}
