//! Options of the stream store, of writers, and of one stream.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;

/// Where fragments are stored.
#[derive(Clone, Default)]
pub enum Storage {
    /// Files under `<dir>/objects`, written with fsync of file and directory (the default).
    #[default]
    Local,
    /// An S3-compatible object store.
    S3(S3Options),
    /// Any other `object_store` implementation. It must support `PutMode::Create`.
    Custom(Arc<dyn ObjectStore>),
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Local => f.write_str("Local"),
            Storage::S3(o) => f.debug_tuple("S3").field(o).finish(),
            Storage::Custom(s) => write!(f, "Custom({s})"),
        }
    }
}

impl Storage {
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, Storage::Local)
    }
}

/// Connection settings of an S3-compatible store.
#[derive(Clone)]
pub struct S3Options {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000`; `None` means AWS.
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Region (any string for most S3-compatible servers).
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Allow plain `http://` endpoints (for local use).
    pub allow_http: bool,
    /// Path-style requests (`endpoint/bucket/key`) rather than virtual-hosted style.
    pub path_style: bool,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("allow_http", &self.allow_http)
            .field("path_style", &self.path_style)
            .finish()
    }
}

/// How a writer batches entries into fragments (Woodpecker's names).
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Flush a fragment once it holds this many entries.
    pub max_entries: usize,
    /// Flush a fragment once its entries add up to this many bytes.
    pub max_bytes: usize,
    /// Flush a fragment this long after its first entry arrived (with a journal: cut one from
    /// the journaled entries this long after the oldest of them was journaled).
    pub max_interval: Duration,
    /// Fragments being written at once.
    pub max_flush_inflight: usize,
    /// Bytes accepted but not yet durable; beyond it `send`/`append` wait.
    pub max_buffered_bytes: usize,
    /// The largest entry accepted.
    pub max_entry_bytes: usize,
    /// Compress fragment bodies with LZ4.
    pub lz4: bool,
    /// Roll to a new segment once the current one holds this many bytes.
    pub max_segment_bytes: u64,
    /// Roll to a new segment once the current one is this old.
    pub max_segment_age: Duration,
    /// Group commit: when fewer than two fragments are being written, write one at once
    /// instead of waiting for `max_interval`; entries arriving meanwhile form the next one (two,
    /// so that one fragment's fsync overlaps the next one's write). Lowest latency for writers
    /// that wait for each ack, at the price of more, smaller fragments under light load (merged
    /// later once their segment is sealed). With a journal
    /// ([`Options::journal`](crate::Options::journal)) entries are always journaled at once and
    /// this option has no effect.
    pub flush_when_idle: bool,
}

impl WriterOptions {
    /// Defaults for fragments on local disk: small, frequent fragments, group commit.
    pub fn local() -> WriterOptions {
        WriterOptions {
            max_entries: 100_000,
            max_bytes: 4 << 20,
            max_interval: Duration::from_millis(2),
            max_flush_inflight: 4,
            max_buffered_bytes: 64 << 20,
            max_entry_bytes: 16 << 20,
            lz4: false,
            max_segment_bytes: 1 << 30,
            max_segment_age: Duration::from_secs(3600),
            flush_when_idle: true,
        }
    }

    /// Defaults for fragments on object storage: larger fragments, fewer requests.
    pub fn object_storage() -> WriterOptions {
        WriterOptions {
            max_bytes: 8 << 20,
            max_interval: Duration::from_millis(100),
            max_flush_inflight: 8,
            max_buffered_bytes: 128 << 20,
            flush_when_idle: false,
            ..WriterOptions::local()
        }
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |m: &str| Err(crate::Error::InvalidParam(m.to_string()));
        if self.max_entries == 0 || self.max_bytes == 0 || self.max_flush_inflight == 0 {
            return bad("max_entries, max_bytes and max_flush_inflight must be positive");
        }
        if self.max_entry_bytes == 0 || self.max_entry_bytes > 1 << 30 {
            return bad("max_entry_bytes must be in 1..=1 GiB");
        }
        if self.max_bytes > 1 << 30 {
            return bad("max_bytes must be at most 1 GiB");
        }
        if self.max_buffered_bytes < self.max_entry_bytes
            || self.max_buffered_bytes > u32::MAX as usize
        {
            return bad("max_buffered_bytes must be at least max_entry_bytes and below 4 GiB");
        }
        Ok(())
    }
}

