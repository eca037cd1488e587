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
    config: LocalXenConfig,
    dir: PathBuf,
    evt: evtchn::local::Hub,
    gnt: gnttab::local::Hub,
    xs: xenstore::server::Server,
}

/// What kind of Xen [`LocalXen::start_with`] imitates.
///
/// The default is [`LocalXen::start`]'s: oxenstored, and every domain may
/// ask for the status of its event-channel ports (as dom0 can).
///
/// ```no_run
/// use vchan::{LocalXen, LocalXenConfig};
/// // Domains 1 and 2 as restricted domUs under C xenstored.
/// let config = LocalXenConfig { c_xenstored: true, restricted: vec![1, 2] };
/// let dir = std::env::temp_dir().join("my-local-xen-c");
/// std::fs::create_dir_all(&dir)?;
/// let xen = LocalXen::start_with(&dir, &[0, 1, 2], config)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalXenConfig {
    /// Imitate C xenstored: a missing node is `EACCES` unless the caller
    /// may read its nearest existing ancestor (so a domU cannot see that
    /// `/local/domain/<other>` went). Otherwise oxenstored (`ENOENT`).
    pub c_xenstored: bool,
    /// Domains that play restricted domUs: the status of their own
    /// event-channel ports is unknown to them (no privcmd hypercalls,
    /// docs/vchan.md §16 row P).
    pub restricted: Vec<DomId>,
}

impl LocalXen {
    /// Starts the hubs and a xenstored (answering `ENOENT` for missing
    /// nodes, like oxenstored) in `dir`, with the given domains.
    pub fn start(dir: &Path, domains: &[DomId]) -> Result<LocalXen> {
        Self::start_with(dir, domains, LocalXenConfig::default())
    }

    /// Like [`LocalXen::start`], imitating the Xen that `config` describes.
    pub fn start_with(dir: &Path, domains: &[DomId], config: LocalXenConfig) -> Result<LocalXen> {
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
        let xs_config = xenstore::server::Config {
            missing_node: if config.c_xenstored {
                xenstore::server::MissingNodeError::Eacces
            } else {
                xenstore::server::MissingNodeError::Enoent
            },
            // The domains' connections stand for their /dev/xen/xenbus,
            // which may deliver a watch's first event before the reply.
            watch_event_first: true,
            ..Default::default()
        };
        for &d in &config.restricted {
            evt.refuse_status(d);
        }
        let xs = xenstore::server::Server::start_with(&xs_dir, xs_config).map_err(|source| {
            Error::Xenstore {
                step: "start xenstored",
                source,
            }
        })?;
        let me = LocalXen {
            config,
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

    /// Introduces a domain (its xenstore socket and home nodes); a
    /// destroyed id comes back as a new domain.
    pub fn add_domain(&self, domid: DomId) -> Result<()> {
        self.evt.create_domain(domid);
        self.xs
            .add_domain(domid)
            .map(|_| ())
            .map_err(|source| Error::Xenstore {
                step: "add domain",
                source,
            })
    }

    /// Destroys a domain (`xl destroy`): its event-channel ports close at
    /// once (the peers' ports turn unbound, with no event), the hypervisor
    /// knows it no more (binds naming it get `ESRCH`, see
    /// [`evtchn::Backend::probe_domain`]), its xenstore nodes go and
    /// `@releaseDomain` fires. Its processes keep running (and its pages
    /// stay mapped by its peers), but its channels own nothing.
    ///
    /// Unlike Xen, the domain is released at once even while others map
    /// its grants (on Xen it lingers as a zombie until they unmap).
    pub fn remove_domain(&self, domid: DomId) -> Result<()> {
        self.evt.destroy_domain(domid);
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

    /// What the grant hub holds now (shares, maps, counted pages).
    pub fn grant_stats(&self) -> gnttab::local::HubStats {
        self.gnt.stats()
    }

    /// The grant hub's high-water mark of pages granted by one domain and
    /// its count of refused shares (`ENOSPC`), since the start.
    pub fn grant_history(&self) -> gnttab::local::HubHistory {
        self.gnt.history()
    }

    /// What this local Xen imitates.
    pub fn config(&self) -> &LocalXenConfig {
        &self.config
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

#[cfg(feature = "test-utils")]
impl LocalXen {
    /// Test support (feature `test-utils`): the control page of the vchan
    /// that domain `server` offers domain `peer` on `port`, mapped a second
    /// time by `peer` through the grant hub, as a hostile peer in another
    /// domain can hold it to write what it should not (an index it owns,
    /// moved beyond the ring). Waits up to `timeout` for the server's
    /// `ring-ref` node, which goes once a client has connected: call it
    /// before connecting. The mapping lives as long as the returned page.
    ///
    /// # Errors
    /// [`Error::Timeout`] if no server offers the port in time; xenstore
    /// or grant errors.
    ///
    /// ```
    /// use std::time::Duration;
    /// use vchan::control::{RIGHT_CONS, SharedHeader};
    /// use vchan::{LocalXen, Vchan};
    /// let dir = tempfile::tempdir()?;
    /// let xen = LocalXen::start(dir.path(), &[0, 1, 2])?;
    /// let mut server = Vchan::server(&xen.transport(1), 2, 7, 4096, 4096)?;
    /// let page = xen.map_control_page(2, 1, 7, Duration::from_secs(5))?;
    /// let client = Vchan::client(&xen.transport(2), 1, 7, Duration::from_secs(5))?;
    /// server.wait_connected(Some(Duration::from_secs(5)))?;
    /// // How far the client read what the server writes, moved beyond any
    /// // ring: the server finds the ring it writes corrupt.
    /// page.store_u32(RIGHT_CONS, page.load_u32(RIGHT_CONS).wrapping_add(1 << 30));
    /// assert!(server.buffer_space().is_err());
    /// # drop((client, page));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn map_control_page(
        &self,
        peer: DomId,
        server: DomId,
        port: u32,
        timeout: std::time::Duration,
    ) -> Result<crate::control::ControlPage> {
        use gnttab::Backend as _;
        use std::time::{Duration, Instant};
        let sock = crate::local_xenstore_socket(&self.dir, peer);
        let xs = xenstore::Xs::connect_unix(&sock).map_err(|source| Error::Xenstore {
            step: "connect to xenstored",
            source,
        })?;
        let path = format!(
            "/local/domain/{server}/data/vchan/{peer}/{port}/{}",
            crate::control::XS_RING_REF
        );
        let deadline = Instant::now() + timeout;
        let ring_ref: u32 = loop {
            if let Ok(s) = xs.read_string(&path) {
                break s
                    .trim()
                    .parse()
                    .map_err(|_| Error::peer(format!("ring-ref = {s:?} is not a number")))?;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    step: "wait for the server's ring-ref",
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let page = gnttab::local::Local::new(&self.dir, peer)
            .map(server, &[ring_ref], true)
            .map_err(|source| Error::Gnttab {
                step: "map the control page a second time",
                source,
            })?;
        crate::shm::control_page_of(page)
    }
}

impl Drop for LocalXen {
    fn drop(&mut self) {
        self.shutdown();
    }
}
