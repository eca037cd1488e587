//! Cross-process tests over the Local transport: separate processes play
//! separate domains; the hubs and xenstored run in this test process.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vchan::{LocalXen, State, Vchan};

const PEER: &str = env!("CARGO_BIN_EXE_vchan-peer");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peer(xen: &LocalXen, domid: u16, args: &[&str]) -> Kill {
    Kill(
        Command::new(PEER)
            .args(args)
            .env("VCHAN_LOCAL_DIR", xen.dir())
            .env("VCHAN_DOMAIN", domid.to_string())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn finish(mut k: Kill) -> (bool, String) {
    let mut err = String::new();
    k.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let ok = k.0.wait().unwrap().success();
    (ok, err)
}

fn checksum(log: &str) -> Option<&str> {
    log.split("checksum=").nth(1).map(|s| &s[..16])
}

fn one_gib(ring_kib: &str, server_sends: bool) {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let (sdir, cdir) = if server_sends {
        ("send", "recv")
    } else {
        ("recv", "send")
    };
    let s = peer(&xen, 1, &["server", "2", "77", sdir, "1024", ring_kib]);
    let c = peer(&xen, 2, &["client", "1", "77", cdir, "1024"]);
    let (cok, clog) = finish(c);
    let (sok, slog) = finish(s);
    assert!(sok && cok, "server:\n{slog}\nclient:\n{clog}");
    let sender = if server_sends { &slog } else { &clog };
    assert!(
        sender.contains("MATCH") && !sender.contains("MISMATCH"),
        "{sender}"
    );
    assert_eq!(checksum(&slog), checksum(&clog));
    assert!(slog.contains("1073741824") || clog.contains("1073741824"));
}

#[test]
fn one_gib_through_64k_rings_server_to_client() {
    one_gib("64", true);
}

#[test]
fn one_gib_through_1m_rings_client_to_server() {
    one_gib("1024", false);
}

#[test]
fn packet_mode_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let s = peer(
        &xen,
        1,
        &["server", "2", "78", "recv", "8", "4", "--packet", "4000"],
    );
    let c = peer(
        &xen,
        2,
        &["client", "1", "78", "send", "8", "--packet", "4000"],
    );
    let (cok, clog) = finish(c);
    let (sok, slog) = finish(s);
    assert!(sok && cok, "server:\n{slog}\nclient:\n{clog}");
    assert_eq!(checksum(&slog), checksum(&clog));
}

/// Child role: play `VCHAN_DOMAIN`, write `KILL_BYTES` bytes, then hang.
#[test]
fn child_writer_then_hang() {
    let Ok(role) = std::env::var("VCHAN_TEST_ROLE") else {
        return;
    };
    let n: usize = std::env::var("KILL_BYTES").unwrap().parse().unwrap();
    let t = vchan::Transport::from_env().unwrap();
    let mut v = if role == "server" {
        let mut v = Vchan::server(&t, 2, 90, 65536, 65536).unwrap();
        v.wait_connected(Some(Duration::from_secs(20))).unwrap();
        v
    } else {
        Vchan::client(&t, 1, 90, Duration::from_secs(20)).unwrap()
    };
    v.write_all(&vec![0x5a; n]).unwrap();
    println!("written");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

fn spawn_child(xen: &LocalXen, role: &str, domid: u16, bytes: usize) -> Kill {
    Kill(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_writer_then_hang",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VCHAN_TEST_ROLE", role)
            .env("KILL_BYTES", bytes.to_string())
            .env("VCHAN_LOCAL_DIR", xen.dir())
            .env("VCHAN_DOMAIN", domid.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn survivor_after_sigkill(kill_server: bool) {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let bytes = 50_000;
    let (mut child, mut v) = if kill_server {
        let child = spawn_child(&xen, "server", 1, bytes);
        let v = Vchan::client(&xen.transport(2), 1, 90, Duration::from_secs(20)).unwrap();
        (child, v)
    } else {
        let mut v = Vchan::server(&xen.transport(1), 2, 90, 65536, 65536).unwrap();
        let child = spawn_child(&xen, "client", 2, bytes);
        v.wait_connected(Some(Duration::from_secs(20))).unwrap();
        (child, v)
    };
    // Wait until the child says it wrote everything, then kill it.
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "child ended before writing");
        if line.contains("written") {
            break;
        }
    }
    assert_eq!(v.data_ready().unwrap(), bytes);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let killed = Instant::now();
    // What was in the ring is still readable.
    let mut got = vec![0u8; bytes];
    v.read_exact(&mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0x5a));
    // Then EOF, within a second of the kill.
    let mut b = [0u8; 16];
    assert_eq!(v.read(&mut b).unwrap(), 0);
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "EOF took {:?}",
        killed.elapsed()
    );
    assert_eq!(v.state(), State::Closed);
    assert_eq!(
        v.write(b"late").unwrap_err().kind(),
        std::io::ErrorKind::BrokenPipe
    );
    drop(v);
    drop(xen);
    // Nothing left behind: only the rendezvous dir, now empty.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn client_survives_sigkill_of_server() {
    survivor_after_sigkill(true);
}

#[test]
fn server_survives_sigkill_of_client() {
    survivor_after_sigkill(false);
}
