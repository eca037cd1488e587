//! Phase `cqrexec`: Qubes' own C qrexec stack on real Xen, on Qubes'
//! libvchan-xen and on ours.
//!
//! The C programs (built by `cstack.rs`, `BACKEND_VMM=xen`, dynamically
//! linked to `libvchan-xen.so.1`): a `qrexec-agent` in domU1 and in domU2,
//! a `qrexec-daemon` per domU in dom0 (their control vchans: the agent is
//! the server on port 512, the daemon the client), with a stand-in for
//! qubesd's policy as `--policy-program` (a shell script: the lab's policy,
//! the C daemon's own protocol). The same binaries run twice: first on
//! Qubes' libvchan-xen (qubes-core-vchan-xen on Debian's libxenvchan, the
//! baseline), then on our drop-in library, chosen by `LD_LIBRARY_PATH`;
//! which file each running agent and daemon mapped is read from
//! `/proc/PID/maps` and must be the chosen one.
//!
//! On each library, the lab's five qrexec calls (see `qrexec.rs`: 100 MiB
//! with checksums, refusal 126, `--buffer-size` 1 MiB, exit code 3, 127)
//! from domU1 to domU2, by our `qrexec-client-vm` and by the C one (which
//! runs on the same library as the agents: its data vchan is its own).
//! Data vchans go straight between domU1 and domU2. A table row per
//! (library, client) gives the pass count and both transfer rates.
//!
//! The baseline needs domUs booted with `xen_privcmd.unrestricted=1`:
//! Qubes' `libvchan_is_open` asks `xc_evtchn_status`, a privcmd hypercall
//! that a domU kernel with the CVE-2026-31788 fix refuses, and declares
//! the vchan closed when it fails, so on the lab's usual domUs its agents
//! drop their control vchans at once. The phase boots domU1 and domU2 with
//! that parameter for the baseline and without it for ours (which treats
//! `EPERM` as "unknown", docs/vchan.md §7.2).
//!
//! `--quick` (CI) runs the part that proves the drop-in: every C program
//! on our library, called by the C client (5 calls, 16 and 8 MiB; ~30 s
//! here); the full run adds our client and the whole baseline on Qubes'
//! library (~2.5 min with the two reboots).

use std::time::{Duration, Instant};

use super::qrexec::{CallSet, Caller, calls, install_services, stop_named};
use super::report::DropIn;
use super::{Run, St};
use crate::lab::cstack::{lib_dir, lib_dirs_script};
use crate::lab::guest::b64q;

const SECTION: &str = "C qrexec on Xen";
/// dom0: the daemons' sockets and the policy stand-in.
const DOM0_DIR: &str = "/run/qc";
/// The C agent's socket in each domU.
const AGENT_SOCKET: &str = "/run/qc-agent.sock";
/// Services (the same as the `qrexec` phase's) and an empty config dir.
const RPC_DIR: &str = "/run/qrexec-rpc";
const RPC_CONFIG: &str = "/run/qc-rpc-config";
const MEMBER_LIMIT: u64 = 1200;

/// qrexec-policy-exec's interface (`-- SOURCE TARGET SERVICE`, answer
/// lines on stdout): the lab's policy, domU1 may call the test services in
/// domU2 (as root: the agents run without PAM), the rest is refused.
const POLICY: &str = r#"#!/bin/sh
# qrexec-policy-exec -- SOURCE TARGET SERVICE (a stand-in for qubesd's policy)
src=$2; tgt=$3; svc=$4
case "$src:$tgt:$svc" in
  domU1:domU2:test.Sum*|domU1:domU2:test.Gen*|domU1:domU2:test.Exit*|domU1:domU2:test.Missing*) ;;
  *) echo result=deny; exit 1;;
esac
printf 'result=allow\nautostart=False\nuser=root\ntarget=%s\nrequested_target=%s\n' "$tgt" "$tgt"
"#;

