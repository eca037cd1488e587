//! `loom` model of the ring + notification protocol (docs/vchan.md §5.2–§5.4), run
//! over **the real `Endpoint`, `Producer`, `Consumer`, `request_notify` and
//! `send_notify` code**: only the three memory traits are swapped for loom
//! types.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p vchan --test loom_notify --release
//! ```
//!
//! * Header: loom atomics. Loads and stores are `Relaxed` (as in
//!   `ControlPage`); the notify-byte RMWs are `Relaxed` in the main models,
//!   so that the ring code's explicit fences are the *only* source of
//!   ordering, and `SeqCst` (as in `ControlPage`) in the `*_real_rmw`
//!   models. Fences go to `loom::sync::atomic::fence`.
//! * Ring bytes: one `loom::cell::UnsafeCell<u8>` per byte, so a read of a
//!   byte that is not ordered after its write (or a write racing a read) is
//!   reported as a causality violation.
//! * Events: a pending flag under a loom `Mutex` with a `Condvar`;
//!   `wait_timeout` never times out (loom's condvar cannot), so "blocking"
//!   really blocks, and a lost wakeup leaves both threads waiting forever,
//!   which loom reports as a deadlock. (In production the poll interval
//!   would turn a lost wakeup into latency; the model switches that safety
//!   net off.)
//! * The notify bytes start at 0 ("mid-conversation"), not at the server's
//!   initial `cli_notify = WRITE`, which would mask a lost first wakeup.
//!
//! Fault injection (each must make some model fail; `.ci/run` runs all
//! seven and fails if one passes). Select one with
//! `VCHAN_LOOM_MUTANT=no_fence RUSTFLAGS="--cfg loom" cargo test ...`
//! (`vchan/build.rs` sets the cfg, so only vchan is rebuilt), or with
//! `RUSTFLAGS="--cfg loom --cfg vchan_loom_no_fence"`:
//!
//! | cfg | removes | fails with |
//! |-----|---------|------------|
//! | `vchan_loom_no_recheck` | the index re-load after `request_notify` | deadlock (lost wakeup) |
//! | `vchan_loom_no_fence` | the SeqCst fence in `request_notify` | deadlock |
//! | `vchan_loom_no_notify_fence` | the SeqCst fence in `send_notify` | deadlock |
//! | `vchan_loom_no_wmb` | the Release fence before publishing `prod` | causality violation on a ring byte |
//! | `vchan_loom_no_live_acquire` | the Acquire fence after reading the live byte | EOF before the last data |
//! | `vchan_loom_no_space_acquire` | the Acquire fence between the producer's `cons` load and its writes into the ring | causality violation on a ring byte |
//! | `vchan_loom_no_cons_release` | the Release fence between the consumer's reads of the ring and its `cons` store | causality violation on a ring byte |
//!
//! The two Dekker fence mutants fail the `*_real_rmw` models too: the
//! notifier tests its bit with a plain load first and does its
//! `fetch_and` only when the bit is set (docs/vchan.md §5.4), so no RMW on
//! the notify byte orders the two sides when the bit looks clear; only the
//! fences do, as libxenvchan's barriers do (docs/vchan.md §5.5).
//!
//! What loom does and does not check here: loom treats `SeqCst` *accesses*
//! as `AcqRel`, but implements `fence(SeqCst)`: each SeqCst fence joins the
//! thread's causality with a global SeqCst view, so SeqCst fences are
//! totally ordered in each explored execution and a later one sees
//! everything before an earlier one. For the Dekker pattern (store; SeqCst
//! fence; load) that is exactly the C++20 guarantee we rely on (of two such
//! fences, the second one's side observes the other side's store); loom's
//! version is somewhat stronger than C++ (it also transfers causality), so
//! a pass says the protocol is right given C++ fence semantics for this
//! pattern, not that every conceivable weaker reading is excluded. Loom also
//! does not model load buffering (a relaxed load reading a later store),
//! which this protocol does not depend on. Exploration is bounded by
//! `LOOM_MAX_PREEMPTIONS` (default here: 3).
#![cfg(loom)]

use std::fmt;
use std::io;
use std::time::Duration;

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use vchan::control::{Layout, RingId, SharedHeader, Side};
use vchan::endpoint::{Endpoint, Events, PeerState};

// ---------------------------------------------------------------------------
// The three memory traits over loom types

