//! qrexec wire format: constants (docs/qrexec.md §3), message types (§4), struct layouts
//! (docs/qrexec.md §5), HELLO negotiation (§6) and a streaming decoder that validates
//! everything a peer sends.
//!
//! Every integer on the wire is a little-endian `u32` (docs/qrexec.md §2). Nothing here
//! does I/O: encoders return bytes, decoders take bytes. That keeps the whole
//! module usable from fuzz targets and property tests.
//!
//! ```
//! use qrexec::proto::{encode_hello, MsgType};
//! let hello = encode_hello(3);
//! assert_eq!(hello, [0x00, 0x03, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0]);
//! assert_eq!(MsgType::from_u32(0x300), Some(MsgType::Hello));
//! ```

use std::fmt;

/// Protocol version 1 (R2, obsolete file-descriptor passing).
pub const QREXEC_PROTOCOL_V1: u32 = 1;
/// Protocol version 2 (R3.0 – R4.0).
pub const QREXEC_PROTOCOL_V2: u32 = 2;
/// Protocol version 3 (R4.1 – R4.2).
pub const QREXEC_PROTOCOL_V3: u32 = 3;
/// Protocol version 4 (R4.3+).
pub const QREXEC_PROTOCOL_V4: u32 = 4;
/// Lowest version a data-channel peer may negotiate (docs/qrexec.md §6 rule 3).
pub const MIN_DATA_PROTOCOL_VERSION: u32 = QREXEC_PROTOCOL_V2;

/// Data payload limit when the negotiated version is below 3.
pub const MAX_DATA_CHUNK_V2: usize = 4096;
/// Data payload limit when the negotiated version is 3 or more.
pub const MAX_DATA_CHUNK_V3: usize = 65536;
/// Upper bound on the variable part of TRIGGER3/TRIGGER4 accepted by agents.
pub const MAX_SERVICE_NAME_LEN: usize = 65000;
/// Upper bound on an `MSG_EXEC_CMDLINE` payload from dom0 clients.
pub const MAX_QREXEC_CMD_LEN: usize = 65535;
/// Port of the control vchan (agent ↔ daemon).
pub const VCHAN_BASE_PORT: u32 = 512;
/// First data vchan port.
pub const VCHAN_BASE_DATA_PORT: u32 = 513;
/// Size of the agent connection table and daemon port tables.
pub const MAX_FDS: usize = 256;
/// Default data vchan ring size per direction (`VCHAN_BUFFER_SIZE`).
pub const VCHAN_BUFFER_SIZE: usize = 65536;
/// Largest ring a vchan can have (2^20); `--buffer-size` above it fails.
pub const MAX_VCHAN_BUFFER_SIZE: usize = 1 << 20;
/// Ring size of the control vchan; a trigger must fit in it with its header.
pub const CONTROL_RING_SIZE: usize = 4096;

/// Exit status for a qrexec infrastructure failure.
pub const QREXEC_EXIT_PROBLEM: i32 = 125;
/// Exit status for a refused call (the client prints `Request refused`).
pub const QREXEC_EXIT_REQUEST_REFUSED: i32 = 126;
/// Exit status when the call was allowed but the service does not exist.
pub const QREXEC_EXIT_SERVICE_NOT_FOUND: i32 = 127;

/// Prefix of service command lines (`QUBESRPC`).
pub const RPC_REQUEST_COMMAND: &str = "QUBESRPC";
/// Prefix that marks a command as not needing a GUI session.
pub const NOGUI_CMD_PREFIX: &str = "nogui:";
/// Default path of the local agent socket.
pub const QREXEC_AGENT_TRIGGER_PATH: &str = "/var/run/qubes/qrexec-agent";

/// Size of [`MsgHeader`] on the wire.
pub const MSG_HEADER_SIZE: usize = 8;
/// Size of `peer_info` (the HELLO payload).
pub const PEER_INFO_SIZE: usize = 4;
/// Size of the fixed part of `exec_params` (the connection parameters).
pub const EXEC_PARAMS_SIZE: usize = 8;
/// Size of `service_params` (a request identifier).
pub const SERVICE_PARAMS_SIZE: usize = 32;
/// Size of the v2 `trigger_service_params` (sent without a header).
pub const TRIGGER_V2_SIZE: usize = 128;
/// Size of the fixed part of `trigger_service_params3`.
pub const TRIGGER3_PARAMS_SIZE: usize = 96;
/// Size of the fixed part of `trigger_service_params4`.
pub const TRIGGER4_PARAMS_SIZE: usize = 160;
/// Size of a domain-name field in v3/v4 triggers.
pub const DOMAIN_FIELD_SIZE: usize = 64;
/// Size of the target-domain field in a v2 trigger.
pub const DOMAIN_FIELD_SIZE_V2: usize = 32;
/// Size of the service-name field in a v2 trigger.
pub const SERVICE_FIELD_SIZE_V2: usize = 64;
/// Size of a request identifier field.
pub const IDENT_FIELD_SIZE: usize = 32;
/// The request id the client always writes; the agent overwrites it.
pub const REQUEST_ID_SOCKET: &[u8] = b"SOCKET";

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

