//! `cargo xtask bench qrexec` (being built).

use super::Common;

/// Runs the suite.
pub fn run(_common: &Common, _args: &[String]) -> Result<(), String> {
    Err("bench qrexec: not built yet".into())
}
