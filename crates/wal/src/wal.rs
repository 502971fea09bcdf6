//! The `Wal`: appends with group commit, rolling of segments, reads, crash-atomic truncation at
//! both ends, and opening (recovery) of a log directory.
//!
//! Invariants:
//! - Sequence numbers are dense: the live records are exactly `first..next`, and the segments on
//!   disk are contiguous (`sealed[i].end() == sealed[i + 1].start`, the last sealed one ends where
//!   the active one starts, and `active.end() == next`).
//! - Every record `< durable` is on stable storage. A roll seals (fsyncs) the old segment before
//!   the next is created, so syncing the active file makes everything up to `next` durable.
//! - A frame's synced claim (see `frame`) is `durable` as it was when the frame was encoded, so
//!   never more than what was on stable storage. `meta.synced_below` is stored only once it is
//!   durable (on close), and `truncate_back` lowers it at its commit point, before any record
//!   below the old value is removed.
//! - After any failed write or fsync the log is poisoned and refuses writes: the page cache may
//!   have dropped the data, so only a reopen (re-reading the disk) tells what is there.
//! - A group commit raises `durable` only after every group commit that took its flush point
//!   earlier has ended without error (they may overlap, see `Options::syncs_in_flight`), and it
//!   fsyncs through a file handle of its own slot: the kernel reports a writeback error once per
//!   open file, so no other fsync can have consumed the error that concerns its records.
//!
//! Lock order: `layout` (read: reads of sealed segments; write: truncations), then leadership of
//! the `gate` (a slot of a group-commit leader, or all of them for a truncation), then `state`,
//! then `readers`.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::ops::{Bound, Range, RangeBounds};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread;
use std::time::Instant;

use bytes::Bytes;
use lru::LruCache;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::frame;
use crate::mapped::Mapped;
use crate::meta::{Meta, META_FILE, META_TMP};
use crate::metrics::Metrics;
use crate::options::{Options, SyncMode};
use crate::recovery::{scan_tail, Scan};
use crate::segment::{
    self, decode_run, encode_seal, open_options_rw, preallocate_tail, read_index, sync_dir, Sealed,
    SegmentReader, INDEX_ENTRY_LEN, SEGMENT_HEADER_LEN, TRAILER_LEN,
};

const LOCK_FILE: &str = "LOCK";
/// Bytes read at once by iterators.
const READ_RUN_BYTES: u64 = 1 << 20;

/// A write-ahead log in one directory. Cheap to share between threads (`&self` everywhere);
/// closed on drop.
pub struct Wal {
    inner: Arc<Inner>,
    ticker: Mutex<Option<Worker>>,
    preparer: Mutex<Option<Worker>>,
}

/// A background thread that runs until its sender is dropped.
struct Worker {
    tx: mpsc::Sender<()>,
    handle: thread::JoinHandle<()>,
}

impl Worker {
    fn stop(self) {
        drop(self.tx);
        let _ = self.handle.join();
    }
}

struct Inner {
    dir: PathBuf,
    opts: Options,
    layout: RwLock<()>,
    gate: Gate,
    state: Mutex<State>,
    /// Every record with a smaller sequence number is durable.
    durable: AtomicU64,
    poison: OnceLock<String>,
    closed: AtomicBool,
    readers: Mutex<LruCache<u64, Arc<SegmentReader>>>,
    lock_file: Mutex<Option<File>>,
    /// The files ready to become the next segment, signalled when a fill of the zero-filled one
    /// ends, and the way to ask the preparer for another.
    spare: Mutex<Spares>,
    spare_filled: Condvar,
    want_spare: Mutex<Option<mpsc::Sender<()>>>,
    /// Asks the `Interval` sync thread for a sync now (`bytes_per_sync`).
    kick: Mutex<Option<mpsc::Sender<()>>>,
    metrics: Metrics,
    /// Makes the next fsync fail, to test poisoning.
    #[cfg(test)]
    fail_next_sync: AtomicBool,
    /// Runs after a group commit's fsync with its ticket; an error counts as a failed fsync.
    #[cfg(test)]
    after_sync: Mutex<Option<SyncHook>>,
}

#[cfg(test)]
type SyncHook = Arc<dyn Fn(u64) -> Result<()> + Send + Sync>;

/// Files ready to become the next segment: segments that truncation dropped, recycled, and
/// when there is none, one that the preparer thread fills with zeros while appends go on.
struct Spares {
    recycled: VecDeque<(File, PathBuf)>,
    zeroed: Zeroed,
}

enum Zeroed {
    None,
    Filling,
    Ready(File),
}

/// Dropped segments kept for reuse at most; more are deleted. One is what a log that drops a
/// segment at a time needs; each one kept is a segment of disk space beyond the live records.
const MAX_RECYCLED: usize = 1;

struct State {
    /// What the meta file holds; `meta.first_seq` is the first live sequence number.
    meta: Meta,
    next: u64,
    sealed: VecDeque<Sealed>,
    sealed_bytes: u64,
    active: Active,
    /// Bytes appended since the last sync, and whether the sync thread was asked for one.
    unsynced: u64,
    kicked: bool,
    /// Whether the preparer was asked for the spare that will follow the active segment. It is
    /// asked when a roll used the previous one, or, for the first segment after open, once that
    /// is half full, so that a fresh log does not write a second segment of zeros while its
    /// first writes wait on the disk.
    spare_asked: bool,
}

/// The segment being appended to.
struct Active {
    start: u64,
    path: PathBuf,
    file: File,
    /// One handle of the file per sync slot (`Options::syncs_in_flight`), each opened on its
    /// own: the kernel reports a failed writeback once per open file, so a sync that shared a
    /// handle with another could miss the error that the other consumed, and call lost records
    /// durable.
    sync_handles: Vec<Arc<File>>,
    /// Frame offsets of its records.
    offsets: Vec<u32>,
    /// Bytes of the file that hold the header and records; records after that are in `buf`.
    written: u64,
    buf: Vec<u8>,
    /// The map that `flush` copies `buf` through, inside the file's preallocated extent.
    map: Mapped,
    /// The file is a recycled segment: stale records follow the written ones, so every flush
    /// also writes a frame header of zeros after its records, which recovery reads as the end.
    recycled: bool,
}

