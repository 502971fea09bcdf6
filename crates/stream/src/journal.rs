//! The store's journal (optional, [`Options::journal`](crate::Options::journal)): a timber WAL
//! under `<dir>/journal` in which writers make entries durable before any fragment holds them,
//! and the [`Tail`] of each stream: its journaled entries that no recorded fragment holds yet,
//! readable from memory.
//!
//! With a journal, an entry is acknowledged once the journal record holding it is durable (by
//! the journal's sync mode); writers cut fragments from their tail later, by size or age, and
//! record them as without a journal. A journal record is needed until recorded fragments hold
//! all its entries (or, for a truncation record, until the truncation is recorded); the journal
//! is truncated up to the oldest record any tail still needs. At open, whatever the journal
//! holds beyond the recorded fragments is written out as fragments before the store is used.
//!
//! Invariants: per stream, journal records hold entries in id order without gaps from the
//! stream's recorded end (a writer appends under its stream's tail lock, only while its epoch is
//! the tail's, and only at the tail's end); a record is released only after the metadata write
//! that makes it unneeded is synced.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use timber_wal::{SyncMode, Wal};

use crate::error::{Error, Result};

const ENTRIES: u8 = 1;
const TRUNCATE: u8 = 2;
/// Size of one journal segment file.
const SEGMENT_BYTES: u64 = 16 << 20;

/// When journaled entries are durable (and acknowledged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Journal {
    /// No journal (the default): an entry is acknowledged once the fragment holding it is
    /// written and recorded.
    #[default]
    Off,
    /// An entry is acknowledged once its journal record is synced; concurrent writers share one
    /// `fdatasync` (group commit).
    Always,
    /// An entry is acknowledged once its journal record is handed to the operating system (it
    /// survives the process being killed); the journal is synced every interval, so a power
    /// loss may lose the last interval's entries.
    Interval(Duration),
    /// As `Interval`, but the journal is synced only when the store closes or a journal segment
    /// fills.
    Manual,
}

/// A decoded journal record.
#[derive(Debug)]
pub(crate) enum Record {
    /// Entries `first ..` of a stream.
    Entries { stream: u64, first: u64, entries: Vec<Bytes> },
    /// The stream was truncated below `before`.
    Truncate { stream: u64, before: u64 },
}

/// The journal WAL.
#[derive(Debug)]
pub(crate) struct JournalLog {
    wal: Wal,
    /// Appends must be synced before they are acknowledged.
    synced: bool,
    /// Where the journal was last truncated to.
    released: Mutex<u64>,
}

fn corrupt(seq: u64, reason: &str) -> Error {
    Error::Corrupt { object: format!("stream journal record {seq}"), reason: reason.to_string() }
}

fn wal_error(e: timber_wal::Error) -> Error {
    Error::Journal(e)
}

impl JournalLog {
    /// Opens (creating) the journal in `dir`.
    pub(crate) fn open(dir: &Path, mode: Journal) -> Result<JournalLog> {
        let sync = match mode {
            Journal::Interval(d) => SyncMode::Interval(d),
            _ => SyncMode::Manual,
        };
        // Acknowledged entries must survive a crash of the process: without syncs, each append
        // goes to the OS at once. With them (`Always`), nothing is acknowledged before the sync,
        // which writes the buffer itself; appending through the WAL's map instead cost a map and
        // an unmap of its window per sync.
        let write_buffer = if mode == Journal::Always { 64 << 10 } else { 0 };
        let opts = timber_wal::Options::default()
            .sync(sync)
            .write_buffer(write_buffer)
            .segment_capacity(SEGMENT_BYTES)
            .oversized_records(true)
            .bytes_per_sync(Some(1 << 20))
            .name("stream-journal");
        let wal = Wal::open(dir, opts).map_err(wal_error)?;
        let first = wal.first_seq();
        Ok(JournalLog { wal, synced: mode == Journal::Always, released: Mutex::new(first) })
    }

    /// Whether acknowledging needs [`JournalLog::sync`] after the append.
    pub(crate) fn synced(&self) -> bool {
        self.synced
    }

