//! Segment files: naming, the header every segment starts with, the index and trailer a sealed
//! segment ends with, creation, and reading records out of a sealed segment.
//!
//! Invariants:
//! - A file named `wal_{start:020}.log` always has a valid header naming `start`: segments are
//!   created under a `.tmp` name and renamed only once the header is durable.
//! - Every segment but the last is sealed: its index and trailer were made durable before the next
//!   segment was created. A sealed segment is immutable until `truncate_back` reopens it.
//! - A batch never straddles two segments, so a sealed segment ends on a batch boundary.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::frame;
use crate::writeback;

/// Format: `{ magic: "TMBRWAL\0" | version: u32 | flags: u32 | start_seq: u64 | reserved: u32 | crc32c: u32 }`.
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;
/// Header flag: the file is a recycled segment, whose bytes past the live records may hold stale
/// records of the segment it was, all numbered below `start_seq`.
const FLAG_RECYCLED: u32 = 1;
const SEGMENT_MAGIC: &[u8; 8] = b"TMBRWAL\0";
/// The version this build writes. Version 1 (frames without synced claims) is still read.
pub(crate) const FORMAT_VERSION: u32 = 2;
const OLDEST_READABLE_VERSION: u32 = 1;

/// Format: `{ magic: "TMBRSEAL" | count: u64 | data_end: u64 | index_crc32c: u32 | crc32c: u32 }`,
/// preceded by the index: `count` little-endian `u32` offsets of the records' frames.
pub(crate) const TRAILER_LEN: usize = 32;
const TRAILER_MAGIC: &[u8; 8] = b"TMBRSEAL";
/// Bytes of index per record in a sealed segment.
pub(crate) const INDEX_ENTRY_LEN: u64 = 4;

const PREFIX: &str = "wal_";
const SUFFIX: &str = ".log";

pub(crate) fn file_name(start: u64) -> String {
    format!("{PREFIX}{start:020}{SUFFIX}")
}

/// The start sequence a segment file name encodes, if `name` is one.
pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a segment header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub start: u64,
    pub recycled: bool,
    /// The segment's frames carry synced claims (format version 2 and later).
    pub claims: bool,
}

pub(crate) fn encode_header(start: u64, recycled: bool) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let flags = if recycled { FLAG_RECYCLED } else { 0 };
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    h[16..24].copy_from_slice(&start.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header and returns what it says.
pub(crate) fn decode_header(h: &[u8]) -> Result<Header, String> {
    let h: &[u8; SEGMENT_HEADER_LEN] = h
        .get(..SEGMENT_HEADER_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| format!("file shorter than the {SEGMENT_HEADER_LEN}-byte segment header"))?;
    if &h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic: not a timber WAL segment".into());
    }
    let stored = u32::from_le_bytes(h[28..32].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&h[..28]);
    if stored != computed {
        return Err(format!(
            "segment header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "unsupported segment format version {version} (this build reads \
             {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})"
        ));
    }
    let flags = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    if flags & !FLAG_RECYCLED != 0 {
        return Err(format!("unknown segment header flags {flags:#x}"));
    }
    Ok(Header {
        start: u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")),
        recycled: flags & FLAG_RECYCLED != 0,
        claims: version >= 2,
    })
}

/// The decoded trailer of a sealed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trailer {
    pub count: u64,
    pub data_end: u64,
    pub index_crc: u32,
}

impl Trailer {
    pub(crate) fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut t = [0u8; TRAILER_LEN];
        t[0..8].copy_from_slice(TRAILER_MAGIC);
        t[8..16].copy_from_slice(&self.count.to_le_bytes());
        t[16..24].copy_from_slice(&self.data_end.to_le_bytes());
        t[24..28].copy_from_slice(&self.index_crc.to_le_bytes());
        let crc = crc32c::crc32c(&t[..28]);
        t[28..32].copy_from_slice(&crc.to_le_bytes());
        t
    }

    /// Decodes the trailer found at the end of a file of `file_len` bytes; `None` when the bytes
    /// are not a trailer consistent with that length.
    pub(crate) fn decode(t: &[u8], file_len: u64) -> Option<Trailer> {
        let t: &[u8; TRAILER_LEN] = t.get(..TRAILER_LEN)?.try_into().ok()?;
        if &t[0..8] != TRAILER_MAGIC {
            return None;
        }
        let stored = u32::from_le_bytes(t[28..32].try_into().ok()?);
        if stored != crc32c::crc32c(&t[..28]) {
            return None;
        }
        let trailer = Trailer {
            count: u64::from_le_bytes(t[8..16].try_into().ok()?),
            data_end: u64::from_le_bytes(t[16..24].try_into().ok()?),
            index_crc: u32::from_le_bytes(t[24..28].try_into().ok()?),
        };
        let expected_len = trailer
            .count
            .checked_mul(INDEX_ENTRY_LEN)?
            .checked_add(trailer.data_end)?
            .checked_add(TRAILER_LEN as u64)?;
        (trailer.data_end >= SEGMENT_HEADER_LEN as u64 && expected_len == file_len)
            .then_some(trailer)
    }
}

