//! `timber-bench kv`: the db_bench workloads on timber-kv and its peers, each system in a fresh
//! directory, systems alternated within every repeat; medians over repeats.
//!
//! Workloads (16-byte keys, 100-byte incompressible values, one thread): fillseq, fillrandom (a
//! permutation: every key ends up present), overwrite (uniform random), readrandom (hits),
//! readmissing (misses), readseq (full scan), seekrandom (seek + next 100), fillsync (every write
//! durable), and with `--sustained-secs` a sustained ingest (random new keys for a fixed time,
//! long past the point where compaction must keep up, with the throughput of every second).
//! Per row: ops/s, MB/s, P50/P99/P99.9/max latency, peak RSS of the phase (VmHWM, reset through
//! /proc/self/clear_refs) and size on disk after it (space amplification).
//! Durability is equivalent across systems: unsynced writes reach the OS or the engine's own
//! buffers without fsync; `fillsync` writes are fsynced before they return.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::report::{self, Row, Sample};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of keys.
    #[arg(long, default_value_t = 1_000_000)]
    num: u64,
    /// Use 10M keys (larger than the block cache).
    #[arg(long)]
    big: bool,
    /// Random reads per read workload (default: num, at most 1M).
    #[arg(long)]
    reads: Option<u64>,
    /// Seeks of seekrandom (each followed by 100 nexts).
    #[arg(long, default_value_t = 10_000)]
    seeks: u64,
    /// Writes of fillsync.
    #[arg(long, default_value_t = 5_000)]
    sync_ops: u64,
    /// Repeats (systems alternate within each).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Directory for the databases (default: a temporary directory under target/).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Only these systems (comma-separated: timber, rocksdb, fjall, sled, redb).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run fillsync only.
    #[arg(long)]
    sync_only: bool,
    /// Block cache size in MiB for every system.
    #[arg(long, default_value_t = 64)]
    cache_mb: u64,
    /// timber only: a memory budget in MiB for its memtables, index and filter blocks and
    /// block cache together (`Options::memory_budget`), instead of `--cache-mb` for its cache.
    #[arg(long)]
    timber_memory_budget_mb: Option<u64>,
    /// timber only: where its tables' index and filter blocks are kept (`pinned` in memory or
    /// `cached` in the block cache); default the engine's (cached under a memory budget).
    #[arg(long, value_parser = ["pinned", "cached"])]
    timber_index_filter: Option<String>,
    /// timber only: immutable memtables that may wait for their flush
    /// (`Options::max_immutable_memtables`); default the engine's.
    #[arg(long)]
    timber_max_immutable_memtables: Option<usize>,
    /// Seconds of the sustained-ingest workload (random keys from a space of 10^16, so nearly
    /// every write adds a key); 0 leaves it out.
    #[arg(long, default_value_t = 0)]
    sustained_secs: u64,
    /// Run the sustained-ingest workload only.
    #[arg(long, requires = "sustained_secs")]
    sustained_only: bool,
}

const KEY_LEN: usize = 16;
const VALUE_LEN: usize = 100;
const WORKLOADS: [&str; 9] = [
    "fillseq",
    "fillrandom",
    "overwrite",
    "readrandom",
    "readmissing",
    "readseq",
    "seekrandom",
    "fillsync",
    "sustained",
];

/// The key of index `i`: its 16 decimal digits, zero-padded (written without `format!`, whose cost
/// would show in every system's figures).
fn key(mut i: u64) -> [u8; KEY_LEN] {
    let mut k = [b'0'; KEY_LEN];
    for d in k.iter_mut().rev() {
        *d = b'0' + (i % 10) as u8;
        i /= 10;
    }
    k
}

/// A key that sorts among the stored ones but is never stored.
fn missing_key(i: u64) -> [u8; KEY_LEN] {
    let mut k = key(i);
    k[KEY_LEN - 1] = b'x';
    k
}

/// Counts the items of an iterator of results, failing on the first error.
#[cfg(feature = "peers")]
fn count_ok<T, E: Into<anyhow::Error>>(
    it: impl Iterator<Item = Result<T, E>>,
) -> anyhow::Result<usize> {
    let mut n = 0;
    for r in it {
        r.map_err(Into::into)?;
        n += 1;
    }
    Ok(n)
}

