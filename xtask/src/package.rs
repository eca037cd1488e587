//! `cargo xtask package`: a `.deb` (cargo-deb) and an `.rpm`
//! (cargo-generate-rpm) of `qrexec-client-vm`, with the man page and the
//! completions generated from the clap definition (`crate::man`), and of
//! the drop-in libvchan (`libvchan-xen-rs`: `libvchan-xen.so.1` with
//! upstream's soname, the development links and `.pc` files, laid out as
//! `cargo xtask libvchan install` does).
//!
//! The packages' metadata and maintainer scripts live with the crates
//! (`client/Cargo.toml`, `client/packaging/`, `libvchan/Cargo.toml`,
//! `libvchan/packaging/`); this command builds the release binary and
//! library, renders the generated assets into `<target>/release/pkg-assets/`
//! (where that metadata expects them), runs both tools into
//! `<target>/packages/`, and lists what each package holds.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{cargo, root, target_dir};

/// The crate that ships the command.
const CRATE: &str = "qrexec";
/// The package names (as in the crates' metadata).
pub(crate) const CLIENT_PKG: &str = "qrexec-client-vm-rs";
pub(crate) const LIB_PKG: &str = "libvchan-xen-rs";

/// What the client's `.deb` installs: the assets of `client/Cargo.toml`'s
/// `[package.metadata.deb]` and the copyright file cargo-deb adds. The
/// lab's `package` phase checks `dpkg-deb -c`, `dpkg -L` and the installed
/// tree against it.
pub(crate) const CLIENT_DEB_FILES: &[&str] = &[
    "/usr/bin/qrexec-client-vm",
    "/usr/share/man/man1/qrexec-client-vm.1.gz",
    "/usr/share/bash-completion/completions/qrexec-client-vm",
    "/usr/share/zsh/vendor-completions/_qrexec-client-vm",
    "/usr/share/fish/vendor_completions.d/qrexec-client-vm.fish",
    "/usr/share/doc/qrexec-client-vm-rs/copyright",
];
/// What the client's `.rpm` installs: the assets of
/// `[package.metadata.generate-rpm]` (the lab checks `rpm -qlp`).
pub(crate) const CLIENT_RPM_FILES: &[&str] = &[
    "/usr/libexec/qrexec-client-vm-rs",
    "/usr/share/man/man1/qrexec-client-vm-rs.1.gz",
    "/usr/share/bash-completion/completions/qrexec-client-vm",
    "/usr/share/zsh/site-functions/_qrexec-client-vm",
    "/usr/share/fish/vendor_completions.d/qrexec-client-vm.fish",
];

/// Where the generated assets go, relative to the target directory.
const ASSETS: &str = "release/pkg-assets";