/// Errors in anything decoded from a peer, or in a request we were asked to
/// encode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The input ended before a complete structure was read.
    #[error("truncated {what}: need {needed} bytes, got {got}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// The first message on a data channel was not a valid HELLO.
    #[error("expected MSG_HELLO (type 0x300, len 4), got type {ty:#x} len {len}")]
    BadHello {
        /// Received type.
        ty: u32,
        /// Received length.
        len: u32,
    },
    /// The negotiated version is below 2.
    #[error(
        "incompatible qrexec protocol version {peer} (need at least {MIN_DATA_PROTOCOL_VERSION})"
    )]
    UnsupportedVersion {
        /// The version the peer announced.
        peer: u32,
    },
    /// A data message longer than the negotiated chunk limit.
    #[error("too big data chunk received: type {ty:#x} len {len} > {limit}")]
    ChunkTooBig {
        /// Message type.
        ty: u32,
        /// Announced length.
        len: u32,
        /// Chunk limit of the negotiated version.
        limit: usize,
    },
    /// A message type that is not allowed at this point.
    #[error("unexpected message type {ty:#x} (len {len})")]
    UnexpectedType {
        /// Received type.
        ty: u32,
        /// Announced length.
        len: u32,
    },
    /// A trigger header with the wrong type for the format being decoded.
    #[error("trigger has type {ty:#x}, expected {expected:#x}")]
    WrongTriggerType {
        /// Received type.
        ty: u32,
        /// Expected type.
        expected: u32,
    },
    /// A trigger length outside `params < len <= params + 65000`.
    #[error("trigger length {len} out of range ({min}..={max})")]
    BadTriggerLength {
        /// Announced length.
        len: u32,
        /// Smallest valid length.
        min: usize,
        /// Largest valid length.
        max: usize,
    },
    /// A field that must be NUL-terminated is not, or has a NUL in the middle.
    #[error("malformed {what}: {why}")]
    MalformedString {
        /// Which field.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A value we were asked to encode cannot be represented.
    #[error("cannot encode {what}: {why}")]
    Unencodable {
        /// Which field.
        what: &'static str,
        /// Why.
        why: &'static str,
    },
    /// Bytes left over after a complete structure.
    #[error("{extra} unexpected trailing bytes after {what}")]
    TrailingBytes {
        /// What was decoded.
        what: &'static str,
        /// How many extra bytes.
        extra: usize,
    },
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtoError> {
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
fn put_fixed(
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
fn fixed_field(field: &[u8]) -> &[u8] {
    let usable = &field[..field.len().saturating_sub(1)];
    match usable.iter().position(|&c| c == 0) {
        Some(i) => &usable[..i],
        None => usable,
    }
}

/// A variable-length string at the end of a payload: the last byte must be
/// NUL and there must be no earlier NUL. Returns the string without its NUL.
fn c_string_tail<'a>(what: &'static str, b: &'a [u8]) -> Result<&'a [u8], ProtoError> {
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

/// Which request the client writes to the local agent socket (docs/qrexec.md §16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestFormat {
    /// R4.0: a bare 128-byte `trigger_service_params`, no header.
    V2,
    /// R4.1/R4.2: `MSG_TRIGGER_SERVICE3` + 96 bytes + service name.
    V3,
    /// R4.3+: `MSG_TRIGGER_SERVICE4` + 160 bytes + service name.
    V4,
}

impl RequestFormat {
    /// The protocol version announced in HELLO with this format.
    pub fn protocol_version(self) -> u32 {
        match self {
            RequestFormat::V2 => QREXEC_PROTOCOL_V2,
            RequestFormat::V3 => QREXEC_PROTOCOL_V3,
            RequestFormat::V4 => QREXEC_PROTOCOL_V4,
        }
    }

    /// Longest target name that fits the target field (31 for v2, else 63).
    pub fn max_target_len(self) -> usize {
        match self {
            RequestFormat::V2 => DOMAIN_FIELD_SIZE_V2 - 1,
            _ => DOMAIN_FIELD_SIZE - 1,
        }
    }

    /// Size of the fixed part of the trigger (128, 96 or 160).
    pub fn params_size(self) -> usize {
        match self {
            RequestFormat::V2 => TRIGGER_V2_SIZE,
            RequestFormat::V3 => TRIGGER3_PARAMS_SIZE,
            RequestFormat::V4 => TRIGGER4_PARAMS_SIZE,
        }
    }
}

impl fmt::Display for RequestFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestFormat::V2 => "v2",
            RequestFormat::V3 => "v3",
            RequestFormat::V4 => "v4",
        })
    }
}

/// A service request as written to the local agent (docs/qrexec.md §5.5, §7.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// Which layout.
    pub format: RequestFormat,
    /// `source_domain` (v4 only; empty means "no source qube").
    pub source: Vec<u8>,
    /// `target_domain`.
    pub target: Vec<u8>,
    /// `request_id` (the client always writes `SOCKET`).
    pub request_id: Vec<u8>,
    /// `service_name` (`NAME[+ARG]`), without NUL.
    pub service: Vec<u8>,
}

impl Trigger {
    /// A request as qrexec-client-vm writes it: request id `SOCKET`.
    pub fn new(format: RequestFormat, target: &[u8], service: &[u8], source: &[u8]) -> Trigger {
        Trigger {
            format,
            source: source.to_vec(),
            target: target.to_vec(),
            request_id: REQUEST_ID_SOCKET.to_vec(),
            service: service.to_vec(),
        }
    }

