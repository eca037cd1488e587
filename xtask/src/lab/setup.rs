//! `cargo xtask lab setup`: everything from Debian's apt, into the cache.
//!
//! 1. host packages (only the missing ones; `apt-get update` once first);
//! 2. `xen-hypervisor-4.17-amd64` and the kernel, downloaded and unpacked
//!    (nothing installed on the host);
//! 3. the dom0 root file system (`debootstrap --variant=minbase bookworm`,
//!    then `xen-utils-4.17` and friends in a chroot);
//! 4. `vchan-node` (the C libxenvchan peer, `lab/vchan-node.c`), dynamic and
//!    static;
//! 5. the domU initramfs, the dom0 stage-1 initramfs and the dom0 image;
//! 6. the Debian domU's root file system (a copy of the dom0 one + man-db)
//!    and image (`debian_domu`).
//!
//! Steps 2, 3 and 6's copy are slow and marked done in the cache (`--force` redoes
//! them); the others are rebuilt every time (a few seconds).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{Config, lab_src};

const HOST_PKGS: &[&str] = &[
    "qemu-system-x86",
    "debootstrap",
    "libxen-dev",
    "gcc",
    "libc6-dev",
    "cpio",
    "busybox-static",
    "e2fsprogs",
    "kmod",
    "socat",
    "xz-utils",
];
const DOM0_PKGS: &str =
    "xen-utils-4.17 xenstore-utils qemu-guest-agent busybox kmod iproute2 procps strace less";
const DOM0_MODULES: &[&str] = &[
    "xen-evtchn",
    "xen-gntdev",
    "xen-gntalloc",
    "xen-privcmd",
    "xenfs",
    "xen-blkback",
    "xen-netback",
    "loop",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "bridge",
    "xen-blkfront",
    "xen-netfront",
];
const DOMU_MODULES: &[&str] = &[
    "xen-evtchn",
    "xen-gntdev",
    "xen-gntalloc",
    "xenfs",
    "xen-blkfront",
    "xen-netfront",
    "9pnet_xen",
    "9p",
    // For a domU booted from a Debian root (`debian_domu`): its disk, an
    // overlay on it.
    "crc32c_generic",
    "ext4",
    "overlay",
];
const INITRD_DOM0_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];

pub(super) fn log(msg: &str) {
    eprintln!("lab setup: {msg}");
}

/// Runs a command; on failure the error carries its output (tail).
pub(super) use crate::util::run_output as run;

/// Runs a command with its output in a log file.
pub(super) fn run_logged(cmd: &mut Command, logf: &Path) -> Result<(), String> {
    let f = std::fs::File::create(logf).map_err(|e| format!("{}: {e}", logf.display()))?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let st = cmd
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .status()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        let text = std::fs::read_to_string(logf).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!(
            "{cmd:?} failed ({st}); see {}:\n{}",
            logf.display(),
            tail.join("\n")
        ))
    }
}

pub(super) fn sh(script: &str) -> Result<String, String> {
    run(Command::new("sh").arg("-c").arg(script))
}

pub(super) fn q(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

pub(super) fn mkdirs(p: &Path) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))
}

fn pkg_installed(p: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", p])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing host packages with apt-get.
fn setup_host() -> Result<(), String> {
    let missing: Vec<&str> = HOST_PKGS
        .iter()
        .copied()
        .filter(|p| !pkg_installed(p))
        .collect();
    if missing.is_empty() {
        log("host packages present");
        return Ok(());
    }
    log(&format!("installing host packages: {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    let mut extra = Vec::new();
    // bookworm-backports' qemu-utils (10.x) Breaks bookworm's
    // qemu-system-common 7.2: align it when qemu-system-x86 comes in.
    if missing.contains(&"qemu-system-x86") && pkg_installed("qemu-utils") {
        let v = run(Command::new("dpkg-query").args(["-W", "-f=${Version}", "qemu-utils"]))?;
        if !v.starts_with("1:7.") {
            extra.push("qemu-utils/bookworm");
        }
    }
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--allow-downgrades",
        ])
        .args(&missing)
        .args(&extra))?;
    Ok(())
}

