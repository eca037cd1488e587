//! Conformance tests of the built `qrexec-client-vm` (docs/qrexec.md §18 items 1–9)
//! against a scripted fake agent and a scripted fake service over the
//! vchan-socket transport.

mod common;

use common::*;
use qrexec::proto::{ConnectionParams, MsgType, RequestFormat, Trigger, encode_data};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

fn padded(s: &[u8], n: usize) -> Vec<u8> {
    let mut v = s.to_vec();
    v.resize(n, 0);
    v
}

// ---- docs/qrexec.md §18 item 1: byte-exact requests ------------------------

#[test]
fn v4_request_is_byte_exact_and_dollar_becomes_at() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, AgentReply::Refuse);
    let o = run(h.client(&["$dispvm:fedora-dvm", "qubes.Filecopy+a"]));
    assert_eq!(code(&o), 126, "{}", stderr_text(&o));
    let log = agent.join();
    let mut want = vec![0x13, 0x02, 0, 0];
    want.extend_from_slice(&(160u32 + 17).to_le_bytes());
    want.extend(padded(b"", 64));
    want.extend(padded(b"@dispvm:fedora-dvm", 64));
    want.extend(padded(b"SOCKET", 32));
    want.extend_from_slice(b"qubes.Filecopy+a\0");
    assert_eq!(log.request, want);
}

#[test]
fn v4_request_carries_source_qube() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, AgentReply::Refuse);
    let o = run(h.client(&["-s", "relay", "work", "svc"]));
    assert_eq!(code(&o), 126);
    let log = agent.join();
    assert_eq!(&log.request[8..72], &padded(b"relay", 64)[..]);
    assert_eq!(&log.request[72..136], &padded(b"work", 64)[..]);
    assert_eq!(
        log.request,
        Trigger::new(RequestFormat::V4, b"work", b"svc", b"relay")
            .encode()
            .unwrap()
    );
}

#[test]
fn v3_request_from_marker_file_and_hello_version_3() {
    let h = Harness::new();
    std::fs::write(&h.marker_path, "4.2\n").unwrap();
    let agent = h.agent(RequestFormat::V3, accept());
    let svc = h.service(|s| {
        s.hello(4);
        let v = s.read_hello();
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        v
    });
    let o = run(h.client(&["work", "qubes.Filecopy"]));
    assert_eq!(code(&o), 0, "{}", stderr_text(&o));
    assert_eq!(svc.join().unwrap(), 3);
    let log = agent.join();
    let mut want = vec![0x12, 0x02, 0, 0, 0x6f, 0, 0, 0];
    want.extend(padded(b"work", 64));
    want.extend(padded(b"SOCKET", 32));
    want.extend_from_slice(b"qubes.Filecopy\0");
    assert_eq!(log.request, want);
    assert!(log.extra.is_empty(), "client wrote after the request");
}

#[test]
fn v2_request_from_env_is_128_bytes_without_header() {
    let h = Harness::new();
    std::fs::write(&h.marker_path, "4.3\n").unwrap();
    let agent = h.agent(RequestFormat::V2, accept());
    let svc = h.service(|s| {
        s.hello(2);
        let v = s.read_hello();
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        v
    });
    let mut c = h.client(&["$default", "qubes.Svc+x"]);
    c.env("QREXEC_REQUEST_FORMAT", "v2");
    let o = run(c);
    assert_eq!(code(&o), 0, "{}", stderr_text(&o));
    assert_eq!(svc.join().unwrap(), 2);
    let log = agent.join();
    let mut want = padded(b"qubes.Svc+x", 64);
    want.extend(padded(b"@default", 32));
    want.extend(padded(b"SOCKET", 32));
    assert_eq!(log.request, want);
}

#[test]
fn request_format_option_beats_env_and_marker() {
    let h = Harness::new();
    std::fs::write(&h.marker_path, "4.0\n").unwrap();
    let agent = h.agent(RequestFormat::V3, AgentReply::Refuse);
    let mut c = h.client(&["--request-format=v3", "work", "svc"]);
    c.env("QREXEC_REQUEST_FORMAT", "v2");
    let o = run(c);
    assert_eq!(code(&o), 126);
    assert_eq!(agent.join().request[..4], [0x12, 0x02, 0, 0]);
}

