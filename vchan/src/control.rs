// Why this file is long (~1400 lines): about 540 are doc comments and 380
// the unit tests (offsets pinned against the C header, run under Miri in
// CI); the code, about 500 lines, is the control page's layout, order
// rules and header access.
//! The vchan control page: constants, byte offsets, ring order selection and
//! placement, and typed access to the shared header.
//!
//! Everything here restates `xen/include/public/io/libxenvchan.h` and the
//! order logic of libxenvchan's `init.c` (docs/vchan.md §2–§4). The header is reached
//! only through the [`SharedHeader`] trait: single atomic accesses at fixed
//! offsets, never a Rust reference to a whole header or to ring bytes. The
//! real implementation is [`ControlPage`] (a raw pointer to a mapped page);
//! tests and the `loom` model supply their own.
//!
//! ```
//! use vchan::control::{server_orders, Layout, RingLocation};
//!
//! // Qubes qrexec control channel: 4096/4096 → one external page per ring.
//! let (left, right) = server_orders(4096, 4096).unwrap();
//! assert_eq!((left, right), (12, 12));
//! let layout = Layout::new(left, right).unwrap();
//! assert_eq!(layout.left, RingLocation::External { first_grant_index: 0, pages: 1 });
//! assert_eq!(layout.right, RingLocation::External { first_grant_index: 1, pages: 1 });
//! ```

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, Ordering, fence};

use crate::mem::{RegionError, SharedMemory, checked_range};

// ---------------------------------------------------------------------------
// Constants (docs/vchan.md §2)

/// Xen page size; vchan assumes 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u8 = 12;
/// Order of the in-page ring at [`SMALL_RING_OFFSET`] (1024 bytes).
pub const SMALL_RING_SHIFT: u8 = 10;
/// Byte offset of the order-10 ring inside the control page.
pub const SMALL_RING_OFFSET: usize = 1024;
/// Order of the in-page ring at [`LARGE_RING_OFFSET`] (2048 bytes).
pub const LARGE_RING_SHIFT: u8 = 11;
/// Byte offset of the order-11 ring inside the control page.
pub const LARGE_RING_OFFSET: usize = 2048;
/// Smallest valid ring order.
pub const MIN_RING_SHIFT: u8 = SMALL_RING_SHIFT;
/// Largest valid ring order (1 MiB per ring).
pub const MAX_RING_SHIFT: u8 = 20;
/// Largest ring size in bytes, `1 << MAX_RING_SHIFT`.
pub const MAX_RING_SIZE: usize = 1 << MAX_RING_SHIFT;

/// Notify bit: "notify me when data has been written".
pub const NOTIFY_WRITE: u8 = 0x01;
/// Notify bit: "notify me when data has been consumed".
pub const NOTIFY_READ: u8 = 0x02;

/// Live byte value: the side has closed (or its process died).
pub const LIVE_EXITED: u8 = 0;
/// Live byte value: the side is connected.
pub const LIVE_CONNECTED: u8 = 1;
/// Live byte value: the client has not connected yet (only in `cli_live`).
pub const LIVE_WAITING: u8 = 2;

/// `sizeof(struct vchan_interface)`: the grant list starts here.
pub const HEADER_SIZE: usize = 24;

/// Xenstore node holding the control page's grant reference.
pub const XS_RING_REF: &str = "ring-ref";
/// Xenstore node holding the server's unbound event-channel port.
pub const XS_EVENT_CHANNEL: &str = "event-channel";

// ---------------------------------------------------------------------------
// Offsets (docs/vchan.md §3)

/// `left.cons` (u32): bytes consumed from the left ring; written by the server.
pub const LEFT_CONS: usize = 0;
/// `left.prod` (u32): bytes produced into the left ring; written by the client.
pub const LEFT_PROD: usize = 4;
/// `right.cons` (u32): bytes consumed from the right ring; written by the client.
pub const RIGHT_CONS: usize = 8;
/// `right.prod` (u32): bytes produced into the right ring; written by the server.
pub const RIGHT_PROD: usize = 12;
/// `left_order` (u16): log2 of the left ring size; server, at init only.
pub const LEFT_ORDER: usize = 16;
/// `right_order` (u16): log2 of the right ring size; server, at init only.
pub const RIGHT_ORDER: usize = 18;
/// `cli_live` (u8): client state as seen by the server.
pub const CLI_LIVE: usize = 20;
/// `srv_live` (u8): server state as seen by the client.
pub const SRV_LIVE: usize = 21;
/// `cli_notify` (u8): notification requests addressed to the client.
pub const CLI_NOTIFY: usize = 22;
/// `srv_notify` (u8): notification requests addressed to the server.
pub const SRV_NOTIFY: usize = 23;
/// `grants[]` (u32 each): left-ring pages first, then right-ring pages.
pub const GRANTS: usize = 24;

/// Byte offset of `grants[index]` in the control page.
///
/// ```
/// assert_eq!(vchan::control::grant_offset(0), 24);
/// assert_eq!(vchan::control::grant_offset(2), 32);
/// ```
pub const fn grant_offset(index: usize) -> usize {
    GRANTS + 4 * index
}

/// `struct ring_shared` of the C header (`cons` first).
///
/// Documentation and layout tests only: never used to form a reference into
/// shared memory.
///
/// ```
/// assert_eq!(std::mem::size_of::<vchan::control::RingShared>(), 8);
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingShared {
    /// Consumer index.
    pub cons: u32,
    /// Producer index.
    pub prod: u32,
}

/// Mirror of `struct vchan_interface` (without the flexible `grants[]`).
///
/// Its field offsets are pinned against the `LEFT_CONS` … `SRV_NOTIFY`
/// constants by a unit test. It exists for documentation and that test:
/// code never forms a reference of this type into shared memory.
///
/// ```
/// use vchan::control::{VchanInterface, HEADER_SIZE};
/// assert_eq!(std::mem::size_of::<VchanInterface>(), HEADER_SIZE);
/// assert_eq!(std::mem::offset_of!(VchanInterface, cli_live), vchan::control::CLI_LIVE);
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VchanInterface {
    /// Left ring indices (client → server).
    pub left: RingShared,
    /// Right ring indices (server → client).
    pub right: RingShared,
    /// log2 of the left ring size.
    pub left_order: u16,
    /// log2 of the right ring size.
    pub right_order: u16,
    /// Client live byte.
    pub cli_live: u8,
    /// Server live byte.
    pub srv_live: u8,
    /// Notification requests addressed to the client.
    pub cli_notify: u8,
    /// Notification requests addressed to the server.
    pub srv_notify: u8,
}

// ---------------------------------------------------------------------------
// Errors

