//! SSTables: immutable sorted files of internal keys (docs/format/sstable.md).
//!
//! `data block* | filter block | index block | footer (48 bytes)`. Every block is followed by a
//! 5-byte trailer `type u8 | crc32c u32 LE` over the stored bytes and the type; type 0 is raw,
//! 1 is LZ4. The index has one entry per data block: a separator between it and the next (as
//! short a user key as lies between them) and its handle (`index.rs`); tables of version 1,
//! whose index holds each block's last key, are read too. Readers verify every block they read and report a mismatch as
//! `Error::Corrupt` with the file and the block's offset; they never return unverified data.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use timber_wal::writeback;

use crate::block::{Block, BlockBuilder, BlockCursor, Decoded};
use crate::bloom;
use crate::cache::{BlockCache, Cached};
use crate::error::{Error, Result};
use crate::index::{self, Form, Index};
use crate::key::{self, Kind};
use crate::options::{Compression, Options};

pub(crate) const MAGIC: [u8; 8] = *b"TMBRSST\0";
/// The version tables are written in; version 1 tables are read too (`index::Form`).
pub(crate) const VERSION: u32 = 2;
pub(crate) const FOOTER_LEN: usize = 48;
pub(crate) const TRAILER_LEN: usize = 5;
const RAW: u8 = 0;
const LZ4: u8 = 1;
/// Bytes of a table written between two starts of its writeback (`writeback::start`): its pages
/// trickle out as it is written, instead of reaching the disk in one burst at its fsync, which
/// WAL fsyncs would wait behind.
const WRITEBACK_BYTES: u64 = 1 << 20;

pub(crate) fn file_name(id: u64) -> String {
    format!("{id:06}.sst")
}

pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".sst")?;
    (stem.len() >= 6 && stem.bytes().all(|b| b.is_ascii_digit())).then(|| stem.parse().ok())?
}

/// What a finished table holds.
#[derive(Debug, Clone)]
pub(crate) struct Built {
    pub(crate) size: u64,
    pub(crate) entries: u64,
    pub(crate) smallest: Bytes,
    pub(crate) largest: Bytes,
}

pub(crate) struct TableBuilder {
    out: BufWriter<File>,
    path: PathBuf,
    offset: u64,
    /// Bytes of the file whose writeback was started (`writeback::start`).
    written_back: u64,
    data: BlockBuilder,
    index: BlockBuilder,
    /// The last key and handle of the last data block written, whose index entry waits for
    /// the next block's first key (its separator lies between the two).
    pending: Option<(Vec<u8>, u64, u32)>,
    /// Scratch for index entries.
    separator: Vec<u8>,
    handle: Vec<u8>,
    hashes: Vec<u64>,
    last_user: Vec<u8>,
    block_size: usize,
    compression: Compression,
    bloom_bits: u32,
    entries: u64,
    smallest: Option<Bytes>,
    scratch: Vec<u8>,
}

