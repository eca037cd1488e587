//! The byte stream to xenstored (a unix socket or `/dev/xen/xenbus`) and the
//! synchronous request/reply machinery shared by [`Xs`](crate::Xs) and
//! [`Watcher`](crate::Watcher).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

use crate::WatchEvent;
use crate::error::{Error, Result};
use crate::wire::{
    Escaped, FrameReader, HEADER_LEN, Message, MsgType, PAYLOAD_MAX, parse_error_reply,
    parse_watch_event,
};

/// Default xenstored run directory (`XEN_RUN_STORED`).
pub(crate) const DEFAULT_RUNDIR: &str = "/run/xenstored";
/// The guest device.
pub(crate) const XENBUS_DEVICE: &str = "/dev/xen/xenbus";
/// Watch events an [`Xs`](crate::Xs) connection discards while waiting for
/// one reply before it calls the peer hostile.
const MAX_STRAY_EVENTS: usize = 4096;
/// Watch events a [`Watcher`](crate::Watcher) queues in user space.
const MAX_QUEUED_EVENTS: usize = 4096;

/// The connection: a unix socket or the xenbus device, same framing.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Device(File),
}

impl Stream {
    pub(crate) fn connect_unix(path: &Path) -> Result<Stream> {
        UnixStream::connect(path)
            .map(Stream::Unix)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })
    }

    pub(crate) fn open_device(path: &Path) -> Result<Stream> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(Stream::Device)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })
    }

    /// Like libxenstore's `get_handle`: a socket is connected to, anything
    /// else is opened as the device.
    pub(crate) fn open_path(path: &Path) -> Result<Stream> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        if meta.file_type().is_socket() {
            Stream::connect_unix(path)
        } else {
            Stream::open_device(path)
        }
    }

    /// `XENSTORED_PATH` if set; else `$XENSTORED_RUNDIR/socket` (default
    /// `/run/xenstored/socket`); else `/dev/xen/xenbus`.
    pub(crate) fn open_default() -> Result<Stream> {
        if let Some(p) = std::env::var_os("XENSTORED_PATH") {
            return Stream::open_path(Path::new(&p));
        }
        let rundir = std::env::var_os("XENSTORED_RUNDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNDIR));
        match Stream::open_path(&rundir.join("socket")) {
            Ok(s) => Ok(s),
            Err(_) => Stream::open_path(Path::new(XENBUS_DEVICE)),
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Device(f) => (&*f).read(buf),
        }
    }

    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => (&*s).write_all(buf),
            Stream::Device(f) => (&*f).write_all(buf),
        }
    }

    /// Waits until readable or `until` passes; `Ok(false)` on timeout.
    fn poll_readable(&self, until: Instant) -> io::Result<bool> {
        Ok(xen_base::poll_until(
            self.as_fd(),
            PollFlags::POLLIN,
            Some(until),
        )?)
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Device(f) => f.as_fd(),
        }
    }
}

/// How long a receive may wait for bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    Forever,
    Until(Instant),
    Now,
}

impl Wait {
    fn from_timeout(t: Option<Duration>) -> Wait {
        match t.and_then(|t| Instant::now().checked_add(t)) {
            Some(at) => Wait::Until(at),
            None => Wait::Forever,
        }
    }
}

/// State behind the connection lock.
#[derive(Debug)]
pub(crate) struct ConnState {
    reader: FrameReader,
    next_req_id: u32,
    broken: bool,
    reply_timeout: Option<Duration>,
    /// `Some` for a watcher: events queued in user space.
    events: Option<VecDeque<WatchEvent>>,
}

/// One connection to xenstored with synchronous requests.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: Stream,
    state: Mutex<ConnState>,
}

impl Conn {
    /// `queue_events`: keep watch events (a watcher) or discard them.
    pub(crate) fn new(stream: Stream, queue_events: bool) -> Conn {
        Conn {
            stream,
            state: Mutex::new(ConnState {
                reader: FrameReader::new(),
                next_req_id: 1,
                broken: false,
                reply_timeout: None,
                events: queue_events.then(VecDeque::new),
            }),
        }
    }

    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // A panic while holding the lock cannot leave the state half-updated
        // in a way that matters more than `broken` already covers.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mark the connection unusable (the peer sent something invalid).
    pub(crate) fn poison(&self) {
        self.lock().broken = true;
    }

    pub(crate) fn set_reply_timeout(&self, t: Option<Duration>) {
        self.lock().reply_timeout = t;
    }

