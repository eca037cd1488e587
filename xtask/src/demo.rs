//! `cargo xtask demo [--quick]`: a simulated Qubes with three VMs, and
//! `qrexec-client-vm` itself calling services in it.
//!
//! Builds `qubes-sim` and `qrexec-client-vm` (release), starts the
//! simulation described by `sim/demo/` (VMs, policy, services) in a
//! temporary directory, runs the calls below as a VM would, prints what
//! happened, stops the simulation with `qubes-sim stop` and checks that
//! nothing is left. Any step that does not give the expected result makes
//! the command fail (CI runs it with `--quick`, which moves less data).
//!
//! The calls: an echo; a file transfer (100 MiB, or 16 MiB with `--quick`)
//! with its SHA-256 checked in the target and throughput printed; a refused
//! call (`Request refused`, exit 126); a call with a local program; a
//! transfer with `--buffer-size` above 64 KiB; `$dispvm` and `$default`
//! targets; a missing service (127).

use crate::util;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// What one call gave.
struct Outcome {
    status: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    secs: f64,
}

/// One line of the summary.
struct Step {
    title: &'static str,
    expected: i32,
    got: Option<i32>,
    ok: bool,
    note: String,
}

/// The running simulation (stopped on drop if `stop` was not called).
struct SimProc {
    exe: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

impl SimProc {
    fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let st = Command::new(&self.exe)
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .status()
            .map_err(|e| format!("qubes-sim stop: {e}"))?;
        let exit = wait_timeout(&mut child, Duration::from_secs(30));
        if !st.success() {
            return Err(format!("qubes-sim stop failed ({st})"));
        }
        match exit {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(format!("the simulation ended with {s}")),
            None => Err("the simulation did not stop".into()),
        }
    }
}

impl Drop for SimProc {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A VM of the running simulation, as `qrexec-client-vm` needs it.
struct Vm {
    name: String,
    env: Vec<(String, String)>,
    agent_socket: String,
}

fn read_vm(sim_dir: &Path, name: &str) -> Result<Vm, String> {
    let path = sim_dir.join("vms").join(name).join("env");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut env = Vec::new();
    let mut agent_socket = String::new();
    for line in text.lines() {
        let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) else {
            continue;
        };
        let v = v.trim_matches('\'').to_string();
        match k {
            "VCHAN_LOCAL_DIR" | "VCHAN_DOMAIN" => env.push((k.to_string(), v)),
            "QUBES_SIM_AGENT_SOCKET" => agent_socket = v,
            _ => {}
        }
    }
    if env.len() != 2 || agent_socket.is_empty() {
        return Err(format!("{}: incomplete", path.display()));
    }
    Ok(Vm {
        name: name.to_string(),
        env,
        agent_socket,
    })
}

struct Demo {
    client: PathBuf,
    steps: Vec<Step>,
    tty: bool,
}

impl Demo {
    fn command(&self, vm: &Vm, args: &[&str]) -> Command {
        let mut c = Command::new(&self.client);
        c.envs(vm.env.iter().map(|(k, v)| (k, v)))
            .env_remove("VCHAN_SOCKET_DIR")
            .env_remove("VCHAN_TRANSPORT")
            // Pointed at the simulation only by environment.
            .env("QREXEC_AGENT_SOCKET", &vm.agent_socket)
            .args(args);
        c
    }

