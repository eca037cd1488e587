//! Bounded waiting for set-up resources that other calls hold.
//!
//! A data vchan needs pages to grant, an event-channel port, and a few
//! xenstore requests. Every one of them is limited per domain (or per
//! xenstore connection), and the limit is shared by all the calls the
//! domain makes at once: the 32nd concurrent call with 64 KiB buffers finds
//! the domain's 1024 grantable pages taken, the 12th concurrent set-up
//! transaction of a domU meets C xenstored's transaction quota
//! (qubes-issues #11059), the watches of many waiting clients reach the
//! per-domain watch quota (#5343). The pages, ports, transactions and
//! watches come back when the other calls end, so failing at once is the
//! wrong answer: [`retry`] tries again, with jittered exponential backoff,
//! until the call's connect deadline, and only then fails with one line
//! naming the resource, the errno and the limit ([`GaveUp`]).
//!
//! Which errors mean "a resource someone else holds" is decided by
//! [`classify`] from the error *types* of the `gnttab`, `evtchn` and
//! `xenstore` crates (as [`vchan::Error`] carries them), never from the
//! message text. Everything else fails at once, as before.
//!
//! The clock, the sleep and the jitter are injected ([`Clock`], [`Jitter`]),
//! so the policy is tested without waiting.

use std::fmt;
use std::time::{Duration, Instant};

/// The first wait after a refusal.
pub const INITIAL_DELAY: Duration = Duration::from_millis(10);
/// The longest single wait (the backoff doubles up to here).
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// A shared resource whose limit a set-up step ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Pages our domain grants (Linux `gntalloc`: `limit` module parameter,
    /// 1024 pages per domain by default).
    GrantPages,
    /// Event-channel ports of our domain (Xen: 4096 with the 2-level ABI).
    EventChannels,
    /// Open xenstore transactions (C xenstored: `quota_max_transaction`,
    /// 10 per connection; all processes of a domU share one connection).
    XenstoreTransactions,
    /// xenstore watches (C xenstored: `quota_nb_watch_per_domain`, 128).
    XenstoreWatches,
    /// xenstore nodes a domain owns (C xenstored:
    /// `quota_nb_entry_per_domain`, 1000).
    XenstoreNodes,
    /// xenstore memory of a domain (C xenstored:
    /// `quota_memory_per_domain_hard`, 2.5 MiB).
    XenstoreMemory,
    /// A xenstore transaction that kept conflicting with other writers.
    XenstoreConflicts,
}

impl Resource {
    /// What the resource is, for a log line.
    pub fn name(self) -> &'static str {
        match self {
            Resource::GrantPages => "granted pages",
            Resource::EventChannels => "event-channel ports",
            Resource::XenstoreTransactions => "xenstore transactions",
            Resource::XenstoreWatches => "xenstore watches",
            Resource::XenstoreNodes => "xenstore nodes",
            Resource::XenstoreMemory => "xenstore memory",
            Resource::XenstoreConflicts => "xenstore transaction conflicts",
        }
    }

    /// The limit behind it, as the default configuration sets it.
    pub fn limit(self) -> &'static str {
        match self {
            Resource::GrantPages => "1024 pages per domain (Linux gntalloc `limit`)",
            Resource::EventChannels => "4096 ports per domain (Xen 2-level event channels)",
            Resource::XenstoreTransactions => {
                "10 open transactions per connection (C xenstored quota_max_transaction; \
                 a domU's processes share one connection)"
            }
            Resource::XenstoreWatches => {
                "128 watches per domain (C xenstored quota_nb_watch_per_domain)"
            }
            Resource::XenstoreNodes => {
                "1000 nodes per domain (C xenstored quota_nb_entry_per_domain)"
            }
            Resource::XenstoreMemory => {
                "2.5 MiB per domain (C xenstored quota_memory_per_domain_hard)"
            }
            Resource::XenstoreConflicts => "the xenstore client's transaction attempts",
        }
    }
}

/// A set-up failure that waiting may cure: which resource, and the errno
/// name the layer below reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// The resource.
    pub resource: Resource,
    /// The errno name (`ENOSPC`, `E2BIG`, `EAGAIN`, ...).
    pub errno: String,
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}; limit: {})",
            self.resource.name(),
            self.errno,
            self.resource.limit()
        )
    }
}

