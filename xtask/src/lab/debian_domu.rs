//! A lab domU booted from a Debian root file system instead of the small
//! initramfs alone: for what needs a real Debian system (`dpkg -i` of our
//! packages, programs linked against Debian's libraries).
//!
//! * `setup` (cached): `debian-domU-rootfs/` is a copy of the dom0 root file
//!   system (debootstrap `--variant=minbase bookworm` + the dom0 packages,
//!   without the kernel modules and the dom0 lab files) plus
//!   [`DEBIAN_DOMU_PKGS`]; every setup puts the domU's lab files in
//!   (`lab/guest/domU/`: busybox init's inittab, the sysinit, the console
//!   agent) and writes `debian-domU.img` (ext4).
//! * `start`: the image is QEMU's second virtio disk, read-only: dom0's
//!   [`DOM0_DISK`].
//! * [`create`]: `lab-domu create` with `LAB_ROOT_DISK`: a PV domU with that
//!   disk as `xvda` (read-only, so any number of such domUs share it) and the
//!   usual initramfs, whose `/init` sees `lab.root=` on the command line and
//!   runs `etc/lab/debian-root`: the disk under a tmpfs overlay (each boot
//!   starts from the same tree; writes live in the domU's memory), the
//!   initramfs' `/mnt/host` copied to a tmpfs, `switch_root` to the Debian
//!   root's busybox init. The domU has the plumbing of the others: the
//!   console agent (`Lab::domu`), `/run/lab/domid`, the Xen devices
//!   (`/dev/xen/*`). Files given to [`create`] ride in a cpio archive in front
//!   of the initramfs (like the lab's binaries) and are in `/mnt/host/`.
//!
//! Boot cost under TCG: about that of an initramfs domU (no systemd: busybox
//! init runs the same sysinit), plus the copy of `/mnt/host`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use super::setup::{chroot_install, log, mkdirs, q, run, sh};
use super::{Config, Lab, lab_src};

/// The image in the cache.
pub(crate) const IMAGE: &str = "debian-domU.img";
/// The image as dom0 sees it (QEMU's second virtio disk).
pub(crate) const DOM0_DISK: &str = "/dev/vdb";
/// Packages added to the copy of the dom0 root file system (`man`: the
/// package phase reads our man page with it).
pub(crate) const DEBIAN_DOMU_PKGS: &str = "man-db";
/// The image's size (sparse; the tree is ~350 MB).
const IMAGE_SIZE: &str = "1G";

/// The cached root file system.
pub(crate) fn rootfs(cfg: &Config) -> PathBuf {
    cfg.cache.join("debian-domU-rootfs")
}

/// Copies the dom0 root file system (once; `force` redoes it) and installs
/// [`DEBIAN_DOMU_PKGS`] in it.
fn setup_rootfs(cfg: &Config, force: bool) -> Result<(), String> {
    let c = &cfg.cache;
    let r = rootfs(cfg);
    let done = c.join(".debian-domU-rootfs.done");
    if done.exists() && !force {
        log("Debian domU rootfs present");
        return Ok(());
    }
    let _ = std::fs::remove_file(&done);
    if r.exists() {
        std::fs::remove_dir_all(&r).map_err(|e| format!("rm {}: {e}", r.display()))?;
    }
    mkdirs(&r)?;
    log("copying the dom0 rootfs for the Debian domU");
    // Not the dom0 kernel modules (the domU loads its own from the
    // initramfs), not dom0's copies of the kernel and initramfs.
    sh(&format!(
        "tar -C {d0} --exclude=./usr/lib/modules --exclude=./lib/modules --exclude=./var/lib/lab \
         --exclude=./etc/lab --exclude=./usr/local/sbin/lab-domu -cf - . | tar -C {r} -xf -",
        d0 = q(&c.join("dom0-rootfs")),
        r = q(&r)
    ))?;
    log(&format!(
        "installing into the Debian domU rootfs: {DEBIAN_DOMU_PKGS}"
    ));
    chroot_install(&r, DEBIAN_DOMU_PKGS, &c.join("debian-domU-apt.log"))?;
    std::fs::write(&done, "").map_err(|e| e.to_string())?;
    Ok(())
}

/// The domU's lab files into the root file system, then the image.
fn build_image(cfg: &Config) -> Result<(), String> {
    let r = rootfs(cfg);
    log("installing the domU lab files into the Debian domU rootfs and building debian-domU.img");
    let src = lab_src().join("guest/domU");
    for d in ["etc", "usr"] {
        run(Command::new("cp")
            .arg("-a")
            .arg(src.join(d))
            .arg(format!("{}/", r.display())))?;
    }
    sh(&format!(
        "cd {r} && chmod 755 usr/local/sbin/* etc/lab/* && ln -sfn /bin/busybox sbin/init && \
         echo debian-domU > etc/hostname && mkdir -p mnt/host && chmod 700 root",
        r = q(&r)
    ))?;
    let img = cfg.cache.join(IMAGE);
    let _ = std::fs::remove_file(&img);
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "labdebian", "-d"])
        .arg(&r)
        .arg(&img)
        .arg(IMAGE_SIZE))?;
    Ok(())
}