/// Errors of order selection and layout validation.
///
/// ```
/// use vchan::control::{ControlError, Layout};
/// assert!(matches!(Layout::new(9, 12), Err(ControlError::InvalidOrder { .. })));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// A requested ring size exceeds 1 MiB (libxenvchan refuses these).
    #[error(
        "requested {ring} ring size {requested} bytes exceeds the vchan maximum of {max} bytes"
    )]
    SizeTooLarge {
        /// Which ring (`left` = server read ring, `right` = server write ring).
        ring: RingId,
        /// Requested minimum size in bytes.
        requested: usize,
        /// The protocol maximum ([`MAX_RING_SIZE`]).
        max: usize,
    },
    /// A ring order outside `10..=20`.
    #[error("invalid {ring} ring order {order} (valid: {MIN_RING_SHIFT}..={MAX_RING_SHIFT})")]
    InvalidOrder {
        /// Which ring.
        ring: RingId,
        /// The order found (raw value from the control page).
        order: u16,
    },
    /// Both rings have the same in-page order and would overlap.
    #[error("both rings have in-page order {order}; they would overlap in the control page")]
    OrderCollision {
        /// The shared order (10 or 11).
        order: u8,
    },
    /// The number of grant references given does not match the layout.
    #[error("{ring} ring needs {expected} grant references, {got} given")]
    GrantCount {
        /// Which ring.
        ring: RingId,
        /// Grants the layout needs.
        expected: usize,
        /// Grants supplied.
        got: usize,
    },
}

// ---------------------------------------------------------------------------
// Rings, sides, locations

/// One of the two rings of a vchan.
///
/// ```
/// use vchan::control::{RingId, LEFT_PROD};
/// assert_eq!(RingId::Left.prod_offset(), LEFT_PROD);
/// assert_eq!(RingId::Left.to_string(), "left");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RingId {
    /// Client → server (the server's read ring).
    Left,
    /// Server → client (the server's write ring).
    Right,
}

impl RingId {
    /// Offset of this ring's `cons` index.
    ///
    /// ```
    /// use vchan::control::RingId;
    /// assert_eq!(RingId::Left.cons_offset(), 0);
    /// assert_eq!(RingId::Right.cons_offset(), 8);
    /// ```
    pub const fn cons_offset(self) -> usize {
        match self {
            RingId::Left => LEFT_CONS,
            RingId::Right => RIGHT_CONS,
        }
    }

    /// Offset of this ring's `prod` index.
    ///
    /// ```
    /// use vchan::control::RingId;
    /// assert_eq!(RingId::Left.prod_offset(), 4);
    /// assert_eq!(RingId::Right.prod_offset(), 12);
    /// ```
    pub const fn prod_offset(self) -> usize {
        match self {
            RingId::Left => LEFT_PROD,
            RingId::Right => RIGHT_PROD,
        }
    }

    /// Offset of this ring's `*_order` field.
    ///
    /// ```
    /// use vchan::control::RingId;
    /// assert_eq!(RingId::Left.order_offset(), 16);
    /// assert_eq!(RingId::Right.order_offset(), 18);
    /// ```
    pub const fn order_offset(self) -> usize {
        match self {
            RingId::Left => LEFT_ORDER,
            RingId::Right => RIGHT_ORDER,
        }
    }
}

impl fmt::Display for RingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RingId::Left => "left",
            RingId::Right => "right",
        })
    }
}

/// Which end of the vchan we are.
///
/// The mapping is fixed by the protocol (docs/vchan.md §1, §3): the server reads the
/// left ring and writes the right ring; a side ORs notification requests into
/// the *peer's* notify byte and test-and-clears *its own*.
///
/// ```
/// use vchan::control::{Side, RingId, SRV_NOTIFY, CLI_NOTIFY};
/// assert_eq!(Side::Server.read_ring(), RingId::Left);
/// assert_eq!(Side::Server.own_notify(), SRV_NOTIFY);
/// assert_eq!(Side::Server.peer_notify(), CLI_NOTIFY);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Granted the memory; reads left, writes right.
    Server,
    /// Mapped the memory; reads right, writes left.
    Client,
}

impl Side {
    /// The ring this side consumes.
    ///
    /// ```
    /// use vchan::control::{RingId, Side};
    /// assert_eq!(Side::Client.read_ring(), RingId::Right);
    /// ```
    pub const fn read_ring(self) -> RingId {
        match self {
            Side::Server => RingId::Left,
            Side::Client => RingId::Right,
        }
    }

    /// The ring this side produces into.
    ///
    /// ```
    /// use vchan::control::{RingId, Side};
    /// assert_eq!(Side::Server.write_ring(), RingId::Right);
    /// assert_eq!(Side::Client.write_ring(), RingId::Left);
    /// ```
    pub const fn write_ring(self) -> RingId {
        match self {
            Side::Server => RingId::Right,
            Side::Client => RingId::Left,
        }
    }

    /// Offset of our own live byte (`srv_live` for the server).
    ///
    /// ```
    /// use vchan::control::{Side, CLI_LIVE, SRV_LIVE};
    /// assert_eq!(Side::Server.own_live(), SRV_LIVE);
    /// assert_eq!(Side::Client.own_live(), CLI_LIVE);
    /// ```
    pub const fn own_live(self) -> usize {
        match self {
            Side::Server => SRV_LIVE,
            Side::Client => CLI_LIVE,
        }
    }

    /// Offset of the peer's live byte (`cli_live` for the server).
    ///
    /// ```
    /// use vchan::control::{Side, CLI_LIVE};
    /// assert_eq!(Side::Server.peer_live(), CLI_LIVE);
    /// ```
    pub const fn peer_live(self) -> usize {
        match self {
            Side::Server => CLI_LIVE,
            Side::Client => SRV_LIVE,
        }
    }

    /// Offset of the notify byte we test-and-clear after producing or
    /// consuming (requests addressed to us): `srv_notify` for the server.
    ///
    /// ```
    /// use vchan::control::{Side, CLI_NOTIFY};
    /// assert_eq!(Side::Client.own_notify(), CLI_NOTIFY);
    /// ```
    pub const fn own_notify(self) -> usize {
        match self {
            Side::Server => SRV_NOTIFY,
            Side::Client => CLI_NOTIFY,
        }
    }

    /// Offset of the notify byte we OR our requests into (addressed to the
    /// peer): `cli_notify` for the server.
    ///
    /// ```
    /// use vchan::control::{Side, SRV_NOTIFY};
    /// assert_eq!(Side::Client.peer_notify(), SRV_NOTIFY);
    /// ```
    pub const fn peer_notify(self) -> usize {
        match self {
            Side::Server => CLI_NOTIFY,
            Side::Client => SRV_NOTIFY,
        }
    }
}

