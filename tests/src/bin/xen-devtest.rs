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
        // SAFETY: `off` is inside the mapping, which stays mapped while the
        // borrowed owner lives ('a); the peer may change the byte at any
        // time, hence a volatile read of a raw pointer, no reference.
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

// ---------------------------------------------------------------------------
// xenstore

fn xs_basic(c: &Ctx) -> R {
    let xs = &c.xs;
    let me = xs.own_domid().map_err(e2s)?;
    ensure(me == c.me, || format!("own_domid {me} != {}", c.me))?;
    let dp = xs.get_domain_path(me).map_err(e2s)?;
    ensure(dp == format!("/local/domain/{me}"), || {
        format!("get_domain_path = {dp:?}")
    })?;
    let d = format!("{}/local", c.base());
    let x = format!("{d}/x");
    xs.write(&x, b"hello").map_err(e2s)?;
    let v = xs.read_string(&x).map_err(e2s)?;
    ensure(v == "hello", || format!("read back {v:?}"))?;
    let abs = format!("/local/domain/{me}/{x}");
    let v = xs.read(&abs).map_err(e2s)?;
    ensure(v == b"hello", || format!("absolute read {v:?}"))?;
    let perms = xs.get_perms(&x).map_err(e2s)?;
    ensure(perms.first().map(|p| p.dom) == Some(me), || {
        format!("owner of a new node: {perms:?}")
    })?;
    let want = [
        NodePerm::new(me, Perm::None),
        NodePerm::new(c.peer, Perm::Read),
    ];
    xs.set_perms(&x, &want).map_err(e2s)?;
    let got = xs.get_perms(&x).map_err(e2s)?;
    ensure(got == want, || format!("set_perms then get_perms: {got:?}"))?;
    xs.mkdir(&format!("{d}/sub")).map_err(e2s)?;
    let v = xs.read(&format!("{d}/sub")).map_err(e2s)?;
    ensure(v.is_empty(), || format!("mkdir'd node has value {v:?}"))?;
    let mut names = xs.directory(&d).map_err(e2s)?;
    names.sort();
    ensure(names == ["sub", "x"], || format!("directory: {names:?}"))?;
    xs.rm(&x).map_err(e2s)?;
    match xs.read(&x) {
        Err(e) if e.is_enoent() => {}
        other => return Err(format!("read after rm: {other:?}")),
    }
    match xs.read(&format!("{d}/never")) {
        Err(e) if e.is_enoent() => {}
        other => return Err(format!("read of a missing node: {other:?}")),
    }
    xs.rm(&d).map_err(e2s)?;
    Ok(())
}

fn xs_tx(c: &Ctx) -> R {
    let xs = &c.xs;
    let d = format!("{}/tx", c.base());
    let (p1, p2, p3) = (format!("{d}/one"), format!("{d}/two"), format!("{d}/three"));
    xs.mkdir(&d).map_err(e2s)?;
    // Isolation, then commit.
    let t = xs.begin().map_err(e2s)?;
    t.write(&p1, b"1").map_err(e2s)?;
    let inside = t.read_string(&p1).map_err(e2s)?;
    ensure(inside == "1", || {
        format!("read inside the transaction: {inside:?}")
    })?;
    match xs.read(&p1) {
        Err(e) if e.is_enoent() => {}
        other => return Err(format!("uncommitted write visible outside: {other:?}")),
    }
    t.commit().map_err(e2s)?;
    let v = xs.read_string(&p1).map_err(e2s)?;
    ensure(v == "1", || format!("after commit: {v:?}"))?;
    // Abort.
    let t = xs.begin().map_err(e2s)?;
    t.write(&p2, b"2").map_err(e2s)?;
    t.abort().map_err(e2s)?;
    match xs.read(&p2) {
        Err(e) if e.is_enoent() => {}
        other => return Err(format!("aborted write visible: {other:?}")),
    }
    // Conflict: another connection writes what the transaction read.
    let xs2 = Xs::open().map_err(e2s)?;
    let t = xs.begin().map_err(e2s)?;
    let _ = t.read(&p1).map_err(e2s)?;
    t.write(&p1, b"from-tx").map_err(e2s)?;
    xs2.write(&p1, b"outside").map_err(e2s)?;
    match t.commit() {
        Err(e) if e.is_eagain() => {}
        other => return Err(format!("conflicting commit: {other:?}, expected EAGAIN")),
    }
    let v = xs.read_string(&p1).map_err(e2s)?;
    ensure(v == "outside", || format!("after the conflict: {v:?}"))?;
    // The retry loop.
    xs.write(&p3, b"0").map_err(e2s)?;
    let mut attempts = 0;
    xs.transaction(|t| {
        attempts += 1;
        let _ = t.read(&p3)?;
        if attempts == 1 {
            xs2.write(&p3, b"bump")?;
        }
        t.write(&p3, b"tx")
    })
    .map_err(e2s)?;
    ensure(attempts >= 2, || {
        format!("Xs::transaction ran {attempts} time(s) despite a conflict")
    })?;
    let v = xs.read_string(&p3).map_err(e2s)?;
    ensure(v == "tx", || {
        format!("after the retried transaction: {v:?}")
    })?;
    c.note(
        "xs-tx",
        &format!("the conflicting transaction ran {attempts} times"),
    );
    xs.rm(&d).map_err(e2s)?;
    Ok(())
}

