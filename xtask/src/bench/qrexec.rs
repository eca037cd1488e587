//! `cargo xtask bench qrexec`: `qrexec-client-vm` through the simulated
//! Qubes (`qubes-sim`), 1 GiB each way, beside `cat` through a pipe in the
//! same run.
//!
//! * **send**: `source | qrexec-client-vm personal bench.Sink`: the caller's
//!   stdin goes to a service that reads it to its end and discards it; the
//!   service's result line comes back on the client's stdout.
//! * **recv**: `qrexec-client-vm personal bench.Source+N | sink`: a service
//!   writes N bytes, the caller's stdout is read to its end.
//! * **cat**: `source | cat | sink` with the same source and sink.
//!
//! Each with the client's default buffer (64 KiB per direction) and with
//! `--buffer-size=1048576`. Throughput is taken by the sink (first byte to
//! last); the whole command's wall time, connect and teardown included, is
//! reported beside it. CPU per GiB counts every process involved: the local
//! ones (source, client, cat, sink: getrusage of waited-for children) and
//! the whole simulation (supervisor with its hubs and xenstored, each VM's
//! agent and daemon with the services they reaped).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::procs::{self, Line, Running};
use super::report::{self, Json, Table, median, paired_ratio};
use super::{Common, GIB};
use crate::util;

/// Chunk size of the source and sink workers (as `cat`'s 128 KiB reads,
/// it is large enough not to be the bottleneck).
const CHUNK: usize = 128 * 1024;

/// What one run of the suite covers.
#[derive(Debug)]
struct Plan {
    bytes: u64,
    reps: usize,
    buffers: Vec<usize>,
    /// `--also NAME=DIR`: other builds (`DIR/qubes-sim` and
    /// `DIR/qrexec-client-vm`) measured in the same run, each with its own
    /// simulation, for before/after comparisons.
    also: Vec<(String, PathBuf)>,
}

