//! A process-wide alarm clock for threads that sleep in a blocking `read`
//! of the event channel device (docs/vchan.md §6.1).
//!
//! libxenvchan sleeps in a blocking `read` of `/dev/xen/evtchn` and
//! re-arms with a `write`: two system calls per sleep, and no way out when
//! the peer dies without an event. A timed sleep with `poll` costs a third
//! call, on every sleep (a bulk transfer through a 64 KiB ring sleeps 16
//! times per MiB on each side, and each call bounces through Xen in a PV
//! guest). This module gives the blocking `read` its timeout instead: the
//! sleeper registers a deadline here (no system call: an uncontended lock
//! and a push) and one thread per process fires an event at the sleeper's
//! own *loopback* channel (a second pair of ports bound on the same fd,
//! see `xen.rs`) when the deadline passes, which ends the `read`. Sleepers
//! that wake for a real event take their entry back before the deadline,
//! so in a stream the thread fires nothing.
//!
//! The thread sleeps until the earliest deadline, or [`LINGER`] when
//! nothing is registered, and parks for good after a few idle rounds.
//! Registering wakes it only when the new deadline is earlier than its
//! next look, which cannot happen for deadlines at least [`LINGER`] away
//! while it runs (hence the caller's rule: only waits of at least
//! [`LINGER`] come here; shorter ones `poll`). A `fork` leaves the child
//! without the thread: the handlers registered with `pthread_atfork` hold
//! the registry's lock across the fork and empty it in the child, whose
//! next registration starts a new thread.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard, Once, PoisonError};
use std::time::Duration;

use crate::Port;

/// What the thread does when a deadline passes: fire the event that ends
/// the sleep of the waiter on `fd` (for the device: notify the loopback
/// port `port` on the waiter's own fd).
pub(crate) type Kick = fn(RawFd, Port);

/// The shortest wait that the alarm serves, and how long the running thread
/// sleeps at most when nothing is registered.
pub(crate) const LINGER: Duration = Duration::from_millis(200);

/// Rounds of [`LINGER`] with nothing registered before the thread parks
/// (the next registration wakes it, one system call).
const IDLE_ROUNDS: u32 = 3;

/// The registry and its thread.
pub(crate) struct Alarm {
    state: Mutex<State>,
    cv: Condvar,
    kick: Kick,
}

struct State {
    entries: Vec<Entry>,
    next_id: u64,
    /// When the thread looks next (coarse clock); `None`: it is parked
    /// without a timeout, or not running.
    target: Option<Duration>,
    running: bool,
    /// Never start the thread (the fork handlers could not be registered).
    disabled: bool,
    /// Kicks fired, for tests and the devtest.
    fired: u64,
}

struct Entry {
    id: u64,
    fd: RawFd,
    port: Port,
    deadline: Duration,
    kicked: bool,
}

/// A registered deadline; dropping it takes the entry back.
pub(crate) struct Armed {
    alarm: &'static Alarm,
    id: u64,
}

