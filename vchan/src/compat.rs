//! Behaving like another vchan implementation on the wire: today
//! [`Compat::OcamlVchan`], the MirageOS library `mirage/ocaml-vchan`, so
//! that a Mirage developer (and our own tests) can check an endpoint
//! against the peer a unikernel would be, without a unikernel.
//!
//! ```no_run
//! use std::time::Duration;
//! use vchan::{Compat, PortName, Transport, Vchan};
//!
//! let t = Transport::from_env()?;
//! let port = PortName::new("my-service")?; // ocaml-vchan allows names
//! // A server that chooses its rings, fills its page, publishes and
//! // closes as ocaml-vchan does (here: its default 1024/1024 request,
//! // which gives in-page rings of 1024 and 2048 bytes).
//! let mut srv = Vchan::server_with(&t, 5, &port, 1024, 1024, Compat::OcamlVchan)?;
//! srv.wait_connected(Some(Duration::from_secs(30)))?;
//! assert_eq!((srv.read_ring_size(), srv.write_ring_size()), (1024, 2048));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What differs, and what we reproduce
//!
//! Read from ocaml-vchan 6.0.2 (`lib/endpoint.ml`, `lib/location.ml`,
//! `lib/port.ml`, `lib/xenstore.ml`, `xen/memory_xen.ml`,
//! `xen/events_xen.ml`) and libxenvchan (Xen `tools/libs/vchan`, docs/vchan.md §4,
//! docs/vchan.md §9, §10). "Ours" is this crate with the default [`Compat::Libxenvchan`]
//! and with [`Compat::OcamlVchan`].
//!
//! | behaviour | libxenvchan (Xen, Qubes) | ocaml-vchan (MirageOS) | ours, default | ours, `OcamlVchan` |
//! |---|---|---|---|---|
//! | server call returns | at once; the caller waits for the client | only once the client has connected (`cli_live` left 2) | at once ([`Vchan::wait_connected`]) | at once (API, not wire) |
//! | default sizes | caller passes them (Qubes qrexec: 4096 control, 65536 data) | `read_size = write_size = 1024` | caller passes them | caller passes them (pass 1024/1024 for Mirage's default) |
//! | order choice | smallest order ≥ 12 that fits, then in-page overrides (docs/vchan.md §4.2): 0/0 → 10/11 | smallest of 1 KiB (in page at 1024), 2 KiB (in page at 2048), 4 KiB … 1 MiB that fits; then 10/10 → 10/11 and 11/11 → **10**/12 | libxenvchan's | ocaml-vchan's ([`ocaml_server_orders`]) |
//! | request above 1 MiB | `server_init` fails | silently capped at order 20 | error | capped at order 20 |
//! | layout | grant list never runs into an in-page ring | read ≤ 1 KiB with write > 512 KiB gives 10/20: 256 grants run into the order-10 ring (bytes 1024..1047) | never produces it; as client accepts it with a warning | produces it, as ocaml-vchan |
//! | page init | whole page zeroed, then header and grants | only the header fields and the grants are written | zeroed | header and grants only |
//! | order of setup (server) | event channel bound, then pages shared | pages shared, then event channel bound | event channel first | pages first |
//! | unmap-notify | server on `srv_live`, client on `cli_live` (a dead process clears its byte and sends an event) | **none**: a crashed Mirage endpoint leaves its live byte at 1 | set | **not set** |
//! | client's ring mappings | write ring read-write, read ring read-only | both read-write | as libxenvchan | both read-write |
//! | client order check | each in 10..=20, equal only if ≥ 12 | 10, 11, or anything ≥ 12 ("Invalid ring order: N" below 10); equal in-page orders accepted | as libxenvchan | as libxenvchan (we never alias two rings or map > 1 MiB; see below) |
//! | connect (client) | bind, map, `cli_live = 1`, `srv_notify = WRITE`, one event | map, bind, then the same stores and event | libxenvchan's | ocaml-vchan's order |
//! | notify bits | WRITE = 1, READ = 2; request into the peer's byte, test-and-clear our own | the same bytes and bits | the same | the same |
//! | reader acknowledges | at once (`cons` published after the copy, then READ notify) | at the **next** read (a writer waiting for space waits until the Mirage application reads again) | at once | at the next read ([`crate::endpoint::Endpoint::set_lazy_ack`]) |
//! | fd path (`write_to_fd`) | — | — | acknowledges at once | acknowledges earlier reads, then this one at once |
//! | one read returns | everything asked for that is there (across the wrap) | one contiguous piece, up to the wrap point | across the wrap | up to the wrap point |
//! | "space" check before a wait | `space >= request` | `space > request` (asks for READ events a little more often) | `>=` | `>=` (not reproduced: no effect on what the peer sees but one more request bit) |
//! | corrupt indices / live byte | clamp to 0 (XSA-86) / any non-zero is "open" | no clamp / exception | typed error / closed | the same as ours: we never trust the peer |
//! | xenstore | `<base>/ring-ref`, `event-channel` in one transaction, `n<server> r<client>` | the same nodes under an absolute path (`GET_DOMAIN_PATH`), same transaction and permissions | relative path (resolves the same) | absolute path |
//! | nodes removed | Qubes: at the client's connect; Xen ≥ 4.17: at close | at close (node, then the per-client directory if empty) | at connect | at close |
//! | port | Qubes: a decimal number; libxenvchan: any xenstore path | a name matching `[a-zA-Z0-9_-]+` | `u32`, or a [`PortName`] | a [`PortName`] |
//! | close | unmap data rings, own live = 0, unmap page (notify clears and signals again), one more event, unbind; server removes nodes (Xen ≥ 4.17) | own live = 0, one event; server removes the nodes; unshare/unmap the rings and the page; unbind | libxenvchan's | ocaml-vchan's |
//! | peer domain destroyed | Qubes' wrapper polls `EVTCHNOP_status`; plain libxenvchan waits for ever | waits for ever | liveness checks end the wait | the same liveness checks (they send nothing on the wire) |
//!
//! History that explains old bug reports (not reproduced; we follow
//! ocaml-vchan 6.0.2): before 5.0.0 its client cut its view of the
//! control page down to the header and the grant list ("ignore trailing
//! junk", removed in PR #132, mirage/ocaml-vchan@a2c2130), which put in-page rings out
//! of its reach; before 2.0.x (mirage/ocaml-vchan@879e50c) its server zeroed `left.cons`
//! twice and never `right.prod`. "Invalid ring order: 0"
//! (qubes-mirage-firewall #3) is its client reading an all-zero page; ours
//! refuses such a page too, with [`crate::control::ControlError`].
//!
//! Two ocaml-vchan client behaviours are deliberately not copied: it
//! accepts equal in-page orders (both rings would then share the same
//! bytes) and orders above 20 (it would read grant references past the
//! page); both only come from a broken or hostile server, and ours
//! refuses them with [`crate::control::ControlError`].
//!
//! # A Mirage peer dies
//!
//! With no unmap-notify, nothing changes in shared memory when a Mirage
//! endpoint (or our `OcamlVchan` one, when its process is killed) dies:
//! its live byte stays 1 and no event comes. A survivor notices only if
//! the whole domain goes (our liveness checks, see the crate docs);
//! otherwise only its own bound ends the wait: a connect timeout, or
//! [`crate::Vchan::set_io_timeout`] for reads and writes. That is the
//! limit of the protocol without unmap-notify, not something a peer can
//! fix; set an I/O timeout when the peer may be a unikernel.

