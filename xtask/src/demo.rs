//! `cargo xtask demo`: until the simulated Qubes lands, two processes play
//! two domains over the local doubles and move data through a real vchan.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util;

/// Runs the demo; `--quick` moves less data.
pub fn run(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    util::cargo(&["build", "--release", "--quiet", "-p", "vchan", "--bins"])?;
    let bin = util::target_dir().join("release");
    let dir = std::env::temp_dir().join(format!("vchan-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut xen = Command::new(bin.join("vchan-local-xen"))
        .args([
            "--dir",
            dir.to_str().unwrap_or_default(),
            "--domains",
            "0,1,2",
            "--stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("start vchan-local-xen: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let mib = if quick { "64" } else { "1024" };
    let peer = |domid: &str, args: &[&str]| {
        Command::new(bin.join("vchan-peer"))
            .args(args)
            .env("VCHAN_LOCAL_DIR", &dir)
            .env("VCHAN_DOMAIN", domid)
            .spawn()
    };
    let result = (|| {
        let mut s =
            peer("1", &["server", "2", "100", "send", mib, "64"]).map_err(|e| e.to_string())?;
        let mut c = peer("2", &["client", "1", "100", "recv", mib]).map_err(|e| e.to_string())?;
        let cs = c.wait().map_err(|e| e.to_string())?;
        let ss = s.wait().map_err(|e| e.to_string())?;
        if cs.success() && ss.success() {
            Ok(())
        } else {
            Err("a peer failed".to_string())
        }
    })();
    drop(xen.stdin.take());
    let _ = xen.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
