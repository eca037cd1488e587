// Why this file is long (~800 lines): the last ~100 are unit tests of the
// trigger checks and the port table.
//! A VM's dom0 qrexec daemon (docs/qrexec.md §9): vchan client of the VM's control
//! channel, the `qrexec.<domid>` socket for dom0 clients, policy
//! evaluation for the VM's calls, and its data-port table.
//!
//! A trigger from the agent is checked as the real daemon checks it (a
//! wrong type or length ends the daemon; a bad request id or service is
//! refused; names are sanitised), then a routing thread (the real daemon's
//! policy child) asks the [`crate::policy`] and, if allowed, talks the dom0
//! client protocol on the daemon sockets exactly as `qrexec-daemon`'s child
//! does: `MSG_EXEC_CMDLINE{source, 0, "user:QUBESRPC svc+arg source"}` to
//! the target's daemon (which allocates the data port with the parity split
//! and forwards the command to its agent), then `MSG_SERVICE_CONNECT{target,
//! port, ident}` to this daemon, which forwards it to the source agent. A
//! denial, or any failure on the way, becomes `MSG_SERVICE_REFUSED{ident}`.
//! For a DispVM target the thread keeps its connection to the DispVM's
//! daemon until the data port is released, then has the DispVM destroyed.

use crate::ctrl::{Control, Msg, WakeHandle, Waker};
use crate::layout::Layout;
use crate::policy::{Decision, Policy, Request, SystemInfo, Target};
use crate::wire::{CLIENT_PROTOCOL_VERSION, read_hello, read_msg, write_hello, write_msg};
use crate::{Error, Result};
use qrexec::proto::{
    ConnectionParams, DOMAIN_FIELD_SIZE, DOMAIN_FIELD_SIZE_V2, EXEC_PARAMS_SIZE, IDENT_FIELD_SIZE,
    MAX_QREXEC_CMD_LEN, MAX_SERVICE_NAME_LEN, MsgHeader, MsgType, SERVICE_FIELD_SIZE_V2,
    SERVICE_PARAMS_SIZE, TRIGGER_V2_SIZE, TRIGGER3_PARAMS_SIZE, TRIGGER4_PARAMS_SIZE,
    VCHAN_BASE_DATA_PORT,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;
use vchan::Transport;

/// The protocol version this daemon speaks (R4.3+).
pub const DAEMON_PROTOCOL_VERSION: u32 = 4;
/// Number of data ports per daemon (513 ..= 768).
pub const MAX_PORTS: usize = 256;
/// Most policy requests pending at once.
pub const MAX_PENDING: usize = 256;
/// The VM's default user (`DEFAULT:` in command lines).
pub const DEFAULT_USER: &str = "user";
/// How long a dom0 client may take for its handshake and request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a daemon needs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The VM's name.
    pub name: String,
    /// The VM's domain id.
    pub domid: u16,
    /// dom0's transport (domain 0).
    pub transport: Transport,
    /// The simulation directory.
    pub layout: Layout,
    /// The policy file (read for every call).
    pub policy: PathBuf,
    /// How long to wait for the agent's control channel.
    pub agent_timeout: Duration,
    /// A fixed list of VMs (a standalone daemon, e.g. in a real dom0);
    /// `None`: ask the supervisor's admin socket for every call (and
    /// DispVMs are possible).
    pub vms: Option<SystemInfo>,
}