#[test]
fn truncation_limits_are_enforced_before_sending() {
    let h = Harness::new();
    // 32 bytes do not fit the 31-byte v2 target field: refused locally.
    let long = "a".repeat(32);
    let o = run(h.client(&["--request-format=v2", &long, "svc"]));
    assert_eq!(code(&o), 2);
    assert!(
        stderr_text(&o).contains("at most 31"),
        "{}",
        stderr_text(&o)
    );
    let long = "a".repeat(64);
    let o = run(h.client(&[&long, "svc"]));
    assert_eq!(code(&o), 2);
    assert!(stderr_text(&o).contains("at most 63"));
    let o = run(h.client(&["--request-format=v3", "-s", "relay", "work", "svc"]));
    assert_eq!(code(&o), 2);
    assert!(stderr_text(&o).contains("needs request format v4"));
    let o = run(h.client(&["work", "+arg"]));
    assert_eq!(code(&o), 2);
    let o = run(h.client(&["@bogus", "svc"]));
    assert_eq!(code(&o), 2);
    assert_eq!(stderr_text(&o).lines().count(), 1, "{}", stderr_text(&o));
    // 31 bytes are fine with v2 and go out untruncated
    let agent = h.agent(RequestFormat::V2, AgentReply::Refuse);
    let ok = "b".repeat(31);
    let o = run(h.client(&["--request-format=v2", &ok, "svc"]));
    assert_eq!(code(&o), 126);
    assert_eq!(&agent.join().request[64..95], ok.as_bytes());
}

// ---- docs/qrexec.md §18 item 2: refusal --------------------------------------

#[test]
fn refusal_prints_request_refused_exits_126_and_never_starts_the_program() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, AgentReply::Refuse);
    let marker = h.dir.path().join("program-ran");
    let script = format!("touch {}", marker.display());
    let o = run(h.client(&["work", "svc", "/bin/sh", "-c", &script]));
    assert_eq!(code(&o), 126);
    assert_eq!(o.stderr, b"Request refused\n");
    assert!(o.stdout.is_empty());
    assert!(!marker.exists(), "local program started on refusal");
    agent.join();
}

#[test]
fn short_connection_parameters_exit_1() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, AgentReply::Raw(vec![5, 0, 0]));
    let o = run(h.client(&["work", "svc"]));
    assert_eq!(code(&o), 1);
    assert!(stderr_text(&o).contains("3 of 8"), "{}", stderr_text(&o));
    agent.join();
}

#[test]
fn missing_agent_socket_exits_1() {
    let h = Harness::new();
    let o = run(h.client(&["work", "svc"]));
    assert_eq!(code(&o), 1);
    assert!(stderr_text(&o).contains("cannot connect to the qrexec agent"));
}

#[test]
fn invalid_connection_parameters_exit_1() {
    let h = Harness::new();
    let agent = h.agent(
        RequestFormat::V4,
        AgentReply::Accept(ConnectionParams {
            connect_domain: 0x8000,
            connect_port: 513,
        }),
    );
    let o = run(h.client(&["work", "svc"]));
    assert_eq!(code(&o), 1);
    assert!(stderr_text(&o).contains("invalid connection parameters"));
    agent.join();
}

// ---- docs/qrexec.md §18 item 3: HELLO ----------------------------------------

fn stdin_file(h: &Harness, len: usize) -> (std::fs::File, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let p = h.dir.path().join("stdin-data");
    std::fs::write(&p, &data).unwrap();
    (std::fs::File::open(&p).unwrap(), data)
}

/// The service reads first (like dom0): a client that waited for the
/// service's HELLO would deadlock here.
fn chunk_sizes_for_peer_version(peer: u32, len: usize, extra: &[&str]) -> (Vec<usize>, u32) {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let (file, data) = stdin_file(&h, len);
    let svc = h.service(move |s| {
        let ours = s.read_hello();
        s.hello(peer);
        let (got, sizes) = s.read_stdin_to_eof();
        assert_eq!(got, data);
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        (sizes, ours)
    });
    let mut args = extra.to_vec();
    args.extend(["work", "svc"]);
    let mut c = h.client(&args);
    c.stdin(Stdio::from(file));
    let o = run(c);
    assert_eq!(code(&o), 0, "{}", stderr_text(&o));
    agent.join();
    svc.join().unwrap()
}

