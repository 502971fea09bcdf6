//! `BlockCache`: verified, uncompressed blocks kept in memory under a byte limit, shared by
//! every table of a database: data blocks, and with `Options::cache_index_and_filter_blocks`
//! the tables' indexes and filters. Sixteen shards, each behind its own mutex, keyed by
//! (table, offset); a block's offset is unique within its table, so the kinds never collide.
//! An entry is charged for its bytes and a fixed overhead. The limit may change while the
//! cache is in use (under a memory budget); a lower one evicts at once.
//!
//! Each shard keeps two LRU lists: data blocks, and indexes and filters. Indexes and filters
//! are evicted before data blocks only while they hold more than half of the shard's limit
//! (RocksDB's high-priority pool): a scan that streams data blocks through the cache does not
//! push out the indexes every read needs, each of which costs a table's whole index to load
//! and check again. An index or filter larger than a shard's limit is still kept, as the
//! shard's only entry: without it every read of its table would load it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;

use crate::block::Block;
use crate::index::Index;

const SHARDS: usize = 16;

/// Memory charged for a cached block besides its bytes: the map entry and the allocation's
/// header, roughly.
const OVERHEAD: usize = 96;

/// What the cache holds for a (table, offset).
#[derive(Clone)]
pub(crate) enum Cached {
    Data(Block),
    Index(Arc<Index>),
    Filter(Bytes),
}

impl Cached {
    /// Whether something besides the cache holds this entry: an iterator (or a read under
    /// way) holds its table's index.
    fn in_use(&self) -> bool {
        matches!(self, Cached::Index(i) if Arc::strong_count(i) > 1)
    }

    fn charge(&self) -> usize {
        OVERHEAD
            + match self {
                Cached::Data(b) => b.size(),
                Cached::Index(i) => i.memory(),
                Cached::Filter(f) => f.len(),
            }
    }
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

type Lru = LruCache<(u64, u64), Cached, Hasher>;

struct Shard {
    blocks: Lru,
    /// Indexes and filters.
    metas: Lru,
    bytes: usize,
    /// Of `bytes`, those of `metas`.
    meta_bytes: usize,
}

impl Shard {
    fn put(&mut self, key: (u64, u64), e: Cached) {
        let size = e.charge();
        self.bytes += size;
        let old = match e {
            Cached::Data(_) => self.blocks.put(key, e),
            _ => {
                self.meta_bytes += size;
                self.metas.put(key, e)
            }
        };
        if let Some(old) = old {
            self.forget(&old);
        }
    }

    /// Uncounts an entry taken out of its list.
    fn forget(&mut self, e: &Cached) {
        self.bytes -= e.charge();
        if !matches!(e, Cached::Data(_)) {
            self.meta_bytes -= e.charge();
        }
    }
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
                        blocks: LruCache::unbounded_with_hasher(Hasher::default()),
                        metas: LruCache::unbounded_with_hasher(Hasher::default()),
                        bytes: 0,
                        meta_bytes: 0,
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

    /// The data block at (table, offset), if the cache holds it.
    pub(crate) fn get_block(&self, table: u64, offset: u64) -> Option<Block> {
        match self.get(table, offset, |s| &mut s.blocks) {
            Some(Cached::Data(b)) => Some(b),
            _ => None,
        }
    }

    /// The index or filter at (table, offset), if the cache holds it.
    pub(crate) fn get_meta(&self, table: u64, offset: u64) -> Option<Cached> {
        self.get(table, offset, |s| &mut s.metas)
    }

    fn get(
        &self,
        table: u64,
        offset: u64,
        list: impl Fn(&mut Shard) -> &mut Lru,
    ) -> Option<Cached> {
        if self.shard_limit.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let e = list(&mut self.shard(table, offset).lock()).get(&(table, offset)).cloned();
        let counter = if e.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        e
    }

    pub(crate) fn insert(&self, table: u64, offset: u64, entry: Cached) {
        let limit = self.shard_limit.load(Ordering::Relaxed);
        if limit == 0 || (matches!(entry, Cached::Data(_)) && entry.charge() > limit) {
            return;
        }
        let mut s = self.shard(table, offset).lock();
        s.put((table, offset), entry);
        evict(&mut s, limit);
    }

    /// Drops the index or filter at (table, offset), if the cache holds it.
    pub(crate) fn remove_meta(&self, table: u64, offset: u64) {
        let mut s = self.shard(table, offset).lock();
        if let Some(old) = s.metas.pop(&(table, offset)) {
            s.forget(&old);
        }
    }

    /// (hits, misses) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    pub(crate) fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }

    /// Of `bytes()`, those of tables' indexes and filters.
    pub(crate) fn index_filter_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().meta_bytes).sum()
    }
}

