//! A pure-Rust Xen vchan, byte-compatible with libxenvchan: control page,
//! rings, server/client rendezvous over the Xen, Local and Socket transports.
