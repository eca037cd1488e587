// Why this file is long (~2500 lines): about 1700 of them are doc comments,
// 1050 of those the hidden set-up lines that make each method's example
// runnable (an in-memory page and two endpoints); the code is under 800
// lines and is one concern, the blocking policy around a ring pair
// (waiting, liveness, timeouts, close). Splitting it would scatter the
// semantics table below across files.
//! One end of a connected vchan: both rings, the liveness bytes, the event
//! channel and the blocking policy, with the API semantics of libxenvchan
//! (docs/vchan.md §5.6) in Rust types.
//!
//! | call | outcome |
//! |------|---------|
//! | [`read`](Endpoint::read) | data if any, **even after the peer closed**; `Ok(0)` = EOF only when empty *and* the peer closed; empty and non-blocking → [`WouldBlock`](RingError::WouldBlock) |
//! | [`write`](Endpoint::write) | [`PeerClosed`](RingError::PeerClosed) if the peer is not open at entry (or closes while we wait before anything was written); blocking: all bytes; non-blocking: what fits, or `WouldBlock` |
//! | [`send`](Endpoint::send) / [`recv`](Endpoint::recv) | all or nothing; larger than the ring → [`TooBig`](RingError::TooBig) at once; `recv` with the peer closed and too few bytes left → `PeerClosed` |
//! | [`data_ready`](Endpoint::data_ready) / [`buffer_space`](Endpoint::buffer_space) | request a notification, then report |
//! | [`peek_data_ready`](Endpoint::peek_data_ready) / [`peek_buffer_space`](Endpoint::peek_buffer_space) | report only (one load, no shared write, no event asked for) |
//! | [`wait`](Endpoint::wait) | block until an event (or a change the events missed) |
//! | [`close`](Endpoint::close) | own live byte = 0, then one event |
//!
//! Blocking never trusts that an event will come: every wait is a
//! [`Events::wait_timeout`] of at most the *poll interval*, and every
//! wake-up (event or timeout) re-validates the shared header: indices in
//! range, orders unchanged against our private copy. A peer that corrupts
//! the page yields [`RingError::Corrupt`]; a peer that dies without an event
//! is noticed at the next poll; the endpoint's optional timeout bounds the
//! whole operation with [`RingError::TimedOut`].

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::control::{
    ControlPage, LIVE_CONNECTED, LIVE_EXITED, LIVE_WAITING, Layout, RingId, RingLocation,
    SharedHeader, Side,
};
use crate::mem::SharedMemory;
use crate::ring::{Consumer, Corruption, Producer, RawRingBytes, Ring, RingBytes, RingError};
use crate::spin::SpinPolicy;

/// The event channel as the endpoint needs it: one channel carries every
/// kind of notification in both directions; events coalesce and may be
/// spurious.
///
/// ```
/// # use std::io;
/// # use std::time::Duration;
/// # use vchan::control::*;
/// # use vchan::endpoint::{Endpoint, Events, PeerState};
/// # use vchan::ring::RingError;
/// # #[derive(Debug)]
/// # struct NoEvents; // both ends in one process: nothing to signal
/// # impl Events for NoEvents {
/// #     fn notify(&self) -> io::Result<()> { Ok(()) }
/// #     fn wait(&self) -> io::Result<()> { Ok(()) }
/// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
/// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
/// # }
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &layout, &[], &[])?;
/// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
/// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
/// # announce_client_connected(&hdr);
/// // An implementation only forwards to its channel; the endpoint never
/// // counts events and re-checks the rings after every wake-up.
/// assert!(!srv.events().wait_timeout(Duration::from_millis(1)).unwrap());
/// # Ok::<(), RingError>(())
/// ```
pub trait Events: fmt::Debug + Send {
    /// Sends one event to the peer. Must not fail just because the peer is
    /// gone (Xen drops it silently).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.events().notify().unwrap();
    /// # Ok::<(), RingError>(())
    /// ```
    fn notify(&self) -> io::Result<()>;
    /// Blocks until an event arrives, consumes it and re-arms the channel.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// cli.events().wait().unwrap(); // NoEvents: a spurious wake-up, which is allowed
    /// # Ok::<(), RingError>(())
    /// ```
    fn wait(&self) -> io::Result<()>;
    /// As [`Events::wait`], for at most `d`: `Ok(true)` if an event was
    /// consumed, `Ok(false)` on timeout.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert!(!cli.events().wait_timeout(Duration::from_millis(1)).unwrap());
    /// # Ok::<(), RingError>(())
    /// ```
    fn wait_timeout(&self, d: Duration) -> io::Result<bool>;
    /// Consumes a pending event without blocking: `Ok(true)` if there was
    /// one.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert!(!cli.events().consume_pending().unwrap());
    /// # Ok::<(), RingError>(())
    /// ```
    fn consume_pending(&self) -> io::Result<bool>;
}

/// The error of [`Endpoint::read_from_fd`] and [`Endpoint::write_to_fd`]:
/// the ring's, or the file descriptor's, kept apart so that a caller can
/// tell "the ring is full" from "the fd is empty".
///
/// ```
/// use std::io;
/// use vchan::endpoint::FdError;
/// use vchan::ring::RingError;
/// // "The ring is full" and "the fd failed" stay apart...
/// let full = FdError::from(RingError::WouldBlock);
/// assert!(matches!(full, FdError::Ring(RingError::WouldBlock)));
/// // ...and both become an io::Error of the right kind.
/// assert_eq!(io::Error::from(full).kind(), io::ErrorKind::WouldBlock);
/// let fd = FdError::Fd(io::Error::from(io::ErrorKind::BrokenPipe));
/// assert_eq!(io::Error::from(fd).kind(), io::ErrorKind::BrokenPipe);
/// ```
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// The ring (full or empty: [`RingError::WouldBlock`], corrupted, closed…).
    #[error(transparent)]
    Ring(#[from] RingError),
    /// `read(2)` or `write(2)` on the file descriptor failed.
    #[error("file descriptor: {0}")]
    Fd(#[source] io::Error),
}

impl From<FdError> for io::Error {
    fn from(e: FdError) -> io::Error {
        match e {
            FdError::Ring(r) => r.into(),
            FdError::Fd(e) => e,
        }
    }
}

/// The peer's state as its live byte shows it.
///
/// ```
/// # use std::io;
/// # use std::time::Duration;
/// # use vchan::control::*;
/// # use vchan::endpoint::{Endpoint, Events, PeerState};
/// # use vchan::ring::RingError;
/// # #[derive(Debug)]
/// # struct NoEvents; // both ends in one process: nothing to signal
/// # impl Events for NoEvents {
/// #     fn notify(&self) -> io::Result<()> { Ok(()) }
/// #     fn wait(&self) -> io::Result<()> { Ok(()) }
/// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
/// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
/// # }
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &layout, &[], &[])?;
/// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
/// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
/// # announce_client_connected(&hdr);
/// assert_eq!(srv.peer_state(), PeerState::Connected);
/// cli.close()?;
/// assert_eq!(srv.peer_state(), PeerState::Closed);
/// # Ok::<(), RingError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// The client has not connected yet (`cli_live == 2`, server only).
    Waiting,
    /// Connected (`1`).
    Connected,
    /// Closed, dead, or a value no correct peer writes (docs/vchan.md §10.2
    /// recommends treating anything else as closed).
    Closed,
}

