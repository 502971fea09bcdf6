//! Blocks of an SSTable: sorted entries with prefix-compressed keys and restart points.
//!
//! Layout: `entry* | restart u32 LE * n | n u32 LE`, where an entry is
//! `shared varint | unshared varint | value_len varint | key[shared..] | value`. At a restart
//! point `shared` is 0, so a binary search over restarts needs no earlier entry. Decoding never
//! trusts a length: anything out of bounds is reported as a reason string, which the table turns
//! into `Error::Corrupt` naming the file and block.

use std::cmp::Ordering;

use bytes::Bytes;

use crate::key::{get_varint, put_varint};

pub(crate) struct BlockBuilder {
    buf: Vec<u8>,
    restarts: Vec<u32>,
    counter: usize,
    interval: usize,
    last_key: Vec<u8>,
    entries: usize,
}

impl BlockBuilder {
    pub(crate) fn new(interval: usize) -> BlockBuilder {
        BlockBuilder {
            buf: Vec::with_capacity(4096 + 512),
            restarts: Vec::new(),
            counter: 0,
            interval: interval.max(1),
            last_key: Vec::new(),
            entries: 0,
        }
    }

    /// Appends an entry; keys must come in increasing order.
    pub(crate) fn add(&mut self, key: &[u8], value: &[u8]) {
        let shared = if self.counter < self.interval && self.entries > 0 {
            self.last_key.iter().zip(key).take_while(|(a, b)| a == b).count()
        } else {
            self.restarts.push(self.buf.len() as u32);
            self.counter = 0;
            0
        };
        put_varint(&mut self.buf, shared as u64);
        put_varint(&mut self.buf, (key.len() - shared) as u64);
        put_varint(&mut self.buf, value.len() as u64);
        #[expect(clippy::indexing_slicing, reason = "`shared` counts bytes of `key`")]
        self.buf.extend_from_slice(&key[shared..]);
        self.buf.extend_from_slice(value);
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.counter += 1;
        self.entries += 1;
    }

    pub(crate) fn estimated_size(&self) -> usize {
        self.buf.len() + 4 * self.restarts.len() + 4
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries == 0
    }

    pub(crate) fn last_key(&self) -> &[u8] {
        &self.last_key
    }

    /// The finished block; the builder is reset for the next one.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        for r in &self.restarts {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&(self.restarts.len() as u32).to_le_bytes());
        self.restarts.clear();
        self.counter = 0;
        self.entries = 0;
        self.buf = Vec::with_capacity(out.capacity());
        out
    }
}

/// A verified, uncompressed block.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    data: Bytes,
    restarts_at: usize,
    restarts: usize,
}

/// An entry as [`Block::entry_at`] reads it.
pub(crate) struct EntryAt<'a> {
    /// Bytes of the key before it that its key starts with.
    pub(crate) shared: usize,
    /// The rest of its key.
    pub(crate) delta: &'a [u8],
    pub(crate) value: &'a [u8],
    /// Where the next entry starts.
    pub(crate) next: usize,
}

struct Entry {
    shared: usize,
    delta: (usize, usize),
    value: (usize, usize),
    next: usize,
}

