//! The same-host double: processes play domains, a [`Hub`] plays Xen.
//!
//! A [`Hub`] (started by a test or a launcher) listens on
//! `<dir>/evtchn.sock` and keeps every port's state: owner domain, unbound
//! or interdomain, pending and masked bits, holds. A [`Local`] backend in
//! any process connects once per bound port (`SOCK_SEQPACKET`), says which
//! domain it is and what to bind; the connection's socket is the channel's
//! fd. Afterwards the client sends *notify* and *unmask* packets and the hub
//! sends one *event* packet (the 4-byte port) each time it masks the port,
//! so the socket is readable exactly when the device's fd would be. A
//! closed connection (including a killed process) closes the port, and the
//! peer's port turns unbound, just as on Xen. See the crate documentation
//! for what differs from the real device.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, send, socket,
};

use crate::{Backend, DomId, Error, EventChannel, Port, PortStatus};

mod hub;
mod wire;

pub use hub::{HeldPort, Hub, PortInfo, SOCKET_NAME};

use wire::Connect;

/// How long a bind waits for the wake-up that the hub sends right after the
/// reply. Only a broken hub takes more than microseconds.
const BIND_EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The local backend: one process's view as domain `domid`, reaching the
/// [`Hub`] through the rendezvous directory `dir`.
///
/// ```no_run
/// use evtchn::{Backend, EventChannel, local::Local};
/// let dom1 = Local::new("/tmp/rendezvous", 1);
/// let ch = dom1.bind_unbound(2)?;
/// println!("tell domain 2 to bind to port {}", ch.local_port());
/// ch.wait()?;
/// # Ok::<(), evtchn::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Local {
    dir: PathBuf,
    domid: DomId,
}

impl Local {
    /// A backend that plays domain `domid`, using the hub whose socket is
    /// in `dir`. Nothing is opened until a bind.
    pub fn new(dir: impl Into<PathBuf>, domid: DomId) -> Local {
        Local {
            dir: dir.into(),
            domid,
        }
    }

    /// The domain this backend plays.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The rendezvous directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn bind(
        &self,
        op: &'static str,
        req: Connect,
        remote: DomId,
        remote_port: Option<Port>,
    ) -> Result<Box<dyn EventChannel>, Error> {
        let path = self.dir.join(SOCKET_NAME);
        let fd = hub_request(&path, &req)?;
        let mut buf = [0u8; wire::RECV_BUF];
        let n = recv_retry(&fd, &mut buf, MsgFlags::empty()).map_err(|e| Error::Hub {
            op: "receive bind reply",
            path: path.clone(),
            source: e.into(),
        })?;
        let Some([errno, port, event_follows]) = wire::words::<3>(&buf[..n]) else {
            return Err(if n == 0 {
                Error::Hub {
                    op: "receive bind reply",
                    path,
                    source: Errno::ECONNRESET.into(),
                }
            } else {
                Error::Protocol {
                    op,
                    detail: format!("bind reply of {n} bytes, expected {}", wire::BIND_REPLY_LEN),
                }
            });
        };
        if errno != 0 {
            return Err(Error::Bind {
                op,
                remote,
                remote_port,
                source: Errno::from_raw(i32::try_from(errno).unwrap_or(libc::EPROTO)),
            });
        }
        if port == 0 || port > hub::MAX_PORT {
            return Err(Error::Protocol {
                op,
                detail: format!("hub gave port {port}"),
            });
        }
        if event_follows > 1 {
            return Err(Error::Protocol {
                op,
                detail: format!("bind reply with event flag {event_follows}"),
            });
        }
        let ch = LocalChannel {
            fd,
            port,
            domid: self.domid,
            path,
        };
        if event_follows == 1 {
            // The hub sends the binder's wake-up right after the reply;
            // wait for it so that the fd is readable when bind returns, as
            // the device's is. The deadline only guards against a broken hub.
            let deadline = Instant::now() + BIND_EVENT_TIMEOUT;
            let ready = crate::poll_readable(ch.fd.as_fd(), Some(deadline))
                .map_err(|e| ch.io_err("wait for the bind event", e))?;
            if !ready {
                return Err(Error::Protocol {
                    op,
                    detail: "the hub did not deliver the bind's wake-up".into(),
                });
            }
        }
        Ok(Box::new(ch))
    }
}

impl Backend for Local {
    fn bind_unbound(&self, remote: DomId) -> Result<Box<dyn EventChannel>, Error> {
        let req = Connect::BindUnbound {
            dom: self.domid,
            remote,
        };
        self.bind("IOCTL_EVTCHN_BIND_UNBOUND_PORT", req, remote, None)
    }