impl PeerState {
    /// Anything but [`PeerState::Closed`]: writes are allowed (a server may
    /// write before the client connects; the data waits in the ring).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert!(PeerState::Waiting.is_open());
    /// assert!(!PeerState::Closed.is_open());
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn is_open(self) -> bool {
        self != PeerState::Closed
    }

    /// Interprets the peer's live byte as seen from `side`.
    ///
    /// ```
    /// use vchan::control::Side;
    /// use vchan::endpoint::PeerState;
    /// assert_eq!(PeerState::from_live(Side::Server, 2), PeerState::Waiting);
    /// assert_eq!(PeerState::from_live(Side::Client, 2), PeerState::Closed);
    /// assert_eq!(PeerState::from_live(Side::Client, 1), PeerState::Connected);
    /// assert_eq!(PeerState::from_live(Side::Server, 7), PeerState::Closed);
    /// ```
    pub fn from_live(side: Side, live: u8) -> Self {
        match (side, live) {
            (_, LIVE_CONNECTED) => PeerState::Connected,
            (Side::Server, LIVE_WAITING) => PeerState::Waiting,
            _ => PeerState::Closed,
        }
    }
}

/// Default bound of one wait before the shared state is re-validated.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Default bound of the busy-wait a blocking call does before it asks the
/// peer for an event and sleeps (see [`Endpoint::set_spin`] and
/// [`SpinPolicy`]).
pub use crate::spin::DEFAULT_SPIN;

/// A blocking writer that finds the ring full spins until this much space
/// is free (or half the ring, or what it has left to write, if less)
/// rather than for the first free byte: copying slivers as the reader
/// frees them costs a notify check and a bounce of the index cache line
/// per sliver, and runs both sides at a fraction of memory speed.
const WRITE_BATCH: u32 = 64 * 1024;

/// A `want` no ring's cached count covers (rings hold at most 1 MiB): the
/// look loads the peer's index. Every call's first look uses it, so each
/// call validates the peer's index before it moves a byte.
const FRESH: u32 = u32::MAX;

/// One end of a vchan.
///
/// Generic over the event source `E`, the shared header `H` and the ring
/// storage `B`; the defaults are the real shared-memory types. The `loom`
/// model instantiates it with model-checked ones.
///
/// The endpoint owns its share of the memory: its header and rings hold
/// the mappings ([`crate::mem::SharedMemory`]), so nothing can unmap them
/// while it exists. Dropping an endpoint writes nothing to shared memory;
/// call [`Endpoint::close`] first (or take it apart in a chosen order with
/// [`Endpoint::into_parts`]).
///
/// ```
/// use std::io;
/// use std::sync::Arc;
/// use std::time::Duration;
/// use vchan::control::{ControlPage, init_server_page, server_layout, Side};
/// use vchan::endpoint::{Endpoint, Events};
/// use vchan::mem::HeapPages;
///
/// #[derive(Debug)]
/// struct MyEvents; // e.g. an event-channel fd
/// impl Events for MyEvents {
///     fn notify(&self) -> io::Result<()> { Ok(()) }
///     fn wait(&self) -> io::Result<()> { Ok(()) }
///     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(true) }
///     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
/// }
///
/// let page = Arc::new(HeapPages::new(1)); // a grant mapping, in real life
/// let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
/// init_server_page(&ControlPage::new(page.clone())?, &layout, &[], &[])?;
/// let mut ep = Endpoint::new(page, Side::Server, &layout, None, None, MyEvents)?;
/// ep.write(b"hello")?;
/// ep.close()?;
/// # Ok::<(), vchan::ring::RingError>(())
/// ```
pub struct Endpoint<E: Events, H: SharedHeader = ControlPage, B: RingBytes = RawRingBytes> {
    header: H,
    side: Side,
    layout: Layout,
    rx: Consumer<B>,
    tx: Producer<B>,
    blocking: bool,
    timeout: Option<Duration>,
    poll_interval: Duration,
    /// How long to busy-wait before requesting an event and sleeping.
    spin: SpinPolicy,
    closed: bool,
    /// ocaml-vchan's reader: `cons` is published at the next read, not
    /// after the copy (see [`Endpoint::set_lazy_ack`]).
    lazy_ack: bool,
    /// Bytes taken out of the read ring but not yet acknowledged.
    unacked: bool,
    events: E,
}

impl<E: Events, H: SharedHeader, B: RingBytes> fmt::Debug for Endpoint<E, H, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("side", &self.side)
            .field("left_order", &self.layout.left_order)
            .field("right_order", &self.layout.right_order)
            .field("rx_cons", &self.rx.cons())
            .field("tx_prod", &self.tx.prod())
            .field("blocking", &self.blocking)
            .field("timeout", &self.timeout)
            .field("spin", &self.spin.max())
            .field("closed", &self.closed)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl<E: Events> Endpoint<E> {
    /// An endpoint over a mapped control page and mapped rings, which it
    /// keeps mapped: the memory goes when the endpoint (and whatever else
    /// holds the mappings) is dropped, never before.
    ///
    /// `layout` is the validated layout ([`crate::control::server_layout`]
    /// on the server, [`crate::control::validate_client_orders`] on the
    /// client); its orders become the endpoint's private copy. `ctrl` holds
    /// the control page in its first 4 KiB (writable). For a ring that
    /// `layout` places in the page pass `None` (it is bytes of `ctrl`); for
    /// an external ring pass its virtually contiguous mapping of
    /// `1 << order` bytes, writable for our write ring
    /// (`side.write_ring()`); the client's read ring may be read-only.
    ///
    /// Our own indices are read once here (indices survive reconnects) and
    /// kept privately afterwards.
    ///
    /// # Errors
    /// [`RingError::RingAddress`] if a mapping contradicts the layout,
    /// [`RingError::Region`] if a mapping is too small or read-only where
    /// we write, [`RingError::Corrupt`] if the shared indices are already
    /// impossible.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(srv.read_ring_size(), 1024); // left, order 10, at byte 1024
    /// assert_eq!(srv.write_ring_size(), 2048); // right, order 11, at byte 2048
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn new(
        ctrl: Arc<dyn SharedMemory>,
        side: Side,
        layout: &Layout,
        left: Option<Arc<dyn SharedMemory>>,
        right: Option<Arc<dyn SharedMemory>>,
        events: E,
    ) -> Result<Self, RingError> {
        let header = ControlPage::new(ctrl.clone())?;
        let ring_bytes = |id: RingId, given: Option<Arc<dyn SharedMemory>>| {
            let size = layout.ring_size(id);
            match (layout.location(id), given) {
                (RingLocation::InPage { offset }, None) => {
                    Ok(RawRingBytes::new(ctrl.clone(), offset, size)?)
                }
                (RingLocation::InPage { .. }, Some(_)) => Err(RingError::RingAddress {
                    ring: id,
                    reason: "ring lives in the control page; pass no mapping",
                }),
                (RingLocation::External { .. }, None) => Err(RingError::RingAddress {
                    ring: id,
                    reason: "external ring needs its mapping, got none",
                }),
                (RingLocation::External { .. }, Some(m)) => Ok(RawRingBytes::new(m, 0, size)?),
            }
        };
        let left = ring_bytes(RingId::Left, left)?;
        let right = ring_bytes(RingId::Right, right)?;
        Endpoint::from_parts(header, side, layout, left, right, events)
    }
}

