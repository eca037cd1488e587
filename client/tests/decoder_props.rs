//! Property tests of the pure decoding entry points (the same functions the
//! fuzz targets drive): no panic on any input, split-invariance, round trips.

use proptest::prelude::*;
use qrexec::proto::{
    DecoderMode, Message, MessageDecoder, ProtoError, RequestFormat, Trigger, decode_messages,
    decode_session, encode_hello,
};

fn data_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Message::Stdout),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Message::Stderr),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Message::Stdin),
        any::<i32>().prop_map(Message::ExitCode),
    ]
}

fn feed_in_pieces(
    mode: DecoderMode,
    bytes: &[u8],
    cuts: &[usize],
) -> Result<Vec<Message>, ProtoError> {
    let mut d = MessageDecoder::new(mode);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut pieces: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    pieces.push(bytes.len());
    pieces.sort_unstable();
    for end in pieces {
        while pos < end {
            let (used, msg) = d.feed(&bytes[pos..end])?;
            assert!(used > 0 && used <= end - pos, "decoder must make progress");
            pos += used;
            if let Some(m) = msg {
                out.push(m);
            }
        }
    }
    Ok(out)
}

proptest! {
    #[test]
    fn messages_round_trip_in_any_split(
        msgs in proptest::collection::vec(data_message(), 0..20),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let bytes: Vec<u8> = msgs.iter().flat_map(Message::encode).collect();
        let mode = DecoderMode::Data { chunk_limit: 4096 };
        let whole = decode_messages(mode, &bytes).unwrap();
        prop_assert_eq!(&whole, &msgs);
        let pieces = feed_in_pieces(mode, &bytes, &cuts).unwrap();
        prop_assert_eq!(&pieces, &msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        for mode in [
            DecoderMode::Handshake,
            DecoderMode::Data { chunk_limit: 4096 },
            DecoderMode::Data { chunk_limit: 65536 },
        ] {
            if let Ok(msgs) = decode_messages(mode, &bytes) {
                // whatever decodes must re-encode to the same bytes, except
                // short/long EXIT_CODE payloads which are normalised
                let again: Vec<u8> = msgs.iter().flat_map(Message::encode).collect();
                if msgs.iter().all(|m| !matches!(m, Message::ExitCode(_))) {
                    prop_assert_eq!(again, bytes.clone());
                }
            }
        }
        let _ = decode_session(4, &bytes);
        for f in [RequestFormat::V2, RequestFormat::V3, RequestFormat::V4] {
            let _ = Trigger::decode(f, &bytes);
        }
    }

    #[test]
    fn sessions_with_valid_hello_respect_the_chunk_limit(
        version in 0u32..8,
        len in 0usize..70000,
    ) {
        let mut s = encode_hello(version).to_vec();
        s.extend(qrexec::proto::encode_data(qrexec::proto::MsgType::DataStdout, &vec![0u8; len]));
        match decode_session(4, &s) {
            Ok(sess) => {
                prop_assert!(version >= 2);
                prop_assert!(len <= sess.chunk_limit);
                prop_assert_eq!(sess.chunk_limit, if version.min(4) < 3 { 4096 } else { 65536 });
            }
            Err(ProtoError::UnsupportedVersion { peer }) => prop_assert_eq!(peer, version),
            Err(ProtoError::ChunkTooBig { limit, .. }) => prop_assert!(len > limit),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    #[test]
    fn triggers_round_trip(
        target in "[a-zA-Z0-9_.:@-]{0,63}",
        service in "[a-zA-Z0-9_.+-]{1,200}",
        source in "[a-zA-Z0-9_-]{0,63}",
    ) {
        for f in [RequestFormat::V3, RequestFormat::V4] {
            let src = if f == RequestFormat::V4 { source.as_bytes() } else { b"" };
            let t = Trigger::new(f, target.as_bytes(), service.as_bytes(), src);
            let bytes = t.encode().unwrap();
            prop_assert_eq!(Trigger::decode(f, &bytes).unwrap(), t);
        }
    }
}