/// The VMs of a configuration, as a standalone daemon's fixed VM list
/// ([`DaemonConfig::vms`]).
///
/// ```
/// use qubes_sim::config::SimConfig;
/// let c = SimConfig::parse("vm a domid=4\nvm b\npolicy p\n", std::path::Path::new("/"), "x").unwrap();
/// let sys = qubes_sim::daemon::fixed_vms(&c);
/// assert_eq!(sys.vm("a").unwrap().domid, 4);
/// assert_eq!(sys.vms.len(), 2);
/// ```
pub fn fixed_vms(config: &crate::config::SimConfig) -> SystemInfo {
    SystemInfo {
        vms: config
            .vms
            .iter()
            .map(|v| crate::policy::VmInfo {
                name: v.name.clone(),
                domid: v.domid,
                dispvm_template: None,
                template_for_dispvms: v.template_for_dispvms,
                default_dispvm: v
                    .default_dispvm
                    .clone()
                    .or_else(|| config.default_dispvm.clone()),
            })
            .collect(),
    }
}

/// A trigger after the daemon's checks (docs/qrexec.md §9.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedTrigger {
    /// The request id (`SOCKET<fd>`), as a 32-byte field.
    pub ident: [u8; IDENT_FIELD_SIZE],
    /// The sanitised target.
    pub target: String,
    /// The sanitised v4 source qube (`None` for v2/v3).
    pub requested_source: Option<String>,
    /// The sanitised `service[+arg]`.
    pub service: String,
}

/// What to do with a trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerCheck {
    /// Evaluate the policy.
    Ok(CheckedTrigger),
    /// Refuse at once (bad request id or service) with this identifier.
    Refuse([u8; IDENT_FIELD_SIZE], String),
}

fn fixed(b: &[u8]) -> &[u8] {
    // The last byte is forced to NUL; the value ends at the first NUL.
    let usable = &b[..b.len() - 1];
    let end = usable.iter().position(|&c| c == 0).unwrap_or(usable.len());
    &usable[..end]
}

fn sanitize_name(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'@' | b':') {
                c as char
            } else {
                '_'
            }
        })
        .collect()
}

fn sanitize_service(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'+') {
                c as char
            } else {
                '_'
            }
        })
        .collect()
}

fn valid_ident(field: &[u8; IDENT_FIELD_SIZE]) -> bool {
    let Some(nul) = field.iter().position(|&c| c == 0) else {
        return false;
    };
    field[..nul]
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b' ' | b'-'))
        && field[nul..].iter().all(|&c| c == 0)
}

