//! The simulation's configuration file.
//!
//! One directive per line; `#` starts a comment (at the start of a line or
//! after a blank); relative paths are relative to the file's directory.
//!
//! ```text
//! # VMs, in order; domain ids count up from 1 unless given.
//! vm work
//! vm personal  services=personal-rpc:rpc
//! vm dvm       template_for_dispvms=yes
//! vm legacy    format=v3 domid=9
//!
//! policy          policy.txt      # the policy file (see the policy module)
//! services        rpc             # default service directories (':'-separated)
//! default_dispvm  dvm             # DispVM template for @dispvm calls
//! ```
//!
//! `vm NAME [key=value ...]` keys:
//! * `domid=N`: the VM's domain id (1 ..= 32751, unique);
//! * `services=DIR[:DIR...]`: where the VM's agent looks for services, first
//!   match wins (as `QREXEC_SERVICE_PATH`); default: the `services` directive;
//! * `format=v4|v3|v2`: the one request format the VM's agent accepts on its
//!   socket (an R4.3+, R4.1/4.2 or R4.0 agent); default `v4`;
//! * `flavour=qubes|mirage|mirage-upstream`: the VM's agent; `mirage` is a
//!   MirageOS unikernel's (mirage-qubes over ocaml-vchan, protocol 3 at
//!   most, see [`crate::mirage`]; implies `format=v3`), `mirage-upstream`
//!   the same with mirage-qubes 2.0's request id in place of the service
//!   name in its own calls; default `qubes`;
//! * `template_for_dispvms=yes|no`: may serve as a DispVM template;
//! * `default_dispvm=NAME`: DispVM template for this VM's `@dispvm` calls.
//!
//! VM names follow Qubes: a letter, then letters, digits, `_` or `-`, at
//! most 31 characters; `dom0` and names `disp<digits>` (used for DispVMs)
//! are reserved.

use crate::{Error, Result};
use qrexec::proto::RequestFormat;
use std::path::{Path, PathBuf};

/// One VM of the simulation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The VM's name.
    pub name: String,
    /// Its domain id.
    pub domid: u16,
    /// Service directories (first match wins).
    pub services: Vec<PathBuf>,
    /// The request format its agent accepts.
    pub format: RequestFormat,
    /// Which agent it runs.
    pub flavour: AgentFlavour,
    /// Whether it may be a DispVM template.
    pub template_for_dispvms: bool,
    /// Its own default DispVM template.
    pub default_dispvm: Option<String>,
}

/// Which qrexec agent a VM runs.
///
/// ```
/// use qubes_sim::config::AgentFlavour;
/// assert_eq!("mirage".parse::<AgentFlavour>().unwrap(), AgentFlavour::Mirage);
/// assert_eq!(AgentFlavour::MirageUpstream.to_string(), "mirage-upstream");
/// assert!("xen".parse::<AgentFlavour>().is_err());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AgentFlavour {
    /// Qubes' own agent ([`crate::agent`]).
    #[default]
    Qubes,
    /// A MirageOS unikernel's ([`crate::mirage`]).
    Mirage,
    /// [`AgentFlavour::Mirage`] with mirage-qubes 2.0's trigger quirk
    /// ([`crate::mirage::MirageOptions::upstream_trigger`]).
    MirageUpstream,
}

impl std::str::FromStr for AgentFlavour {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "qubes" => Ok(AgentFlavour::Qubes),
            "mirage" => Ok(AgentFlavour::Mirage),
            "mirage-upstream" => Ok(AgentFlavour::MirageUpstream),
            _ => Err(format!(
                "unknown agent flavour '{s}' (qubes, mirage, mirage-upstream)"
            )),
        }
    }
}

impl std::fmt::Display for AgentFlavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentFlavour::Qubes => "qubes",
            AgentFlavour::Mirage => "mirage",
            AgentFlavour::MirageUpstream => "mirage-upstream",
        })
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// The VMs, in file order.
    pub vms: Vec<VmConfig>,
    /// The policy file.
    pub policy: PathBuf,
    /// Default service directories.
    pub services: Vec<PathBuf>,
    /// Global default DispVM template.
    pub default_dispvm: Option<String>,
}

/// Whether `name` is a valid name for a configured VM.
///
/// ```
/// use qubes_sim::config::valid_vm_name;
/// assert!(valid_vm_name("work-2"));
/// assert!(!valid_vm_name("2work"));
/// assert!(!valid_vm_name("dom0"));
/// assert!(!valid_vm_name("disp12"));
/// ```
pub fn valid_vm_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 31
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        && name != "dom0"
        && !is_dispvm_name(name)
}

