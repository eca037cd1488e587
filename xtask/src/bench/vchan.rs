//! `cargo xtask bench vchan`: stream throughput, round-trip latency, CPU per
//! GiB and idle CPU of a vchan over the Local transport, each beside its
//! baselines in the same run.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::procs::{self, Hub, Line, Running};
use super::report::{self, Json, Table, median, paired_ratio};
use super::{Common, GIB};

/// What one suite run covers.
#[derive(Debug)]
struct Plan {
    rings: Vec<usize>,
    chunks: Vec<usize>,
    bytes: u64,
    reps: usize,
    ping_iters: usize,
    idle_ms: u64,
    parts: Vec<String>,
    /// Other builds of the worker to run beside ours (`--also NAME=PATH`).
    also: Vec<(String, PathBuf)>,
}

/// One stream run: wall seconds and CPU seconds (all processes involved).
#[derive(Debug, Clone, Copy)]
struct Sample {
    bytes_per_sec: f64,
    cpu_per_gib: f64,
    /// The Local transport host's share of `cpu_per_gib` (vchan only).
    hub_per_gib: f64,
}

/// Runs the suite.
pub fn run(common: &Common, args: &[String]) -> Result<(), String> {
    let mut plan = if common.quick {
        Plan {
            rings: vec![4096, 65536, 1 << 20],
            chunks: vec![4096, 65536],
            bytes: 16 << 20,
            reps: 1,
            ping_iters: 2000,
            idle_ms: 500,
            parts: vec!["stream".into(), "latency".into(), "idle".into()],
            also: Vec::new(),
        }
    } else {
        Plan {
            rings: vec![4096, 65536, 1 << 20],
            chunks: vec![4096, 65536],
            bytes: GIB,
            reps: 5,
            ping_iters: 20000,
            idle_ms: 2000,
            parts: vec!["stream".into(), "latency".into(), "idle".into()],
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
            "--rings" => plan.rings = list(&val()?)?,
            "--chunks" => plan.chunks = list(&val()?)?,
            "--ping-iters" => plan.ping_iters = parse(&val()?)?,
            "--idle-ms" => plan.idle_ms = parse(&val()?)?,
            "--pin" => procs::set_pinning(true),
            "--parts" => plan.parts = val()?.split(',').map(String::from).collect(),
            "--also" => {
                let v = val()?;
                let (name, path) = v.split_once('=').ok_or("--also wants NAME=PATH")?;
                plan.also.push((name.to_string(), PathBuf::from(path)));
            }
            other => {
                return Err(format!(
                    "bench vchan: unknown option {other:?}\n{}",
                    super::USAGE
                ));
            }
        }
    }
    plan.reps = plan.reps.max(1);

    procs::build_worker(&[])?;
    let hub = Hub::start(&common.scratch, "vchan")?;
    let mut ports = 1000u32..;
    let mut out = vec![
        ("suite".to_string(), Json::str("vchan")),
        ("plan".to_string(), plan_json(&plan)),
    ];
    out.extend(common.header_json());
    println!(
        "bench vchan: {} per point, {} repetition(s), medians; load {}",
        report::size(plan.bytes),
        plan.reps,
        super::loadavg()
    );

    if plan.parts.iter().any(|p| p == "stream") {
        out.push(("stream".into(), stream(&plan, &hub, &mut ports)?));
    }
    if plan.parts.iter().any(|p| p == "latency") {
        out.push(("latency".into(), latency(&plan, &hub, &mut ports)?));
    }
    if plan.parts.iter().any(|p| p == "cost") {
        out.push(("cost".into(), cost(&plan)?));
    }
    if plan.parts.iter().any(|p| p == "idle") {
        out.push(("idle".into(), idle(&plan, &hub, &mut ports)?));
    }
    out.push(("load_after".into(), Json::str(super::loadavg())));
    drop(hub);
    common.write_json("vchan", &Json::Obj(out))
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad number {s:?}"))
}

fn list(s: &str) -> Result<Vec<usize>, String> {
    s.split(',').map(|x| parse_size(x.trim())).collect()
}

