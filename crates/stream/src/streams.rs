//! [`Streams`]: the store of named log streams in one directory: metadata in a timber KV engine
//! under `<dir>/meta`, fragments in the configured object store, one fragment cache, and the
//! maintenance task (retention, garbage collection, merging of small fragments).
//!
//! Invariants: an object is deleted only after no metadata refers to it (truncate, delete and
//! merge unrecord first, then delete); garbage collection deletes only objects that no metadata
//! refers to and that no live writer of this process may still record; readers learn about new
//! entries and truncations through one watch channel per stream, published after the metadata
//! write that made them true.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::cache::{Cache, CacheStats};
use crate::error::{Error, Result};
use crate::fragment::{self, Fragment};
use crate::journal::{Journal, JournalLog, Record, Tail};
use crate::meta::{now_ms, FragmentMeta, Meta, StreamMeta};
use crate::options::{Options, StreamConfig, WriterOptions};
use crate::reader::{Start, StreamReader};
use crate::store::{is_not_found, ObjectId, Store};
use crate::writer::StreamWriter;

/// What readers watch: the readable range `[first, next)` of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub(crate) first: u64,
    pub(crate) next: u64,
}

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

impl Shared {
    /// A stream's figures, with entries and truncations the journal holds beyond its records.
    fn info(&self, s: &StreamMeta) -> StreamInfo {
        let mut i = info(s);
        if let Some(b) = self.bounds(s.id) {
            i.next_id = i.next_id.max(b.next);
            i.first_id = i.first_id.max(b.first).min(i.next_id);
        }
        i
    }
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

pub(crate) fn object_id(stream: u64, f: &FragmentMeta) -> ObjectId {
    ObjectId { stream, segment: f.segment, first_id: f.first_id, end_id: f.end_id, epoch: f.epoch }
}

/// State shared by the store, its writers, readers and background task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) meta: Meta,
    pub(crate) store: Store,
    pub(crate) cache: Cache,
    pub(crate) opts: Options,
    tails: Mutex<HashMap<u64, watch::Sender<Bounds>>>,
    /// The journal, if the store has one or an earlier one left one to replay.
    journal: Option<JournalLog>,
    /// With a journal: each stream's journaled entries that no recorded fragment holds yet.
    journaled: Mutex<HashMap<u64, Arc<Mutex<Tail>>>>,
    /// Live writers of this process: stream -> epoch.
    writers: Mutex<HashMap<u64, u64>>,
    maintenance: tokio::sync::Mutex<()>,
}

