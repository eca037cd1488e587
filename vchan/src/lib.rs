// Why this file is long (~1200 lines): about 760 are doc comments (every
// method of `Vchan` has a runnable example over the Local transport); the
// code, about 460 lines, is the one facade over the transports.
//! A pure-Rust Xen vchan, byte-compatible with libxenvchan: control page,
//! rings, server/client rendezvous over the Xen, Local and Socket transports.
//!
//! One [`Vchan`] type whatever the transport:
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::time::Duration;
//! use vchan::{Transport, Vchan};
//!
//! let t = Transport::from_env()?;
//! // Server in this domain for a client in domain 5, port 4242, 64 KiB each way.
//! let mut srv = Vchan::server(&t, 5, 4242, 65536, 65536)?;
//! srv.wait_connected(Some(Duration::from_secs(30)))?;
//! srv.write_all(b"hello")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # When the peer *domain* dies
//!
//! A destroyed domain sends no event and leaves the live byte alone
//! (docs/vchan.md §16 row D), so every idle blocking wait (connect, read, write) asks at
//! most once a second whether the peer domain is gone, with what the
//! platform allows, and ends with an error (`ConnectionAborted`, or
//! [`Error::PeerGone`] while connecting) when it is:
//!
//! | check | dom0 | domU (privcmd restricted, docs/vchan.md §7) | Local transport |
//! |---|---|---|---|
//! | our port turned unbound after being connected (`EVTCHNOP_status` through privcmd) | works | `EPERM`: "unknown", never "alive" | works (the hub), unless [`LocalXenConfig::restricted`] |
//! | event-channel probe: Xen knows no domain with the peer's id ([`evtchn::Backend::probe_domain`], `ESRCH`) | works once the dead domain is released | the same: works under oxenstored and C xenstored | works ([`LocalXen::remove_domain`]) |
//! | `/local/domain/<peer>` missing in xenstore | works | works with oxenstored (`ENOENT`); C xenstored answers `EACCES`, which tells nothing | works, unless [`LocalXenConfig::c_xenstored`] |
//!
//! "Released": Xen keeps a destroyed domain as a zombie while any other
//! domain still maps pages it granted, and the probe finds it until then.
//! A vchan *client* maps its server's pages, so a client whose server's
//! domain died keeps that domain alive by itself: in a domU under C
//! xenstored, where nothing else tells, such a client does not notice
//! (and, while it lives, neither does anyone else in any domain through
//! the probe). Servers, waiting clients, and everything in dom0 or under
//! oxenstored do. The Local transport releases at once (no zombie).
//!
//! The lab's `destroy` phase checks this on real Xen: our survivors end
//! everywhere except that client, and C libxenvchan survivors never end
//! (how long each took is in lab/README.md). Where nothing can tell, bound
//! the wait yourself:
//! connects take a timeout, I/O takes [`Vchan::set_io_timeout`].

#[cfg(feature = "tokio")]
mod async_io;
pub mod compat;
pub mod control;
pub mod endpoint;
mod error;
mod local_xen;
pub mod mem;
mod ready;
pub mod ring;
mod shm;
mod socket;
pub mod spin;
pub mod stderr_log;
mod transport;

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use endpoint::Events as _;
use std::time::Duration;

#[cfg(feature = "tokio")]
pub use async_io::AsyncVchan;
pub use compat::{Compat, PortName};
pub use error::{Error, Result};
pub use local_xen::{LocalXen, LocalXenConfig};
pub use ready::{Interest, Readiness, Watch};
pub use shm::local_xenstore_socket;
pub use socket::socket_path;
pub use transport::{
    DEFAULT_SOCKET_DIR, DomId, ENV_DOMAIN, ENV_LOCAL_DIR, ENV_SOCKET_DIR, ENV_TRANSPORT, Transport,
    parse_domid,
};

/// The largest ring size per direction (order 20).
pub use control::MAX_RING_SIZE;

/// Where a vchan stands, as seen from this end.
///
/// ```
/// # use std::io::{Read, Write};
/// # use std::time::Duration;
/// # use vchan::{LocalXen, State, Vchan};
/// # let dir = tempfile::tempdir()?;
/// # // A same-host Xen double; this process plays domains 1 and 2.
/// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
/// # let (t1, t2) = (xen.transport(1), xen.transport(2));
/// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
/// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
/// # srv.wait_connected(Some(Duration::from_secs(10)))?;
/// assert_eq!(srv.state(), State::Connected);
/// drop(cli);
/// assert_eq!(srv.state(), State::Closed);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Server: no client has connected yet.
    Waiting,
    /// Both ends are there.
    Connected,
    /// The peer has closed (data already in our read ring can still be read).
    Closed,
}

