// Why this file is long (~940 lines): the last ~200 are unit tests of the
// option parsing; the rest is the command, options and call flow together.
//! The `qrexec-client-vm` command: option parsing (docs/qrexec.md §11) and the call
//! flow (docs/qrexec.md §7, §8, §12).
//!
//! Option parsing stops at the first non-option, as with getopt's `+`: the
//! arguments are split first ([`split_options`]), every option is rewritten
//! into its canonical `--long[=value]` form, and clap parses the result with
//! `--` before the positionals. So `qrexec-client-vm vm svc prog -x --y`
//! passes `-x --y` to `prog`.

use crate::filter::FilterSetting;
use crate::format::{FormatSource, REQUEST_FORMAT_ENV, marker_path_from_env, select_format};
use crate::local::{CloseMode, LocalFd, LocalInput, LocalOutput, SignalWatch};
use crate::names::{normalize_target, validate_service, validate_source, validate_target};
use crate::proto::{
    MAX_VCHAN_BUFFER_SIZE, QREXEC_AGENT_TRIGGER_PATH, QREXEC_EXIT_REQUEST_REFUSED, Trigger,
    VCHAN_BUFFER_SIZE,
};
use crate::pump::{LocalSide, PumpConfig, Stderr};
use crate::trigger::{AgentAnswer, DataPeer, call_agent};
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Environment variable that turns on verbose logging (`1`, `true`, `yes`).
pub const VERBOSE_ENV: &str = "QREXEC_CLIENT_VERBOSE";
/// Testing aid: the data-vchan connect timeout in milliseconds (default
/// 120000, docs/qrexec.md §8.1).
pub const CONNECT_TIMEOUT_ENV: &str = "QREXEC_CONNECT_TIMEOUT_MS";
/// How long the service has to connect to our vchan server (docs/qrexec.md §8.1).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// Exit status for usage errors.
pub const EXIT_USAGE: u8 = 2;
/// Exit status for set-up failures.
pub const EXIT_FAILURE: u8 = 1;

const AFTER_HELP: &str = "\
Parsing of options stops at the first non-option argument: everything after
SERVICE belongs to LOCAL_PROGRAM. '$' in TARGET_VMNAME is read as '@'
($dispvm = @dispvm).

Environment:
  QREXEC_REQUEST_FORMAT   v2, v3 or v4 (else from /usr/share/qubes/marker-vm, else v4)
  QREXEC_CLIENT_VERBOSE   1 to log to stderr like --verbose
  PASS_LOCAL_STDERR       also give LOCAL_PROGRAM SAVED_FD_2
  VCHAN_SOCKET_DIR, VCHAN_DOMAIN   use the vchan-socket test transport

Exit status: the service's exit code if non-zero, else the local program's
(128+signal if killed), else 0; 126 refused; 255 connection lost before the
exit code; 1 set-up failure; 2 usage error.";

