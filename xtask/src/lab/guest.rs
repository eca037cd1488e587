//! Running commands in the guests and moving files in.
//!
//! * dom0: the QEMU guest agent's `guest-exec` (stdout and stderr apart,
//!   the real exit code).
//! * a domU: dom0's `lab-domu run NAME CMD`, which talks to the domU's
//!   console agent (stdout and stderr combined, exit code passed through;
//!   one command at a time per domU).
//! * files: the cache's `share/` folder is dom0's `/mnt/host` (9p); dom0
//!   hands them to each domU on a block device (`lab-domu push`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::qga::{self, Output};
use super::{Config, vm};

/// A handle on a running lab.
#[derive(Debug, Clone)]
pub struct Lab {
    cfg: Config,
    qga: PathBuf,
}

/// Quotes `s` for the guest shell through base64, so that no quoting can
/// go wrong on the way.
pub fn b64q(s: &str) -> String {
    format!(
        "\"$(echo {} | base64 -d)\"",
        qga::base64_encode(s.as_bytes())
    )
}

impl Lab {
    /// Attaches to the running lab.
    pub fn attach(cfg: &Config) -> Result<Lab, String> {
        vm::running_pid(cfg).ok_or("the lab is not running (cargo xtask lab start)")?;
        Ok(Lab {
            cfg: cfg.clone(),
            qga: cfg.run_dir().join("qga.sock"),
        })
    }

    /// The settings.
    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// Runs a shell command in dom0.
    pub fn dom0(&self, cmd: &str, timeout: Duration) -> Result<Output, String> {
        if vm::running_pid(&self.cfg).is_none() {
            return Err("QEMU is not running any more".into());
        }
        qga::exec(&self.qga, cmd, timeout)
    }

    /// Runs a shell command in a domU (stdout and stderr combined).
    pub fn domu(&self, name: &str, cmd: &str, timeout: Duration) -> Result<Output, String> {
        let t = timeout.as_secs().max(1);
        let out = self.dom0(
            &format!("LAB_TIMEOUT={t} lab-domu run {name} {}", b64q(cmd)),
            timeout + Duration::from_secs(30),
        )?;
        let mut o = out.clone();
        // lab-domu's own complaints (no such domain, timeout) go to stderr.
        o.stdout = out.all();
        o.stderr.clear();
        Ok(o)
    }

    /// Runs a shell command in `dom` (`dom0` or a domU's name); for domUs
    /// stdout and stderr are combined.
    pub fn on(&self, dom: &str, cmd: &str, timeout: Duration) -> Result<Output, String> {
        if dom == "dom0" {
            self.dom0(cmd, timeout)
        } else {
            self.domu(dom, cmd, timeout)
        }
    }

    /// Creates domUs (a no-op for those that exist), all at once, and waits
    /// for their agents.
    pub fn create_domus(&self, names: &[String]) -> Result<(), String> {
        self.create_domus_with(names, "")
    }

    /// Like [`Lab::create_domus`], with more kernel parameters for them
    /// (`cmdline`: space-separated `key=value` words, no quotes).
    pub fn create_domus_with(&self, names: &[String], cmdline: &str) -> Result<(), String> {
        if !cmdline
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " ._=-,".contains(c))
        {
            return Err(format!(
                "kernel parameters {cmdline:?}: unexpected characters"
            ));
        }
        let mut script = String::new();
        for (i, n) in names.iter().enumerate() {
            script.push_str(&format!(
                "LAB_DOMU_CMDLINE='{cmdline}' lab-domu create {n} {} {} > /run/lab/create-{i}.log 2>&1 & p{i}=$!; ",
                self.cfg.domu_mem, self.cfg.domu_vcpus
            ));
        }
        script.push_str("rc=0; ");
        for (i, n) in names.iter().enumerate() {
            script.push_str(&format!(
                "if ! wait $p{i}; then rc=1; echo \"creating {n} failed:\"; cat /run/lab/create-{i}.log; fi; "
            ));
        }
        script.push_str("exit $rc");
        let r = self.dom0(&script, self.cfg.boot_timeout)?;
        if r.ok() { Ok(()) } else { Err(r.all()) }
    }

    /// The domain id of a domain (`dom0` is 0).
    pub fn domid(&self, name: &str) -> Result<u16, String> {
        if name == "dom0" {
            return Ok(0);
        }
        let r = self.dom0(&format!("xl domid {name}"), Duration::from_secs(60))?;
        r.stdout
            .trim()
            .parse()
            .map_err(|_| format!("xl domid {name}: {}", r.all().trim()))
    }

    /// The lab domUs that are running now.
    pub fn running_domus(&self) -> Result<Vec<String>, String> {
        let r = self.dom0(
            "xl list | awk 'NR>2 && $1 ~ /^domU/ {print $1}'",
            Duration::from_secs(60),
        )?;
        Ok(r.stdout.split_whitespace().map(String::from).collect())
    }

    /// Copies files to `/mnt/host/` in dom0 and in the given domUs (default:
    /// every running lab domU).
    pub fn push(&self, files: &[PathBuf], domus: Option<&[String]>) -> Result<(), String> {
        let share = self.cfg.share_dir();
        std::fs::create_dir_all(&share).map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        for f in files {
            let base = f
                .file_name()
                .ok_or_else(|| format!("{}: not a file", f.display()))?;
            let dst = share.join(base);
            copy_replacing(f, &dst)?;
            names.push(format!("/mnt/host/{}", base.to_string_lossy()));
        }
        let domus = match domus {
            Some(d) => d.to_vec(),
            None => self.running_domus()?,
        };
        for d in &domus {
            let r = self.dom0(
                &format!("lab-domu push {d} {}", names.join(" ")),
                self.cfg.cmd_timeout,
            )?;
            if !r.ok() {
                return Err(format!("push to {d} failed: {}", r.all()));
            }
        }
        eprintln!(
            "lab: pushed {} to dom0{}",
            names.join(" "),
            domus.iter().map(|d| format!(", {d}")).collect::<String>()
        );
        Ok(())
    }
}

/// Copies `src` over `dst` through a temporary name, so that a guest that
/// still runs the old file (9p) keeps its inode.
pub(super) fn copy_replacing(src: &Path, dst: &Path) -> Result<(), String> {
    let tmp = dst.with_extension("lab-tmp");
    std::fs::copy(src, &tmp).map_err(|e| format!("copy {}: {e}", src.display()))?;
    std::fs::rename(&tmp, dst).map_err(|e| format!("rename {}: {e}", tmp.display()))
}
