//! Choosing the data-channel transport for the vchan server.
//!
//! With `VCHAN_SOCKET_DIR` set, the server is a `qubes-core-vchan-socket`
//! compatible socket (the `vchan` crate's socket transport, through
//! [`open_socket_server`]); everything else goes through
//! [`open_data_server`] (Xen, or the Local transport). Both give a
//! [`VchanChannel`]: one data channel implementation ships, and the tests
//! run the pump over it.

use crate::channel::DataChannel;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Directory of vchan-socket sockets (docs/qrexec.md §15).
pub const VCHAN_SOCKET_DIR_ENV: &str = "VCHAN_SOCKET_DIR";
/// Our own domain id for the socket and local transports (default 0).
pub const VCHAN_DOMAIN_ENV: &str = "VCHAN_DOMAIN";
/// Directory of the same-host "local" transport (handled by the vchan crate).
pub const VCHAN_LOCAL_DIR_ENV: &str = "VCHAN_LOCAL_DIR";

/// Why the data vchan server could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No usable transport on this machine.
    #[error("no /dev/xen here: set VCHAN_SOCKET_DIR (or VCHAN_LOCAL_DIR) to use a local transport")]
    NoXen,
    /// `VCHAN_DOMAIN` is not a domain id.
    #[error("{VCHAN_DOMAIN_ENV}='{0}' is not a domain id")]
    BadOwnDomain(String),
    /// The socket server could not listen.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Any other transport failure (for the vchan crate).
    #[error("data vchan setup failed: {0}")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A resource other calls hold (granted pages, ports, xenstore quotas)
    /// stayed exhausted until the connect deadline ([`crate::retry`]).
    #[error(transparent)]
    Exhausted(Box<crate::retry::GaveUp<vchan::Error>>),
}

/// Parse `VCHAN_DOMAIN` (unset or empty → 0) as strictly as the vchan crate
/// does for every transport ([`vchan::parse_domid`]: decimal, no sign, no
/// spaces, no leading zeros).
///
/// ```
/// # use qrexec::transport::parse_own_domain;
/// assert_eq!(parse_own_domain(None).unwrap(), 0);
/// assert_eq!(parse_own_domain(Some("12".as_ref())).unwrap(), 12);
/// assert!(parse_own_domain(Some("x".as_ref())).is_err());
/// assert!(parse_own_domain(Some("+5".as_ref())).is_err());
/// assert!(parse_own_domain(Some(" 05".as_ref())).is_err());
/// ```
pub fn parse_own_domain(value: Option<&OsStr>) -> Result<u32, SetupError> {
    match value {
        None => Ok(0),
        Some(v) if v.is_empty() => Ok(0),
        Some(v) => {
            let s = v.to_string_lossy();
            vchan::parse_domid(&s)
                .map(u32::from)
                .filter(|&d| d <= crate::trigger::MAX_DOMID)
                .ok_or_else(|| SetupError::BadOwnDomain(s.into_owned()))
        }
    }
}

/// Create our data vchan server toward `domain`/`port` with rings of at
/// least `buffer_size` bytes, on the transport the environment selects
/// (`VCHAN_SOCKET_DIR`: the `qubes-core-vchan-socket` stream; otherwise
/// [`open_data_server`], which waits for held resources until `deadline`).
pub fn open_data_channel(
    domain: u16,
    port: u32,
    buffer_size: usize,
    deadline: Instant,
) -> Result<Box<dyn DataChannel>, SetupError> {
    match std::env::var_os(VCHAN_SOCKET_DIR_ENV).filter(|d| !d.is_empty()) {
        Some(dir) => {
            let own = parse_own_domain(std::env::var_os(VCHAN_DOMAIN_ENV).as_deref())?;
            open_socket_server(Path::new(&dir), own, domain, port, buffer_size)
        }
        None => open_data_server(domain, port, buffer_size, deadline),
    }
}

/// The vchan-socket server at `dir/vchan.<own>.<domain>.<port>.sock`
/// (the vchan crate's socket transport).
pub fn open_socket_server(
    dir: &Path,
    own_domain: u32,
    domain: u16,
    port: u32,
    buffer_size: usize,
) -> Result<Box<dyn DataChannel>, SetupError> {
    let own =
        u16::try_from(own_domain).map_err(|_| SetupError::BadOwnDomain(own_domain.to_string()))?;
    let path = vchan::socket_path(dir, own, domain, port);
    log::debug!("listening for the service on {}", path.display());
    let t = vchan::Transport::Socket {
        dir: dir.to_path_buf(),
        domid: own,
    };
    let v =
        vchan::Vchan::server(&t, domain, port, buffer_size, buffer_size).map_err(|e| match e {
            vchan::Error::Io { source, .. } => SetupError::Listen { path, source },
            e => SetupError::Other(Box::new(e)),
        })?;
    Ok(Box::new(VchanChannel(v)))
}

