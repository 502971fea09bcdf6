//! The write path: `append` frames records into the active segment's buffer (rolling to a new
//! segment when the batch does not fit), and durability: `wait_durable` makes records durable
//! by group commit through the [`Gate`](crate::gate::Gate), `flush` hands buffered records to
//! the operating system, and `record_synced` stores the durable point on close.
//!
//! A roll seals the full segment (index and trailer) and starts the next one under its temporary
//! name, and leaves the fsyncs to `finish_roll` (the roll thread's, or the next sync's, or the
//! next roll's): an append that rolls waits for no disk.
//!
//! Invariants: a segment is named (renamed from its temporary name) only once the segment
//! before it is sealed and durable, so every named segment but the last is sealed; at most one
//! roll is unfinished; the durable point passes the end of a sealed segment only once its roll
//! is finished, and a sync finishes any unfinished roll before it fsyncs the active segment, so
//! syncing makes everything up to `next` durable. Before the finish, a crash of the process
//! leaves the new segment under its temporary name after a sealed one that it continues, which
//! recovery adopts; a power loss may leave anything after the last durable point, which
//! recovery cuts.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use memmap2::MmapMut;
use parking_lot::MutexGuard;

use crate::active::Active;
use crate::error::{Error, Result};
use crate::frame;
use crate::mapped::{Mapped, Premapped};
use crate::meta::Meta;
use crate::options::SyncMode;
use crate::segment::{self, encode_seal, Sealed, INDEX_ENTRY_LEN, SEGMENT_HEADER_LEN, TRAILER_LEN};
use crate::spare::{Spares, Zeroed};
use crate::state::State;

use super::inner::{Inner, PendingRoll};

/// How far behind the written end `start_writeback` stops, a multiple of the page size and of
/// the largest folio a spare's zero-filling makes (64 KiB writes), so that the folio appends go
/// to is never written back under them.
const WRITEBACK_SLACK: u64 = 256 << 10;

/// Replaces the active segment's window with `ahead`, mapped by `map_ahead` without the state
/// lock, where it is valid for the next write, or else takes the window out; returns the map to
/// drop once the lock is let go. Done before the pages written through the window are written
/// back: the new map holds none of them until written through again (see `Mapped::release`).
fn swap_window(st: &mut State, ahead: Option<(u64, Premapped)>) -> Option<MmapMut> {
    let at = st.active.data_len();
    match ahead {
        Some((segment, p)) if segment == st.active.start => st.active.map.install(p, at),
        _ => st.active.map.release(),
    }
}

/// The background threads an append has work for, woken once the log's lock is let go: a
/// thread woken while the appender holds it may take the appender's core (the scheduler lets a
/// woken thread preempt), and every other appender then waits for both.
#[derive(Default)]
pub(super) struct Wakes {
    /// The sync or writeback thread: `bytes_per_sync` was passed.
    kick: bool,
    /// The roll finisher: a roll is to be finished.
    roll: bool,
    /// The spare preparer: a spare segment is wanted.
    spare: bool,
}

impl Inner {
    pub(super) fn append<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<Range<u64>> {
        let mut wakes = Wakes::default();
        let r = self.append_locked(records, &mut wakes);
        self.wake(&wakes);
        r
    }

    /// Sends what `wakes` asks for, without the state lock.
    fn wake(&self, wakes: &Wakes) {
        let send = |to: &parking_lot::Mutex<Option<std::sync::mpsc::Sender<()>>>| {
            if let Some(tx) = to.lock().as_ref() {
                let _ = tx.send(());
            }
        };
        if wakes.roll {
            send(&self.roll_done);
        }
        if wakes.spare {
            send(&self.want_spare);
        }
        if wakes.kick {
            send(&self.kick);
        }
    }