/// Retention of one stream, set at `create`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamConfig {
    /// Truncate fragments whose newest entry is older than this.
    pub retention_age: Option<Duration>,
    /// Truncate the oldest fragments while what stays stores at least this many bytes (as
    /// Kafka's `retention.bytes`: the newest bytes up to this much are never dropped, and
    /// the stream keeps less than this plus one fragment).
    pub retention_bytes: Option<u64>,
}

/// A blocking journal sync, handed to a [`SyncRunner`].
pub type BlockingSync = Box<dyn FnOnce() -> crate::Result<()> + Send>;

/// Runs the journal's syncs under [`Journal::Always`](crate::Journal::Always), each of which
/// blocks for as long as the disk takes. The default runs each on tokio's blocking pool; a
/// server may run them where a thread hand-off costs less (for instance on a runtime worker
/// that has run out of work).
pub trait SyncRunner: Send + Sync + 'static {
    /// How many syncs one writer may have queued or in flight at once, asked before each
    /// journal append (entries sent while the limit is reached wait for the next sync, which
    /// covers them all). The default is one. A runner that runs its syncs one after the other,
    /// and later than they were queued, may take more: the first then covers every append made
    /// before it ran, and the others find nothing to sync.
    ///
    /// Why one by default: a second sync queued while the first is under way leads the next
    /// group commit of the journal's WAL, which first waits, yielding the CPU in a loop, for as
    /// many syncers as its last sync released, and those come only after the acks: CPU spent
    /// for nothing.
    fn queued_syncs(&self) -> usize {
        1
    }

    /// Runs `sync` and resolves with its outcome.
    fn run(
        &self,
        sync: BlockingSync,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::Result<()>> + Send>>;
}

/// [`SyncRunner`]'s default: tokio's blocking pool.
#[derive(Debug)]
pub(crate) struct BlockingPool;

impl SyncRunner for BlockingPool {
    fn run(
        &self,
        sync: BlockingSync,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::Result<()>> + Send>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(sync).await.unwrap_or_else(|e| {
                Err(crate::Error::InvalidParam(format!("journal sync failed: {e}")))
            })
        })
    }
}

/// Options of a [`Streams`](crate::Streams) store.
#[derive(Clone)]
pub struct Options {
    pub(crate) storage: Storage,
    pub(crate) prefix: String,
    pub(crate) writer: Option<WriterOptions>,
    pub(crate) cache_bytes: usize,
    pub(crate) max_retries: u32,
    pub(crate) retry_backoff: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) maintenance_interval: Option<Duration>,
    pub(crate) apply_retention: bool,
    pub(crate) merge_below: u64,
    pub(crate) merge_target: u64,
    pub(crate) journal: crate::Journal,
    pub(crate) sync_runner: std::sync::Arc<dyn SyncRunner>,
    pub(crate) outage_limit: Duration,
    pub(crate) backlog_limit: u64,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("storage", &self.storage)
            .field("prefix", &self.prefix)
            .field("writer", &self.writer)
            .field("cache_bytes", &self.cache_bytes)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("request_timeout", &self.request_timeout)
            .field("maintenance_interval", &self.maintenance_interval)
            .field("apply_retention", &self.apply_retention)
            .field("merge_below", &self.merge_below)
            .field("merge_target", &self.merge_target)
            .field("journal", &self.journal)
            .field("outage_limit", &self.outage_limit)
            .field("backlog_limit", &self.backlog_limit)
            .finish_non_exhaustive()
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            storage: Storage::Local,
            prefix: "streams".into(),
            writer: None,
            cache_bytes: 256 << 20,
            max_retries: 8,
            retry_backoff: Duration::from_millis(20),
            request_timeout: Duration::from_secs(30),
            maintenance_interval: Some(Duration::from_secs(10)),
            apply_retention: true,
            merge_below: 256 << 10,
            merge_target: 8 << 20,
            journal: crate::Journal::Off,
            sync_runner: std::sync::Arc::new(BlockingPool),
            outage_limit: Duration::from_secs(30),
            backlog_limit: 1 << 30,
        }
    }
}

