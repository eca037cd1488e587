//! Host side of the QEMU guest agent (dom0's `qemu-ga` on a virtio-serial
//! port) and of QMP, over their unix sockets. JSON lines, stdlib + serde_json.
//!
//! Only one client at a time can talk to the agent's chardev, so every call
//! opens its own connection, synchronises with `guest-sync-delimited` (which
//! discards anything a previous, interrupted client left in the pipe) and
//! closes it again.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The environment of commands run in dom0 through the agent.
const GUEST_ENV: &[&str] = &[
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "TERM=dumb",
    "LANG=C.UTF-8",
];

/// What a command run in a guest produced.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// The exit code (128 + signal for a killed command, 124 on our timeout).
    pub code: i32,
    /// Standard output (dom0), or stdout and stderr combined (domUs).
    pub stdout: String,
    /// Standard error (dom0 only).
    pub stderr: String,
}

impl Output {
    /// Whether the command exited with 0.
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// stdout and stderr together, for logs.
    pub fn all(&self) -> String {
        let mut s = self.stdout.clone();
        if !self.stderr.is_empty() {
            if !s.is_empty() && !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(&self.stderr);
        }
        s
    }
}

struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Conn {
    fn open(path: &Path, timeout: Duration) -> Result<Conn, String> {
        let s =
            UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Conn {
            r: BufReader::new(s),
            w,
        })
    }

    fn line(&mut self) -> Result<Vec<u8>, String> {
        let mut buf = Vec::new();
        let n = self
            .r
            .read_until(b'\n', &mut buf)
            .map_err(|e| format!("read from the guest agent: {e}"))?;
        if n == 0 {
            return Err("the guest agent closed the connection".into());
        }
        Ok(buf)
    }

    fn send(&mut self, v: &Value, delimited: bool) -> Result<(), String> {
        let mut bytes = Vec::new();
        if delimited {
            bytes.push(0xff);
        }
        bytes.extend_from_slice(v.to_string().as_bytes());
        bytes.push(b'\n');
        self.w
            .write_all(&bytes)
            .map_err(|e| format!("write to the guest agent: {e}"))
    }

    /// `guest-sync-delimited`: the reply follows a 0xff byte; skip stale data.
    fn sync(&mut self) -> Result<(), String> {
        let token = (u64::from(std::process::id()) << 20) ^ (nanos_now() & 0xF_FFFF);
        self.send(
            &json!({"execute": "guest-sync-delimited", "arguments": {"id": token}}),
            true,
        )?;
        loop {
            let line = self.line()?;
            let tail = match line.iter().rposition(|&b| b == 0xff) {
                Some(i) => &line[i + 1..],
                None => &line[..],
            };
            if let Ok(v) = serde_json::from_slice::<Value>(tail)
                && v.get("return").and_then(Value::as_u64) == Some(token)
            {
                return Ok(());
            }
        }
    }

    fn call(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, String> {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        self.send(&req, false)?;
        loop {
            let line = self.line()?;
            let trimmed: Vec<u8> = line.into_iter().filter(|&b| b != 0xff).collect();
            if trimmed.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(&trimmed)
                .map_err(|e| format!("{cmd}: bad JSON from the agent: {e}"))?;
            if let Some(err) = v.get("error") {
                return Err(format!("{cmd}: {err}"));
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }
}

fn nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos().into())
        .unwrap_or(0)
}

/// Waits until the agent answers `guest-ping`, at most `timeout`; gives up
/// early when `alive()` says QEMU is gone.
pub fn ping(path: &Path, timeout: Duration, alive: &dyn Fn() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive() {
            return Err("QEMU is not running any more".into());
        }
        let attempt = Conn::open(path, Duration::from_secs(5)).and_then(|mut c| {
            c.sync()?;
            c.call("guest-ping", None).map(drop)
        });
        if attempt.is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    Err(format!(
        "the guest agent did not answer within {}s",
        timeout.as_secs()
    ))
}

/// Runs `/bin/sh -c cmd` in the guest and waits for it, at most `timeout`
/// (then `code` is 124 and the command may still run in the guest).
pub fn exec(path: &Path, cmd: &str, timeout: Duration) -> Result<Output, String> {
    let mut c = Conn::open(path, Duration::from_secs(60))?;
    c.sync()?;
    let r = c.call(
        "guest-exec",
        Some(json!({
            "path": "/bin/sh",
            "arg": ["-c", cmd],
            "env": GUEST_ENV,
            "capture-output": true,
        })),
    )?;
    let pid = r
        .get("pid")
        .and_then(Value::as_i64)
        .ok_or("guest-exec: no pid in the reply")?;
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    let st = loop {
        let st = c.call("guest-exec-status", Some(json!({ "pid": pid })))?;
        if st.get("exited").and_then(Value::as_bool) == Some(true) {
            break st;
        }
        if Instant::now() > deadline {
            return Ok(Output {
                code: 124,
                stdout: String::new(),
                stderr: format!(
                    "lab: command still running after {}s (guest pid {pid})\n",
                    timeout.as_secs()
                ),
            });
        }
        std::thread::sleep(delay);
        delay = (delay * 3 / 2).min(Duration::from_secs(1));
    };
    let text = |k: &str| -> String {
        st.get(k)
            .and_then(Value::as_str)
            .map(|s| String::from_utf8_lossy(&base64_decode(s)).into_owned())
            .unwrap_or_default()
    };
    let mut stderr = text("err-data");
    if st.get("out-truncated").and_then(Value::as_bool) == Some(true)
        || st.get("err-truncated").and_then(Value::as_bool) == Some(true)
    {
        stderr.push_str("lab: output truncated by the guest agent (16 MiB limit)\n");
    }
    let code = match (
        st.get("exitcode").and_then(Value::as_i64),
        st.get("signal").and_then(Value::as_i64),
    ) {
        (Some(c), _) => c as i32,
        (None, Some(s)) => 128 + s as i32,
        (None, None) => 255,
    };
    Ok(Output {
        code,
        stdout: text("out-data"),
        stderr,
    })
}

/// Asks QEMU to quit over QMP.
pub fn qmp_quit(path: &Path) -> Result<(), String> {
    let mut c = Conn::open(path, Duration::from_secs(10))?;
    c.line()?; // greeting
    c.send(&json!({"execute": "qmp_capabilities"}), false)?;
    c.line()?;
    c.send(&json!({"execute": "quit"}), false)?;
    let _ = c.line();
    Ok(())
}

/// Standard base64 (with or without padding; whitespace ignored).
pub fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Standard base64 with padding.
pub fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for ch in b.chunks(3) {
        let n = ch
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, &x)| a | (u32::from(x) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= ch.len() {
                s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for n in 0..40usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let e = base64_encode(&data);
            assert_eq!(e.len() % 4, 0);
            assert_eq!(base64_decode(&e), data, "{e}");
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64_decode("aGVs\nbG8="), b"hello");
    }
}
