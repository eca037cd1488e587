//! Cross-process tests of the local double: the hub runs in the test
//! process, peers are separate processes (this test binary re-executed to
//! run only `peer_main`, driven by commands on its stdin).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use evtchn::local::{Hub, Local, SOCKET_NAME};
use evtchn::{Backend, DomId, Error, EventChannel, Port, PortStatus};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, send, socket,
};

/// A safety net against hangs, never a speed assertion.
const LONG: Duration = Duration::from_secs(20);

const ROLE_DIR: &str = "EVTCHN_TEST_PEER_DIR";
const ROLE_DOM: &str = "EVTCHN_TEST_PEER_DOM";

/// The body of a peer process. As an ordinary test (no role in the
/// environment) it does nothing.
#[test]
fn peer_main() {
    let (Ok(dir), Ok(dom)) = (std::env::var(ROLE_DIR), std::env::var(ROLE_DOM)) else {
        return;
    };
    let backend = Local::new(dir, dom.parse::<DomId>().expect("domid"));
    let mut ch: Option<Box<dyn EventChannel>> = None;
    let reply = |s: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "@@ {s}").expect("stdout");
        out.flush().expect("stdout");
    };
    let errno = |e: &Error| e.errno().map_or(-1, |e| e as i32);
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| {
            words
                .get(i)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let c = || ch.as_ref().expect("no channel bound");
        let out = match words.first().copied() {
            Some("unbound") | Some("inter") => {
                let r = if words[0] == "unbound" {
                    backend.bind_unbound(num(1) as DomId)
                } else {
                    backend.bind_interdomain(num(1) as DomId, num(2) as Port)
                };
                match r {
                    Ok(c) => {
                        let p = c.local_port();
                        ch = Some(c);
                        format!("ok {p}")
                    }
                    Err(e) => format!("err {}", errno(&e)),
                }
            }
            Some("notify") => {
                for _ in 0..num(1).max(1) {
                    c().notify().expect("notify");
                }
                "ok".into()
            }
            Some("wait") => {
                let got = c()
                    .wait_timeout(Duration::from_millis(num(1)))
                    .expect("wait");
                format!("ok {got}")
            }
            Some("consume") => format!("ok {}", c().consume_pending().expect("consume")),
            Some("drop") => {
                ch = None;
                "ok".into()
            }
            Some("quit") | None => return,
            Some(other) => format!("unknown {other}"),
        };
        reply(out);
    }
}

