//! The shared-memory transports (Xen and Local): libxenvchan's server and
//! client setup (docs/vchan.md §9.2, §9.3), Qubes' xenstore conventions (§11) and
//! close (docs/vchan.md §10), over the `gnttab`, `evtchn` and `xenstore` backends.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::compat::{Compat, PortName};
use crate::control::{self, CLI_LIVE, ControlPage, Layout, RingId, RingLocation, SRV_LIVE, Side};
use crate::endpoint::{Endpoint, Events, PeerState};
use crate::error::{Error, Result};
use crate::mem::SharedMemory;
use crate::transport::{DomId, Transport};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use xenstore::{NodePerm, Perm, Watcher, Xs};

mod events;

pub(crate) use events::EvtchnEvents;
use events::peer_domain_gone;

/// The three kernel interfaces of one transport.
#[derive(Debug)]
struct Backends {
    gnt: Box<dyn gnttab::Backend>,
    evt: Arc<dyn evtchn::Backend>,
    xs_path: Option<std::path::PathBuf>,
}

impl Backends {
    fn new(t: &Transport) -> Result<Backends> {
        match t {
            Transport::Xen => {
                t.check_available()?;
                Ok(Backends {
                    gnt: Box::new(gnttab::Xen),
                    evt: Arc::new(evtchn::Xen),
                    xs_path: None,
                })
            }
            Transport::Local { dir, domid } => Ok(Backends {
                gnt: Box::new(gnttab::local::Local::new(dir.clone(), *domid)),
                evt: Arc::new(evtchn::local::Local::new(dir.clone(), *domid)),
                xs_path: Some(local_xenstore_socket(dir, *domid)),
            }),
            Transport::Socket { .. } => Err(Error::config("not a shared-memory transport")),
        }
    }

    fn xs(&self) -> Result<Xs> {
        let r = match &self.xs_path {
            Some(p) => Xs::connect_unix(p),
            None => Xs::open(),
        };
        r.map_err(|source| Error::Xenstore {
            step: "open xenstore",
            source,
        })
    }

    fn watcher(&self) -> Result<Watcher> {
        let r = match &self.xs_path {
            Some(p) => Watcher::connect_unix(p),
            None => Watcher::open(),
        };
        r.map_err(|source| Error::Xenstore {
            step: "open xenstore watch",
            source,
        })
    }
}

/// Where the local transport's xenstored serves domain `domid`.
pub fn local_xenstore_socket(dir: &Path, domid: DomId) -> std::path::PathBuf {
    dir.join("xenstore").join(format!("{domid}.sock"))
}

fn xs_err(step: &'static str) -> impl FnOnce(xenstore::Error) -> Error {
    move |source| Error::Xenstore { step, source }
}

/// Reads our own domain id from xenstore and refuses loopback.
fn own_domid(xs: &Xs, peer: DomId) -> Result<DomId> {
    let own = xs.own_domid().map_err(xs_err("read own domid"))?;
    if own == peer {
        return Err(Error::Loopback { domid: own });
    }
    Ok(own)
}

/// A grant mapping as the endpoint's memory: the pages we share (server)
/// or map (client). The endpoint's header and rings hold it in an `Arc`;
/// the pages are unshared or unmapped when the last holder drops it.
#[derive(Debug)]
enum Pages {
    Shared(Box<dyn gnttab::SharedPages>),
    Mapped(Box<dyn gnttab::MappedPages>),
}

