//! The table of cases: what each call sends, expects and checks.

use super::*;

/// What the client reads.
#[derive(Clone)]
pub(super) enum Input {
    Bytes(Vec<u8>),
    /// The first `len` bytes of the world's data file, through a pipe.
    Data(usize),
    /// A pipe that stays open until the client has exited.
    KeptOpen,
}

/// Where the client's stdout goes.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Output {
    Capture,
    /// A reader that starts this late, then reads everything.
    Late(Duration),
}

#[derive(Clone)]
pub(super) enum Check {
    Any,
    Eq(Vec<u8>),
    Contains(&'static str),
    /// The SHA-256 and length of the first `len` bytes of the data file.
    Data(usize),
    /// The service's answer is the SHA-256 of the first `len` data bytes.
    ShaLine(usize),
}

#[derive(Clone)]
pub(super) struct Case {
    pub(super) name: &'static str,
    pub(super) args: Vec<String>,
    pub(super) input: Input,
    pub(super) output: Output,
    pub(super) code: i32,
    pub(super) stdout: Check,
    pub(super) stderr: Check,
    /// Bytes moved, for MB/s.
    pub(super) bytes: usize,
}

pub(super) fn case(name: &'static str, args: &[&str], input: Input, code: i32) -> Case {
    Case {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        input,
        output: Output::Capture,
        code,
        stdout: Check::Any,
        stderr: Check::Any,
        bytes: 0,
    }
}

impl Case {
    pub(super) fn out(mut self, c: Check) -> Case {
        self.stdout = c;
        self
    }
    pub(super) fn err(mut self, c: Check) -> Case {
        self.stderr = c;
        self
    }
    pub(super) fn bytes(mut self, n: usize) -> Case {
        self.bytes = n;
        self
    }
    pub(super) fn late(mut self, d: Duration) -> Case {
        self.output = Output::Late(d);
        self
    }
}

pub(super) fn cases(world: &Path) -> Vec<Case> {
    let w = world.display();
    let local_ping = "echo ping; read x; [ \"$x\" = ping ] && exit 0; exit 3".to_string();
    let local_exit5 = "echo ping; read x; exit 5".to_string();
    let local_upload = format!("head -c {} {w}/data", 16 * MIB);
    vec![
        case(
            "echo",
            &["personal", "test.Echo"],
            Input::Bytes(b"hello\n".to_vec()),
            0,
        )
        .out(Check::Eq(b"hello\n".to_vec())),
        case(
            "argument + QREXEC_REMOTE_DOMAIN",
            &["personal", "test.Args+foo"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"vm=personal arg=foo remote=work\n".to_vec())),
        case(
            "exit code 42",
            &["personal", "test.Exit+42"],
            Input::Bytes(vec![]),
            42,
        ),
        case(
            "refused",
            &["personal", "test.Refused"],
            Input::Bytes(vec![]),
            126,
        )
        .err(Check::Contains("Request refused")),
        case(
            "missing service",
            &["personal", "test.Missing"],
            Input::Bytes(vec![]),
            127,
        ),
        case(
            "stderr",
            &["personal", "test.Stderr"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"to stdout\n".to_vec()))
        .err(Check::Contains("to stderr")),
        case(
            "filter -t (stdout)",
            &["-t", "personal", "test.Escape"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"a_[31mb\n".to_vec())),
        case(
            "filter -T (stderr)",
            &["-T", "personal", "test.Escape"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"a\x1b[31mb\n".to_vec()))
        .err(Check::Contains("c_[0md")),
        case(
            "$default",
            &["$default", "test.Args"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"vm=personal arg= remote=work\n".to_vec())),
        case(
            "dom0 target",
            &["dom0", "test.Args+x"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"vm=dom0 arg=x remote=work\n".to_vec())),
        case(
            "--prefix-data",
            &["--prefix-data=PRE:", "personal", "test.Echo"],
            Input::Bytes(b"data".to_vec()),
            0,
        )
        .out(Check::Eq(b"PRE:data".to_vec())),
        case(
            "local program",
            &["personal", "test.Echo", "/bin/sh", "-c", &local_ping],
            Input::Bytes(vec![]),
            0,
        ),
        case(
            "local program exit 5",
            &["personal", "test.Echo", "/bin/sh", "-c", &local_exit5],
            Input::Bytes(vec![]),
            5,
        ),
        case(
            "service exits, our stdin open",
            &["personal", "test.Exit+0"],
            Input::KeptOpen,
            0,
        ),
        case(
            "8 MiB on stderr",
            &["personal", "test.BigErr"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Eq(b"done\n".to_vec()))
        .err(Check::Data(8 * MIB)),
        case(
            "upload 1 MiB",
            &["personal", "test.Sha"],
            Input::Data(MIB),
            0,
        )
        .out(Check::ShaLine(MIB))
        .bytes(MIB),
        case(
            "upload 64 MiB",
            &["personal", "test.Sha"],
            Input::Data(64 * MIB),
            0,
        )
        .out(Check::ShaLine(64 * MIB))
        .bytes(64 * MIB),
        case(
            "download 64 MiB",
            &["personal", "test.Gen+67108864"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Data(64 * MIB))
        .bytes(64 * MIB),
        case(
            "cat 64 MiB each way",
            &["personal", "test.Echo"],
            Input::Data(64 * MIB),
            0,
        )
        .out(Check::Data(64 * MIB))
        .bytes(64 * MIB),
        case(
            "--buffer-size=1048576 cat 16 MiB",
            &["--buffer-size=1048576", "personal", "test.Echo"],
            Input::Data(16 * MIB),
            0,
        )
        .out(Check::Data(16 * MIB))
        .bytes(16 * MIB),
        case(
            "local program uploads 16 MiB",
            &["personal", "test.Sha", "/bin/sh", "-c", &local_upload],
            Input::Bytes(vec![]),
            0,
        )
        .bytes(16 * MIB),
        case(
            "service reads 1000 B of 64 MiB",
            &["personal", "test.Head1000"],
            Input::Data(64 * MIB),
            0,
        )
        .out(Check::Eq(b"ok\n".to_vec())),
        case(
            "download to a reader 2 s late",
            &["personal", "test.Gen+16777216"],
            Input::Bytes(vec![]),
            0,
        )
        .out(Check::Data(16 * MIB))
        .bytes(16 * MIB)
        .late(Duration::from_secs(2)),
    ]
}
