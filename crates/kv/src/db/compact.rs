//! The compaction threads: each picks work under the tree lock (the choice itself is
//! `compaction::pick`), marks its tables busy, merges them into tables of the next level (cut
//! near `target_file_size`, never inside a user key; disjoint inputs with nothing below move
//! without a rewrite), records the result in the manifest and installs it. `compact_range`
//! runs the same merges on demand.
//!
//! Invariant: an input table is deleted only once the manifest edit that removed it is durable
//! and no version in use holds it (`TableFile::mark_obsolete`).

use std::collections::HashSet;
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bounds::Bounds;
use crate::compaction::{self, Compaction, Retention};
use crate::error::{Error, Result};
use crate::iter::{Merge, Source};
use crate::key;
use crate::manifest::{self, Edit};
use crate::options::NUM_LEVELS;
use crate::table::{self, TableBuilder};
use crate::version::TableFile;
use crate::view::View;

use super::inner::Inner;

impl Inner {
    pub(super) fn compaction_loop(&self) {
        // The last sequence number seen and since when it has not moved: a database without
        // writes for `idle_compaction_after` gets its L0 tables merged down.
        let mut idle_since = (self.visible(), Instant::now());
        loop {
            if self.bg.lock().shutdown {
                return;
            }
            self.reap();
            let seq = self.visible();
            if seq != idle_since.0 {
                idle_since = (seq, Instant::now());
            }
            let idle = self.opts.idle_compaction_after.is_some_and(|d| idle_since.1.elapsed() >= d);
            let work = if self.poison.get().is_some() {
                None
            } else {
                self.pick().or_else(|| if idle { self.pick_idle() } else { None })
            };
            match work {
                Some(c) => {
                    if let Err(e) = self.run(c) {
                        self.set_poison(&e);
                    }
                }
                None => {
                    let mut bg = self.bg.lock();
                    if !bg.shutdown {
                        self.bg_cv.wait_for(&mut bg, Duration::from_millis(200));
                    }
                }
            }
        }
    }