// SAFETY: the gnttab backends return mappings that are page-aligned, of `len()` bytes, at a fixed address, readable, and writable unless mapped read-only (`MappedPages::writable`; what we share is always writable), until they are dropped; nothing in vchan makes a reference into them.
unsafe impl SharedMemory for Pages {
    fn as_ptr(&self) -> *mut u8 {
        match self {
            Pages::Shared(p) => p.as_ptr(),
            Pages::Mapped(p) => p.as_ptr(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Pages::Shared(p) => p.len(),
            Pages::Mapped(p) => p.len(),
        }
    }
    fn is_writable(&self) -> bool {
        match self {
            Pages::Shared(_) => true,
            Pages::Mapped(p) => p.writable(),
        }
    }
}

/// A grant mapping made outside any vchan, as a control page: test support
/// for a hostile peer's second mapping ([`crate::LocalXen::map_control_page`]).
#[cfg(feature = "test-utils")]
pub(crate) fn control_page_of(page: Box<dyn gnttab::MappedPages>) -> Result<ControlPage> {
    ControlPage::new(Arc::new(Pages::Mapped(page))).map_err(|e| Error::config(e.to_string()))
}

/// One end of a shared-memory vchan. The endpoint owns the memory (its
/// header and rings hold the mappings); `Drop` takes it apart in
/// libxenvchan's or ocaml-vchan's close order.
#[derive(Debug)]
pub(crate) struct ShmChan {
    /// Always `Some` until `Drop` takes it apart.
    ep: Option<Endpoint<EvtchnEvents>>,
    side: Side,
    peer: DomId,
    /// Server: xenstore and the base path still to remove.
    xs_nodes: Option<(Xs, String)>,
    /// Whose behaviour we reproduce (setup, close, reads).
    compat: Compat,
}

/// The mapping `Endpoint::new` wants for `ring`: `None` for an in-page
/// ring, the ring's own pages for an external one.
fn ring_memory(
    layout: &Layout,
    ring: RingId,
    pages: &mut [Option<Arc<dyn SharedMemory>>; 2],
) -> Option<Arc<dyn SharedMemory>> {
    match layout.location(ring) {
        RingLocation::External { .. } => pages[match ring {
            RingId::Left => 0,
            RingId::Right => 1,
        }]
        .take(),
        RingLocation::InPage { .. } => None,
    }
}

impl ShmChan {
    /// Server setup, docs/vchan.md §9.2; returns with the client not yet connected.
    pub(crate) fn server(
        t: &Transport,
        peer: DomId,
        port: u32,
        read_min: usize,
        write_min: usize,
    ) -> Result<ShmChan> {
        Self::server_opts(
            t,
            peer,
            &PortName::from(port),
            read_min,
            write_min,
            Compat::Libxenvchan,
        )
    }

    /// Server setup as libxenvchan (docs/vchan.md §9.2) or as ocaml-vchan (§12,
    /// [`crate::compat`]); returns with the client not yet connected.
    pub(crate) fn server_opts(
        t: &Transport,
        peer: DomId,
        port: &PortName,
        read_min: usize,
        write_min: usize,
        compat: Compat,
    ) -> Result<ShmChan> {
        let ocaml = compat == Compat::OcamlVchan;
        let layout = if ocaml {
            crate::compat::ocaml_server_layout(read_min, write_min)
        } else {
            control::server_layout(read_min, write_min).map_err(|e| Error::config(e.to_string()))?
        };
        let be = Backends::new(t)?;
        let xs = be.xs()?;
        let own = own_domid(&xs, peer)?;
        if let Some(hint) = t.own_domid_hint()
            && hint != own
        {
            return Err(Error::config(format!(
                "xenstore says we are domain {own}, the transport says {hint}"
            )));
        }

        let bind = || {
            be.evt.bind_unbound(peer).map_err(|source| Error::Evtchn {
                step: "bind unbound port",
                source,
            })
        };
        // libxenvchan binds the event channel first: the unmap-notify below
        // needs a bound port. ocaml-vchan sets no unmap-notify and binds
        // after sharing its pages.
        let early_evt = if ocaml { None } else { Some(bind()?) };

        let mut ctrl = be
            .gnt
            .share(peer, 1, true)
            .map_err(|source| Error::Gnttab {
                step: "share control page",
                source,
            })?;
        if let Some(evt) = &early_evt {
            ctrl.set_unmap_notify(SRV_LIVE, evt.local_port())
                .map_err(|source| Error::Gnttab {
                    step: "set unmap-notify on srv_live",
                    source,
                })?;
        }
        let ctrl_ref = ctrl.refs()[0];

        let mut grants: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        let mut ring_pages: [Option<Arc<dyn SharedMemory>>; 2] = [None, None];
        for (i, ring) in [RingId::Left, RingId::Right].into_iter().enumerate() {
            if let RingLocation::External { pages, .. } = layout.location(ring) {
                let p = be
                    .gnt
                    .share(peer, pages, true)
                    .map_err(|source| Error::Gnttab {
                        step: "share ring pages",
                        source,
                    })?;
                grants[i] = p.refs().to_vec();
                ring_pages[i] = Some(Arc::new(Pages::Shared(p)));
            }
        }
        let ctrl: Arc<dyn SharedMemory> = Arc::new(Pages::Shared(ctrl));
        let header = ControlPage::new(ctrl.clone()).map_err(|e| Error::config(e.to_string()))?;
        if ocaml {
            crate::compat::init_server_page_ocaml(&header, &layout, &grants[0], &grants[1])
        } else {
            control::init_server_page(&header, &layout, &grants[0], &grants[1])
        }
        .map_err(|e| Error::config(e.to_string()))?;
        drop(header);
        let evt = match early_evt {
            Some(evt) => evt,
            None => bind()?,
        };
        let evt_port = evt.local_port();
        let left = ring_memory(&layout, RingId::Left, &mut ring_pages);
        let right = ring_memory(&layout, RingId::Right, &mut ring_pages);
        // The endpoint now holds the page and the rings (read-write).
        let mut ep = Endpoint::new(
            ctrl,
            Side::Server,
            &layout,
            left,
            right,
            EvtchnEvents::new(evt, &be.evt, Some(be.xs()?), peer),
        )?;
        ep.set_lazy_ack(ocaml);

        // Publish in one transaction, readable by the client only; Qubes
        // passes a relative path, ocaml-vchan builds the absolute one.
        let base = if ocaml {
            let home = xs
                .get_domain_path(own)
                .map_err(xs_err("get own domain path"))?;
            format!("{home}/data/vchan/{peer}/{port}")
        } else {
            format!("data/vchan/{peer}/{port}")
        };
        let perms = [
            NodePerm {
                dom: own,
                perm: Perm::None,
            },
            NodePerm {
                dom: peer,
                perm: Perm::Read,
            },
        ];
        xs.transaction(|tx| {
            tx.write(
                &format!("{base}/{}", control::XS_RING_REF),
                ctrl_ref.to_string().as_bytes(),
            )?;
            tx.set_perms(&format!("{base}/{}", control::XS_RING_REF), &perms)?;
            tx.write(
                &format!("{base}/{}", control::XS_EVENT_CHANNEL),
                evt_port.to_string().as_bytes(),
            )?;
            tx.set_perms(&format!("{base}/{}", control::XS_EVENT_CHANNEL), &perms)?;
            Ok(())
        })
        .map_err(xs_err("publish ring-ref and event-channel"))?;
        Ok(ShmChan {
            ep: Some(ep),
            side: Side::Server,
            peer,
            xs_nodes: Some((xs, base)),
            compat,
        })
    }

