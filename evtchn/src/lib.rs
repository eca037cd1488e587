//! Xen event channels from user space, plus a same-host double in which
//! separate processes play separate domains.
//!
//! An event channel is the doorbell of Xen inter-domain communication: two
//! ports, one in each domain, bound to each other; a *notify* on one side
//! makes the other side's port pending and wakes whoever waits on it. vchan
//! uses one channel per connection to tell the peer "I have written data" or
//! "I have made room".
//!
//! This crate offers one small interface, [`Backend`] (a way to make
//! channels) and [`EventChannel`] (one bound port behind one pollable fd),
//! with two implementations:
//!
//! * [`Xen`], the real thing: each channel opens its own handle on
//!   `/dev/xen/evtchn` (as libxenvchan does), binds one port with the
//!   device's ioctls, waits by reading the 4-byte port number and re-arms
//!   the port by writing it back, and unbinds on drop. A channel that
//!   sleeps for long also binds a loopback pair of ports on its handle, so
//!   that a process-wide alarm can end a blocking read at its timeout
//!   (docs/vchan.md §6.1): a timed wait then costs libxenvchan's two system
//!   calls, not a `poll` more.
//! * [`local::Local`], a double for any Linux host. A [`local::Hub`] (a
//!   thread in some process, for example a test or a launcher) plays the
//!   hypervisor and keeps the state of every port of every domain; clients
//!   connect to it over the unix socket `<dir>/evtchn.sock`, one connection
//!   per bound port, and say which domain they are. The connection's socket
//!   is the channel's fd, so `poll`/`epoll` work on it as on the device.
//!
//! # Semantics that both backends share
//!
//! These are the device's (docs/vchan.md §6, verified on real Xen by the
//! lab, docs/vchan.md §16 rows 3–5); the double reproduces them on
//! purpose, so code that works on the double does not rely on anything the
//! real device does not promise:
//!
//! * A bound port starts enabled. An event masks it and queues one event on
//!   the fd (`POLLIN`). [`EventChannel::wait`] and
//!   [`EventChannel::consume_pending`] take it and re-arm (unmask) the port.
//!   Notifications that arrive while the port is masked leave one pending
//!   event, delivered after the re-arm. So N notifications give 1 or 2
//!   wake-ups, never N, and none is lost: consumers must never count
//!   events, only re-check their state after each wake-up.
//! * [`Backend::bind_interdomain`] leaves the binder's own new port pending:
//!   the binder is woken once right after the bind. The unbound side gets
//!   nothing from the bind.
//! * A peer that closes its end (or dies) shows **nothing** on our fd. Our
//!   port becomes unbound towards the peer's domain, and any process of that
//!   domain may bind to it again; another domain gets `EINVAL`.
//! * [`EventChannel::notify`] succeeds whether or not the peer is still
//!   there.
//!
//! # How the double differs from the real device
//!
//! * State is visible: [`EventChannel::status`] tells a local channel's
//!   port state, and [`local::Hub::port_info`] shows the pending and masked
//!   bits (Xen needs `EVTCHNOP_status` through privcmd, which a restricted
//!   domU cannot issue, so [`Xen`] answers `Ok(None)`).
//! * Timing: a re-armed port with a pending event is delivered again as
//!   soon as the hub reads the re-arm, not after Xen's short delay
//!   (docs/vchan.md §6); and
//!   notifications that reach the hub while an event is queued always leave
//!   one more wake-up (Xen sometimes merges them into the first). Both stay
//!   within "1 or 2 wake-ups".
//! * Notify and re-arm are messages to the hub, handled asynchronously:
//!   [`EventChannel::notify`] returns before the peer's port is pending
//!   (the ioctl returns after). Ordering between different connections is
//!   not defined.
//! * Domain ids are whatever the processes claim: every id exists until
//!   [`local::Hub::destroy_domain`] destroys it (then binds naming it get
//!   `ESRCH`, as on Xen, and [`Backend::probe_domain`] says
//!   [`DomainProbe::NoSuchDomain`]). A destroyed domain is released at once
//!   (Xen keeps it as a zombie while others map its grants) and its id is
//!   never reused. There is no `DOMID_SELF`, and reserved domain ids
//!   (`>= 0x7FF0`) get `EINVAL`.
//! * Port status is known to every domain (like dom0), unless the hub was
//!   told to treat a domain as a restricted domU
//!   ([`local::Hub::refuse_status`]): then its [`EventChannel::status`]
//!   answers `Ok(None)`, as the [`Xen`] backend's does there.
//! * Ports are numbered per domain from 1, lowest free first, at most 4095
//!   per domain (`ENOSPC` after). Xen allocates the same way, but in a real
//!   domain the kernel already owns the low ports.
//! * A new port needs no initial re-arm (the [`Xen`] backend writes the
//!   port once after the bind, as libxenvchan does; the double's ports start
//!   enabled in the hub).
//! * When the hub stops, every channel's fd shows `POLLIN|POLLHUP` and
//!   `wait` fails with [`Error::HubClosed`]. The real device has no such
//!   state. An unreachable hub at bind time is [`Error::Hub`].
//! * There are no VIRQs, no `IOCTL_EVTCHN_RESET`/`RESTRICT_DOMID`, and no
//!   per-fd ring overflow (`EFBIG`).
//! * A port kept by [`local::Hub::hold`] after its owner died still
//!   records events sent to it as pending, but nobody can consume them (as
//!   with the kernel, where the fd is gone).
//!
//! # Example
//!
//! ```no_run
//! use evtchn::{Backend, EventChannel, local::{Hub, Local}};
//!
//! let dir = std::env::temp_dir().join("evtchn-doc");
//! std::fs::create_dir_all(&dir)?;
//! let hub = Hub::start(&dir)?;
//! // Usually the two sides live in two processes.
//! let server = Local::new(&dir, 1).bind_unbound(2)?;
//! let client = Local::new(&dir, 2).bind_interdomain(1, server.local_port())?;
//! client.wait()?; // the bind wakes the binder once
//! client.notify()?;
//! server.wait()?;
//! hub.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;

