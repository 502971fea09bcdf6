//! `Memtable`: the in-memory table of recent writes. A skiplist holds one node per user key;
//! the node holds every version of that key written to this memtable, newest first. Nodes and
//! versions live in the memtable's [`Arena`]: writing a key costs no allocator call, the
//! memtable's size is the bytes it holds, and dropping it frees a few dozen chunks.
//!
//! Beside the skiplist, if the database asks for it, a hash index maps each user key to its
//! node, so that point reads and overwrites of a key already present skip the skiplist search
//! and its cache misses down the levels. With the index, a new key does not search the skiplist
//! either: its node waits in an unordered list until something reads in key order (a cursor's
//! seek or step, a flush, which call [`Memtable::order`]), and then the waiting nodes are sorted
//! and linked together, each finding its place from the one before (a random insert misses the
//! cache down the skiplist's levels). A batch's inserts and a read of several keys lock all their
//! index shards at once, in shard order, and prefetch every node before touching any, so that
//! their cache misses overlap. Once the memtable is full it becomes immutable (no more inserts)
//! and is flushed to an L0 SSTable.
//!
//! Concurrency: inserts are serialized by the writer lock (which owns the arena); one thread at
//! a time links nodes into the skiplist (the inserter without a hash index, `order` under its
//! lock with one). Readers take no lock but an index shard's (and `order`'s while nodes wait
//! to be linked): a node or version is written
//! whole before a release store publishes it (a skiplist link, a version list head, an index
//! entry under the shard lock), and is never changed, moved or freed after, but for its links,
//! until the memtable is dropped. Whoever reads a node holds the memtable (a cursor holds an
//! `Arc` of it).
//!
//! Invariants: every record of the WAL at or after `wal_start` whose writes are not in an
//! SSTable is in this memtable or a newer one. A node is published with its first version, so a
//! node's versions are never empty. A node's versions are in descending tag order; a version
//! inserted again under the same tag (a replay) goes before the one it replaces, and every reader
//! takes the first of equal tags. While readers may be about, a version added to a node is newer
//! than its others (the database writes in sequence order; a replay, in any order, comes before
//! any reader): a cursor going backward reads a node's versions once, and again only if its
//! newest changed. With a hash index, a key is in the index if and only if it has
//! a node (linked, or waiting in the unordered list), and once `order` returns, every node
//! created before it was called is linked: a cursor orders the memtable after its sequence number
//! is fixed, and every write at or below that number finished its insert before the number was
//! published. The memtable's internal-key order (user key ascending, tag descending) is the order
//! of nodes, then of versions within a node.
#![allow(unsafe_code)]

use std::ops::Bound;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use crate::arena::{Arena, Spares};
use crate::bounds::Bounds;
use crate::key::{self, bytes_cmp, Kind, Op};

/// Levels of the skiplist; a node's height is drawn with a chance of 1/4 per level, so twelve
/// serve some 16 million keys before the top level gets crowded.
const MAX_HEIGHT: usize = 12;

/// Memory of a key in the hash index beyond its node, counted once per distinct key: its slot
/// in the table (a pointer and a control byte, at the table's load factor) and in the unordered
/// list while it waits.
const INDEX_OVERHEAD: usize = 32;

/// Shards of the hash index, each behind its own lock.
const SHARDS: usize = 64;

/// A key's node, in the arena: this header, then the tower (`height` links, one per level),
/// then the key's `len` bytes.
#[repr(C)]
struct Node {
    /// [`crate::bloom::hash`] of the key with a hash index, else 0.
    hash: u64,
    /// The newest version; never null once the node is published (the head node has none).
    versions: AtomicPtr<Ver>,
    len: u32,
    height: u32,
}

impl Node {
    /// Bytes of a node of `height` levels for a key of `len` bytes.
    fn size(height: usize, len: usize) -> usize {
        std::mem::size_of::<Node>() + height * std::mem::size_of::<AtomicPtr<Node>>() + len
    }

    fn tower(&self) -> &[AtomicPtr<Node>] {
        // SAFETY: a node is allocated with room for `height` links right after its header,
        // which `Writer::node` initializes before the node is published; the arena keeps them
        // while the memtable (which `&self` borrows through) lives.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(self).add(1).cast::<AtomicPtr<Node>>(),
                self.height as usize,
            )
        }
    }

    fn key(&self) -> &[u8] {
        // SAFETY: the key's `len` bytes follow the tower, written before the node is published.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(self)
                    .add(1)
                    .cast::<AtomicPtr<Node>>()
                    .add(self.height as usize)
                    .cast::<u8>(),
                self.len as usize,
            )
        }
    }

    /// The link at `level`, which must be below the node's height.
    #[expect(clippy::indexing_slicing, reason = "callers pass a level below the node's height")]
    fn link(&self, level: usize) -> &AtomicPtr<Node> {
        &self.tower()[level]
    }

    /// The next node at `level`.
    fn next(&self, level: usize) -> Option<&Node> {
        // SAFETY: links are null or point at published nodes of the same arena.
        unsafe { self.link(level).load(Ordering::Acquire).as_ref() }
    }

    /// The node's versions, newest first.
    fn versions(&self) -> Versions<'_> {
        // SAFETY: null (the head node) or a published version of the same arena.
        Versions(unsafe { self.versions.load(Ordering::Acquire).as_ref() })
    }

    /// The newest version; the node must not be the head.
    fn newest(&self) -> &Ver {
        self.versions().next().expect("a published node has a version")
    }

    /// Whether this is the node of `user`, whose hash is `hash`.
    fn is(&self, hash: u64, user: &[u8]) -> bool {
        self.hash == hash && self.key() == user
    }

    /// Adds `v` before the first version whose tag is at or below its own. Only the writer
    /// calls it (under the writer lock).
    fn push(&self, v: &Ver) {
        let mut link = &self.versions;
        loop {
            let cur = link.load(Ordering::Acquire);
            // SAFETY: null or a published version of the same arena.
            match unsafe { cur.as_ref() } {
                Some(c) if c.tag > v.tag => link = &c.next,
                _ => {
                    v.next.store(cur, Ordering::Relaxed);
                    link.store(std::ptr::from_ref(v).cast_mut(), Ordering::Release);
                    return;
                }
            }
        }
    }
}

