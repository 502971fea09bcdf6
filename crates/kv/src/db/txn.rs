//! `Transaction`: optimistic MVCC transactions over the engine's sequence numbers.
//!
//! A transaction reads a snapshot registered at its start (its start timestamp: the sequence
//! number of the last write it sees) through its own writes, which it buffers; `commit` writes
//! them as one WAL batch (its commit timestamp: that batch's sequence numbers), after checking
//! under the writer lock, so that no write comes in between, that nothing it depends on was
//! written since its start (the `Oracle` records every write while transactions are open):
//!
//! - `ReadCommitted`: each read sees the latest committed state; nothing is checked (lost
//!   updates and every anomaly above are possible), but for a pessimistic read of a locked key
//!   that a freeze held back (`freeze`), which is checked as under `Snapshot`.
//! - `Snapshot`: reads see the start snapshot; a key it writes that anyone wrote after its
//!   start is a conflict (first committer wins), so no lost update, no dirty or fuzzy read;
//!   write skew is possible.
//! - `Serializable`: as `Snapshot`, and every key it read and every range it scanned must be
//!   unwritten since its start (a write into a scanned range conflicts, one outside does not):
//!   committed transactions are equivalent to their execution one by one in commit order.
//!
//! An optimistic `Snapshot` or `Serializable` transaction about to read, for its commit check,
//! a key written since its start (one it would fail on) first moves its snapshot to now, if
//! it could commit now (everything it read is still what it read) and its reads were all
//! tracked (under `Snapshot`, only reads for update: a plain get or scan fixes the snapshot):
//! a transaction that started at the new point would have read and written the same, so the
//! isolation is that of one started there, and only writes after the key was read can make it
//! fail. This narrows the window of a conflict as RocksDB's optimistic transactions without a
//! snapshot do, keeping reads on one snapshot.
//!
//! An optimistic `Snapshot` or `Serializable` transaction begins after a write under way (one
//! holding the writer lock), waiting for it up to `BEGIN_WAITS_FOR_WRITE`, so that its snapshot
//! holds that write rather than conflicting with it: a shorter window, the same isolation.
//!
//! A conflict is `Error::Conflict` (retryable: nothing was written). A dropped transaction
//! rolls back. An open transaction keeps the versions its snapshot needs, and its writes in
//! memory: `TxnOptions` limits its size and age.
//!
//! `Mode::Pessimistic` adds key locks ([`crate::locks`]): a write or `get_for_update` takes the
//! key's exclusive lock (waiting for its holders; `Error::Deadlock` at once for the request
//! that would close a cycle, `Error::LockTimeout` after `lock_timeout`), a `Serializable` get
//! a shared one; a locked key is read as of when it was locked (its latest committed value),
//! and its commit check starts there (so only a write outside transactions, which takes no
//! lock, can still conflict), unless the transaction read it from its snapshot before. Ranges
//! are not locked: a `Serializable` scan is validated at commit as in optimistic mode.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeBounds;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::batch::WriteBatch;
use crate::bounds::{is_empty_range, prefix_bounds, user_bounds, Bounds};
use crate::error::{Error, Result};
use crate::locks::TxnId;

use super::inner::Inner;
use super::snapshot::Snapshot;

/// How long a beginning optimistic transaction waits for a write under way to become visible.
const BEGIN_WAITS_FOR_WRITE: Duration = Duration::from_micros(50);

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

/// How a transaction meets other transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Conflicts are found at commit (`Error::Conflict`).
    Optimistic,
    /// Keys are locked as they are written or read for update; conflicts wait.
    Pessimistic,
}

/// Options of [`crate::Db::transaction`].
#[derive(Debug, Clone)]
pub struct TxnOptions {
    /// Isolation level (default `Snapshot`).
    pub isolation: Isolation,
    /// Optimistic (default) or pessimistic.
    pub mode: Mode,
    /// How long a pessimistic transaction waits for a key's lock (default 1 s).
    pub lock_timeout: Duration,
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
            mode: Mode::Optimistic,
            lock_timeout: Duration::from_secs(1),
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

    /// Default options at isolation `isolation`, pessimistic.
    pub fn pessimistic(isolation: Isolation) -> TxnOptions {
        TxnOptions { isolation, mode: Mode::Pessimistic, ..TxnOptions::default() }
    }
}

