//! A qrexec call from Rust with the `qrexec` library: the steps
//! `qrexec-client-vm TARGET SERVICE` takes, without its command line.
//! Standard input goes to the service, its output comes out here, and the
//! process exits with the service's exit code.
//!
//! In a qube: `cargo run -p qrexec --example qrexec_call -- work qubes.Echo`.
//! Without Qubes, against the simulated Qubes of `qubes-sim` (see
//! `sim/README.md`): start it, load the environment file it writes for a
//! qube (it sets `QREXEC_AGENT_SOCKET` and the vchan transport), then
//! `echo hi | cargo run -p qrexec --example qrexec_call -- personal demo.Echo`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use qrexec::cli::{AGENT_SOCKET_ENV, agent_socket_path};
use qrexec::format::{REQUEST_FORMAT_ENV, marker_path_from_env, select_format};
use qrexec::local::{CloseMode, LocalFd, LocalInput, LocalOutput};
use qrexec::names::{normalize_target, validate_service, validate_target};
use qrexec::proto::{Trigger, VCHAN_BUFFER_SIZE};
use qrexec::pump::{LocalSide, PumpConfig, Stderr, run_session};
use qrexec::transport::open_data_channel;
use qrexec::trigger::{AgentAnswer, DataPeer, call_agent};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn call(target: &str, service: &str) -> Result<u8> {
    // 1. The request: which format the local agent speaks (env, marker
    //    file, else v4), then the checked names, then the bytes.
    let env_format = std::env::var_os(REQUEST_FORMAT_ENV);
    let format = select_format(None, env_format.as_deref(), &marker_path_from_env())?.format;
    let target = normalize_target(target.as_bytes()); // $dispvm -> @dispvm
    validate_target(&target, format)?;
    for warning in validate_service(service.as_bytes(), format)? {
        eprintln!("warning: {warning}");
    }
    let request = Trigger::new(format, &target, service.as_bytes(), b"").encode()?;

    // 2. The agent forwards it to dom0; the answer is where the service
    //    will connect from, or EOF for a refusal. Keep the socket open for
    //    the whole call: closing it tells dom0 the call is over.
    let socket = agent_socket_path(false, None, std::env::var_os(AGENT_SOCKET_ENV));
    let (answer, _agent) = call_agent(&socket, &request)?;
    let params = match answer {
        AgentAnswer::Refused => {
            eprintln!("Request refused");
            return Ok(126);
        }
        AgentAnswer::Accepted(p) => p,
    };
    let peer = DataPeer::validate(params)?;

    // 3. Serve the data vchan and let the service connect to it, within
    //    one deadline for both (the set-up may wait for resources that
    //    other calls hold).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ch = open_data_channel(peer.domain, peer.port, VCHAN_BUFFER_SIZE, deadline)?;
    ch.wait_connected(deadline.saturating_duration_since(Instant::now()))?;

    // 4. HELLO, then pump stdin -> service -> stdout/stderr until the exit code.
    let local = LocalSide {
        input: LocalInput::new(LocalFd::stdin(), CloseMode::DevNull),
        output: LocalOutput {
            fd: LocalFd::stdout(),
            close: CloseMode::DevNull,
        },
        stderr: Box::new(Stderr),
        program: None,
        signals: None,
    };
    let outcome = run_session(
        &mut *ch,
        format.protocol_version(),
        &PumpConfig::default(),
        local,
    )?;
    Ok(outcome.exit_code())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, service] = args.as_slice() else {
        eprintln!("usage: qrexec_call TARGET SERVICE[+ARGUMENT]");
        return ExitCode::from(2);
    };
    match call(target, service) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qrexec_call: {e}");
            ExitCode::from(1)
        }
    }
}
