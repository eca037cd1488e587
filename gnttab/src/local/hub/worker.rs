//! The hub thread: its connections, and one request of a connection
//! answered against the grant table.

use super::*;

pub(super) struct Conn {
    pub(super) sock: OwnedFd,
    pub(super) obj: Obj,
    pub(super) dead: bool,
}

pub(super) struct Worker {
    pub(super) listener: OwnedFd,
    pub(super) wake: OwnedFd,
    pub(super) shared: Arc<Shared>,
    pub(super) events: Box<dyn Events>,
    pub(super) conns: Vec<Conn>,
    pub(super) backoff_until: Option<Instant>,
}

/// A reply: bytes and the descriptors to pass with them.
pub(super) type Reply = (Vec<u8>, Vec<OwnedFd>);

pub(super) fn status(e: Errno) -> Reply {
    let mut w = Writer::default();
    w.i32(e as i32);
    (w.0, Vec::new())
}

pub(super) fn ok() -> Reply {
    status_ok(Writer::default())
}

pub(super) fn status_ok(mut payload: Writer) -> Reply {
    let mut w = Writer::default();
    w.i32(0);
    w.0.append(&mut payload.0);
    (w.0, Vec::new())
}

impl Worker {
    pub(super) fn run(mut self) {
        let mut buf = vec![0u8; MAX_PACKET];
        while !self.shared.stop.load(Ordering::SeqCst) {
            let ready = self.wait();
            let Some((accept, conn_ready)) = ready else {
                continue;
            };
            if accept {
                self.accept();
            }
            for i in conn_ready {
                self.serve(i, &mut buf);
            }
            self.reap();
        }
        // Shutdown: close every connection and drop the grant table. No
        // notify: the hub going away is not a sharer or mapper letting go.
        let mut state = self.shared.lock();
        state.connections = 0;
        state.maps = 0;
        state.grants.clear();
        state.shares.clear();
        state.counted.clear();
        state.entries.clear();
        drop(state);
        self.conns.clear();
    }

    /// Polls; returns whether to accept and which connections are ready.
    pub(super) fn wait(&mut self) -> Option<(bool, Vec<usize>)> {
        let listening = self.backoff_until.is_none_or(|t| Instant::now() >= t);
        if listening {
            self.backoff_until = None;
        }
        let base = 1 + usize::from(listening);
        let mut pfds = Vec::with_capacity(self.conns.len() + base);
        pfds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
        if listening {
            pfds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
        }
        for c in &self.conns {
            pfds.push(PollFd::new(c.sock.as_fd(), PollFlags::POLLIN));
        }
        let timeout = if listening {
            PollTimeout::NONE
        } else {
            PollTimeout::try_from(ACCEPT_BACKOFF).unwrap_or(PollTimeout::NONE)
        };
        match poll(&mut pfds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => return None,
            Err(_) => {
                // Should not happen; do not spin.
                std::thread::sleep(Duration::from_millis(10));
                return None;
            }
        }
        let ready: Vec<bool> = pfds
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(pfds);
        if ready[0] {
            let mut b = [0u8; 64];
            while matches!(nix::unistd::read(&self.wake, &mut b), Ok(n) if n > 0) {}
        }
        let conns = (0..self.conns.len()).filter(|i| ready[i + base]).collect();
        Some((listening && ready[1], conns))
    }

