//! Options of a database, as a builder. Defaults follow RocksDB's where they apply.

use crate::error::{Error, Result};

/// Largest key accepted (64 KiB).
pub const MAX_KEY_LEN: usize = 64 << 10;
/// Largest value accepted (512 MiB).
pub const MAX_VALUE_LEN: usize = 512 << 20;
/// Number of levels of the tree (L0..L6).
pub const NUM_LEVELS: usize = 7;

/// Per-block compression of SSTables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Blocks are stored as built.
    #[default]
    None,
    /// LZ4 block compression; a block that does not shrink by 1/8 is stored uncompressed.
    Lz4,
}

/// How durable a write is when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The write reached the operating system: it survives a crash of the process, not a power
    /// loss (RocksDB's `sync = false`).
    #[default]
    Buffered,
    /// The write is on disk (fdatasync, shared by concurrent writers): it survives power loss.
    Synced,
    /// The write is in the WAL's buffer in this process until the next [`crate::Db::sync`] (or
    /// the WAL's interval sync, or a full buffer): a crash of the process can lose it. For a
    /// caller that makes a run of writes and then syncs once before acknowledging any of them
    /// (a pipeline of commands); cheaper for that than `Buffered` writes and a sync, because
    /// records the sync writes itself are faster to fsync than ones already handed to the OS.
    Deferred,
}

/// Options of [`crate::Db::open`].
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) memtable_size: usize,
    pub(crate) memtable_hash_index: bool,
    pub(crate) max_immutable_memtables: usize,
    pub(crate) block_size: usize,
    pub(crate) restart_interval: usize,
    pub(crate) bloom_bits_per_key: u32,
    pub(crate) compression: Compression,
    pub(crate) block_cache_bytes: usize,
    pub(crate) memory_budget: Option<usize>,
    pub(crate) cache_index_and_filter_blocks: Option<bool>,
    pub(crate) l0_compaction_trigger: usize,
    pub(crate) l0_slowdown_trigger: usize,
    pub(crate) l0_stop_trigger: usize,
    pub(crate) delayed_write_rate: u64,
    pub(crate) l1_target_bytes: u64,
    pub(crate) level_multiplier: u64,
    pub(crate) target_file_size: u64,
    pub(crate) compaction_threads: usize,
    pub(crate) idle_compaction_after: Option<std::time::Duration>,
    pub(crate) durability: Durability,
    pub(crate) wal_segment_size: u64,
    pub(crate) wal_sync_interval: Option<std::time::Duration>,
    pub(crate) create_if_missing: bool,
    pub(crate) name: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            memtable_size: 64 << 20,
            memtable_hash_index: false,
            max_immutable_memtables: 2,
            block_size: 4096,
            restart_interval: 16,
            bloom_bits_per_key: 10,
            compression: Compression::None,
            block_cache_bytes: 64 << 20,
            memory_budget: None,
            cache_index_and_filter_blocks: None,
            l0_compaction_trigger: 4,
            l0_slowdown_trigger: 20,
            l0_stop_trigger: 36,
            delayed_write_rate: 16 << 20,
            l1_target_bytes: 256 << 20,
            level_multiplier: 10,
            target_file_size: 64 << 20,
            compaction_threads: 1,
            idle_compaction_after: Some(std::time::Duration::from_secs(1)),
            durability: Durability::Buffered,
            wal_segment_size: 16 << 20,
            wal_sync_interval: Some(std::time::Duration::from_millis(200)),
            create_if_missing: true,
            name: "kv".to_owned(),
        }
    }
}

impl Options {
    /// Size at which the memtable becomes immutable and is flushed (default 64 MiB).
    pub fn memtable_size(mut self, bytes: usize) -> Self {
        self.memtable_size = bytes;
        self
    }

    /// Keep a hash index of each key's newest version beside the memtable's skiplist (default
    /// off). Point reads of recently written keys then cost a hash lookup instead of a skiplist
    /// search, and writes pay for the index (a hash and a shard lock each) and its memory
    /// (counted in the memtable size). Worth it when most reads are point reads of keys written
    /// recently.
    pub fn memtable_hash_index(mut self, on: bool) -> Self {
        self.memtable_hash_index = on;
        self
    }

    /// Immutable memtables waiting for flush before writes stall (default 2).
    pub fn max_immutable_memtables(mut self, n: usize) -> Self {
        self.max_immutable_memtables = n;
        self
    }

