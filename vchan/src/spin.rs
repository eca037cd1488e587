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
//! The spin counts its looks instead of watching the clock: in a Xen PV
//! guest without a stable TSC, `clock_gettime` is a system call (the lab
//! counted 17–29 per MiB when the spin read the clock every 8 looks). A
//! *timed* spin, the first of a policy and one in every
//! [`SPIN_RECALIBRATE_EVERY`], reads the clock after every batch of looks
//! as before and learns what a batch costs, with and without a yield; the
//! spins in between run the number of batches that fits in their bound and
//! look at the clock only once every [`SPIN_GUARD_YIELDS`] yields (a guard
//! against yields that suddenly take far longer).
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

/// Peer-index checks between two looks at the clock while spinning (and
/// the unit a counted spin counts in).
const SPIN_BATCH: u32 = 8;

/// One spin in this many is a timed one that measures again what a batch
/// of looks costs (see [`SpinPolicy`]); the others count batches.
pub const SPIN_RECALIBRATE_EVERY: u32 = 256;

/// A counted spin reads the clock once every this many yields, and stops
/// when the bound has passed although its count is not spent (the yields
/// got dearer than measured: the next spin measures again).
pub const SPIN_GUARD_YIELDS: u32 = 16;

/// Timed spins that may end (succeed) before they have measured both kinds
/// of batch; after that many the measurement is completed with
/// [`SPIN_YIELD_AFTER`] per batch for what is missing.
const SPIN_CALIBRATION_TRIES: u32 = 4;

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
    ///
    /// ```
    /// use vchan::spin::{SpinClock, SystemClock};
    /// let a = SystemClock.now();
    /// assert!(SystemClock.now() >= a);
    /// ```
    fn now(&self) -> Instant;
    /// Lets another thread on this CPU run (`sched_yield`); returns at once
    /// when nothing else is runnable.
    ///
    /// ```
    /// use vchan::spin::{SpinClock, SystemClock};
    /// SystemClock.yield_now(); // returns at once when nothing else wants the CPU
    /// ```
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
/// How long a spin lasts is measured by counting, not by the clock (see
/// the [module docs](self)): a timed spin learns the cost of a batch of
/// looks without a yield and with one, and the counted spins after it run
/// as many batches as fit in their bound (the same number a timed spin
/// would run at that cost). A success or a peer's error ends either kind
/// at once; the adaptation above is the same for both.
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
    /// What the last calibration measured (`None`: the next spin is timed).
    cal: Option<Calibration>,
    /// Counted spins since the last calibration.
    counted: u32,
    /// What timed spins have measured towards the next calibration.
    acc: Measured,
    clock: C,
}

/// What a batch of [`SPIN_BATCH`] looks costs, as a timed spin measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Calibration {
    /// A batch without a yield before it (at least 1 ns).
    batch: Duration,
    /// A batch with a yield before it (at least 1 ns).
    yielded: Duration,
}

impl Calibration {
    /// How many batches a spin of `budget` runs before its first yield,
    /// and how many yield-and-batch rounds after them: what a timed spin
    /// would do if every batch cost what was measured (it looks at the
    /// clock after each batch, yields once `SPIN_YIELD_AFTER` has passed,
    /// and stops once `budget` has).
    fn plan(&self, budget: Duration) -> (u64, u64) {
        let (b, y) = (self.batch.as_nanos(), self.yielded.as_nanos());
        let budget = budget.as_nanos();
        let fast = budget.min(SPIN_YIELD_AFTER.as_nanos()).div_ceil(b).max(1);
        let after_fast = fast * b;
        let slow = budget.saturating_sub(after_fast).div_ceil(y);
        let clamp = |n: u128| u64::try_from(n).unwrap_or(u64::MAX);
        (clamp(fast), clamp(slow))
    }

    /// The time `fast` batches and `slow` rounds are expected to take.
    fn expected(&self, fast: u64, slow: u64) -> Duration {
        self.batch
            .saturating_mul(u32::try_from(fast).unwrap_or(u32::MAX))
            .saturating_add(
                self.yielded
                    .saturating_mul(u32::try_from(slow).unwrap_or(u32::MAX)),
            )
    }
}