trait Kv {
    fn put(&mut self, k: &[u8], v: &[u8], sync: bool) -> anyhow::Result<()>;
    fn get(&self, k: &[u8]) -> anyhow::Result<bool>;
    fn scan_all(&self) -> anyhow::Result<u64>;
    fn seek_next(&self, k: &[u8], n: usize) -> anyhow::Result<usize>;
    /// Makes buffered writes durable and lets background work finish (bounded).
    fn settle(&mut self) -> anyhow::Result<()>;
    /// What held writes back so far, if the engine says.
    fn stalls(&self) -> Option<String> {
        None
    }
    /// What the engine holds in memory now, by part, if it says.
    fn memory(&self) -> Option<String> {
        None
    }
}

struct Timber(timber_kv::Db);

impl Kv for Timber {
    fn stalls(&self) -> Option<String> {
        let s = self.0.stats();
        let f =
            |st: timber_kv::StallStats| format!("{} ({:.1} ms)", st.count, st.micros as f64 / 1e3);
        Some(format!(
            "slowed by memtables {}, by L0 {}; stopped by memtables {}, by L0 {}; L0 {} files",
            f(s.slowed_by_memtables),
            f(s.slowed_by_l0),
            f(s.stopped_by_memtables),
            f(s.stopped_by_l0),
            s.levels[0].files
        ))
    }

    fn memory(&self) -> Option<String> {
        let s = self.0.stats();
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        Some(format!(
            "memtables {:.1} MB (+{:.1} immutable, +{:.1} held by readers, +{:.1} spare), pinned \
             index and filter blocks {:.1} MB, block cache {:.1} MB (of them index and filter {:.1})",
            mb(s.memtable_bytes),
            mb(s.immutable_memtable_bytes),
            mb(s.reader_memtable_bytes),
            mb(s.spare_memtable_bytes),
            mb(s.table_pinned_bytes),
            mb(s.cache_bytes),
            mb(s.cache_index_filter_bytes),
        ))
    }