/// One version of a key, in the arena: this header, then the value's `len` bytes.
#[repr(C)]
struct Ver {
    /// The next older version.
    next: AtomicPtr<Ver>,
    tag: u64,
    len: usize,
}

impl Ver {
    fn value(&self) -> &[u8] {
        // SAFETY: the value's `len` bytes follow the header, written before it is published.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(self).add(1).cast::<u8>(), self.len)
        }
    }

    fn lookup(&self) -> Lookup {
        if self.tag & 0xff == Kind::Put as u64 {
            Lookup::Found(Bytes::copy_from_slice(self.value()))
        } else {
            Lookup::Deleted
        }
    }
}

/// A node's versions, newest first (with any replaced ones: see [`distinct`]).
struct Versions<'a>(Option<&'a Ver>);

impl<'a> Iterator for Versions<'a> {
    type Item = &'a Ver;

    fn next(&mut self) -> Option<&'a Ver> {
        let v = self.0?;
        // SAFETY: null or a published version of the same arena.
        self.0 = unsafe { v.next.load(Ordering::Acquire).as_ref() };
        Some(v)
    }
}

/// The versions of `versions` that are not replaced: the first of each run of equal tags.
fn distinct<'a>(versions: impl Iterator<Item = &'a Ver>) -> impl Iterator<Item = &'a Ver> {
    let mut last = None;
    versions.filter(move |v| {
        let keep = last != Some(v.tag);
        last = Some(v.tag);
        keep
    })
}

/// The newest version of `node` visible at `seq`.
fn visible(node: &Node, seq: u64) -> Lookup {
    node.versions().find(|v| v.tag >> 8 <= seq).map_or(Lookup::Absent, Ver::lookup)
}

/// A pointer to a node of a memtable, kept only where that memtable is kept alive (its index,
/// its unordered list, its cursors); [`Memtable::node`] turns it into a reference.
#[derive(Clone, Copy)]
struct NodeRef(NonNull<Node>);

// SAFETY: nodes are shared between threads as the module doc says: written whole before they
// are published, then read-only but for atomics.
unsafe impl Send for NodeRef {}
// SAFETY: as for `Send`.
unsafe impl Sync for NodeRef {}

impl NodeRef {
    fn of(n: &Node) -> NodeRef {
        NodeRef(NonNull::from(n))
    }
}

/// A pointer to a version of a memtable, kept only where that memtable is kept alive.
#[derive(Clone, Copy)]
struct VerRef(NonNull<Ver>);

// SAFETY: as for `NodeRef`.
unsafe impl Send for VerRef {}
// SAFETY: as for `NodeRef`.
unsafe impl Sync for VerRef {}

/// What only the writer touches: the arena and the random heights of new nodes.
struct Writer {
    arena: Arena,
    rng: u64,
}

impl Writer {
    /// A node of `user` with its first version `first`, not yet linked.
    fn node(&mut self, user: &[u8], hash: u64, first: VerRef) -> NodeRef {
        let height = self.height();
        self.node_of_height(user, hash, first.0.as_ptr(), height)
    }

    fn node_of_height(
        &mut self,
        user: &[u8],
        hash: u64,
        first: *mut Ver,
        height: usize,
    ) -> NodeRef {
        let p = self.arena.alloc(Node::size(height, user.len())).cast::<Node>();
        // SAFETY: the arena gave `p` room, 8-byte aligned, for the header, `height` links and
        // the key; each is written once here, before anyone else sees the node.
        unsafe {
            p.as_ptr().write(Node {
                hash,
                versions: AtomicPtr::new(first),
                len: u32::try_from(user.len()).expect("keys are limited far below 4 GiB"),
                height: height as u32,
            });
            let tower = p.as_ptr().add(1).cast::<AtomicPtr<Node>>();
            for i in 0..height {
                tower.add(i).write(AtomicPtr::new(std::ptr::null_mut()));
            }
            let key = tower.add(height).cast::<u8>();
            std::ptr::copy_nonoverlapping(user.as_ptr(), key, user.len());
        }
        NodeRef(p)
    }

