//! Phase `throughput`: ours vs C, rings 64 KiB and 1 MiB, both directions (informational).
//!
//! `LAB_TPUT_COUNT=1` adds the costs per MiB of each side: CPU time and
//! context switches (voluntary: sleeps on the event channel; involuntary:
//! preemptions) from `busybox time -v` around the timed runs, and one more
//! transfer per pairing under `strace -c -f` for the syscalls by kind
//! (`ioctl` is the event-channel notify, `read`/`write` on the evtchn fd are
//! the wait and the unmask, `poll` ours only). Every count covers the whole
//! process, set-up included (a few dozen calls). strace slows each syscall,
//! so its transfer is not timed.

use super::*;

/// `LAB_TPUT_COUNT=1`: count syscalls, context switches and CPU per MiB.
pub(super) fn count_requested() -> bool {
    std::env::var("LAB_TPUT_COUNT").is_ok_and(|v| v == "1")
}

/// CPU seconds (user + system), voluntary and involuntary context switches
/// from `busybox time -v` output.
fn time_v(s: &str) -> Option<(f64, u64, u64)> {
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some((
        field("User time (seconds):")? + field("System time (seconds):")?,
        field("Voluntary context switches:")? as u64,
        field("Involuntary context switches:")? as u64,
    ))
}