impl Shared {
    /// Runs blocking metadata work off the async workers.
    pub(crate) async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Shared) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| Error::InvalidParam(format!("metadata task failed: {e}")))?
    }

    /// The watch channel of a stream; `None` once it was deleted.
    pub(crate) fn watch(&self, stream: u64) -> Option<watch::Receiver<Bounds>> {
        self.tails.lock().get(&stream).map(|tx| tx.subscribe())
    }

    fn add_watch(&self, s: &StreamMeta) {
        self.tails
            .lock()
            .entry(s.id)
            .or_insert_with(|| watch::channel(Bounds { first: s.first_id, next: s.next_id }).0);
    }

    /// Tells readers about a metadata write. Bounds only grow, so a late publish of an older
    /// state changes nothing.
    pub(crate) fn publish(&self, s: &StreamMeta) {
        self.raise(s.id, s.first_id, s.next_id);
    }

    /// Raises the readable range of a stream to at least `[first, next)`.
    fn raise(&self, stream: u64, first: u64, next: u64) {
        if let Some(tx) = self.tails.lock().get(&stream) {
            tx.send_if_modified(|b| {
                let new = Bounds { first: b.first.max(first), next: b.next.max(next) };
                std::mem::replace(b, new) != new
            });
        }
    }

    /// The journal writers use, if the store has one.
    pub(crate) fn journal(&self) -> Option<&JournalLog> {
        self.journal.as_ref().filter(|_| self.opts.journal != Journal::Off)
    }

    /// Tells readers that entries up to `next` are durable in the journal.
    pub(crate) fn publish_next(&self, stream: u64, next: u64) {
        self.raise(stream, 0, next);
    }

    /// The readable range of a stream as last published.
    fn bounds(&self, stream: u64) -> Option<Bounds> {
        self.tails.lock().get(&stream).map(|tx| *tx.borrow())
    }

    /// The journaled tail of a stream (made empty at `first` if it has none).
    pub(crate) fn tail(&self, stream: u64, first: u64) -> Arc<Mutex<Tail>> {
        self.journaled
            .lock()
            .entry(stream)
            .or_insert_with(|| Arc::new(Mutex::new(Tail::new(first))))
            .clone()
    }

    /// Journaled entries from `pos` (below `limit`) that no recorded fragment holds yet, as a
    /// fragment in memory; `None` if the tail does not hold `pos`.
    pub(crate) fn tail_chunk(&self, stream: u64, pos: u64, limit: u64) -> Option<Fragment> {
        let tail = self.journaled.lock().get(&stream)?.clone();
        let t = tail.lock();
        if !t.holds(pos) || pos >= limit {
            return None;
        }
        let entries = t.range(pos, limit, 4096, 1 << 20);
        Some(Fragment::of_entries(stream, pos, &entries))
    }

    /// Truncates the journal up to the oldest record a tail still needs, when that frees
    /// enough. Blocking.
    pub(crate) fn release_journal(&self) -> Result<()> {
        let Some(j) = self.journal() else { return Ok(()) };
        // The next sequence number is read first: a record appended after it is above it.
        let next = j.next_seq();
        let oldest = self.journaled.lock().values().filter_map(|t| t.lock().oldest_record()).min();
        j.release(oldest.unwrap_or(next).min(next), false)
    }

    pub(crate) fn writer_opened(&self, stream: u64, epoch: u64) {
        self.writers.lock().insert(stream, epoch);
    }

    pub(crate) fn writer_closed(&self, stream: u64, epoch: u64) {
        let mut w = self.writers.lock();
        if w.get(&stream) == Some(&epoch) {
            w.remove(&stream);
        }
    }

    /// Loads a fragment through the cache.
    pub(crate) async fn fragment(&self, stream: u64, f: &FragmentMeta) -> Result<Arc<Fragment>> {
        let id = object_id(stream, f);
        let store = &self.store;
        self.cache
            .get_or_load(id, || async move {
                let p = store.path(&id);
                let data = store.get(&p).await?;
                metrics::counter!("timber_stream_read_bytes_total").increment(data.len() as u64);
                let frag = fragment::decode(p.as_ref(), &data)?;
                if frag.stream != id.stream
                    || frag.segment != id.segment
                    || frag.first_id != id.first_id
                    || frag.end_id() != id.end_id
                {
                    return Err(Error::Corrupt {
                        object: p.to_string(),
                        reason: format!(
                            "holds stream {} segment {} entries {}..{}, not what its key says",
                            frag.stream,
                            frag.segment,
                            frag.first_id,
                            frag.end_id()
                        ),
                    });
                }
                Ok(Arc::new(frag))
            })
            .await
    }

    /// Loads the fragment holding `entry` of a stream, following merges. `Ok(None)` if the entry
    /// is no longer recorded (truncated).
    pub(crate) async fn fragment_for(
        &self,
        stream: u64,
        entry: u64,
    ) -> Result<Option<(FragmentMeta, Arc<Fragment>)>> {
        let mut attempts = 0;
        loop {
            let Some(f) = self.meta.fragment_for(stream, entry)? else { return Ok(None) };
            match self.fragment(stream, &f).await {
                Ok(frag) => return Ok(Some((f, frag))),
                // Merged or truncated between the lookup and the read: look again.
                Err(e) if is_not_found(&e) && attempts < 3 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }
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

    /// Creates a stream.
    pub async fn create(&self, name: &str, config: StreamConfig) -> Result<StreamInfo> {
        let name = name.to_string();
        let s = self.shared.blocking(move |sh| sh.meta.create(&name, config)).await?;
        self.shared.add_watch(&s);
        Ok(info(&s))
    }

    /// A stream's figures.
    pub fn info(&self, name: &str) -> Result<StreamInfo> {
        Ok(self.shared.info(&self.shared.meta.stream_by_name(name)?))
    }

    /// Every stream, by id (creation order).
    pub fn list(&self) -> Result<Vec<StreamInfo>> {
        Ok(self.shared.meta.streams()?.iter().map(|s| self.shared.info(s)).collect())
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
        Ok(self.shared.info(&s))
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

/// Moves the truncation point, tells readers, and deletes the fragments it unrecorded. With a
/// journal, a truncation point above the recorded entries is journaled and recorded once they
/// are.
async fn truncate(sh: &Arc<Shared>, name: &str, before: u64) -> Result<StreamMeta> {
    let n = name.to_string();
    let (s, gone) = sh.blocking(move |sh| sh.meta.truncate(&n, before)).await?;
    sh.publish(&s);
    forget(sh, s.id, &gone).await;
    let tail = sh.journaled.lock().get(&s.id).cloned();
    let (true, Some(tail)) = (sh.journal().is_some(), tail) else { return Ok(s) };
    let end = sh.bounds(s.id).map_or(s.next_id, |b| b.next);
    let before = before.min(end);
    if before <= s.next_id {
        return Ok(s);
    }
    let id = s.id;
    let journaled = sh
        .blocking(move |sh| {
            let j = sh.journal().expect("checked");
            {
                let mut t = tail.lock();
                if before <= t.truncate {
                    return Ok(false);
                }
                let seq = j.append_truncate(id, before)?;
                t.push_truncate(before, seq);
            }
            if j.synced() {
                j.sync()?;
            }
            Ok(true)
        })
        .await?;
    if journaled {
        sh.raise(s.id, before, 0);
    }
    Ok(s)
}

/// Writes out as fragments whatever the journal holds beyond each stream's recorded entries,
/// records them, applies journaled truncations, and empties the journal.
async fn replay_journal(sh: &Arc<Shared>) -> Result<()> {
    if sh.journal.is_none() {
        return Ok(());
    }
    struct Replay {
        name: String,
        next: u64,
        entries: Vec<Bytes>,
        truncate: u64,
    }
    let records = sh.blocking(|sh| sh.journal.as_ref().expect("checked").records()).await?;
    let mut streams: std::collections::BTreeMap<u64, Replay> = Default::default();
    for (seq, r) in records {
        let id = match &r {
            Record::Entries { stream, .. } | Record::Truncate { stream, .. } => *stream,
        };
        let st = match streams.entry(id) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                // Ids are never reused: records of a deleted stream are skipped.
                let Some(s) = sh.meta.stream(id)? else { continue };
                v.insert(Replay { name: s.name, next: s.next_id, entries: Vec::new(), truncate: 0 })
            }
        };
        match r {
            Record::Entries { first, entries, .. } => {
                let end = first + entries.len() as u64;
                if end <= st.next {
                    continue;
                }
                if first > st.next {
                    return Err(Error::Corrupt {
                        object: format!("stream journal record {seq}"),
                        reason: format!(
                            "entries of stream {:?} start at {first}, but the stream ends at {}",
                            st.name, st.next
                        ),
                    });
                }
                let skip = (st.next - first) as usize;
                st.entries.extend(entries.into_iter().skip(skip));
                st.next = end;
            }
            Record::Truncate { before, .. } => st.truncate = st.truncate.max(before),
        }
    }
    let wo = sh.opts.writer_options();
    for (id, r) in streams {
        if !r.entries.is_empty() {
            let name = r.name.clone();
            let s = sh.blocking(move |sh| sh.meta.open_writer(&name)).await?;
            let segment = s.open_segment.expect("a new writer has an open segment");
            let mut first = s.next_id;
            let mut metas = Vec::new();
            for chunk in chunks(&r.entries, wo.max_entries, wo.max_bytes) {
                let data = fragment::encode(id, segment, first, chunk, wo.lz4);
                let meta = FragmentMeta {
                    segment,
                    first_id: first,
                    end_id: first + chunk.len() as u64,
                    bytes: data.len() as u64,
                    created_ms: now_ms(),
                    epoch: s.epoch,
                };
                let path = sh.store.path(&object_id(id, &meta));
                if sh.store.put(&path, data).await? == crate::store::Put::Taken {
                    return Err(Error::Fenced { stream: r.name.clone(), epoch: s.epoch });
                }
                first = meta.end_id;
                metas.push(meta);
            }
            let (name, epoch) = (r.name.clone(), s.epoch);
            let s = sh
                .blocking(move |sh| {
                    let s = sh.meta.commit(id, &name, epoch, &metas)?;
                    sh.meta.close_writer(id, &name, epoch)?;
                    Ok(s)
                })
                .await?;
            sh.publish(&s);
            tracing::info!(stream = %r.name, entries = r.entries.len(), "journaled entries written out as fragments");
        }
        if r.truncate > 0 {
            truncate(sh, &r.name, r.truncate).await?;
        }
    }
    sh.blocking(|sh| {
        let j = sh.journal.as_ref().expect("checked");
        j.release(j.next_seq(), true)?;
        j.sync()
    })
    .await
}

/// Splits entries into the runs the writer would cut them into.
fn chunks(entries: &[Bytes], max_entries: usize, max_bytes: usize) -> Vec<&[Bytes]> {
    let mut out = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let n = crate::journal::fragment_len(rest.iter(), max_entries, max_bytes);
        let (run, tail) = rest.split_at(n);
        out.push(run);
        rest = tail;
    }
    out
}

