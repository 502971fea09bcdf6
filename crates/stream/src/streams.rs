//! [`Streams`]: the store of named log streams in one directory, its public handle: metadata in
//! a timber KV engine under `<dir>/meta`, fragments in the configured object store, one fragment
//! cache (all in [`Shared`]). `open` replays the journal (`replay`), collects garbage and starts
//! the maintenance task (`maintenance`); writers and readers are `writer` and `reader`.
//!
//! Invariant: an object is deleted only after no metadata refers to it (truncate and delete
//! unrecord first, then delete).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::cache::{Cache, CacheStats};
use crate::error::{Error, Result};
use crate::journal::{Journal, JournalLog};
use crate::maintenance::{collect_garbage, maintain, maintain_every};
use crate::meta::{Meta, StreamMeta};
use crate::options::{Options, StreamConfig, WriterOptions};
use crate::reader::{Start, StreamReader};
use crate::replay::replay_journal;
use crate::shared::{truncate, Shared};
use crate::store::Store;
use crate::writer::StreamWriter;

/// A stream as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The name.
    pub name: String,
    /// The first readable entry id (everything below was truncated).
    pub first_id: u64,
    /// One past the last durable entry id; `first_id == next_id` when empty.
    pub next_id: u64,
    /// Bytes of stored fragments.
    pub bytes: u64,
    /// The current writer epoch (0 if no writer ever opened).
    pub epoch: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Retention settings.
    pub config: StreamConfig,
}

/// A segment as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Segment id, dense per stream.
    pub id: u64,
    /// First entry id in the segment.
    pub first_id: u64,
    /// One past the last entry id; equal to `first_id` when empty.
    pub end_id: u64,
    /// Sealed segments never change again (except by merging fragments).
    pub sealed: bool,
    /// Bytes of its fragments.
    pub bytes: u64,
    /// Number of fragments.
    pub fragments: u64,
}

/// A stream's figures, with entries and truncations the journal holds beyond its records.
fn current_info(sh: &Shared, s: &StreamMeta) -> StreamInfo {
    let mut i = info(s);
    if let Some(b) = sh.bounds(s.id) {
        i.next_id = i.next_id.max(b.next);
        i.first_id = i.first_id.max(b.first).min(i.next_id);
    }
    i
}

fn info(s: &StreamMeta) -> StreamInfo {
    StreamInfo {
        name: s.name.clone(),
        first_id: s.first_id,
        next_id: s.next_id,
        bytes: s.bytes,
        epoch: s.epoch,
        created_ms: s.created_ms,
        config: s.config,
    }
}

/// Where a store's fragments live, and whether that store is answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// `local`, `s3` or `custom`.
    pub backend: &'static str,
    /// The store: path, or endpoint, bucket and prefix (never a credential).
    pub store: String,
    /// How long uploads have been failing (`None`: the store answers).
    pub unavailable_for: Option<std::time::Duration>,
    /// The last error while it fails.
    pub last_error: Option<String>,
    /// Bytes acknowledged from the journal and not yet in the store.
    pub journal_backlog_bytes: u64,
}

/// A store of named, append-only log streams.
#[derive(Debug, Clone)]
pub struct Streams {
    pub(crate) shared: Arc<Shared>,
}

impl Streams {
    /// Opens (creating if needed) the stream store in `dir`, then removes fragments that a crash
    /// left unrecorded. Must run inside a Tokio runtime.
    pub async fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Streams> {
        let dir: PathBuf = dir.as_ref().to_path_buf();
        opts.writer_options().validate()?;
        // Metadata first: its lock keeps a second store off this directory.
        let meta_dir = dir.join("meta");
        let meta = tokio::task::spawn_blocking(move || Meta::open(&meta_dir))
            .await
            .map_err(|e| Error::InvalidParam(format!("metadata task failed: {e}")))??;
        let store = Store::open(&dir, &opts)?;
        if store.is_remote() {
            // A wrong endpoint, bucket or credential fails here, in words, rather than at the
            // first upload.
            store.probe().await?;
        }
        // A journal left by a store opened with one is replayed even if this one has none.
        let journal_dir = dir.join("journal");
        let mode = match opts.journal {
            Journal::Off if journal_dir.exists() => Some(Journal::Manual),
            Journal::Off => None,
            j => Some(j),
        };
        let journal = match mode {
            Some(mode) => Some(
                tokio::task::spawn_blocking(move || JournalLog::open(&journal_dir, mode))
                    .await
                    .map_err(|e| Error::InvalidParam(format!("journal task failed: {e}")))??,
            ),
            None => None,
        };
        let shared = Arc::new(Shared {
            meta,
            store,
            cache: Cache::new(opts.cache_bytes),
            opts,
            tails: Mutex::default(),
            journal,
            journaled: Mutex::default(),
            writers: Mutex::default(),
            maintenance: tokio::sync::Mutex::new(()),
        });
        for s in shared.meta.streams()? {
            shared.add_watch(&s);
        }
        replay_journal(&shared).await?;
        if shared.opts.journal == Journal::Off {
            // Replayed and empty: this store runs without it.
            if let Some(j) = &shared.journal {
                j.close()?;
            }
        }
        let streams = Streams { shared };
        collect_garbage(&streams.shared).await?;
        if let Some(every) = streams.shared.opts.maintenance_interval {
            tokio::spawn(maintain_every(Arc::downgrade(&streams.shared), every));
        }
        Ok(streams)
    }

