//! The fragment cache shared by all readers of a [`Streams`](crate::Streams) store.
//!
//! An LRU adapted to sequential reading (Woodpecker's fragment manager): readers report their
//! position, and when memory must be freed the least recently used fragment that every active
//! reader of its stream has already passed goes first; only when no such fragment exists does
//! plain LRU order decide. Concurrent misses on one fragment load it once.
//!
//! Invariants: `used` is the sum of `memory` of the cached fragments; after every insert,
//! fragments are evicted until `used <= max`, so memory exceeds the limit by at most the one
//! fragment being inserted, and only inside the lock; a fragment larger than the limit is never
//! cached.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::error::Result;
use crate::fragment::Fragment;
use crate::store::ObjectId;

/// Figures of the fragment cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that had to read storage.
    pub misses: u64,
    /// Fragments evicted to stay under the limit.
    pub evictions: u64,
    /// Bytes held now.
    pub memory: u64,
    /// The largest number of bytes ever held at once.
    pub peak_memory: u64,
    /// Fragments held now.
    pub fragments: u64,
}

impl CacheStats {
    /// `hits / (hits + misses)`, 0 when nothing was looked up.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<ObjectId, (Arc<Fragment>, u64)>,
    lru: BTreeMap<u64, ObjectId>,
    tick: u64,
    used: usize,
    peak: usize,
    /// reader id -> (stream, position)
    readers: HashMap<u64, (u64, u64)>,
}

type Slot = Arc<OnceCell<Arc<Fragment>>>;

