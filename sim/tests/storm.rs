//! Many calls at once through the simulation, and the set-up resources
//! they compete for (issue 14): no call may fail for a resource that
//! another call gives back, and none may hang for one.
//!
//! * [`storm_from_one_vm`]: `QREXEC_STORM_CALLS` (default 200) calls
//!   started at once from one VM, each with its own payload, half of them
//!   into each of two targets.
//! * [`storm_from_four_vms_into_one_target`]: 4 VMs × `QREXEC_STORM_PER_VM`
//!   (default 50) calls at once into one target.
//!
//!   Why two targets, and why the target sits between the callers' domain
//!   ids: a target's qrexec-daemon has 256 data ports (513..768, as
//!   upstream's `MAX_CLIENTS`), and hands a peer with a higher domain id
//!   the odd ones and a lower one the even ones, so at most 128 calls
//!   between two domains (or from all domains on one side of the target)
//!   can be open at once; the 129th is refused by the daemon ("Request
//!   refused"). That is a dom0 limit, outside the calling VM's set-up, and
//!   the storms stay within it.
//!
//!   A call with the default 64 KiB buffers grants 33 pages and a domain
//!   may grant 1024 (Linux gntalloc's default, which the grant hub
//!   enforces), so at most 31 calls of one VM fit at a time. The service
//!   waits behind a lock that the test holds until the grant hub has
//!   refused at least one share: so every run really meets the limit
//!   (before the retry, the refused calls failed: 42 of 100 in the demo).
//!   Each storm prints its wall time and the peak number of pages one
//!   domain had granted (`--nocapture` shows them).
//!
//! * [`transaction_quota_makes_the_call_wait`] (qubes-issues #11059) and
//!   [`watch_quota_makes_the_target_wait`] (#5343): a test double holds
//!   the xenstore quota of C xenstored (Xen 4.17 defaults) in the calling
//!   or the target domain; the call waits (and says so under `-v`) and
//!   completes once the double lets go.

