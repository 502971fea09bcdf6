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
//! Invariants: every pointer `alloc` returns is 8-byte aligned, valid for the size asked, and
//! stays valid (never moved, never reused) until the arena is dropped. `used` counts every byte
//! handed out plus the tails of chunks abandoned for a larger allocation.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::ptr::NonNull;

use memmap2::MmapMut;

/// The first chunk's size: a memtable that stays small (a quiet keyspace) costs little.
const FIRST_CHUNK: usize = 64 << 10;

/// Chunks double up to this size.
const MAX_CHUNK: usize = 1 << 20;

/// Allocations larger than this get a chunk of their own, so that a large value does not
/// abandon most of a chunk.
const OWN_CHUNK_OVER: usize = MAX_CHUNK / 8;

const ALIGN: usize = 8;

pub(crate) struct Arena {
    /// Every chunk, unmapped on drop.
    chunks: Vec<MmapMut>,
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
    pub(crate) fn new() -> Arena {
        Arena {
            chunks: Vec::new(),
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
            // A first chunk is smaller than the largest shared allocation.
            let len = self.chunk_size.max(size);
            self.chunk_size = (self.chunk_size * 2).min(MAX_CHUNK);
            self.next = self.chunk(len).as_ptr();
            self.left = len;
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
        let mut a = Arena::new();
        let size = OWN_CHUNK_OVER - 8;
        assert!(size > FIRST_CHUNK);
        let p = a.alloc(size).as_ptr();
        unsafe { std::ptr::write_bytes(p, 0xcd, size) };
        let q = a.alloc(16).as_ptr();
        assert!(q as usize >= p as usize + size || (q as usize) + 16 <= p as usize);
    }

    #[test]
    fn allocations_are_aligned_disjoint_and_counted() {
        let mut a = Arena::new();
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
