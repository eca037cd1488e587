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
    use super::{Progress, sha256_bytes, sha256_file};

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
}
