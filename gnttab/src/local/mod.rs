//! The same-host double: processes on one host play domains, a [`Hub`]
//! thread plays the grant table, and the pages are real shared memory.
//!
//! See the [crate documentation](crate#the-same-host-double) for how it works
//! and how it differs from Xen.
//!
//! ```
//! use gnttab::Backend;
//! use gnttab::local::{Hub, Local};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let events = evtchn::local::Hub::start(dir.path())?;
//! let hub = Hub::start(dir.path(), events.clone())?;
//! // Usually in two processes:
//! let shared = Local::new(dir.path(), 1).share(2, 1, true)?;
//! let mapped = Local::new(dir.path(), 2).map(1, shared.refs(), true)?;
//! // SAFETY: both point to at least one page; nothing else touches byte 0.
//! unsafe {
//!     shared.as_ptr().write_volatile(42);
//!     assert_eq!(mapped.as_ptr().read_volatile(), 42);
//! }
//! drop((mapped, shared));
//! hub.shutdown();
//! events.shutdown();
//! # Ok(())
//! # }
//! ```

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, mmap_anonymous, munmap};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

mod hub;
mod proto;

pub use hub::{DOMAIN_GRANT_ENTRIES, DOMAIN_PAGE_LIMIT, Hub, HubHistory, HubStats};

use proto::{FDS_PER_REPLY, MAX_PACKET, MAX_PAGES, Reader, Request, SOCKET_NAME};

use crate::{
    Backend, DomId, Error, GrantRef, MappedPages, PAGE_SIZE, SharedPages, check_notify_offset,
};

/// How long a client waits for the hub's reply before giving up (a safety
/// net; the hub answers at once).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The operation names in errors that mirror the device's refusals.
const OP_SHARE: &str = "ALLOC_GREF (local grant hub)";
const OP_NOTIFY: &str = "SET_UNMAP_NOTIFY (local grant hub)";

/// One domain's view of the local grant table in directory `dir`.
///
/// Each share and each map opens its own connection to the [`Hub`] of that
/// directory, which must be running.
///
/// ```no_run
/// use gnttab::{Backend, local::Local};
/// # fn main() -> Result<(), gnttab::Error> {
/// let dom1 = Local::new("/tmp/vchan-demo", 1);
/// let pages = dom1.share(2, 2, true)?;
/// println!("share refs {:?}", pages.refs());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Local {
    dir: PathBuf,
    domid: DomId,
}

impl Local {
    /// The grant table of domain `domid`, served by the hub in `dir`.
    pub fn new(dir: impl Into<PathBuf>, domid: DomId) -> Local {
        Local {
            dir: dir.into(),
            domid,
        }
    }

    /// The domain this handle plays.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The rendezvous directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn connect(&self) -> Result<HubConn, Error> {
        let path = self.dir.join(SOCKET_NAME);
        let err = |op, e: Errno| Error::Hub {
            op,
            path: path.clone(),
            source: e.into(),
        };
        let addr = UnixAddr::new(&path).map_err(|e| err("connect hub", e))?;
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| err("socket", e))?;
        connect(sock.as_raw_fd(), &addr).map_err(|e| err("connect hub", e))?;
        let t = TimeVal::new(REPLY_TIMEOUT.as_secs() as _, 0);
        setsockopt(&sock, sockopt::ReceiveTimeout, &t).map_err(|e| err("SO_RCVTIMEO", e))?;
        setsockopt(&sock, sockopt::SendTimeout, &t).map_err(|e| err("SO_SNDTIMEO", e))?;
        Ok(HubConn { sock, path })
    }

    /// A name for the memfd that shows, in `/proc/<pid>/fd`, which domain
    /// and which hub directory it belongs to.
    fn memfd_name(&self) -> String {
        let dir = self
            .dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut name = format!("gnttab d{} {dir}", self.domid);
        name.truncate(200);
        while name.contains('\0') {
            name = name.replace('\0', "?");
        }
        name
    }
}

/// One connection to the hub; it carries one share or one map, and its end
/// is that object's release.
#[derive(Debug)]
struct HubConn {
    sock: OwnedFd,
    path: PathBuf,
}

/// A successful reply: payload and received descriptors.
type Answer = (Vec<u8>, Vec<OwnedFd>);