    /// Client setup, docs/vchan.md §9.3 with Qubes' wait (§11.1): waits up to
    /// `timeout` for the server's nodes with a xenstore watch.
    pub(crate) fn client(
        t: &Transport,
        peer: DomId,
        port: u32,
        timeout: Duration,
    ) -> Result<ShmChan> {
        Self::client_opts(t, peer, &PortName::from(port), timeout, Compat::Libxenvchan)
    }

    /// Client setup as libxenvchan or as ocaml-vchan ([`crate::compat`]).
    pub(crate) fn client_opts(
        t: &Transport,
        peer: DomId,
        port: &PortName,
        timeout: Duration,
        compat: Compat,
    ) -> Result<ShmChan> {
        let mut c = ShmConnecting::start_opts(t, peer, port.clone(), compat)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ch) = c.poll()? {
                return Ok(ch);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    step: "wait for vchan server",
                    secs: timeout.as_secs(),
                });
            }
            // Any event (ours, domid, release) means: look again.
            c.watcher
                .next_event_timeout(left)
                .map_err(xs_err("wait for xenstore watch"))?;
        }
    }

    /// The rest of the client setup once the server's nodes are known.
    fn client_finish(
        be: &Backends,
        xs: Xs,
        peer: DomId,
        ring_ref: u32,
        evt_port: u32,
        compat: Compat,
    ) -> Result<ShmChan> {
        let ocaml = compat == Compat::OcamlVchan;
        let bind = || {
            be.evt
                .bind_interdomain(peer, evt_port)
                .map_err(|source| Error::Evtchn {
                    step: "bind interdomain port",
                    source,
                })
        };
        // libxenvchan binds first (its unmap-notify needs the port);
        // ocaml-vchan maps the page first and sets no unmap-notify.
        let early_evt = if ocaml { None } else { Some(bind()?) };
        let mut ctrl = be
            .gnt
            .map(peer, &[ring_ref], true)
            .map_err(|source| Error::Gnttab {
                step: "map control page",
                source,
            })?;
        if let Some(evt) = &early_evt {
            ctrl.set_unmap_notify(CLI_LIVE, evt.local_port())
                .map_err(|source| Error::Gnttab {
                    step: "set unmap-notify on cli_live",
                    source,
                })?;
        }
        let ctrl: Arc<dyn SharedMemory> = Arc::new(Pages::Mapped(ctrl));
        let header = ControlPage::new(ctrl.clone()).map_err(|e| Error::config(e.to_string()))?;
        let (lo, ro) = control::read_orders(&header);
        let layout = control::validate_client_orders(lo, ro)
            .map_err(|e| Error::peer(format!("control page: {e}")))?;
        if layout.grant_list_overlaps_ring {
            log::warn!(
                "server's grant list runs into an in-page ring (orders {lo}/{ro}; ocaml-vchan layout)"
            );
        }
        let (left_grants, right_grants) = control::read_grants(&header, &layout);
        let evt = match early_evt {
            Some(evt) => evt,
            None => bind()?,
        };
        let mut ring_pages: [Option<Arc<dyn SharedMemory>>; 2] = [None, None];
        // Left ring: we write (read-write); right ring: we read (read-only;
        // ocaml-vchan maps it read-write too).
        for (i, (grants, writable)) in [(left_grants, true), (right_grants, ocaml)]
            .into_iter()
            .enumerate()
        {
            if grants.is_empty() {
                continue;
            }
            let m = be
                .gnt
                .map(peer, &grants, writable)
                .map_err(|source| Error::Gnttab {
                    step: "map ring pages",
                    source,
                })?;
            ring_pages[i] = Some(Arc::new(Pages::Mapped(m)));
        }
        let left = ring_memory(&layout, RingId::Left, &mut ring_pages);
        let right = ring_memory(&layout, RingId::Right, &mut ring_pages);
        // The endpoint now holds the page (read-write), the left ring
        // (read-write) and the right ring, our read ring (read-only, or as
        // ocaml-vchan read-write).
        let mut ep = Endpoint::new(
            ctrl,
            Side::Client,
            &layout,
            left,
            right,
            EvtchnEvents::new(evt, &be.evt, Some(xs), peer),
        )?;
        ep.set_lazy_ack(ocaml);
        control::announce_client_connected(&header);
        ep.events()
            .notify()
            .map_err(|source| Error::io("notify server of connect", source))?;
        Ok(ShmChan {
            ep: Some(ep),
            side: Side::Client,
            peer,
            xs_nodes: None,
            compat,
        })
    }

    pub(crate) fn endpoint(&mut self) -> &mut Endpoint<EvtchnEvents> {
        self.ep.as_mut().expect("the endpoint lives until Drop")
    }

    pub(crate) fn endpoint_ref(&self) -> &Endpoint<EvtchnEvents> {
        self.ep.as_ref().expect("the endpoint lives until Drop")
    }

    pub(crate) fn compat(&self) -> Compat {
        self.compat
    }

    /// The peer's state; once a client shows up, the server removes its
    /// xenstore nodes (Qubes: no second client, no stale entries).
    pub(crate) fn peer_state(&mut self) -> PeerState {
        let s = self.endpoint_ref().peer_state();
        // ocaml-vchan leaves its nodes until it closes.
        if self.side == Side::Server
            && s != PeerState::Waiting
            && self.compat == Compat::Libxenvchan
        {
            self.remove_nodes();
        }
        s
    }

    /// Removes `<base>` and, if it became empty, the per-peer directory.
    fn remove_nodes(&mut self) {
        let Some((xs, base)) = self.xs_nodes.take() else {
            return;
        };
        let parent = base
            .rsplit_once('/')
            .map(|(p, _)| p.to_string())
            .unwrap_or_default();
        let r = xs.transaction(|tx| {
            tx.rm(&base)?;
            if tx.directory(&parent).map(|d| d.is_empty()).unwrap_or(false) {
                tx.rm(&parent)?;
            }
            Ok(())
        });
        if r.is_err() {
            // No transaction to be had (the domain's quota is taken by
            // other set-ups, or conflicts): remove our own nodes at least,
            // so that they do not pile up against the node quota.
            let _ = xs.rm(&base);
        }
    }

    /// Server: waits for the client, bounded; checks the peer domain is
    /// still there each `poll` interval.
    pub(crate) fn wait_connected(&mut self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match self.peer_state() {
                PeerState::Connected => return Ok(()),
                PeerState::Closed => return Err(Error::PeerClosed),
                PeerState::Waiting => {}
            }
            let slice = Duration::from_millis(500);
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Timeout {
                            step: "wait for vchan client",
                            secs: timeout.unwrap_or_default().as_secs(),
                        });
                    }
                    left.min(slice)
                }
                None => slice,
            };
            let got = self
                .endpoint_ref()
                .events()
                .wait_timeout(wait)
                .map_err(|source| Error::io("wait for client event", source))?;
            if !got && self.endpoint_ref().events().peer_domain_gone_now() {
                return Err(Error::PeerGone {
                    step: "wait for vchan client",
                    domid: self.peer,
                });
            }
        }
    }

    /// Server, non-blocking: consume any event and report whether connected.
    pub(crate) fn poll_connected(&mut self) -> Result<bool> {
        let _ = self.endpoint_ref().consume_pending()?;
        match self.peer_state() {
            PeerState::Connected => Ok(true),
            PeerState::Waiting => Ok(false),
            PeerState::Closed => Err(Error::PeerClosed),
        }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.endpoint_ref().events().fd()
    }
}

