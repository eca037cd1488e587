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
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::package::run_tool;

/// What the stand-in C command prints: `C qrexec-client-vm ARGS`.
const FAKE_C: &str = "#!/bin/sh\necho \"C qrexec-client-vm $*\"\n";
/// The stand-in C package's files (path in the root, content, mode): the
/// command and its man page (not a real gzip file; only its presence and
/// name matter here).
const FAKE_C_FILES: [(&str, &str, u32); 2] = [
    ("usr/bin/qrexec-client-vm", FAKE_C, 0o755),
    (
        "usr/share/man/man1/qrexec-client-vm.1.gz",
        "C man page",
        0o644,
    ),
];
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

fn expect(what: &str, got: &str, want: &str) -> Result<(), String> {
    if got.contains(want) {
        println!("  ok  {what}");
        Ok(())
    } else {
        Err(format!("{what}: expected {want:?} in {got:?}"))
    }
}

/// A throwaway copy of the base root file system, in which the packages
/// are installed and removed; every check of a package runs in one.
struct Scratch {
    root: PathBuf,
}

impl Scratch {
    /// Copies `base` to `work/name` (a copy left there by a failed run goes
    /// first).
    fn copy(base: &Path, work: &Path, name: &str) -> Result<Self, String> {
        let root = work.join(name);
        let _ = std::fs::remove_dir_all(&root);
        run_tool(Command::new("cp").arg("-a").arg(base).arg(&root))?;
        Ok(Self { root })
    }

    /// Copies `files` into the root's `/tmp`; their paths as seen inside.
    fn stage<const N: usize>(&self, files: [&Path; N]) -> Result<[String; N], String> {
        let mut inside = [const { String::new() }; N];
        for (f, at) in files.iter().zip(&mut inside) {
            let name = f.file_name().ok_or("a package path without a name")?;
            std::fs::copy(f, self.root.join("tmp").join(name)).map_err(|e| e.to_string())?;
            *at = format!("/tmp/{}", name.to_string_lossy());
        }
        Ok(inside)
    }

    /// Runs `args` chrooted into the copy.
    fn chroot(&self, args: &[&str]) -> Result<String, String> {
        run_tool(Command::new("chroot").arg(&self.root).args(args))
    }

    /// `rpm --root <copy> args...`.
    fn rpm<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String, String> {
        run_tool(Command::new("rpm").arg("--root").arg(&self.root).args(args))
    }

