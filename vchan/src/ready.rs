//! [`Vchan::wait_ready`]: the whole "peek → spin → arm and re-check →
//! sleep" sequence of an event loop (docs/vchan.md §5.4) as one call, with
//! the loop's own descriptors polled in the same `poll(2)`.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::{Error, Result, Vchan};

/// What [`Vchan::wait_ready`] waits for on the vchan itself. A zero
/// `data` or `space` means "not this".
///
/// ```
/// use vchan::Interest;
/// let i = Interest::data(1).and_space(9);
/// assert_eq!((i.data, i.space, i.spin), (1, 9, true));
/// assert!(!i.without_spin().spin);
/// assert_eq!(Interest::NONE, Interest::default());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    /// Ready when at least this many bytes can be read (0: data does not
    /// matter).
    pub data: usize,
    /// Ready when at least this many bytes of the write ring are free (0:
    /// space does not matter).
    pub space: usize,
    /// Whether to spin briefly before asking for an event and sleeping:
    /// worth it when the rings are what the loop waits for, not when it
    /// mostly waits for a local descriptor.
    pub spin: bool,
}

impl Interest {
    /// Nothing from the rings: only the watched descriptors, the timeout
    /// and the vchan's own events (connect, close) end the wait.
    pub const NONE: Interest = Interest {
        data: 0,
        space: 0,
        spin: false,
    };

    /// At least `n` bytes to read (spinning first).
    ///
    /// ```
    /// assert_eq!(vchan::Interest::data(4).data, 4);
    /// ```
    pub fn data(n: usize) -> Interest {
        Interest {
            data: n,
            space: 0,
            spin: true,
        }
    }

    /// At least `n` bytes of free space (spinning first).
    ///
    /// ```
    /// assert_eq!(vchan::Interest::space(4).space, 4);
    /// ```
    pub fn space(n: usize) -> Interest {
        Interest {
            data: 0,
            space: n,
            spin: true,
        }
    }

    /// This, and also at least `n` bytes of free space.
    ///
    /// ```
    /// assert_eq!(vchan::Interest::data(1).and_space(2), vchan::Interest { data: 1, space: 2, spin: true });
    /// ```
    pub fn and_space(self, n: usize) -> Interest {
        Interest { space: n, ..self }
    }

    /// This, without the spin.
    ///
    /// ```
    /// assert!(!vchan::Interest::data(1).without_spin().spin);
    /// ```
    pub fn without_spin(self) -> Interest {
        Interest {
            spin: false,
            ..self
        }
    }

    /// Whether `data` bytes ready and `space` bytes free satisfy it.
    ///
    /// ```
    /// use vchan::Interest;
    /// assert!(Interest::data(1).met(1, 0));
    /// assert!(!Interest::data(2).met(1, 100));
    /// assert!(Interest::data(2).and_space(100).met(1, 100));
    /// assert!(!Interest::NONE.met(100, 100));
    /// ```
    pub fn met(&self, data: usize, space: usize) -> bool {
        (self.data > 0 && data >= self.data) || (self.space > 0 && space >= self.space)
    }
}

/// A local descriptor polled beside the vchan by [`Vchan::wait_ready`]
/// (what a `PollFd` is to `poll(2)`, with the result readable afterwards).
///
/// ```
/// use nix::poll::PollFlags;
/// use std::os::fd::AsFd;
/// let (r, _w) = std::io::pipe()?;
/// let w = vchan::Watch::new(r.as_fd(), PollFlags::POLLIN);
/// assert!(w.revents().is_empty()); // nothing reported before a wait
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Watch<'fd> {
    fd: BorrowedFd<'fd>,
    events: PollFlags,
    revents: PollFlags,
}

impl<'fd> Watch<'fd> {
    /// Watch `fd` for `events` (`POLLERR`, `POLLHUP` and `POLLNVAL` are
    /// always reported, also with empty `events`).
    pub fn new(fd: BorrowedFd<'fd>, events: PollFlags) -> Watch<'fd> {
        Watch {
            fd,
            events,
            revents: PollFlags::empty(),
        }
    }

    /// What the last [`Vchan::wait_ready`] saw on it (empty when it did
    /// not poll the descriptors or nothing happened).
    pub fn revents(&self) -> PollFlags {
        self.revents
    }

    /// Whether the last wait saw anything on it.
    pub fn fired(&self) -> bool {
        !self.revents.is_empty()
    }
}

/// What [`Vchan::wait_ready`] found when it returned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Bytes ready to read (looked at last, without asking for an event).
    pub data: usize,
    /// Free bytes in the write ring (looked at last).
    pub space: usize,
    /// Whether `data`/`space` satisfy the [`Interest`].
    pub ring: bool,
    /// Whether the vchan's descriptor fired (its events were consumed:
    /// the peer wrote, read, connected or closed).
    pub event: bool,
    /// Whether a watched descriptor reported something.
    pub watched: bool,
    /// Whether the wait slept for the whole timeout with nothing reported.
    pub timed_out: bool,
}

