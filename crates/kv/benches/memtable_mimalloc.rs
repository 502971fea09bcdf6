//! The benchmarks of `memtable.rs` with mimalloc as the global allocator, the allocator timber's
//! binaries run with: an insert allocates, so the allocator is a large part of what is measured.

#![allow(dead_code, unused_imports, missing_debug_implementations, unreachable_pub)]

use criterion::{criterion_group, criterion_main};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../src/arena.rs"]
mod arena;
#[path = "../src/bloom.rs"]
mod bloom;
#[path = "../src/bounds.rs"]
mod bounds;
#[path = "../src/key.rs"]
mod key;
#[path = "../src/memtable.rs"]
mod memtable;
#[path = "shared/memtable.rs"]
mod memtable_common;

criterion_group!(benches, memtable_common::bench);
criterion_main!(benches);
