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
//! With a journal (`crate::journal`), the flusher instead appends each buffer to the journal
//! and the stream's tail as soon as the other tasks ready on the runtime have run (so that the
//! senders among them share the record; under `Journal::Always`, as many journal syncs at a
//! time as the store's `SyncRunner` takes, by default one) and resolves its slot when the record
//! is durable; fragments are then cut from the tail by `max_entries`, `max_bytes` or
//! `max_interval` and written and recorded as above, their entries long acknowledged.
//!
//! Invariants: ids are assigned densely from the stream's end in the order `send` calls take the
//! buffer lock; a buffer that reaches `max_entries` or `max_bytes` is set aside whole, so a
//! fragment never exceeds them; a slot is resolved Ok only after its fragment's object is durable
//! AND the metadata write recording it (checked against the writer's epoch) is synced, or, with a
//! journal, after its journal record (appended while the writer's epoch is the tail's) is
//! durable; slots resolve in id order; once any journal append, upload or commit fails, every
//! entry not yet acknowledged fails with the error and nothing more is recorded (journaled
//! entries stay in the tail for the next writer); bytes sent and not yet recorded stay under
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
    /// One past the last acknowledged entry: recorded, or with a journal journaled.
    committed: u64,
    /// Bytes sent and not yet recorded (or failed).
    unacked_bytes: usize,
    /// Fragments sealed and not yet recorded.
    inflight: usize,
    /// With a synced journal: batches journaled and waiting for the journal's sync.
    journaling: usize,
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
    /// The store has a journal: entries are acknowledged once journaled.
    journal: bool,
    /// Where journal syncs run, and how many may be in flight (`journal_syncs`).
    sync_runner: Arc<dyn crate::SyncRunner>,
    /// Wakes the flusher: entries to seal, a flush or a close.
    work: Notify,
    /// Wakes senders waiting for room under `max_buffered_bytes`.
    room: Notify,
}