/// Drops a shard's least recently used entries until it holds at most `limit` bytes, or one
/// entry (an index or filter above the limit) and a limit above zero: indexes and filters
/// first while they hold more than half of the limit, data blocks first otherwise. An index
/// an iterator holds is moved to the front instead (dropping it would free nothing: it stays
/// charged while in use); once every index and filter was looked at, only data blocks go. A
/// zero limit (no cache) drops everything.
fn evict(s: &mut Shard, limit: usize) {
    let mut meta_looks = s.metas.len();
    while s.bytes > limit && (limit == 0 || s.blocks.len() + s.metas.len() > 1) {
        let metas_first = meta_looks > 0 && (s.meta_bytes > limit / 2 || s.blocks.is_empty());
        let popped = if metas_first {
            meta_looks -= 1;
            match s.metas.pop_lru() {
                Some((key, e)) if limit > 0 && e.in_use() => {
                    s.metas.put(key, e);
                    continue;
                }
                popped => popped,
            }
        } else {
            s.blocks.pop_lru()
        };
        match popped {
            Some((_, e)) => s.forget(&e),
            None => break,
        }
    }
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache").field("limit", &self.limit()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(len: usize) -> Cached {
        Cached::Filter(Bytes::from(vec![0u8; len]))
    }

    /// Offsets of table 1 whose entries share one shard.
    fn one_shard(c: &BlockCache, n: usize) -> Vec<u64> {
        let first = c.shard(1, 0) as *const _;
        (0..).map(|i| i << 12).filter(|&o| std::ptr::eq(c.shard(1, o), first)).take(n).collect()
    }

    #[test]
    fn a_filter_above_the_shard_limit_is_kept_alone_and_counted() {
        let c = BlockCache::new(SHARDS * 1000);
        c.insert(1, 0, filter(5000));
        assert!(matches!(c.get_meta(1, 0), Some(Cached::Filter(f)) if f.len() == 5000));
        assert_eq!(c.bytes(), 5000 + OVERHEAD);
        assert_eq!(c.index_filter_bytes(), 5000 + OVERHEAD);
        // Another entry of the shard makes it the least recently used one over the limit.
        let other = one_shard(&c, 2)[1];
        c.insert(1, other, filter(10));
        assert!(c.get_meta(1, 0).is_none());
        assert_eq!(c.index_filter_bytes(), 10 + OVERHEAD);
        // A lower limit evicts; a zero one keeps nothing.
        c.set_limit(0);
        assert_eq!((c.bytes(), c.index_filter_bytes()), (0, 0));
        c.insert(1, 0, filter(10));
        assert!(c.get_meta(1, 0).is_none());
    }

    fn data(value_len: usize) -> Cached {
        let mut b = crate::block::BlockBuilder::new(16);
        b.add(b"key", &vec![1u8; value_len]);
        Cached::Data(Block::new(Bytes::from(b.finish())).unwrap())
    }

    #[test]
    fn data_blocks_go_before_indexes_and_filters_under_half_the_limit() {
        let c = BlockCache::new(SHARDS * 4000);
        let offs = one_shard(&c, 40);
        c.insert(1, offs[0], filter(800));
        // Data blocks streaming through the shard push out data blocks only.
        for &o in &offs[1..30] {
            c.insert(1, o, data(300));
        }
        assert!(c.get_meta(1, offs[0]).is_some());
        assert!(c.get_block(1, offs[1]).is_none());
        assert!(c.get_block(1, offs[29]).is_some());
        // Past half of the limit, indexes and filters push out each other, least recent first.
        c.insert(1, offs[30], filter(800));
        assert!(c.get_meta(1, offs[30]).is_some());
        c.insert(1, offs[31], filter(800));
        assert!(c.get_meta(1, offs[0]).is_none());
        assert!(c.get_meta(1, offs[30]).is_some() && c.get_meta(1, offs[31]).is_some());
        assert!(c.bytes() <= 4000);
        assert!(c.get_block(1, offs[29]).is_some(), "data blocks under half stay");
    }

    fn index() -> Arc<Index> {
        let mut b = crate::block::BlockBuilder::new(16);
        let block = Block::new(Bytes::from(b.finish())).unwrap();
        Arc::new(Index::new(block, crate::index::Form::Separators, 0).unwrap())
    }

    #[test]
    fn an_index_in_use_stays_and_stays_charged() {
        let c = BlockCache::new(SHARDS * 2000);
        let offs = one_shard(&c, 40);
        let held = index();
        c.insert(1, offs[0], Cached::Index(held.clone()));
        c.insert(1, offs[1], Cached::Index(index()));
        let charge = Cached::Index(held.clone()).charge();
        // Indexes and filters past the limit push out the least recent ones, but not the one
        // an iterator holds.
        for &o in &offs[2..30] {
            c.insert(1, o, filter(100));
        }
        assert!(c.get_meta(1, offs[0]).is_some(), "the held index was evicted");
        assert!(c.get_meta(1, offs[1]).is_none());
        assert!(c.bytes() <= 2000);
        assert!(c.index_filter_bytes() >= charge);
        // Held, it stays even when nothing else can go; released, it goes.
        c.set_limit(SHARDS);
        assert!(c.get_meta(1, offs[0]).is_some());
        assert_eq!(c.bytes(), charge);
        drop(held);
        c.insert(1, offs[30], filter(1));
        assert!(c.get_meta(1, offs[0]).is_none());
        // No cache keeps nothing, held or not.
        let held = index();
        c.set_limit(SHARDS * 2000);
        c.insert(1, offs[0], Cached::Index(held.clone()));
        c.set_limit(0);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn replacing_an_entry_counts_its_bytes_once() {
        let c = BlockCache::new(SHARDS * 1000);
        c.insert(1, 0, filter(100));
        c.insert(1, 0, filter(200));
        assert_eq!(c.bytes(), 200 + OVERHEAD);
        assert_eq!(c.index_filter_bytes(), 200 + OVERHEAD);
    }
}
