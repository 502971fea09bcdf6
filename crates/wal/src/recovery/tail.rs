//! Recovery of the last, unsealed segment: find where its whole records end.
//!
//! Policy (see docs/format/wal.md, "Recovery"):
//! - Records are read in order from the segment header. Reading stops at the end of the file or
//!   at a header of all zero bytes (space that was preallocated or never written).
//! - A record that fails verification (short, bad checksum, unknown flags) ends the good data.
//!   It is damage inside the log, reported as `Error::Corrupt` with nothing modified, if the log
//!   is known to have made it durable: a valid record later in the file claims it was synced
//!   (each frame records the durable point of its time, see `frame`). Otherwise it belongs to a write
//!   that was never acknowledged, torn by a crash wherever its pages landed, and it is cut. In a
//!   segment of format version 1, whose frames carry no claims, any valid later record makes it
//!   corruption.
//! - A checksummed record whose sequence number breaks the sequence is corruption, except in a
//!   recycled segment (its header says so), where a record numbered below the segment's start is
//!   a stale one of the file's previous life and ends the good data like zeros do.
//! - Records below the meta file's `synced_below` (the durable point of the last close) must all
//!   be there: good data that ends before it, whatever ends it, is `Error::Corrupt`.
//! - Records after the last one flagged as the end of a batch belong to a batch that was never
//!   completed; they are cut too, which makes batches atomic. Records below `complete_below`
//!   (the point of the last `truncate_back`, which may cut a batch in two on purpose) count as
//!   whole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::frame::{self, Header, HEADER_LEN};
use crate::segment::SEGMENT_HEADER_LEN;

const CHUNK: u64 = 1 << 20;
/// Sequence numbers further than this past the expected one are not taken as evidence of data
/// beyond a bad record.
const LOOKAHEAD_SEQ_SPAN: u64 = 1 << 32;

/// The good part of an unsealed segment.
#[derive(Debug)]
pub(crate) struct Tail {
    /// Offsets of the frames of the records kept.
    pub offsets: Vec<u32>,
    /// End of the last complete batch: everything from here on is to be discarded.
    pub data_end: u64,
    /// Why data after `data_end` is discarded, if there was any.
    pub cut: Option<String>,
}

/// Reads a file through a buffer of about `CHUNK` bytes.
struct Window<'a> {
    file: &'a File,
    path: &'a Path,
    file_len: u64,
    base: u64,
    buf: Vec<u8>,
}

impl Window<'_> {
    /// Bytes `off..off + n` of the file, clipped at its end.
    #[expect(
        clippy::indexing_slicing,
        reason = "after a refill `buf` holds n.max(CHUNK) bytes from `off`, clipped at the same end as `n`; \
                  otherwise `off..off + n` lies within `base..have`"
    )]
    fn get(&mut self, off: u64, n: u64) -> Result<&[u8]> {
        let n = n.min(self.file_len.saturating_sub(off));
        let have = self.base + self.buf.len() as u64;
        if off < self.base || off + n > have {
            let len = n.max(CHUNK).min(self.file_len - off);
            self.base = off;
            self.buf.resize(len as usize, 0);
            fail::fail_point!("wal::recovery::scan", |_| Err(Error::injected("read", self.path)));
            self.file
                .read_exact_at(&mut self.buf, off)
                .map_err(|e| Error::io("read", self.path, e))?;
        }
        let rel = (off - self.base) as usize;
        Ok(&self.buf[rel..rel + n as usize])
    }
}

/// What recovery knows of the segment it scans, besides its bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scan {
    /// Sequence number of the segment's first record.
    pub start: u64,
    pub file_len: u64,
    /// Records below this are whole even without a `LAST` flag (meta `complete_below`).
    pub complete_below: u64,
    /// Records below this were durable at the last close (meta `synced_below`).
    pub synced_below: u64,
    /// The segment's header says it is recycled.
    pub recycled: bool,
    /// Its frames carry synced claims (format version 2).
    pub claims: bool,
}

