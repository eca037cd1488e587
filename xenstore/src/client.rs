//! The client: [`Xs`] (requests) and [`Transaction`].

use std::cell::Cell;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::perms::{DomId, NodePerm, parse_domid};
use crate::transport::{Conn, Stream};
use crate::wire::{
    MsgType, nul_terminated, parse_directory_reply, parse_domain_path_reply, parse_ok_reply,
    parse_perms_reply, parse_transaction_id,
};

/// How often [`Xs::transaction`] tries before giving up with
/// [`Error::TransactionRetries`].
pub const TRANSACTION_ATTEMPTS: u32 = 64;

/// A connection to xenstored for requests (no watches: use a
/// [`Watcher`](crate::Watcher), which has its own connection).
///
/// Requests are synchronous; the connection is behind a mutex, so an `Xs`
/// can be shared between threads (requests are then serialised). After a
/// protocol, I/O or timeout error the connection is out of step with the
/// daemon and every later request fails with [`Error::Broken`].
///
/// ```no_run
/// use xenstore::{NodePerm, Perm, Xs};
/// let xs = Xs::open()?;
/// let me = xs.own_domid()?;
/// xs.transaction(|t| {
///     t.write("data/vchan/0/512/ring-ref", b"8")?;
///     t.set_perms("data/vchan/0/512/ring-ref", &[NodePerm::new(me, Perm::None), NodePerm::new(0, Perm::Read)])
/// })?;
/// # Ok::<(), xenstore::Error>(())
/// ```
#[derive(Debug)]
pub struct Xs {
    conn: Conn,
}

fn check_arg<'a>(what: &str, s: &'a str) -> Result<&'a [u8]> {
    if s.contains('\0') {
        return Err(Error::invalid(format!("{what} {s:?} contains a NUL byte")));
    }
    Ok(s.as_bytes())
}

fn check_path(path: &str) -> Result<&[u8]> {
    if path.is_empty() {
        return Err(Error::invalid("empty path"));
    }
    check_arg("path", path)
}

impl Xs {
    /// Connect like libxenstore's `xs_open`: `XENSTORED_PATH` if set (a
    /// socket is connected to, anything else is opened as the xenbus
    /// device); else `$XENSTORED_RUNDIR/socket` (default
    /// `/run/xenstored/socket`); else `/dev/xen/xenbus`.
    pub fn open() -> Result<Xs> {
        Ok(Xs::from_stream(Stream::open_default()?))
    }

    /// Connect to a xenstored unix socket.
    pub fn connect_unix(path: &Path) -> Result<Xs> {
        Ok(Xs::from_stream(Stream::connect_unix(path)?))
    }

    /// Open a xenbus device such as `/dev/xen/xenbus`.
    pub fn open_device(path: &Path) -> Result<Xs> {
        Ok(Xs::from_stream(Stream::open_device(path)?))
    }

    fn from_stream(s: Stream) -> Xs {
        Xs {
            conn: Conn::new(s, false),
        }
    }

    /// Limit how long a request waits for its reply (default: forever, like
    /// libxenstore). On expiry the request fails with [`Error::Timeout`] and
    /// the connection is unusable afterwards.
    pub fn set_reply_timeout(&self, timeout: Option<Duration>) {
        self.conn.set_reply_timeout(timeout);
    }

    fn op(&self, ty: MsgType, tx: u32, payload: Vec<u8>, path: &str) -> Result<Vec<u8>> {
        self.conn.request(ty, tx, payload, path)
    }

    fn ack(&self, ty: MsgType, tx: u32, payload: Vec<u8>, path: &str) -> Result<()> {
        let reply = self.op(ty, tx, payload, path)?;
        self.checked(parse_ok_reply(ty.name(), &reply))
    }