    /// The exact bytes to write to the agent socket, in one buffer.
    ///
    /// Like the C client, fixed-size fields are truncated silently (target to
    /// 63 or 31 bytes, v2 service to 63, source to 63). Callers that want an
    /// error instead validate first ([`crate::names`]). Errors: a NUL byte in
    /// any field, a source qube with v2/v3, a v3/v4 service longer than
    /// [`MAX_SERVICE_NAME_LEN`].
    ///
    /// ```
    /// # use qrexec::proto::{RequestFormat, Trigger};
    /// let b = Trigger::new(RequestFormat::V4, b"work", b"qubes.Filecopy", b"").encode().unwrap();
    /// assert_eq!(&b[..8], &[0x13, 0x02, 0, 0, 0xaf, 0, 0, 0]);
    /// assert_eq!(b.len(), 8 + 175);
    /// ```
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut request_id = [0u8; IDENT_FIELD_SIZE];
        put_fixed("request_id", &mut request_id, &self.request_id, false)?;
        match self.format {
            RequestFormat::V2 => {
                if !self.source.is_empty() {
                    return Err(ProtoError::Unencodable {
                        what: "source_domain",
                        why: "only request format v4 has a source qube",
                    });
                }
                let mut b = vec![0u8; TRIGGER_V2_SIZE];
                put_fixed("service_name", &mut b[..64], &self.service, true)?;
                put_fixed("target_domain", &mut b[64..96], &self.target, true)?;
                b[96..128].copy_from_slice(&request_id);
                Ok(b)
            }
            RequestFormat::V3 | RequestFormat::V4 => {
                if self.service.contains(&0) {
                    return Err(ProtoError::Unencodable {
                        what: "service_name",
                        why: "contains a NUL byte",
                    });
                }
                if self.service.len() + 1 > MAX_SERVICE_NAME_LEN {
                    return Err(ProtoError::Unencodable {
                        what: "service_name",
                        why: "longer than MAX_SERVICE_NAME_LEN",
                    });
                }
                let params = self.format.params_size();
                let len = params + self.service.len() + 1;
                let (ty, offset) = if self.format == RequestFormat::V4 {
                    (MsgType::TriggerService4, DOMAIN_FIELD_SIZE)
                } else {
                    if !self.source.is_empty() {
                        return Err(ProtoError::Unencodable {
                            what: "source_domain",
                            why: "only request format v4 has a source qube",
                        });
                    }
                    (MsgType::TriggerService3, 0)
                };
                let mut b = Vec::with_capacity(MSG_HEADER_SIZE + len);
                put_u32(&mut b, ty.as_u32());
                put_u32(&mut b, len as u32);
                let mut fixed = vec![0u8; params];
                if self.format == RequestFormat::V4 {
                    put_fixed("source_domain", &mut fixed[..64], &self.source, true)?;
                }
                put_fixed(
                    "target_domain",
                    &mut fixed[offset..offset + 64],
                    &self.target,
                    true,
                )?;
                fixed[offset + 64..offset + 96].copy_from_slice(&request_id);
                b.extend_from_slice(&fixed);
                b.extend_from_slice(&self.service);
                b.push(0);
                Ok(b)
            }
        }
    }

    /// Decode a complete request of the given format, validating it like an
    /// agent/daemon would (docs/qrexec.md §7.2, §9.1): header type, length bounds,
    /// truncation, the service NUL rules. Fixed fields end at their first NUL
    /// (the last byte is forced to NUL). Trailing bytes are an error.
    pub fn decode(format: RequestFormat, b: &[u8]) -> Result<Trigger, ProtoError> {
        match format {
            RequestFormat::V2 => {
                need("trigger_service_params", b, TRIGGER_V2_SIZE)?;
                if b.len() > TRIGGER_V2_SIZE {
                    return Err(ProtoError::TrailingBytes {
                        what: "trigger_service_params",
                        extra: b.len() - TRIGGER_V2_SIZE,
                    });
                }
                Ok(Trigger {
                    format,
                    source: Vec::new(),
                    service: fixed_field(&b[..64]).to_vec(),
                    target: fixed_field(&b[64..96]).to_vec(),
                    request_id: fixed_field(&b[96..128]).to_vec(),
                })
            }
            RequestFormat::V3 | RequestFormat::V4 => {
                let hdr = MsgHeader::decode(b)?;
                let (expected, params) = if format == RequestFormat::V4 {
                    (MsgType::TriggerService4, TRIGGER4_PARAMS_SIZE)
                } else {
                    (MsgType::TriggerService3, TRIGGER3_PARAMS_SIZE)
                };
                if hdr.ty != expected.as_u32() {
                    return Err(ProtoError::WrongTriggerType {
                        ty: hdr.ty,
                        expected: expected.as_u32(),
                    });
                }
                let len = hdr.len as usize;
                if len <= params || len - params > MAX_SERVICE_NAME_LEN {
                    return Err(ProtoError::BadTriggerLength {
                        len: hdr.len,
                        min: params + 1,
                        max: params + MAX_SERVICE_NAME_LEN,
                    });
                }
                let body = &b[MSG_HEADER_SIZE..];
                need("trigger payload", body, len)?;
                if body.len() > len {
                    return Err(ProtoError::TrailingBytes {
                        what: "trigger",
                        extra: body.len() - len,
                    });
                }
                let (source, offset) = if format == RequestFormat::V4 {
                    (fixed_field(&body[..64]).to_vec(), 64)
                } else {
                    (Vec::new(), 0)
                };
                let target = fixed_field(&body[offset..offset + 64]).to_vec();
                let request_id = fixed_field(&body[offset + 64..offset + 96]).to_vec();
                let service = c_string_tail("service_name", &body[params..len])?;
                if service.is_empty() {
                    return Err(ProtoError::MalformedString {
                        what: "service_name",
                        why: "is empty",
                    });
                }
                Ok(Trigger {
                    format,
                    source,
                    target,
                    request_id,
                    service: service.to_vec(),
                })
            }
        }
    }
}

