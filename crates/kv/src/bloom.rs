//! Bloom filters over user keys, one per SSTable: `bits | k u8`. Bit positions come from one
//! 64-bit xxh3 hash by double hashing. With 10 bits per key and k = 7 the false-positive rate is
//! about 0.8%.

use xxhash_rust::xxh3::xxh3_64;

pub(crate) fn hash(user: &[u8]) -> u64 {
    xxh3_64(user)
}

/// Builds a filter from the hashes of the keys.
#[expect(clippy::indexing_slicing, reason = "bit < bits = 8 * bytes, and `out` holds bytes + 1")]
pub(crate) fn build(hashes: &[u64], bits_per_key: u32) -> Vec<u8> {
    let bits = (hashes.len() as u64 * u64::from(bits_per_key)).max(64);
    let bytes = bits.div_ceil(8) as usize;
    let bits = bytes as u64 * 8;
    let k = ((f64::from(bits_per_key) * 0.69).round() as u8).clamp(1, 30);
    let mut out = vec![0u8; bytes + 1];
    for &h in hashes {
        let mut a = h;
        let delta = h.rotate_right(33) | 1;
        for _ in 0..k {
            let bit = a % bits;
            out[(bit / 8) as usize] |= 1 << (bit % 8);
            a = a.wrapping_add(delta);
        }
    }
    out[bytes] = k;
    out
}

/// Whether the key with hash `h` may be in the filter. A malformed filter answers "maybe".
#[expect(clippy::indexing_slicing, reason = "bit < nbits = 8 * bits.len()")]
pub(crate) fn may_contain(filter: &[u8], h: u64) -> bool {
    let Some((&k, bits)) = filter.split_last() else { return true };
    if bits.is_empty() || k == 0 || k > 30 {
        return true;
    }
    let nbits = bits.len() as u64 * 8;
    let mut a = h;
    let delta = h.rotate_right(33) | 1;
    for _ in 0..k {
        let bit = a % nbits;
        if bits[(bit / 8) as usize] & (1 << (bit % 8)) == 0 {
            return false;
        }
        a = a.wrapping_add(delta);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_under_one_percent_false_positives() {
        let keys: Vec<Vec<u8>> =
            (0..100_000u64).map(|i| format!("key{i:012}").into_bytes()).collect();
        let hashes: Vec<u64> = keys.iter().map(|k| hash(k)).collect();
        let f = build(&hashes, 10);
        assert!(keys.iter().all(|k| may_contain(&f, hash(k))));
        let fp = (0..100_000u64)
            .filter(|i| may_contain(&f, hash(format!("other{i:012}").as_bytes())))
            .count();
        assert!(fp < 1000, "{fp} false positives in 100000");
    }
}
