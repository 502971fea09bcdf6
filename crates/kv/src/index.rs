//! `Index`: a table's index block, kept in memory while the table is open and read in place.
//!
//! The block's own bytes and one 4-byte prefix per restart point are all it keeps. Entry `i` is found by walking from its restart point (every 16th entry in version
//! 2, where keys between restarts are prefix-compressed; every entry in version 1). `new`
//! checks every entry (restart points where the form puts them, a key of its form, a handle
//! inside the data region), so the accessors cannot meet a malformed one.
//!
//! An entry's key is a separator: at least the last internal key of its data block and below
//! the first of the next. Version 1 tables use the last key itself; version 2 tables use as
//! short a user key as lies between the two blocks' keys (`separator`), which stands for that
//! user key with tag 0 (the greatest internal key of a user key: sequence numbers start at 1),
//! and the last internal key only where both blocks hold versions of one user key.
//!
//! Lookups first search the prefixes: each is 4 bytes of a restart key's user key taken after the
//! bytes that every key of the table shares (the common prefix of the first and last keys,
//! which in a sorted block all keys share), so tables of keys with long common heads (decimal
//! ids, `user:` prefixes) still split on bytes that differ.

use std::cmp::Ordering;

use crate::block::Block;
use crate::key;

/// Bytes of a version 1 block handle: `offset u64 LE | size u32 LE`.
const FIXED_HANDLE_LEN: usize = 12;

/// How a table's index entries are written, by the table's format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// Version 1: key = the block's last internal key; handle = `offset u64 | size u32`.
    LastKeys,
    /// Version 2: key = a separator; handle = `offset varint | size << 1 | tagged varint`,
    /// the key an internal key if `tagged`, else a user key standing for itself with tag 0.
    Separators,
}

/// One parsed entry: the separator as a user key and tag, and its block's handle.
struct Entry<'a> {
    user: &'a [u8],
    tag: u64,
    offset: u64,
    size: u32,
}

#[derive(Debug)]
pub(crate) struct Index {
    block: Block,
    form: Form,
    /// Entries (data blocks).
    len: usize,
    /// Entries per restart point (`Form::interval`).
    interval: usize,
    /// Per restart point, the first 4 bytes of its user key past `common` (`prefix_of`). Four
    /// bytes tell apart the thousands of restart points of a table as well as eight, in half
    /// the memory; points of equal prefix are told apart by their keys.
    prefixes: Vec<u32>,
    /// The bytes at the head of every entry's user key that all entries share.
    common: Box<[u8]>,
}

impl Form {
    /// Entries per restart point of an index block of this form.
    pub(crate) fn interval(self) -> usize {
        match self {
            Form::LastKeys => 1,
            Form::Separators => RESTART_INTERVAL,
        }
    }
}

/// Entries per restart point of a version 2 index block: between them keys are
/// prefix-compressed against the entry before, and a lookup reads at most this many entries
/// after a binary search of the restart points.
pub(crate) const RESTART_INTERVAL: usize = 16;

