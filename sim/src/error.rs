//! The crate's error type.

use std::io;

/// What can go wrong in the simulation, with what we were doing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A configuration or policy file is invalid.
    #[error("{path}:{line}: {msg}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A vchan operation failed.
    #[error("{what}: {source}")]
    Vchan {
        /// What we were doing.
        what: String,
        /// The vchan error.
        #[source]
        source: vchan::Error,
    },
    /// A peer broke the qrexec protocol.
    #[error("protocol violation by {peer}: {msg}")]
    Protocol {
        /// Who.
        peer: String,
        /// What it did.
        msg: String,
    },
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An [`Error::Io`] with context.
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// An [`Error::Vchan`] with context.
    pub fn vchan(what: impl Into<String>, source: vchan::Error) -> Error {
        Error::Vchan {
            what: what.into(),
            source,
        }
    }

    /// An [`Error::Protocol`].
    pub fn protocol(peer: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Protocol {
            peer: peer.into(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Other`].
    pub fn other(msg: impl Into<String>) -> Error {
        Error::Other(msg.into())
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
