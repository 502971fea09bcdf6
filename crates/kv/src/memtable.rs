//! `Memtable`: the in-memory table of recent writes. A lock-free skiplist (crossbeam-skiplist)
//! holds one node per user key; the node holds every version of that key written to this
//! memtable, oldest first (inside the node; in the index entry, which the node points to, when
//! there is an index). Beside it, if the database asks for it, a hash index maps each user key
//! to its entry, so that point reads and overwrites of a key already present skip the
//! skiplist search and its cache misses down the levels. With the index, a new key does not
//! search the skiplist either: it waits in an unordered list until something reads in key order
//! (a cursor's seek or step, a flush, which call [`Memtable::order`]), and then the waiting keys
//! are sorted and inserted together, each insert finding the path of the one before it in cache
//! (a random insert misses the cache down the skiplist's levels). A batch's inserts and a read
//! of several keys lock all their index shards at once, in shard order, and prefetch every entry
//! before touching any, so that their cache misses overlap. Writers insert concurrently with
//! readers; once the memtable is full it becomes immutable (no more inserts) and is flushed to
//! an L0 SSTable.
//!
//! Invariants: every record of the WAL at or after `wal_start` whose writes are not in an
//! SSTable is in this memtable or a newer one. A node is created with its first version and
//! never removed, so a node's versions are never empty; its versions are stored sorted by
//! tag, lowest first (read in reverse for the internal-key order), and a version inserted again
//! under the same tag (a replay) replaces it.
//! A write may prune a key's versions (only while the database has no snapshot or iterator
//! open): it drops those older than the newest one at or below the visible sequence number, so
//! a key overwritten again and again holds one or two versions, not one per write. The newest
//! published version of a key is never pruned. With a hash index, a key is in the index if and
//! only if it has a node or waits in the unordered list (both added under the index shard's
//! lock), and once `order` returns, every key added before it was called has a node: a cursor
//! orders the memtable after its sequence number is fixed, and every write at or below that
//! number finished its insert before the number was published. The memtable's internal-key
//! order (user key ascending, tag descending) is the order of nodes, then of versions within a
//! node.

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;
use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use crate::bounds::Bounds;
use crate::key::{self, Kind, Op, UserKey, INLINE};

/// Memory of a key's node beyond its key and value bytes, counted against the size limit so
/// that the limit is what the memtable really holds: the skiplist node (the key with its 24
/// inline bytes, the versions with room for two inline, refcount and tower, about 210 bytes;
/// with a hash index that room holds a pointer to the key's index entry, which holds them).
const NODE_OVERHEAD: usize = 248;

/// Memory of a key's entry in the hash index (the shared allocation of its hash, versions and a
/// copy of its key, 208 bytes in an allocator size class of 224; its pointer, control byte and
/// spare capacity in the table), counted once per distinct key.
const INDEX_OVERHEAD: usize = 236;

/// Shards of the hash index, each behind its own lock.
const SHARDS: usize = 64;

/// Versions a node holds without a heap array: a key overwritten while no snapshot is open
/// keeps two (see `Versions::add`).
const INLINE_VERSIONS: usize = 2;

/// Values up to this many bytes are kept inline in their version rather than in their own
/// allocation: an overwrite of a short value then costs a copy instead of an allocation.
const INLINE_VALUE: usize = 32;

/// A value in a version.
#[derive(Clone)]
enum Value {
    Inline { len: u8, bytes: [u8; INLINE_VALUE] },
    Shared(Bytes),
}

impl Value {
    fn new(v: &[u8]) -> Value {
        if v.len() <= INLINE_VALUE {
            let mut bytes = [0u8; INLINE_VALUE];
            #[expect(clippy::indexing_slicing, reason = "v.len() <= INLINE_VALUE, checked above")]
            bytes[..v.len()].copy_from_slice(v);
            Value::Inline { len: v.len() as u8, bytes }
        } else {
            Value::Shared(Bytes::copy_from_slice(v))
        }
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "`len` <= INLINE_VALUE: only `new` builds an inline value, for one that fits"
    )]
    fn as_slice(&self) -> &[u8] {
        match self {
            Value::Inline { len, bytes } => &bytes[..*len as usize],
            Value::Shared(b) => b,
        }
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "`len` <= INLINE_VALUE: only `new` builds an inline value, for one that fits"
    )]
    fn to_bytes(&self) -> Bytes {
        match self {
            Value::Inline { len, bytes } => Bytes::copy_from_slice(&bytes[..*len as usize]),
            Value::Shared(b) => b.clone(),
        }
    }

    /// Heap bytes beyond the version itself.
    fn heap(&self) -> usize {
        match self {
            Value::Inline { .. } => 0,
            Value::Shared(b) => b.len(),
        }
    }
}

/// One version of a key.
#[derive(Clone)]
struct Version {
    tag: u64,
    value: Value,
}

impl Version {
    fn lookup(&self) -> Lookup {
        if self.tag & 0xff == Kind::Put as u64 {
            Lookup::Found(self.value.to_bytes())
        } else {
            Lookup::Deleted
        }
    }
}

/// The versions of one user key in a memtable, lowest tag first: a new version, which has the
/// highest tag, is appended, touching only the end of the array (inserting it in front would move
/// the whole array, and a binary search for its place touches several cache lines).
struct Versions(RwLock<SmallVec<[Version; INLINE_VERSIONS]>>);

impl Versions {
    fn new(v: Version) -> Versions {
        let mut list = SmallVec::new();
        list.push(v);
        Versions(RwLock::new(list))
    }

