//! Leveled compaction: choosing work by level score, and running it as a k-way merge that drops
//! versions no reader can see.
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
//! level can hold the key. Output tables are cut near `target_file_size`, never inside a user key.

use std::collections::HashSet;
use std::sync::Arc;

use crate::db::Inner;
use crate::error::Result;
use crate::iter::{Merge, Source};
use crate::key::{self, Kind};
use crate::manifest::{Edit, TableMeta};
use crate::options::NUM_LEVELS;
use crate::table::{self, TableBuilder};
use crate::version::{TableFile, Version};

/// A chosen compaction: `inputs[0]` from `level`, `inputs[1]` from `level + 1`.
#[derive(Debug)]
pub(crate) struct Compaction {
    pub(crate) level: usize,
    pub(crate) inputs: [Vec<Arc<TableFile>>; 2],
}

impl Compaction {
    fn ids(&self) -> impl Iterator<Item = u64> + '_ {
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

/// Chooses the next compaction and marks its tables busy, or `None` if no level needs one.
pub(crate) fn pick(inner: &Inner) -> Option<Compaction> {
    let mut tree = inner.tree.lock();
    let version = inner.view.load().version.clone();
    let opts = &inner.opts;
    let busy = |t: &Arc<TableFile>| tree.busy.contains(&t.meta.id);
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
        let cursor = &tree.cursors[level];
        let after =
            files.iter().position(|t| t.meta.smallest_user() > cursor.as_slice() && !busy(t));
        let i = after.or_else(|| files.iter().position(|t| !busy(t)))?;
        vec![files[i].clone()]
    };
    let c = expand(&version, level, first);
    if !claim(&mut tree.busy, &c) {
        return None;
    }
    if level > 0 {
        tree.cursors[level] = c.inputs[0][0].meta.largest_user().to_vec();
    }
    Some(c)
}

/// When the database is idle: every L0 table merged into L1, so that reads and scans see one
/// sorted run fewer per table and overwritten versions stop taking space. `None` if L0 is empty or
/// a compaction holds its tables.
pub(crate) fn pick_idle(inner: &Inner) -> Option<Compaction> {
    let mut tree = inner.tree.lock();
    let version = inner.view.load().version.clone();
    if version.levels[0].is_empty() || !inner.view.load().imms.is_empty() {
        return None;
    }
    let c = expand(&version, 0, version.levels[0].clone());
    claim(&mut tree.busy, &c).then_some(c)
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

/// Runs a compaction and installs its result. The busy marks are cleared whatever happens.
pub(crate) fn run(inner: &Inner, c: Compaction) -> Result<()> {
    let r = execute(inner, &c);
    let mut tree = inner.tree.lock();
    for id in c.ids() {
        tree.busy.remove(&id);
    }
    drop(tree);
    inner.notify_done();
    r
}

fn execute(inner: &Inner, c: &Compaction) -> Result<()> {
    let out_level = c.level + 1;
    let mut edit = Edit::default();
    for (i, files) in c.inputs.iter().enumerate() {
        edit.deleted.extend(files.iter().map(|t| (c.level + i, t.meta.id)));
    }
    // Tables with nothing below them that do not overlap each other (one table, or L0 tables of
    // sequential writes) move down without being rewritten.
    if c.inputs[1].is_empty() && disjoint(&c.inputs[0]) {
        edit.added.extend(c.inputs[0].iter().map(|t| (out_level, t.meta.clone())));
        let moved = c.inputs[0].clone();
        return inner.install_compaction(edit, c, moved, 0, 0);
    }
    let version = inner.view.load().version.clone();
    let mut sources: Vec<Source> = c.inputs[0].iter().map(|t| Source::table(t, true)).collect();
    if c.level > 0 {
        sources = vec![Source::level(c.inputs[0].clone(), true)];
    }
    if !c.inputs[1].is_empty() {
        sources.push(Source::level(c.inputs[1].clone(), true));
    }
    let mut merge = Merge::new(sources, true);
    merge.seek(None)?;
    let mut keep = Retention::new(inner.snapshot_seqs());
    let bottommost = |user: &[u8]| {
        (out_level + 1..NUM_LEVELS)
            .all(|l| version.levels[l].is_empty() || version.find(l, user).is_none())
    };
    let mut outputs: Vec<Arc<TableFile>> = Vec::new();
    let mut builder: Option<(u64, TableBuilder)> = None;
    let mut last_user: Vec<u8> = Vec::new();
    let mut read = 0u64;
    while let Some(k) = merge.key() {
        read += 1;
        if keep.keep(k, bottommost) {
            let user = key::user(k);
            if let Some((_, b)) = &builder {
                if b.size() >= inner.opts.target_file_size && user != last_user.as_slice() {
                    let (id, b) = builder.take().expect("builder");
                    outputs.push(inner.finish_table(id, b)?);
                }
            }
            if builder.is_none() {
                let id = inner.new_file_id();
                builder = Some((
                    id,
                    TableBuilder::create(&inner.dir.join(table::file_name(id)), &inner.opts)?,
                ));
            }
            let (_, b) = builder.as_mut().expect("builder");
            b.add(k, &merge.value())?;
            last_user.clear();
            last_user.extend_from_slice(user);
        }
        merge.advance()?;
    }
    if let Some((id, b)) = builder.take() {
        outputs.push(inner.finish_table(id, b)?);
    }
    crate::manifest::sync_dir(&inner.dir)?;
    edit.added.extend(outputs.iter().map(|t| (out_level, t.meta.clone())));
    let in_bytes: u64 = c.inputs.iter().flatten().map(|t| t.meta.size).sum();
    let out_bytes: u64 = outputs.iter().map(|t| t.meta.size).sum();
    tracing::debug!(level = c.level, entries = read, in_bytes, out_bytes, "compaction done");
    inner.install_compaction(edit, c, outputs, in_bytes, out_bytes)
}

/// Whether no two of `tables` share a user key.
fn disjoint(tables: &[Arc<TableFile>]) -> bool {
    let mut sorted: Vec<&Arc<TableFile>> = tables.iter().collect();
    sorted.sort_by(|a, b| a.meta.smallest_user().cmp(b.meta.smallest_user()));
    sorted.windows(2).all(|w| w[0].meta.largest_user() < w[1].meta.smallest_user())
}

/// What a new table adds to the manifest.
pub(crate) fn meta_of(id: u64, built: &table::Built) -> TableMeta {
    TableMeta {
        id,
        size: built.size,
        entries: built.entries,
        smallest: built.smallest.clone(),
        largest: built.largest.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::make;

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
