//! Results: one row per (workload, system), printed as a table with the ratio to timber and
//! written as JSON to `target/bench/<name>.json`.

use std::path::PathBuf;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Options every layer's subcommand takes (kv has its own, with a system filter).
#[derive(clap::Args, Debug)]
pub struct Common {
    /// Directory for the data under test (on the disk to measure).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub dir: PathBuf,
    /// Runs of each (workload, system); the table shows medians.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Only run workloads whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
}

impl Common {
    /// Whether the workload `name` is selected by `--only`.
    pub fn wanted(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|o| name.contains(o))
    }
}

/// One measured run of one system on one workload.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
    pub latency_ns: Histogram<u64>,
}

impl Sample {
    pub fn new_histogram() -> Histogram<u64> {
        Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
    }
}

/// The medians over the repeats of one (workload, system).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    pub system: String,
    pub ops_per_sec: f64,
    pub mb_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Longest single operation (the longest write stall shows here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_us: Option<f64>,
    /// Peak resident memory of the process during the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mb: Option<f64>,
    /// Size on disk after the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<f64>,
    /// Share of transaction attempts that aborted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort_rate: Option<f64>,
    /// Share of fragment lookups served by the cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hit_rate: Option<f64>,
    /// Operations completed in each second of the run (of the median run by throughput), where
    /// a stall shows as a dip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops_per_second: Option<Vec<u64>>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Row {
    pub fn from_samples(workload: &str, system: &str, samples: &[Sample]) -> Row {
        let per = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        Row {
            workload: workload.to_owned(),
            system: system.to_owned(),
            ops_per_sec: per(&|s| s.ops as f64 / s.secs),
            mb_per_sec: per(&|s| s.bytes as f64 / s.secs / 1e6),
            p50_us: per(&|s| s.latency_ns.value_at_quantile(0.50) as f64 / 1e3),
            p99_us: per(&|s| s.latency_ns.value_at_quantile(0.99) as f64 / 1e3),
            p999_us: per(&|s| s.latency_ns.value_at_quantile(0.999) as f64 / 1e3),
            max_us: None,
            peak_rss_mb: None,
            disk_mb: None,
            abort_rate: None,
            hit_rate: None,
            ops_per_second: None,
        }
    }
}

/// Prints the table; the last column is timber's ops/s divided by the row's (for a row that
/// times an event, the row's median time divided by timber's).
pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "{:<26} {:<14} {:>13} {:>10} {:>10} {:>10} {:>12}",
        "workload", "system", "ops/s", "MB/s", "p50 us", "p99 us", "timber/this"
    );
    for r in rows {
        let timber = rows.iter().find(|t| t.workload == r.workload && t.system == "timber");
        // Rows that time one event (ops/s 0, e.g. failover) compare their median times.
        let ratio = timber.map_or(String::from("-"), |t| match r.ops_per_sec > 0.0 {
            true => format!("{:.2}x", t.ops_per_sec / r.ops_per_sec),
            false => format!("{:.2}x", r.p50_us / t.p50_us),
        });
        println!(
            "{:<26} {:<14} {:>13.0} {:>10.1} {:>10.1} {:>10.1} {:>12}",
            r.workload, r.system, r.ops_per_sec, r.mb_per_sec, r.p50_us, r.p99_us, ratio
        );
    }
}

/// Writes the rows to `target/bench/<name>.json` and returns the path.
pub fn write_json(name: &str, rows: &[Row]) -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(rows)?)?;
    Ok(path)
}