/// Whether `name` has the form of a DispVM name (`disp` + digits).
pub fn is_dispvm_name(name: &str) -> bool {
    name.strip_prefix("disp")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "yes" | "true" | "1" | "True" => Some(true),
        "no" | "false" | "0" | "False" => Some(false),
        _ => None,
    }
}

fn parse_paths(base: &Path, v: &str) -> Vec<PathBuf> {
    v.split(':')
        .filter(|p| !p.is_empty())
        .map(|p| base.join(p))
        .collect()
}

/// Strip a comment: `#` at the start or after whitespace.
pub(crate) fn strip_comment(line: &str) -> &str {
    let mut prev_blank = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_blank {
            return &line[..i];
        }
        prev_blank = c.is_whitespace();
    }
    line
}

impl SimConfig {
    /// Read and parse a configuration file.
    pub fn load(path: &Path) -> Result<SimConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        SimConfig::parse(&text, base, &path.display().to_string())
    }

    /// Parse configuration text; relative paths are joined to `base`;
    /// `origin` names the file in errors.
    ///
    /// ```
    /// use qubes_sim::config::SimConfig;
    /// let c = SimConfig::parse("vm a\nvm b domid=7\npolicy p\nservices s\n",
    ///                          std::path::Path::new("/cfg"), "sim.conf").unwrap();
    /// assert_eq!(c.vms[0].domid, 1);
    /// assert_eq!(c.vms[1].domid, 7);
    /// assert_eq!(c.vms[1].services, vec![std::path::PathBuf::from("/cfg/s")]);
    /// ```
    pub fn parse(text: &str, base: &Path, origin: &str) -> Result<SimConfig> {
        let err = |line: usize, msg: String| Error::Parse {
            path: origin.to_string(),
            line,
            msg,
        };
        struct PendingVm {
            cfg: VmConfig,
            domid_given: bool,
            services_given: bool,
        }
        let mut vms: Vec<PendingVm> = Vec::new();
        let mut policy = None;
        let mut services = Vec::new();
        let mut default_dispvm = None;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let words: Vec<&str> = strip_comment(raw).split_whitespace().collect();
            let Some((&directive, args)) = words.split_first() else {
                continue;
            };
            match directive {
                "vm" => {
                    let Some((&name, opts)) = args.split_first() else {
                        return Err(err(n, "vm needs a name".into()));
                    };
                    if !valid_vm_name(name) {
                        return Err(err(n, format!("invalid VM name '{name}'")));
                    }
                    if vms.iter().any(|v| v.cfg.name == name) {
                        return Err(err(n, format!("VM '{name}' defined twice")));
                    }
                    let mut vm = PendingVm {
                        cfg: VmConfig {
                            name: name.to_string(),
                            domid: 0,
                            services: Vec::new(),
                            format: RequestFormat::V4,
                            flavour: AgentFlavour::Qubes,
                            template_for_dispvms: false,
                            default_dispvm: None,
                        },
                        domid_given: false,
                        services_given: false,
                    };
                    let mut format_given = false;
                    for opt in opts {
                        let Some((k, v)) = opt.split_once('=') else {
                            return Err(err(n, format!("expected key=value, got '{opt}'")));
                        };
                        match k {
                            "domid" => {
                                let d = vchan::parse_domid(v)
                                    .filter(|&d| d != 0)
                                    .ok_or_else(|| err(n, format!("invalid domid '{v}'")))?;
                                vm.cfg.domid = d;
                                vm.domid_given = true;
                            }
                            "services" => {
                                vm.cfg.services = parse_paths(base, v);
                                vm.services_given = true;
                            }
                            "format" => {
                                vm.cfg.format = qrexec::format::parse_format(v)
                                    .map_err(|e| err(n, e.to_string()))?;
                                format_given = true;
                            }
                            "flavour" => vm.cfg.flavour = v.parse().map_err(|e| err(n, e))?,
                            "template_for_dispvms" => {
                                vm.cfg.template_for_dispvms = parse_bool(v).ok_or_else(|| {
                                    err(n, format!("expected yes or no, got '{v}'"))
                                })?;
                            }
                            "default_dispvm" => vm.cfg.default_dispvm = Some(v.to_string()),
                            _ => return Err(err(n, format!("unknown vm option '{k}'"))),
                        }
                    }
                    if vm.cfg.flavour != AgentFlavour::Qubes {
                        // mirage-qubes speaks protocol 3 at most.
                        if format_given && vm.cfg.format != RequestFormat::V3 {
                            return Err(err(n, "a mirage agent speaks format=v3 only".into()));
                        }
                        vm.cfg.format = RequestFormat::V3;
                    }
                    vms.push(vm);
                }
                "policy" | "services" | "default_dispvm" => {
                    let [value] = args else {
                        return Err(err(n, format!("{directive} needs exactly one value")));
                    };
                    match directive {
                        "policy" => policy = Some(base.join(value)),
                        "services" => services = parse_paths(base, value),
                        _ => default_dispvm = Some(value.to_string()),
                    }
                }
                _ => return Err(err(n, format!("unknown directive '{directive}'"))),
            }
        }
        let end = text.lines().count().max(1);
        if vms.is_empty() {
            return Err(err(end, "no vm defined".into()));
        }
        let policy = policy.ok_or_else(|| err(end, "no policy file given".into()))?;
        // Domain ids: given ones are fixed, the others count up from 1.
        let mut used: Vec<u16> = vms
            .iter()
            .filter(|v| v.domid_given)
            .map(|v| v.cfg.domid)
            .collect();
        {
            let mut sorted = used.clone();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[0] == w[1]) {
                return Err(err(end, "two VMs have the same domid".into()));
            }
        }
        let mut next = 1u16;
        for vm in vms.iter_mut().filter(|v| !v.domid_given) {
            while used.contains(&next) {
                next += 1;
            }
            vm.cfg.domid = next;
            used.push(next);
        }
        let names: Vec<String> = vms.iter().map(|v| v.cfg.name.clone()).collect();
        let check_tpl = |t: &Option<String>, what: &str| -> Result<()> {
            match t {
                Some(t)
                    if !vms
                        .iter()
                        .any(|v| &v.cfg.name == t && v.cfg.template_for_dispvms) =>
                {
                    Err(err(
                        end,
                        format!("{what} '{t}' is not a VM with template_for_dispvms=yes"),
                    ))
                }
                _ => Ok(()),
            }
        };
        check_tpl(&default_dispvm, "default_dispvm")?;
        for v in &vms {
            check_tpl(&v.cfg.default_dispvm, "default_dispvm")?;
        }
        debug_assert_eq!(names.len(), vms.len());
        let vms = vms
            .into_iter()
            .map(|mut v| {
                if !v.services_given {
                    v.cfg.services = services.clone();
                }
                v.cfg
            })
            .collect();
        Ok(SimConfig {
            vms,
            policy,
            services,
            default_dispvm,
        })
    }

    /// The VM with this name.
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<SimConfig> {
        SimConfig::parse(t, Path::new("/base"), "test.conf")
    }

    #[test]
    fn full_example() {
        let c = parse(
            "# comment\nvm work\nvm personal services=p:/abs # trailing\n\
             vm dvm template_for_dispvms=yes\nvm legacy format=v3 domid=2\n\
             policy pol\nservices rpc\ndefault_dispvm dvm\n",
        )
        .unwrap();
        let ids: Vec<u16> = c.vms.iter().map(|v| v.domid).collect();
        assert_eq!(ids, [1, 3, 4, 2]);
        assert_eq!(c.vms[0].services, vec![PathBuf::from("/base/rpc")]);
        assert_eq!(
            c.vms[1].services,
            vec![PathBuf::from("/base/p"), PathBuf::from("/abs")]
        );
        assert!(c.vms[2].template_for_dispvms);
        assert_eq!(c.vms[3].format, RequestFormat::V3);
        assert_eq!(c.policy, PathBuf::from("/base/pol"));
        assert_eq!(c.default_dispvm.as_deref(), Some("dvm"));
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line) in [
            ("vm 1bad\npolicy p\n", 1),
            ("vm a\nvm a\npolicy p\n", 2),
            ("vm a frob=1\npolicy p\n", 1),
            ("vm a domid=0\npolicy p\n", 1),
            ("vm a domid=01\npolicy p\n", 1),
            ("vm a format=v9\npolicy p\n", 1),
            ("vm a\nbogus x\npolicy p\n", 2),
            ("vm a\npolicy p q\n", 2),
        ] {
            match parse(text) {
                Err(Error::Parse { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(parse("policy p\n").is_err(), "no vm");
        assert!(parse("vm a\n").is_err(), "no policy");
        assert!(parse("vm a domid=3\nvm b domid=3\npolicy p\n").is_err());
        assert!(parse("vm a\npolicy p\ndefault_dispvm a\n").is_err());
        assert!(parse("vm a default_dispvm=zz\npolicy p\n").is_err());
    }

    #[test]
    fn comments() {
        assert_eq!(strip_comment("a b # c"), "a b ");
        assert_eq!(strip_comment("# c"), "");
        assert_eq!(strip_comment("a#b"), "a#b");
    }
}
