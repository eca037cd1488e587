//! Test support shared by `ring_*`, `hostile_*` tests and the fuzz target
//! (which includes this file with `#[path]`):
//!
//! * [`Guarded`]: a page-aligned anonymous mapping with `PROT_NONE` guard
//!   pages on both sides, so any access outside it kills the test process;
//! * [`VchanMemory`]: a control page and the external rings of a layout,
//!   each in its own guarded mapping, initialised as a libxenvchan server
//!   would;
//! * [`TestEvents`]: an in-process event channel pair (coalescing, like Xen);
//! * [`hostile`]: the hostile-peer drivers.

#![allow(dead_code)] // each test binary uses a different part

pub mod hostile;

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, mprotect, munmap};
use vchan::control::{
    CLI_LIVE, ControlPage, LIVE_CONNECTED, Layout, PAGE_SIZE, RingId, RingLocation, SharedHeader,
    Side, init_server_page, validate_client_orders,
};
use vchan::endpoint::{Endpoint, Events};
use vchan::mem::SharedMemory;

/// `len` bytes (a multiple of the page size) of zeroed read-write memory
/// between two inaccessible guard pages.
#[derive(Debug)]
pub struct Guarded {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; it is only accessed through raw pointers by the code under test (atomics for the header, copies for ring bytes), exactly as memory shared with another domain.
unsafe impl Send for Guarded {}
// SAFETY: as for `Send`.
unsafe impl Sync for Guarded {}

impl Guarded {
    /// Maps `len` bytes plus a guard page before and after.
    pub fn new(len: usize) -> Self {
        assert!(len > 0 && len.is_multiple_of(PAGE_SIZE));
        let total = NonZeroUsize::new(len + 2 * PAGE_SIZE).unwrap();
        // SAFETY: a fresh anonymous private mapping chosen by the kernel cannot alias anything.
        let outer = unsafe {
            mmap_anonymous(
                None,
                total,
                ProtFlags::PROT_NONE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_ANONYMOUS,
            )
        }
        .expect("mmap guard region");
        // SAFETY: `outer` is our mapping of `len + 2 pages`; the inner `len` bytes start one page in.
        let inner = unsafe { outer.cast::<u8>().add(PAGE_SIZE) };
        // SAFETY: the inner range lies within our own fresh mapping.
        unsafe {
            mprotect(
                inner.cast(),
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            )
        }
        .expect("mprotect inner region");
        Self { base: inner, len }
    }

    /// Start of the accessible bytes.
    pub fn ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Number of accessible bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Copies the accessible bytes out (no reference into the mapping).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: `len` readable bytes at `base`; `v` is private.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(), v.as_mut_ptr(), self.len) };
        v
    }
}

