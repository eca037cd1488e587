// Why this file is long (~2150 lines): about 980 are doc comments (370 of
// them hidden example set-up) and 440 the unit tests that Miri runs in CI
// (every shared-memory access of the ring); the code, about 730 lines, is
// one concern: a ring's two ends, their fences and the notify protocol,
// which read best side by side.
//! The two byte rings of a vchan and the notification protocol, written so
//! that every byte of shared memory is hostile.
//!
//! A ring ([`Ring`]) owns nothing but its byte storage (a raw pointer and a
//! size, [`RawRingBytes`]) and a private copy of its validated order. Its
//! two ends are [`Producer`] (we write data and advance `prod`) and
//! [`Consumer`] (we read data and advance `cons`). The rules, from docs/vchan.md §5:
//!
//! * **Our own index is private.** We are its only legitimate writer, so we
//!   keep it in the struct and only ever *store* it; a peer scribbling over
//!   it changes nothing on our side.
//! * **The peer's index is read once per decision** (XSA-155): one atomic
//!   load, then the value is used for the arithmetic, the bounds check and
//!   the copy. It is cached and re-read only when the cached value is not
//!   enough for the request.
//! * **Arithmetic is wrapping `u32`** and the result is checked against the
//!   ring size (XSA-86). Where libxenvchan silently treats `ready > size` or
//!   `space > size` as 0 and hangs (qubes-issues #10833), we return
//!   [`RingError::Corrupt`].
//! * **Every offset is masked** with `size − 1`, and data is copied with
//!   `ptr::copy_nonoverlapping` between the ring and private buffers (two
//!   copies across the wrap point). No `&[u8]`/`&mut [u8]` into a ring ever
//!   exists.
//! * **Fences follow docs/vchan.md §5.2–§5.5** and go through [`SharedHeader::fence`]
//!   so that the `loom` model (`tests/loom_notify.rs`) checks this very code.
//!   Each names the reordering it forbids and the failure it prevents.
//!
//! The blocking policy (waiting on events, liveness, timeouts) lives in
//! [`crate::endpoint`]; this module never blocks.
//!
//! ```
//! use vchan::control::{ControlPage, Layout, Side, SharedHeader, PAGE_SIZE, init_server_page};
//! use vchan::ring::{Consumer, Producer, RawRingBytes, Ring};
//!
//! let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
//! let hdr = ControlPage::new(page.clone()).unwrap();
//! let layout = Layout::new(10, 11).unwrap();
//! init_server_page(&hdr, &layout, &[], &[]).unwrap();
//!
//! // The server's write ring is the order-11 ring at byte 2048 of the page.
//! let right = RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
//! let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right, 11).unwrap()).unwrap();
//! // The client's view of the same ring.
//! let right = RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
//! let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right, 11).unwrap()).unwrap();
//!
//! assert_eq!(tx.fast_space(&hdr, 5, 5).unwrap(), 2048);
//! assert_eq!(tx.push(&hdr, b"hello"), 5);
//! assert_eq!(rx.fast_ready(&hdr, 5, 1).unwrap(), 5);
//! let mut buf = [0u8; 8];
//! assert_eq!(rx.pop(&hdr, &mut buf), 5);
//! assert_eq!(&buf[..5], b"hello");
//! ```

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::Ordering;

use std::sync::Arc;

use crate::control::{
    ControlError, MAX_RING_SHIFT, MIN_RING_SHIFT, NOTIFY_READ, NOTIFY_WRITE, RingId, SharedHeader,
    Side,
};
use crate::mem::{RegionError, SharedMemory, checked_range};

// ---------------------------------------------------------------------------
// Errors

/// What a peer corrupted.
///
/// ```
/// # use vchan::control::*;
/// # use vchan::ring::*;
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
/// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
/// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
/// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
/// hdr.store_u32(RIGHT_PROD, 5000); // the server "produced" more than the ring holds
/// assert!(matches!(
///     rx.load_ready(&hdr),
///     Err(RingError::Corrupt { what: Corruption::Indices { prod: 5000, cons: 0, size: 2048 }, .. })
/// ));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// `prod − cons` (wrapping `u32`) exceeds the ring size: the peer wrote
    /// an impossible index (XSA-86 territory).
    #[error("prod {prod:#x} − cons {cons:#x} = {} exceeds the ring size {size}", prod.wrapping_sub(*cons))]
    Indices {
        /// Producer index as used in the computation.
        prod: u32,
        /// Consumer index as used in the computation.
        cons: u32,
        /// Ring size in bytes.
        size: u32,
    },
    /// The order field in shared memory differs from the order validated at
    /// connect time (it must stay constant).
    #[error("order changed from {expected} to {found}")]
    OrderChanged {
        /// Our private copy.
        expected: u8,
        /// The value now in shared memory.
        found: u16,
    },
}

