//! The grant table the hub keeps: shares, grants, mappings and their
//! unmap-notify, per domain, with the per-domain page limit.

use super::*;

#[derive(Debug)]
pub(super) struct Grant {
    pub(super) share: u64,
    pub(super) page: u32,
    pub(super) peer: DomId,
    pub(super) writable: bool,
    /// Live mappings of this ref (a map that names it twice counts twice).
    pub(super) maps: u32,
}

#[derive(Debug)]
pub(super) struct ShareEntry {
    pub(super) file: File,
    pub(super) granter: DomId,
    pub(super) refs: Vec<GrantRef>,
    /// The sharer let go: its pages no longer count, and each ref is revoked
    /// at its last unmap.
    pub(super) released: bool,
    /// Refs of this share still in the grant table.
    pub(super) live: usize,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) next_ref: HashMap<DomId, GrantRef>,
    pub(super) grants: HashMap<(DomId, GrantRef), Grant>,
    pub(super) shares: HashMap<u64, ShareEntry>,
    pub(super) next_share: u64,
    pub(super) counted: HashMap<DomId, usize>,
    /// Grant entries in use per granting domain (live and orphaned).
    pub(super) entries: HashMap<DomId, usize>,
    pub(super) connections: usize,
    pub(super) maps: usize,
    pub(super) history: HubHistory,
}

/// An unmap-notify registered on a connection's object.
pub(super) struct Notify {
    pub(super) offset: usize,
    pub(super) held: Box<dyn HeldEvent>,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(super) struct MapRec {
    pub(super) granter: DomId,
    pub(super) refs: Vec<GrantRef>,
    pub(super) writable: bool,
    /// The distinct shares behind `refs`, in the order of the `FDS` replies.
    pub(super) shares: Vec<u64>,
}

/// What a connection holds.
#[derive(Debug)]
pub(super) enum Obj {
    /// Nothing yet: the first request must be SHARE or MAP.
    Fresh,
    Share {
        id: u64,
        dom: DomId,
        notify: Option<Notify>,
    },
    Map {
        dom: DomId,
        rec: MapRec,
        notify: Option<Notify>,
    },
    /// Released; only the end of the connection may follow.
    Done,
}

impl State {
    pub(super) fn stats(&self) -> HubStats {
        HubStats {
            connections: self.connections,
            shares: self.shares.len(),
            grants: self.grants.len(),
            maps: self.maps,
            counted_pages: self.counted.values().sum(),
        }
    }

    pub(super) fn share(
        &mut self,
        dom: DomId,
        peer: DomId,
        writable: bool,
        count: u32,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(u64, Vec<GrantRef>), Errno> {
        if fds.len() != 1 {
            return Err(Errno::EINVAL);
        }
        let count = count as usize;
        if count == 0 {
            return Err(Errno::EINVAL);
        }
        let counted = self.counted.get(&dom).copied().unwrap_or(0);
        let entries = self.entries.get(&dom).copied().unwrap_or(0);
        if count > DOMAIN_PAGE_LIMIT
            || counted + count > DOMAIN_PAGE_LIMIT
            || entries + count > DOMAIN_GRANT_ENTRIES
        {
            self.history.refused_shares += 1;
            return Err(Errno::ENOSPC);
        }
        let file = File::from(fds.remove(0));
        check_memfd(&file, count)?;

        let id = self.next_share;
        self.next_share += 1;
        let mut refs = Vec::with_capacity(count);
        for page in 0..count as u32 {
            let r = self.alloc_ref(dom);
            self.grants.insert(
                (dom, r),
                Grant {
                    share: id,
                    page,
                    peer,
                    writable,
                    maps: 0,
                },
            );
            refs.push(r);
        }
        self.shares.insert(
            id,
            ShareEntry {
                file,
                granter: dom,
                refs: refs.clone(),
                released: false,
                live: count,
            },
        );
        let now_counted = self.counted.entry(dom).or_insert(0);
        *now_counted += count;
        self.history.peak_domain_pages = self.history.peak_domain_pages.max(*now_counted);
        *self.entries.entry(dom).or_insert(0) += count;
        Ok((id, refs))
    }

    /// A ref of domain `dom` not in use. Refs are not reused until the
    /// counter wraps; the loop ends because at most
    /// [`DOMAIN_GRANT_ENTRIES`] refs of one domain are in use.
    pub(super) fn alloc_ref(&mut self, dom: DomId) -> GrantRef {
        let next = self.next_ref.entry(dom).or_insert(FIRST_REF);
        loop {
            let r = *next;
            *next = next.checked_add(1).unwrap_or(FIRST_REF);
            if !self.grants.contains_key(&(dom, r)) {
                return r;
            }
        }
    }

    /// The sharer let go (drop or death): notify, then stop counting the
    /// pages and revoke every ref that nobody maps.
    pub(super) fn release_share(&mut self, id: u64, notify: Option<Notify>) {
        let Some(share) = self.shares.get_mut(&id) else {
            return;
        };
        if let Some(n) = notify {
            // Byte first, then the event (docs/vchan.md §7.1): the pwrite lands in
            // the very pages every MAP_SHARED mapping shows.
            let _ = share.file.write_at(&[0], n.offset as u64);
            n.held.notify();
        }
        share.released = true;
        let granter = share.granter;
        let count = share.refs.len();
        if let Some(c) = self.counted.get_mut(&granter) {
            *c = c.saturating_sub(count);
            if *c == 0 {
                self.counted.remove(&granter);
            }
        }
        let refs = share.refs.clone();
        for r in refs {
            if self.grants.get(&(granter, r)).is_some_and(|g| g.maps == 0) {
                self.revoke(granter, r);
            }
        }
    }

    pub(super) fn revoke(&mut self, granter: DomId, r: GrantRef) {
        let Some(g) = self.grants.remove(&(granter, r)) else {
            return;
        };
        if let Some(n) = self.entries.get_mut(&granter) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.entries.remove(&granter);
            }
        }
        if let Some(share) = self.shares.get_mut(&g.share) {
            share.live = share.live.saturating_sub(1);
            if share.live == 0 {
                self.shares.remove(&g.share);
            }
        }
    }

