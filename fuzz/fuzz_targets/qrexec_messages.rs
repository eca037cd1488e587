//! Fuzz target: arbitrary bytes from a peer through the qrexec message
//! decoder as the pump drives it (a header through `MessageDecoder::feed`,
//! payloads through `MessageDecoder::fill_payload` with reads that come
//! short or fail once, in both modes), the trigger decoders of every
//! request format, and the agent's answer reader. Errors are expected;
//! panics, hangs and unbounded allocation are bugs. The whole pump over a
//! real vchan is the `qrexec_session` target.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qrexec::proto::{self, DecoderMode, MessageDecoder, RequestFormat};

/// Feeds `data` to a decoder the way the pump's receive loop does: at a
/// boundary the header through `feed`, payloads through `fill_payload` in
/// reads of at most `step` bytes; every other read comes one byte short
/// and one read fails (the decoder must keep its state across a failure).
fn drive(mode: DecoderMode, step: usize, mut data: &[u8]) {
    let mut d = MessageDecoder::new(mode);
    let mut short = false;
    let mut failed_once = false;
    while !data.is_empty() {
        if d.payload_missing().is_some() {
            let ready = data.len().min(step);
            let src = data;
            let fail = !failed_once && short;
            let mut got = 0;
            let r = d.fill_payload(ready, |buf| {
                if fail {
                    return Err(());
                }
                let want = if short && buf.len() > 1 { buf.len() - 1 } else { buf.len() };
                let n = want.min(src.len());
                buf[..n].copy_from_slice(&src[..n]);
                got = n;
                Ok(n)
            });
            short = !short;
            match r {
                Err(()) => failed_once = true,
                Ok(_) if got == 0 => return,
                Ok(_) => data = &data[got..],
            }
        } else {
            let want = d.wanted().min(data.len());
            match d.feed(&data[..want]) {
                Ok((used, _)) if used > 0 => data = &data[used..],
                _ => return,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for step in [1, 4096] {
        drive(DecoderMode::Handshake, step, data);
        drive(DecoderMode::Data { chunk_limit: 4096 }, step, data);
        drive(DecoderMode::Data { chunk_limit: 65536 }, step, data);
    }
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