impl Active {
    /// An active segment whose records end at `written`. When segments are preallocated and
    /// not every append is synced, flushes not followed by a sync copy records into the file's
    /// preallocated extent through a shared map.
    fn new(
        start: u64,
        path: PathBuf,
        file: File,
        offsets: Vec<u32>,
        written: u64,
        opts: &Options,
    ) -> Result<Active> {
        let sync_handles = (0..opts.syncs_in_flight)
            .map(|_| File::open(&path).map(Arc::new).map_err(|e| Error::io("open", &path, e)))
            .collect::<Result<_>>()?;
        Ok(Active {
            start,
            path,
            file,
            sync_handles,
            offsets,
            written,
            buf: Vec::new(),
            map: Mapped::new(maps(opts)),
            recycled: false,
        })
    }

    fn end(&self) -> u64 {
        self.start + self.offsets.len() as u64
    }

    fn data_len(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// Size of the file once sealed with `frames` more bytes of records, `records` more of them.
    fn sealed_len(&self, frames: u64, records: u64) -> u64 {
        self.data_len()
            + frames
            + (self.offsets.len() as u64 + records) * INDEX_ENTRY_LEN
            + TRAILER_LEN as u64
    }

    /// Hands buffered records to the operating system: through the map when `map` (a flush that
    /// no fsync follows right away), else with `pwrite`. On ext4 an `fdatasync` right after writes
    /// through a shared map took 432 µs against 60 µs after `pwrite` in a C test (the write faults
    /// join the journal's running transaction, so the fsync commits it): flushes that precede a
    /// sync use `pwrite`, and unmap the window (see `Mapped::release`).
    fn flush(&mut self, map: bool) -> Result<()> {
        if !map {
            // An fsync follows: nothing of the file stays mapped while it is written back.
            self.map.release();
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let len = self.buf.len();
        if self.recycled {
            self.buf.extend_from_slice(&[0; frame::HEADER_LEN]);
        }
        let mapped = if map {
            self.map.write_at(&self.file, &self.path, &self.buf, self.written)
        } else {
            0
        };
        if mapped < self.buf.len() {
            self.file
                .write_all_at(&self.buf[mapped..], self.written + mapped as u64)
                .map_err(|e| Error::io("write", &self.path, e))?;
        }
        self.written += len as u64;
        self.buf.clear();
        Ok(())
    }

    fn read_run(&self, from: u64, until: u64, max_bytes: u64) -> Result<Vec<(u64, Bytes)>> {
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
    fn cut(&mut self, i: usize, off: u64, opts: &Options) -> Result<()> {
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

impl State {
    fn first(&self) -> u64 {
        self.meta.first_seq
    }

    fn store_meta(&mut self, meta: Meta, dir: &Path, opts: &Options) -> Result<()> {
        meta.store(dir, opts.file_mode)?;
        self.meta = meta;
        Ok(())
    }

    /// `truncate_back` made crash-atomic: the intent is persisted first and redone by recovery.
    fn truncate_back(&mut self, seq: u64, dir: &Path, opts: &Options) -> Result<()> {
        let meta = Meta {
            cut_from: Some(seq),
            complete_below: seq,
            synced_below: self.meta.synced_below.min(seq),
            ..self.meta
        };
        self.store_meta(meta, dir, opts)?;
        self.cut_back(seq, dir, opts)?;
        self.store_meta(Meta { cut_from: None, ..meta }, dir, opts)
    }

    fn used(&self) -> u64 {
        self.sealed_bytes + self.active.data_len()
    }

    /// The sealed segment holding `seq`, which must be below the active segment.
    fn sealed_holding(&self, seq: u64) -> usize {
        self.sealed.partition_point(|s| s.end() <= seq)
    }

    /// Drops `seq` and every record after it (`first <= seq < next`), segment files included.
    fn cut_back(&mut self, seq: u64, dir: &Path, opts: &Options) -> Result<()> {
        if seq < self.active.start {
            let k = self.sealed_holding(seq);
            remove_file(&self.active.path)?;
            while self.sealed.len() > k + 1 {
                let s = self.sealed.pop_back().expect("len > k + 1");
                remove_file(&s.path)?;
            }
            sync_dir(dir)?;
            let seg = self.sealed.pop_back().expect("seq lies in a sealed segment");
            self.active = reopen_sealed(&seg, opts)?;
        }
        let i = (seq - self.active.start) as usize;
        let off = u64::from(self.active.offsets[i]);
        self.active.cut(i, off, opts)?;
        self.next = seq;
        self.sealed_bytes = self.sealed.iter().map(|s| s.file_len).sum();
        Ok(())
    }
}

/// Turns a sealed segment back into an appendable one (its trailer is cut by the caller's `cut`).
fn reopen_sealed(seg: &Sealed, opts: &Options) -> Result<Active> {
    let file = open_options_rw(opts.file_mode)
        .open(&seg.path)
        .map_err(|e| Error::io("open", &seg.path, e))?;
    let segment::Inspected { file_len, trailer, .. } = segment::inspect(&seg.path, seg.start)?;
    let trailer = trailer.ok_or_else(|| {
        Error::corrupt(
            &seg.path,
            file_len.saturating_sub(TRAILER_LEN as u64),
            "sealed segment lost its trailer",
        )
    })?;
    let index = read_index(&file, &seg.path, &trailer)?;
    Active::new(seg.start, seg.path.clone(), file, index, trailer.data_end, opts)
}

/// Whether appends to active segments go through a shared map: when segments are preallocated,
/// and not in `SyncMode::Always`, where every flush is followed by an fsync.
fn maps(opts: &Options) -> bool {
    opts.preallocate && opts.sync != SyncMode::Always
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}

impl Inner {
    fn check_writable(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        match self.poison.get() {
            Some(cause) => Err(Error::Poisoned { cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Poisons the log if `r` is an error: after a failed write or sync nothing is known about
    /// what reached the disk.
    fn poisoning<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if self.poison.set(e.to_string()).is_ok() {
                tracing::error!(dir = %self.dir.display(), error = %e, "WAL poisoned: refusing further writes");
            }
        }
        r
    }

    fn append<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<Range<u64>> {
        let mut st = self.state.lock();
        self.check_writable()?;
        let n = records.len() as u64;
        if n == 0 {
            return Ok(st.next..st.next);
        }
        let mut frames = 0u64;
        for r in records {
            let len = r.as_ref().len();
            if len > u32::MAX as usize {
                return Err(Error::InvalidParam(format!("record of {len} bytes exceeds 4 GiB")));
            }
            frames += frame::frame_len(len);
        }
        let needed = frames + n * INDEX_ENTRY_LEN;
        let capacity = self.opts.segment_capacity;
        let overhead = (SEGMENT_HEADER_LEN + TRAILER_LEN) as u64;
        let limit = if self.opts.oversized { u64::from(u32::MAX) } else { capacity };
        if needed + overhead > limit {
            return Err(Error::InvalidParam(format!(
                "{} of {needed} bytes does not fit in a segment of {limit} bytes",
                if n == 1 { "record" } else { "batch" },
            )));
        }
        if let Some(limit) = self.opts.max_size {
            let used = st.used();
            if used + needed > limit {
                return Err(Error::Full { used, needed, limit });
            }
        }
        // An oversized batch goes into an empty segment, which grows past the capacity.
        if st.active.sealed_len(frames, n) > capacity && !st.active.offsets.is_empty() {
            let r = self.roll(&mut st);
            self.poisoning(r)?;
        }
        let first = st.next;
        // Each frame records how far the log was durable (see `frame`): recovery tells damage to
        // synced records from a torn write by it.
        let synced = self.durable.load(Ordering::Acquire);
        let active = &mut st.active;
        for (i, r) in records.iter().enumerate() {
            let off = active.data_len();
            active.offsets.push(u32::try_from(off).expect("segment capacity < 4 GiB"));
            let seq = first + i as u64;
            frame::encode(&mut active.buf, seq, i as u64 == n - 1, synced, r.as_ref());
        }
        if active.buf.len() >= self.opts.write_buffer {
            let r = active.flush(true);
            self.poisoning(r)?;
        }
        st.next += n;
        if !st.spare_asked && st.active.data_len() >= capacity / 2 {
            self.ask_spare(&mut st);
        }
        if let Some(limit) = self.opts.bytes_per_sync {
            st.unsynced += frames;
            if st.unsynced >= limit && !st.kicked {
                st.kicked = true;
                if let Some(tx) = self.kick.lock().as_ref() {
                    let _ = tx.send(());
                }
            }
        }
        self.metrics.appends.increment(n);
        self.metrics.append_bytes.increment(frames);
        Ok(first..first + n)
    }

    /// Seals the active segment (index, trailer, fsync) and starts the next one.
    fn roll(&self, st: &mut State) -> Result<()> {
        let a = &mut st.active;
        a.flush(false)?;
        let data_end = a.data_len();
        a.map.unmap();
        a.file.set_len(data_end).map_err(|e| Error::io("truncate", &a.path, e))?;
        let seal = encode_seal(&a.offsets, data_end);
        a.file.write_all_at(&seal, data_end).map_err(|e| Error::io("write", &a.path, e))?;
        self.fsync(&a.file, &a.path)?;
        let end = a.end();
        self.durable.fetch_max(end, Ordering::AcqRel);
        self.gate.wake_covered(end);
        let sealed = Sealed {
            start: a.start,
            count: a.offsets.len() as u64,
            path: a.path.clone(),
            file_len: data_end + seal.len() as u64,
        };
        let active = self.create_segment(end)?;
        st.sealed_bytes += sealed.file_len;
        st.sealed.push_back(sealed);
        st.active = active;
        // A log that filled one segment is likely to fill the next: its spare gets the whole
        // segment's time to be written (asked at half of it, unsynced 4 KiB appends ran at half
        // their speed, every roll waiting for the rest of a fill).
        self.ask_spare(st);
        self.metrics.segments_sealed.increment(1);
        Ok(())
    }

    fn ask_spare(&self, st: &mut State) {
        st.spare_asked = true;
        if let Some(tx) = self.want_spare.lock().as_ref() {
            let _ = tx.send(());
        }
    }

    /// Creates the empty segment starting at `start`, to append to, from a recycled segment,
    /// else from the zero-filled spare. A spare still being filled is waited for: the rest of
    /// its fill is shorter than a whole one here, and two fills at once would share the disk.
    fn create_segment(&self, start: u64) -> Result<Active> {
        // Held until the spare is renamed, so the preparer cannot create a new file under its name.
        let mut spares = self.spare.lock();
        let (spare, recycled) = match spares.recycled.pop_front() {
            Some(r) => (Some(r), true),
            None => {
                while matches!(spares.zeroed, Zeroed::Filling) {
                    self.spare_filled.wait(&mut spares);
                }
                match std::mem::replace(&mut spares.zeroed, Zeroed::None) {
                    Zeroed::Ready(file) => {
                        (Some((file, self.dir.join(segment::SPARE_FILE))), false)
                    }
                    Zeroed::None | Zeroed::Filling => (None, false),
                }
            }
        };
        let (file, path) = segment::create(
            &self.dir,
            start,
            self.opts.segment_capacity,
            self.opts.preallocate,
            self.opts.file_mode,
            spare,
            recycled,
        )?;
        let mut active =
            Active::new(start, path, file, Vec::new(), SEGMENT_HEADER_LEN as u64, &self.opts)?;
        active.recycled = recycled;
        Ok(active)
    }

    fn fsync(&self, file: &File, path: &Path) -> Result<()> {
        #[cfg(test)]
        if self.fail_next_sync.swap(false, Ordering::AcqRel) {
            return Err(Error::io("fdatasync", path, std::io::Error::other("injected failure")));
        }
        let t = Instant::now();
        file.sync_data().map_err(|e| Error::io("fdatasync", path, e))?;
        let took = t.elapsed();
        self.gate.last_fsync_ns.store(took.as_nanos() as u64, Ordering::Relaxed);
        self.metrics.fsyncs.increment(1);
        self.metrics.fsync_seconds.record(took.as_secs_f64());
        Ok(())
    }

    /// Makes every record below `target` durable. Callers lead in turn, at most
    /// `syncs_in_flight` at once: a leader writes out and fsyncs everything appended so far,
    /// while the others sleep and wake when it is done, most finding their records durable
    /// already (group commit).
    fn wait_durable(&self, target: u64) -> Result<()> {
        let covered = || self.durable.load(Ordering::Acquire) >= target;
        if covered() {
            return Ok(());
        }
        self.gate.arrivals.fetch_add(1, Ordering::AcqRel);
        let Some(leader) = self.gate.lead_unless(target, covered) else { return Ok(()) };
        let slot = leader.slot.expect("a sync leader holds one slot");
        if let Some(cause) = self.poison.get() {
            return Err(Error::Poisoned { cause: cause.clone() });
        }
        self.gate.gather();
        let (file, path, upto, ticket) = {
            let mut st = self.state.lock();
            let r = st.active.flush(false);
            self.poisoning(r)?;
            st.unsynced = 0;
            st.kicked = false;
            let ticket = self.gate.tickets.fetch_add(1, Ordering::AcqRel);
            // A leader that starts while this sync runs gathers the appenders that arrive after
            // this point.
            self.gate
                .released_at
                .store(self.gate.arrivals.load(Ordering::Acquire), Ordering::Release);
            let file = st.active.sync_handles[slot as usize].clone();
            (file, st.active.path.clone(), st.next, ticket)
        };
        let r = self.fsync(&file, &path);
        #[cfg(test)]
        let hook = self.after_sync.lock().clone();
        #[cfg(test)]
        let r = match (r, hook) {
            (Ok(()), Some(hook)) => hook(ticket),
            (r, _) => r,
        };
        let r = self.poisoning(r);
        // Publish in ticket order: an earlier sync still under way may yet fail, and then the
        // records before `upto` that only it covered would be lost.
        self.gate.wait_turn(ticket);
        let poisoned = self.poison.get().cloned();
        self.gate.end_turn(ticket);
        r?;
        if let Some(cause) = poisoned {
            return Err(Error::Poisoned { cause });
        }
        let before = self.durable.fetch_max(upto, Ordering::AcqRel);
        self.metrics.group_records.record(upto.saturating_sub(before) as f64);
        leader.finish(upto.max(before));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.state.lock();
        self.check_writable()?;
        let r = st.active.flush(true);
        self.poisoning(r)
    }

    fn sync(&self) -> Result<()> {
        self.check_writable()?;
        let next = self.state.lock().next;
        self.wait_durable(next)
    }

    fn reader(&self, seg: &Sealed) -> Result<Arc<SegmentReader>> {
        if let Some(r) = self.readers.lock().get(&seg.start) {
            return Ok(r.clone());
        }
        let r = Arc::new(SegmentReader::open(seg)?);
        self.readers.lock().put(seg.start, r.clone());
        Ok(r)
    }

    /// Reads records `from..until` (at least one, about `max_bytes` at most).
    fn read_run(&self, from: u64, until: u64, max_bytes: u64) -> Result<Vec<(u64, Bytes)>> {
        let _layout = self.layout.read();
        let seg = {
            let st = self.state.lock();
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if from < st.first() || from >= st.next {
                return Err(Error::NotFound { seq: from, first: st.first(), next: st.next });
            }
            if from >= st.active.start {
                return st.active.read_run(from, until, max_bytes);
            }
            st.sealed[st.sealed_holding(from)].clone()
        };
        self.reader(&seg)?.read_run(from, until, max_bytes)
    }

    fn truncate_front(&self, seq: u64) -> Result<()> {
        self.check_writable()?;
        let _layout = self.layout.write();
        let _leader = self.gate.lead();
        let mut st = self.state.lock();
        if seq <= st.first() {
            return Ok(());
        }
        let r = self.drop_front(&mut st, seq);
        self.poisoning(r)
    }

    fn drop_front(&self, st: &mut State, seq: u64) -> Result<()> {
        st.store_meta(Meta { first_seq: seq, ..st.meta }, &self.dir, &self.opts)?;
        if seq > st.next {
            // Nothing live is left: the log restarts empty at `seq`. Old segments go first, from
            // the front, so that a crash leaves a contiguous suffix that recovery drops.
            while let Some(s) = st.sealed.pop_front() {
                self.discard(&s)?;
            }
            st.sealed_bytes = 0;
            self.readers.lock().clear();
            remove_file(&st.active.path)?;
            sync_dir(&self.dir)?;
            st.active = self.create_segment(seq)?;
            st.next = seq;
            self.durable.fetch_max(seq, Ordering::AcqRel);
        }
        let mut removed = false;
        while st.sealed.front().is_some_and(|s| s.end() <= seq) {
            let s = st.sealed.pop_front().expect("front exists");
            self.readers.lock().pop(&s.start);
            self.discard(&s)?;
            st.sealed_bytes -= s.file_len;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Removes a sealed segment that truncation dropped, or keeps it for reuse as a later
    /// segment: its blocks are written already, so reusing it costs no zero-filling. Callers hold
    /// the `layout` lock for writing, so no read of the segment is under way (reads copy what
    /// they return).
    fn discard(&self, seg: &Sealed) -> Result<()> {
        let opts = &self.opts;
        if opts.recycle && opts.preallocate && seg.file_len <= opts.segment_capacity {
            let mut spares = self.spare.lock();
            if spares.recycled.len() < MAX_RECYCLED {
                let recycled =
                    segment::recycle(&self.dir, seg, opts.segment_capacity, opts.file_mode)?;
                spares.recycled.push_back(recycled);
                self.metrics.segments_recycled.increment(1);
                return Ok(());
            }
        }
        remove_file(&seg.path)
    }

    /// Stores in the meta file how far the log is durable, once nothing more is appended (on
    /// close): the last records synced are then known to recovery as synced even though no later
    /// frame claims it. Only when the tail segment holds records the meta file does not cover.
    fn record_synced(&self) -> Result<()> {
        let mut st = self.state.lock();
        let durable = self.durable.load(Ordering::Acquire).min(st.next);
        if durable <= st.meta.synced_below.max(st.active.start) {
            return Ok(());
        }
        let meta = Meta { synced_below: durable, ..st.meta };
        let r = st.store_meta(meta, &self.dir, &self.opts);
        self.poisoning(r)
    }

    fn truncate_back(&self, seq: u64) -> Result<()> {
        self.check_writable()?;
        let _layout = self.layout.write();
        let _leader = self.gate.lead();
        let mut st = self.state.lock();
        if seq >= st.next {
            return Ok(());
        }
        if seq < st.first() {
            return Err(Error::InvalidParam(format!(
                "cannot truncate back to {seq}: records before {} were truncated from the front",
                st.first()
            )));
        }
        let r = st.truncate_back(seq, &self.dir, &self.opts);
        self.readers.lock().clear();
        self.durable.fetch_min(seq, Ordering::AcqRel);
        self.poisoning(r)
    }
}

impl Wal {
    /// Opens the log in `dir`, creating the directory if needed, locking it, and recovering its
    /// contents (see the crate docs and `docs/format/wal.md` for the recovery policy).
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Wal> {
        opts.validate()?;
        let dir = dir.as_ref().to_path_buf();
        DirBuilder::new()
            .recursive(true)
            .mode(opts.dir_mode)
            .create(&dir)
            .map_err(|e| Error::io("create directory", &dir, e))?;
        let lock_file = lock_dir(&dir, opts.file_mode)?;
        let state = recover(&dir, &opts)?;
        let durable = AtomicU64::new(state.next);
        let gate = Gate::new(opts.syncs_in_flight);
        let inner = Arc::new(Inner {
            metrics: Metrics::new(&opts.name),
            readers: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(opts.reader_cache).expect("validated non-zero"),
            )),
            dir,
            opts,
            layout: RwLock::new(()),
            gate,
            state: Mutex::new(state),
            durable,
            poison: OnceLock::new(),
            closed: AtomicBool::new(false),
            lock_file: Mutex::new(Some(lock_file)),
            spare: Mutex::new(Spares { recycled: VecDeque::new(), zeroed: Zeroed::None }),
            spare_filled: Condvar::new(),
            want_spare: Mutex::new(None),
            kick: Mutex::new(None),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
            #[cfg(test)]
            after_sync: Mutex::new(None),
        });
        let ticker = match inner.opts.sync {
            SyncMode::Interval(every) => Some(spawn_ticker(inner.clone(), every)?),
            _ => None,
        };
        let preparer =
            if inner.opts.preallocate { Some(spawn_preparer(inner.clone())?) } else { None };
        Ok(Wal { inner, ticker: Mutex::new(ticker), preparer: Mutex::new(preparer) })
    }

    /// Appends one record and returns its sequence number. In `SyncMode::Always` it returns once
    /// the record is durable.
    pub fn append(&self, record: &[u8]) -> Result<u64> {
        self.append_batch(&[record]).map(|r| r.start)
    }

    /// Appends records atomically: after a crash either all of them are present or none is. The
    /// batch must fit in one segment. Returns the range of their sequence numbers.
    pub fn append_batch<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<Range<u64>> {
        let range = self.inner.append(records)?;
        if self.inner.opts.sync == SyncMode::Always {
            self.inner.wait_durable(range.end)?;
        }
        Ok(range)
    }

    /// The record with sequence number `seq`.
    pub fn read(&self, seq: u64) -> Result<Bytes> {
        let mut run = self.inner.read_run(seq, seq.saturating_add(1), 0)?;
        Ok(run.pop().expect("a run holds at least one record").1)
    }

    /// Iterates over the live records whose sequence numbers lie in `range`, as they are when the
    /// iterator is created. Records truncated while iterating end it with `Error::NotFound`.
    pub fn iter(&self, range: impl RangeBounds<u64>) -> Iter {
        let (first, next) = {
            let st = self.inner.state.lock();
            (st.first(), st.next)
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        Iter {
            inner: self.inner.clone(),
            next: start.max(first),
            end: end.min(next),
            buf: VecDeque::new(),
            done: false,
        }
    }

    /// First live sequence number (equal to `next_seq` when the log is empty).
    pub fn first_seq(&self) -> u64 {
        self.inner.state.lock().first()
    }

    /// Sequence number of the last live record, if any.
    pub fn last_seq(&self) -> Option<u64> {
        let st = self.inner.state.lock();
        (st.next > st.first()).then(|| st.next - 1)
    }

    /// Sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.inner.state.lock().next
    }

    /// Number of live records.
    pub fn len(&self) -> u64 {
        let st = self.inner.state.lock();
        st.next - st.first()
    }

    /// Whether the log holds no live record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the log's segments take on disk, not counting preallocated space.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.state.lock().used()
    }

    /// Drops every record before `seq`. Segments holding only such records are deleted; the new
    /// first sequence number is persisted. With `seq` past the end the log becomes empty and the
    /// next append gets `seq`. Atomic under a crash.
    pub fn truncate_front(&self, seq: u64) -> Result<()> {
        self.inner.truncate_front(seq)
    }

    /// Drops `seq` and every record after it; the next append gets `seq`. Atomic under a crash.
    pub fn truncate_back(&self, seq: u64) -> Result<()> {
        self.inner.truncate_back(seq)
    }

    /// Hands every record appended so far to the operating system without waiting for the disk:
    /// they survive a crash of this process, not of the machine.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Makes every record appended so far durable.
    pub fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    /// Syncs what was written, stops the background sync thread and releases the directory lock.
    /// Later calls on this `Wal` fail with `Error::Closed`. Also done on drop.
    pub fn close(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        inner.kick.lock().take();
        if let Some(t) = self.ticker.lock().take() {
            t.stop();
        }
        inner.want_spare.lock().take();
        if let Some(p) = self.preparer.lock().take() {
            p.stop();
        }
        let mut spares = inner.spare.lock();
        if let Zeroed::Ready(_) = std::mem::replace(&mut spares.zeroed, Zeroed::None) {
            let _ = fs::remove_file(inner.dir.join(segment::SPARE_FILE));
        }
        for (_, path) in spares.recycled.drain(..) {
            let _ = fs::remove_file(path);
        }
        drop(spares);
        let r = if inner.poison.get().is_some() {
            Ok(())
        } else {
            let next = inner.state.lock().next;
            inner.wait_durable(next).and_then(|()| inner.record_synced())
        };
        inner.readers.lock().clear();
        inner.lock_file.lock().take();
        r
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(dir = %self.inner.dir.display(), error = %e, "closing WAL failed");
        }
    }
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state.lock();
        f.debug_struct("Wal")
            .field("dir", &self.inner.dir)
            .field("first", &st.first())
            .field("next", &st.next)
            .field("segments", &(st.sealed.len() + 1))
            .finish()
    }
}

/// The longest a group-commit leader waits for released appenders to come back (`Gate::gather`).
const MAX_GATHER_NS: u64 = 500_000;

/// `Gate::slots` when a truncation holds the gate: every slot, and more.
const EXCLUSIVE: u32 = u32::MAX;

/// Leadership for group commit: at most `Options::syncs_in_flight` threads at a time sync, each
/// in a slot of its own, or one thread truncates, holding every slot. The others park with the
/// sequence number they wait for. A leader that made records durable unparks, without a lock
/// handoff, the waiters it covered and one other (who may lead next); the rest stay parked, so a
/// sync does not wake every appender that arrived during it only to park it again. A leader that
/// ends otherwise (a truncation, an error) unparks everyone. A woken thread re-checks whether it
/// still needs to lead.
///
/// Syncs that overlap publish in the order they took their flush point (`ticket`): a sync that
/// ends first waits for the earlier ones, and publishes nothing if one of them failed (the log
/// is poisoned then), so the durable point never passes a record whose sync failed.
struct Gate {
    /// Bit `i` set: slot `i` syncs. `EXCLUSIVE`: a truncation holds the gate.
    slots: AtomicU32,
    /// Number of sync slots.
    width: u32,
    /// Calls of `wait_durable` so far.
    arrivals: AtomicU64,
    /// `arrivals` when the last leader finished, and how many threads it released then (those
    /// whose records it made durable, and itself).
    released_at: AtomicU64,
    released: AtomicU64,
    /// How long the last fsync took, in nanoseconds.
    last_fsync_ns: AtomicU64,
    /// Tickets handed out to leaders (under the state lock, with their flush), and the first
    /// ticket whose sync has not ended in order.
    tickets: AtomicU64,
    published: Mutex<u64>,
    published_cv: Condvar,
    /// Parked threads and what they wait for (`u64::MAX`: leadership itself). A thread may
    /// appear twice after a spurious wakeup; that costs an extra unpark, nothing else.
    waiters: Mutex<Vec<(u64, thread::Thread)>>,
}

/// Leadership of the gate: one sync slot (`slot`), or all of them (`None`, a truncation).
struct Leader<'a> {
    gate: &'a Gate,
    slot: Option<u32>,
}

impl Gate {
    fn new(width: u32) -> Gate {
        assert!((1..32).contains(&width), "validated by Options");
        Gate {
            slots: AtomicU32::new(0),
            width,
            arrivals: AtomicU64::new(0),
            released_at: AtomicU64::new(0),
            released: AtomicU64::new(0),
            last_fsync_ns: AtomicU64::new(0),
            tickets: AtomicU64::new(0),
            published: Mutex::new(0),
            published_cv: Condvar::new(),
            waiters: Mutex::new(Vec::new()),
        }
    }

    /// Takes a free sync slot, or with `exclusive` every slot once none is taken.
    fn try_take(&self, exclusive: bool) -> Option<Option<u32>> {
        let mut cur = self.slots.load(Ordering::Acquire);
        loop {
            let (slot, want) = if exclusive {
                if cur != 0 {
                    return None;
                }
                (None, EXCLUSIVE)
            } else {
                let free = (!cur).trailing_zeros();
                if cur == EXCLUSIVE || free >= self.width {
                    return None;
                }
                (Some(free), cur | 1 << free)
            };
            match self.slots.compare_exchange_weak(cur, want, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(slot),
                Err(now) => cur = now,
            }
        }
    }

    fn can_take(&self, exclusive: bool) -> bool {
        let cur = self.slots.load(Ordering::Acquire);
        if exclusive {
            cur == 0
        } else {
            cur != EXCLUSIVE && (!cur).trailing_zeros() < self.width
        }
    }

    /// Waits until this thread may lead a sync, or until `unneeded()` holds (then `None`).
    /// `target` is the durable point that makes it unneeded.
    fn lead_unless(&self, target: u64, unneeded: impl Fn() -> bool) -> Option<Leader<'_>> {
        self.take(target, false, unneeded)
    }

    /// Takes the whole gate, once no sync is under way.
    fn lead(&self) -> Leader<'_> {
        self.take(u64::MAX, true, || false).expect("leadership is always needed")
    }

    fn take(
        &self,
        target: u64,
        exclusive: bool,
        unneeded: impl Fn() -> bool,
    ) -> Option<Leader<'_>> {
        loop {
            if unneeded() {
                return None;
            }
            if let Some(slot) = self.try_take(exclusive) {
                return Some(Leader { gate: self, slot });
            }
            self.waiters.lock().push((target, thread::current()));
            // A leader may have finished between the attempt and the registration; an entry
            // left behind only causes a spurious wakeup later, which the loop absorbs.
            if unneeded() || self.can_take(exclusive) {
                continue;
            }
            thread::park();
        }
    }

