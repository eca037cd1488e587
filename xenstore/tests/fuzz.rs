//! Property tests: random bytes into every parser a peer can reach (the
//! server's request parser and framing, the client's reply parsers), and
//! into live sockets of both sides. Nothing may panic or hang.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Act, Env, Fake, msg};
use proptest::prelude::*;
use xenstore::server::{Request, parse_request};
use xenstore::wire::{
    FrameReader, MsgType, PAYLOAD_MAX, parse_directory_reply, parse_domain_path_reply,
    parse_error_reply, parse_ok_reply, parse_perms_reply, parse_transaction_id, parse_watch_event,
};

fn small_type() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..30, Just(0xffff), any::<u32>()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn request_parser_never_panics(ty in small_type(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(req) = parse_request(ty, &payload) {
            // whatever is accepted has no NUL left in its strings
            match req {
                Request::Read(p) | Request::Mkdir(p) | Request::Rm(p)
                | Request::Directory(p) | Request::GetPerms(p) => prop_assert!(!p.contains('\0')),
                Request::Write(p, _) | Request::SetPerms(p, _) => prop_assert!(!p.contains('\0')),
                Request::Watch(p, t) | Request::Unwatch(p, t) => {
                    prop_assert!(!p.contains('\0') && !t.contains(&0));
                }
                _ => {}
            }
        }
    }

    #[test]
    fn request_parser_on_nul_rich_payloads(ty in 1u32..=14, parts in proptest::collection::vec("[a-z0-9/@]{0,5}", 0..5), tail in any::<bool>()) {
        let mut payload: Vec<u8> = parts.join("\0").into_bytes();
        if tail { payload.push(0); }
        let _ = parse_request(ty, &payload);
    }

    #[test]
    fn reply_parsers_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = parse_error_reply(&payload);
        let _ = parse_ok_reply("X", &payload);
        if let Ok(d) = parse_directory_reply(&payload) {
            prop_assert!(d.iter().all(|n| !n.is_empty() && !n.contains('/')));
        }
        if let Ok(p) = parse_perms_reply(&payload) { prop_assert!(!p.is_empty()); }
        if let Ok(id) = parse_transaction_id(&payload) { prop_assert!(id != 0); }
        if let Ok(p) = parse_domain_path_reply(&payload) { prop_assert!(p.starts_with('/')); }
        let _ = parse_watch_event(&payload);
    }

    #[test]
    fn frame_reader_on_random_streams(data in proptest::collection::vec(any::<u8>(), 0..9000), cuts in proptest::collection::vec(1usize..300, 1..40)) {
        let mut fr = FrameReader::new();
        let mut pos = 0;
        let mut cut = cuts.iter().cycle();
        'outer: while pos < data.len() {
            let n = (*cut.next().unwrap()).min(data.len() - pos);
            fr.feed(&data[pos..pos + n]);
            pos += n;
            loop {
                match fr.next_message() {
                    Ok(Some(m)) => {
                        prop_assert_eq!(m.payload.len(), m.header.len as usize);
                        prop_assert!(m.payload.len() <= PAYLOAD_MAX);
                    }
                    Ok(None) => break,
                    Err(e) => { prop_assert!(e.len as usize > PAYLOAD_MAX); break 'outer; }
                }
            }
            prop_assert!(fr.buffered() < 16 + PAYLOAD_MAX + 300);
            prop_assert!(fr.wanted() >= 1);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random replies from a fake daemon: the client returns Ok or a typed
    /// error, and does not hang (the fake closes after answering).
    #[test]
    fn client_survives_random_replies(ty in small_type(), echo in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..64), junk in proptest::collection::vec(any::<u8>(), 0..40), op in 0u8..6) {
        let fake = Fake::start(move |_, r| {
            let mut b = msg(ty, if echo { r.req_id } else { r.req_id ^ 1 }, r.tx_id, &payload);
            b.extend_from_slice(&junk);
            Act::SendAndClose(b)
        });
        let xs = fake.xs();
        xs.set_reply_timeout(Some(Duration::from_secs(5)));
        let r = match op {
            0 => xs.read("x").map(drop),
            1 => xs.write("x", b"v"),
            2 => xs.directory("x").map(drop),
            3 => xs.get_perms("x").map(drop),
            4 => xs.begin().map(drop),
            _ => xs.get_domain_path(3).map(drop),
        };
        if let Err(e) = r {
            prop_assert!(!matches!(e, xenstore::Error::Timeout { .. }), "hang: {e}");
        }
        drop(xs);
        let _ = fake.requests();
    }
}

/// Random byte streams into a live server: it must keep serving.
#[test]
fn server_survives_random_streams() {
    let env = Env::new(&[0, 1]);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..200),
        small_type(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    );
    runner
        .run(&strategy, |(junk, ty, tx, payload)| {
            let mut s = common::raw(&env, 1);
            // a well-framed random request, then raw junk
            let mut b = msg(ty, 1, tx, &payload);
            b.extend_from_slice(&junk);
            let _ = s.write_all(&b);
            let _ = s.shutdown(std::net::Shutdown::Write);
            // whatever comes back is well framed
            while let Ok((rty, _, _, p)) = common::read_msg(&mut s) {
                prop_assert!(p.len() <= PAYLOAD_MAX);
                prop_assert!(MsgType::from_u32(rty).is_some());
            }
            Ok(())
        })
        .unwrap();
    let xs = env.xs(1);
    assert_eq!(xs.own_domid().unwrap(), 1);
    xs.write("data/still", b"alive").unwrap();
}
