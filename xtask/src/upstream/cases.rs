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

/// What the client reads.
#[derive(Clone)]
enum Input {
    Bytes(Vec<u8>),
    /// The first `len` bytes of the world's data file, through a pipe.
    Data(usize),
    /// A pipe that stays open until the client has exited.
    KeptOpen,
}

/// Where the client's stdout goes.
#[derive(Clone, Copy, PartialEq)]
enum Output {
    Capture,
    /// A reader that starts this late, then reads everything.
    Late(Duration),
}

#[derive(Clone)]
enum Check {
    Any,
    Eq(Vec<u8>),
    Contains(&'static str),
    /// The SHA-256 and length of the first `len` bytes of the data file.
    Data(usize),
    /// The service's answer is the SHA-256 of the first `len` data bytes.
    ShaLine(usize),
}

#[derive(Clone)]
struct Case {
    name: &'static str,
    args: Vec<String>,
    input: Input,
    output: Output,
    code: i32,
    stdout: Check,
    stderr: Check,
    /// Bytes moved, for MB/s.
    bytes: usize,
}

fn case(name: &'static str, args: &[&str], input: Input, code: i32) -> Case {
    Case {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        input,
        output: Output::Capture,
        code,
        stdout: Check::Any,
        stderr: Check::Any,
        bytes: 0,
    }
}

impl Case {
    fn out(mut self, c: Check) -> Case {
        self.stdout = c;
        self
    }
    fn err(mut self, c: Check) -> Case {
        self.stderr = c;
        self
    }
    fn bytes(mut self, n: usize) -> Case {
        self.bytes = n;
        self
    }
    fn late(mut self, d: Duration) -> Case {
        self.output = Output::Late(d);
        self
    }
}

fn cases(world: &Path) -> Vec<Case> {
    let w = world.display();
    let local_ping = "echo ping; read x; [ \"$x\" = ping ] && exit 0; exit 3".to_string();
    let local_exit5 = "echo ping; read x; exit 5".to_string();
    let local_upload = format!("head -c {} {w}/data", 16 * MIB);
    vec![
        case(
            "echo",
            &["personal", "test.Echo"],
            Input::Bytes(b"hello\n".to_vec()),
            0,
        )
        .out(Check::Eq(b"hello\n".to_vec())),
        case(
            "argument + QREXEC_REMOTE_DOMAIN",
            &["personal", "test.Args+foo"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"vm=personal arg=foo remote=work\n".to_vec())),
        case(
            "exit code 42",
            &["personal", "test.Exit+42"],
            Input::Bytes(vec![]),
            42,
        ),
        case(
            "refused",
            &["personal", "test.Refused"],
            Input::Bytes(vec![]),
            126,
        )
        .err(Check::Contains("Request refused")),
        case(
            "missing service",
            &["personal", "test.Missing"],
            Input::Bytes(vec![]),
            127,
        ),
        case(
            "stderr",
            &["personal", "test.Stderr"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"to stdout\n".to_vec()))
        .err(Check::Contains("to stderr")),
        case(
            "filter -t (stdout)",
            &["-t", "personal", "test.Escape"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"a_[31mb\n".to_vec())),
        case(
            "filter -T (stderr)",
            &["-T", "personal", "test.Escape"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"a\x1b[31mb\n".to_vec()))
        .err(Check::Contains("c_[0md")),
        case(
            "$default",
            &["$default", "test.Args"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"vm=personal arg= remote=work\n".to_vec())),
        case(
            "dom0 target",
            &["dom0", "test.Args+x"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"vm=dom0 arg=x remote=work\n".to_vec())),
        case(
            "--prefix-data",
            &["--prefix-data=PRE:", "personal", "test.Echo"],
            Input::Bytes(b"data".to_vec()),
            0,
        )
        .out(Check::Eq(b"PRE:data".to_vec())),
        case(
            "local program",
            &["personal", "test.Echo", "/bin/sh", "-c", &local_ping],
            Input::Bytes(vec![]),
            0,
        ),
        case(
            "local program exit 5",
            &["personal", "test.Echo", "/bin/sh", "-c", &local_exit5],
            Input::Bytes(vec![]),
            5,
        ),
        case(
            "service exits, our stdin open",
            &["personal", "test.Exit+0"],
            Input::KeptOpen,
            0,
        ),
        case(
            "8 MiB on stderr",
            &["personal", "test.BigErr"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"done\n".to_vec()))
        .err(Check::Data(8 * MIB)),
        case(
            "upload 1 MiB",
            &["personal", "test.Sha"],
            Input::Data(MIB),
            0,
        )
        .out(Check::ShaLine(MIB))
        .bytes(MIB),
        case(
            "upload 64 MiB",
            &["personal", "test.Sha"],
            Input::Data(64 * MIB),
            0,
        )
        .out(Check::ShaLine(64 * MIB))
        .bytes(64 * MIB),
        case(
            "download 64 MiB",
            &["personal", "test.Gen+67108864"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Data(64 * MIB))
        .bytes(64 * MIB),
        case(
            "cat 64 MiB each way",
            &["personal", "test.Echo"],
            Input::Data(64 * MIB),
            0,
        )
        .out(Check::Data(64 * MIB))
        .bytes(64 * MIB),
        case(
            "--buffer-size=1048576 cat 16 MiB",
            &["--buffer-size=1048576", "personal", "test.Echo"],
            Input::Data(16 * MIB),
            0,
        )
        .out(Check::Data(16 * MIB))
        .bytes(16 * MIB),
        case(
            "local program uploads 16 MiB",
            &["personal", "test.Sha", "/bin/sh", "-c", &local_upload],
            Input::Bytes(vec![]),
            0,
        )
        .bytes(16 * MIB),
        case(
            "service reads 1000 B of 64 MiB",
            &["personal", "test.Head1000"],
            Input::Data(64 * MIB),
            0,
        )
        .out(Check::Eq(b"ok\n".to_vec())),
        case(
            "download to a reader 2 s late",
            &["personal", "test.Gen+16777216"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Data(16 * MIB))
        .bytes(16 * MIB)
        .late(Duration::from_secs(2)),
    ]
}

/// Processes of the simulated Qubes, each in its own process group,
/// killed (group and all) on drop.
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<(), String> {
        let child = cmd.spawn().map_err(|e| format!("start {name}: {e}"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }
    fn check_alive(&mut self) -> Result<(), String> {
        for (name, c) in &mut self.0 {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!("{name} exited ({st})"));
            }
        }
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write_exec(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

/// The services of one VM (or dom0), named `vm`.
fn services(dir: &Path, vm: &str, world: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let w = world.display();
    for (name, body) in [
        ("test.Echo", "exec cat".to_string()),
        (
            "test.Args",
            format!("printf 'vm={vm} arg=%s remote=%s\\n' \"$1\" \"$QREXEC_REMOTE_DOMAIN\""),
        ),
        ("test.Exit", "exit \"${1:-0}\"".to_string()),
        ("test.Sha", "sha256sum | cut -d' ' -f1".to_string()),
        ("test.Gen", format!("exec head -c \"$1\" {w}/data")),
        (
            "test.Stderr",
            "printf 'to stderr\\n' >&2; printf 'to stdout\\n'".to_string(),
        ),
        (
            "test.BigErr",
            format!("head -c {} {w}/data >&2; echo done", 8 * MIB),
        ),
        (
            "test.Escape",
            "printf 'a\\033[31mb\\n'; printf 'c\\033[0md\\n' >&2".to_string(),
        ),
        (
            "test.Head1000",
            "head -c 1000 >/dev/null; echo ok".to_string(),
        ),
    ] {
        write_exec(&dir.join(name), &format!("#!/bin/sh\n{body}\n"))?;
    }
    Ok(())
}

const POLICY: &str = r#"#!/bin/sh
# qrexec-policy-exec -- SOURCE TARGET SERVICE (a stand-in for qubesd's policy)
src=$2; tgt=$3; svc=$4
case "$svc" in test.Refused*) echo result=deny; exit 1;; esac
case "$tgt" in
  @default|'$default') t=personal;;
  work|personal|dom0|@adminvm) t=$tgt;;
  *) echo result=deny; exit 1;;
esac
printf 'result=allow\nautostart=False\nuser=%s\ntarget=%s\nrequested_target=%s\n' "$(id -un)" "$t" "$tgt"
"#;

struct World {
    dir: PathBuf,
    vchan: PathBuf,
    qrexec: PathBuf,
    data_sha: std::collections::HashMap<usize, String>,
    _procs: Procs,
}

fn sha256(path: &Path, len: Option<usize>) -> Result<String, String> {
    let cmd = match len {
        Some(n) => format!("head -c {n} '{}' | sha256sum", path.display()),
        None => format!("sha256sum < '{}'", path.display()),
    };
    let out = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .output()
        .map_err(|e| e.to_string())?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| format!("{cmd}: no output"))
}

