//! Memory shared with a peer, owned by types: a mapping stays mapped while
//! anything that can reach it lives.
//!
//! A mapping (a grant-table mapping, a test's guarded page, a heap page)
//! implements [`SharedMemory`]; the [`ControlPage`](crate::control::ControlPage)
//! and the [`RawRingBytes`](crate::ring::RawRingBytes) built on it hold an
//! [`Arc`] of it, so the memory is unmapped only after the last of them is
//! dropped, and their constructors are safe: a use after unmap cannot be
//! written in safe code. (This is rust-vmm vm-memory's idea of a region that
//! owns its mapping; we keep an `Arc` rather than a lifetime so that an
//! endpoint can be stored and moved freely.)
//!
//! What does not change: nothing ever makes a Rust reference into the
//! memory. The header is reached by single atomic accesses, ring bytes are
//! copied with `ptr::copy_nonoverlapping` or handed to the kernel as
//! `iovec`s, because the peer may write any byte at any time.
//!
//! ```
//! use std::sync::Arc;
//! use vchan::control::{ControlPage, SharedHeader, PAGE_SIZE};
//! use vchan::mem::{HeapPages, SharedMemory};
//!
//! let page = Arc::new(HeapPages::new(1));
//! let hdr = ControlPage::new(page.clone())?;
//! drop(page); // the header keeps the page alive
//! hdr.store_u8(20, 1);
//! assert_eq!(hdr.load_u8(20), 1);
//! # Ok::<(), vchan::mem::RegionError>(())
//! ```

use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::control::PAGE_SIZE;

/// A mapping of memory that another party (the peer domain) may read and
/// write at any time.
///
/// # Safety
/// An implementation guarantees, for as long as the object lives:
/// * [`as_ptr`](Self::as_ptr) is non-null, 4-byte aligned and the same at
///   every call;
/// * the `len()` bytes from it are valid for reads, and for writes when
///   [`is_writable`](Self::is_writable) says so;
/// * nothing in this process holds a Rust reference to those bytes (they
///   are reached through raw pointers and atomics only), so that the peer's
///   concurrent writes are no data race in the Rust sense.
///
/// ```
/// use vchan::mem::{HeapPages, SharedMemory};
/// let m = HeapPages::new(2);
/// assert_eq!(m.len(), 8192);
/// assert!(m.is_writable());
/// ```
pub unsafe trait SharedMemory: fmt::Debug + Send + Sync {
    /// The first byte.
    ///
    /// ```
    /// use vchan::mem::{HeapPages, SharedMemory};
    /// assert!((HeapPages::new(1).as_ptr() as usize).is_multiple_of(4096));
    /// ```
    fn as_ptr(&self) -> *mut u8;

    /// The size in bytes.
    ///
    /// ```
    /// use vchan::mem::{HeapPages, SharedMemory};
    /// assert_eq!(HeapPages::new(1).len(), 4096);
    /// ```
    fn len(&self) -> usize;

    /// Whether the mapping is empty (never, for a vchan's memory).
    ///
    /// ```
    /// use vchan::mem::{HeapPages, SharedMemory};
    /// assert!(!HeapPages::new(1).is_empty());
    /// ```
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether we may write (a client maps its read ring read-only).
    ///
    /// ```
    /// use vchan::mem::{HeapPages, SharedMemory};
    /// assert!(HeapPages::new(1).is_writable());
    /// ```
    fn is_writable(&self) -> bool;
}

/// Why a piece of shared memory cannot serve where it was offered.
///
/// ```
/// use std::sync::Arc;
/// use vchan::mem::{HeapPages, RegionError, checked_range};
/// let m: Arc<dyn vchan::mem::SharedMemory> = Arc::new(HeapPages::new(1));
/// assert_eq!(
///     checked_range(&m, 2048, 4096, false).unwrap_err(),
///     RegionError::OutOfBounds { offset: 2048, len: 4096, size: 4096 }
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The bytes asked for do not lie inside the mapping.
    #[error("bytes {offset}..+{len} lie outside a {size}-byte mapping")]
    OutOfBounds {
        /// Start, from the mapping's first byte.
        offset: usize,
        /// Length.
        len: usize,
        /// The mapping's size.
        size: usize,
    },
    /// The mapping's address is null or not 4-byte aligned.
    #[error("shared memory at {addr:#x} is null or not 4-byte aligned")]
    Misaligned {
        /// The address.
        addr: usize,
    },
    /// A read-only mapping where we must write (the control page, our
    /// write ring).
    #[error("read-only mapping where we must write")]
    ReadOnly,
}