impl Options {
    /// With a journal, how long the object store may fail before appends are refused, and how
    /// many journaled bytes may wait for it before they are (defaults: 30 s, 1 GiB).
    ///
    /// With a journal an append is acknowledged once journaled, so a store that cannot be
    /// reached does not stop appends at once: their fragments are uploaded when it is back,
    /// retried with backoff meanwhile. Past either limit, `send` fails with
    /// [`Error::StoreUnavailable`](crate::Error::StoreUnavailable) (retryable; the writer stays
    /// usable) until an upload succeeds again. Without a journal appends wait for their
    /// fragments, and fail once the store's retries (`retries`, `request_timeout`) run out.
    pub fn outage_limits(mut self, outage: Duration, backlog_bytes: u64) -> Self {
        self.outage_limit = outage;
        self.backlog_limit = backlog_bytes;
        self
    }

    /// Where fragments live (default: local files).
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// Key prefix of every object (default `streams`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Default options of writers (default: [`WriterOptions::local`] or
    /// [`WriterOptions::object_storage`] by backend).
    pub fn writer(mut self, writer: WriterOptions) -> Self {
        self.writer = Some(writer);
        self
    }

    /// Memory limit of the fragment cache shared by all readers (default 256 MiB).
    pub fn cache_bytes(mut self, bytes: usize) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// Attempts after a failed object store call, and the first backoff (doubling, capped at
    /// 2 s). Defaults: 8 and 20 ms.
    pub fn retries(mut self, max_retries: u32, backoff: Duration) -> Self {
        self.max_retries = max_retries;
        self.retry_backoff = backoff;
        self
    }

    /// Time limit of one object store call (default 30 s); a call that takes longer is retried.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How often the background task applies retention, collects garbage and merges small
    /// fragments (default 10 s; `None` turns it off; [`Streams::maintain`](crate::Streams::maintain)
    /// runs it by hand).
    pub fn maintenance_interval(mut self, every: Option<Duration>) -> Self {
        self.maintenance_interval = every;
        self
    }

    /// Whether maintenance truncates streams as their retention allows (default on). Off where
    /// something else decides where streams are cut: a replicated store's leader reads the
    /// cuts with [`Streams::retention_cuts`](crate::Streams::retention_cuts) and replicates
    /// the truncations, so that every copy drops the same entries (each copy's fragments end
    /// at ids of their own, and its clock is its own).
    pub fn apply_retention(mut self, on: bool) -> Self {
        self.apply_retention = on;
        self
    }

    /// Fragments of sealed segments smaller than `below` bytes are merged into fragments of up to
    /// `target` bytes (defaults 256 KiB and 8 MiB; `below = 0` turns merging off).
    pub fn merge(mut self, below: u64, target: u64) -> Self {
        self.merge_below = below;
        self.merge_target = target;
        self
    }

    /// Acknowledge entries once a shared journal holds them (default [`Journal::Off`]: once
    /// their fragment is written and recorded). With a journal, writers cut fragments from the
    /// journaled entries later, by size or age (default writer options then cut after 1 s
    /// rather than at once), and many small acknowledged groups cost one journal append each
    /// instead of one fragment each.
    ///
    /// [`Journal::Off`]: crate::Journal::Off
    pub fn journal(mut self, journal: crate::Journal) -> Self {
        self.journal = journal;
        self
    }

    /// Where journal syncs run under [`Journal::Always`](crate::Journal::Always) (default: on
    /// tokio's blocking pool, one task per sync).
    pub fn sync_runner(mut self, runner: std::sync::Arc<dyn SyncRunner>) -> Self {
        self.sync_runner = runner;
        self
    }

    pub(crate) fn writer_options(&self) -> WriterOptions {
        self.writer.clone().unwrap_or_else(|| {
            let w = if self.storage.is_local() {
                WriterOptions::local()
            } else {
                WriterOptions::object_storage()
            };
            match self.journal {
                crate::Journal::Off => w,
                _ => WriterOptions { max_interval: Duration::from_secs(1), ..w },
            }
        })
    }
}
