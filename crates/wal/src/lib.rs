//! timber-wal: a segmented write-ahead log of checksummed records with dense `u64` sequence
//! numbers, group commit, three sync modes and crash-atomic truncation at both ends.
//!
//! ```no_run
//! use timber_wal::{Options, SyncMode, Wal};
//! # fn main() -> timber_wal::Result<()> {
//! let wal = Wal::open("/tmp/my-log", Options::default().sync(SyncMode::Always))?;
//! let seq = wal.append(b"hello")?;
//! assert_eq!(&wal.read(seq)?[..], b"hello");
//! wal.truncate_front(seq + 1)?;
//! # Ok(()) }
//! ```
//!
//! The on-disk format and the recovery policy are specified in `docs/format/wal.md`.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

mod active;
mod error;
mod frame;
mod gate;
mod mapped;
mod meta;
mod metrics;
mod options;
mod recovery;
mod segment;
mod spare;
mod state;
mod wal;
pub mod writeback;

pub use crate::error::{Error, Result};
pub use crate::options::{Options, SyncMode, MAX_SEGMENT_CAPACITY, MIN_SEGMENT_CAPACITY};
pub use crate::wal::{Iter, Wal};

/// Entry points of the fuzz targets in `fuzz/`, behind the `fuzzing` feature: not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz {
    use crate::frame;

    /// Decodes `data` as a frame, then again with its checksum made right, so that the checks
    /// behind the checksum are reached too. Never panics.
    #[expect(clippy::indexing_slicing, reason = "4 <= HEADER_LEN <= need <= data.len()")]
    pub fn frame(data: &[u8]) {
        check(data);
        if let Some(h) = frame::Header::parse(data) {
            let need = h.frame_len();
            if need <= data.len() as u64 {
                let mut fixed = data.to_vec();
                let crc = crc32c::crc32c(&fixed[4..need as usize]);
                fixed[..4].copy_from_slice(&crc.to_le_bytes());
                check(&fixed);
            }
        }
    }

    fn check(data: &[u8]) {
        if let Ok(f) = frame::decode(data) {
            assert_eq!(
                frame::frame_len(f.payload.len()),
                frame::Header::parse(data).map_or(0, |h| h.frame_len())
            );
            assert!(f.synced_below <= f.seq, "a claim covers at most the records below the frame");
        }
    }

    /// The frame the log writes for one record (for seed inputs).
    pub fn encode_frame(seq: u64, last: bool, synced_below: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        frame::encode(&mut buf, seq, last, synced_below, payload);
        buf
    }
}

/// Bytes a record of `len` bytes takes in a segment: frame header, payload and index entry.
/// Useful to size `segment_capacity` and `max_size`.
pub const fn record_overhead() -> u64 {
    frame::HEADER_LEN as u64 + segment::INDEX_ENTRY_LEN
}

/// Fixed bytes of every segment: its header and the trailer written when it is sealed.
pub const fn segment_overhead() -> u64 {
    (segment::SEGMENT_HEADER_LEN + segment::TRAILER_LEN) as u64
}
