//! The supervisor: one foreground process that owns a simulation.
//!
//! `run` starts the Local transport's hubs and xenstored in its own
//! threads, one agent process and one daemon process per VM (each in its
//! own process group, so services die with their agent), waits until every
//! daemon is connected to its agent, writes `DIR/vms/<vm>/env` and
//! `DIR/ready`, and then watches: a member that exits is reported and ends
//! the simulation with an error (nothing hangs on it); SIGINT, SIGTERM or
//! SIGHUP end it normally. Either way every member is stopped (SIGTERM,
//! then SIGKILL) and reaped, and the directory's contents are removed.
//!
//! The admin socket (see [`crate::qubesd`]) creates DispVMs (a fresh
//! domain id, agent and daemon, from a template's settings) and destroys
//! them after their call.
//!
//! `start` runs the supervisor in the background (output to `DIR/sim.log`)
//! and returns once it is ready; `stop` ends it and waits until it is gone.

use crate::config::SimConfig;
use crate::layout::Layout;
use crate::policy::VmInfo;
use crate::{Error, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use qrexec::proto::RequestFormat;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vchan::LocalXen;

/// How long a VM may take to come up (agent + daemon + HELLO).
pub const VM_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a member gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// What `run` needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The simulation directory.
    pub dir: PathBuf,
    /// The configuration.
    pub config: SimConfig,
    /// Verbose logging in every member.
    pub verbose: bool,
    /// The `qubes-sim` executable (members are started from it).
    pub exe: PathBuf,
    /// Remove the directory itself at the end (not only its contents).
    pub owns_dir: bool,
}

/// The signals that stop a simulation.
pub fn stop_signals() -> SigSet {
    let mut m = SigSet::empty();
    m.add(Signal::SIGINT);
    m.add(Signal::SIGTERM);
    m.add(Signal::SIGHUP);
    m
}

#[derive(Debug)]
struct Proc {
    role: &'static str,
    child: Child,
}

impl Proc {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Exit status if it has exited, without reaping it (its pid, and so
    /// its process group id, stay reserved until [`Proc::stop`]).
    fn exited(&self) -> Option<String> {
        match waitid(
            Id::Pid(self.pid()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::StillAlive) => None,
            Ok(WaitStatus::Exited(_, code)) => Some(format!("exit status {code}")),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("killed by {sig}")),
            Ok(other) => Some(format!("{other:?}")),
            Err(e) => Some(format!("wait failed: {e}")),
        }
    }