#[test]
fn hello_is_sent_first_and_v2_peer_gets_4096_byte_chunks() {
    let (sizes, ours) = chunk_sizes_for_peer_version(2, 20000, &[]);
    assert_eq!(ours, 4);
    assert!(sizes.iter().all(|&s| s <= 4096), "{sizes:?}");
    assert!(sizes.contains(&4096));
}

#[test]
fn v3_and_v4_peers_get_65536_byte_chunks() {
    for v in [3, 4, 9] {
        let (sizes, _) = chunk_sizes_for_peer_version(v, 200_000, &[]);
        assert!(sizes.iter().all(|&s| s <= 65536), "{sizes:?}");
        assert!(sizes.iter().any(|&s| s > 4096), "v{v}: {sizes:?}");
    }
}

#[test]
fn buffer_size_option_sizes_the_vchan() {
    // a 1024-byte ring leaves at most 1016 bytes of payload per message
    let (sizes, _) = chunk_sizes_for_peer_version(4, 10_000, &["--buffer-size=1024"]);
    assert!(sizes.iter().all(|&s| s <= 1016), "{sizes:?}");
    assert!(sizes.contains(&1016), "{sizes:?}");
}

fn bad_hello(bytes: Vec<u8>) -> std::process::Output {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(move |s| {
        s.read_hello();
        s.send_raw(&bytes);
        s.read_all()
    });
    let o = run(h.client(&["work", "svc"]));
    agent.join();
    svc.join().unwrap();
    o
}

#[test]
fn peer_version_1_wrong_type_and_wrong_length_exit_1() {
    let o = bad_hello(qrexec::proto::encode_hello(1).to_vec());
    assert_eq!(code(&o), 1);
    assert!(stderr_text(&o).contains("version 1"), "{}", stderr_text(&o));
    let o = bad_hello(qrexec::proto::encode_exit_code(0).to_vec());
    assert_eq!(code(&o), 1);
    let mut long = qrexec::proto::encode_hello(3).to_vec();
    long[4] = 5;
    long.push(0);
    let o = bad_hello(long);
    assert_eq!(code(&o), 1);
    assert_eq!(stderr_text(&o).lines().count(), 1, "{}", stderr_text(&o));
}

#[test]
fn chunk_above_the_negotiated_limit_exits_1() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(2);
        s.read_hello();
        s.stdout(&vec![b'x'; 4097]);
        s.exit(0);
        s.read_all()
    });
    let o = run(h.client(&["work", "svc"]));
    assert_eq!(code(&o), 1);
    assert!(stderr_text(&o).contains("too big"), "{}", stderr_text(&o));
    agent.join();
    svc.join().unwrap();
}

#[test]
fn unknown_and_late_hello_messages_exit_1() {
    for bad in [
        qrexec::proto::encode_hello(3).to_vec(),
        qrexec::proto::MsgHeader { ty: 0x200, len: 0 }
            .encode()
            .to_vec(),
    ] {
        let h = Harness::new();
        let agent = h.agent(RequestFormat::V4, accept());
        let svc = h.service(move |s| {
            s.hello(3);
            s.read_hello();
            s.send_raw(&bad);
            s.exit(0);
            s.read_all()
        });
        let o = run(h.client(&["work", "svc"]));
        assert_eq!(code(&o), 1, "{}", stderr_text(&o));
        agent.join();
        svc.join().unwrap();
    }
}

// ---- docs/qrexec.md §18 item 4: data, EOF, stderr, exit code -------------------

