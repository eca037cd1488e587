//! `cargo xtask lab test [--quick] [--keep] [--phases LIST]`.
//!
//! One run: setup (cached), our static binaries, boot (unless the lab is
//! already up), push, then the phases below, a report, and stop (QEMU is
//! stopped on every path if this run started it, see [`super::vm::Guard`]).
//!
//! | phase | what |
//! |---|---|
//! | `devtest` | `xen-devtest` in two domains: our `evtchn::Xen`, `gnttab::Xen`, `xenstore::Xs` against the devices |
//! | `matrix` | interop: {ours+C, C+ours, ours+ours} × {dom0↔domU1, domU1↔domU2} × rings {1, 4, 64, 1024} KiB × {stream, packet}; checksums compared on both ends |
//! | `kill` | kill -9 of our peer mid-transfer; the survivor (C or ours) must end |
//! | `throughput` | ours vs C, rings 64 KiB and 1 MiB, both directions |
//! | `qrexec` | `qrexec-client-vm` in domU1 calling services in domU2 through `qubes-sim` agents (domUs) and daemons (dom0), all on Xen (see `qrexec.rs`) |
//! | `destroy` | `xl destroy` of the peer's domain while connected and while waiting (last: domU2 is gone after it) |
//! | `mirage` | our ocaml-vchan-like peer (`vchan-peer --compat ocaml`) against the C `vchan-node`, both roles, rings {1, 2, 4, 64, 1024} KiB (1 = ocaml-vchan's default 1024/1024: in-page rings), stream and packet; checksums compared (20 cases; `--quick`: 10) |
//! | `package` | (full run) the `.deb` of `cargo xtask package` installed with `dpkg -i` in a domU booted from a Debian root file system, the `qrexec` calls with the installed command, `dpkg --purge` leaves the file tree as it was (see `package.rs`) |
//! | `libxenvchan` | Xen's C `vchan-node` linked with our libvchan against Debian's libxenvchan, the matrix's pairings, domain pairs and rings, stream; throughput of the C program on both libraries (see `libxenvchan.rs`) |
//! | `cqrexec` | Qubes' C qrexec agents and daemons (`BACKEND_VMM=xen`) on Qubes' libvchan-xen, then on ours; the `qrexec` calls by our client and the C client (see `cqrexec.rs`) |
//! | `cxenstored` | (full run) reboot with C xenstored: devtest, a matrix subset, destroy |
//!
//! `--quick` runs a subset that still covers every pairing, both domain
//! pairs, every ring size and both modes (see `matrix_cases`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::qga::Output;
use super::{Config, Lab, setup, vm};

const PHASES: &[&str] = &[
    "devtest",
    "matrix",
    "kill",
    "throughput",
    "qrexec",
    "destroy",
    "cxenstored",
    "mirage",
    "package",
    "libxenvchan",
    "cqrexec",
];

#[derive(Debug)]
struct Opts {
    quick: bool,
    keep: bool,
    phases: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            quick: false,
            keep: false,
            phases: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--keep" => o.keep = true,
                "--phases" => {
                    let list = it.next().ok_or("--phases needs a list")?;
                    for p in list.split(',') {
                        if !PHASES.contains(&p) {
                            return Err(format!(
                                "unknown phase {p:?} (phases: {})",
                                PHASES.join(",")
                            ));
                        }
                        o.phases.push(p.to_string());
                    }
                }
                _ => return Err(format!("lab test: unknown argument {a:?}")),
            }
        }
        if o.phases.is_empty() {
            o.phases = PHASES
                .iter()
                .filter(|p| !(o.quick && matches!(**p, "cxenstored" | "package")))
                .map(|p| p.to_string())
                .collect();
        }
        Ok(o)
    }

    fn has(&self, p: &str) -> bool {
        self.phases.iter().any(|x| x == p)
    }
}

mod binaries;
mod cqrexec;
mod destroy;
mod devtest;
mod kill;
mod libxenvchan;
mod matrix;
mod package;
mod qrexec;
mod report;
mod throughput;