    /// Target size of an SSTable data block before compression (default 4 KiB).
    pub fn block_size(mut self, bytes: usize) -> Self {
        self.block_size = bytes;
        self
    }

    /// Bloom filter bits per key (default 10, about 0.8% false positives; 0 disables filters).
    pub fn bloom_bits_per_key(mut self, bits: u32) -> Self {
        self.bloom_bits_per_key = bits;
        self
    }

    /// Block compression of new SSTables (default none).
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    /// Memory limit of the block cache (default 64 MiB; 0 disables it). Without effect under
    /// a [`Options::memory_budget`], which sizes the cache.
    pub fn block_cache_bytes(mut self, bytes: usize) -> Self {
        self.block_cache_bytes = bytes;
        self
    }

    /// One limit for the memory of the engine's buffers and caches together (default none:
    /// each has its own limit). Memtables, the active one and those awaiting flush, take at
    /// most half of it (the memtable size is capped at `budget / 2 / (1 +
    /// max_immutable_memtables)`); the block cache gets what is left, reserving the active
    /// memtable's full size, so it shrinks while memtables await flush and grows back after.
    /// Memtables that iterators still hold after their flush are charged too, until the
    /// iterators are dropped (iterators holding more than the budget leave no cache at all).
    /// Index and filter blocks go into the cache by default under a budget (see
    /// [`cache_index_and_filter_blocks`](Self::cache_index_and_filter_blocks)); pinned instead,
    /// they are charged before the cache, which then shrinks as tables accumulate. At least
    /// 1 MiB.
    pub fn memory_budget(mut self, bytes: Option<usize>) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// Keep the tables' index and filter blocks in the block cache, loaded (and checked) again
    /// after an eviction, instead of in memory for as long as each table is open (RocksDB's
    /// `cache_index_and_filter_blocks`). Default: on under a [`memory_budget`](Self::memory_budget),
    /// which then bounds them too, off without one. Pinned, they grow with the tree (about
    /// 2.9 bytes a key for 16-byte keys and 10 filter bits per key) and a read touches no cache
    /// for them; cached, a read of a table looks them up in the cache first, and an iterator
    /// holds the indexes of its tables until it is dropped.
    pub fn cache_index_and_filter_blocks(mut self, on: bool) -> Self {
        self.cache_index_and_filter_blocks = Some(on);
        self
    }

    /// L0 file count that starts a compaction into L1 (default 4).
    pub fn l0_compaction_trigger(mut self, files: usize) -> Self {
        self.l0_compaction_trigger = files;
        self
    }

    /// L0 file counts at which writes are slowed (default 20) and stopped (default 36) until
    /// compaction catches up.
    pub fn l0_stall_triggers(mut self, slowdown: usize, stop: usize) -> Self {
        self.l0_slowdown_trigger = slowdown;
        self.l0_stop_trigger = stop;
        self
    }

    /// Target size of L1 (default 256 MiB); each deeper level is `level_multiplier` times larger.
    pub fn l1_target_bytes(mut self, bytes: u64) -> Self {
        self.l1_target_bytes = bytes;
        self
    }

    /// Size ratio between adjacent levels (default 10).
    pub fn level_multiplier(mut self, m: u64) -> Self {
        self.level_multiplier = m;
        self
    }

    /// Size at which compaction starts a new output SSTable (default 64 MiB).
    pub fn target_file_size(mut self, bytes: u64) -> Self {
        self.target_file_size = bytes;
        self
    }

    /// Background compaction threads (default 1; flushes have their own thread).
    pub fn compaction_threads(mut self, n: usize) -> Self {
        self.compaction_threads = n;
        self
    }

    /// The pace, in bytes per second, at which writes start when flushes or compactions fall
    /// behind (default 16 MiB/s): while L0 is past its slowdown trigger, or every
    /// immutable-memtable slot is taken and the active memtable is half full, each write waits
    /// its share at this rate (in slices of at most a millisecond), and the rate falls by a fifth
    /// each time the backlog grows and rises again as it shrinks (never below 16 KiB/s). Lower
    /// rates stop writes less often at the stop triggers; higher ones slow them less.
    pub fn delayed_write_rate(mut self, bytes_per_sec: u64) -> Self {
        self.delayed_write_rate = bytes_per_sec;
        self
    }

