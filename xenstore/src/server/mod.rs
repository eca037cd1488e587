//! A small xenstored-compatible server for tests and the local backend.
//!
//! * One unix socket per domain, `<dir>/<domid>.sock`: a connection on
//!   domain D's socket acts as domain D; domain 0 is privileged.
//! * An in-memory tree whose permissions follow docs/vchan.md §8.2 and C xenstored:
//!   the first entry names the owner (full access) and the default access;
//!   later entries grant per-domain access; dom0 has full access; new nodes
//!   inherit their parent's list, with a creating domain (not dom0) as
//!   owner; only the owner or dom0 may SET_PERMS, and a domain cannot
//!   change the owner (`EPERM`).
//! * READ/DIRECTORY/GET_PERMS need read access, WRITE/MKDIR/RM/SET_PERMS
//!   need write access on the node, or on the nearest existing ancestor to
//!   create it (missing intermediate nodes are created implicitly).
//! * A missing node under a node the caller may not access gives `EACCES`
//!   like C xenstored, or `ENOENT` like oxenstored
//!   ([`MissingNodeError`]).
//! * Relative paths resolve under `/local/domain/<D>`.
//! * Transactions work on a snapshot and fail with `EAGAIN` at commit if any
//!   node they looked at (present or absent) changed meanwhile.
//! * Watches fire once on registration, and on every change at or below
//!   the watched path that the watcher may read (transactions: at commit).
//!   `@introduceDomain` / `@releaseDomain` fire on
//!   [`add_domain`](Server::add_domain) / [`remove_domain`](Server::remove_domain).
//! * A request announcing more than 4096 payload bytes closes the
//!   connection (as xenstored does); a reply that would exceed 4096 bytes
//!   becomes `E2BIG`.
//!
//! Threads: one accept thread per domain socket, and a reader and a writer
//! thread per connection. All state sits behind one mutex.
//!
//! # Differences from C xenstored and oxenstored
//!
//! * `@releaseDomain` / `@introduceDomain` events go to every watcher of
//!   those paths (C xenstored filters them by the special nodes'
//!   permissions, so a domU may only get the registration event).
//! * Transactions copy the whole tree at start and conflict on any node they
//!   looked at (including absent nodes and the ancestors checked for
//!   permissions). That is C xenstored's rule; oxenstored merges more
//!   transactions and answers `EAGAIN` less often.
//! * Quotas ([`Limits`], C xenstored's defaults): transactions are counted
//!   per domain, not per connection, because a domU's processes share one
//!   connection on Xen and each has its own here; the value size limit
//!   (2048 for domains) counts the value only (C also counts the
//!   permissions and child names); the memory and outstanding-request
//!   quotas are not modelled.
//! * Permission strings are parsed strictly (`r05` or `r+5` are `EINVAL`;
//!   C uses `strtol`). Entries for domains that do not exist are kept as
//!   they are.
//! * Only the requests vchan and its tests need, plus `IS_DOMAIN_INTRODUCED`
//!   and `RESET_WATCHES`; `INTRODUCE`, `RELEASE`, `SET_TARGET`, `RESUME`,
//!   `DIRECTORY_PART`, features and quotas answer `ENOSYS`; unknown types
//!   `EINVAL`.
//! * Watch events caused by a request are queued right after its reply; an
//!   event longer than 4096 bytes is not sent. A connection that lets more
//!   than [`Limits::max_queued_messages`] messages pile up is closed.
//! * Only `/`, `/local`, `/local/domain` and the served domains' homes
//!   exist at start (no `/vm`, `/tool`, no persistence).

mod core;
mod store;

pub use self::core::{Request, parse_request};

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use self::core::{ConnId, Outbox, State};
use crate::error::{Errno, Error, Result};
use crate::perms::DomId;
use crate::wire::{FrameReader, HEADER_LEN, PAYLOAD_MAX};

/// What a missing node under an inaccessible ancestor reports (docs/vchan.md §8.2,
/// docs/vchan.md §16 row 9c).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingNodeError {
    /// C xenstored: `EACCES` unless the caller has the needed access to the
    /// nearest existing ancestor (then `ENOENT`). The default: it is the
    /// answer that clients forget to handle.
    #[default]
    Eacces,
    /// oxenstored: always `ENOENT`.
    Enoent,
}

