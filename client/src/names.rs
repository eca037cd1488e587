//! Local validation of the target, service and source-qube arguments
//! (docs/qrexec.md §7.1, §13, §16 item 4).
//!
//! The C client only rewrites `$` to `@` and silently truncates. We check
//! before sending, so that a name that dom0 would truncate or rewrite into a
//! different one is reported here, in one line that names the rule.
//!
//! ```
//! use qrexec::names::{normalize_target, validate_target};
//! use qrexec::proto::RequestFormat;
//! let t = normalize_target(b"$dispvm:fedora-41");
//! assert_eq!(t, b"@dispvm:fedora-41");
//! assert!(validate_target(&t, RequestFormat::V4).is_ok());
//! assert!(validate_target(b"@nosuchkeyword", RequestFormat::V4).is_err());
//! ```

use crate::proto::{CONTROL_RING_SIZE, DOMAIN_FIELD_SIZE, MSG_HEADER_SIZE, RequestFormat};
use std::fmt;

/// Longest service NAME (the part before the first `+`): the target agent
/// refuses names longer than `NAME_MAX`.
pub const MAX_SERVICE_NAME: usize = 255;
/// Longest v2 service field content (a 64-byte field with its NUL).
pub const MAX_SERVICE_V2: usize = 63;
/// Longest source-qube name (a 64-byte field with its NUL).
pub const MAX_SOURCE_LEN: usize = DOMAIN_FIELD_SIZE - 1;

/// Target keywords accepted as they are (besides `@dispvm:<name>`).
pub const TARGET_KEYWORDS: &[&str] = &["@default", "@adminvm", "@dispvm"];

/// A byte shown readably in messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShownByte(pub u8);

impl fmt::Debug for ShownByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ShownByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if (0x20..=0x7e).contains(&self.0) {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "byte 0x{:02x}", self.0)
        }
    }
}

/// Why a target, service or source-qube argument was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Target longer than its field.
    #[error(
        "target '{target}' is {len} bytes; request format {format} allows at most {max} (the VM-name field is {} bytes with its NUL)",
        max + 1
    )]
    TargetTooLong {
        /// The target, lossily decoded.
        target: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
        /// The request format in use.
        format: RequestFormat,
    },
    /// A byte dom0 would rewrite to `_`.
    #[error(
        "target contains {0}: a VM name may only use A-Z a-z 0-9 _ . - (and ':' in uuid:<uuid>)"
    )]
    TargetBadByte(ShownByte),
    /// `@` anywhere but at the start of a keyword.
    #[error("target contains '@' after its first character: '@' only starts a keyword")]
    TargetMisplacedAt,
    /// An `@keyword` that is not one we know.
    #[error(
        "unknown target keyword '{0}': use @default, @adminvm, @dispvm or @dispvm:<template> ('$' works as '@')"
    )]
    UnknownKeyword(String),
    /// `@dispvm:` with nothing after the colon.
    #[error("target '@dispvm:' needs a disposable template name after the colon")]
    EmptyDispvmTemplate,
    /// Empty service.
    #[error("service name is empty: give NAME or NAME+ARGUMENT")]
    ServiceEmpty,
    /// Service starts with `+` (empty NAME).
    #[error("service '{0}' starts with '+': the NAME before '+' must not be empty")]
    ServiceStartsWithPlus(String),
    /// NAME longer than 255.
    #[error(
        "service name (the part before '+') is {0} bytes; the target agent accepts at most {MAX_SERVICE_NAME}"
    )]
    ServiceNameTooLong(usize),
    /// Whole service too long for the v2 field.
    #[error(
        "service with argument is {0} bytes; request format v2 allows at most {MAX_SERVICE_V2}"
    )]
    ServiceTooLongV2(usize),
    /// Whole v3/v4 request too big for the agent's control ring.
    #[error(
        "service with argument is {len} bytes; with request format {format} at most {max} fit in the agent's {CONTROL_RING_SIZE}-byte control ring"
    )]
    RequestTooLong {
        /// Service length.
        len: usize,
        /// The limit for this format.
        max: usize,
        /// The request format in use.
        format: RequestFormat,
    },
    /// `--source-qube` with v2/v3.
    #[error("--source-qube needs request format v4, but the request format is {0}")]
    SourceNeedsV4(RequestFormat),
    /// Source qube too long.
    #[error("source qube is {0} bytes; at most {MAX_SOURCE_LEN} are allowed")]
    SourceTooLong(usize),
    /// Source qube with a byte dom0 would rewrite.
    #[error("source qube contains {0}: a VM name may only use A-Z a-z 0-9 _ . - : @")]
    SourceBadByte(ShownByte),
}

