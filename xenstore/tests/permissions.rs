//! Permission scenarios across domain sockets, including the exact results
//! verified on real Xen (docs/vchan.md §8.2, §16 row 9).

mod common;

use std::io::Write;

use common::{Env, raw, read_msg};
use xenstore::server::{Config, MissingNodeError};
use xenstore::{Errno, Error, NodePerm};

fn p(s: &str) -> NodePerm {
    s.parse().unwrap()
}

fn errno<T: std::fmt::Debug>(r: Result<T, Error>) -> Errno {
    match r {
        Err(Error::Xs { errno, .. }) => errno,
        other => panic!("expected an xenstore error, got {other:?}"),
    }
}

#[test]
fn toolstack_nodes_like_libxl() {
    let env = Env::new(&[0, 1]);
    let xs0 = env.xs(0);
    assert_eq!(
        xs0.get_perms("/local/domain/1").unwrap(),
        [p("n0"), p("r1")]
    );
    assert_eq!(
        xs0.get_perms("/local/domain/1/domid").unwrap(),
        [p("n0"), p("r1")]
    );
    assert_eq!(xs0.read_string("/local/domain/1/domid").unwrap(), "1");
    assert_eq!(xs0.get_perms("/local/domain/1/data").unwrap(), [p("n1")]);
    assert_eq!(xs0.get_perms("/local/domain/0").unwrap(), [p("n0")]);
    assert_eq!(xs0.own_domid().unwrap(), 0);
    let xs1 = env.xs(1);
    assert_eq!(xs1.own_domid().unwrap(), 1);
    assert_eq!(xs1.read_string("name").unwrap(), "dom1");
    assert_eq!(xs1.get_domain_path(1).unwrap(), "/local/domain/1");
    assert_eq!(xs1.get_domain_path(7).unwrap(), "/local/domain/7");
    // a domain may read its home but not write it, and not list /local/domain
    assert_eq!(errno(xs1.write("domid", b"0")), Errno::EACCES);
    assert_eq!(errno(xs1.write("newnode", b"")), Errno::EACCES);
    assert_eq!(errno(xs1.directory("/local/domain")), Errno::EACCES);
    assert_eq!(
        xs1.directory("").map_err(|e| e.to_string()).unwrap_err(),
        "invalid argument: empty path"
    );
}

/// docs/vchan.md §16 row 9a/9b, with domU1 = 1 and domU2 = 2.
#[test]
fn row9_verified_on_real_xen() {
    let env = Env::new(&[0, 1, 2]);
    let (xs0, xs1, xs2) = (env.xs(0), env.xs(1), env.xs(2));

    // 9a: written without SET_PERMS under data/ → n<self>
    xs1.write("data/x", b"secret").unwrap();
    assert_eq!(xs1.get_perms("data/x").unwrap(), [p("n1")]);
    let x = "/local/domain/1/data/x";
    assert_eq!(errno(xs2.read(x)), Errno::EACCES);
    assert_eq!(errno(xs2.directory("/local/domain/1/data")), Errno::EACCES);
    assert_eq!(errno(xs2.write(x, b"mine")), Errno::EACCES);
    assert_eq!(errno(xs2.get_perms(x)), Errno::EACCES);
    assert_eq!(xs0.read(x).unwrap(), b"secret");

    // 9b: after SET_PERMS n1 r2 domU2 reads and gets the perms, still
    // cannot write, and still cannot list data/
    xs1.set_perms("data/x", &[p("n1"), p("r2")]).unwrap();
    assert_eq!(xs2.read(x).unwrap(), b"secret");
    assert_eq!(xs2.get_perms(x).unwrap(), [p("n1"), p("r2")]);
    assert_eq!(errno(xs2.write(x, b"mine")), Errno::EACCES);
    assert_eq!(errno(xs2.directory("/local/domain/1/data")), Errno::EACCES);
    assert_eq!(xs0.read(x).unwrap(), b"secret");
    assert_eq!(xs1.read("data/x").unwrap(), b"secret");

    // neither may domU2 change the perms, nor domU1 give the node away
    assert_eq!(errno(xs2.set_perms(x, &[p("n1"), p("b2")])), Errno::EACCES);
    assert_eq!(errno(xs1.set_perms("data/x", &[p("n2")])), Errno::EPERM);
    // dom0 may
    xs0.set_perms(x, &[p("n2")]).unwrap();
    assert_eq!(xs2.read(x).unwrap(), b"secret");
}

