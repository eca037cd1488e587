//! The fixed-size part of the wire format: message types (docs/qrexec.md §4),
//! `msg_header` and the parameter structs (docs/qrexec.md §5), the field
//! codecs they share, the small encoders (HELLO, data, exit code) and HELLO
//! negotiation (docs/qrexec.md §6).

use super::*;

/// A qrexec message type (docs/qrexec.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    /// `MSG_DATA_STDIN`: client → service data; `len = 0` is EOF.
    DataStdin = 0x190,
    /// `MSG_DATA_STDOUT`: service → client data; `len = 0` is EOF.
    DataStdout = 0x191,
    /// `MSG_DATA_STDERR`: service → client error output; `len = 0` is EOF.
    DataStderr = 0x192,
    /// `MSG_DATA_EXIT_CODE`: the service's exit status (4-byte signed int).
    DataExitCode = 0x193,
    /// `MSG_EXEC_CMDLINE`: run a command (daemon → agent).
    ExecCmdline = 0x200,
    /// `MSG_JUST_EXEC`: run a command with stdio on /dev/null.
    JustExec = 0x201,
    /// `MSG_SERVICE_CONNECT`: connect a pending request.
    ServiceConnect = 0x202,
    /// `MSG_SERVICE_REFUSED`: refuse a pending request.
    ServiceRefused = 0x203,
    /// `MSG_TRIGGER_SERVICE`: v2 request on the control vchan.
    TriggerService = 0x210,
    /// `MSG_CONNECTION_TERMINATED`: a data connection ended.
    ConnectionTerminated = 0x211,
    /// `MSG_TRIGGER_SERVICE3`: v3 request.
    TriggerService3 = 0x212,
    /// `MSG_TRIGGER_SERVICE4`: v4 request.
    TriggerService4 = 0x213,
    /// `MSG_HELLO`: version announcement on every vchan.
    Hello = 0x300,
}

impl MsgType {
    /// The type for a raw wire value, if it is one of the known types.
    ///
    /// ```
    /// # use qrexec::proto::MsgType;
    /// assert_eq!(MsgType::from_u32(0x191), Some(MsgType::DataStdout));
    /// assert_eq!(MsgType::from_u32(0x999), None);
    /// ```
    pub fn from_u32(value: u32) -> Option<MsgType> {
        Some(match value {
            0x190 => MsgType::DataStdin,
            0x191 => MsgType::DataStdout,
            0x192 => MsgType::DataStderr,
            0x193 => MsgType::DataExitCode,
            0x200 => MsgType::ExecCmdline,
            0x201 => MsgType::JustExec,
            0x202 => MsgType::ServiceConnect,
            0x203 => MsgType::ServiceRefused,
            0x210 => MsgType::TriggerService,
            0x211 => MsgType::ConnectionTerminated,
            0x212 => MsgType::TriggerService3,
            0x213 => MsgType::TriggerService4,
            0x300 => MsgType::Hello,
            _ => return None,
        })
    }

    /// The raw wire value.
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

pub(super) fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtoError> {
    if b.len() < n {
        Err(ProtoError::Truncated {
            what,
            needed: n,
            got: b.len(),
        })
    } else {
        Ok(())
    }
}

/// `msg_header` (docs/qrexec.md §5.1): a type and the payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    /// Raw message type (see [`MsgType`]).
    pub ty: u32,
    /// Payload length in bytes, header not included.
    pub len: u32,
}

impl MsgHeader {
    /// A header for a known type.
    pub fn new(ty: MsgType, len: u32) -> MsgHeader {
        MsgHeader {
            ty: ty.as_u32(),
            len,
        }
    }

