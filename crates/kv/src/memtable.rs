//! `Memtable`: the in-memory table of recent writes, a lock-free skiplist of internal keys
//! (crossbeam-skiplist). Writers insert concurrently with readers; once the memtable is full it
//! becomes immutable (no more inserts) and is flushed to an L0 SSTable.
//!
//! Invariant: every record of the WAL at or after `wal_start` whose writes are not in an SSTable
//! is in this memtable or a newer one.

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;

use crate::key::{self, IKey, Kind};

/// Memory of an entry beyond its key and value bytes, counted against the size limit so that the
/// limit is what the memtable really holds: the skiplist node (`IKey` with its 24 inline bytes, the
/// value handle, refcount and tower, about 128 bytes) and the rounding of the key and value
/// allocations.
const ENTRY_OVERHEAD: usize = 148;

pub(crate) struct Memtable {
    map: SkipMap<IKey, Bytes>,
    size: AtomicUsize,
    /// First WAL sequence number this memtable may hold writes of.
    pub(crate) wal_start: u64,
    /// WAL sequence number after this memtable's last write, set when it becomes immutable.
    wal_end: AtomicU64,
}

/// The result of a point lookup in one table.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Found(Bytes),
    Deleted,
    Absent,
}

impl Memtable {
    pub(crate) fn new(wal_start: u64) -> Memtable {
        Memtable {
            map: SkipMap::new(),
            size: AtomicUsize::new(0),
            wal_start,
            wal_end: AtomicU64::new(u64::MAX),
        }
    }

    pub(crate) fn insert(&self, user: &[u8], seq: u64, kind: Kind, value: &[u8]) {
        let k = key::make(user, seq, kind);
        self.size.fetch_add(k.len() + value.len() + ENTRY_OVERHEAD, Ordering::Relaxed);
        self.map.insert(IKey::new(Bytes::from(k)), Bytes::copy_from_slice(value));
    }

    /// The newest version of `user` visible at `seq`.
    pub(crate) fn get(&self, user: &[u8], seq: u64) -> Lookup {
        let probe = IKey::probe(user, key::tag(seq, Kind::Put));
        match self.map.lower_bound(Bound::Included(&probe)) {
            Some(e) if e.key().user() == user => {
                if e.key().tag() & 0xff == Kind::Put as u64 {
                    Lookup::Found(e.value().clone())
                } else {
                    Lookup::Deleted
                }
            }
            _ => Lookup::Absent,
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn seal(&self, wal_end: u64) {
        self.wal_end.store(wal_end, Ordering::Release);
    }

    pub(crate) fn wal_end(&self) -> u64 {
        self.wal_end.load(Ordering::Acquire)
    }

    /// The first entry at or after `target` (forward) or at or before it (backward), and the
    /// entry after / before an entry.
    pub(crate) fn seek(&self, bound: Bound<&IKey>, forward: bool) -> Option<(IKey, Bytes)> {
        let e = if forward { self.map.lower_bound(bound) } else { self.map.upper_bound(bound) };
        e.map(|e| (e.key().clone(), e.value().clone()))
    }

    pub(crate) fn first(&self, forward: bool) -> Option<(IKey, Bytes)> {
        let e = if forward { self.map.front() } else { self.map.back() };
        e.map(|e| (e.key().clone(), e.value().clone()))
    }

    /// Every entry in internal-key order (for flushes).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (Bytes, Bytes)> + '_ {
        self.map.iter().map(|e| (e.key().bytes().clone(), e.value().clone()))
    }
}

impl std::fmt::Debug for Memtable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memtable")
            .field("entries", &self.map.len())
            .field("size", &self.size())
            .field("wal_start", &self.wal_start)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_tombstones() {
        let m = Memtable::new(0);
        m.insert(b"a", 1, Kind::Put, b"1");
        m.insert(b"a", 3, Kind::Put, b"3");
        m.insert(b"a", 5, Kind::Delete, b"");
        m.insert(b"ab", 2, Kind::Put, b"x");
        assert_eq!(m.get(b"a", 0), Lookup::Absent);
        assert_eq!(m.get(b"a", 1), Lookup::Found(Bytes::from_static(b"1")));
        assert_eq!(m.get(b"a", 4), Lookup::Found(Bytes::from_static(b"3")));
        assert_eq!(m.get(b"a", 5), Lookup::Deleted);
        assert_eq!(m.get(b"ab", 9), Lookup::Found(Bytes::from_static(b"x")));
        assert_eq!(m.get(b"b", 9), Lookup::Absent);
        let users: Vec<_> = m.entries().map(|(k, _)| key::seq(&k)).collect();
        assert_eq!(users, vec![5, 3, 1, 2]);
    }
}
