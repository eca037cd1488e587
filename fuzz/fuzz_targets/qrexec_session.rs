//! Fuzz target: a whole data-channel session as the service side could send
//! it (HELLO, then data messages, exit code), decoded as the client does
//! for each of our protocol versions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for own in [2, 3, 4] {
        let _ = qrexec::proto::decode_session(own, data);
    }
});
