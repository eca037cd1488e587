//! A xenstore wire-protocol client (`/dev/xen/xenbus` or a xenstored unix
//! socket) and a small xenstored-compatible server for tests and the local
//! backend.
//!
//! * [`Xs`]: requests (read, write, mkdir, rm, directory, get/set_perms,
//!   get_domain_path, transactions with retry on `EAGAIN`).
//! * [`Watcher`]: watches on a connection of their own, with a blocking
//!   loop, a timeout, and a non-blocking call for `poll`-driven use.
//! * [`server::Server`]: an in-memory xenstored with one unix socket per
//!   domain and the permission rules of real Xen (docs/vchan.md §8.2, §16 row 9).
//! * [`wire`]: the message format and strict parsers (pure, fuzzable).
//!
//! Nothing the daemon sends is trusted: every reply is checked (length,
//! `req_id`, type, payload syntax); violations are [`Error::Protocol`] and
//! leave the connection unusable ([`Error::Broken`]), never a panic.
//!
//! ```no_run
//! use xenstore::{NodePerm, Perm, Watcher, Xs};
//! let xs = Xs::open()?;
//! let me = xs.own_domid()?;
//! xs.write("data/hello", b"world")?;
//! xs.set_perms("data/hello", &[NodePerm::new(me, Perm::None), NodePerm::new(0, Perm::Read)])?;
//! let w = Watcher::open()?;
//! w.watch("data/hello", "tok")?;
//! let ev = w.next_event()?; // fired on registration
//! assert_eq!(ev.path, "data/hello");
//! # Ok::<(), xenstore::Error>(())
//! ```
#![forbid(unsafe_code)]

mod client;
mod error;
mod perms;
pub mod server;
mod transport;
mod watch;
pub mod wire;

pub use client::{TRANSACTION_ATTEMPTS, Transaction, Xs};
pub use error::{Errno, Error, Result};
pub use perms::{DOMID_FIRST_RESERVED, DomId, NodePerm, Perm, parse_domid};
pub use watch::{WatchEvent, Watcher};
