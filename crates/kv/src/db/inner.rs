//! `Inner`: the state of an open database, shared by its handle, snapshots, iterators and
//! background threads. What changes it lives in the modules beside this one: `open`, `write`
//! (the write path and its stalls), `read`, `flush` (the flush thread and the install of its
//! tables), `compact` (the compaction threads, merges and their install), `checkpoint`.
//!
//! Invariants:
//! - A reader loads the visible sequence number before the view; every write at or below it is in
//!   that view (memtable, immutable memtable or table), since views change atomically (see
//!   `view`).
//! - WAL records below `version.log_number` are all in tables named by the manifest; the WAL is
//!   truncated only after the manifest edit that raised `log_number` is durable.
//! - A table becomes part of the tree only after its file and directory entry are durable and the
//!   manifest edit naming it is fsynced.
//!
//! - A view replaced by a flush, a compaction or a memtable switch is dropped by a background
//!   thread (`retire`, `reap`), never by a writer: the last reference to a flushed memtable or
//!   to a version with obsolete tables frees that memtable or deletes those files, which takes
//!   milliseconds, and a writer holding the view when it was replaced would otherwise pay it.
//!
//! Lock order: `write` → `tree` → `view_lock` → `retired`; `bg` is taken alone or innermost;
//! `write` → `oracle` → `snapshots` → `freezes` (a freeze takes `freezes` alone, then `oracle`).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use parking_lot::{Condvar, Mutex};
use timber_wal::Wal;

use crate::arena::Spares;
use crate::cache::BlockCache;
use crate::error::{Error, Result};
use crate::manifest::{self, Manifest, TableMeta};
use crate::memtable::Memtable;
use crate::metrics::Metrics;
use crate::options::{Options, NUM_LEVELS};
use crate::stats::{Counters, LevelStats, Stall, Stats};
use crate::table::{self, Table, TableBuilder};
use crate::version::TableFile;
use crate::view::View;

use super::throttle::Pace;

/// The tree's bookkeeping, under its lock: the manifest, the next file id, the tables of running
/// compactions and where the round robin of each level stands.
pub(super) struct Tree {
    pub(super) manifest: Manifest,
    pub(super) next_file: u64,
    pub(super) busy: HashSet<u64>,
    pub(super) cursors: Vec<Vec<u8>>,
}

/// What the background threads wait on.
#[derive(Default)]
pub(super) struct Bg {
    pub(super) shutdown: bool,
}

/// The writer lock's state.
pub(super) struct Writer {
    pub(super) last_seq: u64,
}

/// What an open database shares between its handle, snapshots, iterators and threads.
pub(super) struct Inner {
    pub(super) dir: PathBuf,
    pub(super) opts: Options,
    pub(super) wal: Wal,
    /// Memory of flushed memtables kept for the next ones (see `arena`).
    pub(super) spares: Arc<Spares>,
    pub(super) cache: Arc<BlockCache>,
    pub(super) view: ArcSwap<View>,
    pub(super) view_lock: Mutex<()>,
    /// Views replaced since the last `reap`, dropped by a background thread once nothing else
    /// holds them.
    pub(super) retired: Mutex<Vec<Arc<View>>>,
    pub(super) write: Mutex<Writer>,
    pub(super) visible: AtomicU64,
    /// The live freezes (see `freeze`).
    pub(super) freezes: super::freeze::Freezes,
    pub(super) tree: Mutex<Tree>,
    pub(super) snapshots: Mutex<BTreeMap<u64, usize>>,
    /// What open transactions are validated against (taken after `write` when both are).
    pub(super) oracle: Mutex<crate::oracle::Oracle>,
    /// The oracle's records as lock-free hints (noted with them).
    pub(super) write_hints: crate::oracle::WriteHints,
    /// The key locks of pessimistic transactions.
    pub(super) locks: crate::locks::Locks,
    /// The id of the next transaction.
    pub(super) next_txn: AtomicU64,
    /// WAL positions that checkpoints in progress keep from truncation, with their counts.
    pub(super) wal_pins: Mutex<BTreeMap<u64, usize>>,
    pub(super) bg: Mutex<Bg>,
    pub(super) bg_cv: Condvar,
    pub(super) done_cv: Condvar,
    pub(super) poison: OnceLock<String>,
    pub(super) closed: AtomicBool,
    pub(super) counters: Counters,
    /// The pace of writes under pressure (see `throttle`).
    pub(super) pace: Mutex<Pace>,
    /// Whether the last write was under pressure (`pace` is left alone while none is).
    pub(super) pacing: AtomicBool,
    pub(super) metrics: Metrics,
}

