//! The xenstore checks, and the `probe-peer` and `watch-release` tools.

use super::*;

pub(crate) fn xs_basic(c: &Ctx) -> R {
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

pub(crate) fn xs_tx(c: &Ctx) -> R {
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

pub(crate) fn xs_watch(c: &Ctx) -> R {
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

pub(crate) fn xs_perms(c: &Ctx) -> R {
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
pub(crate) fn is_introduced(dom: u16) -> R<Result<bool, String>> {
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

pub(crate) fn fmt_introduced(r: &Result<bool, String>) -> String {
    match r {
        Ok(true) => "T".into(),
        Ok(false) => "F".into(),
        Err(e) => format!("refused ({e})"),
    }
}

/// Informational: can this domain ask xenstored whether a domain exists?
/// (A liveness test that works where reading `/local/domain/<peer>` cannot
/// tell a missing domain from an unreadable one: C xenstored in a domU.)
pub(crate) fn xs_introduced(c: &Ctx) -> R {
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
pub(crate) fn watch_release(args: &[String]) -> R {
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
pub(crate) fn probe_peer(args: &[String]) -> R {
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