/// Check a trigger from the agent. `Err` means the daemon must exit (a
/// wrong type for the negotiated version, or a bad length).
///
/// ```
/// use qrexec::proto::{RequestFormat, Trigger};
/// use qubes_sim::daemon::{check_trigger, TriggerCheck};
/// let mut req = Trigger::new(RequestFormat::V4, b"work", b"demo.Echo", b"").encode().unwrap();
/// let hdr = qrexec::proto::MsgHeader::decode(&req).unwrap();
/// match check_trigger(4, &hdr, &req[8..]).unwrap() {
///     TriggerCheck::Ok(t) => assert_eq!((t.target.as_str(), t.service.as_str()), ("work", "demo.Echo")),
///     other => panic!("{other:?}"),
/// }
/// ```
pub fn check_trigger(version: u32, hdr: &MsgHeader, p: &[u8]) -> Result<TriggerCheck> {
    let bad = |m: String| Err(Error::protocol("agent", m));
    let len = p.len();
    let (source_field, target_field, id_at, service_raw): (Option<&[u8]>, &[u8], usize, &[u8]) =
        match MsgType::from_u32(hdr.ty) {
            Some(MsgType::TriggerService) => {
                if version >= 3 || len != TRIGGER_V2_SIZE {
                    return bad(format!("TRIGGER_SERVICE len {len} with version {version}"));
                }
                (
                    None,
                    &p[SERVICE_FIELD_SIZE_V2..SERVICE_FIELD_SIZE_V2 + DOMAIN_FIELD_SIZE_V2],
                    SERVICE_FIELD_SIZE_V2 + DOMAIN_FIELD_SIZE_V2,
                    &p[..SERVICE_FIELD_SIZE_V2],
                )
            }
            Some(MsgType::TriggerService3) => {
                if version < 3
                    || len <= TRIGGER3_PARAMS_SIZE
                    || len - TRIGGER3_PARAMS_SIZE > MAX_SERVICE_NAME_LEN
                {
                    return bad(format!("TRIGGER_SERVICE3 len {len} with version {version}"));
                }
                (
                    None,
                    &p[..DOMAIN_FIELD_SIZE],
                    DOMAIN_FIELD_SIZE,
                    &p[TRIGGER3_PARAMS_SIZE..],
                )
            }
            Some(MsgType::TriggerService4) => {
                if version < 4
                    || len <= TRIGGER4_PARAMS_SIZE
                    || len - TRIGGER4_PARAMS_SIZE > MAX_SERVICE_NAME_LEN
                {
                    return bad(format!("TRIGGER_SERVICE4 len {len} with version {version}"));
                }
                (
                    Some(&p[..DOMAIN_FIELD_SIZE]),
                    &p[DOMAIN_FIELD_SIZE..2 * DOMAIN_FIELD_SIZE],
                    2 * DOMAIN_FIELD_SIZE,
                    &p[TRIGGER4_PARAMS_SIZE..],
                )
            }
            _ => return bad(format!("unexpected message type {:#x}", hdr.ty)),
        };
    let mut ident = [0u8; IDENT_FIELD_SIZE];
    ident.copy_from_slice(&p[id_at..id_at + IDENT_FIELD_SIZE]);
    if !valid_ident(&ident) {
        // Refuse with what the agent sent (its last byte forced to NUL).
        ident[IDENT_FIELD_SIZE - 1] = 0;
        return Ok(TriggerCheck::Refuse(ident, "invalid request id".into()));
    }
    let service: &[u8] = if hdr.ty == MsgType::TriggerService.as_u32() {
        fixed(service_raw)
    } else {
        match service_raw.split_last() {
            Some((0, body)) if !body.contains(&0) => body,
            _ => {
                return Ok(TriggerCheck::Refuse(
                    ident,
                    "service name not NUL-terminated or with a NUL inside".into(),
                ));
            }
        }
    };
    if service.is_empty() || service[0] == b'+' {
        return Ok(TriggerCheck::Refuse(
            ident,
            "empty service name, or it starts with '+'".into(),
        ));
    }
    Ok(TriggerCheck::Ok(CheckedTrigger {
        ident,
        target: sanitize_name(fixed(target_field)),
        requested_source: source_field.map(|s| sanitize_name(fixed(s))),
        service: sanitize_service(service),
    }))
}

/// The data port for a call between this daemon's VM `own` and `peer`
/// (docs/qrexec.md §9.4): with dom0 the first free port; with a VM of a higher
/// domain id the odd slots (514, 516, ...), of a lower one the even slots
/// (513, 515, ...). `used(i)` says whether slot `i` is taken.
///
/// ```
/// use qubes_sim::daemon::allocate_port;
/// assert_eq!(allocate_port(7, 5, |_| false), Some(513));
/// assert_eq!(allocate_port(5, 7, |_| false), Some(514));
/// assert_eq!(allocate_port(5, 0, |i| i == 0), Some(514));
/// ```
pub fn allocate_port(own: u16, peer: u32, used: impl Fn(usize) -> bool) -> Option<u32> {
    let (start, step) = if peer == 0 {
        (0, 1)
    } else if peer > u32::from(own) {
        (1, 2)
    } else {
        (0, 2)
    };
    (start..MAX_PORTS)
        .step_by(step)
        .find(|&i| !used(i))
        .map(|i| VCHAN_BASE_DATA_PORT + i as u32)
}

enum Event {
    /// A dom0 client's request on the daemon socket.
    Client(UnixStream, MsgHeader, Vec<u8>),
    /// Refuse a pending request.
    Refuse([u8; IDENT_FIELD_SIZE], String),
}

struct PortEntry {
    peer: u32,
    /// The dom0 client that asked for the port: closed when it is freed.
    _client: UnixStream,
}

