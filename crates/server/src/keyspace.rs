//! The keyspace the endpoints share: typed values (strings, and the handles of Redis streams)
//! with optional expiry, on timber-kv.
//!
//! Layout in the KV engine: `k<key>` → `[kind u8][expire_at ms u64 LE, 0 = never]`, then for
//! kind 3, a string, `[revision u64 LE][bytes]` (its value); for kind 2, a stream, its handle
//! (see [`crate::streams`]); kind 1 is a string stored before revisions, `[bytes]` after the
//! deadline (read as revision 1, never written now). `e<expire_at u64 BE><key>` → empty, an
//! index of keys with a deadline for the sweep; `v` → the revision counter
//! ([`crate::revisions`]). Other first bytes belong to [`crate::streams`] (`u`, `r`, `g`, `p`).
//!
//! A string's revision (its version, as the API calls it) is stamped when its write is
//! committed, never chosen by the command: by [`crate::revisions`] on a single node, by the
//! state machine on apply in a cluster; a value as built carries 0 in its slot.
//!
//! Invariants: a key whose deadline has passed is never returned (reads check it, the sweep
//! deletes it); every write of a key holds its stripe lock, and read-modify-write commands hold
//! it from read to write, so they are atomic with respect to every other write of the key (a
//! DEL or MSET cannot land between an INCR's read and its write); an index entry may be stale (the key was
//! overwritten or persisted) and the sweep then only drops the index entry.

use std::collections::HashSet;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use timber_kv::{Db, Durability, WriteBatch};

use crate::config::Sync;
use crate::idle::keyspace_sync::SyncRounds;
use crate::idle::IdleWork;
use crate::replication::Replication;
use crate::revisions::Revisions;
use crate::versions::{Epoch, Versions, Watched};

/// Key locks (a byte each). Many, because in a cluster a pipeline of writes holds the stripes
/// of its keys for a Raft round trip: two pipelines of 16 random keys then rarely share one.
const STRIPES: usize = 4096;

/// Errors of keyspace operations.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The storage engine failed.
    #[error("storage: {0}")]
    Kv(#[from] timber_kv::Error),
    /// A stored value failed to decode.
    #[error("corrupt value of key {0:?}")]
    Corrupt(Bytes),
    /// Making writes durable failed; the engine refuses writes from then on.
    #[error("storage: {0}")]
    Sync(std::sync::Arc<timber_kv::Error>),
    /// The key holds another kind of value than the command works on.
    #[error("WRONGTYPE Operation against a key holding the wrong kind of value")]
    WrongType,
    /// In a cluster, this member does not lead: writes (and linearizable reads) go to the
    /// leader. Nothing was written.
    #[error("READONLY You can't write against a read only replica: the leader is {leader}")]
    NotLeader {
        /// Who leads, as far as this member knows.
        leader: String,
    },
    /// In a cluster, no quorum answered in time; retry. A write may still be applied later.
    #[error("CLUSTERDOWN {0}")]
    ClusterDown(String),
    /// In a cluster, the leader failed a call this member passed to it.
    #[error("the leader failed: {0}")]
    Leader(String),
    /// In a cluster, a write larger than one Raft entry may be. Nothing was written.
    #[error("{0}")]
    TooLarge(String),
    /// In a cluster, a membership change the leader refused (not retryable as it is: a member
    /// not found, not a voter).
    #[error("refused: {0}")]
    Refused(String),
}

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A string.
    String,
    /// A Redis stream; the value's bytes are its handle.
    Stream,
}

/// The kind byte of a string stored before revisions: `[1][expire_at]` then its bytes.
const STRING_UNREVISED: u8 = 1;
/// The kind byte of a Redis stream's handle.
const STREAM: u8 = 2;
/// The kind byte of a string: `[3][expire_at][revision]` then its bytes.
const STRING: u8 = 3;
/// Where a string's revision is stored in its value.
const REVISION_AT: usize = 9;
/// The revision a string stored before revisions reads as.
const UNREVISED: u64 = 1;

impl Kind {
    /// The name `TYPE` reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Stream => "stream",
        }
    }
}

/// A stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Value {
    /// What the key holds.
    pub(crate) kind: Kind,
    /// The bytes.
    pub(crate) data: Bytes,
    /// Deadline in ms since the Unix epoch.
    pub(crate) expire_at: Option<u64>,
    /// A string's revision as stored (0 in a value not read from the engine: a commit stamps
    /// the one stored).
    pub(crate) revision: u64,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The first byte of a key's engine key: its value.
const DATA: u8 = b'k';
/// The first byte of an expiry index entry's engine key.
const INDEX: u8 = b'e';
/// Prefix of the engine keys that map a Redis stream to its timber stream.
pub(crate) const STREAM_REVERSE: u8 = b'r';
/// On a single node, present while a `FLUSHALL` deletes keys: written before its first delete
/// and removed after its last, so that an open that finds it deletes the rest.
const CLEARING_KEY: &[u8] = b"\x00clearing";
/// The engine key ranges `FLUSHALL` empties: the values and the expiry index.
const CLEARED: [(&[u8], &[u8]); 2] = [(b"k", b"l"), (b"e", b"f")];