fn lib_name(ours: bool) -> &'static str {
    if ours {
        "our libvchan"
    } else {
        "Qubes' libvchan-xen"
    }
}

/// The file a library directory's `libvchan-xen.so.1` points to.
fn lib_file(ours: bool) -> &'static str {
    if ours {
        "/mnt/host/libvchan-xen.so.1"
    } else {
        "/mnt/host/libvchan-xen-qubes.so.1"
    }
}

/// Runs the phase: both libraries, the members stopped after each.
pub(super) fn phase(run: &mut Run) -> Result<(), String> {
    let mut table = Vec::new();
    let libs: &[bool] = if run.quick { &[true] } else { &[false, true] };
    for &ours in libs {
        if !ours {
            // Qubes' library declares a vchan closed when EVTCHNOP_status
            // fails, and a domU kernel with the CVE-2026-31788 fix (Debian's
            // 6.1.170 here) refuses every privcmd hypercall of a domU: the
            // agents would drop their control vchans at once. The baseline
            // gets domUs booted with that lifted; ours runs on the lab's
            // usual ones (and needs nothing of the kind).
            reboot_domus(run, UNRESTRICTED)?;
        }
        let r = with_members(run, ours, &mut table);
        let logs = stop_members(run);
        run.save_log(
            &format!("cqrexec-members-{}", if ours { "ours" } else { "qubes" }),
            &logs,
        );
        if !ours {
            reboot_domus(run, "")?;
        }
        if let Err(e) = r {
            run.rep.add(
                SECTION,
                format!("C stack on {} (setup)", lib_name(ours)),
                St::Fail,
                format!("{e}\n\nagents and daemons:\n{logs}"),
            );
        }
    }
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
    for (ours, client, set) in &table {
        run.rep.dropin.push(DropIn {
            program: format!("Qubes' C qrexec-agent + qrexec-daemon, {client}"),
            library: if *ours {
                "ours"
            } else {
                "Qubes' libvchan-xen (C)"
            },
            passed: set.passed,
            total: set.total,
            rate: format!("up {}, down {}", f(set.up), f(set.down)),
        });
        run.rep.add(
            SECTION,
            format!("table: C agents + daemons on {}, {client}", lib_name(*ours)),
            St::Info,
            format!(
                "{}/{} calls passed; up (test.Sum) {} MiB/s, down (1 MiB buffers) {} MiB/s",
                set.passed,
                set.total,
                f(set.up),
                f(set.down)
            ),
        );
    }
    Ok(())
}

/// The kernel parameter that lets a domU's privcmd make hypercalls again
/// (docs/vchan.md §7.2, §16 row P).
const UNRESTRICTED: &str = "xen_privcmd.unrestricted=1";

/// domU1 and domU2 destroyed and created again with `cmdline` (they get
/// new domain ids).
fn reboot_domus(run: &mut Run, cmdline: &str) -> Result<(), String> {
    let t = Instant::now();
    let names = ["domU1".to_string(), "domU2".to_string()];
    let r = run.on(
        "dom0",
        "xl destroy domU1; xl destroy domU2; true",
        Duration::from_secs(120),
    )?;
    for n in &names {
        run.forget_id(n);
    }
    run.lab.create_domus_with(&names, cmdline).map_err(|e| {
        format!(
            "creating domU1, domU2 with {cmdline:?}: {e}
{}",
            r.all()
        )
    })?;
    let check = run.on("domU1", "cat /proc/cmdline", Duration::from_secs(60))?;
    let ok = if cmdline.is_empty() {
        !check.stdout.contains(UNRESTRICTED)
    } else {
        check.stdout.contains(cmdline)
    };
    run.rep.add(
        SECTION,
        format!("domU1, domU2 booted again with kernel parameters {cmdline:?}"),
        if ok { St::Pass } else { St::Fail },
        format!(
            "in {:.1}s; domU1's /proc/cmdline: {}",
            t.elapsed().as_secs_f64(),
            check.stdout.trim()
        ),
    );
    Ok(())
}