    /// A reply payload that violates the protocol leaves the connection
    /// unusable, like any other protocol error.
    fn checked<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.conn.poison();
        }
        r
    }

    pub(crate) fn read_tx(&self, tx: u32, path: &str) -> Result<Vec<u8>> {
        let p = check_path(path)?;
        self.op(MsgType::Read, tx, nul_terminated(&[p]), path)
    }

    pub(crate) fn write_tx(&self, tx: u32, path: &str, value: &[u8]) -> Result<()> {
        let p = check_path(path)?;
        let mut payload = nul_terminated(&[p]);
        payload.extend_from_slice(value);
        self.ack(MsgType::Write, tx, payload, path)
    }

    pub(crate) fn path_op_tx(&self, ty: MsgType, tx: u32, path: &str) -> Result<()> {
        let p = check_path(path)?;
        self.ack(ty, tx, nul_terminated(&[p]), path)
    }

    pub(crate) fn directory_tx(&self, tx: u32, path: &str) -> Result<Vec<String>> {
        let p = check_path(path)?;
        let reply = self.op(MsgType::Directory, tx, nul_terminated(&[p]), path)?;
        self.checked(parse_directory_reply(&reply))
    }

    pub(crate) fn get_perms_tx(&self, tx: u32, path: &str) -> Result<Vec<NodePerm>> {
        let p = check_path(path)?;
        let reply = self.op(MsgType::GetPerms, tx, nul_terminated(&[p]), path)?;
        self.checked(parse_perms_reply(&reply))
    }

    pub(crate) fn set_perms_tx(&self, tx: u32, path: &str, perms: &[NodePerm]) -> Result<()> {
        let p = check_path(path)?;
        if perms.is_empty() {
            return Err(Error::invalid("SET_PERMS needs at least the owner entry"));
        }
        let strs: Vec<String> = perms.iter().map(NodePerm::to_string).collect();
        let mut parts: Vec<&[u8]> = vec![p];
        parts.extend(strs.iter().map(|s| s.as_bytes()));
        self.ack(MsgType::SetPerms, tx, nul_terminated(&parts), path)
    }

    /// READ: the node's value (raw bytes).
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.read_tx(0, path)
    }

    /// READ, requiring the value to be UTF-8 (else [`Error::Protocol`]).
    pub fn read_string(&self, path: &str) -> Result<String> {
        utf8_value(path, self.read(path)?)
    }

    /// WRITE: create or overwrite the node (missing parents are created).
    pub fn write(&self, path: &str, value: &[u8]) -> Result<()> {
        self.write_tx(0, path, value)
    }

    /// MKDIR: create the node with an empty value if it does not exist.
    pub fn mkdir(&self, path: &str) -> Result<()> {
        self.path_op_tx(MsgType::Mkdir, 0, path)
    }

    /// RM: remove the node and everything below it (succeeds if the node is
    /// already gone but its parent exists).
    pub fn rm(&self, path: &str) -> Result<()> {
        self.path_op_tx(MsgType::Rm, 0, path)
    }

    /// DIRECTORY: the names of the node's children.
    pub fn directory(&self, path: &str) -> Result<Vec<String>> {
        self.directory_tx(0, path)
    }

    /// GET_PERMS: the node's permission list (owner first).
    pub fn get_perms(&self, path: &str) -> Result<Vec<NodePerm>> {
        self.get_perms_tx(0, path)
    }

    /// SET_PERMS: replace the node's permission list (owner first).
    pub fn set_perms(&self, path: &str, perms: &[NodePerm]) -> Result<()> {
        self.set_perms_tx(0, path, perms)
    }

    /// GET_DOMAIN_PATH: `/local/domain/<dom>` as the daemon spells it.
    pub fn get_domain_path(&self, dom: DomId) -> Result<String> {
        let d = dom.to_string();
        let reply = self.op(
            MsgType::GetDomainPath,
            0,
            nul_terminated(&[d.as_bytes()]),
            &d,
        )?;
        self.checked(parse_domain_path_reply(&reply))
    }

    /// Our own domain id: READ of the relative path `domid`, parsed strictly
    /// (decimal, no leading zeros except `"0"`, below `0x7FF0`; docs/vchan.md §8.3).
    pub fn own_domid(&self) -> Result<DomId> {
        let v = self.read_string("domid")?;
        parse_domid(&v).ok_or_else(|| Error::protocol(format!("bad value {v:?} in \"domid\"")))
    }

    /// TRANSACTION_START: begin a transaction by hand. Prefer
    /// [`transaction`](Self::transaction), which also retries on `EAGAIN`.
    /// A transaction dropped without [`commit`](Transaction::commit) is
    /// aborted.
    pub fn begin(&self) -> Result<Transaction<'_>> {
        let reply = self.op(MsgType::TransactionStart, 0, vec![0], "")?;
        let id = self.checked(parse_transaction_id(&reply))?;
        Ok(Transaction {
            xs: self,
            id,
            done: Cell::new(false),
        })
    }

    fn end(&self, id: u32, commit: bool) -> Result<()> {
        let payload = if commit { b"T\0" } else { b"F\0" };
        self.ack(MsgType::TransactionEnd, id, payload.to_vec(), "")
    }

    /// Run `f` inside a transaction and commit it. If the commit, the start,
    /// or any request inside fails with `EAGAIN`, the transaction is aborted
    /// and the whole thing (including `f`) is run again, at most
    /// [`TRANSACTION_ATTEMPTS`] times ([`Error::TransactionRetries`]). Any
    /// other error of `f` aborts the transaction and is returned.
    ///
    /// ```no_run
    /// # let xs = xenstore::Xs::open()?;
    /// let n = xs.transaction(|t| {
    ///     let n: u32 = t.read_string("data/counter")?.parse().unwrap_or(0);
    ///     t.write("data/counter", (n + 1).to_string().as_bytes())?;
    ///     Ok(n + 1)
    /// })?;
    /// # Ok::<(), xenstore::Error>(())
    /// ```
    pub fn transaction<T>(&self, mut f: impl FnMut(&Transaction<'_>) -> Result<T>) -> Result<T> {
        for _ in 0..TRANSACTION_ATTEMPTS {
            let tx = match self.begin() {
                Ok(tx) => tx,
                Err(e) if e.is_eagain() => continue,
                Err(e) => return Err(e),
            };
            match f(&tx) {
                Ok(v) => match tx.commit() {
                    Ok(()) => return Ok(v),
                    Err(e) if e.is_eagain() => {}
                    Err(e) => return Err(e),
                },
                Err(e) => {
                    drop(tx); // aborts
                    if !e.is_eagain() {
                        return Err(e);
                    }
                }
            }
            std::thread::yield_now();
        }
        Err(Error::TransactionRetries {
            attempts: TRANSACTION_ATTEMPTS,
        })
    }
}

