//! `KvMachine`: the state machine of a timber cluster, a timber-kv database (and, on a server,
//! its stream store) that every member applies the committed [`Proposal`]s to, and its
//! snapshots.
//!
//! Invariants:
//! - the last applied log id and the membership are stored under reserved keys (first byte
//!   0x00, see `docs/format/raft.md`) in the same batch as the writes of the entries they
//!   describe, so the engine never holds data without the id that produced it, nor the id
//!   without the data; a restart replays exactly the entries after the stored id;
//! - applies are `Buffered` (in the OS, not fsynced): the Raft log is the durable record, and
//!   a power loss that takes applied writes takes their applied id with them, so they are
//!   replayed. The engine is synced before a snapshot is reported built, because openraft
//!   purges the log up to a snapshot: what a purge drops is always durable in the engine;
//! - the machine is the only writer of the stream store's streams; the stream writes of
//!   entries are durable (their acks resolved) before the batch with their applied id is
//!   written, so the streams are never behind the applied id. A replay after a restart may
//!   find them ahead: stream writes are idempotent (an append carries the id of its first
//!   record and a member skips the records it holds; creating an existing stream, truncating
//!   below the start, deleting a missing stream change nothing);
//! - a snapshot holds the keys and every stream's entries from one point between two applies
//!   (an apply and the start of a build exclude each other);
//! - a snapshot install writes an "installing" key (synced) before it touches the data and
//!   removes it with the last batch; an open that finds it refuses to start
//!   ([`Error::Corrupt`]), since the engine then holds a mix of two states.

use std::collections::HashMap;
use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use timber_kv::{Db, Durability, WriteBatch};
use timber_stream::{Ack, Start, StreamConfig, StreamWriter, Streams};

use crate::error::{Error, Result};
use crate::guard::{Expect, ExpectRange};
use crate::hard_state::sync_dir;
use crate::types::{Applied, Op, Proposal, Retention, TypeConfig};

/// Engine keys the state machine keeps for itself; no proposal may write under this prefix.
pub const RESERVED_PREFIX: &[u8] = b"\x00raft/";
/// The engine key past every key under [`RESERVED_PREFIX`].
const RESERVED_END: &[u8] = b"\x00raft0";
/// The engine key of the revision counter: the next revision a [`Op::PutRevised`] stamps
/// (`u64` LE; absent: [`FIRST_REVISION`]). Unlike the reserved keys it is part of the data,
/// carried by snapshots and backups, so revisions keep growing across them; a single node
/// reserves its revisions under it too.
pub const REVISION_KEY: &[u8] = b"v";
/// The first revision stamped; 1 stands for the values stored before revisions existed.
pub const FIRST_REVISION: u64 = 2;

/// The next revision as `db` holds it under [`REVISION_KEY`] (what a state machine stamps
/// next, or on a single node the end of the revisions it reserved).
pub fn revision_counter(db: &Db) -> Result<u64> {
    match db.get(REVISION_KEY)? {
        None => Ok(FIRST_REVISION),
        Some(b) => b.as_ref().try_into().map(u64::from_le_bytes).map_err(|_| Error::Corrupt {
            path: db.path().to_path_buf(),
            reason: format!("the revision counter is {} bytes, not 8", b.len()),
        }),
    }
}

/// Writes `revision` into `value` at byte `at` (`u64` LE); nothing if it does not fit.
pub fn stamp_revision(value: &mut [u8], at: usize, revision: u64) {
    if let Some(slot) = value.get_mut(at..at.saturating_add(8)) {
        slot.copy_from_slice(&revision.to_le_bytes());
    }
}
const APPLIED_KEY: &[u8] = b"\x00raft/applied";
const MEMBERSHIP_KEY: &[u8] = b"\x00raft/membership";
const INSTALLING_KEY: &[u8] = b"\x00raft/installing";

const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
const SNAPSHOT_MAGIC: &[u8; 8] = b"TMBRSNAP";
const SNAPSHOT_VERSION: u32 = 1;
/// Version byte of a snapshot's data (what goes over the network): 1 held keys only, 2 keys
/// and streams, 3 keys and streams with their retention.
const DATA_VERSION: u8 = 3;
const DATA_VERSION_STREAMS: u8 = 2;
const DATA_VERSION_KEYS_ONLY: u8 = 1;
/// Writes of an apply or install are cut into batches of about this size (a batch must fit in
/// one segment of the engine's WAL).
const BATCH_BYTES: usize = 4 << 20;
/// Deletes per batch of a range removal ([`Op::DeleteRange`]).
const RANGE_BATCH: usize = 4096;