    fn bind_interdomain(
        &self,
        remote: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, Error> {
        let req = Connect::BindInterdomain {
            dom: self.domid,
            remote,
            remote_port,
        };
        self.bind(
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
            req,
            remote,
            Some(remote_port),
        )
    }
}

fn recv_retry(fd: &OwnedFd, buf: &mut [u8], flags: MsgFlags) -> Result<usize, Errno> {
    loop {
        match recv(fd.as_raw_fd(), buf, flags) {
            Err(Errno::EINTR) => {}
            r => return r,
        }
    }
}

/// Connects to the hub and sends the connect packet.
fn hub_request(path: &Path, req: &Connect) -> Result<OwnedFd, Error> {
    let err = |op, e: Errno| Error::Hub {
        op,
        path: path.to_owned(),
        source: e.into(),
    };
    let addr = UnixAddr::new(path).map_err(|e| err("connect hub", e))?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err("connect hub: socket", e))?;
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(err("connect hub", e)),
        }
    }
    let pkt = req.encode();
    match send(fd.as_raw_fd(), &pkt, MsgFlags::MSG_NOSIGNAL) {
        Ok(n) if n == pkt.len() => Ok(fd),
        Ok(_) => Err(err("send to hub", Errno::EMSGSIZE)),
        Err(e) => Err(err("send to hub", e)),
    }
}

/// A port bound through the hub. Its fd is the connection to the hub.
#[derive(Debug)]
pub struct LocalChannel {
    fd: OwnedFd,
    port: Port,
    domid: DomId,
    path: PathBuf,
}

impl LocalChannel {
    fn io_err(&self, op: &'static str, e: Errno) -> Error {
        Error::Io {
            op,
            port: self.port,
            source: e.into(),
        }
    }

    fn send_msg(&self, op: &'static str, msg: u32) -> Result<(), Error> {
        let pkt = wire::encode_msg(msg, self.port);
        loop {
            match send(self.fd.as_raw_fd(), &pkt, MsgFlags::MSG_NOSIGNAL) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(Errno::EPIPE | Errno::ECONNRESET) => {
                    return Err(Error::HubClosed {
                        op,
                        port: self.port,
                    });
                }
                Err(e) => return Err(self.io_err(op, e)),
            }
        }
    }
}

impl AsFd for LocalChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl EventChannel for LocalChannel {
    fn local_port(&self) -> Port {
        self.port
    }

    fn notify(&self) -> Result<(), Error> {
        self.send_msg("notify", wire::MSG_NOTIFY)
    }

    fn wait(&self) -> Result<(), Error> {
        crate::wait_with(self.fd.as_fd(), self.port, None, |_| self.consume_pending()).map(drop)
    }

    fn wait_timeout(&self, timeout: Duration) -> Result<bool, Error> {
        crate::wait_with(self.fd.as_fd(), self.port, Some(timeout), |_| {
            self.consume_pending()
        })
    }

    fn consume_pending(&self) -> Result<bool, Error> {
        let mut buf = [0u8; wire::RECV_BUF];
        let n = match recv_retry(&self.fd, &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => {
                return Err(Error::HubClosed {
                    op: "wait",
                    port: self.port,
                });
            }
            Ok(n) => n,
            Err(Errno::EAGAIN) => return Ok(false),
            Err(Errno::ECONNRESET) => {
                return Err(Error::HubClosed {
                    op: "wait",
                    port: self.port,
                });
            }
            Err(e) => return Err(self.io_err("wait: receive", e)),
        };
        match wire::words::<1>(&buf[..n]) {
            Some([p]) if p == self.port => {}
            _ => {
                return Err(Error::Protocol {
                    op: "wait",
                    detail: format!(
                        "event packet of {n} bytes (expected {}) on port {}",
                        wire::EVENT_LEN,
                        self.port
                    ),
                });
            }
        }
        self.send_msg("re-arm", wire::MSG_UNMASK)?;
        Ok(true)
    }

    fn status(&self) -> Result<Option<PortStatus>, Error> {
        let req = Connect::Status {
            dom: self.domid,
            port: self.port,
        };
        let fd = hub_request(&self.path, &req)?;
        let mut buf = [0u8; wire::RECV_BUF];
        let n = recv_retry(&fd, &mut buf, MsgFlags::empty()).map_err(|e| Error::Hub {
            op: "receive status reply",
            path: self.path.clone(),
            source: e.into(),
        })?;
        match wire::decode_status_reply(&buf[..n]) {
            Some(Ok(st)) => Ok(Some(st)),
            // A domain the hub treats as a restricted domU: unknown.
            Some(Err(errno)) if errno == Errno::EPERM as u32 => Ok(None),
            Some(Err(errno)) => Err(Error::Hub {
                op: "status",
                path: self.path.clone(),
                source: Errno::from_raw(i32::try_from(errno).unwrap_or(libc::EPROTO)).into(),
            }),
            None if n == 0 => Err(Error::Hub {
                op: "receive status reply",
                path: self.path.clone(),
                source: Errno::ECONNRESET.into(),
            }),
            None => Err(Error::Protocol {
                op: "status",
                detail: format!("status reply of {n} bytes"),
            }),
        }
    }
}
