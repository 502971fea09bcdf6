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
//! and the stream's tail once it has yielded to the other tasks ready on the runtime (so that the
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
//!
//! Where each part lives: this module is the handle (`send`, `flush`, `close`); `ack` the acks
//! and their slots; `buffer` what `send` and the flusher share; `flusher` the fragment pipeline;
//! `journaling` the journal path; `task` the flusher's loop.

mod ack;
mod buffer;
mod flusher;
mod journaling;
mod task;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::error::{Error, Result};
use crate::meta::StreamMeta;
use crate::options::WriterOptions;
use crate::shared::Shared;

pub use self::ack::Ack;
use self::ack::Pending;
use self::buffer::{take_buf, State, WriterShared, IDLE_INFLIGHT};
use self::flusher::{Flusher, JournalSide};

/// The writer of one stream. Cheap to share by reference across tasks; `send` may be called
/// concurrently, and ids follow the order in which calls get buffer room.
pub struct StreamWriter {
    name: Arc<str>,
    epoch: u64,
    shared: Arc<WriterShared>,
    opts: WriterOptions,
    /// The store's state: with a journal, sends are refused during a long outage.
    streams: Arc<Shared>,
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
            shared: shared.clone(),
            abandon: Arc::default(),
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
        StreamWriter { name, epoch: s.epoch, shared: ws, opts, streams: shared }
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.name
    }

    /// The id the next entry sent will get.
    pub fn next_id(&self) -> u64 {
        self.shared.state.lock().next_id
    }

    /// This writer's epoch: opening a writer bumps it and fences every older one.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Buffers an entry, waiting while `max_buffered_bytes` are already waiting to become
    /// durable. The returned [`Ack`] resolves to the entry's id once it is durable; acks resolve
    /// in id order. With a journal, fails with [`Error::StoreUnavailable`] (and buffers
    /// nothing) while the object store is out past `Options::outage_limits`.
    pub async fn send(&self, data: impl Into<Bytes>) -> Result<Ack> {
        let data = data.into();
        if data.len() > self.opts.max_entry_bytes {
            return Err(Error::InvalidParam(format!(
                "entry of {} bytes exceeds max_entry_bytes ({})",
                data.len(),
                self.opts.max_entry_bytes
            )));
        }
        if self.shared.journal && self.streams.store.health().is_down() {
            self.streams.check_available()?;
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