type Membership = StoredMembership<u64, BasicNode>;
type Meta = SnapshotMeta<u64, BasicNode>;

/// The replicated state of one member. Clones share it.
#[derive(Clone)]
pub struct KvMachine {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Db>,
    /// The stream store the stream writes of entries go to (a member without one refuses them).
    streams: Option<Streams>,
    /// The writer of each stream written since the machine opened. Held by an apply from
    /// start to end, and by a snapshot build while it reads its view.
    writers: tokio::sync::Mutex<HashMap<String, StreamWriter>>,
    /// When each stream's writer was last used by an apply.
    used: parking_lot::Mutex<HashMap<String, std::time::Instant>>,
    dir: PathBuf,
    builds: AtomicU64,
    stats: parking_lot::Mutex<SnapshotStats>,
}

/// What this member did with snapshots since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotStats {
    /// Snapshots built here (for the log's compaction and for members behind it).
    pub built: u64,
    /// Size of the data of the last one built, in bytes.
    pub last_built_bytes: u64,
    /// How long the last build took (dump, engine sync, file write).
    pub last_build: std::time::Duration,
    /// Snapshots received from a leader and installed here.
    pub installed: u64,
    /// Size of the last one installed, in bytes.
    pub last_installed_bytes: u64,
    /// How long the last install took.
    pub last_install: std::time::Duration,
}

impl std::fmt::Debug for KvMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvMachine").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotData {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    streams: Vec<StreamImage>,
}

/// Snapshot data of version 1.
#[derive(Deserialize)]
struct KeysOnly {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Snapshot data of version 2: streams without their retention.
#[derive(Deserialize)]
struct StreamsV2 {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    streams: Vec<StreamImageV2>,
}

#[derive(Deserialize)]
struct StreamImageV2 {
    name: String,
    first: u64,
    records: Vec<Vec<u8>>,
}

/// One stream in a snapshot: its name, retention, the id of its first entry, and its entries.
#[derive(Serialize, Deserialize)]
struct StreamImage {
    name: String,
    retention: Retention,
    first: u64,
    records: Vec<Vec<u8>>,
}

/// The log id a state machine had applied at `snap`, a snapshot of its engine (what a backup
/// of a member's keyspace stands at).
pub fn applied_in(snap: &timber_kv::Snapshot) -> Result<Option<LogId<u64>>> {
    match snap.get(APPLIED_KEY)? {
        None => Ok(None),
        Some(b) => postcard::from_bytes(&b).map(Some).map_err(|e| Error::Corrupt {
            path: PathBuf::from("<applied log id>"),
            reason: e.to_string(),
        }),
    }
}

impl Proposal {
    /// Refuses a new proposal larger than an entry may be (not checked on apply: an entry in
    /// the log is applied whatever its size).
    pub fn check_size(&self) -> Result<()> {
        let bytes = self.size();
        if bytes > crate::MAX_PROPOSAL_BYTES {
            return Err(Error::TooLarge { bytes, max: crate::MAX_PROPOSAL_BYTES });
        }
        Ok(())
    }