#[test]
fn domain_5_reads_domain_7_only_after_grant() {
    let env = Env::new(&[0, 5, 7]);
    let (xs5, xs7) = (env.xs(5), env.xs(7));
    xs7.write("data/vchan/5/512/ring-ref", b"12").unwrap();
    let node = "/local/domain/7/data/vchan/5/512/ring-ref";
    assert!(xs5.read(node).unwrap_err().is_eacces());
    xs7.set_perms("data/vchan/5/512/ring-ref", &[p("n7"), p("r5")])
        .unwrap();
    assert_eq!(xs5.read_string(node).unwrap(), "12");
    // the intermediate directories stay unreadable
    assert!(
        xs5.directory("/local/domain/7/data/vchan/5/512")
            .unwrap_err()
            .is_eacces()
    );
}

/// docs/vchan.md §16 row 9c: a missing node under an unreadable parent.
#[test]
fn missing_node_under_unreadable_parent() {
    for (mode, expect) in [
        (MissingNodeError::Eacces, Errno::EACCES),
        (MissingNodeError::Enoent, Errno::ENOENT),
    ] {
        let env = Env::with_config(
            &[0, 1, 2],
            Config {
                missing_node: mode,
                ..Config::default()
            },
        );
        let xs2 = env.xs(2);
        assert_eq!(
            errno(xs2.read("/local/domain/1/data/missing")),
            expect,
            "{mode:?}"
        );
        // in the reader's own tree: ENOENT on both
        assert_eq!(errno(xs2.read("data/missing")), Errno::ENOENT);
        assert!(
            env.xs(0)
                .read("/local/domain/1/data/missing")
                .unwrap_err()
                .is_enoent()
        );
        // creating it is refused either way
        assert_eq!(
            errno(xs2.write("/local/domain/1/data/missing", b"")),
            Errno::EACCES
        );
    }
}

#[test]
fn default_access_and_per_domain_entries() {
    let env = Env::new(&[0, 1, 2, 3]);
    let (xs1, xs2, xs3) = (env.xs(1), env.xs(2), env.xs(3));
    xs1.write("data/shared", b"v").unwrap();
    // default read for everyone, write for 2, nothing for 3
    xs1.set_perms("data/shared", &[p("r1"), p("w2"), p("n3")])
        .unwrap();
    let node = "/local/domain/1/data/shared";
    assert_eq!(errno(xs2.read(node)), Errno::EACCES);
    xs2.write(node, b"from 2").unwrap();
    assert_eq!(errno(xs3.read(node)), Errno::EACCES);
    assert_eq!(env.xs(0).read(node).unwrap(), b"from 2");
    // domain 2 creates a child: it inherits the list with 2 as owner
    xs2.write(&format!("{node}/child"), b"").unwrap();
    assert_eq!(
        xs1.get_perms(&format!("{node}/child")).unwrap(),
        [p("r2"), p("w2"), p("n3")]
    );
    // RM needs write access on the node
    assert_eq!(errno(xs3.rm(node)), Errno::EACCES);
    xs2.rm(node).unwrap();
    assert!(xs1.read("data/shared").unwrap_err().is_enoent());
    // RM of a missing node whose parent exists is fine
    xs1.rm("data/shared").unwrap();
    assert!(xs1.rm("data/no/such").unwrap_err().is_enoent());
}

