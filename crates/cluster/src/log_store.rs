//! `LogStore`: openraft's log storage on a timber WAL, one record per entry, the entry's index
//! being the record's sequence number; the vote, the purged and the committed log ids live in
//! `raft.state` beside it ([`HardState`]).
//!
//! Invariants:
//! - the WAL holds exactly the entries `purged.index + 1 ..= last.index` (none when it is empty),
//!   dense, so an entry's index is its sequence number;
//! - `purge` stores the purged id before it drops records from the WAL, so a crash in between
//!   leaves records the open drops (it finishes the purge), never a log state that claims
//!   entries it lost;
//! - with `SyncMode::Always`, `append` reports an entry persisted (openraft's `LogFlushed`) only
//!   once `fdatasync` covered it: `append` writes the entries and returns, and a flusher thread
//!   syncs the WAL for every append queued meanwhile and then reports them. (openraft 0.9 waits
//!   for each append's report before it appends again, so in practice one append a sync; the
//!   thread keeps the fsync off the runtime's workers. Concurrent client writes share a sync
//!   by sharing an entry, `crate::proposals`.)
//! - an append is written in batches that each fit a WAL segment (entries are independent: a
//!   crash may keep a prefix of an append, which openraft sees as a shorter log); `save_vote` and `purge` are durable on return in every mode;
//! - `save_committed` is kept in memory and stored with the next vote or purge: it is a hint
//!   (openraft re-applies up to it at startup), and the state machine records what it applied
//!   with the data it produced, so a stale committed id costs replay, not data.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    LogId, OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError,
    Vote,
};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use timber_wal::{SyncMode, Wal};

use crate::error::{Error, Result};
use crate::hard_state::{self, HardState};

/// Version byte in front of every encoded entry (`docs/format/raft.md`).
const ENTRY_VERSION: u8 = 1;
/// The WAL's directory under the store's.
const LOG_DIR: &str = "log";

/// A Raft log on disk: clones share it (openraft reads through clones while it appends).
pub struct LogStore<C: RaftTypeConfig> {
    shared: Arc<Shared<C>>,
}

struct Shared<C: RaftTypeConfig> {
    /// Under `SyncMode::Always` (declared first: dropped, and its thread joined, before `wal`).
    flusher: Option<Flusher<C>>,
    wal: Arc<Wal>,
    dir: PathBuf,
    state: Mutex<Cached>,
    _config: PhantomData<fn() -> C>,
}

struct Cached {
    hard: HardState,
    /// Id of the last entry in the log, or the purged id when the log is empty.
    last: Option<LogId<u64>>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore { shared: self.shared.clone() }
    }
}

impl<C: RaftTypeConfig> Debug for LogStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("dir", &self.shared.dir).finish_non_exhaustive()
    }
}

