//! Iteration: cursors over one memtable, one table or one sorted level, a merge of them in
//! internal-key order, and the user-facing [`Iter`], which shows the newest version of each key
//! visible at its sequence number, hides tombstones, and runs from either end
//! (`DoubleEndedIterator`). An `Iter` holds the view it was created on, so memtables and tables
//! it reads stay alive and its results never change while it runs.

use std::cmp::Ordering;
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;

use crate::bounds::Bounds;
use crate::error::Result;
use crate::key::{self, Kind, MAX_SEQ};
use crate::memtable::{self, Memtable};
use crate::table::TableIter;
use crate::version::TableFile;
use crate::view::View;

pub(crate) struct LevelIter {
    files: Vec<Arc<TableFile>>,
    forward: bool,
    at: usize,
    it: Option<TableIter>,
    /// Whether its reads fill the block cache.
    fill: bool,
}

impl LevelIter {
    /// Positions at `target` in table `at`, or, if that table has nothing there in the direction
    /// of travel, at the edge of the next table that has entries.
    fn open(&mut self, mut at: usize, mut target: Option<&[u8]>) -> Result<()> {
        loop {
            let Some(f) = self.files.get(at) else {
                self.it = None;
                return Ok(());
            };
            let mut it = TableIter::new(f.table.clone(), self.forward);
            if !self.fill {
                it = it.filling_no_cache();
            }
            it.seek(target)?;
            if it.key().is_some() {
                self.at = at;
                self.it = Some(it);
                return Ok(());
            }
            at = if self.forward { at + 1 } else { at.wrapping_sub(1) };
            target = None;
        }
    }
}

/// One input of a merge.
pub(crate) enum Source {
    Mem(memtable::Cursor),
    Table(TableIter),
    Level(LevelIter),
}

impl Source {
    /// A memtable cursor that only has to be right within `bounds`.
    pub(crate) fn mem(mem: Arc<Memtable>, forward: bool, bounds: &Bounds) -> Source {
        Source::Mem(memtable::Cursor::within(mem, forward, bounds.clone()))
    }

    pub(crate) fn table(t: &TableFile, forward: bool) -> Source {
        Source::Table(TableIter::new(t.table.clone(), forward))
    }

    /// A sorted level (or any list of tables with disjoint, ordered ranges).
    pub(crate) fn level(files: Vec<Arc<TableFile>>, forward: bool) -> Source {
        Source::Level(LevelIter { files, forward, at: 0, it: None, fill: true })
    }

    /// A compaction's input table, read forward without filling the block cache.
    pub(crate) fn compacted_table(t: &TableFile) -> Source {
        Source::Table(TableIter::new(t.table.clone(), true).filling_no_cache())
    }

    /// A compaction's input level, read forward without filling the block cache.
    pub(crate) fn compacted_level(files: Vec<Arc<TableFile>>) -> Source {
        Source::Level(LevelIter { files, forward: true, at: 0, it: None, fill: false })
    }

    fn seek(&mut self, target: Option<&[u8]>) -> Result<()> {
        match self {
            Source::Mem(m) => {
                m.seek(target);
                Ok(())
            }
            Source::Table(t) => t.seek(target),
            Source::Level(l) => {
                let n = l.files.len();
                let at = match (target, l.forward) {
                    (None, true) => 0,
                    (None, false) => n.wrapping_sub(1),
                    (Some(t), true) => l
                        .files
                        .partition_point(|f| key::compare(&f.meta.largest, t) == Ordering::Less),
                    (Some(t), false) => l
                        .files
                        .partition_point(|f| key::compare(&f.meta.smallest, t) != Ordering::Greater)
                        .wrapping_sub(1),
                };
                l.open(at, target)
            }
        }
    }

    fn advance(&mut self) -> Result<()> {
        match self {
            Source::Mem(m) => {
                m.advance();
                Ok(())
            }
            Source::Table(t) => t.advance(),
            Source::Level(l) => {
                let Some(it) = &mut l.it else { return Ok(()) };
                it.advance()?;
                if it.key().is_none() {
                    let next = if l.forward { l.at + 1 } else { l.at.wrapping_sub(1) };
                    l.open(next, None)?;
                }
                Ok(())
            }
        }
    }

    fn key(&self) -> Option<&[u8]> {
        match self {
            Source::Mem(m) => m.key(),
            Source::Table(t) => t.key(),
            Source::Level(l) => l.it.as_ref().and_then(|t| t.key()),
        }
    }