impl TableBuilder {
    pub(crate) fn create(path: &Path, opts: &Options) -> Result<TableBuilder> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create", path, e))?;
        Ok(TableBuilder {
            out: BufWriter::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            written_back: 0,
            offset: 0,
            data: BlockBuilder::new(opts.restart_interval),
            index: BlockBuilder::new(index::RESTART_INTERVAL),
            pending: None,
            separator: Vec::new(),
            handle: Vec::new(),
            hashes: Vec::new(),
            last_user: Vec::new(),
            block_size: opts.block_size,
            compression: opts.compression,
            bloom_bits: opts.bloom_bits_per_key,
            entries: 0,
            smallest: None,
            scratch: Vec::new(),
        })
    }

    /// Adds an entry; internal keys must come in increasing order.
    pub(crate) fn add(&mut self, ikey: &[u8], value: &[u8]) -> Result<()> {
        if self.smallest.is_none() {
            self.smallest = Some(Bytes::copy_from_slice(ikey));
        }
        let user = key::user(ikey);
        if self.entries == 0 || user != self.last_user.as_slice() {
            self.hashes.push(bloom::hash(user));
            self.last_user.clear();
            self.last_user.extend_from_slice(user);
        }
        if let Some((last, off, len)) = self.pending.take() {
            self.add_index_entry(&last, off, len, Some(ikey));
        }
        self.data.add(ikey, value);
        self.entries += 1;
        if self.data.estimated_size() >= self.block_size {
            self.finish_data_block()?;
        }
        Ok(())
    }

    /// Bytes written so far (the file size if finished now, minus the tail blocks).
    pub(crate) fn size(&self) -> u64 {
        self.offset + self.data.estimated_size() as u64
    }

    fn finish_data_block(&mut self) -> Result<()> {
        if self.data.is_empty() {
            return Ok(());
        }
        let last = self.data.last_key().to_vec();
        let raw = self.data.finish();
        let (off, len) = self.write_block(&raw, self.compression)?;
        self.pending = Some((last, off, len));
        Ok(())
    }

    /// Adds the index entry of the data block at `off` (`len` bytes) whose last key is `last`;
    /// `next` is the first key of the block after it, if any.
    fn add_index_entry(&mut self, last: &[u8], off: u64, len: u32, next: Option<&[u8]>) {
        let tagged = index::separator(last, next, &mut self.separator);
        self.handle.clear();
        index::put_handle(&mut self.handle, off, len, tagged);
        self.index.add(&self.separator, &self.handle);
    }

    fn write_block(&mut self, raw: &[u8], compression: Compression) -> Result<(u64, u32)> {
        let (body, ty) = match compression {
            Compression::Lz4 => {
                self.scratch = lz4_flex::block::compress_prepend_size(raw);
                if self.scratch.len() < raw.len() - raw.len() / 8 {
                    (&self.scratch[..], LZ4)
                } else {
                    (raw, RAW)
                }
            }
            Compression::None => (raw, RAW),
        };
        let len = u32::try_from(body.len())
            .map_err(|_| Error::InvalidParam(format!("block of {} bytes", body.len())))?;
        let trailer = trailer(body, ty);
        fail::fail_point!("kv::table::write", |_| Err(Error::injected("write", &self.path)));
        let path = &self.path;
        self.out.write_all(body).map_err(|e| Error::io("write", path, e))?;
        self.out.write_all(&trailer).map_err(|e| Error::io("write", path, e))?;
        let off = self.offset;
        self.offset += u64::from(len) + TRAILER_LEN as u64;
        // What left the write buffer is in the page cache: start its writeback a MiB at a time.
        let in_cache = self.offset - self.out.buffer().len() as u64;
        if in_cache - self.written_back >= WRITEBACK_BYTES {
            writeback::start(self.out.get_ref(), self.written_back, in_cache - self.written_back);
            self.written_back = in_cache;
        }
        Ok((off, len))
    }

    /// Writes the filter, index and footer and makes the file durable (the caller syncs the
    /// directory).
    pub(crate) fn finish(mut self) -> Result<Built> {
        self.finish_data_block()?;
        let filter =
            if self.bloom_bits > 0 { bloom::build(&self.hashes, self.bloom_bits) } else { vec![] };
        let (filter_off, filter_len) = self.write_block(&filter, Compression::None)?;
        let mut largest = Bytes::new();
        if let Some((last, off, len)) = self.pending.take() {
            self.add_index_entry(&last, off, len, None);
            largest = Bytes::from(last);
        }
        let index = self.index.finish();
        let (index_off, index_len) = self.write_block(&index, Compression::None)?;
        let mut footer = [0u8; FOOTER_LEN];
        footer[0..8].copy_from_slice(&index_off.to_le_bytes());
        footer[8..12].copy_from_slice(&index_len.to_le_bytes());
        footer[12..20].copy_from_slice(&filter_off.to_le_bytes());
        footer[20..24].copy_from_slice(&filter_len.to_le_bytes());
        footer[24..32].copy_from_slice(&self.entries.to_le_bytes());
        footer[32..36].copy_from_slice(&VERSION.to_le_bytes());
        let crc = crc32c::crc32c(&footer[..36]);
        footer[36..40].copy_from_slice(&crc.to_le_bytes());
        footer[40..48].copy_from_slice(&MAGIC);
        let path = self.path.clone();
        self.out.write_all(&footer).map_err(|e| Error::io("write", &path, e))?;
        let file = self.out.into_inner().map_err(|e| Error::io("write", &path, e.into_error()))?;
        fail::fail_point!("kv::table::fsync", |_| Err(Error::injected("fsync", &path)));
        file.sync_all().map_err(|e| Error::io("fsync", &path, e))?;
        Ok(Built {
            size: self.offset + FOOTER_LEN as u64,
            entries: self.entries,
            smallest: self.smallest.unwrap_or_default(),
            largest,
        })
    }
}

