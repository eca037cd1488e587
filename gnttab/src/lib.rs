//! Xen grant tables from user space: share pages with a peer domain through
//! `/dev/xen/gntalloc` and map a peer's pages through `/dev/xen/gntdev`, both
//! with unmap-notify; plus a same-host double with the same semantics.
