//! `Freeze`: reads of some key ranges held at one moment while a change to them too large for
//! one write batch (deleting every key of a range, batch after batch) is made, so that readers
//! see all of it or none.
//!
//! While a freeze lives, a read as of now of a key in one of its ranges (`get`, a transaction's
//! read-committed read) reads at the freeze's sequence number instead, as does a `get_many`
//! naming such a key (for all its keys) and a scan whose bounds reach into a range (for all it
//! walks); a new snapshot or transaction starts at the oldest freeze's number. The freeze
//! registers its number as a snapshot, so compaction keeps what those reads see. When it is
//! dropped, reads see everything written meanwhile at once. A freeze is also open in the oracle
//! from its number on, as a transaction would be: a transaction that starts at that number is
//! checked against every write since, also those made before it began.
//!
//! Invariants: a freeze is published before its holder writes anything it hides (it is made
//! before `Db::freeze` returns), and is removed after its holder's last write. A read takes its
//! view, the visible sequence number and the freezes between two loads of `Freezes::generation`
//! (bumped when a freeze is made, and when one is dropped before it is removed) and takes them
//! again if it changed: so the number it reads at was not taken in the middle of a change whose
//! freeze it did not see, and its view (taken after a freeze it did not see was dropped) holds
//! the whole change. The holder must keep other writers out of the ranges while it lives
//! (their writes would be hidden until it is dropped, though acknowledged).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use super::inner::Inner;
use crate::bounds::Bounds;
use crate::view::View;

/// One range a freeze holds, with the freeze's id and sequence number.
#[derive(Debug)]
struct Frozen {
    id: u64,
    start: Vec<u8>,
    end: Vec<u8>,
    seq: u64,
}

/// The live freezes of a database.
#[derive(Debug, Default)]
pub(super) struct Freezes {
    ranges: RwLock<Vec<Frozen>>,
    /// `ranges.len()`, read without the lock.
    count: AtomicUsize,
    /// Bumped when a freeze is made and when one is dropped (see the invariants above).
    generation: AtomicU64,
    next_id: AtomicU64,
}

impl Freezes {
    /// Whether any freeze lives.
    pub(super) fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }
}

/// Holds reads of some key ranges at the moment [`crate::Db::freeze`] was called, until it is
/// dropped.
pub struct Freeze {
    inner: Arc<Inner>,
    id: u64,
    seq: u64,
}

impl std::fmt::Debug for Freeze {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Freeze").field("seq", &self.seq).finish()
    }
}

impl Freeze {
    pub(super) fn new<K: AsRef<[u8]>>(inner: Arc<Inner>, ranges: &[(K, K)]) -> Freeze {
        // Registered with the oracle as a transaction starting at `seq` would be (under its
        // lock): every write after `seq` is recorded while the freeze lives, so a transaction
        // that starts at `seq` under it is validated against the writes made before it began.
        // The visible number, not an older freeze's: this one's holder reads (and deletes) what
        // is there now.
        let seq = {
            let mut oracle = inner.oracle.lock();
            let seq = inner.add_snapshot_at_visible();
            oracle.begin(seq);
            seq
        };
        let f = &inner.freezes;
        let id = f.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut frozen = f.ranges.write();
            for (start, end) in ranges {
                let (start, end) = (start.as_ref().to_vec(), end.as_ref().to_vec());
                frozen.push(Frozen { id, start, end, seq });
            }
            f.count.store(frozen.len(), Ordering::SeqCst);
            f.generation.fetch_add(1, Ordering::SeqCst);
        }
        Freeze { inner, id, seq }
    }

    /// The sequence number reads of its ranges are held at.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        {
            let f = &self.inner.freezes;
            let mut frozen = f.ranges.write();
            // Before the count: a read that finds no freeze then also finds the generation moved
            // unless it took the visible number after this point, when the change was done.
            f.generation.fetch_add(1, Ordering::SeqCst);
            frozen.retain(|r| r.id != self.id);
            f.count.store(frozen.len(), Ordering::SeqCst);
        }
        self.inner.oracle.lock().end(self.seq);
        self.inner.drop_snapshot(self.seq);
    }
}

impl Inner {
    /// `load()` (the current view, for a read) and the sequence number to read at: the visible
    /// one, or the oldest freeze's of the ranges that `hides` picks; and whether a freeze held
    /// it below the visible one. Both are taken between two loads of the generation (see the
    /// invariants above): a view taken before a change's freeze was dropped may lack the
    /// change's last batches, and must not be read at a number past them.
    fn held<T>(
        &self,
        load: impl Fn() -> T,
        hides: impl Fn(&[u8], &[u8]) -> bool,
    ) -> (T, u64, bool) {
        let f = &self.freezes;
        loop {
            let generation = f.generation.load(Ordering::SeqCst);
            let loaded = load();
            let visible = self.visible();
            let seq = if !f.any() {
                visible
            } else {
                let frozen = f.ranges.read();
                frozen
                    .iter()
                    .filter(|f| hides(&f.start, &f.end))
                    .map(|f| f.seq)
                    .fold(visible, u64::min)
            };
            if f.generation.load(Ordering::SeqCst) == generation {
                return (loaded, seq, seq < visible);
            }
        }
    }

    /// The view and sequence number a read as of now of `keys` reads at, and whether a freeze
    /// held the number back.
    pub(super) fn latest_for_keys<K: AsRef<[u8]>>(&self, keys: &[K]) -> (Arc<View>, u64, bool) {
        self.held(
            || self.view.load_full(),
            |s, e| keys.iter().any(|k| (s..e).contains(&k.as_ref())),
        )
    }

    /// The view and sequence number a scan as of now within `bounds` reads at.
    pub(super) fn latest_for_bounds(&self, bounds: &Bounds) -> (Arc<View>, u64) {
        let (view, seq, _) = self.held(|| self.view.load_full(), |s, e| bounds.may_overlap(s, e));
        (view, seq)
    }

    /// The sequence number a new snapshot starts at: before every freeze.
    pub(super) fn snapshot_seq(&self) -> u64 {
        self.held(|| (), |_, _| true).1
    }
}
