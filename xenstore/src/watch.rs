//! Watches on their own connection: [`Watcher`] and [`WatchEvent`].

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::transport::{Conn, Stream, Wait};
use crate::wire::{MsgType, nul_terminated, parse_ok_reply};

/// One watch event: the path that changed (relative if the watch was
/// registered with a relative path) and the watch's token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    /// The changed path (or the watched path itself for the event sent at
    /// registration, or a special path such as `@releaseDomain`).
    pub path: String,
    /// The token given to [`Watcher::watch`].
    pub token: String,
}

/// A connection dedicated to watches, so that events never interleave with
/// the replies of an [`Xs`](crate::Xs).
///
/// Registering a watch fires one event at once; events may be spurious, so
/// the reaction to an event is always to re-read the state.
///
/// Poll-driven use: wait for `POLLIN` on [`as_fd`](AsFd::as_fd), then call
/// [`try_next_event`](Self::try_next_event) **until it returns `None`**:
/// events that arrived while a [`watch`](Self::watch) call waited for its
/// reply are queued in user space, where `poll` cannot see them (so also
/// drain once after each `watch`).
///
/// The connection is behind a mutex: a thread blocked in
/// [`next_event`](Self::next_event) holds it, and a concurrent `watch` waits
/// until that event arrives. Use one thread per watcher.
///
/// ```no_run
/// use xenstore::Watcher;
/// let w = Watcher::open()?;
/// w.watch("/local/domain/5/data/vchan/0/512/event-channel", "ec")?;
/// let first = w.next_event()?; // the registration event
/// assert_eq!(first.token, "ec");
/// # Ok::<(), xenstore::Error>(())
/// ```
#[derive(Debug)]
pub struct Watcher {
    conn: Conn,
}

impl Watcher {
    /// Connect with the same rules as [`Xs::open`](crate::Xs::open).
    pub fn open() -> Result<Watcher> {
        Ok(Watcher::from_stream(Stream::open_default()?))
    }

    /// Connect to a xenstored unix socket.
    pub fn connect_unix(path: &Path) -> Result<Watcher> {
        Ok(Watcher::from_stream(Stream::connect_unix(path)?))
    }

    /// Open a xenbus device such as `/dev/xen/xenbus`.
    pub fn open_device(path: &Path) -> Result<Watcher> {
        Ok(Watcher::from_stream(Stream::open_device(path)?))
    }

    fn from_stream(s: Stream) -> Watcher {
        Watcher {
            conn: Conn::new(s, true),
        }
    }

    /// Limit how long `watch`/`unwatch` wait for their reply (default:
    /// forever). On expiry the connection is unusable afterwards.
    pub fn set_reply_timeout(&self, timeout: Option<Duration>) {
        self.conn.set_reply_timeout(timeout);
    }

    fn request(&self, ty: MsgType, path: &str, token: &str) -> Result<()> {
        if path.is_empty() || path.contains('\0') || token.contains('\0') {
            return Err(Error::invalid(format!(
                "bad watch path {path:?} or token {token:?}"
            )));
        }
        let payload = nul_terminated(&[path.as_bytes(), token.as_bytes()]);
        let reply = self.conn.request(ty, 0, payload, path)?;
        parse_ok_reply(ty.name(), &reply).inspect_err(|_| self.conn.poison())
    }

    /// WATCH `path` with `token`. The daemon fires one event for `path` at
    /// once. A watch on a missing node is legal; `@releaseDomain` and
    /// `@introduceDomain` are special paths.
    pub fn watch(&self, path: &str, token: &str) -> Result<()> {
        self.request(MsgType::Watch, path, token)
    }

    /// UNWATCH a watch registered with the same path and token. Events
    /// already queued are still delivered.
    pub fn unwatch(&self, path: &str, token: &str) -> Result<()> {
        self.request(MsgType::Unwatch, path, token)
    }

    /// Block until the next event.
    pub fn next_event(&self) -> Result<WatchEvent> {
        loop {
            if let Some(ev) = self.conn.next_event(Wait::Forever)? {
                return Ok(ev);
            }
        }
    }

    /// Wait at most `timeout` for the next event.
    pub fn next_event_timeout(&self, timeout: Duration) -> Result<Option<WatchEvent>> {
        let wait = match Instant::now().checked_add(timeout) {
            Some(t) => Wait::Until(t),
            None => Wait::Forever,
        };
        self.conn.next_event(wait)
    }

    /// The next event if one is queued or can be read without blocking.
    /// A partially received event stays buffered for the next call.
    pub fn try_next_event(&self) -> Result<Option<WatchEvent>> {
        self.conn.next_event(Wait::Now)
    }

    /// Events queued in user space (invisible to `poll`).
    pub fn queued_events(&self) -> usize {
        self.conn.queued_events()
    }
}

impl AsFd for Watcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.stream().as_fd()
    }
}