#[test]
fn stdout_and_stderr_are_copied_and_exit_code_42_is_returned() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(3);
        s.read_hello();
        s.stdout(b"out1 ");
        s.stderr(b"err1\n");
        s.stdout(b"out2");
        s.stdout(b"");
        s.stderr(b"");
        s.exit(42);
        s.read_all()
    });
    let o = run(h.client(&["work", "svc"]));
    assert_eq!(code(&o), 42);
    assert_eq!(o.stdout, b"out1 out2");
    assert_eq!(o.stderr, b"err1\n");
    agent.join();
    // stdin was /dev/null: exactly one STDIN EOF
    assert_eq!(svc.join().unwrap(), vec![(0x190, vec![])]);
}

#[test]
fn stdout_eof_closes_local_output_before_the_call_ends() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let (tx, rx) = mpsc::channel::<()>();
    let svc = h.service(move |s| {
        s.hello(3);
        s.read_hello();
        s.stdout(b"abc");
        s.stdout(b"");
        // wait until the test saw EOF on the client's stdout
        rx.recv_timeout(TIMEOUT)
            .expect("client never closed its stdout");
        s.exit(0);
        s.read_all()
    });
    let mut child = h.client(&["work", "svc"]).spawn().unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert_eq!(out, b"abc");
    tx.send(()).unwrap();
    let st = wait_timeout(&mut child);
    assert_eq!(st.code(), Some(0));
    agent.join();
    svc.join().unwrap();
}

#[test]
fn exit_code_125_sends_exactly_one_stdin_eof() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(3);
        s.read_hello();
        s.exit(125);
        let first = s.read_msg();
        // service side closes: the client must end with 125
        s.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let rest = s.read_all();
        (first, rest)
    });
    let mut c = h.client(&["work", "svc"]);
    c.stdin(Stdio::piped());
    let mut child = c.spawn().unwrap();
    drop(c); // the Command holds our copies of the child's stdio
    // keep stdin open (no data, no EOF) for the whole call
    let stdin = child.stdin.take().unwrap();
    let st = wait_timeout(&mut child);
    drop(stdin);
    assert_eq!(st.code(), Some(125));
    let (first, rest) = svc.join().unwrap();
    assert_eq!(first, Some((0x190, vec![])));
    assert!(rest.is_empty(), "more after the EOF: {rest:?}");
    agent.join();
}

#[test]
fn mislabelled_stdin_from_old_windows_agents_is_stdout() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(3);
        s.read_hello();
        s.send_raw(&encode_data(MsgType::DataStdin, b"qwt"));
        s.stdout(b"!");
        s.send_raw(&encode_data(MsgType::DataStdin, b""));
        s.stdout(b"discarded after EOF");
        s.exit(0);
        s.read_all()
    });
    let o = run(h.client(&["work", "svc"]));
    assert_eq!(code(&o), 0);
    assert_eq!(o.stdout, b"qwt!");
    agent.join();
    svc.join().unwrap();
}

#[test]
fn dom0_style_service_reads_first_and_sends_empty_stderr_without_stderr_eof_later() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.read_hello();
        s.hello(3);
        s.stderr(b"");
        s.stdout(b"from dom0");
        s.stdout(b"");
        s.exit(0);
        s.read_all()
    });
    let o = run(h.client(&["dom0", "svc"]));
    assert_eq!(code(&o), 0);
    assert_eq!(o.stdout, b"from dom0");
    assert!(o.stderr.is_empty());
    agent.join();
    svc.join().unwrap();
}

#[test]
fn large_output_with_a_slow_reader_arrives_intact() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let total = 3 * 1024 * 1024 + 123;
    let data: Vec<u8> = (0..total).map(|i| (i * 7 % 256) as u8).collect();
    let expect = data.clone();
    let svc = h.service(move |s| {
        s.hello(4);
        s.read_hello();
        for c in data.chunks(65536) {
            s.stdout(c);
        }
        s.stdout(b"");
        s.exit(0);
        s.read_all()
    });
    let mut child = h.client(&["work", "svc"]).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    // let the pipe and the channel fill up before reading
    std::thread::sleep(Duration::from_millis(200));
    let mut got = Vec::new();
    out.read_to_end(&mut got).unwrap();
    assert_eq!(wait_timeout(&mut child).code(), Some(0));
    assert!(
        got == expect,
        "output differs (len {} vs {})",
        got.len(),
        expect.len()
    );
    agent.join();
    svc.join().unwrap();
}

