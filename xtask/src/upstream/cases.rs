//! `cargo xtask upstream cases`: our `qrexec-client-vm` and the C one,
//! side by side, through the real C Qubes stack.
//!
//! A small Qubes over the socket transport: dom0 runs one upstream
//! `qrexec-daemon` per VM (policy: a shell script of ours given as
//! `--policy-program`), the VMs `work` (domain 1) and `personal` (domain 2)
//! each run an upstream `qrexec-agent` with services of ours. Every case
//! runs with our client and with the C client, in the same run, from
//! `work`; both must give the expected result. A call that does not end
//! within [`HANG`] is killed and fails as a hang: timing is reported,
//! never asserted.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::{Stage, TEST_USER, copy_tree, ensure_test_user, sh};

// The table of cases, the world they run in, and one call and its judgement;
// the commands (run, inner, bench, storm) are below.
mod call;
mod table;
mod world;

use call::*;
use table::*;
use world::*;

/// A call still running after this long is a hang.
const HANG: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// `cargo xtask bench qrexec --peer c-stack`: the transfer cases `reps`
/// times each and the echo latency, ours and C, through the real stack.
/// `vchan`: `--vchan ours` runs the C programs on our libvchan.
pub fn bench(reps: usize, vchan: Option<&str>) -> Result<(), String> {
    let mut args = vec![
        "--bench".to_string(),
        "--reps".to_string(),
        reps.to_string(),
    ];
    if let Some(v) = vchan {
        args.extend(["--vchan".to_string(), v.to_string()]);
    }
    run(&args)
}

/// The outer command: build, stage, then run [`inner`] as the test user.
/// `--vchan ours` links the C agents, daemons and clients with our libvchan
/// instead of upstream's libvchan-socket.
pub fn run(args: &[String]) -> Result<(), String> {
    let (lib, args) = match args.iter().position(|a| a == "--vchan") {
        None => (super::VchanLib::Upstream, args.to_vec()),
        Some(i) => {
            let lib = match args.get(i + 1).map(String::as_str) {
                Some("upstream") => super::VchanLib::Upstream,
                Some("ours") => super::VchanLib::Ours,
                other => return Err(format!("--vchan {other:?}: upstream or ours")),
            };
            let mut rest = args.to_vec();
            rest.drain(i..(i + 2).min(rest.len()));
            (lib, rest)
        }
    };
    let args = &args[..];
    println!("C programs on {}", lib.label());
    let built = super::build_with(lib)?;
    // UPSTREAM_OURS=<binary>: another build of ours (e.g. before a change).
    let ours = match std::env::var_os("UPSTREAM_OURS") {
        Some(p) => PathBuf::from(p),
        None => super::our_client()?,
    };
    ensure_test_user()?;
    let stage = Stage::new("cases")?;
    copy_tree(&built.qrexec, &stage.dir.join("qubes-core-qrexec"))?;
    let bin = stage.dir.join("bin");
    fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    fs::copy(&ours, bin.join("qrexec-client-vm")).map_err(|e| e.to_string())?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    fs::copy(&me, bin.join("xtask")).map_err(|e| e.to_string())?;
    stage.give_to_test_user()?;
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", TEST_USER, "--"]).arg(bin.join("xtask"));
        c
    } else {
        Command::new(bin.join("xtask"))
    };
    cmd.args(["upstream", "cases-inner", "--stage"])
        .arg(&stage.dir)
        .args(args)
        .env("HOME", &stage.dir)
        .env("UPSTREAM_VCHAN_LIB", lib.label());
    sh(&mut cmd).map_err(|_| "real-stack cases failed (table above)".to_string())
}

