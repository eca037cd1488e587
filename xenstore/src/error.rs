//! Errors of this crate: one enum, [`Error`], whose variants carry the
//! operation, the path and the errno name the daemon sent.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An errno as xenstored names it in an `ERROR` reply (`"ENOENT\0"`).
///
/// The names are those of `xsd_errors[]` in `xs_wire.h`; anything else a
/// daemon sends (and that looks like an errno name) is kept in
/// [`Errno::Other`].
///
/// ```
/// use xenstore::Errno;
/// assert_eq!("EACCES".parse::<Errno>().unwrap(), Errno::EACCES);
/// assert_eq!(Errno::EAGAIN.to_string(), "EAGAIN");
/// assert_eq!(Errno::from_name("EWHATEVER"), Errno::Other("EWHATEVER".into()));
/// ```
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Errno {
    /// Invalid argument (bad path, bad payload, bad permission string).
    EINVAL,
    /// Permission denied.
    EACCES,
    /// The node already exists.
    EEXIST,
    /// Is a directory.
    EISDIR,
    /// No such node (or transaction).
    ENOENT,
    /// Out of memory.
    ENOMEM,
    /// A quota was exceeded (nodes, transactions, permissions, value size).
    ENOSPC,
    /// I/O error.
    EIO,
    /// Directory not empty.
    ENOTEMPTY,
    /// Operation not supported.
    ENOSYS,
    /// Read-only.
    EROFS,
    /// Busy (e.g. TRANSACTION_START inside a transaction).
    EBUSY,
    /// Transaction conflict: redo the whole transaction.
    EAGAIN,
    /// Already connected.
    EISCONN,
    /// Reply or request too big, or too many watches.
    E2BIG,
    /// Operation not permitted (e.g. a domain changing a node's owner).
    EPERM,
    /// Any other name the daemon sent.
    Other(String),
}

/// (name, variant, Linux errno value) for every known errno.
const KNOWN: &[(&str, Errno, i32)] = &[
    ("EINVAL", Errno::EINVAL, libc::EINVAL),
    ("EACCES", Errno::EACCES, libc::EACCES),
    ("EEXIST", Errno::EEXIST, libc::EEXIST),
    ("EISDIR", Errno::EISDIR, libc::EISDIR),
    ("ENOENT", Errno::ENOENT, libc::ENOENT),
    ("ENOMEM", Errno::ENOMEM, libc::ENOMEM),
    ("ENOSPC", Errno::ENOSPC, libc::ENOSPC),
    ("EIO", Errno::EIO, libc::EIO),
    ("ENOTEMPTY", Errno::ENOTEMPTY, libc::ENOTEMPTY),
    ("ENOSYS", Errno::ENOSYS, libc::ENOSYS),
    ("EROFS", Errno::EROFS, libc::EROFS),
    ("EBUSY", Errno::EBUSY, libc::EBUSY),
    ("EAGAIN", Errno::EAGAIN, libc::EAGAIN),
    ("EISCONN", Errno::EISCONN, libc::EISCONN),
    ("E2BIG", Errno::E2BIG, libc::E2BIG),
    ("EPERM", Errno::EPERM, libc::EPERM),
];

impl Errno {
    /// The wire name, e.g. `"ENOENT"`.
    pub fn name(&self) -> &str {
        match self {
            Errno::EINVAL => "EINVAL",
            Errno::EACCES => "EACCES",
            Errno::EEXIST => "EEXIST",
            Errno::EISDIR => "EISDIR",
            Errno::ENOENT => "ENOENT",
            Errno::ENOMEM => "ENOMEM",
            Errno::ENOSPC => "ENOSPC",
            Errno::EIO => "EIO",
            Errno::ENOTEMPTY => "ENOTEMPTY",
            Errno::ENOSYS => "ENOSYS",
            Errno::EROFS => "EROFS",
            Errno::EBUSY => "EBUSY",
            Errno::EAGAIN => "EAGAIN",
            Errno::EISCONN => "EISCONN",
            Errno::E2BIG => "E2BIG",
            Errno::EPERM => "EPERM",
            Errno::Other(s) => s,
        }
    }

    /// The errno for a wire name; unknown names become [`Errno::Other`].
    pub fn from_name(name: &str) -> Errno {
        KNOWN
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, v, _)| v.clone())
            .unwrap_or_else(|| Errno::Other(name.to_owned()))
    }

    /// The Linux errno value, if the name is a known one.
    ///
    /// ```
    /// assert_eq!(xenstore::Errno::ENOENT.raw_os_error(), Some(libc::ENOENT));
    /// ```
    pub fn raw_os_error(&self) -> Option<i32> {
        KNOWN
            .iter()
            .find(|(n, _, _)| *n == self.name())
            .map(|(_, _, code)| *code)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Errno {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Errno::from_name(s))
    }
}