#[test]
fn reader_of_stdout_going_away_does_not_hang_the_call() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(4);
        s.read_hello();
        for _ in 0..64 {
            s.stdout(&[b'x'; 65536]);
        }
        s.stdout(b"");
        s.exit(3);
        s.read_all()
    });
    let mut child = h.client(&["work", "svc"]).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 10];
    out.read_exact(&mut first).unwrap();
    drop(out);
    assert_eq!(wait_timeout(&mut child).code(), Some(3));
    agent.join();
    svc.join().unwrap();
}

// ---- docs/qrexec.md §18 item 5: local program --------------------------------

#[test]
fn local_program_gets_stdio_sockets_and_environment() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let script = "tr '\\000' ' ' < /proc/$$/cmdline; echo; \
                  echo \"pid=$QREXEC_AGENT_PID saved2=${SAVED_FD_2-unset}\"; \
                  echo direct >&$SAVED_FD_1; \
                  cat";
    let svc = h.service(|s| {
        s.hello(4);
        s.read_hello();
        s.stdout(b"from service\n");
        s.stdout(b"");
        let (got, _) = s.read_stdin_to_eof();
        s.exit(0);
        s.read_all();
        String::from_utf8(got).unwrap()
    });
    let mut child = h
        .client(&["work", "svc", "/bin/sh", "-c", script])
        .spawn()
        .unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let st = wait_timeout(&mut child);
    assert_eq!(st.code(), Some(0));
    let got = svc.join().unwrap();
    let mut lines = got.lines();
    assert_eq!(
        lines.next().unwrap().split(' ').next().unwrap(),
        "sh",
        "argv[0] must be the basename: {got}"
    );
    assert_eq!(
        lines.next().unwrap(),
        format!("pid={} saved2=unset", child.id())
    );
    assert_eq!(lines.next().unwrap(), "from service");
    assert_eq!(out, b"direct\n", "SAVED_FD_1 is the client's stdout");
    agent.join();
}

#[test]
fn local_program_starts_with_no_blocked_signals() {
    // the client blocks SIGCHLD/SIGUSR1 for its signalfd; the program must
    // not inherit that mask
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(4);
        s.read_hello();
        let (got, _) = s.read_stdin_to_eof();
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        String::from_utf8(got).unwrap()
    });
    let o = run(h.client(&[
        "work",
        "svc",
        "/bin/sh",
        "-c",
        "grep SigBlk /proc/self/status",
    ]));
    assert_eq!(code(&o), 0, "{}", stderr_text(&o));
    assert_eq!(svc.join().unwrap().trim(), "SigBlk:\t0000000000000000");
    agent.join();
}

#[test]
fn pass_local_stderr_adds_saved_fd_2() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(4);
        s.read_hello();
        let (got, _) = s.read_stdin_to_eof();
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        String::from_utf8(got).unwrap()
    });
    let mut c = h.client(&[
        "work",
        "svc",
        "/bin/sh",
        "-c",
        "echo ${SAVED_FD_2:+set}; echo viafd2 >&$SAVED_FD_2",
    ]);
    c.env("PASS_LOCAL_STDERR", "1");
    let o = run(c);
    assert_eq!(code(&o), 0);
    assert_eq!(svc.join().unwrap(), "set\n");
    assert_eq!(o.stderr, b"viafd2\n");
    agent.join();
}

#[test]
fn local_program_is_run_without_path_search_and_args_are_not_options() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(4);
        s.read_hello();
        let (got, _) = s.read_stdin_to_eof();
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        String::from_utf8(got).unwrap()
    });
    let script = h.dir.path().join("prog.sh");
    std::fs::write(&script, "#!/bin/sh\necho \"$0|$*\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = h.client(&["work", "svc", "prog.sh", "-x", "--y", "-t"]);
    c.current_dir(h.dir.path());
    let o = run(c);
    assert_eq!(code(&o), 0, "{}", stderr_text(&o));
    // execv("prog.sh") runs ./prog.sh; a script sees the path it was run
    // by in $0 (we exec "./prog.sh", the C client "prog.sh").
    let got = svc.join().unwrap();
    let (zero, rest) = got.split_once('|').unwrap();
    assert!(zero.ends_with("prog.sh"), "{got}");
    assert_eq!(rest, "-x --y -t\n");
    agent.join();
}

