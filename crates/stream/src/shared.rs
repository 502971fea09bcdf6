//! [`Shared`]: what a store's handle, writers, readers and background task share (metadata,
//! object store, fragment cache, journal, one watch channel per stream), and the operations
//! they have in common: publishing a stream's readable range, loading fragments through the
//! cache, forgetting unrecorded fragments, truncating.
//!
//! Invariants: readers learn about new entries and truncations through their stream's watch
//! channel, published after the metadata write (or journal record) that made them true, and the
//! published range only grows; an object is deleted only after no metadata refers to it
//! (truncation unrecords first, then deletes).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::fragment::{self, Fragment};
use crate::journal::{Journal, JournalLog, Tail};
use crate::meta::{FragmentMeta, Meta, StreamMeta};
use crate::options::Options;
use crate::store::{is_not_found, ObjectId, Store};

/// What readers watch: the readable range `[first, next)` of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub(crate) first: u64,
    pub(crate) next: u64,
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
    pub(crate) tails: Mutex<HashMap<u64, watch::Sender<Bounds>>>,
    /// The journal, if the store has one or an earlier one left one to replay.
    pub(crate) journal: Option<JournalLog>,
    /// With a journal: each stream's journaled entries that no recorded fragment holds yet.
    pub(crate) journaled: Mutex<HashMap<u64, Arc<Mutex<Tail>>>>,
    /// Live writers of this process: stream -> epoch.
    pub(crate) writers: Mutex<HashMap<u64, u64>>,
    pub(crate) maintenance: tokio::sync::Mutex<()>,
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

    /// Bytes journaled and not yet in a recorded fragment, over every stream.
    pub(crate) fn backlog_bytes(&self) -> u64 {
        let tails: Vec<_> = self.journaled.lock().values().cloned().collect();
        tails.iter().map(|t| t.lock().bytes()).sum()
    }

    /// Whether a journaled append may be accepted: not while the store has been failing for
    /// longer than the outage limit, or more than the backlog limit waits for it.
    pub(crate) fn check_available(&self) -> Result<()> {
        match self.unavailable() {
            Some(Error::StoreUnavailable { since, backlog_bytes, .. })
                if since < self.opts.outage_limit && backlog_bytes < self.opts.backlog_limit =>
            {
                Ok(())
            }
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// [`Error::StoreUnavailable`] if the store is failing now.
    pub(crate) fn unavailable(&self) -> Option<Error> {
        let (since, reason) = self.store.health().failing()?;
        Some(Error::StoreUnavailable {
            store: self.store.describe().to_string(),
            since: since.elapsed(),
            backlog_bytes: self.backlog_bytes(),
            reason,
        })
    }

    /// The watch channel of a stream; `None` once it was deleted.
    pub(crate) fn watch(&self, stream: u64) -> Option<watch::Receiver<Bounds>> {
        self.tails.lock().get(&stream).map(|tx| tx.subscribe())
    }

    pub(crate) fn add_watch(&self, s: &StreamMeta) {
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
    pub(crate) fn raise(&self, stream: u64, first: u64, next: u64) {
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
    pub(crate) fn bounds(&self, stream: u64) -> Option<Bounds> {
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

/// Moves the truncation point, tells readers, and deletes the fragments it unrecorded. With a
/// journal, a truncation point above the recorded entries is journaled and recorded once they
/// are.
pub(crate) async fn truncate(sh: &Arc<Shared>, name: &str, before: u64) -> Result<StreamMeta> {
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
