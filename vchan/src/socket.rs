//! The socket transport: the byte stream of Qubes' `qubes-core-vchan-socket`.
//!
//! The server binds `<dir>/vchan.<server>.<client>.<port>.sock` (removing a
//! stale socket first) and accepts exactly one connection; the client retries
//! `connect` every 100 ms while the socket is missing or refusing. There is
//! no shared ring: the vchan semantics (`data_ready`, `buffer_space`,
//! all-or-nothing `send`/`recv`) are kept with two private buffers of the ring
//! sizes, as the threaded C library does.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::error::{Error, Result};

/// `POLLRDHUP`: the peer shut down its writing side (Linux).
const POLLRDHUP: PollFlags = PollFlags::from_bits_retain(libc::POLLRDHUP);
use crate::transport::DomId;

/// How often a socket client retries a missing or refusing server.
pub const CLIENT_RETRY: Duration = Duration::from_millis(100);

/// The socket path for a (server, client, port) triple.
///
/// ```
/// let p = vchan::socket_path(std::path::Path::new("/run/vchan"), 0, 5, 513);
/// assert_eq!(p, std::path::PathBuf::from("/run/vchan/vchan.0.5.513.sock"));
/// ```
pub fn socket_path(dir: &Path, server: DomId, client: DomId, port: u32) -> PathBuf {
    dir.join(format!("vchan.{server}.{client}.{port}.sock"))
}

#[derive(Debug)]
enum Conn {
    Listening(UnixListener),
    Connected(UnixStream),
}

/// One end of a socket-transport vchan.
#[derive(Debug)]
pub(crate) struct SocketChan {
    conn: Conn,
    /// The server's socket path, removed once connected or on drop.
    path: Option<PathBuf>,
    rx: VecDeque<u8>,
    rx_cap: usize,
    tx: VecDeque<u8>,
    tx_cap: usize,
    /// The peer has closed its sending side (EOF or reset seen).
    eof: bool,
    /// Writing failed: the peer is gone.
    broken: bool,
}

fn wait_fd(fd: BorrowedFd<'_>, flags: PollFlags, timeout: Option<Duration>) -> Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    xen_base::poll_until(fd, flags, deadline).map_err(|e| Error::io("poll", e.into()))
}

impl SocketChan {
    /// Binds the server socket and returns at once (state: waiting).
    pub(crate) fn server(
        dir: &Path,
        own: DomId,
        peer: DomId,
        port: u32,
        read_cap: usize,
        write_cap: usize,
    ) -> Result<SocketChan> {
        let path = socket_path(dir, own, peer, port);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove stale vchan socket", e)),
        }
        let listener = UnixListener::bind(&path).map_err(|e| Error::io("bind vchan socket", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("set socket non-blocking", e))?;
        Ok(SocketChan {
            conn: Conn::Listening(listener),
            path: Some(path),
            rx: VecDeque::with_capacity(read_cap),
            rx_cap: read_cap,
            tx: VecDeque::with_capacity(write_cap),
            tx_cap: write_cap,
            eof: false,
            broken: false,
        })
    }

