//! `Arena`: the memory of one memtable. Allocations bump a pointer through chunks mapped from
//! the OS (anonymous memory), and are given back all at once, chunk by chunk, when the arena is
//! dropped.
//!
//! A memtable holds hundreds of thousands of small objects (a node per key, a version per
//! write). Allocated one by one, each costs an allocator call on the writer and a free when the
//! memtable goes, node by node, on whichever thread drops it (tens to hundreds of milliseconds
//! for a full memtable, during which its memory is neither counted nor given back), plus the
//! allocator's rounding and headers. In an arena the size of a memtable is the bytes it handed
//! out, dropping it is a few dozen frees, and its objects lie packed in the order they were
//! written. The chunks are mapped rather than taken from the allocator so that a dropped
//! memtable's memory goes back to the OS at once: an allocator keeps freed memory for a while
//! to reuse it, and a flushed memtable is tens of MiB freed while the next one fills.
//!
//! A database's memtables fill one after another, so a dropped arena's full-size chunks go to the
//! database's [`Spares`] (up to one memtable's worth), and the next arena takes its chunks from
//! there before it maps new ones. Mapping and unmapping take the process's address-space lock
//! for writing, which waits for every other thread's mapping, unmapping and purging: on the
//! writer's thread it was the cause of most writes slower than a few microseconds, and a reused
//! chunk's pages are already faulted in. Spares that no arena took from between two calls of
//! `Spares::trim_unused` (the flush thread's idle ticks) are unmapped.
//!
//! Invariants: every pointer `alloc` returns is 8-byte aligned, valid for the size asked, and
//! stays valid (never moved, never reused) until the arena is dropped. `used` counts every byte
//! handed out plus the tails of chunks abandoned for a larger allocation. A chunk is in at most
//! one arena or in the spares, never both.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use memmap2::MmapMut;
use parking_lot::Mutex;

/// The first chunk's size: a memtable that stays small (a quiet keyspace) costs little.
const FIRST_CHUNK: usize = 64 << 10;

/// Chunks double up to this size.
const MAX_CHUNK: usize = 1 << 20;

/// Allocations larger than this get a chunk of their own, so that a large value does not
/// abandon most of a chunk.
const OWN_CHUNK_OVER: usize = MAX_CHUNK / 8;

const ALIGN: usize = 8;

/// Full-size chunks of dropped arenas, kept for the next arenas of one database.
#[derive(Debug, Default)]
pub(crate) struct Spares {
    chunks: Mutex<Vec<MmapMut>>,
    /// At most this many are kept; the rest are unmapped.
    limit: usize,
    /// `chunks.len()` without the lock, for statistics.
    count: AtomicUsize,
    /// Whether a chunk was taken since the last `trim_unused`.
    taken: AtomicBool,
    /// The newest arena (the active memtable's) and the full-size chunks it holds: the spares
    /// keep no more than it still needs to reach `limit`, so that the memory of the memtables
    /// and the spares together never passes what it was without them.
    newest: AtomicU64,
    newest_chunks: AtomicUsize,
    /// Arenas not yet dropped: while another than the newest lives (an immutable memtable not
    /// yet flushed, one a reader holds), a dropped arena's chunks are not kept, as that memory
    /// would come on top of theirs.
    live: AtomicUsize,
}

impl Spares {
    /// Spares that keep at most `bytes` of chunks (one memtable's size: what the next memtable
    /// will fill while the last one's memory would otherwise go back to the OS).
    pub(crate) fn new(bytes: usize) -> Spares {
        Spares { limit: bytes / MAX_CHUNK, ..Spares::default() }
    }

    /// Bytes of the chunks kept.
    pub(crate) fn bytes(&self) -> usize {
        self.count.load(Ordering::Relaxed) * MAX_CHUNK
    }

    fn take(&self) -> Option<MmapMut> {
        let mut chunks = self.chunks.lock();
        let map = chunks.pop();
        self.count.store(chunks.len(), Ordering::Relaxed);
        self.taken.store(true, Ordering::Relaxed);
        map
    }

    /// Unmaps every chunk kept if none was taken since the last call: called now and then by a
    /// background thread, it gives the memory of a database that stopped writing back to the OS.
    /// Returns whether it unmapped any.
    pub(crate) fn trim_unused(&self) -> bool {
        if self.taken.swap(false, Ordering::Relaxed) {
            return false;
        }
        let unused = {
            let mut chunks = self.chunks.lock();
            self.count.store(0, Ordering::Relaxed);
            std::mem::take(&mut *chunks)
        };
        let any = !unused.is_empty();
        drop(unused);
        any
    }

    /// Registers a new arena as the newest; returns its id.
    fn newest_is(&self) -> u64 {
        self.live.fetch_add(1, Ordering::Relaxed);
        let id = self.newest.fetch_add(1, Ordering::Relaxed) + 1;
        self.newest_chunks.store(0, Ordering::Relaxed);
        id
    }