    /// The 8 wire bytes.
    ///
    /// ```
    /// # use qrexec::proto::{MsgHeader, MsgType};
    /// assert_eq!(MsgHeader::new(MsgType::DataStdin, 0).encode(), [0x90, 1, 0, 0, 0, 0, 0, 0]);
    /// ```
    pub fn encode(&self) -> [u8; MSG_HEADER_SIZE] {
        let mut b = [0u8; MSG_HEADER_SIZE];
        b[..4].copy_from_slice(&self.ty.to_le_bytes());
        b[4..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decode the first 8 bytes of `b`.
    pub fn decode(b: &[u8]) -> Result<MsgHeader, ProtoError> {
        need("msg_header", b, MSG_HEADER_SIZE)?;
        Ok(MsgHeader {
            ty: get_u32(b, 0),
            len: get_u32(b, 4),
        })
    }
}

/// The connection parameters the agent sends after a call was accepted: the
/// fixed 8 bytes of `exec_params` (docs/qrexec.md §5.3, §7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionParams {
    /// Domain id of the peer that will connect to our data vchan server.
    pub connect_domain: u32,
    /// Data vchan port.
    pub connect_port: u32,
}

impl ConnectionParams {
    /// The 8 wire bytes.
    ///
    /// ```
    /// # use qrexec::proto::ConnectionParams;
    /// let p = ConnectionParams { connect_domain: 7, connect_port: 513 };
    /// assert_eq!(p.encode(), [7, 0, 0, 0, 1, 2, 0, 0]);
    /// ```
    pub fn encode(&self) -> [u8; EXEC_PARAMS_SIZE] {
        let mut b = [0u8; EXEC_PARAMS_SIZE];
        b[..4].copy_from_slice(&self.connect_domain.to_le_bytes());
        b[4..].copy_from_slice(&self.connect_port.to_le_bytes());
        b
    }

    /// Decode exactly 8 bytes.
    pub fn decode(b: &[u8]) -> Result<ConnectionParams, ProtoError> {
        need("exec_params", b, EXEC_PARAMS_SIZE)?;
        if b.len() > EXEC_PARAMS_SIZE {
            return Err(ProtoError::TrailingBytes {
                what: "exec_params",
                extra: b.len() - EXEC_PARAMS_SIZE,
            });
        }
        Ok(ConnectionParams {
            connect_domain: get_u32(b, 0),
            connect_port: get_u32(b, 4),
        })
    }
}

/// `exec_params` with its command line (docs/qrexec.md §5.3), as carried by
/// `MSG_EXEC_CMDLINE`/`MSG_JUST_EXEC`/`MSG_CONNECTION_TERMINATED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecParams {
    /// Where to connect.
    pub params: ConnectionParams,
    /// Command line without its terminating NUL (empty for TERMINATED).
    pub cmdline: Vec<u8>,
}

impl ExecParams {
    /// Payload bytes: the 8 fixed bytes, then the command line and its NUL
    /// (nothing after the fixed part when the command line is empty).
    pub fn encode_payload(&self) -> Result<Vec<u8>, ProtoError> {
        if self.cmdline.contains(&0) {
            return Err(ProtoError::Unencodable {
                what: "cmdline",
                why: "contains a NUL byte",
            });
        }
        if self.cmdline.len() + 1 > MAX_QREXEC_CMD_LEN {
            return Err(ProtoError::Unencodable {
                what: "cmdline",
                why: "longer than MAX_QREXEC_CMD_LEN",
            });
        }
        let mut out = self.params.encode().to_vec();
        if !self.cmdline.is_empty() {
            out.extend_from_slice(&self.cmdline);
            out.push(0);
        }
        Ok(out)
    }

    /// Decode a payload: 8 bytes, then (if any) a command line whose last byte
    /// must be its only NUL.
    pub fn decode_payload(b: &[u8]) -> Result<ExecParams, ProtoError> {
        need("exec_params", b, EXEC_PARAMS_SIZE)?;
        let params = ConnectionParams::decode(&b[..EXEC_PARAMS_SIZE])?;
        let rest = &b[EXEC_PARAMS_SIZE..];
        let cmdline = if rest.is_empty() {
            Vec::new()
        } else {
            c_string_tail("cmdline", rest)?.to_vec()
        };
        Ok(ExecParams { params, cmdline })
    }
}

/// `service_params` (docs/qrexec.md §5.4): a 32-byte NUL-padded request identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceParams {
    /// The identifier, without padding.
    pub ident: Vec<u8>,
}

impl ServiceParams {
    /// The 32 wire bytes (at most 31 identifier bytes, then NULs).
    pub fn encode(&self) -> Result<[u8; SERVICE_PARAMS_SIZE], ProtoError> {
        let mut b = [0u8; SERVICE_PARAMS_SIZE];
        put_fixed("ident", &mut b, &self.ident, false)?;
        Ok(b)
    }

    /// Decode 32 bytes; the identifier ends at the first NUL (the last byte is
    /// treated as NUL whatever it holds, as dom0 does).
    pub fn decode(b: &[u8]) -> Result<ServiceParams, ProtoError> {
        need("service_params", b, SERVICE_PARAMS_SIZE)?;
        Ok(ServiceParams {
            ident: fixed_field(&b[..SERVICE_PARAMS_SIZE]).to_vec(),
        })
    }
}

