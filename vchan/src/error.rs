//! The crate's error type.

use std::io;

/// Everything that can go wrong with a vchan, with the step that failed.
///
/// Converts into [`std::io::Error`] with the kinds a Rust user expects:
/// `BrokenPipe` after the peer closed, `WouldBlock` in non-blocking mode,
/// `TimedOut` when a connect times out, `InvalidData` on a corrupt ring.
///
/// ```
/// let e = vchan::Error::Timeout { step: "wait for client", secs: 5 };
/// assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::TimedOut);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed during `step`.
    #[error("{step}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The event channel layer failed.
    #[error("{step}: {source}")]
    Evtchn {
        /// What we were doing.
        step: &'static str,
        /// The event-channel error.
        #[source]
        source: evtchn::Error,
    },
    /// The grant-table layer failed.
    #[error("{step}: {source}")]
    Gnttab {
        /// What we were doing.
        step: &'static str,
        /// The grant-table error.
        #[source]
        source: gnttab::Error,
    },
    /// A xenstore request failed.
    #[error("{step}: {source}")]
    Xenstore {
        /// What we were doing.
        step: &'static str,
        /// The xenstore error.
        #[source]
        source: xenstore::Error,
    },
    /// The ring or control page broke a rule of the protocol, or a ring
    /// operation could not complete.
    #[error(transparent)]
    Ring(#[from] crate::ring::RingError),
    /// The requested configuration is not valid (sizes, ports, domains).
    #[error("invalid configuration: {what}")]
    Config {
        /// What is wrong.
        what: String,
    },
    /// A value the peer published (xenstore node, control page) is invalid.
    #[error("invalid value from peer: {what}")]
    Peer {
        /// What is wrong.
        what: String,
    },
    /// A vchan cannot connect a domain to itself (the kernel does not support it).
    #[error("loopback vchan refused: server and client are both domain {domid}")]
    Loopback {
        /// The domain.
        domid: u16,
    },
    /// A wait ran out of time.
    #[error("{step}: timed out after {secs} s")]
    Timeout {
        /// What we were waiting for.
        step: &'static str,
        /// How long we waited.
        secs: u64,
    },
    /// The peer domain is gone (destroyed, or its xenstore nodes vanished).
    #[error("{step}: peer domain {domid} is gone")]
    PeerGone {
        /// What we were doing.
        step: &'static str,
        /// The peer domain.
        domid: u16,
    },
    /// The operation needs a connected peer and there is none.
    #[error("not connected")]
    NotConnected,
    /// The peer has closed the channel.
    #[error("peer closed the vchan")]
    PeerClosed,
    /// Non-blocking mode and the operation would have to wait.
    #[error("operation would block")]
    WouldBlock,
}

impl Error {
    pub(crate) fn io(step: &'static str, source: io::Error) -> Self {
        Error::Io { step, source }
    }
    pub(crate) fn config(what: impl Into<String>) -> Self {
        Error::Config { what: what.into() }
    }
    pub(crate) fn peer(what: impl Into<String>) -> Self {
        Error::Peer { what: what.into() }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::Ring(_) => {
                let Error::Ring(r) = e else { unreachable!() };
                return io::Error::from(r);
            }
            Error::Timeout { .. } => io::ErrorKind::TimedOut,
            Error::PeerClosed => io::ErrorKind::BrokenPipe,
            Error::WouldBlock => io::ErrorKind::WouldBlock,
            Error::NotConnected => io::ErrorKind::NotConnected,
            Error::Config { .. } => io::ErrorKind::InvalidInput,
            Error::Peer { .. } => io::ErrorKind::InvalidData,
            Error::Loopback { .. } => io::ErrorKind::Unsupported,
            Error::PeerGone { .. } => io::ErrorKind::ConnectionAborted,
            Error::Evtchn { source, .. } => source.kind(),
            Error::Gnttab { .. } | Error::Xenstore { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
