//! Fuzz target: arbitrary bytes from a peer through the qrexec message
//! decoder (handshake and data modes), the trigger decoders of every request
//! format, and the agent's answer reader. Errors are expected; panics,
//! hangs and unbounded allocation are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qrexec::proto::{self, DecoderMode, RequestFormat};

fuzz_target!(|data: &[u8]| {
    let _ = proto::decode_messages(DecoderMode::Handshake, data);
    for chunk_limit in [4096, 65536] {
        let _ = proto::decode_messages(DecoderMode::Data { chunk_limit }, data);
    }
    for f in [RequestFormat::V2, RequestFormat::V3, RequestFormat::V4] {
        let _ = proto::Trigger::decode(f, data);
    }
    let _ = proto::MsgHeader::decode(data);
    let _ = proto::ConnectionParams::decode(data);
    let _ = qrexec::trigger::read_answer(&mut &data[..]);
});
