//! In-process tests of the double: the hub with a recording stand-in for the
//! event-channel hub, so that the order "byte cleared, then event" can be
//! checked exactly, and hostile input on the hub's socket. Cross-process
//! behaviour is tested in `tests/local.rs`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, socket};

use super::hub::{Events, HeldEvent};
use super::proto::{
    self, MAX_PACKET, OP_FDS, OP_MAP, OP_NOTIFY, OP_RELEASE, Reader, Request, Writer,
};
use super::*;

/// One event the hub fired: from which (domain, port), and the value of the
/// probed byte at that moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fired {
    dom: DomId,
    port: u32,
    byte: Option<u8>,
}

/// A stand-in for the event-channel hub: every port is bound except 0;
/// `notify` records the event and reads the probed byte.
#[derive(Debug, Clone, Default)]
struct Recorder {
    fired: Arc<Mutex<Vec<Fired>>>,
    /// The address of a byte in some live mapping of this process.
    probe: Arc<Mutex<Option<usize>>>,
}

struct Held {
    rec: Recorder,
    dom: DomId,
    port: u32,
}

impl Events for Recorder {
    fn hold(&self, dom: DomId, port: u32) -> Result<Box<dyn HeldEvent>, String> {
        if port == 0 {
            return Err("not bound".to_owned());
        }
        Ok(Box::new(Held {
            rec: self.clone(),
            dom,
            port,
        }))
    }
}

impl HeldEvent for Held {
    fn notify(&self) {
        let byte = self.rec.probe.lock().unwrap().map(|addr| {
            // SAFETY: the tests set the probe to a byte of a mapping that stays mapped until after the event; a volatile read.
            unsafe { (addr as *const u8).read_volatile() }
        });
        self.rec.fired.lock().unwrap().push(Fired {
            dom: self.dom,
            port: self.port,
            byte,
        });
    }
}

impl Recorder {
    fn fired(&self) -> Vec<Fired> {
        self.fired.lock().unwrap().clone()
    }
    fn probe(&self, addr: *mut u8) {
        *self.probe.lock().unwrap() = Some(addr as usize);
    }
}

fn start() -> (tempfile::TempDir, Hub, Recorder) {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::default();
    let hub = Hub::start_with(dir.path(), Box::new(rec.clone())).unwrap();
    (dir, hub, rec)
}

fn peek(p: *mut u8, off: usize) -> u8 {
    // SAFETY: callers pass a pointer to a live mapping longer than `off`.
    unsafe { p.add(off).read_volatile() }
}

fn poke(p: *mut u8, off: usize, v: u8) {
    // SAFETY: callers pass a pointer to a live writable mapping longer than `off`.
    unsafe { p.add(off).write_volatile(v) }
}