/// A peer process playing one domain.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    fn spawn(dir: &Path, dom: DomId) -> Peer {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .args(["--exact", "peer_main", "--nocapture", "--test-threads=1"])
            .env(ROLE_DIR, dir)
            .env(ROLE_DOM, dom.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn peer");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The harness may have printed "test peer_main ... " first.
                if let Some((_, rest)) = line.split_once("@@ ")
                    && tx.send(rest.to_owned()).is_err()
                {
                    break;
                }
            }
        });
        Peer {
            child,
            stdin,
            lines,
        }
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").expect("peer stdin");
        self.stdin.flush().expect("peer stdin");
        self.lines
            .recv_timeout(LONG)
            .unwrap_or_else(|e| panic!("peer did not answer {c:?}: {e}"))
    }

    /// Runs a bind command; `Ok(port)` or `Err(errno)`.
    fn bind(&mut self, c: &str) -> Result<Port, i32> {
        let r = self.cmd(c);
        if let Some(p) = r.strip_prefix("ok ") {
            Ok(p.parse().expect("port"))
        } else if let Some(e) = r.strip_prefix("err ") {
            Err(e.parse().expect("errno"))
        } else {
            panic!("bad answer {r:?} to {c:?}")
        }
    }

    /// Asks the peer to exit normally and waits for it.
    fn quit(&mut self) {
        writeln!(self.stdin, "quit").expect("peer stdin");
        self.stdin.flush().expect("peer stdin");
        let status = self.child.wait().expect("wait for peer");
        assert!(status.success(), "peer exited with {status}");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Setup {
    hub: Hub,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = Hub::start(dir.path()).expect("hub");
    Setup { hub, dir }
}

impl Setup {
    fn local(&self, dom: DomId) -> Local {
        Local::new(self.dir.path(), dom)
    }
    fn peer(&self, dom: DomId) -> Peer {
        Peer::spawn(self.dir.path(), dom)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.hub.shutdown();
    }
}

fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LONG;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The `poll` revents of `fd` right now (timeout 0) or after up to `t`.
fn revents(fd: &impl AsFd, t: Duration) -> PollFlags {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let n = nix::poll::poll(&mut fds, PollTimeout::try_from(t).expect("timeout")).expect("poll");
    if n == 0 {
        PollFlags::empty()
    } else {
        fds[0].revents().expect("revents")
    }
}

/// Dom1 (this process) and dom2 (a peer process) connected: returns the
/// local channel and the peer after the peer consumed its bind wake-up.
fn connected(s: &Setup) -> (Box<dyn EventChannel>, Peer, Port) {
    let a = s.local(1).bind_unbound(2).expect("bind_unbound");
    let mut peer = s.peer(2);
    let pp = peer
        .bind(&format!("inter 1 {}", a.local_port()))
        .expect("peer bind");
    assert_eq!(peer.cmd("consume"), "ok true", "the bind wakes the binder");
    (a, peer, pp)
}

#[test]
fn notify_and_wait_across_processes() {
    let s = setup();
    let (a, mut peer, pp) = connected(&s);
    assert_eq!(
        a.status().unwrap(),
        Some(PortStatus::Interdomain {
            remote: 2,
            remote_port: pp
        })
    );
    for _ in 0..20 {
        a.notify().unwrap();
        assert_eq!(peer.cmd("wait 20000"), "ok true");
        assert_eq!(peer.cmd("notify"), "ok");
        assert!(a.wait_timeout(LONG).unwrap());
    }
    // The blocking wait, too.
    assert_eq!(peer.cmd("notify"), "ok");
    a.wait().unwrap();
    assert!(!a.consume_pending().unwrap());
}

#[test]
fn bind_wakes_the_binder_once_and_not_the_unbound_side() {
    let s = setup();
    let a = s.local(1).bind_unbound(2).unwrap();
    assert_eq!(a.local_port(), 1, "ports start at 1");
    let mut peer = s.peer(2);
    let pp = peer.bind(&format!("inter 1 {}", a.local_port())).unwrap();
    assert_eq!(pp, 1, "ports are per domain");
    assert_eq!(peer.cmd("consume"), "ok true");
    assert_eq!(peer.cmd("consume"), "ok false", "exactly one wake-up");
    // The bind's reply went out after any event it could have caused.
    assert!(revents(&a, Duration::ZERO).is_empty());
    assert!(!a.consume_pending().unwrap());
    let info = s.hub.port_info(1, a.local_port()).unwrap();
    assert_eq!(info.notifications, 0);
    // A binder in this process sees the same.
    let b = s.local(3).bind_unbound(1).unwrap();
    let c = s.local(1).bind_interdomain(3, b.local_port()).unwrap();
    assert!(revents(&c, Duration::ZERO).contains(PollFlags::POLLIN));
    assert!(c.consume_pending().unwrap());
    assert!(!c.consume_pending().unwrap());
    assert!(!b.consume_pending().unwrap());
}

#[test]
fn notifications_coalesce_and_none_is_lost() {
    let s = setup();
    let (a, mut peer, _) = connected(&s);
    let port = a.local_port();
    let info = || s.hub.port_info(1, port).unwrap();
    // Waits until the hub has handled our last re-arm, then drains: the
    // number of further wake-ups the hub had queued for us.
    let settle_and_drain = || {
        let mut n = 0;
        loop {
            until("the re-arm reached the hub", || {
                let i = info();
                !i.pending || !i.masked
            });
            // Under the hub's lock the re-arm either left the port unmasked
            // or re-delivered (masked, event on our socket).
            if !a.consume_pending().unwrap() {
                until("unmasked", || !info().masked);
                assert!(!a.consume_pending().unwrap());
                return n;
            }
            n += 1;
            assert!(n <= 1, "N notifications give 1 or 2 wake-ups, never more");
        }
    };

    // Five back to back while we do not read: one event queued, the rest
    // merged into one pending bit.
    assert_eq!(peer.cmd("notify 5"), "ok");
    until("5 notifications at the hub", || info().notifications == 5);
    let i = info();
    assert!(i.masked && i.pending, "{i:?}");
    assert!(a.wait_timeout(LONG).unwrap(), "the first wait returns");
    let more = settle_and_drain();
    assert!(more <= 1);
    let i = info();
    assert!(!i.pending && !i.masked, "{i:?}");

    // A notification while the port is masked (queued, not read) is pending,
    // not lost: one more wake-up after the re-arm, and only one.
    assert_eq!(peer.cmd("notify"), "ok");
    until("queued", || {
        revents(&a, Duration::ZERO).contains(PollFlags::POLLIN)
    });
    assert_eq!(peer.cmd("notify 4"), "ok");
    until("4 more notifications", || info().notifications == 10);
    assert!(info().pending);
    assert!(a.consume_pending().unwrap());
    assert!(
        a.wait_timeout(LONG).unwrap(),
        "the masked notifications were not lost"
    );
    assert_eq!(settle_and_drain(), 0);

    // After every re-arm a new notification is seen.
    for _ in 0..10 {
        assert_eq!(peer.cmd("notify"), "ok");
        assert!(a.wait_timeout(LONG).unwrap());
    }
}

#[test]
fn notify_to_a_closed_peer_succeeds() {
    let s = setup();
    // No peer ever.
    let lone = s.local(1).bind_unbound(2).unwrap();
    lone.notify().unwrap();
    // A peer that went away.
    let (a, mut peer, pp) = connected(&s);
    assert_eq!(peer.cmd("drop"), "ok");
    until("peer close", || s.hub.status(2, pp) == PortStatus::Closed);
    assert_eq!(a.status().unwrap(), Some(PortStatus::Unbound { remote: 2 }));
    a.notify().unwrap();
    // And the peer's side: notify from an unbound port.
    let b = s.local(2).bind_unbound(1).unwrap();
    b.notify().unwrap();
    assert!(!b.consume_pending().unwrap());
}

#[test]
fn peer_sigkill_is_silent_then_rebind() {
    let s = setup();
    let (a, mut peer, pp) = connected(&s);
    let port = a.local_port();
    peer.kill();
    until("status unbound", || {
        a.status().unwrap() == Some(PortStatus::Unbound { remote: 2 })
    });
    assert_eq!(s.hub.status(2, pp), PortStatus::Closed);
    // Nothing at all on our fd: no event, no POLLHUP, no POLLERR.
    assert!(revents(&a, Duration::from_millis(100)).is_empty());
    assert!(!a.consume_pending().unwrap());

    // A third domain, even domain 0, cannot take the port.
    let mut third = s.peer(3);
    assert_eq!(third.bind(&format!("inter 1 {port}")), Err(libc::EINVAL));
    let err = s.local(0).bind_interdomain(1, port).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Bind {
                source: Errno::EINVAL,
                remote: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    // Neither can anyone bind to a closed or never allocated port.
    assert_eq!(third.bind("inter 2 1"), Err(libc::EINVAL));
    assert_eq!(third.bind("inter 1 4000"), Err(libc::EINVAL));

    // Any process of the old peer domain can.
    let mut again = s.peer(2);
    let pp2 = again.bind(&format!("inter 1 {port}")).unwrap();
    assert_eq!(again.cmd("consume"), "ok true");
    assert_eq!(
        a.status().unwrap(),
        Some(PortStatus::Interdomain {
            remote: 2,
            remote_port: pp2
        })
    );
    a.notify().unwrap();
    assert_eq!(again.cmd("wait 20000"), "ok true");
    assert_eq!(again.cmd("notify"), "ok");
    assert!(a.wait_timeout(LONG).unwrap());
    // When that process exits, we are unbound again.
    again.quit();
    until("unbound again", || {
        a.status().unwrap() == Some(PortStatus::Unbound { remote: 2 })
    });
}

#[test]
fn poll_readiness_through_as_fd() {
    let s = setup();
    let (a, mut peer, _) = connected(&s);
    assert!(revents(&a, Duration::ZERO).is_empty());
    assert_eq!(peer.cmd("notify"), "ok");
    assert!(revents(&a, LONG).contains(PollFlags::POLLIN));
    assert!(
        revents(&a, Duration::ZERO).contains(PollFlags::POLLIN),
        "stays readable until consumed"
    );
    assert!(a.consume_pending().unwrap());
    assert!(revents(&a, Duration::ZERO).is_empty());
    // epoll, as an async reactor would use it.
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
    ep.add(a.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 7))
        .unwrap();
    let mut evs = [EpollEvent::empty()];
    assert_eq!(ep.wait(&mut evs, 0u16).unwrap(), 0);
    assert_eq!(peer.cmd("notify"), "ok");
    assert_eq!(ep.wait(&mut evs, 20_000u16).unwrap(), 1);
    assert_eq!(evs[0].data(), 7);
    assert!(a.consume_pending().unwrap());
}

#[test]
fn held_port_reaches_the_peer_after_its_owner_was_killed() {
    let s = setup();
    let b = s.local(2).bind_unbound(1).unwrap();
    let mut sharer = s.peer(1);
    let sp = sharer.bind(&format!("inter 2 {}", b.local_port())).unwrap();
    let held = s.hub.hold(1, sp).unwrap();
    assert_eq!((held.dom(), held.port()), (1, sp));
    sharer.kill();
    until("owner gone", || {
        !s.hub.port_info(1, sp).unwrap().owner_connected
    });
    // Still bound while held.
    let bound = Some(PortStatus::Interdomain {
        remote: 1,
        remote_port: sp,
    });
    assert_eq!(b.status().unwrap(), bound);
    assert!(!b.consume_pending().unwrap(), "the death itself is silent");
    held.notify();
    assert!(
        b.wait_timeout(LONG).unwrap(),
        "the held port's event arrives"
    );
    drop(held);
    assert_eq!(s.hub.status(1, sp), PortStatus::Closed);
    assert_eq!(b.status().unwrap(), Some(PortStatus::Unbound { remote: 1 }));
    assert!(!b.consume_pending().unwrap());
    // Holding an unbound or closed port fails like EINVAL.
    let err = s.hub.hold(1, sp).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EINVAL));
    // Two holds: the port lives until the last one drops.
    let c = s.local(5).bind_unbound(6).unwrap();
    let h1 = s.hub.hold(5, c.local_port()).unwrap();
    let h2 = s.hub.hold(5, c.local_port()).unwrap();
    drop(c);
    until("owner gone", || {
        !s.hub.port_info(5, 1).unwrap().owner_connected
    });
    drop(h1);
    assert_eq!(s.hub.status(5, 1), PortStatus::Unbound { remote: 6 });
    drop(h2);
    assert_eq!(s.hub.status(5, 1), PortStatus::Closed);
}