impl Index {
    /// The index `block`, of `form`, of a table whose data blocks end at `data_end`, checked
    /// entry by entry.
    pub(crate) fn new(block: Block, form: Form, data_end: u64) -> Result<Index, String> {
        let interval = form.interval();
        let end = block.entries_end();
        let (mut pos, mut i) = (0, 0);
        let mut key: Vec<u8> = Vec::new();
        let mut first_user: Option<Vec<u8>> = None;
        while pos < end {
            let bad = || format!("index entry {i} is malformed");
            // Entry `i` starts restart point `i / interval` exactly when `i` is a multiple of
            // the interval: an entry the restarts skipped would be a block no lookup reaches.
            if i % interval == 0 {
                let (at, _, _) = block.restart_entry(i / interval)?;
                if at != pos {
                    return Err(format!("index entry {i} is not at its restart point"));
                }
            }
            let at = block.entry_at(pos, key.len()).map_err(|r| format!("index entry {i}: {r}"))?;
            if i % interval == 0 && at.shared > 0 {
                return Err(bad());
            }
            key.truncate(at.shared);
            key.extend_from_slice(at.delta);
            let e = parse(form, &key, at.value).ok_or_else(bad)?;
            let in_data = e
                .offset
                .checked_add(u64::from(e.size) + crate::table::TRAILER_LEN as u64)
                .is_some_and(|end| end <= data_end);
            if !in_data {
                return Err(bad());
            }
            if i == 0 {
                first_user = Some(e.user.to_vec());
            }
            pos = at.next;
            i += 1;
        }
        if block.restarts() != i.div_ceil(interval) {
            return Err(format!(
                "index block has {} restart points for {i} entries",
                block.restarts()
            ));
        }
        let mut index =
            Index { block, form, len: i, interval, prefixes: Vec::new(), common: Box::default() };
        if let Some(first) = first_user {
            let last = index.separator(i - 1).0;
            let shared = first.iter().zip(&last).take_while(|(a, b)| a == b).count();
            index.common = first.get(..shared).unwrap_or_default().into();
        }
        let prefixes = (0..index.block.restarts())
            .map(|r| index.prefix_of(index.restart_entry(r).user))
            .collect();
        index.prefixes = prefixes;
        Ok(index)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes it keeps in memory.
    pub(crate) fn memory(&self) -> usize {
        self.block.size() + self.prefixes.capacity() * 4 + self.common.len()
    }

    /// The entry at restart point `r`, whose key is whole (`new` checked every entry; a
    /// default for `r` past the last).
    fn restart_entry(&self, r: usize) -> Entry<'_> {
        let bytes = self.block.bytes();
        self.block
            .restart_entry(r)
            .ok()
            .and_then(|(_, k, v)| parse(self.form, bytes.get(k)?, bytes.get(v)?))
            .unwrap_or(Entry { user: &[], tag: 0, offset: 0, size: 0 })
    }

