//! The active segment: the one appends go to. Records are encoded into a buffer in memory and
//! handed to the operating system by `flush`, through a shared map of the file's preallocated
//! extent (`mapped`) when no fsync follows, else with `pwrite`.
//!
//! Invariants:
//! - `offsets` holds the frame offset of every record of the segment, so `end() == start +
//!   offsets.len()`; records below `written` are in the file, the rest in `buf`.
//! - A recycled file holds stale records after the written ones: every flush writes a frame
//!   header of zeros after its records, which recovery reads as the end.
//! - The map is released before any fsync of the file and dropped before the file is shortened
//!   (see `mapped`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::frame;
use crate::mapped::Mapped;
use crate::options::{Options, SyncMode};
use crate::segment::{
    self, decode_run, preallocate_tail, INDEX_ENTRY_LEN, SEGMENT_HEADER_LEN, TRAILER_LEN,
};

/// The segment being appended to.
pub(crate) struct Active {
    pub(crate) start: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    /// One handle of the file per sync slot (`Options::syncs_in_flight`), each opened on its
    /// own: the kernel reports a failed writeback once per open file, so a sync that shared a
    /// handle with another could miss the error that the other consumed, and call lost records
    /// durable.
    pub(crate) sync_handles: Vec<Arc<File>>,
    /// Frame offsets of its records.
    pub(crate) offsets: Vec<u32>,
    /// Bytes of the file that hold the header and records; records after that are in `buf`.
    pub(crate) written: u64,
    /// Bytes of the file whose writeback was started in the background (`bytes_per_sync` in
    /// `Manual` mode), through a handle of its own (a second handle of the same open file: a
    /// `sync_file_range` without a wait reports no writeback error, so it cannot take one that a
    /// later fsync must see).
    pub(crate) written_back: u64,
    pub(crate) writeback_handle: Arc<File>,
    pub(crate) buf: Vec<u8>,
    /// The map that `flush` copies `buf` through, inside the file's preallocated extent.
    pub(crate) map: Mapped,
    /// The file is a recycled segment: stale records follow the written ones, so every flush
    /// also writes a frame header of zeros after its records, which recovery reads as the end.
    pub(crate) recycled: bool,
    /// Set once the file's header is durable; until then flushes use `pwrite`, not the map. A
    /// segment begun by a roll is fsynced by the roll finisher while appends go on, and every
    /// page the fsync writes back that is still mapped costs a TLB shootdown (see `Mapped`):
    /// the pages written before it are not mapped at all.
    pub(crate) header_durable: Arc<AtomicBool>,
}

impl Active {
    /// An active segment whose records end at `written`. When segments are preallocated and
    /// not every append is synced, flushes not followed by a sync copy records into the file's
    /// preallocated extent through a shared map.
    pub(crate) fn new(
        start: u64,
        path: PathBuf,
        file: File,
        offsets: Vec<u32>,
        written: u64,
        opts: &Options,
    ) -> Result<Active> {
        let at = path.clone();
        Active::opened_at(start, path, &at, file, offsets, written, opts)
    }

    /// An empty segment named `path`, whose file is still at `at` (see `segment::begin`).
    pub(crate) fn begun(
        start: u64,
        path: PathBuf,
        at: &Path,
        file: File,
        opts: &Options,
    ) -> Result<Active> {
        let a =
            Active::opened_at(start, path, at, file, Vec::new(), SEGMENT_HEADER_LEN as u64, opts)?;
        a.header_durable.store(false, Ordering::Release);
        Ok(a)
    }

    fn opened_at(
        start: u64,
        path: PathBuf,
        at: &Path,
        file: File,
        offsets: Vec<u32>,
        written: u64,
        opts: &Options,
    ) -> Result<Active> {
        let sync_handles = (0..opts.syncs_in_flight)
            .map(|_| File::open(at).map(Arc::new).map_err(|e| Error::io("open", at, e)))
            .collect::<Result<_>>()?;
        let writeback_handle =
            Arc::new(file.try_clone().map_err(|e| Error::io("duplicate", at, e))?);
        Ok(Active {
            start,
            path,
            file,
            sync_handles,
            offsets,
            written,
            written_back: 0,
            writeback_handle,
            buf: Vec::new(),
            map: Mapped::new(maps(opts)),
            recycled: false,
            header_durable: Arc::new(AtomicBool::new(true)),
        })
    }

    pub(crate) fn end(&self) -> u64 {
        self.start + self.offsets.len() as u64
    }