// ---- docs/qrexec.md §18 item 6 is in exit_status.rs --------------------------

// ---- docs/qrexec.md §18 item 7: --use-stdin-socket -------------------------------

#[test]
fn use_stdin_socket_half_closes_each_direction() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let (mine, theirs) = UnixStream::pair().unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    let svc = h.service(move |s| {
        s.hello(4);
        s.read_hello();
        // local EOF arrives as STDIN EOF while our output still flows
        let (got, _) = s.read_stdin_to_eof();
        assert_eq!(got, b"request");
        s.stdout(b"response");
        s.stdout(b"");
        rx.recv_timeout(TIMEOUT)
            .expect("test never saw the shutdown");
        s.exit(0);
        s.read_all()
    });
    let mut c = h.client(&["--use-stdin-socket", "work", "svc"]);
    c.stdin(Stdio::from(OwnedFd::from(theirs)));
    let mut child = c.spawn().unwrap();
    drop(c); // the Command holds our copies of the child's stdio
    let mut mine = mine;
    mine.set_read_timeout(Some(TIMEOUT)).unwrap();
    mine.write_all(b"request").unwrap();
    mine.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    // returns when the client shut down its write side (STDOUT EOF)
    mine.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"response");
    tx.send(()).unwrap();
    assert_eq!(wait_timeout(&mut child).code(), Some(0));
    agent.join();
    svc.join().unwrap();
}

#[test]
fn use_stdin_socket_needs_a_socket_and_no_local_program() {
    let h = Harness::new();
    let o = run(h.client(&["--use-stdin-socket", "work", "svc"]));
    assert_eq!(code(&o), 2);
    assert!(
        stderr_text(&o).contains("not a socket"),
        "{}",
        stderr_text(&o)
    );
    let o = run(h.client(&["--use-stdin-socket", "work", "svc", "/bin/true"]));
    assert_eq!(code(&o), 2);
    let o = run(h.client(&["--use-stdin-socket", "--use-stdin-socket", "work", "svc"]));
    assert_eq!(code(&o), 2);
}

// ---- docs/qrexec.md §18 item 8: --prefix-data and SIGUSR1 -----------------------

#[test]
fn prefix_data_is_sent_before_stdin_is_readable() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let (tx, rx) = mpsc::channel::<()>();
    let svc = h.service(move |s| {
        s.hello(4);
        s.read_hello();
        // stdin has no data yet: the prefix must come anyway
        let first = s.read_msg().unwrap();
        assert_eq!(first, (0x190, b"PREFIX ".to_vec()));
        tx.send(()).unwrap();
        let (rest, _) = s.read_stdin_to_eof();
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        rest
    });
    let mut c = h.client(&["-p", "PREFIX ", "work", "svc"]);
    c.stdin(Stdio::piped());
    let mut child = c.spawn().unwrap();
    drop(c); // the Command holds our copies of the child's stdio
    let mut stdin = child.stdin.take().unwrap();
    rx.recv_timeout(TIMEOUT).expect("prefix not sent");
    stdin.write_all(b"after").unwrap();
    drop(stdin);
    assert_eq!(wait_timeout(&mut child).code(), Some(0));
    assert_eq!(svc.join().unwrap(), b"after");
    agent.join();
}

#[test]
fn long_prefix_is_chunked_and_empty_prefix_sends_nothing() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let prefix = "p".repeat(10_000);
    let svc = h.service(|s| {
        s.hello(2);
        s.read_hello();
        let (got, sizes) = s.read_stdin_to_eof();
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        (got, sizes)
    });
    let o = run(h.client(&["-p", &prefix, "work", "svc"]));
    assert_eq!(code(&o), 0);
    let (got, sizes) = svc.join().unwrap();
    assert_eq!(got, prefix.as_bytes());
    assert_eq!(sizes, vec![4096, 4096, 1808]);
    agent.join();

    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(4);
        s.read_hello();
        let m = s.read_msg();
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        m
    });
    let o = run(h.client(&["--prefix-data=", "work", "svc"]));
    assert_eq!(code(&o), 0);
    // the first message is the EOF of /dev/null, not an empty prefix
    assert_eq!(svc.join().unwrap(), Some((0x190, vec![])));
    agent.join();
}