/// Options as clap sees them (after [`split_options`] canonicalised them).
#[derive(Parser, Debug)]
#[command(
    name = "qrexec-client-vm",
    about = "Call a Qubes RPC (qrexec) service in another qube",
    disable_version_flag = true,
    after_help = AFTER_HELP,
)]
struct Args {
    /// Minimum vchan buffer size per direction (default and 0: 65536; at most 1048576)
    #[arg(long = "buffer-size", value_name = "BUFFER_SIZE", action = ArgAction::Append)]
    buffer_size: Vec<String>,
    /// Filter non-ASCII and control characters on stdout (default if stdout is a terminal and there is no local program)
    #[arg(short = 't', long = "filter-escape-chars-stdout", action = ArgAction::Count)]
    filter_stdout: u8,
    /// Filter non-ASCII and control characters on stderr (default if stderr is a terminal)
    #[arg(short = 'T', long = "filter-escape-chars-stderr", action = ArgAction::Count)]
    filter_stderr: u8,
    /// Opposite of --filter-escape-chars-stdout
    #[arg(long = "no-filter-escape-chars-stdout", action = ArgAction::Count)]
    no_filter_stdout: u8,
    /// Opposite of --filter-escape-chars-stderr
    #[arg(long = "no-filter-escape-chars-stderr", action = ArgAction::Count)]
    no_filter_stderr: u8,
    /// Path of the qrexec agent socket (default: $QREXEC_AGENT_SOCKET, else
    /// /var/run/qubes/qrexec-agent)
    #[arg(short = 'a', long = "agent-socket", value_name = "PATH", action = ArgAction::Append,
          default_value = QREXEC_AGENT_TRIGGER_PATH)]
    agent_socket: Vec<PathBuf>,
    /// Send DATA before the provided stdin (can only be given once)
    #[arg(short = 'p', long = "prefix-data", value_name = "DATA", action = ArgAction::Append,
          value_parser = clap::value_parser!(OsString))]
    prefix_data: Vec<OsString>,
    /// Use stdin (a stream socket) for both directions; not with a local program
    #[arg(long = "use-stdin-socket", action = ArgAction::Count)]
    use_stdin_socket: u8,
    /// Source qube of a relayed call (request format v4 only)
    #[arg(short = 's', long = "source-qube", value_name = "QUBE", action = ArgAction::Append,
          value_parser = clap::value_parser!(OsString))]
    source_qube: Vec<OsString>,
    /// Request format to speak to the agent: v2 (R4.0), v3 (R4.1/4.2), v4 (R4.3+)
    #[arg(long = "request-format", value_name = "v2|v3|v4", action = ArgAction::Append)]
    request_format: Vec<String>,
    /// Log what happens to stderr
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    verbose: u8,
    /// Target qube, or @default, @dispvm, @dispvm:TEMPLATE, @adminvm
    #[arg(value_name = "TARGET_VMNAME", value_parser = clap::value_parser!(OsString))]
    target: OsString,
    /// Service to call, with an optional argument after '+'
    #[arg(value_name = "SERVICE[+ARGUMENT]", value_parser = clap::value_parser!(OsString))]
    service: OsString,
    /// Program to connect to the service, and its arguments
    #[arg(value_name = "LOCAL_PROGRAM", num_args = 0.., trailing_var_arg = true,
          allow_hyphen_values = true, value_parser = clap::value_parser!(OsString))]
    local_program: Vec<OsString>,
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Vchan ring size per direction (0/absent already mapped to 65536).
    pub buffer_size: usize,
    /// `-t` / `--no-filter-escape-chars-stdout`, last one wins.
    pub filter_stdout: FilterSetting,
    /// `-T` / `--no-filter-escape-chars-stderr`, last one wins.
    pub filter_stderr: FilterSetting,
    /// Agent socket path.
    pub agent_socket: PathBuf,
    /// `--prefix-data`.
    pub prefix_data: Option<Vec<u8>>,
    /// `--use-stdin-socket`.
    pub use_stdin_socket: bool,
    /// `--source-qube`.
    pub source_qube: Option<Vec<u8>>,
    /// `--request-format`.
    pub request_format: Option<crate::proto::RequestFormat>,
    /// `-v`.
    pub verbose: bool,
    /// Target as given (before `$` → `@`).
    pub target: Vec<u8>,
    /// Service descriptor.
    pub service: Vec<u8>,
    /// Local program and its arguments.
    pub local_program: Option<(OsString, Vec<OsString>)>,
}

/// Why the command line was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// clap's own result: usage error (2) or `--help` (0).
    #[error("{0}")]
    Clap(#[from] clap::Error),
    /// Another usage error (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A bad `--buffer-size` (exit 1, like the C client).
    #[error("{0}")]
    BufferSize(#[from] BufferSizeError),
}

impl CliError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Clap(e) => u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE),
            CliError::Usage(_) => EXIT_USAGE,
            CliError::BufferSize(_) => EXIT_FAILURE,
        }
    }

    /// Print the error (help goes to stdout) and return the exit status.
    pub fn report(&self) -> u8 {
        match self {
            CliError::Clap(e) => {
                let _ = e.print();
            }
            other => {
                print_error(&other.to_string());
                if matches!(other, CliError::Usage(_)) {
                    print_error("try 'qrexec-client-vm --help'");
                }
            }
        }
        self.exit_code()
    }
}

/// A bad `--buffer-size` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferSizeError {
    /// Does not start with a digit.
    #[error("bad buffer size '{0}': does not begin with a number")]
    NotANumber(String),
    /// Digits followed by something else.
    #[error("bad buffer size '{0}': trailing junk")]
    TrailingJunk(String),
    /// Above 1 MiB.
    #[error("bad buffer size '{0}': at most {MAX_VCHAN_BUFFER_SIZE} bytes (1 MiB) per direction")]
    TooBig(String),
}

