//! The measuring end of the benchmarks: `xtask bench worker <mode> ...`,
//! run from a **release** build of xtask that the suites build and spawn.
//!
//! Every mode does as little per-byte work as it can (one static buffer,
//! no generation, no checksum: correctness is the tests' job), measures
//! itself and prints one line `key=value ...` on stdout:
//!
//! * `secs`: wall time of the measured part (a receiver times from its
//!   first byte to its last, so process start and connect are excluded);
//! * `user`, `sys`: this process's CPU seconds over the measured part
//!   (`getrusage(RUSAGE_SELF)` deltas, all threads).
//!
//! ```text
//! hub DIR                           Local transport hubs + xenstored until stdin closes
//! vchan-send PEER PORT RING BYTES CHUNK    server: write BYTES in CHUNK writes, close
//! vchan-recv PEER PORT BYTES CHUNK         client: read BYTES in CHUNK reads, then EOF
//! vchan-echo PEER PORT SIZE                server: echo SIZE-byte messages until EOF
//! vchan-ping PEER PORT ITERS SIZE          client: ITERS timed round trips
//! vchan-idle-server PEER PORT MS           server: block in read for MS ms, then end
//! vchan-idle-client PEER PORT              client: block in read until the server ends
//! fd-send BYTES CHUNK | fd-recv BYTES CHUNK   the same over the fd on stdin (pipe, socket)
//! fd-echo SIZE | fd-ping ITERS SIZE           ping-pong over the socket on stdin
//! sink CHUNK                               read stdin to its end (a qrexec service)
//! source BYTES CHUNK                       write BYTES to stdout (a qrexec service;
//!                                          its result line goes to stderr)
//! rtrb RING BYTES CHUNK                    two threads through an rtrb ring of RING bytes
//! memcpy RING BYTES CHUNK                  one thread copying into a RING-byte buffer
//! vchan-1core RING BYTES CHUNK             one thread: write a chunk, read it back, over
//!                                          a vchan between two domains in this process
//! rtrb-1core RING BYTES CHUNK              the same through an rtrb ring
//! ```
//!
//! The `-1core` modes price one write + one read with no second core and
//! no waiting: the per-operation cost (copies, fences, notify checks)
//! without the scheduler's noise.
//!
//! The vchan modes take their transport from the environment
//! (`VCHAN_LOCAL_DIR`, `VCHAN_DOMAIN`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use vchan::{Transport, Vchan};

use super::procs;

/// How long a vchan end waits for its peer to show up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one worker mode.
pub fn run(args: &[String]) -> Result<(), String> {
    let Some((mode, rest)) = args.split_first() else {
        return Err("bench worker: which mode?".into());
    };
    let a = Args(rest);
    procs::pin_from_env(procs::ENV_CPU)?;
    let line = match mode.as_str() {
        "hub" => return hub(a.str(0)?),
        "vchan-send" => vchan_send(a.u16(0)?, a.u32(1)?, a.usize(2)?, a.u64(3)?, a.usize(4)?),
        "vchan-recv" => vchan_recv(a.u16(0)?, a.u32(1)?, a.u64(2)?, a.usize(3)?),
        "vchan-echo" => vchan_echo(a.u16(0)?, a.u32(1)?, a.usize(2)?),
        "vchan-ping" => vchan_ping(a.u16(0)?, a.u32(1)?, a.usize(2)?, a.usize(3)?),
        "vchan-idle-server" => vchan_idle_server(a.u16(0)?, a.u32(1)?, a.u64(2)?),
        "vchan-idle-client" => vchan_idle_client(a.u16(0)?, a.u32(1)?),
        "fd-send" => fd_send(a.u64(0)?, a.usize(1)?),
        "fd-recv" => fd_recv(a.u64(0)?, a.usize(1)?),
        "fd-echo" => fd_echo(a.usize(0)?),
        "sink" => sink(a.usize(0)?),
        "source" => {
            let line =
                source(a.u64(0)?, a.usize(1)?).map_err(|e| format!("bench worker source: {e}"))?;
            eprintln!("{line}");
            return Ok(());
        }
        "fd-ping" => fd_ping(a.usize(0)?, a.usize(1)?),
        "rtrb" => rtrb_ring(a.usize(0)?, a.u64(1)?, a.usize(2)?),
        "memcpy" => memcpy(a.usize(0)?, a.u64(1)?, a.usize(2)?),
        "vchan-1core" => vchan_1core(a.usize(0)?, a.u64(1)?, a.usize(2)?),
        "rtrb-1core" => rtrb_1core(a.usize(0)?, a.u64(1)?, a.usize(2)?),
        other => return Err(format!("bench worker: unknown mode {other:?}")),
    }
    .map_err(|e| format!("bench worker {mode}: {e}"))?;
    println!("{line}");
    Ok(())
}

