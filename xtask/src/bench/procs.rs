//! Child processes of the benchmarks: the release worker, the Local
//! transport host, bounded waits, result lines, CPU time of a live process.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::util;

/// The release build of xtask, which runs the measuring workers.
pub fn worker_exe() -> PathBuf {
    util::target_dir().join("release").join("xtask")
}

/// Builds the release worker (and `extra` packages' binaries, if any).
pub fn build_worker(extra: &[&str]) -> Result<(), String> {
    let mut args = vec!["build", "--release", "--quiet", "-p", "xtask"];
    for p in extra {
        args.extend(["-p", p]);
    }
    util::cargo(&args)
}

/// One `key=value ...` result line of a worker.
#[derive(Debug, Clone, Default)]
pub struct Line(pub BTreeMap<String, f64>);

impl Line {
    /// Parses the last non-empty line of `out`.
    pub fn parse(out: &str) -> Result<Line, String> {
        let last = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let mut m = BTreeMap::new();
        for kv in last.split_whitespace() {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("worker printed {last:?}, not key=value"))?;
            let v: f64 = v
                .parse()
                .map_err(|_| format!("worker printed {last:?}: bad number"))?;
            m.insert(k.to_string(), v);
        }
        if m.is_empty() {
            return Err("worker printed no result".into());
        }
        Ok(Line(m))
    }
    /// A field; NaN if missing.
    pub fn get(&self, k: &str) -> f64 {
        self.0.get(k).copied().unwrap_or(f64::NAN)
    }
    /// `user + sys`.
    pub fn cpu(&self) -> f64 {
        self.get("user") + self.get("sys")
    }
}

/// A running child that is killed (by its own pid) and reaped if it is
/// dropped before it was waited for.
#[derive(Debug)]
pub struct Running {
    child: Option<Child>,
    what: String,
}

impl Running {
    /// Spawns `cmd`, stdout piped.
    pub fn spawn(mut cmd: Command, what: impl Into<String>) -> Result<Running, String> {
        let what = what.into();
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start {what}: {e}"))?;
        Ok(Running {
            child: Some(child),
            what,
        })
    }

    /// As [`Running::spawn`], pinned to `cpu` if pinning is on (see
    /// [`on_cpu`]).
    pub fn spawn_on(cpu: usize, cmd: Command, what: impl Into<String>) -> Result<Running, String> {
        Running::spawn(on_cpu(cmd, cpu), what)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Waits at most `limit`; its stdout if it exited with success.
    pub fn finish(mut self, limit: Duration) -> Result<String, String> {
        let Some(mut child) = self.child.take() else {
            return Err(format!("{}: already finished", self.what));
        };
        let deadline = Instant::now() + limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{}: no result within {limit:?}, killed", self.what));
                }
                Err(e) => return Err(format!("{}: wait: {e}", self.what)),
            }
        };
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if status.success() {
            Ok(out)
        } else {
            Err(format!("{} failed ({status})", self.what))
        }
    }

    /// As [`Running::finish`], parsing the result line.
    pub fn result(self, limit: Duration) -> Result<Line, String> {
        let what = self.what.clone();
        let out = self.finish(limit)?;
        Line::parse(&out).map_err(|e| format!("{what}: {e}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether workers are pinned to CPUs (`--pin`).
static PIN: AtomicBool = AtomicBool::new(false);

/// The environment variable naming the CPU a worker pins itself to.
pub const ENV_CPU: &str = "XTASK_BENCH_CPU";
/// The CPU for a worker's second thread (the rtrb producer).
pub const ENV_CPU2: &str = "XTASK_BENCH_CPU2";

/// Turns pinning on or off for the workers started from now on.
pub fn set_pinning(on: bool) {
    PIN.store(on, Ordering::Relaxed);
}

/// Whether pinning is on.
pub fn pinning() -> bool {
    PIN.load(Ordering::Relaxed)
}

/// `cmd`, pinned to `cpu` if pinning is on (the sending side of a pair
/// goes on CPU 0, the receiving side on CPU 1).
pub fn on_cpu(mut cmd: Command, cpu: usize) -> Command {
    if pinning() {
        cmd.env(ENV_CPU, cpu.to_string());
        cmd.env(ENV_CPU2, (1 - cpu.min(1)).to_string());
    }
    cmd
}

/// Pins the calling thread to the CPU named by `var`, if it is set.
pub fn pin_from_env(var: &str) -> Result<(), String> {
    let Ok(v) = std::env::var(var) else {
        return Ok(());
    };
    let cpu: usize = v
        .parse()
        .map_err(|_| format!("{var}={v:?}: not a CPU number"))?;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| format!("pin to CPU {cpu}: {e}"))
}

/// A worker command: `xtask bench worker <args>`.
pub fn worker(args: &[String]) -> Command {
    let mut c = Command::new(worker_exe());
    c.args(["bench", "worker"]).args(args);
    c
}

/// CPU seconds (user + sys, all threads, dead ones included) that process
/// `pid` has used so far, from `/proc/<pid>/stat` (clock-tick resolution).
pub fn proc_cpu(pid: u32) -> Result<f64, String> {
    stat_cpu(pid, false)
}

/// As [`proc_cpu`], plus the CPU of the children it has waited for
/// (`cutime`, `cstime`).
pub fn proc_cpu_with_children(pid: u32) -> Result<f64, String> {
    stat_cpu(pid, true)
}

/// CPU seconds (user + sys) of the children this process has waited for.
pub fn children_cpu() -> Result<f64, String> {
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_err(|e| format!("getrusage: {e}"))?;
    let secs = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 * 1e-6;
    Ok(secs(ru.user_time()) + secs(ru.system_time()))
}

fn stat_cpu(pid: u32, children: bool) -> Result<f64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: field 3 (state) is f[0]; utime, stime are fields 14, 15.
    let tick = |i: usize| -> Result<f64, String> {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| format!("/proc/{pid}/stat: no field {}", i + 3))
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&v| v > 0)
        .unwrap_or(100) as f64;
    let mut t = tick(11)? + tick(12)?;
    if children {
        t += tick(13)? + tick(14)?;
    }
    Ok(t / hz)
}

