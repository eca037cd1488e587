//! `cargo xtask bench`: benchmarks that measure ours beside its baselines in
//! the same run, on a noisy machine: medians of several repetitions, and
//! ratios of runs paired by repetition.
//!
//! ```text
//! cargo xtask bench vchan  [--quick] [--json PATH] [--reps N] [--mib N]
//!                          [--rings 4K,64K,1M] [--chunks 4K,64K]
//!                          [--ping-iters N] [--idle-ms N] [--parts stream,latency,idle,cost]
//!                          [--also NAME=WORKER]... [--pin]
//! cargo xtask bench qrexec [--quick] [--json PATH] [--reps N] [--mib N]
//!                          [--buffers 65536,1048576] [--also NAME=DIR]...
//! ```
//!
//! Each suite prints its tables and writes JSON to `--json PATH` or to
//! `<target>/bench/<suite>-<unix time>.json`. `--quick` moves little data,
//! once, for CI: no verdict is ever turned into a failure, only a broken
//! run (a worker that fails or hangs) is.
//!
//! The measuring processes are a release build of xtask itself
//! (`xtask bench worker <mode> ...`, see [`worker`]), built on demand.

mod procs;
mod qrexec;
pub(crate) mod report;
mod vchan;
pub mod worker;

use std::path::PathBuf;

use crate::util;
use report::Json;

/// One GiB.
const GIB: u64 = 1 << 30;

const USAGE: &str = "usage: cargo xtask bench vchan|qrexec [--quick] [--json PATH] [--reps N] [--mib N] [suite options]\n\
  vchan:  [--rings 4K,64K,1M] [--chunks 4K,64K] [--ping-iters N] [--idle-ms N] [--parts stream,latency,idle,cost]\n\
          [--also NAME=WORKER]  also run vchan with another build of the release worker\n\
                                (target/release/xtask copied aside), for before/after in one run\n\
          [--pin]               pin the two ends of every pair to CPUs 0 and 1\n\
  qrexec: [--buffers 65536,1048576]\n\
          [--peer c-stack]      ours and the C client through the real C stack (upstream agents and\n\
                                daemons over libvchan-socket): MB/s, CPU s/GiB, echo latency\n\
          [--also NAME=DIR]     also run DIR/qubes-sim with DIR/qrexec-client-vm (another build)";

/// Options every suite takes.
#[derive(Debug)]
struct Common {
    quick: bool,
    json: Option<PathBuf>,
    /// Where runs put their rendezvous directories.
    scratch: PathBuf,
}

impl Common {
    /// Splits the common options off `args`.
    fn parse(args: &[String]) -> Result<(Common, Vec<String>), String> {
        let mut c = Common {
            quick: false,
            json: None,
            scratch: std::env::temp_dir(),
        };
        let mut rest = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => c.quick = true,
                "--json" => {
                    c.json = Some(it.next().ok_or("--json needs a path")?.into());
                }
                _ => rest.push(a.clone()),
            }
        }
        Ok((c, rest))
    }

    /// Machine and revision facts for the JSON header.
    fn header_json(&self) -> Vec<(String, Json)> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        vec![
            ("unix_time".into(), Json::Num(now as f64)),
            ("quick".into(), Json::Bool(self.quick)),
            ("git".into(), Json::str(git_describe())),
            ("cpus".into(), Json::Num(cpus as f64)),
            ("cpu_model".into(), Json::str(cpu_model())),
            ("load_before".into(), Json::str(loadavg())),
        ]
    }

    /// Writes the report where `--json` says, or under `<target>/bench/`.
    fn write_json(&self, suite: &str, j: &Json) -> Result<(), String> {
        let path = match &self.json {
            Some(p) => p.clone(),
            None => {
                let dir = util::target_dir().join("bench");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("create {}: {e}", dir.display()))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                dir.join(format!("{suite}-{now}.json"))
            }
        };
        std::fs::write(&path, format!("{j}\n"))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        println!("\nwrote {}", path.display());
        Ok(())
    }
}

/// Dispatches a bench suite.
pub fn run(args: &[String]) -> Result<(), String> {
    let Some((suite, rest)) = args.split_first() else {
        return Err(USAGE.into());
    };
    if suite == "worker" {
        return worker::run(rest);
    }
    let (common, rest) = Common::parse(rest)?;
    match suite.as_str() {
        "vchan" => vchan::run(&common, &rest),
        "qrexec" => qrexec::run(&common, &rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown suite {other:?}\n{USAGE}")),
    }
}

/// `/proc/loadavg`'s first three fields.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// `git describe`-like: the commit, `+dirty` if tracked files changed.
fn git_describe() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(util::root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = run(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{rev}+dirty") } else { rev }
}