/// Parse `--buffer-size` like `strtoul(s, &end, 0)` with the C client's
/// checks: a leading digit, `0x` hex or leading-`0` octal, no trailing junk;
/// 0 means the default 65536; more than 1 MiB is refused.
///
/// ```
/// # use qrexec::cli::parse_buffer_size;
/// assert_eq!(parse_buffer_size("0"), Ok(65536));
/// assert_eq!(parse_buffer_size("4096"), Ok(4096));
/// assert_eq!(parse_buffer_size("0x1000"), Ok(4096));
/// assert_eq!(parse_buffer_size("010"), Ok(8));
/// assert!(parse_buffer_size("1048577").is_err());
/// assert!(parse_buffer_size("12k").is_err());
/// assert!(parse_buffer_size("-1").is_err());
/// ```
pub fn parse_buffer_size(s: &str) -> Result<usize, BufferSizeError> {
    if !s.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(BufferSizeError::NotANumber(s.into()));
    }
    let (digits, radix) = if let Some(h) = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .filter(|h| h.starts_with(|c: char| c.is_ascii_hexdigit()))
    {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(BufferSizeError::TrailingJunk(s.into()));
    }
    let value = match u64::from_str_radix(digits, radix) {
        Ok(v) => v,
        // only overflow is possible here: all digits were checked
        Err(_) => return Err(BufferSizeError::TooBig(s.into())),
    };
    if value > MAX_VCHAN_BUFFER_SIZE as u64 {
        return Err(BufferSizeError::TooBig(s.into()));
    }
    Ok(if value == 0 {
        VCHAN_BUFFER_SIZE
    } else {
        value as usize
    })
}

/// Long options: name, takes a value.
const LONG_OPTIONS: &[(&str, bool)] = &[
    ("buffer-size", true),
    ("filter-escape-chars-stdout", false),
    ("filter-escape-chars-stderr", false),
    ("no-filter-escape-chars-stdout", false),
    ("no-filter-escape-chars-stderr", false),
    ("agent-socket", true),
    ("prefix-data", true),
    ("use-stdin-socket", false),
    ("source-qube", true),
    ("request-format", true),
    ("verbose", false),
    ("help", false),
];

/// Short options: letter, long name.
const SHORT_OPTIONS: &[(u8, &str)] = &[
    (b't', "filter-escape-chars-stdout"),
    (b'T', "filter-escape-chars-stderr"),
    (b'a', "agent-socket"),
    (b'p', "prefix-data"),
    (b's', "source-qube"),
    (b'v', "verbose"),
    (b'h', "help"),
];

fn resolve_long(name: &[u8]) -> Option<(&'static str, bool)> {
    if let Some(&exact) = LONG_OPTIONS.iter().find(|(n, _)| n.as_bytes() == name) {
        return Some(exact);
    }
    // getopt_long accepts unambiguous prefixes.
    let mut matches = LONG_OPTIONS
        .iter()
        .filter(|(n, _)| !name.is_empty() && n.as_bytes().starts_with(name));
    match (matches.next(), matches.next()) {
        (Some(&one), None) => Some(one),
        _ => None,
    }
}

fn long_with_value(name: &str, value: &[u8]) -> OsString {
    let mut v = format!("--{name}=").into_bytes();
    v.extend_from_slice(value);
    OsString::from_vec(v)
}

