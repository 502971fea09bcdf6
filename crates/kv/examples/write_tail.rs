//! Tail latency of one writer: `n` puts of 16-byte keys in order with 100-byte values (the
//! pattern of `timber-bench kv`'s fillseq) into a fresh database, each timed on its own, and the
//! write stall statistics after. For looking into the slowest writes with `perf` without the
//! bench harness around them.
//! `cargo run --release -p timber-kv --example write_tail -- [N] [DIR]`

use std::time::Instant;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn key(mut i: u64) -> [u8; 16] {
    let mut k = [b'0'; 16];
    for d in k.iter_mut().rev() {
        *d = b'0' + (i % 10) as u8;
        i /= 10;
    }
    k
}

fn main() -> timber_kv::Result<()> {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000_000);
    let base = std::env::args().nth(2).map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(&base).map_err(|e| timber_kv::Error::Io {
        path: base.clone(),
        op: "mkdtemp",
        source: e,
    })?;
    let db = timber_kv::Db::open(dir.path(), timber_kv::Options::default())?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut value = [0u8; 100];
    let mut nanos = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        for b in value.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let t = Instant::now();
        db.put(key(i), value)?;
        nanos.push(t.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    nanos.sort_unstable();
    let at = |q: f64| nanos[((nanos.len() - 1) as f64 * q) as usize] as f64 / 1e3;
    let over_1ms = nanos.len() - nanos.partition_point(|&ns| ns <= 1_000_000);
    println!(
        "{:.0} writes/s; p50 {:.2} p99 {:.2} p99.9 {:.2} p99.99 {:.1} max {:.0} µs; {over_1ms} over 1 ms",
        n as f64 / secs,
        at(0.5),
        at(0.99),
        at(0.999),
        at(0.9999),
        at(1.0)
    );
    let s = db.stats();
    println!(
        "slowed by memtables {:?}, by L0 {:?}; stopped by memtables {:?}, by L0 {:?}",
        s.slowed_by_memtables, s.slowed_by_l0, s.stopped_by_memtables, s.stopped_by_l0
    );
    Ok(())
}
