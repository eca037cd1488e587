//! Shared by the end-to-end tests: a simulation in a temporary directory
//! (stopped and removed by its guard), the real `qrexec-client-vm`, and a
//! scripted protocol-level client for byte-exact checks.
#![allow(dead_code)]

use qrexec::proto::{ConnectionParams, MsgHeader, MsgType, RequestFormat, Trigger, encode_hello};
use qubes_sim::config::SimConfig;
use qubes_sim::layout::Layout;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vchan::{Transport, Vchan};

/// A running simulation; stopped (and its files removed) on drop.
pub struct Sim {
    pub tmp: tempfile::TempDir,
    pub layout: Layout,
    pub config: SimConfig,
    child: Option<Child>,
}

/// Write an executable script.
pub fn script(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

impl Sim {
    /// Start a simulation: `conf` lines (without policy/services), the
    /// policy text, and services as (name, script) pairs.
    pub fn start(conf: &str, policy: &str, services: &[(&str, &str)]) -> Sim {
        Sim::start_opts(conf, policy, services, false)
    }

    /// Like [`Sim::start`]; with `verbose`, every member logs verbosely and
    /// the simulation's stderr goes to [`Sim::log`]'s file instead.
    pub fn start_opts(conf: &str, policy: &str, services: &[(&str, &str)], verbose: bool) -> Sim {
        let tmp = tempfile::Builder::new().prefix("qsim").tempdir().unwrap();
        let rpc = tmp.path().join("rpc");
        std::fs::create_dir(&rpc).unwrap();
        for (n, body) in services {
            script(&rpc, n, body);
        }
        std::fs::write(tmp.path().join("policy"), policy).unwrap();
        let conf = format!("{conf}\npolicy policy\nservices rpc\n");
        std::fs::write(tmp.path().join("sim.conf"), &conf).unwrap();
        let config = SimConfig::parse(&conf, tmp.path(), "sim.conf").unwrap();
        let dir = tmp.path().join("sim");
        let layout = Layout::new(&dir);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qubes-sim"));
        cmd.arg("run")
            .arg("--dir")
            .arg(&dir)
            .arg("--config")
            .arg(tmp.path().join("sim.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if verbose {
            cmd.arg("-v")
                .stderr(std::fs::File::create(tmp.path().join("sim.stderr")).unwrap());
        }
        let child = cmd.spawn().unwrap();
        let mut sim = Sim {
            tmp,
            layout,
            config,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sim.layout.ready_file().exists() {
            if let Some(st) = sim.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the simulation exited before it was ready: {st}");
            }
            assert!(Instant::now() < deadline, "the simulation did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        sim
    }

    /// What the simulation wrote to stderr so far (started verbose).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("sim.stderr")).unwrap_or_default()
    }

    /// Wait (bounded) until the simulation's log has a line containing
    /// `needle`; returns that line.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return Some(l.to_owned());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The xenstore socket on which a process plays `vm`'s domain.
    pub fn xenstore_socket(&self, vm: &str) -> PathBuf {
        vchan::local_xenstore_socket(&self.layout.xen_dir(), self.domid(vm))
    }

    pub fn domid(&self, vm: &str) -> u16 {
        self.config.vm(vm).unwrap().domid
    }

    pub fn agent_socket(&self, vm: &str) -> PathBuf {
        self.layout.agent_socket(vm)
    }

    pub fn transport(&self, vm: &str) -> Transport {
        Transport::Local {
            dir: self.layout.xen_dir(),
            domid: self.domid(vm),
        }
    }

    /// `qrexec-client-vm` as `vm` would run it, pointed at the simulation
    /// only by its environment and `--agent-socket`.
    pub fn client(&self, vm: &str, args: &[&str]) -> Command {
        let mut c = Command::new(client_vm());
        c.env("VCHAN_LOCAL_DIR", self.layout.xen_dir())
            .env("VCHAN_DOMAIN", self.domid(vm).to_string())
            .env_remove("VCHAN_SOCKET_DIR")
            .env_remove("VCHAN_TRANSPORT")
            .arg(format!(
                "--agent-socket={}",
                self.agent_socket(vm).display()
            ))
            .args(args);
        c
    }

    /// Run the client with `input` on stdin; collect its output.
    pub fn call(&self, vm: &str, args: &[&str], input: &[u8]) -> Output {
        call_with(self.client(vm, args), input)
    }

    /// Whether the supervisor is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Wait (bounded) for the supervisor to end on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "the simulation did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop it with SIGTERM; returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        if let Ok(None) = child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(None) = child.try_wait()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Start `c` with piped stdio and `input` written to its stdin from a
/// thread (so a child that writes before it reads cannot deadlock us).
pub fn spawn_feeding(mut c: Command, input: Vec<u8>) -> (Child, std::thread::JoinHandle<()>) {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    (child, w)
}

/// Run `c` with `input` on stdin (written from a thread, so a child that
/// writes before it reads cannot deadlock us); collect its output (60 s
/// safety net).
pub fn call_with(c: Command, input: &[u8]) -> Output {
    let (child, w) = spawn_feeding(c, input.to_vec());
    let out = wait_output(child, Duration::from_secs(60));
    w.join().unwrap();
    out
}

/// Wait for a child's output, killing it after `timeout` (a safety net:
/// a hung call fails the test instead of hanging it).
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let ro = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut v);
        }
        v
    });
    let re = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let st = child.wait().unwrap();
            panic!("qrexec-client-vm did not finish in {timeout:?} ({st})");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: ro.join().unwrap(),
        stderr: re.join().unwrap(),
    }
}

