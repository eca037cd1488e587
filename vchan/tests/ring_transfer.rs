//! Data transfer over every order pair a client accepts (both in 10..=20,
//! at most one order-10 and one order-11 ring), stream and packet calls,
//! random chunk sizes and interleavings, random starting indices (so the
//! free-running counters wrap and the data wraps at the ring end), verified
//! byte for byte and by checksum.
//!
//! Notification loss shows up as a hang: the endpoints' poll interval is set
//! to a minute, so only events wake them, and a watchdog fails the test.

mod ring_support;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ring_support::{
    TestEvents, VchanMemory, all_valid_order_pairs, fill_stream, stream_byte, with_watchdog,
};
use vchan::control::{Layout, RingId, Side, server_layout};
use vchan::endpoint::Endpoint;
use vchan::ring::RingError;

/// Only events may wake a blocked endpoint during these tests.
const NO_POLL: Duration = Duration::from_secs(60);
const WATCHDOG: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `read`/`write`.
    Stream,
    /// `send`/`recv` (all or nothing).
    Packet,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    layout: Layout,
    start: u32,
    seed: u64,
    mode: Mode,
    /// Bytes the server sends (right ring) and the client sends (left ring).
    s2c: usize,
    c2s: usize,
}

/// A chunk size: tiny, awkward (powers of two ± 1), or large, at most `max`.
fn chunk(rng: &mut StdRng, max: usize) -> usize {
    let n = match rng.gen_range(0..8) {
        0 | 1 => rng.gen_range(1..=16),
        2 => {
            let p = [1024usize, 2048, 4096][rng.gen_range(0..3)];
            p + rng.gen_range(0..3) - 1
        }
        3 => rng.gen_range(1..=256),
        _ => rng.gen_range(1..=max.max(1)),
    };
    n.clamp(1, max.max(1))
}

