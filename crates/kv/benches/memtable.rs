//! Memtable insert and lookup cost (S2 target: insert under 1 us), with 16-byte keys and 100-byte
//! values into a memtable holding up to 1M entries, under the system allocator
//! (`memtable_mimalloc.rs` runs them under mimalloc). The memtable is crate-private, so its
//! source is compiled into this benchmark directly.

#![allow(dead_code, unused_imports, missing_debug_implementations, unreachable_pub)]

use criterion::{criterion_group, criterion_main};

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
