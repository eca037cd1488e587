//! [`ProtoError`]: everything that can be wrong in what a peer sent, or in a
//! request we were asked to encode.

use super::MIN_DATA_PROTOCOL_VERSION;

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
