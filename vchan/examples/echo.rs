//! An echo server and client over vchan, with the blocking API.
//!
//! ```text
//! cargo run -p vchan --example echo                   # both ends here, over the Local transport
//! echo-server: vchan echo server PEER PORT            # in one domain (transport from the env)
//! echo-client: vchan echo client PEER PORT            # in the other; lines from stdin
//! ```
//!
//! Without arguments it starts a same-host Xen double (`vchan::LocalXen`)
//! in a temporary directory, plays domain 1 (server) and domain 2 (client)
//! on two threads, and echoes three lines. With `server`/`client` it uses
//! `vchan::Transport::from_env()`: real Xen by default, or `VCHAN_LOCAL_DIR`
//! / `VCHAN_SOCKET_DIR` with `VCHAN_DOMAIN`.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use vchan::{LocalXen, Transport, Vchan};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Echo every byte back until the client closes.
fn serve(t: &Transport, peer: u16, port: u32) -> Result<()> {
    let mut v = Vchan::server(t, peer, port, 4096, 4096)?;
    v.wait_connected(Some(Duration::from_secs(60)))?;
    let mut buf = [0u8; 4096];
    loop {
        let n = v.read(&mut buf)?;
        if n == 0 {
            return Ok(()); // the client closed
        }
        v.write_all(&buf[..n])?;
    }
}

/// Send each line and print what comes back.
fn client(t: &Transport, peer: u16, port: u32, lines: impl Iterator<Item = String>) -> Result<()> {
    let v = Vchan::client(t, peer, port, Duration::from_secs(60))?;
    let mut rx = BufReader::new(v);
    for line in lines {
        rx.get_mut().write_all(format!("{line}\n").as_bytes())?;
        let mut back = String::new();
        rx.read_line(&mut back)?;
        print!("echo: {back}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            let dir = tempfile::tempdir()?;
            let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
            let (t1, t2) = (xen.transport(1), xen.transport(2));
            let server = std::thread::spawn(move || serve(&t1, 2, 4242).map_err(|e| e.to_string()));
            let lines = ["hello", "over a vchan", "between two domains"].map(String::from);
            client(&t2, 1, 4242, lines.into_iter())?;
            server.join().expect("server thread")?;
            Ok(())
        }
        [role, peer, port] => {
            let t = Transport::from_env()?;
            let (peer, port) = (peer.parse()?, port.parse()?);
            match role.as_str() {
                "server" => serve(&t, peer, port),
                "client" => client(
                    &t,
                    peer,
                    port,
                    std::io::stdin().lines().map_while(|l| l.ok()),
                ),
                _ => Err("usage: echo [server|client PEER PORT]".into()),
            }
        }
        _ => Err("usage: echo [server|client PEER PORT]".into()),
    }
}
