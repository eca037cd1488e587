//! The xenstore wire format (docs/vchan.md §8.1, `xs_wire.h`): the 16-byte header,
//! message types, framing of a byte stream into messages, and strict
//! parsers for every reply payload.
//!
//! Everything here is pure (no I/O), so it can be tested and fuzzed
//! directly. Integers in the header are in host byte order, as in
//! `struct xsd_sockmsg`.

use crate::error::{Errno, Error, Result};
use crate::perms::NodePerm;

/// Size of `struct xsd_sockmsg`.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`: the largest payload of one message.
pub const PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX`: the longest absolute path.
pub const ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX`: the longest relative path.
pub const REL_PATH_MAX: usize = 2048;
/// Longest errno name we accept in an `ERROR` reply.
const ERRNO_NAME_MAX: usize = 32;

/// Message types (`enum xsd_sockmsg_type`).
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    ResetWatches = 21,
    DirectoryPart = 22,
    GetFeature = 23,
    SetFeature = 24,
    GetQuota = 25,
    SetQuota = 26,
    Invalid = 0xffff,
}

const ALL_TYPES: &[MsgType] = &[
    MsgType::Control,
    MsgType::Directory,
    MsgType::Read,
    MsgType::GetPerms,
    MsgType::Watch,
    MsgType::Unwatch,
    MsgType::TransactionStart,
    MsgType::TransactionEnd,
    MsgType::Introduce,
    MsgType::Release,
    MsgType::GetDomainPath,
    MsgType::Write,
    MsgType::Mkdir,
    MsgType::Rm,
    MsgType::SetPerms,
    MsgType::WatchEvent,
    MsgType::Error,
    MsgType::IsDomainIntroduced,
    MsgType::Resume,
    MsgType::SetTarget,
    MsgType::ResetWatches,
    MsgType::DirectoryPart,
    MsgType::GetFeature,
    MsgType::SetFeature,
    MsgType::GetQuota,
    MsgType::SetQuota,
    MsgType::Invalid,
];

impl MsgType {
    /// The type for a wire value, if it is a known one.
    ///
    /// ```
    /// use xenstore::wire::MsgType;
    /// assert_eq!(MsgType::from_u32(11), Some(MsgType::Write));
    /// assert_eq!(MsgType::from_u32(20), None); // RESTRICT, removed
    /// ```
    pub fn from_u32(v: u32) -> Option<MsgType> {
        ALL_TYPES.iter().copied().find(|t| *t as u32 == v)
    }

    /// The name used in `xs_wire.h` without the `XS_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            MsgType::Control => "CONTROL",
            MsgType::Directory => "DIRECTORY",
            MsgType::Read => "READ",
            MsgType::GetPerms => "GET_PERMS",
            MsgType::Watch => "WATCH",
            MsgType::Unwatch => "UNWATCH",
            MsgType::TransactionStart => "TRANSACTION_START",
            MsgType::TransactionEnd => "TRANSACTION_END",
            MsgType::Introduce => "INTRODUCE",
            MsgType::Release => "RELEASE",
            MsgType::GetDomainPath => "GET_DOMAIN_PATH",
            MsgType::Write => "WRITE",
            MsgType::Mkdir => "MKDIR",
            MsgType::Rm => "RM",
            MsgType::SetPerms => "SET_PERMS",
            MsgType::WatchEvent => "WATCH_EVENT",
            MsgType::Error => "ERROR",
            MsgType::IsDomainIntroduced => "IS_DOMAIN_INTRODUCED",
            MsgType::Resume => "RESUME",
            MsgType::SetTarget => "SET_TARGET",
            MsgType::ResetWatches => "RESET_WATCHES",
            MsgType::DirectoryPart => "DIRECTORY_PART",
            MsgType::GetFeature => "GET_FEATURE",
            MsgType::SetFeature => "SET_FEATURE",
            MsgType::GetQuota => "GET_QUOTA",
            MsgType::SetQuota => "SET_QUOTA",
            MsgType::Invalid => "INVALID",
        }
    }
}

/// `struct xsd_sockmsg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type (raw, may be unknown).
    pub ty: u32,
    /// Request id, echoed in the reply; 0 in watch events.
    pub req_id: u32,
    /// Transaction id, 0 outside transactions.
    pub tx_id: u32,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// The 16 header bytes (host byte order).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.ty.to_ne_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_ne_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_ne_bytes());
        b[12..16].copy_from_slice(&self.len.to_ne_bytes());
        b
    }

    /// Decode 16 header bytes (no validation).
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            ty: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }

    /// The message type, if known.
    pub fn msg_type(&self) -> Option<MsgType> {
        MsgType::from_u32(self.ty)
    }
}

