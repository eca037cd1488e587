//! The control vchan (port 512) between a VM's agent and its dom0 daemon:
//! HELLO in blocking mode, then framed messages in non-blocking mode for a
//! poll-driven loop, with a queue for what does not fit into the 4 KiB
//! ring yet (so neither side ever blocks on a full ring).

use crate::{Error, Result};
use qrexec::proto::{
    MSG_HEADER_SIZE, MsgHeader, MsgType, VCHAN_BASE_PORT, encode_hello, negotiate,
};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vchan::{DomId, State, Transport, Vchan};

/// Ring size of the control vchan, each direction.
pub const CONTROL_RING: usize = 4096;

/// How long the HELLO exchange may take.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// One message: its header and payload.
pub type Msg = (MsgHeader, Vec<u8>);

/// A connected control vchan.
#[derive(Debug)]
pub struct Control {
    ch: Vchan,
    peer: String,
    version: u32,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    max_len: usize,
}

fn hello_roundtrip(ch: &mut Vchan, peer: &str, send_first: Option<u32>) -> Result<u32> {
    ch.set_io_timeout(Some(HELLO_TIMEOUT));
    if let Some(v) = send_first {
        ch.send(&encode_hello(v))
            .map_err(|e| Error::vchan(format!("send HELLO to {peer}"), e))?;
    }
    let mut b = [0u8; 12];
    ch.recv(&mut b)
        .map_err(|e| Error::vchan(format!("receive HELLO from {peer}"), e))?;
    let hdr = MsgHeader::decode(&b).map_err(|e| Error::protocol(peer, e.to_string()))?;
    if hdr.ty != MsgType::Hello.as_u32() || hdr.len != 4 {
        return Err(Error::protocol(
            peer,
            format!("expected HELLO, got type {:#x} len {}", hdr.ty, hdr.len),
        ));
    }
    ch.set_io_timeout(None);
    Ok(u32::from_le_bytes([b[8], b[9], b[10], b[11]]))
}

impl Control {
    /// Agent side: vchan server for dom0 on port 512 (4096/4096), wait at
    /// most `timeout` for the daemon, send our HELLO, read the daemon's.
    pub fn serve(t: &Transport, version: u32, timeout: Duration) -> Result<Control> {
        Self::serve_with(
            t,
            version,
            timeout,
            vchan::Compat::Libxenvchan,
            CONTROL_RING,
            CONTROL_RING,
        )
    }

    /// As [`Control::serve`], with the vchan behaving like `compat` and
    /// asking for `read`/`write` ring sizes (a Mirage-like agent:
    /// ocaml-vchan's 1024/1024, see [`crate::mirage`]).
    pub fn serve_with(
        t: &Transport,
        version: u32,
        timeout: Duration,
        compat: vchan::Compat,
        read: usize,
        write: usize,
    ) -> Result<Control> {
        let peer = "dom0 daemon";
        let port = vchan::PortName::from(VCHAN_BASE_PORT);
        let mut ch = Vchan::server_with(t, 0, &port, read, write, compat)
            .map_err(|e| Error::vchan("control vchan server", e))?;
        ch.wait_connected(Some(timeout))
            .map_err(|e| Error::vchan("wait for the daemon", e))?;
        let theirs = hello_roundtrip(&mut ch, peer, Some(version))?;
        let v = negotiate(version, theirs).map_err(|e| Error::protocol(peer, e.to_string()))?;
        // Triggers up to 160 + 65000; commands up to 8 + 65535.
        Ok(Control::new(
            ch,
            peer,
            v,
            8 + qrexec::proto::MAX_QREXEC_CMD_LEN,
        ))
    }

    /// Daemon side: vchan client of the agent of `domid` on port 512,
    /// reading the agent's HELLO first and answering with the smaller
    /// version (agents below 2 are rejected).
    pub fn connect(t: &Transport, domid: DomId, own: u32, timeout: Duration) -> Result<Control> {
        let peer = format!("agent of domain {domid}");
        let mut ch = Vchan::client(t, domid, VCHAN_BASE_PORT, timeout)
            .map_err(|e| Error::vchan(format!("connect to the {peer}"), e))?;
        let theirs = hello_roundtrip(&mut ch, &peer, None)?;
        let v = negotiate(own, theirs).map_err(|e| Error::protocol(&peer, e.to_string()))?;
        ch.set_io_timeout(Some(HELLO_TIMEOUT));
        ch.send(&encode_hello(v))
            .map_err(|e| Error::vchan(format!("send HELLO to the {peer}"), e))?;
        ch.set_io_timeout(None);
        let max = qrexec::proto::TRIGGER4_PARAMS_SIZE + qrexec::proto::MAX_SERVICE_NAME_LEN;
        Ok(Control::new(ch, &peer, v, max))
    }

