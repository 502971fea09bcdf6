//! `Oracle`: what optimistic transactions are validated against at commit. While at least one
//! transaction is open, every write of the database (transactional or not) records its keys
//! with their sequence numbers; a commit asks whether a key, or any key of a range, was
//! written after the transaction's start.
//!
//! Invariants: for every open transaction with start `s`, every key written at a sequence
//! number above `s` is recorded with the newest such number (writes record their keys under
//! the writer lock, after they became visible, and a transaction registers its start under
//! the oracle's lock, so a write either is visible at the start or sees the transaction open);
//! records at or below the oldest open start are dropped, as no validation can need them. A
//! freeze (`db::freeze`) registers its sequence number as a start too, since transactions
//! begun under it start there.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// The conflict record of one database.
#[derive(Debug, Default)]
pub(crate) struct Oracle {
    /// Start sequence numbers of the open transactions, with how many started there.
    open: BTreeMap<u64, usize>,
    /// Each key written since the oldest open start, with its newest sequence number.
    written: BTreeMap<Bytes, u64>,
    /// The same writes in sequence order, for dropping old ones.
    log: VecDeque<(u64, Bytes)>,
}

impl Oracle {
    /// Whether writes must be recorded (a transaction is open).
    pub(crate) fn tracking(&self) -> bool {
        !self.open.is_empty()
    }

    /// Registers a transaction started at `seq`.
    pub(crate) fn begin(&mut self, seq: u64) {
        *self.open.entry(seq).or_default() += 1;
    }

    /// Unregisters a transaction started at `seq`.
    pub(crate) fn end(&mut self, seq: u64) {
        if let Some(n) = self.open.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&seq);
            }
        }
        self.prune();
    }

    /// Records a write of `key` at `seq` (nothing while no transaction is open).
    pub(crate) fn record(&mut self, key: &[u8], seq: u64) {
        if !self.tracking() {
            return;
        }
        let key = Bytes::copy_from_slice(key);
        self.written.insert(key.clone(), seq);
        self.log.push_back((seq, key));
    }

    /// Whether `key` was written after `seq`.
    pub(crate) fn written_after(&self, key: &[u8], seq: u64) -> bool {
        self.written.get(key).is_some_and(|&s| s > seq)
    }

    /// Whether a key in `(lo, hi)` was written after `seq`.
    pub(crate) fn range_written_after(
        &self,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        seq: u64,
    ) -> bool {
        if crate::bounds::is_empty_range(range) {
            return false;
        }
        self.written.range::<[u8], _>(range).any(|(_, &s)| s > seq)
    }

    /// Drops the records no open transaction needs.
    fn prune(&mut self) {
        let floor = self.open.keys().next().copied().unwrap_or(u64::MAX);
        while let Some((seq, _)) = self.log.front() {
            if *seq > floor {
                break;
            }
            let Some((seq, key)) = self.log.pop_front() else { break };
            if self.written.get(&key) == Some(&seq) {
                self.written.remove(&key);
            }
        }
    }

    /// Keys recorded (for tests and stats).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.written.len()
    }
}

/// Buckets of [`WriteHints`] (a power of two).
const HINT_BUCKETS: usize = 4096;

/// What a transaction can ask without the oracle's lock: per bucket of keys, the newest
/// sequence number recorded for any key of it. No write recorded after `seq` in a key's bucket
/// means none of the key; a write there may be of another key (or, racing with the record, be
/// missed): a hint, for skipping work the oracle would confirm is not needed.
pub(crate) struct WriteHints {
    buckets: Box<[AtomicU64]>,
}

impl Default for WriteHints {
    fn default() -> Self {
        WriteHints { buckets: (0..HINT_BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl std::fmt::Debug for WriteHints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteHints").finish_non_exhaustive()
    }
}

impl WriteHints {
    #[expect(clippy::indexing_slicing, reason = "masked to the bucket count")]
    fn bucket(&self, key: &[u8]) -> &AtomicU64 {
        &self.buckets[xxhash_rust::xxh3::xxh3_64(key) as usize & (HINT_BUCKETS - 1)]
    }

    /// Notes a write of `key` at `seq` (with [`Oracle::record`]).
    pub(crate) fn note(&self, key: &[u8], seq: u64) {
        self.bucket(key).fetch_max(seq, Ordering::Relaxed);
    }

    /// Whether `key` may have been written after `seq`.
    pub(crate) fn maybe_written_after(&self, key: &[u8], seq: u64) -> bool {
        self.bucket(key).load(Ordering::Relaxed) > seq
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_only_while_open_and_forgets_what_no_one_needs() {
        let mut o = Oracle::default();
        o.record(b"a", 1);
        assert_eq!(o.len(), 0);
        o.begin(5);
        o.begin(8);
        o.record(b"a", 6);
        o.record(b"b", 9);
        o.record(b"a", 10);
        assert!(o.written_after(b"a", 5) && o.written_after(b"a", 9));
        assert!(!o.written_after(b"a", 10) && !o.written_after(b"c", 0));
        assert!(o.range_written_after((Bound::Included(b"a"), Bound::Excluded(b"b")), 8));
        assert!(!o.range_written_after((Bound::Excluded(b"a"), Bound::Excluded(b"b")), 0));
        assert!(o.range_written_after((Bound::Excluded(b"a"), Bound::Unbounded), 8));
        assert!(!o.range_written_after((Bound::Included(b"z"), Bound::Included(b"a")), 0));
        o.end(5);
        // Start 8 still needs the writes at 9 and 10.
        assert!(o.written_after(b"b", 8) && o.written_after(b"a", 8));
        o.end(8);
        assert_eq!(o.len(), 0);
        o.record(b"x", 11);
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn hints_never_miss_a_noted_write() {
        let h = WriteHints::default();
        for (i, key) in (0..10_000u32).map(|i| i.to_be_bytes()).enumerate() {
            h.note(&key, i as u64 + 1);
            assert!(h.maybe_written_after(&key, i as u64));
            assert!(!h.maybe_written_after(&key, i as u64 + 1));
        }
        assert!(!WriteHints::default().maybe_written_after(b"k", 0));
    }
}
