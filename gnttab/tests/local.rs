//! The same-host double across processes: the hubs (grant table and event
//! channels) run in this test process, and each domain is a separate child
//! process (this test binary re-executed as `peer_process_entry`), driven
//! line by line over its stdin/stdout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use evtchn::EventChannel;
use gnttab::{Backend, MappedPages, PAGE_SIZE, SharedPages};

const DIR_VAR: &str = "GNTTAB_TEST_PEER_DIR";
const DOM_VAR: &str = "GNTTAB_TEST_PEER_DOM";
/// A safety net against hangs, never a speed assertion.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The test side

/// The hubs of one test, on their own directory.
struct Setup {
    dir: tempfile::TempDir,
    events: evtchn::local::Hub,
    grants: gnttab::local::Hub,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let events = evtchn::local::Hub::start(dir.path()).unwrap();
        let grants = gnttab::local::Hub::start(dir.path(), events.clone()).unwrap();
        Setup {
            dir,
            events,
            grants,
        }
    }

    fn peer(&self, dom: u16) -> Peer {
        Peer::spawn(self.dir.path(), dom)
    }

    /// Waits (bounded) until the grant hub holds nothing.
    fn wait_idle(&self) -> gnttab::local::HubStats {
        self.wait_for(|s| *s == gnttab::local::HubStats::default())
    }

    /// Waits (bounded) until the grant hub's bookkeeping satisfies `f`.
    fn wait_for(&self, f: impl Fn(&gnttab::local::HubStats) -> bool) -> gnttab::local::HubStats {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let s = self.grants.stats();
            if f(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.grants.shutdown();
        self.events.shutdown();
    }
}

/// A child process playing one domain.
struct Peer {
    dom: u16,
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
}

impl Peer {
    fn spawn(dir: &Path, dom: u16) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "peer_process_entry",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, dir)
            .env(DOM_VAR, dom.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may have printed "test ... " on the same line.
                if let Some(at) = line.find("@@ ")
                    && tx.send(line[at + 3..].to_owned()).is_err()
                {
                    break;
                }
            }
        });
        Peer {
            dom,
            child,
            stdin,
            replies,
        }
    }

    /// Runs one command in the child and returns its reply.
    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        match self.replies.recv_timeout(REPLY_TIMEOUT) {
            Ok(r) => r,
            Err(e) => panic!("domain {}: no reply to {line:?}: {e}", self.dom),
        }
    }

    /// Runs a command that must succeed; returns what follows "ok".
    fn ok(&mut self, line: &str) -> String {
        let r = self.cmd(line);
        match r.strip_prefix("ok") {
            Some(rest) => rest.trim().to_owned(),
            None => panic!("domain {}: {line:?} -> {r:?}", self.dom),
        }
    }

    /// Runs a command that must fail; returns its errno.
    fn err(&mut self, line: &str) -> i32 {
        let r = self.cmd(line);
        let mut words = r.split_whitespace();
        assert_eq!(
            words.next(),
            Some("err"),
            "domain {}: {line:?} -> {r:?}",
            self.dom
        );
        words.next().and_then(|w| w.parse().ok()).unwrap_or(0)
    }

    /// SIGKILL, and reap.
    fn kill(mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    /// Sends a command that is expected to kill the child; returns the
    /// signal it died of.
    fn dies_of(mut self, line: &str) -> Option<i32> {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.signal();
            }
            assert!(Instant::now() < deadline, "child did not die");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The child side

/// The entry point of child processes; does nothing in a normal test run.
#[test]
fn peer_process_entry() {
    let (Ok(dir), Ok(dom)) = (std::env::var(DIR_VAR), std::env::var(DOM_VAR)) else {
        return;
    };
    let dom: u16 = dom.parse().unwrap();
    // Some tests make a child fault on purpose; it must leave no core file.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; it affects only this child process.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    let mut peer = PeerState {
        grants: gnttab::local::Local::new(&dir, dom),
        events: evtchn::local::Local::new(&dir, dom),
        shares: HashMap::new(),
        maps: HashMap::new(),
        chans: HashMap::new(),
    };
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"exit") {
            break;
        }
        let reply = peer.run(&words);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "@@ {reply}");
        let _ = out.flush();
    }
    std::process::exit(0);
}