impl WriterShared {
    /// Journal syncs that may be queued or in flight now.
    fn journal_syncs(&self) -> usize {
        self.sync_runner.queued_syncs().max(1)
    }
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
        // With a journal, the writer takes over the stream's tail: entries an earlier writer
        // journaled and did not record are its to cut into fragments.
        let journal = shared.journal().map(|j| {
            let tail = shared.tail(s.id, s.next_id);
            let (end, inherited) = tail.lock().adopt(s.epoch, s.next_id);
            JournalSide {
                tail,
                synced: j.synced(),
                next: end,
                syncing: FuturesOrdered::new(),
                waiting: VecDeque::new(),
                uncut_bytes: inherited,
                uncut_since: (end > s.next_id).then(Instant::now),
            }
        });
        let (next_id, inherited) =
            journal.as_ref().map_or((s.next_id, 0), |j| (j.next, j.uncut_bytes));
        let ws = Arc::new(WriterShared {
            state: Mutex::new(State {
                buf: Vec::new(),
                buf_bytes: 0,
                buf_since: None,
                slot: Pending::new(),
                ready: VecDeque::new(),
                next_id,
                committed: next_id,
                unacked_bytes: inherited,
                inflight: 0,
                journaling: 0,
                last_sealed: None,
                force: false,
                closing: false,
                close_tx: None,
                failed: None,
            }),
            journal: journal.is_some(),
            sync_runner: shared.opts.sync_runner.clone(),
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
            journal,
            opts: opts.clone(),
            append_seconds: metrics::histogram!("timber_stream_append_seconds"),
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
                    let wake = if self.shared.journal {
                        st.journaling < self.shared.journal_syncs()
                    } else {
                        st.buf.len() == 1
                            || (set_aside && st.inflight < self.opts.max_flush_inflight)
                            || (self.opts.flush_when_idle && st.inflight < IDLE_INFLIGHT)
                    };
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
    /// The slot its entries wait on (none with a journal: they were acknowledged when journaled).
    pending: Option<Pending>,
    since: Instant,
    bytes: usize,
}

/// A commit's outcome: the stream as recorded, and fragments a journaled truncation unrecorded.
type Committed = Result<(StreamMeta, Vec<FragmentMeta>)>;
type CommitFuture = Pin<Box<dyn Future<Output = (Vec<Upload>, Committed)> + Send>>;

/// The journal side of a writer (when the store has a journal).
struct JournalSide {
    /// The stream's tail, shared with readers and later writers.
    tail: Arc<Mutex<crate::journal::Tail>>,
    /// Acks wait for the journal's sync.
    synced: bool,
    /// Id of the next entry journaled.
    next: u64,
    /// Journal syncs in flight, in order, beside `waiting`.
    syncing: FuturesOrdered<Pin<Box<dyn Future<Output = Result<()>> + Send>>>,
    /// Per sync in flight: the slot it acknowledges, the end of its entries, when they were sent.
    waiting: VecDeque<(Pending, u64, Instant)>,
    /// Bytes journaled and not yet sealed into a fragment, and since when.
    uncut_bytes: usize,
    uncut_since: Option<Instant>,
}

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
    journal: Option<JournalSide>,
    /// `timber_stream_append_seconds`, looked up once: a registry lookup per batch showed in
    /// profiles of small appends.
    append_seconds: metrics::Histogram,
}

impl Flusher {
    /// Takes the next batch to write, if one should be written now.
    fn next_batch(&self, st: &mut State) -> Option<Batch> {
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

    async fn run(mut self) {
        // One timer for the whole life of the flusher, re-armed when the deadline changes.
        let far = || tokio::time::Instant::now() + std::time::Duration::from_secs(86_400);
        let timer = tokio::time::sleep_until(far());
        tokio::pin!(timer);
        let mut armed = None;
        let ws = self.ws.clone();
        loop {
            let work = ws.work.notified();
            if self.journal.is_some() {
                // Let the other tasks that are ready (senders, on a busy runtime) send first,
                // so that one journal record (and, when acks wait for it, one sync) covers them
                // all: woken by a send, this task would otherwise run right after that one
                // sender and journal its entry alone. Without a sync to share, this still
                // spreads the flusher's work over more entries: XADD P1 from 50 clients used 4.3
                // instead of 4.6 µs of user CPU per entry in timberd, pipelines of 16 1.30
                // instead of 1.43.
                tokio::task::yield_now().await;
                self.journal_and_cut();
            }
            let (deadline, finished) = {
                let mut st = ws.state.lock();
                if st.failed.is_none() && self.journal.is_none() {
                    while let Some(b) = self.next_batch(&mut st) {
                        st.inflight += 1;
                        st.last_sealed = Some(b.pending.0.clone());
                        self.seal(b.entries, b.bytes, Some(b.pending), b.since);
                    }
                }
                if st.buf.is_empty() && st.ready.is_empty() {
                    st.force = false;
                }
                let mut idle = st.buf.is_empty() && st.ready.is_empty() && st.inflight == 0;
                let room = st.inflight < self.opts.max_flush_inflight;
                let mut deadline = st.buf_since.filter(|_| room && st.failed.is_none());
                if let Some(j) = &self.journal {
                    idle &= j.waiting.is_empty() && self.next_first >= j.next;
                    deadline = j.uncut_since.filter(|_| room && st.failed.is_none());
                }
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
                Some(Some(r)) = OptionFuture::from(
                    self.journal.as_mut().filter(|j| !j.syncing.is_empty()).map(|j| j.syncing.next())
                ) => {
                    let j = self.journal.as_mut().expect("journal mode");
                    let (pending, end, since) = j.waiting.pop_front().expect("one per sync");
                    match r {
                        Ok(()) => self.journaled(pending, end, since),
                        Err(e) => {
                            let e = Arc::new(e);
                            pending.0.resolve(Err(e.clone()));
                            self.fail(e);
                        }
                    }
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

    /// Encodes entries into a fragment and starts writing it.
    fn seal(
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
        self.sealed.push_back(Sealed { pending, since, bytes });
    }

    /// With a journal: journals what senders buffered, then seals fragments from the tail as
    /// they become due.
    fn journal_and_cut(&mut self) {
        let batches: Vec<Batch> = {
            let mut st = self.ws.state.lock();
            if st.failed.is_some() {
                return;
            }
            let mut v = Vec::new();
            while let Some(b) = self.next_batch(&mut st) {
                if self.journal.as_ref().is_some_and(|j| j.synced) {
                    st.journaling += 1;
                }
                st.last_sealed = Some(b.pending.0.clone());
                v.push(b);
            }
            v
        };
        let mut batches = batches.into_iter();
        while let Some(b) = batches.next() {
            if let Err(e) = self.journal_batch(b) {
                for b in batches.by_ref() {
                    b.pending.0.resolve(Err(e.clone()));
                }
                self.fail(e);
                return;
            }
        }
        self.cut();
    }

    /// Appends a batch to the journal and the tail; acknowledges it, or starts the sync that
    /// will. On failure the batch's slot holds the error.
    fn journal_batch(&mut self, b: Batch) -> std::result::Result<(), Arc<Error>> {
        let j = self.journal.as_mut().expect("journal mode");
        let first = j.next;
        let end = first + b.entries.len() as u64;
        let r = {
            let mut t = j.tail.lock();
            if t.deleted {
                Err(Error::NotFound { stream: self.name.to_string() })
            } else if t.epoch != self.epoch {
                Err(Error::Fenced { stream: self.name.to_string(), epoch: self.epoch })
            } else if t.end() != first {
                Err(Error::Corrupt {
                    object: format!("stream {:?}", self.name),
                    reason: format!(
                        "journal tail ends at {} but the writer is at {first}",
                        t.end()
                    ),
                })
            } else {
                let journal = self.shared.journal().expect("journal mode");
                journal
                    .append_entries(self.stream, first, &b.entries)
                    .map(|seq| t.push(b.entries, seq))
            }
        };
        if let Err(e) = r {
            let e = Arc::new(e);
            b.pending.0.resolve(Err(e.clone()));
            return Err(e);
        }
        j.next = end;
        j.uncut_bytes += b.bytes;
        j.uncut_since.get_or_insert(b.since);
        if j.synced {
            let sh = self.shared.clone();
            j.syncing.push_back(
                self.shared
                    .opts
                    .sync_runner
                    .run(Box::new(move || sh.journal().expect("journal mode").sync())),
            );
            j.waiting.push_back((b.pending, end, b.since));
        } else {
            self.journaled(b.pending, end, b.since);
        }
        Ok(())
    }

    /// Acknowledges journaled entries up to `end`.
    fn journaled(&mut self, pending: Pending, end: u64, since: Instant) {
        {
            let mut st = self.ws.state.lock();
            st.committed = st.committed.max(end);
            if self.journal.as_ref().is_some_and(|j| j.synced) {
                st.journaling -= 1;
            }
        }
        self.shared.publish_next(self.stream, end);
        self.append_seconds.record(since.elapsed().as_secs_f64());
        pending.0.resolve(Ok(()));
    }

    /// Seals fragments from the journaled entries not yet in one, while one is due (full, old
    /// enough, or the writer is closing) and there is room in flight.
    fn cut(&mut self) {
        let (closing, mut inflight) = {
            let st = self.ws.state.lock();
            (st.closing, st.inflight)
        };
        let (max_entries, max_bytes) = (self.opts.max_entries, self.opts.max_bytes);
        while inflight < self.opts.max_flush_inflight {
            let j = self.journal.as_mut().expect("journal mode");
            if self.next_first >= j.next {
                j.uncut_since = None;
                return;
            }
            let due = closing
                || j.next - self.next_first >= max_entries as u64
                || j.uncut_bytes >= max_bytes
                // Senders wait once `max_buffered_bytes` are not recorded: cut before that.
                || j.uncut_bytes.saturating_mul(2) >= self.opts.max_buffered_bytes
                || j.uncut_since.is_some_and(|t| t.elapsed() >= self.opts.max_interval);
            if !due {
                return;
            }
            let entries = j.tail.lock().range(self.next_first, j.next, max_entries, max_bytes);
            if entries.is_empty() {
                return;
            }
            let bytes: usize = entries.iter().map(Bytes::len).sum();
            j.uncut_bytes = j.uncut_bytes.saturating_sub(bytes);
            let left = self.next_first + (entries.len() as u64) < j.next;
            j.uncut_since = left.then(Instant::now);
            inflight += 1;
            self.ws.state.lock().inflight += 1;
            self.seal(entries, bytes, None, Instant::now());
        }
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
    fn finish(&mut self, ups: Vec<Upload>, r: Committed) {
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
            tokio::spawn(async move { crate::streams::forget(&sh, s.id, &gone).await });
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
    fn fail(&mut self, err: Arc<Error>) {
        tracing::warn!(stream = %self.name, epoch = self.epoch, error = %err, "stream writer failed");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Journal, Options, StreamConfig, Streams};

    /// Under both journal modes, entries that several tasks send on a busy runtime go into the
    /// journal together: the flusher, woken by the first send, lets the other senders run
    /// before it journals.
    #[test]
    fn the_sends_of_ready_tasks_share_one_journal_record() {
        for journal in [Journal::Manual, Journal::Always] {
            let dir = tempfile::tempdir().unwrap();
            // One worker, as in timberd: a task woken by another (the flusher, by a send) runs
            // right after it.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let records = rt.block_on(async {
                let opts = Options::default().maintenance_interval(None).journal(journal);
                let s = Streams::open(dir.path(), opts).await.unwrap();
                s.create("s", StreamConfig::default()).await.unwrap();
                let w = Arc::new(s.writer("s").await.unwrap());
                let before = s.shared.journal().unwrap().next_seq();
                // Spawned from a worker, so that the senders all wait in its queue.
                let senders = tokio::spawn({
                    let w = w.clone();
                    async move {
                        let tasks: Vec<_> = (0..8u8)
                            .map(|i| {
                                let w = w.clone();
                                tokio::spawn(async move { w.append(vec![i]).await.unwrap() })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    }
                });
                senders.await.unwrap();
                let records = s.shared.journal().unwrap().next_seq() - before;
                Arc::into_inner(w).unwrap().close().await.unwrap();
                records
            });
            assert!(records <= 2, "{journal:?}: 8 sends took {records} journal records");
        }
    }
}