/// A client connect in progress: waits for
/// `/local/domain/<peer>/data/vchan/<own>/<port>/event-channel` and
/// `ring-ref` with a watch (not a sleep loop), re-reads our domid when a
/// `domid` watch fires (save/restore), ends early if the peer domain is
/// gone. Driven by [`ShmConnecting::poll`] whenever the watch fd is readable.
#[derive(Debug)]
pub(crate) struct ShmConnecting {
    be: Backends,
    xs: Option<Xs>,
    watcher: Watcher,
    /// The fd handed out ([`ShmConnecting::fd`]): readable while the
    /// watcher's connection is, or while `due` is set.
    ready: Epoll,
    /// Set when [`ShmConnecting::poll`] is due although the watcher's fd
    /// may not show it: at the start, and when watch events wait in user
    /// space (read together with a reply, so the socket no longer shows
    /// them; a Linux domU's xenbus device may queue a watch's first event
    /// before the WATCH reply).
    due: EventFd,
    peer: DomId,
    port: PortName,
    watched: Option<String>,
    compat: Compat,
}

impl ShmConnecting {
    pub(crate) fn start(t: &Transport, peer: DomId, port: u32) -> Result<ShmConnecting> {
        Self::start_opts(t, peer, PortName::from(port), Compat::Libxenvchan)
    }

