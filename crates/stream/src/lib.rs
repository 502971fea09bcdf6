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
pub use streams::{SegmentInfo, StreamInfo, Streams};
pub use writer::{Ack, StreamWriter};
