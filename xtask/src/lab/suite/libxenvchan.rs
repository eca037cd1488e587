//! Phase `libxenvchan`: our drop-in library under Xen's own C program.
//!
//! `vchan-node-ours` is `lab/vchan-node.c` linked with our libvchan's
//! `libxenvchan_*` (see `ourlib.rs`); on the other end runs the same
//! program on Debian's libxenvchan (`vchan-node`), or ours again. The
//! cases follow the matrix: {ours-lib server + Debian client, Debian
//! server + ours-lib client, ours-lib + ours-lib} × {dom0↔domU1,
//! domU1↔domU2} × rings {1, 4, 64, 1024} KiB, stream (the C program has
//! no packet mode), the server's domain and the direction varied; both
//! ends must print the same checksum and exit 0. Full: 24 cases; quick:
//! 6 (each pairing on both domain pairs, the ring sizes rotating so each
//! comes at least once, both directions).
//!
//! Then the same C program's throughput on Debian's library and on ours
//! (domU1 server → domU2 client, one run each, informational): rings 64
//! KiB and 1 MiB (quick: 1 MiB only).

use super::report::DropIn;
use super::{DOM_PAIRS, Impl, Run, SIZES, St, Xfer, mib_for, phase_matrix, xfer_name};

const PAIRINGS: [(Impl, Impl); 3] = [
    (Impl::CLib, Impl::C),
    (Impl::C, Impl::CLib),
    (Impl::CLib, Impl::CLib),
];

/// The interop cases (see the module docs).
fn cases(quick: bool) -> Vec<Xfer> {
    let mut v = Vec::new();
    for (pi, &(server, client)) in PAIRINGS.iter().enumerate() {
        for (di, &(d0, d1)) in DOM_PAIRS.iter().enumerate() {
            for (si, &ring) in SIZES.iter().enumerate() {
                // quick: one ring size per (pairing, domain pair),
                // rotating, so each size comes once or twice.
                if quick && si != (pi * 2 + di) % 4 {
                    continue;
                }
                let (sd, cd) = if (si + di) % 2 == 0 {
                    (d0, d1)
                } else {
                    (d1, d0)
                };
                v.push(Xfer {
                    server_dom: sd.into(),
                    client_dom: cd.into(),
                    server,
                    client,
                    ring_kib: ring,
                    mib: mib_for(ring, quick),
                    server_sends: (si / 2 + pi + di) % 2 == 0,
                    packet: None,
                });
            }
        }
    }
    v
}

/// Runs the phase (see the module docs).
pub(super) fn phase(run: &mut Run) -> Result<(), String> {
    let quick = run.quick;
    let before = run.rep.rows.len();
    phase_matrix(run, cases(quick), "libxenvchan")?;
    let matrix = &run.rep.rows[before..];
    let (passed, total) = (
        matrix.iter().filter(|r| r.st == St::Pass).count(),
        matrix.iter().filter(|r| r.st != St::Info).count(),
    );
    run.rep.dropin.push(DropIn {
        program: "Xen `vchan-node` on ours ↔ on Debian's libxenvchan (matrix)".into(),
        library: "ours + Debian's",
        passed,
        total,
        rate: "-".into(),
    });
    let rings: &[u32] = if quick { &[1024] } else { &[64, 1024] };
    for &ring in rings {
        let mib = if ring == 64 { 24 } else { 128 };
        let mut rates = Vec::new();
        for imp in [Impl::C, Impl::CLib] {
            let x = Xfer {
                server_dom: "domU1".into(),
                client_dom: "domU2".into(),
                server: imp,
                client: imp,
                ring_kib: ring,
                mib,
                server_sends: true,
                packet: None,
            };
            let r = run.xfer(&x)?;
            let name = xfer_name(&x);
            run.save_log(&format!("libxenvchan-throughput-{name}"), &r.log);
            if !r.ok {
                run.rep.add("libxenvchan", name, St::Fail, r.detail);
            }
            rates.push(r.rate.filter(|_| r.ok));
        }
        let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
        let ratio = match rates[..] {
            [Some(d), Some(o)] if d > 0.0 => format!("{:.2}", o / d),
            _ => "-".into(),
        };
        for (library, rate) in [("Debian's libxenvchan (C)", rates[0]), ("ours", rates[1])] {
            run.rep.dropin.push(DropIn {
                program: format!("Xen `vchan-node` ↔ `vchan-node`, {ring} KiB ring, {mib} MiB"),
                library,
                passed: usize::from(rate.is_some()),
                total: 1,
                rate: f(rate),
            });
        }
        run.rep.add(
            "libxenvchan",
            format!("vchan-node throughput, {ring} KiB, {mib} MiB domU1→domU2"),
            St::Info,
            format!(
                "on Debian's libxenvchan {} MiB/s, on ours {} MiB/s; ours/Debian {ratio}",
                f(rates[0]),
                f(rates[1])
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quick keeps every pairing on both domain pairs and every ring size
    /// three times; full has every combination once.
    #[test]
    fn case_selection() {
        let full = cases(false);
        assert_eq!(full.len(), 24);
        let quick = cases(true);
        assert_eq!(quick.len(), 6);
        for &ring in &SIZES {
            assert!(quick.iter().any(|x| x.ring_kib == ring), "{ring} KiB");
        }
        for sends in [true, false] {
            assert!(quick.iter().any(|x| x.server_sends == sends));
        }
        for &(s, c) in &PAIRINGS {
            for &(d0, d1) in &DOM_PAIRS {
                assert!(quick.iter().any(|x| x.server == s
                    && x.client == c
                    && [d0, d1].contains(&x.server_dom.as_str())
                    && [d0, d1].contains(&x.client_dom.as_str())));
            }
        }
        // our library on both ends, both directions, both roles
        for imp_srv in [true, false] {
            for sends in [true, false] {
                assert!(full.iter().any(|x| x.server_sends == sends
                    && (if imp_srv { x.server } else { x.client }) == Impl::CLib));
            }
        }
    }
}
