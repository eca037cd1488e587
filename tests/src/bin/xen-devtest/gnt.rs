//! The grant-table checks, and the `child-share`/`child-map` processes
//! they kill.

use super::*;

pub(crate) fn gnt_share_map(c: &Ctx) -> R {
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

pub(crate) fn gnt_ro(c: &Ctx) -> R {
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

pub(crate) fn gnt_wrong_domain(c: &Ctx) -> R {
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

pub(crate) fn gnt_257(c: &Ctx) -> R {
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

pub(crate) fn gnt_limit(c: &Ctx) -> R {
    match gnttab::Xen.share(c.peer, 1025, true) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Ok(()),
        Err(e) => Err(format!("1025 pages: {e}, expected ENOSPC")),
        Ok(_) => Err("1025 pages were shared (limit 1024)".into()),
    }
}

/// Waits for the event that must follow the notify byte's clearing; the
/// byte must be clear by then.
pub(crate) fn expect_notify(ch: &dyn EventChannel, v: View<'_>, off: usize, who: &str) -> R {
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
pub(crate) struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn_child(args: &[String]) -> R<(ChildGuard, Vec<String>)> {
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

pub(crate) fn gnt_notify_sharer(c: &Ctx, kill: bool) -> R {
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

pub(crate) fn gnt_notify_mapper(c: &Ctx, kill: bool) -> R {
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

// The children: a sharer and a mapper to SIGKILL.

pub(crate) fn child_share(args: &[String]) -> R {
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

pub(crate) fn child_map(args: &[String]) -> R {
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
