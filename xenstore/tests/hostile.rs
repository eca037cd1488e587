//! A fake xenstored that misbehaves: garbage, truncated, oversized replies,
//! wrong req_id, unknown types, malformed payloads, floods. Every case must
//! end in a typed error (never a panic, never a hang), and a connection
//! that went out of step must refuse further use.

mod common;

use std::time::Duration;

use common::{Act, Fake, msg};
use xenstore::{Errno, Error, Watcher};

fn reply_with(bytes: Vec<u8>) -> Fake {
    let mut once = Some(bytes);
    Fake::start(move |_, _| match once.take() {
        Some(b) => Act::SendAndHang(b),
        None => Act::SendAndHang(Vec::new()),
    })
}

fn protocol<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::Protocol { what }) => what,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn garbage_header_is_a_protocol_error() {
    let fake = reply_with(vec![0xA5; 64]);
    let xs = fake.xs();
    let what = protocol(xs.read("x"));
    assert!(what.contains("4096"), "{what}"); // 0xA5A5A5A5 bytes announced
    assert!(matches!(xs.read("x"), Err(Error::Broken)));
}

#[test]
fn oversized_reply_is_refused_without_reading_the_body() {
    let mut h = msg(2, 1, 0, b"");
    h[12..16].copy_from_slice(&4097u32.to_le_bytes());
    let fake = reply_with(h);
    let xs = fake.xs();
    let what = protocol(xs.read("x"));
    assert!(what.contains("4097"), "{what}");
    assert!(matches!(xs.read("x"), Err(Error::Broken)));
}

#[test]
fn reply_of_exactly_4096_bytes_is_fine() {
    let fake = reply_with(msg(2, 1, 0, &[7u8; 4096]));
    assert_eq!(fake.xs().read("x").unwrap(), vec![7u8; 4096]);
}

#[test]
fn truncated_reply_then_close_is_disconnected() {
    let full = msg(2, 1, 0, b"hello world");
    let fake = Fake::start(move |_, _| Act::SendAndClose(full[..20].to_vec()));
    let xs = fake.xs();
    assert!(matches!(xs.read("x"), Err(Error::Disconnected { .. })));
    assert!(matches!(xs.read("x"), Err(Error::Broken)));
}

#[test]
fn truncated_header_then_silence_times_out() {
    let full = msg(2, 1, 0, b"hello");
    let fake = reply_with(full[..7].to_vec());
    let xs = fake.xs();
    xs.set_reply_timeout(Some(Duration::from_millis(200)));
    assert!(matches!(xs.read("x"), Err(Error::Timeout { .. })));
    assert!(matches!(xs.read("x"), Err(Error::Broken)));
}

#[test]
fn closed_without_reply_is_disconnected() {
    let fake = Fake::start(|_, _| Act::SendAndClose(Vec::new()));
    assert!(matches!(
        fake.xs().write("x", b""),
        Err(Error::Disconnected { .. })
    ));
}

#[test]
fn wrong_req_id_is_a_protocol_error() {
    let fake = Fake::start(|_, r| Act::SendAndHang(msg(r.ty, r.req_id + 1, 0, b"v")));
    let what = protocol(fake.xs().read("x"));
    assert!(what.contains("req_id"), "{what}");
}

#[test]
fn unknown_or_mismatched_reply_type_is_a_protocol_error() {
    let fake = Fake::start(|_, r| Act::SendAndHang(msg(99, r.req_id, 0, b"OK\0")));
    protocol(fake.xs().read("x"));
    // a WRITE reply to a READ
    let fake = Fake::start(|_, r| Act::SendAndHang(msg(11, r.req_id, 0, b"OK\0")));
    protocol(fake.xs().read("x"));
}

#[test]
fn error_replies_are_typed_and_keep_the_connection() {
    let fake = Fake::start(|i, r| {
        let p: &[u8] = [&b"EACCES\0"[..], b"EWEIRD\0", b"ENOENT\0"][i.min(2)];
        Act::Send(msg(16, r.req_id, r.tx_id, p))
    });
    let xs = fake.xs();
    let e = xs.read("data/x").unwrap_err();
    assert!(e.is_eacces());
    assert!(matches!(&e, Error::Xs { op: "READ", path, errno: Errno::EACCES } if path == "data/x"));
    assert_eq!(e.errno(), Some(&Errno::EACCES));
    let io: std::io::Error = e.into();
    assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
    assert_eq!(
        xs.write("y", b"").unwrap_err().errno(),
        Some(&Errno::Other("EWEIRD".into()))
    );
    assert!(xs.rm("z").unwrap_err().is_enoent());
}

#[test]
fn malformed_error_payloads_are_protocol_errors() {
    for bad in [
        &b"ENOENT"[..],
        b"",
        b"\0",
        b"enoent\0",
        b"ENO\0ENT\0",
        &[b'E'; 40],
    ] {
        let bad = bad.to_vec();
        let fake = Fake::start(move |_, r| Act::SendAndHang(msg(16, r.req_id, 0, &bad)));
        protocol(fake.xs().read("x"));
    }
}