    /// A version, not yet in a node.
    fn version(&mut self, tag: u64, value: &[u8]) -> VerRef {
        let p = self.arena.alloc(std::mem::size_of::<Ver>() + value.len()).cast::<Ver>();
        // SAFETY: the arena gave `p` room, 8-byte aligned, for the header and the value, which
        // stays until the memtable is dropped.
        unsafe {
            p.as_ptr().write(Ver {
                next: AtomicPtr::new(std::ptr::null_mut()),
                tag,
                len: value.len(),
            });
            std::ptr::copy_nonoverlapping(
                value.as_ptr(),
                p.as_ptr().add(1).cast::<u8>(),
                value.len(),
            );
        }
        VerRef(p)
    }

    /// A height for a new node: each level above the first with a chance of 1/4.
    fn height(&mut self) -> usize {
        // xorshift64*: cheap, and good enough to spread heights.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let mut h = 1;
        while h < MAX_HEIGHT && (r >> (2 * h)) & 3 == 0 {
            h += 1;
        }
        h
    }
}

/// A shard alone on its cache line(s).
#[repr(align(64))]
struct Shard(RwLock<HashTable<NodeRef>>);

type Table = HashTable<NodeRef>;
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

    /// Prefetches the nodes that may be the one of `hash` (those whose tag matches), without
    /// reading them.
    fn prefetch(&self, hash: u64) -> Probe {
        let mut probe = Probe::Unique(None);
        for n in self.table(hash).iter_hash(hash) {
            prefetch(n.0.as_ptr().cast(), std::mem::size_of::<Node>());
            probe = match probe {
                Probe::Unique(None) => Probe::Unique(Some(*n)),
                _ => Probe::Several,
            };
        }
        probe
    }
}

/// The nodes of the index that may be a key's, by their tag: none or one, which the lookup then
/// checks without probing the table again, or several.
enum Probe {
    Unique(Option<NodeRef>),
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

pub(crate) struct Memtable {
    /// The skiplist's head: a node of every level with no key and no version.
    head: NodeRef,
    /// Levels in use (at least 1).
    height: AtomicUsize,
    /// The arena (which every node and version is in) and what else only inserts touch.
    writer: Mutex<Writer>,
    /// The hash index: no shards if the database does not keep one.
    index: Box<[Shard]>,
    /// With the hash index: nodes not linked yet, each with its key's first eight bytes (see
    /// [`prefix8`]).
    unordered: Mutex<Vec<(u64, NodeRef)>>,
    /// Nodes added to `unordered` and not yet linked: raised as they are added, lowered once
    /// `order` linked them, so that a reader who finds it zero knows every node is linked.
    waiting: AtomicUsize,
    /// Held while `order` links nodes: one linker at a time.
    ordering: Mutex<()>,
    /// Distinct keys.
    keys: AtomicUsize,
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
    /// room for half the keys of that many bytes of small nodes, so that filling the memtable
    /// doubles them at most once (growing them from empty rehashes every entry and faults in
    /// each new table, again and again). The room is address space until entries land in it.
    pub(crate) fn new(
        wal_start: u64,
        hash_index: bool,
        limit: usize,
        spares: &Arc<Spares>,
    ) -> Memtable {
        let shards = if hash_index { SHARDS } else { 0 };
        // A node of one level and a version, for a short key and value.
        let small = Node::size(1, 16) + std::mem::size_of::<Ver>() + 16 + INDEX_OVERHEAD;
        // Room reserved for at most 256 MiB of them: a larger limit must not reserve tables of
        // gigabytes up front.
        let keys = limit.min(256 << 20) / (2 * small);
        let mut writer = Writer { arena: Arena::new(spares.clone()), rng: wal_start | 1 };
        let head = writer.node_of_height(&[], 0, std::ptr::null_mut(), MAX_HEIGHT);
        let size = writer.arena.used();
        Memtable {
            head,
            height: AtomicUsize::new(1),
            writer: Mutex::new(writer),
            index: (0..shards)
                .map(|_| Shard(RwLock::new(HashTable::with_capacity(keys / SHARDS))))
                .collect(),
            unordered: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            ordering: Mutex::new(()),
            keys: AtomicUsize::new(0),
            size: AtomicUsize::new(size),
            wal_start,
            wal_end: AtomicU64::new(u64::MAX),
        }
    }

    /// The node `r` points at, which lives as long as `self` (every `NodeRef` is of this
    /// memtable).
    fn node(&self, r: NodeRef) -> &Node {
        // SAFETY: `r` is a node of this memtable's arena, published (see `NodeRef`).
        unsafe { r.0.as_ref() }
    }

    /// The version `r` points at, of this memtable.
    fn ver(&self, r: VerRef) -> &Ver {
        // SAFETY: `r` is a published version of this memtable's arena (see `VerRef`).
        unsafe { r.0.as_ref() }
    }

    fn is_head(&self, n: &Node) -> bool {
        std::ptr::eq(n, self.head.0.as_ptr())
    }

