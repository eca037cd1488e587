//! Hostile peer: while we transfer, the peer writes random values into every
//! header field and the grant list, fiddles with events and ring bytes. Our
//! side must never touch memory outside its rings (guard pages, page diffs),
//! never panic, never hang (watchdog), and end every call with `Ok` or a
//! typed error.
//!
//! Seed count: `VCHAN_HOSTILE_SEEDS` (default 200 per test).

mod ring_support;

use std::time::Duration;

use ring_support::hostile::{Report, run_script, run_threaded, seed_bytes};
use ring_support::with_watchdog;

fn seed_count() -> u64 {
    std::env::var("VCHAN_HOSTILE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

/// Deterministic single-threaded scripts (the same driver as the fuzz
/// target): mutations and our operations interleaved step by step, with
/// the control page and our read ring diffed around every operation.
#[test]
fn hostile_scripts_never_escape_the_rings() {
    let n = seed_count();
    let total = with_watchdog("hostile scripts", Duration::from_secs(120), move || {
        let mut total = Report::default();
        for seed in 0..n {
            total.add(&run_script(&seed_bytes(seed, 768)));
        }
        total
    });
    eprintln!("hostile scripts: {total:?}");
    // The runs must have exercised both the happy and the hostile paths.
    assert!(total.ok > 0 && total.bytes > 0, "{total:?}");
    assert!(
        total.corrupt > 0,
        "no corruption was ever detected: {total:?}"
    );
    assert!(total.would_block + total.timed_out > 0, "{total:?}");
}

/// Concurrent mutations while our thread runs blocking and non-blocking
/// operations; the peer finally closes and our side must notice.
#[test]
fn hostile_threads_never_hang_or_panic() {
    let n = seed_count();
    let total = with_watchdog("hostile threads", Duration::from_secs(120), move || {
        let mut total = Report::default();
        for seed in 0..n {
            total.add(&run_threaded(seed));
        }
        total
    });
    eprintln!("hostile threads: {total:?}");
    assert!(total.ok > 0, "{total:?}");
    assert!(total.corrupt > 0, "{total:?}");
    assert!(total.peer_closed > 0, "{total:?}");
}

/// Fuzz inputs that are too short, empty or all-ones still run cleanly.
#[test]
fn hostile_script_edge_inputs() {
    with_watchdog("edge inputs", Duration::from_secs(30), || {
        run_script(&[]);
        run_script(&[0xFF; 4]);
        run_script(&[0xFF; 2000]);
        run_script(&[0x00; 2000]);
        for pair in 0..119u8 {
            let mut data = vec![pair, pair];
            data.extend(seed_bytes(u64::from(pair), 300));
            run_script(&data);
        }
    });
}