    fn put(&mut self, k: &[u8], v: &[u8], sync: bool) -> anyhow::Result<()> {
        let mut b = timber_kv::WriteBatch::new();
        b.put(k, v);
        let d = if sync { timber_kv::Durability::Synced } else { timber_kv::Durability::Buffered };
        Ok(self.0.write_with(b, d)?)
    }
    fn get(&self, k: &[u8]) -> anyhow::Result<bool> {
        Ok(self.0.get(k)?.is_some())
    }
    // Scans lend each entry (`next_ref`), as RocksDB's raw iterator does.
    fn scan_all(&self) -> anyhow::Result<u64> {
        let mut it = self.0.iter();
        let mut n = 0;
        while let Some(r) = it.next_ref() {
            r?;
            n += 1;
        }
        Ok(n)
    }
    fn seek_next(&self, k: &[u8], n: usize) -> anyhow::Result<usize> {
        let mut it = self.0.scan(k..);
        let mut c = 0;
        while c < n {
            match it.next_ref() {
                Some(r) => r?,
                None => break,
            };
            c += 1;
        }
        Ok(c)
    }
    fn settle(&mut self) -> anyhow::Result<()> {
        self.0.flush()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Caught up: nothing above the level targets, and L0 merged down by the idle compaction
        // (which starts after 1 s without writes).
        loop {
            let s = self.0.stats();
            if (s.pending_compaction_bytes == 0 && s.levels[0].files == 0)
                || Instant::now() >= deadline
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

#[cfg(feature = "rocksdb")]
mod rocks {
    use super::*;

    pub struct Rocks(pub rocksdb::DB, pub rocksdb::WriteOptions, pub rocksdb::WriteOptions);

    pub fn open(dir: &Path, cache_mb: u64) -> anyhow::Result<Rocks> {
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.set_compression_type(rocksdb::DBCompressionType::None);
        o.set_write_buffer_size(64 << 20);
        o.increase_parallelism(2);
        let mut t = rocksdb::BlockBasedOptions::default();
        t.set_block_cache(&rocksdb::Cache::new_lru_cache((cache_mb as usize) << 20));
        t.set_bloom_filter(10.0, false);
        o.set_block_based_table_factory(&t);
        let db = rocksdb::DB::open(&o, dir)?;
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        Ok(Rocks(db, rocksdb::WriteOptions::default(), sync))
    }

    impl Kv for Rocks {
        fn put(&mut self, k: &[u8], v: &[u8], sync: bool) -> anyhow::Result<()> {
            Ok(self.0.put_opt(k, v, if sync { &self.2 } else { &self.1 })?)
        }
        fn get(&self, k: &[u8]) -> anyhow::Result<bool> {
            Ok(self.0.get_pinned(k)?.is_some())
        }
        fn scan_all(&self) -> anyhow::Result<u64> {
            let mut it = self.0.raw_iterator();
            it.seek_to_first();
            let mut n = 0;
            while it.valid() {
                n += 1;
                it.next();
            }
            it.status()?;
            Ok(n)
        }
        fn seek_next(&self, k: &[u8], n: usize) -> anyhow::Result<usize> {
            let mut it = self.0.raw_iterator();
            it.seek(k);
            let mut c = 0;
            while it.valid() && c < n {
                c += 1;
                it.next();
            }
            Ok(c)
        }
        fn settle(&mut self) -> anyhow::Result<()> {
            self.0.flush()?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let pending =
                    self.0.property_int_value("rocksdb.estimate-pending-compaction-bytes")?;
                let running = self.0.property_int_value("rocksdb.num-running-compactions")?;
                if pending.unwrap_or(0) == 0 && running.unwrap_or(0) == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        }
    }
}

#[cfg(feature = "peers")]
mod peers {
    use super::*;
    use redb::{ReadableDatabase, ReadableTable};

    pub struct Fjall(pub fjall::Keyspace, pub fjall::PartitionHandle);

    pub fn fjall(dir: &Path, cache_mb: u64) -> anyhow::Result<Fjall> {
        let ks = fjall::Config::new(dir).cache_size(cache_mb << 20).open()?;
        let opts =
            fjall::PartitionCreateOptions::default().compression(fjall::CompressionType::None);
        let p = ks.open_partition("bench", opts)?;
        Ok(Fjall(ks, p))
    }

    impl Kv for Fjall {
        fn put(&mut self, k: &[u8], v: &[u8], sync: bool) -> anyhow::Result<()> {
            self.1.insert(k, v)?;
            // Like timber's Buffered writes and RocksDB's sync=false: in the OS before returning.
            let mode = if sync { fjall::PersistMode::SyncData } else { fjall::PersistMode::Buffer };
            self.0.persist(mode)?;
            Ok(())
        }
        fn get(&self, k: &[u8]) -> anyhow::Result<bool> {
            Ok(self.1.get(k)?.is_some())
        }
        fn scan_all(&self) -> anyhow::Result<u64> {
            Ok(count_ok(self.1.iter())? as u64)
        }
        fn seek_next(&self, k: &[u8], n: usize) -> anyhow::Result<usize> {
            count_ok(self.1.range(k..).take(n))
        }
        fn settle(&mut self) -> anyhow::Result<()> {
            self.0.persist(fjall::PersistMode::SyncAll)?;
            Ok(())
        }
    }

    /// sled, and its data file. sled's `flush()` makes writes stable with `sync_file_range`
    /// (sled 0.34.7, `pagecache/iobuf.rs`), which neither flushes the drive's write cache nor
    /// the file's metadata (see `man 2 sync_file_range`): a synced put also `fdatasync`s the
    /// file, for the durability the other systems' synced writes have.
    pub struct Sled(pub sled::Db, std::fs::File);

    pub fn sled(dir: &Path, cache_mb: u64) -> anyhow::Result<Sled> {
        let db = sled::Config::new().path(dir).cache_capacity(cache_mb << 20).open()?;
        let file = std::fs::File::open(dir.join("db"))?;
        Ok(Sled(db, file))
    }

    impl Kv for Sled {
        fn put(&mut self, k: &[u8], v: &[u8], sync: bool) -> anyhow::Result<()> {
            self.0.insert(k, v)?;
            if sync {
                self.0.flush()?;
                self.1.sync_data()?;
            }
            Ok(())
        }
        fn get(&self, k: &[u8]) -> anyhow::Result<bool> {
            Ok(self.0.get(k)?.is_some())
        }
        fn scan_all(&self) -> anyhow::Result<u64> {
            Ok(count_ok(self.0.iter())? as u64)
        }
        fn seek_next(&self, k: &[u8], n: usize) -> anyhow::Result<usize> {
            count_ok(self.0.range(k..).take(n))
        }
        fn settle(&mut self) -> anyhow::Result<()> {
            self.0.flush()?;
            Ok(())
        }
    }

    const TABLE: redb::TableDefinition<'_, &[u8], &[u8]> = redb::TableDefinition::new("bench");

    pub struct Redb(pub redb::Database);

    pub fn redb(dir: &Path, cache_mb: u64) -> anyhow::Result<Redb> {
        std::fs::create_dir_all(dir)?;
        let db = redb::Database::builder()
            .set_cache_size((cache_mb as usize) << 20)
            .create(dir.join("redb"))?;
        let tx = db.begin_write()?;
        tx.open_table(TABLE)?;
        tx.commit()?;
        Ok(Redb(db))
    }

    impl Kv for Redb {
        fn put(&mut self, k: &[u8], v: &[u8], sync: bool) -> anyhow::Result<()> {
            let mut tx = self.0.begin_write()?;
            let d = if sync { redb::Durability::Immediate } else { redb::Durability::None };
            tx.set_durability(d)?;
            tx.open_table(TABLE)?.insert(k, v)?;
            tx.commit()?;
            Ok(())
        }
        fn get(&self, k: &[u8]) -> anyhow::Result<bool> {
            let tx = self.0.begin_read()?;
            Ok(tx.open_table(TABLE)?.get(k)?.is_some())
        }
        fn scan_all(&self) -> anyhow::Result<u64> {
            let tx = self.0.begin_read()?;
            let mut n = 0;
            for r in tx.open_table(TABLE)?.iter()? {
                r?;
                n += 1;
            }
            Ok(n)
        }
        fn seek_next(&self, k: &[u8], n: usize) -> anyhow::Result<usize> {
            let tx = self.0.begin_read()?;
            let mut c = 0;
            for r in tx.open_table(TABLE)?.range(k..)?.take(n) {
                r?;
                c += 1;
            }
            Ok(c)
        }
        fn settle(&mut self) -> anyhow::Result<()> {
            let mut tx = self.0.begin_write()?;
            tx.set_durability(redb::Durability::Immediate)?;
            tx.commit()?;
            Ok(())
        }
    }
}

fn systems(only: &[String]) -> Vec<&'static str> {
    let mut all = vec!["timber"];
    if cfg!(feature = "rocksdb") {
        all.push("rocksdb");
    }
    if cfg!(feature = "peers") {
        all.extend(["fjall", "sled", "redb"]);
    }
    all.retain(|s| only.is_empty() || only.iter().any(|o| o == s));
    all
}

fn open(system: &str, dir: &Path, args: &Args) -> anyhow::Result<Box<dyn Kv>> {
    let cache_mb = args.cache_mb;
    Ok(match system {
        "timber" => {
            let mut o = timber_kv::Options::default()
                .block_cache_bytes((cache_mb as usize) << 20)
                .memory_budget(args.timber_memory_budget_mb.map(|mb| (mb as usize) << 20));
            if let Some(place) = &args.timber_index_filter {
                o = o.cache_index_and_filter_blocks(place == "cached");
            }
            if let Some(n) = args.timber_max_immutable_memtables {
                o = o.max_immutable_memtables(n);
            }
            Box::new(Timber(timber_kv::Db::open(dir, o)?))
        }
        #[cfg(feature = "rocksdb")]
        "rocksdb" => Box::new(rocks::open(dir, cache_mb)?),
        #[cfg(feature = "peers")]
        "fjall" => Box::new(peers::fjall(dir, cache_mb)?),
        #[cfg(feature = "peers")]
        "sled" => Box::new(peers::sled(dir, cache_mb)?),
        #[cfg(feature = "peers")]
        "redb" => Box::new(peers::redb(dir, cache_mb)?),
        s => anyhow::bail!("unknown system {s}"),
    })
}

/// Resets the peak RSS counter of this process (Linux 4.0+); false if not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn disk_mb(dir: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else { return 0 };
        rd.filter_map(Result::ok)
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks() * 512
                }
                Err(_) => 0,
            })
            .sum()
    }
    walk(dir) as f64 / 1e6
}