    /// SIGTERM to the group, SIGKILL after the grace time, SIGKILL to the
    /// group's stragglers, reap.
    fn stop(mut self) {
        let pgid = self.pid();
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The leader is alive or a zombie: the group id is still ours.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
        // The group's other processes (services) were re-parented to us,
        // the subreaper: reap them, so nothing is left when we return.
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match waitid(Id::PGid(pgid), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
                Ok(WaitStatus::StillAlive) => {
                    if Instant::now() > deadline {
                        crate::log!("process group {pgid} of a {} does not go away", self.role);
                        break;
                    }
                    let _ = killpg(pgid, Signal::SIGKILL);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}

#[derive(Debug)]
struct Member {
    vm: VmInfo,
    agent: Proc,
    daemon: Proc,
}

#[derive(Debug)]
struct State {
    members: Vec<Member>,
    /// Member processes being started or stopped by another thread, which
    /// reaps them itself.
    unlisted: Vec<Pid>,
    /// Set by `stop_all`: no new members any more.
    shutting_down: bool,
    next_domid: u16,
    next_disp: u32,
}

#[derive(Debug)]
struct Inner {
    layout: Layout,
    config: SimConfig,
    exe: PathBuf,
    verbose: bool,
    xen: LocalXen,
    state: Mutex<State>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn member_cmd(&self, domid: u16, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args)
            .arg("--dir")
            .arg(self.layout.root())
            .env(vchan::ENV_LOCAL_DIR, self.layout.xen_dir())
            .env(vchan::ENV_DOMAIN, domid.to_string())
            .env_remove(vchan::ENV_SOCKET_DIR)
            .env_remove(vchan::ENV_TRANSPORT)
            .env(
                crate::log::VERBOSE_ENV,
                if self.verbose { "1" } else { "0" },
            )
            .stdin(Stdio::null())
            .process_group(0);
        c
    }

    fn spawn(&self, role: &'static str, mut c: Command) -> Result<Proc> {
        let child = c
            .spawn()
            .map_err(|e| Error::io(format!("start {role} ({})", self.exe.display()), e))?;
        // Recorded for `stop`'s safety net.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.layout.members_file())
        {
            let _ = writeln!(f, "{}", child.id());
        }
        self.state().unlisted.push(Pid::from_raw(child.id() as i32));
        Ok(Proc { role, child })
    }

    /// Forget processes as unlisted (they are listed members now, or gone).
    fn forget(&self, pids: &[Pid]) {
        self.state().unlisted.retain(|p| !pids.contains(p));
    }

    /// Make a started VM a listed member.
    fn enlist(&self, m: Member) -> Result<()> {
        let pids = [m.agent.pid(), m.daemon.pid()];
        let mut st = self.state();
        if st.shutting_down {
            drop(st);
            m.daemon.stop();
            m.agent.stop();
            self.forget(&pids);
            return Err(Error::other("the simulation is stopping"));
        }
        st.unlisted.retain(|p| !pids.contains(p));
        st.members.push(m);
        Ok(())
    }

    /// Reap exited processes that are not members: services re-parented
    /// to us (we are a subreaper) after their parent went away.
    fn reap_orphans(&self) {
        loop {
            let pid = match waitid(
                Id::All,
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
            ) {
                Ok(st) => match st.pid() {
                    Some(p) => p,
                    None => return,
                },
                Err(_) => return,
            };
            {
                let st = self.state();
                let known = st.unlisted.contains(&pid)
                    || st
                        .members
                        .iter()
                        .any(|m| m.agent.pid() == pid || m.daemon.pid() == pid);
                if known {
                    // A member: the crash check or its own stopper reaps it.
                    return;
                }
            }
            let _ = nix::sys::wait::waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
    }

    /// Start a VM's agent and daemon and wait until the daemon serves its
    /// socket.
    fn start_vm(
        &self,
        vm: &VmInfo,
        services: &[PathBuf],
        format: RequestFormat,
        flavour: crate::config::AgentFlavour,
    ) -> Result<Member> {
        let home = self.layout.home(&vm.name);
        std::fs::create_dir_all(&home)
            .map_err(|e| Error::io(format!("create {}", home.display()), e))?;
        let services = std::env::join_paths(services)
            .map_err(|e| Error::other(format!("service path: {e}")))?;
        let domid = vm.domid.to_string();
        let mut c = self.member_cmd(
            vm.domid,
            &[
                "agent",
                "--vm",
                &vm.name,
                "--domid",
                &domid,
                "--format",
                &format.to_string(),
                "--flavour",
                &flavour.to_string(),
            ],
        );
        c.arg("--services").arg(&services);
        let agent = self.spawn("agent", c)?;
        let mut c = self.member_cmd(0, &["daemon", "--vm", &vm.name, "--domid", &domid]);
        c.arg("--policy").arg(&self.config.policy);
        let daemon = match self.spawn("daemon", c) {
            Ok(d) => d,
            Err(e) => {
                let pid = agent.pid();
                agent.stop();
                self.forget(&[pid]);
                return Err(e);
            }
        };
        for (p, f) in [(&agent, "agent.pid"), (&daemon, "daemon.pid")] {
            let _ = std::fs::write(
                self.layout.vm_dir(&vm.name).join(f),
                format!("{}\n", p.child.id()),
            );
        }
        let member = Member {
            vm: vm.clone(),
            agent,
            daemon,
        };
        let sock = self.layout.daemon_socket(vm.domid);
        let deadline = Instant::now() + VM_START_TIMEOUT;
        loop {
            if sock.exists() {
                return Ok(member);
            }
            let failed = [&member.agent, &member.daemon]
                .into_iter()
                .find_map(|p| p.exited().map(|st| format!("its {} exited ({st})", p.role)));
            let why = match failed {
                Some(w) => w,
                None if Instant::now() > deadline => "timed out".to_string(),
                None => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let pids = [member.agent.pid(), member.daemon.pid()];
            member.agent.stop();
            member.daemon.stop();
            self.forget(&pids);
            return Err(Error::other(format!(
                "VM {} (domain {}) did not start: {why}",
                vm.name, vm.domid
            )));
        }
    }

    fn write_env(&self, vm: &VmInfo) -> Result<()> {
        let path = self.layout.env_file(&vm.name);
        let text = format!(
            "# Play VM '{name}' (domain {domid}) of the simulation in {root}:\n\
             #   . {env}\n\
             #   qrexec-client-vm TARGET SERVICE\n\
             export {local}='{xen}'\n\
             export {dom}={domid}\n\
             export QUBES_SIM_AGENT_SOCKET='{sock}'\n\
             export QREXEC_AGENT_SOCKET='{sock}'\n",
            name = vm.name,
            domid = vm.domid,
            root = self.layout.root().display(),
            env = path.display(),
            local = vchan::ENV_LOCAL_DIR,
            xen = self.layout.xen_dir().display(),
            dom = vchan::ENV_DOMAIN,
            sock = self.layout.agent_socket(&vm.name).display(),
        );
        std::fs::write(&path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))
    }

    fn create_dispvm(&self, template: &str) -> Result<(String, u16)> {
        let tpl = self
            .state()
            .members
            .iter()
            .find(|m| m.vm.name == template && m.vm.template_for_dispvms)
            .map(|m| m.vm.clone())
            .ok_or_else(|| Error::other(format!("'{template}' is not a DispVM template")))?;
        let tpl_cfg = self
            .config
            .vm(template)
            .ok_or_else(|| Error::other(format!("no configuration for '{template}'")))?;
        let (name, domid) = {
            let mut st = self.state();
            let d = st.next_domid;
            let n = st.next_disp;
            if d >= 0x7FEF {
                return Err(Error::other("out of domain ids"));
            }
            st.next_domid += 1;
            st.next_disp += 1;
            (format!("disp{n}"), d)
        };
        let vm = VmInfo {
            name: name.clone(),
            domid,
            dispvm_template: Some(template.to_string()),
            template_for_dispvms: false,
            default_dispvm: tpl.default_dispvm.clone(),
        };
        self.xen
            .add_domain(domid)
            .map_err(|e| Error::vchan(format!("add domain {domid}"), e))?;
        match self.start_vm(&vm, &tpl_cfg.services, tpl_cfg.format, tpl_cfg.flavour) {
            Ok(m) => {
                let _ = self.write_env(&vm);
                crate::log!("DispVM {name} (domain {domid}) started from {template}");
                self.enlist(m)?;
                Ok((name, domid))
            }
            Err(e) => {
                let _ = self.xen.remove_domain(domid);
                let _ = std::fs::remove_dir_all(self.layout.vm_dir(&name));
                Err(e)
            }
        }
    }

    fn kill_dispvm(&self, name: &str) -> Result<()> {
        let m = {
            let mut st = self.state();
            let i = st
                .members
                .iter()
                .position(|m| m.vm.name == name && m.vm.dispvm_template.is_some())
                .ok_or_else(|| Error::other(format!("no DispVM '{name}'")))?;
            let m = st.members.swap_remove(i);
            st.unlisted.extend([m.agent.pid(), m.daemon.pid()]);
            m
        };
        let pids = [m.agent.pid(), m.daemon.pid()];
        m.daemon.stop();
        m.agent.stop();
        self.forget(&pids);
        let _ = self.xen.remove_domain(m.vm.domid);
        let _ = std::fs::remove_file(self.layout.daemon_socket(m.vm.domid));
        let _ = std::fs::remove_file(self.layout.daemon_socket_by_name(name));
        let _ = std::fs::remove_dir_all(self.layout.vm_dir(name));
        crate::log!("DispVM {name} destroyed");
        Ok(())
    }

    fn handle_admin(&self, s: UnixStream) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let mut r = BufReader::new(&s);
        if r.read_line(&mut line).is_err() {
            return;
        }
        let mut w = &s;
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words[..] {
            ["list"] => {
                let mut out = String::new();
                for m in &self.state().members {
                    out.push_str(&crate::qubesd::format_vm(&m.vm));
                    out.push('\n');
                }
                out.push_str("end\n");
                out
            }
            ["create-dispvm", tpl] => match self.create_dispvm(tpl) {
                Ok((n, d)) => format!("ok {n} {d}\n"),
                Err(e) => format!("error {e}\n"),
            },
            ["stats"] => {
                let h = self.xen.grant_history();
                format!(
                    "ok grant-peak-pages={} grant-refused={}\n",
                    h.peak_domain_pages, h.refused_shares
                )
            }
            ["kill", name] => match self.kill_dispvm(name) {
                Ok(()) => "ok\n".into(),
                Err(e) => format!("error {e}\n"),
            },
            _ => format!("error unknown request '{}'\n", line.trim()),
        };
        let _ = w.write_all(answer.as_bytes());
    }

    /// A member that exited on its own, if any.
    fn crashed(&self) -> Option<String> {
        let st = self.state();
        st.members.iter().find_map(|m| {
            [&m.agent, &m.daemon].into_iter().find_map(|p| {
                p.exited().map(|why| {
                    format!(
                        "{} of VM {} (pid {}) exited unexpectedly: {why}",
                        p.role,
                        m.vm.name,
                        p.child.id()
                    )
                })
            })
        })
    }

    fn stop_all(&self) {
        let (members, unlisted) = {
            let mut st = self.state();
            st.shutting_down = true;
            (
                st.members.drain(..).collect::<Vec<_>>(),
                st.unlisted.clone(),
            )
        };
        // Processes another thread is starting or stopping: that thread
        // reaps them; we only make sure they end.
        for p in unlisted {
            let _ = killpg(p, Signal::SIGKILL);
        }
        // Send SIGTERM to everyone first, then wait for each.
        for m in &members {
            let _ = killpg(m.daemon.pid(), Signal::SIGTERM);
            let _ = killpg(m.agent.pid(), Signal::SIGTERM);
        }
        for m in members {
            m.daemon.stop();
            m.agent.stop();
        }
    }
}

/// Check the directory is usable: absent, empty, or holding only a
/// `sim.log` from `start`. Creates it (and the layout's subdirectories).
fn prepare_dir(layout: &Layout) -> Result<()> {
    let root = layout.root();
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if e.file_name() != "sim.log" {
                return Err(Error::other(format!(
                    "{} is not empty (is a simulation running there? `qubes-sim stop --dir {}`)",
                    root.display(),
                    root.display()
                )));
            }
        }
    }
    for d in [
        layout.root().to_path_buf(),
        layout.run_dir(),
        layout.vms_dir(),
    ] {
        std::fs::create_dir_all(&d).map_err(|e| Error::io(format!("create {}", d.display()), e))?;
    }
    // Unix socket paths must fit into sun_path (108 bytes).
    let longest = layout.xen_dir().join("xenstore").join("32751.sock");
    if longest.as_os_str().len() > 100 {
        return Err(Error::other(format!(
            "{} is too long a path for Unix sockets; use a shorter directory",
            root.display()
        )));
    }
    std::fs::write(layout.pid_file(), format!("{}\n", std::process::id()))
        .map_err(|e| Error::io("write the pid file", e))?;
    Ok(())
}