    pub(super) fn accept(&mut self) {
        // A bounded batch per round, so that connecting clients cannot starve
        // the others.
        for _ in 0..64 {
            match accept4(
                self.listener.as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => {
                    // SAFETY: accept4 just returned this new descriptor; nothing else owns it.
                    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
                    self.conns.push(Conn {
                        sock,
                        obj: Obj::Fresh,
                        dead: false,
                    });
                    self.shared.lock().connections += 1;
                }
                Err(Errno::EINTR | Errno::ECONNABORTED | Errno::EPROTO) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: try again later.
                    self.backoff_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Reads and answers one request on connection `i`.
    pub(super) fn serve(&mut self, i: usize, buf: &mut [u8]) {
        let conn = &mut self.conns[i];
        let packet = match recv_packet(conn.sock.as_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EAGAIN) => return,
            Err(_) | Ok(None) => {
                conn.dead = true;
                return;
            }
            Ok(Some(p)) => p,
        };
        if packet.truncated {
            conn.dead = true;
            return;
        }
        let Ok(req) = Request::decode(&buf[..packet.len]) else {
            conn.dead = true;
            return;
        };
        let Some((bytes, fds)) = self.handle(i, req, packet.fds) else {
            self.conns[i].dead = true;
            return;
        };
        let conn = &mut self.conns[i];
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // Never block on a client that does not read its replies.
        if send_packet(conn.sock.as_fd(), &bytes, &raw, MsgFlags::MSG_DONTWAIT).is_err() {
            conn.dead = true;
        }
        drop(fds);
    }

    /// Handles a request; `None` is a protocol violation that ends the
    /// connection.
    pub(super) fn handle(&mut self, i: usize, req: Request, fds: Vec<OwnedFd>) -> Option<Reply> {
        let conn = &mut self.conns[i];
        let mut state = self.shared.lock();
        match (req, &mut conn.obj) {
            (
                Request::Share {
                    dom,
                    peer,
                    writable,
                    count,
                },
                Obj::Fresh,
            ) => Some(match state.share(dom, peer, writable, count, fds) {
                Ok((id, refs)) => {
                    conn.obj = Obj::Share {
                        id,
                        dom,
                        notify: None,
                    };
                    let mut w = Writer::default();
                    w.u32(refs.len() as u32);
                    for r in refs {
                        w.u32(r);
                    }
                    status_ok(w)
                }
                Err(e) => status(e),
            }),
            (
                Request::Map {
                    dom,
                    granter,
                    writable,
                    refs,
                },
                Obj::Fresh,
            ) if fds.is_empty() => Some(match state.map(dom, granter, writable, refs) {
                Ok((rec, reply)) => {
                    conn.obj = Obj::Map {
                        dom,
                        rec,
                        notify: None,
                    };
                    (reply, Vec::new())
                }
                Err(e) => status(e),
            }),
            (Request::Fds { start }, Obj::Map { rec, .. }) if fds.is_empty() => {
                let start = start as usize;
                if start >= rec.shares.len() {
                    return None;
                }
                let end = rec.shares.len().min(start + FDS_PER_REPLY);
                let mut out = Vec::with_capacity(end - start);
                for id in &rec.shares[start..end] {
                    let file = &state.shares.get(id)?.file;
                    let fd = if rec.writable {
                        file.as_fd().try_clone_to_owned()
                    } else {
                        reopen_read_only(file).map_err(std::io::Error::from)
                    };
                    match fd {
                        Ok(fd) => out.push(fd),
                        Err(e) => {
                            let errno = e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
                            return Some(status(errno));
                        }
                    }
                }
                let mut w = Writer::default();
                w.u32(out.len() as u32);
                let (bytes, _) = status_ok(w);
                Some((bytes, out))
            }
            (Request::Notify { offset, port }, Obj::Share { id, dom, notify })
                if fds.is_empty() =>
            {
                let len = state.shares.get(id)?.refs.len() * PAGE_SIZE;
                if offset as usize >= len {
                    return Some(status(Errno::EINVAL));
                }
                match self.events.hold(*dom, port) {
                    Ok(held) => {
                        *notify = Some(Notify {
                            offset: offset as usize,
                            held,
                        });
                        Some(ok())
                    }
                    Err(_) => Some(status(Errno::EINVAL)),
                }
            }
            (Request::Notify { offset, port }, Obj::Map { dom, rec, notify }) if fds.is_empty() => {
                // CLEAR_BYTE on a read-only mapping: EINVAL, as gntdev says.
                if !rec.writable || offset as usize >= rec.refs.len() * PAGE_SIZE {
                    return Some(status(Errno::EINVAL));
                }
                match self.events.hold(*dom, port) {
                    Ok(held) => {
                        *notify = Some(Notify {
                            offset: offset as usize,
                            held,
                        });
                        Some(ok())
                    }
                    Err(_) => Some(status(Errno::EINVAL)),
                }
            }
            (Request::Release, Obj::Share { .. } | Obj::Map { .. }) if fds.is_empty() => {
                let obj = std::mem::replace(&mut conn.obj, Obj::Done);
                release(&mut state, obj, false);
                // Nothing can follow; close after the reply.
                conn.dead = true;
                Some(ok())
            }
            _ => None,
        }
    }

    /// Drops dead connections, releasing what they held as a process death
    /// would.
    pub(super) fn reap(&mut self) {
        if !self.conns.iter().any(|c| c.dead) {
            return;
        }
        let mut state = self.shared.lock();
        let mut kept = Vec::with_capacity(self.conns.len());
        for mut c in self.conns.drain(..) {
            if c.dead {
                let obj = std::mem::replace(&mut c.obj, Obj::Done);
                release(&mut state, obj, true);
                state.connections = state.connections.saturating_sub(1);
            } else {
                kept.push(c);
            }
        }
        self.conns = kept;
    }
}

/// Lets go of a connection's object. `died`: the client went away without
/// releasing it (process death, or a protocol violation).
pub(super) fn release(state: &mut State, obj: Obj, died: bool) {
    match obj {
        Obj::Share { id, notify, .. } => state.release_share(id, notify),
        Obj::Map { rec, notify, .. } => state.unmap(rec, notify, died),
        Obj::Fresh | Obj::Done => {}
    }
}
