//! The exit-status table (docs/qrexec.md §8.4, §8.5, §18 item 5, §18 item 6) of the built
//! `qrexec-client-vm`.

mod common;

use common::*;
use qrexec::proto::RequestFormat;

/// Run a call whose service reads stdin to EOF, sends STDOUT EOF and then
/// `remote` as exit code (or closes without one when `None`).
fn call(local: &[&str], remote: Option<i32>) -> std::process::Output {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(move |s| {
        s.hello(4);
        s.read_hello();
        let _ = s.read_stdin_to_eof();
        s.stdout(b"");
        s.stderr(b"");
        if let Some(c) = remote {
            s.exit(c);
        }
        drop(s.stream.shutdown(std::net::Shutdown::Write));
        s.read_all()
    });
    let mut args = vec!["work", "svc"];
    args.extend_from_slice(local);
    let o = run(h.client(&args));
    agent.join();
    svc.join().unwrap();
    o
}

#[test]
fn refused_is_126() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, AgentReply::Refuse);
    let o = run(h.client(&["work", "svc"]));
    assert_eq!(code(&o), 126);
    agent.join();
}

#[test]
fn remote_codes_pass_through() {
    for (remote, want) in [
        (0, 0),
        (1, 1),
        (42, 42),
        (125, 125),
        (127, 127),
        (-1, 255),
        (256, 0),
    ] {
        let o = call(&[], Some(remote));
        assert_eq!(code(&o), want, "remote {remote}: {}", stderr_text(&o));
    }
}

#[test]
fn service_not_found_failure_sequence_is_127() {
    // docs/qrexec.md §14 item 6: STDOUT EOF, STDERR EOF, EXIT_CODE 127, close — without reading
    // anything from the client.
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(3);
        s.read_hello();
        s.stdout(b"");
        s.stderr(b"");
        s.exit(127);
    });
    let o = run(h.client(&["work", "no.such.Service"]));
    assert_eq!(code(&o), 127);
    agent.join();
    svc.join().unwrap();
}

#[test]
fn vchan_closed_before_exit_code_is_255() {
    let o = call(&[], None);
    assert_eq!(code(&o), 255);
    assert!(stderr_text(&o).contains("closed early"));
    // also with a local program that succeeded
    let o = call(&["/bin/true"], None);
    assert_eq!(code(&o), 255);
}

#[test]
fn short_exit_code_payload_is_255() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(3);
        s.read_hello();
        s.stdout(b"");
        s.send_raw(&qrexec::proto::encode_data(
            qrexec::proto::MsgType::DataExitCode,
            &[1, 0],
        ));
        s.read_all()
    });
    let o = run(h.client(&["work", "svc"]));
    assert_eq!(code(&o), 255);
    agent.join();
    svc.join().unwrap();
}

#[test]
fn local_program_failure_with_remote_success_is_the_local_code() {
    assert_eq!(code(&call(&["/bin/false"], Some(0))), 1);
    assert_eq!(code(&call(&["/bin/sh", "-c", "exit 7"], Some(0))), 7);
    assert_eq!(code(&call(&["/bin/true"], Some(0))), 0);
}

#[test]
fn remote_failure_wins_over_local_code() {
    assert_eq!(code(&call(&["/bin/true"], Some(42))), 42);
    assert_eq!(code(&call(&["/bin/sh", "-c", "exit 7"], Some(42))), 42);
}

#[test]
fn local_program_killed_by_a_signal_is_128_plus_n() {
    assert_eq!(code(&call(&["/bin/sh", "-c", "kill -9 $$"], Some(0))), 137);
    assert_eq!(code(&call(&["/bin/sh", "-c", "kill -15 $$"], Some(0))), 143);
}

#[test]
fn local_program_that_cannot_run_is_255() {
    let o = call(&["/nonexistent/program"], Some(0));
    assert_eq!(code(&o), 255);
    assert!(
        stderr_text(&o).contains("cannot execute"),
        "{}",
        stderr_text(&o)
    );
}
