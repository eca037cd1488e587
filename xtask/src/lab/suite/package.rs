//! The lab's `package` phase (full run): our `.deb` installed as a user
//! would, in a domU booted from a Debian root file system
//! ([`crate::lab::debian_domu`]), and the lab's qrexec calls made with the
//! **installed** `qrexec-client-vm`.
//!
//! | step | checks |
//! |---|---|
//! | host: `cargo xtask package` | the `.deb` and `.rpm` are built (cargo-deb, cargo-generate-rpm must be installed) |
//! | host: `dpkg-deb -c`, `rpm -qlp` | each package holds the command, the man page and the three completions where its distribution wants them |
//! | host: `rpm --root` | the `.rpm` installed into a copy of the Debian domU's root with a stand-in C command: ours runs, `rpm -e` gives the C command back, the tree is as before (`package_check`) |
//! | `domU3` | boots from the Debian root (dom0's `/dev/vdb`, a tmpfs overlay), with only the `.deb`, `vchan-peer` and `qubes-sim` in `/mnt/host` |
//! | `dpkg -i` | exit 0; before it no `qrexec-client-vm` on `PATH`, after it `command -v` is `/usr/bin/qrexec-client-vm`, owned by `qrexec-client-vm-rs` (`dpkg -S`) |
//! | `dpkg -L` | the command, the man page, the completions |
//! | `man qrexec-client-vm` | man-db renders the page (SYNOPSIS, EXIT STATUS) |
//! | the qrexec calls | those of the `qrexec` phase (`qrexec.rs`) with domU3 as the caller and `qrexec-client-vm` from `PATH`: 100 MiB with checksums, refusal 126, `--buffer-size=1048576`, exit code 3, 127 |
//! | `dpkg --purge` | exit 0; no `qrexec-client-vm` on `PATH`, no diversion left; `find / -xdev` (path, type, mode, size of files) as before the install, except `/tmp`, `/var/log`, `/var/lib/dpkg`, `/var/cache` |
//!
//! Not in `--quick` (CI): CI installs neither cargo-deb nor
//! cargo-generate-rpm (minutes to compile), which `cargo xtask package`
//! needs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::qrexec::{self, Caller};
use super::{Run, St};
use crate::lab::debian_domu;
// The Debian package's name, and what the `.deb` (`dpkg -c`, `dpkg -L`)
// and the `.rpm` (`rpm -qlp`) must install: `cargo xtask package`'s own
// lists, which its tests check against the packages' metadata.
use crate::package::{
    CLIENT_DEB_FILES as DEB_FILES, CLIENT_PKG as PKG, CLIENT_RPM_FILES as RPM_FILES, newest,
};

const SECTION: &str = "package";
/// The Debian-root domU of this phase.
const DOMU: &str = "domU3";

/// Parts of the Debian root that change without the package having left
/// anything: dpkg's own database and logs, the man-db index (its trigger),
/// scratch space (the qrexec calls' files).
const TREE_SKIP: &[&str] = &["/tmp", "/var/log", "/var/lib/dpkg", "/var/cache"];

/// The `find` that lists the Debian root (one file system: not /proc,
/// /sys, /dev, /run, /mnt/host): path, type, mode, and the size of files
/// (not of directories: the overlay reports a directory's size in the
/// layer it was last copied up to).
fn tree_cmd(out: &str) -> String {
    let prune: Vec<String> = TREE_SKIP.iter().map(|p| format!("-path {p}")).collect();
    format!(
        "find / -xdev \\( {} \\) -prune -o -type f -printf '%p %y %m %s\\n' -o -printf '%p %y %m\\n' \
         | LC_ALL=C sort > {out}",
        prune.join(" -o ")
    )
}

/// The names in `list` (one path per line, or `dpkg-deb -c` lines) that
/// miss from `want`.
fn missing<'a>(list: &str, want: &[&'a str]) -> Vec<&'a str> {
    want.iter()
        .copied()
        .filter(|w| {
            !list.lines().any(|l| {
                let path = l.split_whitespace().last().unwrap_or("");
                path.trim_start_matches('.') == *w
            })
        })
        .collect()
}

