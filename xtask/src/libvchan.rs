//! `cargo xtask libvchan install --prefix DIR`: our drop-in libvchan (crate
//! `libvchan`) laid out as Qubes' packages lay out theirs, so C programs
//! build and run against it unchanged:
//!
//! ```text
//! DIR/lib/libvchan-xen.so.1            the library (release build; soname libvchan-xen.so.1)
//! DIR/lib/libvchan-xen.so              -> libvchan-xen.so.1  (as qubes-core-vchan-xen)
//! DIR/lib/libvchan-socket.so           -> libvchan-xen.so.1  (as qubes-core-vchan-socket)
//! DIR/lib/pkgconfig/vchan-xen.pc       -lvchan-xen, -I DIR/include/vchan-xen
//! DIR/lib/pkgconfig/vchan.pc           -> vchan-xen.pc       (as qubes-core-vchan-xen)
//! DIR/lib/pkgconfig/vchan-socket.pc    -lvchan-socket, -I DIR/include/vchan-socket
//! DIR/include/vchan-xen/libvchan.h     our header
//! DIR/include/vchan-socket/libvchan.h  the same header
//! ```
//!
//! One library serves both names: it picks the transport from the
//! environment at each `*_init` (see the crate docs of `libvchan`).
//! `cargo xtask package` lays out the same files with [`layout`] for the
//! `libvchan-xen-rs` packages (prefix `/usr`, libdir `lib` on Debian as
//! Qubes' `libvchan-xen1`, `lib64` on Fedora as `qubes-libvchan-xen`).

use std::fs;
use std::path::Path;

use crate::util;

pub fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, flag, prefix] if cmd == "install" && flag == "--prefix" => {
            install(Path::new(prefix))?;
            println!("libvchan installed in {prefix}");
            Ok(())
        }
        _ => Err("usage: cargo xtask libvchan install --prefix DIR".into()),
    }
}

/// The version our `.pc` files announce: the workspace's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The files of an install, relative to the prefix, with `LIB` for the
/// libdir name: what [`layout`] writes (the package test checks the
/// packages' metadata against this list).
pub const FILES: [&str; 8] = [
    "LIB/libvchan-xen.so.1",
    "LIB/libvchan-xen.so",
    "LIB/libvchan-socket.so",
    "LIB/pkgconfig/vchan-xen.pc",
    "LIB/pkgconfig/vchan.pc",
    "LIB/pkgconfig/vchan-socket.pc",
    "include/vchan-xen/libvchan.h",
    "include/vchan-socket/libvchan.h",
];

/// The release build of the library.
pub fn built_library() -> std::path::PathBuf {
    util::target_dir().join("release/liblibvchan.so")
}

/// Builds the release library and installs it under `prefix` (see the
/// module docs); replaces what an earlier install put there.
pub fn install(prefix: &Path) -> Result<(), String> {
    util::cargo(&["build", "--release", "-p", "libvchan"])?;
    let prefix = std::path::absolute(prefix).map_err(|e| format!("{}: {e}", prefix.display()))?;
    layout(&built_library(), &prefix, &prefix, "lib")
}

/// Writes the files of [`FILES`] under `dest` (`LIB` = `libdir`), the `.pc`
/// files naming `prefix` (which is `dest` for an install, `/usr` for a
/// package's staging tree); `library` is the built `.so`.
pub fn layout(library: &Path, dest: &Path, prefix: &Path, libdir: &str) -> Result<(), String> {
    let lib = dest.join(libdir);
    let pc = lib.join("pkgconfig");
    for d in [
        &pc,
        &dest.join("include/vchan-xen"),
        &dest.join("include/vchan-socket"),
    ] {
        fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let err = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    let so = lib.join("libvchan-xen.so.1");
    // Remove first: a running program may map the old file (copying over
    // it in place would change its pages under it).
    let _ = fs::remove_file(&so);
    fs::copy(library, &so).map_err(err(library))?;
    for link in ["libvchan-xen.so", "libvchan-socket.so"] {
        let l = lib.join(link);
        let _ = fs::remove_file(&l);
        std::os::unix::fs::symlink("libvchan-xen.so.1", &l).map_err(err(&l))?;
    }
    let header = util::root().join("libvchan/include/libvchan.h");
    for flavour in ["vchan-xen", "vchan-socket"] {
        let to = dest.join("include").join(flavour).join("libvchan.h");
        fs::copy(&header, &to).map_err(err(&to))?;
        let text = format!(
            "prefix={prefix}\nexec_prefix=${{prefix}}\nincludedir=${{prefix}}/include\nlibdir=${{prefix}}/{libdir}\n{backend}\n\
             Name: {flavour}\n\
             Description: The vchan communication library (rust-vchan's drop-in libvchan: transport from VCHAN_SOCKET_DIR / VCHAN_LOCAL_DIR, else Xen)\n\
             Version: {VERSION}\n\
             Cflags: -I${{includedir}}/{flavour}\n\
             Libs: -L${{libdir}} -l{flavour}\n",
            prefix = prefix.display(),
            backend = if flavour == "vchan-xen" {
                "backend_vmm=xen\n"
            } else {
                ""
            },
        );
        let to = pc.join(format!("{flavour}.pc"));
        fs::write(&to, text).map_err(err(&to))?;
    }
    let alias = pc.join("vchan.pc");
    let _ = fs::remove_file(&alias);
    std::os::unix::fs::symlink("vchan-xen.pc", &alias).map_err(err(&alias))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `layout` writes exactly [`FILES`], so the list the package test
    /// relies on cannot drift from what is installed.
    #[test]
    fn layout_writes_the_listed_files() {
        let dir = util::target_dir().join(format!("layout-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("built.so");
        fs::write(&fake, b"\x7fELF stand-in").unwrap();
        let dest = dir.join("stage");
        layout(&fake, &dest, Path::new("/usr"), "lib64").unwrap();
        let mut found = Vec::new();
        let mut stack = vec![dest.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(&dest).unwrap().to_path_buf();
                    found.push(rel.to_string_lossy().replace("lib64/", "LIB/"));
                }
            }
        }
        found.sort();
        let mut want: Vec<String> = FILES.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(found, want);
        let pc = fs::read_to_string(dest.join("lib64/pkgconfig/vchan-xen.pc")).unwrap();
        assert!(pc.contains("prefix=/usr\n") && pc.contains("libdir=${prefix}/lib64\n"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