#[derive(Debug)]
enum Inner {
    Shm(Box<shm::ShmChan>),
    Socket(socket::SocketChan),
}

/// A vchan endpoint, server or client, on any [`Transport`].
///
/// Stream I/O through [`std::io::Read`] / [`std::io::Write`] (partial),
/// packet I/O through [`Vchan::send`] / [`Vchan::recv`] (all or nothing),
/// an fd for `poll`/`epoll` through [`AsFd`].
///
/// ```
/// # use std::io::{Read, Write};
/// # use std::time::Duration;
/// # use vchan::{LocalXen, State, Vchan};
/// # let dir = tempfile::tempdir()?;
/// # // A same-host Xen double; this process plays domains 1 and 2.
/// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
/// # let (t1, t2) = (xen.transport(1), xen.transport(2));
/// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
/// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
/// # srv.wait_connected(Some(Duration::from_secs(10)))?;
/// cli.write_all(b"ping")?;
/// let mut b = [0u8; 4];
/// srv.read_exact(&mut b)?;
/// assert_eq!(&b, b"ping");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Vchan {
    inner: Inner,
    blocking: bool,
}

impl Vchan {
    /// Creates a server for a client in domain `peer` on `port` and returns
    /// at once, in [`State::Waiting`]. `read_min` / `write_min` are the
    /// minimum ring sizes this end reads from / writes to (≤ 1 MiB each;
    /// rounded up as libxenvchan does).
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// // Domain 1 serves domain 2 on port 5000, 64 KiB each way.
    /// let mut srv = Vchan::server(&t1, 2, 5000, 65536, 65536)?;
    /// assert_eq!(srv.state(), State::Waiting);
    /// assert_eq!(srv.read_ring_size(), 65536);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn server(
        transport: &Transport,
        peer: DomId,
        port: u32,
        read_min: usize,
        write_min: usize,
    ) -> Result<Vchan> {
        if read_min > MAX_RING_SIZE || write_min > MAX_RING_SIZE {
            return Err(Error::config(format!(
                "ring sizes {read_min}/{write_min}: the maximum is {MAX_RING_SIZE} bytes per direction"
            )));
        }
        let inner = match transport {
            Transport::Socket { dir, domid } => {
                if *domid == peer {
                    return Err(Error::Loopback { domid: peer });
                }
                let r = read_min.next_power_of_two().max(1024);
                let w = write_min.next_power_of_two().max(1024);
                Inner::Socket(socket::SocketChan::server(dir, *domid, peer, port, r, w)?)
            }
            Transport::Xen | Transport::Local { .. } => Inner::Shm(Box::new(shm::ShmChan::server(
                transport, peer, port, read_min, write_min,
            )?)),
        };
        Ok(Vchan {
            inner,
            blocking: true,
        })
    }

    /// Connects to a server in domain `peer` on `port`, waiting at most
    /// `timeout` for it to appear.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// // Domain 2 connects to domain 1's server on port 4242.
    /// let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// assert_eq!(cli.state(), State::Connected);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn client(
        transport: &Transport,
        peer: DomId,
        port: u32,
        timeout: Duration,
    ) -> Result<Vchan> {
        let inner = match transport {
            Transport::Socket { dir, domid } => Inner::Socket(socket::SocketChan::client(
                dir, *domid, peer, port, timeout,
            )?),
            Transport::Xen | Transport::Local { .. } => Inner::Shm(Box::new(shm::ShmChan::client(
                transport, peer, port, timeout,
            )?)),
        };
        Ok(Vchan {
            inner,
            blocking: true,
        })
    }

    /// Starts a client connect that [`Connecting::poll`] finishes without
    /// blocking (for `poll`/epoll loops and async runtimes).
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// let mut c = Vchan::client_start(&t2, 1, 4242)?;
    /// let mut cli = loop {
    ///     if let Some(v) = c.poll()? {
    ///         break v;
    ///     }
    ///     std::thread::sleep(Duration::from_millis(1)); // or poll(2) on c.as_fd()
    /// };
    /// assert!(cli.is_open());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn client_start(transport: &Transport, peer: DomId, port: u32) -> Result<Connecting> {
        let inner = match transport {
            Transport::Socket { dir, domid } => {
                if *domid == peer {
                    return Err(Error::Loopback { domid: peer });
                }
                let idle = nix::sys::eventfd::EventFd::new()
                    .map_err(|e| Error::io("eventfd", e.into()))?;
                ConnInner::Socket {
                    dir: dir.clone(),
                    own: *domid,
                    peer,
                    port,
                    idle,
                }
            }
            Transport::Xen | Transport::Local { .. } => {
                ConnInner::Shm(Box::new(shm::ShmConnecting::start(transport, peer, port)?))
            }
        };
        Ok(Connecting { inner })
    }

    /// Server: waits until the client has connected (`None`: no limit).
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let _cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert_eq!(srv.state(), State::Connected);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_connected(&mut self, timeout: Option<Duration>) -> Result<()> {
        match &mut self.inner {
            Inner::Shm(c) => c.wait_connected(timeout),
            Inner::Socket(s) => s.wait_accept(timeout),
        }
    }

    /// Server: checks without blocking whether the client has connected;
    /// drive it from `poll` on [`AsFd::as_fd`].
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// assert!(!srv.poll_connected()?);
    /// let _cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// while !srv.poll_connected()? {
    ///     std::thread::sleep(Duration::from_millis(1));
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn poll_connected(&mut self) -> Result<bool> {
        match &mut self.inner {
            Inner::Shm(c) => c.poll_connected(),
            Inner::Socket(s) => s.poll_accept(),
        }
    }

    /// The state of the channel.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert_eq!(cli.state(), State::Connected);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn state(&mut self) -> State {
        match &mut self.inner {
            Inner::Shm(c) => match c.peer_state() {
                endpoint::PeerState::Waiting => State::Waiting,
                endpoint::PeerState::Connected => State::Connected,
                endpoint::PeerState::Closed => State::Closed,
            },
            Inner::Socket(s) => {
                // A client waiting to be accepted (or one the accept helper
                // took) is taken in; an accept error shows in the next wait.
                let _ = s.poll_accept();
                if !s.is_connected() {
                    State::Waiting
                } else if s.is_open() {
                    State::Connected
                } else {
                    State::Closed
                }
            }
        }
    }

    /// Whether the peer is connected.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert!(cli.is_open());
    /// drop(srv);
    /// assert!(!cli.is_open());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_open(&mut self) -> bool {
        self.state() == State::Connected
    }

    /// Blocking (the default) or non-blocking mode for I/O.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// cli.set_blocking(false);
    /// let mut b = [0u8; 8];
    /// assert!(cli.read_some(&mut b).is_err()); // nothing there: would block
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_blocking(&mut self, blocking: bool) {
        self.blocking = blocking;
        if let Inner::Shm(c) = &mut self.inner {
            c.endpoint().set_blocking(blocking);
        }
    }

    /// Bounds every blocking wait of a shared-memory vchan (`None`: no
    /// bound, the default). A wait that runs out fails with `TimedOut`.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// cli.set_io_timeout(Some(Duration::from_millis(50)));
    /// let mut b = [0u8; 1];
    /// assert!(cli.read(&mut b).is_err()); // nothing came within 50 ms
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_io_timeout(&mut self, timeout: Option<Duration>) {
        if let Inner::Shm(c) = &mut self.inner {
            c.endpoint().set_timeout(timeout);
        }
    }

    /// Bounds the busy-wait of a blocking call before it asks the peer for
    /// an event and sleeps (zero: sleep at once). The default
    /// ([`spin::SpinPolicy::for_this_machine`]) spins only when this machine
    /// has more than one CPU. No effect on the socket transport.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// cli.set_spin(Duration::ZERO); // a peer on the same CPU: never spin
    /// srv.write_all(b"x")?;
    /// let mut b = [0u8; 1];
    /// cli.read_exact(&mut b)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_spin(&mut self, d: Duration) {
        if let Inner::Shm(c) = &mut self.inner {
            c.endpoint().set_spin(d);
        }
    }

    /// Whether I/O calls block.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert!(cli.is_blocking());
    /// cli.set_blocking(false);
    /// assert!(!cli.is_blocking());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_blocking(&self) -> bool {
        self.blocking
    }

    /// Bytes ready to read now; on shared memory it first asks the peer for
    /// an event at its next write (libxenvchan's `data_ready`), so the
    /// caller can sleep on the fd next.
    ///
    /// An error when the peer corrupted the shared indices
    /// ([`Error::Ring`]): never a silent 0, which would leave the caller
    /// waiting forever for data that cannot come (libxenvchan's hang on a
    /// corrupted ring, qubes-issues #10833).
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// srv.write_all(b"abc")?;
    /// assert_eq!(cli.data_ready()?, 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn data_ready(&mut self) -> Result<usize> {
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().data_ready().map_err(ring_err),
            Inner::Socket(s) => Ok(s.data_ready()),
        }
    }

    /// Bytes that can be written now without waiting; on shared memory it
    /// first asks the peer for an event at its next read. An error when the
    /// peer corrupted the shared indices (as [`Vchan::data_ready`]).
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert_eq!(srv.buffer_space()?, srv.write_ring_size());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn buffer_space(&mut self) -> Result<usize> {
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().buffer_space().map_err(ring_err),
            Inner::Socket(s) => Ok(s.buffer_space()),
        }
    }

    /// Bytes ready to read now, without asking the peer for an event (no
    /// write to shared memory): for the busy path of an event loop. Before
    /// sleeping on the fd, call [`Vchan::data_ready`] (it asks for the
    /// event, then looks again) and sleep only if it still says 0.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// srv.write_all(b"abc")?;
    /// assert_eq!(cli.peek_data_ready()?, 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn peek_data_ready(&mut self) -> Result<usize> {
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().peek_data_ready().map_err(ring_err),
            Inner::Socket(s) => Ok(s.data_ready()),
        }
    }

    /// Free space now, without asking the peer for an event (as
    /// [`Vchan::peek_data_ready`]; before sleeping for space, call
    /// [`Vchan::buffer_space`]).
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// srv.write_all(b"abc")?;
    /// assert_eq!(srv.peek_buffer_space()?, 4096 - 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn peek_buffer_space(&mut self) -> Result<usize> {
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().peek_buffer_space().map_err(ring_err),
            Inner::Socket(s) => Ok(s.buffer_space()),
        }
    }

    /// Busy-waits at most the endpoint's adaptive spin bound (≤ 50 µs by
    /// default, yielding the CPU between looks; none on a one-CPU machine)
    /// for `want` bytes to read, asking
    /// for no event: `true` if they came. For event loops, before they ask
    /// for an event ([`Vchan::data_ready`]) and sleep. The socket
    /// transport does not spin (`false`).
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// srv.write_all(b"x")?;
    /// assert!(cli.spin_for_data(1)?); // already there
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spin_for_data(&mut self, want: usize) -> Result<bool> {
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().spin_for_data(want).map_err(ring_err),
            Inner::Socket(_) => Ok(false),
        }
    }

    /// As [`Vchan::spin_for_data`], for `want` bytes of free space.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert!(srv.spin_for_space(1)?); // an empty ring has room
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spin_for_space(&mut self, want: usize) -> Result<bool> {
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().spin_for_space(want).map_err(ring_err),
            Inner::Socket(_) => Ok(false),
        }
    }

    /// The size of the ring we read from.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert_eq!(srv.read_ring_size(), 4096); // asked for 4096: order 12
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_ring_size(&self) -> usize {
        match &self.inner {
            Inner::Shm(c) => c.endpoint_ref().read_ring_size(),
            Inner::Socket(s) => s.read_capacity(),
        }
    }

    /// The size of the ring we write to.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert_eq!(cli.write_ring_size(), srv.read_ring_size()); // the same `left` ring
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_ring_size(&self) -> usize {
        match &self.inner {
            Inner::Shm(c) => c.endpoint_ref().write_ring_size(),
            Inner::Socket(s) => s.write_capacity(),
        }
    }

    /// Waits for an event (data, space, connect, close), then returns.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// cli.data_ready()?; // asks the server for an event on its next write
    /// srv.write_all(b"x")?;
    /// cli.wait()?;
    /// assert_eq!(cli.data_ready()?, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait(&mut self) -> Result<()> {
        self.wait_timeout(None).map(|_| ())
    }

    /// Like [`Vchan::wait`], for at most `timeout`; `Ok(false)` on timeout.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// while cli.wait_timeout(Some(Duration::from_millis(10)))? {} // take pending wake-ups
    /// assert!(!cli.wait_timeout(Some(Duration::from_millis(10)))?); // then nothing happens
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_timeout(&mut self, timeout: Option<Duration>) -> Result<bool> {
        match &mut self.inner {
            Inner::Shm(c) => {
                let ep = c.endpoint();
                match timeout {
                    None => ep.wait().map(|()| true).map_err(ring_err),
                    Some(t) => ep
                        .events()
                        .wait_timeout(t)
                        .map_err(|source| Error::io("wait for event", source)),
                }
            }
            Inner::Socket(s) => {
                if !s.is_connected() {
                    return s.wait_accept(timeout).map(|()| true).or_else(|e| match e {
                        Error::Timeout { .. } => Ok(false),
                        e => Err(e),
                    });
                }
                s.wait(timeout)
            }
        }
    }

    /// Sends all of `buf` or nothing; an error if `buf` is larger than the
    /// write ring. Blocking mode waits for space; non-blocking mode fails
    /// with [`Error::WouldBlock`].
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert_eq!(srv.send(b"packet")?, 6);
    /// assert!(srv.send(&[0u8; 8192]).is_err()); // larger than the 4 KiB ring
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send(&mut self, buf: &[u8]) -> Result<usize> {
        let b = self.blocking;
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().send(buf).map_err(ring_err),
            Inner::Socket(s) => s.send(buf, b),
        }
    }

    /// Receives exactly `buf.len()` bytes or nothing.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// srv.send(b"packet")?;
    /// let mut b = [0u8; 6];
    /// assert_eq!(cli.recv(&mut b)?, 6);
    /// assert_eq!(&b, b"packet");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<usize> {
        let b = self.blocking;
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().recv(buf).map_err(ring_err),
            Inner::Socket(s) => s.recv(buf, b),
        }
    }

    /// Reads what is there (at most `buf.len()`); `Ok(0)` at end of stream
    /// (peer closed and nothing left).
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// srv.write_all(b"abc")?;
    /// let mut b = [0u8; 8];
    /// assert_eq!(cli.read_some(&mut b)?, 3);
    /// drop(srv);
    /// assert_eq!(cli.read_some(&mut b)?, 0); // end of stream
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        let b = self.blocking;
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().read(buf).map_err(ring_err),
            Inner::Socket(s) => s.read(buf, b),
        }
    }

    /// Writes what fits (blocking mode: all of it).
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert_eq!(srv.write_some(b"abc")?, 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_some(&mut self, buf: &[u8]) -> Result<usize> {
        let b = self.blocking;
        match &mut self.inner {
            Inner::Shm(c) => c.endpoint().write(buf).map_err(ring_err),
            Inner::Socket(s) => s.write(buf, b),
        }
    }

    /// What to wait for on [`AsFd::as_fd`] right now, for callers that run
    /// their own `poll`/epoll loop: on shared memory always `POLLIN` (the
    /// event channel); on the socket transport `POLLIN` while there is
    /// room to receive, `POLLOUT` while unsent bytes are held back (a
    /// `send` or `write` that did not fit into the socket), `POLLRDHUP`
    /// until the peer has shut down, and nothing when no socket event can
    /// change this end's state. Poll for exactly these flags, then call
    /// [`Vchan::consume_events`] when the fd fired: asking only for
    /// `POLLIN` would leave held-back output unsent until something else
    /// happens.
    ///
    /// ```
    /// use nix::poll::PollFlags;
    /// let dir = tempfile::tempdir()?;
    /// let t = vchan::Transport::Socket { dir: dir.path().into(), domid: 0 };
    /// let srv = vchan::Vchan::server(&t, 1, 4242, 4096, 4096)?;
    /// // Waiting for the client: the listening socket becomes readable.
    /// assert_eq!(srv.poll_interest(), PollFlags::POLLIN);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn poll_interest(&self) -> nix::poll::PollFlags {
        match &self.inner {
            Inner::Shm(_) => nix::poll::PollFlags::POLLIN,
            Inner::Socket(s) => s.poll_interest(),
        }
    }

    /// Consumes what `poll` reported on the fd without blocking, for
    /// callers that poll the fd themselves: on shared memory the pending
    /// events (re-arming the event channel); on the socket transport it
    /// accepts a waiting client, flushes held-back output and takes in
    /// what arrived. An error if the event channel failed or accepting
    /// the client did.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// cli.consume_events()?; // takes the pending wake-ups, never blocks
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn consume_events(&mut self) -> Result<()> {
        match &mut self.inner {
            Inner::Shm(c) => {
                while c.endpoint().consume_pending().map_err(ring_err)? {}
                Ok(())
            }
            Inner::Socket(s) => s.handle_ready(),
        }
    }

    /// Moves at most `max` bytes from `fd` into the vchan with one
    /// `read(2)`, without waiting for ring space (whatever the blocking
    /// mode). On shared memory the kernel reads straight into the ring's
    /// free space: no buffer in between, no Rust reference into shared
    /// memory, indices private (qubes-issues #9077's one-copy path). `Ok(0)`:
    /// end of file on `fd`.
    ///
    /// # Errors
    /// [`Error::WouldBlock`] when the ring is full (a notification has been
    /// requested: poll [`Vchan::poll_interest`] on the fd, then try again);
    /// [`Error::Io`] with step `"read from fd"` for the fd's own errors
    /// (`WouldBlock` there means `fd` is empty); [`Error::PeerClosed`],
    /// [`Error::Ring`] (a corrupted ring).
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::os::fd::AsFd;
    /// let dir = tempfile::tempdir()?;
    /// let xen = vchan::LocalXen::start(dir.path(), &[0, 1])?;
    /// let mut srv = vchan::Vchan::server(&xen.transport(0), 1, 77, 4096, 4096)?;
    /// let mut cli = vchan::Vchan::client(&xen.transport(1), 0, 77, std::time::Duration::from_secs(5))?;
    /// srv.wait_connected(None)?;
    /// let (mut w, r) = std::os::unix::net::UnixStream::pair()?;
    /// w.write_all(b"from a pipe")?;
    /// assert_eq!(srv.read_from_fd(r.as_fd(), 4096)?, 11);
    /// let mut got = [0u8; 11];
    /// cli.read_exact(&mut got)?;
    /// assert_eq!(&got, b"from a pipe");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_from_fd(&mut self, fd: BorrowedFd<'_>, max: usize) -> Result<usize> {
        match &mut self.inner {
            Inner::Shm(c) => c
                .endpoint()
                .read_from_fd(fd, max)
                .map_err(|e| fd_err("read from fd", e)),
            Inner::Socket(s) => s.read_from_fd(fd, max),
        }
    }

    /// Sends one framed message whose payload comes straight from `fd`:
    /// at most `max` bytes are read (one `read(2)`, on shared memory
    /// directly into the ring behind room for the header), then
    /// `header(len)` is written in front from private memory, and both are
    /// published together: the peer never sees a header without its
    /// payload. Never waits for space. `Ok(0)`: end of file on `fd`,
    /// nothing sent. For protocols like qrexec's (an 8-byte header per
    /// data chunk): no bounce buffer between the local fd and the ring.
    ///
    /// # Errors
    /// As [`Vchan::read_from_fd`]; [`Error::WouldBlock`] when there is no
    /// room for the header and one byte.
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::os::fd::AsFd;
    /// let dir = tempfile::tempdir()?;
    /// let xen = vchan::LocalXen::start(dir.path(), &[0, 1])?;
    /// let mut srv = vchan::Vchan::server(&xen.transport(0), 1, 78, 4096, 4096)?;
    /// let mut cli = vchan::Vchan::client(&xen.transport(1), 0, 78, std::time::Duration::from_secs(5))?;
    /// srv.wait_connected(None)?;
    /// let (mut w, r) = std::os::unix::net::UnixStream::pair()?;
    /// w.write_all(b"payload")?;
    /// let n = srv.send_framed_from_fd(r.as_fd(), 4096, |n| (n as u16).to_le_bytes())?;
    /// assert_eq!(n, 7);
    /// let mut got = [0u8; 9];
    /// cli.read_exact(&mut got)?;
    /// assert_eq!(&got, b"\x07\x00payload");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_framed_from_fd<const N: usize>(
        &mut self,
        fd: BorrowedFd<'_>,
        max: usize,
        header: impl FnOnce(usize) -> [u8; N],
    ) -> Result<usize> {
        match &mut self.inner {
            Inner::Shm(c) => c
                .endpoint()
                .send_framed_from_fd(fd, max, header)
                .map_err(|e| fd_err("read from fd", e)),
            Inner::Socket(s) => s.send_framed_from_fd(fd, max, header),
        }
    }

    /// Moves at most `max` received bytes to `fd` with one `write(2)`,
    /// without waiting for data (whatever the blocking mode). On shared
    /// memory the kernel reads straight from the ring. `Ok(0)`: end of
    /// stream (the peer closed and everything was read).
    ///
    /// # Errors
    /// [`Error::WouldBlock`] when nothing is ready (a notification has been
    /// requested); [`Error::Io`] with step `"write to fd"` for the fd's own
    /// errors (nothing is consumed then); [`Error::Ring`].
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::os::fd::AsFd;
    /// let dir = tempfile::tempdir()?;
    /// let xen = vchan::LocalXen::start(dir.path(), &[0, 1])?;
    /// let mut srv = vchan::Vchan::server(&xen.transport(0), 1, 79, 4096, 4096)?;
    /// let mut cli = vchan::Vchan::client(&xen.transport(1), 0, 79, std::time::Duration::from_secs(5))?;
    /// srv.wait_connected(None)?;
    /// srv.write_all(b"to a pipe")?;
    /// let (w, mut r) = std::os::unix::net::UnixStream::pair()?;
    /// assert_eq!(cli.write_to_fd(w.as_fd(), 4096)?, 9);
    /// let mut got = [0u8; 9];
    /// r.read_exact(&mut got)?;
    /// assert_eq!(&got, b"to a pipe");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_to_fd(&mut self, fd: BorrowedFd<'_>, max: usize) -> Result<usize> {
        match &mut self.inner {
            Inner::Shm(c) => c
                .endpoint()
                .write_to_fd(fd, max)
                .map_err(|e| fd_err("write to fd", e)),
            Inner::Socket(s) => s.write_to_fd(fd, max),
        }
    }

    /// Whether this vchan runs over the socket transport.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert!(!srv.is_socket()); // the Local transport shares memory
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_socket(&self) -> bool {
        matches!(self.inner, Inner::Socket(_))
    }

    /// Socket transport: whether, since the last call of this method, any
    /// call moved bytes between the socket and this end's private buffers,
    /// or saw the client connect or the peer leave; clears it. Such news
    /// no longer shows on the socket, so a caller that sleeps on the fd
    /// ([`Vchan::poll_interest`]) after, say, [`Vchan::data_ready`] took
    /// data in must look before sleeping (the C API's select fd stays
    /// readable on it until the next wait). Always `false` on shared
    /// memory, where the event channel keeps its own pending state.
    ///
    /// ```
    /// # use std::io::Write;
    /// # use std::time::Duration;
    /// # use vchan::{Transport, Vchan};
    /// let dir = tempfile::tempdir()?;
    /// let t0 = Transport::Socket { dir: dir.path().into(), domid: 0 };
    /// let t5 = Transport::Socket { dir: dir.path().into(), domid: 5 };
    /// let mut srv = Vchan::server(&t0, 5, 77, 4096, 4096)?;
    /// let mut cli = Vchan::client(&t5, 0, 77, Duration::from_secs(10))?;
    /// srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// assert!(srv.take_socket_news()); // the client came
    /// cli.write_all(b"hi")?;
    /// while srv.data_ready()? < 2 {
    ///     srv.wait()?;
    /// }
    /// assert!(srv.take_socket_news()); // "hi" left the socket for our buffer
    /// assert!(!srv.take_socket_news());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn take_socket_news(&mut self) -> bool {
        match &mut self.inner {
            Inner::Shm(_) => false,
            Inner::Socket(s) => s.take_news(),
        }
    }

    /// Closes this end (also done on drop); the peer sees [`State::Closed`].
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// # let mut cli = Vchan::client(&t2, 1, 4242, Duration::from_secs(10))?;
    /// # srv.wait_connected(Some(Duration::from_secs(10)))?;
    /// cli.close();
    /// assert_eq!(srv.state(), State::Closed);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn close(self) {
        drop(self);
    }
}

