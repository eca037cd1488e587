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
//! | `test.Sum`, 100 MiB domU1→domU2 | MD5 of what the caller sent = what the service received (domU2's file) = what came back |
//! | `test.Denied` | refused by the policy: exit 126, `Request refused` |
//! | `--buffer-size=1048576 test.Gen`, 32 MiB domU2→domU1 | 1 MiB data rings; MD5 of what the service sent = what the caller received |
//! | `test.Exit` | the service's exit code 3 and its stdout come through |
//! | `test.Missing` | allowed, no such service: exit 127 |

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

const POLICY: &str = "\
# qrexec policy of the lab (domU1 calls domU2)
test.Sum     *  domU1  domU2  allow
test.Gen     *  domU1  domU2  allow
test.Exit    *  domU1  domU2  allow
test.Missing *  domU1  domU2  allow
test.Denied  *  @anyvm @anyvm deny
*            *  @anyvm @anyvm deny
";

/// 1 MiB of random bytes, generated once per domain, repeated `n` times
/// (cheap under TCG: the checksums, not the generator, cost the CPU).
fn generator(n: u32) -> String {
    format!(
        "{{ [ -s /tmp/q.blk ] || head -c 1048576 /dev/urandom > /tmp/q.blk; \
         i=0; while [ $i -lt {n} ]; do cat /tmp/q.blk; i=$((i+1)); done; }}"
    )
}

/// The services, as (name, shell script).
fn services() -> Vec<(&'static str, String)> {
    vec![
        (
            "test.Sum",
            "#!/bin/sh\n# MD5 of stdin, kept in a file and sent back\n\
             md5sum | cut -d' ' -f1 | tee /tmp/q-sum.srv\n"
                .to_string(),
        ),
        (
            "test.Gen",
            format!(
                "#!/bin/sh\n# 32 MiB to stdout; its MD5 kept in a file\n\
                 rm -f /tmp/q-gen.fifo; mkfifo /tmp/q-gen.fifo\n\
                 md5sum < /tmp/q-gen.fifo | cut -d' ' -f1 > /tmp/q-gen.srv &\n\
                 {} | tee /tmp/q-gen.fifo\nwait\n",
                generator(32)
            ),
        ),
        (
            "test.Exit",
            "#!/bin/sh\necho out; echo err >&2; exit 3\n".to_string(),
        ),
    ]
}

