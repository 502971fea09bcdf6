//! The revisions a single node stamps into the strings it commits: a number per write of a
//! string, drawn in commit order, so that a key's revision changes with every write of it,
//! grows, and never repeats (what a `Txn` compares as the key's version). In a cluster the
//! state machine stamps them instead, on apply ([`timber_cluster::REVISION_KEY`]).
//!
//! Invariant: no revision at or above the counter stored under `REVISION_KEY` has been written.
//! Revisions are handed out from blocks reserved by raising the stored counter (a synced write)
//! before any write carrying one of them; a restart goes on from the stored counter and
//! loses at most the rest of a block. The counter is part of the keyspace's data, so a backup
//! and a cluster formed from this node's data go on from it too; a restore raises it by
//! [`RESTORE_MARGIN`], past what the backup's source may have stamped after the backup.

use parking_lot::Mutex;
use timber_cluster::{revision_counter, stamp_revision, Result, FIRST_REVISION, REVISION_KEY};
use timber_kv::{Db, Durability, WriteBatch};

/// Revisions reserved by one write of the counter.
const BLOCK: u64 = 1 << 20;
/// How far a restore raises the backup's counter: the node or cluster the backup came from may
/// have stamped revisions past it after the backup (up to this many), which the restored data
/// must never stamp again on the same keys.
const RESTORE_MARGIN: u64 = 1 << 40;

/// The counter a restored keyspace starts from, given the backup's (`None`: a backup without
/// one, made before revisions); `None` if the backup's is malformed.
pub(crate) fn restored(counter: Option<&[u8]>) -> Option<u64> {
    let at = match counter {
        None => FIRST_REVISION,
        Some(b) => u64::from_le_bytes(b.try_into().ok()?),
    };
    Some(at.saturating_add(RESTORE_MARGIN))
}

/// The next revision and the end of the reserved block (both 0 until the first stamp; no
/// revision at or past the end is durable anywhere).
#[derive(Debug, Default)]
pub(crate) struct Revisions {
    state: Mutex<(u64, u64)>,
}

impl Revisions {
    /// Stamps the next revisions into the values of `b` that have a revision slot (`slot`
    /// says where, given the engine key and value), in order. The caller holds the stripe
    /// locks of the keys, so a key's writes draw their revisions in the order they commit; and
    /// writes `b` only after this returns, so a block reserved here is durable before any
    /// revision of it is.
    pub(crate) fn stamp(
        &self,
        db: &Db,
        b: &mut WriteBatch,
        slot: impl Fn(&[u8], &[u8]) -> Option<usize>,
    ) -> Result<()> {
        let mut st = self.state.lock();
        let (next, end) = &mut *st;
        if *end == 0 {
            // The first stamp since open: nothing reserved yet past the stored counter.
            *next = revision_counter(db)?;
            *end = *next;
        }
        b.rewrite_values(|k, v| {
            if let Some(at) = slot(k, v) {
                stamp_revision(v, at, *next);
                *next += 1;
            }
        });
        if *next > *end {
            let new_end = *next + BLOCK;
            let mut reserve = WriteBatch::new();
            reserve.put(REVISION_KEY, new_end.to_le_bytes());
            db.write_with(reserve, Durability::Synced)?;
            *end = new_end;
        }
        Ok(())
    }
}