/// One complete message: header plus payload (`payload.len() == header.len`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// The payload, at most [`PAYLOAD_MAX`] bytes.
    pub payload: Vec<u8>,
}

impl Message {
    /// Build a message; fails if the payload exceeds [`PAYLOAD_MAX`].
    pub fn new(ty: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Result<Message> {
        if payload.len() > PAYLOAD_MAX {
            return Err(Error::invalid(format!(
                "{} payload of {} bytes exceeds {PAYLOAD_MAX}",
                ty.name(),
                payload.len()
            )));
        }
        let len = payload.len() as u32; // <= 4096, checked above
        Ok(Message {
            header: Header {
                ty: ty as u32,
                req_id,
                tx_id,
                len,
            },
            payload,
        })
    }

    /// Header and payload as they go on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len());
        v.extend_from_slice(&self.header.to_bytes());
        v.extend_from_slice(&self.payload);
        v
    }
}

/// A framing violation: the peer announced a payload over [`PAYLOAD_MAX`].
/// The stream cannot be resynchronised afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message announces a {len}-byte payload, more than {PAYLOAD_MAX}")]
pub struct Oversized {
    /// The announced length.
    pub len: u32,
    /// The message type of the offending header.
    pub ty: u32,
}

/// Cuts a byte stream into [`Message`]s.
///
/// It never holds more than one message: callers ask [`FrameReader::wanted`]
/// how many bytes complete the current message and read at most that many,
/// so a peer cannot make it buffer more than `16 + 4096` bytes.
///
/// ```
/// use xenstore::wire::{FrameReader, Message, MsgType};
/// let bytes = Message::new(MsgType::Read, 1, 0, b"domid\0".to_vec()).unwrap().to_bytes();
/// let mut fr = FrameReader::new();
/// fr.feed(&bytes[..10]);
/// assert!(fr.next_message().unwrap().is_none());
/// fr.feed(&bytes[10..]);
/// assert_eq!(fr.next_message().unwrap().unwrap().payload, b"domid\0");
/// ```
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// How many more bytes the current message needs (header first, then
    /// the payload). Never 0.
    pub fn wanted(&self) -> usize {
        if self.buf.len() < HEADER_LEN {
            return HEADER_LEN - self.buf.len();
        }
        let len = self.header().map_or(0, |h| h.len as usize).min(PAYLOAD_MAX);
        (HEADER_LEN + len).saturating_sub(self.buf.len()).max(1)
    }

    /// Bytes of an incomplete message held.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Append bytes read from the stream. Feeding more than
    /// [`wanted`](Self::wanted) is allowed (the rest stays buffered).
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    fn header(&self) -> Option<Header> {
        let h: &[u8; HEADER_LEN] = self.buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Header::from_bytes(h))
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or
    /// [`Oversized`] as soon as a header announces more than [`PAYLOAD_MAX`].
    pub fn next_message(&mut self) -> std::result::Result<Option<Message>, Oversized> {
        let Some(header) = self.header() else {
            return Ok(None);
        };
        if header.len as usize > PAYLOAD_MAX {
            return Err(Oversized {
                len: header.len,
                ty: header.ty,
            });
        }
        let total = HEADER_LEN + header.len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let rest = self.buf.split_off(total);
        let mut msg = std::mem::replace(&mut self.buf, rest);
        let payload = msg.split_off(HEADER_LEN);
        Ok(Some(Message { header, payload }))
    }
}

/// Join NUL-terminated strings into a request payload, e.g.
/// `["a", "b"]` → `a\0b\0`.
pub fn nul_terminated(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for p in parts {
        v.extend_from_slice(p);
        v.push(0);
    }
    v
}

/// Split a payload of NUL-terminated strings (`a\0b\0`). `None` if the
/// payload does not end with a NUL. An empty payload gives no strings.
pub fn split_nul_terminated(payload: &[u8]) -> Option<Vec<&[u8]>> {
    if payload.is_empty() {
        return Some(Vec::new());
    }
    let body = payload.strip_suffix(&[0])?;
    Some(body.split(|b| *b == 0).collect())
}

fn utf8<'a>(b: &'a [u8], what: &str) -> Result<&'a str> {
    std::str::from_utf8(b).map_err(|_| Error::protocol(format!("{what} is not UTF-8")))
}

/// Parse an `ERROR` payload (`"ENOENT\0"`): one NUL-terminated name of 1..=32
/// characters from `A-Z0-9`.
pub fn parse_error_reply(payload: &[u8]) -> Result<Errno> {
    let name = payload
        .strip_suffix(&[0])
        .filter(|n| {
            !n.is_empty()
                && n.len() <= ERRNO_NAME_MAX
                && n.iter()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        })
        .ok_or_else(|| {
            Error::protocol(format!("malformed ERROR payload {:?}", Escaped(payload)))
        })?;
    // all ASCII, checked above
    Ok(Errno::from_name(utf8(name, "errno name")?))
}