#[test]
fn sigusr1_switches_the_program_to_its_stdin_socket() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(4);
        s.read_hello();
        let (got, _) = s.read_stdin_to_eof();
        s.stdout(b"");
        s.exit(0);
        s.read_all();
        got
    });
    // After SIGUSR1 the program writes to its fd 0 and closes fd 1.
    let script = "kill -USR1 $QREXEC_AGENT_PID; printf via-socket >&0; exec 0<&- 1>&-";
    let o = run(h.client(&["work", "svc", "/bin/sh", "-c", script]));
    assert_eq!(code(&o), 0, "{}", stderr_text(&o));
    assert_eq!(svc.join().unwrap(), b"via-socket");
    agent.join();
}

// ---- docs/qrexec.md §18 item 9: escape filtering ----------------------------------

fn filtered(args: &[&str]) -> std::process::Output {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = h.service(|s| {
        s.hello(4);
        s.read_hello();
        s.stdout(b"hello\0world\xff");
        s.stderr(b"e\x1b[1m\n");
        s.stdout(b"");
        s.exit(0);
        s.read_all()
    });
    let mut a = args.to_vec();
    a.extend(["work", "svc"]);
    let o = run(h.client(&a));
    agent.join();
    svc.join().unwrap();
    o
}

#[test]
fn filter_options_replace_escape_characters() {
    let o = filtered(&["-t"]);
    assert_eq!(o.stdout, b"hello_world_");
    assert_eq!(o.stderr, b"e\x1b[1m\n");
    let o = filtered(&["-T"]);
    assert_eq!(o.stdout, b"hello\0world\xff");
    assert_eq!(o.stderr, b"e_[1m\n");
    // not a terminal: no filtering by default; last option wins
    let o = filtered(&[]);
    assert_eq!(o.stdout, b"hello\0world\xff");
    let o = filtered(&[
        "-t",
        "--no-filter-escape-chars-stdout",
        "-T",
        "--no-filter-escape-chars-stderr",
    ]);
    assert_eq!(o.stdout, b"hello\0world\xff");
    assert_eq!(o.stderr, b"e\x1b[1m\n");
}

// ---- call lifecycle ----------------------------------------------------------------

#[test]
fn agent_socket_stays_open_until_the_call_ends() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let (tx, rx) = mpsc::channel::<()>();
    let svc = h.service(move |s| {
        s.hello(4);
        s.read_hello();
        s.stdout(b"x");
        rx.recv_timeout(TIMEOUT).unwrap();
        s.stdout(b"");
        s.exit(0);
        s.read_all()
    });
    let mut child = h.client(&["work", "svc"]).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    out.read_exact(&mut b).unwrap();
    assert!(
        !agent.client_closed(),
        "agent socket closed during the call"
    );
    tx.send(()).unwrap();
    assert_eq!(wait_timeout(&mut child).code(), Some(0));
    let log = agent.join();
    assert!(log.extra.is_empty());
    svc.join().unwrap();
}

#[test]
fn inherited_descriptors_are_not_left_nonblocking() {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = simple_service(&h, b"data", 0);
    let (in_r, in_w) = nix::unistd::pipe().unwrap();
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let in_keep = in_r.try_clone().unwrap();
    let out_keep = out_w.try_clone().unwrap();
    let mut c = h.client(&["work", "svc"]);
    c.stdin(Stdio::from(in_r)).stdout(Stdio::from(out_w));
    let mut child = c.spawn().unwrap();
    drop(c); // the Command holds our copies of the child's stdio
    drop(in_w);
    assert_eq!(wait_timeout(&mut child).code(), Some(0));
    for fd in [&in_keep, &out_keep] {
        let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
        assert!(!fl.contains(OFlag::O_NONBLOCK), "left O_NONBLOCK");
    }
    drop(out_keep);
    let mut got = Vec::new();
    std::fs::File::from(out_r).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"data");
    agent.join();
    svc.join().unwrap();
}

