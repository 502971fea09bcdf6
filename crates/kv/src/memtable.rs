//! `Memtable`: the in-memory table of recent writes, a lock-free skiplist of internal keys
//! (crossbeam-skiplist), and beside it, if the database asks for it, a hash index of the newest
//! version of each key for point reads. Writers insert concurrently with readers; once the
//! memtable is full it becomes immutable (no more inserts) and is flushed to an L0 SSTable.
//!
//! Invariants: every record of the WAL at or after `wal_start` whose writes are not in an
//! SSTable is in this memtable or a newer one. The hash index holds, for every key in the
//! skiplist, the version with the highest sequence number inserted so far: a read at `seq` at or
//! above that version's sequence is answered by it (every version up to `seq` is inserted before
//! `seq` becomes visible, so none is newer); an older read searches the skiplist.

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;
use hashbrown::HashTable;
use parking_lot::RwLock;

use crate::key::{self, IKey, Kind};

/// Memory of an entry beyond its key and value bytes, counted against the size limit so that the
/// limit is what the memtable really holds: the skiplist node (`IKey` with its 24 inline bytes,
/// the value handle, refcount and tower, about 128 bytes) and the rounding of the key and value
/// allocations.
const ENTRY_OVERHEAD: usize = 148;

/// Memory of a key's entry in the hash index (key handle, value inline or its handle, tag, hash,
/// control byte and spare capacity), counted once per distinct key.
const NEWEST_OVERHEAD: usize = 128;

/// Shards of the hash index, each behind its own lock.
const SHARDS: usize = 64;

/// Values up to this many bytes are copied into the hash index rather than shared with the
/// skiplist: an overwrite then costs a copy instead of an allocation and reference counting.
const INLINE_VALUE: usize = 32;

/// A value in the hash index.
enum Value {
    Inline { len: u8, bytes: [u8; INLINE_VALUE] },
    Shared(Bytes),
}

impl Value {
    /// `v` inline if it is short, else the `shared` handle (the skiplist's copy).
    fn new(v: &[u8], shared: impl FnOnce() -> Bytes) -> Value {
        if v.len() <= INLINE_VALUE {
            let mut bytes = [0u8; INLINE_VALUE];
            bytes[..v.len()].copy_from_slice(v);
            Value::Inline { len: v.len() as u8, bytes }
        } else {
            Value::Shared(shared())
        }
    }

    fn to_bytes(&self) -> Bytes {
        match self {
            Value::Inline { len, bytes } => Bytes::copy_from_slice(&bytes[..*len as usize]),
            Value::Shared(b) => b.clone(),
        }
    }
}

/// The newest version of one key.
struct Newest {
    hash: u64,
    user: Bytes,
    tag: u64,
    value: Value,
}

/// A shard alone on its cache line(s).
#[repr(align(64))]
struct Shard(RwLock<HashTable<Newest>>);

/// The index shard of a key's hash: bits that the table itself uses neither for its buckets
/// (low) nor its tags (top 7).
fn shard_of(hash: u64) -> usize {
    (hash >> 40) as usize % SHARDS
}

pub(crate) struct Memtable {
    map: SkipMap<IKey, Bytes>,
    /// The hash index: no shards if the database does not keep one.
    newest: Box<[Shard]>,
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
    pub(crate) fn new(wal_start: u64, hash_index: bool) -> Memtable {
        let shards = if hash_index { SHARDS } else { 0 };
        Memtable {
            map: SkipMap::new(),
            newest: (0..shards).map(|_| Shard(RwLock::new(HashTable::new()))).collect(),
            size: AtomicUsize::new(0),
            wal_start,
            wal_end: AtomicU64::new(u64::MAX),
        }
    }

    /// Inserts `user` at `seq` (hashing `user` only if there is a hash index).
    pub(crate) fn insert(&self, user: &[u8], seq: u64, kind: Kind, value: &[u8]) {
        let k = key::make(user, seq, kind);
        let tag = key::tag(seq, kind);
        let value = Bytes::copy_from_slice(value);
        let mut added = k.len() + value.len() + ENTRY_OVERHEAD;
        if !self.newest.is_empty() {
            let hash = crate::bloom::hash(user);
            let mut shard = self.newest[shard_of(hash)].0.write();
            match shard.find_mut(hash, |n| n.hash == hash && n.user == user) {
                Some(n) if n.tag < tag => {
                    n.tag = tag;
                    n.value = Value::new(&value, || value.clone());
                }
                Some(_) => {}
                None => {
                    let user = Bytes::copy_from_slice(user);
                    added += user.len() + NEWEST_OVERHEAD;
                    let value = Value::new(&value, || value.clone());
                    shard.insert_unique(hash, Newest { hash, user, tag, value }, |n| n.hash);
                }
            }
        }
        self.size.fetch_add(added, Ordering::Relaxed);
        self.map.insert(IKey::new(Bytes::from(k)), value);
    }

    /// The newest version of `user` visible at `seq`; `hash` is [`crate::bloom::hash`] of `user`.
    pub(crate) fn get(&self, user: &[u8], hash: u64, seq: u64) -> Lookup {
        if let Some(Shard(shard)) = self.newest.get(shard_of(hash)) {
            let shard = shard.read();
            match shard.find(hash, |n| n.hash == hash && n.user == user) {
                None => return Lookup::Absent,
                Some(n) if n.tag >> 8 <= seq => {
                    return if n.tag & 0xff == Kind::Put as u64 {
                        Lookup::Found(n.value.to_bytes())
                    } else {
                        Lookup::Deleted
                    };
                }
                Some(_) => {}
            }
        }
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

    /// Calls `f` with every entry (internal key, value) in internal-key order, stopping at the
    /// first error (for flushes: the bytes are borrowed, not cloned).
    pub(crate) fn try_for_each<E>(
        &self,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.map.iter().try_for_each(|e| f(e.key().bytes(), e.value()))
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
        for hash_index in [false, true] {
            versions_and_tombstones_with(hash_index);
        }
    }

    fn versions_and_tombstones_with(hash_index: bool) {
        let m = Memtable::new(0, hash_index);
        let h = |k: &[u8]| crate::bloom::hash(k);
        m.insert(b"a", 1, Kind::Put, b"1");
        m.insert(b"a", 5, Kind::Delete, b"");
        // An older version inserted after a newer one (recovery order) does not hide it.
        m.insert(b"a", 3, Kind::Put, b"3");
        m.insert(b"ab", 2, Kind::Put, b"x");
        assert_eq!(m.get(b"a", h(b"a"), 0), Lookup::Absent);
        assert_eq!(m.get(b"a", h(b"a"), 1), Lookup::Found(Bytes::from_static(b"1")));
        assert_eq!(m.get(b"a", h(b"a"), 4), Lookup::Found(Bytes::from_static(b"3")));
        assert_eq!(m.get(b"a", h(b"a"), 5), Lookup::Deleted);
        assert_eq!(m.get(b"a", h(b"a"), 9), Lookup::Deleted);
        assert_eq!(m.get(b"ab", h(b"ab"), 9), Lookup::Found(Bytes::from_static(b"x")));
        assert_eq!(m.get(b"ab", h(b"ab"), 1), Lookup::Absent);
        assert_eq!(m.get(b"b", h(b"b"), 9), Lookup::Absent);
        let mut seqs = Vec::new();
        m.try_for_each(|k, _| {
            seqs.push(key::seq(k));
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(seqs, vec![5, 3, 1, 2]);
    }
}
