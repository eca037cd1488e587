//! `cargo xtask`: project chores (demo, bench, ci, lab) in Rust.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("usage: cargo xtask <demo|bench|ci|lab>");
    std::process::exit(2);
}