/// The inner command, run as the test user in the stage.
pub fn inner(args: &[String]) -> Result<(), String> {
    let stage = args
        .iter()
        .position(|a| a == "--stage")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .ok_or("--stage DIR missing")?;
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<&String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    let world = start_world(&stage)?;
    let ours = stage.join("bin/qrexec-client-vm");
    let c = world.qrexec.join("agent/qrexec-client-vm");
    // The stack is up when a C client's echo goes through.
    let warm = case(
        "warm-up",
        &["personal", "test.Echo"],
        Input::Bytes(b"up".to_vec()),
        0,
    )
    .out(Check::Eq(b"up".to_vec()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = call(&world, &c, &warm)?;
        if judge(&world, &warm, &r).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the C stack does not answer an echo (logs in {})",
                world.dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(n) = args
        .iter()
        .position(|a| a == "--storm")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse::<usize>().ok())
    {
        return storm(&world, &ours, &c, n);
    }
    if args.iter().any(|a| a == "--bench") {
        let reps = args
            .iter()
            .position(|a| a == "--reps")
            .and_then(|i| args.get(i + 1))
            .and_then(|r| r.parse().ok())
            .unwrap_or(3usize);
        return bench_inner(&world, &ours, &c, reps);
    }
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    println!(
        "== real C qrexec stack (upstream agent + daemon on {}): ours vs the C qrexec-client-vm",
        std::env::var("UPSTREAM_VCHAN_LIB").unwrap_or_else(|_| "libvchan-socket".into())
    );
    for case in cases(&world.dir) {
        if only.is_some_and(|o| !case.name.contains(o.as_str())) {
            continue;
        }
        let mut cells = Vec::new();
        for (who, client) in [("ours", &ours), ("C", &c)] {
            let r = call(&world, client, &case)?;
            let ok = judge(&world, &case, &r);
            match &ok {
                Ok(()) => passed += 1,
                Err(e) => {
                    failed += 1;
                    failures.push(format!("{} ({who}): {e}", case.name));
                }
            }
            cells.push(cell(&case, &r, &ok));
        }
        let row = format!("| {} | {} | {} |", case.name, cells[0], cells[1]);
        println!("{row}");
        rows.push(row);
    }
    let n = if quick { 10 } else { 50 };
    let lo = latency(&world, &ours, n)?;
    let lc = latency(&world, &c, n)?;
    println!("| echo latency, {n} sequential calls | {lo:.1} ms per call | {lc:.1} ms per call |");
    for f in &failures {
        println!("FAILED: {f}");
    }
    println!("{passed} passed, {failed} failed");
    let _ = rows;
    if failed > 0 {
        return Err(format!("{failed} real-stack checks failed"));
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The bench: each transfer case `reps` times per client (interleaved,
/// ours then C), median MB/s and CPU seconds per GiB of the client
/// process; then the mean latency of 100 sequential echo calls.
fn bench_inner(world: &World, ours: &Path, c: &Path, reps: usize) -> Result<(), String> {
    println!(
        "== bench: ours vs the C qrexec-client-vm through the real C stack ({reps} reps, median)"
    );
    println!("| transfer | ours MB/s | C MB/s | ours/C | ours CPU s/GiB | C CPU s/GiB |");
    println!("|---|---|---|---|---|---|");
    let picks = [
        "upload 64 MiB",
        "download 64 MiB",
        "cat 64 MiB each way",
        "--buffer-size=1048576 cat 16 MiB",
    ];
    for case in cases(&world.dir)
        .into_iter()
        .filter(|c| picks.contains(&c.name))
    {
        let mut rates = [Vec::new(), Vec::new()];
        let mut cpus = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (i, client) in [ours, c].into_iter().enumerate() {
                let r = call(world, client, &case)?;
                judge(world, &case, &r).map_err(|e| format!("{}: {e}", case.name))?;
                rates[i].push(case.bytes as f64 / r.secs / 1e6);
                cpus[i].push(r.cpu / (case.bytes as f64 / (1u64 << 30) as f64));
            }
        }
        let [ro, rc] = rates.map(median);
        let [co, cc] = cpus.map(median);
        println!(
            "| {} | {ro:.0} | {rc:.0} | {:.2} | {co:.2} | {cc:.2} |",
            case.name,
            ro / rc
        );
    }
    let lo = latency(world, ours, 100)?;
    let lc = latency(world, c, 100)?;
    println!(
        "| echo latency (100 sequential calls) | {lo:.1} ms | {lc:.1} ms | {:.2} | | |",
        lo / lc
    );
    Ok(())
}

/// `--storm N`: N echo calls started at once from `work` into `personal`,
/// with our client, then with the C client; every failure is counted and
/// its first lines are reported (they are the C stack's limits, or ours).
/// Fails unless all of ours succeed.
fn storm(world: &World, ours: &Path, c: &Path, n: usize) -> Result<(), String> {
    println!("== storm: {n} calls at once through the real C stack, ours then the C client");
    let mut ours_failed = 0;
    // UPSTREAM_STORM_ONLY=ours|C: one client per run, each on a fresh stack.
    let only = std::env::var("UPSTREAM_STORM_ONLY").ok();
    for (who, client) in [("ours", ours), ("C", c)] {
        if only.as_deref().is_some_and(|o| o != who) {
            continue;
        }
        let t0 = Instant::now();
        let outcomes: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    s.spawn(move || {
                        let msg = format!("call {i}\n").into_bytes();
                        let case = case(
                            "storm",
                            &["personal", "test.Echo"],
                            Input::Bytes(msg.clone()),
                            0,
                        )
                        .out(Check::Eq(msg));
                        let r = call(world, client, &case)?;
                        judge(world, &case, &r)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
                .collect()
        });
        let failures: Vec<&String> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
        println!(
            "{who}: {} of {n} succeeded, {} failed, {:.1} s",
            n - failures.len(),
            failures.len(),
            t0.elapsed().as_secs_f64()
        );
        let mut kinds: Vec<String> = failures
            .iter()
            .map(|f| f.chars().take(160).collect())
            .collect();
        kinds.sort();
        kinds.dedup();
        for k in kinds.iter().take(5) {
            println!("  {who} failure: {k}");
        }
        if who == "ours" {
            ours_failed = failures.len();
        }
    }
    if ours_failed > 0 {
        return Err(format!("{ours_failed} of our {n} storm calls failed"));
    }
    Ok(())
}
