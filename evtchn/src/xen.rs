//! The real backend over `/dev/xen/evtchn`.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use nix::errno::Errno;

use crate::sys;
use crate::{Backend, DomId, Error, EventChannel, Port, PortStatus};

/// The event channel device.
pub const DEVICE_PATH: &str = "/dev/xen/evtchn";

/// The real backend: every channel opens its own handle on
/// [`DEVICE_PATH`] (`O_RDWR | O_CLOEXEC | O_NONBLOCK`), as libxenvchan does.
///
/// ```no_run
/// use evtchn::{Backend, EventChannel, Xen};
/// let ch = Xen.bind_unbound(0)?;
/// println!("port {}", ch.local_port());
/// ch.wait()?;
/// # Ok::<(), evtchn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Xen;

/// A port bound on its own `/dev/xen/evtchn` handle. Dropping it unbinds
/// the port (`IOCTL_EVTCHN_UNBIND`) and closes the handle.
#[derive(Debug)]
pub struct XenChannel {
    fd: OwnedFd,
    port: Port,
}

fn open_device() -> Result<OwnedFd, Error> {
    // The fd is non-blocking so that a poll()ed readiness that another
    // thread consumed first turns into EAGAIN instead of a blocked read;
    // `wait` polls before it reads.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(DEVICE_PATH)
        .map_err(|source| Error::Open {
            path: DEVICE_PATH,
            source,
        })?;
    Ok(file.into())
}

/// Issues an ioctl whose argument is a pointer to `arg`.
///
/// # Safety
///
/// `request` must be an evtchn ioctl whose argument struct is `T` (the
/// kernel reads `size_of::<T>()` bytes through the pointer and writes
/// nothing back).
unsafe fn ioctl_with<T>(fd: BorrowedFd<'_>, request: u32, arg: &T) -> Result<i32, Errno> {
    // The request type is `c_ulong` on glibc and `c_int` on musl, hence the
    // inferred cast.
    // SAFETY: `fd` is an open descriptor; per the caller's contract the kernel only reads a `T` through the pointer, which is valid for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            request as _,
            std::ptr::from_ref(arg).cast::<libc::c_void>(),
        )
    };
    Errno::result(rc)
}

impl XenChannel {
    fn bind<T>(
        op: &'static str,
        request: u32,
        arg: &T,
        remote: DomId,
        remote_port: Option<Port>,
    ) -> Result<XenChannel, Error> {
        let fd = open_device()?;
        let port = loop {
            // SAFETY: both bind requests passed here take exactly the struct type `T` that the caller pairs with them (see `Backend for Xen`).
            match unsafe { ioctl_with(fd.as_fd(), request, arg) } {
                Err(Errno::EINTR) => {}
                Err(source) => {
                    return Err(Error::Bind {
                        op,
                        remote,
                        remote_port,
                        source,
                    });
                }
                Ok(rc) => {
                    break Port::try_from(rc).map_err(|_| Error::Protocol {
                        op,
                        detail: format!("the device returned port {rc}"),
                    })?;
                }
            }
        };
        let ch = XenChannel { fd, port };
        // libxenvchan unmasks once right after the bind.
        ch.write_port("unmask after bind")?;
        Ok(ch)
    }

    fn write_port(&self, op: &'static str) -> Result<(), Error> {
        let buf = self.port.to_ne_bytes();
        loop {
            match nix::unistd::write(&self.fd, &buf) {
                Ok(4) => return Ok(()),
                Ok(n) => {
                    return Err(Error::Protocol {
                        op,
                        detail: format!("short write of {n} bytes to {DEVICE_PATH}"),
                    });
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(Error::Io {
                        op,
                        port: self.port,
                        source: e.into(),
                    });
                }
            }
        }
    }
}

impl Backend for Xen {
    fn bind_unbound(&self, remote: DomId) -> Result<Box<dyn EventChannel>, Error> {
        let arg = sys::IoctlEvtchnBindUnboundPort {
            remote_domain: remote.into(),
        };
        let ch = XenChannel::bind(
            "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
            sys::IOCTL_EVTCHN_BIND_UNBOUND_PORT,
            &arg,
            remote,
            None,
        )?;
        Ok(Box::new(ch))
    }

    fn bind_interdomain(
        &self,
        remote: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, Error> {
        let arg = sys::IoctlEvtchnBindInterdomain {
            remote_domain: remote.into(),
            remote_port,
        };
        let ch = XenChannel::bind(
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
            sys::IOCTL_EVTCHN_BIND_INTERDOMAIN,
            &arg,
            remote,
            Some(remote_port),
        )?;
        Ok(Box::new(ch))
    }
}

impl AsFd for XenChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl EventChannel for XenChannel {
    fn local_port(&self) -> Port {
        self.port
    }

    fn notify(&self) -> Result<(), Error> {
        let arg = sys::IoctlEvtchnNotify { port: self.port };
        loop {
            // SAFETY: IOCTL_EVTCHN_NOTIFY takes a `struct ioctl_evtchn_notify`.
            match unsafe { ioctl_with(self.fd.as_fd(), sys::IOCTL_EVTCHN_NOTIFY, &arg) } {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(source) => {
                    return Err(Error::Ioctl {
                        op: "IOCTL_EVTCHN_NOTIFY",
                        port: self.port,
                        source,
                    });
                }
            }
        }
    }