/// Whether `e` is a refusal for a resource that other holders will give
/// back, decided from the error types (not their text).
///
/// ```
/// use qrexec::retry::{classify, Resource};
/// let e = vchan::Error::Gnttab {
///     step: "share ring pages",
///     source: gnttab::Error::Os {
///         op: "IOCTL_GNTALLOC_ALLOC_GREF",
///         source: std::io::Error::from_raw_os_error(libc::ENOSPC),
///     },
/// };
/// assert_eq!(classify(&e).unwrap().resource, Resource::GrantPages);
/// let e = vchan::Error::PeerClosed;
/// assert!(classify(&e).is_none());
/// ```
pub fn classify(e: &vchan::Error) -> Option<Exhausted> {
    let found = |resource, errno: &str| {
        Some(Exhausted {
            resource,
            errno: errno.to_owned(),
        })
    };
    match e {
        vchan::Error::Gnttab { source, .. } => match source.raw_os_error() {
            Some(libc::ENOSPC) => found(Resource::GrantPages, "ENOSPC"),
            _ => None,
        },
        vchan::Error::Evtchn { source, .. } => match (source, source.errno()) {
            (evtchn::Error::Bind { .. }, Some(nix::errno::Errno::ENOSPC)) => {
                found(Resource::EventChannels, "ENOSPC")
            }
            _ => None,
        },
        vchan::Error::Xenstore { source, .. } => classify_xenstore(source),
        _ => None,
    }
}

fn classify_xenstore(e: &xenstore::Error) -> Option<Exhausted> {
    use xenstore::Errno;
    let (op, errno) = match e {
        xenstore::Error::Xs { op, errno, .. } => (*op, errno),
        xenstore::Error::TransactionRetries { .. } => {
            return Some(Exhausted {
                resource: Resource::XenstoreConflicts,
                errno: "EAGAIN".into(),
            });
        }
        _ => return None,
    };
    let resource = match (op, errno) {
        ("TRANSACTION_START", Errno::ENOSPC) => Resource::XenstoreTransactions,
        ("WATCH", Errno::E2BIG | Errno::ENOSPC) => Resource::XenstoreWatches,
        ("WRITE" | "MKDIR" | "SET_PERMS", Errno::ENOSPC) => Resource::XenstoreNodes,
        (_, Errno::ENOMEM) => Resource::XenstoreMemory,
        (_, Errno::EAGAIN) => Resource::XenstoreConflicts,
        _ => return None,
    };
    Some(Exhausted {
        resource,
        errno: errno.name().to_owned(),
    })
}

/// Time as the retry loop sees it: now, and a sleep.
pub trait Clock {
    /// The current instant.
    fn now(&self) -> Instant;
    /// Sleeps for `d`.
    fn sleep(&self, d: Duration);
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A source of jitter: a uniformly distributed fraction of a delay.
pub trait Jitter {
    /// A value in `0..=max`.
    fn upto(&mut self, max: Duration) -> Duration;
}

/// xorshift64* seeded from the process id and the time: enough to keep
/// concurrent callers from retrying in lock step; not for secrets.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// Seeded from the pid and the clock.
    pub fn from_entropy() -> XorShift {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        XorShift::new(t ^ (u64::from(std::process::id()) << 32))
    }

    /// Seeded with `seed` (0 is replaced by a fixed non-zero seed).
    pub fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl Jitter for XorShift {
    fn upto(&mut self, max: Duration) -> Duration {
        let n = max.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(self.next() % n.saturating_add(1))
    }
}

/// The backoff schedule: the n-th wait (from 0) is drawn from
/// `[b/2, b]` with `b = min(INITIAL_DELAY * 2^n, MAX_DELAY)` ("equal
/// jitter"), and never runs past the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first base delay.
    pub initial: Duration,
    /// The largest base delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: INITIAL_DELAY,
            max: MAX_DELAY,
        }
    }
}