#[derive(Debug)]
struct Page {
    /// left.cons, left.prod, right.cons, right.prod
    words: [AtomicU32; 4],
    /// left_order, right_order
    orders: [AtomicU16; 2],
    /// cli_live, srv_live, cli_notify, srv_notify
    bytes: [AtomicU8; 4],
}

#[derive(Debug, Clone)]
struct LoomHeader {
    page: Arc<Page>,
    rmw: Ordering,
}

impl SharedHeader for LoomHeader {
    fn load_u32(&self, off: usize) -> u32 {
        self.page.words[word(off)].load(Ordering::Relaxed)
    }
    fn store_u32(&self, off: usize, val: u32) {
        self.page.words[word(off)].store(val, Ordering::Relaxed)
    }
    fn load_u16(&self, off: usize) -> u16 {
        self.page.orders[half(off)].load(Ordering::Relaxed)
    }
    fn store_u16(&self, off: usize, val: u16) {
        self.page.orders[half(off)].store(val, Ordering::Relaxed)
    }
    fn load_u8(&self, off: usize) -> u8 {
        self.page.bytes[byte(off)].load(Ordering::Relaxed)
    }
    fn store_u8(&self, off: usize, val: u8) {
        self.page.bytes[byte(off)].store(val, Ordering::Relaxed)
    }
    fn fetch_or_u8(&self, off: usize, bits: u8) -> u8 {
        self.page.bytes[byte(off)].fetch_or(bits, self.rmw)
    }
    fn fetch_and_u8(&self, off: usize, bits: u8) -> u8 {
        self.page.bytes[byte(off)].fetch_and(bits, self.rmw)
    }
    fn fence(&self, order: Ordering) {
        loom::sync::atomic::fence(order)
    }
}

fn word(off: usize) -> usize {
    assert!(
        off % 4 == 0 && off < 16,
        "no u32 field at {off} in the model"
    );
    off / 4
}
fn half(off: usize) -> usize {
    assert!(off == 16 || off == 18, "no u16 field at {off} in the model");
    (off - 16) / 2
}
fn byte(off: usize) -> usize {
    assert!(
        (20..24).contains(&off),
        "no byte field at {off} in the model"
    );
    off - 20
}

/// Ring bytes as loom cells: data races become model failures.
#[derive(Clone)]
struct LoomBytes(Arc<Vec<UnsafeCell<u8>>>);

impl fmt::Debug for LoomBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LoomBytes({})", self.0.len())
    }
}

impl LoomBytes {
    fn new(size: usize) -> Self {
        Self(Arc::new((0..size).map(|_| UnsafeCell::new(0u8)).collect()))
    }
}

impl vchan::ring::RingBytes for LoomBytes {
    fn size(&self) -> usize {
        self.0.len()
    }
    unsafe fn write_at(&self, off: usize, src: &[u8]) {
        for (i, &b) in src.iter().enumerate() {
            // SAFETY: loom checks the access; the pointer is the cell's own.
            self.0[off + i].with_mut(|p| unsafe { *p = b });
        }
    }
    unsafe fn read_at(&self, off: usize, dst: &mut [u8]) {
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: as above.
            *d = self.0[off + i].with(|p| unsafe { *p });
        }
    }
}

#[derive(Debug)]
struct Signal {
    pending: Mutex<bool>,
    cv: Condvar,
}

/// One end of the model event channel.
#[derive(Debug)]
struct LoomEvents {
    mine: Arc<Signal>,
    peer: Arc<Signal>,
}

impl LoomEvents {
    fn pair() -> (LoomEvents, LoomEvents) {
        let a = Arc::new(Signal {
            pending: Mutex::new(false),
            cv: Condvar::new(),
        });
        let b = Arc::new(Signal {
            pending: Mutex::new(false),
            cv: Condvar::new(),
        });
        (
            LoomEvents {
                mine: a.clone(),
                peer: b.clone(),
            },
            LoomEvents { mine: b, peer: a },
        )
    }
}

