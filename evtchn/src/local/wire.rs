//! The messages between a local client and the hub (`SOCK_SEQPACKET`, one
//! message per packet, fields `u32` in native byte order, like the port
//! numbers on the real device).
//!
//! * Connect (client → hub, first packet, 16 bytes): `op`, own domain id,
//!   `a`, `b`. `op` is [`OP_BIND_UNBOUND`] (`a` = remote domain),
//!   [`OP_BIND_INTERDOMAIN`] (`a` = remote domain, `b` = remote port) or
//!   [`OP_STATUS`] (`a` = port of the own domain).
//! * Bind reply (hub → client, 12 bytes): errno (0 = success), local port,
//!   and 1 if an event packet follows at once (the interdomain binder's
//!   wake-up; the client waits for it so that its fd is readable when the
//!   bind returns, as the device's is), else 0. After it the connection carries [`Msg`]s from the client (8 bytes:
//!   op, local port) and events from the hub (4 bytes: local port).
//! * Status reply (hub → client, 16 bytes): errno, state (0 closed,
//!   1 unbound, 2 interdomain), remote domain, remote port. The hub closes
//!   the connection after it.

use crate::{DomId, Port, PortStatus};

/// Connect: allocate a port that domain `a` may bind to.
pub(crate) const OP_BIND_UNBOUND: u32 = 1;
/// Connect: bind to port `b` of domain `a`.
pub(crate) const OP_BIND_INTERDOMAIN: u32 = 2;
/// Connect: ask for the state of port `a` of the own domain (one-shot).
pub(crate) const OP_STATUS: u32 = 3;

/// After the bind: fire the event at the peer.
pub(crate) const MSG_NOTIFY: u32 = 1;
/// After the bind: re-arm (unmask) the port after consuming an event.
pub(crate) const MSG_UNMASK: u32 = 2;

/// Size of a connect packet.
pub(crate) const CONNECT_LEN: usize = 16;
/// Size of a bind reply.
pub(crate) const BIND_REPLY_LEN: usize = 12;
/// Size of a status reply.
pub(crate) const STATUS_REPLY_LEN: usize = 16;
/// Size of a client message after the bind.
pub(crate) const MSG_LEN: usize = 8;
/// Size of an event packet.
pub(crate) const EVENT_LEN: usize = 4;

/// Receive buffers are this big so that an oversized packet shows up as a
/// wrong length instead of being silently cut to the expected size.
pub(crate) const RECV_BUF: usize = 64;

/// Domain ids from here on are reserved by Xen (`DOMID_FIRST_RESERVED`).
pub(crate) const DOMID_FIRST_RESERVED: u32 = 0x7FF0;

fn put(buf: &mut [u8], words: &[u32]) {
    for (chunk, w) in buf.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
}

/// Reads the `N` native-endian words of a packet that must be exactly
/// `4 * N` bytes long.
pub(crate) fn words<const N: usize>(pkt: &[u8]) -> Option<[u32; N]> {
    if pkt.len() != 4 * N {
        return None;
    }
    let mut out = [0u32; N];
    for (w, chunk) in out.iter_mut().zip(pkt.chunks_exact(4)) {
        *w = u32::from_ne_bytes(chunk.try_into().ok()?);
    }
    Some(out)
}

/// A connect packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Connect {
    BindUnbound {
        dom: DomId,
        remote: DomId,
    },
    BindInterdomain {
        dom: DomId,
        remote: DomId,
        remote_port: Port,
    },
    Status {
        dom: DomId,
        port: Port,
    },
}

/// Why a connect packet was refused. `Garbage` drops the connection;
/// `Invalid` gets an `EINVAL` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectError {
    Garbage,
    Invalid,
}

fn domid(w: u32) -> Result<DomId, ConnectError> {
    if w >= DOMID_FIRST_RESERVED {
        return Err(ConnectError::Invalid);
    }
    DomId::try_from(w).map_err(|_| ConnectError::Invalid)
}

impl Connect {
    pub(crate) fn encode(&self) -> [u8; CONNECT_LEN] {
        let w = match *self {
            Connect::BindUnbound { dom, remote } => [OP_BIND_UNBOUND, dom.into(), remote.into(), 0],
            Connect::BindInterdomain {
                dom,
                remote,
                remote_port,
            } => [OP_BIND_INTERDOMAIN, dom.into(), remote.into(), remote_port],
            Connect::Status { dom, port } => [OP_STATUS, dom.into(), port, 0],
        };
        let mut buf = [0u8; CONNECT_LEN];
        put(&mut buf, &w);
        buf
    }