use std::fmt;

use crate::control::{
    self, CLI_LIVE, CLI_NOTIFY, ControlError, LIVE_CONNECTED, LIVE_WAITING, Layout, MAX_RING_SHIFT,
    NOTIFY_WRITE, RingId, SRV_LIVE, SRV_NOTIFY, SharedHeader, grants_for,
};
use crate::error::{Error, Result};
use crate::transport::{DomId, Transport};
use crate::{Inner, Vchan};

/// Which implementation's observable behaviour an endpoint reproduces.
///
/// ```
/// assert_eq!(vchan::Compat::default(), vchan::Compat::Libxenvchan);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Compat {
    /// Xen's libxenvchan as Qubes uses it (the default; what
    /// [`Vchan::server`] and [`Vchan::client`] do).
    #[default]
    Libxenvchan,
    /// MirageOS's ocaml-vchan: its ring sizes and layout, no unmap-notify,
    /// lazy read acknowledgement, its xenstore and close sequences (see
    /// the [module docs](self)).
    OcamlVchan,
}

/// A vchan port: the last component of the xenstore path
/// `/local/domain/<server>/data/vchan/<client>/<port>`.
///
/// Qubes uses decimal numbers; ocaml-vchan allows any non-empty name of
/// `[a-zA-Z0-9_-]` characters, and so do we (at most
/// [`PortName::MAX_LEN`] bytes, which keeps the path far below
/// xenstore's limit).
///
/// ```
/// use vchan::PortName;
/// assert_eq!(PortName::from(512).as_str(), "512");
/// assert!(PortName::new("qubes_mirage-firewall").is_ok());
/// assert!(PortName::new("").is_err());
/// assert!(PortName::new("a/b").is_err());
/// assert_eq!(PortName::new("4242").unwrap().as_number(), Some(4242));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortName(String);