/// Runs the suite.
pub fn run(common: &Common, args: &[String]) -> Result<(), String> {
    // `--peer c-stack`: ours and the C client through the real C stack
    // (upstream agents and daemons), instead of the simulated Qubes.
    if let Some(i) = args.iter().position(|a| a == "--peer") {
        return match args.get(i + 1).map(String::as_str) {
            Some("c-stack") => {
                let reps = args
                    .iter()
                    .position(|a| a == "--reps")
                    .and_then(|i| args.get(i + 1))
                    .map(|r| parse::<usize>(r))
                    .transpose()?
                    .unwrap_or(if common.quick { 1 } else { 5 });
                let vchan = args
                    .iter()
                    .position(|a| a == "--vchan")
                    .and_then(|i| args.get(i + 1))
                    .map(String::as_str);
                crate::upstream::cases::bench(reps, vchan)
            }
            other => Err(format!("--peer {other:?}: the one peer is c-stack")),
        };
    }
    let mut plan = if common.quick {
        Plan {
            bytes: 32 << 20,
            reps: 1,
            buffers: vec![65536, 1 << 20],
            also: Vec::new(),
        }
    } else {
        // 11 repetitions: a 1 GiB run takes ~0.5 s here and the host flips
        // between two speeds from one run to the next (2-3x); the medians
        // of 3 could land on either, those of 11 mostly agree run to run.
        Plan {
            bytes: GIB,
            reps: 11,
            buffers: vec![65536, 1 << 20],
            also: Vec::new(),
        }
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--reps" => plan.reps = parse(&val()?)?,
            "--mib" => plan.bytes = parse::<u64>(&val()?)? << 20,
            "--buffers" => {
                plan.buffers = val()?
                    .split(',')
                    .map(|x| parse(x.trim()))
                    .collect::<Result<_, _>>()?
            }
            "--also" => {
                let v = val()?;
                let (n, d) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--also {v:?}: expected NAME=DIR"))?;
                plan.also.push((n.to_string(), PathBuf::from(d)));
            }
            "--pin" => return Err("bench qrexec: --pin is a vchan option".into()),
            other => {
                return Err(format!(
                    "bench qrexec: unknown option {other:?}\n{}",
                    super::USAGE
                ));
            }
        }
    }
    plan.reps = plan.reps.max(1);

    procs::build_worker(&["qubes-sim", "qrexec"])?;
    let bin = util::target_dir().join("release");
    let client = std::env::var_os("QUBES_SIM_CLIENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin.join("qrexec-client-vm"));
    let cat = which("cat")?;
    let base = common
        .scratch
        .join(format!("bench-qrexec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let result = (|| {
        let mut builds = vec![Build {
            name: String::new(),
            sim: Sim::start(&bin.join("qubes-sim"), &base)?,
            client,
        }];
        for (i, (name, dir)) in plan.also.iter().enumerate() {
            builds.push(Build {
                name: name.clone(),
                sim: Sim::start(&dir.join("qubes-sim"), &base.join(format!("also{i}")))?,
                client: dir.join("qrexec-client-vm"),
            });
        }
        println!(
            "bench qrexec: {} per run, {} repetition(s), medians; load {}",
            report::size(plan.bytes),
            plan.reps,
            super::loadavg()
        );
        let j = measure(&plan, &builds, &cat)?;
        for b in builds {
            b.sim.stop()?;
        }
        Ok::<Json, String>(j)
    })();
    let _ = std::fs::remove_dir_all(&base);
    let j = result?;
    let mut out = vec![
        ("suite".to_string(), Json::str("qrexec")),
        (
            "plan".to_string(),
            Json::obj([
                ("bytes", Json::Num(plan.bytes as f64)),
                ("reps", Json::Num(plan.reps as f64)),
                (
                    "buffers",
                    Json::nums(&plan.buffers.iter().map(|&b| b as f64).collect::<Vec<_>>()),
                ),
                ("chunk", Json::Num(CHUNK as f64)),
            ]),
        ),
    ];
    out.extend(common.header_json());
    out.push(("results".into(), j));
    out.push(("load_after".into(), Json::str(super::loadavg())));
    common.write_json("qrexec", &Json::Obj(out))
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad number {s:?}"))
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

fn which(name: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name} not found in PATH"))
}

/// A generous bound for one run (a safety net, not a threshold).
fn limit(bytes: u64) -> Duration {
    Duration::from_secs(60 + bytes / (5 << 20))
}

// ---------------------------------------------------------------------------
// The simulation

/// One build under test: its simulation and its client.
struct Build {
    /// Empty for the build of this tree, else the `--also` name.
    name: String,
    sim: Sim,
    client: PathBuf,
}

/// A running `qubes-sim` with two VMs, `work` (the caller) and `personal`
/// (the services); stopped and removed on drop.
struct Sim {
    exe: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    /// `VCHAN_LOCAL_DIR`, `VCHAN_DOMAIN` and `QREXEC_AGENT_SOCKET` of `work`.
    work_env: Vec<(String, String)>,
}

