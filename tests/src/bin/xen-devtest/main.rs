//! `xen-devtest`: our device backends against the real Xen devices, across
//! two domains. Run by `cargo xtask lab test` (phase `devtest`); both sides
//! run the same ordered list of checks and meet in xenstore.
//!
//! ```text
//! xen-devtest a|b PEER TAG [--third DOMID] [--xenstored o|c] [--only CHECK,...]
//! xen-devtest child-share PEER OFFSET             (internal: a sharer to SIGKILL)
//! xen-devtest child-map GRANTER REF PORT OFFSET   (internal: a mapper to SIGKILL)
//! xen-devtest probe-peer DOMID [REF]              (IS_DOMAIN_INTRODUCED, a read of /local/domain/DOMID,
//!                                                  event-channel and grant probes of DOMID)
//! xen-devtest watch-release SECS                  (print @releaseDomain events)
//! ```
//!
//! Side `a` shares pages and binds unbound ports; side `b` maps and binds
//! interdomain. `PEER` is the other side's domain id, `TAG` names this run
//! (its xenstore mailbox is `/local/domain/<self>/data/devtest/<TAG>`, each
//! node readable by the peer only), `--third` a domain the grants and ports
//! do not name (default: our own id), `--xenstored` which daemon runs (for
//! the missing-node errno, docs/vchan.md §16 row 9c).
//!
//! Output: one line per check, `ok - NAME` or `not ok - NAME: WHY`, notes as
//! `# NAME: ...`, then a summary; exit status 0 only if every check passed.
//! A side that fails a check leaves `<check>-failed` in its mailbox, so that
//! the other side stops waiting for it at once.
//!
//! Checks (docs/vchan.md §6, §7, §8 and the table of §16):
//!
//! | name | what |
//! |---|---|
//! | `xs-basic` | domid, domain path, write/read (relative and absolute), directory, mkdir, perms get/set, rm, ENOENT |
//! | `xs-tx` | isolation before commit, commit, abort, conflict → EAGAIN, `Xs::transaction` retries |
//! | `xs-watch` | registration event, change events, unwatch, `@releaseDomain` |
//! | `xs-perms` | the peer reads a node granted `r`, not an ungranted one (EACCES) nor writes; missing-node errno per daemon |
//! | `xs-introduced` | (probe) whether `XS_IS_DOMAIN_INTRODUCED` answers here; if it does, the answers must be right |
//! | `evt-bind-notify` | bind unbound/interdomain, the binder's bind wake-up, notify both ways, N notifies → 1 or 2 wake-ups |
//! | `evt-wrong-domain` | binding a port unbound towards another domain → EINVAL |
//! | `evt-peer-close` | a close shows nothing, notify still succeeds, the port can be bound again |
//! | `evt-status` | `EVTCHNOP_status` through privcmd: works in dom0, `None` where restricted |
//! | `gnt-share-map` | share 2 pages, map, read and write both ways |
//! | `gnt-ro` | a read-only share: RW map refused (EINVAL), RO map reads, CLEAR_BYTE notify on it refused |
//! | `gnt-wrong-domain` | mapping a grant made for another domain, or a ref never granted → refused |
//! | `gnt-257` | 257 pages shared and mapped in one go |
//! | `gnt-limit` | 1025 pages in one share → ENOSPC |
//! | `gnt-notify-drop` | sharer drops its pages: the mapper sees the byte cleared, then the event |
//! | `gnt-notify-kill` | sharer SIGKILLed: byte, then event; the mapping stays usable |
//! | `gnt-mapper-drop` | mapper drops its mapping: the sharer sees byte, then event |
//! | `gnt-mapper-kill` | mapper SIGKILLed: byte, then event |

use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use evtchn::{Backend as _, EventChannel};
use gnttab::{Backend as _, MappedPages, SharedPages};
use xenstore::{NodePerm, Perm, Watcher, Xs};

// One file per device: the context and helpers all checks share stay here,
// with the table of checks and `main`.
mod evt;
mod gnt;
mod xs;

use evt::*;
use gnt::*;
use xs::*;

type R<T = ()> = Result<T, String>;

/// How long a side waits for the other's mailbox entry.
const MAILBOX_WAIT: Duration = Duration::from_secs(120);
/// How long an expected event may take (TCG on a busy host is slow).
const EVENT_WAIT: Duration = Duration::from_secs(20);
/// How long we watch for an event that must not come.
const QUIET_WAIT: Duration = Duration::from_millis(500);
/// The unmap-notify offsets (as xprobe used: 21 for the sharer, 20 for the
/// mapper).
const SHARER_NOTIFY: usize = 21;
const MAPPER_NOTIFY: usize = 20;
const ARMED: u8 = 0xA5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    A,
    B,
}