    /// Inserts `user` at `seq`.
    #[allow(dead_code, reason = "for tests and the memtable benchmarks")]
    pub(crate) fn insert(&self, user: &[u8], seq: u64, kind: Kind, value: &[u8]) {
        self.insert_batch(&[Op { kind, key: user, value }], seq);
    }

    /// Inserts the writes of a batch, the `i`th at `seq + i`. With a hash index and more than
    /// one write, under the write locks of all their shards (see [`Memtable::locked`]): the
    /// index entries of all the keys are prefetched first, so that their cache misses overlap
    /// (see [`Memtable::get_many`]) instead of coming one after another, each behind a lock.
    pub(crate) fn insert_batch(&self, ops: &[Op<'_>], seq: u64) {
        let mut w = self.writer.lock();
        let before = w.arena.used();
        let mut new_keys = 0;
        if self.index.is_empty() {
            for (i, op) in ops.iter().enumerate() {
                new_keys += usize::from(self.insert_node(&mut w, op, seq + i as u64));
            }
        } else if let [op] = ops {
            let hash = crate::bloom::hash(op.key);
            #[expect(
                clippy::indexing_slicing,
                reason = "a non-empty `index` holds SHARDS shards, and shard_of is below SHARDS"
            )]
            let mut shard = self.index[shard_of(hash)].0.write();
            new_keys += usize::from(self.insert_indexed(&mut w, &mut shard, op, hash, seq));
        } else {
            let hashes: SmallVec<[u64; 16]> =
                ops.iter().map(|op| crate::bloom::hash(op.key)).collect();
            let mut locked = self.locked_mut(hashes.iter().copied());
            for &hash in &hashes {
                locked.prefetch(hash);
            }
            for (i, (op, &hash)) in ops.iter().zip(&hashes).enumerate() {
                let table = locked.table_mut(hash);
                new_keys +=
                    usize::from(self.insert_indexed(&mut w, table, op, hash, seq + i as u64));
            }
        }
        let index = if self.index.is_empty() { 0 } else { INDEX_OVERHEAD };
        let added = w.arena.used() - before + new_keys * index;
        drop(w);
        self.keys.fetch_add(new_keys, Ordering::Relaxed);
        self.size.fetch_add(added, Ordering::Relaxed);
    }

    /// Adds `op` at `seq` to its key's node, found in the index shard `table` (`hash` is the
    /// key's), or to a new node that waits for `order`; returns whether the node is new.
    fn insert_indexed(
        &self,
        w: &mut Writer,
        table: &mut Table,
        op: &Op<'_>,
        hash: u64,
        seq: u64,
    ) -> bool {
        let v = w.version(key::tag(seq, op.kind), op.value);
        match table.find(hash, |n| self.node(*n).is(hash, op.key)) {
            // An overwrite: no skiplist search.
            Some(n) => {
                self.node(*n).push(self.ver(v));
                false
            }
            None => {
                let n = w.node(op.key, hash, v);
                {
                    let mut unordered = self.unordered.lock();
                    unordered.push((prefix8(op.key), n));
                    self.waiting.fetch_add(1, Ordering::Release);
                }
                table.insert_unique(hash, n, |n| self.node(*n).hash);
                true
            }
        }
    }

    /// Adds `op` at `seq` to its key's node in the skiplist, linking a new one if there is none;
    /// returns whether the node is new.
    fn insert_node(&self, w: &mut Writer, op: &Op<'_>, seq: u64) -> bool {
        let v = w.version(key::tag(seq, op.kind), op.value);
        let mut prev = [self.head; MAX_HEIGHT];
        match self.splice(op.key, &mut prev) {
            Some(n) => {
                n.push(self.ver(v));
                false
            }
            None => {
                let n = w.node(op.key, 0, v);
                self.link(n, &mut prev);
                true
            }
        }
    }

    /// Fills `prev` with the last node before `user` at each level in use (the head where
    /// there is none), starting each level from its `prev` entry (which must be before `user`)
    /// or from where the level above ended, whichever is further; returns `user`'s node if it
    /// is linked. Nodes linked in ascending order, each with the `prev` of the one before, each
    /// find their place in a few steps.
    fn splice(&self, user: &[u8], prev: &mut [NodeRef; MAX_HEIGHT]) -> Option<&Node> {
        let head = self.node(self.head);
        let mut x = head;
        let top = self.height.load(Ordering::Acquire);
        for (level, p) in prev.iter_mut().enumerate().take(top).rev() {
            let hint = self.node(*p);
            if !self.is_head(hint) && (self.is_head(x) || bytes_cmp(hint.key(), x.key()).is_gt()) {
                x = hint;
            }
            while let Some(next) = x.next(level) {
                if bytes_cmp(next.key(), user).is_lt() {
                    x = next;
                } else {
                    break;
                }
            }
            *p = NodeRef::of(x);
        }
        x.next(0).filter(|n| n.key() == user)
    }