/// The real `qrexec-client-vm`, built once per test process from the
/// workspace (`cargo build -p qrexec --bin qrexec-client-vm`), found next
/// to the test executable's directory (`target/<profile>/`); or the one
/// named by `QUBES_SIM_CLIENT`.
pub fn client_vm() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // Another build of the client may be tested by naming it.
        if let Some(p) = std::env::var_os("QUBES_SIM_CLIENT") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let profile = profile_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = Command::new(cargo);
        c.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "--quiet",
                "-p",
                "qrexec",
                "--bin",
                "qrexec-client-vm",
            ])
            .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
        if profile == "release" {
            c.arg("--release");
        }
        let st = c.status().expect("run cargo build for qrexec-client-vm");
        assert!(st.success(), "cargo build -p qrexec failed: {st}");
        let p = profile_dir.join("qrexec-client-vm");
        assert!(p.exists(), "{} missing", p.display());
        p
    })
    .clone()
}

/// What the scripted client saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Exit code; 255 when the vchan closed without one.
    pub code: i32,
    /// Every message received after HELLO: (type, len).
    pub msgs: Vec<(u32, u32)>,
    pub params: Option<ConnectionParams>,
    pub peer_version: u32,
}

/// A scripted client speaking the protocol directly (for byte-level
/// checks a real client cannot show): returns `None` when refused.
pub fn scripted_call(
    sim: &Sim,
    vm: &str,
    target: &str,
    service: &str,
    input: &[u8],
) -> Option<Seen> {
    let mut s = UnixStream::connect(sim.agent_socket(vm)).unwrap();
    let req = Trigger::new(
        RequestFormat::V4,
        target.as_bytes(),
        service.as_bytes(),
        b"",
    )
    .encode()
    .unwrap();
    s.write_all(&req).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match s.read(&mut b[got..]).unwrap() {
            0 if got == 0 => return None,
            0 => panic!("short connection parameters"),
            n => got += n,
        }
    }
    let p = ConnectionParams::decode(&b).unwrap();
    let t = sim.transport(vm);
    let mut ch = Vchan::server(&t, p.connect_domain as u16, p.connect_port, 65536, 65536).unwrap();
    ch.wait_connected(Some(Duration::from_secs(30))).unwrap();
    ch.set_io_timeout(Some(Duration::from_secs(30)));
    ch.send(&encode_hello(4)).unwrap();
    let mut h = [0u8; 12];
    ch.recv(&mut h).unwrap();
    assert_eq!(&h[..8], &[0, 3, 0, 0, 4, 0, 0, 0], "HELLO header");
    let mut seen = Seen {
        params: Some(p),
        peer_version: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
        code: 255,
        ..Seen::default()
    };
    for c in input.chunks(32768) {
        ch.send(&MsgHeader::new(MsgType::DataStdin, c.len() as u32).encode())
            .unwrap();
        ch.send(c).unwrap();
    }
    // The agent may have answered and closed already (a missing service:
    // EOFs and 127 right after HELLO): our EOF then finds the peer gone,
    // which is no failure; what it sent is still read below.
    match ch.send(&MsgHeader::new(MsgType::DataStdin, 0).encode()) {
        Ok(_) | Err(vchan::Error::PeerClosed) => {}
        Err(e) => panic!("send STDIN EOF: {e}"),
    }
    loop {
        let mut hb = [0u8; 8];
        if ch.recv(&mut hb).is_err() {
            break;
        }
        let hdr = MsgHeader::decode(&hb).unwrap();
        let mut payload = vec![0u8; hdr.len as usize];
        ch.recv(&mut payload).unwrap();
        seen.msgs.push((hdr.ty, hdr.len));
        match MsgType::from_u32(hdr.ty) {
            Some(MsgType::DataStdout) => seen.stdout.extend_from_slice(&payload),
            Some(MsgType::DataStderr) => seen.stderr.extend_from_slice(&payload),
            Some(MsgType::DataExitCode) => {
                seen.code = i32::from_le_bytes(payload[..4].try_into().unwrap());
                break;
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
    drop(s);
    Some(seen)
}
