//! `timber-bench stream`: timber-stream on the local file system and on an in-process S3 server
//! (s3s + s3s-fs on 127.0.0.1), beside each backend's ceiling measured the same way: raw
//! sequential writes with fdatasync of the same chunk size to the same disk, and raw PUTs of the
//! same object size with the same concurrency to the same S3 server.
//!
//! Workloads: append throughput and ack latency (1 KiB and 64 KiB entries), tail latency (append
//! to a tailing reader's `next()`), catch-up reads cold (from storage) and warm (from the cache),
//! and the cache hit rate of 1 and 8 sequential readers over a stream four times the cache.
//! The append and tail rows run twice: without a journal (an entry is acknowledged once its
//! fragment is written and recorded) and with a synced journal (`timber+journal`).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use timber_s3_server::S3Server;
use timber_stream::{Journal, Options, S3Options, Start, Storage, StreamConfig, Streams};

use crate::report::{print_table, write_json, Common, Row, Sample};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// MiB appended by each append run.
    #[arg(long, default_value_t = 64)]
    mb: u64,
}

const KEY: &str = "bench";
const SECRET: &str = "bench-secret";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Local,
    S3,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::S3 => "s3",
        }
    }
}

/// The S3 options of a bucket of the run's server.
fn bucket(server: &S3Server, name: &str) -> anyhow::Result<S3Options> {
    server.create_bucket(name)?;
    Ok(S3Options {
        endpoint: Some(server.endpoint()),
        bucket: name.into(),
        region: "us-east-1".into(),
        access_key_id: KEY.into(),
        secret_access_key: SECRET.into(),
        allow_http: true,
        path_style: true,
    })
}

/// A fresh stream store on a backend, with or without a journal.
struct Place {
    dir: tempfile::TempDir,
    s3: Option<S3Options>,
    journal: Journal,
}

impl Place {
    fn new(args: &Args, backend: Backend, server: &S3Server, n: &mut u32) -> anyhow::Result<Place> {
        *n += 1;
        let dir = tempfile::tempdir_in(&args.common.dir)?;
        let s3 = match backend {
            Backend::Local => None,
            Backend::S3 => Some(bucket(server, &format!("b{}-{n}", std::process::id()))?),
        };
        Ok(Place { dir, s3, journal: Journal::Off })
    }

    /// The same place with a journal (on the local disk, whatever the backend).
    fn journaled(mut self, journal: Journal) -> Place {
        self.journal = journal;
        self
    }

    fn options(&self) -> Options {
        let storage = self.s3.clone().map_or(Storage::Local, Storage::S3);
        Options::default().storage(storage).maintenance_interval(None).journal(self.journal)
    }
}

fn entry(size: usize, i: u64) -> Bytes {
    let mut v = vec![(i % 251) as u8; size];
    v[..8].copy_from_slice(&i.to_le_bytes());
    Bytes::from(v)
}