/// `4096`, `4K`, `64K`, `1M`.
fn parse_size(s: &str) -> Result<usize, String> {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    Ok(parse::<usize>(num)? * mul)
}

fn plan_json(p: &Plan) -> Json {
    Json::obj([
        (
            "rings",
            Json::nums(&p.rings.iter().map(|&x| x as f64).collect::<Vec<_>>()),
        ),
        (
            "chunks",
            Json::nums(&p.chunks.iter().map(|&x| x as f64).collect::<Vec<_>>()),
        ),
        ("bytes_per_point", Json::Num(p.bytes as f64)),
        ("reps", Json::Num(p.reps as f64)),
        ("ping_iters", Json::Num(p.ping_iters as f64)),
        ("idle_ms", Json::Num(p.idle_ms as f64)),
        ("pinned", Json::Bool(procs::pinning())),
    ])
}

/// A generous bound for one run of `bytes` (a safety net, not a threshold).
fn limit(bytes: u64) -> Duration {
    Duration::from_secs(30 + bytes / (5 << 20))
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

// ---------------------------------------------------------------------------
// Stream

/// One stream variant.
#[derive(Debug, Clone)]
enum Kind {
    /// Two processes over the Local transport, with this worker binary.
    Vchan(PathBuf),
    Rtrb,
    SocketPair,
    Pipe,
    Memcpy,
}

/// The variants in the order they run and print: ours, any `--also`
/// builds of ours, then the baselines.
fn variants(plan: &Plan) -> Vec<(String, Kind)> {
    let mut v = vec![("vchan".to_string(), Kind::Vchan(procs::worker_exe()))];
    for (name, exe) in &plan.also {
        v.push((name.clone(), Kind::Vchan(exe.clone())));
    }
    v.push(("rtrb".into(), Kind::Rtrb));
    v.push(("socketpair".into(), Kind::SocketPair));
    v.push(("pipe".into(), Kind::Pipe));
    v.push(("memcpy".into(), Kind::Memcpy));
    v
}

/// Short column names.
fn short(name: &str) -> String {
    match name {
        "socketpair" => "sock".into(),
        n => n.into(),
    }
}

fn stream(plan: &Plan, hub: &Hub, ports: &mut impl Iterator<Item = u32>) -> Result<Json, String> {
    let vars = variants(plan);
    let mut head = vec![s("ring"), s("chunk")];
    head.extend(vars.iter().map(|(n, _)| short(n)));
    head.extend(vars[1..].iter().map(|(n, _)| format!("v/{}", short(n))));
    let mut tp = Table::new(&head.iter().map(String::as_str).collect::<Vec<_>>());
    let mut head = vec![s("ring"), s("chunk")];
    for (n, k) in &vars {
        head.push(short(n));
        if matches!(k, Kind::Vchan(_)) {
            head.push(s("(hub)"));
        }
    }
    head.extend(vars[1..].iter().map(|(n, _)| format!("v/{}", short(n))));
    let mut tc = Table::new(&head.iter().map(String::as_str).collect::<Vec<_>>());
    let mut points = Vec::new();
    let mut progress =
        crate::util::Progress::new(plan.rings.len() * plan.chunks.len() * plan.reps * vars.len());
    for &ring in &plan.rings {
        for &chunk in &plan.chunks {
            let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); vars.len()];
            for _ in 0..plan.reps {
                for (i, (name, kind)) in vars.iter().enumerate() {
                    let b = plan.bytes;
                    let smp = match kind {
                        Kind::Vchan(exe) => {
                            vchan_stream(hub, exe, ports.next().unwrap_or(0), ring, chunk, b)?
                        }
                        Kind::Rtrb => inproc("rtrb", ring, chunk, b)?,
                        Kind::Memcpy => inproc("memcpy", ring, chunk, b)?,
                        Kind::Pipe => fd_stream(FdKind::Pipe(ring), chunk, b)?,
                        Kind::SocketPair => fd_stream(FdKind::SocketPair, chunk, b)?,
                    };
                    eprintln!(
                        "  {} {name} ring {} chunk {}: {} MB/s, {:.2} CPU s/GiB",
                        progress.step(),
                        report::size(ring as u64),
                        report::size(chunk as u64),
                        report::mbps(smp.bytes_per_sec),
                        smp.cpu_per_gib + smp.hub_per_gib
                    );
                    samples[i].push(smp);
                }
            }
            let tps: Vec<Vec<f64>> = samples
                .iter()
                .map(|v| v.iter().map(|s| s.bytes_per_sec).collect())
                .collect();
            let cpus: Vec<Vec<f64>> = samples
                .iter()
                .map(|v| v.iter().map(|s| s.cpu_per_gib).collect())
                .collect();
            let hubs: Vec<Vec<f64>> = samples
                .iter()
                .map(|v| v.iter().map(|s| s.hub_per_gib).collect())
                .collect();
            let ratios: Vec<f64> = (1..vars.len())
                .map(|i| paired_ratio(&tps[0], &tps[i]))
                .collect();
            // CPU per byte, everything the transfer costs (the hub too):
            // below 1 means ours is cheaper than x.
            let totals: Vec<Vec<f64>> = cpus
                .iter()
                .zip(&hubs)
                .map(|(c, h)| c.iter().zip(h).map(|(c, h)| c + h).collect())
                .collect();
            let cpu_ratios: Vec<f64> = (1..vars.len())
                .map(|i| paired_ratio(&totals[0], &totals[i]))
                .collect();
            let mut row = vec![report::size(ring as u64), report::size(chunk as u64)];
            row.extend(tps.iter().map(|v| report::mbps(median(v))));
            row.extend(ratios.iter().map(|&r| report::ratio(r)));
            tp.row(row);
            let mut row = vec![report::size(ring as u64), report::size(chunk as u64)];
            for (i, (_, k)) in vars.iter().enumerate() {
                row.push(report::fixed(median(&cpus[i]), 2));
                if matches!(k, Kind::Vchan(_)) {
                    row.push(report::fixed(median(&hubs[i]), 2));
                }
            }
            row.extend(cpu_ratios.iter().map(|&r| report::ratio(r)));
            tc.row(row);
            let at = |name: &str| {
                vars.iter()
                    .position(|(n, _)| n == name)
                    .map(|i| ratios[i - 1])
            };
            eprintln!(
                "  ring {} chunk {}: vchan {} MB/s, {} x rtrb, {} x socketpair",
                report::size(ring as u64),
                report::size(chunk as u64),
                report::mbps(median(&tps[0])),
                report::ratio(at("rtrb").unwrap_or(f64::NAN)),
                report::ratio(at("socketpair").unwrap_or(f64::NAN)),
            );
            let mut res = Vec::new();
            for (i, (name, k)) in vars.iter().enumerate() {
                let mut fields = vec![
                    ("bytes_per_sec", Json::nums(&tps[i])),
                    ("median_bytes_per_sec", Json::Num(median(&tps[i]))),
                    ("cpu_s_per_gib", Json::nums(&cpus[i])),
                    ("median_cpu_s_per_gib", Json::Num(median(&cpus[i]))),
                ];
                if matches!(k, Kind::Vchan(_)) {
                    fields.push(("hub_cpu_s_per_gib", Json::nums(&hubs[i])));
                }
                res.push((name.clone(), Json::obj(fields)));
            }
            let rat: Vec<(String, Json)> = (1..vars.len())
                .map(|i| (format!("vchan/{}", vars[i].0), Json::Num(ratios[i - 1])))
                .collect();
            let cpu_rat: Vec<(String, Json)> = (1..vars.len())
                .map(|i| (format!("vchan/{}", vars[i].0), Json::Num(cpu_ratios[i - 1])))
                .collect();
            points.push(Json::obj([
                ("ring", Json::Num(ring as f64)),
                ("chunk", Json::Num(chunk as f64)),
                ("results", Json::Obj(res)),
                ("ratios", Json::Obj(rat)),
                ("cpu_ratios", Json::Obj(cpu_rat)),
            ]));
        }
    }
    println!("\nstream throughput, MB/s (median); v/x = median of paired ratios vchan/x");
    print!("{tp}");
    println!(
        "\nCPU seconds per GiB moved (user+sys, both ends; vchan includes the hub, shown apart); v/x = median of paired ratios of CPU per byte vchan (with hub)/x, below 1: cheaper than x"
    );
    print!("{tc}");
    Ok(Json::Arr(points))
}

