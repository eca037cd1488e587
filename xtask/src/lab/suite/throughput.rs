//! Phase `throughput`: ours vs C, rings 64 KiB and 1 MiB, both directions (informational).

use super::*;

pub(super) fn phase_throughput(run: &mut Run) -> Result<(), String> {
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