/// A client connect in progress, for callers that drive it from `poll`
/// or an event loop: wait until [`AsFd::as_fd`] is readable (or
/// [`Connecting::retry_interval`] has passed), then call
/// [`Connecting::poll`]. The fd is readable at once after
/// [`Vchan::client_start`] (a first attempt is due), and whenever another
/// is: on the shared-memory transports it also shows watch events that a
/// reply brought along and that wait in user space (docs/vchan.md §11.1).
///
/// ```no_run
/// use std::os::fd::AsFd;
/// use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
/// let t = vchan::Transport::from_env()?;
/// let mut c = vchan::Vchan::client_start(&t, 0, 512)?;
/// let v = loop {
///     if let Some(v) = c.poll()? { break v; }
///     let ms = c.retry_interval().map_or(-1, |d| d.as_millis() as i32);
///     let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
///     poll(&mut fds, PollTimeout::try_from(ms).unwrap())?;
/// };
/// # drop(v); Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Connecting {
    inner: ConnInner,
}

#[derive(Debug)]
enum ConnInner {
    Shm(Box<shm::ShmConnecting>),
    Socket {
        dir: std::path::PathBuf,
        own: DomId,
        peer: DomId,
        port: u32,
        /// Never readable: the socket transport retries on a timer.
        idle: nix::sys::eventfd::EventFd,
    },
}

