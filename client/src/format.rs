//! Choosing the request format written to the agent socket (docs/qrexec.md §16 item 1).
//!
//! Order: an explicit option, else the environment variable
//! [`REQUEST_FORMAT_ENV`], else the last line of the agent tools' marker file
//! (`4.0` → v2, `4.1`/`4.2` → v3, `4.3`+ → v4), else v4. There is never an
//! automatic retry with another format, and v2 is never probed: it is chosen
//! only by the option, the variable or a 4.0 marker.
//!
//! ```
//! use qrexec::format::format_from_marker;
//! use qrexec::proto::RequestFormat;
//! assert_eq!(format_from_marker("4.2\n").unwrap(), RequestFormat::V3);
//! ```

use crate::proto::RequestFormat;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

/// Environment variable that pins the request format (`v2`, `v3`, `v4`).
pub const REQUEST_FORMAT_ENV: &str = "QREXEC_REQUEST_FORMAT";
/// Environment variable that overrides the marker-file path (for tests).
pub const MARKER_VM_ENV: &str = "QREXEC_MARKER_VM_PATH";
/// Where Qubes agent tools record their `major.minor` version.
pub const MARKER_VM_PATH: &str = "/usr/share/qubes/marker-vm";

/// A bad format value or marker file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not one of v2/v3/v4.
    #[error("invalid request format '{0}': use v2, v3 or v4")]
    BadValue(String),
    /// The variable holds something that is not a format.
    #[error("{REQUEST_FORMAT_ENV}='{0}' is not a request format: use v2, v3 or v4")]
    BadEnv(String),
    /// The marker's last line is not `major.minor`.
    #[error("marker file's last line '{0}' is not a major.minor version")]
    BadMarker(String),
}

/// Where the chosen format came from (for verbose logs and the refusal hint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatSource {
    /// `--request-format`.
    Option,
    /// [`REQUEST_FORMAT_ENV`].
    Env,
    /// The marker file, with the version it holds.
    Marker {
        /// The file read.
        path: PathBuf,
        /// Its last line.
        version: String,
    },
    /// Nothing said otherwise; `why` says what happened to the marker.
    Default {
        /// Why the marker file was not used.
        why: String,
    },
}

/// The selected format and its origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatChoice {
    /// The format to use.
    pub format: RequestFormat,
    /// Where it came from.
    pub source: FormatSource,
}

/// Parse `v2`/`v3`/`v4` (also `2`/`3`/`4`, any case).
///
/// ```
/// # use qrexec::format::parse_format;
/// # use qrexec::proto::RequestFormat;
/// assert_eq!(parse_format("V3"), Ok(RequestFormat::V3));
/// assert!(parse_format("v5").is_err());
/// ```
pub fn parse_format(s: &str) -> Result<RequestFormat, FormatError> {
    let t = s.trim();
    let t = t
        .strip_prefix('v')
        .or_else(|| t.strip_prefix('V'))
        .unwrap_or(t);
    match t {
        "2" => Ok(RequestFormat::V2),
        "3" => Ok(RequestFormat::V3),
        "4" => Ok(RequestFormat::V4),
        _ => Err(FormatError::BadValue(s.to_string())),
    }
}

/// The format matching the marker file contents: its last non-empty line is
/// the agent tools' `major.minor` version.
pub fn format_from_marker(contents: &str) -> Result<RequestFormat, FormatError> {
    let line = contents
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    let bad = || FormatError::BadMarker(line.to_string());
    let mut parts = line.split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    Ok(match (major, minor) {
        (0..=3, _) | (4, 0) => RequestFormat::V2,
        (4, 1 | 2) => RequestFormat::V3,
        _ => RequestFormat::V4,
    })
}