fn clean_dir(layout: &Layout, owns_dir: bool) {
    let root = layout.root();
    if owns_dir {
        let _ = std::fs::remove_dir_all(root);
    } else if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// Run a simulation in the foreground until a stop signal (`Ok`) or a
/// member's crash (`Err`). Everything started is stopped and the directory
/// cleaned in both cases.
pub fn run(opts: RunOptions) -> Result<()> {
    // Block the stop signals before any thread exists, and read them from
    // a signalfd. Members unblock them at their start.
    let mask = stop_signals();
    mask.thread_block()
        .map_err(|e| Error::io("block signals", e.into()))?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| Error::io("signalfd", e.into()))?;
    // Services of a member that dies are re-parented to us, so that we can
    // reap them (see `Proc::stop`).
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| Error::io("become a child subreaper", e.into()))?;
    let layout = Layout::new(&opts.dir);
    if let Err(e) = prepare_dir(&layout) {
        if opts.owns_dir {
            clean_dir(&layout, true);
        }
        return Err(e);
    }
    let result = run_in(&opts, &layout, &sfd);
    clean_dir(&layout, opts.owns_dir);
    match &result {
        Ok(()) => crate::log!("stopped; {} cleaned up", layout.root().display()),
        Err(e) => crate::log!("error: {e}; everything stopped and cleaned up"),
    }
    result
}

