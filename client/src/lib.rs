//! The Qubes qrexec protocol (request formats v2, v3, v4, the data channel)
//! and the library under the `qrexec-client-vm` command.
//!
//! Layout:
//! * [`proto`]: constants, message types, struct layouts, encoders and a
//!   validating streaming decoder (pure, fuzzable);
//! * [`names`]: local checks of target, service and source-qube arguments;
//! * [`format`](mod@format): choosing the request format (option, env, marker file);
//! * [`trigger`]: the exchange with the local agent;
//! * [`channel`]: the [`channel::DataChannel`] trait the pump runs over;
//! * [`transport`]: which data channel the command uses;
//! * [`local`], [`pump`]: local I/O, local program, and the data pump;
//! * [`filter`]: escape-character filtering;
//! * [`retry`]: bounded waiting for set-up resources other calls hold;
//! * [`cli`]: the `qrexec-client-vm` command line and flow.
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

pub mod channel;
pub mod cli;
pub mod filter;
pub mod format;
pub mod local;
pub mod names;
pub mod proto;
pub mod pump;
pub mod retry;
pub mod transport;
pub mod trigger;

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Turn verbose logging (to stderr) on or off.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

/// Whether verbose logging is on.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Write one `qrexec-client-vm: ...` line to stderr, ignoring failures
/// (stderr may be closed or broken; that must not end the call).
pub fn log_error(msg: &str) {
    let _ = writeln!(std::io::stderr(), "qrexec-client-vm: {msg}");
}

/// Log a line to stderr when verbose logging is on.
///
/// ```
/// qrexec::set_verbose(false);
/// qrexec::vlog!("not shown: {}", 42);
/// ```
#[macro_export]
macro_rules! vlog {
    ($($arg:tt)*) => {
        if $crate::verbose() {
            $crate::log_error(&format!($($arg)*));
        }
    };
}
