//! The lab's `qrexec` phase: `qrexec-client-vm` on real Xen.
//!
//! The simulated Qubes runs split over the lab's domains, every vchan on
//! `/dev/xen`: a `qubes-sim agent --transport xen` in domU1 and in domU2
//! (agent socket `/run/qrexec-agent`, the control vchan server on port 512
//! for dom0), and in dom0 one `qubes-sim daemon --transport xen` per domU
//! (the control vchan's client) with the policy and the VM list (the real
//! domain ids from `xl domid`) in `/run/qsim/`. `qrexec-client-vm` in domU1
//! then calls services in domU2 (data vchan: the client is the server, the
//! service side the client, on port 513+):
//!
//! | case | checks |
//! |---|---|
//! | `test.Sum`, 100 MiB domU1→domU2 | checksum of what the caller sent = what the service read (domU2's file) = what came back |
//! | `test.Denied` | refused by the policy: exit 126, `Request refused` |
//! | `--buffer-size=1048576 test.Gen+32`, 32 MiB domU2→domU1 | 1 MiB data rings; checksum of what the service sent = what the caller received |
//! | `test.Exit` | the service's exit code 3 and its stdout come through |
//! | `test.Missing` | allowed, no such service: exit 127 |
//!
//! The `package` phase makes the same calls ([`sim_calls`]) from a domU
//! booted from a Debian root file system, with the `qrexec-client-vm` that
//! `dpkg -i` installed there; the `cqrexec` phase makes them ([`calls`])
//! through Qubes' C agents and daemons instead of the simulated ones.

use std::time::{Duration, Instant};

use super::{Run, St};
use crate::lab::guest::b64q;

const SECTION: &str = "qrexec";
/// Where dom0 keeps the daemons' sockets, the policy and the VM list.
const DOM0_DIR: &str = "/run/qsim";
/// The agent socket in each domU.
const AGENT_SOCKET: &str = "/run/qrexec-agent";
/// The service directory in the domUs.
const RPC_DIR: &str = "/run/qrexec-rpc";
/// How long the agents and daemons may live (a safety net: they are
/// stopped at the end of the phase).
const MEMBER_LIMIT: u64 = 1200;

/// The domain whose services are called.
const SERVICE_VM: &str = "domU2";

/// The qrexec policy of the lab: `caller` calls domU2.
fn policy(caller: &str) -> String {
    format!(
        "# qrexec policy of the lab ({caller} calls {SERVICE_VM})\n\
         test.Sum     *  {caller}  {SERVICE_VM}  allow\n\
         test.Gen     *  {caller}  {SERVICE_VM}  allow\n\
         test.Exit    *  {caller}  {SERVICE_VM}  allow\n\
         test.Missing *  {caller}  {SERVICE_VM}  allow\n\
         test.Denied  *  @anyvm @anyvm deny\n\
         *            *  @anyvm @anyvm deny\n"
    )
}

/// Who makes the calls, and with which command.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caller<'a> {
    /// The calling domain (a domU other than domU2).
    pub dom: &'a str,
    /// `qrexec-client-vm` there: a path or a name looked up on `PATH`,
    /// with any options or environment in front (a shell command prefix:
    /// the target and the service follow).
    pub client: &'a str,
    /// The report section of the rows.
    pub section: &'static str,
    /// Put in front of each row's name ("" for none).
    pub what: &'a str,
}

/// The `qrexec` phase's caller: our static binary in domU1.
const LAB_CALLER: Caller<'static> = Caller {
    dom: "domU1",
    client: "/mnt/host/qrexec-client-vm",
    section: SECTION,
    what: "",
};

/// The data: vchan-peer's xorshift64 stream (`gen`), checked with its
/// word-wise FNV (`sum`), both as cheap as in the vchan transfers (busybox's
/// md5sum and tee run well under 1 MiB/s in an emulated domU and were the
/// whole cost of a call).
const PEER: &str = "/mnt/host/vchan-peer";