/// Split `args` (without argv\[0\]) like getopt with a leading `+`: options
/// up to the first non-option (or `--`), canonicalised to `--long[=value]`;
/// the rest are positionals, untouched. Unknown options are kept as they are
/// so that clap reports them.
///
/// ```
/// # use qrexec::cli::split_options;
/// let a = |v: &[&str]| v.iter().map(|s| s.into()).collect::<Vec<std::ffi::OsString>>();
/// let (opts, pos) = split_options(&a(&["-tp", "-x", "vm", "svc", "prog", "-t"]));
/// assert_eq!(opts, a(&["--filter-escape-chars-stdout", "--prefix-data=-x"]));
/// assert_eq!(pos, a(&["vm", "svc", "prog", "-t"]));
/// ```
pub fn split_options(args: &[OsString]) -> (Vec<OsString>, Vec<OsString>) {
    let mut opts = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_bytes();
        if a == b"--" {
            i += 1;
            break;
        }
        if let Some(body) = a.strip_prefix(b"--") {
            let (name, inline) = match body.iter().position(|&c| c == b'=') {
                Some(eq) => (&body[..eq], Some(&body[eq + 1..])),
                None => (body, None),
            };
            match resolve_long(name) {
                Some((long, true)) => {
                    let value = match inline {
                        Some(v) => Some(v.to_vec()),
                        None if i + 1 < args.len() => {
                            i += 1;
                            Some(args[i].as_bytes().to_vec())
                        }
                        None => None,
                    };
                    opts.push(match value {
                        Some(v) => long_with_value(long, &v),
                        None => OsString::from(format!("--{long}")),
                    });
                }
                Some((long, false)) if inline.is_none() => {
                    opts.push(OsString::from(format!("--{long}")));
                }
                _ => opts.push(args[i].clone()),
            }
            i += 1;
            continue;
        }
        if a.len() > 1 && a[0] == b'-' {
            let mut j = 1;
            while j < a.len() {
                let c = a[j];
                match SHORT_OPTIONS.iter().find(|(s, _)| *s == c) {
                    Some(&(_, long)) if LONG_OPTIONS.iter().any(|&(n, v)| n == long && v) => {
                        let rest = &a[j + 1..];
                        let value = if !rest.is_empty() {
                            Some(rest.to_vec())
                        } else if i + 1 < args.len() {
                            i += 1;
                            Some(args[i].as_bytes().to_vec())
                        } else {
                            None
                        };
                        opts.push(match value {
                            Some(v) => long_with_value(long, &v),
                            None => OsString::from(format!("--{long}")),
                        });
                        break;
                    }
                    Some(&(_, long)) => opts.push(OsString::from(format!("--{long}"))),
                    None => opts.push(OsString::from_vec(vec![b'-', c])),
                }
                j += 1;
            }
            i += 1;
            continue;
        }
        break;
    }
    (opts, args[i..].to_vec())
}

fn last_index(m: &clap::ArgMatches, id: &str) -> Option<usize> {
    // Count flags always have a (default) value; only command-line
    // occurrences count.
    if m.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
        return None;
    }
    m.indices_of(id).and_then(|mut it| it.next_back())
}

fn tri_state(m: &clap::ArgMatches, on: &str, off: &str) -> FilterSetting {
    match (last_index(m, on), last_index(m, off)) {
        (None, None) => FilterSetting::Unset,
        (Some(_), None) => FilterSetting::On,
        (None, Some(_)) => FilterSetting::Off,
        (Some(a), Some(b)) => {
            if a > b {
                FilterSetting::On
            } else {
                FilterSetting::Off
            }
        }
    }
}

/// Environment variable naming the agent socket when `--agent-socket` is
/// not given (our addition: it lets a simulation point the unchanged
/// command at its agent).
pub const AGENT_SOCKET_ENV: &str = "QREXEC_AGENT_SOCKET";

/// The agent socket: the option if given, else `$QREXEC_AGENT_SOCKET` if
/// set and non-empty, else the Qubes default.
///
/// ```
/// use std::path::PathBuf;
/// use qrexec::cli::agent_socket_path;
/// assert_eq!(agent_socket_path(false, None, Some("/tmp/a".into())), PathBuf::from("/tmp/a"));
/// assert_eq!(agent_socket_path(true, Some("/o".into()), Some("/tmp/a".into())), PathBuf::from("/o"));
/// assert_eq!(agent_socket_path(false, None, None), PathBuf::from("/var/run/qubes/qrexec-agent"));
/// ```
pub fn agent_socket_path(given: bool, option: Option<PathBuf>, env: Option<OsString>) -> PathBuf {
    match (given, option, env) {
        (true, Some(p), _) => p,
        (_, _, Some(e)) if !e.is_empty() => PathBuf::from(e),
        _ => PathBuf::from(QREXEC_AGENT_TRIGGER_PATH),
    }
}

/// The clap definition of the command line, the one `--help` prints: the
/// man page and the shell completions are generated from it
/// (`cargo xtask man`), so they list exactly the options parsed here.
///
/// ```
/// let cmd = qrexec::cli::command();
/// assert_eq!(cmd.get_name(), "qrexec-client-vm");
/// assert!(cmd.get_arguments().any(|a| a.get_long() == Some("buffer-size")));
/// ```
pub fn command() -> clap::Command {
    Args::command()
}

