//! The small Qubes the cases run in: daemons, agents, services, policy,
//! and the data every transfer comes from.

use super::*;

/// Processes of the simulated Qubes, each in its own process group,
/// killed (group and all) on drop.
pub(super) struct Procs(pub(super) Vec<(String, Child)>);

impl Procs {
    pub(super) fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<(), String> {
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

pub(super) fn write_exec(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

/// The services of one VM (or dom0), named `vm`.
pub(super) fn services(dir: &Path, vm: &str, world: &Path) -> Result<(), String> {
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

pub(super) const POLICY: &str = r#"#!/bin/sh
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

pub(super) struct World {
    pub(super) dir: PathBuf,
    pub(super) vchan: PathBuf,
    pub(super) qrexec: PathBuf,
    pub(super) data_sha: std::collections::HashMap<usize, String>,
    pub(super) _procs: Procs,
}

/// SHA-256 of the first `len` bytes of `path`.
pub(super) fn sha256_prefix(path: &Path, len: usize) -> Result<String, String> {
    let mut head = Vec::with_capacity(len);
    fs::File::open(path)
        .and_then(|f| f.take(len as u64).read_to_end(&mut head))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    crate::util::sha256_bytes(&head)
}

pub(super) fn start_world(stage: &Path) -> Result<World, String> {
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
        data_sha.insert(n, sha256_prefix(&dir.join("data"), n)?);
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
