//! What readers see: the [`View`] (memtables and tree, swapped as a whole).
//!
//! Invariant: a reader loads the visible sequence number, then the view (or, for reads as of
//! now, the view first: see `Inner::get_latest`); every write at or below that number is in the
//! view, because the writer publishes the number only after its memtable insert and views change
//! as a whole (memtable switch, flush install and compaction install each swap one `View`).

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
