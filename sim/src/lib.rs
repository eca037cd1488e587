//! A simulated Qubes for qrexec, without Xen.
//!
//! Every member is a separate process that plays its Xen domain over the
//! Local vchan transport (`vchan::LocalXen`), and members talk the real
//! qrexec wire protocol to each other:
//!
//! * one **agent** per VM ([`agent`]): vchan server of the control channel
//!   on port 512 toward dom0, the agent socket for `qrexec-client-vm` in that
//!   VM, and the target side of calls (services from a directory in the
//!   `/etc/qubes-rpc` style, [`service`]);
//! * one **daemon** per VM ([`daemon`]), playing dom0: vchan client of that
//!   control channel, the `qrexec.<domid>` socket for dom0 clients, the
//!   [`policy`] evaluation for the VM's calls, data-port allocation;
//! * the **supervisor** ([`supervisor`]): runs the event-channel hub, the
//!   grant hub and xenstored in its own threads, starts and watches the
//!   members, creates and destroys disposable VMs, and removes everything
//!   when it stops.
//!
//! The layout of a running simulation's directory is in [`layout`]; the
//! configuration file format in [`config`]; the policy file format in
//! [`policy`].
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod ctrl;
pub mod daemon;
mod error;
pub mod layout;
pub mod log;
pub mod mirage;
pub mod policy;
pub mod qubesd;
pub mod service;
pub mod supervisor;
pub mod wire;

pub use error::{Error, Result};