impl PortName {
    /// The longest name we accept.
    pub const MAX_LEN: usize = 255;

    /// Validates `name` with ocaml-vchan's rule, `[a-zA-Z0-9_-]+`.
    ///
    /// # Errors
    /// [`Error::Config`] for an empty name, a character outside the set,
    /// or a name longer than [`PortName::MAX_LEN`].
    pub fn new(name: &str) -> Result<PortName> {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if name.is_empty() || !name.chars().all(ok) {
            return Err(Error::config(format!(
                "vchan port {name:?}: a port must match [a-zA-Z0-9_-]+"
            )));
        }
        if name.len() > Self::MAX_LEN {
            return Err(Error::config(format!(
                "vchan port of {} bytes: at most {} allowed",
                name.len(),
                Self::MAX_LEN
            )));
        }
        Ok(PortName(name.to_string()))
    }

    /// The name as it appears in the xenstore path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The port as a number, if it is a plain decimal `u32` (the form
    /// Qubes and the socket transport use).
    pub fn as_number(&self) -> Option<u32> {
        if self.0.starts_with('0') && self.0.len() > 1 {
            return None;
        }
        self.0.parse().ok()
    }
}

impl From<u32> for PortName {
    fn from(port: u32) -> PortName {
        PortName(port.to_string())
    }
}

impl fmt::Display for PortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The order ocaml-vchan gives one ring of at least `size` bytes: 10 for
/// ≤ 1 KiB, 11 for ≤ 2 KiB, then the smallest order ≥ 12 that fits, capped
/// at 20 (`Location.suitable_locations`).
///
/// ```
/// use vchan::compat::ocaml_ring_order;
/// assert_eq!(ocaml_ring_order(0), 10);
/// assert_eq!(ocaml_ring_order(1025), 11);
/// assert_eq!(ocaml_ring_order(2049), 12);
/// assert_eq!(ocaml_ring_order(usize::MAX), 20);
/// ```
pub fn ocaml_ring_order(size: usize) -> u8 {
    (control::SMALL_RING_SHIFT..=MAX_RING_SHIFT)
        .find(|&o| (1usize << o) >= size)
        .unwrap_or(MAX_RING_SHIFT)
}

/// The `(left_order, right_order)` an ocaml-vchan server chooses for
/// `read_size` (left, its read ring) and `write_size` (right)
/// (`Location.of_lengths`): each ring by [`ocaml_ring_order`], then two
/// 1 KiB rings become 1 KiB + 2 KiB, and two 2 KiB rings become
/// **1 KiB** + 4 KiB (the read ring ends up smaller than asked, as in
/// ocaml-vchan). Never fails.
///
/// ```
/// use vchan::compat::ocaml_server_orders;
/// assert_eq!(ocaml_server_orders(1024, 1024), (10, 11)); // Mirage's default
/// assert_eq!(ocaml_server_orders(2048, 2048), (10, 12));
/// assert_eq!(ocaml_server_orders(4096, 4096), (12, 12));
/// assert_eq!(ocaml_server_orders(1024, 1 << 20), (10, 20)); // grants overlap
/// assert_eq!(ocaml_server_orders(1 << 24, 0), (20, 10)); // capped
/// ```
pub fn ocaml_server_orders(read_size: usize, write_size: usize) -> (u8, u8) {
    match (ocaml_ring_order(read_size), ocaml_ring_order(write_size)) {
        (10, 10) => (10, 11),
        (11, 11) => (10, 12),
        pair => pair,
    }
}

/// [`ocaml_server_orders`] as a [`Layout`]; its
/// [`Layout::grant_list_overlaps_ring`] is set for (10, 20) and (20, 10).
///
/// ```
/// let l = vchan::compat::ocaml_server_layout(1024, 1 << 20);
/// assert!(l.grant_list_overlaps_ring);
/// ```
pub fn ocaml_server_layout(read_size: usize, write_size: usize) -> Layout {
    let (l, r) = ocaml_server_orders(read_size, write_size);
    // Every pair ocaml_server_orders returns is in 10..=20 and never two
    // equal in-page orders, so this cannot fail; keep a typed fallback
    // anyway rather than a panic.
    Layout::new(l, r).unwrap_or_else(|_| Layout::new(12, 12).expect("12/12 is valid"))
}

