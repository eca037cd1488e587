//! Phase `devtest`: `xen-devtest a`/`b` in two domains (our device wrappers and xenstore client against the real ones).

use super::*;

pub(super) fn parse_devtest(out: &str) -> Vec<(String, bool, String)> {
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

pub(super) fn phase_devtest(run: &mut Run, pairs: &[(&str, &str, &str)]) -> Result<(), String> {
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