mod alarm;
pub mod local;
mod sys;
mod xen;

pub use xen::{DEVICE_PATH, Xen, XenChannel};

/// How many sleeps of this process the alarm of the [`Xen`] backend has
/// ended: waits with a timeout that passed without an event, each ended by
/// a notify on the channel's loopback ports (docs/vchan.md §6.1). A
/// diagnostic: the lab checks with it that real Xen binds the loopback
/// pair (a channel that cannot falls back to `poll` and never counts).
///
/// ```
/// // Nothing has slept in this process.
/// assert_eq!(evtchn::alarm_kicks(), 0);
/// ```
pub fn alarm_kicks() -> u64 {
    alarm::kicks_fired()
}

pub use xen_base::DomId;

/// An event channel port number, local to one domain.
pub type Port = u32;

/// Everything that can go wrong with an event channel.
///
/// Each variant names the operation (the ioctl's C name for the device, or a
/// short description for the local double) and carries the OS error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The event channel device could not be opened.
    #[error(
        "cannot open {path}: {source} (no Xen here? the local backend works on any Linux host)"
    )]
    Open {
        /// The device path.
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Binding a port failed (the device's ioctl or the hub refused it).
    /// `EINVAL` means the remote port is not unbound towards our domain, is
    /// closed, or was never allocated.
    #[error("{op} (remote domain {remote}{}) failed: {source}", fmt_remote_port(*remote_port))]
    Bind {
        /// `IOCTL_EVTCHN_BIND_UNBOUND_PORT` or `IOCTL_EVTCHN_BIND_INTERDOMAIN`.
        op: &'static str,
        /// The remote domain asked for.
        remote: DomId,
        /// The remote port asked for (interdomain binds only).
        remote_port: Option<Port>,
        /// The error number.
        #[source]
        source: Errno,
    },
    /// An ioctl other than a bind failed.
    #[error("{op} on port {port} failed: {source}")]
    Ioctl {
        /// The ioctl's C name.
        op: &'static str,
        /// The local port.
        port: Port,
        /// The error number.
        #[source]
        source: Errno,
    },
    /// Reading, writing or polling a channel's fd failed.
    #[error("{op} on port {port} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The local port.
        port: Port,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Talking to the local hub failed (connect, start, send, receive).
    #[error("{op} ({path}) failed: {source}")]
    Hub {
        /// What was being done, for example `"connect hub"`.
        op: &'static str,
        /// The hub's socket path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The local hub closed the connection (it was shut down).
    #[error("{op} on port {port}: the event channel hub has gone away")]
    HubClosed {
        /// What was being done.
        op: &'static str,
        /// The local port.
        port: Port,
    },
    /// The other side of a channel (device or hub) sent something that does
    /// not follow the protocol.
    #[error("{op}: protocol violation: {detail}")]
    Protocol {
        /// What was being done.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// [`local::Hub::hold`] on a port that is not bound.
    #[error("hold port {port} of domain {dom}: the port is not bound")]
    NotBound {
        /// The domain.
        dom: DomId,
        /// The port.
        port: Port,
    },
}

fn fmt_remote_port(p: Option<Port>) -> String {
    p.map(|p| format!(", remote port {p}")).unwrap_or_default()
}

impl Error {
    /// The OS error number behind this error, if there is one.
    ///
    /// ```
    /// let e = evtchn::Error::NotBound { dom: 1, port: 7 };
    /// assert_eq!(e.errno(), Some(nix::errno::Errno::EINVAL));
    /// ```
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Open { source, .. } | Error::Io { source, .. } | Error::Hub { source, .. } => {
                source.raw_os_error().map(Errno::from_raw)
            }
            Error::Bind { source, .. } | Error::Ioctl { source, .. } => Some(*source),
            Error::NotBound { .. } => Some(Errno::EINVAL),
            Error::HubClosed { .. } => Some(Errno::ECONNRESET),
            Error::Protocol { .. } => Some(Errno::EPROTO),
        }
    }

    /// The [`io::ErrorKind`] that best describes this error.
    ///
    /// ```
    /// let e = evtchn::Error::NotBound { dom: 1, port: 7 };
    /// assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    /// ```
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Open { source, .. } | Error::Io { source, .. } | Error::Hub { source, .. } => {
                source.kind()
            }
            Error::Bind { source, .. } | Error::Ioctl { source, .. } => {
                io::Error::from(*source).kind()
            }
            Error::NotBound { .. } => io::ErrorKind::InvalidInput,
            Error::HubClosed { .. } => io::ErrorKind::ConnectionReset,
            Error::Protocol { .. } => io::ErrorKind::InvalidData,
        }
    }
}

