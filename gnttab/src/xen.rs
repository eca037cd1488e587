//! The real backend: `/dev/xen/gntalloc` and `/dev/xen/gntdev` (docs/vchan.md §7).

use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::sys;
use crate::{
    Backend, DomId, Error, GrantRef, MappedPages, PAGE_SIZE, SharedPages, check_notify_offset,
};

const GNTALLOC: &str = "/dev/xen/gntalloc";
const GNTDEV: &str = "/dev/xen/gntdev";

/// The most pages one call may share or map. Linux `gntdev` refuses more
/// than 65536 grants per mapping (`xen_gntdev.limit`); `gntalloc` would fail
/// far earlier with `ENOSPC` at its default limit of 1024.
const MAX_PAGES_PER_CALL: usize = 65536;

/// How often `mmap` of a grant that answers `EAGAIN` (a paged-out grant) is
/// retried, one millisecond apart, before giving up: about one second.
const EAGAIN_RETRIES: u32 = 1000;

/// The real grant devices of a Xen domain.
///
/// Each [`share`](Backend::share) and [`map`](Backend::map) opens its own
/// device descriptor, so that the pages' lifetime is exactly that of the
/// returned object (or of the process).
///
/// ```no_run
/// use gnttab::{Backend, Xen};
/// # fn main() -> Result<(), gnttab::Error> {
/// let mut pages = Xen.share(0, 1, true)?;
/// pages.set_unmap_notify(21, 7)?; // port 7: bound earlier through evtchn
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct Xen;

fn open_device(path: &'static str) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| Error::Device { path, source })
}

fn check_count(count: usize) -> Result<NonZeroUsize, Error> {
    if count > MAX_PAGES_PER_CALL {
        return Err(Error::InvalidArgument(format!(
            "{count} pages in one call (at most {MAX_PAGES_PER_CALL})"
        )));
    }
    NonZeroUsize::new(count * PAGE_SIZE)
        .ok_or_else(|| Error::InvalidArgument("zero pages".to_owned()))
}

fn mmap_offset(index: u64) -> Result<libc::off_t, Error> {
    libc::off_t::try_from(index)
        .map_err(|_| Error::os("mmap (device index too large)", Errno::EOVERFLOW))
}

impl Backend for Xen {
    fn share(
        &self,
        peer: DomId,
        count: usize,
        writable: bool,
    ) -> Result<Box<dyn SharedPages>, Error> {
        let len = check_count(count)?;
        let dev = open_device(GNTALLOC)?;

        // The argument buffer: the 16-byte fixed part, then room for `count`
        // grant ids, at least sizeof(struct) = 24 bytes, 8-byte aligned.
        let bytes = (sys::GNTALLOC_ALLOC_GREF_FIXED + 4 * count)
            .max(std::mem::size_of::<sys::GntallocAllocGref>());
        let mut buf = vec![0u64; bytes.div_ceil(8)];
        let head = sys::GntallocAllocGref {
            domid: peer,
            flags: if writable {
                sys::GNTALLOC_FLAG_WRITABLE
            } else {
                0
            },
            count: count as u32, // <= MAX_PAGES_PER_CALL
            index: 0,
            gref_ids: [0],
        };
        let arg = buf.as_mut_ptr().cast::<sys::GntallocAllocGref>();
        // SAFETY: `buf` is 8-byte aligned and at least 24 bytes long, so a `GntallocAllocGref` fits at its start.
        unsafe { arg.write(head) };
        // SAFETY: `arg` points to `buf`, which has room for the fixed part and `count` u32 grant ids, as the kernel writes them.
        unsafe { sys::ioctl(dev.as_fd(), sys::IOCTL_GNTALLOC_ALLOC_GREF, arg.cast()) }
            .map_err(|e| Error::os("IOCTL_GNTALLOC_ALLOC_GREF", e))?;
        // SAFETY: as above; the kernel filled in `index`.
        let index = unsafe { arg.read() }.index;
        let ids = buf.as_ptr().cast::<u8>();
        let refs: Vec<GrantRef> = (0..count)
            .map(|i| {
                // SAFETY: byte `16 + 4 * i + 3` is inside `buf` for i < count; the read is unaligned-safe.
                unsafe {
                    ids.add(sys::GNTALLOC_ALLOC_GREF_FIXED + 4 * i)
                        .cast::<u32>()
                        .read_unaligned()
                }
            })
            .collect();

        let dealloc = |dev: &File| {
            let mut arg = sys::GntallocDeallocGref {
                index,
                count: count as u32,
            };
            // SAFETY: `arg` is a live, aligned struct of the size the ioctl number encodes.
            let _ = unsafe {
                sys::ioctl(
                    dev.as_fd(),
                    sys::IOCTL_GNTALLOC_DEALLOC_GREF,
                    (&raw mut arg).cast(),
                )
            };
        };
        let offset = match mmap_offset(index) {
            Ok(o) => o,
            Err(e) => {
                dealloc(&dev);
                return Err(e);
            }
        };
        // SAFETY: a fresh mapping chosen by the kernel (no address hint, no MAP_FIXED), so no existing memory is affected.
        let ptr = match unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                dev.as_fd(),
                offset,
            )
        } {
            Ok(p) => p.cast::<u8>(),
            Err(e) => {
                dealloc(&dev);
                return Err(Error::os("mmap (gntalloc)", e));
            }
        };
        Ok(Box::new(XenShared {
            dev,
            ptr,
            len: len.get(),
            index,
            refs,
        }))
    }

    fn map(
        &self,
        granter: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Box<dyn MappedPages>, Error> {
        let len = check_count(refs.len())?;
        let count = refs.len();
        let dev = open_device(GNTDEV)?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        let mut retries = 0;
        loop {
            let index = map_grant_ref(&dev, granter, refs)?;
            let offset = match mmap_offset(index) {
                Ok(o) => o,
                Err(e) => {
                    unmap_grant_ref(&dev, index, count);
                    return Err(e);
                }
            };
            // SAFETY: a fresh mapping chosen by the kernel (no address hint, no MAP_FIXED), so no existing memory is affected.
            match unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED, dev.as_fd(), offset) } {
                Ok(p) => {
                    return Ok(Box::new(XenMapped {
                        dev,
                        ptr: p.cast(),
                        len: len.get(),
                        index,
                        count,
                        writable,
                    }));
                }
                Err(e) => {
                    // A MAP_GRANT_REF index can be mmapped only once: drop it
                    // before anything else (docs/vchan.md §7.2).
                    unmap_grant_ref(&dev, index, count);
                    if e == Errno::EAGAIN && retries < EAGAIN_RETRIES {
                        retries += 1;
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    if e == Errno::EINVAL {
                        return Err(Error::MapRefused {
                            granter,
                            refs: refs.to_vec(),
                            writable,
                            source: e.into(),
                        });
                    }
                    return Err(Error::os("mmap (gntdev)", e));
                }
            }
        }
    }
}