/// Where a ring's bytes live (docs/vchan.md §4.1).
///
/// ```
/// use vchan::control::{Layout, RingId, RingLocation};
/// let l = Layout::new(11, 16).unwrap();
/// assert_eq!(l.location(RingId::Left), RingLocation::InPage { offset: 2048 });
/// assert_eq!(l.location(RingId::Right), RingLocation::External { first_grant_index: 0, pages: 16 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingLocation {
    /// Inside the control page, at `offset` (1024 for order 10, 2048 for 11).
    InPage {
        /// Byte offset in the control page.
        offset: usize,
    },
    /// In separately granted pages, mapped virtually contiguously.
    External {
        /// Index in `grants[]` of the ring's first page.
        first_grant_index: usize,
        /// Number of pages, `2^(order − 12)`.
        pages: usize,
    },
}

/// Number of granted pages a ring of `order` needs: 0 for the in-page orders
/// 10 and 11, `2^(order − 12)` above.
///
/// Meaningful for valid orders (10..=20); the result saturates instead of
/// overflowing for nonsense orders.
///
/// ```
/// use vchan::control::grants_for;
/// assert_eq!(grants_for(10), 0);
/// assert_eq!(grants_for(11), 0);
/// assert_eq!(grants_for(12), 1);
/// assert_eq!(grants_for(16), 16);
/// assert_eq!(grants_for(20), 256);
/// ```
pub const fn grants_for(order: u8) -> usize {
    if order < PAGE_SHIFT {
        0
    } else if (order - PAGE_SHIFT) as u32 >= usize::BITS {
        usize::MAX
    } else {
        1usize << (order - PAGE_SHIFT)
    }
}

/// Smallest order ≥ 12 whose size is at least `min_size` (docs/vchan.md §4.2, step 2).
///
/// ```
/// use vchan::control::min_order;
/// assert_eq!(min_order(0), 12);
/// assert_eq!(min_order(4096), 12);
/// assert_eq!(min_order(4097), 13);
/// assert_eq!(min_order(65537), 17);
/// ```
pub const fn min_order(min_size: usize) -> u8 {
    let mut order = PAGE_SHIFT;
    // Terminates: callers pass at most MAX_RING_SIZE; for larger inputs the
    // loop stops at the width of usize.
    while order < (usize::BITS - 1) as u8 && (1usize << order) < min_size {
        order += 1;
    }
    order
}

/// Ring orders chosen by a libxenvchan server for the requested minimum
/// sizes (docs/vchan.md §4.2): `read_min` is the left ring (the server's read ring),
/// `write_min` the right ring. Returns `(left_order, right_order)`.
///
/// ```
/// use vchan::control::server_orders;
/// assert_eq!(server_orders(0, 0).unwrap(), (10, 11));
/// assert_eq!(server_orders(65536, 65536).unwrap(), (16, 16));
/// assert!(server_orders(1 << 20 | 1, 0).is_err());
/// ```
///
/// # Errors
/// [`ControlError::SizeTooLarge`] when either size exceeds 1 MiB.
pub fn server_orders(read_min: usize, write_min: usize) -> Result<(u8, u8), ControlError> {
    for (ring, requested) in [(RingId::Left, read_min), (RingId::Right, write_min)] {
        if requested > MAX_RING_SIZE {
            return Err(ControlError::SizeTooLarge {
                ring,
                requested,
                max: MAX_RING_SIZE,
            });
        }
    }
    let mut left = min_order(read_min);
    let mut right = min_order(write_min);
    let small = 1usize << SMALL_RING_SHIFT;
    let large = 1usize << LARGE_RING_SHIFT;
    // First matching rule wins (libxenvchan init.c).
    if read_min <= small && write_min <= large {
        (left, right) = (SMALL_RING_SHIFT, LARGE_RING_SHIFT);
    } else if read_min <= large && write_min <= small {
        (left, right) = (LARGE_RING_SHIFT, SMALL_RING_SHIFT);
    } else if read_min <= large {
        left = LARGE_RING_SHIFT;
    } else if write_min <= large {
        right = LARGE_RING_SHIFT;
    }
    Ok((left, right))
}

/// Where both rings live and where the grant list ends, for a pair of
/// validated orders.
///
/// ```
/// use vchan::control::{Layout, RingLocation, RingId};
/// let l = Layout::new(11, 16).unwrap();
/// assert_eq!(l.left, RingLocation::InPage { offset: 2048 });
/// assert_eq!(l.right, RingLocation::External { first_grant_index: 0, pages: 16 });
/// assert_eq!(l.ring_size(RingId::Right), 65536);
/// assert_eq!(l.grant_count(), 16);
/// assert!(!l.grant_list_overlaps_ring);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// log2 of the left ring size (validated, private copy).
    pub left_order: u8,
    /// log2 of the right ring size (validated, private copy).
    pub right_order: u8,
    /// Where the left ring lives.
    pub left: RingLocation,
    /// Where the right ring lives.
    pub right: RingLocation,
    /// Byte offset just past the last grant reference
    /// (`24 + 4 · grant_count`).
    pub grants_end: usize,
    /// Warning (docs/vchan.md §4.3): the grant list runs into an in-page ring (or past
    /// the page, which valid orders cannot produce). An ocaml-vchan server
    /// legitimately produces this for orders (10, 20); libxenvchan accepts it
    /// because the grants are read before any data flows.
    pub grant_list_overlaps_ring: bool,
}

impl Layout {
    /// Layout for `(left_order, right_order)`.
    ///
    /// # Errors
    /// [`ControlError::InvalidOrder`] for an order outside 10..=20;
    /// [`ControlError::OrderCollision`] when both are 10 or both are 11.
    ///
    /// ```
    /// use vchan::control::Layout;
    /// assert!(Layout::new(10, 11).is_ok());
    /// assert!(Layout::new(11, 11).is_err()); // both in-page rings at byte 2048
    /// assert!(Layout::new(16, 16).is_ok());
    /// ```
    pub fn new(left_order: u8, right_order: u8) -> Result<Self, ControlError> {
        validate_client_orders(u16::from(left_order), u16::from(right_order))
    }

    /// Order of `ring`.
    ///
    /// ```
    /// use vchan::control::{Layout, RingId};
    /// assert_eq!(Layout::new(10, 12).unwrap().order(RingId::Right), 12);
    /// ```
    pub const fn order(&self, ring: RingId) -> u8 {
        match ring {
            RingId::Left => self.left_order,
            RingId::Right => self.right_order,
        }
    }

    /// Size in bytes of `ring`.
    ///
    /// ```
    /// use vchan::control::{Layout, RingId};
    /// assert_eq!(Layout::new(10, 16).unwrap().ring_size(RingId::Right), 65536);
    /// ```
    pub const fn ring_size(&self, ring: RingId) -> usize {
        1usize << self.order(ring)
    }

