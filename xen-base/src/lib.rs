//! The bottom layer of rust-vchan: what the device crates (`evtchn`,
//! `gnttab`), `xenstore` and `vchan` share, so that each is written once.
//!
//! * [`DomId`] and [`parse_domid`]: a Xen domain id and the strict parser
//!   Qubes uses for it (docs/vchan.md §8.3).
//! * [`poll_until`]: wait with `poll(2)` until a descriptor is ready or a
//!   deadline passes, rounding the timeout *up* (a short wait sleeps, it
//!   never spins with a zero timeout) and retrying `EINTR` with the time
//!   that is left.
//!
//! The crates above re-export what they use (`evtchn::DomId`,
//! `xenstore::parse_domid`, `vchan::DomId`, ...), so their users need not
//! name this crate.
//!
//! ```
//! use std::os::fd::AsFd;
//! use std::time::{Duration, Instant};
//! use nix::poll::PollFlags;
//!
//! assert_eq!(xen_base::parse_domid("5"), Some(5));
//! let (r, _w) = std::io::pipe()?;
//! // Nothing to read: false once the deadline has passed.
//! let deadline = Instant::now() + Duration::from_millis(2);
//! assert!(!xen_base::poll_until(r.as_fd(), PollFlags::POLLIN, Some(deadline))?);
//! assert!(Instant::now() >= deadline);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

/// A Xen domain id (`domid_t`).
pub type DomId = u16;

/// The first reserved domain id (`DOMID_FIRST_RESERVED`); real domains are
/// below it.
pub const DOMID_FIRST_RESERVED: u32 = 0x7FF0;

/// Parses a domain id strictly, as Qubes does (docs/vchan.md §8.3): decimal,
/// no sign, no white space, no leading zeros except `0` itself, below
/// [`DOMID_FIRST_RESERVED`].
///
/// ```
/// assert_eq!(xen_base::parse_domid("12"), Some(12));
/// assert_eq!(xen_base::parse_domid("012"), None);
/// assert_eq!(xen_base::parse_domid("+5"), None);
/// assert_eq!(xen_base::parse_domid("32752"), None); // 0x7FF0
/// ```
pub fn parse_domid(s: &str) -> Option<DomId> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    let v: u32 = s.parse().ok()?;
    if v < DOMID_FIRST_RESERVED {
        DomId::try_from(v).ok()
    } else {
        None
    }
}

/// The `poll(2)` timeout for a wait of `left`: whole milliseconds rounded
/// up, so that a positive wait never becomes a zero timeout (a busy loop in
/// the last millisecond); capped at [`PollTimeout::MAX`].
///
/// ```
/// use std::time::Duration;
/// use nix::poll::PollTimeout;
/// assert_eq!(xen_base::poll_timeout(Duration::ZERO), PollTimeout::ZERO);
/// assert_eq!(xen_base::poll_timeout(Duration::from_micros(400)), PollTimeout::from(1u8));
/// assert_eq!(xen_base::poll_timeout(Duration::from_micros(1001)), PollTimeout::from(2u8));
/// ```
pub fn poll_timeout(left: Duration) -> PollTimeout {
    let ms = left.as_nanos().div_ceil(1_000_000);
    i32::try_from(ms)
        .ok()
        .and_then(|ms| PollTimeout::try_from(ms).ok())
        .unwrap_or(PollTimeout::MAX)
}

/// Waits until `fd` reports one of `flags` (or an error or hang-up, which
/// the caller's next read or write tells apart) or until `deadline` passes;
/// `None` waits for ever. Returns `Ok(false)` when the deadline passed
/// first, never before it. `EINTR` is retried with the time that is left; a
/// deadline already past polls once without waiting.
///
/// ```
/// use std::io::Write;
/// use std::os::fd::AsFd;
/// use nix::poll::PollFlags;
///
/// let (r, mut w) = std::io::pipe()?;
/// w.write_all(b"x")?;
/// assert!(xen_base::poll_until(r.as_fd(), PollFlags::POLLIN, None)?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn poll_until(
    fd: BorrowedFd<'_>,
    flags: PollFlags,
    deadline: Option<Instant>,
) -> Result<bool, Errno> {
    poll_until_with(deadline, |timeout| {
        let mut fds = [PollFd::new(fd, flags)];
        nix::poll::poll(&mut fds, timeout)
    })
}

