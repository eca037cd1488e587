//! A same-host "Xen" for the Local transport: the event-channel hub, the
//! grant hub and a xenstored, serving one rendezvous directory in which
//! separate processes play separate domains.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::transport::{DomId, Transport};

/// The hubs and xenstored behind [`Transport::Local`], running in threads
/// of this process until dropped (or [`LocalXen::shutdown`]).
///
/// ```no_run
/// use vchan::{LocalXen, Vchan};
/// let dir = std::env::temp_dir().join("my-local-xen");
/// std::fs::create_dir_all(&dir)?;
/// let xen = LocalXen::start(&dir, &[0, 1, 2])?;
/// // Processes now play domains with VCHAN_LOCAL_DIR=<dir> VCHAN_DOMAIN=<id>,
/// // or in-process: Vchan::server(&xen.transport(1), 2, 77, 4096, 4096)
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct LocalXen {
    dir: PathBuf,
    evt: evtchn::local::Hub,
    gnt: gnttab::local::Hub,
    xs: xenstore::server::Server,
}

impl LocalXen {
    /// Starts the hubs and a xenstored (answering `ENOENT` for missing
    /// nodes, like oxenstored) in `dir`, with the given domains.
    pub fn start(dir: &Path, domains: &[DomId]) -> Result<LocalXen> {
        let xs_dir = dir.join("xenstore");
        std::fs::create_dir_all(&xs_dir).map_err(|e| Error::io("create xenstore dir", e))?;
        let evt = evtchn::local::Hub::start(dir).map_err(|source| Error::Evtchn {
            step: "start event-channel hub",
            source,
        })?;
        let gnt = gnttab::local::Hub::start(dir, evt.clone()).map_err(|source| Error::Gnttab {
            step: "start grant hub",
            source,
        })?;
        let config = xenstore::server::Config {
            missing_node: xenstore::server::MissingNodeError::Enoent,
            ..Default::default()
        };
        let xs = xenstore::server::Server::start_with(&xs_dir, config).map_err(|source| {
            Error::Xenstore {
                step: "start xenstored",
                source,
            }
        })?;
        let me = LocalXen {
            dir: dir.to_path_buf(),
            evt,
            gnt,
            xs,
        };
        for &d in domains {
            me.add_domain(d)?;
        }
        Ok(me)
    }

    /// Introduces a domain (its xenstore socket and home nodes).
    pub fn add_domain(&self, domid: DomId) -> Result<()> {
        self.xs
            .add_domain(domid)
            .map(|_| ())
            .map_err(|source| Error::Xenstore {
                step: "add domain",
                source,
            })
    }

    /// Destroys a domain as far as xenstore can tell (`xl destroy`): its
    /// nodes go and `@releaseDomain` fires. Its processes keep running.
    pub fn remove_domain(&self, domid: DomId) -> Result<()> {
        self.xs
            .remove_domain(domid)
            .map_err(|source| Error::Xenstore {
                step: "remove domain",
                source,
            })
    }

    /// The transport with which a process plays `domid` here.
    pub fn transport(&self, domid: DomId) -> Transport {
        Transport::Local {
            dir: self.dir.clone(),
            domid,
        }
    }

    /// The rendezvous directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops serving and removes the sockets.
    pub fn shutdown(&self) {
        self.xs.shutdown();
        self.gnt.shutdown();
        self.evt.shutdown();
        let _ = std::fs::remove_dir(self.dir.join("xenstore"));
    }
}

impl Drop for LocalXen {
    fn drop(&mut self) {
        self.shutdown();
    }
}