// SAFETY: `base` is non-null, page-aligned and valid for reads and writes of `len` bytes until `drop`; only raw accesses are made to it.
unsafe impl SharedMemory for Guarded {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_writable(&self) -> bool {
        true
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new` (guards included); nothing uses it any more (owners drop endpoints first).
        unsafe {
            let outer = self.base.as_ptr().sub(PAGE_SIZE);
            munmap(
                NonNull::new_unchecked(outer).cast(),
                self.len + 2 * PAGE_SIZE,
            )
            .expect("munmap guard region");
        }
    }
}

/// The shared memory of one vchan: a guarded control page and a guarded
/// mapping per external ring.
#[derive(Debug)]
pub struct VchanMemory {
    pub layout: Layout,
    pub ctrl: Arc<Guarded>,
    pub left: Option<Arc<Guarded>>,
    pub right: Option<Arc<Guarded>>,
}

impl VchanMemory {
    /// Memory for `layout`, initialised as a libxenvchan server does, with
    /// all four indices set to `start` (indices survive reconnects, so any
    /// value is legitimate) and the client already connected unless
    /// `client_connected` is false.
    pub fn new(layout: Layout, start: u32, client_connected: bool) -> Self {
        let ctrl = Arc::new(Guarded::new(PAGE_SIZE));
        let ext = |id: RingId| match layout.location(id) {
            RingLocation::InPage { .. } => None,
            RingLocation::External { pages, .. } => Some(Arc::new(Guarded::new(pages * PAGE_SIZE))),
        };
        let mem = Self {
            layout,
            left: ext(RingId::Left),
            right: ext(RingId::Right),
            ctrl,
        };
        let h = mem.header();
        let nl = vchan::control::grants_for(layout.left_order) as u32;
        let nr = vchan::control::grants_for(layout.right_order) as u32;
        let lg: Vec<u32> = (0..nl).map(|i| 0x100 + i).collect();
        let rg: Vec<u32> = (0..nr).map(|i| 0x800 + i).collect();
        init_server_page(&h, &layout, &lg, &rg).unwrap();
        for id in [RingId::Left, RingId::Right] {
            h.store_u32(id.cons_offset(), start);
            h.store_u32(id.prod_offset(), start);
        }
        if client_connected {
            h.store_u8(CLI_LIVE, LIVE_CONNECTED);
        }
        mem
    }

    /// The control page as a [`ControlPage`].
    pub fn header(&self) -> ControlPage {
        ControlPage::new(self.ctrl.clone()).expect("a page")
    }

    /// An endpoint for `side` over this memory. The client validates the
    /// orders from the page first, as a real client does.
    ///
    /// The endpoint holds the mappings: it may outlive `self`.
    pub fn endpoint(&self, side: Side, events: TestEvents) -> Endpoint<TestEvents> {
        self.try_endpoint(side, events).expect("endpoint")
    }

    /// As [`VchanMemory::endpoint`], returning the error.
    pub fn try_endpoint(
        &self,
        side: Side,
        events: TestEvents,
    ) -> Result<Endpoint<TestEvents>, vchan::ring::RingError> {
        let layout = match side {
            Side::Server => self.layout,
            Side::Client => {
                let (l, r) = vchan::control::read_orders(&self.header());
                validate_client_orders(l, r)?
            }
        };
        let mem = |g: &Option<Arc<Guarded>>| g.clone().map(|g| g as Arc<dyn SharedMemory>);
        Endpoint::new(
            self.ctrl.clone(),
            side,
            &layout,
            mem(&self.left),
            mem(&self.right),
            events,
        )
    }

    /// Start address of `ring`'s bytes.
    pub fn ring_ptr(&self, ring: RingId) -> *mut u8 {
        match (self.layout.location(ring), ring) {
            (RingLocation::InPage { offset }, _) => {
                // SAFETY: in-page offsets lie inside the control page.
                unsafe { self.ctrl.ptr().add(offset) }
            }
            (RingLocation::External { .. }, RingId::Left) => self.left.as_ref().unwrap().ptr(),
            (RingLocation::External { .. }, RingId::Right) => self.right.as_ref().unwrap().ptr(),
        }
    }
}

/// Every `(left, right)` order pair a client accepts (docs/vchan.md §4.3): both in
/// 10..=20, not both 10, not both 11. 119 pairs.
pub fn all_valid_order_pairs() -> Vec<(u8, u8)> {
    let mut v = Vec::new();
    for l in 10..=20u8 {
        for r in 10..=20u8 {
            if Layout::new(l, r).is_ok() {
                v.push((l, r));
            }
        }
    }
    v
}

/// One direction of the in-process event channel: a pending flag
/// (notifications coalesce, as on Xen) and a condition variable.
#[derive(Debug, Default)]
pub struct Signal {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Signal {
    fn raise(&self) {
        *self.pending.lock().unwrap() = true;
        self.cv.notify_all();
    }

    fn wait_for(&self, d: Option<Duration>) -> bool {
        let mut p = self.pending.lock().unwrap();
        let deadline = d.map(|d| std::time::Instant::now() + d);
        while !*p {
            match deadline {
                None => p = self.cv.wait(p).unwrap(),
                Some(dl) => {
                    let now = std::time::Instant::now();
                    if now >= dl {
                        return false;
                    }
                    p = self.cv.wait_timeout(p, dl - now).unwrap().0;
                }
            }
        }
        *p = false;
        true
    }

    fn take(&self) -> bool {
        std::mem::replace(&mut *self.pending.lock().unwrap(), false)
    }
}

/// One end's view of the in-process event channel.
#[derive(Debug, Clone)]
pub struct TestEvents {
    mine: Arc<Signal>,
    peer: Arc<Signal>,
    sent: Arc<AtomicUsize>,
}

impl TestEvents {
    /// A connected pair: `(server's, client's)`.
    pub fn pair() -> (TestEvents, TestEvents) {
        let s = Arc::new(Signal::default());
        let c = Arc::new(Signal::default());
        (
            TestEvents {
                mine: s.clone(),
                peer: c.clone(),
                sent: Arc::new(AtomicUsize::new(0)),
            },
            TestEvents {
                mine: c,
                peer: s,
                sent: Arc::new(AtomicUsize::new(0)),
            },
        )
    }

    /// Events this end has sent so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Whether an event for this end is pending (consumes it).
    pub fn take_pending(&self) -> bool {
        self.mine.take()
    }
}

impl Events for TestEvents {
    fn notify(&self) -> std::io::Result<()> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        self.peer.raise();
        Ok(())
    }

    fn wait(&self) -> std::io::Result<()> {
        self.mine.wait_for(None);
        Ok(())
    }

    fn wait_timeout(&self, d: Duration) -> std::io::Result<bool> {
        Ok(self.mine.wait_for(Some(d)))
    }

    fn consume_pending(&self) -> std::io::Result<bool> {
        Ok(self.mine.take())
    }
}

/// A deterministic byte stream: byte `i` of stream `seed`.
pub fn stream_byte(seed: u64, i: u64) -> u8 {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x >> 24) as u8
}

/// Fills `buf` with stream `seed` starting at byte `pos`.
pub fn fill_stream(seed: u64, pos: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = stream_byte(seed, pos + k as u64);
    }
}

/// Runs `f` on a thread and fails the test if it does not finish within
/// `limit` (a hang is a failure, never an endless test).
pub fn with_watchdog<T: Send + 'static>(
    name: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let r = f();
            let _ = tx.send(());
            r
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(()) => h.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: {name} did not finish within {limit:?} (hang or lost wakeup)")
        }
    }
}
