//! QEMU: start, stop, status, and the guard that makes sure a QEMU we
//! started does not outlive a failed run (error paths, panics, Ctrl-C).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::guest::Lab;
use super::{Config, qga};

/// The run directories whose QEMU must die if we get a signal.
static ARMED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static SIGNALS: AtomicBool = AtomicBool::new(false);

/// Installs (once) a thread that, on SIGINT/SIGTERM/SIGHUP, stops every
/// QEMU an armed guard owns and exits.
fn install_signal_thread() {
    if SIGNALS.swap(true, Ordering::SeqCst) {
        return;
    }
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lab: cannot install signal handlers ({e}); Ctrl-C may leave QEMU running");
            return;
        }
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("\nlab: signal {sig}: stopping QEMU");
            let dirs = ARMED.lock().map(|v| v.clone()).unwrap_or_default();
            for d in dirs {
                let _ = stop_in(&d);
            }
            std::process::exit(128 + sig);
        }
    });
}

/// Owns a running QEMU: dropping an armed guard stops it.
#[derive(Debug)]
pub struct Guard {
    run: PathBuf,
    armed: AtomicBool,
}

impl Guard {
    fn arm(run: &Path) -> Guard {
        install_signal_thread();
        if let Ok(mut v) = ARMED.lock() {
            v.push(run.to_path_buf());
        }
        Guard {
            run: run.to_path_buf(),
            armed: AtomicBool::new(true),
        }
    }

    /// A guard that owns nothing (QEMU was already running).
    fn none(run: &Path) -> Guard {
        Guard {
            run: run.to_path_buf(),
            armed: AtomicBool::new(false),
        }
    }

    /// Whether this guard will stop QEMU.
    pub fn owns(&self) -> bool {
        self.armed.load(Ordering::SeqCst)
    }

    /// Leave QEMU running (after a successful `start`, or `test --keep`).
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
        if let Ok(mut v) = ARMED.lock() {
            v.retain(|d| d != &self.run);
        }
    }

    /// Stop QEMU now (if armed) and report how it went.
    pub fn stop_now(&self) -> Result<(), String> {
        if self.armed.swap(false, Ordering::SeqCst) {
            if let Ok(mut v) = ARMED.lock() {
                v.retain(|d| d != &self.run);
            }
            stop_in(&self.run)
        } else {
            Ok(())
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.owns() {
            eprintln!("lab: stopping the QEMU this run started");
            let _ = self.stop_now();
        }
    }
}

fn pid_in(run: &Path) -> Option<i32> {
    let s = std::fs::read_to_string(run.join("qemu.pid")).ok()?;
    let pid: i32 = s.trim().parse().ok()?;
    // Signal 0: does it exist (and is it ours to signal)?
    kill(Pid::from_raw(pid), None).ok()?;
    // Make sure the pid was not reused by something else.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    comm.trim().starts_with("qemu").then_some(pid)
}

/// QEMU's pid if the lab is running.
pub fn running_pid(cfg: &Config) -> Option<i32> {
    pid_in(&cfg.run_dir())
}

fn secs(t: Instant) -> String {
    format!("{:.1}", t.elapsed().as_secs_f64())
}

