//! Xen event channels from user space over `/dev/xen/evtchn`, plus a
//! same-host double in which separate processes play separate domains.
