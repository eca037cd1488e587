//! `cargo xtask lab`: real Xen under QEMU (being built).

/// Dispatches a lab subcommand.
pub fn run(_args: &[String]) -> Result<(), String> {
    Err("the lab is not built yet".into())
}
