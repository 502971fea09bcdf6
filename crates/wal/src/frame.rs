//! Record framing: how one record is laid out inside a segment, and the checks that decide
//! whether bytes on disk are a whole, untouched record.
//!
//! Format (little-endian): `{ crc32c: u32 | len: u32 | seq: u64 | flags: u32 | payload: [u8; len] }`.
//! The CRC32C covers everything after itself: bytes 4..20 of the header, then the payload.
//! The low 8 bits of `flags` are flags: `FLAG_LAST` marks the last record of a batch (every
//! single append is a batch of one): on recovery, records after the last `FLAG_LAST` of the tail
//! belong to a batch that was never completed and are cut, which makes batches atomic.
//!
//! The high 24 bits (format version 2) are the frame's *synced claim* `v`: when the frame was
//! encoded, every record numbered below `seq + 1 - v` was durable (`v = 0`: no claim, as in
//! version 1). Recovery uses claims to tell damage inside data that was synced (corruption) from
//! a write that never completed (a torn tail), wherever the write's pages landed.

/// Bytes of a frame header.
pub(crate) const HEADER_LEN: usize = 20;
/// Set on the last record of each batch.
pub(crate) const FLAG_LAST: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_LAST;
/// Bits of the flags word that hold flags; the rest hold the synced claim.
const FLAG_BITS: u32 = 0xFF;
const CLAIM_SHIFT: u32 = 8;
const CLAIM_MAX: u64 = (1 << 24) - 1;

/// The claim word of a frame numbered `seq` encoded when every record below `synced_below` was
/// durable: 0 (no claim) when the distance does not fit in 24 bits.
fn claim_bits(seq: u64, synced_below: u64) -> u32 {
    match (seq + 1).checked_sub(synced_below) {
        Some(v @ 1..=CLAIM_MAX) => (v as u32) << CLAIM_SHIFT,
        _ => 0,
    }
}

/// Appends one encoded frame to `buf`. `synced_below` is the log's durable point when it is
/// encoded: every record below it is on stable storage (it is at most `seq`).
#[expect(
    clippy::indexing_slicing,
    reason = "`buf` grew by HEADER_LEN + payload bytes from `start`"
)]
pub(crate) fn encode(buf: &mut Vec<u8>, seq: u64, last: bool, synced_below: u64, payload: &[u8]) {
    let start = buf.len();
    let len = u32::try_from(payload.len()).expect("record length checked against capacity");
    let flags = if last { FLAG_LAST } else { 0 } | claim_bits(seq, synced_below);
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Size of the frame of a payload of `len` bytes.
pub(crate) fn frame_len(len: usize) -> u64 {
    (HEADER_LEN + len) as u64
}

/// The fixed fields of a frame header, not yet verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub crc: u32,
    pub len: u32,
    pub seq: u64,
    pub flags: u32,
}

impl Header {
    pub(crate) fn parse(b: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Header {
            crc: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            seq: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            flags: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        })
    }

    pub(crate) fn frame_len(&self) -> u64 {
        frame_len(self.len as usize)
    }
}

/// A verified frame borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub seq: u64,
    pub last: bool,
    /// Every record below this was durable when the frame was written (0: no claim).
    pub synced_below: u64,
    pub payload: &'a [u8],
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// Fewer bytes than the header, or than the length the header claims.
    Truncated {
        have: usize,
        need: u64,
    },
    Checksum {
        stored: u32,
        computed: u32,
    },
    UnknownFlags(u32),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Truncated { have, need } => {
                write!(f, "record needs {need} bytes but only {have} remain")
            }
            Invalid::Checksum { stored, computed } => {
                write!(f, "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")
            }
            Invalid::UnknownFlags(x) => write!(f, "unknown record flags {x:#x}"),
        }
    }
}

