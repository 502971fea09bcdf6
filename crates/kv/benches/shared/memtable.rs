//! The memtable benchmarks, shared by `../memtable.rs` (system allocator) and
//! `../memtable_mimalloc.rs`.

use std::time::{Duration, Instant};

use criterion::Criterion;

use crate::bloom;
use crate::key::Kind;
use crate::memtable::Memtable;

const ENTRIES: u64 = 1_000_000;

fn key_of(i: u64) -> [u8; 16] {
    let mut k = [b'0'; 16];
    let mut x = i;
    for d in k.iter_mut().rev() {
        *d = b'0' + (x % 10) as u8;
        x /= 10;
    }
    k
}

/// A permutation of `0..ENTRIES` (999,983 is a prime coprime to 10^6): every key distinct.
fn scramble(i: u64) -> u64 {
    (i % ENTRIES) * 999_983 % ENTRIES
}

/// Times `iters` inserts, starting a fresh memtable every `ENTRIES` so it never holds more.
fn inserts(iters: u64, order: fn(u64) -> u64) -> Duration {
    let value = [7u8; 100];
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let m = Memtable::new(0, false, 64 << 20, &Default::default());
        let n = (iters - done).min(ENTRIES);
        let start = Instant::now();
        for i in 0..n {
            m.insert(&key_of(order(i)), done + i + 1, Kind::Put, &value);
        }
        total += start.elapsed();
        done += n;
    }
    total
}

pub(crate) fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("memtable");
    g.bench_function("insert_sequential", |b| b.iter_custom(|n| inserts(n, |i| i)));
    g.bench_function("insert_random", |b| b.iter_custom(|n| inserts(n, scramble)));
    let m = Memtable::new(0, false, 64 << 20, &Default::default());
    for i in 0..ENTRIES {
        m.insert(&key_of(i), i + 1, Kind::Put, &[7u8; 100]);
    }
    let mut i = 0u64;
    g.bench_function("get_hit_1m", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let k = key_of(scramble(i));
            m.get(&k, bloom::hash(&k), u64::MAX >> 8)
        })
    });
    g.finish();
}
