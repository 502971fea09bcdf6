//! The engine's figures through the `metrics` crate, labelled `db = <name>`: counters of writes,
//! stalls and compaction bytes, histograms of synced-write wait and flush latency, and gauges refreshed from
//! `Stats` after every flush and compaction.

use metrics::{counter, gauge, histogram, Counter, Histogram};

use crate::stats::Stats;

pub(crate) struct Metrics {
    name: String,
    pub(crate) writes: Counter,
    pub(crate) write_bytes: Counter,
    pub(crate) stalls: Counter,
    pub(crate) compaction_bytes: Counter,
    pub(crate) sync_seconds: Histogram,
    pub(crate) flush_seconds: Histogram,
}

impl Metrics {
    pub(crate) fn new(name: &str) -> Metrics {
        let l = [("db", name.to_owned())];
        Metrics {
            name: name.to_owned(),
            writes: counter!("timber_kv_writes_total", &l),
            write_bytes: counter!("timber_kv_write_bytes_total", &l),
            stalls: counter!("timber_kv_write_stalls_total", &l),
            compaction_bytes: counter!("timber_kv_compaction_bytes_written_total", &l),
            sync_seconds: histogram!("timber_kv_write_sync_seconds", &l),
            flush_seconds: histogram!("timber_kv_flush_seconds", &l),
        }
    }

    pub(crate) fn publish(&self, s: &Stats) {
        let db = self.name.clone();
        for (i, l) in s.levels.iter().enumerate() {
            let labels = [("db", db.clone()), ("level", i.to_string())];
            gauge!("timber_kv_level_bytes", &labels).set(l.bytes as f64);
            gauge!("timber_kv_level_files", &labels).set(l.files as f64);
        }
        let l = [("db", db)];
        gauge!("timber_kv_write_amplification", &l).set(s.write_amplification);
        gauge!("timber_kv_cache_hit_rate", &l).set(s.cache_hit_rate);
        gauge!("timber_kv_pending_compaction_bytes", &l).set(s.pending_compaction_bytes as f64);
        gauge!("timber_kv_stall_seconds", &l).set(s.stall_micros as f64 / 1e6);
        for (kind, cause, st) in [
            ("slowdown", "memtables", s.slowed_by_memtables),
            ("slowdown", "l0", s.slowed_by_l0),
            ("stop", "memtables", s.stopped_by_memtables),
            ("stop", "l0", s.stopped_by_l0),
        ] {
            let labels =
                [("db", self.name.clone()), ("kind", kind.into()), ("cause", cause.into())];
            gauge!("timber_kv_write_stall_seconds", &labels).set(st.micros as f64 / 1e6);
            gauge!("timber_kv_write_stalls", &labels).set(st.count as f64);
        }
        gauge!("timber_kv_wal_bytes", &l).set(s.wal_bytes as f64);
        // What the engine holds in memory, by kind (the parts a memory budget charges).
        for (kind, bytes) in [
            ("memtable", s.memtable_bytes),
            ("immutable_memtables", s.immutable_memtable_bytes),
            ("reader_memtables", s.reader_memtable_bytes),
            ("spare_memtables", s.spare_memtable_bytes),
            ("table_index_filter", s.table_pinned_bytes),
            ("block_cache", s.cache_bytes),
        ] {
            let labels = [("db", self.name.clone()), ("kind", kind.into())];
            gauge!("timber_kv_memory_bytes", &labels).set(bytes as f64);
        }
        gauge!("timber_kv_block_cache_limit_bytes", &l).set(s.cache_limit as f64);
        gauge!("timber_kv_block_cache_index_filter_bytes", &l)
            .set(s.cache_index_filter_bytes as f64);
    }
}