    /// Before a leader syncs, gives the threads the previous leader released time to append
    /// again, so that one sync covers them all: without this, the first of them to come back led
    /// a sync of little more than its own record while the rest were still waking, and syncs
    /// alternated between small and large groups (64 threads: 25 records per fdatasync, 50 with
    /// it). Waits until as many appenders arrived as were released, counted from the later of
    /// the last release and the last leader's flush point (so that a leader starting while
    /// another syncs gathers those who arrived after that one's group), for at most half the
    /// last fsync's duration (and never more than `MAX_GATHER_NS`), yielding the CPU meanwhile.
    /// A lone appender, or one whose records another sync covered, never waits.
    fn gather(&self) {
        let expected = self.released.load(Ordering::Acquire);
        if expected <= 1 {
            return;
        }
        let mark = self.released_at.load(Ordering::Acquire);
        let bound = (self.last_fsync_ns.load(Ordering::Relaxed) / 2).min(MAX_GATHER_NS);
        let start = Instant::now();
        while self.arrivals.load(Ordering::Acquire).saturating_sub(mark) < expected
            && (start.elapsed().as_nanos() as u64) < bound
        {
            thread::yield_now();
        }
    }

    /// Waits until every sync with a smaller ticket has ended.
    fn wait_turn(&self, ticket: u64) {
        let mut published = self.published.lock();
        while *published < ticket {
            self.published_cv.wait(&mut published);
        }
    }

