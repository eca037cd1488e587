//! The local grant hub: a thread that plays the hypervisor's grant table for
//! the processes of one rendezvous directory.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SealFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr, accept4, bind, connect, listen,
    socket,
};

use super::proto::{
    FDS_PER_REPLY, MAX_PACKET, MAX_PAGES, Request, SOCKET_NAME, Writer, recv_packet, send_packet,
};
use crate::{DomId, Error, GrantRef, PAGE_SIZE};

/// The per-domain limit of granted pages, as Linux `xen_gntalloc.limit`
/// defaults to (docs/vchan.md §4.4): a share that would take a domain's pages
/// (across all its processes) beyond it fails with `ENOSPC`. Pages the
/// sharer has released but a peer still maps do not count.
pub const DOMAIN_PAGE_LIMIT: usize = MAX_PAGES;

/// The most grant entries one domain may have in use, released-but-mapped
/// ones included: Xen's default grant table of 64 frames holds 32768 v1
/// entries (docs/vchan.md §4.4). Beyond it a share fails with `ENOSPC`.
pub const DOMAIN_GRANT_ENTRIES: usize = 32768;

/// The first grant ref handed out in each domain (Linux reserves the first
/// eight entries of the grant table for itself).
const FIRST_REF: GrantRef = 8;

/// How long the hub stops accepting after `accept` failed for lack of
/// descriptors or memory, so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Where the hub gets event channels from: the event-channel hub of the
/// same directory. A trait so that the grant table can be tested alone.
pub(crate) trait Events: Send + 'static {
    /// Takes a reference on `port`, bound in domain `dom`, so that an event
    /// can still be sent from it after its owner closed it.
    fn hold(&self, dom: DomId, port: u32) -> Result<Box<dyn HeldEvent>, String>;
}

/// A held port.
pub(crate) trait HeldEvent: Send {
    /// Sends the event from the held port to its peer.
    fn notify(&self);
}

impl Events for evtchn::local::Hub {
    fn hold(&self, dom: DomId, port: u32) -> Result<Box<dyn HeldEvent>, String> {
        evtchn::local::Hub::hold(self, dom, port)
            .map(|h| Box::new(h) as Box<dyn HeldEvent>)
            .map_err(|e| e.to_string())
    }
}

impl HeldEvent for evtchn::local::HeldPort {
    fn notify(&self) {
        evtchn::local::HeldPort::notify(self)
    }
}

/// What the hub currently holds; see [`Hub::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubStats {
    /// Open client connections (each share and each map holds one).
    pub connections: usize,
    /// Shares whose memory the hub still holds: live ones, and released
    /// ones that a peer still maps.
    pub shares: usize,
    /// Grant refs that can be mapped.
    pub grants: usize,
    /// Live mappings.
    pub maps: usize,
    /// Pages counted against the per-domain limits, summed over domains.
    pub counted_pages: usize,
}

/// What the hub has seen since it started; see [`Hub::history`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubHistory {
    /// The most pages ever counted against one domain's limit at once
    /// (the high-water mark of the busiest domain).
    pub peak_domain_pages: usize,
    /// Shares refused with `ENOSPC` (a domain's page limit or its grant
    /// entries exhausted).
    pub refused_shares: usize,
}