use binaries::*;
use destroy::*;
use devtest::*;
use kill::*;
use matrix::*;
use report::*;
use throughput::*;

// ---------------------------------------------------------------------------
// the run

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Impl {
    Ours,
    C,
    /// Ours behaving like MirageOS's ocaml-vchan (`--compat ocaml`).
    Mirage,
    /// The C `vchan-node` linked with our libvchan's `libxenvchan_*`
    /// (`vchan-node-ours`, see `ourlib.rs`).
    CLib,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Ours => "ours",
            Impl::C => "C",
            Impl::Mirage => "mirage-like",
            Impl::CLib => "C on our lib",
        }
    }
}

/// One transfer between two domains.
#[derive(Debug, Clone)]
struct Xfer {
    server_dom: String,
    client_dom: String,
    server: Impl,
    client: Impl,
    ring_kib: u32,
    mib: u32,
    server_sends: bool,
    /// Packet size for our side(s) (`--packet`); C is always stream.
    packet: Option<usize>,
}

#[derive(Debug)]
struct XferResult {
    ok: bool,
    /// The receiver's rate.
    rate: Option<f64>,
    detail: String,
    log: String,
}

struct Run {
    lab: Lab,
    quick: bool,
    xenstored: String,
    logdir: PathBuf,
    next_port: u32,
    rep: Report,
    /// Domain ids by name (`xl domid` costs a guest round trip; the ids
    /// change only with a reboot, which clears this).
    ids: std::cell::RefCell<std::collections::HashMap<String, u16>>,
    /// A command put in front of both peers of every transfer (the
    /// throughput phase's counts: `busybox time -v`, `strace -c -f`).
    wrap: Option<String>,
    /// Our peer's file name under `/mnt/host` (the throughput phase's
    /// `LAB_TPUT_PEER`; default `vchan-peer`).
    ours_bin: String,
}

fn checksum_of(s: &str) -> Option<String> {
    let i = s.find("checksum=")? + "checksum=".len();
    let hex: String = s[i..].chars().take_while(char::is_ascii_hexdigit).collect();
    (!hex.is_empty()).then_some(hex)
}

fn rate_of(s: &str) -> Option<f64> {
    let line = s.lines().find(|l| l.starts_with("received"))?;
    let i = line.find(" = ")? + 3;
    line[i..].split_whitespace().next()?.parse().ok()
}

fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

/// `LAB_TPUT_PEER` of a control run: the C peer plays ours as well, so the
/// ratio columns show what the lab reads for two identical programs.
pub(super) const CONTROL_PEER: &str = "C";

/// The C peer's name in a domain (dynamic in dom0, static in domUs).
fn c_bin(dom: &str) -> &'static str {
    if dom == "dom0" {
        "vchan-node"
    } else {
        "vchan-node-static"
    }
}

impl Run {
    fn port(&mut self) -> u32 {
        self.next_port += 1;
        self.next_port
    }

    fn id(&self, dom: &str) -> Result<u16, String> {
        if let Some(&id) = self.ids.borrow().get(dom) {
            return Ok(id);
        }
        let id = self.lab.domid(dom)?;
        self.ids.borrow_mut().insert(dom.to_string(), id);
        Ok(id)
    }

    /// Drops a domain's cached id (it was destroyed; a new one of that
    /// name gets a new id).
    fn forget_id(&self, dom: &str) {
        self.ids.borrow_mut().remove(dom);
    }

    fn on(&self, dom: &str, cmd: &str, timeout: Duration) -> Result<Output, String> {
        self.lab.on(dom, cmd, timeout)
    }

    fn save_log(&self, name: &str, text: &str) {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let _ = std::fs::write(self.logdir.join(format!("{safe}.log")), text);
    }

