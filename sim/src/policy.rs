//! The simulation's qrexec policy: a small subset of the Qubes policy
//! format (`/etc/qubes/policy.d`, "v5").
//!
//! One rule per line, five columns and optional `key=value` parameters;
//! `#` starts a comment (at the start of a line or after a blank):
//!
//! ```text
//! # service      argument  source   target        action  [params]
//! demo.Echo      *         @anyvm   @anyvm        allow
//! demo.Secret    *         @anyvm   vault         deny
//! demo.Store     +backup   work     @default      allow   target=vault
//! demo.Open      *         @anyvm   @dispvm       allow
//! *              *         @anyvm   @anyvm        deny
//! ```
//!
//! * **service**: a service name (`demo.Echo`) or `*`.
//! * **argument**: `*` (any), or `+ARG` for exactly that argument (`+`
//!   alone: the empty argument, which is also what a call without `+` has).
//! * **source**: a VM name, `@anyvm`, `*`, `@dispvm` (any disposable VM), or
//!   `@dispvm:TPL` (a disposable VM made from `TPL`).
//! * **target** (what the caller asked for, after `$`→`@` and with an
//!   unknown VM name or an empty target read as `@default`): a VM name,
//!   `@anyvm` (any existing VM named by the caller), `@default`, `@dispvm`,
//!   `@dispvm:TPL`, or `*` (anything).
//! * **action**: `allow` or `deny`. `allow` takes `target=` (send the call
//!   to another VM or to `@dispvm[:TPL]` instead: "allow with a different
//!   target") and `user=` (the user the service runs as; default the VM's
//!   default user). `ask` is not supported (there is nobody to ask).
//!
//! The first matching rule decides; no match means deny. After an `allow`,
//! the call is still denied when the final target is `@default` (allow
//! needs `target=` there), a VM that does not exist, the source itself
//! (loopback), `@dispvm` without a default DispVM template, or a template
//! without `template_for_dispvms=yes`. Calls to dom0 (`@adminvm`, `dom0`)
//! are not simulated and are denied.
//!
//! A denied call is refused exactly as dom0 refuses it: `MSG_SERVICE_REFUSED`
//! to the source agent, which closes the client's socket; the client prints
//! `Request refused` and exits 126.

use crate::config::strip_comment;
use crate::{Error, Result};
use std::path::Path;

/// A VM as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// Domain id.
    pub domid: u16,
    /// For a DispVM: its template.
    pub dispvm_template: Option<String>,
    /// May be a DispVM template.
    pub template_for_dispvms: bool,
    /// Its default DispVM template (already resolved against the global one).
    pub default_dispvm: Option<String>,
}

/// The running system.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemInfo {
    /// All running VMs.
    pub vms: Vec<VmInfo>,
}

