//! `timber-bench wal`: timber-wal beside okaywal, TiKV's raft-engine (feature `peers`) and the
//! raw limits of the disk: a loop of one write + fdatasync per record in this process, and, for
//! many writers, one thread writing as many records at once as there are writers (the most any
//! group commit of one-record writers can get from this disk).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use timber_wal::{Options, SyncMode, Wal};

use crate::report::{print_table, write_json, Common, Row, Sample};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// Seconds of each durable-append run.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Records of the unsynced 100-byte append run (the 4 KiB run writes an eighth as many).
    #[arg(long, default_value_t = 2_000_000)]
    records: u64,
    /// Size of the log opened by the recovery workload, in GiB.
    #[arg(long, default_value_t = 1.0)]
    recovery_gib: f64,
    /// Only these systems (comma-separated: timber, timber-zerofill, timber-2syncs, okaywal,
    /// raft-engine, raw-fdatasync, raw-group). `timber-2syncs` (two overlapping group commits)
    /// runs only when named.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Timber,
    /// timber with `recycle_segments(false)` (every segment zero-filled), checkpointed the same way.
    TimberZeroFill,
    /// timber with `syncs_in_flight(2)`: two group commits may be on the disk at once.
    TimberTwoSyncs,
    #[cfg(feature = "peers")]
    Okaywal,
    #[cfg(feature = "peers")]
    RaftEngine,
    RawFdatasync,
    /// One thread writes `threads` records at once into a prewritten file and fdatasyncs them.
    RawGroup,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Timber => "timber",
            System::TimberZeroFill => "timber-zerofill",
            System::TimberTwoSyncs => "timber-2syncs",
            #[cfg(feature = "peers")]
            System::Okaywal => "okaywal",
            #[cfg(feature = "peers")]
            System::RaftEngine => "raft-engine",
            System::RawFdatasync => "raw-fdatasync",
            System::RawGroup => "raw-group",
        }
    }
}

/// A log that appends one record at a time, durably or not, from many threads.
trait Log: Send + Sync {
    fn append(&self, record: &[u8]) -> anyhow::Result<()>;

    /// How many records one `append` call writes; such a log is driven by one thread.
    fn group(&self) -> usize {
        1
    }
}

impl Log for Wal {
    fn append(&self, record: &[u8]) -> anyhow::Result<()> {
        Wal::append(self, record)?;
        Ok(())
    }
}

/// Bytes appended between two checkpoints of the timber log in the durable workloads.
const CHECKPOINT_BYTES: u64 = 64 << 20;

/// A durable log as a checkpointing user runs it: each time another `CHECKPOINT_BYTES` were
/// appended, every record appended so far is dropped (as okaywal does by itself: with `LogVoid`
/// it checkpoints every 768 KiB, and it reuses its files, as timber does by default; the
/// `timber-zerofill` rows are timber with `recycle_segments(false)`).
struct Checkpointed {
    wal: Wal,
    appended: AtomicU64,
}

impl Log for Checkpointed {
    fn append(&self, record: &[u8]) -> anyhow::Result<()> {
        let seq = self.wal.append(record)?;
        let n = record.len() as u64;
        let before = self.appended.fetch_add(n, Ordering::Relaxed);
        if (before + n) / CHECKPOINT_BYTES != before / CHECKPOINT_BYTES {
            self.wal.truncate_front(seq + 1)?;
        }
        Ok(())
    }
}

/// Writes each record and fdatasyncs it, one at a time: what the disk allows without batching.
struct RawFdatasync(Mutex<File>);

impl Log for RawFdatasync {
    fn append(&self, record: &[u8]) -> anyhow::Result<()> {
        let mut f = self.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        f.write_all(record)?;
        f.sync_data()?;
        Ok(())
    }
}

/// The ceiling of group commit: one thread writes `group` records in one `pwrite` and
/// fdatasyncs them, back to back, over a file written and synced beforehand (so that, as in
/// timber's recycled segments, an fdatasync carries data and no file-size or extent change).
struct RawGroup {
    file: File,
    group: usize,
    next: AtomicU64,
    /// `group` copies of the record, built at the first append (outside the measured work).
    batch: std::sync::OnceLock<Vec<u8>>,
}

