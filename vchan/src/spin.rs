//! The adaptive busy-wait a blocking vchan call does before it requests an
//! event and sleeps: [`SpinPolicy`].
//!
//! A notification is expensive (on Xen a hypercall and an interrupt, on the
//! Local transport two socket hops through the hub) and so is the sleep and
//! wake-up around it; a peer that is running on another core usually frees
//! space or produces data within a few microseconds. Spinning that long
//! avoids both the request and the event; spinning longer would burn a core
//! for a peer that is not coming.
//!
//! The policy is its own type so that every waiter (the
//! [`Endpoint`](crate::endpoint::Endpoint)'s blocking calls, its
//! `spin_for_*` calls, an event loop) spins the same way, and so that its
//! decisions can be tested with an injected clock ([`SpinClock`]) and an
//! injected CPU count ([`SpinPolicy::for_cpus`]) instead of wall-clock time.
//!
//! ```
//! use std::time::Duration;
//! use vchan::spin::SpinPolicy;
//!
//! let mut spin = SpinPolicy::for_cpus(4);
//! assert_eq!(spin.max(), vchan::spin::DEFAULT_SPIN);
//! let mut looks = 0;
//! // The condition is usually a load of the peer's index.
//! let ok: Result<bool, ()> = spin.spin_until(|| {
//!     looks += 1;
//!     Ok(looks == 3)
//! });
//! assert_eq!(ok, Ok(true));
//! // On one CPU the peer cannot run while we spin: no spin at all.
//! assert_eq!(SpinPolicy::for_cpus(1).max(), Duration::ZERO);
//! ```

use std::fmt;
use std::time::{Duration, Instant};

/// Default bound of the busy-wait a blocking call does before it asks the
/// peer for an event and sleeps (see [`SpinPolicy`]).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// Peer-index checks between two looks at the clock while spinning.
const SPIN_BATCH: u32 = 8;

/// The least an adaptive spin shrinks to.
pub const SPIN_FLOOR: Duration = Duration::from_micros(2);

/// Every this many spins below the full bound, one spins the full bound.
pub const SPIN_PROBE_EVERY: u32 = 8;

/// After this long a spin yields the CPU between looks.
pub const SPIN_YIELD_AFTER: Duration = Duration::from_micros(1);

/// What a spin needs from the outside world: the time, and a way to give
/// the CPU away. [`SystemClock`] is the real one; tests inject their own.
///
/// ```
/// use std::time::Instant;
/// use vchan::spin::{SpinClock, SystemClock};
///
/// let before = Instant::now();
/// assert!(SystemClock.now() >= before);
/// SystemClock.yield_now(); // sched_yield
/// ```
pub trait SpinClock: fmt::Debug {
    /// The current time (monotonic).
    fn now(&self) -> Instant;
    /// Lets another thread on this CPU run (`sched_yield`); returns at once
    /// when nothing else is runnable.
    fn yield_now(&self) {
        std::thread::yield_now();
    }
}

/// The real clock: [`Instant::now`] and [`std::thread::yield_now`].
///
/// ```
/// use vchan::spin::{SpinPolicy, SystemClock};
/// let spin = SpinPolicy::with_clock(std::time::Duration::from_micros(10), SystemClock);
/// assert_eq!(spin.current(), spin.max());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SpinClock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The adaptive busy-wait bound and its state.
///
/// [`SpinPolicy::spin_until`] re-evaluates a condition (no notification
/// requested) for at most the bound now in force. The bound adapts: each
/// fruitless spin after the first in a row halves it (down to
/// [`SPIN_FLOOR`], 2 µs), a spin that succeeds restores it, and every
/// [`SPIN_PROBE_EVERY`]th spin below the full bound spins the full bound. A
/// peer that shares our core (or is descheduled) cannot make progress
/// while we spin, so spin after fruitless spin would only delay it; a peer
/// running beside us answers within the bound and keeps it, and one that
/// was preempted once does not cost it. The full-bound probes end the state
/// in which both ends sleep, each spinning less than the other's wake-up
/// takes.
///
/// After the first microsecond ([`SPIN_YIELD_AFTER`]) the spin yields the
/// CPU (`sched_yield`) between looks: a peer that shares our core then runs
/// at once, which costs a context switch instead of a fruitless spin, a
/// notification and two wake-ups; with nothing else runnable on our core
/// the yield returns at once.
///
/// On a machine with one CPU the default bound is zero
/// ([`SpinPolicy::for_this_machine`]): the peer (another process, or
/// another domain on the same CPU) cannot make progress while we spin, so
/// a spin only delays it (seen in the Xen lab on one vCPU: ours at
/// 0.4–0.7× C libxenvchan).
///
/// ```
/// use std::time::Duration;
/// use vchan::spin::SpinPolicy;
///
/// let mut spin = SpinPolicy::new(Duration::from_micros(20));
/// // Nothing comes: the spin gives up after its bound.
/// assert_eq!(spin.spin_until(|| Ok::<_, ()>(false)), Ok(false));
/// assert_eq!(spin.spin_until(|| Ok::<_, ()>(false)), Ok(false));
/// // Two fruitless spins in a row: the bound is halved.
/// assert_eq!(spin.current(), Duration::from_micros(10));
/// // A spin that succeeds restores it.
/// assert_eq!(spin.spin_until(|| Ok::<_, ()>(true)), Ok(true));
/// assert_eq!(spin.current(), Duration::from_micros(20));
/// ```
#[derive(Debug, Clone)]
pub struct SpinPolicy<C: SpinClock = SystemClock> {
    /// The full bound (zero: never spin).
    max: Duration,
    /// The adaptive bound now in force (`SPIN_FLOOR..=max`).
    now: Duration,
    /// Fruitless spins in a row.
    misses: u32,
    /// Spins below the full bound since the last full one.
    short: u32,
    clock: C,
}