    fn wait(&self) -> Result<(), Error> {
        crate::wait_with(self.fd.as_fd(), self.port, None, || self.consume_pending()).map(drop)
    }

    fn wait_timeout(&self, timeout: Duration) -> Result<bool, Error> {
        crate::wait_with(self.fd.as_fd(), self.port, Some(timeout), || {
            self.consume_pending()
        })
    }

    fn consume_pending(&self) -> Result<bool, Error> {
        let mut buf = [0u8; 4];
        let n = loop {
            match nix::unistd::read(&self.fd, &mut buf) {
                Ok(n) => break n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Ok(false),
                Err(e) => {
                    return Err(Error::Io {
                        op: "read",
                        port: self.port,
                        source: e.into(),
                    });
                }
            }
        };
        if n != 4 {
            return Err(Error::Protocol {
                op: "read",
                detail: format!("read of {n} bytes from {DEVICE_PATH}"),
            });
        }
        let got = Port::from_ne_bytes(buf);
        if got != self.port {
            return Err(Error::Protocol {
                op: "read",
                detail: format!("event for port {got} on the fd of port {}", self.port),
            });
        }
        self.write_port("re-arm")?;
        Ok(true)
    }

    /// `EVTCHNOP_status` of our own port through `/dev/xen/privcmd`, where
    /// the kernel allows it (dom0; a domU only with
    /// `xen_privcmd.unrestricted=1`, docs/vchan.md §7.2, §16 row P). Any failure —
    /// no device, `EPERM`, anything — is `Ok(None)`: "unknown", never
    /// "alive".
    fn status(&self) -> Result<Option<PortStatus>, Error> {
        Ok(privcmd_port_status(self.port))
    }
}

/// Asks Xen for the state of our port `port` (see [`XenChannel::status`]).
fn privcmd_port_status(port: Port) -> Option<PortStatus> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/xen/privcmd")
        .ok()?;
    let mut st = sys::EvtchnStatus {
        dom: sys::DOMID_SELF,
        port,
        ..Default::default()
    };
    let st_ptr = std::ptr::addr_of_mut!(st);
    let call = sys::PrivcmdHypercall {
        op: sys::HYPERVISOR_EVENT_CHANNEL_OP,
        // The hypervisor writes the OUT fields through this address.
        arg: [
            sys::EVTCHNOP_STATUS,
            st_ptr.expose_provenance() as u64,
            0,
            0,
            0,
        ],
    };
    // The hypercall itself writes at most `size_of::<EvtchnStatus>()` bytes
    // at `st_ptr`, a live local of that type that nothing else borrows
    // during the call.
    // SAFETY: `ioctl_with`'s contract holds: IOCTL_PRIVCMD_HYPERCALL reads a `struct privcmd_hypercall` (= `call`) and writes nothing back into it.
    unsafe { ioctl_with(dev.as_fd(), sys::IOCTL_PRIVCMD_HYPERCALL, &call) }.ok()?;
    // A volatile read keeps the compiler from assuming the call left `st`
    // unchanged.
    // SAFETY: `st_ptr` points to `st`, initialised above and possibly rewritten by the hypervisor.
    let out = unsafe { std::ptr::read_volatile(st_ptr) };
    match out.status {
        sys::EVTCHNSTAT_CLOSED => Some(PortStatus::Closed),
        sys::EVTCHNSTAT_UNBOUND => Some(PortStatus::Unbound { remote: out.u_dom }),
        sys::EVTCHNSTAT_INTERDOMAIN => Some(PortStatus::Interdomain {
            remote: out.u_dom,
            remote_port: out.u_port,
        }),
        _ => None,
    }
}

impl Drop for XenChannel {
    fn drop(&mut self) {
        let arg = sys::IoctlEvtchnUnbind { port: self.port };
        // A failure leaves nothing to do: closing the fd unbinds as well.
        // SAFETY: IOCTL_EVTCHN_UNBIND takes a `struct ioctl_evtchn_unbind`.
        let _ = unsafe { ioctl_with(self.fd.as_fd(), sys::IOCTL_EVTCHN_UNBIND, &arg) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without Xen (as in CI) a bind says clearly that the device is missing.
    #[test]
    fn missing_device_is_a_typed_error() {
        if std::path::Path::new(DEVICE_PATH).exists() {
            return;
        }
        let err = Xen.bind_unbound(0).expect_err("no device, no bind");
        assert!(matches!(err, Error::Open { path, .. } if path == DEVICE_PATH));
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        let msg = err.to_string();
        assert!(msg.contains(DEVICE_PATH), "{msg}");
        let err = Xen.bind_interdomain(1, 5).expect_err("no device, no bind");
        assert!(matches!(err, Error::Open { .. }));
        let io: std::io::Error = err.into();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert!(io.to_string().contains(DEVICE_PATH));
    }
}