    /// Receive one complete message. `Ok(None)`: the wait expired first
    /// (a partial message stays buffered).
    fn recv(&self, st: &mut ConnState, wait: Wait, op: &'static str) -> Result<Option<Message>> {
        let mut buf = [0u8; HEADER_LEN + PAYLOAD_MAX];
        loop {
            match st.reader.next_message() {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => {
                    st.broken = true;
                    return Err(Error::protocol(format!("{op}: {e}")));
                }
            }
            let ready = match wait {
                Wait::Forever => Ok(true),
                Wait::Now => self.stream.poll_readable(Instant::now()),
                Wait::Until(t) => self.stream.poll_readable(t),
            };
            match ready {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(source) => {
                    st.broken = true;
                    return Err(Error::Io { op, source });
                }
            }
            let n = st.reader.wanted().min(buf.len());
            match self.stream.read(&mut buf[..n]) {
                Ok(0) => {
                    st.broken = true;
                    return Err(Error::Disconnected { op });
                }
                Ok(got) => st.reader.feed(&buf[..got]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if matches!(wait, Wait::Now) {
                        return Ok(None);
                    }
                }
                Err(source) => {
                    st.broken = true;
                    return Err(Error::Io { op, source });
                }
            }
        }
    }

    /// Handle a watch event that arrived on the connection.
    fn take_event(st: &mut ConnState, m: &Message, strays: &mut usize) -> Result<()> {
        let parsed = parse_watch_event(&m.payload);
        let (path, token) = match parsed {
            Ok(ev) => ev,
            Err(e) => {
                st.broken = true;
                return Err(e);
            }
        };
        match &mut st.events {
            Some(q) => {
                let ev = WatchEvent { path, token };
                if q.len() >= MAX_QUEUED_EVENTS {
                    // Full: an identical queued event already reports this change.
                    if q.contains(&ev) {
                        return Ok(());
                    }
                    st.broken = true;
                    return Err(Error::protocol(format!(
                        "more than {MAX_QUEUED_EVENTS} undelivered watch events"
                    )));
                }
                q.push_back(ev);
            }
            None => {
                *strays += 1;
                if *strays > MAX_STRAY_EVENTS {
                    st.broken = true;
                    return Err(Error::protocol(format!(
                        "more than {MAX_STRAY_EVENTS} unsolicited watch events before a reply"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Send one request and wait for its reply. Returns the reply payload;
    /// an `ERROR` reply becomes [`Error::Xs`] with `path` as context.
    pub(crate) fn request(
        &self,
        ty: MsgType,
        tx_id: u32,
        payload: Vec<u8>,
        path: &str,
    ) -> Result<Vec<u8>> {
        let op = ty.name();
        let mut st = self.lock();
        if st.broken {
            return Err(Error::Broken);
        }
        let req_id = st.next_req_id;
        st.next_req_id = st.next_req_id.wrapping_add(1).max(1);
        let msg = Message::new(ty, req_id, tx_id, payload)?;
        if let Err(source) = self.stream.write_all(&msg.to_bytes()) {
            st.broken = true;
            return Err(Error::Io {
                op: "write request",
                source,
            });
        }
        let wait = Wait::from_timeout(st.reply_timeout);
        let mut strays = 0usize;
        loop {
            let Some(reply) = self.recv(&mut st, wait, op)? else {
                st.broken = true;
                return Err(Error::Timeout {
                    op,
                    timeout: st.reply_timeout.unwrap_or_default(),
                });
            };
            let h = reply.header;
            if h.ty == MsgType::WatchEvent as u32 {
                Self::take_event(&mut st, &reply, &mut strays)?;
                continue;
            }
            if h.req_id != req_id {
                st.broken = true;
                return Err(Error::protocol(format!(
                    "{op} reply has req_id {}, expected {req_id}",
                    h.req_id
                )));
            }
            if h.ty == MsgType::Error as u32 {
                return match parse_error_reply(&reply.payload) {
                    Ok(errno) => Err(Error::Xs {
                        op,
                        path: path.to_owned(),
                        errno,
                    }),
                    Err(e) => {
                        st.broken = true;
                        Err(e)
                    }
                };
            }
            if h.ty != ty as u32 {
                st.broken = true;
                return Err(Error::protocol(format!(
                    "{op} answered with message type {} (payload {:?})",
                    h.ty,
                    Escaped(&reply.payload)
                )));
            }
            return Ok(reply.payload);
        }
    }

    /// Next watch event (watchers only): from the user-space queue, else from
    /// the stream within `wait`.
    pub(crate) fn next_event(&self, wait: Wait) -> Result<Option<WatchEvent>> {
        let mut st = self.lock();
        if let Some(ev) = st.events.as_mut().and_then(|q| q.pop_front()) {
            return Ok(Some(ev));
        }
        if st.broken {
            return Err(Error::Broken);
        }
        let Some(m) = self.recv(&mut st, wait, "wait for watch event")? else {
            return Ok(None);
        };
        if m.header.ty != MsgType::WatchEvent as u32 {
            st.broken = true;
            return Err(Error::protocol(format!(
                "unsolicited message of type {} (req_id {}) while waiting for watch events",
                m.header.ty, m.header.req_id
            )));
        }
        let mut strays = 0;
        Self::take_event(&mut st, &m, &mut strays)?;
        Ok(st.events.as_mut().and_then(|q| q.pop_front()))
    }

    /// Events queued in user space (watchers only).
    pub(crate) fn queued_events(&self) -> usize {
        self.lock().events.as_ref().map_or(0, VecDeque::len)
    }
}
