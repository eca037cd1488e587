//! Qubes' C qrexec stack built for real Xen (`BACKEND_VMM=xen`), for the
//! lab's `cstack` phase.
//!
//! From the pinned snapshots (`../shared/upstream/`, as `cargo xtask
//! upstream`): Qubes' `libvchan-xen` (qubes-core-vchan-xen, on Debian's
//! libxenvchan, libxenctrl and libxenstore), then `libqrexec-utils`,
//! `qrexec-agent`, the C `qrexec-client-vm`, `qrexec-daemon` and
//! `qrexec-client` (qubes-core-qrexec) linked against it, dynamically.
//! The programs record `NEEDED libvchan-xen.so.1` (Qubes' soname, which
//! ours has too), so the very same binaries run on Qubes' library or on
//! ours, chosen by `LD_LIBRARY_PATH` at run time (see `cstack_phase.rs`).
//!
//! Built without PAM (`HAVE_PAM_APPL=`): the lab's domUs have no PAM, and
//! the agent then runs RPC services directly (upstream's non-PAM path).
//! Shipped flat into the guests' `/mnt/host/` under names that do not
//! clash with ours: `c-qrexec-agent`, `c-qrexec-client-vm`,
//! `c-qrexec-daemon`, `c-qrexec-client`, `libqrexec-utils.so.4`, and Qubes'
//! library as `libvchan-xen-qubes.so.1`; rpath `/mnt/host` finds
//! `libqrexec-utils`. Cached by a stamp (recipe + snapshot sizes).

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use super::ourlib::GUEST_DIR;
use crate::util::run_output as run;

/// Bumped whenever the recipe changes.
const RECIPE: &str = "1";

/// The snapshots it is built from (in `crate::upstream::snapshots()`).
const SNAPSHOTS: [&str; 2] = ["qubes-core-qrexec.tar.gz", "qubes-core-vchan-xen.tar.gz"];

/// The shipped names: (built path relative to the build dir, name in
/// the guests).
const SHIPPED: &[(&str, &str)] = &[
    ("qubes-core-qrexec/agent/qrexec-agent", "c-qrexec-agent"),
    (
        "qubes-core-qrexec/agent/qrexec-client-vm",
        "c-qrexec-client-vm",
    ),
    ("qubes-core-qrexec/daemon/qrexec-daemon", "c-qrexec-daemon"),
    ("qubes-core-qrexec/daemon/qrexec-client", "c-qrexec-client"),
    (
        "qubes-core-qrexec/libqrexec/libqrexec-utils.so.4",
        "libqrexec-utils.so.4",
    ),
    ("prefix/lib/libvchan-xen.so.1", "libvchan-xen-qubes.so.1"),
];

/// Builds (or reuses) the stack; returns the files to ship, already
/// under their guest names.
pub(super) fn build() -> Result<Vec<PathBuf>, String> {
    let snaps = crate::upstream::snapshots()?;
    let base = crate::util::target_dir().join("lab-cstack");
    let ship = base.join("ship");
    let mut stamp = format!("recipe {RECIPE}\n");
    stamp.push_str(&crate::upstream::snapshot_stamp(&snaps, &SNAPSHOTS)?);
    let shipped: Vec<PathBuf> = SHIPPED.iter().map(|(_, n)| ship.join(n)).collect();
    let stamp_path = base.join("stamp");
    if fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str())
        && shipped.iter().all(|p| p.is_file())
    {
        return Ok(shipped);
    }
    eprintln!(
        "lab test: building Qubes' C qrexec stack for Xen (libvchan-xen, BACKEND_VMM=xen) in {}",
        base.display()
    );
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&ship).map_err(|e| format!("{}: {e}", ship.display()))?;
    crate::upstream::unpack(&snaps, &SNAPSHOTS, &base)?;
    let prefix = base.join("prefix");
    // Qubes' libvchan-xen on Debian's libxenvchan; its `install` also
    // provides the `vchan.pc` alias libqrexec's Makefile asks for.
    run(Command::new("make")
        .args(["-s", "-f", "Makefile.linux", "install"])
        .arg("-C")
        .arg(base.join("qubes-core-vchan-xen/vchan"))
        .arg(format!("PREFIX={}", prefix.display()))
        .arg(format!("LIBDIR={}", prefix.join("lib").display()))
        .arg(format!("INCLUDEDIR={}", prefix.join("include").display())))?;
    let tree = base.join("qubes-core-qrexec");
    let ldflags = format!("-L{} -Wl,-rpath,{GUEST_DIR}", prefix.join("lib").display());
    for (dir, targets) in [
        ("libqrexec", &["all"][..]),
        ("agent", &["qrexec-agent", "qrexec-client-vm"][..]),
        ("daemon", &["qrexec-daemon", "qrexec-client"][..]),
    ] {
        run(Command::new("make")
            .args(["-s", "-j2", "-C"])
            .arg(tree.join(dir))
            .args(["BACKEND_VMM=xen", "HAVE_PAM_APPL="])
            .args(targets)
            .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
            .env("LDFLAGS", &ldflags))?;
    }
    for ((from, _), to) in SHIPPED.iter().zip(&shipped) {
        fs::copy(base.join(from), to).map_err(|e| format!("copy {from}: {e}"))?;
    }
    check_needs_libvchan_xen(&shipped[..5])?;
    fs::write(&stamp_path, stamp).map_err(|e| e.to_string())?;
    Ok(shipped)
}

/// Each program (and libqrexec-utils) must load the vchan library by
/// Qubes' soname and not link Xen's libxenvchan itself: only then does
/// `LD_LIBRARY_PATH` choose between Qubes' library and ours.
pub(super) fn check_needs_libvchan_xen(files: &[PathBuf]) -> Result<(), String> {
    for f in files {
        let needed = crate::util::needed_libs(f)?;
        if !needed.iter().any(|l| l == "libvchan-xen.so.1")
            || needed.iter().any(|l| l.contains("libxenvchan"))
        {
            return Err(format!(
                "{}: expected NEEDED libvchan-xen.so.1 and no libxenvchan, got {needed:?}",
                f.display()
            ));
        }
    }
    Ok(())
}

/// The guest directory holding `libvchan-xen.so.1` for `lib` (made by
/// [`lib_dirs_script`]).
pub(super) fn lib_dir(ours: bool) -> &'static str {
    if ours {
        "/run/vchan-ours"
    } else {
        "/run/vchan-qubes"
    }
}

/// A guest shell snippet making both library directories: Qubes'
/// library and ours, each as `libvchan-xen.so.1`, nothing else in them.
pub(super) fn lib_dirs_script() -> String {
    format!(
        "mkdir -p {q} {o} && ln -sf {GUEST_DIR}/libvchan-xen-qubes.so.1 {q}/libvchan-xen.so.1 && \
         ln -sf {GUEST_DIR}/libvchan-xen.so.1 {o}/libvchan-xen.so.1",
        q = lib_dir(false),
        o = lib_dir(true)
    )
}
