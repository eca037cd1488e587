//! The echo of `examples/echo.rs` with the tokio face (`--features tokio`):
//! async connect on both sides, `AsyncRead`/`AsyncWrite`.
//!
//! ```text
//! cargo run -p vchan --features tokio --example echo_tokio
//! ```
//!
//! Both ends run in one current-thread runtime, as domains 1 and 2 of a
//! same-host Xen double (`vchan::LocalXen`) in a temporary directory.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use vchan::{AsyncVchan, LocalXen, Vchan};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    let mut srv = Vchan::server(&xen.transport(1), 2, 4243, 4096, 4096)?;
    let t2 = xen.transport(2);

    let server = async move {
        srv.wait_connected_async(Some(Duration::from_secs(30)))
            .await?;
        let mut v = AsyncVchan::new(srv)?;
        let mut buf = [0u8; 4096];
        loop {
            let n = v.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(()); // the client closed
            }
            v.write_all(&buf[..n]).await?;
        }
    };
    let client = async move {
        let v = Vchan::client_async(&t2, 1, 4243, Duration::from_secs(30)).await?;
        let mut rx = BufReader::new(AsyncVchan::new(v)?);
        for line in ["hello", "from tokio", "over a vchan"] {
            rx.get_mut()
                .write_all(format!("{line}\n").as_bytes())
                .await?;
            let mut back = String::new();
            rx.read_line(&mut back).await?;
            print!("echo: {back}");
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    let (s, c) = tokio::join!(server, client);
    c?;
    s?;
    Ok(())
}
