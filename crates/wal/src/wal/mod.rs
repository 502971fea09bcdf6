//! [`Wal`], the handle of an open log: `open` recovers the directory (`recovery`) and starts the
//! background threads (`workers`); every other call goes to the log's shared state (`inner`) and
//! the module that owns it: `write` (appends, group commit, flush and sync), `read`, `truncate`.
//! `close` (also on drop) stops the threads, syncs, and releases the directory lock.

mod inner;
mod read;
mod truncate;
mod workers;
mod write;

use std::fmt;
use std::fs::DirBuilder;
use std::ops::{Bound, Range, RangeBounds};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::options::{Options, SyncMode};
use crate::recovery::{lock_dir, recover};
use crate::spare::Spares;

use self::inner::Inner;
pub use self::read::Iter;
use self::workers::{spawn_finisher, spawn_preparer, spawn_ticker, spawn_writeback, Worker};

/// A write-ahead log in one directory. Cheap to share between threads (`&self` everywhere);
/// closed on drop.
pub struct Wal {
    inner: Arc<Inner>,
    ticker: Mutex<Option<Worker>>,
    finisher: Mutex<Option<Worker>>,
    preparer: Mutex<Option<Worker>>,
}

impl Wal {
    /// Opens the log in `dir`, creating the directory if needed, locking it, and recovering its
    /// contents (see the crate docs and `docs/format/wal.md` for the recovery policy).
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Wal> {
        opts.validate()?;
        let dir = dir.as_ref().to_path_buf();
        DirBuilder::new()
            .recursive(true)
            .mode(opts.dir_mode)
            .create(&dir)
            .map_err(|e| Error::io("create directory", &dir, e))?;
        let lock_file = lock_dir(&dir, opts.file_mode)?;
        let state = recover(&dir, &opts)?;
        let durable = AtomicU64::new(state.next);
        let gate = Gate::new(opts.syncs_in_flight);
        let inner = Arc::new(Inner {
            metrics: Metrics::new(&opts.name),
            readers: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(opts.reader_cache).expect("validated non-zero"),
            )),
            dir,
            opts,
            layout: RwLock::new(()),
            gate,
            state: Mutex::new(state),
            durable,
            poison: OnceLock::new(),
            closed: AtomicBool::new(false),
            lock_file: Mutex::new(Some(lock_file)),
            spare: Mutex::new(Spares::new()),
            spare_filled: Condvar::new(),
            want_spare: Mutex::new(None),
            kick: Mutex::new(None),
            rolling: Mutex::new(None),
            finishing: Mutex::new(()),
            roll_done: Mutex::new(None),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
            #[cfg(test)]
            after_sync: Mutex::new(None),
        });
        let ticker = match (inner.opts.sync, inner.opts.bytes_per_sync) {
            (SyncMode::Interval(every), _) => Some(spawn_ticker(inner.clone(), every)?),
            (SyncMode::Manual, Some(_)) => Some(spawn_writeback(inner.clone())?),
            _ => None,
        };
        let preparer =
            if inner.opts.preallocate { Some(spawn_preparer(inner.clone())?) } else { None };
        let finisher = match inner.opts.sync {
            SyncMode::Always => None,
            _ => Some(spawn_finisher(inner.clone())?),
        };
        Ok(Wal {
            inner,
            ticker: Mutex::new(ticker),
            preparer: Mutex::new(preparer),
            finisher: Mutex::new(finisher),
        })
    }

    /// Appends one record and returns its sequence number. In `SyncMode::Always` it returns once
    /// the record is durable.
    pub fn append(&self, record: &[u8]) -> Result<u64> {
        self.append_batch(&[record]).map(|r| r.start)
    }

    /// Appends records atomically: after a crash either all of them are present or none is. The
    /// batch must fit in one segment. Returns the range of their sequence numbers.
    pub fn append_batch<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<Range<u64>> {
        let range = self.inner.append(records)?;
        if self.inner.opts.sync == SyncMode::Always {
            self.inner.wait_durable(range.end)?;
        }
        Ok(range)
    }

    /// The record with sequence number `seq`.
    pub fn read(&self, seq: u64) -> Result<Bytes> {
        let mut run = self.inner.read_run(seq, seq.saturating_add(1), 0)?;
        Ok(run.pop().expect("a run holds at least one record").1)
    }

    /// Iterates over the live records whose sequence numbers lie in `range`, as they are when the
    /// iterator is created. Records truncated while iterating end it with `Error::NotFound`.
    pub fn iter(&self, range: impl RangeBounds<u64>) -> Iter {
        let (first, next) = {
            let st = self.inner.state.lock();
            (st.first(), st.next)
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        Iter::new(self.inner.clone(), start.max(first), end.min(next))
    }

    /// First live sequence number (equal to `next_seq` when the log is empty).
    pub fn first_seq(&self) -> u64 {
        self.inner.state.lock().first()
    }

    /// Sequence number of the last live record, if any.
    pub fn last_seq(&self) -> Option<u64> {
        let st = self.inner.state.lock();
        (st.next > st.first()).then(|| st.next - 1)
    }

    /// Sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.inner.state.lock().next
    }

    /// Number of live records.
    pub fn len(&self) -> u64 {
        let st = self.inner.state.lock();
        st.next - st.first()
    }

    /// Whether the log holds no live record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the log's segments take on disk, not counting preallocated space.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.state.lock().used()
    }

    /// Drops every record before `seq`. Segments holding only such records are deleted; the new
    /// first sequence number is persisted. With `seq` past the end the log becomes empty and the
    /// next append gets `seq`. Atomic under a crash.
    pub fn truncate_front(&self, seq: u64) -> Result<()> {
        self.inner.truncate_front(seq)
    }

    /// Drops `seq` and every record after it; the next append gets `seq`. Atomic under a crash.
    pub fn truncate_back(&self, seq: u64) -> Result<()> {
        self.inner.truncate_back(seq)
    }

    /// Hands every record appended so far to the operating system without waiting for the disk:
    /// they survive a crash of this process, not of the machine.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Makes every record appended so far durable.
    pub fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    /// Syncs what was written, stops the background sync thread and releases the directory lock.
    /// Later calls on this `Wal` fail with `Error::Closed`. Also done on drop.
    pub fn close(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        inner.kick.lock().take();
        if let Some(t) = self.ticker.lock().take() {
            t.stop();
        }
        inner.roll_done.lock().take();
        if let Some(f) = self.finisher.lock().take() {
            f.stop();
        }
        inner.want_spare.lock().take();
        if let Some(p) = self.preparer.lock().take() {
            p.stop();
        }
        inner.spare.lock().remove_all(&inner.dir);
        let r = if inner.poison.get().is_some() {
            Ok(())
        } else {
            let next = inner.state.lock().next;
            inner.wait_durable(next).and_then(|()| inner.record_synced())
        };
        inner.readers.lock().clear();
        inner.lock_file.lock().take();
        r
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(dir = %self.inner.dir.display(), error = %e, "closing WAL failed");
        }
    }
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state.lock();
        f.debug_struct("Wal")
            .field("dir", &self.inner.dir)
            .field("first", &st.first())
            .field("next", &st.next)
            .field("segments", &(st.sealed.len() + 1))
            .finish()
    }
}