    /// Location of `ring`.
    ///
    /// ```
    /// use vchan::control::{Layout, RingId, RingLocation};
    /// let l = Layout::new(10, 11).unwrap();
    /// assert_eq!(l.location(RingId::Left), RingLocation::InPage { offset: 1024 });
    /// ```
    pub const fn location(&self, ring: RingId) -> RingLocation {
        match ring {
            RingId::Left => self.left,
            RingId::Right => self.right,
        }
    }

    /// Total number of data-ring grants (left then right).
    ///
    /// ```
    /// use vchan::control::Layout;
    /// assert_eq!(Layout::new(16, 16).unwrap().grant_count(), 32); // a qrexec data vchan
    /// assert_eq!(Layout::new(10, 11).unwrap().grant_count(), 0);
    /// ```
    pub const fn grant_count(&self) -> usize {
        grants_for(self.left_order) + grants_for(self.right_order)
    }

    /// Byte offset at which the grant list must end at the latest
    /// (start of the lowest in-page ring, or the end of the page).
    ///
    /// ```
    /// use vchan::control::Layout;
    /// assert_eq!(Layout::new(10, 20).unwrap().grant_list_limit(), 1024);
    /// assert_eq!(Layout::new(11, 20).unwrap().grant_list_limit(), 2048);
    /// assert_eq!(Layout::new(20, 20).unwrap().grant_list_limit(), 4096);
    /// ```
    pub const fn grant_list_limit(&self) -> usize {
        if self.left_order == SMALL_RING_SHIFT || self.right_order == SMALL_RING_SHIFT {
            SMALL_RING_OFFSET
        } else if self.left_order == LARGE_RING_SHIFT || self.right_order == LARGE_RING_SHIFT {
            LARGE_RING_OFFSET
        } else {
            PAGE_SIZE
        }
    }
}

fn location_for(order: u8, first_grant_index: usize) -> RingLocation {
    match order {
        SMALL_RING_SHIFT => RingLocation::InPage {
            offset: SMALL_RING_OFFSET,
        },
        LARGE_RING_SHIFT => RingLocation::InPage {
            offset: LARGE_RING_OFFSET,
        },
        _ => RingLocation::External {
            first_grant_index,
            pages: grants_for(order),
        },
    }
}

/// Client-side validation of the orders read (once) from the control page
/// (docs/vchan.md §4.3), returning the full [`Layout`].
///
/// Rejects orders outside 10..=20 and equal orders below 12 (two in-page
/// rings at the same offset). The extra "grant list fits" check is not an
/// error but [`Layout::grant_list_overlaps_ring`], because ocaml-vchan servers
/// produce (10, 20).
///
/// ```
/// use vchan::control::validate_client_orders;
/// assert!(validate_client_orders(10, 10).is_err());
/// assert!(validate_client_orders(0, 0).is_err()); // zeroed page (stale grant)
/// assert!(validate_client_orders(10, 20).unwrap().grant_list_overlaps_ring);
/// assert!(!validate_client_orders(12, 12).unwrap().grant_list_overlaps_ring);
/// ```
///
/// # Errors
/// [`ControlError::InvalidOrder`], [`ControlError::OrderCollision`].
pub fn validate_client_orders(left: u16, right: u16) -> Result<Layout, ControlError> {
    let check = |ring, order: u16| -> Result<u8, ControlError> {
        match u8::try_from(order) {
            Ok(o) if (MIN_RING_SHIFT..=MAX_RING_SHIFT).contains(&o) => Ok(o),
            _ => Err(ControlError::InvalidOrder { ring, order }),
        }
    };
    let left_order = check(RingId::Left, left)?;
    let right_order = check(RingId::Right, right)?;
    if left_order == right_order && left_order < PAGE_SHIFT {
        return Err(ControlError::OrderCollision { order: left_order });
    }
    let left_grants = grants_for(left_order);
    let mut layout = Layout {
        left_order,
        right_order,
        left: location_for(left_order, 0),
        right: location_for(right_order, left_grants),
        grants_end: 0,
        grant_list_overlaps_ring: false,
    };
    layout.grants_end = grant_offset(layout.grant_count());
    layout.grant_list_overlaps_ring = layout.grants_end > layout.grant_list_limit();
    Ok(layout)
}

/// Orders and layout a libxenvchan server chooses for the requested sizes;
/// [`server_orders`] followed by [`Layout::new`].
///
/// ```
/// let l = vchan::control::server_layout(65536, 65536).unwrap();
/// assert_eq!(l.grant_count(), 32);
/// ```
///
/// # Errors
/// As [`server_orders`].
pub fn server_layout(read_min: usize, write_min: usize) -> Result<Layout, ControlError> {
    let (left, right) = server_orders(read_min, write_min)?;
    Layout::new(left, right)
}

// ---------------------------------------------------------------------------
// Shared header access

/// Single atomic accesses to the control page at byte offsets.
///
/// Implementations perform exactly one atomic access per call on a
/// naturally aligned field and never form a reference to anything larger.
/// Loads and stores are `Relaxed` and the read-modify-writes need not order
/// anything either: all ordering comes from the explicit [`fence`]s the
/// ring code issues, each documented where it is issued
/// (`SharedHeader::fence`). The real implementation is [`ControlPage`];
/// the `loom` model implements it over `loom` atomics so that the same
/// ring and notify code is model-checked.
///
/// Offsets are the `const`s of this module (or [`grant_offset`]);
/// implementations may panic on a misaligned or out-of-page offset, which
/// would be a bug in this crate, never a peer's doing.
///
/// ```
/// # use vchan::control::*;
/// let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// let hdr = ControlPage::new(page.clone()).unwrap();
/// hdr.store_u8(CLI_NOTIFY, NOTIFY_WRITE);
/// assert_eq!(hdr.fetch_and_u8(CLI_NOTIFY, !NOTIFY_WRITE), NOTIFY_WRITE);
/// assert_eq!(hdr.load_u8(CLI_NOTIFY), 0);
/// ```
pub trait SharedHeader: fmt::Debug {
    /// Atomic load of the `u32` at `off`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// assert_eq!(hdr.load_u32(LEFT_PROD), 0);
    /// ```
    fn load_u32(&self, off: usize) -> u32;
    /// Atomic store of the `u32` at `off`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// hdr.store_u32(RIGHT_PROD, 7);
    /// assert_eq!(hdr.load_u32(RIGHT_PROD), 7);
    /// ```
    fn store_u32(&self, off: usize, val: u32);
    /// Atomic load of the `u16` at `off` (the order fields).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// assert_eq!(hdr.load_u16(LEFT_ORDER), 0); // not initialised yet
    /// ```
    fn load_u16(&self, off: usize) -> u16;
    /// Atomic store of the `u16` at `off` (server init only).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// hdr.store_u16(RIGHT_ORDER, 16);
    /// assert_eq!(hdr.load_u16(RIGHT_ORDER), 16);
    /// ```
    fn store_u16(&self, off: usize, val: u16);
    /// Atomic load of the byte at `off`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// assert_eq!(hdr.load_u8(SRV_LIVE), LIVE_EXITED);
    /// ```
    fn load_u8(&self, off: usize) -> u8;
    /// Atomic store of the byte at `off`.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// hdr.store_u8(SRV_LIVE, LIVE_CONNECTED);
    /// assert_eq!(hdr.load_u8(SRV_LIVE), LIVE_CONNECTED);
    /// ```
    fn store_u8(&self, off: usize, val: u8);
    /// Atomic `fetch_or` on the byte at `off`; returns the previous value.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// assert_eq!(hdr.fetch_or_u8(SRV_NOTIFY, NOTIFY_WRITE), 0);
    /// assert_eq!(hdr.load_u8(SRV_NOTIFY), NOTIFY_WRITE);
    /// ```
    fn fetch_or_u8(&self, off: usize, bits: u8) -> u8;
    /// Atomic `fetch_and` on the byte at `off`; returns the previous value.
    ///
    /// ```
    /// # use vchan::control::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// hdr.store_u8(CLI_NOTIFY, NOTIFY_WRITE | NOTIFY_READ);
    /// assert_eq!(hdr.fetch_and_u8(CLI_NOTIFY, !NOTIFY_READ), NOTIFY_WRITE | NOTIFY_READ);
    /// assert_eq!(hdr.load_u8(CLI_NOTIFY), NOTIFY_WRITE);
    /// ```
    fn fetch_and_u8(&self, off: usize, bits: u8) -> u8;
    /// A memory fence in this memory's model (`std` or `loom`).
    ///
    /// ```
    /// # use vchan::control::*;
    /// # let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
    /// # let hdr = ControlPage::new(page.clone()).unwrap();
    /// hdr.fence(std::sync::atomic::Ordering::SeqCst); // `xen_mb()`
    /// ```
    fn fence(&self, order: Ordering);
}