/// Appends `total` bytes of `size`-byte entries, pipelined. Latency (send to ack) is sampled on
/// one entry in [`LATENCY_SAMPLE`] and the last: acks resolve in id order and a failure fails
/// every later ack, so awaiting those covers every entry, and the harness adds no channel send
/// and clock read per entry to what is measured. Returns the sample and the average fragment
/// size written.
async fn append_run(place: &Place, size: usize, total: u64) -> anyhow::Result<(Sample, u64)> {
    let s = Streams::open(place.dir.path(), place.options()).await?;
    s.create("s", StreamConfig::default()).await?;
    let w = Arc::new(s.writer("s").await?);
    let n = total / size as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, timber_stream::Ack)>();
    let waiter = tokio::spawn(async move {
        let mut h = Sample::new_histogram();
        while let Some((t, ack)) = rx.recv().await {
            ack.await?;
            h.record(t.elapsed().as_nanos().max(1) as u64)?;
        }
        anyhow::Ok(h)
    });
    // Entries are slices of one buffer, so the client's allocations are not what is measured.
    let pool = Bytes::from(vec![0x5au8; size * 1024]);
    let start = Instant::now();
    for i in 0..n {
        let at = (i % 1024) as usize * size;
        if i % LATENCY_SAMPLE == 0 || i + 1 == n {
            let t = Instant::now();
            let ack = w.send(pool.slice(at..at + size)).await?;
            tx.send((t, ack))?;
        } else {
            // Not awaited: a later sampled ack resolves only after this one (acks are in order).
            drop(w.send(pool.slice(at..at + size)).await?);
        }
    }
    drop(tx);
    let latency_ns = waiter.await??;
    let secs = start.elapsed().as_secs_f64();
    let info = s.info("s")?;
    anyhow::ensure!(info.next_id == n, "{} entries durable, {n} sent", info.next_id);
    let frags: u64 = s.segments("s")?.iter().map(|g| g.fragments).sum();
    let avg = info.bytes / frags.max(1);
    drop(w);
    s.close().await?;
    Ok((Sample { ops: n, bytes: n * size as u64, secs, latency_ns }, avg))
}

/// The system name of rows whose store has a synced journal (`Journal::Always`): entries are
/// acknowledged once a shared WAL holds them, fsynced, and cut into fragments later.
const JOURNALED: &str = "timber+journal";

/// One entry in this many has its ack latency recorded by [`append_run`].
const LATENCY_SAMPLE: u64 = 16;

/// The disk's ceiling: sequential writes of `chunk` bytes, each followed by fdatasync.
fn raw_disk(dir: &Path, chunk: u64, total: u64) -> anyhow::Result<Sample> {
    let mut f = std::fs::File::create(dir.join("raw.bin"))?;
    let buf = vec![7u8; chunk as usize];
    let mut h = Sample::new_histogram();
    let n = (total / chunk).max(1);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        h.record(t.elapsed().as_nanos().max(1) as u64)?;
    }
    Ok(Sample { ops: n, bytes: n * chunk, secs: start.elapsed().as_secs_f64(), latency_ns: h })
}

/// S3's ceiling: PUTs of `chunk`-byte objects, `inflight` at a time.
async fn raw_puts(
    o: &S3Options,
    chunk: u64,
    total: u64,
    inflight: usize,
) -> anyhow::Result<Sample> {
    let store: Arc<dyn ObjectStore> = Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(o.endpoint.clone().unwrap_or_default())
            .with_bucket_name(&o.bucket)
            .with_region(&o.region)
            .with_access_key_id(&o.access_key_id)
            .with_secret_access_key(&o.secret_access_key)
            .with_allow_http(true)
            .build()?,
    );
    let n = (total / chunk).max(1);
    let data = Bytes::from(vec![9u8; chunk as usize]);
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (store, data) = (store.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let p = object_store::path::Path::from(format!("raw/{i:012}"));
            store.put(&p, PutPayload::from_bytes(data)).await?;
            drop(permit);
            anyhow::Ok(t.elapsed())
        }));
    }
    let mut h = Sample::new_histogram();
    for t in tasks {
        h.record(t.await??.as_nanos().max(1) as u64)?;
    }
    Ok(Sample { ops: n, bytes: n * chunk, secs: start.elapsed().as_secs_f64(), latency_ns: h })
}

