//! Small helpers shared by the xtask commands.

use std::path::PathBuf;
use std::process::Command;

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

#[cfg(test)]
mod tests {
    use super::Progress;

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
