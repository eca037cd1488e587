//! A `log` logger for programs: one plain line per event on stderr.
//!
//! The libraries of this workspace never print; they emit [`log`] events
//! (a peer's odd but workable control page, say). A program that wants
//! its users to see them installs this logger once at start-up
//! ([`install`]); the line reads as the libraries' old `eprintln!` did:
//! `vchan: warning: server's grant list runs into an in-page ring (...)`.
//!
//! ```
//! vchan::stderr_log::install();
//! log::warn!("shown on stderr");
//! log::info!("not shown: warnings and errors only");
//! ```

use std::io::Write;

/// The logger [`install`] sets: warnings and errors, one [`line()`] each.
///
/// ```
/// use log::{Level, Log, Metadata};
/// let l = vchan::stderr_log::StderrLogger;
/// assert!(l.enabled(&Metadata::builder().level(Level::Warn).build()));
/// assert!(!l.enabled(&Metadata::builder().level(Level::Info).build()));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            // One write of the whole line: lines from several threads or
            // processes sharing stderr do not interleave mid-line.
            let _ = std::io::stderr().write_all(format!("{}\n", line(record)).as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs [`StderrLogger`], showing warnings and errors. A second call,
/// or a program that has installed another logger, changes nothing.
///
/// ```
/// vchan::stderr_log::install();
/// vchan::stderr_log::install(); // harmless
/// assert_eq!(log::max_level(), log::LevelFilter::Warn);
/// ```
pub fn install() {
    if log::set_logger(&StderrLogger).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// The line for `record`, without the newline: `<crate>: <level>: <message>`,
/// where `<crate>` is the first part of the event's target (`vchan` for
/// `vchan::shm`) and `<level>` is `error`, `warning`, `info`, `debug` or
/// `trace`.
///
/// ```
/// let line = vchan::stderr_log::line(
///     &log::Record::builder()
///         .target("vchan::shm")
///         .level(log::Level::Warn)
///         .args(format_args!("odd page"))
///         .build(),
/// );
/// assert_eq!(line, "vchan: warning: odd page");
/// ```
pub fn line(record: &log::Record<'_>) -> String {
    let who = record.target().split("::").next().unwrap_or_default();
    let level = match record.level() {
        log::Level::Error => "error",
        log::Level::Warn => "warning",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    };
    format!("{who}: {level}: {}", record.args())
}
