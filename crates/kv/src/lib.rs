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
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

mod arena;
mod batch;
mod block;
mod bloom;
mod bounds;
mod cache;
mod compaction;
mod db;
mod error;
mod index;
mod iter;
mod key;
mod locks;
mod manifest;
mod memtable;
mod metrics;
mod options;
mod oracle;
mod stats;
mod table;
mod version;
mod view;

pub use batch::WriteBatch;
pub use db::{Db, Isolation, Mode, Snapshot, Transaction, TxnOptions};
pub use error::{Error, Result};
pub use iter::Iter;
pub use options::{Compression, Durability, Options, MAX_KEY_LEN, MAX_VALUE_LEN, NUM_LEVELS};
pub use stats::{LevelStats, StallStats, Stats};

/// Entry points of the fuzz targets in `fuzz/`, behind the `fuzzing` feature: not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz {
    use bytes::Bytes;

    use crate::block::{Block, BlockBuilder, BlockCursor};
    use crate::index::{Form, Index};
    use crate::{key, table};

    /// `data` as a block as stored (bytes, then trailer) verified, decompressed and read every
    /// way tables read blocks; then again with its checksum made right, so that the checks
    /// behind it are reached too; then `data` as an uncompressed block. Never panics.
    #[expect(clippy::indexing_slicing, reason = "n = data.len() - TRAILER_LEN < fixed.len()")]
    pub fn block(data: &[u8]) {
        if let Ok(raw) = table::unpack(data.to_vec()) {
            read(raw);
        }
        if let Some(n) = data.len().checked_sub(table::TRAILER_LEN) {
            let mut fixed = data.to_vec();
            let trailer = table::trailer(&fixed[..n], fixed[n]);
            fixed[n..].copy_from_slice(&trailer);
            if let Ok(raw) = table::unpack(fixed) {
                read(raw);
            }
        }
        read(Bytes::copy_from_slice(data));
    }

    /// Reads a block as a table does: decoded whole (after checking every key), by seeking, and
    /// by walking a cursor.
    fn read(raw: Bytes) {
        let size = raw.len();
        let Ok(b) = Block::new(raw) else { return };
        let target = key::lookup(b"m", key::MAX_SEQ);
        // Decoded as a data block is, and read as a table's index is.
        if let Ok(d) = b.decode() {
            if (0..d.len()).all(|i| key::valid(d.key(i))) {
                let _ = d.upper_bound(&target, key::compare);
                for i in 0..d.len() {
                    let _ = (d.key_bytes(i), d.value(i), d.value_ref(i));
                }
            }
        }
        for form in [Form::LastKeys, Form::Separators] {
            if let Ok(index) = Index::new(b.clone(), form, u64::MAX) {
                let _ = index.lower_bound(&target);
                let _ = index.lower_bound(&key::lookup(b"", key::MAX_SEQ));
                for i in 0..index.len() {
                    let _ = (index.separator(i), index.handle(i));
                }
            }
        }
        let _ = b.clone().seek(&target, key::compare, key::valid);
        let mut c = BlockCursor::new(b, key::valid);
        if c.first().is_ok() {
            let mut steps = 0;
            while c.key().is_some() && c.advance().is_ok() {
                steps += 1;
                assert!(steps <= size, "a cursor walks more entries than the block has bytes");
            }
        }
    }

    /// A data block as a table stores it (for seed inputs): `(user key, value)` pairs in
    /// increasing key order, one version each, restarts every `interval` entries, LZ4 when that
    /// is smaller.
    pub fn encode_block(entries: &[(&[u8], &[u8])], interval: usize, lz4: bool) -> Vec<u8> {
        let mut b = BlockBuilder::new(interval);
        for (seq, (k, v)) in entries.iter().enumerate() {
            b.add(&key::make(k, seq as u64 + 1, key::Kind::Put), v);
        }
        let raw = b.finish();
        let compressed = lz4_flex::block::compress_prepend_size(&raw);
        let (mut out, ty) = if lz4 && compressed.len() < raw.len() - raw.len() / 8 {
            (compressed, 1)
        } else {
            (raw, 0)
        };
        let trailer = table::trailer(&out, ty);
        out.extend_from_slice(&trailer);
        out
    }
}