/// FNV-1a, the transfer checksum.
fn fnv(acc: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(acc, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// Largest chunk per side. Packets: writer and reader chunks must satisfy
/// `m + n ≤ size + 1`, or both can wait forever (the writer for `m` free
/// bytes, the reader for `n` ready bytes) — a property of all-or-nothing
/// calls, not a bug.
fn limits(mode: Mode, size: usize) -> (usize, usize) {
    match mode {
        Mode::Stream => ((3 * size).min(1 << 18), (2 * size).min(1 << 18)),
        Mode::Packet => (size / 2 + 1, size / 2),
    }
}

/// One side's job in a bidirectional, non-blocking pump.
struct Job {
    ep: Endpoint<TestEvents>,
    rng: StdRng,
    mode: Mode,
    out_seed: u64,
    out_total: usize,
    in_seed: u64,
    in_total: usize,
}

/// Pumps both directions with non-blocking calls; sleeps in `wait()` only
/// when neither direction can progress (both notifications requested).
/// Returns `(sent checksum, received checksum)`.
fn pump(mut j: Job) -> (u64, u64) {
    let (max_w, _) = limits(j.mode, j.ep.write_ring_size());
    let (_, max_r) = limits(j.mode, j.ep.read_ring_size());
    j.ep.set_blocking(false);
    j.ep.set_poll_interval(NO_POLL);
    let (mut sent, mut got) = (0usize, 0usize);
    let (mut sum_out, mut sum_in) = (FNV0, FNV0);
    let mut out = Vec::new();
    let mut inb = vec![0u8; max_r];
    // The chunk we are trying to send / receive (kept until it succeeds:
    // a packet must be retried with the same size).
    let mut want_out = 0usize;
    let mut want_in = 0usize;
    while sent < j.out_total || got < j.in_total {
        let mut progress = false;
        if sent < j.out_total {
            if want_out == 0 {
                want_out = chunk(&mut j.rng, max_w).min(j.out_total - sent);
            }
            out.resize(want_out, 0);
            fill_stream(j.out_seed, sent as u64, &mut out);
            let r = match j.mode {
                Mode::Stream => j.ep.write(&out),
                Mode::Packet => j.ep.send(&out),
            };
            match r {
                Ok(n) => {
                    assert!(n > 0 && n <= want_out);
                    assert!(j.mode == Mode::Stream || n == want_out);
                    sum_out = fnv(sum_out, &out[..n]);
                    sent += n;
                    want_out = 0;
                    progress = true;
                }
                Err(RingError::WouldBlock) => {}
                Err(e) => panic!("send side: {e:?}"),
            }
        }
        if got < j.in_total {
            if want_in == 0 {
                want_in = chunk(&mut j.rng, max_r).min(j.in_total - got);
            }
            let buf = &mut inb[..want_in];
            let r = match j.mode {
                Mode::Stream => j.ep.read(buf),
                Mode::Packet => j.ep.recv(buf),
            };
            match r {
                Ok(0) => panic!("unexpected EOF after {got} of {} bytes", j.in_total),
                Ok(n) => {
                    assert!(j.mode == Mode::Stream || n == want_in);
                    for (k, &b) in buf[..n].iter().enumerate() {
                        let pos = (got + k) as u64;
                        assert_eq!(b, stream_byte(j.in_seed, pos), "byte {pos} differs");
                    }
                    sum_in = fnv(sum_in, &buf[..n]);
                    got += n;
                    want_in = 0;
                    progress = true;
                }
                Err(RingError::WouldBlock) => {}
                Err(e) => panic!("receive side: {e:?}"),
            }
        }
        if !progress {
            j.ep.wait().expect("wait");
        }
    }
    j.ep.close().unwrap();
    (sum_out, sum_in)
}

fn expected_sum(seed: u64, total: usize) -> u64 {
    let mut buf = vec![0u8; total];
    fill_stream(seed, 0, &mut buf);
    fnv(FNV0, &buf)
}

/// Both directions at once, non-blocking calls with `wait()`.
fn run_pump(p: Plan) {
    let mem = Arc::new(VchanMemory::new(p.layout, p.start, true));
    let (se, ce) = TestEvents::pair();
    let s = mem.endpoint(Side::Server, se);
    let c = mem.endpoint(Side::Client, ce);
    let (s_seed, c_seed) = (p.seed ^ 0x5555, p.seed ^ 0xCCCC);
    let server = Job {
        ep: s,
        rng: StdRng::seed_from_u64(p.seed),
        mode: p.mode,
        out_seed: s_seed,
        out_total: p.s2c,
        in_seed: c_seed,
        in_total: p.c2s,
    };
    let client = Job {
        ep: c,
        rng: StdRng::seed_from_u64(!p.seed),
        mode: p.mode,
        out_seed: c_seed,
        out_total: p.c2s,
        in_seed: s_seed,
        in_total: p.s2c,
    };
    let m = Arc::clone(&mem);
    let (s_out, s_in, c_out, c_in) = with_watchdog("pump", WATCHDOG, move || {
        let t = thread::spawn(move || pump(client));
        let (s_out, s_in) = pump(server);
        let (c_out, c_in) = t.join().expect("client side");
        drop(m);
        (s_out, s_in, c_out, c_in)
    });
    assert_eq!(s_out, c_in, "server→client checksum ({p:?})");
    assert_eq!(c_out, s_in, "client→server checksum ({p:?})");
    assert_eq!(s_out, expected_sum(s_seed, p.s2c));
    assert_eq!(c_out, expected_sum(c_seed, p.c2s));
}

/// One direction with blocking calls on both ends.
fn run_blocking(p: Plan, dir: Side) {
    let mem = Arc::new(VchanMemory::new(p.layout, p.start, true));
    let (se, ce) = TestEvents::pair();
    let s = mem.endpoint(Side::Server, se);
    let c = mem.endpoint(Side::Client, ce);
    let (mut tx, mut rx, total) = match dir {
        Side::Server => (s, c, p.s2c),
        Side::Client => (c, s, p.c2s),
    };
    tx.set_poll_interval(NO_POLL);
    rx.set_poll_interval(NO_POLL);
    let (max_w, max_r) = {
        let size = tx.write_ring_size();
        (limits(p.mode, size).0, limits(p.mode, size).1)
    };
    let seed = p.seed;
    let mode = p.mode;
    let m = Arc::clone(&mem);
    with_watchdog("blocking transfer", WATCHDOG, move || {
        let writer = thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut sent = 0;
            let mut buf = Vec::new();
            while sent < total {
                let n = chunk(&mut rng, max_w).min(total - sent);
                buf.resize(n, 0);
                fill_stream(seed, sent as u64, &mut buf);
                let r = match mode {
                    Mode::Stream => tx.write(&buf).unwrap(),
                    Mode::Packet => tx.send(&buf).unwrap(),
                };
                assert_eq!(r, n, "blocking calls transfer everything");
                sent += n;
            }
            tx.close().unwrap();
        });
        let mut rng = StdRng::seed_from_u64(!seed);
        let mut got = 0;
        let mut buf = vec![0u8; max_r];
        while got < total {
            let want = chunk(&mut rng, max_r).min(total - got);
            let r = match mode {
                Mode::Stream => rx.read(&mut buf[..want]).unwrap(),
                Mode::Packet => rx.recv(&mut buf[..want]).unwrap(),
            };
            assert!(r > 0, "EOF after {got} of {total}");
            for (k, &b) in buf[..r].iter().enumerate() {
                assert_eq!(b, stream_byte(seed, (got + k) as u64));
            }
            got += r;
        }
        assert_eq!(rx.read(&mut buf).unwrap(), 0, "EOF after the writer closed");
        writer.join().expect("writer");
        drop(m);
    });
}