/// Drops one count of `key` from a counted set (snapshots, WAL pins).
pub(super) fn release(counts: &mut BTreeMap<u64, usize>, key: u64) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// Bytes of memtables that only replaced views hold: an iterator keeps the memtables of the view
/// it was made on until it is dropped, and a replaced view stays in `retired` until a `reap`
/// finds nothing else holding it. Each memtable is counted once.
pub(super) fn reader_memtable_bytes(view: &View, retired: &[Arc<View>]) -> usize {
    // The current view's memtables are counted elsewhere.
    let mut seen: Vec<*const Memtable> =
        std::iter::once(&view.mem).chain(&view.imms).map(Arc::as_ptr).collect();
    let mut bytes = 0;
    for m in retired.iter().flat_map(|v| std::iter::once(&v.mem).chain(&v.imms)) {
        if !seen.contains(&Arc::as_ptr(m)) {
            seen.push(Arc::as_ptr(m));
            bytes += m.size();
        }
    }
    bytes
}

impl Inner {
    /// Makes `view` the current one (`view_lock` held) and keeps the one it replaces for `reap`.
    pub(super) fn install_view(&self, view: View) {
        let old = self.view.swap(Arc::new(view));
        self.retired.lock().push(old);
        self.update_cache_limit();
    }

    /// Under a memory budget, sets the block cache's limit to what the current view's
    /// memtables and pinned index and filter blocks, and the memtables readers still hold,
    /// leave of it (see [`Options::memory_budget`]).
    pub(super) fn update_cache_limit(&self) {
        if self.opts.memory_budget.is_none() {
            return;
        }
        let view = self.view.load();
        let imms = view.imms.iter().map(|m| m.size()).sum::<usize>()
            + reader_memtable_bytes(&view, &self.retired.lock())
            + self.spares.bytes();
        let pinned = view.version.levels.iter().flatten().map(|t| t.table.pinned_bytes()).sum();
        self.cache.set_limit(self.opts.cache_limit(imms, pinned));
    }

    /// Drops the replaced views that nothing else holds any more. Called by the background
    /// threads only (see the invariant above); a view still held by a reader stays for a later
    /// call, or is dropped by that reader.
    pub(super) fn reap(&self) {
        let done: Vec<Arc<View>> = {
            let mut retired = self.retired.lock();
            if retired.is_empty() {
                return;
            }
            let (done, kept) =
                std::mem::take(&mut *retired).into_iter().partition(|v| Arc::strong_count(v) == 1);
            *retired = kept;
            done
        };
        if !done.is_empty() {
            drop(done);
            self.update_cache_limit();
        }
    }

