//! The lab report: one row per case, the throughput table, markdown.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum St {
    Pass,
    Fail,
    Info,
    Skip,
}

impl St {
    pub(super) fn word(self) -> &'static str {
        match self {
            St::Pass => "PASS",
            St::Fail => "FAIL",
            St::Info => "info",
            St::Skip => "skip",
        }
    }
}

#[derive(Debug)]
pub(super) struct Row {
    pub(super) section: &'static str,
    pub(super) name: String,
    pub(super) st: St,
    pub(super) detail: String,
}

#[derive(Debug)]
pub(super) struct Tput {
    pub(super) ring_kib: u32,
    pub(super) dir: &'static str,
    /// Best receiver rate for (sender, receiver) = (C, C), (ours, ours),
    /// (C, ours), (ours, C).
    pub(super) rates: [Option<f64>; 4],
    /// Ratios within each repetition against that repetition's C→C, for
    /// ours→ours, C→ours and ours→C: what drift between repetitions (the
    /// host, the emulator) cannot move. `None` with fewer than two
    /// repetitions that have both rates.
    pub(super) paired: [Option<Spread>; 3],
}

/// Median, lowest and highest of a set of ratios, and how many.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Spread {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) n: usize,
}

/// For each of ours→ours, C→ours, ours→C (indices 1..4 of each
/// repetition's rates): the spread of its ratio to C→C (index 0) over the
/// repetitions that have both. `None` below two such repetitions.
///
/// ```ignore
/// let p = paired_ratios(&[[Some(100.0), Some(95.0), None, None]; 2]);
/// assert_eq!(p[0].unwrap().median, 0.95);
/// ```
pub(super) fn paired_ratios(per_rep: &[[Option<f64>; 4]]) -> [Option<Spread>; 3] {
    std::array::from_fn(|k| {
        let v: Vec<f64> = per_rep
            .iter()
            .filter_map(|r| match (r[0], r[k + 1]) {
                (Some(c), Some(x)) if c > 0.0 => Some(x / c),
                _ => None,
            })
            .collect();
        if v.len() < 2 {
            return None;
        }
        Some(Spread {
            median: crate::bench::report::median(&v),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n: v.len(),
        })
    })
}

/// One row of the drop-in table: a C program on one vchan library
/// (phases `libxenvchan`, `cqrexec`).
#[derive(Debug)]
pub(super) struct DropIn {
    pub(super) program: String,
    pub(super) library: &'static str,
    /// Passed of run.
    pub(super) passed: usize,
    pub(super) total: usize,
    /// MiB/s with what was measured, or "-".
    pub(super) rate: String,
}

/// One side of one pairing in the throughput phase's counts
/// (`LAB_TPUT_COUNT=1`), per MiB.
#[derive(Debug)]
pub(super) struct CountRow {
    pub(super) ring_kib: u32,
    pub(super) dir: &'static str,
    /// `C→C`, `ours→ours`, ...
    pub(super) pair: &'static str,
    /// `send ours`, `recv C`, ...
    pub(super) side: String,
    /// CPU ms, voluntary and involuntary context switches.
    pub(super) time: Option<(f64, f64, f64)>,
    /// Inside the program's timed window: user ms, system ms, voluntary
    /// and involuntary context switches, minor page faults.
    pub(super) window: Option<[f64; 5]>,
    /// Syscalls: total, ioctl, read, write, poll, clock_gettime.
    pub(super) calls: Option<[f64; 6]>,
}

#[derive(Debug, Default)]
pub(super) struct Report {
    pub(super) rows: Vec<Row>,
    /// How many rows there were at the last `time` (the phase summary
    /// counts the rows since).
    pub(super) rows_timed: usize,
    pub(super) timings: Vec<(String, f64)>,
    pub(super) tput: Vec<Tput>,
    pub(super) counts: Vec<CountRow>,
    pub(super) dropin: Vec<DropIn>,
    pub(super) notes: Vec<String>,
}

