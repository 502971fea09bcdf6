//! User-key bounds of reads in key order: [`Bounds`] of a scan, as the public range and prefix
//! calls give them (`user_bounds`, `prefix_bounds`).

use std::ops::{Bound, RangeBounds};

/// User-key bounds of a scan.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    pub(crate) lo: Bound<Vec<u8>>,
    pub(crate) hi: Bound<Vec<u8>>,
}

impl Bounds {
    /// No bounds: every key.
    pub(crate) const ALL: Bounds = Bounds { lo: Bound::Unbounded, hi: Bound::Unbounded };

    pub(crate) fn contains(&self, user: &[u8]) -> bool {
        self.above_lo(user) && self.below_hi(user)
    }

    pub(crate) fn above_lo(&self, user: &[u8]) -> bool {
        match &self.lo {
            Bound::Included(l) => user >= l.as_slice(),
            Bound::Excluded(l) => user > l.as_slice(),
            Bound::Unbounded => true,
        }
    }

    pub(crate) fn below_hi(&self, user: &[u8]) -> bool {
        match &self.hi {
            Bound::Included(h) => user <= h.as_slice(),
            Bound::Excluded(h) => user < h.as_slice(),
            Bound::Unbounded => true,
        }
    }

    /// Whether a key of `[start, end)` may lie within the bounds (never false when one does).
    pub(crate) fn may_overlap(&self, start: &[u8], end: &[u8]) -> bool {
        let lo_below_end = match &self.lo {
            Bound::Included(l) | Bound::Excluded(l) => l.as_slice() < end,
            Bound::Unbounded => true,
        };
        lo_below_end && self.below_hi(start)
    }

    /// The bounds as a range of borrowed keys (what `BTreeMap::range` takes).
    pub(crate) fn as_range(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        (self.lo.as_ref().map(Vec::as_slice), self.hi.as_ref().map(Vec::as_slice))
    }
}

/// Whether no key lies in `(lo, hi)` (an inverted range, which a `BTreeMap` range would
/// refuse with a panic).
pub(crate) fn is_empty_range((lo, hi): (Bound<&[u8]>, Bound<&[u8]>)) -> bool {
    match (lo, hi) {
        (Bound::Included(l), Bound::Included(h)) => l > h,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(h))
        | (Bound::Excluded(l), Bound::Included(h)) => l >= h,
        _ => false,
    }
}

/// The bounds of a scan over `range`.
pub(crate) fn user_bounds<K: AsRef<[u8]>>(range: &impl RangeBounds<K>) -> Bounds {
    let own = |b: Bound<&K>| match b {
        Bound::Included(k) => Bound::Included(k.as_ref().to_vec()),
        Bound::Excluded(k) => Bound::Excluded(k.as_ref().to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    };
    Bounds { lo: own(range.start_bound()), hi: own(range.end_bound()) }
}

/// The bounds of a scan over the keys starting with `prefix`.
pub(crate) fn prefix_bounds(prefix: &[u8]) -> Bounds {
    Bounds {
        lo: Bound::Included(prefix.to_vec()),
        hi: prefix_successor(prefix).map_or(Bound::Unbounded, Bound::Excluded),
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` if there is none
/// (the prefix is empty or all `0xff`).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_of_prefixes() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"\xff\xff"), None);
        assert_eq!(prefix_successor(b""), None);
    }
}