impl Connecting {
    /// One attempt that never blocks for long: `Ok(Some(vchan))` once
    /// connected, `Ok(None)` to wait and call again.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// let mut c = Vchan::client_start(&t2, 1, 4242)?;
    /// let cli = loop {
    ///     match c.poll()? {
    ///         Some(v) => break v,
    ///         None => std::thread::sleep(Duration::from_millis(1)),
    ///     }
    /// };
    /// # drop(cli);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn poll(&mut self) -> Result<Option<Vchan>> {
        let inner = match &mut self.inner {
            ConnInner::Shm(c) => match c.poll()? {
                Some(ch) => Inner::Shm(Box::new(ch)),
                None => return Ok(None),
            },
            ConnInner::Socket {
                dir,
                own,
                peer,
                port,
                ..
            } => match socket::SocketChan::client(dir, *own, *peer, *port, Duration::ZERO) {
                Ok(ch) => Inner::Socket(ch),
                Err(Error::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            },
        };
        Ok(Some(Vchan {
            inner,
            blocking: true,
        }))
    }

    /// How long to wait at most before calling [`Connecting::poll`] again
    /// even if the fd shows nothing (the socket transport retries every
    /// 100 ms); `None` when the fd alone tells.
    ///
    /// ```
    /// # use std::io::{Read, Write};
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, State, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// # // A same-host Xen double; this process plays domains 1 and 2.
    /// # let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// # let (t1, t2) = (xen.transport(1), xen.transport(2));
    /// # let mut srv = Vchan::server(&t1, 2, 4242, 4096, 4096)?;
    /// let c = Vchan::client_start(&t2, 1, 4242)?;
    /// assert_eq!(c.retry_interval(), None); // shared memory: the fd alone tells
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn retry_interval(&self) -> Option<Duration> {
        match &self.inner {
            ConnInner::Shm(_) => None,
            ConnInner::Socket { .. } => Some(socket::CLIENT_RETRY),
        }
    }
}

impl AsFd for Connecting {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            ConnInner::Shm(c) => c.fd(),
            ConnInner::Socket { idle, .. } => idle.as_fd(),
        }
    }
}

/// One error vocabulary whatever the transport: the ring's "would block"
/// and "peer closed" are the crate's own variants.
fn ring_err(e: ring::RingError) -> Error {
    match e {
        ring::RingError::WouldBlock => Error::WouldBlock,
        ring::RingError::PeerClosed => Error::PeerClosed,
        e => Error::Ring(e),
    }
}

/// The fd↔ring calls' errors in the crate's vocabulary.
fn fd_err(step: &'static str, e: endpoint::FdError) -> Error {
    match e {
        endpoint::FdError::Ring(r) => ring_err(r),
        endpoint::FdError::Fd(source) => Error::io(step, source),
    }
}

impl io::Read for Vchan {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_some(buf).map_err(Into::into)
    }
}

impl io::Write for Vchan {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_some(buf).map_err(Into::into)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Vchan {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            Inner::Shm(c) => c.fd(),
            Inner::Socket(s) => s.as_fd(),
        }
    }
}