fn start_world(stage: &Path) -> Result<World, String> {
    let dir = stage.join("world");
    let vchan = dir.join("vchan");
    let sockets = dir.join("daemon");
    for d in [&vchan, &sockets] {
        fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    // 64 MiB of pseudo-random data, the source of every transfer.
    sh(Command::new("sh").arg("-c").arg(format!(
        "head -c {} /dev/urandom > '{}'",
        64 * MIB,
        dir.join("data").display()
    )))?;
    let mut data_sha = std::collections::HashMap::new();
    for n in [MIB, 8 * MIB, 16 * MIB, 64 * MIB] {
        data_sha.insert(n, sha256(&dir.join("data"), Some(n))?);
    }
    write_exec(&dir.join("policy"), POLICY)?;
    let qrexec = stage.join("qubes-core-qrexec");
    services(&dir.join("dom0/rpc"), "dom0", &dir)?;
    let mut procs = Procs(Vec::new());
    let vms = [(1u32, "work"), (2, "personal")];
    for (id, name) in vms {
        let home = dir.join(name);
        services(&home.join("rpc"), name, &dir)?;
        fs::create_dir_all(home.join("rpc-config")).map_err(|e| e.to_string())?;
        let log = fs::File::create(home.join("agent.log")).map_err(|e| e.to_string())?;
        procs.spawn(
            &format!("qrexec-agent ({name})"),
            Command::new("setsid")
                .arg(qrexec.join("agent/qrexec-agent"))
                .arg("--no-fork-server")
                .arg(format!(
                    "--agent-socket={}",
                    home.join("agent.sock").display()
                ))
                .env("VCHAN_DOMAIN", id.to_string())
                .env("VCHAN_SOCKET_DIR", &vchan)
                .env("QREXEC_SERVICE_PATH", home.join("rpc"))
                .env("QUBES_RPC_CONFIG_PATH", home.join("rpc-config"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log),
        )?;
    }
    for (id, name) in vms {
        let log =
            fs::File::create(dir.join(format!("daemon-{name}.log"))).map_err(|e| e.to_string())?;
        procs.spawn(
            &format!("qrexec-daemon ({name})"),
            Command::new("setsid")
                .arg(qrexec.join("daemon/qrexec-daemon"))
                .arg(format!("--socket-dir={}", sockets.display()))
                .arg(format!("--policy-program={}", dir.join("policy").display()))
                .arg("--direct")
                .arg(format!("--uuid=00000000-0000-4000-8000-{id:012}"))
                .arg(id.to_string())
                .arg(name)
                .env("VCHAN_DOMAIN", "0")
                .env("VCHAN_SOCKET_DIR", &vchan)
                .env("QREXEC_SERVICE_PATH", dir.join("dom0/rpc"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log),
        )?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (_, name) in vms {
        while !sockets.join(format!("qrexec.{name}")).exists() {
            procs.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "the daemon for {name} did not come up (logs in {})",
                    dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(World {
        dir,
        vchan,
        qrexec,
        data_sha,
        _procs: procs,
    })
}

/// What one call did.
struct Run {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    secs: f64,
    cpu: f64,
    hung: bool,
}

fn code_of(st: ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    st.code().or_else(|| st.signal().map(|s| 128 + s))
}

fn cpu_children() -> f64 {
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

fn call(world: &World, client: &Path, case: &Case) -> Result<Run, String> {
    let mut cmd = Command::new(client);
    cmd.arg(format!(
        "--agent-socket={}",
        world.dir.join("work/agent.sock").display()
    ))
    .args(&case.args)
    .env("VCHAN_DOMAIN", "1")
    .env("VCHAN_SOCKET_DIR", &world.vchan)
    .env("QREXEC_NO_ROOT", "1")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let cpu0 = cpu_children();
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", client.display()))?;
    let mut stdin = child.stdin.take();
    let input = case.input.clone();
    let data = world.dir.join("data");
    let feeder = std::thread::spawn(move || {
        let mut w = stdin.take()?;
        match input {
            Input::Bytes(b) => {
                let _ = w.write_all(&b);
                None
            }
            Input::Data(n) => {
                if let Ok(f) = fs::File::open(&data) {
                    let _ = std::io::copy(&mut f.take(n as u64), &mut w);
                }
                None
            }
            Input::KeptOpen => Some(w),
        }
    });
    let late = match case.output {
        Output::Late(d) => Some(d),
        Output::Capture => None,
    };
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        if let Some(d) = late {
            std::thread::sleep(d);
        }
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let ereader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut hung = false;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(st);
        }
        if t0.elapsed() > HANG {
            hung = true;
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_children() - cpu0;
    // The kept-open pipe closes only now, after the client exited.
    drop(feeder.join());
    let stdout = reader.join().unwrap_or_default();
    let stderr = ereader.join().unwrap_or_default();
    Ok(Run {
        code: status.and_then(code_of),
        stdout,
        stderr,
        secs,
        cpu,
        hung,
    })
}

fn sha_of(bytes: &[u8]) -> Result<String, String> {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut w = c.stdin.take().ok_or("no stdin")?;
    let data = bytes.to_vec();
    let t = std::thread::spawn(move || w.write_all(&data));
    let out = c.wait_with_output().map_err(|e| e.to_string())?;
    let _ = t.join();
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

fn check(world: &World, c: &Check, got: &[u8], what: &str) -> Result<(), String> {
    let show = |b: &[u8]| {
        let s = String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned();
        format!("{s:?}{}", if b.len() > 120 { "…" } else { "" })
    };
    match c {
        Check::Any => Ok(()),
        Check::Eq(want) if got == want.as_slice() => Ok(()),
        Check::Eq(want) => Err(format!("{what} {} ≠ {}", show(got), show(want))),
        Check::Contains(s) if String::from_utf8_lossy(got).contains(s) => Ok(()),
        Check::Contains(s) => Err(format!("{what} {} lacks {s:?}", show(got))),
        Check::Data(n) => {
            let want = &world.data_sha[n];
            if got.len() != *n {
                return Err(format!("{what}: {} bytes, not {n}", got.len()));
            }
            let sha = sha_of(got)?;
            if &sha == want {
                Ok(())
            } else {
                Err(format!("{what}: SHA-256 {sha} ≠ {want}"))
            }
        }
        Check::ShaLine(n) => {
            let want = format!("{}\n", world.data_sha[n]);
            if got == want.as_bytes() {
                Ok(())
            } else {
                Err(format!("{what} {} ≠ SHA-256 of the input", show(got)))
            }
        }
    }
}

fn judge(world: &World, case: &Case, r: &Run) -> Result<(), String> {
    if r.hung {
        return Err(format!("hang: killed after {} s", HANG.as_secs()));
    }
    if r.code != Some(case.code) {
        return Err(format!(
            "exit {:?}, expected {} (stderr {:?})",
            r.code,
            case.code,
            String::from_utf8_lossy(&r.stderr[..r.stderr.len().min(200)])
        ));
    }
    check(world, &case.stdout, &r.stdout, "stdout")?;
    check(world, &case.stderr, &r.stderr, "stderr")
}

fn cell(case: &Case, r: &Run, ok: &Result<(), String>) -> String {
    let verdict = if ok.is_ok() { "ok" } else { "FAIL" };
    let rate = if case.bytes > 0 && r.secs > 0.0 {
        format!("{:.0} MB/s", case.bytes as f64 / r.secs / 1e6)
    } else {
        String::new()
    };
    format!("{verdict} {:.2} s {rate} cpu {:.2} s", r.secs, r.cpu)
}

/// Mean wall time of `n` sequential trivial echo calls.
fn latency(world: &World, client: &Path, n: usize) -> Result<f64, String> {
    let c = case(
        "echo",
        &["personal", "test.Echo"],
        Input::Bytes(b"x".to_vec()),
        0,
    )
    .out(Check::Eq(b"x".to_vec()));
    let t0 = Instant::now();
    for _ in 0..n {
        let r = call(world, client, &c)?;
        judge(world, &c, &r).map_err(|e| format!("latency call: {e}"))?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0 / n as f64)
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
    println!(
        "| transfer | ours MB/s | C MB/s | ours/C | ours CPU s/GiB | C CPU s/GiB | ours/C CPU per byte |"
    );
    println!("|---|---|---|---|---|---|---|");
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
            "| {} | {ro:.0} | {rc:.0} | {:.2} | {co:.2} | {cc:.2} | {:.2} |",
            case.name,
            ro / rc,
            co / cc
        );
    }
    let lo = latency(world, ours, 100)?;
    let lc = latency(world, c, 100)?;
    println!(
        "| echo latency (100 sequential calls) | {lo:.1} ms | {lc:.1} ms | {:.2} | | | |",
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
