//! Selects one of the loom model's fault-injection cfgs from the
//! environment, so that CI can build each mutant of the ring without
//! rebuilding every dependency (a `RUSTFLAGS` change would).
//!
//! `VCHAN_LOOM_MUTANT=no_fence` turns on `cfg(vchan_loom_no_fence)`; the
//! mutants only take effect together with `--cfg loom`
//! (see `tests/loom_notify.rs`), never in a normal build.

const MUTANTS: &[&str] = &[
    "no_recheck",
    "no_fence",
    "no_notify_fence",
    "no_wmb",
    "no_live_acquire",
    "no_space_acquire",
    "no_cons_release",
];

fn main() {
    println!("cargo:rerun-if-env-changed=VCHAN_LOOM_MUTANT");
    let Ok(m) = std::env::var("VCHAN_LOOM_MUTANT") else {
        return;
    };
    if m.is_empty() {
        return;
    }
    if !MUTANTS.contains(&m.as_str()) {
        panic!("VCHAN_LOOM_MUTANT={m:?}: not one of {MUTANTS:?}");
    }
    println!("cargo:rustc-cfg=vchan_loom_{m}");
}
