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

#![warn(clippy::unwrap_used)]

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

/// Bytes a record of `len` bytes takes in a segment: frame header, payload and index entry.
/// Useful to size `segment_capacity` and `max_size`.
pub const fn record_overhead() -> u64 {
    frame::HEADER_LEN as u64 + segment::INDEX_ENTRY_LEN
}

/// Fixed bytes of every segment: its header and the trailer written when it is sealed.
pub const fn segment_overhead() -> u64 {
    (segment::SEGMENT_HEADER_LEN + segment::TRAILER_LEN) as u64
}