/// The data vchan server on the real transports: Xen, or the vchan crate's
/// local transport (`VCHAN_LOCAL_DIR` + `VCHAN_DOMAIN`), chosen by
/// [`vchan::Transport::from_env`].
///
/// A set-up refused for a resource that other calls hold (grant pages,
/// event-channel ports, xenstore quotas) is retried with backoff until
/// `deadline` ([`crate::retry`]); each wait is logged under `-v`.
pub fn open_data_server(
    domain: u16,
    port: u32,
    buffer_size: usize,
    deadline: Instant,
) -> Result<Box<dyn DataChannel>, SetupError> {
    let t = vchan::Transport::from_env().map_err(|e| SetupError::Other(Box::new(e)))?;
    if t == vchan::Transport::Xen && t.check_available().is_err() {
        return Err(SetupError::NoXen);
    }
    log::debug!(
        "data vchan server toward domain {domain} port {port}, {buffer_size} bytes each way ({t:?})"
    );
    let v = crate::retry::retry(
        deadline,
        &crate::retry::Backoff::default(),
        &crate::retry::SystemClock,
        &mut crate::retry::XorShift::from_entropy(),
        crate::retry::classify,
        |w| log::debug!("{w}"),
        || vchan::Vchan::server(&t, domain, port, buffer_size, buffer_size),
    )
    .map_err(|e| match e {
        crate::retry::RetryError::Fatal(e) => SetupError::Other(Box::new(e)),
        crate::retry::RetryError::GaveUp(g) => SetupError::Exhausted(Box::new(g)),
    })?;
    Ok(Box::new(VchanChannel(v)))
}

/// [`DataChannel`] over a [`vchan::Vchan`]: readiness comes from its event
/// channel, which is readable whenever the peer wrote, consumed, connected
/// or closed.
#[derive(Debug)]
pub struct VchanChannel(pub vchan::Vchan);

impl std::os::fd::AsFd for VchanChannel {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl DataChannel for VchanChannel {
    fn wait_connected(&mut self, timeout: std::time::Duration) -> io::Result<()> {
        self.0
            .wait_connected(Some(timeout))
            .map_err(io::Error::from)
    }

    fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.send(buf).map(|_| ()).map_err(io::Error::from)
    }

    fn send_message_from_fd(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        max: usize,
        header: &dyn Fn(usize) -> [u8; crate::proto::MSG_HEADER_SIZE],
    ) -> Result<crate::channel::FromFd, crate::channel::FromFdError> {
        use crate::channel::{FromFd, FromFdError};
        match self.0.send_framed_from_fd(fd, max, header) {
            Ok(0) => Ok(FromFd::Eof),
            Ok(n) => Ok(FromFd::Sent(n)),
            Err(vchan::Error::WouldBlock) => Ok(FromFd::NoRoom),
            Err(vchan::Error::Io {
                step: "read from fd",
                source,
            }) => Err(FromFdError::Fd(source)),
            Err(e) => Err(FromFdError::Channel(e.into())),
        }
    }

    fn read_ready(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.0.peek_data_ready()?);
        if n == 0 {
            return Ok(0);
        }
        self.0.recv(&mut buf[..n]).map_err(io::Error::from)
    }

    fn data_ready(&mut self) -> io::Result<usize> {
        Ok(self.0.data_ready()?)
    }

    fn buffer_space(&mut self) -> io::Result<usize> {
        Ok(self.0.buffer_space()?)
    }

    fn peek_data_ready(&mut self) -> io::Result<usize> {
        Ok(self.0.peek_data_ready()?)
    }

    fn peek_buffer_space(&mut self) -> io::Result<usize> {
        Ok(self.0.peek_buffer_space()?)
    }

    fn spin_for_data(&mut self, want: usize) -> io::Result<bool> {
        Ok(self.0.spin_for_data(want)?)
    }

    fn spin_for_space(&mut self, want: usize) -> io::Result<bool> {
        Ok(self.0.spin_for_space(want)?)
    }

    fn is_open(&mut self) -> bool {
        self.0.is_open()
    }

    fn poll_events(&self) -> nix::poll::PollFlags {
        // The transport knows: the event channel, or on the socket
        // transport POLLOUT while output is held back and no POLLIN while
        // the receive buffer is full (a slow local reader must not make
        // the loop spin).
        self.0.poll_interest()
    }

    fn wait(&mut self) -> io::Result<()> {
        Ok(self.0.consume_events()?)
    }
}
