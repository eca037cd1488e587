//! `cargo xtask lab test`.

use super::Config;

/// `test [--quick] [--keep] [--phases LIST]`.
pub fn test(_cfg: &Config, _args: &[String]) -> Result<(), String> {
    Err("not yet".into())
}
