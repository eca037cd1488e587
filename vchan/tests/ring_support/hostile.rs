//! Hostile-peer drivers: the peer writes arbitrary values into every header
//! field (indices, orders, live and notify bytes) and the grant list, sends
//! and swallows events, and fills ring bytes with junk, while our
//! [`Endpoint`](vchan::endpoint::Endpoint) keeps operating.
//!
//! What must hold, whatever the peer does:
//! * our side never touches memory outside its rings and the header fields
//!   it owns (guard pages kill the process otherwise; [`run_script`]
//!   additionally diffs the control page and the read ring around each of
//!   our operations);
//! * it never panics;
//! * every call returns (bounded by the endpoint's timeout; the callers wrap
//!   runs in a watchdog) with `Ok` or a typed error that a peer can cause.
//!
//! [`run_script`] is deterministic and single-threaded (the fuzz target and
//! the CI seeds use it); [`run_threaded`] lets the peer mutate concurrently.

use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::os::fd::AsFd;
use vchan::control::{
    CLI_LIVE, GRANTS, LEFT_ORDER, LIVE_EXITED, Layout, PAGE_SIZE, RIGHT_ORDER, RingId,
    RingLocation, SharedHeader, Side, grant_offset,
};
use vchan::endpoint::{Endpoint, Events, FdError};
use vchan::ring::RingError;

use super::{TestEvents, VchanMemory, all_valid_order_pairs};

/// Reads fuzz/seed bytes; yields zeros once exhausted.
#[derive(Debug)]
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    /// Reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }
    /// Whether all bytes were consumed.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    /// Next byte (0 when exhausted).
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    /// Next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// Next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// SplitMix64, to turn a seed into script bytes without extra dependencies.
pub fn seed_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// Outcome counts of our operations during a hostile run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Operations attempted.
    pub ops: usize,
    /// `Ok` results.
    pub ok: usize,
    /// Bytes we read or wrote successfully.
    pub bytes: usize,
    /// `Corrupt` errors (the peer broke the header).
    pub corrupt: usize,
    /// `PeerClosed`.
    pub peer_closed: usize,
    /// `WouldBlock`.
    pub would_block: usize,
    /// `TimedOut`.
    pub timed_out: usize,
    /// `TooBig`.
    pub too_big: usize,
    /// `Closed` (after our own close).
    pub closed: usize,
}

impl Report {
    /// Counts one result; panics on an error a peer must not be able to
    /// cause (event failures, setup errors).
    pub fn count<T>(&mut self, r: Result<T, RingError>, bytes: impl FnOnce(&T) -> usize) {
        self.ops += 1;
        match r {
            Ok(v) => {
                self.ok += 1;
                self.bytes += bytes(&v);
            }
            Err(RingError::Corrupt { .. }) => self.corrupt += 1,
            Err(RingError::PeerClosed) => self.peer_closed += 1,
            Err(RingError::WouldBlock) => self.would_block += 1,
            Err(RingError::TimedOut) => self.timed_out += 1,
            Err(RingError::TooBig { .. }) => self.too_big += 1,
            Err(RingError::Closed) => self.closed += 1,
            Err(e) => panic!("error a peer must not be able to cause: {e:?}"),
        }
    }

    /// Adds another report.
    pub fn add(&mut self, o: &Report) {
        self.ops += o.ops;
        self.ok += o.ok;
        self.bytes += o.bytes;
        self.corrupt += o.corrupt;
        self.peer_closed += o.peer_closed;
        self.would_block += o.would_block;
        self.timed_out += o.timed_out;
        self.too_big += o.too_big;
        self.closed += o.closed;
    }
}

/// Bound for each of our blocking operations in threaded hostile runs.
const OP_TIMEOUT: Duration = Duration::from_millis(2);
/// In single-threaded runs nobody can unblock us: keep waits tiny.
const SCRIPT_OP_TIMEOUT: Duration = Duration::from_micros(300);
const POLL: Duration = Duration::from_millis(1);
const MAX_STEPS: usize = 256;

/// Lowest byte offset of an in-page ring (grant entries below it do not
/// overlap ring bytes).
fn grant_area_end(layout: &Layout) -> usize {
    layout.grant_list_limit()
}

