//! The tokio face: async connect on both sides, AsyncRead/AsyncWrite.
#![cfg(feature = "tokio")]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vchan::{AsyncVchan, LocalXen, Vchan};

#[tokio::test(flavor = "current_thread")]
async fn async_round_trip_over_local() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let mut srv = Vchan::server(&xen.transport(1), 2, 70, 65536, 65536).unwrap();
    let t2 = xen.transport(2);
    let client = async move {
        let v = Vchan::client_async(&t2, 1, 70, Duration::from_secs(10))
            .await
            .unwrap();
        let mut a = AsyncVchan::new(v).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        a.read_exact(&mut buf).await.unwrap();
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8));
        a.write_all(b"done").await.unwrap();
    };
    let server = async move {
        srv.wait_connected_async(Some(Duration::from_secs(10)))
            .await
            .unwrap();
        let mut a = AsyncVchan::new(srv).unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        a.write_all(&data).await.unwrap();
        let mut b = [0u8; 4];
        a.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"done");
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(client, server)
    })
    .await
    .expect("no deadlock");
}

#[tokio::test(flavor = "current_thread")]
async fn async_connect_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let xen = LocalXen::start(dir.path(), &[0, 1, 2]).unwrap();
    let e = Vchan::client_async(&xen.transport(2), 1, 71, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, vchan::Error::Timeout { .. }), "{e}");
}
