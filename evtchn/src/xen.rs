//! The real backend over `/dev/xen/evtchn`.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::alarm;
use crate::sys;
use crate::{Backend, DomId, Error, EventChannel, Port, PortStatus};

/// The event channel device.
pub const DEVICE_PATH: &str = "/dev/xen/evtchn";

/// The real backend: every channel opens its own handle on
/// [`DEVICE_PATH`] (`O_RDWR | O_CLOEXEC | O_NONBLOCK`), as libxenvchan does
/// (the handle turns blocking when the channel first sleeps: see
/// [`XenChannel`]).
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
///
/// How it sleeps (docs/vchan.md §6.1): the first wait that may last at
/// least 200 ms (`LINGER`) binds a *loopback* pair of ports on the same
/// handle (a port unbound towards our own domain and a second port bound
/// to it, `DOMID_SELF`) and turns the handle blocking. From then on a wait
/// is what libxenvchan does, a blocking `read` and the re-arm `write`, and
/// its timeout is an entry in the process's alarm, which notifies the
/// loopback pair when the deadline passes. Should the pair not bind, the
/// handle stays non-blocking and every wait `poll`s first (one more system
/// call per sleep).
#[derive(Debug)]
pub struct XenChannel {
    fd: OwnedFd,
    port: Port,
    /// Held by every read of the fd, so that a blocking read never finds
    /// its event taken by another thread between "readable" and `read`.
    reader: Mutex<()>,
    /// The loopback pair once bound (the fd is blocking from then on);
    /// `Some(None)`: tried and failed, the fd stays non-blocking.
    loopback: OnceLock<Option<Loopback>>,
}

/// The two ports that let the alarm end a blocking read: a notify on
/// `bound` makes `unbound` pending on our own fd.
#[derive(Debug, Clone, Copy)]
struct Loopback {
    unbound: Port,
    bound: Port,
}

/// The alarm's kick for a device sleeper: a notify on the loopback port
/// `bound` of the handle `fd`.
pub(crate) fn kick_loopback(fd: RawFd, bound: Port) {
    // SAFETY: the alarm's contract: a sleeper keeps its handle open while its entry is armed, and the thread kicks only armed entries, under the registry's lock that the entry's removal also takes.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = notify_port(fd, bound);
}

