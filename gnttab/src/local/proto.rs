//! The local grant hub's wire protocol: one `SOCK_SEQPACKET` packet per
//! message, little-endian integers, strict request/reply.
//!
//! Requests (client → hub), each starting with a `u32` opcode:
//!
//! | op | body | fds |
//! |----|------|-----|
//! | `SHARE` | `u16 dom, u16 peer, u8 writable, 3×pad, u32 count` | the memfd |
//! | `MAP` | `u16 dom, u16 granter, u8 writable, 3×pad, u32 count, u32 refs[count]` | – |
//! | `FDS` | `u32 start` | – |
//! | `NOTIFY` | `u32 byte_offset, u32 port` | – |
//! | `RELEASE` | – | – |
//!
//! `SHARE` or `MAP` is the first message of a connection, and a connection
//! carries one share or one map. Replies start with an `i32` status: 0, or
//! an errno. Payloads of successful replies:
//!
//! * `SHARE`: `u32 count, u32 refs[count]`;
//! * `MAP`: `u32 count, u32 nfds, {u32 fd_index, u32 page}[count]` — page
//!   `i` of the mapping is page `page` of memfd number `fd_index`; the
//!   memfds are fetched with `FDS`;
//! * `FDS`: `u32 n` and `n` descriptors (`SCM_RIGHTS`), memfds `start..start+n`;
//! * `NOTIFY`, `RELEASE`: nothing.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::{DomId, GrantRef};

/// The hub's socket, inside the rendezvous directory.
pub(crate) const SOCKET_NAME: &str = "gnttab.sock";

/// Pages per share, refs per map, and granted pages per domain.
pub(crate) const MAX_PAGES: usize = 1024;

/// Descriptors per `FDS` reply (well below the kernel's `SCM_MAX_FD` of 253).
pub(crate) const FDS_PER_REPLY: usize = 32;

/// The largest packet either side sends: a `MAP` reply with 1024 entries.
pub(crate) const MAX_PACKET: usize = 16 + 8 * MAX_PAGES;

// The largest reply (status, count, nfds, 1024 entries of 8 bytes) and the
// largest request (header, count, 1024 refs) fit.
const _: () = assert!(4 + 4 + 4 + 8 * MAX_PAGES <= MAX_PACKET);
const _: () = assert!(16 + 4 * MAX_PAGES <= MAX_PACKET);

