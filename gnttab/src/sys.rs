//! Raw Linux uapi of the grant devices: `#[repr(C)]` argument structs and
//! ioctl numbers, restated from `include/uapi/xen/gntalloc.h` and
//! `include/uapi/xen/gntdev.h`. Every number and size is pinned by a unit
//! test against the literal in docs/vchan.md §7.

use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// `_IOC_NONE` (asm-generic/ioctl.h; x86 and arm64, the architectures Xen
/// runs Linux guests on).
const IOC_NONE: u32 = 0;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
/// `_IOC_SIZEBITS` is 14.
const IOC_SIZEMAX: usize = (1 << 14) - 1;

/// `_IOC(dir, type, nr, size)` from asm-generic/ioctl.h.
const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size <= IOC_SIZEMAX);
    (dir << IOC_DIRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
}

/// The grant devices' ioctls are all `_IOC(_IOC_NONE, 'G', nr, sizeof(struct))`.
const fn ioc_g<T>(nr: u8) -> u32 {
    ioc(IOC_NONE, b'G', nr, size_of::<T>())
}

// ---------------------------------------------------------------------------
// include/uapi/xen/gntalloc.h

/// `struct ioctl_gntalloc_alloc_gref` (gntalloc.h). The kernel reads the
/// fixed part and writes `count` grant ids from `gref_ids` on; the C struct
/// declares one id, so its `sizeof` (which goes into the ioctl number) is 24
/// with trailing padding, not 20.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntallocAllocGref {
    /// `uint16_t domid`: the domain that may map the pages.
    pub domid: u16,
    /// `uint16_t flags`: `GNTALLOC_FLAG_WRITABLE` or 0.
    pub flags: u16,
    /// `uint32_t count`: number of pages.
    pub count: u32,
    /// `uint64_t index` (out): the mmap offset of the pages.
    pub index: u64,
    /// `uint32_t gref_ids[1]` (out, variable length): the grant refs.
    pub gref_ids: [u32; 1],
}

/// Size of the fixed part of `struct ioctl_gntalloc_alloc_gref`, before
/// `gref_ids`.
pub const GNTALLOC_ALLOC_GREF_FIXED: usize = 16;

/// `#define GNTALLOC_FLAG_WRITABLE 1` (gntalloc.h).
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// `#define IOCTL_GNTALLOC_ALLOC_GREF _IOC(_IOC_NONE, 'G', 5, sizeof(struct ioctl_gntalloc_alloc_gref))`
pub const IOCTL_GNTALLOC_ALLOC_GREF: u32 = ioc_g::<GntallocAllocGref>(5);

/// `struct ioctl_gntalloc_dealloc_gref` (gntalloc.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntallocDeallocGref {
    /// `uint64_t index`: the mmap offset returned by ALLOC_GREF.
    pub index: u64,
    /// `uint32_t count`: number of pages.
    pub count: u32,
}

/// `#define IOCTL_GNTALLOC_DEALLOC_GREF _IOC(_IOC_NONE, 'G', 6, sizeof(struct ioctl_gntalloc_dealloc_gref))`
pub const IOCTL_GNTALLOC_DEALLOC_GREF: u32 = ioc_g::<GntallocDeallocGref>(6);

/// `struct ioctl_gntalloc_unmap_notify` (gntalloc.h); gntdev.h declares
/// `struct ioctl_gntdev_unmap_notify` with the same layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UnmapNotify {
    /// `uint64_t index`: mmap offset of the pages plus the byte offset.
    pub index: u64,
    /// `uint32_t action`: `UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT`.
    pub action: u32,
    /// `uint32_t event_channel_port`: a port bound in our own domain.
    pub event_channel_port: u32,
}

/// `#define IOCTL_GNTALLOC_SET_UNMAP_NOTIFY _IOC(_IOC_NONE, 'G', 7, sizeof(struct ioctl_gntalloc_unmap_notify))`
pub const IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: u32 = ioc_g::<UnmapNotify>(7);

/// `#define UNMAP_NOTIFY_CLEAR_BYTE 0x1` (gntalloc.h, gntdev.h).
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// `#define UNMAP_NOTIFY_SEND_EVENT 0x2` (gntalloc.h, gntdev.h).
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

// ---------------------------------------------------------------------------
// include/uapi/xen/gntdev.h

/// `struct ioctl_gntdev_grant_ref` (gntdev.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntdevGrantRef {
    /// `uint32_t domid`: the granting domain.
    pub domid: u32,
    /// `uint32_t ref`: the grant ref.
    pub gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` (gntdev.h), declared with one ref;
/// the kernel reads `count` refs from `refs` on.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntdevMapGrantRef {
    /// `uint32_t count`.
    pub count: u32,
    /// `uint32_t pad`.
    pub pad: u32,
    /// `uint64_t index` (out): the mmap offset of the mapping.
    pub index: u64,
    /// `struct ioctl_gntdev_grant_ref refs[1]` (variable length).
    pub refs: [GntdevGrantRef; 1],
}

/// Size of the fixed part of `struct ioctl_gntdev_map_grant_ref`, before `refs`.
pub const GNTDEV_MAP_GRANT_REF_FIXED: usize = 16;

/// `#define IOCTL_GNTDEV_MAP_GRANT_REF _IOC(_IOC_NONE, 'G', 0, sizeof(struct ioctl_gntdev_map_grant_ref))`
pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = ioc_g::<GntdevMapGrantRef>(0);

/// `struct ioctl_gntdev_unmap_grant_ref` (gntdev.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntdevUnmapGrantRef {
    /// `uint64_t index`: the mmap offset from MAP_GRANT_REF.
    pub index: u64,
    /// `uint32_t count`.
    pub count: u32,
    /// `uint32_t pad`.
    pub pad: u32,
}