    /// Ends the sync with `ticket` (whose turn it is), letting the next one publish.
    fn end_turn(&self, ticket: u64) {
        let mut published = self.published.lock();
        debug_assert_eq!(*published, ticket);
        *published = ticket + 1;
        self.published_cv.notify_all();
    }

    /// Unparks the waiters whose records became durable other than by a leader (a sealed
    /// segment). Everything appended before the seal is covered, so no waiter that a leader
    /// left parked is stranded when the one it woke to lead next finds nothing left to do.
    fn wake_covered(&self, durable: u64) {
        let mut woken = Vec::new();
        self.waiters.lock().retain(|(target, t)| {
            let covered = *target <= durable;
            if covered {
                woken.push(t.clone());
            }
            !covered
        });
        for t in woken {
            t.unpark();
        }
    }
}

impl Leader<'_> {
    fn release(&self) {
        match self.slot {
            Some(slot) => self.gate.slots.fetch_and(!(1 << slot), Ordering::AcqRel),
            None => self.gate.slots.swap(0, Ordering::AcqRel),
        };
    }

    /// Ends a leadership that made everything below `durable` durable: unparks the waiters that
    /// covers and the first of the others, who leads next (or finds its records covered by a
    /// leader that came first, which then wakes the next one the same way).
    fn finish(self, durable: u64) {
        let gate = self.gate;
        self.release();
        std::mem::forget(self);
        let woken = {
            let mut waiters = gate.waiters.lock();
            let all = std::mem::take(&mut *waiters);
            let mut woken = Vec::with_capacity(all.len());
            let mut next_leader = false;
            for (target, t) in all {
                if target <= durable {
                    woken.push(t);
                } else if !next_leader {
                    next_leader = true;
                    woken.push(t);
                } else {
                    waiters.push((target, t));
                }
            }
            // Those it covered, and itself; counted before any of them is unparked.
            let covered = woken.len() - usize::from(next_leader);
            gate.released_at.store(gate.arrivals.load(Ordering::Acquire), Ordering::Release);
            gate.released.store(covered as u64 + 1, Ordering::Release);
            woken
        };
        for t in woken {
            t.unpark();
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.release();
        let waiters = std::mem::take(&mut *self.gate.waiters.lock());
        for (_, t) in waiters {
            t.unpark();
        }
    }
}