    /// Refuses a proposal that writes under the state machine's reserved keys or the
    /// revision counter, whose revision would not fit in its value, or that holds a range
    /// removal beside anything but range removals.
    pub fn check(&self) -> Result<()> {
        let ranges = self.ops.iter().filter(|op| matches!(op, Op::DeleteRange { .. })).count();
        if ranges > 0 && ranges < self.ops.len() {
            return Err(Error::Config("a range removal is proposed alone".into()));
        }
        check_ops(&self.ops, false)
    }
}

/// [`Proposal::check`] of `ops`; `guarded`: they are the writes of an [`Op::Guarded`], which
/// may only put and delete.
fn check_ops(ops: &[Op], guarded: bool) -> Result<()> {
    for op in ops {
        let key = match op {
            Op::PutRevised { key, value, at } => {
                if (*at as usize).saturating_add(8) > value.len() {
                    return Err(Error::Revision { at: *at, len: value.len() });
                }
                key
            }
            Op::Put { key, .. } | Op::Delete { key } => key,
            Op::DeleteRange { start, end } if !guarded => {
                let covers = |lo: &[u8], hi: &[u8]| start.as_slice() < hi && end.as_slice() > lo;
                if covers(RESERVED_PREFIX, RESERVED_END) {
                    return Err(Error::Reserved(RESERVED_PREFIX.to_vec()));
                }
                if start.as_slice() <= REVISION_KEY && REVISION_KEY < end.as_slice() {
                    return Err(Error::Reserved(REVISION_KEY.to_vec()));
                }
                continue;
            }
            Op::Guarded { expect, ops, .. } if !guarded => {
                // The machine's own keys and the counter are written only as a batch ends:
                // read in the middle of an apply call they would not be what the log says.
                for e in expect {
                    if e.key.starts_with(RESERVED_PREFIX) || e.key == REVISION_KEY {
                        return Err(Error::Reserved(e.key.clone()));
                    }
                    if e.key.is_empty() || e.key.len() > timber_kv::MAX_KEY_LEN {
                        return Err(Error::Config(format!(
                            "an expected key of {} bytes (1 to {} allowed)",
                            e.key.len(),
                            timber_kv::MAX_KEY_LEN
                        )));
                    }
                }
                check_ops(ops, true)?;
                continue;
            }
            _ if guarded => {
                return Err(Error::Config("a guarded write may only put and delete keys".into()))
            }
            _ => continue,
        };
        if key.starts_with(RESERVED_PREFIX) || key == REVISION_KEY {
            return Err(Error::Reserved(key.clone()));
        }
    }
    Ok(())
}

/// The writes of an apply call not yet written, and, once a guarded op needs them, what they
/// leave each key holding: a guard compares with the state the entries before it leave.
#[derive(Default)]
struct Pending {
    batch: WriteBatch,
    /// Built from `batch` at the first guard of the call, then kept with it.
    overlay: Option<HashMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl Pending {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.batch.put(key, value);
        if let Some(o) = &mut self.overlay {
            o.insert(key.to_vec(), Some(value.to_vec()));
        }
    }

    fn delete(&mut self, key: &[u8]) {
        self.batch.delete(key);
        if let Some(o) = &mut self.overlay {
            o.insert(key.to_vec(), None);
        }
    }

    fn take(&mut self) -> WriteBatch {
        self.overlay = None;
        std::mem::take(&mut self.batch)
    }

    /// What the writes here leave each key they wrote holding (built at the first call).
    fn overlay(&mut self) -> &HashMap<Vec<u8>, Option<Vec<u8>>> {
        let batch = &self.batch;
        self.overlay.get_or_insert_with(|| {
            batch.iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect()
        })
    }