/// A message a qrexec-client-vm may receive on its data channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `MSG_HELLO` with the peer's version.
    Hello(u32),
    /// `MSG_DATA_STDIN` (old Windows agents send stdout with this type).
    Stdin(Vec<u8>),
    /// `MSG_DATA_STDOUT`; empty = EOF.
    Stdout(Vec<u8>),
    /// `MSG_DATA_STDERR`; empty = EOF marker.
    Stderr(Vec<u8>),
    /// `MSG_DATA_EXIT_CODE`: the first 4 payload bytes as a signed int, or
    /// 255 when the payload is shorter than 4 bytes (docs/qrexec.md §8.3).
    ExitCode(i32),
}

impl Message {
    /// Wire bytes of this message (header + payload).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Hello(v) => encode_hello(*v).to_vec(),
            Message::Stdin(d) => encode_data(MsgType::DataStdin, d),
            Message::Stdout(d) => encode_data(MsgType::DataStdout, d),
            Message::Stderr(d) => encode_data(MsgType::DataStderr, d),
            Message::ExitCode(c) => encode_exit_code(*c).to_vec(),
        }
    }
}

/// What the decoder accepts at this point of a data-channel session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderMode {
    /// Only a HELLO (`type 0x300`, `len 4`) is valid.
    Handshake,
    /// Data messages (STDIN/STDOUT/STDERR/EXIT_CODE) with `len` at most the
    /// chunk limit; anything else, including a late HELLO, is an error.
    Data {
        /// Largest payload accepted.
        chunk_limit: usize,
    },
}

/// An incremental decoder of the message stream a service sends.
///
/// Feed it bytes in any split; it never consumes past the end of the message
/// it is decoding, so the caller can stop reading the channel right after a
/// message (backpressure). Headers are validated as soon as they are
/// complete, before any payload is buffered, so a hostile length cannot make
/// it allocate more than the chunk limit.
///
/// ```
/// # use qrexec::proto::{Message, MessageDecoder, DecoderMode};
/// let mut d = MessageDecoder::new(DecoderMode::Data { chunk_limit: 4096 });
/// let bytes = [0x91, 1, 0, 0, 2, 0, 0, 0, b'o', b'k'];
/// let (used, msg) = d.feed(&bytes[..5]).unwrap();
/// assert_eq!((used, msg), (5, None));
/// let (used, msg) = d.feed(&bytes[5..]).unwrap();
/// assert_eq!((used, msg), (5, Some(Message::Stdout(b"ok".to_vec()))));
/// ```
#[derive(Debug, Clone)]
pub struct MessageDecoder {
    mode: DecoderMode,
    header: [u8; MSG_HEADER_SIZE],
    header_len: usize,
    current: Option<(MsgType, usize)>,
    payload: Vec<u8>,
}

impl MessageDecoder {
    /// A decoder expecting a message boundary.
    pub fn new(mode: DecoderMode) -> MessageDecoder {
        MessageDecoder {
            mode,
            header: [0; MSG_HEADER_SIZE],
            header_len: 0,
            current: None,
            payload: Vec::new(),
        }
    }

    /// Switch mode (only meaningful at a message boundary).
    pub fn set_mode(&mut self, mode: DecoderMode) {
        self.mode = mode;
    }

