//! Small helpers shared by the xtask commands.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// The cargo target directory in use.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Runs `cargo <args>` in the workspace root; an error if it fails.
pub fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(args)
        .current_dir(root())
        .status()
        .map_err(|e| format!("cargo {}: {e}", args.join(" ")))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cargo {} failed ({st})", args.join(" ")))
    }
}

/// How many lines of a failed command's output its error keeps (the end:
/// where compilers and tar say what went wrong).
const FAILED_OUTPUT_LINES: usize = 40;

/// Runs `cmd` with stdin closed and returns its stdout; if it cannot start
/// or exits non-zero, an error naming the command, its status and the last
/// lines of its stdout and stderr. The one "run a tool" of xtask: callers
/// set the directory (`current_dir`) themselves.
///
/// ```ignore
/// let dynamic = run_output(Command::new("readelf").args(["-d", "-W"]).arg(path))?;
/// ```
pub fn run_output(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(FAILED_OUTPUT_LINES)..];
    Err(format!(
        "{shown} failed ({}):\n{}",
        out.status,
        tail.join("\n")
    ))
}

/// The `NEEDED` entries of the ELF file at `path` (host `readelf -d`).
pub fn needed_libs(path: &Path) -> Result<Vec<String>, String> {
    let text = run_output(Command::new("readelf").args(["-d", "-W"]).arg(path))?;
    Ok(parse_dynamic(&text, "(NEEDED)", "Shared library: ["))
}

/// The soname of the ELF file at `path` (host `readelf -d`), or `""`.
pub fn soname(path: &Path) -> Result<String, String> {
    let text = run_output(Command::new("readelf").args(["-d", "-W"]).arg(path))?;
    Ok(parse_dynamic(&text, "(SONAME)", "Library soname: [")
        .into_iter()
        .next()
        .unwrap_or_default())
}

/// The bracketed values of the `readelf -d` lines tagged `tag`.
fn parse_dynamic(text: &str, tag: &str, label: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains(tag))
        .filter_map(|l| l.split(label).nth(1))
        .filter_map(|v| v.split(']').next())
        .map(str::to_string)
        .collect()
}

/// A progress line for long loops of measurements: `[k/N, elapsed, ~left]`
/// in front of each step's own line, on stderr. Plain lines, so it reads
/// the same in a terminal and in a CI log.
#[derive(Debug)]
pub struct Progress {
    total: usize,
    done: usize,
    started: std::time::Instant,
}

impl Progress {
    /// A loop of `total` steps starting now.
    pub fn new(total: usize) -> Progress {
        Progress {
            total: total.max(1),
            done: 0,
            started: std::time::Instant::now(),
        }
    }

    /// The prefix for the step just finished, e.g. `[3/24 12s ~84s left]`.
    pub fn step(&mut self) -> String {
        self.done = (self.done + 1).min(self.total);
        let el = self.started.elapsed().as_secs_f64();
        let left = el / self.done as f64 * (self.total - self.done) as f64;
        format!(
            "[{}/{} {:.0}s ~{:.0}s left]",
            self.done, self.total, el, left
        )
    }
}

/// SHA-256 (hex) of a file, by the system's `sha256sum`.
pub fn sha256_file(path: &Path) -> Result<String, String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    sha256_hex(&out, &path.display().to_string())
}

/// SHA-256 (hex) of `bytes`, by the system's `sha256sum` fed on stdin.
pub fn sha256_bytes(bytes: &[u8]) -> Result<String, String> {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("sha256sum: {e}"))?;
    let mut w = c.stdin.take().ok_or("sha256sum: no stdin")?;
    // Written from a thread: the pipe holds less than large inputs.
    let data = bytes.to_vec();
    let t = std::thread::spawn(move || w.write_all(&data));
    let out = c
        .wait_with_output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    let _ = t.join();
    sha256_hex(&out, "stdin")
}

/// The hash `sha256sum` printed first, checked to be 64 hex digits.
fn sha256_hex(out: &Output, what: &str) -> Result<String, String> {
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .next()
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .ok_or_else(|| format!("sha256sum {what}: {:?} ({})", s.trim(), out.status))
}

#[cfg(test)]
mod tests {
    use super::{Progress, parse_dynamic, run_output, sha256_bytes, sha256_file};
    use std::process::Command;

    #[test]
    fn sha256_of_bytes_and_file_agree_with_the_known_digest() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_bytes(b"abc").unwrap(), abc);
        let f = std::env::temp_dir().join(format!("xtask-sha256-{}", std::process::id()));
        std::fs::write(&f, b"abc").unwrap();
        let got = sha256_file(&f);
        std::fs::remove_file(&f).unwrap();
        assert_eq!(got.unwrap(), abc);
        assert!(sha256_file(&f).is_err(), "a missing file has no hash");
        // More than a pipe holds.
        let big = vec![7u8; 1 << 20];
        assert_eq!(sha256_bytes(&big).unwrap().len(), 64);
    }

    #[test]
    fn progress_counts_to_the_total() {
        let mut p = Progress::new(3);
        assert!(p.step().starts_with("[1/3 "));
        assert!(p.step().starts_with("[2/3 "));
        assert!(p.step().starts_with("[3/3 "));
        // Never past the total, and "0s left" at the end.
        let last = p.step();
        assert!(
            last.starts_with("[3/3 ") && last.ends_with(" ~0s left]"),
            "{last}"
        );
    }

    #[test]
    fn run_output_returns_stdout_or_the_tail_of_a_failure() {
        assert_eq!(
            run_output(Command::new("sh").args(["-c", "echo out; echo err >&2"])).unwrap(),
            "out\n"
        );
        // 100 lines, then a failure: the error has the status and the last
        // lines, stderr included, and not the first ones.
        let e = run_output(Command::new("sh").args([
            "-c",
            "i=0; while [ $i -lt 100 ]; do echo line$i; i=$((i+1)); done; echo boom >&2; exit 3",
        ]))
        .unwrap_err();
        assert!(e.contains("exit status: 3"), "{e}");
        assert!(e.contains("line99") && e.contains("boom"), "{e}");
        assert!(!e.contains("line0\n"), "{e}");
        assert!(run_output(&mut Command::new("/nonexistent/tool")).is_err());
    }

    #[test]
    fn dynamic_section_lines_are_parsed_by_tag() {
        let text = " 0x0000000000000001 (NEEDED)             Shared library: [libvchan-xen.so.1]
 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]
 0x000000000000000e (SONAME)             Library soname: [libqrexec-utils.so.4]
 0x000000000000001d (RUNPATH)            Library runpath: [/run/x]
";
        assert_eq!(
            parse_dynamic(text, "(NEEDED)", "Shared library: ["),
            ["libvchan-xen.so.1", "libc.so.6"]
        );
        assert_eq!(
            parse_dynamic(text, "(SONAME)", "Library soname: ["),
            ["libqrexec-utils.so.4"]
        );
        assert!(parse_dynamic(text, "(RPATH)", "Library rpath: [").is_empty());
    }
}
