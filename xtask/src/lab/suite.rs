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
                .filter(|p| !(o.quick && **p == "cxenstored"))
                .map(|p| p.to_string())
                .collect();
        }
        Ok(o)
    }

    fn has(&self, p: &str) -> bool {
        self.phases.iter().any(|x| x == p)
    }
}

// ---------------------------------------------------------------------------
// the report

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Pass,
    Fail,
    Info,
    Skip,
}

impl St {
    fn word(self) -> &'static str {
        match self {
            St::Pass => "PASS",
            St::Fail => "FAIL",
            St::Info => "info",
            St::Skip => "skip",
        }
    }
}

#[derive(Debug)]
struct Row {
    section: &'static str,
    name: String,
    st: St,
    detail: String,
}

#[derive(Debug)]
struct Tput {
    ring_kib: u32,
    dir: &'static str,
    /// Best receiver rate for (sender, receiver) = (C, C), (ours, ours),
    /// (C, ours), (ours, C).
    rates: [Option<f64>; 4],
}

#[derive(Debug, Default)]
struct Report {
    rows: Vec<Row>,
    /// How many rows there were at the last `time` (the phase summary
    /// counts the rows since).
    rows_timed: usize,
    timings: Vec<(String, f64)>,
    tput: Vec<Tput>,
    notes: Vec<String>,
}

