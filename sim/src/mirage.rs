// Why this file is long (~830 lines): it is one agent in four sections (the
// framed data channel, the target side, the source side, the agent loop)
// that follow mirage-qubes' msg_chan.ml and rExec.ml, so the two can be read
// side by side; the last ~35 lines are unit tests.
//! A qrexec agent that behaves like a MirageOS unikernel's (`mirage/
//! mirage-qubes` 2.0, `lib/rExec.ml` and `lib/msg_chan.ml`, over
//! `mirage/ocaml-vchan`), for testing our tools against one without a
//! unikernel: a VM with `flavour=mirage` in the simulation's
//! configuration runs this instead of [`crate::agent`].
//!
//! What it does as mirage-qubes does:
//!
//! * **Control channel**: vchan server on port 512 toward dom0 with
//!   ocaml-vchan's behaviour and default sizes (1024/1024, so in-page rings
//!   of 1 and 2 KiB), HELLO version 3 sent first; it never speaks protocol 4
//!   (no `MSG_TRIGGER_SERVICE4`, no source qube).
//! * **Version**: a peer's 2 or 3 is taken as is, anything above 3 becomes
//!   3, below 2 is refused ([`negotiate`]).
//! * **Target side** (`MSG_EXEC_CMDLINE` / `MSG_JUST_EXEC`): vchan *client*
//!   of the caller's data server (ocaml-vchan behaviour: lazy reads, no
//!   unmap-notify), **reads the caller's HELLO first**, then sends its own;
//!   the command line must end with a NUL and is split at the first `:`
//!   into user and command; the command goes to a *handler* in the agent
//!   (mirage-qubes' model: services are functions of the unikernel, not
//!   programs); output goes out in chunks of the negotiated limit (4096 or
//!   65536 bytes); at the end it sends an empty `STDOUT`, then the exit
//!   code, and closes — **no empty `STDERR`**. A handler that fails gives
//!   exit code 255. Then `MSG_CONNECTION_TERMINATED` goes to dom0.
//! * **Source side**: the unikernel calls a service with
//!   `MSG_TRIGGER_SERVICE3` whose request id is `MIRAGE` and a 25-digit
//!   counter; on `MSG_SERVICE_CONNECT` it becomes the data vchan *server*
//!   with its default 1024/1024 request (in-page rings), sends HELLO first,
//!   then writes stdin and reads stdout, stderr and the exit code;
//!   `MSG_SERVICE_REFUSED` is a refusal. It sends no
//!   `MSG_CONNECTION_TERMINATED` for its own calls.
//! * Unknown control messages are logged and skipped (mirage-qubes does
//!   not stop).
//!
//! Upstream mirage-qubes 2.0 writes its request id where the service name
//! belongs in a version-3 trigger (`service_params` in `rExec.ml` since
//! PR #60), so dom0 sees a service named `MIRAGE000…`; the agent
//! reproduces that with [`MirageOptions::upstream_trigger`], and by default
//! sends the service name the unikernel asked for.
//!
//! Older mirage-qubes releases differed (not reproduced): before PR #56 it
//! insisted on HELLO version exactly 2 and logged "Unsupported qrexec
//! version 3" against R4.1 (qubes-mirage-firewall #124), and before PR #60
//! it spoke only version 2 with 4096-byte chunks.
//!
//! # The test handle
//!
//! A unikernel has no agent socket; here the agent socket lets a test make
//! the unikernel call a service. A client connects, writes a version-3
//! trigger (as `qrexec-client-vm` would for an R4.1 agent: target and
//! service; the request id is ignored), then the call's stdin, then shuts
//! down its write side. The agent answers with the data messages it
//! receives from the service, verbatim (8-byte header + payload: `STDOUT`,
//! `STDERR`, and `EXIT_CODE` last), and closes. A refusal closes the socket
//! with nothing written.
//!
//! # Handlers
//!
//! | service | does |
//! |---|---|
//! | `mirage.Echo` | copies stdin to stdout until stdin's end; exit 0 |
//! | `mirage.Sum` | reads stdin to its end, writes `bytes=N fnv=XXXXXXXXXXXXXXXX\n` ([`fnv1a`]); exit 0 |
//! | `mirage.Gen+N` | writes N MiB of [`gen_stream`]; exit 0 |
//! | `mirage.Exit+N` | writes `exit N\n` to stderr; exit N |
//! | anything else | writes `unknown command` to stderr; exit 127 |

