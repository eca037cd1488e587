//! The supervisor's admin socket (`run/qubesd.sock`), the simulation's
//! stand-in for qubesd: the daemons ask it for the list of running VMs and
//! to create and destroy disposable VMs.
//!
//! One request per connection, one line each way:
//! * `list` → one line per VM:
//!   `vm NAME DOMID DISPVM_TEMPLATE|- TEMPLATE_FOR_DISPVMS(0|1) DEFAULT_DISPVM|-`,
//!   then `end`;
//! * `create-dispvm TEMPLATE` → `ok NAME DOMID` once the new VM's agent and
//!   daemon are up, or `error MESSAGE`;
//! * `kill NAME` → `ok` once the DispVM's processes are gone, or `error MESSAGE`;
//! * `stats` → `ok grant-peak-pages=N grant-refused=M`: the most pages one
//!   domain had granted at once, and the shares refused for the limit,
//!   since the simulation started.

use crate::policy::{SystemInfo, VmInfo};
use crate::{Error, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a request may take (DispVM creation starts two processes).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn request(sock: &Path, line: &str) -> Result<Vec<String>> {
    let what = || format!("qubesd request '{line}' on {}", sock.display());
    let mut s = UnixStream::connect(sock).map_err(|e| Error::io(what(), e))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| Error::io(what(), e))?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| Error::io(what(), e))?;
    let mut lines = Vec::new();
    for l in BufReader::new(s).lines() {
        let l = l.map_err(|e| Error::io(what(), e))?;
        if l == "end" {
            return Ok(lines);
        }
        let done = l.starts_with("ok") || l.starts_with("error");
        lines.push(l);
        if done {
            return Ok(lines);
        }
    }
    Err(Error::other(format!("{}: connection closed early", what())))
}

/// Format one VM as a `list` line.
pub fn format_vm(v: &VmInfo) -> String {
    format!(
        "vm {} {} {} {} {}",
        v.name,
        v.domid,
        v.dispvm_template.as_deref().unwrap_or("-"),
        u8::from(v.template_for_dispvms),
        v.default_dispvm.as_deref().unwrap_or("-")
    )
}

/// Parse a `list` line.
///
/// ```
/// use qubes_sim::qubesd::{format_vm, parse_vm};
/// let v = parse_vm("vm disp3 7 dvm 0 dvm").unwrap();
/// assert_eq!(v.domid, 7);
/// assert_eq!(format_vm(&v), "vm disp3 7 dvm 0 dvm");
/// ```
pub fn parse_vm(line: &str) -> Option<VmInfo> {
    let w: Vec<&str> = line.split(' ').collect();
    let ["vm", name, domid, tpl, is_tpl, def] = w[..] else {
        return None;
    };
    let opt = |s: &str| (s != "-").then(|| s.to_string());
    Some(VmInfo {
        name: name.to_string(),
        domid: vchan::parse_domid(domid)?,
        dispvm_template: opt(tpl),
        template_for_dispvms: match is_tpl {
            "1" => true,
            "0" => false,
            _ => return None,
        },
        default_dispvm: opt(def),
    })
}

/// The running VMs.
pub fn list(sock: &Path) -> Result<SystemInfo> {
    let lines = request(sock, "list")?;
    let vms = lines
        .iter()
        .map(|l| parse_vm(l).ok_or_else(|| Error::other(format!("bad qubesd list line '{l}'"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(SystemInfo { vms })
}

fn expect_ok(lines: Vec<String>) -> Result<String> {
    match lines.last().map(String::as_str) {
        Some(l) if l == "ok" || l.starts_with("ok ") => {
            Ok(l.trim_start_matches("ok").trim().to_string())
        }
        Some(l) => Err(Error::other(format!(
            "qubesd: {}",
            l.trim_start_matches("error ")
        ))),
        None => Err(Error::other("qubesd: empty answer")),
    }
}

/// Start a DispVM from `template`; returns its name and domain id.
pub fn create_dispvm(sock: &Path, template: &str) -> Result<(String, u16)> {
    let answer = expect_ok(request(sock, &format!("create-dispvm {template}"))?)?;
    let mut w = answer.split(' ');
    match (w.next(), w.next().and_then(vchan::parse_domid)) {
        (Some(name), Some(domid)) => Ok((name.to_string(), domid)),
        _ => Err(Error::other(format!("qubesd: bad answer 'ok {answer}'"))),
    }
}

/// Destroy a DispVM.
pub fn kill(sock: &Path, name: &str) -> Result<()> {
    expect_ok(request(sock, &format!("kill {name}"))?).map(|_| ())
}

/// Load figures of a running simulation (the `stats` request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// The most pages one domain had granted at once.
    pub grant_peak_pages: usize,
    /// Shares the grant hub refused with `ENOSPC`.
    pub grant_refused: usize,
}

/// Parse the answer of `stats` (after `ok `).
///
/// ```
/// let s = qubes_sim::qubesd::parse_stats("grant-peak-pages=990 grant-refused=3").unwrap();
/// assert_eq!((s.grant_peak_pages, s.grant_refused), (990, 3));
/// assert!(qubes_sim::qubesd::parse_stats("grant-peak-pages=x").is_none());
/// ```
pub fn parse_stats(answer: &str) -> Option<Stats> {
    let mut peak = None;
    let mut refused = None;
    for w in answer.split(' ') {
        match w.split_once('=')? {
            ("grant-peak-pages", v) => peak = Some(v.parse().ok()?),
            ("grant-refused", v) => refused = Some(v.parse().ok()?),
            _ => {}
        }
    }
    Some(Stats {
        grant_peak_pages: peak?,
        grant_refused: refused?,
    })
}

/// The simulation's load figures.
pub fn stats(sock: &Path) -> Result<Stats> {
    let answer = expect_ok(request(sock, "stats")?)?;
    parse_stats(&answer).ok_or_else(|| Error::other(format!("qubesd: bad answer 'ok {answer}'")))
}