/// Initialises a freshly shared control page as ocaml-vchan's server does:
/// the four indices 0, `cli_live = 2`, `srv_live = 1`, `cli_notify =
/// NOTIFY_WRITE`, `srv_notify = 0`, both orders and the grant list (left
/// pages first). Unlike [`control::init_server_page`] it does not zero the
/// rest of the page (the kernel's fresh pages are zero anyway).
///
/// # Errors
/// [`ControlError::GrantCount`] when a grant slice does not fit the layout.
pub fn init_server_page_ocaml<H: SharedHeader>(
    h: &H,
    layout: &Layout,
    left_grants: &[u32],
    right_grants: &[u32],
) -> std::result::Result<(), ControlError> {
    for (ring, grants) in [(RingId::Left, left_grants), (RingId::Right, right_grants)] {
        let expected = grants_for(layout.order(ring));
        if grants.len() != expected {
            return Err(ControlError::GrantCount {
                ring,
                expected,
                got: grants.len(),
            });
        }
    }
    for off in [
        control::LEFT_CONS,
        control::LEFT_PROD,
        control::RIGHT_CONS,
        control::RIGHT_PROD,
    ] {
        h.store_u32(off, 0);
    }
    h.store_u8(CLI_LIVE, LIVE_WAITING);
    h.store_u8(SRV_LIVE, LIVE_CONNECTED);
    h.store_u8(CLI_NOTIFY, NOTIFY_WRITE);
    h.store_u8(SRV_NOTIFY, 0);
    h.store_u16(control::LEFT_ORDER, u16::from(layout.left_order));
    h.store_u16(control::RIGHT_ORDER, u16::from(layout.right_order));
    for (i, &gref) in left_grants.iter().chain(right_grants).enumerate() {
        h.store_u32(control::grant_offset(i), gref);
    }
    // Everything above before the page is published (xenstore comes next).
    h.fence(std::sync::atomic::Ordering::Release);
    Ok(())
}

impl Vchan {
    /// As [`Vchan::server`], on a named port and behaving like `compat`
    /// (see [`Compat`] and the table in [`crate::compat`]).
    ///
    /// ```no_run
    /// use vchan::{Compat, PortName, Transport, Vchan};
    /// let t = Transport::from_env()?;
    /// let v = Vchan::server_with(&t, 0, &PortName::from(512), 4096, 4096, Compat::Libxenvchan)?;
    /// # drop(v); Ok::<(), vchan::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Vchan::server`]; with [`Compat::OcamlVchan`] sizes above 1 MiB
    /// are capped instead of refused, and the socket transport (no shared
    /// memory to lay out) refuses it with [`Error::Config`]. The socket
    /// transport takes only numeric ports.
    pub fn server_with(
        transport: &Transport,
        peer: DomId,
        port: &PortName,
        read_min: usize,
        write_min: usize,
        compat: Compat,
    ) -> Result<Vchan> {
        match transport {
            Transport::Socket { .. } => {
                socket_only_default(compat)?;
                Vchan::server(transport, peer, socket_port(port)?, read_min, write_min)
            }
            Transport::Xen | Transport::Local { .. } => {
                if compat == Compat::Libxenvchan
                    && (read_min > crate::MAX_RING_SIZE || write_min > crate::MAX_RING_SIZE)
                {
                    return Err(Error::config(format!(
                        "ring sizes {read_min}/{write_min}: the maximum is {} bytes per direction",
                        crate::MAX_RING_SIZE
                    )));
                }
                let ch = crate::shm::ShmChan::server_opts(
                    transport, peer, port, read_min, write_min, compat,
                )?;
                Ok(Vchan::from_inner(Inner::Shm(Box::new(ch))))
            }
        }
    }