/// The Debian archive this host's apt uses (not the security one).
fn host_mirror() -> Option<String> {
    let mut uris = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            if f.extension().is_some_and(|e| e == "sources") {
                for l in text.lines() {
                    if let Some(rest) = l.strip_prefix("URIs:") {
                        uris.extend(rest.split_whitespace().map(String::from));
                    }
                }
            } else if f.extension().is_some_and(|e| e == "list") {
                uris.extend(deb_lines(&text));
            }
        }
    }
    uris.extend(deb_lines(
        &std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default(),
    ));
    uris.into_iter()
        .find(|u| !u.contains("-security") && u.to_lowercase().contains("debian"))
}

fn deb_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("deb")).then(|| w.find(|x| !x.starts_with('[')))?
        })
        .map(String::from)
        .collect()
}

/// Xen and the kernel, unpacked into `pkg/`; `boot/xen`, `boot/vmlinuz`.
fn setup_boot_files(c: &Path, force: bool) -> Result<(), String> {
    let boot = c.join("boot");
    if boot.join(".done").exists() && !force {
        let v = std::fs::read_to_string(boot.join("versions")).unwrap_or_default();
        log(&format!(
            "xen + kernel already fetched ({})",
            v.lines().collect::<Vec<_>>().join("; ")
        ));
        return Ok(());
    }
    let debs = c.join("debs");
    let pkg = c.join("pkg");
    for d in [&debs, &pkg, &boot] {
        let _ = std::fs::remove_dir_all(d);
        mkdirs(d)?;
    }
    log("downloading xen-hypervisor-4.17-amd64 and linux-image-amd64 (apt-get download)");
    run(Command::new("apt-get").current_dir(&debs).args([
        "download",
        "-q",
        "xen-hypervisor-4.17-amd64",
        "linux-image-amd64",
    ]))?;
    let meta = sh(&format!(
        "dpkg-deb -f {}/linux-image-amd64_*.deb Depends",
        q(&debs)
    ))?;
    let kpkg = meta
        .split([',', ' '])
        .next()
        .filter(|s| !s.is_empty())
        .ok_or("linux-image-amd64 has no Depends")?
        .to_string();
    run(Command::new("apt-get")
        .current_dir(&debs)
        .args(["download", "-q", &kpkg]))?;
    sh(&format!(
        "for f in {d}/xen-hypervisor-*.deb {d}/{kpkg}_*.deb; do dpkg-deb -x \"$f\" {p} || exit 1; done",
        d = q(&debs),
        p = q(&pkg)
    ))?;
    let kver = only_entry(&pkg.join("lib/modules"))?;
    sh(&format!(
        "zcat {}/boot/xen-4.17-amd64.gz > {}",
        q(&pkg),
        q(&boot.join("xen"))
    ))?;
    std::fs::copy(
        pkg.join(format!("boot/vmlinuz-{kver}")),
        boot.join("vmlinuz"),
    )
    .map_err(|e| format!("copy vmlinuz: {e}"))?;
    run(Command::new("depmod").arg("-b").arg(&pkg).arg(&kver))?;
    std::fs::write(boot.join("kver"), format!("{kver}\n")).map_err(|e| e.to_string())?;
    let versions = sh(&format!(
        "for f in {}/*.deb; do dpkg-deb -f \"$f\" Package Version | paste -sd' '; done",
        q(&debs)
    ))?;
    std::fs::write(boot.join("versions"), &versions).map_err(|e| e.to_string())?;
    std::fs::write(boot.join(".done"), "").map_err(|e| e.to_string())?;
    log(&format!(
        "fetched: {}",
        versions.lines().collect::<Vec<_>>().join("; ")
    ));
    Ok(())
}

fn only_entry(dir: &Path) -> Result<String, String> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!(
            "{}: expected one kernel, found {names:?}",
            dir.display()
        )),
    }
}

/// Unmounts what a chroot needed, also on error paths.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
    }
}

