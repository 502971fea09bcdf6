//! The engine's figures reach an installed `metrics` recorder, labelled with the database name.

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use timber_kv::{Db, Durability, Options, WriteBatch};

#[test]
fn writes_stalls_and_level_gauges_are_reported() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // No compaction may run after the last flush, so the gauges and `stats()` agree.
    let opts = Options::default()
        .memtable_size(8 << 10)
        .l0_compaction_trigger(50)
        .l0_stall_triggers(60, 70);
    let db = Db::open(dir.path(), opts.name("m")).unwrap();
    for i in 0..500u32 {
        let mut b = WriteBatch::new();
        b.put(format!("k{i:05}"), [7u8; 64]);
        db.write_with(b, if i % 100 == 0 { Durability::Synced } else { Durability::Buffered })
            .unwrap();
    }
    db.flush().unwrap();
    let snap = snapshotter.snapshot().into_vec();
    let find = |name: &str| {
        snap.iter()
            .filter(|(k, ..)| {
                k.key().name() == name
                    && k.key().labels().any(|l| l.key() == "db" && l.value() == "m")
            })
            .map(|(_, _, _, v)| v)
            .collect::<Vec<_>>()
    };
    assert!(matches!(find("timber_kv_writes_total").as_slice(), [DebugValue::Counter(500)]));
    assert!(
        matches!(find("timber_kv_write_bytes_total").as_slice(), [DebugValue::Counter(n)] if *n == 500 * (6 + 64))
    );
    assert!(
        matches!(find("timber_kv_write_sync_seconds").as_slice(), [DebugValue::Histogram(h)] if h.len() == 5)
    );
    assert!(
        matches!(find("timber_kv_flush_seconds").as_slice(), [DebugValue::Histogram(h)] if !h.is_empty())
    );
    let levels = find("timber_kv_level_bytes");
    assert_eq!(levels.len(), timber_kv::NUM_LEVELS);
    let total: f64 = levels
        .iter()
        .map(|v| if let DebugValue::Gauge(g) = v { g.into_inner() } else { 0.0 })
        .sum();
    assert!((total - db.stats().table_bytes() as f64).abs() < 1.0, "gauges match stats");
    assert!(!find("timber_kv_cache_hit_rate").is_empty());
}