/// The real [`SharedHeader`]: the first 4 KiB of a shared mapping
/// ([`SharedMemory`]), which it keeps mapped (an [`Arc`] of it).
///
/// Holds no reference into the page; each access builds a short-lived
/// atomic view of one naturally aligned field.
///
/// ```
/// use std::sync::Arc;
/// use vchan::control::{ControlPage, SharedHeader, CLI_LIVE};
/// use vchan::mem::HeapPages;
/// let page = ControlPage::new(Arc::new(HeapPages::new(1)))?;
/// let cli_live = page.load_u8(CLI_LIVE);
/// # Ok::<(), vchan::mem::RegionError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ControlPage {
    /// Keeps the mapping alive as long as this (or a clone) exists.
    mem: Arc<dyn SharedMemory>,
    base: NonNull<u8>,
}

// SAFETY: `ControlPage` reaches memory that is shared with another domain anyway; every access through it is a single atomic operation, so using it from several threads is no different from the peer doing so. The mapping it holds is `Send + Sync` by its trait.
unsafe impl Send for ControlPage {}
// SAFETY: as for `Send`: `&ControlPage` only offers atomic accesses.
unsafe impl Sync for ControlPage {}

impl ControlPage {
    /// The control page at the start of `mem`, which must be a writable
    /// mapping of at least [`PAGE_SIZE`] bytes. Within this process the
    /// header and grant list are then accessed only atomically (through
    /// this type); another domain or process may write them at will.
    ///
    /// # Errors
    /// [`RegionError`] if `mem` is too small, misaligned or read-only.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vchan::control::*;
    /// use vchan::mem::HeapPages;
    /// let hdr = ControlPage::new(Arc::new(HeapPages::new(1)))?;
    /// assert_eq!(hdr.load_u32(LEFT_PROD), 0);
    /// # Ok::<(), vchan::mem::RegionError>(())
    /// ```
    pub fn new(mem: Arc<dyn SharedMemory>) -> Result<Self, RegionError> {
        let base = checked_range(&mem, 0, PAGE_SIZE, true)?;
        Ok(Self { mem, base })
    }

    /// The mapping the page lives in (in-page rings are further bytes of it).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vchan::control::*;
    /// use vchan::mem::HeapPages;
    /// let hdr = ControlPage::new(Arc::new(HeapPages::new(1)))?;
    /// assert_eq!(hdr.memory().len(), PAGE_SIZE);
    /// # Ok::<(), vchan::mem::RegionError>(())
    /// ```
    pub fn memory(&self) -> &Arc<dyn SharedMemory> {
        &self.mem
    }

    /// Pointer to a naturally aligned field of `size` bytes at `off`.
    fn field(&self, off: usize, size: usize) -> *mut u8 {
        assert!(
            off.is_multiple_of(size) && off <= PAGE_SIZE - size,
            "control page field offset {off} (size {size}) is misaligned or outside the page"
        );
        // SAFETY: `off + size <= PAGE_SIZE`, so the result stays inside the page the constructor's contract makes valid.
        unsafe { self.base.as_ptr().add(off) }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        let p = self.field(off, 4).cast::<u32>();
        // An `&AtomicU32` is a shared reference to an `UnsafeCell`; all our
        // accesses to it are atomic. It never covers more than this 4-byte
        // field and lives only for one operation.
        // SAFETY: `p` is 4-aligned (page base is 4-aligned, `off % 4 == 0`) and valid for the lifetime of `&self` (constructor contract); an `&AtomicU32` asserts no immutability, so the peer writing this field concurrently is allowed.
        unsafe { AtomicU32::from_ptr(p) }
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        let p = self.field(off, 2).cast::<u16>();
        // SAFETY: as in `u32_at`, for a 2-byte field at a 2-aligned offset.
        unsafe { AtomicU16::from_ptr(p) }
    }

    fn u8_at(&self, off: usize) -> &AtomicU8 {
        let p = self.field(off, 1);
        // SAFETY: as in `u32_at`, for a single byte (always aligned).
        unsafe { AtomicU8::from_ptr(p) }
    }
}

impl SharedHeader for ControlPage {
    fn load_u32(&self, off: usize) -> u32 {
        self.u32_at(off).load(Ordering::Relaxed)
    }
    fn store_u32(&self, off: usize, val: u32) {
        self.u32_at(off).store(val, Ordering::Relaxed)
    }
    fn load_u16(&self, off: usize) -> u16 {
        self.u16_at(off).load(Ordering::Relaxed)
    }
    fn store_u16(&self, off: usize, val: u16) {
        self.u16_at(off).store(val, Ordering::Relaxed)
    }
    fn load_u8(&self, off: usize) -> u8 {
        self.u8_at(off).load(Ordering::Relaxed)
    }
    fn store_u8(&self, off: usize, val: u8) {
        self.u8_at(off).store(val, Ordering::Relaxed)
    }
    // The RMWs are SeqCst like libxenvchan's `__sync` builtins (docs/vchan.md §5.5).
    // The ring code does not rely on it (its fences carry the ordering, and
    // the loom model checks it with Relaxed RMWs); on x86 the instruction is
    // the same `lock or`/`lock and` either way.
    fn fetch_or_u8(&self, off: usize, bits: u8) -> u8 {
        self.u8_at(off).fetch_or(bits, Ordering::SeqCst)
    }
    fn fetch_and_u8(&self, off: usize, bits: u8) -> u8 {
        self.u8_at(off).fetch_and(bits, Ordering::SeqCst)
    }
    fn fence(&self, order: Ordering) {
        fence(order)
    }
}

