//! `cargo xtask package --check-root DEBIAN_ROOT` (as root): install and
//! remove both packages as a user would, in throwaway copies of a Debian
//! root file system (e.g. from `debootstrap --variant=minbase bookworm`),
//! with a stand-in for the C `qrexec-client-vm` in place:
//!
//! * `.deb`: `dpkg -i` the stand-in C package, then ours: the C command is
//!   diverted to `.distrib`, ours runs (`--help`); reinstalling the C
//!   package leaves ours in place; `dpkg --purge` brings the C command back
//!   and leaves the file tree as it was.
//! * `.rpm`: `rpm --root` into a copy with its own rpm database and the C
//!   files in place: ours is linked in, runs, and `rpm -e` brings the C
//!   command back and leaves the file tree as it was.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::package::run_tool;

/// What the stand-in C command prints: `C qrexec-client-vm ARGS`.
const FAKE_C: &str = "#!/bin/sh\necho \"C qrexec-client-vm $*\"\n";
/// Parts of a root that change without any package doing anything.
const SKIP: [&str; 6] = ["proc", "tmp", "var/cache", "var/log", "var/lib/rpm", "dev"];

/// Every path under `root` (relative), except [`SKIP`].
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
            if SKIP.iter().any(|s| rel == Path::new(s)) {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
            out.insert(rel);
        }
    }
    out
}

fn same_tree(before: &BTreeSet<PathBuf>, root: &Path, what: &str) -> Result<(), String> {
    let after = tree(root);
    let added: Vec<_> = after.difference(before).collect();
    let removed: Vec<_> = before.difference(&after).collect();
    if added.is_empty() && removed.is_empty() {
        println!("  ok  {what}: the file tree is as it was");
        Ok(())
    } else {
        Err(format!(
            "{what}: left behind {added:?}, removed {removed:?}"
        ))
    }
}

fn chroot(root: &Path, args: &[&str]) -> Result<String, String> {
    run_tool(Command::new("chroot").arg(root).args(args))
}

fn expect(what: &str, got: &str, want: &str) -> Result<(), String> {
    if got.contains(want) {
        println!("  ok  {what}");
        Ok(())
    } else {
        Err(format!("{what}: expected {want:?} in {got:?}"))
    }
}

fn copy_root(base: &Path, to: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(to);
    run_tool(Command::new("cp").arg("-a").arg(base).arg(to)).map(|_| ())
}

/// The stand-in C package: `/usr/bin/qrexec-client-vm` and its man page.
fn fake_c_deb(work: &Path) -> Result<PathBuf, String> {
    let pkg = work.join("fake-c");
    let io = |e: std::io::Error| e.to_string();
    std::fs::create_dir_all(pkg.join("DEBIAN")).map_err(io)?;
    std::fs::create_dir_all(pkg.join("usr/bin")).map_err(io)?;
    std::fs::create_dir_all(pkg.join("usr/share/man/man1")).map_err(io)?;
    std::fs::write(
        pkg.join("DEBIAN/control"),
        "Package: qubes-core-qrexec\nVersion: 4.4.2-1\nArchitecture: all\n\
         Maintainer: test <test@example.invalid>\nDescription: stand-in for the C package\n",
    )
    .map_err(io)?;
    write_fake_c(&pkg)?;
    let deb = work.join("qubes-core-qrexec_4.4.2-1_all.deb");
    run_tool(
        Command::new("dpkg-deb")
            .args(["-b", "--root-owner-group"])
            .arg(&pkg)
            .arg(&deb),
    )?;
    Ok(deb)
}

fn write_fake_c(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let bin = root.join("usr/bin/qrexec-client-vm");
    std::fs::write(&bin, FAKE_C).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    // Not a real gzip file; only its presence and name matter here.
    std::fs::write(
        root.join("usr/share/man/man1/qrexec-client-vm.1.gz"),
        "C man page",
    )
    .map_err(|e| e.to_string())
}