/// Check an acknowledgement payload: exactly `"OK\0"`.
pub fn parse_ok_reply(op: &str, payload: &[u8]) -> Result<()> {
    if payload == b"OK\0" {
        Ok(())
    } else {
        Err(Error::protocol(format!(
            "{op} reply should be \"OK\\0\", got {:?}",
            Escaped(payload)
        )))
    }
}

/// Parse a `DIRECTORY` reply: NUL-terminated child names. Each name must be
/// non-empty UTF-8 without `/`. An empty payload and a lone `"\0"` both mean
/// "no children".
pub fn parse_directory_reply(payload: &[u8]) -> Result<Vec<String>> {
    if payload == b"\0" {
        return Ok(Vec::new());
    }
    let parts = split_nul_terminated(payload)
        .ok_or_else(|| Error::protocol("DIRECTORY reply not NUL-terminated"))?;
    parts
        .into_iter()
        .map(|p| {
            let s = utf8(p, "DIRECTORY entry")?;
            if s.is_empty() || s.contains('/') {
                return Err(Error::protocol(format!("bad DIRECTORY entry {s:?}")));
            }
            Ok(s.to_owned())
        })
        .collect()
}

/// Parse a `GET_PERMS` reply: at least one NUL-terminated permission.
pub fn parse_perms_reply(payload: &[u8]) -> Result<Vec<NodePerm>> {
    let parts = split_nul_terminated(payload)
        .ok_or_else(|| Error::protocol("GET_PERMS reply not NUL-terminated"))?;
    if parts.is_empty() {
        return Err(Error::protocol("GET_PERMS reply without permissions"));
    }
    parts
        .into_iter()
        .map(|p| {
            utf8(p, "permission")?.parse::<NodePerm>().map_err(|_| {
                Error::protocol(format!(
                    "bad permission {:?} in GET_PERMS reply",
                    Escaped(p)
                ))
            })
        })
        .collect()
}

/// Parse a `TRANSACTION_START` reply: a non-zero decimal `u32` and a NUL.
pub fn parse_transaction_id(payload: &[u8]) -> Result<u32> {
    payload
        .strip_suffix(&[0])
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| crate::perms::parse_decimal(d, u32::MAX))
        .filter(|id| *id != 0)
        .ok_or_else(|| {
            Error::protocol(format!(
                "bad TRANSACTION_START reply {:?}",
                Escaped(payload)
            ))
        })
}

/// Parse a `GET_DOMAIN_PATH` reply: an absolute path, NUL-terminated (a
/// missing final NUL is tolerated), without interior NULs.
pub fn parse_domain_path_reply(payload: &[u8]) -> Result<String> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    let s = utf8(body, "GET_DOMAIN_PATH reply")?;
    if !s.starts_with('/') || s.contains('\0') || s.len() > ABS_PATH_MAX {
        return Err(Error::protocol(format!("bad GET_DOMAIN_PATH reply {s:?}")));
    }
    Ok(s.to_owned())
}

/// Parse a `WATCH_EVENT` payload: exactly `path\0token\0`, both UTF-8,
/// the path non-empty.
pub fn parse_watch_event(payload: &[u8]) -> Result<(String, String)> {
    let parts = split_nul_terminated(payload)
        .ok_or_else(|| Error::protocol("WATCH_EVENT payload not NUL-terminated"))?;
    match parts.as_slice() {
        [path, token] if !path.is_empty() => Ok((
            utf8(path, "WATCH_EVENT path")?.to_owned(),
            utf8(token, "WATCH_EVENT token")?.to_owned(),
        )),
        _ => Err(Error::protocol(format!(
            "WATCH_EVENT payload should be path\\0token\\0, got {:?}",
            Escaped(payload)
        ))),
    }
}

/// Debug-prints at most 64 bytes of untrusted data, escaped.
pub(crate) struct Escaped<'a>(pub &'a [u8]);

