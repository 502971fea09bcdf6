//! [`StreamWriter`]: the one writer of a stream.
//!
//! `send` appends an entry to the writer's buffer under a short lock, takes the next id there,
//! and returns an [`Ack`]: the id and the ack slot shared by every entry of the fragment the
//! entry will be written in. The flusher task seals the buffer into fragments (by `max_entries`,
//! `max_bytes`, `max_interval`, or at once under group commit), writes up to
//! `max_flush_inflight` of them at once, and records the written ones in metadata strictly in id
//! order, one metadata write at a time, in batches of whatever uploads finished meanwhile; while
//! one batch is being recorded, the next fragments are sealed and written. Recording a fragment
//! resolves its slot, which wakes the tasks awaiting its entries' acks. Nothing is allocated per
//! entry: no channel, no permit, no clock read.
//!
//! Invariants: ids are assigned densely from the stream's end in the order `send` calls take the
//! buffer lock; a buffer that reaches `max_entries` or `max_bytes` is set aside whole, so a
//! fragment never exceeds them; a slot is resolved Ok only after its fragment's object is durable
//! AND the metadata write recording it (checked against the writer's epoch) is synced, and slots
//! resolve in id order; once any upload or commit fails, that fragment and every later entry
//! fails with the error and nothing more is recorded; bytes sent and not yet durable stay under
//! `max_buffered_bytes` (senders wait for room); every slot is resolved, at worst with
//! [`Error::Closed`] when the flusher or the writer goes away.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::OptionFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::error::{Error, Result};
use crate::fragment;
use crate::meta::{now_ms, FragmentMeta, StreamMeta};
use crate::options::WriterOptions;
use crate::store::Put;
use crate::streams::{object_id, Shared};

/// With [`WriterOptions::flush_when_idle`]: below this many fragments in flight, a fragment is
/// written at once. Two rather than one: XADD P1 from 50 clients (timberd) went from 31k to 40k
/// entries/s in A/B runs, as one fragment's fsync overlaps the next one's write.
const IDLE_INFLIGHT: usize = 2;

/// The outcome of one fragment, shared by the acks of its entries.
#[derive(Debug, Default)]
struct Slot {
    outcome: OnceLock<std::result::Result<(), Arc<Error>>>,
    wakers: Mutex<Vec<Waker>>,
}

impl Slot {
    /// Sets the outcome (the first one wins) and wakes every waiting ack.
    fn resolve(&self, r: std::result::Result<(), Arc<Error>>) {
        if self.outcome.set(r).is_ok() {
            let wakers = std::mem::take(&mut *self.wakers.lock());
            for w in wakers {
                w.wake();
            }
        }
    }
}

/// A slot the writer still owes an outcome: dropping it unresolved (the flusher or the writer
/// went away) resolves it with [`Error::Closed`].
#[derive(Debug)]
struct Pending(Arc<Slot>);

impl Pending {
    fn new() -> Pending {
        Pending(Arc::default())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.resolve(Err(Arc::new(Error::Closed)));
    }
}

/// Resolves to the id of an entry once it is durable, or to the error that kept it from being.
#[derive(Debug)]
#[must_use = "an Ack tells whether the entry became durable"]
pub struct Ack {
    id: u64,
    slot: Arc<Slot>,
    /// Where this ack's waker sits in the slot's list, once registered.
    waker_at: Option<usize>,
}

impl Ack {
    fn outcome(&self) -> Option<Result<u64>> {
        self.slot.outcome.get().map(|r| match r {
            Ok(()) => Ok(self.id),
            Err(e) => Err(Error::for_pending(e)),
        })
    }
}