fn setup_dom0_rootfs(cfg: &Config, force: bool) -> Result<(), String> {
    let c = &cfg.cache;
    let r = c.join("dom0-rootfs");
    let done = c.join(".dom0-rootfs.done");
    if done.exists() && !force {
        log("dom0 rootfs present");
        return Ok(());
    }
    let _ = std::fs::remove_file(&done);
    if r.exists() {
        std::fs::remove_dir_all(&r).map_err(|e| format!("rm {}: {e}", r.display()))?;
    }
    let mirror = cfg
        .mirror
        .clone()
        .or_else(host_mirror)
        .ok_or("no Debian archive in this host's apt sources; set LAB_MIRROR")?;
    log(&format!(
        "debootstrap --variant=minbase bookworm ({mirror}; dom0 rootfs)"
    ));
    run_logged(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&r)
            .arg(&mirror),
        &c.join("debootstrap.log"),
    )?;
    // The chroot uses this host's apt sources (bookworm, -updates, -security).
    let _ = std::fs::remove_file(r.join("etc/apt/sources.list"));
    sh(&format!(
        "cp /etc/apt/sources.list.d/*.sources {d}/etc/apt/sources.list.d/ 2>/dev/null; \
         cp /etc/apt/sources.list {d}/etc/apt/sources.list 2>/dev/null; \
         if [ -z \"$(cat {d}/etc/apt/sources.list {d}/etc/apt/sources.list.d/*.sources 2>/dev/null)\" ]; then \
           echo 'deb {mirror} bookworm main' > {d}/etc/apt/sources.list; fi; true",
        d = q(&r)
    ))?;
    let prc = r.join("usr/sbin/policy-rc.d");
    std::fs::write(&prc, "#!/bin/sh\nexit 101\n").map_err(|e| e.to_string())?;
    run(Command::new("chmod").arg("+x").arg(&prc))?;
    log(&format!("installing into the dom0 rootfs: {DOM0_PKGS}"));
    chroot_install(&r, DOM0_PKGS, &c.join("dom0-apt.log"))?;
    std::fs::write(&done, "").map_err(|e| e.to_string())?;
    Ok(())
}

/// `apt-get install PKGS` in the chroot `r` (with /proc, /dev and /sys
/// mounted for the time of it), output in `logf`.
pub(super) fn chroot_install(r: &Path, pkgs: &str, logf: &Path) -> Result<(), String> {
    let mut mounts = Mounts(Vec::new());
    run(Command::new("mount")
        .args(["-t", "proc", "proc"])
        .arg(r.join("proc")))?;
    mounts.0.push(r.join("proc"));
    for d in ["dev", "sys"] {
        run(Command::new("mount")
            .arg("--bind")
            .arg(format!("/{d}"))
            .arg(r.join(d)))?;
        mounts.0.push(r.join(d));
    }
    run_logged(
        Command::new("chroot")
            .arg(r)
            .arg("sh")
            .arg("-c")
            .arg(format!(
                "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && \
             apt-get install -y -q --no-install-recommends {pkgs} && apt-get clean"
            )),
        logf,
    )?;
    drop(mounts);
    Ok(())
}

fn build_vchan_node(c: &Path) -> Result<(), String> {
    let bin = c.join("bin");
    mkdirs(&bin)?;
    let src = lab_src().join("vchan-node.c");
    log("building vchan-node (dynamic + static) against libxen-dev");
    run(Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(bin.join("vchan-node"))
        .arg(&src)
        .args(["-lxenvchan", "-lxenstore"]))?;
    run(Command::new("gcc")
        .args(["-O2", "-Wall", "-static", "-o"])
        .arg(bin.join("vchan-node-static"))
        .arg(&src)
        .args([
            "-lxenvchan",
            "-lxengnttab",
            "-lxenevtchn",
            "-lxenstore",
            "-lxentoolcore",
            "-lxentoollog",
            "-lxencall",
            "-lpthread",
        ]))?;
    Ok(())
}

