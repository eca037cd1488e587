//! The event channel of a shared-memory vchan as its endpoint waits on it,
//! and the checks that tell a peer domain is gone (docs/vchan.md §10.2).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::endpoint::Events;
use crate::transport::DomId;
use xenstore::Xs;

/// The event channel as the endpoint sees it, plus the peer-domain
/// liveness check that ends blocking waits when the peer domain is gone
/// (a destroyed domain sends no event and leaves the live byte alone,
/// docs/vchan.md §16 row D).
#[derive(Debug)]
pub(crate) struct EvtchnEvents {
    ch: Box<dyn evtchn::EventChannel>,
    liveness: Option<Liveness>,
}

/// What we can ask about the peer domain, and when we last asked.
#[derive(Debug)]
struct Liveness {
    evt: Arc<dyn evtchn::Backend>,
    xs: Xs,
    peer: DomId,
    last: std::cell::Cell<Instant>,
    /// Our port has been seen connected to the peer's.
    seen_interdomain: std::cell::Cell<bool>,
}

/// How often an idle blocking wait asks whether the peer domain is gone.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);

impl EvtchnEvents {
    pub(super) fn new(
        ch: Box<dyn evtchn::EventChannel>,
        evt: &Arc<dyn evtchn::Backend>,
        xs: Option<Xs>,
        peer: DomId,
    ) -> Self {
        let liveness = xs.map(|xs| Liveness {
            evt: evt.clone(),
            xs,
            peer,
            last: std::cell::Cell::new(Instant::now()),
            seen_interdomain: std::cell::Cell::new(false),
        });
        EvtchnEvents { ch, liveness }
    }

    /// Whether the peer domain is known to be gone (asked at most once per
    /// [`LIVENESS_INTERVAL`]): our port turned unbound after having been
    /// connected (the local double and, with privcmd, dom0 can see this),
    /// or see [`peer_domain_gone`].
    fn peer_gone(&self) -> Option<DomId> {
        let l = self.liveness.as_ref()?;
        if l.last.get().elapsed() < LIVENESS_INTERVAL {
            return None;
        }
        l.last.set(Instant::now());
        match self.ch.status() {
            Ok(Some(evtchn::PortStatus::Interdomain { .. })) => l.seen_interdomain.set(true),
            Ok(Some(evtchn::PortStatus::Unbound { .. } | evtchn::PortStatus::Closed))
                if l.seen_interdomain.get() =>
            {
                return Some(l.peer);
            }
            _ => {}
        }
        peer_domain_gone(&*l.evt, &l.xs, l.peer).then_some(l.peer)
    }

    /// [`peer_domain_gone`] now, without the rate limit (`false` when this
    /// endpoint has no liveness check).
    pub(super) fn peer_domain_gone_now(&self) -> bool {
        self.liveness
            .as_ref()
            .is_some_and(|l| peer_domain_gone(&*l.evt, &l.xs, l.peer))
    }
}

impl EvtchnEvents {
    /// The event channel's fd (readable when an event is pending).
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.ch.as_fd()
    }
}

impl Events for EvtchnEvents {
    fn notify(&self) -> io::Result<()> {
        self.ch.notify().map_err(Into::into)
    }
    fn wait(&self) -> io::Result<()> {
        while !self.wait_timeout(LIVENESS_INTERVAL)? {}
        Ok(())
    }
    fn wait_timeout(&self, d: Duration) -> io::Result<bool> {
        let got = self.ch.wait_timeout(d).map_err(io::Error::from)?;
        if !got && let Some(peer) = self.peer_gone() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("peer domain {peer} is gone"),
            ));
        }
        Ok(got)
    }
    fn consume_pending(&self) -> io::Result<bool> {
        self.ch.consume_pending().map_err(Into::into)
    }
}

/// Whether the peer domain is known to be gone. Two questions, each
/// answering "gone" only when the answer is definite:
///
/// 1. The event-channel probe ([`evtchn::Backend::probe_domain`]): Xen
///    knows no domain with the peer's id (`ESRCH`). Works in dom0 and in a
///    domU alike. A destroyed peer whose granted pages someone still maps
///    lingers and counts as existing; any error is "unknown".
/// 2. xenstore: `/local/domain/<peer>` missing (ENOENT). A daemon that
///    answers EACCES for missing nodes (C xenstored, seen from a domU)
///    can't tell, and then we say "not known to be gone".
///
/// Otherwise the caller's timeout bounds the wait.
pub(super) fn peer_domain_gone(evt: &dyn evtchn::Backend, xs: &Xs, peer: DomId) -> bool {
    if let Ok(evtchn::DomainProbe::NoSuchDomain) = evt.probe_domain(peer) {
        return true;
    }
    match xs.read(&format!("/local/domain/{peer}")) {
        Err(e) => e.is_enoent(),
        Ok(_) => false,
    }
}