impl SystemInfo {
    /// The VM with this name.
    pub fn vm(&self, name: &str) -> Option<&VmInfo> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// The VM with this domain id.
    pub fn by_domid(&self, domid: u16) -> Option<&VmInfo> {
        self.vms.iter().find(|v| v.domid == domid)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Service {
    Any,
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Argument {
    Any,
    Exactly(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Star,
    AnyVm,
    Default,
    DispVm,
    DispVmOf(String),
    Name(String),
}

/// What an `allow` rule sends the call to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Redirect {
    Name(String),
    DispVm,
    DispVmOf(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Allow {
        target: Option<Redirect>,
        user: Option<String>,
    },
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    line: usize,
    service: Service,
    argument: Argument,
    source: Who,
    target: Who,
    action: Action,
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// A call as the source daemon received it (after sanitising).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The calling VM.
    pub source: &'a str,
    /// The target as sent (`@default`, a name, `@dispvm:tpl`, ...).
    pub target: &'a str,
    /// `service[+argument]` as sent.
    pub service_and_arg: &'a str,
}

/// Where an allowed call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A running VM.
    Vm(String),
    /// A fresh DispVM from this template.
    NewDispVm(String),
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run the call.
    Allow {
        /// Where.
        target: Target,
        /// As which user (`None`: the VM's default user).
        user: Option<String>,
        /// The line of the rule that allowed it.
        line: usize,
    },
    /// Refuse it.
    Deny {
        /// Why (for the daemon's log).
        reason: String,
    },
}

fn parse_who(word: &str, column: &str) -> std::result::Result<Who, String> {
    Ok(match word {
        "*" => Who::Star,
        "@anyvm" => Who::AnyVm,
        "@default" => Who::Default,
        "@dispvm" => Who::DispVm,
        _ => {
            if let Some(t) = word.strip_prefix("@dispvm:") {
                if !crate::config::valid_vm_name(t) {
                    return Err(format!("invalid template name in '{word}'"));
                }
                Who::DispVmOf(t.to_string())
            } else if word.starts_with('@') {
                return Err(format!("unsupported {column} keyword '{word}'"));
            } else if crate::config::valid_vm_name(word) || crate::config::is_dispvm_name(word) {
                Who::Name(word.to_string())
            } else {
                return Err(format!("invalid {column} '{word}'"));
            }
        }
    })
}

fn valid_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn parse_rule(line: usize, words: &[&str]) -> std::result::Result<Rule, String> {
    let [service, argument, source, target, action, params @ ..] = words else {
        return Err(format!(
            "expected 'service argument source target action [params]', got {} column(s)",
            words.len()
        ));
    };
    let service = match *service {
        "*" => Service::Any,
        s if valid_service_name(s) => Service::Name(s.to_string()),
        s => return Err(format!("invalid service name '{s}'")),
    };
    let argument = match *argument {
        "*" => Argument::Any,
        a => match a.strip_prefix('+') {
            Some(arg)
                if arg.bytes().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'+')
                }) =>
            {
                Argument::Exactly(arg.to_string())
            }
            _ => return Err(format!("argument must be '*' or '+ARG', got '{a}'")),
        },
    };
    let source = parse_who(source, "source")?;
    if source == Who::Default {
        return Err("@default is not a source".into());
    }
    let target = parse_who(target, "target")?;
    let mut redirect = None;
    let mut user = None;
    let action = match *action {
        "allow" => {
            for p in params {
                match p.split_once('=') {
                    Some(("target", t)) => {
                        redirect = Some(match parse_who(t, "target=")? {
                            Who::Name(n) => Redirect::Name(n),
                            Who::DispVm => Redirect::DispVm,
                            Who::DispVmOf(t) => Redirect::DispVmOf(t),
                            _ => return Err(format!("target= cannot be '{t}'")),
                        });
                    }
                    Some(("user", u)) if !u.is_empty() && !u.contains(':') => {
                        user = Some(u.to_string())
                    }
                    _ => return Err(format!("unsupported allow parameter '{p}'")),
                }
            }
            Action::Allow {
                target: redirect,
                user,
            }
        }
        "deny" => {
            if let Some(p) = params.iter().find(|p| !p.starts_with("notify=")) {
                return Err(format!("unsupported deny parameter '{p}'"));
            }
            Action::Deny
        }
        "ask" => return Err("'ask' is not supported by the simulation (nobody to ask)".into()),
        a => return Err(format!("unknown action '{a}'")),
    };
    Ok(Rule {
        line,
        service,
        argument,
        source,
        target,
        action,
    })
}

impl Policy {
    /// Parse policy text; `origin` names it in errors.
    ///
    /// ```
    /// use qubes_sim::policy::*;
    /// let p = Policy::parse("demo.Echo * @anyvm @anyvm allow\n", "p").unwrap();
    /// let sys = SystemInfo { vms: vec![
    ///     VmInfo { name: "a".into(), domid: 1, dispvm_template: None,
    ///              template_for_dispvms: false, default_dispvm: None },
    ///     VmInfo { name: "b".into(), domid: 2, dispvm_template: None,
    ///              template_for_dispvms: false, default_dispvm: None },
    /// ]};
    /// let d = p.evaluate(&sys, &Request { source: "a", target: "b", service_and_arg: "demo.Echo" });
    /// assert!(matches!(d, Decision::Allow { target: Target::Vm(ref t), .. } if t == "b"));
    /// ```
    pub fn parse(text: &str, origin: &str) -> Result<Policy> {
        let mut rules = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let words: Vec<&str> = strip_comment(raw).split_whitespace().collect();
            if words.is_empty() {
                continue;
            }
            rules.push(parse_rule(i + 1, &words).map_err(|msg| Error::Parse {
                path: origin.to_string(),
                line: i + 1,
                msg,
            })?);
        }
        Ok(Policy { rules })
    }

    /// Read and parse a policy file.
    pub fn load(path: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("read policy {}", path.display()), e))?;
        Policy::parse(&text, &path.display().to_string())
    }

    /// Decide a call.
    pub fn evaluate(&self, sys: &SystemInfo, req: &Request<'_>) -> Decision {
        let deny = |reason: String| Decision::Deny { reason };
        let Some(source) = sys.vm(req.source) else {
            return deny(format!("unknown source '{}'", req.source));
        };
        let (service, argument) = match req.service_and_arg.split_once('+') {
            Some((s, a)) => (s, a),
            None => (req.service_and_arg, ""),
        };
        if service.is_empty() {
            return deny("empty service name".into());
        }
        // The intended target as policy sees it.
        let target: &str = match req.target {
            "" => "@default",
            "@adminvm" | "dom0" => return deny("calls to dom0 are not simulated".into()),
            t if t.starts_with("@dispvm") || t == "@default" => t,
            t if t.starts_with('@') => return deny(format!("unsupported target keyword '{t}'")),
            t if sys.vm(t).is_some() => t,
            _ => "@default",
        };
        let Some(rule) = self.rules.iter().find(|r| {
            (match &r.service {
                Service::Any => true,
                Service::Name(n) => n == service,
            }) && (match &r.argument {
                Argument::Any => true,
                Argument::Exactly(a) => a == argument,
            }) && source_matches(&r.source, source)
                && target_matches(&r.target, target)
        }) else {
            return deny(format!(
                "no policy rule matches {service}+{argument} from {} to {target}",
                req.source
            ));
        };
        let (redirect, user) = match &rule.action {
            Action::Deny => return deny(format!("denied by rule at line {}", rule.line)),
            Action::Allow { target, user } => (target, user),
        };
        let final_target = match redirect {
            Some(Redirect::Name(n)) => n.clone(),
            Some(Redirect::DispVm) => "@dispvm".into(),
            Some(Redirect::DispVmOf(t)) => format!("@dispvm:{t}"),
            None => target.to_string(),
        };
        let resolved = if final_target == "@default" {
            return deny(format!(
                "rule at line {} allows @default without target=",
                rule.line
            ));
        } else if final_target == "@dispvm" {
            match &source.default_dispvm {
                Some(t) => Target::NewDispVm(t.clone()),
                None => return deny(format!("{} has no default DispVM template", source.name)),
            }
        } else if let Some(t) = final_target.strip_prefix("@dispvm:") {
            Target::NewDispVm(t.to_string())
        } else {
            Target::Vm(final_target)
        };
        match &resolved {
            Target::NewDispVm(t) => {
                if !sys.vm(t).is_some_and(|v| v.template_for_dispvms) {
                    return deny(format!("'{t}' is not a DispVM template"));
                }
            }
            Target::Vm(n) => {
                if sys.vm(n).is_none() {
                    return deny(format!("target '{n}' does not exist"));
                }
                if n == req.source {
                    return deny("loopback qrexec connection not supported".into());
                }
            }
        }
        Decision::Allow {
            target: resolved,
            user: user.clone(),
            line: rule.line,
        }
    }
}