impl<E: Events, H: SharedHeader, B: RingBytes> Endpoint<E, H, B> {
    /// An endpoint over any [`SharedHeader`] and [`RingBytes`] (test
    /// doubles, the `loom` model). Blocking, no timeout, default poll
    /// interval.
    ///
    /// # Errors
    /// [`RingError::Geometry`] if storage sizes do not match the layout,
    /// [`RingError::Corrupt`] if the shared indices are already impossible.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// use vchan::ring::RawRingBytes;
    /// // Bytes 1024..2048 and 2048..4096 of the page are the two rings.
    /// let (left, right) = (RawRingBytes::new(page.clone(), 1024, 1024)?, RawRingBytes::new(page.clone(), 2048, 2048)?);
    /// let ep = Endpoint::from_parts(hdr, Side::Server, &layout, left, right, NoEvents)?;
    /// assert_eq!(ep.write_ring_size(), 2048);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn from_parts(
        header: H,
        side: Side,
        layout: &Layout,
        left: B,
        right: B,
        events: E,
    ) -> Result<Self, RingError> {
        let left = Ring::for_ring(left, layout.left_order, RingId::Left)?;
        let right = Ring::for_ring(right, layout.right_order, RingId::Right)?;
        let (rx_ring, tx_ring) = match side {
            Side::Server => (left, right),
            Side::Client => (right, left),
        };
        let rx = Consumer::new(&header, side, rx_ring)?;
        let tx = Producer::new(&header, side, tx_ring)?;
        Ok(Self {
            header,
            side,
            layout: *layout,
            rx,
            tx,
            blocking: true,
            timeout: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            spin: SpinPolicy::for_this_machine(),
            closed: false,
            lazy_ack: false,
            unacked: false,
            events,
        })
    }

    /// Our side.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(cli.side(), Side::Client);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn side(&self) -> Side {
        self.side
    }

    /// The validated layout (private copy of the orders).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!((srv.layout().left_order, srv.layout().right_order), (10, 11));
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Size of the ring we read.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(cli.read_ring_size(), 2048); // the client reads `right`
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn read_ring_size(&self) -> usize {
        self.layout.ring_size(self.side.read_ring())
    }

    /// Size of the ring we write.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(cli.write_ring_size(), 1024); // the client writes `left`
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn write_ring_size(&self) -> usize {
        self.layout.ring_size(self.side.write_ring())
    }

    /// The event source (e.g. to get its fd for `poll`).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.events().notify().unwrap();
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn events(&self) -> &E {
        &self.events
    }

    /// The shared header.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(srv.header().load_u8(CLI_LIVE), LIVE_CONNECTED);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn header(&self) -> &H {
        &self.header
    }

    /// Blocking (the default, as Qubes) or non-blocking mode.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// cli.set_blocking(false);
    /// let mut b = [0u8; 4];
    /// assert!(matches!(cli.read(&mut b), Err(RingError::WouldBlock))); // empty
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn set_blocking(&mut self, blocking: bool) {
        self.blocking = blocking;
    }

    /// Whether blocking mode is on.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert!(srv.is_blocking());
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn is_blocking(&self) -> bool {
        self.blocking
    }

    /// Upper bound for one blocking operation; `None` (default) waits as
    /// long as the peer is open and the page is sane. It is kept on the
    /// coarse monotonic clock ([`xen_base::coarse_now`], no system call
    /// even in a Xen PV guest): an operation never times out before
    /// `timeout`, and at most about two clock ticks (a few ms) after it.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// cli.set_timeout(Some(Duration::from_millis(20)));
    /// let mut b = [0u8; 4];
    /// assert!(matches!(cli.read(&mut b), Err(RingError::TimedOut { .. }))); // nothing came
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// The current timeout.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(srv.timeout(), None);
    /// srv.set_timeout(Some(Duration::from_secs(5)));
    /// assert_eq!(srv.timeout(), Some(Duration::from_secs(5)));
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// How long one wait may last before the shared state is re-validated
    /// (default [`DEFAULT_POLL_INTERVAL`]; at least 1 ms).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.set_poll_interval(Duration::from_millis(100));
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn set_poll_interval(&mut self, d: Duration) {
        self.poll_interval = d.max(Duration::from_millis(1));
    }

    /// How long a blocking call may busy-wait (re-loading the peer's index,
    /// no notification requested) before it requests an event and sleeps
    /// (default [`DEFAULT_SPIN`]; zero: never spin). Non-blocking calls and
    /// [`Endpoint::wait`] never spin.
    ///
    /// The bound adapts (halved after fruitless spins in a row, restored
    /// by a successful one, probed at full length now and then) and the
    /// spin yields the CPU after its first microsecond: see [`SpinPolicy`],
    /// which every waiting call of the endpoint shares.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.set_spin(Duration::ZERO); // never spin: sleep on the event at once
    /// assert_eq!(srv.spin(), Duration::ZERO);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn set_spin(&mut self, d: Duration) {
        self.spin.set_max(d);
    }

    /// The current spin bound.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.set_spin(Duration::from_micros(20));
    /// assert_eq!(srv.spin(), Duration::from_micros(20));
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn spin(&self) -> Duration {
        self.spin.max()
    }

    /// The spin policy every waiting call of this endpoint uses (its
    /// blocking calls and [`Endpoint::spin_for_data`] /
    /// [`Endpoint::spin_for_space`]), for an event loop that spins on the
    /// same adaptive bound before it sleeps.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.set_spin(Duration::from_micros(20));
    /// assert_eq!(srv.spin_policy().max(), Duration::from_micros(20));
    /// let woke = srv.spin_policy().spin_until(|| Ok::<_, RingError>(true))?;
    /// assert!(woke);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn spin_policy(&mut self) -> &mut SpinPolicy {
        &mut self.spin
    }

    /// Reads the way ocaml-vchan does (docs/vchan.md §12.1): a read acknowledges
    /// (publishes `cons` for, and sends the `NOTIFY_READ` event of) the
    /// *previous* read's bytes, then returns new ones without
    /// acknowledging them, and a stream read stops at the ring's wrap
    /// point. The peer's writer sees the space only when we read again.
    /// Off by default; turning it off acknowledges what is pending.
    ///
    /// ```
    /// # use vchan::endpoint::{Endpoint, Events};
    /// # fn f<E: Events>(ep: &mut Endpoint<E>) {
    /// ep.set_lazy_ack(true); // behave like a MirageOS reader
    /// assert!(ep.lazy_ack());
    /// # }
    /// ```
    pub fn set_lazy_ack(&mut self, on: bool) {
        if !on && self.unacked {
            self.rx.publish_cons(&self.header);
            self.unacked = false;
            let _ = self.after_consume();
        }
        self.lazy_ack = on;
    }

    /// Whether reads acknowledge lazily ([`Endpoint::set_lazy_ack`]).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone())?;
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert!(!cli.lazy_ack());
    /// cli.set_lazy_ack(true); // as ocaml-vchan's reader
    /// assert!(cli.lazy_ack());
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn lazy_ack(&self) -> bool {
        self.lazy_ack
    }

    /// Whether [`Endpoint::close`] was called.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert!(!srv.is_closed());
    /// srv.close()?;
    /// assert!(srv.is_closed());
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The peer's state from its live byte (one load).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(cli.peer_state(), PeerState::Connected);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn peer_state(&self) -> PeerState {
        let live = self.header.load_u8(self.side.peer_live());
        // FENCE (acquire after reading the live byte).
        // Forbids: index loads that follow being satisfied before this load.
        // A peer writes its last data, publishes `prod`, then stores live = 0
        // (with a fence in between); without this, a reader that sees
        // "closed" could still see the old `prod` and report EOF while the
        // peer's final bytes sit unread in the ring.
        #[cfg(not(all(loom, vchan_loom_no_live_acquire)))]
        self.header.fence(Ordering::Acquire);
        PeerState::from_live(self.side, live)
    }

    /// `peer_state().is_open()`.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert!(srv.is_open());
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn is_open(&self) -> bool {
        self.peer_state().is_open()
    }

    /// Bytes ready to read; requests a write notification first, as
    /// libxenvchan's `data_ready()` (the caller will likely sleep next).
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.write(b"abc")?;
    /// assert_eq!(cli.data_ready()?, 3);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn data_ready(&mut self) -> Result<usize, RingError> {
        Ok(self.rx.data_ready(&self.header)? as usize)
    }

    /// Free space in our write ring; requests a read notification first.
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(srv.buffer_space()?, 2048);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn buffer_space(&mut self) -> Result<usize, RingError> {
        Ok(self.tx.buffer_space(&self.header)? as usize)
    }

    /// Bytes ready to read, **without** requesting a notification: one load
    /// of the peer's `prod`, nothing written to shared memory.
    ///
    /// For the hot path of an event loop. A caller that is about to sleep
    /// on the event channel must call [`Endpoint::data_ready`] instead (it
    /// requests the event, then re-loads) and sleep only if that still
    /// reports 0 — else the peer's next write may come without an event.
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.write(b"abc")?;
    /// assert_eq!(cli.peek_data_ready()?, 3);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn peek_data_ready(&mut self) -> Result<usize, RingError> {
        Ok(self.rx.load_ready(&self.header)? as usize)
    }

    /// Free space in our write ring, **without** requesting a notification
    /// (as [`Endpoint::peek_data_ready`]; before sleeping for space use
    /// [`Endpoint::buffer_space`]).
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.write(b"abc")?;
    /// assert_eq!(srv.peek_buffer_space()?, 2045);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn peek_buffer_space(&mut self) -> Result<usize, RingError> {
        Ok(self.tx.load_space(&self.header)? as usize)
    }

    /// Busy-waits, for at most the adaptive spin bound (see
    /// [`Endpoint::set_spin`]), until at least `want` bytes (clamped to
    /// `1..=` the ring size) are ready to read: `Ok(true)` if they are.
    /// Requests no notification. For event loops that would otherwise
    /// sleep on the event channel right away: a peer running on another
    /// core is usually faster than an event and two wake-ups. After
    /// `Ok(false)`, request, re-check and sleep as usual
    /// ([`Endpoint::data_ready`]).
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.write(b"x")?;
    /// assert!(cli.spin_for_data(1)?);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn spin_for_data(&mut self, want: usize) -> Result<bool, RingError> {
        let want = clamp_u32(want.clamp(1, self.read_ring_size()));
        if self.rx.load_ready(&self.header)? >= want {
            return Ok(true);
        }
        self.spin_for(Dir::Read, want)
    }

    /// As [`Endpoint::spin_for_data`], for at least `want` bytes of free
    /// space in our write ring (before sleeping: [`Endpoint::buffer_space`]).
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert!(srv.spin_for_space(16)?);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn spin_for_space(&mut self, want: usize) -> Result<bool, RingError> {
        let want = clamp_u32(want.clamp(1, self.write_ring_size()));
        if self.tx.load_space(&self.header)? >= want {
            return Ok(true);
        }
        self.spin_for(Dir::Write, want)
    }

    /// Stream read: up to `buf.len()` bytes.
    ///
    /// Returns data whenever there is some, even after the peer closed.
    /// `Ok(0)` means end of stream (ring empty and peer closed) or an empty
    /// `buf`.
    ///
    /// # Errors
    /// [`RingError::WouldBlock`] (non-blocking, empty), [`RingError::Corrupt`],
    /// [`RingError::TimedOut`], [`RingError::Event`], [`RingError::Closed`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.write(b"hello")?;
    /// let mut b = [0u8; 16];
    /// assert_eq!(cli.read(&mut b)?, 5);
    /// srv.close()?;
    /// assert_eq!(cli.read(&mut b)?, 0); // the peer closed and nothing is left
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, RingError> {
        self.ensure_not_closed()?;
        self.ack_previous()?;
        if buf.is_empty() {
            return Ok(0);
        }
        // ocaml-vchan hands out one contiguous piece of the ring per read.
        let buf = if self.lazy_ack {
            let n = buf.len().min(self.rx.contiguous() as usize);
            &mut buf[..n]
        } else {
            buf
        };
        // Any data will do; all of `buf` if it is there.
        let need = Need::any(clamp_u32(buf.len()));
        match self.wait_for(Dir::Read, need, true, &mut None)? {
            Some(_) => self.consume(buf),
            // Closed and drained: EOF.
            None => Ok(0),
        }
    }

    /// Stream write.
    ///
    /// Blocking: writes all of `buf`, waiting for space as needed.
    /// Non-blocking: writes what fits now.
    ///
    /// If the peer closes (or the timeout expires) after part of `buf` was
    /// written, returns that count (as `std::io::Write` requires); the next
    /// call reports the error.
    ///
    /// # Errors
    /// [`RingError::PeerClosed`] if the peer is not open at entry or closes
    /// while we wait with nothing written yet; [`RingError::WouldBlock`]
    /// (non-blocking, ring full); [`RingError::Corrupt`],
    /// [`RingError::TimedOut`], [`RingError::Event`], [`RingError::Closed`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(cli.write(b"to the server")?, 13);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, RingError> {
        self.ensure_not_closed()?;
        if !self.peer_state().is_open() {
            return Err(RingError::PeerClosed);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let mut pos = 0;
        let mut deadline = None;
        let batch_cap = clamp_u32(self.write_ring_size() / 2).min(WRITE_BATCH);
        loop {
            let want = clamp_u32(buf.len() - pos);
            // Until we have spun, write only in batches (see WRITE_BATCH);
            // once a notification is requested, any space will do.
            let batch = want.min(batch_cap).max(1);
            let need = Need {
                spin: Amount::exactly(batch),
                armed: Amount { want, need: 1 },
            };
            match self.wait_for(Dir::Write, need, pos == 0, &mut deadline) {
                Ok(Some(_)) => {}
                Ok(None) if pos > 0 => return Ok(pos),
                Ok(None) => return Err(RingError::PeerClosed),
                Err(RingError::TimedOut) if pos > 0 => return Ok(pos),
                Err(e) => return Err(e),
            }
            pos += self.tx.push(&self.header, &buf[pos..]);
            self.after_produce()?;
            if pos == buf.len() || !self.blocking {
                return Ok(pos);
            }
        }
    }

    /// Moves at most `max` bytes from `fd` straight into the write ring's
    /// free space with one `read(2)` (no buffer in between: the one-copy
    /// path of qubes-issues #9077), publishes them and notifies the peer if
    /// it asked. Never waits for ring space, whatever the blocking mode.
    /// `Ok(0)`: end of file on `fd` (or `max == 0`).
    ///
    /// The kernel writes into the ring memory; no Rust reference to it is
    /// made and the indices stay private, so a peer that scribbles on the
    /// free space can only spoil the bytes it is about to receive.
    ///
    /// # Errors
    /// [`FdError::Ring`] with [`RingError::WouldBlock`] when the ring is
    /// full (a notification has then been requested: poll the event fd),
    /// [`RingError::PeerClosed`], [`RingError::Corrupt`], …;
    /// [`FdError::Fd`] with the error of `read(2)` (`WouldBlock` for an
    /// empty non-blocking fd).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone())?;
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// use std::io::Write;
    /// use std::os::fd::AsFd;
    /// let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
    /// w.write_all(b"from the fd").unwrap();
    /// assert_eq!(srv.read_from_fd(r.as_fd(), 4096).unwrap(), 11);
    /// let mut got = [0u8; 11];
    /// assert_eq!(cli.read(&mut got)?, 11);
    /// assert_eq!(&got, b"from the fd");
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn read_from_fd(&mut self, fd: BorrowedFd<'_>, max: usize) -> Result<usize, FdError> {
        self.ensure_not_closed()?;
        if !self.peer_state().is_open() {
            return Err(RingError::PeerClosed.into());
        }
        if max == 0 {
            return Ok(0);
        }
        // FRESH: validate the peer's index before moving a byte.
        let space = self.tx.fast_space(&self.header, FRESH, 1)?;
        if space == 0 {
            return Err(RingError::WouldBlock.into());
        }
        let n = self
            .tx
            .push_from_fd(&self.header, fd, max)
            .map_err(FdError::Fd)?;
        if n > 0 {
            self.after_produce()?;
        }
        Ok(n)
    }

    /// One framed message straight from `fd` (see
    /// [`Producer::push_framed_from_fd`](crate::ring::Producer::push_framed_from_fd)):
    /// at most `max` payload bytes read into the ring behind room for an
    /// `N`-byte header, then `header(len)` in front, published together;
    /// notifies the peer if it asked. Never waits for space. `Ok(0)`: end
    /// of file on `fd` (nothing sent), or `max == 0`.
    ///
    /// # Errors
    /// As [`Endpoint::read_from_fd`]; [`RingError::WouldBlock`] when there
    /// is no room for the header and one byte.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone())?;
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// use std::io::Write;
    /// use std::os::fd::AsFd;
    /// let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
    /// w.write_all(b"payload").unwrap();
    /// // A 2-byte length header in front of what the fd gave.
    /// let n = srv.send_framed_from_fd(r.as_fd(), 4096, |n| (n as u16).to_le_bytes()).unwrap();
    /// assert_eq!(n, 7);
    /// let mut got = [0u8; 9];
    /// assert_eq!(cli.recv(&mut got)?, 9);
    /// assert_eq!(&got, b"\x07\x00payload");
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn send_framed_from_fd<const N: usize>(
        &mut self,
        fd: BorrowedFd<'_>,
        max: usize,
        header: impl FnOnce(usize) -> [u8; N],
    ) -> Result<usize, FdError> {
        self.ensure_not_closed()?;
        if !self.peer_state().is_open() {
            return Err(RingError::PeerClosed.into());
        }
        if max == 0 {
            return Ok(0);
        }
        let hdr = clamp_u32(N);
        // FRESH: validate the peer's index before moving a byte.
        let space = self
            .tx
            .fast_space(&self.header, FRESH, hdr.saturating_add(1))?;
        if space <= hdr {
            return Err(RingError::WouldBlock.into());
        }
        let n = self
            .tx
            .push_framed_from_fd(&self.header, fd, max, header)
            .map_err(FdError::Fd)?;
        if n > 0 {
            self.after_produce()?;
        }
        Ok(n)
    }

    /// Moves at most `max` ready bytes from the read ring straight to `fd`
    /// with one `write(2)`, consumes what the kernel took and notifies the
    /// peer if it asked. Never waits for data, whatever the blocking mode.
    /// `Ok(0)`: end of stream (the peer closed and everything was read), or
    /// `max == 0`.
    ///
    /// # Errors
    /// [`FdError::Ring`] with [`RingError::WouldBlock`] when nothing is
    /// ready (a notification has then been requested), [`RingError::Corrupt`],
    /// …; [`FdError::Fd`] with the error of `write(2)` (nothing is consumed
    /// then).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone())?;
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// use std::io::Read;
    /// use std::os::fd::AsFd;
    /// use vchan::endpoint::FdError;
    /// let (w, mut r) = std::os::unix::net::UnixStream::pair().unwrap();
    /// // Nothing to move yet: the ring's WouldBlock, not the fd's.
    /// assert!(matches!(cli.write_to_fd(w.as_fd(), 4096), Err(FdError::Ring(RingError::WouldBlock))));
    /// srv.write(b"to the fd")?;
    /// assert_eq!(cli.write_to_fd(w.as_fd(), 4096).unwrap(), 9);
    /// let mut got = [0u8; 9];
    /// r.read_exact(&mut got).unwrap();
    /// assert_eq!(&got, b"to the fd");
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn write_to_fd(&mut self, fd: BorrowedFd<'_>, max: usize) -> Result<usize, FdError> {
        self.ensure_not_closed()?;
        // Lazy (ocaml-vchan) mode: what earlier reads took is acknowledged
        // first; this path itself acknowledges at once.
        self.ack_previous()?;
        if max == 0 {
            return Ok(0);
        }
        // FRESH: validate the peer's index before moving a byte.
        let mut ready = self.rx.fast_ready(&self.header, FRESH, 1)?;
        if ready == 0 {
            if self.peer_state() != PeerState::Closed {
                return Err(RingError::WouldBlock.into());
            }
            // Closed: what it wrote before closing is still delivered
            // (`peer_state`'s acquire fence makes this load see it).
            ready = self.rx.load_ready(&self.header)?;
            if ready == 0 {
                return Ok(0);
            }
        }
        let n = self
            .rx
            .pop_to_fd(&self.header, fd, max)
            .map_err(FdError::Fd)?;
        if n > 0 {
            self.after_consume()?;
        }
        Ok(n)
    }

    /// Packet send: all of `buf` or nothing. Returns `buf.len()`.
    ///
    /// # Errors
    /// [`RingError::TooBig`] if `buf` is larger than the write ring (never a
    /// hang); [`RingError::PeerClosed`] if the peer is not open at entry or
    /// closes while we wait; [`RingError::WouldBlock`] (non-blocking, not
    /// enough space); [`RingError::Corrupt`], [`RingError::TimedOut`],
    /// [`RingError::Event`], [`RingError::Closed`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert_eq!(srv.send(b"packet")?, 6);
    /// assert!(matches!(srv.send(&[0; 4096]), Err(RingError::TooBig { .. }))); // > 2 KiB ring
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn send(&mut self, buf: &[u8]) -> Result<usize, RingError> {
        self.ensure_not_closed()?;
        if !self.peer_state().is_open() {
            return Err(RingError::PeerClosed);
        }
        let size = self.write_ring_size();
        if buf.len() > size {
            return Err(RingError::TooBig {
                len: buf.len(),
                ring: size,
            });
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let need = Need::all(clamp_u32(buf.len()));
        if self.wait_for(Dir::Write, need, true, &mut None)?.is_none() {
            return Err(RingError::PeerClosed);
        }
        let written = self.tx.push(&self.header, buf);
        debug_assert_eq!(written, buf.len());
        self.after_produce()?;
        Ok(written)
    }

    /// Packet receive: exactly `buf.len()` bytes or nothing. Returns
    /// `buf.len()`.
    ///
    /// # Errors
    /// [`RingError::TooBig`] if `buf` is larger than the read ring;
    /// [`RingError::PeerClosed`] if the peer closed and fewer than
    /// `buf.len()` bytes remain (they stay readable with [`Endpoint::read`]);
    /// [`RingError::WouldBlock`]; [`RingError::Corrupt`],
    /// [`RingError::TimedOut`], [`RingError::Event`], [`RingError::Closed`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.send(b"packet")?;
    /// let mut b = [0u8; 6];
    /// assert_eq!(cli.recv(&mut b)?, 6);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<usize, RingError> {
        self.ensure_not_closed()?;
        self.ack_previous()?;
        let size = self.read_ring_size();
        if buf.len() > size {
            return Err(RingError::TooBig {
                len: buf.len(),
                ring: size,
            });
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let need = Need::all(clamp_u32(buf.len()));
        match self.wait_for(Dir::Read, need, true, &mut None)? {
            Some(_) => self.consume(buf),
            // Closed with fewer bytes left than asked for.
            None => Err(RingError::PeerClosed),
        }
    }

    /// Blocks until an event arrives, like libxenvchan's `wait()`.
    ///
    /// Also returns (a permitted spurious wake-up) when a poll interval
    /// passes and the peer's state or indices changed without an event (a
    /// peer process killed with its unmap-notify lost, an old client that
    /// never signals connect). Re-check the state after it returns.
    ///
    /// # Errors
    /// [`RingError::Corrupt`], [`RingError::TimedOut`] (endpoint timeout),
    /// [`RingError::Event`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// cli.set_timeout(Some(Duration::from_millis(20)));
    /// // No event and no change of the rings or the live bytes: it times out.
    /// assert!(matches!(cli.wait(), Err(RingError::TimedOut { .. })));
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn wait(&mut self) -> Result<(), RingError> {
        let entry_state = self.peer_state();
        let entry_ready = self.rx.load_ready(&self.header)?;
        let entry_space = self.tx.load_space(&self.header)?;
        let mut deadline = None;
        loop {
            if self.wait_once(&mut deadline)? {
                return self.check();
            }
            self.check()?;
            if self.peer_state() != entry_state
                || self.rx.cached_ready() != entry_ready
                || self.tx.cached_space() != entry_space
            {
                return Ok(());
            }
        }
    }

    /// Consumes a pending event without blocking (for callers that poll the
    /// event fd themselves): `Ok(true)` if there was one.
    ///
    /// # Errors
    /// [`RingError::Event`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// assert!(!cli.consume_pending()?);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn consume_pending(&self) -> Result<bool, RingError> {
        self.events.consume_pending().map_err(RingError::Event)
    }

    /// Re-validates the shared header against our private state: both order
    /// fields unchanged, both rings' indices in range. Run after every
    /// wake-up; callable any time.
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// srv.check()?;
    /// hdr.store_u16(LEFT_ORDER, 12); // a hostile peer rewrites an order
    /// assert!(srv.check().is_err());
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn check(&mut self) -> Result<(), RingError> {
        for id in [RingId::Left, RingId::Right] {
            let expected = self.layout.order(id);
            let found = self.header.load_u16(id.order_offset());
            if found != u16::from(expected) {
                return Err(RingError::Corrupt {
                    ring: id,
                    what: Corruption::OrderChanged { expected, found },
                });
            }
        }
        self.rx.load_ready(&self.header)?;
        self.tx.load_space(&self.header)?;
        Ok(())
    }

    /// Closes our end: stores our live byte = 0, then sends one event.
    /// Idempotent. The memory stays mapped (the owner unmaps it afterwards);
    /// later I/O calls fail with [`RingError::Closed`].
    ///
    /// # Errors
    /// [`RingError::Event`] if the event could not be sent (the live byte
    /// is stored regardless).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// cli.close()?;
    /// assert_eq!(hdr.load_u8(CLI_LIVE), LIVE_EXITED);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn close(&mut self) -> Result<(), RingError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        store_closed(&self.header, self.side);
        self.events.notify().map_err(RingError::Event)
    }

    /// Takes the endpoint apart, without closing it, so that its owner can
    /// close and release the memory in an order of its choosing (the
    /// shared-memory transports follow libxenvchan's: rings first, then
    /// own live byte 0, then the control page, docs/vchan.md §10.1).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone())?;
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// # let mut cli = Endpoint::new(page.clone(), Side::Client, &layout, None, None, NoEvents)?;
    /// # announce_client_connected(&hdr);
    /// let mut parts = cli.into_parts();
    /// drop((parts.rx, parts.tx)); // the rings' hold on the memory goes first
    /// parts.close.close(&parts.header, &parts.events)?;
    /// assert_eq!(parts.header.load_u8(CLI_LIVE), LIVE_EXITED);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn into_parts(self) -> EndpointParts<E, H, B> {
        EndpointParts {
            header: self.header,
            rx: self.rx,
            tx: self.tx,
            events: self.events,
            close: Closer {
                side: self.side,
                closed: self.closed,
            },
        }
    }

    fn ensure_not_closed(&self) -> Result<(), RingError> {
        if self.closed {
            Err(RingError::Closed)
        } else {
            Ok(())
        }
    }

    /// The one waiting loop of [`read`](Self::read),
    /// [`write`](Self::write), [`send`](Self::send) and
    /// [`recv`](Self::recv) (docs/vchan.md §5.4 and §5.6): until `dir` has
    /// enough (bytes ready to read, or free space to write), in this order:
    ///
    /// 1. look without requesting a notification (blocking calls only: a
    ///    cached count that covers `need.spin.want` needs no load); enough
    ///    but less than the call wants, and unable to spin: request one
    ///    anyway ([`request_early`](Self::request_early));
    /// 2. spin for at most the adaptive bound ([`SpinPolicy`]);
    /// 3. request a notification and look again (the Dekker re-check of
    ///    [`Consumer::fast_ready`] / [`Producer::fast_space`]);
    /// 4. reading: the peer's liveness, only now (data written before a
    ///    close is still delivered); non-blocking: `WouldBlock`;
    /// 5. sleep for at most the poll interval (bounded by `deadline`),
    ///    re-validate the shared header, and (writing) check the peer is
    ///    still open; then from 1 again.
    ///
    /// `Ok(Some(n))`: `n` bytes (at least the phase's `need`) are there,
    /// and the ring's cached count says so. `Ok(None)`: the peer has
    /// closed; reading, with fewer than `need.armed.need` bytes left.
    /// Every pass loads each peer index once per look; a peer that keeps
    /// changing its index cannot keep us from blocking (the closed
    /// re-check does not loop).
    ///
    /// # Errors
    /// [`RingError::WouldBlock`] (non-blocking), [`RingError::TimedOut`]
    /// (the endpoint's timeout, counted from the first sleep of `deadline`),
    /// [`RingError::Corrupt`], [`RingError::Event`].
    fn wait_for(
        &mut self,
        dir: Dir,
        need: Need,
        fresh: bool,
        deadline: &mut Option<Duration>,
    ) -> Result<Option<u32>, RingError> {
        // Until we have spun once, look without requesting a notification.
        let mut spin = self.blocking;
        // The first look of a call loads the peer's index even when the
        // cached count would do (`FRESH` wants more than any ring holds): a
        // peer that corrupted it since our last call is caught before we
        // move a byte, not at the first call the cache cannot cover. It is
        // the one load of that decision (the cached count is not used).
        let mut fresh = fresh;
        loop {
            let (have, enough) = if spin {
                let want = if fresh { FRESH } else { need.spin.want };
                (self.peek(dir, want)?, need.spin.need)
            } else {
                let want = if fresh { FRESH } else { need.armed.want };
                let amount = Amount { want, ..need.armed };
                (self.fast(dir, amount)?, need.armed.need)
            };
            fresh = false;
            if have >= enough {
                if have < need.armed.want && self.blocking && self.spin.max().is_zero() {
                    self.request_early(dir)?;
                }
                return Ok(Some(have));
            }
            if spin {
                spin = false;
                self.spin_for(dir, need.spin.need)?;
                continue;
            }
            if dir == Dir::Read && self.peer_state() == PeerState::Closed {
                // The peer may have written and closed between our index
                // load and the live load; `peer_state`'s acquire fence makes
                // this re-load see everything it published before closing.
                // (No `continue` here: a peer flipping `prod` must not be
                // able to keep us looping without ever blocking.)
                let have = self.rx.load_ready(&self.header)?;
                return Ok((have >= need.armed.need).then_some(have));
            }
            if !self.blocking {
                return Err(RingError::WouldBlock);
            }
            self.block(deadline)?;
            if dir == Dir::Write && !self.peer_state().is_open() {
                return Ok(None);
            }
            spin = true;
        }
    }

    /// A blocking call that cannot spin (one CPU, or [`set_spin`] to zero)
    /// and is about to return with less than it wanted requests the
    /// notification now, as libxenvchan does in every such call
    /// (`fast_get_data_ready` / `fast_get_buffer_space`): the caller is
    /// likely to call again and sleep, and with one CPU the peer runs only
    /// while we sleep, so an early request costs no event the late one
    /// would not. Measured in the lab on one vCPU (docs/vchan.md §16 row
    /// U): about 3 % more throughput at 64 KiB rings than asking just
    /// before the sleep. Where we can spin, we ask only before sleeping
    /// (an early request there makes the running peer send an event per
    /// publish).
    ///
    /// [`set_spin`]: Self::set_spin
    fn request_early(&mut self, dir: Dir) -> Result<(), RingError> {
        match dir {
            Dir::Read => self.rx.data_ready(&self.header).map(drop),
            Dir::Write => self.tx.buffer_space(&self.header).map(drop),
        }
    }

    /// A look without requesting a notification: the cached count if it
    /// covers `want`, else one load of the peer's index.
    fn peek(&mut self, dir: Dir, want: u32) -> Result<u32, RingError> {
        let cached = match dir {
            Dir::Read => self.rx.cached_ready(),
            Dir::Write => self.tx.cached_space(),
        };
        if cached >= want {
            return Ok(cached);
        }
        match dir {
            Dir::Read => self.rx.load_ready(&self.header),
            Dir::Write => self.tx.load_space(&self.header),
        }
    }

    /// A look that requests a notification (and re-checks) when the ring
    /// has less than `amount.need`.
    fn fast(&mut self, dir: Dir, amount: Amount) -> Result<u32, RingError> {
        match dir {
            Dir::Read => self.rx.fast_ready(&self.header, amount.want, amount.need),
            Dir::Write => self.tx.fast_space(&self.header, amount.want, amount.need),
        }
    }

    /// Busy-waits (the endpoint's [`SpinPolicy`]) until `dir` has at least
    /// `need` bytes: `Ok(true)` if it has. Requests no notification, so the
    /// peer sends no event for what we catch here; after a fruitless spin
    /// the caller requests one, re-checks (the Dekker re-load of
    /// docs/vchan.md §5.4) and only then sleeps.
    fn spin_for(&mut self, dir: Dir, need: u32) -> Result<bool, RingError> {
        match dir {
            Dir::Read => self
                .spin
                .spin_until(|| self.rx.load_ready(&self.header).map(|n| n >= need)),
            Dir::Write => self
                .spin
                .spin_until(|| self.tx.load_space(&self.header).map(|n| n >= need)),
        }
    }

    /// Copies out what the last validated `prod` allows (all of `buf` for
    /// `recv`, whose caller checked), publishes `cons`, notifies if asked.
    fn consume(&mut self, buf: &mut [u8]) -> Result<usize, RingError> {
        if self.lazy_ack {
            let n = self.rx.take(&self.header, buf);
            self.unacked |= n > 0;
            return Ok(n);
        }
        let n = self.rx.pop(&self.header, buf);
        self.after_consume()?;
        Ok(n)
    }

    /// Lazy mode only: publishes `cons` for what the previous read took and
    /// test-and-clears the peer's `NOTIFY_READ` request, as ocaml-vchan does
    /// at the start of every read (even when there is nothing to publish).
    fn ack_previous(&mut self) -> Result<(), RingError> {
        if !self.lazy_ack {
            return Ok(());
        }
        if self.unacked {
            self.rx.publish_cons(&self.header);
            self.unacked = false;
        }
        self.after_consume()
    }

    fn after_consume(&mut self) -> Result<(), RingError> {
        if self.rx.notify_consumed(&self.header) {
            self.events.notify().map_err(RingError::Event)?;
        }
        Ok(())
    }

    fn after_produce(&mut self) -> Result<(), RingError> {
        if self.tx.notify_produced(&self.header) {
            self.events.notify().map_err(RingError::Event)?;
        }
        Ok(())
    }

    /// One bounded wait: at most a poll interval, at most until the
    /// deadline. `Ok(true)` if an event was consumed.
    ///
    /// The deadline is on [`xen_base::coarse_now`], not `Instant::now()`,
    /// which is a system call in a Xen PV guest (one per wait of every call
    /// with a timeout). A coarse reading lags by less than one tick, so the
    /// deadline is one tick later than `timeout`: the call never times out
    /// early, and at most about two ticks late.
    fn wait_once(&mut self, deadline: &mut Option<Duration>) -> Result<bool, RingError> {
        let mut slice = self.poll_interval;
        if let Some(timeout) = self.timeout {
            let now = xen_base::coarse_now();
            let dl = *deadline.get_or_insert_with(|| {
                now.saturating_add(timeout)
                    .saturating_add(xen_base::coarse_resolution())
            });
            if now >= dl {
                return Err(RingError::TimedOut);
            }
            slice = slice.min(dl - now);
        }
        match self.events.wait_timeout(slice) {
            Ok(woken) => Ok(woken),
            // docs/vchan.md §13 row 23: an interrupted wait is a spurious wake-up.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(RingError::Event(e)),
        }
    }

    /// Waits once, then re-validates; the caller re-checks indices and live
    /// bytes (events coalesce, may be spurious, and may never come).
    fn block(&mut self, deadline: &mut Option<Duration>) -> Result<(), RingError> {
        self.wait_once(deadline)?;
        self.check()
    }
}