/// Rewrite every `$` into `@` (`$dispvm` → `@dispvm`, docs/qrexec.md §7.1 step 2).
///
/// ```
/// assert_eq!(qrexec::names::normalize_target(b"$default"), b"@default");
/// ```
pub fn normalize_target(raw: &[u8]) -> Vec<u8> {
    raw.iter()
        .map(|&c| if c == b'$' { b'@' } else { c })
        .collect()
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b':')
}

/// Check a target (after [`normalize_target`]) for the given format: empty
/// (policy default), a keyword, or a name of allowed bytes within 31 (v2) or
/// 63 (v3/v4) bytes.
pub fn validate_target(target: &[u8], format: RequestFormat) -> Result<(), NameError> {
    let max = format.max_target_len();
    if target.len() > max {
        return Err(NameError::TargetTooLong {
            target: String::from_utf8_lossy(target).into_owned(),
            len: target.len(),
            max,
            format,
        });
    }
    let Some(rest) = target.strip_prefix(b"@") else {
        if let Some(&c) = target.iter().find(|&&c| !is_name_byte(c)) {
            return Err(if c == b'@' {
                NameError::TargetMisplacedAt
            } else {
                NameError::TargetBadByte(ShownByte(c))
            });
        }
        return Ok(());
    };
    if let Some(&c) = rest.iter().find(|&&c| !is_name_byte(c)) {
        return Err(if c == b'@' {
            NameError::TargetMisplacedAt
        } else {
            NameError::TargetBadByte(ShownByte(c))
        });
    }
    if TARGET_KEYWORDS.iter().any(|k| k.as_bytes() == target) {
        return Ok(());
    }
    match target.strip_prefix(b"@dispvm:") {
        Some([]) => Err(NameError::EmptyDispvmTemplate),
        Some(_) => Ok(()),
        None => Err(NameError::UnknownKeyword(
            String::from_utf8_lossy(target).into_owned(),
        )),
    }
}

/// Check a service descriptor `NAME[+ARG]` for the given format. Returns the
/// warnings to print (bytes that dom0 will turn into `_`), or the error.
///
/// ```
/// # use qrexec::names::validate_service;
/// # use qrexec::proto::RequestFormat;
/// assert_eq!(validate_service(b"qubes.Filecopy", RequestFormat::V4), Ok(vec![]));
/// assert_eq!(validate_service(b"my svc", RequestFormat::V4).unwrap().len(), 1);
/// assert!(validate_service(b"+arg", RequestFormat::V4).is_err());
/// ```
pub fn validate_service(service: &[u8], format: RequestFormat) -> Result<Vec<String>, NameError> {
    if service.is_empty() {
        return Err(NameError::ServiceEmpty);
    }
    if service[0] == b'+' {
        return Err(NameError::ServiceStartsWithPlus(
            String::from_utf8_lossy(service).into_owned(),
        ));
    }
    let name_len = service
        .iter()
        .position(|&c| c == b'+')
        .unwrap_or(service.len());
    if name_len > MAX_SERVICE_NAME {
        return Err(NameError::ServiceNameTooLong(name_len));
    }
    match format {
        RequestFormat::V2 => {
            if service.len() > MAX_SERVICE_V2 {
                return Err(NameError::ServiceTooLongV2(service.len()));
            }
        }
        RequestFormat::V3 | RequestFormat::V4 => {
            let max = max_service_len(format);
            if service.len() > max {
                return Err(NameError::RequestTooLong {
                    len: service.len(),
                    max,
                    format,
                });
            }
        }
    }
    let mut warnings = Vec::new();
    let mut seen = [false; 256];
    for &c in service {
        let ok = c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'+');
        if !ok && !seen[c as usize] {
            seen[c as usize] = true;
            warnings.push(format!(
                "warning: service '{}' contains {}; dom0 will replace it with '_'",
                String::from_utf8_lossy(service),
                ShownByte(c)
            ));
        }
    }
    Ok(warnings)
}

