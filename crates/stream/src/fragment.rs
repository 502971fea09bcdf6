//! The fragment: a contiguous run of entries of one stream segment, persisted as ONE file or ONE
//! object (see `docs/format/stream.md`).
//!
//! Layout: a 48-byte header (magic, version, flags, stream, segment, first entry id, entry
//! count, header CRC), the body (entries as `len u32 | bytes`, LZ4-compressed as a whole when
//! the flag says so), an index of `count` u32 offsets of the entries in the uncompressed body,
//! and a 32-byte footer (stored and raw body lengths, CRC32C of body and index, footer CRC,
//! end magic).
//!
//! Invariants: an encoded fragment decodes to exactly the entries it was built from, or decoding
//! fails with [`Error::Corrupt`] naming the object and what did not hold; a decoded [`Fragment`]
//! hands out entries as zero-copy slices of one buffer.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};

/// First 8 bytes of every fragment.
pub(crate) const MAGIC: &[u8; 8] = b"TMBRFRAG";
/// Last 4 bytes of every fragment.
pub(crate) const END_MAGIC: &[u8; 4] = b"TFND";
/// Format version written by this code.
pub(crate) const VERSION: u16 = 1;
pub(crate) const HEADER_LEN: usize = 48;
pub(crate) const FOOTER_LEN: usize = 32;
const FLAG_LZ4: u16 = 1;
/// Bytes of body copied between two checksum updates in `encode_into`.
const CRC_CHUNK: usize = 64 << 10;

/// The largest raw body a fragment may hold (offsets are u32).
pub(crate) const MAX_BODY: usize = u32::MAX as usize;

/// A decoded fragment: entries `first_id .. first_id + len()` of one segment.
#[derive(Debug)]
pub(crate) struct Fragment {
    pub(crate) stream: u64,
    pub(crate) segment: u64,
    pub(crate) first_id: u64,
    /// Uncompressed body.
    body: Bytes,
    /// Start offset of each entry's payload (after its length prefix) and its length.
    spans: Vec<(u32, u32)>,
    /// Bytes the fragment takes in memory (body plus index), for cache accounting.
    pub(crate) memory: usize,
}

impl Fragment {
    /// Number of entries.
    pub(crate) fn len(&self) -> u64 {
        self.spans.len() as u64
    }

    /// One past the last entry id.
    pub(crate) fn end_id(&self) -> u64 {
        self.first_id + self.len()
    }

    /// Entries `first_id ..` held in memory (journaled entries no fragment holds yet), as a
    /// fragment of no segment, so that readers treat them alike.
    pub(crate) fn of_entries(stream: u64, first_id: u64, entries: &[Bytes]) -> Fragment {
        let mut body = BytesMut::with_capacity(entries.iter().map(Bytes::len).sum());
        let mut spans = Vec::with_capacity(entries.len());
        for e in entries {
            spans.push((body.len() as u32, e.len() as u32));
            body.extend_from_slice(e);
        }
        let memory = body.len() + spans.len() * 8 + std::mem::size_of::<Fragment>();
        Fragment { stream, segment: u64::MAX, first_id, body: body.freeze(), spans, memory }
    }

    /// The payload of entry `id`, if this fragment holds it.
    pub(crate) fn get(&self, id: u64) -> Option<Bytes> {
        let i = id.checked_sub(self.first_id)?;
        let &(off, len) = self.spans.get(usize::try_from(i).ok()?)?;
        Some(self.body.slice(off as usize..off as usize + len as usize))
    }
}

/// Builds the encoded bytes of a fragment.
pub(crate) fn encode(
    stream: u64,
    segment: u64,
    first_id: u64,
    entries: &[Bytes],
    lz4: bool,
) -> Bytes {
    encode_into(BytesMut::new(), stream, segment, first_id, entries, lz4)
}

