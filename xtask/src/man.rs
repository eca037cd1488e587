//! `cargo xtask man`: the man page and the shell completions of
//! `qrexec-client-vm`, generated from its clap definition
//! ([`qrexec::cli::command`]), so that they list exactly what `--help` lists.
//!
//! The synopsis and the OPTIONS section come from clap (`clap_mangen`); the
//! sections clap has no notion of (exit status, environment, files, request
//! formats, transports, examples) are written here, and the tests below
//! check them against the clap definition and its `--help` epilogue.

use std::path::{Path, PathBuf};

use clap_complete::Shell;
use clap_mangen::roff::{Inline, Roff, bold, italic, roman};

/// The command's name, as installed.
pub const BIN: &str = "qrexec-client-vm";

/// Files `generate` writes, relative to its output directory.
pub const MAN_FILE: &str = "qrexec-client-vm.1";
/// Shells we ship completions for, with the file name each expects.
pub const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "completions/qrexec-client-vm.bash"),
    (Shell::Zsh, "completions/_qrexec-client-vm"),
    (Shell::Fish, "completions/qrexec-client-vm.fish"),
];

fn cmd() -> clap::Command {
    qrexec::cli::command().version(env!("CARGO_PKG_VERSION"))
}

/// `(name, description)` of every environment variable the command reads.
const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "QREXEC_REQUEST_FORMAT",
        "Request format for the agent, v2, v3 or v4, when --request-format is not given. \
         Without either, the last line of /usr/share/qubes/marker-vm decides \
         (4.0: v2; 4.1, 4.2: v3; 4.3 and later: v4), else v4.",
    ),
    (
        "QREXEC_AGENT_SOCKET",
        "Path of the agent socket when --agent-socket is not given.",
    ),
    (
        "QREXEC_CLIENT_VERBOSE",
        "1, true or yes: log each step to standard error, like --verbose.",
    ),
    (
        "PASS_LOCAL_STDERR",
        "When set, LOCAL_PROGRAM also gets SAVED_FD_2, a copy of this command's standard error.",
    ),
    (
        "QREXEC_CONNECT_TIMEOUT_MS",
        "How long the service side has to connect to the data vchan, in milliseconds \
         (default 120000). Meant for tests.",
    ),
    (
        "VCHAN_TRANSPORT",
        "xen, local or socket: force a vchan transport (see TRANSPORTS).",
    ),
    (
        "VCHAN_LOCAL_DIR",
        "With VCHAN_DOMAIN: use the Local transport whose hubs live in this directory.",
    ),
    (
        "VCHAN_SOCKET_DIR",
        "With VCHAN_DOMAIN: use the socket transport of Qubes' qubes-core-vchan-socket \
         (sockets vchan.SERVER.CLIENT.PORT.sock in this directory).",
    ),
    (
        "VCHAN_DOMAIN",
        "The domain id this process plays on the Local or socket transport.",
    ),
];

/// `(status, meaning)` rows of EXIT STATUS.
const EXIT_STATUS: &[(&str, &str)] = &[
    (
        "the service's exit code",
        "when the service reported a non-zero exit code (only its low 8 bits reach the shell).",
    ),
    (
        "the local program's",
        "when the service exited 0 and LOCAL_PROGRAM was given: its exit code, or 128 plus \
         the signal number that killed it. (Qubes R4.0's C command reported only the local \
         program's status; since qubes-core-qrexec 4.1.23 and 4.2.1 it behaves as here.)",
    ),
    ("0", "the service exited 0 and there was no local program."),
    (
        "1",
        "the call could not be set up: a bad --buffer-size, the agent socket could not be \
         reached, the data vchan failed (no connection within 120 s, a bad HELLO, an I/O \
         error), or no vchan transport is available on this machine (no /dev/xen).",
    ),
    (
        "2",
        "usage error: missing arguments, an unknown option, an option given twice, \
         --use-stdin-socket with a local program, --source-qube without request format v4, \
         a bad request format, or a name that fails the checks of REQUEST FORMATS.",
    ),
    (
        "125",
        "passed through from the target: qrexec failed there.",
    ),
    (
        "126",
        "the request was refused (\"Request refused\" on standard error): by policy, or by \
         an agent that does not speak the request format (see REQUEST FORMATS).",
    ),
    (
        "127",
        "passed through from the target: the call was allowed but the target has no such service.",
    ),
    (
        "255",
        "the connection ended before the service's exit code arrived, or LOCAL_PROGRAM \
         could not be started.",
    ),
];