impl Future for Ack {
    type Output = Result<u64>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<u64>> {
        if let Some(r) = self.outcome() {
            return Poll::Ready(r);
        }
        let slot = self.slot.clone();
        let mut wakers = slot.wakers.lock();
        // Checked again under the lock that `resolve` takes after setting the outcome.
        if let Some(r) = self.outcome() {
            return Poll::Ready(r);
        }
        match self.waker_at {
            Some(i) if i < wakers.len() => {
                if !wakers[i].will_wake(cx.waker()) {
                    wakers[i] = cx.waker().clone();
                }
            }
            _ => {
                self.waker_at = Some(wakers.len());
                wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

/// Entries set aside as one future fragment.
struct Batch {
    entries: Vec<Bytes>,
    bytes: usize,
    pending: Pending,
    /// When its first entry was sent.
    since: Instant,
}

/// What `send` and the flusher share, under one lock.
struct State {
    /// The entries of the next fragment, sent since the last seal.
    buf: Vec<Bytes>,
    buf_bytes: usize,
    buf_since: Option<Instant>,
    /// The slot of `buf`'s entries.
    slot: Pending,
    /// Full buffers waiting for room in flight, oldest first.
    ready: VecDeque<Batch>,
    /// Id of the next entry sent.
    next_id: u64,
    /// One past the last recorded entry.
    committed: u64,
    /// Bytes sent and not yet recorded (or failed).
    unacked_bytes: usize,
    /// Fragments sealed and not yet recorded.
    inflight: usize,
    /// The slot of the newest sealed fragment (what `flush` waits for once the buffer is empty).
    last_sealed: Option<Arc<Slot>>,
    /// Seal the buffer now: a flush or close asked for it.
    force: bool,
    /// No more entries: the writer is closing or was dropped.
    closing: bool,
    close_tx: Option<oneshot::Sender<Result<()>>>,
    failed: Option<Arc<Error>>,
}

struct WriterShared {
    state: Mutex<State>,
    /// Wakes the flusher: entries to seal, a flush or a close.
    work: Notify,
    /// Wakes senders waiting for room under `max_buffered_bytes`.
    room: Notify,
}

/// The writer of one stream. Cheap to share by reference across tasks; `send` may be called
/// concurrently, and ids follow the order in which calls get buffer room.
pub struct StreamWriter {
    name: Arc<str>,
    epoch: u64,
    shared: Arc<WriterShared>,
    opts: WriterOptions,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("name", &self.name)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl StreamWriter {
    pub(crate) fn start(shared: Arc<Shared>, s: StreamMeta, opts: WriterOptions) -> StreamWriter {
        let name: Arc<str> = s.name.as_str().into();
        let segment = s.open_segment.expect("writer has an open segment");
        let ws = Arc::new(WriterShared {
            state: Mutex::new(State {
                buf: Vec::new(),
                buf_bytes: 0,
                buf_since: None,
                slot: Pending::new(),
                ready: VecDeque::new(),
                next_id: s.next_id,
                committed: s.next_id,
                unacked_bytes: 0,
                inflight: 0,
                last_sealed: None,
                force: false,
                closing: false,
                close_tx: None,
                failed: None,
            }),
            work: Notify::new(),
            room: Notify::new(),
        });
        let flusher = Flusher {
            shared,
            ws: ws.clone(),
            name: name.clone(),
            stream: s.id,
            epoch: s.epoch,
            segment,
            next_segment: s.next_segment,
            seg_bytes: 0,
            seg_started: Instant::now(),
            next_first: s.next_id,
            inflight: FuturesOrdered::new(),
            sealed: VecDeque::new(),
            done: Vec::new(),
            commit: None,
            spare: Vec::new(),
            opts: opts.clone(),
        };
        tokio::spawn(flusher.run());
        StreamWriter { name, epoch: s.epoch, shared: ws, opts }
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.name
    }

    /// This writer's epoch: opening a writer bumps it and fences every older one.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Buffers an entry, waiting while `max_buffered_bytes` are already waiting to become
    /// durable. The returned [`Ack`] resolves to the entry's id once it is durable; acks resolve
    /// in id order.
    pub async fn send(&self, data: impl Into<Bytes>) -> Result<Ack> {
        let data = data.into();
        if data.len() > self.opts.max_entry_bytes {
            return Err(Error::InvalidParam(format!(
                "entry of {} bytes exceeds max_entry_bytes ({})",
                data.len(),
                self.opts.max_entry_bytes
            )));
        }
        loop {
            let room = {
                let mut st = self.shared.state.lock();
                if let Some(e) = &st.failed {
                    return Err(Error::for_pending(e));
                }
                if st.closing {
                    return Err(Error::Closed);
                }
                let len = data.len();
                if st.unacked_bytes == 0 || st.unacked_bytes + len <= self.opts.max_buffered_bytes {
                    let (ack, set_aside) = self.push(&mut st, data);
                    // The flusher has something to do now: arm the deadline of a new buffer,
                    // write a full one while there is room, or write at once (group commit). A
                    // full buffer set aside without room waits for a commit, which the flusher
                    // sees without being woken.
                    let wake = st.buf.len() == 1
                        || (set_aside && st.inflight < self.opts.max_flush_inflight)
                        || (self.opts.flush_when_idle && st.inflight < IDLE_INFLIGHT);
                    drop(st);
                    if wake {
                        self.shared.work.notify_one();
                    }
                    return Ok(ack);
                }
                // Made before the lock is released: a `notify_waiters` from a commit that frees
                // room after this point wakes it, polled yet or not.
                self.shared.room.notified()
            };
            room.await;
        }
    }

    /// Adds an entry to the buffer, setting the buffer aside once it is full (then `true`).
    fn push(&self, st: &mut State, data: Bytes) -> (Ack, bool) {
        let id = st.next_id;
        st.next_id += 1;
        st.unacked_bytes += data.len();
        st.buf_bytes += data.len();
        if st.buf.is_empty() {
            st.buf_since = Some(Instant::now());
        }
        st.buf.push(data);
        let ack = Ack { id, slot: st.slot.0.clone(), waker_at: None };
        let full = st.buf.len() >= self.opts.max_entries || st.buf_bytes >= self.opts.max_bytes;
        if full {
            let batch = take_buf(st);
            st.ready.push_back(batch);
        }
        (ack, full)
    }

    /// Appends an entry and waits until it is durable; returns its id. For throughput, use
    /// [`send`](Self::send) and await the acks later.
    pub async fn append(&self, data: impl Into<Bytes>) -> Result<u64> {
        self.send(data).await?.await
    }

    /// Writes out everything sent so far and waits until it is durable.
    pub async fn flush(&self) -> Result<()> {
        let last = {
            let mut st = self.shared.state.lock();
            if let Some(e) = &st.failed {
                return Err(Error::for_pending(e));
            }
            if st.committed >= st.next_id {
                return Ok(());
            }
            st.force = true;
            let slot = if !st.buf.is_empty() {
                st.slot.0.clone()
            } else if let Some(b) = st.ready.back() {
                b.pending.0.clone()
            } else {
                st.last_sealed.clone().ok_or(Error::Closed)?
            };
            Ack { id: st.next_id - 1, slot, waker_at: None }
        };
        self.shared.work.notify_one();
        last.await.map(|_| ())
    }

    /// Flushes, waits for every entry to be durable, and seals the writer's segment. Dropping a
    /// writer does the same in the background.
    pub async fn close(self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.state.lock();
            st.close_tx = Some(tx);
            st.closing = true;
            st.force = true;
        }
        self.shared.work.notify_one();
        rx.await.map_err(|_| Error::Closed)?
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state.lock();
            st.closing = true;
            st.force = true;
        }
        self.shared.work.notify_one();
    }
}

/// Takes the buffer as a batch, leaving an empty one with a fresh slot.
fn take_buf(st: &mut State) -> Batch {
    Batch {
        entries: std::mem::take(&mut st.buf),
        bytes: std::mem::take(&mut st.buf_bytes),
        pending: std::mem::replace(&mut st.slot, Pending::new()),
        since: st.buf_since.take().unwrap_or_else(Instant::now),
    }
}

/// A fragment being written.
struct Upload {
    meta: FragmentMeta,
    data: Bytes,
    result: Result<Put>,
    started: Instant,
}

/// A sealed fragment's bookkeeping, in id order beside `inflight` and `done`.
struct Sealed {
    pending: Pending,
    since: Instant,
    bytes: usize,
}

type CommitFuture = Pin<Box<dyn Future<Output = (Vec<Upload>, Result<StreamMeta>)> + Send>>;

struct Flusher {
    shared: Arc<Shared>,
    ws: Arc<WriterShared>,
    name: Arc<str>,
    stream: u64,
    epoch: u64,
    opts: WriterOptions,
    segment: u64,
    next_segment: u64,
    seg_bytes: u64,
    seg_started: Instant,
    /// First id of the next fragment sealed.
    next_first: u64,
    /// Uploads in id order.
    inflight: FuturesOrdered<Pin<Box<dyn Future<Output = Upload> + Send>>>,
    /// One per fragment sealed and not yet recorded, in id order.
    sealed: VecDeque<Sealed>,
    /// Finished uploads waiting to be recorded, in id order.
    done: Vec<Upload>,
    /// The metadata write in progress, if any.
    commit: Option<CommitFuture>,
    /// Buffers of recorded fragments, reused for the next ones.
    spare: Vec<BytesMut>,
}

impl Flusher {
    /// Takes the next batch to write, if one should be written now.
    fn next_batch(&self, st: &mut State) -> Option<Batch> {
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

    async fn run(mut self) {
        // One timer for the whole life of the flusher, re-armed when the deadline changes.
        let far = || tokio::time::Instant::now() + std::time::Duration::from_secs(86_400);
        let timer = tokio::time::sleep_until(far());
        tokio::pin!(timer);
        let mut armed = None;
        let ws = self.ws.clone();
        loop {
            let work = ws.work.notified();
            let (deadline, finished) = {
                let mut st = ws.state.lock();
                if st.failed.is_none() {
                    while let Some(b) = self.next_batch(&mut st) {
                        st.inflight += 1;
                        st.last_sealed = Some(b.pending.0.clone());
                        self.seal(b);
                    }
                }
                if st.buf.is_empty() && st.ready.is_empty() {
                    st.force = false;
                }
                let idle = st.buf.is_empty() && st.ready.is_empty() && st.inflight == 0;
                let room = st.inflight < self.opts.max_flush_inflight;
                let deadline = st.buf_since.filter(|_| room && st.failed.is_none());
                (deadline, st.closing && (idle || st.failed.is_some()) && self.commit.is_none())
            };
            if finished {
                break;
            }
            let deadline =
                deadline.map(|t| tokio::time::Instant::from_std(t + self.opts.max_interval));
            if deadline != armed {
                timer.as_mut().reset(deadline.unwrap_or_else(far));
                armed = deadline;
            }
            tokio::select! {
                biased;
                Some((ups, r)) = OptionFuture::from(self.commit.as_mut()) => {
                    self.commit = None;
                    self.finish(ups, r);
                }
                Some(up) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.done.push(up);
                    while let Some(Some(up)) = self.inflight.next().now_or_never() {
                        self.done.push(up);
                    }
                }
                () = work => {}
                () = &mut timer, if deadline.is_some() => {
                    armed = None;
                    timer.as_mut().reset(far());
                }
            }
            if self.commit.is_none() && !self.done.is_empty() {
                self.start_commit();
            }
        }
        let failed = self.ws.state.lock().failed.clone();
        let result = match failed {
            Some(e) => Err(Error::for_pending(&e)),
            None => {
                let (id, name, epoch) = (self.stream, self.name.clone(), self.epoch);
                self.shared.blocking(move |sh| sh.meta.close_writer(id, &name, epoch)).await
            }
        };
        self.shared.writer_closed(self.stream, self.epoch);
        if let Some(tx) = self.ws.state.lock().close_tx.take() {
            let _ = tx.send(result);
        }
    }

    /// Encodes a batch into a fragment and starts writing it.
    fn seal(&mut self, b: Batch) {
        let count = b.entries.len() as u64;
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
            fragment::encode_into(buf, self.stream, self.segment, first, &b.entries, self.opts.lz4);
        drop(b.entries);
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
        let put = tokio::spawn({
            let data = data.clone();
            async move { store.put(&path, data).await }
        });
        self.inflight.push_back(Box::pin(async move {
            let result = match put.await {
                Ok(r) => r,
                Err(e) => Err(Error::InvalidParam(format!("fragment upload task failed: {e}"))),
            };
            Upload { meta, data, result, started }
        }));
        self.sealed.push_back(Sealed { pending: b.pending, since: b.since, bytes: b.bytes });
    }

    /// Starts recording the finished uploads that were written; the first failed upload fails
    /// the writer once everything before it is recorded.
    fn start_commit(&mut self) {
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
        self.commit = Some(Box::pin(async move {
            let r = shared.blocking(move |sh| sh.meta.commit(id, &name, epoch, &metas)).await;
            (ups, r)
        }));
    }

    /// Acks the fragments a metadata write recorded, or fails the writer.
    fn finish(&mut self, ups: Vec<Upload>, r: Result<StreamMeta>) {
        let s = match r {
            Ok(s) => s,
            Err(e) => {
                self.fail_all(e);
                return;
            }
        };
        self.shared.publish(&s);
        let readers = self.shared.cache.has_readers(self.stream);
        let mut freed = 0;
        let mut resolved = Vec::with_capacity(ups.len());
        for up in ups {
            let sealed = self.sealed.pop_front().expect("one sealed record per upload");
            metrics::histogram!("timber_stream_flush_seconds")
                .record(up.started.elapsed().as_secs_f64());
            metrics::histogram!("timber_stream_append_seconds")
                .record(sealed.since.elapsed().as_secs_f64());
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
            resolved.push(sealed.pending);
            self.reclaim(up.data);
        }
        {
            let mut st = self.ws.state.lock();
            st.committed = s.next_id;
            st.unacked_bytes -= freed;
            st.inflight -= resolved.len();
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
        tracing::warn!(stream = %self.name, epoch = self.epoch, error = %err, "stream writer failed");
        let err = Arc::new(err);
        self.inflight = FuturesOrdered::new();
        self.done.clear();
        let mut slots: Vec<Pending> = self.sealed.drain(..).map(|s| s.pending).collect();
        {
            let mut st = self.ws.state.lock();
            st.failed = Some(err.clone());
            st.inflight = 0;
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