pub(crate) fn scan_tail(file: &File, path: &Path, scan: Scan) -> Result<Tail> {
    let Scan { start, file_len, complete_below, synced_below, recycled, claims } = scan;
    let mut w = Window { file, path, file_len, base: 0, buf: Vec::new() };
    let mut off = SEGMENT_HEADER_LEN as u64;
    let mut seq = start;
    let mut offsets: Vec<u32> = Vec::new();
    let (mut committed_end, mut committed_count) = (off, 0usize);
    let bad: Option<String> = loop {
        if off >= file_len {
            break None;
        }
        let head = w.get(off, HEADER_LEN as u64)?;
        if head.iter().all(|&b| b == 0) {
            break None;
        }
        let Some(header) = Header::parse(head) else {
            break Some("partial record header at the end of the file".to_owned());
        };
        let flen = header.frame_len();
        if off + flen > file_len {
            break Some(format!("record claims {flen} bytes, past the end of the file"));
        }
        match frame::decode(w.get(off, flen)?) {
            Err(e) => break Some(e.to_string()),
            Ok(f) if recycled && f.seq < start => break None,
            Ok(f) if f.seq != seq => {
                return Err(Error::corrupt(
                    path,
                    off,
                    format!("expected record {seq}, found a valid record numbered {}", f.seq),
                ));
            }
            Ok(f) => {
                offsets.push(u32::try_from(off).expect("segment capacity < 4 GiB"));
                seq += 1;
                off += flen;
                if f.last || seq <= complete_below {
                    (committed_end, committed_count) = (off, offsets.len());
                }
            }
        }
    };
    let kept_end = start + committed_count as u64;
    if kept_end < synced_below {
        let (at, what) = match &bad {
            Some(reason) => (off, reason.clone()),
            None if seq < synced_below => (off, format!("the records end before record {seq}")),
            None => (committed_end, format!("record {kept_end} ends no batch")),
        };
        return Err(Error::corrupt(
            path,
            at,
            format!(
                "{what}; records below {synced_below} were durable when the log was last \
                 closed, so this is damage inside the log, not a torn tail"
            ),
        ));
    }
    if let Some(reason) = &bad {
        if let Some((later_off, later)) = find_synced_claim(&mut w, off + 1, seq, claims)? {
            let why = if claims {
                format!("a valid record {} at offset {later_off} was written after records below {} were synced", later.seq, later.synced_below)
            } else {
                format!("a valid record {} follows at offset {later_off}", later.seq)
            };
            return Err(Error::corrupt(
                path,
                off,
                format!("{reason}; {why}, so this is damage inside the log, not a torn tail"),
            ));
        }
    }
    let incomplete = offsets.len() - committed_count;
    offsets.truncate(committed_count);
    let cut = match (bad, incomplete) {
        (Some(r), 0) => Some(format!("torn record at offset {off}: {r}")),
        (Some(r), n) => Some(format!(
            "torn record at offset {off} ({r}) and {n} records of its unfinished batch"
        )),
        (None, 0) => None,
        (None, n) => Some(format!("{n} records of an unfinished batch")),
    };
    Ok(Tail { offsets, data_end: committed_end, cut })
}

/// A valid frame found after a damaged one.
struct Later {
    seq: u64,
    synced_below: u64,
}

/// The first position at or after `from` holding a valid frame numbered `seq` or later that
/// shows record `seq` was synced: one claiming a durable point past `seq` (with `claims`), or
/// any such frame (without: format version 1).
fn find_synced_claim(
    w: &mut Window<'_>,
    from: u64,
    seq: u64,
    claims: bool,
) -> Result<Option<(u64, Later)>> {
    let mut pos = from;
    while pos + HEADER_LEN as u64 <= w.file_len {
        let chunk = w.get(pos, CHUNK)?.to_vec();
        let last_start = chunk.len().saturating_sub(HEADER_LEN - 1);
        for rel in 0..last_start {
            let Some(h) = chunk.get(rel..).and_then(Header::parse) else { break };
            if h.seq < seq || h.seq - seq >= LOOKAHEAD_SEQ_SPAN || h.crc == 0 && h.len == 0 {
                continue;
            }
            let at = pos + rel as u64;
            if at + h.frame_len() > w.file_len {
                continue;
            }
            if let Ok(f) = frame::decode(w.get(at, h.frame_len())?) {
                if !claims || f.synced_below > seq {
                    return Ok(Some((at, Later { seq: f.seq, synced_below: f.synced_below })));
                }
            }
        }
        if last_start == 0 {
            break;
        }
        pos += last_start as u64;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::encode_header;

    /// A segment starting at `start` holding records `live` then, as a recycled file does, the
    /// stale records `stale` of its previous life.
    fn segment(start: u64, recycled: bool, live: usize, stale: std::ops::Range<u64>) -> File {
        let mut b = encode_header(start, recycled).to_vec();
        for i in 0..live {
            let seq = start + i as u64;
            frame::encode(&mut b, seq, true, seq, &[i as u8; 50]);
        }
        for seq in stale {
            frame::encode(&mut b, seq, true, seq, &[0xEE; 50]);
        }
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&b, 0).unwrap();
        f
    }

    fn scan(start: u64, file_len: u64, recycled: bool) -> Scan {
        Scan { start, file_len, complete_below: 0, synced_below: 0, recycled, claims: true }
    }

    #[test]
    fn stale_records_end_a_recycled_segment() {
        let f = segment(100, true, 3, 5..9);
        let len = f.metadata().unwrap().len();
        let tail = scan_tail(&f, Path::new("seg"), scan(100, len, true)).unwrap();
        assert_eq!(tail.offsets.len(), 3);
        assert_eq!(tail.data_end, SEGMENT_HEADER_LEN as u64 + 3 * 70);
        assert_eq!(tail.cut, None);
    }

    #[test]
    fn stale_looking_records_in_a_segment_not_recycled_are_corruption() {
        let f = segment(100, false, 3, 5..9);
        let len = f.metadata().unwrap().len();
        let err = scan_tail(&f, Path::new("seg"), scan(100, len, false)).unwrap_err();
        assert!(err.to_string().contains("expected record 103"), "{err}");
    }

    /// Only records numbered below the segment's start are stale: a record that jumps ahead is
    /// corruption in a recycled segment too.
    #[test]
    fn a_record_numbered_past_the_expected_one_is_corruption_even_when_recycled() {
        let f = segment(100, true, 3, 200..201);
        let len = f.metadata().unwrap().len();
        let err = scan_tail(&f, Path::new("seg"), scan(100, len, true)).unwrap_err();
        assert!(err.to_string().contains("expected record 103"), "{err}");
    }
}
