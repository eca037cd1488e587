//! `vchan-local-xen`: runs the Local transport's hubs and xenstored for a
//! rendezvous directory until SIGINT/SIGTERM (or until stdin closes, with
//! `--stdin`), so that other processes can play domains in it with
//! `VCHAN_LOCAL_DIR=<dir> VCHAN_DOMAIN=<id>`.
//!
//! ```text
//! vchan-local-xen --dir DIR [--domains 0,1,2] [--stdin]
//! ```
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dir = None;
    let mut domains = vec![0u16, 1, 2];
    let mut stdin_mode = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => dir = it.next().cloned(),
            "--domains" => {
                let Some(list) = it.next() else {
                    eprintln!("vchan-local-xen: --domains needs a list");
                    return ExitCode::from(2);
                };
                match list
                    .split(',')
                    .map(vchan::parse_domid)
                    .collect::<Option<Vec<_>>>()
                {
                    Some(d) => domains = d,
                    None => {
                        eprintln!("vchan-local-xen: bad domain list {list:?}");
                        return ExitCode::from(2);
                    }
                }
            }
            "--stdin" => stdin_mode = true,
            _ => {
                eprintln!("usage: vchan-local-xen --dir DIR [--domains 0,1,2] [--stdin]");
                return ExitCode::from(2);
            }
        }
    }
    let Some(dir) = dir else {
        eprintln!("usage: vchan-local-xen --dir DIR [--domains 0,1,2] [--stdin]");
        return ExitCode::from(2);
    };
    let dir = std::path::PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("vchan-local-xen: create {}: {e}", dir.display());
        return ExitCode::from(1);
    }
    // Block the signals before any thread exists, so every thread inherits
    // the mask and only the waiting thread takes them.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let _ = signal_flag(sig, stop.clone());
    }
    let xen = match vchan::LocalXen::start(&dir, &domains) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("vchan-local-xen: {e}");
            return ExitCode::from(1);
        }
    };
    if stdin_mode {
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            s.store(true, Ordering::SeqCst);
        });
    }
    println!("ready {}", dir.display());
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    xen.shutdown();
    ExitCode::SUCCESS
}

/// Sets `flag` when `sig` arrives: a thread waits for it with sigwait.
fn signal_flag(sig: nix::sys::signal::Signal, flag: Arc<AtomicBool>) -> nix::Result<()> {
    use nix::sys::signal::SigSet;
    let mut set = SigSet::empty();
    set.add(sig);
    set.thread_block()?;
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    Ok(())
}
