//! The C ABI as C programs see it: our header against upstream's (same
//! prototypes, same constants, checked by the C compiler), and a C program
//! that calls every function, built with each header, linked with our
//! shared library under its upstream names, run over the socket and the
//! local transports.
//!
//! Upstream's headers come from the pinned tarballs in `../shared/upstream`
//! beside the repository (or `$UPSTREAM_DIR`); gcc and tar must be
//! installed. Nothing here is skipped when they are missing: the test fails
//! and says what is missing.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const API: &[&str] = &[
    "libvchan_server_init",
    "libvchan_client_init",
    "libvchan_client_init_async",
    "libvchan_client_init_async_finish",
    "libvchan_write",
    "libvchan_send",
    "libvchan_read",
    "libvchan_recv",
    "libvchan_wait",
    "libvchan_close",
    "libvchan_fd_for_select",
    "libvchan_is_open",
    "libvchan_data_ready",
    "libvchan_buffer_space",
    "libvchan_set_blocking",
];

/// Xen's libxenvchan API (libxenvchan.h).
const XEN_API: &[&str] = &[
    "libxenvchan_server_init",
    "libxenvchan_client_init",
    "libxenvchan_close",
    "libxenvchan_recv",
    "libxenvchan_read",
    "libxenvchan_send",
    "libxenvchan_write",
    "libxenvchan_wait",
    "libxenvchan_fd_for_select",
    "libxenvchan_is_open",
    "libxenvchan_data_ready",
    "libxenvchan_buffer_space",
];

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn upstream_dir() -> PathBuf {
    std::env::var_os("UPSTREAM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest().join("../../shared/upstream"))
}

/// Upstream's `libvchan.h` of `repo` (qubes-core-vchan-xen or
/// qubes-core-vchan-socket), unpacked from its tarball into `dir`.
fn upstream_header(dir: &Path, repo: &str) -> PathBuf {
    let tarball = upstream_dir().join(format!("{repo}.tar.gz"));
    assert!(
        tarball.exists(),
        "{} is missing: the test needs upstream's pinned sources (set UPSTREAM_DIR)",
        tarball.display()
    );
    let member = format!("{repo}/vchan/libvchan.h");
    let out = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(dir)
        .arg(&member)
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join(member)
}

/// Our shared library as an install lays it out: `libvchan-xen.so.1` (the
/// soname), `libvchan-xen.so` and `libvchan-socket.so`, in `dir/lib`.
fn install_lib(dir: &Path) -> PathBuf {
    let built = std::env::current_exe()
        .expect("test binary path")
        .parent()
        .expect("deps dir")
        .join("liblibvchan.so");
    assert!(built.exists(), "{} not built", built.display());
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    for name in ["libvchan-xen.so.1", "libvchan-xen.so", "libvchan-socket.so"] {
        std::os::unix::fs::symlink(&built, lib.join(name)).unwrap();
    }
    lib
}

fn gcc(args: &[&std::ffi::OsStr]) -> Output {
    let out = Command::new("gcc")
        .args(args)
        .output()
        .expect("run gcc (is it installed?)");
    assert!(
        out.status.success(),
        "gcc {:?} failed:\n{}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn our_header_declares_what_upstreams_declare() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = manifest().join("include/libvchan.h");
    for repo in ["qubes-core-vchan-xen", "qubes-core-vchan-socket"] {
        let theirs = upstream_header(tmp.path(), repo);
        let text = std::fs::read_to_string(&theirs).unwrap();
        // The socket flavour has no libvchan_set_blocking.
        let api: Vec<&str> = API
            .iter()
            .copied()
            .filter(|f| text.contains(&format!("{f}(")))
            .collect();
        assert!(api.len() >= 14, "{repo}: only {api:?} found in its header");
        let mut c = String::new();
        // Our declarations under other names, then theirs: the compiler
        // compares every prototype; the typedefs and the VCHAN_* macros
        // are defined twice, which C accepts only if they are identical
        // (-Werror turns a differing macro into an error).
        for f in &api {
            c += &format!("#define {f} ours_{f}\n");
        }
        c += &format!("#include \"{}\"\n", ours.display());
        for f in &api {
            c += &format!("#undef {f}\n");
        }
        c += "#undef LIBVCHAN_H\n";
        c += &format!("#include \"{}\"\n", theirs.display());
        for f in &api {
            c += &format!(
                "_Static_assert(__builtin_types_compatible_p(__typeof__(ours_{f}), __typeof__({f})), \"{f} differs\");\n"
            );
        }
        c += "_Static_assert(VCHAN_DISCONNECTED == 0 && VCHAN_CONNECTED == 1 && VCHAN_WAITING == 2, \"values\");\n";
        c += "_Static_assert(sizeof(EVTCHN) == sizeof(int), \"EVTCHN\");\n";
        let src = tmp.path().join(format!("{repo}-sig.c"));
        std::fs::write(&src, c).unwrap();
        gcc(&[
            "-std=c11".as_ref(),
            "-Wall".as_ref(),
            "-Wextra".as_ref(),
            "-Werror".as_ref(),
            "-fsyntax-only".as_ref(),
            src.as_os_str(),
        ]);
    }
}

/// A self-check of the comparison: a header that differs in one prototype
/// must be refused, or the test above proves nothing.
#[test]
fn the_header_comparison_catches_a_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = std::fs::read_to_string(manifest().join("include/libvchan.h")).unwrap();
    let wrong = ours.replace(
        "int libvchan_recv(libvchan_t *ctrl, void *data, size_t size);",
        "int libvchan_recv(libvchan_t *ctrl, void *data, int size);",
    );
    assert_ne!(ours, wrong, "the prototype to alter was not found");
    let wrong_h = tmp.path().join("wrong.h");
    std::fs::write(&wrong_h, wrong).unwrap();
    let theirs = upstream_header(tmp.path(), "qubes-core-vchan-xen");
    let src = tmp.path().join("sig.c");
    std::fs::write(
        &src,
        format!(
            "#define libvchan_recv ours_libvchan_recv\n#include \"{}\"\n#undef libvchan_recv\n#undef LIBVCHAN_H\n#include \"{}\"\n\
             _Static_assert(__builtin_types_compatible_p(__typeof__(ours_libvchan_recv), __typeof__(libvchan_recv)), \"differs\");\n",
            wrong_h.display(),
            theirs.display()
        ),
    )
    .unwrap();
    let out = Command::new("gcc")
        .args(["-std=c11", "-fsyntax-only"])
        .arg(&src)
        .output()
        .expect("run gcc");
    assert!(!out.status.success(), "a differing prototype was accepted");
}

/// Builds `every_call.c` against `header`, linked as `-l<lib>` from `libdir`.
fn build_every_call(
    dir: &Path,
    header: &Path,
    lib: &str,
    libdir: &Path,
    extra: &[&str],
) -> PathBuf {
    let exe = dir.join(format!("every_call-{lib}-{}", extra.len()));
    let mut args: Vec<std::ffi::OsString> = vec![
        "-std=gnu11".into(),
        "-Wall".into(),
        "-Wextra".into(),
        "-Werror".into(),
        format!("-DLIBVCHAN_HEADER=\"{}\"", header.display()).into(),
    ];
    args.extend(extra.iter().map(Into::into));
    args.push(manifest().join("tests/c/every_call.c").into());
    args.push("-o".into());
    args.push(exe.clone().into());
    args.push(format!("-L{}", libdir.display()).into());
    args.push(format!("-Wl,-rpath,{}", libdir.display()).into());
    args.push(format!("-l{lib}").into());
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    gcc(&refs);
    exe
}

/// Runs a C program with `env` (and no other vchan variables) and at most
/// 60 s; its output.
fn run(exe: &Path, env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(exe);
    for k in [
        "VCHAN_SOCKET_DIR",
        "VCHAN_LOCAL_DIR",
        "VCHAN_TRANSPORT",
        "VCHAN_DOMAIN",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("VCHAN_DOMAIN", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Its own process group: the forked client goes with it, also when the
    // server half fails and leaves it waiting (it holds the output pipes).
    let child = cmd
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the C program");
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut child = child;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn expect_ok(what: &str, (ok, out): (bool, String)) {
    assert!(ok, "{what} failed:\n{out}");
    assert!(
        out.contains("(server)") && out.contains("(client)"),
        "{what}:\n{out}"
    );
    // The bad-input checks each leave one log line naming the call.
    assert!(
        out.contains("libvchan: libvchan_read: NULL handle"),
        "{what}:\n{out}"
    );
}

#[test]
fn every_call_over_the_socket_transport_with_each_header() {
    let tmp = tempfile::tempdir().unwrap();
    let libdir = install_lib(tmp.path());
    let ours = manifest().join("include/libvchan.h");
    let xen = upstream_header(tmp.path(), "qubes-core-vchan-xen");
    let socket = upstream_header(tmp.path(), "qubes-core-vchan-socket");
    let builds = [
        build_every_call(tmp.path(), &ours, "vchan-xen", &libdir, &[]),
        build_every_call(tmp.path(), &xen, "vchan-xen", &libdir, &["-DUPSTREAM"]),
        build_every_call(
            tmp.path(),
            &socket,
            "vchan-socket",
            &libdir,
            &["-DNO_SET_BLOCKING"],
        ),
    ];
    for exe in &builds {
        let sock = tempfile::tempdir().unwrap();
        expect_ok(
            &exe.display().to_string(),
            run(exe, &[("VCHAN_SOCKET_DIR", sock.path())]),
        );
    }
}

/// `select_wakes.c`: after `libvchan_data_ready` took data off the socket,
/// the select fd wakes a 2 s `poll` at once, the next `libvchan_wait` does
/// not block, and the fd is quiet again after it.
#[test]
fn select_fd_shows_data_a_call_took_in_over_the_socket_transport() {
    let tmp = tempfile::tempdir().unwrap();
    let libdir = install_lib(tmp.path());
    let exe = tmp.path().join("select_wakes");
    gcc(&[
        "-std=gnu11".as_ref(),
        "-Wall".as_ref(),
        "-Wextra".as_ref(),
        "-Werror".as_ref(),
        format!("-I{}", manifest().join("include").display()).as_ref(),
        manifest().join("tests/c/select_wakes.c").as_os_str(),
        "-o".as_ref(),
        exe.as_os_str(),
        format!("-L{}", libdir.display()).as_ref(),
        format!("-Wl,-rpath,{}", libdir.display()).as_ref(),
        "-lvchan-xen".as_ref(),
    ]);
    let sock = tempfile::tempdir().unwrap();
    let (ok, out) = run(&exe, &[("VCHAN_SOCKET_DIR", sock.path())]);
    assert!(
        ok && out.contains("(server)"),
        "select_wakes failed:\n{out}"
    );
}

#[test]
fn every_call_over_the_local_transport() {
    let tmp = tempfile::tempdir().unwrap();
    let libdir = install_lib(tmp.path());
    let exe = build_every_call(
        tmp.path(),
        &manifest().join("include/libvchan.h"),
        "vchan-xen",
        &libdir,
        &[],
    );
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = vchan::LocalXen::start(hub_dir.path(), &[0, 1]).expect("start the local hubs");
    expect_ok("local", run(&exe, &[("VCHAN_LOCAL_DIR", hub_dir.path())]));
    drop(hub);
}

/// The shared library exports the API and nothing else, under upstream's
/// soname.
#[test]
fn exports_and_soname() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = install_lib(tmp.path()).join("libvchan-xen.so.1");
    let out = Command::new("readelf")
        .args(["-d", "-W", "--dyn-syms"])
        .arg(&lib)
        .output()
        .expect("run readelf");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Library soname: [libvchan-xen.so.1]"),
        "{text}"
    );
    let exported: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" FUNC ") && l.contains(" GLOBAL ") && !l.contains(" UND "))
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|n| n.starts_with("libvchan_"))
        .collect();
    for f in API {
        assert!(exported.contains(f), "{f} not exported: {exported:?}");
    }
    let xen: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" FUNC ") && l.contains(" GLOBAL ") && !l.contains(" UND "))
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|n| n.starts_with("libxenvchan_"))
        .collect();
    for f in XEN_API {
        assert!(xen.contains(f), "{f} not exported: {xen:?}");
    }
}