/// Runs `cargo xtask package` (this very xtask) and returns the `.deb`
/// and `.rpm` of `qrexec-client-vm-rs` it made.
fn build_packages() -> Result<(PathBuf, PathBuf), String> {
    let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    crate::package::run_tool(Command::new(me).arg("package"))
        .map_err(|e| format!("cargo xtask package: {e}"))?;
    let dir = crate::util::target_dir().join("packages");
    Ok((
        newest(&dir, &format!("{PKG}_"), ".deb")?,
        newest(&dir, &format!("{PKG}-"), ".rpm")?,
    ))
}

fn host(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn pass_if(ok: bool) -> St {
    if ok { St::Pass } else { St::Fail }
}

/// Runs the phase; domU3 is destroyed on every path.
pub(super) fn phase(run: &mut Run) -> Result<(), String> {
    // On the host: the packages and what they hold.
    let t = Instant::now();
    let (deb, rpm) = build_packages()?;
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    run.rep.add(
        SECTION,
        "cargo xtask package",
        St::Pass,
        format!(
            "{} and {} in {:.1}s",
            name(&deb),
            name(&rpm),
            t.elapsed().as_secs_f64()
        ),
    );
    let list = host(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    run.save_log("package-dpkg-c", &list);
    let miss = missing(&list, DEB_FILES);
    run.rep.add(
        SECTION,
        "dpkg-deb -c: the command, the man page, the completions, the copyright",
        pass_if(miss.is_empty()),
        if miss.is_empty() {
            files_of(&list)
        } else {
            format!("missing {miss:?} in\n{list}")
        },
    );
    let list = host(Command::new("rpm").arg("-qlp").arg(&rpm))?;
    run.save_log("package-rpm-qlp", &list);
    let miss = missing(&list, RPM_FILES);
    run.rep.add(
        SECTION,
        "rpm -qlp: the command, the man page, the completions",
        pass_if(miss.is_empty()),
        if miss.is_empty() {
            list.lines().collect::<Vec<_>>().join(" ")
        } else {
            format!("missing {miss:?} in\n{list}")
        },
    );
    let t = Instant::now();
    let base = debian_domu::rootfs(run.lab.cfg());
    let r = crate::package_check::run_rpm(&base, &rpm);
    run.rep.add(
        SECTION,
        "rpm -i --root into a copy of the Debian domU's root (stand-in C command), rpm -e",
        pass_if(r.is_ok()),
        match r {
            Ok(()) => format!(
                "ours runs, the C command runs as .distrib, rpm -e brings it back, the file tree is as it was ({:.1}s)",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => e,
        },
    );

    // In a Debian domU.
    let share = run.lab.cfg().share_dir();
    let files = [
        deb.clone(),
        share.join("vchan-peer"),
        share.join("qubes-sim"),
    ];
    let took = debian_domu::create(&run.lab, DOMU, &files)?;
    let r = in_domu(run, &name(&deb), took);
    let d = debian_domu::destroy(&run.lab, DOMU);
    run.forget_id(DOMU);
    r.and(d)
}

/// `dpkg-deb -c` lines -> the file paths (no directories).
fn files_of(list: &str) -> String {
    list.lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.'))
        .collect::<Vec<_>>()
        .join(" ")
}

fn in_domu(run: &mut Run, deb: &str, boot: Duration) -> Result<(), String> {
    let out = run.on(
        DOMU,
        &format!(
            "echo \"@@debian=$(cat /etc/debian_version)\"; echo \"@@root=$(findmnt -no FSTYPE /)\"; \
             echo \"@@host=$(ls /mnt/host | tr '\\n' ' ')\"; echo \"@@before=$(command -v qrexec-client-vm)\"; \
             s=$(date +%s.%N); {}; e=$(date +%s.%N); echo \"@@entries=$(wc -l < /run/lab/tree.before)\"; \
             echo \"@@secs=$(echo \"$e $s\" | awk '{{print $1-$2}}')\"",
            tree_cmd("/run/lab/tree.before")
        ),
        Duration::from_secs(600),
    )?;
    let text = out.all();
    let f = |k: &str| qrexec::marker(&text, k);
    let ok = f("@@before=").is_empty()
        && !f("@@debian=").is_empty()
        && f("@@entries=").parse::<u32>().is_ok_and(|n| n > 1000);
    run.rep.add(
        SECTION,
        format!("{DOMU} booted from the Debian root file system (no qrexec-client-vm on PATH)"),
        pass_if(ok),
        format!(
            "Debian {}, root {} (image read-only, tmpfs overlay), boot {:.1}s; /mnt/host: {}; file tree: {} entries listed in {}s",
            f("@@debian="), f("@@root="), boot.as_secs_f64(), f("@@host="), f("@@entries="), f("@@secs=")
        ),
    );
    if !ok {
        return Err(format!("{DOMU} is not as expected: {text}"));
    }

    // dpkg -i
    let out = run.on(
        DOMU,
        &format!(
            "s=$(date +%s.%N); dpkg -i /mnt/host/{deb} > /tmp/dpkg-i.log 2>&1; rc=$?; e=$(date +%s.%N); \
             echo \"@@rc=$rc\"; echo \"@@secs=$(echo \"$e $s\" | awk '{{print $1-$2}}')\"; \
             echo \"@@path=$(command -v qrexec-client-vm)\"; echo \"@@owner=$(dpkg -S /usr/bin/qrexec-client-vm 2>&1 | tail -n 1)\"; \
             echo \"@@status=$(dpkg-query -W -f='${{Status}} ${{Version}}' {PKG})\"; \
             echo \"@@libc=$(ldd /usr/bin/qrexec-client-vm 2>&1 | grep -o 'libc.so.6 => [^ ]*')\"; \
             echo \"@@help=$(qrexec-client-vm --help | grep -m1 '^Usage:')\"; cat /tmp/dpkg-i.log"
        ),
        Duration::from_secs(300),
    )?;
    let text = out.all();
    run.save_log("package-dpkg-i", &text);
    let f = |k: &str| qrexec::marker(&text, k);
    let ok = f("@@rc=") == "0"
        && f("@@path=") == "/usr/bin/qrexec-client-vm"
        && f("@@owner=") == format!("{PKG}: /usr/bin/qrexec-client-vm")
        && f("@@status=").starts_with("install ok installed")
        && f("@@help=").starts_with("Usage: qrexec-client-vm");
    run.rep.add(
        SECTION,
        format!("dpkg -i {deb}: `command -v qrexec-client-vm` is the package's file"),
        pass_if(ok),
        format!(
            "rc {} in {}s; {}; dpkg -S: {}; {}; dynamic, {}; --help: {}{}",
            f("@@rc="),
            f("@@secs="),
            f("@@path="),
            f("@@owner="),
            f("@@status="),
            f("@@libc="),
            f("@@help="),
            if ok {
                String::new()
            } else {
                format!("\n{text}")
            }
        ),
    );
    if !ok {
        return Err("dpkg -i failed; not running the calls".into());
    }
    // The listing sees what the install added (so that "as before" after
    // the purge means something).
    let out = run.on(
        DOMU,
        &format!(
            "{}; diff /run/lab/tree.before /run/lab/tree.installed > /tmp/tree-i.diff; \
             echo \"@@removed=$(grep -c '^<' /tmp/tree-i.diff)\"; \
             echo \"@@added=$(grep '^>' /tmp/tree-i.diff | cut -d' ' -f2 | tr '\\n' ' ')\"",
            tree_cmd("/run/lab/tree.installed")
        ),
        Duration::from_secs(600),
    )?;
    let text = out.all();
    let added = qrexec::marker(&text, "@@added=");
    let added: Vec<&str> = added.split_whitespace().collect();
    let miss: Vec<&&str> = DEB_FILES.iter().filter(|f| !added.contains(f)).collect();
    let ok = miss.is_empty() && qrexec::marker(&text, "@@removed=") == "0";
    run.rep.add(
        SECTION,
        "the file-tree listing after dpkg -i shows the package's files added, nothing removed",
        pass_if(ok),
        if ok {
            format!("+{} entries: {}", added.len(), added.join(" "))
        } else {
            format!("missing {miss:?}\n{text}")
        },
    );

    let out = run.on(DOMU, &format!("dpkg -L {PKG}"), Duration::from_secs(120))?;
    let list = out.all();
    run.save_log("package-dpkg-L", &list);
    let miss = missing(&list, DEB_FILES);
    run.rep.add(
        SECTION,
        format!("dpkg -L {PKG}"),
        pass_if(miss.is_empty()),
        if miss.is_empty() {
            let files: Vec<&str> = list.lines().filter(|l| DEB_FILES.contains(l)).collect();
            files.join(" ")
        } else {
            format!("missing {miss:?} in\n{list}")
        },
    );
    let out = run.on(
        DOMU,
        "MANWIDTH=80 man -P cat qrexec-client-vm 2>&1; echo \"@@rc=$?\"",
        Duration::from_secs(300),
    )?;
    let text = out.all();
    run.save_log("package-man", &text);
    let ok = qrexec::marker(&text, "@@rc=") == "0"
        && ["SYNOPSIS", "EXIT STATUS", "--buffer-size"]
            .iter()
            .all(|w| text.contains(w));
    run.rep.add(
        SECTION,
        "man qrexec-client-vm (man-db) renders the installed page",
        pass_if(ok),
        if ok {
            format!(
                "{} lines: {}",
                text.lines().count(),
                text.lines()
                    .find(|l| l.contains("qrexec-client-vm -"))
                    .unwrap_or("")
                    .trim()
            )
        } else {
            text
        },
    );

    // The calls, with the installed command.
    qrexec::sim_calls(
        run,
        &Caller {
            dom: DOMU,
            client: "qrexec-client-vm",
            section: SECTION,
            what: "installed qrexec-client-vm",
        },
    )?;

    // dpkg --purge: nothing left.
    let out = run.on(
        DOMU,
        &format!(
            "dpkg --purge {PKG} > /tmp/dpkg-purge.log 2>&1; echo \"@@rc=$?\"; echo \"@@path=$(command -v qrexec-client-vm)\"; \
             echo \"@@div=$(dpkg-divert --list '*qrexec-client-vm*')\"; echo \"@@status=$(dpkg-query -W -f='${{Status}}' {PKG} 2>&1)\"; \
             {}; echo \"@@entries=$(wc -l < /run/lab/tree.after)\"; \
             diff /run/lab/tree.before /run/lab/tree.after > /tmp/tree.diff; echo \"@@diff=$?\"; head -n 40 /tmp/tree.diff; \
             cat /tmp/dpkg-purge.log",
            tree_cmd("/run/lab/tree.after")
        ),
        Duration::from_secs(600),
    )?;
    let text = out.all();
    run.save_log("package-dpkg-purge", &text);
    let f = |k: &str| qrexec::marker(&text, k);
    let ok = f("@@rc=") == "0" && f("@@path=").is_empty() && f("@@div=").is_empty();
    run.rep.add(
        SECTION,
        format!("dpkg --purge {PKG}: no qrexec-client-vm on PATH, no diversion left"),
        pass_if(ok),
        format!(
            "rc {}; command -v: {:?}; diversions: {:?}; dpkg-query: {}",
            f("@@rc="),
            f("@@path="),
            f("@@div="),
            f("@@status=")
        ),
    );
    let same = f("@@diff=") == "0";
    run.rep.add(
        SECTION,
        format!("file tree after the purge = before the install (find / -xdev: path, type, mode, size; not {})", TREE_SKIP.join(", ")),
        pass_if(same),
        if same {
            format!("{} entries, no difference", f("@@entries="))
        } else {
            text
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_finds_paths_in_both_list_formats() {
        let c = "drwxr-xr-x 0/0 0 2026-12-04 00:00 ./usr/bin/\n\
                 -rwxr-xr-x 0/0 1417744 2026-12-04 00:00 ./usr/bin/qrexec-client-vm\n";
        assert_eq!(
            missing(c, &["/usr/bin/qrexec-client-vm"]),
            Vec::<&str>::new()
        );
        assert_eq!(
            missing(
                "/usr/bin/qrexec-client-vm\n",
                &["/usr/bin/qrexec-client-vm"]
            ),
            Vec::<&str>::new()
        );
        assert_eq!(
            missing(
                "/usr/bin/qrexec-client-vm.distrib\n",
                &["/usr/bin/qrexec-client-vm"]
            ),
            vec!["/usr/bin/qrexec-client-vm"]
        );
        assert_eq!(files_of(c), "/usr/bin/qrexec-client-vm");
    }

    #[test]
    fn the_tree_listing_prunes_only_the_skipped_parts() {
        let c = tree_cmd("/x");
        assert!(c.starts_with("find / -xdev "));
        for p in TREE_SKIP {
            assert!(c.contains(&format!("-path {p}")));
        }
        assert!(c.ends_with("> /x"));
    }
}