/// One hostile mutation of the shared header, grant list or (if
/// `ring_junk`) ring bytes, decoded from `b`. `ours` is the side under
/// attack.
fn mutate(
    b: &mut Bytes<'_>,
    mem: &VchanMemory,
    ours: Side,
    peer_events: &TestEvents,
    ring_junk: bool,
) {
    let h = mem.header();
    let rd = ours.read_ring();
    let wr = ours.write_ring();
    let rd_size = mem.layout.ring_size(rd) as u32;
    let wr_size = mem.layout.ring_size(wr) as u32;
    match b.u8() % 12 {
        // The peer's own indices: arbitrary values…
        0 => h.store_u32(rd.prod_offset(), b.u32()),
        1 => h.store_u32(wr.cons_offset(), b.u32()),
        // …and plausible ones (within or just beyond the ring size).
        2 => {
            let k = u32::from(b.u16()) % (rd_size + 2);
            let cons = h.load_u32(rd.cons_offset());
            h.store_u32(rd.prod_offset(), cons.wrapping_add(k));
        }
        3 => {
            let k = u32::from(b.u16()) % (wr_size + 2);
            let prod = h.load_u32(wr.prod_offset());
            h.store_u32(wr.cons_offset(), prod.wrapping_sub(k));
        }
        // Scribbles on the indices we own.
        4 => {
            let off = if b.u8() & 1 == 0 {
                rd.cons_offset()
            } else {
                wr.prod_offset()
            };
            h.store_u32(off, b.u32());
        }
        // Orders (must stay constant; a change is corruption).
        5 => {
            let off = if b.u8() & 1 == 0 {
                LEFT_ORDER
            } else {
                RIGHT_ORDER
            };
            let v = if b.u8() & 1 == 0 {
                u16::from(b.u8() % 24)
            } else {
                b.u16()
            };
            h.store_u16(off, v);
        }
        // Live and notify bytes.
        6 | 7 => {
            let off = CLI_LIVE + usize::from(b.u8() % 4);
            let v = match b.u8() % 4 {
                0 => 0,
                1 => 1,
                2 => 2,
                _ => b.u8(),
            };
            h.store_u8(off, v);
        }
        // Grant list (in the threaded run only below any in-page ring, so
        // atomics never race with our ring copies of the same bytes).
        8 => {
            let limit = if ring_junk {
                PAGE_SIZE
            } else {
                grant_area_end(&mem.layout)
            };
            let slots = (limit - GRANTS) / 4;
            let idx = usize::from(b.u16()) % slots;
            h.store_u32(grant_offset(idx), b.u32());
        }
        // Events: send one to us, or swallow ours.
        9 => {
            let _ = peer_events.notify();
        }
        10 => {
            let _ = peer_events.consume_pending();
        }
        // Junk into the ring we read (single-threaded runs only: a
        // concurrent plain write would race with our copy).
        _ => {
            if ring_junk {
                let size = rd_size as usize;
                let off = usize::from(b.u16()) % size;
                let len = usize::from(b.u16()) % (size - off + 1);
                // SAFETY: `off + len <= size` bytes of our read ring, a live guarded mapping; single-threaded, nobody else accesses it during this call.
                unsafe { ptr::write_bytes(mem.ring_ptr(rd).add(off), b.u8(), len) };
            }
        }
    }
}