    /// Appends entries `first ..` of `stream`, handed to the operating system; returns the
    /// record's sequence number.
    pub(crate) fn append_entries(&self, stream: u64, first: u64, entries: &[Bytes]) -> Result<u64> {
        let len: usize = entries.iter().map(|e| 4 + e.len()).sum();
        let mut rec = BytesMut::with_capacity(21 + len);
        rec.extend_from_slice(&[ENTRIES]);
        rec.extend_from_slice(&stream.to_le_bytes());
        rec.extend_from_slice(&first.to_le_bytes());
        rec.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            rec.extend_from_slice(&(e.len() as u32).to_le_bytes());
            rec.extend_from_slice(e);
        }
        self.wal.append(&rec).map_err(wal_error)
    }

    /// Appends a truncation of `stream` below `before`.
    pub(crate) fn append_truncate(&self, stream: u64, before: u64) -> Result<u64> {
        let mut rec = Vec::with_capacity(17);
        rec.push(TRUNCATE);
        rec.extend_from_slice(&stream.to_le_bytes());
        rec.extend_from_slice(&before.to_le_bytes());
        self.wal.append(&rec).map_err(wal_error)
    }

    /// Makes every record appended so far durable (one `fdatasync` for every caller waiting).
    pub(crate) fn sync(&self) -> Result<()> {
        self.wal.sync().map_err(wal_error)
    }

    /// Every live record, in order.
    pub(crate) fn records(&self) -> Result<Vec<(u64, Record)>> {
        let mut out = Vec::new();
        for r in self.wal.iter(..) {
            let (seq, data) = r.map_err(wal_error)?;
            out.push((seq, decode(seq, &data)?));
        }
        Ok(out)
    }

    /// Sequence number of the next record.
    pub(crate) fn next_seq(&self) -> u64 {
        self.wal.next_seq()
    }

    /// Drops records before `seq` once that frees at least a segment's worth of the journal
    /// (truncating persists the new start, so it is not done for every record); `force` drops
    /// them now.
    pub(crate) fn release(&self, seq: u64, force: bool) -> Result<()> {
        let mut released = self.released.lock();
        if seq <= *released {
            return Ok(());
        }
        if !force && self.wal.size_on_disk() < 2 * SEGMENT_BYTES {
            return Ok(());
        }
        self.wal.truncate_front(seq).map_err(wal_error)?;
        *released = seq;
        Ok(())
    }

    /// Syncs and closes the journal.
    pub(crate) fn close(&self) -> Result<()> {
        self.wal.close().map_err(wal_error)
    }
}

fn decode(seq: u64, data: &[u8]) -> Result<Record> {
    let u64_at = |at: usize| -> Result<u64> {
        data.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| corrupt(seq, "record too short"))
    };
    match data.first() {
        Some(&ENTRIES) => {
            let (stream, first) = (u64_at(1)?, u64_at(9)?);
            let count = data
                .get(17..21)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .ok_or_else(|| corrupt(seq, "record too short"))?;
            let body = data.get(21..).ok_or_else(|| corrupt(seq, "record too short"))?;
            let body = Bytes::copy_from_slice(body);
            // Each entry takes at least its 4-byte length: a larger count is not allocated.
            let mut entries = Vec::with_capacity((count as usize).min(body.len() / 4));
            let mut at = 0;
            for _ in 0..count {
                let len = body
                    .get(at..at + 4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                    .ok_or_else(|| corrupt(seq, "entry length runs past the record"))?;
                if at + 4 + len > body.len() {
                    return Err(corrupt(seq, "entry runs past the record"));
                }
                entries.push(body.slice(at + 4..at + 4 + len));
                at += 4 + len;
            }
            if at != body.len() {
                return Err(corrupt(seq, "trailing bytes after the last entry"));
            }
            Ok(Record::Entries { stream, first, entries })
        }
        Some(&TRUNCATE) if data.len() == 17 => {
            Ok(Record::Truncate { stream: u64_at(1)?, before: u64_at(9)? })
        }
        _ => Err(corrupt(seq, "unknown record kind or length")),
    }
}