/// Per-domain resource limits. The defaults are C xenstored's quotas as
/// Xen 4.17 configures them (`tools/xenstore/xenstored_core.c`, tag
/// `RELEASE-4.17.0`: `quota_max_transaction = 10`,
/// `quota_nb_watch_per_domain = 128`, `quota_nb_entry_per_domain = 1000`,
/// `quota_nb_perms_per_node = 5`, `quota_max_entry_size = 2048`).
///
/// Like C xenstored, they apply to domains other than dom0 only (its
/// `domain_is_unprivileged` checks), except `max_nodes` and
/// `max_queued_messages`. C counts transactions per *connection*; a domU
/// has exactly one (its xenbus ring, which the kernel shares among all its
/// processes), while here every process has its own socket connection, so
/// transactions are counted over all connections of the domain, which is
/// what a domU sees on Xen. Watches are per domain in C as well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Watches a domain may hold; a `WATCH` while it holds more than this
    /// many is `E2BIG` (C: `domain_watch(conn) > quota_nb_watch_per_domain`,
    /// so quota + 1 fit).
    pub max_watches: usize,
    /// Transactions a domain may have open; a `TRANSACTION_START` while it
    /// has more than this many is `ENOSPC` (C: `transaction_started >
    /// quota_max_transaction`, so quota + 1 fit).
    pub max_transactions: usize,
    /// Nodes a domain may own (`ENOSPC` beyond).
    pub max_nodes_per_domain: usize,
    /// Nodes in the whole tree (`ENOSPC` beyond).
    pub max_nodes: usize,
    /// Entries in a permission list set by a domain (`ENOSPC` beyond).
    pub max_perms_per_node: usize,
    /// Value size a domain may write (`ENOSPC` beyond).
    pub max_value_len: usize,
    /// Outgoing messages queued for a connection that does not read; the
    /// connection is closed when the queue is full.
    pub max_queued_messages: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_watches: 128,
            max_transactions: 10,
            max_nodes_per_domain: 1000,
            max_nodes: 100_000,
            max_perms_per_node: 5,
            max_value_len: 2048,
            max_queued_messages: 1024,
        }
    }
}

impl Limits {
    pub(crate) fn unlimited() -> Limits {
        Limits {
            max_watches: usize::MAX,
            max_transactions: usize::MAX,
            max_nodes_per_domain: usize::MAX,
            max_nodes: usize::MAX,
            max_perms_per_node: usize::MAX,
            max_value_len: usize::MAX,
            max_queued_messages: usize::MAX,
        }
    }
}

/// Server configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `EACCES` (C xenstored) or `ENOENT` (oxenstored) for missing nodes.
    pub missing_node: MissingNodeError,
    /// Resource limits.
    pub limits: Limits,
    /// Send a WATCH's registration event before its reply. A Linux domU's
    /// `/dev/xen/xenbus` can deliver them in this order: the kernel queues
    /// the event from its xenwatch thread and the reply from the writing
    /// thread, whichever comes first; a client must cope with both.
    /// xenstored's own socket always sends the reply first (`false`).
    pub watch_event_first: bool,
}

#[derive(Debug)]
struct Listener {
    path: PathBuf,
    /// Dropping (shutting down) this wakes the accept thread.
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    config: Config,
    state: Mutex<State>,
    listeners: Mutex<HashMap<DomId, Listener>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_conn: AtomicU64,
    stopped: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The in-memory xenstored (see the [module docs](self)).
///
/// ```no_run
/// use xenstore::{server::Server, Xs};
/// let dir = tempfile::tempdir()?;
/// let server = Server::start(dir.path())?;
/// let sock5 = server.add_domain(5)?;
/// let xs = Xs::connect_unix(&sock5)?;
/// assert_eq!(xs.own_domid()?, 5);
/// server.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// Start a server with the default [`Config`]; sockets will live in
    /// `dir` (created if missing). No domain is served yet: call
    /// [`add_domain`](Self::add_domain), usually for 0 first.
    pub fn start(dir: &Path) -> Result<Server> {
        Server::start_with(dir, Config::default())
    }