    fn append_locked<R: AsRef<[u8]>>(
        &self,
        records: &[R],
        wakes: &mut Wakes,
    ) -> Result<Range<u64>> {
        let mut st = self.state.lock();
        self.check_writable()?;
        let n = records.len() as u64;
        if n == 0 {
            return Ok(st.next..st.next);
        }
        let mut frames = 0u64;
        for r in records {
            let len = r.as_ref().len();
            if len > u32::MAX as usize {
                return Err(Error::InvalidParam(format!("record of {len} bytes exceeds 4 GiB")));
            }
            frames += frame::frame_len(len);
        }
        let needed = frames + n * INDEX_ENTRY_LEN;
        let capacity = self.opts.segment_capacity;
        let overhead = (SEGMENT_HEADER_LEN + TRAILER_LEN) as u64;
        let limit = if self.opts.oversized { u64::from(u32::MAX) } else { capacity };
        if needed + overhead > limit {
            return Err(Error::InvalidParam(format!(
                "{} of {needed} bytes does not fit in a segment of {limit} bytes",
                if n == 1 { "record" } else { "batch" },
            )));
        }
        if let Some(limit) = self.opts.max_size {
            let used = st.used();
            if used + needed > limit {
                return Err(Error::Full { used, needed, limit });
            }
        }
        // An oversized batch goes into an empty segment, which grows past the capacity.
        if st.active.sealed_len(frames, n) > capacity && !st.active.offsets.is_empty() {
            let r = self.roll(&mut st, wakes);
            self.poisoning(r)?;
        }
        let first = st.next;
        // Each frame records how far the log was durable (see `frame`): recovery tells damage to
        // synced records from a torn write by it.
        let synced = self.durable.load(Ordering::Acquire);
        let active = &mut st.active;
        for (i, r) in records.iter().enumerate() {
            let off = active.data_len();
            active.offsets.push(u32::try_from(off).expect("segment capacity < 4 GiB"));
            let seq = first + i as u64;
            frame::encode(&mut active.buf, seq, i as u64 == n - 1, synced, r.as_ref());
        }
        if active.buf.len() >= self.opts.write_buffer {
            let r = active.flush(true);
            self.poisoning(r)?;
        }
        st.next += n;
        if !st.spare_asked && st.active.data_len() >= capacity / 2 {
            st.spare_asked = true;
            wakes.spare = true;
        }
        if let Some(limit) = self.opts.bytes_per_sync {
            st.unsynced += frames;
            if st.unsynced >= limit && !st.kicked {
                st.kicked = true;
                wakes.kick = true;
            }
        }
        self.metrics.appends.increment(n);
        self.metrics.append_bytes.increment(frames);
        Ok(first..first + n)
    }

    /// Seals the active segment (index, trailer) and starts the next one; `finish_roll` makes
    /// both durable.
    fn roll(&self, st: &mut State, wakes: &mut Wakes) -> Result<()> {
        // The segment sealed here must be the last unfinished one.
        self.finish_roll()?;
        let a = &mut st.active;
        a.flush(false)?;
        let data_end = a.data_len();
        a.map.unmap();
        let seal = encode_seal(&a.offsets, data_end);
        fail::fail_point!("wal::write::seal", |_| Err(Error::injected("write", &a.path)));
        // The seal overwrites the preallocated space reserved for it, and only what is left past
        // it is cut: freeing blocks can be slow (a file system mounted with `discard` discards
        // them before returning), and cutting to `data_end` first would free the seal's blocks
        // only to allocate them again. A crash before the cut leaves a file whose length does not
        // match its trailer: an unsealed last segment, scanned up to its last record, as after a
        // crash in the middle of writing the seal.
        a.file.write_all_at(&seal, data_end).map_err(|e| Error::io("write", &a.path, e))?;
        a.file
            .set_len(data_end + seal.len() as u64)
            .map_err(|e| Error::io("truncate", &a.path, e))?;
        let end = a.end();
        let sealed = Sealed {
            start: a.start,
            count: a.offsets.len() as u64,
            path: a.path.clone(),
            file_len: data_end + seal.len() as u64,
        };
        let (active, new_file, new_tmp) = self.begin_segment(end)?;
        st.sealed_bytes += sealed.file_len;
        st.sealed.push_back(sealed);
        let old = std::mem::replace(&mut st.active, active);
        *self.rolling.lock() = Some(PendingRoll {
            old_file: old.file,
            old_path: old.path,
            old_end: end,
            new_start: end,
            new_file,
            new_tmp,
            new_header_durable: st.active.header_durable.clone(),
        });
        wakes.roll = true;
        // A log that filled one segment is likely to fill the next: its spare gets the whole
        // segment's time to be written (asked only at half of it, a fill was often unfinished
        // when the next roll came, and the roll waited for it).
        st.spare_asked = true;
        wakes.spare = true;
        self.metrics.segments_sealed.increment(1);
        Ok(())
    }

    /// Creates the empty segment starting at `start`, to append to, from a recycled segment,
    /// else from the zero-filled spare. A spare still being filled is waited for: the rest of
    /// its fill is shorter than a whole one here, and two fills at once would share the disk.
    pub(super) fn create_segment(&self, start: u64) -> Result<Active> {
        // Held until the spare is renamed, so the preparer cannot create a new file under its name.
        let mut spares = self.spare.lock();
        let (spare, recycled) = self.take_spare(&mut spares, true);
        let (file, path) = segment::create(
            &self.dir,
            start,
            self.opts.segment_capacity,
            self.opts.preallocate,
            self.opts.file_mode,
            spare,
            recycled,
        )?;
        let mut active =
            Active::new(start, path, file, Vec::new(), SEGMENT_HEADER_LEN as u64, &self.opts)?;
        active.recycled = recycled;
        Ok(active)
    }