    /// The user key of the current entry as bytes of its own.
    fn user_key_bytes(&self) -> Bytes {
        match self {
            Source::Mem(m) => m.key().map(|k| Bytes::copy_from_slice(key::user(k))),
            Source::Table(t) => t.user_key_bytes(),
            Source::Level(l) => l.it.as_ref().and_then(|t| t.user_key_bytes()),
        }
        .unwrap_or_default()
    }

    fn value_ref(&self) -> &[u8] {
        match self {
            Source::Mem(m) => m.value_ref(),
            Source::Table(t) => t.value_ref(),
            Source::Level(l) => l.it.as_ref().map_or(&[], |t| t.value_ref()),
        }
    }

    fn value(&self) -> Bytes {
        match self {
            Source::Mem(m) => m.value(),
            Source::Table(t) => t.value(),
            Source::Level(l) => l.it.as_ref().map(|t| t.value()).unwrap_or_default(),
        }
    }
}

/// Internal entries of several sources in internal-key order (or its reverse). On equal keys the
/// earlier source wins.
pub(crate) struct Merge {
    sources: Vec<Source>,
    forward: bool,
    cur: Option<usize>,
    /// The source with the next-best key after `cur`: while `cur` stays ahead of it, advancing
    /// needs one comparison instead of a scan of every source.
    runner: Option<usize>,
}

impl Merge {
    pub(crate) fn new(sources: Vec<Source>, forward: bool) -> Merge {
        Merge { sources, forward, cur: None, runner: None }
    }

    /// Sources for everything a view holds, newest first, for a walk within `bounds`.
    #[expect(clippy::indexing_slicing, reason = "levels holds NUM_LEVELS > 0 entries")]
    pub(crate) fn of_view(view: &View, forward: bool, bounds: &Bounds) -> Merge {
        let mut sources = vec![Source::mem(view.mem.clone(), forward, bounds)];
        sources.extend(view.imms.iter().map(|m| Source::mem(m.clone(), forward, bounds)));
        sources.extend(view.version.levels[0].iter().map(|t| Source::table(t, forward)));
        for level in &view.version.levels[1..] {
            if !level.is_empty() {
                sources.push(Source::level(level.clone(), forward));
            }
        }
        Merge::new(sources, forward)
    }

    /// Whether source `a`'s entry comes before source `b`'s (ties: the earlier source).
    #[expect(
        clippy::indexing_slicing,
        reason = "`cur`, `runner` and the sources compared are positions in `sources`, whose length never changes"
    )]
    fn before(&self, a: usize, b: usize) -> bool {
        match (self.sources[a].key(), self.sources[b].key()) {
            (Some(x), Some(y)) => {
                let o = key::compare(x, y);
                let o = if self.forward { o } else { o.reverse() };
                o == Ordering::Less || (o == Ordering::Equal && a < b)
            }
            (Some(_), None) => true,
            _ => false,
        }
    }

    fn pick(&mut self) {
        let (mut best, mut runner): (Option<usize>, Option<usize>) = (None, None);
        for (i, source) in self.sources.iter().enumerate() {
            if source.key().is_none() {
                continue;
            }
            match best {
                None => best = Some(i),
                Some(b) if self.before(i, b) => {
                    runner = best;
                    best = Some(i);
                }
                Some(_) => {
                    if runner.is_none_or(|r| self.before(i, r)) {
                        runner = Some(i);
                    }
                }
            }
        }
        self.cur = best;
        self.runner = runner;
    }

    /// Positions at the first entry not before `target` in the direction of travel.
    pub(crate) fn seek(&mut self, target: Option<&[u8]>) -> Result<()> {
        for s in &mut self.sources {
            s.seek(target)?;
        }
        self.pick();
        Ok(())
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "`cur`, `runner` and the sources compared are positions in `sources`, whose length never changes"
    )]
    pub(crate) fn advance(&mut self) -> Result<()> {
        if let Some(i) = self.cur {
            self.sources[i].advance()?;
            let still_first = match self.runner {
                None => true,
                Some(r) => self.before(i, r),
            };
            if !still_first || self.sources[i].key().is_none() {
                self.pick();
            }
        }
        Ok(())
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "`cur`, `runner` and the sources compared are positions in `sources`, whose length never changes"
    )]
    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.cur.and_then(|i| self.sources[i].key())
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "`cur`, `runner` and the sources compared are positions in `sources`, whose length never changes"
    )]
    pub(crate) fn value(&self) -> Bytes {
        self.cur.map(|i| self.sources[i].value()).unwrap_or_default()
    }

    /// The current value, borrowed from the block or memtable it is in.
    #[expect(
        clippy::indexing_slicing,
        reason = "`cur`, `runner` and the sources compared are positions in `sources`, whose length never changes"
    )]
    fn value_ref(&self) -> &[u8] {
        self.cur.map_or(&[], |i| self.sources[i].value_ref())
    }

    /// The user key of the current entry as bytes of its own.
    #[expect(
        clippy::indexing_slicing,
        reason = "`cur`, `runner` and the sources compared are positions in `sources`, whose length never changes"
    )]
    fn user_key_bytes(&self) -> Bytes {
        self.cur.map(|i| self.sources[i].user_key_bytes()).unwrap_or_default()
    }
}

