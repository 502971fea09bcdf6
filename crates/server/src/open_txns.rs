//! Interactive transactions of the gRPC and HTTP endpoints (`Transactions` service,
//! `/v1/txns`): `timber_kv` transactions over the keyspace's engine, kept open between calls
//! under an id, and rolled back once idle for [`OpenTxns`]'s idle time.
//!
//! - Reads decode the keyspace's values (a key holding a Redis stream, or past its deadline,
//!   has no value); writes store strings, with a deadline if asked.
//! - Commit validates the transaction (`Transaction::commit_with`) and writes through the
//!   keyspace's one write path (in a cluster, one Raft entry), holding the stripe locks of every
//!   key it read or wrote from the check to the write. On one node it also holds the
//!   registry's commit lock: no write of those keys, and no other transaction's commit, comes
//!   in between. In a cluster commits run concurrently: the entry is guarded by the keys and
//!   ranges it depends on as the check saw them, and every member refuses it on apply if
//!   anything applied before it changed them.
//! - Calls that may wait long (commits, scans, rollbacks, and any call on a pessimistic
//!   transaction, which may wait for a lock: the low bit of its id says so) run on the
//!   blocking pool; the rest (begins, an optimistic transaction's key reads and writes) on
//!   the caller's task.
//! - In a cluster every call runs on the leader (a member that does not lead passes it there,
//!   `forwarded.rs` op `txn-call`). A transaction begun under another leader, or another term
//!   of this one, is aborted: by its next call, or by the server's background round (every
//!   100 ms) once this member stops leading, which releases its locks and snapshot then
//!   rather than when it would have gone idle.
//!
//! Errors start with a code word (`ABORTED`: retry the whole transaction; `INVALID`;
//! `UNAVAILABLE`: retry the call; `INTERNAL`), which survives the way back from the leader.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use timber_kv::{Isolation, Transaction, TxnOptions};
use timber_proto::v1 as pb;

use crate::keyspace::{self, data_key, data_range, index_key, live, now_ms, Keyspace, Kind, Value};
use crate::versions::Epoch;
use crate::Engines;

/// How long a transaction may go without a call before it is rolled back.
pub(crate) const IDLE: Duration = Duration::from_secs(30);
/// How long a transaction may stay open in all (its snapshot holds old versions).
const MAX_AGE: Duration = Duration::from_secs(60);
/// The most transactions open at once.
const MAX_OPEN: usize = 10_000;
/// The longest lock wait a transaction may ask for.
const MAX_LOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// The most pairs one scan returns.
const MAX_SCAN: usize = 100_000;

/// Errors of interactive transactions; the text starts with its code word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Error {
    /// Retry the whole transaction: a conflict, deadlock, lock timeout, expiry, or an id
    /// unknown here.
    #[error("ABORTED {0}")]
    Aborted(String),
    /// A bad request; nothing changed.
    #[error("INVALID {0}")]
    Invalid(String),
    /// No leader or quorum now: retry the call.
    #[error("UNAVAILABLE {0}")]
    Unavailable(String),
    #[error("INTERNAL {0}")]
    Internal(String),
}

impl Error {
    /// The error a line of [`Error`]'s display form names (from the leader).
    pub(crate) fn of_line(line: &str) -> Error {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.to_string();
        match word {
            "ABORTED" => Error::Aborted(rest),
            "INVALID" => Error::Invalid(rest),
            "UNAVAILABLE" | "READONLY" | "CLUSTERDOWN" => Error::Unavailable(rest),
            _ => Error::Internal(line.to_string()),
        }
    }
}

impl From<timber_kv::Error> for Error {
    fn from(e: timber_kv::Error) -> Error {
        use timber_kv::Error as K;
        match e {
            K::Conflict { .. }
            | K::Deadlock { .. }
            | K::LockTimeout { .. }
            | K::TxnExpired { .. } => Error::Aborted(e.to_string()),
            K::TxnTooLarge { .. } | K::InvalidParam(_) => Error::Invalid(e.to_string()),
            e => Error::Internal(e.to_string()),
        }
    }
}

