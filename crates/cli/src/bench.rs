//! `timber bench`: a load generator against a running timberd. `concurrency` tasks run the
//! workload in a closed loop for `duration`; a progress bar shows the rate while it runs; at the
//! end it prints throughput and an HDR latency histogram (or one JSON object with `--json`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::json;
use timber_client::Client;

/// What `timber bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Puts of random keys.
    Put,
    /// Gets of keys written first.
    Get,
    /// Appends of one entry to a stream.
    Append,
}

/// Flags of `timber bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The workload.
    #[arg(long, value_enum, default_value = "put")]
    workload: Workload,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to run, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Value or entry size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Stream to append to (created if missing).
    #[arg(long, default_value = "bench")]
    stream: String,
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("bench/{i:012}"))
}

pub async fn run(client: Client, args: Args, json_out: bool) -> anyhow::Result<()> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let value = Bytes::from(vec![b'x'; args.value_size]);
    match args.workload {
        Workload::Get => {
            for i in 0..args.keys.min(100_000) {
                client.put(key(i), value.clone()).await?;
            }
        }
        Workload::Append => match client.create_stream(&args.stream, None, None).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(timber_client::Code::AlreadyExists) => {}
            Err(e) => return Err(e.into()),
        },
        Workload::Put => {}
    }
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = Vec::new();
    for t in 0..args.concurrency {
        let (client, value, done, errors) =
            (client.clone(), value.clone(), done.clone(), errors.clone());
        let workload = args.workload;
        let keys = args.keys.max(1);
        let writer = match workload {
            Workload::Append => Some(client.writer(&args.stream).await?),
            _ => None,
        };
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut x = 0x9e3779b97f4a7c15u64 ^ (t as u64 + 1);
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = key(x % keys);
                let t0 = Instant::now();
                let ok = match workload {
                    Workload::Put => client.put(k, value.clone()).await.is_ok(),
                    Workload::Get => client.get(k).await.is_ok(),
                    Workload::Append => {
                        writer.as_ref().expect("opened").append(vec![value.clone()]).await.is_ok()
                    }
                };
                let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            h
        }));
    }
    let bar = if json_out {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(args.duration.as_secs().max(1))
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len}s {msg}")
            .expect("valid template"),
    );
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let secs = start.elapsed().as_secs_f64();
        bar.set_position(secs as u64);
        bar.set_message(format!("{:.0} ops/s", done.load(Ordering::Relaxed) as f64 / secs));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for t in tasks {
        hist.add(t.await?)?;
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let ops = done.load(Ordering::Relaxed);
    let errs = errors.load(Ordering::Relaxed);
    let rate = ops as f64 / secs;
    let q = |p: f64| hist.value_at_quantile(p);
    if json_out {
        println!(
            "{}",
            json!({
                "workload": format!("{:?}", args.workload).to_lowercase(),
                "concurrency": args.concurrency, "seconds": secs, "ops": ops, "errors": errs,
                "ops_per_sec": rate,
                "mb_per_sec": rate * args.value_size as f64 / 1e6,
                "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "p999_us": q(0.999),
                "max_us": hist.max(),
            })
        );
    } else {
        println!(
            "{:?}: {ops} ops in {secs:.1}s with {} in flight = {rate:.0} ops/s ({:.2} MB/s), {errs} errors",
            args.workload,
            args.concurrency,
            rate * args.value_size as f64 / 1e6
        );
        println!(
            "latency (us)  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            hist.max()
        );
        for (p, v) in [
            (0.5, q(0.5)),
            (0.75, q(0.75)),
            (0.9, q(0.9)),
            (0.99, q(0.99)),
            (0.999, q(0.999)),
            (1.0, hist.max()),
        ] {
            let width = (v as f64 / hist.max().max(1) as f64 * 50.0).ceil() as usize;
            println!("{:>7.3}%  {:>9} us  {}", p * 100.0, v, "#".repeat(width));
        }
    }
    anyhow::ensure!(ops > 0, "no request succeeded ({errs} errors)");
    Ok(())
}