impl From<Error> for io::Error {
    /// Keeps the kind and the whole message (with its context).
    fn from(e: Error) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// The state of a port, as `EVTCHNOP_status` would tell it (only the states
/// this crate can create).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortStatus {
    /// Not bound (never allocated, or closed).
    Closed,
    /// Allocated and waiting for domain `remote` to bind to it.
    Unbound {
        /// The only domain allowed to bind to this port.
        remote: DomId,
    },
    /// Connected to `remote_port` of domain `remote`.
    Interdomain {
        /// The peer domain.
        remote: DomId,
        /// The peer's port.
        remote_port: Port,
    },
}

/// What [`Backend::probe_domain`] learned about a domain id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainProbe {
    /// The hypervisor knows a domain with this id: running, paused, or dead
    /// but not yet released. A destroyed domain lingers (as a nameless
    /// "zombie" in `xl list`) while another domain still maps pages it
    /// granted, so "exists" is not "alive".
    Exists,
    /// The hypervisor knows no domain with this id (`ESRCH`): it was never
    /// created, or it was destroyed and released. This is definite for the
    /// moment of the call; the id may be reused by a new domain later.
    NoSuchDomain,
}

/// One bound port behind one fd.
///
/// The fd ([`AsFd`]) is readable (`POLLIN`) exactly when an event is queued;
/// register it with `poll`/`epoll` and call [`consume_pending`] on
/// readiness. Dropping the channel unbinds the port; the peer sees nothing
/// but its port turns unbound.
///
/// [`consume_pending`]: EventChannel::consume_pending
pub trait EventChannel: AsFd + std::fmt::Debug + Send + Sync {
    /// The local port number.
    fn local_port(&self) -> Port;

    /// Fires the event at the peer (like `IOCTL_EVTCHN_NOTIFY`). Succeeds
    /// silently when there is no peer (unbound port, peer gone).
    fn notify(&self) -> Result<(), Error>;

    /// Blocks until an event is pending, consumes it and re-arms the port.
    /// Interrupted system calls are retried.
    fn wait(&self) -> Result<(), Error>;

    /// Like [`wait`](EventChannel::wait), but gives up after `timeout`:
    /// `Ok(true)` if an event was consumed, `Ok(false)` on timeout.
    fn wait_timeout(&self, timeout: Duration) -> Result<bool, Error>;

    /// Does not block: consumes a queued event and re-arms the port.
    /// Returns whether there was one.
    fn consume_pending(&self) -> Result<bool, Error>;

    /// The local port's state, if this backend can tell (the local double
    /// can; the real device answers `Ok(None)`, since that needs
    /// `EVTCHNOP_status` through privcmd).
    fn status(&self) -> Result<Option<PortStatus>, Error>;
}

/// A way to make event channels (one per backend).
pub trait Backend: std::fmt::Debug + Send + Sync {
    /// Allocates a new port that domain `remote` may bind to
    /// (`IOCTL_EVTCHN_BIND_UNBOUND_PORT`). The port gets no event from the
    /// peer's bind.
    fn bind_unbound(&self, remote: DomId) -> Result<Box<dyn EventChannel>, Error>;

