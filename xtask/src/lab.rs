//! `cargo xtask lab`: real Xen in the loop.
//!
//! Xen 4.17 (Debian's hypervisor package) boots under QEMU TCG with a Debian
//! dom0 and PV domUs; the C libxenvchan runs in every guest as `vchan-node`;
//! our static binaries (`vchan-peer`, `xen-devtest`) are pushed in and run
//! against it. Guest-side scripts and the C peer live in `lab/` at the
//! repository root; everything generated (downloads, root file system,
//! images, sockets, logs, results) goes to the cache directory
//! (`$LAB_CACHE`, default `~/.cache/rust-vchan-lab`), never into the tree.
//!
//! ```text
//! cargo xtask lab setup [--force]   host packages (apt), Xen + kernel, dom0 image, domU initramfs
//! cargo xtask lab start             boot Xen + dom0 + domUs in the background
//! cargo xtask lab status            QEMU pid and `xl list`
//! cargo xtask lab stop              stop QEMU
//! cargo xtask lab test [--quick]    setup, build, start, device tests, interop matrix,
//!                                   death and throughput checks, stop
//! cargo xtask lab run-dom0 CMD | run-domU [-d NAME] CMD | push FILE... | log | console
//! cargo xtask lab debian-domU [-d NAME] [FILE...]   a domU with a Debian root file system
//! ```
//!
//! See `lab/README.md` for the knobs and what each phase checks.

mod cstack;
mod debian_domu;
mod guest;
mod ourlib;
mod qga;
mod setup;
mod suite;
mod vm;

use std::path::PathBuf;
use std::time::Duration;

pub(crate) use guest::Lab;

/// The lab's settings, from the environment (`LAB_*`).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Cache directory for everything generated.
    pub cache: PathBuf,
    /// `tcg` (works here) or `kvm`.
    pub accel: String,
    /// QEMU CPU model for TCG.
    pub cpu: String,
    /// vCPUs of the QEMU machine (= dom0 vCPUs).
    pub smp: u32,
    /// vCPUs of each domU (`vcpus=` of its Xen config).
    pub domu_vcpus: u32,
    /// MiB of the whole QEMU machine.
    pub mem: u32,
    /// MiB for dom0.
    pub dom0_mem: u32,
    /// MiB per domU.
    pub domu_mem: u32,
    /// The domUs `start` creates.
    pub domus: Vec<String>,
    /// `o` (oxenstored) or `c` (C xenstored).
    pub xenstored: String,
    /// How long a boot may take.
    pub boot_timeout: Duration,
    /// How long one guest command may take by default.
    pub cmd_timeout: Duration,
    /// The Debian archive for debootstrap (default: the host's).
    pub mirror: Option<String>,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn env_num(name: &str, default: u32) -> Result<u32, String> {
    match std::env::var(name) {
        Ok(s) if !s.is_empty() => s
            .parse()
            .map_err(|_| format!("{name}={s:?} is not a number")),
        _ => Ok(default),
    }
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        let cache = match std::env::var_os("LAB_CACHE").filter(|s| !s.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => {
                let base = std::env::var_os("XDG_CACHE_HOME")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .ok_or("neither LAB_CACHE nor HOME is set")?;
                base.join("rust-vchan-lab")
            }
        };
        let domus = match std::env::var("LAB_DOMUS") {
            Ok(s) => s.split_whitespace().map(String::from).collect(),
            Err(_) => vec!["domU1".to_string(), "domU2".to_string()],
        };
        let xenstored = env_or("LAB_XENSTORED", "o");
        if xenstored != "o" && xenstored != "c" {
            return Err(format!("LAB_XENSTORED={xenstored:?}: o or c"));
        }
        // LAB_VCPUS=N: N vCPUs per guest (each domU, and the QEMU machine
        // and dom0 unless LAB_SMP says otherwise).
        let domu_vcpus = env_num("LAB_VCPUS", 1)?.max(1);
        Ok(Config {
            cache,
            accel: env_or("LAB_ACCEL", "tcg"),
            cpu: env_or("LAB_CPU", "qemu64,+npt"),
            smp: env_num("LAB_SMP", domu_vcpus)?,
            domu_vcpus,
            mem: env_num("LAB_MEM", 3072)?,
            dom0_mem: env_num("LAB_DOM0_MEM", 1024)?,
            domu_mem: env_num("LAB_DOMU_MEM", 256)?,
            domus,
            xenstored,
            boot_timeout: Duration::from_secs(env_num("LAB_BOOT_TIMEOUT", 900)?.into()),
            cmd_timeout: Duration::from_secs(env_num("LAB_TIMEOUT", 600)?.into()),
            mirror: std::env::var("LAB_MIRROR").ok().filter(|s| !s.is_empty()),
        })
    }

    /// Sockets, pid file, console log.
    pub fn run_dir(&self) -> PathBuf {
        self.cache.join("run")
    }

    /// The folder QEMU shares with dom0 over 9p (`/mnt/host`).
    pub fn share_dir(&self) -> PathBuf {
        self.cache.join("share")
    }

    /// Where test reports go.
    pub fn results_dir(&self) -> PathBuf {
        self.cache.join("results")
    }
}