/// `(command line, what it does)` of EXAMPLES.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "qrexec-client-vm work qubes.Filecopy /usr/lib/qubes/qfile-agent ~/report.pdf",
        "Send a file to the qube work: the local program speaks the qubes.Filecopy \
         protocol on its standard input and output, which are connected to the service.",
    ),
    (
        "echo 'uname -a' | qrexec-client-vm '$dispvm' qubes.VMShell",
        "Run a command in a fresh disposable qube ($dispvm is read as @dispvm; quote it \
         from the shell) and print its output; the qube is destroyed afterwards.",
    ),
    (
        "qrexec-client-vm @dispvm:fedora-dvm qubes.VMShell < script.sh",
        "The same, with a disposable qube of the template fedora-dvm.",
    ),
    (
        "qrexec-client-vm --buffer-size=1048576 backup my.Backup+daily < backup.tar",
        "Call the service my.Backup with the argument daily, with 1 MiB vchan rings per \
         direction for a large transfer (the default is 64 KiB; use less when the peer \
         is a MirageOS qube with few grants).",
    ),
    (
        "qrexec-client-vm dom0 qubes.GetDate",
        "Call a service in dom0 (the same as @adminvm).",
    ),
    (
        "qrexec-client-vm '' qubes.StartApp+firefox",
        "Let the policy choose the target (an empty target is @default).",
    ),
    (
        "qrexec-client-vm --request-format=v3 -v work qubes.Echo",
        "Pin the request format for an R4.1/R4.2 agent and log each step.",
    ),
];

fn heading(roff: &mut Roff, name: &str) {
    roff.control("SH", [name]);
}

fn para(roff: &mut Roff, text: impl Into<Vec<Inline>>) {
    roff.control("PP", []);
    roff.text(text);
}

fn tagged(roff: &mut Roff, tag: Vec<Inline>, text: &str) {
    roff.control("TP", []);
    roff.text(tag);
    roff.text([roman(text)]);
}