    /// Adds `v` in tag order (replacing a version with its tag); returns the bytes this added
    /// (negative when it pruned more than it added). With `prune = Some(floor)`, versions that no
    /// read can see any more go: those older than the newest one at or below `floor`, the
    /// database's visible sequence number, when no snapshot or iterator is open (see
    /// `Memtable::insert`).
    fn add(&self, v: Version, prune: Option<u64>) -> isize {
        let heap = v.value.heap() as isize;
        let mut list = self.0.write();
        let before = if list.spilled() { list.capacity() } else { 0 };
        // Prune before adding, so that a key overwritten again and again keeps its two versions
        // in the node's own room (a third, pushed first, spilled them into a heap array of four
        // that every later overwrite touched: a cache miss more per write). Among the versions
        // already there this keeps from the newest one at or below `floor`: at least what the
        // rule keeps with `v` counted too.
        let mut freed = 0isize;
        if let Some(floor) = prune {
            let keep_from = list.partition_point(|o| o.tag >> 8 <= floor).saturating_sub(1);
            if keep_from > 0 {
                freed = list.drain(..keep_from).map(|o| o.value.heap() as isize).sum();
            }
        }
        if list.last().is_none_or(|o| o.tag < v.tag) {
            list.push(v);
        } else {
            let at = list.partition_point(|o| o.tag < v.tag);
            if let Some(same) = list.get_mut(at).filter(|o| o.tag == v.tag) {
                let old = std::mem::replace(same, v);
                return heap - old.value.heap() as isize - freed;
            }
            list.insert(at, v);
        }
        // Versions past the two inline ones live in a heap array that grows by doubling.
        let grown = if list.spilled() { list.capacity() - before } else { 0 };
        heap + (grown * std::mem::size_of::<Version>()) as isize - freed
    }

    /// Whether a version with `tag` is there.
    fn has(&self, tag: u64) -> bool {
        self.0.read().iter().any(|v| v.tag == tag)
    }

    /// The newest version visible at `at`, resolved under the versions' lock.
    fn visible(&self, at: ReadAt<'_>) -> Lookup {
        let list = self.0.read();
        let seq = at.resolve();
        list.iter().rev().find(|v| v.tag >> 8 <= seq).map_or(Lookup::Absent, Version::lookup)
    }

    /// The version the cursor stops at in this node: with `after = None`, the first in the
    /// direction of travel; else the first in that direction at (`inclusive`) or past `after`'s
    /// tag. `None` if there is none.
    fn pick(&self, forward: bool, after: Option<(u64, bool)>) -> Option<(u64, Bytes)> {
        let list = self.0.read();
        let v = match (forward, after) {
            (true, None) => list.last(),
            (false, None) => list.first(),
            (true, Some((t, inc))) => list.iter().rev().find(|v| v.tag < t || (inc && v.tag == t)),
            (false, Some((t, inc))) => list.iter().find(|v| v.tag > t || (inc && v.tag == t)),
        };
        v.map(|v| (v.tag, v.value.to_bytes()))
    }
}

/// The point in time a read of a memtable is at.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ReadAt<'a> {
    /// A sequence number that a registered snapshot or iterator protects from pruning (or of
    /// an immutable memtable, which nothing prunes).
    Seq(u64),
    /// The database's visible sequence number, read under the lock that pruning holds: the
    /// newest published version of a key is never pruned, so a plain read needs no registration.
    Latest(&'a AtomicU64),
}

impl ReadAt<'_> {
    fn resolve(self) -> u64 {
        match self {
            ReadAt::Seq(s) => s,
            ReadAt::Latest(visible) => visible.load(Ordering::SeqCst),
        }
    }
}

/// A skiplist node's versions: in the node itself, or, with a hash index, in the key's index
/// entry.
enum Node {
    Own(Versions),
    Indexed(Arc<Indexed>),
}

impl std::ops::Deref for Node {
    type Target = Versions;

    fn deref(&self) -> &Versions {
        match self {
            Node::Own(v) => v,
            Node::Indexed(e) => &e.versions,
        }
    }
}

/// A key's entry in the hash index, shared with its skiplist node: the index table holds only a
/// pointer to it, so the table stays small enough to stay in cache (its entries were 128 bytes
/// inline, with the versions in an allocation of their own: a point read and the write after it
/// missed the cache in the table and again in the versions), and a lookup that finds the key
/// loads one allocation, whose versions the write that follows then finds in cache. `repr(C)`:
/// what a lookup compares (hash, key prefix) comes first, beside the versions' lock.
#[repr(C)]
struct Indexed {
    hash: u64,
    versions: Versions,
    key: UserKey,
}

impl Indexed {
    /// Whether this is the entry of `user`, whose hash is `hash`.
    fn is(&self, hash: u64, user: &[u8]) -> bool {
        self.hash == hash && self.key.user() == user
    }
}

/// A shard alone on its cache line(s).
#[repr(align(64))]
struct Shard(RwLock<HashTable<Arc<Indexed>>>);

type Table = HashTable<Arc<Indexed>>;
type ShardRead<'a> = parking_lot::RwLockReadGuard<'a, Table>;
type ShardWrite<'a> = parking_lot::RwLockWriteGuard<'a, Table>;

/// Locks on some shards of the hash index (see [`Memtable::locked`]).
struct LockedShards<G> {
    /// The shards' numbers, ascending.
    ids: SmallVec<[usize; 16]>,
    guards: SmallVec<[G; 16]>,
}

