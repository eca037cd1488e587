//! The exchange with the local qrexec agent (docs/qrexec.md §7): connect to its
//! socket, write the whole request in one `write`, read exactly 8 bytes of
//! connection parameters (EOF at offset 0 = refused). The socket must stay
//! open until the call ends (docs/qrexec.md §7.5), so it is returned to the caller.

use crate::proto::{ConnectionParams, EXEC_PARAMS_SIZE, VCHAN_BASE_DATA_PORT};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Largest domain id a peer can have (`DOMID_FIRST_RESERVED` − 1).
pub const MAX_DOMID: u32 = 0x7fef;
/// Largest data port we accept from the agent.
pub const MAX_DATA_PORT: u32 = 0xffff;

/// A failure talking to the agent (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// Could not connect to the agent socket.
    #[error("cannot connect to the qrexec agent at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Could not write the request.
    #[error("cannot send the request to the qrexec agent: {0}")]
    Write(#[source] io::Error),
    /// Reading the connection parameters failed.
    #[error("cannot read the connection parameters from the qrexec agent: {0}")]
    Read(#[source] io::Error),
    /// The agent closed after a partial answer.
    #[error(
        "the qrexec agent closed the connection after {0} of {EXEC_PARAMS_SIZE} bytes of connection parameters"
    )]
    ShortRead(usize),
    /// The answer names an impossible domain or port.
    #[error(
        "the qrexec agent sent invalid connection parameters: domain {domain}, port {port} (need domain <= {MAX_DOMID} and port {VCHAN_BASE_DATA_PORT}..={MAX_DATA_PORT})"
    )]
    BadParams {
        /// Received domain.
        domain: u32,
        /// Received port.
        port: u32,
    },
}

/// What the agent answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentAnswer {
    /// The call was allowed: where the service will connect from.
    Accepted(ConnectionParams),
    /// EOF instead of parameters: refused (or the request format was not
    /// understood, which looks the same, docs/qrexec.md §7.4).
    Refused,
}

/// Validated connection parameters: a domain id that fits `domid_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPeer {
    /// Domain that will connect to our vchan server.
    pub domain: u16,
    /// The data vchan port.
    pub port: u32,
}

impl DataPeer {
    /// Check parameters from the agent: domain ≤ 0x7fef, port 513..=65535.
    ///
    /// ```
    /// # use qrexec::trigger::DataPeer;
    /// # use qrexec::proto::ConnectionParams;
    /// let p = ConnectionParams { connect_domain: 0, connect_port: 513 };
    /// assert_eq!(DataPeer::validate(p).unwrap().port, 513);
    /// assert!(DataPeer::validate(ConnectionParams { connect_domain: 0x7ff0, connect_port: 513 }).is_err());
    /// ```
    pub fn validate(p: ConnectionParams) -> Result<DataPeer, TriggerError> {
        let bad = || TriggerError::BadParams {
            domain: p.connect_domain,
            port: p.connect_port,
        };
        if p.connect_domain > MAX_DOMID
            || !(VCHAN_BASE_DATA_PORT..=MAX_DATA_PORT).contains(&p.connect_port)
        {
            return Err(bad());
        }
        let domain = u16::try_from(p.connect_domain).map_err(|_| bad())?;
        Ok(DataPeer {
            domain,
            port: p.connect_port,
        })
    }
}

/// Read exactly 8 bytes of connection parameters, looping on partial reads.
/// EOF (or `ECONNRESET`, which an agent that closes with our request unread
/// produces) before the first byte means refused; EOF later is an error.
pub fn read_answer<R: Read>(r: &mut R) -> Result<AgentAnswer, TriggerError> {
    let mut buf = [0u8; EXEC_PARAMS_SIZE];
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(AgentAnswer::Refused),
            Ok(0) => return Err(TriggerError::ShortRead(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && got == 0 => {
                log::debug!("agent reset the connection: treated as a refusal");
                return Ok(AgentAnswer::Refused);
            }
            Err(e) => return Err(TriggerError::Read(e)),
        }
    }
    Ok(AgentAnswer::Accepted(
        ConnectionParams::decode(&buf).map_err(|e| TriggerError::Read(io::Error::other(e)))?,
    ))
}

/// Connect to the agent at `path`, write `request` (one buffer, so one
/// `write` call for any realistic size) and read the answer. The stream is
/// returned so it stays open for the whole call.
pub fn call_agent(path: &Path, request: &[u8]) -> Result<(AgentAnswer, UnixStream), TriggerError> {
    let mut stream = UnixStream::connect(path).map_err(|source| TriggerError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    log::debug!("connected to the agent at {}", path.display());
    stream.write_all(request).map_err(TriggerError::Write)?;
    log::debug!("sent a {}-byte request", request.len());
    let answer = read_answer(&mut stream)?;
    Ok((answer, stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that returns its chunks one `read` at a time.
    struct Chunks(Vec<Vec<u8>>, Option<io::ErrorKind>);

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return match self.1.take() {
                    Some(k) => Err(k.into()),
                    None => Ok(0),
                };
            }
            let c = self.0.remove(0);
            buf[..c.len()].copy_from_slice(&c);
            Ok(c.len())
        }
    }

    #[test]
    fn answer_in_pieces_is_reassembled() {
        let mut r = Chunks(vec![vec![7, 0], vec![0], vec![0, 1, 2], vec![0, 0]], None);
        assert_eq!(
            read_answer(&mut r).unwrap(),
            AgentAnswer::Accepted(ConnectionParams {
                connect_domain: 7,
                connect_port: 513
            })
        );
    }

    #[test]
    fn eof_at_start_is_refusal_later_is_error() {
        assert_eq!(
            read_answer(&mut Chunks(vec![], None)).unwrap(),
            AgentAnswer::Refused
        );
        assert_eq!(
            read_answer(&mut Chunks(vec![], Some(io::ErrorKind::ConnectionReset))).unwrap(),
            AgentAnswer::Refused
        );
        assert!(matches!(
            read_answer(&mut Chunks(vec![vec![1, 2, 3]], None)),
            Err(TriggerError::ShortRead(3))
        ));
        assert!(matches!(
            read_answer(&mut Chunks(
                vec![vec![1]],
                Some(io::ErrorKind::ConnectionReset)
            )),
            Err(TriggerError::Read(_))
        ));
    }

    #[test]
    fn params_are_bounded() {
        let p = |d, port| ConnectionParams {
            connect_domain: d,
            connect_port: port,
        };
        assert!(DataPeer::validate(p(0, 513)).is_ok());
        assert!(DataPeer::validate(p(0x7fef, 768)).is_ok());
        assert!(DataPeer::validate(p(0x7ff0, 513)).is_err());
        assert!(DataPeer::validate(p(u32::MAX, 513)).is_err());
        assert!(DataPeer::validate(p(1, 512)).is_err());
        assert!(DataPeer::validate(p(1, 0)).is_err());
        assert!(DataPeer::validate(p(1, 65536)).is_err());
    }
}