    /// Chooses the next compaction and marks its tables busy, or `None` if no level needs one.
    #[expect(
        clippy::indexing_slicing,
        reason = "c.level < NUM_LEVELS = cursors.len(), and `pick` takes one table of a sorted level"
    )]
    fn pick(&self) -> Option<Compaction> {
        let mut tree = self.tree.lock();
        let version = self.view.load().version.clone();
        let c = compaction::pick(&version, &self.opts, &tree.busy, &tree.cursors)?;
        if !compaction::claim(&mut tree.busy, &c) {
            return None;
        }
        if c.level > 0 {
            tree.cursors[c.level] = c.inputs[0][0].meta.largest_user().to_vec();
        }
        Some(c)
    }

    /// [`compaction::pick_idle`], with its tables marked busy; `None` while memtables wait for
    /// a flush, or a compaction holds L0's tables.
    fn pick_idle(&self) -> Option<Compaction> {
        let mut tree = self.tree.lock();
        let version = self.view.load().version.clone();
        if !self.view.load().imms.is_empty() {
            return None;
        }
        let c = compaction::pick_idle(&version)?;
        compaction::claim(&mut tree.busy, &c).then_some(c)
    }

    /// Runs a compaction and installs its result. The busy marks are cleared whatever happens.
    fn run(&self, c: Compaction) -> Result<()> {
        let r = self.execute(&c);
        let mut tree = self.tree.lock();
        for id in c.ids() {
            tree.busy.remove(&id);
        }
        drop(tree);
        self.notify_done();
        r
    }

    fn execute(&self, c: &Compaction) -> Result<()> {
        let out_level = c.level + 1;
        let mut edit = Edit::default();
        for (i, files) in c.inputs.iter().enumerate() {
            edit.deleted.extend(files.iter().map(|t| (c.level + i, t.meta.id)));
        }
        // Tables with nothing below them that do not overlap each other (one table, or L0 tables of
        // sequential writes) move down without being rewritten.
        if c.inputs[1].is_empty() && compaction::disjoint(&c.inputs[0]) {
            edit.added.extend(c.inputs[0].iter().map(|t| (out_level, t.meta.clone())));
            let moved = c.inputs[0].clone();
            return self.install_compaction(edit, c, moved, 0, 0);
        }
        let version = self.view.load().version.clone();
        let mut sources: Vec<Source> =
            c.inputs[0].iter().map(|t| Source::compacted_table(t)).collect();
        if c.level > 0 {
            sources = vec![Source::compacted_level(c.inputs[0].clone())];
        }
        if !c.inputs[1].is_empty() {
            sources.push(Source::compacted_level(c.inputs[1].clone()));
        }
        let mut merge = Merge::new(sources, true);
        merge.seek(None)?;
        let mut keep = Retention::new(self.snapshot_seqs());
        #[expect(clippy::indexing_slicing, reason = "levels holds NUM_LEVELS entries")]
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
                    if b.size() >= self.opts.target_file_size && user != last_user.as_slice() {
                        let (id, b) = builder.take().expect("builder");
                        outputs.push(self.finish_table(id, b)?);
                    }
                }
                if builder.is_none() {
                    let id = self.new_file_id();
                    builder = Some((
                        id,
                        TableBuilder::create(&self.dir.join(table::file_name(id)), &self.opts)?,
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
            outputs.push(self.finish_table(id, b)?);
        }
        manifest::sync_dir(&self.dir)?;
        edit.added.extend(outputs.iter().map(|t| (out_level, t.meta.clone())));
        let in_bytes: u64 = c.inputs.iter().flatten().map(|t| t.meta.size).sum();
        let out_bytes: u64 = outputs.iter().map(|t| t.meta.size).sum();
        tracing::debug!(level = c.level, entries = read, in_bytes, out_bytes, "compaction done");
        self.install_compaction(edit, c, outputs, in_bytes, out_bytes)
    }

    /// Records a finished compaction in the manifest and installs the new version.
    fn install_compaction(
        &self,
        edit: Edit,
        c: &Compaction,
        outputs: Vec<Arc<TableFile>>,
        in_bytes: u64,
        out_bytes: u64,
    ) -> Result<()> {
        let mut tree = self.tree.lock();
        tree.manifest.append(&edit)?;
        let moved = in_bytes == 0 && out_bytes == 0;
        {
            let _v = self.view_lock.lock();
            let view = self.view.load();
            let mut version = (*view.version).clone();
            let gone: HashSet<u64> = edit.deleted.iter().map(|(_, id)| *id).collect();
            for l in &mut version.levels {
                l.retain(|t| !gone.contains(&t.meta.id));
            }
            #[expect(
                clippy::indexing_slicing,
                reason = "levels holds NUM_LEVELS entries and compactions start above the last level"
            )]
            version.levels[c.level + 1].extend(outputs);
            version.sort();
            self.install_view(View {
                mem: view.mem.clone(),
                imms: view.imms.clone(),
                version: Arc::new(version),
            });
        }
        if !moved {
            for t in c.inputs.iter().flatten() {
                t.mark_obsolete();
            }
        }
        self.maybe_switch_manifest(&mut tree)?;
        drop(tree);
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        self.counters.compaction_read.fetch_add(in_bytes, Ordering::Relaxed);
        self.counters.compaction_written.fetch_add(out_bytes, Ordering::Relaxed);
        self.metrics.compaction_bytes.increment(out_bytes);
        self.publish_gauges();
        Ok(())
    }

    pub(super) fn compact_range(&self, bounds: &Bounds) -> Result<()> {
        self.flush()?;
        let lo = match &bounds.lo {
            Bound::Included(k) | Bound::Excluded(k) => Some(k.as_slice()),
            Bound::Unbounded => None,
        };
        let hi = match &bounds.hi {
            Bound::Included(k) | Bound::Excluded(k) => Some(k.as_slice()),
            Bound::Unbounded => None,
        };
        let deepest = {
            let v = self.view.load().version.clone();
            #[expect(clippy::indexing_slicing, reason = "levels holds NUM_LEVELS entries")]
            (1..NUM_LEVELS).rev().find(|&l| !v.levels[l].is_empty()).unwrap_or(1)
        };
        for level in 0..deepest {
            loop {
                if let Some(cause) = self.poison.get() {
                    return Err(Error::Poisoned { cause: cause.clone() });
                }
                let picked = {
                    let mut tree = self.tree.lock();
                    let version = self.view.load().version.clone();
                    #[expect(
                        clippy::indexing_slicing,
                        reason = "levels holds NUM_LEVELS > 0 entries"
                    )]
                    let first = if level == 0 {
                        let any = version.levels[0].iter().any(|t| t.overlaps(lo, hi));
                        if any {
                            version.levels[0].clone()
                        } else {
                            Vec::new()
                        }
                    } else {
                        version.overlapping(level, lo, hi)
                    };
                    if first.is_empty() {
                        None
                    } else {
                        let c = compaction::expand(&version, level, first);
                        Some(compaction::claim(&mut tree.busy, &c).then_some(c))
                    }
                };
                match picked {
                    None => break,
                    Some(Some(c)) => {
                        if let Err(e) = self.run(c) {
                            self.set_poison(&e);
                            return Err(e);
                        }
                        break;
                    }
                    Some(None) => {
                        let mut bg = self.bg.lock();
                        if bg.shutdown {
                            return Err(Error::Closed);
                        }
                        self.done_cv.wait_for(&mut bg, Duration::from_millis(20));
                    }
                }
            }
        }
        Ok(())
    }
}