/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`).
/// Receive buffers have room for that many, so control data is never
/// truncated and no received descriptor is lost unclosed.
pub(crate) const SCM_MAX_FD: usize = 253;

pub(crate) const OP_SHARE: u32 = 1;
pub(crate) const OP_MAP: u32 = 2;
pub(crate) const OP_FDS: u32 = 3;
pub(crate) const OP_NOTIFY: u32 = 4;
pub(crate) const OP_RELEASE: u32 = 5;

/// A request, decoded and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Share {
        dom: DomId,
        peer: DomId,
        writable: bool,
        count: u32,
    },
    Map {
        dom: DomId,
        granter: DomId,
        writable: bool,
        refs: Vec<GrantRef>,
    },
    Fds {
        start: u32,
    },
    Notify {
        offset: u32,
        port: u32,
    },
    Release,
}

/// Appends little-endian integers to a buffer.
#[derive(Debug, Default)]
pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// Reads little-endian integers from a received packet; every read is
/// bounds-checked.
#[derive(Debug)]
pub(crate) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Reader(b)
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or("message too short")?;
        self.0 = rest;
        Ok(*head)
    }
    pub fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    pub fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    pub fn i32(&mut self) -> Result<i32, &'static str> {
        Ok(i32::from_le_bytes(self.take()?))
    }
    pub fn bool(&mut self) -> Result<bool, &'static str> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err("bad boolean"),
        }
    }
    /// A count that must be at most `max`; checked before anything is
    /// allocated for it.
    pub fn count(&mut self, max: usize) -> Result<usize, &'static str> {
        let n = self.u32()? as usize;
        if n > max {
            return Err("count too large");
        }
        if self.0.len() < n {
            // Every counted item takes at least one byte.
            return Err("message shorter than its count");
        }
        Ok(n)
    }
    pub fn finish(&self) -> Result<(), &'static str> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes")
        }
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Request::Share {
                dom,
                peer,
                writable,
                count,
            } => {
                w.u32(OP_SHARE).u16(*dom).u16(*peer).u8(u8::from(*writable));
                w.u8(0).u8(0).u8(0).u32(*count);
            }
            Request::Map {
                dom,
                granter,
                writable,
                refs,
            } => {
                w.u32(OP_MAP)
                    .u16(*dom)
                    .u16(*granter)
                    .u8(u8::from(*writable));
                w.u8(0).u8(0).u8(0).u32(refs.len() as u32);
                for r in refs {
                    w.u32(*r);
                }
            }
            Request::Fds { start } => {
                w.u32(OP_FDS).u32(*start);
            }
            Request::Notify { offset, port } => {
                w.u32(OP_NOTIFY).u32(*offset).u32(*port);
            }
            Request::Release => {
                w.u32(OP_RELEASE);
            }
        }
        w.0
    }

    /// Decodes one packet; anything malformed or out of bounds is an error.
    pub fn decode(b: &[u8]) -> Result<Request, &'static str> {
        let mut r = Reader::new(b);
        let req = match r.u32()? {
            OP_SHARE => {
                let dom = r.u16()?;
                let peer = r.u16()?;
                let writable = r.bool()?;
                let _pad = r.take::<3>()?;
                let count = r.u32()?;
                Request::Share {
                    dom,
                    peer,
                    writable,
                    count,
                }
            }
            OP_MAP => {
                let dom = r.u16()?;
                let granter = r.u16()?;
                let writable = r.bool()?;
                let _pad = r.take::<3>()?;
                let n = r.count(MAX_PAGES)?;
                let refs = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
                Request::Map {
                    dom,
                    granter,
                    writable,
                    refs,
                }
            }
            OP_FDS => Request::Fds { start: r.u32()? },
            OP_NOTIFY => Request::Notify {
                offset: r.u32()?,
                port: r.u32()?,
            },
            OP_RELEASE => Request::Release,
            _ => return Err("unknown request"),
        };
        r.finish()?;
        Ok(req)
    }
}

/// One received packet.
#[derive(Debug)]
pub(crate) struct Packet {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The packet did not fit the buffer (`MSG_TRUNC`) or its control data
    /// was cut (`MSG_CTRUNC`).
    pub truncated: bool,
}

/// Sends one packet, with descriptors attached if `fds` is not empty.
pub(crate) fn send_packet(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[RawFd],
    flags: MsgFlags,
) -> Result<(), Errno> {
    let iov = [IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            flags | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(Errno::EMSGSIZE),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives one packet into `buf`. Received descriptors are close-on-exec
/// and owned by the returned [`Packet`], so none can leak. `Ok(None)` is the
/// end of the connection.
pub(crate) fn recv_packet(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> Result<Option<Packet>, Errno> {
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            flags | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let mut fds = Vec::new();
        let mut truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        match msg.cmsgs() {
            Ok(iter) => {
                for c in iter {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in our table for this message; nothing else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
            }
            // Control data cut short: with room for SCM_MAX_FD descriptors
            // this does not happen; treat the packet as garbage.
            Err(_) => truncated = true,
        }
        if msg.bytes == 0 && fds.is_empty() && !truncated {
            return Ok(None);
        }
        return Ok(Some(Packet {
            len: msg.bytes,
            fds,
            truncated,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Share {
                dom: 1,
                peer: 2,
                writable: true,
                count: 257,
            },
            Request::Map {
                dom: 2,
                granter: 1,
                writable: false,
                refs: vec![8, 9, 100],
            },
            Request::Fds { start: 32 },
            Request::Notify {
                offset: 20,
                port: 7,
            },
            Request::Release,
        ];
        for req in reqs {
            assert_eq!(Request::decode(&req.encode()), Ok(req));
        }
    }

    #[test]
    fn malformed_requests_are_refused() {
        assert!(Request::decode(&[]).is_err());
        assert!(Request::decode(&[1, 0]).is_err());
        assert!(Request::decode(&99u32.to_le_bytes()).is_err());
        // trailing bytes
        let mut b = Request::Release.encode();
        b.push(0);
        assert!(Request::decode(&b).is_err());
        // a map that claims more refs than it carries, or more than allowed
        let mut w = Writer::default();
        w.u32(OP_MAP).u16(2).u16(1).u8(1).u8(0).u8(0).u8(0);
        w.u32(5).u32(1);
        assert!(Request::decode(&w.0).is_err());
        let mut w = Writer::default();
        w.u32(OP_MAP).u16(2).u16(1).u8(1).u8(0).u8(0).u8(0);
        w.u32(u32::MAX);
        assert!(Request::decode(&w.0).is_err());
        // a boolean that is neither 0 nor 1
        let mut b = Request::Share {
            dom: 1,
            peer: 2,
            writable: true,
            count: 1,
        }
        .encode();
        b[8] = 2;
        assert!(Request::decode(&b).is_err());
    }

    #[test]
    fn every_truncation_of_a_request_is_refused() {
        let b = Request::Map {
            dom: 2,
            granter: 1,
            writable: true,
            refs: vec![1, 2, 3],
        }
        .encode();
        for n in 0..b.len() {
            assert!(Request::decode(&b[..n]).is_err(), "prefix {n}");
        }
    }
}
