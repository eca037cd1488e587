//! Phases `matrix` and `mirage`: transfers between C and our peers over every pairing, domain pair, ring size and mode; checksums compared on both ends.

use super::*;

pub(super) const SIZES: [u32; 4] = [1, 4, 64, 1024];
pub(super) const PAIRINGS: [(Impl, Impl); 3] = [
    (Impl::Ours, Impl::C),
    (Impl::C, Impl::Ours),
    (Impl::Ours, Impl::Ours),
];
pub(super) const DOM_PAIRS: [(&str, &str); 2] = [("dom0", "domU1"), ("domU1", "domU2")];

/// Odd packet sizes (wrap-around, hash carry) that fit the smaller ring.
pub(super) fn packet_for(ring_kib: u32) -> usize {
    match ring_kib {
        1 => 509,
        4 => 1531,
        64 => 24571,
        _ => 393_209,
    }
}

pub(super) fn mib_for(ring_kib: u32, quick: bool) -> u32 {
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
pub(super) fn matrix_cases(quick: bool) -> Vec<Xfer> {
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
pub(super) fn mirage_cases(quick: bool) -> Vec<Xfer> {
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

pub(super) fn xfer_name(x: &Xfer) -> String {
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

pub(super) fn phase_matrix(
    run: &mut Run,
    cases: Vec<Xfer>,
    section: &'static str,
) -> Result<(), String> {
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
}