    /// Links `node` after the nodes `prev` holds (as [`Memtable::splice`] left them for its
    /// key), lowest level first, so that a reader who finds it at a level finds it below too;
    /// leaves `node` in `prev` at its levels. Only one thread links at a time.
    fn link(&self, node: NodeRef, prev: &mut [NodeRef; MAX_HEIGHT]) {
        let n = self.node(node);
        let height = n.height as usize;
        if height > self.height.load(Ordering::Relaxed) {
            // Readers who see the new height before the links find the head's null there and
            // go down a level.
            self.height.store(height, Ordering::Release);
        }
        for (level, p) in prev.iter_mut().enumerate().take(height) {
            let before = self.node(*p).link(level);
            n.link(level).store(before.load(Ordering::Acquire), Ordering::Relaxed);
            before.store(node.0.as_ptr(), Ordering::Release);
            *p = node;
        }
    }

    /// The last node before `user` (the head if none) and the node after it that the search
    /// stopped at (the first at or after `user`). The second is the one the search compared:
    /// loading the link again could find a node linked since, before `user`, and miss `user`.
    fn search(&self, user: &[u8]) -> (&Node, Option<&Node>) {
        let mut x = self.node(self.head);
        let mut level = self.height.load(Ordering::Acquire);
        let mut after = None;
        while level > 0 {
            level -= 1;
            after = None;
            while let Some(next) = x.next(level) {
                if bytes_cmp(next.key(), user).is_lt() {
                    x = next;
                } else {
                    after = Some(next);
                    break;
                }
            }
        }
        (x, after)
    }

    /// The first node at or after `user`.
    fn first_from(&self, user: &[u8]) -> Option<&Node> {
        self.search(user).1
    }

    /// The last node before `user`, if any.
    fn before(&self, user: &[u8]) -> Option<&Node> {
        Some(self.search(user).0).filter(|n| !self.is_head(n))
    }

    /// The last node at or before `user`.
    fn last_to(&self, user: &[u8]) -> Option<&Node> {
        match self.search(user) {
            (_, Some(n)) if n.key() == user => Some(n),
            (x, _) => Some(x).filter(|n| !self.is_head(n)),
        }
    }

    /// The first node.
    fn first(&self) -> Option<&Node> {
        self.node(self.head).next(0)
    }

    /// The last node.
    fn last(&self) -> Option<&Node> {
        let mut x = self.node(self.head);
        let mut level = self.height.load(Ordering::Acquire);
        while level > 0 {
            level -= 1;
            while let Some(next) = x.next(level) {
                x = next;
            }
        }
        Some(x).filter(|n| !self.is_head(n))
    }

    /// The newest version of `user` visible at `seq`; `hash` is [`crate::bloom::hash`] of `user`.
    pub(crate) fn get(&self, user: &[u8], hash: u64, seq: u64) -> Lookup {
        let node = match self.index.get(shard_of(hash)) {
            Some(Shard(shard)) => {
                let found = shard.read().find(hash, |n| self.node(*n).is(hash, user)).copied();
                found.map(|n| self.node(n))
            }
            None => self.first_from(user).filter(|n| n.key() == user),
        };
        node.map_or(Lookup::Absent, |n| visible(n, seq))
    }

    /// [`Memtable::get`] of several keys, each with its hash, all at `seq`. With a hash index
    /// the lookups run in two passes under the read locks of all their shards (see
    /// [`Memtable::locked`]): the first probes the index for every key and only prefetches the
    /// nodes it finds, the second reads them. A lookup alone misses the cache in the index and
    /// then in the node, and the next one cannot start early, as each takes its shard's lock
    /// (an atomic the processor cannot run past); this way the misses of all the keys overlap.
    pub(crate) fn get_many(&self, keys: &[(&[u8], u64)], seq: u64) -> Vec<Lookup> {
        if self.index.is_empty() {
            return keys.iter().map(|&(user, hash)| self.get(user, hash, seq)).collect();
        }
        let locked = self.locked(keys.iter().map(|k| k.1));
        let probes: SmallVec<[Probe; 16]> = keys.iter().map(|k| locked.prefetch(k.1)).collect();
        keys.iter()
            .zip(probes)
            .map(|(&(user, hash), probe)| {
                let found = match probe {
                    Probe::Unique(n) => n.filter(|n| self.node(*n).is(hash, user)),
                    Probe::Several => {
                        locked.table(hash).find(hash, |n| self.node(*n).is(hash, user)).copied()
                    }
                };
                found.map_or(Lookup::Absent, |n| visible(self.node(n), seq))
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

    /// Bytes held: the arena's (nodes, versions, keys and values) and the hash index's.
    pub(crate) fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.keys.load(Ordering::Relaxed) == 0
    }

    /// Links every node within `bounds` added to the hash index so far (see the module doc).
    /// Readers in key order call it once their point in time is fixed; it returns at once if no
    /// node waits. Nodes outside `bounds` keep waiting: a scan of a few keys does not order the
    /// whole memtable.
    pub(crate) fn order(&self, bounds: &Bounds) {
        if self.index.is_empty() || self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let _o = self.ordering.lock();
        let mut nodes: Vec<NodeRef> = {
            let mut unordered = self.unordered.lock();
            if let (Bound::Unbounded, Bound::Unbounded) = (&bounds.lo, &bounds.hi) {
                std::mem::take(&mut *unordered).into_iter().map(|(_, n)| n).collect()
            } else {
                let (lo, hi) = (bound_prefix(&bounds.lo), bound_prefix(&bounds.hi));
                // The eight-byte prefixes settle most keys without loading their nodes.
                unordered
                    .extract_if(.., |(p, n)| {
                        lo.is_none_or(|lo| *p >= lo)
                            && hi.is_none_or(|hi| *p <= hi)
                            && bounds.contains(self.node(*n).key())
                    })
                    .map(|(_, n)| n)
                    .collect()
            }
        };
        nodes.sort_unstable_by(|a, b| bytes_cmp(self.node(*a).key(), self.node(*b).key()));
        let mut prev = [self.head; MAX_HEIGHT];
        for &n in &nodes {
            self.splice(self.node(n).key(), &mut prev);
            self.link(n, &mut prev);
        }
        self.waiting.fetch_sub(nodes.len(), Ordering::Release);
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
        let mut node = self.first();
        while let Some(n) = node {
            for v in distinct(n.versions()) {
                set_ikey(&mut ikey, n.key(), v.tag);
                f(&ikey, v.value())?;
            }
            node = n.next(0);
        }
        Ok(())
    }
}

impl std::fmt::Debug for Memtable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memtable")
            .field("keys", &self.keys.load(Ordering::Relaxed))
            .field("size", &self.size())
            .field("wal_start", &self.wal_start)
            .finish()
    }
}