/// The same-host grant table: a thread serving `<dir>/gnttab.sock`.
///
/// Start one per rendezvous directory, next to the event-channel hub of the
/// same directory; then any process can use [`Local`](super::Local) on that
/// directory. Dropping the hub shuts it down.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = std::path::Path::new("/tmp/vchan-demo");
/// let events = evtchn::local::Hub::start(dir)?;
/// let grants = gnttab::local::Hub::start(dir, events.clone())?;
/// // ... run processes that use gnttab::local::Local::new(dir, domid) ...
/// grants.shutdown();
/// events.shutdown();
/// # Ok(())
/// # }
/// ```
pub struct Hub {
    path: PathBuf,
    shared: Arc<Shared>,
    wake: OwnedFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between requests; a poisoned lock (a
        // panic elsewhere) is no reason to stop serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Hub {
    /// Starts a hub on `<dir>/gnttab.sock` that sends unmap-notify events
    /// through `events`, the event-channel hub of the same directory.
    ///
    /// Fails with `EADDRINUSE` if a hub already serves that directory; a
    /// stale socket file left by a dead hub is replaced.
    pub fn start(dir: &Path, events: evtchn::local::Hub) -> Result<Hub, Error> {
        Hub::start_with(dir, Box::new(events))
    }

    pub(crate) fn start_with(dir: &Path, events: Box<dyn Events>) -> Result<Hub, Error> {
        let path = dir.join(SOCKET_NAME);
        let err = |op, e: Errno| Error::Hub {
            op,
            path: path.clone(),
            source: e.into(),
        };
        let addr = UnixAddr::new(&path).map_err(|e| err("socket path", e))?;
        remove_stale_socket(&path, &addr).map_err(|e| err("start hub", e))?;
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| err("socket", e))?;
        bind(listener.as_raw_fd(), &addr).map_err(|e| err("bind", e))?;
        let backlog = Backlog::new(128).map_err(|e| err("listen", e))?;
        listen(&listener, backlog).map_err(|e| err("listen", e))?;
        let (wake_rx, wake) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| err("pipe2", e))?;
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            listener,
            wake: wake_rx,
            shared: shared.clone(),
            events,
            conns: Vec::new(),
            backoff_until: None,
        };
        let thread = std::thread::Builder::new()
            .name("gnttab-hub".to_owned())
            .spawn(move || worker.run())
            .map_err(|e| Error::Hub {
                op: "spawn hub thread",
                path: path.clone(),
                source: e,
            })?;
        Ok(Hub {
            path,
            shared,
            wake,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The hub's socket, `<dir>/gnttab.sock`.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The high-water mark of granted pages and the count of refused
    /// shares since the hub started (for load tests and diagnostics).
    pub fn history(&self) -> HubHistory {
        self.shared.lock().history
    }

    /// A snapshot of what the hub holds (for tests and diagnostics).
    pub fn stats(&self) -> HubStats {
        self.shared.lock().stats()
    }

    /// Stops the hub: closes every connection (clients see the end of the
    /// connection on their next request), drops every grant, and removes the
    /// socket file. No unmap-notify is sent. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(thread) = thread else { return };
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = nix::unistd::write(&self.wake, &[1]);
        let _ = thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a socket file no hub listens on any more; refuses to start a
/// second hub on a live one.
fn remove_stale_socket(path: &Path, addr: &UnixAddr) -> Result<(), Errno> {
    match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(m) if !m.file_type().is_socket() => return Err(Errno::EEXIST),
        Ok(_) => {}
    }
    let probe = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match connect(probe.as_raw_fd(), addr) {
        Ok(()) => Err(Errno::EADDRINUSE),
        Err(_) => std::fs::remove_file(path)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
    }
}

// ---------------------------------------------------------------------------
// The grant table

#[derive(Debug)]
struct Grant {
    share: u64,
    page: u32,
    peer: DomId,
    writable: bool,
    /// Live mappings of this ref (a map that names it twice counts twice).
    maps: u32,
}

#[derive(Debug)]
struct ShareEntry {
    file: File,
    granter: DomId,
    refs: Vec<GrantRef>,
    /// The sharer let go: its pages no longer count, and each ref is revoked
    /// at its last unmap.
    released: bool,
    /// Refs of this share still in the grant table.
    live: usize,
}

#[derive(Debug, Default)]
struct State {
    next_ref: HashMap<DomId, GrantRef>,
    grants: HashMap<(DomId, GrantRef), Grant>,
    shares: HashMap<u64, ShareEntry>,
    next_share: u64,
    counted: HashMap<DomId, usize>,
    /// Grant entries in use per granting domain (live and orphaned).
    entries: HashMap<DomId, usize>,
    connections: usize,
    maps: usize,
    history: HubHistory,
}

/// An unmap-notify registered on a connection's object.
struct Notify {
    offset: usize,
    held: Box<dyn HeldEvent>,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct MapRec {
    granter: DomId,
    refs: Vec<GrantRef>,
    writable: bool,
    /// The distinct shares behind `refs`, in the order of the `FDS` replies.
    shares: Vec<u64>,
}

/// What a connection holds.
#[derive(Debug)]
enum Obj {
    /// Nothing yet: the first request must be SHARE or MAP.
    Fresh,
    Share {
        id: u64,
        dom: DomId,
        notify: Option<Notify>,
    },
    Map {
        dom: DomId,
        rec: MapRec,
        notify: Option<Notify>,
    },
    /// Released; only the end of the connection may follow.
    Done,
}

impl State {
    fn stats(&self) -> HubStats {
        HubStats {
            connections: self.connections,
            shares: self.shares.len(),
            grants: self.grants.len(),
            maps: self.maps,
            counted_pages: self.counted.values().sum(),
        }
    }

    fn share(
        &mut self,
        dom: DomId,
        peer: DomId,
        writable: bool,
        count: u32,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(u64, Vec<GrantRef>), Errno> {
        if fds.len() != 1 {
            return Err(Errno::EINVAL);
        }
        let count = count as usize;
        if count == 0 {
            return Err(Errno::EINVAL);
        }
        let counted = self.counted.get(&dom).copied().unwrap_or(0);
        let entries = self.entries.get(&dom).copied().unwrap_or(0);
        if count > DOMAIN_PAGE_LIMIT
            || counted + count > DOMAIN_PAGE_LIMIT
            || entries + count > DOMAIN_GRANT_ENTRIES
        {
            self.history.refused_shares += 1;
            return Err(Errno::ENOSPC);
        }
        let file = File::from(fds.remove(0));
        check_memfd(&file, count)?;

        let id = self.next_share;
        self.next_share += 1;
        let mut refs = Vec::with_capacity(count);
        for page in 0..count as u32 {
            let r = self.alloc_ref(dom);
            self.grants.insert(
                (dom, r),
                Grant {
                    share: id,
                    page,
                    peer,
                    writable,
                    maps: 0,
                },
            );
            refs.push(r);
        }
        self.shares.insert(
            id,
            ShareEntry {
                file,
                granter: dom,
                refs: refs.clone(),
                released: false,
                live: count,
            },
        );
        let now_counted = self.counted.entry(dom).or_insert(0);
        *now_counted += count;
        self.history.peak_domain_pages = self.history.peak_domain_pages.max(*now_counted);
        *self.entries.entry(dom).or_insert(0) += count;
        Ok((id, refs))
    }

    /// A ref of domain `dom` not in use. Refs are not reused until the
    /// counter wraps; the loop ends because at most
    /// [`DOMAIN_GRANT_ENTRIES`] refs of one domain are in use.
    fn alloc_ref(&mut self, dom: DomId) -> GrantRef {
        let next = self.next_ref.entry(dom).or_insert(FIRST_REF);
        loop {
            let r = *next;
            *next = next.checked_add(1).unwrap_or(FIRST_REF);
            if !self.grants.contains_key(&(dom, r)) {
                return r;
            }
        }
    }

    /// The sharer let go (drop or death): notify, then stop counting the
    /// pages and revoke every ref that nobody maps.
    fn release_share(&mut self, id: u64, notify: Option<Notify>) {
        let Some(share) = self.shares.get_mut(&id) else {
            return;
        };
        if let Some(n) = notify {
            // Byte first, then the event (docs/vchan.md §7.1): the pwrite lands in
            // the very pages every MAP_SHARED mapping shows.
            let _ = share.file.write_at(&[0], n.offset as u64);
            n.held.notify();
        }
        share.released = true;
        let granter = share.granter;
        let count = share.refs.len();
        if let Some(c) = self.counted.get_mut(&granter) {
            *c = c.saturating_sub(count);
            if *c == 0 {
                self.counted.remove(&granter);
            }
        }
        let refs = share.refs.clone();
        for r in refs {
            if self.grants.get(&(granter, r)).is_some_and(|g| g.maps == 0) {
                self.revoke(granter, r);
            }
        }
    }

    fn revoke(&mut self, granter: DomId, r: GrantRef) {
        let Some(g) = self.grants.remove(&(granter, r)) else {
            return;
        };
        if let Some(n) = self.entries.get_mut(&granter) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.entries.remove(&granter);
            }
        }
        if let Some(share) = self.shares.get_mut(&g.share) {
            share.live = share.live.saturating_sub(1);
            if share.live == 0 {
                self.shares.remove(&g.share);
            }
        }
    }

    /// Checks and records a mapping by domain `dom`. Every grant problem is
    /// `EINVAL`, as `mmap` reports it on Xen.
    fn map(
        &mut self,
        dom: DomId,
        granter: DomId,
        writable: bool,
        refs: Vec<GrantRef>,
    ) -> Result<(MapRec, Vec<u8>), Errno> {
        if refs.is_empty() {
            return Err(Errno::EINVAL);
        }
        let mut shares: Vec<u64> = Vec::new();
        let mut entries = Vec::with_capacity(refs.len());
        for r in &refs {
            let g = self.grants.get(&(granter, *r)).ok_or(Errno::EINVAL)?;
            if g.peer != dom || (writable && !g.writable) {
                return Err(Errno::EINVAL);
            }
            let idx = match shares.iter().position(|s| *s == g.share) {
                Some(i) => i,
                None => {
                    shares.push(g.share);
                    shares.len() - 1
                }
            };
            entries.push((idx as u32, g.page));
        }
        for r in &refs {
            if let Some(g) = self.grants.get_mut(&(granter, *r)) {
                g.maps += 1;
            }
        }
        self.maps += 1;
        let mut w = Writer::default();
        w.i32(0).u32(refs.len() as u32).u32(shares.len() as u32);
        for (idx, page) in entries {
            w.u32(idx).u32(page);
        }
        Ok((
            MapRec {
                granter,
                refs,
                writable,
                shares,
            },
            w.0,
        ))
    }

    /// The mapper let go. `clear_byte`: the mapper died, so the hub clears
    /// the notify byte (an orderly mapper cleared it itself at `munmap`).
    /// Then the event; then refs released by their sharer and no longer
    /// mapped are revoked.
    fn unmap(&mut self, rec: MapRec, notify: Option<Notify>, clear_byte: bool) {
        if let Some(n) = notify {
            if clear_byte {
                let page = n.offset / PAGE_SIZE;
                let within = (n.offset % PAGE_SIZE) as u64;
                let target = rec
                    .refs
                    .get(page)
                    .and_then(|r| self.grants.get(&(rec.granter, *r)))
                    .and_then(|g| Some((self.shares.get(&g.share)?, g.page)));
                if let Some((share, page)) = target {
                    let _ = share
                        .file
                        .write_at(&[0], u64::from(page) * PAGE_SIZE as u64 + within);
                }
            }
            n.held.notify();
        }
        self.maps = self.maps.saturating_sub(1);
        for r in rec.refs {
            let Some(g) = self.grants.get_mut(&(rec.granter, r)) else {
                continue;
            };
            g.maps = g.maps.saturating_sub(1);
            let orphan = g.maps == 0 && self.shares.get(&g.share).is_none_or(|s| s.released);
            if orphan {
                self.revoke(rec.granter, r);
            }
        }
    }
}

/// Checks that a descriptor from a sharer is what the double needs: a
/// read-write memfd of exactly `count` pages whose size is sealed, so that
/// no peer can shrink it under a mapping.
fn check_memfd(file: &File, count: usize) -> Result<(), Errno> {
    let meta = file.metadata().map_err(|_| Errno::EINVAL)?;
    if !meta.file_type().is_file() || meta.len() != (count * PAGE_SIZE) as u64 {
        return Err(Errno::EINVAL);
    }
    let seals = fcntl(file, FcntlArg::F_GET_SEALS).map_err(|_| Errno::EINVAL)?;
    let seals = SealFlag::from_bits_truncate(seals);
    if !seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
        return Err(Errno::EINVAL);
    }
    let fl = fcntl(file, FcntlArg::F_GETFL).map_err(|_| Errno::EINVAL)?;
    if fl & libc::O_ACCMODE != libc::O_RDWR {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// A read-only descriptor of the same memfd, so that a read-only mapper
/// cannot map the pages writable.
fn reopen_read_only(file: &File) -> Result<OwnedFd, Errno> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(OwnedFd::from)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

// ---------------------------------------------------------------------------
// The hub thread

struct Conn {
    sock: OwnedFd,
    obj: Obj,
    dead: bool,
}

struct Worker {
    listener: OwnedFd,
    wake: OwnedFd,
    shared: Arc<Shared>,
    events: Box<dyn Events>,
    conns: Vec<Conn>,
    backoff_until: Option<Instant>,
}

/// A reply: bytes and the descriptors to pass with them.
type Reply = (Vec<u8>, Vec<OwnedFd>);

fn status(e: Errno) -> Reply {
    let mut w = Writer::default();
    w.i32(e as i32);
    (w.0, Vec::new())
}

fn ok() -> Reply {
    status_ok(Writer::default())
}

fn status_ok(mut payload: Writer) -> Reply {
    let mut w = Writer::default();
    w.i32(0);
    w.0.append(&mut payload.0);
    (w.0, Vec::new())
}

impl Worker {
    fn run(mut self) {
        let mut buf = vec![0u8; MAX_PACKET];
        while !self.shared.stop.load(Ordering::SeqCst) {
            let ready = self.wait();
            let Some((accept, conn_ready)) = ready else {
                continue;
            };
            if accept {
                self.accept();
            }
            for i in conn_ready {
                self.serve(i, &mut buf);
            }
            self.reap();
        }
        // Shutdown: close every connection and drop the grant table. No
        // notify: the hub going away is not a sharer or mapper letting go.
        let mut state = self.shared.lock();
        state.connections = 0;
        state.maps = 0;
        state.grants.clear();
        state.shares.clear();
        state.counted.clear();
        state.entries.clear();
        drop(state);
        self.conns.clear();
    }

    /// Polls; returns whether to accept and which connections are ready.
    fn wait(&mut self) -> Option<(bool, Vec<usize>)> {
        let listening = self.backoff_until.is_none_or(|t| Instant::now() >= t);
        if listening {
            self.backoff_until = None;
        }
        let base = 1 + usize::from(listening);
        let mut pfds = Vec::with_capacity(self.conns.len() + base);
        pfds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
        if listening {
            pfds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
        }
        for c in &self.conns {
            pfds.push(PollFd::new(c.sock.as_fd(), PollFlags::POLLIN));
        }
        let timeout = if listening {
            PollTimeout::NONE
        } else {
            PollTimeout::try_from(ACCEPT_BACKOFF).unwrap_or(PollTimeout::NONE)
        };
        match poll(&mut pfds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => return None,
            Err(_) => {
                // Should not happen; do not spin.
                std::thread::sleep(Duration::from_millis(10));
                return None;
            }
        }
        let ready: Vec<bool> = pfds
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(pfds);
        if ready[0] {
            let mut b = [0u8; 64];
            while matches!(nix::unistd::read(&self.wake, &mut b), Ok(n) if n > 0) {}
        }
        let conns = (0..self.conns.len()).filter(|i| ready[i + base]).collect();
        Some((listening && ready[1], conns))
    }

    fn accept(&mut self) {
        // A bounded batch per round, so that connecting clients cannot starve
        // the others.
        for _ in 0..64 {
            match accept4(
                self.listener.as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => {
                    // SAFETY: accept4 just returned this new descriptor;
                    // nothing else owns it.
                    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
                    self.conns.push(Conn {
                        sock,
                        obj: Obj::Fresh,
                        dead: false,
                    });
                    self.shared.lock().connections += 1;
                }
                Err(Errno::EINTR | Errno::ECONNABORTED | Errno::EPROTO) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: try again later.
                    self.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Reads and answers one request on connection `i`.
    fn serve(&mut self, i: usize, buf: &mut [u8]) {
        let conn = &mut self.conns[i];
        let packet = match recv_packet(conn.sock.as_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EAGAIN) => return,
            Err(_) | Ok(None) => {
                conn.dead = true;
                return;
            }
            Ok(Some(p)) => p,
        };
        if packet.truncated {
            conn.dead = true;
            return;
        }
        let Ok(req) = Request::decode(&buf[..packet.len]) else {
            conn.dead = true;
            return;
        };
        let Some((bytes, fds)) = self.handle(i, req, packet.fds) else {
            self.conns[i].dead = true;
            return;
        };
        let conn = &mut self.conns[i];
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // Never block on a client that does not read its replies.
        if send_packet(conn.sock.as_fd(), &bytes, &raw, MsgFlags::MSG_DONTWAIT).is_err() {
            conn.dead = true;
        }
        drop(fds);
    }

    /// Handles a request; `None` is a protocol violation that ends the
    /// connection.
    fn handle(&mut self, i: usize, req: Request, fds: Vec<OwnedFd>) -> Option<Reply> {
        let conn = &mut self.conns[i];
        let mut state = self.shared.lock();
        match (req, &mut conn.obj) {
            (
                Request::Share {
                    dom,
                    peer,
                    writable,
                    count,
                },
                Obj::Fresh,
            ) => Some(match state.share(dom, peer, writable, count, fds) {
                Ok((id, refs)) => {
                    conn.obj = Obj::Share {
                        id,
                        dom,
                        notify: None,
                    };
                    let mut w = Writer::default();
                    w.u32(refs.len() as u32);
                    for r in refs {
                        w.u32(r);
                    }
                    status_ok(w)
                }
                Err(e) => status(e),
            }),
            (
                Request::Map {
                    dom,
                    granter,
                    writable,
                    refs,
                },
                Obj::Fresh,
            ) if fds.is_empty() => Some(match state.map(dom, granter, writable, refs) {
                Ok((rec, reply)) => {
                    conn.obj = Obj::Map {
                        dom,
                        rec,
                        notify: None,
                    };
                    (reply, Vec::new())
                }
                Err(e) => status(e),
            }),
            (Request::Fds { start }, Obj::Map { rec, .. }) if fds.is_empty() => {
                let start = start as usize;
                if start >= rec.shares.len() {
                    return None;
                }
                let end = rec.shares.len().min(start + FDS_PER_REPLY);
                let mut out = Vec::with_capacity(end - start);
                for id in &rec.shares[start..end] {
                    let file = &state.shares.get(id)?.file;
                    let fd = if rec.writable {
                        file.as_fd().try_clone_to_owned()
                    } else {
                        reopen_read_only(file).map_err(std::io::Error::from)
                    };
                    match fd {
                        Ok(fd) => out.push(fd),
                        Err(e) => {
                            let errno = e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
                            return Some(status(errno));
                        }
                    }
                }
                let mut w = Writer::default();
                w.u32(out.len() as u32);
                let (bytes, _) = status_ok(w);
                Some((bytes, out))
            }
            (Request::Notify { offset, port }, Obj::Share { id, dom, notify })
                if fds.is_empty() =>
            {
                let len = state.shares.get(id)?.refs.len() * PAGE_SIZE;
                if offset as usize >= len {
                    return Some(status(Errno::EINVAL));
                }
                match self.events.hold(*dom, port) {
                    Ok(held) => {
                        *notify = Some(Notify {
                            offset: offset as usize,
                            held,
                        });
                        Some(ok())
                    }
                    Err(_) => Some(status(Errno::EINVAL)),
                }
            }
            (Request::Notify { offset, port }, Obj::Map { dom, rec, notify }) if fds.is_empty() => {
                // CLEAR_BYTE on a read-only mapping: EINVAL, as gntdev says.
                if !rec.writable || offset as usize >= rec.refs.len() * PAGE_SIZE {
                    return Some(status(Errno::EINVAL));
                }
                match self.events.hold(*dom, port) {
                    Ok(held) => {
                        *notify = Some(Notify {
                            offset: offset as usize,
                            held,
                        });
                        Some(ok())
                    }
                    Err(_) => Some(status(Errno::EINVAL)),
                }
            }
            (Request::Release, Obj::Share { .. } | Obj::Map { .. }) if fds.is_empty() => {
                let obj = std::mem::replace(&mut conn.obj, Obj::Done);
                release(&mut state, obj, false);
                // Nothing can follow; close after the reply.
                conn.dead = true;
                Some(ok())
            }
            _ => None,
        }
    }

    /// Drops dead connections, releasing what they held as a process death
    /// would.
    fn reap(&mut self) {
        if !self.conns.iter().any(|c| c.dead) {
            return;
        }
        let mut state = self.shared.lock();
        let mut kept = Vec::with_capacity(self.conns.len());
        for mut c in self.conns.drain(..) {
            if c.dead {
                let obj = std::mem::replace(&mut c.obj, Obj::Done);
                release(&mut state, obj, true);
                state.connections = state.connections.saturating_sub(1);
            } else {
                kept.push(c);
            }
        }
        self.conns = kept;
    }
}

/// Lets go of a connection's object. `died`: the client went away without
/// releasing it (process death, or a protocol violation).
fn release(state: &mut State, obj: Obj, died: bool) {
    match obj {
        Obj::Share { id, notify, .. } => state.release_share(id, notify),
        Obj::Map { rec, notify, .. } => state.unmap(rec, notify, died),
        Obj::Fresh | Obj::Done => {}
    }
}