use crate::ctrl::{Control, Msg, WakeHandle, Waker};
use crate::service::VmContext;
use crate::{Error, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use qrexec::proto::{
    ConnectionParams, EXEC_PARAMS_SIZE, MSG_HEADER_SIZE, MsgHeader, MsgType, RequestFormat,
    SERVICE_PARAMS_SIZE, TRIGGER3_PARAMS_SIZE, chunk_limit, encode_hello,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::Duration;
use vchan::{Compat, PortName, Vchan};

/// The ring size mirage-qubes asks for (ocaml-vchan's default), each way:
/// in-page rings of orders 10 and 11.
pub const MIRAGE_RING: usize = 1024;

/// The highest protocol version mirage-qubes speaks.
pub const MIRAGE_VERSION: u32 = 3;

/// How long the source side waits for the target to connect (mirage-qubes
/// waits for ever; a simulation must not).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one blocking data-channel operation may take.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What the Mirage-like agent does differently from mirage-qubes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MirageOptions {
    /// Put the request id where the service name belongs in the trigger,
    /// as mirage-qubes 2.0 does (see the module docs).
    pub upstream_trigger: bool,
}

/// mirage-qubes' version choice for a peer's HELLO version: 2 and 3 as
/// they are, above 3 → 3, below 2 refused.
///
/// ```
/// use qubes_sim::mirage::negotiate;
/// assert_eq!(negotiate(4).unwrap(), 3);
/// assert_eq!(negotiate(2).unwrap(), 2);
/// assert!(negotiate(1).is_err());
/// ```
pub fn negotiate(peer: u32) -> Result<u32> {
    match peer {
        0 | 1 => Err(Error::protocol(
            "peer",
            format!("Unsupported qrexec version {peer}"),
        )),
        2 => Ok(2),
        _ => Ok(MIRAGE_VERSION),
    }
}

/// mirage-qubes' request id for its `n`th call: `MIRAGE`, 25 digits, NUL
/// (32 bytes, the whole `request_id` field).
///
/// ```
/// let id = qubes_sim::mirage::request_id(7);
/// assert_eq!(&id[..], b"MIRAGE0000000000000000000000007\0");
/// ```
pub fn request_id(n: u64) -> [u8; SERVICE_PARAMS_SIZE] {
    let mut id = [0u8; SERVICE_PARAMS_SIZE];
    let s = format!("MIRAGE{n:025}");
    id[..s.len()].copy_from_slice(s.as_bytes());
    id
}

/// The `MSG_TRIGGER_SERVICE3` message (header included) mirage-qubes sends
/// to call `service` in `target`; `upstream` reproduces its request id in
/// place of the service name.
///
/// ```
/// use qubes_sim::mirage::{request_id, trigger3};
/// let m = trigger3(b"work", b"demo.Echo", &request_id(0), false).unwrap();
/// assert_eq!(&m[..4], &0x212u32.to_le_bytes());
/// assert!(m.ends_with(b"demo.Echo\0"));
/// let bug = trigger3(b"work", b"demo.Echo", &request_id(0), true).unwrap();
/// assert!(bug.ends_with(b"MIRAGE0000000000000000000000000\0"));
/// ```
///
/// # Errors
/// A target of 64 bytes or more (mirage-qubes raises `Invalid_argument`).
pub fn trigger3(
    target: &[u8],
    service: &[u8],
    id: &[u8; SERVICE_PARAMS_SIZE],
    upstream: bool,
) -> Result<Vec<u8>> {
    if target.len() >= 64 {
        return Err(Error::other("Qubes.RExec.qrexec: vm argument too long"));
    }
    let mut payload = vec![0u8; TRIGGER3_PARAMS_SIZE];
    payload[..target.len()].copy_from_slice(target);
    payload[64..96].copy_from_slice(id);
    if upstream {
        payload.extend_from_slice(id);
    } else {
        payload.extend_from_slice(service);
        payload.push(0);
    }
    let mut m = MsgHeader::new(MsgType::TriggerService3, payload.len() as u32)
        .encode()
        .to_vec();
    m.extend_from_slice(&payload);
    Ok(m)
}

/// FNV-1a 64 of `data`, continuing from `h` (start with
/// [`FNV_OFFSET`]): the checksum `mirage.Sum` reports.
///
/// ```
/// use qubes_sim::mirage::{fnv1a, FNV_OFFSET};
/// assert_eq!(fnv1a(FNV_OFFSET, b""), FNV_OFFSET);
/// assert_eq!(fnv1a(fnv1a(FNV_OFFSET, b"ab"), b"c"), fnv1a(FNV_OFFSET, b"abc"));
/// ```
pub fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The `i`th byte of the stream `mirage.Gen` writes.
///
/// ```
/// assert_eq!(qubes_sim::mirage::gen_stream(0), 0);
/// assert_ne!(qubes_sim::mirage::gen_stream(1), qubes_sim::mirage::gen_stream(257));
/// ```
pub fn gen_stream(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 7) as u8 ^ (i >> 8) as u8
}

