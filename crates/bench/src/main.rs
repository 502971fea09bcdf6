//! `timber-bench`: side-by-side benchmarks of timber against peers, one subcommand per layer.
//! Each prints a table (medians over repeats, systems alternated within each repeat) and writes
//! `target/bench/<layer>.json`.

/// timber and the Rust peers run on mimalloc, as timberd does (RocksDB's C++ allocates with
/// glibc's malloc).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option: its place in mimalloc's `mi_option_e` (v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc's purge delay, as timberd sets it (see its `main`).
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`].
#[allow(unsafe_code)]
fn return_freed_memory_soon() {
    // mimalloc's own variable still decides when set.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: called first thing in main, before any other thread exists (mimalloc's option
    // setters are not thread-safe); the option index is a valid `mi_option_t`.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

/// Gives the memory mimalloc holds freed back to the OS now. Called between workloads, after a
/// database is closed: mimalloc purges freed memory lazily, on whichever allocation comes
/// after the purge delay, so the next workload's first writes would otherwise pay for the
/// previous database's teardown (tens of milliseconds of `madvise` after a 10M-key one), as
/// they would not in a process of their own.
#[allow(unsafe_code)]
pub(crate) fn return_freed_memory_now() {
    // SAFETY: `mi_collect` may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

mod cluster;
mod kv;
mod report;
mod stream;
mod txn;
mod wal;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "timber-bench", about = "Benchmarks timber side by side with its peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The write-ahead log: unsynced and durable appends, sequential reads, recovery.
    Wal(wal::Args),
    /// The key-value engine: the db_bench workloads against RocksDB, fjall, sled and redb.
    Kv(kv::Args),
    /// Log streams: appends, tail latency, catch-up reads and the cache, on local files and S3,
    /// beside each backend's ceiling.
    Stream(stream::Args),
    /// A three-member timberd cluster beside a three-member etcd: puts, linearizable reads,
    /// replication lag and failover.
    Cluster(cluster::Args),
    /// Transactions: read-modify-write and read-only transactions at 1, 8 and 32 threads
    /// against RocksDB's optimistic and pessimistic transaction databases and fjall.
    Txn(txn::Args),
}

fn main() -> anyhow::Result<()> {
    return_freed_memory_soon();
    match Cli::parse().command {
        Command::Wal(args) => wal::run(args),
        Command::Kv(args) => kv::run(args),
        Command::Stream(args) => stream::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Txn(args) => txn::run(args),
    }
}