/// Positional arguments with typed access.
struct Args<'a>(&'a [String]);

impl Args<'_> {
    fn str(&self, i: usize) -> Result<&str, String> {
        self.0
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("missing argument {}", i + 1))
    }
    fn parse<T: std::str::FromStr>(&self, i: usize) -> Result<T, String> {
        let s = self.str(i)?;
        s.parse()
            .map_err(|_| format!("argument {}: bad number {s:?}", i + 1))
    }
    fn u16(&self, i: usize) -> Result<u16, String> {
        self.parse(i)
    }
    fn u32(&self, i: usize) -> Result<u32, String> {
        self.parse(i)
    }
    fn u64(&self, i: usize) -> Result<u64, String> {
        self.parse(i)
    }
    fn usize(&self, i: usize) -> Result<usize, String> {
        self.parse(i)
    }
}

/// CPU seconds (user, sys) of this process so far.
fn cpu_now() -> io::Result<(f64, f64)> {
    let ru = getrusage(UsageWho::RUSAGE_SELF).map_err(io::Error::from)?;
    let secs = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 * 1e-6;
    Ok((secs(ru.user_time()), secs(ru.system_time())))
}

/// A measurement in progress: wall clock and CPU at its start.
struct Meter {
    t0: Instant,
    cpu0: (f64, f64),
}

impl Meter {
    fn start() -> io::Result<Meter> {
        Ok(Meter {
            cpu0: cpu_now()?,
            t0: Instant::now(),
        })
    }
    /// Restarts the wall clock only (CPU still counts from the start).
    fn restart_clock(&mut self) {
        self.t0 = Instant::now();
    }
    /// `secs=.. user=.. sys=..` plus `extra`.
    fn finish(&self, extra: &str) -> io::Result<String> {
        let secs = self.t0.elapsed().as_secs_f64();
        let (u, s) = cpu_now()?;
        Ok(format!(
            "secs={secs:.6} user={:.6} sys={:.6}{}{extra}",
            u - self.cpu0.0,
            s - self.cpu0.1,
            if extra.is_empty() { "" } else { " " }
        ))
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn transport() -> io::Result<Transport> {
    Transport::from_env().map_err(io_err)
}

/// A buffer with some non-zero content (so no page is shared zero memory).
fn payload(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(151).wrapping_add(7))
        .collect()
}

// ---------------------------------------------------------------------------
// Local transport host

fn hub(dir: &str) -> Result<(), String> {
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let xen = vchan::LocalXen::start(&dir, &[0, 1, 2]).map_err(|e| e.to_string())?;
    println!("ready");
    io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    let _ = io::stdin().read_to_end(&mut sink);
    xen.shutdown();
    Ok(())
}

// ---------------------------------------------------------------------------
// Stream throughput

/// Writes `bytes` in `chunk`-byte writes to `w` (each write may be partial).
fn send_all(w: &mut impl Write, bytes: u64, chunk: usize) -> io::Result<()> {
    let buf = payload(chunk);
    let mut left = bytes;
    while left > 0 {
        let n = (left.min(chunk as u64)) as usize;
        let k = w.write(&buf[..n])?;
        if k == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        left -= k as u64;
    }
    Ok(())
}

/// Reads `bytes` in reads of at most `chunk` bytes; the clock restarts at
/// the first byte. Returns the meter line.
fn recv_all(r: &mut impl Read, bytes: u64, chunk: usize, meter: &mut Meter) -> io::Result<String> {
    let mut buf = vec![0u8; chunk];
    let mut got = 0u64;
    let mut reads = 0u64;
    while got < bytes {
        let want = (bytes - got).min(chunk as u64) as usize;
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("end of stream after {got} of {bytes} bytes"),
            ));
        }
        if got == 0 {
            meter.restart_clock();
        }
        got += n as u64;
        reads += 1;
    }
    std::hint::black_box(&buf);
    meter.finish(&format!("bytes={got} reads={reads}"))
}