/// Parse a full argv (including argv\[0\]). The only environment access
/// is [`AGENT_SOCKET_ENV`] when `--agent-socket` is not given.
pub fn parse_args(argv: &[OsString]) -> Result<Options, CliError> {
    let (opts, positionals) = split_options(argv.get(1..).unwrap_or(&[]));
    let mut clap_argv: Vec<OsString> = vec![OsString::from("qrexec-client-vm")];
    clap_argv.extend(opts);
    clap_argv.push(OsString::from("--"));
    clap_argv.extend(positionals);
    let matches = Args::command().try_get_matches_from(clap_argv)?;
    let args = Args::from_arg_matches(&matches)?;

    if args.prefix_data.len() > 1 {
        return Err(CliError::Usage(
            "--prefix-data can only be given once".into(),
        ));
    }
    if args.use_stdin_socket > 1 {
        return Err(CliError::Usage("--use-stdin-socket passed twice".into()));
    }
    if args.source_qube.len() > 1 {
        return Err(CliError::Usage(
            "--source-qube can only be given once".into(),
        ));
    }
    let buffer_size = match args.buffer_size.last() {
        Some(s) => parse_buffer_size(s)?,
        None => VCHAN_BUFFER_SIZE,
    };
    let request_format = match args.request_format.last() {
        Some(s) => {
            Some(crate::format::parse_format(s).map_err(|e| CliError::Usage(e.to_string()))?)
        }
        None => None,
    };
    let local_program = args
        .local_program
        .split_first()
        .map(|(prog, rest)| (prog.clone(), rest.to_vec()));
    if args.use_stdin_socket > 0 && local_program.is_some() {
        return Err(CliError::Usage(
            "cannot spawn a local process with --use-stdin-socket".into(),
        ));
    }
    Ok(Options {
        buffer_size,
        filter_stdout: tri_state(&matches, "filter_stdout", "no_filter_stdout"),
        filter_stderr: tri_state(&matches, "filter_stderr", "no_filter_stderr"),
        agent_socket: agent_socket_path(
            matches.value_source("agent_socket") == Some(clap::parser::ValueSource::CommandLine),
            args.agent_socket.last().cloned(),
            std::env::var_os(AGENT_SOCKET_ENV),
        ),
        prefix_data: args.prefix_data.into_iter().next().map(OsString::into_vec),
        use_stdin_socket: args.use_stdin_socket > 0,
        source_qube: args.source_qube.into_iter().next().map(OsString::into_vec),
        request_format,
        verbose: args.verbose > 0,
        target: args.target.into_vec(),
        service: args.service.into_vec(),
        local_program,
    })
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| {
        let v = v.to_string_lossy().to_ascii_lowercase();
        matches!(v.trim(), "1" | "true" | "yes" | "on")
    })
}

fn connect_timeout() -> Duration {
    std::env::var(CONNECT_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(CONNECT_TIMEOUT)
}

/// Check that fd 0 is a `SOCK_STREAM` socket (for `--use-stdin-socket`).
fn check_stdin_socket() -> Result<(), String> {
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    match getsockopt(&io::stdin(), sockopt::SockType) {
        Ok(SockType::Stream) => Ok(()),
        Ok(t) => Err(format!(
            "stdin is a socket of type {t:?}, not SOCK_STREAM (--use-stdin-socket)"
        )),
        Err(nix::errno::Errno::ENOTSOCK) => {
            Err("--use-stdin-socket passed, but stdin not a socket".into())
        }
        Err(e) => Err(format!("--use-stdin-socket: getsockopt(0, SO_TYPE): {e}")),
    }
}

/// Writes one `qrexec-client-vm: ...` line to stderr, ignoring failures
/// (stderr may be closed or broken; that must not end the call).
fn print_error(msg: &str) {
    let _ = writeln!(io::stderr(), "qrexec-client-vm: {msg}");
}

/// The command's logger: every `log` event of the library as one
/// `qrexec-client-vm: ...` line on stderr, as the C command prints them.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            print_error(&record.args().to_string());
        }
    }

    fn flush(&self) {}
}

/// Installs [`StderrLogger`] (once per process; a later call only changes
/// the level): errors and warnings always, the `debug` trace with `-v`.
fn init_logging(verbose: bool) {
    static LOGGER: StderrLogger = StderrLogger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(if verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    });
}

fn fail(code: u8, msg: &str) -> ExitCode {
    print_error(msg);
    ExitCode::from(code)
}