/// What the log keeps in memory about a sealed segment.
#[derive(Debug, Clone)]
pub(crate) struct Sealed {
    pub start: u64,
    pub count: u64,
    pub path: PathBuf,
    pub file_len: u64,
}

impl Sealed {
    pub(crate) fn end(&self) -> u64 {
        self.start + self.count
    }
}

pub(crate) fn open_options_rw(mode: u32) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(true).mode(mode);
    o
}

/// Creates (or empties) `path` for writing with permission bits `mode`.
pub(crate) fn create_file(path: &Path, mode: u32) -> Result<File> {
    open_options_rw(mode)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io("create", path, e))
}

pub(crate) fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    fail::fail_point!("wal::segment::read", |_| Err(Error::injected("read", path)));
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::corrupt(
                path,
                offset,
                format!("file ends before the {} bytes expected here", buf.len()),
            )
        } else {
            Error::io("read", path, e)
        }
    })
}

/// Reads the header and, if present, the trailer of a segment file.
/// Returns the trailer of a sealed segment, or `None` for an unsealed one.
pub(crate) fn inspect(path: &Path, expected_start: u64) -> Result<Inspected> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io("stat", path, e))?.len();
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    if file_len < SEGMENT_HEADER_LEN as u64 {
        return Err(Error::corrupt(
            path,
            0,
            format!("file of {file_len} bytes is shorter than a segment header"),
        ));
    }
    read_exact_at(&file, path, &mut h, 0)?;
    let header = decode_header(&h).map_err(|r| Error::corrupt(path, 0, r))?;
    let start = header.start;
    if start != expected_start {
        return Err(Error::corrupt(
            path,
            16,
            format!("header names start sequence {start}, file name says {expected_start}"),
        ));
    }
    let mut trailer = None;
    if file_len >= (SEGMENT_HEADER_LEN + TRAILER_LEN) as u64 {
        let mut t = [0u8; TRAILER_LEN];
        read_exact_at(&file, path, &mut t, file_len - TRAILER_LEN as u64)?;
        trailer = Trailer::decode(&t, file_len);
    }
    Ok(Inspected { file, file_len, trailer, header })
}

/// A segment file opened by `inspect`.
pub(crate) struct Inspected {
    pub file: File,
    pub file_len: u64,
    /// Present when the segment is sealed.
    pub trailer: Option<Trailer>,
    pub header: Header,
}

/// Reads and verifies the index of a sealed segment.
pub(crate) fn read_index(file: &File, path: &Path, trailer: &Trailer) -> Result<Vec<u32>> {
    let len = usize::try_from(trailer.count * INDEX_ENTRY_LEN)
        .map_err(|_| Error::corrupt(path, trailer.data_end, "index does not fit in memory"))?;
    let mut raw = vec![0u8; len];
    read_exact_at(file, path, &mut raw, trailer.data_end)?;
    let computed = crc32c::crc32c(&raw);
    if computed != trailer.index_crc {
        return Err(Error::corrupt(
            path,
            trailer.data_end,
            format!(
                "index checksum mismatch: stored {:#010x}, computed {computed:#010x}",
                trailer.index_crc
            ),
        ));
    }
    let index: Vec<u32> =
        raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    let mut prev = SEGMENT_HEADER_LEN as u64;
    for (i, &off) in index.iter().enumerate() {
        let off = u64::from(off);
        if off < prev || off >= trailer.data_end || (i == 0 && off != SEGMENT_HEADER_LEN as u64) {
            return Err(Error::corrupt(
                path,
                trailer.data_end + i as u64 * 4,
                format!("index entry {i} ({off}) out of order"),
            ));
        }
        prev = off + frame::HEADER_LEN as u64;
    }
    Ok(index)
}