fn vchan_send(peer: u16, port: u32, ring: usize, bytes: u64, chunk: usize) -> io::Result<String> {
    let t = transport()?;
    let mut v = Vchan::server(&t, peer, port, ring, ring).map_err(io_err)?;
    v.wait_connected(Some(CONNECT_TIMEOUT)).map_err(io_err)?;
    let m = Meter::start()?;
    send_all(&mut v, bytes, chunk)?;
    let line = m.finish(&format!("ring={}", v.write_ring_size()))?;
    v.close();
    Ok(line)
}

fn vchan_recv(peer: u16, port: u32, bytes: u64, chunk: usize) -> io::Result<String> {
    let t = transport()?;
    let mut v = Vchan::client(&t, peer, port, CONNECT_TIMEOUT).map_err(io_err)?;
    let mut m = Meter::start()?;
    let line = recv_all(&mut v, bytes, chunk, &mut m)?;
    // The sender closes after its last byte: expect EOF, nothing more.
    let mut extra = [0u8; 1];
    if v.read(&mut extra)? != 0 {
        return Err(io_err("more bytes than announced"));
    }
    Ok(line)
}

fn fd_stream() -> io::Result<File> {
    Ok(File::from(io::stdin().as_fd().try_clone_to_owned()?))
}

fn fd_send(bytes: u64, chunk: usize) -> io::Result<String> {
    let mut f = fd_stream()?;
    let m = Meter::start()?;
    send_all(&mut f, bytes, chunk)?;
    m.finish("")
}

fn fd_recv(bytes: u64, chunk: usize) -> io::Result<String> {
    let mut f = fd_stream()?;
    let mut m = Meter::start()?;
    recv_all(&mut f, bytes, chunk, &mut m)
}

/// Reads stdin until its end; the clock runs from the first byte.
fn sink(chunk: usize) -> io::Result<String> {
    let mut f = fd_stream()?;
    let mut buf = vec![0u8; chunk.max(1)];
    let mut m = Meter::start()?;
    let mut got = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        if got == 0 {
            m.restart_clock();
        }
        got += n as u64;
    }
    std::hint::black_box(&buf);
    m.finish(&format!("bytes={got}"))
}

/// Writes `bytes` to stdout, unbuffered, `chunk` bytes at a time.
fn source(bytes: u64, chunk: usize) -> io::Result<String> {
    let mut out = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let m = Meter::start()?;
    let buf = payload(chunk.max(1));
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    m.finish(&format!("bytes={bytes}"))
}

