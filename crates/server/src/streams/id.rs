//! Redis stream entry ids, `<ms>-<seq>`, and the forms clients send for them.
//!
//! Ids are ordered by `(ms, seq)`; `0-0` is never a valid entry id. A bound without a sequence
//! (`<ms>`) means `<ms>-0` as a start and `<ms>-<max>` as an end, as in Redis.

use std::fmt;

/// An entry id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct StreamId {
    /// Milliseconds part.
    pub(crate) ms: u64,
    /// Sequence within the millisecond.
    pub(crate) seq: u64,
}

impl StreamId {
    /// The id as the bulk string a reply carries, `<ms>-<seq>`, without going through `fmt`.
    pub(crate) fn to_bytes(self) -> bytes::Bytes {
        let mut a = itoa::Buffer::new();
        let mut b = itoa::Buffer::new();
        let (ms, seq) = (a.format(self.ms).as_bytes(), b.format(self.seq).as_bytes());
        let mut out = bytes::BytesMut::with_capacity(ms.len() + 1 + seq.len());
        out.extend_from_slice(ms);
        out.extend_from_slice(b"-");
        out.extend_from_slice(seq);
        out.freeze()
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The error text Redis sends for an id it cannot parse.
pub(crate) const INVALID: &str = "Invalid stream ID specified as stream command argument";

impl StreamId {
    /// The smallest id.
    pub(crate) const MIN: StreamId = StreamId { ms: 0, seq: 0 };
    /// The largest id.
    pub(crate) const MAX: StreamId = StreamId { ms: u64::MAX, seq: u64::MAX };

    /// The id right after this one, `None` for [`StreamId::MAX`].
    pub(crate) fn next(self) -> Option<StreamId> {
        match self.seq.checked_add(1) {
            Some(seq) => Some(StreamId { ms: self.ms, seq }),
            None => self.ms.checked_add(1).map(|ms| StreamId { ms, seq: 0 }),
        }
    }

    /// The id right before this one, `None` for [`StreamId::MIN`].
    pub(crate) fn prev(self) -> Option<StreamId> {
        match self.seq.checked_sub(1) {
            Some(seq) => Some(StreamId { ms: self.ms, seq }),
            None => self.ms.checked_sub(1).map(|ms| StreamId { ms, seq: u64::MAX }),
        }
    }

    /// Parses `<ms>-<seq>`, or `<ms>` with `missing_seq` as the sequence.
    pub(crate) fn parse(b: &[u8], missing_seq: u64) -> Option<StreamId> {
        let s = std::str::from_utf8(b).ok()?;
        let num = |t: &str| -> Option<u64> {
            if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            t.parse().ok()
        };
        match s.split_once('-') {
            None => Some(StreamId { ms: num(s)?, seq: missing_seq }),
            Some((ms, seq)) => Some(StreamId { ms: num(ms)?, seq: num(seq)? }),
        }
    }

    /// A range start as XRANGE takes it: `-`, `<id>`, `(<id>` (exclusive). `None`: invalid, or
    /// an exclusive start past the largest id (an empty range).
    pub(crate) fn parse_start(b: &[u8]) -> Result<Option<StreamId>, &'static str> {
        match b {
            b"-" => Ok(Some(StreamId::MIN)),
            b"+" => Ok(Some(StreamId::MAX)),
            [b'(', rest @ ..] => {
                let id = StreamId::parse(rest, 0).ok_or(INVALID)?;
                Ok(id.next())
            }
            _ => StreamId::parse(b, 0).map(Some).ok_or(INVALID),
        }
    }

    /// A range end as XRANGE takes it: `+`, `<id>`, `(<id>` (exclusive). `None`: an exclusive
    /// end at the smallest id (an empty range).
    pub(crate) fn parse_end(b: &[u8]) -> Result<Option<StreamId>, &'static str> {
        match b {
            b"+" => Ok(Some(StreamId::MAX)),
            b"-" => Ok(Some(StreamId::MIN)),
            [b'(', rest @ ..] => {
                let id = StreamId::parse(rest, u64::MAX).ok_or(INVALID)?;
                Ok(id.prev())
            }
            _ => StreamId::parse(b, u64::MAX).map(Some).ok_or(INVALID),
        }
    }

    /// Big-endian bytes: their order is the ids' order (for keys).
    pub(crate) fn to_be(self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.ms.to_be_bytes());
        b[8..].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    /// Inverse of [`StreamId::to_be`].
    pub(crate) fn from_be(b: &[u8]) -> Option<StreamId> {
        let b: &[u8; 16] = b.try_into().ok()?;
        Some(StreamId {
            ms: u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            seq: u64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> StreamId {
        StreamId { ms, seq }
    }

    #[test]
    fn parses_what_clients_send() {
        assert_eq!(StreamId::parse(b"5-3", 0), Some(id(5, 3)));
        assert_eq!(StreamId::parse(b"5", 7), Some(id(5, 7)));
        for bad in [&b""[..], b"-", b"5-", b"-3", b"a-1", b"1-2-3", b"+5", b"18446744073709551616"]
        {
            assert_eq!(StreamId::parse(bad, 0), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(StreamId::parse_start(b"-"), Ok(Some(StreamId::MIN)));
        assert_eq!(StreamId::parse_start(b"(5-3"), Ok(Some(id(5, 4))));
        assert_eq!(StreamId::parse_start(b"5"), Ok(Some(id(5, 0))));
        assert_eq!(StreamId::parse_end(b"5"), Ok(Some(id(5, u64::MAX))));
        assert_eq!(StreamId::parse_end(b"(5-0"), Ok(Some(id(4, u64::MAX))));
        assert_eq!(StreamId::parse_end(b"(0-0"), Ok(None));
        assert_eq!(StreamId::parse_start(b"x"), Err(INVALID));
    }

    #[test]
    fn order_and_neighbours() {
        assert!(id(1, 9) < id(2, 0));
        assert_eq!(id(1, u64::MAX).next(), Some(id(2, 0)));
        assert_eq!(StreamId::MAX.next(), None);
        assert_eq!(id(2, 0).prev(), Some(id(1, u64::MAX)));
        assert_eq!(StreamId::from_be(&id(3, 4).to_be()), Some(id(3, 4)));
        assert!(id(1, 2).to_be() < id(1, 3).to_be());
        assert_eq!(id(12, 3).to_string(), "12-3");
    }
}