// ---------------------------------------------------------------------------
// Page-level operations (setup and connect; no data path here)

/// Reads both order fields once: `(left_order, right_order)` as raw `u16`s,
/// to be passed to [`validate_client_orders`].
///
/// ```
/// # use vchan::control::*;
/// let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// let hdr = ControlPage::new(page.clone()).unwrap();
/// init_server_page(&hdr, &Layout::new(16, 16).unwrap(), &[1; 16], &[2; 16]).unwrap();
/// let (l, r) = read_orders(&hdr);
/// assert_eq!((l, r), (16, 16));
/// assert!(validate_client_orders(l, r).is_ok());
/// ```
pub fn read_orders<H: SharedHeader>(h: &H) -> (u16, u16) {
    (h.load_u16(LEFT_ORDER), h.load_u16(RIGHT_ORDER))
}

/// Initialises a freshly shared control page as a libxenvchan server does
/// (docs/vchan.md §3, §9.2 step 4–5): zero the page, write the orders, `cli_live = 2`,
/// `srv_live = 1`, `cli_notify = NOTIFY_WRITE`, `srv_notify = 0`, indices 0,
/// and the grant list (left pages first, then right pages).
///
/// # Errors
/// [`ControlError::GrantCount`] when a grant slice does not have exactly
/// [`grants_for`] entries for its ring.
///
/// ```
/// # use vchan::control::*;
/// let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// let hdr = ControlPage::new(page.clone()).unwrap();
/// let layout = Layout::new(11, 12).unwrap();
/// init_server_page(&hdr, &layout, &[], &[77]).unwrap();
/// assert_eq!(hdr.load_u8(CLI_LIVE), LIVE_WAITING);
/// assert_eq!(hdr.load_u8(SRV_LIVE), LIVE_CONNECTED);
/// assert_eq!(hdr.load_u32(grant_offset(0)), 77);
/// // One grant too few for the order-12 ring:
/// assert!(init_server_page(&hdr, &layout, &[], &[]).is_err());
/// ```
pub fn init_server_page<H: SharedHeader>(
    h: &H,
    layout: &Layout,
    left_grants: &[u32],
    right_grants: &[u32],
) -> Result<(), ControlError> {
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
    for off in (0..PAGE_SIZE).step_by(4) {
        h.store_u32(off, 0);
    }
    h.store_u16(LEFT_ORDER, u16::from(layout.left_order));
    h.store_u16(RIGHT_ORDER, u16::from(layout.right_order));
    for (i, &gref) in left_grants.iter().chain(right_grants).enumerate() {
        h.store_u32(grant_offset(i), gref);
    }
    h.store_u8(CLI_NOTIFY, NOTIFY_WRITE);
    h.store_u8(SRV_NOTIFY, 0);
    h.store_u8(SRV_LIVE, LIVE_CONNECTED);
    // Publish the header before the client can observe `cli_live == 2`
    // (the page is granted already; the xenstore write comes later anyway).
    h.fence(Ordering::Release);
    h.store_u8(CLI_LIVE, LIVE_WAITING);
    Ok(())
}

/// Reads the grant list for `layout`: `(left_grants, right_grants)`.
///
/// Each entry is read once; the values are opaque grant references that the
/// mapping layer validates (a bad one fails the map).
///
/// ```
/// # use vchan::control::*;
/// let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// let hdr = ControlPage::new(page.clone()).unwrap();
/// let layout = Layout::new(12, 13).unwrap();
/// init_server_page(&hdr, &layout, &[5], &[6, 7]).unwrap();
/// assert_eq!(read_grants(&hdr, &layout), (vec![5], vec![6, 7]));
/// ```
pub fn read_grants<H: SharedHeader>(h: &H, layout: &Layout) -> (Vec<u32>, Vec<u32>) {
    let nl = grants_for(layout.left_order);
    let nr = grants_for(layout.right_order);
    let left = (0..nl).map(|i| h.load_u32(grant_offset(i))).collect();
    let right = (nl..nl + nr).map(|i| h.load_u32(grant_offset(i))).collect();
    (left, right)
}