/// The loop of [`poll_until`] over any `poll`, so tests can count the calls,
/// see the timeouts and inject `EINTR`.
fn poll_until_with(
    deadline: Option<Instant>,
    mut poll: impl FnMut(PollTimeout) -> Result<i32, Errno>,
) -> Result<bool, Errno> {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => poll_timeout(d.saturating_duration_since(Instant::now())),
        };
        match poll(timeout) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn domid_parse_is_strict() {
        assert_eq!(parse_domid("0"), Some(0));
        assert_eq!(parse_domid("32751"), Some(0x7FEF));
        for s in [
            "",
            "00",
            "01",
            "-1",
            "+1",
            " 1",
            "1 ",
            "32752",
            "65535",
            "1a",
            "99999999999",
        ] {
            assert_eq!(parse_domid(s), None, "{s:?}");
        }
    }

    #[test]
    fn timeout_rounds_up_and_saturates() {
        let ms = |d: Duration| i32::from(poll_timeout(d));
        assert_eq!(ms(Duration::ZERO), 0);
        assert_eq!(ms(Duration::from_nanos(1)), 1);
        assert_eq!(ms(Duration::from_micros(400)), 1);
        assert_eq!(ms(Duration::from_millis(1)), 1);
        assert_eq!(ms(Duration::from_micros(1001)), 2);
        assert_eq!(ms(Duration::from_secs(u64::MAX)), i32::MAX);
    }

    /// A deadline of 0.4 ms waits at least 0.4 ms, with one sleeping poll,
    /// not a spin of zero-timeout polls.
    #[test]
    fn sub_millisecond_deadline_sleeps_instead_of_spinning() {
        let (r, _w) = std::io::pipe().unwrap();
        let start = Instant::now();
        let deadline = start + Duration::from_micros(400);
        let mut timeouts = Vec::new();
        let ready = poll_until_with(Some(deadline), |t| {
            timeouts.push(t);
            let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
            nix::poll::poll(&mut fds, t)
        })
        .unwrap();
        assert!(!ready);
        assert!(start.elapsed() >= Duration::from_micros(400));
        assert!(timeouts[0] > PollTimeout::ZERO, "{timeouts:?}");
        // poll(2) sleeps at least the 1 ms asked, so one call is enough; a
        // loaded machine may wake it early only by a signal, never here.
        assert_eq!(timeouts.len(), 1, "{timeouts:?}");
    }

    /// `EINTR` is retried, and the retry waits only for what is left.
    #[test]
    fn eintr_is_retried_with_the_remaining_time() {
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut timeouts = Vec::new();
        let ready = poll_until_with(Some(deadline), |t| {
            timeouts.push(t);
            if timeouts.len() == 1 {
                // A signal arrives after 30 ms.
                std::thread::sleep(Duration::from_millis(30));
                return Err(Errno::EINTR);
            }
            std::thread::sleep(t.duration().unwrap());
            Ok(0)
        })
        .unwrap();
        assert!(!ready);
        assert!(Instant::now() >= deadline);
        assert_eq!(timeouts.len(), 2, "{timeouts:?}");
        let (first, second) = (i32::from(timeouts[0]), i32::from(timeouts[1]));
        // At least 30 ms passed between the two (1 ms for the rounding up);
        // what is left is still positive unless this machine stalled for
        // most of half a second.
        assert!(first <= 500, "{timeouts:?}");
        assert!(second > 0 && second <= first - 29, "{timeouts:?}");
    }

    #[test]
    fn other_errors_end_the_wait() {
        let r = poll_until_with(None, |t| {
            assert_eq!(t, PollTimeout::NONE);
            Err(Errno::EBADF)
        });
        assert_eq!(r, Err(Errno::EBADF));
    }

    #[test]
    fn ready_descriptor_and_past_deadline() {
        let (r, mut w) = std::io::pipe().unwrap();
        let past = Instant::now();
        // Nothing to read and the deadline passed: one poll, no wait.
        assert!(!poll_until(r.as_fd(), PollFlags::POLLIN, Some(past)).unwrap());
        w.write_all(b"x").unwrap();
        assert!(poll_until(r.as_fd(), PollFlags::POLLIN, Some(past)).unwrap());
        assert!(poll_until(r.as_fd(), PollFlags::POLLIN, None).unwrap());
        assert!(poll_until(w.as_fd(), PollFlags::POLLOUT, None).unwrap());
    }
}