/// Our live byte = 0, after everything we published (the close of
/// [`Endpoint::close`] and [`Closer::close`]).
fn store_closed<H: SharedHeader>(header: &H, side: Side) {
    // FENCE (release before the live byte).
    // Forbids: `live = 0` becoming visible before our last index stores.
    // Without it the peer could see us closed, re-load our `prod`, find
    // it old and report EOF with our final bytes still in flight.
    header.fence(Ordering::SeqCst);
    header.store_u8(side.own_live(), LIVE_EXITED);
}

/// An [`Endpoint`] taken apart ([`Endpoint::into_parts`]): each piece
/// holds its share of the shared memory and lets it go when dropped.
///
/// ```
/// # use std::io;
/// # use std::time::Duration;
/// # use vchan::control::*;
/// # use vchan::endpoint::{Endpoint, Events, PeerState};
/// # use vchan::ring::RingError;
/// # #[derive(Debug)]
/// # struct NoEvents; // both ends in one process: nothing to signal
/// # impl Events for NoEvents {
/// #     fn notify(&self) -> io::Result<()> { Ok(()) }
/// #     fn wait(&self) -> io::Result<()> { Ok(()) }
/// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
/// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
/// # }
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
/// # let hdr = ControlPage::new(page.clone())?;
/// # init_server_page(&hdr, &layout, &[], &[])?;
/// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
/// let parts = srv.into_parts();
/// assert_eq!(parts.tx.id(), RingId::Right);
/// # Ok::<(), RingError>(())
/// ```
#[derive(Debug)]
pub struct EndpointParts<E, H, B> {
    /// The shared header (the control page).
    pub header: H,
    /// Our read ring.
    pub rx: Consumer<B>,
    /// Our write ring.
    pub tx: Producer<B>,
    /// The event channel.
    pub events: E,
    /// The close the endpoint had not done yet, if any.
    pub close: Closer,
}

