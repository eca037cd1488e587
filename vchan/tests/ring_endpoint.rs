//! Endpoint semantics (docs/vchan.md §5.6, §10.2, §13) over guard-paged shared
//! memory, with a server and a client endpoint on the same pages.

mod ring_support;

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ring_support::{TestEvents, VchanMemory, with_watchdog};
use vchan::control::{
    CLI_LIVE, CLI_NOTIFY, LEFT_ORDER, LIVE_EXITED, LIVE_WAITING, Layout, NOTIFY_READ, NOTIFY_WRITE,
    PAGE_SIZE, RingId, SRV_LIVE, SRV_NOTIFY, SharedHeader, Side, server_layout,
};
use vchan::endpoint::{Endpoint, FdError, PeerState};
use vchan::mem::RegionError;
use vchan::ring::{Corruption, RingError};

const LIMIT: Duration = Duration::from_secs(20);

/// Server and client endpoints over fresh memory for `layout`.
fn pair(
    layout: Layout,
    start: u32,
) -> (Arc<VchanMemory>, Endpoint<TestEvents>, Endpoint<TestEvents>) {
    let mem = Arc::new(VchanMemory::new(layout, start, true));
    let (se, ce) = TestEvents::pair();
    let s = mem.endpoint(Side::Server, se);
    let c = mem.endpoint(Side::Client, ce);
    (mem, s, c)
}

fn small() -> Layout {
    server_layout(0, 0).unwrap() // 10/11, both in the page
}

#[test]
fn stream_roundtrip_both_directions() {
    for layout in [
        small(),
        server_layout(4096, 4096).unwrap(),
        Layout::new(11, 13).unwrap(),
    ] {
        let (_mem, mut s, mut c) = pair(layout, 0);
        assert_eq!(c.write(b"ping").unwrap(), 4);
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"ping");
        assert_eq!(s.write(b"pong!").unwrap(), 5);
        assert_eq!(c.read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"pong!");
        assert_eq!(s.read_ring_size(), layout.ring_size(RingId::Left));
        assert_eq!(c.read_ring_size(), layout.ring_size(RingId::Right));
    }
}

/// Data written before a close is still delivered; EOF (`Ok(0)`) only once
/// the ring is empty and the peer closed.
#[test]
fn read_drains_after_peer_close_then_eof() {
    let (mem, mut s, mut c) = pair(small(), 7);
    c.write(b"last words").unwrap();
    c.close().unwrap();
    assert_eq!(mem.header().load_u8(CLI_LIVE), LIVE_EXITED);
    assert_eq!(s.peer_state(), PeerState::Closed);
    s.set_blocking(false);
    let mut buf = [0u8; 4];
    assert_eq!(s.read(&mut buf).unwrap(), 4);
    assert_eq!(s.data_ready().unwrap(), 6);
    let mut rest = [0u8; 32];
    assert_eq!(s.read(&mut rest).unwrap(), 6);
    assert_eq!(&rest[..6], b" words");
    assert_eq!(s.read(&mut rest).unwrap(), 0, "EOF, non-blocking");
    s.set_blocking(true);
    assert_eq!(s.read(&mut rest).unwrap(), 0, "EOF, blocking");
    // Our own closed endpoint refuses further I/O.
    assert!(matches!(c.read(&mut rest), Err(RingError::Closed)));
    assert!(matches!(c.write(b"x"), Err(RingError::Closed)));
    assert_eq!(
        io::Error::from(c.write(b"x").unwrap_err()).kind(),
        io::ErrorKind::NotConnected
    );
    c.close().unwrap(); // idempotent
}

#[test]
fn nonblocking_empty_read_would_block() {
    let (_mem, mut s, _c) = pair(small(), 0);
    s.set_blocking(false);
    let e = s.read(&mut [0u8; 8]).unwrap_err();
    assert!(matches!(e, RingError::WouldBlock));
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::WouldBlock);
    assert_eq!(s.read(&mut []).unwrap(), 0, "empty buffer");
}