/// Deletes the objects of unrecorded fragments and drops them from the cache. A failed delete
/// leaves an orphan for garbage collection.
pub(crate) async fn forget(sh: &Shared, stream: u64, gone: &[FragmentMeta]) {
    let ids: Vec<ObjectId> = gone.iter().map(|f| object_id(stream, f)).collect();
    sh.cache.remove_where(|o| ids.contains(o));
    for id in &ids {
        if let Err(e) = sh.store.delete(&sh.store.path(id)).await {
            tracing::warn!(error = %e, "deleting an unrecorded fragment failed; garbage collection will retry");
        }
    }
}

async fn maintain_every(shared: Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(sh) = shared.upgrade() else { return };
        if let Err(e) = maintain(&sh).await {
            if matches!(e, Error::Kv(timber_kv::Error::Closed)) {
                return;
            }
            tracing::warn!(error = %e, "stream maintenance failed");
        }
    }
}

async fn maintain(sh: &Arc<Shared>) -> Result<()> {
    apply_retention(sh).await?;
    collect_garbage(sh).await?;
    merge_small(sh).await
}

async fn apply_retention(sh: &Arc<Shared>) -> Result<()> {
    let now = now_ms();
    for s in sh.meta.streams()? {
        let (age, max_bytes) = (s.config.retention_age, s.config.retention_bytes);
        if age.is_none() && max_bytes.is_none() {
            continue;
        }
        let mut cut = s.first_id;
        let mut bytes = s.bytes;
        for f in sh.meta.fragments(s.id, s.first_id)? {
            let old = age.is_some_and(|a| f.created_ms.saturating_add(a.as_millis() as u64) < now);
            let big = max_bytes.is_some_and(|m| bytes > m);
            if !(old || big) {
                break;
            }
            bytes -= f.bytes.min(bytes);
            cut = f.end_id;
        }
        if cut > s.first_id {
            truncate(sh, &s.name, cut).await?;
        }
    }
    Ok(())
}