/// The close of an endpoint taken apart ([`EndpointParts`]): the same
/// stores and event as [`Endpoint::close`], once.
///
/// ```
/// # use std::io;
/// # use std::time::Duration;
/// # use vchan::control::*;
/// # use vchan::endpoint::{Endpoint, Events, PeerState};
/// # use vchan::ring::RingError;
/// # #[derive(Debug)]
/// # struct NoEvents; // both ends in one process: nothing to signal
/// # impl Events for NoEvents {
/// #     fn notify(&self) -> io::Result<()> { Ok(()) }
/// #     fn wait(&self) -> io::Result<()> { Ok(()) }
/// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
/// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
/// # }
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
/// # let hdr = ControlPage::new(page.clone())?;
/// # init_server_page(&hdr, &layout, &[], &[])?;
/// # let mut srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
/// srv.close()?;
/// let mut parts = srv.into_parts();
/// assert!(parts.close.is_closed()); // already closed: closing again does nothing
/// parts.close.close(&parts.header, &parts.events)?;
/// # Ok::<(), RingError>(())
/// ```
#[derive(Debug)]
pub struct Closer {
    side: Side,
    closed: bool,
}

impl Closer {
    /// Whether the endpoint is closed already.
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone())?;
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// assert!(!srv.into_parts().close.is_closed());
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// As [`Endpoint::close`]: our live byte = 0 (after a fence), then one
    /// event; nothing if closed already.
    ///
    /// # Errors
    /// [`RingError::Event`] if the event could not be sent (the live byte
    /// is stored regardless).
    ///
    /// ```
    /// # use std::io;
    /// # use std::time::Duration;
    /// # use vchan::control::*;
    /// # use vchan::endpoint::{Endpoint, Events, PeerState};
    /// # use vchan::ring::RingError;
    /// # #[derive(Debug)]
    /// # struct NoEvents; // both ends in one process: nothing to signal
    /// # impl Events for NoEvents {
    /// #     fn notify(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait(&self) -> io::Result<()> { Ok(()) }
    /// #     fn wait_timeout(&self, _d: Duration) -> io::Result<bool> { Ok(false) }
    /// #     fn consume_pending(&self) -> io::Result<bool> { Ok(false) }
    /// # }
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let layout = server_layout(0, 0)?; // orders 10/11: both rings in the page
    /// # let hdr = ControlPage::new(page.clone())?;
    /// # init_server_page(&hdr, &layout, &[], &[])?;
    /// # let srv = Endpoint::new(page.clone(), Side::Server, &layout, None, None, NoEvents)?;
    /// let mut parts = srv.into_parts();
    /// parts.close.close(&parts.header, &parts.events)?;
    /// assert_eq!(hdr.load_u8(SRV_LIVE), LIVE_EXITED);
    /// # Ok::<(), RingError>(())
    /// ```
    pub fn close<H: SharedHeader, E: Events>(
        &mut self,
        header: &H,
        events: &E,
    ) -> Result<(), RingError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        store_closed(header, self.side);
        events.notify().map_err(RingError::Event)
    }
}