/// The repository's `lab/` folder (guest scripts, C peer).
pub(crate) fn lab_src() -> PathBuf {
    crate::util::root().join("lab")
}

fn usage() -> String {
    "usage: cargo xtask lab <command>\n\
     \n  setup [--force]          host packages (apt), Xen + kernel, dom0 image, domU initramfs (root)\
     \n  start                    boot Xen + dom0 + domUs under QEMU in the background\
     \n  status                   QEMU pid and `xl list`\
     \n  stop                     stop QEMU\
     \n  test [--quick] [--keep] [--phases LIST]\
     \n                           setup, build our static binaries, start, run the checks, stop\
     \n                           (phases: devtest,matrix,kill,throughput,qrexec,destroy,cxenstored,mirage,\
     \n                            libxenvchan,cqrexec)\
     \n  run-dom0 CMD             run a shell command in dom0\
     \n  run-domU [-d NAME] CMD   run a shell command in a domU (default domU1)\
     \n  push FILE...             copy files to /mnt/host/ in dom0 and every domU\
     \n  debian-domU [-d NAME] [FILE...]\
     \n                           create a domU (default domU3) booted from the Debian root\
     \n                           file system, with FILEs in its /mnt/host/\
     \n  log                      the serial console log (Xen + dom0 kernel)\
     \n  console                  attach to the serial console (socat; Ctrl-] leaves)\
     \n\
     \nenvironment: LAB_CACHE LAB_SMP(1) LAB_MEM LAB_DOM0_MEM LAB_DOMU_MEM LAB_DOMUS LAB_XENSTORED(o|c)\
     \n             LAB_ACCEL LAB_CPU LAB_BOOT_TIMEOUT LAB_TIMEOUT LAB_MIRROR (see lab/README.md)"
        .to_string()
}

/// Dispatches a lab subcommand.
pub fn run(args: &[String]) -> Result<(), String> {
    let Some(cmd) = args.first() else {
        return Err(usage());
    };
    let rest = &args[1..];
    let cfg = Config::from_env()?;
    match cmd.as_str() {
        "setup" => {
            let force = rest.iter().any(|a| a == "--force");
            setup::setup(&cfg, force)
        }
        "start" => {
            let guard = vm::start(&cfg)?;
            guard.disarm();
            Ok(())
        }
        "stop" => vm::stop(&cfg),
        "status" => vm::status(&cfg),
        "run-dom0" => {
            if rest.is_empty() {
                return Err("usage: run-dom0 CMD...".into());
            }
            let lab = Lab::attach(&cfg)?;
            let out = lab.dom0(&rest.join(" "), cfg.cmd_timeout)?;
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            exit_with(out.code)
        }
        "run-domU" | "run-domu" => {
            let (name, cmd) = match rest {
                [d, name, cmd @ ..] if d == "-d" => (name.as_str(), cmd),
                cmd => ("domU1", cmd),
            };
            if cmd.is_empty() {
                return Err("usage: run-domU [-d NAME] CMD...".into());
            }
            let lab = Lab::attach(&cfg)?;
            let out = lab.domu(name, &cmd.join(" "), cfg.cmd_timeout)?;
            print!("{}", out.stdout);
            exit_with(out.code)
        }
        "push" => {
            if rest.is_empty() {
                return Err("usage: push FILE...".into());
            }
            let lab = Lab::attach(&cfg)?;
            let files: Vec<PathBuf> = rest.iter().map(PathBuf::from).collect();
            lab.push(&files, None)
        }
        "debian-domU" | "debian-domu" => {
            let (name, files) = match rest {
                [d, name, files @ ..] if d == "-d" => (name.as_str(), files),
                files => ("domU3", files),
            };
            let lab = Lab::attach(&cfg)?;
            let files: Vec<PathBuf> = files.iter().map(PathBuf::from).collect();
            let took = debian_domu::create(&lab, name, &files)?;
            eprintln!(
                "lab: {name} (Debian root) ready after {:.1}s",
                took.as_secs_f64()
            );
            Ok(())
        }
        "log" => {
            let p = cfg.run_dir().join("console.log");
            let s = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            print!("{}", String::from_utf8_lossy(&s).replace('\r', ""));
            Ok(())
        }
        "console" => {
            vm::running_pid(&cfg).ok_or("the lab is not running")?;
            let sock = cfg.run_dir().join("console.sock");
            let st = std::process::Command::new("socat")
                .arg("-,raw,echo=0,escape=0x1d")
                .arg(format!("UNIX-CONNECT:{}", sock.display()))
                .status()
                .map_err(|e| format!("socat: {e}"))?;
            if st.success() {
                Ok(())
            } else {
                Err(format!("socat: {st}"))
            }
        }
        "test" => suite::test(&cfg, rest),
        "-h" | "--help" | "help" => {
            println!("{}", usage());
            Ok(())
        }
        _ => Err(usage()),
    }
}

/// Ends the process with a guest command's exit code.
fn exit_with(code: i32) -> Result<(), String> {
    if code == 0 {
        Ok(())
    } else {
        std::process::exit(code.clamp(1, 255))
    }
}