    /// Binds a new local port to `remote_port` of domain `remote`, which must
    /// be unbound towards our domain (`IOCTL_EVTCHN_BIND_INTERDOMAIN`);
    /// `EINVAL` otherwise. The new port starts with one event pending.
    /// `ESRCH` when no domain `remote` exists.
    fn bind_interdomain(
        &self,
        remote: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, Error>;

    /// Asks the hypervisor whether a domain with id `dom` exists, with
    /// nothing but the event channel device, so that it works in an
    /// unprivileged domU (where `EVTCHNOP_status` through privcmd and
    /// xenstore's view of other domains are refused).
    ///
    /// It asks for an interdomain bind to port 0 of `dom`. Xen looks the
    /// remote domain up first (none: `ESRCH`, [`DomainProbe::NoSuchDomain`])
    /// and port 0 is never unbound, so an existing domain gives `EINVAL`
    /// ([`DomainProbe::Exists`]). Nothing is ever bound; should a port come
    /// back anyway, it is unbound at once and the answer is an error. Any
    /// other failure is an error too ("unknown"), never an answer.
    ///
    /// Soundness: `NoSuchDomain` is definite, `Exists` is not "alive" (see
    /// [`DomainProbe::Exists`]: a destroyed domain whose grants someone
    /// still maps exists until they are unmapped). The local double answers
    /// `NoSuchDomain` for domains destroyed with
    /// [`local::Hub::destroy_domain`] and `Exists` for any other id.
    ///
    /// ```no_run
    /// use evtchn::{Backend, DomainProbe, Xen};
    /// match Xen.probe_domain(5)? {
    ///     DomainProbe::NoSuchDomain => println!("domain 5 is gone"),
    ///     DomainProbe::Exists => println!("domain 5 exists (alive or dying)"),
    /// }
    /// # Ok::<(), evtchn::Error>(())
    /// ```
    fn probe_domain(&self, dom: DomId) -> Result<DomainProbe, Error> {
        match self.bind_interdomain(dom, 0) {
            Err(Error::Bind {
                source: Errno::ESRCH,
                ..
            }) => Ok(DomainProbe::NoSuchDomain),
            Err(Error::Bind {
                source: Errno::EINVAL,
                ..
            }) => Ok(DomainProbe::Exists),
            Err(e) => Err(e),
            Ok(ch) => {
                let port = ch.local_port();
                drop(ch); // unbinds
                Err(Error::Protocol {
                    op: "probe_domain",
                    detail: format!(
                        "a bind to port 0 of domain {dom} succeeded (local port {port}, unbound again)"
                    ),
                })
            }
        }
    }
}

/// Waits until `fd` is readable or `deadline` passes (`None`: forever).
/// Returns `Ok(false)` on timeout.
fn poll_readable(fd: BorrowedFd<'_>, deadline: Option<Instant>) -> Result<bool, Errno> {
    xen_base::poll_until(fd, PollFlags::POLLIN, deadline)
}

/// The shared body of `wait`/`wait_timeout`: poll (at most `timeout`;
/// `None`: forever), then consume; another thread may have taken the event
/// between the two, or a signal may interrupt the poll, so loop with what
/// is left of the timeout. `consume` is told whether the poll found the fd
/// readable (`false`: the last look after a timeout), so a consumer that
/// must not read a blocking fd blindly need not poll again.
///
/// No read before the poll: a pending event makes the poll return at once,
/// and when there is none (the usual case: the caller has just found its
/// ring empty and asked for an event) that read is a wasted `EAGAIN`. And
/// no `Instant::now()`: see [`xen_base::coarse_now`]. A wait is on the path of every
/// blocking vchan call that sleeps, so each system call here counts (the
/// lab's throughput phase with `LAB_TPUT_COUNT=1`: libxenvchan does a
/// blocking `read` and the unmask `write`, two calls per wait).
fn wait_with(
    fd: BorrowedFd<'_>,
    port: Port,
    timeout: Option<Duration>,
    mut consume: impl FnMut(bool) -> Result<bool, Error>,
) -> Result<bool, Error> {
    let start = timeout.map(|_| xen_base::coarse_now());
    let mut left = timeout;
    loop {
        let mut fds = [nix::poll::PollFd::new(fd, PollFlags::POLLIN)];
        let wait = left.map_or(nix::poll::PollTimeout::NONE, xen_base::poll_timeout);
        match nix::poll::poll(&mut fds, wait) {
            // Timed out: one last look, so that an event that raced the
            // timeout counts.
            Ok(0) => return consume(false),
            // Readable, or hung up / error: the read tells which.
            Ok(_) => {
                if consume(true)? {
                    return Ok(true);
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                return Err(Error::Io {
                    op: "poll",
                    port,
                    source: e.into(),
                });
            }
        }
        if let (Some(t), Some(s)) = (timeout, start) {
            let l = t.saturating_sub(xen_base::coarse_now().saturating_sub(s));
            if l.is_zero() {
                return consume(false);
            }
            left = Some(l);
        }
    }
}