/// The distinct shards of some hashes, ascending.
fn shard_ids(hashes: impl Iterator<Item = u64>) -> SmallVec<[usize; 16]> {
    let mut ids: SmallVec<[usize; 16]> = hashes.map(shard_of).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl<G: std::ops::Deref<Target = Table>> LockedShards<G> {
    fn at(&self, hash: u64) -> usize {
        self.ids.binary_search(&shard_of(hash)).expect("the shard is locked")
    }

    /// The table of `hash`'s shard, which must be locked.
    #[expect(
        clippy::indexing_slicing,
        reason = "`at` is a position in `ids`, and `guards` holds one guard per id"
    )]
    fn table(&self, hash: u64) -> &Table {
        &self.guards[self.at(hash)]
    }

    /// [`LockedShards::table`], to change.
    #[expect(
        clippy::indexing_slicing,
        reason = "`at` is a position in `ids`, and `guards` holds one guard per id"
    )]
    fn table_mut(&mut self, hash: u64) -> &mut Table
    where
        G: std::ops::DerefMut,
    {
        let i = self.at(hash);
        &mut self.guards[i]
    }

    /// Prefetches the entries that may be the one of `hash` (those whose tag matches), without
    /// reading them.
    fn prefetch(&self, hash: u64) -> Probe<'_> {
        let mut probe = Probe::Unique(None);
        for n in self.table(hash).iter_hash(hash) {
            prefetch(Arc::as_ptr(n).cast(), std::mem::size_of::<Indexed>());
            probe = match probe {
                Probe::Unique(None) => Probe::Unique(Some(n)),
                _ => Probe::Several,
            };
        }
        probe
    }
}

/// The entries of the index that may be a key's, by their tag: none or one, which the lookup
/// then checks without probing the table again, or several.
enum Probe<'a> {
    Unique(Option<&'a Indexed>),
    Several,
}

/// The index shard of a key's hash: bits that the table itself uses neither for its buckets
/// (low) nor its tags (top 7).
fn shard_of(hash: u64) -> usize {
    (hash >> 40) as usize % SHARDS
}

