//! The flusher: the task that turns a writer's buffers into fragments. [`Flusher`] holds its
//! state; this module seals buffers into fragments and starts their uploads (up to
//! `max_flush_inflight`), records finished uploads in metadata strictly in id order, one
//! metadata write at a time (`start_commit`), acknowledges what a write recorded (`finish`), and
//! fails the writer. The journal path is `journaling`, the task's loop `task`.
//!
//! Invariants: a slot is resolved Ok only after its fragment's object is durable AND the metadata
//! write recording it (checked against the writer's epoch) is synced; slots resolve in id order;
//! once an upload or commit fails, every entry not yet acknowledged fails with the error and
//! nothing more is recorded.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::fragment;
use crate::meta::{now_ms, FragmentMeta, StreamMeta};
use crate::options::WriterOptions;
use crate::shared::{object_id, Shared};
use crate::store::Put;

use super::ack::Pending;
use super::buffer::{take_buf, Batch, State, WriterShared, IDLE_INFLIGHT};

/// A fragment being written.
pub(super) struct Upload {
    pub(super) meta: FragmentMeta,
    pub(super) data: Bytes,
    pub(super) result: Result<Put>,
    pub(super) started: Instant,
}

/// A sealed fragment's bookkeeping, in id order beside `inflight` and `done`.
pub(super) struct Sealed {
    /// The slot its entries wait on (none with a journal: they were acknowledged when journaled).
    pub(super) pending: Option<Pending>,
    pub(super) since: Instant,
    pub(super) bytes: usize,
}

/// A commit's outcome: the stream as recorded, and fragments a journaled truncation unrecorded.
pub(super) type Committed = Result<(StreamMeta, Vec<FragmentMeta>)>;
pub(super) type CommitFuture = Pin<Box<dyn Future<Output = (Vec<Upload>, Committed)> + Send>>;

/// The journal side of a writer (when the store has a journal).
pub(super) struct JournalSide {
    /// The stream's tail, shared with readers and later writers.
    pub(super) tail: Arc<Mutex<crate::journal::Tail>>,
    /// Acks wait for the journal's sync.
    pub(super) synced: bool,
    /// Id of the next entry journaled.
    pub(super) next: u64,
    /// Journal syncs in flight, in order, beside `waiting`.
    pub(super) syncing: FuturesOrdered<Pin<Box<dyn Future<Output = Result<()>> + Send>>>,
    /// Per sync in flight: the slot it acknowledges, the end of its entries, when they were sent.
    pub(super) waiting: VecDeque<(Pending, u64, Instant)>,
    /// Bytes journaled and not yet sealed into a fragment, and since when.
    pub(super) uncut_bytes: usize,
    pub(super) uncut_since: Option<Instant>,
}

pub(super) struct Flusher {
    pub(super) shared: Arc<Shared>,
    /// Set when the writer fails: uploads retrying through an outage give up.
    pub(super) abandon: Arc<std::sync::atomic::AtomicBool>,
    pub(super) ws: Arc<WriterShared>,
    pub(super) name: Arc<str>,
    pub(super) stream: u64,
    pub(super) epoch: u64,
    pub(super) opts: WriterOptions,
    pub(super) segment: u64,
    pub(super) next_segment: u64,
    pub(super) seg_bytes: u64,
    pub(super) seg_started: Instant,
    /// First id of the next fragment sealed.
    pub(super) next_first: u64,
    /// Uploads in id order.
    pub(super) inflight: FuturesOrdered<Pin<Box<dyn Future<Output = Upload> + Send>>>,
    /// One per fragment sealed and not yet recorded, in id order.
    pub(super) sealed: VecDeque<Sealed>,
    /// Finished uploads waiting to be recorded, in id order.
    pub(super) done: Vec<Upload>,
    /// The metadata write in progress, if any.
    pub(super) commit: Option<CommitFuture>,
    /// Buffers of recorded fragments, reused for the next ones.
    pub(super) spare: Vec<BytesMut>,
    pub(super) journal: Option<JournalSide>,
    /// `timber_stream_append_seconds`, looked up in the metrics registry once rather than per
    /// batch.
    pub(super) append_seconds: metrics::Histogram,
}