impl Report {
    pub(super) fn add(
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

    pub(super) fn time(&mut self, step: &str, t: Instant) {
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

    pub(super) fn count(&self, st: St) -> usize {
        self.rows.iter().filter(|r| r.st == st).count()
    }

    pub(super) fn markdown(&self, title: &str) -> String {
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
        if self
            .tput
            .iter()
            .any(|t| t.paired.iter().any(Option::is_some))
        {
            let _ = writeln!(
                s,
                "\n## Throughput: paired ratios (median over repetitions, lowest–highest)\n\n\
                 Each repetition runs the four pairings back to back (every other one in\n\
                 reverse order); each ratio is taken against the C→C of the same\n\
                 repetition, so drift between repetitions cancels. The table above takes\n\
                 each pairing's best run instead.\n\n\
                 | ring | direction | ours/C | recv | send | repetitions |\n\
                 |---|---|---:|---:|---:|---:|"
            );
            for t in &self.tput {
                let f = |p: &Option<Spread>| {
                    p.map_or("-".to_string(), |p| {
                        format!("{:.2} ({:.2}–{:.2})", p.median, p.min, p.max)
                    })
                };
                let n = t.paired.iter().flatten().map(|p| p.n).max().unwrap_or(0);
                let _ = writeln!(
                    s,
                    "| {} KiB | {} | {} | {} | {} | {n} |",
                    t.ring_kib,
                    t.dir,
                    f(&t.paired[0]),
                    f(&t.paired[1]),
                    f(&t.paired[2])
                );
            }
        }
        if !self.counts.is_empty() {
            let _ = writeln!(
                s,
                "\n## Throughput: costs per MiB (`LAB_TPUT_COUNT=1`)\n\n\
                 CPU and context switches from `busybox time -v` around the best timed run;\n\
                 syscalls from one more transfer under `strace -c -f` (`ioctl` = evtchn notify,\n\
                 `read`/`write` = evtchn wait/unmask, `poll` ours only, `clock` = clock_gettime,\n\
                 a syscall in these PV guests). Whole process, set-up included; the `win`\n\
                 columns are the same process inside its timed window only (`getrusage` by\n\
                 the program: user and system ms, voluntary and involuntary switches, page faults).\n\n\
                 | ring | direction | pairing | side | CPU ms | vol. cs | invol. cs | syscalls | ioctl | read | write | poll | clock | win user | win sys | win vcs | win ivcs | win flt |\n\
                 |---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for c in &self.counts {
                let (t0, t1, t2) = match c.time {
                    Some((a, b, d)) => (format!("{a:.1}"), format!("{b:.1}"), format!("{d:.1}")),
                    None => ("-".into(), "-".into(), "-".into()),
                };
                let k = |i: usize| c.calls.map_or("-".to_string(), |v| format!("{:.1}", v[i]));
                let w = |i: usize| c.window.map_or("-".to_string(), |v| format!("{:.2}", v[i]));
                let _ = writeln!(
                    s,
                    "| {} KiB | {} | {} | {} | {t0} | {t1} | {t2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    c.ring_kib,
                    c.dir,
                    c.pair,
                    c.side,
                    k(0),
                    k(1),
                    k(2),
                    k(3),
                    k(4),
                    k(5),
                    w(0),
                    w(1),
                    w(2),
                    w(3),
                    w(4)
                );
            }
        }
        if !self.dropin.is_empty() {
            let _ = writeln!(
                s,
                "\n## C programs on each vchan library\n\n\
                 The same C binaries on the upstream C library and on ours (phases\n\
                 `libxenvchan`, `cqrexec`; single runs, TCG).\n\n\
                 | program | library | result | MiB/s |\n|---|---|---|---|"
            );
            for d in &self.dropin {
                let result = if d.total > 0 && d.passed == d.total {
                    format!("pass ({}/{})", d.passed, d.total)
                } else {
                    format!("FAIL ({}/{})", d.passed, d.total)
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {result} | {} |",
                    d.program, d.library, d.rate
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

pub(super) fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drop-in table says pass only when every check of a row passed.
    #[test]
    fn drop_in_table_rows() {
        let mut r = Report::default();
        assert!(!r.markdown("t").contains("C programs on each vchan library"));
        for (library, passed) in [("ours", 3), ("Qubes' libvchan-xen (C)", 5)] {
            r.dropin.push(DropIn {
                program: "C agent".into(),
                library,
                passed,
                total: 5,
                rate: "up 1.0, down 2.0".into(),
            });
        }
        let md = r.markdown("t");
        assert!(
            md.contains("| C agent | ours | FAIL (3/5) | up 1.0, down 2.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| C agent | Qubes' libvchan-xen (C) | pass (5/5) |"),
            "{md}"
        );
    }

    #[test]
    fn paired_ratios_take_each_repetition_against_its_own_c_run() {
        // The host slows down between repetitions: the best runs alone
        // (C 120, ours 108, both in rep 0) say 0.90; within each
        // repetition ours is at 0.90, 0.95 and 1.00 of C.
        let reps = [
            [Some(120.0), Some(108.0), Some(60.0), None],
            [Some(100.0), Some(95.0), None, None],
            [Some(90.0), Some(90.0), Some(45.0), None],
        ];
        let p = paired_ratios(&reps);
        let ours = p[0].unwrap();
        assert!((ours.median - 0.95).abs() < 1e-9, "{ours:?}");
        assert!((ours.min - 0.90).abs() < 1e-9 && (ours.max - 1.0).abs() < 1e-9);
        assert_eq!(ours.n, 3);
        // Two repetitions: the median is their mean.
        let recv = p[1].unwrap();
        assert!((recv.median - 0.5).abs() < 1e-9 && recv.n == 2, "{recv:?}");
        // Never measured: nothing to say.
        assert_eq!(p[2], None);
        // One repetition is not a spread; a C run of 0 is not divided by.
        assert_eq!(paired_ratios(&reps[..1])[0], None);
        assert_eq!(
            paired_ratios(&[[Some(0.0), Some(1.0), None, None]; 3])[0],
            None
        );
    }
}