/// The newest visible version of a key: a put with its value, or a tombstone.
type Visible = (Kind, Bytes);

/// User entries visible at `seq`, in one direction.
struct Walk {
    merge: Merge,
    forward: bool,
    seq: u64,
    bounds: Bounds,
    started: bool,
    /// Forward: the user key last emitted or hidden (if `has_last`); its older versions are
    /// skipped.
    last: Vec<u8>,
    has_last: bool,
    /// Backward: the user key being collected and its newest visible version so far.
    group: Option<(Vec<u8>, Option<Visible>)>,
    /// Forward: the merge stands on the entry last returned; it moves past it on the next step,
    /// so that the entry can be lent from the block or memtable it is in until then.
    pending: bool,
}

type Item = Result<(Bytes, Bytes)>;

impl Walk {
    fn new(view: &View, forward: bool, seq: u64, bounds: &Bounds) -> Walk {
        Walk {
            merge: Merge::of_view(view, forward, bounds),
            forward,
            seq,
            bounds: bounds.clone(),
            started: false,
            last: Vec::new(),
            has_last: false,
            group: None,
            pending: false,
        }
    }

    fn start(&mut self) -> Result<()> {
        self.started = true;
        let target = if self.forward {
            match &self.bounds.lo {
                Bound::Included(l) | Bound::Excluded(l) => Some(key::lookup(l, MAX_SEQ)),
                Bound::Unbounded => None,
            }
        } else {
            match &self.bounds.hi {
                Bound::Included(h) | Bound::Excluded(h) => Some(key::make(h, 0, Kind::Delete)),
                Bound::Unbounded => None,
            }
        };
        self.merge.seek(target.as_deref())
    }

    fn next(&mut self) -> Option<Item> {
        if self.forward {
            match self.step_forward() {
                Ok(true) => Some(Ok((self.merge.user_key_bytes(), self.merge.value()))),
                Ok(false) => None,
                Err(e) => Some(Err(e)),
            }
        } else {
            if !self.started {
                if let Err(e) = self.start() {
                    return Some(Err(e));
                }
            }
            self.next_backward().transpose()
        }
    }

    /// Forward: stands the merge on the next visible live entry (`false` past the end). The
    /// entry is read from the merge; the next step moves past it.
    fn step_forward(&mut self) -> Result<bool> {
        if !self.started {
            self.start()?;
        }
        if self.pending {
            self.pending = false;
            self.merge.advance()?;
        }
        loop {
            let Some(k) = self.merge.key() else { return Ok(false) };
            let user = key::user(k);
            if !self.bounds.below_hi(user) {
                return Ok(false);
            }
            if !self.bounds.above_lo(user)
                || key::seq(k) > self.seq
                || (self.has_last && self.last.as_slice() == user)
            {
                self.merge.advance()?;
                continue;
            }
            self.last.clear();
            self.last.extend_from_slice(user);
            self.has_last = true;
            if key::kind(k) == Kind::Put {
                self.pending = true;
                return Ok(true);
            }
            self.merge.advance()?;
        }
    }

    fn next_backward(&mut self) -> Result<Option<(Bytes, Bytes)>> {
        loop {
            let Some(k) = self.merge.key() else {
                return Ok(self.emit_group());
            };
            let user = key::user(k);
            if !self.bounds.above_lo(user) {
                return Ok(self.emit_group());
            }
            if !self.bounds.below_hi(user) {
                self.merge.advance()?;
                continue;
            }
            if self.group.as_ref().is_some_and(|(g, _)| g.as_slice() != user) {
                if let Some(item) = self.emit_group() {
                    return Ok(Some(item));
                }
                continue;
            }
            let visible = key::seq(k) <= self.seq;
            let entry = visible.then(|| (key::kind(k), self.merge.value()));
            match &mut self.group {
                Some((_, best)) => {
                    if entry.is_some() {
                        *best = entry;
                    }
                }
                None => self.group = Some((user.to_vec(), entry)),
            }
            self.merge.advance()?;
        }
    }