fn vchan_stream(
    hub: &Hub,
    exe: &Path,
    port: u32,
    ring: usize,
    chunk: usize,
    bytes: u64,
) -> Result<Sample, String> {
    let hub0 = hub.cpu()?;
    let send = Running::spawn_on(
        0,
        hub.worker_with(
            exe,
            1,
            &[s("vchan-send"), s(2), s(port), s(ring), s(bytes), s(chunk)],
        ),
        "vchan sender",
    )?;
    let recv = Running::spawn_on(
        1,
        hub.worker_with(
            exe,
            2,
            &[s("vchan-recv"), s(1), s(port), s(bytes), s(chunk)],
        ),
        "vchan receiver",
    )?;
    let r = recv.result(limit(bytes))?;
    let w = send.result(limit(bytes))?;
    let hub_cpu = hub.cpu()? - hub0;
    if w.get("ring") as usize != ring {
        return Err(format!(
            "asked for a {ring}-byte ring, got {}",
            w.get("ring")
        ));
    }
    Ok(sample(bytes, &r, r.cpu() + w.cpu() + hub_cpu, hub_cpu))
}

fn sample(bytes: u64, recv: &Line, cpu: f64, hub_cpu: f64) -> Sample {
    let gib = bytes as f64 / GIB as f64;
    Sample {
        bytes_per_sec: bytes as f64 / recv.get("secs"),
        cpu_per_gib: cpu / gib,
        hub_per_gib: hub_cpu / gib,
    }
}

