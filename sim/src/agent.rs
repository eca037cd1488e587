//! A VM's qrexec agent (docs/qrexec.md §7, §14): the control vchan server toward
//! dom0, the agent socket for `qrexec-client-vm`, and the target side of
//! calls.
//!
//! Source side: a client's request is read whole (in a thread, so a
//! stalled client cannot freeze the agent), checked against the one
//! request format this agent speaks (otherwise the socket is closed, which
//! the client reports as a refusal), given the identifier `SOCKET<fd>` and
//! forwarded to the daemon. `MSG_SERVICE_CONNECT` writes the 8 connection
//! bytes to that socket, which is then watched: when the client closes it,
//! `MSG_CONNECTION_TERMINATED` goes to the daemon. `MSG_SERVICE_REFUSED`
//! closes it.
//!
//! Target side: `MSG_EXEC_CMDLINE` / `MSG_JUST_EXEC` start a call thread
//! ([`crate::service::run_call`]); when it ends, the agent sends
//! `MSG_CONNECTION_TERMINATED{source domain, port}`.

use crate::ctrl::{Control, Msg, WakeHandle, Waker};
use crate::service::VmContext;
use crate::{Error, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use qrexec::proto::{
    ConnectionParams, EXEC_PARAMS_SIZE, MAX_SERVICE_NAME_LEN, MSG_HEADER_SIZE, MsgHeader, MsgType,
    RequestFormat, SERVICE_PARAMS_SIZE, TRIGGER_V2_SIZE,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

/// How long a client may take to write its request.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything an agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The VM.
    pub ctx: VmContext,
    /// The request format accepted on the agent socket.
    pub format: RequestFormat,
    /// The agent socket path.
    pub socket: PathBuf,
    /// How long to wait for the daemon to connect.
    pub daemon_timeout: Duration,
}

enum Event {
    Request(UnixStream, Vec<u8>),
    CallDone(ConnectionParams),
}

/// Where the request id sits in a request of each format (after the
/// header for v3/v4).
fn request_id_offset(f: RequestFormat) -> usize {
    match f {
        RequestFormat::V2 => 96,
        RequestFormat::V3 => 64,
        RequestFormat::V4 => 128,
    }
}

/// Read a whole request in format `f` (header included for v3/v4), or
/// explain why it is not one.
pub fn read_request(s: &mut impl Read, f: RequestFormat) -> std::result::Result<Vec<u8>, String> {
    if f == RequestFormat::V2 {
        let mut b = vec![0u8; TRIGGER_V2_SIZE];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        return Ok(b);
    }
    let mut h = [0u8; MSG_HEADER_SIZE];
    s.read_exact(&mut h).map_err(|e| e.to_string())?;
    let hdr = MsgHeader::decode(&h).map_err(|e| e.to_string())?;
    let want = match f {
        RequestFormat::V3 => MsgType::TriggerService3,
        _ => MsgType::TriggerService4,
    };
    let params = f.params_size();
    let len = hdr.len as usize;
    if hdr.ty != want.as_u32() || len <= params || len > params + MAX_SERVICE_NAME_LEN {
        return Err(format!("type {:#x} len {len}", hdr.ty));
    }
    let mut b = vec![0u8; MSG_HEADER_SIZE + len];
    b[..MSG_HEADER_SIZE].copy_from_slice(&h);
    s.read_exact(&mut b[MSG_HEADER_SIZE..])
        .map_err(|e| e.to_string())?;
    Ok(b)
}

fn reader_thread(mut s: UnixStream, f: RequestFormat, tx: mpsc::Sender<Event>, wake: WakeHandle) {
    let _ = s.set_read_timeout(Some(REQUEST_READ_TIMEOUT));
    match read_request(&mut s, f) {
        Ok(req) => {
            let _ = s.set_read_timeout(None);
            if tx.send(Event::Request(s, req)).is_ok() {
                wake.wake();
            }
        }
        Err(why) => {
            crate::log!(
                "Invalid request received from qrexec-client-vm, is it outdated? ({f} expected: {why})"
            );
        }
    }
}

struct Agent {
    cfg: AgentConfig,
    ctrl: Control,
    listener: UnixListener,
    waker: Waker,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    /// Requests forwarded to dom0, by identifier.
    pending: HashMap<String, UnixStream>,
    /// Accepted calls whose client socket is watched.
    connected: Vec<(UnixStream, ConnectionParams)>,
}

/// Run an agent until its daemon goes away (an error) or it is killed.
pub fn run(cfg: AgentConfig) -> Result<()> {
    let _ = std::fs::remove_file(&cfg.socket);
    let listener = UnixListener::bind(&cfg.socket)
        .map_err(|e| Error::io(format!("bind {}", cfg.socket.display()), e))?;
    // Like the real agent (umask 0): any user of the VM may call.
    let _ = std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o666));
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;
    let ctrl = Control::serve(
        &cfg.ctx.transport,
        cfg.format.protocol_version(),
        cfg.daemon_timeout,
    )?;
    crate::vlog!(
        "control channel up (version {}), serving {}",
        ctrl.version(),
        cfg.socket.display()
    );
    let (tx, rx) = mpsc::channel();
    let mut agent = Agent {
        cfg,
        ctrl,
        listener,
        waker: Waker::new()?,
        tx,
        rx,
        pending: HashMap::new(),
        connected: Vec::new(),
    };
    agent.main_loop()
}