    /// The spare the next segment is made of, if any, and whether it is a recycled segment. A
    /// zero-filled spare still being filled is waited for only by a roll whose appends wait for
    /// the disk anyway (`wait`); otherwise the segment is made without one.
    fn take_spare(
        &self,
        spares: &mut MutexGuard<'_, Spares>,
        wait: bool,
    ) -> (Option<(File, PathBuf)>, bool) {
        match spares.recycled.pop_front() {
            Some(r) => (Some(r), true),
            None => {
                while wait && matches!(spares.zeroed, Zeroed::Filling) {
                    self.spare_filled.wait(spares);
                }
                // A spare still being filled stays the preparer's: it becomes ready for a later
                // roll (or is deleted at close), never an orphan.
                if !matches!(spares.zeroed, Zeroed::Ready(_)) {
                    return (None, false);
                }
                match std::mem::replace(&mut spares.zeroed, Zeroed::None) {
                    Zeroed::Ready(file) => {
                        (Some((file, self.dir.join(segment::SPARE_FILE))), false)
                    }
                    Zeroed::None | Zeroed::Filling => (None, false),
                }
            }
        }
    }

    /// [`Inner::create_segment`] up to `segment::begin`: the segment under its temporary name,
    /// with a second handle of its file for `finish_roll`.
    fn begin_segment(&self, start: u64) -> Result<(Active, File, PathBuf)> {
        let mut spares = self.spare.lock();
        // An append that rolls does not wait for the spare's zero-filling unless every append
        // waits for an fsync; a segment made without a spare is not preallocated (appends go by
        // `pwrite`, and its fsyncs pay for the file's growth).
        let wait = self.opts.sync == SyncMode::Always;
        let (spare, recycled) = self.take_spare(&mut spares, wait);
        let preallocate = self.opts.preallocate && (wait || spare.is_some());
        let (file, tmp) = segment::begin(
            &self.dir,
            start,
            self.opts.segment_capacity,
            preallocate,
            self.opts.file_mode,
            spare,
            recycled,
        )?;
        drop(spares);
        let second = file.try_clone().map_err(|e| Error::io("duplicate", &tmp, e))?;
        let path = self.dir.join(segment::file_name(start));
        let mut active = Active::begun(start, path, &tmp, file, &self.opts)?;
        active.recycled = recycled;
        Ok((active, second, tmp))
    }

    /// Finishes the last roll if it is unfinished: makes the new segment's header durable,
    /// fsyncs the segment it sealed, then names the new one, and only then raises the durable
    /// point to the end of the sealed segment. A failure poisons the log.
    ///
    /// The new segment is fsynced first: appends to it go by `pwrite` until then (see
    /// `Active::header_durable`), and after the sealed segment's fsync they would have written
    /// more. Until the rename it is a temporary file that recovery ignores, so the order of the
    /// two fsyncs does not matter to a crash.
    pub(super) fn finish_roll(&self) -> Result<()> {
        let _finishing = self.finishing.lock();
        let Some(p) = self.rolling.lock().take() else { return Ok(()) };
        let r = p
            .new_file
            .sync_all()
            .map_err(|e| Error::io("fsync", &p.new_tmp, e))
            .map(|()| p.new_header_durable.store(true, Ordering::Release))
            .and_then(|()| self.fsync(&p.old_file, &p.old_path))
            .and_then(|()| segment::name(&self.dir, p.new_start, &p.new_tmp));
        self.poisoning(r)?;
        self.durable.fetch_max(p.old_end, Ordering::AcqRel);
        self.gate.wake_covered(p.old_end);
        Ok(())
    }

    /// Maps, without the state lock, the window the active segment's next writes go to after a
    /// sync (`Mapped::plan`); `None` when the map is not used or cannot be made (the writer then
    /// maps it itself). With the start of the segment it belongs to.
    fn map_ahead(&self) -> Option<(u64, Premapped)> {
        let (segment, plan, file) = {
            let st = self.state.lock();
            let a = &st.active;
            (a.start, a.map.plan(a.data_len())?, a.writeback_handle.clone())
        };
        Some((segment, Mapped::premap(&file, plan).ok()?))
    }