    fn emit_group(&mut self) -> Option<(Bytes, Bytes)> {
        match self.group.take() {
            Some((user, Some((Kind::Put, v)))) => Some((Bytes::from(user), v)),
            _ => None,
        }
    }
}

/// An iterator over the live keys of a range, at one point in time, in key order;
/// `.rev()` and `next_back()` run from the other end. Items are `(key, value)`; an error (a corrupt
/// block, say) is yielded once and ends the iteration.
pub struct Iter {
    view: Arc<View>,
    seq: u64,
    bounds: Bounds,
    front: Option<Walk>,
    back: Option<Walk>,
    front_last: Option<Bytes>,
    back_last: Option<Bytes>,
    /// The entry [`Iter::next_back_ref`] lent last.
    held: Option<(Bytes, Bytes)>,
    done: bool,
}

impl std::fmt::Debug for Iter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iter").field("seq", &self.seq).field("bounds", &self.bounds).finish()
    }
}

impl Iter {
    pub(crate) fn new(view: Arc<View>, seq: u64, bounds: Bounds) -> Iter {
        Iter {
            view,
            seq,
            bounds,
            front: None,
            back: None,
            front_last: None,
            back_last: None,
            held: None,
            done: false,
        }
    }

    /// Like `next`, but lends the key and value instead of handing out shared buffers: they are
    /// borrowed from the block or memtable they are in, valid until the iterator moves again.
    /// For scans that look at many entries and keep few, this saves two reference counts per
    /// entry. It moves the same front end as `next`; the two can be mixed.
    pub fn next_ref(&mut self) -> Option<Result<(&[u8], &[u8])>> {
        if self.done {
            return None;
        }
        let front =
            self.front.get_or_insert_with(|| Walk::new(&self.view, true, self.seq, &self.bounds));
        match front.step_forward() {
            Ok(true) => {}
            Ok(false) => {
                self.done = true;
                return None;
            }
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        }
        let user = key::user(front.merge.key().expect("the walk stands on an entry"));
        if self.back_last.as_ref().is_some_and(|o| user >= &o[..]) {
            self.done = true;
            return None;
        }
        if self.back.is_some() {
            self.front_last = Some(Bytes::copy_from_slice(user));
        }
        Some(Ok((user, front.merge.value_ref())))
    }

    /// Like `next_back`, lending the key and value as [`Iter::next_ref`] does.
    pub fn next_back_ref(&mut self) -> Option<Result<(&[u8], &[u8])>> {
        match self.next_back()? {
            Ok(kv) => {
                let (k, v) = self.held.insert(kv);
                Some(Ok((&k[..], &v[..])))
            }
            Err(e) => Some(Err(e)),
        }
    }

    fn finish(&mut self, item: Option<Item>, forward: bool) -> Option<Item> {
        match item {
            Some(Ok((k, v))) => {
                let other = if forward { &self.back_last } else { &self.front_last };
                let crossed =
                    other.as_ref().is_some_and(|o| if forward { k >= *o } else { k <= *o });
                if crossed {
                    self.done = true;
                    return None;
                }
                // A forward-only iteration (the common case) keeps no copy of each key: the back
                // cursor, once created, takes the front's position from the front cursor.
                if !forward || self.back.is_some() {
                    *(if forward { &mut self.front_last } else { &mut self.back_last }) =
                        Some(k.clone());
                }
                Some(Ok((k, v)))
            }
            Some(Err(e)) => {
                self.done = true;
                Some(Err(e))
            }
            None => {
                self.done = true;
                None
            }
        }
    }
}

impl Iterator for Iter {
    type Item = Result<(Bytes, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.front.is_none() {
            self.front = Some(Walk::new(&self.view, true, self.seq, &self.bounds));
        }
        let item = self.front.as_mut().and_then(Walk::next);
        self.finish(item, true)
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.back.is_none() {
            self.back = Some(Walk::new(&self.view, false, self.seq, &self.bounds));
            // Every key the front cursor passed (emitted or hidden) is behind the iteration.
            if let Some(f) = self.front.as_ref().filter(|f| f.has_last) {
                self.front_last = Some(Bytes::copy_from_slice(&f.last));
            }
        }
        let item = self.back.as_mut().and_then(Walk::next);
        self.finish(item, false)
    }
}

impl std::iter::FusedIterator for Iter {}