/// The sections after OPTIONS.
fn extra_sections() -> Roff {
    let mut r = Roff::new();

    heading(&mut r, "EXIT STATUS");
    for (status, meaning) in EXIT_STATUS {
        let tag = if status.chars().all(|c| c.is_ascii_digit()) {
            bold(*status)
        } else {
            italic(*status)
        };
        tagged(&mut r, vec![tag], meaning);
    }

    heading(&mut r, "ENVIRONMENT");
    for (name, text) in ENVIRONMENT {
        tagged(&mut r, vec![bold(*name)], text);
    }
    para(
        &mut r,
        [roman(
            "LOCAL_PROGRAM runs with SAVED_FD_0 and SAVED_FD_1 (copies of this command's \
             standard input and output) and QREXEC_AGENT_PID (this command's pid: send it \
             SIGUSR1 to make the program's standard input socket carry both directions).",
        )],
    );

    heading(&mut r, "FILES");
    tagged(
        &mut r,
        vec![bold(qrexec::proto::QREXEC_AGENT_TRIGGER_PATH)],
        "The qrexec agent's socket, where requests go.",
    );
    tagged(
        &mut r,
        vec![bold(qrexec::format::MARKER_VM_PATH)],
        "The Qubes agent tools' version; its last line picks the request format.",
    );
    tagged(
        &mut r,
        vec![bold("/dev/xen/gntalloc, /dev/xen/evtchn, /dev/xen/xenbus")],
        "The Xen devices the data vchan is built on.",
    );

    heading(&mut r, "REQUEST FORMATS");
    para(
        &mut r,
        [roman(
            "A qrexec agent accepts exactly one request format, and closes the socket on any \
             other, which looks the same as a refusal (exit 126). So the format is chosen, \
             never probed: --request-format, else QREXEC_REQUEST_FORMAT, else the agent \
             tools' version in /usr/share/qubes/marker-vm, else v4.",
        )],
    );
    for (fmt, text) in [
        (
            "v4",
            "Qubes R4.3 and later: a header (type 0x213), source qube (64 bytes), target \
             (64), request id (32), then the service name and its NUL. The only format \
             with --source-qube.",
        ),
        (
            "v3",
            "Qubes R4.1 and R4.2: a header (type 0x212), target (64 bytes), request id (32), \
             then the service name and its NUL.",
        ),
        (
            "v2",
            "Qubes R4.0: 128 bytes without a header: service (64 bytes, so at most 63 \
             characters), target (32, at most 31), request id (32). Never chosen \
             automatically except from a 4.0 marker file.",
        ),
    ] {
        tagged(&mut r, vec![bold(fmt)], text);
    }
    para(
        &mut r,
        [roman(
            "Names are checked before anything is sent (a failed check exits 2): the target \
             at most 63 bytes (31 for v2), of the characters dom0 keeps, and a known @keyword \
             (@default, @adminvm, @dispvm, @dispvm:NAME); the service name not empty, not \
             starting with +, at most 255 bytes before the first +, and the whole request \
             within the agent's 4096-byte control ring. Service characters other than \
             A-Z a-z 0-9 _ . + - draw a warning: dom0 turns them into _. Every $ in the \
             target is read as @.",
        )],
    );

    heading(&mut r, "TRANSPORTS");
    para(
        &mut r,
        [roman(
            "The data vchan runs on Xen in a Qubes qube. For trying and testing without Xen \
             the same command runs on two other transports, chosen by the environment:",
        )],
    );
    for (name, text) in [
        (
            "Xen",
            "The default: /dev/xen grant and event-channel devices and xenstore, \
             byte-compatible with libxenvchan.",
        ),
        (
            "Local",
            "VCHAN_LOCAL_DIR and VCHAN_DOMAIN: processes on one Linux host play domains, \
             sharing real memory (the simulated Qubes of qubes-sim and cargo xtask demo).",
        ),
        (
            "Socket",
            "VCHAN_SOCKET_DIR and VCHAN_DOMAIN: the unix-socket stream of \
             qubes-core-vchan-socket, to talk to Qubes' own tools built for testing.",
        ),
    ] {
        tagged(&mut r, vec![bold(name)], text);
    }
    para(
        &mut r,
        [roman(
            "Without /dev/xen and with no other transport selected, the command says so in \
             one line and exits 1.",
        )],
    );

    heading(&mut r, "EXAMPLES");
    for (line, text) in EXAMPLES {
        roff_example(&mut r, line, text);
    }

    heading(&mut r, "NOTES");
    para(
        &mut r,
        [roman(
            "This is a pure-Rust implementation of the command of Qubes' qubes-core-qrexec: \
             the same arguments, exit codes and bytes on the agent socket and the data \
             vchan. The package qrexec-client-vm-rs installs it in place of the C command \
             (which it keeps aside); removing that package brings the C command back.",
        )],
    );

    heading(&mut r, "SEE ALSO");
    para(
        &mut r,
        [roman(
            "qvm-run(1), qvm-copy(1); the protocol: docs/qrexec.md and docs/vchan.md in the \
             source repository.",
        )],
    );
    r
}

fn roff_example(r: &mut Roff, line: &str, text: &str) {
    r.control("PP", []);
    r.text([bold(line)]);
    r.control("RS", ["4"]);
    r.text([roman(text)]);
    r.control("RE", []);
}