/// Reads and verifies the block at `off`, decompressing it.
fn read_block(file: &File, path: &Path, off: u64, len: u32) -> Result<Bytes> {
    fail::fail_point!("kv::table::read", |_| Err(Error::injected("read", path)));
    let n = len as usize + TRAILER_LEN;
    // Read into the buffer's spare capacity: zero-filling it first (for `read_exact_at`) cost
    // as much as a tenth of a cached read's time.
    let mut buf = Vec::with_capacity(n);
    while buf.len() < n {
        let at = off + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => {
                let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                return Err(Error::io("read", path, eof));
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::io("read", path, e.into())),
        }
    }
    buf.truncate(n);
    unpack(buf).map_err(|reason| Error::corrupt(path, off, reason))
}

/// Verifies a block as stored (its bytes, then the trailer `type u8 | crc32c u32 LE`) and
/// decompresses it; the error is the reason.
pub(crate) fn unpack(mut stored: Vec<u8>) -> std::result::Result<Bytes, String> {
    let Some((body, &[ty, c0, c1, c2, c3])) = stored.split_last_chunk::<TRAILER_LEN>() else {
        return Err(format!("block of {} bytes has no trailer", stored.len()));
    };
    let len = body.len();
    let want = u32::from_le_bytes([c0, c1, c2, c3]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(body), &[ty]);
    if crc != want {
        return Err("block checksum mismatch".into());
    }
    match ty {
        RAW => {
            stored.truncate(len);
            Ok(Bytes::from(stored))
        }
        LZ4 => {
            // LZ4 expands a byte into at most 255: a larger size is not allocated.
            let size = body.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
            match size {
                Some(size) if size as usize <= (body.len() - 4).saturating_mul(255) => {
                    lz4_flex::block::decompress_size_prepended(body)
                        .map(Bytes::from)
                        .map_err(|e| format!("LZ4 block: {e}"))
                }
                Some(size) => Err(format!("LZ4 block of {} bytes cannot hold {size}", body.len())),
                None => Err(format!("LZ4 block of {} bytes has no size", body.len())),
            }
        }
        t => Err(format!("unknown block type {t}")),
    }
}

/// The trailer of a block stored as `body` of type `ty` (0 raw, 1 LZ4).
pub(crate) fn trailer(body: &[u8], ty: u8) -> [u8; TRAILER_LEN] {
    let crc = crc32c::crc32c_append(crc32c::crc32c(body), &[ty]);
    let mut trailer = [0u8; TRAILER_LEN];
    trailer[0] = ty;
    trailer[1..].copy_from_slice(&crc.to_le_bytes());
    trailer
}

/// An open SSTable: data blocks read on demand through the cache; index and filter pinned in
/// memory or, with `Options::cache_index_and_filter_blocks`, in the cache too.
pub(crate) struct Table {
    pub(crate) id: u64,
    pub(crate) path: PathBuf,
    file: File,
    /// The handles of the index and filter blocks; the filter's offset is where the data
    /// blocks end.
    index_at: (u64, u32),
    filter_at: (u64, u32),
    form: Form,
    /// Index and filter while they are kept outside the cache.
    pinned: Option<(Arc<Index>, Bytes)>,
    cache: Arc<BlockCache>,
}

