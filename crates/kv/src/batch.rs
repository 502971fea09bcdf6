//! `WriteBatch`: writes applied atomically, kept in their log encoding so that a write costs one
//! copy into the WAL. Layout (docs/format/sstable.md, "WAL records"):
//! `seq u64 LE | count u32 LE | count × (kind u8 | key_len varint | key | [value_len varint | value])`.

use crate::error::{Error, Result};
use std::ops::Range;

use crate::key::{get_u32, get_u64, get_varint, put_varint, Kind, Op, MAX_SEQ};
use crate::options::{MAX_KEY_LEN, MAX_VALUE_LEN};

pub(crate) const HEADER_LEN: usize = 12;

/// Puts and deletes applied atomically by [`crate::Db::write`]: after a crash either all of them
/// are present or none.
#[derive(Clone)]
pub struct WriteBatch {
    rep: Vec<u8>,
    count: u32,
    invalid: Option<String>,
}

impl Default for WriteBatch {
    fn default() -> Self {
        WriteBatch { rep: vec![0; HEADER_LEN], count: 0, invalid: None }
    }
}

impl std::fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBatch")
            .field("count", &self.count)
            .field("bytes", &self.rep.len())
            .finish()
    }
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// An empty batch with room for `bytes` of keys and values.
    pub fn with_capacity(bytes: usize) -> WriteBatch {
        let mut rep = Vec::with_capacity(HEADER_LEN + bytes + 16);
        rep.resize(HEADER_LEN, 0);
        WriteBatch { rep, count: 0, invalid: None }
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> &mut Self {
        let (key, value) = (key.as_ref(), value.as_ref());
        self.check(key, Some(value));
        self.rep.push(Kind::Put as u8);
        put_varint(&mut self.rep, key.len() as u64);
        self.rep.extend_from_slice(key);
        put_varint(&mut self.rep, value.len() as u64);
        self.rep.extend_from_slice(value);
        self.count += 1;
        self
    }

    /// Sets the key that is the concatenation of `key` to the value that is the concatenation
    /// of `value`, as [`WriteBatch::put`] of the joined bytes would, without joining them first.
    pub fn put_parts(&mut self, key: &[&[u8]], value: &[&[u8]]) -> &mut Self {
        let klen: usize = key.iter().map(|p| p.len()).sum();
        let vlen: usize = value.iter().map(|p| p.len()).sum();
        if self.invalid.is_none() {
            self.invalid = validate_lens(klen, Some(vlen)).err();
        }
        self.rep.push(Kind::Put as u8);
        put_varint(&mut self.rep, klen as u64);
        for p in key {
            self.rep.extend_from_slice(p);
        }
        put_varint(&mut self.rep, vlen as u64);
        for p in value {
            self.rep.extend_from_slice(p);
        }
        self.count += 1;
        self
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: impl AsRef<[u8]>) -> &mut Self {
        let key = key.as_ref();
        self.check(key, None);
        self.rep.push(Kind::Delete as u8);
        put_varint(&mut self.rep, key.len() as u64);
        self.rep.extend_from_slice(key);
        self.count += 1;
        self
    }

    /// Number of puts and deletes.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch holds no write.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the encoded batch.
    pub fn size(&self) -> usize {
        self.rep.len()
    }

    /// The writes in the batch, in order: `(key, Some(value))` for a put, `(key, None)` for a
    /// delete.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> + '_ {
        let ops = Ops { rep: &self.rep, pos: HEADER_LEN, left: self.count, done: false };
        // A batch built by the calls above is well formed: every op decodes.
        ops.map_while(|op| op).map(|op| (op.key, (op.kind == Kind::Put).then_some(op.value)))
    }

    /// Lets `f` rewrite the value of each put in place, given its key; values keep their
    /// lengths, so the batch stays as valid as it was. For stamps decided only when a batch is
    /// committed (a revision drawn in commit order).
    pub fn rewrite_values(&mut self, mut f: impl FnMut(&[u8], &mut [u8])) {
        let mut pos = HEADER_LEN;
        for _ in 0..self.count {
            let Some((kind, key, value)) = op_at(&self.rep, &mut pos) else { return };
            if kind != Kind::Put {
                continue;
            }
            let (head, tail) = self.rep.split_at_mut(value.start);
            if let (Some(k), Some(v)) = (head.get(key), tail.get_mut(..value.len())) {
                f(k, v);
            }
        }
    }

    /// Empties the batch for reuse.
    pub fn clear(&mut self) {
        self.rep.truncate(HEADER_LEN);
        self.count = 0;
        self.invalid = None;
    }

    fn check(&mut self, key: &[u8], value: Option<&[u8]>) {
        if self.invalid.is_some() {
            return;
        }
        self.invalid = validate(key, value).err();
    }

    /// The encoding with `seq` stamped in, ready for the WAL.
    #[expect(
        clippy::indexing_slicing,
        reason = "`rep` always starts with its HEADER_LEN-byte header (`clear` keeps it)"
    )]
    pub(crate) fn encode(&mut self, seq: u64) -> Result<&[u8]> {
        if let Some(m) = &self.invalid {
            return Err(Error::InvalidParam(m.clone()));
        }
        self.rep[..8].copy_from_slice(&seq.to_le_bytes());
        self.rep[8..12].copy_from_slice(&self.count.to_le_bytes());
        Ok(&self.rep)
    }

    pub(crate) fn invalid(&self) -> Option<&str> {
        self.invalid.as_deref()
    }
}

