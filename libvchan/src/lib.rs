// Why this file is long (~1280 lines): it is the whole C ABI of Qubes'
// libvchan (16 entry points, each with its errno contract and SAFETY
// comments, ~340 lines of docs and comments), the handle registry every
// entry point goes through, and ~80 lines of unit tests. Xen's libxenvchan
// ABI is in xenvchan.rs.
//! Qubes' `libvchan` C API and ABI on the pure-Rust [`vchan`] crate, so
//! that existing C programs (`qrexec-agent`, `qrexec-daemon`, the GUI
//! agent, `qubesdb`, …) run on it unchanged.
//!
//! # One library, both upstream names
//!
//! Qubes ships the API twice: `libvchan-xen` (qubes-core-vchan-xen, on Xen's
//! C libxenvchan; soname `libvchan-xen.so.1`, pkg-config `vchan-xen`, also
//! installed as `vchan`) and `libvchan-socket` (qubes-core-vchan-socket, over
//! Unix sockets for tests; no soname, pkg-config `vchan-socket`). This crate
//! builds **one** library that picks the transport at each `*_init` call
//! the way our own tools do ([`vchan::Transport::from_env`]):
//! `VCHAN_SOCKET_DIR` set → the socket transport (wire-compatible with
//! libvchan-socket, own domain from `VCHAN_DOMAIN`), `VCHAN_LOCAL_DIR` set →
//! the same-host Local transport, else real Xen. `cargo xtask libvchan
//! install --prefix DIR` installs it under both upstream names
//! (`libvchan-xen.so.1` with `libvchan-xen.so` and `libvchan-socket.so`
//! pointing at it), with `vchan-xen.pc`, `vchan.pc`, `vchan-socket.pc` and
//! our header `libvchan.h` in `include/vchan-xen` and `include/vchan-socket`.
//!
//! Why one library: the transports are one code path in [`vchan::Vchan`]
//! already, so two builds would differ only in a default; one file is one
//! thing to test, and a program built for the socket flavour runs on Xen (or
//! the reverse) by changing the environment, not the binary. The soname is
//! upstream's `libvchan-xen.so.1` (see `build.rs`): a program linked with
//! `-lvchan-socket` against ours therefore records `NEEDED
//! libvchan-xen.so.1`, which the install provides; programs linked against
//! upstream's libvchan-socket record `libvchan-socket.so`, which it
//! provides too.
//!
//! # Semantics
//!
//! Return values and the blocking flag follow libvchan-xen, which passes
//! libxenvchan's through (docs/vchan.md §5.6, §11.1): `write` in blocking mode writes
//! everything, non-blocking what fits (0 if nothing); `send`/`recv` are all
//! or nothing (0 in non-blocking mode when it would wait); `read` returns
//! what is there, data left after the peer closed included, and −1 once the
//! ring is empty and the peer gone; `is_open` is 0 / 1 / 2
//! (`VCHAN_DISCONNECTED` / `VCHAN_CONNECTED` / `VCHAN_WAITING`). A server
//! may write before its client connects (the data waits for it) and its
//! blocking reads wait for the client. Ring sizes: libxenvchan's on Xen and
//! the Local transport (1024, 2048, then powers of two from 4096);
//! libvchan-socket's on the socket transport (at least 4096: a page).
//!
//! Where this library deliberately differs from the C one (bad input gets an
//! error return instead of a crash or a hang):
//!
//! * a NULL or already closed handle: −1 (`is_open`: 0) with `errno =
//!   EBADF` and a line on stderr, where the C library dereferences it;
//! * NULL data with a non-zero size: −1, `EINVAL`;
//! * `send`/`recv` larger than the ring: −1, `EINVAL` in both modes (the C
//!   library returns 0 forever in non-blocking mode);
//! * `libvchan_set_blocking` before an async client connected: ignored with
//!   a log line (the C library calls `abort()`);
//! * an invalid domain (outside `0..0x7FF0`), a negative port, or a ring
//!   size above 1 MiB: `NULL` from the `*_init` calls with `EINVAL`, for the
//!   server too (the C library checks these for the async client only);
//! * a `read` of size 0 returns 0 at once (libxenvchan blocks until data);
//! * a blocking `write` that the peer's close interrupts after part of the
//!   data went out returns that count; the next call returns −1 (`EPIPE`);
//! * `data_ready`/`buffer_space` on a ring the peer corrupted: −1
//!   (`EPROTO`) and a log line; once any call has seen the corruption,
//!   every later I/O call and `libvchan_wait` on that handle fails the
//!   same way (a stream `write` that still fits the space the peer had
//!   freed when its index was last valid may succeed before that: it
//!   trusts no index it has not checked);
//! * liveness: `is_open` and the blocking waits use the vchan crate's
//!   checks of the peer domain (event-channel status, domain probe,
//!   xenstore; see the `vchan` crate docs) instead of libvchan-xen's
//!   `xc_evtchn_status` slow check;
//! * on the socket transport: `libvchan_client_init_async` does not block
//!   (libvchan-socket's connects before it returns); a client's rings are
//!   64 KiB (libvchan-socket's: a page); and there is no I/O thread: bytes
//!   move between the socket and our buffers in the library calls, except
//!   that output a server wrote before its client connected is sent by a
//!   helper thread that accepts the client (the vchan crate's socket
//!   transport), so it arrives even if the server makes no further call.
//!
//! No panic crosses into C: every entry point runs under
//! [`std::panic::catch_unwind`] and turns a panic into its error return
//! with `errno = EIO`.
//!
//! `errno` after a −1: `EPIPE` when the peer has closed, `EAGAIN` before an
//! async client has connected, `EINVAL`/`EBADF` for bad arguments, else the
//! OS error of the failing step (or `EIO`, `EPROTO` for a corrupt ring).
//!
//! # The fd for `select`/`poll`
//!
//! On Xen and the Local transport `libvchan_fd_for_select` is the event
//! channel's fd, as in C. On the socket transport it is an epoll fd that
//! stays the same from `server_init` to close and watches two things:
//!
//! * the connection, with the interest [`vchan::Vchan::poll_interest`]
//!   gives (readable data, a hang-up, writability while output is queued in
//!   our buffer);
//! * an eventfd that is kept readable from the moment any call moved bytes
//!   between the socket and our buffers (or saw the client connect or the
//!   peer leave) until the next `libvchan_wait`, which then returns at once
//!   ([`vchan::Vchan::take_socket_news`]). Any call takes in what arrived:
//!   without this a program that asks `libvchan_data_ready` or
//!   `libvchan_buffer_space` and then sleeps on the fd would sleep on data
//!   already in our buffer, which the socket no longer shows (qrexec's
//!   loops did, for their whole poll timeout). This is the event channel's
//!   behaviour (pending from the peer's notify until the wait), and
//!   libvchan-socket's, whose I/O thread writes a pipe for each move.
//!
//! Threads: like the C library, one handle is used by one thread at a time.

