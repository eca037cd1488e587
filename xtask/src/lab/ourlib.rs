//! Our drop-in libvchan (crate `libvchan`) for the guests.
//!
//! `lab test` ships two more files beside our static binaries (dom0's 9p
//! share and the domUs' initramfs, both `/mnt/host/`):
//!
//! * `libvchan-xen.so.1`: our library as `cargo xtask libvchan install`
//!   builds it (release, soname `libvchan-xen.so.1`), debug info stripped.
//!   It is built on the host with the host's toolchain: the lab's guests
//!   run Debian 12 (glibc 2.36) and the library needs glibc ≥ 2.34 and
//!   libgcc_s, which dom0 has and the domU initramfs carries (setup copies
//!   them from the dom0 root file system). On another host, build in the
//!   dom0 chroot instead.
//! * `vchan-node-ours`: Xen's `vchan-node` (`lab/vchan-node.c`, the lab's
//!   C libxenvchan peer) built from the same source against our library's
//!   `libxenvchan_*` instead of Debian's libxenvchan: `-lvchan-xen`, rpath
//!   `/mnt/host`, Debian's `libxenstore` for its own xenstore reads. Its
//!   vchan is ours end to end, its program C.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the guests find the shipped files.
pub(super) const GUEST_DIR: &str = "/mnt/host";

/// Builds the library and `vchan-node-ours`; returns both paths (to be
/// staged with the other lab binaries).
pub(super) fn build() -> Result<Vec<PathBuf>, String> {
    let base = crate::util::target_dir().join("lab-libvchan");
    let prefix = base.join("prefix");
    eprintln!(
        "lab test: building our libvchan and vchan-node-ours ({})",
        base.display()
    );
    crate::libvchan::install(&prefix)?;
    let out = base.join("ship");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let lib = out.join("libvchan-xen.so.1");
    let _ = std::fs::remove_file(&lib);
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&lib)
        .arg(prefix.join("lib/libvchan-xen.so.1")))?;
    let node = out.join("vchan-node-ours");
    run(Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&node)
        .arg(super::lab_src().join("vchan-node.c"))
        .arg(format!("-L{}", prefix.join("lib").display()))
        .args(["-lvchan-xen", "-lxenstore"])
        .arg(format!("-Wl,-rpath,{GUEST_DIR}")))?;
    check_links_ours(&node)?;
    Ok(vec![lib, node])
}

/// `vchan-node-ours` must take `libxenvchan_*` from our library, not
/// Debian's: its dynamic section names ours and not libxenvchan.
fn check_links_ours(node: &Path) -> Result<(), String> {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(node)
        .output()
        .map_err(|e| format!("readelf: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).collect();
    let ours = needed.iter().any(|l| l.contains("[libvchan-xen.so.1]"));
    let theirs = needed.iter().any(|l| l.contains("libxenvchan"));
    if ours && !theirs {
        Ok(())
    } else {
        Err(format!(
            "{}: expected NEEDED libvchan-xen.so.1 and no libxenvchan, got {needed:?}",
            node.display()
        ))
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