#[test]
fn write_to_closed_peer_is_broken_pipe() {
    let (_mem, mut s, mut c) = pair(small(), 0);
    s.close().unwrap();
    for blocking in [true, false] {
        c.set_blocking(blocking);
        let e = c.write(b"data").unwrap_err();
        assert!(matches!(e, RingError::PeerClosed), "{e:?}");
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::BrokenPipe);
        assert!(matches!(c.send(b"data"), Err(RingError::PeerClosed)));
    }
    // Nothing reached the ring.
    assert_eq!(c.buffer_space().unwrap(), 1024);
}

/// docs/vchan.md §9.2: the server may write before the client connects
/// (`cli_live == 2` counts as open); the data waits in the ring.
#[test]
fn server_writes_while_client_is_waiting() {
    let mem = Arc::new(VchanMemory::new(small(), 0, false));
    let (se, ce) = TestEvents::pair();
    let mut s = mem.endpoint(Side::Server, se);
    assert_eq!(mem.header().load_u8(CLI_LIVE), LIVE_WAITING);
    assert_eq!(s.peer_state(), PeerState::Waiting);
    assert_eq!(s.write(b"early").unwrap(), 5);
    vchan::control::announce_client_connected(&mem.header());
    let mut c = mem.endpoint(Side::Client, ce);
    assert_eq!(s.peer_state(), PeerState::Connected);
    assert_eq!(c.peer_state(), PeerState::Connected);
    let mut buf = [0u8; 8];
    assert_eq!(c.read(&mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"early");
}

/// A client sees anything but `srv_live == 1` as closed; a server anything
/// but 1 and 2 (docs/vchan.md §10.2 recommendation).
#[test]
fn garbage_live_bytes_mean_closed() {
    let (mem, mut s, mut c) = pair(small(), 0);
    let h = mem.header();
    h.store_u8(SRV_LIVE, 2);
    assert_eq!(c.peer_state(), PeerState::Closed);
    assert!(matches!(c.write(b"x"), Err(RingError::PeerClosed)));
    h.store_u8(CLI_LIVE, 0x80);
    assert_eq!(s.peer_state(), PeerState::Closed);
    assert!(matches!(s.write(b"x"), Err(RingError::PeerClosed)));
}

#[test]
fn blocking_write_waits_for_the_reader() {
    with_watchdog("blocking write", LIMIT, || {
        let (mem, mut s, mut c) = pair(small(), u32::MAX - 100);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let expect = data.clone();
        let writer = thread::spawn(move || {
            let n = s.write(&data).unwrap(); // 5× the 2048-byte ring
            (n, s)
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 333];
        while got.len() < expect.len() {
            let n = c.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        let (n, _s) = writer.join().unwrap();
        assert_eq!(n, expect.len());
        assert_eq!(got, expect);
        drop(mem);
    });
}

/// A blocked writer that has written nothing fails with `PeerClosed` when
/// the peer closes; one that has written part returns the count, and the
/// next call fails.
#[test]
fn blocked_write_ends_when_peer_closes() {
    with_watchdog("write vs close", LIMIT, || {
        let (_mem, mut s, mut c) = pair(small(), 0);
        s.set_blocking(false);
        assert_eq!(s.write(&[1; 4096]).unwrap(), 2048); // full
        s.set_blocking(true);
        let closer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            c.close().unwrap();
            c
        });
        assert!(matches!(s.write(&[2; 10]), Err(RingError::PeerClosed)));
        let _c = closer.join().unwrap();

        let (mem, mut s, mut c) = pair(small(), 0);
        let m = Arc::clone(&mem); // `s` points into `mem`: keep it here too
        let closer = thread::spawn(move || {
            // Close only once the writer has filled the ring (and so is
            // about to block or blocked): deterministic under any load.
            while m.header().load_u32(RingId::Right.prod_offset()) != 2048 {
                thread::sleep(Duration::from_millis(1));
            }
            c.close().unwrap();
            c
        });
        assert_eq!(s.write(&[3; 5000]).unwrap(), 2048, "partial count");
        assert!(matches!(s.write(&[3; 1]), Err(RingError::PeerClosed)));
        let _c = closer.join().unwrap();
    });
}

/// docs/vchan.md §13 row 17: a packet larger than the ring is an error, in both
/// modes, never a hang or a silent 0.
#[test]
fn packets_larger_than_the_ring_are_too_big() {
    let (_mem, mut s, mut c) = pair(small(), 0);
    for blocking in [true, false] {
        s.set_blocking(blocking);
        c.set_blocking(blocking);
        let e = s.send(&[0; 2049]).unwrap_err();
        assert!(
            matches!(
                e,
                RingError::TooBig {
                    len: 2049,
                    ring: 2048
                }
            ),
            "{e:?}"
        );
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidInput);
        assert!(matches!(
            c.send(&[0; 1025]),
            Err(RingError::TooBig {
                len: 1025,
                ring: 1024
            })
        ));
        assert!(matches!(
            s.recv(&mut [0; 1025]),
            Err(RingError::TooBig {
                len: 1025,
                ring: 1024
            })
        ));
        assert!(matches!(
            c.recv(&mut [0; 2049]),
            Err(RingError::TooBig { .. })
        ));
    }
    // Exactly the ring size is fine.
    assert_eq!(s.send(&[9; 2048]).unwrap(), 2048);
    assert_eq!(c.recv(&mut [0; 2048]).unwrap(), 2048);
}