    /// Walks the entries from restart point `r` on, restoring each key, until `f` returns
    /// true or the entries end; `f` gets the entry's number and the entry.
    fn walk_from(&self, r: usize, mut f: impl FnMut(usize, Entry<'_>) -> bool) {
        let end = self.block.entries_end();
        let Ok((mut pos, _, _)) = self.block.restart_entry(r) else { return };
        let mut key: smallvec::SmallVec<[u8; 64]> = smallvec::SmallVec::new();
        let mut i = r * self.interval;
        // `new` checked every entry: a failure here cannot happen and ends the walk.
        while pos < end {
            let Ok(at) = self.block.entry_at(pos, key.len()) else { return };
            key.truncate(at.shared);
            key.extend_from_slice(at.delta);
            let Some(e) = parse(self.form, &key, at.value) else { return };
            if f(i, e) {
                return;
            }
            pos = at.next;
            i += 1;
        }
    }

    /// Entry `i`'s separator (`i < len()`) as a user key and tag: at least the last internal
    /// key of its data block, and below the first key of the next.
    pub(crate) fn separator(&self, i: usize) -> (Vec<u8>, u64) {
        let mut out = (Vec::new(), 0);
        self.walk_from(i / self.interval, |j, e| {
            if j == i {
                out = (e.user.to_vec(), e.tag);
            }
            j >= i
        });
        out
    }

    /// The handle of data block `i` (`i < len()`): its offset and stored size. Reads only the
    /// entries' lengths on the way from the restart point (no key is restored): iterators ask
    /// for each block they enter.
    pub(crate) fn handle(&self, i: usize) -> (u64, u32) {
        let Ok((mut pos, _, _)) = self.block.restart_entry(i / self.interval) else {
            return (0, 0);
        };
        // Only the keys' lengths are followed.
        let mut key_len = 0;
        for n in 0..=i % self.interval {
            let Ok(at) = self.block.entry_at(pos, key_len) else { return (0, 0) };
            if n == i % self.interval {
                return handle_of(self.form, at.value).map_or((0, 0), |(off, size, _)| (off, size));
            }
            key_len = at.shared + at.delta.len();
            pos = at.next;
        }
        (0, 0)
    }

    /// The prefix `lower_bound` searches by, of a user key that starts with `common`.
    fn prefix_of(&self, user: &[u8]) -> u32 {
        (key::prefix8(user.get(self.common.len()..).unwrap_or_default()) >> 32) as u32
    }

    /// The first entry (data block) whose separator is not below the internal key `target`:
    /// no block before it holds a key at or above `target`, and the first version of
    /// `target`'s user key at or below it, if the table has one, is in that block.
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
        let tag = key::tag_of(target);
        // Internal keys order by user key, then by tag descending.
        let below =
            |e: &Entry<'_>| key::bytes_cmp(e.user, user).then(tag.cmp(&e.tag)) == Ordering::Less;
        // The first restart point not below the target: among those of equal prefix (mostly
        // none or one), a binary search on keys.
        let p = self.prefix_of(user);
        let lo = self.prefixes.partition_point(|&x| x < p);
        let hi = lo + self.prefixes.get(lo..).unwrap_or_default().partition_point(|&x| x == p);
        let (mut lo, mut hi) = (lo, hi);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if below(&self.restart_entry(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == 0 {
            return 0;
        }
        // Past the point before it, which is below the target, at most an interval on.
        let limit = (lo * self.interval).min(n);
        let mut found = limit;
        self.walk_from(lo - 1, |i, e| {
            if i >= limit {
                return true;
            }
            if !below(&e) {
                found = i;
                return true;
            }
            false
        });
        found
    }
}

/// The handle in an entry's value of `form`, and whether its key is an internal key; `None`
/// if malformed.
fn handle_of(form: Form, v: &[u8]) -> Option<(u64, u32, bool)> {
    match form {
        Form::LastKeys => {
            if v.len() != FIXED_HANDLE_LEN {
                return None;
            }
            let offset = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
            let size = u32::from_le_bytes(v.get(8..)?.try_into().ok()?);
            Some((offset, size, true))
        }
        Form::Separators => {
            let mut pos = 0;
            let offset = key::get_varint(v, &mut pos)?;
            let sized = key::get_varint(v, &mut pos)?;
            if pos != v.len() {
                return None;
            }
            Some((offset, u32::try_from(sized >> 1).ok()?, sized & 1 == 1))
        }
    }
}

/// An entry of `form` from its key and value bytes; `None` if malformed.
fn parse<'a>(form: Form, k: &'a [u8], v: &[u8]) -> Option<Entry<'a>> {
    let (offset, size, tagged) = handle_of(form, v)?;
    if !tagged {
        return Some(Entry { user: k, tag: 0, offset, size });
    }
    key::valid(k).then(|| Entry { user: key::user(k), tag: key::tag_of(k), offset, size })
}

/// Appends to `out` the handle of a version 2 entry: `offset`, then `size << 1 | tagged`.
pub(crate) fn put_handle(out: &mut Vec<u8>, offset: u64, size: u32, tagged: bool) {
    key::put_varint(out, offset);
    key::put_varint(out, u64::from(size) << 1 | u64::from(tagged));
}