/// A start index: random, or placed so that the data wraps at the ring end
/// within the first `size` bytes.
fn start_index(rng: &mut StdRng, size: usize) -> u32 {
    let x: u32 = rng.r#gen();
    if rng.gen_bool(0.5) {
        let mask = size as u32 - 1;
        (x & !mask) | (size as u32 - rng.gen_range(1..=size.min(4096) as u32))
    } else {
        x
    }
}

fn plan_for(layout: Layout, seed: u64, mode: Mode) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let l = layout.ring_size(RingId::Left);
    let r = layout.ring_size(RingId::Right);
    Plan {
        layout,
        start: start_index(&mut rng, l.min(r)),
        seed,
        mode,
        s2c: r / 2 + rng.gen_range(1..=3 * 4096),
        c2s: l / 2 + rng.gen_range(1..=3 * 4096),
    }
}

/// Every valid order pair, stream and packet, both directions at once.
#[test]
fn every_order_pair_stream_and_packet_pump() {
    for (i, (lo, ro)) in all_valid_order_pairs().into_iter().enumerate() {
        let layout = Layout::new(lo, ro).unwrap();
        for mode in [Mode::Stream, Mode::Packet] {
            run_pump(plan_for(layout, 1000 + i as u64, mode));
        }
    }
}

/// Every valid order pair with blocking calls, alternating direction.
#[test]
fn every_order_pair_blocking() {
    for (i, (lo, ro)) in all_valid_order_pairs().into_iter().enumerate() {
        let layout = Layout::new(lo, ro).unwrap();
        let mode = if i % 2 == 0 {
            Mode::Stream
        } else {
            Mode::Packet
        };
        let dir = if i % 4 < 2 {
            Side::Server
        } else {
            Side::Client
        };
        run_blocking(plan_for(layout, 5000 + i as u64, mode), dir);
    }
}

/// The sizes ocaml-vchan's tests use (1024, 2048, 4096, swapped, minus one),
/// through the server's order selection.
#[test]
fn awkward_sizes_through_server_order_selection() {
    let base = [(1024, 1024), (1024, 2048), (2048, 2048), (4096, 4096)];
    let mut sizes = Vec::new();
    for (a, b) in base {
        sizes.extend([
            (a, b),
            (b, a),
            (a - 1, b),
            (a, b - 1),
            (a - 1, b - 1),
            (a + 1, b + 1),
        ]);
    }
    for (k, (read_min, write_min)) in sizes.into_iter().enumerate() {
        let layout = server_layout(read_min, write_min).unwrap();
        assert!(layout.ring_size(RingId::Left) >= read_min);
        assert!(layout.ring_size(RingId::Right) >= write_min);
        for mode in [Mode::Stream, Mode::Packet] {
            let mut p = plan_for(layout, 9000 + k as u64, mode);
            p.s2c = 3 * write_min + 1;
            p.c2s = 3 * read_min + 1;
            run_pump(p);
        }
    }
}

fn arb_plan() -> impl Strategy<Value = Plan> {
    let pairs = all_valid_order_pairs();
    (
        0..pairs.len(),
        any::<u64>(),
        prop_oneof![Just(Mode::Stream), Just(Mode::Packet)],
        0usize..3,
        0usize..3,
    )
        .prop_map(move |(i, seed, mode, fs, fc)| {
            let (lo, ro) = pairs[i];
            let layout = Layout::new(lo, ro).unwrap();
            let mut p = plan_for(layout, seed, mode);
            // 0: nothing that way, 1: about half a ring, 2: up to ~2 rings.
            let scale = |f: usize, size: usize, base: usize| match f {
                0 => 0,
                1 => base,
                _ => base + size.min(1 << 18),
            };
            p.s2c = scale(fs, layout.ring_size(RingId::Right), p.s2c);
            p.c2s = scale(fc, layout.ring_size(RingId::Left), p.c2s);
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// Random pair, mode, sizes, seeds and start index; both directions.
    #[test]
    fn random_transfers_pump(p in arb_plan()) {
        run_pump(p);
    }

    /// Random pair, mode, sizes; blocking calls, one direction.
    #[test]
    fn random_transfers_blocking(p in arb_plan(), server_sends in any::<bool>()) {
        let dir = if server_sends { Side::Server } else { Side::Client };
        run_blocking(p, dir);
    }
}