    /// Merge L0 into L1 once no write has come for this long (default 1 s; `None`: only when L0
    /// reaches its trigger). Below the trigger, L0 tables hold overwritten versions and add a
    /// sorted run to every read; an idle database need not keep them.
    pub fn idle_compaction_after(mut self, after: Option<std::time::Duration>) -> Self {
        self.idle_compaction_after = after;
        self
    }

    /// Durability of writes that do not choose their own (default `Buffered`).
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Capacity of a write-ahead log segment (default 16 MiB). Larger writes get their own.
    pub fn wal_segment_size(mut self, bytes: u64) -> Self {
        self.wal_segment_size = bytes;
        self
    }

    /// How often a background thread fsyncs the WAL, bounding what a power loss can take of
    /// `Buffered` writes (default 200 ms; `None`: only synced writes, sealed segments and close
    /// sync it).
    pub fn wal_sync_interval(mut self, every: Option<std::time::Duration>) -> Self {
        self.wal_sync_interval = every;
        self
    }

    /// Create the database if the directory holds none (default true).
    pub fn create_if_missing(mut self, on: bool) -> Self {
        self.create_if_missing = on;
        self
    }

    /// Name used as the `db` label of this database's metrics (default `"kv"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The options as the engine runs them: under a memory budget, the memtable size capped
    /// to the memtables' share.
    pub(crate) fn effective(mut self) -> Options {
        if let Some(b) = self.memory_budget {
            let share = b / 2 / (1 + self.max_immutable_memtables);
            self.memtable_size = self.memtable_size.min(share).max(4096);
        }
        self
    }

    /// Whether index and filter blocks go into the block cache.
    pub(crate) fn caches_index_and_filters(&self) -> bool {
        self.cache_index_and_filter_blocks.unwrap_or(self.memory_budget.is_some())
    }

    /// The block cache's limit under a memory budget, given the bytes of the memtables awaiting
    /// flush and the bytes the open tables pin (the active memtable is reserved at its full
    /// size); `block_cache_bytes` without one.
    pub(crate) fn cache_limit(&self, immutable_bytes: usize, pinned_bytes: usize) -> usize {
        match self.memory_budget {
            None => self.block_cache_bytes,
            Some(b) => b.saturating_sub(self.memtable_size + immutable_bytes + pinned_bytes),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidParam(m));
        if self.memtable_size < 4096 {
            return bad(format!("memtable size {} is below 4096 bytes", self.memtable_size));
        }
        if !(1..=64).contains(&self.max_immutable_memtables) {
            return bad(format!(
                "max_immutable_memtables {} is outside 1..=64",
                self.max_immutable_memtables
            ));
        }
        if let Some(b) = self.memory_budget.filter(|&b| b < 1 << 20) {
            return bad(format!("memory budget {b} is below 1 MiB"));
        }
        if !(256..=(1 << 20)).contains(&self.block_size) {
            return bad(format!("block size {} is outside 256..=1 MiB", self.block_size));
        }
        if self.bloom_bits_per_key > 64 {
            return bad(format!("bloom bits per key {} is above 64", self.bloom_bits_per_key));
        }
        if self.l0_compaction_trigger == 0
            || self.l0_slowdown_trigger < self.l0_compaction_trigger
            || self.l0_stop_trigger < self.l0_slowdown_trigger
        {
            return bad(format!(
                "L0 triggers must satisfy 0 < compaction ({}) <= slowdown ({}) <= stop ({})",
                self.l0_compaction_trigger, self.l0_slowdown_trigger, self.l0_stop_trigger
            ));
        }
        if self.level_multiplier < 2 {
            return bad(format!("level multiplier {} is below 2", self.level_multiplier));
        }
        if self.l1_target_bytes < 4096 || self.target_file_size < 4096 {
            return bad("L1 target and target file size must be at least 4096 bytes".into());
        }
        if self.compaction_threads == 0 {
            return bad("at least one compaction thread is needed".into());
        }
        Ok(())
    }

    /// Target size of level `level` (1-based levels; L0 is governed by file count).
    pub(crate) fn level_target(&self, level: usize) -> u64 {
        let mut t = self.l1_target_bytes;
        for _ in 1..level {
            t = t.saturating_mul(self.level_multiplier);
        }
        t
    }
}