/// Copy `value` into a zeroed fixed-size field, leaving room for the NUL.
/// With `truncate`, longer values are cut like C `strncpy(size - 1)`;
/// without it they are an error.
pub(super) fn put_fixed(
    what: &'static str,
    field: &mut [u8],
    value: &[u8],
    truncate: bool,
) -> Result<(), ProtoError> {
    if value.contains(&0) {
        return Err(ProtoError::Unencodable {
            what,
            why: "contains a NUL byte",
        });
    }
    let max = field.len() - 1;
    if value.len() > max && !truncate {
        return Err(ProtoError::Unencodable {
            what,
            why: "too long for its fixed-size field",
        });
    }
    let n = value.len().min(max);
    field[..n].copy_from_slice(&value[..n]);
    Ok(())
}

/// Read a NUL-padded fixed field: the value ends at the first NUL. Like the
/// receivers in dom0, the last byte is treated as NUL whatever it holds.
pub(super) fn fixed_field(field: &[u8]) -> &[u8] {
    let usable = &field[..field.len().saturating_sub(1)];
    match usable.iter().position(|&c| c == 0) {
        Some(i) => &usable[..i],
        None => usable,
    }
}

/// A variable-length string at the end of a payload: the last byte must be
/// NUL and there must be no earlier NUL. Returns the string without its NUL.
pub(super) fn c_string_tail<'a>(what: &'static str, b: &'a [u8]) -> Result<&'a [u8], ProtoError> {
    match b.split_last() {
        Some((0, body)) if !body.contains(&0) => Ok(body),
        Some((0, _)) => Err(ProtoError::MalformedString {
            what,
            why: "has a NUL byte before its end",
        }),
        Some(_) => Err(ProtoError::MalformedString {
            what,
            why: "is not NUL-terminated",
        }),
        None => Err(ProtoError::MalformedString {
            what,
            why: "is empty (no NUL)",
        }),
    }
}

/// The HELLO message announcing `version` (header + `peer_info`, 12 bytes).
///
/// ```
/// assert_eq!(qrexec::proto::encode_hello(3), [0, 3, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0]);
/// ```
pub fn encode_hello(version: u32) -> [u8; MSG_HEADER_SIZE + PEER_INFO_SIZE] {
    let mut b = [0u8; MSG_HEADER_SIZE + PEER_INFO_SIZE];
    b[..8].copy_from_slice(&MsgHeader::new(MsgType::Hello, PEER_INFO_SIZE as u32).encode());
    b[8..].copy_from_slice(&version.to_le_bytes());
    b
}

/// A data message: header plus payload, ready to send.
///
/// ```
/// # use qrexec::proto::{encode_data, MsgType};
/// assert_eq!(encode_data(MsgType::DataStdin, b"hi"), [0x90, 1, 0, 0, 2, 0, 0, 0, b'h', b'i']);
/// ```
pub fn encode_data(ty: MsgType, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MSG_HEADER_SIZE + payload.len());
    out.extend_from_slice(&MsgHeader::new(ty, payload.len() as u32).encode());
    out.extend_from_slice(payload);
    out
}

/// `MSG_DATA_EXIT_CODE` carrying `code` as a 4-byte signed int.
///
/// ```
/// assert_eq!(qrexec::proto::encode_exit_code(42), [0x93, 1, 0, 0, 4, 0, 0, 0, 42, 0, 0, 0]);
/// ```
pub fn encode_exit_code(code: i32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&MsgHeader::new(MsgType::DataExitCode, 4).encode());
    b[8..].copy_from_slice(&code.to_le_bytes());
    b
}

/// The version both ends use: the smaller one, and at least 2 (docs/qrexec.md §6).
///
/// ```
/// # use qrexec::proto::negotiate;
/// assert_eq!(negotiate(4, 3), Ok(3));
/// assert!(negotiate(4, 1).is_err());
/// ```
pub fn negotiate(own: u32, peer: u32) -> Result<u32, ProtoError> {
    let v = own.min(peer);
    if v < MIN_DATA_PROTOCOL_VERSION {
        Err(ProtoError::UnsupportedVersion { peer })
    } else {
        Ok(v)
    }
}

