//! qrexec wire format: constants (docs/qrexec.md §3), message types (§4), struct layouts
//! (docs/qrexec.md §5), HELLO negotiation (§6) and a streaming decoder that validates
//! everything a peer sends.
//!
//! Every integer on the wire is a little-endian `u32` (docs/qrexec.md §2). Nothing here
//! does I/O: encoders return bytes, decoders take bytes. That keeps the whole
//! module usable from fuzz targets and property tests.
//!
//! One file a concern, all re-exported here (`qrexec::proto::X`):
//! `consts.rs` (constants and structure sizes), `error.rs` ([`ProtoError`]),
//! `header.rs` (message types, `msg_header`, the parameter structs, the small
//! encoders, HELLO negotiation), `trigger.rs` (the request to the local
//! agent), `decoder.rs` (the streaming [`MessageDecoder`]) and, with the
//! `test-utils` feature only, `test_utils.rs` (whole-buffer decoding for
//! property tests and fuzz targets).
//!
//! ```
//! use qrexec::proto::{encode_hello, MsgType};
//! let hello = encode_hello(3);
//! assert_eq!(hello, [0x00, 0x03, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0]);
//! assert_eq!(MsgType::from_u32(0x300), Some(MsgType::Hello));
//! ```

mod consts;
mod decoder;
mod error;
mod header;
#[cfg(any(test, feature = "test-utils"))]
mod test_utils;
mod trigger;

pub use consts::*;
pub use decoder::{DecoderMode, Message, MessageDecoder};
pub use error::ProtoError;
pub use header::{
    ConnectionParams, ExecParams, MsgHeader, MsgType, ServiceParams, chunk_limit, encode_data,
    encode_exit_code, encode_hello, negotiate,
};
#[cfg(any(test, feature = "test-utils"))]
pub use test_utils::{Session, decode_messages, decode_session};
pub use trigger::{RequestFormat, Trigger};

/// `s` NUL-padded to `n` bytes, as the fixed fields of the golden tests.
#[cfg(test)]
fn padded(s: &[u8], n: usize) -> Vec<u8> {
    let mut v = s.to_vec();
    v.resize(n, 0);
    v
}
