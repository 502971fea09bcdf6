//! timber-stream: named, append-only log streams whose fragments live on local disk or in any
//! S3-compatible object store, with a fragment cache shared by all readers.
//!
//! A stream has entries with dense u64 ids from 0. It is made of segments (rolled by size, age or
//! a new writer; sealed segments are immutable), and a segment of fragments: a contiguous range
//! of entries written as one file or one object (`docs/format/stream.md`). Metadata (streams,
//! segments, the fragment index, truncation points, writer epochs) lives in a timber KV engine
//! and is updated, with a synced write batch, only after a fragment is durable.
//!
//! ```no_run
//! # async fn demo() -> timber_stream::Result<()> {
//! use timber_stream::{Options, Start, StreamConfig, Streams};
//! let streams = Streams::open("/tmp/streams", Options::default()).await?;
//! streams.create("events", StreamConfig::default()).await?;
//! let writer = streams.writer("events").await?;
//! let id = writer.append(&b"hello"[..]).await?; // durable once this returns
//! let mut reader = streams.reader("events", Start::Earliest)?;
//! assert_eq!(reader.next().await?.id, id);
//! writer.close().await?;
//! # Ok(()) }
//! ```

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

mod cache;
mod error;
mod fragment;
mod journal;
mod maintenance;
mod meta;
mod options;
mod reader;
mod replay;
mod shared;
mod store;
mod streams;
mod writer;

pub use cache::CacheStats;
pub use error::{Error, Result};
pub use journal::Journal;
pub use options::{
    BlockingSync, Options, S3Options, Storage, StreamConfig, SyncRunner, WriterOptions,
};
pub use reader::{Entry, Start, StreamReader};
pub use streams::{SegmentInfo, StoreStatus, StreamInfo, Streams};
pub use writer::{Ack, StreamWriter};

/// Entry points of the fuzz targets in `fuzz/`, behind the `fuzzing` feature: not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz {
    use bytes::Bytes;

    use crate::fragment::{self, FOOTER_LEN, HEADER_LEN};

    /// Decodes `data` as a fragment and reads its entries; then again with its four checksums
    /// made right, so that the checks behind them are reached too. Never panics.
    #[expect(
        clippy::indexing_slicing,
        reason = "data holds header and footer, and body..index..foot was checked to add up"
    )]
    pub fn fragment(data: &[u8]) {
        read(&Bytes::copy_from_slice(data));
        if data.len() < HEADER_LEN + FOOTER_LEN {
            return;
        }
        let mut d = data.to_vec();
        let crc = crc32c::crc32c(&d[..HEADER_LEN - 4]);
        d[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        let foot = d.len() - FOOTER_LEN;
        let count = u64::from(u32::from_le_bytes(d[40..44].try_into().expect("4 bytes")));
        let stored = u64::from_le_bytes(d[foot..foot + 8].try_into().expect("8 bytes"));
        let (body, index) = (HEADER_LEN as u64, (HEADER_LEN as u64).saturating_add(stored));
        if index.saturating_add(count * 4) == foot as u64 {
            let (body, index) = (body as usize, index as usize);
            let body_crc = crc32c::crc32c(&d[body..index]);
            let index_crc = crc32c::crc32c(&d[index..foot]);
            d[foot + 16..foot + 20].copy_from_slice(&body_crc.to_le_bytes());
            d[foot + 20..foot + 24].copy_from_slice(&index_crc.to_le_bytes());
        }
        let crc = crc32c::crc32c(&d[foot..foot + 24]);
        d[foot + 24..foot + 28].copy_from_slice(&crc.to_le_bytes());
        read(&Bytes::from(d));
    }

    fn read(data: &Bytes) {
        if let Ok(f) = fragment::decode("fuzz", data) {
            assert!(f.len() <= data.len() as u64, "more entries than bytes");
            for id in f.first_id..f.first_id.saturating_add(f.len()) {
                assert!(f.get(id).is_some(), "entry {id} of the fragment is missing");
            }
            let _ = f.end_id();
        }
    }

    /// The bytes of a fragment as the writer builds it (for seed inputs).
    pub fn encode_fragment(
        stream: u64,
        segment: u64,
        first_id: u64,
        entries: &[Bytes],
        lz4: bool,
    ) -> Vec<u8> {
        fragment::encode(stream, segment, first_id, entries, lz4).to_vec()
    }
}
