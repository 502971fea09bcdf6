//! The flush thread: it writes the oldest immutable memtable to an L0 table, records it in the
//! manifest with the new `log_number`, installs a view without that memtable, and only then
//! truncates the WAL before `log_number` (never past a checkpoint's pin). `flush` switches the
//! memtable and waits until every immutable one is flushed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::MutexGuard;

use crate::compaction::Retention;
use crate::error::{Error, Result};
use crate::key;
use crate::manifest::{self, Edit};
use crate::table::{self, TableBuilder};
use crate::view::View;

use super::inner::Inner;

/// How long the flush thread waits for work before it gives unused spare memtable chunks back.
const IDLE_TICK: Duration = Duration::from_millis(200);
/// How soon the flush thread tries again to drop replaced views that were still held.
const REAP_RETRY: Duration = Duration::from_millis(1);

impl Inner {
    pub(super) fn flush_loop(&self) {
        loop {
            self.reap();
            {
                let mut bg = self.bg.lock();
                let mut reap_in = REAP_RETRY;
                while !bg.shutdown && self.view.load().imms.is_empty() {
                    // A replaced view that a reader still held at the last reap (a writer
                    // between loading the view and inserting, most often) is tried again soon,
                    // then less and less often (an iterator may hold it for long): it holds a
                    // whole flushed memtable, which is memory until it goes, and the next flush
                    // is a memtable's fill away.
                    let retry = !self.retired.lock().is_empty();
                    let tick = if retry { reap_in } else { IDLE_TICK };
                    reap_in = (reap_in * 2).min(IDLE_TICK);
                    if self.bg_cv.wait_for(&mut bg, tick).timed_out() {
                        MutexGuard::unlocked(&mut bg, || {
                            if retry {
                                self.reap();
                            }
                            // A database that stopped writing gives its spare memtable memory
                            // back.
                            if tick == IDLE_TICK && self.spares.trim_unused() {
                                self.update_cache_limit();
                            }
                        });
                    }
                }
                if bg.shutdown {
                    return;
                }
            }
            if self.poison.get().is_some() {
                let mut bg = self.bg.lock();
                if !bg.shutdown {
                    self.bg_cv.wait_for(&mut bg, Duration::from_millis(200));
                }
                continue;
            }
            if let Err(e) = self.flush_oldest() {
                self.set_poison(&e);
            }
        }
    }

    /// Writes the oldest immutable memtable to an L0 table and installs it.
    fn flush_oldest(&self) -> Result<()> {
        let Some(imm) = self.view.load().imms.last().cloned() else { return Ok(()) };
        let t = Instant::now();
        let mut table = None;
        let mut max_seq = 0;
        if !imm.is_empty() {
            let id = self.new_file_id();
            let mut b = TableBuilder::create(&self.dir.join(table::file_name(id)), &self.opts)?;
            let mut keep = Retention::new(self.snapshot_seqs());
            imm.try_for_each(|k, v| {
                max_seq = max_seq.max(key::seq(k));
                if keep.keep(k, |_| false) {
                    b.add(k, v)?;
                }
                Ok::<_, Error>(())
            })?;
            let f = self.finish_table(id, b)?;
            manifest::sync_dir(&self.dir)?;
            self.counters.flush_bytes.fetch_add(f.meta.size, Ordering::Relaxed);
            table = Some(f);
        }
        let log_number = imm.wal_end();
        let mut tree = self.tree.lock();
        let edit = Edit {
            log_number: Some(log_number),
            last_seq: Some(max_seq),
            next_file: Some(tree.next_file),
            added: table.iter().map(|t| (0, t.meta.clone())).collect(),
            deleted: vec![],
        };
        tree.manifest.append(&edit)?;
        {
            let _v = self.view_lock.lock();
            let view = self.view.load();
            let mut version = (*view.version).clone();
            version.log_number = log_number;
            if let Some(t) = table {
                #[expect(clippy::indexing_slicing, reason = "levels holds NUM_LEVELS > 0 entries")]
                version.levels[0].insert(0, t);
            }
            let imms = view.imms.iter().filter(|m| !Arc::ptr_eq(m, &imm)).cloned().collect();
            self.install_view(View { mem: view.mem.clone(), imms, version: Arc::new(version) });
        }
        self.maybe_switch_manifest(&mut tree)?;
        drop(tree);
        let pin = self.wal_pins.lock().keys().next().copied().unwrap_or(u64::MAX);
        self.wal.truncate_front(log_number.min(pin))?;
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.metrics.flush_seconds.record(t.elapsed().as_secs_f64());
        self.publish_gauges();
        self.notify_done();
        self.wake_bg();
        Ok(())
    }

    pub(super) fn flush(&self) -> Result<()> {
        {
            let _w = self.write.lock();
            self.check_writable()?;
            if !self.view.load().mem.is_empty() {
                self.switch_memtable();
            }
        }
        let mut bg = self.bg.lock();
        loop {
            if let Some(cause) = self.poison.get() {
                return Err(Error::Poisoned { cause: cause.clone() });
            }
            if self.view.load().imms.is_empty() {
                return Ok(());
            }
            if bg.shutdown {
                return Err(Error::Closed);
            }
            self.bg_cv.notify_all();
            self.done_cv.wait_for(&mut bg, Duration::from_millis(50));
        }
    }
}