/// `poll(2)`'s timeout for `t`: [`xen_base::poll_timeout`] (rounded up to
/// whole milliseconds, so a short timeout never becomes a busy poll);
/// `None`: forever.
fn poll_timeout(t: Option<Duration>) -> PollTimeout {
    t.map_or(PollTimeout::NONE, xen_base::poll_timeout)
}

impl Vchan {
    /// Bytes ready and free now; with `arm`, asking the peer for an event
    /// on its next write and read first, then looking again (the Dekker
    /// re-check of docs/vchan.md §5.4).
    fn look(&mut self, want: Interest, arm: bool) -> Result<(usize, usize)> {
        let data = if want.data > 0 && arm {
            self.data_ready()?
        } else {
            self.peek_data_ready()?
        };
        let space = if want.space > 0 && arm {
            self.buffer_space()?
        } else {
            self.peek_buffer_space()?
        };
        Ok((data, space))
    }

    /// Waits until the rings satisfy `want`, a descriptor in `extra`
    /// reports something, the vchan's own descriptor fires (connect,
    /// close, a wake-up) or `timeout` passes (`None`: no limit; zero:
    /// only look, never sleep), whichever comes first. The one wait an
    /// event loop over a vchan and local descriptors needs:
    ///
    /// 1. look at the rings without asking for an event (no write to
    ///    shared memory);
    /// 2. if that is not enough, the call may sleep and `want.spin`: look
    ///    at the descriptors once without waiting (one that is ready ends
    ///    the call: spinning would only delay it), then spin briefly for
    ///    the rings (adaptive, none on one CPU; for space when `want.space`
    ///    is set and short, else for data), still without asking;
    /// 3. ask the peer for an event for what `want` names, then look
    ///    again: what the peer published before it could see the request
    ///    is found here and never slept through;
    /// 4. `poll(2)` the vchan's descriptor and `extra` together, for the
    ///    timeout if the rings are still not ready, else with timeout zero
    ///    (the descriptors are looked at on every call, so a busy vchan
    ///    never starves them); consume the vchan's events if it fired.
    ///
    /// Returns what it found; each `extra` entry's
    /// [`Watch::revents`] tells what happened to it. A signal (`EINTR`)
    /// ends the wait early with nothing reported. The socket transport
    /// does not spin, and polls the flags [`Vchan::poll_interest`] names.
    ///
    /// # Errors
    /// [`Error::Ring`] when the peer corrupted the shared indices;
    /// [`Error::Io`] when `poll(2)` or the event channel failed.
    ///
    /// ```
    /// use nix::poll::PollFlags;
    /// use std::io::Write;
    /// use std::os::fd::AsFd;
    /// use std::time::Duration;
    /// use vchan::{Interest, LocalXen, Vchan, Watch};
    /// let dir = tempfile::tempdir()?;
    /// let xen = LocalXen::start(dir.path(), &[0, 1])?;
    /// let mut srv = Vchan::server(&xen.transport(0), 1, 79, 4096, 4096)?;
    /// let mut cli = Vchan::client(&xen.transport(1), 0, 79, Duration::from_secs(5))?;
    /// srv.wait_connected(None)?;
    /// let (stdin, mut feed) = std::io::pipe()?;
    /// // A loop that forwards `stdin` to the vchan and reads what comes back.
    /// let writer = std::thread::spawn(move || {
    ///     srv.write_all(b"pong")?;
    ///     Ok::<_, std::io::Error>(srv)
    /// });
    /// let mut watch = [Watch::new(stdin.as_fd(), PollFlags::POLLIN)];
    /// // A wait can also end for an event that changed nothing we asked
    /// // for (the connect's): wait until the rings are ready.
    /// let r = loop {
    ///     let r = cli.wait_ready(Interest::data(4), &mut watch, Some(Duration::from_secs(10)))?;
    ///     assert!(!r.timed_out);
    ///     if r.ring {
    ///         break r;
    ///     }
    /// };
    /// assert_eq!(r.data, 4);
    /// feed.write_all(b"ping")?;
    /// let r = cli.wait_ready(Interest::NONE, &mut watch, Some(Duration::from_secs(10)))?;
    /// assert!(r.watched && watch[0].revents().contains(PollFlags::POLLIN));
    /// # drop(writer.join().unwrap()?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_ready(
        &mut self,
        want: Interest,
        extra: &mut [Watch<'_>],
        timeout: Option<Duration>,
    ) -> Result<Readiness> {
        for w in extra.iter_mut() {
            w.revents = PollFlags::empty();
        }
        let may_sleep = timeout != Some(Duration::ZERO);
        let (mut data, mut space) = self.look(want, false)?;
        let mut ready = want.met(data, space);
        if !ready && may_sleep && want.spin && !extra.is_empty() {
            // Before spinning for the peer: is a local descriptor ready
            // already? Then spinning would only delay it.
            let (event, watched, _) = self.poll_with(extra, Some(Duration::ZERO))?;
            if event || watched {
                let (data, space) = self.look(want, false)?;
                return Ok(Readiness {
                    data,
                    space,
                    ring: want.met(data, space),
                    event,
                    watched,
                    timed_out: false,
                });
            }
        }
        if !ready && may_sleep && want.spin {
            let spun = if want.space > 0 && space < want.space {
                self.spin_for_space(want.space)?
            } else if want.data > 0 {
                self.spin_for_data(want.data)?
            } else {
                false
            };
            if spun {
                (data, space) = self.look(want, false)?;
                ready = want.met(data, space);
            }
        }
        if !ready && may_sleep && (want.data > 0 || want.space > 0) {
            #[cfg(test)]
            tests::before_request();
            (data, space) = self.look(want, true)?;
            ready = want.met(data, space);
        }
        if ready && extra.is_empty() && !self.poll_interest().contains(PollFlags::POLLOUT) {
            // Nothing else to look at (and no held-back socket output to
            // push): no syscall.
            return Ok(Readiness {
                data,
                space,
                ring: true,
                ..Readiness::default()
            });
        }
        let timeout = if ready { Some(Duration::ZERO) } else { timeout };
        let (event, watched, n) = self.poll_with(extra, timeout)?;
        let (data, space) = self.look(want, false)?;
        Ok(Readiness {
            data,
            space,
            ring: want.met(data, space),
            event,
            watched,
            timed_out: n == 0 && timeout != Some(Duration::ZERO),
        })
    }