/// Starts the thread that keeps a zero-filled spare segment ready, so that a roll need not write
/// a whole segment of zeros while appenders wait.
fn spawn_preparer(inner: Arc<Inner>) -> Result<Worker> {
    let dir = inner.dir.clone();
    let (tx, rx) = mpsc::channel::<()>();
    *inner.want_spare.lock() = Some(tx.clone());
    let handle = thread::Builder::new()
        .name("timber-wal-spare".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                let prepared = segment::prepare_spare(
                    &inner.dir,
                    inner.opts.segment_capacity,
                    inner.opts.file_mode,
                    |create| {
                        let mut spares = inner.spare.lock();
                        if !matches!(spares.zeroed, Zeroed::None)
                            || !spares.recycled.is_empty()
                            || inner.closed.load(Ordering::Acquire)
                        {
                            return None;
                        }
                        let file = create();
                        if file.is_ok() {
                            spares.zeroed = Zeroed::Filling;
                        }
                        Some(file)
                    },
                );
                let Some(prepared) = prepared else { continue };
                let mut spares = inner.spare.lock();
                match prepared {
                    Ok(file) if matches!(spares.zeroed, Zeroed::Filling) => {
                        spares.zeroed = Zeroed::Ready(file)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        spares.zeroed = Zeroed::None;
                        tracing::warn!(error = %e, "preparing a spare WAL segment failed; the next roll creates one itself");
                    }
                }
                inner.spare_filled.notify_all();
            }
        })
        .map_err(|e| Error::io("spawn spare preparer for", &dir, e))?;
    Ok(Worker { tx, handle })
}