/// A cursor over one memtable's entries in internal-key order (or its reverse), for the merges
/// of `iter`. It holds the memtable, so the nodes and versions it points at stay alive.
pub(crate) struct Cursor {
    mem: Arc<Memtable>,
    forward: bool,
    /// The user keys it has to be right about (the keys of the scan it serves): keys of the
    /// hash index outside them may have no node yet.
    bounds: Bounds,
    /// The node it stands in and the version it stands at.
    at: Option<(NodeRef, VerRef)>,
    back: Back,
    /// The internal key of the current entry.
    ikey: Vec<u8>,
}

/// Going backward, the versions of the node a cursor stands in, oldest first: a node's versions
/// link from newest to oldest.
#[derive(Default)]
struct Back {
    /// The versions (without replaced ones), read when the cursor entered the node.
    vers: Vec<VerRef>,
    /// The node's newest version then: if it changed, versions came since, and are read again.
    newest: Option<VerRef>,
    /// The position of the one the cursor stands at.
    at: usize,
}

impl Back {
    /// Reads `n`'s versions and returns the first at or past `from` (the first with a tag at
    /// or above it; the oldest if `None`).
    fn enter<'a>(&mut self, n: &'a Node, from: Option<u64>) -> Option<(&'a Node, &'a Ver)> {
        let versions = n.versions();
        self.newest = versions.0.map(VerRef::of);
        self.vers.clear();
        self.vers.extend(distinct(versions).map(VerRef::of));
        self.vers.reverse();
        // SAFETY (both): the versions are `n`'s, which lives as long as `'a`.
        self.at = match from {
            None => 0,
            Some(tag) => self.vers.partition_point(|v| unsafe { v.0.as_ref() }.tag < tag),
        };
        self.vers.get(self.at).map(|v| (n, unsafe { &*v.0.as_ptr() }))
    }

    /// The version after the one at `at` in `n`, with the versions `n` got since the cursor
    /// entered it: while readers are about, those are newer than all the others (see the
    /// module doc), so they go at the end, and the walk from the newest stops at the one read
    /// before.
    fn step<'a>(&mut self, n: &'a Node) -> Option<(&'a Node, &'a Ver)> {
        let versions = n.versions();
        let newest = versions.0.map(VerRef::of);
        if newest.map(|v| v.0) != self.newest.map(|v| v.0) {
            let before = self.newest.map(|v| v.0);
            let came = versions.take_while(|v| Some(NonNull::from(*v)) != before);
            let came: Vec<VerRef> = distinct(came).map(VerRef::of).collect();
            self.vers.extend(came.into_iter().rev());
            self.newest = newest;
        }
        self.at += 1;
        // SAFETY: one of `n`'s versions, which live as long as `'a`.
        self.vers.get(self.at).map(|v| (n, unsafe { &*v.0.as_ptr() }))
    }
}

impl VerRef {
    fn of(v: &Ver) -> VerRef {
        VerRef(NonNull::from(v))
    }
}

impl Cursor {
    #[cfg(test)]
    pub(crate) fn new(mem: Arc<Memtable>, forward: bool) -> Cursor {
        Cursor::within(mem, forward, Bounds::ALL)
    }

    /// A cursor that shows every key within `bounds`, and perhaps others.
    pub(crate) fn within(mem: Arc<Memtable>, forward: bool, bounds: Bounds) -> Cursor {
        Cursor { mem, forward, bounds, at: None, back: Back::default(), ikey: Vec::new() }
    }

