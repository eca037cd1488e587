//! Transactions against the real server: isolation, conflict → EAGAIN, and
//! the retrying helper.

mod common;

use std::sync::Arc;

use common::Env;
use xenstore::{Error, NodePerm, Perm, TRANSACTION_ATTEMPTS};

#[test]
fn writes_are_invisible_until_commit() {
    let env = Env::new(&[0, 1]);
    let (a, b) = (env.xs(1), env.xs(1));
    let tx = a.begin().unwrap();
    tx.write("data/t/x", b"1").unwrap();
    assert_eq!(tx.read("data/t/x").unwrap(), b"1");
    assert_eq!(tx.directory("data/t").unwrap(), ["x"]);
    assert!(b.read("data/t/x").unwrap_err().is_enoent());
    tx.commit().unwrap();
    assert_eq!(b.read("data/t/x").unwrap(), b"1");
}

#[test]
fn abort_and_drop_discard() {
    let env = Env::new(&[0, 1]);
    let xs = env.xs(1);
    let tx = xs.begin().unwrap();
    tx.write("data/a", b"1").unwrap();
    tx.abort().unwrap();
    {
        let tx = xs.begin().unwrap();
        tx.write("data/b", b"1").unwrap();
    } // dropped → aborted
    assert!(xs.read("data/a").unwrap_err().is_enoent());
    assert!(xs.read("data/b").unwrap_err().is_enoent());
    assert!(xs.directory("data").unwrap().is_empty());
}

#[test]
fn conflicting_commit_is_eagain() {
    let env = Env::new(&[0, 1]);
    let (a, b) = (env.xs(1), env.xs(1));
    a.write("data/x", b"0").unwrap();
    let tx = a.begin().unwrap();
    assert_eq!(tx.read("data/x").unwrap(), b"0");
    tx.write("data/y", b"from tx").unwrap();
    b.write("data/x", b"changed").unwrap();
    let err = tx.commit().unwrap_err();
    assert!(err.is_eagain(), "{err}");
    assert!(a.read("data/y").unwrap_err().is_enoent());

    // creating a node that the transaction saw missing also conflicts
    let tx = a.begin().unwrap();
    assert!(tx.read("data/z").unwrap_err().is_enoent());
    tx.write("data/w", b"").unwrap();
    b.write("data/z", b"").unwrap();
    assert!(tx.commit().unwrap_err().is_eagain());

    // an unrelated change does not
    let tx = a.begin().unwrap();
    tx.write("data/q", b"1").unwrap();
    env.xs(0).write("/elsewhere", b"").unwrap();
    tx.commit().unwrap();
    assert_eq!(b.read("data/q").unwrap(), b"1");
}

#[test]
fn helper_retries_the_whole_transaction() {
    let env = Env::new(&[0, 1]);
    let (a, b) = (env.xs(1), env.xs(1));
    a.write("data/n", b"10").unwrap();
    let mut runs = 0;
    let result = a
        .transaction(|t| {
            runs += 1;
            let n: u32 = t.read_string("data/n")?.parse().unwrap();
            if runs == 1 {
                // someone else changes the counter under our feet
                b.write("data/n", b"20").unwrap();
            }
            t.write("data/n", (n + 1).to_string().as_bytes())?;
            t.set_perms(
                "data/n",
                &[NodePerm::new(1, Perm::None), NodePerm::new(0, Perm::Read)],
            )?;
            Ok(n + 1)
        })
        .unwrap();
    assert_eq!(runs, 2);
    assert_eq!(result, 21);
    assert_eq!(b.read_string("data/n").unwrap(), "21");
}

#[test]
fn helper_gives_up_after_bounded_attempts() {
    let env = Env::new(&[0, 1]);
    let (a, b) = (env.xs(1), env.xs(1));
    let mut runs = 0u32;
    let err = a
        .transaction(|t| {
            runs += 1;
            t.read("data").map(|_| ())?;
            t.write("data/k", b"")?;
            b.write("data", runs.to_string().as_bytes()).unwrap(); // always conflicts
            Ok(())
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::TransactionRetries { attempts } if attempts == TRANSACTION_ATTEMPTS)
    );
    assert_eq!(runs, TRANSACTION_ATTEMPTS);
    assert!(a.read("data/k").unwrap_err().is_enoent());
}

#[test]
fn closure_error_aborts_and_is_returned() {
    let env = Env::new(&[0, 1]);
    let xs = env.xs(1);
    let err = xs
        .transaction(|t| {
            t.write("data/a", b"")?;
            t.read("data/missing")
        })
        .unwrap_err();
    assert!(err.is_enoent());
    assert!(xs.read("data/a").unwrap_err().is_enoent());
}

#[test]
fn concurrent_increments_are_serialised() {
    let env = Env::new(&[0, 1]);
    env.xs(1).write("data/c", b"0").unwrap();
    let path = Arc::new(env.server.socket_path(1));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let path = Arc::clone(&path);
            std::thread::spawn(move || {
                let xs = xenstore::Xs::connect_unix(&path).unwrap();
                xs.set_reply_timeout(Some(common::SAFETY));
                for _ in 0..25 {
                    xs.transaction(|t| {
                        let n: u32 = t.read_string("data/c")?.parse().unwrap();
                        t.write("data/c", (n + 1).to_string().as_bytes())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(env.xs(1).read_string("data/c").unwrap(), "100");
}