/// Batches timed so far, apart by whether a yield came before them.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    fast: Duration,
    fast_n: u32,
    slow: Duration,
    slow_n: u32,
    /// Timed spins that contributed.
    tries: u32,
}

impl Measured {
    /// The calibration, once both kinds of batch have been timed (or after
    /// [`SPIN_CALIBRATION_TRIES`] spins: what is missing counts
    /// [`SPIN_YIELD_AFTER`] a batch, so a spin that cannot measure its
    /// batches yields early and ends early rather than late).
    fn calibration(&self) -> Option<Calibration> {
        let complete = self.fast_n > 0 && self.slow_n > 0;
        if !complete && self.tries < SPIN_CALIBRATION_TRIES {
            return None;
        }
        let mean = |t: Duration, n: u32| {
            if n == 0 {
                SPIN_YIELD_AFTER
            } else {
                (t / n).max(Duration::from_nanos(1))
            }
        };
        Some(Calibration {
            batch: mean(self.fast, self.fast_n),
            yielded: mean(self.slow, self.slow_n),
        })
    }
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
            cal: None,
            counted: 0,
            acc: Measured::default(),
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
    /// comparison. A timed spin reads the clock once per 8 calls of `done`;
    /// a counted one (most of them) once per [`SPIN_GUARD_YIELDS`] yields,
    /// so a spin that succeeds within its first microsecond or so reads it
    /// not at all. Under the `loom` model `done` is called once.
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
        if cfg!(loom) {
            return done();
        }
        if budget < self.max {
            self.short += 1;
            if self.short >= SPIN_PROBE_EVERY {
                self.short = 0;
                budget = self.max;
            }
        }
        let found = match self.cal {
            Some(cal) if self.counted < SPIN_RECALIBRATE_EVERY => {
                self.counted += 1;
                self.counted_spin(cal, budget, &mut done)?
            }
            _ => self.timed_spin(budget, &mut done)?,
        };
        if found {
            self.now = self.max;
            self.misses = 0;
            self.short = 0;
        } else {
            self.misses = self.misses.saturating_add(1);
            if self.misses >= 2 {
                self.now = (self.now / 2).max(SPIN_FLOOR.min(self.max));
            }
        }
        Ok(found)
    }

    /// A spin that reads the clock after every batch and learns from it
    /// what a batch costs.
    fn timed_spin<Err>(
        &mut self,
        budget: Duration,
        done: &mut impl FnMut() -> Result<bool, Err>,
    ) -> Result<bool, Err> {
        let start = self.clock.now();
        let mut m = Measured::default();
        let mut last = Duration::ZERO;
        let mut yielded = false;
        let found = loop {
            if batch(done)? {
                break true;
            }
            let spent = self.clock.now().saturating_duration_since(start);
            let took = spent.saturating_sub(last);
            last = spent;
            if yielded {
                m.slow += took;
                m.slow_n += 1;
            } else {
                m.fast += took;
                m.fast_n += 1;
            }
            if spent >= budget {
                break false;
            }
            yielded = spent >= SPIN_YIELD_AFTER;
            if yielded {
                self.clock.yield_now();
            }
        };
        self.acc.fast += m.fast;
        self.acc.fast_n += m.fast_n;
        self.acc.slow += m.slow;
        self.acc.slow_n += m.slow_n;
        self.acc.tries += 1;
        if let Some(cal) = self.acc.calibration() {
            self.cal = Some(cal);
            self.acc = Measured::default();
            self.counted = 0;
        }
        Ok(found)
    }

    /// A spin that runs the batches `cal` says fit in `budget`, looking at
    /// the clock only every [`SPIN_GUARD_YIELDS`] yields.
    fn counted_spin<Err>(
        &mut self,
        cal: Calibration,
        budget: Duration,
        done: &mut impl FnMut() -> Result<bool, Err>,
    ) -> Result<bool, Err> {
        let (fast, slow) = cal.plan(budget);
        for _ in 0..fast {
            if batch(done)? {
                return Ok(true);
            }
        }
        // The guard: the first look at the clock is the reference, the
        // time before it is taken to be what was measured.
        let mut reference: Option<(Instant, u64)> = None;
        for round in 1..=slow {
            self.clock.yield_now();
            if batch(done)? {
                return Ok(true);
            }
            if round % u64::from(SPIN_GUARD_YIELDS) != 0 || round == slow {
                continue;
            }
            let now = self.clock.now();
            match reference {
                None => reference = Some((now, round)),
                Some((then, at)) => {
                    let spent = cal
                        .expected(fast, at)
                        .saturating_add(now.saturating_duration_since(then));
                    if spent >= budget {
                        // Dearer than measured: measure again next time.
                        self.cal = None;
                        return Ok(false);
                    }
                }
            }
        }
        Ok(false)
    }
}