fn source_matches(w: &Who, vm: &VmInfo) -> bool {
    match w {
        Who::Star | Who::AnyVm => true,
        Who::Default => false,
        Who::DispVm => vm.dispvm_template.is_some(),
        Who::DispVmOf(t) => vm.dispvm_template.as_deref() == Some(t.as_str()),
        Who::Name(n) => *n == vm.name,
    }
}

fn target_matches(w: &Who, target: &str) -> bool {
    match w {
        Who::Star => true,
        Who::AnyVm => !target.starts_with('@'),
        Who::Default => target == "@default",
        Who::DispVm => target == "@dispvm",
        Who::DispVmOf(t) => target.strip_prefix("@dispvm:") == Some(t.as_str()),
        Who::Name(n) => n == target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys() -> SystemInfo {
        let vm = |name: &str, domid, tpl: Option<&str>, is_tpl, def: Option<&str>| VmInfo {
            name: name.into(),
            domid,
            dispvm_template: tpl.map(Into::into),
            template_for_dispvms: is_tpl,
            default_dispvm: def.map(Into::into),
        };
        SystemInfo {
            vms: vec![
                vm("work", 1, None, false, Some("dvm")),
                vm("personal", 2, None, false, None),
                vm("dvm", 3, None, true, None),
                vm("vault", 4, None, false, None),
                vm("disp5", 5, Some("dvm"), false, None),
            ],
        }
    }

    fn eval(policy: &str, source: &str, target: &str, svc: &str) -> Decision {
        Policy::parse(policy, "t").unwrap().evaluate(
            &sys(),
            &Request {
                source,
                target,
                service_and_arg: svc,
            },
        )
    }

    fn allowed_to(d: &Decision) -> Option<Target> {
        match d {
            Decision::Allow { target, .. } => Some(target.clone()),
            Decision::Deny { .. } => None,
        }
    }

    const P: &str = "\
        # comment\n\
        demo.Echo  *        @anyvm  @anyvm    allow\n\
        demo.Arg   +yes     @anyvm  @anyvm    allow\n\
        demo.Arg   +        @anyvm  @anyvm    allow user=root\n\
        demo.Deny  *        @anyvm  @anyvm    deny notify=no\n\
        demo.Def   *        @anyvm  @default  allow target=vault\n\
        demo.Def2  *        @anyvm  @default  allow\n\
        demo.Disp  *        @anyvm  @dispvm   allow\n\
        demo.Disp  *        @anyvm  @dispvm:dvm allow\n\
        demo.ToD   *        work    vault     allow target=@dispvm:dvm\n\
        demo.Bad   *        @anyvm  @dispvm:vault allow\n\
        demo.From  *        @dispvm:dvm @anyvm allow\n\
        demo.Star  *        *       *         allow target=work\n";

    #[test]
    fn allow_and_deny() {
        assert_eq!(
            allowed_to(&eval(P, "work", "personal", "demo.Echo")),
            Some(Target::Vm("personal".into()))
        );
        assert_eq!(
            allowed_to(&eval(P, "work", "personal", "demo.Echo+x")),
            Some(Target::Vm("personal".into()))
        );
        assert_eq!(allowed_to(&eval(P, "work", "personal", "demo.Deny")), None);
        assert_eq!(allowed_to(&eval(P, "work", "personal", "demo.Nope")), None);
        // loopback
        assert_eq!(allowed_to(&eval(P, "work", "work", "demo.Echo")), None);
    }

    #[test]
    fn arguments() {
        assert!(allowed_to(&eval(P, "work", "vault", "demo.Arg+yes")).is_some());
        assert!(allowed_to(&eval(P, "work", "vault", "demo.Arg+no")).is_none());
        let d = eval(P, "work", "vault", "demo.Arg");
        assert!(matches!(d, Decision::Allow { user: Some(ref u), .. } if u == "root"));
        let d = eval(P, "work", "vault", "demo.Arg+");
        assert!(matches!(d, Decision::Allow { user: Some(ref u), .. } if u == "root"));
    }

    #[test]
    fn default_and_redirect() {
        for t in ["", "@default", "no-such-vm"] {
            assert_eq!(
                allowed_to(&eval(P, "work", t, "demo.Def")),
                Some(Target::Vm("vault".into())),
                "{t:?}"
            );
        }
        // allow to @default without target= is a deny
        assert_eq!(allowed_to(&eval(P, "work", "", "demo.Def2")), None);
        // @default does not match @anyvm
        assert_eq!(allowed_to(&eval(P, "work", "", "demo.Echo")), None);
        assert_eq!(
            allowed_to(&eval(P, "work", "vault", "demo.ToD")),
            Some(Target::NewDispVm("dvm".into()))
        );
        assert_eq!(allowed_to(&eval(P, "personal", "vault", "demo.ToD")), None);
    }

    #[test]
    fn dispvms() {
        assert_eq!(
            allowed_to(&eval(P, "work", "@dispvm", "demo.Disp")),
            Some(Target::NewDispVm("dvm".into()))
        );
        // personal has no default DispVM template
        assert_eq!(
            allowed_to(&eval(P, "personal", "@dispvm", "demo.Disp")),
            None
        );
        assert_eq!(
            allowed_to(&eval(P, "personal", "@dispvm:dvm", "demo.Disp")),
            Some(Target::NewDispVm("dvm".into()))
        );
        // not a template
        assert_eq!(
            allowed_to(&eval(P, "work", "@dispvm:vault", "demo.Bad")),
            None
        );
        // DispVM as a source
        assert!(allowed_to(&eval(P, "disp5", "work", "demo.From")).is_some());
        assert!(allowed_to(&eval(P, "vault", "work", "demo.From")).is_none());
        // @anyvm does not match keywords, * does
        assert_eq!(allowed_to(&eval(P, "work", "@dispvm", "demo.Echo")), None);
        assert_eq!(
            allowed_to(&eval(P, "personal", "@dispvm", "demo.Star")),
            Some(Target::Vm("work".into()))
        );
    }

    #[test]
    fn dom0_and_unknown_keywords_denied() {
        assert_eq!(allowed_to(&eval(P, "work", "dom0", "demo.Star")), None);
        assert_eq!(allowed_to(&eval(P, "work", "@adminvm", "demo.Star")), None);
        assert_eq!(allowed_to(&eval(P, "work", "@tag:x", "demo.Star")), None);
        assert_eq!(allowed_to(&eval(P, "nobody", "work", "demo.Star")), None);
    }

    #[test]
    fn parse_errors_name_the_line() {
        for (text, line) in [
            ("a b c d\n", 1),
            ("\n\ndemo.X * @anyvm @anyvm ask\n", 3),
            ("demo.X * @anyvm @anyvm frob\n", 1),
            ("demo.X arg @anyvm @anyvm allow\n", 1),
            ("demo/x * @anyvm @anyvm allow\n", 1),
            ("demo.X * @default @anyvm allow\n", 1),
            ("demo.X * @anyvm @tag:x allow\n", 1),
            ("demo.X * @anyvm @anyvm allow target=@anyvm\n", 1),
            ("demo.X * @anyvm @anyvm allow foo=bar\n", 1),
            ("demo.X * @anyvm @anyvm deny target=x\n", 1),
        ] {
            match Policy::parse(text, "p") {
                Err(Error::Parse { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }
}