/// The services, as (name, shell script).
fn services() -> Vec<(&'static str, String)> {
    vec![
        (
            "test.Sum",
            format!(
                "#!/bin/sh\n# checksum of stdin, kept in a file and sent back\n\
                 {PEER} sum | tee /tmp/q-sum.srv\n"
            ),
        ),
        (
            "test.Gen",
            format!(
                "#!/bin/sh\n# $1 MiB to stdout; its checksum kept in a file\n\
                 {PEER} gen $1 | {PEER} sum > /tmp/q-gen.srv\n\
                 exec {PEER} gen $1\n"
            ),
        ),
        (
            "test.Exit",
            "#!/bin/sh\necho out; echo err >&2; exit 3\n".to_string(),
        ),
    ]
}

/// The value after the first line of `text` that starts with `key` (the
/// guest scripts print `@@key=value` lines), trimmed; empty if none.
pub(super) fn marker(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn sum_of(s: &str) -> Option<String> {
    let i = s.find("checksum=")? + "checksum=".len();
    let hex: String = s[i..].chars().take_while(char::is_ascii_hexdigit).collect();
    let bytes = s
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bytes="))?;
    (hex.len() == 16).then(|| format!("{bytes} bytes, {hex}"))
}

/// Runs the phase; the members are stopped on every path.
pub(super) fn phase(run: &mut Run) -> Result<(), String> {
    sim_calls(run, &LAB_CALLER)
}

/// The phase's calls from `caller`'s domain with its command, through the
/// simulated agents (caller, domU2) and daemons (dom0), started before and
/// stopped after.
pub(super) fn sim_calls(run: &mut Run, caller: &Caller) -> Result<(), String> {
    let r = with_sim(run, caller);
    let logs = stop_members(run, caller.dom);
    run.save_log(&format!("qrexec-members-{}", caller.dom), &logs);
    if let Err(e) = &r {
        run.rep.add(
            caller.section,
            format!("{}qrexec calls (phase)", prefix(caller)),
            St::Fail,
            format!("{e}\n\nagents and daemons:\n{logs}"),
        );
    }
    Ok(())
}

/// `what: ` or nothing.
fn prefix(caller: &Caller) -> String {
    if caller.what.is_empty() {
        String::new()
    } else {
        format!("{}: ", caller.what)
    }
}

/// The dom0 daemon's member name for a VM.
fn daemon_name(vm: &str) -> String {
    format!("qd-{vm}")
}

fn stop_members(run: &Run, caller: &str) -> String {
    let daemons = format!("{} {}", daemon_name(caller), daemon_name(SERVICE_VM));
    stop_named(
        run,
        &[
            (caller, "qagent"),
            (SERVICE_VM, "qagent"),
            ("dom0", daemons.as_str()),
        ],
    )
}

/// Stops the background members (`run.bg` names) in each domain: TERM,
/// a second, KILL; returns the tail of each one's log with its exit code.
pub(super) fn stop_named(run: &Run, members: &[(&str, &str)]) -> String {
    let mut logs = String::new();
    for &(dom, names) in members {
        let out = run
            .on(
                dom,
                &format!(
                    "for n in {names}; do kill $(cat /tmp/lab-$n.pid) 2>/dev/null; done; sleep 1; \
                     for n in {names}; do kill -9 $(cat /tmp/lab-$n.pid) 2>/dev/null; \
                     echo \"== $n in {dom} (rc $(cat /tmp/lab-$n.rc 2>/dev/null || echo running))\"; \
                     tail -n 40 /tmp/lab-$n.log; done; true"
                ),
                Duration::from_secs(60),
            )
            .map(|o| o.all())
            .unwrap_or_else(|e| format!("{dom}: {e}\n"));
        logs.push_str(&out);
    }
    logs
}

/// Writes the services into [`RPC_DIR`] in domU2 (the caller's domain gets
/// the same directory, empty).
pub(super) fn install_services(run: &Run, caller: &str) -> Result<(), String> {
    let (c, v) = (caller, SERVICE_VM);
    let mut setup = format!("rm -rf {RPC_DIR} && mkdir -p {RPC_DIR} && cd {RPC_DIR}");
    for (name, body) in services() {
        setup.push_str(&format!(
            " && printf '%s' {} > {name} && chmod 755 {name}",
            b64q(&body)
        ));
    }
    for (dom, script) in [(c, format!("mkdir -p {RPC_DIR}")), (v, setup)] {
        let r = run.on(dom, &script, Duration::from_secs(60))?;
        if !r.ok() {
            return Err(format!("service setup in {dom}: {}", r.all()));
        }
    }
    Ok(())
}

/// The simulated members up, then [`calls`] with the agent socket of
/// theirs.
fn with_sim(run: &mut Run, caller: &Caller) -> Result<(), String> {
    let (c, v) = (caller.dom, SERVICE_VM);
    let (d1, d2) = (run.id(c)?, run.id(v)?);
    let verbose = "QUBES_SIM_VERBOSE=1";
    install_services(run, c)?;
    // Agents first (control vchan servers), then the daemons in dom0.
    for dom in [c, v] {
        run.bg(
            dom,
            "qagent",
            &format!(
                "env {verbose} /mnt/host/qubes-sim agent --transport xen --vm {dom} \
                 --socket {AGENT_SOCKET} --services {RPC_DIR} --home /tmp --timeout 300"
            ),
            MEMBER_LIMIT,
        )?;
    }
    let conf = format!("vm {c} domid={d1}\nvm {v} domid={d2}\npolicy policy.txt\n");
    let r = run.on(
        "dom0",
        &format!(
            "rm -rf {DOM0_DIR} && mkdir -p {DOM0_DIR} && printf '%s' {} > {DOM0_DIR}/sim.conf && \
             printf '%s' {} > {DOM0_DIR}/policy.txt && /mnt/host/qubes-sim check --config {DOM0_DIR}/sim.conf",
            b64q(&conf),
            b64q(&policy(c))
        ),
        Duration::from_secs(60),
    )?;
    if !r.ok() {
        return Err(format!("dom0 configuration: {}", r.all()));
    }
    for (vm, domid) in [(c, d1), (v, d2)] {
        run.bg(
            "dom0",
            &daemon_name(vm),
            &format!(
                "env {verbose} /mnt/host/qubes-sim daemon --transport xen --dir {DOM0_DIR} \
                 --config {DOM0_DIR}/sim.conf --vm {vm} --domid {domid} --timeout 300"
            ),
            MEMBER_LIMIT,
        )?;
    }
    let daemons = format!("{} {}", daemon_name(c), daemon_name(v));
    let t = Instant::now();
    let up = run.on(
        "dom0",
        &format!(
            "i=0; while [ $i -lt 1500 ]; do [ -S {DOM0_DIR}/run/qrexec.{d1} ] && [ -S {DOM0_DIR}/run/qrexec.{d2} ] && break; \
             for n in {daemons}; do [ -s /tmp/lab-$n.rc ] && echo \"$n exited\" && exit 1; done; \
             sleep 0.2; i=$((i+1)); done; [ -S {DOM0_DIR}/run/qrexec.{d1} ] && [ -S {DOM0_DIR}/run/qrexec.{d2} ]"
        ),
        Duration::from_secs(400),
    )?;
    if !up.ok() {
        return Err(format!(
            "the daemons did not connect to the agents: {}",
            up.all()
        ));
    }
    run.rep.add(
        caller.section,
        format!(
            "{}control vchans: daemons in dom0 ↔ agents in {c} (dom{d1}), {v} (dom{d2})",
            prefix(caller)
        ),
        St::Pass,
        format!("both up after {:.1}s", t.elapsed().as_secs_f64()),
    );
    let client = format!("QREXEC_AGENT_SOCKET={AGENT_SOCKET} {}", caller.client);
    calls(
        run,
        &Caller {
            client: &client,
            ..*caller
        },
        (100, 32),
    )
    .map(drop)
}

/// What one set of [`calls`] gave: passed / run, and the two transfer
/// rates (MiB/s: the caller→service transfer, and the service→caller one
/// with 1 MiB buffers).
#[derive(Debug, Clone, Copy)]
pub(super) struct CallSet {
    pub passed: usize,
    pub total: usize,
    pub up: Option<f64>,
    pub down: Option<f64>,
}

/// The lab's five qrexec calls from `caller` to domU2, `mib` MiB up and
/// `gmib` MiB down (the `qrexec` phase: 100 and 32), through whatever
/// agents and daemons are running: a report row each.
pub(super) fn calls(
    run: &mut Run,
    caller: &Caller,
    (mib, gmib): (u32, u32),
) -> Result<CallSet, String> {
    let (c, v) = (caller.dom, SERVICE_VM);
    let what = prefix(caller);
    let client = caller.client;
    let mut set = CallSet {
        passed: 0,
        total: 0,
        up: None,
        down: None,
    };
    let mut add = |run: &mut Run, name: String, ok: bool, detail: String| {
        set.total += 1;
        set.passed += usize::from(ok);
        run.rep.add(
            caller.section,
            format!("{what}{name}"),
            if ok { St::Pass } else { St::Fail },
            detail,
        );
    };
    let slug: String = format!("{c}-{what}")
        .chars()
        .filter(|ch| ch.is_ascii_alphanumeric() || *ch == '-')
        .collect();

    // `mib` MiB caller -> service: the caller's checksum of the stream
    // (computed apart: the stream is deterministic), the service's of what
    // it read, and the service's answer as the caller got it.
    let out = run.on(
        c,
        &format!(
            "{PEER} gen {mib} | {PEER} sum > /tmp/q-sum.sent; s=$(cut -d' ' -f1 /proc/uptime); \
             {PEER} gen {mib} | {client} {v} test.Sum > /tmp/q-sum.back 2> /tmp/q-sum.err; rc=$?; \
             e=$(cut -d' ' -f1 /proc/uptime); echo \"@@rc=$rc\"; echo \"@@secs=$(echo \"$e $s\" | awk '{{print $1-$2}}')\"; \
             echo \"@@sent=$(cat /tmp/q-sum.sent)\"; echo \"@@back=$(cat /tmp/q-sum.back)\"; cat /tmp/q-sum.err"
        ),
        Duration::from_secs(900),
    )?;
    let srv = run.on(v, "cat /tmp/q-sum.srv", Duration::from_secs(60))?;
    let text = out.all();
    let field = |k: &str| marker(&text, k);
    let (rc, secs) = (field("@@rc="), field("@@secs=").parse::<f64>().ok());
    let (sent, back) = (sum_of(&field("@@sent=")), sum_of(&field("@@back=")));
    let got = sum_of(&srv.all());
    let ok = rc == "0" && sent.is_some() && sent == got && sent == back;
    run.save_log(
        &format!("qrexec-{mib}MiB-{slug}"),
        &format!("{text}\n== {v}\n{}", srv.all()),
    );
    let rate = |mib: u32, s: Option<f64>| {
        s.filter(|s| *s > 0.0).map_or("?".into(), |s| {
            format!("{s:.1}s, {:.1} MiB/s", f64::from(mib) / s)
        })
    };
    if ok {
        set.up = secs.filter(|s| *s > 0.0).map(|s| f64::from(mib) / s);
    }
    add(
        run,
        format!("{mib} MiB {c}→{v} (test.Sum, default 64 KiB buffers)"),
        ok,
        if ok {
            format!(
                "checksum sent = read by the service in {v} = returned ({}); call {}",
                sent.unwrap_or_default(),
                rate(mib, secs)
            )
        } else {
            format!("rc {rc}; sent {sent:?}, {v} read {got:?}, returned {back:?}\n{text}")
        },
    );

    // Refused by the policy.
    let out = run.on(
        c,
        &format!("{client} {v} test.Denied < /dev/null; echo \"@@rc=$?\""),
        Duration::from_secs(300),
    )?;
    let text = out.all();
    let rc = marker(&text, "@@rc=");
    let ok = rc == "126" && text.contains("Request refused");
    add(
        run,
        "refused call (test.Denied): exit 126".into(),
        ok,
        format!("rc {rc}: {}", text.replace('\n', " ").trim()),
    );

    // 1 MiB data rings, service -> caller.
    let out = run.on(
        c,
        &format!(
            "s=$(cut -d' ' -f1 /proc/uptime); ( {client} --buffer-size=1048576 {v} test.Gen+{gmib} 2> /tmp/q-gen.err; \
             echo $? > /tmp/q-gen.rc ) | {PEER} sum > /tmp/q-gen.got; e=$(cut -d' ' -f1 /proc/uptime); \
             echo \"@@rc=$(cat /tmp/q-gen.rc)\"; echo \"@@secs=$(echo \"$e $s\" | awk '{{print $1-$2}}')\"; \
             echo \"@@got=$(cat /tmp/q-gen.got)\"; cat /tmp/q-gen.err"
        ),
        Duration::from_secs(600),
    )?;
    let srv = run.on(v, "cat /tmp/q-gen.srv", Duration::from_secs(60))?;
    let text = out.all();
    let field = |k: &str| marker(&text, k);
    let (rc, secs) = (field("@@rc="), field("@@secs=").parse::<f64>().ok());
    let got = sum_of(&field("@@got="));
    let sent = sum_of(&srv.all());
    let ok = rc == "0" && got.is_some() && got == sent;
    if ok {
        set.down = secs.filter(|s| *s > 0.0).map(|s| f64::from(gmib) / s);
    }
    add(
        run,
        format!("--buffer-size=1048576: {gmib} MiB {v}→{c} (test.Gen+{gmib})"),
        ok,
        if ok {
            format!(
                "checksum of what the service sent = what the caller got ({}); call {}",
                got.unwrap_or_default(),
                rate(gmib, secs)
            )
        } else {
            format!("rc {rc}; service sent {sent:?}, caller got {got:?}\n{text}")
        },
    );

    // Exit code and output of a service; a service that does not exist.
    let out = run.on(
        c,
        &format!(
            "{client} {v} test.Exit < /dev/null 2>/tmp/q-exit.err; echo \"@@rc=$?\"; echo \"@@err=$(cat /tmp/q-exit.err)\"; \
             {client} {v} test.Missing < /dev/null; echo \"@@rc2=$?\""
        ),
        Duration::from_secs(300),
    )?;
    let text = out.all();
    let field = |k: &str| marker(&text, k);
    let ok = field("@@rc=") == "3" && text.lines().any(|l| l == "out") && field("@@err=") == "err";
    add(
        run,
        "service exit code 3, stdout and stderr come through (test.Exit)".into(),
        ok,
        text.replace('\n', " ").trim().to_string(),
    );
    let rc2 = field("@@rc2=");
    add(
        run,
        "allowed call of a missing service: exit 127 (test.Missing)".into(),
        rc2 == "127",
        format!("rc {rc2}"),
    );
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_found_in_output() {
        assert_eq!(
            sum_of("bytes=1048576 checksum=a93d8089f2d982f8\n").as_deref(),
            Some("1048576 bytes, a93d8089f2d982f8")
        );
        assert_eq!(sum_of("rc 1"), None);
        assert_eq!(sum_of("bytes=1 checksum=12"), None);
    }

    #[test]
    fn the_policy_allows_only_the_test_services_from_the_caller() {
        for caller in ["domU1", "domU3"] {
            let p = policy(caller);
            let mut allowed = 0;
            for l in p.lines().filter(|l| !l.starts_with('#')) {
                let w: Vec<&str> = l.split_whitespace().collect();
                assert!(w.len() == 5, "{l}");
                if w[4] == "allow" {
                    assert_eq!((w[2], w[3]), (caller, "domU2"));
                    allowed += 1;
                }
            }
            assert_eq!(allowed, 4);
        }
    }
}