fn map_grant_ref(dev: &File, granter: DomId, refs: &[GrantRef]) -> Result<u64, Error> {
    // The fixed 16 bytes, then one {domid, ref} pair (8 bytes) per ref; at
    // least sizeof(struct) = 24 bytes, 8-byte aligned.
    let bytes = (sys::GNTDEV_MAP_GRANT_REF_FIXED + 8 * refs.len())
        .max(std::mem::size_of::<sys::GntdevMapGrantRef>());
    let mut buf = vec![0u64; bytes.div_ceil(8)];
    let head = buf.as_mut_ptr().cast::<sys::GntdevMapGrantRef>();
    // SAFETY: `buf` is 8-byte aligned and at least 24 bytes long.
    unsafe {
        head.write(sys::GntdevMapGrantRef {
            count: refs.len() as u32, // <= MAX_PAGES_PER_CALL
            ..Default::default()
        })
    };
    // SAFETY: the fixed part is inside `buf`.
    let pairs = unsafe { head.cast::<u8>().add(sys::GNTDEV_MAP_GRANT_REF_FIXED) }
        .cast::<sys::GntdevGrantRef>();
    for (i, &gref) in refs.iter().enumerate() {
        // SAFETY: `buf` has room for `refs.len()` pairs after the fixed part, and offset 16 keeps the 4-byte alignment of `GntdevGrantRef`.
        unsafe {
            pairs.add(i).write(sys::GntdevGrantRef {
                domid: u32::from(granter),
                gref,
            })
        };
    }
    // SAFETY: the buffer holds the fixed part and `count` pairs, as the kernel reads them, and is aligned for the struct.
    unsafe { sys::ioctl(dev.as_fd(), sys::IOCTL_GNTDEV_MAP_GRANT_REF, head.cast()) }
        .map_err(|e| Error::os("IOCTL_GNTDEV_MAP_GRANT_REF", e))?;
    // SAFETY: as above; the kernel filled in `index`.
    Ok(unsafe { head.read() }.index)
}

fn unmap_grant_ref(dev: &File, index: u64, count: usize) {
    let mut arg = sys::GntdevUnmapGrantRef {
        index,
        count: count as u32,
        pad: 0,
    };
    // A failure leaves the grant mapped until the fd is closed, which is all
    // that could be done about it anyway.
    // SAFETY: `arg` is a live, aligned struct of the size the number encodes.
    let _ = unsafe {
        sys::ioctl(
            dev.as_fd(),
            sys::IOCTL_GNTDEV_UNMAP_GRANT_REF,
            (&raw mut arg).cast(),
        )
    };
}