// ---------------------------------------------------------------------------
// Framed data channel (msg_chan.ml + rExec.ml's send/recv)

/// A data vchan with mirage-qubes' framing.
#[derive(Debug)]
struct DataChan {
    ch: Vchan,
    version: u32,
}

impl DataChan {
    fn chunk(&self) -> usize {
        chunk_limit(self.version)
    }

    /// One message. A length above the negotiated chunk limit is an error
    /// (mirage-qubes would try to read it; we bound what a peer sends).
    fn recv(&mut self) -> Result<Option<(u32, Vec<u8>)>> {
        let mut h = [0u8; MSG_HEADER_SIZE];
        match self.ch.recv(&mut h) {
            Ok(_) => {}
            Err(vchan::Error::PeerClosed) => return Ok(None),
            Err(e) => return Err(Error::vchan("receive a message header", e)),
        }
        let hdr = MsgHeader::decode(&h).map_err(|e| Error::protocol("caller", e.to_string()))?;
        let len = hdr.len as usize;
        if len > self.chunk() {
            return Err(Error::protocol(
                "caller",
                format!("message type {:#x} of {len} bytes", hdr.ty),
            ));
        }
        let mut body = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.ch.read_some(&mut body[got..]) {
                Ok(0) => return Ok(None),
                Ok(n) => got += n,
                Err(e) => return Err(Error::vchan("receive a message body", e)),
            }
        }
        Ok(Some((hdr.ty, body)))
    }

    /// `rExec.send`: the data in chunks of the limit, each one header and
    /// its bytes; empty data is one empty message.
    fn send(&mut self, ty: MsgType, data: &[u8]) -> Result<()> {
        let mut rest = data;
        loop {
            let n = rest.len().min(self.chunk());
            let mut m = MsgHeader::new(ty, n as u32).encode().to_vec();
            m.extend_from_slice(&rest[..n]);
            self.ch
                .write_all(&m)
                .map_err(|e| Error::io("send a data message", e))?;
            rest = &rest[n..];
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
}

fn recv_hello(ch: &mut Vchan) -> Result<u32> {
    let mut b = [0u8; 12];
    ch.recv(&mut b)
        .map_err(|e| Error::vchan("End-of-file waiting for msg_hello", e))?;
    let hdr = MsgHeader::decode(&b).map_err(|e| Error::protocol("peer", e.to_string()))?;
    if hdr.ty != MsgType::Hello.as_u32() || hdr.len != 4 {
        return Err(Error::protocol(
            "peer",
            format!("Expected msg_hello, got {:#x}", hdr.ty),
        ));
    }
    Ok(u32::from_le_bytes([b[8], b[9], b[10], b[11]]))
}

fn send_hello(ch: &mut Vchan) -> Result<()> {
    ch.send(&encode_hello(MIRAGE_VERSION))
        .map(|_| ())
        .map_err(|e| Error::vchan("send msg_hello", e))
}

// ---------------------------------------------------------------------------
// Target side: a handler per call (rExec.ml `exec` / `with_flow`)

/// The handler's view of a call (rExec.ml's `Flow`).
#[derive(Debug)]
pub struct Flow {
    dc: DataChan,
    just_exec: bool,
    eof: bool,
}

impl Flow {
    /// The next piece of stdin; `None` at its end (an empty `STDIN`, or
    /// any other message type, after which the channel is closed).
    pub fn read(&mut self) -> Result<Option<Vec<u8>>> {
        if self.just_exec || self.eof {
            return Ok(None);
        }
        match self.dc.recv()? {
            Some((ty, d)) if ty == MsgType::DataStdin.as_u32() && !d.is_empty() => Ok(Some(d)),
            Some((ty, _)) if ty == MsgType::DataStdin.as_u32() => {
                self.eof = true;
                Ok(None)
            }
            Some((ty, _)) => {
                crate::log!("Unknown message type {ty} received");
                self.eof = true;
                Ok(None)
            }
            None => {
                self.eof = true;
                Ok(None)
            }
        }
    }

    /// Writes to stdout (nothing for an empty buffer or `MSG_JUST_EXEC`).
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.push(MsgType::DataStdout, data)
    }

    /// Writes to stderr.
    pub fn ewrite(&mut self, data: &[u8]) -> Result<()> {
        self.push(MsgType::DataStderr, data)
    }

    fn push(&mut self, ty: MsgType, data: &[u8]) -> Result<()> {
        if self.just_exec || data.is_empty() {
            return Ok(());
        }
        self.dc.send(ty, data)
    }

    /// `Flow.close`: empty `STDOUT`, the exit code, close.
    fn close(mut self, code: i32) -> Result<()> {
        let r = self
            .dc
            .send(MsgType::DataStdout, &[])
            .and_then(|()| self.dc.send(MsgType::DataExitCode, &code.to_le_bytes()));
        drop(self.dc);
        r
    }
}