/// The whole command: parse `argv`, call the service, return the exit
/// status. Meant to be called once per process (it uses fds 0–2, signals
/// and the environment).
pub fn run(argv: &[OsString]) -> ExitCode {
    let opts = match parse_args(argv) {
        Ok(o) => o,
        Err(e) => return ExitCode::from(e.report()),
    };
    init_logging(opts.verbose || env_flag(VERBOSE_ENV));
    // Before any other descriptor is opened, so the numbers are small.
    let saved_fds = if opts.local_program.is_some() {
        match crate::local::SavedFds::dup_stdio(std::env::var_os("PASS_LOCAL_STDERR").is_some()) {
            Ok(s) => Some(s),
            Err(e) => return fail(EXIT_FAILURE, &format!("prepare SAVED_FD_: {e}")),
        }
    } else {
        None
    };
    if opts.use_stdin_socket
        && let Err(msg) = check_stdin_socket()
    {
        return fail(EXIT_USAGE, &msg);
    }

    let env_format = std::env::var_os(REQUEST_FORMAT_ENV);
    let choice = match select_format(
        opts.request_format,
        env_format.as_deref(),
        &marker_path_from_env(),
    ) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, &e.to_string()),
    };
    let format = choice.format;
    log::debug!("request format {format} ({:?})", choice.source);

    let target = normalize_target(&opts.target);
    if let Err(e) = validate_target(&target, format) {
        return fail(EXIT_USAGE, &e.to_string());
    }
    match validate_service(&opts.service, format) {
        Ok(warnings) => warnings.iter().for_each(|w| print_error(w)),
        Err(e) => return fail(EXIT_USAGE, &e.to_string()),
    }
    let source = opts.source_qube.clone().unwrap_or_default();
    if opts.source_qube.is_some()
        && let Err(e) = validate_source(&source, format)
    {
        return fail(EXIT_USAGE, &e.to_string());
    }
    let request = match Trigger::new(format, &target, &opts.service, &source).encode() {
        Ok(r) => r,
        Err(e) => return fail(EXIT_USAGE, &e.to_string()),
    };

    let stdout_tty = nix::unistd::isatty(io::stdout()).unwrap_or(false);
    let stderr_tty = nix::unistd::isatty(io::stderr()).unwrap_or(false);
    let cfg = PumpConfig {
        filter_stdout: opts
            .filter_stdout
            .resolve(opts.local_program.is_none() && stdout_tty),
        filter_stderr: opts.filter_stderr.resolve(stderr_tty),
        prefix: opts.prefix_data.clone().unwrap_or_default(),
    };

    // The trigger exchange. The socket stays open until the call ends.
    let (answer, agent) = match call_agent(&opts.agent_socket, &request) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILURE, &e.to_string()),
    };
    let params = match answer {
        AgentAnswer::Refused => {
            let _ = io::Write::write_all(&mut io::stderr(), b"Request refused\n");
            if let FormatSource::Default { why } = &choice.source {
                log::debug!(
                    "hint: the agent may not speak request format {format} ({why}); \
                     pin it with --request-format or {REQUEST_FORMAT_ENV}"
                );
            }
            return ExitCode::from(QREXEC_EXIT_REQUEST_REFUSED as u8);
        }
        AgentAnswer::Accepted(p) => p,
    };
    let peer = match DataPeer::validate(params) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_FAILURE, &e.to_string()),
    };
    log::debug!("call accepted: domain {}, port {}", peer.domain, peer.port);

    // Local program: started after acceptance, before the vchan server.
    let mut signals = None;
    let mut program = None;
    if let (Some((prog, prog_args)), Some(saved)) = (&opts.local_program, saved_fds) {
        match SignalWatch::new() {
            Ok(s) => signals = Some(s),
            Err(e) => return fail(EXIT_FAILURE, &format!("signal setup: {e}")),
        }
        match crate::local::spawn_local_program(prog, prog_args, saved) {
            Ok(p) => program = Some(p),
            Err(e) => return fail(EXIT_FAILURE, &format!("local program setup: {e}")),
        }
    }

    // One connect deadline for the set-up (which may wait for resources
    // other calls hold) and the wait for the service.
    let deadline = std::time::Instant::now() + connect_timeout();
    let mut ch = match crate::transport::open_data_channel(
        peer.domain,
        peer.port,
        opts.buffer_size,
        deadline,
    ) {
        Ok(ch) => ch,
        Err(e) => return fail(EXIT_FAILURE, &e.to_string()),
    };
    if let Err(e) = ch.wait_connected(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        return fail(EXIT_FAILURE, &format!("data vchan connection failed: {e}"));
    }
    log::debug!("service connected");

    let (input, output) = match &program {
        Some(p) => (
            LocalInput::new(LocalFd::Owned(p.from_child.clone()), CloseMode::Shutdown),
            LocalOutput {
                fd: LocalFd::Owned(p.to_child.clone()),
                close: CloseMode::Shutdown,
            },
        ),
        None if opts.use_stdin_socket => (
            LocalInput::new(LocalFd::stdin(), CloseMode::Shutdown),
            LocalOutput {
                fd: LocalFd::stdin(),
                close: CloseMode::Shutdown,
            },
        ),
        None => (
            LocalInput::new(LocalFd::stdin(), CloseMode::DevNull),
            LocalOutput {
                fd: LocalFd::stdout(),
                close: CloseMode::DevNull,
            },
        ),
    };
    let local = LocalSide {
        input,
        output,
        stderr: Box::new(Stderr),
        program,
        signals,
    };
    let result = crate::pump::run_session(&mut *ch, format.protocol_version(), &cfg, local);
    drop(ch);
    drop(agent);
    match result {
        Ok(outcome) => {
            log::debug!("call ended: {outcome:?}");
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => fail(EXIT_FAILURE, &e.to_string()),
    }
}