/// `rtrb` or `memcpy`: one process.
fn inproc(mode: &str, ring: usize, chunk: usize, bytes: u64) -> Result<Sample, String> {
    let r = Running::spawn_on(
        1,
        procs::worker(&[s(mode), s(ring), s(bytes), s(chunk)]),
        mode,
    )?
    .result(limit(bytes))?;
    Ok(sample(bytes, &r, r.cpu(), 0.0))
}

#[derive(Debug, Clone, Copy)]
enum FdKind {
    /// A pipe whose capacity is set to the ring size (`F_SETPIPE_SZ`).
    Pipe(usize),
    /// A unix stream socketpair with the kernel's default buffers.
    SocketPair,
}

fn fd_pair(kind: FdKind) -> Result<(OwnedFd, OwnedFd), String> {
    match kind {
        FdKind::Pipe(cap) => {
            let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
            let want = i32::try_from(cap).unwrap_or(i32::MAX);
            nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(want))
                .map_err(|e| format!("F_SETPIPE_SZ {cap}: {e}"))?;
            Ok((w, r))
        }
        FdKind::SocketPair => {
            let (a, b) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            Ok((OwnedFd::from(a), OwnedFd::from(b)))
        }
    }
}

/// Sender and receiver processes over a pipe or socketpair on their stdin.
fn fd_stream(kind: FdKind, chunk: usize, bytes: u64) -> Result<Sample, String> {
    let (w, r) = fd_pair(kind)?;
    let mut sc = procs::worker(&[s("fd-send"), s(bytes), s(chunk)]);
    sc.stdin(Stdio::from(w));
    let send = Running::spawn_on(0, sc, "fd sender")?;
    let mut rc = procs::worker(&[s("fd-recv"), s(bytes), s(chunk)]);
    rc.stdin(Stdio::from(r));
    let recv = Running::spawn_on(1, rc, "fd receiver")?;
    // `Command` keeps its stdin fds until dropped: they went with sc/rc
    // into `spawn` and were closed in this process there.
    let r = recv.result(limit(bytes))?;
    let w = send.result(limit(bytes))?;
    Ok(sample(bytes, &r, r.cpu() + w.cpu(), 0.0))
}

// ---------------------------------------------------------------------------
// One-core cost

