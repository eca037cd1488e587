//! The streaming decoder of what arrives on a data channel: [`Message`],
//! [`DecoderMode`] and [`MessageDecoder`], which bounds and validates every
//! header before it takes a payload byte.

use super::header::get_u32;
use super::*;

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
    /// The current message's payload buffer, `len` bytes long from its
    /// header on; only `payload[..filled]` came from the peer (the rest is
    /// zeros or bytes of an earlier message in a recycled buffer, never
    /// handed out: a message leaves only when `filled == len`).
    payload: Vec<u8>,
    filled: usize,
    /// A buffer handed back by [`MessageDecoder::recycle`], taken by the
    /// next payload that fits it.
    spare: Option<Vec<u8>>,
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
            filled: 0,
            spare: None,
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
            Some((_, len)) => (len - self.filled).max(1),
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
        self.filled = 0;
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
        self.current.map(|(_, len)| len - self.filled)
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
        let have = self.filled;
        let n = (len - have).min(max);
        let got = read(&mut self.payload[have..have + n])?;
        self.filled = have + got.min(n);
        if self.filled == len {
            Ok(Some(self.finish(ty)))
        } else {
            Ok(None)
        }
    }

    /// Hands back the buffer of a message that has been consumed, so that
    /// a later payload reuses its allocation instead of a new one (a
    /// 64 KiB allocation per message made glibc give the top of its heap
    /// back and fault it in again, tens of thousands of page faults per
    /// GiB with a 1 MiB ring). One buffer is kept: the larger. Its
    /// contents do not matter; they are overwritten before any of them
    /// leave the decoder again.
    ///
    /// ```
    /// use qrexec::proto::{DecoderMode, Message, MessageDecoder, MsgHeader, MsgType};
    /// let mut d = MessageDecoder::new(DecoderMode::Data { chunk_limit: 65536 });
    /// let mut wire = MsgHeader::new(MsgType::DataStdout, 5).encode().to_vec();
    /// wire.extend_from_slice(b"first");
    /// let Some(Message::Stdout(buf)) = d.feed(&wire).unwrap().1 else { panic!() };
    /// let at = buf.as_ptr();
    /// d.recycle(buf);
    /// let mut wire = MsgHeader::new(MsgType::DataStdout, 3).encode().to_vec();
    /// wire.extend_from_slice(b"two");
    /// let Some(Message::Stdout(buf)) = d.feed(&wire).unwrap().1 else { panic!() };
    /// assert_eq!((buf.as_slice(), buf.as_ptr()), (&b"two"[..], at));
    /// ```
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self
            .spare
            .as_ref()
            .is_none_or(|s| s.capacity() < buf.capacity())
        {
            self.spare = Some(buf);
        }
    }

    /// A buffer of exactly `len` bytes for a new payload: the spare when it
    /// is large enough (no allocation, and no zeroing of what it already
    /// holds), else a new one.
    fn payload_buffer(&mut self, len: usize) -> Vec<u8> {
        if len == 0 {
            return Vec::new();
        }
        let mut buf = match self.spare.take() {
            Some(b) if b.capacity() >= len => b,
            other => {
                self.spare = other;
                Vec::with_capacity(len)
            }
        };
        if buf.len() > len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
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
            self.payload = self.payload_buffer(hdr.len as usize);
            self.filled = 0;
        }
        let Some((ty, len)) = self.current else {
            return Ok((used, None));
        };
        let have = self.filled;
        let take = (len - have).min(input.len() - used);
        self.payload[have..have + take].copy_from_slice(&input[used..used + take]);
        self.filled = have + take;
        used += take;
        if self.filled == len {
            Ok((used, Some(self.finish(ty))))
        } else {
            Ok((used, None))
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

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

    /// A recycled buffer is reused for the next payload that fits, and
    /// nothing it held before ever comes out: shorter, equal and longer
    /// payloads, filled in pieces both ways (`feed` and `fill_payload`).
    #[test]
    fn recycled_buffers_are_reused_and_never_leak_old_bytes() {
        let mode = DecoderMode::Data { chunk_limit: 4096 };
        let mut d = MessageDecoder::new(mode);
        let first = encode_data(MsgType::DataStdout, &[b'X'; 100]);
        let (_, m) = d.feed(&first).unwrap();
        let Some(Message::Stdout(buf)) = m else {
            panic!("{m:?}")
        };
        let at = buf.as_ptr();
        d.recycle(buf);
        // Shorter, in pieces through `feed`: the tail of the old payload
        // stays out.
        let m = encode_data(MsgType::DataStderr, b"abc");
        assert_eq!(d.feed(&m[..9]).unwrap(), (9, None));
        assert_eq!(d.payload_missing(), Some(2));
        let (_, m) = d.feed(&m[9..]).unwrap();
        let Some(Message::Stderr(buf)) = m else {
            panic!("{m:?}")
        };
        assert_eq!((buf.as_slice(), buf.as_ptr()), (&b"abc"[..], at));
        d.recycle(buf);
        // Longer than the last one but within the capacity, through
        // `fill_payload` in two reads: zeros or old bytes never show.
        d.feed(&MsgHeader::new(MsgType::DataStdout, 50).encode())
            .unwrap();
        let r = d.fill_payload(20, |b| {
            b.fill(b'y');
            Ok::<_, ()>(b.len())
        });
        assert_eq!(r, Ok(None));
        assert_eq!(d.payload_missing(), Some(30));
        // A failed read changes nothing, whatever it scribbled.
        let r = d.fill_payload(30, |b| {
            b.fill(b'!');
            Err(())
        });
        assert_eq!(r, Err(()));
        assert_eq!(d.payload_missing(), Some(30));
        let r = d.fill_payload(100, |b| {
            assert_eq!(b.len(), 30);
            b.fill(b'z');
            Ok::<_, ()>(30)
        });
        let mut want = vec![b'y'; 20];
        want.extend_from_slice(&[b'z'; 30]);
        let Ok(Some(Message::Stdout(buf))) = r else {
            panic!("{r:?}")
        };
        assert_eq!((&buf, buf.as_ptr()), (&want, at));
        d.recycle(buf);
        // Larger than the spare: a new buffer, the spare is kept for later.
        let big = encode_data(MsgType::DataStdout, &[7u8; 1000]);
        let (_, m) = d.feed(&big).unwrap();
        let Some(Message::Stdout(buf)) = m else {
            panic!("{m:?}")
        };
        assert_eq!(buf, vec![7u8; 1000]);
        assert_ne!(buf.as_ptr(), at);
        let (_, m) = d.feed(&encode_data(MsgType::DataStdout, b"q")).unwrap();
        let Some(Message::Stdout(small)) = m else {
            panic!("{m:?}")
        };
        assert_eq!((small.as_slice(), small.as_ptr()), (&b"q"[..], at));
        // The larger of two recycled buffers is the one kept; an empty
        // payload takes none.
        d.recycle(small);
        d.recycle(buf);
        assert_eq!(
            d.feed(&encode_data(MsgType::DataStdout, b"")).unwrap(),
            (8, Some(Message::Stdout(Vec::new())))
        );
        let m = d.feed(&encode_data(MsgType::DataStdout, &[1u8; 900]));
        let Ok((_, Some(Message::Stdout(b)))) = m else {
            panic!("{m:?}")
        };
        assert_eq!(b.capacity(), 1000);
        assert_eq!(b, vec![1u8; 900]);
    }
}