use std::ffi::{c_int, c_void};
use std::fmt;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use vchan::{Connecting, State, Transport, Vchan};

pub mod xenvchan;

/// `libvchan_is_open`: the peer has closed or its domain is gone.
pub const VCHAN_DISCONNECTED: c_int = 0;
/// `libvchan_is_open`: both ends are connected.
pub const VCHAN_CONNECTED: c_int = 1;
/// `libvchan_is_open`: the server waits for its client, or an async client
/// for its server.
pub const VCHAN_WAITING: c_int = 2;

/// The smallest ring of libvchan-socket (a page), which programs and tests
/// written for it count on.
const SOCKET_RING_MIN: usize = 4096;

/// Domain ids at and above this are reserved (`DOMID_FIRST_RESERVED`).
const DOMID_FIRST_RESERVED: c_int = 0x7FF0;

/// The handle C programs hold as `libvchan_t *` (an opaque `struct
/// libvchan`).
#[derive(Debug)]
pub struct LibVchan {
    conn: Conn,
    /// The socket transport's stable fd for `select`, made on first request.
    socket_poll: Option<SocketPoll>,
    /// A call found the ring corrupted by the peer: every I/O call fails
    /// from then on (the writer's fast path trusts its last valid look at
    /// the peer's index and would not notice by itself).
    corrupt: bool,
}

#[derive(Debug)]
enum Conn {
    /// An async client that has not connected yet.
    Connecting {
        conn: Connecting,
        /// The socket transport retries on a timer: this fd turns readable
        /// when the next attempt is due (its `Connecting` fd never does).
        timer: Option<TimerFd>,
        /// The delay before the next attempt on that timer.
        backoff: Backoff,
    },
    Ready(Vchan),
}

/// The socket transport's fd for `select` (module docs): an epoll fd over
/// the connection fd (the listener, then the accepted stream) with the
/// changing interest, and over `news`, readable while `pending`.
#[derive(Debug)]
struct SocketPoll {
    epoll: Epoll,
    /// The connection fd registered last.
    registered: Option<Registered>,
    /// Readable from the first call that took news in until `libvchan_wait`.
    news: EventFd,
    pending: bool,
}

impl SocketPoll {
    fn new() -> io::Result<SocketPoll> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let news = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        epoll.add(&news, EpollEvent::new(EpollFlags::EPOLLIN, 1))?;
        Ok(SocketPoll {
            epoll,
            registered: None,
            news,
            pending: false,
        })
    }

    /// A call took news in: readable until the next wait.
    fn raise(&mut self) -> io::Result<()> {
        if !self.pending {
            self.news.write(1)?;
            self.pending = true;
        }
        Ok(())
    }

    /// A wait consumed the news.
    fn lower(&mut self) {
        if self.pending {
            // Never blocks (EFD_NONBLOCK); the counter was non-zero.
            let _ = self.news.read();
            self.pending = false;
        }
    }

    fn refresh(&mut self, v: &Vchan) -> io::Result<()> {
        let fd = v.as_fd();
        let p = v.poll_interest();
        let mut want = EpollFlags::empty();
        for (pf, ef) in [
            (PollFlags::POLLIN, EpollFlags::EPOLLIN),
            (PollFlags::POLLOUT, EpollFlags::EPOLLOUT),
            (
                PollFlags::from_bits_retain(libc::POLLRDHUP),
                EpollFlags::EPOLLRDHUP,
            ),
        ] {
            if p.contains(pf) {
                want |= ef;
            }
        }
        // The same connection as last time? Compare the number and the
        // file behind it: a closed listener's number can come back as the
        // accepted stream's.
        let st = nix::sys::stat::fstat(fd)?;
        let id = (fd.as_raw_fd(), st.st_dev, st.st_ino);
        let ev = EpollEvent::new(want, 0);
        if let Some(r) = self.registered.as_mut().filter(|r| r.id == id) {
            if r.want == want {
                return Ok(());
            }
            if want.is_empty() {
                // Nothing to wait for (the end of the stream was seen): out
                // of the set, or epoll would report the hang-up forever and
                // a caller's ppoll would never sleep (nor deliver signals).
                self.epoll.delete(&r.dup)?;
            } else if r.want.is_empty() {
                self.epoll.add(&r.dup, ev)?;
            } else {
                self.epoll.modify(&r.dup, &mut { ev })?;
            }
            r.want = want;
            return Ok(());
        }
        // A new connection fd (the accepted stream after the listener):
        // the old one leaves the set explicitly, through our copy of it. Its
        // own closing would not do: a child the program forked holds it
        // too, and epoll drops a file only when its last holder closes it
        // (a stale, readable entry then kept the fd readable for good).
        if let Some(old) = self.registered.take()
            && !old.want.is_empty()
        {
            self.epoll.delete(&old.dup)?;
        }
        let dup = fd.try_clone_to_owned()?;
        if !want.is_empty() {
            self.epoll.add(&dup, ev)?;
        }
        self.registered = Some(Registered { id, dup, want });
        Ok(())
    }
}

