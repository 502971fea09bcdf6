//! `Transaction`: optimistic MVCC transactions over the engine's sequence numbers.
//!
//! A transaction reads a snapshot registered at its start (its start timestamp: the sequence
//! number of the last write it sees) through its own writes, which it buffers; `commit` writes
//! them as one WAL batch (its commit timestamp: that batch's sequence numbers), after checking
//! under the writer lock, so that no write comes in between, that nothing it depends on was
//! written since its start (the `Oracle` records every write while transactions are open):
//!
//! - `ReadCommitted`: each read sees the latest committed state; nothing is checked (lost
//!   updates and every anomaly above are possible).
//! - `Snapshot`: reads see the start snapshot; a key it writes that anyone wrote after its
//!   start is a conflict (first committer wins), so no lost update, no dirty or fuzzy read;
//!   write skew is possible.
//! - `Serializable`: as `Snapshot`, and every key it read and every range it scanned must be
//!   unwritten since its start (a write into a scanned range conflicts, one outside does not):
//!   committed transactions are equivalent to their execution one by one in commit order.
//!
//! A conflict is `Error::Conflict` (retryable: nothing was written). A dropped transaction
//! rolls back. An open transaction keeps the versions its snapshot needs, and its writes in
//! memory: `TxnOptions` limits its size and age.

use std::collections::BTreeMap;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::batch::WriteBatch;
use crate::bounds::{prefix_bounds, user_bounds, Bounds};
use crate::error::{Error, Result};

use super::inner::Inner;

/// What a transaction's reads see and what its commit checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Each read sees the latest committed writes; nothing is checked at commit.
    ReadCommitted,
    /// Reads see the start snapshot; a write-write conflict aborts the later committer.
    Snapshot,
    /// Serializable snapshot isolation: reads and scanned ranges are validated at commit too.
    Serializable,
}

/// Options of [`crate::Db::transaction`].
#[derive(Debug, Clone)]
pub struct TxnOptions {
    /// Isolation level (default `Snapshot`).
    pub isolation: Isolation,
    /// Most bytes of keys and values it may buffer (default 64 MiB): past it, a write fails
    /// with `Error::TxnTooLarge`.
    pub max_bytes: usize,
    /// How long it may stay open (default 60 s): past it, every call fails with
    /// `Error::TxnExpired` (an old snapshot keeps old versions from compaction).
    pub max_age: Duration,
}

impl Default for TxnOptions {
    fn default() -> Self {
        TxnOptions {
            isolation: Isolation::Snapshot,
            max_bytes: 64 << 20,
            max_age: Duration::from_secs(60),
        }
    }
}

impl TxnOptions {
    /// Default options at isolation `isolation`.
    pub fn isolation(isolation: Isolation) -> TxnOptions {
        TxnOptions { isolation, ..TxnOptions::default() }
    }
}

/// What a transaction read, for the validation of a `Serializable` commit.
#[derive(Debug, Default, Clone)]
struct ReadSet {
    keys: Vec<Bytes>,
    ranges: Vec<Bounds>,
}

/// A transaction of one [`crate::Db`]. Not `Sync`: one thread drives it.
pub struct Transaction {
    inner: Arc<Inner>,
    opts: TxnOptions,
    /// The sequence number of the last write its snapshot sees.
    start: u64,
    began: Instant,
    /// Its writes: a value, or `None` for a delete.
    writes: BTreeMap<Bytes, Option<Bytes>>,
    bytes: usize,
    reads: ReadSet,
    /// The writes (and their size) at each savepoint.
    savepoints: Vec<(BTreeMap<Bytes, Option<Bytes>>, usize)>,
    open: bool,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("start", &self.start)
            .field("isolation", &self.opts.isolation)
            .field("writes", &self.writes.len())
            .finish_non_exhaustive()
    }
}