impl Alarm {
    pub(crate) const fn new(kick: Kick) -> Self {
        Alarm {
            state: Mutex::new(State {
                entries: Vec::new(),
                next_id: 0,
                target: None,
                running: false,
                disabled: false,
                fired: 0,
            }),
            cv: Condvar::new(),
            kick,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock guards plain data that every holder leaves consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the thread if it is not running; `false` if it cannot be.
    pub(crate) fn start(&'static self) -> bool {
        let mut s = self.lock();
        self.ensure_thread(&mut s)
    }

    fn ensure_thread(&'static self, s: &mut State) -> bool {
        if s.running {
            return true;
        }
        if s.disabled {
            return false;
        }
        let spawned = std::thread::Builder::new()
            .name("evtchn-alarm".into())
            .spawn(move || self.run());
        s.running = spawned.is_ok();
        s.target = None;
        s.running
    }

    /// Registers a deadline `after` from now (on the coarse clock, one tick
    /// added so that it never fires early); the kick goes to `(fd, port)`.
    /// `None` if the thread cannot be started (the caller `poll`s instead).
    ///
    /// The caller keeps `fd` open until the returned [`Armed`] is dropped.
    pub(crate) fn arm(&'static self, fd: RawFd, port: Port, after: Duration) -> Option<Armed> {
        let deadline = xen_base::coarse_now()
            .saturating_add(after)
            .saturating_add(xen_base::coarse_resolution());
        let mut s = self.lock();
        if !self.ensure_thread(&mut s) {
            return None;
        }
        let id = s.next_id;
        s.next_id += 1;
        s.entries.push(Entry {
            id,
            fd,
            port,
            deadline,
            kicked: false,
        });
        if s.target.is_none_or(|t| deadline < t) {
            self.cv.notify_one();
        }
        Some(Armed { alarm: self, id })
    }

    /// Whether a fired entry for `fd` other than `except` is still armed:
    /// its sleeper waits for the fd's reader lock, and the loopback event
    /// the lock's holder just read was that sleeper's kick.
    pub(crate) fn kicked_for_another(&self, fd: RawFd, except: Option<&Armed>) -> bool {
        let s = self.lock();
        s.entries
            .iter()
            .any(|e| e.fd == fd && e.kicked && except.is_none_or(|a| a.id != e.id))
    }

    /// Kicks fired so far.
    pub(crate) fn fired(&self) -> u64 {
        self.lock().fired
    }

    /// Whether the thread is parked without a timeout (or not running).
    #[cfg(test)]
    fn parked(&self) -> bool {
        self.lock().target.is_none()
    }

    fn run(&'static self) {
        let mut s = self.lock();
        let mut idle = 0;
        loop {
            let now = xen_base::coarse_now();
            let mut next: Option<Duration> = None;
            let mut fired = 0;
            for e in s.entries.iter_mut().filter(|e| !e.kicked) {
                if e.deadline <= now {
                    (self.kick)(e.fd, e.port);
                    e.kicked = true;
                    fired += 1;
                } else {
                    next = Some(next.map_or(e.deadline, |n| n.min(e.deadline)));
                }
            }
            s.fired += fired;
            idle = if s.entries.is_empty() { idle + 1 } else { 0 };
            let wait = match next {
                Some(d) => Some(d - now),
                None if idle > IDLE_ROUNDS => None,
                None => Some(LINGER),
            };
            s.target = wait.map(|w| now + w);
            s = match wait {
                Some(w) => {
                    self.cv
                        .wait_timeout(s, w)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self.cv.wait(s).unwrap_or_else(PoisonError::into_inner),
            };
            if !s.running {
                return;
            }
        }
    }
}

impl Armed {
    /// Whether the thread has fired this entry's kick. A sleeper woken by
    /// a loopback port that was not its own kick (the bind's wake-up, or a
    /// kick meant for an earlier sleep that had already left) sleeps on.
    pub(crate) fn kicked(&self) -> bool {
        let s = self.alarm.lock();
        s.entries.iter().any(|e| e.id == self.id && e.kicked)
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let mut s = self.alarm.lock();
        if let Some(i) = s.entries.iter().position(|e| e.id == self.id) {
            s.entries.swap_remove(i);
        }
    }
}

/// The alarm of the device backend. Reach it through [`xen`], which
/// registers the fork handlers first; only a read-only diagnostic
/// ([`kicks_fired`]) may touch it directly.
static XEN: Alarm = Alarm::new(crate::xen::kick_loopback);

/// Kicks the device backend's alarm has fired, without registering the
/// fork handlers (a diagnostic must not change what `fork` does).
pub(crate) fn kicks_fired() -> u64 {
    XEN.fired()
}

/// The alarm of the device backend, with its fork handlers registered.
pub(crate) fn xen() -> &'static Alarm {
    static ATFORK: Once = Once::new();
    ATFORK.call_once(|| {
        // SAFETY: the three handlers are `extern "C" fn()` items that live for the whole process; they only lock, reset and unlock `XEN`'s registry in the forking thread.
        let rc = unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_in_parent),
                Some(after_fork_in_child),
            )
        };
        // Without the handlers a forked child could inherit a registry that
        // a thread it does not have holds or serves: leave the alarm unused.
        if rc != 0 {
            XEN.lock().disabled = true;
        }
    });
    &XEN
}

thread_local! {
    /// The registry's lock, held by the forking thread across `fork`.
    static HELD: RefCell<Option<MutexGuard<'static, State>>> = const { RefCell::new(None) };
}

extern "C" fn before_fork() {
    let g = xen().lock();
    HELD.with(|h| *h.borrow_mut() = Some(g));
}

extern "C" fn after_fork_in_parent() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