fn raw_conn(dir: &Path) -> OwnedFd {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(
        fd.as_raw_fd(),
        &UnixAddr::new(&dir.join(SOCKET_NAME)).unwrap(),
    )
    .unwrap();
    fd
}

/// Receives one packet, or `None` if the hub closed the connection.
fn raw_recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    assert!(!revents(fd, LONG).is_empty(), "hub did not answer");
    let mut buf = [0u8; 128];
    match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
        Ok(0) | Err(Errno::ECONNRESET) => None,
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) => panic!("recv: {e}"),
    }
}

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

#[test]
fn hub_survives_garbage() {
    let s = setup();
    let dir = s.dir.path();
    let a = s.local(1).bind_unbound(2).unwrap();

    // Malformed connect packets: the hub drops the connection.
    let mut bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![1],
        vec![0; 15],
        vec![0; 17],
        vec![0xff; 1000],
        words(&[9, 1, 2, 0]),
        words(&[0, 1, 2, 0]),
    ];
    // And pseudo-random ones of every small size.
    let mut x: u32 = 0x1234_5678;
    for len in 0..80 {
        bad.push(
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (x >> 24) as u8
                })
                .collect(),
        );
    }
    for pkt in &bad {
        let fd = raw_conn(dir);
        send(fd.as_raw_fd(), pkt, MsgFlags::MSG_NOSIGNAL).unwrap();
        let got = raw_recv(&fd);
        // A random 16-byte packet may happen to be a valid request; then it
        // gets a reply. Anything else is dropped without one.
        if pkt.len() != 16 {
            assert_eq!(got, None, "packet {pkt:?}");
        }
    }

    // Reserved domain ids get EINVAL, not a port.
    let fd = raw_conn(dir);
    send(
        fd.as_raw_fd(),
        &words(&[1, 0x7FF0, 2, 0]),
        MsgFlags::empty(),
    )
    .unwrap();
    assert_eq!(raw_recv(&fd), Some(words(&[libc::EINVAL as u32, 0, 0])));

    // Garbage after a valid bind: the connection, and with it the port, goes.
    for after in [
        vec![1u8; 3],
        words(&[1, 999]),
        words(&[77, 2]),
        words(&[1, 2, 3]),
        vec![0; 300],
    ] {
        let fd = raw_conn(dir);
        send(
            fd.as_raw_fd(),
            &words(&[2, 2, 1, a.local_port()]),
            MsgFlags::empty(),
        )
        .unwrap();
        let reply = raw_recv(&fd).expect("bind reply");
        assert_eq!(reply.len(), 12);
        assert_eq!(&reply[..4], &0u32.to_ne_bytes());
        assert_eq!(&reply[8..], &1u32.to_ne_bytes(), "an event follows");
        let port = u32::from_ne_bytes(reply[4..8].try_into().unwrap());
        assert_eq!(
            raw_recv(&fd),
            Some(port.to_ne_bytes().to_vec()),
            "bind wake-up"
        );
        send(fd.as_raw_fd(), &after, MsgFlags::empty()).unwrap();
        assert_eq!(raw_recv(&fd), None, "dropped after {after:?}");
        until("port closed", || {
            s.hub.status(2, port) == PortStatus::Closed
        });
        assert_eq!(a.status().unwrap(), Some(PortStatus::Unbound { remote: 2 }));
    }

    // A stream socket cannot even connect.
    let st = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    assert!(
        connect(
            st.as_raw_fd(),
            &UnixAddr::new(&dir.join(SOCKET_NAME)).unwrap()
        )
        .is_err()
    );

    // The hub still works.
    let b = s.local(2).bind_interdomain(1, a.local_port()).unwrap();
    assert!(b.consume_pending().unwrap());
    b.notify().unwrap();
    assert!(a.wait_timeout(LONG).unwrap());

    // A connection that never says anything does not keep shutdown waiting.
    let idle = raw_conn(dir);
    s.hub.shutdown();
    assert!(!dir.join(SOCKET_NAME).exists());
    assert_eq!(raw_recv(&idle), None);
    assert!(matches!(a.wait(), Err(Error::HubClosed { .. })));
}

#[test]
fn hub_refuses_a_second_live_hub_and_replaces_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path()).unwrap();
    let err = Hub::start(dir.path()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    drop(hub); // the last clone: shuts down
    assert!(!dir.path().join(SOCKET_NAME).exists());
    // A stale socket file (bound, nobody listening).
    let stale = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    nix::sys::socket::bind(
        stale.as_raw_fd(),
        &UnixAddr::new(&dir.path().join(SOCKET_NAME)).unwrap(),
    )
    .unwrap();
    drop(stale);
    let hub = Hub::start(dir.path()).unwrap();
    let a = Local::new(dir.path(), 1).bind_unbound(2).unwrap();
    assert_eq!(a.status().unwrap(), Some(PortStatus::Unbound { remote: 2 }));
    hub.shutdown();
    hub.shutdown(); // idempotent
}

#[test]
fn no_hub_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Local::new(dir.path(), 1).bind_unbound(2).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Hub {
                op: "connect hub",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(SOCKET_NAME), "{err}");
    let io: std::io::Error = err.into();
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
}