/// A range of engine keys, as a transaction scanned it.
pub(crate) type EngineRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

pub(crate) fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DATA);
    k.extend_from_slice(key);
    k
}

pub(crate) fn index_key(at: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 9);
    k.push(INDEX);
    k.extend_from_slice(&at.to_be_bytes());
    k.extend_from_slice(key);
    k
}

impl Value {
    /// A string value without deadline.
    pub(crate) fn string(data: impl Into<Bytes>) -> Value {
        Value { kind: Kind::String, data: data.into(), expire_at: None, revision: 0 }
    }
}

/// The value `key`'s engine entry holds (`stored`), if it is live at the time `now` reads.
pub(crate) fn live(
    key: &[u8],
    stored: Option<Bytes>,
    now: impl FnOnce() -> u64,
) -> Result<Option<Value>, Error> {
    let Some(v) = stored else { return Ok(None) };
    let v = decode(key, &v)?;
    // The clock is read only for a value that can expire.
    Ok(v.expire_at.is_none_or(|at| at > now()).then_some(v))
}

/// A value that must be a string (or nothing): [`Error::WrongType`] otherwise.
pub(crate) fn string(v: Option<Value>) -> Result<Option<Value>, Error> {
    match v {
        Some(v) if v.kind != Kind::String => Err(Error::WrongType),
        v => Ok(v),
    }
}

fn decode(key: &[u8], v: &Bytes) -> Result<Value, Error> {
    let h = header(key, v)?;
    Ok(Value { kind: h.kind, data: v.slice(h.len..), expire_at: h.expire_at, revision: h.revision })
}

/// Where the revision goes in the value stored under the engine key `key`, if it is a string's
/// (what a commit stamps).
pub(crate) fn revision_slot(key: &[u8], value: &[u8]) -> Option<usize> {
    (key.first() == Some(&DATA) && value.first() == Some(&STRING) && value.len() >= HEADER_MAX)
        .then_some(REVISION_AT)
}

/// A failure to stamp revisions: the engine's, or a damaged revision counter.
fn stamp_error(e: timber_cluster::Error) -> Error {
    match e {
        timber_cluster::Error::Kv(e) => Error::Kv(e),
        _ => Error::Corrupt(Bytes::from_static(timber_cluster::REVISION_KEY)),
    }
}

/// The engine keys of the keys starting with `prefix`, at or after `start`, before `end` (empty:
/// no bound), as a half-open range; `None` if no key lies in it.
pub(crate) fn data_range(prefix: &[u8], start: &[u8], end: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let lo = data_key(start.max(prefix));
    // The first engine key after every one starting with the prefix (the data keys' prefix
    // byte is below 0xff, so there is one).
    let mut hi = data_key(prefix);
    while hi.last() == Some(&u8::MAX) {
        hi.pop();
    }
    if let Some(last) = hi.last_mut() {
        *last += 1;
    }
    if !end.is_empty() {
        hi = hi.min(data_key(end));
    }
    (lo < hi).then_some((lo, hi))
}

/// The longest header of a stored value (a string's).
const HEADER_MAX: usize = 17;

/// A value's header as stored.
struct EncodedHeader {
    bytes: [u8; HEADER_MAX],
    len: usize,
}

impl EncodedHeader {
    fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&self.bytes)
    }
}

/// A value's header as stored: its kind, its deadline (ms, little-endian, 0 = none), and for a
/// string a revision slot of zeros (stamped by the commit).
fn encode_header(v: &Value) -> EncodedHeader {
    let mut bytes = [0u8; HEADER_MAX];
    bytes[1..9].copy_from_slice(&v.expire_at.unwrap_or(0).to_le_bytes());
    let (kind, len) = match v.kind {
        Kind::String => (STRING, HEADER_MAX),
        Kind::Stream => (STREAM, 9),
    };
    bytes[0] = kind;
    EncodedHeader { bytes, len }
}

/// What a stored value's header says.
struct Header {
    kind: Kind,
    expire_at: Option<u64>,
    revision: u64,
    /// Where the data starts.
    len: usize,
}

/// The header of a stored value, without its data.
fn header(key: &[u8], v: &[u8]) -> Result<Header, Error> {
    let corrupt = || Error::Corrupt(Bytes::copy_from_slice(key));
    let at = crate::codec::u64_le(v, 1).ok_or_else(corrupt)?;
    let expire_at = (at != 0).then_some(at);
    match v.first() {
        Some(&STRING) => {
            let revision = crate::codec::u64_le(v, REVISION_AT).ok_or_else(corrupt)?;
            Ok(Header { kind: Kind::String, expire_at, revision, len: HEADER_MAX })
        }
        Some(&STRING_UNREVISED) => {
            Ok(Header { kind: Kind::String, expire_at, revision: UNREVISED, len: 9 })
        }
        Some(&STREAM) => Ok(Header { kind: Kind::Stream, expire_at, revision: 0, len: 9 }),
        _ => Err(corrupt()),
    }
}

