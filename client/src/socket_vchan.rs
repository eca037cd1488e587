//! A [`DataChannel`] over a Unix `SOCK_STREAM` socket, wire-compatible with
//! Qubes' `qubes-core-vchan-socket` test backend (spec §15): the byte stream
//! is exactly the qrexec framing, the server listens at
//! `$VCHAN_SOCKET_DIR/vchan.<server domid>.<client domid>.<port>.sock`,
//! unlinks a stale socket first, and accepts exactly one connection.
//!
//! Like a vchan, the channel has two bounded rings (here: private buffers of
//! the vchan ring size for the requested minimum), so `buffer_space` and
//! `data_ready` behave as they do on Xen and the pump's flow control is
//! exercised for real. This module is self-contained so it can move into the
//! `vchan` crate later.

use crate::channel::DataChannel;
use crate::proto::MAX_VCHAN_BUFFER_SIZE;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The ring size a vchan uses for a requested minimum (as libxenvchan
/// chooses it): 1024 or 2048 for the in-page rings, else the next power of
/// two of at least 4096. `None` above 1 MiB.
///
/// ```
/// # use qrexec::socket_vchan::ring_size;
/// assert_eq!(ring_size(1), Some(1024));
/// assert_eq!(ring_size(1025), Some(2048));
/// assert_eq!(ring_size(2049), Some(4096));
/// assert_eq!(ring_size(65536), Some(65536));
/// assert_eq!(ring_size(65537), Some(131072));
/// assert_eq!(ring_size((1 << 20) + 1), None);
/// ```
pub fn ring_size(min: usize) -> Option<usize> {
    if min > MAX_VCHAN_BUFFER_SIZE {
        None
    } else if min <= 1024 {
        Some(1024)
    } else if min <= 2048 {
        Some(2048)
    } else {
        Some(min.max(4096).next_power_of_two())
    }
}

/// The socket path of a server in `server_domain` for a client in
/// `client_domain` on `port`.
///
/// ```
/// # use qrexec::socket_vchan::socket_path;
/// let p = socket_path("/run/vchan".as_ref(), 0, 7, 513);
/// assert_eq!(p.to_str(), Some("/run/vchan/vchan.0.7.513.sock"));
/// ```
pub fn socket_path(dir: &Path, server_domain: u32, client_domain: u32, port: u32) -> PathBuf {
    dir.join(format!("vchan.{server_domain}.{client_domain}.{port}.sock"))
}

#[derive(Debug)]
enum Sock {
    Listening(Listening),
    Connected(UnixStream),
}

#[derive(Debug)]
struct Listening {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The socket data channel. See the module documentation.
#[derive(Debug)]
pub struct SocketChannel {
    sock: Sock,
    rbuf: VecDeque<u8>,
    rcap: usize,
    wbuf: VecDeque<u8>,
    wcap: usize,
    read_eof: bool,
    write_broken: bool,
}

impl SocketChannel {
    fn with_caps(sock: Sock, read_min: usize, write_min: usize) -> io::Result<SocketChannel> {
        let too_big = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("vchan buffer size above {MAX_VCHAN_BUFFER_SIZE} bytes"),
            )
        };
        let rcap = ring_size(read_min).ok_or_else(too_big)?;
        let wcap = ring_size(write_min).ok_or_else(too_big)?;
        Ok(SocketChannel {
            sock,
            rbuf: VecDeque::with_capacity(rcap),
            rcap,
            wbuf: VecDeque::with_capacity(wcap),
            wcap,
            read_eof: false,
            write_broken: false,
        })
    }

    /// Listen at `path` (a stale socket there is removed first). The peer
    /// is accepted by [`DataChannel::wait_connected`]; the path is removed
    /// once it has connected, or when the channel is dropped.
    pub fn listen(path: &Path, read_min: usize, write_min: usize) -> io::Result<SocketChannel> {
        // Validate the sizes before touching the file system.
        ring_size(read_min)
            .zip(ring_size(write_min))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("vchan buffer size above {MAX_VCHAN_BUFFER_SIZE} bytes"),
                )
            })?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        let sock = Sock::Listening(Listening {
            listener,
            path: path.to_path_buf(),
        });
        SocketChannel::with_caps(sock, read_min, write_min)
    }

    /// A vchan-socket server in `own_domain` for `peer_domain`/`port` in
    /// `dir` (spec §15 naming).
    pub fn server(
        dir: &Path,
        own_domain: u32,
        peer_domain: u32,
        port: u32,
        read_min: usize,
        write_min: usize,
    ) -> io::Result<SocketChannel> {
        SocketChannel::listen(
            &socket_path(dir, own_domain, peer_domain, port),
            read_min,
            write_min,
        )
    }

    /// A channel over an already connected stream (either side; tests).
    pub fn from_stream(
        stream: UnixStream,
        read_min: usize,
        write_min: usize,
    ) -> io::Result<SocketChannel> {
        stream.set_nonblocking(true)?;
        SocketChannel::with_caps(Sock::Connected(stream), read_min, write_min)
    }

    /// The listening path, while still listening.
    pub fn path(&self) -> Option<&Path> {
        match &self.sock {
            Sock::Listening(l) => Some(l.path.as_path()),
            Sock::Connected(_) => None,
        }
    }

    /// Size of the receive ring.
    pub fn read_capacity(&self) -> usize {
        self.rcap
    }

    /// Size of the send ring.
    pub fn write_capacity(&self) -> usize {
        self.wcap
    }

    fn fill(&mut self) {
        let Sock::Connected(stream) = &mut self.sock else {
            return;
        };
        let mut tmp = [0u8; 16384];
        while !self.read_eof && self.rbuf.len() < self.rcap {
            let room = (self.rcap - self.rbuf.len()).min(tmp.len());
            match stream.read(&mut tmp[..room]) {
                Ok(0) => self.read_eof = true,
                Ok(n) => self.rbuf.extend(&tmp[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ECONNRESET and friends: the peer is gone.
                Err(_) => self.read_eof = true,
            }
        }
    }

    fn flush(&mut self) {
        let Sock::Connected(stream) = &mut self.sock else {
            return;
        };
        while !self.write_broken && !self.wbuf.is_empty() {
            let (front, _) = self.wbuf.as_slices();
            match stream.write(front) {
                Ok(0) => self.write_broken = true,
                Ok(n) => {
                    self.wbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => self.write_broken = true,
            }
        }
        if self.write_broken {
            self.wbuf.clear();
        }
    }

    fn connected_stream(&self) -> io::Result<&UnixStream> {
        match &self.sock {
            Sock::Connected(s) => Ok(s),
            Sock::Listening(_) => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "vchan not connected yet",
            )),
        }
    }
}

