//! Raw interface of the Linux event channel device, restated from the
//! kernel's `include/uapi/xen/evtchn.h`. Every number and size is pinned by
//! a unit test against the literal in docs/vchan.md §6.

/// `_IOC_NONE` from `include/uapi/asm-generic/ioctl.h` (x86-64 and arm64,
/// the architectures Xen guests run on).
const IOC_NONE: u32 = 0;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;

/// `_IOC(dir, type, nr, size)` from `include/uapi/asm-generic/ioctl.h`.
const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// The ioctl type letter of the evtchn device (`'E'`).
const EVTCHN_TYPE: u8 = b'E';

/// `struct ioctl_evtchn_bind_virq { unsigned int virq; }`
#[cfg_attr(not(test), allow(dead_code))] // not used; restated so its number stays pinned
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IoctlEvtchnBindVirq {
    pub(crate) virq: u32,
}

/// `#define IOCTL_EVTCHN_BIND_VIRQ _IOC(_IOC_NONE, 'E', 0, sizeof(struct ioctl_evtchn_bind_virq))`
#[cfg_attr(not(test), allow(dead_code))] // not used; restated so its number stays pinned
pub(crate) const IOCTL_EVTCHN_BIND_VIRQ: u32 =
    ioc(IOC_NONE, EVTCHN_TYPE, 0, size_of::<IoctlEvtchnBindVirq>());

/// `struct ioctl_evtchn_bind_interdomain { unsigned int remote_domain, remote_port; }`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IoctlEvtchnBindInterdomain {
    pub(crate) remote_domain: u32,
    pub(crate) remote_port: u32,
}

/// `#define IOCTL_EVTCHN_BIND_INTERDOMAIN _IOC(_IOC_NONE, 'E', 1, sizeof(struct ioctl_evtchn_bind_interdomain))`
pub(crate) const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 = ioc(
    IOC_NONE,
    EVTCHN_TYPE,
    1,
    size_of::<IoctlEvtchnBindInterdomain>(),
);

/// `struct ioctl_evtchn_bind_unbound_port { unsigned int remote_domain; }`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IoctlEvtchnBindUnboundPort {
    pub(crate) remote_domain: u32,
}

/// `#define IOCTL_EVTCHN_BIND_UNBOUND_PORT _IOC(_IOC_NONE, 'E', 2, sizeof(struct ioctl_evtchn_bind_unbound_port))`
pub(crate) const IOCTL_EVTCHN_BIND_UNBOUND_PORT: u32 = ioc(
    IOC_NONE,
    EVTCHN_TYPE,
    2,
    size_of::<IoctlEvtchnBindUnboundPort>(),
);

/// `struct ioctl_evtchn_unbind { unsigned int port; }`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IoctlEvtchnUnbind {
    pub(crate) port: u32,
}

/// `#define IOCTL_EVTCHN_UNBIND _IOC(_IOC_NONE, 'E', 3, sizeof(struct ioctl_evtchn_unbind))`
pub(crate) const IOCTL_EVTCHN_UNBIND: u32 =
    ioc(IOC_NONE, EVTCHN_TYPE, 3, size_of::<IoctlEvtchnUnbind>());

/// `struct ioctl_evtchn_notify { unsigned int port; }`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IoctlEvtchnNotify {
    pub(crate) port: u32,
}

/// `#define IOCTL_EVTCHN_NOTIFY _IOC(_IOC_NONE, 'E', 4, sizeof(struct ioctl_evtchn_notify))`
pub(crate) const IOCTL_EVTCHN_NOTIFY: u32 =
    ioc(IOC_NONE, EVTCHN_TYPE, 4, size_of::<IoctlEvtchnNotify>());

/// `#define IOCTL_EVTCHN_RESET _IOC(_IOC_NONE, 'E', 5, 0)`
#[cfg_attr(not(test), allow(dead_code))] // not used; restated so its number stays pinned
pub(crate) const IOCTL_EVTCHN_RESET: u32 = ioc(IOC_NONE, EVTCHN_TYPE, 5, 0);

/// `struct ioctl_evtchn_restrict_domid { domid_t domid; }` (`domid_t` is
/// `uint16_t`)
#[cfg_attr(not(test), allow(dead_code))] // not used; restated so its number stays pinned
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IoctlEvtchnRestrictDomid {
    pub(crate) domid: u16,
}

/// `#define IOCTL_EVTCHN_RESTRICT_DOMID _IOC(_IOC_NONE, 'E', 6, sizeof(struct ioctl_evtchn_restrict_domid))`
#[cfg_attr(not(test), allow(dead_code))] // not used; restated so its number stays pinned
pub(crate) const IOCTL_EVTCHN_RESTRICT_DOMID: u32 = ioc(
    IOC_NONE,
    EVTCHN_TYPE,
    6,
    size_of::<IoctlEvtchnRestrictDomid>(),
);