impl HubConn {
    /// Sends a request and waits for the reply. The outer error is the
    /// transport's, the inner one is the hub's refusal.
    fn call(&self, req: &Request, fds: &[RawFd]) -> Result<Result<Answer, Errno>, Error> {
        let err = |op, e: Errno| Error::Hub {
            op,
            path: self.path.clone(),
            source: e.into(),
        };
        proto::send_packet(self.sock.as_fd(), &req.encode(), fds, MsgFlags::empty())
            .map_err(|e| err("send to hub", e))?;
        let mut buf = vec![0u8; MAX_PACKET];
        let p = match proto::recv_packet(self.sock.as_fd(), &mut buf, MsgFlags::empty()) {
            Ok(Some(p)) => p,
            Ok(None) => return Err(err("read hub reply", Errno::ECONNRESET)),
            Err(Errno::EAGAIN) => return Err(err("read hub reply", Errno::ETIMEDOUT)),
            Err(e) => return Err(err("read hub reply", e)),
        };
        if p.truncated {
            return Err(self.protocol("oversized reply"));
        }
        let mut r = Reader::new(&buf[..p.len]);
        let status = r.i32().map_err(|w| self.protocol(w))?;
        if status != 0 {
            return Ok(Err(Errno::from_raw(status)));
        }
        buf.truncate(p.len);
        buf.drain(..4);
        Ok(Ok((buf, p.fds)))
    }

    fn protocol(&self, what: &str) -> Error {
        Error::HubProtocol {
            path: self.path.clone(),
            what: what.to_owned(),
        }
    }
}

/// A mapping this process made; unmapped exactly once.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain process memory with no thread affinity; only raw pointers to it are handed out.
unsafe impl Send for Mapping {}
// SAFETY: no method mutates through `&self`.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn unmap(&mut self) {
        if self.len != 0 {
            // SAFETY: `ptr`/`len` is a mapping this struct owns; it is unmapped once (len is zeroed after), and only raw pointers into it were ever handed out.
            let _ = unsafe { munmap(self.ptr.cast(), self.len) };
            self.len = 0;
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.unmap();
    }
}

impl Backend for Local {
    fn share(
        &self,
        peer: DomId,
        count: usize,
        writable: bool,
    ) -> Result<Box<dyn SharedPages>, Error> {
        Ok(Box::new(self.share_pages(peer, count, writable)?))
    }

