//! Gives the shared library the soname of Qubes' `libvchan-xen`
//! (qubes-core-vchan-xen `vchan/Makefile.linux`: `SO_VER = 1`), so a
//! program linked against ours records the same `NEEDED` entry as one
//! linked against theirs and either library satisfies it.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libvchan-xen.so.1");
    println!("cargo:rerun-if-changed=build.rs");
}