/// The connection fd in the epoll set: which one (number, device, inode),
/// our copy of it (registered in its place, so that we can always take it
/// out), and with which interest (empty: not in the set).
#[derive(Debug)]
struct Registered {
    id: (RawFd, libc::dev_t, libc::ino_t),
    dup: std::os::fd::OwnedFd,
    want: EpollFlags,
}

impl LibVchan {
    fn ready(vchan: Vchan) -> LibVchan {
        LibVchan {
            conn: Conn::Ready(vchan),
            socket_poll: None,
            corrupt: false,
        }
    }

    /// After every call that may have moved data or changed the state: keep
    /// the socket transport's select fd in step (news the call took in
    /// makes it readable until the next wait).
    fn after(&mut self) {
        if let (Conn::Ready(v), Some(sp)) = (&mut self.conn, self.socket_poll.as_mut()) {
            let r = if v.take_socket_news() {
                sp.raise()
            } else {
                Ok(())
            };
            if let Err(e) = r.and_then(|()| sp.refresh(v)) {
                log("fd_for_select", format_args!("epoll update failed: {e}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The FFI boundary: handle registry, errno, logging, panics.

/// The handles of one kind given out and not yet closed, so that a NULL,
/// stale or foreign pointer is refused instead of dereferenced.
pub(crate) struct Registry(Mutex<Vec<usize>>);

impl Registry {
    const fn new() -> Registry {
        Registry(Mutex::new(Vec::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Boxes `h` and records the pointer C gets.
    pub(crate) fn register<T>(&self, h: T) -> *mut T {
        let p = Box::into_raw(Box::new(h));
        self.lock().push(p as usize);
        p
    }

    /// The handle behind `ctrl` if it is one we gave out and did not free.
    ///
    /// # Safety
    /// `ctrl` was registered here with type `T` (if registered at all), and
    /// no other reference to the handle is live: the C contract (one thread
    /// per handle) guarantees it.
    pub(crate) unsafe fn get<'a, T>(&self, ctrl: *mut T, op: &str) -> Option<&'a mut T> {
        if ctrl.is_null() {
            log(op, "NULL handle");
            set_errno(libc::EBADF);
            return None;
        }
        if !self.lock().contains(&(ctrl as usize)) {
            log(op, format_args!("{ctrl:p} is not an open vchan"));
            set_errno(libc::EBADF);
            return None;
        }
        // The pointer came from `register` (Box::into_raw) with type T and
        // was not yet freed by `free` (it is still recorded).
        // SAFETY: so it points to a valid T; the caller guarantees exclusive use.
        Some(unsafe { &mut *ctrl })
    }

    /// Forgets and frees the handle behind `ctrl`; logged and ignored if
    /// it is NULL or not one of ours.
    ///
    /// # Safety
    /// `ctrl` was registered here with type `T` (if registered at all) and
    /// is not in use by another thread.
    pub(crate) unsafe fn free<T>(&self, ctrl: *mut T, op: &str) {
        if ctrl.is_null() {
            log(op, "NULL handle");
            set_errno(libc::EBADF);
            return;
        }
        {
            let mut l = self.lock();
            let Some(i) = l.iter().position(|&p| p == ctrl as usize) else {
                drop(l);
                log(op, format_args!("{ctrl:p} is not an open vchan"));
                set_errno(libc::EBADF);
                return;
            };
            l.swap_remove(i);
        }
        // The pointer was recorded, so it came from Box::into_raw in
        // `register` with type T and has not been freed.
        // SAFETY: removing it from the record first makes this the only free.
        drop(unsafe { Box::from_raw(ctrl) });
    }
}

/// The Qubes API's handles.
static LIVE: Registry = Registry::new();

fn register(h: LibVchan) -> *mut LibVchan {
    LIVE.register(h)
}

/// The Qubes handle behind `ctrl`, if it is an open one.
///
/// # Safety
/// As [`Registry::get`].
unsafe fn handle<'a>(ctrl: *mut LibVchan, op: &str) -> Option<&'a mut LibVchan> {
    // SAFETY: only LibVchan pointers are registered in LIVE; exclusive use is the caller's.
    unsafe { LIVE.get(ctrl, op) }
}

fn set_errno(e: c_int) {
    nix::errno::Errno::set_raw(e);
}

/// One line on stderr, never a panic (stderr may be closed).
fn log(op: &str, msg: impl fmt::Display) {
    let _ = writeln!(io::stderr().lock(), "libvchan: {op}: {msg}");
}

/// Runs an entry point's body; a panic becomes `on_panic` with `EIO`.
fn guard<T>(op: &'static str, on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            log(op, "internal error (panic caught at the C boundary)");
            set_errno(libc::EIO);
            on_panic
        }
    }
}

/// The errno for an error of the vchan crate.
fn errno_of(e: &vchan::Error) -> c_int {
    use vchan::Error as E;
    use vchan::ring::RingError as R;
    let os = |s: &io::Error| s.raw_os_error().unwrap_or(libc::EIO);
    match e {
        E::Io { source, .. } => os(source),
        E::Evtchn { .. } => libc::EIO,
        E::Ring(R::Corrupt { .. }) | E::Peer { .. } => libc::EPROTO,
        E::Ring(R::PeerClosed) | E::PeerClosed => libc::EPIPE,
        E::Ring(R::Closed) => libc::EBADF,
        E::Ring(R::TooBig { .. }) | E::Config { .. } => libc::EINVAL,
        E::Ring(R::WouldBlock) | E::WouldBlock => libc::EAGAIN,
        E::Ring(R::TimedOut) | E::Timeout { .. } => libc::ETIMEDOUT,
        E::Ring(R::Event(source)) => os(source),
        E::Loopback { .. } => libc::EOPNOTSUPP,
        E::PeerGone { .. } => libc::ECONNABORTED,
        E::NotConnected => libc::ENOTCONN,
        _ => libc::EIO,
    }
}

/// Sets errno for `e`, logs it unless it is an ordinary outcome (peer
/// closed, would block), and returns −1.
fn fail(op: &str, e: &vchan::Error) -> c_int {
    if !matches!(e, vchan::Error::PeerClosed | vchan::Error::WouldBlock) {
        log(op, e);
    }
    set_errno(errno_of(e));
    -1
}

/// Whether `e` says the peer corrupted the ring.
fn is_corrupt(e: &vchan::Error) -> bool {
    errno_of(e) == libc::EPROTO
}

impl LibVchan {
    /// −1 (`EPROTO`) with a log line if an earlier call found the ring
    /// corrupted: a peer that lied once is not trusted again.
    fn refused(&self, op: &str) -> Option<c_int> {
        if !self.corrupt {
            return None;
        }
        log(op, "refused: the peer corrupted the ring earlier");
        set_errno(libc::EPROTO);
        Some(-1)
    }
}

fn invalid(op: &str, msg: impl fmt::Display) -> c_int {
    log(op, msg);
    set_errno(libc::EINVAL);
    -1
}

fn transport(op: &str) -> Option<Transport> {
    match Transport::from_env() {
        Ok(t) => Some(t),
        Err(e) => {
            invalid(op, e);
            None
        }
    }
}

/// Checks a peer domain and port as the C library's async client does.
fn check_peer(op: &str, domain: c_int, port: c_int) -> Option<(vchan::DomId, u32)> {
    if !(0..DOMID_FIRST_RESERVED).contains(&domain) {
        invalid(op, format_args!("invalid peer domain id {domain}"));
        return None;
    }
    if port < 0 {
        invalid(op, format_args!("invalid port {port}"));
        return None;
    }
    Some((domain as vchan::DomId, port as u32))
}

/// A C int from a byte count (counts never exceed a 1 MiB ring, but clamp).
fn count(n: usize) -> c_int {
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

/// The largest transfer one call does: the result must fit the C int.
const MAX_IO: usize = c_int::MAX as usize;

// ---------------------------------------------------------------------------
// Setup.

/// Creates a server for a client in `domain` on `port` with rings of at
/// least `read_min` / `write_min` bytes, and returns at once (the client
/// connects later; `libvchan_is_open` says 2 until then). NULL on error.
///
/// # Safety
/// Callable from C with any arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_server_init(
    domain: c_int,
    port: c_int,
    read_min: usize,
    write_min: usize,
) -> *mut LibVchan {
    const OP: &str = "libvchan_server_init";
    guard(OP, std::ptr::null_mut(), || {
        let Some((peer, port)) = check_peer(OP, domain, port) else {
            return std::ptr::null_mut();
        };
        if read_min > vchan::MAX_RING_SIZE || write_min > vchan::MAX_RING_SIZE {
            invalid(
                OP,
                format_args!(
                    "ring sizes {read_min}/{write_min}: at most {} bytes each",
                    vchan::MAX_RING_SIZE
                ),
            );
            return std::ptr::null_mut();
        }
        let Some(t) = transport(OP) else {
            return std::ptr::null_mut();
        };
        // libvchan-socket's rings are at least a page; on Xen the sizes are
        // libxenvchan's (1024 and 2048 fit in the control page).
        let (read_min, write_min) = match t {
            Transport::Socket { .. } => (
                read_min.max(SOCKET_RING_MIN),
                write_min.max(SOCKET_RING_MIN),
            ),
            _ => (read_min, write_min),
        };
        match Vchan::server(&t, peer, port, read_min, write_min) {
            Ok(v) => register(LibVchan::ready(v)),
            Err(e) => {
                fail(OP, &e);
                std::ptr::null_mut()
            }
        }
    })
}

/// Connects to the server in `domain` on `port`, waiting as long as it
/// takes for the server to appear (ends early with NULL if the peer domain
/// is gone or on another error).
///
/// # Safety
/// Callable from C with any arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_client_init(domain: c_int, port: c_int) -> *mut LibVchan {
    const OP: &str = "libvchan_client_init";
    guard(OP, std::ptr::null_mut(), || {
        let Some((peer, port)) = check_peer(OP, domain, port) else {
            return std::ptr::null_mut();
        };
        let Some(t) = transport(OP) else {
            return std::ptr::null_mut();
        };
        let mut c = match Vchan::client_start(&t, peer, port) {
            Ok(c) => c,
            Err(e) => {
                fail(OP, &e);
                return std::ptr::null_mut();
            }
        };
        let mut backoff = c.retry_interval().map(Backoff::new);
        loop {
            match c.poll() {
                Ok(Some(v)) => return register(LibVchan::ready(v)),
                Ok(None) => {}
                Err(e) => {
                    fail(OP, &e);
                    return std::ptr::null_mut();
                }
            }
            // Whole milliseconds for poll: the first steps sleep below.
            let timeout = match backoff.as_mut().map(Backoff::step) {
                Some(d) if d < Duration::from_millis(1) => {
                    std::thread::sleep(d);
                    continue;
                }
                Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
                None => PollTimeout::NONE,
            };
            let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    log(OP, format_args!("poll: {e}"));
                    set_errno(e as c_int);
                    return std::ptr::null_mut();
                }
            }
        }
    })
}

/// Starts a client connect without blocking: stores in `*watch_fd` an fd
/// to wait on (readable when [`libvchan_client_init_async_finish`] should
/// be called). NULL on error.
///
/// # Safety
/// `watch_fd` must be NULL or point to a writable `int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_client_init_async(
    domain: c_int,
    port: c_int,
    watch_fd: *mut c_int,
) -> *mut LibVchan {
    const OP: &str = "libvchan_client_init_async";
    guard(OP, std::ptr::null_mut(), || {
        if watch_fd.is_null() {
            invalid(OP, "NULL watch_fd");
            return std::ptr::null_mut();
        }
        let Some((peer, port)) = check_peer(OP, domain, port) else {
            return std::ptr::null_mut();
        };
        let Some(t) = transport(OP) else {
            return std::ptr::null_mut();
        };
        let conn = match Vchan::client_start(&t, peer, port) {
            Ok(c) => c,
            Err(e) => {
                fail(OP, &e);
                return std::ptr::null_mut();
            }
        };
        let timer = match conn.retry_interval() {
            None => None,
            // The first attempt is due at once.
            Some(_) => match retry_timer(Duration::from_nanos(1)) {
                Ok(t) => Some(t),
                Err(e) => {
                    log(OP, format_args!("timerfd: {e}"));
                    set_errno(e as c_int);
                    return std::ptr::null_mut();
                }
            },
        };
        let fd = match &timer {
            Some(t) => t.as_fd().as_raw_fd(),
            None => conn.as_fd().as_raw_fd(),
        };
        // SAFETY: checked non-NULL above; the caller passes a writable int.
        unsafe { watch_fd.write(fd) };
        register(LibVchan {
            conn: Conn::Connecting {
                backoff: Backoff::new(conn.retry_interval().unwrap_or_default()),
                conn,
                timer,
            },
            socket_poll: None,
            corrupt: false,
        })
    })
}

/// Retry delays of a socket client waiting for its server: from 100 µs
/// (libvchan-socket retries every 100 µs: its 100 "ms" go into
/// `tv_nsec * 1000`), doubling up to the transport's interval (100 ms), so
/// a server that appears right after the client costs no visible latency
/// (a flat 100 ms made each qrexec call ~80 ms slower than on upstream's
/// library) and one that takes long costs no busy loop.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_micros(100).min(max),
            max,
        }
    }

    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

fn retry_timer(after: Duration) -> nix::Result<TimerFd> {
    let t = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )?;
    t.set(
        Expiration::OneShot(TimeSpec::from(after)),
        TimerSetTimeFlags::empty(),
    )?;
    Ok(t)
}

