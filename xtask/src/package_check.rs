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
//!
//! And the drop-in library `libvchan-xen-rs` ([`run_library`]):
//!
//! * `.deb`: over stand-ins for Qubes' `libvchan-xen1` and a package that
//!   depends on it (`>= 4.2`): installing ours takes theirs out (Conflicts
//!   and Replaces) and keeps the dependent satisfied (versioned Provides);
//!   the library has upstream's soname, every file of the install layout
//!   is there, the ldconfig trigger put it in the linker cache, and a
//!   program (perl's DynaLoader) loads it by soname and resolves the API; switching back (ours
//!   purged, theirs installed) puts Qubes' file back; purging everything
//!   leaves the tree as it was.
//! * `.rpm`: its Provides/Conflicts name Qubes' packages; `rpm --root -i`
//!   installs the layout under `/usr/lib64`, the library loads, `rpm -e`
//!   leaves the tree as it was.

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

// --- the drop-in library (`libvchan-xen-rs`) --------------------------------

/// A minimal `.deb` built from `files` (path in the root, content) with the
/// control fields `control` (Package, Version, …).
fn stand_in_deb(
    work: &Path,
    name: &str,
    control: &str,
    files: &[(&str, &str)],
) -> Result<PathBuf, String> {
    let pkg = work.join(format!("stand-in-{name}"));
    let io = |e: std::io::Error| e.to_string();
    let _ = std::fs::remove_dir_all(&pkg);
    std::fs::create_dir_all(pkg.join("DEBIAN")).map_err(io)?;
    std::fs::write(
        pkg.join("DEBIAN/control"),
        format!(
            "Package: {name}\n{control}Architecture: all\n\
             Maintainer: test <test@example.invalid>\nDescription: stand-in for a Qubes package\n"
        ),
    )
    .map_err(io)?;
    for (path, text) in files {
        let p = pkg.join(path);
        std::fs::create_dir_all(p.parent().unwrap_or(&pkg)).map_err(io)?;
        std::fs::write(&p, text).map_err(io)?;
    }
    let deb = work.join(format!("{name}.deb"));
    run_tool(
        Command::new("dpkg-deb")
            .args(["-b", "--root-owner-group"])
            .arg(&pkg)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// The soname of the ELF file at `path` (host readelf).
fn soname(path: &Path) -> Result<String, String> {
    let out = run_tool(Command::new("readelf").args(["-d", "-W"]).arg(path))?;
    Ok(out
        .lines()
        .find_map(|l| l.split("Library soname: [").nth(1))
        .and_then(|l| l.split(']').next())
        .unwrap_or("")
        .to_string())
}

/// Loads `lib` in the root with perl's DynaLoader (the dynamic linker and,
/// for a bare soname, its cache) and looks up two API symbols.
fn loads_in_root(root: &Path, lib: &str) -> Result<String, String> {
    chroot(
        root,
        &[
            "perl",
            "-MDynaLoader",
            "-e",
            &format!(
                "my $h = DynaLoader::dl_load_file('{lib}') or die DynaLoader::dl_error(); \
                 for my $s ('libvchan_server_init', 'libxenvchan_server_init') {{ \
                 DynaLoader::dl_find_symbol($h, $s) or die \"no $s\" }} print \"loaded\\n\""
            ),
        ],
    )
}

fn check_library_deb(base: &Path, work: &Path, deb: &Path) -> Result<(), String> {
    println!(
        "== {} in a copy of {}",
        crate::package::LIB_PKG,
        base.display()
    );
    let root = work.join("lib-deb-root");
    copy_root(base, &root)?;
    let theirs = stand_in_deb(
        work,
        "libvchan-xen1",
        "Version: 4.2.8-1\n",
        &[("usr/lib/libvchan-xen.so.1", "C libvchan-xen stand-in\n")],
    )?;
    // What a Qubes VM has on top: a package that needs the library.
    let user = stand_in_deb(
        work,
        "qubes-core-agent",
        "Version: 4.2.0-1\nDepends: libvchan-xen1 (>= 4.2)\n",
        &[],
    )?;
    for f in [&theirs, &user, &deb.to_path_buf()] {
        std::fs::copy(f, root.join("tmp").join(f.file_name().unwrap()))
            .map_err(|e| e.to_string())?;
    }
    let in_root = |f: &Path| format!("/tmp/{}", f.file_name().unwrap().to_string_lossy());
    let before = tree(&root);
    chroot(&root, &["dpkg", "-i", &in_root(&theirs)])?;
    chroot(&root, &["dpkg", "-i", &in_root(&user)])?;
    chroot(&root, &["dpkg", "-i", &in_root(deb)])?;
    let status = chroot(
        &root,
        &[
            "dpkg-query",
            "-W",
            "-f",
            "${db:Status-Status}\n",
            "libvchan-xen1",
        ],
    )
    .unwrap_or_default();
    if status.trim() == "installed" {
        return Err("Qubes' libvchan-xen1 is still installed beside ours".into());
    }
    println!("  ok  installing ours took libvchan-xen1 out (Conflicts + Replaces)");
    let audit = chroot(&root, &["dpkg", "--audit"])?;
    if !audit.trim().is_empty() {
        return Err(format!("dpkg --audit: {audit}"));
    }
    println!(
        "  ok  what depends on libvchan-xen1 (>= 4.2) is satisfied by ours (dpkg --audit is clean)"
    );
    let so = root.join("usr/lib/libvchan-xen.so.1");
    expect("upstream's soname", &soname(&so)?, "libvchan-xen.so.1")?;
    for f in crate::libvchan::FILES {
        let p = root.join("usr").join(f.replace("LIB/", "lib/"));
        if std::fs::symlink_metadata(&p).is_err() {
            return Err(format!("{} is not installed", p.display()));
        }
    }
    println!("  ok  the library, its links, .pc files and headers are in /usr");
    expect(
        "the ldconfig trigger ran: the linker cache has it",
        &chroot(&root, &["ldconfig", "-p"])?,
        // (/lib or /usr/lib: the same directory on a merged-/usr root)
        "libvchan-xen.so.1 (libc6,x86-64) => ",
    )?;
    expect(
        "a program loads it by soname and finds its API",
        &loads_in_root(&root, "libvchan-xen.so.1")?,
        "loaded",
    )?;
    // Back to Qubes' library, with dpkg alone (apt install libvchan-xen1
    // does both steps at once): ours out, theirs in.
    chroot(
        &root,
        &[
            "dpkg",
            "--purge",
            "--force-depends",
            crate::package::LIB_PKG,
        ],
    )?;
    chroot(&root, &["dpkg", "-i", &in_root(&theirs)])?;
    let text = std::fs::read_to_string(&so).unwrap_or_default();
    expect(
        "switched back: Qubes' library is in place",
        &text,
        "C libvchan-xen stand-in",
    )?;
    chroot(
        &root,
        &["dpkg", "--purge", "qubes-core-agent", "libvchan-xen1"],
    )?;
    same_tree(&before, &root, "dpkg --purge of all three")?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

fn check_library_rpm(base: &Path, work: &Path, rpm: &Path) -> Result<(), String> {
    println!(
        "== {} .rpm in a copy of {} with its own rpm database",
        crate::package::LIB_PKG,
        base.display()
    );
    let meta = run_tool(
        Command::new("rpm")
            .args(["-qp", "--provides", "--conflicts"])
            .arg(rpm),
    )?;
    for want in [
        "qubes-libvchan-xen = 4.2.8",
        "libvchan-xen.so.1()(64bit)",
        "qubes-libvchan-xen-devel",
    ] {
        expect(&format!("the .rpm names {want}"), &meta, want)?;
    }
    let root = work.join("lib-rpm-root");
    copy_root(base, &root)?;
    run_tool(Command::new("rpm").arg("--root").arg(&root).arg("--initdb"))?;
    // What the package requires on Fedora (pkgconf owns this directory).
    std::fs::create_dir_all(root.join("usr/lib64/pkgconfig")).map_err(|e| e.to_string())?;
    let before = tree(&root);
    run_tool(
        Command::new("rpm")
            .arg("--root")
            .arg(&root)
            .args(["-i", "--nodeps"])
            .arg(rpm),
    )?;
    let so = root.join("usr/lib64/libvchan-xen.so.1");
    expect("upstream's soname", &soname(&so)?, "libvchan-xen.so.1")?;
    for f in crate::libvchan::FILES {
        let p = root.join("usr").join(f.replace("LIB/", "lib64/"));
        if !p.is_file() {
            return Err(format!("{} is not installed", p.display()));
        }
    }
    println!("  ok  the library, its other names, .pc files and headers are in /usr");
    expect(
        "it loads and has the API",
        &loads_in_root(&root, "/usr/lib64/libvchan-xen.so.1")?,
        "loaded",
    )?;
    run_tool(
        Command::new("rpm")
            .arg("--root")
            .arg(&root)
            .args(["-e", crate::package::LIB_PKG]),
    )?;
    same_tree(&before, &root, "rpm -e")?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// Check both library packages against copies of `base`.
pub fn run_library(base: &Path, deb: &Path, rpm: &Path) -> Result<(), String> {
    let work = crate::util::target_dir().join("package-check-lib");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    check_library_deb(base, &work, deb)?;
    check_library_rpm(base, &work, rpm)?;
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