/// How many of `entries` one fragment takes: at most `max_entries`, ending at the entry that
/// reaches `max_bytes` (the rule by which writers fill fragments).
pub(crate) fn fragment_len<'a>(
    entries: impl Iterator<Item = &'a Bytes>,
    max_entries: usize,
    max_bytes: usize,
) -> usize {
    let (mut n, mut bytes) = (0, 0);
    for e in entries {
        if n >= max_entries || bytes >= max_bytes {
            break;
        }
        n += 1;
        bytes += e.len();
    }
    n
}

/// What a journal record waits for before it is unneeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needed {
    /// Recorded fragments reaching this id.
    Recorded(u64),
    /// A recorded truncation point at or above this id.
    Truncated(u64),
}

/// The journaled entries of one stream that no recorded fragment holds yet, and the journal
/// records they need.
#[derive(Debug)]
pub(crate) struct Tail {
    /// The epoch of the one writer allowed to append.
    pub(crate) epoch: u64,
    /// The stream was deleted: nothing more is appended.
    pub(crate) deleted: bool,
    /// A journaled truncation point above the recorded one (0: none).
    pub(crate) truncate: u64,
    /// Id of `entries[0]`.
    first: u64,
    entries: VecDeque<Bytes>,
    /// The bytes of `entries`: journaled and not yet in a recorded fragment.
    bytes: u64,
    /// The journal records still needed, in journal order: what makes the record unneeded and
    /// its sequence number.
    records: VecDeque<(Needed, u64)>,
}

impl Tail {
    /// An empty tail starting at `first`.
    pub(crate) fn new(first: u64) -> Tail {
        Tail {
            epoch: 0,
            deleted: false,
            truncate: 0,
            first,
            entries: VecDeque::new(),
            bytes: 0,
            records: VecDeque::new(),
        }
    }

    /// One past the last journaled entry.
    pub(crate) fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// Hands the tail to a new writer at `epoch` whose stream's recorded end is `recorded`;
    /// returns the end and the bytes of the entries the new writer must still cut.
    pub(crate) fn adopt(&mut self, epoch: u64, recorded: u64) -> (u64, usize) {
        self.epoch = epoch;
        if self.entries.is_empty() {
            self.first = self.first.max(recorded);
        }
        let bytes = self.range(recorded, self.end(), usize::MAX, usize::MAX);
        (self.end().max(recorded), bytes.iter().map(Bytes::len).sum())
    }

    /// Adds journaled entries at the end.
    pub(crate) fn push(&mut self, entries: Vec<Bytes>, seq: u64) {
        self.bytes += entries.iter().map(|e| e.len() as u64).sum::<u64>();
        self.entries.extend(entries);
        self.records.push_back((Needed::Recorded(self.end()), seq));
    }

    /// Notes a journaled truncation below `before`.
    pub(crate) fn push_truncate(&mut self, before: u64, seq: u64) {
        self.truncate = self.truncate.max(before);
        self.records.push_back((Needed::Truncated(before), seq));
    }

