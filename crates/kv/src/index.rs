//! `Index`: a table's index block, kept in memory while the table is open and read in place.
//!
//! Every entry of an index block is a restart point (docs/format/sstable.md), so entry `i` is
//! parsed where the block's restart array says it is, when it is used: the block's own bytes and
//! one 8-byte prefix per entry are all it keeps. `new` checks every entry (one per
//! restart point, a valid internal key, a 12-byte handle inside the data region), so the
//! accessors cannot meet a malformed one.
//!
//! Lookups first search the prefixes: each is 8 bytes of the entry's user key taken after the
//! bytes that every key of the table shares (the common prefix of the first and last keys,
//! which in a sorted block all keys share), so tables of keys with long common heads (decimal
//! ids, `user:` prefixes) still split on bytes that differ.

use std::cmp::Ordering;
use std::ops::Range;

use crate::block::Block;
use crate::key;

/// Bytes of a block handle: `offset u64 LE | size u32 LE`.
const HANDLE_LEN: usize = 12;

#[derive(Debug)]
pub(crate) struct Index {
    block: Block,
    /// Per entry, `key::prefix8` of its user key past `common`.
    prefixes: Vec<u64>,
    /// The bytes at the head of every entry's user key that all entries share.
    common: Box<[u8]>,
}

impl Index {
    /// The index `block` of a table whose data blocks end at `data_end`, checked entry by entry.
    pub(crate) fn new(block: Block, data_end: u64) -> Result<Index, String> {
        let n = block.restarts();
        let mut next = 0;
        for i in 0..n {
            // Entries lie back to back, one per restart point: an entry the restarts skipped
            // would be a data block no lookup reaches.
            let (at, k, v) = block.restart_entry(i)?;
            if at != next {
                return Err(format!("index entry {i} is not at its restart point"));
            }
            next = v.end;
            let bytes = block.bytes();
            let key_ok = bytes.get(k.clone()).is_some_and(key::valid);
            let handle = bytes.get(v.clone()).and_then(handle_of);
            let in_data = handle.is_some_and(|(off, len)| {
                off.checked_add(u64::from(len) + crate::table::TRAILER_LEN as u64)
                    .is_some_and(|e| e <= data_end)
            });
            if !key_ok || v.len() != HANDLE_LEN || !in_data {
                return Err(format!("index entry {i} is malformed"));
            }
        }
        if next != block.entries_end() {
            return Err("index block has entries past its last restart point".into());
        }
        let mut index = Index { block, prefixes: Vec::new(), common: Box::default() };
        if n > 0 {
            let first = key::user(index.key(0));
            let last = key::user(index.key(n - 1));
            let shared = first.iter().zip(last).take_while(|(a, b)| a == b).count();
            index.common = first.get(..shared).unwrap_or_default().into();
        }
        let prefixes = (0..n).map(|i| index.prefix_of(key::user(index.key(i)))).collect();
        index.prefixes = prefixes;
        Ok(index)
    }

    pub(crate) fn len(&self) -> usize {
        self.block.restarts()
    }

    /// Bytes it keeps in memory.
    pub(crate) fn memory(&self) -> usize {
        self.block.size() + self.prefixes.capacity() * 8 + self.common.len()
    }

    /// Where entry `i`'s key and handle lie in the block (`new` checked that they do).
    fn ranges(&self, i: usize) -> (Range<usize>, Range<usize>) {
        self.block.restart_entry(i).map_or((0..0, 0..0), |(_, k, v)| (k, v))
    }

    /// The internal key of entry `i` (`i < len()`): at least the last key of its data block, and
    /// below the first key of the next.
    pub(crate) fn key(&self, i: usize) -> &[u8] {
        self.block.bytes().get(self.ranges(i).0).unwrap_or_default()
    }

    /// The handle of data block `i` (`i < len()`): its offset and stored size.
    pub(crate) fn handle(&self, i: usize) -> (u64, u32) {
        self.block.bytes().get(self.ranges(i).1).and_then(handle_of).unwrap_or((0, 0))
    }

    /// The prefix `lower_bound` searches by, of a user key that starts with `common`.
    fn prefix_of(&self, user: &[u8]) -> u64 {
        key::prefix8(user.get(self.common.len()..).unwrap_or_default())
    }

