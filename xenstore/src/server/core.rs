// Why this file is long (~840 lines): the last ~205 are unit tests of the
// request parsing and dispatch; the rest is the one dispatcher.
//! Request parsing and dispatch, connections, transactions and watches —
//! everything of the server except sockets and threads.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::SyncSender;

use crate::error::Errno;
use crate::perms::{DomId, NodePerm, Perm, parse_decimal};
use crate::wire::{
    ABS_PATH_MAX, Header, Message, MsgType, PAYLOAD_MAX, REL_PATH_MAX, nul_terminated,
    split_nul_terminated,
};

use super::Config;
use super::store::{Caller, Change, Store, is_at_or_below, perm_for};

/// A parsed request (see [`parse_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Request {
    Read(String),
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    Directory(String),
    GetPerms(String),
    SetPerms(String, Vec<NodePerm>),
    Watch(String, Vec<u8>),
    Unwatch(String, Vec<u8>),
    TransactionStart,
    /// `true`: commit, `false`: abort.
    TransactionEnd(bool),
    GetDomainPath(DomId),
    IsDomainIntroduced(DomId),
    ResetWatches,
    /// A known type this server does not implement (`ENOSYS`).
    Unsupported(MsgType),
}

fn text(b: &[u8]) -> Result<String, Errno> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| Errno::EINVAL)
}

/// Exactly one NUL-terminated string.
fn one_arg(payload: &[u8]) -> Result<String, Errno> {
    match split_nul_terminated(payload).as_deref() {
        Some([s]) => text(s),
        _ => Err(Errno::EINVAL),
    }
}

fn domid_arg(payload: &[u8]) -> Result<DomId, Errno> {
    let s = one_arg(payload)?;
    parse_decimal(&s, u32::from(DomId::MAX))
        .and_then(|d| DomId::try_from(d).ok())
        .ok_or(Errno::EINVAL)
}

/// Parse a request payload strictly, as the server does. Path syntax is
/// checked later (it depends on the caller's domain). Never panics.
///
/// ```
/// use xenstore::server::{parse_request, Request};
/// use xenstore::wire::MsgType;
/// assert_eq!(
///     parse_request(MsgType::Write as u32, b"data/x\0v\0w"),
///     Ok(Request::Write("data/x".into(), b"v\0w".to_vec()))
/// );
/// assert!(parse_request(MsgType::Read as u32, b"a\0b\0").is_err());
/// ```
pub fn parse_request(ty: u32, payload: &[u8]) -> Result<Request, Errno> {
    let Some(t) = MsgType::from_u32(ty) else {
        return Err(Errno::EINVAL);
    };
    Ok(match t {
        MsgType::Read => Request::Read(one_arg(payload)?),
        MsgType::Mkdir => Request::Mkdir(one_arg(payload)?),
        MsgType::Rm => Request::Rm(one_arg(payload)?),
        MsgType::Directory => Request::Directory(one_arg(payload)?),
        MsgType::GetPerms => Request::GetPerms(one_arg(payload)?),
        MsgType::Write => {
            let nul = payload.iter().position(|b| *b == 0).ok_or(Errno::EINVAL)?;
            Request::Write(text(&payload[..nul])?, payload[nul + 1..].to_vec())
        }
        MsgType::SetPerms => {
            let parts = split_nul_terminated(payload).ok_or(Errno::EINVAL)?;
            let [path, perms @ ..] = parts.as_slice() else {
                return Err(Errno::EINVAL);
            };
            if perms.is_empty() {
                return Err(Errno::EINVAL);
            }
            let perms = perms
                .iter()
                .map(|p| text(p)?.parse::<NodePerm>().map_err(|_| Errno::EINVAL))
                .collect::<Result<Vec<_>, _>>()?;
            Request::SetPerms(text(path)?, perms)
        }
        MsgType::Watch | MsgType::Unwatch => {
            let parts = split_nul_terminated(payload).ok_or(Errno::EINVAL)?;
            let [path, token] = parts.as_slice() else {
                return Err(Errno::EINVAL);
            };
            let (path, token) = (text(path)?, token.to_vec());
            if t == MsgType::Watch {
                Request::Watch(path, token)
            } else {
                Request::Unwatch(path, token)
            }
        }
        MsgType::TransactionStart => {
            if payload.is_empty() || payload == b"\0" {
                Request::TransactionStart
            } else {
                return Err(Errno::EINVAL);
            }
        }
        MsgType::TransactionEnd => match payload {
            b"T\0" => Request::TransactionEnd(true),
            b"F\0" => Request::TransactionEnd(false),
            _ => return Err(Errno::EINVAL),
        },
        MsgType::GetDomainPath => Request::GetDomainPath(domid_arg(payload)?),
        MsgType::IsDomainIntroduced => Request::IsDomainIntroduced(domid_arg(payload)?),
        MsgType::ResetWatches => Request::ResetWatches,
        MsgType::WatchEvent | MsgType::Error | MsgType::Invalid => return Err(Errno::EINVAL),
        other => Request::Unsupported(other),
    })
}