impl Events for LoomEvents {
    fn notify(&self) -> io::Result<()> {
        *self.peer.pending.lock().unwrap() = true;
        self.peer.cv.notify_all();
        Ok(())
    }
    fn wait(&self) -> io::Result<()> {
        let mut p = self.mine.pending.lock().unwrap();
        while !*p {
            p = self.mine.cv.wait(p).unwrap();
        }
        *p = false;
        Ok(())
    }
    /// Never times out: in the model only an event can wake a waiter.
    fn wait_timeout(&self, _d: Duration) -> io::Result<bool> {
        self.wait().map(|()| true)
    }
    fn consume_pending(&self) -> io::Result<bool> {
        Ok(std::mem::replace(
            &mut *self.mine.pending.lock().unwrap(),
            false,
        ))
    }
}

type Ep = Endpoint<LoomEvents, LoomHeader, LoomBytes>;

/// Holds a value that must not be dropped while a loom failure unwinds:
/// loom objects dropped after loom tore the execution down panic again,
/// which aborts the test binary and hides loom's report.
struct LeakOnPanic<T>(Option<T>);

impl<T> LeakOnPanic<T> {
    fn new(v: T) -> Self {
        Self(Some(v))
    }
    fn get(&mut self) -> &mut T {
        self.0.as_mut().expect("present until dropped")
    }
    fn into_inner(mut self) -> T {
        self.0.take().expect("present until dropped")
    }
}

impl<T> Drop for LeakOnPanic<T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::mem::forget(self.0.take());
        }
    }
}

/// Orders 10/11 (both rings in the page), both sides connected, notify
/// bytes 0, all indices `start`, and `prefill` bytes already in the left
/// ring (client → server).
fn setup(rmw: Ordering, start: u32, prefill: u32) -> (Ep, Ep) {
    let layout = Layout::new(10, 11).unwrap();
    let page = Arc::new(Page {
        words: [
            AtomicU32::new(start),
            AtomicU32::new(start.wrapping_add(prefill)),
            AtomicU32::new(start),
            AtomicU32::new(start),
        ],
        orders: [AtomicU16::new(10), AtomicU16::new(11)],
        bytes: [
            AtomicU8::new(1),
            AtomicU8::new(1),
            AtomicU8::new(0),
            AtomicU8::new(0),
        ],
    });
    let h = LoomHeader { page, rmw };
    let left = LoomBytes::new(1024);
    let right = LoomBytes::new(2048);
    let (se, ce) = LoomEvents::pair();
    let s = Endpoint::from_parts(
        h.clone(),
        Side::Server,
        &layout,
        left.clone(),
        right.clone(),
        se,
    )
    .unwrap();
    let c = Endpoint::from_parts(h, Side::Client, &layout, left, right, ce).unwrap();
    (s, c)
}

/// Runs a model, then prints how many executions loom explored (so a
/// reader of the test output can see the model was not trivially small).
fn check(name: &str, f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    let bound = b.preemption_bound;
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&runs);
    b.check(move || {
        counter.fetch_add(1, SeqCst);
        f()
    });
    eprintln!(
        "{name}: {} executions explored, preemption bound {bound:?}",
        runs.load(SeqCst)
    );
}

// ---------------------------------------------------------------------------
// Models

/// The reader sleeps on an empty ring; the writer writes twice. A lost
/// `NOTIFY_WRITE` wakeup deadlocks the reader.
fn reader_waits_for_writer(rmw: Ordering) {
    check("reader_waits_for_writer", move || {
        let (server, mut client) = setup(rmw, u32::MAX, 0);
        let mut server = LeakOnPanic::new(server);
        let writer = LeakOnPanic::new(thread::spawn(move || {
            assert_eq!(client.write(&[0xA1]).unwrap(), 1);
            assert_eq!(client.write(&[0xA2]).unwrap(), 1);
        }));
        let mut got = Vec::new();
        while got.len() < 2 {
            let mut buf = [0u8; 2];
            let n = server.get().read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, [0xA1, 0xA2]);
        writer.into_inner().join().unwrap();
    });
}

/// The writer sleeps on a full ring (1023 bytes prefilled, wrapping at the
/// ring end); the reader drains. A lost `NOTIFY_READ` wakeup deadlocks the
/// writer.
fn writer_waits_for_reader(rmw: Ordering) {
    check("writer_waits_for_reader", move || {
        let (server, mut client) = setup(rmw, u32::MAX - 500, 1023);
        let mut server = LeakOnPanic::new(server);
        let writer = LeakOnPanic::new(thread::spawn(move || {
            // One byte fits, the second needs the reader.
            assert_eq!(client.write(&[0xB1, 0xB2]).unwrap(), 2);
        }));
        let mut total = 0;
        let mut last = Vec::new();
        while total < 1025 {
            let mut buf = vec![0u8; 1024];
            let n = server.get().read(&mut buf).unwrap();
            total += n;
            last.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&last[1023..], &[0xB1, 0xB2]);
        writer.into_inner().join().unwrap();
    });
}