    pub(crate) fn start_opts(
        t: &Transport,
        peer: DomId,
        port: PortName,
        compat: Compat,
    ) -> Result<ShmConnecting> {
        let be = Backends::new(t)?;
        let xs = be.xs()?;
        own_domid(&xs, peer)?;
        let watcher = be.watcher()?;
        watcher
            .watch("domid", "domid")
            .map_err(xs_err("watch domid"))?;
        watcher
            .watch("@releaseDomain", "release")
            .map_err(xs_err("watch @releaseDomain"))?;
        let sys = |step: &'static str| move |e: nix::Error| Error::io(step, e.into());
        let ready = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(sys("epoll_create"))?;
        let due = EventFd::from_value_and_flags(
            // The first attempt is due at once (libxenvchan's callers get
            // the registration event of the `domid` watch for it).
            1,
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )
        .map_err(sys("eventfd"))?;
        ready
            .add(watcher.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 0))
            .map_err(sys("epoll_ctl"))?;
        ready
            .add(due.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 1))
            .map_err(sys("epoll_ctl"))?;
        Ok(ShmConnecting {
            be,
            xs: Some(xs),
            watcher,
            ready,
            due,
            peer,
            port,
            watched: None,
            compat,
        })
    }

    /// One non-blocking attempt: `Ok(Some(_))` once connected, `Ok(None)`
    /// to wait for the watch fd again.
    pub(crate) fn poll(&mut self) -> Result<Option<ShmChan>> {
        // Clear `due` (EAGAIN: it was not set).
        let _ = self.due.read();
        let r = self.attempt();
        if matches!(r, Ok(None)) && self.watcher.queued_events() > 0 {
            // Events read with a reply wait in user space: the fd must say
            // so, or the caller sleeps on them.
            self.due
                .write(1)
                .map_err(|e| Error::io("eventfd", e.into()))?;
        }
        r
    }

    fn attempt(&mut self) -> Result<Option<ShmChan>> {
        while self
            .watcher
            .try_next_event()
            .map_err(xs_err("drain watch events"))?
            .is_some()
        {}
        let Some(xs) = self.xs.as_ref() else {
            return Err(Error::config("connect already finished"));
        };
        let (peer, port) = (self.peer, self.port.clone());
        let own = own_domid(xs, peer)?;
        let base = format!("/local/domain/{peer}/data/vchan/{own}/{port}");
        let evt_path = format!("{base}/{}", control::XS_EVENT_CHANNEL);
        if self.watched.as_deref() != Some(evt_path.as_str()) {
            if let Some(old) = self.watched.take() {
                let _ = self.watcher.unwatch(&old, &old);
            }
            // The token is the path itself: the directory may be unreadable.
            self.watcher
                .watch(&evt_path, &evt_path)
                .map_err(xs_err("watch event-channel"))?;
            self.watched = Some(evt_path.clone());
        }
        match xs.read_string(&evt_path) {
            Ok(v) if !v.is_empty() => {
                let evt_port = parse_positive(&v, "event-channel")?;
                let ring_ref = xs
                    .read_string(&format!("{base}/{}", control::XS_RING_REF))
                    .map_err(xs_err("read ring-ref"))
                    .and_then(|s| parse_positive(&s, "ring-ref"))?;
                let _ = self.watcher.unwatch(&evt_path, &evt_path);
                self.watched = None;
                let xs = self.xs.take().expect("checked above");
                ShmChan::client_finish(&self.be, xs, peer, ring_ref, evt_port, self.compat)
                    .map(Some)
            }
            Ok(_) => Ok(None),
            Err(e) if e.is_enoent() || e.is_eacces() => {
                if peer_domain_gone(&*self.be.evt, xs, peer) {
                    return Err(Error::PeerGone {
                        step: "wait for vchan server",
                        domid: peer,
                    });
                }
                Ok(None)
            }
            Err(e) => Err(Error::Xenstore {
                step: "read event-channel",
                source: e,
            }),
        }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.ready.0.as_fd()
    }
}