/// The stripe of a key.
fn stripe(key: &[u8]) -> usize {
    (crate::versions::hash(key) % STRIPES as u64) as usize
}

/// The shared keyspace.
#[derive(Debug)]
pub(crate) struct Keyspace {
    db: std::sync::Arc<Db>,
    durability: Durability,
    /// Under `--sync always` (and only then): the rounds that answer [`Keyspace::durable`].
    sync_rounds: Option<SyncRounds>,
    stripes: Vec<Mutex<()>>,
    /// In a cluster, the member writes are proposed through (set once, at startup).
    replication: std::sync::OnceLock<std::sync::Arc<Replication>>,
    cursors: Mutex<lru::LruCache<u64, Bytes>>,
    next_cursor: AtomicU64,
    /// What WATCH compares: bumped by every commit of a key and by stream commands.
    versions: Versions,
    /// On a single node, the revisions commits stamp.
    revisions: Revisions,
}

impl Keyspace {
    /// Opens (creating) the keyspace in `dir` with the server's sync mode and the engine's
    /// memory budget; under `--sync always`, its sync rounds run on the parking workers of a
    /// runtime that runs `idle`.
    pub(crate) fn open(
        dir: &std::path::Path,
        sync: Sync,
        memory_budget: Option<usize>,
        idle: &IdleWork,
    ) -> Result<Keyspace, Error> {
        // With `Always`, writes are buffered and the connection awaits `durable` once per batch
        // of pipelined commands, before any reply is sent.
        let (synced, interval) = match sync {
            Sync::Always => (true, None),
            Sync::Interval(d) => (false, Some(d)),
            Sync::Manual => (false, None),
        };
        // Under `Always` the connection syncs before it replies, so writes need not reach the OS
        // first (and the sync is cheaper when it writes them itself).
        let durability = if synced { Durability::Deferred } else { Durability::Buffered };
        let opts = timber_kv::Options::default()
            .durability(durability)
            .wal_sync_interval(interval)
            // GET, INCR and the stream handles are point reads of recently written keys.
            .memtable_hash_index(true)
            .memory_budget(memory_budget)
            .name("keyspace");
        let db = std::sync::Arc::new(Db::open(dir, opts)?);
        let sync_rounds = match synced {
            true => Some(SyncRounds::start(db.clone(), idle).map_err(|e| {
                Error::Kv(timber_kv::Error::Io { path: dir.to_path_buf(), op: "spawn", source: e })
            })?),
            false => None,
        };
        let keys = Keyspace {
            db,
            durability,
            sync_rounds,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            replication: std::sync::OnceLock::new(),
            cursors: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).expect("> 0"),
            )),
            next_cursor: AtomicU64::new(1),
            versions: Versions::new(),
            revisions: Revisions::default(),
        };
        // A FLUSHALL that was stopped in the middle deletes the rest before anything is served.
        if keys.db.get(CLEARING_KEY)?.is_some() {
            keys.clear_here(&mut HashSet::new())?;
        }
        Ok(keys)
    }

    /// From now on, writes are proposed through `r` (a cluster member) instead of written.
    pub(crate) fn replicate_through(&self, r: std::sync::Arc<Replication>) {
        let _ = self.replication.set(r);
    }

    /// The cluster member writes go through, if this server is one.
    pub(crate) fn replication(&self) -> Option<&std::sync::Arc<Replication>> {
        self.replication.get()
    }

    /// Returns once a read of this member's engine is linearizable: at once on a single node;
    /// in a cluster, once this member confirmed it leads and applied everything committed
    /// (`NotLeader` on a follower, `ClusterDown` without a quorum). Awaits the barrier on
    /// Raft's runtime without holding a thread.
    pub(crate) async fn linearizable_async(self: &std::sync::Arc<Self>) -> Result<(), Error> {
        match self.replication.get() {
            None => Ok(()),
            Some(r) => r.read_barrier_async().await,
        }
    }

    /// Writes `b`: to the engine, or in a cluster, as a proposal of the leader that returns
    /// once a majority has it and this member applied it (the one write path of the keyspace).
    /// Then bumps the versions of the keys it wrote (their stripe locks are held).
    pub(crate) fn commit(&self, b: WriteBatch) -> Result<(), Error> {
        self.write_through(b, |r, b| r.commit(b))
    }

    /// [`Keyspace::commit`], with `replicate` proposing `b` in a cluster.
    fn write_through(
        &self,
        mut b: WriteBatch,
        replicate: impl FnOnce(&Replication, &WriteBatch) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let written: smallvec::SmallVec<[usize; 4]> =
            b.iter().filter_map(|(k, _)| k.strip_prefix(&[DATA]).map(Versions::slot)).collect();
        let r = match self.replication.get() {
            None => self
                .revisions
                .stamp(&self.db, &mut b, revision_slot)
                .map_err(stamp_error)
                .and_then(|()| self.db.write_with(b, self.durability).map_err(Error::from)),
            Some(r) => replicate(r, &b),
        };
        // Also after a failure: in a cluster the write may still be applied. Not after a
        // guarded write's refusal, which wrote nothing: a watcher of its keys need not abort.
        if !matches!(r, Err(Error::Kv(timber_kv::Error::Conflict { .. }))) {
            for slot in written {
                self.versions.bump_slot(slot);
            }
        }
        r
    }

    /// [`Keyspace::commit`] of a transaction that read or wrote the engine keys `depends` and
    /// scanned the engine key ranges `ranges`, which the caller checked were not written
    /// since it read them. In a cluster the check is also made where it decides, on apply:
    /// the entry expects each key to hold the bytes it holds in `seen` (the state the
    /// caller's check passed on; now, if `None`, for a caller holding the keys' stripe locks
    /// since its check) and each range the pairs it has there, so a write that reaches the
    /// log in between makes every member refuse it alike, a conflict.
    pub(crate) fn commit_guarded(
        &self,
        b: WriteBatch,
        depends: &[impl AsRef<[u8]>],
        ranges: &[EngineRange],
        seen: Option<&timber_kv::Snapshot>,
    ) -> Result<(), Error> {
        if self.replication.get().is_none() {
            return self.commit(b);
        }
        let now;
        let seen = match seen {
            Some(s) => s,
            None => {
                now = self.db.snapshot();
                &now
            }
        };
        let ranges = ranges
            .iter()
            .map(|(lo, hi)| {
                let digest = timber_cluster::range_digest(seen.scan((lo.clone(), hi.clone())))?;
                Ok(timber_cluster::ExpectRange { lo: lo.clone(), hi: hi.clone(), digest })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let expect = depends
            .iter()
            .map(|k| {
                let stored = seen.get(k)?.map(|v| v.to_vec());
                Ok(timber_cluster::Expect { key: k.as_ref().to_vec(), stored })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        self.write_through(b, |r, b| r.commit_guarded(b, expect, ranges))
    }

    /// Where this keyspace's versions compare ([`crate::versions`]): `None` on a cluster member
    /// that does not lead.
    pub(crate) fn epoch(&self) -> Option<Epoch> {
        let term = match self.replication.get() {
            None => 0,
            Some(r) => r.leader_term()?,
        };
        Some(Epoch { nonce: self.versions.nonce(), term })
    }

    /// `keys` as they are now, for WATCH.
    pub(crate) fn watch(&self, keys: &[Bytes]) -> Result<Vec<Watched>, Error> {
        keys.iter()
            .map(|k| {
                // The version first: a write between the two reads then shows as a change.
                let version = self.versions.get(k);
                let stored = self.db.get(data_key(k))?;
                let stale = stored.is_some();
                let v = live(k, stored, now_ms)?;
                let stale = stale && v.is_none();
                Ok(Watched { key: k.clone(), version, expires: v.and_then(|v| v.expire_at), stale })
            })
            .collect()
    }

    /// Whether no watched key was written or expired since it was watched. The caller holds
    /// their stripe locks.
    pub(crate) fn unchanged(&self, watched: &[Watched]) -> bool {
        let now = now_ms();
        watched.iter().all(|w| {
            let same =
                self.versions.get(&w.key) == w.version && w.expires.is_none_or(|at| at > now);
            // A stale value deleted since: unchanged while the key still has no live value.
            same || (w.stale && self.get(&w.key).is_ok_and(|v| v.is_none()))
        })
    }

    /// Records writes of `keys` made without their stripe locks (stream commands): called
    /// before and after such a write.
    pub(crate) fn touch(&self, keys: &[impl AsRef<[u8]>]) {
        for k in keys {
            self.versions.bump(k.as_ref());
        }
    }

    /// Every stripe lock, in order: no write of any key runs while they are held.
    pub(crate) fn lock_all(&self) -> Vec<MutexGuard<'_, ()>> {
        (0..STRIPES).map(|i| self.lock_stripe(i)).collect()
    }

    /// Whether acknowledged writes must be durable: then callers await [`Keyspace::durable`]
    /// before replying.
    pub(crate) fn synced(&self) -> bool {
        self.sync_rounds.is_some()
    }

    /// Runs `f` off the async workers and waits until its writes may be acknowledged
    /// ([`Keyspace::durable`]): the write path of the gRPC and HTTP endpoints. `None` if the
    /// task died.
    pub(crate) async fn write_durably<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce(&Keyspace) -> Result<T, Error> + Send + 'static,
    ) -> Option<Result<T, Error>> {
        let keys = self.clone();
        let r = tokio::task::spawn_blocking(move || f(&keys)).await.ok()?;
        if r.is_ok() {
            if let Err(e) = self.durable().await {
                return Some(Err(e));
            }
        }
        Some(r)
    }

    /// Resolves once every write made before the call may be acknowledged: under `--sync
    /// always`, once it is durable (one fsync, by the sync thread or an idle runtime worker,
    /// serves every caller waiting at that moment); in the other modes at once (the interval
    /// sync or `manual` make writes durable).
    pub(crate) fn durable(&self) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
        self.durable_for(1)
    }

    /// [`Keyspace::durable`] for a caller that waits for `writes` writes (a pipeline of them).
    pub(crate) fn durable_for(
        &self,
        writes: usize,
    ) -> impl std::future::Future<Output = Result<(), Error>> + use<> {
        // In a cluster a write is acknowledged once a majority's Raft logs hold it: the
        // engine under the state machine need not be synced for it.
        let wait = match self.replication.get() {
            Some(_) => None,
            None => self.sync_rounds.as_ref().map(|t| t.durable(writes)),
        };
        async move {
            match wait {
                Some(w) => w.await.map_err(Error::Sync),
                None => Ok(()),
            }
        }
    }

    /// Syncs and closes the engine.
    pub(crate) fn close(&self) -> Result<(), Error> {
        if let Some(t) = &self.sync_rounds {
            t.stop();
        }
        Ok(self.db.close()?)
    }

    /// The stripe lock of a key: hold it across a read and the write that depends on it.
    pub(crate) fn lock(&self, key: &[u8]) -> MutexGuard<'_, ()> {
        self.lock_stripe(stripe(key))
    }

    /// Takes one stripe lock. In a cluster a holder keeps it for a Raft round trip: a wait
    /// for it hands the worker's other connections to another thread, as the proposal does.
    fn lock_stripe(&self, i: usize) -> MutexGuard<'_, ()> {
        #[expect(clippy::indexing_slicing, reason = "stripe() < STRIPES = stripes.len()")]
        let m = &self.stripes[i];
        match m.try_lock() {
            Some(g) => g,
            None if self.replication.get().is_some() => crate::replication::blocking(|| m.lock()),
            None => m.lock(),
        }
    }

    /// The live value of a key, of any kind.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Value>, Error> {
        live(key, self.db.get(data_key(key))?, now_ms)
    }

    /// [`Keyspace::get_string`] of several keys, in the order of `keys`: faster than one by
    /// one (see [`Db::get_many`]). Fails as a whole if the engine does; a key that holds
    /// another kind, or a value that does not decode, fails alone.
    #[allow(clippy::type_complexity)]
    pub(crate) fn get_strings(
        &self,
        keys: &[&[u8]],
    ) -> Result<Vec<Result<Option<Value>, Error>>, Error> {
        if keys.iter().any(|k| k.len() >= timber_kv::MAX_KEY_LEN) {
            // The engine refuses such a key, and a read of several keys as a whole: read them
            // one by one, so that only that one fails.
            return Ok(keys.iter().map(|k| self.get_string(k)).collect());
        }
        // The engine keys, one after the other in one buffer.
        let mut buf = Vec::with_capacity(keys.iter().map(|k| k.len() + 1).sum());
        for k in keys {
            buf.push(DATA);
            buf.extend_from_slice(k);
        }
        let mut rest = &buf[..];
        let data: Vec<&[u8]> = keys
            .iter()
            .map(|k| {
                let (key, tail) = rest.split_at(k.len() + 1);
                rest = tail;
                key
            })
            .collect();
        let found = self.db.get_many(&data)?;
        let now = std::cell::OnceCell::new();
        let now = || *now.get_or_init(now_ms);
        Ok(keys.iter().zip(found).map(|(k, v)| live(k, v, now).and_then(string)).collect())
    }

    /// The live value of a key that must hold a string (or nothing): [`Error::WrongType`]
    /// otherwise.
    pub(crate) fn get_string(&self, key: &[u8]) -> Result<Option<Value>, Error> {
        string(self.get(key)?)
    }

    /// The engine, for the other structures kept beside the keys ([`crate::streams`]).
    pub(crate) fn db(&self) -> &std::sync::Arc<Db> {
        &self.db
    }

    /// The durability of keyspace writes (buffered, or deferred under `--sync always`; callers
    /// await [`Keyspace::durable`] before acknowledging).
    pub(crate) fn durability(&self) -> Durability {
        self.durability
    }

    /// A value as stored under its data key.
    pub(crate) fn encoded(v: &Value) -> Vec<u8> {
        [encode_header(v).as_slice(), &v.data].concat()
    }

    pub(crate) fn put_into(b: &mut WriteBatch, key: &[u8], v: &Value) {
        b.put_parts(&[&[DATA], key], &[encode_header(v).as_slice(), &v.data]);
        if let Some(at) = v.expire_at {
            b.put_parts(&[&[INDEX], &at.to_be_bytes(), key], &[]);
        }
    }

    /// Stores values, atomically. The caller holds their stripe locks (`lock`, `lock_many`):
    /// every write of a key does, so that a read-modify-write of it never straddles another.
    pub(crate) fn set_many(&self, items: &[(&[u8], Value)]) -> Result<(), Error> {
        // Each write's kind, lengths, prefix and header take under 32 bytes.
        let mut b =
            WriteBatch::with_capacity(items.iter().map(|(k, v)| k.len() + v.data.len() + 32).sum());
        for (k, v) in items {
            Self::put_into(&mut b, k, v);
        }
        self.commit(b)
    }

    /// The stripe locks of several keys, taken in stripe order (so that two callers never
    /// deadlock), each once.
    pub(crate) fn lock_many(&self, keys: &[&[u8]]) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = keys.iter().map(|k| stripe(k)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes.into_iter().map(|i| self.lock_stripe(i)).collect()
    }

    /// Stores values (`Some`) and deletes keys (`None`), atomically, under their locks.
    fn write_values_locked(&self, items: &[(Bytes, Option<Value>)]) -> Result<(), Error> {
        let keys: Vec<&[u8]> = items.iter().map(|(k, _)| &k[..]).collect();
        let _g = self.lock_many(&keys);
        self.commit(Self::batch_of(items))
    }

    fn batch_of(items: &[(Bytes, Option<Value>)]) -> WriteBatch {
        let mut b = WriteBatch::with_capacity(
            items.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.data.len()) + 32).sum(),
        );
        for (k, v) in items {
            match v {
                Some(v) => Self::put_into(&mut b, k, v),
                None => {
                    b.delete(data_key(k));
                }
            }
        }
        b
    }

    /// Stores values (`Some`) and deletes keys (`None`), atomically, and returns once the
    /// write may be acknowledged: the write path of the endpoints' blind writes (gRPC and HTTP
    /// puts, batch writes), which read nothing. `None` if the write task died.
    ///
    /// In a cluster the proposal is awaited by a task rather than on a blocking thread of its
    /// own (a thread woken and waited for per write costs the leader more than the write
    /// itself): a write that reads nothing needs only its keys' stripes, held until its
    /// proposal is applied (or settled by a barrier) as on the blocking path. The task runs on
    /// Raft's runtime, whose workers never wait for a stripe: threads blocked on one of its
    /// stripes can never keep it from running to the end and releasing them; and it is a task
    /// of its own, so that a caller that goes away does not release them earlier. When one of
    /// its stripes is held, or on a single node, the write takes the blocking path.
    pub(crate) async fn write_values(
        self: &std::sync::Arc<Self>,
        items: Vec<(Bytes, Option<Value>)>,
    ) -> Option<Result<(), Error>> {
        let items = match self.replication.get() {
            Some(raft) => {
                let (keys, r) = (self.clone(), raft.clone());
                let task = raft.spawn(async move {
                    let Some(held) = keys.try_lock_many(&items) else { return Err(items) };
                    let result = r
                        .propose_here(crate::replication::proposal_of(&Self::batch_of(&items)))
                        .await;
                    // Also after a failure: the write may still be applied.
                    for (k, _) in &items {
                        keys.versions.bump_slot(Versions::slot(k));
                    }
                    drop(held);
                    Ok(result)
                });
                match task.await {
                    Ok(Ok(result)) => return Some(result),
                    Ok(Err(items)) => items,
                    Err(e) => {
                        return Some(Err(Error::ClusterDown(format!("the write task failed: {e}"))))
                    }
                }
            }
            None => items,
        };
        self.write_durably(move |k| k.write_values_locked(&items)).await
    }

    /// The stripe locks of `items`' keys if none is held (in stripe order, each once).
    fn try_lock_many(&self, items: &[(Bytes, Option<Value>)]) -> Option<Vec<MutexGuard<'_, ()>>> {
        let mut stripes: Vec<usize> = items.iter().map(|(k, _)| stripe(k)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        #[expect(clippy::indexing_slicing, reason = "stripe() < STRIPES = stripes.len()")]
        stripes.into_iter().map(|i| self.stripes[i].try_lock()).collect()
    }

    /// Stores one value (its stripe lock held by the caller).
    #[cfg(test)]
    pub(crate) fn set(&self, key: &[u8], v: &Value) -> Result<(), Error> {
        self.set_many(&[(key, v.clone())])
    }

    /// Deletes keys, atomically (their stripe locks held by the caller); returns how many were
    /// live. A key without a value is not written (a watch of it stays intact, as in Redis).
    pub(crate) fn delete(&self, keys: &[&[u8]]) -> Result<u64, Error> {
        let mut b = WriteBatch::new();
        let mut n = 0;
        for k in keys {
            let dk = data_key(k);
            let Some(stored) = self.db.get(&dk)? else { continue };
            if live(k, Some(stored), now_ms)?.is_some() {
                n += 1;
            }
            b.delete(dk);
        }
        self.commit(b)?;
        Ok(n)
    }

    /// Live keys after `after` (all from the start if `None`), at most `count` examined.
    /// Returns them and where to continue (`None`: the end was reached).
    pub(crate) fn keys(
        &self,
        after: Option<&[u8]>,
        count: usize,
    ) -> Result<(Vec<Bytes>, Option<Bytes>), Error> {
        let now = now_ms();
        let lo = match after {
            Some(a) => {
                let mut k = data_key(a);
                k.push(0);
                k
            }
            None => vec![DATA],
        };
        let hi = vec![DATA + 1];
        let mut out = Vec::new();
        let mut seen = 0;
        for kv in self.db.scan(lo..hi) {
            let (k, v) = kv?;
            let key = k.slice(1..);
            let val = decode(&key, &v)?;
            seen += 1;
            if val.expire_at.is_none_or(|at| at > now) {
                out.push(key.clone());
            }
            if seen >= count {
                return Ok((out, Some(key)));
            }
        }
        Ok((out, None))
    }

    /// Live string keys with their values, in key order: those starting with `prefix`, at or
    /// after `start`, before `end` (empty: no bound), at most `limit`.
    pub(crate) fn range(
        &self,
        prefix: &[u8],
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, Error> {
        let now = now_ms();
        let mut out = Vec::new();
        let Some((lo, hi)) = data_range(prefix, start, end).filter(|_| limit > 0) else {
            return Ok(out);
        };
        for kv in self.db.scan(lo..hi) {
            let (k, v) = kv?;
            let key = k.slice(1..);
            if !key.starts_with(prefix) {
                break;
            }
            let val = decode(&key, &v)?;
            if val.kind == Kind::String && val.expire_at.is_none_or(|at| at > now) {
                out.push((key, val.data));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// A numeric cursor for `SCAN` that continues after `key`.
    pub(crate) fn cursor_for(&self, key: Bytes) -> u64 {
        let id = self.next_cursor.fetch_add(1, Ordering::Relaxed);
        self.cursors.lock().put(id, key);
        id
    }

    /// Where a `SCAN` cursor continues; `None` if it is unknown (or forgotten).
    pub(crate) fn cursor(&self, id: u64) -> Option<Bytes> {
        self.cursors.lock().get(&id).cloned()
    }

    /// Number of live keys (a scan that lends each entry rather than copying it).
    pub(crate) fn len(&self) -> Result<u64, Error> {
        let now = now_ms();
        let mut n = 0;
        let mut it = self.db.scan(&b"k"[..]..&b"l"[..]);
        while let Some(kv) = it.next_ref() {
            let (k, v) = kv?;
            let expire_at = header(k.get(1..).unwrap_or_default(), v)?.expire_at;
            if expire_at.is_none_or(|at| at > now) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes every key, all or none of them across a crash: in a cluster as one proposal
    /// of range removals (a member that stops while applying it applies it again), on a single
    /// node between the writes of [`CLEARING_KEY`] (an open that finds it deletes the rest).
    /// Readers see every key until it is done (the engine holds their reads of the cleared
    /// ranges, `Db::freeze`); writers wait for it. One that fails (an engine error) may have
    /// deleted part of the keys. A watcher of a key that existed sees it
    /// changed, one of a key that did not does not, as in Redis.
    pub(crate) fn clear(&self) -> Result<(), Error> {
        let _all = self.lock_all();
        let (r, slots) = match self.replication.get() {
            Some(r) => {
                let slots = self.slots_of_keys()?;
                let mut p = timber_cluster::Proposal::default();
                for (start, end) in CLEARED {
                    p.delete_range(start, end);
                }
                (r.commit_proposal(p), slots)
            }
            None => {
                let mut slots = HashSet::new();
                // Readers see every key until the last is deleted (writers wait for `_all`).
                let frozen = self.db.freeze(&CLEARED);
                let r = self.clear_here(&mut slots);
                drop(frozen);
                if r.is_err() {
                    // Not left for an open to finish: it would delete what is written after.
                    // (If the engine refuses this too, it refuses every write until a restart.)
                    let mut b = WriteBatch::new();
                    b.delete(CLEARING_KEY);
                    let _ = self.db.write_with(b, self.durability);
                }
                (r, slots)
            }
        };
        // Also after a failure: in a cluster the removal may still be applied.
        for slot in slots {
            self.versions.bump_slot(slot);
        }
        r
    }

    /// The version slots of the keys stored now.
    fn slots_of_keys(&self) -> Result<HashSet<usize>, Error> {
        let mut slots = HashSet::new();
        let mut it = self.db.scan(&b"k"[..]..&b"l"[..]);
        while let Some(kv) = it.next_ref() {
            slots.insert(Versions::slot(kv?.0.get(1..).unwrap_or_default()));
        }
        Ok(slots)
    }

    /// [`Keyspace::clear`] on a single node, adding the version slots of the keys it deletes
    /// to `slots`. The WAL keeps the order of writes, so the marker is durable before any
    /// delete is, and the last delete before the marker's removal.
    fn clear_here(&self, slots: &mut HashSet<usize>) -> Result<(), Error> {
        let mut b = WriteBatch::new();
        b.put(CLEARING_KEY, b"");
        self.db.write_with(b, self.durability)?;
        for (start, end) in CLEARED {
            let mut b = WriteBatch::new();
            for kv in self.db.scan(start..end) {
                let key = kv?.0;
                if let Some(k) = key.strip_prefix(&[DATA]) {
                    slots.insert(Versions::slot(k));
                }
                b.delete(key);
                if b.len() >= 4096 {
                    self.db.write_with(std::mem::take(&mut b), self.durability)?;
                }
            }
            self.db.write_with(b, self.durability)?;
        }
        let mut b = WriteBatch::new();
        b.delete(CLEARING_KEY);
        self.db.write_with(b, self.durability)?;
        Ok(())
    }

    /// Deletes keys whose deadline passed; returns how many.
    pub(crate) fn sweep(&self) -> Result<u64, Error> {
        // In a cluster the leader sweeps, and its deletes replicate.
        if self.replication.get().is_some_and(|r| !r.is_leader()) {
            return Ok(0);
        }
        let now = now_ms();
        let hi = index_key(now + 1, &[]);
        let entries: Vec<Bytes> = self
            .db
            .scan(&b"e"[..]..&hi[..])
            .map(|kv| kv.map(|(k, _)| k))
            .collect::<Result<_, _>>()?;
        let mut n = 0;
        for ik in entries {
            let (Some(at), Some(key)) = (crate::codec::u64_be(&ik, 1), ik.get(9..)) else {
                return Err(Error::Corrupt(ik.clone()));
            };
            let _g = self.lock(key);
            let mut b = WriteBatch::new();
            b.delete(&ik);
            if let Some(v) = self.db.get(data_key(key))? {
                if decode(key, &v)?.expire_at == Some(at) {
                    b.delete(data_key(key));
                    n += 1;
                }
            }
            self.commit(b)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_cover_the_prefix_and_bounds_only() {
        let r = |p: &[u8], s: &[u8], e: &[u8]| data_range(p, s, e);
        assert_eq!(r(b"", b"", b""), Some((b"k".to_vec(), b"l".to_vec())));
        assert_eq!(r(b"a", b"", b""), Some((b"ka".to_vec(), b"kb".to_vec())));
        // A prefix ending in 0xff: the range ends after every key that starts with it.
        assert_eq!(r(b"\xff", b"", b""), Some((b"k\xff".to_vec(), b"l".to_vec())));
        assert_eq!(r(b"a", b"ab", b"ac"), Some((b"kab".to_vec(), b"kac".to_vec())));
        assert_eq!(r(b"a", b"", b"b"), Some((b"ka".to_vec(), b"kb".to_vec())));
        assert_eq!(r(b"", b"b", b"a"), None);
        assert_eq!(r(b"a", b"b", b""), None);
    }

    /// A FLUSHALL that fails on an engine error (its scan meets a damaged table) removes its
    /// marker: the next open does not go on deleting, so keys written after it stay.
    #[test]
    fn a_failed_flush_leaves_no_marker_for_the_next_open() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let open = || Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
        {
            let ks = open();
            for i in 0..2000 {
                ks.set(format!("key{i:05}").as_bytes(), &Value::string("v")).unwrap();
            }
            ks.db.flush().unwrap();
        }
        // Damage the first data block's bytes (its checksum no longer matches).
        let sst = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "sst"))
            .unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&sst).unwrap();
        f.write_all_at(b"damage", 100).unwrap();
        drop(f);
        {
            let ks = open();
            assert!(ks.clear().is_err());
            assert!(ks.db.get(CLEARING_KEY).unwrap().is_none());
            ks.set(b"after", &Value::string("1")).unwrap();
        }
        let ks = open();
        assert!(ks.get(b"after").unwrap().is_some());
    }

    #[test]
    fn len_counts_live_keys_only() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
        assert_eq!(ks.len().unwrap(), 0);
        assert_eq!(ks.len().unwrap(), 0);
        ks.set(b"a", &Value::string("1")).unwrap();
        ks.set(b"b", &Value { expire_at: Some(now_ms() + 60_000), ..Value::string("2") }).unwrap();
        // Past its deadline but not yet swept: not counted.
        ks.set(b"c", &Value { expire_at: Some(1), ..Value::string("3") }).unwrap();
        assert_eq!(ks.len().unwrap(), 2);
        let (keys, _) = ks.keys(None, 100).unwrap();
        assert_eq!(keys, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
    }
}
