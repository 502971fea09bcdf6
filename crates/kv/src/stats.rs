//! Engine statistics: what `Db::stats` returns and the counters behind it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Files and bytes of one level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LevelStats {
    /// Number of SSTables.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
}

/// Writes held back for one cause, and how long they waited in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StallStats {
    /// Writes held back.
    pub count: u64,
    /// Their total wait.
    pub micros: u64,
}

/// A picture of the engine's state and work so far (since open).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Stats {
    /// L0..L6.
    pub levels: Vec<LevelStats>,
    /// Bytes in the active memtable.
    pub memtable_bytes: u64,
    /// Immutable memtables waiting for flush.
    pub immutable_memtables: usize,
    /// Bytes in the immutable memtables.
    pub immutable_memtable_bytes: u64,
    /// Bytes of memtables no longer in use for writes or flushes that readers still hold (an
    /// iterator keeps the memtables it was created over until it is dropped). Under a memory
    /// budget they are charged before the block cache.
    pub reader_memtable_bytes: u64,
    /// Memory of flushed memtables kept for the next ones to fill (at most one memtable's
    /// size), instead of being given back to the OS and mapped again.
    pub spare_memtable_bytes: u64,
    /// Bytes the open SSTables keep in memory outside the block cache (index and filter blocks,
    /// unless they are cached).
    pub table_pinned_bytes: u64,
    /// Size of the write-ahead log on disk.
    pub wal_bytes: u64,
    /// Key and value bytes written by users.
    pub user_bytes_written: u64,
    /// Bytes of SSTables written by flushes.
    pub flush_bytes_written: u64,
    /// Bytes of SSTables read by compactions.
    pub compaction_bytes_read: u64,
    /// Bytes of SSTables written by compactions.
    pub compaction_bytes_written: u64,
    /// (flush + compaction bytes written) / user bytes written (the WAL is not counted).
    pub write_amplification: f64,
    /// Flushes done.
    pub flushes: u64,
    /// Compactions done (trivial moves included).
    pub compactions: u64,
    /// Block cache hits.
    pub cache_hits: u64,
    /// Block cache misses.
    pub cache_misses: u64,
    /// hits / (hits + misses).
    pub cache_hit_rate: f64,
    /// Bytes held by the block cache.
    pub cache_bytes: u64,
    /// Of `cache_bytes`, those of tables' index and filter blocks (with
    /// `Options::cache_index_and_filter_blocks`).
    pub cache_index_filter_bytes: u64,
    /// The block cache's current limit (under a memory budget, what the memtables and the
    /// tables' index and filter blocks leave of it).
    pub cache_limit: u64,
    /// [`crate::Options::memory_budget`], if set.
    pub memory_budget: Option<u64>,
    /// Bytes above the levels' targets (and all of L0 once it is at its trigger).
    pub pending_compaction_bytes: u64,
    /// Writes that were slowed or stopped waiting for flush or compaction (the sum of the four
    /// causes below).
    pub stalls: u64,
    /// Total time writes spent stalled.
    pub stall_micros: u64,
    /// Writes paced while every immutable-memtable slot was taken (`Options::delayed_write_rate`).
    pub slowed_by_memtables: StallStats,
    /// Writes paced while L0 was past its slowdown trigger.
    pub slowed_by_l0: StallStats,
    /// Writes stopped until a flush made room for a memtable.
    pub stopped_by_memtables: StallStats,
    /// Writes stopped while L0 was at its stop trigger.
    pub stopped_by_l0: StallStats,
    /// Sequence number of the last visible write.
    pub last_seq: u64,
    /// Live snapshots.
    pub snapshots: usize,
}

impl Stats {
    /// What the engine holds in memory of what a memory budget charges: memtables (also those
    /// readers hold), pinned index and filter blocks, and the block cache.
    pub fn memory_bytes(&self) -> u64 {
        self.memtable_bytes
            + self.immutable_memtable_bytes
            + self.reader_memtable_bytes
            + self.spare_memtable_bytes
            + self.table_pinned_bytes
            + self.cache_bytes
    }

    /// Bytes of all SSTables.
    pub fn table_bytes(&self) -> u64 {
        self.levels.iter().map(|l| l.bytes).sum()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) user_bytes: AtomicU64,
    pub(crate) flush_bytes: AtomicU64,
    pub(crate) compaction_read: AtomicU64,
    pub(crate) compaction_written: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) compactions: AtomicU64,
    /// Count and microseconds of each (slowdown or stop, cause): see [`Stall`].
    pub(crate) stalls: [[AtomicU64; 2]; 4],
}

/// A kind of held-back write, indexing `Counters::stalls`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stall {
    SlowedByMemtables = 0,
    SlowedByL0 = 1,
    StoppedByMemtables = 2,
    StoppedByL0 = 3,
}

impl Counters {
    pub(crate) fn record_stall(&self, kind: Stall, d: Duration) {
        if let Some([count, micros]) = self.stalls.get(kind as usize) {
            count.fetch_add(1, Ordering::Relaxed);
            micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn stall(&self, kind: Stall) -> StallStats {
        self.stalls.get(kind as usize).map_or_else(StallStats::default, |[count, micros]| {
            StallStats {
                count: count.load(Ordering::Relaxed),
                micros: micros.load(Ordering::Relaxed),
            }
        })
    }
}