/// `(syscall, calls)` from the table `strace -c` prints, the `total` row
/// included.
fn strace_calls(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut inside = false;
    for l in s.lines() {
        let l = l.trim();
        if l.starts_with("% time") {
            inside = true;
            continue;
        }
        if !inside || l.starts_with("---") {
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 5 {
            inside = false;
            continue;
        }
        let Ok(calls) = f[3].parse() else { continue };
        let name = f[f.len() - 1].to_string();
        let done = name == "total";
        out.push((name, calls));
        if done {
            inside = false;
        }
    }
    out
}

/// CPU ms (user, system), context switches (voluntary, involuntary) and
/// minor page faults inside the program's own timed window, from the `window:` line that
/// `vchan-node` and `vchan-peer` print: unlike `time -v`, no set-up.
fn window(s: &str) -> Option<[f64; 5]> {
    let l = s.lines().find_map(|l| l.trim().strip_prefix("window:"))?;
    let get = |k: &str| {
        l.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some([
        get("user_ms=")?,
        get("sys_ms=")?,
        get("vcsw=")?,
        get("ivcsw=")?,
        get("minflt=")?,
    ])
}

fn per_mib_window(log: &str, mib: u32) -> Option<[f64; 5]> {
    let m = f64::from(mib);
    window(log).map(|w| w.map(|x| x / m))
}

/// One side's costs in one transfer, per MiB.
#[derive(Debug, Default, Clone)]
struct Costs {
    /// From `time -v` (CPU ms, voluntary, involuntary).
    time: Option<(f64, f64, f64)>,
    /// From the program's `window:` line (user ms, system ms, voluntary,
    /// involuntary, minor page faults).
    window: Option<[f64; 5]>,
    /// From `strace -c`: total, ioctl, read, write, poll (+ppoll),
    /// clock_gettime.
    calls: Option<[f64; 6]>,
}

fn per_mib_time(log: &str, mib: u32) -> Option<(f64, f64, f64)> {
    let (cpu, v, i) = time_v(log)?;
    let m = f64::from(mib);
    Some((cpu * 1000.0 / m, v as f64 / m, i as f64 / m))
}

fn per_mib_calls(log: &str, mib: u32) -> Option<[f64; 6]> {
    let c = strace_calls(log);
    if c.is_empty() {
        return None;
    }
    let get = |n: &str| {
        c.iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| *v)
            .sum::<u64>()
    };
    let m = f64::from(mib);
    Some([
        get("total") as f64 / m,
        get("ioctl") as f64 / m,
        get("read") as f64 / m,
        get("write") as f64 / m,
        (get("poll") + get("ppoll")) as f64 / m,
        get("clock_gettime") as f64 / m,
    ])
}

/// The server's and the client's part of a transfer log (see `Run::xfer`).
fn split_log(log: &str) -> (&str, &str) {
    match log.find("\n\nclient (") {
        Some(i) => (&log[..i], &log[i..]),
        None => (log, ""),
    }
}

const PAIRS: [&str; 4] = ["C→C", "ours→ours", "C→ours", "ours→C"];

pub(super) fn phase_throughput(run: &mut Run) -> Result<(), String> {
    let peer = std::env::var("LAB_TPUT_PEER").unwrap_or_default();
    let saved = std::mem::replace(
        &mut run.ours_bin,
        if peer.is_empty() {
            "vchan-peer".into()
        } else {
            peer
        },
    );
    if run.ours_bin == CONTROL_PEER {
        run.rep.notes.push(
            "throughput: **control run**, the C peer plays ours too (LAB_TPUT_PEER=C): \
             every ratio compares C with C"
                .into(),
        );
    } else if run.ours_bin != "vchan-peer" {
        run.rep.notes.push(format!(
            "throughput: ours is /mnt/host/{} (LAB_TPUT_PEER)",
            run.ours_bin
        ));
    }
    let r = phase_body(run);
    run.ours_bin = saved;
    run.wrap = None;
    r
}

/// Ring sizes in KiB (`LAB_TPUT_RINGS=64,1024`, the default).
fn rings() -> Result<Vec<u32>, String> {
    match std::env::var("LAB_TPUT_RINGS") {
        Ok(s) if !s.is_empty() => s
            .split(',')
            .map(|r| {
                r.trim()
                    .parse()
                    .map_err(|_| format!("LAB_TPUT_RINGS: {r:?} is not a number"))
            })
            .collect(),
        _ => Ok(vec![64, 1024]),
    }
}

fn phase_body(run: &mut Run) -> Result<(), String> {
    // LAB_TPUT_REPS=N: N timed runs per cell instead of 1 (quick) or 3
    // (full); the best is kept, and the paired ratios use them all.
    let reps = match std::env::var("LAB_TPUT_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(n) if n > 0 => n,
        _ if run.quick => 1,
        _ => 3,
    };
    let count = count_requested();
    let strace = count && {
        let r = run.on("domU1", "command -v strace", Duration::from_secs(60))?;
        let r2 = run.on("domU2", "command -v strace", Duration::from_secs(60))?;
        r.ok() && r2.ok()
    };
    if count && !strace {
        run.rep.notes.push(
            "LAB_TPUT_COUNT=1: no strace in the domUs (they were made without it: `lab stop` \
             and rerun), syscall counts left out"
                .into(),
        );
    }
    // (sender, receiver): ours against ours, and each of our halves alone
    // against the C peer (C→ours: our receive path, ours→C: our send
    // path), all beside C→C.
    let combos: &[(Impl, Impl)] = &[
        (Impl::C, Impl::C),
        (Impl::Ours, Impl::Ours),
        (Impl::C, Impl::Ours),
        (Impl::Ours, Impl::C),
    ];
    for ring in rings()? {
        for server_sends in [true, false] {
            // About 1 s per transfer (quick) at the rates seen here since
            // the lab runs one vCPU per guest (90-115 MiB/s with 64 KiB
            // rings, 450-550 with 1 MiB): shorter ones mostly measure the
            // start-up and the clock's granularity (24 MiB took 0.2 s).
            let mib = match (ring, run.quick) {
                (..=64, true) => 96,
                (..=64, false) => 192,
                (_, true) => 512,
                (_, false) => 1024,
            };
            let mut best = [None::<f64>; 4];
            // (sender, receiver) costs per pairing.
            let mut costs: [(Costs, Costs); 4] = Default::default();
            let mk = |i: usize| {
                let (sender, receiver) = combos[i];
                let (server, client) = if server_sends {
                    (sender, receiver)
                } else {
                    (receiver, sender)
                };
                Xfer {
                    server_dom: "domU1".into(),
                    client_dom: "domU2".into(),
                    server,
                    client,
                    ring_kib: ring,
                    mib,
                    server_sends,
                    packet: None,
                }
            };
            let by_role = |log: &str| {
                let (s, c) = split_log(log);
                if server_sends {
                    (s.to_string(), c.to_string())
                } else {
                    (c.to_string(), s.to_string())
                }
            };
            run.wrap = count.then(|| "/bin/busybox time -v".to_string());
            // Each repetition's rates, for the paired ratios.
            let mut per_rep = Vec::with_capacity(reps);
            for rep in 0..reps {
                let mut rates = [None::<f64>; 4];
                // Every other repetition in reverse, so that drift within
                // a repetition does not always favour the same pairing.
                let order: Vec<usize> = if rep % 2 == 0 {
                    (0..combos.len()).collect()
                } else {
                    (0..combos.len()).rev().collect()
                };
                for i in order {
                    let x = mk(i);
                    let r = run.xfer(&x)?;
                    let name = xfer_name(&x);
                    run.save_log(&format!("throughput-{name}"), &r.log);
                    if r.ok {
                        if let Some(rate) = r.rate {
                            rates[i] = Some(rate);
                            if best[i].is_none_or(|b| rate > b) {
                                let (snd, rcv) = by_role(&r.log);
                                costs[i].0.time = per_mib_time(&snd, mib);
                                costs[i].1.time = per_mib_time(&rcv, mib);
                                costs[i].0.window = per_mib_window(&snd, mib);
                                costs[i].1.window = per_mib_window(&rcv, mib);
                            }
                            best[i] = Some(best[i].map_or(rate, |b: f64| b.max(rate)));
                        }
                    } else {
                        run.rep.add("throughput", name, St::Fail, r.detail);
                    }
                }
                per_rep.push(rates);
            }
            if strace {
                run.wrap = Some("strace -c -f".to_string());
                for (i, c) in costs.iter_mut().enumerate() {
                    let x = mk(i);
                    let r = run.xfer(&x)?;
                    let name = xfer_name(&x);
                    run.save_log(&format!("throughput-strace-{name}"), &r.log);
                    if r.ok {
                        let (snd, rcv) = by_role(&r.log);
                        c.0.calls = per_mib_calls(&snd, mib);
                        c.1.calls = per_mib_calls(&rcv, mib);
                    } else {
                        run.rep
                            .add("throughput", format!("strace {name}"), St::Fail, r.detail);
                    }
                }
            }
            run.wrap = None;
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
            if count {
                for (i, (snd, rcv)) in costs.iter().enumerate() {
                    let (simp, rimp) = combos[i];
                    for (role, imp, c) in [("send", simp, snd), ("recv", rimp, rcv)] {
                        run.rep.counts.push(CountRow {
                            ring_kib: ring,
                            dir,
                            pair: PAIRS[i],
                            side: format!("{role} {}", imp.name()),
                            time: c.time,
                            window: c.window,
                            calls: c.calls,
                        });
                    }
                }
            }
            run.rep.tput.push(Tput {
                ring_kib: ring,
                dir,
                rates: best,
                paired: paired_ratios(&per_rep),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_time_v_and_strace_c() {
        let log = "\
received 25165824 bytes (24.0 MiB) in 1.000 s = 24.00 MiB/s; checksum=00
\tUser time (seconds): 0.25
\tSystem time (seconds): 0.50
\tVoluntary context switches: 480
\tInvoluntary context switches: 24
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 50.00    0.000500           2       240           ioctl
 30.00    0.000300           1       480        24 read
 20.00    0.000200           1       240           write
------ ----------- ----------- --------- --------- ----------------
100.00    0.001000           1       960        24 total
";
        let t = per_mib_time(log, 24).expect("time -v");
        assert!((t.0 - 31.25).abs() < 1e-9 && t.1 == 20.0 && t.2 == 1.0);
        assert!(per_mib_window(log, 24).is_none());
        let w = per_mib_window(
            "window: user_ms=48.000 sys_ms=24.000 vcsw=480 ivcsw=24 minflt=48\nreceived ...",
            24,
        );
        assert_eq!(w, Some([2.0, 1.0, 20.0, 1.0, 2.0]));
        let c = per_mib_calls(log, 24).expect("strace -c");
        assert_eq!(c, [40.0, 10.0, 20.0, 10.0, 0.0, 0.0]);
        assert!(per_mib_calls("no table", 1).is_none());
    }

    #[test]
    fn splits_a_transfer_log_by_side() {
        let (s, c) = split_log(
            "server (C) in domU1: x\nS\n[server rc Some(0)]\n\nclient (ours) in domU2: y\nC\n",
        );
        assert!(s.contains('S') && !s.contains("client ("));
        assert!(c.contains("client (ours)") && c.contains('C'));
    }
}
