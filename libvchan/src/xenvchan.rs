//! Xen's libxenvchan C API (`libxenvchan.h`, Debian's `libxen-dev`) on the
//! same machinery as the Qubes API: `libxenvchan_server_init`,
//! `_client_init`, `_close`, `_recv`, `_read`, `_send`, `_write`, `_wait`,
//! `_fd_for_select`, `_is_open`, `_data_ready`, `_buffer_space`.
//!
//! C programs hold a `struct libxenvchan *` and touch its public fields
//! (`ctrl->blocking = 1` in Xen's `vchan-node` and Qubes' libvchan-xen;
//! `is_server`, `event_port`, `read.order`, `write.order`). Our handle
//! therefore begins with [`Libxenvchan`], a `#[repr(C)]` copy of that
//! struct's layout (pinned against Debian's header by `tests/c_abi.rs`),
//! and every call first reads the `blocking` bit C may have changed.
//!
//! Where it differs from Xen's C library:
//!
//! * `xs_path` must be Qubes' layout, `data/vchan/<peer>/<port>` (server;
//!   relative, or absolute under `/local/domain/<self>/`) and
//!   `/local/domain/<server>/data/vchan/<self>/<port>` (client), since the
//!   vchan crate builds its paths from a peer and a port; anything else is
//!   refused (NULL, `EINVAL`). Xen's own `vchan-node` and all Qubes programs
//!   use this layout.
//! * `ring`, `read.shr` and `write.shr` point into a private page of ours,
//!   not the shared control page (which never leaves the vchan crate): a C
//!   program that writes there (Qubes' libvchan-xen clears `srv_live` after
//!   a domain death) changes nothing; `read.buffer`/`write.buffer` and the
//!   grant/event handles are NULL, `event_port` is 0. `read.order` and
//!   `write.order` are the real ring sizes.
//! * `server_persist` is ignored (the server ends with its client).
//! * bad input (NULL handle or data, a closed handle, packets larger than
//!   the ring) gets −1 with `errno` set and a log line, as in the Qubes API.
//! * the transport comes from the environment as for the Qubes API
//!   (`VCHAN_SOCKET_DIR`, `VCHAN_LOCAL_DIR`, else Xen).

use std::ffi::{CStr, CString, c_char, c_int, c_void};

use vchan::Vchan;

use crate::{Conn, Io, LibVchan, Registry, do_read, do_write, fail, guard, invalid, transport};

/// `struct libxenvchan_ring` (libxenvchan.h): a ring as C sees it.
#[repr(C)]
#[derive(Debug)]
pub struct LibxenvchanRing {
    /// `struct ring_shared *shr`: here into our private page.
    pub shr: *mut c_void,
    /// `void *buffer`: NULL (the ring's memory stays in the vchan crate).
    pub buffer: *mut c_void,
    /// `int order`: log2 of the ring size.
    pub order: c_int,
}

/// `struct libxenvchan` (libxenvchan.h, Xen 4.17), the fields C programs
/// read and write. The three one-bit fields `is_server`, `server_persist`
/// and `blocking` share the `int` after `event_port`; GCC on little-endian
/// targets allocates them from bit 0 up ([`FLAG_IS_SERVER`] …).
#[repr(C)]
#[derive(Debug)]
pub struct Libxenvchan {
    /// The union `xengntshr_handle *gntshr` / `xengnttab_handle *gnttab`: NULL.
    pub gnt: *mut c_void,
    /// `struct vchan_interface *ring`: our private page.
    pub ring: *mut c_void,
    /// `xenevtchn_handle *event`: NULL.
    pub event: *mut c_void,
    /// `uint32_t event_port`: 0.
    pub event_port: u32,
    /// The bit-fields `is_server:1`, `server_persist:1`, `blocking:1`.
    pub flags: c_int,
    /// `struct libxenvchan_ring read`.
    pub read: LibxenvchanRing,
    /// `struct libxenvchan_ring write`.
    pub write: LibxenvchanRing,
    /// `char *xs_path`: the server's base path (ours), NULL for a client.
    pub xs_path: *mut c_char,
}

/// `is_server` in [`Libxenvchan::flags`].
pub const FLAG_IS_SERVER: c_int = 1 << 0;
/// `server_persist` in [`Libxenvchan::flags`].
pub const FLAG_SERVER_PERSIST: c_int = 1 << 1;
/// `blocking` in [`Libxenvchan::flags`].
pub const FLAG_BLOCKING: c_int = 1 << 2;

