//! `KeyView`: the keyspace as a command sees it. Outside a transaction it is the keyspace
//! itself; inside a Redis `EXEC` or a conditional transaction (`crate::txn`) it is the
//! keyspace with the transaction's writes so far laid over it ([`Pending`]): reads see them,
//! writes add to them, and nothing reaches the engine until the transaction commits them as
//! one batch (in a cluster, one Raft entry).
//!
//! Invariant: over pending writes the view takes no stripe lock itself (the transaction holds
//! the locks of every key it names, or all of them), so a command sees no other client's
//! write between its read and its write, and no client sees part of the transaction.

use std::collections::BTreeMap;

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use timber_kv::WriteBatch;

use crate::keyspace::{data_key, live, now_ms, string, Error, Keyspace, Value};
use crate::replication::Replication;

/// A transaction's writes so far.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// Per key: its new value, or `None` for a delete.
    writes: BTreeMap<Bytes, Option<Value>>,
    /// FLUSHDB/FLUSHALL ran: keys not in `writes` are gone.
    cleared: bool,
}

impl Pending {
    /// The batch that applies these writes to `ks` (a flush deletes every key stored now: the
    /// caller holds every stripe lock then).
    pub(crate) fn into_batch(self, ks: &Keyspace) -> Result<WriteBatch, Error> {
        let mut b = WriteBatch::new();
        if self.cleared {
            for prefix in [&b"k"[..], &b"e"[..]] {
                for kv in ks.db().prefix(prefix) {
                    b.delete(kv?.0);
                }
            }
        }
        for (k, v) in self.writes {
            match v {
                Some(v) => Keyspace::put_into(&mut b, &k, &v),
                None if !self.cleared => {
                    b.delete(data_key(&k));
                }
                None => {}
            }
        }
        Ok(b)
    }
}

/// The keyspace as a command sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyView<'a> {
    ks: &'a Keyspace,
    pending: Option<&'a Mutex<Pending>>,
}

/// What a lock of the view holds: a stripe lock, or nothing under `EXEC`.
pub(crate) type Guard<'a> = Option<MutexGuard<'a, ()>>;

impl<'a> KeyView<'a> {
    /// The keyspace itself.
    pub(crate) fn direct(ks: &'a Keyspace) -> KeyView<'a> {
        KeyView { ks, pending: None }
    }

    /// The keyspace under the writes of `pending`.
    pub(crate) fn pending(ks: &'a Keyspace, pending: &'a Mutex<Pending>) -> KeyView<'a> {
        KeyView { ks, pending: Some(pending) }
    }