fn with_members(
    run: &mut Run,
    ours: bool,
    table: &mut Vec<(bool, &'static str, CallSet)>,
) -> Result<(), String> {
    // (Again for each library: the baseline's domUs are new.)
    install_services(run, "domU1")?;
    let (d1, d2) = (run.id("domU1")?, run.id("domU2")?);
    let lib = lib_name(ours);
    let ld = format!("LD_LIBRARY_PATH={}", lib_dir(ours));
    for dom in ["domU1", "domU2"] {
        let r = run.on(
            dom,
            &format!(
                "{} && rm -rf {RPC_CONFIG} {AGENT_SOCKET} && mkdir -p {RPC_CONFIG}",
                lib_dirs_script()
            ),
            Duration::from_secs(60),
        )?;
        if !r.ok() {
            return Err(format!("setup in {dom}: {}", r.all()));
        }
        run.bg(
            dom,
            "cagent",
            &format!(
                "env {ld} QREXEC_SERVICE_PATH={RPC_DIR} QUBES_RPC_CONFIG_PATH={RPC_CONFIG} \
                 /mnt/host/c-qrexec-agent --no-fork-server --agent-socket={AGENT_SOCKET}"
            ),
            MEMBER_LIMIT,
        )?;
    }
    let r = run.on(
        "dom0",
        &format!(
            "{} && rm -rf {DOM0_DIR} && mkdir -p {DOM0_DIR}/sock && printf '%s' {} > {DOM0_DIR}/policy && \
             chmod 755 {DOM0_DIR}/policy",
            lib_dirs_script(),
            b64q(POLICY)
        ),
        Duration::from_secs(60),
    )?;
    if !r.ok() {
        return Err(format!("dom0 setup: {}", r.all()));
    }
    for (name, vm, domid) in [("cd1", "domU1", d1), ("cd2", "domU2", d2)] {
        run.bg(
            "dom0",
            name,
            &format!(
                "env {ld} /mnt/host/c-qrexec-daemon --socket-dir={DOM0_DIR}/sock \
                 --policy-program={DOM0_DIR}/policy --direct \
                 --uuid=00000000-0000-4000-8000-{domid:012} {domid} {vm}"
            ),
            MEMBER_LIMIT,
        )?;
    }
    let t = Instant::now();
    let up = run.on(
        "dom0",
        &format!(
            "i=0; while [ $i -lt 1500 ]; do [ -S {DOM0_DIR}/sock/qrexec.domU1 ] && [ -S {DOM0_DIR}/sock/qrexec.domU2 ] && break; \
             for n in cd1 cd2; do [ -s /tmp/lab-$n.rc ] && echo \"$n exited\" && exit 1; done; \
             sleep 0.2; i=$((i+1)); done; [ -S {DOM0_DIR}/sock/qrexec.domU1 ] && [ -S {DOM0_DIR}/sock/qrexec.domU2 ]"
        ),
        Duration::from_secs(400),
    )?;
    if !up.ok() {
        return Err(format!(
            "the C daemons did not connect to the C agents: {}",
            up.all()
        ));
    }
    let secs = t.elapsed().as_secs_f64();
    // Which vchan library each member really mapped.
    let want = lib_file(ours);
    let mut maps = String::new();
    let mut all_ok = true;
    for (dom, names) in [
        ("domU1", "cagent"),
        ("domU2", "cagent"),
        ("dom0", "cd1 cd2"),
    ] {
        let out = run.on(
            dom,
            &format!(
                "for n in {names}; do echo \"$n: $(grep -o '/[^ ]*libvchan[^ ]*' /proc/$(cat /tmp/lab-$n.pid)/maps | sort -u | tr '\\n' ' ')\"; done"
            ),
            Duration::from_secs(60),
        )?;
        for l in out.stdout.lines().filter(|l| l.contains(':')) {
            let (_, libs) = l.split_once(':').unwrap_or_default();
            let libs: Vec<&str> = libs.split_whitespace().collect();
            all_ok &= libs == [want];
            maps.push_str(&format!("{dom} {l}; "));
        }
    }
    all_ok &= maps.matches(want).count() == 4;
    run.rep.add(
        SECTION,
        format!("[{lib}] control vchans: C daemons in dom0 ↔ C agents in domU1 (dom{d1}), domU2 (dom{d2})"),
        if all_ok { St::Pass } else { St::Fail },
        format!("up after {secs:.1}s; mapped: {}", maps.trim()),
    );
    if !all_ok {
        return Err(format!("the members did not map {want}: {maps}"));
    }
    let mut clients = vec![(
        "C qrexec-client-vm",
        format!("env {ld} /mnt/host/c-qrexec-client-vm --agent-socket={AGENT_SOCKET}"),
    )];
    if !run.quick {
        clients.insert(
            0,
            (
                "our qrexec-client-vm",
                format!("/mnt/host/qrexec-client-vm --agent-socket={AGENT_SOCKET}"),
            ),
        );
    }
    for (client_name, client) in clients {
        // A short call first, under a guest-side timeout: a stack that
        // hangs must not cost calls()'s long limits (up to 35 min).
        let out = run.on(
            "domU1",
            &format!(
                "timeout 120 {client} domU2 test.Exit < /dev/null > /tmp/qc-smoke.out 2>&1; \
                 echo \"@@rc=$?\"; cat /tmp/qc-smoke.out"
            ),
            Duration::from_secs(240),
        )?;
        let text = out.all();
        let rc = text
            .lines()
            .find_map(|l| l.strip_prefix("@@rc="))
            .unwrap_or("")
            .trim()
            .to_string();
        if rc != "3" {
            run.rep.add(
                SECTION,
                format!("[{lib}, {client_name}] first call (test.Exit, 120 s limit)"),
                St::Fail,
                format!(
                    "rc {rc} (124: timed out); the other calls skipped; agents' and daemons' logs in \
                     cqrexec-members-*.log\n{text}"
                ),
            );
            // The five calls count as failed in the table.
            table.push((
                ours,
                client_name,
                CallSet {
                    passed: 0,
                    total: 5,
                    up: None,
                    down: None,
                },
            ));
            continue;
        }
        // Quick: smaller transfers (CI's time).
        let sizes = if run.quick { (16, 8) } else { (100, 32) };
        let what = format!("[{lib}, {client_name}]");
        let caller = Caller {
            dom: "domU1",
            client: &client,
            section: SECTION,
            what: &what,
        };
        let set = calls(run, &caller, sizes)?;
        table.push((ours, client_name, set));
    }
    Ok(())
}

fn stop_members(run: &Run) -> String {
    stop_named(
        run,
        &[
            ("domU1", "cagent"),
            ("domU2", "cagent"),
            ("dom0", "cd1 cd2"),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy stand-in allows exactly the four test services from
    /// domU1 to domU2 (checked with the host's sh).
    #[test]
    fn policy_stand_in() {
        let dir = std::env::temp_dir().join(format!("cqrexec-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("policy");
        std::fs::write(&p, POLICY).unwrap();
        let ask = |src: &str, tgt: &str, svc: &str| {
            let out = std::process::Command::new("sh")
                .arg(&p)
                .args(["--", src, tgt, svc])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        for svc in ["test.Sum+", "test.Gen+32", "test.Exit+", "test.Missing+"] {
            let a = ask("domU1", "domU2", svc);
            assert!(a.starts_with("result=allow\n"), "{svc}: {a}");
            assert!(a.contains("\ntarget=domU2\n") && a.contains("\nuser=root\n"));
        }
        for (s, t, svc) in [
            ("domU1", "domU2", "test.Denied+"),
            ("domU2", "domU1", "test.Sum+"),
            ("domU1", "dom0", "test.Sum+"),
        ] {
            assert_eq!(ask(s, t, svc), "result=deny\n");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