/// Disk usage 2 s after background work settled: several systems (timber included) delete
/// obsolete files a little after the work that made them obsolete, when the last reader lets go.
fn disk_after_grace(dir: &Path) -> f64 {
    std::thread::sleep(Duration::from_secs(2));
    disk_mb(dir)
}

/// One measured phase: its sample and the extras of its row.
struct Measured {
    sample: Sample,
    rss_mb: Option<f64>,
    disk_mb: Option<f64>,
    /// Operations completed in each second of the phase.
    per_second: Vec<u64>,
}

fn measure(
    ops: impl IntoIterator<Item = u64>,
    bytes_per_op: u64,
    mut f: impl FnMut(u64) -> anyhow::Result<()>,
) -> anyhow::Result<Measured> {
    let rss = reset_peak_rss();
    let mut hist = Sample::new_histogram();
    let start = Instant::now();
    let mut n = 0u64;
    let mut per_second: Vec<u64> = Vec::new();
    for i in ops {
        let t = Instant::now();
        f(i)?;
        let end = Instant::now();
        hist.saturating_record((end - t).as_nanos() as u64);
        let second = (end - start).as_secs() as usize;
        if per_second.len() <= second {
            per_second.resize(second + 1, 0);
        }
        if let Some(c) = per_second.get_mut(second) {
            *c += 1;
        }
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Measured {
        sample: Sample { ops: n, bytes: n * bytes_per_op, secs, latency_ns: hist },
        rss_mb: if rss { peak_rss_mb() } else { None },
        disk_mb: None,
        per_second,
    })
}

