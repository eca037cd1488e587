//! Byte-exact golden vectors: what our client puts on the wire for every
//! request type (header fields little-endian as on x86: type, req_id,
//! tx_id, len; then the payload). Includes the docs/vchan.md §9.4 sequence of a
//! qrexec-agent (domain 5) advertising a vchan server for dom0 on port 512.
#![cfg(target_endian = "little")]

mod common;

use common::{Act, Fake, msg};
use xenstore::{NodePerm, Perm, Watcher};

/// Header given as hex words, payload as bytes.
fn golden(header_hex: &str, payload: &[u8]) -> Vec<u8> {
    let digits: Vec<u8> = header_hex
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    assert_eq!(digits.len(), 32, "header must be 16 bytes");
    let mut v: Vec<u8> = digits
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
        .collect();
    v.extend_from_slice(payload);
    v
}

/// Replies like a friendly xenstored.
fn friendly(_: usize, r: &common::Req) -> Act {
    let payload: &[u8] = match r.ty {
        1 => b"a\0b\0",
        2 => b"5",
        3 => b"n5\0r0\0",
        6 => b"7\0",
        10 => b"/local/domain/7\0",
        _ => b"OK\0",
    };
    Act::Send(msg(r.ty, r.req_id, r.tx_id, payload))
}

#[test]
fn every_request_type_is_byte_exact() {
    let fake = Fake::start(friendly);
    let xs = fake.xs();

    // docs/vchan.md §9.4: READ "domid"; TRANSACTION_START; WRITE + SET_PERMS for ring-ref
    // and event-channel; TRANSACTION_END "T".
    let me = xs.own_domid().unwrap();
    assert_eq!(me, 5);
    let base = "data/vchan/0/512";
    xs.transaction(|t| {
        assert_eq!(t.id(), 7);
        let perms = [NodePerm::new(me, Perm::None), NodePerm::new(0, Perm::Read)];
        t.write(&format!("{base}/ring-ref"), b"8")?;
        t.set_perms(&format!("{base}/ring-ref"), &perms)?;
        t.write(&format!("{base}/event-channel"), b"3")?;
        t.set_perms(&format!("{base}/event-channel"), &perms)
    })
    .unwrap();

    xs.mkdir("/a").unwrap();
    xs.rm("/a").unwrap();
    assert_eq!(xs.directory("/").unwrap(), ["a", "b"]);
    assert_eq!(
        xs.get_perms("data").unwrap(),
        [NodePerm::new(5, Perm::None), NodePerm::new(0, Perm::Read)]
    );
    assert_eq!(xs.get_domain_path(7).unwrap(), "/local/domain/7");
    let tx = xs.begin().unwrap();
    assert_eq!(tx.read("x").unwrap(), b"5");
    tx.abort().unwrap();
    xs.write("/v", b"").unwrap(); // empty value: nothing after the NUL
    drop(xs);

    let expect: Vec<Vec<u8>> = vec![
        // READ "domid"
        golden("02000000 01000000 00000000 06000000", b"domid\0"),
        // TRANSACTION_START: payload "\0", tx_id 0
        golden("06000000 02000000 00000000 01000000", b"\0"),
        // WRITE "data/vchan/0/512/ring-ref\0" "8" (value without NUL), tx 7
        golden(
            "0b000000 03000000 07000000 1b000000",
            b"data/vchan/0/512/ring-ref\x008",
        ),
        // SET_PERMS path\0 n5\0 r0\0
        golden(
            "0e000000 04000000 07000000 20000000",
            b"data/vchan/0/512/ring-ref\0n5\0r0\0",
        ),
        golden(
            "0b000000 05000000 07000000 20000000",
            b"data/vchan/0/512/event-channel\x003",
        ),
        golden(
            "0e000000 06000000 07000000 25000000",
            b"data/vchan/0/512/event-channel\0n5\0r0\0",
        ),
        // TRANSACTION_END "T\0" carries the transaction id
        golden("07000000 07000000 07000000 02000000", b"T\0"),
        // MKDIR, RM, DIRECTORY, GET_PERMS, GET_DOMAIN_PATH
        golden("0c000000 08000000 00000000 03000000", b"/a\0"),
        golden("0d000000 09000000 00000000 03000000", b"/a\0"),
        golden("01000000 0a000000 00000000 02000000", b"/\0"),
        golden("03000000 0b000000 00000000 05000000", b"data\0"),
        golden("0a000000 0c000000 00000000 02000000", b"7\0"),
        // TRANSACTION_START, READ in tx 7, TRANSACTION_END "F\0" (abort)
        golden("06000000 0d000000 00000000 01000000", b"\0"),
        golden("02000000 0e000000 07000000 02000000", b"x\0"),
        golden("07000000 0f000000 07000000 02000000", b"F\0"),
        // WRITE "/v" with an empty value
        golden("0b000000 10000000 00000000 03000000", b"/v\0"),
    ];
    let got: Vec<Vec<u8>> = fake.requests().into_iter().map(|r| r.raw).collect();
    assert_eq!(got.len(), expect.len());
    for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
        assert_eq!(g, e, "request #{i}: got {:02x?}", g);
    }
}

#[test]
fn watch_and_unwatch_are_byte_exact() {
    let fake = Fake::start(|_, r| Act::Send(msg(r.ty, r.req_id, r.tx_id, b"OK\0")));
    let w = Watcher::connect_unix(&fake.path).unwrap();
    w.set_reply_timeout(Some(common::SAFETY));
    w.watch("/local/domain/5/data/vchan/0/512/event-channel", "tok")
        .unwrap();
    w.watch("@releaseDomain", "release").unwrap();
    w.unwatch("@releaseDomain", "release").unwrap();
    drop(w);
    let got: Vec<Vec<u8>> = fake.requests().into_iter().map(|r| r.raw).collect();
    assert_eq!(
        got,
        [
            golden(
                "04000000 01000000 00000000 33000000",
                b"/local/domain/5/data/vchan/0/512/event-channel\0tok\0"
            ),
            golden(
                "04000000 02000000 00000000 17000000",
                b"@releaseDomain\0release\0"
            ),
            golden(
                "05000000 03000000 00000000 17000000",
                b"@releaseDomain\0release\0"
            ),
        ]
    );
}

#[test]
fn transaction_retry_repeats_the_whole_sequence() {
    // The first commit conflicts; the helper starts over from
    // TRANSACTION_START and runs the closure again.
    let fake = Fake::start(|_, r| {
        let payload: &[u8] = match r.ty {
            6 => b"9\0",
            7 if r.req_id == 3 => return Act::Send(msg(16, r.req_id, r.tx_id, b"EAGAIN\0")),
            _ => b"OK\0",
        };
        Act::Send(msg(r.ty, r.req_id, r.tx_id, payload))
    });
    let xs = fake.xs();
    let mut runs = 0;
    xs.transaction(|t| {
        runs += 1;
        t.write("k", b"v")
    })
    .unwrap();
    assert_eq!(runs, 2);
    drop(xs);
    let got: Vec<(u32, u32, u32)> = fake
        .requests()
        .into_iter()
        .map(|r| (r.ty, r.req_id, r.tx_id))
        .collect();
    assert_eq!(
        got,
        [
            (6, 1, 0),
            (11, 2, 9),
            (7, 3, 9),
            (6, 4, 0),
            (11, 5, 9),
            (7, 6, 9)
        ]
    );
}