#[test]
fn path_and_size_limits() {
    let env = Env::new(&[0, 1]);
    let xs1 = env.xs(1);
    for bad in [
        "data/",
        "data//x",
        "data/a b",
        "/local/domain/1/data/é",
        "data/x.y",
    ] {
        assert_eq!(errno(xs1.write(bad, b"")), Errno::EINVAL, "{bad:?}");
    }
    // 2048 relative is fine (it fits the absolute limit), 2049 is not
    let ok = format!("data/{}", "a".repeat(2043));
    assert_eq!(ok.len(), 2048);
    xs1.write(&ok, b"").unwrap();
    assert_eq!(errno(xs1.write(&format!("{ok}b"), b"")), Errno::EINVAL);
    let xs0 = env.xs(0);
    let abs = format!("/{}", "b".repeat(3071));
    xs0.write(&abs, b"").unwrap();
    assert_eq!(errno(xs0.write(&format!("{abs}c"), b"")), Errno::EINVAL);
    // a domain's value is limited to 2048 bytes (quota), dom0's only by the payload
    assert_eq!(errno(xs1.write("data/big", &[b'x'; 2049])), Errno::ENOSPC);
    xs0.write("/big", &[b'x'; 4000]).unwrap();
    assert_eq!(xs0.read("/big").unwrap().len(), 4000);
    // more than 4096 payload bytes are refused before sending
    assert!(matches!(
        xs0.write("/big", &[b'x'; 4096]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        xs0.read("a\0b"),
        Err(Error::InvalidArgument { .. })
    ));
    // the connection is still fine
    assert_eq!(xs0.read("/big").unwrap().len(), 4000);
}

#[test]
fn oversized_request_drops_the_connection() {
    let env = Env::new(&[0, 1]);
    let mut s = raw(&env, 1);
    let mut h = Vec::new();
    for w in [2u32, 1, 0, 4097] {
        h.extend_from_slice(&w.to_ne_bytes());
    }
    s.write_all(&h).unwrap();
    assert!(read_msg(&mut s).is_err(), "connection should be closed");
    // others are unaffected
    assert_eq!(env.xs(1).own_domid().unwrap(), 1);
}

#[test]
fn malformed_requests_get_einval_and_unknown_transactions_enoent() {
    let env = Env::new(&[0, 1]);
    let mut s = raw(&env, 1);
    let send = |s: &mut std::os::unix::net::UnixStream, ty: u32, tx: u32, payload: &[u8]| {
        let mut m = Vec::new();
        for w in [ty, 42, tx, payload.len() as u32] {
            m.extend_from_slice(&w.to_ne_bytes());
        }
        m.extend_from_slice(payload);
        s.write_all(&m).unwrap();
        read_msg(s).unwrap()
    };
    assert_eq!(
        send(&mut s, 2, 0, b"domid"),
        (16, 42, 0, b"EINVAL\0".to_vec())
    );
    assert_eq!(
        send(&mut s, 2, 0, b"domid\0x\0"),
        (16, 42, 0, b"EINVAL\0".to_vec())
    );
    assert_eq!(send(&mut s, 99, 0, b""), (16, 42, 0, b"EINVAL\0".to_vec()));
    assert_eq!(send(&mut s, 8, 0, b""), (16, 42, 0, b"ENOSYS\0".to_vec()));
    assert_eq!(
        send(&mut s, 2, 1234, b"domid\0"),
        (16, 42, 1234, b"ENOENT\0".to_vec())
    );
    assert_eq!(
        send(&mut s, 7, 1234, b"T\0"),
        (16, 42, 1234, b"ENOENT\0".to_vec())
    );
    assert_eq!(send(&mut s, 2, 0, b"domid\0"), (2, 42, 0, b"1".to_vec()));
    assert_eq!(send(&mut s, 17, 0, b"1\0"), (17, 42, 0, b"T\0".to_vec()));
    assert_eq!(send(&mut s, 17, 0, b"9\0"), (17, 42, 0, b"F\0".to_vec()));
}

#[test]
fn shutdown_removes_sockets_and_closes_connections() {
    let env = Env::new(&[0, 1]);
    let xs1 = env.xs(1);
    let sock = env.server.socket_path(1);
    assert!(sock.exists());
    env.server.shutdown();
    assert!(!sock.exists());
    assert!(!env.server.socket_path(0).exists());
    assert!(xs1.read("domid").is_err());
    assert!(env.server.add_domain(2).is_err());
    env.server.shutdown(); // idempotent
}