/// The built-in handlers (see the module docs). `cmd` is the part after
/// `user:`.
pub fn handle(cmd: &str, flow: &mut Flow) -> Result<i32> {
    let descriptor = cmd
        .strip_prefix("QUBESRPC ")
        .and_then(|r| r.split(' ').next())
        .unwrap_or("");
    let (name, arg) = descriptor.split_once('+').unwrap_or((descriptor, ""));
    match name {
        "mirage.Echo" => {
            while let Some(d) = flow.read()? {
                flow.write(&d)?;
            }
            Ok(0)
        }
        "mirage.Sum" => {
            let (mut n, mut h) = (0u64, FNV_OFFSET);
            while let Some(d) = flow.read()? {
                n += d.len() as u64;
                h = fnv1a(h, &d);
            }
            flow.write(format!("bytes={n} fnv={h:016x}\n").as_bytes())?;
            Ok(0)
        }
        "mirage.Gen" => {
            let mib: u64 = arg.parse().unwrap_or(0).min(1024);
            let mut buf = vec![0u8; 65536];
            let mut i = 0u64;
            while i < mib << 20 {
                for b in buf.iter_mut() {
                    *b = gen_stream(i);
                    i += 1;
                }
                flow.write(&buf)?;
            }
            Ok(0)
        }
        "mirage.Exit" => {
            let code: i32 = arg.parse().unwrap_or(1);
            flow.ewrite(format!("exit {code}\n").as_bytes())?;
            Ok(code)
        }
        _ => {
            flow.ewrite(b"unknown command\n")?;
            Ok(127)
        }
    }
}

/// One call on the target side, from `MSG_EXEC_CMDLINE` (or
/// `MSG_JUST_EXEC`) payload `cmdline` (after the 8 connection bytes, NUL
/// included) to the exit code sent.
pub fn exec(ctx: &VmContext, params: ConnectionParams, cmdline: &[u8], just: bool) -> Result<()> {
    let domid = u16::try_from(params.connect_domain)
        .ok()
        .filter(|&d| d < 0x7FF0)
        .ok_or_else(|| Error::protocol("dom0", "invalid connect_domain"))?;
    let mut ch = Vchan::client_with(
        &ctx.transport,
        domid,
        &PortName::from(params.connect_port),
        ctx.connect_timeout,
        Compat::OcamlVchan,
    )
    .map_err(|e| Error::vchan("Error setting up vchan", e))?;
    ch.set_io_timeout(Some(IO_TIMEOUT));
    // The caller's HELLO first, then ours (with_flow).
    let peer = recv_hello(&mut ch)?;
    send_hello(&mut ch)?;
    let version = negotiate(peer)?;
    let mut flow = Flow {
        dc: DataChan { ch, version },
        just_exec: just,
        eof: false,
    };
    let code = match parse_cmdline(cmdline) {
        Ok((_user, cmd)) => match handle(&cmd, &mut flow) {
            Ok(code) => code,
            Err(e) => {
                crate::log!("uncaught exception: {e}");
                255
            }
        },
        Err(e) => {
            crate::log!("uncaught exception: {e}");
            255
        }
    };
    flow.close(code)
}