/// One batch: [`SPIN_BATCH`] looks with a spin-loop hint after each
/// fruitless one.
#[inline(always)]
fn batch<Err>(done: &mut impl FnMut() -> Result<bool, Err>) -> Result<bool, Err> {
    for _ in 0..SPIN_BATCH {
        if done()? {
            return Ok(true);
        }
        std::hint::spin_loop();
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A clock that advances by `step` at every look and by `yield_cost`
    /// at every yield, and counts both.
    #[derive(Debug)]
    struct StepClock {
        t: Cell<Instant>,
        step: Cell<Duration>,
        yield_cost: Cell<Duration>,
        looks: Cell<u32>,
        yields: Cell<u32>,
    }

    impl StepClock {
        fn new(step: Duration) -> Self {
            Self {
                t: Cell::new(Instant::now()),
                step: Cell::new(step),
                yield_cost: Cell::new(Duration::ZERO),
                looks: Cell::new(0),
                yields: Cell::new(0),
            }
        }
    }

    impl SpinClock for StepClock {
        fn now(&self) -> Instant {
            let t = self.t.get();
            self.t.set(t + self.step.get());
            self.looks.set(self.looks.get() + 1);
            t
        }
        fn yield_now(&self) {
            self.t.set(self.t.get() + self.yield_cost.get());
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

    /// Looks and yields of one fruitless spin.
    fn costs(p: &mut SpinPolicy<StepClock>) -> (u32, u32, u32) {
        let (l, y) = (p.clock().looks.get(), p.clock().yields.get());
        let calls = fruitless(p);
        (calls, p.clock().looks.get() - l, p.clock().yields.get() - y)
    }

    #[test]
    fn counted_spins_read_no_clock() {
        let mut p = policy(10, 1);
        // The first spin is timed: 11 looks at the clock.
        assert_eq!(costs(&mut p), (10 * SPIN_BATCH, 11, 9));
        // Then the same spin, counted: the same looks at the condition and
        // the same yields, no look at the clock.
        for _ in 0..5 {
            p.set_max(Duration::from_micros(10)); // undo the halving
            assert_eq!(costs(&mut p), (10 * SPIN_BATCH, 0, 9));
        }
        // A success within the counted spin: no clock either.
        let looks = p.clock().looks.get();
        let mut calls = 0;
        let r = p.spin_until(|| {
            calls += 1;
            Ok::<_, ()>(calls == 20)
        });
        assert_eq!((r, calls, p.clock().looks.get()), (Ok(true), 20, looks));
    }

    #[test]
    fn counted_spins_match_timed_ones_at_the_measured_cost() {
        // (clock step per batch, extra cost of a yield, bound), all in ns.
        for (step, yc, bound) in [
            (100, 0, 10_000),
            (100, 900, 10_000),
            (250, 4_750, 50_000),
            (1_000, 0, 2_000),
            (3_000, 2_000, 50_000),
            (400, 100, 700),
        ] {
            let clock = StepClock::new(Duration::from_nanos(step));
            clock.yield_cost.set(Duration::from_nanos(yc));
            let mut p = SpinPolicy::with_clock(Duration::from_nanos(bound), clock);
            let timed = costs(&mut p);
            // A bound under 1 µs never yields, so it measures only one kind
            // of batch: it times SPIN_CALIBRATION_TRIES spins.
            while p.cal.is_none() {
                p.set_max(Duration::from_nanos(bound));
                assert_eq!(costs(&mut p), timed, "{step} {yc} {bound}");
            }
            p.set_max(Duration::from_nanos(bound));
            let counted = costs(&mut p);
            assert_eq!(counted.0, timed.0, "calls: {step} {yc} {bound}");
            assert_eq!(counted.2, timed.2, "yields: {step} {yc} {bound}");
            assert!(counted.1 < timed.1.max(2), "looks: {step} {yc} {bound}");
        }
    }

    #[test]
    fn one_spin_in_every_recalibrate_every_is_timed() {
        let mut p = policy(4, 1);
        assert_eq!(costs(&mut p).1, 5);
        let mut timed = Vec::new();
        for i in 0..3 * SPIN_RECALIBRATE_EVERY {
            p.set_max(Duration::from_micros(4));
            if costs(&mut p).1 > 0 {
                timed.push(i);
            }
        }
        let n = SPIN_RECALIBRATE_EVERY;
        assert_eq!(timed, [n, 2 * n + 1], "{timed:?}");
    }

    #[test]
    fn guard_stops_a_spin_whose_yields_got_dear() {
        let mut p = policy(64, 1);
        assert_eq!(costs(&mut p), (64 * SPIN_BATCH, 65, 63));
        p.set_max(Duration::from_micros(64));
        // Yields now take 10 µs each: the count (63 rounds) would last
        // 630 µs. The guard reads the clock at yield 16 (the reference) and
        // at yield 32, sees 16 × 10 µs on top of the 17 µs expected before
        // the reference, and stops.
        p.clock().yield_cost.set(Duration::from_micros(10));
        assert_eq!(costs(&mut p), ((1 + 32) * SPIN_BATCH, 2, 32));
        // The next spin measures again.
        p.set_max(Duration::from_micros(64));
        let (_, looks, _) = costs(&mut p);
        assert!(looks > 2, "{looks}");
        // And the one after counts with the new cost: 1 batch, then yields
        // of 11 µs each (10 µs + one 1 µs look) until 64 µs: 6 rounds.
        p.set_max(Duration::from_micros(64));
        assert_eq!(costs(&mut p), (7 * SPIN_BATCH, 0, 6));
    }

    #[test]
    fn quick_successes_still_end_calibration() {
        let mut p = policy(50, 1);
        for _ in 0..SPIN_CALIBRATION_TRIES {
            assert_eq!(p.spin_until(|| Ok::<_, ()>(true)), Ok(true));
        }
        // Each of those read the clock once (its start) and measured
        // nothing; after SPIN_CALIBRATION_TRIES of them the policy counts
        // with 1 µs per batch rather than time every spin for ever.
        let looks = p.clock().looks.get();
        assert_eq!(looks, SPIN_CALIBRATION_TRIES);
        assert_eq!(p.spin_until(|| Ok::<_, ()>(true)), Ok(true));
        assert_eq!(p.clock().looks.get(), looks);
        // 50 batches: 1 before the first yield, 49 rounds; the guard looks
        // at rounds 16, 32 and 48.
        assert_eq!(costs(&mut p), (50 * SPIN_BATCH, 3, 49));
    }

    #[test]
    fn plan_edges() {
        let cal = |b: u64, y: u64| Calibration {
            batch: Duration::from_nanos(b),
            yielded: Duration::from_nanos(y),
        };
        let us = Duration::from_micros;
        // Bound under a microsecond: no yields.
        assert_eq!(cal(100, 100).plan(Duration::from_nanos(450)), (5, 0));
        // The first batch alone is over the bound.
        assert_eq!(cal(5_000, 1).plan(us(2)), (1, 0));
        // 1 µs of batches, then rounds.
        assert_eq!(cal(300, 1_000).plan(us(10)), (4, 9));
        // A huge bound with tiny costs saturates instead of overflowing.
        let (f, s) = cal(1, 1).plan(Duration::MAX);
        assert_eq!(f, 1000);
        assert!(s > 1 << 60);
    }
}