/// The man page, roff source.
pub fn man_page() -> String {
    let man = clap_mangen::Man::new(cmd())
        .date("")
        .source(format!("qrexec-client-vm {}", env!("CARGO_PKG_VERSION")))
        .manual("Qubes OS");
    let mut out = Vec::new();
    let r = (|| -> std::io::Result<()> {
        man.render_title(&mut out)?;
        man.render_name_section(&mut out)?;
        man.render_synopsis_section(&mut out)?;
        out.extend_from_slice(description().render().as_bytes());
        man.render_options_section(&mut out)?;
        Ok(())
    })();
    r.expect("rendering into a Vec cannot fail");
    let mut page = String::from_utf8(out).expect("roff is UTF-8");
    page.push_str(&extra_sections().render());
    page
}

fn description() -> Roff {
    let mut r = Roff::new();
    heading(&mut r, "DESCRIPTION");
    para(
        &mut r,
        [
            bold(BIN),
            roman(
                " calls the Qubes RPC service SERVICE in the qube TARGET_VMNAME, as allowed \
                 by dom0's qrexec policy, which may also send the call to another qube than \
                 the one named. It hands the request to the local qrexec agent; when dom0 \
                 allows the call, the service's side connects to a vchan this command \
                 serves, and the call's data flows over it.",
            ),
        ],
    );
    para(
        &mut r,
        [roman(
            "Without LOCAL_PROGRAM, standard input goes to the service and the service's \
             standard output and standard error come out on this command's. With \
             LOCAL_PROGRAM (an absolute or relative path, not searched in PATH), the \
             program is started once the call is allowed (never when it is refused), and \
             its standard input and output are connected to the service instead; its \
             standard error is this command's.",
        )],
    );
    para(
        &mut r,
        [roman(
            "TARGET_VMNAME is a qube's name or a keyword: @default (the policy chooses; an \
             empty name means the same), @adminvm (dom0), @dispvm (a new disposable qube), \
             @dispvm:TEMPLATE. Every $ is read as @, so $dispvm works where @ is awkward. \
             SERVICE may carry an argument after +, as in qubes.StartApp+firefox.",
        )],
    );
    para(
        &mut r,
        [roman(
            "Option parsing stops at the first argument that is not an option: everything \
             after SERVICE belongs to LOCAL_PROGRAM.",
        )],
    );
    r
}

/// The completion script for `shell`.
pub fn completion(shell: Shell) -> String {
    let mut c = cmd();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut c, BIN, &mut out);
    String::from_utf8(out).expect("completion scripts are UTF-8")
}

/// Write the man page and the completions under `out`; returns the paths.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();
    let mut files: Vec<(String, String)> = vec![(MAN_FILE.into(), man_page())];
    for (shell, name) in COMPLETIONS {
        files.push((name.into(), completion(shell)));
    }
    for (name, text) in files {
        let p = out.join(name);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        written.push(p);
    }
    Ok(written)
}

/// The default output directory: `<target>/assets`.
pub fn default_out() -> PathBuf {
    crate::util::target_dir().join("assets")
}

/// `cargo xtask man [--out DIR]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let out = match args {
        [] => default_out(),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => return Err("usage: cargo xtask man [--out DIR]".into()),
    };
    for p in generate(&out)? {
        println!("{}", p.display());
    }
    Ok(())
}

/// The text of a roff page with the escapes and font changes taken out.
#[cfg(test)]
fn plain(roff: &str) -> String {
    roff.replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\fP", "")
        .replace("\\(aq", "'")
        .replace("\\*(Aq", "'")
        .replace("\\(rs", "\\")
        .replace("\\&", "")
        .replace("\\ ", " ")
        .replace("\\e", "\\")
}

