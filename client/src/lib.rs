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
//!
//! The library does not print: what it has to say goes to the `log` facade
//! (`debug` for the `-v` trace, `error` and `warn` for failures it works
//! around). The command installs a logger that writes each event as one
//! `qrexec-client-vm: ...` line on stderr, `debug` only with `-v`.
#![forbid(unsafe_code)]

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