impl Report {
    fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        st: St,
        detail: impl Into<String>,
    ) {
        let r = Row {
            section,
            name: name.into(),
            st,
            detail: detail.into(),
        };
        eprintln!(
            "lab test: {:4} {} {}: {}",
            r.st.word(),
            r.section,
            r.name,
            first_line(&r.detail)
        );
        self.rows.push(r);
    }

    fn time(&mut self, step: &str, t: Instant) {
        let s = t.elapsed().as_secs_f64();
        // One line per step; a step that checked something also says how
        // it went, so a long run can be followed without the full report.
        let new = &self.rows[self.rows_timed.min(self.rows.len())..];
        let n = |st: St| new.iter().filter(|r| r.st == st).count();
        let counts = if new.is_empty() {
            String::new()
        } else {
            format!(
                ", {} passed, {} failed, {} info, {} skipped; {} of {} failed so far",
                n(St::Pass),
                n(St::Fail),
                n(St::Info),
                n(St::Skip),
                self.count(St::Fail),
                self.rows.len()
            )
        };
        self.rows_timed = self.rows.len();
        eprintln!("lab test: [{step}: {s:.1}s{counts}]");
        self.timings.push((step.to_string(), s));
    }

    fn count(&self, st: St) -> usize {
        self.rows.iter().filter(|r| r.st == st).count()
    }

    fn markdown(&self, title: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# {title}\n");
        let _ = writeln!(
            s,
            "**{} passed, {} failed**, {} informational, {} skipped.\n",
            self.count(St::Pass),
            self.count(St::Fail),
            self.count(St::Info),
            self.count(St::Skip)
        );
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        let _ = writeln!(s, "\n## Timings\n\n| step | seconds |\n|---|---:|");
        for (k, v) in &self.timings {
            let _ = writeln!(s, "| {k} | {v:.1} |");
        }
        let mut sections: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !sections.contains(&r.section) {
                sections.push(r.section);
            }
        }
        for sec in sections {
            let _ = writeln!(s, "\n## {sec}\n\n| case | result | detail |\n|---|---|---|");
            for r in self.rows.iter().filter(|r| r.section == sec) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    r.name,
                    r.st.word(),
                    first_line(&r.detail).replace('|', "\\|")
                );
            }
        }
        if !self.tput.is_empty() {
            let _ = writeln!(
                s,
                "\n## Throughput (receiver's MiB/s, best run; domU1 server, domU2 client)\n\n\
                 `ours/C` compares ours→ours with C→C; `recv` compares C→ours with C→C (our\n\
                 receive path alone), `send` ours→C with C→C (our send path alone). Both peers\n\
                 generate the same xorshift64 stream and hash it with the same word-wise FNV.\n\n\
                 | ring | direction | C→C | ours→ours | C→ours | ours→C | ours/C | recv | send |\n\
                 |---|---|---:|---:|---:|---:|---:|---:|---:|"
            );
            for t in &self.tput {
                let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                    _ => "-".into(),
                };
                let r = &t.rates;
                let _ = writeln!(
                    s,
                    "| {} KiB | {} | {} | {} | {} | {} | {} | {} | {} |",
                    t.ring_kib,
                    t.dir,
                    f(r[0]),
                    f(r[1]),
                    f(r[2]),
                    f(r[3]),
                    ratio(r[1], r[0]),
                    ratio(r[2], r[0]),
                    ratio(r[3], r[0])
                );
            }
        }
        let fails: Vec<&Row> = self.rows.iter().filter(|r| r.st == St::Fail).collect();
        if !fails.is_empty() {
            let _ = writeln!(s, "\n## Failure details\n");
            for r in fails {
                let _ = writeln!(
                    s,
                    "### {} / {}\n\n```\n{}\n```\n",
                    r.section,
                    r.name,
                    r.detail.trim()
                );
            }
        }
        s
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

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
        match (imp, server) {
            (Impl::Ours, true) => format!(
                "/mnt/host/vchan-peer server {peer} {port} {dir} {mib} {ring_kib} --timeout {wait}{}",
                packet.map_or(String::new(), |p| format!(" --packet {p}"))
            ),
            (Impl::Ours, false) => format!(
                "/mnt/host/vchan-peer client {peer} {port} {dir} {mib} --timeout {wait}{}",
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
            (Impl::CLib, false) => {
                format!(
                    "env VCHAN_WAIT={wait} /mnt/host/vchan-node-ours client {peer} {port} {dir} {mib}"
                )
            }
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
// phase: devtest

fn parse_devtest(out: &str) -> Vec<(String, bool, String)> {
    let mut v = Vec::new();
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix("ok - ") {
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            v.push((name, true, String::new()));
        } else if let Some(rest) = l.strip_prefix("not ok - ") {
            let (name, why) = rest.split_once(": ").unwrap_or((rest, ""));
            v.push((name.to_string(), false, why.to_string()));
        }
    }
    v
}

fn phase_devtest(run: &mut Run, pairs: &[(&str, &str, &str)]) -> Result<(), String> {
    for &(a, b, third) in pairs {
        let (ia, ib, it) = (run.id(a)?, run.id(b)?, run.id(third)?);
        let tag = format!("t{}x{}", std::process::id(), run.port());
        let xs = &run.xenstored;
        let common = format!("{tag} --third {it} --xenstored {xs}");
        run.bg(
            a,
            "dta",
            &format!("/mnt/host/xen-devtest a {ib} {common}"),
            600,
        )?;
        let bout = run.on(
            b,
            &format!("timeout 600 /mnt/host/xen-devtest b {ia} {common} 2>&1"),
            Duration::from_secs(630),
        )?;
        let (arc, aout) = run.collect(a, "dta", 120)?;
        let pair = format!("{a}(a)↔{b}(b)");
        run.save_log(
            &format!("devtest-{a}-{b}"),
            &format!(
                "== a in {a} (rc {arc:?})\n{aout}\n== b in {b} (rc {})\n{}",
                bout.code,
                bout.all()
            ),
        );
        let ra = parse_devtest(&aout);
        let rb = parse_devtest(&bout.all());
        let mut names: Vec<String> = ra.iter().chain(rb.iter()).map(|r| r.0.clone()).collect();
        names.dedup();
        let mut seen = Vec::new();
        for n in names {
            if seen.contains(&n) {
                continue;
            }
            seen.push(n.clone());
            let fa = ra.iter().find(|r| r.0 == n);
            let fb = rb.iter().find(|r| r.0 == n);
            let notes: Vec<String> = aout
                .lines()
                .chain(bout.stdout.lines())
                .filter_map(|l| l.strip_prefix(&format!("# {n}: ")).map(String::from))
                .collect();
            match (fa, fb) {
                (Some((_, true, _)), Some((_, true, _))) => {
                    run.rep
                        .add("devtest", format!("{pair} {n}"), St::Pass, notes.join("; "))
                }
                _ => {
                    let why = |side: &str, f: Option<&(String, bool, String)>| match f {
                        Some((_, true, _)) => format!("{side}: ok"),
                        Some((_, false, w)) => format!("{side}: {w}"),
                        None => format!("{side}: did not report"),
                    };
                    run.rep.add(
                        "devtest",
                        format!("{pair} {n}"),
                        St::Fail,
                        format!("{}; {}", why("a", fa), why("b", fb)),
                    )
                }
            }
        }
        if ra.is_empty() || rb.is_empty() || arc.is_none() {
            run.rep.add(
                "devtest",
                format!("{pair} (run)"),
                St::Fail,
                format!("a rc {arc:?}, b rc {}:\n{aout}\n{}", bout.code, bout.all()),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// phase: matrix

const SIZES: [u32; 4] = [1, 4, 64, 1024];
const PAIRINGS: [(Impl, Impl); 3] = [
    (Impl::Ours, Impl::C),
    (Impl::C, Impl::Ours),
    (Impl::Ours, Impl::Ours),
];
const DOM_PAIRS: [(&str, &str); 2] = [("dom0", "domU1"), ("domU1", "domU2")];

/// Odd packet sizes (wrap-around, hash carry) that fit the smaller ring.
fn packet_for(ring_kib: u32) -> usize {
    match ring_kib {
        1 => 509,
        4 => 1531,
        64 => 24571,
        _ => 393_209,
    }
}

fn mib_for(ring_kib: u32, quick: bool) -> u32 {
    match (ring_kib, quick) {
        (1, _) => 1,
        (4, _) => 2,
        (64, true) => 4,
        (64, false) => 8,
        (_, true) => 16,
        (_, false) => 32,
    }
}

/// The matrix. Full: every pairing × domain pair × ring × mode (48), with
/// the server's domain and the direction varied so that each (pairing,
/// domain pair) has each of the four (server side, direction)
/// combinations twice. Quick: per (pairing, domain pair) two cases, one
/// stream and one packet, with the ring sizes rotated so that each size
/// appears three times and with each pairing on both domain pairs (12).
fn matrix_cases(quick: bool) -> Vec<Xfer> {
    let mut v = Vec::new();
    for (pi, &(server, client)) in PAIRINGS.iter().enumerate() {
        for (di, &(d0, d1)) in DOM_PAIRS.iter().enumerate() {
            for (si, &ring) in SIZES.iter().enumerate() {
                for packet in [false, true] {
                    let mi = usize::from(packet);
                    if quick {
                        // two sizes per (pairing, domain pair), rotating
                        let k = (pi * 2 + di) * 2 + mi;
                        if si != k % 4 {
                            continue;
                        }
                    }
                    let srv_first = (si + mi) % 2 == 0;
                    let server_sends = (si / 2 + mi + di) % 2 == 0;
                    let (sd, cd) = if srv_first { (d0, d1) } else { (d1, d0) };
                    v.push(Xfer {
                        server_dom: sd.into(),
                        client_dom: cd.into(),
                        server,
                        client,
                        ring_kib: ring,
                        mib: mib_for(ring, quick),
                        server_sends,
                        packet: packet.then(|| packet_for(ring)),
                    });
                }
            }
        }
    }
    v
}

/// Our ocaml-vchan-like peer against the C libxenvchan: both roles, every
/// ring size (with 1 and 2 KiB, where ocaml-vchan's order choice differs
/// from libxenvchan's), stream and packet, on domU1↔domU2 and
/// dom0↔domU1 alternately (20 cases; quick: 10, one mode per size and
/// role).
fn mirage_cases(quick: bool) -> Vec<Xfer> {
    let mut v = Vec::new();
    for (pi, &(server, client)) in [(Impl::Mirage, Impl::C), (Impl::C, Impl::Mirage)]
        .iter()
        .enumerate()
    {
        for (si, &ring) in [1u32, 2, 4, 64, 1024].iter().enumerate() {
            for packet in [false, true] {
                let mi = usize::from(packet);
                if quick && (si + pi) % 2 != mi {
                    continue;
                }
                let (sd, cd) = if (si + mi) % 2 == 0 {
                    ("domU1", "domU2")
                } else {
                    ("dom0", "domU1")
                };
                v.push(Xfer {
                    server_dom: sd.into(),
                    client_dom: cd.into(),
                    server,
                    client,
                    ring_kib: ring,
                    mib: mib_for(if ring == 2 { 1 } else { ring }, quick),
                    server_sends: (si + pi) % 2 == 0,
                    packet: packet.then(|| packet_for(if ring == 2 { 1 } else { ring })),
                });
            }
        }
    }
    v
}

fn xfer_name(x: &Xfer) -> String {
    format!(
        "srv {}@{} / cli {}@{} | {} KiB | {} | {} | {} MiB",
        x.server.name(),
        x.server_dom,
        x.client.name(),
        x.client_dom,
        x.ring_kib,
        if x.packet.is_some() {
            "packet"
        } else {
            "stream"
        },
        if x.server_sends {
            "srv→cli"
        } else {
            "cli→srv"
        },
        x.mib
    )
}

fn phase_matrix(run: &mut Run, cases: Vec<Xfer>, section: &'static str) -> Result<(), String> {
    for x in cases {
        let name = xfer_name(&x);
        let r = run.xfer(&x)?;
        run.save_log(&format!("{section}-{name}"), &r.log);
        run.rep.add(
            section,
            name,
            if r.ok { St::Pass } else { St::Fail },
            r.detail,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// phase: kill -9 mid-transfer

fn phase_kill(run: &mut Run) -> Result<(), String> {
    let pairs: &[(&str, &str)] = if run.quick {
        &[("dom0", "domU1")]
    } else {
        &[("dom0", "domU1"), ("domU1", "domU2")]
    };
    for &(sdom, vdom) in pairs {
        for survivor in [Impl::C, Impl::Ours] {
            for victim_server in [false, true] {
                for victim_sends in [true, false] {
                    // Quick: C survivor of a sending victim (server and
                    // client), our survivor of a receiving client and of a
                    // sending server.
                    const QUICK: [(Impl, bool, bool); 4] = [
                        (Impl::C, false, true),
                        (Impl::C, true, true),
                        (Impl::Ours, false, false),
                        (Impl::Ours, true, true),
                    ];
                    if run.quick && !QUICK.contains(&(survivor, victim_server, victim_sends)) {
                        continue;
                    }
                    kill_case(run, sdom, survivor, vdom, victim_server, victim_sends)?;
                }
            }
        }
    }
    Ok(())
}

fn kill_case(
    run: &mut Run,
    sdom: &str,
    survivor: Impl,
    vdom: &str,
    victim_server: bool,
    victim_sends: bool,
) -> Result<(), String> {
    let port = run.port();
    let (sid, vid) = (run.id(sdom)?, run.id(vdom)?);
    let mib = 100_000;
    let scmd = run.peer_cmd(
        survivor,
        !victim_server,
        sdom,
        vid,
        port,
        !victim_sends,
        mib,
        64,
        None,
        120,
    );
    let vcmd = run.peer_cmd(
        Impl::Ours,
        victim_server,
        vdom,
        sid,
        port,
        victim_sends,
        mib,
        64,
        None,
        120,
    );
    let name = format!(
        "our {} in {vdom} ({}) killed; survivor {} {} in {sdom}",
        if victim_server { "server" } else { "client" },
        if victim_sends { "sending" } else { "receiving" },
        survivor.name(),
        if victim_server { "client" } else { "server" },
    );
    // Server first, then the client.
    if victim_server {
        run.bg(vdom, "vic", &vcmd, 300)?;
        run.bg(sdom, "sur", &scmd, 300)?;
    } else {
        run.bg(sdom, "sur", &scmd, 300)?;
        run.bg(vdom, "vic", &vcmd, 300)?;
    }
    let k = run.on(
        vdom,
        "i=0; while ! grep -q connected /tmp/lab-vic.log && [ $i -lt 450 ]; do sleep 0.2; i=$((i+1)); done; \
         sleep 2; date +%s > /tmp/lab-vic.killed; kill -9 $(cat /tmp/lab-vic.pid); cat /tmp/lab-vic.killed; cat /tmp/lab-vic.log",
        Duration::from_secs(150),
    )?;
    let killed_at: Option<u64> = k.stdout.lines().next().and_then(|l| l.trim().parse().ok());
    let (rc, out) = run.collect(sdom, "sur", 60)?;
    let end = run
        .on(
            sdom,
            "cat /tmp/lab-sur.end 2>/dev/null",
            Duration::from_secs(30),
        )?
        .stdout
        .trim()
        .parse::<u64>()
        .ok();
    let took = match (killed_at, end) {
        (Some(k), Some(e)) => format!("{}s", e.saturating_sub(k)),
        _ => "?".into(),
    };
    let log = format!(
        "victim: {vcmd}\n{}\nsurvivor: {scmd}\n{out}\n[survivor rc {rc:?}]",
        k.all()
    );
    run.save_log(&format!("kill-{name}"), &log);
    let connected = k.all().contains("connected");
    let (st, detail) = match rc {
        _ if !connected => (St::Fail, format!("the victim never connected\n{log}")),
        Some(c) if (1..124).contains(&c) => (
            St::Pass,
            format!(
                "survivor ended after ~{took} with rc {c}: {}",
                last_line(&out)
            ),
        ),
        Some(c) => (
            St::Fail,
            format!("survivor rc {c} after ~{took}: {}\n{log}", last_line(&out)),
        ),
        None => (
            St::Fail,
            format!("survivor still running 60s after the kill\n{log}"),
        ),
    };
    // The survivor must not outlive the case.
    let _ = run.on(
        sdom,
        "kill -9 $(cat /tmp/lab-sur.pid) 2>/dev/null; true",
        Duration::from_secs(30),
    );
    run.rep.add("kill -9", name, st, detail);
    Ok(())
}

// ---------------------------------------------------------------------------
// phase: throughput

fn phase_throughput(run: &mut Run) -> Result<(), String> {
    let reps = if run.quick { 1 } else { 3 };
    // (sender, receiver): ours against ours, and each of our halves alone
    // against the C peer (C→ours: our receive path, ours→C: our send
    // path), all beside C→C.
    let combos: &[(Impl, Impl)] = &[
        (Impl::C, Impl::C),
        (Impl::Ours, Impl::Ours),
        (Impl::C, Impl::Ours),
        (Impl::Ours, Impl::C),
    ];
    for ring in [64u32, 1024] {
        for server_sends in [true, false] {
            // At least ~1 s per transfer at the rates seen here (15-25
            // MiB/s with 64 KiB rings, 70-180 with 1 MiB): shorter ones
            // mostly measure the start-up.
            let mib = match (ring, run.quick) {
                (64, true) => 24,
                (64, false) => 48,
                (_, true) => 128,
                (_, false) => 256,
            };
            let mut best = [None::<f64>; 4];
            for _ in 0..reps {
                for (i, &(sender, receiver)) in combos.iter().enumerate() {
                    let (server, client) = if server_sends {
                        (sender, receiver)
                    } else {
                        (receiver, sender)
                    };
                    let x = Xfer {
                        server_dom: "domU1".into(),
                        client_dom: "domU2".into(),
                        server,
                        client,
                        ring_kib: ring,
                        mib,
                        server_sends,
                        packet: None,
                    };
                    let r = run.xfer(&x)?;
                    let name = xfer_name(&x);
                    run.save_log(&format!("throughput-{name}"), &r.log);
                    if r.ok {
                        if let Some(rate) = r.rate {
                            best[i] = Some(best[i].map_or(rate, |b: f64| b.max(rate)));
                        }
                    } else {
                        run.rep.add("throughput", name, St::Fail, r.detail);
                    }
                }
            }
            let dir = if server_sends {
                "server→client"
            } else {
                "client→server"
            };
            let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
            let ratio = match best {
                [Some(c), Some(o), ..] if c > 0.0 => format!("{:.2}", o / c),
                _ => "-".into(),
            };
            run.rep.add(
                "throughput",
                format!("{ring} KiB {dir}"),
                St::Info,
                format!(
                    "C→C {}, ours→ours {}, C→ours {}, ours→C {} MiB/s; ours/C {ratio}",
                    f(best[0]),
                    f(best[1]),
                    f(best[2]),
                    f(best[3])
                ),
            );
            run.rep.tput.push(Tput {
                ring_kib: ring,
                dir,
                rates: best,
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// phase: qrexec (qrexec-client-vm, qubes-sim agents and daemons on Xen)

#[path = "qrexec.rs"]
mod qrexec;

#[path = "libxenvchan.rs"]
mod libxenvchan;

#[path = "cqrexec.rs"]
mod cqrexec;

fn phase_qrexec(run: &mut Run) -> Result<(), String> {
    qrexec::phase(run)
}

// ---------------------------------------------------------------------------
// phase: xl destroy

/// One background process for the destroy phase.
struct Survivor {
    name: &'static str,
    dom: &'static str,
    ours: bool,
    what: &'static str,
    /// It maps pages that domU2 granted (a client of a server in domU2):
    /// while it does, the destroyed domU2 lingers as a zombie and the
    /// event-channel probe still finds it.
    maps_dead: bool,
}

fn phase_destroy(run: &mut Run) -> Result<(), String> {
    let (i0, i1, i2) = (run.id("dom0")?, run.id("domU1")?, run.id("domU2")?);
    let _ = i0;
    let p: Vec<u32> = (0..7).map(|_| run.port()).collect();
    let big = 100_000;
    let lim = 400;
    let ours = |role: &str, peer: u16, port: u32, dir: &str, w: u64| {
        let ring = if role == "server" { " 64" } else { "" };
        format!("/mnt/host/vchan-peer {role} {peer} {port} {dir} {big}{ring} --timeout {w}")
    };
    // Survivors (dom0 and domU1) and their peers in domU2.
    let survivors = [
        Survivor {
            name: "w0",
            dom: "dom0",
            ours: true,
            what: "our server in dom0 waiting for a client from domU2",
            maps_dead: false,
        },
        Survivor {
            name: "w1",
            dom: "domU1",
            ours: true,
            what: "our server in domU1 waiting for a client from domU2",
            maps_dead: false,
        },
        Survivor {
            name: "x0",
            dom: "dom0",
            ours: true,
            what: "our server in dom0 sending to C client in domU2",
            maps_dead: false,
        },
        Survivor {
            name: "x1",
            dom: "domU1",
            ours: true,
            what: "our client in domU1 receiving from C server in domU2",
            maps_dead: true,
        },
        Survivor {
            name: "y1",
            dom: "domU1",
            ours: true,
            what: "our server in domU1 receiving from our client in domU2",
            maps_dead: false,
        },
        Survivor {
            name: "c0",
            dom: "dom0",
            ours: false,
            what: "C server in dom0 sending to our client in domU2",
            maps_dead: false,
        },
        Survivor {
            name: "c1",
            dom: "domU1",
            ours: false,
            what: "C client in domU1 receiving from our server in domU2",
            maps_dead: true,
        },
    ];
    // Servers first.
    run.bg("dom0", "w0", &ours("server", i2, p[0], "recv", 600), lim)?;
    run.bg("dom0", "x0", &ours("server", i2, p[2], "send", 600), lim)?;
    run.bg(
        "dom0",
        "c0",
        &format!("vchan-node server {i2} {} send {big} 64", p[5]),
        lim,
    )?;
    run.bg("domU1", "w1", &ours("server", i2, p[1], "recv", 600), lim)?;
    run.bg("domU1", "y1", &ours("server", i2, p[4], "recv", 600), lim)?;
    // domU2: the peers.
    let c2 = c_bin("domU2");
    let peers = format!(
        "( env VCHAN_WAIT=120 {c2} client 0 {px0} recv {big} > /tmp/p-x0.log 2>&1 & ); \
         ( {c2} server {i1} {px1} send {big} 64 > /tmp/p-x1.log 2>&1 & ); \
         ( {y1} > /tmp/p-y1.log 2>&1 & ); ( {c0} > /tmp/p-c0.log 2>&1 & ); ( {c1} > /tmp/p-c1.log 2>&1 & ); true",
        px0 = p[2],
        px1 = p[3],
        y1 = ours("client", i1, p[4], "send", 120),
        c0 = ours("client", 0, p[5], "recv", 120),
        c1 = ours("server", i1, p[6], "send", 600),
    );
    let r = run.on("domU2", &peers, Duration::from_secs(60))?;
    if !r.ok() {
        return Err(format!("starting the domU2 peers: {}", r.all()));
    }
    run.bg("domU1", "x1", &ours("client", i2, p[3], "recv", 120), lim)?;
    run.bg(
        "domU1",
        "c1",
        &format!(
            "env VCHAN_WAIT=120 {} client {i2} {} recv {big}",
            c_bin("domU1"),
            p[6]
        ),
        lim,
    )?;
    // Wait until the connected ones are connected.
    for (dom, names) in [("dom0", "x0 c0"), ("domU1", "x1 y1 c1")] {
        let r = run.on(
            dom,
            &format!(
                "for n in {names}; do i=0; while ! grep -q connected /tmp/lab-$n.log && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done; done; \
                 for n in {names}; do grep -q connected /tmp/lab-$n.log && echo \"$n connected\" || echo \"$n NOT connected\"; done"
            ),
            Duration::from_secs(200),
        )?;
        eprint!("{}", r.all());
    }
    let probe = |run: &Run, when: &str| -> Result<Vec<(String, String)>, String> {
        let mut v = Vec::new();
        for dom in ["dom0", "domU1"] {
            let r = run.on(
                dom,
                &format!("/mnt/host/xen-devtest probe-peer {i2} 2>&1"),
                Duration::from_secs(60),
            )?;
            v.push((format!("{dom} {when}"), r.all().trim().replace('\n', "; ")));
        }
        Ok(v)
    };
    for dom in ["dom0", "domU1"] {
        run.bg(dom, "rel", "/mnt/host/xen-devtest watch-release 240", 300)?;
    }
    let before = probe(run, "before")?;
    std::thread::sleep(Duration::from_secs(2));
    let d = run.on(
        "dom0",
        "date +%s; xl destroy domU2; echo rc=$?",
        Duration::from_secs(120),
    )?;
    let destroyed_at: Option<u64> = d.stdout.lines().next().and_then(|l| l.trim().parse().ok());
    run.rep.notes.push(format!(
        "destroy phase: `xl destroy domU2` at {} ({})",
        destroyed_at.map_or("?".into(), |t| t.to_string()),
        last_line(&d.all())
    ));
    let after = probe(run, "after")?;
    for (k, v) in before.into_iter().chain(after) {
        run.rep.add(
            "xl destroy",
            format!("{k} the destroy: what it can learn of domU2 (dom{i2})"),
            St::Info,
            v,
        );
    }
    let deadline = 40;
    // After this long, the survivors that still map domU2's pages (and so
    // keep it as a zombie, which every domain's event-channel probe still
    // finds) are killed; the others must then end by the deadline.
    let first = 15;
    for dom in ["dom0", "domU1"] {
        let mine: Vec<&Survivor> = survivors.iter().filter(|s| s.dom == dom).collect();
        let all: Vec<&str> = mine.iter().map(|s| s.name).collect();
        let ours: Vec<&str> = mine.iter().filter(|s| s.ours).map(|s| s.name).collect();
        let blockers: Vec<&str> = mine
            .iter()
            .filter(|s| s.maps_dead)
            .map(|s| s.name)
            .collect();
        let rest: Vec<&str> = mine
            .iter()
            .filter(|s| s.ours && !s.maps_dead)
            .map(|s| s.name)
            .collect();
        // Wait for our survivors (they must end); kill the zombie keepers
        // still running after `first` s; wait for the rest; then report
        // everyone and kill what is left.
        let wait = |names: &[&str], ticks: u64| {
            format!(
                "t=0; while [ $t -lt {ticks} ]; do done=1; for n in {names}; do [ -s /tmp/lab-$n.rc ] || done=0; done; \
                 [ $done = 1 ] && break; sleep 0.5; t=$((t+1)); done; ",
                names = names.join(" ")
            )
        };
        let kill_keepers = if blockers.is_empty() {
            String::new()
        } else {
            format!(
                "for n in {}; do [ -s /tmp/lab-$n.rc ] || {{ echo \"@@$n zombie-keeper killed at $(date +%s)\"; kill -9 $(cat /tmp/lab-$n.pid) 2>/dev/null; }}; done; ",
                blockers.join(" ")
            )
        };
        let script = format!(
            "{w1}{kill_keepers}{w2}sleep 1; \
             for n in {all}; do echo \"@@$n rc=$(cat /tmp/lab-$n.rc 2>/dev/null || echo running) end=$(cat /tmp/lab-$n.end 2>/dev/null || echo -)\"; \
             sed \"s/^/@@$n: /\" /tmp/lab-$n.log | tail -n 20; kill -9 $(cat /tmp/lab-$n.pid) 2>/dev/null; done; echo \"@@killed=$(date +%s)\"; true",
            w1 = wait(&ours, first * 2),
            w2 = wait(&rest, (deadline - first) * 2),
            all = all.join(" "),
        );
        let out = run
            .on(dom, &script, Duration::from_secs(deadline + 90))?
            .all();
        run.save_log(&format!("destroy-{dom}"), &out);
        if let Some(k) = out.lines().find_map(|l| l.strip_prefix("@@killed=")) {
            run.rep.notes.push(format!(
                "destroy phase: the survivors left in {dom} were killed at {k}"
            ));
        }
        for s in mine {
            let head = format!("@@{} rc=", s.name);
            let status = out
                .lines()
                .find_map(|l| l.strip_prefix(&head))
                .unwrap_or("missing end=-");
            let (rc_s, end_s) = status.split_once(" end=").unwrap_or((status, "-"));
            let rc: Option<i32> = rc_s.trim().parse().ok();
            let end: Option<u64> = end_s.trim().parse().ok();
            let prefix = format!("@@{}: ", s.name);
            let log: Vec<&str> = out
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .collect();
            let last = log
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .copied()
                .unwrap_or("");
            let took = match (destroyed_at, end) {
                (Some(a), Some(e)) => format!("~{}s after the destroy", e.saturating_sub(a)),
                _ => "?".into(),
            };
            let was_connected = log.iter().any(|l| l.contains("connected"));
            let connected_expected = !s.name.starts_with('w');
            let keeper_killed = out.contains(&format!("@@{} zombie-keeper killed", s.name));
            // Our client of a server in domU2, in a domU under C xenstored:
            // its own mappings keep domU2 as a zombie (the probe finds it)
            // and xenstore tells a domU nothing there.
            let known_blind = run.xenstored == "c" && s.dom != "dom0" && s.maps_dead;
            let judged = |ok: bool| match (s.ours, ok) {
                (false, _) => St::Info,
                (true, true) => St::Pass,
                (true, false) => St::Fail,
            };
            let (st, detail) = if connected_expected && !was_connected {
                (
                    judged(false),
                    format!("never connected before the destroy: {last}"),
                )
            } else {
                // A killed zombie keeper's rc is the kill's (137).
                let rc = if keeper_killed { None } else { rc };
                match rc {
                    Some(c) if (1..124).contains(&c) => {
                        (judged(true), format!("ended {took}, rc {c}: {last}"))
                    }
                    Some(c) => (judged(false), format!("rc {c} {took}: {last}")),
                    // See `known_blind`: documented in vchan's crate docs,
                    // bounded by the caller's timeouts. Reported, not failed.
                    None if s.ours && known_blind && keeper_killed => (
                        St::Info,
                        format!(
                            "KNOWN LIMITATION (client in a domU under C xenstored: its own \
                             mappings keep the dead server's domain as a zombie): still running \
                             {first}s after the destroy (then killed): {last}"
                        ),
                    ),
                    None if keeper_killed => (
                        judged(false),
                        format!("still running {first}s after the destroy (then killed): {last}"),
                    ),
                    None => (
                        judged(false),
                        format!(
                            "still running {deadline}s after the destroy (then killed): {last}"
                        ),
                    ),
                }
            };
            run.rep.add("xl destroy", s.what, st, detail);
        }
    }
    for dom in ["dom0", "domU1"] {
        // The event may wait for the end of every foreign mapping of the
        // dead domain's pages (our survivors were killed just above).
        let (_, out) = run.collect(dom, "rel", 20)?;
        let _ = run.on(
            dom,
            "kill -9 $(cat /tmp/lab-rel.pid) 2>/dev/null; true",
            Duration::from_secs(30),
        );
        run.rep.add(
            "xl destroy",
            format!("{dom}: @releaseDomain watch during the destroy"),
            St::Info,
            out.trim().replace('\n', "; "),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------

fn build_binaries() -> Result<Vec<PathBuf>, String> {
    let target = crate::util::target_dir().join("lab-static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!(
        "lab test: building static vchan-peer, xen-devtest, qrexec-client-vm, qubes-sim ({})",
        target.display()
    );
    let st = Command::new(cargo)
        .current_dir(crate::util::root())
        .env("CARGO_TARGET_DIR", &target)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=debuginfo",
        )
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "vchan",
            "--bin",
            "vchan-peer",
            "-p",
            "tests",
            "--bin",
            "xen-devtest",
            "-p",
            "qrexec",
            "--bin",
            "qrexec-client-vm",
            "-p",
            "qubes-sim",
            "--bin",
            "qubes-sim",
        ])
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err(format!("cargo build of the lab binaries failed ({st})"));
    }
    let dir = target.join("x86_64-unknown-linux-gnu/release");
    let mut bins: Vec<PathBuf> = ["vchan-peer", "xen-devtest", "qrexec-client-vm", "qubes-sim"]
        .iter()
        .map(|b| dir.join(b))
        .collect();
    bins.extend(super::ourlib::build()?);
    bins.extend(super::cstack::build()?);
    Ok(bins)
}

/// Puts the binaries where the guests find them at boot: the 9p share
/// (dom0's `/mnt/host`) and a cpio archive that `lab-domu create` appends
/// to each domU's initramfs (their `/mnt/host`). Much faster than pushing
/// over a hot-plugged block device afterwards.
fn stage_binaries(cfg: &Config, bins: &[PathBuf]) -> Result<(), String> {
    let share = cfg.share_dir();
    std::fs::create_dir_all(&share).map_err(|e| e.to_string())?;
    let st = cfg.cache.join("stage-extra");
    let _ = std::fs::remove_dir_all(&st);
    let host = st.join("mnt/host");
    std::fs::create_dir_all(&host).map_err(|e| e.to_string())?;
    for b in bins {
        let name = b.file_name().ok_or("bad binary path")?;
        super::guest::copy_replacing(b, &share.join(name))?;
        std::fs::copy(b, host.join(name)).map_err(|e| format!("{}: {e}", b.display()))?;
    }
    let stamp = stamp_of(bins)?;
    for d in [&share, &host] {
        std::fs::write(d.join(STAMP), &stamp).map_err(|e| e.to_string())?;
    }
    // Uncompressed, and put in front of the gzip'd initramfs by lab-domu
    // (the early-microcode layout): appended behind it as a second gzip
    // member it was never unpacked (an empty /mnt/host in the domUs), so
    // every run pushed the binaries over a block device instead.
    let _ = std::fs::remove_file(share.join("domU-extra.cpio.gz"));
    let out = share.join("domU-extra.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . -print0 | cpio --null -o -H newc --quiet > \"$2\"")
        .arg("sh")
        .arg(&st)
        .arg(&out)
        .status()
        .map_err(|e| format!("cpio: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cpio of the domU extras failed ({st})"))
    }
}

fn sha256(p: &std::path::Path) -> Result<String, String> {
    let out = Command::new("sha256sum")
        .arg(p)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(String::from)
        .ok_or_else(|| format!("sha256sum {}: no output", p.display()))
}

/// The file beside the binaries in every guest that names them by hash.
const STAMP: &str = "lab-bins.sha256";

/// `HASH NAME` per binary (hashed here: hashing 10 MB in an emulated domU
/// takes over a minute).
fn stamp_of(bins: &[PathBuf]) -> Result<String, String> {
    let mut s = String::new();
    for b in bins {
        let name = b.file_name().ok_or("bad binary path")?.to_string_lossy();
        let _ = writeln!(s, "{} {name}", sha256(b)?);
    }
    Ok(s)
}

/// Pushes the binaries to the domUs that do not have these very files
/// (a lab that was already running, or domUs made without the archive),
/// as their stamp file says.
fn ensure_binaries(lab: &Lab, bins: &[PathBuf]) -> Result<(), String> {
    let want = stamp_of(bins)?;
    let mut stale = Vec::new();
    for d in lab.running_domus()? {
        let out = lab.domu(
            &d,
            &format!("cat /mnt/host/{STAMP} 2>&1"),
            Duration::from_secs(60),
        )?;
        // (The answer may carry lab-domu's own notes around the file.)
        if !out.stdout.contains(want.trim()) {
            eprintln!(
                "lab: {d} has other binaries: {}",
                out.stdout.trim().replace('\n', " | ")
            );
            stale.push(d);
        }
    }
    if !stale.is_empty() {
        let stamp = lab.cfg().share_dir().join(STAMP);
        std::fs::write(&stamp, &want).map_err(|e| e.to_string())?;
        let mut files = bins.to_vec();
        files.push(stamp);
        lab.push(&files, Some(&stale))?;
    }
    Ok(())
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
    phase(run, "libxenvchan", &mut |r| libxenvchan::phase(r));
    phase(run, "cqrexec", &mut |r| cqrexec::phase(r));
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
        "lab: QEMU {} {} vCPU(s), {} MiB; xenstored {}; host load at start {}",
        cfg.accel,
        cfg.smp,
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
    fn mirage_cases_cover_both_roles_every_size_and_mode() {
        for quick in [false, true] {
            let v = mirage_cases(quick);
            assert_eq!(v.len(), if quick { 10 } else { 20 });
            for ring in [1, 2, 4, 64, 1024] {
                for (s, c) in [(Impl::Mirage, Impl::C), (Impl::C, Impl::Mirage)] {
                    assert!(
                        v.iter()
                            .any(|x| x.ring_kib == ring && x.server == s && x.client == c),
                        "{ring} KiB {s:?}/{c:?} quick={quick}"
                    );
                }
                for packet in [false, true] {
                    assert!(
                        v.iter()
                            .any(|x| x.ring_kib == ring && x.packet.is_some() == packet),
                        "{ring} KiB packet={packet} quick={quick}"
                    );
                }
            }
            assert!(
                v.iter()
                    .all(|x| x.mib <= 32 && x.server_dom != x.client_dom)
            );
        }
    }

    #[test]
    fn quick_matrix_covers_every_pairing_pair_size_and_mode() {
        let q = matrix_cases(true);
        assert_eq!(q.len(), 12);
        for &(s, c) in &PAIRINGS {
            for &(d0, d1) in &DOM_PAIRS {
                let n = q
                    .iter()
                    .filter(|x| x.server == s && x.client == c)
                    .filter(|x| {
                        (x.server_dom == d0 && x.client_dom == d1)
                            || (x.server_dom == d1 && x.client_dom == d0)
                    })
                    .count();
                assert!(n >= 1, "{s:?}/{c:?} on {d0}/{d1}");
            }
        }
        for ring in SIZES {
            assert!(q.iter().any(|x| x.ring_kib == ring), "{ring}");
        }
        assert!(q.iter().any(|x| x.packet.is_some()));
        assert!(q.iter().any(|x| x.packet.is_none()));
        assert!(q.iter().any(|x| x.server_sends));
        assert!(q.iter().any(|x| !x.server_sends));
    }

    #[test]
    fn full_matrix_is_the_whole_product() {
        let f = matrix_cases(false);
        assert_eq!(f.len(), 3 * 2 * 4 * 2);
        // Each (pairing, domain pair) sees each (server side, direction) twice.
        for &(s, c) in &PAIRINGS {
            for &(d0, d1) in &DOM_PAIRS {
                for first in [true, false] {
                    for sends in [true, false] {
                        let n = f
                            .iter()
                            .filter(|x| x.server == s && x.client == c)
                            .filter(|x| x.server_dom == if first { d0 } else { d1 })
                            .filter(|x| x.client_dom == if first { d1 } else { d0 })
                            .filter(|x| x.server_sends == sends)
                            .count();
                        assert_eq!(n, 2, "{s:?}/{c:?} {d0}/{d1} first={first} sends={sends}");
                    }
                }
            }
        }
    }

    #[test]
    fn packets_fit_the_smallest_ring_of_each_size() {
        for ring in SIZES {
            assert!(packet_for(ring) <= ring as usize * 1024);
            assert!(!packet_for(ring).is_multiple_of(8));
        }
    }

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
        let o = Opts::parse(&[]).unwrap();
        assert!(o.has("cxenstored"));
        let o = Opts::parse(&["--phases".into(), "devtest,kill".into()]).unwrap();
        assert!(o.has("kill") && !o.has("matrix"));
        assert!(Opts::parse(&["--phases".into(), "nope".into()]).is_err());
    }
}