/// What a transaction read, for the validation of a `Serializable` commit (and the keys read
/// for update, in optimistic mode).
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
    /// Its id in the lock table.
    id: TxnId,
    /// Pessimistic: each key it locked, with the sequence number its commit check starts at.
    locked: BTreeMap<Bytes, u64>,
    /// Locked keys whose read a freeze held back: checked at commit even when read-committed.
    held_reads: BTreeSet<Bytes>,
    /// Pessimistic: keys it read from its snapshot (a later lock keeps checking from the start).
    snapshot_reads: BTreeSet<Bytes>,
    /// Whether its snapshot may move forward (see the module doc): optimistic, `Snapshot` or
    /// `Serializable`, and no untracked read from the snapshot yet.
    movable: bool,
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
        if opts.mode == Mode::Optimistic && opts.isolation != Isolation::ReadCommitted {
            // A write under way (past its commit check, if it is a commit) is about to be
            // visible: a snapshot taken before it would miss it, and reading a key it writes
            // would fail this transaction at commit. A short wait for it costs less than that
            // abort; a write held up longer (a stall, a writer off its core) is not waited for.
            drop(inner.write.try_lock_for(BEGIN_WAITS_FOR_WRITE));
        }
        let start = {
            // Under the oracle's lock: a write records its keys if it sees this transaction
            // open, or is visible in its snapshot (see `Oracle`).
            let mut oracle = inner.oracle.lock();
            let start = inner.add_snapshot();
            oracle.begin(start);
            start
        };
        Transaction {
            start,
            began: Instant::now(),
            writes: BTreeMap::new(),
            bytes: 0,
            reads: ReadSet::default(),
            savepoints: Vec::new(),
            open: true,
            id: inner.next_txn.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            locked: BTreeMap::new(),
            held_reads: BTreeSet::new(),
            snapshot_reads: BTreeSet::new(),
            movable: opts.mode == Mode::Optimistic && opts.isolation != Isolation::ReadCommitted,
            opts,
            inner,
        }
    }

    /// The sequence number of the last write its snapshot sees (its start timestamp; an
    /// optimistic transaction may move it forward, see the module doc).
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

    /// The value of `key`: its own write if it wrote it, else as its isolation level reads
    /// (pessimistic and `Serializable`: under a shared lock, as of when it was locked).
    pub fn get(&mut self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.read(key.as_ref(), false)
    }

    /// [`Transaction::get`] of a key it means to write: pessimistic, it takes the key's
    /// exclusive lock and reads the latest committed value; optimistic, the key is checked at
    /// commit as if written (a write by another since its start is a conflict, at every
    /// isolation level but `ReadCommitted`).
    pub fn get_for_update(&mut self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.read(key.as_ref(), true)
    }

    fn read(&mut self, key: &[u8], for_update: bool) -> Result<Option<Bytes>> {
        self.check_open()?;
        crate::batch::validate(key, None).map_err(Error::InvalidParam)?;
        let pessimistic = self.opts.mode == Mode::Pessimistic;
        let serializable = self.opts.isolation == Isolation::Serializable;
        if pessimistic && (for_update || serializable) {
            self.lock(key, for_update)?;
        }
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        let v = match (self.opts.isolation, self.locked.contains_key(key)) {
            // Locked: nobody else writes it now; its latest value is the one to read.
            (_, true) | (Isolation::ReadCommitted, false) => {
                let (v, held) = self.inner.get_latest_held(key)?;
                // A freeze held the read back (see `freeze`): a locked key's check starts from
                // what the read saw, at every isolation level.
                if let (Some(seq), Some(from)) = (held, self.locked.get_mut(key)) {
                    *from = (*from).min(seq);
                    self.held_reads.insert(Bytes::copy_from_slice(key));
                }
                v
            }
            _ => {
                if pessimistic {
                    self.snapshot_reads.insert(Bytes::copy_from_slice(key));
                } else if for_update || serializable {
                    self.move_past(key);
                } else {
                    self.movable = false;
                }
                self.inner.get_at(key, self.start)?
            }
        };
        if serializable || (for_update && !pessimistic) {
            self.reads.keys.push(Bytes::copy_from_slice(key));
        }
        Ok(v)
    }

    /// Moves the snapshot to now if `key` was written since the start (its commit would then
    /// fail), the snapshot may move, and the transaction could commit now.
    fn move_past(&mut self, key: &[u8]) {
        // Under a freeze a new snapshot would start before it (see `freeze`): not moved then.
        if !self.movable
            || self.inner.freezes.any()
            || !self.inner.write_hints.maybe_written_after(key, self.start)
            || !self.inner.oracle.lock().written_after(key, self.start)
        {
            return;
        }
        // Under the writer lock, every visible write has recorded its keys in the oracle.
        let _w = self.inner.write.lock();
        let mut oracle = self.inner.oracle.lock();
        if self.check(&oracle).is_err() {
            return;
        }
        let now = self.inner.add_snapshot();
        oracle.begin(now);
        oracle.end(self.start);
        drop(oracle);
        self.inner.drop_snapshot(self.start);
        self.start = now;
    }

    /// Takes `key`'s lock (exclusive or shared), remembering where its commit check starts.
    fn lock(&mut self, key: &[u8], exclusive: bool) -> Result<()> {
        self.inner.locks.acquire(self.id, key, exclusive, self.opts.lock_timeout)?;
        if !self.locked.contains_key(key) {
            let from = match self.snapshot_reads.contains(key) {
                true => self.start,
                false => self.inner.visible(),
            };
            self.locked.insert(Bytes::copy_from_slice(key), from);
        }
        Ok(())
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
        if self.opts.mode == Mode::Pessimistic {
            self.lock(key, true)?;
        }
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
        self.scan_bounds(user_bounds(&range), usize::MAX)
    }

    /// [`Transaction::scan`] of the first `limit` keys only: it reads no further, and
    /// `Serializable` records the range only up to the last key returned (a write beyond it
    /// is no conflict).
    pub fn scan_limit<K: AsRef<[u8]>>(
        &mut self,
        range: impl RangeBounds<K>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        self.scan_bounds(user_bounds(&range), limit)
    }

    /// [`Transaction::scan`] in descending key order.
    pub fn scan_rev<K: AsRef<[u8]>>(
        &mut self,
        range: impl RangeBounds<K>,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let mut v = self.scan_bounds(user_bounds(&range), usize::MAX)?;
        v.reverse();
        Ok(v)
    }

    /// [`Transaction::scan`] of the keys starting with `prefix`.
    pub fn prefix(&mut self, prefix: impl AsRef<[u8]>) -> Result<Vec<(Bytes, Bytes)>> {
        self.scan_bounds(prefix_bounds(prefix.as_ref()), usize::MAX)
    }

    /// Up to `limit` live pairs of `bounds`: the snapshot's (or the latest) merged in key
    /// order with its own writes, which win.
    fn scan_bounds(&mut self, bounds: Bounds, limit: usize) -> Result<Vec<(Bytes, Bytes)>> {
        self.check_open()?;
        let mut it = match self.opts.isolation {
            Isolation::ReadCommitted => self.inner.iter_latest(bounds.clone()),
            _ => self.inner.iter(self.start, bounds.clone()),
        };
        // Pessimistic: a key read here from the snapshot, if locked later, is checked from the
        // start (as one read by `get`).
        let from_snapshot =
            self.opts.mode == Mode::Pessimistic && self.opts.isolation != Isolation::ReadCommitted;
        let range = bounds.as_range();
        let mut own = match is_empty_range(range) {
            true => None,
            false => Some(self.writes.range::<[u8], _>(range).peekable()),
        };
        let mut snap = it.next().transpose()?;
        let mut out = Vec::new();
        let mut snapshot_keys = Vec::new();
        while out.len() < limit {
            let own_next = own.as_mut().and_then(|o| o.peek().map(|(k, _)| (*k).clone()));
            let take_own = match (&snap, &own_next) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((sk, _)), Some(ok)) => ok <= sk,
            };
            if take_own {
                let Some((k, w)) = own.as_mut().and_then(Iterator::next) else { break };
                if snap.as_ref().is_some_and(|(sk, _)| sk == k) {
                    snap = it.next().transpose()?;
                }
                if let Some(v) = w {
                    out.push((k.clone(), v.clone()));
                }
            } else if let Some((k, v)) = snap.take() {
                if from_snapshot && !self.locked.contains_key(&k) {
                    snapshot_keys.push(k.clone());
                }
                out.push((k, v));
                snap = it.next().transpose()?;
            }
        }
        self.snapshot_reads.extend(snapshot_keys);
        if self.opts.isolation == Isolation::Snapshot {
            self.movable = false;
        }
        if self.opts.isolation == Isolation::Serializable {
            // Read only up to the last key returned when the limit cut the scan.
            let read = match out.last() {
                Some((last, _)) if out.len() >= limit => {
                    Bounds { lo: bounds.lo, hi: std::ops::Bound::Included(last.to_vec()) }
                }
                _ => bounds,
            };
            self.reads.ranges.push(read);
        }
        Ok(out)
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
        let mut batch = self.batch();
        let start = self.start;
        let check = |oracle: &crate::oracle::Oracle| self.check(oracle);
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

    /// Validates the transaction now and, if nothing it depends on changed since its start,
    /// hands its writes to `write` instead of writing them itself: for a caller that writes
    /// through a replicated log applied to this database. `write` also gets a snapshot of the
    /// database as the check saw it (the check runs under the writer lock, when every visible
    /// write is accounted for), where each key and range the transaction depends on holds
    /// what it read: what the caller must keep true until its write lands (by holding the
    /// keys' locks, or by having the write applied only if they still hold it). `Err` is a
    /// conflict (or a closed or expired transaction); `Ok` is what `write` returned.
    pub fn commit_with<E>(
        mut self,
        write: impl FnOnce(WriteBatch, &Snapshot) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<(), E>> {
        self.check_open()?;
        self.open = false;
        let checked = {
            let _w = self.inner.write.lock();
            self.check(&self.inner.oracle.lock()).map(|()| Snapshot::new(self.inner.clone()))
        };
        let r = checked.map(|seen| write(self.batch(), &seen));
        self.end();
        r
    }

    /// The keys it wrote (or deleted) so far.
    pub fn written_keys(&self) -> impl Iterator<Item = &Bytes> {
        self.writes.keys()
    }

    /// Its isolation level.
    pub fn isolation(&self) -> Isolation {
        self.opts.isolation
    }

    /// The key ranges its commit validates (those it scanned, under `Serializable`).
    pub fn read_ranges(
        &self,
    ) -> impl Iterator<Item = (std::ops::Bound<&[u8]>, std::ops::Bound<&[u8]>)> {
        self.reads.ranges.iter().map(Bounds::as_range)
    }

    /// The keys whose reads its commit validates (not the ranges it scanned).
    pub fn read_keys(&self) -> impl Iterator<Item = &Bytes> {
        self.reads.keys.iter()
    }

    fn batch(&self) -> WriteBatch {
        let mut batch = WriteBatch::new();
        for (k, w) in &self.writes {
            match w {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            };
        }
        batch
    }

    /// Whether nothing it depends on was written since it read it, as `oracle` says.
    fn check(&self, oracle: &crate::oracle::Oracle) -> Result<()> {
        let (start, isolation) = (self.start, self.opts.isolation);
        // A locked key is checked from when it was locked (or from what a held read saw).
        let since = |k: &Bytes| self.locked.get(k).copied().unwrap_or(start);
        if isolation == Isolation::ReadCommitted {
            // Nothing, but for a locked key whose read a freeze held back (see `freeze`): its
            // lock did not make that read the latest.
            for k in &self.held_reads {
                if self.writes.contains_key(k) && oracle.written_after(k, since(k)) {
                    return Err(Error::Conflict {
                        what: format!("key {k:?} was written since the transaction read it"),
                    });
                }
            }
            return Ok(());
        }
        let conflict = |what: String| Err(Error::Conflict { what });
        for k in self.writes.keys() {
            if oracle.written_after(k, since(k)) {
                return conflict(format!("key {k:?} was written since the transaction read it"));
            }
        }
        // Serializable reads and ranges, and optimistic reads for update.
        for k in &self.reads.keys {
            if oracle.written_after(k, since(k)) {
                return conflict(format!("key {k:?} it read was written since"));
            }
        }
        for b in &self.reads.ranges {
            if oracle.range_written_after(b.as_range(), start) {
                return conflict("a range it scanned was written since".into());
            }
        }
        Ok(())
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
        if !self.locked.is_empty() {
            self.inner.locks.release(self.id, std::mem::take(&mut self.locked).into_keys());
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        self.end();
    }
}