impl Flusher {
    /// Takes the next batch to write, if one should be written now.
    pub(super) fn next_batch(&self, st: &mut State) -> Option<Batch> {
        if let Some(j) = &self.journal {
            // Journal at once, with at most `journal_syncs()` syncs in flight (group commit).
            if j.synced && st.journaling >= self.ws.journal_syncs() {
                return None;
            }
            return st.ready.pop_front().or_else(|| (!st.buf.is_empty()).then(|| take_buf(st)));
        }
        if st.inflight >= self.opts.max_flush_inflight {
            return None;
        }
        if let Some(b) = st.ready.pop_front() {
            return Some(b);
        }
        let due = !st.buf.is_empty()
            && (st.force
                || (self.opts.flush_when_idle && st.inflight < IDLE_INFLIGHT)
                || st.buf_since.is_some_and(|t| t.elapsed() >= self.opts.max_interval));
        due.then(|| take_buf(st))
    }

    /// Encodes entries into a fragment and starts writing it.
    pub(super) fn seal(
        &mut self,
        entries: Vec<Bytes>,
        bytes: usize,
        pending: Option<Pending>,
        since: Instant,
    ) {
        let count = entries.len() as u64;
        let first = self.next_first;
        self.next_first += count;
        if self.seg_bytes > 0
            && (self.seg_bytes >= self.opts.max_segment_bytes
                || self.seg_started.elapsed() >= self.opts.max_segment_age)
        {
            self.segment = self.next_segment;
            self.next_segment += 1;
            self.seg_bytes = 0;
            self.seg_started = Instant::now();
        }
        let buf = self.spare.pop().unwrap_or_default();
        let data =
            fragment::encode_into(buf, self.stream, self.segment, first, &entries, self.opts.lz4);
        drop(entries);
        self.seg_bytes += data.len() as u64;
        let meta = FragmentMeta {
            segment: self.segment,
            first_id: first,
            end_id: first + count,
            bytes: data.len() as u64,
            created_ms: now_ms(),
            epoch: self.epoch,
        };
        let store = self.shared.store.clone();
        let path = store.path(&object_id(self.stream, &meta));
        let started = Instant::now();
        // With a journal the entries are acknowledged already: an upload waits out an outage
        // of the store (the journal keeps them meanwhile). Without, its acks wait on it, and
        // it fails once the store's own retries run out.
        let through_outage = self.journal.is_some().then(|| self.abandon.clone());
        let put = tokio::spawn({
            let data = data.clone();
            async move {
                match through_outage {
                    Some(stop) => store.put_until_stored(&path, data, &stop).await,
                    None => store.put(&path, data).await,
                }
            }
        });
        self.inflight.push_back(Box::pin(async move {
            let result = match put.await {
                Ok(r) => r,
                Err(e) => Err(Error::InvalidParam(format!("fragment upload task failed: {e}"))),
            };
            Upload { meta, data, result, started }
        }));
        self.sealed.push_back(Sealed { pending, since, bytes });
    }

    /// Starts recording the finished uploads that were written; the first failed upload fails
    /// the writer once everything before it is recorded.
    pub(super) fn start_commit(&mut self) {
        let ok = self.done.iter().take_while(|u| matches!(u.result, Ok(Put::Stored))).count();
        if ok == 0 {
            let mut up = self.done.remove(0);
            let err = match std::mem::replace(&mut up.result, Ok(Put::Taken)) {
                // Another writer holds this fragment's key: this writer was fenced.
                Ok(_) => Error::Fenced { stream: self.name.to_string(), epoch: self.epoch },
                Err(e) => e,
            };
            self.fail_all(err);
            return;
        }
        let ups: Vec<Upload> = self.done.drain(..ok).collect();
        let metas: Vec<FragmentMeta> = ups.iter().map(|u| u.meta).collect();
        let (id, name, epoch) = (self.stream, self.name.clone(), self.epoch);
        let shared = self.shared.clone();
        let tail = self.journal.as_ref().map(|j| j.tail.clone());
        self.commit = Some(Box::pin(async move {
            let r = shared
                .blocking(move |sh| {
                    let s = sh.meta.commit(id, &name, epoch, &metas)?;
                    let Some(tail) = tail else { return Ok((s, Vec::new())) };
                    // A journaled truncation is recorded as far as the entries are, then the
                    // tail and the journal let go of what is recorded.
                    let truncate = tail.lock().truncate;
                    let (s, gone) = if truncate > s.first_id {
                        sh.meta.truncate(&name, truncate)?
                    } else {
                        (s, Vec::new())
                    };
                    tail.lock().release(s.next_id, s.first_id);
                    if let Err(e) = sh.release_journal() {
                        tracing::warn!(error = %e, "truncating the stream journal failed");
                    }
                    Ok((s, gone))
                })
                .await;
            (ups, r)
        }));
    }