    /// Whether every range of `ranges` has the live pairs its digest says, over `db` and the
    /// writes here (the writes in the range merged into the engine's pairs, in key order).
    fn holds_ranges(&mut self, db: &Db, ranges: &[ExpectRange]) -> Result<bool> {
        for r in ranges {
            let bounds = r.bounds();
            let mut mine: Vec<(&[u8], Option<&[u8]>)> = self
                .overlay()
                .iter()
                .filter(|(k, _)| r.contains(k))
                .map(|(k, v)| (k.as_slice(), v.as_deref()))
                .collect();
            mine.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let mut mine = mine.into_iter().peekable();
            let mut stored = db.scan::<&[u8]>(bounds).peekable();
            // The engine's pairs with the writes here over them, one at a time.
            let merged = std::iter::from_fn(|| loop {
                let stored_key = match stored.peek() {
                    Some(Ok((k, _))) => Some(k.clone()),
                    Some(Err(_)) => return stored.next().map(|r| r.map_err(Error::Kv)),
                    None => None,
                };
                let take_mine = match (mine.peek(), &stored_key) {
                    (None, None) => return None,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (Some((mk, _)), Some(sk)) => *mk <= sk.as_ref(),
                };
                if !take_mine {
                    return stored.next().map(|r| r.map_err(Error::Kv));
                }
                let (k, v) = mine.next()?;
                if stored_key.as_deref() == Some(k) {
                    stored.next();
                }
                if let Some(v) = v {
                    return Some(Ok((
                        bytes::Bytes::copy_from_slice(k),
                        bytes::Bytes::copy_from_slice(v),
                    )));
                }
            });
            if crate::guard::range_digest(merged)? != r.digest {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether every key of `expect` holds its expected bytes, over `db` and the writes here.
    fn holds(&mut self, db: &Db, expect: &[Expect]) -> Result<bool> {
        let overlay = self.overlay();
        for e in expect {
            let held = match overlay.get(&e.key) {
                Some(v) => v.as_deref() == e.stored.as_deref(),
                None => db.get(&e.key)?.as_deref() == e.stored.as_deref(),
            };
            if !held {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn sm_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_state_machine(&e).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::read_state_machine(&e).into()
}

/// Decodes the value of one of the machine's own keys.
fn decode_key<T: serde::de::DeserializeOwned>(
    db: &Db,
    key: &[u8],
    value: Option<bytes::Bytes>,
) -> Result<Option<T>> {
    value.map(|b| postcard::from_bytes(&b)).transpose().map_err(|e| Error::Corrupt {
        path: db.path().to_path_buf(),
        reason: format!("state machine key {:?}: {e}", String::from_utf8_lossy(key)),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("ids and memberships always encode")
}

impl KvMachine {
    /// The state machine over `db` (and `streams`, if given: then it is the only writer of
    /// that store's streams), keeping its current snapshot in `dir`.
    pub fn open(db: Arc<Db>, streams: Option<Streams>, dir: impl AsRef<Path>) -> Result<KvMachine> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        if db.get(INSTALLING_KEY)?.is_some() {
            return Err(Error::Corrupt {
                path: db.path().to_path_buf(),
                reason:
                    "a snapshot install was interrupted: the engine holds parts of two states; \
                         remove this member's data and add it to the cluster again"
                        .into(),
            });
        }
        let _ = fs::remove_file(dir.join(SNAPSHOT_TMP));
        Ok(KvMachine {
            inner: Arc::new(Inner {
                db,
                streams,
                writers: Default::default(),
                used: Default::default(),
                dir,
                builds: AtomicU64::new(0),
                stats: Default::default(),
            }),
        })
    }

    /// The engine the machine applies to.
    pub fn db(&self) -> &Arc<Db> {
        &self.inner.db
    }

    fn applied(&self) -> Result<(Option<LogId<u64>>, Membership)> {
        let db = &self.inner.db;
        let applied = decode_key(db, APPLIED_KEY, db.get(APPLIED_KEY)?)?;
        let membership = decode_key(db, MEMBERSHIP_KEY, db.get(MEMBERSHIP_KEY)?)?;
        Ok((applied, membership.unwrap_or_default()))
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        Ok(self.inner.db.write_with(batch, Durability::Buffered)?)
    }

    fn store_snapshot(&self, meta: &Meta, data: &[u8]) -> Result<()> {
        let meta_bytes = encode(meta);
        let mut bytes = Vec::with_capacity(24 + meta_bytes.len() + data.len());
        bytes.extend_from_slice(SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&meta_bytes);
        bytes.extend_from_slice(data);
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let tmp = self.inner.dir.join(SNAPSHOT_TMP);
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(&bytes).map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        let path = self.inner.dir.join(SNAPSHOT_FILE);
        fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, e))?;
        sync_dir(&self.inner.dir)
    }

    fn load_snapshot(&self) -> Result<Option<(Meta, Vec<u8>)>> {
        let path = self.inner.dir.join(SNAPSHOT_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let corrupt = |reason: &str| Error::Corrupt { path: path.clone(), reason: reason.into() };
        if bytes.len() < 20 || &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(corrupt("no snapshot magic number"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().unwrap_or_default()) {
            return Err(corrupt("checksum mismatch"));
        }
        let le32 = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap_or_default());
        if le32(8) != SNAPSHOT_VERSION {
            return Err(corrupt("unsupported snapshot version"));
        }
        let meta_len = le32(12) as usize;
        let data_at = 16usize.checked_add(meta_len).filter(|&e| e <= body.len());
        let data_at = data_at.ok_or_else(|| corrupt("meta length past the end"))?;
        let meta: Meta = postcard::from_bytes(&body[16..data_at])
            .map_err(|e| corrupt(&format!("undecodable meta: {e}")))?;
        Ok(Some((meta, body[data_at..].to_vec())))
    }

    /// A snapshot of the engine and the figures of every stream, taken at one point between
    /// two applies (what a backup of the member holds: the streams' entries up to the ends
    /// listed are those of the applied id in the snapshot).
    pub async fn view(&self) -> Result<(timber_kv::Snapshot, Vec<timber_stream::StreamInfo>)> {
        let _applies = self.inner.writers.lock().await;
        let snap = self.inner.db.snapshot();
        let streams = match &self.inner.streams {
            Some(store) => store.list()?,
            None => Vec::new(),
        };
        Ok((snap, streams))
    }

    /// Reads a consistent view of the engine and the streams into snapshot data, with the
    /// applied id and membership of that same view.
    async fn dump(&self) -> Result<(Option<LogId<u64>>, Membership, Vec<u8>)> {
        let (snap, streams) = {
            // No apply runs while the view is taken: its keys and streams stand at one point.
            let _applies = self.inner.writers.lock().await;
            let snap = self.inner.db.snapshot();
            let mut images = Vec::new();
            if let Some(store) = &self.inner.streams {
                for info in store.list()? {
                    let mut r = store.reader(&info.name, Start::At(info.first_id))?;
                    let mut records = Vec::new();
                    while r.position() < info.next_id {
                        let max = (info.next_id - r.position()).min(1024) as usize;
                        records
                            .extend(r.next_batch(max).await?.into_iter().map(|e| e.data.to_vec()));
                    }
                    images.push(StreamImage {
                        name: info.name,
                        retention: Retention::of(info.config),
                        first: info.first_id,
                        records,
                    });
                }
            }
            (snap, images)
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let db = &me.inner.db;
            let applied = decode_key(db, APPLIED_KEY, snap.get(APPLIED_KEY)?)?;
            let membership: Membership =
                decode_key(db, MEMBERSHIP_KEY, snap.get(MEMBERSHIP_KEY)?)?.unwrap_or_default();
            let mut pairs = Vec::new();
            for r in snap.iter() {
                let (k, v) = r?;
                if !k.starts_with(RESERVED_PREFIX) {
                    pairs.push((k.to_vec(), v.to_vec()));
                }
            }
            let mut data = vec![DATA_VERSION];
            data.extend_from_slice(&encode(&SnapshotData { pairs, streams }));
            Ok((applied, membership, data))
        })
        .await
        .map_err(|e| Error::Raft(format!("snapshot dump: {e}")))?
    }

    /// Snapshot builds and installs since the machine opened.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        *self.inner.stats.lock()
    }

    async fn build(&self) -> Result<(Meta, Vec<u8>)> {
        let started = std::time::Instant::now();
        let (applied, membership, data) = self.dump().await?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            // openraft purges the log up to this snapshot: the engine must hold it durably
            // first (the streams' entries are durable once acknowledged).
            me.inner.db.sync()?;
            let n = me.inner.builds.fetch_add(1, Ordering::Relaxed);
            let id = match applied {
                Some(l) => format!("{}-{}-{}-{n}", l.leader_id.term, l.leader_id.node_id, l.index),
                None => format!("none-{n}"),
            };
            let meta = Meta { last_log_id: applied, last_membership: membership, snapshot_id: id };
            me.store_snapshot(&meta, &data)?;
            let mut st = me.inner.stats.lock();
            st.built += 1;
            st.last_built_bytes = data.len() as u64;
            st.last_build = started.elapsed();
            Ok((meta, data))
        })
        .await
        .map_err(|e| Error::Raft(format!("snapshot build: {e}")))?
    }

    /// Replaces the machine's state by the snapshot's.
    async fn install(&self, meta: &Meta, data: Vec<u8>) -> Result<()> {
        let started = std::time::Instant::now();
        let bad = |reason: String| Error::Corrupt { path: PathBuf::from("<snapshot>"), reason };
        let snap = match data.split_first() {
            Some((&DATA_VERSION, body)) => postcard::from_bytes::<SnapshotData>(body)
                .map_err(|e| bad(format!("undecodable snapshot: {e}")))?,
            Some((&DATA_VERSION_STREAMS, body)) => {
                let v2: StreamsV2 = postcard::from_bytes(body)
                    .map_err(|e| bad(format!("undecodable snapshot: {e}")))?;
                let streams = v2.streams.into_iter().map(|i| StreamImage {
                    name: i.name,
                    retention: Retention::default(),
                    first: i.first,
                    records: i.records,
                });
                SnapshotData { pairs: v2.pairs, streams: streams.collect() }
            }
            Some((&DATA_VERSION_KEYS_ONLY, body)) => {
                let k: KeysOnly = postcard::from_bytes(body)
                    .map_err(|e| bad(format!("undecodable snapshot: {e}")))?;
                SnapshotData { pairs: k.pairs, streams: Vec::new() }
            }
            Some((v, _)) => return Err(bad(format!("unknown snapshot data version {v}"))),
            None => return Err(bad("empty snapshot data".into())),
        };
        if !snap.streams.is_empty() && self.inner.streams.is_none() {
            return Err(Error::Config(
                "a snapshot with streams, on a member without a stream store".into(),
            ));
        }
        let mut writers = self.inner.writers.lock().await;
        let db = self.inner.db.clone();
        let marked = tokio::task::spawn_blocking(move || {
            let mut marker = WriteBatch::new();
            marker.put(INSTALLING_KEY, b"1");
            db.write_with(marker, Durability::Synced)
        });
        marked.await.map_err(|e| Error::Raft(format!("snapshot install: {e}")))??;
        if let Some(store) = &self.inner.streams {
            for (_, w) in writers.drain() {
                // A writer that fails to close loses nothing the snapshot does not replace.
                let _ = w.close().await;
            }
            for info in store.list()? {
                match store.delete(&info.name).await {
                    Ok(()) | Err(timber_stream::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            for image in &snap.streams {
                store.create_at(&image.name, image.retention.config(), image.first).await?;
                let w = store.writer(&image.name).await?;
                for r in &image.records {
                    drop(w.send(r.clone()).await?);
                }
                w.flush().await?;
                writers.insert(image.name.clone(), w);
            }
        }
        let me = self.clone();
        let meta = meta.clone();
        let installed = tokio::task::spawn_blocking(move || {
            me.install_keys(&meta, &snap.pairs)?;
            me.store_snapshot(&meta, &data)?;
            Ok::<_, Error>(data.len())
        });
        let bytes =
            installed.await.map_err(|e| Error::Raft(format!("snapshot install: {e}")))??;
        drop(writers);
        let mut st = self.inner.stats.lock();
        st.installed += 1;
        st.last_installed_bytes = bytes as u64;
        st.last_install = started.elapsed();
        Ok(())
    }

    /// The keyspace part of an install: replaces every pair, then the applied id and the
    /// membership, removing the "installing" key with the last batch.
    fn install_keys(&self, meta: &Meta, pairs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let db = &self.inner.db;
        // Delete what the snapshot does not hold, then write what it does.
        let mut batch = WriteBatch::new();
        for r in db.iter() {
            let (k, _) = r?;
            if !k.starts_with(RESERVED_PREFIX) {
                batch.delete(&k);
                if batch.size() >= BATCH_BYTES {
                    self.write(std::mem::take(&mut batch))?;
                }
            }
        }
        for (k, v) in pairs {
            batch.put(k, v);
            if batch.size() >= BATCH_BYTES {
                self.write(std::mem::take(&mut batch))?;
            }
        }
        match meta.last_log_id {
            Some(id) => batch.put(APPLIED_KEY, encode(&id)),
            None => batch.delete(APPLIED_KEY),
        };
        batch.put(MEMBERSHIP_KEY, encode(&meta.last_membership));
        batch.delete(INSTALLING_KEY);
        db.write_with(batch, Durability::Synced)?;
        Ok(())
    }

    async fn apply_entries(&self, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<Applied>> {
        let mut applied = Vec::with_capacity(entries.len());
        let mut writers = self.inner.writers.lock().await;
        let mut acks = Vec::new();
        let mut batch = Pending::default();
        let mut last = None;
        // The next revision, read when first needed and stored with each batch that used it.
        let mut revision: Option<u64> = None;
        for e in entries {
            let mut outcome = Applied::default();
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(p) if p.removes_ranges() => {
                    p.check()?;
                    // In several batches: what the entries before it wrote goes first, with
                    // their applied id, so that a stop in the middle applies this entry again.
                    if let Some(id) = last {
                        self.write_applied(&mut batch, &mut acks, id, revision).await?;
                    }
                    let ranges: Vec<(Vec<u8>, Vec<u8>)> = p
                        .ops
                        .into_iter()
                        .filter_map(|op| match op {
                            Op::DeleteRange { start, end } => Some((start, end)),
                            _ => None,
                        })
                        .collect();
                    // Readers of this member see the ranges whole until the last key is gone
                    // (nothing else writes them while the entry applies).
                    let _frozen = self.inner.db.freeze(&ranges);
                    for (start, end) in &ranges {
                        self.delete_range(start, end)?;
                    }
                }
                EntryPayload::Normal(p) => {
                    p.check()?;
                    for op in p.ops {
                        match op {
                            Op::Guarded { expect, ranges, ops } => {
                                let db = &self.inner.db;
                                let held =
                                    batch.holds(db, &expect)? && batch.holds_ranges(db, &ranges)?;
                                if held {
                                    for op in ops {
                                        self.apply_kv(&mut batch, op, &mut revision)?;
                                    }
                                }
                                outcome.guards.push(held);
                            }
                            op @ (Op::Put { .. } | Op::PutRevised { .. } | Op::Delete { .. }) => {
                                self.apply_kv(&mut batch, op, &mut revision)?;
                            }
                            op => self.apply_stream(&mut writers, op, &mut acks).await?,
                        }
                    }
                }
                EntryPayload::Membership(m) => {
                    batch.put(MEMBERSHIP_KEY, &encode(&Membership::new(Some(e.log_id), m)));
                }
            }
            applied.push(outcome);
            last = Some(e.log_id);
            if batch.batch.size() >= BATCH_BYTES {
                self.write_applied(&mut batch, &mut acks, e.log_id, revision).await?;
            }
        }
        // No entry, no stream write to wait for.
        if let Some(id) = last {
            self.write_applied(&mut batch, &mut acks, id, revision).await?;
        }
        Ok(applied)
    }

    /// Writes `batch` with `id` as the applied log id, and the revision counter if a write
    /// stamped one, once the stream writes of `acks` are durable (the applied id never goes
    /// ahead of the streams it covers).
    async fn write_applied(
        &self,
        batch: &mut Pending,
        acks: &mut Vec<Ack>,
        id: LogId<u64>,
        revision: Option<u64>,
    ) -> Result<()> {
        durable(acks).await?;
        batch.put(APPLIED_KEY, &encode(&id));
        if let Some(r) = revision {
            batch.put(REVISION_KEY, &r.to_le_bytes());
        }
        self.write(batch.take())
    }

    /// Removes the keys of `[start, end)` from the engine, [`RANGE_BATCH`] deletes a batch
    /// (walking one snapshot: a walk from the start again would step over every tombstone
    /// written so far).
    fn delete_range(&self, start: &[u8], end: &[u8]) -> Result<()> {
        let db = &self.inner.db;
        let mut b = WriteBatch::new();
        for kv in db.scan(start..end) {
            b.delete(kv?.0);
            if b.len() >= RANGE_BATCH {
                self.write(std::mem::take(&mut b))?;
            }
        }
        if !b.is_empty() {
            self.write(b)?;
        }
        Ok(())
    }

    /// Adds a put or delete to `batch`, stamping a [`Op::PutRevised`] with the next revision.
    fn apply_kv(&self, batch: &mut Pending, op: Op, revision: &mut Option<u64>) -> Result<()> {
        match op {
            Op::Put { key, value } => batch.put(&key, &value),
            Op::PutRevised { key, mut value, at } => {
                let r = match *revision {
                    Some(r) => r,
                    None => revision_counter(&self.inner.db)?,
                };
                // `check` saw that the revision fits.
                stamp_revision(&mut value, at as usize, r);
                batch.put(&key, &value);
                *revision = Some(r + 1);
            }
            Op::Delete { key } => batch.delete(&key),
            // `check` let only puts and deletes into a guarded op; streams go elsewhere.
            _ => {}
        }
        Ok(())
    }

    /// Applies one stream write; the acks of appended records join `acks`.
    async fn apply_stream(
        &self,
        writers: &mut HashMap<String, StreamWriter>,
        op: Op,
        acks: &mut Vec<Ack>,
    ) -> Result<()> {
        let Some(store) = &self.inner.streams else {
            return Err(Error::Config("a stream write, on a member without a stream store".into()));
        };
        match op {
            Op::Put { .. }
            | Op::PutRevised { .. }
            | Op::Delete { .. }
            | Op::Guarded { .. }
            | Op::DeleteRange { .. } => {}
            Op::StreamCreate { name } => create(store, &name, StreamConfig::default()).await?,
            Op::StreamCreateWith { name, retention } => {
                create(store, &name, retention.config()).await?;
            }
            Op::StreamAppend { name, at, records } => {
                self.inner.used.lock().insert(name.clone(), std::time::Instant::now());
                let mut attempt = 0;
                loop {
                    let w = match writers.entry(name.clone()) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(store.writer(&name).await?)
                        }
                    };
                    let next = w.next_id();
                    if at > next {
                        return Err(Error::Corrupt {
                            path: PathBuf::from(format!("<stream {name}>")),
                            reason: format!("an append at id {at}, but the stream ends at {next}"),
                        });
                    }
                    let held = (next - at) as usize;
                    let mut sent = Ok(());
                    for r in records.iter().skip(held) {
                        match w.send(r.clone()).await {
                            Ok(a) => acks.push(a),
                            Err(e) => {
                                sent = Err(e);
                                break;
                            }
                        }
                    }
                    match sent {
                        Ok(()) => break,
                        // A writer that failed refuses everything after: open a new one, which
                        // starts after what became durable, once.
                        Err(e) if attempt == 0 => {
                            tracing::warn!(stream = %name, error = %e, "stream writer failed; reopening");
                            attempt += 1;
                            acks.clear();
                            writers.remove(&name);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Op::StreamTruncate { name, before } => {
                durable(acks).await?;
                match store.truncate(&name, before).await {
                    Ok(_) | Err(timber_stream::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Op::StreamDelete { name } => {
                durable(acks).await?;
                if let Some(w) = writers.remove(&name) {
                    let _ = w.close().await;
                }
                match store.delete(&name).await {
                    Ok(()) | Err(timber_stream::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Flushes and closes the stream writers no apply used for `idle` (each holds a task and
    /// an open segment); returns how many. The next append to such a stream opens a new one.
    /// Waits for an apply under way.
    pub async fn close_idle_writers(&self, idle: std::time::Duration) -> u64 {
        let mut writers = self.inner.writers.lock().await;
        let idle_names: Vec<String> = {
            let used = self.inner.used.lock();
            writers
                .keys()
                .filter(|n| used.get(*n).is_none_or(|t| t.elapsed() >= idle))
                .cloned()
                .collect()
        };
        let mut closed = 0;
        for name in idle_names {
            self.inner.used.lock().remove(&name);
            if let Some(w) = writers.remove(&name) {
                if let Err(e) = w.close().await {
                    tracing::warn!(stream = %name, error = %e, "closing an idle stream writer failed");
                }
                closed += 1;
            }
        }
        closed
    }

    /// Flushes and closes every stream writer (each holds a task and an open segment); the next
    /// append to a stream opens a new one. Waits for an apply under way.
    pub async fn close_writers(&self) {
        let mut writers = self.inner.writers.lock().await;
        for (_, w) in writers.drain() {
            if let Err(e) = w.close().await {
                tracing::warn!(error = %e, "closing a stream writer failed");
            }
        }
    }
}

/// Creates a stream; nothing if it exists (a replay).
async fn create(store: &Streams, name: &str, config: StreamConfig) -> Result<()> {
    match store.create(name, config).await {
        Ok(_) | Err(timber_stream::Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Waits until every record in `acks` is durable.
async fn durable(acks: &mut Vec<Ack>) -> Result<()> {
    for a in acks.drain(..) {
        a.await?;
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for KvMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let (meta, data) = self.build().await.map_err(read_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for KvMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, Membership), StorageError<u64>> {
        self.applied().map_err(read_err)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.apply_entries(entries.into_iter().collect()).await.map_err(sm_err)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        self.install(meta, snapshot.into_inner())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let snap = self.load_snapshot().map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(snap.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proposal_larger_than_an_entry_may_be_is_refused_but_applies_if_logged() {
        let mut p = Proposal::default();
        p.put(b"k".to_vec(), vec![0u8; crate::MAX_PROPOSAL_BYTES]);
        assert!(matches!(p.check_size(), Err(Error::TooLarge { .. })));
        // An entry already in a log (written before the limit) is still applied.
        assert!(p.check().is_ok());
        let mut p = Proposal::default();
        p.put(b"k".to_vec(), vec![0u8; crate::MAX_PROPOSAL_BYTES - 1 - Proposal::OVERHEAD]);
        assert!(p.check_size().is_ok());
        // Many empty records are not a small proposal.
        let mut p = Proposal::default();
        p.append("s", 0, vec![Vec::new(); crate::MAX_PROPOSAL_BYTES / Proposal::OVERHEAD]);
        assert!(matches!(p.check_size(), Err(Error::TooLarge { .. })));
    }
}