/// Debian's `libxenvchan.h` (package `libxen-dev`).
fn debian_xenvchan_header() {
    assert!(
        Path::new("/usr/include/libxenvchan.h").exists(),
        "/usr/include/libxenvchan.h is missing: install Debian's libxen-dev (apt-get install libxen-dev)"
    );
}

/// Builds `xenvchan_calls.c` against Debian's header, linked with ours.
fn build_xenvchan_calls(dir: &Path, libdir: &Path) -> PathBuf {
    debian_xenvchan_header();
    let exe = dir.join("xenvchan_calls");
    let src = manifest().join("tests/c/xenvchan_calls.c");
    gcc(&[
        "-std=gnu11".as_ref(),
        "-Wall".as_ref(),
        "-Wextra".as_ref(),
        "-Werror".as_ref(),
        src.as_os_str(),
        "-o".as_ref(),
        exe.as_os_str(),
        format!("-L{}", libdir.display()).as_ref(),
        format!("-Wl,-rpath,{}", libdir.display()).as_ref(),
        "-lvchan-xen".as_ref(),
    ]);
    exe
}

/// The public `struct libxenvchan` as Debian's header lays it out is the
/// one our handle starts with (C programs write `ctrl->blocking`).
#[test]
fn xenvchan_struct_layout_matches_debians_header() {
    use libvchan::xenvchan::{
        FLAG_BLOCKING, FLAG_IS_SERVER, FLAG_SERVER_PERSIST, Libxenvchan, LibxenvchanRing,
    };
    use std::mem::{offset_of, size_of};
    let tmp = tempfile::tempdir().unwrap();
    let libdir = install_lib(tmp.path());
    let exe = build_xenvchan_calls(tmp.path(), &libdir);
    let out = Command::new(&exe).arg("layout").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let flags = offset_of!(Libxenvchan, flags);
    // One bit each, in the int after event_port (a byte index, little-endian).
    let bit = |f: i32| {
        let byte = f.trailing_zeros() as usize / 8;
        format!("{} {}", flags + byte, (f >> (8 * byte)) & 0xff)
    };
    let expected = format!(
        "sizeof {}\nring {}\nevent {}\nevent_port {}\nread {}\nwrite {}\nxs_path {}\nring_sizeof {}\nring_order {}\n\
         is_server {}\nserver_persist {}\nblocking {}\n",
        size_of::<Libxenvchan>(),
        offset_of!(Libxenvchan, ring),
        offset_of!(Libxenvchan, event),
        offset_of!(Libxenvchan, event_port),
        offset_of!(Libxenvchan, read),
        offset_of!(Libxenvchan, write),
        offset_of!(Libxenvchan, xs_path),
        size_of::<LibxenvchanRing>(),
        offset_of!(LibxenvchanRing, order),
        bit(FLAG_IS_SERVER),
        bit(FLAG_SERVER_PERSIST),
        bit(FLAG_BLOCKING),
    );
    assert_eq!(text, expected);
}

