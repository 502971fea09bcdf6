//! `Inner`: the state of an open log, shared by its handle, its iterators and its background
//! threads. What changes it lives in the modules beside this one: `write` (appends, rolls, group
//! commit), `read`, `truncate`, and the threads of `workers`.
//!
//! Invariants:
//! - Sequence numbers are dense: the live records are exactly `first..next`, and the segments on
//!   disk are contiguous (`sealed[i].end() == sealed[i + 1].start`, the last sealed one ends where
//!   the active one starts, and `active.end() == next`).
//! - Every record `< durable` is on stable storage. A roll seals (fsyncs) the old segment before
//!   the next is created, so syncing the active file makes everything up to `next` durable.
//! - A frame's synced claim (see `frame`) is `durable` as it was when the frame was encoded, so
//!   never more than what was on stable storage. `meta.synced_below` is stored only once it is
//!   durable (on close), and `truncate_back` lowers it at its commit point, before any record
//!   below the old value is removed.
//! - After any failed write or fsync the log is poisoned and refuses writes: the page cache may
//!   have dropped the data, so only a reopen (re-reading the disk) tells what is there.
//! - A group commit raises `durable` only after every group commit that took its flush point
//!   earlier has ended without error (they may overlap, see `Options::syncs_in_flight`), and it
//!   fsyncs through a file handle of its own slot: the kernel reports a writeback error once per
//!   open file, so no other fsync can have consumed the error that concerns its records.
//!
//! Lock order: `layout` (read: reads of sealed segments; write: truncations), then leadership of
//! the `gate` (a slot of a group-commit leader, or all of them for a truncation), then `state`,
//! then `readers`.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};

use lru::LruCache;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::options::Options;
use crate::segment::SegmentReader;
use crate::spare::Spares;
use crate::state::State;

/// What an open log shares between its handle, its iterators and its background threads.
pub(super) struct Inner {
    pub(super) dir: PathBuf,
    pub(super) opts: Options,
    pub(super) layout: RwLock<()>,
    pub(super) gate: Gate,
    pub(super) state: Mutex<State>,
    /// Every record with a smaller sequence number is durable.
    pub(super) durable: AtomicU64,
    pub(super) poison: OnceLock<String>,
    pub(super) closed: AtomicBool,
    pub(super) readers: Mutex<LruCache<u64, Arc<SegmentReader>>>,
    pub(super) lock_file: Mutex<Option<File>>,
    /// The files ready to become the next segment, signalled when a fill of the zero-filled one
    /// ends, and the way to ask the preparer for another.
    pub(super) spare: Mutex<Spares>,
    pub(super) spare_filled: Condvar,
    pub(super) want_spare: Mutex<Option<mpsc::Sender<()>>>,
    /// Asks the `Interval` sync thread or the writeback thread to start the writeback of what
    /// was appended (`bytes_per_sync`).
    pub(super) kick: Mutex<Option<mpsc::Sender<()>>>,
    /// The last roll, until its old segment and the new segment's name are durable
    /// (`Inner::finish_roll`), and the thread that finishes it (none under `SyncMode::Always`,
    /// where the appender's own sync does).
    pub(super) rolling: Mutex<Option<PendingRoll>>,
    pub(super) finishing: Mutex<()>,
    pub(super) roll_done: Mutex<Option<mpsc::Sender<()>>>,
    pub(super) metrics: Metrics,
    /// Makes the next fsync fail, to test poisoning.
    #[cfg(test)]
    pub(super) fail_next_sync: AtomicBool,
    /// Runs after a group commit's fsync with its ticket; an error counts as a failed fsync.
    #[cfg(test)]
    pub(super) after_sync: Mutex<Option<SyncHook>>,
}

/// What a roll leaves to make durable: the sealed segment (written, not yet fsynced) and the new
/// segment's header and name (it is written under its temporary name until then).
pub(super) struct PendingRoll {
    pub(super) old_file: File,
    pub(super) old_path: PathBuf,
    /// The sequence number after the sealed segment's last record.
    pub(super) old_end: u64,
    pub(super) new_start: u64,
    pub(super) new_file: File,
    pub(super) new_tmp: PathBuf,
    /// The new segment's `Active::header_durable`.
    pub(super) new_header_durable: Arc<AtomicBool>,
}

#[cfg(test)]
pub(super) type SyncHook = Arc<dyn Fn(u64) -> Result<()> + Send + Sync>;

impl Inner {
    pub(super) fn check_writable(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        match self.poison.get() {
            Some(cause) => Err(Error::Poisoned { cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Poisons the log if `r` is an error: after a failed write or sync nothing is known about
    /// what reached the disk.
    pub(super) fn poisoning<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if self.poison.set(e.to_string()).is_ok() {
                tracing::error!(dir = %self.dir.display(), error = %e, "WAL poisoned: refusing further writes");
            }
        }
        r
    }
}
