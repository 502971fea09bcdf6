//! `Locks`: the key locks of pessimistic transactions. A key is locked shared (by readers) or
//! exclusive (by one writer); a request that cannot be granted waits, with an edge from its
//! transaction to each holder in the wait-for graph, until the holders release or its lock
//! timeout passes.
//!
//! The keys are spread over shards by hash, each under its own mutex, so that requests for
//! different keys (most of them, and every one that need not wait) do not queue behind one
//! another; only a request that must wait takes the wait-for graph's mutex (shard first, then
//! graph, never the other way).
//!
//! Invariants: a transaction waits for at most one key at a time, so its out-edges are that
//! request's holders, and they are removed when the request is granted or fails; a request
//! that would close a cycle in the graph fails at once with `Error::Deadlock` (the transaction
//! that closes it is the victim: the others keep waiting and get their locks once it releases
//! its own); every lock is released when its transaction ends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use smallvec::SmallVec;

use crate::error::{Error, Result};

/// A transaction, as the lock table knows it.
pub(crate) type TxnId = u64;

/// Shards of the lock table: enough that 32 threads' requests rarely meet on one.
const SHARDS: usize = 64;

#[derive(Debug, Default)]
struct KeyLock {
    exclusive: Option<TxnId>,
    shared: SmallVec<[TxnId; 2]>,
    /// Requests waiting for this key: the entry stays while there are any.
    waiters: usize,
}

impl KeyLock {
    /// The holders that keep `txn` from taking the lock (none: it may take it).
    fn blockers(&self, txn: TxnId, exclusive: bool) -> Vec<TxnId> {
        let mut b: Vec<TxnId> = self.exclusive.iter().copied().filter(|&h| h != txn).collect();
        if exclusive {
            b.extend(self.shared.iter().copied().filter(|&h| h != txn));
        }
        b
    }

    fn is_free(&self) -> bool {
        self.exclusive.is_none() && self.shared.is_empty()
    }

    /// Whether the entry may go: nobody holds or waits for the key.
    fn is_unused(&self) -> bool {
        self.is_free() && self.waiters == 0
    }
}

#[derive(Debug, Default)]
struct Shard {
    keys: Mutex<HashMap<Bytes, KeyLock>>,
    /// Signalled when a holder of one of the shard's keys releases it (only the shard's
    /// waiters wake, and each checks its own key again).
    released: Condvar,
}

/// Each waiting transaction's holders.
type Graph = HashMap<TxnId, Vec<TxnId>>;

/// Whether following wait-for edges from `from` leads back to it.
fn cycle_from(graph: &Graph, from: TxnId) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<TxnId> = graph.get(&from).cloned().unwrap_or_default();
    while let Some(t) = stack.pop() {
        if t == from {
            return true;
        }
        if seen.insert(t) {
            stack.extend(graph.get(&t).into_iter().flatten().copied());
        }
    }
    false
}

/// The lock table of one database.
#[derive(Debug)]
pub(crate) struct Locks {
    shards: Box<[Shard]>,
    waits_for: Mutex<Graph>,
}

impl Default for Locks {
    fn default() -> Self {
        Locks {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            waits_for: Mutex::default(),
        }
    }
}

impl Locks {
    fn shard(&self, key: &[u8]) -> &Shard {
        let i = (xxhash_rust::xxh3::xxh3_64(key) % SHARDS as u64) as usize;
        #[expect(clippy::indexing_slicing, reason = "i < SHARDS = shards.len()")]
        &self.shards[i]
    }

    /// Takes `key` for `txn` (exclusive or shared; a shared lock it holds alone is upgraded),
    /// waiting up to `timeout` for its holders.
    pub(crate) fn acquire(
        &self,
        txn: TxnId,
        key: &[u8],
        exclusive: bool,
        timeout: Duration,
    ) -> Result<()> {
        // A timeout too long to add to now waits without one.
        let deadline = Instant::now().checked_add(timeout);
        let shard = self.shard(key);
        let mut t = shard.keys.lock();
        let mut waited = false;
        loop {
            let blockers = t.get(key).map(|l| l.blockers(txn, exclusive)).unwrap_or_default();
            if blockers.is_empty() {
                if waited {
                    self.waits_for.lock().remove(&txn);
                }
                let l = t.entry(Bytes::copy_from_slice(key)).or_default();
                if exclusive {
                    l.shared.retain(|h| *h != txn);
                    l.exclusive = Some(txn);
                } else if l.exclusive != Some(txn) && !l.shared.contains(&txn) {
                    l.shared.push(txn);
                }
                return Ok(());
            }
            {
                let mut graph = self.waits_for.lock();
                graph.insert(txn, blockers);
                if cycle_from(&graph, txn) {
                    graph.remove(&txn);
                    return Err(Error::Deadlock { key: Bytes::copy_from_slice(key) });
                }
            }
            waited = true;
            t.entry(Bytes::copy_from_slice(key)).or_default().waiters += 1;
            let timed_out = match deadline {
                Some(d) => shard.released.wait_until(&mut t, d).timed_out(),
                None => {
                    shard.released.wait(&mut t);
                    false
                }
            };
            if let Some(l) = t.get_mut(key) {
                l.waiters -= 1;
                if l.is_unused() {
                    t.remove(key);
                }
            }
            if timed_out {
                // Granted if it was released just at the deadline.
                let free = t.get(key).is_none_or(|l| l.blockers(txn, exclusive).is_empty());
                if !free {
                    self.waits_for.lock().remove(&txn);
                    return Err(Error::LockTimeout {
                        key: Bytes::copy_from_slice(key),
                        after: timeout,
                    });
                }
            }
        }
    }