/// Size of the file `RawGroup` writes over, cyclically.
const RAW_GROUP_FILE: u64 = 64 << 20;

impl RawGroup {
    fn create(path: &Path, group: usize) -> anyhow::Result<RawGroup> {
        let mut file = File::create(path)?;
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..RAW_GROUP_FILE / chunk.len() as u64 {
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        Ok(RawGroup { file, group, next: AtomicU64::new(0), batch: std::sync::OnceLock::new() })
    }
}

impl Log for RawGroup {
    fn append(&self, record: &[u8]) -> anyhow::Result<()> {
        let buf = self.batch.get_or_init(|| record.repeat(self.group));
        let len = buf.len() as u64;
        // One thread drives this log (`group`), so a load and a store suffice.
        let mut at = self.next.load(Ordering::Relaxed);
        if at + len > RAW_GROUP_FILE {
            at = 0;
        }
        self.next.store(at + len, Ordering::Relaxed);
        self.file.write_all_at(buf, at)?;
        self.file.sync_data()?;
        Ok(())
    }

    fn group(&self) -> usize {
        self.group
    }
}

#[cfg(feature = "peers")]
mod peers {
    use std::sync::atomic::{AtomicU64, Ordering};

    pub struct Okaywal(pub okaywal::WriteAheadLog);

    impl super::Log for Okaywal {
        fn append(&self, record: &[u8]) -> anyhow::Result<()> {
            let mut entry = self.0.begin_entry()?;
            entry.write_chunk(record)?;
            entry.commit()?; // durable on return, group-committed across threads
            Ok(())
        }
    }

    pub struct RaftEngine {
        pub engine: raft_engine::Engine,
        pub sync: bool,
        pub next_key: AtomicU64,
    }

