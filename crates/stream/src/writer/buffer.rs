//! What `send` and the flusher share, under one lock ([`State`]): the buffer of the next
//! fragment and its slot, full buffers set aside ([`Batch`]), and the counts that drive
//! backpressure and the flusher's wake-ups.
//!
//! Invariants: ids are taken under the lock, densely, in the order sends get room; a buffer that
//! reaches `max_entries` or `max_bytes` is set aside whole, so a fragment never exceeds them;
//! `unacked_bytes` counts the bytes sent and not yet acknowledged (or failed), which senders keep
//! under `max_buffered_bytes`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::error::{Error, Result};
use crate::options::SyncRunner;

use super::ack::{Pending, Slot};

/// With [`WriterOptions::flush_when_idle`]: below this many fragments in flight, a fragment is
/// written at once. Two rather than one, so that one fragment's fsync overlaps the next one's
/// write.
pub(super) const IDLE_INFLIGHT: usize = 2;

/// Entries set aside as one future fragment.
pub(super) struct Batch {
    pub(super) entries: Vec<Bytes>,
    pub(super) bytes: usize,
    pub(super) pending: Pending,
    /// When its first entry was sent.
    pub(super) since: Instant,
}

/// What `send` and the flusher share, under one lock.
pub(super) struct State {
    /// The entries of the next fragment, sent since the last seal.
    pub(super) buf: Vec<Bytes>,
    pub(super) buf_bytes: usize,
    pub(super) buf_since: Option<Instant>,
    /// The slot of `buf`'s entries.
    pub(super) slot: Pending,
    /// Full buffers waiting for room in flight, oldest first.
    pub(super) ready: VecDeque<Batch>,
    /// Id of the next entry sent.
    pub(super) next_id: u64,
    /// One past the last acknowledged entry: recorded, or with a journal journaled.
    pub(super) committed: u64,
    /// Bytes sent and not yet recorded (or failed).
    pub(super) unacked_bytes: usize,
    /// Fragments sealed and not yet recorded.
    pub(super) inflight: usize,
    /// With a synced journal: batches journaled and waiting for the journal's sync.
    pub(super) journaling: usize,
    /// The slot of the newest sealed fragment (what `flush` waits for once the buffer is empty).
    pub(super) last_sealed: Option<Arc<Slot>>,
    /// Seal the buffer now: a flush or close asked for it.
    pub(super) force: bool,
    /// No more entries: the writer is closing or was dropped.
    pub(super) closing: bool,
    pub(super) close_tx: Option<oneshot::Sender<Result<()>>>,
    pub(super) failed: Option<Arc<Error>>,
}

pub(super) struct WriterShared {
    pub(super) state: Mutex<State>,
    /// The store has a journal: entries are acknowledged once journaled.
    pub(super) journal: bool,
    /// Where journal syncs run, and how many may be in flight (`journal_syncs`).
    pub(super) sync_runner: Arc<dyn SyncRunner>,
    /// Wakes the flusher: entries to seal, a flush or a close.
    pub(super) work: Notify,
    /// Wakes senders waiting for room under `max_buffered_bytes`.
    pub(super) room: Notify,
}

impl WriterShared {
    /// Journal syncs that may be queued or in flight now.
    pub(super) fn journal_syncs(&self) -> usize {
        self.sync_runner.queued_syncs().max(1)
    }
}

/// Takes the buffer as a batch, leaving an empty one with a fresh slot.
pub(super) fn take_buf(st: &mut State) -> Batch {
    Batch {
        entries: std::mem::take(&mut st.buf),
        bytes: std::mem::take(&mut st.buf_bytes),
        pending: std::mem::replace(&mut st.slot, Pending::new()),
        since: st.buf_since.take().unwrap_or_else(Instant::now),
    }
}
