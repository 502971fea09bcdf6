//! `Db`: the engine. It owns the WAL, the current view (memtable, immutable memtables, version),
//! the manifest, snapshots and the background flush and compaction threads.
//!
//! Write path: under the writer lock a batch gets its sequence numbers, is appended to the WAL
//! (handed to the OS at once) and inserted into the memtable; then the visible sequence number is
//! published. A synced write then waits for the WAL's group commit outside the lock.
//!
//! Invariants:
//! - A reader loads the visible sequence number before the view; every write at or below it is in
//!   that view (memtable, immutable memtable or table), since views change atomically.
//! - WAL records below `version.log_number` are all in tables named by the manifest; the WAL is
//!   truncated only after the manifest edit that raised `log_number` is durable.
//! - A table becomes part of the tree only after its file and directory entry are durable and the
//!   manifest edit naming it is fsynced.
//!
//! Lock order: `write` → `tree` → `view_lock`; `bg` is taken alone or innermost.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use smallvec::SmallVec;
use timber_wal::{SyncMode, Wal};

use crate::batch::{self, WriteBatch};
use crate::bloom;
use crate::cache::BlockCache;
use crate::compaction::{self, Compaction};
use crate::error::{Error, Result};
use crate::iter::Iter;
use crate::key::Bounds;
use crate::key::{self, Kind};
use crate::manifest::{self, Edit, Manifest};
use crate::memtable::{Lookup, Memtable, ReadAt};
use crate::metrics::Metrics;
use crate::options::{Durability, Options, NUM_LEVELS};
use crate::snapshot::Snapshot;
use crate::stats::{Counters, LevelStats, Stats};
use crate::table::{self, Table, TableBuilder};
use crate::version::{TableFile, Version};

/// What readers see: the memtables and the tree, changed only as a whole.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) mem: Arc<Memtable>,
    /// Immutable memtables, newest first.
    pub(crate) imms: Vec<Arc<Memtable>>,
    pub(crate) version: Arc<Version>,
}

pub(crate) struct Tree {
    manifest: Manifest,
    next_file: u64,
    pub(crate) busy: HashSet<u64>,
    pub(crate) cursors: Vec<Vec<u8>>,
}

#[derive(Default)]
struct Bg {
    shutdown: bool,
}

struct Writer {
    last_seq: u64,
}

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) opts: Options,
    wal: Wal,
    pub(crate) cache: Arc<BlockCache>,
    pub(crate) view: ArcSwap<View>,
    view_lock: Mutex<()>,
    write: Mutex<Writer>,
    visible: AtomicU64,
    pub(crate) tree: Mutex<Tree>,
    snapshots: Mutex<BTreeMap<u64, usize>>,
    /// Open snapshots and iterators: readers at a fixed sequence number. While there are none,
    /// a write prunes the versions of the keys it writes that no read can see any more.
    pins: Arc<AtomicUsize>,
    wal_pins: Mutex<BTreeMap<u64, usize>>,
    bg: Mutex<Bg>,
    bg_cv: Condvar,
    done_cv: Condvar,
    poison: OnceLock<String>,
    closed: AtomicBool,
    pub(crate) counters: Counters,
    metrics: Metrics,
}

/// An embedded key-value database: an LSM tree on a write-ahead log. All methods take `&self`
/// and may be called from many threads; share a `Db` with an `Arc`.
pub struct Db {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("dir", &self.inner.dir).finish()
    }
}