/// [`encode`] into `out` (cleared first): a buffer reused from an earlier fragment has its
/// pages mapped already, where a fresh one costs the kernel a page clearing per 4 KiB.
pub(crate) fn encode_into(
    mut out: BytesMut,
    stream: u64,
    segment: u64,
    first_id: u64,
    entries: &[Bytes],
    lz4: bool,
) -> Bytes {
    let raw_len: usize = entries.iter().map(|e| 4 + e.len()).sum();
    let mut index = BytesMut::with_capacity(entries.len() * 4);
    let mut off = 0u32;
    for e in entries {
        index.put_u32_le(off);
        off += 4 + e.len() as u32;
    }
    // Uncompressed, the entries go straight into the output: one copy, one allocation.
    let compressed = lz4.then(|| {
        let mut raw = BytesMut::with_capacity(raw_len);
        put_entries(&mut raw, entries, false);
        lz4_flex::block::compress(&raw)
    });
    let (flags, stored_len) = match &compressed {
        Some(c) if c.len() < raw_len => (FLAG_LZ4, c.len()),
        _ => (0, raw_len),
    };

    out.clear();
    out.reserve(HEADER_LEN + stored_len + index.len() + FOOTER_LEN);
    out.put_slice(MAGIC);
    out.put_u16_le(VERSION);
    out.put_u16_le(flags);
    out.put_u32_le(0);
    out.put_u64_le(stream);
    out.put_u64_le(segment);
    out.put_u64_le(first_id);
    out.put_u32_le(entries.len() as u32);
    #[expect(clippy::indexing_slicing, reason = "`out` holds the header but its CRC")]
    let hcrc = crc32c::crc32c(&out[..HEADER_LEN - 4]);
    out.put_u32_le(hcrc);
    let body_crc = match (flags, &compressed) {
        (FLAG_LZ4, Some(c)) => {
            out.put_slice(c);
            crc32c::crc32c(c)
        }
        _ => put_entries(&mut out, entries, true),
    };
    out.put_slice(&index);
    let foot_start = out.len();
    out.put_u64_le(stored_len as u64);
    out.put_u64_le(raw_len as u64);
    out.put_u32_le(body_crc);
    out.put_u32_le(crc32c::crc32c(&index));
    #[expect(clippy::indexing_slicing, reason = "foot_start was out.len() before the footer")]
    let fcrc = crc32c::crc32c(&out[foot_start..]);
    out.put_u32_le(fcrc);
    out.put_slice(END_MAGIC);
    out.freeze()
}

/// Appends the raw body (`len u32 | bytes` per entry) to `buf`. With `checksum`, returns the
/// CRC32C of what it appended, taken every [`CRC_CHUNK`] bytes while they are still in cache (a
/// second pass over a body of megabytes would read it back from memory); otherwise 0.
#[expect(clippy::indexing_slicing, reason = "`from` is a length `buf` had, and `buf` only grows")]
fn put_entries(buf: &mut BytesMut, entries: &[Bytes], checksum: bool) -> u32 {
    let (mut crc, mut from) = (0, buf.len());
    for e in entries {
        buf.put_u32_le(e.len() as u32);
        buf.put_slice(e);
        if checksum && buf.len() - from >= CRC_CHUNK {
            crc = crc32c::crc32c_append(crc, &buf[from..]);
            from = buf.len();
        }
    }
    if checksum {
        crc = crc32c::crc32c_append(crc, &buf[from..]);
    }
    crc
}

// Fields of the header and footer, passed as constant ranges of those fixed-size arrays.
fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes(b.try_into().expect("a 2-byte field"))
}
fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("a 4-byte field"))
}
fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("an 8-byte field"))
}

