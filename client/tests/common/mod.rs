//! Test harness: a scripted fake agent on a Unix socket, a scripted fake
//! service on the vchan-socket data channel, and helpers to run the built
//! `qrexec-client-vm` with safety timeouts.
#![allow(dead_code)]

use qrexec::proto::{
    ConnectionParams, MSG_HEADER_SIZE, MsgHeader, MsgType, RequestFormat, encode_data,
    encode_exit_code, encode_hello,
};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Safety net for anything a test waits for.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// The data peer the fake agent announces.
pub const DOMAIN: u32 = 5;
/// The data port the fake agent announces.
pub const PORT: u32 = 513;

pub const BIN: &str = env!("CARGO_BIN_EXE_qrexec-client-vm");

/// What the fake agent does after reading the request.
#[derive(Debug, Clone)]
pub enum AgentReply {
    /// Send these connection parameters.
    Accept(ConnectionParams),
    /// Close the socket (refusal).
    Refuse,
    /// Send these raw bytes, then close.
    Raw(Vec<u8>),
}

/// What the fake agent saw.
#[derive(Debug)]
pub struct AgentLog {
    /// The request bytes, exactly as read.
    pub request: Vec<u8>,
    /// Bytes the client wrote after the request (must be none).
    pub extra: Vec<u8>,
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub agent_path: PathBuf,
    pub marker_path: PathBuf,
}

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let agent_path = dir.path().join("qrexec-agent");
        let marker_path = dir.path().join("marker-vm");
        Harness {
            dir,
            agent_path,
            marker_path,
        }
    }

    pub fn sock_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_socket(&self) -> PathBuf {
        vchan::socket_path(self.dir.path(), 0, DOMAIN as u16, PORT)
    }

    /// Start the fake agent. It reads one request in `format`, answers with
    /// `reply`, then reads until the client closes. `hold` (if given) is
    /// signalled when the client has closed the agent socket.
    pub fn agent(&self, format: RequestFormat, reply: AgentReply) -> Agent {
        let listener = UnixListener::bind(&self.agent_path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (closed_tx, closed_rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + TIMEOUT;
            let mut s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            panic!("fake agent: no client");
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            let request = read_request(&mut s, format);
            match reply {
                AgentReply::Accept(p) => s.write_all(&p.encode()).unwrap(),
                AgentReply::Refuse => {
                    drop(s);
                    let _ = closed_tx.send(());
                    return AgentLog {
                        request,
                        extra: vec![],
                    };
                }
                AgentReply::Raw(b) => {
                    s.write_all(&b).unwrap();
                    drop(s);
                    let _ = closed_tx.send(());
                    return AgentLog {
                        request,
                        extra: vec![],
                    };
                }
            }
            let mut extra = Vec::new();
            let _ = s.read_to_end(&mut extra);
            let _ = closed_tx.send(());
            AgentLog { request, extra }
        });
        Agent {
            handle: Some(handle),
            closed: closed_rx,
        }
    }

    /// Start a fake service that connects to the client's data socket and
    /// runs `script`.
    pub fn service<F, T>(&self, script: F) -> JoinHandle<T>
    where
        F: FnOnce(&mut Service) -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = self.data_socket();
        std::thread::spawn(move || {
            let mut svc = Service::connect(&path);
            script(&mut svc)
        })
    }

    /// A command for the client with a clean environment: socket transport
    /// in the temp dir, our agent socket, no marker file (→ v4).
    pub fn client(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("-a")
            .arg(&self.agent_path)
            .args(args)
            .env("VCHAN_SOCKET_DIR", self.dir.path())
            .env("QREXEC_MARKER_VM_PATH", &self.marker_path)
            .env_remove("VCHAN_DOMAIN")
            .env_remove("QREXEC_REQUEST_FORMAT")
            .env_remove("QREXEC_CLIENT_VERBOSE")
            .env_remove("PASS_LOCAL_STDERR")
            .env_remove("VCHAN_LOCAL_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

fn read_request(s: &mut UnixStream, format: RequestFormat) -> Vec<u8> {
    match format {
        RequestFormat::V2 => {
            let mut b = vec![0u8; 128];
            s.read_exact(&mut b).unwrap();
            b
        }
        _ => {
            let mut hdr = [0u8; 8];
            s.read_exact(&mut hdr).unwrap();
            let h = MsgHeader::decode(&hdr).unwrap();
            assert!(h.len < 70000, "absurd trigger length {}", h.len);
            let mut body = vec![0u8; h.len as usize];
            s.read_exact(&mut body).unwrap();
            let mut all = hdr.to_vec();
            all.extend(body);
            all
        }
    }
}

pub struct Agent {
    handle: Option<JoinHandle<AgentLog>>,
    closed: mpsc::Receiver<()>,
}

impl Agent {
    /// True if the client has already closed the agent socket.
    pub fn client_closed(&self) -> bool {
        self.closed.try_recv().is_ok()
    }

    pub fn join(mut self) -> AgentLog {
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("fake agent panicked")
    }
}

/// One data-channel message as the service sees it.
pub type Msg = (u32, Vec<u8>);

pub struct Service {
    pub stream: UnixStream,
}

impl Service {
    fn connect(path: &Path) -> Service {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(TIMEOUT)).unwrap();
                    s.set_write_timeout(Some(TIMEOUT)).unwrap();
                    return Service { stream: s };
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    assert!(
                        Instant::now() < deadline,
                        "fake service: no server at {path:?}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("connect {path:?}: {e}"),
            }
        }
    }

    /// Send bytes; the client going away (EPIPE/ECONNRESET) is not an
    /// error here: tests check the client's side of the story.
    pub fn send_raw(&mut self, b: &[u8]) {
        match self.stream.write_all(b) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => panic!("service write: {e}"),
        }
    }

    pub fn hello(&mut self, v: u32) {
        self.send_raw(&encode_hello(v));
    }

    pub fn stdout(&mut self, data: &[u8]) {
        self.send_raw(&encode_data(MsgType::DataStdout, data));
    }

    pub fn stderr(&mut self, data: &[u8]) {
        self.send_raw(&encode_data(MsgType::DataStderr, data));
    }

    pub fn exit(&mut self, code: i32) {
        self.send_raw(&encode_exit_code(code));
    }

    /// Read one message; `None` on EOF at a boundary.
    pub fn read_msg(&mut self) -> Option<Msg> {
        let mut hdr = [0u8; MSG_HEADER_SIZE];
        let mut got = 0;
        while got < hdr.len() {
            match self.stream.read(&mut hdr[got..]) {
                Ok(0) if got == 0 => return None,
                Ok(0) => panic!("EOF inside a header"),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("service read: {e}"),
            }
        }
        let h = MsgHeader::decode(&hdr).unwrap();
        assert!(h.len <= 65536, "client sent len {}", h.len);
        let mut body = vec![0u8; h.len as usize];
        self.stream.read_exact(&mut body).unwrap();
        Some((h.ty, body))
    }

    /// Read the client's HELLO and return its version.
    pub fn read_hello(&mut self) -> u32 {
        let (ty, body) = self.read_msg().expect("no HELLO");
        assert_eq!(ty, 0x300, "first message is not HELLO");
        assert_eq!(body.len(), 4);
        u32::from_le_bytes(body.try_into().unwrap())
    }

    /// Read STDIN messages until the EOF message; returns (data, chunk sizes).
    pub fn read_stdin_to_eof(&mut self) -> (Vec<u8>, Vec<usize>) {
        let mut data = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let (ty, body) = self.read_msg().expect("vchan closed before STDIN EOF");
            assert_eq!(ty, 0x190, "unexpected message type {ty:#x}");
            if body.is_empty() {
                return (data, sizes);
            }
            sizes.push(body.len());
            data.extend(body);
        }
    }

    /// Read everything until the client closes.
    pub fn read_all(&mut self) -> Vec<Msg> {
        let mut v = Vec::new();
        while let Some(m) = self.read_msg() {
            v.push(m);
        }
        v
    }
}

/// Wait for `child` with the safety timeout; kill it and panic on timeout.
pub fn wait_timeout(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qrexec-client-vm did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run to completion collecting stdout/stderr, with the safety timeout.
pub fn run(mut cmd: Command) -> Output {
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    let status = wait_timeout(&mut child);
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

pub fn accept() -> AgentReply {
    AgentReply::Accept(ConnectionParams {
        connect_domain: DOMAIN,
        connect_port: PORT,
    })
}

pub fn code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("killed: {:?}", o.status))
}

pub fn stderr_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A simple service: HELLO, read our HELLO, optional stdout, then exit code.
pub fn simple_service(h: &Harness, out: &'static [u8], exit: i32) -> JoinHandle<Vec<Msg>> {
    h.service(move |s| {
        s.hello(3);
        assert_eq!(s.read_hello(), 4);
        if !out.is_empty() {
            s.stdout(out);
        }
        s.stdout(b"");
        s.stderr(b"");
        s.exit(exit);
        s.read_all()
    })
}