/// Deletes objects no metadata refers to: of deleted streams, below a truncation point, or
/// written but never recorded (a crash or a fenced writer between the put and the metadata
/// write). Objects a live writer of this process may still record are left alone. Returns the
/// number of objects deleted.
async fn collect_garbage(sh: &Shared) -> Result<u64> {
    let _g = sh.maintenance.lock().await;
    // List first, then read metadata: an object listed before its stream's records were read
    // is judged against records at least as new as the object.
    let objects = sh.store.list(None).await?;
    let streams: HashMap<u64, StreamMeta> =
        sh.meta.streams()?.into_iter().map(|s| (s.id, s)).collect();
    let mut deleted = 0;
    for o in objects {
        let Some(id) = sh.store.parse(&o.location) else { continue };
        let orphan = match streams.get(&id.stream) {
            None => true,
            Some(s) if id.end_id <= s.first_id => true,
            Some(s) => {
                let recorded = sh
                    .meta
                    .fragment_for(s.id, id.first_id)?
                    .is_some_and(|f| object_id(s.id, &f) == id);
                let live = sh.writers.lock().get(&s.id).is_some_and(|&epoch| id.epoch == epoch);
                !recorded && !live
            }
        };
        if orphan {
            tracing::info!(object = %o.location, "deleting unrecorded fragment");
            sh.store.delete(&o.location).await?;
            deleted += 1;
        }
    }
    metrics::counter!("timber_stream_gc_deleted_total").increment(deleted);
    Ok(deleted)
}