/// Decodes and verifies an encoded fragment. `object` names it in errors.
pub(crate) fn decode(object: &str, data: &Bytes) -> Result<Fragment> {
    let corrupt = |reason: String| Error::Corrupt { object: object.to_string(), reason };
    let (Some(h), Some(f), true) = (
        data.first_chunk::<HEADER_LEN>(),
        data.last_chunk::<FOOTER_LEN>(),
        data.len() >= HEADER_LEN + FOOTER_LEN,
    ) else {
        return Err(corrupt(format!("{} bytes is shorter than header and footer", data.len())));
    };
    if &h[..8] != MAGIC {
        return Err(corrupt("bad magic number".into()));
    }
    if crc32c::crc32c(&h[..HEADER_LEN - 4]) != le32(&h[HEADER_LEN - 4..]) {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let version = le16(&h[8..10]);
    if version != VERSION {
        return Err(corrupt(format!("unsupported version {version}")));
    }
    let flags = le16(&h[10..12]);
    if flags & !FLAG_LZ4 != 0 {
        return Err(corrupt(format!("unknown flags {flags:#x}")));
    }
    let stream = le64(&h[16..24]);
    let segment = le64(&h[24..32]);
    let first_id = le64(&h[32..40]);
    let count = le32(&h[40..44]) as usize;
    if first_id.checked_add(count as u64).is_none() {
        return Err(corrupt(format!("{count} entries from id {first_id} run past the last id")));
    }

    if &f[28..32] != END_MAGIC {
        return Err(corrupt("bad end magic (truncated object?)".into()));
    }
    if crc32c::crc32c(&f[..24]) != le32(&f[24..28]) {
        return Err(corrupt("footer checksum mismatch".into()));
    }
    let stored_len = le64(&f[0..8]);
    let raw_len = le64(&f[8..16]);
    let index_len = count as u64 * 4;
    let expect = (HEADER_LEN + FOOTER_LEN) as u64 + index_len;
    if expect.checked_add(stored_len) != Some(data.len() as u64) || raw_len > MAX_BODY as u64 {
        return Err(corrupt(format!(
            "lengths do not add up: {} bytes, body {stored_len}, raw {raw_len}, {count} entries",
            data.len()
        )));
    }
    // The lengths add up to the object's, so body and index lie between header and footer.
    let body_end = HEADER_LEN + stored_len as usize;
    let stored = data.slice(HEADER_LEN..body_end);
    let Some(index) = data.get(body_end..data.len() - FOOTER_LEN) else {
        return Err(corrupt(format!("a body of {stored_len} bytes leaves no room for the index")));
    };
    if crc32c::crc32c(&stored) != le32(&f[16..20]) {
        return Err(corrupt("body checksum mismatch".into()));
    }
    if crc32c::crc32c(index) != le32(&f[20..24]) {
        return Err(corrupt("index checksum mismatch".into()));
    }
    let body = if flags & FLAG_LZ4 != 0 {
        // LZ4 expands a byte into at most 255: a larger raw length is not allocated.
        if raw_len > stored_len.saturating_mul(255) {
            return Err(corrupt(format!("lz4 body of {stored_len} bytes cannot hold {raw_len}")));
        }
        let raw = lz4_flex::block::decompress(&stored, raw_len as usize)
            .map_err(|e| corrupt(format!("lz4 body: {e}")))?;
        if raw.len() as u64 != raw_len {
            return Err(corrupt("lz4 body has the wrong length".into()));
        }
        Bytes::from(raw)
    } else {
        if stored_len != raw_len {
            return Err(corrupt("uncompressed body length mismatch".into()));
        }
        stored
    };

    let mut spans = Vec::with_capacity(count);
    let mut expect_off = 0usize;
    // `count` offsets: the lengths add up, so the index is 4 * count bytes.
    let (offsets, _) = index.as_chunks::<4>();
    for (i, &off) in offsets.iter().enumerate() {
        let off = u32::from_le_bytes(off) as usize;
        let len = body.get(off..).and_then(<[u8]>::first_chunk::<4>);
        let (true, Some(&len)) = (off == expect_off, len) else {
            return Err(corrupt(format!("entry {i}: index offset {off} does not match the body")));
        };
        let len = u32::from_le_bytes(len) as usize;
        if off + 4 + len > body.len() {
            return Err(corrupt(format!("entry {i}: length {len} runs past the body")));
        }
        spans.push(((off + 4) as u32, len as u32));
        expect_off = off + 4 + len;
    }
    if expect_off != body.len() {
        return Err(corrupt("trailing bytes after the last entry".into()));
    }
    let memory = body.len() + spans.len() * 8 + std::mem::size_of::<Fragment>();
    Ok(Fragment { stream, segment, first_id, body, spans, memory })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize) -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from(vec![i as u8; i * 7 % 300])).collect()
    }

    #[test]
    fn round_trip_plain_and_lz4() {
        for lz4 in [false, true] {
            let es = entries(100);
            let enc = encode(3, 4, 1000, &es, lz4);
            let f = decode("x", &enc).unwrap();
            assert_eq!((f.stream, f.segment, f.first_id, f.len()), (3, 4, 1000, 100));
            for (i, e) in es.iter().enumerate() {
                assert_eq!(f.get(1000 + i as u64).unwrap(), e);
            }
            assert!(f.get(999).is_none());
            assert!(f.get(1100).is_none());
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        for lz4 in [false, true] {
            let enc = encode(1, 2, 5, &entries(20), lz4);
            for i in 0..enc.len() {
                let mut bad = enc.to_vec();
                bad[i] ^= 0x40;
                let r = decode("obj", &Bytes::from(bad));
                assert!(matches!(r, Err(Error::Corrupt { .. })), "flip at {i} not detected");
            }
            for cut in 0..enc.len() {
                let r = decode("obj", &enc.slice(..cut));
                assert!(matches!(r, Err(Error::Corrupt { .. })), "cut at {cut}: {r:?}");
            }
        }
    }

    /// `enc` with footer field `at` (0: stored length, 8: raw length) set to `v`, footer
    /// checksum made right.
    fn with_footer_field(enc: &Bytes, at: usize, v: u64) -> Bytes {
        let mut d = enc.to_vec();
        let foot = d.len() - FOOTER_LEN;
        d[foot + at..foot + at + 8].copy_from_slice(&v.to_le_bytes());
        let crc = crc32c::crc32c(&d[foot..foot + 24]);
        d[foot + 24..foot + 28].copy_from_slice(&crc.to_le_bytes());
        Bytes::from(d)
    }

    /// Found by the fuzzer: a stored length near `u64::MAX` overflowed the length check.
    #[test]
    fn a_huge_stored_length_is_corrupt() {
        let enc = encode(u64::MAX - 1, 7, 5, &[Bytes::from_static(b"one entry")], false);
        for stored in [u64::MAX, u64::MAX - 0x40, u64::MAX - (HEADER_LEN + FOOTER_LEN) as u64] {
            let r = decode("obj", &with_footer_field(&enc, 0, stored));
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{stored}: {r:?}");
        }
    }

    /// Found by the fuzzer: a raw length of gigabytes behind an LZ4 body of a few bytes was
    /// allocated before decompressing.
    #[test]
    fn a_raw_length_lz4_cannot_reach_is_corrupt() {
        let enc = encode(1, 2, 5, &entries(20), true);
        let r = decode("obj", &with_footer_field(&enc, 8, MAX_BODY as u64));
        match r {
            Err(Error::Corrupt { reason, .. }) => {
                assert!(reason.contains("cannot hold"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Found by the fuzzer: entry ids running past `u64::MAX` overflowed `end_id`.
    #[test]
    fn ids_past_the_last_id_are_corrupt() {
        let mut d = encode(1, 2, 0, &entries(12), false).to_vec();
        d[32..40].copy_from_slice(&(u64::MAX - 12).to_le_bytes());
        let crc = crc32c::crc32c(&d[..HEADER_LEN - 4]);
        d[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        let f = decode("obj", &Bytes::from(d.clone())).unwrap();
        assert_eq!(f.end_id(), u64::MAX);
        d[32..40].copy_from_slice(&(u64::MAX - 11).to_le_bytes());
        let crc = crc32c::crc32c(&d[..HEADER_LEN - 4]);
        d[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        let r = decode("obj", &Bytes::from(d));
        assert!(
            matches!(&r, Err(Error::Corrupt { reason, .. }) if reason.contains("past the last id")),
            "{r:?}"
        );
    }

    #[test]
    fn empty_entries_and_empty_fragment() {
        let es = vec![Bytes::new(), Bytes::from_static(b"a"), Bytes::new()];
        let f = decode("x", &encode(0, 0, 0, &es, true)).unwrap();
        assert_eq!(f.get(0).unwrap().len(), 0);
        assert_eq!(f.get(1).unwrap(), Bytes::from_static(b"a"));
        assert_eq!(f.end_id(), 3);
        let f = decode("x", &encode(0, 0, 7, &[], false)).unwrap();
        assert_eq!(f.len(), 0);
    }
}