impl Transaction {
    pub(super) fn begin(inner: Arc<Inner>, opts: TxnOptions) -> Transaction {
        let start = {
            // Under the oracle's lock: a write records its keys if it sees this transaction
            // open, or is visible in its snapshot (see `Oracle`).
            let mut oracle = inner.oracle.lock();
            let start = inner.add_snapshot();
            oracle.begin(start);
            start
        };
        Transaction {
            inner,
            opts,
            start,
            began: Instant::now(),
            writes: BTreeMap::new(),
            bytes: 0,
            reads: ReadSet::default(),
            savepoints: Vec::new(),
            open: true,
        }
    }

    /// The sequence number of the last write its snapshot sees (its start timestamp).
    pub fn start_seq(&self) -> u64 {
        self.start
    }

    fn check_open(&self) -> Result<()> {
        if !self.open {
            return Err(Error::InvalidParam("the transaction is over".into()));
        }
        let age = self.began.elapsed();
        if age > self.opts.max_age {
            return Err(Error::TxnExpired { age, max: self.opts.max_age });
        }
        Ok(())
    }

    /// The value of `key`: its own write if it wrote it, else as its isolation level reads.
    pub fn get(&mut self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.check_open()?;
        let key = key.as_ref();
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        let v = match self.opts.isolation {
            Isolation::ReadCommitted => self.inner.get_latest(key)?,
            _ => self.inner.get_at(key, self.start)?,
        };
        if self.opts.isolation == Isolation::Serializable {
            self.reads.keys.push(Bytes::copy_from_slice(key));
        }
        Ok(v)
    }

