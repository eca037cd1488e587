//! `cargo xtask bench`: benchmarks with baselines in the same run (being built).

/// Dispatches a bench suite.
pub fn run(_args: &[String]) -> Result<(), String> {
    Err("the benchmarks are not built yet".into())
}