impl Block {
    pub(crate) fn new(data: Bytes) -> Result<Block, String> {
        let len = data.len();
        let Some((_, &n)) = data.split_last_chunk::<4>() else {
            return Err(format!("block of {len} bytes is too short"));
        };
        let n = u32::from_le_bytes(n) as usize;
        let restarts_at = n
            .checked_mul(4)
            .and_then(|b| (len - 4).checked_sub(b))
            .ok_or_else(|| format!("{n} restart points do not fit in a block of {len} bytes"))?;
        let b = Block { data, restarts_at, restarts: n };
        for i in 0..n {
            if restarts_at > 0 && b.restart(i) >= restarts_at {
                return Err(format!("restart point {i} lies outside the block"));
            }
        }
        if n == 0 && restarts_at > 0 {
            return Err("a non-empty block has no restart point".into());
        }
        Ok(b)
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "callers pass i < restarts, and `new` checked that the restarts_at + 4 * restarts \
                  bytes of the restart array lie in `data`"
    )]
    fn restart(&self, i: usize) -> usize {
        let at = self.restarts_at + 4 * i;
        u32::from_le_bytes(self.data[at..at + 4].try_into().expect("4 bytes")) as usize
    }

    /// Bytes `from..to` of the block: a span of an `Entry`, which `entry` checked.
    fn span(&self, (from, to): (usize, usize)) -> Result<&[u8], String> {
        self.data.get(from..to).ok_or_else(|| format!("bytes {from}..{to} lie outside the block"))
    }

    fn entry(&self, pos: usize, prev_len: usize) -> Result<Entry, String> {
        let bad = || format!("entry at {pos} is malformed");
        let d = self.data.get(..self.restarts_at).ok_or_else(bad)?;
        let mut p = pos;
        let shared = get_varint(d, &mut p).ok_or_else(bad)? as usize;
        let unshared = get_varint(d, &mut p).ok_or_else(bad)? as usize;
        let vlen = get_varint(d, &mut p).ok_or_else(bad)? as usize;
        if shared > prev_len {
            return Err(format!("entry at {pos} shares {shared} bytes of a {prev_len}-byte key"));
        }
        let kend = p.checked_add(unshared).filter(|&e| e <= d.len()).ok_or_else(bad)?;
        let vend = kend.checked_add(vlen).filter(|&e| e <= d.len()).ok_or_else(bad)?;
        Ok(Entry { shared, delta: (p, kend), value: (kend, vend), next: vend })
    }

    /// The entry at restart point `i`, which shares nothing with the key before it: where it
    /// starts, its key and its value (the next entry starts where the value ends).
    pub(crate) fn restart_entry(
        &self,
        i: usize,
    ) -> Result<(usize, std::ops::Range<usize>, std::ops::Range<usize>), String> {
        if i >= self.restarts {
            return Err(format!("restart point {i} of {}", self.restarts));
        }
        let pos = self.restart(i);
        let e = self.entry(pos, 0)?;
        Ok((pos, e.delta.0..e.delta.1, e.value.0..e.value.1))
    }

    /// The entry at `pos`, after a key of `prev_len` bytes, checked as every read checks it.
    pub(crate) fn entry_at(&self, pos: usize, prev_len: usize) -> Result<EntryAt<'_>, String> {
        let e = self.entry(pos, prev_len)?;
        Ok(EntryAt {
            shared: e.shared,
            delta: self.span(e.delta)?,
            value: self.span(e.value)?,
            next: e.next,
        })
    }

    /// The entries' end (where the restart array begins).
    pub(crate) fn entries_end(&self) -> usize {
        self.restarts_at
    }

    /// The number of restart points.
    pub(crate) fn restarts(&self) -> usize {
        self.restarts
    }

    /// The block's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The first entry whose key is not below `target`, found without decoding the whole block
    /// (see [`BlockCursor::seek`]). Every key it looks at must pass `valid`.
    pub(crate) fn seek(
        self,
        target: &[u8],
        cmp: impl Fn(&[u8], &[u8]) -> Ordering,
        valid: fn(&[u8]) -> bool,
    ) -> Result<Option<(Vec<u8>, Bytes)>, String> {
        let mut c = BlockCursor::new(self, valid);
        c.seek(target, cmp)?;
        Ok(c.at.then(|| {
            let v = c.value_bytes();
            (c.key, v)
        }))
    }

    pub(crate) fn size(&self) -> usize {
        self.data.len()
    }

    /// Every entry, decoded: keys restored into one buffer, values sliced from the block.
    pub(crate) fn decode(&self) -> Result<Decoded, String> {
        if u32::try_from(self.data.len()).is_err() {
            return Err(format!("block of {} bytes is too large", self.data.len()));
        }
        let mut keys: Vec<u8> = Vec::with_capacity(self.restarts_at);
        let mut spans = Vec::with_capacity(self.restarts * 16);
        let mut pos = 0;
        let mut prev: (usize, usize) = (0, 0);
        while pos < self.restarts_at {
            let e = self.entry(pos, prev.1 - prev.0)?;
            let start = keys.len();
            keys.extend_from_within(prev.0..prev.0 + e.shared);
            keys.extend_from_slice(self.span(e.delta)?);
            // Restored keys can outgrow the block (each entry may repeat the last key's
            // prefix): their offsets must fit a span too.
            if u32::try_from(keys.len()).is_err() {
                return Err(format!(
                    "the keys of a block of {} bytes restore to over 4 GiB",
                    self.data.len()
                ));
            }
            prev = (start, keys.len());
            spans.push(Span::new(prev, e.value));
            pos = e.next;
        }
        Ok(Decoded { keys: Bytes::from(keys), spans, data: self.data.clone() })
    }
}