#[test]
fn nonblocking_send_is_all_or_nothing() {
    let (mem, mut s, mut c) = pair(small(), 0);
    s.set_blocking(false);
    assert_eq!(s.send(&[1; 2000]).unwrap(), 2000);
    let prod = mem.header().load_u32(RingId::Right.prod_offset());
    assert!(matches!(s.send(&[2; 49]), Err(RingError::WouldBlock)));
    assert_eq!(
        mem.header().load_u32(RingId::Right.prod_offset()),
        prod,
        "nothing written"
    );
    assert_eq!(s.send(&[2; 48]).unwrap(), 48);
    let mut buf = vec![0; 2048];
    c.set_blocking(false);
    assert!(matches!(
        c.recv(&mut [0; 2049]),
        Err(RingError::TooBig { .. })
    ));
    assert_eq!(c.recv(&mut buf).unwrap(), 2048);
    assert!(matches!(c.recv(&mut [0; 1]), Err(RingError::WouldBlock)));
}

/// docs/vchan.md §13 row 16: `recv` with the peer closed and too few bytes left is
/// an error; the bytes stay readable with `read`.
#[test]
fn recv_after_close_with_partial_packet() {
    let (_mem, mut s, mut c) = pair(small(), 0);
    c.write(b"abc").unwrap();
    c.close().unwrap();
    let mut four = [0u8; 4];
    for blocking in [true, false] {
        s.set_blocking(blocking);
        assert!(matches!(s.recv(&mut four), Err(RingError::PeerClosed)));
    }
    let mut three = [0u8; 3];
    assert_eq!(s.recv(&mut three).unwrap(), 3);
    assert_eq!(&three, b"abc");
}

#[test]
fn blocking_recv_waits_for_the_whole_packet() {
    with_watchdog("recv", LIMIT, || {
        let (_mem, mut s, mut c) = pair(Layout::new(12, 11).unwrap(), 0xFFFF_FF00);
        let writer = thread::spawn(move || {
            for chunk in [1usize, 10, 100, 889] {
                thread::sleep(Duration::from_millis(2));
                c.write(&vec![chunk as u8; chunk]).unwrap();
            }
            c
        });
        let mut pkt = vec![0u8; 1000];
        assert_eq!(s.recv(&mut pkt).unwrap(), 1000);
        assert_eq!(pkt[0], 1);
        assert_eq!(pkt[999], 889u32 as u8);
        let _c = writer.join().unwrap();
    });
}