/// Sets `out` to the version 2 index key of a data block whose last internal key is `last`,
/// when the next block starts at `next` (`None` after the table's last block), and says whether
/// it is an internal key (tagged). Between different user keys `a < b` it is the shortest user
/// key `s` found with `a <= s < b` (standing for `s` with tag 0, which is at least every version
/// of `a` and below every version of `b`); where both blocks hold versions of one user key, no
/// user key lies between and it is `last` itself.
pub(crate) fn separator(last: &[u8], next: Option<&[u8]>, out: &mut Vec<u8>) -> bool {
    out.clear();
    let a = key::user(last);
    let Some(next) = next else {
        out.extend_from_slice(a);
        return false;
    };
    let b = key::user(next);
    if a == b {
        out.extend_from_slice(last);
        return true;
    }
    // a < b: at the first byte where they differ, a's is the smaller (unless a ends first).
    let n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    if let (Some(&x), Some(&y)) = (a.get(n), b.get(n)) {
        if x.saturating_add(1) < y {
            out.extend_from_slice(a.get(..n).unwrap_or_default());
            out.push(x + 1);
            return false;
        }
        // b's byte is the next one up: keep a up to there and raise the first byte after it
        // that can be raised, which gives a key above a and, its byte `n` still below b's,
        // below b.
        let rest = a.get(n + 1..).unwrap_or_default();
        if let Some(j) = rest.iter().position(|&c| c < 0xff) {
            let j = n + 1 + j;
            out.extend_from_slice(a.get(..j).unwrap_or_default());
            out.push(a.get(j).copied().unwrap_or_default() + 1);
            return false;
        }
    }
    out.extend_from_slice(a);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockBuilder;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn fixed(off: u64, len: u32) -> [u8; FIXED_HANDLE_LEN] {
        let mut h = [0u8; FIXED_HANDLE_LEN];
        h[..8].copy_from_slice(&off.to_le_bytes());
        h[8..].copy_from_slice(&len.to_le_bytes());
        h
    }

    /// A version 1 index block over `keys` (internal keys in order), block `i` at `100 * i`,
    /// `90 + i` bytes.
    fn build(keys: &[Vec<u8>], interval: usize) -> Block {
        let mut b = BlockBuilder::new(interval);
        for (i, k) in keys.iter().enumerate() {
            b.add(k, &fixed(100 * i as u64, 90 + i as u32));
        }
        Block::new(Bytes::from(b.finish())).unwrap()
    }

    /// A version 2 index over data blocks holding `blocks` (internal keys in order), as a
    /// table builder writes it; block `i` at `100 * i`, `90 + i` bytes.
    fn build_separators(blocks: &[Vec<Vec<u8>>]) -> Index {
        let mut b = BlockBuilder::new(RESTART_INTERVAL);
        let (mut sep, mut handle) = (Vec::new(), Vec::new());
        for (i, keys) in blocks.iter().enumerate() {
            let next = blocks.get(i + 1).map(|n| &n[0][..]);
            let tagged = separator(keys.last().unwrap(), next, &mut sep);
            handle.clear();
            put_handle(&mut handle, 100 * i as u64, 90 + i as u32, tagged);
            b.add(&sep, &handle);
        }
        Index::new(Block::new(Bytes::from(b.finish())).unwrap(), Form::Separators, u64::MAX)
            .unwrap()
    }

    #[test]
    fn keeps_the_block_and_four_bytes_an_entry() {
        let keys: Vec<_> = (0..1000u32)
            .map(|i| key::make(format!("key{i:08}").as_bytes(), 7, key::Kind::Put))
            .collect();
        let block = build(&keys, 1);
        let index = Index::new(block.clone(), Form::LastKeys, u64::MAX).unwrap();
        assert_eq!(index.len(), 1000);
        // Every key shares "key00000"; the prefixes hold the bytes after it.
        assert_eq!(&index.common[..], b"key00000");
        assert_eq!(index.memory(), block.size() + 1000 * 4 + 8);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(index.separator(i), (key::user(k).to_vec(), key::tag_of(k)));
            assert_eq!(index.handle(i), (100 * i as u64, 90 + i as u32));
        }
    }

    /// 1,000 data blocks of dense decimal keys: separators as long as the keys (no shorter user
    /// key lies between neighbours), but prefix-compressed between restart points, without
    /// tags, with varint handles: under half the memory of a version 1 index.
    #[test]
    fn a_version_2_index_of_dense_keys_takes_under_half_the_memory_of_version_1() {
        let keys: Vec<_> = (0..1000u32)
            .map(|i| key::make(format!("{i:016}").as_bytes(), 7, key::Kind::Put))
            .collect();
        let v1 = Index::new(build(&keys, 1), Form::LastKeys, u64::MAX).unwrap();
        let blocks: Vec<Vec<Vec<u8>>> = keys.iter().map(|k| vec![k.clone()]).collect();
        let v2 = build_separators(&blocks);
        assert_eq!(v2.len(), 1000);
        assert!(v2.memory() * 2 < v1.memory(), "{} against {}", v2.memory(), v1.memory());
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(v2.lower_bound(k), i);
            assert_eq!(v2.handle(i), (100 * i as u64, 90 + i as u32));
        }
        assert_eq!(v2.lower_bound(&key::lookup(b"0000000000001000", 1)), 1000);
    }

    #[test]
    fn separators_are_short_user_keys_between_blocks() {
        let put = |u: &[u8], seq| key::make(u, seq, key::Kind::Put);
        let mut out = Vec::new();
        let cases: [(&[u8], &[u8], &[u8]); 6] = [
            // A byte between the first that differ.
            (b"abc123", b"abe", b"abd"),
            // b's byte is the next one up: a's next byte that can be raised is.
            (b"key00499", b"key00500", b"key004:"),
            (b"ab\xff\xff\x01x", b"ac", b"ab\xff\xff\x02"),
            // Nothing can be raised, or a is a prefix of b: a itself.
            (b"ab\xff", b"ac", b"ab\xff"),
            (b"ab", b"abc", b"ab"),
            (b"", b"a", b""),
        ];
        for (a, b, want) in cases {
            assert!(!separator(&put(a, 5), Some(&put(b, 9)), &mut out));
            assert_eq!(out, want, "{:?} {:?}", a, b);
            assert!(a <= &out[..] && &out[..] < b);
        }
        // One user key on both sides: the last internal key.
        let last = put(b"same", 9);
        assert!(separator(&last, Some(&put(b"same", 8)), &mut out));
        assert_eq!(out, last);
        // After the last block: its user key.
        assert!(!separator(&last, None, &mut out));
        assert_eq!(out, b"same");
        // Random 16-byte keys a thousand apart in a million share about two bytes: separators
        // of three or four instead of 24-byte internal keys.
        let mut handle = Vec::new();
        put_handle(&mut handle, 60 << 20, 4100, false);
        assert_eq!(handle.len(), 6);
    }

    #[test]
    fn malformed_indexes_are_refused() {
        let keys: Vec<_> = (0..40u32)
            .map(|i| key::make(format!("key{i:04}").as_bytes(), 7, key::Kind::Put))
            .collect();
        // Entries between restart points (they share a prefix): lookups would skip them.
        let e = Index::new(build(&keys, 16), Form::LastKeys, u64::MAX).unwrap_err();
        assert!(e.contains("shares") || e.contains("restart point"), "{e}");
        // A handle past the data region.
        let e = Index::new(build(&keys, 1), Form::LastKeys, 3900 + 90 + 39 + 5 - 1).unwrap_err();
        assert!(e.contains("entry 39 is malformed"), "{e}");
        let one = |k: &[u8], v: &[u8], form| {
            let mut b = BlockBuilder::new(1);
            b.add(k, v);
            Index::new(Block::new(Bytes::from(b.finish())).unwrap(), form, u64::MAX)
        };
        let internal = key::make(b"a", 1, key::Kind::Put);
        // A key too short to be an internal key.
        let e = one(b"abc", &fixed(0, 1), Form::LastKeys).unwrap_err();
        assert!(e.contains("entry 0 is malformed"), "{e}");
        // A value that is not a handle.
        let e = one(&internal, &[0; 11], Form::LastKeys).unwrap_err();
        assert!(e.contains("entry 0 is malformed"), "{e}");
        // Version 2: a tagged key that is not an internal key, a handle with bytes after it, a
        // truncated varint, a size past u32.
        let mut h = Vec::new();
        put_handle(&mut h, 0, 1, true);
        assert!(one(b"abc", &h, Form::Separators).is_err());
        assert!(one(&internal, &h, Form::Separators).is_ok());
        h.push(0);
        assert!(one(&internal, &h, Form::Separators).is_err());
        assert!(one(b"a", &[0x80], Form::Separators).is_err());
        let mut h = Vec::new();
        key::put_varint(&mut h, 0);
        key::put_varint(&mut h, 1 << 33);
        assert!(one(b"a", &h, Form::Separators).is_err());
        // Version 2 with a restart point at every entry: not where the format puts them.
        let mut b = BlockBuilder::new(1);
        for (i, k) in keys.iter().enumerate() {
            let mut h = Vec::new();
            put_handle(&mut h, 100 * i as u64, 90, true);
            b.add(k, &h);
        }
        let e =
            Index::new(Block::new(Bytes::from(b.finish())).unwrap(), Form::Separators, u64::MAX)
                .unwrap_err();
        assert!(e.contains("restart point"), "{e}");
    }

    fn user_key() -> impl Strategy<Value = Vec<u8>> {
        // Few distinct bytes and a long common head in some keys: equal prefixes, keys that are
        // prefixes of others, and a shared part of every length.
        (
            0usize..12,
            proptest::collection::vec(
                prop_oneof![Just(0u8), Just(1), Just(b'a'), Just(0xfe), Just(0xff)],
                0..12,
            ),
        )
            .prop_map(|(head, tail)| {
                let mut k = vec![b'k'; head];
                k.extend(tail);
                k
            })
    }

    fn sorted_keys(entries: &std::collections::BTreeSet<(Vec<u8>, u64)>) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> =
            entries.iter().map(|(u, s)| key::make(u, *s, key::Kind::Put)).collect();
        keys.sort_by(|a, b| key::compare(a, b));
        keys
    }

    proptest! {
        /// `lower_bound` of a version 1 index finds what a search over the whole keys does.
        #[test]
        fn lower_bound_matches_a_search_of_the_keys(
            entries in proptest::collection::btree_set((user_key(), 1u64..4), 1..80),
            targets in proptest::collection::vec((user_key(), 0u64..5), 1..40),
        ) {
            let keys = sorted_keys(&entries);
            let index = Index::new(build(&keys, 1), Form::LastKeys, u64::MAX).unwrap();
            for (u, s) in targets {
                let target = key::lookup(&u, s);
                let want = keys.partition_point(|k| key::compare(k, &target) == Ordering::Less);
                prop_assert_eq!(index.lower_bound(&target), want, "target {:?}@{}", u, s);
            }
        }

        /// Over data blocks cut anywhere (also between versions of one user key), version 2
        /// separators lie between their blocks, and `lower_bound` gives a block before which
        /// every key is below the target and in which the first version of the target's user
        /// key at or below it lies, if there is one: what reads of tables rely on.
        #[test]
        fn separators_lead_lookups_to_the_right_block(
            entries in proptest::collection::btree_set((user_key(), 1u64..4), 1..80),
            cuts in proptest::collection::vec(any::<bool>(), 80),
            targets in proptest::collection::vec((user_key(), 0u64..5), 1..40),
        ) {
            let keys = sorted_keys(&entries);
            let mut blocks: Vec<Vec<Vec<u8>>> = vec![vec![]];
            for (i, k) in keys.iter().enumerate() {
                if cuts[i] && !blocks.last().unwrap().is_empty() {
                    blocks.push(vec![]);
                }
                blocks.last_mut().unwrap().push(k.clone());
            }
            let index = build_separators(&blocks);
            prop_assert_eq!(index.len(), blocks.len());
            for (i, b) in blocks.iter().enumerate() {
                let (user, tag) = index.separator(i);
                let sep = key::make(&user, tag >> 8, key::Kind::from_u8(tag as u8).unwrap());
                prop_assert!(key::compare(b.last().unwrap(), &sep) != Ordering::Greater);
                if let Some(next) = blocks.get(i + 1) {
                    prop_assert!(key::compare(&sep, &next[0]) == Ordering::Less);
                }
                prop_assert_eq!(index.handle(i), (100 * i as u64, 90 + i as u32));
            }
            // Targets among the stored user keys too, at every sequence number.
            let stored = entries.iter().flat_map(|(u, _)| (0..5).map(|s| (u.clone(), s)));
            for (u, s) in targets.into_iter().chain(stored) {
                let target = key::lookup(&u, s);
                let j = index.lower_bound(&target);
                let below = |k: &Vec<u8>| key::compare(k, &target) == Ordering::Less;
                prop_assert!(blocks[..j].iter().flatten().all(below), "target {:?}@{}", u, s);
                let first = keys.iter().find(|k| !below(k));
                if let Some(k) = first.filter(|k| key::user(k) == u.as_slice()) {
                    prop_assert!(blocks.get(j).is_some_and(|b| b.contains(k)));
                }
            }
        }
    }
}