/// CPU seconds that process `pid`'s live threads have run, summed from
/// `/proc/<pid>/task/*/schedstat` (nanosecond resolution; threads that
/// already exited are not counted, so use it over windows where none do).
pub fn proc_cpu_precise(pid: u32) -> Result<f64, String> {
    let dir = format!("/proc/{pid}/task");
    let mut ns = 0u64;
    for e in std::fs::read_dir(&dir).map_err(|e| format!("read {dir}: {e}"))? {
        let path = e
            .map_err(|e| format!("read {dir}: {e}"))?
            .path()
            .join("schedstat");
        if let Ok(s) = std::fs::read_to_string(&path) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 * 1e-9)
}

/// The Local transport (hubs and xenstored) in a worker process of its own,
/// so its CPU time can be counted; stops when dropped.
#[derive(Debug)]
pub struct Hub {
    run: Option<Running>,
    stdin: Option<ChildStdin>,
    dir: PathBuf,
}

impl Hub {
    /// Starts the host for domains 0, 1, 2 in a fresh directory under `base`.
    pub fn start(base: &Path, tag: &str) -> Result<Hub, String> {
        let dir = base.join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let mut cmd = worker(&["hub".into(), dir.display().to_string()]);
        cmd.stdin(Stdio::piped());
        let mut run = Running::spawn(cmd, "local transport host")?;
        let child = run.child.as_mut().ok_or("hub: no child")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("hub: no stdout")?;
        let mut first = String::new();
        BufReader::new(stdout)
            .read_line(&mut first)
            .map_err(|e| format!("local transport host: {e}"))?;
        if first.trim() != "ready" {
            return Err(format!("local transport host said {first:?}"));
        }
        Ok(Hub {
            run: Some(run),
            stdin,
            dir,
        })
    }

    /// CPU seconds the host has used so far.
    pub fn cpu(&self) -> Result<f64, String> {
        proc_cpu(self.pid())
    }

    /// As [`Hub::cpu`], from the live threads' nanosecond counters.
    pub fn cpu_precise(&self) -> Result<f64, String> {
        proc_cpu_precise(self.pid())
    }

    fn pid(&self) -> u32 {
        self.run.as_ref().map(Running::pid).unwrap_or(0)
    }

    /// A worker command playing domain `domid` here.
    pub fn worker(&self, domid: u16, args: &[String]) -> Command {
        self.worker_with(&worker_exe(), domid, args)
    }

    /// As [`Hub::worker`], with another build of the worker.
    pub fn worker_with(&self, exe: &Path, domid: u16, args: &[String]) -> Command {
        let mut c = Command::new(exe);
        c.args(["bench", "worker"]).args(args);
        c.env("VCHAN_LOCAL_DIR", &self.dir)
            .env("VCHAN_DOMAIN", domid.to_string());
        c.env_remove("VCHAN_SOCKET_DIR")
            .env_remove("VCHAN_TRANSPORT");
        c
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        // Closing its stdin stops it; give it a moment, then kill.
        drop(self.stdin.take());
        if let Some(r) = self.run.take() {
            let _ = r.finish(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