fn open_device() -> Result<OwnedFd, Error> {
    // The fd starts non-blocking so that a poll()ed readiness that another
    // thread consumed first turns into EAGAIN instead of a blocked read;
    // it turns blocking with the loopback pair (see `XenChannel`).
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

/// A bind ioctl (`request` with its struct `T`) on `fd`, retried on
/// `EINTR`: the new local port, or the errno.
///
/// # Safety
///
/// As [`ioctl_with`]: `request` must be a bind ioctl taking a `T`.
unsafe fn bind_ioctl<T>(fd: BorrowedFd<'_>, request: u32, arg: &T) -> Result<i32, Errno> {
    loop {
        // SAFETY: the caller's contract is `ioctl_with`'s.
        match unsafe { ioctl_with(fd, request, arg) } {
            Err(Errno::EINTR) => {}
            r => return r,
        }
    }
}

/// `IOCTL_EVTCHN_NOTIFY` of `port` on `fd`, retried on `EINTR`.
fn notify_port(fd: BorrowedFd<'_>, port: Port) -> Result<(), Errno> {
    let arg = sys::IoctlEvtchnNotify { port };
    loop {
        // SAFETY: IOCTL_EVTCHN_NOTIFY takes a `struct ioctl_evtchn_notify`.
        match unsafe { ioctl_with(fd, sys::IOCTL_EVTCHN_NOTIFY, &arg) } {
            Err(Errno::EINTR) => {}
            r => return r.map(drop),
        }
    }
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
        // SAFETY: both bind requests passed here take exactly the struct type `T` that the caller pairs with them (see `Backend for Xen`).
        let rc = unsafe { bind_ioctl(fd.as_fd(), request, arg) }.map_err(|source| Error::Bind {
            op,
            remote,
            remote_port,
            source,
        })?;
        let port = Port::try_from(rc).map_err(|_| Error::Protocol {
            op,
            detail: format!("the device returned port {rc}"),
        })?;
        let ch = XenChannel {
            fd,
            port,
            reader: Mutex::new(()),
            loopback: OnceLock::new(),
        };
        // libxenvchan unmasks once right after the bind.
        ch.write_port("unmask after bind")?;
        Ok(ch)
    }

    /// One bind ioctl on our handle; the new port, or `None`.
    fn bind_more<T>(&self, request: u32, arg: &T) -> Option<Port> {
        // SAFETY: the callers pass the bind requests with their own struct types (`bind_loopback`).
        let rc = unsafe { bind_ioctl(self.fd.as_fd(), request, arg) }.ok()?;
        Port::try_from(rc).ok()
    }

    fn unbind(&self, port: Port) {
        let arg = sys::IoctlEvtchnUnbind { port };
        // SAFETY: IOCTL_EVTCHN_UNBIND takes a `struct ioctl_evtchn_unbind`.
        let _ = unsafe { ioctl_with(self.fd.as_fd(), sys::IOCTL_EVTCHN_UNBIND, &arg) };
    }

    /// Binds the loopback pair, starts the alarm and turns the fd blocking
    /// (called once, under the reader lock). `None` (and nothing left
    /// bound) if any step fails: then the channel keeps polling.
    fn bind_loopback(&self) -> Option<Loopback> {
        let unbound = self.bind_more(
            sys::IOCTL_EVTCHN_BIND_UNBOUND_PORT,
            &sys::IoctlEvtchnBindUnboundPort {
                remote_domain: sys::DOMID_SELF.into(),
            },
        )?;
        let Some(bound) = self.bind_more(
            sys::IOCTL_EVTCHN_BIND_INTERDOMAIN,
            &sys::IoctlEvtchnBindInterdomain {
                remote_domain: sys::DOMID_SELF.into(),
                remote_port: unbound,
            },
        ) else {
            self.unbind(unbound);
            return None;
        };
        let mut ports = [0u8; 8];
        ports[..4].copy_from_slice(&unbound.to_ne_bytes());
        ports[4..].copy_from_slice(&bound.to_ne_bytes());
        let blocking = || -> Result<(), Errno> {
            let fl = OFlag::from_bits_retain(nix::fcntl::fcntl(&self.fd, FcntlArg::F_GETFL)?);
            nix::fcntl::fcntl(&self.fd, FcntlArg::F_SETFL(fl - OFlag::O_NONBLOCK))?;
            Ok(())
        };
        let ready = nix::unistd::write(&self.fd, &ports).is_ok_and(|n| n == 8)
            && alarm::xen().start()
            && blocking().is_ok();
        if !ready {
            self.unbind(bound);
            self.unbind(unbound);
            return None;
        }
        Some(Loopback { unbound, bound })
    }

    /// The loopback pair, bound on first use; `None` if it cannot be.
    fn loopback(&self) -> Option<Loopback> {
        *self.loopback.get_or_init(|| {
            let _reading = self.lock_reader();
            self.bind_loopback()
        })
    }

    /// The loopback pair if it is bound (the fd is blocking), without
    /// trying to bind it.
    fn bound_loopback(&self) -> Option<Loopback> {
        self.loopback.get().copied().flatten()
    }

    fn lock_reader(&self) -> MutexGuard<'_, ()> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether an event is queued now (a `poll` that does not wait).
    fn readable_now(&self) -> Result<bool, Error> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        loop {
            match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
                Ok(n) => return Ok(n > 0),
                Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(Error::Io {
                        op: "poll",
                        port: self.port,
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// Reads the queued ports (blocking if the fd is) and re-arms them;
    /// `Ok(true)` if our own port was among them. The caller holds the
    /// reader lock. Loopback ports are the alarm's (or their bind's) and
    /// count as no event; any other port is a protocol error.
    fn take_events(&self) -> Result<bool, Error> {
        let mut buf = [0u8; 16];
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
        if n == 0 || n % 4 != 0 {
            return Err(Error::Protocol {
                op: "read",
                detail: format!("read of {n} bytes from {DEVICE_PATH}"),
            });
        }
        let lb = self.bound_loopback();
        let mut own = false;
        let mut stranger = None;
        for p in buf[..n].chunks_exact(4) {
            let got = Port::from_ne_bytes([p[0], p[1], p[2], p[3]]);
            if got == self.port {
                own = true;
            } else if !lb.is_some_and(|l| got == l.unbound || got == l.bound) {
                stranger = Some(got);
            }
        }
        // Re-arm everything read, strangers included (the device ignores
        // ports that are not ours).
        self.write_ports(&buf[..n], "re-arm")?;
        if let Some(got) = stranger {
            return Err(Error::Protocol {
                op: "read",
                detail: format!("event for port {got} on the fd of port {}", self.port),
            });
        }
        Ok(own)
    }

    /// A blocking sleep (the fd is blocking): the alarm ends it after
    /// `timeout` if no event does. `Ok(true)` if our own port fired.
    fn sleep(&self, lb: Loopback, timeout: Option<Duration>) -> Result<bool, Error> {
        let armed = match timeout {
            None => None,
            Some(t) => match alarm::xen().arm(self.fd.as_raw_fd(), lb.bound, t) {
                Some(a) => Some(a),
                None => return self.poll_then_take(t),
            },
        };
        let _reading = self.lock_reader();
        // Another sleeper on this channel may have read our kick while we
        // waited for the lock: our time is up.
        if armed.as_ref().is_some_and(alarm::Armed::kicked) {
            return Ok(false);
        }
        loop {
            if self.take_events()? {
                return Ok(true);
            }
            // Only loopback ports. Our kick: time is up. Another sleeper's
            // kick (it waits for the lock we hold): give way, a spurious
            // wake-up for us. Else a stray (the pair's bind wake-up, a late
            // kick for a sleep that has ended): sleep on.
            if armed.as_ref().is_some_and(alarm::Armed::kicked)
                || alarm::xen().kicked_for_another(self.fd.as_raw_fd(), armed.as_ref())
            {
                return Ok(false);
            }
        }
    }

    /// A timed wait by `poll` on the blocking fd, reading only when an
    /// event is there (short waits, and when the alarm cannot run): after a
    /// readable poll at once, after a timeout only if a last look finds one.
    fn poll_then_take(&self, timeout: Duration) -> Result<bool, Error> {
        let _reading = self.lock_reader();
        crate::wait_with(self.fd.as_fd(), self.port, Some(timeout), |readable| {
            if readable || self.readable_now()? {
                self.take_events()
            } else {
                Ok(false)
            }
        })
    }

    fn write_port(&self, op: &'static str) -> Result<(), Error> {
        self.write_ports(&self.port.to_ne_bytes(), op)
    }

    fn write_ports(&self, buf: &[u8], op: &'static str) -> Result<(), Error> {
        loop {
            match nix::unistd::write(&self.fd, buf) {
                Ok(n) if n == buf.len() => return Ok(()),
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
        notify_port(self.fd.as_fd(), self.port).map_err(|source| Error::Ioctl {
            op: "IOCTL_EVTCHN_NOTIFY",
            port: self.port,
            source,
        })
    }

    fn wait(&self) -> Result<(), Error> {
        match self.loopback() {
            Some(lb) => while !self.sleep(lb, None)? {},
            None => {
                crate::wait_with(self.fd.as_fd(), self.port, None, |_| self.consume_pending())?;
            }
        }
        Ok(())
    }

    fn wait_timeout(&self, timeout: Duration) -> Result<bool, Error> {
        // A long wait binds the pair on first use; a short one polls, on
        // a blocking fd only under the reader lock.
        if timeout >= alarm::LINGER {
            if let Some(lb) = self.loopback() {
                return self.sleep(lb, Some(timeout));
            }
        } else if self.bound_loopback().is_some() {
            return self.poll_then_take(timeout);
        }
        crate::wait_with(self.fd.as_fd(), self.port, Some(timeout), |_| {
            self.consume_pending()
        })
    }

    /// Never blocks: while another thread of ours reads the fd (or sleeps
    /// in a read), the event is that thread's and this answers `false`.
    fn consume_pending(&self) -> Result<bool, Error> {
        let _reading = match self.reader.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(false),
        };
        if self.bound_loopback().is_some() && !self.readable_now()? {
            return Ok(false);
        }
        self.take_events()
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
        // A failure leaves nothing to do: closing the fd unbinds as well
        // (the loopback pair goes with it).
        self.unbind(self.port);
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