fn spawn_ticker(inner: Arc<Inner>, every: std::time::Duration) -> Result<Worker> {
    let dir = inner.dir.clone();
    let (stop, rx) = mpsc::channel::<()>();
    *inner.kick.lock() = Some(stop.clone());
    let handle = thread::Builder::new()
        .name("timber-wal-sync".into())
        .spawn(move || {
            // Wakes every `every`, or early when appends passed `bytes_per_sync`; stops when every
            // sender is gone.
            while !matches!(rx.recv_timeout(every), Err(mpsc::RecvTimeoutError::Disconnected)) {
                if let Err(e) = inner.sync() {
                    if !matches!(e, Error::Closed | Error::Poisoned { .. }) {
                        tracing::error!(error = %e, "background WAL sync failed");
                    }
                }
            }
        })
        .map_err(|e| Error::io("spawn sync thread for", dir, e))?;
    Ok(Worker { tx: stop, handle })
}

fn lock_dir(dir: &Path, mode: u32) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::Locked { dir: dir.to_path_buf() }),
        Err(TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

/// Rebuilds the state of a log from its directory: see `docs/format/wal.md`, "Recovery".
fn recover(dir: &Path, opts: &Options) -> Result<State> {
    let meta = Meta::load(dir)?;
    let mut starts = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") && (name == META_TMP || name.starts_with("wal_")) {
            remove_file(&entry.path())?;
        } else if let Some(start) = segment::parse_file_name(name) {
            starts.push(start);
        }
    }
    starts.sort_unstable();

    let mut sealed = VecDeque::new();
    let mut active = None;
    for (i, &start) in starts.iter().enumerate() {
        let path = dir.join(segment::file_name(start));
        let seg = segment::inspect(&path, start)?;
        let file_len = seg.file_len;
        match seg.trailer {
            Some(t) => sealed.push_back(Sealed { start, count: t.count, path, file_len }),
            None if i + 1 == starts.len() => {
                active = Some(recover_tail(seg, &path, start, opts, &meta)?)
            }
            None => {
                return Err(Error::corrupt(
                    &path,
                    file_len.saturating_sub(TRAILER_LEN as u64),
                    "segment is followed by another but has no valid trailer",
                ))
            }
        }
    }
    check_contiguous(&sealed, active.as_ref())?;

    // Apply the persisted front truncation: whole segments below `first` go (a crash may have
    // left them behind).
    let first = meta.first_seq;
    let mut removed = false;
    while sealed.front().is_some_and(|s| s.end() <= first) && (sealed.len() > 1 || active.is_some())
    {
        let s = sealed.pop_front().expect("front exists");
        remove_file(&s.path)?;
        removed = true;
    }
    if let Some(a) = active.as_ref().filter(|a| a.end() < first) {
        // The log was emptied past its end: it restarts at `first`.
        remove_file(&a.path)?;
        active = None;
        removed = true;
    }
    if sealed.len() == 1 && active.is_none() && sealed[0].end() < first {
        remove_file(&sealed[0].path)?;
        sealed.clear();
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    if let Some((start, path)) =
        sealed.front().map(|s| (s.start, &s.path)).or(active.as_ref().map(|a| (a.start, &a.path)))
    {
        if start > first {
            return Err(Error::corrupt(
                path,
                0,
                format!("log starts at record {first} but its first segment starts at {start}: a segment is missing"),
            ));
        }
    }
    let active = match active {
        Some(a) => a,
        None => {
            let start = sealed.back().map_or(first, |s| s.end().max(first));
            if start < meta.synced_below {
                let (path, at) = sealed
                    .back()
                    .map_or_else(|| (dir.join(META_FILE), 0), |s| (s.path.clone(), s.file_len));
                return Err(Error::corrupt(
                    &path,
                    at,
                    format!(
                        "the log ends at record {start}, but records below {} were durable when \
                         it was last closed: a segment after this one is missing",
                        meta.synced_below
                    ),
                ));
            }
            let (file, path) = segment::create(
                dir,
                start,
                opts.segment_capacity,
                opts.preallocate,
                opts.file_mode,
                None,
                false,
            )?;
            Active::new(start, path, file, Vec::new(), SEGMENT_HEADER_LEN as u64, opts)?
        }
    };
    let mut state = State {
        meta,
        next: active.end(),
        sealed_bytes: sealed.iter().map(|s| s.file_len).sum(),
        sealed,
        active,
        unsynced: 0,
        kicked: false,
        spare_asked: false,
    };
    if let Some(cut) = meta.cut_from {
        // A truncate_back was interrupted: finish it.
        if cut < state.next && cut >= first {
            state.truncate_back(cut, dir, opts)?;
        } else {
            state.store_meta(Meta { cut_from: None, ..meta }, dir, opts)?;
        }
    }
    Ok(state)
}

