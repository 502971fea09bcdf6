//! timber-kv: the embedded key-value engine of timber, an LSM tree on the timber WAL.
//!
//! Writes go to the write-ahead log and a lock-free memtable; full memtables are flushed to
//! SSTables in L0 by a background thread, and leveled compaction merges them down. Every write
//! gets a sequence number; snapshots and iterators read a consistent point in time.
//!
//! ```no_run
//! use timber_kv::{Db, Options, WriteBatch};
//! # fn main() -> timber_kv::Result<()> {
//! let db = Db::open("/tmp/db", Options::default())?;
//! db.put(b"k", b"v")?;
//! let mut b = WriteBatch::new();
//! b.put(b"a", b"1").delete(b"k");
//! db.write(b)?;
//! for item in db.prefix(b"a") {
//!     let (k, v) = item?;
//!     println!("{k:?} = {v:?}");
//! }
//! # Ok(()) }
//! ```
#![warn(clippy::unwrap_used)]

mod batch;
mod block;
mod bloom;
mod bounds;
mod cache;
mod compaction;
mod db;
mod error;
mod iter;
mod key;
mod manifest;
mod memtable;
mod metrics;
mod options;
mod stats;
mod table;
mod version;
mod view;

pub use batch::WriteBatch;
pub use db::{Db, Snapshot};
pub use error::{Error, Result};
pub use iter::Iter;
pub use options::{Compression, Durability, Options, MAX_KEY_LEN, MAX_VALUE_LEN, NUM_LEVELS};
pub use stats::{LevelStats, Stats};
