//! Kill anywhere, lose nothing said (issue 14, item 6): transfers over the
//! Local transport where the peer process (`vchan-peer`, in another
//! domain) is SIGKILLed at a random byte offset: the sender or the
//! receiver, the vchan server or the client, in turn. The survivor is this
//! process, with our `Vchan`.
//!
//! * Sender killed: every byte that reached us is the sender's stream,
//!   in order (a prefix of it, no gap, no junk), and at least the bytes we
//!   had read before the kill; our reads then end (EOF or an error).
//! * Receiver killed: our writes end with an error instead of blocking.
//! * Nothing is left: the rendezvous directory holds what it held before
//!   (the hubs' sockets), and the grant hub holds no share, map or page
//!   (the Local transport's memory is memfds, which go with the hub's
//!   last reference; nothing is created in `/dev/shm`).
//!
//! Kills wait until the process is reaped (kill(2) returns before the
//! target stops), and our writes stop at the kill offset, so every transfer
//! is cut where the test says.
//!
//! `VCHAN_SOAK_TRANSFERS` (default 200) sets the number of transfers. The
//! test prints the slowest time from a kill to the survivor's end; it
//! asserts only a generous hang bound (no wall-clock assertions).

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vchan::{LocalXen, Vchan};

const PEER: &str = env!("CARGO_BIN_EXE_vchan-peer");
/// Bytes each transfer would send if nobody died.
const SIZE: u64 = 1 << 20;
/// A survivor that has not ended this long after the kill hangs.
const HANG_BOUND: Duration = Duration::from_secs(30);

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sender's stream (`vchan-peer`'s xorshift64, 8 bytes per step).
struct Stream(u64);
impl Stream {
    fn new() -> Stream {
        Stream(0x9e37_79b9_7f4a_7c15)
    }
    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.to_ne_bytes()
    }
    fn bytes(n: usize) -> Vec<u8> {
        let mut s = Stream::new();
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&s.next_word());
        }
        v.truncate(n);
        v
    }
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn peer(xen: &LocalXen, args: &[&str]) -> Kill {
    Kill(
        Command::new(PEER)
            .args(args)
            .env("VCHAN_LOCAL_DIR", xen.dir())
            .env("VCHAN_DOMAIN", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// SIGKILL, and wait until the process is gone (kill(2) returns before
/// the target stops, and a fast peer moves hundreds of KiB meanwhile).
fn sigkill(k: &mut Kill) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(k.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = k.0.wait();
}

/// Our end in domain 1 and `vchan-peer` in domain 2 doing `what` (`send`
/// or `recv`): we are the server (it the client) or the other way round;
/// 64 KiB rings.
fn open(xen: &LocalXen, port: u32, we_serve: bool, what: &str) -> (Vchan, Kill) {
    let p = port.to_string();
    let size = SIZE.to_string();
    let role = if we_serve { "client" } else { "server" };
    let args = [role, "1", &p, what, "1", "64", "--bytes", &size];
    let (mut v, child) = if we_serve {
        let mut v = Vchan::server(&xen.transport(1), 2, port, 65536, 65536).unwrap();
        let child = peer(xen, &args);
        v.wait_connected(Some(HANG_BOUND)).unwrap();
        (v, child)
    } else {
        let child = peer(xen, &args);
        let v = Vchan::client(&xen.transport(1), 2, port, HANG_BOUND).unwrap();
        (v, child)
    };
    v.set_io_timeout(Some(HANG_BOUND));
    (v, child)
}

/// The peer sends and dies after we have read `at` bytes; returns the time
/// from the kill to the end of our reads.
fn sender_killed(
    xen: &LocalXen,
    port: u32,
    we_serve: bool,
    at: u64,
    stream: &[u8],
) -> (Duration, u64) {
    let (mut v, mut child) = open(xen, port, we_serve, "send");
    let mut hdr = [0u8; 8];
    v.recv(&mut hdr).unwrap();
    assert_eq!(u64::from_le_bytes(hdr), SIZE);
    let mut got = Vec::with_capacity(SIZE as usize);
    let mut buf = vec![0u8; 65536];
    let mut killed = None;
    loop {
        if killed.is_none() && got.len() as u64 >= at {
            sigkill(&mut child);
            killed = Some(Instant::now());
        }
        match v.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if got.len() as u64 == SIZE && killed.is_none() {
            // Everything arrived before the kill offset came (at == SIZE).
            sigkill(&mut child);
            killed = Some(Instant::now());
        }
    }
    let took = killed.map_or(Duration::ZERO, |k| k.elapsed());
    assert!(
        took < HANG_BOUND,
        "reads did not end after the sender's death"
    );
    assert!(
        got.len() as u64 >= at.min(SIZE),
        "fewer bytes than were read before the kill"
    );
    assert!(
        got[..] == stream[..got.len()],
        "received bytes are not a prefix of the sender's stream ({} bytes)",
        got.len()
    );
    (took, got.len() as u64)
}

/// The peer receives and dies after we have written `at` bytes; returns
/// the time from the kill to our writes failing.
fn receiver_killed(
    xen: &LocalXen,
    port: u32,
    we_serve: bool,
    at: u64,
    stream: &[u8],
) -> (Duration, u64) {
    let (mut v, mut child) = open(xen, port, we_serve, "recv");
    v.send(&SIZE.to_le_bytes()).unwrap();
    let mut sent = 0usize;
    let mut killed = None;
    loop {
        if killed.is_none() && sent as u64 >= at {
            sigkill(&mut child);
            killed = Some(Instant::now());
        }
        if sent == stream.len() {
            if killed.is_none() {
                sigkill(&mut child);
                killed = Some(Instant::now());
            }
            // Everything went out: the checksum never comes back.
            let mut sum = [0u8; 8];
            if v.recv(&mut sum).is_err() {
                break;
            }
            continue;
        }
        // A blocking write writes all it is given: up to the kill offset
        // first, then a ring's worth at a time.
        let end = if killed.is_none() {
            (at as usize).min(stream.len())
        } else {
            (sent + 65536).min(stream.len())
        };
        match v.write_some(&stream[sent..end.max(sent + 1).min(stream.len())]) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let took = killed.map_or(Duration::ZERO, |k| k.elapsed());
    assert!(
        took < HANG_BOUND,
        "writes did not end after the receiver's death"
    );
    (took, sent as u64)
}

fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = walk(dir);
    v.sort();
    v
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().map_while(Result::ok) {
        let p = e.path();
        out.push(p.display().to_string());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

#[test]
fn kill_either_side_at_random_offsets() {
    let n: usize = std::env::var("VCHAN_SOAK_TRANSFERS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let before = listing(dir.path());
    let stream = Stream::bytes(SIZE as usize);
    let mut seed = 0x5eed_1400_u64;
    let (mut worst_send, mut worst_recv) = (Duration::ZERO, Duration::ZERO);
    let (mut mid_stream, mut bytes) = (0usize, 0u64);
    let start = Instant::now();
    for i in 0..n {
        let at = rng(&mut seed) % (SIZE + 1);
        let port = 6000 + i as u32;
        let we_serve = i % 4 < 2;
        if i % 2 == 0 {
            let (took, got) = sender_killed(&xen, port, we_serve, at, &stream);
            worst_send = worst_send.max(took);
            mid_stream += usize::from(got < SIZE);
            bytes += got;
        } else {
            let (took, sent) = receiver_killed(&xen, port, we_serve, at, &stream);
            worst_recv = worst_recv.max(took);
            mid_stream += usize::from(sent < SIZE);
            bytes += sent;
        }
    }
    eprintln!(
        "kill soak: {n} transfers ({mid_stream} cut before the end, {:.1} MiB moved) in {:.1} s; \
         slowest end after the kill: sender killed {} ms, receiver killed {} ms",
        bytes as f64 / (1 << 20) as f64,
        start.elapsed().as_secs_f64(),
        worst_send.as_millis(),
        worst_recv.as_millis()
    );
    assert!(
        mid_stream > 0,
        "no transfer was cut: the kills came too late"
    );
    assert_eq!(
        listing(dir.path()),
        before,
        "files left in the rendezvous directory"
    );
    // The hub learns of a death when the connection closes: wait (bounded).
    let deadline = Instant::now() + HANG_BOUND;
    while xen.grant_stats() != Default::default() {
        assert!(
            Instant::now() < deadline,
            "the grant hub still holds pages: {:?}",
            xen.grant_stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