/// The domain's home: `/local/domain/<dom>`.
pub(crate) fn domain_path(dom: DomId) -> String {
    format!("/local/domain/{dom}")
}

fn valid_chars(p: &str) -> bool {
    p.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@'))
}

/// Resolve a request path for domain `dom` and check its syntax: relative
/// paths go under `/local/domain/<dom>/`; characters `[A-Za-z0-9-/_@]`; no
/// `//`; no trailing `/` (except `/` itself); at most 2048 bytes relative,
/// 3072 absolute.
pub(crate) fn resolve_path(dom: DomId, raw: &str) -> Result<String, Errno> {
    let full = if raw.starts_with('/') {
        raw.to_owned()
    } else {
        if raw.is_empty() || raw.len() > REL_PATH_MAX {
            return Err(Errno::EINVAL);
        }
        format!("{}/{raw}", domain_path(dom))
    };
    let ok = full.len() <= ABS_PATH_MAX
        && valid_chars(&full)
        && !full.contains("//")
        && (full == "/" || !full.ends_with('/'));
    if ok { Ok(full) } else { Err(Errno::EINVAL) }
}

fn is_special(p: &str) -> bool {
    p.starts_with('@')
}

/// One registered watch.
#[derive(Debug, Clone)]
struct Watch {
    /// Absolute, or the special path.
    path: String,
    token: Vec<u8>,
    /// Strip this prefix from event paths (relative watches).
    strip: Option<String>,
}

/// A transaction in progress.
#[derive(Debug)]
struct Tx {
    store: Store,
    changes: Vec<Change>,
}

/// Where a connection's outgoing messages go: a bounded queue drained by
/// the connection's writer thread. A full queue means the peer stopped
/// reading; the connection is then dropped.
#[derive(Debug)]
pub(crate) struct Outbox {
    sender: SyncSender<Vec<u8>>,
    stream: Option<UnixStream>,
}

impl Outbox {
    pub(crate) fn new(sender: SyncSender<Vec<u8>>, stream: Option<UnixStream>) -> Outbox {
        Outbox { sender, stream }
    }

    fn push(&self, msg: &Message) {
        if self.sender.try_send(msg.to_bytes()).is_err() {
            self.kill();
        }
    }

