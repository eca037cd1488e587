//! Phase `kill`: `kill -9` of our peer mid-transfer; the survivor (C or ours) must end by itself.

use super::*;

pub(super) fn phase_kill(run: &mut Run) -> Result<(), String> {
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

pub(super) fn kill_case(
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
