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

// The handle and its lifecycle stay here; the grant table and the thread
// that serves requests against it have their own files.
mod table;
mod worker;

use table::*;
use worker::*;

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