/// The handle behind a C `struct libxenvchan *`: the public part first, so
/// the two pointers are the same.
#[repr(C)]
#[derive(Debug)]
pub struct XenVchan {
    public: Libxenvchan,
    inner: LibVchan,
    /// What `ring`, `read.shr` and `write.shr` point into.
    page: Box<[u64; 512]>,
    /// What `xs_path` points to.
    xs_path: Option<CString>,
}

static LIVE_XEN: Registry = Registry::new();

/// The libxenvchan handle behind `ctrl`, with the `blocking` bit C may have
/// set applied.
///
/// # Safety
/// As [`Registry::get`].
unsafe fn handle<'a>(ctrl: *mut XenVchan, op: &str) -> Option<&'a mut LibVchan> {
    // SAFETY: only XenVchan pointers are registered in LIVE_XEN; exclusive use is the caller's.
    let x = unsafe { LIVE_XEN.get(ctrl, op) }?;
    let blocking = x.public.flags & FLAG_BLOCKING != 0;
    if let Conn::Ready(v) = &mut x.inner.conn
        && v.is_blocking() != blocking
    {
        v.set_blocking(blocking);
    }
    Some(&mut x.inner)
}

/// Which end we are and the parts of a Qubes-layout path.
fn parse_path(op: &str, xs_path: *const c_char, server: bool) -> Option<(u32, u32)> {
    if xs_path.is_null() {
        invalid(op, "NULL xs_path");
        return None;
    }
    // SAFETY: the caller passes a NUL-terminated string (checked non-NULL).
    let path = unsafe { CStr::from_ptr(xs_path) }.to_string_lossy();
    let parts: Vec<&str> = path.split('/').collect();
    // [.., "data", "vchan", <domain>, <port>], after an optional
    // "/local/domain/<n>/" (required for a client: the server's domain).
    let ok = match parts.as_slice() {
        ["data", "vchan", d, p] if server => Some((*d, *p)),
        ["", "local", "domain", n, "data", "vchan", d, p] if vchan::parse_domid(n).is_some() => {
            Some((*d, *p))
        }
        _ => None,
    };
    let parsed = ok.and_then(|(d, p)| Some((vchan::parse_domid(d)?, p.parse::<u32>().ok()?)));
    match parsed {
        Some((d, p)) => Some((u32::from(d), p)),
        None => {
            invalid(
                op,
                format_args!(
                    "xs_path {path:?}: only Qubes' layout [/local/domain/<n>/]data/vchan/<domain>/<port> is supported"
                ),
            );
            None
        }
    }
}

fn make(v: Vchan, server: bool, xs_path: Option<CString>) -> *mut XenVchan {
    let mut v = v;
    // libxenvchan starts non-blocking; C sets `ctrl->blocking` itself.
    v.set_blocking(false);
    let (r, w) = (v.read_ring_size(), v.write_ring_size());
    let mut x = XenVchan {
        public: Libxenvchan {
            gnt: std::ptr::null_mut(),
            ring: std::ptr::null_mut(),
            event: std::ptr::null_mut(),
            event_port: 0,
            flags: if server { FLAG_IS_SERVER } else { 0 },
            read: LibxenvchanRing {
                shr: std::ptr::null_mut(),
                buffer: std::ptr::null_mut(),
                order: r.trailing_zeros() as c_int,
            },
            write: LibxenvchanRing {
                shr: std::ptr::null_mut(),
                buffer: std::ptr::null_mut(),
                order: w.trailing_zeros() as c_int,
            },
            xs_path: std::ptr::null_mut(),
        },
        inner: LibVchan::ready(v),
        page: Box::new([0u64; 512]),
        xs_path,
    };
    // The page is boxed: its address stays put when `x` moves into its
    // own box below. Left ring (`struct ring_shared`) at 0, right at 8;
    // the server reads the left ring, the client the right one.
    let base = x.page.as_mut_ptr().cast::<u8>();
    let (left, right) = (base, base.wrapping_add(8));
    x.public.ring = base.cast();
    (x.public.read.shr, x.public.write.shr) = if server {
        (left.cast(), right.cast())
    } else {
        (right.cast(), left.cast())
    };
    if let Some(p) = &x.xs_path {
        x.public.xs_path = p.as_ptr().cast_mut();
    }
    LIVE_XEN.register(x)
}