/// Every failure of the client, the watcher and the server.
///
/// Requests that the daemon refused are [`Error::Xs`]; everything the peer
/// sent that does not follow the protocol is [`Error::Protocol`] (and the
/// connection is unusable afterwards: [`Error::Broken`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The daemon answered the request with an `ERROR` reply.
    #[error("xenstore {op} {path:?}: {errno}")]
    Xs {
        /// The request type, e.g. `"READ"`.
        op: &'static str,
        /// The path (or other first argument) of the request.
        path: String,
        /// The errno name the daemon sent.
        errno: Errno,
    },
    /// An I/O error on the connection.
    #[error("xenstore {op}: {source}")]
    Io {
        /// What we were doing (`"write request"`, `"read reply"`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket or device could not be opened.
    #[error("cannot open xenstore at {}: {source}", path.display())]
    Open {
        /// The socket or device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer violated the wire protocol (bad header, oversized or
    /// truncated message, wrong `req_id`, malformed payload).
    #[error("xenstore protocol violation: {what}")]
    Protocol {
        /// What was wrong.
        what: String,
    },
    /// The peer closed the connection.
    #[error("xenstore connection closed by the peer during {op}")]
    Disconnected {
        /// What we were doing.
        op: &'static str,
    },
    /// No complete reply arrived within the configured reply timeout.
    #[error("xenstore {op}: no reply within {timeout:?}")]
    Timeout {
        /// The request type.
        op: &'static str,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// An earlier protocol, I/O or timeout error left the connection out of
    /// step with the peer; open a new one.
    #[error("xenstore connection unusable after an earlier error")]
    Broken,
    /// The caller passed something that cannot be sent (a NUL in a path, a
    /// payload over 4096 bytes, a malformed permission string, ...).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What was wrong.
        what: String,
    },
    /// [`Xs::transaction`](crate::Xs::transaction) kept conflicting.
    #[error("xenstore transaction still conflicting (EAGAIN) after {attempts} attempts")]
    TransactionRetries {
        /// How many times the transaction was tried.
        attempts: u32,
    },
}

impl Error {
    /// The errno of an [`Error::Xs`], if this is one.
    pub fn errno(&self) -> Option<&Errno> {
        match self {
            Error::Xs { errno, .. } => Some(errno),
            _ => None,
        }
    }

    /// `true` for an `ENOENT` reply (the node does not exist).
    pub fn is_enoent(&self) -> bool {
        self.errno() == Some(&Errno::ENOENT)
    }

    /// `true` for an `EACCES` reply (permission denied).
    ///
    /// Note (docs/vchan.md §8.2): C xenstored also answers `EACCES` for a *missing*
    /// node under a parent the caller cannot read; a client polling for
    /// another domain's node must treat both as "not there yet".
    pub fn is_eacces(&self) -> bool {
        self.errno() == Some(&Errno::EACCES)
    }

    /// `true` for an `EAGAIN` reply (transaction conflict).
    pub fn is_eagain(&self) -> bool {
        self.errno() == Some(&Errno::EAGAIN)
    }

    pub(crate) fn protocol(what: impl Into<String>) -> Error {
        Error::Protocol { what: what.into() }
    }

    pub(crate) fn invalid(what: impl Into<String>) -> Error {
        Error::InvalidArgument { what: what.into() }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        use io::ErrorKind as K;
        let kind = match &e {
            Error::Xs { errno, .. } => match errno {
                Errno::ENOENT => K::NotFound,
                Errno::EACCES | Errno::EPERM => K::PermissionDenied,
                Errno::EEXIST => K::AlreadyExists,
                Errno::EINVAL => K::InvalidInput,
                _ => K::Other,
            },
            Error::Io { source, .. } | Error::Open { source, .. } => source.kind(),
            Error::Protocol { .. } => K::InvalidData,
            Error::Disconnected { .. } => K::UnexpectedEof,
            Error::Timeout { .. } => K::TimedOut,
            Error::Broken => K::BrokenPipe,
            Error::InvalidArgument { .. } => K::InvalidInput,
            Error::TransactionRetries { .. } => K::Other,
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_round_trip() {
        for (name, v, code) in KNOWN {
            let e = v.clone();
            assert_eq!(e.name(), *name);
            assert_eq!(Errno::from_name(name), e);
            assert_eq!(e.raw_os_error(), Some(*code));
        }
        assert_eq!(Errno::Other("EFOO".into()).raw_os_error(), None);
    }

    #[test]
    fn helpers_and_io_conversion() {
        let e = Error::Xs {
            op: "READ",
            path: "data/x".into(),
            errno: Errno::ENOENT,
        };
        assert!(e.is_enoent() && !e.is_eacces() && !e.is_eagain());
        assert_eq!(e.to_string(), "xenstore READ \"data/x\": ENOENT");
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
        let io: io::Error = Error::protocol("x").into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidData);
    }
}