fn xs_watch(c: &Ctx) -> R {
    let xs = &c.xs;
    let p = format!("{}/w", c.base());
    xs.write(&p, b"0").map_err(e2s)?;
    let w = Watcher::open().map_err(e2s)?;
    w.watch(&p, "tok").map_err(e2s)?;
    let first = w
        .next_event_timeout(EVENT_WAIT)
        .map_err(e2s)?
        .ok_or("no registration event")?;
    ensure(first.token == "tok" && first.path == p, || {
        format!("registration event {first:?}")
    })?;
    let expect_event = |what: &str, want_path: &str| -> R {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = w
                .next_event_timeout(left)
                .map_err(e2s)?
                .ok_or_else(|| format!("no event after {what}"))?;
            if ev.token == "tok" && ev.path == want_path {
                return Ok(());
            }
        }
    };
    xs.write(&format!("{p}/child"), b"1").map_err(e2s)?;
    expect_event("writing a child", &format!("{p}/child"))?;
    xs.write(&p, b"2").map_err(e2s)?;
    expect_event("writing the node", &p)?;
    xs.rm(&format!("{p}/child")).map_err(e2s)?;
    expect_event("removing the child", &format!("{p}/child"))?;
    w.unwatch(&p, "tok").map_err(e2s)?;
    while w.try_next_event().map_err(e2s)?.is_some() {}
    xs.write(&p, b"3").map_err(e2s)?;
    if let Some(ev) = w.next_event_timeout(QUIET_WAIT).map_err(e2s)? {
        return Err(format!("event after unwatch: {ev:?}"));
    }
    w.watch("@releaseDomain", "rel").map_err(e2s)?;
    let ev = w
        .next_event_timeout(EVENT_WAIT)
        .map_err(e2s)?
        .ok_or("no registration event for @releaseDomain")?;
    ensure(ev.path == "@releaseDomain" && ev.token == "rel", || {
        format!("@releaseDomain registration: {ev:?}")
    })?;
    xs.rm(&p).map_err(e2s)?;
    Ok(())
}

fn xs_perms(c: &Ctx) -> R {
    const K: &str = "xs-perms";
    let xs = &c.xs;
    match c.role {
        Role::A => {
            xs.write(&format!("{}/private", c.base()), b"p")
                .map_err(e2s)?;
            c.put(K, "shared", "s")?;
            c.put(K, "ready", "1")?;
            c.get(K, "done")?;
            xs.rm(&format!("{}/private", c.base())).map_err(e2s)?;
            Ok(())
        }
        Role::B => {
            c.get(K, "ready")?;
            let pb = c.peer_base();
            let privileged = c.me == 0;
            let private = xs.read(&format!("{pb}/private"));
            if privileged {
                ensure(private.is_ok(), || {
                    format!("dom0 reads a private node: {private:?}")
                })?;
            } else {
                ensure(private.as_ref().is_err_and(|e| e.is_eacces()), || {
                    format!("reading the peer's private node: {private:?}, expected EACCES")
                })?;
            }
            let shared = format!("{pb}/{K}-shared");
            let v = xs.read_string(&shared).map_err(e2s)?;
            ensure(v == "s", || format!("shared node reads {v:?}"))?;
            let perms = xs.get_perms(&shared).map_err(e2s)?;
            let want = [
                NodePerm::new(c.peer, Perm::None),
                NodePerm::new(c.me, Perm::Read),
            ];
            ensure(perms == want, || {
                format!("perms of the shared node: {perms:?}")
            })?;
            let w = xs.write(&shared, b"mine");
            if privileged {
                ensure(w.is_ok(), || format!("dom0 writes the peer's node: {w:?}"))?;
                xs.write(&shared, b"s").map_err(e2s)?;
            } else {
                ensure(w.as_ref().is_err_and(|e| e.is_eacces()), || {
                    format!("writing a node granted r: {w:?}, expected EACCES")
                })?;
            }
            let dir = xs.directory(&pb);
            if !privileged {
                ensure(dir.as_ref().is_err_and(|e| e.is_eacces()), || {
                    format!("listing the peer's mailbox: {dir:?}, expected EACCES")
                })?;
            }
            let missing = xs.read(&format!("{pb}/never-written"));
            let errno = match &missing {
                Err(e) if e.is_enoent() => "ENOENT",
                Err(e) if e.is_eacces() => "EACCES",
                _ => return Err(format!("reading a missing node: {missing:?}")),
            };
            let expected = match (privileged, c.xenstored.as_deref()) {
                (true, _) | (false, Some("o")) => Some("ENOENT"),
                (false, Some("c")) => Some("EACCES"),
                _ => None,
            };
            c.note(K, &format!("a missing node of the peer: {errno}"));
            if let Some(want) = expected {
                ensure(errno == want, || {
                    format!(
                        "a missing node of the peer: {errno}, expected {want} (docs/vchan.md §16 row 9c)"
                    )
                })?;
            }
            c.put(K, "done", "1")
        }
    }
}

