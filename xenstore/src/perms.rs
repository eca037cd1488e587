//! Node permissions (docs/vchan.md §8.2): `<letter><domid>` strings such as `r5`.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

pub use xen_base::{DOMID_FIRST_RESERVED, DomId, parse_domid};

/// Access granted by one permission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    /// `n`: no access.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

impl Perm {
    /// The wire letter (`n`, `r`, `w`, `b`).
    pub fn letter(self) -> char {
        match self {
            Perm::None => 'n',
            Perm::Read => 'r',
            Perm::Write => 'w',
            Perm::Both => 'b',
        }
    }

    /// The permission for a wire letter.
    pub fn from_letter(c: char) -> Option<Perm> {
        match c {
            'n' => Some(Perm::None),
            'r' => Some(Perm::Read),
            'w' => Some(Perm::Write),
            'b' => Some(Perm::Both),
            _ => None,
        }
    }

    /// Does this permission allow reading?
    pub fn can_read(self) -> bool {
        matches!(self, Perm::Read | Perm::Both)
    }

    /// Does this permission allow writing?
    pub fn can_write(self) -> bool {
        matches!(self, Perm::Write | Perm::Both)
    }
}

/// One entry of a node's permission list.
///
/// In a list, the **first** entry names the owner and its letter is the
/// default access of every domain not listed; later entries grant access
/// to one domain each.
///
/// ```
/// use xenstore::{NodePerm, Perm};
/// let p: NodePerm = "r5".parse().unwrap();
/// assert_eq!(p, NodePerm { dom: 5, perm: Perm::Read });
/// assert_eq!(NodePerm::new(0, Perm::None).to_string(), "n0");
/// assert!("x5".parse::<NodePerm>().is_err());
/// assert!("r05".parse::<NodePerm>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodePerm {
    /// The domain the entry is about.
    pub dom: DomId,
    /// The access it grants.
    pub perm: Perm,
}

impl NodePerm {
    /// A permission entry.
    pub fn new(dom: DomId, perm: Perm) -> NodePerm {
        NodePerm { dom, perm }
    }
}

impl fmt::Display for NodePerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.perm.letter(), self.dom)
    }
}

impl FromStr for NodePerm {
    type Err = Error;

    /// Strict: one of `nrwb`, then a decimal domid without sign or leading
    /// zeros (except `0` itself) that fits in 16 bits.
    fn from_str(s: &str) -> Result<NodePerm, Error> {
        let bad = || Error::invalid(format!("bad permission {s:?}"));
        let mut chars = s.chars();
        let perm = chars.next().and_then(Perm::from_letter).ok_or_else(bad)?;
        let dom = parse_decimal(chars.as_str(), u32::from(DomId::MAX)).ok_or_else(bad)?;
        let dom = DomId::try_from(dom).map_err(|_| bad())?;
        Ok(NodePerm { dom, perm })
    }
}

/// Parse a strict decimal: ASCII digits only, no leading zeros except `"0"`,
/// value `<= max`.
pub(crate) fn parse_decimal(s: &str, max: u32) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    let v: u64 = s.parse().ok()?;
    u32::try_from(v).ok().filter(|v| *v <= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perm_round_trip() {
        for s in ["n0", "r5", "w1", "b3", "b65535"] {
            assert_eq!(s.parse::<NodePerm>().unwrap().to_string(), s);
        }
        for s in [
            "", "r", "5", "x5", "r-1", "r+1", "r05", "r65536", "R5", "r5 ", "r 5", "rr5",
        ] {
            assert!(s.parse::<NodePerm>().is_err(), "{s:?} accepted");
        }
    }
}