    /// Releases every lock of `txn` on `keys`.
    pub(crate) fn release(&self, txn: TxnId, keys: impl IntoIterator<Item = Bytes>) {
        for k in keys {
            let shard = self.shard(&k);
            let mut t = shard.keys.lock();
            let mut wake = false;
            if let Some(l) = t.get_mut(&k) {
                if l.exclusive == Some(txn) {
                    l.exclusive = None;
                }
                l.shared.retain(|h| *h != txn);
                wake = l.waiters > 0;
                if l.is_unused() {
                    t.remove(&k);
                }
            }
            drop(t);
            if wake {
                shard.released.notify_all();
            }
        }
    }

    /// Keys locked now (for tests).
    #[cfg(test)]
    pub(crate) fn locked(&self) -> usize {
        self.shards.iter().map(|s| s.keys.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const T: Duration = Duration::from_millis(20);

    #[test]
    fn shared_locks_share_and_exclusive_ones_exclude() {
        let l = Locks::default();
        l.acquire(1, b"k", false, T).unwrap();
        l.acquire(2, b"k", false, T).unwrap();
        assert!(matches!(l.acquire(3, b"k", true, T), Err(Error::LockTimeout { .. })));
        // Two readers: neither may upgrade while the other reads.
        assert!(matches!(l.acquire(1, b"k", true, T), Err(Error::LockTimeout { .. })));
        l.release(2, [Bytes::from("k")]);
        l.acquire(1, b"k", true, T).unwrap();
        // Its own exclusive lock covers its reads.
        l.acquire(1, b"k", false, T).unwrap();
        assert!(matches!(l.acquire(2, b"k", false, T), Err(Error::LockTimeout { .. })));
        l.release(1, [Bytes::from("k")]);
        assert_eq!(l.locked(), 0);
    }

    #[test]
    fn a_cycle_fails_the_request_that_closes_it() {
        let l = std::sync::Arc::new(Locks::default());
        l.acquire(1, b"a", true, T).unwrap();
        l.acquire(2, b"b", true, T).unwrap();
        let long = Duration::from_secs(30);
        // Each asks for the other's key: whichever asks second closes the cycle and fails
        // at once; it releases what it holds, and the other gets its lock.
        let cross = |me: TxnId, want: &'static [u8], holds: &'static str| {
            let l = l.clone();
            std::thread::spawn(move || match l.acquire(me, want, true, long) {
                Err(Error::Deadlock { .. }) => {
                    l.release(me, [Bytes::from(holds)]);
                    true
                }
                r => {
                    r.unwrap();
                    false
                }
            })
        };
        let (one, two) = (cross(1, b"b", "a"), cross(2, b"a", "b"));
        let victims = [one.join().unwrap(), two.join().unwrap()];
        assert_eq!(victims.iter().filter(|v| **v).count(), 1, "{victims:?}");
    }

    #[test]
    fn a_cycle_through_three_transactions_and_shards_is_found() {
        let l = std::sync::Arc::new(Locks::default());
        // Keys of three different shards.
        let keys: Vec<Vec<u8>> = {
            let mut ks: Vec<Vec<u8>> = Vec::new();
            let mut i = 0u32;
            while ks.len() < 3 {
                let k = format!("key{i}").into_bytes();
                let s = |k: &[u8]| xxhash_rust::xxh3::xxh3_64(k) % SHARDS as u64;
                if ks.iter().all(|o| s(o) != s(&k)) {
                    ks.push(k);
                }
                i += 1;
            }
            ks
        };
        for (t, k) in keys.iter().enumerate() {
            l.acquire(t as TxnId, k, true, T).unwrap();
        }
        let long = Duration::from_secs(30);
        // 0 waits for 1's key, 1 for 2's, 2 for 0's: the third request closes the cycle.
        let waiters: Vec<_> = (0..3usize)
            .map(|t| {
                let (l, want, holds) = (l.clone(), keys[(t + 1) % 3].clone(), keys[t].clone());
                std::thread::spawn(move || match l.acquire(t as TxnId, &want, true, long) {
                    Err(Error::Deadlock { .. }) => {
                        l.release(t as TxnId, [Bytes::from(holds)]);
                        true
                    }
                    r => {
                        r.unwrap();
                        l.release(t as TxnId, [Bytes::from(holds), Bytes::from(want)]);
                        false
                    }
                })
            })
            .collect();
        let victims: Vec<bool> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(victims.iter().filter(|v| **v).count(), 1, "{victims:?}");
        assert_eq!(l.locked(), 0);
    }

    /// Threads incrementing counters under exclusive locks of a few keys lose no increment.
    #[test]
    fn exclusive_locks_exclude_across_threads() {
        let l = Locks::default();
        let counters: Vec<Mutex<u64>> = (0..4).map(|_| Mutex::new(0)).collect();
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (l, counters) = (&l, &counters);
                s.spawn(move || {
                    for i in 0..500u64 {
                        let k = (t + i) % 4;
                        let key = format!("c{k}");
                        l.acquire(t, key.as_bytes(), true, Duration::from_secs(30)).unwrap();
                        // Read, yield, write: two holders at once would lose an increment.
                        let v = *counters[k as usize].lock();
                        std::thread::yield_now();
                        *counters[k as usize].lock() = v + 1;
                        l.release(t, [Bytes::from(key)]);
                    }
                });
            }
        });
        assert_eq!(counters.iter().map(|c| *c.lock()).sum::<u64>(), 8 * 500);
        assert_eq!(l.locked(), 0);
    }
}
