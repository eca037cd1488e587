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
use qrexec::proto::{
    ConnectionParams, MsgHeader, MsgType, QREXEC_EXIT_PROBLEM, QREXEC_EXIT_SERVICE_NOT_FOUND,
    RPC_REQUEST_COMMAND, encode_exit_code, encode_hello, negotiate,
};
use qrexec::pump::ServiceSide;
use qrexec::transport::VchanChannel;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vchan::{Transport, Vchan};

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
/// first). Returns the channel and the negotiated protocol version.
pub fn connect_data(ctx: &VmContext, params: ConnectionParams) -> Result<(Vchan, u32)> {
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
    Ok((ch, v))
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
    let (mut ch, version) = connect_data(ctx, params)?;
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
    // stdin is a socket, as the C agent gives services (shut down for
    // the caller's EOF); stdout and stderr are pipes, read straight into
    // the ring.
    let (stdin_ours, stdin_theirs) =
        UnixStream::pair().map_err(|e| Error::io("socketpair for the service's stdin", e))?;
    command
        .stdin(Stdio::from(OwnedFd::from(stdin_theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned = command.spawn();
    // The child's ends must not stay open here (no EOF, no POLLHUP).
    drop(command);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let e = start_error(e, &program);
            crate::vlog!("call {cmd:?}: {e}");
            return send_failure(&mut ch, e.exit_code());
        }
    };
    crate::vlog!(
        "call {cmd:?}: started {} (protocol {version})",
        program.display()
    );
    let side = service_side(child.stdout.take(), child.stderr.take(), stdin_ours, child)?;
    ch.set_io_timeout(None);
    let r = qrexec::pump::serve(&mut VchanChannel(ch), version, side);
    crate::vlog!("call {cmd:?}: finished: {r:?}");
    match r {
        Ok(o) if o.closed_early => {
            crate::vlog!("caller closed the vchan early");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(Error::other(format!("data channel: {e}"))),
    }
}

/// The service's stdio as the pump's [`ServiceSide`]: stdout grown and
/// non-blocking (read until empty), stderr non-blocking.
fn service_side(
    stdout: Option<std::process::ChildStdout>,
    stderr: Option<std::process::ChildStderr>,
    stdin: UnixStream,
    child: Child,
) -> Result<ServiceSide> {
    let nb = |r: io::Result<()>| r.map_err(|e| Error::io("set O_NONBLOCK on a pipe", e));
    let stdout = OwnedFd::from(stdout.ok_or_else(|| Error::other("service stdout not piped"))?);
    grow_pipe(&stdout);
    nb(set_nonblocking(&stdout))?;
    let stderr = match stderr {
        Some(e) => {
            let e = OwnedFd::from(e);
            nb(set_nonblocking(&e))?;
            Some(e)
        }
        None => None,
    };
    // As the stdout pipe: room for a few chunks, fewer wake-ups.
    let _ = nix::sys::socket::setsockopt(
        &stdin,
        nix::sys::socket::sockopt::SndBuf,
        &(PIPE_SIZE as usize),
    );
    // Non-blocking: the pump writes it directly, no output thread.
    nb(set_nonblocking(&stdin))?;
    Ok(ServiceSide::new(
        stdout,
        stderr,
        OwnedFd::from(stdin),
        child,
    ))
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
