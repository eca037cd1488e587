//! Our `qrexec-client-vm` and our VMs against a MirageOS-like VM (a VM
//! with `flavour=mirage`: mirage-qubes' agent over ocaml-vchan, protocol 3
//! at most, in-page 1 KiB/2 KiB rings, services as handlers): calls into
//! it and calls from it, with echo, 16 MiB each way with checksums, exit
//! codes and refusals.

mod common;
use common::Sim;
use qrexec::proto::{MsgHeader, MsgType, RequestFormat, Trigger};
use qubes_sim::mirage::{FNV_OFFSET, fnv1a, gen_stream};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

const CONF: &str = "vm work\nvm fw flavour=mirage\nvm up flavour=mirage-upstream\n";

const POLICY: &str = "\
mirage.Secret *       @anyvm  @anyvm    deny\n\
mirage.Echo   *       @anyvm  @anyvm    allow\n\
mirage.Sum    *       @anyvm  @anyvm    allow\n\
mirage.Gen    *       @anyvm  @anyvm    allow\n\
mirage.Exit   *       @anyvm  @anyvm    allow\n\
mirage.Nope   *       @anyvm  @anyvm    allow\n\
test.Echo     *       @anyvm  @anyvm    allow\n\
test.Exit     *       @anyvm  @anyvm    allow\n\
test.Sum      *       @anyvm  @anyvm    allow\n\
MIRAGE0000000000000000000000000 * @anyvm @anyvm allow\n\
*             *       @anyvm  @anyvm    deny\n";

/// The service name dom0 sees in mirage-qubes 2.0's first call.
const UPSTREAM_SERVICE: &str = "MIRAGE0000000000000000000000000";

const SERVICES: &[(&str, &str)] = &[
    ("test.Echo", "#!/bin/sh\nexec cat\n"),
    (
        UPSTREAM_SERVICE,
        "#!/bin/sh\necho \"service=$QREXEC_SERVICE_FULL_NAME\"\n",
    ),
    (
        "test.Exit",
        "#!/bin/sh\necho out; echo err >&2; exit \"$1\"\n",
    ),
    ("test.Sum", "#!/bin/sh\nexec cksum\n"),
];

const MIB16: usize = 16 << 20;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn data(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_246_822_519).to_le_bytes()[2])
        .collect()
}