/// Decodes and verifies the frame at the start of `bytes`.
pub(crate) fn decode(bytes: &[u8]) -> Result<Frame<'_>, Invalid> {
    let header = Header::parse(bytes)
        .ok_or(Invalid::Truncated { have: bytes.len(), need: HEADER_LEN as u64 })?;
    let need = header.frame_len();
    let truncated = || Invalid::Truncated { have: bytes.len(), need };
    let frame =
        usize::try_from(need).ok().and_then(|end| bytes.get(..end)).ok_or_else(truncated)?;
    // `need` counts the header, so the frame holds at least HEADER_LEN bytes.
    let (Some(covered), Some(payload)) = (frame.get(4..), frame.get(HEADER_LEN..)) else {
        return Err(truncated());
    };
    let computed = crc32c::crc32c(covered);
    if computed != header.crc {
        return Err(Invalid::Checksum { stored: header.crc, computed });
    }
    if header.flags & FLAG_BITS & !KNOWN_FLAGS != 0 {
        return Err(Invalid::UnknownFlags(header.flags & FLAG_BITS));
    }
    let v = u64::from(header.flags >> CLAIM_SHIFT);
    Ok(Frame {
        seq: header.seq,
        last: header.flags & FLAG_LAST != 0,
        // `seq + 1 - v`, saturating at 0, without overflowing at `seq == u64::MAX`.
        synced_below: if v == 0 { 0 } else { header.seq.saturating_sub(v - 1) },
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, true, 5, b"hello");
        encode(&mut buf, 8, false, 0, b"");
        let a = decode(&buf).unwrap();
        assert_eq!(a, Frame { seq: 7, last: true, synced_below: 5, payload: b"hello" });
        let b = decode(&buf[frame_len(5) as usize..]).unwrap();
        assert_eq!(b, Frame { seq: 8, last: false, synced_below: 0, payload: b"" });
    }

    /// A claim is exact when it fits in 24 bits, and absent (never larger) when it does not.
    #[test]
    fn synced_claims_roundtrip_or_are_dropped() {
        let cases = [
            (0, 0, 0),
            (9, 9, 9),
            (9, 3, 3),
            (1 << 40, (1 << 40) - CLAIM_MAX + 1, (1 << 40) - CLAIM_MAX + 1),
            (1 << 40, (1 << 40) - CLAIM_MAX, 0),
            (5, 6, 0),
        ];
        for (seq, synced, want) in cases {
            let mut buf = Vec::new();
            encode(&mut buf, seq, true, synced, b"x");
            assert_eq!(decode(&buf).unwrap().synced_below, want, "seq {seq} synced {synced}");
        }
    }

    /// Frames of format version 1 (high flag bits zero) decode with no claim.
    #[test]
    fn version_1_frames_carry_no_claim() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, true, 6, b"old");
        assert_ne!(&buf[16..20], &FLAG_LAST.to_le_bytes());
        buf[16..20].copy_from_slice(&FLAG_LAST.to_le_bytes());
        let crc = crc32c::crc32c(&buf[4..]);
        buf[..4].copy_from_slice(&crc.to_le_bytes());
        let f = decode(&buf).unwrap();
        assert_eq!((f.seq, f.last, f.synced_below, f.payload), (7, true, 0, &b"old"[..]));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 42, true, 40, b"some payload bytes");
        for bit in 0..buf.len() * 8 {
            let mut copy = buf.clone();
            copy[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&copy).is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    /// Found by the fuzzer: a frame numbered `u64::MAX` with a claim overflowed `seq + 1`.
    #[test]
    fn a_claim_on_the_last_sequence_number_does_not_overflow() {
        let mut buf = b",\xa2t:\0\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff\0\0\0,".to_vec();
        let crc = crc32c::crc32c(&buf[4..]);
        buf[..4].copy_from_slice(&crc.to_le_bytes());
        let f = decode(&buf).unwrap();
        assert_eq!((f.seq, f.last, f.payload), (u64::MAX, false, &b""[..]));
        assert_eq!(f.synced_below, u64::MAX - (0x2c_0000 - 1));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_of_mutated_frame_never_panics(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            pos in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut buf = Vec::new();
            encode(&mut buf, 1, true, 1, &payload);
            let i = pos.index(buf.len());
            let changed = buf[i] != byte;
            buf[i] = byte;
            let r = decode(&buf);
            if changed { prop_assert!(r.is_err()); }
        }
    }
}
