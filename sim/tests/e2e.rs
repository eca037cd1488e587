//! End to end through the simulation with the real `qrexec-client-vm`:
//! the same binary a Qubes VM runs, pointed at the simulation only by its
//! environment (`VCHAN_LOCAL_DIR`, `VCHAN_DOMAIN`) and `--agent-socket`.

mod common;
use common::Sim;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

const CONF: &str = "vm work\nvm personal\nvm dvm template_for_dispvms=yes\ndefault_dispvm dvm\n";

const POLICY: &str = "\
test.Echo     *       @anyvm  @anyvm    allow\n\
test.Env      *       @anyvm  @anyvm    allow\n\
test.Exit     *       @anyvm  @anyvm    allow\n\
test.Missing  *       @anyvm  @anyvm    allow\n\
test.Die      *       @anyvm  @anyvm    allow\n\
test.Hang     *       @anyvm  @anyvm    allow\n\
test.Sum      *       @anyvm  @anyvm    allow\n\
test.WhoAmI   *       @anyvm  @dispvm   allow\n\
test.WhoAmI   *       @anyvm  @dispvm:dvm  allow\n\
test.WhoAmI   *       @anyvm  @default  allow  target=personal\n\
test.WhoAmI   *       @anyvm  @anyvm    allow\n\
test.Secret   *       @anyvm  @anyvm    deny\n\
test.Bg       *       @anyvm  @anyvm    allow\n\
*             *       @anyvm  @anyvm    deny\n";

const SERVICES: &[(&str, &str)] = &[
    ("test.Echo", "#!/bin/sh\nexec cat\n"),
    (
        "test.Env",
        "#!/bin/sh\n\
         echo \"argv1=$1\"\n\
         echo \"pwd=$(pwd)\"\n\
         env | grep -E '^(QREXEC|HOME=|USER=|LOGNAME=|QUBES_SIM_VM_NAME=)' | sort\n",
    ),
    (
        "test.Exit",
        "#!/bin/sh\necho out; echo err >&2; exit \"$1\"\n",
    ),
    ("test.Die", "#!/bin/sh\necho before\nkill -9 $$\n"),
    ("test.Hang", "#!/bin/sh\necho started\nexec sleep 60\n"),
    // Byte count and a checksum of stdin, with tools every Linux has.
    ("test.Sum", "#!/bin/sh\nexec cksum\n"),
    (
        "test.WhoAmI",
        "#!/bin/sh\necho \"$QUBES_SIM_VM_NAME $QREXEC_REMOTE_DOMAIN\"\n",
    ),
    ("test.Secret", "#!/bin/sh\necho secret\n"),
    // Leaves a process behind that outlives the service.
    (
        "test.Bg",
        "#!/bin/sh\nsleep 0.2 </dev/null >/dev/null 2>&1 &\necho ok\n",
    ),
];