#[test]
fn qrexec_client_vm_calls_a_mirage_vm() {
    let s = Sim::start(CONF, POLICY, SERVICES);

    // Echo, with the default 64 KiB buffers and with 1 KiB (in-page rings
    // both ways, as Qubes users run it for unikernels).
    for extra in [&[][..], &["--buffer-size=1024"][..]] {
        let mut args = extra.to_vec();
        args.extend(["fw", "mirage.Echo"]);
        let out = s.call("work", &args, b"hello mirage\n");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{extra:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(out.stdout, b"hello mirage\n", "{extra:?}");
    }

    // 16 MiB there and back (the echo streams both ways at once).
    let input = data(MIB16);
    for extra in [&[][..], &["--buffer-size=1024"][..]] {
        let mut args = extra.to_vec();
        args.extend(["fw", "mirage.Echo"]);
        let out = s.call("work", &args, &input);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{extra:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(out.stdout.len(), MIB16, "{extra:?}");
        assert!(
            fnv1a(FNV_OFFSET, &out.stdout) == fnv1a(FNV_OFFSET, &input),
            "{extra:?}: echoed data differs"
        );
    }

    // 16 MiB to it: its checksum of what it got.
    let out = s.call("work", &["fw", "mirage.Sum"], &input);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("bytes={MIB16} fnv={:016x}\n", fnv1a(FNV_OFFSET, &input))
    );

    // 16 MiB from it.
    let out = s.call("work", &["fw", "mirage.Gen+16"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), MIB16);
    let expect: Vec<u8> = (0..MIB16 as u64).map(gen_stream).collect();
    assert!(out.stdout == expect, "generated data differs");

    // Exit codes, stderr, an unknown service, a refusal.
    let out = s.call("work", &["fw", "mirage.Exit+42"], b"");
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(text(&out.stderr), "exit 42\n");
    let out = s.call("work", &["fw", "mirage.Nope"], b"");
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(text(&out.stderr), "unknown command\n");
    let out = s.call("work", &["fw", "mirage.Secret"], b"");
    assert_eq!(out.status.code(), Some(126));
    assert_eq!(text(&out.stderr), "Request refused\n");
}

/// What a unikernel's call returned: stdout, stderr, exit code.
type Outcome = (Vec<u8>, Vec<u8>, i32);

/// Makes the Mirage-like `vm` call `service` in `target` through its agent's
/// test handle; `None` when refused.
fn mirage_call(s: &Sim, vm: &str, target: &str, service: &str, input: &[u8]) -> Option<Outcome> {
    let mut sock = UnixStream::connect(s.agent_socket(vm)).unwrap();
    let req = Trigger::new(
        RequestFormat::V3,
        target.as_bytes(),
        service.as_bytes(),
        b"",
    )
    .encode()
    .unwrap();
    sock.write_all(&req).unwrap();
    let mut w = sock.try_clone().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&input);
        let _ = w.shutdown(Shutdown::Write);
    });
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut reply = Vec::new();
    match sock.read_to_end(&mut reply) {
        Ok(_) => {}
        // A refusal closes the socket; with our input unread that is a reset.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && reply.is_empty() => {}
        Err(e) => panic!("reading the reply: {e}"),
    }
    writer.join().unwrap();
    if reply.is_empty() {
        return None;
    }
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
    let mut pos = 0;
    while pos < reply.len() {
        let hdr = MsgHeader::decode(&reply[pos..]).unwrap();
        let body = &reply[pos + 8..pos + 8 + hdr.len as usize];
        match MsgType::from_u32(hdr.ty) {
            Some(MsgType::DataStdout) => out.extend_from_slice(body),
            Some(MsgType::DataStderr) => err.extend_from_slice(body),
            Some(MsgType::DataExitCode) => {
                code = Some(i32::from_le_bytes(body[..4].try_into().unwrap()))
            }
            other => panic!("unexpected message {other:?}"),
        }
        pos += 8 + hdr.len as usize;
    }
    Some((out, err, code.expect("an exit code")))
}

#[test]
fn a_mirage_vm_calls_our_vm() {
    let s = Sim::start(CONF, POLICY, SERVICES);
    let (out, _, code) = mirage_call(&s, "fw", "work", "test.Echo", b"from a unikernel\n").unwrap();
    assert_eq!((out.as_slice(), code), (&b"from a unikernel\n"[..], 0));

    let input = data(MIB16);
    let (out, _, code) = mirage_call(&s, "fw", "work", "test.Echo", &input).unwrap();
    assert_eq!(code, 0);
    assert_eq!(out.len(), MIB16);
    assert!(
        fnv1a(FNV_OFFSET, &out) == fnv1a(FNV_OFFSET, &input),
        "echo differs"
    );

    let (out, _, code) = mirage_call(&s, "fw", "work", "test.Sum", &input).unwrap();
    assert_eq!(code, 0);
    let cksum = text(&out);
    assert!(cksum.trim_end().ends_with(&format!(" {MIB16}")), "{cksum}");

    let (out, err, code) = mirage_call(&s, "fw", "work", "test.Exit+3", b"").unwrap();
    assert_eq!(
        (text(&out), text(&err), code),
        ("out\n".into(), "err\n".into(), 3)
    );

    assert!(
        mirage_call(&s, "fw", "work", "test.Secret", b"").is_none(),
        "refused"
    );
}

#[test]
fn mirage_qubes_2_trigger_names_its_request_id_as_the_service() {
    let s = Sim::start(CONF, POLICY, SERVICES);
    // The first call of `up` asks for test.Echo, but dom0 sees the service
    // `MIRAGE000…0` (its request id), which the policy here allows.
    let (out, _, code) = mirage_call(&s, "up", "work", "test.Echo", b"x").unwrap();
    assert_eq!(code, 0);
    assert_eq!(text(&out), format!("service={UPSTREAM_SERVICE}+\n"));
    // Its second call is `MIRAGE…1`: no rule, refused.
    assert!(mirage_call(&s, "up", "work", "test.Echo", b"x").is_none());
    // The same call from the corrected flavour reaches test.Echo.
    let (out, _, code) = mirage_call(&s, "fw", "work", "test.Echo", b"x").unwrap();
    assert_eq!((out.as_slice(), code), (&b"x"[..], 0));
}