/// `XS_IS_DOMAIN_INTRODUCED` on a fresh connection (our `Xs` has no method
/// for it): `Ok(Ok(true/false))`, or `Ok(Err(errno name))` if the daemon
/// refuses.
fn is_introduced(dom: u16) -> R<Result<bool, String>> {
    use std::io::Read;
    use xenstore::wire::{FrameReader, Message, MsgType, parse_error_reply};
    let sock = std::path::Path::new("/run/xenstored/socket");
    let mut conn: Box<dyn ReadWrite> = if sock.exists() {
        Box::new(std::os::unix::net::UnixStream::connect(sock).map_err(e2s)?)
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/xen/xenbus")
                .map_err(e2s)?,
        )
    };
    let arg = format!("{dom}\0");
    let msg = Message::new(MsgType::IsDomainIntroduced, 7, 0, arg.into_bytes()).map_err(e2s)?;
    conn.write_all(&msg.to_bytes()).map_err(e2s)?;
    let mut fr = FrameReader::new();
    let mut buf = [0u8; 256];
    let reply = loop {
        if let Some(m) = fr.next_message().map_err(e2s)? {
            break m;
        }
        let n = conn.read(&mut buf).map_err(e2s)?;
        if n == 0 {
            return Err("xenstored closed the connection".into());
        }
        fr.feed(&buf[..n]);
    };
    match reply.header.msg_type() {
        Some(MsgType::Error) => Ok(Err(parse_error_reply(&reply.payload)
            .map(|e| e.to_string())
            .map_err(e2s)?)),
        Some(MsgType::IsDomainIntroduced) => match reply.payload.as_slice() {
            b"T\0" | b"T" => Ok(Ok(true)),
            b"F\0" | b"F" => Ok(Ok(false)),
            p => Err(format!("IS_DOMAIN_INTRODUCED answered {p:?}")),
        },
        t => Err(format!("IS_DOMAIN_INTRODUCED: reply type {t:?}")),
    }
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

fn fmt_introduced(r: &Result<bool, String>) -> String {
    match r {
        Ok(true) => "T".into(),
        Ok(false) => "F".into(),
        Err(e) => format!("refused ({e})"),
    }
}

/// Informational: can this domain ask xenstored whether a domain exists?
/// (A liveness test that works where reading `/local/domain/<peer>` cannot
/// tell a missing domain from an unreadable one: C xenstored in a domU.)
fn xs_introduced(c: &Ctx) -> R {
    const K: &str = "xs-introduced";
    let me = is_introduced(c.me)?;
    let peer = is_introduced(c.peer)?;
    let none = is_introduced(30000)?;
    c.note(
        K,
        &format!(
            "IS_DOMAIN_INTRODUCED self {}, peer {}, dom30000 {}",
            fmt_introduced(&me),
            fmt_introduced(&peer),
            fmt_introduced(&none)
        ),
    );
    if let (Ok(p), Ok(n)) = (&peer, &none) {
        ensure(*p && !*n, || {
            format!("peer {p}, missing domain {n}: expected true, false")
        })?;
    }
    Ok(())
}