impl Table {
    /// Opens the table at `path`, reading and checking its footer, index and filter; with
    /// `cache_meta` they go into `cache` instead of staying pinned.
    pub(crate) fn open(
        path: &Path,
        id: u64,
        cache: Arc<BlockCache>,
        cache_meta: bool,
    ) -> Result<Table> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let size = file.metadata().map_err(|e| Error::io("stat", path, e))?.len();
        if size < FOOTER_LEN as u64 {
            return Err(Error::corrupt(path, 0, format!("file of {size} bytes has no footer")));
        }
        let foot_at = size - FOOTER_LEN as u64;
        let mut f = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut f, foot_at).map_err(|e| Error::io("read", path, e))?;
        let corrupt = |reason: String| Error::corrupt(path, foot_at, reason);
        if f[40..48] != MAGIC {
            return Err(corrupt("footer has no SSTable magic number".into()));
        }
        let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4"));
        let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8"));
        if crc32c::crc32c(&f[..36]) != le32(&f[36..40]) {
            return Err(corrupt("footer checksum mismatch".into()));
        }
        let version = le32(&f[32..36]);
        let form = match version {
            1 => Form::LastKeys,
            VERSION => Form::Separators,
            _ => return Err(corrupt(format!("unsupported SSTable version {version}"))),
        };
        let (index_off, index_len) = (le64(&f[0..8]), le32(&f[8..12]));
        let (filter_off, filter_len) = (le64(&f[12..20]), le32(&f[20..24]));
        for (what, off, len) in
            [("index", index_off, index_len), ("filter", filter_off, filter_len)]
        {
            if off.checked_add(u64::from(len) + TRAILER_LEN as u64).is_none_or(|e| e > foot_at) {
                return Err(corrupt(format!("{what} handle {off}+{len} lies outside the file")));
            }
        }
        let mut table = Table {
            id,
            path: path.to_path_buf(),
            file,
            index_at: (index_off, index_len),
            filter_at: (filter_off, filter_len),
            form,
            pinned: None,
            cache,
        };
        // Read and checked now either way: a damaged table is refused when it is opened.
        let (index, filter) = (table.load_index()?, table.load_filter()?);
        if cache_meta {
            table.cache.insert(id, index_off, Cached::Index(index));
            table.cache.insert(id, filter_off, Cached::Filter(filter));
        } else {
            table.pinned = Some((index, filter));
        }
        Ok(table)
    }

    fn load_index(&self) -> Result<Arc<Index>> {
        let (off, len) = self.index_at;
        let raw = read_block(&self.file, &self.path, off, len)?;
        let index = Block::new(raw)
            .and_then(|b| Index::new(b, self.form, self.filter_at.0))
            .map_err(|r| Error::corrupt(&self.path, off, format!("index block: {r}")))?;
        Ok(Arc::new(index))
    }

    fn load_filter(&self) -> Result<Bytes> {
        read_block(&self.file, &self.path, self.filter_at.0, self.filter_at.1)
    }

    /// The table's index: pinned, from the cache, or loaded (into the cache with `fill`).
    fn index(&self, fill: bool) -> Result<Arc<Index>> {
        if let Some((index, _)) = &self.pinned {
            return Ok(index.clone());
        }
        if let Some(Cached::Index(i)) = self.cache.get_meta(self.id, self.index_at.0) {
            return Ok(i);
        }
        let i = self.load_index()?;
        if fill {
            self.cache.insert(self.id, self.index_at.0, Cached::Index(i.clone()));
        }
        Ok(i)
    }

    /// The table's filter (empty when it was built without one), as `index` finds it.
    fn filter(&self) -> Result<Bytes> {
        if let Some((_, filter)) = &self.pinned {
            return Ok(filter.clone());
        }
        if let Some(Cached::Filter(f)) = self.cache.get_meta(self.id, self.filter_at.0) {
            return Ok(f);
        }
        let f = self.load_filter()?;
        self.cache.insert(self.id, self.filter_at.0, Cached::Filter(f.clone()));
        Ok(f)
    }

    /// Bytes this open table keeps in memory outside the block cache: its index and its
    /// filter when they are pinned, nothing when they are cached.
    pub(crate) fn pinned_bytes(&self) -> usize {
        self.pinned.as_ref().map_or(0, |(index, filter)| index.memory() + filter.len())
    }

    /// Data block `i` of `index`, verified, from the cache if it holds it, and its offset in
    /// the file; with `fill`, a block read from the file goes into the cache.
    fn block(&self, index: &Index, i: usize, fill: bool) -> Result<(u64, Block)> {
        let (off, len) = index.handle(i);
        if let Some(b) = self.cache.get_block(self.id, off) {
            return Ok((off, b));
        }
        let raw = read_block(&self.file, &self.path, off, len)?;
        let b = Block::new(raw).map_err(|r| self.corrupt_block(off, r))?;
        if fill {
            self.cache.insert(self.id, off, Cached::Data(b.clone()));
        }
        Ok((off, b))
    }

    /// Data block `i` of `index`, verified and decoded (for backward iteration), and its
    /// offset.
    fn decoded(&self, index: &Index, i: usize) -> Result<(u64, Decoded)> {
        let (off, b) = self.block(index, i, true)?;
        let d = b.decode().map_err(|r| self.corrupt_block(off, r))?;
        for j in 0..d.len() {
            if !key::valid(d.key(j)) {
                return Err(self.corrupt_block(off, format!("entry {j} has a malformed key")));
            }
        }
        Ok((off, d))
    }

    fn corrupt_block(&self, off: u64, reason: String) -> Error {
        Error::corrupt(&self.path, off, format!("data block: {reason}"))
    }

    /// The newest entry of `user` at or below the sequence of `lookup`, if this table has one.
    pub(crate) fn get(
        &self,
        lookup: &[u8],
        user: &[u8],
        hash: u64,
    ) -> Result<Option<(Kind, Bytes)>> {
        // A table built without a filter has an empty one.
        let excludes = |filter: &[u8]| !filter.is_empty() && !bloom::may_contain(filter, hash);
        // Pinned, the index and filter are borrowed: no reference counts touched per probe.
        if let Some((index, filter)) = &self.pinned {
            if excludes(filter) {
                return Ok(None);
            }
            return self.get_in(index, lookup, user);
        }
        if excludes(&self.filter()?) {
            return Ok(None);
        }
        let index = self.index(true)?;
        self.get_in(&index, lookup, user)
    }

    fn get_in(&self, index: &Index, lookup: &[u8], user: &[u8]) -> Result<Option<(Kind, Bytes)>> {
        let i = index.lower_bound(lookup);
        if i == index.len() {
            return Ok(None);
        }
        let (off, b) = self.block(index, i, true)?;
        let found =
            b.seek(lookup, key::compare, key::valid).map_err(|r| self.corrupt_block(off, r))?;
        Ok(found.filter(|(k, _)| key::user(k) == user).map(|(k, v)| (key::kind(&k), v)))
    }
}