fn run_in(opts: &RunOptions, layout: &Layout, sfd: &SignalFd) -> Result<()> {
    let mut domains = vec![0u16];
    domains.extend(opts.config.vms.iter().map(|v| v.domid));
    let xen = LocalXen::start(&layout.xen_dir(), &domains)
        .map_err(|e| Error::vchan("start the Local transport", e))?;
    let next_domid = domains.iter().copied().max().unwrap_or(0) + 1;
    let inner = Arc::new(Inner {
        layout: layout.clone(),
        config: opts.config.clone(),
        exe: opts.exe.clone(),
        verbose: opts.verbose,
        xen,
        state: Mutex::new(State {
            members: Vec::new(),
            unlisted: Vec::new(),
            shutting_down: false,
            next_domid,
            next_disp: 1,
        }),
    });
    let admin = UnixListener::bind(layout.qubesd_socket())
        .map_err(|e| Error::io("bind the admin socket", e))?;
    admin
        .set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;
    let result = serve(opts, &inner, &admin, sfd);
    inner.stop_all();
    // Admin threads may still hold a reference; the hubs stop when the
    // last one is dropped, and the directory goes anyway.
    inner.xen.shutdown();
    result
}

fn serve(
    opts: &RunOptions,
    inner: &Arc<Inner>,
    admin: &UnixListener,
    sfd: &SignalFd,
) -> Result<()> {
    let global_dispvm = opts.config.default_dispvm.clone();
    for vm in &opts.config.vms {
        let info = VmInfo {
            name: vm.name.clone(),
            domid: vm.domid,
            dispvm_template: None,
            template_for_dispvms: vm.template_for_dispvms,
            default_dispvm: vm.default_dispvm.clone().or_else(|| global_dispvm.clone()),
        };
        let m = inner.start_vm(&info, &vm.services, vm.format, vm.flavour)?;
        inner.write_env(&info)?;
        inner.enlist(m)?;
    }
    std::fs::write(inner.layout.ready_file(), "ready\n")
        .map_err(|e| Error::io("write the ready file", e))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "qubes-sim: ready in {} ({} VMs: {})",
        inner.layout.root().display(),
        opts.config.vms.len(),
        opts.config
            .vms
            .iter()
            .map(|v| format!("{} = domain {}", v.name, v.domid))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "qubes-sim: play a VM with `. {}` (and so on), stop with Ctrl-C or `qubes-sim stop --dir {}`",
        inner.layout.env_file(&opts.config.vms[0].name).display(),
        inner.layout.root().display()
    );
    let _ = out.flush();
    drop(out);
    loop {
        let mut fds = [
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(admin.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::io("poll", e.into())),
        }
        if let Ok(Some(sig)) = sfd.read_signal() {
            crate::log!("signal {} received, stopping", sig.ssi_signo);
            return Ok(());
        }
        loop {
            match admin.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let i = Arc::clone(inner);
                    std::thread::spawn(move || i.handle_admin(s));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("accept on the admin socket", e)),
            }
        }
        if let Some(why) = inner.crashed() {
            return Err(Error::other(why));
        }
        inner.reap_orphans();
    }
}