mod common;
use common::Sim;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long any one storm may take before the test gives up (a hang
/// bound, not a timing assertion).
const STORM_BOUND: Duration = Duration::from_secs(600);

const POLICY: &str = "\
test.Echo     *       @anyvm  @anyvm    allow\n\
test.Gate     *       @anyvm  @anyvm    allow\n\
*             *       @anyvm  @anyvm    deny\n";

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// A lock file the test holds exclusively; `test.Gate` takes it shared
/// (`flock -s`) before it echoes, so every call stays open, holding its
/// grants, until the test opens the gate.
struct Gate {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    held: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Gate {
    fn closed() -> Gate {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate");
        let f = std::fs::File::create(&path).unwrap();
        let f = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        Gate {
            _dir: dir,
            path,
            held: Some(f),
        }
    }

    fn service(&self) -> String {
        format!(
            "#!/bin/sh\nflock -s {} true\nexec cat\n",
            self.path.display()
        )
    }

    fn open(&mut self) {
        self.held = None;
    }
}

/// The payload of call `i`: a few KiB that name the call.
fn payload(vm: &str, i: usize) -> Vec<u8> {
    format!("{vm} call {i:04} ").repeat(300).into_bytes()
}

struct Running {
    vm: String,
    i: usize,
    child: Child,
    writer: std::thread::JoinHandle<()>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Start `per_vm` gated calls from each of `vms` (call `i` into
/// `targets[i % targets.len()]`), open the gate once the grant hub refused
/// a share, and check every result.
fn storm(sim: &Sim, gate: &mut Gate, vms: &[&str], per_vm: usize, targets: &[&str]) {
    let start = Instant::now();
    let mut running = Vec::new();
    for i in 0..per_vm {
        for vm in vms {
            let target = targets[i % targets.len()];
            let c = sim.client(vm, &[target, "test.Gate"]);
            let (child, writer) = common::spawn_feeding(c, payload(vm, i));
            running.push(Running {
                vm: vm.to_string(),
                i,
                child,
                writer,
            });
        }
    }
    // Every VM's calls beyond the 31st can only have been set up after a
    // refusal: wait for the first one, then let the services finish.
    let qubesd = sim.layout.qubesd_socket();
    let deadline = Instant::now() + STORM_BOUND;
    let refused_while_gated = loop {
        let st = qubes_sim::qubesd::stats(&qubesd).unwrap();
        if st.grant_refused > 0 {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "no grant refusal although {per_vm} calls per VM wait at the gate: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    gate.open();
    let mut failures = Vec::new();
    for r in running {
        let out = common::wait_output(r.child, STORM_BOUND);
        r.writer.join().unwrap();
        let want = payload(&r.vm, r.i);
        if out.status.code() != Some(0) || out.stdout != want {
            failures.push(format!(
                "{} call {}: {} ({} of {} bytes back): {}",
                r.vm,
                r.i,
                out.status,
                out.stdout.len(),
                want.len(),
                text(&out.stderr).trim()
            ));
        }
    }
    let wall = start.elapsed();
    let st = qubes_sim::qubesd::stats(&qubesd).unwrap();
    eprintln!(
        "storm: {} calls ({} VM(s) x {per_vm}) into {}: {} failed, wall time {:.1} s, \
         peak granted pages of one domain {} (limit {}), shares refused {} ({} before the gate opened)",
        vms.len() * per_vm,
        vms.len(),
        targets.join(" and "),
        failures.len(),
        wall.as_secs_f64(),
        st.grant_peak_pages,
        gnttab::local::DOMAIN_PAGE_LIMIT,
        st.grant_refused,
        refused_while_gated.grant_refused,
    );
    assert!(
        failures.is_empty(),
        "{} of {} calls failed:\n{}",
        failures.len(),
        vms.len() * per_vm,
        failures.join("\n")
    );
    assert!(st.grant_peak_pages <= gnttab::local::DOMAIN_PAGE_LIMIT);
}

fn gated_sim(conf: &str, gate: &Gate) -> Sim {
    let gate_service = gate.service();
    Sim::start(
        conf,
        POLICY,
        &[
            ("test.Echo", "#!/bin/sh\nexec cat\n"),
            ("test.Gate", &gate_service),
        ],
    )
}

#[test]
fn storm_from_one_vm() {
    let mut gate = Gate::closed();
    let sim = gated_sim("vm work\nvm personal\nvm vault\n", &gate);
    let n = env_count("QREXEC_STORM_CALLS", 200);
    storm(&sim, &mut gate, &["work"], n, &["personal", "vault"]);
}

#[test]
fn storm_from_four_vms_into_one_target() {
    let mut gate = Gate::closed();
    // Domains a=1, b=2, target=3, c=4, d=5: two callers on each side.
    let sim = gated_sim("vm a\nvm b\nvm target\nvm c\nvm d\n", &gate);
    let n = env_count("QREXEC_STORM_PER_VM", 50);
    storm(&sim, &mut gate, &["a", "b", "c", "d"], n, &["target"]);
}

/// Runs `qrexec-client-vm -v` from `vm`; returns the child and a channel
/// of its stderr lines.
fn verbose_call(sim: &Sim, vm: &str, target: &str) -> (Child, mpsc::Receiver<String>) {
    let mut child = sim
        .client(vm, &["-v", target, "test.Echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits (bounded) for a line containing `needle`; all lines seen so far
/// in the panic message otherwise.
fn wait_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(l) => seen.push(l),
            Err(_) => panic!("no line with {needle:?}; stderr was:\n{}", seen.join("\n")),
        }
    }
}

/// Finishes a call started by [`verbose_call`]: sends `input`, closes
/// stdin, checks the echo and the status.
fn finish_echo(mut child: Child, input: &[u8]) {
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert_eq!(out, input);
}

/// qubes-issues #11059: the data-vchan set-up's xenstore transaction meets
/// the domain's transaction quota (C xenstored, Xen 4.17:
/// `quota_max_transaction = 10`, checked with `>`, so 11 may be open; a
/// domU's processes share its one connection). Another process of the
/// calling domain (the double) holds all of them; the call waits, logs
/// the wait, and succeeds once they end.
#[test]
fn transaction_quota_makes_the_call_wait() {
    let sim = Sim::start(
        "vm work\nvm personal\n",
        POLICY,
        &[("test.Echo", "#!/bin/sh\nexec cat\n")],
    );
    let hog = xenstore::Xs::connect_unix(&sim.xenstore_socket("work")).unwrap();
    let mut held = Vec::new();
    let refusal = loop {
        match hog.begin() {
            Ok(tx) => held.push(tx),
            Err(e) => break e,
        }
        assert!(
            held.len() <= 11,
            "more transactions than C xenstored allows"
        );
    };
    assert_eq!(held.len(), 11, "C xenstored lets 10 + 1 be open");
    assert_eq!(refusal.errno(), Some(&xenstore::Errno::ENOSPC), "{refusal}");

    let (child, lines) = verbose_call(&sim, "work", "personal");
    let wait = wait_line(&lines, "out of xenstore transactions");
    assert!(wait.contains("ENOSPC"), "{wait}");
    drop(held);
    finish_echo(child, b"after the quota\n");
}

/// qubes-issues #5343: the target's vchan client watches xenstore while it
/// waits for the caller's server, and the target domain's watches are
/// limited (C xenstored, Xen 4.17: `quota_nb_watch_per_domain = 128`,
/// checked with `>`). The double holds all of the target's watches; the
/// target's agent waits (it logs so under `-v`) instead of failing, which
/// left the caller hanging until its connect timeout.
#[test]
fn watch_quota_makes_the_target_wait() {
    let sim = Sim::start_opts(
        "vm work\nvm personal\n",
        POLICY,
        &[("test.Echo", "#!/bin/sh\nexec cat\n")],
        true,
    );
    let hog = xenstore::Watcher::connect_unix(&sim.xenstore_socket("personal")).unwrap();
    let mut n = 0;
    let refusal = loop {
        match hog.watch(&format!("hog/w{n}"), &format!("t{n}")) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n <= 129, "more watches than C xenstored allows");
    };
    assert_eq!(refusal.errno(), Some(&xenstore::Errno::E2BIG), "{refusal}");
    assert!(n >= 120, "the target itself holds only a few watches ({n})");

    let (child, _lines) = verbose_call(&sim, "work", "personal");
    let wait = sim
        .wait_log("out of xenstore watches", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the target never waited; log:\n{}", sim.log()));
    assert!(wait.contains("E2BIG"), "{wait}");
    drop(hog);
    finish_echo(child, b"after the watch quota\n");
}
