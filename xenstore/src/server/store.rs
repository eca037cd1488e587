// Why this file is long (~820 lines): the last ~265 are unit tests of the
// tree, permissions and transaction conflicts.
//! The in-memory tree with permissions (docs/vchan.md §8.2) and transaction
//! snapshots.
//!
//! A transaction works on a full copy of the tree (`Store::begin`) that logs
//! the generation of every node it looked at (absent nodes included) and
//! the paths it changed. Commit fails with `EAGAIN` if any logged node's
//! generation differs in the live tree, else copies the changed nodes over.

use std::collections::{HashMap, HashSet};

use crate::error::Errno;
use crate::perms::{DomId, NodePerm, Perm};

use super::{Limits, MissingNodeError};

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caller {
    pub dom: DomId,
}

impl Caller {
    pub fn privileged(self) -> bool {
        self.dom == 0
    }
}

/// The access a caller has to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    pub read: bool,
    pub write: bool,
    pub owner: bool,
}

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    Read,
    Write,
}

impl Access {
    fn allows(self, need: Need) -> bool {
        match need {
            Need::Read => self.read,
            Need::Write => self.write,
        }
    }
}

/// As C xenstored's `perm_for_conn`: dom0 and the owner have full access;
/// otherwise the entry naming the caller, else the owner entry's letter.
pub(crate) fn perm_for(caller: Caller, perms: &[NodePerm]) -> Access {
    let full = Access {
        read: true,
        write: true,
        owner: true,
    };
    let Some(first) = perms.first() else {
        return if caller.privileged() {
            full
        } else {
            Access {
                read: false,
                write: false,
                owner: false,
            }
        };
    };
    if caller.privileged() || first.dom == caller.dom {
        return full;
    }
    let p = perms[1..]
        .iter()
        .find(|p| p.dom == caller.dom)
        .map_or(first.perm, |p| p.perm);
    Access {
        read: p.can_read(),
        write: p.can_write(),
        owner: false,
    }
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub value: Vec<u8>,
    pub perms: Vec<NodePerm>,
    /// Child names in creation order (as C xenstored lists them).
    pub children: Vec<String>,
    /// Changes whenever the node changes; never reused.
    pub generation: u64,
}

/// A change for watches: the path, whether only exact watches match, and
/// the permission lists that decide who may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub path: String,
    pub exact: bool,
    pub perms: Vec<NodePerm>,
    pub old_perms: Option<Vec<NodePerm>>,
}

#[derive(Debug, Clone, Default)]
struct TxLog {
    /// Generation (None = absent) at the first look, per path.
    accessed: HashMap<String, Option<u64>>,
    modified: Vec<String>,
    modified_set: HashSet<String>,
}

/// The tree.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    nodes: HashMap<String, Node>,
    /// Nodes owned per domain (first permission entry).
    owned: HashMap<DomId, usize>,
    next_generation: u64,
    log: Option<TxLog>,
}

/// `/a/b` → `/a`, `/a` → `/`, `/` → None.
pub(crate) fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