/// Errors of ring and endpoint operations.
///
/// ```
/// # use vchan::control::*;
/// # use vchan::ring::*;
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
/// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
/// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
/// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
/// let bytes = RawRingBytes::new(page.clone(), 2048, 2048).unwrap(); // the order-11 ring's bytes
/// assert!(Ring::new(bytes, 12).is_err()); // 2048 bytes are not an order-12 ring
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// The peer put impossible values into the shared header.
    #[error("{ring} ring corrupted by the peer: {what}")]
    Corrupt {
        /// Which ring.
        ring: RingId,
        /// What was found.
        what: Corruption,
    },
    /// The peer is not open (its live byte says closed), so nothing can be
    /// written, or it closed with fewer bytes left than a packet needs.
    #[error("the peer has closed the vchan")]
    PeerClosed,
    /// This endpoint was closed with [`close`](crate::endpoint::Endpoint::close).
    #[error("the vchan endpoint is closed")]
    Closed,
    /// A packet larger than the ring can never be sent or received whole.
    #[error("packet of {len} bytes can never fit a {ring}-byte ring")]
    TooBig {
        /// Packet length.
        len: usize,
        /// Ring size in bytes.
        ring: usize,
    },
    /// Non-blocking mode and the operation cannot make progress now.
    #[error("the operation would block")]
    WouldBlock,
    /// The endpoint's timeout expired while waiting for the peer.
    #[error("timed out waiting for the peer")]
    TimedOut,
    /// The event channel failed.
    #[error("event channel: {0}")]
    Event(#[source] io::Error),
    /// Ring storage does not match its order (a setup bug, not the peer).
    #[error("{ring} ring of order {order} needs {} bytes, storage has {len}", 1usize << order)]
    Geometry {
        /// Which ring.
        ring: RingId,
        /// The order.
        order: u8,
        /// Bytes of storage supplied.
        len: usize,
    },
    /// A ring address that contradicts the layout (a setup bug).
    #[error("{ring} ring address: {reason}")]
    RingAddress {
        /// Which ring.
        ring: RingId,
        /// What is wrong.
        reason: &'static str,
    },
    /// Invalid orders or layout.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The memory offered for the control page or a ring cannot serve
    /// (outside its mapping, misaligned, or read-only where we write).
    #[error(transparent)]
    Region(#[from] RegionError),
}

impl From<RingError> for io::Error {
    fn from(e: RingError) -> Self {
        let kind = match &e {
            RingError::Corrupt { .. } => io::ErrorKind::InvalidData,
            RingError::PeerClosed => io::ErrorKind::BrokenPipe,
            RingError::Closed => io::ErrorKind::NotConnected,
            RingError::TooBig { .. } => io::ErrorKind::InvalidInput,
            RingError::WouldBlock => io::ErrorKind::WouldBlock,
            RingError::TimedOut => io::ErrorKind::TimedOut,
            RingError::Event(inner) => inner.kind(),
            RingError::Geometry { .. }
            | RingError::RingAddress { .. }
            | RingError::Control(_)
            | RingError::Region(_) => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

// ---------------------------------------------------------------------------
// Ring storage

/// Byte storage of one ring: the only way ring data is touched.
///
/// The real implementation is [`RawRingBytes`]; the `loom` model uses
/// per-byte `loom::cell::UnsafeCell`s so that it detects data races between
/// the producer's writes and the consumer's reads.
///
/// ```
/// # use vchan::control::*;
/// # use vchan::ring::*;
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
/// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
/// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
/// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
/// let b = RawRingBytes::new(page.clone(), 1024, 1024).unwrap(); // the order-10 ring
/// // SAFETY: 0 + 2 <= 1024.
/// unsafe { b.write_at(0, b"hi") };
/// let mut d = [0u8; 2];
/// // SAFETY: as above.
/// unsafe { b.read_at(0, &mut d) };
/// assert_eq!(&d, b"hi");
/// ```
pub trait RingBytes: fmt::Debug {
    /// Size of the storage in bytes (the ring size).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// let b = RawRingBytes::new(page.clone(), 1024, 1024).unwrap(); // the order-10 ring
    /// assert_eq!(b.size(), 1024);
    /// ```
    fn size(&self) -> usize;

    /// Whether we may write these bytes ([`Producer::new`] refuses storage
    /// that says no). Default: yes.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vchan::mem::HeapPages;
    /// use vchan::ring::{RawRingBytes, RingBytes};
    /// let b = RawRingBytes::new(Arc::new(HeapPages::new(1)), 0, 1024)?;
    /// assert!(b.is_writable());
    /// # Ok::<(), vchan::mem::RegionError>(())
    /// ```
    fn is_writable(&self) -> bool {
        true
    }

    /// Copies `src` into the ring at byte offset `off`.
    ///
    /// # Safety
    /// `off + src.len() <= self.size()`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// let b = RawRingBytes::new(page.clone(), 1024, 1024).unwrap(); // the order-10 ring
    /// // SAFETY: 1020 + 4 <= 1024.
    /// unsafe { b.write_at(1020, b"tail") };
    /// ```
    unsafe fn write_at(&self, off: usize, src: &[u8]);

    /// Copies ring bytes starting at `off` into `dst`.
    ///
    /// # Safety
    /// `off + dst.len() <= self.size()`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// let b = RawRingBytes::new(page.clone(), 1024, 1024).unwrap(); // the order-10 ring
    /// let mut d = [0xffu8; 4];
    /// // SAFETY: 0 + 4 <= 1024.
    /// unsafe { b.read_at(0, &mut d) };
    /// assert_eq!(d, [0; 4]); // the page was zeroed
    /// ```
    unsafe fn read_at(&self, off: usize, dst: &mut [u8]);

    /// One `read(2)` from `fd` into the ring segments `segs` (offset,
    /// length; at most two, filled in order): the bytes read land in the
    /// first segment, then the second. Returns the count (0: end of file).
    ///
    /// The default goes through a private buffer and [`RingBytes::write_at`]
    /// (for storage the kernel cannot address, like the `loom` model's);
    /// [`RawRingBytes`] hands the ring memory to the kernel directly
    /// (`readv`), with no copy in user space.
    ///
    /// # Safety
    /// For every segment, `off + len <= self.size()`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// use std::io::Write;
    /// use std::os::fd::AsFd;
    /// let b = RawRingBytes::new(page.clone(), 1024, 1024).unwrap(); // the order-10 ring
    /// let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
    /// w.write_all(b"abcdef").unwrap();
    /// // Across the wrap point: 2 bytes at the end, the rest at the start.
    /// // SAFETY: 1022 + 2 <= 1024 and 0 + 4 <= 1024.
    /// let n = unsafe { b.read_from_fd(r.as_fd(), &[(1022, 2), (0, 4)]) }.unwrap();
    /// assert_eq!(n, 6);
    /// let mut d = [0u8; 4];
    /// // SAFETY: 0 + 4 <= 1024.
    /// unsafe { b.read_at(0, &mut d) };
    /// assert_eq!(&d, b"cdef");
    /// ```
    unsafe fn read_from_fd(
        &self,
        fd: BorrowedFd<'_>,
        segs: &[(usize, usize)],
    ) -> io::Result<usize> {
        let total: usize = segs.iter().map(|s| s.1).sum();
        let mut buf = vec![0u8; total];
        let n = nix::unistd::read(fd, &mut buf).map_err(io::Error::from)?;
        let mut done = 0;
        for &(off, len) in segs {
            let k = len.min(n - done);
            // SAFETY: the caller guarantees `off + len <= size`, and `k <= len`.
            unsafe { self.write_at(off, &buf[done..done + k]) };
            done += k;
        }
        Ok(n)
    }

    /// One `write(2)` to `fd` of the ring segments `segs` (offset, length;
    /// at most two, in order). Returns the count written. The default goes
    /// through a private buffer; [`RawRingBytes`] uses `writev` on the ring
    /// memory directly.
    ///
    /// # Safety
    /// For every segment, `off + len <= self.size()`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// use std::io::Read;
    /// use std::os::fd::AsFd;
    /// let b = RawRingBytes::new(page.clone(), 1024, 1024).unwrap(); // the order-10 ring
    /// // SAFETY: 1022 + 2 <= 1024 and 0 + 2 <= 1024.
    /// unsafe { b.write_at(1022, b"ab"); b.write_at(0, b"cd") };
    /// let (w, mut r) = std::os::unix::net::UnixStream::pair().unwrap();
    /// // SAFETY: as above.
    /// assert_eq!(unsafe { b.write_to_fd(w.as_fd(), &[(1022, 2), (0, 2)]) }.unwrap(), 4);
    /// let mut got = [0u8; 4];
    /// r.read_exact(&mut got).unwrap();
    /// assert_eq!(&got, b"abcd");
    /// ```
    unsafe fn write_to_fd(&self, fd: BorrowedFd<'_>, segs: &[(usize, usize)]) -> io::Result<usize> {
        let mut buf = Vec::new();
        for &(off, len) in segs {
            let at = buf.len();
            buf.resize(at + len, 0);
            // SAFETY: the caller guarantees `off + len <= size`.
            unsafe { self.read_at(off, &mut buf[at..]) };
        }
        nix::unistd::write(fd, &buf).map_err(io::Error::from)
    }
}

/// Ring bytes in a shared mapping (an in-page ring of the control page, or
/// mapped ring pages), which it keeps mapped (an [`Arc`] of it).
///
/// ```
/// use std::sync::Arc;
/// use vchan::mem::HeapPages;
/// use vchan::ring::{RawRingBytes, RingBytes};
/// let bytes = RawRingBytes::new(Arc::new(HeapPages::new(1)), 0, 1024)?;
/// assert_eq!(bytes.size(), 1024);
/// # Ok::<(), vchan::mem::RegionError>(())
/// ```
#[derive(Debug)]
pub struct RawRingBytes {
    /// Keeps the mapping alive as long as these bytes exist.
    mem: Arc<dyn SharedMemory>,
    base: NonNull<u8>,
    size: usize,
}

// SAFETY: the bytes are shared with another domain anyway; `RawRingBytes` only copies to and from private buffers, with no references into the ring, and the mapping it holds is `Send + Sync` by its trait.
unsafe impl Send for RawRingBytes {}
// SAFETY: as for `Send`.
unsafe impl Sync for RawRingBytes {}

impl RawRingBytes {
    /// The `size` bytes at `offset` of `mem` as ring storage. Whether we
    /// may write them is the mapping's ([`SharedMemory::is_writable`]): a
    /// [`Producer`] refuses read-only storage, a [`Consumer`] only reads
    /// (the client's read ring may be mapped read-only).
    ///
    /// # Errors
    /// [`RegionError::OutOfBounds`] if the bytes are not all inside `mem`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// // Bytes 1024..2048 of the page are the order-10 ring.
    /// let b = RawRingBytes::new(page.clone(), 1024, 1024)?;
    /// assert_eq!(b.size(), 1024);
    /// assert!(RawRingBytes::new(page.clone(), 2048, 4096).is_err());
    /// # Ok::<(), vchan::mem::RegionError>(())
    /// ```
    pub fn new(
        mem: Arc<dyn SharedMemory>,
        offset: usize,
        size: usize,
    ) -> Result<Self, RegionError> {
        let base = checked_range(&mem, offset, size, false)?;
        Ok(Self { mem, base, size })
    }

    /// The mapping these bytes live in.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vchan::mem::{HeapPages, SharedMemory};
    /// use vchan::ring::RawRingBytes;
    /// let b = RawRingBytes::new(Arc::new(HeapPages::new(1)), 2048, 2048)?;
    /// assert_eq!(b.memory().len(), 4096);
    /// # Ok::<(), vchan::mem::RegionError>(())
    /// ```
    pub fn memory(&self) -> &Arc<dyn SharedMemory> {
        &self.mem
    }
}

impl RingBytes for RawRingBytes {
    fn size(&self) -> usize {
        self.size
    }

    fn is_writable(&self) -> bool {
        self.mem.is_writable()
    }

    unsafe fn write_at(&self, off: usize, src: &[u8]) {
        debug_assert!(off <= self.size && src.len() <= self.size - off);
        // The peer may read these bytes concurrently; that is the protocol,
        // and no reference to them exists on our side.
        // SAFETY: the caller guarantees `off + src.len() <= size`; the constructor guarantees the range is valid for writes. `src` is private memory, so it cannot overlap the ring.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(off), src.len()) }
    }

    unsafe fn read_at(&self, off: usize, dst: &mut [u8]) {
        debug_assert!(off <= self.size && dst.len() <= self.size - off);
        // If a hostile peer modifies the bytes during the copy we copy
        // garbage into a private buffer, which is harmless: nothing is ever
        // re-read from the ring.
        // SAFETY: the caller guarantees `off + dst.len() <= size`; the constructor guarantees the range is valid for reads. `dst` is private memory.
        unsafe {
            ptr::copy_nonoverlapping(self.base.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }

    unsafe fn read_from_fd(
        &self,
        fd: BorrowedFd<'_>,
        segs: &[(usize, usize)],
    ) -> io::Result<usize> {
        let iov = self.iovecs(segs);
        let cnt = segs.len().min(2) as libc::c_int;
        // The kernel writes into that memory directly; no Rust reference to
        // it exists. The peer may write there too (it must not: it is free
        // space), which can only spoil the bytes we publish next, never our
        // indices, which live in private memory.
        // SAFETY: each iovec covers `off..off + len` of the ring, which the caller guarantees is inside it, and the constructor guarantees it is valid for writes (a producer's ring); `iov` outlives the call.
        let r = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), cnt) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    unsafe fn write_to_fd(&self, fd: BorrowedFd<'_>, segs: &[(usize, usize)]) -> io::Result<usize> {
        let iov = self.iovecs(segs);
        let cnt = segs.len().min(2) as libc::c_int;
        // The kernel only reads it; a hostile peer changing those bytes
        // during the call changes what we write to `fd` (its own data),
        // nothing else.
        // SAFETY: each iovec covers `off..off + len` of the ring, inside it by the caller's guarantee and valid for reads by the constructor's; `iov` outlives the call.
        let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), cnt) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

impl RawRingBytes {
    /// The iovecs for at most two ring segments (offsets and lengths were
    /// checked by the caller of the `unsafe` trait method).
    fn iovecs(&self, segs: &[(usize, usize)]) -> [libc::iovec; 2] {
        let mut iov = [libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        }; 2];
        for (v, &(off, len)) in iov.iter_mut().zip(segs) {
            debug_assert!(off <= self.size && len <= self.size - off);
            *v = libc::iovec {
                // Address arithmetic only (`wrapping_add`): no access here.
                iov_base: self.base.as_ptr().wrapping_add(off).cast(),
                iov_len: len,
            };
        }
        iov
    }
}

/// A ring: its byte storage and a private copy of its validated order.
///
/// ```
/// # use vchan::control::*;
/// # use vchan::ring::*;
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
/// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
/// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
/// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
/// let r = Ring::new(right(), 11).unwrap();
/// assert_eq!((r.order(), r.size()), (11, 2048));
/// ```
#[derive(Debug)]
pub struct Ring<B> {
    bytes: B,
    order: u8,
}

impl<B: RingBytes> Ring<B> {
    /// A ring of `order` (10..=20) over `bytes`, which must be exactly
    /// `1 << order` bytes.
    ///
    /// # Errors
    /// [`ControlError::InvalidOrder`] (inside [`RingError::Control`]) for an
    /// order out of range, [`RingError::Geometry`] for a size mismatch. The
    /// `ring` named in these errors is [`RingId::Left`] by convention; use
    /// [`Ring::for_ring`] to name it.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert!(Ring::new(right(), 11).is_ok());
    /// assert!(Ring::new(right(), 10).is_err()); // 2048 bytes are not 1 << 10
    /// ```
    pub fn new(bytes: B, order: u8) -> Result<Self, RingError> {
        Self::for_ring(bytes, order, RingId::Left)
    }

    /// As [`Ring::new`], naming `ring` in errors.
    ///
    /// # Errors
    /// As [`Ring::new`].
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// let r = Ring::for_ring(right(), 11, RingId::Right).unwrap();
    /// assert_eq!(r.size(), 2048);
    /// ```
    pub fn for_ring(bytes: B, order: u8, ring: RingId) -> Result<Self, RingError> {
        if !(MIN_RING_SHIFT..=MAX_RING_SHIFT).contains(&order) {
            return Err(ControlError::InvalidOrder {
                ring,
                order: u16::from(order),
            }
            .into());
        }
        if bytes.size() != 1usize << order {
            return Err(RingError::Geometry {
                ring,
                order,
                len: bytes.size(),
            });
        }
        Ok(Self { bytes, order })
    }

    /// The validated order.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(Ring::new(right(), 11).unwrap().order(), 11);
    /// ```
    pub fn order(&self) -> u8 {
        self.order
    }

    /// Ring size in bytes (`1 << order`, at most 2^20).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(Ring::new(right(), 11).unwrap().size(), 2048);
    /// ```
    pub fn size(&self) -> u32 {
        1u32 << self.order
    }

    fn mask(&self) -> u32 {
        self.size() - 1
    }

    /// The piece after which a large push or pop publishes its index.
    fn piece(&self) -> usize {
        (self.size() as usize / 4).max(PUBLISH_EVERY)
    }
}

// ---------------------------------------------------------------------------
// Notification protocol (docs/vchan.md §5.4)

/// `request_notify`: ask the peer for an event when it next produces
/// (`NOTIFY_WRITE`) or consumes (`NOTIFY_READ`), by OR-ing `bit` into the
/// **peer's** notify byte (`peer_notify`, e.g. `cli_notify` for the server).
///
/// The caller MUST re-load the peer's index afterwards (the Dekker re-check)
/// before deciding to sleep; [`Consumer::fast_ready`] and
/// [`Producer::fast_space`] do.
///
/// ```
/// # use vchan::control::*;
/// # use vchan::ring::*;
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
/// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
/// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
/// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
/// // The client (reader of `right`) asks to be told of the server's next write...
/// request_notify(&hdr, Side::Client.peer_notify(), NOTIFY_WRITE);
/// // ...so the server, after producing, finds the request and sends one event.
/// assert!(send_notify(&hdr, Side::Server.own_notify(), NOTIFY_WRITE));
/// ```
pub fn request_notify<H: SharedHeader>(h: &H, peer_notify: usize, bit: u8) {
    h.fetch_or_u8(peer_notify, bit);
    // FENCE (xen_mb, "post the request before re-reading any index").
    // Forbids: the caller's following re-load of the peer's index being
    // satisfied before our request bit is visible to the peer (store→load
    // reordering, allowed even on x86). Lost wakeup without it: the peer
    // advances its index and tests the bit, which it does not see yet, so
    // it sends no event; our early re-load saw the old index, so we sleep,
    // and nobody wakes us. Pairs with the fence in `send_notify`.
    #[cfg(not(all(loom, vchan_loom_no_fence)))]
    h.fence(Ordering::SeqCst);
}

/// `send_notify`: after we advanced our index, test-and-clear `bit` in **our
/// own** notify byte (`own_notify`, e.g. `srv_notify` for the server).
/// Returns `true` if the peer had requested it, i.e. one event must be sent.
///
/// ```
/// # use vchan::control::*;
/// # use vchan::ring::*;
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
/// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
/// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
/// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
/// request_notify(&hdr, Side::Client.peer_notify(), NOTIFY_WRITE);
/// assert!(send_notify(&hdr, Side::Server.own_notify(), NOTIFY_WRITE));
/// // One-shot: the request was cleared.
/// assert!(!send_notify(&hdr, Side::Server.own_notify(), NOTIFY_WRITE));
/// ```
pub fn send_notify<H: SharedHeader>(h: &H, own_notify: usize, bit: u8) -> bool {
    // FENCE (xen_mb, "indexes updated before we decide").
    // Forbids: our test of the request bit being satisfied before our new
    // index is visible to the peer (store→load reordering). Lost wakeup
    // without it: we read "no request" early; meanwhile the peer sets the
    // bit and re-loads our index, which it sees as old, and sleeps; we then
    // publish the index and send no event. Pairs with the fence in
    // `request_notify`: of the two fences, whichever comes second in the
    // total order of SeqCst fences guarantees its side sees the other's
    // store (either we see the bit, or the peer sees the index).
    #[cfg(not(all(loom, vchan_loom_no_notify_fence)))]
    h.fence(Ordering::SeqCst);
    // Look before the read-modify-write: while the peer is not waiting (a
    // stream in full flow) the bit is clear, and a plain load of the
    // notify byte costs far less than a locked RMW that takes the page's
    // cache line from the peer on every call. The fence above is what
    // orders this test after our index store, a load as well as an RMW;
    // the RMW then clears the bit that was seen, and its result decides
    // (another thread of ours may have cleared it in between).
    if h.load_u8(own_notify) & bit == 0 {
        return false;
    }
    h.fetch_and_u8(own_notify, !bit) & bit != 0
}

/// A push or pop larger than this (or than a quarter of its ring, if that
/// is more) publishes its index after each piece of that size (see
/// [`Producer::push`], [`Consumer::pop`]). In a ring four or more times
/// the size of a move, the peer has other data or space to work on: more
/// stores of the index would only make it take smaller bites.
pub const PUBLISH_EVERY: usize = 16 * 1024;

fn to_u32_clamped(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// Consumer

/// Our reading end of a ring: we read data and advance `cons`.
///
/// ```
/// # use vchan::control::*;
/// # use vchan::ring::*;
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
/// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
/// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
/// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
/// tx.push(&hdr, b"abc");
/// let mut buf = [0u8; 8];
/// assert_eq!(rx.fast_ready(&hdr, 3, 1).unwrap(), 3);
/// assert_eq!(rx.pop(&hdr, &mut buf), 3);
/// assert_eq!(&buf[..3], b"abc");
/// ```
#[derive(Debug)]
pub struct Consumer<B> {
    ring: Ring<B>,
    id: RingId,
    /// Our index (private copy; we are its only writer).
    cons: u32,
    /// Last validated value of the peer's `prod`; `prod − cons ≤ size`.
    prod: u32,
    own_notify: usize,
    peer_notify: usize,
}

impl<B: RingBytes> Consumer<B> {
    /// Attaches to `side`'s read ring: reads `cons` (ours, which we keep
    /// privately from now on; indices survive reconnects) and `prod` once,
    /// and validates them.
    ///
    /// # Errors
    /// [`RingError::Corrupt`] if the indices are already inconsistent.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// let rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(rx.id(), RingId::Right);
    /// ```
    pub fn new<H: SharedHeader>(h: &H, side: Side, ring: Ring<B>) -> Result<Self, RingError> {
        let id = side.read_ring();
        let cons = h.load_u32(id.cons_offset());
        let mut c = Self {
            ring,
            id,
            cons,
            prod: cons,
            own_notify: side.own_notify(),
            peer_notify: side.peer_notify(),
        };
        c.load_ready(h)?;
        Ok(c)
    }

    /// Which ring this is.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(rx.id(), RingId::Right);
    /// ```
    pub fn id(&self) -> RingId {
        self.id
    }

    /// The ring (order and size).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(rx.ring().size(), 2048);
    /// assert_eq!(tx.ring().order(), 11);
    /// ```
    pub fn ring(&self) -> &Ring<B> {
        &self.ring
    }

    /// Our consumer index (private copy).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.push(&hdr, b"abc");
    /// rx.load_ready(&hdr).unwrap();
    /// rx.pop(&hdr, &mut [0u8; 2]);
    /// assert_eq!(rx.cons(), 2);
    /// ```
    pub fn cons(&self) -> u32 {
        self.cons
    }

    /// Bytes known to be readable from the last validated load of `prod`
    /// (no shared-memory access).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.push(&hdr, b"abc");
    /// assert_eq!(rx.cached_ready(), 0); // not looked yet
    /// rx.load_ready(&hdr).unwrap();
    /// assert_eq!(rx.cached_ready(), 3);
    /// ```
    pub fn cached_ready(&self) -> u32 {
        // Invariant: `prod − cons ≤ size` (validated in `load_ready`, and
        // `pop` advances `cons` by at most that much).
        self.prod.wrapping_sub(self.cons)
    }

    /// Loads the peer's `prod` once and returns the bytes ready to read.
    ///
    /// # Errors
    /// [`RingError::Corrupt`] if `prod − cons` exceeds the ring size.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.push(&hdr, b"abc");
    /// assert_eq!(rx.load_ready(&hdr).unwrap(), 3);
    /// ```
    pub fn load_ready<H: SharedHeader>(&mut self, h: &H) -> Result<u32, RingError> {
        // Single fetch (XSA-155): this one load feeds the check and the cache.
        let prod = h.load_u32(self.id.prod_offset());
        let ready = prod.wrapping_sub(self.cons);
        if ready > self.ring.size() {
            // XSA-86: libxenvchan would treat this as 0 and hang; we report it.
            return Err(RingError::Corrupt {
                ring: self.id,
                what: Corruption::Indices {
                    prod,
                    cons: self.cons,
                    size: self.ring.size(),
                },
            });
        }
        self.prod = prod;
        Ok(ready)
    }

    /// libxenvchan's `fast_get_data_ready`, with a cache: returns the bytes
    /// ready, using the cached `prod` if it already shows `want` bytes,
    /// re-loading it otherwise; if fewer than `need` are ready, requests a
    /// `NOTIFY_WRITE` and re-loads once more (so a caller that then sleeps
    /// cannot miss the producer's event). `need` is raised to at least 1 and
    /// `want` to at least `need`.
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(rx.fast_ready(&hdr, 1, 1).unwrap(), 0); // empty: a WRITE request is now posted
    /// tx.push(&hdr, b"x");
    /// assert!(tx.notify_produced(&hdr)); // so the writer owes us an event
    /// assert_eq!(rx.fast_ready(&hdr, 1, 1).unwrap(), 1);
    /// ```
    pub fn fast_ready<H: SharedHeader>(
        &mut self,
        h: &H,
        want: u32,
        need: u32,
    ) -> Result<u32, RingError> {
        let need = need.max(1);
        let want = want.max(need);
        let cached = self.cached_ready();
        if cached >= want {
            return Ok(cached);
        }
        let ready = self.load_ready(h)?;
        if ready >= need {
            return Ok(ready);
        }
        request_notify(h, self.peer_notify, NOTIFY_WRITE);
        if cfg!(all(loom, vchan_loom_no_recheck)) {
            return Ok(ready);
        }
        // Re-check: the producer may have advanced between the load above
        // and our request becoming visible; it would not have notified us.
        self.load_ready(h)
    }

    /// libxenvchan's `data_ready()`: requests a `NOTIFY_WRITE` (the caller
    /// is likely to sleep next), then loads `prod` and returns the bytes
    /// ready.
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.push(&hdr, b"xy");
    /// assert_eq!(rx.data_ready(&hdr).unwrap(), 2);
    /// assert_eq!(hdr.load_u8(SRV_NOTIFY) & NOTIFY_WRITE, NOTIFY_WRITE);
    /// ```
    pub fn data_ready<H: SharedHeader>(&mut self, h: &H) -> Result<u32, RingError> {
        request_notify(h, self.peer_notify, NOTIFY_WRITE);
        self.load_ready(h)
    }

    /// Copies `min(dst.len(), cached_ready())` bytes out of the ring into
    /// `dst` and publishes the new `cons` (docs/vchan.md §5.3). Returns the count.
    /// Call [`Consumer::notify_consumed`] afterwards.
    ///
    /// A large pop publishes `cons` every [`PUBLISH_EVERY`] bytes (or a
    /// quarter of the ring if that is more), as that
    /// many pops of that size would: a producer spinning for space starts
    /// refilling the ring while we still copy the rest (a 64 KiB read of a
    /// 64 KiB ring otherwise leaves the writer idle for the whole copy).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.push(&hdr, b"hello");
    /// rx.load_ready(&hdr).unwrap();
    /// let mut buf = [0u8; 3];
    /// assert_eq!(rx.pop(&hdr, &mut buf), 3);
    /// assert_eq!(&buf, b"hel");
    /// ```
    pub fn pop<H: SharedHeader>(&mut self, h: &H, dst: &mut [u8]) -> usize {
        let mut done = 0;
        let each = self.ring.piece();
        for piece in dst.chunks_mut(each) {
            let n = self.take(h, piece);
            if n == 0 {
                break;
            }
            self.publish_cons(h);
            done += n;
            if n < piece.len() {
                break;
            }
        }
        done
    }

    /// As [`Consumer::pop`] but without publishing `cons`: the bytes are
    /// ours (copied out) but the producer still sees them as unread until
    /// [`Consumer::publish_cons`]. This is ocaml-vchan's reader, which
    /// acknowledges a chunk only at its next read (docs/vchan.md §12.1); our own
    /// reads always publish at once.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.push(&hdr, b"lazy");
    /// rx.fast_ready(&hdr, 4, 1).unwrap();
    /// let mut d = [0u8; 4];
    /// assert_eq!(rx.take(&hdr, &mut d), 4);
    /// assert_eq!(hdr.load_u32(RIGHT_CONS), 0); // not acknowledged yet
    /// rx.publish_cons(&hdr);
    /// assert_eq!(hdr.load_u32(RIGHT_CONS), 4);
    /// ```
    pub fn take<H: SharedHeader>(&mut self, h: &H, dst: &mut [u8]) -> usize {
        let ready = self.cached_ready();
        let n = to_u32_clamped(dst.len()).min(ready);
        if n == 0 {
            return 0;
        }
        let size = self.ring.size();
        let off = self.cons & self.ring.mask();
        let first = n.min(size - off);
        // FENCE (xen_rmb, "data read must happen after the index read").
        // Forbids: ring bytes being read before the load of `prod` that said
        // they are there. Without it we could copy stale bytes that the
        // producer had not written yet (its Release fence before publishing
        // `prod` pairs with this).
        h.fence(Ordering::Acquire);
        let (n, first, off) = (n as usize, first as usize, off as usize);
        // SAFETY: `off = cons & (size − 1) < size` and `first = min(n, size − off)`, so `off + first <= size`.
        unsafe { self.ring.bytes.read_at(off, &mut dst[..first]) };
        if n > first {
            // Wrapped: the rest starts at offset 0. `n ≤ ready ≤ size` and
            // `first = size − off`, so `n − first ≤ off < size`.
            // SAFETY: `0 + (n − first) <= size` as shown above.
            unsafe { self.ring.bytes.read_at(0, &mut dst[first..n]) };
        }
        self.cons = self.cons.wrapping_add(n as u32);
        n
    }

    /// Bytes from `cons` to the end of the ring's storage: how much one
    /// contiguous copy can take before it wraps (ocaml-vchan's reads stop
    /// there).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(rx.contiguous(), 2048); // from `cons` = 0 to the end of the ring
    /// tx.push(&hdr, &[7u8; 100]);
    /// rx.fast_ready(&hdr, 100, 1).unwrap();
    /// rx.pop(&hdr, &mut [0u8; 100]);
    /// assert_eq!(rx.contiguous(), 1948);
    /// ```
    pub fn contiguous(&self) -> u32 {
        self.ring.size() - (self.cons & self.ring.mask())
    }

    /// Publishes our private `cons` (after [`Consumer::take`]; [`Consumer::pop`]
    /// does it itself).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.push(&hdr, b"xy");
    /// rx.fast_ready(&hdr, 2, 1).unwrap();
    /// rx.take(&hdr, &mut [0u8; 2]);
    /// rx.publish_cons(&hdr); // now the producer sees the space again
    /// assert_eq!(tx.load_space(&hdr).unwrap(), 2048);
    /// ```
    pub fn publish_cons<H: SharedHeader>(&self, h: &H) {
        // FENCE (xen_mb, "consume, then publish"; docs/vchan.md §5.3).
        // Forbids: the store of the new `cons` becoming visible before our
        // reads of the ring bytes are complete (load→store reordering).
        // Without it the producer could see the space as free and
        // overwrite bytes we are still copying (we would return corrupted
        // data). A release fence forbids exactly that, and pairs with the
        // producer's acquire fence after its load of `cons`; a full fence
        // would also drain the stores of the copy into our buffer, which
        // no one else reads (it cost the most of a 4 KiB read).
        #[cfg(not(all(loom, vchan_loom_no_cons_release)))]
        h.fence(Ordering::Release);
        h.store_u32(self.id.cons_offset(), self.cons);
    }

    /// As [`Consumer::pop`], but the bytes go from the ring straight to
    /// `fd` with one `write(2)` (`writev` over the two segments of a
    /// wrapped region): at most `min(max, cached_ready())` bytes, and `cons`
    /// advances by what the kernel took. `Ok(0)` when nothing is ready or
    /// `max` is 0. Call [`Consumer::notify_consumed`] afterwards.
    ///
    /// # Errors
    /// The error of `write(2)` (nothing is consumed then).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// use std::io::Read;
    /// use std::os::fd::AsFd;
    /// tx.push(&hdr, b"to a socket");
    /// rx.fast_ready(&hdr, 11, 1).unwrap();
    /// let (w, mut r) = std::os::unix::net::UnixStream::pair().unwrap();
    /// assert_eq!(rx.pop_to_fd(&hdr, w.as_fd(), 4096).unwrap(), 11);
    /// let mut got = [0u8; 11];
    /// r.read_exact(&mut got).unwrap();
    /// assert_eq!(&got, b"to a socket");
    /// assert_eq!(hdr.load_u32(RIGHT_CONS), 11);
    /// ```
    pub fn pop_to_fd<H: SharedHeader>(
        &mut self,
        h: &H,
        fd: BorrowedFd<'_>,
        max: usize,
    ) -> io::Result<usize> {
        let n = to_u32_clamped(max).min(self.cached_ready());
        if n == 0 {
            return Ok(0);
        }
        let size = self.ring.size();
        let off = self.cons & self.ring.mask();
        let first = n.min(size - off);
        // FENCE (xen_rmb): as in `pop`, the kernel's reads of the ring bytes
        // must not happen before the load of `prod` that said they are there.
        h.fence(Ordering::Acquire);
        let (n, first, off) = (n as usize, first as usize, off as usize);
        let segs = [(off, first), (0, n - first)];
        let segs = if n > first { &segs[..] } else { &segs[..1] };
        // SAFETY: `off < size` and `first = min(n, size − off)` so `off + first <= size`; a second segment exists only when wrapped, and then `n − first ≤ off < size` (as in `pop`).
        let w = unsafe { self.ring.bytes.write_to_fd(fd, segs) }?;
        let w = w.min(n); // the kernel never reports more than asked
        // FENCE (xen_mb, "consume, then publish"): as in `pop`, the new
        // `cons` must not be visible before the kernel has read the bytes.
        h.fence(Ordering::Release);
        self.cons = self.cons.wrapping_add(w as u32);
        h.store_u32(self.id.cons_offset(), self.cons);
        Ok(w)
    }

    /// After [`Consumer::pop`]: test-and-clear the peer's `NOTIFY_READ`
    /// request. `true` means one event must be sent.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.push(&hdr, b"abc");
    /// request_notify(&hdr, Side::Server.peer_notify(), NOTIFY_READ); // the writer waits for room
    /// rx.load_ready(&hdr).unwrap();
    /// rx.pop(&hdr, &mut [0u8; 3]);
    /// assert!(rx.notify_consumed(&hdr)); // one event for the writer
    /// ```
    pub fn notify_consumed<H: SharedHeader>(&self, h: &H) -> bool {
        send_notify(h, self.own_notify, NOTIFY_READ)
    }
}

// ---------------------------------------------------------------------------
// Producer

/// Our writing end of a ring: we write data and advance `prod`.
///
/// ```
/// # use vchan::control::*;
/// # use vchan::ring::*;
/// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// # let hdr = ControlPage::new(page.clone()).unwrap();
/// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
/// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
/// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
/// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
/// assert_eq!(tx.fast_space(&hdr, 5, 5).unwrap(), 2048);
/// assert_eq!(tx.push(&hdr, b"hello"), 5);
/// assert_eq!(tx.prod(), 5);
/// ```
#[derive(Debug)]
pub struct Producer<B> {
    ring: Ring<B>,
    id: RingId,
    /// Our index (private copy; we are its only writer).
    prod: u32,
    /// Last validated value of the peer's `cons`; `prod − cons ≤ size`.
    cons: u32,
    own_notify: usize,
    peer_notify: usize,
}

impl<B: RingBytes> Producer<B> {
    /// Attaches to `side`'s write ring: reads `prod` (ours, kept privately
    /// from now on) and `cons` once, and validates them.
    ///
    /// # Errors
    /// [`RingError::Corrupt`] if the indices are already inconsistent,
    /// [`RingError::Region`] if the storage is read-only.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// let tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(tx.id(), RingId::Right);
    /// ```
    pub fn new<H: SharedHeader>(h: &H, side: Side, ring: Ring<B>) -> Result<Self, RingError> {
        if !ring.bytes.is_writable() {
            return Err(RegionError::ReadOnly.into());
        }
        let id = side.write_ring();
        let prod = h.load_u32(id.prod_offset());
        let mut p = Self {
            ring,
            id,
            prod,
            cons: prod,
            own_notify: side.own_notify(),
            peer_notify: side.peer_notify(),
        };
        p.load_space(h)?;
        Ok(p)
    }

    /// Which ring this is.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(tx.id(), RingId::Right);
    /// ```
    pub fn id(&self) -> RingId {
        self.id
    }

    /// The ring (order and size).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(tx.ring().size(), 2048);
    /// ```
    pub fn ring(&self) -> &Ring<B> {
        &self.ring
    }

    /// Our producer index (private copy).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.load_space(&hdr).unwrap();
    /// tx.push(&hdr, b"abc");
    /// assert_eq!(tx.prod(), 3);
    /// ```
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Free space known from the last validated load of `cons`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(tx.load_space(&hdr).unwrap(), 2048);
    /// assert_eq!(tx.cached_space(), 2048);
    /// ```
    pub fn cached_space(&self) -> u32 {
        // Invariant: `prod − cons ≤ size` (validated in `load_space`, and
        // `push` advances `prod` by at most the free space).
        self.ring.size() - self.prod.wrapping_sub(self.cons)
    }

    /// Loads the peer's `cons` once and returns the free space.
    ///
    /// # Errors
    /// [`RingError::Corrupt`] if `prod − cons` exceeds the ring size
    /// (equivalently, `space = size − (prod − cons)` would exceed it).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(tx.load_space(&hdr).unwrap(), 2048);
    /// tx.push(&hdr, &[7; 48]);
    /// assert_eq!(tx.load_space(&hdr).unwrap(), 2000);
    /// ```
    pub fn load_space<H: SharedHeader>(&mut self, h: &H) -> Result<u32, RingError> {
        // Single fetch (XSA-155).
        let cons = h.load_u32(self.id.cons_offset());
        let used = self.prod.wrapping_sub(cons);
        if used > self.ring.size() {
            return Err(RingError::Corrupt {
                ring: self.id,
                what: Corruption::Indices {
                    prod: self.prod,
                    cons,
                    size: self.ring.size(),
                },
            });
        }
        self.cons = cons;
        Ok(self.ring.size() - used)
    }

    /// libxenvchan's `fast_get_buffer_space`, with a cache: as
    /// [`Consumer::fast_ready`], for free space and `NOTIFY_READ`.
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(tx.fast_space(&hdr, 2048, 2048).unwrap(), 2048);
    /// tx.push(&hdr, &[0; 2048]);
    /// assert_eq!(tx.fast_space(&hdr, 1, 1).unwrap(), 0); // full: a READ request is now posted
    /// rx.load_ready(&hdr).unwrap();
    /// rx.pop(&hdr, &mut [0u8; 16]);
    /// assert!(rx.notify_consumed(&hdr)); // the reader owes us an event
    /// assert_eq!(tx.fast_space(&hdr, 1, 1).unwrap(), 16);
    /// ```
    pub fn fast_space<H: SharedHeader>(
        &mut self,
        h: &H,
        want: u32,
        need: u32,
    ) -> Result<u32, RingError> {
        let need = need.max(1);
        let want = want.max(need);
        let cached = self.cached_space();
        if cached >= want {
            return Ok(cached);
        }
        let space = self.load_space(h)?;
        if space >= need {
            return Ok(space);
        }
        request_notify(h, self.peer_notify, NOTIFY_READ);
        if cfg!(all(loom, vchan_loom_no_recheck)) {
            return Ok(space);
        }
        // Re-check: the consumer may have advanced before our request was
        // visible; it would not have notified us.
        self.load_space(h)
    }

    /// libxenvchan's `buffer_space()`: requests a `NOTIFY_READ`, then loads
    /// `cons` and returns the free space.
    ///
    /// # Errors
    /// [`RingError::Corrupt`].
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// assert_eq!(tx.buffer_space(&hdr).unwrap(), 2048);
    /// assert_eq!(hdr.load_u8(CLI_NOTIFY) & NOTIFY_READ, NOTIFY_READ);
    /// ```
    pub fn buffer_space<H: SharedHeader>(&mut self, h: &H) -> Result<u32, RingError> {
        request_notify(h, self.peer_notify, NOTIFY_READ);
        self.load_space(h)
    }

    /// Copies `min(src.len(), cached_space())` bytes from `src` into the ring
    /// and publishes the new `prod` (docs/vchan.md §5.2). Returns the count. Call
    /// [`Producer::notify_produced`] afterwards.
    ///
    /// A large push publishes `prod` every [`PUBLISH_EVERY`] bytes (or a
    /// quarter of the ring if that is more), as that
    /// many pushes of that size would: a consumer spinning for data starts
    /// copying while we still write the rest.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// tx.load_space(&hdr).unwrap();
    /// assert_eq!(tx.push(&hdr, b"hello"), 5);
    /// assert_eq!(rx.load_ready(&hdr).unwrap(), 5);
    /// ```
    pub fn push<H: SharedHeader>(&mut self, h: &H, src: &[u8]) -> usize {
        let mut done = 0;
        let each = self.ring.piece();
        for piece in src.chunks(each) {
            let n = self.push_piece(h, piece);
            done += n;
            if n < piece.len() {
                break;
            }
        }
        done
    }

    /// One piece of [`Producer::push`]: copy, then publish.
    fn push_piece<H: SharedHeader>(&mut self, h: &H, src: &[u8]) -> usize {
        let space = self.cached_space();
        let n = to_u32_clamped(src.len()).min(space);
        if n == 0 {
            return 0;
        }
        let size = self.ring.size();
        let off = self.prod & self.ring.mask();
        let first = n.min(size - off);
        // FENCE (xen_mb, "read indexes, then write data"; docs/vchan.md §5.2).
        // Forbids: our writes into the ring being performed before the load
        // of `cons` that said the space is free (load→store reordering).
        // Without it we could overwrite bytes the consumer is still reading
        // (pairs with the consumer's release fence before it publishes
        // `cons`). An acquire fence forbids exactly that reordering (later
        // loads *and stores* stay after the load); a full fence would also
        // wait for our earlier stores, which this does not need.
        #[cfg(not(all(loom, vchan_loom_no_space_acquire)))]
        h.fence(Ordering::Acquire);
        let (n, first, off) = (n as usize, first as usize, off as usize);
        // SAFETY: `off < size` and `first = min(n, size − off)`, so `off + first <= size`.
        unsafe { self.ring.bytes.write_at(off, &src[..first]) };
        if n > first {
            // SAFETY: wrapped: `n ≤ space ≤ size` and `first = size − off`, so `n − first ≤ off < size`.
            unsafe { self.ring.bytes.write_at(0, &src[first..n]) };
        }
        // FENCE (xen_wmb, "write data, then publish").
        // Forbids: the new `prod` becoming visible before the data it
        // covers. Without it the consumer could read bytes we have not
        // written yet (it would return stale data).
        #[cfg(not(all(loom, vchan_loom_no_wmb)))]
        h.fence(Ordering::Release);
        self.prod = self.prod.wrapping_add(n as u32);
        h.store_u32(self.id.prod_offset(), self.prod);
        n
    }

    /// As [`Producer::push`], but the bytes come from `fd` straight into
    /// the ring's free space with one `read(2)` (`readv` over the two
    /// segments of a wrapped region): at most `min(max, cached_space())`
    /// bytes, and `prod` advances by what the kernel delivered. `Ok(0)` at
    /// end of file, or when there is no space or `max` is 0 (check the
    /// space first to tell them apart). Call [`Producer::notify_produced`]
    /// afterwards.
    ///
    /// # Errors
    /// The error of `read(2)` (nothing is published then).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// use std::io::Write;
    /// use std::os::fd::AsFd;
    /// let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
    /// w.write_all(b"from a socket").unwrap();
    /// assert_eq!(tx.push_from_fd(&hdr, r.as_fd(), 4096).unwrap(), 13);
    /// assert_eq!(hdr.load_u32(RIGHT_PROD), 13);
    /// let mut got = [0u8; 13];
    /// rx.fast_ready(&hdr, 13, 1).unwrap();
    /// assert_eq!(rx.pop(&hdr, &mut got), 13);
    /// assert_eq!(&got, b"from a socket");
    /// ```
    pub fn push_from_fd<H: SharedHeader>(
        &mut self,
        h: &H,
        fd: BorrowedFd<'_>,
        max: usize,
    ) -> io::Result<usize> {
        let n = to_u32_clamped(max).min(self.cached_space());
        if n == 0 {
            return Ok(0);
        }
        let size = self.ring.size();
        let off = self.prod & self.ring.mask();
        let first = n.min(size - off);
        // FENCE (xen_mb, "read indexes, then write data"): as in `push`, the
        // kernel's writes into the ring must not happen before the load of
        // `cons` that said the space is free.
        h.fence(Ordering::Acquire);
        let (n, first, off) = (n as usize, first as usize, off as usize);
        let segs = [(off, first), (0, n - first)];
        let segs = if n > first { &segs[..] } else { &segs[..1] };
        // SAFETY: as in `pop_to_fd`: both segments lie inside the ring.
        let r = unsafe { self.ring.bytes.read_from_fd(fd, segs) }?;
        let r = r.min(n); // the kernel never reports more than asked
        if r == 0 {
            return Ok(0);
        }
        // FENCE (xen_wmb, "write data, then publish"): the new `prod` must
        // not be visible before the bytes the kernel wrote.
        #[cfg(not(all(loom, vchan_loom_no_wmb)))]
        h.fence(Ordering::Release);
        self.prod = self.prod.wrapping_add(r as u32);
        h.store_u32(self.id.prod_offset(), self.prod);
        Ok(r)
    }

    /// One framed message straight from `fd`: reads at most
    /// `min(max, cached_space() − N)` payload bytes from `fd` into the ring
    /// *after* room for an `N`-byte header (one `readv`), then writes
    /// `header(len)` in front of them from private memory and publishes
    /// header and payload together, so the peer never sees a header
    /// without its payload. `Ok(0)`: end of file (nothing published), or
    /// no room for a header and one byte, or `max == 0`. Call
    /// [`Producer::notify_produced`] afterwards.
    ///
    /// # Errors
    /// The error of `read(2)` (nothing is published then).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// use std::io::Write;
    /// use std::os::fd::AsFd;
    /// let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
    /// w.write_all(b"body").unwrap();
    /// let n = tx.push_framed_from_fd(&hdr, r.as_fd(), 4096, |n| [n as u8]).unwrap();
    /// assert_eq!(n, 4);
    /// let mut got = [0u8; 5];
    /// rx.fast_ready(&hdr, 5, 1).unwrap();
    /// assert_eq!(rx.pop(&hdr, &mut got), 5);
    /// assert_eq!(&got, b"\x04body");
    /// ```
    pub fn push_framed_from_fd<H: SharedHeader, const N: usize>(
        &mut self,
        h: &H,
        fd: BorrowedFd<'_>,
        max: usize,
        header: impl FnOnce(usize) -> [u8; N],
    ) -> io::Result<usize> {
        let hdr_len = to_u32_clamped(N);
        let space = self.cached_space();
        if space <= hdr_len {
            return Ok(0);
        }
        let n = to_u32_clamped(max).min(space - hdr_len);
        if n == 0 {
            return Ok(0);
        }
        let size = self.ring.size();
        let mask = self.ring.mask();
        let off = self.prod.wrapping_add(hdr_len) & mask;
        let first = n.min(size - off);
        // FENCE (xen_mb, "read indexes, then write data"): as in `push`.
        h.fence(Ordering::Acquire);
        let (nn, first_u, off_u) = (n as usize, first as usize, off as usize);
        let segs = [(off_u, first_u), (0, nn - first_u)];
        let segs = if nn > first_u { &segs[..] } else { &segs[..1] };
        // SAFETY: the payload is `n` bytes starting `N` bytes after `prod`, and `N + n ≤ space ≤ size`, so it overlaps neither the header nor itself. `off < size` and `first = min(n, size − off)` keep the first segment inside the ring; a second one (`n − first` bytes at offset 0) exists only when the payload wraps, and `n − first < size`.
        let r = unsafe { self.ring.bytes.read_from_fd(fd, segs) }?;
        let r = r.min(nn);
        if r == 0 {
            return Ok(0);
        }
        let hdr = header(r);
        let hoff = (self.prod & mask) as usize;
        let hfirst = N.min(size as usize - hoff);
        // SAFETY: `hoff < size` and `hfirst = min(N, size − hoff)`; the wrapped rest (N − hfirst bytes) starts at 0 and is shorter than N ≤ space ≤ size. Header and payload ranges do not overlap: the payload starts N bytes after the header's start.
        unsafe { self.ring.bytes.write_at(hoff, &hdr[..hfirst]) };
        if N > hfirst {
            // SAFETY: as above.
            unsafe { self.ring.bytes.write_at(0, &hdr[hfirst..]) };
        }
        // FENCE (xen_wmb, "write data, then publish"): header and payload
        // before the new `prod`.
        #[cfg(not(all(loom, vchan_loom_no_wmb)))]
        h.fence(Ordering::Release);
        self.prod = self.prod.wrapping_add(hdr_len + r as u32);
        h.store_u32(self.id.prod_offset(), self.prod);
        Ok(r)
    }

    /// After [`Producer::push`]: test-and-clear the peer's `NOTIFY_WRITE`
    /// request. `true` means one event must be sent.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # use vchan::ring::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// # init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
    /// # let right = || RawRingBytes::new(page.clone(), 2048, 2048).unwrap();
    /// # let mut tx = Producer::new(&hdr, Side::Server, Ring::new(right(), 11).unwrap()).unwrap();
    /// # let mut rx = Consumer::new(&hdr, Side::Client, Ring::new(right(), 11).unwrap()).unwrap();
    /// rx.data_ready(&hdr).unwrap(); // the reader asks for a WRITE notification
    /// tx.load_space(&hdr).unwrap();
    /// tx.push(&hdr, b"x");
    /// assert!(tx.notify_produced(&hdr));
    /// ```
    pub fn notify_produced<H: SharedHeader>(&self, h: &H) -> bool {
        send_notify(h, self.own_notify, NOTIFY_WRITE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{
        CLI_NOTIFY, ControlPage, LEFT_CONS, LEFT_PROD, PAGE_SIZE, RIGHT_CONS, RIGHT_PROD,
        SRV_NOTIFY,
    };
    use crate::mem::HeapPages;
    use std::os::fd::AsFd;

    /// A control page plus one 4 KiB ring (order 12) in private memory,
    /// reached through raw pointers only ([`HeapPages`]).
    struct Fixture {
        page: Arc<HeapPages>,
        ring: Arc<HeapPages>,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                page: Arc::new(HeapPages::new(1)),
                ring: Arc::new(HeapPages::new(1)),
            }
        }
        fn hdr(&mut self) -> ControlPage {
            ControlPage::new(self.page.clone()).unwrap()
        }
        fn bytes(&mut self) -> RawRingBytes {
            RawRingBytes::new(self.ring.clone(), 0, PAGE_SIZE).unwrap()
        }
        /// Server writes the right ring, client reads it.
        fn pair(&mut self) -> (ControlPage, Producer<RawRingBytes>, Consumer<RawRingBytes>) {
            let h = self.hdr();
            let tx = Producer::new(&h, Side::Server, Ring::new(self.bytes(), 12).unwrap()).unwrap();
            let rx = Consumer::new(&h, Side::Client, Ring::new(self.bytes(), 12).unwrap()).unwrap();
            (h, tx, rx)
        }
    }

    fn pattern(start: u32, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (start as usize + i).wrapping_mul(31) as u8)
            .collect()
    }

    /// A pipe (read end, write end).
    #[cfg(not(miri))]
    fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    /// Bytes go fd → ring → fd through `push_from_fd` / `pop_to_fd`, across
    /// the wrap point (both segments of one `readv`/`writev`), with partial
    /// reads, and arrive in order; `pop` and `push` see the same ring.
    #[test]
    // Real pipes and readv/writev: Miri cannot run them (CI runs the ring
    // tests under Miri too); the normal suite runs these.
    #[cfg(not(miri))]
    fn fd_to_ring_to_fd_across_the_wrap() {
        use std::io::{Read, Write};
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        let (src_r, src_w) = pipe();
        let (dst_r, dst_w) = pipe();
        let mut src_w = std::fs::File::from(src_w);
        let mut dst_r = std::fs::File::from(dst_r);
        let mut sent = Vec::new();
        let mut got = Vec::new();
        let mut start = 0u32;
        // Chunk sizes chosen to land the indices on odd offsets and wrap.
        for (i, len) in [3000usize, 1500, 4096, 1, 2500, 4095, 700]
            .into_iter()
            .enumerate()
        {
            let data = pattern(start, len);
            start += len as u32;
            src_w.write_all(&data).unwrap();
            sent.extend_from_slice(&data);
            let mut left = len;
            while left > 0 {
                tx.load_space(&h).unwrap();
                // Odd rounds move bytes in two steps (a partial read).
                let max = if i % 2 == 1 { left.div_ceil(2) } else { left };
                let n = tx.push_from_fd(&h, src_r.as_fd(), max).unwrap();
                assert!(n > 0 && n <= max);
                left -= n;
                rx.load_ready(&h).unwrap();
                let w = rx.pop_to_fd(&h, dst_w.as_fd(), usize::MAX).unwrap();
                assert_eq!(w, n, "the pipe takes everything ready");
                let mut buf = vec![0u8; w];
                dst_r.read_exact(&mut buf).unwrap();
                got.extend_from_slice(&buf);
            }
        }
        assert_eq!(got, sent);
        assert_eq!(tx.prod(), rx.cons());
        // Mixed with the private-buffer copies.
        assert_eq!(tx.push(&h, b"abc"), 3);
        rx.load_ready(&h).unwrap();
        let mut three = [0u8; 3];
        assert_eq!(rx.pop(&h, &mut three), 3);
        assert_eq!(&three, b"abc");
    }

    /// Framed messages from an fd: header written in front of the payload
    /// (both may wrap), published together; EOF publishes nothing.
    #[test]
    // Real pipes and readv/writev: Miri cannot run them (CI runs the ring
    // tests under Miri too); the normal suite runs these.
    #[cfg(not(miri))]
    fn framed_from_fd_puts_the_header_in_front() {
        use std::io::Write;
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        let (src_r, src_w) = pipe();
        let mut src_w = std::fs::File::from(src_w);
        let mut expect = Vec::new();
        let mut got = Vec::new();
        let mut start = 0u32;
        // Sizes that put the header and the payload across the wrap point.
        for len in [4090usize, 3, 2000, 4000, 1, 4087, 9] {
            let data = pattern(start, len);
            start += len as u32;
            src_w.write_all(&data).unwrap();
            let mut left = len;
            while left > 0 {
                tx.load_space(&h).unwrap();
                let n = tx
                    .push_framed_from_fd(&h, src_r.as_fd(), left, |n| (n as u32).to_le_bytes())
                    .unwrap();
                assert!(n > 0);
                expect.extend_from_slice(&(n as u32).to_le_bytes());
                expect.extend_from_slice(&data[len - left..len - left + n]);
                left -= n;
                rx.load_ready(&h).unwrap();
                let mut buf = vec![0u8; 4096];
                let k = rx.pop(&h, &mut buf);
                assert_eq!(k, 4 + n, "header and payload arrive together");
                got.extend_from_slice(&buf[..k]);
            }
        }
        assert_eq!(got, expect);
        // End of file: nothing is published, not even a header.
        drop(src_w);
        tx.load_space(&h).unwrap();
        let before = tx.prod();
        assert_eq!(
            tx.push_framed_from_fd(&h, src_r.as_fd(), 100, |n| (n as u32).to_le_bytes())
                .unwrap(),
            0
        );
        assert_eq!(tx.prod(), before);
        assert_eq!(h.load_u32(RingId::Right.prod_offset()), before);
    }

    /// `push_from_fd` never goes past the free space, `pop_to_fd` never
    /// past what is ready, and an fd error publishes nothing.
    #[test]
    // Real pipes and readv/writev: Miri cannot run them (CI runs the ring
    // tests under Miri too); the normal suite runs these.
    #[cfg(not(miri))]
    fn fd_moves_are_bounded_and_errors_publish_nothing() {
        use std::io::Write;
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        let (src_r, src_w) = pipe();
        let mut src_w = std::fs::File::from(src_w);
        src_w.write_all(&[7u8; 6000]).unwrap();
        tx.load_space(&h).unwrap();
        assert_eq!(
            tx.push_from_fd(&h, src_r.as_fd(), usize::MAX).unwrap(),
            4096
        );
        assert_eq!(tx.cached_space(), 0);
        assert_eq!(tx.push_from_fd(&h, src_r.as_fd(), usize::MAX).unwrap(), 0);
        // Nothing ready yet for a consumer that has not looked: nothing moves.
        let (dst_r, dst_w) = pipe();
        assert_eq!(rx.pop_to_fd(&h, dst_w.as_fd(), 100).unwrap(), 0);
        rx.load_ready(&h).unwrap();
        assert_eq!(rx.pop_to_fd(&h, dst_w.as_fd(), 100).unwrap(), 100);
        assert_eq!(rx.cons(), 100);
        // A pipe whose read end is closed: EPIPE (the Rust runtime ignores
        // SIGPIPE, so the write fails instead of killing the test).
        drop(dst_r);
        let r = rx.pop_to_fd(&h, dst_w.as_fd(), 100);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(rx.cons(), 100, "a failed write consumes nothing");
        assert_eq!(h.load_u32(RingId::Right.cons_offset()), 100);
        // A read error (a write-only fd) publishes nothing.
        let before = tx.prod();
        tx.load_space(&h).unwrap();
        assert!(tx.push_from_fd(&h, dst_w.as_fd(), 10).is_err());
        assert_eq!(tx.prod(), before);
    }

    #[test]
    fn ring_geometry_is_validated() {
        let mut f = Fixture::new();
        assert!(matches!(
            Ring::new(f.bytes(), 9),
            Err(RingError::Control(ControlError::InvalidOrder {
                order: 9,
                ..
            }))
        ));
        assert!(matches!(
            Ring::new(f.bytes(), 21),
            Err(RingError::Control(ControlError::InvalidOrder {
                order: 21,
                ..
            }))
        ));
        assert!(matches!(
            Ring::for_ring(f.bytes(), 13, RingId::Right),
            Err(RingError::Geometry {
                ring: RingId::Right,
                order: 13,
                len: 4096
            })
        ));
        let r = Ring::new(f.bytes(), 12).unwrap();
        assert_eq!((r.order(), r.size()), (12, 4096));
    }

    #[test]
    fn producer_and_consumer_use_the_side_mapping() {
        let mut f = Fixture::new();
        let h = f.hdr();
        let tx = Producer::new(&h, Side::Client, Ring::new(f.bytes(), 12).unwrap()).unwrap();
        let rx = Consumer::new(&h, Side::Server, Ring::new(f.bytes(), 12).unwrap()).unwrap();
        assert_eq!((tx.id(), rx.id()), (RingId::Left, RingId::Left));
        let mut tx = tx;
        let mut rx = rx;
        tx.fast_space(&h, 3, 3).unwrap();
        tx.push(&h, b"abc");
        assert_eq!(h.load_u32(LEFT_PROD), 3);
        rx.fast_ready(&h, 3, 3).unwrap();
        rx.pop(&h, &mut [0; 3]);
        assert_eq!(h.load_u32(LEFT_CONS), 3);
        assert_eq!((h.load_u32(RIGHT_PROD), h.load_u32(RIGHT_CONS)), (0, 0));
    }

    /// Indices near u32::MAX: the free-running counters wrap and the data
    /// wraps at the ring end, byte-exact, for every start offset class.
    /// A header that records the values stored at one offset, and counts
    /// the notify-byte RMWs.
    #[derive(Debug)]
    struct Recording {
        inner: ControlPage,
        watch: usize,
        stores: std::cell::RefCell<Vec<u32>>,
        rmws: std::cell::Cell<u32>,
    }

    impl SharedHeader for Recording {
        fn load_u32(&self, off: usize) -> u32 {
            self.inner.load_u32(off)
        }
        fn store_u32(&self, off: usize, val: u32) {
            if off == self.watch {
                self.stores.borrow_mut().push(val);
            }
            self.inner.store_u32(off, val)
        }
        fn load_u16(&self, off: usize) -> u16 {
            self.inner.load_u16(off)
        }
        fn store_u16(&self, off: usize, val: u16) {
            self.inner.store_u16(off, val)
        }
        fn load_u8(&self, off: usize) -> u8 {
            self.inner.load_u8(off)
        }
        fn store_u8(&self, off: usize, val: u8) {
            self.inner.store_u8(off, val)
        }
        fn fetch_or_u8(&self, off: usize, bits: u8) -> u8 {
            self.inner.fetch_or_u8(off, bits)
        }
        fn fetch_and_u8(&self, off: usize, bits: u8) -> u8 {
            self.rmws.set(self.rmws.get() + 1);
            self.inner.fetch_and_u8(off, bits)
        }
        fn fence(&self, order: Ordering) {
            self.inner.fence(order)
        }
    }

    #[test]
    fn send_notify_does_no_rmw_unless_asked() {
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        let h = Recording {
            inner: h,
            watch: RIGHT_PROD,
            stores: Default::default(),
            rmws: Default::default(),
        };
        // A stream in full flow: nobody asked, no locked RMW.
        for _ in 0..3 {
            assert_eq!(tx.push(&h, b"abc"), 3);
            assert!(!tx.notify_produced(&h));
        }
        assert_eq!(h.rmws.get(), 0);
        // The reader asks (its own fetch_or), then the writer's test clears
        // the bit with one fetch_and and says to send an event, once.
        rx.load_ready(&h).unwrap();
        rx.pop(&h, &mut [0; 9]);
        assert_eq!(rx.fast_ready(&h, 1, 1).unwrap(), 0);
        assert_eq!(h.inner.load_u8(SRV_NOTIFY) & NOTIFY_WRITE, NOTIFY_WRITE);
        assert_eq!(tx.push(&h, b"d"), 1);
        assert!(tx.notify_produced(&h));
        assert_eq!(h.rmws.get(), 1);
        assert_eq!(h.inner.load_u8(SRV_NOTIFY) & NOTIFY_WRITE, 0);
        assert!(!tx.notify_produced(&h));
        assert_eq!(h.rmws.get(), 1);
    }

    #[test]
    fn large_moves_publish_in_pieces_across_the_wrap() {
        // A 64 KiB ring, indices 8 KiB before the wrap and near u32::MAX.
        let page = Arc::new(HeapPages::new(1));
        let ring = Arc::new(HeapPages::new(16));
        let start = 0u32.wrapping_sub(8192);
        let hdr = ControlPage::new(page.clone()).unwrap();
        hdr.store_u32(RIGHT_PROD, start);
        hdr.store_u32(RIGHT_CONS, start);
        let bytes = || RawRingBytes::new(ring.clone(), 0, 1 << 16).unwrap();
        let rec = |watch| Recording {
            inner: ControlPage::new(page.clone()).unwrap(),
            watch,
            stores: Default::default(),
            rmws: Default::default(),
        };
        let (hp, hc) = (rec(RIGHT_PROD), rec(RIGHT_CONS));
        let mut tx = Producer::new(&hp, Side::Server, Ring::new(bytes(), 16).unwrap()).unwrap();
        let mut rx = Consumer::new(&hc, Side::Client, Ring::new(bytes(), 16).unwrap()).unwrap();
        let n = 2 * PUBLISH_EVERY + 100;
        let data = pattern(7, n);
        assert_eq!(tx.push(&hp, &data), n);
        let each = PUBLISH_EVERY as u32;
        let pieces = [each, 2 * each, 2 * each + 100].map(|k| start.wrapping_add(k));
        assert_eq!(*hp.stores.borrow(), pieces);
        assert_eq!(rx.load_ready(&hc).unwrap() as usize, n);
        let mut got = vec![0; n + 5];
        assert_eq!(rx.pop(&hc, &mut got), n);
        assert_eq!(&got[..n], &data[..]);
        assert_eq!(*hc.stores.borrow(), pieces);
        // A small move publishes once, as before.
        hp.stores.borrow_mut().clear();
        rx.load_ready(&hc).unwrap();
        tx.load_space(&hp).unwrap();
        assert_eq!(tx.push(&hp, &data[..10]), 10);
        assert_eq!(hp.stores.borrow().len(), 1);
        // A push larger than the space stops at the space, in pieces.
        hp.stores.borrow_mut().clear();
        let big = pattern(1, 1 << 16);
        let space = tx.load_space(&hp).unwrap() as usize;
        assert_eq!(tx.push(&hp, &big), space);
        assert_eq!(hp.stores.borrow().len(), space.div_ceil(PUBLISH_EVERY));
        assert_eq!(tx.cached_space(), 0);
        // Larger rings publish every quarter ring: a 64 KiB move into a
        // 1 MiB ring is one piece.
        for (order, piece) in [
            (12, PUBLISH_EVERY),
            (16, PUBLISH_EVERY),
            (18, 64 << 10),
            (20, 256 << 10),
        ] {
            let mem = Arc::new(HeapPages::new(1 << (order - 12)));
            let bytes = RawRingBytes::new(mem, 0, 1 << order).unwrap();
            assert_eq!(
                Ring::new(bytes, order).unwrap().piece(),
                piece,
                "order {order}"
            );
        }
    }

    #[test]
    fn index_wraparound_near_u32_max() {
        for start in [
            u32::MAX - 4096,
            u32::MAX - 4095,
            u32::MAX - 7,
            u32::MAX,
            0xFFFF_F800,
        ] {
            let mut f = Fixture::new();
            let h = f.hdr();
            h.store_u32(RIGHT_PROD, start);
            h.store_u32(RIGHT_CONS, start);
            let (h, mut tx, mut rx) = f.pair();
            let mut sent = 0u32;
            let mut got = Vec::new();
            let mut expect = Vec::new();
            for chunk in [1usize, 4095, 4096, 3000, 7, 2500] {
                let data = pattern(sent, chunk);
                let space = tx.fast_space(&h, chunk as u32, 1).unwrap();
                let n = tx.push(&h, &data);
                assert_eq!(n, chunk.min(space as usize));
                expect.extend_from_slice(&data[..n]);
                sent = sent.wrapping_add(n as u32);
                assert_eq!(h.load_u32(RIGHT_PROD), start.wrapping_add(sent));
                let ready = rx.fast_ready(&h, 4096, 1).unwrap() as usize;
                let mut buf = vec![0; ready];
                assert_eq!(rx.pop(&h, &mut buf), ready);
                got.extend_from_slice(&buf);
            }
            assert_eq!(got, expect, "start {start:#x}");
            assert_eq!(h.load_u32(RIGHT_CONS), start.wrapping_add(sent));
        }
    }

    #[test]
    fn full_ring_is_readable_and_not_writable() {
        // docs/vchan.md §13 row 2: `>` on both sides, so ready == size is readable.
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        assert_eq!(tx.push(&h, &[7; 5000]), 4096);
        assert_eq!(tx.fast_space(&h, 1, 1).unwrap(), 0);
        assert_eq!(tx.push(&h, &[7; 1]), 0);
        assert_eq!(rx.fast_ready(&h, 1, 1).unwrap(), 4096);
        assert_eq!(rx.pop(&h, &mut [0; 5000]), 4096);
    }

    /// XSA-86: an impossible `prod` is reported, never used.
    #[test]
    fn corrupt_prod_is_reported_not_clamped() {
        let mut f = Fixture::new();
        let (h, _tx, mut rx) = f.pair();
        for bad in [4097u32, 0x8000_0000, u32::MAX] {
            h.store_u32(RIGHT_PROD, bad);
            let e = rx.fast_ready(&h, 1, 1).unwrap_err();
            assert!(
                matches!(
                    e,
                    RingError::Corrupt {
                        ring: RingId::Right,
                        what: Corruption::Indices { prod, cons: 0, size: 4096 }
                    } if prod == bad
                ),
                "{e:?}"
            );
            assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidData);
            // Nothing was consumed, nothing cached.
            assert_eq!(rx.cached_ready(), 0);
            assert_eq!(rx.pop(&h, &mut [0; 16]), 0);
        }
        // The boundary value is fine: exactly full.
        h.store_u32(RIGHT_PROD, 4096);
        assert_eq!(rx.fast_ready(&h, 1, 1).unwrap(), 4096);
    }

    /// XSA-86 on the writer side: `cons` ahead of `prod`, or too far behind.
    #[test]
    fn corrupt_cons_is_reported_not_clamped() {
        let mut f = Fixture::new();
        let (h, mut tx, _rx) = f.pair();
        tx.push(&h, &[1; 100]);
        for bad in [101u32, 0xFFFF_0000, 100u32.wrapping_sub(4097)] {
            h.store_u32(RIGHT_CONS, bad);
            let e = tx.fast_space(&h, 4096, 1).unwrap_err();
            assert!(
                matches!(
                    e,
                    RingError::Corrupt {
                        ring: RingId::Right,
                        ..
                    }
                ),
                "{e:?}"
            );
            assert!(e.to_string().contains("exceeds the ring size 4096"), "{e}");
        }
        // cons == prod − size (exactly full) is legal.
        h.store_u32(RIGHT_CONS, 100u32.wrapping_sub(4096));
        assert_eq!(tx.load_space(&h).unwrap(), 0);
    }

    #[test]
    fn attach_rejects_inconsistent_indices() {
        let mut f = Fixture::new();
        let h = f.hdr();
        h.store_u32(RIGHT_PROD, 10);
        h.store_u32(RIGHT_CONS, 20);
        assert!(matches!(
            Producer::new(&h, Side::Server, Ring::new(f.bytes(), 12).unwrap()),
            Err(RingError::Corrupt { .. })
        ));
        assert!(matches!(
            Consumer::new(&h, Side::Client, Ring::new(f.bytes(), 12).unwrap()),
            Err(RingError::Corrupt { .. })
        ));
    }

    /// A peer overwriting *our* index changes nothing on our side: we keep
    /// our private copy and restore it on the next publish.
    #[test]
    fn own_index_is_private() {
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        tx.push(&h, &[1; 10]);
        h.store_u32(RIGHT_PROD, 0xDEAD_BEEF); // the peer scribbles on our prod
        assert_eq!(tx.prod(), 10);
        tx.push(&h, &[2; 5]);
        assert_eq!(h.load_u32(RIGHT_PROD), 15);
        assert_eq!(rx.fast_ready(&h, 1, 1).unwrap(), 15);
        rx.pop(&h, &mut [0; 4]);
        h.store_u32(RIGHT_CONS, 0x1234_5678); // and on the consumer's cons
        assert_eq!(rx.cons(), 4);
        rx.pop(&h, &mut [0; 1]);
        assert_eq!(h.load_u32(RIGHT_CONS), 5);
    }

    /// The peer's index is loaded once per decision and cached: with data
    /// cached, a read does not touch `prod` at all.
    #[test]
    fn cached_peer_index_is_reused_until_insufficient() {
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        tx.push(&h, &[1; 100]);
        assert_eq!(rx.fast_ready(&h, 10, 1).unwrap(), 100);
        h.store_u32(RIGHT_PROD, 0xFFFF_0000); // would be Corrupt if re-read
        assert_eq!(rx.fast_ready(&h, 10, 1).unwrap(), 100); // cache used
        assert_eq!(rx.pop(&h, &mut [0; 95]), 95);
        assert!(rx.fast_ready(&h, 10, 1).is_err()); // 5 < 10: re-read
    }

    #[test]
    fn notify_bits_request_and_test_and_clear() {
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        // Empty ring: the client (reader of right) requests WRITE from the
        // server by setting the bit in srv_notify (the server's own byte).
        assert_eq!(rx.fast_ready(&h, 1, 1).unwrap(), 0);
        assert_eq!(h.load_u8(SRV_NOTIFY), NOTIFY_WRITE);
        assert_eq!(h.load_u8(CLI_NOTIFY), 0);
        // Enough data: no request.
        tx.push(&h, &[1; 10]);
        assert!(tx.notify_produced(&h), "requested, so an event is due");
        assert_eq!(h.load_u8(SRV_NOTIFY), 0, "one-shot: cleared");
        assert!(!tx.notify_produced(&h), "no second event");
        assert_eq!(rx.fast_ready(&h, 5, 5).unwrap(), 10);
        assert_eq!(h.load_u8(SRV_NOTIFY), 0);
        // Writer wanting more than is free requests READ in cli_notify.
        tx.push(&h, &[1; 4086]);
        assert_eq!(tx.fast_space(&h, 1, 1).unwrap(), 0);
        assert_eq!(h.load_u8(CLI_NOTIFY), NOTIFY_READ);
        rx.pop(&h, &mut [0; 1]);
        assert!(rx.notify_consumed(&h));
        assert_eq!(h.load_u8(CLI_NOTIFY), 0);
        // Only our bit is cleared; other bits survive.
        h.store_u8(SRV_NOTIFY, NOTIFY_WRITE | NOTIFY_READ | 0x80);
        assert!(tx.notify_produced(&h));
        assert_eq!(h.load_u8(SRV_NOTIFY), NOTIFY_READ | 0x80);
    }

    #[test]
    fn data_ready_and_buffer_space_always_request() {
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        tx.push(&h, &[1; 10]);
        assert_eq!(rx.data_ready(&h).unwrap(), 10);
        assert_eq!(h.load_u8(SRV_NOTIFY), NOTIFY_WRITE);
        assert_eq!(tx.buffer_space(&h).unwrap(), 4086);
        assert_eq!(h.load_u8(CLI_NOTIFY), NOTIFY_READ);
    }

    #[test]
    fn zero_length_and_empty_operations_touch_nothing() {
        let mut f = Fixture::new();
        let (h, mut tx, mut rx) = f.pair();
        assert_eq!(tx.push(&h, &[]), 0);
        assert_eq!(rx.pop(&h, &mut []), 0);
        assert_eq!(rx.pop(&h, &mut [0; 4]), 0);
        assert_eq!((h.load_u32(RIGHT_PROD), h.load_u32(RIGHT_CONS)), (0, 0));
    }
}