/// `struct privcmd_hypercall { __u64 op; __u64 arg[5]; }` from
/// include/uapi/xen/privcmd.h: one hypercall through `/dev/xen/privcmd`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PrivcmdHypercall {
    pub(crate) op: u64,
    pub(crate) arg: [u64; 5],
}

const PRIVCMD_TYPE: u8 = b'P';

/// `#define IOCTL_PRIVCMD_HYPERCALL _IOC(_IOC_NONE, 'P', 0, sizeof(struct privcmd_hypercall))`
pub(crate) const IOCTL_PRIVCMD_HYPERCALL: u32 =
    ioc(IOC_NONE, PRIVCMD_TYPE, 0, size_of::<PrivcmdHypercall>());

/// `#define __HYPERVISOR_event_channel_op 32` (xen/include/public/xen.h).
pub(crate) const HYPERVISOR_EVENT_CHANNEL_OP: u64 = 32;
/// `#define EVTCHNOP_status 5` (xen/include/public/event_channel.h).
pub(crate) const EVTCHNOP_STATUS: u64 = 5;
/// `#define DOMID_SELF xen_mk_uint(0x7FF0)` (xen/include/public/xen.h).
pub(crate) const DOMID_SELF: u16 = 0x7FF0;
/// `EVTCHNSTAT_closed` .. `EVTCHNSTAT_interdomain` (event_channel.h).
pub(crate) const EVTCHNSTAT_CLOSED: u32 = 0;
/// Port allocated, waiting for the remote domain to bind.
pub(crate) const EVTCHNSTAT_UNBOUND: u32 = 1;
/// Port connected to a remote domain's port.
pub(crate) const EVTCHNSTAT_INTERDOMAIN: u32 = 2;

/// `struct evtchn_status` (xen/include/public/event_channel.h): `dom`,
/// `port` in; `status`, `vcpu` and the union out. The union is laid out as
/// its `interdomain` member `{ domid_t dom; evtchn_port_t port; }`, whose
/// `dom` is also `unbound.dom`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EvtchnStatus {
    pub(crate) dom: u16,
    pub(crate) port: u32,
    pub(crate) status: u32,
    pub(crate) vcpu: u32,
    pub(crate) u_dom: u16,
    pub(crate) u_port: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The literals of docs/vchan.md §6 (computed from the UAPI header).
    #[test]
    fn ioctl_numbers_match_spec() {
        assert_eq!(IOCTL_EVTCHN_BIND_VIRQ, 0x0004_4500);
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT, 0x0004_4502);
        assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
        assert_eq!(IOCTL_EVTCHN_RESET, 0x0000_4505);
        assert_eq!(IOCTL_EVTCHN_RESTRICT_DOMID, 0x0002_4506);
    }

    #[test]
    fn privcmd_hypercall_layout() {
        assert_eq!(size_of::<PrivcmdHypercall>(), 48);
        assert_eq!(IOCTL_PRIVCMD_HYPERCALL, 0x0030_5000);
        assert_eq!(size_of::<EvtchnStatus>(), 24);
        assert_eq!(std::mem::offset_of!(EvtchnStatus, port), 4);
        assert_eq!(std::mem::offset_of!(EvtchnStatus, status), 8);
        assert_eq!(std::mem::offset_of!(EvtchnStatus, u_dom), 16);
        assert_eq!(std::mem::offset_of!(EvtchnStatus, u_port), 20);
    }

    #[test]
    fn struct_sizes_match_spec() {
        assert_eq!(size_of::<IoctlEvtchnBindVirq>(), 4);
        assert_eq!(size_of::<IoctlEvtchnBindInterdomain>(), 8);
        assert_eq!(size_of::<IoctlEvtchnBindUnboundPort>(), 4);
        assert_eq!(size_of::<IoctlEvtchnUnbind>(), 4);
        assert_eq!(size_of::<IoctlEvtchnNotify>(), 4);
        assert_eq!(size_of::<IoctlEvtchnRestrictDomid>(), 2);
    }

    #[test]
    fn interdomain_field_order() {
        assert_eq!(
            std::mem::offset_of!(IoctlEvtchnBindInterdomain, remote_domain),
            0
        );
        assert_eq!(
            std::mem::offset_of!(IoctlEvtchnBindInterdomain, remote_port),
            4
        );
    }

    /// Cross-check `ioc` against nix's own encoder for a size-less request.
    #[test]
    #[allow(
        clippy::unnecessary_cast,
        reason = "the request type is c_ulong on glibc but c_int on musl"
    )]
    fn ioc_agrees_with_nix() {
        assert_eq!(
            u64::from(IOCTL_EVTCHN_RESET),
            nix::request_code_none!(b'E', 5) as u64
        );
    }
}