impl Agent {
    fn main_loop(&mut self) -> Result<()> {
        let mut msgs = Vec::new();
        loop {
            // Control messages first.
            msgs.clear();
            let open = self.ctrl.read_messages(&mut msgs)?;
            for m in msgs.drain(..) {
                self.handle_ctrl(m)?;
            }
            if !open {
                return Err(Error::other("the daemon closed the control channel"));
            }
            while let Ok(ev) = self.rx.try_recv() {
                self.handle_event(ev);
            }
            self.accept()?;
            self.ctrl.flush()?;

            let mut fds = vec![
                PollFd::new(self.ctrl.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.waker.as_fd(), PollFlags::POLLIN),
            ];
            for (s, _) in &self.connected {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
            }
            let timeout = if self.ctrl.has_pending_writes() {
                PollTimeout::from(20u16)
            } else {
                PollTimeout::from(1000u16)
            };
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(Error::io("poll", e.into())),
            }
            let ctrl_ev = fds[0].revents().is_some_and(|r| !r.is_empty());
            let wake_ev = fds[2].revents().is_some_and(|r| !r.is_empty());
            let closed: Vec<usize> = fds[3..]
                .iter()
                .enumerate()
                .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(i, _)| i)
                .collect();
            drop(fds);
            if ctrl_ev {
                self.ctrl.consume_event();
            }
            if wake_ev {
                self.waker.drain();
            }
            // The client finished (any readable event counts, docs/qrexec.md §7.3).
            for i in closed.into_iter().rev() {
                let (_s, p) = self.connected.swap_remove(i);
                crate::vlog!(
                    "client finished: CONNECTION_TERMINATED({}, {})",
                    p.connect_domain,
                    p.connect_port
                );
                self.ctrl.queue(MsgType::ConnectionTerminated, &p.encode());
            }
        }
    }

    fn accept(&mut self) -> Result<()> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    let tx = self.tx.clone();
                    let wake = self.waker.handle()?;
                    let f = self.cfg.format;
                    std::thread::spawn(move || reader_thread(s, f, tx, wake));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("accept on the agent socket", e)),
            }
        }
    }

    fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Request(s, mut req) => {
                if self.pending.len() + self.connected.len() >= qrexec::proto::MAX_FDS {
                    crate::log!("too many open requests: closing a new one");
                    return;
                }
                let ident = format!("SOCKET{}", s.as_raw_fd());
                let f = self.cfg.format;
                let base = if f == RequestFormat::V2 {
                    0
                } else {
                    MSG_HEADER_SIZE
                };
                let at = base + request_id_offset(f);
                let field = &mut req[at..at + SERVICE_PARAMS_SIZE];
                field.fill(0);
                field[..ident.len()].copy_from_slice(ident.as_bytes());
                if f == RequestFormat::V2 {
                    self.ctrl.queue(MsgType::TriggerService, &req);
                } else {
                    let hdr = MsgHeader::decode(&req).unwrap_or(MsgHeader { ty: 0, len: 0 });
                    self.ctrl.queue_raw(&hdr, &req[MSG_HEADER_SIZE..]);
                }
                crate::vlog!("request {ident} forwarded to dom0");
                self.pending.insert(ident, s);
            }
            Event::CallDone(p) => {
                self.ctrl.queue(MsgType::ConnectionTerminated, &p.encode());
            }
        }
    }

    fn handle_ctrl(&mut self, (hdr, payload): Msg) -> Result<()> {
        let bad = |msg: String| Err(Error::protocol("dom0 daemon", msg));
        match MsgType::from_u32(hdr.ty) {
            Some(t @ (MsgType::ExecCmdline | MsgType::JustExec)) => {
                if payload.len() <= EXEC_PARAMS_SIZE {
                    return bad(format!("{t:?} with len {}", payload.len()));
                }
                let params = ConnectionParams::decode(&payload[..EXEC_PARAMS_SIZE])
                    .map_err(|e| Error::protocol("dom0 daemon", e.to_string()))?;
                // The command line ends at its first NUL (the last byte is
                // forced to NUL).
                let rest = &payload[EXEC_PARAMS_SIZE..payload.len() - 1];
                let cmdline = rest.split(|&c| c == 0).next().unwrap_or(&[]).to_vec();
                let ctx = self.cfg.ctx.clone();
                let tx = self.tx.clone();
                let wake = self.waker.handle()?;
                let just = t == MsgType::JustExec;
                std::thread::spawn(move || {
                    if let Err(e) = crate::service::run_call(&ctx, params, &cmdline, just) {
                        crate::log!(
                            "call '{}' (domain {}, port {}): {e}",
                            String::from_utf8_lossy(&cmdline),
                            params.connect_domain,
                            params.connect_port
                        );
                    }
                    if tx.send(Event::CallDone(params)).is_ok() {
                        wake.wake();
                    }
                });
            }
            Some(MsgType::ServiceConnect) => {
                if payload.len() != EXEC_PARAMS_SIZE + SERVICE_PARAMS_SIZE {
                    return bad(format!("SERVICE_CONNECT with len {}", payload.len()));
                }
                let params = ConnectionParams::decode(&payload[..EXEC_PARAMS_SIZE])
                    .map_err(|e| Error::protocol("dom0 daemon", e.to_string()))?;
                let ident = ident_of(&payload[EXEC_PARAMS_SIZE..]);
                match self.pending.remove(&ident) {
                    Some(mut s) => {
                        crate::vlog!(
                            "request {ident} accepted: domain {}, port {}",
                            params.connect_domain,
                            params.connect_port
                        );
                        if s.write_all(&params.encode()).is_ok() {
                            self.connected.push((s, params));
                        } else {
                            // The client is gone already.
                            self.ctrl
                                .queue(MsgType::ConnectionTerminated, &params.encode());
                        }
                    }
                    None => crate::log!("SERVICE_CONNECT for unknown request '{ident}'"),
                }
            }
            Some(MsgType::ServiceRefused) => {
                if payload.len() != SERVICE_PARAMS_SIZE {
                    return bad(format!("SERVICE_REFUSED with len {}", payload.len()));
                }
                let ident = ident_of(&payload);
                crate::vlog!("request {ident} refused");
                if self.pending.remove(&ident).is_none() {
                    crate::log!("SERVICE_REFUSED for unknown request '{ident}'");
                }
            }
            _ => {
                return bad(format!(
                    "unexpected message type {:#x} len {}",
                    hdr.ty, hdr.len
                ));
            }
        }
        Ok(())
    }
}

