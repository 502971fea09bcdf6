//! `timber-bench`: side-by-side benchmarks of timber against peers, one subcommand per layer.
//! Each prints a table (medians over repeats, systems alternated within each repeat) and writes
//! `target/bench/<layer>.json`.

/// Every system runs on the same allocator; glibc's malloc would dominate their profiles.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    match Cli::parse().command {
        Command::Wal(args) => wal::run(args),
        Command::Kv(args) => kv::run(args),
        Command::Stream(args) => stream::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Txn(args) => txn::run(args),
    }
}
