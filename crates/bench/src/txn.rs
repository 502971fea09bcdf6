//! `timber-bench txn`: transactions side by side. timber-kv's optimistic and pessimistic
//! transactions at `Snapshot` beside RocksDB's `OptimisticTransactionDB` and `TransactionDB`
//! (each transaction with a snapshot: write-write conflicts abort, the same guarantee), and
//! timber at `Serializable` beside fjall's serializable `TxKeyspace` (feature `ssi_tx`).
//!
//! Keys of 16 bytes, values of 100, `--num` keys loaded and flushed first (not measured).
//! Workloads, each at 1, 8 and 32 threads for `--secs`:
//! - `rmw-4 uniform`: read 4 random keys for update and write each (keys in order, so that
//!   pessimistic transactions wait but never deadlock);
//! - `rmw-4 zipf`: the same with zipfian keys (θ = 0.99), so that transactions collide;
//! - `read-16`: 16 random gets in one transaction.
//!
//! A transaction that aborts (conflict, lock timeout) counts as an abort and is not retried.
//! Rows: committed transactions/s, p50/p99 of committed ones, and the abort rate (aborts per
//! attempt). Systems alternate within each repeat; medians over repeats.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::report::{self, Row, Sample};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keys loaded.
    #[arg(long, default_value_t = 1_000_000)]
    num: u64,
    /// Seconds per (workload, threads, system).
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// Repeats (systems alternate within each).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
    threads: Vec<usize>,
    /// Directory for the databases (default: a temporary directory under target/).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Only these systems (comma-separated: timber-optimistic, timber-pessimistic,
    /// timber-serializable, rocksdb-optimistic, rocksdb-pessimistic, fjall).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only workloads whose name contains this.
    #[arg(long)]
    workload: Option<String>,
}

const KEY_LEN: usize = 16;
const VALUE_LEN: usize = 100;
const CACHE: usize = 64 << 20;

type Key = [u8; KEY_LEN];

fn key(mut i: u64) -> Key {
    let mut k = [b'0'; KEY_LEN];
    for d in k.iter_mut().rev() {
        *d = b'0' + (i % 10) as u8;
        i /= 10;
    }
    k
}

