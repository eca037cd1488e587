//! Test helpers: a scripted fake xenstored on a unix socket, and shortcuts
//! for the real in-memory server.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use xenstore::server::Server;
use xenstore::{DomId, WatchEvent, Watcher, Xs};

/// Safety net for every blocking call in the tests.
pub const SAFETY: Duration = Duration::from_secs(10);

/// What the fake server does with one request.
pub enum Act {
    /// Write these bytes, go on reading.
    Send(Vec<u8>),
    /// Write these bytes, then close the connection.
    SendAndClose(Vec<u8>),
    /// Write these bytes, then keep the connection open without reading
    /// until the client goes away.
    SendAndHang(Vec<u8>),
}

/// A reply (little-endian header, as on x86).
pub fn msg(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [ty, req_id, tx_id, payload.len() as u32] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.extend_from_slice(payload);
    v
}

/// Parsed request as the fake sees it.
#[derive(Debug, Clone)]
pub struct Req {
    pub ty: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
    pub raw: Vec<u8>,
}

/// A fake xenstored serving one connection with a script.
pub struct Fake {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
    thread: Option<JoinHandle<Vec<Req>>>,
}

impl Fake {
    pub fn start<F>(mut script: F) -> Fake
    where
        F: FnMut(usize, &Req) -> Act + Send + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(SAFETY)).unwrap();
            let mut seen = Vec::new();
            loop {
                let mut h = [0u8; 16];
                if s.read_exact(&mut h).is_err() {
                    break;
                }
                let w = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
                let mut payload = vec![0u8; w(12) as usize];
                if s.read_exact(&mut payload).is_err() {
                    break;
                }
                let mut raw = h.to_vec();
                raw.extend_from_slice(&payload);
                let req = Req {
                    ty: w(0),
                    req_id: w(4),
                    tx_id: w(8),
                    payload,
                    raw,
                };
                let act = script(seen.len(), &req);
                seen.push(req);
                match act {
                    Act::Send(b) => {
                        if s.write_all(&b).is_err() {
                            break;
                        }
                    }
                    Act::SendAndClose(b) => {
                        let _ = s.write_all(&b);
                        break;
                    }
                    Act::SendAndHang(b) => {
                        let _ = s.write_all(&b);
                        // wait for the client to close (or the safety net)
                        let mut sink = [0u8; 256];
                        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                        break;
                    }
                }
            }
            seen
        });
        Fake {
            path,
            _dir: dir,
            thread: Some(thread),
        }
    }

    /// Wait for the fake to finish (the client must have closed or the
    /// script must have ended the connection) and return what it received.
    pub fn requests(mut self) -> Vec<Req> {
        self.thread.take().unwrap().join().unwrap()
    }

    pub fn xs(&self) -> Xs {
        let xs = Xs::connect_unix(&self.path).unwrap();
        xs.set_reply_timeout(Some(SAFETY));
        xs
    }
}

/// A real server with the given domains, in a temp dir.
pub struct Env {
    pub server: Server,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new(domains: &[DomId]) -> Env {
        Env::with_config(domains, Default::default())
    }

    pub fn with_config(domains: &[DomId], config: xenstore::server::Config) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with(dir.path(), config).unwrap();
        for d in domains {
            server.add_domain(*d).unwrap();
        }
        Env { server, dir }
    }

    pub fn xs(&self, dom: DomId) -> Xs {
        let xs = Xs::connect_unix(&self.server.socket_path(dom)).unwrap();
        xs.set_reply_timeout(Some(SAFETY));
        xs
    }

    pub fn watcher(&self, dom: DomId) -> Watcher {
        let w = Watcher::connect_unix(&self.server.socket_path(dom)).unwrap();
        w.set_reply_timeout(Some(SAFETY));
        w
    }
}

/// Every event the watcher has received so far, deterministically: the
/// server queues a change's events before it answers the request that made
/// the change, so after that request returned, a round trip on the watcher
/// (a watch on a special path, whose registration event comes last)
/// collects them all.
pub fn events_so_far(w: &Watcher) -> Vec<WatchEvent> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let tok = format!(
        "sync-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    w.watch("@sync", &tok).unwrap();
    let mut got = Vec::new();
    loop {
        let ev = w
            .next_event_timeout(SAFETY)
            .unwrap()
            .expect("sync event within the safety timeout");
        if ev.token == tok {
            break;
        }
        got.push(ev);
    }
    w.unwatch("@sync", &tok).unwrap();
    got
}

pub fn ev(path: &str, token: &str) -> WatchEvent {
    WatchEvent {
        path: path.into(),
        token: token.into(),
    }
}

/// A raw connection for protocol-level pokes at the server.
pub fn raw(env: &Env, dom: DomId) -> UnixStream {
    let s = UnixStream::connect(env.server.socket_path(dom)).unwrap();
    s.set_read_timeout(Some(SAFETY)).unwrap();
    s
}

/// Read one message from a raw connection: (type, req_id, tx_id, payload).
pub fn read_msg(s: &mut UnixStream) -> std::io::Result<(u32, u32, u32, Vec<u8>)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    let w = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    let mut p = vec![0u8; w(12) as usize];
    s.read_exact(&mut p)?;
    Ok((w(0), w(4), w(8), p))
}