    pub(crate) fn replication(&self) -> Option<&'a std::sync::Arc<Replication>> {
        self.ks.replication()
    }

    pub(crate) fn synced(&self) -> bool {
        self.ks.synced()
    }

    /// The stripe lock of a key (none under `EXEC`, which holds it).
    pub(crate) fn lock(&self, key: &[u8]) -> Guard<'a> {
        match self.pending {
            None => Some(self.ks.lock(key)),
            Some(_) => None,
        }
    }

    /// The stripe locks of several keys (none under `EXEC`).
    pub(crate) fn lock_many(&self, keys: &[&[u8]]) -> Vec<MutexGuard<'a, ()>> {
        match self.pending {
            None => self.ks.lock_many(keys),
            Some(_) => Vec::new(),
        }
    }

    /// The live value of a key, of any kind.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Value>, Error> {
        let Some(p) = self.pending else { return self.ks.get(key) };
        let p = p.lock();
        match p.writes.get(key) {
            Some(Some(v)) => Ok(v.expire_at.is_none_or(|at| at > now_ms()).then(|| v.clone())),
            Some(None) => Ok(None),
            None if p.cleared => Ok(None),
            None => {
                drop(p);
                self.ks.get(key)
            }
        }
    }

    /// The live value of a key that must hold a string (or nothing).
    pub(crate) fn get_string(&self, key: &[u8]) -> Result<Option<Value>, Error> {
        string(self.get(key)?)
    }

    /// Stores one value (its stripe lock held).
    pub(crate) fn set(&self, key: &[u8], v: &Value) -> Result<(), Error> {
        self.set_many(&[(key, v.clone())])
    }

    /// Stores values, atomically (their stripe locks held).
    pub(crate) fn set_many(&self, items: &[(&[u8], Value)]) -> Result<(), Error> {
        let Some(p) = self.pending else { return self.ks.set_many(items) };
        let mut p = p.lock();
        for (k, v) in items {
            p.writes.insert(Bytes::copy_from_slice(k), Some(v.clone()));
        }
        Ok(())
    }

    /// Deletes keys (their stripe locks held); returns how many were live.
    pub(crate) fn delete(&self, keys: &[&[u8]]) -> Result<u64, Error> {
        let Some(p) = self.pending else { return self.ks.delete(keys) };
        let mut n = 0;
        for k in keys {
            if self.get(k)?.is_some() {
                n += 1;
                p.lock().writes.insert(Bytes::copy_from_slice(k), None);
            }
        }
        Ok(n)
    }

    /// Deletes every key.
    pub(crate) fn clear(&self) -> Result<(), Error> {
        let Some(p) = self.pending else { return self.ks.clear() };
        let mut p = p.lock();
        p.writes.clear();
        p.cleared = true;
        Ok(())
    }

    /// Live keys after `after`, at most `count` examined, and where to continue
    /// ([`Keyspace::keys`]), with the transaction's writes applied.
    pub(crate) fn keys(
        &self,
        after: Option<&[u8]>,
        count: usize,
    ) -> Result<(Vec<Bytes>, Option<Bytes>), Error> {
        let Some(p) = self.pending else { return self.ks.keys(after, count) };
        let p = p.lock();
        let (base, next) =
            if p.cleared { (Vec::new(), None) } else { self.ks.keys(after, count)? };
        let now = now_ms();
        let mut keys: std::collections::BTreeSet<Bytes> =
            base.into_iter().filter(|k| !p.writes.contains_key(k)).collect();
        for (k, v) in &p.writes {
            let in_page = after.is_none_or(|a| k[..] > *a) && next.as_ref().is_none_or(|n| k <= n);
            if in_page && v.as_ref().is_some_and(|v| v.expire_at.is_none_or(|at| at > now)) {
                keys.insert(k.clone());
            }
        }
        Ok((keys.into_iter().collect(), next))
    }

    /// Calls `f` with every live key, in order, with the transaction's writes applied.
    pub(crate) fn each_key(&self, mut f: impl FnMut(Bytes)) -> Result<(), Error> {
        let mut after: Option<Bytes> = None;
        loop {
            let (keys, next) = self.keys(after.as_deref(), 4096)?;
            keys.into_iter().for_each(&mut f);
            match next {
                Some(k) => after = Some(k),
                None => return Ok(()),
            }
        }
    }

    /// Number of live keys, with the transaction's writes applied.
    pub(crate) fn len(&self) -> Result<u64, Error> {
        let Some(p) = self.pending else { return self.ks.len() };
        let p = p.lock();
        let now = now_ms();
        let mut n = if p.cleared { 0 } else { self.ks.len()? as i64 };
        for (k, v) in &p.writes {
            let before = !p.cleared && live(k, self.ks.db().get(data_key(k))?, now_ms)?.is_some();
            let after = v.as_ref().is_some_and(|v| v.expire_at.is_none_or(|at| at > now));
            n += i64::from(after) - i64::from(before);
        }
        Ok(n.max(0) as u64)
    }

    /// A numeric cursor for `SCAN` that continues after `key`.
    pub(crate) fn cursor_for(&self, key: Bytes) -> u64 {
        self.ks.cursor_for(key)
    }

    /// Where a `SCAN` cursor continues.
    pub(crate) fn cursor(&self, id: u64) -> Option<Bytes> {
        self.ks.cursor(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sync;
    use crate::idle::IdleWork;

    #[test]
    fn a_pending_view_reads_its_own_writes_and_writes_nothing_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
        ks.set(b"a", &Value::string("1")).unwrap();
        ks.set(b"b", &Value::string("2")).unwrap();
        let p = Mutex::new(Pending::default());
        let v = KeyView::pending(&ks, &p);
        v.set(b"c", &Value::string("3")).unwrap();
        assert_eq!(v.delete(&[b"a", b"zz"]).unwrap(), 1);
        assert_eq!(v.get(b"a").unwrap(), None);
        assert_eq!(v.get(b"c").unwrap(), Some(Value::string("3")));
        assert_eq!(v.len().unwrap(), 2);
        let names = |(keys, _): (Vec<Bytes>, Option<Bytes>)| keys;
        assert_eq!(names(v.keys(None, 100).unwrap()), vec![Bytes::from("b"), Bytes::from("c")]);
        // Nothing reached the keyspace yet.
        let data = |v: Option<Value>| v.map(|v| v.data);
        assert_eq!(data(ks.get(b"a").unwrap()), Some(Bytes::from("1")));
        assert_eq!(ks.get(b"c").unwrap(), None);
        let b = p.into_inner().into_batch(&ks).unwrap();
        ks.commit(b).unwrap();
        assert_eq!(ks.get(b"a").unwrap(), None);
        assert_eq!(data(ks.get(b"c").unwrap()), Some(Bytes::from("3")));

        // A flush, then a write: only that write is left.
        let p = Mutex::new(Pending::default());
        let v = KeyView::pending(&ks, &p);
        v.clear().unwrap();
        assert_eq!(v.len().unwrap(), 0);
        v.set(b"d", &Value::string("4")).unwrap();
        assert_eq!(v.get(b"b").unwrap(), None);
        assert_eq!(v.len().unwrap(), 1);
        ks.commit(p.into_inner().into_batch(&ks).unwrap()).unwrap();
        let mut all = Vec::new();
        KeyView::direct(&ks).each_key(|k| all.push(k)).unwrap();
        assert_eq!(all, vec![Bytes::from("d")]);
    }
}