/// Checks that `offset..offset + len` lies inside `mem` (and that `mem` is
/// writable, if `write`) and returns the address of `offset`.
///
/// # Errors
/// [`RegionError`].
///
/// ```
/// use std::sync::Arc;
/// use vchan::mem::{HeapPages, SharedMemory, checked_range};
/// let m: Arc<dyn SharedMemory> = Arc::new(HeapPages::new(1));
/// let p = checked_range(&m, 1024, 1024, true)?;
/// assert_eq!(p.as_ptr() as usize, m.as_ptr() as usize + 1024);
/// # Ok::<(), vchan::mem::RegionError>(())
/// ```
pub fn checked_range(
    mem: &Arc<dyn SharedMemory>,
    offset: usize,
    len: usize,
    write: bool,
) -> Result<NonNull<u8>, RegionError> {
    let base = mem.as_ptr();
    if base.is_null() || !(base as usize).is_multiple_of(4) {
        return Err(RegionError::Misaligned {
            addr: base as usize,
        });
    }
    let size = mem.len();
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(RegionError::OutOfBounds { offset, len, size });
    }
    if write && !mem.is_writable() {
        return Err(RegionError::ReadOnly);
    }
    // Address arithmetic only (`wrapping_add`, no access): `offset <= size`
    // keeps it inside the mapping or one past its end, never null.
    NonNull::new(base.wrapping_add(offset)).ok_or(RegionError::Misaligned { addr: 0 })
}

/// Zeroed, page-aligned private memory in the shape of shared memory: both
/// ends of a vchan in one process (tests, examples, in-memory pairs).
/// Reached only through raw pointers, like a real mapping.
///
/// ```
/// use vchan::mem::{HeapPages, SharedMemory};
/// let m = HeapPages::new(1);
/// assert_eq!(m.copy_out(), vec![0u8; 4096]);
/// ```
pub struct HeapPages {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the allocation is plain memory owned by this object and reached only through raw pointers (atomics and copies), as shared memory is.
unsafe impl Send for HeapPages {}
// SAFETY: as for `Send`.
unsafe impl Sync for HeapPages {}

impl HeapPages {
    /// `pages` zeroed pages (at least one).
    ///
    /// ```
    /// use vchan::mem::{HeapPages, SharedMemory};
    /// assert_eq!(HeapPages::new(0).len(), 4096);
    /// ```
    pub fn new(pages: usize) -> Self {
        Self::filled(pages, 0)
    }

    /// `pages` pages (at least one), every byte `fill`.
    ///
    /// ```
    /// use vchan::mem::HeapPages;
    /// assert!(HeapPages::filled(1, 0xEE).copy_out().iter().all(|&b| b == 0xEE));
    /// ```
    pub fn filled(pages: usize, fill: u8) -> Self {
        let len = pages.max(1) * PAGE_SIZE;
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        let Some(base) = NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout);
        };
        // SAFETY: `base` is our fresh allocation of `len` bytes.
        unsafe { base.as_ptr().write_bytes(fill, len) };
        HeapPages { base, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, PAGE_SIZE).expect("page-aligned layout")
    }

    /// A copy of every byte (through the raw pointer, no reference).
    ///
    /// ```
    /// use vchan::mem::HeapPages;
    /// assert_eq!(HeapPages::new(2).copy_out().len(), 8192);
    /// ```
    pub fn copy_out(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: `len` readable bytes at `base`; `v` is private memory.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr(), v.as_mut_ptr(), self.len) };
        v
    }
}

impl fmt::Debug for HeapPages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapPages")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: `base` is our own allocation of `len` bytes, aligned to a page, valid for reads and writes until `drop`, never referenced.
unsafe impl SharedMemory for HeapPages {
    fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_writable(&self) -> bool {
        true
    }
}

impl Drop for HeapPages {
    fn drop(&mut self) {
        // SAFETY: allocated in `filled` with this layout, freed only here; nothing can reach it any more (every user holds the `Arc` that is being dropped).
        unsafe { std::alloc::dealloc(self.base.as_ptr(), Self::layout(self.len)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct ReadOnly(HeapPages);
    // SAFETY: forwards to `HeapPages`, and only narrows what may be done.
    unsafe impl SharedMemory for ReadOnly {
        fn as_ptr(&self) -> *mut u8 {
            self.0.as_ptr()
        }
        fn len(&self) -> usize {
            self.0.len()
        }
        fn is_writable(&self) -> bool {
            false
        }
    }

    #[test]
    fn ranges_are_checked() {
        let m: Arc<dyn SharedMemory> = Arc::new(HeapPages::new(1));
        assert!(checked_range(&m, 0, 4096, true).is_ok());
        assert!(checked_range(&m, 4096, 0, true).is_ok());
        for (off, len) in [(1, 4096), (4097, 0), (usize::MAX, 2), (2048, usize::MAX)] {
            assert_eq!(
                checked_range(&m, off, len, false),
                Err(RegionError::OutOfBounds {
                    offset: off,
                    len,
                    size: 4096
                })
            );
        }
        let ro: Arc<dyn SharedMemory> = Arc::new(ReadOnly(HeapPages::new(1)));
        assert!(checked_range(&ro, 0, 4096, false).is_ok());
        assert_eq!(
            checked_range(&ro, 0, 4096, true),
            Err(RegionError::ReadOnly)
        );
    }

    #[test]
    fn filled_and_zeroed() {
        assert!(HeapPages::filled(3, 7).copy_out().iter().all(|&b| b == 7));
        assert_eq!(HeapPages::filled(3, 7).len(), 3 * PAGE_SIZE);
        assert!(HeapPages::new(1).copy_out().iter().all(|&b| b == 0));
    }
}
