//! Options of a [`Wal`](crate::Wal), set with a builder and checked once by `Wal::open`.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::segment::{SEGMENT_HEADER_LEN, TRAILER_LEN};

/// Smallest allowed segment capacity.
pub const MIN_SEGMENT_CAPACITY: u64 = 4096;
/// Largest allowed segment capacity: record offsets inside a segment are stored as `u32`.
pub const MAX_SEGMENT_CAPACITY: u64 = u32::MAX as u64;

/// Most group commits that may fsync at once.
pub const MAX_SYNCS_IN_FLIGHT: u32 = 8;

/// When appended records become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// `append` returns only once the record is on stable storage. Concurrent appenders share
    /// one `fdatasync` (group commit).
    Always,
    /// Appends are buffered; a background thread makes them durable every interval, and
    /// [`Wal::sync`](crate::Wal::sync) forces it.
    Interval(Duration),
    /// Records become durable only on [`Wal::sync`](crate::Wal::sync), when a segment is sealed,
    /// and on close.
    Manual,
}

impl Default for SyncMode {
    fn default() -> Self {
        SyncMode::Interval(Duration::from_secs(1))
    }
}

/// Options for [`Wal::open`](crate::Wal::open). Build with `Options::default()` and the setters.
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) dir_mode: u32,
    pub(crate) file_mode: u32,
    pub(crate) segment_capacity: u64,
    pub(crate) reader_cache: usize,
    pub(crate) max_size: Option<u64>,
    pub(crate) preallocate: bool,
    pub(crate) recycle: bool,
    pub(crate) sync: SyncMode,
    pub(crate) write_buffer: usize,
    pub(crate) name: String,
    pub(crate) oversized: bool,
    pub(crate) bytes_per_sync: Option<u64>,
    pub(crate) syncs_in_flight: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dir_mode: 0o750,
            file_mode: 0o640,
            segment_capacity: 64 << 20,
            reader_cache: 8,
            max_size: None,
            preallocate: true,
            recycle: true,
            sync: SyncMode::default(),
            write_buffer: 64 << 10,
            name: "wal".to_owned(),
            oversized: false,
            bytes_per_sync: None,
            syncs_in_flight: 1,
        }
    }
}

impl Options {
    /// Permission bits of the log directory when `open` creates it (default `0o750`).
    pub fn dir_mode(mut self, mode: u32) -> Self {
        self.dir_mode = mode;
        self
    }

    /// Permission bits of the files the log creates (default `0o640`).
    pub fn file_mode(mut self, mode: u32) -> Self {
        self.file_mode = mode;
        self
    }

    /// Maximum size of one segment file in bytes, header and index included (default 64 MiB,
    /// from 4 KiB to 4 GiB - 1). A record or batch that cannot fit in an empty segment is refused.
    pub fn segment_capacity(mut self, bytes: u64) -> Self {
        self.segment_capacity = bytes;
        self
    }

    /// How many sealed segments are kept open for reading, least recently used evicted (default 8).
    pub fn reader_cache(mut self, segments: usize) -> Self {
        self.reader_cache = segments;
        self
    }

    /// Limit on the total size of the log; appends past it fail with `Error::Full`.
    pub fn max_size(mut self, bytes: Option<u64>) -> Self {
        self.max_size = bytes;
        self
    }

    /// Reserve the whole capacity of a new segment on disk when it is created (default on).
    pub fn preallocate(mut self, on: bool) -> Self {
        self.preallocate = on;
        self
    }

    /// Reuse a segment that `truncate_front` dropped as the next segment instead of deleting it
    /// and zero-filling a new one (default on; only with `preallocate`). Nothing copies zeros
    /// then, and the disk writes only records. One kept segment costs a segment of disk, like the
    /// zero-filled spare it replaces; the old records stay in the file until overwritten (never
    /// read back: recovery knows them by their numbers). Recovery is as safe as in a zero-filled
    /// segment: a power loss that leaves old bytes inside a write that was never synced is cut as
    /// a torn tail, because each record says how far the log was durable when it was written.
    pub fn recycle_segments(mut self, on: bool) -> Self {
        self.recycle = on;
        self
    }

    /// When appends become durable (default `Interval(1s)`).
    pub fn sync(mut self, mode: SyncMode) -> Self {
        self.sync = mode;
        self
    }

    /// Bytes of appended records kept in memory before they are handed to the operating system
    /// (default 64 KiB). In `Interval` and `Manual` modes a process crash loses at most this much
    /// beyond what is synced; 0 hands every append to the OS at once.
    pub fn write_buffer(mut self, bytes: usize) -> Self {
        self.write_buffer = bytes;
        self
    }

    /// Accept a record or batch larger than a segment (default off: `InvalidParam`). When on,
    /// such a record starts a segment of its own, which grows past the capacity to hold it (up to
    /// 4 GiB) and is sealed by the next append.
    pub fn oversized_records(mut self, on: bool) -> Self {
        self.oversized = on;
        self
    }

    /// Write in the background as this many bytes are appended (default off): start their
    /// writeback (`sync_file_range`, not durable) on a thread of the log (in `Interval` mode its
    /// sync thread, between syncs), so that the fsync that finishes a roll, or the next sync,
    /// finds little left to write. Durability is unchanged: only syncs make records durable.
    pub fn bytes_per_sync(mut self, bytes: Option<u64>) -> Self {
        self.bytes_per_sync = bytes;
        self
    }

    /// How many group commits may fsync at once (default 1, from 1 to 8). A second sync may
    /// start while the first is on the disk, covering the records appended meanwhile; syncs
    /// that overlap still publish in order, and one that fails fails those after it. Each slot
    /// keeps its own read-only handle of the active segment open.
    pub fn syncs_in_flight(mut self, n: u32) -> Self {
        self.syncs_in_flight = n;
        self
    }

    /// Name used as the `wal` label of this log's metrics (default `"wal"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(Error::InvalidParam(msg));
        if !(MIN_SEGMENT_CAPACITY..=MAX_SEGMENT_CAPACITY).contains(&self.segment_capacity) {
            return invalid(format!(
                "segment capacity {} is outside {MIN_SEGMENT_CAPACITY}..={MAX_SEGMENT_CAPACITY}",
                self.segment_capacity
            ));
        }
        if self.reader_cache == 0 {
            return invalid("reader cache must hold at least one segment".into());
        }
        if let Some(limit) = self.max_size {
            let floor = (SEGMENT_HEADER_LEN + TRAILER_LEN) as u64;
            if limit <= floor {
                return invalid(format!("max size {limit} must exceed {floor} bytes"));
            }
        }
        if let SyncMode::Interval(d) = self.sync {
            if d.is_zero() {
                return invalid("sync interval must be positive".into());
            }
        }
        if !(1..=MAX_SYNCS_IN_FLIGHT).contains(&self.syncs_in_flight) {
            return invalid(format!(
                "syncs in flight {} is outside 1..={MAX_SYNCS_IN_FLIGHT}",
                self.syncs_in_flight
            ));
        }
        if self.dir_mode & !0o7777 != 0 || self.file_mode & !0o7777 != 0 {
            return invalid(format!(
                "permission bits {:o}/{:o} out of range",
                self.dir_mode, self.file_mode
            ));
        }
        Ok(())
    }
}