struct Daemon {
    cfg: DaemonConfig,
    ctrl: Control,
    listener: UnixListener,
    waker: Waker,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    pending: HashMap<[u8; IDENT_FIELD_SIZE], ()>,
    ports: Vec<Option<PortEntry>>,
}

/// Run a daemon until its agent goes away (an error) or it is killed.
pub fn run(cfg: DaemonConfig) -> Result<()> {
    let ctrl = Control::connect(
        &cfg.transport,
        cfg.domid,
        DAEMON_PROTOCOL_VERSION,
        cfg.agent_timeout,
    )?;
    crate::vlog!("connected to the agent (version {})", ctrl.version());
    let path = cfg.layout.daemon_socket(cfg.domid);
    let run_dir = cfg.layout.run_dir();
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| Error::io(format!("create {}", run_dir.display()), e))?;
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;
    let link = cfg.layout.daemon_socket_by_name(&cfg.name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("qrexec.{}", cfg.domid), &link)
        .map_err(|e| Error::io(format!("symlink {}", link.display()), e))?;
    let (tx, rx) = mpsc::channel();
    let mut d = Daemon {
        cfg,
        ctrl,
        listener,
        waker: Waker::new()?,
        tx,
        rx,
        pending: HashMap::new(),
        ports: (0..MAX_PORTS).map(|_| None).collect(),
    };
    d.main_loop()
}

fn client_thread(mut s: UnixStream, tx: mpsc::Sender<Event>, wake: WakeHandle) {
    let r = (|| -> std::io::Result<(MsgHeader, Vec<u8>)> {
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        write_hello(&mut s, CLIENT_PROTOCOL_VERSION)?;
        let v = read_hello(&mut s)?;
        if v < CLIENT_PROTOCOL_VERSION {
            return Err(std::io::Error::other(format!("client version {v}")));
        }
        read_msg(&mut s, EXEC_PARAMS_SIZE + MAX_QREXEC_CMD_LEN)
    })();
    match r {
        Ok((hdr, payload)) => {
            let _ = s.set_read_timeout(None);
            if tx.send(Event::Client(s, hdr, payload)).is_ok() {
                wake.wake();
            }
        }
        Err(e) => crate::vlog!("dom0 client dropped: {e}"),
    }
}

impl Daemon {
    fn main_loop(&mut self) -> Result<()> {
        let mut msgs = Vec::new();
        loop {
            msgs.clear();
            let open = self.ctrl.read_messages(&mut msgs)?;
            for m in msgs.drain(..) {
                self.handle_ctrl(m)?;
            }
            if !open {
                return Err(Error::other("the agent closed the control channel"));
            }
            while let Ok(ev) = self.rx.try_recv() {
                self.handle_event(ev);
            }
            loop {
                match self.listener.accept() {
                    Ok((s, _)) => {
                        let tx = self.tx.clone();
                        let wake = self.waker.handle()?;
                        std::thread::spawn(move || client_thread(s, tx, wake));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io("accept on the daemon socket", e)),
                }
            }
            self.ctrl.flush()?;
            crate::ctrl::sleep_on(&mut self.ctrl, &self.listener, &self.waker)?;
        }
    }

    fn refuse(&mut self, ident: [u8; IDENT_FIELD_SIZE], why: &str) {
        if self.pending.remove(&ident).is_some() {
            crate::log!(
                "refused request {}: {why}",
                String::from_utf8_lossy(fixed(&ident))
            );
            self.ctrl.queue(MsgType::ServiceRefused, &ident);
        }
    }