impl Drop for Table {
    /// A closed table's cached index and filter go at once: nothing reads them again, and they
    /// would otherwise hold their share of the cache until the LRU reached them. (Its data
    /// blocks are left to the LRU: finding them would take a lookup per block.)
    fn drop(&mut self) {
        if self.pinned.is_none() {
            self.cache.remove_meta(self.id, self.index_at.0);
            self.cache.remove_meta(self.id, self.filter_at.0);
        }
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("path", &self.path).finish()
    }
}

/// A cursor over one table in one direction. Forward it walks each block's entries in place
/// ([`BlockCursor`]); backward it decodes each block it enters. From its first seek it holds
/// the table's index, so that a cached index evicted meanwhile is not loaded again.
pub(crate) struct TableIter {
    table: Arc<Table>,
    index: Option<Arc<Index>>,
    forward: bool,
    /// The block it stands in, and its offset in the file; `None` past the end.
    block: Option<(usize, u64)>,
    /// Forward: the walk over that block (kept from block to block for its key buffer).
    cursor: Option<BlockCursor>,
    /// Backward: that block decoded, and the entry it stands on.
    decoded: Option<Decoded>,
    pos: usize,
    /// Whether the blocks it reads from the file go into the cache.
    fill: bool,
}

impl TableIter {
    pub(crate) fn new(table: Arc<Table>, forward: bool) -> TableIter {
        TableIter {
            table,
            index: None,
            forward,
            block: None,
            cursor: None,
            decoded: None,
            pos: 0,
            fill: true,
        }
    }