/// `data_ready` / `buffer_space` request notifications (libxenvchan does,
/// because the caller is likely to sleep next).
#[test]
fn data_ready_and_buffer_space_request_notifications() {
    let (mem, mut s, mut c) = pair(small(), 0);
    let h = mem.header();
    h.store_u8(CLI_NOTIFY, 0);
    h.store_u8(SRV_NOTIFY, 0);
    assert_eq!(s.data_ready().unwrap(), 0);
    assert_eq!(
        h.load_u8(CLI_NOTIFY),
        NOTIFY_WRITE,
        "server asks the client"
    );
    assert_eq!(s.buffer_space().unwrap(), 2048);
    assert_eq!(h.load_u8(CLI_NOTIFY), NOTIFY_WRITE | NOTIFY_READ);
    assert_eq!(c.data_ready().unwrap(), 0);
    assert_eq!(
        h.load_u8(SRV_NOTIFY),
        NOTIFY_WRITE,
        "client asks the server"
    );
    assert_eq!(c.buffer_space().unwrap(), 1024);
    assert_eq!(h.load_u8(SRV_NOTIFY), NOTIFY_WRITE | NOTIFY_READ);
}

/// Events are sent only when the peer asked (one-shot bits).
#[test]
fn events_only_when_requested() {
    let mem = Arc::new(VchanMemory::new(small(), 0, true));
    let (se, ce) = TestEvents::pair();
    let (se2, ce2) = (se.clone(), ce.clone());
    let mut s = mem.endpoint(Side::Server, se);
    let mut c = mem.endpoint(Side::Client, ce);
    // A libxenvchan server starts with cli_notify = WRITE: the client's
    // first write notifies, the second does not.
    c.write(b"1").unwrap();
    assert_eq!(ce2.sent(), 1);
    c.write(b"2").unwrap();
    assert_eq!(ce2.sent(), 1);
    assert!(se2.take_pending());
    // The server reads; nobody asked for READ: no event.
    s.read(&mut [0; 8]).unwrap();
    assert_eq!(se2.sent(), 0);
    // The server finds the ring empty (requests WRITE), so the next client
    // write notifies again.
    s.set_blocking(false);
    assert!(matches!(s.read(&mut [0; 8]), Err(RingError::WouldBlock)));
    c.write(b"3").unwrap();
    assert_eq!(ce2.sent(), 2);
}

/// A blocking call that cannot spin and returns less than it wanted asks
/// for the notification at once, as libxenvchan does; one that can spin
/// asks only before it sleeps. (Reads here; writes take the same path of
/// `wait_for`, which the lab's throughput phase runs both ways.)
#[test]
fn short_blocking_calls_request_early_only_without_spin() {
    for spin in [Duration::ZERO, Duration::from_micros(50)] {
        let early = spin.is_zero();
        let mem = Arc::new(VchanMemory::new(small(), 0, true));
        let (se, ce) = TestEvents::pair();
        let ce2 = ce.clone();
        let mut s = mem.endpoint(Side::Server, se);
        let mut c = mem.endpoint(Side::Client, ce);
        s.set_spin(spin);
        c.set_spin(spin);
        let h = mem.header();
        c.write(b"12").unwrap();
        h.store_u8(CLI_NOTIFY, 0);
        h.store_u8(SRV_NOTIFY, 0);
        // The server's ring (left, 1 KiB) has 2 bytes; it wants 8.
        assert_eq!(s.read(&mut [0; 8]).unwrap(), 2);
        assert_eq!(
            h.load_u8(CLI_NOTIFY) & NOTIFY_WRITE != 0,
            early,
            "spin {spin:?}"
        );
        // All it wanted: no request either way.
        c.write(b"34").unwrap();
        h.store_u8(CLI_NOTIFY, 0);
        assert_eq!(s.read(&mut [0; 2]).unwrap(), 2);
        assert_eq!(h.load_u8(CLI_NOTIFY), 0, "spin {spin:?}");
        // The early request is what makes the client's next write send
        // an event while the server has not slept yet.
        assert_eq!(s.read(&mut [0; 0]).unwrap(), 0);
        let before = ce2.sent();
        c.write(b"5").unwrap();
        assert_eq!(ce2.sent(), before, "nobody asked: no event");
        h.store_u8(CLI_NOTIFY, 0);
        assert_eq!(s.read(&mut [0; 8]).unwrap(), 1);
        c.write(b"6").unwrap();
        assert_eq!(ce2.sent() - before, usize::from(early), "spin {spin:?}");
    }
}