    fn handle_ctrl(&mut self, (hdr, payload): Msg) -> Result<()> {
        match MsgType::from_u32(hdr.ty) {
            Some(MsgType::TriggerService | MsgType::TriggerService3 | MsgType::TriggerService4) => {
                match check_trigger(self.ctrl.version(), &hdr, &payload)? {
                    TriggerCheck::Refuse(ident, why) => {
                        self.pending.insert(ident, ());
                        self.refuse(ident, &why);
                    }
                    TriggerCheck::Ok(t) => {
                        if self.pending.len() >= MAX_PENDING || self.pending.contains_key(&t.ident)
                        {
                            self.pending.insert(t.ident, ());
                            self.refuse(t.ident, "too many pending requests");
                            return Ok(());
                        }
                        self.pending.insert(t.ident, ());
                        let ctx = RouteCtx {
                            name: self.cfg.name.clone(),
                            domid: self.cfg.domid,
                            layout: self.cfg.layout.clone(),
                            policy: self.cfg.policy.clone(),
                            vms: self.cfg.vms.clone(),
                        };
                        let tx = self.tx.clone();
                        let wake = self.waker.handle()?;
                        std::thread::spawn(move || {
                            let ident = t.ident;
                            if let Err(why) = route(&ctx, &t)
                                && tx.send(Event::Refuse(ident, why)).is_ok()
                            {
                                wake.wake();
                            }
                        });
                    }
                }
            }
            Some(MsgType::ConnectionTerminated) => {
                let p = ConnectionParams::decode(&payload)
                    .map_err(|e| Error::protocol("agent", e.to_string()))?;
                let slot = p.connect_port.wrapping_sub(VCHAN_BASE_DATA_PORT) as usize;
                if let Some(entry) = self.ports.get_mut(slot)
                    && entry.as_ref().is_some_and(|e| e.peer == p.connect_domain)
                {
                    crate::vlog!("port {} released", p.connect_port);
                    *entry = None;
                }
            }
            _ => {
                return Err(Error::protocol(
                    "agent",
                    format!("unexpected message type {:#x} len {}", hdr.ty, hdr.len),
                ));
            }
        }
        Ok(())
    }

    fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Refuse(ident, why) => self.refuse(ident, &why),
            Event::Client(s, hdr, payload) => self.handle_client(s, hdr, payload),
        }
    }

    /// A dom0 client's request (docs/qrexec.md §9.3): a command for our VM, or the
    /// answer to one of our VM's requests.
    fn handle_client(&mut self, mut s: UnixStream, hdr: MsgHeader, payload: Vec<u8>) {
        match MsgType::from_u32(hdr.ty) {
            Some(t @ (MsgType::ExecCmdline | MsgType::JustExec))
                if payload.len() > EXEC_PARAMS_SIZE =>
            {
                let Ok(p) = ConnectionParams::decode(&payload[..EXEC_PARAMS_SIZE]) else {
                    return;
                };
                if p.connect_port != 0 {
                    crate::log!("dom0 client asked for port {}: unsupported", p.connect_port);
                    return;
                }
                let ports = &self.ports;
                let Some(port) =
                    allocate_port(self.cfg.domid, p.connect_domain, |i| ports[i].is_some())
                else {
                    crate::log!("no free data port");
                    return;
                };
                let reply = ConnectionParams {
                    connect_domain: u32::from(self.cfg.domid),
                    connect_port: port,
                };
                if write_msg(&mut s, t, &reply.encode()).is_err() {
                    return;
                }
                // The command line: NUL forced at the end; DEFAULT: is the
                // VM's default user.
                let raw = &payload[EXEC_PARAMS_SIZE..payload.len() - 1];
                let raw = raw.split(|&c| c == 0).next().unwrap_or(&[]);
                let mut cmd = match raw.strip_prefix(b"DEFAULT:") {
                    Some(rest) => [format!("{DEFAULT_USER}:").as_bytes(), rest].concat(),
                    None => raw.to_vec(),
                };
                cmd.push(0);
                let mut out = ConnectionParams {
                    connect_domain: p.connect_domain,
                    connect_port: port,
                }
                .encode()
                .to_vec();
                out.extend_from_slice(&cmd);
                crate::vlog!(
                    "{t:?} for domain {} on port {port}: {}",
                    p.connect_domain,
                    String::from_utf8_lossy(&cmd[..cmd.len() - 1])
                );
                self.ctrl.queue(t, &out);
                self.ports[(port - VCHAN_BASE_DATA_PORT) as usize] = Some(PortEntry {
                    peer: p.connect_domain,
                    _client: s,
                });
            }
            Some(MsgType::ServiceConnect)
                if payload.len() == EXEC_PARAMS_SIZE + SERVICE_PARAMS_SIZE =>
            {
                let Ok(p) = ConnectionParams::decode(&payload[..EXEC_PARAMS_SIZE]) else {
                    return;
                };
                let mut ident = [0u8; IDENT_FIELD_SIZE];
                ident.copy_from_slice(&payload[EXEC_PARAMS_SIZE..]);
                let port_ok = (VCHAN_BASE_DATA_PORT..VCHAN_BASE_DATA_PORT + MAX_PORTS as u32)
                    .contains(&p.connect_port);
                if !port_ok {
                    crate::log!(
                        "SERVICE_CONNECT with port {}: calls to dom0 are not simulated",
                        p.connect_port
                    );
                    return;
                }
                if self.pending.remove(&ident).is_none() {
                    crate::log!("SERVICE_CONNECT for an unknown or answered request");
                    return;
                }
                self.ctrl.queue(MsgType::ServiceConnect, &payload);
            }
            _ => crate::log!(
                "dom0 client sent type {:#x} len {}: dropped",
                hdr.ty,
                hdr.len
            ),
        }
    }
}