    /// A peer command line.
    #[allow(clippy::too_many_arguments)]
    fn peer_cmd(
        &self,
        imp: Impl,
        server: bool,
        dom: &str,
        peer: u16,
        port: u32,
        send: bool,
        mib: u32,
        ring_kib: u32,
        packet: Option<usize>,
        wait: u64,
    ) -> String {
        let dir = if send { "send" } else { "recv" };
        if imp == Impl::Mirage {
            let ours = self.peer_cmd(
                Impl::Ours,
                server,
                dom,
                peer,
                port,
                send,
                mib,
                ring_kib,
                packet,
                wait,
            );
            return format!("{ours} --compat ocaml");
        }
        // The control run: the C program in our place.
        let imp = if imp == Impl::Ours && self.ours_bin == CONTROL_PEER {
            Impl::C
        } else {
            imp
        };
        match (imp, server) {
            (Impl::Ours, true) => format!(
                "/mnt/host/{} server {peer} {port} {dir} {mib} {ring_kib} --timeout {wait}{}",
                self.ours_bin,
                packet.map_or(String::new(), |p| format!(" --packet {p}"))
            ),
            (Impl::Ours, false) => format!(
                "/mnt/host/{} client {peer} {port} {dir} {mib} --timeout {wait}{}",
                self.ours_bin,
                packet.map_or(String::new(), |p| format!(" --packet {p}"))
            ),
            (Impl::C, true) => {
                format!("{} server {peer} {port} {dir} {mib} {ring_kib}", c_bin(dom))
            }
            (Impl::C, false) => format!(
                "env VCHAN_WAIT={wait} {} client {peer} {port} {dir} {mib}",
                c_bin(dom)
            ),
            (Impl::CLib, true) => {
                format!("/mnt/host/vchan-node-ours server {peer} {port} {dir} {mib} {ring_kib}")
            }
            (Impl::CLib, false) => format!(
                "env VCHAN_WAIT={wait} /mnt/host/vchan-node-ours client {peer} {port} {dir} {mib}"
            ),
            (Impl::Mirage, _) => unreachable!("handled above"),
        }
    }

    /// Starts `cmd` in the background in `dom`, with its output, exit code,
    /// end time and pid in `/tmp/lab-NAME.{log,rc,end,pid}`.
    fn bg(&self, dom: &str, name: &str, cmd: &str, limit: u64) -> Result<(), String> {
        let script = format!(
            "rm -f /tmp/lab-{name}.*; ( {cmd} > /tmp/lab-{name}.log 2>&1 & echo $! > /tmp/lab-{name}.pid; \
             p=$!; ( sleep {limit}; kill -9 $p 2>/dev/null ) > /dev/null 2>&1 & w=$!; \
             wait $p; echo $? > /tmp/lab-{name}.rc; date +%s > /tmp/lab-{name}.end; kill $w 2>/dev/null ) \
             > /dev/null 2>&1 &"
        );
        let r = self.on(dom, &script, Duration::from_secs(60))?;
        if r.ok() {
            Ok(())
        } else {
            Err(format!("starting {name} in {dom}: {}", r.all()))
        }
    }