fn value(rng: &mut impl Rng) -> [u8; VALUE_LEN] {
    let mut v = [0u8; VALUE_LEN];
    rng.fill(&mut v[..]);
    v
}

/// Runs every workload on one system once; returns (workload, measurement) pairs.
fn run_system(
    system: &str,
    base: &Path,
    args: &Args,
    n: u64,
    reads: u64,
    round: usize,
) -> anyhow::Result<Vec<(&'static str, Measured)>> {
    let mut out = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(round as u64);
    let kv_bytes = (KEY_LEN + VALUE_LEN) as u64;
    let fresh = |name: &str| -> anyhow::Result<PathBuf> {
        let d = base.join(format!("{system}-{name}-{round}"));
        let _ = std::fs::remove_dir_all(&d);
        Ok(d)
    };

    if args.sync_only {
        return fillsync(system, args, n, &fresh, kv_bytes);
    }
    if args.sustained_only {
        return sustained(system, args, &fresh, kv_bytes, round);
    }
    eprintln!("  {system}: fillseq");
    // fillseq
    let dir = fresh("seq")?;
    {
        let mut db = open(system, &dir, args)?;
        let mut m = measure(0..n, kv_bytes, |i| {
            let v = value(&mut rng);
            db.put(&key(i), &v, false)
        })?;
        db.settle()?;
        m.disk_mb = Some(disk_after_grace(&dir));
        out.push(("fillseq", m));
    }
    crate::return_freed_memory_now();
    std::fs::remove_dir_all(&dir)?;

    // fillrandom, overwrite, reads on the same database
    let dir = fresh("rand")?;
    {
        let mut db = open(system, &dir, args)?;
        eprintln!("  {system}: fillrandom");
        let mut order: Vec<u64> = (0..n).collect();
        order.shuffle(&mut rng);
        let mut vrng = rand::rngs::StdRng::seed_from_u64(7);
        let mut m = measure(order.iter().copied(), kv_bytes, |i| {
            db.put(&key(i), &value(&mut vrng), false)
        })?;
        if let Some(s) = db.stalls() {
            eprintln!("  {system}: fillrandom: {s}");
        }
        db.settle()?;
        m.disk_mb = Some(disk_after_grace(&dir));
        out.push(("fillrandom", m));

        eprintln!("  {system}: overwrite");
        let picks: Vec<u64> = (0..n).map(|_| rng.random_range(0..n)).collect();
        let mut m = measure(picks.iter().copied(), kv_bytes, |i| {
            db.put(&key(i), &value(&mut vrng), false)
        })?;
        if let Some(s) = db.stalls() {
            eprintln!("  {system}: overwrite (and fillrandom): {s}");
        }
        db.settle()?;
        if let Some(s) = db.memory() {
            eprintln!("  {system}: after overwrite: {s}");
        }
        m.disk_mb = Some(disk_after_grace(&dir));
        out.push(("overwrite", m));

        eprintln!("  {system}: readrandom");
        let picks: Vec<u64> = (0..reads).map(|_| rng.random_range(0..n)).collect();
        let db = &*db;
        let m = measure(picks.iter().copied(), kv_bytes, |i| {
            anyhow::ensure!(db.get(&key(i))?, "{system}: key {i} missing");
            Ok(())
        })?;
        out.push(("readrandom", m));
        eprintln!("  {system}: readmissing");
        let m = measure(picks.iter().copied(), KEY_LEN as u64, |i| {
            anyhow::ensure!(!db.get(&missing_key(i))?, "{system}: missing key {i} found");
            Ok(())
        })?;
        out.push(("readmissing", m));

        eprintln!("  {system}: readseq");
        let rss = reset_peak_rss();
        let start = Instant::now();
        let count = db.scan_all()?;
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(count == n, "{system}: readseq saw {count} of {n} keys");
        let mut hist = Sample::new_histogram();
        hist.saturating_record((secs * 1e9 / count as f64) as u64);
        out.push((
            "readseq",
            Measured {
                sample: Sample { ops: count, bytes: count * kv_bytes, secs, latency_ns: hist },
                rss_mb: if rss { peak_rss_mb() } else { None },
                disk_mb: None,
                per_second: Vec::new(),
            },
        ));

        eprintln!("  {system}: seekrandom");
        let picks: Vec<u64> = (0..args.seeks).map(|_| rng.random_range(0..n)).collect();
        let m = measure(picks.iter().copied(), 100 * kv_bytes, |i| {
            let c = db.seek_next(&key(i), 100)?;
            anyhow::ensure!(c == 100.min((n - i) as usize), "{system}: seek from {i} saw {c}");
            Ok(())
        })?;
        out.push(("seekrandom", m));
        if let Some(s) = db.memory() {
            eprintln!("  {system}: after the reads: {s}");
        }
    }
    crate::return_freed_memory_now();
    std::fs::remove_dir_all(&dir)?;
    out.extend(fillsync(system, args, n, &fresh, kv_bytes)?);
    if args.sustained_secs > 0 {
        out.extend(sustained(system, args, &fresh, kv_bytes, round)?);
    }
    Ok(out)
}