/// The identifier in a 32-byte `service_params` field.
fn ident_of(field: &[u8]) -> String {
    let usable = &field[..field.len().saturating_sub(1)];
    let end = usable.iter().position(|&c| c == 0).unwrap_or(usable.len());
    String::from_utf8_lossy(&usable[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use qrexec::proto::Trigger;

    #[test]
    fn requests_by_format() {
        for f in [RequestFormat::V2, RequestFormat::V3, RequestFormat::V4] {
            let req = Trigger::new(f, b"work", b"demo.Echo", b"")
                .encode()
                .unwrap();
            assert_eq!(read_request(&mut &req[..], f).unwrap(), req);
            // A request of another format is not accepted (v2 has no
            // header, so any 128 bytes would pass as v2).
            for other in [RequestFormat::V3, RequestFormat::V4] {
                if other != f {
                    assert!(
                        read_request(&mut &req[..], other).is_err(),
                        "{f} as {other}"
                    );
                }
            }
            assert!(read_request(&mut &req[..req.len() - 1], f).is_err());
            let at = if f == RequestFormat::V2 { 0 } else { 8 } + request_id_offset(f);
            assert_eq!(&req[at..at + 6], b"SOCKET");
        }
        // length bounds
        let mut h = MsgHeader::new(MsgType::TriggerService4, 160)
            .encode()
            .to_vec();
        h.extend(vec![0u8; 160]);
        assert!(read_request(&mut &h[..], RequestFormat::V4).is_err());
    }

    #[test]
    fn idents() {
        let mut f = [0u8; 32];
        f[..8].copy_from_slice(b"SOCKET11");
        assert_eq!(ident_of(&f), "SOCKET11");
        assert_eq!(ident_of(&[b'x'; 32]), "x".repeat(31));
    }
}