    pub(crate) fn decode(pkt: &[u8]) -> Result<Connect, ConnectError> {
        let [op, dom, a, b] = words::<4>(pkt).ok_or(ConnectError::Garbage)?;
        if !matches!(op, OP_BIND_UNBOUND | OP_BIND_INTERDOMAIN | OP_STATUS) {
            return Err(ConnectError::Garbage);
        }
        let dom = domid(dom)?;
        Ok(match op {
            OP_BIND_UNBOUND => Connect::BindUnbound {
                dom,
                remote: domid(a)?,
            },
            OP_BIND_INTERDOMAIN => Connect::BindInterdomain {
                dom,
                remote: domid(a)?,
                remote_port: b,
            },
            _ => Connect::Status { dom, port: a },
        })
    }
}

pub(crate) fn encode_bind_reply(
    errno: u32,
    port: Port,
    event_follows: bool,
) -> [u8; BIND_REPLY_LEN] {
    let mut buf = [0u8; BIND_REPLY_LEN];
    put(&mut buf, &[errno, port, event_follows.into()]);
    buf
}

pub(crate) fn encode_status_reply(errno: u32, st: PortStatus) -> [u8; STATUS_REPLY_LEN] {
    let w = match st {
        PortStatus::Closed => [errno, 0, 0, 0],
        PortStatus::Unbound { remote } => [errno, 1, remote.into(), 0],
        PortStatus::Interdomain {
            remote,
            remote_port,
        } => [errno, 2, remote.into(), remote_port],
    };
    let mut buf = [0u8; STATUS_REPLY_LEN];
    put(&mut buf, &w);
    buf
}

/// Decodes a status reply: `Ok(Err(errno))` for a refusal, `None` for garbage.
pub(crate) fn decode_status_reply(pkt: &[u8]) -> Option<Result<PortStatus, u32>> {
    let [errno, state, remote, rport] = words::<4>(pkt)?;
    if errno != 0 {
        return Some(Err(errno));
    }
    let remote = DomId::try_from(remote).ok()?;
    Some(Ok(match state {
        0 => PortStatus::Closed,
        1 => PortStatus::Unbound { remote },
        2 => PortStatus::Interdomain {
            remote,
            remote_port: rport,
        },
        _ => return None,
    }))
}

pub(crate) fn encode_msg(op: u32, port: Port) -> [u8; MSG_LEN] {
    let mut buf = [0u8; MSG_LEN];
    put(&mut buf, &[op, port]);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_round_trips() {
        for c in [
            Connect::BindUnbound { dom: 1, remote: 2 },
            Connect::BindInterdomain {
                dom: 0,
                remote: 7,
                remote_port: 99,
            },
            Connect::Status { dom: 3, port: 4 },
        ] {
            assert_eq!(Connect::decode(&c.encode()), Ok(c));
        }
    }

    #[test]
    fn connect_rejects_wrong_sizes_and_ops() {
        let good = Connect::BindUnbound { dom: 1, remote: 2 }.encode();
        assert_eq!(Connect::decode(&good[..15]), Err(ConnectError::Garbage));
        assert_eq!(Connect::decode(&[0; 17]), Err(ConnectError::Garbage));
        assert_eq!(Connect::decode(&[]), Err(ConnectError::Garbage));
        let mut bad = good;
        bad[..4].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(Connect::decode(&bad), Err(ConnectError::Garbage));
    }

    #[test]
    fn reserved_domids_are_invalid() {
        let mut pkt = Connect::BindUnbound { dom: 1, remote: 2 }.encode();
        pkt[4..8].copy_from_slice(&0x7FF0u32.to_ne_bytes());
        assert_eq!(Connect::decode(&pkt), Err(ConnectError::Invalid));
        let mut pkt = Connect::BindUnbound { dom: 1, remote: 2 }.encode();
        pkt[8..12].copy_from_slice(&0x1_0000u32.to_ne_bytes());
        assert_eq!(Connect::decode(&pkt), Err(ConnectError::Invalid));
    }

    #[test]
    fn status_reply_round_trips() {
        for st in [
            PortStatus::Closed,
            PortStatus::Unbound { remote: 5 },
            PortStatus::Interdomain {
                remote: 6,
                remote_port: 8,
            },
        ] {
            assert_eq!(
                decode_status_reply(&encode_status_reply(0, st)),
                Some(Ok(st))
            );
        }
        assert_eq!(
            decode_status_reply(&encode_status_reply(22, PortStatus::Closed)),
            Some(Err(22))
        );
        let mut bad = encode_status_reply(0, PortStatus::Closed);
        bad[4..8].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(decode_status_reply(&bad), None);
    }
}