/// `parse_cmdline`: must end with NUL; `user:command`.
fn parse_cmdline(cmd: &[u8]) -> Result<(String, String)> {
    let Some((&0, body)) = cmd.split_last() else {
        return Err(Error::protocol("dom0", "Command not null-terminated"));
    };
    let text = String::from_utf8_lossy(body);
    match text.split_once(':') {
        Some((u, c)) => Ok((u.to_string(), c.to_string())),
        None => Err(Error::protocol("dom0", format!("Missing ':' in {text:?}"))),
    }
}

// ---------------------------------------------------------------------------
// Source side: the unikernel calls a service (rExec.ml `qrexec` /
// `start_connection` / `Client_flow`), driven through the test handle.

/// Relays one call: the requester's bytes as `STDIN`, the service's
/// messages back verbatim, until the exit code.
fn client_call(t: &vchan::Transport, params: ConnectionParams, mut sock: UnixStream) -> Result<()> {
    let domid = u16::try_from(params.connect_domain)
        .map_err(|_| Error::protocol("dom0", "invalid connect_domain"))?;
    let mut ch = Vchan::server_with(
        t,
        domid,
        &PortName::from(params.connect_port),
        MIRAGE_RING,
        MIRAGE_RING,
        Compat::OcamlVchan,
    )
    .map_err(|e| Error::vchan("data vchan server", e))?;
    ch.wait_connected(Some(CONNECT_TIMEOUT))
        .map_err(|e| Error::vchan("wait for the service", e))?;
    ch.set_io_timeout(Some(IO_TIMEOUT));
    send_hello(&mut ch)?;
    let version = negotiate(recv_hello(&mut ch)?)?;
    let chunk = chunk_limit(version);
    ch.set_blocking(false);
    sock.set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;

    let mut stdin_open = true;
    let mut to_vchan: Vec<u8> = Vec::new();
    let mut to_sock: Vec<u8> = Vec::new();
    let mut rbuf: Vec<u8> = Vec::new();
    let mut done = false;
    let mut buf = vec![0u8; chunk];
    let would_block = crate::ctrl::would_block;
    loop {
        let mut progress = false;
        if stdin_open && to_vchan.len() < 4 * chunk {
            match sock.read(&mut buf) {
                Ok(0) => {
                    to_vchan.extend_from_slice(&MsgHeader::new(MsgType::DataStdin, 0).encode());
                    stdin_open = false;
                    progress = true;
                }
                Ok(n) => {
                    to_vchan
                        .extend_from_slice(&MsgHeader::new(MsgType::DataStdin, n as u32).encode());
                    to_vchan.extend_from_slice(&buf[..n]);
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => progress = true,
                Err(_) => {
                    stdin_open = false;
                    to_vchan.extend_from_slice(&MsgHeader::new(MsgType::DataStdin, 0).encode());
                }
            }
        }
        while !to_vchan.is_empty() {
            match ch.write_some(&to_vchan) {
                Ok(0) => break,
                Ok(n) => {
                    to_vchan.drain(..n);
                    progress = true;
                }
                Err(ref e) if would_block(e) => break,
                Err(e) => return Err(Error::vchan("send stdin", e)),
            }
        }
        let mut closed = false;
        loop {
            match ch.read_some(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    rbuf.extend_from_slice(&buf[..n]);
                    progress = true;
                }
                Err(ref e) if would_block(e) => break,
                Err(e) => return Err(Error::vchan("receive from the service", e)),
            }
        }
        // Complete messages go to the requester as they are.
        let mut pos = 0;
        while !done && rbuf.len() - pos >= MSG_HEADER_SIZE {
            let hdr = MsgHeader::decode(&rbuf[pos..])
                .map_err(|e| Error::protocol("service", e.to_string()))?;
            let len = hdr.len as usize;
            if len > chunk {
                return Err(Error::protocol(
                    "service",
                    format!("message of {len} bytes"),
                ));
            }
            if rbuf.len() - pos - MSG_HEADER_SIZE < len {
                break;
            }
            let end = pos + MSG_HEADER_SIZE + len;
            match MsgType::from_u32(hdr.ty) {
                Some(MsgType::DataStdout | MsgType::DataStderr) => {
                    to_sock.extend_from_slice(&rbuf[pos..end]);
                }
                Some(MsgType::DataExitCode) => {
                    to_sock.extend_from_slice(&rbuf[pos..end]);
                    done = true;
                }
                _ => {
                    crate::log!(
                        "unexpected message of type {:#x} received; closing connection",
                        hdr.ty
                    );
                    return Ok(());
                }
            }
            pos = end;
        }
        rbuf.drain(..pos);
        while !to_sock.is_empty() {
            match sock.write(&to_sock) {
                Ok(n) => {
                    to_sock.drain(..n);
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The requester went away: nobody to tell.
                Err(_) => return Ok(()),
            }
        }
        if (done || closed) && to_sock.is_empty() {
            return Ok(());
        }
        if progress {
            continue;
        }
        // Ask for the events we need, then look once more before sleeping.
        let ready = ch
            .data_ready()
            .map_err(|e| Error::vchan("look for data", e))?;
        let space = if to_vchan.is_empty() {
            1
        } else {
            ch.buffer_space()
                .map_err(|e| Error::vchan("look for space", e))?
        };
        if ready > 0 || (space > 0 && !to_vchan.is_empty()) {
            continue;
        }
        let mut sock_flags = PollFlags::empty();
        if stdin_open && to_vchan.len() < 4 * chunk {
            sock_flags |= PollFlags::POLLIN;
        }
        if !to_sock.is_empty() {
            sock_flags |= PollFlags::POLLOUT;
        }
        let mut fds = [
            PollFd::new(ch.as_fd(), PollFlags::POLLIN),
            PollFd::new(sock.as_fd(), sock_flags),
        ];
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::io("poll", e.into())),
        }
        ch.consume_events()
            .map_err(|e| Error::vchan("consume events", e))?;
    }
}