    fn map(
        &self,
        granter: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Box<dyn MappedPages>, Error> {
        Ok(Box::new(self.map_pages(granter, refs, writable)?))
    }
}

impl Local {
    fn share_pages(&self, peer: DomId, count: usize, writable: bool) -> Result<LocalShared, Error> {
        if count == 0 {
            return Err(Error::InvalidArgument("zero pages".to_owned()));
        }
        if count > MAX_PAGES {
            // What ALLOC_GREF says for one request above the limit.
            return Err(Error::os(OP_SHARE, Errno::ENOSPC));
        }
        let len = NonZeroUsize::new(count * PAGE_SIZE)
            .ok_or_else(|| Error::InvalidArgument("zero pages".to_owned()))?;
        let conn = self.connect()?;
        let memfd = memfd_create(
            self.memfd_name().as_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| Error::os("memfd_create", e))?;
        // A fresh memfd of this size reads as zeroes: the pages start zeroed.
        nix::unistd::ftruncate(&memfd, len.get() as libc::off_t)
            .map_err(|e| Error::os("ftruncate memfd", e))?;
        // Nobody, peers included, may change the size under a mapping.
        fcntl(
            &memfd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(|e| Error::os("F_ADD_SEALS memfd", e))?;
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED) of a memfd exactly `len` bytes long, whose size is sealed.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &memfd,
                0,
            )
        }
        .map_err(|e| Error::os("mmap memfd", e))?;
        let mapping = Mapping {
            ptr: ptr.cast(),
            len: len.get(),
        };
        let req = Request::Share {
            dom: self.domid,
            peer,
            writable,
            count: count as u32,
        };
        let (payload, _) = conn
            .call(&req, &[memfd.as_raw_fd()])?
            .map_err(|e| Error::os(OP_SHARE, e))?;
        // The hub holds its own descriptor now; ours goes, the mapping stays.
        drop(memfd);
        let mut r = Reader::new(&payload);
        let n = r.count(MAX_PAGES).map_err(|w| conn.protocol(w))?;
        let refs = (0..n)
            .map(|_| r.u32())
            .collect::<Result<Vec<GrantRef>, _>>()
            .map_err(|w| conn.protocol(w))?;
        r.finish().map_err(|w| conn.protocol(w))?;
        if refs.len() != count {
            return Err(conn.protocol("wrong number of refs"));
        }
        Ok(LocalShared {
            mapping,
            conn,
            refs,
        })
    }

    fn map_pages(
        &self,
        granter: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<LocalMapped, Error> {
        if refs.is_empty() {
            return Err(Error::InvalidArgument("no grant refs".to_owned()));
        }
        if refs.len() > MAX_PAGES {
            return Err(Error::InvalidArgument(format!(
                "{} refs in one map (the local double maps at most {MAX_PAGES})",
                refs.len()
            )));
        }
        let count = refs.len();
        let len = NonZeroUsize::new(count * PAGE_SIZE)
            .ok_or_else(|| Error::InvalidArgument("no grant refs".to_owned()))?;
        let conn = self.connect()?;
        let req = Request::Map {
            dom: self.domid,
            granter,
            writable,
            refs: refs.to_vec(),
        };
        let (payload, _) = conn.call(&req, &[])?.map_err(|e| {
            if e == Errno::EINVAL {
                Error::MapRefused {
                    granter,
                    refs: refs.to_vec(),
                    writable,
                    source: e.into(),
                }
            } else {
                Error::Hub {
                    op: "map",
                    path: conn.path.clone(),
                    source: e.into(),
                }
            }
        })?;
        // From here on, an error drops `conn`, and the hub takes that as the
        // end of the mapping.
        let runs = parse_map_reply(&payload, count).map_err(|w| conn.protocol(w))?;
        let nfds = runs.iter().map(|r| r.fd + 1).max().unwrap_or(0);

        // Reserve the whole range, then map each run of pages into place.
        // SAFETY: a fresh anonymous mapping chosen by the kernel; it touches no existing memory.
        let base = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_NONE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(|e| Error::os("mmap (reserve)", e))?;
        let mapping = Mapping {
            ptr: base.cast(),
            len: len.get(),
        };
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        let mut start = 0;
        while start < nfds {
            let (payload, fds) = conn
                .call(
                    &Request::Fds {
                        start: start as u32,
                    },
                    &[],
                )?
                .map_err(|e| Error::Hub {
                    op: "fetch pages",
                    path: conn.path.clone(),
                    source: e.into(),
                })?;
            let mut r = Reader::new(&payload);
            let n = r.u32().map_err(|w| conn.protocol(w))? as usize;
            r.finish().map_err(|w| conn.protocol(w))?;
            if n == 0 || n > FDS_PER_REPLY || n != fds.len() || start + n > nfds {
                return Err(conn.protocol("wrong number of descriptors"));
            }
            for run in runs.iter().filter(|r| (start..start + n).contains(&r.fd)) {
                map_run(&mapping, run, &fds[run.fd - start], prot).map_err(|w| conn.protocol(w))?;
            }
            start += n;
        }
        Ok(LocalMapped {
            mapping,
            conn,
            writable,
            notify_offset: None,
        })
    }
}

/// Pages `first..first + pages` of the mapping are pages
/// `page..page + pages` of memfd number `fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: usize,
    pages: usize,
    fd: usize,
    page: usize,
}

/// Checks a `MAP` reply and groups its entries into runs of consecutive
/// pages of one memfd.
fn parse_map_reply(payload: &[u8], count: usize) -> Result<Vec<Run>, &'static str> {
    let mut r = Reader::new(payload);
    let n = r.u32()? as usize;
    let nfds = r.u32()? as usize;
    if n != count || nfds == 0 || nfds > count {
        return Err("bad map reply header");
    }
    let mut runs: Vec<Run> = Vec::new();
    for i in 0..count {
        let fd = r.u32()? as usize;
        let page = r.u32()? as usize;
        if fd >= nfds || page >= MAX_PAGES {
            return Err("bad map reply entry");
        }
        match runs.last_mut() {
            Some(run) if run.fd == fd && run.page + run.pages == page => run.pages += 1,
            _ => runs.push(Run {
                first: i,
                pages: 1,
                fd,
                page,
            }),
        }
    }
    r.finish()?;
    Ok(runs)
}

