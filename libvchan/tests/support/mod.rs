//! Shared by the tests that run a C program on our library.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `tests/c/<name>.c` built in `dir` against our header and linked with
/// our library under its soname (`dir/lib/libvchan-xen.so.1`, found by
/// rpath): the program as a Qubes C program would be built.
pub fn build_c_program(dir: &Path, name: &str) -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let built = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("liblibvchan.so");
    assert!(built.exists(), "{} not built", built.display());
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    for link in ["libvchan-xen.so.1", "libvchan-xen.so"] {
        let l = lib.join(link);
        if !l.exists() {
            std::os::unix::fs::symlink(&built, l).unwrap();
        }
    }
    let exe = dir.join(name);
    let out = Command::new("gcc")
        .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror"])
        .arg(format!("-I{}", manifest.join("include").display()))
        .arg(manifest.join(format!("tests/c/{name}.c")))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lvchan-xen")
        .output()
        .expect("run gcc (is it installed?)");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// The C program `exe` set up to run as domain `domain` on the Local
/// transport whose directory is `local_dir` (`VCHAN_LOCAL_DIR`; no
/// `VCHAN_SOCKET_DIR` inherited), its stdin, stdout and stderr piped to
/// the test. The caller adds arguments and spawns it.
pub fn c_program_command(exe: &Path, local_dir: &Path, domain: u16) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env_remove("VCHAN_SOCKET_DIR")
        .env("VCHAN_LOCAL_DIR", local_dir)
        .env("VCHAN_DOMAIN", domain.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}