fn md5_of(s: &str) -> Option<String> {
    s.split_whitespace()
        .find(|w| w.len() == 32 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(String::from)
}

/// Runs the phase; the members are stopped on every path.
pub(super) fn phase(run: &mut Run) -> Result<(), String> {
    let r = cases(run);
    let logs = stop_members(run);
    run.save_log("qrexec-members", &logs);
    if let Err(e) = &r {
        run.rep.add(
            SECTION,
            "qrexec (phase)",
            St::Fail,
            format!("{e}\n\nagents and daemons:\n{logs}"),
        );
    }
    Ok(())
}

fn stop_members(run: &Run) -> String {
    let mut logs = String::new();
    for (dom, names) in [
        ("domU1", "qagent"),
        ("domU2", "qagent"),
        ("dom0", "qd1 qd2"),
    ] {
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

fn cases(run: &mut Run) -> Result<(), String> {
    let (d1, d2) = (run.id("domU1")?, run.id("domU2")?);
    let verbose = "QUBES_SIM_VERBOSE=1";
    // Services in domU2 (domU1 gets the same directory, empty).
    let mut setup = format!("rm -rf {RPC_DIR} && mkdir -p {RPC_DIR} && cd {RPC_DIR}");
    for (name, body) in services() {
        setup.push_str(&format!(
            " && printf '%s' {} > {name} && chmod 755 {name}",
            b64q(&body)
        ));
    }
    for (dom, script) in [("domU1", format!("mkdir -p {RPC_DIR}")), ("domU2", setup)] {
        let r = run.on(dom, &script, Duration::from_secs(60))?;
        if !r.ok() {
            return Err(format!("service setup in {dom}: {}", r.all()));
        }
    }
    // Agents first (control vchan servers), then the daemons in dom0.
    for dom in ["domU1", "domU2"] {
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
    let conf = format!("vm domU1 domid={d1}\nvm domU2 domid={d2}\npolicy policy.txt\n");
    let r = run.on(
        "dom0",
        &format!(
            "rm -rf {DOM0_DIR} && mkdir -p {DOM0_DIR} && printf '%s' {} > {DOM0_DIR}/sim.conf && \
             printf '%s' {} > {DOM0_DIR}/policy.txt && /mnt/host/qubes-sim check --config {DOM0_DIR}/sim.conf",
            b64q(&conf),
            b64q(POLICY)
        ),
        Duration::from_secs(60),
    )?;
    if !r.ok() {
        return Err(format!("dom0 configuration: {}", r.all()));
    }
    for (name, vm, domid) in [("qd1", "domU1", d1), ("qd2", "domU2", d2)] {
        run.bg(
            "dom0",
            name,
            &format!(
                "env {verbose} /mnt/host/qubes-sim daemon --transport xen --dir {DOM0_DIR} \
                 --config {DOM0_DIR}/sim.conf --vm {vm} --domid {domid} --timeout 300"
            ),
            MEMBER_LIMIT,
        )?;
    }
    let t = Instant::now();
    let up = run.on(
        "dom0",
        &format!(
            "i=0; while [ $i -lt 1500 ]; do [ -S {DOM0_DIR}/run/qrexec.{d1} ] && [ -S {DOM0_DIR}/run/qrexec.{d2} ] && break; \
             for n in qd1 qd2; do [ -s /tmp/lab-$n.rc ] && echo \"$n exited\" && exit 1; done; \
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
        SECTION,
        format!("control vchans: daemons in dom0 ↔ agents in domU1 (dom{d1}), domU2 (dom{d2})"),
        St::Pass,
        format!("both up after {:.1}s", t.elapsed().as_secs_f64()),
    );
    let client = format!("QREXEC_AGENT_SOCKET={AGENT_SOCKET} /mnt/host/qrexec-client-vm");

    // 100 MiB caller -> service.
    let mib = 100;
    let t = Instant::now();
    let out = run.on(
        "domU1",
        &format!(
            "rm -f /tmp/q.fifo /tmp/q-sum.*; mkfifo /tmp/q.fifo; \
             md5sum < /tmp/q.fifo | cut -d' ' -f1 > /tmp/q-sum.sent & \
             {} | tee /tmp/q.fifo | {client} domU2 test.Sum > /tmp/q-sum.back 2> /tmp/q-sum.err; rc=$?; wait; \
             echo \"@@rc=$rc\"; echo \"@@sent=$(cat /tmp/q-sum.sent)\"; echo \"@@back=$(cat /tmp/q-sum.back)\"; cat /tmp/q-sum.err",
            generator(mib)
        ),
        Duration::from_secs(900),
    )?;
    let wall = t.elapsed().as_secs_f64();
    let srv = run.on("domU2", "cat /tmp/q-sum.srv", Duration::from_secs(60))?;
    let text = out.all();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let (rc, sent, back) = (field("@@rc="), field("@@sent="), field("@@back="));
    let got = md5_of(&srv.all()).unwrap_or_default();
    let ok = rc == "0" && md5_of(&sent).is_some() && sent == got && sent == back;
    run.save_log("qrexec-100MiB", &format!("{text}\n== domU2\n{}", srv.all()));
    run.rep.add(
        SECTION,
        format!("{mib} MiB domU1→domU2 (test.Sum, default 64 KiB buffers)"),
        if ok { St::Pass } else { St::Fail },
        if ok {
            format!(
                "md5 {sent} sent = received in domU2 = returned; {wall:.1}s wall, {:.1} MiB/s including both MD5s",
                f64::from(mib) / wall
            )
        } else {
            format!("rc {rc}; sent {sent:?}, domU2 got {got:?}, returned {back:?}\n{text}")
        },
    );

    // Refused by the policy.
    let out = run.on(
        "domU1",
        &format!("{client} domU2 test.Denied < /dev/null; echo \"@@rc=$?\""),
        Duration::from_secs(300),
    )?;
    let text = out.all();
    let rc = text
        .lines()
        .find_map(|l| l.strip_prefix("@@rc="))
        .unwrap_or("")
        .trim()
        .to_string();
    let ok = rc == "126" && text.contains("Request refused");
    run.rep.add(
        SECTION,
        "refused call (test.Denied): exit 126",
        if ok { St::Pass } else { St::Fail },
        format!("rc {rc}: {}", text.replace('\n', " ").trim()),
    );

    // 1 MiB data rings, service -> caller.
    let gmib = 32;
    let t = Instant::now();
    let out = run.on(
        "domU1",
        &format!(
            "( {client} --buffer-size=1048576 domU2 test.Gen 2> /tmp/q-gen.err; echo $? > /tmp/q-gen.rc ) \
             | md5sum | cut -d' ' -f1 > /tmp/q-gen.got; \
             echo \"@@rc=$(cat /tmp/q-gen.rc)\"; echo \"@@got=$(cat /tmp/q-gen.got)\"; cat /tmp/q-gen.err"
        ),
        Duration::from_secs(600),
    )?;
    let wall = t.elapsed().as_secs_f64();
    let srv = run.on("domU2", "cat /tmp/q-gen.srv", Duration::from_secs(60))?;
    let text = out.all();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let (rc, got) = (field("@@rc="), field("@@got="));
    let sent = md5_of(&srv.all()).unwrap_or_default();
    let ok = rc == "0" && md5_of(&got).is_some() && got == sent;
    run.rep.add(
        SECTION,
        format!("--buffer-size=1048576: {gmib} MiB domU2→domU1 (test.Gen)"),
        if ok { St::Pass } else { St::Fail },
        if ok {
            format!(
                "md5 {got} sent by the service = received; {wall:.1}s wall, {:.1} MiB/s including both MD5s",
                f64::from(gmib) / wall
            )
        } else {
            format!("rc {rc}; service sent {sent:?}, caller got {got:?}\n{text}")
        },
    );

    // Exit code and output of a service; a service that does not exist.
    let out = run.on(
        "domU1",
        &format!(
            "{client} domU2 test.Exit < /dev/null 2>/tmp/q-exit.err; echo \"@@rc=$?\"; echo \"@@err=$(cat /tmp/q-exit.err)\"; \
             {client} domU2 test.Missing < /dev/null; echo \"@@rc2=$?\""
        ),
        Duration::from_secs(300),
    )?;
    let text = out.all();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let ok = field("@@rc=") == "3" && text.lines().any(|l| l == "out") && field("@@err=") == "err";
    run.rep.add(
        SECTION,
        "service exit code 3, stdout and stderr come through (test.Exit)",
        if ok { St::Pass } else { St::Fail },
        text.replace('\n', " ").trim().to_string(),
    );
    let rc2 = field("@@rc2=");
    run.rep.add(
        SECTION,
        "allowed call of a missing service: exit 127 (test.Missing)",
        if rc2 == "127" { St::Pass } else { St::Fail },
        format!("rc {rc2}"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_is_found_in_output() {
        assert_eq!(
            md5_of("d41d8cd98f00b204e9800998ecf8427e  -\n").as_deref(),
            Some("d41d8cd98f00b204e9800998ecf8427e")
        );
        assert_eq!(md5_of("rc 1"), None);
    }

    #[test]
    fn the_policy_allows_only_the_test_services_from_domu1() {
        for l in POLICY.lines().filter(|l| !l.starts_with('#')) {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert!(w.len() == 5, "{l}");
            if w[4] == "allow" {
                assert_eq!((w[2], w[3]), ("domU1", "domU2"));
            }
        }
    }
}
