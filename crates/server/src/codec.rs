//! Fixed-width integers in stored values, read without indexing: a value too short to hold one
//! reads as `None`, which callers report as corruption.

/// The little-endian `u64` at `at` in `b`.
pub(crate) fn u64_le(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// The big-endian `u64` at `at` in `b`.
pub(crate) fn u64_be(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_read_as_none() {
        let b = [1, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(u64_le(&b, 0), Some(1));
        assert_eq!(u64_be(&b, 1), Some(2));
        assert_eq!(u64_le(&b, 2), None);
        assert_eq!(u64_le(&b, usize::MAX), None);
    }
}