/// `watch-release SECS`: waits at most SECS seconds for an `@releaseDomain`
/// event after the registration one, and prints when it came (does a
/// domain hear of other domains' deaths, and when?).
fn watch_release(args: &[String]) -> R {
    let [secs] = args else {
        return Err("watch-release SECS".into());
    };
    let secs: u64 = parse_num(secs, "SECS")?;
    let w = Watcher::open().map_err(e2s)?;
    w.watch("@releaseDomain", "rel").map_err(e2s)?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut n = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match w.next_event_timeout(left).map_err(e2s)? {
            Some(ev) => {
                n += 1;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                println!("event {n} at {now}: {} ({})", ev.path, ev.token);
                let _ = std::io::stdout().flush();
                if n >= 2 {
                    return Ok(());
                }
            }
            None => break,
        }
    }
    println!("no @releaseDomain event in {secs}s after the registration");
    Ok(())
}

/// `probe-peer DOMID [REF]`: what a domain can learn about another's
/// existence (REF: a grant of DOMID's to map afresh).
fn probe_peer(args: &[String]) -> R {
    let [dom, rest @ ..] = args else {
        return Err("probe-peer DOMID [REF]".into());
    };
    let dom: u16 = parse_num(dom, "DOMID")?;
    println!(
        "is_domain_introduced({dom}) = {}",
        fmt_introduced(&is_introduced(dom)?)
    );
    let xs = Xs::open().map_err(e2s)?;
    let r = match xs.read(&format!("/local/domain/{dom}")) {
        Ok(_) => "readable".to_string(),
        Err(e) => e.errno().map_or_else(|| e.to_string(), |n| n.to_string()),
    };
    println!("read /local/domain/{dom} = {r}");
    // Event-channel probe: Xen looks the remote domain up first (ESRCH when
    // there is none) and port 0 is never unbound (EINVAL).
    let r = match evtchn::Xen.bind_interdomain(dom, 0) {
        Ok(ch) => format!("BOUND port {} (unbound again)", ch.local_port()),
        Err(e) => e.errno().map_or_else(|| e.to_string(), |n| n.to_string()),
    };
    println!("evtchn bind_interdomain({dom}, 0) = {r}");
    let r = match evtchn::Xen.bind_unbound(dom) {
        Ok(ch) => format!("ok (port {})", ch.local_port()),
        Err(e) => e.errno().map_or_else(|| e.to_string(), |n| n.to_string()),
    };
    println!("evtchn bind_unbound({dom}) = {r}");
    if let Some(gref) = rest.first() {
        let gref: u32 = parse_num(gref, "REF")?;
        let r = match gnttab::Xen.map(dom, &[gref], false) {
            Ok(_) => "mapped".to_string(),
            Err(e) => e.raw_os_error().map_or_else(
                || e.to_string(),
                |n| nix::errno::Errno::from_raw(n).to_string(),
            ),
        };
        println!("gnttab map({dom}, ref {gref}, ro) = {r}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// event channels

fn evt_bind_notify(c: &Ctx) -> R {
    const K: &str = "evt-bind-notify";
    match c.role {
        Role::A => {
            let ch = evtchn::Xen.bind_unbound(c.peer).map_err(e2s)?;
            ensure(!ch.consume_pending().map_err(e2s)?, || {
                "a fresh unbound port has an event".into()
            })?;
            c.put(K, "port", &ch.local_port().to_string())?;
            c.get(K, "bound")?;
            ensure(!got_event(&*ch, QUIET_WAIT)?, || {
                "the peer's bind woke the unbound side".into()
            })?;
            c.put(K, "quiet", "1")?;
            ensure(got_event(&*ch, EVENT_WAIT)?, || {
                "no event from the peer's notify".into()
            })?;
            ch.notify().map_err(e2s)?;
            c.put(K, "notified", "1")?;
            c.get(K, "burst")?;
            std::thread::sleep(Duration::from_millis(300));
            let n = drain(&*ch)?;
            c.note(K, &format!("5 back-to-back notifies gave {n} wake-up(s)"));
            ensure((1..=2).contains(&n), || {
                format!("5 notifies gave {n} wake-ups, expected 1 or 2")
            })?;
            c.put(K, "counted", "1")
        }
        Role::B => {
            let port: u32 = parse_num(&c.get(K, "port")?, "port")?;
            let ch = evtchn::Xen.bind_interdomain(c.peer, port).map_err(e2s)?;
            ensure(got_event(&*ch, EVENT_WAIT)?, || {
                "the interdomain bind did not wake the binder".into()
            })?;
            c.put(K, "bound", "1")?;
            c.get(K, "quiet")?;
            ch.notify().map_err(e2s)?;
            c.get(K, "notified")?;
            ensure(got_event(&*ch, EVENT_WAIT)?, || {
                "no event from the peer's notify".into()
            })?;
            for _ in 0..5 {
                ch.notify().map_err(e2s)?;
            }
            c.put(K, "burst", "1")?;
            c.get(K, "counted").map(drop)
        }
    }
}

fn evt_wrong_domain(c: &Ctx) -> R {
    const K: &str = "evt-wrong-domain";
    match c.role {
        Role::A => {
            let ch = evtchn::Xen.bind_unbound(c.third).map_err(e2s)?;
            c.put(K, "port", &ch.local_port().to_string())?;
            c.get(K, "done").map(drop)
        }
        Role::B => {
            let port: u32 = parse_num(&c.get(K, "port")?, "port")?;
            let r = evtchn::Xen.bind_interdomain(c.peer, port);
            let res = match r {
                Err(e) if e.errno() == Some(nix::errno::Errno::EINVAL) => Ok(()),
                Err(e) => Err(format!(
                    "binding a port meant for dom{}: {e}, expected EINVAL",
                    c.third
                )),
                Ok(_) => Err(format!("bound a port meant for dom{}", c.third)),
            };
            c.put(K, "done", "1")?;
            res
        }
    }
}

fn evt_peer_close(c: &Ctx) -> R {
    const K: &str = "evt-peer-close";
    match c.role {
        Role::A => {
            let ch = evtchn::Xen.bind_unbound(c.peer).map_err(e2s)?;
            c.put(K, "port", &ch.local_port().to_string())?;
            let bport: u32 = parse_num(&c.get(K, "bound")?, "port")?;
            drop(ch);
            c.put(K, "closed", "1")?;
            c.get(K, "checked")?;
            let again = evtchn::Xen
                .bind_interdomain(c.peer, bport)
                .map_err(|e| format!("binding again to the peer's port {bport}: {e}"))?;
            let _ = got_event(&*again, EVENT_WAIT)?; // our own bind wake-up
            again.notify().map_err(e2s)?;
            c.put(K, "rebound", "1")?;
            c.get(K, "done").map(drop)
        }
        Role::B => {
            let port: u32 = parse_num(&c.get(K, "port")?, "port")?;
            let ch = evtchn::Xen.bind_interdomain(c.peer, port).map_err(e2s)?;
            let _ = got_event(&*ch, EVENT_WAIT)?; // the bind wake-up
            c.put(K, "bound", &ch.local_port().to_string())?;
            c.get(K, "closed")?;
            let seen = got_event(&*ch, QUIET_WAIT)?;
            let notify = ch.notify();
            c.put(K, "checked", "1")?;
            ensure(!seen, || "the peer's close produced an event".into())?;
            notify.map_err(|e| format!("notify after the peer closed: {e}"))?;
            c.get(K, "rebound")?;
            let woke = got_event(&*ch, EVENT_WAIT)?;
            c.put(K, "done", "1")?;
            ensure(woke, || "no event from the re-bound peer port".into())
        }
    }
}

fn evt_status(c: &Ctx) -> R {
    const K: &str = "evt-status";
    let ch = evtchn::Xen.bind_unbound(c.peer).map_err(e2s)?;
    let st = ch.status().map_err(e2s)?;
    c.note(K, &format!("status of our unbound port: {st:?}"));
    if c.me == 0 {
        ensure(
            st == Some(evtchn::PortStatus::Unbound { remote: c.peer }),
            || {
                format!(
                    "dom0 status {st:?}, expected Unbound {{ remote: {} }}",
                    c.peer
                )
            },
        )?;
    } else if st.is_some() {
        ensure(
            st == Some(evtchn::PortStatus::Unbound { remote: c.peer }),
            || format!("status {st:?}, expected Unbound or None"),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// grant tables

fn gnt_share_map(c: &Ctx) -> R {
    const K: &str = "gnt-share-map";
    match c.role {
        Role::A => {
            let p = gnttab::Xen.share(c.peer, 2, true).map_err(e2s)?;
            let v = View::shared(&*p);
            ensure(v.len == 8192, || format!("len {}", v.len))?;
            fill_pattern(v);
            c.put(K, "refs", &refs_str(p.refs()))?;
            c.get(K, "written")?;
            let (a, b) = (v.get(100), v.get(4096 + 5));
            let r = ensure(a == 0x5A && b == 0xC3, || {
                format!("the peer's writes read back as {a:#04x} {b:#04x}")
            });
            c.put(K, "done", "1")?;
            r
        }
        Role::B => {
            let refs = parse_refs(&c.get(K, "refs")?)?;
            let m = gnttab::Xen.map(c.peer, &refs, true).map_err(e2s)?;
            let v = View::mapped(&*m);
            ensure(v.len == 8192 && m.writable(), || format!("len {}", v.len))?;
            let r = check_pattern(v, &[]);
            v.set(100, 0x5A);
            v.set(4096 + 5, 0xC3);
            c.put(K, "written", "1")?;
            c.get(K, "done")?;
            r
        }
    }
}

fn gnt_ro(c: &Ctx) -> R {
    const K: &str = "gnt-ro";
    match c.role {
        Role::A => {
            let p = gnttab::Xen.share(c.peer, 1, false).map_err(e2s)?;
            fill_pattern(View::shared(&*p));
            c.put(K, "refs", &refs_str(p.refs()))?;
            c.get(K, "done").map(drop)
        }
        Role::B => {
            let refs = parse_refs(&c.get(K, "refs")?)?;
            let r = (|| {
                match gnttab::Xen.map(c.peer, &refs, true) {
                    Err(gnttab::Error::MapRefused { source, .. })
                        if source.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(format!("RW map of an RO grant: {e}, expected EINVAL")),
                    Ok(_) => return Err("an RO grant was mapped read-write".into()),
                }
                let mut m = gnttab::Xen.map(c.peer, &refs, false).map_err(e2s)?;
                ensure(!m.writable(), || "RO map says writable".into())?;
                check_pattern(View::mapped(&*m), &[])?;
                let ch = evtchn::Xen.bind_unbound(c.peer).map_err(e2s)?;
                match m.set_unmap_notify(0, ch.local_port()) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
                    other => Err(format!(
                        "CLEAR_BYTE notify on an RO map: {other:?}, expected EINVAL"
                    )),
                }
            })();
            c.put(K, "done", "1")?;
            r
        }
    }
}

fn gnt_wrong_domain(c: &Ctx) -> R {
    const K: &str = "gnt-wrong-domain";
    let bad_ref = match c.role {
        Role::A => {
            let p = gnttab::Xen.share(c.third, 1, true).map_err(e2s)?;
            c.put(K, "refs", &refs_str(p.refs()))?;
            c.get(K, "done")?;
            return Ok(());
        }
        Role::B => 77777,
    };
    let refs = parse_refs(&c.get(K, "refs")?)?;
    let refused = |r: Result<Box<dyn MappedPages>, gnttab::Error>, what: &str| -> R {
        match r {
            Err(gnttab::Error::MapRefused { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                Ok(())
            }
            Err(e) => Err(format!("{what}: {e}, expected MapRefused/EINVAL")),
            Ok(_) => Err(format!("{what}: mapped")),
        }
    };
    let r = refused(
        gnttab::Xen.map(c.peer, &refs, true),
        &format!("RW map of a grant for dom{}", c.third),
    )
    .and_then(|()| {
        refused(
            gnttab::Xen.map(c.peer, &refs, false),
            &format!("RO map of a grant for dom{}", c.third),
        )
    })
    .and_then(|()| {
        refused(
            gnttab::Xen.map(c.peer, &[bad_ref], true),
            "map of a ref never granted",
        )
    });
    c.put(K, "done", "1")?;
    r
}

fn gnt_257(c: &Ctx) -> R {
    const K: &str = "gnt-257";
    const N: usize = 257;
    match c.role {
        Role::A => {
            let p = gnttab::Xen.share(c.peer, N, true).map_err(e2s)?;
            let v = View::shared(&*p);
            for k in 0..N {
                v.set_u32(k * 4096, k as u32 ^ 0x5EED_0000);
                v.set(k * 4096 + 4095, 0xEE);
            }
            c.put(K, "refs", &refs_str(p.refs()))?;
            c.get(K, "done").map(drop)
        }
        Role::B => {
            let refs = parse_refs(&c.get(K, "refs")?)?;
            let r = (|| {
                ensure(refs.len() == N, || format!("{} refs", refs.len()))?;
                let t = Instant::now();
                let m = gnttab::Xen.map(c.peer, &refs, true).map_err(e2s)?;
                c.note(K, &format!("mapped {N} pages in {:?}", t.elapsed()));
                let v = View::mapped(&*m);
                ensure(v.len == N * 4096, || format!("len {}", v.len))?;
                for k in 0..N {
                    let (w, e) = (v.get_u32(k * 4096), v.get(k * 4096 + 4095));
                    ensure(w == k as u32 ^ 0x5EED_0000 && e == 0xEE, || {
                        format!("page {k}: {w:#x} {e:#x}")
                    })?;
                }
                Ok(())
            })();
            c.put(K, "done", "1")?;
            r
        }
    }
}

fn gnt_limit(c: &Ctx) -> R {
    match gnttab::Xen.share(c.peer, 1025, true) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Ok(()),
        Err(e) => Err(format!("1025 pages: {e}, expected ENOSPC")),
        Ok(_) => Err("1025 pages were shared (limit 1024)".into()),
    }
}

/// Waits for the event that must follow the notify byte's clearing; the
/// byte must be clear by then.
fn expect_notify(ch: &dyn EventChannel, v: View<'_>, off: usize, who: &str) -> R {
    let t = Instant::now();
    let came = got_event(ch, EVENT_WAIT)?;
    let took = t.elapsed();
    let byte = v.get(off);
    ensure(came, || {
        format!(
            "no event within {}s after {who} (byte now {byte:#04x})",
            EVENT_WAIT.as_secs()
        )
    })?;
    ensure(byte == 0, || {
        format!("the event came but byte {off} is still {byte:#04x}")
    })?;
    let extra = drain(ch)?;
    println!(
        "# notify after {who}: event {took:?} after the peer said it was done, byte clear, \
         {extra} extra event(s)"
    );
    Ok(())
}

/// Kills a child process on every path.
#[derive(Debug)]
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(args: &[String]) -> R<(ChildGuard, Vec<String>)> {
    let exe = std::env::current_exe().map_err(e2s)?;
    let child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn child: {e}"))?;
    let mut g = ChildGuard(child);
    let out = g.0.stdout.take().ok_or("no child stdout")?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| format!("child: {e}"))?;
    let words: Vec<String> = line.split_whitespace().map(String::from).collect();
    if words.first().map(String::as_str) != Some("READY") {
        return Err(format!("child said {line:?}"));
    }
    Ok((g, words[1..].to_vec()))
}

fn gnt_notify_sharer(c: &Ctx, kill: bool) -> R {
    let k: &str = if kill {
        "gnt-notify-kill"
    } else {
        "gnt-notify-drop"
    };
    match c.role {
        Role::A => {
            if kill {
                let (mut child, w) = spawn_child(&[
                    "child-share".into(),
                    c.peer.to_string(),
                    SHARER_NOTIFY.to_string(),
                ])?;
                let [gref, port] = w.as_slice() else {
                    return Err(format!("child said {w:?}"));
                };
                c.put(k, "refs", gref)?;
                c.put(k, "port", port)?;
                c.get(k, "ready")?;
                child.0.kill().map_err(e2s)?;
                let st = child.0.wait().map_err(e2s)?;
                c.note(k, &format!("sharer child {st}"));
                c.put(k, "gone", "1")?;
            } else {
                let ch = evtchn::Xen.bind_unbound(c.peer).map_err(e2s)?;
                let mut p = gnttab::Xen.share(c.peer, 1, true).map_err(e2s)?;
                let v = View::shared(&*p);
                fill_pattern(v);
                v.set(SHARER_NOTIFY, ARMED);
                p.set_unmap_notify(SHARER_NOTIFY, ch.local_port())
                    .map_err(e2s)?;
                c.put(k, "refs", &refs_str(p.refs()))?;
                c.put(k, "port", &ch.local_port().to_string())?;
                c.get(k, "ready")?;
                drop(p);
                c.put(k, "gone", "1")?;
                c.get(k, "done")?;
                drop(ch);
                return Ok(());
            }
            c.get(k, "done").map(drop)
        }
        Role::B => {
            let refs = parse_refs(&c.get(k, "refs")?)?;
            let port: u32 = parse_num(&c.get(k, "port")?, "port")?;
            let ch = evtchn::Xen.bind_interdomain(c.peer, port).map_err(e2s)?;
            let _ = got_event(&*ch, EVENT_WAIT)?; // the bind wake-up
            let m = gnttab::Xen.map(c.peer, &refs, true).map_err(e2s)?;
            let v = View::mapped(&*m);
            let r = (|| {
                let b = v.get(SHARER_NOTIFY);
                ensure(b == ARMED, || format!("notify byte is {b:#04x} before"))?;
                c.put(k, "ready", "1")?;
                c.get(k, "gone")?;
                let who = if kill {
                    "the sharer's SIGKILL"
                } else {
                    "the sharer's drop"
                };
                expect_notify(&*ch, v, SHARER_NOTIFY, who)?;
                // docs/vchan.md §16 row 2a: the pages outlive the sharer while mapped.
                check_pattern(v, &[SHARER_NOTIFY])?;
                v.set(200, 0x77);
                ensure(v.get(200) == 0x77, || "write after the sharer left".into())
            })();
            c.put(k, "done", "1")?;
            r
        }
    }
}

fn gnt_notify_mapper(c: &Ctx, kill: bool) -> R {
    let k: &str = if kill {
        "gnt-mapper-kill"
    } else {
        "gnt-mapper-drop"
    };
    match c.role {
        Role::A => {
            let ch = evtchn::Xen.bind_unbound(c.peer).map_err(e2s)?;
            let p = gnttab::Xen.share(c.peer, 1, true).map_err(e2s)?;
            let v = View::shared(&*p);
            fill_pattern(v);
            v.set(MAPPER_NOTIFY, ARMED);
            c.put(k, "refs", &refs_str(p.refs()))?;
            c.put(k, "port", &ch.local_port().to_string())?;
            c.get(k, "ready")?;
            let b = v.get(MAPPER_NOTIFY);
            let r =
                ensure(b == ARMED, || format!("notify byte is {b:#04x} before")).and_then(|()| {
                    c.put(k, "go", "1")?;
                    c.get(k, "gone")?;
                    let who = if kill {
                        "the mapper's SIGKILL"
                    } else {
                        "the mapper's drop"
                    };
                    expect_notify(&*ch, v, MAPPER_NOTIFY, who)
                });
            c.put(k, "done", "1")?;
            r
        }
        Role::B => {
            let gref = c.get(k, "refs")?;
            let port = c.get(k, "port")?;
            if kill {
                let (mut child, _) = spawn_child(&[
                    "child-map".into(),
                    c.peer.to_string(),
                    gref,
                    port,
                    MAPPER_NOTIFY.to_string(),
                ])?;
                c.put(k, "ready", "1")?;
                c.get(k, "go")?;
                child.0.kill().map_err(e2s)?;
                let st = child.0.wait().map_err(e2s)?;
                c.note(k, &format!("mapper child {st}"));
                c.put(k, "gone", "1")?;
                c.get(k, "done").map(drop)
            } else {
                let refs = parse_refs(&gref)?;
                let port: u32 = parse_num(&port, "port")?;
                let ch = evtchn::Xen.bind_interdomain(c.peer, port).map_err(e2s)?;
                let _ = got_event(&*ch, EVENT_WAIT)?;
                let mut m = gnttab::Xen.map(c.peer, &refs, true).map_err(e2s)?;
                m.set_unmap_notify(MAPPER_NOTIFY, ch.local_port())
                    .map_err(e2s)?;
                c.put(k, "ready", "1")?;
                c.get(k, "go")?;
                drop(m);
                c.put(k, "gone", "1")?;
                c.get(k, "done")?;
                drop(ch);
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------
// children

fn child_share(args: &[String]) -> R {
    let [peer, off] = args else {
        return Err("child-share PEER OFFSET".into());
    };
    let peer: u16 = parse_num(peer, "PEER")?;
    let off: usize = parse_num(off, "OFFSET")?;
    let ch = evtchn::Xen.bind_unbound(peer).map_err(e2s)?;
    let mut p = gnttab::Xen.share(peer, 1, true).map_err(e2s)?;
    let v = View::shared(&*p);
    fill_pattern(v);
    v.set(off, ARMED);
    p.set_unmap_notify(off, ch.local_port()).map_err(e2s)?;
    println!("READY {} {}", p.refs()[0], ch.local_port());
    std::io::stdout().flush().map_err(e2s)?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn child_map(args: &[String]) -> R {
    let [granter, gref, port, off] = args else {
        return Err("child-map GRANTER REF PORT OFFSET".into());
    };
    let granter: u16 = parse_num(granter, "GRANTER")?;
    let gref: u32 = parse_num(gref, "REF")?;
    let port: u32 = parse_num(port, "PORT")?;
    let off: usize = parse_num(off, "OFFSET")?;
    let ch = evtchn::Xen.bind_interdomain(granter, port).map_err(e2s)?;
    let mut m = gnttab::Xen.map(granter, &[gref], true).map_err(e2s)?;
    m.set_unmap_notify(off, ch.local_port()).map_err(e2s)?;
    println!("READY");
    std::io::stdout().flush().map_err(e2s)?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// ---------------------------------------------------------------------------

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
