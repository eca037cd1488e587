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

/// Builds the release library and installs it under `prefix` (see the
/// module docs); replaces what an earlier install put there.
pub fn install(prefix: &Path) -> Result<(), String> {
    util::cargo(&["build", "--release", "-p", "libvchan"])?;
    let built = util::target_dir().join("release/liblibvchan.so");
    let prefix = std::path::absolute(prefix).map_err(|e| format!("{}: {e}", prefix.display()))?;
    let lib = prefix.join("lib");
    let pc = lib.join("pkgconfig");
    for d in [
        &pc,
        &prefix.join("include/vchan-xen"),
        &prefix.join("include/vchan-socket"),
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
    fs::copy(&built, &so).map_err(err(&built))?;
    for link in ["libvchan-xen.so", "libvchan-socket.so"] {
        let l = lib.join(link);
        let _ = fs::remove_file(&l);
        std::os::unix::fs::symlink("libvchan-xen.so.1", &l).map_err(err(&l))?;
    }
    let header = util::root().join("libvchan/include/libvchan.h");
    for flavour in ["vchan-xen", "vchan-socket"] {
        let to = prefix.join("include").join(flavour).join("libvchan.h");
        fs::copy(&header, &to).map_err(err(&to))?;
        let text = format!(
            "prefix={prefix}\nexec_prefix=${{prefix}}\nincludedir=${{prefix}}/include\nlibdir=${{prefix}}/lib\n{backend}\n\
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