/// Opens the last, unsealed segment, cuts what recovery discards, and makes the rest durable.
fn recover_tail(
    seg: segment::Inspected,
    path: &Path,
    start: u64,
    opts: &Options,
    meta: &Meta,
) -> Result<Active> {
    let file =
        open_options_rw(opts.file_mode).open(path).map_err(|e| Error::io("open", path, e))?;
    let file_len = seg.file_len;
    let scan = Scan {
        start,
        file_len,
        complete_below: meta.complete_below,
        synced_below: meta.synced_below,
        recycled: seg.header.recycled,
        claims: seg.header.claims,
    };
    let tail = scan_tail(&seg.file, path, scan)?;
    if let Some(reason) = &tail.cut {
        tracing::warn!(segment = %path.display(), offset = tail.data_end, %reason, "cutting the torn tail of the WAL");
        metrics::counter!("timber_wal_torn_tails_cut_total", "wal" => opts.name.clone())
            .increment(1);
    }
    // Whatever follows the good data is discarded for good, so that no stale bytes can be read as
    // records later; the records kept, possibly never synced before the crash, are synced now.
    if file_len > tail.data_end {
        file.set_len(tail.data_end).map_err(|e| Error::io("truncate", path, e))?;
    }
    if opts.preallocate {
        preallocate_tail(&file, path, tail.data_end, opts.segment_capacity)?;
    }
    file.sync_data().map_err(|e| Error::io("fdatasync", path, e))?;
    Active::new(start, path.to_path_buf(), file, tail.offsets, tail.data_end, opts)
}

