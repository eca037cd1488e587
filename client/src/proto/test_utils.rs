//! Whole-buffer decoding for property tests and fuzz targets (feature
//! `test-utils`): the shipped code decodes as bytes arrive, through
//! [`MessageDecoder`], never a whole buffer at once.

use super::*;

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