    /// Stands at the first entry at or past the internal key `target` in the direction of
    /// travel (at the edge if `None`).
    pub(crate) fn seek(&mut self, target: Option<&[u8]>) {
        let Cursor { mem, forward, bounds, at, back, ikey } = self;
        mem.order(bounds);
        let found = match (target, *forward) {
            (None, true) => mem.first().map(|n| (n, n.newest())),
            (None, false) => mem.last().and_then(|n| back.enter(n, None)),
            (Some(target), true) => {
                let (user, tag) = (key::user(target), key::tag_of(target));
                match mem.first_from(user) {
                    Some(n) if n.key() == user => {
                        match distinct(n.versions()).find(|v| v.tag <= tag) {
                            Some(v) => Some((n, v)),
                            None => n.next(0).map(|n| (n, n.newest())),
                        }
                    }
                    n => n.map(|n| (n, n.newest())),
                }
            }
            (Some(target), false) => {
                let (user, tag) = (key::user(target), key::tag_of(target));
                match mem.last_to(user) {
                    Some(n) if n.key() == user => back
                        .enter(n, Some(tag))
                        .or_else(|| mem.before(user).and_then(|n| back.enter(n, None))),
                    n => n.and_then(|n| back.enter(n, None)),
                }
            }
        };
        *at = stand(ikey, found);
    }

    /// Moves to the next entry in the direction of travel.
    pub(crate) fn advance(&mut self) {
        let Cursor { mem, forward, bounds, at, back, ikey } = self;
        let Some((n, v)) = *at else { return };
        // Keys added while the cursor stood get their nodes, so that it steps onto them.
        mem.order(bounds);
        let (n, v) = (mem.node(n), mem.ver(v));
        let found = if *forward {
            match distinct(Versions(Some(v))).nth(1) {
                Some(next) => Some((n, next)),
                None => n.next(0).map(|n| (n, n.newest())),
            }
        } else {
            back.step(n).or_else(|| mem.before(n.key()).and_then(|p| back.enter(p, None)))
        };
        *at = stand(ikey, found);
    }

    /// The current internal key; `None` past the end.
    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.at.as_ref().map(|_| &self.ikey[..])
    }

    pub(crate) fn value(&self) -> Bytes {
        Bytes::copy_from_slice(self.value_ref())
    }

    pub(crate) fn value_ref(&self) -> &[u8] {
        self.at.map_or(&[], |(_, v)| self.mem.ver(v).value())
    }
}