#[derive(Debug)]
struct Ctx {
    role: Role,
    me: u16,
    peer: u16,
    third: u16,
    xenstored: Option<String>,
    tag: String,
    xs: Xs,
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> R {
    if cond { Ok(()) } else { Err(what()) }
}

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Ctx {
    fn base(&self) -> String {
        format!("data/devtest/{}", self.tag)
    }

    fn peer_base(&self) -> String {
        format!("/local/domain/{}/data/devtest/{}", self.peer, self.tag)
    }

    fn note(&self, check: &str, msg: &str) {
        println!("# {check}: {msg}");
    }

    /// Puts `value` in our mailbox, readable by the peer only.
    fn put(&self, check: &str, key: &str, value: &str) -> R {
        let path = format!("{}/{check}-{key}", self.base());
        let perms = [
            NodePerm::new(self.me, Perm::None),
            NodePerm::new(self.peer, Perm::Read),
        ];
        self.xs
            .transaction(|t| {
                t.write(&path, value.as_bytes())?;
                t.set_perms(&path, &perms)
            })
            .map_err(|e| format!("mailbox put {path}: {e}"))
    }

    /// Waits for the peer's mailbox entry; fails at once if the peer has
    /// given up on this check.
    fn get(&self, check: &str, key: &str) -> R<String> {
        let path = format!("{}/{check}-{key}", self.peer_base());
        let failed = format!("{}/{check}-failed", self.peer_base());
        let deadline = Instant::now() + MAILBOX_WAIT;
        loop {
            match self.xs.read_string(&path) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_enoent() || e.is_eacces() => {}
                Err(e) => return Err(format!("mailbox get {path}: {e}")),
            }
            if let Ok(why) = self.xs.read_string(&failed) {
                return Err(format!("the peer failed this check: {why}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the peer did not write {path} within {}s",
                    MAILBOX_WAIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Raw access to a shared or mapped page range, for as long as the pages'
/// owner is borrowed.
#[derive(Debug, Clone, Copy)]
struct View<'a> {
    ptr: *mut u8,
    len: usize,
    _owner: PhantomData<&'a ()>,
}

impl<'a> View<'a> {
    fn shared(p: &'a dyn SharedPages) -> View<'a> {
        View {
            ptr: p.as_ptr(),
            len: p.len(),
            _owner: PhantomData,
        }
    }

    fn mapped(p: &'a dyn MappedPages) -> View<'a> {
        View {
            ptr: p.as_ptr(),
            len: p.len(),
            _owner: PhantomData,
        }
    }

    fn get(&self, off: usize) -> u8 {
        assert!(off < self.len, "offset {off} beyond {}", self.len);
        // The peer may change the byte at any time, hence a volatile read of
        // a raw pointer, no reference.
        // SAFETY: `off` is inside the mapping, which stays mapped while the borrowed owner lives ('a).
        unsafe { self.ptr.add(off).read_volatile() }
    }

    fn set(&self, off: usize, v: u8) {
        assert!(off < self.len, "offset {off} beyond {}", self.len);
        // SAFETY: as in `get`; callers only write to writable mappings.
        unsafe { self.ptr.add(off).write_volatile(v) }
    }

    fn set_u32(&self, off: usize, v: u32) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.set(off + i, b);
        }
    }

    fn get_u32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.get(off),
            self.get(off + 1),
            self.get(off + 2),
            self.get(off + 3),
        ])
    }
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(7).wrapping_add(1) & 0xff) as u8
}

fn fill_pattern(v: View<'_>) {
    for i in 0..v.len {
        v.set(i, pattern(i));
    }
}

/// Checks the pattern, skipping the offsets in `skip`.
fn check_pattern(v: View<'_>, skip: &[usize]) -> R {
    for i in 0..v.len {
        if skip.contains(&i) {
            continue;
        }
        let b = v.get(i);
        if b != pattern(i) {
            return Err(format!(
                "byte {i} is {b:#04x}, expected {:#04x}",
                pattern(i)
            ));
        }
    }
    Ok(())
}

fn refs_str(refs: &[u32]) -> String {
    refs.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_refs(s: &str) -> R<Vec<u32>> {
    s.split(',')
        .map(|r| r.parse().map_err(|_| format!("bad ref {r:?}")))
        .collect()
}

fn parse_num<T: std::str::FromStr>(s: &str, what: &str) -> R<T> {
    s.trim()
        .parse()
        .map_err(|_| format!("{what}: {s:?} is not a number"))
}

/// Waits for one event and returns whether it came.
fn got_event(ch: &dyn EventChannel, d: Duration) -> R<bool> {
    ch.wait_timeout(d).map_err(e2s)
}

/// Consumes events until `QUIET_WAIT` passes without one; returns how many.
fn drain(ch: &dyn EventChannel) -> R<u32> {
    let mut n = 0;
    while n < 100 && got_event(ch, QUIET_WAIT)? {
        n += 1;
    }
    Ok(n)
}

type Check = fn(&Ctx) -> R;

const CHECKS: &[(&str, Check)] = &[
    ("xs-basic", xs_basic),
    ("xs-tx", xs_tx),
    ("xs-watch", xs_watch),
    ("xs-perms", xs_perms),
    ("xs-introduced", xs_introduced),
    ("evt-bind-notify", evt_bind_notify),
    ("evt-wrong-domain", evt_wrong_domain),
    ("evt-peer-close", evt_peer_close),
    ("evt-status", evt_status),
    ("evt-two-sleepers", evt_two_sleepers),
    ("gnt-share-map", gnt_share_map),
    ("gnt-ro", gnt_ro),
    ("gnt-wrong-domain", gnt_wrong_domain),
    ("gnt-257", gnt_257),
    ("gnt-limit", gnt_limit),
    ("gnt-notify-drop", |c| gnt_notify_sharer(c, false)),
    ("gnt-notify-kill", |c| gnt_notify_sharer(c, true)),
    ("gnt-mapper-drop", |c| gnt_notify_mapper(c, false)),
    ("gnt-mapper-kill", |c| gnt_notify_mapper(c, true)),
];

fn usage() -> ExitCode {
    eprintln!(
        "usage: xen-devtest a|b PEER TAG [--third DOMID] [--xenstored o|c] [--only CHECK,...]\n\
         checks: {}",
        CHECKS.iter().map(|c| c.0).collect::<Vec<_>>().join(" ")
    );
    ExitCode::from(2)
}

/// Both sides leave; each removes its own mailbox once the other has read
/// everything it needs.
fn finish(c: &Ctx) -> R {
    const K: &str = "end";
    match c.role {
        Role::A => {
            c.put(K, "a", "1")?;
            c.get(K, "b")?;
        }
        Role::B => {
            c.get(K, "a")?;
            c.put(K, "b", "1")?;
            // Wait until A has removed its mailbox (it has read ours then).
            let a_end = format!("{}/{K}-a", c.peer_base());
            let t = Instant::now();
            while c.xs.read(&a_end).is_ok() && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    c.xs.rm(&c.base()).map_err(e2s)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("child-share") => {
            return match child_share(&args[1..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    println!("ERROR {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some("probe-peer") => {
            return match probe_peer(&args[1..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    println!("ERROR {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some("watch-release") => {
            return match watch_release(&args[1..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    println!("ERROR {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some("child-map") => {
            return match child_map(&args[1..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    println!("ERROR {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let mut pos = Vec::new();
    let mut third = None;
    let mut xenstored = None;
    let mut only: Option<Vec<String>> = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--third" => third = it.next().and_then(|s| s.parse::<u16>().ok()),
            "--xenstored" => xenstored = it.next(),
            "--only" => only = it.next().map(|s| s.split(',').map(String::from).collect()),
            _ => pos.push(a),
        }
    }
    let [role, peer, tag] = pos.as_slice() else {
        return usage();
    };
    let role = match role.as_str() {
        "a" => Role::A,
        "b" => Role::B,
        _ => return usage(),
    };
    let Ok(peer) = peer.parse::<u16>() else {
        return usage();
    };
    let xs = match Xs::open() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("xen-devtest: {e}");
            return ExitCode::FAILURE;
        }
    };
    let me = match xs.own_domid() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("xen-devtest: own domid: {e}");
            return ExitCode::FAILURE;
        }
    };
    let c = Ctx {
        role,
        me,
        peer,
        third: third.unwrap_or(me),
        xenstored,
        tag: tag.clone(),
        xs,
    };
    let side = if role == Role::A { "a" } else { "b" };
    println!(
        "# xen-devtest {side}: dom{me} with peer dom{peer}, third dom{}, tag {}",
        c.third, c.tag
    );
    let (mut pass, mut fail) = (0, 0);
    for (name, f) in CHECKS {
        if only.as_ref().is_some_and(|o| !o.iter().any(|x| x == name)) {
            continue;
        }
        let t = Instant::now();
        match f(&c) {
            Ok(()) => {
                pass += 1;
                println!("ok - {name} ({:.1}s)", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                fail += 1;
                println!("not ok - {name}: {e}");
                let short: String = e.chars().take(1000).collect();
                let _ = c.put(name, "failed", &short);
            }
        }
        let _ = std::io::stdout().flush();
    }
    if let Err(e) = finish(&c) {
        println!("# cleanup: {e}");
    }
    println!("# xen-devtest {side} dom{me}: {pass} passed, {fail} failed");
    if fail == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
