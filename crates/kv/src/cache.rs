//! `BlockCache`: verified, uncompressed data blocks kept in memory under a byte limit, shared by
//! every table of a database. Sixteen LRU shards, each behind its own mutex, keyed by
//! (table, offset). A block is charged for its bytes and a fixed overhead. The limit may change
//! while the cache is in use (under a memory budget); a lower one evicts at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use lru::LruCache;
use parking_lot::Mutex;

use crate::block::Block;

const SHARDS: usize = 16;

/// Memory charged for a cached block besides its bytes: the map entry and the allocation's
/// header, roughly.
const OVERHEAD: usize = 96;

fn charge(b: &Block) -> usize {
    b.size() + OVERHEAD
}

/// Hashes a (table, offset) key with one multiply-xorshift round: SipHash, the default, would
/// cost more than the rest of a cache lookup.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Hasher = std::hash::BuildHasherDefault<KeyHasher>;

struct Shard {
    map: LruCache<(u64, u64), Block, Hasher>,
    bytes: usize,
}

pub(crate) struct BlockCache {
    shards: Vec<Mutex<Shard>>,
    shard_limit: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BlockCache {
    pub(crate) fn new(limit: usize) -> BlockCache {
        BlockCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: LruCache::unbounded_with_hasher(Hasher::default()),
                        bytes: 0,
                    })
                })
                .collect(),
            shard_limit: AtomicUsize::new(limit / SHARDS),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "shards holds SHARDS shards, indexed modulo SHARDS"
    )]
    fn shard(&self, table: u64, offset: u64) -> &Mutex<Shard> {
        let h = (table.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (offset >> 12)).wrapping_mul(31);
        &self.shards[(h as usize) % SHARDS]
    }

    /// Sets the limit; evicts down to it now if it is lower.
    pub(crate) fn set_limit(&self, limit: usize) {
        let shard_limit = limit / SHARDS;
        if self.shard_limit.swap(shard_limit, Ordering::Relaxed) > shard_limit {
            for s in &self.shards {
                evict(&mut s.lock(), shard_limit);
            }
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.shard_limit.load(Ordering::Relaxed) * SHARDS
    }

    pub(crate) fn get(&self, table: u64, offset: u64) -> Option<Block> {
        if self.shard_limit.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let b = self.shard(table, offset).lock().map.get(&(table, offset)).cloned();
        let counter = if b.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        b
    }

    pub(crate) fn insert(&self, table: u64, offset: u64, block: Block) {
        let size = charge(&block);
        let limit = self.shard_limit.load(Ordering::Relaxed);
        if size > limit {
            return;
        }
        let mut s = self.shard(table, offset).lock();
        if let Some(old) = s.map.put((table, offset), block) {
            s.bytes -= charge(&old);
        }
        s.bytes += size;
        evict(&mut s, limit);
    }

    /// (hits, misses) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    pub(crate) fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }
}

/// Drops a shard's least recently used blocks until it holds at most `limit` bytes.
fn evict(s: &mut Shard, limit: usize) {
    while s.bytes > limit {
        match s.map.pop_lru() {
            Some((_, b)) => s.bytes -= charge(&b),
            None => break,
        }
    }
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache").field("limit", &self.limit()).finish()
    }
}