/// Asks the processor to load the `len` bytes at `p` into the cache. A hint: it never faults,
/// whatever the address, and does nothing on processors without the instruction.
#[inline]
#[allow(unsafe_code)]
fn prefetch(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // Every 64-byte line the bytes touch, from the one holding the first.
        let first = p.wrapping_sub(p as usize % 64);
        for off in (0..len + (p as usize % 64)).step_by(64) {
            // SAFETY: a prefetch reads no memory the program sees and never faults, whatever
            // the address; it needs SSE, which every x86_64 processor has.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(off).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// The first eight bytes of `key`, zero-padded, as a big-endian number: if one key's is less
/// than another's, so is the key.
#[expect(clippy::indexing_slicing, reason = "n is at most the length of both")]
fn prefix8(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

/// The prefix of a bound's key, if bounded.
fn bound_prefix(b: &Bound<Vec<u8>>) -> Option<u64> {
    match b {
        Bound::Included(k) | Bound::Excluded(k) => Some(prefix8(k)),
        Bound::Unbounded => None,
    }
}

/// Makes `buf` the internal key of `user` at `tag` (as [`key::make`] builds it).
fn set_ikey(buf: &mut Vec<u8>, user: &[u8], tag: u64) {
    buf.clear();
    buf.extend_from_slice(user);
    buf.extend_from_slice(&tag.to_be_bytes());
}

/// Memory of a new node holding `first`.
fn node_size(user: &[u8], first: &Version) -> usize {
    let key = if user.len() > INLINE { user.len() } else { 0 };
    NODE_OVERHEAD + key + first.value.heap()
}

pub(crate) struct Memtable {
    map: SkipMap<UserKey, Node>,
    /// The hash index: no shards if the database does not keep one.
    index: Box<[Shard]>,
    /// With the hash index: keys in the index that have no skiplist node yet, each with its
    /// first eight bytes (see [`prefix8`]).
    unordered: Mutex<Vec<(u64, Arc<Indexed>)>>,
    /// Held while `order` moves keys from `unordered` into the skiplist, so that a reader who
    /// finds the list empty knows its keys are all in the skiplist.
    ordering: Mutex<()>,
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
    /// A memtable whose writes start at WAL sequence number `wal_start`, with a hash index if
    /// `hash_index`. `limit` is the size at which it will be sealed: the index shards start with
    /// room for half the keys of that many bytes of the smallest nodes, so that filling the
    /// memtable doubles them at most once (growing them from empty rehashes every entry and
    /// faults in each new table, again and again).
    /// The room is address space until entries land in it.
    pub(crate) fn new(wal_start: u64, hash_index: bool, limit: usize) -> Memtable {
        let shards = if hash_index { SHARDS } else { 0 };
        let keys = limit / (2 * (NODE_OVERHEAD + INDEX_OVERHEAD));
        Memtable {
            map: SkipMap::new(),
            index: (0..shards)
                .map(|_| Shard(RwLock::new(HashTable::with_capacity(keys / SHARDS))))
                .collect(),
            unordered: Mutex::new(Vec::new()),
            ordering: Mutex::new(()),
            size: AtomicUsize::new(0),
            wal_start,
            wal_end: AtomicU64::new(u64::MAX),
        }
    }

    /// Inserts `user` at `seq` (hashing `user` only if there is a hash index). `prune` is the
    /// database's visible sequence number when no snapshot or iterator is registered (`None`
    /// otherwise, and during replay): the key's versions older than its newest one at or below it
    /// are dropped, since only registered readers read at an older point and plain reads take
    /// the visible number under the lock that pruning holds (`ReadAt::Latest`).
    pub(crate) fn insert(
        &self,
        user: &[u8],
        seq: u64,
        kind: Kind,
        value: &[u8],
        prune: Option<u64>,
    ) {
        let version = Version { tag: key::tag(seq, kind), value: Value::new(value) };
        #[expect(
            clippy::indexing_slicing,
            reason = "a non-empty `index` holds SHARDS shards, and shard_of is below SHARDS"
        )]
        let added = if self.index.is_empty() {
            self.insert_node(user, version, prune)
        } else {
            let hash = crate::bloom::hash(user);
            self.insert_indexed(
                &mut self.index[shard_of(hash)].0.write(),
                user,
                hash,
                version,
                prune,
            )
        };
        self.grow(added);
    }

    /// Inserts the writes of a batch, the `i`th at `seq + i`, as [`Memtable::insert`] inserts
    /// each. With a hash index and more than one write, under the write locks of all their
    /// shards (see [`Memtable::locked`]): the index entries of all the keys are prefetched
    /// first, so that their cache misses overlap (see [`Memtable::get_many`]) instead of coming
    /// one after another, each behind a lock.
    pub(crate) fn insert_batch(&self, ops: &[Op<'_>], seq: u64, prune: Option<u64>) {
        if self.index.is_empty() || ops.len() < 2 {
            for (i, op) in ops.iter().enumerate() {
                self.insert(op.key, seq + i as u64, op.kind, op.value, prune);
            }
            return;
        }
        let hashes: SmallVec<[u64; 16]> = ops.iter().map(|op| crate::bloom::hash(op.key)).collect();
        let mut locked = self.locked_mut(hashes.iter().copied());
        for &hash in &hashes {
            locked.prefetch(hash);
        }
        let mut added = 0;
        for (i, (op, &hash)) in ops.iter().zip(&hashes).enumerate() {
            let version =
                Version { tag: key::tag(seq + i as u64, op.kind), value: Value::new(op.value) };
            added += self.insert_indexed(locked.table_mut(hash), op.key, hash, version, prune);
        }
        drop(locked);
        self.grow(added);
    }

    /// Adds `version` to `user`'s index entry in `shard`, creating it if needed; returns the
    /// bytes this added.
    fn insert_indexed(
        &self,
        shard: &mut Table,
        user: &[u8],
        hash: u64,
        version: Version,
        prune: Option<u64>,
    ) -> isize {
        match shard.find(hash, |n| n.is(hash, user)) {
            // An overwrite: no skiplist search.
            Some(n) => n.versions.add(version, prune),
            // A new key: its node waits for `order`.
            None => {
                let key = UserKey::new(user);
                let added = node_size(user, &version) + INDEX_OVERHEAD;
                let n = Arc::new(Indexed { hash, versions: Versions::new(version), key });
                self.unordered.lock().push((prefix8(user), n.clone()));
                shard.insert_unique(hash, n, |n| n.hash);
                added as isize
            }
        }
    }

    /// Counts `added` bytes (freed ones if negative) in the memtable's size.
    fn grow(&self, added: isize) {
        if added >= 0 {
            self.size.fetch_add(added as usize, Ordering::Relaxed);
        } else {
            let freed = added.unsigned_abs();
            let _ = self.size.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_sub(freed))
            });
        }
    }

    /// Adds `version` to `user`'s node, creating it if needed; returns the bytes this added.
    fn insert_node(&self, user: &[u8], version: Version, prune: Option<u64>) -> isize {
        let size = node_size(user, &version);
        let mut created = false;
        // The closure gets a copy: when two writers race to create the key's node, the skiplist
        // may call it, lose the race, drop the node it built and return the winner's, and the
        // version must then still be added to that one.
        let e = self.map.get_or_insert_with(UserKey::new(user), || {
            created = true;
            Node::Own(Versions::new(version.clone()))
        });
        if created && e.value().has(version.tag) {
            size as isize
        } else {
            e.value().add(version, prune)
        }
    }

    /// The newest version of `user` visible at `seq`; `hash` is [`crate::bloom::hash`] of `user`.
    pub(crate) fn get(&self, user: &[u8], hash: u64, at: ReadAt<'_>) -> Lookup {
        if let Some(Shard(shard)) = self.index.get(shard_of(hash)) {
            let shard = shard.read();
            // Pruning happens under this shard's write lock: resolve under its read lock.
            let seq = at.resolve();
            return match shard.find(hash, |n| n.is(hash, user)) {
                Some(n) => n.versions.visible(ReadAt::Seq(seq)),
                None => Lookup::Absent,
            };
        }
        match self.map.get(&UserKey::new(user)) {
            Some(e) => e.value().visible(at),
            None => Lookup::Absent,
        }
    }

    /// [`Memtable::get`] of several keys, each with its hash, all at `at`. With a hash index
    /// the lookups run in two passes under the read locks of all their shards (see
    /// [`Memtable::locked`]): the first probes the index for every key and only prefetches the
    /// entries it finds, the second reads them. A lookup alone misses the cache in the index
    /// and then in the entry, and the next one cannot start early, as each takes its shard's
    /// lock (an atomic the processor cannot run past); this way the misses of all the keys
    /// overlap.
    pub(crate) fn get_many(&self, keys: &[(&[u8], u64)], at: ReadAt<'_>) -> Vec<Lookup> {
        if self.index.is_empty() {
            return keys.iter().map(|&(user, hash)| self.get(user, hash, at)).collect();
        }
        let locked = self.locked(keys.iter().map(|k| k.1));
        // Pruning happens under the shards' write locks: resolve under their read locks.
        let seq = at.resolve();
        let probes: SmallVec<[Probe<'_>; 16]> = keys.iter().map(|k| locked.prefetch(k.1)).collect();
        keys.iter()
            .zip(probes)
            .map(|(&(user, hash), probe)| {
                let found = match probe {
                    Probe::Unique(n) => n.filter(|n| n.is(hash, user)),
                    Probe::Several => {
                        locked.table(hash).find(hash, |n| n.is(hash, user)).map(|n| &**n)
                    }
                };
                found.map_or(Lookup::Absent, |n| n.versions.visible(ReadAt::Seq(seq)))
            })
            .collect()
    }

    /// The index shards of these hashes, read-locked in shard order, each once. Readers and
    /// writers of several shards (see [`Memtable::insert_batch`]) take them in this order and
    /// the others take one, so none waits in a cycle.
    #[expect(
        clippy::indexing_slicing,
        reason = "with a hash index (callers check), `index` holds SHARDS shards and shard ids are below SHARDS"
    )]
    fn locked(&self, hashes: impl Iterator<Item = u64>) -> LockedShards<ShardRead<'_>> {
        let ids = shard_ids(hashes);
        let guards = ids.iter().map(|&i| self.index[i].0.read()).collect();
        LockedShards { ids, guards }
    }

    /// [`Memtable::locked`], write-locked.
    #[expect(
        clippy::indexing_slicing,
        reason = "with a hash index (callers check), `index` holds SHARDS shards and shard ids are below SHARDS"
    )]
    fn locked_mut(&self, hashes: impl Iterator<Item = u64>) -> LockedShards<ShardWrite<'_>> {
        let ids = shard_ids(hashes);
        let guards = ids.iter().map(|&i| self.index[i].0.write()).collect();
        LockedShards { ids, guards }
    }

    pub(crate) fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub(crate) fn is_empty(&self) -> bool {
        let _o = self.ordering.lock();
        self.map.is_empty() && self.unordered.lock().is_empty()
    }

    /// Gives every key within `bounds` added to the hash index so far its skiplist node (see
    /// the module doc). Readers in key order call it once their point in time is fixed; it
    /// returns at once if no key waits. Keys outside `bounds` keep waiting: a scan of a few keys
    /// does not order the whole memtable.
    pub(crate) fn order(&self, bounds: &Bounds) {
        if self.index.is_empty() {
            return;
        }
        let _o = self.ordering.lock();
        let mut keys: Vec<Arc<Indexed>> = {
            let mut unordered = self.unordered.lock();
            if let (Bound::Unbounded, Bound::Unbounded) = (&bounds.lo, &bounds.hi) {
                std::mem::take(&mut *unordered).into_iter().map(|(_, n)| n).collect()
            } else {
                let (lo, hi) = (bound_prefix(&bounds.lo), bound_prefix(&bounds.hi));
                // The eight-byte prefixes settle most keys without loading their entries.
                unordered
                    .extract_if(.., |(p, n)| {
                        lo.is_none_or(|lo| *p >= lo)
                            && hi.is_none_or(|hi| *p <= hi)
                            && bounds.contains(n.key.user())
                    })
                    .map(|(_, n)| n)
                    .collect()
            }
        };
        keys.sort_unstable_by(|a, b| a.key.user().cmp(b.key.user()));
        for n in keys {
            self.map.insert(n.key.clone(), Node::Indexed(n));
        }
    }

    pub(crate) fn seal(&self, wal_end: u64) {
        self.wal_end.store(wal_end, Ordering::Release);
    }

    pub(crate) fn wal_end(&self) -> u64 {
        self.wal_end.load(Ordering::Acquire)
    }

    /// Calls `f` with every entry (internal key, value) in internal-key order, stopping at the
    /// first error (for flushes: the bytes are borrowed, not cloned).
    pub(crate) fn try_for_each<E>(
        &self,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.order(&Bounds::ALL);
        let mut ikey = Vec::new();
        for e in self.map.iter() {
            let user = e.key().user();
            for v in e.value().0.read().iter().rev() {
                set_ikey(&mut ikey, user, v.tag);
                f(&ikey, v.value.as_slice())?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Memtable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memtable")
            .field("keys", &(self.map.len() + self.unordered.lock().len()))
            .field("size", &self.size())
            .field("wal_start", &self.wal_start)
            .finish()
    }
}

/// A cursor over one memtable's entries in internal-key order (or its reverse), for the merges
/// of `iter`. It holds the memtable, so the entries it shows stay alive; it remembers where it
/// stands by key and tag, and finds its node again with one search per step.
pub(crate) struct Cursor {
    mem: Arc<Memtable>,
    forward: bool,
    /// The user keys it has to be right about (the keys of the scan it serves): keys of the
    /// hash index outside them may have no node yet.
    bounds: Bounds,
    /// The key of the node it stands in and the tag of the version it stands at.
    at: Option<(UserKey, u64)>,
    /// The internal key of the current entry.
    ikey: Vec<u8>,
    value: Bytes,
}

/// A node of the skiplist.
type NodeEntry<'a> = crossbeam_skiplist::map::Entry<'a, UserKey, Node>;

impl Cursor {
    #[cfg(test)]
    pub(crate) fn new(mem: Arc<Memtable>, forward: bool) -> Cursor {
        Cursor::within(mem, forward, Bounds::ALL)
    }

    /// A cursor that shows every key within `bounds`, and perhaps others.
    pub(crate) fn within(mem: Arc<Memtable>, forward: bool, bounds: Bounds) -> Cursor {
        Cursor { mem, forward, bounds, at: None, ikey: Vec::new(), value: Bytes::new() }
    }

    /// Stands at the first entry at or past the internal key `target` in the direction of
    /// travel (at the edge if `None`).
    pub(crate) fn seek(&mut self, target: Option<&[u8]>) {
        self.mem.order(&self.bounds);
        let map = &self.mem.map;
        let found = match target {
            None => pick(if self.forward { map.front() } else { map.back() }, self.forward, None),
            Some(target) => {
                let probe = UserKey::new(key::user(target));
                let e = if self.forward {
                    map.lower_bound(Bound::Included(&probe))
                } else {
                    map.upper_bound(Bound::Included(&probe))
                };
                let same = e.as_ref().is_some_and(|e| e.key().user() == probe.user());
                pick(e, self.forward, same.then_some((key::tag_of(target), true)))
            }
        };
        self.stand(found);
    }

    /// Moves to the next entry in the direction of travel.
    pub(crate) fn advance(&mut self) {
        let Some((k, tag)) = self.at.take() else { return };
        // Keys added while the cursor stood get their nodes, so that it steps onto them.
        self.mem.order(&self.bounds);
        // Nodes are never removed: the search finds the node the cursor stands in.
        let e = self.mem.map.get(&k);
        let found = pick(e, self.forward, Some((tag, false)));
        self.stand(found);
    }

    fn stand(&mut self, found: Option<(UserKey, u64, Bytes)>) {
        self.at = found.map(|(k, tag, value)| {
            set_ikey(&mut self.ikey, k.user(), tag);
            self.value = value;
            (k, tag)
        });
    }

    /// The current internal key; `None` past the end.
    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.at.as_ref().map(|_| &self.ikey[..])
    }

    pub(crate) fn value(&self) -> Bytes {
        self.value.clone()
    }

    pub(crate) fn value_ref(&self) -> &[u8] {
        &self.value
    }
}