/// Select the format from the option, the environment value and the marker
/// file (read from `marker_path`). Pure apart from reading that file.
pub fn select_format(
    option: Option<RequestFormat>,
    env_value: Option<&OsStr>,
    marker_path: &Path,
) -> Result<FormatChoice, FormatError> {
    if let Some(format) = option {
        return Ok(FormatChoice {
            format,
            source: FormatSource::Option,
        });
    }
    if let Some(v) = env_value.filter(|v| !v.is_empty()) {
        let s = v.to_string_lossy();
        let format = parse_format(&s).map_err(|_| FormatError::BadEnv(s.into_owned()))?;
        return Ok(FormatChoice {
            format,
            source: FormatSource::Env,
        });
    }
    let why = match std::fs::read(marker_path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            match format_from_marker(&text) {
                Ok(format) => {
                    return Ok(FormatChoice {
                        format,
                        source: FormatSource::Marker {
                            path: marker_path.to_path_buf(),
                            version: text
                                .lines()
                                .map(str::trim)
                                .rfind(|l| !l.is_empty())
                                .unwrap_or("")
                                .to_string(),
                        },
                    });
                }
                Err(e) => format!("{}: {e}", marker_path.display()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            format!("{} does not exist", marker_path.display())
        }
        Err(e) => format!("cannot read {}: {e}", marker_path.display()),
    };
    Ok(FormatChoice {
        format: RequestFormat::V4,
        source: FormatSource::Default { why },
    })
}

/// The marker path: [`MARKER_VM_ENV`] if set, else [`MARKER_VM_PATH`].
pub fn marker_path_from_env() -> PathBuf {
    std::env::var_os(MARKER_VM_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(MARKER_VM_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RequestFormat::*;

    #[test]
    fn parse_values() {
        for (s, f) in [("v2", V2), ("3", V3), ("V4", V4), (" v3 ", V3)] {
            assert_eq!(parse_format(s), Ok(f));
        }
        for s in ["", "v1", "v5", "4.3", "x"] {
            assert!(parse_format(s).is_err(), "{s}");
        }
    }

    #[test]
    fn marker_versions() {
        assert_eq!(format_from_marker("4.0\n"), Ok(V2));
        assert_eq!(format_from_marker("3.2"), Ok(V2));
        assert_eq!(format_from_marker("4.1\n"), Ok(V3));
        assert_eq!(format_from_marker("4.2"), Ok(V3));
        assert_eq!(format_from_marker("4.3\n"), Ok(V4));
        assert_eq!(format_from_marker("4.10"), Ok(V4));
        assert_eq!(format_from_marker("5.0"), Ok(V4));
        assert_eq!(format_from_marker("4.2.5"), Ok(V3));
        // the LAST non-empty line counts
        assert_eq!(format_from_marker("# comment\n4.0\n4.3\n\n"), Ok(V4));
        assert!(format_from_marker("").is_err());
        assert!(format_from_marker("four").is_err());
        assert!(format_from_marker("4").is_err());
    }

    #[test]
    fn selection_order() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker-vm");
        std::fs::write(&marker, "4.0\n").unwrap();
        let env = OsStr::new("v3");
        // option beats env and marker
        let c = select_format(Some(V4), Some(env), &marker).unwrap();
        assert_eq!((c.format, c.source), (V4, FormatSource::Option));
        // env beats marker
        let c = select_format(None, Some(env), &marker).unwrap();
        assert_eq!((c.format, c.source), (V3, FormatSource::Env));
        // marker
        let c = select_format(None, None, &marker).unwrap();
        assert_eq!(c.format, V2);
        assert!(matches!(c.source, FormatSource::Marker { ref version, .. } if version == "4.0"));
        // empty env is ignored
        let c = select_format(None, Some(OsStr::new("")), &marker).unwrap();
        assert_eq!(c.format, V2);
        // missing marker → v4 with a reason
        let c = select_format(None, None, &dir.path().join("nope")).unwrap();
        assert_eq!(c.format, V4);
        assert!(
            matches!(c.source, FormatSource::Default { ref why } if why.contains("does not exist"))
        );
        // unparsable marker → v4, never v2
        std::fs::write(&marker, "garbage\n").unwrap();
        let c = select_format(None, None, &marker).unwrap();
        assert_eq!(c.format, V4);
        // bad env is an error, not a silent default
        assert_eq!(
            select_format(None, Some(OsStr::new("v9")), &marker),
            Err(FormatError::BadEnv("v9".into()))
        );
    }
}