/// Time from `send` of an entry to a tailing reader's `next()` returning it; one entry every
/// 2 ms so that each is its own fragment.
async fn tail_run(place: &Place, count: u64) -> anyhow::Result<Sample> {
    let s = Streams::open(place.dir.path(), place.options()).await?;
    s.create("t", StreamConfig::default()).await?;
    let w = s.writer("t").await?;
    let mut r = s.reader("t", Start::Latest)?;
    let epoch = Instant::now();
    let reader = tokio::spawn(async move {
        let mut h = Sample::new_histogram();
        for _ in 0..count {
            let e = r.next().await?;
            let sent = u64::from_le_bytes(e.data[..8].try_into()?);
            let now = epoch.elapsed().as_nanos() as u64;
            h.record(now.saturating_sub(sent).max(1))?;
        }
        anyhow::Ok(h)
    });
    let start = Instant::now();
    let mut acks = Vec::new();
    for _ in 0..count {
        let mut v = vec![0u8; 1024];
        v[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
        acks.push(w.send(v).await?);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for a in acks {
        a.await?;
    }
    let latency_ns = reader.await??;
    let secs = start.elapsed().as_secs_f64();
    drop(w);
    s.close().await?;
    Ok(Sample { ops: count, bytes: count * 1024, secs, latency_ns })
}

/// Fills a stream with `total` bytes of 4 KiB entries and closes it.
async fn fill(place: &Place, total: u64) -> anyhow::Result<()> {
    let s = Streams::open(place.dir.path(), place.options()).await?;
    s.create("r", StreamConfig::default()).await?;
    let w = s.writer("r").await?;
    let mut acks = Vec::new();
    for i in 0..total / 4096 {
        acks.push(w.send(entry(4096, i)).await?);
    }
    for a in acks {
        a.await?;
    }
    w.close().await?;
    s.close().await?;
    Ok(())
}

/// Reads the whole stream with `readers` concurrent readers (reader k starting k/readers of the
/// way in and wrapping around), through a cache of `cache` bytes. With `warm`, one untimed pass
/// first. Returns the sample and the cache hit rate of the timed pass.
async fn read_run(
    place: &Place,
    readers: u64,
    cache: usize,
    warm: bool,
) -> anyhow::Result<(Sample, f64)> {
    let s = Streams::open(place.dir.path(), place.options().cache_bytes(cache)).await?;
    let n = s.info("r")?.next_id;
    let pass = |s: Streams| async move {
        let mut tasks = Vec::new();
        for k in 0..readers {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let first = n * k / readers;
                let mut r = s.reader("r", Start::At(first))?;
                let mut h = Sample::new_histogram();
                let mut bytes = 0u64;
                for i in 0..n {
                    if i == n - first {
                        r.seek(0);
                    }
                    let t = Instant::now();
                    bytes += r.next().await?.data.len() as u64;
                    h.record(t.elapsed().as_nanos().max(1) as u64)?;
                }
                anyhow::Ok((h, bytes))
            }));
        }
        let mut h = Sample::new_histogram();
        let mut bytes = 0;
        for t in tasks {
            let (th, b) = t.await??;
            h.add(th)?;
            bytes += b;
        }
        anyhow::Ok((h, bytes))
    };
    if warm {
        pass(s.clone()).await?;
    }
    let before = s.cache_stats();
    let start = Instant::now();
    let (latency_ns, bytes) = pass(s.clone()).await?;
    let secs = start.elapsed().as_secs_f64();
    let after = s.cache_stats();
    let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
    let rate = hits as f64 / (hits + misses).max(1) as f64;
    s.close().await?;
    Ok((Sample { ops: n * readers, bytes, secs, latency_ns }, rate))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: Args) -> anyhow::Result<()> {
    let s3_root = tempfile::tempdir_in(&args.common.dir)?;
    let server =
        S3Server::start_at(s3_root.path(), ([127, 0, 0, 1], 0).into(), KEY, SECRET).await?;
    let mut places = 0;
    let total = args.mb << 20;
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    for backend in [Backend::Local, Backend::S3] {
        for size in [1024usize, 64 << 10] {
            let name = format!("append-{}k/{}", size >> 10, backend.name());
            if !args.common.wanted(&name) {
                continue;
            }
            let (mut timber, mut ceiling, mut journaled) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..args.common.repeat {
                let p = Place::new(&args, backend, &server, &mut places)?;
                let (sample, frag) = append_run(&p, size, total).await?;
                timber.push(sample);
                let p =
                    Place::new(&args, backend, &server, &mut places)?.journaled(Journal::Always);
                journaled.push(append_run(&p, size, total).await?.0);
                let p = Place::new(&args, backend, &server, &mut places)?;
                ceiling.push(match &p.s3 {
                    None => raw_disk(p.dir.path(), frag, total)?,
                    Some(o) => {
                        let inflight =
                            timber_stream::WriterOptions::object_storage().max_flush_inflight;
                        raw_puts(o, frag, total, inflight).await?
                    }
                });
                notes.push(format!("{name}: average fragment {} KiB", frag >> 10));
            }
            let ceiling_name = match backend {
                Backend::Local => "fdatasync-ceiling",
                Backend::S3 => "put-ceiling",
            };
            rows.push(Row::from_samples(&name, "timber", &timber));
            rows.push(Row::from_samples(&name, JOURNALED, &journaled));
            rows.push(Row::from_samples(&name, ceiling_name, &ceiling));
        }
        let name = format!("tail-latency/{}", backend.name());
        if args.common.wanted(&name) {
            let (mut samples, mut journaled) = (Vec::new(), Vec::new());
            for _ in 0..args.common.repeat {
                let p = Place::new(&args, backend, &server, &mut places)?;
                samples.push(tail_run(&p, 500).await?);
                let p =
                    Place::new(&args, backend, &server, &mut places)?.journaled(Journal::Always);
                journaled.push(tail_run(&p, 500).await?);
            }
            rows.push(Row::from_samples(&name, "timber", &samples));
            rows.push(Row::from_samples(&name, JOURNALED, &journaled));
        }
        let reads = ["catchup-cold", "catchup-warm", "cache-1-reader", "cache-8-readers"];
        if reads.iter().any(|w| args.common.wanted(&format!("{w}/{}", backend.name()))) {
            let p = Place::new(&args, backend, &server, &mut places)?;
            fill(&p, total).await?;
            for w in reads {
                let name = format!("{w}/{}", backend.name());
                if !args.common.wanted(&name) {
                    continue;
                }
                let (readers, cache, warm) = match w {
                    "catchup-cold" => (1, 256 << 20, false),
                    "catchup-warm" => (1, (total * 2) as usize, true),
                    "cache-1-reader" => (1, (total / 4) as usize, false),
                    _ => (8, (total / 4) as usize, false),
                };
                let mut samples = Vec::new();
                let mut rates = Vec::new();
                for _ in 0..args.common.repeat {
                    let (sample, rate) = read_run(&p, readers, cache, warm).await?;
                    samples.push(sample);
                    rates.push(rate);
                }
                rates.sort_by(f64::total_cmp);
                let mut row = Row::from_samples(&name, "timber", &samples);
                row.hit_rate = Some(rates[rates.len() / 2]);
                rows.push(row);
            }
        }
    }
    print_table(
        "timber-stream (medians; timber/this < 1 on a ceiling row = share of the ceiling)",
        &rows,
    );
    for r in rows.iter().filter(|r| r.system.ends_with("ceiling")) {
        for t in rows
            .iter()
            .filter(|t| t.workload == r.workload && (t.system == "timber" || t.system == JOURNALED))
        {
            println!(
                "{:<26} {} at {:.0}% of the {} (MB/s; goal 85%)",
                r.workload,
                t.system,
                100.0 * t.mb_per_sec / r.mb_per_sec,
                r.system
            );
        }
    }
    for r in rows.iter().filter(|r| r.hit_rate.is_some()) {
        println!("{:<26} cache hit rate {:.1}%", r.workload, r.hit_rate.unwrap_or(0.0) * 100.0);
    }
    notes.sort();
    notes.dedup();
    for n in notes {
        println!("{n}");
    }
    let path = write_json("stream", &rows)?;
    println!("\nwrote {}", path.display());
    Ok(())
}