    /// Acks the fragments a metadata write recorded, or fails the writer.
    pub(super) fn finish(&mut self, ups: Vec<Upload>, r: Committed) {
        let (s, gone) = match r {
            Ok(r) => r,
            Err(e) => {
                self.fail_all(e);
                return;
            }
        };
        self.shared.publish(&s);
        if !gone.is_empty() {
            let sh = self.shared.clone();
            tokio::spawn(async move { crate::shared::forget(&sh, s.id, &gone).await });
        }
        let n = ups.len();
        let readers = self.shared.cache.has_readers(self.stream);
        let mut freed = 0;
        let mut resolved = Vec::with_capacity(ups.len());
        for up in ups {
            let sealed = self.sealed.pop_front().expect("one sealed record per upload");
            metrics::histogram!("timber_stream_flush_seconds")
                .record(up.started.elapsed().as_secs_f64());
            if sealed.pending.is_some() {
                self.append_seconds.record(sealed.since.elapsed().as_secs_f64());
            }
            metrics::counter!("timber_stream_fragments_total").increment(1);
            metrics::counter!("timber_stream_appended_entries_total")
                .increment(up.meta.end_id - up.meta.first_id);
            metrics::counter!("timber_stream_appended_bytes_total").increment(up.data.len() as u64);
            if readers {
                if let Ok(f) = fragment::decode("", &up.data) {
                    self.shared.cache.insert(object_id(self.stream, &up.meta), Arc::new(f));
                }
            }
            freed += sealed.bytes;
            resolved.extend(sealed.pending);
            self.reclaim(up.data);
        }
        {
            let mut st = self.ws.state.lock();
            if self.journal.is_none() {
                st.committed = s.next_id;
            }
            st.unacked_bytes -= freed;
            st.inflight -= n;
        }
        for p in &resolved {
            p.0.resolve(Ok(()));
        }
        self.ws.room.notify_waiters();
    }

    /// Keeps the buffer of a recorded fragment for the next one, if nothing else holds it (the
    /// cache may, for readers at the tail).
    fn reclaim(&mut self, data: Bytes) {
        if self.spare.len() > self.opts.max_flush_inflight {
            return;
        }
        if let Ok(mut b) = data.try_into_mut() {
            if b.capacity() >= 64 << 10 {
                b.clear();
                self.spare.push(b);
            }
        }
    }

    /// Fails every entry not yet recorded (in flight, written, set aside, buffered) with `err`,
    /// and marks the writer failed: later sends and flushes get the error.
    fn fail_all(&mut self, err: Error) {
        self.fail(Arc::new(err));
    }

    /// [`Flusher::fail_all`] with a shared error. With a journal, the stream's tail keeps what
    /// was journaled (acknowledged): the next writer, or the next open, records it.
    pub(super) fn fail(&mut self, err: Arc<Error>) {
        tracing::warn!(stream = %self.name, epoch = self.epoch, error = %err, "stream writer failed");
        self.abandon.store(true, std::sync::atomic::Ordering::Release);
        self.inflight = FuturesOrdered::new();
        self.done.clear();
        let mut slots: Vec<Pending> = self.sealed.drain(..).filter_map(|s| s.pending).collect();
        if let Some(j) = &mut self.journal {
            j.syncing = FuturesOrdered::new();
            slots.extend(j.waiting.drain(..).map(|(p, _, _)| p));
            j.uncut_bytes = 0;
            j.uncut_since = None;
        }
        {
            let mut st = self.ws.state.lock();
            st.failed = Some(err.clone());
            st.inflight = 0;
            st.journaling = 0;
            st.unacked_bytes = 0;
            slots.extend(st.ready.drain(..).map(|b| b.pending));
            st.buf.clear();
            st.buf_bytes = 0;
            st.buf_since = None;
            slots.push(std::mem::replace(&mut st.slot, Pending::new()));
        }
        for p in &slots {
            p.0.resolve(Err(err.clone()));
        }
        self.ws.room.notify_waiters();
        // Orphans of this writer may now be collected.
        self.shared.writer_closed(self.stream, self.epoch);
    }
}
