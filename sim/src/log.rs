//! One-line logging to stderr, prefixed with the member's name.
//!
//! Members inherit the supervisor's stderr, so every line says who wrote
//! it: `[qubes-sim work/agent] ...`. Verbose lines only appear when the
//! `QUBES_SIM_VERBOSE` environment variable is `1` (the supervisor's `-v`
//! sets it for its members).

use std::io::Write;
use std::sync::OnceLock;

/// Environment variable that turns verbose logging on (`1`).
pub const VERBOSE_ENV: &str = "QUBES_SIM_VERBOSE";

static NAME: OnceLock<String> = OnceLock::new();

/// Set this process's log prefix (first call wins).
pub fn set_name(name: impl Into<String>) {
    let _ = NAME.set(name.into());
}

/// Whether verbose logging is on.
pub fn verbose() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var(VERBOSE_ENV).is_ok_and(|v| v == "1"))
}

/// Write one line to stderr, ignoring failures.
pub fn line(msg: &str) {
    let name = NAME.get().map(String::as_str).unwrap_or("qubes-sim");
    let _ = writeln!(std::io::stderr(), "[{name}] {msg}");
}

/// The `log` logger of every `qubes-sim` process: the libraries' events
/// (vchan's warnings about a peer) as one prefixed line each, warnings and
/// errors only: `[qubes-sim work/agent] vchan: warning: ...`.
#[derive(Debug)]
struct Logger;

impl ::log::Log for Logger {
    fn enabled(&self, metadata: &::log::Metadata<'_>) -> bool {
        metadata.level() <= ::log::Level::Warn
    }
    fn log(&self, record: &::log::Record<'_>) {
        if self.enabled(record.metadata()) {
            line(&vchan::stderr_log::line(record));
        }
    }
    fn flush(&self) {}
}

/// Routes the libraries' `log` events to [`line()`] (once per process).
pub fn install() {
    if ::log::set_logger(&Logger).is_ok() {
        ::log::set_max_level(::log::LevelFilter::Warn);
    }
}

/// Log a line (always shown).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::log::line(&format!($($arg)*)) };
}

/// Log a line when verbose logging is on.
#[macro_export]
macro_rules! vlog {
    ($($arg:tt)*) => {
        if $crate::log::verbose() {
            $crate::log::line(&format!($($arg)*));
        }
    };
}
