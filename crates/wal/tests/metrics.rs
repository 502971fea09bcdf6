//! The log's metrics reach a recorder installed before it is opened.

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use timber_wal::{Options, SyncMode, Wal};

#[test]
fn appends_fsyncs_and_group_sizes_are_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let wal =
        Wal::open(dir.path(), Options::default().sync(SyncMode::Always).name("test-log")).unwrap();
    for i in 0..10u8 {
        wal.append(&[i; 50]).unwrap();
    }
    wal.append_batch(&[[1u8; 10], [2u8; 10]]).unwrap();

    let mut counters = std::collections::HashMap::new();
    let mut histograms = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        assert!(key.labels().any(|l| l.key() == "wal" && l.value() == "test-log"), "{key:?}");
        match value {
            DebugValue::Counter(c) => {
                counters.insert(key.name().to_owned(), c);
            }
            DebugValue::Histogram(h) => {
                histograms.insert(key.name().to_owned(), h.len());
            }
            DebugValue::Gauge(_) => {}
        }
    }
    assert_eq!(counters["timber_wal_appends_total"], 12);
    assert_eq!(counters["timber_wal_append_bytes_total"], 10 * (20 + 50) + 2 * (20 + 10));
    assert!(counters["timber_wal_fsyncs_total"] >= 11, "{counters:?}");
    assert!(histograms["timber_wal_fsync_seconds"] >= 11);
    assert!(histograms["timber_wal_group_commit_records"] >= 1);
}