    /// Close the connection (its reader thread then cleans up).
    pub(crate) fn kill(&self) {
        if let Some(s) = &self.stream {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Per-connection state.
#[derive(Debug)]
struct ConnState {
    dom: DomId,
    watches: Vec<Watch>,
    txs: HashMap<u32, Tx>,
    out: Outbox,
}

/// Connection id (server-internal).
pub(crate) type ConnId = u64;

/// The whole server state behind one lock.
#[derive(Debug)]
pub(crate) struct State {
    store: Store,
    conns: HashMap<ConnId, ConnState>,
    domains: BTreeSet<DomId>,
    next_tx: u32,
    config: Config,
}

type Reply = Result<(MsgType, Vec<u8>), Errno>;

fn ok() -> Vec<u8> {
    b"OK\0".to_vec()
}

impl State {
    pub(crate) fn new(config: Config) -> State {
        let mut store = Store::new();
        for p in ["/local", "/local/domain"] {
            store.force_write(p, b"", vec![NodePerm::new(0, Perm::None)]);
        }
        State {
            store,
            conns: HashMap::new(),
            domains: BTreeSet::new(),
            next_tx: 1,
            config,
        }
    }

    pub(crate) fn is_served(&self, dom: DomId) -> bool {
        self.domains.contains(&dom)
    }

    pub(crate) fn add_conn(&mut self, id: ConnId, dom: DomId, out: Outbox) {
        self.conns.insert(
            id,
            ConnState {
                dom,
                watches: Vec::new(),
                txs: HashMap::new(),
                out,
            },
        );
    }

    /// Forget a connection: its watches and transactions go with it.
    pub(crate) fn remove_conn(&mut self, id: ConnId) {
        if let Some(c) = self.conns.remove(&id) {
            c.out.kill();
        }
    }

    /// Close every connection.
    pub(crate) fn kill_all(&mut self) {
        for (_, c) in self.conns.drain() {
            c.out.kill();
        }
    }

    /// The toolstack's part of creating a domain (like libxl):
    /// `/local/domain/<d>` (`n0 r<d>`), `domid`, `name` (inherited), and
    /// `data` owned by `<d>` with default `n`; then `@introduceDomain`.
    pub(crate) fn add_domain(&mut self, dom: DomId) {
        self.domains.insert(dom);
        let home = domain_path(dom);
        let mut home_perms = vec![NodePerm::new(0, Perm::None)];
        if dom != 0 {
            home_perms.push(NodePerm::new(dom, Perm::Read));
        }
        let name = if dom == 0 {
            "Domain-0".to_owned()
        } else {
            format!("dom{dom}")
        };
        let data_perms = vec![NodePerm::new(dom, Perm::None)];
        let mut changes = Vec::new();
        for (path, value, perms) in [
            (home.clone(), Vec::new(), home_perms.clone()),
            (
                format!("{home}/domid"),
                dom.to_string().into_bytes(),
                home_perms.clone(),
            ),
            (format!("{home}/name"), name.into_bytes(), home_perms),
            (format!("{home}/data"), Vec::new(), data_perms),
        ] {
            self.store.force_write(&path, &value, perms.clone());
            changes.push(Change {
                path,
                exact: false,
                perms,
                old_perms: None,
            });
        }
        changes.push(special_change("@introduceDomain"));
        for c in &changes {
            self.fire(c);
        }
    }

    /// Release a domain: close its connections, remove its home, fire
    /// `@releaseDomain`.
    pub(crate) fn remove_domain(&mut self, dom: DomId) {
        self.domains.remove(&dom);
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.dom == dom)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.remove_conn(id);
        }
        let m = self.config.missing_node;
        if let Ok(changes) = self.store.rm(Caller { dom: 0 }, &domain_path(dom), m) {
            for c in &changes {
                self.fire(c);
            }
        }
        self.fire(&special_change("@releaseDomain"));
    }

    /// Handle one request from connection `id`: reply, then watch events.
    pub(crate) fn handle(&mut self, id: ConnId, msg: &Message) {
        let Some(dom) = self.conns.get(&id).map(|c| c.dom) else {
            return;
        };
        let h = msg.header;
        let mut fired = Vec::new();
        let mut initial = None;
        let reply = self.execute(id, dom, &h, &msg.payload, &mut fired, &mut initial);
        let (ty, payload) = match reply {
            Ok((ty, p)) if p.len() <= PAYLOAD_MAX => (ty, p),
            Ok(_) => (MsgType::Error, nul_terminated(&[b"E2BIG"])),
            Err(e) => (MsgType::Error, nul_terminated(&[e.name().as_bytes()])),
        };
        if let (Some(c), Ok(m)) = (
            self.conns.get(&id),
            Message::new(ty, h.req_id, h.tx_id, payload),
        ) {
            match initial {
                Some(ev) if self.config.watch_event_first => {
                    c.out.push(&ev);
                    c.out.push(&m);
                }
                Some(ev) => {
                    c.out.push(&m);
                    c.out.push(&ev);
                }
                None => c.out.push(&m),
            }
        }
        for c in &fired {
            self.fire(c);
        }
    }

    fn execute(
        &mut self,
        id: ConnId,
        dom: DomId,
        h: &Header,
        payload: &[u8],
        fired: &mut Vec<Change>,
        initial: &mut Option<Message>,
    ) -> Reply {
        let req = parse_request(h.ty, payload)?;
        let caller = Caller { dom };
        let m = self.config.missing_node;
        let limits = self.config.limits.clone();
        // Quotas count per domain (see `Limits`) and spare dom0, as C
        // xenstored's `domain_is_unprivileged` checks do.
        let (dom_txs, dom_watches) = if caller.privileged() {
            (0, 0)
        } else {
            self.conns
                .values()
                .filter(|c| c.dom == dom)
                .fold((0, 0), |(t, w), c| (t + c.txs.len(), w + c.watches.len()))
        };
        let conn = self.conns.get_mut(&id).ok_or(Errno::EINVAL)?;
        let ty = MsgType::from_u32(h.ty).ok_or(Errno::EINVAL)?;

        // Transaction bookkeeping first.
        match req {
            Request::TransactionStart => {
                if h.tx_id != 0 {
                    return Err(Errno::EBUSY);
                }
                // C: `transaction_started > quota_max_transaction`.
                if dom_txs > limits.max_transactions {
                    return Err(Errno::ENOSPC);
                }
                let mut tx_id = self.next_tx;
                while tx_id == 0 || conn.txs.contains_key(&tx_id) {
                    tx_id = tx_id.wrapping_add(1);
                }
                self.next_tx = tx_id.wrapping_add(1);
                conn.txs.insert(
                    tx_id,
                    Tx {
                        store: self.store.begin(),
                        changes: Vec::new(),
                    },
                );
                return Ok((ty, nul_terminated(&[tx_id.to_string().as_bytes()])));
            }
            Request::TransactionEnd(commit) => {
                let tx = conn.txs.remove(&h.tx_id).ok_or(Errno::ENOENT)?;
                if commit {
                    self.store.commit(tx.store)?;
                    // Watches see the committed perms of nodes that still exist.
                    let mut seen = BTreeSet::new();
                    for mut c in tx.changes {
                        if !seen.insert((c.path.clone(), c.exact)) {
                            continue;
                        }
                        if let Some(p) = self.store.perms_of(&c.path) {
                            c.perms = p.to_vec();
                        }
                        fired.push(c);
                    }
                }
                return Ok((ty, ok()));
            }
            _ => {}
        }
        if h.tx_id != 0 && !conn.txs.contains_key(&h.tx_id) {
            return Err(Errno::ENOENT);
        }

        // Requests that do not touch the tree.
        match &req {
            Request::Watch(raw, token) => {
                let (path, strip) = watch_path(dom, raw)?;
                if conn
                    .watches
                    .iter()
                    .any(|w| w.path == path && w.token == *token)
                {
                    return Err(Errno::EEXIST);
                }
                // C: `domain_watch(conn) > quota_nb_watch_per_domain`.
                if dom_watches > limits.max_watches {
                    return Err(Errno::E2BIG);
                }
                conn.watches.push(Watch {
                    path,
                    token: token.clone(),
                    strip,
                });
                *initial = event_message(raw, token);
                return Ok((ty, ok()));
            }
            Request::Unwatch(raw, token) => {
                let (path, _) = watch_path(dom, raw)?;
                let before = conn.watches.len();
                conn.watches
                    .retain(|w| !(w.path == path && w.token == *token));
                return if conn.watches.len() < before {
                    Ok((ty, ok()))
                } else {
                    Err(Errno::ENOENT)
                };
            }
            Request::ResetWatches => {
                conn.watches.clear();
                conn.txs.clear();
                return Ok((ty, ok()));
            }
            Request::GetDomainPath(d) => {
                return Ok((ty, nul_terminated(&[domain_path(*d).as_bytes()])));
            }
            Request::IsDomainIntroduced(d) => {
                let yes = self.domains.contains(d);
                return Ok((
                    ty,
                    if yes {
                        b"T\0".to_vec()
                    } else {
                        b"F\0".to_vec()
                    },
                ));
            }
            Request::Unsupported(_) => return Err(Errno::ENOSYS),
            _ => {}
        }

        // Tree requests, on the live tree or the transaction's snapshot.
        let (store, tx_changes) = if h.tx_id == 0 {
            (&mut self.store, None)
        } else {
            let tx = conn.txs.get_mut(&h.tx_id).ok_or(Errno::ENOENT)?;
            (&mut tx.store, Some(&mut tx.changes))
        };
        let mut changes = Vec::new();
        let payload = match req {
            Request::Read(p) => store.read(caller, &resolve_path(dom, &p)?, m)?,
            Request::Directory(p) => {
                let names = store.directory(caller, &resolve_path(dom, &p)?, m)?;
                let refs: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
                nul_terminated(&refs)
            }
            Request::GetPerms(p) => {
                let perms = store.get_perms(caller, &resolve_path(dom, &p)?, m)?;
                let strs: Vec<String> = perms.iter().map(NodePerm::to_string).collect();
                let refs: Vec<&[u8]> = strs.iter().map(|s| s.as_bytes()).collect();
                nul_terminated(&refs)
            }
            Request::Write(p, v) => {
                changes.push(store.write(caller, &resolve_path(dom, &p)?, &v, m, &limits)?);
                ok()
            }
            Request::Mkdir(p) => {
                changes.extend(store.mkdir(caller, &resolve_path(dom, &p)?, m, &limits)?);
                ok()
            }
            Request::Rm(p) => {
                changes.extend(store.rm(caller, &resolve_path(dom, &p)?, m)?);
                ok()
            }
            Request::SetPerms(p, perms) => {
                changes.push(store.set_perms(
                    caller,
                    &resolve_path(dom, &p)?,
                    perms,
                    m,
                    &limits,
                )?);
                ok()
            }
            _ => return Err(Errno::EINVAL),
        };
        match tx_changes {
            Some(list) => list.extend(changes),
            None => fired.extend(changes),
        }
        Ok((ty, payload))
    }

    /// Deliver a change to every matching watch whose connection may read
    /// the node (special paths: to every watcher of that path).
    fn fire(&self, change: &Change) {
        for c in self.conns.values() {
            let caller = Caller { dom: c.dom };
            let readable = || {
                perm_for(caller, &change.perms).read
                    || change
                        .old_perms
                        .as_ref()
                        .is_some_and(|p| perm_for(caller, p).read)
            };
            for w in &c.watches {
                let hit = if is_special(&w.path) || is_special(&change.path) || change.exact {
                    w.path == change.path
                } else {
                    is_at_or_below(&change.path, &w.path)
                };
                if !hit || (!is_special(&change.path) && !readable()) {
                    continue;
                }
                let shown = match &w.strip {
                    Some(prefix) => change
                        .path
                        .strip_prefix(prefix.as_str())
                        .unwrap_or(&change.path),
                    None => change.path.as_str(),
                };
                if let Some(m) = event_message(shown, &w.token) {
                    c.out.push(&m);
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }
}

/// Resolve a watch path: special paths stay as they are; relative ones are
/// reported relative (the domain prefix is stripped from events).
fn watch_path(dom: DomId, raw: &str) -> Result<(String, Option<String>), Errno> {
    if is_special(raw) {
        if raw.len() > ABS_PATH_MAX || !valid_chars(raw) || raw.len() < 2 {
            return Err(Errno::EINVAL);
        }
        return Ok((raw.to_owned(), None));
    }
    let full = resolve_path(dom, raw)?;
    let strip = (!raw.starts_with('/')).then(|| format!("{}/", domain_path(dom)));
    Ok((full, strip))
}

fn special_change(path: &str) -> Change {
    Change {
        path: path.to_owned(),
        exact: true,
        perms: Vec::new(),
        old_perms: None,
    }
}

/// A WATCH_EVENT (req_id = tx_id = 0); `None` if it would exceed the
/// payload limit.
fn event_message(path: &str, token: &[u8]) -> Option<Message> {
    Message::new(
        MsgType::WatchEvent,
        0,
        0,
        nul_terminated(&[path.as_bytes(), token]),
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{Receiver, sync_channel};

    fn conn(st: &mut State, id: ConnId, dom: DomId) -> Receiver<Vec<u8>> {
        let (tx, rx) = sync_channel(64);
        st.add_conn(id, dom, Outbox::new(tx, None));
        rx
    }

    fn req(st: &mut State, id: ConnId, ty: MsgType, tx_id: u32, payload: &[u8]) {
        let m = Message::new(ty, 9, tx_id, payload.to_vec()).unwrap();
        st.handle(id, &m);
    }

    fn drain(rx: &Receiver<Vec<u8>>) -> Vec<(u32, u32, u32, Vec<u8>)> {
        rx.try_iter()
            .map(|b| {
                let h = Header::from_bytes(b[..16].try_into().unwrap());
                (h.ty, h.req_id, h.tx_id, b[16..].to_vec())
            })
            .collect()
    }

    #[test]
    fn path_resolution() {
        assert_eq!(resolve_path(5, "data/x").unwrap(), "/local/domain/5/data/x");
        assert_eq!(resolve_path(5, "/").unwrap(), "/");
        assert_eq!(resolve_path(5, "/a-b_c@d").unwrap(), "/a-b_c@d");
        for bad in ["", "/a/", "/a//b", "a b", "/a.b", "data/", "/ä"] {
            assert_eq!(resolve_path(5, bad), Err(Errno::EINVAL), "{bad:?}");
        }
        assert!(resolve_path(5, &"a".repeat(2048)).is_ok());
        assert!(resolve_path(5, &"a".repeat(2049)).is_err());
        assert!(resolve_path(5, &format!("/{}", "a".repeat(3071))).is_ok());
        assert!(resolve_path(5, &format!("/{}", "a".repeat(3072))).is_err());
    }

    #[test]
    fn request_parsing() {
        use MsgType as T;
        let p = |t: T, b: &[u8]| parse_request(t as u32, b);
        assert_eq!(p(T::Read, b"x\0"), Ok(Request::Read("x".into())));
        assert_eq!(p(T::Read, b"x"), Err(Errno::EINVAL));
        assert_eq!(p(T::Read, b""), Err(Errno::EINVAL));
        assert_eq!(p(T::Write, b"x\0"), Ok(Request::Write("x".into(), vec![])));
        assert_eq!(p(T::Write, b"x"), Err(Errno::EINVAL));
        assert_eq!(
            p(T::SetPerms, b"x\0n1\0r2\0"),
            Ok(Request::SetPerms(
                "x".into(),
                vec!["n1".parse().unwrap(), "r2".parse().unwrap()]
            ))
        );
        assert_eq!(p(T::SetPerms, b"x\0"), Err(Errno::EINVAL));
        assert_eq!(p(T::SetPerms, b"x\0q1\0"), Err(Errno::EINVAL));
        assert_eq!(
            p(T::Watch, b"x\0t\0"),
            Ok(Request::Watch("x".into(), b"t".to_vec()))
        );
        assert_eq!(p(T::Watch, b"x\0t\0u\0"), Err(Errno::EINVAL));
        assert_eq!(
            p(T::TransactionEnd, b"T\0"),
            Ok(Request::TransactionEnd(true))
        );
        assert_eq!(p(T::TransactionEnd, b"X\0"), Err(Errno::EINVAL));
        assert_eq!(p(T::GetDomainPath, b"7\0"), Ok(Request::GetDomainPath(7)));
        assert_eq!(p(T::GetDomainPath, b"-7\0"), Err(Errno::EINVAL));
        assert_eq!(p(T::Introduce, b""), Ok(Request::Unsupported(T::Introduce)));
        assert_eq!(parse_request(20, b""), Err(Errno::EINVAL));
        assert_eq!(p(T::WatchEvent, b"a\0b\0"), Err(Errno::EINVAL));
    }

    #[test]
    fn replies_echo_ids_and_errors_are_names() {
        let mut st = State::new(Config::default());
        st.add_domain(1);
        let rx = conn(&mut st, 1, 1);
        req(&mut st, 1, MsgType::Read, 0, b"domid\0");
        req(&mut st, 1, MsgType::Read, 0, b"nope\0");
        req(&mut st, 1, MsgType::Read, 77, b"domid\0");
        req(&mut st, 1, MsgType::Write, 0, b"/local/domain/1/x\0v");
        assert_eq!(
            drain(&rx),
            [
                (MsgType::Read as u32, 9, 0, b"1".to_vec()),
                (MsgType::Error as u32, 9, 0, b"ENOENT\0".to_vec()),
                (MsgType::Error as u32, 9, 77, b"ENOENT\0".to_vec()),
                (MsgType::Error as u32, 9, 0, b"EACCES\0".to_vec()),
            ]
        );
    }

    #[test]
    fn limits_on_watches_and_transactions() {
        let mut cfg = Config::default();
        cfg.limits.max_watches = 2;
        cfg.limits.max_transactions = 1;
        let mut st = State::new(cfg);
        st.add_domain(1);
        let rx = conn(&mut st, 1, 1);
        // C compares with `>`: quota + 1 watches and transactions fit.
        for tok in [&b"a\0"[..], b"b\0", b"c\0", b"d\0"] {
            let mut p = b"data\0".to_vec();
            p.extend_from_slice(tok);
            req(&mut st, 1, MsgType::Watch, 0, &p);
        }
        req(&mut st, 1, MsgType::Watch, 0, b"data\0a\0");
        req(&mut st, 1, MsgType::TransactionStart, 0, b"\0");
        req(&mut st, 1, MsgType::TransactionStart, 0, b"\0");
        req(&mut st, 1, MsgType::TransactionStart, 0, b"\0");
        req(&mut st, 1, MsgType::TransactionStart, 5, b"\0");
        let got: Vec<_> = drain(&rx)
            .into_iter()
            .filter(|m| m.0 != MsgType::WatchEvent as u32)
            .map(|m| m.3)
            .collect();
        assert_eq!(
            got,
            [
                b"OK\0".to_vec(),
                b"OK\0".to_vec(),
                b"OK\0".to_vec(),
                b"E2BIG\0".to_vec(),
                b"EEXIST\0".to_vec(),
                b"1\0".to_vec(),
                b"2\0".to_vec(),
                b"ENOSPC\0".to_vec(),
                b"EBUSY\0".to_vec(),
            ]
        );
    }

    /// A watch's registration event comes after the WATCH reply (xenstored's
    /// socket), or before it when configured (a Linux domU's xenbus device
    /// may deliver that order).
    #[test]
    fn registration_event_order() {
        for first in [false, true] {
            let mut st = State::new(Config {
                watch_event_first: first,
                ..Config::default()
            });
            st.add_domain(1);
            let rx = conn(&mut st, 1, 1);
            req(&mut st, 1, MsgType::Watch, 0, b"data\0tok\0");
            let types: Vec<u32> = drain(&rx).into_iter().map(|m| m.0).collect();
            let (ev, watch) = (MsgType::WatchEvent as u32, MsgType::Watch as u32);
            let want = if first { [ev, watch] } else { [watch, ev] };
            assert_eq!(types, want, "event first: {first}");
        }
    }

    /// A domU's processes share its one xenbus connection on Xen, so the
    /// quotas count every connection of the domain together; dom0 has none.
    #[test]
    fn quotas_count_per_domain_and_spare_dom0() {
        let mut cfg = Config::default();
        cfg.limits.max_watches = 1;
        cfg.limits.max_transactions = 1;
        let mut st = State::new(cfg);
        st.add_domain(0);
        st.add_domain(1);
        st.add_domain(2);
        let a = conn(&mut st, 1, 1);
        let b = conn(&mut st, 2, 1);
        let other = conn(&mut st, 3, 2);
        let d0 = conn(&mut st, 4, 0);
        let replies = |rx: &Receiver<Vec<u8>>| -> Vec<Vec<u8>> {
            drain(rx)
                .into_iter()
                .filter(|m| m.0 != MsgType::WatchEvent as u32)
                .map(|m| m.3)
                .collect()
        };
        req(&mut st, 1, MsgType::TransactionStart, 0, b"\0");
        req(&mut st, 1, MsgType::Watch, 0, b"data\0a\0");
        req(&mut st, 2, MsgType::TransactionStart, 0, b"\0");
        req(&mut st, 2, MsgType::Watch, 0, b"data\0b\0");
        // Domain 1 is at its quota + 1 now, across two connections.
        req(&mut st, 2, MsgType::TransactionStart, 0, b"\0");
        req(&mut st, 2, MsgType::Watch, 0, b"data\0c\0");
        assert_eq!(replies(&a), [b"1\0".to_vec(), b"OK\0".to_vec()]);
        assert_eq!(
            replies(&b),
            [
                b"2\0".to_vec(),
                b"OK\0".to_vec(),
                b"ENOSPC\0".to_vec(),
                b"E2BIG\0".to_vec()
            ]
        );
        // Another domain has its own quota; dom0 has none.
        req(&mut st, 3, MsgType::TransactionStart, 0, b"\0");
        assert_eq!(replies(&other), [b"3\0".to_vec()]);
        for i in 0..5 {
            req(&mut st, 4, MsgType::TransactionStart, 0, b"\0");
            req(
                &mut st,
                4,
                MsgType::Watch,
                0,
                format!("/x\0t{i}\0").as_bytes(),
            );
        }
        assert!(replies(&d0).iter().all(|r| !r.starts_with(b"E")));
        // Ending a transaction of one connection frees the quota for both.
        req(&mut st, 1, MsgType::TransactionEnd, 1, b"F\0");
        req(&mut st, 2, MsgType::TransactionStart, 0, b"\0");
        assert_eq!(replies(&a), [b"OK\0".to_vec()]);
        assert!(!replies(&b)[0].starts_with(b"E"));
    }

    #[test]
    fn directory_reply_over_limit_is_e2big() {
        let mut st = State::new(Config::default());
        st.add_domain(0);
        let rx = conn(&mut st, 1, 0);
        for i in 0..300 {
            let p = format!("/big/child-number-{i:04}\0");
            req(&mut st, 1, MsgType::Mkdir, 0, p.as_bytes());
        }
        drain(&rx);
        req(&mut st, 1, MsgType::Directory, 0, b"/big\0");
        assert_eq!(drain(&rx)[0].3, b"E2BIG\0");
        assert!(st.store().node_count() > 300);
    }
}