impl Backoff {
    /// The base delay of wait number `n` (from 0).
    ///
    /// ```
    /// use qrexec::retry::Backoff;
    /// use std::time::Duration;
    /// let b = Backoff::default();
    /// assert_eq!(b.base(0), Duration::from_millis(10));
    /// assert_eq!(b.base(3), Duration::from_millis(80));
    /// assert_eq!(b.base(40), Duration::from_secs(1));
    /// ```
    pub fn base(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The jittered delay of wait number `n`.
    pub fn delay(&self, n: u32, jitter: &mut impl Jitter) -> Duration {
        let b = self.base(n);
        let half = b / 2;
        half + jitter.upto(b - half)
    }
}

/// One wait, as [`retry`] reports it to its logger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    /// Which wait this is (1 for the first).
    pub attempt: u32,
    /// What ran out.
    pub exhausted: Exhausted,
    /// How long we sleep now.
    pub delay: Duration,
    /// Time left until the deadline, before this sleep.
    pub left: Duration,
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "data vchan setup: out of {} ({}), waiting {} ms before attempt {} ({} s left)",
            self.exhausted.resource.name(),
            self.exhausted.errno,
            self.delay.as_millis(),
            self.attempt + 1,
            self.left.as_secs()
        )
    }
}

/// The deadline passed while a resource stayed exhausted.
#[derive(Debug, thiserror::Error)]
#[error(
    "data vchan setup: still out of {exhausted} after {attempts} attempts in {} s: {source}",
    waited.as_secs()
)]
pub struct GaveUp<E: std::error::Error + 'static> {
    /// The resource, its errno and limit.
    pub exhausted: Exhausted,
    /// How many attempts were made.
    pub attempts: u32,
    /// How long we waited in all.
    pub waited: Duration,
    /// The last refusal.
    #[source]
    pub source: E,
}

/// Why [`retry`] returned without a value.
#[derive(Debug)]
pub enum RetryError<E: std::error::Error + 'static> {
    /// A failure that waiting does not cure: returned at once.
    Fatal(E),
    /// The resource was still exhausted at the deadline.
    GaveUp(GaveUp<E>),
}