fn basename(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Is `path` at or below `dir`?
pub(crate) fn is_at_or_below(path: &str, dir: &str) -> bool {
    dir == "/"
        || path == dir
        || (path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/')
}

impl Store {
    /// A tree with `/` (perms `n0`).
    pub fn new() -> Store {
        let mut s = Store {
            nodes: HashMap::new(),
            owned: HashMap::new(),
            next_generation: 0,
            log: None,
        };
        s.put(
            "/".into(),
            Node {
                value: Vec::new(),
                perms: vec![NodePerm::new(0, Perm::None)],
                children: Vec::new(),
                generation: 0,
            },
        );
        s
    }

    /// A transaction snapshot.
    pub fn begin(&self) -> Store {
        let mut s = self.clone();
        s.log = Some(TxLog::default());
        s
    }

    #[cfg(test)]
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn note_access(&mut self, path: &str) {
        if let Some(log) = &mut self.log
            && !log.accessed.contains_key(path)
        {
            let g = self.nodes.get(path).map(|n| n.generation);
            log.accessed.insert(path.to_owned(), g);
        }
    }

    fn note_modified(&mut self, path: &str) {
        self.note_access(path);
        if let Some(log) = &mut self.log
            && log.modified_set.insert(path.to_owned())
        {
            log.modified.push(path.to_owned());
        }
    }

    fn get(&mut self, path: &str) -> Option<&Node> {
        self.note_access(path);
        self.nodes.get(path)
    }

    fn exists(&mut self, path: &str) -> bool {
        self.get(path).is_some()
    }

    fn bump(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Insert or replace a node, keeping owner counts.
    fn put(&mut self, path: String, mut node: Node) {
        self.note_modified(&path);
        node.generation = self.bump();
        if let Some(owner) = node.perms.first() {
            *self.owned.entry(owner.dom).or_default() += 1;
        }
        if let Some(old) = self.nodes.insert(path, node) {
            self.disown(&old);
        }
    }

    fn disown(&mut self, old: &Node) {
        if let Some(owner) = old.perms.first()
            && let Some(c) = self.owned.get_mut(&owner.dom)
        {
            *c = c.saturating_sub(1);
        }
    }

    fn take(&mut self, path: &str) -> Option<Node> {
        self.note_modified(path);
        let old = self.nodes.remove(path)?;
        self.disown(&old);
        Some(old)
    }

    /// Change a node in place (not its owner).
    fn modify(&mut self, path: &str, f: impl FnOnce(&mut Node)) {
        self.note_modified(path);
        let g = self.bump();
        if let Some(n) = self.nodes.get_mut(path) {
            f(n);
            n.generation = g;
        }
    }

    /// The node if it exists and the caller has `need` on it; else `EACCES`
    /// (exists, no access) or, for a missing node, per `missing`:
    /// C xenstored's rule (`ENOENT` only if the caller has `need` on the
    /// nearest existing ancestor, else `EACCES`) or oxenstored's (`ENOENT`).
    fn check(
        &mut self,
        c: Caller,
        path: &str,
        need: Need,
        missing: MissingNodeError,
    ) -> Result<&Node, Errno> {
        if self.exists(path) {
            let node = self.nodes.get(path).ok_or(Errno::ENOENT)?;
            return if perm_for(c, &node.perms).allows(need) {
                Ok(node)
            } else {
                Err(Errno::EACCES)
            };
        }
        match missing {
            MissingNodeError::Enoent => Err(Errno::ENOENT),
            MissingNodeError::Eacces => {
                let anc = self.nearest_existing_ancestor(path);
                let perms = self.get(&anc).map(|n| n.perms.clone()).unwrap_or_default();
                if perm_for(c, &perms).allows(need) {
                    Err(Errno::ENOENT)
                } else {
                    Err(Errno::EACCES)
                }
            }
        }
    }

    fn nearest_existing_ancestor(&mut self, path: &str) -> String {
        let mut p = parent(path);
        while let Some(q) = p {
            if self.exists(q) {
                return q.to_owned();
            }
            p = parent(q);
        }
        "/".to_owned()
    }

    /// Read a node's perms without permission checks (for watch filtering).
    pub fn perms_of(&self, path: &str) -> Option<&[NodePerm]> {
        self.nodes.get(path).map(|n| n.perms.as_slice())
    }

    pub fn read(&mut self, c: Caller, path: &str, m: MissingNodeError) -> Result<Vec<u8>, Errno> {
        Ok(self.check(c, path, Need::Read, m)?.value.clone())
    }

    pub fn directory(
        &mut self,
        c: Caller,
        path: &str,
        m: MissingNodeError,
    ) -> Result<Vec<String>, Errno> {
        Ok(self.check(c, path, Need::Read, m)?.children.clone())
    }

    pub fn get_perms(
        &mut self,
        c: Caller,
        path: &str,
        m: MissingNodeError,
    ) -> Result<Vec<NodePerm>, Errno> {
        Ok(self.check(c, path, Need::Read, m)?.perms.clone())
    }

    /// WRITE: overwrite (needs write on the node) or create.
    pub fn write(
        &mut self,
        c: Caller,
        path: &str,
        value: &[u8],
        m: MissingNodeError,
        limits: &Limits,
    ) -> Result<Change, Errno> {
        if !c.privileged() && value.len() > limits.max_value_len {
            return Err(Errno::ENOSPC);
        }
        match self.check(c, path, Need::Write, m) {
            Ok(node) => {
                let perms = node.perms.clone();
                self.modify(path, |n| n.value = value.to_vec());
                Ok(Change {
                    path: path.to_owned(),
                    exact: false,
                    perms,
                    old_perms: None,
                })
            }
            Err(Errno::ENOENT) => self.create(c, path, value, limits),
            Err(e) => Err(e),
        }
    }

    /// MKDIR: nothing if the node exists (and the caller may write it),
    /// else create it empty.
    pub fn mkdir(
        &mut self,
        c: Caller,
        path: &str,
        m: MissingNodeError,
        limits: &Limits,
    ) -> Result<Option<Change>, Errno> {
        match self.check(c, path, Need::Write, m) {
            Ok(_) => Ok(None),
            Err(Errno::ENOENT) => self.create(c, path, b"", limits).map(Some),
            Err(e) => Err(e),
        }
    }

    /// Create `path` and any missing ancestors. Needs write access on the
    /// nearest existing ancestor. Each new node inherits its parent's
    /// permission list; a domain other than dom0 becomes the owner (first
    /// entry), dom0 keeps the parent's owner (C xenstored `construct_node`).
    fn create(
        &mut self,
        c: Caller,
        path: &str,
        value: &[u8],
        limits: &Limits,
    ) -> Result<Change, Errno> {
        let mut missing = vec![path.to_owned()];
        let mut anc = parent(path);
        while let Some(a) = anc {
            if self.exists(a) {
                break;
            }
            missing.push(a.to_owned());
            anc = parent(a);
        }
        let anc = anc.unwrap_or("/").to_owned();
        let mut parent_perms = self.get(&anc).map(|n| n.perms.clone()).unwrap_or_default();
        if !perm_for(c, &parent_perms).write {
            return Err(Errno::EACCES);
        }
        if !c.privileged() {
            let owned = self.owned.get(&c.dom).copied().unwrap_or(0);
            if owned + missing.len() > limits.max_nodes_per_domain {
                return Err(Errno::ENOSPC);
            }
        }
        if self.nodes.len() + missing.len() > limits.max_nodes {
            return Err(Errno::ENOSPC);
        }
        let mut parent_path = anc;
        for p in missing.iter().rev() {
            let mut perms = parent_perms.clone();
            if !c.privileged()
                && let Some(first) = perms.first_mut()
            {
                first.dom = c.dom;
            }
            let name = basename(p).to_owned();
            self.modify(&parent_path, |n| n.children.push(name));
            let v = if p == path {
                value.to_vec()
            } else {
                Vec::new()
            };
            self.put(
                p.clone(),
                Node {
                    value: v,
                    perms: perms.clone(),
                    children: Vec::new(),
                    generation: 0,
                },
            );
            parent_perms = perms;
            parent_path = p.clone();
        }
        Ok(Change {
            path: path.to_owned(),
            exact: false,
            perms: parent_perms,
            old_perms: None,
        })
    }

    /// RM: remove the node and its subtree (needs write on the node). A
    /// missing node whose parent exists is fine (no change).
    pub fn rm(&mut self, c: Caller, path: &str, m: MissingNodeError) -> Result<Vec<Change>, Errno> {
        let Some(par) = parent(path).map(str::to_owned) else {
            return Err(Errno::EINVAL); // "/"
        };
        match self.check(c, path, Need::Write, m) {
            Ok(_) => {}
            Err(Errno::ENOENT) => {
                return if self.exists(&par) {
                    Ok(Vec::new())
                } else {
                    Err(Errno::ENOENT)
                };
            }
            Err(e) => return Err(e),
        }
        // Depth-first list of the subtree, top first.
        let mut order = Vec::new();
        let mut stack = vec![path.to_owned()];
        while let Some(p) = stack.pop() {
            let children = self.get(&p).map(|n| n.children.clone()).unwrap_or_default();
            stack.extend(children.iter().map(|ch| join(&p, ch)));
            order.push(p);
        }
        let mut changes = Vec::new();
        for p in &order {
            if let Some(old) = self.take(p) {
                changes.push(Change {
                    exact: p != path,
                    path: p.clone(),
                    perms: old.perms,
                    old_perms: None,
                });
            }
        }
        let name = basename(path).to_owned();
        self.modify(&par, |n| n.children.retain(|ch| *ch != name));
        // the removed node itself first, as it is what the caller asked for
        Ok(changes)
    }

    /// SET_PERMS: only the owner or dom0; a domain cannot change the owner.
    pub fn set_perms(
        &mut self,
        c: Caller,
        path: &str,
        perms: Vec<NodePerm>,
        m: MissingNodeError,
        limits: &Limits,
    ) -> Result<Change, Errno> {
        if perms.is_empty() {
            return Err(Errno::EINVAL);
        }
        if !c.privileged() && perms.len() > limits.max_perms_per_node {
            return Err(Errno::ENOSPC);
        }
        let node = self.check(c, path, Need::Write, m)?;
        if !perm_for(c, &node.perms).owner {
            return Err(Errno::EACCES);
        }
        let old = node.clone();
        if !c.privileged() && old.perms.first().map(|p| p.dom) != Some(perms[0].dom) {
            return Err(Errno::EPERM);
        }
        let old_perms = old.perms.clone();
        self.put(
            path.to_owned(),
            Node {
                perms: perms.clone(),
                ..old
            },
        );
        Ok(Change {
            path: path.to_owned(),
            exact: false,
            perms,
            old_perms: Some(old_perms),
        })
    }

    /// Commit a transaction snapshot into this (live) tree.
    pub fn commit(&mut self, tx: Store) -> Result<(), Errno> {
        let Some(log) = tx.log else {
            return Err(Errno::EINVAL);
        };
        for (path, g) in &log.accessed {
            if self.nodes.get(path).map(|n| n.generation) != *g {
                return Err(Errno::EAGAIN);
            }
        }
        for path in log.modified {
            match tx.nodes.get(&path) {
                Some(n) => self.put(path, n.clone()),
                None => {
                    self.take(&path);
                }
            }
        }
        Ok(())
    }

    /// Privileged helpers for the toolstack role of the server.
    pub fn force_write(&mut self, path: &str, value: &[u8], perms: Vec<NodePerm>) {
        let dom0 = Caller { dom: 0 };
        let unlimited = Limits::unlimited();
        let m = MissingNodeError::Eacces;
        let _ = self.write(dom0, path, value, m, &unlimited);
        let _ = self.set_perms(dom0, path, perms, m, &unlimited);
    }

    #[cfg(test)]
    fn owned_count(&self, dom: DomId) -> usize {
        self.owned.get(&dom).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: MissingNodeError = MissingNodeError::Eacces;
    const O: MissingNodeError = MissingNodeError::Enoent;

    fn p(s: &str) -> NodePerm {
        s.parse().unwrap()
    }

    fn dom(d: DomId) -> Caller {
        Caller { dom: d }
    }

    fn setup() -> Store {
        let mut s = Store::new();
        for d in [1u16, 2] {
            s.force_write(
                &format!("/local/domain/{d}"),
                b"",
                vec![p("n0"), p(&format!("r{d}"))],
            );
            s.force_write(
                &format!("/local/domain/{d}/data"),
                b"",
                vec![p(&format!("n{d}"))],
            );
        }
        s
    }

    #[test]
    fn perm_for_rules() {
        let perms = [p("n1"), p("r2"), p("w3"), p("b4")];
        let a = |d| perm_for(dom(d), &perms);
        assert_eq!((a(0).read, a(0).write, a(0).owner), (true, true, true));
        assert_eq!((a(1).read, a(1).write, a(1).owner), (true, true, true));
        assert_eq!((a(2).read, a(2).write), (true, false));
        assert_eq!((a(3).read, a(3).write), (false, true));
        assert_eq!((a(4).read, a(4).write, a(4).owner), (true, true, false));
        assert_eq!((a(5).read, a(5).write), (false, false));
        let default_read = [p("r1")];
        assert!(perm_for(dom(9), &default_read).read);
    }

    #[test]
    fn inheritance_on_create() {
        let mut s = setup();
        let l = Limits::default();
        s.write(dom(1), "/local/domain/1/data/a/b", b"v", C, &l)
            .unwrap();
        assert_eq!(
            s.get_perms(dom(1), "/local/domain/1/data/a", C).unwrap(),
            [p("n1")]
        );
        assert_eq!(
            s.get_perms(dom(1), "/local/domain/1/data/a/b", C).unwrap(),
            [p("n1")]
        );
        // dom0 creating keeps the parent's list (owner stays 1)
        s.write(dom(0), "/local/domain/1/data/z", b"", C, &l)
            .unwrap();
        assert_eq!(
            s.get_perms(dom(0), "/local/domain/1/data/z", C).unwrap(),
            [p("n1")]
        );
        // a domain creating under a node it may write but does not own becomes owner
        s.set_perms(
            dom(1),
            "/local/domain/1/data",
            vec![p("n1"), p("b2")],
            C,
            &l,
        )
        .unwrap();
        s.write(dom(2), "/local/domain/1/data/from2", b"", C, &l)
            .unwrap();
        assert_eq!(
            s.get_perms(dom(0), "/local/domain/1/data/from2", C)
                .unwrap(),
            [p("n2"), p("b2")]
        );
        assert_eq!(
            s.directory(dom(1), "/local/domain/1/data", C).unwrap(),
            ["a", "z", "from2"]
        );
    }

    #[test]
    fn missing_node_policies() {
        let mut s = setup();
        assert_eq!(
            s.read(dom(2), "/local/domain/1/data/missing", C),
            Err(Errno::EACCES)
        );
        assert_eq!(
            s.read(dom(2), "/local/domain/1/data/missing", O),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            s.read(dom(1), "/local/domain/1/data/missing", C),
            Err(Errno::ENOENT)
        );
        // creation under an unwritable parent is EACCES in both modes
        let l = Limits::default();
        assert_eq!(
            s.write(dom(2), "/local/domain/1/data/x", b"", O, &l),
            Err(Errno::EACCES)
        );
        assert_eq!(
            s.write(dom(2), "/local/domain/1/x", b"", C, &l),
            Err(Errno::EACCES)
        );
    }

    #[test]
    fn set_perms_rules() {
        let mut s = setup();
        let l = Limits::default();
        s.write(dom(1), "/local/domain/1/data/x", b"", C, &l)
            .unwrap();
        assert_eq!(
            s.set_perms(dom(1), "/local/domain/1/data/x", vec![p("n2")], C, &l),
            Err(Errno::EPERM)
        );
        assert_eq!(
            s.set_perms(dom(2), "/local/domain/1/data/x", vec![p("n1")], C, &l),
            Err(Errno::EACCES)
        );
        s.set_perms(
            dom(1),
            "/local/domain/1/data/x",
            vec![p("n1"), p("b2")],
            C,
            &l,
        )
        .unwrap();
        // writer but not owner
        assert_eq!(
            s.set_perms(dom(2), "/local/domain/1/data/x", vec![p("n1")], C, &l),
            Err(Errno::EACCES)
        );
        let six: Vec<NodePerm> = (0..6).map(|i| NodePerm::new(i + 1, Perm::Read)).collect();
        assert_eq!(
            s.set_perms(dom(1), "/local/domain/1/data/x", six.clone(), C, &l),
            Err(Errno::ENOSPC)
        );
        s.set_perms(dom(0), "/local/domain/1/data/x", six, C, &l)
            .unwrap();
        assert_eq!(s.owned_count(1), 2); // data and data/x
    }

    #[test]
    fn rm_semantics_and_counts() {
        let mut s = setup();
        let l = Limits::default();
        s.write(dom(1), "/local/domain/1/data/a/b/c", b"", C, &l)
            .unwrap();
        assert_eq!(s.owned_count(1), 4);
        let ch = s.rm(dom(1), "/local/domain/1/data/a", C).unwrap();
        let paths: Vec<_> = ch.iter().map(|c| (c.path.as_str(), c.exact)).collect();
        assert_eq!(
            paths,
            [
                ("/local/domain/1/data/a", false),
                ("/local/domain/1/data/a/b", true),
                ("/local/domain/1/data/a/b/c", true)
            ]
        );
        assert_eq!(s.owned_count(1), 1);
        assert!(
            s.rm(dom(1), "/local/domain/1/data/a", C)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            s.rm(dom(1), "/local/domain/1/data/a/b", C),
            Err(Errno::ENOENT)
        );
        assert_eq!(s.rm(dom(0), "/", C), Err(Errno::EINVAL));
        assert_eq!(
            s.directory(dom(1), "/local/domain/1/data", C).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn quotas() {
        let mut s = setup();
        let l = Limits {
            max_nodes_per_domain: 3,
            max_value_len: 4,
            ..Limits::default()
        };
        assert_eq!(
            s.write(dom(1), "/local/domain/1/data/v", b"12345", C, &l),
            Err(Errno::ENOSPC)
        );
        s.write(dom(1), "/local/domain/1/data/a/b", b"", C, &l)
            .unwrap(); // 3 owned now
        assert_eq!(
            s.mkdir(dom(1), "/local/domain/1/data/c", C, &l),
            Err(Errno::ENOSPC)
        );
        s.write(dom(0), "/local/domain/1/data/v", b"12345", C, &l)
            .unwrap();
    }

    #[test]
    fn transaction_conflicts() {
        let mut live = setup();
        let l = Limits::default();
        live.write(dom(1), "/local/domain/1/data/x", b"0", C, &l)
            .unwrap();
        let mut tx = live.begin();
        assert_eq!(tx.read(dom(1), "/local/domain/1/data/x", C).unwrap(), b"0");
        tx.write(dom(1), "/local/domain/1/data/y", b"1", C, &l)
            .unwrap();
        // unrelated change: no conflict
        let mut tx2 = live.begin();
        tx2.write(dom(2), "/local/domain/2/data/q", b"1", C, &l)
            .unwrap();
        live.commit(tx2).unwrap();
        let mut tx3 = live.begin();
        live.write(dom(1), "/local/domain/1/data/x", b"changed", C, &l)
            .unwrap();
        live.commit(tx).map(|_| ()).expect_err("read node changed");
        assert_eq!(
            live.read(dom(1), "/local/domain/1/data/y", C),
            Err(Errno::ENOENT)
        );
        // tx3 reads a node only after the concurrent change: still a conflict
        let _ = tx3.read(dom(1), "/local/domain/1/data/x", C);
        assert_eq!(live.commit(tx3), Err(Errno::EAGAIN));
        // a missing node created concurrently conflicts too
        let mut tx4 = live.begin();
        assert_eq!(
            tx4.read(dom(1), "/local/domain/1/data/new", C),
            Err(Errno::ENOENT)
        );
        live.write(dom(1), "/local/domain/1/data/new", b"", C, &l)
            .unwrap();
        assert_eq!(live.commit(tx4), Err(Errno::EAGAIN));
        // a clean one applies creations and removals
        let mut tx5 = live.begin();
        tx5.write(dom(1), "/local/domain/1/data/t/u", b"v", C, &l)
            .unwrap();
        tx5.rm(dom(1), "/local/domain/1/data/new", C).unwrap();
        live.commit(tx5).unwrap();
        assert_eq!(
            live.read(dom(1), "/local/domain/1/data/t/u", C).unwrap(),
            b"v"
        );
        assert_eq!(
            live.read(dom(1), "/local/domain/1/data/new", C),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            live.directory(dom(1), "/local/domain/1/data", C).unwrap(),
            ["x", "t"]
        );
        assert_eq!(live.owned_count(1), 1 + 3);
    }
}