/// Which way a waiting call moves bytes: it waits for data to read or for
/// space to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

/// A byte count for one phase of a wait.
#[derive(Debug, Clone, Copy)]
struct Amount {
    /// What the caller could use: a cached count this large needs no load.
    want: u32,
    /// Enough to stop waiting.
    need: u32,
}

impl Amount {
    fn exactly(n: u32) -> Self {
        Amount { want: n, need: n }
    }
}

/// What a waiting call needs before and after it requests a notification.
#[derive(Debug, Clone, Copy)]
struct Need {
    /// While looking and spinning, no notification requested.
    spin: Amount,
    /// Once a notification is requested.
    armed: Amount,
}

impl Need {
    /// A stream call: any byte will do, `want` if they are there.
    fn any(want: u32) -> Self {
        let a = Amount { want, need: 1 };
        Need { spin: a, armed: a }
    }

    /// A packet call: all `n` bytes or nothing.
    fn all(n: u32) -> Self {
        let a = Amount::exactly(n);
        Need { spin: a, armed: a }
    }
}

impl<E: Events, H: SharedHeader, B: RingBytes> io::Read for Endpoint<E, H, B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Endpoint::read(self, buf).map_err(io::Error::from)
    }
}

impl<E: Events, H: SharedHeader, B: RingBytes> io::Write for Endpoint<E, H, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Endpoint::write(self, buf).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_state_mapping() {
        for v in 0..=255u8 {
            let server = PeerState::from_live(Side::Server, v);
            let client = PeerState::from_live(Side::Client, v);
            match v {
                1 => assert_eq!(
                    (server, client),
                    (PeerState::Connected, PeerState::Connected)
                ),
                2 => assert_eq!((server, client), (PeerState::Waiting, PeerState::Closed)),
                _ => assert_eq!((server, client), (PeerState::Closed, PeerState::Closed)),
            }
        }
        assert!(PeerState::Waiting.is_open());
        assert!(!PeerState::Closed.is_open());
    }

    #[test]
    fn ring_errors_map_to_io_kinds() {
        use io::ErrorKind as K;
        let cases = [
            (
                RingError::Corrupt {
                    ring: RingId::Left,
                    what: Corruption::OrderChanged {
                        expected: 10,
                        found: 3,
                    },
                },
                K::InvalidData,
            ),
            (RingError::PeerClosed, K::BrokenPipe),
            (RingError::Closed, K::NotConnected),
            (RingError::TooBig { len: 5, ring: 4 }, K::InvalidInput),
            (RingError::WouldBlock, K::WouldBlock),
            (RingError::TimedOut, K::TimedOut),
            (
                RingError::Event(io::Error::from(K::PermissionDenied)),
                K::PermissionDenied,
            ),
        ];
        for (e, kind) in cases {
            let msg = e.to_string();
            let io = io::Error::from(e);
            assert_eq!(io.kind(), kind, "{msg}");
            assert_eq!(io.to_string(), msg);
        }
    }
}
