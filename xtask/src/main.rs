//! `cargo xtask`: project chores (demo, bench, lab) in Rust, no shell
//! scripts scattered around.
//!
//! ```text
//! cargo xtask demo [--quick]     the main job on its built-in default
//! cargo xtask test [ARGS]        the tests (installs libxen-dev if missing, then cargo test)
//! cargo xtask bench [...]        benchmarks with baselines in the same run
//! cargo xtask lab <cmd>          the real-Xen lab (setup|start|stop|status|test)
//! cargo xtask upstream <cmd>     the real C qrexec stack as a test peer (build|suite|cases)
//! cargo xtask man [--out DIR]    man page and shell completions of qrexec-client-vm
//! cargo xtask msrv               the MSRV check (clippy incompatible_msrv, with a canary)
//! cargo xtask package            .deb and .rpm of qrexec-client-vm (target/packages)
//! ```
#![forbid(unsafe_code)]

mod bench;
mod demo;
mod lab;
mod libvchan;
mod man;
mod msrv;
mod package;
mod package_check;
mod test;
mod upstream;
mod util;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    let rest = &args[1..];
    let r = match cmd.as_str() {
        "demo" => demo::run(rest),
        "test" => test::run(rest),
        "bench" => bench::run(rest),
        "lab" => lab::run(rest),
        "upstream" => upstream::run(rest),
        "libvchan" => libvchan::run(rest),
        "man" => man::run(rest),
        "msrv" => msrv::run(rest),
        "package" => package::run(rest),
        "-h" | "--help" | "help" => return usage_ok(),
        _ => return usage(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage_text() -> &'static str {
    "usage: cargo xtask <command>\n\
     \n  demo [--quick]   run the demo (the README's first command)\
     \n  test [ARGS]      install what the tests need, then cargo test --workspace --all-features ARGS (the README's second)\
     \n  bench [...]      benchmarks with baselines in the same run\
     \n  lab <cmd>        real Xen under QEMU: setup | start | stop | status | test [--quick]\
     \n  upstream <cmd>   the real C qrexec stack: build | suite [--vchan upstream|ours|both] | cases [--quick]\
     \n  libvchan install --prefix DIR   our drop-in libvchan under upstream's names\
     \n  man [--out DIR]  man page + bash/zsh/fish completions of qrexec-client-vm (target/assets)\
     \n  msrv             check the MSRV (rust-version) with clippy incompatible_msrv and a canary\
     \n  package [--check-root DIR]  .deb and .rpm of qrexec-client-vm; install/remove them in copies of a Debian root"
}

fn usage() -> ExitCode {
    eprintln!("{}", usage_text());
    ExitCode::from(2)
}

fn usage_ok() -> ExitCode {
    println!("{}", usage_text());
    ExitCode::SUCCESS
}