    impl super::Log for RaftEngine {
        fn append(&self, record: &[u8]) -> anyhow::Result<()> {
            let key = self.next_key.fetch_add(1, Ordering::Relaxed);
            let mut batch = raft_engine::LogBatch::default();
            batch.put(key % 64 + 1, key.to_be_bytes().to_vec(), record.to_vec())?;
            self.engine.write(&mut batch, self.sync)?;
            Ok(())
        }
    }
}

fn open(system: System, dir: &Path, sync: bool, threads: usize) -> anyhow::Result<Box<dyn Log>> {
    Ok(match system {
        System::Timber if sync => Box::new(Checkpointed {
            wal: Wal::open(dir, Options::default().sync(SyncMode::Always))?,
            appended: AtomicU64::new(0),
        }),
        System::Timber => Box::new(Wal::open(dir, Options::default().sync(SyncMode::Manual))?),
        System::TimberZeroFill => Box::new(Checkpointed {
            wal: Wal::open(dir, Options::default().sync(SyncMode::Always).recycle_segments(false))?,
            appended: AtomicU64::new(0),
        }),
        System::TimberTwoSyncs => Box::new(Checkpointed {
            wal: Wal::open(dir, Options::default().sync(SyncMode::Always).syncs_in_flight(2))?,
            appended: AtomicU64::new(0),
        }),
        #[cfg(feature = "peers")]
        System::Okaywal => {
            Box::new(peers::Okaywal(okaywal::WriteAheadLog::recover(dir, okaywal::LogVoid)?))
        }
        #[cfg(feature = "peers")]
        System::RaftEngine => {
            let cfg = raft_engine::Config {
                dir: dir.to_string_lossy().into_owned(),
                ..Default::default()
            };
            Box::new(peers::RaftEngine {
                engine: raft_engine::Engine::open(cfg)?,
                sync,
                next_key: Default::default(),
            })
        }
        System::RawFdatasync => {
            std::fs::create_dir_all(dir)?;
            Box::new(RawFdatasync(Mutex::new(File::create(dir.join("raw.log"))?)))
        }
        System::RawGroup => {
            std::fs::create_dir_all(dir)?;
            Box::new(RawGroup::create(&dir.join("raw.log"), threads)?)
        }
    })
}

/// Appends `record` from `threads` threads until `secs` have passed.
fn run_timed(
    log: Arc<dyn Log>,
    threads: usize,
    secs: f64,
    record: &[u8],
) -> anyhow::Result<Sample> {
    let group = log.group().max(1);
    let writers = threads.div_ceil(group).max(1);
    let barrier = Arc::new(Barrier::new(writers + 1));
    let handles: Vec<_> = (0..writers)
        .map(|_| {
            let (log, barrier, record) = (log.clone(), barrier.clone(), record.to_vec());
            std::thread::spawn(move || -> anyhow::Result<(u64, hdrhistogram::Histogram<u64>)> {
                let mut hist = Sample::new_histogram();
                let mut ops = 0u64;
                barrier.wait();
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                loop {
                    let t = Instant::now();
                    if t >= deadline {
                        break;
                    }
                    log.append(&record)?;
                    hist.saturating_record_n(t.elapsed().as_nanos() as u64, group as u64);
                    ops += group as u64;
                }
                Ok((ops, hist))
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut sample = Sample { ops: 0, bytes: 0, secs: 0.0, latency_ns: Sample::new_histogram() };
    for h in handles {
        let (ops, hist) = h.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
        sample.ops += ops;
        sample.latency_ns.add(&hist)?;
    }
    sample.secs = start.elapsed().as_secs_f64();
    sample.bytes = sample.ops * record.len() as u64;
    Ok(sample)
}

/// Appends `n` records from one thread.
fn run_count(log: &dyn Log, n: u64, record: &[u8]) -> anyhow::Result<Sample> {
    let mut hist = Sample::new_histogram();
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        log.append(record)?;
        hist.saturating_record(t.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Sample { ops: n, bytes: n * record.len() as u64, secs, latency_ns: hist })
}

fn peers_for(durable: bool, threads: usize) -> Vec<System> {
    let mut v = vec![System::Timber];
    if durable && threads > 1 {
        v.push(System::TimberZeroFill);
        v.push(System::TimberTwoSyncs);
    }
    #[cfg(feature = "peers")]
    {
        if durable {
            v.push(System::Okaywal);
        }
        v.push(System::RaftEngine);
    }
    if durable && threads == 1 {
        // The raw loop is the single-writer limit: one write and one fdatasync per record.
        v.push(System::RawFdatasync);
    }
    if durable && threads > 1 {
        // The group-commit limit: all the writers' records in one write and one fdatasync.
        v.push(System::RawGroup);
    }
    v
}

/// One measured run of a workload on an opened log.
type Workload<'a> = dyn Fn(Arc<dyn Log>) -> anyhow::Result<Sample> + 'a;

pub fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.common.dir)
        .with_context(|| format!("creating {}", args.common.dir.display()))?;
    let wanted = |w: &str| args.common.wanted(w);
    let mut rows = Vec::new();
    let mut bench =
        |workload: &str, durable: bool, threads: usize, f: &Workload<'_>| -> anyhow::Result<()> {
            if !wanted(workload) {
                return Ok(());
            }
            let mut systems = peers_for(durable, threads);
            systems.retain(|s| {
                let named = args.systems.iter().any(|o| o == s.name());
                named || (args.systems.is_empty() && *s != System::TimberTwoSyncs)
            });
            let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); systems.len()];
            for r in 0..args.common.repeat {
                // Alternate the order so that no system always runs on a quieter disk.
                for k in 0..systems.len() {
                    let i = (k + r) % systems.len();
                    let dir = tempfile::tempdir_in(&args.common.dir)?;
                    let log: Arc<dyn Log> =
                        Arc::from(open(systems[i], dir.path(), durable, threads)?);
                    let s = f(log)?;
                    eprintln!(
                        "  {workload} {} run {}: {:.0} ops/s",
                        systems[i].name(),
                        r + 1,
                        s.ops as f64 / s.secs
                    );
                    samples[i].push(s);
                }
            }
            for (sys, s) in systems.iter().zip(&samples) {
                rows.push(Row::from_samples(workload, sys.name(), s));
            }
            Ok(())
        };

