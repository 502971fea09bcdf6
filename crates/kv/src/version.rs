//! `Version`: an immutable picture of the tree (the SSTables of every level). Readers and
//! iterators hold an `Arc<Version>`; a flush or compaction installs a new one. Invariants: L0
//! tables are ordered newest first and may overlap; in every deeper level tables are ordered by key
//! and their internal-key ranges are disjoint, and a user key never spans two tables of a level.
//!
//! A table file is deleted when the last version holding it is dropped after a compaction marked
//! it obsolete, so a reader never loses a file under its feet.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::key;
use crate::manifest::{State, TableMeta};
use crate::options::NUM_LEVELS;
use crate::table::Table;

/// An SSTable of the tree: what the manifest says about it and the open reader.
#[derive(Debug)]
pub(crate) struct TableFile {
    pub(crate) meta: TableMeta,
    pub(crate) table: Arc<Table>,
    obsolete: AtomicBool,
}

impl TableFile {
    pub(crate) fn new(meta: TableMeta, table: Table) -> TableFile {
        TableFile { meta, table: Arc::new(table), obsolete: AtomicBool::new(false) }
    }

    pub(crate) fn mark_obsolete(&self) {
        self.obsolete.store(true, Ordering::Release);
    }

    pub(crate) fn path(&self) -> &PathBuf {
        &self.table.path
    }

    /// Whether the table's user-key range meets `[lo, hi]` (either end open when `None`).
    pub(crate) fn overlaps(&self, lo: Option<&[u8]>, hi: Option<&[u8]>) -> bool {
        lo.is_none_or(|lo| self.meta.largest_user() >= lo)
            && hi.is_none_or(|hi| self.meta.smallest_user() <= hi)
    }
}

impl Drop for TableFile {
    fn drop(&mut self) {
        if self.obsolete.load(Ordering::Acquire) {
            if let Err(e) = std::fs::remove_file(&self.table.path) {
                tracing::warn!(path = %self.table.path.display(), error = %e, "removing obsolete table failed");
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Version {
    pub(crate) levels: Vec<Vec<Arc<TableFile>>>,
    pub(crate) log_number: u64,
}

impl Version {
    pub(crate) fn empty() -> Version {
        Version { levels: vec![Vec::new(); NUM_LEVELS], log_number: 0 }
    }

    /// Orders each level by its invariant.
    #[expect(clippy::indexing_slicing, reason = "levels holds NUM_LEVELS > 0 entries")]
    pub(crate) fn sort(&mut self) {
        self.levels[0].sort_by_key(|t| std::cmp::Reverse(t.meta.id));
        for l in &mut self.levels[1..] {
            l.sort_by(|a, b| key::compare(&a.meta.smallest, &b.meta.smallest));
        }
    }

    /// The manifest state of this version.
    pub(crate) fn state(&self, last_seq: u64, next_file: u64) -> State {
        let mut s = State::new();
        for (level, ts) in s.levels.iter_mut().zip(&self.levels) {
            for t in ts {
                level.insert(t.meta.id, t.meta.clone());
            }
        }
        s.log_number = self.log_number;
        s.last_seq = last_seq;
        s.next_file = next_file;
        s
    }

    /// The table of a sorted level (L1+) that may hold `user`.
    #[expect(
        clippy::indexing_slicing,
        reason = "callers pass level < NUM_LEVELS, and levels holds NUM_LEVELS entries"
    )]
    pub(crate) fn find(&self, level: usize, user: &[u8]) -> Option<&Arc<TableFile>> {
        let files = &self.levels[level];
        let i = files.partition_point(|t| t.meta.largest_user() < user);
        files.get(i).filter(|t| t.meta.smallest_user() <= user)
    }

    /// Tables of `level` overlapping the user-key range `[lo, hi]`.
    #[expect(
        clippy::indexing_slicing,
        reason = "callers pass level < NUM_LEVELS, and levels holds NUM_LEVELS entries"
    )]
    pub(crate) fn overlapping(
        &self,
        level: usize,
        lo: Option<&[u8]>,
        hi: Option<&[u8]>,
    ) -> Vec<Arc<TableFile>> {
        self.levels[level].iter().filter(|t| t.overlaps(lo, hi)).cloned().collect()
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "callers pass level < NUM_LEVELS, and levels holds NUM_LEVELS entries"
    )]
    pub(crate) fn level_bytes(&self, level: usize) -> u64 {
        self.levels[level].iter().map(|t| t.meta.size).sum()
    }

    pub(crate) fn tables(&self) -> impl Iterator<Item = &Arc<TableFile>> {
        self.levels.iter().flatten()
    }
}