impl<C> LogStore<C>
where
    C: RaftTypeConfig<NodeId = u64>,
    C::Entry: Serialize + DeserializeOwned,
{
    /// Opens (creating if needed) the log in `dir`. `sync` is the WAL's: `Always` makes every
    /// append durable before openraft hears of it; `Interval` leaves it to the OS for that long.
    pub fn open(dir: impl AsRef<Path>, sync: SyncMode) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        hard_state::remove_leftover(&dir)?;
        let hard = HardState::load(&dir)?;
        // Under `Always`, the flusher makes appends durable (the WAL would sync in each append).
        let wal_sync = if sync == SyncMode::Always { SyncMode::Manual } else { sync };
        // A single entry larger than a segment (a huge request) gets a segment of its own.
        let opts = timber_wal::Options::default().sync(wal_sync).oversized_records(true);
        let wal = Arc::new(Wal::open(dir.join(LOG_DIR), opts)?);
        if let Some(p) = hard.purged {
            let first = p.index + 1;
            if wal.first_seq() < first {
                // A purge stored its id, then stopped before the WAL dropped the records.
                wal.truncate_front(first)?;
            } else if wal.first_seq() > first {
                return Err(Error::Hole(format!(
                    "entries {first}..{} are missing: the log starts after the purged id {p}",
                    wal.first_seq()
                )));
            }
        }
        let last = match wal.last_seq() {
            Some(seq) => Some(*decode::<C>(seq, &wal.read(seq)?)?.get_log_id()),
            None => hard.purged,
        };
        let state = Mutex::new(Cached { hard, last });
        let flusher = match sync {
            SyncMode::Always => Some(Flusher::start(wal.clone(), &dir)?),
            _ => None,
        };
        Ok(LogStore { shared: Arc::new(Shared { flusher, wal, dir, state, _config: PhantomData }) })
    }

    /// The last entry known committed (kept in memory: see the module doc).
    pub fn committed(&self) -> Option<LogId<u64>> {
        self.shared.state.lock().hard.committed
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The entries in `range` the log holds (the WAL clamps it to its live records), none at
    /// or below the purged id (a purge stores the id before the WAL drops its records).
    fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<C::Entry>> {
        let purged_below = self.shared.state.lock().hard.purged.map_or(0, |p| p.index + 1);
        let mut out = Vec::new();
        for r in self.shared.wal.iter(range) {
            let (seq, bytes) = r?;
            if seq >= purged_below {
                out.push(decode::<C>(seq, &bytes)?);
            }
        }
        Ok(out)
    }

    /// Runs `f` (which writes to disk) on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared<C>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .unwrap_or_else(|e| Err(Error::Hole(format!("storage task failed: {e}"))))
    }

    async fn store_hard(&self, change: impl FnOnce(&mut HardState) + Send + 'static) -> Result<()> {
        self.blocking(move |s| {
            // Held across the write so that two stores cannot land in the wrong order.
            let mut st = s.state.lock();
            let mut next = st.hard;
            change(&mut next);
            next.store(&s.dir)?;
            st.hard = next;
            Ok(())
        })
        .await
    }
}

/// Bytes of entries per WAL batch of an append (well under a segment).
const CHUNK_BYTES: usize = 8 << 20;

/// Appends `records` in order, in batches of at most [`CHUNK_BYTES`] (a larger record alone).
fn append_chunks(wal: &Wal, records: &[Vec<u8>]) -> Result<()> {
    let mut rest = records;
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        for r in rest {
            if n > 0 && bytes + r.len() > CHUNK_BYTES {
                break;
            }
            bytes += r.len();
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        wal.append_batch(chunk)?;
        rest = tail;
    }
    Ok(())
}

/// The thread that makes appended entries durable and then tells openraft, one `fdatasync`
/// for every append queued while the previous one ran.
struct Flusher<C: RaftTypeConfig> {
    /// Taken on drop, which ends the thread once it reported what was queued.
    queue: Option<std::sync::mpsc::Sender<LogFlushed<C>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<C: RaftTypeConfig> Flusher<C> {
    fn start(wal: Arc<Wal>, dir: &Path) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<LogFlushed<C>>();
        let thread = std::thread::Builder::new()
            .name("timber-raft-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Everything queued was appended before it was queued: one sync covers it.
                    let mut done = vec![first];
                    done.extend(rx.try_iter());
                    let synced = wal.sync();
                    for callback in done {
                        let r = match &synced {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::other(e.to_string())),
                        };
                        callback.log_io_completed(r);
                    }
                }
            })
            .map_err(|e| Error::io("spawn the log's sync thread", dir, e))?;
        Ok(Flusher { queue: Some(tx), thread: Some(thread) })
    }

    fn queue(&self, callback: LogFlushed<C>) {
        if let Some(q) = &self.queue {
            // The thread ends only when the store drops: a send cannot fail before that.
            let _ = q.send(callback);
        }
    }
}

