//! `qubes-sim`: a simulated Qubes (dom0 qrexec daemons, policy, VM agents,
//! services) over the Local vchan transport. See the crate's README.
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
    /// (internal) A VM's qrexec agent.
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        domid: u16,
        #[arg(long, default_value = "v4")]
        format: String,
        #[arg(long, default_value = "")]
        services: std::ffi::OsString,
    },
    /// (internal) A VM's dom0 qrexec daemon.
    #[command(hide = true)]
    Daemon {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        domid: u16,
        #[arg(long)]
        policy: PathBuf,
    },
}

fn abs(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

fn main() -> ExitCode {
    // The supervisor blocks its stop signals; its members must not inherit
    // that (nor the services they start).
    let _ = supervisor::stop_signals().thread_unblock();
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
            dir,
            vm,
            domid,
            format,
            services,
        } => {
            qubes_sim::log::set_name(format!("{vm}/agent"));
            (|| {
                let layout = Layout::new(abs(dir));
                let format = qrexec::format::parse_format(&format)
                    .map_err(|e| qubes_sim::Error::other(e.to_string()))?;
                let ctx = VmContext {
                    name: vm.clone(),
                    transport: Transport::Local {
                        dir: layout.xen_dir(),
                        domid,
                    },
                    services: std::env::split_paths(&services)
                        .filter(|p| !p.as_os_str().is_empty())
                        .collect(),
                    home: layout.home(&vm),
                    agent_socket: layout.agent_socket(&vm),
                    version: format.protocol_version(),
                    connect_timeout: qubes_sim::service::DATA_CONNECT_TIMEOUT,
                };
                qubes_sim::agent::run(qubes_sim::agent::AgentConfig {
                    ctx,
                    format,
                    socket: layout.agent_socket(&vm),
                    daemon_timeout: Duration::from_secs(30),
                })
            })()
        }
        Cmd::Daemon {
            dir,
            vm,
            domid,
            policy,
        } => {
            qubes_sim::log::set_name(format!("{vm}/daemon"));
            let layout = Layout::new(abs(dir));
            qubes_sim::daemon::run(qubes_sim::daemon::DaemonConfig {
                name: vm,
                domid,
                transport: Transport::Local {
                    dir: layout.xen_dir(),
                    domid: 0,
                },
                layout,
                policy: abs(policy),
                agent_timeout: Duration::from_secs(30),
            })
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