    fn fsync(&self, file: &File, path: &Path) -> Result<()> {
        #[cfg(test)]
        if self.fail_next_sync.swap(false, Ordering::AcqRel) {
            return Err(Error::io("fdatasync", path, std::io::Error::other("injected failure")));
        }
        fail::fail_point!("wal::write::fsync", |_| Err(Error::injected("fdatasync", path)));
        let t = Instant::now();
        file.sync_data().map_err(|e| Error::io("fdatasync", path, e))?;
        let took = t.elapsed();
        self.gate.last_fsync_ns.store(took.as_nanos() as u64, Ordering::Relaxed);
        self.metrics.fsyncs.increment(1);
        self.metrics.fsync_seconds.record(took.as_secs_f64());
        Ok(())
    }

    /// Makes every record below `target` durable. Callers lead in turn, at most
    /// `syncs_in_flight` at once: a leader writes out and fsyncs everything appended so far,
    /// while the others sleep and wake when it is done, most finding their records durable
    /// already (group commit).
    pub(super) fn wait_durable(&self, target: u64) -> Result<()> {
        let covered = || self.durable.load(Ordering::Acquire) >= target;
        if covered() {
            return Ok(());
        }
        self.gate.arrivals.fetch_add(1, Ordering::AcqRel);
        let Some(leader) = self.gate.lead_unless(target, covered) else { return Ok(()) };
        let slot = leader.slot.expect("a sync leader holds one slot");
        if let Some(cause) = self.poison.get() {
            return Err(Error::Poisoned { cause: cause.clone() });
        }
        self.gate.gather();
        // The window written through is unmapped after the state lock is let go (see
        // `Mapped::release`), and its successor mapped before the lock is taken: mapping and
        // unmapping wait for the process's address-space lock, which others' mappings hold for
        // milliseconds at times, and appends would wait behind them for the state lock.
        let mut ahead = self.map_ahead();
        let window;
        let (file, path, upto, ticket) = loop {
            // The segments before the active one must be durable before it is synced. A roll's
            // fsyncs run without the state lock, so that appends go on meanwhile (under it they
            // held up the writer for the whole fsync of a sealed segment); a roll that comes in
            // between is finished in turn.
            self.finish_roll()?;
            let mut st = self.state.lock();
            if self.rolling.lock().is_some() {
                continue;
            }
            window = swap_window(&mut st, ahead.take());
            let r = st.active.flush(false);
            self.poisoning(r)?;
            st.unsynced = 0;
            st.kicked = false;
            let ticket = self.gate.tickets.fetch_add(1, Ordering::AcqRel);
            // A leader that starts while this sync runs gathers the appenders that arrive after
            // this point.
            self.gate
                .released_at
                .store(self.gate.arrivals.load(Ordering::Acquire), Ordering::Release);
            #[expect(
                clippy::indexing_slicing,
                reason = "the gate hands out slots below syncs_in_flight, the number of sync handles"
            )]
            let file = st.active.sync_handles[slot as usize].clone();
            break (file, st.active.path.clone(), st.next, ticket);
        };
        drop(window);
        let r = self.fsync(&file, &path);
        #[cfg(test)]
        let hook = self.after_sync.lock().clone();
        #[cfg(test)]
        let r = match (r, hook) {
            (Ok(()), Some(hook)) => hook(ticket),
            (r, _) => r,
        };
        let r = self.poisoning(r);
        // Publish in ticket order: an earlier sync still under way may yet fail, and then the
        // records before `upto` that only it covered would be lost.
        self.gate.wait_turn(ticket);
        let poisoned = self.poison.get().cloned();
        self.gate.end_turn(ticket);
        r?;
        if let Some(cause) = poisoned {
            return Err(Error::Poisoned { cause });
        }
        let before = self.durable.fetch_max(upto, Ordering::AcqRel);
        self.metrics.group_records.record(upto.saturating_sub(before) as f64);
        leader.finish(upto.max(before));
        Ok(())
    }

    pub(super) fn flush(&self) -> Result<()> {
        let mut st = self.state.lock();
        self.check_writable()?;
        let r = st.active.flush(true);
        self.poisoning(r)
    }

    /// Starts the writeback of the active segment's bytes written since the last call, without
    /// waiting for it (`bytes_per_sync`). Advisory: durability still comes only from a sync or a
    /// roll's fsync, which then find little left to write.
    pub(super) fn start_writeback(&self) {
        // The window is replaced first, so that the pages written back are no longer mapped
        // (see `Mapped::release`); no system call under the state lock: a thread preempted
        // there would hold up appends.
        let ahead = self.map_ahead();
        let (window, range) = {
            let mut st = self.state.lock();
            st.unsynced = 0;
            st.kicked = false;
            let window = swap_window(&mut st, ahead);
            let a = &mut st.active;
            // Pages near the end are still being filled: writing them back now would only
            // make the next append to them fault again.
            let to = a.written.saturating_sub(WRITEBACK_SLACK) & !(WRITEBACK_SLACK - 1);
            let range = (to > a.written_back).then(|| {
                let from = std::mem::replace(&mut a.written_back, to);
                (a.writeback_handle.clone(), from, to)
            });
            (window, range)
        };
        drop(window);
        if let Some((file, from, to)) = range {
            crate::writeback::start(&file, from, to - from);
            self.metrics.writebacks.increment(1);
        }
        fail::fail_point!("wal::write::start_writeback");
    }

    pub(super) fn sync(&self) -> Result<()> {
        self.check_writable()?;
        let next = self.state.lock().next;
        self.wait_durable(next)
    }

    /// Stores in the meta file how far the log is durable, once nothing more is appended (on
    /// close): the last records synced are then known to recovery as synced even though no later
    /// frame claims it. Only when the tail segment holds records the meta file does not cover.
    pub(super) fn record_synced(&self) -> Result<()> {
        // A truncation writes the meta file without the state lock: not at the same time.
        let _layout = self.layout.write();
        let mut st = self.state.lock();
        let durable = self.durable.load(Ordering::Acquire).min(st.next);
        if durable <= st.meta.synced_below.max(st.active.start) {
            return Ok(());
        }
        let meta = Meta { synced_below: durable, ..st.meta };
        let r = st.store_meta(meta, &self.dir, &self.opts);
        self.poisoning(r)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::thread;

    use parking_lot::Mutex;

    use crate::error::Error;
    use crate::{Options, SyncMode, Wal};

    #[test]
    fn failed_fsync_poisons_writes_but_not_reads() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), Options::default().sync(SyncMode::Always)).unwrap();
        assert_eq!(wal.append(b"kept").unwrap(), 0);
        wal.inner.fail_next_sync.store(true, Ordering::Release);
        let err = wal.append(b"lost").unwrap_err();
        assert!(matches!(err, Error::Io { op: "fdatasync", .. }), "{err}");
        for e in [
            wal.append(b"x").unwrap_err(),
            wal.sync().unwrap_err(),
            wal.truncate_front(1).unwrap_err(),
        ] {
            assert!(matches!(&e, Error::Poisoned { cause } if cause.contains("injected")), "{e}");
        }
        assert_eq!(&wal.read(0).unwrap()[..], b"kept");
        drop(wal);
        let wal = Wal::open(dir.path(), Options::default()).unwrap();
        assert_eq!(&wal.read(0).unwrap()[..], b"kept");
        wal.append(b"after reopen").unwrap();
    }

    /// Two syncs overlap; the first fails after the second has ended. The second must not call
    /// its records durable: the first one's records, below them, may be lost.
    #[test]
    fn a_sync_that_ends_first_waits_for_an_earlier_one_and_fails_with_it() {
        use std::sync::mpsc::channel;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let opts = Options::default().sync(SyncMode::Always).syncs_in_flight(2);
        let wal = Arc::new(Wal::open(dir.path(), opts).unwrap());
        let (first_in, first_in_rx) = channel::<()>();
        let (second_done, second_done_rx) = channel::<()>();
        let (first_in, second_done) = (Mutex::new(first_in), Mutex::new(second_done));
        let second_done_rx = Mutex::new(second_done_rx);
        *wal.inner.after_sync.lock() = Some(Arc::new(move |ticket| {
            if ticket == 0 {
                first_in.lock().send(()).unwrap();
                let ended = second_done_rx.lock().recv_timeout(Duration::from_secs(10));
                assert!(ended.is_ok(), "the second sync never ended");
                Err(Error::io("fdatasync", Path::new("seg"), std::io::Error::other("injected")))
            } else {
                second_done.lock().send(()).unwrap();
                Ok(())
            }
        }));
        let w = wal.clone();
        let first = thread::spawn(move || w.append(b"first"));
        first_in_rx.recv_timeout(Duration::from_secs(10)).expect("first sync started");
        let second = wal.append(b"second").unwrap_err();
        assert!(
            matches!(&second, Error::Poisoned { cause } if cause.contains("injected")),
            "{second}"
        );
        let first = first.join().unwrap().unwrap_err();
        assert!(matches!(first, Error::Io { op: "fdatasync", .. }), "{first}");
        assert_eq!(wal.inner.durable.load(Ordering::Acquire), 0);
    }
}
