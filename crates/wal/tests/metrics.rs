//! The log's metrics reach a recorder installed before it is opened.

use std::sync::OnceLock;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use timber_wal::{Options, SyncMode, Wal};

/// The tests of this file take turns: a snapshot drains the recorder's counters.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The process-wide recorder, installed by whichever test comes first.
fn snapshotter() -> &'static Snapshotter {
    static S: OnceLock<Snapshotter> = OnceLock::new();
    S.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let s = recorder.snapshotter();
        recorder.install().unwrap();
        s
    })
}

#[test]
fn appends_fsyncs_and_group_sizes_are_recorded() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let snapshotter = snapshotter();
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
        if !key.labels().any(|l| l.key() == "wal" && l.value() == "test-log") {
            continue; // another test's log
        }
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

/// `bytes_per_sync` wakes the `Interval` sync thread long before its interval to start the
/// writeback of what was appended, which shows in the log's own counter, and syncs nothing: only
/// the interval does.
#[test]
fn bytes_per_sync_starts_writeback_before_the_interval_without_syncing() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _ = counters_of("kicked-log");
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default()
        .sync(SyncMode::Interval(std::time::Duration::from_secs(3600)))
        .bytes_per_sync(Some(4096))
        .name("kicked-log");
    let wal = Wal::open(dir.path(), opts).unwrap();
    // Past the slack kept behind the end (pages still being filled are not written back).
    for i in 0..1024u32 {
        wal.append(&[i as u8; 1000]).unwrap();
    }
    let mut seen = std::collections::HashMap::<String, u64>::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while seen.get("timber_wal_writebacks_total").copied().unwrap_or(0) == 0 {
        for (name, c) in counters_of("kicked-log") {
            *seen.entry(name).or_default() += c;
        }
        assert!(std::time::Instant::now() < deadline, "no background writeback within 30 s");
        std::thread::yield_now();
    }
    assert_eq!(seen.get("timber_wal_fsyncs_total").copied().unwrap_or(0), 0, "{seen:?}");
}

/// Counters of the log named `name`, drained from the recorder.
fn counters_of(name: &str) -> std::collections::HashMap<String, u64> {
    let mut counters = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let key = key.key();
        if key.labels().any(|l| l.key() == "wal" && l.value() == name) {
            if let DebugValue::Counter(c) = value {
                *counters.entry(key.name().to_owned()).or_default() += c;
            }
        }
    }
    counters
}

/// Segments that `truncate_front` drops come back as new segments, their stale records never
/// read back: records of other sizes than the stale ones (so that frames do not line up), then a
/// clean reopen that finds no torn tail to cut, in `Always` and `Manual` modes.
#[test]
fn truncated_segments_are_recycled_and_reopen_cleanly() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (mode, name) in [(SyncMode::Always, "recycle-always"), (SyncMode::Manual, "recycle-manual")]
    {
        let _ = counters_of(name);
        let dir = tempfile::tempdir().unwrap();
        let opts =
            Options::default().segment_capacity(8192).sync(mode).recycle_segments(true).name(name);
        let record = |i: u64| vec![i as u8; 40 + (i as usize * 37) % 300];
        let wal = Wal::open(dir.path(), opts.clone()).unwrap();
        for i in 0..600u64 {
            assert_eq!(wal.append(&record(i)).unwrap(), i);
            if i % 50 == 49 {
                wal.truncate_front(i - 20).unwrap();
            }
        }
        // End in a recycled segment, a few records into it: append until the tail is one.
        let first = 590;
        wal.truncate_front(first).unwrap();
        let mut next = 600;
        let tail_recycled = || {
            let tail = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .max()
                .unwrap();
            std::fs::read(tail).unwrap()[12] == 1
        };
        while !tail_recycled() {
            assert_eq!(wal.append(&record(next)).unwrap(), next);
            next += 1;
        }
        for _ in 0..3 {
            assert_eq!(wal.append(&record(next)).unwrap(), next);
            next += 1;
        }
        drop(wal);
        let c = counters_of(name);
        assert!(c.get("timber_wal_segments_recycled_total").copied().unwrap_or(0) >= 5, "{c:?}");
        let wal = Wal::open(dir.path(), opts).unwrap();
        let got: Vec<(u64, Vec<u8>)> =
            wal.iter(..).map(|r| r.map(|(s, b)| (s, b.to_vec())).unwrap()).collect();
        let want: Vec<(u64, Vec<u8>)> = (first..next).map(|i| (i, record(i))).collect();
        assert_eq!(got, want);
        let c = counters_of(name);
        assert_eq!(c.get("timber_wal_torn_tails_cut_total").copied().unwrap_or(0), 0, "{c:?}");
    }
}