fn set_unmap_notify(
    dev: &File,
    request: u32,
    op: &'static str,
    index: u64,
    port: u32,
) -> Result<(), Error> {
    let mut arg = sys::UnmapNotify {
        index,
        action: sys::UNMAP_NOTIFY_CLEAR_BYTE | sys::UNMAP_NOTIFY_SEND_EVENT,
        event_channel_port: port,
    };
    // SAFETY: `arg` is a live, aligned struct of the size the number encodes.
    unsafe { sys::ioctl(dev.as_fd(), request, (&raw mut arg).cast()) }
        .map(drop)
        .map_err(|e| Error::os(op, e))
}

/// Pages shared through `/dev/xen/gntalloc`.
#[derive(Debug)]
struct XenShared {
    dev: File,
    ptr: NonNull<u8>,
    len: usize,
    index: u64,
    refs: Vec<GrantRef>,
}

// SAFETY: the struct owns the mapping and the descriptor; it hands out only raw pointers, and unmaps exactly once, in `drop`. Nothing is tied to the creating thread.
unsafe impl Send for XenShared {}
// SAFETY: no method mutates through `&self`.
unsafe impl Sync for XenShared {}

impl SharedPages for XenShared {
    fn refs(&self) -> &[GrantRef] {
        &self.refs
    }

    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn set_unmap_notify(&mut self, byte_offset: usize, port: u32) -> Result<(), Error> {
        check_notify_offset(byte_offset, self.len)?;
        set_unmap_notify(
            &self.dev,
            sys::IOCTL_GNTALLOC_SET_UNMAP_NOTIFY,
            "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
            self.index + byte_offset as u64,
            port,
        )
    }
}

impl Drop for XenShared {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` is the mapping made in `share`, unmapped only here; the trait hands out raw pointers only, so no reference into it outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
        // Drop the file's reference too, so that the kernel's last reference
        // (and with it the unmap-notify) goes now. Closing `dev` right after
        // would do the same.
        let mut arg = sys::GntallocDeallocGref {
            index: self.index,
            count: self.refs.len() as u32,
        };
        // SAFETY: `arg` is a live, aligned struct of the size the number encodes.
        let _ = unsafe {
            sys::ioctl(
                self.dev.as_fd(),
                sys::IOCTL_GNTALLOC_DEALLOC_GREF,
                (&raw mut arg).cast(),
            )
        };
    }
}

/// A peer's pages mapped through `/dev/xen/gntdev`.
#[derive(Debug)]
struct XenMapped {
    dev: File,
    ptr: NonNull<u8>,
    len: usize,
    index: u64,
    count: usize,
    writable: bool,
}

// SAFETY: as for `XenShared`.
unsafe impl Send for XenMapped {}
// SAFETY: no method mutates through `&self`.
unsafe impl Sync for XenMapped {}

impl MappedPages for XenMapped {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn set_unmap_notify(&mut self, byte_offset: usize, port: u32) -> Result<(), Error> {
        check_notify_offset(byte_offset, self.len)?;
        // The kernel refuses CLEAR_BYTE on a read-only map with EINVAL.
        set_unmap_notify(
            &self.dev,
            sys::IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
            "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
            self.index + byte_offset as u64,
            port,
        )
    }
}

impl Drop for XenMapped {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` is the mapping made in `map`, unmapped only here; no reference into it outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
        // The notify byte is cleared at munmap, but the event is sent only
        // when the map's last reference goes: do it now, not at close
        // (docs/vchan.md §16 row 1d).
        unmap_grant_ref(&self.dev, self.index, self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_devices_the_error_names_the_device() {
        if std::path::Path::new(GNTALLOC).exists() {
            return; // a real Xen domain: nothing to check here
        }
        let e = Xen.share(0, 1, true).unwrap_err();
        assert!(matches!(e, Error::Device { path: GNTALLOC, .. }), "{e:?}");
        assert!(e.to_string().contains("/dev/xen/gntalloc"), "{e}");
        let e = Xen.map(0, &[8], false).unwrap_err();
        assert!(matches!(e, Error::Device { path: GNTDEV, .. }), "{e:?}");
    }

    #[test]
    fn counts_are_checked_before_the_device_is_opened() {
        assert!(matches!(
            Xen.share(0, 0, true),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Xen.map(0, &[], true),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Xen.share(0, MAX_PAGES_PER_CALL + 1, true),
            Err(Error::InvalidArgument(_))
        ));
    }
}