    /// The first entry (data block) whose key is not below the internal key `target`.
    pub(crate) fn lower_bound(&self, target: &[u8]) -> usize {
        let n = self.len();
        if n == 0 {
            return 0;
        }
        let user = key::user(target);
        match user.get(..self.common.len()).unwrap_or(user).cmp(&self.common) {
            Ordering::Less => return 0,
            Ordering::Greater => return n,
            Ordering::Equal => {}
        }
        let p = self.prefix_of(user);
        let lo = self.prefixes.partition_point(|&x| x < p);
        let hi = lo + self.prefixes.get(lo..).unwrap_or_default().partition_point(|&x| x == p);
        // Among the entries of equal prefix (mostly none or one), a binary search on keys.
        let (mut lo, mut hi) = (lo, hi);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if key::compare(self.key(mid), target) == Ordering::Less {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

fn handle_of(v: &[u8]) -> Option<(u64, u32)> {
    let off = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(v.get(8..HANDLE_LEN)?.try_into().ok()?);
    Some((off, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockBuilder;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn handle(off: u64, len: u32) -> [u8; HANDLE_LEN] {
        let mut h = [0u8; HANDLE_LEN];
        h[..8].copy_from_slice(&off.to_le_bytes());
        h[8..].copy_from_slice(&len.to_le_bytes());
        h
    }

    /// An index block over `keys` (internal keys in order), block `i` at `100 * i`, 90 bytes.
    fn build(keys: &[Vec<u8>], interval: usize) -> Block {
        let mut b = BlockBuilder::new(interval);
        for (i, k) in keys.iter().enumerate() {
            b.add(k, &handle(100 * i as u64, 90 + i as u32));
        }
        Block::new(Bytes::from(b.finish())).unwrap()
    }

    #[test]
    fn keeps_the_block_and_eight_bytes_an_entry() {
        let keys: Vec<_> = (0..1000u32)
            .map(|i| key::make(format!("key{i:08}").as_bytes(), 7, key::Kind::Put))
            .collect();
        let block = build(&keys, 1);
        let index = Index::new(block.clone(), u64::MAX).unwrap();
        assert_eq!(index.len(), 1000);
        // Every key shares "key00000"; the prefixes hold the bytes after it.
        assert_eq!(&index.common[..], b"key00000");
        assert_eq!(index.memory(), block.size() + 1000 * 8 + 8);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(index.key(i), &k[..]);
            assert_eq!(index.handle(i), (100 * i as u64, 90 + i as u32));
        }
    }

    #[test]
    fn malformed_indexes_are_refused() {
        let keys: Vec<_> = (0..40u32)
            .map(|i| key::make(format!("key{i:04}").as_bytes(), 7, key::Kind::Put))
            .collect();
        // Entries between restart points (they share a prefix): lookups would skip them.
        let e = Index::new(build(&keys, 16), u64::MAX).unwrap_err();
        assert!(e.contains("shares") || e.contains("restart point"), "{e}");
        // A handle past the data region.
        let e = Index::new(build(&keys, 1), 3900 + 90 + 39 + 5 - 1).unwrap_err();
        assert!(e.contains("entry 39 is malformed"), "{e}");
        // A key too short to be an internal key.
        let mut b = BlockBuilder::new(1);
        b.add(b"abc", &handle(0, 1));
        let e = Index::new(Block::new(Bytes::from(b.finish())).unwrap(), u64::MAX).unwrap_err();
        assert!(e.contains("entry 0 is malformed"), "{e}");
        // A value that is not a handle.
        let mut b = BlockBuilder::new(1);
        b.add(&key::make(b"a", 1, key::Kind::Put), &[0; 11]);
        let e = Index::new(Block::new(Bytes::from(b.finish())).unwrap(), u64::MAX).unwrap_err();
        assert!(e.contains("entry 0 is malformed"), "{e}");
    }

    fn user_key() -> impl Strategy<Value = Vec<u8>> {
        // Few distinct bytes and a long common head in some keys: equal prefixes, keys that are
        // prefixes of others, and a shared part of every length.
        (
            0usize..12,
            proptest::collection::vec(
                prop_oneof![Just(0u8), Just(1), Just(b'a'), Just(0xff)],
                0..12,
            ),
        )
            .prop_map(|(head, tail)| {
                let mut k = vec![b'k'; head];
                k.extend(tail);
                k
            })
    }

    proptest! {
        /// `lower_bound` finds what a search over the whole keys does, for any target.
        #[test]
        fn lower_bound_matches_a_search_of_the_keys(
            entries in proptest::collection::btree_set((user_key(), 0u64..4), 1..80),
            targets in proptest::collection::vec((user_key(), 0u64..5), 1..40),
        ) {
            let mut keys: Vec<Vec<u8>> =
                entries.iter().map(|(u, s)| key::make(u, *s, key::Kind::Put)).collect();
            keys.sort_by(|a, b| key::compare(a, b));
            let index = Index::new(build(&keys, 1), u64::MAX).unwrap();
            for (u, s) in targets {
                let target = key::lookup(&u, s);
                let want = keys.partition_point(|k| key::compare(k, &target) == Ordering::Less);
                prop_assert_eq!(index.lower_bound(&target), want, "target {:?}@{}", u, s);
            }
        }
    }
}