/// The version [`Versions::pick`] chooses in node `e`, or else the first version at the edge of
/// the nodes after it in the direction of travel: its key, tag and value.
fn pick(
    mut e: Option<NodeEntry<'_>>,
    forward: bool,
    mut after: Option<(u64, bool)>,
) -> Option<(UserKey, u64, Bytes)> {
    while let Some(node) = e {
        if let Some((tag, value)) = node.value().pick(forward, after) {
            return Some((node.key().clone(), tag, value));
        }
        e = if forward { node.next() } else { node.prev() };
        after = None;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pruning keeps the newest version at or below the floor and every newer one; without a
    /// floor every version stays. With and without a hash index.
    #[test]
    fn pruning_keeps_what_a_read_at_or_after_the_floor_can_see() {
        for index in [false, true] {
            let m = Memtable::new(0, index, 1 << 20);
            let big = |i: u64| vec![i as u8; 100];
            for seq in 1..=10u64 {
                m.insert(b"k", seq, Kind::Put, &big(seq), Some(seq - 1));
            }
            let at = |seq| m.get(b"k", crate::bloom::hash(b"k"), ReadAt::Seq(seq));
            assert_eq!(at(10), Lookup::Found(Bytes::from(big(10))));
            assert_eq!(at(9), Lookup::Found(Bytes::from(big(9))), "the newest at the floor stays");
            assert_eq!(at(8), Lookup::Absent, "older versions are pruned (index {index})");
            let pruned = m.size();
            let kept = Memtable::new(0, index, 1 << 20);
            for seq in 1..=10u64 {
                kept.insert(b"k", seq, Kind::Put, &big(seq), None);
            }
            assert_eq!(
                kept.get(b"k", crate::bloom::hash(b"k"), ReadAt::Seq(3)),
                Lookup::Found(Bytes::from(big(3)))
            );
            assert!(
                pruned + 800 <= kept.size(),
                "pruned values leave the size: {pruned} vs {}",
                kept.size()
            );
            // A tombstone at the floor is kept: it hides older tables' versions.
            m.insert(b"k", 11, Kind::Delete, b"", Some(10));
            m.insert(b"k", 12, Kind::Put, b"x", Some(11));
            assert_eq!(m.get(b"k", crate::bloom::hash(b"k"), ReadAt::Seq(11)), Lookup::Deleted);
            let visible = AtomicU64::new(12);
            assert_eq!(
                m.get(b"k", crate::bloom::hash(b"k"), ReadAt::Latest(&visible)),
                Lookup::Found(Bytes::from_static(b"x"))
            );
        }
    }

    #[test]
    fn versions_and_tombstones() {
        for hash_index in [false, true] {
            versions_and_tombstones_with(hash_index);
        }
    }

    fn versions_and_tombstones_with(hash_index: bool) {
        let m = Memtable::new(0, hash_index, 1 << 20);
        let h = |k: &[u8]| crate::bloom::hash(k);
        m.insert(b"a", 1, Kind::Put, b"1", None);
        m.insert(b"a", 5, Kind::Delete, b"", None);
        // An older version inserted after a newer one (recovery order) does not hide it.
        m.insert(b"a", 3, Kind::Put, b"3", None);
        m.insert(b"ab", 2, Kind::Put, b"x", None);
        assert_eq!(m.get(b"a", h(b"a"), ReadAt::Seq(0)), Lookup::Absent);
        assert_eq!(m.get(b"a", h(b"a"), ReadAt::Seq(1)), Lookup::Found(Bytes::from_static(b"1")));
        assert_eq!(m.get(b"a", h(b"a"), ReadAt::Seq(4)), Lookup::Found(Bytes::from_static(b"3")));
        assert_eq!(m.get(b"a", h(b"a"), ReadAt::Seq(5)), Lookup::Deleted);
        assert_eq!(m.get(b"a", h(b"a"), ReadAt::Seq(9)), Lookup::Deleted);
        assert_eq!(m.get(b"ab", h(b"ab"), ReadAt::Seq(9)), Lookup::Found(Bytes::from_static(b"x")));
        assert_eq!(m.get(b"ab", h(b"ab"), ReadAt::Seq(1)), Lookup::Absent);
        assert_eq!(m.get(b"b", h(b"b"), ReadAt::Seq(9)), Lookup::Absent);
        let mut seqs = Vec::new();
        m.try_for_each(|k, _| {
            seqs.push(key::seq(k));
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(seqs, vec![5, 3, 1, 2]);
    }

    #[test]
    fn size_counts_nodes_and_versions() {
        let m = Memtable::new(0, true, 1 << 20);
        m.insert(b"k", 1, Kind::Put, b"short", None);
        let one = m.size();
        assert!(one >= NODE_OVERHEAD + INDEX_OVERHEAD);
        // A second version fits in the node's own room; a third spills the versions into a heap
        // array, which costs far less than a node.
        m.insert(b"k", 2, Kind::Put, b"short", None);
        assert_eq!(m.size(), one);
        m.insert(b"k", 3, Kind::Put, b"short", None);
        let two = m.size();
        assert!(two > one && two - one < NODE_OVERHEAD, "{one} {two}");
        // A long value is counted by its length.
        m.insert(b"k", 4, Kind::Put, &[0u8; 1000], None);
        let long = m.size();
        assert!(long - two >= 1000);
        // The same version again (a replay) replaces it, and its bytes leave the size.
        m.insert(b"k", 4, Kind::Put, b"v", None);
        assert!(m.size() + 1000 <= long);
        assert_eq!(
            m.get(b"k", crate::bloom::hash(b"k"), ReadAt::Seq(9)),
            Lookup::Found(Bytes::from_static(b"v"))
        );
    }

    #[test]
    fn concurrent_writers_of_the_same_keys_lose_no_version() {
        for hash_index in [false, true] {
            let m = Memtable::new(0, hash_index, 1 << 20);
            let threads = 4u64;
            let per = 2000u64;
            std::thread::scope(|s| {
                for t in 0..threads {
                    let m = &m;
                    s.spawn(move || {
                        for i in 0..per {
                            // 50 keys shared by every thread; sequence numbers are distinct.
                            let k = format!("key{}", (i * 7 + t) % 50);
                            m.insert(
                                k.as_bytes(),
                                1 + i * threads + t,
                                Kind::Put,
                                &i.to_le_bytes(),
                                None,
                            );
                        }
                    });
                }
            });
            let mut seen = Vec::new();
            m.try_for_each(|k, _| {
                seen.push((key::user(k).to_vec(), key::seq(k)));
                Ok::<_, ()>(())
            })
            .unwrap();
            assert_eq!(seen.len() as u64, threads * per, "hash_index {hash_index}");
            // Internal-key order: user key ascending, sequence number descending.
            assert!(seen
                .windows(2)
                .all(|w| w[0].0 < w[1].0 || (w[0].0 == w[1].0 && w[0].1 > w[1].1)));
            // The first entry of each key is its newest version, which a read returns.
            for (i, (user, newest)) in seen.iter().enumerate() {
                if i > 0 && seen[i - 1].0 == *user {
                    continue;
                }
                let got = m.get(user, crate::bloom::hash(user), ReadAt::Seq(u64::MAX >> 8));
                let wrote = (newest - 1) / threads;
                assert_eq!(got, Lookup::Found(Bytes::copy_from_slice(&wrote.to_le_bytes())));
            }
        }
    }

    /// Operations of the cursor model test.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(Vec<u8>, u64, bool),
        Seek(Option<(Vec<u8>, u64)>, bool),
        Advance(u8),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        // Short and long (past the inline bytes) keys over a small alphabet, so they collide.
        let user =
            prop_oneof![
                proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 0..4),
                proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 0..4)
                    .prop_map(|t| [vec![b'x'; 24], t].concat()),
            ];
        prop_oneof![
            4 => (user.clone(), 1u64..20, any::<bool>()).prop_map(|(u, s, d)| Op::Insert(u, s, d)),
            2 => (proptest::option::of((user, 0u64..21)), any::<bool>())
                .prop_map(|(t, f)| Op::Seek(t, f)),
            3 => (1u8..6).prop_map(Op::Advance),
        ]
    }

    /// Keys of up to 10 bytes over a 4-letter alphabet, so that they share prefixes.
    fn short_key() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        proptest::collection::vec(0u8..4, 0..10)
    }

    /// Keys of up to 12 bytes, zeros frequent (zero is also the padding of `prefix8`).
    fn zero_rich_key() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..12)
    }

    proptest::proptest! {
        /// A cursor (both directions, seeks to any internal key, inserts while it stands) and
        /// gets agree with a sorted map of internal keys.
        #[test]
        fn cursor_and_get_match_a_sorted_map(
            ops in proptest::collection::vec(op(), 1..80),
            hash_index in proptest::bool::ANY,
        ) {
            use std::collections::BTreeMap;
            let m = Arc::new(Memtable::new(0, hash_index, 1 << 20));
            // Internal key (user, !tag) in order → value.
            let mut model: BTreeMap<(Vec<u8>, u64), Vec<u8>> = BTreeMap::new();
            let mut cur: Option<Cursor> = None;
            // The model cursor: the key it stands at and the direction.
            let mut at: Option<(Vec<u8>, u64)> = None;
            let mut forward = true;
            for op in ops {
                match op {
                    Op::Insert(u, seq, del) => {
                        let kind = if del { Kind::Delete } else { Kind::Put };
                        let v = if del { vec![] } else { format!("{seq}").into_bytes() };
                        m.insert(&u, seq, kind, &v, None);
                        model.insert((u, !key::tag(seq, kind)), v);
                    }
                    Op::Seek(t, f) => {
                        forward = f;
                        let c = cur.insert(Cursor::new(m.clone(), f));
                        let target = t.as_ref().map(|(u, s)| key::make(u, *s, Kind::Put));
                        c.seek(target.as_deref());
                        let probe = t.map(|(u, s)| (u, !key::tag(s, Kind::Put)));
                        at = match (probe, f) {
                            (None, true) => model.keys().next().cloned(),
                            (None, false) => model.keys().next_back().cloned(),
                            (Some(p), true) => model.range(p..).next().map(|(k, _)| k.clone()),
                            (Some(p), false) => model.range(..=p).next_back().map(|(k, _)| k.clone()),
                        };
                    }
                    Op::Advance(n) => {
                        let Some(c) = cur.as_mut() else { continue };
                        for _ in 0..n {
                            c.advance();
                            at = at.and_then(|a| {
                                let next = if forward {
                                    model.range((Bound::Excluded(a), Bound::Unbounded)).next()
                                } else {
                                    model.range(..a).next_back()
                                };
                                next.map(|(k, _)| k.clone())
                            });
                        }
                    }
                }
                if let Some(c) = &cur {
                    let want = at.as_ref().map(|(u, t)| {
                        let mut k = u.clone();
                        k.extend_from_slice(&(!t).to_be_bytes());
                        (k, model[&(u.clone(), *t)].clone())
                    });
                    let got = c.key().map(|k| (k.to_vec(), c.value().to_vec()));
                    proptest::prop_assert_eq!(got, want);
                }
            }
            // Every key at every sequence number reads as the model's newest visible version.
            let users: std::collections::BTreeSet<Vec<u8>> = model.keys().map(|(u, _)| u.clone()).collect();
            for u in users {
                for seq in 0..21 {
                    let want = model
                        .range((u.clone(), !key::tag(seq, Kind::Put))..=(u.clone(), u64::MAX))
                        .next()
                        .map_or(Lookup::Absent, |((_, t), v)| {
                            if (!t) & 0xff == Kind::Put as u64 { Lookup::Found(Bytes::from(v.clone())) } else { Lookup::Deleted }
                        });
                    proptest::prop_assert_eq!(m.get(&u, crate::bloom::hash(&u), ReadAt::Seq(seq)), want);
                }
            }
            let mut all = Vec::new();
            m.try_for_each(|k, v| { all.push((k.to_vec(), v.to_vec())); Ok::<_, ()>(()) }).unwrap();
            let want: Vec<_> = model.iter().map(|((u, t), v)| {
                let mut k = u.clone();
                k.extend_from_slice(&(!t).to_be_bytes());
                (k, v.clone())
            }).collect();
            proptest::prop_assert_eq!(all, want);
        }

        /// A cursor for a range shows every key of the range, in order, when the keys of the
        /// index outside it still wait for their nodes; a later unbounded cursor shows them all.
        #[test]
        fn a_bounded_cursor_orders_its_range(
            keys in proptest::collection::btree_set(short_key(), 1..60),
            lo in short_key(),
            hi in short_key(),
            lo_inclusive: bool,
        ) {
            use std::ops::RangeBounds;
            let m = Arc::new(Memtable::new(0, true, 1 << 20));
            // Inserted in a scrambled order.
            let mut shuffled: Vec<&Vec<u8>> = keys.iter().collect();
            shuffled.sort_by_key(|k| crate::bloom::hash(k));
            for (i, k) in shuffled.iter().enumerate() {
                m.insert(k, i as u64 + 1, Kind::Put, b"v", None);
            }
            let lo_b = if lo_inclusive { Bound::Included(lo) } else { Bound::Excluded(lo) };
            let bounds = Bounds { lo: lo_b, hi: Bound::Included(hi) };
            let range: (Bound<Vec<u8>>, Bound<Vec<u8>>) = (bounds.lo.clone(), bounds.hi.clone());
            let want: Vec<Vec<u8>> =
                keys.iter().filter(|k| range.contains(*k)).cloned().collect();
            let mut c = Cursor::within(m.clone(), true, bounds.clone());
            c.seek(None);
            let mut got = Vec::new();
            while let Some(k) = c.key() {
                let user = key::user(k).to_vec();
                if bounds.contains(&user) {
                    got.push(user);
                }
                c.advance();
            }
            proptest::prop_assert_eq!(got, want);
            let mut all = Vec::new();
            let mut c = Cursor::new(m, true);
            c.seek(None);
            while let Some(k) = c.key() {
                all.push(key::user(k).to_vec());
                c.advance();
            }
            proptest::prop_assert_eq!(all, keys.into_iter().collect::<Vec<_>>());
        }

        /// Comparing eight-byte prefixes never contradicts comparing the keys.
        #[test]
        fn prefixes_order_like_their_keys(
            a in zero_rich_key(),
            b in zero_rich_key(),
        ) {
            if prefix8(&a) < prefix8(&b) {
                proptest::prop_assert!(a < b);
            }
        }
    }
}