/// The newest modification time under `p` (a file or a directory).
fn newest_mtime(p: &Path) -> Option<SystemTime> {
    let m = std::fs::symlink_metadata(p).ok()?;
    let mut t = m.modified().ok()?;
    if m.is_dir() {
        for e in std::fs::read_dir(p).ok()?.flatten() {
            if let Some(x) = newest_mtime(&e.path()) {
                t = t.max(x);
            }
        }
    }
    Some(t)
}

/// `lab setup`'s part: the root file system (cached) and the image (made
/// again when the root file system or the domU's lab files are newer).
pub(super) fn setup(cfg: &Config, force: bool) -> Result<(), String> {
    setup_rootfs(cfg, force)?;
    let img = newest_mtime(&cfg.cache.join(IMAGE));
    let inputs = [
        cfg.cache.join(".debian-domU-rootfs.done"),
        lab_src().join("guest/domU"),
    ]
    .iter()
    .filter_map(|p| newest_mtime(p))
    .max();
    match (img, inputs) {
        (Some(i), Some(n)) if i > n && !force => {
            log("debian-domU.img is up to date");
            Ok(())
        }
        _ => build_image(cfg),
    }
}

/// QEMU's `-drive` argument for the image, if setup made it.
pub(super) fn qemu_drive(cfg: &Config) -> Option<String> {
    let img = cfg.cache.join(IMAGE);
    img.exists()
        .then(|| format!("file={},if=virtio,format=raw,readonly=on", img.display()))
}

/// Packs `files` into an uncompressed cpio archive with them in `mnt/host/`.
fn extra_cpio(cfg: &Config, name: &str, files: &[PathBuf]) -> Result<String, String> {
    let stage = cfg.cache.join(format!("stage-{name}"));
    let _ = std::fs::remove_dir_all(&stage);
    let host = stage.join("mnt/host");
    mkdirs(&host)?;
    for f in files {
        let base = f
            .file_name()
            .ok_or_else(|| format!("{}: not a file", f.display()))?;
        std::fs::copy(f, host.join(base)).map_err(|e| format!("copy {}: {e}", f.display()))?;
    }
    let file = format!("{name}-extra.cpio");
    let out = cfg.share_dir().join(&file);
    sh(&format!(
        "cd {} && find . -print0 | cpio --null -o -H newc --quiet > {}",
        q(&stage),
        q(&out)
    ))?;
    let _ = std::fs::remove_dir_all(&stage);
    Ok(format!("/mnt/host/{file}"))
}

/// Creates the domU `name` from the Debian root file system, with `files`
/// in its `/mnt/host/` (nothing else: not the lab's binaries unless they
/// are among `files`), and waits for its agent. Returns how long it took.
///
/// The lab must have been started after `setup` made the image (dom0 then
/// has [`DOM0_DISK`]).
pub(crate) fn create(lab: &Lab, name: &str, files: &[PathBuf]) -> Result<Duration, String> {
    let t = Instant::now();
    let cfg = lab.cfg();
    if lab.running_domus()?.iter().any(|d| d == name) {
        return Err(format!("{name} already exists"));
    }
    let extra = extra_cpio(cfg, name, files)?;
    let r = lab.dom0(
        &format!(
            "[ -b {DOM0_DISK} ] || {{ echo 'dom0 has no {DOM0_DISK}: the lab was started before setup made {IMAGE}; \
             restart it (cargo xtask lab stop)'; exit 1; }}; \
             LAB_ROOT_DISK={DOM0_DISK} LAB_EXTRA_CPIO={extra} lab-domu create {name} {}",
            cfg.domu_mem
        ),
        cfg.boot_timeout,
    )?;
    if !r.ok() {
        return Err(format!("creating {name} (Debian root): {}", r.all()));
    }
    Ok(t.elapsed())
}

/// Destroys the domU `name` (created by [`create`]) and removes its archive.
pub(crate) fn destroy(lab: &Lab, name: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(lab.cfg().share_dir().join(format!("{name}-extra.cpio")));
    let r = lab.dom0(
        &format!("xl destroy {name} && rm -f /run/lab/initrd-{name}.img /run/lab/{name}.cfg"),
        Duration::from_secs(120),
    )?;
    if r.ok() {
        Ok(())
    } else {
        Err(format!("xl destroy {name}: {}", r.all()))
    }
}