/// Continues an async connect when its watch fd is readable: 0 once
/// connected (then the watch fd is closed), 1 to wait for the watch fd
/// again, −1 on error (call `libvchan_close`). `blocking` is the I/O mode
/// of the connected vchan.
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, used by one thread
/// at a time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_client_init_async_finish(
    ctrl: *mut LibVchan,
    blocking: bool,
) -> c_int {
    const OP: &str = "libvchan_client_init_async_finish";
    guard(OP, -1, || {
        // SAFETY: the C contract: one thread per handle.
        let Some(h) = (unsafe { handle(ctrl, OP) }) else {
            return -1;
        };
        let Conn::Connecting {
            conn,
            timer,
            backoff,
        } = &mut h.conn
        else {
            return 0;
        };
        if let Some(t) = timer {
            let mut expirations = [0u8; 8];
            let _ = nix::unistd::read(t.as_fd(), &mut expirations);
        }
        match conn.poll() {
            Ok(Some(mut v)) => {
                v.set_blocking(blocking);
                h.conn = Conn::Ready(v);
                0
            }
            Ok(None) => {
                if let Some(t) = timer
                    && let Err(e) = t.set(
                        Expiration::OneShot(TimeSpec::from(backoff.step())),
                        TimerSetTimeFlags::empty(),
                    )
                {
                    log(OP, format_args!("timerfd: {e}"));
                    set_errno(e as c_int);
                    return -1;
                }
                1
            }
            Err(e) => fail(OP, &e),
        }
    })
}

