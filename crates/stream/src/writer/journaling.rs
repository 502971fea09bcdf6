//! The flusher's journal path (with `Options::journal`): each buffer is appended to the journal
//! and the stream's tail once the flusher has yielded to the other ready tasks (so that their
//! sends share the record), and acknowledged once its record is durable (under
//! `Journal::Always`, after a sync run by the store's `SyncRunner`, at most
//! `SyncRunner::queued_syncs` at a time); fragments are cut from the tail later, by
//! `max_entries`, `max_bytes` or `max_interval`, and recorded as without a journal, their
//! entries long acknowledged.
//!
//! Invariants: per stream, journal records hold entries in id order without gaps: a writer
//! appends only while its epoch is the tail's, and only at the tail's end; after a failure the
//! tail keeps what was journaled (acknowledged) for the next writer or the next open.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::error::Error;

use super::ack::Pending;
use super::buffer::Batch;
use super::flusher::Flusher;

impl Flusher {
    /// With a journal: journals what senders buffered, then seals fragments from the tail as
    /// they become due.
    pub(super) fn journal_and_cut(&mut self) {
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
    pub(super) fn journaled(&mut self, pending: Pending, end: u64, since: Instant) {
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
            // One worker: the senders and the flusher take turns on one thread.
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
                // Spawned from a task, so that all the senders are ready before any of them runs.
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