impl AsFd for SocketChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.sock {
            Sock::Connected(s) => s.as_fd(),
            Sock::Listening(l) => l.listener.as_fd(),
        }
    }
}

fn poll_one(fd: BorrowedFd<'_>, events: PollFlags, timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let pt = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(fd, events)];
        match poll(&mut fds, pt) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

impl DataChannel for SocketChannel {
    fn wait_connected(&mut self, timeout: Duration) -> io::Result<()> {
        let Sock::Listening(l) = &self.sock else {
            return Ok(());
        };
        if !poll_one(l.listener.as_fd(), PollFlags::POLLIN, Some(timeout))? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no connection to {} within {} s",
                    l.path.display(),
                    timeout.as_secs_f32()
                ),
            ));
        }
        let (stream, _) = l.listener.accept()?;
        stream.set_nonblocking(true)?;
        // Accept exactly one connection: dropping the listener removes the path.
        self.sock = Sock::Connected(stream);
        Ok(())
    }

    fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.len() > self.wcap {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "message of {} bytes exceeds the {}-byte ring",
                    buf.len(),
                    self.wcap
                ),
            ));
        }
        loop {
            self.flush();
            if self.write_broken || self.read_eof {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "vchan closed by the peer",
                ));
            }
            if self.wcap - self.wbuf.len() >= buf.len() {
                self.wbuf.extend(buf);
                self.flush();
                if self.write_broken {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "vchan closed by the peer",
                    ));
                }
                return Ok(());
            }
            let fd = self.connected_stream()?.as_fd();
            poll_one(fd, PollFlags::POLLOUT, None)?;
            self.fill();
        }
    }

    fn read_ready(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fill();
        let n = buf.len().min(self.rbuf.len());
        for (dst, src) in buf[..n].iter_mut().zip(self.rbuf.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }

    fn data_ready(&mut self) -> usize {
        self.fill();
        self.rbuf.len()
    }

    fn buffer_space(&mut self) -> usize {
        self.flush();
        if self.write_broken {
            return 0;
        }
        self.wcap - self.wbuf.len()
    }

    fn is_open(&mut self) -> bool {
        if matches!(self.sock, Sock::Listening(_)) {
            return false;
        }
        self.fill();
        self.flush();
        !(self.read_eof || self.write_broken)
    }

    fn poll_events(&self) -> PollFlags {
        if matches!(self.sock, Sock::Listening(_)) {
            return PollFlags::POLLIN;
        }
        let mut ev = PollFlags::empty();
        if !self.read_eof && self.rbuf.len() < self.rcap {
            ev |= PollFlags::POLLIN;
        }
        if !self.write_broken && !self.wbuf.is_empty() {
            ev |= PollFlags::POLLOUT;
        }
        ev
    }

    fn wait(&mut self) -> io::Result<()> {
        self.fill();
        self.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_follow_libxenvchan() {
        assert_eq!(ring_size(0), Some(1024));
        assert_eq!(ring_size(1024), Some(1024));
        assert_eq!(ring_size(2048), Some(2048));
        assert_eq!(ring_size(3000), Some(4096));
        assert_eq!(ring_size(4097), Some(8192));
        assert_eq!(ring_size(1 << 20), Some(1 << 20));
        assert_eq!(ring_size((1 << 20) + 1), None);
    }

    #[test]
    fn listen_accepts_one_and_removes_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // a stale file is replaced
        let path = socket_path(dir.path(), 0, 5, 513);
        std::fs::write(&path, b"stale").unwrap();
        let mut ch = SocketChannel::server(dir.path(), 0, 5, 513, 65536, 65536).unwrap();
        assert_eq!(ch.path(), Some(path.as_path()));
        assert!(!ch.is_open());
        let mut peer = UnixStream::connect(&path).unwrap();
        ch.wait_connected(Duration::from_secs(5)).unwrap();
        assert!(!path.exists());
        assert!(ch.is_open());
        ch.send_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        peer.write_all(b"xyz").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ch.data_ready() < 3 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut buf = [0u8; 2];
        assert_eq!(ch.read_ready(&mut buf).unwrap(), 2);
        assert_eq!(&buf, b"xy");
        drop(peer);
        // remaining data is still readable after the peer closed
        assert!(!ch.is_open());
        assert_eq!(ch.data_ready(), 1);
        assert_eq!(ch.read_ready(&mut buf).unwrap(), 1);
        assert!(ch.send_all(b"x").is_err());
    }

    #[test]
    fn wait_connected_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut ch = SocketChannel::server(dir.path(), 0, 5, 600, 1024, 1024).unwrap();
        let e = ch.wait_connected(Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let p = ch.path().unwrap().to_path_buf();
        drop(ch);
        assert!(!p.exists());
    }

    #[test]
    fn rings_are_bounded() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut ch = SocketChannel::from_stream(a, 1024, 1024).unwrap();
        assert_eq!(ch.buffer_space(), 1024);
        assert!(ch.send_all(&[0u8; 1025]).is_err());
        // fill the peer's socket buffer and our ring: space must shrink
        let chunk = [7u8; 1024];
        let mut sent = 0usize;
        while ch.buffer_space() >= 1024 && sent < 64 << 20 {
            ch.send_all(&chunk).unwrap();
            sent += 1024;
        }
        assert!(ch.buffer_space() < 1024);
        assert!(ch.poll_events().contains(PollFlags::POLLOUT));
        // the receive side never holds more than its ring
        let mut peer = b;
        peer.set_nonblocking(true).unwrap();
        let mut drained = 0usize;
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(5);
        while drained < sent {
            assert!(Instant::now() < deadline);
            match peer.read(&mut buf) {
                Ok(n) => drained += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ch.wait().unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(drained, sent);
        assert_eq!(ch.buffer_space(), 1024);
    }
}