    /// One `poll(2)` of our descriptor (for what [`Vchan::poll_interest`]
    /// names) and `extra`; consumes our events if it fired. Returns whether
    /// it fired, whether any of `extra` did, and poll's count (-1 on
    /// `EINTR`).
    fn poll_with(
        &mut self,
        extra: &mut [Watch<'_>],
        timeout: Option<Duration>,
    ) -> Result<(bool, bool, i32)> {
        let interest = self.poll_interest();
        let (event, watched, n) = {
            let own = (!interest.is_empty()).then(|| PollFd::new(self.as_fd(), interest));
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(extra.len() + 1);
            fds.extend(own);
            let off = fds.len();
            fds.extend(extra.iter().map(|w| PollFd::new(w.fd, w.events)));
            let n = match poll(&mut fds, poll_timeout(timeout)) {
                Ok(n) => n,
                Err(Errno::EINTR) => -1,
                Err(e) => return Err(Error::io("poll", e.into())),
            };
            let fired = |f: &PollFd<'_>| f.revents().unwrap_or(PollFlags::empty());
            let event = off == 1 && !fired(&fds[0]).is_empty();
            let mut watched = false;
            for (w, f) in extra.iter_mut().zip(&fds[off..]) {
                w.revents = fired(f);
                watched |= !w.revents.is_empty();
            }
            (event, watched, n)
        };
        if event {
            self.consume_events()?;
        }
        Ok((event, watched, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LocalXen, State, Transport};
    use std::io::{Read, Write};
    use std::sync::mpsc;

    thread_local! {
        /// Run by `wait_ready` after its last look without a request and
        /// right before it asks for an event: lets a test publish data
        /// exactly in that window.
        static BEFORE_REQUEST: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
            const { std::cell::RefCell::new(None) };
    }

    pub(super) fn before_request() {
        BEFORE_REQUEST.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f();
            }
        });
    }