    /// Waits (at most `limit` s) for a background command and returns its
    /// exit code (None: still running) and output.
    fn collect(&self, dom: &str, name: &str, limit: u64) -> Result<(Option<i32>, String), String> {
        let n = limit * 5;
        let r = self.on(
            dom,
            &format!(
                "i=0; while [ ! -s /tmp/lab-{name}.rc ] && [ $i -lt {n} ]; do sleep 0.2; i=$((i+1)); done; \
                 cat /tmp/lab-{name}.log; echo; echo \"@@rc=$(cat /tmp/lab-{name}.rc 2>/dev/null || echo running)\""
            ),
            Duration::from_secs(limit + 60),
        )?;
        let text = r.all();
        let rc = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("@@rc="))
            .and_then(|v| v.trim().parse().ok());
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with("@@rc=")).collect();
        Ok((rc, body.join("\n")))
    }

    /// Runs one transfer: the server in the background, the client in the
    /// foreground, then the server's log.
    fn xfer(&mut self, x: &Xfer) -> Result<XferResult, String> {
        let port = self.port();
        let sid = self.id(&x.server_dom)?;
        let cid = self.id(&x.client_dom)?;
        // Generous limits: TCG on a shared 2-core host; 1 KiB rings are slow.
        let limit = 120 + u64::from(x.mib) * if x.ring_kib <= 4 { 20 } else { 4 };
        let wait = 90;
        let scmd = self.peer_cmd(
            x.server,
            true,
            &x.server_dom,
            cid,
            port,
            x.server_sends,
            x.mib,
            x.ring_kib,
            x.packet
                .filter(|_| !matches!(x.server, Impl::C | Impl::CLib)),
            limit,
        );
        let ccmd = self.peer_cmd(
            x.client,
            false,
            &x.client_dom,
            sid,
            port,
            !x.server_sends,
            x.mib,
            x.ring_kib,
            x.packet
                .filter(|_| !matches!(x.client, Impl::C | Impl::CLib)),
            wait,
        );
        let (scmd, ccmd) = match &self.wrap {
            Some(w) => (format!("{w} {scmd}"), format!("{w} {ccmd}")),
            None => (scmd, ccmd),
        };
        self.bg(&x.server_dom, "srv", &scmd, limit)?;
        let t = Instant::now();
        let c = self.on(
            &x.client_dom,
            &format!("timeout {limit} {ccmd} 2>&1"),
            Duration::from_secs(limit + 30),
        )?;
        let wall = t.elapsed().as_secs_f64();
        let (src, sout) = self.collect(&x.server_dom, "srv", 60)?;
        let cout = c.all();
        let log = format!(
            "server ({}) in {}: {scmd}\n{sout}\n[server rc {src:?}]\n\nclient ({}) in {}: {ccmd}\n{cout}\n[client rc {}]\n",
            x.server.name(),
            x.server_dom,
            x.client.name(),
            x.client_dom,
            c.code
        );
        let (ss, cs) = (checksum_of(&sout), checksum_of(&cout));
        let ok = src == Some(0) && c.code == 0 && ss.is_some() && ss == cs;
        let recv_out = if x.server_sends { &cout } else { &sout };
        let rate = rate_of(recv_out);
        let detail = if ok {
            format!(
                "checksum {} both ends, {} MiB/s (wall {wall:.1}s)",
                ss.unwrap_or_default(),
                rate.map_or("?".into(), |r| format!("{r:.1}"))
            )
        } else {
            format!(
                "server rc {src:?}: {}; client rc {}: {}\n{log}",
                last_line(&sout),
                c.code,
                last_line(&cout)
            )
        };
        Ok(XferResult {
            ok,
            rate,
            detail,
            log,
        })
    }
}

// ---------------------------------------------------------------------------
// phase: qrexec (qrexec-client-vm, qubes-sim agents and daemons on Xen)

fn phase_qrexec(run: &mut Run) -> Result<(), String> {
    qrexec::phase(run)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn write_report(cfg: &Config, rep: &Report, title: &str, stamp: &str) -> Result<PathBuf, String> {
    let dir = cfg.results_dir();
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let md = rep.markdown(title);
    let p = dir.join(format!("{stamp}.md"));
    std::fs::write(&p, &md).map_err(|e| e.to_string())?;
    let _ = std::fs::write(dir.join("latest.md"), &md);
    Ok(p)
}

/// Runs the phases on a started lab with binaries pushed.
fn run_phases(run: &mut Run, o: &Opts) {
    let full = !run.quick;
    let phase = |run: &mut Run, name: &str, f: &mut dyn FnMut(&mut Run) -> Result<(), String>| {
        if !o.has(name) {
            return;
        }
        let t = Instant::now();
        if let Err(e) = f(run) {
            run.rep
                .add(section_of(name), format!("{name} (phase)"), St::Fail, e);
        }
        run.rep.time(&format!("phase {name}"), t);
    };
    phase(run, "devtest", &mut |r| {
        let mut pairs = vec![("dom0", "domU1", "domU2"), ("domU1", "domU2", "dom0")];
        if full {
            pairs.push(("domU2", "dom0", "domU1"));
        }
        phase_devtest(r, &pairs)
    });
    phase(run, "matrix", &mut |r| {
        let q = r.quick;
        phase_matrix(r, matrix_cases(q), "matrix")
    });
    phase(run, "kill", &mut phase_kill);
    phase(run, "throughput", &mut phase_throughput);
    phase(run, "qrexec", &mut phase_qrexec);
    phase(run, "mirage", &mut |r| {
        let q = r.quick;
        phase_matrix(r, mirage_cases(q), "mirage-like")
    });
    phase(run, "package", &mut package::phase);
    phase(run, "libxenvchan", &mut libxenvchan::phase);
    phase(run, "cqrexec", &mut cqrexec::phase);
    phase(run, "destroy", &mut phase_destroy);
}

fn section_of(phase: &str) -> &'static str {
    match phase {
        "devtest" => "devtest",
        "matrix" => "matrix",
        "kill" => "kill -9",
        "throughput" => "throughput",
        "qrexec" => "qrexec",
        "destroy" => "xl destroy",
        "mirage" => "mirage-like",
        "package" => "package",
        "libxenvchan" => "libxenvchan",
        "cqrexec" => "C qrexec on Xen",
        _ => "C xenstored",
    }
}

