//! What the fuzz targets share: an allocator that turns an allocation larger than any input
//! can justify into a crash libFuzzer reports (without a sanitizer, on the stable toolchain,
//! libFuzzer's own `-malloc_limit_mb` sees no allocation).

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation a decoder may make. Inputs are at most a few KiB (libFuzzer's
/// `-max_len`), so anything near this is sized by a length field, not by the input.
pub const MAX_ALLOCATION: usize = 64 << 20;

/// The system allocator, aborting on any allocation over [`MAX_ALLOCATION`].
#[derive(Debug)]
pub struct Limited;

fn check(size: usize) {
    if size > MAX_ALLOCATION {
        // No allocation on this path: stderr is unbuffered.
        eprintln!("allocation of {size} bytes, over the limit of {MAX_ALLOCATION}");
        std::process::abort();
    }
}

// SAFETY: every call is passed to `System` unchanged; the check only aborts.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller's contract is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}
