//! A peer that corrupts the shared ring, through the C API (issue 12,
//! "bad input … a peer that corrupts the ring"): the C program
//! `tests/c/corrupt_ring.c`, linked with our library, is the vchan server
//! on the Local transport (real shared memory); this test is its client
//! and also maps the server's control page a second time through the
//! grant double (`LocalXen::map_control_page`), as a hostile peer in
//! another domain could, to move the indices the client owns. The C calls must return −1 with `errno =
//! EPROTO` and log a line, never crash or hang.

use std::io::{BufRead, BufReader, Read, Write};

mod support;
use std::time::{Duration, Instant};

use vchan::control::SharedHeader;
use vchan::{LocalXen, Vchan};

/// The C program's domain (the server) and ours (its client).
const SERVER: u16 = 1;
const PEER: u16 = 2;
const PORT: u32 = 4444;
const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn a_peer_corrupting_the_ring_gets_eproto_through_the_c_api() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = support::build_c_program(tmp.path(), "corrupt_ring");
    let xen_dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(xen_dir.path(), &[0, SERVER, PEER]).unwrap();
    let mut child = support::c_program_command(&exe, xen_dir.path(), SERVER)
        .spawn()
        .unwrap();
    // A watchdog: a hang fails the test (the program is killed, its
    // output ends) instead of blocking it.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let watchdog = std::thread::spawn(move || {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
            if nix::sys::signal::kill(pid, None).is_err() {
                return;
            }
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    });
    let mut to_c = child.stdin.take().unwrap();
    let mut from_c = BufReader::new(child.stdout.take().unwrap());

    // Connects to the C server on `port` as its client, maps its control
    // page a second time, moves the index at `offset` by 2^30 (more than
    // any ring holds) and tells the program to look. The vchan and the
    // mapping stay alive until the end.
    let mut attack = |port: u32, offset: usize| {
        // Mapped before we connect: the server's advertisement goes then.
        let page = xen
            .map_control_page(PEER, SERVER, port, TIMEOUT)
            .unwrap_or_else(|e| panic!("no server on port {port}: {e}"));
        let client = Vchan::client(&xen.transport(PEER), SERVER, port, TIMEOUT).unwrap();
        let mut line = String::new();
        from_c.read_line(&mut line).unwrap();
        assert_eq!(
            line,
            format!("ready {port}\n"),
            "the C server did not connect"
        );
        page.store_u32(offset, page.load_u32(offset).wrapping_add(1 << 30));
        to_c.write_all(b"go\n").unwrap();
        (client, page)
    };
    // left.prod (offset 4): the producer index of the ring the server
    // reads; right.cons (offset 8): the consumer index of the ring it
    // writes (docs/vchan.md §3).
    let read_side = attack(PORT, 4);
    let write_side = attack(PORT + 1, 8);
    let status = child.wait().unwrap();
    watchdog.join().unwrap();
    drop((read_side, write_side));
    let mut out = String::new();
    from_c.read_to_string(&mut out).unwrap();
    let err = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(
        status.success(),
        "the C program failed or hung ({status}):\n{out}{err}"
    );
    assert!(out.contains("(server)"), "{out}");
    // A log line for each refused call, naming it and the corruption.
    for call in [
        "libvchan_data_ready",
        "libvchan_read",
        "libvchan_recv",
        "libvchan_buffer_space",
        "libvchan_write",
        "libvchan_send",
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("libvchan: {call}: ")) && l.contains("corrupt")),
            "no log line for {call}:\n{err}"
        );
    }
    drop(xen);
}