/// Closes the vchan (the peer sees it closed) and frees the handle. A NULL
/// or unknown handle is logged and ignored.
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, not used by another
/// thread during or after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_close(ctrl: *mut LibVchan) {
    const OP: &str = "libvchan_close";
    guard(OP, (), || {
        // The caller does not use the handle elsewhere during or after this call.
        // SAFETY: only LibVchan pointers are registered in LIVE.
        unsafe { LIVE.free(ctrl, OP) }
    })
}

// ---------------------------------------------------------------------------
// I/O.

/// Which way an I/O call goes and how much it must move.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Io {
    /// Stream: what fits / what is there.
    Stream,
    /// Packet: all or nothing.
    Packet,
}

fn do_write(op: &str, h: &mut LibVchan, data: *const c_void, size: usize, kind: Io) -> c_int {
    if data.is_null() && size > 0 {
        return invalid(op, "NULL data");
    }
    if let Some(r) = h.refused(op) {
        return r;
    }
    let Conn::Ready(v) = &mut h.conn else {
        set_errno(libc::EAGAIN);
        return -1;
    };
    if kind == Io::Packet && size > v.write_ring_size() {
        return invalid(
            op,
            format_args!(
                "{size} bytes do not fit the {}-byte ring",
                v.write_ring_size()
            ),
        );
    }
    let size = size.min(MAX_IO);
    let buf: &[u8] = if size == 0 {
        &[]
    } else {
        // `data` is non-NULL (checked above); the bytes are private memory of
        // the caller, not the shared ring, and live for this call.
        // SAFETY: the caller passes `size` readable bytes at `data`.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size) }
    };
    let r = match kind {
        Io::Stream => v.write_some(buf),
        Io::Packet => v.send(buf),
    };
    let ret = match r {
        Ok(n) => count(n),
        Err(vchan::Error::WouldBlock) => 0,
        Err(e) => {
            h.corrupt |= is_corrupt(&e);
            fail(op, &e)
        }
    };
    h.after();
    ret
}