    pub(crate) fn data_len(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// Size of the file once sealed with `frames` more bytes of records, `records` more of them.
    pub(crate) fn sealed_len(&self, frames: u64, records: u64) -> u64 {
        self.data_len()
            + frames
            + (self.offsets.len() as u64 + records) * INDEX_ENTRY_LEN
            + TRAILER_LEN as u64
    }

    /// Hands buffered records to the operating system: through the map when `map` (a flush that
    /// no fsync follows right away), else with `pwrite`. On ext4 an `fdatasync` right after writes
    /// through a shared map is much slower than after `pwrite` (the write faults join the
    /// journal's running transaction, so the fsync commits it): flushes that precede a sync use
    /// `pwrite`, and their caller unmaps the window first (see `Mapped::release`).
    pub(crate) fn flush(&mut self, map: bool) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        fail::fail_point!("wal::active::write", |_| Err(Error::injected("write", &self.path)));
        let len = self.buf.len();
        if self.recycled {
            self.buf.extend_from_slice(&[0; frame::HEADER_LEN]);
        }
        let mapped = if map && self.header_durable.load(Ordering::Acquire) {
            self.map.write_at(&self.file, &self.path, &self.buf, self.written)
        } else {
            0
        };
        if let Some(rest) = self.buf.get(mapped..).filter(|rest| !rest.is_empty()) {
            self.file
                .write_all_at(rest, self.written + mapped as u64)
                .map_err(|e| Error::io("write", &self.path, e))?;
        }
        self.written += len as u64;
        self.buf.clear();
        Ok(())
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "the caller checked start <= from < end(), so first < limit <= offsets.len(); \
                  bytes past `written` are the first bytes of `buf`"
    )]
    pub(crate) fn read_run(
        &self,
        from: u64,
        until: u64,
        max_bytes: u64,
    ) -> Result<Vec<(u64, Bytes)>> {
        let first = (from - self.start) as usize;
        let limit = (until.min(self.end()) - self.start) as usize;
        let begin = u64::from(self.offsets[first]);
        let mut last = first + 1;
        while last < limit && u64::from(self.offsets[last]) - begin < max_bytes {
            last += 1;
        }
        let stop = self.offsets.get(last).map_or(self.data_len(), |&o| u64::from(o));
        let mut bytes = vec![0u8; (stop - begin) as usize];
        let on_disk = stop.min(self.written).saturating_sub(begin) as usize;
        segment::read_exact_at(&self.file, &self.path, &mut bytes[..on_disk], begin)?;
        if on_disk < bytes.len() {
            let from_buf = (begin + on_disk as u64 - self.written) as usize;
            let n = bytes.len() - on_disk;
            bytes[on_disk..].copy_from_slice(&self.buf[from_buf..from_buf + n]);
        }
        decode_run(&self.path, Bytes::from(bytes), begin, from, &self.offsets[first..last])
    }

    /// Drops record `i` (at file offset `off`) and all after it, durably.
    pub(crate) fn cut(&mut self, i: usize, off: u64, opts: &Options) -> Result<()> {
        if off >= self.written {
            self.buf.truncate((off - self.written) as usize);
        } else {
            self.buf.clear();
            self.map.unmap();
            self.file.set_len(off).map_err(|e| Error::io("truncate", &self.path, e))?;
            self.written = off;
            if opts.preallocate {
                preallocate_tail(&self.file, &self.path, off, opts.segment_capacity)?;
            }
            self.file.sync_data().map_err(|e| Error::io("fdatasync", &self.path, e))?;
        }
        self.offsets.truncate(i);
        Ok(())
    }
}

/// Whether appends to active segments go through a shared map: when segments are preallocated,
/// and not in `SyncMode::Always`, where every flush is followed by an fsync.
fn maps(opts: &Options) -> bool {
    opts.preallocate && opts.sync != SyncMode::Always
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment begun by a roll is written with `pwrite` until its header is durable (the roll
    /// finisher's fsync of it must find no page mapped), through the map after.
    #[test]
    fn a_begun_segment_is_mapped_only_once_its_header_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options::default().sync(SyncMode::Manual);
        let tmp = dir.path().join("begun.tmp");
        let file = File::options().read(true).write(true).create_new(true).open(&tmp).unwrap();
        file.set_len(1 << 20).unwrap();
        let mut a = Active::begun(7, dir.path().join("begun"), &tmp, file, &opts).unwrap();
        a.buf.extend_from_slice(b"before");
        a.flush(true).unwrap();
        assert!(!a.map.is_mapped(), "written through the map before the header was durable");
        a.header_durable.store(true, Ordering::Release);
        a.buf.extend_from_slice(b"after");
        a.flush(true).unwrap();
        assert!(a.map.is_mapped());
        let mut back = [0u8; 11];
        a.file.read_exact_at(&mut back, SEGMENT_HEADER_LEN as u64).unwrap();
        assert_eq!(&back, b"beforeafter");
    }
}