/// What a routing thread needs.
#[derive(Debug, Clone)]
struct RouteCtx {
    name: String,
    domid: u16,
    layout: Layout,
    policy: PathBuf,
    vms: Option<SystemInfo>,
}

/// Connect to a daemon socket and do the dom0 client HELLO.
fn dom0_client(path: &std::path::Path) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let v = read_hello(&mut s)?;
    if v < CLIENT_PROTOCOL_VERSION {
        return Err(std::io::Error::other(format!("daemon version {v}")));
    }
    write_hello(&mut s, CLIENT_PROTOCOL_VERSION)?;
    Ok(s)
}

/// The policy child: decide, then set the call up. `Err` = refuse.
fn route(ctx: &RouteCtx, t: &CheckedTrigger) -> std::result::Result<(), String> {
    let qubesd = ctx.layout.qubesd_socket();
    let sys = match &ctx.vms {
        Some(fixed) => fixed.clone(),
        None => crate::qubesd::list(&qubesd).map_err(|e| e.to_string())?,
    };
    let policy = Policy::load(&ctx.policy).map_err(|e| format!("policy: {e}"))?;
    let decision = policy.evaluate(
        &sys,
        &Request {
            source: &ctx.name,
            target: &t.target,
            service_and_arg: &t.service,
        },
    );
    let (target, user, line) = match decision {
        Decision::Deny { reason } => {
            return Err(format!(
                "{} from {} to '{}': {reason}",
                t.service, ctx.name, t.target
            ));
        }
        Decision::Allow { target, user, line } => (target, user, line),
    };
    let (target_name, target_domid, dispvm) = match &target {
        Target::Vm(n) => {
            let vm = sys.vm(n).ok_or_else(|| format!("target '{n}' vanished"))?;
            (n.clone(), vm.domid, false)
        }
        Target::NewDispVm(_) if ctx.vms.is_some() => {
            return Err(
                "DispVMs need the supervisor (a standalone daemon has a fixed VM list)".into(),
            );
        }
        Target::NewDispVm(tpl) => {
            let (n, d) =
                crate::qubesd::create_dispvm(&qubesd, tpl).map_err(|e| format!("DispVM: {e}"))?;
            (n, d, true)
        }
    };
    crate::vlog!(
        "{} from {} to '{}': allowed by line {line}, target {target_name}",
        t.service,
        ctx.name,
        t.target
    );
    let r = connect_call(ctx, t, &target_name, target_domid, user.as_deref());
    match (r, dispvm) {
        (Ok(mut target_conn), true) => {
            // Wait for the data port to be released (the target daemon
            // closes our connection), then destroy the DispVM.
            let _ = target_conn.set_read_timeout(None);
            let mut b = [0u8; 64];
            while matches!(target_conn.read(&mut b), Ok(n) if n > 0) {}
            crate::vlog!("DispVM {target_name}: call ended, destroying it");
            if let Err(e) = crate::qubesd::kill(&qubesd, &target_name) {
                crate::log!("destroy {target_name}: {e}");
            }
            Ok(())
        }
        (Ok(_), false) => Ok(()),
        (Err(e), _) => {
            if dispvm {
                let _ = crate::qubesd::kill(&qubesd, &target_name);
            }
            Err(e)
        }
    }
}

