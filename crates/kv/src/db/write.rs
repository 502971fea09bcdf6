//! The write path. Under the writer lock a batch gets its sequence numbers, is appended to the
//! WAL and inserted into the memtable; then the visible sequence number is published. The
//! durability asked for (flush or sync of the WAL) comes after, outside the lock. Before taking
//! its sequence numbers a write makes room: it switches to a new memtable when the current one is
//! full, and stalls while flushes or compactions are behind (`make_room`,
//! `slow_down_if_behind`).
//!
//! Invariant: `visible` is raised only after the batch is in the memtable of the current view,
//! so a reader that loads it finds every write at or below it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::batch::{self, WriteBatch};
use crate::error::{Error, Result};
use crate::key;
use crate::memtable::Memtable;
use crate::options::Durability;
use crate::stats::Stall;
use crate::view::View;

use crate::oracle::Oracle;

use super::inner::Inner;

/// A transaction's validation, run against the oracle just before its batch is written.
pub(super) type CommitCheck<'a> = dyn Fn(&Oracle) -> Result<()> + 'a;
use super::throttle::Cause;

impl Inner {
    pub(super) fn write(&self, batch: &mut WriteBatch, durability: Durability) -> Result<u64> {
        self.write_checked(batch, durability, None)
    }

    /// [`Inner::write`], after `check` passed under the writer lock (no write comes between
    /// the check and this one): a transaction's commit validation. While transactions are
    /// open, every write records its keys in the oracle once visible.
    pub(super) fn write_checked(
        &self,
        batch: &mut WriteBatch,
        durability: Durability,
        check: Option<&CommitCheck<'_>>,
    ) -> Result<u64> {
        if let Some(m) = batch.invalid() {
            return Err(Error::InvalidParam(m.to_owned()));
        }
        if batch.is_empty() {
            return Ok(self.visible());
        }
        self.check_writable()?;
        self.slow_down_if_behind(batch.size() as u64);
        let mut w = self.write.lock();
        self.make_room()?;
        if let Some(check) = check {
            check(&self.oracle.lock())?;
        }
        let seq = w.last_seq + 1;
        let rep = batch.encode(seq)?;
        self.wal.append(rep)?;
        let (_, ops) = batch::ops(rep).expect("a batch we encoded decodes");
        let view = self.view.load();
        let ops: SmallVec<[key::Op<'_>; 16]> = ops.flatten().collect();
        view.mem.insert_batch(&ops, seq);
        let user_bytes: usize = ops.iter().map(|op| op.key.len() + op.value.len()).sum();
        let n = ops.len() as u64;
        w.last_seq = seq + n - 1;
        let last = w.last_seq;
        self.visible.store(last, Ordering::SeqCst);
        // Visible to reads, not yet to commit checks (which take the writer lock for that).
        fail::fail_point!("kv::write::visible");
        {
            let mut oracle = self.oracle.lock();
            if oracle.tracking() {
                for (i, op) in ops.iter().enumerate() {
                    oracle.record(op.key, seq + i as u64);
                    self.write_hints.note(op.key, seq + i as u64);
                }
            }
        }
        drop(w);
        self.counters.user_bytes.fetch_add(user_bytes as u64, Ordering::Relaxed);
        self.metrics.writes.increment(n);
        self.metrics.write_bytes.increment(user_bytes as u64);
        match durability {
            Durability::Buffered => self.wal.flush().map_err(|e| self.wal_failed(e))?,
            Durability::Synced => {
                let start = Instant::now();
                self.wal.sync().map_err(|e| self.wal_failed(e))?;
                self.metrics.sync_seconds.record(start.elapsed().as_secs_f64());
            }
            Durability::Deferred => {}
        }
        Ok(last)
    }

    /// Paces a write of `bytes` while flushes or compactions are behind (see `throttle`): L0 past
    /// its slowdown trigger, or every immutable-memtable slot taken and the active memtable half
    /// full, so that the wait is spread over many writes before `make_room` must stop them.
    fn slow_down_if_behind(&self, bytes: u64) {
        let pressure = {
            let view = self.view.load();
            #[expect(clippy::indexing_slicing, reason = "levels holds NUM_LEVELS > 0 entries")]
            let l0 = view.version.levels[0].len();
            if l0 >= self.opts.l0_slowdown_trigger {
                Some((Cause::L0, l0 + 1 - self.opts.l0_slowdown_trigger))
            } else if view.imms.len() >= self.opts.max_immutable_memtables
                && view.mem.size() * 2 >= self.opts.memtable_size
            {
                // Quarters of the memtable past its half: the pressure grows as it fills.
                Some((Cause::Memtables, 1 + 4 * view.mem.size() / self.opts.memtable_size - 2))
            } else {
                None
            }
        };
        let Some((cause, level)) = pressure else {
            if self.pacing.swap(false, Ordering::Relaxed) {
                self.pace.lock().relax();
            }
            return;
        };
        self.pacing.store(true, Ordering::Relaxed);
        let d = self.pace.lock().delay(bytes, cause, level, Instant::now());
        if d.is_zero() {
            return;
        }
        let t = Instant::now();
        std::thread::sleep(d);
        let kind = match cause {
            Cause::L0 => Stall::SlowedByL0,
            Cause::Memtables => Stall::SlowedByMemtables,
        };
        self.counters.record_stall(kind, t.elapsed());
        self.metrics.stalls.increment(1);
    }

    /// Makes sure the memtable has room, switching to a new one when it is full. Waits (a stall)
    /// while too many memtables await flushing or L0 is at its stop trigger. Called with the
    /// writer lock held.
    fn make_room(&self) -> Result<()> {
        let mut stalled: Option<(Instant, Stall)> = None;
        let r = loop {
            if let Some(cause) = self.poison.get() {
                break Err(Error::Poisoned { cause: cause.clone() });
            }
            let view = self.view.load();
            #[expect(clippy::indexing_slicing, reason = "levels holds NUM_LEVELS > 0 entries")]
            let l0 = view.version.levels[0].len();
            let full = view.mem.size() >= self.opts.memtable_size;
            if !full && l0 < self.opts.l0_stop_trigger {
                break Ok(());
            }
            if l0 >= self.opts.l0_stop_trigger
                || (full && view.imms.len() >= self.opts.max_immutable_memtables)
            {
                let kind = if l0 >= self.opts.l0_stop_trigger {
                    Stall::StoppedByL0
                } else {
                    Stall::StoppedByMemtables
                };
                stalled.get_or_insert_with(|| (Instant::now(), kind));
                let mut bg = self.bg.lock();
                if bg.shutdown {
                    break Err(Error::Closed);
                }
                self.bg_cv.notify_all();
                self.done_cv.wait_for(&mut bg, Duration::from_millis(50));
                continue;
            }
            self.switch_memtable();
            break Ok(());
        };
        if let Some((t, kind)) = stalled {
            self.counters.record_stall(kind, t.elapsed());
            self.metrics.stalls.increment(1);
        }
        r
    }

    /// Makes the memtable immutable and starts a new one (writer lock held).
    pub(super) fn switch_memtable(&self) {
        let _v = self.view_lock.lock();
        let view = self.view.load();
        let wal_end = self.wal.next_seq();
        view.mem.seal(wal_end);
        let mut imms = vec![view.mem.clone()];
        imms.extend(view.imms.iter().cloned());
        self.install_view(View {
            mem: Arc::new(Memtable::new(
                wal_end,
                self.opts.memtable_hash_index,
                self.opts.memtable_size,
                &self.spares,
            )),
            imms,
            version: view.version.clone(),
        });
        drop(_v);
        self.wake_bg();
    }
}
