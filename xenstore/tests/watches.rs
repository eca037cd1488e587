//! Watches against the real server: registration event, change events,
//! transactions (commit only), permissions, special paths, poll-driven use.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::{Env, SAFETY, ev, events_so_far};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use xenstore::{Error, NodePerm, Perm};

#[test]
fn fires_on_registration_and_on_changes_at_or_below() {
    let env = Env::new(&[0, 1]);
    let xs = env.xs(1);
    let w = env.watcher(1);
    w.watch("data/dir", "rel").unwrap();
    w.watch("/local/domain/1/data/dir", "abs").unwrap();
    assert_eq!(
        w.next_event_timeout(SAFETY).unwrap().unwrap(),
        ev("data/dir", "rel")
    );
    assert_eq!(
        w.next_event_timeout(SAFETY).unwrap().unwrap(),
        ev("/local/domain/1/data/dir", "abs")
    );
    assert!(events_so_far(&w).is_empty());

    xs.write("data/dir/a", b"1").unwrap();
    xs.write("data/other", b"1").unwrap(); // a sibling: no event
    xs.mkdir("data/dir").unwrap(); // exists already: no change, no event
    assert_eq!(
        events_so_far(&w),
        [
            ev("data/dir/a", "rel"),
            ev("/local/domain/1/data/dir/a", "abs")
        ]
    );

    w.unwatch("/local/domain/1/data/dir", "abs").unwrap();
    assert!(
        w.unwatch("/local/domain/1/data/dir", "abs")
            .unwrap_err()
            .is_enoent()
    );
    xs.rm("data/dir").unwrap();
    assert_eq!(events_so_far(&w), [ev("data/dir", "rel")]);
}

#[test]
fn watch_on_a_missing_node_and_rm_of_ancestors() {
    let env = Env::new(&[0, 1]);
    let xs = env.xs(1);
    let w = env.watcher(1);
    w.watch("data/a/b/c", "c").unwrap();
    w.watch("data", "top").unwrap();
    assert_eq!(
        events_so_far(&w),
        [ev("data/a/b/c", "c"), ev("data", "top")]
    );
    xs.write("data/a/b/c", b"").unwrap();
    assert_eq!(
        events_so_far(&w),
        [ev("data/a/b/c", "c"), ev("data/a/b/c", "top")]
    );
    // removing an ancestor reports the removed path to watchers above and
    // the watched path itself to watchers below
    xs.rm("data/a").unwrap();
    let mut got = events_so_far(&w);
    got.sort_by(|a, b| a.token.cmp(&b.token));
    assert_eq!(got, [ev("data/a/b/c", "c"), ev("data/a", "top")]);
}

#[test]
fn transaction_changes_fire_on_commit_only() {
    let env = Env::new(&[0, 1]);
    let xs = env.xs(1);
    let w = env.watcher(1);
    w.watch("data", "t").unwrap();
    assert_eq!(events_so_far(&w), [ev("data", "t")]);

    let tx = xs.begin().unwrap();
    tx.write("data/x", b"1").unwrap();
    tx.write("data/y", b"1").unwrap();
    assert!(events_so_far(&w).is_empty(), "no event before commit");
    tx.commit().unwrap();
    assert_eq!(events_so_far(&w), [ev("data/x", "t"), ev("data/y", "t")]);

    let tx = xs.begin().unwrap();
    tx.write("data/z", b"1").unwrap();
    tx.abort().unwrap();
    assert!(
        events_so_far(&w).is_empty(),
        "no event for an aborted transaction"
    );
}

#[test]
fn events_respect_read_permission() {
    // the vchan pattern: a client (2) watches the server's (1) event-channel
    // node, which is unreadable until the server grants r2
    let env = Env::new(&[0, 1, 2]);
    let srv = env.xs(1);
    let w = env.watcher(2);
    let node = "/local/domain/1/data/vchan/2/512/event-channel";
    w.watch(node, node).unwrap();
    assert_eq!(events_so_far(&w), [ev(node, node)]); // registration always fires
    srv.write("data/vchan/2/512/ring-ref", b"5").unwrap();
    srv.write("data/vchan/2/512/event-channel", b"7").unwrap();
    assert!(events_so_far(&w).is_empty(), "n1: domain 2 may not see it");
    srv.transaction(|t| {
        t.write("data/vchan/2/512/event-channel", b"8")?;
        t.set_perms(
            "data/vchan/2/512/event-channel",
            &[NodePerm::new(1, Perm::None), NodePerm::new(2, Perm::Read)],
        )
    })
    .unwrap();
    assert_eq!(events_so_far(&w), [ev(node, node)]);
    assert_eq!(env.xs(2).read(node).unwrap(), b"8");
    // the server removing the nodes: the client may read them, so it is told
    srv.rm("data/vchan/2/512").unwrap();
    assert_eq!(events_so_far(&w), [ev(node, node)]);
}