    /// True when no partial message is buffered.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.current.is_none()
    }

    /// How many more bytes the current message needs (always ≥ 1). Reading
    /// at most this many never crosses a message boundary.
    pub fn wanted(&self) -> usize {
        match self.current {
            Some((_, len)) => (len - self.payload.len()).max(1),
            None => MSG_HEADER_SIZE - self.header_len,
        }
    }

    fn check_header(&self, hdr: MsgHeader) -> Result<MsgType, ProtoError> {
        let known = MsgType::from_u32(hdr.ty);
        match self.mode {
            DecoderMode::Handshake => {
                if known == Some(MsgType::Hello) && hdr.len as usize == PEER_INFO_SIZE {
                    Ok(MsgType::Hello)
                } else {
                    Err(ProtoError::BadHello {
                        ty: hdr.ty,
                        len: hdr.len,
                    })
                }
            }
            DecoderMode::Data { chunk_limit } => match known {
                Some(
                    t @ (MsgType::DataStdin
                    | MsgType::DataStdout
                    | MsgType::DataStderr
                    | MsgType::DataExitCode),
                ) => {
                    if hdr.len as usize > chunk_limit {
                        Err(ProtoError::ChunkTooBig {
                            ty: hdr.ty,
                            len: hdr.len,
                            limit: chunk_limit,
                        })
                    } else {
                        Ok(t)
                    }
                }
                _ => Err(ProtoError::UnexpectedType {
                    ty: hdr.ty,
                    len: hdr.len,
                }),
            },
        }
    }

    fn finish(&mut self, ty: MsgType) -> Message {
        let payload = std::mem::take(&mut self.payload);
        self.current = None;
        self.header_len = 0;
        match ty {
            MsgType::Hello => Message::Hello(get_u32(&payload, 0)),
            MsgType::DataStdin => Message::Stdin(payload),
            MsgType::DataStdout => Message::Stdout(payload),
            MsgType::DataStderr => Message::Stderr(payload),
            // check_header only lets the types above and EXIT_CODE through.
            _ => Message::ExitCode(if payload.len() < 4 {
                255
            } else {
                get_u32(&payload, 0) as i32
            }),
        }
    }

    /// Payload bytes still missing of the message being decoded; `None` at a
    /// message boundary or inside a header.
    ///
    /// ```
    /// use qrexec::proto::{DecoderMode, MessageDecoder, MsgHeader, MsgType};
    /// let mut d = MessageDecoder::new(DecoderMode::Data { chunk_limit: 65536 });
    /// assert_eq!(d.payload_missing(), None);
    /// d.feed(&MsgHeader::new(MsgType::DataStdout, 5).encode()).unwrap();
    /// assert_eq!(d.payload_missing(), Some(5));
    /// ```
    pub fn payload_missing(&self) -> Option<usize> {
        self.current.map(|(_, len)| len - self.payload.len())
    }

    /// Lets `read` put up to `max` payload bytes (at most what is missing)
    /// straight into the message's own buffer, saving the copy through an
    /// intermediate one; `read` returns how many bytes it wrote at the start
    /// of the slice it gets. Returns the message if that completed it.
    /// Outside a payload nothing is read and `Ok(None)` is returned.
    ///
    /// # Errors
    /// Whatever `read` returns (the decoder is unchanged then).
    ///
    /// ```
    /// use qrexec::proto::{DecoderMode, Message, MessageDecoder, MsgHeader, MsgType};
    /// let mut d = MessageDecoder::new(DecoderMode::Data { chunk_limit: 65536 });
    /// d.feed(&MsgHeader::new(MsgType::DataStdout, 2).encode()).unwrap();
    /// let m = d.fill_payload(10, |b| { b.copy_from_slice(b"ok"); Ok::<_, ()>(2) }).unwrap();
    /// assert_eq!(m, Some(Message::Stdout(b"ok".to_vec())));
    /// ```
    pub fn fill_payload<E>(
        &mut self,
        max: usize,
        read: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<Option<Message>, E> {
        let Some((ty, len)) = self.current else {
            return Ok(None);
        };
        let have = self.payload.len();
        let n = (len - have).min(max);
        self.payload.resize(have + n, 0);
        match read(&mut self.payload[have..]) {
            Ok(got) => self.payload.truncate(have + got.min(n)),
            Err(e) => {
                self.payload.truncate(have);
                return Err(e);
            }
        }
        if self.payload.len() == len {
            Ok(Some(self.finish(ty)))
        } else {
            Ok(None)
        }
    }

    /// Consume bytes from `input`: returns how many were used and the message
    /// completed by them, if any. Stops right after a complete message. After
    /// an error the decoder must not be used again.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Message>), ProtoError> {
        let mut used = 0;
        if self.current.is_none() {
            let take = (MSG_HEADER_SIZE - self.header_len).min(input.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
            self.header_len += take;
            used += take;
            if self.header_len < MSG_HEADER_SIZE {
                return Ok((used, None));
            }
            let hdr = MsgHeader::decode(&self.header)?;
            let ty = self.check_header(hdr)?;
            self.current = Some((ty, hdr.len as usize));
            self.payload = Vec::with_capacity(hdr.len as usize);
        }
        let Some((ty, len)) = self.current else {
            return Ok((used, None));
        };
        let take = (len - self.payload.len()).min(input.len() - used);
        self.payload.extend_from_slice(&input[used..used + take]);
        used += take;
        if self.payload.len() == len {
            Ok((used, Some(self.finish(ty))))
        } else {
            Ok((used, None))
        }
    }
}

/// Decode a complete byte stream of messages in one mode. Pure; the entry
/// point for property tests and fuzzing. A partial message at the end is a
/// [`ProtoError::Truncated`] error.
///
/// ```
/// # use qrexec::proto::{decode_messages, DecoderMode, Message};
/// let bytes = [0x93, 1, 0, 0, 4, 0, 0, 0, 42, 0, 0, 0];
/// let msgs = decode_messages(DecoderMode::Data { chunk_limit: 4096 }, &bytes).unwrap();
/// assert_eq!(msgs, vec![Message::ExitCode(42)]);
/// ```
pub fn decode_messages(mode: DecoderMode, mut bytes: &[u8]) -> Result<Vec<Message>, ProtoError> {
    let mut d = MessageDecoder::new(mode);
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (used, msg) = d.feed(bytes)?;
        bytes = &bytes[used..];
        if let Some(m) = msg {
            out.push(m);
        }
    }
    if !d.at_boundary() {
        return Err(ProtoError::Truncated {
            what: "message",
            needed: d.wanted(),
            got: 0,
        });
    }
    Ok(out)
}