    /// As [`Vchan::client`], on a named port and behaving like `compat`.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use vchan::{Compat, PortName, Transport, Vchan};
    /// let t = Transport::from_env()?;
    /// let port = PortName::new("echo")?;
    /// let v = Vchan::client_with(&t, 1, &port, Duration::from_secs(10), Compat::OcamlVchan)?;
    /// # drop(v); Ok::<(), vchan::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Vchan::client`]; [`Error::Config`] for [`Compat::OcamlVchan`]
    /// or a non-numeric port on the socket transport.
    pub fn client_with(
        transport: &Transport,
        peer: DomId,
        port: &PortName,
        timeout: std::time::Duration,
        compat: Compat,
    ) -> Result<Vchan> {
        match transport {
            Transport::Socket { .. } => {
                socket_only_default(compat)?;
                Vchan::client(transport, peer, socket_port(port)?, timeout)
            }
            Transport::Xen | Transport::Local { .. } => {
                let ch = crate::shm::ShmChan::client_opts(transport, peer, port, timeout, compat)?;
                Ok(Vchan::from_inner(Inner::Shm(Box::new(ch))))
            }
        }
    }

    /// As [`Vchan::client_start`] (a connect driven from `poll`), on a
    /// named port and behaving like `compat`.
    ///
    /// ```no_run
    /// use vchan::{Compat, PortName, Transport, Vchan};
    /// let t = Transport::from_env()?;
    /// let mut c = Vchan::client_start_with(&t, 1, &PortName::new("echo")?, Compat::OcamlVchan)?;
    /// let v = loop {
    ///     if let Some(v) = c.poll()? { break v; }
    ///     std::thread::sleep(std::time::Duration::from_millis(10)); // or poll(2) on c.as_fd()
    /// };
    /// # drop(v); Ok::<(), vchan::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Vchan::client_with`].
    pub fn client_start_with(
        transport: &Transport,
        peer: DomId,
        port: &PortName,
        compat: Compat,
    ) -> Result<crate::Connecting> {
        match transport {
            Transport::Socket { .. } => {
                socket_only_default(compat)?;
                Vchan::client_start(transport, peer, socket_port(port)?)
            }
            Transport::Xen | Transport::Local { .. } => Ok(crate::Connecting {
                inner: crate::ConnInner::Shm(Box::new(crate::shm::ShmConnecting::start_opts(
                    transport,
                    peer,
                    port.clone(),
                    compat,
                )?)),
            }),
        }
    }

    /// Which implementation this endpoint behaves like (the socket
    /// transport: always [`Compat::Libxenvchan`]).
    pub fn compat(&self) -> Compat {
        match &self.inner {
            Inner::Shm(c) => c.compat(),
            Inner::Socket(_) => Compat::Libxenvchan,
        }
    }

    fn from_inner(inner: Inner) -> Vchan {
        Vchan {
            inner,
            blocking: true,
        }
    }
}

fn socket_only_default(compat: Compat) -> Result<()> {
    if compat != Compat::Libxenvchan {
        return Err(Error::config(
            "the socket transport has no shared memory: only Compat::Libxenvchan applies",
        ));
    }
    Ok(())
}