/// Nanoseconds per write + read of one chunk on one core, ours beside
/// rtrb: the per-operation price without scheduling noise.
fn cost(plan: &Plan) -> Result<Json, String> {
    let mut names = vec![s("vchan")];
    let mut exes = vec![procs::worker_exe()];
    for (n, e) in &plan.also {
        names.push(n.clone());
        exes.push(e.clone());
    }
    names.push(s("rtrb"));
    let mut head = vec![s("ring"), s("chunk")];
    head.extend(names.iter().map(|n| format!("{n} ns")));
    head.extend(names[1..].iter().map(|n| format!("v/{n}")));
    let mut t = Table::new(&head.iter().map(String::as_str).collect::<Vec<_>>());
    let mut points = Vec::new();
    for &ring in &plan.rings {
        for &chunk in &plan.chunks {
            let mut ns: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
            for _ in 0..plan.reps {
                for (i, name) in names.iter().enumerate() {
                    let (exe, mode) = if name == "rtrb" {
                        (procs::worker_exe(), "rtrb-1core")
                    } else {
                        (exes[i].clone(), "vchan-1core")
                    };
                    let mut c = std::process::Command::new(&exe);
                    c.args(["bench", "worker", mode])
                        .args([s(ring), s(plan.bytes), s(chunk)]);
                    let l = Running::spawn(c, mode)?.result(limit(plan.bytes))?;
                    ns[i].push(l.get("secs") * 1e9 / l.get("ops"));
                }
            }
            let mut row = vec![report::size(ring as u64), report::size(chunk as u64)];
            row.extend(ns.iter().map(|v| report::fixed(median(v), 0)));
            // Cost ratio: below 1 means ours is cheaper.
            row.extend((1..names.len()).map(|i| report::ratio(paired_ratio(&ns[0], &ns[i]))));
            t.row(row);
            let res: Vec<(String, Json)> = names
                .iter()
                .zip(&ns)
                .map(|(n, v)| (n.clone(), Json::nums(v)))
                .collect();
            points.push(Json::obj([
                ("ring", Json::Num(ring as f64)),
                ("chunk", Json::Num(chunk as f64)),
                ("ns_per_op", Json::Obj(res)),
            ]));
        }
    }
    println!("\none-core cost: ns per write + read of one chunk (no second core, no waiting)");
    print!("{t}");
    Ok(Json::Arr(points))
}

// ---------------------------------------------------------------------------
// Latency

fn latency(plan: &Plan, hub: &Hub, ports: &mut impl Iterator<Item = u32>) -> Result<Json, String> {
    const SIZE: usize = 64;
    let iters = plan.ping_iters.max(10);
    let lim = Duration::from_secs(60 + iters as u64 / 1000);
    let mut names: Vec<String> = vec![s("vchan")];
    let mut exes = vec![procs::worker_exe()];
    for (n, e) in &plan.also {
        names.push(n.clone());
        exes.push(e.clone());
    }
    names.push(s("socketpair"));
    // Per variant: p50, mean, p99 of each run.
    let mut runs: Vec<[Vec<f64>; 3]> = vec![Default::default(); names.len()];
    for _ in 0..plan.reps {
        for (i, exe) in exes.iter().enumerate() {
            let port = ports.next().unwrap_or(0);
            let echo = Running::spawn_on(
                1,
                hub.worker_with(exe, 1, &[s("vchan-echo"), s(2), s(port), s(SIZE)]),
                "vchan echo",
            )?;
            let ping = Running::spawn_on(
                0,
                hub.worker_with(exe, 2, &[s("vchan-ping"), s(1), s(port), s(iters), s(SIZE)]),
                "vchan ping",
            )?;
            let p = ping.result(lim)?;
            echo.result(lim)?;
            push_rtt(&mut runs[i], &p);
        }
        let (a, b) = fd_pair(FdKind::SocketPair)?;
        let mut ec = procs::worker(&[s("fd-echo"), s(SIZE)]);
        ec.stdin(Stdio::from(a));
        let echo = Running::spawn_on(1, ec, "socket echo")?;
        let mut pc = procs::worker(&[s("fd-ping"), s(iters), s(SIZE)]);
        pc.stdin(Stdio::from(b));
        let ping = Running::spawn_on(0, pc, "socket ping")?;
        let p = ping.result(lim)?;
        echo.result(lim)?;
        let last = runs.len() - 1;
        push_rtt(&mut runs[last], &p);
    }
    let sock = &runs[runs.len() - 1];
    let mut t = Table::new(&[
        "64-byte round trip",
        "p50 us",
        "mean us",
        "p99 us",
        "p50/sock",
    ]);
    let mut js = Vec::new();
    for (n, r) in names.iter().zip(&runs) {
        let ratio = paired_ratio(&r[0], &sock[0]);
        t.row(vec![
            n.clone(),
            report::fixed(median(&r[0]), 2),
            report::fixed(median(&r[1]), 2),
            report::fixed(median(&r[2]), 2),
            report::ratio(ratio),
        ]);
        js.push((
            n.clone(),
            Json::obj([
                ("p50_us", Json::nums(&r[0])),
                ("mean_us", Json::nums(&r[1])),
                ("p99_us", Json::nums(&r[2])),
                ("ratio_p50_to_socketpair", Json::Num(ratio)),
                (
                    "ratio_mean_to_socketpair",
                    Json::Num(paired_ratio(&r[1], &sock[1])),
                ),
            ]),
        ));
    }
    println!(
        "\nround-trip latency, {iters} round trips per run, medians over runs (target: vchan p50/sock <= 1.00)"
    );
    print!("{t}");
    Ok(Json::obj([
        ("size", Json::Num(SIZE as f64)),
        ("iters", Json::Num(iters as f64)),
        ("results", Json::Obj(js)),
    ]))
}

