//! Where things live in a running simulation's directory.
//!
//! ```text
//! DIR/
//!   sim.pid               the supervisor's pid (for `qubes-sim stop`)
//!   members               process-group ids of the members (safety net for stop)
//!   ready                 written once every member is up
//!   sim.log               the supervisor's output when started with `qubes-sim start`
//!   xen/                  the Local transport (VCHAN_LOCAL_DIR): event-channel hub,
//!                         grant hub, xenstored sockets
//!   run/qubesd.sock       the supervisor's admin socket (VM list, DispVMs)
//!   run/qrexec.<domid>    each VM's daemon socket (dom0 clients), and the
//!   run/qrexec.<name>     symlink by name, as in /run/qubes
//!   vms/<name>/qrexec-agent   the VM's agent socket (qrexec-client-vm --agent-socket)
//!   vms/<name>/home/          the VM's home directory (services run there)
//!   vms/<name>/env            shell variables to play this VM by hand
//!   vms/<name>/agent.pid, daemon.pid   the VM's member processes
//! ```

use std::path::{Path, PathBuf};

/// Paths inside a simulation directory.
///
/// ```
/// let l = qubes_sim::layout::Layout::new("/tmp/sim");
/// assert_eq!(l.agent_socket("work"), std::path::Path::new("/tmp/sim/vms/work/qrexec-agent"));
/// assert_eq!(l.daemon_socket(3), std::path::Path::new("/tmp/sim/run/qrexec.3"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout of the simulation in `root`.
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// The simulation directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The Local transport's rendezvous directory (`VCHAN_LOCAL_DIR`).
    pub fn xen_dir(&self) -> PathBuf {
        self.root.join("xen")
    }

    /// Daemon and admin sockets.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// The daemon socket of the VM with this domain id.
    pub fn daemon_socket(&self, domid: u16) -> PathBuf {
        self.run_dir().join(format!("qrexec.{domid}"))
    }

    /// The by-name symlink to a VM's daemon socket.
    pub fn daemon_socket_by_name(&self, name: &str) -> PathBuf {
        self.run_dir().join(format!("qrexec.{name}"))
    }

    /// The supervisor's admin socket.
    pub fn qubesd_socket(&self) -> PathBuf {
        self.run_dir().join("qubesd.sock")
    }

    /// Per-VM files.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// A VM's directory.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }

    /// A VM's agent socket.
    pub fn agent_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("qrexec-agent")
    }

    /// A VM's home directory.
    pub fn home(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("home")
    }

    /// A VM's environment file.
    pub fn env_file(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("env")
    }

    /// The supervisor's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("sim.pid")
    }

    /// Process groups of the members, one per line.
    pub fn members_file(&self) -> PathBuf {
        self.root.join("members")
    }

    /// Marker written once the simulation is up.
    pub fn ready_file(&self) -> PathBuf {
        self.root.join("ready")
    }

    /// Output of a backgrounded supervisor.
    pub fn log_file(&self) -> PathBuf {
        self.root.join("sim.log")
    }
}