#[derive(Debug)]
pub(crate) struct Cache {
    max: usize,
    inner: Mutex<Inner>,
    loads: Mutex<HashMap<ObjectId, Slot>>,
    next_reader: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl Cache {
    pub(crate) fn new(max: usize) -> Cache {
        Cache {
            max,
            inner: Mutex::default(),
            loads: Mutex::default(),
            next_reader: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let g = self.inner.lock();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            memory: g.used as u64,
            peak_memory: g.peak as u64,
            fragments: g.map.len() as u64,
        }
    }

    pub(crate) fn register_reader(&self, stream: u64, pos: u64) -> u64 {
        let id = self.next_reader.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().readers.insert(id, (stream, pos));
        id
    }

    pub(crate) fn move_reader(&self, reader: u64, stream: u64, pos: u64) {
        self.inner.lock().readers.insert(reader, (stream, pos));
    }

    pub(crate) fn unregister_reader(&self, reader: u64) {
        self.inner.lock().readers.remove(&reader);
    }

    pub(crate) fn has_readers(&self, stream: u64) -> bool {
        self.inner.lock().readers.values().any(|&(s, _)| s == stream)
    }

    /// The cached fragment, counted as a hit.
    pub(crate) fn get(&self, id: &ObjectId) -> Option<Arc<Fragment>> {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let (f, tick) = g.map.get_mut(id)?;
        g.lru.remove(tick);
        g.tick += 1;
        *tick = g.tick;
        g.lru.insert(g.tick, *id);
        self.hits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("timber_stream_cache_hits_total").increment(1);
        Some(f.clone())
    }

    pub(crate) fn contains(&self, id: &ObjectId) -> bool {
        self.inner.lock().map.contains_key(id)
    }

    /// The fragment from memory, or loaded by `load` (once, however many callers miss at once)
    /// and cached.
    pub(crate) async fn get_or_load<F, Fut>(&self, id: ObjectId, load: F) -> Result<Arc<Fragment>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<Fragment>>>,
    {
        if let Some(f) = self.get(&id) {
            return Ok(f);
        }
        let slot = self.loads.lock().entry(id).or_default().clone();
        let mut loaded_here = false;
        let r = slot
            .get_or_try_init(|| {
                loaded_here = true;
                self.misses.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("timber_stream_cache_misses_total").increment(1);
                load()
            })
            .await
            .cloned();
        if loaded_here {
            if let Ok(f) = &r {
                self.insert(id, f.clone());
            }
            self.loads.lock().remove(&id);
        } else if r.is_ok() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    pub(crate) fn insert(&self, id: ObjectId, f: Arc<Fragment>) {
        if f.memory > self.max {
            return;
        }
        let mut g = self.inner.lock();
        let g = &mut *g;
        if g.map.contains_key(&id) {
            return;
        }
        g.tick += 1;
        g.used += f.memory;
        g.lru.insert(g.tick, id);
        g.map.insert(id, (f, g.tick));
        g.peak = g.peak.max(g.used);
        while g.used > self.max {
            let Some(victim) = Self::victim(g) else { break };
            self.remove_locked(g, &victim);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("timber_stream_cache_evictions_total").increment(1);
        }
        metrics::gauge!("timber_stream_cache_bytes").set(g.used as f64);
    }

    /// The least recently used fragment every reader of its stream has passed, else the least
    /// recently used one.
    fn victim(g: &Inner) -> Option<ObjectId> {
        let mut min_pos: HashMap<u64, u64> = HashMap::new();
        for &(s, p) in g.readers.values() {
            let e = min_pos.entry(s).or_insert(p);
            *e = (*e).min(p);
        }
        let passed = g.lru.values().find(|o| min_pos.get(&o.stream).is_none_or(|&p| o.end_id <= p));
        passed.or_else(|| g.lru.values().next()).copied()
    }

    fn remove_locked(&self, g: &mut Inner, id: &ObjectId) {
        if let Some((f, tick)) = g.map.remove(id) {
            g.lru.remove(&tick);
            g.used -= f.memory;
        }
    }

    /// Drops cached fragments that match `pred` (truncated, merged or deleted ones).
    pub(crate) fn remove_where(&self, pred: impl Fn(&ObjectId) -> bool) {
        let mut g = self.inner.lock();
        let ids: Vec<ObjectId> = g.map.keys().filter(|o| pred(o)).copied().collect();
        for id in ids {
            self.remove_locked(&mut g, &id);
        }
        metrics::gauge!("timber_stream_cache_bytes").set(g.used as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fragment;
    use bytes::Bytes;

    fn frag(stream: u64, first: u64, n: u64, size: usize) -> (ObjectId, Arc<Fragment>) {
        let es: Vec<Bytes> = (0..n).map(|_| Bytes::from(vec![7u8; size])).collect();
        let f = fragment::decode("t", &fragment::encode(stream, 0, first, &es, false)).unwrap();
        (ObjectId { stream, segment: 0, first_id: first, end_id: first + n, epoch: 1 }, Arc::new(f))
    }

    #[test]
    fn stays_within_limit_and_evicts_passed_fragments_first() {
        let (_, one) = frag(1, 0, 10, 100);
        let c = Cache::new(one.memory * 4);
        let r = c.register_reader(1, 0);
        for i in 0..4 {
            let (id, f) = frag(1, i * 10, 10, 100);
            c.insert(id, f);
        }
        assert_eq!(c.stats().fragments, 4);
        // The reader is at 25: [0,10) and [10,20) are passed. [0,10) was used last, so [10,20)
        // goes first, then [0,10), before any fragment the reader still needs.
        c.move_reader(r, 1, 25);
        let id = |first| ObjectId {
            stream: 1,
            segment: 0,
            first_id: first,
            end_id: first + 10,
            epoch: 1,
        };
        assert!(c.get(&id(0)).is_some());
        let (i, f) = frag(1, 40, 10, 100);
        c.insert(i, f);
        assert!(!c.contains(&id(10)) && c.contains(&id(0)));
        let (i, f) = frag(1, 50, 10, 100);
        c.insert(i, f);
        assert!(!c.contains(&id(0)), "a passed fragment goes before unread ones");
        assert!(c.contains(&id(20)) && c.contains(&id(30)));
        assert!(c.stats().memory as usize <= one.memory * 4);
        // With nothing passed, plain LRU.
        c.move_reader(r, 1, 0);
        let (i, f) = frag(1, 60, 10, 100);
        c.insert(i, f);
        assert!(!c.contains(&id(20)), "least recently used");
        assert!(c.stats().memory as usize <= one.memory * 4);
        assert_eq!(c.stats().evictions, 3);
    }

    #[tokio::test]
    async fn concurrent_misses_load_once() {
        let c = Arc::new(Cache::new(1 << 20));
        let loads = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, loads) = (c.clone(), loads.clone());
            tasks.push(tokio::spawn(async move {
                let (id, f) = frag(1, 0, 3, 10);
                c.get_or_load(id, || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok(f)
                })
                .await
                .unwrap()
                .len()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 3);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(c.stats().misses, 1);
    }
}