/// Creates a server for a client in `domain`, its nodes under `xs_path`
/// (`data/vchan/<domain>/<port>`), rings of at least `read_min` /
/// `write_min` bytes; returns at once, non-blocking. NULL on error.
///
/// # Safety
/// `xs_path` must be NULL or a NUL-terminated string; `logger` is unused.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libxenvchan_server_init(
    logger: *mut c_void,
    domain: c_int,
    xs_path: *const c_char,
    read_min: usize,
    write_min: usize,
) -> *mut XenVchan {
    const OP: &str = "libxenvchan_server_init";
    let _ = logger;
    guard(OP, std::ptr::null_mut(), || {
        let Some((peer, port)) = parse_path(OP, xs_path, true) else {
            return std::ptr::null_mut();
        };
        if u32::try_from(domain) != Ok(peer) {
            invalid(
                OP,
                format_args!("domain {domain} is not the one in xs_path ({peer})"),
            );
            return std::ptr::null_mut();
        }
        if read_min > vchan::MAX_RING_SIZE || write_min > vchan::MAX_RING_SIZE {
            invalid(
                OP,
                format_args!("ring sizes {read_min}/{write_min}: at most 1 MiB"),
            );
            return std::ptr::null_mut();
        }
        let Some(t) = transport(OP) else {
            return std::ptr::null_mut();
        };
        // SAFETY: checked non-NULL and NUL-terminated by parse_path.
        let path = unsafe { CStr::from_ptr(xs_path) }.to_owned();
        match Vchan::server(&t, peer as vchan::DomId, port, read_min, write_min) {
            Ok(v) => make(v, true, Some(path)),
            Err(e) => {
                fail(OP, &e);
                std::ptr::null_mut()
            }
        }
    })
}

/// Connects to the server in `domain` whose nodes are at `xs_path`
/// (`/local/domain/<domain>/data/vchan/<self>/<port>`), once, without
/// waiting: NULL (`ENOENT`) if the server is not there yet. Non-blocking.
///
/// # Safety
/// `xs_path` must be NULL or a NUL-terminated string; `logger` is unused.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libxenvchan_client_init(
    logger: *mut c_void,
    domain: c_int,
    xs_path: *const c_char,
) -> *mut XenVchan {
    const OP: &str = "libxenvchan_client_init";
    let _ = logger;
    guard(OP, std::ptr::null_mut(), || {
        let Some((_own, port)) = parse_path(OP, xs_path, false) else {
            return std::ptr::null_mut();
        };
        let Some((peer, port)) = crate::check_peer(OP, domain, port as c_int) else {
            return std::ptr::null_mut();
        };
        let Some(t) = transport(OP) else {
            return std::ptr::null_mut();
        };
        let attempt = Vchan::client_start(&t, peer, port).and_then(|mut c| c.poll());
        match attempt {
            Ok(Some(v)) => make(v, false, None),
            Ok(None) => {
                crate::log(OP, format_args!("no server at {domain}/{port}"));
                crate::set_errno(libc::ENOENT);
                std::ptr::null_mut()
            }
            Err(e) => {
                fail(OP, &e);
                std::ptr::null_mut()
            }
        }
    })
}

/// Closes the vchan and frees the handle (NULL or unknown: logged, ignored).
///
/// # Safety
/// `ctrl` must be NULL or a handle from this library, not used by another
/// thread during or after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libxenvchan_close(ctrl: *mut XenVchan) {
    const OP: &str = "libxenvchan_close";
    guard(OP, (), || {
        // The caller does not use the handle elsewhere.
        // SAFETY: only XenVchan pointers are registered in LIVE_XEN.
        unsafe { LIVE_XEN.free(ctrl, OP) }
    })
}

macro_rules! io_fn {
    ($(#[$doc:meta])* $name:ident, $ptr:ty, $core:ident, $kind:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// `ctrl` must be NULL or a handle from this library, used by one
        /// thread at a time; `data` must point to `size` bytes.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(ctrl: *mut XenVchan, data: $ptr, size: usize) -> c_int {
            const OP: &str = stringify!($name);
            guard(OP, -1, || {
                // SAFETY: the C contract: one thread per handle.
                match unsafe { handle(ctrl, OP) } {
                    Some(h) => $core(OP, h, data, size, $kind),
                    None => -1,
                }
            })
        }
    };
}

io_fn!(
    /// Packet receive: `size` bytes or nothing (0 when non-blocking).
    libxenvchan_recv, *mut c_void, do_read, Io::Packet
);
io_fn!(
    /// Stream read: what is there, up to `size` (0 when non-blocking and empty).
    libxenvchan_read, *mut c_void, do_read, Io::Stream
);
io_fn!(
    /// Packet send: `size` bytes or nothing (0 when non-blocking).
    libxenvchan_send, *const c_void, do_write, Io::Packet
);
io_fn!(
    /// Stream write: all of it when blocking, what fits when not.
    libxenvchan_write, *const c_void, do_write, Io::Stream
);

