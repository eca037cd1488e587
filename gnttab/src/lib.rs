//! Xen grant tables from user space: share pages with a peer domain through
//! `/dev/xen/gntalloc` and map a peer's pages through `/dev/xen/gntdev`, both
//! with unmap-notify; plus a same-host double with the same semantics.
//!
//! # What it is for
//!
//! A vchan server shares its control page and rings with the client domain
//! ([`Backend::share`], the *gntalloc* side) and the client maps them
//! ([`Backend::map`], the *gntdev* side). Both sides ask the kernel to clear a
//! byte of the shared page and send an event on an event channel when their
//! last reference to the pages goes away, also when the process dies
//! ([`SharedPages::set_unmap_notify`], [`MappedPages::set_unmap_notify`]):
//! that is how a vchan peer learns that the other side is gone.
//!
//! Two backends implement [`Backend`]:
//!
//! * [`Xen`] drives the real devices with raw ioctls and `mmap`
//!   (docs/vchan.md §7). Without `/dev/xen` it fails with
//!   [`Error::Device`], which names the device.
//! * [`local::Local`] is a same-host double: processes on one Linux host play
//!   domains, and a [`local::Hub`] thread plays the hypervisor's grant table.
//!   The memory is real shared memory (a sealed `memfd` per share), so two
//!   processes really share the pages and a ring built on them behaves as on
//!   Xen.
//!
//! Memory obtained here is shared with an untrusted peer: both traits hand
//! out raw pointers only, never slices. Read and write it with raw-pointer or
//! volatile copies, and load every peer-written value once.
//!
//! # The same-host double
//!
//! The hub listens on `<dir>/gnttab.sock` (unix `SOCK_SEQPACKET`). Every
//! [`SharedPages`] / [`MappedPages`] object of the double holds its own
//! connection; a connection starts by saying which domain the client is.
//!
//! * **Share.** The client creates a `memfd` of `count * 4096` bytes (so the
//!   pages start zeroed), seals its size, maps it `MAP_SHARED`, and passes it
//!   to the hub with `SCM_RIGHTS`. The hub assigns grant refs per granting
//!   domain (unique across all processes of that domain, never 0, not
//!   necessarily consecutive) and enforces the Linux `gntalloc` default limit
//!   of 1024 pages per domain ([`local::DOMAIN_PAGE_LIMIT`]), failing with
//!   `ENOSPC`.
//! * **Map.** The hub checks that every ref exists, is granted to the
//!   mapper's domain, and is writable if a writable map is asked for; any
//!   failure is `EINVAL`, as `mmap` reports it on Xen. For a read-only map
//!   the hub hands out a read-only descriptor, so the mapper cannot map the
//!   pages writable. The mapper reserves address space and maps each run of
//!   pages at its place, so refs from several shares map contiguously.
//! * **Lifetime and unmap-notify.** When a sharer drops its pages or dies,
//!   the hub clears the notify byte (with `pwrite` on the `memfd`, the same
//!   pages every mapping sees) and *then* fires the event from the sharer's
//!   port, which it holds from the moment the notify was set, just as the
//!   kernel does. The grant stays mappable while some mapper still maps it
//!   and is revoked at its last unmap. When a mapper drops its pages it
//!   clears the byte itself at `munmap` and the hub fires the event at the
//!   unmap; when a mapper dies the hub clears the byte and fires the event.
//! * Nothing stays on disk or in `/dev/shm`: the `memfd`s vanish with their
//!   last descriptor or mapping, and [`local::Hub::shutdown`] removes the
//!   socket.
//!
//! # How the double differs from the real devices
//!
//! * Domains are claimed, not proven: a client says which domain it is. The
//!   double reproduces the semantics for processes that follow the rules;
//!   it does not confine a hostile process (one that keeps the `memfd`
//!   descriptor it was handed keeps the pages after the grant is revoked;
//!   the sealed size keeps it from shrinking them under anyone's mapping).
//! * A write through a read-only mapping raises `SIGSEGV` (Xen: `SIGBUS`),
//!   and `mprotect(PROT_WRITE)` on it fails with `EACCES` (Xen: it returns 0
//!   and the write faults later).
//! * A revoked grant fails to map at once after the last unmap; Xen revokes
//!   it up to about a second later (docs/vchan.md §7.1, §16 row 2c).
//! * Map refusals come from the hub as `EINVAL`, before anything is mapped;
//!   there is no `MAP_GRANT_REF` index, no `EAGAIN` retry, and no
//!   paged-out grants.
//! * A map asks for at most 1024 refs at a time (Linux allows 65536).
//! * Grant refs start at 8 and are not reused (Xen reuses freed refs). Each
//!   domain has [`local::DOMAIN_GRANT_ENTRIES`] grant entries, orphans
//!   included, like Xen's default grant table.
//! * On process death the notify is done when the hub has seen the
//!   connection close, a moment after the exit, not inside it. On an orderly
//!   drop it is done before `drop` returns, as on Xen.
//! * A process that forks without `exec` shares the connection with its
//!   child, so the pages are released when both have let go (on Xen an
//!   inherited gntalloc mapping has a similar effect).
//! * If the hub goes away, every connection closes and no notify is sent;
//!   the double does not model a dying *domain* (docs/vchan.md §16 row D).