/// Merges runs of small fragments of sealed segments into larger ones (W6). Readers see the
/// same entries before, during and after.
async fn merge_small(sh: &Arc<Shared>) -> Result<()> {
    let (below, target) = (sh.opts.merge_below, sh.opts.merge_target);
    if below == 0 {
        return Ok(());
    }
    let _g = sh.maintenance.lock().await;
    let lz4 = sh.opts.writer_options().lz4;
    for s in sh.meta.streams()? {
        let sealed: Vec<u64> =
            sh.meta.segments(s.id)?.iter().filter(|g| g.sealed).map(|g| g.id).collect();
        if sealed.is_empty() {
            continue;
        }
        let frags = sh.meta.fragments(s.id, s.first_id)?;
        let mut groups: Vec<Vec<FragmentMeta>> = Vec::new();
        let mut run: Vec<FragmentMeta> = Vec::new();
        let mut flush = |run: &mut Vec<FragmentMeta>| {
            if run.len() >= 2 {
                groups.push(std::mem::take(run));
            }
            run.clear();
        };
        for f in frags {
            if !(sealed.contains(&f.segment) && f.bytes < below) {
                flush(&mut run);
                continue;
            }
            let run_bytes: u64 = run.iter().map(|r| r.bytes).sum();
            if run.last().is_some_and(|l| l.segment != f.segment || run_bytes + f.bytes > target) {
                flush(&mut run);
            }
            run.push(f);
        }
        flush(&mut run);
        for g in groups {
            merge_group(sh, s.id, &g, lz4).await?;
        }
    }
    Ok(())
}

async fn merge_group(
    sh: &Arc<Shared>,
    stream: u64,
    group: &[FragmentMeta],
    lz4: bool,
) -> Result<()> {
    let mut entries: Vec<Bytes> = Vec::new();
    for f in group {
        let frag = match sh.fragment(stream, f).await {
            Ok(frag) => frag,
            Err(e) if is_not_found(&e) => return Ok(()), // truncated meanwhile
            Err(e) => return Err(e),
        };
        for id in frag.first_id..frag.end_id() {
            entries.push(frag.get(id).expect("id in range"));
        }
    }
    let first = group[0];
    let last = group[group.len() - 1];
    let data = fragment::encode(stream, first.segment, first.first_id, &entries, lz4);
    let new = FragmentMeta {
        segment: first.segment,
        first_id: first.first_id,
        end_id: last.end_id,
        bytes: data.len() as u64,
        created_ms: last.created_ms,
        epoch: 0,
    };
    let path = sh.store.path(&object_id(stream, &new));
    if sh.store.put(&path, data).await? == crate::store::Put::Taken {
        return Err(Error::Corrupt {
            object: path.to_string(),
            reason: "a different object already holds the key of a merged fragment".into(),
        });
    }
    let old = group.to_vec();
    let replaced = sh.blocking(move |sh| sh.meta.replace(stream, &old, new)).await?;
    if replaced {
        metrics::counter!("timber_stream_merged_fragments_total").increment(group.len() as u64);
        forget(sh, stream, group).await;
    } else {
        sh.store.delete(&path).await?;
    }
    Ok(())
}