/// `#define IOCTL_GNTDEV_UNMAP_GRANT_REF _IOC(_IOC_NONE, 'G', 1, sizeof(struct ioctl_gntdev_unmap_grant_ref))`
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = ioc_g::<GntdevUnmapGrantRef>(1);

/// `struct ioctl_gntdev_get_offset_for_vaddr` (gntdev.h). Not used by this
/// crate; restated so that its number stays pinned.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct GntdevGetOffsetForVaddr {
    /// `uint64_t vaddr`.
    pub vaddr: u64,
    /// `uint64_t offset` (out).
    pub offset: u64,
    /// `uint32_t count` (out).
    pub count: u32,
    /// `uint32_t pad`.
    pub pad: u32,
}

/// `#define IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR _IOC(_IOC_NONE, 'G', 2, sizeof(struct ioctl_gntdev_get_offset_for_vaddr))`
#[cfg_attr(not(test), allow(dead_code))]
pub const IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR: u32 = ioc_g::<GntdevGetOffsetForVaddr>(2);

/// `struct ioctl_gntdev_set_max_grants` (gntdev.h). Not used (the pvops
/// kernel answers ENOTTY); restated so that its number stays pinned.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct GntdevSetMaxGrants {
    /// `uint32_t count`.
    pub count: u32,
}

/// `#define IOCTL_GNTDEV_SET_MAX_GRANTS _IOC(_IOC_NONE, 'G', 3, sizeof(struct ioctl_gntdev_set_max_grants))`
#[cfg_attr(not(test), allow(dead_code))]
pub const IOCTL_GNTDEV_SET_MAX_GRANTS: u32 = ioc_g::<GntdevSetMaxGrants>(3);

/// `#define IOCTL_GNTDEV_SET_UNMAP_NOTIFY _IOC(_IOC_NONE, 'G', 7, sizeof(struct ioctl_gntdev_unmap_notify))`
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 = ioc_g::<UnmapNotify>(7);

// ---------------------------------------------------------------------------

/// Issues `ioctl(fd, request, arg)` and returns its non-negative result.
///
/// # Safety
///
/// `arg` must point to memory that is valid for reads and writes of as many
/// bytes as the kernel accesses for `request` (for the variable-length
/// structs: the fixed part plus `count` entries), and must be suitably
/// aligned for the struct.
pub unsafe fn ioctl(
    fd: BorrowedFd<'_>,
    request: u32,
    arg: *mut libc::c_void,
) -> Result<i32, Errno> {
    // `request as _` adapts to the libc flavour (c_ulong on glibc, c_int on
    // musl); the numbers fit 32 bits.
    // SAFETY: `fd` is an open descriptor (a `BorrowedFd` guarantees it for the call); the caller guarantees `arg` per this function's contract.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    Errno::result(rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gntalloc_numbers_match_spec() {
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x0018_4705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x0010_4706);
        assert_eq!(IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, 0x0010_4707);
        assert_eq!(GNTALLOC_FLAG_WRITABLE, 1);
        assert_eq!(UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT, 0x3);
    }

    #[test]
    fn gntdev_numbers_match_spec() {
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
        assert_eq!(IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR, 0x0018_4702);
        assert_eq!(IOCTL_GNTDEV_SET_MAX_GRANTS, 0x0004_4703);
        assert_eq!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY, 0x0010_4707);
    }

    #[test]
    fn struct_sizes_match_the_c_headers() {
        // 24, not 20: the trailing padding after the one declared gref id
        // is part of sizeof and so of the ioctl number.
        assert_eq!(size_of::<GntallocAllocGref>(), 24);
        assert_eq!(size_of::<GntallocDeallocGref>(), 16);
        assert_eq!(size_of::<UnmapNotify>(), 16);
        assert_eq!(size_of::<GntdevGrantRef>(), 8);
        assert_eq!(size_of::<GntdevMapGrantRef>(), 24);
        assert_eq!(size_of::<GntdevUnmapGrantRef>(), 16);
        assert_eq!(size_of::<GntdevGetOffsetForVaddr>(), 24);
        assert_eq!(size_of::<GntdevSetMaxGrants>(), 4);
    }

    #[test]
    fn field_offsets_match_the_c_headers() {
        assert_eq!(std::mem::offset_of!(GntallocAllocGref, flags), 2);
        assert_eq!(std::mem::offset_of!(GntallocAllocGref, count), 4);
        assert_eq!(std::mem::offset_of!(GntallocAllocGref, index), 8);
        assert_eq!(
            std::mem::offset_of!(GntallocAllocGref, gref_ids),
            GNTALLOC_ALLOC_GREF_FIXED
        );
        assert_eq!(std::mem::offset_of!(GntdevMapGrantRef, index), 8);
        assert_eq!(
            std::mem::offset_of!(GntdevMapGrantRef, refs),
            GNTDEV_MAP_GRANT_REF_FIXED
        );
        assert_eq!(std::mem::offset_of!(UnmapNotify, action), 8);
        assert_eq!(std::mem::offset_of!(UnmapNotify, event_channel_port), 12);
    }

    #[test]
    fn ioc_encodes_direction_size_type_and_number() {
        assert_eq!(ioc(IOC_NONE, b'E', 2, 4), 0x0004_4502); // IOCTL_EVTCHN_BIND_UNBOUND_PORT
        assert_eq!(ioc(IOC_NONE, b'E', 5, 0), 0x0000_4505); // IOCTL_EVTCHN_RESET
        assert_eq!(ioc(3, 0, 0, 0), 0xC000_0000);
    }
}