fn utf8_value(path: &str, v: Vec<u8>) -> Result<String> {
    String::from_utf8(v).map_err(|_| Error::protocol(format!("value of {path:?} is not UTF-8")))
}

/// An open transaction: the same requests as [`Xs`], carrying the
/// transaction id. Dropped without [`commit`](Self::commit) → aborted.
pub struct Transaction<'a> {
    xs: &'a Xs,
    id: u32,
    done: Cell<bool>,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction").field("id", &self.id).finish()
    }
}

impl Transaction<'_> {
    /// The transaction id the daemon assigned.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// READ inside the transaction.
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.xs.read_tx(self.id, path)
    }

    /// READ inside the transaction, requiring UTF-8.
    pub fn read_string(&self, path: &str) -> Result<String> {
        utf8_value(path, self.read(path)?)
    }

    /// WRITE inside the transaction.
    pub fn write(&self, path: &str, value: &[u8]) -> Result<()> {
        self.xs.write_tx(self.id, path, value)
    }

    /// MKDIR inside the transaction.
    pub fn mkdir(&self, path: &str) -> Result<()> {
        self.xs.path_op_tx(MsgType::Mkdir, self.id, path)
    }

    /// RM inside the transaction.
    pub fn rm(&self, path: &str) -> Result<()> {
        self.xs.path_op_tx(MsgType::Rm, self.id, path)
    }

    /// DIRECTORY inside the transaction.
    pub fn directory(&self, path: &str) -> Result<Vec<String>> {
        self.xs.directory_tx(self.id, path)
    }

    /// GET_PERMS inside the transaction.
    pub fn get_perms(&self, path: &str) -> Result<Vec<NodePerm>> {
        self.xs.get_perms_tx(self.id, path)
    }

    /// SET_PERMS inside the transaction.
    pub fn set_perms(&self, path: &str, perms: &[NodePerm]) -> Result<()> {
        self.xs.set_perms_tx(self.id, path, perms)
    }

    /// TRANSACTION_END `T`: commit. `EAGAIN` means a conflict: redo the
    /// whole transaction.
    pub fn commit(self) -> Result<()> {
        self.done.set(true);
        self.xs.end(self.id, true)
    }

    /// TRANSACTION_END `F`: abort.
    pub fn abort(self) -> Result<()> {
        self.done.set(true);
        self.xs.end(self.id, false)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done.get() {
            let _ = self.xs.end(self.id, false);
        }
    }
}