/// One transactional engine under test.
trait TxnDb: Sync {
    /// Writes the keys (loading; not measured).
    fn load(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<()>;
    /// Writes what the load left in memory to disk and waits for it (not measured), so that
    /// the flush does not fall into a measurement.
    fn settle(&self) -> anyhow::Result<()>;
    /// Reads each key for update and writes it, in one transaction: whether it committed.
    fn rmw(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<bool>;
    /// Reads each key in one transaction: whether it committed.
    fn read(&self, keys: &[Key]) -> anyhow::Result<bool>;
}

struct Timber(timber_kv::Db, timber_kv::TxnOptions);

impl TxnDb for Timber {
    fn load(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<()> {
        for chunk in keys.chunks(1000) {
            let mut b = timber_kv::WriteBatch::new();
            for k in chunk {
                b.put(k, value);
            }
            self.0.write(b)?;
        }
        Ok(())
    }

    fn settle(&self) -> anyhow::Result<()> {
        Ok(self.0.flush()?)
    }

    fn rmw(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<bool> {
        let mut t = self.0.transaction(self.1.clone());
        for k in keys {
            match t.get_for_update(k).and_then(|_| t.put(k, value)) {
                Ok(()) => {}
                Err(e) if aborted(&e) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        match t.commit() {
            Ok(_) => Ok(true),
            Err(e) if aborted(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn read(&self, keys: &[Key]) -> anyhow::Result<bool> {
        let mut t = self.0.transaction(self.1.clone());
        for k in keys {
            t.get(k)?;
        }
        match t.commit() {
            Ok(_) => Ok(true),
            Err(e) if aborted(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

fn aborted(e: &timber_kv::Error) -> bool {
    matches!(
        e,
        timber_kv::Error::Conflict { .. }
            | timber_kv::Error::Deadlock { .. }
            | timber_kv::Error::LockTimeout { .. }
    )
}

fn open_timber(dir: &Path, opts: timber_kv::TxnOptions) -> anyhow::Result<Box<dyn TxnDb>> {
    // The memtable's hash index, as timberd keeps it: a point read of a key the memtable does
    // not hold (most of these reads) costs a hash probe instead of a skiplist search.
    let kv = timber_kv::Options::default().block_cache_bytes(CACHE).memtable_hash_index(true);
    let db = timber_kv::Db::open(dir, kv)?;
    Ok(Box::new(Timber(db, opts)))
}

#[cfg(feature = "rocksdb")]
mod rocks {
    use super::{Key, TxnDb, CACHE};

    fn options() -> rocksdb::Options {
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.set_compression_type(rocksdb::DBCompressionType::None);
        let mut t = rocksdb::BlockBasedOptions::default();
        t.set_block_cache(&rocksdb::Cache::new_lru_cache(CACHE));
        o.set_block_based_table_factory(&t);
        o
    }

    fn aborted(e: &rocksdb::Error) -> bool {
        use rocksdb::ErrorKind as K;
        matches!(e.kind(), K::Busy | K::TryAgain | K::TimedOut | K::Expired | K::Aborted)
    }

    /// Loads `keys` through `write`, a thousand to a batch.
    fn load(
        keys: &[Key],
        value: &[u8],
        write: impl Fn(rocksdb::WriteBatchWithTransaction<true>) -> Result<(), rocksdb::Error>,
    ) -> anyhow::Result<()> {
        for chunk in keys.chunks(1000) {
            let mut b = rocksdb::WriteBatchWithTransaction::<true>::default();
            for k in chunk {
                b.put(k, value);
            }
            write(b)?;
        }
        Ok(())
    }

    /// Reads each key for update and writes it in `t`, then commits: whether it committed.
    fn rmw<D>(t: rocksdb::Transaction<'_, D>, keys: &[Key], value: &[u8]) -> anyhow::Result<bool> {
        for k in keys {
            match t.get_for_update(k, true).and_then(|_| t.put(k, value)) {
                Ok(()) => {}
                Err(e) if aborted(&e) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        commit(t)
    }

    /// Reads each key at `t`'s snapshot, then commits: whether it committed.
    fn read<D>(t: rocksdb::Transaction<'_, D>, keys: &[Key]) -> anyhow::Result<bool> {
        let snap = t.snapshot();
        for k in keys {
            let mut r = rocksdb::ReadOptions::default();
            r.set_snapshot(&snap);
            t.get_opt(k, &r)?;
        }
        drop(snap);
        commit(t)
    }

    fn commit<D>(t: rocksdb::Transaction<'_, D>) -> anyhow::Result<bool> {
        match t.commit() {
            Ok(()) => Ok(true),
            Err(e) if aborted(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub struct Optimistic(rocksdb::OptimisticTransactionDB);

    pub fn optimistic(dir: &std::path::Path) -> anyhow::Result<Box<dyn TxnDb>> {
        Ok(Box::new(Optimistic(rocksdb::OptimisticTransactionDB::open(&options(), dir)?)))
    }

    impl Optimistic {
        /// A transaction with a snapshot: a key written since conflicts at commit.
        fn begin(&self) -> rocksdb::Transaction<'_, rocksdb::OptimisticTransactionDB> {
            let mut o = rocksdb::OptimisticTransactionOptions::default();
            o.set_snapshot(true);
            self.0.transaction_opt(&rocksdb::WriteOptions::default(), &o)
        }
    }

    impl TxnDb for Optimistic {
        fn load(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<()> {
            load(keys, value, |b| self.0.write(b))
        }

        fn settle(&self) -> anyhow::Result<()> {
            Ok(self.0.flush()?)
        }

        fn rmw(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<bool> {
            rmw(self.begin(), keys, value)
        }

        fn read(&self, keys: &[Key]) -> anyhow::Result<bool> {
            read(self.begin(), keys)
        }
    }

    pub struct Pessimistic(rocksdb::TransactionDB);

    pub fn pessimistic(dir: &std::path::Path) -> anyhow::Result<Box<dyn TxnDb>> {
        let db = rocksdb::TransactionDB::open(
            &options(),
            &rocksdb::TransactionDBOptions::default(),
            dir,
        )?;
        Ok(Box::new(Pessimistic(db)))
    }

    impl Pessimistic {
        /// A transaction with a snapshot: a key written since conflicts when locked.
        fn begin(&self) -> rocksdb::Transaction<'_, rocksdb::TransactionDB> {
            let mut o = rocksdb::TransactionOptions::default();
            o.set_snapshot(true);
            self.0.transaction_opt(&rocksdb::WriteOptions::default(), &o)
        }
    }

    impl TxnDb for Pessimistic {
        fn load(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<()> {
            load(keys, value, |b| self.0.write(b))
        }

        fn settle(&self) -> anyhow::Result<()> {
            Ok(self.0.flush()?)
        }

        fn rmw(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<bool> {
            rmw(self.begin(), keys, value)
        }

        fn read(&self, keys: &[Key]) -> anyhow::Result<bool> {
            read(self.begin(), keys)
        }
    }
}

#[cfg(feature = "peers")]
mod fjall_ssi {
    use super::{Key, TxnDb, CACHE};

    pub struct Fjall(fjall::TxKeyspace, fjall::TxPartitionHandle);

    pub fn open(dir: &std::path::Path) -> anyhow::Result<Box<dyn TxnDb>> {
        let ks = fjall::Config::new(dir).cache_size(CACHE as u64).open_transactional()?;
        let opts =
            fjall::PartitionCreateOptions::default().compression(fjall::CompressionType::None);
        let p = ks.open_partition("bench", opts)?;
        Ok(Box::new(Fjall(ks, p)))
    }

    impl TxnDb for Fjall {
        fn load(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<()> {
            for chunk in keys.chunks(1000) {
                let mut t = self.0.write_tx()?;
                for k in chunk {
                    t.insert(&self.1, k.to_vec(), value.to_vec());
                }
                t.commit()?.map_err(|_| anyhow::anyhow!("a conflict while loading"))?;
            }
            Ok(())
        }

        fn settle(&self) -> anyhow::Result<()> {
            Ok(self.1.inner().rotate_memtable_and_wait()?)
        }

        fn rmw(&self, keys: &[Key], value: &[u8]) -> anyhow::Result<bool> {
            let mut t = self.0.write_tx()?;
            for k in keys {
                t.get(&self.1, k)?;
                t.insert(&self.1, k.to_vec(), value.to_vec());
            }
            Ok(t.commit()?.is_ok())
        }

        fn read(&self, keys: &[Key]) -> anyhow::Result<bool> {
            let mut t = self.0.write_tx()?;
            for k in keys {
                t.get(&self.1, k)?;
            }
            Ok(t.commit()?.is_ok())
        }
    }
}

/// The systems, in the order they run, with how to open each.
type Open = fn(&Path) -> anyhow::Result<Box<dyn TxnDb>>;

fn systems() -> Vec<(&'static str, Open)> {
    use timber_kv::{Isolation, TxnOptions};
    #[cfg_attr(not(any(feature = "rocksdb", feature = "peers")), allow(unused_mut))]
    let mut s: Vec<(&'static str, Open)> = vec![
        ("timber-optimistic", |d| open_timber(d, TxnOptions::isolation(Isolation::Snapshot))),
        ("timber-pessimistic", |d| open_timber(d, TxnOptions::pessimistic(Isolation::Snapshot))),
        ("timber-serializable", |d| open_timber(d, TxnOptions::isolation(Isolation::Serializable))),
    ];
    #[cfg(feature = "rocksdb")]
    {
        s.push(("rocksdb-optimistic", rocks::optimistic));
        s.push(("rocksdb-pessimistic", rocks::pessimistic));
    }
    #[cfg(feature = "peers")]
    s.push(("fjall", fjall_ssi::open));
    s
}

/// Zipfian ranks in `[0, n)` with parameter θ (Gray et al., as YCSB draws them).
struct Zipf {
    n: f64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    fn new(n: u64, theta: f64) -> Zipf {
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let (zetan, zeta2) = (zeta(n), zeta(2));
        let n = n as f64;
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipf { n, theta, alpha, zetan, eta }
    }

    fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        ((self.n * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64).min(self.n as u64 - 1)
    }
}

/// How a workload picks its keys.
#[derive(Clone, Copy)]
enum Pick {
    Uniform,
    Zipf,
}

struct Workload {
    name: &'static str,
    pick: Pick,
    keys: usize,
    write: bool,
}

const WORKLOADS: [Workload; 3] = [
    Workload { name: "rmw-4 uniform", pick: Pick::Uniform, keys: 4, write: true },
    Workload { name: "rmw-4 zipf", pick: Pick::Zipf, keys: 4, write: true },
    Workload { name: "read-16", pick: Pick::Uniform, keys: 16, write: false },
];

/// Runs `w` on `db` from `threads` threads for `secs`: the sample of committed transactions
/// and the number of aborts.
fn measure(
    db: &dyn TxnDb,
    w: &Workload,
    zipf: &Zipf,
    num: u64,
    threads: usize,
    secs: u64,
) -> anyhow::Result<(Sample, u64)> {
    let aborts = AtomicU64::new(0);
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let value = [b'v'; VALUE_LEN];
    let hists = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let aborts = &aborts;
                scope.spawn(move || -> anyhow::Result<(u64, hdrhistogram::Histogram<u64>)> {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64 * 7919 + 1);
                    let mut h = Sample::new_histogram();
                    let mut keys = Vec::with_capacity(w.keys);
                    let mut done = 0u64;
                    while Instant::now() < until {
                        keys.clear();
                        for _ in 0..w.keys {
                            let i = match w.pick {
                                Pick::Uniform => rng.random_range(0..num),
                                Pick::Zipf => zipf.sample(&mut rng),
                            };
                            keys.push(key(i));
                        }
                        keys.sort_unstable();
                        keys.dedup();
                        let t0 = Instant::now();
                        let ok = if w.write { db.rmw(&keys, &value)? } else { db.read(&keys)? };
                        if ok {
                            done += 1;
                            h.saturating_record(t0.elapsed().as_nanos() as u64);
                        } else {
                            aborts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok((done, h))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench thread panicked")).collect::<Vec<_>>()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut latency_ns = Sample::new_histogram();
    let mut ops = 0;
    for h in hists {
        let (n, h) = h?;
        ops += n;
        latency_ns.add(&h)?;
    }
    let bytes = ops * (w.keys * (KEY_LEN + if w.write { VALUE_LEN } else { 0 })) as u64;
    Ok((Sample { ops, bytes, secs, latency_ns }, aborts.into_inner()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let base = args.dir.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-data/txn")
    });
    let systems: Vec<_> = systems()
        .into_iter()
        .filter(|(name, _)| args.only.is_empty() || args.only.iter().any(|o| o == name))
        .collect();
    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| args.workload.as_deref().is_none_or(|o| w.name.contains(o)))
        .collect();
    let zipf = Zipf::new(args.num, 0.99);
    let all_keys: Vec<Key> = (0..args.num).map(key).collect();
    // (workload x threads, system) -> samples and abort rates.
    type Cell = (Vec<Sample>, Vec<f64>);
    let mut cells: std::collections::BTreeMap<(String, &str), Cell> = Default::default();
    let mut order: Vec<(String, &str)> = Vec::new();
    for rep in 0..args.repeat {
        for (name, open) in &systems {
            let dir = base.join(format!("{name}-{rep}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let db = open(&dir)?;
            let t = Instant::now();
            db.load(&all_keys, &[b'v'; VALUE_LEN])?;
            db.settle()?;
            eprintln!(
                "{name}: loaded {} keys and flushed them in {:.1}s",
                args.num,
                t.elapsed().as_secs_f64()
            );
            for w in &workloads {
                for &threads in &args.threads {
                    let (sample, aborts) = measure(&*db, w, &zipf, args.num, threads, args.secs)?;
                    let attempts = sample.ops + aborts;
                    let rate = if attempts == 0 { 0.0 } else { aborts as f64 / attempts as f64 };
                    eprintln!(
                        "{:<20} {:<20} {:>10.0} txn/s  aborts {:>5.1}%",
                        format!("{} x{threads}", w.name),
                        name,
                        sample.ops as f64 / sample.secs,
                        rate * 100.0
                    );
                    let cell = (format!("{} x{threads}", w.name), *name);
                    if !cells.contains_key(&cell) {
                        order.push(cell.clone());
                    }
                    let e = cells.entry(cell).or_default();
                    e.0.push(sample);
                    e.1.push(rate);
                }
            }
            drop(db);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    // Grouped by workload, systems in their order.
    let mut workloads_seen: Vec<String> = Vec::new();
    for (w, _) in &order {
        if !workloads_seen.contains(w) {
            workloads_seen.push(w.clone());
        }
    }
    for w in &workloads_seen {
        for (name, _) in &systems {
            if let Some((samples, rates)) = cells.get(&(w.clone(), *name)) {
                let mut row = Row::from_samples(w, name, samples);
                let mut rates = rates.clone();
                rates.sort_by(f64::total_cmp);
                row.abort_rate = rates.get(rates.len() / 2).copied();
                rows.push(row);
            }
        }
    }
    report::print_table("transactions (committed txn/s)", &rows);
    println!();
    for r in &rows {
        println!(
            "{:<26} {:<20} aborts {:>5.1}%",
            r.workload,
            r.system,
            r.abort_rate.unwrap_or(0.0) * 100.0
        );
    }
    let path = report::write_json("txn", &rows)?;
    println!("\nrows written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_ranks_stay_in_range_and_favour_the_first() {
        let z = Zipf::new(1000, 0.99);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let draws: Vec<u64> = (0..10_000).map(|_| z.sample(&mut rng)).collect();
        assert!(draws.iter().all(|&r| r < 1000));
        let first = draws.iter().filter(|&&r| r == 0).count();
        assert!(first > 1000, "rank 0 drawn {first} times of 10000");
    }
}