impl From<keyspace::Error> for Error {
    fn from(e: keyspace::Error) -> Error {
        match e {
            keyspace::Error::NotLeader { .. } | keyspace::Error::ClusterDown(_) => {
                Error::Unavailable(e.to_string())
            }
            keyspace::Error::Kv(e) => e.into(),
            keyspace::Error::TooLarge(m) | keyspace::Error::Refused(m) => Error::Invalid(m),
            e => Error::Internal(e.to_string()),
        }
    }
}

/// One open transaction.
struct Open {
    /// `None` once committed or rolled back by another call.
    txn: Option<Transaction>,
    used: Instant,
    began: Instant,
    /// Where it began (a commit under another epoch aborts).
    epoch: Option<Epoch>,
}

/// The open transactions of one server.
pub(crate) struct OpenTxns {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Mutex<Open>>>>,
    /// Held from a commit's check to its write on one node: commits run one at a time there.
    commits: Mutex<()>,
    idle: Duration,
}

impl std::fmt::Debug for OpenTxns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenTxns").field("open", &self.open.lock().len()).finish_non_exhaustive()
    }
}

impl OpenTxns {
    /// An empty registry whose transactions are rolled back after `idle` without a call.
    pub(crate) fn new(idle: Duration) -> OpenTxns {
        // Ids start at a random point, so that an id from before a restart (or of another
        // leader) is unknown here rather than someone else's.
        let start = std::collections::hash_map::RandomState::new();
        let start = std::hash::BuildHasher::hash_one(&start, Instant::now()) >> 1;
        OpenTxns {
            next: AtomicU64::new(start.max(1)),
            open: Mutex::new(HashMap::new()),
            commits: Mutex::new(()),
            idle,
        }
    }