fn have(tool: &str) -> bool {
    Command::new("cargo")
        .args([tool, "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a tool in the workspace root ([`crate::util::run_output`]).
pub(crate) fn run_tool(cmd: &mut Command) -> Result<String, String> {
    crate::util::run_output(cmd.current_dir(root()))
}

/// Render the man page (gzip'd, as packages ship it) and the completions.
fn assets(dir: &Path) -> Result<(), String> {
    let written = crate::man::generate(dir)?;
    let man = written
        .iter()
        .find(|p| p.ends_with(crate::man::MAN_FILE))
        .ok_or("no man page written")?;
    // -n: no name or time stamp in the header, so the package is reproducible.
    run_tool(Command::new("gzip").args(["-9nf"]).arg(man))?;
    Ok(())
}

/// A stripped copy of the release binary for the `.rpm` (cargo-deb strips
/// its own copy; cargo-generate-rpm packs what it is given).
fn stripped_binary(target: &Path, dir: &Path) -> Result<(), String> {
    let bin = target.join("release").join(crate::man::BIN);
    let copy = dir.join(crate::man::BIN);
    std::fs::copy(&bin, &copy).map_err(|e| format!("{}: {e}", bin.display()))?;
    run_tool(Command::new("strip").arg(&copy))?;
    Ok(())
}

/// The drop-in library's staging trees: `libvchan-deb` (libdir `lib`, as
/// Debian's libvchan-xen1) and `libvchan-rpm` (`lib64`, as Fedora's
/// qubes-libvchan-xen), from a stripped copy of the release library.
fn library_assets(dir: &Path) -> Result<(), String> {
    let so = dir.join("libvchan-xen.so.1");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let built = crate::libvchan::built_library();
    let _ = std::fs::remove_file(&so);
    std::fs::copy(&built, &so).map_err(|e| format!("{}: {e}", built.display()))?;
    // --strip-unneeded keeps the dynamic symbol table (the API).
    run_tool(Command::new("strip").arg("--strip-unneeded").arg(&so))?;
    for (stage, libdir) in [("libvchan-deb", "lib"), ("libvchan-rpm", "lib64")] {
        let stage = dir.join(stage);
        let _ = std::fs::remove_dir_all(&stage);
        crate::libvchan::layout(&so, &stage, Path::new("/usr"), libdir)?;
    }
    Ok(())
}

/// The newest file in `dir` whose name starts with `prefix` and ends with
/// `suffix` (also how the lab finds the packages this command made).
pub(crate) fn newest(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf, String> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .map_err(|e| e.to_string())?;
            if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                best = Some((t, p));
            }
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| format!("no {prefix}*{suffix} in {}", dir.display()))
}

const USAGE: &str = "usage: cargo xtask package [--no-build] [--check-root DEBIAN_ROOT]";

/// `cargo xtask package [--no-build] [--check-root DEBIAN_ROOT]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut build = true;
    let mut check_root = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--no-build" => build = false,
            "--check-root" => check_root = Some(PathBuf::from(it.next().ok_or(USAGE)?)),
            _ => return Err(USAGE.into()),
        }
    }
    let missing: Vec<_> = ["deb", "generate-rpm"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing cargo-{}: cargo install --locked cargo-deb cargo-generate-rpm",
            missing.join(" and cargo-")
        ));
    }
    let target = target_dir();
    if build {
        cargo(&["build", "--release", "-p", CRATE, "--bin", crate::man::BIN])?;
        cargo(&["build", "--release", "-p", "libvchan"])?;
    }
    assets(&target.join(ASSETS))?;
    stripped_binary(&target, &target.join(ASSETS))?;
    library_assets(&target.join(ASSETS))?;
    let out = target.join("packages");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;

    run_tool(
        Command::new("cargo")
            .args([
                "deb",
                "-p",
                CRATE,
                "--no-build",
                "--no-dbgsym",
                "--strip",
                "-o",
            ])
            .arg(&out),
    )?;
    let deb = newest(&out, CLIENT_PKG, ".deb")?;
    run_tool(
        Command::new("cargo")
            .args([
                "generate-rpm",
                "-p",
                "client",
                "--payload-compress",
                "gzip",
                "-o",
            ])
            .arg(&out),
    )?;
    let rpm = newest(&out, CLIENT_PKG, ".rpm")?;
    // The library: cargo-deb must not strip it again (done above, keeping
    // the dynamic symbols).
    run_tool(
        Command::new("cargo")
            .args([
                "deb",
                "-p",
                "libvchan",
                "--no-build",
                "--no-dbgsym",
                "--no-strip",
                "-o",
            ])
            .arg(&out),
    )?;
    let lib_deb = newest(&out, LIB_PKG, ".deb")?;
    run_tool(
        Command::new("cargo")
            .args([
                "generate-rpm",
                "-p",
                "libvchan",
                "--payload-compress",
                "gzip",
                "-o",
            ])
            .arg(&out),
    )?;
    let lib_rpm = newest(&out, LIB_PKG, ".rpm")?;

    for p in [&deb, &lib_deb] {
        println!("{}", p.display());
        if let Ok(list) = run_tool(Command::new("dpkg-deb").arg("-c").arg(p)) {
            print!("{list}");
        }
    }
    for p in [&rpm, &lib_rpm] {
        println!("{}", p.display());
        if let Ok(list) = run_tool(Command::new("rpm").args(["-qlp"]).arg(p)) {
            print!("{list}");
        }
    }
    if let Some(base) = check_root {
        crate::package_check::run(&base, &deb, &rpm)?;
        crate::package_check::run_library(&base, &lib_deb, &lib_rpm)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every generated asset the package metadata names is one that `man`
    /// and `package` produce, and both packages install the man page and the
    /// three completions: the metadata cannot drift from the generator.
    #[test]
    fn package_metadata_names_the_generated_assets() {
        let toml = std::fs::read_to_string(root().join("client/Cargo.toml")).unwrap();
        let mut produced: Vec<String> = vec![
            format!("{}.gz", crate::man::MAN_FILE),
            crate::man::BIN.to_string(),
        ];
        produced.extend(crate::man::COMPLETIONS.iter().map(|(_, f)| f.to_string()));
        let prefix = format!("target/{ASSETS}/");
        let mut named = 0;
        for (i, _) in toml.match_indices(&prefix) {
            let rest = &toml[i + prefix.len()..];
            let name = &rest[..rest.find('"').unwrap()];
            assert!(
                produced.iter().any(|p| p == name),
                "{name} is not generated"
            );
            named += 1;
        }
        // deb: man page + 3 completions; rpm: binary + man page + 3 completions.
        assert_eq!(named, 9);
        // Where they are installed: `the_client_file_lists_match_the_metadata`.
    }

    /// Each file the client's packages must install (the lists the lab's
    /// `package` phase checks the built packages and the installed tree
    /// against) is a destination in `client/Cargo.toml`: the .deb's
    /// without a leading `/` (cargo-deb), the .rpm's with one; the
    /// copyright file is cargo-deb's own.
    #[test]
    fn the_client_file_lists_match_the_metadata() {
        let toml = std::fs::read_to_string(root().join("client/Cargo.toml")).unwrap();
        for f in CLIENT_DEB_FILES.iter().filter(|f| !f.contains("/doc/")) {
            assert!(
                toml.contains(&format!("\"{}\"", f.trim_start_matches('/'))),
                "{f} is not installed by the .deb"
            );
        }
        assert!(
            CLIENT_DEB_FILES.contains(&format!("/usr/share/doc/{CLIENT_PKG}/copyright").as_str())
        );
        for f in CLIENT_RPM_FILES {
            assert!(
                toml.contains(&format!("\"{f}\"")),
                "{f} is not installed by the .rpm"
            );
        }
        // The command, the man page and the three completions each.
        assert_eq!(CLIENT_DEB_FILES.len(), 6);
        assert_eq!(CLIENT_RPM_FILES.len(), 5);
    }

    /// The value of `key = "..."` in `line`, if there.
    fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        let at = line.find(&format!("{key} = \""))? + key.len() + 4;
        let rest = &line[at..];
        Some(&rest[..rest.find('"')?])
    }

    /// The library packages install exactly what `cargo xtask libvchan
    /// install` lays out (`crate::libvchan::FILES`, which a test of that
    /// module checks against the files written), each from the staging
    /// tree `library_assets` fills and at the same path under `/usr`:
    /// libdir `lib` in the .deb (Debian's libvchan-xen1), `lib64` in the
    /// .rpm (Fedora's qubes-libvchan-xen).
    #[test]
    fn library_package_metadata_installs_the_generated_layout() {
        let toml = std::fs::read_to_string(root().join("libvchan/Cargo.toml")).unwrap();
        for (stage, libdir, dest_prefix) in [
            ("libvchan-deb", "lib", "usr/"),
            ("libvchan-rpm", "lib64", "/usr/"),
        ] {
            let src_prefix = format!("target/{ASSETS}/{stage}/");
            let mut got: Vec<String> = Vec::new();
            for line in toml.lines() {
                let (Some(src), Some(dest)) = (field(line, "source"), field(line, "dest")) else {
                    continue;
                };
                let Some(rel) = src.strip_prefix(&src_prefix) else {
                    continue;
                };
                assert_eq!(
                    dest,
                    format!("{dest_prefix}{rel}"),
                    "{stage}: {src} goes elsewhere"
                );
                got.push(rel.replacen(&format!("{libdir}/"), "LIB/", 1));
            }
            got.sort();
            let mut want: Vec<String> = crate::libvchan::FILES
                .iter()
                .map(|f| f.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "{stage}");
        }
        // What it replaces, and how to switch back, is said in both.
        for s in [
            "conflicts = \"libvchan-xen1, libvchan-xen-dev",
            "qubes-libvchan-xen = \"*\"",
            "provides = \"libvchan-xen1 (= ",
            "dnf swap libvchan-xen-rs qubes-libvchan-xen",
            "apt install libvchan-xen1",
        ] {
            assert!(toml.contains(s), "{s} missing from libvchan/Cargo.toml");
        }
    }
}
