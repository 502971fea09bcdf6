//! The metrics a stream store exports (W8): write and read latency and throughput, fragment
//! writes (the sync frequency), object store latency, cache hits, misses, evictions and memory.

mod common;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use timber_stream::{Start, StreamConfig, Streams};

#[test]
fn writers_readers_cache_and_store_report_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let p = common::Place::new(common::Backend::Local);
    common::runtime().block_on(async {
        let s = Streams::open(p.dir.path(), p.options().cache_bytes(1 << 20)).await.unwrap();
        s.create("m", StreamConfig::default()).await.unwrap();
        let w = s.writer("m").await.unwrap();
        for i in 0..20u32 {
            w.append(vec![i as u8; 100_000]).await.unwrap();
        }
        let mut r = s.reader("m", Start::Earliest).unwrap();
        for _ in 0..20 {
            r.next().await.unwrap();
        }
    });
    let snap = snapshotter.snapshot().into_vec();
    let find = |name: &str| {
        snap.iter()
            .filter(|(k, ..)| k.key().name() == name)
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(c) => *c as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(h) => h.len() as f64,
            })
            .sum::<f64>()
    };
    assert_eq!(find("timber_stream_appended_entries_total"), 20.0);
    assert!(find("timber_stream_appended_bytes_total") > 2_000_000.0);
    assert_eq!(find("timber_stream_fragments_total"), 20.0);
    assert_eq!(find("timber_stream_append_seconds"), 20.0);
    assert_eq!(find("timber_stream_flush_seconds"), 20.0);
    assert_eq!(find("timber_stream_read_entries_total"), 20.0);
    assert!(find("timber_stream_read_bytes_total") > 2_000_000.0);
    assert!(
        find("timber_stream_read_seconds") >= 20.0,
        "every fragment a reader moves into is timed"
    );
    assert!(find("timber_stream_store_seconds") >= 40.0, "puts and gets are timed");
    assert!(find("timber_stream_cache_misses_total") >= 1.0);
    assert!(
        find("timber_stream_cache_evictions_total") >= 1.0,
        "20 x 100 KB through a 1 MiB cache"
    );
    assert!(find("timber_stream_cache_bytes") <= (1 << 20) as f64);
}