/// Longest v3/v4 service descriptor whose request still fits, with its
/// header, in the agent's 4096-byte control ring (docs/qrexec.md §13.2): 3991 for v3,
/// 3927 for v4; 63 for v2.
///
/// ```
/// # use qrexec::names::max_service_len;
/// # use qrexec::proto::RequestFormat;
/// assert_eq!(max_service_len(RequestFormat::V4), 3927);
/// assert_eq!(max_service_len(RequestFormat::V3), 3991);
/// ```
pub fn max_service_len(format: RequestFormat) -> usize {
    match format {
        RequestFormat::V2 => MAX_SERVICE_V2,
        f => CONTROL_RING_SIZE - MSG_HEADER_SIZE - f.params_size() - 1,
    }
}

/// Check a `--source-qube` value: only with v4, at most 63 bytes, VM-name
/// bytes (plus `@`/`:` like the daemon allows).
pub fn validate_source(source: &[u8], format: RequestFormat) -> Result<(), NameError> {
    if format != RequestFormat::V4 {
        return Err(NameError::SourceNeedsV4(format));
    }
    if source.len() > MAX_SOURCE_LEN {
        return Err(NameError::SourceTooLong(source.len()));
    }
    if let Some(&c) = source.iter().find(|&&c| !(is_name_byte(c) || c == b'@')) {
        return Err(NameError::SourceBadByte(ShownByte(c)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use RequestFormat::*;

    #[test]
    fn dollar_becomes_at_everywhere() {
        assert_eq!(normalize_target(b"$dispvm"), b"@dispvm");
        assert_eq!(normalize_target(b"$default"), b"@default");
        assert_eq!(normalize_target(b"$dispvm:$x$"), b"@dispvm:@x@");
        assert_eq!(normalize_target(b""), b"");
        assert_eq!(normalize_target(b"work"), b"work");
    }

    #[test]
    fn targets_accepted() {
        for f in [V2, V3, V4] {
            for t in [
                &b""[..],
                b"@default",
                b"@dispvm",
                b"@adminvm",
                b"@dispvm:fedora-41-dvm",
                b"work",
                b"dom0",
                b"my_vm.2-x",
            ] {
                assert_eq!(validate_target(t, f), Ok(()), "{t:?} {f}");
            }
        }
        assert_eq!(
            validate_target(b"@dispvm:uuid:00000000-0000-0000-0000-000000000000", V4),
            Ok(())
        );
    }

    #[test]
    fn target_length_limits() {
        let a31 = [b'a'; 31];
        let a32 = [b'a'; 32];
        let a63 = [b'a'; 63];
        let a64 = [b'a'; 64];
        assert_eq!(validate_target(&a31, V2), Ok(()));
        assert!(matches!(
            validate_target(&a32, V2),
            Err(NameError::TargetTooLong { max: 31, .. })
        ));
        assert_eq!(validate_target(&a32, V3), Ok(()));
        assert_eq!(validate_target(&a63, V3), Ok(()));
        assert_eq!(validate_target(&a63, V4), Ok(()));
        assert!(matches!(
            validate_target(&a64, V4),
            Err(NameError::TargetTooLong { max: 63, .. })
        ));
        assert!(matches!(
            validate_target(&a64, V3),
            Err(NameError::TargetTooLong { max: 63, .. })
        ));
    }

    #[test]
    fn target_rules() {
        assert_eq!(
            validate_target(b"@dispvm:", V4),
            Err(NameError::EmptyDispvmTemplate)
        );
        assert!(matches!(
            validate_target(b"@anyvm", V4),
            Err(NameError::UnknownKeyword(_))
        ));
        assert!(matches!(
            validate_target(b"@Default", V4),
            Err(NameError::UnknownKeyword(_))
        ));
        assert_eq!(
            validate_target(b"my vm", V4),
            Err(NameError::TargetBadByte(ShownByte(b' ')))
        );
        assert_eq!(
            validate_target(b"a@b", V4),
            Err(NameError::TargetMisplacedAt)
        );
        assert_eq!(
            validate_target(b"@dispvm:a@b", V4),
            Err(NameError::TargetMisplacedAt)
        );
        assert_eq!(
            validate_target(b"w\xffork", V4),
            Err(NameError::TargetBadByte(ShownByte(0xff)))
        );
    }

    #[test]
    fn service_rules() {
        assert_eq!(validate_service(b"", V4), Err(NameError::ServiceEmpty));
        assert!(matches!(
            validate_service(b"+x", V4),
            Err(NameError::ServiceStartsWithPlus(_))
        ));
        assert_eq!(validate_service(b"a+", V4), Ok(vec![]));
        assert_eq!(validate_service(b"a+b+c", V3), Ok(vec![]));
        let long_name = [b'a'; 256];
        assert_eq!(
            validate_service(&long_name, V4),
            Err(NameError::ServiceNameTooLong(256))
        );
        let mut ok = vec![b'a'; 255];
        ok.push(b'+');
        ok.extend(vec![b'b'; 1000]);
        assert_eq!(validate_service(&ok, V4), Ok(vec![]));
        // v2: the whole thing in 63 bytes
        assert_eq!(validate_service(&[b'a'; 63], V2), Ok(vec![]));
        assert_eq!(
            validate_service(&[b'a'; 64], V2),
            Err(NameError::ServiceTooLongV2(64))
        );
        // v3/v4: the request must fit the control ring
        let mut v4max = b"a+".to_vec();
        v4max.resize(3927, b'x');
        assert_eq!(validate_service(&v4max, V4), Ok(vec![]));
        v4max.push(b'x');
        assert!(matches!(
            validate_service(&v4max, V4),
            Err(NameError::RequestTooLong { max: 3927, .. })
        ));
        assert_eq!(validate_service(&v4max, V3), Ok(vec![]));
        // 8 + 160 + 3927 + 1 == 4096
        assert_eq!(8 + 160 + max_service_len(V4) + 1, 4096);
        assert_eq!(8 + 96 + max_service_len(V3) + 1, 4096);
    }

    #[test]
    fn service_charset_warns_once_per_byte() {
        let w = validate_service(b"a b c/d", V4).unwrap();
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("' '"), "{w:?}");
        assert!(w[1].contains("'/'"), "{w:?}");
        assert!(w[0].contains("replace it with '_'"));
    }

    #[test]
    fn source_rules() {
        assert_eq!(validate_source(b"relay", V4), Ok(()));
        assert_eq!(validate_source(b"", V4), Ok(()));
        assert_eq!(
            validate_source(b"relay", V3),
            Err(NameError::SourceNeedsV4(V3))
        );
        assert_eq!(
            validate_source(b"relay", V2),
            Err(NameError::SourceNeedsV4(V2))
        );
        assert_eq!(
            validate_source(&[b'a'; 64], V4),
            Err(NameError::SourceTooLong(64))
        );
        assert_eq!(
            validate_source(b"a b", V4),
            Err(NameError::SourceBadByte(ShownByte(b' ')))
        );
    }

    #[test]
    fn messages_are_one_line_and_name_the_rule() {
        let errs = [
            validate_target(&[b'a'; 40], V2).unwrap_err(),
            validate_target(b"@x", V4).unwrap_err(),
            validate_service(b"", V4).unwrap_err(),
            validate_source(b"x", V3).unwrap_err(),
        ];
        for e in errs {
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s}");
        }
        assert!(
            validate_target(&[b'a'; 40], V2)
                .unwrap_err()
                .to_string()
                .contains("at most 31")
        );
    }
}
