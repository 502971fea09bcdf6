//! Internal keys: a user key followed by an 8-byte big-endian tag `seq << 8 | kind`. They order by
//! user key ascending, then tag descending, so the newest version of a key comes first and a seek
//! to `(key, snapshot)` lands on the newest version a snapshot may see. Also the varint helpers of
//! the on-disk formats.

use std::cmp::Ordering;

use bytes::BufMut;

/// Largest sequence number (56 bits; the low byte of a tag is the kind).
pub(crate) const MAX_SEQ: u64 = (1 << 56) - 1;
pub(crate) const TAG_LEN: usize = 8;

/// What an internal entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Delete = 0,
    Put = 1,
}

impl Kind {
    pub(crate) fn from_u8(b: u8) -> Option<Kind> {
        match b {
            0 => Some(Kind::Delete),
            1 => Some(Kind::Put),
            _ => None,
        }
    }
}

pub(crate) fn tag(seq: u64, kind: Kind) -> u64 {
    seq << 8 | kind as u64
}

/// Builds the internal key `user ++ tag(seq, kind)`.
pub(crate) fn make(user: &[u8], seq: u64, kind: Kind) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + TAG_LEN);
    k.extend_from_slice(user);
    k.put_u64(tag(seq, kind));
    k
}

/// The key a seek uses to find the newest version of `user` visible at `seq`.
pub(crate) fn lookup(user: &[u8], seq: u64) -> Vec<u8> {
    make(user, seq, Kind::Put)
}

/// Splits an internal key. Callers only pass keys they built or validated (`valid`); a key
/// shorter than a tag has an empty user key and tag 0.
pub(crate) fn user(ikey: &[u8]) -> &[u8] {
    ikey.split_last_chunk::<TAG_LEN>().map_or(&[], |(user, _)| user)
}

pub(crate) fn tag_of(ikey: &[u8]) -> u64 {
    ikey.last_chunk::<TAG_LEN>().map_or(0, |&t| u64::from_be_bytes(t))
}

pub(crate) fn seq(ikey: &[u8]) -> u64 {
    tag_of(ikey) >> 8
}

/// The kind of a validated internal key.
pub(crate) fn kind(ikey: &[u8]) -> Kind {
    if tag_of(ikey) & 0xff == 0 {
        Kind::Delete
    } else {
        Kind::Put
    }
}

/// Whether `ikey` is long enough and carries a known kind (checked when decoding files).
pub(crate) fn valid(ikey: &[u8]) -> bool {
    ikey.len() >= TAG_LEN && Kind::from_u8((tag_of(ikey) & 0xff) as u8).is_some()
}

/// The order of internal keys.
#[inline]
pub(crate) fn compare(a: &[u8], b: &[u8]) -> Ordering {
    bytes_cmp(user(a), user(b)).then_with(|| tag_of(b).cmp(&tag_of(a)))
}

/// Lexicographic order of byte strings, eight bytes at a time: short keys are the common case and
/// a call into `memcmp` costs more than the comparison itself.
#[inline]
#[expect(
    clippy::indexing_slicing,
    reason = "i <= n and i + 8 <= n in the loop, n the shorter length"
)]
pub(crate) fn bytes_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_be_bytes(a[i..i + 8].try_into().expect("8 bytes"));
        let y = u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != y {
            return x.cmp(&y);
        }
        i += 8;
    }
    a[i..].cmp(&b[i..])
}

/// The first 8 bytes of `user`, zero-padded, as a big-endian integer. Keys with different
/// prefixes order as their prefixes do; keys with equal prefixes need a full comparison.
#[inline]
#[expect(clippy::indexing_slicing, reason = "n is at most the length of both")]
pub(crate) fn prefix8(user: &[u8]) -> u64 {
    let mut p = [0u8; 8];
    let n = user.len().min(8);
    p[..n].copy_from_slice(&user[..n]);
    u64::from_be_bytes(p)
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Decodes a varint at `*pos`, advancing it; `None` if truncated or longer than 10 bytes.
pub(crate) fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Reads `len` bytes at `*pos`, advancing it; `None` if they run past the end.
pub(crate) fn get_slice<'a>(buf: &'a [u8], pos: &mut usize, len: usize) -> Option<&'a [u8]> {
    let end = pos.checked_add(len)?;
    let s = buf.get(*pos..end)?;
    *pos = end;
    Some(s)
}

pub(crate) fn get_u64(buf: &[u8], pos: &mut usize) -> Option<u64> {
    get_slice(buf, pos, 8).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

pub(crate) fn get_u32(buf: &[u8], pos: &mut usize) -> Option<u32> {
    get_slice(buf, pos, 4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

/// One write of a batch: a put of `value` or a delete (whose `value` is empty) of a user key.
pub(crate) struct Op<'a> {
    pub(crate) kind: Kind,
    pub(crate) key: &'a [u8],
    pub(crate) value: &'a [u8],
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newest_version_first_and_prefixes_order_by_user_key() {
        let a1 = make(b"a", 1, Kind::Put);
        let a2 = make(b"a", 2, Kind::Delete);
        let ab = make(b"ab", 9, Kind::Put);
        assert_eq!(compare(&a2, &a1), Ordering::Less);
        assert_eq!(compare(&a1, &ab), Ordering::Less);
        assert_eq!(compare(&lookup(b"a", 1), &a1), Ordering::Equal);
        assert_eq!(compare(&lookup(b"a", 5), &a2), Ordering::Less);
        assert_eq!(seq(&a2), 2);
        assert_eq!(kind(&a2), Kind::Delete);
        assert_eq!(user(&ab), b"ab");
    }

    /// A key shorter than a tag splits into nothing instead of panicking; `valid` rejects it.
    #[test]
    fn keys_shorter_than_a_tag_split_without_panicking() {
        for k in [&b""[..], b"abc", b"1234567"] {
            assert_eq!((user(k), tag_of(k), valid(k)), (&b""[..], 0, false));
        }
    }

    proptest! {
        #[test]
        fn bytes_cmp_is_lexicographic(a in proptest::collection::vec(0u8..3, 0..20), b in proptest::collection::vec(0u8..3, 0..20)) {
            prop_assert_eq!(bytes_cmp(&a, &b), a.cmp(&b));
        }

        #[test]
        fn varints_roundtrip(v: u64) {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            prop_assert_eq!(get_varint(&b, &mut pos), Some(v));
            prop_assert_eq!(pos, b.len());
            let mut pos = 0;
            prop_assert_eq!(get_varint(&b[..b.len() - 1], &mut pos), None);
        }
    }
}
