//! `Snapshot`: a consistent point-in-time view. It registers its sequence number so that
//! compaction keeps every version it can see, until it is dropped.

use std::ops::RangeBounds;
use std::sync::Arc;

use bytes::Bytes;

use crate::bounds::{prefix_bounds, user_bounds};
use crate::error::Result;
use crate::iter::Iter;

use super::inner::Inner;

/// Reads as of the moment [`crate::Db::snapshot`] was called.
pub struct Snapshot {
    inner: Arc<Inner>,
    seq: u64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("seq", &self.seq).finish()
    }
}

impl Snapshot {
    pub(super) fn new(inner: Arc<Inner>) -> Snapshot {
        let seq = inner.add_snapshot();
        Snapshot { inner, seq }
    }

    /// The sequence number of the last write this snapshot sees.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The value of `key` as of the snapshot.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.inner.get_at(key.as_ref(), self.seq)
    }

    /// Live keys in `range` as of the snapshot, in order (`.rev()` for descending).
    pub fn scan<K: AsRef<[u8]>>(&self, range: impl RangeBounds<K>) -> Iter {
        self.inner.iter(self.seq, user_bounds(&range))
    }

    /// Every live key as of the snapshot.
    pub fn iter(&self) -> Iter {
        self.scan::<&[u8]>(..)
    }

    /// Live keys starting with `prefix` as of the snapshot.
    pub fn prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        self.inner.iter(self.seq, prefix_bounds(prefix.as_ref()))
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.inner.drop_snapshot(self.seq);
    }
}