/// A whole service → client session, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Version the peer announced.
    pub peer_version: u32,
    /// Negotiated version.
    pub version: u32,
    /// Data chunk limit that applied.
    pub chunk_limit: usize,
    /// The data messages after the HELLO.
    pub messages: Vec<Message>,
}

/// Decode what a service sends to a client that announced `own_version`:
/// a HELLO, then data messages under the negotiated chunk limit. Pure; meant
/// for fuzzing the whole receive path.
///
/// ```
/// # use qrexec::proto::{decode_session, encode_hello, encode_exit_code};
/// let mut s = encode_hello(2).to_vec();
/// s.extend_from_slice(&encode_exit_code(0));
/// let session = decode_session(4, &s).unwrap();
/// assert_eq!((session.version, session.chunk_limit), (2, 4096));
/// ```
pub fn decode_session(own_version: u32, bytes: &[u8]) -> Result<Session, ProtoError> {
    let mut d = MessageDecoder::new(DecoderMode::Handshake);
    let (used, msg) = d.feed(bytes)?;
    let Some(Message::Hello(peer_version)) = msg else {
        return Err(ProtoError::Truncated {
            what: "HELLO",
            needed: MSG_HEADER_SIZE + PEER_INFO_SIZE,
            got: bytes.len(),
        });
    };
    let version = negotiate(own_version, peer_version)?;
    let limit = chunk_limit(version);
    let messages = decode_messages(DecoderMode::Data { chunk_limit: limit }, &bytes[used..])?;
    Ok(Session {
        peer_version,
        version,
        chunk_limit: limit,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(s: &[u8], n: usize) -> Vec<u8> {
        let mut v = s.to_vec();
        v.resize(n, 0);
        v
    }

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
    fn constants_are_pinned() {
        assert_eq!(MAX_DATA_CHUNK_V2, 4096);
        assert_eq!(MAX_DATA_CHUNK_V3, 65536);
        assert_eq!(MAX_SERVICE_NAME_LEN, 65000);
        assert_eq!(VCHAN_BASE_PORT, 512);
        assert_eq!(VCHAN_BASE_DATA_PORT, 513);
        assert_eq!(QREXEC_EXIT_PROBLEM, 125);
        assert_eq!(QREXEC_EXIT_REQUEST_REFUSED, 126);
        assert_eq!(QREXEC_EXIT_SERVICE_NOT_FOUND, 127);
        assert_eq!(QREXEC_AGENT_TRIGGER_PATH, "/var/run/qubes/qrexec-agent");
        assert_eq!(TRIGGER_V2_SIZE, 64 + 32 + 32);
        assert_eq!(TRIGGER3_PARAMS_SIZE, 64 + 32);
        assert_eq!(TRIGGER4_PARAMS_SIZE, 64 + 64 + 32);
    }

    /// docs/qrexec.md §5.5 example: v4 request for `work` / `qubes.Filecopy`.
    #[test]
    fn golden_trigger_v4_without_source() {
        let got = Trigger::new(RequestFormat::V4, b"work", b"qubes.Filecopy", b"")
            .encode()
            .unwrap();
        let mut want = vec![0x13, 0x02, 0, 0, 0xaf, 0, 0, 0];
        want.extend(padded(b"", 64));
        want.extend(padded(b"work", 64));
        want.extend(padded(b"SOCKET", 32));
        want.extend_from_slice(b"qubes.Filecopy\0");
        assert_eq!(got, want);
        assert_eq!(got.len(), 8 + 175);
    }

    #[test]
    fn golden_trigger_v4_with_source() {
        let got = Trigger::new(RequestFormat::V4, b"@dispvm:tpl", b"svc+arg", b"relay")
            .encode()
            .unwrap();
        let mut want = vec![0x13, 0x02, 0, 0];
        want.extend_from_slice(&(160u32 + 8).to_le_bytes());
        want.extend(padded(b"relay", 64));
        want.extend(padded(b"@dispvm:tpl", 64));
        want.extend(padded(b"SOCKET", 32));
        want.extend_from_slice(b"svc+arg\0");
        assert_eq!(got, want);
    }

    /// docs/qrexec.md §5.5: the v3 header is `12 02 00 00 | 6f 00 00 00`.
    #[test]
    fn golden_trigger_v3() {
        let got = Trigger::new(RequestFormat::V3, b"work", b"qubes.Filecopy", b"")
            .encode()
            .unwrap();
        let mut want = vec![0x12, 0x02, 0, 0, 0x6f, 0, 0, 0];
        want.extend(padded(b"work", 64));
        want.extend(padded(b"SOCKET", 32));
        want.extend_from_slice(b"qubes.Filecopy\0");
        assert_eq!(got, want);
    }

    #[test]
    fn golden_trigger_v2_has_no_header() {
        let got = Trigger::new(RequestFormat::V2, b"work", b"qubes.Filecopy", b"")
            .encode()
            .unwrap();
        let mut want = padded(b"qubes.Filecopy", 64);
        want.extend(padded(b"work", 32));
        want.extend(padded(b"SOCKET", 32));
        assert_eq!(got, want);
        assert_eq!(got.len(), 128);
    }

    #[test]
    fn trigger_truncates_like_strncpy() {
        let long = [b'a'; 100];
        // v4: target and source cut at 63, the 64th byte stays NUL.
        let b = Trigger::new(RequestFormat::V4, &long, b"s", &long)
            .encode()
            .unwrap();
        assert_eq!(&b[8..8 + 63], &long[..63]);
        assert_eq!(b[8 + 63], 0);
        assert_eq!(&b[72..72 + 63], &long[..63]);
        assert_eq!(b[72 + 63], 0);
        // v3: target cut at 63.
        let b = Trigger::new(RequestFormat::V3, &long, b"s", b"")
            .encode()
            .unwrap();
        assert_eq!(&b[8..8 + 63], &long[..63]);
        assert_eq!(b[8 + 63], 0);
        assert_eq!(b.len(), 8 + 96 + 2);
        // v2: service cut at 63, target at 31.
        let b = Trigger::new(RequestFormat::V2, &long, &long, b"")
            .encode()
            .unwrap();
        assert_eq!(&b[..63], &long[..63]);
        assert_eq!(b[63], 0);
        assert_eq!(&b[64..64 + 31], &long[..31]);
        assert_eq!(b[95], 0);
        assert_eq!(&b[96..102], b"SOCKET");
        // exact limits are not truncated
        let b = Trigger::new(RequestFormat::V2, &long[..31], &long[..63], b"")
            .encode()
            .unwrap();
        let t = Trigger::decode(RequestFormat::V2, &b).unwrap();
        assert_eq!(t.target, &long[..31]);
        assert_eq!(t.service, &long[..63]);
    }

    #[test]
    fn trigger_encode_errors() {
        assert!(matches!(
            Trigger::new(RequestFormat::V3, b"t", b"s", b"src").encode(),
            Err(ProtoError::Unencodable {
                what: "source_domain",
                ..
            })
        ));
        assert!(matches!(
            Trigger::new(RequestFormat::V2, b"t", b"s", b"src").encode(),
            Err(ProtoError::Unencodable {
                what: "source_domain",
                ..
            })
        ));
        assert!(
            Trigger::new(RequestFormat::V4, b"t", b"s\0x", b"")
                .encode()
                .is_err()
        );
        assert!(
            Trigger::new(RequestFormat::V4, b"t\0", b"s", b"")
                .encode()
                .is_err()
        );
        let huge = vec![b'a'; MAX_SERVICE_NAME_LEN];
        assert!(
            Trigger::new(RequestFormat::V4, b"t", &huge, b"")
                .encode()
                .is_err()
        );
        let ok = vec![b'a'; MAX_SERVICE_NAME_LEN - 1];
        assert!(
            Trigger::new(RequestFormat::V4, b"t", &ok, b"")
                .encode()
                .is_ok()
        );
    }

    #[test]
    fn trigger_roundtrip_and_decode_validation() {
        for f in [RequestFormat::V2, RequestFormat::V3, RequestFormat::V4] {
            let src: &[u8] = if f == RequestFormat::V4 { b"src" } else { b"" };
            let t = Trigger::new(f, b"@default", b"qubes.Svc+x", src);
            let b = t.encode().unwrap();
            assert_eq!(Trigger::decode(f, &b).unwrap(), t);
            // every truncation is an error, never a panic
            for n in 0..b.len() {
                assert!(Trigger::decode(f, &b[..n]).is_err(), "{f} len {n}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(matches!(
                Trigger::decode(f, &longer),
                Err(ProtoError::TrailingBytes { .. })
            ));
        }
        let b = Trigger::new(RequestFormat::V3, b"t", b"s", b"")
            .encode()
            .unwrap();
        assert!(matches!(
            Trigger::decode(RequestFormat::V4, &b),
            Err(ProtoError::WrongTriggerType { .. })
        ));
        // length equal to params size (no service at all)
        let mut b = vec![0x13, 2, 0, 0, 160, 0, 0, 0];
        b.extend(vec![0u8; 160]);
        assert!(matches!(
            Trigger::decode(RequestFormat::V4, &b),
            Err(ProtoError::BadTriggerLength { .. })
        ));
        // service not NUL-terminated / NUL in the middle / empty
        let mut b = Trigger::new(RequestFormat::V3, b"t", b"ab", b"")
            .encode()
            .unwrap();
        let last = b.len() - 1;
        b[last] = b'x';
        assert!(matches!(
            Trigger::decode(RequestFormat::V3, &b),
            Err(ProtoError::MalformedString { .. })
        ));
        b[last] = 0;
        b[last - 1] = 0;
        assert!(matches!(
            Trigger::decode(RequestFormat::V3, &b),
            Err(ProtoError::MalformedString { .. })
        ));
        let mut b = vec![0x12, 2, 0, 0, 97, 0, 0, 0];
        b.extend(vec![0u8; 97]);
        assert!(matches!(
            Trigger::decode(RequestFormat::V3, &b),
            Err(ProtoError::MalformedString {
                why: "is empty",
                ..
            })
        ));
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

    #[test]
    fn decoder_handshake_mode_rejects_anything_but_hello() {
        let mode = DecoderMode::Handshake;
        assert_eq!(
            decode_messages(mode, &encode_hello(3)).unwrap(),
            vec![Message::Hello(3)]
        );
        let mut wrong_len = encode_hello(3).to_vec();
        wrong_len[4] = 5;
        wrong_len.push(0);
        assert_eq!(
            decode_messages(mode, &wrong_len),
            Err(ProtoError::BadHello { ty: 0x300, len: 5 })
        );
        assert_eq!(
            decode_messages(mode, &encode_exit_code(0)),
            Err(ProtoError::BadHello { ty: 0x193, len: 4 })
        );
    }

    #[test]
    fn decoder_data_mode_limits() {
        let mode = DecoderMode::Data { chunk_limit: 4096 };
        let ok = encode_data(MsgType::DataStdout, &[1u8; 4096]);
        assert_eq!(
            decode_messages(mode, &ok).unwrap(),
            vec![Message::Stdout(vec![1u8; 4096])]
        );
        // too big: rejected at the header, before any payload is read
        let mut d = MessageDecoder::new(mode);
        let hdr = MsgHeader::new(MsgType::DataStdout, 4097).encode();
        assert_eq!(
            d.feed(&hdr),
            Err(ProtoError::ChunkTooBig {
                ty: 0x191,
                len: 4097,
                limit: 4096
            })
        );
        // late HELLO and unknown types are fatal
        assert!(matches!(
            decode_messages(mode, &encode_hello(3)),
            Err(ProtoError::UnexpectedType { ty: 0x300, .. })
        ));
        let hdr = MsgHeader { ty: 0x999, len: 0 }.encode();
        assert!(matches!(
            decode_messages(mode, &hdr),
            Err(ProtoError::UnexpectedType { ty: 0x999, .. })
        ));
        // exit code: short payload → 255, longer payload uses first 4 bytes
        let short = encode_data(MsgType::DataExitCode, &[1, 2]);
        assert_eq!(
            decode_messages(mode, &short).unwrap(),
            vec![Message::ExitCode(255)]
        );
        let long = encode_data(MsgType::DataExitCode, &[42, 0, 0, 0, 9, 9]);
        assert_eq!(
            decode_messages(mode, &long).unwrap(),
            vec![Message::ExitCode(42)]
        );
        // mislabelled STDIN is decoded as such (the pump treats it as stdout)
        assert_eq!(
            decode_messages(mode, &encode_data(MsgType::DataStdin, b"x")).unwrap(),
            vec![Message::Stdin(b"x".to_vec())]
        );
    }

    #[test]
    fn decoder_truncation_at_every_point() {
        let mut stream = encode_data(MsgType::DataStdout, b"hello");
        stream.extend_from_slice(&encode_exit_code(3));
        let mode = DecoderMode::Data { chunk_limit: 4096 };
        for n in 0..stream.len() {
            let r = decode_messages(mode, &stream[..n]);
            if n == 0 || n == 13 {
                assert!(r.is_ok(), "{n}");
            } else {
                assert!(matches!(r, Err(ProtoError::Truncated { .. })), "{n}: {r:?}");
            }
        }
    }

    #[test]
    fn decoder_wanted_never_crosses_a_boundary() {
        let mut d = MessageDecoder::new(DecoderMode::Data { chunk_limit: 100 });
        assert_eq!(d.wanted(), 8);
        let m = encode_data(MsgType::DataStdout, b"abcd");
        assert_eq!(d.feed(&m[..3]).unwrap(), (3, None));
        assert_eq!(d.wanted(), 5);
        assert_eq!(d.feed(&m[3..8]).unwrap(), (5, None));
        assert_eq!(d.wanted(), 4);
        // feeding more than one message only consumes the first
        let mut two = m[8..].to_vec();
        two.extend_from_slice(&encode_exit_code(1));
        let (used, msg) = d.feed(&two).unwrap();
        assert_eq!((used, msg), (4, Some(Message::Stdout(b"abcd".to_vec()))));
        assert!(d.at_boundary());
        // zero-length message completes with its header
        let eof = encode_data(MsgType::DataStdout, b"");
        assert_eq!(d.feed(&eof).unwrap(), (8, Some(Message::Stdout(vec![]))));
    }

    #[test]
    fn session_decoding() {
        let mut s = encode_hello(2).to_vec();
        s.extend(encode_data(MsgType::DataStdout, &[0u8; 4096]));
        s.extend_from_slice(&encode_exit_code(0));
        let sess = decode_session(4, &s).unwrap();
        assert_eq!(sess.peer_version, 2);
        assert_eq!(sess.chunk_limit, 4096);
        assert_eq!(sess.messages.len(), 2);
        // with v2 a 4097-byte chunk is too big, with v3 it is fine
        let mut s2 = encode_hello(2).to_vec();
        s2.extend(encode_data(MsgType::DataStdout, &[0u8; 4097]));
        assert!(matches!(
            decode_session(4, &s2),
            Err(ProtoError::ChunkTooBig { .. })
        ));
        let mut s3 = encode_hello(3).to_vec();
        s3.extend(encode_data(MsgType::DataStdout, &[0u8; 4097]));
        assert!(decode_session(4, &s3).is_ok());
        assert!(decode_session(4, &encode_hello(1)).is_err());
        assert!(decode_session(4, &[]).is_err());
    }
}