/// Checks the limits on keys and values.
pub(crate) fn validate(key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
    validate_lens(key.len(), value.map(<[u8]>::len))
}

/// [`validate`] of a key and value of these lengths.
fn validate_lens(key: usize, value: Option<usize>) -> Result<(), String> {
    if key == 0 {
        return Err("empty keys are not allowed".into());
    }
    if key > MAX_KEY_LEN {
        return Err(format!("key of {key} bytes exceeds the limit of {MAX_KEY_LEN}"));
    }
    if let Some(v) = value {
        if v > MAX_VALUE_LEN {
            return Err(format!("value of {v} bytes exceeds the limit of {MAX_VALUE_LEN}"));
        }
    }
    Ok(())
}

/// Decodes an encoded batch: its first sequence number and its writes. `None` if malformed,
/// which includes a batch of no writes (never logged) and one whose sequence numbers do not all
/// lie in `1..=MAX_SEQ`.
pub(crate) fn decode(rep: &[u8]) -> Option<(u64, Vec<Op<'_>>)> {
    let (seq, ops) = ops(rep)?;
    let v: Option<Vec<Op<'_>>> = ops.collect();
    let v = v?;
    let last = seq.checked_add(v.len() as u64)?.checked_sub(1)?;
    let numbered = seq > 0 && last >= seq && last <= MAX_SEQ;
    (numbered && v.len() == count(rep)? as usize).then_some((seq, v))
}

fn count(rep: &[u8]) -> Option<u32> {
    get_u32(rep, &mut 8)
}

/// The writes of a batch as an iterator (`None` items where it is malformed); for batches this
/// process encoded, which are well formed.
pub(crate) fn ops(rep: &[u8]) -> Option<(u64, Ops<'_>)> {
    let seq = get_u64(rep, &mut 0)?;
    let left = count(rep)?;
    Some((seq, Ops { rep, pos: HEADER_LEN, left, done: false }))
}

pub(crate) struct Ops<'a> {
    rep: &'a [u8],
    pos: usize,
    left: u32,
    done: bool,
}

impl<'a> Iterator for Ops<'a> {
    type Item = Option<Op<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.left == 0 {
            self.done = true;
            return (self.pos != self.rep.len()).then_some(None);
        }
        self.left -= 1;
        let op = self.decode_one();
        if op.is_none() {
            self.done = true;
        }
        Some(op)
    }
}

impl<'a> Ops<'a> {
    fn decode_one(&mut self) -> Option<Op<'a>> {
        let (kind, key, value) = op_at(self.rep, &mut self.pos)?;
        Some(Op { kind, key: self.rep.get(key)?, value: self.rep.get(value)? })
    }
}

/// The op at `pos` of an encoded batch: its kind and where its key and value lie (a delete's
/// value is empty); moves `pos` past it. `None` if it does not decode within `rep`.
fn op_at(rep: &[u8], pos: &mut usize) -> Option<(Kind, Range<usize>, Range<usize>)> {
    let kind = Kind::from_u8(*rep.get(*pos)?)?;
    *pos += 1;
    let key = span(rep, pos)?;
    let value = match kind {
        Kind::Put => span(rep, pos)?,
        Kind::Delete => *pos..*pos,
    };
    Some((kind, key, value))
}