impl SpinPolicy {
    /// A policy with the full bound `max` (zero: never spin) and the real
    /// clock.
    ///
    /// ```
    /// use std::time::Duration;
    /// let spin = vchan::spin::SpinPolicy::new(Duration::from_micros(5));
    /// assert_eq!(spin.max(), Duration::from_micros(5));
    /// ```
    pub fn new(max: Duration) -> Self {
        Self::with_clock(max, SystemClock)
    }

    /// The default policy for a machine with `cpus` CPUs: [`DEFAULT_SPIN`],
    /// or no spin at all on one CPU.
    ///
    /// ```
    /// use std::time::Duration;
    /// use vchan::spin::{SpinPolicy, DEFAULT_SPIN};
    /// assert_eq!(SpinPolicy::for_cpus(1).max(), Duration::ZERO);
    /// assert_eq!(SpinPolicy::for_cpus(2).max(), DEFAULT_SPIN);
    /// ```
    pub fn for_cpus(cpus: usize) -> Self {
        Self::new(default_spin_for(cpus))
    }

    /// The default policy for this machine ([`SpinPolicy::for_cpus`] of
    /// [`std::thread::available_parallelism`], asked once per process; an
    /// unknown count counts as several CPUs).
    ///
    /// ```
    /// let spin = vchan::spin::SpinPolicy::for_this_machine();
    /// assert!(spin.max() <= vchan::spin::DEFAULT_SPIN);
    /// ```
    pub fn for_this_machine() -> Self {
        static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cpus = *CPUS.get_or_init(|| {
            std::thread::available_parallelism().map_or(usize::MAX, std::num::NonZero::get)
        });
        Self::for_cpus(cpus)
    }
}

impl Default for SpinPolicy {
    /// [`SpinPolicy::for_this_machine`].
    fn default() -> Self {
        Self::for_this_machine()
    }
}

/// [`DEFAULT_SPIN`], or zero on one CPU.
fn default_spin_for(cpus: usize) -> Duration {
    if cpus == 1 {
        Duration::ZERO
    } else {
        DEFAULT_SPIN
    }
}

impl<C: SpinClock> SpinPolicy<C> {
    /// A policy with the full bound `max` and the given clock.
    ///
    /// ```
    /// use std::time::Duration;
    /// use vchan::spin::{SpinPolicy, SystemClock};
    /// let spin = SpinPolicy::with_clock(Duration::ZERO, SystemClock);
    /// assert_eq!(spin.current(), Duration::ZERO);
    /// ```
    pub fn with_clock(max: Duration, clock: C) -> Self {
        Self {
            max,
            now: max,
            misses: 0,
            short: 0,
            clock,
        }
    }

    /// The full bound.
    ///
    /// ```
    /// use std::time::Duration;
    /// let spin = vchan::spin::SpinPolicy::new(Duration::from_micros(7));
    /// assert_eq!(spin.max(), Duration::from_micros(7));
    /// ```
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Sets the full bound (zero: never spin) and restores the adaptive
    /// bound to it.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut spin = vchan::spin::SpinPolicy::new(Duration::from_micros(50));
    /// spin.set_max(Duration::ZERO);
    /// assert_eq!(spin.spin_until(|| Ok::<_, ()>(true)), Ok(false)); // not even one look
    /// ```
    pub fn set_max(&mut self, max: Duration) {
        self.max = max;
        self.now = max;
    }