extern "C" fn after_fork_in_child() {
    HELD.with(|h| {
        if let Some(mut s) = h.borrow_mut().take() {
            // The parent's sleepers and its thread do not exist here.
            s.entries.clear();
            s.running = false;
            s.target = None;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::time::Instant;

    /// The test kick: one byte into the pipe whose write end is `fd`.
    fn kick_pipe(fd: RawFd, port: Port) {
        // SAFETY: the test keeps the pipe's write end open while the entry is armed; a one-byte write touches nothing else.
        let w = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = nix::unistd::write(w, &[port as u8]);
    }

    fn alarm() -> &'static Alarm {
        Box::leak(Box::new(Alarm::new(kick_pipe)))
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    /// Blocks in a read of `r` (as a sleeper blocks in the device) until
    /// the alarm's kick arrives; returns the byte and the time it took.
    fn sleep_on(r: &OwnedFd) -> (u8, Duration) {
        let t = Instant::now();
        let mut b = [0u8; 1];
        assert_eq!(nix::unistd::read(r, &mut b).unwrap(), 1);
        (b[0], t.elapsed())
    }

    #[test]
    fn a_deadline_ends_a_blocking_read_not_before_it() {
        let a = alarm();
        let (r, w) = pipe();
        let armed = a.arm(w.as_raw_fd(), 7, LINGER).expect("thread");
        assert!(!armed.kicked());
        let (port, took) = sleep_on(&r);
        assert_eq!(port, 7);
        assert!(took >= LINGER, "kicked after {took:?}");
        assert_eq!(a.fired(), 1);
        assert!(armed.kicked());
        drop(armed);
    }

    #[test]
    fn a_taken_back_entry_is_never_kicked() {
        let a = alarm();
        let (r, w) = pipe();
        drop(a.arm(w.as_raw_fd(), 1, LINGER).expect("thread"));
        // A later, longer deadline is the only one that fires.
        let _armed = a.arm(w.as_raw_fd(), 2, 2 * LINGER).expect("thread");
        assert_eq!(sleep_on(&r).0, 2);
        assert_eq!(a.fired(), 1);
    }

    #[test]
    fn an_earlier_deadline_wakes_the_thread_sleeping_for_a_later_one() {
        let a = alarm();
        let (r, w) = pipe();
        let _late = a
            .arm(w.as_raw_fd(), 1, Duration::from_secs(30))
            .expect("thread");
        std::thread::sleep(Duration::from_millis(20)); // the thread sleeps for the 30 s one
        let _soon = a.arm(w.as_raw_fd(), 2, LINGER).expect("thread");
        let (port, took) = sleep_on(&r);
        assert_eq!(port, 2);
        assert!(
            took < Duration::from_secs(20),
            "the earlier deadline waited {took:?}"
        );
    }

    #[test]
    fn the_idle_thread_parks_and_a_registration_wakes_it() {
        let a = alarm();
        let (r, w) = pipe();
        assert!(a.start());
        // Nothing registered: after its idle rounds the thread parks.
        let mut waited = Duration::ZERO;
        while !a.parked() {
            assert!(waited < Duration::from_secs(30), "never parked");
            std::thread::sleep(LINGER);
            waited += LINGER;
        }
        let _armed = a.arm(w.as_raw_fd(), 3, LINGER).expect("thread");
        assert_eq!(sleep_on(&r).0, 3);
    }

    #[test]
    fn a_kick_for_another_sleeper_on_the_same_fd_is_told_apart() {
        let a = alarm();
        let (r, w) = pipe();
        let mine = a
            .arm(w.as_raw_fd(), 1, Duration::from_secs(30))
            .expect("thread");
        let theirs = a.arm(w.as_raw_fd(), 2, LINGER).expect("thread");
        assert!(!a.kicked_for_another(w.as_raw_fd(), Some(&mine)));
        assert_eq!(sleep_on(&r).0, 2);
        // The holder of the fd (`mine`) read the other sleeper's kick.
        assert!(a.kicked_for_another(w.as_raw_fd(), Some(&mine)));
        assert!(a.kicked_for_another(w.as_raw_fd(), None));
        assert!(!a.kicked_for_another(w.as_raw_fd(), Some(&theirs)));
        assert!(!a.kicked_for_another(r.as_raw_fd(), None), "another fd");
        drop(theirs);
        assert!(!a.kicked_for_another(w.as_raw_fd(), Some(&mine)));
    }

    #[test]
    fn every_sleeper_gets_its_own_kick() {
        let a = alarm();
        let pipes: Vec<_> = (0..4).map(|_| pipe()).collect();
        let armed: Vec<_> = pipes
            .iter()
            .enumerate()
            .map(|(i, (_, w))| a.arm(w.as_raw_fd(), i as Port, LINGER).expect("thread"))
            .collect();
        for (i, (r, _)) in pipes.iter().enumerate() {
            assert_eq!(sleep_on(r).0, i as u8);
        }
        assert_eq!(a.fired(), 4);
        drop(armed);
    }

    /// The device's alarm in a forked child: the thread is gone there, and
    /// the first registration must start a new one (a waiter in a child of
    /// qrexec-agent would otherwise never time out).
    #[test]
    fn a_forked_child_gets_its_own_thread() {
        let x = xen();
        assert!(x.start());
        // SAFETY: the child only uses the alarm (its fork handlers reset it), a pipe and `_exit`; it never returns into the test harness.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = {
                    let s = x.lock();
                    !s.running && s.entries.is_empty()
                };
                // The real kick would notify a device port; the child checks
                // that the registry was reset and that a new thread starts.
                let started = x.start();
                let code = if ok && started { 0 } else { 1 };
                // SAFETY: `_exit` ends the child at once, without running the parent's atexit handlers or destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
