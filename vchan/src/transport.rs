//! Which machinery carries a vchan: real Xen, the same-host doubles, or the
//! socket stream of Qubes' `qubes-core-vchan-socket`.

use std::path::PathBuf;

use crate::error::{Error, Result};

pub use xen_base::{DomId, parse_domid};

/// Default directory of the socket transport (as in qubes-core-vchan-socket).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/vchan";

/// Environment variable naming the socket transport's directory.
pub const ENV_SOCKET_DIR: &str = "VCHAN_SOCKET_DIR";
/// Environment variable naming our own domain id for the socket and local transports.
pub const ENV_DOMAIN: &str = "VCHAN_DOMAIN";
/// Environment variable naming the local transport's rendezvous directory.
pub const ENV_LOCAL_DIR: &str = "VCHAN_LOCAL_DIR";
/// Environment variable that forces a transport: `xen`, `local` or `socket`.
pub const ENV_TRANSPORT: &str = "VCHAN_TRANSPORT";

/// The machinery under a [`crate::Vchan`].
///
/// ```
/// use vchan::Transport;
/// let t = Transport::Socket { dir: "/tmp/vchan".into(), domid: 3 };
/// assert_eq!(t.own_domid_hint(), Some(3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Real Xen: `/dev/xen/{gntalloc,gntdev,evtchn}` and xenstore.
    Xen,
    /// The same-host doubles: processes play domains; `dir` holds the hubs'
    /// sockets (`evtchn.sock`, `gnttab.sock`, `xenstore/<domid>.sock`).
    Local {
        /// Rendezvous directory.
        dir: PathBuf,
        /// The domain this process plays.
        domid: DomId,
    },
    /// The byte stream of `qubes-core-vchan-socket`:
    /// `<dir>/vchan.<server>.<client>.<port>.sock`.
    Socket {
        /// Socket directory.
        dir: PathBuf,
        /// The domain this process plays.
        domid: DomId,
    },
}

impl Transport {
    /// Chooses a transport from the environment, the way our tools do:
    /// `VCHAN_TRANSPORT` if set; else `VCHAN_SOCKET_DIR` selects the socket
    /// transport and `VCHAN_LOCAL_DIR` the local one (own domain from
    /// `VCHAN_DOMAIN`, default 0); else Xen.
    ///
    /// ```
    /// // With nothing set, Xen is chosen.
    /// # // SAFETY: the doc test is one thread; nothing reads the environment meanwhile.
    /// # unsafe { std::env::remove_var("VCHAN_TRANSPORT"); std::env::remove_var("VCHAN_SOCKET_DIR"); std::env::remove_var("VCHAN_LOCAL_DIR"); }
    /// assert_eq!(vchan::Transport::from_env().unwrap(), vchan::Transport::Xen);
    /// ```
    pub fn from_env() -> Result<Transport> {
        Self::from_lookup(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Like [`Transport::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Transport> {
        let domid = match get(ENV_DOMAIN) {
            None => 0,
            Some(s) => parse_domid(&s)
                .ok_or_else(|| Error::config(format!("{ENV_DOMAIN}={s:?} is not a domain id")))?,
        };
        let socket_dir = get(ENV_SOCKET_DIR).filter(|s| !s.is_empty());
        let local_dir = get(ENV_LOCAL_DIR).filter(|s| !s.is_empty());
        let forced = get(ENV_TRANSPORT).filter(|s| !s.is_empty());
        match forced.as_deref() {
            Some("xen") => Ok(Transport::Xen),
            Some("socket") => Ok(Transport::Socket {
                dir: socket_dir
                    .unwrap_or_else(|| DEFAULT_SOCKET_DIR.into())
                    .into(),
                domid,
            }),
            Some("local") => Ok(Transport::Local {
                dir: local_dir
                    .ok_or_else(|| {
                        Error::config(format!("{ENV_TRANSPORT}=local needs {ENV_LOCAL_DIR}"))
                    })?
                    .into(),
                domid,
            }),
            Some(other) => Err(Error::config(format!(
                "{ENV_TRANSPORT}={other:?}: expected xen, local or socket"
            ))),
            None => Ok(if let Some(dir) = socket_dir {
                Transport::Socket {
                    dir: dir.into(),
                    domid,
                }
            } else if let Some(dir) = local_dir {
                Transport::Local {
                    dir: dir.into(),
                    domid,
                }
            } else {
                Transport::Xen
            }),
        }
    }

    /// Our own domain id when the transport fixes it (local and socket);
    /// `None` for Xen, where it is read from xenstore.
    pub fn own_domid_hint(&self) -> Option<DomId> {
        match self {
            Transport::Xen => None,
            Transport::Local { domid, .. } | Transport::Socket { domid, .. } => Some(*domid),
        }
    }

    /// Whether this transport can work on this machine; for Xen, whether
    /// `/dev/xen/evtchn` exists. The error says how to try things locally.
    pub fn check_available(&self) -> Result<()> {
        match self {
            Transport::Xen if !std::path::Path::new("/dev/xen/evtchn").exists() => {
                Err(Error::config(format!(
                    "no /dev/xen here (not a Xen domain); to try locally set {ENV_LOCAL_DIR} \
                     (a running simulation, see `cargo xtask demo`) or {ENV_SOCKET_DIR}"
                )))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn selection_order() {
        assert_eq!(Transport::from_lookup(env(&[])).unwrap(), Transport::Xen);
        assert_eq!(
            Transport::from_lookup(env(&[("VCHAN_SOCKET_DIR", "/s"), ("VCHAN_DOMAIN", "4")]))
                .unwrap(),
            Transport::Socket {
                dir: "/s".into(),
                domid: 4
            }
        );
        assert_eq!(
            Transport::from_lookup(env(&[("VCHAN_LOCAL_DIR", "/l")])).unwrap(),
            Transport::Local {
                dir: "/l".into(),
                domid: 0
            }
        );
        assert_eq!(
            Transport::from_lookup(env(&[
                ("VCHAN_LOCAL_DIR", "/l"),
                ("VCHAN_SOCKET_DIR", "/s"),
                ("VCHAN_TRANSPORT", "local")
            ]))
            .unwrap(),
            Transport::Local {
                dir: "/l".into(),
                domid: 0
            }
        );
        assert!(Transport::from_lookup(env(&[("VCHAN_TRANSPORT", "carrier-pigeon")])).is_err());
        assert!(Transport::from_lookup(env(&[("VCHAN_DOMAIN", "-1")])).is_err());
        assert!(Transport::from_lookup(env(&[("VCHAN_TRANSPORT", "local")])).is_err());
    }

    #[test]
    fn strict_domid() {
        for ok in ["0", "1", "32751"] {
            assert!(parse_domid(ok).is_some(), "{ok}");
        }
        for bad in [
            "", "00", "01", "+1", "-1", " 1", "1 ", "32752", "99999999", "x",
        ] {
            assert_eq!(parse_domid(bad), None, "{bad:?}");
        }
    }
}