    /// An iterator whose reads leave the cache as it is (a compaction's: its blocks are read
    /// once, and would push out the ones readers use).
    pub(crate) fn filling_no_cache(mut self) -> TableIter {
        self.fill = false;
        self
    }

    /// Enters block `i` at its first entry in the direction of travel, or at `target`.
    fn load(&mut self, i: usize, target: Option<&[u8]>) -> Result<()> {
        let Some(index) = self.index.as_deref() else { return Ok(()) };
        if self.forward {
            let (off, b) = self.table.block(index, i, self.fill)?;
            let c = match &mut self.cursor {
                Some(c) => {
                    c.reset(b);
                    c
                }
                None => self.cursor.insert(BlockCursor::new(b, key::valid)),
            };
            let moved = match target {
                Some(t) => c.seek(t, key::compare),
                None => c.first(),
            };
            moved.map_err(|r| self.table.corrupt_block(off, r))?;
            self.block = Some((i, off));
        } else {
            let (off, d) = self.table.decoded(index, i)?;
            let end = target.map_or(d.len(), |t| d.upper_bound(t, key::compare));
            self.pos = end.wrapping_sub(1);
            self.decoded = Some(d);
            self.block = Some((i, off));
        }
        Ok(())
    }

    fn on_entry(&self) -> bool {
        if self.forward {
            self.cursor.as_ref().is_some_and(|c| c.key().is_some())
        } else {
            self.decoded.as_ref().is_some_and(|d| self.pos < d.len())
        }
    }

    /// Moves to the next block with entries while the current one has none left.
    fn settle(&mut self) -> Result<()> {
        while let Some((i, _)) = self.block {
            if self.on_entry() {
                return Ok(());
            }
            let next = if self.forward { i + 1 } else { i.wrapping_sub(1) };
            if next >= self.index.as_ref().map_or(0, |x| x.len()) {
                self.block = None;
                return Ok(());
            }
            self.load(next, None)?;
        }
        Ok(())
    }

    pub(crate) fn seek(&mut self, target: Option<&[u8]>) -> Result<()> {
        self.block = None;
        let index = match &self.index {
            Some(index) => index,
            None => self.index.insert(self.table.index(self.fill)?),
        };
        let n = index.len();
        if n == 0 {
            return Ok(());
        }
        let i = match target {
            None if self.forward => 0,
            None => n - 1,
            Some(t) if self.forward => index.lower_bound(t),
            Some(t) => index.lower_bound(t).min(n - 1),
        };
        if i == n {
            return Ok(());
        }
        self.load(i, target)?;
        self.settle()
    }