/// The libxenvchan API over the socket transport (`VCHAN_SOCKET_DIR`):
/// the same program, the ring orders it checks being the socket flavour's.
#[test]
fn xenvchan_calls_over_the_socket_transport() {
    let tmp = tempfile::tempdir().unwrap();
    let libdir = install_lib(tmp.path());
    let exe = build_xenvchan_calls(tmp.path(), &libdir);
    let sock = tempfile::tempdir().unwrap();
    let (ok, out) = run(&exe, &[("VCHAN_SOCKET_DIR", sock.path())]);
    assert!(ok, "xenvchan_calls failed:\n{out}");
    assert!(
        out.contains("(server)") && out.contains("(client)"),
        "{out}"
    );
}

#[test]
fn xenvchan_calls_over_the_local_transport() {
    let tmp = tempfile::tempdir().unwrap();
    let libdir = install_lib(tmp.path());
    let exe = build_xenvchan_calls(tmp.path(), &libdir);
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = vchan::LocalXen::start(hub_dir.path(), &[0, 1]).expect("start the local hubs");
    let (ok, out) = run(&exe, &[("VCHAN_LOCAL_DIR", hub_dir.path())]);
    assert!(ok, "xenvchan_calls failed:\n{out}");
    assert!(
        out.contains("(server)") && out.contains("(client)"),
        "{out}"
    );
    drop(hub);
}