#[test]
fn close_stores_live_zero_and_notifies() {
    let (mem, mut s, c) = pair(small(), 0);
    let server_events = s.events().clone();
    let client_events = c.events().clone();
    s.close().unwrap();
    assert_eq!(mem.header().load_u8(SRV_LIVE), LIVE_EXITED);
    assert_eq!(server_events.sent(), 1);
    assert!(client_events.take_pending());
    assert_eq!(c.peer_state(), PeerState::Closed);
    assert!(!c.is_open());
    assert!(s.is_closed());
}

/// Qubes issue #10833: a corrupt index must not hang a blocked reader.
/// The peer corrupts `prod` without sending an event; the periodic
/// re-validation turns it into `Corrupt`.
#[test]
fn blocked_read_reports_corrupt_index_instead_of_hanging() {
    with_watchdog("corrupt index", LIMIT, || {
        let (mem, mut s, _c) = pair(small(), 0);
        s.set_poll_interval(Duration::from_millis(5));
        let m = Arc::clone(&mem);
        let vandal = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            m.header().store_u32(RingId::Left.prod_offset(), 5000);
        });
        let e = s.read(&mut [0; 8]).unwrap_err();
        assert!(
            matches!(
                e,
                RingError::Corrupt {
                    ring: RingId::Left,
                    what: Corruption::Indices {
                        prod: 5000,
                        cons: 0,
                        size: 1024
                    }
                }
            ),
            "{e:?}"
        );
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidData);
        vandal.join().unwrap();
    });
}

#[test]
fn order_change_is_detected_while_waiting() {
    with_watchdog("order change", LIMIT, || {
        let (mem, mut s, _c) = pair(small(), 0);
        s.set_poll_interval(Duration::from_millis(5));
        let m = Arc::clone(&mem);
        let vandal = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            m.header().store_u16(LEFT_ORDER, 20);
        });
        let e = s.read(&mut [0; 8]).unwrap_err();
        assert!(
            matches!(
                e,
                RingError::Corrupt {
                    ring: RingId::Left,
                    what: Corruption::OrderChanged {
                        expected: 10,
                        found: 20
                    }
                }
            ),
            "{e:?}"
        );
        vandal.join().unwrap();
        // We never re-read the order for the data path: the ring keeps its
        // private size, and `check` keeps reporting the change.
        assert!(s.check().is_err());
        assert_eq!(s.read_ring_size(), 1024);
    });
}

/// docs/vchan.md §10.2: a peer domain that dies sends no event. A blocked reader
/// notices the live byte at the next poll and reports EOF; a blocked
/// writer reports `PeerClosed`.
#[test]
fn peer_death_without_event_is_noticed_by_polling() {
    with_watchdog("silent death", LIMIT, || {
        let (mem, mut s, _c) = pair(small(), 0);
        s.set_poll_interval(Duration::from_millis(5));
        let m = Arc::clone(&mem);
        let reaper = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            m.header().store_u8(CLI_LIVE, LIVE_EXITED); // no event
        });
        assert_eq!(s.read(&mut [0; 8]).unwrap(), 0);
        reaper.join().unwrap();

        let (mem, mut s, _c) = pair(small(), 0);
        s.set_poll_interval(Duration::from_millis(5));
        s.set_blocking(false);
        s.write(&[0; 2048]).unwrap();
        s.set_blocking(true);
        let m = Arc::clone(&mem);
        let reaper = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            m.header().store_u8(CLI_LIVE, LIVE_EXITED);
        });
        assert!(matches!(s.write(&[0; 1]), Err(RingError::PeerClosed)));
        reaper.join().unwrap();
    });
}

