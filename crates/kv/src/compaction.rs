//! Leveled compaction policy: which tables to compact next, a pure function of a [`Version`]
//! and the [`Options`] (the running merge is `db::compact`), and which versions a merge keeps
//! ([`Retention`]).
//!
//! Scores: L0 holds `files / l0_compaction_trigger`, L1.. hold `bytes / target(level)` with
//! `target(1) = l1_target_bytes` growing by `level_multiplier`. The highest score of at least 1
//! wins. An L0 compaction takes every L0 table (they overlap, and a newer L0 table must never sit
//! below an older one) plus the overlapping L1 tables; a deeper one takes one table, round robin
//! through the key space, plus the overlapping tables of the next level. Tables in a running
//! compaction are busy and not picked again. A database without writes for
//! `idle_compaction_after` also has its L0 tables merged into L1.
//!
//! What a merge keeps: snapshots split the sequence space into stripes; of each user key it keeps
//! the newest version of every stripe, and drops a tombstone in the oldest stripe when no deeper
//! level can hold the key.

use std::collections::HashSet;
use std::sync::Arc;

use crate::key::{self, Kind};
use crate::options::{Options, NUM_LEVELS};
use crate::version::{TableFile, Version};

/// A chosen compaction: `inputs[0]` from `level`, `inputs[1]` from `level + 1`.
#[derive(Debug)]
pub(crate) struct Compaction {
    pub(crate) level: usize,
    pub(crate) inputs: [Vec<Arc<TableFile>>; 2],
}

impl Compaction {
    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.inputs.iter().flatten().map(|t| t.meta.id)
    }

    fn user_range(&self) -> (Vec<u8>, Vec<u8>) {
        let all = || self.inputs[0].iter().chain(&self.inputs[1]);
        let lo = all().map(|t| t.meta.smallest_user()).min().unwrap_or_default().to_vec();
        let hi = all().map(|t| t.meta.largest_user()).max().unwrap_or_default().to_vec();
        (lo, hi)
    }
}

/// Decides which entries of a sorted run of internal keys survive.
pub(crate) struct Retention {
    snapshots: Vec<u64>,
    /// The user key of the previous entry (a buffer reused from key to key; empty before the
    /// first, which then changes nothing: `last_stripe` starts reset).
    prev_user: Vec<u8>,
    last_stripe: usize,
}

impl Retention {
    pub(crate) fn new(snapshots: Vec<u64>) -> Retention {
        Retention { snapshots, prev_user: Vec::new(), last_stripe: usize::MAX }
    }

    /// Whether to keep `ikey`; `bottommost(user)` says whether no deeper level can hold `user`.
    pub(crate) fn keep(&mut self, ikey: &[u8], bottommost: impl FnOnce(&[u8]) -> bool) -> bool {
        let user = key::user(ikey);
        if self.prev_user != user {
            self.prev_user.clear();
            self.prev_user.extend_from_slice(user);
            self.last_stripe = usize::MAX;
        }
        let stripe = self.snapshots.partition_point(|&s| s < key::seq(ikey));
        if stripe == self.last_stripe {
            return false; // a newer version in the same stripe hides it from every reader
        }
        self.last_stripe = stripe;
        !(key::kind(ikey) == Kind::Delete && stripe == 0 && bottommost(user))
    }
}

