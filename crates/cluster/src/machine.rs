//! `KvMachine`: the state machine of a timber cluster, a timber-kv database that every member
//! applies the committed [`Proposal`]s to, and its snapshots.
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
//! - a snapshot install writes an "installing" key (synced) before it touches the data and
//!   removes it with the last batch; an open that finds it refuses to start
//!   ([`Error::Corrupt`]), since the engine then holds a mix of two states.

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

use crate::error::{Error, Result};
use crate::hard_state::sync_dir;
use crate::types::{Op, Proposal, TypeConfig};

/// Engine keys the state machine keeps for itself; no proposal may write under this prefix.
pub const RESERVED_PREFIX: &[u8] = b"\x00raft/";
const APPLIED_KEY: &[u8] = b"\x00raft/applied";
const MEMBERSHIP_KEY: &[u8] = b"\x00raft/membership";
const INSTALLING_KEY: &[u8] = b"\x00raft/installing";

const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
const SNAPSHOT_MAGIC: &[u8; 8] = b"TMBRSNAP";
const SNAPSHOT_VERSION: u32 = 1;
/// Version byte of a snapshot's data (what goes over the network).
const DATA_VERSION: u8 = 1;
/// Writes of an apply or install are cut into batches of about this size (a batch must fit in
/// one segment of the engine's WAL).
const BATCH_BYTES: usize = 4 << 20;

type Membership = StoredMembership<u64, BasicNode>;
type Meta = SnapshotMeta<u64, BasicNode>;

/// The replicated state of one member. Clones share it.
#[derive(Clone)]
pub struct KvMachine {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Db>,
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
    /// Refuses a proposal that writes under the state machine's reserved keys.
    pub fn check(&self) -> Result<()> {
        for op in &self.ops {
            let key = match op {
                Op::Put { key, .. } | Op::Delete { key } => key,
            };
            if key.starts_with(RESERVED_PREFIX) {
                return Err(Error::Reserved(key.clone()));
            }
        }
        Ok(())
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
    /// The state machine over `db`, keeping its current snapshot in `dir`.
    pub fn open(db: Arc<Db>, dir: impl AsRef<Path>) -> Result<KvMachine> {
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

    /// Reads a consistent view of the engine into snapshot data, with the applied id and
    /// membership of that same view.
    fn dump(&self) -> Result<(Option<LogId<u64>>, Membership, Vec<u8>)> {
        let snap = self.inner.db.snapshot();
        let db = &self.inner.db;
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
        data.extend_from_slice(&encode(&SnapshotData { pairs }));
        Ok((applied, membership, data))
    }

    /// Snapshot builds and installs since the machine opened.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        *self.inner.stats.lock()
    }

    fn build(&self) -> Result<(Meta, Vec<u8>)> {
        let started = std::time::Instant::now();
        let (applied, membership, data) = self.dump()?;
        // openraft purges the log up to this snapshot: the engine must hold it durably first.
        self.inner.db.sync()?;
        let n = self.inner.builds.fetch_add(1, Ordering::Relaxed);
        let id = match applied {
            Some(l) => format!("{}-{}-{}-{n}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => format!("none-{n}"),
        };
        let meta = Meta { last_log_id: applied, last_membership: membership, snapshot_id: id };
        self.store_snapshot(&meta, &data)?;
        let mut st = self.inner.stats.lock();
        st.built += 1;
        st.last_built_bytes = data.len() as u64;
        st.last_build = started.elapsed();
        Ok((meta, data))
    }

    fn install(&self, meta: &Meta, data: &[u8]) -> Result<()> {
        let started = std::time::Instant::now();
        let bad = |reason: String| Error::Corrupt { path: PathBuf::from("<snapshot>"), reason };
        let body = match data.split_first() {
            Some((&DATA_VERSION, rest)) => rest,
            Some((v, _)) => return Err(bad(format!("unknown snapshot data version {v}"))),
            None => return Err(bad("empty snapshot data".into())),
        };
        let snap: SnapshotData =
            postcard::from_bytes(body).map_err(|e| bad(format!("undecodable snapshot: {e}")))?;
        let db = &self.inner.db;
        let mut marker = WriteBatch::new();
        marker.put(INSTALLING_KEY, b"1");
        db.write_with(marker, Durability::Synced)?;
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
        for (k, v) in &snap.pairs {
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
        self.store_snapshot(meta, data)?;
        let mut st = self.inner.stats.lock();
        st.installed += 1;
        st.last_installed_bytes = data.len() as u64;
        st.last_install = started.elapsed();
        Ok(())
    }

    fn apply_entries(&self, entries: Vec<Entry<TypeConfig>>) -> Result<usize> {
        let n = entries.len();
        let mut batch = WriteBatch::new();
        let mut last = None;
        for e in entries {
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(p) => {
                    p.check()?;
                    for op in p.ops {
                        match op {
                            Op::Put { key, value } => batch.put(&key, &value),
                            Op::Delete { key } => batch.delete(&key),
                        };
                    }
                }
                EntryPayload::Membership(m) => {
                    batch.put(MEMBERSHIP_KEY, encode(&Membership::new(Some(e.log_id), m)));
                }
            }
            last = Some(e.log_id);
            if batch.size() >= BATCH_BYTES {
                batch.put(APPLIED_KEY, encode(&e.log_id));
                self.write(std::mem::take(&mut batch))?;
            }
        }
        if let Some(id) = last {
            batch.put(APPLIED_KEY, encode(&id));
            self.write(batch)?;
        }
        Ok(n)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for KvMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let me = self.clone();
        let (meta, data) = tokio::task::spawn_blocking(move || me.build())
            .await
            .map_err(|e| StorageIOError::read_state_machine(&e))?
            .map_err(read_err)?;
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

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let n = self.apply_entries(entries.into_iter().collect()).map_err(sm_err)?;
        Ok(vec![(); n])
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
        let me = self.clone();
        let meta = meta.clone();
        let data = snapshot.into_inner();
        tokio::task::spawn_blocking(move || me.install(&meta, &data))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?
            .map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let snap = self.load_snapshot().map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(snap.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}