    /// Counts a full-size chunk that arena `id` took or mapped.
    fn holds_one_more(&self, id: u64) {
        if self.newest.load(Ordering::Relaxed) == id {
            self.newest_chunks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keeps what fits of the full-size chunks (`maps`) of arena `id`, dropped; the rest are
    /// dropped (unmapped) after the lock is let go.
    fn give(&self, id: u64, maps: Vec<MmapMut>) {
        let mut maps = maps;
        // The newest arena's chunks need no room kept for it any more.
        if self.newest.load(Ordering::Relaxed) == id {
            self.newest_chunks.store(0, Ordering::Relaxed);
        }
        let others = self.live.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        let room = match others {
            0 | 1 => self.limit.saturating_sub(self.newest_chunks.load(Ordering::Relaxed)),
            _ => 0,
        };
        {
            let mut chunks = self.chunks.lock();
            while chunks.len() < room {
                let Some(m) = maps.pop() else { break };
                chunks.push(m);
            }
            self.count.store(chunks.len(), Ordering::Relaxed);
        }
        drop(maps);
    }
}

pub(crate) struct Arena {
    /// Every chunk, given to `spares` or unmapped on drop.
    chunks: Vec<MmapMut>,
    spares: Arc<Spares>,
    /// Its id among the arenas of `spares`.
    id: u64,
    /// The free part of the current chunk: from `next`, `left` bytes.
    next: *mut u8,
    left: usize,
    /// Size of the next shared chunk.
    chunk_size: usize,
    used: usize,
}

// SAFETY: the arena owns its chunks outright; `next` points into one of them, which no one
// else unmaps, so moving the arena to another thread moves that ownership with it.
unsafe impl Send for Arena {}

impl Arena {
    pub(crate) fn new(spares: Arc<Spares>) -> Arena {
        Arena {
            chunks: Vec::new(),
            id: spares.newest_is(),
            spares,
            next: std::ptr::null_mut(),
            left: 0,
            chunk_size: FIRST_CHUNK,
            used: 0,
        }
    }

    /// `size` bytes (rounded up to 8), 8-byte aligned, uninitialized.
    pub(crate) fn alloc(&mut self, size: usize) -> NonNull<u8> {
        let size = size.max(1).next_multiple_of(ALIGN);
        if size > OWN_CHUNK_OVER {
            // Mapped in whole pages.
            self.used += size.next_multiple_of(4096);
            return self.chunk(size);
        }
        if size > self.left {
            self.used += self.left;
            if let Some(mut map) = self.spares.take() {
                // A spare is full-size: the arena's next chunks would be too.
                self.spares.holds_one_more(self.id);
                self.chunk_size = MAX_CHUNK;
                self.next = map.as_mut_ptr();
                self.left = map.len();
                self.chunks.push(map);
            } else {
                // A first chunk is smaller than the largest shared allocation.
                let len = self.chunk_size.max(size);
                if len == MAX_CHUNK {
                    self.spares.holds_one_more(self.id);
                }
                self.chunk_size = (self.chunk_size * 2).min(MAX_CHUNK);
                self.next = self.chunk(len).as_ptr();
                self.left = len;
            }
        }
        debug_assert!(size <= self.left);
        let p = self.next;
        // SAFETY: `size <= left`, so `p + size` stays within (or one past) the current chunk.
        self.next = unsafe { p.add(size) };
        self.left -= size;
        self.used += size;
        // SAFETY: `p` points into a mapped chunk, never null.
        unsafe { NonNull::new_unchecked(p) }
    }

    /// A new chunk of `len` bytes (page-aligned), kept until drop.
    fn chunk(&mut self, len: usize) -> NonNull<u8> {
        let Ok(mut map) = MmapMut::map_anon(len) else {
            // Out of memory (or of mappings): as the allocator would.
            std::alloc::handle_alloc_error(
                Layout::from_size_align(len, ALIGN).expect("a chunk's size fits a layout"),
            )
        };
        // The mapping's address does not change when the `MmapMut` moves into the list.
        let p = NonNull::new(map.as_mut_ptr()).expect("a mapping is not at address 0");
        self.chunks.push(map);
        p
    }

    /// Bytes handed out, with the tails of abandoned chunks.
    pub(crate) fn used(&self) -> usize {
        self.used
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let (full, other): (Vec<MmapMut>, Vec<MmapMut>) =
            std::mem::take(&mut self.chunks).into_iter().partition(|m| m.len() == MAX_CHUNK);
        drop(other);
        self.spares.give(self.id, full);
    }
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("chunks", &self.chunks.len())
            .field("used", &self.used)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first allocation of a fresh arena may be larger than its first chunk.
    #[test]
    fn a_first_allocation_larger_than_the_first_chunk_fits() {
        let mut a = Arena::new(Arc::default());
        let size = OWN_CHUNK_OVER - 8;
        assert!(size > FIRST_CHUNK);
        let p = a.alloc(size).as_ptr();
        unsafe { std::ptr::write_bytes(p, 0xcd, size) };
        let q = a.alloc(16).as_ptr();
        assert!(q as usize >= p as usize + size || (q as usize) + 16 <= p as usize);
    }

    /// A dropped arena's full-size chunks go to its spares, up to their limit, and the next
    /// arena takes them before it maps new ones; the rest are unmapped.
    #[test]
    fn dropped_chunks_are_reused_up_to_the_limit() {
        let spares = Arc::new(Spares::new(3 * MAX_CHUNK));
        let mut a = Arena::new(spares.clone());
        // Fills the small first chunks, then four full-size ones.
        while a.chunks.iter().filter(|m| m.len() == MAX_CHUNK).count() < 4 {
            a.alloc(4096);
        }
        let full_of = |a: &Arena| -> Vec<usize> {
            a.chunks.iter().filter(|m| m.len() == MAX_CHUNK).map(|m| m.as_ptr() as usize).collect()
        };
        let mut full = full_of(&a);
        // The newest arena already holds a full-size chunk: the spares keep what it still needs.
        let mut newest = Arena::new(spares.clone());
        while newest.chunks.iter().all(|m| m.len() != MAX_CHUNK) {
            newest.alloc(4096);
        }
        full.extend(full_of(&newest));
        drop(a);
        assert_eq!(spares.bytes(), 2 * MAX_CHUNK, "kept up to what the newest arena needs");
        drop(newest);
        assert_eq!(spares.bytes(), 3 * MAX_CHUNK, "kept up to the limit");
        let mut b = Arena::new(spares.clone());
        let p = b.alloc(100).as_ptr() as usize;
        assert!(full.iter().any(|&c| (c..c + MAX_CHUNK).contains(&p)), "a spare chunk is reused");
        assert_eq!(spares.bytes(), 2 * MAX_CHUNK);
        // Reused memory is writable and the allocation is whole.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0xab, 100) };
        drop(b);
        assert_eq!(spares.bytes(), 3 * MAX_CHUNK);
        // While another arena than the newest lives (an unflushed memtable), a dropped one's
        // chunks are not kept.
        let mut old = Arena::new(spares.clone());
        let other = Arena::new(spares.clone());
        let newest = Arena::new(spares.clone());
        // Takes the three spares, then maps two full-size chunks of its own.
        for _ in 0..5 * (MAX_CHUNK / OWN_CHUNK_OVER) {
            old.alloc(OWN_CHUNK_OVER);
        }
        assert_eq!(spares.bytes(), 0);
        drop(old);
        assert_eq!(spares.bytes(), 0, "nothing kept beside two live arenas");
        drop(other);
        drop(newest);
        assert_eq!(spares.bytes(), 0);
        let mut old = Arena::new(spares.clone());
        // (The first chunks of a fresh arena are smaller: more than three full ones.)
        for _ in 0..5 * (MAX_CHUNK / OWN_CHUNK_OVER) {
            old.alloc(OWN_CHUNK_OVER);
        }
        let newest = Arena::new(spares.clone());
        drop(old);
        assert_eq!(spares.bytes(), 3 * MAX_CHUNK, "kept when only the newest lives");
        drop(newest);
        // Taken from since the last trim: kept; then unused until the next: given back.
        assert!(!spares.trim_unused());
        assert_eq!(spares.bytes(), 3 * MAX_CHUNK);
        assert!(spares.trim_unused());
        assert_eq!(spares.bytes(), 0);
        let none = Arc::new(Spares::new(0));
        let mut c = Arena::new(none.clone());
        for _ in 0..600 {
            c.alloc(4096);
        }
        drop(c);
        assert_eq!(none.bytes(), 0, "without a limit nothing is kept");
    }

    #[test]
    fn allocations_are_aligned_disjoint_and_counted() {
        let mut a = Arena::new(Arc::default());
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for size in [1usize, 7, 8, 24, 100, 5000, OWN_CHUNK_OVER + 1, 3, MAX_CHUNK, 64 << 10] {
            let p = a.alloc(size).as_ptr();
            assert_eq!(p as usize % ALIGN, 0);
            // Every byte is writable.
            unsafe { std::ptr::write_bytes(p, 0xab, size) };
            spans.push((p as usize, p as usize + size));
        }
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "allocations overlap");
        let asked: usize =
            [1usize, 7, 8, 24, 100, 5000, OWN_CHUNK_OVER + 1, 3, MAX_CHUNK, 64 << 10]
                .iter()
                .map(|s| s.next_multiple_of(ALIGN))
                .sum();
        assert!(a.used() >= asked && a.used() <= asked + 2 * MAX_CHUNK, "{}", a.used());
    }
}