/// Chooses the next compaction of `version`, or `None` if no level needs one. Tables in `busy`
/// (those of running compactions) are not picked, and busy tables of a sorted level do not count
/// towards its score; `cursors[level]` is where the round robin through a sorted level stands
/// (the largest user key of the last table it took). The caller marks the tables busy
/// ([`claim`]) and moves the cursor.
#[expect(
    clippy::indexing_slicing,
    reason = "levels and cursors hold NUM_LEVELS entries and level < NUM_LEVELS - 1"
)]
pub(crate) fn pick(
    version: &Version,
    opts: &Options,
    busy: &HashSet<u64>,
    cursors: &[Vec<u8>],
) -> Option<Compaction> {
    let busy = |t: &Arc<TableFile>| busy.contains(&t.meta.id);
    let mut best: Option<(f64, usize)> = None;
    for level in 0..NUM_LEVELS - 1 {
        let files = &version.levels[level];
        if files.iter().any(busy) && level == 0 {
            continue;
        }
        let score = if level == 0 {
            files.len() as f64 / opts.l0_compaction_trigger as f64
        } else {
            let idle: u64 = files.iter().filter(|t| !busy(t)).map(|t| t.meta.size).sum();
            idle as f64 / opts.level_target(level) as f64
        };
        if score >= 1.0 && best.is_none_or(|(b, _)| score > b) {
            best = Some((score, level));
        }
    }
    let (_, level) = best?;
    let first = if level == 0 {
        version.levels[0].clone()
    } else {
        let files = &version.levels[level];
        let cursor = &cursors[level];
        let after = files.iter().find(|t| t.meta.smallest_user() > cursor.as_slice() && !busy(t));
        let t = after.or_else(|| files.iter().find(|t| !busy(t)))?;
        vec![t.clone()]
    };
    Some(expand(version, level, first))
}

/// When the database is idle: every L0 table merged into L1, so that reads and scans see one
/// sorted run fewer per table and overwritten versions stop taking space. `None` if L0 is empty.
#[expect(clippy::indexing_slicing, reason = "levels holds NUM_LEVELS > 0 entries")]
pub(crate) fn pick_idle(version: &Version) -> Option<Compaction> {
    if version.levels[0].is_empty() {
        return None;
    }
    Some(expand(version, 0, version.levels[0].clone()))
}

/// Marks the tables of `c` busy, unless one of them already is (then `false`, nothing marked).
pub(crate) fn claim(busy: &mut HashSet<u64>, c: &Compaction) -> bool {
    if c.ids().any(|id| busy.contains(&id)) {
        return false;
    }
    busy.extend(c.ids());
    true
}

/// Adds the tables of `level + 1` that overlap `first`.
pub(crate) fn expand(version: &Version, level: usize, first: Vec<Arc<TableFile>>) -> Compaction {
    let mut c = Compaction { level, inputs: [first, Vec::new()] };
    let (lo, hi) = c.user_range();
    c.inputs[1] = version.overlapping(level + 1, Some(&lo), Some(&hi));
    c
}