fn check_deb(base: &Path, work: &Path, deb: &Path) -> Result<(), String> {
    println!("== .deb in a copy of {}", base.display());
    let root = work.join("deb-root");
    copy_root(base, &root)?;
    let fake = fake_c_deb(work)?;
    for f in [&fake, &deb.to_path_buf()] {
        std::fs::copy(f, root.join("tmp").join(f.file_name().unwrap()))
            .map_err(|e| e.to_string())?;
    }
    let in_root = |f: &Path| format!("/tmp/{}", f.file_name().unwrap().to_string_lossy());
    let (fake_in, deb_in) = (in_root(&fake), in_root(deb));
    chroot(&root, &["dpkg", "-i", &fake_in])?;
    let before = tree(&root);
    chroot(&root, &["dpkg", "-i", &deb_in])?;
    let div = chroot(&root, &["dpkg-divert", "--list", "*qrexec-client-vm*"])?;
    expect(
        "the C command is diverted",
        &div,
        "/usr/bin/qrexec-client-vm.distrib",
    )?;
    expect(
        "the C man page is diverted",
        &div,
        "qrexec-client-vm.distrib.1.gz",
    )?;
    let help = chroot(&root, &["/usr/bin/qrexec-client-vm", "--help"])?;
    expect("ours answers --help", &help, "Usage: qrexec-client-vm")?;
    let c = chroot(&root, &["/usr/bin/qrexec-client-vm.distrib", "aside"])?;
    expect(
        "the C command runs as .distrib",
        &c,
        "C qrexec-client-vm aside",
    )?;
    chroot(&root, &["dpkg", "-i", &fake_in])?;
    let help = chroot(&root, &["/usr/bin/qrexec-client-vm", "--help"])?;
    expect(
        "an upgrade of the C package leaves ours in place",
        &help,
        "Usage: qrexec-client-vm",
    )?;
    chroot(&root, &["dpkg", "--purge", "qrexec-client-vm-rs"])?;
    let c = chroot(&root, &["/usr/bin/qrexec-client-vm", "back"])?;
    expect(
        "after purge the C command is back",
        &c,
        "C qrexec-client-vm back",
    )?;
    same_tree(&before, &root, "dpkg --purge")?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

fn check_rpm(base: &Path, work: &Path, rpm: &Path) -> Result<(), String> {
    println!(
        "== .rpm in a copy of {} with its own rpm database",
        base.display()
    );
    let root = work.join("rpm-root");
    copy_root(base, &root)?;
    write_fake_c(&root)?;
    run_tool(Command::new("rpm").arg("--root").arg(&root).arg("--initdb"))?;
    let before = tree(&root);
    run_tool(
        Command::new("rpm")
            .arg("--root")
            .arg(&root)
            .args(["-i", "--nodeps"])
            .arg(rpm),
    )?;
    let help = chroot(&root, &["/usr/bin/qrexec-client-vm", "--help"])?;
    expect("ours answers --help", &help, "Usage: qrexec-client-vm")?;
    let c = chroot(&root, &["/usr/bin/qrexec-client-vm.distrib", "aside"])?;
    expect(
        "the C command runs as .distrib",
        &c,
        "C qrexec-client-vm aside",
    )?;
    run_tool(
        Command::new("rpm")
            .arg("--root")
            .arg(&root)
            .args(["-e", "qrexec-client-vm-rs"]),
    )?;
    let c = chroot(&root, &["/usr/bin/qrexec-client-vm", "back"])?;
    expect(
        "after rpm -e the C command is back",
        &c,
        "C qrexec-client-vm back",
    )?;
    same_tree(&before, &root, "rpm -e")?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// Check both packages against copies of `base`.
pub fn run(base: &Path, deb: &Path, rpm: &Path) -> Result<(), String> {
    if !base.join("var/lib/dpkg/status").is_file() {
        return Err(format!(
            "{} is not a Debian root file system",
            base.display()
        ));
    }
    let work = crate::util::target_dir().join("package-check");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    check_deb(base, &work, deb)?;
    check_rpm(base, &work, rpm)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Only the `.rpm` check, against a copy of `base` (the lab's `package`
/// phase, with its Debian domU's root file system).
pub(crate) fn run_rpm(base: &Path, rpm: &Path) -> Result<(), String> {
    let work = crate::util::target_dir().join("package-check-rpm");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let r = check_rpm(base, &work, rpm);
    let _ = std::fs::remove_dir_all(&work);
    r
}
