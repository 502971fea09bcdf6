//! What readers see: the [`View`] (memtables and tree, swapped as a whole) and the [`ReadPin`]
//! of a reader at a fixed sequence number.
//!
//! Invariant: a reader loads the visible sequence number, then the view (or, for reads as of
//! now, the view first: see `Inner::get_latest`); every write at or below that number is in the
//! view, because the writer publishes the number only after its memtable insert and views change
//! as a whole (memtable switch, flush install and compaction install each swap one `View`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::memtable::Memtable;
use crate::version::Version;

/// What readers see: the memtables and the tree, changed only as a whole.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) mem: Arc<Memtable>,
    /// Immutable memtables, newest first.
    pub(crate) imms: Vec<Arc<Memtable>>,
    pub(crate) version: Arc<Version>,
}

/// A registered reader at a fixed sequence number (an iterator; snapshots count themselves):
/// while one is open, writes prune no versions. Registration (`SeqCst` increment) comes before
/// the reader loads `visible` (`SeqCst`), and a writer loads the count (`SeqCst`) before it
/// prunes: a writer that saw none prunes only below what any later reader will load.
pub(crate) struct ReadPin(Arc<AtomicUsize>);

impl ReadPin {
    pub(crate) fn new(pins: &Arc<AtomicUsize>) -> ReadPin {
        pins.fetch_add(1, Ordering::SeqCst);
        ReadPin(pins.clone())
    }
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