/// The client's connect stores (docs/vchan.md §9.3 step 7): `cli_live = 1`, then
/// `srv_notify = NOTIFY_WRITE` (plain stores, as libxenvchan). The caller
/// sends one event afterwards.
///
/// ```
/// # use vchan::control::*;
/// let page = std::sync::Arc::new(vchan::mem::HeapPages::new(1));
/// let hdr = ControlPage::new(page.clone()).unwrap();
/// init_server_page(&hdr, &Layout::new(10, 11).unwrap(), &[], &[]).unwrap();
/// announce_client_connected(&hdr);
/// assert_eq!(hdr.load_u8(CLI_LIVE), LIVE_CONNECTED);
/// assert_eq!(hdr.load_u8(SRV_NOTIFY), NOTIFY_WRITE);
/// ```
pub fn announce_client_connected<H: SharedHeader>(h: &H) {
    h.store_u8(CLI_LIVE, LIVE_CONNECTED);
    h.store_u8(SRV_NOTIFY, NOTIFY_WRITE);
    // The event that follows must not overtake these stores.
    h.fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn offsets_match_c_header() {
        assert_eq!(size_of::<VchanInterface>(), HEADER_SIZE);
        assert_eq!(size_of::<VchanInterface>(), 24);
        assert_eq!(size_of::<RingShared>(), 8);
        assert_eq!(offset_of!(RingShared, cons), 0);
        assert_eq!(offset_of!(RingShared, prod), 4);
        assert_eq!(
            offset_of!(VchanInterface, left) + offset_of!(RingShared, cons),
            LEFT_CONS
        );
        assert_eq!(
            offset_of!(VchanInterface, left) + offset_of!(RingShared, prod),
            LEFT_PROD
        );
        assert_eq!(
            offset_of!(VchanInterface, right) + offset_of!(RingShared, cons),
            RIGHT_CONS
        );
        assert_eq!(
            offset_of!(VchanInterface, right) + offset_of!(RingShared, prod),
            RIGHT_PROD
        );
        assert_eq!(offset_of!(VchanInterface, left_order), LEFT_ORDER);
        assert_eq!(offset_of!(VchanInterface, right_order), RIGHT_ORDER);
        assert_eq!(offset_of!(VchanInterface, cli_live), CLI_LIVE);
        assert_eq!(offset_of!(VchanInterface, srv_live), SRV_LIVE);
        assert_eq!(offset_of!(VchanInterface, cli_notify), CLI_NOTIFY);
        assert_eq!(offset_of!(VchanInterface, srv_notify), SRV_NOTIFY);
    }

    #[test]
    fn offsets_are_the_literal_values_of_spec_section_3() {
        assert_eq!(
            [
                LEFT_CONS,
                LEFT_PROD,
                RIGHT_CONS,
                RIGHT_PROD,
                LEFT_ORDER,
                RIGHT_ORDER,
                CLI_LIVE,
                SRV_LIVE,
                CLI_NOTIFY,
                SRV_NOTIFY,
                GRANTS
            ],
            [0, 4, 8, 12, 16, 18, 20, 21, 22, 23, 24]
        );
        assert_eq!(grant_offset(255), 24 + 1020);
    }

    #[test]
    fn constants_of_spec_section_2() {
        assert_eq!((PAGE_SIZE, PAGE_SHIFT), (4096, 12));
        assert_eq!((SMALL_RING_SHIFT, SMALL_RING_OFFSET), (10, 1024));
        assert_eq!((LARGE_RING_SHIFT, LARGE_RING_OFFSET), (11, 2048));
        assert_eq!((MAX_RING_SHIFT, MAX_RING_SIZE), (20, 1 << 20));
        assert_eq!((NOTIFY_WRITE, NOTIFY_READ), (1, 2));
        assert_eq!((LIVE_EXITED, LIVE_CONNECTED, LIVE_WAITING), (0, 1, 2));
        assert_eq!(
            (XS_RING_REF, XS_EVENT_CHANNEL),
            ("ring-ref", "event-channel")
        );
    }

    #[test]
    fn side_mapping() {
        assert_eq!(Side::Server.read_ring(), RingId::Left);
        assert_eq!(Side::Server.write_ring(), RingId::Right);
        assert_eq!(Side::Client.read_ring(), RingId::Right);
        assert_eq!(Side::Client.write_ring(), RingId::Left);
        assert_eq!(
            (Side::Server.own_live(), Side::Server.peer_live()),
            (21, 20)
        );
        assert_eq!(
            (Side::Client.own_live(), Side::Client.peer_live()),
            (20, 21)
        );
        assert_eq!(
            (Side::Server.own_notify(), Side::Server.peer_notify()),
            (23, 22)
        );
        assert_eq!(
            (Side::Client.own_notify(), Side::Client.peer_notify()),
            (22, 23)
        );
    }

    /// Every row of the worked-examples table of docs/vchan.md §4.2.
    #[test]
    fn server_orders_worked_examples() {
        let rows: &[(usize, usize, u8, u8, usize)] = &[
            (0, 0, 10, 11, 0),
            (1024, 2048, 10, 11, 0),
            (2048, 2048, 11, 12, 1),
            (4096, 4096, 12, 12, 2),
            (1024, 65536, 11, 16, 16),
            (65536, 65536, 16, 16, 32),
            (65537, 1, 17, 11, 32),
            (1048576, 1048576, 20, 20, 512),
        ];
        for &(l, r, lo, ro, grants) in rows {
            assert_eq!(server_orders(l, r), Ok((lo, ro)), "row ({l}, {r})");
            let layout = server_layout(l, r).unwrap();
            assert_eq!(layout.grant_count(), grants, "row ({l}, {r})");
            assert!(!layout.grant_list_overlaps_ring, "row ({l}, {r})");
        }
    }

    #[test]
    fn server_orders_rejects_above_one_mib() {
        for any in [0, 1, 4096, 1 << 20, usize::MAX] {
            assert_eq!(
                server_orders(1048577, any),
                Err(ControlError::SizeTooLarge {
                    ring: RingId::Left,
                    requested: 1048577,
                    max: 1 << 20
                })
            );
            assert!(matches!(
                server_orders(any.min(1 << 20), 1048577),
                Err(ControlError::SizeTooLarge {
                    ring: RingId::Right,
                    ..
                })
            ));
        }
        let msg = server_orders(0, 1 << 21).unwrap_err().to_string();
        assert!(msg.contains("2097152") && msg.contains("1048576"), "{msg}");
    }

    #[test]
    fn server_orders_boundaries() {
        // Swapped and off-by-one sizes around the in-page thresholds.
        assert_eq!(server_orders(2048, 1024), Ok((11, 10)));
        assert_eq!(server_orders(1025, 2048), Ok((11, 12)));
        assert_eq!(server_orders(1024, 2049), Ok((11, 12)));
        assert_eq!(server_orders(2049, 2048), Ok((12, 11)));
        assert_eq!(server_orders(2049, 2049), Ok((12, 12)));
        assert_eq!(server_orders(4097, 4095), Ok((13, 12)));
        assert_eq!(server_orders(1023, 1023), Ok((10, 11)));
    }

    /// Every order pair the server can produce is a valid, non-overlapping
    /// layout, and the requested size never exceeds the chosen size.
    #[test]
    fn server_orders_always_valid_and_large_enough() {
        let sizes = [
            0usize, 1, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097,
        ]
        .into_iter()
        .chain((12..=20).flat_map(|o| [(1 << o) - 1, 1 << o, (1 << o) + 1]))
        .filter(|&s| s <= MAX_RING_SIZE);
        let sizes: Vec<usize> = sizes.collect();
        for &l in &sizes {
            for &r in &sizes {
                let (lo, ro) = server_orders(l, r).unwrap();
                let layout = Layout::new(lo, ro).unwrap();
                assert!(layout.ring_size(RingId::Left) >= l);
                assert!(layout.ring_size(RingId::Right) >= r);
                assert!(!layout.grant_list_overlaps_ring, "({l}, {r})");
            }
        }
    }

    #[test]
    fn client_validation_cases() {
        // Range.
        for bad in [0u16, 1, 9, 21, 255, 256, 0x10a, u16::MAX] {
            assert!(matches!(
                validate_client_orders(bad, 12),
                Err(ControlError::InvalidOrder { ring: RingId::Left, order }) if order == bad
            ));
            assert!(matches!(
                validate_client_orders(12, bad),
                Err(ControlError::InvalidOrder { ring: RingId::Right, order }) if order == bad
            ));
        }
        // Equal in-page orders collide; equal external orders are fine.
        assert_eq!(
            validate_client_orders(10, 10),
            Err(ControlError::OrderCollision { order: 10 })
        );
        assert_eq!(
            validate_client_orders(11, 11),
            Err(ControlError::OrderCollision { order: 11 })
        );
        for o in 12..=20 {
            assert!(validate_client_orders(o, o).is_ok());
        }
        // Every pair in range with distinct in-page orders is accepted.
        let mut accepted = 0;
        for l in 10..=20u16 {
            for r in 10..=20u16 {
                if validate_client_orders(l, r).is_ok() {
                    accepted += 1;
                }
            }
        }
        assert_eq!(accepted, 11 * 11 - 2);
    }

    #[test]
    fn client_validation_grant_list_warning() {
        // ocaml-vchan's (10, 20): 256 grants end at byte 1048 > 1024.
        let l = validate_client_orders(10, 20).unwrap();
        assert_eq!(l.grants_end, 1048);
        assert!(l.grant_list_overlaps_ring);
        // libxenvchan's worst cases fit (docs/vchan.md §3.1).
        let l = validate_client_orders(11, 20).unwrap();
        assert_eq!(l.grants_end, 1048);
        assert!(!l.grant_list_overlaps_ring);
        let l = validate_client_orders(20, 20).unwrap();
        assert_eq!(l.grants_end, 2072);
        assert!(!l.grant_list_overlaps_ring);
        // Order 10 leaves room for 250 grants and one ring needs at most 256:
        // only an order-20 partner overflows, in either position.
        assert!(
            validate_client_orders(20, 10)
                .unwrap()
                .grant_list_overlaps_ring
        );
        assert!(
            !validate_client_orders(10, 19)
                .unwrap()
                .grant_list_overlaps_ring
        );
        assert!(
            !validate_client_orders(19, 10)
                .unwrap()
                .grant_list_overlaps_ring
        );
        // Order 11 leaves room for 506 grants, two external rings 1018: no
        // other valid pair overflows.
        for l in 10..=20u16 {
            for r in 10..=20u16 {
                if let Ok(layout) = validate_client_orders(l, r) {
                    let expect = matches!((l, r), (10, 20) | (20, 10));
                    assert_eq!(layout.grant_list_overlaps_ring, expect, "({l}, {r})");
                }
            }
        }
    }

    #[test]
    fn layout_locations_and_grant_indices() {
        let l = Layout::new(10, 11).unwrap();
        assert_eq!(l.left, RingLocation::InPage { offset: 1024 });
        assert_eq!(l.right, RingLocation::InPage { offset: 2048 });
        assert_eq!((l.grant_count(), l.grants_end), (0, 24));

        let l = Layout::new(11, 10).unwrap();
        assert_eq!(l.left, RingLocation::InPage { offset: 2048 });
        assert_eq!(l.right, RingLocation::InPage { offset: 1024 });

        let l = Layout::new(13, 11).unwrap();
        assert_eq!(
            l.left,
            RingLocation::External {
                first_grant_index: 0,
                pages: 2
            }
        );
        assert_eq!(l.right, RingLocation::InPage { offset: 2048 });

        // Left pages first, then right pages.
        let l = Layout::new(14, 13).unwrap();
        assert_eq!(
            l.left,
            RingLocation::External {
                first_grant_index: 0,
                pages: 4
            }
        );
        assert_eq!(
            l.right,
            RingLocation::External {
                first_grant_index: 4,
                pages: 2
            }
        );
        assert_eq!(l.grants_end, 24 + 6 * 4);
        assert_eq!(l.ring_size(RingId::Left), 16384);
    }

    #[test]
    fn grants_for_all_orders() {
        let expect = [0, 0, 1, 2, 4, 8, 16, 32, 64, 128, 256];
        for (o, e) in (10..=20u8).zip(expect) {
            assert_eq!(grants_for(o), e, "order {o}");
        }
        assert_eq!(grants_for(0), 0);
        assert_eq!(grants_for(255), usize::MAX);
    }

    fn page() -> (Arc<crate::mem::HeapPages>, ControlPage) {
        let b = Arc::new(crate::mem::HeapPages::filled(1, 0xEE));
        (b.clone(), ControlPage::new(b).unwrap())
    }

    #[test]
    fn init_server_page_writes_libxenvchan_initial_state() {
        let (b, p) = page();
        let layout = Layout::new(13, 12).unwrap();
        init_server_page(&p, &layout, &[0x11, 0x22], &[0x33]).unwrap();
        let bytes = &b.copy_out();
        // Little-endian fixed layout, byte by byte.
        let mut expect = [0u8; 36];
        expect[16] = 13;
        expect[18] = 12;
        expect[20] = LIVE_WAITING;
        expect[21] = LIVE_CONNECTED;
        expect[22] = NOTIFY_WRITE;
        expect[24] = 0x11;
        expect[28] = 0x22;
        expect[32] = 0x33;
        assert_eq!(&bytes[..36], &expect);
        assert!(bytes[36..].iter().all(|&x| x == 0), "rest of page zeroed");
        assert_eq!(read_orders(&p), (13, 12));
        assert_eq!(read_grants(&p, &layout), (vec![0x11, 0x22], vec![0x33]));
        announce_client_connected(&p);
        assert_eq!(
            (b.copy_out()[CLI_LIVE], b.copy_out()[SRV_NOTIFY]),
            (LIVE_CONNECTED, NOTIFY_WRITE)
        );
    }

    #[test]
    fn init_server_page_checks_grant_counts() {
        let (_b, p) = page();
        let layout = Layout::new(13, 12).unwrap();
        assert_eq!(
            init_server_page(&p, &layout, &[1], &[2]),
            Err(ControlError::GrantCount {
                ring: RingId::Left,
                expected: 2,
                got: 1
            })
        );
        assert!(matches!(
            init_server_page(&p, &layout, &[1, 2], &[]),
            Err(ControlError::GrantCount {
                ring: RingId::Right,
                ..
            })
        ));
    }

    #[test]
    fn control_page_accesses_hit_the_right_bytes() {
        let (b, p) = page();
        p.store_u32(RIGHT_PROD, 0x0403_0201);
        assert_eq!(&b.copy_out()[12..16], &[1, 2, 3, 4]);
        p.store_u16(RIGHT_ORDER, 0x0b0a);
        assert_eq!(&b.copy_out()[18..20], &[0x0a, 0x0b]);
        p.store_u8(SRV_NOTIFY, 0);
        assert_eq!(p.fetch_or_u8(SRV_NOTIFY, NOTIFY_READ), 0);
        assert_eq!(p.fetch_and_u8(SRV_NOTIFY, !NOTIFY_WRITE), NOTIFY_READ);
        assert_eq!(b.copy_out()[SRV_NOTIFY], NOTIFY_READ);
        assert_eq!(p.load_u8(SRV_NOTIFY), NOTIFY_READ);
    }

    #[test]
    #[should_panic(expected = "misaligned or outside the page")]
    fn control_page_rejects_out_of_page_offsets() {
        let (_b, p) = page();
        p.load_u32(PAGE_SIZE);
    }
}