impl std::fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.0[..self.0.len().min(64)];
        write!(f, "\"{}\"", shown.escape_ascii())?;
        if self.0.len() > shown.len() {
            write!(f, "... ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perms::Perm;

    #[test]
    fn type_values_match_xs_wire_h() {
        let expect = [
            (MsgType::Control, 0),
            (MsgType::Directory, 1),
            (MsgType::Read, 2),
            (MsgType::GetPerms, 3),
            (MsgType::Watch, 4),
            (MsgType::Unwatch, 5),
            (MsgType::TransactionStart, 6),
            (MsgType::TransactionEnd, 7),
            (MsgType::GetDomainPath, 10),
            (MsgType::Write, 11),
            (MsgType::Mkdir, 12),
            (MsgType::Rm, 13),
            (MsgType::SetPerms, 14),
            (MsgType::WatchEvent, 15),
            (MsgType::Error, 16),
            (MsgType::IsDomainIntroduced, 17),
            (MsgType::ResetWatches, 21),
            (MsgType::Invalid, 0xffff),
        ];
        for (t, v) in expect {
            assert_eq!(t as u32, v);
            assert_eq!(MsgType::from_u32(v), Some(t));
        }
        for t in ALL_TYPES {
            assert_eq!(MsgType::from_u32(*t as u32), Some(*t));
        }
        assert_eq!(MsgType::from_u32(20), None);
        assert_eq!(MsgType::from_u32(27), None);
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            ty: 1,
            req_id: 0x0203_0405,
            tx_id: 7,
            len: 4096,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn frame_reader_rejects_oversized_before_payload() {
        let h = Header {
            ty: 2,
            req_id: 1,
            tx_id: 0,
            len: 4097,
        };
        let mut fr = FrameReader::new();
        fr.feed(&h.to_bytes());
        assert_eq!(fr.next_message(), Err(Oversized { len: 4097, ty: 2 }));
        assert!(fr.wanted() <= PAYLOAD_MAX);
    }

    #[test]
    fn frame_reader_wanted_counts_down() {
        let m = Message::new(MsgType::Write, 3, 0, b"a\0bc".to_vec()).unwrap();
        let bytes = m.to_bytes();
        let mut fr = FrameReader::new();
        let mut fed = 0;
        loop {
            let want = fr.wanted();
            assert!(want >= 1 && fed + want <= bytes.len());
            fr.feed(&bytes[fed..fed + 1]);
            fed += 1;
            if let Some(got) = fr.next_message().unwrap() {
                assert_eq!(got, m);
                break;
            }
        }
        assert_eq!(fed, bytes.len());
        assert_eq!(fr.buffered(), 0);
    }

    #[test]
    fn message_new_limits_payload() {
        assert!(Message::new(MsgType::Write, 1, 0, vec![0; PAYLOAD_MAX]).is_ok());
        assert!(Message::new(MsgType::Write, 1, 0, vec![0; PAYLOAD_MAX + 1]).is_err());
    }

    #[test]
    fn reply_parsers() {
        assert_eq!(parse_error_reply(b"ENOENT\0").unwrap(), Errno::ENOENT);
        assert_eq!(
            parse_error_reply(b"EQUOTA\0").unwrap(),
            Errno::Other("EQUOTA".into())
        );
        for bad in [
            &b""[..],
            b"\0",
            b"ENOENT",
            b"enoent\0",
            b"ENO ENT\0",
            b"E\0\0",
        ] {
            assert!(parse_error_reply(bad).is_err(), "{bad:?}");
        }
        assert!(parse_ok_reply("WRITE", b"OK\0").is_ok());
        for bad in [&b""[..], b"OK", b"OK\0\0", b"ok\0"] {
            assert!(parse_ok_reply("WRITE", bad).is_err());
        }
        assert_eq!(parse_directory_reply(b"").unwrap(), Vec::<String>::new());
        assert_eq!(parse_directory_reply(b"\0").unwrap(), Vec::<String>::new());
        assert_eq!(parse_directory_reply(b"a\0bc\0").unwrap(), ["a", "bc"]);
        for bad in [&b"a"[..], b"a\0\0", b"a/b\0", b"\xff\0"] {
            assert!(parse_directory_reply(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_perms_reply(b"n5\0r0\0").unwrap(),
            [NodePerm::new(5, Perm::None), NodePerm::new(0, Perm::Read)]
        );
        for bad in [&b""[..], b"n5", b"n5\0\0", b"x5\0", b"\0"] {
            assert!(parse_perms_reply(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_transaction_id(b"42\0").unwrap(), 42);
        for bad in [&b""[..], b"42", b"0\0", b"042\0", b"-1\0", b"4294967296\0"] {
            assert!(parse_transaction_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_domain_path_reply(b"/local/domain/5\0").unwrap(),
            "/local/domain/5"
        );
        assert_eq!(
            parse_domain_path_reply(b"/local/domain/5").unwrap(),
            "/local/domain/5"
        );
        for bad in [&b""[..], b"\0", b"local\0", b"/a\0b\0"] {
            assert!(parse_domain_path_reply(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_watch_event(b"/a\0tok\0").unwrap(),
            ("/a".to_owned(), "tok".to_owned())
        );
        assert_eq!(
            parse_watch_event(b"/a\0\0").unwrap(),
            ("/a".to_owned(), String::new())
        );
        for bad in [&b""[..], b"/a\0", b"/a\0t", b"/a\0t\0x\0", b"\0t\0"] {
            assert!(parse_watch_event(bad).is_err(), "{bad:?}");
        }
    }
}