/// Copies kernel modules and their dependencies from the unpacked kernel
/// into `dst`, then runs depmod there.
fn copy_modules(c: &Path, dst: &Path, mods: &[&str]) -> Result<(), String> {
    let kver = std::fs::read_to_string(c.join("boot/kver"))
        .map_err(|e| format!("boot/kver: {e}"))?
        .trim()
        .to_string();
    let src = c.join("pkg");
    let mdst = dst.join("lib/modules");
    let _ = std::fs::remove_dir_all(&mdst);
    let kdst = mdst.join(&kver);
    mkdirs(&kdst)?;
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        std::fs::copy(src.join("lib/modules").join(&kver).join(f), kdst.join(f))
            .map_err(|e| format!("copy {f}: {e}"))?;
    }
    let mut files = std::collections::BTreeSet::new();
    for m in mods {
        let out = run(Command::new("modprobe").arg("-d").arg(&src).args([
            "-S",
            &kver,
            "--show-depends",
            m,
        ]))
        .map_err(|e| format!("module {m}: {e}"))?;
        for l in out.lines() {
            let mut w = l.split_whitespace();
            if w.next() == Some("insmod")
                && let Some(p) = w.next()
            {
                files.insert(PathBuf::from(p));
            }
        }
    }
    for f in files {
        let rel = f
            .strip_prefix(&src)
            .map_err(|_| format!("{} is outside {}", f.display(), src.display()))?;
        let to = dst.join(rel);
        if let Some(p) = to.parent() {
            mkdirs(p)?;
        }
        std::fs::copy(&f, &to).map_err(|e| format!("copy {}: {e}", f.display()))?;
    }
    run(Command::new("depmod").arg("-b").arg(dst).arg(&kver))?;
    Ok(())
}

/// Copies programs from the dom0 rootfs into `dst`, with their libraries.
pub(super) fn copy_elf(rootfs: &Path, dst: &Path, paths: &[&str]) -> Result<(), String> {
    for p in paths {
        let rel = p.trim_start_matches('/');
        sh(&format!(
            "mkdir -p {d}/$(dirname {rel}) && cp -L {r}/{rel} {d}/{rel} && \
             for lib in $(chroot {r} ldd {p} 2>/dev/null | grep -o '/[^ ]*'); do \
               mkdir -p {d}/$(dirname \"$lib\") && cp -L {r}/\"$lib\" {d}/\"$lib\" || exit 1; done",
            d = q(dst),
            r = q(rootfs)
        ))?;
    }
    Ok(())
}

/// Packs `dir` into a gzipped newc cpio archive (an initramfs).
pub(super) fn mkcpio(dir: &Path, out: &Path) -> Result<(), String> {
    sh(&format!(
        "cd {} && find . -print0 | cpio --null -o -H newc --quiet | gzip -6 > {}",
        q(dir),
        q(out)
    ))
    .map(drop)
}

fn build_domu_initrd(c: &Path) -> Result<(), String> {
    let s = c.join("stage-domU");
    let r = c.join("dom0-rootfs");
    log("building the domU initramfs");
    let _ = std::fs::remove_dir_all(&s);
    for d in [
        "bin",
        "sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "mnt/host",
        "usr/bin",
        "usr/local/bin",
    ] {
        mkdirs(&s.join(d))?;
    }
    std::fs::copy("/bin/busybox", s.join("bin/busybox"))
        .map_err(|e| format!("copy busybox: {e}"))?;
    run(Command::new("cp")
        .arg("-a")
        .arg(lab_src().join("guest/domU/."))
        .arg(format!("{}/", s.display())))?;
    copy_modules(c, &s, DOMU_MODULES)?;
    copy_elf(
        &r,
        &s,
        &[
            "/usr/bin/xenstore",
            "/usr/lib/xen-4.17/bin/vchan-socket-proxy",
            "/usr/lib/x86_64-linux-gnu/libxenvchan.so.4.17",
            "/lib/x86_64-linux-gnu/libgcc_s.so.1",
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/lib/x86_64-linux-gnu/libpthread.so.0",
            "/lib/x86_64-linux-gnu/libdl.so.2",
            "/lib/x86_64-linux-gnu/librt.so.1",
        ],
    )?;
    sh(&format!(
        "cd {s} && for t in read write ls rm exists list chmod watch; do ln -sf xenstore usr/bin/xenstore-$t; done && \
         ln -sf /usr/lib/xen-4.17/bin/vchan-socket-proxy usr/bin/vchan-socket-proxy && \
         cp {b}/vchan-node {b}/vchan-node-static usr/local/bin/ && chmod 700 root",
        s = q(&s),
        b = q(&c.join("bin"))
    ))?;
    mkcpio(&s, &c.join("initrd-domU.img"))
}

