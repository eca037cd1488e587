// Why this file is long (~940 lines): the last ~200 are unit tests of the
// port state machine; the rest is that one state machine and its server.
//! The hub: the local double's hypervisor. It owns the state of every port
//! of every domain and serves clients over `<dir>/evtchn.sock`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, Shutdown, SockFlag, SockType, UnixAddr, accept4, bind,
    connect, listen, recv, send, shutdown, socket,
};

use super::wire::{self, Connect, ConnectError};
use crate::{DomId, Error, Port, PortStatus};

/// The socket's file name inside the rendezvous directory.
pub const SOCKET_NAME: &str = "evtchn.sock";

/// Ports are numbered 1..=`MAX_PORT` in each domain (Xen's 2-level ABI has
/// 4096 ports per 64-bit domain, and port 0 is never handed out).
pub(crate) const MAX_PORT: Port = 4095;

/// How a bound port is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    Unbound { remote: DomId },
    Interdomain { remote: DomId, remote_port: Port },
}

impl Bound {
    fn status(self) -> PortStatus {
        match self {
            Bound::Unbound { remote } => PortStatus::Unbound { remote },
            Bound::Interdomain {
                remote,
                remote_port,
            } => PortStatus::Interdomain {
                remote,
                remote_port,
            },
        }
    }
}

/// The connection that owns a port: where its events go.
#[derive(Debug, Clone)]
struct Owner {
    id: u64,
    fd: Arc<OwnedFd>,
}

/// One allocated port. Closed ports are not stored.
#[derive(Debug)]
struct Entry {
    bound: Bound,
    pending: bool,
    masked: bool,
    holds: u32,
    owner: Option<Owner>,
    notifications: u64,
}

/// A snapshot of one port's state in the hub, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortInfo {
    /// The port's state.
    pub status: PortStatus,
    /// An event arrived while the port was masked and waits for the re-arm.
    pub pending: bool,
    /// An event was delivered and the owner has not re-armed the port yet.
    pub masked: bool,
    /// How many [`HeldPort`]s keep the port bound.
    pub holds: u32,
    /// Whether the process that bound the port is still connected.
    pub owner_connected: bool,
    /// How many notifications have targeted this port since it was bound
    /// (including the bind's own wake-up of an interdomain binder).
    pub notifications: u64,
}

#[derive(Debug, Default)]
struct State {
    ports: BTreeMap<(DomId, Port), Entry>,
    conns: HashMap<u64, Arc<OwnedFd>>,
    threads: Vec<JoinHandle<()>>,
    next_conn: u64,
    stopped: bool,
    /// Domains destroyed with [`Hub::destroy_domain`].
    destroyed: BTreeSet<DomId>,
    /// Domains whose port-status requests are refused (no privcmd).
    status_refused: BTreeSet<DomId>,
}

/// Sends an event packet. The owner's receive queue holds at most one event
/// per re-arm, so a full queue means a client that does not follow the
/// protocol; its loss. Never blocks.
fn deliver(owner: &Owner, port: Port) {
    let _ = send(
        owner.fd.as_raw_fd(),
        &port.to_ne_bytes(),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    );
}

impl State {
    fn alloc_port(&self, dom: DomId) -> Result<Port, Errno> {
        let mut want: Port = 1;
        for &(_, p) in self.ports.range((dom, 1)..=(dom, MAX_PORT)).map(|(k, _)| k) {
            if p != want {
                break;
            }
            want += 1;
        }
        if want > MAX_PORT {
            Err(Errno::ENOSPC)
        } else {
            Ok(want)
        }
    }

    fn insert(&mut self, dom: DomId, port: Port, bound: Bound, owner: Owner) {
        self.ports.insert(
            (dom, port),
            Entry {
                bound,
                pending: false,
                masked: false,
                holds: 0,
                owner: Some(owner),
                notifications: 0,
            },
        );
    }

    fn bind_unbound(&mut self, dom: DomId, remote: DomId, owner: Owner) -> Result<Port, Errno> {
        // Xen does not check that the remote domain exists here.
        if self.destroyed.contains(&dom) {
            return Err(Errno::ESRCH);
        }
        let port = self.alloc_port(dom)?;
        self.insert(dom, port, Bound::Unbound { remote }, owner);
        Ok(port)
    }