/// Boots the lab (or reuses a running one) and creates the missing domUs.
/// The returned guard owns QEMU if this call started it.
pub fn start(cfg: &Config) -> Result<Guard, String> {
    let c = &cfg.cache;
    if !c.join("dom0.img").exists() {
        return Err(format!(
            "{} is missing: run `cargo xtask lab setup` first",
            c.join("dom0.img").display()
        ));
    }
    let run = cfg.run_dir();
    std::fs::create_dir_all(&run).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(cfg.share_dir()).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let guard = if let Some(pid) = running_pid(cfg) {
        eprintln!("lab: QEMU already running (pid {pid})");
        Guard::none(&run)
    } else {
        for f in [
            "qga.sock",
            "qmp.sock",
            "console.sock",
            "console.log",
            "qemu.pid",
        ] {
            let _ = std::fs::remove_file(run.join(f));
        }
        let xen_cmdline = format!(
            "dom0_mem={m}M,max:{m}M dom0_max_vcpus={s} console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all",
            m = cfg.dom0_mem,
            s = cfg.smp
        );
        let dom0_cmdline = format!(
            "console=hvc0 earlyprintk=xen lab.root=/dev/vda lab.xenstored={}",
            cfg.xenstored
        );
        let mut q = Command::new("qemu-system-x86_64");
        q.args(["-name", "rust-vchan-lab", "-machine", "q35"]);
        if cfg.accel == "kvm" {
            q.args(["-accel", "kvm", "-cpu", "host"]);
        } else {
            let thread = if cfg.smp > 1 { "multi" } else { "single" };
            q.args(["-accel", &format!("tcg,thread={thread}"), "-cpu", &cfg.cpu]);
        }
        q.args(["-smp", &cfg.smp.to_string(), "-m", &cfg.mem.to_string()]);
        q.args(["-display", "none", "-monitor", "none", "-no-reboot"]);
        q.arg("-chardev").arg(format!(
            "socket,id=con0,path={},server=on,wait=off,logfile={}",
            run.join("console.sock").display(),
            run.join("console.log").display()
        ));
        q.args(["-serial", "chardev:con0"]);
        q.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            run.join("qmp.sock").display()
        ));
        q.arg("-kernel").arg(c.join("boot/xen"));
        q.args(["-append", &xen_cmdline]);
        q.arg("-initrd").arg(format!(
            "{} {dom0_cmdline},{}",
            c.join("boot/vmlinuz").display(),
            c.join("initrd-dom0.img").display()
        ));
        q.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,snapshot=on",
            c.join("dom0.img").display()
        ));
        // The Debian domU's root file system: dom0's /dev/vdb, read-only.
        if let Some(d) = super::debian_domu::qemu_drive(cfg) {
            q.arg("-drive").arg(d);
        }
        q.args(["-device", "virtio-serial-pci,id=vser0"]);
        q.arg("-chardev").arg(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            run.join("qga.sock").display()
        ));
        q.args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
        q.arg("-virtfs").arg(format!(
            "local,path={},mount_tag=hostshare,security_model=none,id=hostshare",
            cfg.share_dir().display()
        ));
        q.args(["-nic", "none", "-daemonize", "-pidfile"]);
        q.arg(run.join("qemu.pid"));
        eprintln!(
            "lab: starting QEMU ({}, {} vCPU, {} MiB, xenstored={})",
            cfg.accel, cfg.smp, cfg.mem, cfg.xenstored
        );
        let out = q.output().map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-system-x86_64 failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let guard = Guard::arm(&run);
        let pid = running_pid(cfg).ok_or("QEMU exited right after starting")?;
        eprintln!(
            "lab: QEMU pid {pid}; waiting for dom0 (console log: {})",
            run.join("console.log").display()
        );
        let alive = || running_pid(cfg).is_some();
        qga::ping(&run.join("qga.sock"), cfg.boot_timeout, &alive)
            .map_err(|e| format!("dom0 did not come up: {e}; see `cargo xtask lab log`"))?;
        let lab = Lab::attach(cfg)?;
        let r = lab.dom0(
            "while [ ! -e /run/lab/dom0-ready ]; do sleep 0.5; done",
            cfg.boot_timeout,
        )?;
        if !r.ok() {
            return Err(format!("dom0 sysinit did not finish: {}", r.all()));
        }
        eprintln!("lab: dom0 ready after {}s", secs(t0));
        guard
    };
    let lab = Lab::attach(cfg)?;
    if !cfg.domus.is_empty() {
        let t1 = Instant::now();
        lab.create_domus(&cfg.domus)?;
        eprintln!("lab: {} ready after {}s", cfg.domus.join(" "), secs(t1));
    }
    let l = lab.dom0("xl list", Duration::from_secs(60))?;
    eprint!("{}", l.stdout);
    eprintln!("lab: up in {}s", secs(t0));
    Ok(guard)
}

/// Stops QEMU: QMP `quit`, then SIGTERM, then SIGKILL.
pub fn stop(cfg: &Config) -> Result<(), String> {
    stop_in(&cfg.run_dir())
}

fn stop_in(run: &Path) -> Result<(), String> {
    let Some(pid) = pid_in(run) else {
        eprintln!("lab: not running");
        let _ = std::fs::remove_file(run.join("qemu.pid"));
        return Ok(());
    };
    eprintln!("lab: stopping QEMU pid {pid}");
    let _ = qga::qmp_quit(&run.join("qmp.sock"));
    let gone = |d: Duration| {
        let t = Instant::now();
        while t.elapsed() < d {
            if kill(Pid::from_raw(pid), None).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    if !gone(Duration::from_secs(10)) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        if !gone(Duration::from_secs(3)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            if !gone(Duration::from_secs(5)) {
                return Err(format!("QEMU pid {pid} does not die"));
            }
        }
    }
    let _ = std::fs::remove_file(run.join("qemu.pid"));
    eprintln!("lab: stopped");
    Ok(())
}

/// Prints whether the lab runs, and `xl list`.
pub fn status(cfg: &Config) -> Result<(), String> {
    match running_pid(cfg) {
        Some(pid) => {
            println!("QEMU running, pid {pid}");
            let lab = Lab::attach(cfg)?;
            let out = lab.dom0("xl list", Duration::from_secs(60))?;
            print!("{}", out.stdout);
            Ok(())
        }
        None => Err("not running".into()),
    }
}
