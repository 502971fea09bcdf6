//! What `WATCH` compares: a version per slot of keys, bumped after every write of a key in the
//! slot, and the record of a watched key (its slot's version and its deadline when watched).
//!
//! Invariants: a slot's version only grows; every write of a key bumps its slot after the write
//! is visible (a writer holding the key's stripe lock bumps once, after; a writer that does not
//! hold it, a stream command, bumps before and after), so a check that holds the key's stripe
//! lock and finds the version it recorded knows the key was not written since. Slots are
//! shared by keys (1 in [`SLOTS`]): a write of another key of the slot aborts a transaction
//! that watched one of them, which is safe (it retries), never the other way round. Versions
//! live in memory: they compare only within one process, and in a cluster within one term of
//! its leadership ([`Epoch`]); a transaction watched under another epoch is aborted.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes};

/// Slots of versions (a multiple of the keyspace's lock stripes).
const SLOTS: usize = 1 << 16;

/// The slot versions of one keyspace.
pub(crate) struct Versions {
    slots: Box<[AtomicU64]>,
    clock: AtomicU64,
    /// Drawn at start: versions of two processes never compare equal by chance.
    nonce: u64,
}

impl std::fmt::Debug for Versions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Versions").field("nonce", &self.nonce).finish_non_exhaustive()
    }
}

/// The hash that places a key in a lock stripe and a version slot (FNV-1a).
pub(crate) fn hash(key: &[u8]) -> u64 {
    key.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

impl Versions {
    pub(crate) fn new() -> Versions {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Versions {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            clock: AtomicU64::new(0),
            nonce: h.finish(),
        }
    }

    /// The slot of `key`.
    pub(crate) fn slot(key: &[u8]) -> usize {
        (hash(key) % SLOTS as u64) as usize
    }

    /// The version of `key`'s slot.
    pub(crate) fn get(&self, key: &[u8]) -> u64 {
        self.slots.get(Self::slot(key)).map_or(0, |s| s.load(Ordering::Acquire))
    }

    /// Records a write of `key`.
    pub(crate) fn bump(&self, key: &[u8]) {
        self.bump_slot(Self::slot(key));
    }

    /// Records a write of a key of slot `slot`.
    pub(crate) fn bump_slot(&self, slot: usize) {
        let v = self.clock.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(s) = self.slots.get(slot) {
            s.fetch_max(v, Ordering::AcqRel);
        }
    }

    /// This process's nonce.
    pub(crate) fn nonce(&self) -> u64 {
        self.nonce
    }
}

/// Where versions compare: this process (its nonce) and, in a cluster, the term it leads in
/// (0 on a single node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Epoch {
    pub(crate) nonce: u64,
    pub(crate) term: u64,
}

/// A watched key as it was when watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Watched {
    pub(crate) key: Bytes,
    /// Its slot's version.
    pub(crate) version: u64,
    /// The deadline of its value, if it was live and had one: once it passes, the key
    /// expired, which counts as a change.
    pub(crate) expires: Option<u64>,
    /// It held a value past its deadline (not yet swept): deleting that value (the sweep, a
    /// DEL, a flush) is no change while the key stays without a live value, as in Redis.
    pub(crate) stale: bool,
}

/// The keys a connection watches, with the epoch they were watched in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Watches {
    /// `None` until a key is watched.
    pub(crate) epoch: Option<Epoch>,
    pub(crate) keys: Vec<Watched>,
    /// Keys were watched under two epochs (a leader change in between): EXEC aborts.
    pub(crate) broken: bool,
}

impl Watches {
    /// Adds keys watched under `epoch`.
    pub(crate) fn add(&mut self, epoch: Epoch, keys: Vec<Watched>) {
        match self.epoch {
            Some(e) if e != epoch => self.broken = true,
            _ => self.epoch = Some(epoch),
        }
        self.keys.extend(keys);
    }

    /// The encoding a member passes to the leader (and the leader returns for WATCH):
    /// `[broken u8][nonce u64][term u64]` then per key `[len u32][key][version u64][deadline
    /// u64, 0 = none][stale u8]`, integers little-endian. An empty list encodes as nothing.
    pub(crate) fn encode(&self) -> Bytes {
        let Some(e) = self.epoch else { return Bytes::new() };
        let mut out =
            Vec::with_capacity(17 + self.keys.iter().map(|k| k.key.len() + 20).sum::<usize>());
        out.put_u8(u8::from(self.broken));
        out.put_u64_le(e.nonce);
        out.put_u64_le(e.term);
        for k in &self.keys {
            out.put_u32_le(k.key.len() as u32);
            out.put_slice(&k.key);
            out.put_u64_le(k.version);
            out.put_u64_le(k.expires.unwrap_or(0));
            out.put_u8(u8::from(k.stale));
        }
        out.into()
    }

    /// Decodes [`Watches::encode`]; `None` if `b` is not such an encoding.
    pub(crate) fn decode(b: &Bytes) -> Option<Watches> {
        if b.is_empty() {
            return Some(Watches::default());
        }
        let u64_at = |at: usize| crate::codec::u64_le(b, at);
        let broken = *b.first()? != 0;
        let epoch = Epoch { nonce: u64_at(1)?, term: u64_at(9)? };
        let mut keys = Vec::new();
        let mut at = 17;
        while at < b.len() {
            let len = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
            let key_end = at.checked_add(4)?.checked_add(len)?;
            let key = b.slice(at + 4..key_end.min(b.len()));
            if key.len() != len {
                return None;
            }
            let (version, deadline) = (u64_at(key_end)?, u64_at(key_end + 8)?);
            let stale = *b.get(key_end + 16)? != 0;
            let expires = (deadline != 0).then_some(deadline);
            keys.push(Watched { key, version, expires, stale });
            at = key_end + 17;
        }
        Some(Watches { epoch: Some(epoch), keys, broken })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_grow_per_slot() {
        let v = Versions::new();
        let before = v.get(b"a");
        v.bump(b"a");
        let after = v.get(b"a");
        assert!(after > before);
        v.bump(b"b");
        assert!(v.get(b"b") > after);
        assert_ne!(Versions::new().nonce(), v.nonce());
    }

    #[test]
    fn watches_round_trip_and_damage_is_refused() {
        let mut w = Watches::default();
        assert_eq!(Watches::decode(&w.encode()), Some(Watches::default()));
        let e = Epoch { nonce: 7, term: 3 };
        w.add(
            e,
            vec![
                Watched { key: Bytes::from_static(b"k"), version: 5, expires: None, stale: true },
                Watched {
                    key: Bytes::from_static(b""),
                    version: 0,
                    expires: Some(99),
                    stale: false,
                },
            ],
        );
        assert_eq!(Watches::decode(&w.encode()), Some(w.clone()));
        w.add(Epoch { nonce: 7, term: 4 }, vec![]);
        assert!(w.broken);
        assert_eq!(Watches::decode(&w.encode()), Some(w.clone()));
        let enc = w.encode();
        for cut in 1..enc.len() {
            if let Some(d) = Watches::decode(&enc.slice(..cut)) {
                // A cut between two keys decodes as fewer keys; never as garbage.
                assert!(d.keys.len() < w.keys.len(), "{cut}");
            }
        }
    }
}
