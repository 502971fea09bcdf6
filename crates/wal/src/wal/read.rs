//! Reads: records of the active segment come from its file and buffer, records of sealed
//! segments through a cache of open [`SegmentReader`]s; [`Iter`] reads a range a run at a time.
//! Every record read is verified (checksum, sequence number); reads return copies, so a later
//! truncation never changes what a read returned.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::segment::{Sealed, SegmentReader};

use super::inner::Inner;

/// Bytes read at once by iterators.
const READ_RUN_BYTES: u64 = 1 << 20;

impl Inner {
    fn reader(&self, seg: &Sealed) -> Result<Arc<SegmentReader>> {
        if let Some(r) = self.readers.lock().get(&seg.start) {
            return Ok(r.clone());
        }
        let r = Arc::new(SegmentReader::open(seg)?);
        self.readers.lock().put(seg.start, r.clone());
        Ok(r)
    }

    /// Reads records `from..until` (at least one, about `max_bytes` at most).
    pub(super) fn read_run(
        &self,
        from: u64,
        until: u64,
        max_bytes: u64,
    ) -> Result<Vec<(u64, Bytes)>> {
        let _layout = self.layout.read();
        let seg = {
            let st = self.state.lock();
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if from < st.first() || from >= st.next {
                return Err(Error::NotFound { seq: from, first: st.first(), next: st.next });
            }
            if from >= st.active.start {
                return st.active.read_run(from, until, max_bytes);
            }
            #[expect(
                clippy::indexing_slicing,
                reason = "first() <= from < active.start and the sealed segments are contiguous up to \
                          active.start, so one of them holds `from`"
            )]
            st.sealed[st.sealed_holding(from)].clone()
        };
        self.reader(&seg)?.read_run(from, until, max_bytes)
    }
}

/// Iterator over a range of records, from [`Wal::iter`](crate::Wal::iter). Reads about 1 MiB at
/// a time.
pub struct Iter {
    inner: Arc<Inner>,
    next: u64,
    end: u64,
    buf: VecDeque<(u64, Bytes)>,
    done: bool,
}

impl Iter {
    /// Records `next..end` of the log.
    pub(super) fn new(inner: Arc<Inner>, next: u64, end: u64) -> Iter {
        Iter { inner, next, end, buf: VecDeque::new(), done: false }
    }
}

impl Iterator for Iter {
    type Item = Result<(u64, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(item) = self.buf.pop_front() {
            return Some(Ok(item));
        }
        if self.done || self.next >= self.end {
            return None;
        }
        match self.inner.read_run(self.next, self.end, READ_RUN_BYTES) {
            Ok(run) => {
                self.next = run.last().map_or(self.end, |(s, _)| s + 1);
                self.buf = run.into();
                self.buf.pop_front().map(Ok)
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl fmt::Debug for Iter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter").field("next", &self.next).field("end", &self.end).finish()
    }
}