/// A forward walk over a block's entries. It restores each key from the one before it, so an
/// entry is parsed only when the walk reaches it and nothing is allocated per entry; every key it
/// restores must pass `valid`, or the step fails.
#[derive(Debug)]
pub(crate) struct BlockCursor {
    block: Block,
    valid: fn(&[u8]) -> bool,
    /// The key of the current entry (meaningful while `at`).
    key: Vec<u8>,
    value: (usize, usize),
    /// Where the next entry starts.
    next: usize,
    /// Whether the cursor stands on an entry.
    at: bool,
}

impl BlockCursor {
    /// A cursor before the first entry of `block` (not on an entry until it moves).
    pub(crate) fn new(block: Block, valid: fn(&[u8]) -> bool) -> BlockCursor {
        BlockCursor { block, valid, key: Vec::new(), value: (0, 0), next: 0, at: false }
    }

    /// Moves to another block, keeping the key buffer; call `first` or `seek` next.
    pub(crate) fn reset(&mut self, block: Block) {
        self.block = block;
        self.next = 0;
        self.at = false;
    }

    /// Moves to the first entry.
    pub(crate) fn first(&mut self) -> Result<(), String> {
        self.next = 0;
        self.key.clear();
        self.advance()
    }

    /// Moves to the next entry (off the end after the last).
    pub(crate) fn advance(&mut self) -> Result<(), String> {
        if self.next >= self.block.restarts_at {
            self.at = false;
            return Ok(());
        }
        let shared = if self.next == 0 { 0 } else { self.key.len() };
        let e = self.block.entry(self.next, shared)?;
        self.key.truncate(e.shared);
        self.key.extend_from_slice(self.block.span(e.delta)?);
        if !(self.valid)(&self.key) {
            return Err(format!("key at {} is malformed", self.next));
        }
        self.value = e.value;
        self.next = e.next;
        self.at = true;
        Ok(())
    }

    /// Moves to the first entry whose key is not below `target` (off the end if none): a
    /// binary search over the restart points, then a walk of at most one restart interval.
    pub(crate) fn seek(
        &mut self,
        target: &[u8],
        cmp: impl Fn(&[u8], &[u8]) -> Ordering,
    ) -> Result<(), String> {
        let b = &self.block;
        let (mut lo, mut hi) = (0usize, b.restarts);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let e = b.entry(b.restart(mid), 0)?;
            let k = b.span(e.delta)?;
            if !(self.valid)(k) {
                return Err(format!("restart key {mid} is malformed"));
            }
            if cmp(k, target) == Ordering::Less {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        self.next = if lo == 0 { 0 } else { b.restart(lo - 1) };
        self.key.clear();
        loop {
            self.advance()?;
            if !self.at || cmp(&self.key, target) != Ordering::Less {
                return Ok(());
            }
        }
    }

    /// The current key; `None` off the end.
    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.at.then_some(&self.key[..])
    }

    /// The current value (empty off the end).
    #[expect(
        clippy::indexing_slicing,
        reason = "`value` is a span `entry` checked against this block, read only while `at`"
    )]
    pub(crate) fn value(&self) -> &[u8] {
        &self.block.data[self.value.0..self.value.1]
    }

    /// The current value as shared bytes (no copy).
    pub(crate) fn value_bytes(&self) -> Bytes {
        self.block.data.slice(self.value.0..self.value.1)
    }
}

/// Where an entry's key (in `Decoded::keys`) and value (in `Decoded::data`) lie, as offsets
/// under 4 GiB (`decode` checks the block and the restored keys): half the room of `usize`
/// pairs, for every entry of every index kept open and block in the cache.
#[derive(Debug, Clone, Copy)]
struct Span {
    key: (u32, u32),
    value: (u32, u32),
}

impl Span {
    fn new(key: (usize, usize), value: (usize, usize)) -> Span {
        Span { key: (key.0 as u32, key.1 as u32), value: (value.0 as u32, value.1 as u32) }
    }

    fn key(self) -> std::ops::Range<usize> {
        self.key.0 as usize..self.key.1 as usize
    }

    fn value(self) -> std::ops::Range<usize> {
        self.value.0 as usize..self.value.1 as usize
    }
}

/// A block decoded for iteration: keys restored into one buffer, values sliced from the block.
#[derive(Debug)]
pub(crate) struct Decoded {
    keys: Bytes,
    spans: Vec<Span>,
    data: Bytes,
}

