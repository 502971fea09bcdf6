//! `Locks`: the key locks of pessimistic transactions. A key is locked shared (by readers) or
//! exclusive (by one writer); a request that cannot be granted waits, with an edge from its
//! transaction to each holder in the wait-for graph, until the holders release or its lock
//! timeout passes.
//!
//! Invariants: a transaction waits for at most one key at a time, so its out-edges are that
//! request's holders; a request that would close a cycle in the graph fails at once with
//! `Error::Deadlock` (the transaction that closes it is the victim: the others keep waiting and
//! get their locks once it releases its own); every lock is released when its transaction ends.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// A transaction, as the lock table knows it.
pub(crate) type TxnId = u64;

#[derive(Debug, Default)]
struct KeyLock {
    exclusive: Option<TxnId>,
    shared: HashSet<TxnId>,
    /// Requests waiting for this key: the entry stays while there are any.
    waiters: usize,
    /// Signalled when a holder of this key releases it (only its waiters wake).
    released: Arc<Condvar>,
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
struct Table {
    keys: HashMap<Bytes, KeyLock>,
    /// Each waiting transaction's holders.
    waits_for: HashMap<TxnId, Vec<TxnId>>,
}

impl Table {
    /// Whether following wait-for edges from `from` leads back to it.
    fn cycle_from(&self, from: TxnId) -> bool {
        let mut seen = HashSet::new();
        let mut stack: Vec<TxnId> = self.waits_for.get(&from).cloned().unwrap_or_default();
        while let Some(t) = stack.pop() {
            if t == from {
                return true;
            }
            if seen.insert(t) {
                stack.extend(self.waits_for.get(&t).into_iter().flatten().copied());
            }
        }
        false
    }
}

/// The lock table of one database.
#[derive(Debug, Default)]
pub(crate) struct Locks {
    table: Mutex<Table>,
}

impl Locks {
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
        let mut t = self.table.lock();
        loop {
            let blockers = t.keys.get(key).map(|l| l.blockers(txn, exclusive)).unwrap_or_default();
            if blockers.is_empty() {
                t.waits_for.remove(&txn);
                let l = t.keys.entry(Bytes::copy_from_slice(key)).or_default();
                if exclusive {
                    l.shared.remove(&txn);
                    l.exclusive = Some(txn);
                } else if l.exclusive != Some(txn) {
                    l.shared.insert(txn);
                }
                return Ok(());
            }
            t.waits_for.insert(txn, blockers);
            if t.cycle_from(txn) {
                t.waits_for.remove(&txn);
                return Err(Error::Deadlock { key: Bytes::copy_from_slice(key) });
            }
            // Wait on the key's own signal: a release of another key wakes nobody here.
            let released = {
                let l = t.keys.entry(Bytes::copy_from_slice(key)).or_default();
                l.waiters += 1;
                l.released.clone()
            };
            let timed_out = match deadline {
                Some(d) => released.wait_until(&mut t, d).timed_out(),
                None => {
                    released.wait(&mut t);
                    false
                }
            };
            if let Some(l) = t.keys.get_mut(key) {
                l.waiters -= 1;
                if l.is_unused() {
                    t.keys.remove(key);
                }
            }
            if timed_out {
                // Granted if it was released just at the deadline.
                let free = t.keys.get(key).is_none_or(|l| l.blockers(txn, exclusive).is_empty());
                if !free {
                    t.waits_for.remove(&txn);
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
        let mut t = self.table.lock();
        let mut wake = Vec::new();
        for k in keys {
            if let Some(l) = t.keys.get_mut(&k) {
                if l.exclusive == Some(txn) {
                    l.exclusive = None;
                }
                l.shared.remove(&txn);
                if l.waiters > 0 {
                    wake.push(l.released.clone());
                }
                if l.is_unused() {
                    t.keys.remove(&k);
                }
            }
        }
        t.waits_for.remove(&txn);
        drop(t);
        for w in wake {
            w.notify_all();
        }
    }

    /// Keys locked now (for tests).
    #[cfg(test)]
    pub(crate) fn locked(&self) -> usize {
        self.table.lock().keys.len()
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
}