macro_rules! query_fn {
    ($(#[$doc:meta])* $name:ident, $err:expr, |$h:ident| $body:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// `ctrl` must be NULL or a handle from this library, used by one
        /// thread at a time.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(ctrl: *mut XenVchan) -> c_int {
            const OP: &str = stringify!($name);
            guard(OP, $err, || {
                // SAFETY: the C contract: one thread per handle.
                match unsafe { handle(ctrl, OP) } {
                    Some($h) => $body,
                    None => $err,
                }
            })
        }
    };
}

query_fn!(
    /// Waits for an event and consumes it; 0, or −1 on error.
    libxenvchan_wait, -1, |h| h.wait("libxenvchan_wait")
);
query_fn!(
    /// The fd to poll for readability before `libxenvchan_wait`.
    libxenvchan_fd_for_select, -1, |h| h.fd_for_select("libxenvchan_fd_for_select")
);
query_fn!(
    /// The peer's live state: 1 connected, 2 waiting for the client (server),
    /// 0 closed (also for a NULL or closed handle).
    libxenvchan_is_open, 0, |h| h.is_open()
);
query_fn!(
    /// Bytes ready to read.
    libxenvchan_data_ready, -1, |h| h.data_ready("libxenvchan_data_ready")
);
query_fn!(
    /// Bytes that can be written without waiting.
    libxenvchan_buffer_space, -1, |h| h.buffer_space("libxenvchan_buffer_space")
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The layout of Xen 4.17's `struct libxenvchan` on LP64, as Debian's
    /// header gives it (tests/c_abi.rs checks these numbers with gcc).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn layout_is_pinned() {
        assert_eq!(offset_of!(Libxenvchan, ring), 8);
        assert_eq!(offset_of!(Libxenvchan, event), 16);
        assert_eq!(offset_of!(Libxenvchan, event_port), 24);
        assert_eq!(offset_of!(Libxenvchan, flags), 28);
        assert_eq!(offset_of!(Libxenvchan, read), 32);
        assert_eq!(offset_of!(Libxenvchan, write), 56);
        assert_eq!(offset_of!(Libxenvchan, xs_path), 80);
        assert_eq!(size_of::<Libxenvchan>(), 88);
        assert_eq!(size_of::<LibxenvchanRing>(), 24);
        assert_eq!(offset_of!(LibxenvchanRing, order), 16);
        assert_eq!(offset_of!(XenVchan, public), 0);
        assert_eq!(
            (FLAG_IS_SERVER, FLAG_SERVER_PERSIST, FLAG_BLOCKING),
            (1, 2, 4)
        );
    }

    #[test]
    fn paths_in_qubes_layout_only() {
        let p = |s: &str, server: bool| {
            let c = CString::new(s).unwrap();
            parse_path("test", c.as_ptr(), server)
        };
        assert_eq!(p("data/vchan/3/512", true), Some((3, 512)));
        assert_eq!(p("/local/domain/0/data/vchan/3/512", true), Some((3, 512)));
        assert_eq!(p("/local/domain/7/data/vchan/0/111", false), Some((0, 111)));
        assert_eq!(p("data/vchan/3/512", false), None);
        assert_eq!(p("data/other/3/512", true), None);
        assert_eq!(p("data/vchan/03/512", true), None);
        assert_eq!(p("data/vchan/3/-1", true), None);
        assert_eq!(parse_path("test", std::ptr::null(), true), None);
    }

    /// NULL and unknown handles: the error return and EBADF, no crash.
    #[test]
    fn bad_handles() {
        let bogus = 0x1000 as *mut XenVchan;
        for ctrl in [std::ptr::null_mut(), bogus] {
            let mut b = [0u8; 4];
            // The library must refuse these pointers without dereferencing them.
            // SAFETY: NULL or unregistered handles are refused by lookup; `b` is a valid buffer.
            unsafe {
                nix::errno::Errno::clear();
                assert_eq!(libxenvchan_read(ctrl, b.as_mut_ptr().cast(), 4), -1);
                assert_eq!(nix::errno::Errno::last_raw(), libc::EBADF);
                assert_eq!(libxenvchan_send(ctrl, b.as_ptr().cast(), 4), -1);
                assert_eq!(libxenvchan_wait(ctrl), -1);
                assert_eq!(libxenvchan_is_open(ctrl), 0);
                assert_eq!(libxenvchan_data_ready(ctrl), -1);
                libxenvchan_close(ctrl);
            }
        }
    }
}