// ---------------------------------------------------------------------------
// The agent

enum Event {
    Request(UnixStream, Vec<u8>),
    CallDone(ConnectionParams),
}

/// Runs a Mirage-like agent for `ctx` until dom0 closes the control
/// channel (an error) or the process is killed. `socket` is the test
/// handle (see the module docs).
pub fn run(
    ctx: VmContext,
    socket: std::path::PathBuf,
    daemon_timeout: Duration,
    opts: MirageOptions,
) -> Result<()> {
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| Error::io(format!("bind {}", socket.display()), e))?;
    let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666));
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;
    let mut ctrl = Control::serve_with(
        &ctx.transport,
        MIRAGE_VERSION,
        daemon_timeout,
        Compat::OcamlVchan,
        MIRAGE_RING,
        MIRAGE_RING,
    )?;
    crate::vlog!(
        "mirage-like control channel up (version {})",
        ctrl.version()
    );
    let waker = Waker::new()?;
    let (tx, rx) = mpsc::channel::<Event>();
    let mut pending: HashMap<Vec<u8>, UnixStream> = HashMap::new();
    let mut counter = 0u64;
    let mut msgs: Vec<Msg> = Vec::new();
    loop {
        msgs.clear();
        let open = ctrl.read_messages(&mut msgs)?;
        for (hdr, payload) in msgs.drain(..) {
            handle_ctrl(&ctx, &mut pending, &tx, &waker, hdr, payload)?;
        }
        if !open {
            return Err(Error::other("dom0 rexec vchan connection closed"));
        }
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Request(s, req) => {
                    let target_field = &req[MSG_HEADER_SIZE..MSG_HEADER_SIZE + 64];
                    let tend = target_field.iter().position(|&c| c == 0).unwrap_or(64);
                    let service = &req[MSG_HEADER_SIZE + TRIGGER3_PARAMS_SIZE..req.len() - 1];
                    let id = request_id(counter);
                    counter += 1;
                    match trigger3(&target_field[..tend], service, &id, opts.upstream_trigger) {
                        Ok(m) => {
                            let hdr = MsgHeader::decode(&m).unwrap_or(MsgHeader { ty: 0, len: 0 });
                            ctrl.queue_raw(&hdr, &m[MSG_HEADER_SIZE..]);
                            pending.insert(id.to_vec(), s);
                        }
                        Err(e) => crate::log!("{e}"),
                    }
                }
                Event::CallDone(p) => ctrl.queue(MsgType::ConnectionTerminated, &p.encode()),
            }
        }
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    let tx = tx.clone();
                    let wake = waker.handle()?;
                    std::thread::spawn(move || read_trigger(s, tx, wake));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("accept", e)),
            }
        }
        ctrl.flush()?;
        crate::ctrl::sleep_on(&mut ctrl, &listener, &waker)?;
    }
}

