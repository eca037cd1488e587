//! The async face of a vchan (feature `tokio`): connect without blocking a
//! thread, and [`AsyncVchan`] with tokio's `AsyncRead` / `AsyncWrite`.
//!
//! Readiness comes from the vchan's fd: the event channel for the shared-
//! memory transports (readable when an event is pending: data written,
//! space freed, connect, close), the socket for the socket transport.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{DomId, Error, Result, Transport, Vchan};

/// Registers a duplicate of `fd` with the reactor. The `AsyncFd` owns the
/// duplicate, so the descriptor it watches stays open and the same for its
/// whole life — the I/O-safety condition for which tokio deprecated the
/// unchecked `AsyncFd::new` (it holds for an owned fd). The duplicate shares
/// the open file description, hence its readiness.
#[allow(deprecated)]
fn watch(fd: BorrowedFd<'_>) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd.try_clone_to_owned()?)
}

impl Vchan {
    /// Async client connect: waits (without blocking a thread) at most
    /// `timeout` for the server, like [`Vchan::client`].
    ///
    /// ```no_run
    /// # async fn f() -> vchan::Result<()> {
    /// let t = vchan::Transport::from_env()?;
    /// let v = vchan::Vchan::client_async(&t, 0, 512, std::time::Duration::from_secs(30)).await?;
    /// let mut v = vchan::AsyncVchan::new(v)?;
    /// # Ok(()) }
    /// ```
    pub async fn client_async(
        transport: &Transport,
        peer: DomId,
        port: u32,
        timeout: Duration,
    ) -> Result<Vchan> {
        let mut c = Vchan::client_start(transport, peer, port)?;
        let fd = watch(c.as_fd()).map_err(|e| Error::io("register connect fd", e))?;
        let work = async {
            loop {
                if let Some(v) = c.poll()? {
                    return Ok(v);
                }
                match c.retry_interval() {
                    Some(d) => tokio::time::sleep(d).await,
                    None => {
                        let mut g = fd
                            .readable()
                            .await
                            .map_err(|e| Error::io("wait for watch", e))?;
                        g.clear_ready();
                    }
                }
            }
        };
        let r = tokio::time::timeout(timeout, work).await;
        drop(fd);
        r.unwrap_or(Err(Error::Timeout {
            step: "wait for vchan server",
            secs: timeout.as_secs(),
        }))
    }

    /// Server: waits without blocking a thread until the client connects.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use vchan::{LocalXen, Vchan};
    /// # let dir = tempfile::tempdir()?;
    /// let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// let mut srv = Vchan::server(&xen.transport(1), 2, 4242, 4096, 4096)?;
    /// let t2 = xen.transport(2);
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// rt.block_on(async {
    ///     let cli = Vchan::client_async(&t2, 1, 4242, Duration::from_secs(10));
    ///     let (cli, srv_ok) = tokio::join!(cli, srv.wait_connected_async(Some(Duration::from_secs(10))));
    ///     cli.and(srv_ok)
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn wait_connected_async(&mut self, timeout: Option<Duration>) -> Result<()> {
        let work = async {
            loop {
                if self.poll_connected()? {
                    return Ok(());
                }
                let fd = watch(self.as_fd()).map_err(|e| Error::io("register vchan fd", e))?;
                let mut g = fd
                    .readable()
                    .await
                    .map_err(|e| Error::io("wait for client", e))?;
                g.clear_ready();
            }
        };
        match timeout {
            None => work.await,
            Some(t) => tokio::time::timeout(t, work)
                .await
                .unwrap_or(Err(Error::Timeout {
                    step: "wait for vchan client",
                    secs: t.as_secs(),
                })),
        }
    }
}

/// A connected vchan with tokio's `AsyncRead` / `AsyncWrite`.
#[derive(Debug)]
pub struct AsyncVchan {
    fd: AsyncFd<OwnedFd>,
    v: Vchan,
}

impl AsyncVchan {
    /// Wraps a connected vchan (switched to non-blocking mode).
    pub fn new(mut v: Vchan) -> Result<AsyncVchan> {
        v.set_blocking(false);
        let fd = watch(v.as_fd()).map_err(|e| Error::io("register vchan fd", e))?;
        Ok(AsyncVchan { fd, v })
    }

    /// The vchan inside.
    pub fn get_mut(&mut self) -> &mut Vchan {
        &mut self.v
    }

    /// Gives the vchan back (in non-blocking mode).
    pub fn into_inner(self) -> Vchan {
        self.v
    }

    fn poll_io<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: bool,
        mut op: impl FnMut(&mut Vchan) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            // Try first: readiness only says that something changed since
            // the last try, not that nothing can be done now.
            if let Err(e) = self.v.consume_events() {
                return Poll::Ready(Err(e.into()));
            }
            match op(&mut self.v) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
            // The failed try requested a notification (and re-checked the
            // ring after requesting it), so the next change arrives as an
            // event: wait for it. Shared memory signals progress of either
            // kind by an event (read readiness); a socket's writes need
            // writability.
            let mut guard = if write && self.v.is_socket() {
                ready!(self.fd.poll_write_ready(cx))?
            } else {
                ready!(self.fd.poll_read_ready(cx))?
            };
            guard.clear_ready();
        }
    }
}

impl AsyncRead for AsyncVchan {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let n = ready!(me.poll_io(cx, false, |v| {
            let dst = buf.initialize_unfilled();
            v.read_some(dst).map_err(io::Error::from)
        }))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for AsyncVchan {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_io(cx, true, |v| v.write_some(buf).map_err(io::Error::from))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