    /// Stores `value` under `key` when the transaction commits.
    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let (key, value) = (key.as_ref(), value.as_ref());
        crate::batch::validate(key, Some(value)).map_err(Error::InvalidParam)?;
        self.buffer(key, Some(Bytes::copy_from_slice(value)))
    }

    /// Removes `key` when the transaction commits.
    pub fn delete(&mut self, key: impl AsRef<[u8]>) -> Result<()> {
        let key = key.as_ref();
        crate::batch::validate(key, None).map_err(Error::InvalidParam)?;
        self.buffer(key, None)
    }

    fn buffer(&mut self, key: &[u8], value: Option<Bytes>) -> Result<()> {
        self.check_open()?;
        let size = key.len() + value.as_ref().map_or(0, Bytes::len);
        let old = self.writes.get(key).map_or(0, |v| key.len() + v.as_ref().map_or(0, Bytes::len));
        let bytes = self.bytes - old + size;
        if bytes > self.opts.max_bytes {
            return Err(Error::TxnTooLarge { bytes, max: self.opts.max_bytes });
        }
        self.bytes = bytes;
        self.writes.insert(Bytes::copy_from_slice(key), value);
        Ok(())
    }

    /// The live keys in `range` with their values, in key order: its own writes over what its
    /// isolation level reads (`Serializable` records the range).
    pub fn scan<K: AsRef<[u8]>>(
        &mut self,
        range: impl RangeBounds<K>,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        self.scan_bounds(user_bounds(&range))
    }

    /// [`Transaction::scan`] in descending key order.
    pub fn scan_rev<K: AsRef<[u8]>>(
        &mut self,
        range: impl RangeBounds<K>,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let mut v = self.scan_bounds(user_bounds(&range))?;
        v.reverse();
        Ok(v)
    }

    /// [`Transaction::scan`] of the keys starting with `prefix`.
    pub fn prefix(&mut self, prefix: impl AsRef<[u8]>) -> Result<Vec<(Bytes, Bytes)>> {
        self.scan_bounds(prefix_bounds(prefix.as_ref()))
    }

    fn scan_bounds(&mut self, bounds: Bounds) -> Result<Vec<(Bytes, Bytes)>> {
        self.check_open()?;
        let it = match self.opts.isolation {
            Isolation::ReadCommitted => self.inner.iter_latest(bounds.clone()),
            _ => self.inner.iter(self.start, bounds.clone()),
        };
        let mut merged = BTreeMap::new();
        for kv in it {
            let (k, v) = kv?;
            merged.insert(k, v);
        }
        let range = (as_ref(&bounds.lo), as_ref(&bounds.hi));
        if !is_empty(range) {
            for (k, w) in self.writes.range::<[u8], _>(range) {
                match w {
                    Some(v) => merged.insert(k.clone(), v.clone()),
                    None => merged.remove(k),
                };
            }
        }
        if self.opts.isolation == Isolation::Serializable {
            self.reads.ranges.push(bounds);
        }
        Ok(merged.into_iter().collect())
    }

    /// Marks the current writes, to come back to with
    /// [`Transaction::rollback_to_savepoint`].
    pub fn savepoint(&mut self) {
        self.savepoints.push((self.writes.clone(), self.bytes));
    }

    /// Undoes the writes made since the last savepoint, and drops it; `Error::InvalidParam` if
    /// there is none. (What was read since stays in the read set: it is still validated.)
    pub fn rollback_to_savepoint(&mut self) -> Result<()> {
        self.check_open()?;
        let (writes, bytes) = self
            .savepoints
            .pop()
            .ok_or_else(|| Error::InvalidParam("no savepoint to roll back to".into()))?;
        self.writes = writes;
        self.bytes = bytes;
        Ok(())
    }

    /// Applies the writes atomically (one WAL batch) if nothing they depend on changed since
    /// the start; returns the sequence number of the commit's last write (its start if it
    /// wrote nothing). `Error::Conflict` leaves the database as it was. Durable as the
    /// database's `Options::durability` says.
    pub fn commit(mut self) -> Result<u64> {
        self.check_open()?;
        self.open = false;
        let mut batch = WriteBatch::new();
        for (k, w) in &self.writes {
            match w {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            };
        }
        let (start, isolation) = (self.start, self.opts.isolation);
        let (writes, reads) = (&self.writes, &self.reads);
        let check = |oracle: &crate::oracle::Oracle| -> Result<()> {
            if isolation == Isolation::ReadCommitted {
                return Ok(());
            }
            let conflict = |what: String| Err(Error::Conflict { what });
            for k in writes.keys() {
                if oracle.written_after(k, start) {
                    return conflict(format!("key {k:?} was written since the transaction began"));
                }
            }
            if isolation == Isolation::Serializable {
                for k in &reads.keys {
                    if oracle.written_after(k, start) {
                        return conflict(format!("key {k:?} it read was written since"));
                    }
                }
                for b in &reads.ranges {
                    if oracle.range_written_after(as_ref(&b.lo), as_ref(&b.hi), start) {
                        return conflict("a range it scanned was written since".into());
                    }
                }
            }
            Ok(())
        };
        let durability = self.inner.opts.durability;
        let r = if batch.is_empty() {
            // A read-only transaction still validates (at its commit point).
            let _w = self.inner.write.lock();
            check(&self.inner.oracle.lock()).map(|()| start)
        } else {
            self.inner.write_checked(&mut batch, durability, Some(&check))
        };
        self.end();
        r
    }

    /// Drops the writes; the transaction is over.
    pub fn rollback(mut self) {
        self.open = false;
        self.end();
    }

    fn end(&mut self) {
        if self.start != u64::MAX {
            self.inner.oracle.lock().end(self.start);
            self.inner.drop_snapshot(self.start);
            self.start = u64::MAX;
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        self.end();
    }
}

/// Whether no key lies between the bounds (which a `BTreeMap` range would refuse).
pub(crate) fn is_empty((lo, hi): (Bound<&[u8]>, Bound<&[u8]>)) -> bool {
    match (lo, hi) {
        (Bound::Included(l), Bound::Included(h)) => l > h,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(h))
        | (Bound::Excluded(l), Bound::Included(h)) => l >= h,
        _ => false,
    }
}

fn as_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(k),
        Bound::Excluded(k) => Bound::Excluded(k),
        Bound::Unbounded => Bound::Unbounded,
    }
}
