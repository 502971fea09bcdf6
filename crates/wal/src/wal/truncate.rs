//! Truncation at both ends. `truncate_front` moves the first live record in the meta file
//! first, then drops the segments below it (keeping one for reuse, see `spare`);
//! `truncate_back` is made crash-atomic by `State::truncate_back`. Both hold the `layout` lock
//! for writing and the whole gate, so no read of a segment and no sync is under way meanwhile.

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::meta::Meta;
use crate::segment::{self, remove_file, sync_dir, Sealed};
use crate::spare::MAX_RECYCLED;
use crate::state::State;

use super::inner::Inner;

impl Inner {
    /// Appends go on while the meta file is written and the dropped segments go: only the
    /// state lock excludes them, and it is not held across that I/O (reads, syncs and other
    /// truncations are excluded by the `layout` lock and the gate, and appends neither read the
    /// meta file's fields nor touch the front segments).
    pub(super) fn truncate_front(&self, seq: u64) -> Result<()> {
        self.check_writable()?;
        let _layout = self.layout.write();
        let _leader = self.gate.lead();
        let meta = {
            let mut st = self.state.lock();
            if seq <= st.first() {
                return Ok(());
            }
            if seq > st.next {
                // The log is emptied and restarts at `seq`: its active segment goes too, so
                // the last roll must be finished first.
                self.finish_roll()?;
                let r = self.drop_front(&mut st, seq);
                return self.poisoning(r);
            }
            Meta { first_seq: seq, ..st.meta }
        };
        let r = meta.store(&self.dir, self.opts.file_mode);
        self.poisoning(r)?;
        let dropped = {
            let mut st = self.state.lock();
            st.meta = meta;
            let mut dropped = Vec::new();
            while st.sealed.front().is_some_and(|s| s.end() <= seq) {
                let s = st.sealed.pop_front().expect("front exists");
                st.sealed_bytes -= s.file_len;
                dropped.push(s);
            }
            dropped
        };
        for s in &dropped {
            self.readers.lock().pop(&s.start);
            let r = self.discard(s);
            self.poisoning(r)?;
        }
        if !dropped.is_empty() {
            let r = sync_dir(&self.dir);
            self.poisoning(r)?;
        }
        Ok(())
    }

    fn drop_front(&self, st: &mut State, seq: u64) -> Result<()> {
        st.store_meta(Meta { first_seq: seq, ..st.meta }, &self.dir, &self.opts)?;
        if seq > st.next {
            // Nothing live is left: the log restarts empty at `seq`. Old segments go first, from
            // the front, so that a crash leaves a contiguous suffix that recovery drops.
            while let Some(s) = st.sealed.pop_front() {
                self.discard(&s)?;
            }
            st.sealed_bytes = 0;
            self.readers.lock().clear();
            remove_file(&st.active.path)?;
            sync_dir(&self.dir)?;
            st.active = self.create_segment(seq)?;
            st.next = seq;
            self.durable.fetch_max(seq, Ordering::AcqRel);
        }
        let mut removed = false;
        while st.sealed.front().is_some_and(|s| s.end() <= seq) {
            let s = st.sealed.pop_front().expect("front exists");
            self.readers.lock().pop(&s.start);
            self.discard(&s)?;
            st.sealed_bytes -= s.file_len;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Removes a sealed segment that truncation dropped, or keeps it for reuse as a later
    /// segment: its blocks are written already, so reusing it costs no zero-filling. Callers hold
    /// the `layout` lock for writing, so no read of the segment is under way (reads copy what
    /// they return).
    fn discard(&self, seg: &Sealed) -> Result<()> {
        let opts = &self.opts;
        if opts.recycle && opts.preallocate && seg.file_len <= opts.segment_capacity {
            let mut spares = self.spare.lock();
            if spares.recycled.len() < MAX_RECYCLED {
                let recycled =
                    segment::recycle(&self.dir, seg, opts.segment_capacity, opts.file_mode)?;
                spares.recycled.push_back(recycled);
                self.metrics.segments_recycled.increment(1);
                return Ok(());
            }
        }
        remove_file(&seg.path)
    }

    pub(super) fn truncate_back(&self, seq: u64) -> Result<()> {
        self.check_writable()?;
        let _layout = self.layout.write();
        let _leader = self.gate.lead();
        let mut st = self.state.lock();
        if seq >= st.next {
            return Ok(());
        }
        if seq < st.first() {
            return Err(Error::InvalidParam(format!(
                "cannot truncate back to {seq}: records before {} were truncated from the front",
                st.first()
            )));
        }
        self.finish_roll()?;
        let r = st.truncate_back(seq, &self.dir, &self.opts);
        self.readers.lock().clear();
        self.durable.fetch_min(seq, Ordering::AcqRel);
        self.poisoning(r)
    }
}