//! # Example
//!
//! ```no_run
//! use gnttab::{Backend, Xen};
//!
//! # fn main() -> Result<(), gnttab::Error> {
//! // In domain 1: share one writable page with domain 2.
//! let shared = Xen.share(2, 1, true)?;
//! let refs = shared.refs().to_vec();
//! // ... publish `refs` in xenstore; in domain 2:
//! let mapped = Xen.map(1, &refs, true)?;
//! assert_eq!(mapped.len(), gnttab::PAGE_SIZE);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io;
use std::path::PathBuf;

pub mod local;
mod sys;
mod xen;

pub use xen::Xen;

pub use xen_base::DomId;

/// A grant reference (`grant_ref_t`): the index of an entry in the granting
/// domain's grant table.
pub type GrantRef = u32;

/// The size of one granted page in bytes (x86 and Arm, as Xen grants them).
pub const PAGE_SIZE: usize = 4096;

/// The errors of this crate: each names the operation and carries the
/// operating system's error where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A grant device could not be opened (typically: not a Xen domain).
    #[error(
        "cannot open {path}: {source} (not running in a Xen domain with the \
         xen_gntalloc/xen_gntdev modules loaded? gnttab::local is the same-host double)"
    )]
    Device {
        /// The device path, e.g. `/dev/xen/gntalloc`.
        path: &'static str,
        /// The error from `open`.
        #[source]
        source: io::Error,
    },
    /// A system call or device operation failed.
    #[error("{op}: {source}")]
    Os {
        /// The operation, e.g. `IOCTL_GNTALLOC_ALLOC_GREF` or `mmap`.
        op: &'static str,
        /// The error the operating system (or the double) reported.
        #[source]
        source: io::Error,
    },
    /// The granting domain's pages could not be mapped: a ref was not granted
    /// to us, never existed, was revoked, or is read-only and a writable map
    /// was asked for. Xen reports all of these as `EINVAL` from `mmap`.
    #[error(
        "cannot map grant refs {} of domain {granter} ({}): {source}",
        RefList(refs),
        if *writable { "read-write" } else { "read-only" }
    )]
    MapRefused {
        /// The granting domain named in the request.
        granter: DomId,
        /// The refs asked for.
        refs: Vec<GrantRef>,
        /// Whether a writable mapping was asked for.
        writable: bool,
        /// The error reported (`EINVAL` for every grant problem).
        #[source]
        source: io::Error,
    },
    /// Talking to the local grant hub failed.
    #[error("{op} (local grant hub {}): {source}", path.display())]
    Hub {
        /// The operation, e.g. `connect hub`.
        op: &'static str,
        /// The hub's socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The local grant hub answered something that does not fit the protocol.
    #[error("local grant hub {}: protocol error: {what}", path.display())]
    HubProtocol {
        /// The hub's socket.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// The caller passed an argument that cannot work (no pages, an offset
    /// beyond the pages, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// The OS error number behind this error, if there is one (`ENOSPC` when
    /// the per-domain grant limit is reached, `EINVAL` for refused maps, ...).
    ///
    /// ```
    /// let e = gnttab::Error::Os {
    ///     op: "IOCTL_GNTALLOC_ALLOC_GREF",
    ///     source: std::io::Error::from_raw_os_error(libc::ENOSPC),
    /// };
    /// assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    /// ```
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Device { source, .. }
            | Error::Os { source, .. }
            | Error::MapRefused { source, .. }
            | Error::Hub { source, .. } => source.raw_os_error(),
            Error::HubProtocol { .. } | Error::InvalidArgument(_) => None,
        }
    }

    pub(crate) fn os(op: &'static str, errno: nix::errno::Errno) -> Error {
        Error::Os {
            op,
            source: io::Error::from(errno),
        }
    }
}

impl From<Error> for io::Error {
    /// Keeps the kind of the underlying OS error, and the whole [`Error`]
    /// (reachable with `get_ref().downcast_ref::<gnttab::Error>()`).
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Device { source, .. }
            | Error::Os { source, .. }
            | Error::MapRefused { source, .. }
            | Error::Hub { source, .. } => source.kind(),
            Error::HubProtocol { .. } => io::ErrorKind::InvalidData,
            Error::InvalidArgument(_) => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

/// Shows a list of refs in an error message without flooding it.
struct RefList<'a>(&'a [GrantRef]);

impl fmt::Display for RefList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        write!(f, "[")?;
        for (i, r) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{r}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, ", ... ({} refs)", self.0.len())?;
        }
        write!(f, "]")
    }
}