    fn new(mut ch: Vchan, peer: &str, version: u32, max_len: usize) -> Control {
        ch.set_blocking(false);
        Control {
            ch,
            peer: peer.to_string(),
            version,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            max_len,
        }
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Queue a message (sent by [`Control::flush`]).
    pub fn queue(&mut self, ty: MsgType, payload: &[u8]) {
        self.queue_raw(&MsgHeader::new(ty, payload.len() as u32), payload);
    }

    /// Queue a message with a raw header.
    pub fn queue_raw(&mut self, hdr: &MsgHeader, payload: &[u8]) {
        self.wbuf.extend_from_slice(&hdr.encode());
        self.wbuf.extend_from_slice(payload);
    }

    /// Whether queued bytes wait for ring space.
    pub fn has_pending_writes(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    /// Write as much of the queue as fits now.
    pub fn flush(&mut self) -> Result<()> {
        while self.wpos < self.wbuf.len() {
            match self.ch.write_some(&self.wbuf[self.wpos..]) {
                Ok(0) => break,
                Err(ref e) if crate::ctrl::would_block(e) => break,
                Ok(n) => self.wpos += n,
                Err(e) => return Err(Error::vchan(format!("write to the {}", self.peer), e)),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        Ok(())
    }

    /// Consume the event that woke `poll` (never blocks).
    pub fn consume_event(&mut self) {
        let _ = self.ch.wait_timeout(Some(Duration::ZERO));
    }

    /// Whether the peer is still there.
    pub fn is_open(&mut self) -> bool {
        self.ch.state() == State::Connected
    }

    /// Read what has arrived and append complete messages to `out`.
    /// Returns `false` once the peer has closed and everything was read.
    pub fn read_messages(&mut self, out: &mut Vec<Msg>) -> Result<bool> {
        let mut open = true;
        let mut tmp = [0u8; CONTROL_RING];
        loop {
            match self.ch.read_some(&mut tmp) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(n) => self.rbuf.extend_from_slice(&tmp[..n]),
                Err(ref e) if crate::ctrl::would_block(e) => break,
                Err(e) => return Err(Error::vchan(format!("read from the {}", self.peer), e)),
            }
        }
        let mut pos = 0;
        while self.rbuf.len() - pos >= MSG_HEADER_SIZE {
            let hdr = MsgHeader::decode(&self.rbuf[pos..])
                .map_err(|e| Error::protocol(&self.peer, e.to_string()))?;
            let len = hdr.len as usize;
            if len > self.max_len {
                return Err(Error::protocol(
                    &self.peer,
                    format!("message type {:#x} with {len} bytes", hdr.ty),
                ));
            }
            if self.rbuf.len() - pos - MSG_HEADER_SIZE < len {
                break;
            }
            let start = pos + MSG_HEADER_SIZE;
            out.push((hdr, self.rbuf[start..start + len].to_vec()));
            pos = start + len;
        }
        self.rbuf.drain(..pos);
        if !open && !self.rbuf.is_empty() {
            return Err(Error::protocol(
                &self.peer,
                "closed in the middle of a message",
            ));
        }
        Ok(open)
    }
}

impl AsFd for Control {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ch.as_fd()
    }
}

/// Wakes a poll loop from another thread: a socket pair whose read end is
/// polled.
#[derive(Debug)]
pub struct Waker {
    rx: UnixStream,
    tx: UnixStream,
}

impl Waker {
    /// A new waker.
    pub fn new() -> Result<Waker> {
        let (rx, tx) = UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
        rx.set_nonblocking(true)
            .and_then(|()| tx.set_nonblocking(true))
            .map_err(|e| Error::io("set_nonblocking", e))?;
        Ok(Waker { rx, tx })
    }

    /// A handle other threads can wake the loop with.
    pub fn handle(&self) -> Result<WakeHandle> {
        Ok(WakeHandle(
            self.tx.try_clone().map_err(|e| Error::io("dup", e))?,
        ))
    }

    /// Consume pending wake-ups.
    pub fn drain(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.rx).read(&mut b), Ok(n) if n > 0) {}
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

/// The sending half of a [`Waker`].
#[derive(Debug)]
pub struct WakeHandle(UnixStream);

impl WakeHandle {
    /// Wake the loop (a full socket already means a wake-up is pending).
    pub fn wake(&self) {
        let _ = (&self.0).write(&[1]);
    }
}

/// Whether a vchan error only says "non-blocking and nothing to do now".
pub fn would_block(e: &vchan::Error) -> bool {
    matches!(
        e,
        vchan::Error::WouldBlock | vchan::Error::Ring(vchan::ring::RingError::WouldBlock)
    )
}

/// One sleep of a control loop that serves `ctrl`, a listening socket and a
/// `waker` (the daemons and the Mirage-like agent): poll the three (20 ms
/// while control writes are pending, else 1 s), then consume the control
/// event and drain the waker if they fired. New connections on `listener`
/// are accepted by the caller's next round.
pub fn sleep_on(ctrl: &mut Control, listener: &impl AsFd, waker: &Waker) -> Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [
        PollFd::new(ctrl.as_fd(), PollFlags::POLLIN),
        PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        PollFd::new(waker.as_fd(), PollFlags::POLLIN),
    ];
    let timeout = if ctrl.has_pending_writes() {
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
    if ctrl_ev {
        ctrl.consume_event();
    }
    if wake_ev {
        waker.drain();
    }
    Ok(())
}