fn check_contiguous(sealed: &VecDeque<Sealed>, active: Option<&Active>) -> Result<()> {
    let starts =
        sealed.iter().map(|s| (s.start, &s.path)).chain(active.map(|a| (a.start, &a.path)));
    let ends = sealed.iter().map(Sealed::end);
    for ((start, path), prev_end) in starts.skip(1).zip(ends) {
        if start != prev_end {
            return Err(Error::corrupt(
                path,
                0,
                format!("segment starts at record {start} but the one before it ends at {prev_end}: a segment is missing or damaged"),
            ));
        }
    }
    Ok(())
}

/// Iterator over a range of records, from [`Wal::iter`]. Reads about 1 MiB at a time.
pub struct Iter {
    inner: Arc<Inner>,
    next: u64,
    end: u64,
    buf: VecDeque<(u64, Bytes)>,
    done: bool,
}

impl Iterator for Iter {
    type Item = Result<(u64, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(item) = self.buf.pop_front() {
            return Some(Ok(item));
        }
        if self.done || self.next >= self.end {
            return None;
        }
        match self.inner.read_run(self.next, self.end, READ_RUN_BYTES) {
            Ok(run) => {
                self.next = run.last().map_or(self.end, |(s, _)| s + 1);
                self.buf = run.into();
                self.buf.pop_front().map(Ok)
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl fmt::Debug for Iter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter").field("next", &self.next).field("end", &self.end).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_fsync_poisons_writes_but_not_reads() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), Options::default().sync(SyncMode::Always)).unwrap();
        assert_eq!(wal.append(b"kept").unwrap(), 0);
        wal.inner.fail_next_sync.store(true, Ordering::Release);
        let err = wal.append(b"lost").unwrap_err();
        assert!(matches!(err, Error::Io { op: "fdatasync", .. }), "{err}");
        for e in [
            wal.append(b"x").unwrap_err(),
            wal.sync().unwrap_err(),
            wal.truncate_front(1).unwrap_err(),
        ] {
            assert!(matches!(&e, Error::Poisoned { cause } if cause.contains("injected")), "{e}");
        }
        assert_eq!(&wal.read(0).unwrap()[..], b"kept");
        drop(wal);
        let wal = Wal::open(dir.path(), Options::default()).unwrap();
        assert_eq!(&wal.read(0).unwrap()[..], b"kept");
        wal.append(b"after reopen").unwrap();
    }

    /// Two syncs overlap; the first fails after the second has ended. The second must not call
    /// its records durable: the first one's records, below them, may be lost.
    #[test]
    fn a_sync_that_ends_first_waits_for_an_earlier_one_and_fails_with_it() {
        use std::sync::mpsc::channel;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let opts = Options::default().sync(SyncMode::Always).syncs_in_flight(2);
        let wal = Arc::new(Wal::open(dir.path(), opts).unwrap());
        let (first_in, first_in_rx) = channel::<()>();
        let (second_done, second_done_rx) = channel::<()>();
        let (first_in, second_done) = (Mutex::new(first_in), Mutex::new(second_done));
        let second_done_rx = Mutex::new(second_done_rx);
        *wal.inner.after_sync.lock() = Some(Arc::new(move |ticket| {
            if ticket == 0 {
                first_in.lock().send(()).unwrap();
                let ended = second_done_rx.lock().recv_timeout(Duration::from_secs(10));
                assert!(ended.is_ok(), "the second sync never ended");
                Err(Error::io("fdatasync", Path::new("seg"), std::io::Error::other("injected")))
            } else {
                second_done.lock().send(()).unwrap();
                Ok(())
            }
        }));
        let w = wal.clone();
        let first = thread::spawn(move || w.append(b"first"));
        first_in_rx.recv_timeout(Duration::from_secs(10)).expect("first sync started");
        let second = wal.append(b"second").unwrap_err();
        assert!(
            matches!(&second, Error::Poisoned { cause } if cause.contains("injected")),
            "{second}"
        );
        let first = first.join().unwrap().unwrap_err();
        assert!(matches!(first, Error::Io { op: "fdatasync", .. }), "{first}");
        assert_eq!(wal.inner.durable.load(Ordering::Acquire), 0);
    }
}