#[test]
fn timeout_bounds_blocking_operations() {
    with_watchdog("timeouts", LIMIT, || {
        let (_mem, mut s, _c) = pair(small(), 0);
        s.set_timeout(Some(Duration::from_millis(30)));
        s.set_poll_interval(Duration::from_millis(10));
        let e = s.read(&mut [0; 8]).unwrap_err();
        assert!(matches!(e, RingError::TimedOut), "{e:?}");
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::TimedOut);
        assert!(matches!(s.recv(&mut [0; 8]), Err(RingError::TimedOut)));
        assert!(matches!(s.wait(), Err(RingError::TimedOut)));
        // A write that filled part of the ring returns the partial count.
        assert_eq!(s.write(&[0; 3000]).unwrap(), 2048);
        assert!(matches!(s.write(&[0; 1]), Err(RingError::TimedOut)));
        assert!(matches!(s.send(&[0; 1]), Err(RingError::TimedOut)));
    });
}

#[test]
fn wait_returns_on_event_and_on_silent_change() {
    with_watchdog("wait", LIMIT, || {
        let (mem, mut s, mut c) = pair(small(), 0);
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(10));
            c.write(b"x").unwrap(); // cli_notify starts with WRITE: event
            c
        });
        s.wait().unwrap();
        assert_eq!(s.data_ready().unwrap(), 1);
        let _c = t.join().unwrap();
        // A change without an event (a client too old to notify): noticed
        // at the next poll.
        s.set_poll_interval(Duration::from_millis(5));
        // The peer keeps producing silently until we are back, so the change
        // cannot fall before `wait` takes its snapshot, whatever the load.
        let m = Arc::clone(&mem);
        let back = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let back2 = Arc::clone(&back);
        let t = thread::spawn(move || {
            let h = m.header();
            while !back2.load(std::sync::atomic::Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(2));
                let prod = h.load_u32(RingId::Left.prod_offset());
                if prod < 1000 {
                    h.store_u32(RingId::Left.prod_offset(), prod + 1);
                }
            }
        });
        s.wait().unwrap();
        back.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(s.data_ready().unwrap() >= 2);
        t.join().unwrap();
    });
}

/// docs/vchan.md §12.2 / §13 row 13: a zeroed control page (stale grant) is refused
/// cleanly by the client.
#[test]
fn client_refuses_invalid_orders() {
    let mem = VchanMemory::new(small(), 0, true);
    for (l, r) in [(0u16, 0u16), (10, 10), (9, 12), (12, 21)] {
        mem.header().store_u16(LEFT_ORDER, l);
        mem.header().store_u16(vchan::control::RIGHT_ORDER, r);
        let (_se, ce) = TestEvents::pair();
        let e = mem.try_endpoint(Side::Client, ce).unwrap_err();
        assert!(matches!(e, RingError::Control(_)), "({l}, {r}): {e:?}");
    }
}

#[test]
fn constructor_checks_ring_addresses_against_the_layout() {
    let mem = VchanMemory::new(Layout::new(12, 11).unwrap(), 0, true);
    let left = mem.left.clone().unwrap();
    let (se, _ce) = TestEvents::pair();
    let r = Endpoint::new(
        mem.ctrl.clone(),
        Side::Server,
        &mem.layout,
        Some(left.clone()),
        Some(left.clone()),
        se.clone(),
    );
    assert!(matches!(
        r,
        Err(RingError::RingAddress {
            ring: RingId::Right,
            ..
        })
    ));
    let r = Endpoint::new(
        mem.ctrl.clone(),
        Side::Server,
        &mem.layout,
        None,
        None,
        se.clone(),
    );
    assert!(matches!(
        r,
        Err(RingError::RingAddress {
            ring: RingId::Left,
            ..
        })
    ));
    // A mapping too small for its ring is refused, not read past.
    let r = Endpoint::new(
        mem.ctrl.clone(),
        Side::Server,
        &Layout::new(13, 11).unwrap(),
        Some(left),
        None,
        se,
    );
    assert!(
        matches!(
            r,
            Err(RingError::Region(RegionError::OutOfBounds {
                offset: 0,
                len: 8192,
                size: 4096
            }))
        ),
        "{r:?}"
    );
}