    /// Where fragments live, whether that store answers, and what waits for it.
    pub fn store_status(&self) -> StoreStatus {
        let sh = &self.shared;
        let failing = sh.store.health().failing();
        let backend = match sh.opts.storage {
            crate::options::Storage::Local => "local",
            crate::options::Storage::S3(_) => "s3",
            crate::options::Storage::Custom(_) => "custom",
        };
        let backlog = sh.backlog_bytes();
        metrics::gauge!("timber_stream_journal_backlog_bytes").set(backlog as f64);
        metrics::gauge!("timber_stream_store_unavailable_seconds")
            .set(failing.as_ref().map_or(0.0, |(t, _)| t.elapsed().as_secs_f64()));
        StoreStatus {
            backend,
            store: sh.store.describe().to_string(),
            unavailable_for: failing.as_ref().map(|(t, _)| t.elapsed()),
            last_error: failing.map(|(_, e)| e),
            journal_backlog_bytes: backlog,
        }
    }

    /// Creates a stream.
    pub async fn create(&self, name: &str, config: StreamConfig) -> Result<StreamInfo> {
        self.create_at(name, config, 0).await
    }

    /// Creates a stream whose first entry gets id `first_id`, as if `first_id` entries had
    /// been appended and truncated: how a replica recreates a stream whose oldest entries were
    /// dropped.
    pub async fn create_at(
        &self,
        name: &str,
        config: StreamConfig,
        first_id: u64,
    ) -> Result<StreamInfo> {
        let name = name.to_string();
        let s = self.shared.blocking(move |sh| sh.meta.create(&name, config, first_id)).await?;
        self.shared.add_watch(&s);
        Ok(info(&s))
    }

    /// A stream's figures.
    pub fn info(&self, name: &str) -> Result<StreamInfo> {
        Ok(current_info(&self.shared, &self.shared.meta.stream_by_name(name)?))
    }

    /// Every stream, by id (creation order).
    pub fn list(&self) -> Result<Vec<StreamInfo>> {
        Ok(self.shared.meta.streams()?.iter().map(|s| current_info(&self.shared, s)).collect())
    }

    /// The segments of a stream.
    pub fn segments(&self, name: &str) -> Result<Vec<SegmentInfo>> {
        let s = self.shared.meta.stream_by_name(name)?;
        let frags = self.shared.meta.fragments(s.id, 0)?;
        let segs = self.shared.meta.segments(s.id)?;
        Ok(segs
            .into_iter()
            .map(|g| SegmentInfo {
                id: g.id,
                first_id: g.first_id,
                end_id: g.end_id,
                sealed: g.sealed,
                bytes: g.bytes,
                fragments: frags.iter().filter(|f| f.segment == g.id).count() as u64,
            })
            .collect())
    }

    /// Opens the writer of a stream with the store's default writer options. The previous
    /// writer, if any, is fenced: its next flush fails with [`Error::Fenced`].
    pub async fn writer(&self, name: &str) -> Result<StreamWriter> {
        self.writer_with(name, self.shared.opts.writer_options()).await
    }

    /// Opens the writer of a stream with its own options.
    pub async fn writer_with(&self, name: &str, opts: WriterOptions) -> Result<StreamWriter> {
        opts.validate()?;
        let n = name.to_string();
        let s = self.shared.blocking(move |sh| sh.meta.open_writer(&n)).await?;
        self.shared.writer_opened(s.id, s.epoch);
        self.shared.publish(&s);
        Ok(StreamWriter::start(self.shared.clone(), s, opts))
    }

    /// Opens a reader of a stream.
    pub fn reader(&self, name: &str, start: Start) -> Result<StreamReader> {
        let s = self.shared.meta.stream_by_name(name)?;
        StreamReader::open(self.shared.clone(), &s, start)
    }

    /// Drops every entry below `before` (clamped to the end of the stream). Whole fragments
    /// below it are deleted from storage; reading a dropped id gives [`Error::Truncated`].
    pub async fn truncate(&self, name: &str, before: u64) -> Result<StreamInfo> {
        let s = truncate(&self.shared, name, before).await?;
        Ok(current_info(&self.shared, &s))
    }

    /// Deletes a stream and all its fragments. Its writer fails at its next flush, its readers
    /// with [`Error::NotFound`].
    pub async fn delete(&self, name: &str) -> Result<()> {
        let n = name.to_string();
        let id = self.shared.blocking(move |sh| sh.meta.delete(&n)).await?;
        self.shared.tails.lock().remove(&id);
        if let Some(t) = self.shared.journaled.lock().remove(&id) {
            t.lock().deleted = true;
        }
        self.shared.cache.remove_where(|o| o.stream == id);
        for o in self.shared.store.list(Some(id)).await? {
            self.shared.store.delete(&o.location).await?;
        }
        Ok(())
    }

    /// Figures of the fragment cache.
    pub fn cache_stats(&self) -> CacheStats {
        self.shared.cache.stats()
    }

    /// Runs one round of maintenance now: retention, garbage collection, merging.
    pub async fn maintain(&self) -> Result<()> {
        maintain(&self.shared).await
    }

    /// Where each stream's retention would cut it now: `(name, before)` for every stream that
    /// holds entries its retention lets go, `before` being the first id to keep (a fragment
    /// boundary of this store). What maintenance truncates unless
    /// [`Options::apply_retention`](crate::Options::apply_retention) is off.
    pub fn retention_cuts(&self) -> Result<Vec<(String, u64)>> {
        crate::maintenance::retention_cuts(&self.shared)
    }

    /// Syncs and closes the metadata engine. Writers and readers still open fail afterwards.
    pub async fn close(self) -> Result<()> {
        self.shared
            .blocking(|sh| {
                if let Some(j) = &sh.journal {
                    j.close()?;
                }
                sh.meta.close()
            })
            .await
    }
}