    /// The file tree must be `before` again after `what`.
    fn same_tree(&self, before: &BTreeSet<PathBuf>, what: &str) -> Result<(), String> {
        let after = tree(&self.root);
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

    /// Removes the copy (kept after a failed check, for a look).
    fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The `.rpm` checks' shape, for the command and the library alike: in a
/// copy of `base` (`dir` in `work`) with its own rpm database, readied by
/// `prepare`, `rpm -i --nodeps` the package, check it with `installed`,
/// `rpm -e` it (`name`), check with `removed`; the file tree must then be
/// as it was before `rpm -i`.
fn rpm_round_trip(
    base: &Path,
    work: &Path,
    dir: &str,
    (rpm, name): (&Path, &str),
    prepare: impl FnOnce(&Path) -> Result<(), String>,
    installed: impl FnOnce(&Scratch) -> Result<(), String>,
    removed: impl FnOnce(&Scratch) -> Result<(), String>,
) -> Result<(), String> {
    let s = Scratch::copy(base, work, dir)?;
    prepare(&s.root)?;
    s.rpm(&["--initdb"])?;
    let before = tree(&s.root);
    s.rpm(&[OsStr::new("-i"), OsStr::new("--nodeps"), rpm.as_os_str()])?;
    installed(&s)?;
    s.rpm(&["-e", name])?;
    removed(&s)?;
    s.same_tree(&before, "rpm -e")?;
    s.remove();
    Ok(())
}

/// A fresh work directory `name` in the target directory.
fn work_dir(name: &str) -> Result<PathBuf, String> {
    let work = crate::util::target_dir().join(name);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    Ok(work)
}

/// The stand-in C package: `/usr/bin/qrexec-client-vm` and its man page.
fn fake_c_deb(work: &Path) -> Result<PathBuf, String> {
    stand_in_deb(
        work,
        "qubes-core-qrexec",
        "Version: 4.4.2-1\n",
        &FAKE_C_FILES,
    )
}

/// The stand-in C package's files, put straight into `root` (for the
/// `.rpm` check: Fedora's C package is not at hand).
fn write_fake_c(root: &Path) -> Result<(), String> {
    write_files(root, &FAKE_C_FILES)
}

/// Writes `files` (path below `dir`, content, mode) with their directories.
fn write_files(dir: &Path, files: &[(&str, &str, u32)]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| e.to_string();
    for &(path, text, mode) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap_or(dir)).map_err(io)?;
        std::fs::write(&p, text).map_err(io)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(())
}

fn check_deb(base: &Path, work: &Path, deb: &Path) -> Result<(), String> {
    println!("== .deb in a copy of {}", base.display());
    let s = Scratch::copy(base, work, "deb-root")?;
    let fake = fake_c_deb(work)?;
    let [fake_in, deb_in] = s.stage([&fake, deb])?;
    s.chroot(&["dpkg", "-i", &fake_in])?;
    let before = tree(&s.root);
    s.chroot(&["dpkg", "-i", &deb_in])?;
    let div = s.chroot(&["dpkg-divert", "--list", "*qrexec-client-vm*"])?;
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
    let help = s.chroot(&["/usr/bin/qrexec-client-vm", "--help"])?;
    expect("ours answers --help", &help, "Usage: qrexec-client-vm")?;
    c_runs_aside(&s)?;
    s.chroot(&["dpkg", "-i", &fake_in])?;
    let help = s.chroot(&["/usr/bin/qrexec-client-vm", "--help"])?;
    expect(
        "an upgrade of the C package leaves ours in place",
        &help,
        "Usage: qrexec-client-vm",
    )?;
    s.chroot(&["dpkg", "--purge", "qrexec-client-vm-rs"])?;
    c_is_back(&s, "after purge")?;
    s.same_tree(&before, "dpkg --purge")?;
    s.remove();
    Ok(())
}

/// With ours installed, the C command still runs as `.distrib`.
fn c_runs_aside(s: &Scratch) -> Result<(), String> {
    let c = s.chroot(&["/usr/bin/qrexec-client-vm.distrib", "aside"])?;
    expect(
        "the C command runs as .distrib",
        &c,
        "C qrexec-client-vm aside",
    )
}

/// With ours removed, the C command is back at its own name.
fn c_is_back(s: &Scratch, when: &str) -> Result<(), String> {
    let c = s.chroot(&["/usr/bin/qrexec-client-vm", "back"])?;
    expect(
        &format!("{when} the C command is back"),
        &c,
        "C qrexec-client-vm back",
    )
}

fn check_rpm(base: &Path, work: &Path, rpm: &Path) -> Result<(), String> {
    println!(
        "== .rpm in a copy of {} with its own rpm database",
        base.display()
    );
    rpm_round_trip(
        base,
        work,
        "rpm-root",
        (rpm, "qrexec-client-vm-rs"),
        write_fake_c,
        |s| {
            let help = s.chroot(&["/usr/bin/qrexec-client-vm", "--help"])?;
            expect("ours answers --help", &help, "Usage: qrexec-client-vm")?;
            c_runs_aside(s)
        },
        |s| c_is_back(s, "after rpm -e"),
    )
}

/// Check both packages against copies of `base`.
pub fn run(base: &Path, deb: &Path, rpm: &Path) -> Result<(), String> {
    if !base.join("var/lib/dpkg/status").is_file() {
        return Err(format!(
            "{} is not a Debian root file system",
            base.display()
        ));
    }
    let work = work_dir("package-check")?;
    check_deb(base, &work, deb)?;
    check_rpm(base, &work, rpm)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

// --- the drop-in library (`libvchan-xen-rs`) --------------------------------

/// A minimal `.deb` built from `files` (path in the root, content, mode)
/// with the control fields `control` (Version, Depends, …).
fn stand_in_deb(
    work: &Path,
    name: &str,
    control: &str,
    files: &[(&str, &str, u32)],
) -> Result<PathBuf, String> {
    let pkg = work.join(format!("stand-in-{name}"));
    let _ = std::fs::remove_dir_all(&pkg);
    write_files(
        &pkg,
        &[(
            "DEBIAN/control",
            &format!(
                "Package: {name}\n{control}Architecture: all\n\
                 Maintainer: test <test@example.invalid>\nDescription: stand-in for a Qubes package\n"
            ),
            0o644,
        )],
    )?;
    write_files(&pkg, files)?;
    let deb = work.join(format!("{name}.deb"));
    run_tool(
        Command::new("dpkg-deb")
            .args(["-b", "--root-owner-group"])
            .arg(&pkg)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// Loads `lib` in the root with perl's DynaLoader (the dynamic linker and,
/// for a bare soname, its cache) and looks up two API symbols.
fn loads_in_root(s: &Scratch, lib: &str) -> Result<String, String> {
    s.chroot(&[
        "perl",
        "-MDynaLoader",
        "-e",
        &format!(
            "my $h = DynaLoader::dl_load_file('{lib}') or die DynaLoader::dl_error(); \
                 for my $s ('libvchan_server_init', 'libxenvchan_server_init') {{ \
                 DynaLoader::dl_find_symbol($h, $s) or die \"no $s\" }} print \"loaded\\n\""
        ),
    ])
}

fn check_library_deb(base: &Path, work: &Path, deb: &Path) -> Result<(), String> {
    println!(
        "== {} in a copy of {}",
        crate::package::LIB_PKG,
        base.display()
    );
    let s = Scratch::copy(base, work, "lib-deb-root")?;
    let theirs = stand_in_deb(
        work,
        "libvchan-xen1",
        "Version: 4.2.8-1\n",
        &[(
            "usr/lib/libvchan-xen.so.1",
            "C libvchan-xen stand-in\n",
            0o644,
        )],
    )?;
    // What a Qubes VM has on top: a package that needs the library.
    let user = stand_in_deb(
        work,
        "qubes-core-agent",
        "Version: 4.2.0-1\nDepends: libvchan-xen1 (>= 4.2)\n",
        &[],
    )?;
    let [theirs_in, user_in, deb_in] = s.stage([&theirs, &user, deb])?;
    let before = tree(&s.root);
    s.chroot(&["dpkg", "-i", &theirs_in])?;
    s.chroot(&["dpkg", "-i", &user_in])?;
    s.chroot(&["dpkg", "-i", &deb_in])?;
    let status = s
        .chroot(&[
            "dpkg-query",
            "-W",
            "-f",
            "${db:Status-Status}\n",
            "libvchan-xen1",
        ])
        .unwrap_or_default();
    if status.trim() == "installed" {
        return Err("Qubes' libvchan-xen1 is still installed beside ours".into());
    }
    println!("  ok  installing ours took libvchan-xen1 out (Conflicts + Replaces)");
    let audit = s.chroot(&["dpkg", "--audit"])?;
    if !audit.trim().is_empty() {
        return Err(format!("dpkg --audit: {audit}"));
    }
    println!(
        "  ok  what depends on libvchan-xen1 (>= 4.2) is satisfied by ours (dpkg --audit is clean)"
    );
    let so = s.root.join("usr/lib/libvchan-xen.so.1");
    expect(
        "upstream's soname",
        &crate::util::soname(&so)?,
        "libvchan-xen.so.1",
    )?;
    for f in crate::libvchan::FILES {
        let p = s.root.join("usr").join(f.replace("LIB/", "lib/"));
        if std::fs::symlink_metadata(&p).is_err() {
            return Err(format!("{} is not installed", p.display()));
        }
    }
    println!("  ok  the library, its links, .pc files and headers are in /usr");
    expect(
        "the ldconfig trigger ran: the linker cache has it",
        &s.chroot(&["ldconfig", "-p"])?,
        // (/lib or /usr/lib: the same directory on a merged-/usr root)
        "libvchan-xen.so.1 (libc6,x86-64) => ",
    )?;
    expect(
        "a program loads it by soname and finds its API",
        &loads_in_root(&s, "libvchan-xen.so.1")?,
        "loaded",
    )?;
    // Back to Qubes' library, with dpkg alone (apt install libvchan-xen1
    // does both steps at once): ours out, theirs in.
    s.chroot(&[
        "dpkg",
        "--purge",
        "--force-depends",
        crate::package::LIB_PKG,
    ])?;
    s.chroot(&["dpkg", "-i", &theirs_in])?;
    let text = std::fs::read_to_string(&so).unwrap_or_default();
    expect(
        "switched back: Qubes' library is in place",
        &text,
        "C libvchan-xen stand-in",
    )?;
    s.chroot(&["dpkg", "--purge", "qubes-core-agent", "libvchan-xen1"])?;
    s.same_tree(&before, "dpkg --purge of all three")?;
    s.remove();
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
    rpm_round_trip(
        base,
        work,
        "lib-rpm-root",
        (rpm, crate::package::LIB_PKG),
        // What the package requires on Fedora (pkgconf owns this directory).
        |root| std::fs::create_dir_all(root.join("usr/lib64/pkgconfig")).map_err(|e| e.to_string()),
        |s| {
            let so = s.root.join("usr/lib64/libvchan-xen.so.1");
            expect(
                "upstream's soname",
                &crate::util::soname(&so)?,
                "libvchan-xen.so.1",
            )?;
            for f in crate::libvchan::FILES {
                let p = s.root.join("usr").join(f.replace("LIB/", "lib64/"));
                if !p.is_file() {
                    return Err(format!("{} is not installed", p.display()));
                }
            }
            println!("  ok  the library, its other names, .pc files and headers are in /usr");
            expect(
                "it loads and has the API",
                &loads_in_root(s, "/usr/lib64/libvchan-xen.so.1")?,
                "loaded",
            )
        },
        |_| Ok(()),
    )
}

/// Check both library packages against copies of `base`.
pub fn run_library(base: &Path, deb: &Path, rpm: &Path) -> Result<(), String> {
    let work = work_dir("package-check-lib")?;
    check_library_deb(base, &work, deb)?;
    check_library_rpm(base, &work, rpm)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Only the `.rpm` check, against a copy of `base` (the lab's `package`
/// phase, with its Debian domU's root file system).
pub(crate) fn run_rpm(base: &Path, rpm: &Path) -> Result<(), String> {
    let work = work_dir("package-check-rpm")?;
    let r = check_rpm(base, &work, rpm);
    let _ = std::fs::remove_dir_all(&work);
    r
}
