//! A xenstore wire-protocol client (`/dev/xen/xenbus` or a xenstored unix
//! socket) and a small xenstored-compatible server for tests and the local
//! backend.
#![forbid(unsafe_code)]
