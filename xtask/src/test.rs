//! `cargo xtask test`: the README's test command. Installs what the test
//! suite needs beyond a Rust toolchain and gcc (Debian's `libxen-dev`, whose
//! `libxenvchan.h` the libvchan C ABI test pins our struct against; with apt,
//! as root, only when missing), then runs `cargo test --workspace
//! --all-features` with any further arguments passed on.

use std::path::Path;
use std::process::Command;

use crate::util;

/// The header the libvchan C ABI test compiles against.
const XENVCHAN_H: &str = "/usr/include/libxenvchan.h";

pub fn run(args: &[String]) -> Result<(), String> {
    if !Path::new(XENVCHAN_H).exists() {
        if !nix::unistd::geteuid().is_root() {
            return Err(format!(
                "{XENVCHAN_H} is missing: install Debian's libxen-dev (apt-get install libxen-dev) \
                 or run this as root to have it installed"
            ));
        }
        println!("== installing libxen-dev (apt): libvchan's C ABI test needs {XENVCHAN_H}");
        for a in [
            &["update", "-qq"][..],
            &["install", "-y", "-qq", "libxen-dev"][..],
        ] {
            let st = Command::new("apt-get")
                .args(a)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .map_err(|e| format!("apt-get: {e}"))?;
            if !st.success() {
                return Err(format!("apt-get {} failed ({st})", a.join(" ")));
            }
        }
    }
    let mut cargo_args = vec!["test", "--workspace", "--all-features"];
    cargo_args.extend(args.iter().map(String::as_str));
    util::cargo(&cargo_args)
}