impl Sim {
    fn start(exe: &Path, base: &Path) -> Result<Sim, String> {
        let conf_dir = base.join("conf");
        let rpc = conf_dir.join("rpc");
        std::fs::create_dir_all(&rpc).map_err(|e| format!("{}: {e}", rpc.display()))?;
        let worker = procs::worker_exe();
        let w = worker.display();
        write_exec(
            &rpc.join("bench.Sink"),
            &format!("#!/bin/sh\nexec '{w}' bench worker sink {CHUNK}\n"),
        )?;
        write_exec(
            &rpc.join("bench.Source"),
            &format!("#!/bin/sh\nexec '{w}' bench worker source \"$1\" {CHUNK}\n"),
        )?;
        std::fs::write(
            conf_dir.join("sim.conf"),
            "# cargo xtask bench qrexec\nvm work\nvm personal\npolicy policy.txt\nservices rpc\n",
        )
        .map_err(|e| format!("write sim.conf: {e}"))?;
        std::fs::write(
            conf_dir.join("policy.txt"),
            "bench.Sink    * work @anyvm allow\nbench.Source  * work @anyvm allow\n*             * @anyvm @anyvm deny\n",
        )
        .map_err(|e| format!("write policy.txt: {e}"))?;
        let dir = base.join("sim");
        let child = Command::new(exe)
            .args(["run", "--dir"])
            .arg(&dir)
            .arg("--config")
            .arg(conf_dir.join("sim.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("start {}: {e}", exe.display()))?;
        let mut sim = Sim {
            exe: exe.to_path_buf(),
            dir,
            child: Some(child),
            work_env: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !sim.dir.join("ready").exists() {
            let exited = sim.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = exited {
                sim.child = None;
                return Err(format!("the simulation exited before it was ready ({st})"));
            }
            if Instant::now() > deadline {
                return Err("the simulation did not become ready in 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        sim.work_env = read_env(&sim.dir.join("vms").join("work").join("env"))?;
        Ok(sim)
    }

    /// CPU seconds of the whole simulation so far: the supervisor (hubs,
    /// xenstored) and every member with the children it reaped.
    fn cpu(&self) -> Result<f64, String> {
        let mut pids = vec![self.dir.join("sim.pid")];
        for vm in ["work", "personal"] {
            for f in ["agent.pid", "daemon.pid"] {
                pids.push(self.dir.join("vms").join(vm).join(f));
            }
        }
        let mut total = 0.0;
        for p in pids {
            let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let pid: u32 = text
                .trim()
                .parse()
                .map_err(|_| format!("{}: not a pid", p.display()))?;
            total += procs::proc_cpu_with_children(pid)?;
        }
        Ok(total)
    }

    fn client(&self, client: &Path, buffer: usize, args: &[&str]) -> Command {
        let mut c = Command::new(client);
        c.envs(self.work_env.iter().map(|(k, v)| (k, v)))
            .env_remove("VCHAN_SOCKET_DIR")
            .env_remove("VCHAN_TRANSPORT");
        if buffer != 65536 {
            c.arg(format!("--buffer-size={buffer}"));
        }
        c.args(args);
        c
    }

    fn stop(mut self) -> Result<(), String> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let st = Command::new(&self.exe)
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("qubes-sim stop: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let exit = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !st.success() {
            return Err(format!("qubes-sim stop failed ({st})"));
        }
        match exit {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(format!("the simulation ended with {s}")),
            None => Err("the simulation did not stop within 30 s".into()),
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

fn write_exec(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The variables a VM's `env` file exports that the client needs.
fn read_env(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut env = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) else {
            continue;
        };
        if matches!(
            k,
            "VCHAN_LOCAL_DIR" | "VCHAN_DOMAIN" | "QREXEC_AGENT_SOCKET"
        ) {
            env.push((k.to_string(), v.trim_matches('\'').to_string()));
        }
    }
    if env.len() != 3 {
        return Err(format!(
            "{}: expected VCHAN_LOCAL_DIR, VCHAN_DOMAIN, QREXEC_AGENT_SOCKET",
            path.display()
        ));
    }
    Ok(env)
}

// ---------------------------------------------------------------------------
// Runs

/// One run: throughput by the sink, wall time of the command, CPU.
#[derive(Debug, Clone, Copy)]
struct Sample {
    bytes_per_sec: f64,
    wall_bytes_per_sec: f64,
    cpu_per_gib: f64,
}

/// What one run measures; the `usize` after the buffer size indexes the
/// builds (0: this tree, then the `--also` ones).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Send(usize, usize),
    Recv(usize, usize),
    Cat,
}

fn name_of(k: Kind, builds: &[Build]) -> String {
    let tag = |v: usize| {
        let n = &builds[v].name;
        if n.is_empty() {
            String::new()
        } else {
            format!("[{n}]")
        }
    };
    match k {
        Kind::Send(b, v) => format!("send@{}{}", report::size(b as u64), tag(v)),
        Kind::Recv(b, v) => format!("recv@{}{}", report::size(b as u64), tag(v)),
        Kind::Cat => "cat".into(),
    }
}

fn measure(plan: &Plan, builds: &[Build], cat: &Path) -> Result<Json, String> {
    let name = |k: Kind| name_of(k, builds);
    let mut kinds: Vec<Kind> = Vec::new();
    for &b in &plan.buffers {
        for v in 0..builds.len() {
            kinds.push(Kind::Send(b, v));
        }
    }
    for &b in &plan.buffers {
        for v in 0..builds.len() {
            kinds.push(Kind::Recv(b, v));
        }
    }
    kinds.push(Kind::Cat);
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); kinds.len()];
    let mut progress = crate::util::Progress::new(plan.reps * kinds.len());
    for rep in 0..plan.reps {
        // Every other repetition runs the kinds in the opposite order, so
        // a drift of the host's speed during a repetition (it has two
        // modes here) does not always favour the kinds that come first.
        let order: Vec<usize> = if rep % 2 == 0 {
            (0..kinds.len()).collect()
        } else {
            (0..kinds.len()).rev().collect()
        };
        for i in order {
            let k = kinds[i];
            let smp = one(plan.bytes, k, builds, cat)?;
            eprintln!(
                "  {} {:<16} {} MB/s (wall {} MB/s), {:.2} CPU s/GiB",
                progress.step(),
                name(k),
                report::mbps(smp.bytes_per_sec),
                report::mbps(smp.wall_bytes_per_sec),
                smp.cpu_per_gib
            );
            samples[i].push(smp);
        }
    }
    let cat_i = kinds.len() - 1;
    let tp = |i: usize| {
        samples[i]
            .iter()
            .map(|s| s.bytes_per_sec)
            .collect::<Vec<_>>()
    };
    let wall = |i: usize| {
        samples[i]
            .iter()
            .map(|s| s.wall_bytes_per_sec)
            .collect::<Vec<_>>()
    };
    let cpu = |i: usize| samples[i].iter().map(|s| s.cpu_per_gib).collect::<Vec<_>>();
    let mut t = Table::new(&[
        "run",
        "MB/s",
        "wall MB/s",
        "CPU s/GiB",
        "x cat",
        "CPU x cat",
        "vs 2 GB/s",
    ]);
    let mut res = Vec::new();
    for (i, &k) in kinds.iter().enumerate() {
        let ratio = paired_ratio(&tp(i), &tp(cat_i));
        // CPU per byte against cat's: below 1 is cheaper than the pipe.
        let cpu_ratio = paired_ratio(&cpu(i), &cpu(cat_i));
        let m = median(&tp(i));
        t.row(vec![
            name(k),
            report::mbps(m),
            report::mbps(median(&wall(i))),
            report::fixed(median(&cpu(i)), 2),
            if k == Kind::Cat {
                "1.00".into()
            } else {
                report::ratio(ratio)
            },
            if k == Kind::Cat {
                "1.00".into()
            } else {
                report::ratio(cpu_ratio)
            },
            report::ratio(m / 2e9),
        ]);
        res.push((
            name(k),
            Json::obj([
                ("bytes_per_sec", Json::nums(&tp(i))),
                ("median_bytes_per_sec", Json::Num(m)),
                ("wall_bytes_per_sec", Json::nums(&wall(i))),
                ("cpu_s_per_gib", Json::nums(&cpu(i))),
                ("ratio_to_cat", Json::Num(ratio)),
                ("cpu_ratio_to_cat", Json::Num(cpu_ratio)),
            ]),
        ));
    }
    // This tree against each `--also` build, run by run (same repetition,
    // same load): MB/s ratio and CPU-per-byte ratio.
    let mut vs = Table::new(&["run", "vs", "MB/s ratio", "CPU/byte ratio"]);
    let mut vs_json = Vec::new();
    for (i, &k) in kinds.iter().enumerate() {
        let other = |v: usize| match k {
            Kind::Send(b, 0) => Some(Kind::Send(b, v)),
            Kind::Recv(b, 0) => Some(Kind::Recv(b, v)),
            _ => None,
        };
        for (v, b) in builds.iter().enumerate().skip(1) {
            let Some(j) = other(v).and_then(|o| kinds.iter().position(|&x| x == o)) else {
                continue;
            };
            let (r, c) = (paired_ratio(&tp(i), &tp(j)), paired_ratio(&cpu(i), &cpu(j)));
            vs.row(vec![
                name(k),
                b.name.clone(),
                report::ratio(r),
                report::ratio(c),
            ]);
            vs_json.push((
                format!("{}/{}", name(k), b.name),
                Json::obj([("ratio", Json::Num(r)), ("cpu_ratio", Json::Num(c))]),
            ));
        }
    }
    if !vs_json.is_empty() {
        res.push(("vs_also".into(), Json::Obj(vs_json)));
    }
    // Each larger buffer against the first (64 KiB by default), same
    // build, same direction, run by run: the issue's "1 MiB at least as
    // fast as 64 KiB" without the host's run-to-run swing.
    let mut by_buf = Table::new(&["run", "vs", "MB/s ratio", "CPU/byte ratio"]);
    let mut by_buf_json = Vec::new();
    for (i, &k) in kinds.iter().enumerate() {
        let base = match k {
            Kind::Send(b, v) if b != plan.buffers[0] => Kind::Send(plan.buffers[0], v),
            Kind::Recv(b, v) if b != plan.buffers[0] => Kind::Recv(plan.buffers[0], v),
            _ => continue,
        };
        let Some(j) = kinds.iter().position(|&x| x == base) else {
            continue;
        };
        let (r, c) = (paired_ratio(&tp(i), &tp(j)), paired_ratio(&cpu(i), &cpu(j)));
        by_buf.row(vec![
            name(k),
            name(base),
            report::ratio(r),
            report::ratio(c),
        ]);
        by_buf_json.push((
            format!("{}/{}", name(k), name(base)),
            Json::obj([("ratio", Json::Num(r)), ("cpu_ratio", Json::Num(c))]),
        ));
    }
    let any_by_buf = !by_buf_json.is_empty();
    if any_by_buf {
        res.push(("vs_first_buffer".into(), Json::Obj(by_buf_json)));
    }
    println!(
        "\nqrexec-client-vm through qubes-sim, {} per run (MB/s by the sink, first byte to last; wall: the whole command)",
        report::size(plan.bytes)
    );
    print!("{t}");
    println!(
        "  send: caller's stdin -> service that discards; recv: service that produces -> caller's stdout"
    );
    println!("  target: >= 2 GB/s each way (last column >= 1.00)");
    println!(
        "  CPU x cat: CPU per byte (every process involved) / cat's, run by run; below 1: cheaper"
    );
    if builds.len() > 1 {
        println!(
            "\nthis tree / the --also builds, median of run-by-run ratios (CPU/byte below 1: cheaper)"
        );
        print!("{vs}");
    }
    if any_by_buf {
        println!(
            "\nlarger buffer / {}, same build and direction, median of run-by-run ratios (MB/s at least 1: as fast)",
            report::size(plan.buffers[0] as u64)
        );
        print!("{by_buf}");
    }
    Ok(Json::Obj(res))
}

/// One run of `kind`: source -> middle -> sink, all measured.
fn one(bytes: u64, kind: Kind, builds: &[Build], cat: &Path) -> Result<Sample, String> {
    let lim = limit(bytes);
    let v = match kind {
        Kind::Send(_, v) | Kind::Recv(_, v) => v,
        Kind::Cat => 0,
    };
    let (sim, client) = (&builds[v].sim, builds[v].client.as_path());
    let sim0 = sim.cpu()?;
    let kids0 = procs::children_cpu()?;
    let started = Instant::now();
    let (secs, wall) = match kind {
        Kind::Send(buf, _) => {
            // source | qrexec-client-vm personal bench.Sink
            let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
            let mut src = procs::worker(&[s("fd-send"), s(bytes), s(CHUNK)]);
            src.stdin(Stdio::from(w));
            let src = Running::spawn(src, "source")?;
            let mut c = sim.client(client, buf, &["personal", "bench.Sink"]);
            c.stdin(Stdio::from(r));
            let c = Running::spawn(c, "qrexec-client-vm personal bench.Sink")?;
            let out = c.finish(lim)?;
            let wall = started.elapsed().as_secs_f64();
            src.result(lim)?;
            let l = Line::parse(&out).map_err(|e| format!("bench.Sink: {e}"))?;
            check_bytes(&l, bytes, "bench.Sink")?;
            (l.get("secs"), wall)
        }
        Kind::Recv(buf, _) => {
            // qrexec-client-vm personal bench.Source+N | sink
            let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
            let svc = format!("bench.Source+{bytes}");
            let mut c = sim.client(client, buf, &["personal", &svc]);
            c.stdout(Stdio::from(w)).stderr(Stdio::null());
            let c = c
                .spawn()
                .map_err(|e| format!("start qrexec-client-vm: {e}"))?;
            let mut c = Reaped(Some(c));
            let mut snk = procs::worker(&[s("fd-recv"), s(bytes), s(CHUNK)]);
            snk.stdin(Stdio::from(r));
            let l = Running::spawn(snk, "sink")?.result(lim)?;
            let st = c.wait(lim)?;
            let wall = started.elapsed().as_secs_f64();
            if !st.success() {
                return Err(format!("qrexec-client-vm personal {svc} failed ({st})"));
            }
            check_bytes(&l, bytes, "sink")?;
            (l.get("secs"), wall)
        }
        Kind::Cat => {
            let (r1, w1) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
            let (r2, w2) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
            let mut src = procs::worker(&[s("fd-send"), s(bytes), s(CHUNK)]);
            src.stdin(Stdio::from(w1));
            let src = Running::spawn(src, "source")?;
            let c = Command::new(cat)
                .stdin(Stdio::from(r1))
                .stdout(Stdio::from(w2))
                .spawn()
                .map_err(|e| format!("start cat: {e}"))?;
            let mut c = Reaped(Some(c));
            let mut snk = procs::worker(&[s("fd-recv"), s(bytes), s(CHUNK)]);
            snk.stdin(Stdio::from(r2));
            let l = Running::spawn(snk, "sink")?.result(lim)?;
            src.result(lim)?;
            let st = c.wait(lim)?;
            let wall = started.elapsed().as_secs_f64();
            if !st.success() {
                return Err(format!("cat failed ({st})"));
            }
            check_bytes(&l, bytes, "sink")?;
            (l.get("secs"), wall)
        }
    };
    let cpu = (procs::children_cpu()? - kids0) + (sim.cpu()? - sim0);
    Ok(Sample {
        bytes_per_sec: bytes as f64 / secs,
        wall_bytes_per_sec: bytes as f64 / wall,
        cpu_per_gib: cpu / (bytes as f64 / GIB as f64),
    })
}

fn check_bytes(l: &Line, bytes: u64, who: &str) -> Result<(), String> {
    if l.get("bytes") as u64 != bytes {
        return Err(format!(
            "{who} counted {} bytes, expected {bytes}",
            l.get("bytes")
        ));
    }
    Ok(())
}

/// A child without a result line, killed and reaped if dropped early.
struct Reaped(Option<Child>);

impl Reaped {
    fn wait(&mut self, limit: Duration) -> Result<std::process::ExitStatus, String> {
        let Some(mut c) = self.0.take() else {
            return Err("already waited for".into());
        };
        let deadline = Instant::now() + limit;
        loop {
            match c.try_wait() {
                Ok(Some(st)) => return Ok(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(format!("no exit within {limit:?}, killed"));
                }
                Err(e) => return Err(format!("wait: {e}")),
            }
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