/// Two threads through an rtrb ring of `ring` bytes; both spin (with a
/// yield now and then) when the ring is full or empty, as an in-process
/// SPSC ring is used.
fn rtrb_ring(ring: usize, bytes: u64, chunk: usize) -> io::Result<String> {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u8>::new(ring);
    let mut m = Meter::start()?;
    let producer = std::thread::spawn(move || {
        // A failure to pin shows as the unpinned number; nothing to report.
        let _ = procs::pin_from_env(procs::ENV_CPU2);
        let buf = payload(chunk);
        let mut left = bytes;
        let mut misses = 0u32;
        while left > 0 {
            let n = left.min(chunk as u64) as usize;
            match tx.write(&buf[..n]) {
                Ok(k) => {
                    left -= k as u64;
                    misses = 0;
                }
                Err(_) => backoff(&mut misses),
            }
        }
    });
    let mut buf = vec![0u8; chunk];
    let mut got = 0u64;
    let mut misses = 0u32;
    while got < bytes {
        let want = (bytes - got).min(chunk as u64) as usize;
        match rx.read(&mut buf[..want]) {
            Ok(n) => {
                if got == 0 {
                    m.restart_clock();
                }
                got += n as u64;
                misses = 0;
            }
            Err(_) => backoff(&mut misses),
        }
    }
    std::hint::black_box(&buf);
    producer
        .join()
        .map_err(|_| io_err("producer thread panicked"))?;
    m.finish(&format!("bytes={got}"))
}