/// Where a cursor stands on `found` (a node and one of its versions), with `ikey` made its
/// internal key.
fn stand(ikey: &mut Vec<u8>, found: Option<(&Node, &Ver)>) -> Option<(NodeRef, VerRef)> {
    found.map(|(n, v)| {
        set_ikey(ikey, n.key(), v.tag);
        (NodeRef::of(n), VerRef::of(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn versions_and_tombstones() {
        for hash_index in [false, true] {
            versions_and_tombstones_with(hash_index);
        }
    }

    fn versions_and_tombstones_with(hash_index: bool) {
        let m = Memtable::new(0, hash_index, 1 << 20, &Arc::default());
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

    #[test]
    fn size_counts_nodes_and_versions() {
        for index in [false, true] {
            let m = Memtable::new(0, index, 1 << 20, &Arc::default());
            let empty = m.size();
            m.insert(b"k", 1, Kind::Put, b"short");
            let one = m.size() - empty;
            let node = Node::size(1, 1) + std::mem::size_of::<Ver>() + 5;
            assert!(one >= node, "{one}");
            // Another version costs its header and value, not another node.
            m.insert(b"k", 2, Kind::Put, b"short");
            let two = m.size() - empty;
            assert_eq!(two - one, (std::mem::size_of::<Ver>() + 5).next_multiple_of(8));
            // A long value is counted by its length.
            m.insert(b"k", 3, Kind::Put, &[0u8; 1000]);
            assert!(m.size() - empty - two >= 1000);
            // The same version again (a replay) replaces it: reads and iteration see only the
            // new one.
            m.insert(b"k", 3, Kind::Put, b"v");
            assert_eq!(
                m.get(b"k", crate::bloom::hash(b"k"), 9),
                Lookup::Found(Bytes::from_static(b"v"))
            );
            let mut seen = Vec::new();
            m.try_for_each(|k, v| {
                seen.push((key::seq(k), v.to_vec()));
                Ok::<_, ()>(())
            })
            .unwrap();
            assert_eq!(
                seen,
                vec![(3, b"v".to_vec()), (2, b"short".to_vec()), (1, b"short".to_vec())]
            );
        }
    }

    #[test]
    fn concurrent_writers_of_the_same_keys_lose_no_version() {
        for hash_index in [false, true] {
            let m = Memtable::new(0, hash_index, 1 << 20, &Arc::default());
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
                let got = m.get(user, crate::bloom::hash(user), u64::MAX >> 8);
                let wrote = (newest - 1) / threads;
                assert_eq!(got, Lookup::Found(Bytes::copy_from_slice(&wrote.to_le_bytes())));
            }
        }
    }

    /// Readers walking the skiplist both ways and reading keys while a writer inserts: every
    /// key published before a reader started is found, in order, with its value.
    #[test]
    fn readers_see_every_published_key_while_a_writer_links() {
        for hash_index in [false, true] {
            let m = Arc::new(Memtable::new(0, hash_index, 64 << 20, &Arc::default()));
            let published = AtomicU64::new(0);
            let n = 20_000u64;
            // Keys in a scrambled order, of varied lengths.
            let key_of = |i: u64| format!("{:x}-{}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i % 7);
            std::thread::scope(|s| {
                s.spawn(|| {
                    for i in 1..=n {
                        m.insert(key_of(i).as_bytes(), i, Kind::Put, &i.to_le_bytes());
                        published.store(i, Ordering::SeqCst);
                    }
                });
                for forward in [true, false] {
                    let (m, published) = (m.clone(), &published);
                    s.spawn(move || loop {
                        let seen = published.load(Ordering::SeqCst);
                        let mut c = Cursor::new(m.clone(), forward);
                        c.seek(None);
                        let mut keys = Vec::new();
                        while let Some(k) = c.key() {
                            let i = u64::from_le_bytes(c.value_ref().try_into().unwrap());
                            assert_eq!(key::user(k), key_of(i).as_bytes());
                            keys.push(key::user(k).to_vec());
                            c.advance();
                        }
                        if !forward {
                            keys.reverse();
                        }
                        assert!(keys.windows(2).all(|w| w[0] < w[1]), "out of order");
                        assert!(keys.len() as u64 >= seen, "{} keys of {seen}", keys.len());
                        for i in (1..=seen).step_by(97) {
                            let k = key_of(i);
                            let got = m.get(k.as_bytes(), crate::bloom::hash(k.as_bytes()), i);
                            assert_eq!(
                                got,
                                Lookup::Found(Bytes::copy_from_slice(&i.to_le_bytes()))
                            );
                        }
                        if seen == n {
                            break;
                        }
                    });
                }
            });
        }
    }

    /// A key is found while a writer links new keys right before it, again and again: a search
    /// must answer with the node it compared, not with a link loaded again (which may by then
    /// point at a newer node before the key).
    #[test]
    fn a_key_is_found_while_keys_are_linked_just_before_it() {
        for hash_index in [false, true] {
            let m = Memtable::new(0, hash_index, 64 << 20, &Arc::default());
            m.insert(b"b", 1, Kind::Put, b"v");
            // With the hash index, a key is in the list only once ordered (as iterators do
            // before they seek); the reader below may start before the writer's first order.
            m.order(&Bounds::ALL);
            let done = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    for i in 0..200_000u64 {
                        // Ascending keys, each linked between the one before and "b".
                        m.insert(format!("a{i:08}").as_bytes(), i + 2, Kind::Put, b"w");
                        if hash_index && i % 64 == 0 {
                            m.order(&Bounds::ALL);
                        }
                    }
                    done.store(true, Ordering::Relaxed);
                });
                s.spawn(|| {
                    while !done.load(Ordering::Relaxed) {
                        let got = m.get(b"b", crate::bloom::hash(b"b"), 1);
                        assert_eq!(got, Lookup::Found(Bytes::from_static(b"v")));
                        assert_eq!(m.last_to(b"b").map(Node::key), Some(&b"b"[..]));
                    }
                });
            });
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
        // Short and long (past 24 bytes) keys over a small alphabet, so they collide.
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
            let m = Arc::new(Memtable::new(0, hash_index, 1 << 20, &Arc::default()));
            // Internal key (user, !tag) in order → value.
            let mut model: BTreeMap<(Vec<u8>, u64), Vec<u8>> = BTreeMap::new();
            let mut cur: Option<Cursor> = None;
            // The model cursor: the key it stands at and the direction.
            let mut at: Option<(Vec<u8>, u64)> = None;
            let mut forward = true;
            let mut top = 0u64;
            for op in ops {
                match op {
                    Op::Insert(u, seq, del) => {
                        // While a cursor stands, writes come as the database makes them: each
                        // newer than any before (replays, in any order, come before readers).
                        let seq = if cur.is_some() { seq.max(top + 1) } else { seq };
                        top = top.max(seq);
                        let kind = if del { Kind::Delete } else { Kind::Put };
                        let v = if del { vec![] } else { format!("{seq}").into_bytes() };
                        m.insert(&u, seq, kind, &v);
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
                for seq in 0..=top + 1 {
                    let want = model
                        .range((u.clone(), !key::tag(seq, Kind::Put))..=(u.clone(), u64::MAX))
                        .next()
                        .map_or(Lookup::Absent, |((_, t), v)| {
                            if (!t) & 0xff == Kind::Put as u64 { Lookup::Found(Bytes::from(v.clone())) } else { Lookup::Deleted }
                        });
                    proptest::prop_assert_eq!(m.get(&u, crate::bloom::hash(&u), seq), want);
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
            let m = Arc::new(Memtable::new(0, true, 1 << 20, &Arc::default()));
            // Inserted in a scrambled order.
            let mut shuffled: Vec<&Vec<u8>> = keys.iter().collect();
            shuffled.sort_by_key(|k| crate::bloom::hash(k));
            for (i, k) in shuffled.iter().enumerate() {
                m.insert(k, i as u64 + 1, Kind::Put, b"v");
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