/// The endpoint owns its memory: the mappings stay alive while it exists,
/// whoever else drops them, and go with it.
#[test]
fn endpoint_keeps_its_mappings_alive() {
    let mem = VchanMemory::new(Layout::new(12, 13).unwrap(), 0, true);
    let (se, ce) = TestEvents::pair();
    let mut srv = mem.endpoint(Side::Server, se);
    let mut cli = mem.endpoint(Side::Client, ce);
    let ctrl = Arc::downgrade(&mem.ctrl);
    let left = Arc::downgrade(mem.left.as_ref().unwrap());
    drop(mem);
    assert!(ctrl.upgrade().is_some() && left.upgrade().is_some());
    srv.write(b"still mapped").unwrap();
    let mut b = [0u8; 12];
    cli.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still mapped");
    drop(srv);
    assert!(ctrl.upgrade().is_some(), "the client still holds the page");
    drop(cli);
    assert!(ctrl.upgrade().is_none() && left.upgrade().is_none());
}

#[test]
fn io_traits_and_full_ring() {
    let (_mem, mut s, mut c) = pair(Layout::new(11, 12).unwrap(), 0);
    // Exactly full is readable (docs/vchan.md §13 row 2).
    Write::write_all(&mut s, &[0xAB; 4096]).unwrap();
    assert_eq!(s.buffer_space().unwrap(), 0);
    let mut buf = vec![0; 4096];
    Read::read_exact(&mut c, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xAB));
    s.flush().unwrap();
    s.close().unwrap();
    let mut rest = Vec::new();
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
    let e = Write::write(&mut c, b"x").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
}

/// The writer writes and closes at once, many times: the reader must get
/// every byte before EOF (the live byte is checked only when the ring looks
/// empty, and the ring is re-checked after seeing "closed").
#[test]
fn no_data_lost_when_peer_writes_then_closes() {
    with_watchdog("write then close", LIMIT, || {
        for round in 0..300u32 {
            let (_mem, mut s, mut c) = pair(small(), round.wrapping_mul(0x0101_0101));
            let n = 1 + (round as usize * 37) % 1024;
            let w = thread::spawn(move || {
                c.write(&vec![round as u8; n]).unwrap();
                c.close().unwrap();
                c
            });
            let mut total = 0;
            let mut buf = [0u8; 100];
            loop {
                let k = s.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                assert!(buf[..k].iter().all(|&b| b == round as u8));
                total += k;
            }
            assert_eq!(total, n, "round {round}");
            let _c = w.join().unwrap();
        }
    });
}

/// Guard pages really guard: the double's mappings are exactly the ring
/// and page sizes (an access one byte beyond would fault).
#[test]
fn memory_double_layout() {
    let mem = VchanMemory::new(Layout::new(13, 20).unwrap(), 0, true);
    assert_eq!(mem.ctrl.len(), PAGE_SIZE);
    assert_eq!(mem.left.as_ref().unwrap().len(), 8192);
    assert_eq!(mem.right.as_ref().unwrap().len(), 1 << 20);
    assert_eq!(
        vchan::control::read_grants(&mem.header(), &mem.layout),
        (
            (0..2).map(|i| 0x100 + i).collect(),
            (0..256).map(|i| 0x800 + i).collect()
        )
    );
}

/// The indices of a `Corrupt` error (`None`: another error).
fn corrupt_indices(e: &RingError) -> Option<(RingId, u32, u32)> {
    match e {
        RingError::Corrupt {
            ring,
            what: Corruption::Indices { prod, cons, .. },
        } => Some((*ring, *prod, *cons)),
        _ => None,
    }
}

