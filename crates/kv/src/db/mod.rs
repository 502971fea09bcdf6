//! [`Db`], the handle of an open database, and [`Snapshot`]. `open` recovers the directory
//! (`open`); every other call goes to the database's shared state (`inner`) and the module that
//! owns it: `write` (with `throttle`, the pace of writes under pressure), `read`, `flush`,
//! `compact`, `checkpoint`. `close` (also on drop) stops the
//! background threads and syncs the WAL.

mod checkpoint;
mod compact;
mod flush;
mod freeze;
mod inner;
mod open;
mod read;
mod snapshot;
mod throttle;
mod txn;
mod write;

use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::batch::WriteBatch;
use crate::bounds::{prefix_bounds, user_bounds};
use crate::error::{Error, Result};
use crate::iter::Iter;
use crate::options::{Durability, Options};
use crate::stats::Stats;

pub use self::freeze::Freeze;
use self::inner::Inner;
pub use self::snapshot::Snapshot;
pub use self::txn::{Isolation, Mode, Transaction, TxnOptions};

/// An embedded key-value database: an LSM tree on a write-ahead log. All methods take `&self`
/// and may be called from many threads; share a `Db` with an `Arc`.
pub struct Db {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("dir", &self.inner.dir).finish()
    }
}

impl Db {
    /// Opens (or creates) the database in `dir`: replays the manifest and the WAL, and starts the
    /// background threads. Fails with `Locked` if another handle has it open.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Db> {
        let (inner, threads) = open::open(dir.as_ref(), opts)?;
        Ok(Db { inner, threads: Mutex::new(threads) })
    }

    /// The value of `key`, or `None`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.inner.get_latest(key.as_ref())
    }

    /// The values of several keys (`None` for each absent one), in the order of `keys`: each
    /// as [`Db::get`] gives it, read one after another, not a snapshot across them (use a
    /// [`crate::Snapshot`] for that). Faster than as many `get`s: the keys' entries are loaded
    /// together.
    pub fn get_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Bytes>>> {
        self.inner.get_many_latest(keys)
    }

    /// Sets `key` to `value` with the database's default durability.
    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let (key, value) = (key.as_ref(), value.as_ref());
        let mut b = WriteBatch::with_capacity(key.len() + value.len());
        b.put(key, value);
        self.write(b)
    }

    /// Removes `key` (a no-op if absent) with the database's default durability.
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<()> {
        let mut b = WriteBatch::new();
        b.delete(key);
        self.write(b)
    }

    /// Applies a batch atomically with the database's default durability.
    pub fn write(&self, batch: WriteBatch) -> Result<()> {
        self.write_with(batch, self.inner.opts.durability)
    }

    /// Applies a batch atomically with the given durability; returns once it is visible and, for
    /// `Synced`, on disk.
    pub fn write_with(&self, mut batch: WriteBatch, durability: Durability) -> Result<()> {
        self.inner.write(&mut batch, durability).map(|_| ())
    }

    /// Makes every write made so far durable (one WAL fsync, shared with concurrent callers).
    /// Lets a caller write a run of batches `Deferred` and pay for one sync at the end.
    pub fn sync(&self) -> Result<()> {
        self.inner.check_writable()?;
        self.inner.wal.sync().map_err(|e| self.inner.wal_failed(e))
    }

    /// Live keys in `range`, in order (`.rev()` for descending), at the current point in time.
    pub fn scan<K: AsRef<[u8]>>(&self, range: impl RangeBounds<K>) -> Iter {
        self.inner.iter_latest(user_bounds(&range))
    }

    /// Every live key, in order.
    pub fn iter(&self) -> Iter {
        self.scan::<&[u8]>(..)
    }

    /// Live keys starting with `prefix`, in order.
    pub fn prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        self.inner.iter_latest(prefix_bounds(prefix.as_ref()))
    }

    /// A consistent point-in-time view; versions it needs are kept until it is dropped.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::new(self.inner.clone())
    }

    /// Holds reads of the keys in `ranges` (each `[start, end)`) at this moment until the
    /// returned [`Freeze`] is dropped, so that a change to them made in many write batches
    /// meanwhile (deleting every key of a range) is seen whole or not at all: reads as of now of
    /// those keys, and new snapshots and transactions, read as of the freeze. The caller keeps
    /// every other writer out of the ranges while it holds it (their writes would be hidden
    /// until then).
    pub fn freeze<K: AsRef<[u8]>>(&self, ranges: &[(K, K)]) -> Freeze {
        Freeze::new(self.inner.clone(), ranges)
    }

    /// Writes every memtable to SSTables and waits for it.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Compacts every table overlapping `range` down to the deepest level that holds data,
    /// dropping overwritten versions and tombstones no snapshot needs. Waits for it.
    pub fn compact_range<K: AsRef<[u8]>>(&self, range: impl RangeBounds<K>) -> Result<()> {
        self.inner.compact_range(&user_bounds(&range))
    }

    /// Writes a consistent copy of the database into `dir` (which must not exist): SSTables are
    /// hard-linked (copied across file systems), the live WAL is copied. The copy opens as a
    /// database equal to a snapshot taken when the call began. Returns the sequence number of the
    /// last write the copy holds.
    pub fn checkpoint(&self, dir: impl AsRef<Path>) -> Result<u64> {
        self.inner.checkpoint(dir.as_ref())
    }

    /// Begins a transaction (see [`Transaction`] for what each isolation level guarantees).
    pub fn transaction(&self, opts: TxnOptions) -> Transaction {
        Transaction::begin(self.inner.clone(), opts)
    }

    /// Sizes, amplification, cache and stall figures.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// The sequence number of the last visible write.
    pub fn last_seq(&self) -> u64 {
        self.inner.visible()
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops the background threads, syncs the WAL and closes it, which releases the directory.
    /// Later writes fail with `Closed` (or `Poisoned`). A database that refuses writes after a
    /// failure is closed too (its WAL is synced unless the WAL failed itself). Also done on drop.
    pub fn close(&self) -> Result<()> {
        {
            let mut bg = self.inner.bg.lock();
            if bg.shutdown {
                return Ok(());
            }
            bg.shutdown = true;
            self.inner.closed.store(true, Ordering::Release);
        }
        self.inner.bg_cv.notify_all();
        self.inner.done_cv.notify_all();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        self.inner.wal.close().map_err(Error::from)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(dir = %self.inner.dir.display(), error = %e, "closing database failed");
        }
    }
}