/// `test [--quick] [--keep] [--phases LIST]`.
pub fn test(cfg: &Config, args: &[String]) -> Result<(), String> {
    let o = Opts::parse(args)?;
    let t_all = Instant::now();
    let mut rep = Report::default();
    let stamp = format!(
        "{}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        if o.quick { "quick" } else { "full" }
    );
    rep.notes.push(format!(
        "lab: QEMU {} {} vCPU(s), {} vCPU(s) per domU, {} MiB; xenstored {}; host load at start {}",
        cfg.accel,
        cfg.smp,
        cfg.domu_vcpus,
        cfg.mem,
        cfg.xenstored,
        loadavg()
    ));
    rep.notes.push(format!("phases: {}", o.phases.join(",")));

    let t = Instant::now();
    if nix::unistd::geteuid().is_root() {
        if vm::running_pid(cfg).is_none() {
            setup::setup(cfg, false)?;
        } else {
            rep.notes
                .push("setup skipped: the lab was already running".into());
        }
    } else if cfg.cache.join("dom0.img").exists() {
        rep.notes
            .push("setup skipped: not root, images present".into());
    } else {
        return Err("the lab images are missing and setup needs root".into());
    }
    rep.time("setup", t);

    let t = Instant::now();
    let bins = build_binaries()?;
    rep.time("build (static binaries)", t);

    let t = Instant::now();
    stage_binaries(cfg, &bins)?;
    rep.time("stage binaries", t);

    let t = Instant::now();
    // A boot that fails (QEMU, the guest agent or a domU not coming up in
    // time) is an infrastructure failure: one retry. Failed cases are not
    // retried.
    let was_running = vm::running_pid(cfg).is_some();
    let guard = match vm::start(cfg) {
        Ok(g) => g,
        // (Never stop a lab this run did not start.)
        Err(e) if !was_running => {
            eprintln!("lab test: the boot failed, retrying once: {e}");
            rep.notes.push(format!(
                "the first boot failed and was retried: {}",
                first_line(&e)
            ));
            vm::stop(cfg)?;
            vm::start(cfg)?
        }
        Err(e) => return Err(e),
    };
    rep.time("start", t);
    let owned = guard.owns();
    if !owned {
        rep.notes
            .push("the lab was already running; this run reuses it and leaves it running".into());
    }

    let logdir = cfg.results_dir().join(&stamp);
    std::fs::create_dir_all(&logdir).map_err(|e| e.to_string())?;
    let lab = Lab::attach(cfg)?;
    let t = Instant::now();
    ensure_binaries(&lab, &bins)?;
    rep.time("push (only where stale)", t);
    let mut run = Run {
        lab,
        quick: o.quick,
        xenstored: cfg.xenstored.clone(),
        logdir: logdir.clone(),
        next_port: 1000 + std::process::id() % 20_000 * 2,
        rep,
        ids: Default::default(),
        wrap: None,
        ours_bin: "vchan-peer".into(),
    };
    run_phases(&mut run, &o);

    if o.has("cxenstored") && cfg.xenstored != "c" {
        let t = Instant::now();
        let r = cxenstored_run(cfg, &guard, &mut run, &bins);
        if let Err(e) = r {
            run.rep
                .add("C xenstored", "cxenstored (phase)", St::Fail, e);
        }
        run.rep.time("phase cxenstored (reboot + checks)", t);
    }

    let mut rep = run.rep;
    let t = Instant::now();
    if o.keep {
        guard.disarm();
        rep.notes.push("--keep: QEMU left running".into());
    } else if guard.owns() {
        guard.stop_now()?;
        rep.time("stop", t);
    }
    rep.time("total", t_all);
    rep.notes.push(format!("host load at end {}", loadavg()));
    if !o.keep && owned {
        let still = vm::running_pid(cfg).is_some();
        rep.add(
            "lab",
            "QEMU stopped at the end",
            if still { St::Fail } else { St::Pass },
            "",
        );
    }
    let title = format!(
        "Xen lab test ({}), {}",
        if o.quick { "quick" } else { "full" },
        stamp
    );
    let p = write_report(cfg, &rep, &title, &stamp)?;
    println!("{}", rep.markdown(&title));
    eprintln!(
        "lab test: report {} (logs in {})",
        p.display(),
        logdir.display()
    );
    let fails = rep.count(St::Fail);
    if fails == 0 {
        Ok(())
    } else {
        Err(format!("{fails} check(s) failed; see {}", p.display()))
    }
}