/// Data chunk limit for a negotiated version: 4096 below 3, else 65536.
///
/// ```
/// # use qrexec::proto::chunk_limit;
/// assert_eq!(chunk_limit(2), 4096);
/// assert_eq!(chunk_limit(4), 65536);
/// ```
pub fn chunk_limit(version: u32) -> usize {
    if version < QREXEC_PROTOCOL_V3 {
        MAX_DATA_CHUNK_V2
    } else {
        MAX_DATA_CHUNK_V3
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::padded;

    #[test]
    fn message_type_values_are_pinned() {
        assert_eq!(MsgType::DataStdin.as_u32(), 0x190);
        assert_eq!(MsgType::DataStdout.as_u32(), 0x191);
        assert_eq!(MsgType::DataStderr.as_u32(), 0x192);
        assert_eq!(MsgType::DataExitCode.as_u32(), 0x193);
        assert_eq!(MsgType::ExecCmdline.as_u32(), 0x200);
        assert_eq!(MsgType::JustExec.as_u32(), 0x201);
        assert_eq!(MsgType::ServiceConnect.as_u32(), 0x202);
        assert_eq!(MsgType::ServiceRefused.as_u32(), 0x203);
        assert_eq!(MsgType::TriggerService.as_u32(), 0x210);
        assert_eq!(MsgType::ConnectionTerminated.as_u32(), 0x211);
        assert_eq!(MsgType::TriggerService3.as_u32(), 0x212);
        assert_eq!(MsgType::TriggerService4.as_u32(), 0x213);
        assert_eq!(MsgType::Hello.as_u32(), 0x300);
        for v in 0..0x400 {
            if let Some(t) = MsgType::from_u32(v) {
                assert_eq!(t.as_u32(), v);
            }
        }
    }

    #[test]
    fn golden_hello_and_data_messages() {
        assert_eq!(encode_hello(3), [0x00, 0x03, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(encode_hello(2), [0x00, 0x03, 0, 0, 4, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(encode_hello(4), [0x00, 0x03, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0]);
        assert_eq!(
            encode_data(MsgType::DataStdin, b""),
            [0x90, 0x01, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            encode_data(MsgType::DataStdout, b"abc"),
            [0x91, 0x01, 0, 0, 3, 0, 0, 0, b'a', b'b', b'c']
        );
        assert_eq!(
            encode_data(MsgType::DataStderr, b"e"),
            [0x92, 0x01, 0, 0, 1, 0, 0, 0, b'e']
        );
        assert_eq!(
            encode_exit_code(127),
            [0x93, 0x01, 0, 0, 4, 0, 0, 0, 127, 0, 0, 0]
        );
        assert_eq!(
            encode_exit_code(-1),
            [0x93, 0x01, 0, 0, 4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn golden_connection_and_service_params() {
        let p = ConnectionParams {
            connect_domain: 7,
            connect_port: 513,
        };
        assert_eq!(p.encode(), [7, 0, 0, 0, 0x01, 0x02, 0, 0]);
        assert_eq!(ConnectionParams::decode(&p.encode()).unwrap(), p);
        for n in 0..8 {
            assert!(ConnectionParams::decode(&p.encode()[..n]).is_err());
        }
        assert!(ConnectionParams::decode(&[0; 9]).is_err());

        let e = ExecParams {
            params: p,
            cmdline: b"user:QUBESRPC svc+ src".to_vec(),
        };
        let b = e.encode_payload().unwrap();
        assert_eq!(&b[..8], &p.encode());
        assert_eq!(&b[8..], b"user:QUBESRPC svc+ src\0");
        assert_eq!(ExecParams::decode_payload(&b).unwrap(), e);
        let terminated = ExecParams {
            params: p,
            cmdline: Vec::new(),
        };
        assert_eq!(terminated.encode_payload().unwrap().len(), 8);
        assert!(ExecParams::decode_payload(b"12345678abc").is_err());

        let s = ServiceParams {
            ident: b"SOCKET11".to_vec(),
        };
        let b = s.encode().unwrap();
        assert_eq!(b.to_vec(), padded(b"SOCKET11", 32));
        assert_eq!(ServiceParams::decode(&b).unwrap(), s);
        assert!(
            ServiceParams {
                ident: vec![b'x'; 32]
            }
            .encode()
            .is_err()
        );
    }

    #[test]
    fn negotiation_and_chunk_limits() {
        assert_eq!(negotiate(4, 2), Ok(2));
        assert_eq!(negotiate(4, 3), Ok(3));
        assert_eq!(negotiate(4, 4), Ok(4));
        assert_eq!(negotiate(4, 99), Ok(4));
        assert_eq!(negotiate(2, 4), Ok(2));
        assert_eq!(
            negotiate(4, 1),
            Err(ProtoError::UnsupportedVersion { peer: 1 })
        );
        assert!(negotiate(4, 0).is_err());
        assert_eq!(chunk_limit(2), 4096);
        assert_eq!(chunk_limit(3), 65536);
        assert_eq!(chunk_limit(4), 65536);
    }
}