fn read_trigger(mut s: UnixStream, tx: mpsc::Sender<Event>, wake: WakeHandle) {
    let _ = s.set_read_timeout(Some(crate::agent::REQUEST_READ_TIMEOUT));
    match crate::agent::read_request(&mut s, RequestFormat::V3) {
        Ok(req) if req.last() == Some(&0) => {
            let _ = s.set_read_timeout(None);
            if tx.send(Event::Request(s, req)).is_ok() {
                wake.wake();
            }
        }
        Ok(_) => crate::log!("test handle: service name without NUL"),
        Err(why) => crate::log!("test handle: not a version-3 trigger ({why})"),
    }
}

fn handle_ctrl(
    ctx: &VmContext,
    pending: &mut HashMap<Vec<u8>, UnixStream>,
    tx: &mpsc::Sender<Event>,
    waker: &Waker,
    hdr: MsgHeader,
    payload: Vec<u8>,
) -> Result<()> {
    match MsgType::from_u32(hdr.ty) {
        Some(t @ (MsgType::ExecCmdline | MsgType::JustExec))
            if payload.len() > EXEC_PARAMS_SIZE =>
        {
            let params = ConnectionParams::decode(&payload[..EXEC_PARAMS_SIZE])
                .map_err(|e| Error::protocol("dom0", e.to_string()))?;
            let ctx = ctx.clone();
            let tx = tx.clone();
            let wake = waker.handle()?;
            std::thread::spawn(move || {
                let cmdline = &payload[EXEC_PARAMS_SIZE..];
                if let Err(e) = exec(&ctx, params, cmdline, t == MsgType::JustExec) {
                    crate::log!(
                        "Error in call (domain {}, port {}): {e}",
                        params.connect_domain,
                        params.connect_port
                    );
                }
                if tx.send(Event::CallDone(params)).is_ok() {
                    wake.wake();
                }
            });
        }
        Some(MsgType::ServiceConnect)
            if payload.len() == EXEC_PARAMS_SIZE + SERVICE_PARAMS_SIZE =>
        {
            let params = ConnectionParams::decode(&payload[..EXEC_PARAMS_SIZE])
                .map_err(|e| Error::protocol("dom0", e.to_string()))?;
            match pending.remove(&payload[EXEC_PARAMS_SIZE..]) {
                Some(s) => {
                    let t = ctx.transport.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = client_call(&t, params, s) {
                            crate::log!("call to domain {}: {e}", params.connect_domain);
                        }
                    });
                }
                None => crate::vlog!("request_id without client"),
            }
        }
        Some(MsgType::ServiceRefused) => {
            // Dropping the requester's socket is the refusal.
            if pending.remove(&payload[..]).is_none() {
                crate::log!("No client for request id");
            }
        }
        _ => crate::log!(
            "unhandled qrexec message type received: {:#x} (len {})",
            hdr.ty,
            hdr.len
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdlines() {
        assert_eq!(
            parse_cmdline(b"user:QUBESRPC mirage.Echo+ work\0").unwrap(),
            ("user".into(), "QUBESRPC mirage.Echo+ work".into())
        );
        assert!(parse_cmdline(b"user:x").is_err(), "no NUL");
        assert!(parse_cmdline(b"nocolon\0").is_err());
        assert!(parse_cmdline(b"").is_err());
    }

    #[test]
    fn versions() {
        assert_eq!(negotiate(3).unwrap(), 3);
        assert_eq!(negotiate(u32::MAX).unwrap(), 3);
        assert!(negotiate(0).is_err());
    }

    #[test]
    fn trigger_layout() {
        let id = request_id(12);
        let m = trigger3(b"work", b"svc+arg", &id, false).unwrap();
        assert_eq!(m.len(), 8 + 96 + 8);
        assert_eq!(&m[4..8], &(96u32 + 8).to_le_bytes());
        assert_eq!(&m[8..12], b"work");
        assert!(m[12..72].iter().all(|&b| b == 0));
        assert_eq!(&m[72..104], &id);
        assert!(trigger3(&[b'a'; 64], b"s", &id, false).is_err());
        let bug = trigger3(b"work", b"svc", &id, true).unwrap();
        assert_eq!(&bug[104..], &id);
    }
}