    /// Checks and records a mapping by domain `dom`. Every grant problem is
    /// `EINVAL`, as `mmap` reports it on Xen.
    pub(super) fn map(
        &mut self,
        dom: DomId,
        granter: DomId,
        writable: bool,
        refs: Vec<GrantRef>,
    ) -> Result<(MapRec, Vec<u8>), Errno> {
        if refs.is_empty() {
            return Err(Errno::EINVAL);
        }
        let mut shares: Vec<u64> = Vec::new();
        let mut entries = Vec::with_capacity(refs.len());
        for r in &refs {
            let g = self.grants.get(&(granter, *r)).ok_or(Errno::EINVAL)?;
            if g.peer != dom || (writable && !g.writable) {
                return Err(Errno::EINVAL);
            }
            let idx = match shares.iter().position(|s| *s == g.share) {
                Some(i) => i,
                None => {
                    shares.push(g.share);
                    shares.len() - 1
                }
            };
            entries.push((idx as u32, g.page));
        }
        for r in &refs {
            if let Some(g) = self.grants.get_mut(&(granter, *r)) {
                g.maps += 1;
            }
        }
        self.maps += 1;
        let mut w = Writer::default();
        w.i32(0).u32(refs.len() as u32).u32(shares.len() as u32);
        for (idx, page) in entries {
            w.u32(idx).u32(page);
        }
        Ok((
            MapRec {
                granter,
                refs,
                writable,
                shares,
            },
            w.0,
        ))
    }

    /// The mapper let go. `clear_byte`: the mapper died, so the hub clears
    /// the notify byte (an orderly mapper cleared it itself at `munmap`).
    /// Then the event; then refs released by their sharer and no longer
    /// mapped are revoked.
    pub(super) fn unmap(&mut self, rec: MapRec, notify: Option<Notify>, clear_byte: bool) {
        if let Some(n) = notify {
            if clear_byte {
                let page = n.offset / PAGE_SIZE;
                let within = (n.offset % PAGE_SIZE) as u64;
                let target = rec
                    .refs
                    .get(page)
                    .and_then(|r| self.grants.get(&(rec.granter, *r)))
                    .and_then(|g| Some((self.shares.get(&g.share)?, g.page)));
                if let Some((share, page)) = target {
                    let _ = share
                        .file
                        .write_at(&[0], u64::from(page) * PAGE_SIZE as u64 + within);
                }
            }
            n.held.notify();
        }
        self.maps = self.maps.saturating_sub(1);
        for r in rec.refs {
            let Some(g) = self.grants.get_mut(&(rec.granter, r)) else {
                continue;
            };
            g.maps = g.maps.saturating_sub(1);
            let orphan = g.maps == 0 && self.shares.get(&g.share).is_none_or(|s| s.released);
            if orphan {
                self.revoke(rec.granter, r);
            }
        }
    }
}

/// Checks that a descriptor from a sharer is what the double needs: a
/// read-write memfd of exactly `count` pages whose size is sealed, so that
/// no peer can shrink it under a mapping.
pub(super) fn check_memfd(file: &File, count: usize) -> Result<(), Errno> {
    let meta = file.metadata().map_err(|_| Errno::EINVAL)?;
    if !meta.file_type().is_file() || meta.len() != (count * PAGE_SIZE) as u64 {
        return Err(Errno::EINVAL);
    }
    let seals = fcntl(file, FcntlArg::F_GET_SEALS).map_err(|_| Errno::EINVAL)?;
    let seals = SealFlag::from_bits_truncate(seals);
    if !seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
        return Err(Errno::EINVAL);
    }
    let fl = fcntl(file, FcntlArg::F_GETFL).map_err(|_| Errno::EINVAL)?;
    if fl & libc::O_ACCMODE != libc::O_RDWR {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// A read-only descriptor of the same memfd, so that a read-only mapper
/// cannot map the pages writable.
pub(super) fn reopen_read_only(file: &File) -> Result<OwnedFd, Errno> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(OwnedFd::from)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}