#[test]
fn special_watches_on_domain_add_and_remove() {
    let env = Env::new(&[0, 1]);
    let w0 = env.watcher(0);
    let w1 = env.watcher(1);
    w0.watch("@introduceDomain", "intro").unwrap();
    w0.watch("@releaseDomain", "rel").unwrap();
    w1.watch("@releaseDomain", "rel1").unwrap();
    w0.watch("/local/domain", "home").unwrap();
    events_so_far(&w0);
    events_so_far(&w1);

    let sock = env.server.add_domain(3).unwrap();
    let xs3 = env.xs(3);
    assert_eq!(xs3.own_domid().unwrap(), 3);
    let got = events_so_far(&w0);
    assert!(got.contains(&ev("@introduceDomain", "intro")), "{got:?}");
    assert!(got.contains(&ev("/local/domain/3", "home")), "{got:?}");

    env.server.remove_domain(3).unwrap();
    let got = events_so_far(&w0);
    assert!(got.contains(&ev("@releaseDomain", "rel")), "{got:?}");
    assert!(got.contains(&ev("/local/domain/3", "home")), "{got:?}");
    assert_eq!(events_so_far(&w1), [ev("@releaseDomain", "rel1")]);
    // the domain's connections are closed and its socket is gone
    assert!(matches!(
        xs3.read("domid"),
        Err(Error::Disconnected { .. } | Error::Io { .. })
    ));
    assert!(!sock.exists());
    assert!(env.xs(0).read("/local/domain/3").unwrap_err().is_enoent());
    assert!(env.server.remove_domain(3).is_err());
}

#[test]
fn poll_driven_use_drains_with_try_next_event() {
    let env = Env::new(&[0, 1]);
    let xs = env.xs(1);
    let w = env.watcher(1);
    w.watch("data", "p").unwrap();
    // the registration event may sit in user space or in the socket
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + SAFETY;
    while got.is_empty() && std::time::Instant::now() < deadline {
        while let Some(e) = w.try_next_event().unwrap() {
            got.push(e);
        }
        if got.is_empty() {
            let mut fds = [PollFd::new(w.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(100u16)).unwrap();
        }
    }
    assert_eq!(got, [ev("data", "p")]);
    assert_eq!(w.queued_events(), 0);
    assert!(w.try_next_event().unwrap().is_none());

    xs.write("data/a", b"").unwrap();
    xs.write("data/b", b"").unwrap();
    let mut fds = [PollFd::new(w.as_fd(), PollFlags::POLLIN)];
    assert_eq!(poll(&mut fds, PollTimeout::from(10_000u16)).unwrap(), 1);
    let mut got = Vec::new();
    while got.len() < 2 {
        match w.try_next_event().unwrap() {
            Some(e) => got.push(e),
            None => {
                let mut fds = [PollFd::new(w.as_fd(), PollFlags::POLLIN)];
                assert_eq!(poll(&mut fds, PollTimeout::from(10_000u16)).unwrap(), 1);
            }
        }
    }
    assert_eq!(got, [ev("data/a", "p"), ev("data/b", "p")]);
    assert!(w.next_event_timeout(Duration::ZERO).unwrap().is_none());
}

#[test]
fn blocking_loop_in_a_thread() {
    let env = Env::new(&[0, 1]);
    let w = env.watcher(1);
    w.watch("data/flag", "f").unwrap();
    assert_eq!(w.next_event().unwrap(), ev("data/flag", "f"));
    let handle = std::thread::spawn(move || {
        let e = w.next_event().unwrap();
        (e, w)
    });
    env.xs(1).write("data/flag", b"1").unwrap();
    let (e, _w) = handle.join().unwrap();
    assert_eq!(e, ev("data/flag", "f"));
}

#[test]
fn duplicate_and_too_many_watches() {
    let env = Env::new(&[0, 1]);
    let w = env.watcher(1);
    w.watch("data", "t").unwrap();
    assert!(matches!(
        w.watch("/local/domain/1/data", "t"),
        Err(Error::Xs {
            errno: xenstore::Errno::EEXIST,
            ..
        })
    ));
    // C xenstored refuses a watch once the domain holds *more* than
    // quota_nb_watch_per_domain (128): 129 fit.
    for i in 1..129 {
        w.watch("data", &format!("t{i}")).unwrap();
    }
    assert!(matches!(
        w.watch("data", "one-too-many"),
        Err(Error::Xs {
            errno: xenstore::Errno::E2BIG,
            ..
        })
    ));
    // free a slot for the sync watch; events already queued stay queued
    w.unwatch("data", "t").unwrap();
    assert_eq!(events_so_far(&w).len(), 129);
}