    /// How many are open.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.open.lock().len()
    }

    fn begin(&self, ks: &Keyspace, r: &pb::BeginRequest) -> Result<u64, Error> {
        let isolation = match pb::Isolation::try_from(r.isolation) {
            Ok(pb::Isolation::Snapshot) => Isolation::Snapshot,
            Ok(pb::Isolation::ReadCommitted) => Isolation::ReadCommitted,
            Ok(pb::Isolation::Serializable) => Isolation::Serializable,
            Err(_) => return Err(Error::Invalid(format!("unknown isolation {}", r.isolation))),
        };
        let mut opts = match r.pessimistic {
            true => TxnOptions::pessimistic(isolation),
            false => TxnOptions::isolation(isolation),
        };
        if let Some(ms) = r.lock_timeout_ms {
            opts.lock_timeout = Duration::from_millis(ms).min(MAX_LOCK_TIMEOUT);
        }
        opts.max_age = MAX_AGE;
        let epoch = ks.epoch();
        if epoch.is_none() {
            return Err(Error::Unavailable("this member stopped leading: retry".into()));
        }
        if self.open.lock().len() >= MAX_OPEN {
            return Err(Error::Unavailable(format!(
                "{MAX_OPEN} transactions are open: commit or roll back some, or retry later"
            )));
        }
        let txn = ks.db().transaction(opts);
        // The low bit says the transaction is pessimistic (see `may_wait`).
        let id = (self.next.fetch_add(1, Ordering::Relaxed) << 1) | u64::from(r.pessimistic);
        let now = Instant::now();
        let open = Open { txn: Some(txn), used: now, began: now, epoch };
        self.open.lock().insert(id, Arc::new(Mutex::new(open)));
        Ok(id)
    }

    /// Whether `call` may block its thread for long: a commit (a synced write, or a Raft
    /// round in a cluster), a scan (up to `MAX_SCAN` pairs, maybe from disk), a rollback (the
    /// oldest transaction's end prunes the oracle under its lock), or any call on a
    /// pessimistic transaction (a lock wait, or a wait for another call on it that waits).
    /// The rest are quick: a begin, and an optimistic transaction's key reads and writes.
    fn may_wait(call: &pb::txn_call::Call) -> bool {
        use pb::txn_call::Call as C;
        let id = match call {
            C::Begin(_) => return false,
            C::Commit(_) | C::Scan(_) | C::Rollback(_) => return true,
            C::Get(r) => r.id,
            C::Put(r) => r.id,
            C::Delete(r) => r.id,
        };
        id & 1 == 1
    }

    /// Runs `f` on transaction `id`, begun under `epoch` (this member's now: one begun under
    /// another is aborted).
    fn with<T>(
        &self,
        id: u64,
        epoch: Option<Epoch>,
        f: impl FnOnce(&mut Transaction) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let entry = self.open.lock().get(&id).cloned().ok_or_else(|| unknown(id))?;
        let mut open = entry.lock();
        open.used = Instant::now();
        let r = match (open.epoch == epoch, open.txn.as_mut()) {
            (_, None) => return Err(unknown(id)),
            (false, Some(_)) => Err(leader_changed()),
            (true, Some(txn)) => f(txn),
        };
        if let Err(Error::Aborted(_)) = r {
            // Deadlock victim, lock timeout, expired: over, and its locks released now (the
            // client runs it again from the start).
            open.txn = None;
            drop(open);
            self.open.lock().remove(&id);
        }
        r
    }

    /// Removes transaction `id`, waiting for a call in progress on it.
    fn take(&self, id: u64) -> Option<(Transaction, Option<Epoch>)> {
        let entry = self.open.lock().remove(&id)?;
        let mut open = entry.lock();
        let epoch = open.epoch;
        open.txn.take().map(|t| (t, epoch))
    }

    /// A key's value and version as the transaction sees it (a key it wrote: version 0).
    fn get(&self, epoch: Option<Epoch>, r: &pb::TxnGetRequest) -> Result<pb::GetResponse, Error> {
        self.with(r.id, epoch, |t| {
            let dk = data_key(&r.key);
            let stored = if r.for_update { t.get_for_update(&dk)? } else { t.get(&dk)? };
            let v = live(&r.key, stored, now_ms)?;
            Ok(match v.filter(|v| v.kind == Kind::String) {
                Some(v) => pb::GetResponse { value: Some(v.data), version: v.revision },
                None => pb::GetResponse { value: None, version: 0 },
            })
        })
    }

    fn put(&self, epoch: Option<Epoch>, r: &pb::TxnPutRequest) -> Result<(), Error> {
        self.with(r.id, epoch, |t| {
            let expire_at = r.ttl_ms.filter(|t| *t > 0).map(|t| now_ms().saturating_add(t));
            let v = Value { expire_at, ..Value::string(r.value.clone()) };
            t.put(data_key(&r.key), Keyspace::encoded(&v))?;
            if let Some(at) = expire_at {
                t.put(index_key(at, &r.key), [])?;
            }
            Ok(())
        })
    }

    fn delete(&self, epoch: Option<Epoch>, r: &pb::TxnDeleteRequest) -> Result<bool, Error> {
        self.with(r.id, epoch, |t| {
            let dk = data_key(&r.key);
            let existed = live(&r.key, t.get(&dk)?, now_ms)?.is_some();
            t.delete(dk)?;
            Ok(existed)
        })
    }

    fn scan(
        &self,
        epoch: Option<Epoch>,
        r: &pb::TxnScanRequest,
    ) -> Result<Vec<(Bytes, Bytes)>, Error> {
        let limit = match r.limit {
            0 => MAX_SCAN,
            n => (n as usize).min(MAX_SCAN),
        };
        self.with(r.id, epoch, |t| {
            let Some((lo, hi)) = data_range(&r.prefix, &r.start, &r.end) else {
                return Ok(Vec::new());
            };
            // Expired values and Redis streams among them are skipped below (a page may then
            // hold fewer than the limit).
            let pairs = t.scan_limit(lo..hi, limit)?;
            let now = now_ms();
            let mut out = Vec::new();
            for (k, v) in pairs {
                let key = k.slice(1..);
                if !key.starts_with(&r.prefix) {
                    break;
                }
                if let Some(v) = live(&key, Some(v), || now)?.filter(|v| v.kind == Kind::String) {
                    out.push((key, v.data));
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
    }

    fn commit(&self, ks: &Keyspace, id: u64) -> Result<(), Error> {
        let (txn, epoch) = self.take(id).ok_or_else(|| unknown(id))?;
        if epoch != ks.epoch() {
            return Err(leader_changed());
        }
        // On one node, a commit's check and write must not interleave with another's (a write
        // into a range the other scanned). In a cluster the members check it again on apply
        // against the state the leader's check passed on, so commits go on concurrently.
        let _one = ks.replication().is_none().then(|| self.commits.lock());
        // Engine keys the commit checks (what the isolation level tracks), then checked again
        // where a cluster applies it.
        let depends: Vec<Bytes> = txn.written_keys().chain(txn.read_keys()).cloned().collect();
        let keys: Vec<&[u8]> = depends.iter().filter_map(|k| k.strip_prefix(b"k")).collect();
        let _locks = ks.lock_many(&keys);
        let depends = match txn.isolation() {
            Isolation::ReadCommitted => &[][..],
            _ => &depends[..],
        };
        let own = |b: Bound<&[u8]>| b.map(<[u8]>::to_vec);
        let ranges: Vec<keyspace::EngineRange> =
            txn.read_ranges().map(|(lo, hi)| (own(lo), own(hi))).collect();
        match txn.commit_with(|batch, seen| ks.commit_guarded(batch, depends, &ranges, Some(seen)))
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Rolls back the transactions idle for longer than the registry's idle time, and those
    /// begun under another epoch than `epoch` (this member's now); how many.
    pub(crate) fn reap(&self, epoch: Option<Epoch>) -> usize {
        let now = Instant::now();
        let mut open = self.open.lock();
        let before = open.len();
        // One in a call is left to it (its lock is held): a call checks the epoch too.
        open.retain(|_, e| {
            e.try_lock().is_none_or(|o| {
                o.epoch == epoch
                    && now.duration_since(o.used) < self.idle
                    && now.duration_since(o.began) < MAX_AGE
            })
        });
        before - open.len()
    }

    /// Runs `call` here (on the leader, in a cluster).
    fn run(&self, ks: &Keyspace, call: pb::txn_call::Call) -> Result<pb::txn_reply::Reply, Error> {
        use pb::txn_call::Call as C;
        use pb::txn_reply::Reply as R;
        let here = || ks.epoch();
        Ok(match call {
            C::Begin(r) => R::Begin(pb::BeginResponse { id: self.begin(ks, &r)? }),
            C::Get(r) => R::Get(self.get(here(), &r)?),
            C::Put(r) => {
                self.put(here(), &r)?;
                R::Put(pb::PutResponse {})
            }
            C::Delete(r) => R::Delete(pb::DeleteResponse { existed: self.delete(here(), &r)? }),
            C::Scan(r) => {
                let items = self.scan(here(), &r)?;
                R::Scan(pb::ScanPage {
                    items: items
                        .into_iter()
                        .map(|(key, value)| pb::KeyValue { key, value })
                        .collect(),
                })
            }
            C::Commit(r) => {
                self.commit(ks, r.id)?;
                R::Commit(pb::CommitResponse {})
            }
            C::Rollback(r) => {
                R::Rollback(pb::RollbackResponse { existed: self.take(r.id).is_some() })
            }
        })
    }
}

fn leader_changed() -> Error {
    Error::Aborted("the leader changed since the transaction began: retry it".into())
}

fn unknown(id: u64) -> Error {
    Error::Aborted(format!(
        "transaction {id} is not open here (committed, rolled back, idle too long, or begun under another leader)"
    ))
}

/// Runs a call of the `Transactions` service: here, or in a cluster on the leader (a member
/// that does not lead passes it there).
pub(crate) async fn call(
    engines: &Arc<Engines>,
    call: pb::txn_call::Call,
) -> Result<pb::txn_reply::Reply, Error> {
    if let pb::txn_call::Call::Put(p) = &call {
        if p.value.len() > engines.max_value {
            return Err(Error::Invalid(format!(
                "value of {} bytes exceeds the limit of {} bytes",
                p.value.len(),
                engines.max_value
            )));
        }
    }
    if let Some(r) = engines.keys.replication() {
        if let Some(reply) = crate::forwarded::txn_call(r, call.clone()).await {
            return reply;
        }
    }
    call_here(engines, call).await
}

/// Runs `call` on this member: in a cluster, a begin waits until the member is fresh and
/// confirmed its leadership (the transaction's snapshot then holds everything committed).
pub(crate) async fn call_here(
    engines: &Arc<Engines>,
    call: pb::txn_call::Call,
) -> Result<pb::txn_reply::Reply, Error> {
    if let Some(r) = engines.keys.replication() {
        match call {
            pb::txn_call::Call::Begin(_) => {
                r.fresh().await?;
                r.read_barrier_async().await?;
            }
            // A proposal that failed may still be applied: the commit is checked once the
            // barrier behind it is, so the oracle has seen it (as every write evaluated here).
            pb::txn_call::Call::Commit(_) => r.fresh().await?,
            _ => {}
        }
    }
    let reply = if OpenTxns::may_wait(&call) {
        let e = engines.clone();
        let reply = tokio::task::spawn_blocking(move || e.txns.run(&e.keys, call)).await;
        reply.map_err(|e| Error::Internal(format!("transaction task failed: {e}")))??
    } else {
        engines.txns.run(&engines.keys, call)?
    };
    if matches!(reply, pb::txn_reply::Reply::Commit(_)) {
        engines.keys.durable().await?;
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sync;
    use crate::idle::IdleWork;
    use pb::txn_call::Call as C;
    use pb::txn_reply::Reply as R;

    fn begin(t: &OpenTxns, ks: &Keyspace, isolation: pb::Isolation) -> u64 {
        let r = pb::BeginRequest { isolation: isolation as i32, ..Default::default() };
        match t.run(ks, C::Begin(r)).unwrap() {
            R::Begin(b) => b.id,
            other => panic!("{other:?}"),
        }
    }

    /// Calls on pessimistic transactions (which may wait for locks) and commits go to the
    /// blocking pool; the rest run on the caller's thread.
    #[test]
    fn only_calls_that_may_wait_leave_the_callers_thread() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
        let t = OpenTxns::new(Duration::from_secs(60));
        let begin = |pessimistic| {
            let r = pb::BeginRequest { pessimistic, ..Default::default() };
            match t.run(&ks, C::Begin(r)).unwrap() {
                R::Begin(b) => b.id,
                other => panic!("{other:?}"),
            }
        };
        for pessimistic in [false, true, false, true] {
            let id = begin(pessimistic);
            let k = || bytes::Bytes::from("k");
            let get = C::Get(pb::TxnGetRequest { id, key: k(), for_update: false });
            let put = C::Put(pb::TxnPutRequest { id, key: k(), value: k(), ttl_ms: None });
            let delete = C::Delete(pb::TxnDeleteRequest { id, key: k() });
            for c in [get, put, delete] {
                assert_eq!(OpenTxns::may_wait(&c), pessimistic, "{c:?}");
            }
            let scan = C::Scan(pb::TxnScanRequest { id, ..Default::default() });
            for c in [scan, C::Rollback(pb::TxnRef { id }), C::Commit(pb::TxnRef { id })] {
                assert!(OpenTxns::may_wait(&c), "{c:?}");
            }
        }
        assert!(!OpenTxns::may_wait(&C::Begin(pb::BeginRequest::default())));
    }

    #[test]
    fn transactions_read_their_writes_commit_conflict_and_are_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
        let t = OpenTxns::new(Duration::ZERO);
        ks.set(b"a", &Value::string("1")).unwrap();
        let id = begin(&t, &ks, pb::Isolation::Serializable);
        let here = ks.epoch();
        let get = |id, key: &str| {
            t.get(here, &pb::TxnGetRequest { id, key: key.to_string().into(), for_update: false })
                .map(|r| r.value)
        };
        assert_eq!(get(id, "a").unwrap(), Some(Bytes::from("1")));
        let b = pb::TxnPutRequest { id, key: "b".into(), value: "2".into(), ttl_ms: Some(60_000) };
        t.put(here, &b).unwrap();
        assert_eq!(get(id, "b").unwrap(), Some(Bytes::from("2")));
        let page = pb::TxnScanRequest { id, ..Default::default() };
        assert_eq!(t.scan(here, &page).unwrap().len(), 2);
        assert_eq!(ks.get(b"b").unwrap(), None, "nothing visible before commit");
        t.commit(&ks, id).unwrap();
        let b = ks.get(b"b").unwrap().unwrap();
        assert_eq!((b.data, b.expire_at.is_some()), (Bytes::from("2"), true));
        assert_eq!(t.commit(&ks, id).unwrap_err(), unknown(id));

        // A key it read written by a plain write since: aborted, nothing written.
        let id = begin(&t, &ks, pb::Isolation::Serializable);
        get(id, "a").unwrap();
        let c = pb::TxnPutRequest { id, key: "c".into(), value: "3".into(), ttl_ms: None };
        t.put(here, &c).unwrap();
        let _g = ks.lock(b"a");
        ks.set(b"a", &Value::string("9")).unwrap();
        drop(_g);
        assert!(matches!(t.commit(&ks, id), Err(Error::Aborted(_))));
        assert_eq!(ks.get(b"c").unwrap(), None);

        // Idle ones are rolled back.
        let id = begin(&t, &ks, pb::Isolation::Snapshot);
        assert_eq!(t.reap(here), 1);
        assert_eq!(t.len(), 0);
        assert!(matches!(get(id, "a"), Err(Error::Aborted(_))));
    }

    /// A transaction begun under another epoch (this member led in another term, or no longer
    /// leads) is aborted by its next call, and by a reap, which releases its locks at once.
    #[test]
    fn a_past_leaders_transactions_are_aborted_and_release_their_locks() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
        let t = OpenTxns::new(Duration::from_secs(60));
        let here = ks.epoch();
        let later = here.map(|e| Epoch { term: e.term + 1, ..e });
        let pessimistic = |t: &OpenTxns| {
            let r = pb::BeginRequest {
                pessimistic: true,
                lock_timeout_ms: Some(0),
                ..Default::default()
            };
            match t.run(&ks, C::Begin(r)).unwrap() {
                R::Begin(b) => b.id,
                other => panic!("{other:?}"),
            }
        };
        let put = |id| pb::TxnPutRequest { id, key: "k".into(), value: "v".into(), ttl_ms: None };
        let first = pessimistic(&t);
        t.put(here, &put(first)).unwrap();
        let second = pessimistic(&t);
        assert!(matches!(t.put(here, &put(second)), Err(Error::Aborted(m)) if m.contains("lock")));
        // Its next call under another epoch aborts it.
        let stale = pessimistic(&t);
        let get = pb::TxnGetRequest { id: stale, key: "x".into(), for_update: false };
        assert_eq!(t.get(later, &get).unwrap_err(), leader_changed());
        assert_eq!(t.get(here, &get).unwrap_err(), unknown(stale));
        // A reap under another epoch rolls back the rest: the lock on k is free.
        assert_eq!(t.reap(here), 0);
        assert_eq!(t.reap(later), 1);
        assert_eq!(t.len(), 0);
        let third = pessimistic(&t);
        t.put(here, &put(third)).unwrap();
        assert_eq!(t.commit(&ks, first).unwrap_err(), unknown(first));
        t.commit(&ks, third).unwrap();
        assert_eq!(ks.get(b"k").unwrap().unwrap().data, Bytes::from("v"));
        // No leader: none stays.
        let fourth = pessimistic(&t);
        assert_eq!(t.reap(None), 1);
        assert!(t.take(fourth).is_none());
    }

    #[test]
    fn error_lines_keep_their_code() {
        for e in [
            Error::Aborted("x y".into()),
            Error::Invalid("bad".into()),
            Error::Unavailable("later".into()),
        ] {
            assert_eq!(Error::of_line(&e.to_string()), e);
        }
    }
}