fn do_read(op: &str, h: &mut LibVchan, data: *mut c_void, size: usize, kind: Io) -> c_int {
    if data.is_null() && size > 0 {
        return invalid(op, "NULL data");
    }
    if let Some(r) = h.refused(op) {
        return r;
    }
    let Conn::Ready(v) = &mut h.conn else {
        set_errno(libc::EAGAIN);
        return -1;
    };
    if kind == Io::Packet && size > v.read_ring_size() {
        return invalid(
            op,
            format_args!(
                "{size} bytes do not fit the {}-byte ring",
                v.read_ring_size()
            ),
        );
    }
    if size == 0 {
        return 0;
    }
    let size = size.min(MAX_IO);
    // `data` is non-NULL (checked above), private to the caller and not
    // aliased during this call.
    // SAFETY: the caller passes `size` writable bytes at `data`.
    let buf = unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), size) };
    let r = match kind {
        Io::Stream => v.read_some(buf),
        Io::Packet => v.recv(buf),
    };
    let ret = match r {
        // A stream read of 0 for a non-empty buffer is the end: the peer
        // closed and nothing is left (the C library's −1).
        Ok(0) => {
            set_errno(libc::EPIPE);
            -1
        }
        Ok(n) => count(n),
        Err(vchan::Error::WouldBlock) => 0,
        Err(e) => {
            h.corrupt |= is_corrupt(&e);
            fail(op, &e)
        }
    };
    h.after();
    ret
}

/// Stream write: blocking mode writes all `size` bytes (waiting for
/// space); non-blocking mode writes what fits now (0 if nothing). −1 if the
/// peer has closed (`EPIPE`) or on error.
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, used by one thread at
/// a time; `data` must point to `size` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_write(
    ctrl: *mut LibVchan,
    data: *const c_void,
    size: usize,
) -> c_int {
    const OP: &str = "libvchan_write";
    guard(OP, -1, || {
        // SAFETY: the C contract: one thread per handle.
        match unsafe { handle(ctrl, OP) } {
            Some(h) => do_write(OP, h, data, size, Io::Stream),
            None => -1,
        }
    })
}

/// Packet send: all `size` bytes or nothing (non-blocking: 0 when they do
/// not fit now). −1 if `size` exceeds the ring (`EINVAL`), if the peer has
/// closed (`EPIPE`) or on error.
///
/// # Safety
/// As [`libvchan_write`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_send(
    ctrl: *mut LibVchan,
    data: *const c_void,
    size: usize,
) -> c_int {
    const OP: &str = "libvchan_send";
    guard(OP, -1, || {
        // SAFETY: the C contract: one thread per handle.
        match unsafe { handle(ctrl, OP) } {
            Some(h) => do_write(OP, h, data, size, Io::Packet),
            None => -1,
        }
    })
}

/// Stream read: up to `size` bytes of what is there (data written before
/// the peer closed included); blocking mode waits for some, non-blocking
/// returns 0. −1 once the peer has closed and nothing is left (`EPIPE`).
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, used by one thread at
/// a time; `data` must point to `size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_read(
    ctrl: *mut LibVchan,
    data: *mut c_void,
    size: usize,
) -> c_int {
    const OP: &str = "libvchan_read";
    guard(OP, -1, || {
        // SAFETY: the C contract: one thread per handle.
        match unsafe { handle(ctrl, OP) } {
            Some(h) => do_read(OP, h, data, size, Io::Stream),
            None => -1,
        }
    })
}