/// The ring error of an fd call (an fd error fails the test).
fn ring_err(e: FdError) -> RingError {
    match e {
        FdError::Ring(e) => e,
        FdError::Fd(e) => panic!("fd error: {e}"),
    }
}

type WriterOp = fn(&mut Endpoint<TestEvents>, BorrowedFd<'_>) -> Result<usize, RingError>;

/// A writer's first look in every call is a load of the peer's `cons`,
/// not the space it saw last time: a peer that corrupts `cons` between two
/// calls fails the next one, even a write that fits the space we saw
/// before (it would otherwise go into a ring the peer has broken). Every
/// way in: blocking and non-blocking `write`, `send`, `read_from_fd`,
/// `send_framed_from_fd`.
#[test]
fn writes_after_the_peer_corrupts_cons_fail_even_when_they_fit() {
    let (r, mut w) = io::pipe().unwrap();
    w.write_all(&[7; 64]).unwrap();
    let ops: [(&str, WriterOp); 5] = [
        ("write", |s, _| s.write(&[1; 10])),
        ("nonblocking write", |s, _| {
            s.set_blocking(false);
            s.write(&[1; 10])
        }),
        ("send", |s, _| s.send(&[1; 10])),
        ("read_from_fd", |s, fd| {
            s.read_from_fd(fd, 10).map_err(ring_err)
        }),
        ("send_framed_from_fd", |s, fd| {
            s.send_framed_from_fd(fd, 10, |n| [n as u8; 4])
                .map_err(ring_err)
        }),
    ];
    for (name, op) in ops {
        let (mem, mut s, _c) = pair(small(), 0);
        // The server writes the right ring (2048 bytes): 100 bytes in, so
        // the space it saw (and cached) is 1948.
        assert_eq!(s.write(&[0; 100]).unwrap(), 100, "{name}");
        // The peer's cons jumps far beyond our prod.
        mem.header()
            .store_u32(RingId::Right.cons_offset(), 0x8000_0000);
        let e = op(&mut s, r.as_fd()).expect_err(name);
        assert_eq!(
            corrupt_indices(&e),
            Some((RingId::Right, 100, 0x8000_0000)),
            "{name}: {e:?}"
        );
        // Nothing moved: our prod is where it was.
        assert_eq!(
            mem.header().load_u32(RingId::Right.prod_offset()),
            100,
            "{name}"
        );
    }
}

/// The same for readers: the first look of `read`, `recv` and
/// `write_to_fd` loads the peer's `prod`, so a corruption since the last
/// call is reported before more of the bytes seen earlier are handed out.
#[test]
fn reads_after_the_peer_corrupts_prod_fail_even_when_data_was_seen() {
    let (_r, w) = io::pipe().unwrap();
    let ops: [(&str, WriterOp); 4] = [
        ("read", |s, _| s.read(&mut [0; 8])),
        ("nonblocking read", |s, _| {
            s.set_blocking(false);
            s.read(&mut [0; 8])
        }),
        ("recv", |s, _| s.recv(&mut [0; 8])),
        ("write_to_fd", |s, fd| {
            s.write_to_fd(fd, 8).map_err(ring_err)
        }),
    ];
    for (name, op) in ops {
        let (mem, mut s, mut c) = pair(small(), 0);
        // The client writes 100 bytes into the left ring; we read 10, so
        // 90 are seen (and cached).
        assert_eq!(c.write(&[5; 100]).unwrap(), 100);
        assert_eq!(s.read(&mut [0; 10]).unwrap(), 10);
        mem.header().store_u32(RingId::Left.prod_offset(), 5000);
        let e = op(&mut s, w.as_fd()).expect_err(name);
        assert_eq!(
            corrupt_indices(&e),
            Some((RingId::Left, 5000, 10)),
            "{name}: {e:?}"
        );
        assert_eq!(
            mem.header().load_u32(RingId::Left.cons_offset()),
            10,
            "{name}"
        );
    }
}