// ---- command line at the process level ------------------------------------------

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let h = Harness::new();
    let o = run(h.client(&[]));
    assert_eq!(code(&o), 2);
    let o = run(h.client(&["onlyone"]));
    assert_eq!(code(&o), 2);
    let o = run(h.client(&["-p", "a", "-p", "b", "vm", "svc"]));
    assert_eq!(code(&o), 2);
    let o = run(h.client(&["--help"]));
    assert_eq!(code(&o), 0);
    let help = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--buffer-size",
        "--filter-escape-chars-stdout",
        "--filter-escape-chars-stderr",
        "--no-filter-escape-chars-stdout",
        "--no-filter-escape-chars-stderr",
        "--agent-socket",
        "--prefix-data",
        "--use-stdin-socket",
        "--source-qube",
        "--request-format",
        "--verbose",
    ] {
        assert!(help.contains(opt), "help lacks {opt}");
    }
}

#[test]
fn bad_buffer_size_exits_1_before_contacting_the_agent() {
    let h = Harness::new();
    for bad in ["abc", "2000000", "64k", "0x"] {
        let o = run(h.client(&[&format!("--buffer-size={bad}"), "work", "svc"]));
        assert_eq!(code(&o), 1, "{bad}");
        assert_eq!(stderr_text(&o).lines().count(), 1, "{}", stderr_text(&o));
    }
}

#[test]
fn no_vchan_transport_is_one_clear_line_and_exit_1() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let mut c = h.client(&["work", "svc"]);
    c.env_remove("VCHAN_SOCKET_DIR");
    let o = run(c);
    assert_eq!(code(&o), 1);
    assert_eq!(
        stderr_text(&o),
        "qrexec-client-vm: no /dev/xen here: set VCHAN_SOCKET_DIR (or VCHAN_LOCAL_DIR) to use a local transport\n"
    );
    agent.join();
}

#[test]
fn service_that_never_connects_times_out_with_exit_1() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let mut c = h.client(&["work", "svc"]);
    c.env("QREXEC_CONNECT_TIMEOUT_MS", "200");
    let o = run(c);
    assert_eq!(code(&o), 1);
    assert!(stderr_text(&o).contains("data vchan connection failed"));
    assert!(!h.data_socket().exists(), "socket left behind");
    agent.join();
}

#[test]
fn verbose_logs_to_stderr_and_is_silent_otherwise() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = simple_service(&h, b"", 0);
    let mut c = h.client(&["work", "svc"]);
    c.env("QREXEC_CLIENT_VERBOSE", "1");
    let o = run(c);
    assert_eq!(code(&o), 0);
    assert!(
        stderr_text(&o).contains("request format v4"),
        "{}",
        stderr_text(&o)
    );
    agent.join();
    svc.join().unwrap();

    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let svc = simple_service(&h, b"", 0);
    let o = run(h.client(&["work", "svc"]));
    assert_eq!(code(&o), 0);
    assert!(o.stderr.is_empty(), "{}", stderr_text(&o));
    agent.join();
    svc.join().unwrap();
}

#[test]
fn vchan_domain_names_the_socket() {
    let h = Harness::new();
    let agent = h.agent(RequestFormat::V4, accept());
    let path = vchan::socket_path(h.dir.path(), 9, DOMAIN as u16, PORT);
    let svc = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut s = loop {
            if let Ok(s) = UnixStream::connect(&path) {
                break s;
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        };
        s.write_all(&qrexec::proto::encode_hello(4)).unwrap();
        s.write_all(&encode_data(MsgType::DataStdout, b"")).unwrap();
        s.write_all(&qrexec::proto::encode_exit_code(0)).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    });
    let mut c = h.client(&["work", "svc"]);
    c.env("VCHAN_DOMAIN", "9");
    let o = run(c);
    assert_eq!(code(&o), 0, "{}", stderr_text(&o));
    svc.join().unwrap();
    agent.join();
}