    /// The adaptive bound now in force (at most [`SpinPolicy::max`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// let spin = vchan::spin::SpinPolicy::new(Duration::from_micros(50));
    /// assert_eq!(spin.current(), Duration::from_micros(50));
    /// ```
    pub fn current(&self) -> Duration {
        self.now
    }

    /// The clock.
    ///
    /// ```
    /// use vchan::spin::{SpinPolicy, SystemClock};
    /// let spin = SpinPolicy::new(std::time::Duration::ZERO);
    /// let _: &SystemClock = spin.clock();
    /// ```
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Re-evaluates `done` until it returns `Ok(true)` (then `Ok(true)`) or
    /// the adaptive bound has passed (then `Ok(false)`), and adapts the
    /// bound (see [`SpinPolicy`]). With a zero bound it returns `Ok(false)`
    /// at once without calling `done`: the caller has looked once before
    /// deciding to spin. An error from `done` ends the spin and is
    /// returned.
    ///
    /// `done` must not block: it is a load of the peer's index and a
    /// comparison. The clock is read once per [`SPIN_BATCH`] (8) calls of
    /// `done`. Under the `loom` model `done` is called once.
    ///
    /// # Errors
    /// What `done` returns.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut spin = vchan::spin::SpinPolicy::new(Duration::from_micros(50));
    /// let r: Result<bool, &str> = spin.spin_until(|| Err("corrupt"));
    /// assert_eq!(r, Err("corrupt"));
    /// ```
    pub fn spin_until<Err>(
        &mut self,
        mut done: impl FnMut() -> Result<bool, Err>,
    ) -> Result<bool, Err> {
        let mut budget = self.now;
        if budget.is_zero() {
            return Ok(false);
        }
        if budget < self.max {
            self.short += 1;
            if self.short >= SPIN_PROBE_EVERY {
                self.short = 0;
                budget = self.max;
            }
        }
        let start = self.clock.now();
        loop {
            for _ in 0..SPIN_BATCH {
                if done()? {
                    self.now = self.max;
                    self.misses = 0;
                    self.short = 0;
                    return Ok(true);
                }
                if cfg!(loom) {
                    return Ok(false);
                }
                std::hint::spin_loop();
            }
            let spent = self.clock.now().saturating_duration_since(start);
            if spent >= SPIN_YIELD_AFTER && spent < budget {
                self.clock.yield_now();
            }
            if spent >= budget {
                self.misses = self.misses.saturating_add(1);
                if self.misses >= 2 {
                    self.now = (self.now / 2).max(SPIN_FLOOR.min(self.max));
                }
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A clock that advances by `step` at every look and counts yields.
    #[derive(Debug)]
    struct StepClock {
        t: Cell<Instant>,
        step: Duration,
        looks: Cell<u32>,
        yields: Cell<u32>,
    }

    impl StepClock {
        fn new(step: Duration) -> Self {
            Self {
                t: Cell::new(Instant::now()),
                step,
                looks: Cell::new(0),
                yields: Cell::new(0),
            }
        }
    }

    impl SpinClock for StepClock {
        fn now(&self) -> Instant {
            let t = self.t.get();
            self.t.set(t + self.step);
            self.looks.set(self.looks.get() + 1);
            t
        }
        fn yield_now(&self) {
            self.yields.set(self.yields.get() + 1);
        }
    }

    fn policy(max_us: u64, step_us: u64) -> SpinPolicy<StepClock> {
        SpinPolicy::with_clock(
            Duration::from_micros(max_us),
            StepClock::new(Duration::from_micros(step_us)),
        )
    }

    /// Spins once on a condition that never holds; returns how often it
    /// was evaluated.
    fn fruitless(p: &mut SpinPolicy<StepClock>) -> u32 {
        let mut calls = 0;
        assert_eq!(
            p.spin_until(|| {
                calls += 1;
                Ok::<_, ()>(false)
            }),
            Ok(false)
        );
        calls
    }

    #[test]
    fn one_cpu_never_spins_and_never_looks() {
        let mut p = SpinPolicy::for_cpus(1);
        assert_eq!(p.max(), Duration::ZERO);
        let mut calls = 0;
        let r = p.spin_until(|| {
            calls += 1;
            Ok::<_, ()>(true)
        });
        assert_eq!((r, calls), (Ok(false), 0));
        // Injected clock: not even read.
        let mut p =
            SpinPolicy::with_clock(Duration::ZERO, StepClock::new(Duration::from_micros(1)));
        assert_eq!(fruitless(&mut p), 0);
        assert_eq!(p.clock().looks.get(), 0);
    }

    #[test]
    fn several_cpus_spin_the_default() {
        for cpus in [2, 4, 64, usize::MAX] {
            assert_eq!(SpinPolicy::for_cpus(cpus).max(), DEFAULT_SPIN, "{cpus}");
        }
        // An unknown CPU count (0 is never reported) still spins.
        assert_eq!(SpinPolicy::for_cpus(0).max(), DEFAULT_SPIN);
    }

    #[test]
    fn fruitless_spin_lasts_its_bound_in_batches() {
        // 10 µs bound, the clock advances 1 µs per look: one look at the
        // start, then one per batch of 8 conditions, until 10 µs have passed.
        let mut p = policy(10, 1);
        let calls = fruitless(&mut p);
        assert_eq!(calls, 10 * SPIN_BATCH);
        assert_eq!(p.clock().looks.get(), 11);
        // Yields from the first microsecond on, not once the bound is spent.
        assert_eq!(p.clock().yields.get(), 9);
        // One miss alone does not shrink the bound.
        assert_eq!(p.current(), Duration::from_micros(10));
    }

    #[test]
    fn no_yield_before_the_first_microsecond() {
        // The clock advances 100 ns per look: the first batches are under 1 µs.
        let mut p = SpinPolicy::with_clock(
            Duration::from_micros(2),
            StepClock::new(Duration::from_nanos(100)),
        );
        fruitless(&mut p);
        // Looks at 0.1 .. 2.0 µs after the start: yields at 1.0 ..= 1.9 µs.
        assert_eq!(p.clock().yields.get(), 10);
    }

    #[test]
    fn success_returns_at_once_and_restores() {
        let mut p = policy(16, 1);
        fruitless(&mut p);
        fruitless(&mut p);
        assert_eq!(p.current(), Duration::from_micros(8));
        let mut calls = 0;
        let r = p.spin_until(|| {
            calls += 1;
            Ok::<_, ()>(calls == 3)
        });
        assert_eq!((r, calls), (Ok(true), 3));
        assert_eq!(p.current(), Duration::from_micros(16));
        // The miss count restarted: one more miss does not shrink.
        fruitless(&mut p);
        assert_eq!(p.current(), Duration::from_micros(16));
    }

    #[test]
    fn misses_in_a_row_halve_down_to_the_floor() {
        let mut p = policy(64, 1);
        let mut bounds = Vec::new();
        for _ in 0..8 {
            fruitless(&mut p);
            bounds.push(p.current().as_micros());
        }
        assert_eq!(bounds, [64, 32, 16, 8, 4, 2, 2, 2]);
    }

    #[test]
    fn floor_never_exceeds_the_bound() {
        let mut p = SpinPolicy::with_clock(
            Duration::from_nanos(1500),
            StepClock::new(Duration::from_micros(1)),
        );
        for _ in 0..4 {
            fruitless(&mut p);
        }
        assert_eq!(p.current(), Duration::from_nanos(1500));
    }

    #[test]
    fn every_eighth_short_spin_probes_the_full_bound() {
        let mut p = policy(64, 1);
        for _ in 0..20 {
            fruitless(&mut p);
        }
        assert_eq!(p.current(), SPIN_FLOOR);
        // From here each spin is short (2 µs: 16 conditions) except every
        // 8th, which spins the full 64 µs (512 conditions).
        let calls: Vec<u32> = (0..16).map(|_| fruitless(&mut p)).collect();
        let full: Vec<usize> = (0..16).filter(|&i| calls[i] == 64 * SPIN_BATCH).collect();
        assert_eq!(full.len(), 2, "{calls:?}");
        assert_eq!(full[1] - full[0], SPIN_PROBE_EVERY as usize, "{calls:?}");
        assert!(
            calls
                .iter()
                .all(|&c| c == 64 * SPIN_BATCH || c == 2 * SPIN_BATCH),
            "{calls:?}"
        );
    }

    #[test]
    fn set_max_restores() {
        let mut p = policy(64, 1);
        for _ in 0..4 {
            fruitless(&mut p);
        }
        assert!(p.current() < p.max());
        p.set_max(Duration::from_micros(30));
        assert_eq!(
            (p.max(), p.current()),
            (Duration::from_micros(30), Duration::from_micros(30))
        );
    }

    #[test]
    fn error_ends_the_spin() {
        let mut p = policy(64, 1);
        let mut calls = 0;
        let r = p.spin_until(|| {
            calls += 1;
            if calls == 5 {
                Err("corrupt")
            } else {
                Ok(false)
            }
        });
        assert_eq!((r, calls), (Err("corrupt"), 5));
    }
}
