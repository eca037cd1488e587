//! The Qubes qrexec protocol (request formats v2, v3, v4, the data channel)
//! and the library under the `qrexec-client-vm` command.
#![forbid(unsafe_code)]
