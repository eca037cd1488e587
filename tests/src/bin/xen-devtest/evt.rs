//! The event-channel checks.

use super::*;

pub(crate) fn evt_bind_notify(c: &Ctx) -> R {
    const K: &str = "evt-bind-notify";
    match c.role {
        Role::A => {
            let ch = evtchn::Xen.bind_unbound(c.peer).map_err(e2s)?;
            ensure(!ch.consume_pending().map_err(e2s)?, || {
                "a fresh unbound port has an event".into()
            })?;
            c.put(K, "port", &ch.local_port().to_string())?;
            c.get(K, "bound")?;
            let kicks = evtchn::alarm_kicks();
            let t = std::time::Instant::now();
            ensure(!got_event(&*ch, QUIET_WAIT)?, || {
                "the peer's bind woke the unbound side".into()
            })?;
            let took = t.elapsed();
            // That wait slept in a blocking read that the process's alarm
            // ended through the channel's loopback ports (docs/vchan.md §6.1).
            let ended = evtchn::alarm_kicks() - kicks;
            c.note(
                K,
                &format!("a {QUIET_WAIT:?} wait with no event: {took:?}, {ended} alarm kick(s)"),
            );
            ensure(ended == 1 && took >= QUIET_WAIT, || {
                format!(
                    "a {QUIET_WAIT:?} wait took {took:?} with {ended} alarm kicks, expected 1 kick and no early end (no loopback pair?)"
                )
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

pub(crate) fn evt_wrong_domain(c: &Ctx) -> R {
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

pub(crate) fn evt_peer_close(c: &Ctx) -> R {
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

pub(crate) fn evt_status(c: &Ctx) -> R {
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

/// Two threads sleep on one channel that gets no event, one for 5 s, one
/// for 300 ms started just after it: the short one must end near its 300 ms
/// (the alarm's kick for it may be read by the long one, which holds the
/// fd's reader lock and must give way: docs/vchan.md §6.1), not after 5 s.
pub(crate) fn evt_two_sleepers(c: &Ctx) -> R {
    const K: &str = "evt-two-sleepers";
    let ch = evtchn::Xen.bind_unbound(c.peer).map_err(e2s)?;
    let ch: &dyn EventChannel = &*ch;
    let (long, short) = std::thread::scope(|s| {
        let long = s.spawn(|| {
            let t = Instant::now();
            ch.wait_timeout(Duration::from_secs(5))
                .map(|e| (e, t.elapsed()))
        });
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let short = ch
            .wait_timeout(Duration::from_millis(300))
            .map(|e| (e, t.elapsed()));
        (long.join(), short)
    });
    let (short_event, short_took) = short.map_err(e2s)?;
    let long = long.map_err(|_| "the long sleeper panicked".to_string())?;
    let (long_event, long_took) = long.map_err(e2s)?;
    c.note(
        K,
        &format!("300 ms sleeper: {short_took:?}; 5 s sleeper beside it: {long_took:?}"),
    );
    ensure(!short_event && !long_event, || {
        "an event on a channel nobody notifies".into()
    })?;
    ensure(
        short_took >= Duration::from_millis(300) && short_took < Duration::from_secs(3),
        || format!("the 300 ms sleeper beside a 5 s one took {short_took:?}"),
    )
}
