//! Fuzz target: a hostile peer driven by the fuzz input scribbles on the
//! vchan control page, grant list, events and ring bytes while our endpoint
//! operates; the driver panics if our side writes outside its ring or its
//! own header fields, panics, or returns an error a peer cannot cause.
//! Guard pages around every mapping turn an out-of-bounds access into a
//! crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../vchan/tests/ring_support/mod.rs"]
mod ring_support;

fuzz_target!(|data: &[u8]| {
    let _ = ring_support::hostile::run_script(data);
});