pub(crate) fn user_bounds<K: AsRef<[u8]>>(range: &impl RangeBounds<K>) -> Bounds {
    let own = |b: Bound<&K>| match b {
        Bound::Included(k) => Bound::Included(k.as_ref().to_vec()),
        Bound::Excluded(k) => Bound::Excluded(k.as_ref().to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    };
    Bounds { lo: own(range.start_bound()), hi: own(range.end_bound()) }
}

pub(crate) fn prefix_bounds(prefix: &[u8]) -> Bounds {
    Bounds {
        lo: Bound::Included(prefix.to_vec()),
        hi: key::prefix_successor(prefix).map_or(Bound::Unbounded, Bound::Excluded),
    }
}

fn check_key(key: &[u8]) -> Result<()> {
    batch::validate(key, None).map_err(Error::InvalidParam)
}

impl Db {
    /// Opens (or creates) the database in `dir`: replays the manifest and the WAL, and starts the
    /// background threads. Fails with `Locked` if another handle has it open.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Db> {
        opts.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let existed = dir.join(manifest::CURRENT).exists();
        if !existed && !opts.create_if_missing {
            return Err(Error::InvalidParam(format!("no database in {}", dir.display())));
        }
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let wal_opts = wal_options(&opts)
            .sync(opts.wal_sync_interval.map_or(SyncMode::Manual, SyncMode::Interval))
            .bytes_per_sync(Some(1 << 20))
            // Writes hand their records to the OS themselves: `flush` for buffered ones (copied
            // through the WAL's map), `sync` for synced ones (written before the fsync).
            .write_buffer(WAL_WRITE_BUFFER);
        let wal = Wal::open(dir.join("wal"), wal_opts)?;
        let (state, old_manifest) = match manifest::current(&dir)? {
            Some((id, path)) => (manifest::load(&path)?, Some((id, path))),
            None => {
                let stray = list_tables(&dir)?;
                if !stray.is_empty() || !wal.is_empty() {
                    return Err(Error::corrupt(
                        dir.join(manifest::CURRENT),
                        0,
                        "CURRENT is missing but the directory holds tables or WAL records",
                    ));
                }
                let mut s = manifest::State::new();
                s.log_number = wal.first_seq();
                (s, None)
            }
        };
        let manifest_path =
            old_manifest.as_ref().map_or_else(|| dir.join(manifest::CURRENT), |(_, p)| p.clone());
        if state.log_number < wal.first_seq() || state.log_number > wal.next_seq() {
            return Err(Error::corrupt(
                &manifest_path,
                0,
                format!(
                    "manifest replays the WAL from record {} but the WAL holds records {}..{}: \
                     version edits or log records are missing",
                    state.log_number,
                    wal.first_seq(),
                    wal.next_seq()
                ),
            ));
        }
        let cache = Arc::new(BlockCache::new(opts.block_cache_bytes));
        let mut version = Version::empty();
        version.log_number = state.log_number;
        for (level, tables) in state.levels.iter().enumerate() {
            for meta in tables.values() {
                let path = dir.join(table::file_name(meta.id));
                let t = Table::open(&path, meta.id, cache.clone()).map_err(|e| match e {
                    Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                        Error::corrupt(
                            &manifest_path,
                            0,
                            format!("table {} is missing", path.display()),
                        )
                    }
                    e => e,
                })?;
                version.levels[level].push(Arc::new(TableFile::new(meta.clone(), t)));
            }
        }
        version.sort();

        // Replay the WAL into memtables.
        let mut last_seq = state.last_seq;
        let mut mems = vec![Arc::new(Memtable::new(
            state.log_number,
            opts.memtable_hash_index,
            opts.memtable_size,
        ))];
        for rec in wal.iter(state.log_number..) {
            let (wseq, rec) = rec?;
            let (seq, ops) = batch::decode(&rec).ok_or_else(|| {
                Error::corrupt(
                    dir.join("wal"),
                    wseq,
                    format!("WAL record {wseq} is not a valid batch"),
                )
            })?;
            let mem = mems.last().expect("one memtable");
            mem.insert_batch(&ops, seq, None);
            last_seq = last_seq.max(seq + ops.len() as u64 - 1);
            if mem.size() >= opts.memtable_size {
                mem.seal(wseq + 1);
                mems.push(Arc::new(Memtable::new(
                    wseq + 1,
                    opts.memtable_hash_index,
                    opts.memtable_size,
                )));
            }
        }
        let mem = mems.pop().expect("one memtable");
        mems.reverse();
        let next_file = state.next_file;
        let mut fresh = version.state(last_seq, next_file);
        fresh.log_number = state.log_number;
        let manifest_id = old_manifest.as_ref().map_or(1, |(id, _)| id + 1);
        let manifest = Manifest::create(&dir, manifest_id, &fresh)?;
        // Only now, with everything verified and the new manifest in place, is anything removed.
        remove_orphans(&dir, &state, manifest_id)?;
        manifest::sync_dir(&dir)?;
        let metrics = Metrics::new(&opts.name);
        let inner = Arc::new(Inner {
            dir,
            wal,
            cache,
            view: ArcSwap::from_pointee(View { mem, imms: mems, version: Arc::new(version) }),
            view_lock: Mutex::new(()),
            write: Mutex::new(Writer { last_seq }),
            visible: AtomicU64::new(last_seq),
            tree: Mutex::new(Tree {
                manifest,
                next_file,
                busy: HashSet::new(),
                cursors: vec![Vec::new(); NUM_LEVELS],
            }),
            snapshots: Mutex::new(BTreeMap::new()),
            pins: Arc::new(AtomicUsize::new(0)),
            wal_pins: Mutex::new(BTreeMap::new()),
            bg: Mutex::new(Bg::default()),
            bg_cv: Condvar::new(),
            done_cv: Condvar::new(),
            poison: OnceLock::new(),
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            metrics,
            opts,
        });
        inner.publish_gauges();
        let mut threads = Vec::new();
        let spawn = |name: String, f: fn(&Inner)| {
            let worker = inner.clone();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || f(&worker))
                .map_err(|e| Error::io("spawn", &inner.dir, e))
        };
        threads.push(spawn("timber-kv-flush".into(), Inner::flush_loop)?);
        for i in 0..inner.opts.compaction_threads {
            threads.push(spawn(format!("timber-kv-compact-{i}"), Inner::compaction_loop)?);
        }
        Ok(Db { inner, threads: Mutex::new(threads) })
    }

    /// The value of `key`, or `None`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.inner.get_latest(key.as_ref())
    }

    /// The values of several keys (`None` for each absent one), in the order of `keys`: each
    /// as [`Db::get`] gives it, read one after another, not a snapshot across them (use a
    /// [`crate::Snapshot`] for that). Faster than as many `get`s: the keys' entries are loaded
    /// together.
    pub fn get_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Bytes>>> {
        self.inner.get_many_latest(keys)
    }

    /// Sets `key` to `value` with the database's default durability.
    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let (key, value) = (key.as_ref(), value.as_ref());
        let mut b = WriteBatch::with_capacity(key.len() + value.len());
        b.put(key, value);
        self.write(b)
    }

    /// Removes `key` (a no-op if absent) with the database's default durability.
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<()> {
        let mut b = WriteBatch::new();
        b.delete(key);
        self.write(b)
    }

    /// Applies a batch atomically with the database's default durability.
    pub fn write(&self, batch: WriteBatch) -> Result<()> {
        self.write_with(batch, self.inner.opts.durability)
    }

    /// Applies a batch atomically with the given durability; returns once it is visible and, for
    /// `Synced`, on disk.
    pub fn write_with(&self, mut batch: WriteBatch, durability: Durability) -> Result<()> {
        self.inner.write(&mut batch, durability).map(|_| ())
    }

    /// Makes every write made so far durable (one WAL fsync, shared with concurrent callers).
    /// Lets a caller write a run of batches `Deferred` and pay for one sync at the end.
    pub fn sync(&self) -> Result<()> {
        self.inner.check_writable()?;
        self.inner.wal.sync().map_err(|e| self.inner.wal_failed(e))
    }

    /// Live keys in `range`, in order (`.rev()` for descending), at the current point in time.
    pub fn scan<K: AsRef<[u8]>>(&self, range: impl RangeBounds<K>) -> Iter {
        self.inner.iter_latest(user_bounds(&range))
    }

    /// Every live key, in order.
    pub fn iter(&self) -> Iter {
        self.scan::<&[u8]>(..)
    }

    /// Live keys starting with `prefix`, in order.
    pub fn prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        self.inner.iter_latest(prefix_bounds(prefix.as_ref()))
    }

    /// A consistent point-in-time view; versions it needs are kept until it is dropped.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::new(self.inner.clone())
    }

    /// Writes every memtable to SSTables and waits for it.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Compacts every table overlapping `range` down to the deepest level that holds data,
    /// dropping overwritten versions and tombstones no snapshot needs. Waits for it.
    pub fn compact_range<K: AsRef<[u8]>>(&self, range: impl RangeBounds<K>) -> Result<()> {
        self.inner.compact_range(&user_bounds(&range))
    }

    /// Writes a consistent copy of the database into `dir` (which must not exist): SSTables are
    /// hard-linked (copied across file systems), the live WAL is copied. The copy opens as a
    /// database equal to a snapshot taken when the call began. Returns the sequence number of the
    /// last write the copy holds.
    pub fn checkpoint(&self, dir: impl AsRef<Path>) -> Result<u64> {
        self.inner.checkpoint(dir.as_ref())
    }

    /// Sizes, amplification, cache and stall figures.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// The sequence number of the last visible write.
    pub fn last_seq(&self) -> u64 {
        self.inner.visible()
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops the background threads and syncs the WAL. Later writes fail with `Closed`. Also
    /// done on drop.
    pub fn close(&self) -> Result<()> {
        {
            let mut bg = self.inner.bg.lock();
            if bg.shutdown {
                return Ok(());
            }
            bg.shutdown = true;
            self.inner.closed.store(true, Ordering::Release);
        }
        self.inner.bg_cv.notify_all();
        self.inner.done_cv.notify_all();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        if self.inner.poison.get().is_some() {
            return Ok(());
        }
        self.inner.wal.close().map_err(Error::from)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(dir = %self.inner.dir.display(), error = %e, "closing database failed");
        }
    }
}