/// The sustained-ingest workload: random keys (nearly all new) for `--sustained-secs`, so that
/// the tree grows far past its memtables and every level's compaction must keep up with the
/// writes. The database is closed, not settled, after it.
fn sustained(
    system: &str,
    args: &Args,
    fresh: &dyn Fn(&str) -> anyhow::Result<PathBuf>,
    kv_bytes: u64,
    round: usize,
) -> anyhow::Result<Vec<(&'static str, Measured)>> {
    eprintln!("  {system}: sustained for {} s", args.sustained_secs);
    let dir = fresh("sustained")?;
    let m = {
        let mut db = open(system, &dir, args)?;
        let mut krng = rand::rngs::StdRng::seed_from_u64(11 + round as u64);
        let mut vrng = rand::rngs::StdRng::seed_from_u64(13);
        let deadline = Instant::now() + Duration::from_secs(args.sustained_secs);
        let mut i = 0u64;
        // The clock is read once per 256 writes to stop; the phase ends within a few µs of it.
        let keys = std::iter::from_fn(|| {
            i += 1;
            (!i.is_multiple_of(256) || Instant::now() < deadline)
                .then(|| krng.random_range(0..10_000_000_000_000_000))
        });
        let m = measure(keys, kv_bytes, |k| db.put(&key(k), &value(&mut vrng), false))?;
        if let Some(s) = db.stalls() {
            eprintln!("  {system}: sustained: {s}");
        }
        m
    };
    std::fs::remove_dir_all(&dir)?;
    Ok(vec![("sustained", m)])
}

