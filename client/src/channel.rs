//! The data channel the pump runs over: the small part of the vchan API that
//! qrexec-client-vm needs (docs/qrexec.md §15). Its one implementation is
//! [`crate::transport::VchanChannel`] over `vchan::Vchan` (every transport:
//! Xen, Local, Socket), which is also what the pump tests run over.
//!
//! Semantics follow libvchan: `send_all` is all-or-nothing, `buffer_space`
//! and `data_ready` report the free and filled parts of the rings, and the
//! descriptor from [`AsFd`] is polled for [`DataChannel::poll_events`]; when
//! poll reports it ready the pump calls [`DataChannel::wait`] (which then
//! must not block) to consume the event.

use crate::proto::MSG_HEADER_SIZE;
use nix::poll::PollFlags;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

/// What [`DataChannel::send_message_from_fd`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromFd {
    /// A message with this many payload bytes was sent.
    Sent(usize),
    /// End of file on the descriptor: nothing was sent.
    Eof,
    /// No room in the channel for a header and one byte: nothing was read.
    NoRoom,
}

/// Why [`DataChannel::send_message_from_fd`] failed: the local descriptor
/// or the channel, kept apart (a local read error ends local input, a
/// channel error is the peer's doing).
#[derive(Debug, thiserror::Error)]
pub enum FromFdError {
    /// `read(2)` on the local descriptor failed (`WouldBlock`: it is empty).
    #[error("reading local input: {0}")]
    Fd(#[source] io::Error),
    /// The channel failed (closed, corrupted ring, event channel).
    #[error("{0}")]
    Channel(#[source] io::Error),
}

/// A connected (or connecting) data vchan, seen from the vchan server side.
///
/// An implementation for `vchan::Vchan` maps: `wait_connected` →
/// `Vchan::wait_connected`, `send_all` → `Vchan::send` (all or nothing),
/// `read_ready` → `Vchan::recv` of `min(buf.len(), data_ready())` bytes (0
/// when nothing is ready, without blocking), `data_ready`/`buffer_space` as
/// is, `is_open` → `state()` is connected, `poll_events` →
/// `Vchan::poll_interest` (the event channel, or on the socket transport
/// `POLLOUT` while output is held back), `wait` → `Vchan::consume_events`.
///
/// ```
/// use qrexec::channel::DataChannel;
/// use qrexec::transport::VchanChannel;
/// let dir = tempfile::tempdir()?;
/// let t = vchan::Transport::Socket { dir: dir.path().into(), domid: 0 };
/// let mut ch = VchanChannel(vchan::Vchan::server(&t, 5, 513, 4096, 4096)?);
/// let _peer = std::os::unix::net::UnixStream::connect(vchan::socket_path(dir.path(), 0, 5, 513))?;
/// ch.wait_connected(std::time::Duration::from_secs(5))?;
/// assert_eq!(ch.buffer_space()?, 4096);
/// assert_eq!(ch.data_ready()?, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait DataChannel: AsFd + fmt::Debug {
    /// Wait until the peer has connected, at most `timeout`. Errors with
    /// [`io::ErrorKind::TimedOut`] on timeout.
    fn wait_connected(&mut self, timeout: Duration) -> io::Result<()>;

    /// Send all of `buf` or nothing: blocks until it fits. Errors when `buf`
    /// is larger than the ring or the channel is closed.
    fn send_all(&mut self, buf: &[u8]) -> io::Result<()>;

    /// Send one message whose payload is read from `fd` straight into the
    /// channel (at most `max` bytes, one `read(2)`; on shared memory
    /// directly into the ring), with `header(len)` in front; never blocks.
    /// The descriptor must not be a socket the caller wants read with
    /// `MSG_DONTWAIT`: a blocking descriptor should have been reported
    /// readable by `poll` first.
    fn send_message_from_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        max: usize,
        header: &dyn Fn(usize) -> [u8; MSG_HEADER_SIZE],
    ) -> Result<FromFd, FromFdError>;

    /// Copy up to `buf.len()` bytes that have already arrived into `buf`.
    /// Never blocks: returns 0 when nothing is ready.
    fn read_ready(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Bytes ready to be read. An error when the peer corrupted the ring:
    /// never a silent 0 that would leave the pump waiting forever.
    fn data_ready(&mut self) -> io::Result<usize>;

    /// Bytes that can be sent now without blocking (an error as for
    /// [`DataChannel::data_ready`]).
    fn buffer_space(&mut self) -> io::Result<usize>;

    /// As [`DataChannel::data_ready`], but without asking the peer for an
    /// event: for the busy path. Before sleeping on the descriptor the pump
    /// calls `data_ready` (ask, then look again). Defaults to `data_ready`.
    fn peek_data_ready(&mut self) -> io::Result<usize> {
        self.data_ready()
    }

    /// As [`DataChannel::buffer_space`], without asking for an event
    /// (see [`DataChannel::peek_data_ready`]).
    fn peek_buffer_space(&mut self) -> io::Result<usize> {
        self.buffer_space()
    }

    /// Busy-wait briefly (a few microseconds, adaptive) for `want` bytes to
    /// read, without asking for an event: `true` if they came. The pump
    /// calls it before it would sleep on data alone. Default: no spin.
    fn spin_for_data(&mut self, _want: usize) -> io::Result<bool> {
        Ok(false)
    }

    /// As [`DataChannel::spin_for_data`], for `want` bytes of free space.
    fn spin_for_space(&mut self, _want: usize) -> io::Result<bool> {
        Ok(false)
    }

    /// False once the peer has gone (data already received may still be
    /// readable: check `is_open` before `data_ready`).
    fn is_open(&mut self) -> bool;

    /// The poll events to wait for on the descriptor from [`AsFd`] now.
    /// Empty means "nothing to wait for on this channel right now".
    fn poll_events(&self) -> PollFlags;

    /// Consume the readiness poll reported; called only after poll returned
    /// events for the descriptor, so it must not block.
    fn wait(&mut self) -> io::Result<()>;

    /// The size of the ring we send into (the pump waits for half a chunk
    /// of it, at most half of this, before it sends again).
    fn write_ring_size(&self) -> usize;

    /// The pump's one wait: look, spin, ask for an event and look again,
    /// then sleep on the channel and `extra` together, as
    /// [`vchan::Vchan::wait_ready`] (docs/vchan.md §5.4).
    fn wait_ready(
        &mut self,
        want: vchan::Interest,
        extra: &mut [vchan::Watch<'_>],
        timeout: Option<Duration>,
    ) -> io::Result<vchan::Readiness>;
}