impl Decoded {
    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "i < len() (callers); `decode` built every span within `keys` and `data`"
    )]
    pub(crate) fn key(&self, i: usize) -> &[u8] {
        &self.keys[self.spans[i].key()]
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "i < len() (callers); `decode` built every span within `keys` and `data`"
    )]
    pub(crate) fn value(&self, i: usize) -> Bytes {
        self.data.slice(self.spans[i].value())
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "i < len() (callers); `decode` built every span within `keys` and `data`"
    )]
    pub(crate) fn value_ref(&self, i: usize) -> &[u8] {
        &self.data[self.spans[i].value()]
    }

    /// Key `i` as shared bytes (no copy).
    #[expect(
        clippy::indexing_slicing,
        reason = "i < len() (callers); `decode` built every span within `keys` and `data`"
    )]
    pub(crate) fn key_bytes(&self, i: usize) -> Bytes {
        self.keys.slice(self.spans[i].key())
    }

    /// Index of the first entry greater than `target`.
    #[expect(clippy::indexing_slicing, reason = "`decode` built every key span within `keys`")]
    pub(crate) fn upper_bound(
        &self,
        target: &[u8],
        cmp: impl Fn(&[u8], &[u8]) -> Ordering,
    ) -> usize {
        self.spans.partition_point(|s| cmp(&self.keys[s.key()], target) != Ordering::Greater)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cmp(a: &[u8], b: &[u8]) -> Ordering {
        a.cmp(b)
    }

    #[test]
    fn blocks_too_short_or_with_restarts_past_their_end_are_errors() {
        for short in [&[][..], &[1], &[1, 0, 0]] {
            let e = Block::new(Bytes::copy_from_slice(short)).unwrap_err();
            assert!(e.contains("too short"), "{e}");
        }
        let e = Block::new(Bytes::from_static(&[0, 0, 0, 0, 2, 0, 0, 0])).unwrap_err();
        assert!(e.contains("do not fit"), "{e}");
    }

    proptest! {
        #[test]
        fn built_blocks_decode_and_seek(
            keys in proptest::collection::btree_set(proptest::collection::vec(0u8..4, 1..12), 1..200),
            interval in 1usize..20,
            probe in proptest::collection::vec(0u8..4, 0..12),
        ) {
            let mut b = BlockBuilder::new(interval);
            for k in &keys {
                b.add(k, &[k.len() as u8]);
            }
            let block = Block::new(Bytes::from(b.finish())).unwrap();
            let d = block.decode().unwrap();
            let keys: Vec<_> = keys.into_iter().collect();
            prop_assert_eq!(d.len(), keys.len());
            for (i, k) in keys.iter().enumerate() {
                prop_assert_eq!(d.key(i), &k[..]);
                prop_assert_eq!(&d.key_bytes(i)[..], &k[..]);
                prop_assert_eq!(&d.value(i)[..], &[k.len() as u8][..]);
                prop_assert_eq!(d.value_ref(i), &[k.len() as u8][..]);
            }
            let want = keys.iter().find(|k| k[..] >= probe[..]);
            let at = keys.partition_point(|k| k[..] < probe[..]);
            let after = d.upper_bound(&probe, cmp);
            prop_assert_eq!(after, keys.partition_point(|k| k[..] <= probe[..]));
            let sought = block.clone().seek(&probe, cmp, |_| true).unwrap().map(|(k, _)| k);
            prop_assert_eq!(sought, want.cloned());
            let mut c = BlockCursor::new(block.clone(), |_| true);
            c.first().unwrap();
            let mut walked = Vec::new();
            while let Some(k) = c.key() {
                prop_assert_eq!(c.value(), &[k.len() as u8][..]);
                walked.push(k.to_vec());
                c.advance().unwrap();
            }
            prop_assert_eq!(&walked, &keys);
            c.seek(&probe, cmp).unwrap();
            prop_assert_eq!(c.key().map(|k| k.to_vec()), want.cloned());
            prop_assert_eq!((at < d.len()).then(|| d.key(at).to_vec()), want.cloned());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(b) = Block::new(Bytes::from(bytes)) {
                if let Ok(d) = b.decode() {
                    let _ = d.upper_bound(b"m", cmp);
                }
                let _ = b.clone().seek(b"m", cmp, |_| true);
                // Each step moves forward, so the walk ends.
                let mut c = BlockCursor::new(b, |_| true);
                if c.first().is_ok() {
                    while c.key().is_some() && c.advance().is_ok() {}
                }
            }
        }
    }
}
