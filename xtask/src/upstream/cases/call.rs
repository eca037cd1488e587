//! One call of a client through the stack, and how its result is judged.

use super::*;

/// What one call did.
pub(super) struct Run {
    pub(super) code: Option<i32>,
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
    pub(super) secs: f64,
    pub(super) cpu: f64,
    pub(super) hung: bool,
}

pub(super) fn code_of(st: ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    st.code().or_else(|| st.signal().map(|s| 128 + s))
}

pub(super) fn cpu_children() -> f64 {
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

pub(super) fn call(world: &World, client: &Path, case: &Case) -> Result<Run, String> {
    let mut cmd = Command::new(client);
    cmd.arg(format!(
        "--agent-socket={}",
        world.dir.join("work/agent.sock").display()
    ))
    .args(&case.args)
    .env("VCHAN_DOMAIN", "1")
    .env("VCHAN_SOCKET_DIR", &world.vchan)
    .env("QREXEC_NO_ROOT", "1")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let cpu0 = cpu_children();
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", client.display()))?;
    let mut stdin = child.stdin.take();
    let input = case.input.clone();
    let data = world.dir.join("data");
    let feeder = std::thread::spawn(move || {
        let mut w = stdin.take()?;
        match input {
            Input::Bytes(b) => {
                let _ = w.write_all(&b);
                None
            }
            Input::Data(n) => {
                if let Ok(f) = fs::File::open(&data) {
                    let _ = std::io::copy(&mut f.take(n as u64), &mut w);
                }
                None
            }
            Input::KeptOpen => Some(w),
        }
    });
    let late = match case.output {
        Output::Late(d) => Some(d),
        Output::Capture => None,
    };
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        if let Some(d) = late {
            std::thread::sleep(d);
        }
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let ereader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut hung = false;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(st);
        }
        if t0.elapsed() > HANG {
            hung = true;
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_children() - cpu0;
    // The kept-open pipe closes only now, after the client exited.
    drop(feeder.join());
    let stdout = reader.join().unwrap_or_default();
    let stderr = ereader.join().unwrap_or_default();
    Ok(Run {
        code: status.and_then(code_of),
        stdout,
        stderr,
        secs,
        cpu,
        hung,
    })
}

pub(super) fn check(world: &World, c: &Check, got: &[u8], what: &str) -> Result<(), String> {
    let show = |b: &[u8]| {
        let s = String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned();
        format!("{s:?}{}", if b.len() > 120 { "…" } else { "" })
    };
    match c {
        Check::Any => Ok(()),
        Check::Eq(want) if got == want.as_slice() => Ok(()),
        Check::Eq(want) => Err(format!("{what} {} ≠ {}", show(got), show(want))),
        Check::Contains(s) if String::from_utf8_lossy(got).contains(s) => Ok(()),
        Check::Contains(s) => Err(format!("{what} {} lacks {s:?}", show(got))),
        Check::Data(n) => {
            let want = &world.data_sha[n];
            if got.len() != *n {
                return Err(format!("{what}: {} bytes, not {n}", got.len()));
            }
            let sha = crate::util::sha256_bytes(got)?;
            if &sha == want {
                Ok(())
            } else {
                Err(format!("{what}: SHA-256 {sha} ≠ {want}"))
            }
        }
        Check::ShaLine(n) => {
            let want = format!("{}\n", world.data_sha[n]);
            if got == want.as_bytes() {
                Ok(())
            } else {
                Err(format!("{what} {} ≠ SHA-256 of the input", show(got)))
            }
        }
    }
}

pub(super) fn judge(world: &World, case: &Case, r: &Run) -> Result<(), String> {
    if r.hung {
        return Err(format!("hang: killed after {} s", HANG.as_secs()));
    }
    if r.code != Some(case.code) {
        return Err(format!(
            "exit {:?}, expected {} (stderr {:?})",
            r.code,
            case.code,
            String::from_utf8_lossy(&r.stderr[..r.stderr.len().min(200)])
        ));
    }
    check(world, &case.stdout, &r.stdout, "stdout")?;
    check(world, &case.stderr, &r.stderr, "stderr")
}

pub(super) fn cell(case: &Case, r: &Run, ok: &Result<(), String>) -> String {
    let verdict = if ok.is_ok() { "ok" } else { "FAIL" };
    let rate = if case.bytes > 0 && r.secs > 0.0 {
        format!("{:.0} MB/s", case.bytes as f64 / r.secs / 1e6)
    } else {
        String::new()
    };
    format!("{verdict} {:.2} s {rate} cpu {:.2} s", r.secs, r.cpu)
}

/// Mean wall time of `n` sequential trivial echo calls.
pub(super) fn latency(world: &World, client: &Path, n: usize) -> Result<f64, String> {
    let c = case(
        "echo",
        &["personal", "test.Echo"],
        Input::Bytes(b"x".to_vec()),
        0,
    )
    .out(Check::Eq(b"x".to_vec()));
    let t0 = Instant::now();
    for _ in 0..n {
        let r = call(world, client, &c)?;
        judge(world, &c, &r).map_err(|e| format!("latency call: {e}"))?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0 / n as f64)
}