/// Busy-wait step of the in-process ring: spin, and yield the core every
/// 64 misses so that a peer thread sharing it can run.
fn backoff(misses: &mut u32) {
    *misses += 1;
    if (*misses).is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// One core copying every byte once, `chunk` bytes at a time, into a
/// `ring`-byte buffer at a running offset (two copies across the wrap, as a
/// ring producer does): the least work any byte ring must do per byte.
fn memcpy(ring: usize, bytes: u64, chunk: usize) -> io::Result<String> {
    let src = payload(chunk);
    let mut dst = vec![0u8; ring];
    let m = Meter::start()?;
    let mut off = 0usize;
    let mut left = bytes;
    while left > 0 {
        let mut n = left.min(chunk as u64) as usize;
        left -= n as u64;
        let mut s = &src[..n];
        while n > 0 {
            let k = n.min(ring - off);
            dst[off..off + k].copy_from_slice(&s[..k]);
            s = &s[k..];
            n -= k;
            off = (off + k) % ring;
        }
        std::hint::black_box(&mut dst);
    }
    m.finish(&format!("bytes={bytes}"))
}

/// One thread alternating a non-blocking write of `chunk` bytes and a read
/// of everything there, through `tx` and `rx`, until `bytes` went through.
fn one_core(
    tx: &mut impl Write,
    rx: &mut impl Read,
    bytes: u64,
    chunk: usize,
) -> io::Result<String> {
    let src = payload(chunk);
    let mut dst = vec![0u8; chunk];
    let m = Meter::start()?;
    let mut got = 0u64;
    let mut ops = 0u64;
    while got < bytes {
        let n = (bytes - got).min(chunk as u64) as usize;
        let w = tx.write(&src[..n])?;
        let mut r = 0;
        while r < w {
            r += rx.read(&mut dst[..w - r])?;
        }
        got += w as u64;
        ops += 1;
    }
    std::hint::black_box(&dst);
    m.finish(&format!("bytes={got} ops={ops}"))
}

fn vchan_1core(ring: usize, bytes: u64, chunk: usize) -> io::Result<String> {
    let dir = std::env::temp_dir().join(format!("vchan-1core-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let xen = vchan::LocalXen::start(&dir, &[0, 1, 2]).map_err(io_err)?;
        let mut srv = Vchan::server(&xen.transport(1), 2, 1, ring, ring).map_err(io_err)?;
        let mut cli = Vchan::client(&xen.transport(2), 1, 1, CONNECT_TIMEOUT).map_err(io_err)?;
        srv.wait_connected(Some(CONNECT_TIMEOUT)).map_err(io_err)?;
        srv.set_blocking(false);
        cli.set_blocking(false);
        let line = one_core(&mut srv, &mut cli, bytes, chunk)?;
        drop(cli);
        drop(srv);
        xen.shutdown();
        Ok(line)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn rtrb_1core(ring: usize, bytes: u64, chunk: usize) -> io::Result<String> {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u8>::new(ring);
    one_core(&mut tx, &mut rx, bytes, chunk)
}

// ---------------------------------------------------------------------------
// Round-trip latency

/// Times `iters` round trips of `size` bytes (after `iters / 10` untimed
/// warm-up ones): mean, median and 99th percentile in microseconds.
fn ping(s: &mut (impl Read + Write), iters: usize, size: usize) -> io::Result<String> {
    let out = payload(size);
    let mut back = vec![0u8; size];
    for _ in 0..iters / 10 {
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
    }
    let mut rtts = Vec::with_capacity(iters);
    let m = Meter::start()?;
    for _ in 0..iters {
        let t = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    if back != out {
        return Err(io_err("echo returned different bytes"));
    }
    let mean = rtts.iter().sum::<f64>() / iters.max(1) as f64;
    rtts.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    let (p50, p99) = (pick(0.5).unwrap_or(0.0), pick(0.99).unwrap_or(0.0));
    m.finish(&format!(
        "iters={iters} mean_us={mean:.3} p50_us={p50:.3} p99_us={p99:.3}"
    ))
}

/// Echoes `size`-byte messages until the peer closes.
fn echo(s: &mut (impl Read + Write), size: usize) -> io::Result<String> {
    let mut buf = vec![0u8; size];
    let m = Meter::start()?;
    let mut msgs = 0u64;
    loop {
        match s.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        s.write_all(&buf)?;
        msgs += 1;
    }
    m.finish(&format!("msgs={msgs}"))
}

fn vchan_echo(peer: u16, port: u32, size: usize) -> io::Result<String> {
    let t = transport()?;
    let mut v = Vchan::server(&t, peer, port, 4096, 4096).map_err(io_err)?;
    v.wait_connected(Some(CONNECT_TIMEOUT)).map_err(io_err)?;
    echo(&mut v, size)
}

fn vchan_ping(peer: u16, port: u32, iters: usize, size: usize) -> io::Result<String> {
    let t = transport()?;
    let mut v = Vchan::client(&t, peer, port, CONNECT_TIMEOUT).map_err(io_err)?;
    ping(&mut v, iters, size)
}

fn fd_echo(size: usize) -> io::Result<String> {
    echo(&mut fd_stream()?, size)
}

fn fd_ping(iters: usize, size: usize) -> io::Result<String> {
    let mut f = fd_stream()?;
    let line = ping(&mut f, iters, size)?;
    // Closing our end ends the echo.
    drop(f);
    Ok(line)
}

// ---------------------------------------------------------------------------
// Idle

/// Connected and idle: blocks in `read` for `ms` milliseconds (the client
/// sends nothing), measures its CPU, then writes one byte to end the client.
fn vchan_idle_server(peer: u16, port: u32, ms: u64) -> io::Result<String> {
    let t = transport()?;
    let mut v = Vchan::server(&t, peer, port, 65536, 65536).map_err(io_err)?;
    v.wait_connected(Some(CONNECT_TIMEOUT)).map_err(io_err)?;
    // Give the client time to enter its blocking read.
    std::thread::sleep(Duration::from_millis(50));
    v.set_io_timeout(Some(Duration::from_millis(ms)));
    let m = Meter::start()?;
    let mut b = [0u8; 1];
    match v.read(&mut b) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        Ok(n) => return Err(io_err(format!("idle read returned {n} bytes"))),
        Err(e) => return Err(e),
    }
    let line = m.finish("")?;
    v.set_io_timeout(None);
    v.write_all(b"x")?;
    Ok(line)
}

/// Blocks in `read` until the idle server ends the test.
fn vchan_idle_client(peer: u16, port: u32) -> io::Result<String> {
    let t = transport()?;
    let mut v = Vchan::client(&t, peer, port, CONNECT_TIMEOUT).map_err(io_err)?;
    let m = Meter::start()?;
    let mut b = [0u8; 1];
    v.read_exact(&mut b)?;
    m.finish("")
}