/// Whether no two of `tables` share a user key.
pub(crate) fn disjoint(tables: &[Arc<TableFile>]) -> bool {
    let mut sorted: Vec<&Arc<TableFile>> = tables.iter().collect();
    sorted.sort_by(|a, b| a.meta.smallest_user().cmp(b.meta.smallest_user()));
    sorted
        .iter()
        .zip(sorted.iter().skip(1))
        .all(|(a, b)| a.meta.largest_user() < b.meta.smallest_user())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cache::BlockCache;
    use crate::key::make;
    use crate::manifest::TableMeta;
    use crate::table::{Table, TableBuilder};

    /// A tree for the picker: each table has the key range and size its manifest entry says; the
    /// file behind them all is one small table (the picker reads only the metadata).
    struct Tree {
        _dir: tempfile::TempDir,
        path: PathBuf,
        cache: Arc<BlockCache>,
        version: Version,
    }

    impl Tree {
        fn new() -> Tree {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("000001.sst");
            let mut b = TableBuilder::create(&path, &Options::default()).unwrap();
            b.add(&make(b"k", 1, Kind::Put), b"v").unwrap();
            b.finish().unwrap();
            Tree { _dir: dir, path, cache: Arc::new(BlockCache::new(0)), version: Version::empty() }
        }

        /// Adds table `id`, of user keys `lo..=hi` and `size` bytes, to `level`.
        fn add(mut self, level: usize, id: u64, lo: &str, hi: &str, size: u64) -> Tree {
            let meta = TableMeta {
                id,
                size,
                entries: 1,
                smallest: make(lo.as_bytes(), 1, Kind::Put).into(),
                largest: make(hi.as_bytes(), 1, Kind::Put).into(),
            };
            let table = Table::open(&self.path, id, self.cache.clone(), false).unwrap();
            self.version.levels[level].push(Arc::new(TableFile::new(meta, table)));
            self.version.sort();
            self
        }
    }

    /// L0 compacts at 2 tables; L1 holds 4 KiB, L2 40 KiB.
    fn opts() -> Options {
        Options::default()
            .l0_compaction_trigger(2)
            .l0_stall_triggers(4, 8)
            .l1_target_bytes(4096)
            .level_multiplier(10)
    }

    fn no_cursors() -> Vec<Vec<u8>> {
        vec![Vec::new(); NUM_LEVELS]
    }

    fn cursor_at(level: usize, user: &str) -> Vec<Vec<u8>> {
        let mut c = no_cursors();
        c[level] = user.as_bytes().to_vec();
        c
    }

    /// The level and the table ids of a compaction's two inputs.
    fn shape(c: Option<Compaction>) -> Option<(usize, Vec<u64>, Vec<u64>)> {
        let ids = |ts: &[Arc<TableFile>]| ts.iter().map(|t| t.meta.id).collect::<Vec<_>>();
        c.map(|c| (c.level, ids(&c.inputs[0]), ids(&c.inputs[1])))
    }

    fn pick_in(
        tree: &Tree,
        busy: &[u64],
        cursors: &[Vec<u8>],
    ) -> Option<(usize, Vec<u64>, Vec<u64>)> {
        let busy: HashSet<u64> = busy.iter().copied().collect();
        shape(pick(&tree.version, &opts(), &busy, cursors))
    }

    #[test]
    fn nothing_is_picked_below_every_trigger() {
        assert_eq!(pick_in(&Tree::new(), &[], &no_cursors()), None);
        let tree = Tree::new().add(0, 5, "a", "c", 100).add(1, 1, "a", "z", 4095);
        assert_eq!(pick_in(&tree, &[], &no_cursors()), None);
    }

    #[test]
    fn l0_at_its_trigger_takes_every_l0_table_and_the_l1_tables_they_overlap() {
        let tree = Tree::new()
            .add(0, 5, "a", "c", 100)
            .add(0, 6, "m", "p", 100)
            .add(1, 1, "a", "b", 100)
            .add(1, 2, "d", "f", 100)
            .add(1, 3, "q", "z", 100);
        // L0 newest first; L1 tables within a..=p.
        assert_eq!(pick_in(&tree, &[], &no_cursors()), Some((0, vec![6, 5], vec![1, 2])));
    }

    #[test]
    fn the_highest_score_wins() {
        // L0 scores 1 (2 of 2 tables), L1 3 (12 KiB of 4).
        let tree = Tree::new()
            .add(0, 5, "a", "c", 100)
            .add(0, 6, "d", "f", 100)
            .add(1, 1, "a", "b", 4096)
            .add(1, 2, "c", "d", 4096)
            .add(1, 3, "e", "f", 4096);
        assert_eq!(pick_in(&tree, &[], &no_cursors()), Some((1, vec![1], vec![])));
        // L0 scores 2 (4 of 2), L1 1.5.
        let tree = Tree::new()
            .add(0, 5, "a", "c", 100)
            .add(0, 6, "d", "f", 100)
            .add(0, 7, "g", "h", 100)
            .add(0, 8, "i", "j", 100)
            .add(1, 1, "a", "b", 6144);
        assert_eq!(pick_in(&tree, &[], &no_cursors()), Some((0, vec![8, 7, 6, 5], vec![1])));
    }

    #[test]
    fn a_sorted_level_gives_one_table_at_a_time_round_robin_with_what_it_overlaps_below() {
        let tree = Tree::new()
            .add(1, 1, "a", "b", 3000)
            .add(1, 2, "c", "d", 3000)
            .add(1, 3, "e", "f", 3000)
            .add(2, 10, "c", "c", 100)
            .add(2, 11, "d", "e", 100);
        assert_eq!(pick_in(&tree, &[], &no_cursors()), Some((1, vec![1], vec![])));
        assert_eq!(pick_in(&tree, &[], &cursor_at(1, "b")), Some((1, vec![2], vec![10, 11])));
        assert_eq!(pick_in(&tree, &[], &cursor_at(1, "d")), Some((1, vec![3], vec![11])));
        // Past the last table: back to the first.
        assert_eq!(pick_in(&tree, &[], &cursor_at(1, "f")), Some((1, vec![1], vec![])));
    }

    #[test]
    fn busy_tables_are_not_picked_and_do_not_count() {
        let l1 = || Tree::new().add(1, 1, "a", "b", 3000).add(1, 2, "c", "d", 3000);
        // Busy tables of a sorted level are skipped...
        assert_eq!(pick_in(&l1(), &[1], &no_cursors()), None, "3000 idle bytes of 4096");
        let tree = l1().add(1, 3, "e", "f", 3000);
        assert_eq!(pick_in(&tree, &[1], &no_cursors()), Some((1, vec![2], vec![])));
        assert_eq!(pick_in(&tree, &[2], &cursor_at(1, "b")), Some((1, vec![3], vec![])));
        // ...and a busy L0 table keeps L0 out, whatever its score.
        let tree = l1().add(0, 5, "a", "c", 100).add(0, 6, "d", "f", 100).add(0, 7, "g", "h", 1);
        assert_eq!(pick_in(&tree, &[6], &no_cursors()), Some((1, vec![1], vec![])));
    }

    #[test]
    fn the_idle_pick_merges_every_l0_table_below_its_trigger() {
        assert!(pick_idle(&Tree::new().version).is_none());
        let tree =
            Tree::new().add(0, 5, "b", "c", 100).add(1, 1, "a", "b", 100).add(1, 2, "d", "e", 1);
        assert_eq!(shape(pick_idle(&tree.version)), Some((0, vec![5], vec![1])));
    }

    #[test]
    fn claim_marks_every_table_or_none() {
        let tree = Tree::new().add(0, 5, "a", "c", 100).add(1, 1, "a", "b", 100);
        let c = pick_idle(&tree.version).unwrap();
        let mut busy = HashSet::from([1]);
        assert!(!claim(&mut busy, &c));
        assert_eq!(busy, HashSet::from([1]));
        busy.clear();
        assert!(claim(&mut busy, &c));
        assert_eq!(busy, HashSet::from([1, 5]));
    }

    #[test]
    fn retention_keeps_one_version_per_stripe_and_drops_bottom_tombstones() {
        let mut r = Retention::new(vec![5, 10]);
        let keys = [
            make(b"a", 12, Kind::Put),   // stripe 2 (latest): keep
            make(b"a", 11, Kind::Put),   // stripe 2: hidden
            make(b"a", 9, Kind::Delete), // stripe 1: keep (snapshot 10 sees it)
            make(b"a", 4, Kind::Put),    // stripe 0: keep (snapshot 5 sees it)
            make(b"a", 3, Kind::Put),    // stripe 0: hidden
            make(b"b", 2, Kind::Delete), // stripe 0, bottommost: dropped
            make(b"b", 1, Kind::Put),    // stripe 0: hidden
        ];
        let kept: Vec<bool> = keys.iter().map(|k| r.keep(k, |_| true)).collect();
        assert_eq!(kept, vec![true, false, true, true, false, false, false]);
        let mut r = Retention::new(vec![]);
        assert!(r.keep(&make(b"c", 2, Kind::Delete), |_| false), "tombstone kept above data");
    }
}