fn sim() -> Sim {
    Sim::start(CONF, POLICY, SERVICES)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn allowed_call() {
    let s = sim();
    let out = s.call("work", &["personal", "test.Echo"], b"hello qubes\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"hello qubes\n");
}

#[test]
fn denied_call_is_refused_with_126() {
    let s = sim();
    for target in ["personal", "work", "dom0", "@adminvm"] {
        let out = s.call("work", &[target, "test.Secret"], b"");
        assert_eq!(out.status.code(), Some(126), "{target}");
        assert_eq!(text(&out.stderr), "Request refused\n", "{target}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn missing_service_exits_127() {
    let s = sim();
    let out = s.call("work", &["personal", "test.Missing"], b"");
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
}

#[test]
fn exit_code_stderr_and_argument() {
    let s = sim();
    let out = s.call("personal", &["work", "test.Exit+42"], b"");
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn service_environment_follows_the_spec() {
    let s = sim();
    let out = s.call("work", &["personal", "test.Env+some.arg"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    let home = s.layout.home("personal");
    for want in [
        "argv1=some.arg".to_string(),
        format!("pwd={}", home.display()),
        format!("HOME={}", home.display()),
        "USER=user".into(),
        "LOGNAME=user".into(),
        "QREXEC_REMOTE_DOMAIN=work".into(),
        "QREXEC_SERVICE_FULL_NAME=test.Env+some.arg".into(),
        "QREXEC_SERVICE_ARGUMENT=some.arg".into(),
        "QREXEC_REQUESTED_TARGET_TYPE=".into(),
        "QUBES_SIM_VM_NAME=personal".into(),
    ] {
        assert!(o.lines().any(|l| l == want), "missing {want:?} in:\n{o}");
    }
    assert!(o.lines().any(|l| l.starts_with("QREXEC_AGENT_PID=")), "{o}");
    // Without an argument: an empty one, and no argv[1].
    let out = s.call("work", &["personal", "test.Env"], b"");
    let o = text(&out.stdout);
    assert!(o.lines().any(|l| l == "argv1="), "{o}");
    assert!(o.lines().any(|l| l == "QREXEC_SERVICE_ARGUMENT="), "{o}");
    assert!(
        o.lines().any(|l| l == "QREXEC_SERVICE_FULL_NAME=test.Env+"),
        "{o}"
    );
}

#[test]
fn local_program_mode() {
    let s = sim();
    // The local program's stdout goes to the service, the service's output
    // to the local program's stdin; its stderr is the client's.
    let out = s.call(
        "work",
        &[
            "personal",
            "test.Echo",
            "/bin/sh",
            "-c",
            "echo ping; read reply; echo \"local program got: $reply\" >&2",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "local program got: ping\n");
    assert!(out.stdout.is_empty());
    // A failing local program with a successful service: its status wins.
    let out = s.call(
        "work",
        &["personal", "test.Echo", "/bin/sh", "-c", "echo x; exit 3"],
        b"",
    );
    assert_eq!(out.status.code(), Some(3));
    // A failing service wins over a successful local program.
    let out = s.call(
        "work",
        &["personal", "test.Exit+7", "/bin/sh", "-c", "cat >/dev/null"],
        b"",
    );
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn default_and_dispvm_targets() {
    let s = sim();
    // $default: the policy sends it to personal.
    let out = s.call("work", &["$default", "test.WhoAmI"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "personal work\n");
    // An empty target is @default too.
    let out = s.call("work", &["", "test.WhoAmI"], b"");
    assert_eq!(text(&out.stdout), "personal work\n");
    // $dispvm: a fresh disposable VM from dvm, destroyed after the call.
    let mut names = Vec::new();
    for _ in 0..2 {
        let out = s.call("work", &["$dispvm", "test.WhoAmI"], b"");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let o = text(&out.stdout);
        let name = o.split(' ').next().unwrap().to_string();
        assert!(name.starts_with("disp"), "{o}");
        assert_eq!(o, format!("{name} work\n"));
        names.push(name);
    }
    assert_ne!(names[0], names[1], "each call gets a fresh DispVM");
    let out = s.call("personal", &["$dispvm:dvm", "test.WhoAmI"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("disp"));
    // They are all destroyed (shortly after the call ends).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let vms = qubes_sim::qubesd::list(&s.layout.qubesd_socket()).unwrap();
        if vms.vms.iter().all(|v| v.dispvm_template.is_none()) {
            break;
        }
        assert!(Instant::now() < deadline, "DispVMs not destroyed: {vms:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A template that is not one is refused.
    let out = s.call("work", &["$dispvm:personal", "test.WhoAmI"], b"");
    assert_eq!(out.status.code(), Some(126));
}

#[test]
fn service_killed_mid_stream() {
    let s = sim();
    // Killed by SIGKILL after some output: the agent reports 128 + 9, and
    // a nonzero remote status is the client's exit status (docs/qrexec.md §8.4).
    let out = s.call("work", &["personal", "test.Die"], b"");
    assert_eq!(out.stdout, b"before\n");
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
}

#[test]
fn target_agent_killed_mid_stream() {
    let mut s = sim();
    // The whole target side disappears: the vchan closes without an exit
    // code and the client exits 255 (docs/qrexec.md §8.4); the supervisor reports
    // the crashed member and stops everything, leaving nothing behind.
    let members = member_pids(&s);
    let mut child = s
        .client("work", &["personal", "test.Hang"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let agent: i32 = std::fs::read_to_string(s.layout.vm_dir("personal").join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = common::wait_output(child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    let st = s.wait_exit(Duration::from_secs(30));
    assert!(!st.success(), "a crash ends the simulation with an error");
    assert_no_leftovers(&s, &members);
}

#[test]
fn ten_calls_in_parallel_from_one_vm() {
    let s = sim();
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let s = &s;
                sc.spawn(move || {
                    let input = format!("call {i}\n").repeat(1000 + i * 100);
                    let target = if i % 2 == 0 { "personal" } else { "dvm" };
                    let out = s.call("work", &[target, "test.Echo"], input.as_bytes());
                    assert_eq!(
                        out.status.code(),
                        Some(0),
                        "call {i}: {}",
                        text(&out.stderr)
                    );
                    assert!(out.stdout == input.as_bytes(), "call {i}: output differs");
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
fn every_vm_calls_every_other_vm() {
    let s = sim();
    let vms = ["work", "personal", "dvm"];
    for from in vms {
        for to in vms.iter().filter(|&&t| t != from) {
            let out = s.call(from, &[to, "test.WhoAmI"], b"");
            assert_eq!(
                out.status.code(),
                Some(0),
                "{from} → {to}: {}",
                text(&out.stderr)
            );
            assert_eq!(text(&out.stdout), format!("{to} {from}\n"));
        }
    }
}

fn local_sum(data: &[u8]) -> String {
    let mut c = std::process::Command::new("cksum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let d = data.to_vec();
    let w = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &d));
    let out = c.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    text(&out.stdout)
}

#[test]
fn big_transfer_with_buffer_size_above_64k() {
    let s = sim();
    let data: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = local_sum(&data);
    for bs in [
        "--buffer-size=262144",
        "--buffer-size=1048576",
        "--buffer-size=4096",
    ] {
        let out = s.call("work", &[bs, "personal", "test.Sum"], &data);
        assert_eq!(out.status.code(), Some(0), "{bs}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), want, "{bs}");
    }
    // And back: the echo of 8 MiB comes back intact.
    let out = s.call(
        "work",
        &["--buffer-size=131072", "personal", "test.Echo"],
        &data,
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout == data, "echoed data differs");
}

#[test]
fn request_formats_v2_and_v3_agents() {
    let s = Sim::start(
        "vm work format=v3\nvm old format=v2\nvm personal\n",
        POLICY,
        SERVICES,
    );
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    for (vm, format) in [("work", "v3"), ("old", "v2")] {
        // A client speaking the agent's format works; with v2 the data
        // channel negotiates version 2 and 4096-byte chunks.
        let mut c = s.client(vm, &["personal", "test.Echo"]);
        c.env("QREXEC_REQUEST_FORMAT", format);
        let out = common::call_with(c, &data);
        assert_eq!(out.status.code(), Some(0), "{vm}: {}", text(&out.stderr));
        assert!(out.stdout == data, "{vm}: echo differs");
        // A v4 request to an older agent is closed: the client can only
        // report a refusal (docs/qrexec.md §7.2).
        let mut c = s.client(vm, &["personal", "test.Echo"]);
        c.env("QREXEC_REQUEST_FORMAT", "v4");
        let out = common::call_with(c, b"");
        assert_eq!(out.status.code(), Some(126), "{vm}");
        assert_eq!(text(&out.stderr), "Request refused\n");
    }
}

fn member_pids(s: &Sim) -> Vec<i32> {
    std::fs::read_to_string(s.layout.members_file())
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

fn assert_no_leftovers(s: &Sim, pids: &[i32]) {
    assert!(!pids.is_empty());
    for &p in pids {
        // Neither the member nor anything in its process group.
        let e = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(p), None);
        assert_eq!(
            e,
            Err(nix::errno::Errno::ESRCH),
            "process group {p} still alive"
        );
    }
    let left: Vec<_> = std::fs::read_dir(s.layout.root())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left on disk: {left:?}");
}

#[test]
fn stop_leaves_nothing_running_or_on_disk() {
    let mut s = sim();
    let out = s.call("work", &["$dispvm", "test.WhoAmI"], b"");
    assert_eq!(out.status.code(), Some(0));
    // A call still running when the simulation stops.
    let mut hang = s
        .client("work", &["personal", "test.Hang"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(hang.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let members = member_pids(&s);
    assert!(s.stop().success());
    assert_no_leftovers(&s, &members);
    let out = common::wait_output(hang, Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn start_and_stop_commands() {
    let tmp = tempfile::Builder::new().prefix("qsim").tempdir().unwrap();
    let rpc = tmp.path().join("rpc");
    std::fs::create_dir(&rpc).unwrap();
    common::script(&rpc, "test.Echo", "#!/bin/sh\nexec cat\n");
    std::fs::write(tmp.path().join("policy"), POLICY).unwrap();
    std::fs::write(
        tmp.path().join("sim.conf"),
        "vm a\nvm b\npolicy policy\nservices rpc\n",
    )
    .unwrap();
    let dir = tmp.path().join("sim");
    let exe = env!("CARGO_BIN_EXE_qubes-sim");
    let st = std::process::Command::new(exe)
        .args(["start", "--dir"])
        .arg(&dir)
        .arg("--config")
        .arg(tmp.path().join("sim.conf"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let layout = qubes_sim::layout::Layout::new(&dir);
    let pids: Vec<i32> = std::fs::read_to_string(layout.members_file())
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let out = std::process::Command::new(common::client_vm())
        .env("VCHAN_LOCAL_DIR", layout.xen_dir())
        .env("VCHAN_DOMAIN", "1")
        .arg(format!(
            "--agent-socket={}",
            layout.agent_socket("a").display()
        ))
        .args(["b", "test.Echo"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let st = std::process::Command::new(exe)
        .args(["stop", "--dir"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!dir.exists(), "stop removes the directory");
    for p in pids {
        let e = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(p), None);
        assert_eq!(
            e,
            Err(nix::errno::Errno::ESRCH),
            "process group {p} still alive"
        );
    }
}

/// Children of `pid` that are zombies.
fn zombie_children(pid: u32) -> Vec<String> {
    let mut z = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        if f.len() > 1 && f[0] == "Z" && f[1] == pid.to_string() {
            z.push(stat);
        }
    }
    z
}

#[test]
fn processes_left_by_services_are_reaped() {
    let s = sim();
    for _ in 0..3 {
        let out = s.call("work", &["personal", "test.Bg"], b"");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let sup: u32 = std::fs::read_to_string(s.layout.pid_file())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The sleeps end after 0.2 s; re-parented to the supervisor (a
    // subreaper), they must not stay zombies.
    let deadline = Instant::now() + Duration::from_secs(10);
    std::thread::sleep(Duration::from_millis(400));
    loop {
        let z = zombie_children(sup);
        if z.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "zombies: {z:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