    /// Entries `from ..to`, as many as one fragment cut at `from` takes ([`fragment_len`]).
    pub(crate) fn range(
        &self,
        from: u64,
        to: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Vec<Bytes> {
        let from = from.max(self.first);
        let to = to.min(self.end());
        if from >= to {
            return Vec::new();
        }
        let run = self.entries.range((from - self.first) as usize..(to - self.first) as usize);
        let n = fragment_len(run.clone(), max_entries, max_bytes);
        run.take(n).cloned().collect()
    }

    /// The bytes of the entries it holds (journaled, not yet in a recorded fragment).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the tail holds entry `id`.
    pub(crate) fn holds(&self, id: u64) -> bool {
        id >= self.first && id < self.end()
    }

    /// Forgets the entries and records that the metadata made unneeded: fragments recorded up
    /// to `recorded`, and the truncation point `first` recorded. A truncation journaled after
    /// the caller read [`Tail::truncate`] stays.
    pub(crate) fn release(&mut self, recorded: u64, first: u64) {
        while self.first < recorded {
            let Some(e) = self.entries.pop_front() else { break };
            self.bytes -= e.len() as u64;
            self.first += 1;
        }
        if self.entries.is_empty() {
            self.first = self.first.max(recorded);
        }
        while self.records.front().is_some_and(|&(needed, _)| match needed {
            Needed::Recorded(end) => end <= recorded,
            Needed::Truncated(before) => before <= first,
        }) {
            self.records.pop_front();
        }
        if self.truncate <= first {
            self.truncate = 0;
        }
    }

    /// The oldest journal record this tail still needs.
    pub(crate) fn oldest_record(&self) -> Option<u64> {
        self.records.front().map(|&(_, seq)| seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let j = JournalLog::open(dir.path(), Journal::Always).unwrap();
        let entries = vec![Bytes::from_static(b"a"), Bytes::new(), Bytes::from(vec![7u8; 300])];
        let s1 = j.append_entries(3, 10, &entries).unwrap();
        let s2 = j.append_truncate(3, 12).unwrap();
        j.sync().unwrap();
        let recs = j.records().unwrap();
        assert_eq!(recs.len(), 2);
        match &recs[0] {
            (s, Record::Entries { stream: 3, first: 10, entries: e }) if *s == s1 => {
                assert_eq!(e, &entries)
            }
            r => panic!("unexpected {r:?}"),
        }
        assert!(matches!(recs[1], (s, Record::Truncate { stream: 3, before: 12 }) if s == s2));
        for bad in [&[ENTRIES, 1, 2][..], &[9u8; 17], &[TRUNCATE; 16]] {
            assert!(matches!(decode(5, bad), Err(Error::Corrupt { .. })));
        }
        let mut long = vec![ENTRIES];
        long.extend_from_slice(&[0; 16]);
        long.extend_from_slice(&1u32.to_le_bytes());
        long.extend_from_slice(&100u32.to_le_bytes());
        assert!(matches!(decode(5, &long), Err(Error::Corrupt { .. })));
    }

    /// A record claiming u32::MAX entries in a few bytes is corrupt, without first allocating
    /// room for the entries it claims (over 100 GiB).
    #[test]
    fn a_count_the_record_cannot_hold_is_corrupt() {
        let mut rec = vec![ENTRIES];
        rec.extend_from_slice(&[0; 16]);
        rec.extend_from_slice(&u32::MAX.to_le_bytes());
        rec.extend_from_slice(&1u32.to_le_bytes());
        rec.push(b'x');
        for cut in [rec.len(), 21, 20] {
            let r = decode(5, &rec[..cut]);
            assert!(
                matches!(&r, Err(Error::Corrupt { reason, .. }) if reason.contains("past the record") || reason.contains("too short")),
                "{r:?}"
            );
        }
    }

    #[test]
    fn tail_releases_entries_and_records_up_to_the_recorded_end() {
        let mut t = Tail::new(5);
        assert_eq!(t.adopt(1, 5), (5, 0));
        t.push(vec![Bytes::from_static(b"x"); 3], 100);
        t.push_truncate(7, 101);
        t.push(vec![Bytes::from_static(b"yy"); 2], 102);
        assert_eq!(t.end(), 10);
        assert_eq!(t.bytes(), 7);
        assert!(t.holds(5) && t.holds(9) && !t.holds(10) && !t.holds(4));
        assert_eq!(t.range(6, 10, 2, usize::MAX).len(), 2);
        assert_eq!(t.range(6, 10, 10, 2).len(), 2);
        assert_eq!(t.adopt(2, 8), (10, 4));
        // Entries up to 8 recorded, the truncation to 7 not yet: its record stays, and so does
        // every later one.
        t.release(8, 0);
        assert_eq!((t.first, t.truncate, t.oldest_record()), (8, 7, Some(101)));
        t.release(8, 7);
        assert_eq!((t.first, t.truncate, t.oldest_record()), (8, 0, Some(102)));
        t.release(10, 7);
        assert_eq!((t.end(), t.oldest_record(), t.bytes()), (10, None, 0));
    }
}