/// Maps one run from its memfd into the reserved range.
fn map_run(
    mapping: &Mapping,
    run: &Run,
    fd: &OwnedFd,
    prot: ProtFlags,
) -> Result<(), &'static str> {
    let size = nix::sys::stat::fstat(fd)
        .map_err(|_| "fstat of a memfd failed")?
        .st_size;
    if size < 0 || ((run.page + run.pages) * PAGE_SIZE) as i64 > size {
        return Err("memfd shorter than its pages");
    }
    let len = NonZeroUsize::new(run.pages * PAGE_SIZE).ok_or("empty run")?;
    // SAFETY: `first + pages` ≤ the number of pages reserved in `mapping` (checked by parse_map_reply: one entry per page), so the address is inside our own PROT_NONE reservation, which MAP_FIXED may replace; nothing else lives there.
    let addr = unsafe { mapping.ptr.as_ptr().add(run.first * PAGE_SIZE) };
    let addr = NonZeroUsize::new(addr as usize).ok_or("null address")?;
    // SAFETY: see above; the memfd is long enough for the pages mapped.
    unsafe {
        mmap(
            Some(addr),
            len,
            prot,
            MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
            fd,
            (run.page * PAGE_SIZE) as libc::off_t,
        )
    }
    .map(drop)
    .map_err(|_| "mmap of a memfd failed")
}

/// Pages this process shares through the local hub.
#[derive(Debug)]
struct LocalShared {
    mapping: Mapping,
    conn: HubConn,
    refs: Vec<GrantRef>,
}

impl SharedPages for LocalShared {
    fn refs(&self) -> &[GrantRef] {
        &self.refs
    }

    fn as_ptr(&self) -> *mut u8 {
        self.mapping.ptr.as_ptr()
    }

    fn len(&self) -> usize {
        self.mapping.len
    }

    fn set_unmap_notify(&mut self, byte_offset: usize, port: u32) -> Result<(), Error> {
        check_notify_offset(byte_offset, self.mapping.len)?;
        let req = Request::Notify {
            offset: byte_offset as u32,
            port,
        };
        self.conn
            .call(&req, &[])?
            .map(drop)
            .map_err(|e| Error::os(OP_NOTIFY, e))
    }
}

impl Drop for LocalShared {
    fn drop(&mut self) {
        // As gntalloc: our mapping goes, then the hub (the "kernel") drops
        // its last local reference: it clears the byte, sends the event, and
        // revokes what no peer maps. Waiting for its answer makes that
        // happen before drop returns, as it would on Xen.
        self.mapping.unmap();
        let _ = self.conn.call(&Request::Release, &[]);
    }
}

/// A peer's pages mapped through the local hub.
#[derive(Debug)]
struct LocalMapped {
    mapping: Mapping,
    conn: HubConn,
    writable: bool,
    notify_offset: Option<usize>,
}

impl MappedPages for LocalMapped {
    fn as_ptr(&self) -> *mut u8 {
        self.mapping.ptr.as_ptr()
    }

    fn len(&self) -> usize {
        self.mapping.len
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn set_unmap_notify(&mut self, byte_offset: usize, port: u32) -> Result<(), Error> {
        if !self.writable {
            // gntdev refuses CLEAR_BYTE on a read-only mapping.
            return Err(Error::os(OP_NOTIFY, Errno::EINVAL));
        }
        check_notify_offset(byte_offset, self.mapping.len)?;
        let req = Request::Notify {
            offset: byte_offset as u32,
            port,
        };
        self.conn
            .call(&req, &[])?
            .map_err(|e| Error::os(OP_NOTIFY, e))?;
        self.notify_offset = Some(byte_offset);
        Ok(())
    }
}

impl Drop for LocalMapped {
    fn drop(&mut self) {
        // As gntdev: the byte is cleared at munmap, the event goes at the
        // unmap of the grant (here: the hub's RELEASE), docs/vchan.md §16 row 1d.
        if let Some(off) = self.notify_offset
            && self.writable
            && off < self.mapping.len
        {
            // SAFETY: `off` is inside our writable mapping, which is still mapped; a volatile byte store through a raw pointer.
            unsafe { self.mapping.ptr.as_ptr().add(off).write_volatile(0) };
        }
        self.mapping.unmap();
        let _ = self.conn.call(&Request::Release, &[]);
    }
}

#[cfg(test)]
mod tests;