/// The full run's second boot, with C xenstored.
fn cxenstored_run(
    cfg: &Config,
    guard: &vm::Guard,
    run: &mut Run,
    bins: &[PathBuf],
) -> Result<(), String> {
    if !guard.owns() {
        return Err("the lab was already running; not rebooting it for C xenstored".into());
    }
    guard.stop_now()?;
    let mut c = cfg.clone();
    c.xenstored = "c".into();
    let g2 = vm::start(&c)?;
    let lab = Lab::attach(&c)?;
    ensure_binaries(&lab, bins)?;
    let prev = std::mem::replace(&mut run.lab, lab);
    run.ids.borrow_mut().clear();
    let prev_xs = std::mem::replace(&mut run.xenstored, "c".into());
    let r = (|| {
        let before = run.rep.rows.len();
        phase_devtest(
            run,
            &[("dom0", "domU1", "domU2"), ("domU1", "domU2", "dom0")],
        )?;
        let cases: Vec<Xfer> = matrix_cases(true)
            .into_iter()
            .filter(|x| x.ring_kib >= 4)
            .collect();
        phase_matrix(run, cases, "matrix")?;
        phase_destroy(run)?;
        for r in &mut run.rep.rows[before..] {
            r.section = "C xenstored";
        }
        Ok(())
    })();
    run.lab = prev;
    run.ids.borrow_mut().clear();
    run.xenstored = prev_xs;
    g2.stop_now()?;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peer_output() {
        let s =
            "received 1048576 bytes (1.0 MiB) in 4.859 s = 0.21 MiB/s; checksum=a93d8089f2d982f8\n";
        assert_eq!(checksum_of(s).as_deref(), Some("a93d8089f2d982f8"));
        assert_eq!(rate_of(s), Some(0.21));
        let d = parse_devtest("# x\nok - xs-basic (0.1s)\nnot ok - gnt-ro: RW map: boom\n");
        assert_eq!(d[0], ("xs-basic".to_string(), true, String::new()));
        assert_eq!(
            d[1],
            ("gnt-ro".to_string(), false, "RW map: boom".to_string())
        );
    }

    #[test]
    fn phases_parse() {
        let o = Opts::parse(&["--quick".into()]).unwrap();
        assert!(o.quick && o.has("matrix") && !o.has("cxenstored"));
        assert!(o.has("libxenvchan") && o.has("cqrexec") && !o.has("package"));
        let o = Opts::parse(&[]).unwrap();
        assert!(o.has("cxenstored") && o.has("libxenvchan") && o.has("cqrexec"));
        let o = Opts::parse(&["--phases".into(), "devtest,kill".into()]).unwrap();
        assert!(o.has("kill") && !o.has("matrix"));
        assert!(Opts::parse(&["--phases".into(), "nope".into()]).is_err());
    }
}