fn build_dom0_initrd(c: &Path) -> Result<(), String> {
    let s = c.join("stage-initrd-dom0");
    log("building the dom0 stage-1 initramfs");
    let _ = std::fs::remove_dir_all(&s);
    for d in ["bin", "proc", "sys", "dev", "newroot"] {
        mkdirs(&s.join(d))?;
    }
    std::fs::copy("/bin/busybox", s.join("bin/busybox"))
        .map_err(|e| format!("copy busybox: {e}"))?;
    std::fs::copy(lab_src().join("guest/initrd-dom0/init"), s.join("init"))
        .map_err(|e| format!("copy init: {e}"))?;
    run(Command::new("chmod").arg("+x").arg(s.join("init")))?;
    copy_modules(c, &s, INITRD_DOM0_MODULES)?;
    mkcpio(&s, &c.join("initrd-dom0.img"))
}

fn build_dom0_image(c: &Path) -> Result<(), String> {
    let r = c.join("dom0-rootfs");
    log("installing the lab files into the dom0 rootfs and building dom0.img (ext4)");
    run(Command::new("cp")
        .arg("-a")
        .arg(lab_src().join("guest/dom0/."))
        .arg(format!("{}/", r.display())))?;
    sh(&format!(
        "cd {r} && chmod 755 usr/local/sbin/* etc/lab/* && ln -sf /bin/busybox sbin/init && \
         echo dom0 > etc/hostname && mkdir -p var/lib/lab mnt/host usr/local/bin",
        r = q(&r)
    ))?;
    copy_modules(c, &r, DOM0_MODULES)?;
    sh(&format!(
        "cp {c}/boot/vmlinuz {r}/var/lib/lab/vmlinuz && cp {c}/initrd-domU.img {r}/var/lib/lab/initrd-domU.img && \
         cp {c}/bin/vchan-node {c}/bin/vchan-node-static {r}/usr/local/bin/",
        c = q(c),
        r = q(&r)
    ))?;
    let img = c.join("dom0.img");
    let _ = std::fs::remove_file(&img);
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "labdom0", "-d"])
        .arg(&r)
        .arg(&img)
        .arg("2G"))?;
    Ok(())
}

/// `setup [--force]`.
pub fn setup(cfg: &Config, force: bool) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("setup needs root (apt-get, debootstrap, chroot)".into());
    }
    if super::vm::running_pid(cfg).is_some() {
        return Err("the lab is running; `cargo xtask lab stop` first".into());
    }
    let t0 = Instant::now();
    let c = &cfg.cache;
    mkdirs(c)?;
    mkdirs(&cfg.share_dir())?;
    mkdirs(&cfg.run_dir())?;
    let step = |name: &str, t: Instant| {
        log(&format!("{name}: {:.1}s", t.elapsed().as_secs_f64()));
    };
    let t = Instant::now();
    setup_host()?;
    step("host packages", t);
    let t = Instant::now();
    setup_boot_files(c, force)?;
    step("xen + kernel", t);
    let t = Instant::now();
    setup_dom0_rootfs(cfg, force)?;
    step("dom0 rootfs", t);
    let t = Instant::now();
    build_vchan_node(c)?;
    build_domu_initrd(c)?;
    build_dom0_initrd(c)?;
    build_dom0_image(c)?;
    step("images", t);
    let t = Instant::now();
    super::debian_domu::setup(cfg, force)?;
    step("Debian domU image", t);
    log(&format!(
        "done in {:.1}s; cache {}",
        t0.elapsed().as_secs_f64(),
        c.display()
    ));
    Ok(())
}