/// Waits (bounded) until the hub's bookkeeping satisfies `f`.
fn wait_stats(hub: &Hub, f: impl Fn(&HubStats) -> bool) -> HubStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = hub.stats();
        if f(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn share_and_map_in_one_process() {
    let (dir, hub, _) = start();
    let shared = Local::new(dir.path(), 1).share(2, 3, true).unwrap();
    assert_eq!(shared.len(), 3 * PAGE_SIZE);
    assert_eq!(shared.refs().len(), 3);
    assert!(shared.refs().iter().all(|r| *r != 0));
    let mapped = Local::new(dir.path(), 2)
        .map(1, shared.refs(), true)
        .unwrap();
    assert!(mapped.writable());
    for off in (0..3 * PAGE_SIZE).step_by(512) {
        assert_eq!(peek(mapped.as_ptr(), off), 0, "pages start zeroed");
    }
    poke(shared.as_ptr(), 2 * PAGE_SIZE + 7, 0x5A);
    assert_eq!(peek(mapped.as_ptr(), 2 * PAGE_SIZE + 7), 0x5A);
    poke(mapped.as_ptr(), 1, 0xC3);
    assert_eq!(peek(shared.as_ptr(), 1), 0xC3);
    assert_eq!(
        hub.stats(),
        HubStats {
            connections: 2,
            shares: 1,
            grants: 3,
            maps: 1,
            counted_pages: 3
        }
    );
    drop(mapped);
    drop(shared);
    assert_eq!(
        wait_stats(&hub, |s| *s == HubStats::default()),
        HubStats::default()
    );
}

#[test]
fn refs_from_several_shares_map_contiguously_in_request_order() {
    let (dir, _hub, _) = start();
    let dom1 = Local::new(dir.path(), 1);
    let a = dom1.share(2, 2, true).unwrap();
    let b = dom1.share(2, 3, true).unwrap();
    for (pages, tag) in [(&a, 0xA0u8), (&b, 0xB0u8)] {
        for p in 0..pages.len() / PAGE_SIZE {
            poke(pages.as_ptr(), p * PAGE_SIZE, tag + p as u8);
        }
    }
    let refs = [
        b.refs()[1],
        a.refs()[0],
        a.refs()[1],
        b.refs()[2],
        b.refs()[0],
    ];
    let m = Local::new(dir.path(), 2).map(1, &refs, false).unwrap();
    let seen: Vec<u8> = (0..5).map(|p| peek(m.as_ptr(), p * PAGE_SIZE)).collect();
    assert_eq!(seen, [0xB1, 0xA0, 0xA1, 0xB2, 0xB0]);
}

#[test]
fn sharer_release_clears_the_byte_then_fires_the_event() {
    let (dir, hub, rec) = start();
    let mut shared = Local::new(dir.path(), 1).share(2, 1, true).unwrap();
    let refs = shared.refs().to_vec();
    let mapped = Local::new(dir.path(), 2).map(1, &refs, true).unwrap();
    shared.set_unmap_notify(21, 5).unwrap();
    poke(shared.as_ptr(), 21, 0xA5);
    rec.probe(mapped.as_ptr().wrapping_add(21));
    assert!(rec.fired().is_empty());
    drop(shared);
    // Done before drop returned; the byte was already 0 when the event went.
    assert_eq!(
        rec.fired(),
        [Fired {
            dom: 1,
            port: 5,
            byte: Some(0)
        }]
    );
    // The grant outlives the sharer while mapped, and the mapping works.
    assert_eq!(hub.stats().grants, 1);
    assert_eq!(hub.stats().counted_pages, 0);
    poke(mapped.as_ptr(), 100, 200);
    assert_eq!(peek(mapped.as_ptr(), 100), 200);
    drop(mapped);
    // Revoked at once, before drop returned (the connection may linger).
    assert_eq!(hub.stats().grants, 0);
    assert_eq!(hub.stats().shares, 0);
    let e = Local::new(dir.path(), 2).map(1, &refs, false).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    assert!(matches!(e, Error::MapRefused { granter: 1, .. }), "{e:?}");
}

#[test]
fn mapper_release_clears_the_byte_then_fires_the_event() {
    let (dir, _hub, rec) = start();
    let shared = Local::new(dir.path(), 1).share(2, 2, true).unwrap();
    let mut mapped = Local::new(dir.path(), 2)
        .map(1, shared.refs(), true)
        .unwrap();
    mapped.set_unmap_notify(PAGE_SIZE + 20, 9).unwrap();
    poke(shared.as_ptr(), PAGE_SIZE + 20, 1);
    rec.probe(shared.as_ptr().wrapping_add(PAGE_SIZE + 20));
    drop(mapped);
    assert_eq!(
        rec.fired(),
        [Fired {
            dom: 2,
            port: 9,
            byte: Some(0)
        }]
    );
    // Only the mapper's notify; the sharer set none.
    drop(shared);
    assert_eq!(rec.fired().len(), 1);
}

#[test]
fn mapper_connection_loss_is_a_death_the_hub_clears_the_byte() {
    let (dir, hub, rec) = start();
    let shared = Local::new(dir.path(), 1).share(2, 1, true).unwrap();
    let mut mapped = Local::new(dir.path(), 2)
        .map_pages(1, shared.refs(), true)
        .unwrap();
    mapped.set_unmap_notify(20, 4).unwrap();
    poke(shared.as_ptr(), 20, 1);
    rec.probe(shared.as_ptr().wrapping_add(20));
    // Cut the connection without the orderly release: the hub must act as
    // for a dead process, byte first.
    nix::sys::socket::shutdown(
        mapped.conn.sock.as_raw_fd(),
        nix::sys::socket::Shutdown::Both,
    )
    .unwrap();
    wait_stats(&hub, |s| s.maps == 0);
    assert_eq!(
        rec.fired(),
        [Fired {
            dom: 2,
            port: 4,
            byte: Some(0)
        }]
    );
    assert_eq!(peek(shared.as_ptr(), 20), 0);
    drop(mapped);
}

#[test]
fn notify_needs_a_bound_port_and_an_offset_inside() {
    let (dir, _hub, _) = start();
    let mut shared = Local::new(dir.path(), 1).share(2, 1, false).unwrap();
    let e = shared.set_unmap_notify(0, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    assert!(matches!(
        shared.set_unmap_notify(PAGE_SIZE, 1),
        Err(Error::InvalidArgument(_))
    ));
    let mut ro = Local::new(dir.path(), 2)
        .map(1, shared.refs(), false)
        .unwrap();
    let e = ro.set_unmap_notify(0, 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
}

#[test]
fn map_reply_runs_group_consecutive_pages_of_one_memfd() {
    let mut w = Writer::default();
    w.u32(5).u32(2);
    for (fd, page) in [(0, 3), (0, 4), (1, 0), (0, 5), (0, 6)] {
        w.u32(fd).u32(page);
    }
    let runs = parse_map_reply(&w.0, 5).unwrap();
    assert_eq!(
        runs,
        [
            Run {
                first: 0,
                pages: 2,
                fd: 0,
                page: 3
            },
            Run {
                first: 2,
                pages: 1,
                fd: 1,
                page: 0
            },
            Run {
                first: 3,
                pages: 2,
                fd: 0,
                page: 5
            },
        ]
    );
    // entries pointing at a memfd that is not announced, or counts off
    assert!(parse_map_reply(&w.0, 4).is_err());
    let mut w = Writer::default();
    w.u32(1).u32(1).u32(1).u32(0);
    assert!(parse_map_reply(&w.0, 1).is_err());
    assert!(parse_map_reply(&[], 1).is_err());
}

#[test]
fn a_second_hub_on_the_same_directory_is_refused_and_a_stale_socket_replaced() {
    let (dir, hub, _) = start();
    let e = Hub::start_with(dir.path(), Box::new(Recorder::default())).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{e}");
    hub.shutdown();
    assert!(!dir.path().join("gnttab.sock").exists());
    // A socket file nobody listens on.
    let path = dir.path().join("gnttab.sock");
    let s = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(s);
    assert!(path.exists());
    let hub = Hub::start_with(dir.path(), Box::new(Recorder::default())).unwrap();
    Local::new(dir.path(), 1).share(2, 1, true).unwrap();
    drop(hub);
    assert!(!path.exists());
}

#[test]
fn after_shutdown_clients_get_errors_not_hangs() {
    let (dir, hub, _) = start();
    let mut shared = Local::new(dir.path(), 1).share(2, 1, true).unwrap();
    hub.shutdown();
    assert!(shared.set_unmap_notify(0, 1).is_err());
    drop(shared);
    let e = Local::new(dir.path(), 1).share(2, 1, true).unwrap_err();
    assert!(matches!(e, Error::Hub { .. }), "{e:?}");
}

// ---------------------------------------------------------------------------
// Hostile clients

fn raw_conn(dir: &std::path::Path) -> OwnedFd {
    let s = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(
        s.as_raw_fd(),
        &UnixAddr::new(&dir.join("gnttab.sock")).unwrap(),
    )
    .unwrap();
    let t = nix::sys::time::TimeVal::new(10, 0);
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::ReceiveTimeout, &t).unwrap();
    s
}

/// Sends one packet; returns the reply's status and payload, or `None` if
/// the hub closed the connection.
fn raw_call(s: &OwnedFd, bytes: &[u8], fds: &[std::os::fd::RawFd]) -> Option<(i32, Vec<u8>)> {
    if proto::send_packet(s.as_fd(), bytes, fds, MsgFlags::empty()).is_err() {
        return None;
    }
    let mut buf = vec![0u8; MAX_PACKET];
    let p = proto::recv_packet(s.as_fd(), &mut buf, MsgFlags::empty())
        .expect("the hub answers or closes, it does not hang")?;
    let mut r = Reader::new(&buf[..p.len]);
    let status = r.i32().ok()?;
    Some((status, buf[4..p.len].to_vec()))
}

fn sealed_memfd(len: usize, seal: bool) -> OwnedFd {
    let fd = memfd_create(
        "gnttab-test",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .unwrap();
    nix::unistd::ftruncate(&fd, len as libc::off_t).unwrap();
    if seal {
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )
        .unwrap();
    }
    fd
}

fn share_req(count: u32) -> Vec<u8> {
    Request::Share {
        dom: 1,
        peer: 2,
        writable: true,
        count,
    }
    .encode()
}

#[test]
fn garbage_on_the_socket_neither_crashes_nor_hangs_the_hub() {
    let (dir, hub, _) = start();
    let d = dir.path();

    // Packets that are not requests: the hub closes the connection.
    let mut rng = 0x1234_5678u32;
    for len in [0usize, 1, 3, 4, 5, 7, 13, 64, 300, 4099] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 17;
                rng ^= rng << 5;
                rng as u8
            })
            .collect();
        let s = raw_conn(d);
        assert_eq!(raw_call(&s, &bytes, &[]), None, "len {len}");
    }
    for op in [0u32, 6, 0x8000_0000, u32::MAX] {
        let s = raw_conn(d);
        assert_eq!(raw_call(&s, &op.to_le_bytes(), &[]), None);
    }
    // Oversized packet.
    let s = raw_conn(d);
    assert_eq!(raw_call(&s, &vec![1u8; MAX_PACKET + 100], &[]), None);
    // Requests in the wrong state.
    for req in [
        Request::Fds { start: 0 },
        Request::Notify { offset: 0, port: 1 },
        Request::Release,
    ] {
        let s = raw_conn(d);
        assert_eq!(raw_call(&s, &req.encode(), &[]), None, "{req:?}");
    }
    // Shares with the wrong descriptors: refused with EINVAL.
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    let good = sealed_memfd(PAGE_SIZE, true);
    let unsealed = sealed_memfd(PAGE_SIZE, false);
    let short = sealed_memfd(PAGE_SIZE / 2, true);
    let read_only = std::fs::File::open(format!("/proc/self/fd/{}", good.as_raw_fd())).unwrap();
    let cases: [&[std::os::fd::RawFd]; 6] = [
        &[],
        &[good.as_raw_fd(), good.as_raw_fd()],
        &[pipe_r.as_raw_fd()],
        &[unsealed.as_raw_fd()],
        &[short.as_raw_fd()],
        &[read_only.as_raw_fd()],
    ];
    for fds in cases {
        let s = raw_conn(d);
        let r = raw_call(&s, &share_req(1), fds);
        assert_eq!(r.map(|r| r.0), Some(libc::EINVAL), "{fds:?}");
    }
    // Counts: zero, over the limit, absurd.
    for (count, errno) in [
        (0, libc::EINVAL),
        (1025, libc::ENOSPC),
        (u32::MAX, libc::ENOSPC),
    ] {
        let s = raw_conn(d);
        let r = raw_call(&s, &share_req(count), &[good.as_raw_fd()]);
        assert_eq!(r.map(|r| r.0), Some(errno), "count {count}");
    }
    // Descriptors attached to a request that takes none.
    let s = raw_conn(d);
    let map = Request::Map {
        dom: 2,
        granter: 1,
        writable: true,
        refs: vec![8],
    };
    assert_eq!(raw_call(&s, &map.encode(), &[good.as_raw_fd()]), None);
    // A map of 1024 refs that do not exist.
    let s = raw_conn(d);
    let map = Request::Map {
        dom: 2,
        granter: 1,
        writable: false,
        refs: (1..=1024).collect(),
    };
    assert_eq!(
        raw_call(&s, &map.encode(), &[]).map(|r| r.0),
        Some(libc::EINVAL)
    );
    drop(s);
    // A map that claims more refs than it carries.
    let mut w = Writer::default();
    w.u32(OP_MAP)
        .u16(2)
        .u16(1)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u32(1000)
        .u32(8);
    let s = raw_conn(d);
    assert_eq!(raw_call(&s, &w.0, &[]), None);

    // A valid share, then out-of-range FDS and garbage on the same
    // connection: the connection ends and the share is released.
    let s = raw_conn(d);
    let (st, payload) = raw_call(&s, &share_req(1), &[good.as_raw_fd()]).unwrap();
    assert_eq!(st, 0);
    let gref = u32::from_le_bytes(payload[4..8].try_into().unwrap());
    let s2 = raw_conn(d);
    let map = Request::Map {
        dom: 2,
        granter: 1,
        writable: true,
        refs: vec![gref],
    };
    let (st, _) = raw_call(&s2, &map.encode(), &[]).unwrap();
    assert_eq!(st, 0);
    let mut w = Writer::default();
    w.u32(OP_FDS).u32(1);
    assert_eq!(
        raw_call(&s2, &w.0, &[]),
        None,
        "FDS beyond the map's memfds"
    );
    let mut w = Writer::default();
    w.u32(OP_NOTIFY).u32(PAGE_SIZE as u32).u32(3);
    assert_eq!(raw_call(&s, &w.0, &[]).map(|r| r.0), Some(libc::EINVAL));
    assert_eq!(raw_call(&s, &share_req(1), &[good.as_raw_fd()]), None);
    let w = OP_RELEASE.to_le_bytes();
    assert_eq!(raw_call(&s, &w, &[]), None);

    // A client that floods requests and never reads the replies.
    let s = raw_conn(d);
    for _ in 0..200 {
        if proto::send_packet(
            s.as_fd(),
            &Request::Fds { start: 0 }.encode(),
            &[],
            MsgFlags::MSG_DONTWAIT,
        )
        .is_err()
        {
            break;
        }
    }
    // Many connections that just go away.
    let many: Vec<OwnedFd> = (0..100).map(|_| raw_conn(d)).collect();
    drop(many);
    drop(s);

    // The hub still serves, and forgets everything the garbage left.
    let shared = Local::new(d, 1).share(2, 2, true).unwrap();
    let mapped = Local::new(d, 2).map(1, shared.refs(), true).unwrap();
    poke(shared.as_ptr(), PAGE_SIZE, 9);
    assert_eq!(peek(mapped.as_ptr(), PAGE_SIZE), 9);
    drop((mapped, shared));
    drop(s2);
    drop((pipe_r, good, unsealed, short, read_only));
    let stats = wait_stats(&hub, |s| *s == HubStats::default());
    assert_eq!(stats, HubStats::default());
}

