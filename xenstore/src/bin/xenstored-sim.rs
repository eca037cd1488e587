//! `xenstored-sim --dir DIR --domains 0,1,2 [--missing-node eacces|enoent]`
//!
//! Serves the in-memory xenstored of the `xenstore` crate on
//! `DIR/<domid>.sock` for each domain until SIGTERM or SIGINT, then removes
//! the sockets and exits 0.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use xenstore::DomId;
use xenstore::server::{Config, MissingNodeError, Server};

const USAGE: &str = "usage: xenstored-sim --dir DIR --domains D[,D...] [--missing-node eacces|enoent]\n\
  Serves an in-memory xenstored on DIR/<domid>.sock per domain (domain 0 is\n\
  privileged) until SIGTERM/SIGINT.";

struct Args {
    dir: PathBuf,
    domains: Vec<DomId>,
    config: Config,
}

fn parse_args() -> Result<Args, String> {
    let mut dir = None;
    let mut domains = None;
    let mut config = Config::default();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (a.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match key.as_str() {
            "--dir" => dir = Some(PathBuf::from(value("--dir")?)),
            "--domains" => {
                let v = value("--domains")?;
                let list = v
                    .split(',')
                    .map(|d| {
                        xenstore::parse_domid(d.trim())
                            .ok_or_else(|| format!("bad domain id {d:?}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                domains = Some(list);
            }
            "--missing-node" => {
                config.missing_node = match value("--missing-node")?.as_str() {
                    "eacces" => MissingNodeError::Eacces,
                    "enoent" => MissingNodeError::Enoent,
                    other => return Err(format!("bad --missing-node {other:?}")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        dir: dir.ok_or("--dir is required")?,
        domains: domains.ok_or("--domains is required")?,
        config,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("xenstored-sim: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Block the signals before any thread starts, so every thread inherits
    // the mask and only the sigwait below receives them.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    if let Err(e) = sigs.thread_block() {
        eprintln!("xenstored-sim: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let server = match Server::start_with(&args.dir, args.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xenstored-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    for d in &args.domains {
        match server.add_domain(*d) {
            Ok(p) => println!("domain {d}: {}", p.display()),
            Err(e) => {
                eprintln!("xenstored-sim: domain {d}: {e}");
                server.shutdown();
                return ExitCode::FAILURE;
            }
        }
    }
    println!("ready");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let sig = sigs.wait();
    server.shutdown();
    match sig {
        Ok(s) => eprintln!("xenstored-sim: {s}, shut down"),
        Err(e) => eprintln!("xenstored-sim: sigwait failed ({e}), shut down"),
    }
    ExitCode::SUCCESS
}