fn list_tables(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let e = e.map_err(|e| Error::io("list", dir, e))?;
        if let Some(id) = e.file_name().to_str().and_then(table::parse_file_name) {
            out.push(id);
        }
    }
    Ok(out)
}

/// A registered reader at a fixed sequence number (an iterator; snapshots count themselves):
/// while one is open, writes prune no versions. Registration (`SeqCst` increment) comes before
/// the reader loads `visible` (`SeqCst`), and a writer loads the count (`SeqCst`) before it
/// prunes: a writer that saw none prunes only below what any later reader will load.
pub(crate) struct ReadPin(Arc<AtomicUsize>);

impl ReadPin {
    fn new(pins: &Arc<AtomicUsize>) -> ReadPin {
        pins.fetch_add(1, Ordering::SeqCst);
        ReadPin(pins.clone())
    }
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Drops one count of `key` from a counted set (snapshots, WAL pins).
fn release(counts: &mut BTreeMap<u64, usize>, key: u64) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// Bytes of records the WAL buffers before it hands them to the OS on its own. Buffered and
/// synced writes flush or sync their records before they return, so this bounds a single large
/// batch and a run of deferred writes between syncs.
const WAL_WRITE_BUFFER: usize = 1 << 20;

/// The WAL settings of a database: segments of `wal_segment_size`, larger batches in segments of
/// their own.
fn wal_options(opts: &Options) -> timber_wal::Options {
    // No recycled segments (the WAL recycles by default): a flush drops several WAL segments at
    // once, and a kept one would be a segment of disk beside the tables for a saving (no
    // zero-filling) that is small at the WAL's rate here.
    timber_wal::Options::default()
        .segment_capacity(opts.wal_segment_size)
        .oversized_records(true)
        .recycle_segments(false)
        .name(opts.name.clone())
}

/// Removes tables no manifest names (left by a crash in a flush or compaction), old manifests and
/// temporary files.
fn remove_orphans(dir: &Path, state: &manifest::State, current: u64) -> Result<()> {
    let live: HashSet<u64> = state.levels.iter().flat_map(|l| l.keys().copied()).collect();
    for e in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let e = e.map_err(|e| Error::io("list", dir, e))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let orphan = match table::parse_file_name(name) {
            Some(id) => !live.contains(&id),
            None => {
                name == "CURRENT.tmp"
                    || (name.starts_with("MANIFEST-") && name != manifest::file_name(current))
            }
        };
        if orphan {
            let p = e.path();
            fs::remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
            tracing::info!(path = %p.display(), "removed orphan file");
        }
    }
    Ok(())
}