/// The writer writes one byte and closes at once; the reader must get the
/// byte before end of stream (live byte read, then indices re-read).
fn no_data_lost_at_close(rmw: Ordering) {
    check("no_data_lost_at_close", move || {
        let (server, mut client) = setup(rmw, 7, 0);
        let mut server = LeakOnPanic::new(server);
        let writer = LeakOnPanic::new(thread::spawn(move || {
            assert_eq!(client.write(&[0xC1]).unwrap(), 1);
            client.close().unwrap();
        }));
        let mut got = Vec::new();
        loop {
            let mut buf = [0u8; 4];
            let n = server.get().read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, [0xC1], "EOF before the data written before close");
        assert_eq!(server.get().peer_state(), PeerState::Closed);
        writer.into_inner().join().unwrap();
    });
}

/// Both ends write one byte, then block reading the other's byte: the two
/// notify bytes are used in both directions at once.
fn both_directions(rmw: Ordering) {
    check("both_directions", move || {
        let (server, mut client) = setup(rmw, 0x8000_0000, 0);
        let mut server = LeakOnPanic::new(server);
        let peer = LeakOnPanic::new(thread::spawn(move || {
            assert_eq!(client.write(&[0xD1]).unwrap(), 1);
            let mut b = [0u8; 1];
            assert_eq!(client.read(&mut b).unwrap(), 1);
            assert_eq!(b, [0xD2]);
        }));
        assert_eq!(server.get().write(&[0xD2]).unwrap(), 1);
        let mut b = [0u8; 1];
        assert_eq!(server.get().read(&mut b).unwrap(), 1);
        assert_eq!(b, [0xD1]);
        peer.into_inner().join().unwrap();
    });
}

/// Poll-style reader: `data_ready()` (which requests a notification), then
/// `wait()` when nothing is there.
fn poll_style_reader(rmw: Ordering) {
    check("poll_style_reader", move || {
        let (server, mut client) = setup(rmw, 1, 0);
        let mut server = LeakOnPanic::new(server);
        let writer = LeakOnPanic::new(thread::spawn(move || {
            assert_eq!(client.write(&[0xE1]).unwrap(), 1);
        }));
        server.get().set_blocking(false);
        while server.get().data_ready().unwrap() == 0 {
            server.get().wait().unwrap();
        }
        let mut b = [0u8; 1];
        assert_eq!(server.get().read(&mut b).unwrap(), 1);
        assert_eq!(b, [0xE1]);
        writer.into_inner().join().unwrap();
    });
}

#[test]
fn loom_both_directions() {
    both_directions(Ordering::Relaxed);
}

#[test]
fn loom_poll_style_reader() {
    poll_style_reader(Ordering::Relaxed);
}

#[test]
fn loom_reader_waits_for_writer() {
    reader_waits_for_writer(Ordering::Relaxed);
}

#[test]
fn loom_writer_waits_for_reader() {
    writer_waits_for_reader(Ordering::Relaxed);
}

#[test]
fn loom_no_data_lost_at_close() {
    no_data_lost_at_close(Ordering::Relaxed);
}

/// As the real `ControlPage`: SeqCst RMWs (loom treats them as AcqRel).
#[test]
fn loom_reader_waits_for_writer_real_rmw() {
    reader_waits_for_writer(Ordering::SeqCst);
}

/// As the real `ControlPage`: SeqCst RMWs.
#[test]
fn loom_writer_waits_for_reader_real_rmw() {
    writer_waits_for_reader(Ordering::SeqCst);
}

/// Sanity check of the model itself: the server reads the right ring's
/// initial state and the layout is what the models assume.
#[test]
fn loom_model_setup() {
    loom::model(|| {
        let (mut s, c) = setup(Ordering::Relaxed, 3, 5);
        assert_eq!(s.read_ring_size(), 1024);
        assert_eq!(c.read_ring_size(), 2048);
        assert_eq!(s.data_ready().unwrap(), 5);
        assert_eq!(s.layout().order(RingId::Left), 10);
    });
}