/// Pages we share with a peer domain (the *gntalloc* side).
///
/// The pages form one contiguous mapping of [`len`](SharedPages::len) bytes
/// at [`as_ptr`](SharedPages::as_ptr). They are shared with an untrusted
/// peer, so this trait gives raw pointers only; never build a slice or a
/// reference into them. Dropping the object unshares the pages (and runs the
/// unmap-notify if one was set).
pub trait SharedPages: fmt::Debug + Send + Sync {
    /// The grant refs of the pages, one per page, in page order. They need
    /// not be consecutive.
    fn refs(&self) -> &[GrantRef];

    /// The start of the mapping, valid for [`len`](SharedPages::len) bytes
    /// for as long as `self` lives.
    fn as_ptr(&self) -> *mut u8;

    /// The length of the mapping: number of pages × [`PAGE_SIZE`].
    fn len(&self) -> usize;

    /// Whether there are no pages (never true for pages a backend returned).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Kernel unmap-notify: when the last local reference to the pages goes
    /// (drop, or death of the process), clear the byte at `byte_offset` and
    /// then send an event on our local event channel `port` (a port bound in
    /// OUR domain, e.g. the one from `bind_unbound`). The port stays held
    /// until the notify has been sent, even if the process dies.
    ///
    /// Calling it again replaces the previous notify.
    fn set_unmap_notify(&mut self, byte_offset: usize, port: u32) -> Result<(), Error>;
}

/// A peer's pages mapped into our address space (the *gntdev* side).
///
/// Same pointer rules as [`SharedPages`]. A read-only mapping must never be
/// written: the write faults.
pub trait MappedPages: fmt::Debug + Send + Sync {
    /// The start of the mapping, valid for [`len`](MappedPages::len) bytes
    /// for as long as `self` lives.
    fn as_ptr(&self) -> *mut u8;

    /// The length of the mapping: number of refs × [`PAGE_SIZE`].
    fn len(&self) -> usize;

    /// Whether there are no pages (never true for pages a backend returned).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the mapping is writable.
    fn writable(&self) -> bool;

    /// Unmap-notify: when we unmap the pages (drop, or death of the
    /// process), clear the byte at `byte_offset` and send an event on our
    /// local event channel `port`. The byte is cleared at the unmap of the
    /// memory, the event follows (docs/vchan.md §7.2).
    ///
    /// Fails with `EINVAL` on a read-only mapping, as the real gntdev does.
    /// Calling it again replaces the previous notify.
    fn set_unmap_notify(&mut self, byte_offset: usize, port: u32) -> Result<(), Error>;
}

/// A way to share and map grant pages: the real devices ([`Xen`]) or the
/// same-host double ([`local::Local`]).
pub trait Backend: fmt::Debug + Send + Sync {
    /// Shares `count` new zeroed pages with domain `peer`, which may map them
    /// read-write if `writable`, else read-only.
    ///
    /// Fails with `ENOSPC` when our domain would hold more granted pages than
    /// its limit (1024 by default on Linux).
    fn share(
        &self,
        peer: DomId,
        count: usize,
        writable: bool,
    ) -> Result<Box<dyn SharedPages>, Error>;

    /// Maps the pages `refs` granted by domain `granter` as one contiguous
    /// mapping, in the order of `refs`.
    ///
    /// Every grant problem is [`Error::MapRefused`].
    fn map(
        &self,
        granter: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Box<dyn MappedPages>, Error>;
}

/// Checks a notify offset against a mapping length.
pub(crate) fn check_notify_offset(byte_offset: usize, len: usize) -> Result<(), Error> {
    if byte_offset >= len {
        return Err(Error::InvalidArgument(format!(
            "unmap-notify offset {byte_offset} is beyond the {len} mapped bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_list_is_bounded_in_messages() {
        let refs: Vec<GrantRef> = (1..=300).collect();
        let e = Error::MapRefused {
            granter: 1,
            refs,
            writable: true,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("[1, 2, 3, 4, 5, 6, 7, 8, ... (300 refs)]"),
            "{msg}"
        );
        assert!(msg.contains("domain 1"), "{msg}");
        assert!(msg.contains("read-write"), "{msg}");
    }

    #[test]
    fn io_error_keeps_kind_and_error() {
        let e = Error::Os {
            op: "IOCTL_GNTALLOC_ALLOC_GREF",
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::StorageFull);
        let inner = io.get_ref().and_then(|e| e.downcast_ref::<Error>());
        assert_eq!(inner.and_then(Error::raw_os_error), Some(libc::ENOSPC));
        assert!(io.to_string().starts_with("IOCTL_GNTALLOC_ALLOC_GREF: "));
    }

    #[test]
    fn notify_offset_must_be_inside() {
        assert!(check_notify_offset(4095, 4096).is_ok());
        assert!(matches!(
            check_notify_offset(4096, 4096),
            Err(Error::InvalidArgument(_))
        ));
    }
}