    let small = vec![0xA5u8; 100];
    let page = vec![0x5Au8; 4096];
    bench("append 100B unsynced", false, 1, &|log| run_count(&*log, args.records, &small))?;
    bench("append 4KiB unsynced", false, 1, &|log| run_count(&*log, args.records / 8, &page))?;
    // Synced bandwidth bounds large records whatever the batching; small records show how many
    // appenders one fsync serves.
    let tiny = vec![0x3Cu8; 128];
    for (record, threads) in [(&tiny, 1), (&tiny, 8), (&tiny, 64), (&page, 1), (&page, 64)] {
        let name = format!("durable {}B x{threads} thr", record.len());
        bench(&name, true, threads, &|log| run_timed(log, threads, args.secs, record))?;
    }
    if wanted("read seq") {
        rows.push(read_sequential(&args)?);
    }
    if wanted("recovery") {
        rows.push(recovery(&args)?);
    }
    print_table("timber-bench wal (medians; last column: timber ops/s / this system's)", &rows);
    let path = write_json("wal", &rows)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Iterates over a log of 100-byte records written unsynced.
fn read_sequential(args: &Args) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir_in(&args.common.dir)?;
    let n = args.records;
    {
        let wal = Wal::open(dir.path(), Options::default().sync(SyncMode::Manual))?;
        let record = vec![7u8; 100];
        let batch: Vec<&[u8]> = vec![&record; 1000];
        for _ in 0..n / 1000 {
            wal.append_batch(&batch)?;
        }
    }
    let mut samples = Vec::new();
    for r in 0..args.common.repeat {
        let wal = Wal::open(dir.path(), Options::default().sync(SyncMode::Manual))?;
        let mut hist = Sample::new_histogram();
        let (mut ops, mut bytes) = (0u64, 0u64);
        let start = Instant::now();
        let mut t = start;
        for item in wal.iter(..) {
            let (_, b) = item?;
            let now = Instant::now();
            hist.saturating_record((now - t).as_nanos() as u64);
            t = now;
            ops += 1;
            bytes += b.len() as u64;
        }
        let s = Sample { ops, bytes, secs: start.elapsed().as_secs_f64(), latency_ns: hist };
        eprintln!("  read seq 100B timber run {}: {:.0} records/s", r + 1, s.ops as f64 / s.secs);
        samples.push(s);
    }
    Ok(Row::from_samples("read seq 100B", "timber", &samples))
}

/// Opens a log of `recovery_gib` GiB (4 KiB records in 64 MiB segments). Page caches are dropped
/// before each open when this process may do so, else the open is warm.
fn recovery(args: &Args) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir_in(&args.common.dir)?;
    let bytes = (args.recovery_gib * (1u64 << 30) as f64) as u64;
    let n = bytes / 4096;
    {
        let wal = Wal::open(dir.path(), Options::default().sync(SyncMode::Manual))?;
        let record = vec![9u8; 4096];
        let batch: Vec<&[u8]> = vec![&record; 256];
        for _ in 0..n.div_ceil(256) {
            wal.append_batch(&batch)?;
        }
    }
    let mut samples = Vec::new();
    let mut cold = true;
    for r in 0..args.common.repeat.max(3) {
        cold &= std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok();
        let start = Instant::now();
        let wal = Wal::open(dir.path(), Options::default().sync(SyncMode::Manual))?;
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(wal.len() >= n, "recovered {} records, wrote {n}", wal.len());
        drop(wal);
        let mut hist = Sample::new_histogram();
        hist.saturating_record((secs * 1e9) as u64);
        eprintln!("  recovery {:.1} GiB run {}: open took {:.3} s", args.recovery_gib, r + 1, secs);
        samples.push(Sample { ops: 1, bytes, secs, latency_ns: hist });
    }
    let name =
        format!("recovery {:.0}GiB ({})", args.recovery_gib, if cold { "cold" } else { "warm" });
    Ok(Row::from_samples(&name, "timber", &samples))
}