struct PeerState {
    grants: gnttab::local::Local,
    events: evtchn::local::Local,
    shares: HashMap<String, Box<dyn SharedPages>>,
    maps: HashMap<String, Box<dyn MappedPages>>,
    chans: HashMap<String, Box<dyn EventChannel>>,
}

fn rw(w: &str) -> bool {
    w == "rw"
}

fn refs_of(w: &str) -> Vec<u32> {
    w.split(',').map(|r| r.parse().unwrap()).collect()
}

fn err_reply(e: &gnttab::Error) -> String {
    format!("err {} {e}", e.raw_os_error().unwrap_or(0))
}

impl PeerState {
    /// The memory named `name`: (start, length).
    fn mem(&self, name: &str) -> (*mut u8, usize) {
        if let Some(s) = self.shares.get(name) {
            (s.as_ptr(), s.len())
        } else {
            let m = &self.maps[name];
            (m.as_ptr(), m.len())
        }
    }

    fn run(&mut self, w: &[&str]) -> String {
        let n = |i: usize| -> usize { w[i].parse().unwrap() };
        match w[0] {
            "share" => match self.grants.share(n(2) as u16, n(3), rw(w[4])) {
                Ok(s) => {
                    let refs: Vec<String> = s.refs().iter().map(|r| r.to_string()).collect();
                    self.shares.insert(w[1].to_owned(), s);
                    format!("ok {}", refs.join(","))
                }
                Err(e) => err_reply(&e),
            },
            "map" => match self.grants.map(n(2) as u16, &refs_of(w[4]), rw(w[3])) {
                Ok(m) => {
                    self.maps.insert(w[1].to_owned(), m);
                    "ok".to_owned()
                }
                Err(e) => err_reply(&e),
            },
            "drop" => {
                self.shares.remove(w[1]);
                self.maps.remove(w[1]);
                "ok".to_owned()
            }
            "fill" => {
                // Every byte of page p gets seed + p.
                let (p, len) = self.mem(w[1]);
                for page in 0..len / PAGE_SIZE {
                    // SAFETY: inside our writable mapping; a raw-pointer fill.
                    unsafe {
                        p.add(page * PAGE_SIZE)
                            .write_bytes((n(2) + page) as u8, PAGE_SIZE)
                    };
                }
                "ok".to_owned()
            }
            "check" | "zero" => {
                let (p, len) = self.mem(w[1]);
                for i in 0..len {
                    let want = if w[0] == "zero" {
                        0
                    } else {
                        (n(2) + i / PAGE_SIZE) as u8
                    };
                    // SAFETY: inside our mapping; a volatile read.
                    let got = unsafe { p.add(i).read_volatile() };
                    if got != want {
                        return format!("bad at {i}: {got} != {want}");
                    }
                }
                "ok".to_owned()
            }
            "peek" => {
                let (p, len) = self.mem(w[1]);
                assert!(n(2) < len);
                // SAFETY: inside our mapping (checked); a volatile read.
                format!("ok {}", unsafe { p.add(n(2)).read_volatile() })
            }
            "poke" => {
                let (p, len) = self.mem(w[1]);
                assert!(n(2) < len);
                // On a read-only mapping this faults, which is what the test
                // wants to see.
                // SAFETY: inside our mapping (checked).
                unsafe { p.add(n(2)).write_volatile(n(3) as u8) };
                "ok".to_owned()
            }
            "mprotect" => {
                let (p, len) = self.mem(w[1]);
                let prot = libc::PROT_READ | libc::PROT_WRITE;
                // SAFETY: changes the protection of our own mapping only; nothing is written through it here.
                let rc = unsafe { libc::mprotect(p.cast(), len, prot) };
                if rc == 0 {
                    "ok".to_owned()
                } else {
                    format!(
                        "err {}",
                        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
                    )
                }
            }
            "notify" => {
                let port = self.chans[w[3]].local_port();
                let r = if let Some(s) = self.shares.get_mut(w[1]) {
                    s.set_unmap_notify(n(2), port)
                } else {
                    self.maps
                        .get_mut(w[1])
                        .unwrap()
                        .set_unmap_notify(n(2), port)
                };
                match r {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => err_reply(&e),
                }
            }
            "unbound" => {
                use evtchn::Backend as _;
                let c = self.events.bind_unbound(n(2) as u16).unwrap();
                let port = c.local_port();
                self.chans.insert(w[1].to_owned(), c);
                format!("ok {port}")
            }
            "bind" => {
                use evtchn::Backend as _;
                let c = self
                    .events
                    .bind_interdomain(n(2) as u16, n(3) as u32)
                    .unwrap();
                // The bind wakes the binder once; take that wake-up.
                while c.consume_pending().unwrap() {}
                self.chans.insert(w[1].to_owned(), c);
                "ok".to_owned()
            }
            "pending" => format!("ok {}", self.chans[w[1]].consume_pending().unwrap()),
            "wait" => {
                // wait CHAN MS MEM OFF: wait for an event, then report the
                // byte as it is once the event has been seen.
                let got = self.chans[w[1]]
                    .wait_timeout(Duration::from_millis(n(2) as u64))
                    .unwrap();
                if !got {
                    return "timeout".to_owned();
                }
                let (p, len) = self.mem(w[3]);
                assert!(n(4) < len);
                // SAFETY: inside our mapping (checked); a volatile read.
                format!("ok {}", unsafe { p.add(n(4)).read_volatile() })
            }
            other => format!("unknown command {other}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The tests

#[test]
fn two_processes_share_map_write_and_read() {
    let setup = Setup::new();
    let mut a = setup.peer(1);
    let mut b = setup.peer(2);
    let refs = a.ok("share s 2 2 rw");
    a.ok("zero s");
    a.ok("fill s 10");
    b.ok(&format!("map m 1 rw {refs}"));
    b.ok("check m 10");
    b.ok("poke m 4097 238");
    assert_eq!(a.ok("peek s 4097"), "238");
    a.ok("poke s 3 77");
    assert_eq!(b.ok("peek m 3"), "77");
}

#[test]
fn pages_start_zeroed_on_both_sides() {
    let setup = Setup::new();
    let mut a = setup.peer(1);
    let mut b = setup.peer(2);
    let refs = a.ok("share s 2 3 rw");
    b.ok(&format!("map m 1 ro {refs}"));
    b.ok("zero m");
    a.ok("zero s");
}

#[test]
fn read_only_shares_cannot_be_mapped_or_written_read_write() {
    let setup = Setup::new();
    let mut a = setup.peer(1);
    let mut b = setup.peer(2);
    let refs = a.ok("share s 2 1 ro");
    a.ok("poke s 5 1");
    assert_eq!(b.err(&format!("map w 1 rw {refs}")), libc::EINVAL);
    b.ok(&format!("map m 1 ro {refs}"));
    assert_eq!(b.ok("peek m 5"), "1");
    b.ok("unbound c 1");
    assert_eq!(b.err("notify m 20 c"), libc::EINVAL);
    // The mapper holds a read-only descriptor: it cannot even make the
    // mapping writable, and a write faults.
    assert_eq!(b.err("mprotect m"), libc::EACCES);
    let sig = b.dies_of("poke m 5 9");
    assert!(
        sig == Some(libc::SIGSEGV) || sig == Some(libc::SIGBUS),
        "{sig:?}"
    );
    assert_eq!(a.ok("peek s 5"), "1");

    // A writable share mapped read-only is read-only too.
    let refs = a.ok("share t 2 1 rw");
    let mut b = setup.peer(2);
    b.ok(&format!("map m 1 ro {refs}"));
    assert_eq!(b.err("mprotect m"), libc::EACCES);
}

#[test]
fn grants_are_refused_to_other_domains_even_domain_0() {
    let setup = Setup::new();
    let mut a = setup.peer(1);
    let refs = a.ok("share s 2 2 rw");
    for dom in [3, 0, 1] {
        let mut c = setup.peer(dom);
        assert_eq!(
            c.err(&format!("map m 1 ro {refs}")),
            libc::EINVAL,
            "dom {dom}"
        );
    }
    let mut b = setup.peer(2);
    // the wrong granting domain, a ref never granted, a mix
    assert_eq!(b.err(&format!("map m 3 rw {refs}")), libc::EINVAL);
    assert_eq!(b.err("map m 1 rw 77777"), libc::EINVAL);
    assert_eq!(b.err(&format!("map m 1 rw {refs},77777")), libc::EINVAL);
    b.ok(&format!("map m 1 rw {refs}"));
}

#[test]
fn a_ring_sized_share_of_257_pages_maps_in_one_call() {
    let setup = Setup::new();
    let mut a = setup.peer(1);
    let mut b = setup.peer(2);
    let refs = a.ok("share s 2 257 rw");
    assert_eq!(refs.split(',').count(), 257);
    a.ok("fill s 3");
    b.ok(&format!("map m 1 rw {refs}"));
    b.ok("check m 3");
    b.ok("fill m 100");
    a.ok("check s 100");
}

#[test]
fn the_per_domain_limit_is_1024_pages_and_orphans_do_not_count() {
    let setup = Setup::new();
    let mut a1 = setup.peer(1);
    let mut a2 = setup.peer(1);
    let mut other = setup.peer(5);
    let mut b = setup.peer(2);
    let big = a1.ok("share s 2 1000 rw");
    // The limit covers every process of the domain.
    a2.ok("share t 2 24 rw");
    assert_eq!(a2.err("share u 2 1 rw"), libc::ENOSPC);
    assert_eq!(a2.err("share u 2 1025 rw"), libc::ENOSPC);
    // Another domain has its own.
    other.ok("share s 2 1024 rw");
    assert_eq!(other.err("share t 2 1 rw"), libc::ENOSPC);
    // A single request above the limit fails and takes nothing.
    other.ok("drop s");
    assert_eq!(other.err("share t 2 1025 rw"), libc::ENOSPC);
    other.ok("share t 2 1024 rw");

    // Released by the sharer but still mapped by the peer: not counted.
    a1.ok("fill s 7");
    b.ok(&format!("map m 1 rw {big}"));
    a1.ok("drop s");
    a2.ok("share u 2 1000 rw");
    b.ok("check m 7");
    assert_eq!(a2.err("share v 2 1 rw"), libc::ENOSPC);
}

/// Sharer side: the sharer sets the notify on its own port; when it drops
/// its pages (or is killed), the mapper sees the byte cleared and then the
/// event. The grant stays mappable while mapped, and is refused after the
/// last unmap.
fn sharer_notify(kill: bool) {
    let setup = Setup::new();
    let mut a = setup.peer(1);
    let mut b = setup.peer(2);
    let pa = a.ok("unbound c 2");
    let refs = a.ok("share s 2 2 rw");
    a.ok("notify s 21 c");
    a.ok("poke s 21 165");
    b.ok(&format!("map m 1 rw {refs}"));
    b.ok(&format!("bind c 1 {pa}"));
    assert_eq!(b.ok("peek m 21"), "165");
    assert_eq!(b.ok("pending c"), "false");

    if kill {
        a.kill();
    } else {
        a.ok("drop s");
    }
    // The event arrives, and by then the byte is 0.
    assert_eq!(b.ok("wait c 10000 m 21"), "0");

    // The mapping still works, and the grant can be mapped again.
    b.ok("poke m 100 200");
    b.ok(&format!("map m2 1 rw {refs}"));
    assert_eq!(b.ok("peek m2 100"), "200");
    b.ok("drop m");
    b.ok("drop m2");
    assert_eq!(b.err(&format!("map m3 1 ro {refs}")), libc::EINVAL);
    assert_eq!(setup.wait_idle(), gnttab::local::HubStats::default());
    // Exactly one event: the end of the sharer's connection after its
    // release did not fire a second one.
    assert_eq!(b.ok("pending c"), "false");
}

#[test]
fn sharer_unmap_notify_on_drop() {
    sharer_notify(false);
}

#[test]
fn sharer_unmap_notify_on_sigkill() {
    sharer_notify(true);
}

/// Mapper side: the mapper sets the notify on its own port; when it drops
/// its mapping (or is killed), the sharer sees the byte cleared and then
/// the event.
fn mapper_notify(kill: bool) {
    let setup = Setup::new();
    let mut a = setup.peer(1);
    let mut b = setup.peer(2);
    let refs = a.ok("share s 2 2 rw");
    b.ok(&format!("map m 1 rw {refs}"));
    let pb = b.ok("unbound c 1");
    b.ok("notify m 4116 c");
    a.ok(&format!("bind c 2 {pb}"));
    a.ok("poke s 4116 1");
    assert_eq!(a.ok("pending c"), "false");

    if kill {
        b.kill();
    } else {
        b.ok("drop m");
    }
    assert_eq!(a.ok("wait c 10000 s 4116"), "0");
    // Exactly one event, also once the hub has seen the mapper's
    // connection end.
    let s = setup.wait_for(|s| s.connections == 1 && s.maps == 0);
    assert_eq!((s.connections, s.maps), (1, 0));
    assert_eq!(a.ok("pending c"), "false");
    // The sharer's pages are still its own.
    a.ok("poke s 4116 2");
    assert_eq!(a.ok("peek s 4116"), "2");
}

#[test]
fn mapper_unmap_notify_on_drop() {
    mapper_notify(false);
}

#[test]
fn mapper_unmap_notify_on_sigkill() {
    mapper_notify(true);
}

/// The memfds of this test's hub show up in `/proc/self/fd` and
/// `/proc/self/maps` under a name that contains the directory's name.
fn memfds_of(dir: &Path) -> Vec<String> {
    let tag = dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy().into_owned();
            if t.contains("memfd:gnttab") && t.contains(&tag) {
                found.push(t);
            }
        }
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    found.extend(
        maps.lines()
            .filter(|l| l.contains("memfd:gnttab") && l.contains(&tag))
            .map(str::to_owned),
    );
    found
}

#[test]
fn nothing_is_left_behind_when_both_sides_are_gone() {
    let setup = Setup::new();
    let dir = setup.dir.path().to_owned();
    let shm_before: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    {
        let mut a = setup.peer(1);
        let mut b = setup.peer(2);
        let pa = a.ok("unbound c 2");
        let refs = a.ok("share s 2 3 rw");
        a.ok("notify s 0 c");
        let more = a.ok("share t 2 1 ro");
        b.ok(&format!("map m 1 rw {refs}"));
        b.ok(&format!("map n 1 ro {more}"));
        b.ok(&format!("bind c 1 {pa}"));
        // The hub holds the memory while they live.
        assert!(!memfds_of(&dir).is_empty());
        a.kill();
        b.ok("drop n");
        b.kill();
    }
    assert_eq!(setup.wait_idle(), gnttab::local::HubStats::default());
    assert_eq!(memfds_of(&dir), Vec::<String>::new());
    let shm_after: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    for name in shm_after {
        assert!(
            shm_before.contains(&name) || !name.to_string_lossy().contains("gnttab"),
            "{name:?} left in /dev/shm"
        );
    }
    // Only the hubs' sockets are in the directory, and ours goes at shutdown.
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(name.ends_with(".sock"), "{name} left in the directory");
    }
    setup.grants.shutdown();
    assert!(!dir.join("gnttab.sock").exists());
}
