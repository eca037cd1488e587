//! Protocol-level checks of the simulation with a scripted client: what
//! the target agent sends, byte for byte, in each situation.

mod common;
use common::{Sim, scripted_call};
use qrexec::proto::MsgType;

const CONF: &str = "vm work\nvm personal\n";
const POLICY: &str = "\
test.Echo     * @anyvm @anyvm allow\n\
test.Missing  * @anyvm @anyvm allow\n\
test.Exit     * @anyvm @anyvm allow\n\
*             * @anyvm @anyvm deny\n";

fn sim() -> Sim {
    Sim::start(
        CONF,
        POLICY,
        &[
            ("test.Echo", "#!/bin/sh\nexec cat\n"),
            (
                "test.Exit",
                "#!/bin/sh\necho out; echo err >&2; exit \"$1\"\n",
            ),
        ],
    )
}

const STDOUT: u32 = 0x191;
const STDERR: u32 = 0x192;
const EXIT: u32 = 0x193;

#[test]
fn echo_round_trip_and_message_order() {
    let s = sim();
    let seen = scripted_call(&s, "work", "personal", "test.Echo", b"hello").unwrap();
    assert_eq!(seen.stdout, b"hello");
    assert_eq!(seen.code, 0);
    assert_eq!(seen.peer_version, 4);
    let p = seen.params.unwrap();
    assert_eq!(p.connect_domain, u32::from(s.domid("personal")));
    // work (1) calls personal (2): personal's daemon allocates, peer below → 513.
    assert_eq!(p.connect_port, 513);
    // stdout data, stdout EOF and stderr EOF (any order), then the exit code.
    assert_eq!(seen.msgs.first(), Some(&(STDOUT, 5)));
    assert_eq!(seen.msgs.last(), Some(&(EXIT, 4)));
    assert!(seen.msgs.contains(&(STDOUT, 0)));
    assert!(seen.msgs.contains(&(STDERR, 0)));
    assert_eq!(seen.msgs.len(), 4);
}

#[test]
fn missing_service_sends_eofs_then_127() {
    let s = sim();
    let seen = scripted_call(&s, "work", "personal", "test.Missing", b"").unwrap();
    assert_eq!(seen.msgs, vec![(STDOUT, 0), (STDERR, 0), (EXIT, 4)]);
    assert_eq!(seen.code, 127);
}

#[test]
fn exit_code_and_stderr() {
    let s = sim();
    let seen = scripted_call(&s, "personal", "work", "test.Exit+42", b"").unwrap();
    assert_eq!(seen.stdout, b"out\n");
    assert_eq!(seen.stderr, b"err\n");
    assert_eq!(seen.code, 42);
    // personal (2) calls work (1): work's daemon allocates, peer above → 514.
    assert_eq!(seen.params.unwrap().connect_port, 514);
    let _ = MsgType::DataExitCode;
}

#[test]
fn refusal_is_eof_on_the_agent_socket() {
    let s = sim();
    assert!(scripted_call(&s, "work", "personal", "test.Nope", b"").is_none());
    // loopback and unknown keywords too
    assert!(scripted_call(&s, "work", "work", "test.Echo", b"").is_none());
    assert!(scripted_call(&s, "work", "@adminvm", "test.Echo", b"").is_none());
}