fn push_rtt(r: &mut [Vec<f64>; 3], line: &Line) {
    r[0].push(line.get("p50_us"));
    r[1].push(line.get("mean_us"));
    r[2].push(line.get("p99_us"));
}

// ---------------------------------------------------------------------------
// Idle

fn idle(plan: &Plan, hub: &Hub, ports: &mut impl Iterator<Item = u32>) -> Result<Json, String> {
    let port = ports.next().unwrap_or(0);
    let ms = plan.idle_ms.max(100);
    let lim = Duration::from_millis(ms) + Duration::from_secs(30);
    let srv = Running::spawn(
        hub.worker(1, &[s("vchan-idle-server"), s(2), s(port), s(ms)]),
        "idle server",
    )?;
    let cli = Running::spawn(
        hub.worker(2, &[s("vchan-idle-client"), s(1), s(port)]),
        "idle client",
    )?;
    // Count the hub over the server's idle window: from after the connect
    // (the server sleeps 50 ms before it starts) to its end.
    std::thread::sleep(Duration::from_millis(300));
    let hub0 = hub.cpu_precise()?;
    let srv_line = srv.result(lim)?;
    // Live threads only: one that exits in the window takes its time along.
    let hub_cpu = (hub.cpu_precise()? - hub0).max(0.0);
    let cli_line = cli.result(lim)?;
    let secs = srv_line.get("secs");
    let per_s = |cpu: f64| cpu / secs * 1e3;
    let mut t = Table::new(&["idle open vchan", "CPU ms", "CPU ms/s"]);
    t.row(vec![
        s("server (blocked in read)"),
        report::fixed(srv_line.cpu() * 1e3, 2),
        report::fixed(per_s(srv_line.cpu()), 3),
    ]);
    t.row(vec![
        s("client (blocked in read)"),
        report::fixed(cli_line.cpu() * 1e3, 2),
        report::fixed(per_s(cli_line.cpu()), 3),
    ]);
    t.row(vec![
        s("hub (all its threads)"),
        report::fixed(hub_cpu * 1e3, 0),
        report::fixed(per_s(hub_cpu), 1),
    ]);
    println!("\nidle CPU over {:.1} s", secs);
    print!("{t}");
    Ok(Json::obj([
        ("secs", Json::Num(secs)),
        ("server_cpu_s", Json::Num(srv_line.cpu())),
        ("client_cpu_s", Json::Num(cli_line.cpu())),
        ("client_secs", Json::Num(cli_line.get("secs"))),
        ("hub_cpu_s", Json::Num(hub_cpu)),
    ]))
}