    fn bind_interdomain(
        &mut self,
        dom: DomId,
        remote: DomId,
        remote_port: Port,
        owner: Owner,
    ) -> Result<Port, Errno> {
        // Xen looks the remote domain up before anything else.
        if self.destroyed.contains(&remote) || self.destroyed.contains(&dom) {
            return Err(Errno::ESRCH);
        }
        match self.ports.get(&(remote, remote_port)) {
            Some(e) if e.bound == Bound::Unbound { remote: dom } => {}
            _ => return Err(Errno::EINVAL),
        }
        let port = self.alloc_port(dom)?;
        self.insert(
            dom,
            port,
            Bound::Interdomain {
                remote,
                remote_port,
            },
            owner,
        );
        if let Some(e) = self.ports.get_mut(&(remote, remote_port)) {
            e.bound = Bound::Interdomain {
                remote: dom,
                remote_port: port,
            };
        }
        Ok(port)
    }

    /// Makes (dom, port) pending: mask and deliver, or remember for the
    /// re-arm if it is masked already.
    fn fire(&mut self, dom: DomId, port: Port) {
        let Some(e) = self.ports.get_mut(&(dom, port)) else {
            return;
        };
        e.notifications = e.notifications.saturating_add(1);
        match (&e.owner, e.masked) {
            (Some(owner), false) => {
                e.masked = true;
                deliver(owner, port);
            }
            // Masked, or nobody there to take it (a held port whose owner
            // is gone): stays pending.
            _ => e.pending = true,
        }
    }

    /// `IOCTL_EVTCHN_NOTIFY` from (dom, port): silently nothing unless the
    /// port is connected.
    fn notify_from(&mut self, dom: DomId, port: Port) {
        if let Some(Entry {
            bound:
                Bound::Interdomain {
                    remote,
                    remote_port,
                },
            ..
        }) = self.ports.get(&(dom, port))
        {
            let (r, rp) = (*remote, *remote_port);
            self.fire(r, rp);
        }
    }

    /// The write-back of the port number: unmask, and deliver a pending event.
    fn unmask(&mut self, dom: DomId, port: Port) {
        let Some(e) = self.ports.get_mut(&(dom, port)) else {
            return;
        };
        if !e.masked {
            return;
        }
        e.masked = false;
        if e.pending
            && let Some(owner) = &e.owner
        {
            e.pending = false;
            e.masked = true;
            deliver(owner, port);
        }
    }

    /// Frees (dom, port) unless it is held; the peer turns unbound towards us.
    fn free_unless_held(&mut self, dom: DomId, port: Port) {
        let Some(e) = self.ports.get(&(dom, port)) else {
            return;
        };
        if e.holds > 0 || e.owner.is_some() {
            return;
        }
        let bound = e.bound;
        self.ports.remove(&(dom, port));
        if let Bound::Interdomain {
            remote,
            remote_port,
        } = bound
            && let Some(peer) = self.ports.get_mut(&(remote, remote_port))
            && peer.bound
                == (Bound::Interdomain {
                    remote: dom,
                    remote_port: port,
                })
        {
            peer.bound = Bound::Unbound { remote: dom };
        }
    }

    /// The owning connection of (dom, port) has gone.
    fn close(&mut self, dom: DomId, port: Port, conn: u64) {
        match self.ports.get_mut(&(dom, port)) {
            Some(e) if e.owner.as_ref().is_some_and(|o| o.id == conn) => e.owner = None,
            _ => return,
        }
        self.free_unless_held(dom, port);
    }

    /// Xen's `evtchn_destroy` of a dying domain: every port of `dom` closes
    /// (held or not), and each connected peer's port turns unbound towards
    /// `dom`. The owners' connections stay open but own nothing.
    fn destroy_domain(&mut self, dom: DomId) {
        self.destroyed.insert(dom);
        let ports: Vec<Port> = self
            .ports
            .range((dom, 0)..=(dom, Port::MAX))
            .map(|(&(_, p), _)| p)
            .collect();
        for port in ports {
            if let Some(e) = self.ports.get_mut(&(dom, port)) {
                e.holds = 0;
                e.owner = None;
            }
            self.free_unless_held(dom, port);
        }
    }

    fn status(&self, dom: DomId, port: Port) -> PortStatus {
        self.ports
            .get(&(dom, port))
            .map_or(PortStatus::Closed, |e| e.bound.status())
    }
}