fn socket_port(port: &PortName) -> Result<u32> {
    port.as_number().ok_or_else(|| {
        Error::config(format!(
            "vchan port {port}: the socket transport takes numeric ports only"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ocaml-vchan's `Location.of_lengths`, restated independently as the
    /// list it walks: 1 KiB, 2 KiB, 4 KiB … 1 MiB, first that fits, else
    /// the last.
    fn reference(read: usize, write: usize) -> (u8, u8) {
        let all: Vec<(u8, usize)> = (10..=20).map(|o| (o, 1usize << o)).collect();
        let pick = |s: usize| {
            all.iter()
                .find(|&&(_, len)| len >= s)
                .map_or(20, |&(o, _)| o)
        };
        match (pick(read), pick(write)) {
            (10, 10) => (10, 11),
            (11, 11) => (10, 12),
            p => p,
        }
    }

    #[test]
    fn orders_for_every_size_class_and_its_neighbours() {
        let mut sizes = vec![0usize, 1, usize::MAX, (1 << 20) + 1, 1 << 21];
        for o in 10..=20 {
            sizes.extend([(1usize << o) - 1, 1 << o, (1 << o) + 1]);
        }
        for &r in &sizes {
            for &w in &sizes {
                let (lo, ro) = ocaml_server_orders(r, w);
                assert_eq!((lo, ro), reference(r, w), "({r}, {w})");
                let l = Layout::new(lo, ro).expect("valid layout");
                // Overlap exactly when ocaml-vchan produces 10 beside 20.
                assert_eq!(
                    l.grant_list_overlaps_ring,
                    matches!((lo, ro), (10, 20) | (20, 10)),
                    "({r}, {w})"
                );
            }
        }
    }

    #[test]
    fn where_ocaml_differs_from_libxenvchan() {
        // Default request.
        assert_eq!(ocaml_server_orders(1024, 1024), (10, 11));
        assert_eq!(control::server_orders(1024, 1024), Ok((10, 11)));
        // 2 KiB both ways: ocaml shrinks the read ring to 1 KiB.
        assert_eq!(ocaml_server_orders(2048, 2048), (10, 12));
        assert_eq!(control::server_orders(2048, 2048), Ok((11, 12)));
        // 1 KiB read, 4 KiB write: libxenvchan upgrades the read ring to 2 KiB.
        assert_eq!(ocaml_server_orders(1024, 4096), (10, 12));
        assert_eq!(control::server_orders(1024, 4096), Ok((11, 12)));
        // Small write ring beside a large read ring.
        assert_eq!(ocaml_server_orders(65536, 100), (16, 10));
        assert_eq!(control::server_orders(65536, 100), Ok((16, 11)));
        // Above 1 MiB: capped vs refused.
        assert_eq!(ocaml_server_orders(1 << 21, 1 << 21), (20, 20));
        assert!(control::server_orders(1 << 21, 1 << 21).is_err());
    }

    #[test]
    fn port_names() {
        for ok in ["0", "512", "a", "Z-_9", &"x".repeat(255)] {
            assert!(PortName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", " ", "a b", "a/b", "a.b", "é", "@x", &"x".repeat(256)] {
            assert!(PortName::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(PortName::new("007").unwrap().as_number(), None);
        assert_eq!(PortName::new("4294967296").unwrap().as_number(), None);
        assert_eq!(PortName::from(u32::MAX).as_number(), Some(u32::MAX));
    }

    /// A plain-memory header (the test needs no shared memory).
    #[derive(Debug)]
    struct Mem(std::sync::Mutex<Vec<u8>>);

    impl SharedHeader for Mem {
        fn load_u32(&self, off: usize) -> u32 {
            let m = self.0.lock().unwrap();
            u32::from_le_bytes(m[off..off + 4].try_into().unwrap())
        }
        fn store_u32(&self, off: usize, val: u32) {
            self.0.lock().unwrap()[off..off + 4].copy_from_slice(&val.to_le_bytes());
        }
        fn load_u16(&self, off: usize) -> u16 {
            let m = self.0.lock().unwrap();
            u16::from_le_bytes(m[off..off + 2].try_into().unwrap())
        }
        fn store_u16(&self, off: usize, val: u16) {
            self.0.lock().unwrap()[off..off + 2].copy_from_slice(&val.to_le_bytes());
        }
        fn load_u8(&self, off: usize) -> u8 {
            self.0.lock().unwrap()[off]
        }
        fn store_u8(&self, off: usize, val: u8) {
            self.0.lock().unwrap()[off] = val;
        }
        fn fetch_or_u8(&self, off: usize, bits: u8) -> u8 {
            let mut m = self.0.lock().unwrap();
            let old = m[off];
            m[off] |= bits;
            old
        }
        fn fetch_and_u8(&self, off: usize, bits: u8) -> u8 {
            let mut m = self.0.lock().unwrap();
            let old = m[off];
            m[off] &= bits;
            old
        }
        fn fence(&self, _order: std::sync::atomic::Ordering) {}
    }

    #[test]
    fn ocaml_page_init_writes_the_header_and_leaves_the_rest() {
        let p = Mem(std::sync::Mutex::new(vec![0xEE; control::PAGE_SIZE]));
        let layout = ocaml_server_layout(4096, 8192);
        init_server_page_ocaml(&p, &layout, &[0x11], &[0x22, 0x33]).unwrap();
        let mut expect = [0u8; 36];
        expect[16] = 12;
        expect[18] = 13;
        expect[20] = LIVE_WAITING;
        expect[21] = LIVE_CONNECTED;
        expect[22] = NOTIFY_WRITE;
        expect[24] = 0x11;
        expect[28] = 0x22;
        expect[32] = 0x33;
        let b = p.0.lock().unwrap().clone();
        assert_eq!(&b[..36], &expect);
        assert!(b[36..].iter().all(|&x| x == 0xEE), "rest untouched");
        assert!(init_server_page_ocaml(&p, &layout, &[], &[1, 2]).is_err());
    }
}
