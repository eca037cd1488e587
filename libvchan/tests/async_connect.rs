//! The async client as Qubes' C agent drives it, through the C API on the
//! Local transport: `tests/c/async_connect.c` (linked with our library)
//! calls `libvchan_client_init_async`, sleeps on the watch fd and calls
//! `..._finish` only when the fd is readable. The server (this test, our
//! `Vchan` as a peer in domain 1) is up before the program starts each
//! round, so nothing else will make the fd readable later: the library's
//! fd must show the connect is due. The Local xenstored delivers a watch's
//! first event before the WATCH reply, as a Linux domU's xenbus device
//! may; before the fix the program slept through it (in the lab, Qubes' C
//! agent logged "vchan connection timeout" on ours).

use std::io::{BufRead, BufReader, Read, Write};

mod support;
use std::time::Duration;

use vchan::{LocalXen, Vchan};

const SERVER: u16 = 1;
const CLIENT: u16 = 2;
const PORT: u32 = 4545;
const ROUNDS: usize = 10;

#[test]
fn async_client_wakes_on_its_watch_fd_when_the_server_is_already_up() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = support::build_c_program(tmp.path(), "async_connect");
    let xen_dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(xen_dir.path(), &[0, SERVER, CLIENT]).unwrap();
    let t = xen.transport(SERVER);
    let mut srv = Vchan::server(&t, CLIENT, PORT, 0, 0).unwrap();
    let mut child = support::c_program_command(&exe, xen_dir.path(), CLIENT)
        .args([SERVER.to_string(), PORT.to_string(), ROUNDS.to_string()])
        .spawn()
        .unwrap();
    let mut to_c = child.stdin.take().unwrap();
    let mut from_c = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for round in 0..ROUNDS {
        // The program's poll has a 5 s limit; ours a longer one, so a
        // quiet fd shows as its FAIL line and exit code 3.
        if srv.wait_connected(Some(Duration::from_secs(20))).is_ok() {
            srv.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            srv.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"pong", "round {round}");
        }
        line.clear();
        from_c.read_line(&mut line).unwrap();
        if line != format!("done {round}\n") {
            break;
        }
        if round + 1 < ROUNDS {
            // The next round's server, up before the program goes on.
            srv = Vchan::server(&t, CLIENT, PORT, 0, 0).unwrap();
            writeln!(to_c, "next").unwrap();
        }
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        status.success(),
        "{status}: {line}{err} (exit 3: the watch fd stayed quiet)"
    );
    line.clear();
    from_c.read_line(&mut line).unwrap();
    assert_eq!(line, format!("ok {ROUNDS}\n"), "{err}");
}