/// Packet receive: exactly `size` bytes or nothing (non-blocking: 0 when
/// fewer are there). −1 if `size` exceeds the ring (`EINVAL`), or if the
/// peer has closed with fewer than `size` bytes left (`EPIPE`).
///
/// # Safety
/// As [`libvchan_read`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_recv(
    ctrl: *mut LibVchan,
    data: *mut c_void,
    size: usize,
) -> c_int {
    const OP: &str = "libvchan_recv";
    guard(OP, -1, || {
        // SAFETY: the C contract: one thread per handle.
        match unsafe { handle(ctrl, OP) } {
            Some(h) => do_read(OP, h, data, size, Io::Packet),
            None => -1,
        }
    })
}

impl LibVchan {
    fn wait(&mut self, op: &str) -> c_int {
        if let Some(r) = self.refused(op) {
            return r;
        }
        let Conn::Ready(v) = &mut self.conn else {
            return 0;
        };
        // News another call took in is this wait's event: no sleep.
        let pending = self.socket_poll.as_ref().is_some_and(|sp| sp.pending);
        let r = if pending {
            v.consume_events()
        } else {
            v.wait()
        };
        let ret = match r {
            Ok(()) => 0,
            Err(e) => {
                self.corrupt |= is_corrupt(&e);
                fail(op, &e)
            }
        };
        // What this wait took in is consumed with it: the program looks
        // at the vchan after a wait.
        v.take_socket_news();
        if let Some(sp) = self.socket_poll.as_mut() {
            sp.lower();
        }
        self.after();
        ret
    }

    fn fd_for_select(&mut self, op: &str) -> c_int {
        let Conn::Ready(v) = &self.conn else {
            set_errno(libc::EAGAIN);
            return -1;
        };
        if !v.is_socket() {
            return v.as_fd().as_raw_fd();
        }
        if self.socket_poll.is_none() {
            // News taken in before the first request stays news (it was
            // kept for this: `after` takes it only once the fd exists).
            match SocketPoll::new() {
                Ok(sp) => self.socket_poll = Some(sp),
                Err(e) => {
                    log(op, format_args!("epoll: {e}"));
                    set_errno(e.raw_os_error().unwrap_or(libc::EIO));
                    return -1;
                }
            }
        }
        self.after();
        self.socket_poll
            .as_ref()
            .map_or(-1, |sp| sp.epoll.0.as_raw_fd())
    }

    fn is_open(&mut self) -> c_int {
        let Conn::Ready(v) = &mut self.conn else {
            return VCHAN_WAITING;
        };
        let ret = match v.state() {
            State::Waiting => VCHAN_WAITING,
            State::Connected => VCHAN_CONNECTED,
            State::Closed => VCHAN_DISCONNECTED,
        };
        self.after();
        ret
    }

    fn data_ready(&mut self, op: &str) -> c_int {
        if let Some(r) = self.refused(op) {
            return r;
        }
        let Conn::Ready(v) = &mut self.conn else {
            return 0;
        };
        // An error here is a ring the peer corrupted: −1 (EPROTO).
        let n = match v.data_ready() {
            Ok(n) => count(n),
            Err(e) => {
                self.corrupt |= is_corrupt(&e);
                fail(op, &e)
            }
        };
        self.after();
        n
    }

    fn buffer_space(&mut self, op: &str) -> c_int {
        if let Some(r) = self.refused(op) {
            return r;
        }
        let Conn::Ready(v) = &mut self.conn else {
            return 0;
        };
        // An error here is a ring the peer corrupted: −1 (EPROTO).
        let n = match v.buffer_space() {
            Ok(n) => count(n),
            Err(e) => {
                self.corrupt |= is_corrupt(&e);
                fail(op, &e)
            }
        };
        self.after();
        n
    }
}

/// Waits for an event (data, space, connect, close) and consumes it: call
/// it when the fd from [`libvchan_fd_for_select`] is readable (then it does
/// not block). 0, or −1 on error; 0 at once before an async client has
/// connected.
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, used by one thread at
/// a time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_wait(ctrl: *mut LibVchan) -> c_int {
    const OP: &str = "libvchan_wait";
    guard(OP, -1, || {
        // SAFETY: the C contract: one thread per handle.
        unsafe { handle(ctrl, OP) }.map_or(-1, |h| h.wait(OP))
    })
}

/// The fd to `select`/`poll` for readability: readable when
/// [`libvchan_wait`] would return at once. −1 (`EAGAIN`) before an async
/// client has connected.
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, used by one thread at
/// a time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_fd_for_select(ctrl: *mut LibVchan) -> c_int {
    const OP: &str = "libvchan_fd_for_select";
    guard(OP, -1, || {
        // SAFETY: the C contract: one thread per handle.
        unsafe { handle(ctrl, OP) }.map_or(-1, |h| h.fd_for_select(OP))
    })
}

