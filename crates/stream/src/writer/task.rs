//! The flusher task's loop: it waits for work (a send, a flush or close, a finished upload,
//! journal sync or metadata write, the deadline of the oldest buffered entry), seals and journals
//! what is due, starts the next metadata write once the last one ended, and on close records
//! the writer's end.

use std::sync::Arc;

use futures::future::OptionFuture;
use futures::{FutureExt, StreamExt};

use crate::error::Error;

use super::flusher::Flusher;

impl Flusher {
    /// Closing while the object store is out, with everything journaled and acknowledged: what
    /// is left to upload stays in the stream's tail (durable in the journal, where the next
    /// writer or the next open finds it) instead of the close waiting for the store. The
    /// writer ends failed with [`Error::StoreUnavailable`].
    fn leave_uploads_if_closing_in_outage(&mut self) {
        if !self.shared.store.health().is_down() {
            return;
        }
        let leave = {
            let st = self.ws.state.lock();
            st.closing
                && st.failed.is_none()
                && st.buf.is_empty()
                && st.ready.is_empty()
                && self.journal.as_ref().is_some_and(|j| j.waiting.is_empty())
        };
        if let (true, Some(e)) = (leave, self.shared.unavailable()) {
            self.fail(Arc::new(e));
        }
    }

    pub(super) async fn run(mut self) {
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
                // all, and the flusher's work is spread over more entries. Tokio does not promise
                // which task runs after a yield; the test
                // `the_sends_of_ready_tasks_share_one_journal_record` checks that they do share.
                tokio::task::yield_now().await;
                self.journal_and_cut();
                self.leave_uploads_if_closing_in_outage();
            }
            let (deadline, finished, closing) = {
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
                let finished = st.closing && (idle || st.failed.is_some()) && self.commit.is_none();
                (deadline, finished, st.closing)
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
                // While closing with uploads waiting out an outage: look again, to leave them
                // to the journal (`leave_uploads_if_closing_in_outage`).
                () = tokio::time::sleep(std::time::Duration::from_millis(100)),
                    if closing && self.journal.is_some() && !self.inflight.is_empty() => {}
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
}