#[test]
fn malformed_success_payloads_are_protocol_errors() {
    // (request type to make, payload the fake answers with)
    type Case = (fn(&xenstore::Xs) -> Result<(), Error>, &'static [u8]);
    let cases: [Case; 8] = [
        (|xs| xs.write("x", b"v"), b"OK"),
        (|xs| xs.mkdir("x"), b"ok\0"),
        (|xs| xs.directory("x").map(drop), b"a\0b"),
        (|xs| xs.directory("x").map(drop), b"a/b\0"),
        (|xs| xs.get_perms("x").map(drop), b"z1\0"),
        (|xs| xs.get_perms("x").map(drop), b""),
        (|xs| xs.get_domain_path(1).map(drop), b"local\0"),
        (|xs| xs.begin().map(drop), b"0\0"),
    ];
    for (call, payload) in cases {
        let fake = Fake::start(move |_, r| Act::SendAndHang(msg(r.ty, r.req_id, 0, payload)));
        let xs = fake.xs();
        protocol(call(&xs));
        assert!(matches!(xs.read("x"), Err(Error::Broken)));
    }
}

#[test]
fn bad_domid_value_is_an_error_not_a_panic() {
    for v in [&b"05"[..], b"-1", b"32752", b"", b"1 ", b"\xff"] {
        let v = v.to_vec();
        let fake = Fake::start(move |_, r| Act::Send(msg(r.ty, r.req_id, 0, &v)));
        let xs = fake.xs();
        assert!(matches!(xs.own_domid(), Err(Error::Protocol { .. })));
        // the stream itself is fine
        assert!(xs.read("x").is_ok());
    }
}

#[test]
fn stray_watch_events_on_xs_are_skipped_but_bounded() {
    let fake = Fake::start(|i, r| {
        let mut b = Vec::new();
        let n = if i == 0 { 3 } else { 5000 };
        for _ in 0..n {
            b.extend(msg(15, 0, 0, b"/p\0t\0"));
        }
        b.extend(msg(r.ty, r.req_id, 0, b"value"));
        Act::Send(b)
    });
    let xs = fake.xs();
    assert_eq!(xs.read("x").unwrap(), b"value");
    let what = protocol(xs.read("x"));
    assert!(what.contains("unsolicited"), "{what}");
}

#[test]
fn malformed_watch_event_is_a_protocol_error() {
    let fake = Fake::start(|_, r| {
        let mut b = msg(15, 0, 0, b"/p\0t\0extra\0");
        b.extend(msg(r.ty, r.req_id, 0, b"OK\0"));
        Act::SendAndHang(b)
    });
    let w = Watcher::connect_unix(&fake.path).unwrap();
    w.set_reply_timeout(Some(common::SAFETY));
    protocol(w.watch("/p", "t"));
    assert!(matches!(
        w.next_event_timeout(Duration::ZERO),
        Err(Error::Broken)
    ));
}

#[test]
fn watcher_reassembles_split_events_and_queues_early_ones() {
    // WATCH #1 is answered by an event, the reply, and the first 10 bytes
    // of another event; WATCH #2 by the rest of that event and its reply.
    let late = msg(15, 0, 0, b"/late\0t\0");
    let fake = Fake::start(move |i, r| {
        let mut b = Vec::new();
        if i == 0 {
            b.extend(msg(15, 0, 0, b"/early\0t\0"));
            b.extend(msg(r.ty, r.req_id, 0, b"OK\0"));
            b.extend(&late[..10]);
        } else {
            b.extend(&late[10..]);
            b.extend(msg(r.ty, r.req_id, 0, b"OK\0"));
        }
        Act::Send(b)
    });
    let w = Watcher::connect_unix(&fake.path).unwrap();
    w.set_reply_timeout(Some(common::SAFETY));
    w.watch("/x", "t").unwrap();
    assert_eq!(w.queued_events(), 1, "the early event waits in user space");
    assert_eq!(w.try_next_event().unwrap().unwrap().path, "/early");
    // only part of "/late" is there: no event, and no blocking
    assert!(w.try_next_event().unwrap().is_none());
    assert!(
        w.next_event_timeout(Duration::from_millis(50))
            .unwrap()
            .is_none()
    );
    w.watch("/y", "t").unwrap();
    assert_eq!(w.try_next_event().unwrap().unwrap().path, "/late");
    assert!(w.try_next_event().unwrap().is_none());
    drop(w);
    assert_eq!(fake.requests().len(), 2);
}

#[test]
fn watcher_rejects_unsolicited_replies() {
    let fake = Fake::start(|_, r| {
        let mut b = msg(r.ty, r.req_id, 0, b"OK\0");
        b.extend(msg(2, 77, 0, b"surprise"));
        Act::SendAndHang(b)
    });
    let w = Watcher::connect_unix(&fake.path).unwrap();
    w.set_reply_timeout(Some(common::SAFETY));
    w.watch("/x", "t").unwrap();
    let what = protocol(w.next_event_timeout(common::SAFETY));
    assert!(what.contains("unsolicited"), "{what}");
}

#[test]
fn watcher_event_queue_is_bounded() {
    // 4097 distinct events before the WATCH reply: too many to queue.
    let fake = Fake::start(|_, r| {
        let mut b = Vec::new();
        for i in 0..4097 {
            b.extend(msg(15, 0, 0, format!("/p{i}\0t\0").as_bytes()));
        }
        b.extend(msg(r.ty, r.req_id, 0, b"OK\0"));
        Act::SendAndHang(b)
    });
    let w = Watcher::connect_unix(&fake.path).unwrap();
    w.set_reply_timeout(Some(common::SAFETY));
    let what = protocol(w.watch("/p", "t"));
    assert!(what.contains("undelivered"), "{what}");

    // 6000 identical ones: duplicates beyond the bound are merged.
    let fake = Fake::start(|_, r| {
        let mut b = Vec::new();
        for _ in 0..6000 {
            b.extend(msg(15, 0, 0, b"/p\0t\0"));
        }
        b.extend(msg(r.ty, r.req_id, 0, b"OK\0"));
        Act::SendAndHang(b)
    });
    let w = Watcher::connect_unix(&fake.path).unwrap();
    w.set_reply_timeout(Some(common::SAFETY));
    w.watch("/p", "t").unwrap();
    assert_eq!(w.queued_events(), 4096);
}