/// The options (as `--long` / `-s`) and the first line of their help that
/// `text` (a plain man page or completion script) lacks.
#[cfg(test)]
fn missing_options(text: &str, with_help: bool) -> Vec<String> {
    let mut c = cmd();
    c.build();
    let mut missing = Vec::new();
    for a in c.get_arguments() {
        if let Some(l) = a.get_long() {
            let f = format!("--{l}");
            if !text.contains(&f) {
                missing.push(f);
            }
        }
        if let Some(s) = a.get_short() {
            let f = format!("-{s}");
            if !text.contains(&f) {
                missing.push(f);
            }
        }
        if with_help && let Some(h) = a.get_help() {
            let h = h.to_string();
            let first = h.lines().next().unwrap_or_default().trim();
            if !first.is_empty() && !text.contains(first) {
                missing.push(format!("help of {}: {first}", a.get_id()));
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn man_text() -> String {
        plain(&man_page())
    }

    #[test]
    fn every_option_and_its_help_is_in_the_man_page() {
        let text = man_text();
        assert_eq!(missing_options(&text, true), Vec::<String>::new());
        // The checker itself notices a missing option.
        let cut = text.replace("--buffer-size", "--buffer");
        assert!(missing_options(&cut, true).contains(&"--buffer-size".to_string()));
    }

    #[test]
    fn every_positional_is_in_the_synopsis() {
        let text = man_text();
        let synopsis =
            &text[text.find(".SH SYNOPSIS").unwrap()..text.find(".SH DESCRIPTION").unwrap()];
        let mut c = cmd();
        c.build();
        for a in c.get_positionals() {
            let name = a
                .get_value_names()
                .and_then(|v| v.first())
                .map(|s| s.to_string())
                .unwrap();
            assert!(synopsis.contains(&name), "{name} missing from {synopsis}");
        }
    }

    #[test]
    fn the_sections_the_seed_man_page_has_and_more() {
        let text = man_text();
        for s in [
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "EXIT STATUS",
            "ENVIRONMENT",
            "FILES",
            "REQUEST FORMATS",
            "TRANSPORTS",
            "EXAMPLES",
            "SEE ALSO",
        ] {
            assert!(
                text.contains(&format!(".SH \"{s}\"")) || text.contains(&format!(".SH {s}")),
                "{s}"
            );
        }
        for must in [
            "$dispvm",
            "--buffer-size=",
            "/usr/lib/qubes/qfile-agent",
            "126",
            "255",
        ] {
            assert!(text.contains(must), "{must}");
        }
    }

    /// Every environment variable and exit status that `--help` names is
    /// explained in the man page, so the two cannot drift apart.
    #[test]
    fn help_epilogue_and_man_page_agree() {
        let c = cmd();
        let after = c.get_after_help().expect("after_help").to_string();
        let text = man_text();
        let env = &text[text.find("ENVIRONMENT").unwrap()..text.find("FILES").unwrap()];
        let env_block =
            &after[after.find("Environment:").unwrap()..after.find("Exit status:").unwrap()];
        let mut named = 0;
        for word in
            env_block.split(|c: char| !(c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit()))
        {
            if word.len() > 4 && word.contains('_') {
                named += 1;
                assert!(
                    env.contains(word),
                    "{word} is in --help but not in ENVIRONMENT"
                );
            }
        }
        assert!(named >= 4, "the --help epilogue names {named} variables");
        let status = &text[text.find("EXIT STATUS").unwrap()..text.find("ENVIRONMENT").unwrap()];
        for code in ["126", "255", "1", "2"] {
            assert!(
                after.contains(code) && status.contains(&format!("\n{code}\n")),
                "exit {code}"
            );
        }
    }

    #[test]
    fn completions_offer_every_option() {
        for (shell, _) in COMPLETIONS {
            let script = completion(shell);
            // fish writes `-l buffer-size`, the others `--buffer-size`.
            let text = if shell == Shell::Fish {
                script.replace("-l ", "--").replace("-s ", "-")
            } else {
                script
            };
            assert_eq!(
                missing_options(&text, false),
                Vec::<String>::new(),
                "{shell}"
            );
        }
    }
}