    pub(crate) fn advance(&mut self) -> Result<()> {
        let Some((_, off)) = self.block else { return Ok(()) };
        if self.forward {
            if let Some(c) = &mut self.cursor {
                c.advance().map_err(|r| self.table.corrupt_block(off, r))?;
            }
        } else {
            self.pos = self.pos.wrapping_sub(1);
        }
        self.settle()
    }

    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.block?;
        if self.forward {
            self.cursor.as_ref()?.key()
        } else {
            let d = self.decoded.as_ref()?;
            (self.pos < d.len()).then(|| d.key(self.pos))
        }
    }

    pub(crate) fn value_ref(&self) -> &[u8] {
        if self.key().is_none() {
            return &[];
        }
        match (&self.cursor, &self.decoded) {
            (Some(c), _) if self.forward => c.value(),
            (_, Some(d)) => d.value_ref(self.pos),
            _ => &[],
        }
    }

    pub(crate) fn value(&self) -> Bytes {
        if self.key().is_none() {
            return Bytes::new();
        }
        match (&self.cursor, &self.decoded) {
            (Some(c), _) if self.forward => c.value_bytes(),
            (_, Some(d)) => d.value(self.pos),
            _ => Bytes::new(),
        }
    }

    /// The current user key as bytes of its own: copied out of the walk's buffer forward, a
    /// slice of the decoded block backward.
    pub(crate) fn user_key_bytes(&self) -> Option<Bytes> {
        let k = self.key()?;
        match &self.decoded {
            Some(d) if !self.forward => {
                let mut b = d.key_bytes(self.pos);
                b.truncate(b.len() - key::TAG_LEN);
                Some(b)
            }
            _ => Some(Bytes::copy_from_slice(key::user(k))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(raw: &[u8]) -> Vec<u8> {
        let mut body = lz4_flex::block::compress_prepend_size(raw);
        body.extend_from_slice(&trailer(&body, LZ4));
        body
    }

    /// A table of keys `k0000`..`k0999` at `dir/1.sst`.
    fn build(dir: &Path) -> PathBuf {
        let path = dir.join(file_name(1));
        let mut b = TableBuilder::create(&path, &Options::default().block_size(256)).unwrap();
        for i in 0..1000u32 {
            let k = key::make(format!("k{i:04}").as_bytes(), 1, Kind::Put);
            b.add(&k, &i.to_le_bytes()).unwrap();
        }
        b.finish().unwrap();
        path
    }

    #[test]
    fn cached_index_and_filter_are_loaded_again_after_eviction_and_dropped_with_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path());
        let cache = Arc::new(BlockCache::new(64 << 20));
        let t = Table::open(&path, 1, cache.clone(), true).unwrap();
        assert_eq!(t.pinned_bytes(), 0);
        let meta = cache.index_filter_bytes();
        assert!(meta > 0 && meta == cache.bytes(), "{meta}");
        let get = |t: &Table, i: u32| {
            let user = format!("k{i:04}");
            let lookup = key::lookup(user.as_bytes(), 5);
            t.get(&lookup, user.as_bytes(), bloom::hash(user.as_bytes())).unwrap()
        };
        assert_eq!(get(&t, 7).unwrap().1, &7u32.to_le_bytes()[..]);
        cache.set_limit(0);
        cache.set_limit(64 << 20);
        assert_eq!(cache.bytes(), 0);
        assert_eq!(get(&t, 999).unwrap().1, &999u32.to_le_bytes()[..]);
        assert!(get(&t, 1000).is_none());
        assert_eq!(cache.index_filter_bytes(), meta, "loaded again");
        let t = Arc::new(t);
        let mut it = TableIter::new(t.clone(), false);
        it.seek(None).unwrap();
        assert_eq!(key::user(it.key().unwrap()), b"k0999");
        drop((it, t));
        assert_eq!(cache.index_filter_bytes(), 0, "a closed table's index and filter are dropped");
    }

    #[test]
    fn blocks_unpack_raw_and_lz4() {
        let raw = b"0123456789".repeat(50);
        assert_eq!(unpack(stored(&raw)).unwrap(), raw);
        let mut plain = raw.clone();
        plain.extend_from_slice(&trailer(&raw, RAW));
        assert_eq!(unpack(plain).unwrap(), raw);
        assert!(unpack(vec![0; 4]).unwrap_err().contains("no trailer"));
    }

    /// Found by the fuzzer: the size an LZ4 block states (here 128 MiB, behind 300 bytes) was
    /// allocated before decompressing.
    #[test]
    fn a_size_lz4_cannot_reach_is_corrupt() {
        let mut s = stored(&b"user/0000".repeat(100));
        s[..4].copy_from_slice(&0x0800_0233u32.to_le_bytes());
        let n = s.len() - TRAILER_LEN;
        let t = trailer(&s[..n], LZ4);
        s[n..].copy_from_slice(&t);
        let e = unpack(s).unwrap_err();
        assert!(e.contains("cannot hold 134218291"), "{e}");
        let mut short = vec![1, 2];
        short.extend_from_slice(&trailer(&[1, 2], LZ4));
        assert!(unpack(short).unwrap_err().contains("no size"));
    }
}