/// Start a simulation in the background and return once it is ready.
/// Its output goes to `DIR/sim.log`.
pub fn start(dir: &Path, config: &Path, verbose: bool, exe: &Path) -> Result<u32> {
    let layout = Layout::new(dir);
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::other(format!(
            "{} exists and is not empty",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let log =
        std::fs::File::create(layout.log_file()).map_err(|e| Error::io("create sim.log", e))?;
    let log2 = log.try_clone().map_err(|e| Error::io("dup", e))?;
    let mut c = Command::new(exe);
    c.arg("run")
        .arg("--dir")
        .arg(dir)
        .arg("--config")
        .arg(config)
        .arg("--owns-dir");
    if verbose {
        c.arg("-v");
    }
    let mut child = c
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io(format!("start {}", exe.display()), e))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if layout.ready_file().exists() {
            return Ok(child.id());
        }
        if let Ok(Some(st)) = child.try_wait() {
            let log = std::fs::read_to_string(layout.log_file()).unwrap_or_default();
            let _ = std::fs::remove_dir_all(dir);
            return Err(Error::other(format!(
                "the simulation did not start ({st}):\n{log}"
            )));
        }
        if Instant::now() > deadline {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
            return Err(Error::other("the simulation did not become ready in 60 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stop the simulation in `dir` and wait until it is gone and cleaned up.
pub fn stop(dir: &Path) -> Result<()> {
    let layout = Layout::new(dir);
    let pid = std::fs::read_to_string(layout.pid_file())
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|&p| p > 1)
        .map(Pid::from_raw);
    let members: Vec<Pid> = std::fs::read_to_string(layout.members_file())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|&p| p > 1)
        .map(Pid::from_raw)
        .collect();
    let Some(pid) = pid else {
        if !dir.exists() {
            return Err(Error::other(format!("no simulation in {}", dir.display())));
        }
        for m in members {
            let _ = killpg(m, Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(dir);
        return Ok(());
    };
    let alive = |p: Pid| kill(p, None).is_ok();
    if alive(pid) {
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            let _ = kill(pid, Signal::SIGKILL);
            for m in members {
                let _ = killpg(m, Signal::SIGKILL);
            }
        }
    } else {
        for m in members {
            let _ = killpg(m, Signal::SIGKILL);
        }
    }
    // A supervisor that was killed cannot have cleaned up.
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// The `qubes-sim` executable to start members from.
pub fn current_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(|e| Error::io("find the qubes-sim executable", e))
}