    /// The window the re-check exists for, hit exactly: the peer publishes
    /// after our last look and before our request, so it sends no event
    /// (none was asked for). Only looking again after the request finds
    /// the data; without it the wait would sleep to its timeout.
    #[test]
    fn data_published_just_before_the_request_is_found_by_the_recheck() {
        let dir = tempfile::tempdir().unwrap();
        let xen = LocalXen::start(dir.path(), &[0, 1]).unwrap();
        let (srv, mut cli) = pair(&xen, 96, 4096);
        let srv = std::rc::Rc::new(std::cell::RefCell::new(srv));
        let mut b = [0u8; 1];
        // Settle: a request answered and its event taken, so none is
        // outstanding when the round below starts.
        assert_eq!(cli.data_ready().unwrap(), 0);
        srv.borrow_mut().write_all(b"s").unwrap();
        while !cli
            .wait_ready(Interest::data(1), &mut [], Some(LONG))
            .unwrap()
            .ring
        {}
        cli.read_exact(&mut b).unwrap();
        while cli
            .wait_ready(Interest::NONE, &mut [], Some(Duration::from_millis(1)))
            .unwrap()
            .event
        {}
        let peer = srv.clone();
        BEFORE_REQUEST.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                peer.borrow_mut().write_all(b"x").unwrap();
            }))
        });
        let r = cli
            .wait_ready(Interest::data(1), &mut [], Some(Duration::from_secs(3)))
            .unwrap();
        BEFORE_REQUEST.with(|h| *h.borrow_mut() = None);
        assert!(r.ring && !r.timed_out && !r.event, "{r:?}");
        cli.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }

    /// A long bound: only reached when a wake-up was lost (the test then
    /// fails on `timed_out`), never a measurement.
    const LONG: Duration = Duration::from_secs(20);

    fn pair(xen: &LocalXen, port: u32, size: usize) -> (Vchan, Vchan) {
        let mut srv = Vchan::server(&xen.transport(0), 1, port, size, size).unwrap();
        let cli = Vchan::client(&xen.transport(1), 0, port, Duration::from_secs(10)).unwrap();
        srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
        (srv, cli)
    }

    /// Data the peer publishes at every moment relative to our look, spin,
    /// request and sleep (a sweep of delays from none to beyond the spin
    /// bound) is never slept through: each wait ends with the data and
    /// without reaching its timeout. Without the re-check after the
    /// request, a write that lands between the last look and the request
    /// sends no event (none was asked for) and the wait would sleep to
    /// `LONG`.
    #[test]
    fn data_published_around_the_request_is_not_slept_through() {
        let dir = tempfile::tempdir().unwrap();
        let xen = LocalXen::start(dir.path(), &[0, 1]).unwrap();
        let (mut srv, mut cli) = pair(&xen, 90, 4096);
        let (go_tx, go_rx) = mpsc::channel::<u32>();
        let peer = std::thread::spawn(move || {
            for delay in go_rx {
                // Busy delay: from 0 to ~200 µs, past the spin bound.
                let until = std::time::Instant::now() + Duration::from_nanos(u64::from(delay));
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
                srv.write_all(b"x").unwrap();
            }
            srv
        });
        let mut b = [0u8; 1];
        for i in 0..600u32 {
            go_tx.send((i * 7919) % 200_000).unwrap();
            // A wake by an event left from the previous round ends a wait
            // without data: wait again, still bounded.
            loop {
                let r = cli
                    .wait_ready(Interest::data(1), &mut [], Some(LONG))
                    .unwrap();
                assert!(!r.timed_out, "round {i}: slept through published data");
                if r.ring {
                    break;
                }
            }
            cli.read_exact(&mut b).unwrap();
        }
        drop(go_tx);
        drop(peer.join().unwrap());
    }

    /// The same for space: a full ring drained by the peer at any moment
    /// wakes the writer.
    #[test]
    fn space_freed_around_the_request_is_not_slept_through() {
        let dir = tempfile::tempdir().unwrap();
        let xen = LocalXen::start(dir.path(), &[0, 1]).unwrap();
        let (mut srv, mut cli) = pair(&xen, 91, 4096);
        let size = cli.write_ring_size();
        let (go_tx, go_rx) = mpsc::channel::<u32>();
        let peer = std::thread::spawn(move || {
            let mut b = vec![0u8; 4096];
            for delay in go_rx {
                let until = std::time::Instant::now() + Duration::from_nanos(u64::from(delay));
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
                srv.read_exact(&mut b[..64]).unwrap();
            }
            srv
        });
        cli.write_all(&vec![7u8; size]).unwrap();
        for i in 0..300u32 {
            assert_eq!(cli.peek_buffer_space().unwrap(), 0);
            go_tx.send((i * 7919) % 200_000).unwrap();
            let mut r = cli
                .wait_ready(Interest::space(64), &mut [], Some(LONG))
                .unwrap();
            while !r.ring {
                assert!(!r.timed_out, "round {i}: slept through freed space");
                r = cli
                    .wait_ready(Interest::space(64), &mut [], Some(LONG))
                    .unwrap();
            }
            assert!(!r.timed_out);
            assert_eq!(r.space, 64);
            cli.write_all(&[7u8; 64]).unwrap();
        }
        drop(go_tx);
        drop(peer.join().unwrap());
    }

    #[test]
    fn ready_at_once_without_sleeping_and_watches_still_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let xen = LocalXen::start(dir.path(), &[0, 1]).unwrap();
        let (mut srv, mut cli) = pair(&xen, 92, 4096);
        srv.write_all(b"abc").unwrap();
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(b"!").unwrap();
        let mut watch = [Watch::new(r.as_fd(), PollFlags::POLLIN)];
        let got = cli.wait_ready(Interest::data(1), &mut watch, None).unwrap();
        assert!(got.ring && got.watched && !got.timed_out, "{got:?}");
        assert_eq!(got.data, 3);
        assert!(watch[0].revents().contains(PollFlags::POLLIN));
        // More than is there: not ready; a zero timeout only looks.
        let got = cli
            .wait_ready(Interest::data(4), &mut [], Some(Duration::ZERO))
            .unwrap();
        assert!(!got.ring && !got.timed_out && got.data == 3, "{got:?}");
    }

    #[test]
    fn times_out_when_nothing_happens() {
        let dir = tempfile::tempdir().unwrap();
        let xen = LocalXen::start(dir.path(), &[0, 1]).unwrap();
        let (_srv, mut cli) = pair(&xen, 93, 4096);
        // Take the connect's wake-ups first.
        while cli
            .wait_ready(Interest::NONE, &mut [], Some(Duration::from_millis(1)))
            .unwrap()
            .event
        {}
        let (r, _w) = std::io::pipe().unwrap();
        let mut watch = [Watch::new(r.as_fd(), PollFlags::POLLIN)];
        let got = cli
            .wait_ready(
                Interest::data(1),
                &mut watch,
                Some(Duration::from_millis(5)),
            )
            .unwrap();
        assert!(got.timed_out && !got.ring && !got.watched && !got.event);
        assert!(!watch[0].fired());
    }

    #[test]
    fn the_peer_closing_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let xen = LocalXen::start(dir.path(), &[0, 1]).unwrap();
        let (srv, mut cli) = pair(&xen, 94, 4096);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(srv);
        });
        let mut closed = false;
        for _ in 0..100 {
            let r = cli
                .wait_ready(Interest::data(1), &mut [], Some(LONG))
                .unwrap();
            assert!(!r.timed_out);
            if cli.state() == State::Closed {
                closed = true;
                break;
            }
        }
        assert!(closed);
        t.join().unwrap();
    }

    #[test]
    fn socket_transport_waits_on_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Transport::Socket {
            dir: dir.path().into(),
            domid: 0,
        };
        let t1 = Transport::Socket {
            dir: dir.path().into(),
            domid: 1,
        };
        let mut srv = Vchan::server(&t0, 1, 95, 4096, 4096).unwrap();
        let mut cli = Vchan::client(&t1, 0, 95, Duration::from_secs(10)).unwrap();
        srv.wait_connected(Some(Duration::from_secs(10))).unwrap();
        let w = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            srv.write_all(b"hi").unwrap();
            srv
        });
        let mut got = 0;
        for _ in 0..100 {
            let r = cli
                .wait_ready(Interest::data(2), &mut [], Some(LONG))
                .unwrap();
            assert!(!r.timed_out);
            if r.ring {
                got = r.data;
                break;
            }
        }
        assert_eq!(got, 2);
        let mut b = [0u8; 2];
        cli.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        drop(w.join().unwrap());
    }
}