/// Runs `attempt` until it succeeds, fails for a reason `classify` does not
/// call a held resource, or `deadline` passes; between attempts sleeps with
/// [`Backoff`] and reports each wait to `log`.
///
/// The last attempt is made at the deadline at the latest (a sleep never
/// crosses it), so a resource freed during the last wait is still used.
///
/// ```
/// use qrexec::retry::{retry, Backoff, Exhausted, Resource, SystemClock, XorShift};
/// use std::time::{Duration, Instant};
/// let mut n = 0;
/// let r: Result<u32, _> = retry(
///     Instant::now() + Duration::from_secs(5),
///     &Backoff::default(),
///     &SystemClock,
///     &mut XorShift::new(1),
///     |_| Some(Exhausted { resource: Resource::GrantPages, errno: "ENOSPC".into() }),
///     |_| {},
///     || { n += 1; if n < 3 { Err(std::io::Error::other("full")) } else { Ok(n) } },
/// );
/// assert_eq!(r.unwrap(), 3);
/// ```
pub fn retry<T, E: std::error::Error + 'static>(
    deadline: Instant,
    backoff: &Backoff,
    clock: &impl Clock,
    jitter: &mut impl Jitter,
    classify: impl Fn(&E) -> Option<Exhausted>,
    mut log: impl FnMut(&Wait),
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, RetryError<E>> {
    let start = clock.now();
    let mut waits = 0u32;
    loop {
        let e = match attempt() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let Some(exhausted) = classify(&e) else {
            return Err(RetryError::Fatal(e));
        };
        let now = clock.now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(RetryError::GaveUp(GaveUp {
                exhausted,
                attempts: waits + 1,
                waited: now.saturating_duration_since(start),
                source: e,
            }));
        }
        let delay = backoff.delay(waits, jitter).min(left);
        waits += 1;
        log(&Wait {
            attempt: waits,
            exhausted,
            delay,
            left,
        });
        clock.sleep(delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A clock that only moves when slept on, recording the sleeps.
    struct FakeClock {
        now: Cell<Instant>,
        slept: RefCell<Vec<Duration>>,
    }

    impl FakeClock {
        fn new() -> FakeClock {
            FakeClock {
                now: Cell::new(Instant::now()),
                slept: RefCell::new(Vec::new()),
            }
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.now.get()
        }
        fn sleep(&self, d: Duration) {
            self.now.set(self.now.get() + d);
            self.slept.borrow_mut().push(d);
        }
    }

    /// No jitter at all (the lower end) or all of it (the upper end).
    struct Fixed(bool);
    impl Jitter for Fixed {
        fn upto(&mut self, max: Duration) -> Duration {
            if self.0 { max } else { Duration::ZERO }
        }
    }

    fn grant_enospc() -> vchan::Error {
        vchan::Error::Gnttab {
            step: "share ring pages",
            source: gnttab::Error::Hub {
                op: "ALLOC_GREF",
                path: "/x/gnttab.sock".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            },
        }
    }

    fn xs(op: &'static str, errno: xenstore::Errno) -> vchan::Error {
        vchan::Error::Xenstore {
            step: "publish ring-ref and event-channel",
            source: xenstore::Error::Xs {
                op,
                path: String::new(),
                errno,
            },
        }
    }

    fn evtchn_bind(
        op: &'static str,
        remote_port: Option<u32>,
        errno: nix::errno::Errno,
    ) -> vchan::Error {
        vchan::Error::Evtchn {
            step: "bind",
            source: evtchn::Error::Bind {
                op,
                remote: 3,
                remote_port,
                source: errno,
            },
        }
    }

    #[test]
    fn classification_by_type() {
        use xenstore::Errno;
        let held = [
            (grant_enospc(), Resource::GrantPages),
            (
                xs("TRANSACTION_START", Errno::ENOSPC),
                Resource::XenstoreTransactions,
            ),
            (xs("WATCH", Errno::E2BIG), Resource::XenstoreWatches),
            (xs("WRITE", Errno::ENOSPC), Resource::XenstoreNodes),
            (xs("READ", Errno::ENOMEM), Resource::XenstoreMemory),
            (
                xs("TRANSACTION_END", Errno::EAGAIN),
                Resource::XenstoreConflicts,
            ),
            (
                vchan::Error::Xenstore {
                    step: "x",
                    source: xenstore::Error::TransactionRetries { attempts: 64 },
                },
                Resource::XenstoreConflicts,
            ),
            (
                evtchn_bind(
                    "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
                    None,
                    nix::errno::Errno::ENOSPC,
                ),
                Resource::EventChannels,
            ),
        ];
        for (e, want) in &held {
            assert_eq!(classify(e).map(|x| x.resource), Some(*want), "{e}");
        }
        // Not a held resource: fail at once.
        let not_held = [
            xs("READ", Errno::EACCES),
            xs("WATCH", Errno::EINVAL),
            xs("TRANSACTION_START", Errno::EBUSY),
            vchan::Error::Gnttab {
                step: "map",
                source: gnttab::Error::Os {
                    op: "mmap",
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                },
            },
            evtchn_bind(
                "IOCTL_EVTCHN_BIND_INTERDOMAIN",
                Some(7),
                nix::errno::Errno::EINVAL,
            ),
            vchan::Error::PeerClosed,
            // The text alone does not make an error retriable.
            vchan::Error::Peer {
                what: "ENOSPC: No space left on device".into(),
            },
        ];
        for e in &not_held {
            assert!(classify(e).is_none(), "{e}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let b = Backoff::default();
        let lo: Vec<_> = (0..10).map(|n| b.delay(n, &mut Fixed(false))).collect();
        let hi: Vec<_> = (0..10).map(|n| b.delay(n, &mut Fixed(true))).collect();
        assert_eq!(lo[0], Duration::from_millis(5));
        assert_eq!(hi[0], Duration::from_millis(10));
        assert_eq!(hi[6], Duration::from_millis(640));
        assert_eq!(hi[7], Duration::from_secs(1));
        assert_eq!(hi[9], Duration::from_secs(1));
        assert_eq!(lo[9], Duration::from_millis(500));
        let mut rng = XorShift::new(42);
        for n in 0..50 {
            let d = b.delay(n, &mut rng);
            assert!(d >= b.base(n) / 2 && d <= b.base(n), "{n}: {d:?}");
        }
    }

    #[test]
    fn jitter_spreads_callers() {
        let mut a = XorShift::new(1);
        let mut b = XorShift::new(2);
        let max = Duration::from_millis(500);
        let da: Vec<_> = (0..8).map(|_| a.upto(max)).collect();
        let db: Vec<_> = (0..8).map(|_| b.upto(max)).collect();
        assert_ne!(da, db);
        assert!(da.iter().chain(&db).all(|d| *d <= max));
        assert_eq!(a.upto(Duration::ZERO), Duration::ZERO);
    }

    /// `retry` as the client runs it (default backoff, classify), on the
    /// fake clock with all the jitter; `attempt` gets the attempt number
    /// (1, 2, ...). Returns the result, the attempts made and the waits
    /// logged.
    fn run<T>(
        clock: &FakeClock,
        deadline: Instant,
        mut attempt: impl FnMut(u32) -> Result<T, vchan::Error>,
    ) -> (Result<T, RetryError<vchan::Error>>, u32, Vec<Wait>) {
        let mut logged = Vec::new();
        let mut n = 0;
        let r = retry(
            deadline,
            &Backoff::default(),
            clock,
            &mut Fixed(true),
            classify,
            |w| logged.push(w.clone()),
            || {
                n += 1;
                attempt(n)
            },
        );
        (r, n, logged)
    }

    #[test]
    fn waits_until_the_resource_comes_back() {
        let clock = FakeClock::new();
        let deadline = clock.now() + Duration::from_secs(120);
        let (r, n, logged) = run(&clock, deadline, |n| {
            if n <= 4 { Err(grant_enospc()) } else { Ok(n) }
        });
        assert_eq!(r.unwrap(), 5);
        assert_eq!(n, 5);
        assert_eq!(
            *clock.slept.borrow(),
            [10, 20, 40, 80].map(Duration::from_millis)
        );
        assert_eq!(logged.len(), 4);
        assert_eq!(logged[0].attempt, 1);
        assert_eq!(logged[0].exhausted.resource, Resource::GrantPages);
        assert!(
            logged[0]
                .to_string()
                .contains("out of granted pages (ENOSPC)"),
            "{}",
            logged[0]
        );
    }

    #[test]
    fn other_errors_fail_at_once() {
        let clock = FakeClock::new();
        let deadline = clock.now() + Duration::from_secs(120);
        let (r, n, logged) = run(&clock, deadline, |_| Err::<(), _>(vchan::Error::PeerClosed));
        assert!(matches!(
            r,
            Err(RetryError::Fatal(vchan::Error::PeerClosed))
        ));
        assert_eq!(n, 1);
        assert!(logged.is_empty());
        assert!(clock.slept.borrow().is_empty());
    }

    #[test]
    fn gives_up_at_the_deadline_with_one_line_naming_the_limit() {
        let clock = FakeClock::new();
        let deadline = clock.now() + Duration::from_secs(120);
        let (r, n, _) = run(&clock, deadline, |_| {
            Err::<(), _>(xs("TRANSACTION_START", xenstore::Errno::ENOSPC))
        });
        let Err(RetryError::GaveUp(g)) = r else {
            panic!("expected GaveUp")
        };
        // The sleeps end exactly at the deadline, and one last attempt is
        // made there.
        assert_eq!(clock.now(), deadline);
        assert_eq!(g.waited, Duration::from_secs(120));
        assert_eq!(g.attempts, n);
        assert!(*clock.slept.borrow().iter().max().unwrap() <= MAX_DELAY);
        let msg = g.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        for want in [
            "xenstore transactions",
            "ENOSPC",
            "10 open transactions per connection",
            "120 s",
        ] {
            assert!(msg.contains(want), "{want:?} missing in {msg}");
        }
    }

    #[test]
    fn a_past_deadline_still_gets_one_attempt() {
        let clock = FakeClock::new();
        let (r, n, _) = run(&clock, clock.now(), |_| Err::<(), _>(grant_enospc()));
        assert!(matches!(r, Err(RetryError::GaveUp(_))));
        assert_eq!(n, 1);
    }
}