/// The state shared by the hub's threads and its [`HeldPort`]s.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
}

impl Shared {
    /// Nothing in the hub panics while holding the lock, but should it ever,
    /// the state is still consistent enough to keep serving.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Receives one packet, retrying `EINTR`.
fn recv_packet(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        match recv(fd.as_raw_fd(), buf, MsgFlags::empty()) {
            Err(Errno::EINTR) => {}
            r => return r,
        }
    }
}

fn send_reply(fd: &OwnedFd, pkt: &[u8]) -> bool {
    matches!(
        send(
            fd.as_raw_fd(),
            pkt,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL
        ),
        Ok(n) if n == pkt.len()
    )
}

/// Serves one connection until it closes or misbehaves.
fn serve_conn(shared: &Shared, id: u64, fd: &Arc<OwnedFd>) {
    let mut buf = [0u8; wire::RECV_BUF];
    let n = match recv_packet(fd, &mut buf) {
        Ok(n) if n > 0 => n,
        _ => return,
    };
    let pkt = &buf[..n];
    let connect = match Connect::decode(pkt) {
        Ok(c) => c,
        Err(ConnectError::Garbage) => return,
        Err(ConnectError::Invalid) => {
            let errno = Errno::EINVAL as u32;
            if wire::words::<4>(pkt).is_some_and(|w| w[0] == wire::OP_STATUS) {
                send_reply(fd, &wire::encode_status_reply(errno, PortStatus::Closed));
            } else {
                send_reply(fd, &wire::encode_bind_reply(errno, 0, false));
            }
            return;
        }
    };
    let owner = Owner { id, fd: fd.clone() };
    let (dom, port) = {
        let mut st = shared.lock();
        let (dom, res) = match connect {
            Connect::Status { dom, port } => {
                let (errno, status) = if st.status_refused.contains(&dom) {
                    (Errno::EPERM as u32, PortStatus::Closed)
                } else {
                    (0, st.status(dom, port))
                };
                drop(st);
                send_reply(fd, &wire::encode_status_reply(errno, status));
                return;
            }
            Connect::BindUnbound { dom, remote } => (dom, st.bind_unbound(dom, remote, owner)),
            Connect::BindInterdomain {
                dom,
                remote,
                remote_port,
            } => (dom, st.bind_interdomain(dom, remote, remote_port, owner)),
        };
        let port = match res {
            Ok(port) => port,
            Err(e) => {
                drop(st);
                send_reply(fd, &wire::encode_bind_reply(e as u32, 0, false));
                return;
            }
        };
        // The reply goes out under the lock, so that no event for the new
        // port can overtake it on the connection.
        let interdomain = matches!(connect, Connect::BindInterdomain { .. });
        if !send_reply(fd, &wire::encode_bind_reply(0, port, interdomain)) {
            st.close(dom, port, id);
            return;
        }
        if interdomain {
            // Xen leaves the binder's new port pending (docs/vchan.md §16, row 4c).
            // The reply told the client to wait for this event before its
            // bind returns, so that the fd is readable when it does.
            st.fire(dom, port);
        }
        (dom, port)
    };
    loop {
        let n = match recv_packet(fd, &mut buf) {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        let Some([op, p]) = wire::words::<2>(&buf[..n]) else {
            break;
        };
        if p != port {
            break;
        }
        let mut st = shared.lock();
        match op {
            wire::MSG_NOTIFY => st.notify_from(dom, port),
            wire::MSG_UNMASK => st.unmask(dom, port),
            _ => break,
        }
    }
    shared.lock().close(dom, port, id);
}

fn accept_loop(shared: &Arc<Shared>, listener: &OwnedFd, wake: &OwnedFd) {
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
        if fds[1].any().unwrap_or(true) {
            return;
        }
        let raw = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(raw) => raw,
            Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(_) => {
                // Out of fds or memory: do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // SAFETY: accept4 just returned this fd and nothing else owns it.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let mut st = shared.lock();
        if st.stopped {
            return;
        }
        let id = st.next_conn;
        st.next_conn += 1;
        st.conns.insert(id, fd.clone());
        st.threads.retain(|h| !h.is_finished());
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("evtchn-hub-conn".into())
            .spawn(move || {
                serve_conn(&sh, id, &fd);
                sh.lock().conns.remove(&id);
            });
        match spawned {
            Ok(h) => st.threads.push(h),
            Err(_) => {
                st.conns.remove(&id);
            }
        }
    }
}

#[derive(Debug)]
struct HubInner {
    shared: Arc<Shared>,
    path: PathBuf,
    wake: Mutex<Option<OwnedFd>>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl HubInner {
    fn shutdown(&self) {
        let Some(wake) = self.wake.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        {
            let mut st = self.shared.lock();
            st.stopped = true;
            for fd in st.conns.values() {
                let _ = shutdown(fd.as_raw_fd(), Shutdown::Both);
            }
        }
        let _ = nix::unistd::write(&wake, &[1]);
        if let Some(h) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
        let threads = std::mem::take(&mut self.shared.lock().threads);
        for h in threads {
            let _ = h.join();
        }
    }
}

impl Drop for HubInner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The local double's hypervisor: owns the state of every port of every
/// domain and serves [`Local`](super::Local) clients over
/// `<dir>/evtchn.sock`. Cheap to clone; it stops when
/// [`shutdown`](Hub::shutdown) is called or the last clone is dropped.
///
/// ```no_run
/// use evtchn::local::Hub;
/// let dir = tempfile::tempdir()?;
/// let hub = Hub::start(dir.path())?;
/// // ... processes use evtchn::local::Local::new(dir.path(), domid) ...
/// hub.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

fn hub_err(op: &'static str, path: &Path, e: Errno) -> Error {
    Error::Hub {
        op,
        path: path.to_owned(),
        source: e.into(),
    }
}

impl Hub {
    /// Binds `<dir>/evtchn.sock` and serves it from background threads
    /// (one per connection); returns at once. A stale socket file left by a
    /// dead hub is replaced; a live hub there gives `EADDRINUSE`.
    pub fn start(dir: &Path) -> Result<Hub, Error> {
        let path = dir.join(SOCKET_NAME);
        let addr = UnixAddr::new(&path).map_err(|e| hub_err("start hub", &path, e))?;
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| hub_err("start hub: socket", &path, e))?;
        match bind(listener.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(Errno::EADDRINUSE) => {
                let probe = socket(
                    AddressFamily::Unix,
                    SockType::SeqPacket,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .map_err(|e| hub_err("start hub: socket", &path, e))?;
                if connect(probe.as_raw_fd(), &addr).is_ok() {
                    return Err(hub_err(
                        "start hub: another hub is live",
                        &path,
                        Errno::EADDRINUSE,
                    ));
                }
                let _ = std::fs::remove_file(&path);
                bind(listener.as_raw_fd(), &addr)
                    .map_err(|e| hub_err("start hub: bind", &path, e))?;
            }
            Err(e) => return Err(hub_err("start hub: bind", &path, e)),
        }
        listen(&listener, Backlog::MAXCONN).map_err(|e| hub_err("start hub: listen", &path, e))?;
        let (wake_r, wake_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| hub_err("start hub: pipe", &path, e))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("evtchn-hub-accept".into())
            .spawn(move || accept_loop(&sh, &listener, &wake_r))
            .map_err(|e| Error::Hub {
                op: "start hub: spawn",
                path: path.clone(),
                source: e,
            })?;
        Ok(Hub {
            inner: Arc::new(HubInner {
                shared,
                path,
                wake: Mutex::new(Some(wake_w)),
                accept: Mutex::new(Some(accept)),
            }),
        })
    }

    /// The socket path clients connect to.
    pub fn socket_path(&self) -> &Path {
        &self.inner.path
    }

    /// Keeps port `port` of domain `dom` bound until the returned
    /// [`HeldPort`] drops, even after the process that bound it closes its
    /// end or dies — as the kernel's `evtchn_get` does for gntalloc/gntdev
    /// unmap notifications. [`HeldPort::notify`] fires the port's event at
    /// its peer. Fails with [`Error::NotBound`] (`EINVAL`) if the port is
    /// not bound.
    ///
    /// ```no_run
    /// # let hub = evtchn::local::Hub::start(std::path::Path::new("/tmp"))?;
    /// let held = hub.hold(1, 5)?;
    /// // ... the owner of port 5 of domain 1 dies ...
    /// held.notify(); // still reaches the peer
    /// drop(held); // now the port closes and the peer's turns unbound
    /// # Ok::<(), evtchn::Error>(())
    /// ```
    pub fn hold(&self, dom: DomId, port: Port) -> Result<HeldPort, Error> {
        let mut st = self.inner.shared.lock();
        let e = st
            .ports
            .get_mut(&(dom, port))
            .ok_or(Error::NotBound { dom, port })?;
        e.holds = e.holds.saturating_add(1);
        Ok(HeldPort {
            shared: self.inner.shared.clone(),
            dom,
            port,
        })
    }

    /// Destroys domain `dom` as `xl destroy` does, as far as event
    /// channels go: every port of `dom` closes at once (held ones too), the
    /// connected peers' ports turn unbound towards `dom` (no event, as on
    /// Xen), and from now on binds naming `dom` (as the remote domain or as
    /// the binder) fail with `ESRCH`, so that [`Backend::probe_domain`]
    /// answers [`DomainProbe::NoSuchDomain`]. The processes that played
    /// `dom` keep running; their channels own nothing any more.
    ///
    /// Differences from Xen: the domain is released at once (no zombie that
    /// lingers while others map its grants; [`DomainProbe::Exists`] says
    /// why that matters). Ids that were never used are not "missing" here:
    /// every id but a destroyed one exists. [`Hub::create_domain`] makes a
    /// destroyed id usable again (a new domain that reuses the id).
    ///
    /// [`Backend::probe_domain`]: crate::Backend::probe_domain
    /// [`DomainProbe::NoSuchDomain`]: crate::DomainProbe::NoSuchDomain
    /// [`DomainProbe::Exists`]: crate::DomainProbe::Exists
    ///
    /// ```no_run
    /// use evtchn::{Backend, DomainProbe, local::{Hub, Local}};
    /// # let dir = std::path::Path::new("/tmp");
    /// let hub = Hub::start(dir)?;
    /// let dom1 = Local::new(dir, 1);
    /// assert_eq!(dom1.probe_domain(2)?, DomainProbe::Exists);
    /// hub.destroy_domain(2);
    /// assert_eq!(dom1.probe_domain(2)?, DomainProbe::NoSuchDomain);
    /// # Ok::<(), evtchn::Error>(())
    /// ```
    pub fn destroy_domain(&self, dom: DomId) {
        self.inner.shared.lock().destroy_domain(dom);
    }

    /// A new domain with id `dom`: undoes [`Hub::destroy_domain`] for that
    /// id (Xen may reuse the id of a released domain). A no-op for an id
    /// that was not destroyed.
    pub fn create_domain(&self, dom: DomId) {
        self.inner.shared.lock().destroyed.remove(&dom);
    }

    /// Makes domain `dom` a restricted domU as far as port status goes:
    /// [`EventChannel::status`] of its ports answers `Ok(None)`
    /// ("unknown"), as the [`Xen`](crate::Xen) backend does where the
    /// kernel refuses privcmd hypercalls (a domU; docs/vchan.md §16 row P). By
    /// default every domain may ask, like dom0.
    ///
    /// [`EventChannel::status`]: crate::EventChannel::status
    pub fn refuse_status(&self, dom: DomId) {
        self.inner.shared.lock().status_refused.insert(dom);
    }

    /// The state of port `port` of domain `dom` (`Closed` if not bound).
    pub fn status(&self, dom: DomId, port: Port) -> PortStatus {
        self.inner.shared.lock().status(dom, port)
    }

    /// A snapshot of the hub's bookkeeping for one port (`None` if it is
    /// not bound). Meant for tests and diagnostics.
    pub fn port_info(&self, dom: DomId, port: Port) -> Option<PortInfo> {
        let st = self.inner.shared.lock();
        st.ports.get(&(dom, port)).map(|e| PortInfo {
            status: e.bound.status(),
            pending: e.pending,
            masked: e.masked,
            holds: e.holds,
            owner_connected: e.owner.is_some(),
            notifications: e.notifications,
        })
    }

    /// Stops serving: closes every client connection (their `wait` then
    /// fails with [`Error::HubClosed`]), joins the hub's threads and removes
    /// the socket file. Idempotent; also done when the last clone drops.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

/// A reference that keeps one port bound (see [`Hub::hold`]).
#[derive(Debug)]
pub struct HeldPort {
    shared: Arc<Shared>,
    dom: DomId,
    port: Port,
}

impl HeldPort {
    /// Fires the event from the held port to its peer, as
    /// `IOCTL_EVTCHN_NOTIFY` on it would; silently nothing if the peer has
    /// gone.
    pub fn notify(&self) {
        self.shared.lock().notify_from(self.dom, self.port);
    }

    /// The domain of the held port.
    pub fn dom(&self) -> DomId {
        self.dom
    }

    /// The held port.
    pub fn port(&self) -> Port {
        self.port
    }
}

impl Drop for HeldPort {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(e) = st.ports.get_mut(&(self.dom, self.port)) {
            e.holds = e.holds.saturating_sub(1);
        }
        st.free_unless_held(self.dom, self.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::Local;
    use crate::{Backend, DomainProbe};

    #[test]
    fn in_process_smoke() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::start(dir.path()).unwrap();
        let a = Local::new(dir.path(), 1).bind_unbound(2).unwrap();
        assert_eq!(a.local_port(), 1);
        assert_eq!(a.status().unwrap(), Some(PortStatus::Unbound { remote: 2 }));
        let b = Local::new(dir.path(), 2)
            .bind_interdomain(1, a.local_port())
            .unwrap();
        assert!(b.consume_pending().unwrap(), "the bind wakes the binder");
        assert!(
            !a.consume_pending().unwrap(),
            "the unbound side gets nothing"
        );
        b.notify().unwrap();
        assert!(a.wait_timeout(Duration::from_secs(10)).unwrap());
        let held = hub.hold(2, b.local_port()).unwrap();
        drop(b);
        // The hub sees the close asynchronously.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hub.port_info(2, 1).map(|i| i.owner_connected) != Some(false) {
            assert!(std::time::Instant::now() < deadline, "close not seen");
            std::thread::sleep(Duration::from_millis(1));
        }
        held.notify();
        assert!(a.wait_timeout(Duration::from_secs(10)).unwrap());
        drop(held);
        assert_eq!(hub.status(2, 1), PortStatus::Closed);
        assert_eq!(a.status().unwrap(), Some(PortStatus::Unbound { remote: 2 }));
        assert!(matches!(
            hub.hold(2, 1),
            Err(Error::NotBound { dom: 2, port: 1 })
        ));
        hub.shutdown();
        assert!(!dir.path().join(SOCKET_NAME).exists());
        assert!(matches!(a.wait(), Err(Error::HubClosed { .. })));
    }

    /// The binder's wake-up is on its fd by the time the bind returns, every
    /// time (the hub sends it after the reply; the client waits for it).
    #[test]
    fn bind_returns_with_the_wake_up_queued() {
        let dir = tempfile::tempdir().unwrap();
        let _hub = Hub::start(dir.path()).unwrap();
        for i in 0..300 {
            let a = Local::new(dir.path(), 1).bind_unbound(2).unwrap();
            let b = Local::new(dir.path(), 2)
                .bind_interdomain(1, a.local_port())
                .unwrap();
            assert!(b.consume_pending().unwrap(), "iteration {i}");
            assert!(!a.consume_pending().unwrap(), "iteration {i}");
        }
    }

    fn dummy_owner(id: u64) -> Owner {
        let (fd, _) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        Owner {
            id,
            fd: Arc::new(fd),
        }
    }

    /// Ports are per domain, never 0, lowest free first, and run out with
    /// ENOSPC after MAX_PORT.
    #[test]
    fn port_allocation() {
        let mut st = State::default();
        let o = dummy_owner(1);
        for want in 1..=MAX_PORT {
            assert_eq!(st.bind_unbound(7, 8, o.clone()), Ok(want));
        }
        assert_eq!(st.bind_unbound(7, 8, o.clone()), Err(Errno::ENOSPC));
        assert_eq!(st.bind_unbound(9, 8, o.clone()), Ok(1), "per domain");
        st.close(7, 5, 1);
        st.close(7, 3, 1);
        assert_eq!(st.status(7, 3), PortStatus::Closed);
        assert_eq!(st.bind_unbound(7, 8, o.clone()), Ok(3));
        assert_eq!(st.bind_unbound(7, 8, o.clone()), Ok(5));
        // Closing with another connection's id does nothing.
        st.close(7, 6, 2);
        assert_eq!(st.status(7, 6), PortStatus::Unbound { remote: 8 });
    }

    /// The interdomain rules of docs/vchan.md §6: only the named domain binds, only
    /// to an unbound port; a close turns the peer unbound towards the closer.
    #[test]
    fn interdomain_rules() {
        let mut st = State::default();
        let p = st.bind_unbound(1, 2, dummy_owner(1)).unwrap();
        assert_eq!(
            st.bind_interdomain(3, 1, p, dummy_owner(2)),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            st.bind_interdomain(0, 1, p, dummy_owner(2)),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            st.bind_interdomain(2, 1, 99, dummy_owner(2)),
            Err(Errno::EINVAL)
        );
        let q = st.bind_interdomain(2, 1, p, dummy_owner(3)).unwrap();
        assert_eq!(
            st.status(1, p),
            PortStatus::Interdomain {
                remote: 2,
                remote_port: q
            }
        );
        assert_eq!(
            st.bind_interdomain(2, 1, p, dummy_owner(4)),
            Err(Errno::EINVAL)
        );
        st.close(2, q, 3);
        assert_eq!(st.status(2, q), PortStatus::Closed);
        assert_eq!(st.status(1, p), PortStatus::Unbound { remote: 2 });
        assert!(st.bind_interdomain(2, 1, p, dummy_owner(5)).is_ok());
    }

    /// `destroy_domain` is Xen's `evtchn_destroy`: the dead domain's ports
    /// close (held ones too), the peers' ports turn unbound towards it, and
    /// binds naming it (either way) get `ESRCH`; `probe_domain` tells a
    /// destroyed domain from a live one, and never binds anything.
    #[test]
    fn destroyed_domain_is_no_such_domain() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::start(dir.path()).unwrap();
        let d1 = Local::new(dir.path(), 1);
        let d2 = Local::new(dir.path(), 2);
        let a = d1.bind_unbound(2).unwrap();
        let b = d2.bind_interdomain(1, a.local_port()).unwrap();
        let held = hub.hold(2, b.local_port()).unwrap();
        let waiting = d1.bind_unbound(2).unwrap();
        assert_eq!(d1.probe_domain(2).unwrap(), DomainProbe::Exists);
        assert_eq!(d1.probe_domain(3).unwrap(), DomainProbe::Exists);
        assert_eq!(d2.probe_domain(1).unwrap(), DomainProbe::Exists);
        // The probe never leaves a port behind.
        assert_eq!(hub.status(1, 3), PortStatus::Closed);

        hub.destroy_domain(2);
        assert_eq!(d1.probe_domain(2).unwrap(), DomainProbe::NoSuchDomain);
        assert_eq!(d1.probe_domain(3).unwrap(), DomainProbe::Exists);
        assert_eq!(hub.status(2, b.local_port()), PortStatus::Closed);
        assert_eq!(a.status().unwrap(), Some(PortStatus::Unbound { remote: 2 }));
        assert_eq!(
            waiting.status().unwrap(),
            Some(PortStatus::Unbound { remote: 2 })
        );
        assert!(!a.consume_pending().unwrap(), "a dead domain sends nothing");
        held.notify(); // reaches nobody
        assert!(!a.wait_timeout(Duration::from_millis(50)).unwrap());
        drop(held);
        let e = d1
            .bind_interdomain(2, b.local_port())
            .expect_err("no such domain");
        assert_eq!(e.errno(), Some(Errno::ESRCH));
        let e = d2
            .bind_unbound(1)
            .expect_err("the dead domain binds nothing");
        assert_eq!(e.errno(), Some(Errno::ESRCH));
        // Its old channels own nothing; notify is a silent no-op.
        b.notify().unwrap();
        assert!(!a.wait_timeout(Duration::from_millis(50)).unwrap());
        drop(b);
        hub.shutdown();
    }

    /// A domain the hub treats as a restricted domU gets "unknown" for the
    /// status of its own ports; others still see theirs.
    #[test]
    fn refused_status_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::start(dir.path()).unwrap();
        hub.refuse_status(1);
        let a = Local::new(dir.path(), 1).bind_unbound(2).unwrap();
        let b = Local::new(dir.path(), 2)
            .bind_interdomain(1, a.local_port())
            .unwrap();
        assert_eq!(a.status().unwrap(), None);
        assert_eq!(
            b.status().unwrap(),
            Some(PortStatus::Interdomain {
                remote: 1,
                remote_port: a.local_port()
            })
        );
        hub.shutdown();
    }
}