/// A varint length at `pos` and the bytes after it, as a span within `rep`; moves `pos` past.
fn span(rep: &[u8], pos: &mut usize) -> Option<Range<usize>> {
    let len = usize::try_from(get_varint(rep, pos)?).ok()?;
    let s = *pos..pos.checked_add(len).filter(|&end| end <= rep.len())?;
    *pos = s.end;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iter_yields_the_writes_in_order() {
        let mut b = WriteBatch::new();
        assert_eq!(b.iter().count(), 0);
        b.put(b"a", b"1").delete(b"b").put_parts(&[b"c", b"d"], &[b"", b"2"]);
        let got: Vec<_> = b.iter().collect();
        let want: Vec<(&[u8], Option<&[u8]>)> =
            vec![(b"a", Some(b"1")), (b"b", None), (b"cd", Some(b"2"))];
        assert_eq!(got, want);
    }

    #[test]
    fn values_are_rewritten_in_place_past_deletes() {
        let mut b = WriteBatch::new();
        b.put(b"a", b"11").delete(b"b").put(b"cc", b"222").put(b"d", b"");
        b.rewrite_values(|k, v| v.fill(k[0]));
        let got: Vec<_> = b.iter().collect();
        let want: Vec<(&[u8], Option<&[u8]>)> =
            vec![(b"a", Some(b"aa")), (b"b", None), (b"cc", Some(b"ccc")), (b"d", Some(b""))];
        assert_eq!(got, want);
    }

    #[test]
    fn roundtrip_and_limits() {
        let mut b = WriteBatch::new();
        b.put(b"k1", b"v1").delete(b"k2");
        let rep = b.encode(7).unwrap().to_vec();
        let (seq, ops) = decode(&rep).unwrap();
        assert_eq!(seq, 7);
        assert_eq!(ops.len(), 2);
        assert_eq!((ops[0].kind, ops[0].key, ops[0].value), (Kind::Put, &b"k1"[..], &b"v1"[..]));
        assert_eq!((ops[1].kind, ops[1].key), (Kind::Delete, &b"k2"[..]));
        assert!(decode(&rep[..rep.len() - 1]).is_none());
        // Sequence numbers outside 1..=MAX_SEQ, and an empty batch, are malformed (replay
        // computes the batch's last sequence number from them).
        for seq in [0, MAX_SEQ, u64::MAX] {
            assert!(decode(b.encode(seq).unwrap()).is_none(), "seq {seq}");
        }
        assert!(decode(b.encode(MAX_SEQ - 1).unwrap()).is_some());
        assert!(decode(WriteBatch::new().encode(1).unwrap()).is_none());

        let mut parts = WriteBatch::new();
        parts.put_parts(&[b"k", b"1"], &[b"v", b"", b"1"]).put_parts(&[b"k2"], &[]);
        let rep = parts.encode(7).unwrap().to_vec();
        let (_, ops) = decode(&rep).unwrap();
        assert_eq!((ops[0].kind, ops[0].key, ops[0].value), (Kind::Put, &b"k1"[..], &b"v1"[..]));
        assert_eq!((ops[1].key, ops[1].value), (&b"k2"[..], &b""[..]));
        parts.clear();
        parts.put_parts(&[b"", b""], &[b"v"]);
        assert!(matches!(parts.encode(1), Err(Error::InvalidParam(m)) if m.contains("empty")));
        parts.clear();
        parts.put_parts(&[b"k", &vec![0u8; MAX_KEY_LEN]], &[b"v"]);
        assert!(matches!(parts.encode(1), Err(Error::InvalidParam(m)) if m.contains("key of")));

        let mut bad = WriteBatch::new();
        bad.put(b"", b"v");
        assert!(matches!(bad.encode(1), Err(Error::InvalidParam(m)) if m.contains("empty")));
        bad.clear();
        bad.put(vec![0u8; MAX_KEY_LEN + 1], b"");
        assert!(matches!(bad.encode(1), Err(Error::InvalidParam(m)) if m.contains("key of")));
    }
}