/// Encodes the index and trailer that seal a segment whose records end at `data_end`.
pub(crate) fn encode_seal(offsets: &[u32], data_end: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(offsets.len() * 4 + TRAILER_LEN);
    for off in offsets {
        out.extend_from_slice(&off.to_le_bytes());
    }
    let trailer =
        Trailer { count: offsets.len() as u64, data_end, index_crc: crc32c::crc32c(&out) };
    out.extend_from_slice(&trailer.encode());
    out
}

/// A sealed segment opened for reading: its file and its verified index.
#[derive(Debug)]
pub(crate) struct SegmentReader {
    pub path: PathBuf,
    pub start: u64,
    file: File,
    index: Vec<u32>,
    data_end: u64,
}

impl SegmentReader {
    pub(crate) fn open(seg: &Sealed) -> Result<SegmentReader> {
        let Inspected { file, trailer, .. } = inspect(&seg.path, seg.start)?;
        let trailer = trailer.ok_or_else(|| {
            Error::corrupt(
                &seg.path,
                seg.file_len.saturating_sub(TRAILER_LEN as u64),
                "sealed segment lost its trailer",
            )
        })?;
        let index = read_index(&file, &seg.path, &trailer)?;
        Ok(SegmentReader {
            path: seg.path.clone(),
            start: seg.start,
            file,
            index,
            data_end: trailer.data_end,
        })
    }

    pub(crate) fn end(&self) -> u64 {
        self.start + self.index.len() as u64
    }

    /// Reads records `from..` of this segment, stopping before `until` or once about
    /// `max_bytes` are read (at least one record).
    pub(crate) fn read_run(
        &self,
        from: u64,
        until: u64,
        max_bytes: u64,
    ) -> Result<Vec<(u64, Bytes)>> {
        debug_assert!(from >= self.start && from < self.end());
        let until = until.min(self.end());
        let first = (from - self.start) as usize;
        // The log's bounds put `from` in this segment; its index, read again from the file, must
        // agree.
        let Some(&begin) = self.index.get(first) else {
            return Err(Error::corrupt(
                &self.path,
                self.data_end,
                format!("record {from} is missing from the segment's index"),
            ));
        };
        let begin = u64::from(begin);
        let mut last = first + 1;
        while (last as u64) < until - self.start
            && self.index.get(last).is_some_and(|&o| u64::from(o) - begin < max_bytes)
        {
            last += 1;
        }
        let stop = self.index.get(last).map_or(self.data_end, |&o| u64::from(o));
        let mut buf = vec![0u8; (stop - begin) as usize];
        read_exact_at(&self.file, &self.path, &mut buf, begin)?;
        #[expect(
            clippy::indexing_slicing,
            reason = "first < last <= index.len(): `first` was checked above and `last` moves only \
                      past indices that exist"
        )]
        let offsets = &self.index[first..last];
        decode_run(&self.path, Bytes::from(buf), begin, from, offsets)
    }
}

/// Splits `bytes` (file bytes starting at offset `base`) into the records whose frame offsets
/// are `offsets`, verifying each record's checksum and sequence number.
pub(crate) fn decode_run(
    path: &Path,
    bytes: Bytes,
    base: u64,
    first_seq: u64,
    offsets: &[u32],
) -> Result<Vec<(u64, Bytes)>> {
    let mut out = Vec::with_capacity(offsets.len());
    for (i, &off) in offsets.iter().enumerate() {
        let rel = (u64::from(off) - base) as usize;
        let end = offsets.get(i + 1).map_or(bytes.len(), |&o| (u64::from(o) - base) as usize);
        let at = base + rel as u64;
        let seq = first_seq + i as u64;
        let framed = bytes.get(rel..end).ok_or_else(|| {
            Error::corrupt(path, at, format!("record {seq}: index offsets out of order"))
        })?;
        let frame = frame::decode(framed)
            .map_err(|e| Error::corrupt(path, at, format!("record {seq}: {e}")))?;
        if frame.seq != seq {
            return Err(Error::corrupt(
                path,
                at,
                format!("expected record {seq}, found record {}", frame.seq),
            ));
        }
        if frame::frame_len(frame.payload.len()) != (end - rel) as u64 {
            return Err(Error::corrupt(
                path,
                at,
                format!("record {seq} length disagrees with the index"),
            ));
        }
        let p = rel + frame::HEADER_LEN;
        out.push((seq, bytes.slice(p..p + frame.payload.len())));
    }
    Ok(out)
}

/// Fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fail::fail_point!("wal::segment::sync_dir", |_| Err(Error::injected("fsync directory", dir)));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("fsync directory", dir, e))
}

/// Removes a file; one that is already gone is no error.
pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// Name of the zero-filled file prepared in the background to become the next segment.
pub(crate) const SPARE_FILE: &str = "wal_spare.tmp";

/// Creates the segment starting at `start` and makes it durable under its name: [`begin`], then
/// [`finish`].
pub(crate) fn create(
    dir: &Path,
    start: u64,
    capacity: u64,
    preallocate: bool,
    mode: u32,
    spare: Option<(File, PathBuf)>,
    recycled: bool,
) -> Result<(File, PathBuf)> {
    let (file, tmp) = begin(dir, start, capacity, preallocate, mode, spare, recycled)?;
    let path = finish(dir, start, &file, &tmp)?;
    Ok((file, path))
}

/// The temporary name of the segment starting at `start`, under which it is written until
/// [`finish`] names it: recovery removes such a file, or adopts it as the last segment if it
/// continues the log (see `recovery`).
pub(crate) fn tmp_name(start: u64) -> String {
    format!("{}.tmp", file_name(start))
}

/// Starts the segment at `start` under its temporary name: the spare (zero-filled or recycled)
/// if there is one, renamed, else a new file; its header written, nothing synced. Returns the
/// file and its path.
pub(crate) fn begin(
    dir: &Path,
    start: u64,
    capacity: u64,
    preallocate: bool,
    mode: u32,
    spare: Option<(File, PathBuf)>,
    recycled: bool,
) -> Result<(File, PathBuf)> {
    let tmp = dir.join(tmp_name(start));
    let file = match spare {
        Some((file, at)) => {
            // The spare's own name is free again at once, for the preparer's next one.
            fs::rename(&at, &tmp).map_err(|e| Error::io("rename", &at, e))?;
            file
        }
        None => {
            let file = create_file(&tmp, mode)?;
            if preallocate {
                preallocate_tail(&file, &tmp, SEGMENT_HEADER_LEN as u64, capacity)?;
            }
            file
        }
    };
    fail::fail_point!("wal::segment::create", |_| Err(Error::injected("write", &tmp)));
    file.write_all_at(&encode_header(start, recycled), 0)
        .map_err(|e| Error::io("write", &tmp, e))?;
    Ok((file, tmp))
}

/// Makes a segment started by [`begin`] durable under its name: its header, the rename, the
/// directory. Returns its path.
pub(crate) fn finish(dir: &Path, start: u64, file: &File, tmp: &Path) -> Result<PathBuf> {
    file.sync_all().map_err(|e| Error::io("fsync", tmp, e))?;
    name(dir, start, tmp)
}

/// The second half of [`finish`], for a caller that fsynced the file itself: the rename and the
/// directory. Returns the segment's path.
pub(crate) fn name(dir: &Path, start: u64, tmp: &Path) -> Result<PathBuf> {
    let path = dir.join(file_name(start));
    fail::fail_point!("wal::segment::rename", |_| Err(Error::injected("rename", tmp)));
    fs::rename(tmp, &path).map_err(|e| Error::io("rename", tmp, e))?;
    sync_dir(dir)?;
    Ok(path)
}

/// Writes the zero-filled spare segment file (header space included) and makes it durable.
///
/// `create` runs while the caller holds the lock a roll holds while it renames the previous spare,
/// so that a new spare never reuses the name of one being renamed; the zero-filling runs after.
pub(crate) fn prepare_spare(
    dir: &Path,
    capacity: u64,
    mode: u32,
    create: impl FnOnce(&dyn Fn() -> Result<File>) -> Option<Result<File>>,
) -> Option<Result<File>> {
    let path = dir.join(SPARE_FILE);
    let file = match create(&|| create_file(&path, mode))? {
        Ok(f) => f,
        Err(e) => return Some(Err(e)),
    };
    fail::fail_point!("wal::segment::prepare_spare", |_| Some(Err(Error::injected(
        "preallocate",
        &path
    ))));
    let filled = preallocate_tail(&file, &path, 0, capacity)
        .and_then(|()| file.sync_all().map_err(|e| Error::io("fsync", &path, e)));
    Some(filled.map(|()| file))
}