    /// Run `qrexec-client-vm ARGS` in `vm`, feeding it `input`: either
    /// bytes, or a file sent in 1 MiB pieces with a progress indication.
    fn call(&self, vm: &Vm, args: &[&str], input: Input<'_>) -> Result<Outcome, String> {
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains(' ') || a.contains('$') {
                    format!("'{a}'")
                } else {
                    a.to_string()
                }
            })
            .collect();
        println!(
            "  [{}] {}$ qrexec-client-vm {}",
            self.steps.len() + 1,
            vm.name,
            shown.join(" ")
        );
        let started = Instant::now();
        let mut child = self
            .command(vm, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.client.display()))?;
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let ro = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.as_mut().map(|o| o.read_to_end(&mut v));
            v
        });
        let re = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.as_mut().map(|e| e.read_to_end(&mut v));
            v
        });
        let mut stdin = child.stdin.take();
        let timeout = match input {
            Input::Bytes(b) => {
                if let Some(s) = stdin.as_mut() {
                    let _ = s.write_all(b);
                }
                Duration::from_secs(60)
            }
            Input::File(path, label) => {
                self.send_file(stdin.as_mut(), path, label)?;
                Duration::from_secs(300)
            }
        };
        drop(stdin);
        let status = wait_timeout(&mut child, timeout);
        let secs = started.elapsed().as_secs_f64();
        let stdout = ro.join().unwrap_or_default();
        let stderr = re.join().unwrap_or_default();
        if status.is_none() {
            return Err(format!(
                "qrexec-client-vm {} did not finish within {timeout:?}",
                args.join(" ")
            ));
        }
        Ok(Outcome {
            status: status.and_then(|s| s.code()),
            stdout,
            stderr,
            secs,
        })
    }

    fn send_file(
        &self,
        stdin: Option<&mut std::process::ChildStdin>,
        path: &Path,
        label: &str,
    ) -> Result<(), String> {
        let Some(stdin) = stdin else { return Ok(()) };
        let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let total = f.metadata().map(|m| m.len() as usize).unwrap_or(0).max(1);
        let mut buf = vec![0u8; MIB];
        let mut sent = 0usize;
        let mut shown = 0;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            if stdin.write_all(&buf[..n]).is_err() {
                break; // the client ended early; its status tells why
            }
            sent += n;
            let pct = sent * 100 / total;
            if self.tty {
                print!(
                    "\r      {label}: {:>4} / {} MiB {:>3}%",
                    sent / MIB,
                    total / MIB,
                    pct
                );
                let _ = std::io::stdout().flush();
            } else if pct >= shown + 25 || sent == total {
                shown = pct - pct % 25;
                println!(
                    "      {label}: {:>4} / {} MiB ({pct}%)",
                    sent / MIB,
                    total / MIB
                );
            }
        }
        if self.tty {
            println!();
        }
        Ok(())
    }

    fn record(
        &mut self,
        title: &'static str,
        expected: i32,
        r: Result<Outcome, String>,
        check: impl FnOnce(&Outcome) -> Result<String, String>,
    ) {
        let (got, ok, note) = match r {
            Err(e) => (None, false, e),
            Ok(o) => {
                let status_ok = o.status == Some(expected);
                match check(&o) {
                    Ok(note) if status_ok => (o.status, true, note),
                    Ok(note) => (
                        o.status,
                        false,
                        format!(
                            "{note}; stderr: {}",
                            String::from_utf8_lossy(&o.stderr).trim()
                        ),
                    ),
                    Err(why) => (o.status, false, why),
                }
            }
        };
        println!(
            "      {} exit {}: {note}",
            if ok { "ok" } else { "FAILED:" },
            got.map_or("none".to_string(), |c| c.to_string()),
        );
        self.steps.push(Step {
            title,
            expected,
            got,
            ok,
            note,
        });
    }
}

enum Input<'a> {
    Bytes(&'a [u8]),
    File(&'a Path, &'a str),
}

/// Write `size` bytes of deterministic pseudo-random data.
fn make_file(path: &Path, size: usize, seed: u64) -> Result<(), String> {
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; MIB];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            w.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(MIB);
        f.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        left -= n;
    }
    Ok(())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_string()
}

fn rate(bytes: usize, secs: f64) -> String {
    format!(
        "{:.1} MiB in {secs:.2} s = {:.0} MB/s",
        bytes as f64 / MIB as f64,
        bytes as f64 / 1e6 / secs.max(1e-9)
    )
}