/// Parses a decimal xenstore value that must be a positive u32 (libxenvchan
/// uses atoi and rejects 0).
fn parse_positive(s: &str, what: &str) -> Result<u32> {
    let v: u32 = s
        .parse()
        .map_err(|_| Error::peer(format!("{what} = {s:?} is not a number")))?;
    if v == 0 {
        return Err(Error::peer(format!("{what} = 0")));
    }
    Ok(v)
}

impl Drop for ShmChan {
    fn drop(&mut self) {
        let Some(ep) = self.ep.take() else {
            return;
        };
        // The endpoint holds the memory: its rings hold the ring mappings
        // (and, for in-page rings, the control page), its header the
        // control page. Taking it apart lets each go at its step below.
        let mut parts = ep.into_parts();
        if self.compat == Compat::OcamlVchan {
            // ocaml-vchan's close: own live byte 0 and one event; the
            // server withdraws its xenstore nodes; then the read ring, the
            // write ring and the page go (no unmap-notify fires); the event
            // channel goes last.
            let _ = parts.close.close(&parts.header, &parts.events);
            self.remove_nodes();
            drop(parts.rx);
            drop(parts.tx);
            drop(parts.header);
            drop(parts.events);
            return;
        }
        // libxenvchan's close order (docs/vchan.md §10.1):
        // 1. unmap the external rings (the in-page ones only let go of the
        //    control page, which the header still holds);
        drop(parts.rx);
        drop(parts.tx);
        // 2. own live byte 0 (and one event);
        let _ = parts.close.close(&parts.header, &parts.events);
        // 3. unmap the control page: the last holder of the mapping is the
        //    header, so the unmap-notify (clear the byte, send an event)
        //    fires here;
        drop(parts.header);
        // 4. an explicit event, then the event channel goes;
        let _ = parts.events.notify();
        drop(parts.events);
        // 5. (the grant device handles went with the mappings above;)
        // 6. (server) remove the xenstore nodes.
        self.remove_nodes();
    }
}