/// 1 (`VCHAN_CONNECTED`), 2 (`VCHAN_WAITING`: no client yet, or an async
/// client not yet connected) or 0 (`VCHAN_DISCONNECTED`: the peer closed or
/// its domain is gone; also for a NULL or closed handle).
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, used by one thread at
/// a time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_is_open(ctrl: *mut LibVchan) -> c_int {
    const OP: &str = "libvchan_is_open";
    guard(OP, VCHAN_DISCONNECTED, || {
        // SAFETY: the C contract: one thread per handle.
        unsafe { handle(ctrl, OP) }.map_or(VCHAN_DISCONNECTED, LibVchan::is_open)
    })
}

/// Bytes ready to read now (0 before an async client connected, −1 for a
/// NULL or closed handle).
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, used by one thread at
/// a time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_data_ready(ctrl: *mut LibVchan) -> c_int {
    const OP: &str = "libvchan_data_ready";
    guard(OP, -1, || {
        // SAFETY: the C contract: one thread per handle.
        unsafe { handle(ctrl, OP) }.map_or(-1, |h| h.data_ready(OP))
    })
}

/// Bytes that can be written now without waiting (0 before an async client
/// connected, −1 for a NULL or closed handle).
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, used by one thread at
/// a time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_buffer_space(ctrl: *mut LibVchan) -> c_int {
    const OP: &str = "libvchan_buffer_space";
    guard(OP, -1, || {
        // SAFETY: the C contract: one thread per handle.
        unsafe { handle(ctrl, OP) }.map_or(-1, |h| h.buffer_space(OP))
    })
}

/// Blocking (the default after init) or non-blocking I/O. Before an async
/// client has connected it is ignored with a log line (use the `blocking`
/// argument of [`libvchan_client_init_async_finish`]).
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, used by one thread at
/// a time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libvchan_set_blocking(ctrl: *mut LibVchan, blocking: bool) {
    const OP: &str = "libvchan_set_blocking";
    guard(OP, (), || {
        // SAFETY: the C contract: one thread per handle.
        let Some(h) = (unsafe { handle(ctrl, OP) }) else {
            return;
        };
        match &mut h.conn {
            Conn::Ready(v) => v.set_blocking(blocking),
            Conn::Connecting { .. } => {
                log(OP, "not connected yet: ignored");
                set_errno(libc::EAGAIN);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    #[test]
    fn a_panic_becomes_the_error_return() {
        Errno::clear();
        let r = guard("test", -1, || -> c_int { panic!("boom") });
        assert_eq!(r, -1);
        assert_eq!(Errno::last_raw(), libc::EIO);
        assert_eq!(guard("test", -1, || 7), 7);
    }

    #[test]
    fn errno_for_each_kind_of_failure() {
        use vchan::control::RingId;
        use vchan::ring::{Corruption, RingError};
        let corrupt = vchan::Error::Ring(RingError::Corrupt {
            ring: RingId::Left,
            what: Corruption::Indices {
                prod: 9000,
                cons: 0,
                size: 1024,
            },
        });
        assert_eq!(errno_of(&corrupt), libc::EPROTO);
        assert_eq!(errno_of(&vchan::Error::PeerClosed), libc::EPIPE);
        assert_eq!(
            errno_of(&vchan::Error::Ring(RingError::PeerClosed)),
            libc::EPIPE
        );
        assert_eq!(errno_of(&vchan::Error::WouldBlock), libc::EAGAIN);
        assert_eq!(
            errno_of(&vchan::Error::Loopback { domid: 3 }),
            libc::EOPNOTSUPP
        );
        assert_eq!(
            errno_of(&vchan::Error::Ring(RingError::TooBig { len: 9, ring: 8 })),
            libc::EINVAL
        );
    }

    /// NULL and unknown handles: the error return and EBADF, never a
    /// dereference; close and set_blocking ignore them.
    #[test]
    fn bad_handles() {
        let bogus = 0x1000 as *mut LibVchan;
        for ctrl in [std::ptr::null_mut(), bogus] {
            let mut b = [0u8; 4];
            // The library must refuse these pointers without dereferencing them.
            // SAFETY: NULL or unregistered handles are refused by lookup; `b` is a valid buffer.
            unsafe {
                Errno::clear();
                assert_eq!(libvchan_recv(ctrl, b.as_mut_ptr().cast(), 4), -1);
                assert_eq!(Errno::last_raw(), libc::EBADF);
                assert_eq!(libvchan_write(ctrl, b.as_ptr().cast(), 4), -1);
                assert_eq!(libvchan_client_init_async_finish(ctrl, true), -1);
                assert_eq!(libvchan_fd_for_select(ctrl), -1);
                assert_eq!(libvchan_is_open(ctrl), VCHAN_DISCONNECTED);
                assert_eq!(libvchan_buffer_space(ctrl), -1);
                libvchan_set_blocking(ctrl, false);
                libvchan_close(ctrl);
            }
        }
    }

    #[test]
    fn invalid_setup_arguments() {
        let mut fd = -1;
        // SAFETY: plain values and a valid int pointer.
        unsafe {
            Errno::clear();
            assert!(libvchan_server_init(1, 5, vchan::MAX_RING_SIZE + 1, 1024).is_null());
            assert_eq!(Errno::last_raw(), libc::EINVAL);
            assert!(libvchan_server_init(DOMID_FIRST_RESERVED, 5, 1024, 1024).is_null());
            assert!(libvchan_client_init(1, -2).is_null());
            assert!(libvchan_client_init_async(-1, 5, &mut fd).is_null());
            assert!(libvchan_client_init_async(1, 5, std::ptr::null_mut()).is_null());
        }
        assert_eq!(fd, -1);
    }
}