/// Ask the target's daemon to start the service, then tell our own daemon
/// to connect the caller. Returns the connection to the target's daemon
/// (closed by it when the data port is released).
fn connect_call(
    ctx: &RouteCtx,
    t: &CheckedTrigger,
    target_name: &str,
    target_domid: u16,
    user: Option<&str>,
) -> std::result::Result<UnixStream, String> {
    let service = if t.service.contains('+') {
        t.service.clone()
    } else {
        format!("{}+", t.service)
    };
    let cmdline = format!(
        "{}:QUBESRPC {service} {}",
        user.unwrap_or("DEFAULT"),
        ctx.name
    );
    let step = |what: &str, e: std::io::Error| format!("{what} ({target_name}): {e}");
    let mut tc = dom0_client(&ctx.layout.daemon_socket(target_domid))
        .map_err(|e| step("connect to the target's daemon", e))?;
    let mut payload = ConnectionParams {
        connect_domain: u32::from(ctx.domid),
        connect_port: 0,
    }
    .encode()
    .to_vec();
    payload.extend_from_slice(cmdline.as_bytes());
    payload.push(0);
    write_msg(&mut tc, MsgType::ExecCmdline, &payload).map_err(|e| step("send EXEC_CMDLINE", e))?;
    let (hdr, reply) =
        read_msg(&mut tc, EXEC_PARAMS_SIZE).map_err(|e| step("read the data port", e))?;
    if hdr.ty != MsgType::ExecCmdline.as_u32() || reply.len() != EXEC_PARAMS_SIZE {
        return Err(format!(
            "target daemon answered type {:#x} len {}",
            hdr.ty, hdr.len
        ));
    }
    let p = ConnectionParams::decode(&reply).map_err(|e| e.to_string())?;
    let mut sc = dom0_client(&ctx.layout.daemon_socket(ctx.domid))
        .map_err(|e| step("connect to the source daemon", e))?;
    let mut msg = p.encode().to_vec();
    msg.extend_from_slice(&t.ident);
    write_msg(&mut sc, MsgType::ServiceConnect, &msg)
        .map_err(|e| step("send SERVICE_CONNECT", e))?;
    let _ = sc.flush();
    Ok(tc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qrexec::proto::{RequestFormat, Trigger};

    fn check(v: u32, req: &[u8], f: RequestFormat) -> Result<TriggerCheck> {
        let (hdr, p) = if f == RequestFormat::V2 {
            (MsgHeader::new(MsgType::TriggerService, 128), req)
        } else {
            (MsgHeader::decode(req).unwrap(), &req[8..])
        };
        check_trigger(v, &hdr, p)
    }

    fn with_ident(f: RequestFormat, target: &[u8], service: &[u8], source: &[u8]) -> Vec<u8> {
        let mut b = Trigger::new(f, target, service, source).encode().unwrap();
        let at = match f {
            RequestFormat::V2 => 96,
            RequestFormat::V3 => 8 + 64,
            RequestFormat::V4 => 8 + 128,
        };
        b[at..at + 8].copy_from_slice(b"SOCKET11");
        b
    }

    #[test]
    fn versions_gate_types() {
        let v2 = with_ident(RequestFormat::V2, b"work", b"a.B", b"");
        let v3 = with_ident(RequestFormat::V3, b"work", b"a.B", b"");
        let v4 = with_ident(RequestFormat::V4, b"work", b"a.B", b"src");
        assert!(matches!(
            check(2, &v2, RequestFormat::V2),
            Ok(TriggerCheck::Ok(_))
        ));
        assert!(check(3, &v2, RequestFormat::V2).is_err());
        assert!(matches!(
            check(3, &v3, RequestFormat::V3),
            Ok(TriggerCheck::Ok(_))
        ));
        assert!(matches!(
            check(4, &v3, RequestFormat::V3),
            Ok(TriggerCheck::Ok(_))
        ));
        assert!(check(2, &v3, RequestFormat::V3).is_err());
        assert!(check(3, &v4, RequestFormat::V4).is_err());
        match check(4, &v4, RequestFormat::V4).unwrap() {
            TriggerCheck::Ok(t) => {
                assert_eq!(t.requested_source.as_deref(), Some("src"));
                assert_eq!(&t.ident[..9], b"SOCKET11\0");
            }
            other => panic!("{other:?}"),
        }
        let unknown = MsgHeader { ty: 0x999, len: 0 };
        assert!(check_trigger(4, &unknown, &[]).is_err());
    }

    #[test]
    fn sanitising_and_refusals() {
        let t = with_ident(RequestFormat::V4, b"wo rk$", b"a/b+c d", b"");
        match check(4, &t, RequestFormat::V4).unwrap() {
            TriggerCheck::Ok(t) => {
                assert_eq!(t.target, "wo_rk_");
                assert_eq!(t.service, "a_b+c_d");
            }
            other => panic!("{other:?}"),
        }
        let plus = with_ident(RequestFormat::V4, b"work", b"+x", b"");
        assert!(matches!(
            check(4, &plus, RequestFormat::V4).unwrap(),
            TriggerCheck::Refuse(..)
        ));
        let mut bad_id = with_ident(RequestFormat::V4, b"work", b"a", b"");
        bad_id[8 + 128] = b'!';
        assert!(matches!(
            check(4, &bad_id, RequestFormat::V4).unwrap(),
            TriggerCheck::Refuse(..)
        ));
        let mut junk_after_nul = with_ident(RequestFormat::V4, b"work", b"a", b"");
        junk_after_nul[8 + 128 + 20] = b'x';
        assert!(matches!(
            check(4, &junk_after_nul, RequestFormat::V4).unwrap(),
            TriggerCheck::Refuse(..)
        ));
        let mut nul_inside = with_ident(RequestFormat::V4, b"work", b"ab", b"");
        let n = nul_inside.len();
        nul_inside[n - 2] = 0;
        assert!(matches!(
            check(4, &nul_inside, RequestFormat::V4).unwrap(),
            TriggerCheck::Refuse(..)
        ));
    }

    #[test]
    fn port_parity() {
        // peer above us: 514, 516, ...; below: 513, 515, ...; dom0: any.
        assert_eq!(allocate_port(3, 9, |i| i == 1), Some(516));
        assert_eq!(allocate_port(9, 3, |i| i == 0), Some(515));
        assert_eq!(allocate_port(9, 0, |i| i < 3), Some(516));
        assert_eq!(allocate_port(9, 3, |i| i % 2 == 0), None);
        assert_eq!(allocate_port(3, 9, |_| true), None);
        assert_eq!(allocate_port(3, 9, |i| i < 255), Some(768));
        assert_eq!(allocate_port(9, 3, |i| i < 254), Some(513 + 254));
    }
}