/// The fillsync workload: random keys of `0..n`, each write durable before it returns.
fn fillsync(
    system: &str,
    args: &Args,
    n: u64,
    fresh: &dyn Fn(&str) -> anyhow::Result<PathBuf>,
    kv_bytes: u64,
) -> anyhow::Result<Vec<(&'static str, Measured)>> {
    let mut out = Vec::new();
    eprintln!("  {system}: fillsync");
    // fillsync
    let dir = fresh("sync")?;
    {
        let mut db = open(system, &dir, args)?;
        let mut vrng = rand::rngs::StdRng::seed_from_u64(9);
        let m = measure(0..args.sync_ops, kv_bytes, |_| {
            let i = vrng.random_range(0..n);
            db.put(&key(i), &value(&mut vrng), true)
        })?;
        out.push(("fillsync", m));
    }
    crate::return_freed_memory_now();
    std::fs::remove_dir_all(&dir)?;
    Ok(out)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let n = if args.big { 10_000_000 } else { args.num };
    let reads = args.reads.unwrap_or(n.min(1_000_000));
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-kv"),
    };
    std::fs::create_dir_all(&base)?;
    let systems = systems(&args.only);
    println!(
        "kv: {n} keys, {reads} reads, {} fillsync writes, systems {systems:?}, {} repeats",
        args.sync_ops, args.repeat
    );
    let mut samples: Vec<(&str, &str, Measured)> = Vec::new();
    for round in 0..args.repeat {
        for s in &systems {
            let t = Instant::now();
            for (w, m) in run_system(s, &base, &args, n, reads, round)? {
                samples.push((w, s, m));
            }
            eprintln!("round {round}: {s} done in {:.1}s", t.elapsed().as_secs_f64());
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let mut rows = Vec::new();
    for w in WORKLOADS {
        for s in &systems {
            let ms: Vec<&Measured> = samples
                .iter()
                .filter(|(sw, ss, _)| *sw == w && ss == s)
                .map(|(_, _, m)| m)
                .collect();
            if ms.is_empty() {
                continue;
            }
            let owned: Vec<Sample> = ms.iter().map(|m| m.sample.clone()).collect();
            let mut row = Row::from_samples(w, s, &owned);
            row.max_us =
                median(ms.iter().map(|m| m.sample.latency_ns.max() as f64 / 1e3).collect());
            row.peak_rss_mb = median(ms.iter().filter_map(|m| m.rss_mb).collect());
            row.disk_mb = median(ms.iter().filter_map(|m| m.disk_mb).collect());
            if w == "sustained" {
                let mut by_rate: Vec<&&Measured> = ms.iter().collect();
                by_rate.sort_by(|a, b| {
                    let r = |m: &Measured| m.sample.ops as f64 / m.sample.secs;
                    r(a).total_cmp(&r(b))
                });
                row.ops_per_second = by_rate.get(by_rate.len() / 2).map(|m| m.per_second.clone());
            }
            rows.push(row);
        }
    }
    print_table(n, &rows);
    print_timelines(&rows);
    let path = report::write_json("kv", &rows)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

fn print_table(n: u64, rows: &[Row]) {
    let logical = n as f64 * (KEY_LEN + VALUE_LEN) as f64 / 1e6;
    println!("\nkv: medians; space amp = disk / {logical:.0} MB of keys and values");
    println!(
        "{:<12} {:<8} {:>11} {:>8} {:>8} {:>8} {:>9} {:>10} {:>8} {:>8} {:>6} {:>11}",
        "workload",
        "system",
        "ops/s",
        "MB/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "rss MB",
        "disk MB",
        "amp",
        "timber/this"
    );
    for r in rows {
        let timber = rows.iter().find(|t| t.workload == r.workload && t.system == "timber");
        let ratio =
            timber.map_or(String::from("-"), |t| format!("{:.2}x", t.ops_per_sec / r.ops_per_sec));
        let opt = |v: Option<f64>| v.map_or(String::from("-"), |v| format!("{v:.0}"));
        let amp = r.disk_mb.map_or(String::from("-"), |d| format!("{:.2}", d / logical));
        println!(
            "{:<12} {:<8} {:>11.0} {:>8.1} {:>8.2} {:>8.2} {:>9.1} {:>10} {:>8} {:>8} {:>6} {:>11}",
            r.workload,
            r.system,
            r.ops_per_sec,
            r.mb_per_sec,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            opt(r.max_us),
            opt(r.peak_rss_mb),
            opt(r.disk_mb),
            amp,
            ratio
        );
    }
}

/// The sustained rows' throughput over time: each second's writes, in rows of ten seconds, and
/// the slowest second against the median one.
fn print_timelines(rows: &[Row]) {
    for r in rows {
        let Some(secs) = &r.ops_per_second else { continue };
        // The last second is partial.
        let full = secs.get(..secs.len().saturating_sub(1)).unwrap_or_default();
        let mut sorted = full.to_vec();
        sorted.sort_unstable();
        let (Some(min), Some(mid)) = (sorted.first(), sorted.get(sorted.len() / 2)) else {
            continue;
        };
        println!(
            "\n{} {}: writes per second (slowest {min}, median {mid}, slowest/median {:.2})",
            r.workload,
            r.system,
            *min as f64 / (*mid).max(1) as f64
        );
        for (i, chunk) in full.chunks(10).enumerate() {
            let line: Vec<String> = chunk.iter().map(|c| format!("{c:>7}")).collect();
            println!("  {:>4}s {}", i * 10, line.join(""));
        }
    }
}