impl Inner {
    pub(crate) fn visible(&self) -> u64 {
        self.visible.load(Ordering::SeqCst)
    }

    fn check_writable(&self) -> Result<()> {
        if let Some(cause) = self.poison.get() {
            return Err(Error::Poisoned { cause: cause.clone() });
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn set_poison(&self, e: &Error) {
        if self.poison.set(e.to_string()).is_ok() {
            tracing::error!(dir = %self.dir.display(), error = %e, "database refuses writes from now on");
        }
        self.notify_done();
    }

    pub(crate) fn notify_done(&self) {
        let _g = self.bg.lock();
        self.done_cv.notify_all();
    }

    fn wake_bg(&self) {
        let _g = self.bg.lock();
        self.bg_cv.notify_all();
    }

    fn write(&self, batch: &mut WriteBatch, durability: Durability) -> Result<u64> {
        if let Some(m) = batch.invalid() {
            return Err(Error::InvalidParam(m.to_owned()));
        }
        if batch.is_empty() {
            return Ok(self.visible());
        }
        self.check_writable()?;
        self.slow_down_if_behind();
        let mut w = self.write.lock();
        self.make_room()?;
        let seq = w.last_seq + 1;
        let rep = batch.encode(seq)?;
        self.wal.append(rep)?;
        let (_, ops) = batch::ops(rep).expect("a batch we encoded decodes");
        let view = self.view.load();
        // Under the writer lock `visible` is stable. A reader that registers after this load of
        // `pins` reads `visible` after it too, so it needs no version older than the newest one
        // at or below it, which pruning keeps (all SeqCst: see `ReadPin`).
        let prune = (self.pins.load(Ordering::SeqCst) == 0).then(|| self.visible());
        let ops: SmallVec<[key::Op<'_>; 16]> = ops.flatten().collect();
        view.mem.insert_batch(&ops, seq, prune);
        let user_bytes: usize = ops.iter().map(|op| op.key.len() + op.value.len()).sum();
        let n = ops.len() as u64;
        w.last_seq = seq + n - 1;
        let last = w.last_seq;
        self.visible.store(last, Ordering::SeqCst);
        drop(w);
        self.counters.user_bytes.fetch_add(user_bytes as u64, Ordering::Relaxed);
        self.metrics.writes.increment(n);
        self.metrics.write_bytes.increment(user_bytes as u64);
        match durability {
            Durability::Buffered => self.wal.flush().map_err(|e| self.wal_failed(e))?,
            Durability::Synced => {
                let start = Instant::now();
                self.wal.sync().map_err(|e| self.wal_failed(e))?;
                self.metrics.sync_seconds.record(start.elapsed().as_secs_f64());
            }
            Durability::Deferred => {}
        }
        Ok(last)
    }

    /// The error of a WAL flush or sync after a write was applied: the database refuses writes
    /// from then on (what reached the disk is only known after a reopen), unless it was closed.
    fn wal_failed(&self, e: timber_wal::Error) -> Error {
        let e = Error::from(e);
        if !matches!(e, Error::Closed) {
            self.set_poison(&e);
        }
        e
    }

    /// Delays a write by a millisecond while L0 is past its slowdown trigger, so that compaction
    /// catches up before writes must stop.
    fn slow_down_if_behind(&self) {
        let l0 = self.view.load().version.levels[0].len();
        if l0 >= self.opts.l0_slowdown_trigger && l0 < self.opts.l0_stop_trigger {
            let t = Instant::now();
            std::thread::sleep(Duration::from_millis(1));
            self.counters.record_stall(t.elapsed());
            self.metrics.stalls.increment(1);
        }
    }

    /// Makes sure the memtable has room, switching to a new one when it is full. Waits (a stall)
    /// while too many memtables await flushing or L0 is at its stop trigger. Called with the
    /// writer lock held.
    fn make_room(&self) -> Result<()> {
        let mut stalled: Option<Instant> = None;
        let r = loop {
            if let Some(cause) = self.poison.get() {
                break Err(Error::Poisoned { cause: cause.clone() });
            }
            let view = self.view.load();
            let l0 = view.version.levels[0].len();
            let full = view.mem.size() >= self.opts.memtable_size;
            if !full && l0 < self.opts.l0_stop_trigger {
                break Ok(());
            }
            if l0 >= self.opts.l0_stop_trigger
                || (full && view.imms.len() >= self.opts.max_immutable_memtables)
            {
                stalled.get_or_insert_with(Instant::now);
                let mut bg = self.bg.lock();
                if bg.shutdown {
                    break Err(Error::Closed);
                }
                self.bg_cv.notify_all();
                self.done_cv.wait_for(&mut bg, Duration::from_millis(50));
                continue;
            }
            self.switch_memtable();
            break Ok(());
        };
        if let Some(t) = stalled {
            self.counters.record_stall(t.elapsed());
            self.metrics.stalls.increment(1);
        }
        r
    }

    /// Makes the memtable immutable and starts a new one (writer lock held).
    fn switch_memtable(&self) {
        let _v = self.view_lock.lock();
        let view = self.view.load();
        let wal_end = self.wal.next_seq();
        view.mem.seal(wal_end);
        let mut imms = vec![view.mem.clone()];
        imms.extend(view.imms.iter().cloned());
        self.view.store(Arc::new(View {
            mem: Arc::new(Memtable::new(
                wal_end,
                self.opts.memtable_hash_index,
                self.opts.memtable_size,
            )),
            imms,
            version: view.version.clone(),
        }));
        drop(_v);
        self.wake_bg();
    }

    /// `user` as of `seq`, which a registered snapshot protects (or which is older than no
    /// version a flush or compaction may drop: see `get_latest`).
    pub(crate) fn get_at(&self, user: &[u8], seq: u64) -> Result<Option<Bytes>> {
        check_key(user)?;
        self.get_in(&self.view.load_full(), user, seq, false)
    }

    /// `user` as of now. The view is taken before the sequence number: every table in it holds
    /// only versions at or below that number, so the newest one it has at or below it is the
    /// answer. Taken the other way round, a flush and a compaction finishing in between could
    /// have replaced the version the number needs by a newer one, which no unregistered read
    /// protects.
    pub(crate) fn get_latest(&self, user: &[u8]) -> Result<Option<Bytes>> {
        check_key(user)?;
        let view = self.view.load_full();
        let seq = self.visible();
        self.get_in(&view, user, seq, true)
    }

    /// Several keys as of now, as `get_latest` reads one, from one view: the mutable memtable
    /// looks them up together (see `Memtable::get_many`), and those it does not have are read
    /// from the rest of the view one by one.
    pub(crate) fn get_many_latest<K: AsRef<[u8]>>(
        &self,
        users: &[K],
    ) -> Result<Vec<Option<Bytes>>> {
        for u in users {
            check_key(u.as_ref())?;
        }
        let view = self.view.load_full();
        let seq = self.visible();
        let keys: SmallVec<[(&[u8], u64); 16]> =
            users.iter().map(|u| (u.as_ref(), bloom::hash(u.as_ref()))).collect();
        let found = view.mem.get_many(&keys, ReadAt::Latest(&self.visible));
        keys.iter()
            .zip(found)
            .map(|(&(user, hash), l)| match l {
                Lookup::Found(v) => Ok(Some(v)),
                Lookup::Deleted => Ok(None),
                Lookup::Absent => self.get_below_mem(&view, user, hash, seq),
            })
            .collect()
    }

    /// `user` in `view` at `seq`; with `latest`, the mutable memtable is read as of its newest
    /// published version instead (`ReadAt::Latest`: what pruning never drops), which is at or
    /// after `seq` and before anything else in the view.
    fn get_in(&self, view: &View, user: &[u8], seq: u64, latest: bool) -> Result<Option<Bytes>> {
        self.get_hashed(view, user, bloom::hash(user), seq, latest)
    }

    /// `get_in` of a key whose [`bloom::hash`] is `hash`.
    fn get_hashed(
        &self,
        view: &View,
        user: &[u8],
        hash: u64,
        seq: u64,
        latest: bool,
    ) -> Result<Option<Bytes>> {
        let at = if latest { ReadAt::Latest(&self.visible) } else { ReadAt::Seq(seq) };
        match view.mem.get(user, hash, at) {
            Lookup::Found(v) => Ok(Some(v)),
            Lookup::Deleted => Ok(None),
            Lookup::Absent => self.get_below_mem(view, user, hash, seq),
        }
    }

    /// `user` at `seq` in the parts of `view` older than its mutable memtable.
    fn get_below_mem(
        &self,
        view: &View,
        user: &[u8],
        hash: u64,
        seq: u64,
    ) -> Result<Option<Bytes>> {
        for m in &view.imms {
            match m.get(user, hash, ReadAt::Seq(seq)) {
                Lookup::Found(v) => return Ok(Some(v)),
                Lookup::Deleted => return Ok(None),
                Lookup::Absent => {}
            }
        }
        let lookup = key::lookup(user, seq);
        let found = |t: &TableFile| -> Result<Option<Option<Bytes>>> {
            Ok(t.table.get(&lookup, user, hash)?.map(|(kind, v)| (kind == Kind::Put).then_some(v)))
        };
        for t in &view.version.levels[0] {
            if t.overlaps(Some(user), Some(user)) {
                if let Some(r) = found(t)? {
                    return Ok(r);
                }
            }
        }
        for level in 1..NUM_LEVELS {
            if let Some(t) = view.version.find(level, user) {
                if let Some(r) = found(t)? {
                    return Ok(r);
                }
            }
        }
        Ok(None)
    }

    /// An iterator at `seq`, which the caller's snapshot protects until the iterator pins it.
    pub(crate) fn iter(&self, seq: u64, bounds: Bounds) -> Iter {
        let pin = ReadPin::new(&self.pins);
        Iter::new(self.view.load_full(), seq, bounds, pin)
    }

    /// An iterator as of now: pinned first, then the view, then the sequence number (see
    /// `get_latest` and `ReadPin`).
    pub(crate) fn iter_latest(&self, bounds: Bounds) -> Iter {
        let pin = ReadPin::new(&self.pins);
        let view = self.view.load_full();
        Iter::new(view, self.visible(), bounds, pin)
    }

    pub(crate) fn add_snapshot(&self) -> u64 {
        let mut s = self.snapshots.lock();
        self.pins.fetch_add(1, Ordering::SeqCst);
        let seq = self.visible();
        *s.entry(seq).or_default() += 1;
        seq
    }

    pub(crate) fn drop_snapshot(&self, seq: u64) {
        release(&mut self.snapshots.lock(), seq);
        self.pins.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn snapshot_seqs(&self) -> Vec<u64> {
        self.snapshots.lock().keys().copied().collect()
    }

    pub(crate) fn new_file_id(&self) -> u64 {
        let mut tree = self.tree.lock();
        let id = tree.next_file;
        tree.next_file += 1;
        id
    }

    /// Finishes a table being built, opens it, and counts its bytes.
    pub(crate) fn finish_table(&self, id: u64, b: TableBuilder) -> Result<Arc<TableFile>> {
        let built = b.finish()?;
        let path = self.dir.join(table::file_name(id));
        let t = Table::open(&path, id, self.cache.clone())?;
        Ok(Arc::new(TableFile::new(compaction::meta_of(id, &built), t)))
    }

    fn flush_loop(&self) {
        loop {
            {
                let mut bg = self.bg.lock();
                while !bg.shutdown && self.view.load().imms.is_empty() {
                    self.bg_cv.wait_for(&mut bg, Duration::from_millis(200));
                }
                if bg.shutdown {
                    return;
                }
            }
            if self.poison.get().is_some() {
                let mut bg = self.bg.lock();
                if !bg.shutdown {
                    self.bg_cv.wait_for(&mut bg, Duration::from_millis(200));
                }
                continue;
            }
            if let Err(e) = self.flush_oldest() {
                self.set_poison(&e);
            }
        }
    }

    /// Writes the oldest immutable memtable to an L0 table and installs it.
    fn flush_oldest(&self) -> Result<()> {
        let Some(imm) = self.view.load().imms.last().cloned() else { return Ok(()) };
        let t = Instant::now();
        let mut table = None;
        let mut max_seq = 0;
        if !imm.is_empty() {
            let id = self.new_file_id();
            let mut b = TableBuilder::create(&self.dir.join(table::file_name(id)), &self.opts)?;
            let mut keep = compaction::Retention::new(self.snapshot_seqs());
            imm.try_for_each(|k, v| {
                max_seq = max_seq.max(key::seq(k));
                if keep.keep(k, |_| false) {
                    b.add(k, v)?;
                }
                Ok::<_, Error>(())
            })?;
            let f = self.finish_table(id, b)?;
            manifest::sync_dir(&self.dir)?;
            self.counters.flush_bytes.fetch_add(f.meta.size, Ordering::Relaxed);
            table = Some(f);
        }
        let log_number = imm.wal_end();
        let mut tree = self.tree.lock();
        let edit = Edit {
            log_number: Some(log_number),
            last_seq: Some(max_seq),
            next_file: Some(tree.next_file),
            added: table.iter().map(|t| (0, t.meta.clone())).collect(),
            deleted: vec![],
        };
        tree.manifest.append(&edit)?;
        {
            let _v = self.view_lock.lock();
            let view = self.view.load();
            let mut version = (*view.version).clone();
            version.log_number = log_number;
            if let Some(t) = table {
                version.levels[0].insert(0, t);
            }
            let imms = view.imms.iter().filter(|m| !Arc::ptr_eq(m, &imm)).cloned().collect();
            self.view.store(Arc::new(View {
                mem: view.mem.clone(),
                imms,
                version: Arc::new(version),
            }));
        }
        self.maybe_switch_manifest(&mut tree)?;
        drop(tree);
        let pin = self.wal_pins.lock().keys().next().copied().unwrap_or(u64::MAX);
        self.wal.truncate_front(log_number.min(pin))?;
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.metrics.flush_seconds.record(t.elapsed().as_secs_f64());
        self.publish_gauges();
        self.notify_done();
        self.wake_bg();
        Ok(())
    }

    /// Rewrites the manifest once it has grown past 64 MiB of edits (tree lock held).
    fn maybe_switch_manifest(&self, tree: &mut Tree) -> Result<()> {
        if tree.manifest.len() < 64 << 20 {
            return Ok(());
        }
        let version = self.view.load().version.clone();
        let state = version.state(self.visible(), tree.next_file);
        let old = self.dir.join(manifest::file_name(tree.manifest.id));
        tree.manifest = Manifest::create(&self.dir, tree.manifest.id + 1, &state)?;
        fs::remove_file(&old).map_err(|e| Error::io("remove", &old, e))?;
        Ok(())
    }

    /// Records a finished compaction in the manifest and installs the new version.
    pub(crate) fn install_compaction(
        &self,
        edit: Edit,
        c: &Compaction,
        outputs: Vec<Arc<TableFile>>,
        in_bytes: u64,
        out_bytes: u64,
    ) -> Result<()> {
        let mut tree = self.tree.lock();
        tree.manifest.append(&edit)?;
        let moved = in_bytes == 0 && out_bytes == 0;
        {
            let _v = self.view_lock.lock();
            let view = self.view.load();
            let mut version = (*view.version).clone();
            let gone: HashSet<u64> = edit.deleted.iter().map(|(_, id)| *id).collect();
            for l in &mut version.levels {
                l.retain(|t| !gone.contains(&t.meta.id));
            }
            version.levels[c.level + 1].extend(outputs);
            version.sort();
            self.view.store(Arc::new(View {
                mem: view.mem.clone(),
                imms: view.imms.clone(),
                version: Arc::new(version),
            }));
        }
        if !moved {
            for t in c.inputs.iter().flatten() {
                t.mark_obsolete();
            }
        }
        self.maybe_switch_manifest(&mut tree)?;
        drop(tree);
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        self.counters.compaction_read.fetch_add(in_bytes, Ordering::Relaxed);
        self.counters.compaction_written.fetch_add(out_bytes, Ordering::Relaxed);
        self.metrics.compaction_bytes.increment(out_bytes);
        self.publish_gauges();
        Ok(())
    }

    fn compaction_loop(&self) {
        // The last sequence number seen and since when it has not moved: a database without
        // writes for `idle_compaction_after` gets its L0 tables merged down.
        let mut idle_since = (self.visible(), Instant::now());
        loop {
            if self.bg.lock().shutdown {
                return;
            }
            let seq = self.visible();
            if seq != idle_since.0 {
                idle_since = (seq, Instant::now());
            }
            let idle = self.opts.idle_compaction_after.is_some_and(|d| idle_since.1.elapsed() >= d);
            let work = if self.poison.get().is_some() {
                None
            } else {
                compaction::pick(self).or_else(|| {
                    if idle {
                        compaction::pick_idle(self)
                    } else {
                        None
                    }
                })
            };
            match work {
                Some(c) => {
                    if let Err(e) = compaction::run(self, c) {
                        self.set_poison(&e);
                    }
                }
                None => {
                    let mut bg = self.bg.lock();
                    if !bg.shutdown {
                        self.bg_cv.wait_for(&mut bg, Duration::from_millis(200));
                    }
                }
            }
        }
    }

    fn flush(&self) -> Result<()> {
        {
            let _w = self.write.lock();
            self.check_writable()?;
            if !self.view.load().mem.is_empty() {
                self.switch_memtable();
            }
        }
        let mut bg = self.bg.lock();
        loop {
            if let Some(cause) = self.poison.get() {
                return Err(Error::Poisoned { cause: cause.clone() });
            }
            if self.view.load().imms.is_empty() {
                return Ok(());
            }
            if bg.shutdown {
                return Err(Error::Closed);
            }
            self.bg_cv.notify_all();
            self.done_cv.wait_for(&mut bg, Duration::from_millis(50));
        }
    }

    fn compact_range(&self, bounds: &Bounds) -> Result<()> {
        self.flush()?;
        let lo = match &bounds.lo {
            Bound::Included(k) | Bound::Excluded(k) => Some(k.as_slice()),
            Bound::Unbounded => None,
        };
        let hi = match &bounds.hi {
            Bound::Included(k) | Bound::Excluded(k) => Some(k.as_slice()),
            Bound::Unbounded => None,
        };
        let deepest = {
            let v = self.view.load().version.clone();
            (1..NUM_LEVELS).rev().find(|&l| !v.levels[l].is_empty()).unwrap_or(1)
        };
        for level in 0..deepest {
            loop {
                if let Some(cause) = self.poison.get() {
                    return Err(Error::Poisoned { cause: cause.clone() });
                }
                let picked = {
                    let mut tree = self.tree.lock();
                    let version = self.view.load().version.clone();
                    let first = if level == 0 {
                        let any = version.levels[0].iter().any(|t| t.overlaps(lo, hi));
                        if any {
                            version.levels[0].clone()
                        } else {
                            Vec::new()
                        }
                    } else {
                        version.overlapping(level, lo, hi)
                    };
                    if first.is_empty() {
                        None
                    } else {
                        let c = compaction::expand(&version, level, first);
                        Some(compaction::claim(&mut tree.busy, &c).then_some(c))
                    }
                };
                match picked {
                    None => break,
                    Some(Some(c)) => {
                        if let Err(e) = compaction::run(self, c) {
                            self.set_poison(&e);
                            return Err(e);
                        }
                        break;
                    }
                    Some(None) => {
                        let mut bg = self.bg.lock();
                        if bg.shutdown {
                            return Err(Error::Closed);
                        }
                        self.done_cv.wait_for(&mut bg, Duration::from_millis(20));
                    }
                }
            }
        }
        Ok(())
    }

    fn checkpoint(&self, dst: &Path) -> Result<u64> {
        if dst.exists() {
            return Err(Error::InvalidParam(format!(
                "checkpoint target {} already exists",
                dst.display()
            )));
        }
        // Everything at or below `seq` is in `view`'s tables or in WAL records below `wal_end`,
        // and nothing above it is: taken together under the writer lock.
        let (seq, wal_end, view) = {
            let w = self.write.lock();
            self.check_writable()?;
            (w.last_seq, self.wal.next_seq(), self.view.load_full())
        };
        let log_number = view.version.log_number;
        *self.wal_pins.lock().entry(log_number).or_default() += 1;
        let r = self.write_checkpoint(dst, &view, seq, log_number, wal_end);
        release(&mut self.wal_pins.lock(), log_number);
        if r.is_err() {
            let _ = fs::remove_dir_all(dst);
        }
        r.map(|()| seq)
    }

    fn write_checkpoint(
        &self,
        dst: &Path,
        view: &View,
        seq: u64,
        log_number: u64,
        wal_end: u64,
    ) -> Result<()> {
        fs::create_dir_all(dst).map_err(|e| Error::io("create", dst, e))?;
        for t in view.version.tables() {
            let to = dst.join(table::file_name(t.meta.id));
            if fs::hard_link(t.path(), &to).is_err() {
                fs::copy(t.path(), &to).map_err(|e| Error::io("copy", t.path(), e))?;
                fs::File::open(&to)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io("fsync", &to, e))?;
            }
        }
        let wal_opts = wal_options(&self.opts)
            .sync(SyncMode::Manual)
            .name(format!("{}-checkpoint", self.opts.name));
        let wal = Wal::open(dst.join("wal"), wal_opts)?;
        wal.truncate_front(log_number)?;
        for rec in self.wal.iter(log_number..wal_end) {
            let (_, rec) = rec?;
            wal.append(&rec)?;
        }
        wal.close()?;
        let next_file = self.tree.lock().next_file;
        let state = view.version.state(seq, next_file);
        Manifest::create(dst, 1, &state)?;
        manifest::sync_dir(dst)?;
        if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
            manifest::sync_dir(parent)?;
        }
        Ok(())
    }

    fn stats(&self) -> Stats {
        let view = self.view.load_full();
        let levels: Vec<LevelStats> = (0..NUM_LEVELS)
            .map(|l| LevelStats {
                files: view.version.levels[l].len(),
                bytes: view.version.level_bytes(l),
            })
            .collect();
        let (hits, misses) = self.cache.counts();
        let c = &self.counters;
        let user = c.user_bytes.load(Ordering::Relaxed);
        let flushed = c.flush_bytes.load(Ordering::Relaxed);
        let compacted = c.compaction_written.load(Ordering::Relaxed);
        let mut pending = 0u64;
        if levels[0].files >= self.opts.l0_compaction_trigger {
            pending += levels[0].bytes;
        }
        for (l, s) in levels.iter().enumerate().take(NUM_LEVELS - 1).skip(1) {
            pending += s.bytes.saturating_sub(self.opts.level_target(l));
        }
        Stats {
            levels,
            memtable_bytes: view.mem.size() as u64,
            immutable_memtables: view.imms.len(),
            wal_bytes: self.wal.size_on_disk(),
            user_bytes_written: user,
            flush_bytes_written: flushed,
            compaction_bytes_read: c.compaction_read.load(Ordering::Relaxed),
            compaction_bytes_written: compacted,
            write_amplification: if user == 0 {
                0.0
            } else {
                (flushed + compacted) as f64 / user as f64
            },
            flushes: c.flushes.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            cache_bytes: self.cache.bytes() as u64,
            pending_compaction_bytes: pending,
            stalls: c.stalls.load(Ordering::Relaxed),
            stall_micros: c.stall_micros.load(Ordering::Relaxed),
            last_seq: self.visible(),
            snapshots: self.snapshots.lock().values().sum(),
        }
    }

    fn publish_gauges(&self) {
        self.metrics.publish(&self.stats());
    }
}
