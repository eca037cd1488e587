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

use std::path::PathBuf;
use std::process::Command;

use crate::util::run_output as run;

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
    // It must take `libxenvchan_*` from our library, not Debian's.
    super::cstack::check_needs_libvchan_xen(std::slice::from_ref(&node))?;
    Ok(vec![lib, node])
}