    pub(super) fn visible(&self) -> u64 {
        self.visible.load(Ordering::SeqCst)
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if let Some(cause) = self.poison.get() {
            return Err(Error::Poisoned { cause: cause.clone() });
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    pub(super) fn set_poison(&self, e: &Error) {
        if self.poison.set(e.to_string()).is_ok() {
            tracing::error!(dir = %self.dir.display(), error = %e, "database refuses writes from now on");
        }
        self.notify_done();
    }

    pub(super) fn notify_done(&self) {
        let _g = self.bg.lock();
        self.done_cv.notify_all();
    }

    pub(super) fn wake_bg(&self) {
        let _g = self.bg.lock();
        self.bg_cv.notify_all();
    }

    /// The error of a WAL flush or sync after a write was applied: the database refuses writes
    /// from then on (what reached the disk is only known after a reopen), unless it was closed.
    pub(super) fn wal_failed(&self, e: timber_wal::Error) -> Error {
        let e = Error::from(e);
        if !matches!(e, Error::Closed) {
            self.set_poison(&e);
        }
        e
    }

    pub(super) fn new_file_id(&self) -> u64 {
        let mut tree = self.tree.lock();
        let id = tree.next_file;
        tree.next_file += 1;
        id
    }

    /// Finishes a table being built, opens it, and counts its bytes.
    pub(super) fn finish_table(&self, id: u64, b: TableBuilder) -> Result<Arc<TableFile>> {
        let built = b.finish()?;
        let path = self.dir.join(table::file_name(id));
        let t = Table::open(&path, id, self.cache.clone(), self.opts.caches_index_and_filters())?;
        Ok(Arc::new(TableFile::new(meta_of(id, &built), t)))
    }

    /// Rewrites the manifest once it has grown past 64 MiB of edits (tree lock held).
    pub(super) fn maybe_switch_manifest(&self, tree: &mut Tree) -> Result<()> {
        if tree.manifest.len() < 64 << 20 {
            return Ok(());
        }
        let version = self.view.load().version.clone();
        let state = version.state(self.visible(), tree.next_file);
        let old = self.dir.join(manifest::file_name(tree.manifest.id));
        tree.manifest = Manifest::create(&self.dir, tree.manifest.id + 1, &state)?;
        fs::remove_file(&old).map_err(|e| Error::io("remove", &old, e))?;
        Ok(())
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "levels (the version's, and the stats built from them) hold NUM_LEVELS entries"
    )]
    pub(super) fn stats(&self) -> Stats {
        let view = self.view.load_full();
        let levels: Vec<LevelStats> = (0..NUM_LEVELS)
            .map(|l| LevelStats {
                files: view.version.levels[l].len(),
                bytes: view.version.level_bytes(l),
            })
            .collect();
        let (hits, misses) = self.cache.counts();
        let c = &self.counters;
        let user = c.user_bytes.load(Ordering::Relaxed);
        let flushed = c.flush_bytes.load(Ordering::Relaxed);
        let compacted = c.compaction_written.load(Ordering::Relaxed);
        let kinds = [
            Stall::SlowedByMemtables,
            Stall::SlowedByL0,
            Stall::StoppedByMemtables,
            Stall::StoppedByL0,
        ]
        .map(|k| c.stall(k));
        let mut pending = 0u64;
        if levels[0].files >= self.opts.l0_compaction_trigger {
            pending += levels[0].bytes;
        }
        for (l, s) in levels.iter().enumerate().take(NUM_LEVELS - 1).skip(1) {
            pending += s.bytes.saturating_sub(self.opts.level_target(l));
        }
        Stats {
            levels,
            memtable_bytes: view.mem.size() as u64,
            immutable_memtables: view.imms.len(),
            immutable_memtable_bytes: view.imms.iter().map(|m| m.size() as u64).sum(),
            reader_memtable_bytes: reader_memtable_bytes(&view, &self.retired.lock()) as u64,
            spare_memtable_bytes: self.spares.bytes() as u64,
            table_pinned_bytes: view
                .version
                .levels
                .iter()
                .flatten()
                .map(|t| t.table.pinned_bytes() as u64)
                .sum(),
            wal_bytes: self.wal.size_on_disk(),
            user_bytes_written: user,
            flush_bytes_written: flushed,
            compaction_bytes_read: c.compaction_read.load(Ordering::Relaxed),
            compaction_bytes_written: compacted,
            write_amplification: if user == 0 {
                0.0
            } else {
                (flushed + compacted) as f64 / user as f64
            },
            flushes: c.flushes.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            cache_bytes: self.cache.bytes() as u64,
            cache_index_filter_bytes: self.cache.index_filter_bytes() as u64,
            cache_limit: self.cache.limit() as u64,
            memory_budget: self.opts.memory_budget.map(|b| b as u64),
            pending_compaction_bytes: pending,
            stalls: kinds.iter().map(|k| k.count).sum(),
            stall_micros: kinds.iter().map(|k| k.micros).sum(),
            slowed_by_memtables: kinds[0],
            slowed_by_l0: kinds[1],
            stopped_by_memtables: kinds[2],
            stopped_by_l0: kinds[3],
            last_seq: self.visible(),
            snapshots: self.snapshots.lock().values().sum(),
        }
    }

    pub(super) fn publish_gauges(&self) {
        self.metrics.publish(&self.stats());
    }
}

/// What a new table adds to the manifest.
fn meta_of(id: u64, built: &table::Built) -> TableMeta {
    TableMeta {
        id,
        size: built.size,
        entries: built.entries,
        smallest: built.smallest.clone(),
        largest: built.largest.clone(),
    }
}