/// Turns a sealed segment that truncation dropped into a spare: renamed to
/// `wal_recycled_{start}.tmp` (the directory fsynced, so that a crash never finds the segment
/// under its name half overwritten), then its index and trailer zeroed and its space up to
/// `capacity` written. Its records stay: all are numbered below any segment the spare will
/// become, whose header says it was recycled. Reusing written blocks spares the zero-filling of
/// a new segment, its CPU and its disk writes.
pub(crate) fn recycle(
    dir: &Path,
    seg: &Sealed,
    capacity: u64,
    mode: u32,
) -> Result<(File, PathBuf)> {
    let spare = dir.join(format!("wal_recycled_{}.tmp", seg.start));
    let file =
        open_options_rw(mode).open(&seg.path).map_err(|e| Error::io("open", &seg.path, e))?;
    fs::rename(&seg.path, &spare).map_err(|e| Error::io("rename", &seg.path, e))?;
    sync_dir(dir)?;
    let data_end = seg
        .file_len
        .saturating_sub(TRAILER_LEN as u64 + seg.count * INDEX_ENTRY_LEN)
        .max(SEGMENT_HEADER_LEN as u64);
    preallocate_tail(&file, &spare, data_end, capacity)?;
    Ok((file, spare))
}

/// Reserves `from..capacity` of a segment on disk by writing zeros. Written (not merely
/// allocated) blocks let a later `fdatasync` of records skip the journal commit that converting
/// unwritten extents costs, a large part of the latency of a durable append of a few KiB.
pub(crate) fn preallocate_tail(file: &File, path: &Path, from: u64, capacity: u64) -> Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    // Writeback is started a MiB at a time, so that the fsync after this is not one burst of the
    // whole segment that appenders' fsyncs queue behind.
    const WRITEBACK_BYTES: u64 = 1 << 20;
    let (mut off, mut started) = (from, from);
    while off < capacity {
        let n = (capacity - off).min(ZEROS.len() as u64) as usize;
        #[expect(clippy::indexing_slicing, reason = "n <= ZEROS.len() (the min above)")]
        file.write_all_at(&ZEROS[..n], off).map_err(|e| Error::io("preallocate", path, e))?;
        off += n as u64;
        if off - started >= WRITEBACK_BYTES {
            writeback::start(file, started, off - started);
            started = off;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_roundtrip() {
        assert_eq!(file_name(42), "wal_00000000000000000042.log");
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name("wal_42.log"), None);
        assert_eq!(parse_file_name("wal_0000000000000000004x.log"), None);
        assert_eq!(parse_file_name("wal_00000000000000000042.log.tmp"), None);
    }

    #[test]
    fn header_roundtrip_and_checks() {
        let h = encode_header(9, false);
        assert_eq!(decode_header(&h), Ok(Header { start: 9, recycled: false, claims: true }));
        let r = encode_header(9, true);
        assert_eq!(decode_header(&r), Ok(Header { start: 9, recycled: true, claims: true }));
        let mut v1 = h;
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1[..28]);
        v1[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_header(&v1), Ok(Header { start: 9, recycled: false, claims: false }));
        let mut v3 = h;
        v3[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&v3[..28]);
        v3[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_header(&v3).unwrap_err().contains("version 3"));
        let mut unknown = r;
        unknown[12] = 2;
        let crc = crc32c::crc32c(&unknown[..28]);
        unknown[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_header(&unknown).unwrap_err().contains("flags"));
        let mut bad = h;
        bad[17] ^= 1;
        assert!(decode_header(&bad).unwrap_err().contains("checksum"));
        let mut bad = h;
        bad[0] = b'X';
        assert!(decode_header(&bad).unwrap_err().contains("magic"));
        assert!(decode_header(&h[..10]).is_err());
    }

    #[test]
    fn trailer_roundtrip() {
        let offsets = [32u32, 60, 100];
        let seal = encode_seal(&offsets, 150);
        let file_len = 150 + seal.len() as u64;
        let t = Trailer::decode(&seal[seal.len() - TRAILER_LEN..], file_len).unwrap();
        assert_eq!(t.count, 3);
        assert_eq!(t.data_end, 150);
        assert!(Trailer::decode(&seal[seal.len() - TRAILER_LEN..], file_len + 1).is_none());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96), len in any::<u64>()) {
            let _ = decode_header(&bytes);
            let _ = Trailer::decode(&bytes, len);
            let _ = parse_file_name(&String::from_utf8_lossy(&bytes));
        }
    }
}
