//! Metric handles of one log, registered once at open through the `metrics` crate, so the hot
//! path only bumps atomics. Install a recorder before opening the log to collect them.

use metrics::{counter, histogram, Counter, Histogram};

#[derive(Debug)]
pub(crate) struct Metrics {
    pub appends: Counter,
    pub append_bytes: Counter,
    pub fsyncs: Counter,
    pub fsync_seconds: Histogram,
    pub writebacks: Counter,
    pub group_records: Histogram,
    pub segments_sealed: Counter,
    pub segments_recycled: Counter,
}

impl Metrics {
    pub(crate) fn new(name: &str) -> Metrics {
        let l = [("wal", name.to_owned())];
        Metrics {
            appends: counter!("timber_wal_appends_total", &l),
            append_bytes: counter!("timber_wal_append_bytes_total", &l),
            fsyncs: counter!("timber_wal_fsyncs_total", &l),
            fsync_seconds: histogram!("timber_wal_fsync_seconds", &l),
            writebacks: counter!("timber_wal_writebacks_total", &l),
            group_records: histogram!("timber_wal_group_commit_records", &l),
            segments_sealed: counter!("timber_wal_segments_sealed_total", &l),
            segments_recycled: counter!("timber_wal_segments_recycled_total", &l),
        }
    }
}
