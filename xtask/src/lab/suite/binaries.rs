//! Our static binaries for the guests: build, stage into the initramfs overlay, push stale copies (by stamp).

use std::path::Path;

use super::*;

pub(super) fn build_binaries() -> Result<Vec<PathBuf>, String> {
    let target = crate::util::target_dir().join("lab-static");
    let dir = target.join("x86_64-unknown-linux-gnu/release");
    let mut bins: Vec<PathBuf> = ["vchan-peer", "xen-devtest", "qrexec-client-vm", "qubes-sim"]
        .iter()
        .map(|b| dir.join(b))
        .collect();
    // LAB_PREBUILT=1: the last build as it is (an A/B run on a kept lab
    // with LAB_TPUT_PEER, while the tree has moved on).
    if std::env::var("LAB_PREBUILT").is_ok_and(|v| v == "1") && bins.iter().all(|b| b.exists()) {
        eprintln!("lab test: LAB_PREBUILT=1, using {}", dir.display());
    } else {
        build_static(&target)?;
    }
    // Our libvchan and Xen's vchan-node on it (phase libxenvchan), Qubes'
    // C qrexec stack for Xen (phase cqrexec).
    bins.extend(crate::lab::ourlib::build()?);
    bins.extend(crate::lab::cstack::build()?);
    Ok(bins)
}

/// `cargo build` of the static binaries into `target`.
fn build_static(target: &Path) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!(
        "lab test: building static vchan-peer, xen-devtest, qrexec-client-vm, qubes-sim ({})",
        target.display()
    );
    let st = Command::new(cargo)
        .current_dir(crate::util::root())
        .env("CARGO_TARGET_DIR", target)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=debuginfo",
        )
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "vchan",
            "--bin",
            "vchan-peer",
            "-p",
            "tests",
            "--bin",
            "xen-devtest",
            "-p",
            "qrexec",
            "--bin",
            "qrexec-client-vm",
            "-p",
            "qubes-sim",
            "--bin",
            "qubes-sim",
        ])
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err(format!("cargo build of the lab binaries failed ({st})"));
    }
    Ok(())
}

/// Puts the binaries where the guests find them at boot: the 9p share
/// (dom0's `/mnt/host`) and a cpio archive that `lab-domu create` appends
/// to each domU's initramfs (their `/mnt/host`). Much faster than pushing
/// over a hot-plugged block device afterwards.
pub(super) fn stage_binaries(cfg: &Config, bins: &[PathBuf]) -> Result<(), String> {
    let share = cfg.share_dir();
    std::fs::create_dir_all(&share).map_err(|e| e.to_string())?;
    let st = cfg.cache.join("stage-extra");
    let _ = std::fs::remove_dir_all(&st);
    let host = st.join("mnt/host");
    std::fs::create_dir_all(&host).map_err(|e| e.to_string())?;
    for b in bins {
        let name = b.file_name().ok_or("bad binary path")?;
        crate::lab::guest::copy_replacing(b, &share.join(name))?;
        std::fs::copy(b, host.join(name)).map_err(|e| format!("{}: {e}", b.display()))?;
    }
    // LAB_EXTRA_BINS: more host files for /mnt/host (e.g. another build
    // of vchan-peer for the throughput phase's LAB_TPUT_PEER), at boot only.
    for b in std::env::var("LAB_EXTRA_BINS")
        .unwrap_or_default()
        .split_whitespace()
    {
        let b = std::path::Path::new(b);
        let name = b.file_name().ok_or("LAB_EXTRA_BINS: bad path")?;
        crate::lab::guest::copy_replacing(b, &share.join(name))?;
        std::fs::copy(b, host.join(name)).map_err(|e| format!("{}: {e}", b.display()))?;
    }
    // strace and its libraries from the dom0 root file system, for the
    // throughput phase's syscall counts (only then: the archive rides in
    // every domU's initramfs).
    let rootfs = cfg.cache.join("dom0-rootfs");
    if count_requested() && rootfs.join("usr/bin/strace").exists() {
        setup::copy_elf(&rootfs, &st, &["/usr/bin/strace"])?;
    }
    // LAB_GUEST_TOOLS: more programs of the dom0 root file system (with
    // their libraries) for the domUs, e.g. `/usr/bin/perf` once installed
    // there by hand (`chroot ~/.cache/rust-vchan-lab/dom0-rootfs apt-get
    // install linux-perf`), to profile a LAB_TPUT_PEER wrapper.
    for t in std::env::var("LAB_GUEST_TOOLS")
        .unwrap_or_default()
        .split_whitespace()
    {
        if !rootfs.join(t.trim_start_matches('/')).exists() {
            return Err(format!("LAB_GUEST_TOOLS: no {t} in {}", rootfs.display()));
        }
        setup::copy_elf(&rootfs, &st, &[t])?;
    }
    let stamp = stamp_of(bins)?;
    for d in [&share, &host] {
        std::fs::write(d.join(STAMP), &stamp).map_err(|e| e.to_string())?;
    }
    // Uncompressed, and put in front of the gzip'd initramfs by lab-domu
    // (the early-microcode layout): appended behind it as a second gzip
    // member it was never unpacked (an empty /mnt/host in the domUs), so
    // every run pushed the binaries over a block device instead.
    let _ = std::fs::remove_file(share.join("domU-extra.cpio.gz"));
    let out = share.join("domU-extra.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . -print0 | cpio --null -o -H newc --quiet > \"$2\"")
        .arg("sh")
        .arg(&st)
        .arg(&out)
        .status()
        .map_err(|e| format!("cpio: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cpio of the domU extras failed ({st})"))
    }
}

/// The file beside the binaries in every guest that names them by hash.
pub(super) const STAMP: &str = "lab-bins.sha256";

/// `HASH NAME` per binary (hashed here: hashing 10 MB in an emulated domU
/// takes over a minute).
pub(super) fn stamp_of(bins: &[PathBuf]) -> Result<String, String> {
    let mut s = String::new();
    for b in bins {
        let name = b.file_name().ok_or("bad binary path")?.to_string_lossy();
        let _ = writeln!(s, "{} {name}", crate::util::sha256_file(b)?);
    }
    Ok(s)
}

/// Pushes the binaries to the domUs that do not have these very files
/// (a lab that was already running, or domUs made without the archive),
/// as their stamp file says.
pub(super) fn ensure_binaries(lab: &Lab, bins: &[PathBuf]) -> Result<(), String> {
    let want = stamp_of(bins)?;
    let mut stale = Vec::new();
    for d in lab.running_domus()? {
        let out = lab.domu(
            &d,
            &format!("cat /mnt/host/{STAMP} 2>&1"),
            Duration::from_secs(60),
        )?;
        // (The answer may carry lab-domu's own notes around the file.)
        if !out.stdout.contains(want.trim()) {
            eprintln!(
                "lab: {d} has other binaries: {}",
                out.stdout.trim().replace('\n', " | ")
            );
            stale.push(d);
        }
    }
    if !stale.is_empty() {
        let stamp = lab.cfg().share_dir().join(STAMP);
        std::fs::write(&stamp, &want).map_err(|e| e.to_string())?;
        let mut files = bins.to_vec();
        files.push(stamp);
        lab.push(&files, Some(&stale))?;
    }
    Ok(())
}