/// `run` on the process arguments.
pub fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    run(&argv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    /// An argv from strings.
    fn argv<S: AsRef<OsStr>>(items: &[S]) -> Vec<OsString> {
        items.iter().map(|s| s.as_ref().to_os_string()).collect()
    }
    use crate::proto::RequestFormat;

    fn parse(v: &[&str]) -> Result<Options, CliError> {
        let mut full = vec!["qrexec-client-vm"];
        full.extend_from_slice(v);
        parse_args(&argv(&full))
    }

    #[test]
    fn minimal_call() {
        let o = parse(&["work", "qubes.Filecopy"]).unwrap();
        assert_eq!(o.target, b"work");
        assert_eq!(o.service, b"qubes.Filecopy");
        assert_eq!(o.buffer_size, 65536);
        assert_eq!(o.agent_socket, PathBuf::from("/var/run/qubes/qrexec-agent"));
        assert_eq!(o.filter_stdout, FilterSetting::Unset);
        assert_eq!(o.filter_stderr, FilterSetting::Unset);
        assert_eq!(o.local_program, None);
        assert!(!o.use_stdin_socket && !o.verbose);
        assert_eq!(o.prefix_data, None);
        assert_eq!(o.source_qube, None);
        assert_eq!(o.request_format, None);
    }

    #[test]
    fn option_parsing_stops_at_first_non_option() {
        let o = parse(&["vm", "svc", "/bin/prog", "-x", "--y", "-t", "--", "z"]).unwrap();
        let (prog, args) = o.local_program.unwrap();
        assert_eq!(prog, OsString::from("/bin/prog"));
        assert_eq!(args, argv(&["-x", "--y", "-t", "--", "z"]));
        assert_eq!(o.filter_stdout, FilterSetting::Unset);
        // getopt '+': an option after the target is a positional
        let o = parse(&["vm", "-t", "svc"]).unwrap();
        assert_eq!(o.service, b"-t");
        assert_eq!(o.local_program.unwrap().0, OsString::from("svc"));
        // "--" ends options; "-" is a positional
        let o = parse(&["--", "-vm", "svc"]).unwrap();
        assert_eq!(o.target, b"-vm");
        let o = parse(&["-", "svc"]).unwrap();
        assert_eq!(o.target, b"-");
    }

    #[test]
    fn all_options() {
        let o = parse(&[
            "--buffer-size=4096",
            "-t",
            "-T",
            "-a",
            "/tmp/agent",
            "-p",
            "-prefix",
            "-s",
            "relay",
            "--request-format",
            "v4",
            "-v",
            "vm",
            "svc+arg",
        ])
        .unwrap();
        assert_eq!(o.buffer_size, 4096);
        assert_eq!(o.filter_stdout, FilterSetting::On);
        assert_eq!(o.filter_stderr, FilterSetting::On);
        assert_eq!(o.agent_socket, PathBuf::from("/tmp/agent"));
        assert_eq!(o.prefix_data.as_deref(), Some(&b"-prefix"[..]));
        assert_eq!(o.source_qube.as_deref(), Some(&b"relay"[..]));
        assert_eq!(o.request_format, Some(RequestFormat::V4));
        assert!(o.verbose);
        let o = parse(&[
            "--agent-socket=/a",
            "--prefix-data=",
            "--source-qube=q",
            "--use-stdin-socket",
            "--buffer-size",
            "0",
            "vm",
            "svc",
        ])
        .unwrap();
        assert_eq!(o.agent_socket, PathBuf::from("/a"));
        assert_eq!(o.prefix_data.as_deref(), Some(&b""[..]));
        assert!(o.use_stdin_socket);
        assert_eq!(o.buffer_size, 65536);
        // bundled short options and attached values
        let o = parse(&["-tTa/x", "-pDATA", "vm", "svc"]).unwrap();
        assert_eq!(o.filter_stdout, FilterSetting::On);
        assert_eq!(o.filter_stderr, FilterSetting::On);
        assert_eq!(o.agent_socket, PathBuf::from("/x"));
        assert_eq!(o.prefix_data.as_deref(), Some(&b"DATA"[..]));
        // unambiguous long prefixes, like getopt_long
        let o = parse(&["--buf=1024", "--agent", "/y", "--use-stdin", "vm", "svc"]).unwrap();
        assert_eq!(o.buffer_size, 1024);
        assert_eq!(o.agent_socket, PathBuf::from("/y"));
        assert!(o.use_stdin_socket);
    }

    #[test]
    fn filters_last_one_wins() {
        let o = parse(&["-t", "--no-filter-escape-chars-stdout", "vm", "svc"]).unwrap();
        assert_eq!(o.filter_stdout, FilterSetting::Off);
        let o = parse(&["--no-filter-escape-chars-stdout", "-t", "vm", "svc"]).unwrap();
        assert_eq!(o.filter_stdout, FilterSetting::On);
        let o = parse(&["-T", "--no-filter-escape-chars-stderr", "-T", "vm", "svc"]).unwrap();
        assert_eq!(o.filter_stderr, FilterSetting::On);
        let o = parse(&["-T", "-T", "--no-filter-escape-chars-stderr", "vm", "svc"]).unwrap();
        assert_eq!(o.filter_stderr, FilterSetting::Off);
        let o = parse(&["-tt", "vm", "svc"]).unwrap();
        assert_eq!(o.filter_stdout, FilterSetting::On);
    }

    #[test]
    fn usage_errors_exit_2() {
        for bad in [
            &["vm"][..],
            &[][..],
            &["-x", "vm", "svc"],
            &["--nope", "vm", "svc"],
            &["-p", "a", "-p", "b", "vm", "svc"],
            &["-s", "a", "--source-qube=b", "vm", "svc"],
            &["--use-stdin-socket", "--use-stdin-socket", "vm", "svc"],
            &["--use-stdin-socket", "vm", "svc", "/bin/true"],
            &["--request-format=v5", "vm", "svc"],
            &["--filter", "vm", "svc"], // ambiguous prefix
            &["-t=x", "vm", "svc"],
            &["--verbose=yes", "vm", "svc"],
            &["-a"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
    }

    #[test]
    fn help_exits_0() {
        for h in ["-h", "--help", "--he"] {
            let e = parse(&[h]).unwrap_err();
            assert_eq!(e.exit_code(), 0, "{h}");
            let text = e.to_string();
            assert!(text.contains("--buffer-size"), "{text}");
            assert!(text.contains("--use-stdin-socket"));
        }
    }

    #[test]
    fn buffer_size_errors_exit_1() {
        for bad in [
            "abc",
            "12k",
            "",
            "-5",
            "0x",
            "08",
            "1048577",
            "99999999999999999999999",
        ] {
            let e = parse(&[&format!("--buffer-size={bad}"), "vm", "svc"]).unwrap_err();
            assert_eq!(e.exit_code(), 1, "{bad}: {e}");
            assert!(!e.to_string().contains('\n'));
        }
        assert_eq!(
            parse(&["--buffer-size=1048576", "vm", "svc"])
                .unwrap()
                .buffer_size,
            1 << 20
        );
        // the last --buffer-size wins
        let o = parse(&["--buffer-size=1", "--buffer-size=2048", "vm", "svc"]).unwrap();
        assert_eq!(o.buffer_size, 2048);
    }

    #[test]
    fn buffer_size_parsing() {
        assert_eq!(parse_buffer_size("0"), Ok(65536));
        assert_eq!(parse_buffer_size("1"), Ok(1));
        assert_eq!(parse_buffer_size("0X10"), Ok(16));
        assert_eq!(parse_buffer_size("0x100000"), Ok(1 << 20));
        assert_eq!(parse_buffer_size("017"), Ok(15));
        assert_eq!(parse_buffer_size("00"), Ok(65536));
        assert!(matches!(
            parse_buffer_size("x1"),
            Err(BufferSizeError::NotANumber(_))
        ));
        assert!(matches!(
            parse_buffer_size("1 "),
            Err(BufferSizeError::TrailingJunk(_))
        ));
        assert!(matches!(
            parse_buffer_size("0x100001"),
            Err(BufferSizeError::TooBig(_))
        ));
    }
}