impl<C: RaftTypeConfig> Drop for Flusher<C> {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn encode<C: RaftTypeConfig>(entry: &C::Entry) -> Result<Vec<u8>>
where
    C::Entry: Serialize,
{
    let buf = vec![ENTRY_VERSION];
    postcard::to_extend(entry, buf).map_err(|e| Error::Entry {
        index: entry.get_log_id().index,
        reason: format!("cannot encode: {e}"),
    })
}

fn decode<C: RaftTypeConfig>(seq: u64, bytes: &[u8]) -> Result<C::Entry>
where
    C::Entry: DeserializeOwned,
{
    let bad = |reason: String| Error::Entry { index: seq, reason };
    match bytes.split_first() {
        Some((&ENTRY_VERSION, rest)) => {
            let entry: C::Entry =
                postcard::from_bytes(rest).map_err(|e| bad(format!("cannot decode: {e}")))?;
            if entry.get_log_id().index != seq {
                return Err(bad(format!("holds the entry of index {}", entry.get_log_id().index)));
            }
            Ok(entry)
        }
        Some((v, _)) => Err(bad(format!("unknown entry version {v}"))),
        None => Err(bad("empty record".into())),
    }
}

fn read_err(e: Error) -> StorageError<u64> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: Error) -> StorageError<u64> {
    StorageIOError::write_logs(&e).into()
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig<NodeId = u64>,
    C::Entry: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<u64>> {
        self.entries(range).map_err(read_err)
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig<NodeId = u64>,
    C::Entry: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<u64>> {
        let st = self.shared.state.lock();
        Ok(LogState { last_purged_log_id: st.hard.purged, last_log_id: st.last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let vote = *vote;
        self.store_hard(move |h| h.vote = Some(vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.shared.state.lock().hard.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        self.shared.state.lock().hard.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.shared.state.lock().hard.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut records = Vec::new();
        let mut first = None;
        let mut last = None;
        // Entries at or below the purged id are in the state machine already (openraft purges
        // up to what the state machine applied when the log is behind it): nothing to keep.
        let purged_below = self.shared.state.lock().hard.purged.map_or(0, |p| p.index + 1);
        for e in entries {
            let id = *e.get_log_id();
            if id.index < purged_below {
                continue;
            }
            first.get_or_insert(id.index);
            last = Some(id);
            records.push(encode::<C>(&e).map_err(write_err)?);
        }
        let (Some(first), Some(last)) = (first, last) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        if last.index + 1 - first != records.len() as u64 {
            return Err(write_err(Error::Hole(format!(
                "entries {first}..={} are not consecutive",
                last.index
            ))));
        }
        if first == self.shared.wal.next_seq() {
            // The common case, in place: the WAL copies the records into its buffer (the sync,
            // where one is due, is the flusher's), which costs less than a hop to a thread.
            append_chunks(&self.shared.wal, &records).map_err(write_err)?;
            self.shared.state.lock().last = Some(last);
            match &self.shared.flusher {
                Some(f) => f.queue(callback),
                None => callback.log_io_completed(Ok(())),
            }
            return Ok(());
        }
        self.blocking(move |s| {
            let wal = &s.wal;
            let next = wal.next_seq();
            if first < next && first >= wal.first_seq() {
                // Entries that replace the tail: what the leader sends wins (openraft normally
                // truncates a conflicting tail first).
                wal.truncate_back(first)?;
            } else if first != next {
                if !wal.is_empty() || first < next {
                    return Err(Error::Hole(format!(
                        "cannot append entry {first}: the log holds {}..{next}",
                        wal.first_seq()
                    )));
                }
                // An empty log (fresh, or purged past its end by a snapshot) continues where
                // the leader's entries do.
                wal.truncate_front(first)?;
            }
            append_chunks(wal, &records)?;
            s.state.lock().last = Some(last);
            Ok(())
        })
        .await
        .map_err(write_err)?;
        match &self.shared.flusher {
            Some(f) => f.queue(callback),
            None => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let from = log_id.index;
        self.blocking(move |s| {
            let wal = &s.wal;
            if from >= wal.next_seq() {
                return Ok(());
            }
            let purged = s.state.lock().hard.purged;
            if purged.is_some_and(|p| from <= p.index) {
                return Err(Error::Hole(format!(
                    "cannot truncate at {from}: purged up to {purged:?}"
                )));
            }
            wal.truncate_back(from)?;
            let last = match wal.last_seq() {
                Some(seq) => Some(*decode::<C>(seq, &wal.read(seq)?)?.get_log_id()),
                None => purged,
            };
            s.state.lock().last = last;
            Ok(())
        })
        .await
        .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.store_hard(move |h| {
            if h.purged.is_none_or(|p| p < log_id) {
                h.purged = Some(log_id);
            }
        })
        .await
        .map_err(write_err)?;
        self.blocking(move |s| {
            let wal = &s.wal;
            let upto = log_id.index + 1;
            if wal.first_seq() < upto {
                wal.truncate_front(upto)?;
            }
            let mut st = s.state.lock();
            if st.last.is_none_or(|l| l < log_id) {
                st.last = Some(log_id);
            }
            Ok(())
        })
        .await
        .map_err(write_err)
    }
}
