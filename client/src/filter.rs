//! Escape-character filtering (docs/qrexec.md §10).
//!
//! Every byte outside printable ASCII (0x20–0x7E) becomes `_`, except TAB,
//! LF, CR, BS and BEL. The length never changes.
//!
//! ```
//! let mut b = *b"hello\0world\xff";
//! qrexec::filter::replace_escape_chars(&mut b);
//! assert_eq!(&b, b"hello_world_");
//! ```

/// True for the bytes that pass the filter unchanged.
pub fn is_allowed(c: u8) -> bool {
    (0x20..=0x7e).contains(&c) || matches!(c, b'\t' | b'\n' | b'\r' | 0x08 | 0x07)
}

/// Replace, in place, every byte that is not allowed with `_`.
pub fn replace_escape_chars(buf: &mut [u8]) {
    for c in buf.iter_mut() {
        if !is_allowed(*c) {
            *c = b'_';
        }
    }
}

/// The three-state setting of one filter: unset until an option or the tty
/// default decides (docs/qrexec.md §10: the last option given wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FilterSetting {
    /// No option given: the default applies.
    #[default]
    Unset,
    /// Forced on (`-t`/`-T`).
    On,
    /// Forced off (`--no-filter-escape-chars-*`).
    Off,
}

impl FilterSetting {
    /// Resolve against the default (on when the stream is a terminal; for
    /// stdout only when there is no local program).
    pub fn resolve(self, default_on: bool) -> bool {
        match self {
            FilterSetting::Unset => default_on,
            FilterSetting::On => true,
            FilterSetting::Off => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_set_is_exact() {
        for c in 0u8..=255 {
            let want = (0x20..=0x7e).contains(&c) || [9u8, 10, 13, 8, 7].contains(&c);
            assert_eq!(is_allowed(c), want, "{c:#x}");
        }
    }

    #[test]
    fn spec_example() {
        let mut b = *b"hello\0world\xff";
        replace_escape_chars(&mut b);
        assert_eq!(&b, b"hello_world_");
        let mut esc = *b"\x1b[31mred\x1b[0m\t\r\n\x07\x08\x7f";
        replace_escape_chars(&mut esc);
        assert_eq!(&esc, b"_[31mred_[0m\t\r\n\x07\x08_");
    }

    #[test]
    fn tri_state() {
        assert!(FilterSetting::Unset.resolve(true));
        assert!(!FilterSetting::Unset.resolve(false));
        assert!(FilterSetting::On.resolve(false));
        assert!(!FilterSetting::Off.resolve(true));
    }
}
