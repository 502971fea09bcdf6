//! Reads: point reads (`get_*`) through the memtables, then L0 newest first, then one table per
//! deeper level; iterators over a view; and the registry of snapshots, whose sequence numbers
//! flushes and compactions keep readable.
//!
//! Reads as of now take the view before the sequence number (see `get_latest`); reads at a
//! registered sequence number (snapshots, iterators) may take them in any order. Reads as of
//! now of a frozen range, and new snapshots, read at the freeze's number (see `freeze`).

use bytes::Bytes;
use smallvec::SmallVec;

use crate::batch;
use crate::bloom;
use crate::bounds::Bounds;
use crate::error::{Error, Result};
use crate::iter::Iter;
use crate::key::{self, Kind};
use crate::memtable::Lookup;
use crate::options::NUM_LEVELS;
use crate::version::TableFile;
use crate::view::View;

use super::inner::{release, Inner};

fn check_key(key: &[u8]) -> Result<()> {
    batch::validate(key, None).map_err(Error::InvalidParam)
}

impl Inner {
    /// `user` as of `seq`, which a registered snapshot protects (or which is older than no
    /// version a flush or compaction may drop: see `get_latest`).
    pub(super) fn get_at(&self, user: &[u8], seq: u64) -> Result<Option<Bytes>> {
        check_key(user)?;
        self.get_in(&self.view.load_full(), user, seq)
    }

    /// `user` as of now. The view is taken before the sequence number: every table in it holds
    /// only versions at or below that number, so the newest one it has at or below it is the
    /// answer. Taken the other way round, a flush and a compaction finishing in between could
    /// have replaced the version the number needs by a newer one, which no unregistered read
    /// protects.
    pub(super) fn get_latest(&self, user: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.get_latest_held(user)?.0)
    }

    /// [`Inner::get_latest`], with the number it read at if a freeze held it back.
    pub(super) fn get_latest_held(&self, user: &[u8]) -> Result<(Option<Bytes>, Option<u64>)> {
        check_key(user)?;
        let (view, seq, held) = self.latest_for_keys(&[user]);
        Ok((self.get_in(&view, user, seq)?, held.then_some(seq)))
    }

    /// Several keys as of now, as `get_latest` reads one, from one view: the mutable memtable
    /// looks them up together (see `Memtable::get_many`), and those it does not have are read
    /// from the rest of the view one by one.
    pub(super) fn get_many_latest<K: AsRef<[u8]>>(
        &self,
        users: &[K],
    ) -> Result<Vec<Option<Bytes>>> {
        for u in users {
            check_key(u.as_ref())?;
        }
        let (view, seq, _) = self.latest_for_keys(users);
        let keys: SmallVec<[(&[u8], u64); 16]> =
            users.iter().map(|u| (u.as_ref(), bloom::hash(u.as_ref()))).collect();
        let found = view.mem.get_many(&keys, seq);
        keys.iter()
            .zip(found)
            .map(|(&(user, hash), l)| match l {
                Lookup::Found(v) => Ok(Some(v)),
                Lookup::Deleted => Ok(None),
                Lookup::Absent => self.get_below_mem(&view, user, hash, seq),
            })
            .collect()
    }

    /// `user` in `view` at `seq`.
    fn get_in(&self, view: &View, user: &[u8], seq: u64) -> Result<Option<Bytes>> {
        let hash = bloom::hash(user);
        match view.mem.get(user, hash, seq) {
            Lookup::Found(v) => Ok(Some(v)),
            Lookup::Deleted => Ok(None),
            Lookup::Absent => self.get_below_mem(view, user, hash, seq),
        }
    }

    /// `user` at `seq` in the parts of `view` older than its mutable memtable.
    fn get_below_mem(
        &self,
        view: &View,
        user: &[u8],
        hash: u64,
        seq: u64,
    ) -> Result<Option<Bytes>> {
        for m in &view.imms {
            match m.get(user, hash, seq) {
                Lookup::Found(v) => return Ok(Some(v)),
                Lookup::Deleted => return Ok(None),
                Lookup::Absent => {}
            }
        }
        let lookup = key::lookup(user, seq);
        let found = |t: &TableFile| -> Result<Option<Option<Bytes>>> {
            Ok(t.table.get(&lookup, user, hash)?.map(|(kind, v)| (kind == Kind::Put).then_some(v)))
        };
        #[expect(clippy::indexing_slicing, reason = "levels holds NUM_LEVELS > 0 entries")]
        for t in &view.version.levels[0] {
            if t.overlaps(Some(user), Some(user)) {
                if let Some(r) = found(t)? {
                    return Ok(r);
                }
            }
        }
        for level in 1..NUM_LEVELS {
            if let Some(t) = view.version.find(level, user) {
                if let Some(r) = found(t)? {
                    return Ok(r);
                }
            }
        }
        Ok(None)
    }

    /// An iterator at `seq`, which the caller's snapshot protects.
    pub(super) fn iter(&self, seq: u64, bounds: Bounds) -> Iter {
        Iter::new(self.view.load_full(), seq, bounds)
    }

    /// An iterator as of now: the view first, then the sequence number (see `get_latest`).
    pub(super) fn iter_latest(&self, bounds: Bounds) -> Iter {
        let (view, seq) = self.latest_for_bounds(&bounds);
        Iter::new(view, seq, bounds)
    }

    pub(super) fn add_snapshot(&self) -> u64 {
        self.register_snapshot(|| self.snapshot_seq())
    }

    /// Registers the visible number as a snapshot, whatever the freezes (a freeze's own).
    pub(super) fn add_snapshot_at_visible(&self) -> u64 {
        self.register_snapshot(|| self.visible())
    }

    /// Registers the number `seq_now` gives, taken under the snapshots' lock.
    fn register_snapshot(&self, seq_now: impl FnOnce() -> u64) -> u64 {
        let mut s = self.snapshots.lock();
        let seq = seq_now();
        *s.entry(seq).or_default() += 1;
        seq
    }

    pub(super) fn drop_snapshot(&self, seq: u64) {
        release(&mut self.snapshots.lock(), seq);
    }

    pub(super) fn snapshot_seqs(&self) -> Vec<u64> {
        self.snapshots.lock().keys().copied().collect()
    }
}