    /// Start a server with a given configuration.
    pub fn start_with(dir: &Path, config: Config) -> Result<Server> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Open {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Server {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                state: Mutex::new(State::new(config.clone())),
                config,
                listeners: Mutex::new(HashMap::new()),
                threads: Mutex::new(Vec::new()),
                next_conn: AtomicU64::new(1),
                stopped: AtomicBool::new(false),
            }),
        })
    }

    /// The socket path of domain `dom`: `<dir>/<dom>.sock`.
    pub fn socket_path(&self, dom: DomId) -> PathBuf {
        self.inner.dir.join(format!("{dom}.sock"))
    }

    /// Serve domain `dom`: create its socket and, like the toolstack,
    /// `/local/domain/<dom>` (`n0 r<dom>`; `n0` for dom0) with `domid` and
    /// `name` (inherited perms) and `data` (`n<dom>`: owned by the domain,
    /// no access for others); then fire `@introduceDomain`. Returns the
    /// socket path.
    pub fn add_domain(&self, dom: DomId) -> Result<PathBuf> {
        if self.inner.stopped.load(Ordering::SeqCst) {
            return Err(Error::Disconnected { op: "add_domain" });
        }
        let path = self.socket_path(dom);
        let mut listeners = lock(&self.inner.listeners);
        if listeners.contains_key(&dom) {
            return Err(Error::Xs {
                op: "add_domain",
                path: dom.to_string(),
                errno: Errno::EEXIST,
            });
        }
        // A stale socket of an earlier run would make bind fail.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&path);
        }
        let io = |op| move |source| Error::Io { op, source };
        let listener = UnixListener::bind(&path).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(io("set socket non-blocking"))?;
        let (wake, wake_rx) = UnixStream::pair().map_err(io("socketpair"))?;
        lock(&self.inner.state).add_domain(dom);
        let inner = Arc::clone(&self.inner);
        let thread = std::thread::Builder::new()
            .name(format!("xs-accept-{dom}"))
            .spawn(move || accept_loop(&inner, dom, &listener, &wake_rx))
            .map_err(io("spawn accept thread"))?;
        listeners.insert(
            dom,
            Listener {
                path: path.clone(),
                wake,
                thread: Some(thread),
            },
        );
        Ok(path)
    }

    /// Stop serving domain `dom`: remove its socket, close its connections,
    /// remove `/local/domain/<dom>` and fire `@releaseDomain`.
    pub fn remove_domain(&self, dom: DomId) -> Result<()> {
        let listener = lock(&self.inner.listeners).remove(&dom);
        let Some(l) = listener else {
            return Err(Error::Xs {
                op: "remove_domain",
                path: dom.to_string(),
                errno: Errno::ENOENT,
            });
        };
        stop_listener(l);
        lock(&self.inner.state).remove_domain(dom);
        Ok(())
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Stop everything: remove all sockets, close all connections, join all
    /// threads. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let listeners: Vec<Listener> = lock(&self.inner.listeners)
            .drain()
            .map(|(_, l)| l)
            .collect();
        for l in listeners {
            stop_listener(l);
        }
        lock(&self.inner.state).kill_all();
        let threads: Vec<JoinHandle<()>> = lock(&self.inner.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn stop_listener(mut l: Listener) {
    let _ = l.wake.shutdown(std::net::Shutdown::Both);
    if let Some(t) = l.thread.take() {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(&l.path);
}

fn accept_loop(inner: &Arc<Inner>, dom: DomId, listener: &UnixListener, wake: &UnixStream) {
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        if fds[1].any().unwrap_or(true) {
            return; // woken: stop
        }
        match listener.accept() {
            Ok((stream, _)) => spawn_connection(inner, dom, stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                // e.g. EMFILE: back off instead of spinning
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn spawn_connection(inner: &Arc<Inner>, dom: DomId, stream: UnixStream) {
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let (Ok(writer), Ok(killer)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) =
        sync_channel::<Vec<u8>>(inner.config.limits.max_queued_messages.clamp(1, 1 << 20));
    {
        let mut st = lock(&inner.state);
        if !st.is_served(dom) {
            return;
        }
        st.add_conn(id, dom, Outbox::new(tx, Some(killer)));
    }
    let mut threads = lock(&inner.threads);
    threads.retain(|t| !t.is_finished());
    let w = std::thread::Builder::new()
        .name(format!("xs-write-{dom}-{id}"))
        .spawn(move || {
            use std::io::Write;
            for bytes in rx {
                if (&writer).write_all(&bytes).is_err() {
                    let _ = writer.shutdown(std::net::Shutdown::Both);
                    break;
                }
            }
        });
    let inner2 = Arc::clone(inner);
    let r = std::thread::Builder::new()
        .name(format!("xs-read-{dom}-{id}"))
        .spawn(move || read_loop(&inner2, id, &stream));
    match (w, r) {
        (Ok(w), Ok(r)) => {
            threads.push(w);
            threads.push(r);
        }
        (w, r) => {
            lock(&inner.state).remove_conn(id);
            threads.extend(w.ok());
            threads.extend(r.ok());
        }
    }
}

/// Read requests until EOF, an error, or a framing violation (oversized
/// payload → the connection is dropped, like xenstored).
fn read_loop(inner: &Arc<Inner>, id: ConnId, stream: &UnixStream) {
    let mut fr = FrameReader::new();
    let mut buf = [0u8; HEADER_LEN + PAYLOAD_MAX];
    'conn: loop {
        loop {
            match fr.next_message() {
                Ok(Some(m)) => lock(&inner.state).handle(id, &m),
                Ok(None) => break,
                Err(_) => break 'conn,
            }
        }
        let n = fr.wanted().min(buf.len());
        match (&*stream).read(&mut buf[..n]) {
            Ok(0) => break,
            Ok(got) => fr.feed(&buf[..got]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    lock(&inner.state).remove_conn(id);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