/// An fd↔ring result in the ring's terms: the pipe's own "would block"
/// is fine; any other fd error (EFAULT: the kernel was handed memory
/// outside the ring) is a bug of ours.
fn fd_result(r: Result<usize, FdError>) -> Result<usize, RingError> {
    match r {
        Ok(n) => Ok(n),
        Err(FdError::Ring(e)) => Err(e),
        Err(FdError::Fd(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        Err(FdError::Fd(e)) => panic!("fd error a peer must not be able to cause: {e}"),
    }
}

/// One of our operations, decoded from `b`.
fn our_op<E: Events>(b: &mut Bytes<'_>, ep: &mut Endpoint<E>, report: &mut Report) {
    let rd = ep.read_ring_size();
    let wr = ep.write_ring_size();
    let len = |b: &mut Bytes<'_>, size: usize| match b.u8() % 8 {
        0 => size,
        1 => size + 1,
        2 => 0,
        _ => usize::from(b.u16()) % (size + 2),
    };
    match b.u8() % 12 {
        0 | 1 => {
            let mut buf = vec![0u8; len(b, rd)];
            report.count(ep.read(&mut buf), |&n| n);
        }
        2 | 3 => {
            let buf = vec![0x5Au8; len(b, wr)];
            report.count(ep.write(&buf), |&n| n);
        }
        4 => {
            let buf = vec![0xA5u8; len(b, wr)];
            report.count(ep.send(&buf), |&n| n);
        }
        5 => {
            let mut buf = vec![0u8; len(b, rd)];
            report.count(ep.recv(&mut buf), |&n| n);
        }
        6 => {
            report.count(ep.data_ready(), |_| 0);
            report.count(ep.buffer_space(), |_| 0);
        }
        7 => ep.set_blocking(b.u8() & 1 == 0),
        // The one-copy fd paths: the kernel reads into our write ring /
        // writes from our read ring. A kernel access outside the ring
        // would fail with EFAULT (guard pages), which is checked here.
        10 => {
            let n = len(b, wr);
            let (r, w) = nix::unistd::pipe().expect("pipe");
            let fill = n.min(60_000);
            let _ = nix::unistd::write(&w, &vec![0x3Cu8; fill]);
            nix::fcntl::fcntl(
                &r,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .expect("O_NONBLOCK");
            report.count(fd_result(ep.read_from_fd(r.as_fd(), n)), |&n| n);
        }
        11 => {
            let n = len(b, rd);
            let (_r, w) = nix::unistd::pipe().expect("pipe");
            nix::fcntl::fcntl(
                &w,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .expect("O_NONBLOCK");
            report.count(fd_result(ep.write_to_fd(w.as_fd(), n)), |&n| n);
        }
        8 => report.count(ep.wait(), |_| 0),
        _ => {
            let _ = ep.peer_state();
            report.count(ep.check(), |_| 0);
            if b.u8() == 0xFF {
                report.count(ep.close(), |_| 0);
            }
        }
    }
}

/// Byte ranges of the control page our side may legitimately write:
/// our two indices, our live byte, both notify bytes, and our write ring if
/// it lives in the page.
fn writable_by_us(layout: &Layout, side: Side) -> Vec<std::ops::Range<usize>> {
    let rd = side.read_ring();
    let wr = side.write_ring();
    let mut v = vec![
        rd.cons_offset()..rd.cons_offset() + 4,
        wr.prod_offset()..wr.prod_offset() + 4,
        side.own_live()..side.own_live() + 1,
        side.own_notify()..side.own_notify() + 1,
        side.peer_notify()..side.peer_notify() + 1,
    ];
    if let RingLocation::InPage { offset } = layout.location(wr) {
        v.push(offset..offset + layout.ring_size(wr));
    }
    v
}

/// Deterministic single-threaded hostile run driven by `data` (fuzz input
/// or seed bytes). Panics if our side misbehaves.
pub fn run_script(data: &[u8]) -> Report {
    let mut b = Bytes::new(data);
    let pairs = all_valid_order_pairs();
    let (lo, ro) = pairs[usize::from(b.u8()) % pairs.len()];
    let layout = Layout::new(lo, ro).expect("valid pair");
    let side = if b.u8() & 1 == 0 {
        Side::Server
    } else {
        Side::Client
    };
    let mem = VchanMemory::new(layout, b.u32(), true);
    let (server_ev, client_ev) = TestEvents::pair();
    let (ours_ev, peer_ev) = match side {
        Side::Server => (server_ev, client_ev),
        Side::Client => (client_ev, server_ev),
    };
    let mut report = Report::default();
    let mut ep = match mem.try_endpoint(side, ours_ev) {
        Ok(ep) => ep,
        Err(e) => panic!("a freshly initialised page must attach: {e:?}"),
    };
    ep.set_timeout(Some(SCRIPT_OP_TIMEOUT));
    ep.set_poll_interval(POLL);
    ep.set_blocking(b.u8() & 1 == 0);

    let allowed = writable_by_us(&layout, side);
    let rd = side.read_ring();
    let external_rd = match layout.location(rd) {
        RingLocation::External { .. } => Some(rd),
        RingLocation::InPage { .. } => None,
    };
    for _ in 0..MAX_STEPS {
        if b.is_empty() {
            break;
        }
        if b.u8().is_multiple_of(2) {
            mutate(&mut b, &mem, side, &peer_ev, true);
            continue;
        }
        let page_before = mem.ctrl.snapshot();
        let ring_before = external_rd.map(|id| ring_snapshot(&mem, id));
        our_op(&mut b, &mut ep, &mut report);
        let page_after = mem.ctrl.snapshot();
        for (i, (x, y)) in page_before.iter().zip(&page_after).enumerate() {
            if x != y && !allowed.iter().any(|r| r.contains(&i)) {
                panic!(
                    "our {side:?} endpoint (orders {lo}/{ro}) wrote control page byte {i} \
                     ({x:#04x} -> {y:#04x}), which is not ours to write"
                );
            }
        }
        if let (Some(id), Some(before)) = (external_rd, ring_before) {
            assert!(
                before == ring_snapshot(&mem, id),
                "our {side:?} endpoint wrote into the ring it only reads"
            );
        }
    }
    report.count(ep.close(), |_| 0);
    drop(ep);
    report
}

fn ring_snapshot(mem: &VchanMemory, id: RingId) -> Vec<u8> {
    match id {
        RingId::Left => mem.left.as_ref().unwrap().snapshot(),
        RingId::Right => mem.right.as_ref().unwrap().snapshot(),
    }
}

/// Concurrent hostile run: a peer thread mutates the header and grant list
/// (decoded from `data`) while our thread performs operations (decoded from
/// a second stream). The peer finally marks itself closed and notifies.
/// Panics if our side misbehaves; returns our outcome counts.
pub fn run_threaded(seed: u64) -> Report {
    let setup = seed_bytes(seed, 8);
    let mut b = Bytes::new(&setup);
    let pairs = all_valid_order_pairs();
    let (lo, ro) = pairs[usize::from(b.u8()) % pairs.len()];
    let layout = Layout::new(lo, ro).expect("valid pair");
    let side = if b.u8() & 1 == 0 {
        Side::Server
    } else {
        Side::Client
    };
    let mem = Arc::new(VchanMemory::new(layout, b.u32(), true));
    let (server_ev, client_ev) = TestEvents::pair();
    let (ours_ev, peer_ev) = match side {
        Side::Server => (server_ev, client_ev),
        Side::Client => (client_ev, server_ev),
    };
    let done = Arc::new(AtomicBool::new(false));
    // Attach before the peer starts scribbling (a real client reads the
    // orders once and maps what they say; here the mappings are fixed).
    let ep = mem.endpoint(side, ours_ev);

    let peer = {
        let mem = Arc::clone(&mem);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let script = seed_bytes(seed ^ 0x5EED_0FBA_DBEE, 4096);
            let mut b = Bytes::new(&script);
            for _ in 0..300 {
                mutate(&mut b, &mem, side, &peer_ev, false);
                for _ in 0..(b.u8() % 64) {
                    std::hint::spin_loop();
                }
                match b.u8() % 16 {
                    0 => std::thread::yield_now(),
                    1 => std::thread::sleep(Duration::from_micros(100)),
                    _ => {}
                }
            }
            // Finally the peer closes: our side must end every operation.
            mem.header().store_u8(side.peer_live(), LIVE_EXITED);
            let _ = peer_ev.notify();
            done.store(true, Ordering::SeqCst);
        })
    };

    let ours = {
        let mem = Arc::clone(&mem);
        std::thread::spawn(move || {
            // Locals drop in reverse order, also when unwinding: the
            // endpoint goes before the memory it points into.
            let _mem = mem;
            let mut ep = ep;
            let mut report = Report::default();
            ep.set_timeout(Some(OP_TIMEOUT));
            ep.set_poll_interval(POLL);
            let script = seed_bytes(seed ^ 0x0DD0_FF00, 1 << 16);
            let mut b = Bytes::new(&script);
            let mut after_done = 0;
            while after_done <= 16 && !ep.is_closed() {
                our_op(&mut b, &mut ep, &mut report);
                if done.load(Ordering::SeqCst) {
                    after_done += 1;
                }
            }
            // The peer has closed for good: a write must fail (with
            // `Closed` if the script closed our end first).
            let mut last = Report::default();
            last.count(ep.write(b"x"), |&n| n);
            assert_eq!(
                last.peer_closed + last.closed,
                1,
                "write to a closed peer must fail: {last:?}"
            );
            report.add(&last);
            report
        })
    };
    peer.join().expect("peer thread");
    let report = ours.join().expect("our side must never panic");
    drop(mem);
    report
}