/// Runs the demo; `--quick` moves less data.
pub fn run(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(a) = args.iter().find(|a| *a != "--quick") {
        return Err(format!(
            "unknown argument '{a}' (usage: cargo xtask demo [--quick])"
        ));
    }
    println!("== building qubes-sim and qrexec-client-vm (release)");
    util::cargo(&[
        "build",
        "--release",
        "--quiet",
        "-p",
        "qubes-sim",
        "-p",
        "qrexec",
        "--bins",
    ])?;
    let bin = util::target_dir().join("release");
    let sim_exe = bin.join("qubes-sim");
    // Another build of the client can be shown by naming it.
    let client = std::env::var_os("QUBES_SIM_CLIENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin.join("qrexec-client-vm"));
    let demo_dir = util::root().join("sim").join("demo");
    let tmp = std::env::temp_dir().join(format!("qubes-sim-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = run_in(&sim_exe, &client, &demo_dir, &tmp, quick);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn run_in(
    sim_exe: &Path,
    client: &Path,
    demo_dir: &Path,
    tmp: &Path,
    quick: bool,
) -> Result<(), String> {
    let sim_dir = tmp.join("sim");
    let log_path = tmp.join("sim-output.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    println!(
        "== starting the simulation ({}/sim.conf) in {}",
        demo_dir.display(),
        sim_dir.display()
    );
    let child = Command::new(sim_exe)
        .args(["run", "--dir"])
        .arg(&sim_dir)
        .arg("--config")
        .arg(demo_dir.join("sim.conf"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("start {}: {e}", sim_exe.display()))?;
    let mut sim = SimProc {
        exe: sim_exe.to_path_buf(),
        dir: sim_dir.clone(),
        child: Some(child),
    };
    let show_log = || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !log.trim().is_empty() {
            println!("-- simulation output --\n{}\n-- end --", log.trim_end());
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sim_dir.join("ready").exists() {
        if let Some(c) = sim.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            sim.child = None;
            show_log();
            return Err(format!("the simulation exited before it was ready ({st})"));
        }
        if Instant::now() > deadline {
            show_log();
            return Err("the simulation did not become ready in 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let calls = (|| -> Result<Vec<Step>, String> {
        let work = read_vm(&sim_dir, "work")?;
        let personal = read_vm(&sim_dir, "personal")?;
        let _dvm = read_vm(&sim_dir, "dvm")?;
        println!(
            "   VMs: work (domain {}), personal (domain {}), dvm (DispVM template); policy {}",
            work.env[1].1,
            personal.env[1].1,
            demo_dir.join("policy.txt").display()
        );
        let mut d = Demo {
            client: client.to_path_buf(),
            steps: Vec::new(),
            tty: std::io::stdout().is_terminal(),
        };
        run_calls(&mut d, &work, &sim_dir, quick)?;
        Ok(d.steps)
    })();
    println!("== stopping the simulation (qubes-sim stop)");
    let stopped = sim.stop();
    let steps = match calls {
        Ok(s) => s,
        Err(e) => {
            show_log();
            return Err(e);
        }
    };
    let leftover = sim_dir.exists();
    println!();
    println!("== summary");
    for s in &steps {
        println!(
            "  {:<4} {:<16} exit {:>4} (expected {:>3})  {}",
            if s.ok { "ok" } else { "FAIL" },
            s.title,
            s.got.map_or("none".to_string(), |c| c.to_string()),
            s.expected,
            s.note
        );
    }
    let failed = steps.iter().filter(|s| !s.ok).count();
    let mut problems = Vec::new();
    if failed > 0 {
        problems.push(format!("{failed} of {} calls failed", steps.len()));
    }
    if let Err(e) = stopped {
        problems.push(format!("stopping: {e}"));
    }
    if leftover {
        problems.push(format!("{} was left on disk", sim_dir.display()));
    }
    if problems.is_empty() {
        println!(
            "  all {} calls gave the expected result; the simulation stopped and left nothing behind",
            steps.len()
        );
        Ok(())
    } else {
        show_log();
        Err(problems.join("; "))
    }
}

fn run_calls(d: &mut Demo, work: &Vm, sim_dir: &Path, quick: bool) -> Result<(), String> {
    println!("== calls from work, with qrexec-client-vm");

    // 1. Echo.
    let args = ["personal", "demo.Echo"];
    let msg = b"Hello from work!\n";
    let r = d.call(work, &args, Input::Bytes(msg));
    d.record("echo", 0, r, |o| {
        if o.stdout == msg {
            Ok(format!("echoed \"{}\"", text(&o.stdout)))
        } else {
            Err(format!("echoed \"{}\"", text(&o.stdout)))
        }
    });

    // 2. File transfer with checksums.
    let size = if quick { 16 * MIB } else { 100 * MIB };
    let home = sim_dir.join("vms").join("work").join("home");
    let file = home.join("big.bin");
    make_file(&file, size, 0x5eed)?;
    let local_sum = util::sha256_file(&file)?;
    let args = ["personal", "demo.ReceiveFile+big.bin"];
    let r = d.call(work, &args, Input::File(&file, "big.bin"));
    d.record("file transfer", 0, r, |o| {
        if text(&o.stdout) == size.to_string() {
            Ok(format!("stored {} bytes: {}", size, rate(size, o.secs)))
        } else {
            Err(format!(
                "target stored '{}' bytes, sent {size}",
                text(&o.stdout)
            ))
        }
    });
    let args = ["personal", "demo.Sha256+big.bin"];
    let r = d.call(work, &args, Input::Bytes(b""));
    d.record("checksum", 0, r, |o| {
        let remote = text(&o.stdout);
        if remote == local_sum {
            Ok(format!(
                "SHA-256 in personal = SHA-256 in work = {}…",
                &remote[..16]
            ))
        } else {
            Err(format!(
                "SHA-256 differs: personal {remote}, work {local_sum}"
            ))
        }
    });

    // 3. Refused by the policy.
    let args = ["personal", "demo.Secret"];
    let r = d.call(work, &args, Input::Bytes(b""));
    d.record("refused", 126, r, |o| {
        if o.stderr == b"Request refused\n" && o.stdout.is_empty() {
            Ok("stderr: \"Request refused\" (the policy denies demo.Secret)".into())
        } else {
            Err(format!("stderr \"{}\"", text(&o.stderr)))
        }
    });

    // 4. A local program: its stdout goes to the service, the service's
    //    output to its stdin.
    let args = [
        "personal",
        "demo.Echo",
        "/bin/sh",
        "-c",
        "echo ping; read reply; echo \"local program received: $reply\" >&2",
    ];
    let r = d.call(work, &args, Input::Bytes(b""));
    d.record("local program", 0, r, |o| {
        let e = text(&o.stderr);
        if e == "local program received: ping" {
            Ok(format!("\"{e}\""))
        } else {
            Err(format!("stderr \"{e}\""))
        }
    });

    // 5. --buffer-size above 64 KiB.
    let size2 = if quick { 8 * MIB } else { 32 * MIB };
    let file2 = home.join("big2.bin");
    make_file(&file2, size2, 0xb0f)?;
    let args = [
        "--buffer-size=262144",
        "personal",
        "demo.ReceiveFile+big2.bin",
    ];
    let r = d.call(work, &args, Input::File(&file2, "big2.bin"));
    d.record("--buffer-size", 0, r, |o| {
        if text(&o.stdout) == size2.to_string() {
            Ok(format!("256 KiB rings: {}", rate(size2, o.secs)))
        } else {
            Err(format!(
                "target stored '{}' bytes, sent {size2}",
                text(&o.stdout)
            ))
        }
    });

    // 6. $dispvm and $default.
    let args = ["$dispvm", "demo.WhoAmI"];
    let r = d.call(work, &args, Input::Bytes(b""));
    d.record("$dispvm", 0, r, |o| {
        let t = text(&o.stdout);
        if t.starts_with("I am disp") {
            Ok(format!(
                "\"{t}\" (a fresh DispVM from dvm, destroyed afterwards)"
            ))
        } else {
            Err(format!("\"{t}\""))
        }
    });
    let args = ["$default", "demo.WhoAmI"];
    let r = d.call(work, &args, Input::Bytes(b""));
    d.record("$default", 0, r, |o| {
        let t = text(&o.stdout);
        if t.starts_with("I am personal") {
            Ok(format!("\"{t}\" (the policy's target= for @default)"))
        } else {
            Err(format!("\"{t}\""))
        }
    });

    // 7. Allowed, but no such service in the target.
    let args = ["personal", "demo.Missing"];
    let r = d.call(work, &args, Input::Bytes(b""));
    d.record("missing service", 127, r, |_| {
        Ok("allowed, but personal has no such service".into())
    });
    Ok(())
}