    /// Connects to a server, retrying every 100 ms while the socket is
    /// missing or refusing, for at most `timeout`.
    pub(crate) fn client(
        dir: &Path,
        own: DomId,
        peer: DomId,
        port: u32,
        timeout: Duration,
    ) -> Result<SocketChan> {
        if own == peer {
            return Err(Error::Loopback { domid: own });
        }
        let path = socket_path(dir, peer, own, port);
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout {
                            step: "connect to vchan socket",
                            secs: timeout.as_secs(),
                        });
                    }
                    std::thread::sleep(CLIENT_RETRY.min(deadline - Instant::now()));
                }
                Err(e) => return Err(Error::io("connect to vchan socket", e)),
            }
        };
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("set socket non-blocking", e))?;
        // The client does not know the server's ring sizes; the Qubes socket
        // library uses 64 KiB buffers.
        let cap = 65536;
        Ok(SocketChan {
            conn: Conn::Connected(stream),
            path: None,
            rx: VecDeque::with_capacity(cap),
            rx_cap: cap,
            tx: VecDeque::with_capacity(cap),
            tx_cap: cap,
            eof: false,
            broken: false,
        })
    }

    /// Accepts the client if one is waiting (server). `Ok(true)` once connected.
    pub(crate) fn poll_accept(&mut self) -> Result<bool> {
        let Conn::Listening(l) = &self.conn else {
            return Ok(true);
        };
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true)
                    .map_err(|e| Error::io("set socket non-blocking", e))?;
                self.conn = Conn::Connected(s);
                // One connection only: nobody else may find the socket now.
                if let Some(p) = self.path.take() {
                    let _ = std::fs::remove_file(p);
                }
                // What was written before the client came goes out now.
                self.pump();
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(Error::io("accept vchan client", e)),
        }
    }

    /// Waits up to `timeout` for the client (server).
    pub(crate) fn wait_accept(&mut self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.poll_accept()? {
                return Ok(());
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Err(Error::Timeout {
                    step: "wait for vchan client",
                    secs: timeout.unwrap_or_default().as_secs(),
                });
            }
            wait_fd(self.as_fd(), PollFlags::POLLIN, left)?;
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        matches!(self.conn, Conn::Connected(_))
    }

    fn stream(&self) -> Option<&UnixStream> {
        match &self.conn {
            Conn::Connected(s) => Some(s),
            Conn::Listening(_) => None,
        }
    }

    /// Moves bytes between the socket and the private buffers without blocking.
    fn pump(&mut self) {
        if let Conn::Listening(_) = self.conn {
            // A client waiting in the backlog is taken in by any call (the
            // output queued for it goes out in `poll_accept`); an accept
            // error shows in the next wait for the client.
            let _ = self.poll_accept();
            return;
        }
        let Conn::Connected(stream) = &self.conn else {
            return;
        };
        let mut s = stream;
        // Outgoing first: it frees the peer to send more.
        while !self.tx.is_empty() && !self.broken {
            let (a, _) = self.tx.as_slices();
            match s.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.broken = true;
                    self.tx.clear();
                }
            }
        }
        let mut buf = [0u8; 65536];
        while self.rx.len() < self.rx_cap && !self.eof {
            let want = (self.rx_cap - self.rx.len()).min(buf.len());
            match s.read(&mut buf[..want]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.rx.extend(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
        if !self.eof && self.rx.len() >= self.rx_cap {
            // Our buffer is full: learn about a hang-up without reading.
            let flags = POLLRDHUP | PollFlags::POLLHUP;
            let mut fds = [PollFd::new(s.as_fd(), flags)];
            if let Ok(n) = poll(&mut fds, PollTimeout::ZERO)
                && n > 0
                && fds[0].revents().is_some_and(|r| r.intersects(flags))
            {
                self.eof = true;
            }
        }
    }

    /// Whether the peer is still there: false once it closed its sending
    /// side, even if data remains to be read. A peer that stopped reading
    /// (our writes fail) but still sends is open: what it sends (say, an
    /// exit code after a service stopped reading its input) is still read.
    pub(crate) fn is_open(&mut self) -> bool {
        self.pump();
        self.is_connected() && !self.eof
    }

    /// Whether we can still send: connected, and the peer neither closed
    /// nor stopped reading.
    /// A server still waiting for its client may queue output (as on
    /// shared memory, where it goes into the ring before the client maps
    /// it); it is sent once the client connects.
    fn can_send(&mut self) -> bool {
        !self.is_connected() || (self.is_open() && !self.broken)
    }

    /// A server still waiting for its client before a read: blocking waits
    /// for the client, non-blocking only looks. `Ok(false)`: not yet.
    fn accept_for_read(&mut self, blocking: bool) -> Result<bool> {
        if self.is_connected() {
            return Ok(true);
        }
        if blocking {
            self.wait_accept(None).map(|()| true)
        } else {
            self.poll_accept()
        }
    }

    pub(crate) fn data_ready(&mut self) -> usize {
        self.pump();
        self.rx.len()
    }

    pub(crate) fn buffer_space(&mut self) -> usize {
        self.pump();
        if self.broken {
            0
        } else {
            self.tx_cap - self.tx.len()
        }
    }

    pub(crate) fn read_capacity(&self) -> usize {
        self.rx_cap
    }

    pub(crate) fn write_capacity(&self) -> usize {
        self.tx_cap
    }

    /// What to poll the socket for now: the connection while listening;
    /// once connected, readable while our receive buffer has room and the
    /// peer may still send, writable while we hold unsent bytes. Empty when
    /// nothing on the socket can change our state (then a hang-up would
    /// only make `poll` return at once, again and again).
    pub(crate) fn poll_interest(&self) -> PollFlags {
        if !self.is_connected() {
            return PollFlags::POLLIN;
        }
        let mut flags = PollFlags::empty();
        if !self.eof {
            // POLLRDHUP even with a full buffer: a peer that shut down is
            // noticed without reading (`pump` then sets `eof`).
            flags |= POLLRDHUP;
            if self.rx.len() < self.rx_cap {
                flags |= PollFlags::POLLIN;
            }
        }
        if !self.tx.is_empty() && !self.broken {
            flags |= PollFlags::POLLOUT;
        }
        flags
    }

    /// Moves data after `poll` reported the socket ready (accepting a
    /// waiting client first); never blocks.
    pub(crate) fn handle_ready(&mut self) -> Result<()> {
        if !self.is_connected() {
            self.poll_accept()?;
        }
        self.pump();
        Ok(())
    }

    /// Waits for something to happen on the socket (readable, writable if we
    /// have pending output, hang-up), then moves data. `Ok(false)` on timeout.
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> Result<bool> {
        let Some(s) = self.stream() else {
            // Still listening: the event to wait for is the client.
            return match self.wait_accept(timeout) {
                Ok(()) => Ok(true),
                Err(Error::Timeout { .. }) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let mut flags = POLLRDHUP;
        if self.rx.len() < self.rx_cap && !self.eof {
            flags |= PollFlags::POLLIN;
        }
        if !self.tx.is_empty() && !self.broken {
            flags |= PollFlags::POLLOUT;
        }
        let r = wait_fd(s.as_fd(), flags, timeout)?;
        self.pump();
        Ok(r)
    }

    pub(crate) fn read(&mut self, buf: &mut [u8], blocking: bool) -> Result<usize> {
        if !self.accept_for_read(blocking)? {
            return Err(Error::WouldBlock);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.pump();
            if !self.rx.is_empty() {
                let n = buf.len().min(self.rx.len());
                for (d, s) in buf[..n].iter_mut().zip(self.rx.drain(..n)) {
                    *d = s;
                }
                return Ok(n);
            }
            if self.eof {
                return Ok(0);
            }
            if !blocking {
                return Err(Error::WouldBlock);
            }
            self.wait(None)?;
        }
    }

    pub(crate) fn write(&mut self, buf: &[u8], blocking: bool) -> Result<usize> {
        let mut done = 0;
        loop {
            if !self.can_send() {
                return if done > 0 {
                    Ok(done)
                } else {
                    Err(Error::PeerClosed)
                };
            }
            let n = (buf.len() - done).min(self.tx_cap - self.tx.len());
            self.tx.extend(&buf[done..done + n]);
            done += n;
            self.pump();
            if done == buf.len() {
                return Ok(done);
            }
            if !blocking {
                return if done > 0 {
                    Ok(done)
                } else {
                    Err(Error::WouldBlock)
                };
            }
            if self.tx.len() == self.tx_cap {
                self.wait(None)?;
            }
        }
    }

    pub(crate) fn send(&mut self, buf: &[u8], blocking: bool) -> Result<usize> {
        if buf.len() > self.tx_cap {
            return Err(Error::config(format!(
                "packet of {} bytes is larger than the {}-byte ring",
                buf.len(),
                self.tx_cap
            )));
        }
        loop {
            if !self.can_send() {
                return Err(Error::PeerClosed);
            }
            if self.tx_cap - self.tx.len() >= buf.len() {
                self.tx.extend(buf);
                self.pump();
                return Ok(buf.len());
            }
            if !blocking {
                return Err(Error::WouldBlock);
            }
            if self.tx_cap - self.tx.len() < buf.len() {
                self.wait(None)?;
            }
        }
    }

    pub(crate) fn recv(&mut self, buf: &mut [u8], blocking: bool) -> Result<usize> {
        if buf.len() > self.rx_cap {
            return Err(Error::config(format!(
                "packet of {} bytes is larger than the {}-byte ring",
                buf.len(),
                self.rx_cap
            )));
        }
        loop {
            self.pump();
            if self.rx.len() >= buf.len() {
                let n = buf.len();
                for (d, s) in buf.iter_mut().zip(self.rx.drain(..n)) {
                    *d = s;
                }
                return Ok(buf.len());
            }
            if self.eof {
                return Err(Error::PeerClosed);
            }
            if !blocking {
                return Err(Error::WouldBlock);
            }
            self.wait(None)?;
        }
    }

    /// Reads at most `max` bytes from `fd` into the send buffer (one
    /// `read(2)`; this transport has no shared ring, so one private copy)
    /// and moves what the socket takes. Never waits for room.
    pub(crate) fn read_from_fd(&mut self, fd: BorrowedFd<'_>, max: usize) -> Result<usize> {
        if !self.is_connected() {
            return Err(Error::NotConnected);
        }
        if !self.can_send() {
            return Err(Error::PeerClosed);
        }
        let n = max.min(self.tx_cap - self.tx.len()).min(65536);
        if n == 0 {
            return if max == 0 {
                Ok(0)
            } else {
                Err(Error::WouldBlock)
            };
        }
        let mut buf = vec![0u8; n];
        let r = nix::unistd::read(fd, &mut buf).map_err(|e| Error::io("read from fd", e.into()))?;
        self.tx.extend(&buf[..r]);
        self.pump();
        Ok(r)
    }

    /// A framed message from `fd`: the payload (at most `max` bytes, one
    /// `read(2)`) and `header(len)` in front of it go into the send buffer
    /// together. `Ok(0)` at end of file. Never waits for room.
    pub(crate) fn send_framed_from_fd<const N: usize>(
        &mut self,
        fd: BorrowedFd<'_>,
        max: usize,
        header: impl FnOnce(usize) -> [u8; N],
    ) -> Result<usize> {
        if !self.is_connected() {
            return Err(Error::NotConnected);
        }
        if !self.can_send() {
            return Err(Error::PeerClosed);
        }
        if max == 0 {
            return Ok(0);
        }
        let room = self.tx_cap - self.tx.len();
        if room <= N {
            return Err(Error::WouldBlock);
        }
        let mut buf = vec![0u8; max.min(room - N).min(65536)];
        let r = nix::unistd::read(fd, &mut buf).map_err(|e| Error::io("read from fd", e.into()))?;
        if r > 0 {
            self.tx.extend(header(r));
            self.tx.extend(&buf[..r]);
            self.pump();
        }
        Ok(r)
    }

    /// Writes at most `max` received bytes to `fd` (one `write(2)`) and
    /// drops what it took. `Ok(0)` at end of stream. Never waits for data.
    pub(crate) fn write_to_fd(&mut self, fd: BorrowedFd<'_>, max: usize) -> Result<usize> {
        if !self.is_connected() {
            return Err(Error::NotConnected);
        }
        self.pump();
        if max == 0 {
            return Ok(0);
        }
        if self.rx.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(Error::WouldBlock)
            };
        }
        let (a, _) = self.rx.as_slices();
        let n = a.len().min(max);
        let w = nix::unistd::write(fd, &a[..n]).map_err(|e| Error::io("write to fd", e.into()))?;
        self.rx.drain(..w);
        Ok(w)
    }

    /// Flushes pending output (bounded: gives up after 10 s without
    /// progress), then shuts the connection down.
    pub(crate) fn close(&mut self) {
        let mut last = Instant::now();
        while !self.tx.is_empty() && !self.broken && self.is_connected() {
            let before = self.tx.len();
            if self.wait(Some(Duration::from_millis(100))).is_err() {
                break;
            }
            if self.tx.len() < before {
                last = Instant::now();
            } else if last.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        if let Some(s) = self.stream() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.broken = true;
    }
}

impl AsFd for SocketChan {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.conn {
            Conn::Listening(l) => l.as_fd(),
            Conn::Connected(s) => s.as_fd(),
        }
    }
}

impl Drop for SocketChan {
    fn drop(&mut self) {
        self.close();
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
