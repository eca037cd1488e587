//! `qubes-sim`: a simulated Qubes (dom0 qrexec daemons, policy, VM agents,
//! services) over the Local vchan transport. See the crate's README.
//!
//! `agent` and `daemon` also run on their own, on real Xen too
//! (`--transport xen`): an agent in each domU, a daemon per domU in dom0
//! with the VM list from `--config` (no supervisor, no DispVMs).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use qubes_sim::config::SimConfig;
use qubes_sim::layout::Layout;
use qubes_sim::service::VmContext;
use qubes_sim::supervisor::{self, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vchan::Transport;

#[derive(Debug, Parser)]
#[command(
    name = "qubes-sim",
    version,
    about = "A simulated Qubes for qrexec, without Xen"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a simulation in the foreground until Ctrl-C (or SIGTERM).
    Run {
        /// Simulation directory (created; must be empty or absent).
        #[arg(long)]
        dir: PathBuf,
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Verbose logging from every member.
        #[arg(short, long)]
        verbose: bool,
        /// Remove the directory itself when stopping.
        #[arg(long, hide = true)]
        owns_dir: bool,
    },
    /// Start a simulation in the background; returns once it is ready.
    Start {
        /// Simulation directory (created; must be empty or absent).
        #[arg(long)]
        dir: PathBuf,
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Verbose logging (into DIR/sim.log).
        #[arg(short, long)]
        verbose: bool,
    },
    /// Stop the simulation in DIR and remove DIR.
    Stop {
        /// Simulation directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Check a configuration file and its policy file.
    Check {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// A VM's qrexec agent, on its own: the supervisor starts one per VM;
    /// on real Xen run it in the domU (`--transport xen`, no `--dir`).
    Agent {
        /// vchan transport: `local` (the simulation's doubles in DIR/xen)
        /// or `xen` (/dev/xen and xenstore of the domain it runs in).
        #[arg(long, value_enum, default_value_t = TransportArg::Local)]
        transport: TransportArg,
        /// Simulation directory (needed for `--transport local`; gives the
        /// default socket and home).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The VM's name.
        #[arg(long)]
        vm: String,
        /// The VM's domain id (needed for `--transport local`; Xen knows it).
        #[arg(long)]
        domid: Option<u16>,
        /// The one request format accepted on the agent socket.
        #[arg(long, default_value = "v4")]
        format: String,
        /// Which agent: `qubes`, or `mirage` / `mirage-upstream` for a
        /// MirageOS unikernel's (protocol 3, ocaml-vchan; its socket is a
        /// test handle, see the `mirage` module).
        #[arg(long, default_value = "qubes")]
        flavour: String,
        /// Service directories (':'-separated, first match wins).
        #[arg(long, default_value = "")]
        services: std::ffi::OsString,
        /// The agent socket (default DIR/vms/VM/qrexec-agent).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Where services run (default DIR/vms/VM/home, or $HOME, or /).
        #[arg(long)]
        home: Option<PathBuf>,
        /// Seconds to wait for the dom0 daemon to connect.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// A VM's dom0 qrexec daemon, on its own: the supervisor starts one per
    /// VM; on real Xen run one per domU in dom0 (`--transport xen`) with
    /// the VM list from `--config`.
    Daemon {
        /// vchan transport: `local` (DIR/xen) or `xen`.
        #[arg(long, value_enum, default_value_t = TransportArg::Local)]
        transport: TransportArg,
        /// Directory of the daemon sockets (DIR/run/qrexec.<domid>), shared
        /// by the daemons that route calls to each other.
        #[arg(long)]
        dir: PathBuf,
        /// The VM's name.
        #[arg(long)]
        vm: String,
        /// The VM's domain id (the agent to connect to).
        #[arg(long)]
        domid: u16,
        /// The policy file (default: the one `--config` names).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// A configuration file whose VMs (names and domain ids) are the
        /// fixed VM list for the policy; without it the daemon asks the
        /// supervisor's admin socket (DIR/run/qubesd.sock).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Seconds to wait for the agent's control channel.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

/// The `--transport` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TransportArg {
    /// The same-host doubles of a simulation directory.
    Local,
    /// Real Xen devices.
    Xen,
}

/// The transport for `--transport`, `--dir` and `--domid`.
fn transport(
    t: TransportArg,
    dir: Option<&Layout>,
    domid: Option<u16>,
) -> qubes_sim::Result<Transport> {
    match t {
        TransportArg::Xen => Ok(Transport::Xen),
        TransportArg::Local => match (dir, domid) {
            (Some(l), Some(domid)) => Ok(Transport::Local {
                dir: l.xen_dir(),
                domid,
            }),
            _ => Err(qubes_sim::Error::other(
                "--transport local needs --dir and --domid",
            )),
        },
    }
}

fn abs(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

fn main() -> ExitCode {
    // The supervisor blocks its stop signals; its members must not inherit
    // that (nor the services they start).
    let _ = supervisor::stop_signals().thread_unblock();
    qubes_sim::log::install();
    let cli = Cli::parse();
    let r: qubes_sim::Result<()> = match cli.cmd {
        Cmd::Run {
            dir,
            config,
            verbose,
            owns_dir,
        } => {
            qubes_sim::log::set_name("qubes-sim");
            (|| {
                let config = SimConfig::load(&abs(config))?;
                qubes_sim::policy::Policy::load(&config.policy)?;
                supervisor::run(RunOptions {
                    dir: abs(dir),
                    config,
                    verbose,
                    exe: supervisor::current_exe()?,
                    owns_dir,
                })
            })()
        }
        Cmd::Start {
            dir,
            config,
            verbose,
        } => (|| {
            let config = abs(config);
            let c = SimConfig::load(&config)?;
            qubes_sim::policy::Policy::load(&c.policy)?;
            let dir = abs(dir);
            let pid = supervisor::start(&dir, &config, verbose, &supervisor::current_exe()?)?;
            let layout = Layout::new(&dir);
            println!("qubes-sim: running in {} (pid {pid})", dir.display());
            for vm in &c.vms {
                println!(
                    "  {:<12} domain {:<3} . {}",
                    vm.name,
                    vm.domid,
                    layout.env_file(&vm.name).display()
                );
            }
            println!("stop it with: qubes-sim stop --dir {}", dir.display());
            Ok(())
        })(),
        Cmd::Stop { dir } => supervisor::stop(&abs(dir)),
        Cmd::Check { config } => (|| {
            let c = SimConfig::load(&abs(config))?;
            qubes_sim::policy::Policy::load(&c.policy)?;
            println!("ok: {} VMs, policy {}", c.vms.len(), c.policy.display());
            Ok(())
        })(),
        Cmd::Agent {
            transport: t,
            dir,
            vm,
            domid,
            format,
            flavour,
            services,
            socket,
            home,
            timeout,
        } => {
            qubes_sim::log::set_name(format!("{vm}/agent"));
            (|| {
                let layout = dir.map(|d| Layout::new(abs(d)));
                let format = qrexec::format::parse_format(&format)
                    .map_err(|e| qubes_sim::Error::other(e.to_string()))?;
                let socket = match (socket, &layout) {
                    (Some(s), _) => abs(s),
                    (None, Some(l)) => l.agent_socket(&vm),
                    (None, None) => {
                        return Err(qubes_sim::Error::other("--socket or --dir is needed"));
                    }
                };
                let home = match (home, &layout) {
                    (Some(h), _) => abs(h),
                    (None, Some(l)) => l.home(&vm),
                    (None, None) => std::env::var_os("HOME")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("/")),
                };
                let ctx = VmContext {
                    name: vm.clone(),
                    transport: transport(t, layout.as_ref(), domid)?,
                    services: std::env::split_paths(&services)
                        .filter(|p| !p.as_os_str().is_empty())
                        .map(abs)
                        .collect(),
                    home,
                    agent_socket: socket.clone(),
                    version: format.protocol_version(),
                    connect_timeout: qubes_sim::service::DATA_CONNECT_TIMEOUT,
                };
                let flavour: qubes_sim::config::AgentFlavour =
                    flavour.parse().map_err(qubes_sim::Error::other)?;
                if flavour != qubes_sim::config::AgentFlavour::Qubes {
                    let ctx = VmContext {
                        version: qubes_sim::mirage::MIRAGE_VERSION,
                        ..ctx
                    };
                    let opts = qubes_sim::mirage::MirageOptions {
                        upstream_trigger: flavour
                            == qubes_sim::config::AgentFlavour::MirageUpstream,
                    };
                    return qubes_sim::mirage::run(ctx, socket, Duration::from_secs(timeout), opts);
                }
                qubes_sim::agent::run(qubes_sim::agent::AgentConfig {
                    ctx,
                    format,
                    socket,
                    daemon_timeout: Duration::from_secs(timeout),
                })
            })()
        }
        Cmd::Daemon {
            transport: t,
            dir,
            vm,
            domid,
            policy,
            config,
            timeout,
        } => {
            qubes_sim::log::set_name(format!("{vm}/daemon"));
            (|| {
                let layout = Layout::new(abs(dir));
                let config = config.map(|c| SimConfig::load(&abs(c))).transpose()?;
                let policy = match (policy, &config) {
                    (Some(p), _) => abs(p),
                    (None, Some(c)) => c.policy.clone(),
                    (None, None) => {
                        return Err(qubes_sim::Error::other("--policy or --config is needed"));
                    }
                };
                qubes_sim::policy::Policy::load(&policy)?;
                qubes_sim::daemon::run(qubes_sim::daemon::DaemonConfig {
                    name: vm,
                    domid,
                    transport: transport(t, Some(&layout), Some(0))?,
                    layout,
                    policy,
                    agent_timeout: Duration::from_secs(timeout),
                    vms: config.as_ref().map(qubes_sim::daemon::fixed_vms),
                })
            })()
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            qubes_sim::log!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