#[test]
fn orphans_are_bounded_by_the_grant_table_size() {
    let (dir, hub, _) = start();
    let dom1 = Local::new(dir.path(), 1);
    let dom2 = Local::new(dir.path(), 2);
    // Each round leaves 1024 orphaned entries mapped by domain 2.
    let rounds = DOMAIN_GRANT_ENTRIES / DOMAIN_PAGE_LIMIT;
    let mut maps = Vec::new();
    for _ in 0..rounds {
        let s = dom1.share(2, DOMAIN_PAGE_LIMIT, true).unwrap();
        maps.push(dom2.map(1, s.refs(), false).unwrap());
    }
    assert_eq!(hub.stats().grants, DOMAIN_GRANT_ENTRIES);
    assert_eq!(hub.stats().counted_pages, 0);
    // The page limit has room, the grant table has none.
    let e = dom1.share(2, 1, true).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    // Another domain's table is its own.
    Local::new(dir.path(), 3).share(2, 1, true).unwrap();
    // One unmap frees 1024 entries.
    maps.pop();
    dom1.share(2, DOMAIN_PAGE_LIMIT, true).unwrap();
    // The history kept the high-water mark and the one refusal.
    let h = hub.history();
    assert_eq!(h.peak_domain_pages, DOMAIN_PAGE_LIMIT);
    assert_eq!(h.refused_shares, 1);
}

#[test]
fn history_keeps_the_peak_of_the_busiest_domain() {
    let (dir, hub, _) = start();
    assert_eq!(hub.history(), HubHistory::default());
    let dom1 = Local::new(dir.path(), 1);
    let a = dom1.share(2, 5, true).unwrap();
    let b = dom1.share(2, 7, true).unwrap();
    let c = Local::new(dir.path(), 3).share(2, 9, true).unwrap();
    drop((a, b, c));
    let d = dom1.share(2, 2, true).unwrap();
    let e = dom1.share(2, DOMAIN_PAGE_LIMIT, true).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    drop(d);
    let h = hub.history();
    assert_eq!(h.peak_domain_pages, 12, "{h:?}");
    assert_eq!(h.refused_shares, 1, "{h:?}");
    assert_eq!(
        wait_stats(&hub, |s| *s == HubStats::default()),
        HubStats::default()
    );
}
