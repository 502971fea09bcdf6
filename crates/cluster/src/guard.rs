//! What a guarded write expects ([`crate::Op::Guarded`]): keys holding the stored bytes their
//! proposer read ([`Expect`]), and ranges whose live pairs are still the ones it scanned
//! ([`ExpectRange`], by [`range_digest`]).
//!
//! Invariant: the digest of a range depends only on the range's data keys and their stored
//! bytes, in key order: the state machine's own keys and the revision counter, which a batch
//! writes only as it ends, are left out, so the proposer and every member, mid-batch or not,
//! reach the same digest for the same data.

use std::ops::Bound;

use serde::{Deserialize, Serialize};

use crate::machine::{RESERVED_PREFIX, REVISION_KEY};

/// A key's stored bytes as a proposer read them (`None`: the key was absent). Strings carry the
/// revision of their last write, so equal bytes mean no write of the key came in between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expect {
    /// The engine key.
    pub key: Vec<u8>,
    /// Its stored value.
    pub stored: Option<Vec<u8>>,
}

/// The live pairs of an engine key range as a proposer scanned them, as their
/// [`range_digest`]: a write of any key in the range since changes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectRange {
    /// The range's start.
    pub lo: Bound<Vec<u8>>,
    /// The range's end.
    pub hi: Bound<Vec<u8>>,
    /// The digest of its pairs.
    pub digest: u64,
}

impl ExpectRange {
    /// The range as borrowed bounds (what a scan takes).
    pub fn bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        (self.lo.as_ref().map(Vec::as_slice), self.hi.as_ref().map(Vec::as_slice))
    }

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        <(Bound<&[u8]>, Bound<&[u8]>) as std::ops::RangeBounds<[u8]>>::contains(&self.bounds(), key)
    }
}

/// Whether `key` is data a range's digest covers.
pub(crate) fn is_data(key: &[u8]) -> bool {
    !key.starts_with(RESERVED_PREFIX) && key != REVISION_KEY
}

/// The digest of a range's live pairs given in key order (xxh3-64 of each data key and value,
/// each preceded by its length). The first error stops it.
pub fn range_digest<K, V, E>(pairs: impl IntoIterator<Item = Result<(K, V), E>>) -> Result<u64, E>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for pair in pairs {
        let (k, v) = pair?;
        let (k, v) = (k.as_ref(), v.as_ref());
        if !is_data(k) {
            continue;
        }
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(k);
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v);
    }
    Ok(h.digest())
}
