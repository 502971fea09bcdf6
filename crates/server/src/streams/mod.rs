//! Redis streams on timber streams: the mapping of `<ms>-<seq>` ids onto a timber stream's dense
//! ids, the one writer per stream, reads by id range, trimming, blocking waits, consumer groups
//! ([`group`]) and the collection of streams whose key is gone.
//!
//! Layout. A stream key holds, in the keyspace, a value of kind [`Kind::Stream`] whose bytes are
//! a [`Handle`]: `[uid u64 LE][floor ms u64 LE][floor seq u64 LE]`. `uid` names the timber stream
//! `redis.<uid:016x>` that holds the entries; `floor` is the largest id ever added as of the last
//! trim that emptied the stream, so ids keep growing after everything was trimmed. Beside it:
//! `u` → the next uid (u64 LE), `r<uid u64 BE>` → the key (the reverse map the collector walks).
//! Each entry of the timber stream is `[ms u64 LE][seq u64 LE][count u32 LE]` followed by `count`
//! fields and values, each `[len u32 LE][bytes]`.
//!
//! In a cluster every write here is a proposal of the leader ([`crate::replication`]): the key
//! writes with the stream writes they go with (create, append at the leader's end of the
//! stream, truncate, delete), applied by every member's state machine, which is then the only
//! writer of the stream store. The leader evaluates them (ids, uids, group state) once it has
//! applied everything earlier leaders committed, holding the stream's locks until its
//! proposal is applied.
//!
//! Invariants: entry ids strictly increase along a timber stream's dense ids (one writer per
//! stream in this process, ids assigned under its tail lock in send order), so id lookups are
//! binary searches; a key, its reverse entry and the uid counter are written in one synced batch
//! before the timber stream is created, so a uid is never reused; the collector deletes the
//! timber stream before its reverse entry, so no stream is ever left without one.

pub(crate) mod group;
pub(crate) mod id;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt as _;
use parking_lot::Mutex;
use timber_kv::WriteBatch;
use timber_stream::{
    Ack, Journal, Start, StreamConfig, StreamReader, StreamWriter, Streams, SyncRunner,
};
use tokio::sync::watch;

pub(crate) use id::StreamId;

use crate::config::Sync;
use crate::keyspace::{self, now_ms, Keyspace, Kind, Value};
use group::{Group, Pending};

/// Errors of stream commands. [`Error::Reject`] carries a Redis error reply (code first).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The keyspace failed (or the key holds a string).
    #[error(transparent)]
    Keys(#[from] keyspace::Error),
    /// The stream engine failed.
    #[error("stream storage: {0}")]
    Stream(#[from] timber_stream::Error),
    /// An entry failed to decode.
    #[error("corrupt entry {pos} of stream {stream}")]
    Corrupt {
        /// The timber stream.
        stream: String,
        /// The dense id.
        pos: u64,
    },
    /// The request cannot be carried out, with the Redis error text.
    #[error("{0}")]
    Reject(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn reject(msg: impl Into<String>) -> Error {
    Error::Reject(msg.into())
}

/// What a stream key's value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Handle {
    /// Names the timber stream.
    pub(crate) uid: u64,
    /// No id at or below it may be added (see the module doc).
    pub(crate) floor: StreamId,
}

impl Handle {
    fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(24);
        b.put_u64_le(self.uid);
        b.put_u64_le(self.floor.ms);
        b.put_u64_le(self.floor.seq);
        b.freeze()
    }

    fn decode(key: &[u8], b: &[u8]) -> Result<Handle> {
        if b.len() != 24 {
            return Err(keyspace::Error::Corrupt(Bytes::copy_from_slice(key)).into());
        }
        let n = |i: usize| crate::codec::u64_le(b, i).unwrap_or_default();
        Ok(Handle { uid: n(0), floor: StreamId { ms: n(8), seq: n(16) } })
    }
}

/// One entry: its id and its fields and values, alternating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The id.
    pub(crate) id: StreamId,
    /// Field, value, field, value...
    pub(crate) fields: Vec<Bytes>,
}

fn encode_entry(id: StreamId, fields: &[Bytes]) -> Bytes {
    let len = 20 + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
    let mut b = BytesMut::with_capacity(len);
    b.put_u64_le(id.ms);
    b.put_u64_le(id.seq);
    b.put_u32_le(fields.len() as u32);
    for f in fields {
        b.put_u32_le(f.len() as u32);
        b.put_slice(f);
    }
    b.freeze()
}

fn decode_entry(data: &Bytes) -> Option<Entry> {
    let u64_at = |i: usize| Some(u64::from_le_bytes(data.get(i..i + 8)?.try_into().ok()?));
    let u32_at = |i: usize| Some(u32::from_le_bytes(data.get(i..i + 4)?.try_into().ok()?));
    let id = StreamId { ms: u64_at(0)?, seq: u64_at(8)? };
    let n = u32_at(16)? as usize;
    let mut fields = Vec::with_capacity(n.min(1024));
    let mut at = 20;
    for _ in 0..n {
        let len = u32_at(at)? as usize;
        let end = (at + 4).checked_add(len)?;
        if end > data.len() {
            return None;
        }
        fields.push(data.slice(at + 4..end));
        at = end;
    }
    (at == data.len()).then_some(Entry { id, fields })
}

/// What tells an XADD's caller that its entry is durable.
#[derive(Debug)]
pub(crate) enum Appended {
    /// Resolves once the entry is durable (a single node's stream writer).
    Ack(Ack),
    /// Durable already: a cluster applied it (a majority's Raft logs hold it).
    Applied,
}

impl Appended {
    /// Resolves once the entry is durable.
    pub(crate) async fn durable(self) -> Result<()> {
        match self {
            Appended::Ack(a) => a.await.map(|_| ()).map_err(Error::from),
            Appended::Applied => Ok(()),
        }
    }
}

/// How XADD picks the new entry's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NewId {
    /// `*`: from the clock, after the last id.
    Auto,
    /// `<ms>-*`: the next sequence within `ms`.
    AutoSeq(u64),
    /// `<ms>-<seq>`.
    Exact(StreamId),
}

/// What XTRIM (or XADD's trim option) keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trim {
    /// The newest `n` entries.
    MaxLen(u64),
    /// Entries with an id at or above this one.
    MinId(StreamId),
}

/// The writing end of one stream in this process.
#[derive(Debug, Default)]
struct Tail {
    writer: Option<StreamWriter>,
    /// The largest id added (loaded at first use).
    last: Option<StreamId>,
    /// When the writer was last used.
    used: Option<std::time::Instant>,
}

#[derive(Debug, Default)]
struct Open {
    tail: tokio::sync::Mutex<Tail>,
    /// Serializes changes of the stream's consumer groups.
    groups: tokio::sync::Mutex<()>,
}

/// The Redis streams of one server.
#[derive(Debug)]
pub(crate) struct StreamSpace {
    keys: Arc<Keyspace>,
    streams: Streams,
    open: Mutex<HashMap<u64, Arc<Open>>>,
    /// Serializes uid allocation.
    uids: Mutex<()>,
    /// Bumped whenever a stream is created, for waits on keys that did not exist.
    created: watch::Sender<u64>,
}

/// The stream store's options for the server: appends are acknowledged from the store's
/// journal, synced as `sync` says (as keyspace writes are); fragments go where `store` says;
/// `runner`, if given, is where the journal's syncs run.
pub(crate) fn options(
    sync: Sync,
    store: &crate::config::StreamStore,
    (outage, backlog): (Duration, u64),
    runner: Option<Arc<dyn SyncRunner>>,
) -> timber_stream::Options {
    let journal = match sync {
        Sync::Always => Journal::Always,
        Sync::Interval(d) => Journal::Interval(d),
        Sync::Manual => Journal::Manual,
    };
    let mut opts =
        timber_stream::Options::default().journal(journal).outage_limits(outage, backlog);
    if let crate::config::StreamStore::S3(s3) = store {
        let prefix = match s3.prefix.as_str() {
            "" => "streams".to_string(),
            p => format!("{p}/streams"),
        };
        opts = opts
            .storage(timber_stream::Storage::S3(timber_stream::S3Options {
                endpoint: s3.endpoint.clone(),
                bucket: s3.bucket.clone(),
                region: s3.region.clone(),
                access_key_id: s3.access_key_id.clone(),
                secret_access_key: s3.secret_access_key.expose().to_string(),
                allow_http: s3.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")),
                path_style: s3.endpoint.is_some(),
            }))
            .prefix(prefix)
            // A store that does not answer within this is treated as out (appends keep being
            // acknowledged from the journal meanwhile).
            .request_timeout(Duration::from_secs(10));
    }
    if let Some(r) = runner {
        opts = opts.sync_runner(r);
    }
    opts
}

fn stream_name(uid: u64) -> String {
    format!("redis.{uid:016x}")
}

fn reverse_key(uid: u64) -> Vec<u8> {
    let mut k = vec![crate::keyspace::STREAM_REVERSE];
    k.extend_from_slice(&uid.to_be_bytes());
    k
}

/// A reply to a reading command: per stream, its entries (`None` for a pending entry that was
/// trimmed away).
pub(crate) type Delivery = Vec<(StreamId, Option<Vec<Bytes>>)>;

impl StreamSpace {
    /// Opens the timber streams of the server in `dir` with `opts` (see [`options`]).
    pub(crate) async fn open(
        keys: Arc<Keyspace>,
        dir: &Path,
        opts: timber_stream::Options,
    ) -> Result<StreamSpace> {
        let streams = Streams::open(dir, opts).await?;
        Ok(StreamSpace {
            keys,
            streams,
            open: Mutex::default(),
            uids: Mutex::new(()),
            created: watch::channel(0).0,
        })
    }

    /// The timber stream store (also serves the gRPC and HTTP stream APIs).
    pub(crate) fn store(&self) -> &Streams {
        &self.streams
    }

    /// The handle of a stream key; [`keyspace::Error::WrongType`] if it holds a string.
    pub(crate) fn handle(&self, key: &[u8]) -> Result<Option<Handle>> {
        match self.keys.get(key)? {
            None => Ok(None),
            Some(v) if v.kind == Kind::Stream => Ok(Some(Handle::decode(key, &v.data)?)),
            Some(_) => Err(keyspace::Error::WrongType.into()),
        }
    }

    /// The handle of a stream key, creating an empty stream if the key does not exist.
    pub(crate) async fn create(&self, key: &[u8]) -> Result<Handle> {
        let h = {
            let _g = self.keys.lock(key);
            if let Some(h) = self.handle(key)? {
                return Ok(h);
            }
            let _u = self.uids.lock();
            let db = self.keys.db();
            let uid = match db.get(b"u").map_err(keyspace::Error::from)? {
                Some(v) => u64::from_le_bytes(
                    v[..].try_into().map_err(|_| keyspace::Error::Corrupt(Bytes::from("u")))?,
                ),
                None => 1,
            };
            let h = Handle { uid, floor: StreamId::MIN };
            let mut b = WriteBatch::new();
            let v = Value { kind: Kind::Stream, data: h.encode(), expire_at: None, revision: 0 };
            Keyspace::put_into(&mut b, key, &v);
            b.put(reverse_key(uid), key);
            b.put(b"u", (uid + 1).to_le_bytes());
            if let Some(r) = self.keys.replication() {
                let mut p = crate::replication::proposal_of(&b);
                p.create_stream(stream_name(uid));
                r.commit_proposal(p)?;
                drop(_u);
                drop(_g);
                self.created.send_modify(|n| *n += 1);
                return Ok(h);
            }
            // Synced in every mode: a uid must never be handed out twice.
            db.write_with(b, timber_kv::Durability::Synced).map_err(keyspace::Error::from)?;
            h
        };
        self.ensure_stream(h.uid).await?;
        self.created.send_modify(|n| *n += 1);
        Ok(h)
    }

    async fn ensure_stream(&self, uid: u64) -> Result<()> {
        match self.streams.create(&stream_name(uid), StreamConfig::default()).await {
            Ok(_) | Err(timber_stream::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A receiver that sees every stream creation from now on.
    pub(crate) fn creations(&self) -> watch::Receiver<u64> {
        self.created.subscribe()
    }

    fn state(&self, uid: u64) -> Arc<Open> {
        self.open.lock().entry(uid).or_default().clone()
    }

    /// The readable dense range `[first, next)` of a stream (empty if it was never written).
    fn bounds(&self, uid: u64) -> Result<(u64, u64)> {
        match self.streams.info(&stream_name(uid)) {
            Ok(i) => Ok((i.first_id, i.next_id)),
            Err(timber_stream::Error::NotFound { .. }) => Ok((0, 0)),
            Err(e) => Err(e.into()),
        }
    }

    fn reader(&self, uid: u64, pos: u64) -> Result<StreamReader> {
        Ok(self.streams.reader(&stream_name(uid), Start::At(pos))?)
    }

    /// The entry at dense id `pos` (which must be below the stream's end), or `None` if it was
    /// truncated.
    async fn entry_at(&self, r: &mut StreamReader, uid: u64, pos: u64) -> Result<Option<Entry>> {
        r.seek(pos);
        match r.next().await {
            Ok(e) => decode_entry(&e.data)
                .map(Some)
                .ok_or(Error::Corrupt { stream: stream_name(uid), pos }),
            Err(timber_stream::Error::Truncated { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The dense id of the first entry with an id at or above `target` (the stream's end if
    /// there is none), by binary search.
    async fn lower_bound(&self, uid: u64, target: StreamId) -> Result<u64> {
        let (first, next) = self.bounds(uid)?;
        if first == next || target == StreamId::MIN {
            return Ok(first);
        }
        let mut r = self.reader(uid, next - 1)?;
        // The common cases first: reading from the tail, or from before the first entry.
        match self.entry_at(&mut r, uid, next - 1).await? {
            Some(e) if e.id < target => return Ok(next),
            _ => {}
        }
        let (mut lo, mut hi) = (first, next - 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.entry_at(&mut r, uid, mid).await? {
                Some(e) if e.id < target => lo = mid + 1,
                Some(_) => hi = mid,
                // Trimmed meanwhile: everything below the new start is gone.
                None => lo = self.bounds(uid)?.0.max(mid + 1).min(hi),
            }
        }
        Ok(lo)
    }

    /// The largest id added to the stream so far (XINFO's last-generated-id).
    pub(crate) async fn last_id(&self, h: &Handle) -> Result<StreamId> {
        let st = self.state(h.uid);
        let mut tail = st.tail.lock().await;
        self.load_last(h, &mut tail).await
    }

    async fn load_last(&self, h: &Handle, tail: &mut Tail) -> Result<StreamId> {
        // In a cluster the state machine appends: what this member added last says nothing.
        if let Some(l) = tail.last.filter(|_| self.keys.replication().is_none()) {
            return Ok(l.max(h.floor));
        }
        let (first, next) = self.bounds(h.uid)?;
        let mut last = h.floor;
        if next > first {
            let mut r = self.reader(h.uid, next - 1)?;
            if let Some(e) = self.entry_at(&mut r, h.uid, next - 1).await? {
                last = last.max(e.id);
            }
        }
        tail.last = Some(last);
        Ok(last)
    }

    /// XADD: adds an entry, creating the stream unless `must_exist`. Returns its id and what
    /// says once it is durable (and readable); `None` if the key does not exist and
    /// `must_exist`.
    pub(crate) async fn add(
        &self,
        key: &[u8],
        new: NewId,
        fields: &[Bytes],
        must_exist: bool,
    ) -> Result<Option<(StreamId, Appended)>> {
        if let NewId::Exact(StreamId::MIN) = new {
            return Err(reject("ERR The ID specified in XADD must be greater than 0-0"));
        }
        let h = match self.handle(key)? {
            Some(h) => h,
            None if must_exist => return Ok(None),
            None => self.create(key).await?,
        };
        let st = self.state(h.uid);
        let mut tail = st.tail.lock().await;
        let last = self.load_last(&h, &mut tail).await?;
        let too_small = || {
            reject(
                "ERR The ID specified in XADD is equal or smaller than the target stream top item",
            )
        };
        let id = match new {
            NewId::Auto => {
                let now = now_ms();
                if now > last.ms {
                    StreamId { ms: now, seq: 0 }
                } else {
                    last.next().ok_or_else(|| {
                        reject("ERR The stream has exhausted the last possible ID, unable to add more items")
                    })?
                }
            }
            NewId::AutoSeq(ms) if ms > last.ms => StreamId { ms, seq: 0 },
            NewId::AutoSeq(ms) if ms == last.ms => {
                StreamId { ms, seq: last.seq.checked_add(1).ok_or_else(too_small)? }
            }
            NewId::AutoSeq(_) => return Err(too_small()),
            NewId::Exact(id) if id > last => id,
            NewId::Exact(_) => return Err(too_small()),
        };
        let data = encode_entry(id, fields);
        if let Some(r) = self.keys.replication() {
            let max = timber_stream::WriterOptions::local().max_entry_bytes;
            if data.len() > max {
                return Err(reject(format!(
                    "ERR entry of {} bytes exceeds {max} bytes",
                    data.len()
                )));
            }
            let mut p = timber_cluster::Proposal::default();
            p.append(stream_name(h.uid), self.bounds(h.uid)?.1, vec![data.to_vec()]);
            r.propose(p).await?;
            return Ok(Some((id, Appended::Applied)));
        }
        let mut attempt = 0;
        let ack = loop {
            if tail.writer.is_none() {
                self.ensure_stream(h.uid).await?;
                tail.writer = Some(self.streams.writer(&stream_name(h.uid)).await?);
            }
            match tail.writer.as_ref().expect("opened above").send(data.clone()).await {
                Ok(ack) => break ack,
                // Refused while the object store is out: the writer is fine, nothing was sent.
                Err(e @ timber_stream::Error::StoreUnavailable { .. }) => return Err(e.into()),
                // A failed writer refuses everything after its failure: open a new one once.
                Err(e) => {
                    tail.writer = None;
                    attempt += 1;
                    if attempt > 1 {
                        tail.last = None;
                        return Err(e.into());
                    }
                }
            }
        };
        tail.last = Some(id);
        tail.used = Some(std::time::Instant::now());
        Ok(Some((id, Appended::Ack(ack))))
    }

    /// Number of entries.
    pub(crate) fn len(&self, h: &Handle) -> Result<u64> {
        let (first, next) = self.bounds(h.uid)?;
        Ok(next - first)
    }

    /// Entries with `start <= id <= end` in id order (reverse order if `rev`), at most `count`.
    pub(crate) async fn range(
        &self,
        h: &Handle,
        start: StreamId,
        end: StreamId,
        count: usize,
        rev: bool,
    ) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        if start > end || count == 0 {
            return Ok(out);
        }
        if rev {
            let Some(after_end) = end.next() else {
                return self.range_back(h, self.bounds(h.uid)?.1, start, count).await;
            };
            let stop = self.lower_bound(h.uid, after_end).await?;
            return self.range_back(h, stop, start, count).await;
        }
        let (_, next) = self.bounds(h.uid)?;
        let mut pos = self.lower_bound(h.uid, start).await?;
        if pos >= next {
            return Ok(out);
        }
        let mut r = self.reader(h.uid, pos)?;
        while pos < next && out.len() < count {
            match r.next().await {
                Ok(e) => {
                    let e = decode_entry(&e.data)
                        .ok_or(Error::Corrupt { stream: stream_name(h.uid), pos })?;
                    if e.id > end {
                        break;
                    }
                    out.push(e);
                    pos += 1;
                }
                Err(timber_stream::Error::Truncated { first_available }) => {
                    pos = first_available;
                    r.seek(pos);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    async fn range_back(
        &self,
        h: &Handle,
        stop: u64,
        start: StreamId,
        count: usize,
    ) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let (first, _) = self.bounds(h.uid)?;
        if stop <= first {
            return Ok(out);
        }
        let mut r = self.reader(h.uid, stop - 1)?;
        let mut pos = stop;
        while pos > first && out.len() < count {
            pos -= 1;
            match self.entry_at(&mut r, h.uid, pos).await? {
                Some(e) if e.id >= start => out.push(e),
                Some(_) | None => break,
            }
        }
        Ok(out)
    }

    /// Drops the oldest entries per `trim`; returns how many.
    pub(crate) async fn trim(&self, key: &[u8], h: &Handle, trim: Trim) -> Result<u64> {
        let (first, next) = self.bounds(h.uid)?;
        let before = match trim {
            Trim::MaxLen(n) => next.saturating_sub(n).max(first),
            Trim::MinId(id) => self.lower_bound(h.uid, id).await?,
        };
        if before <= first {
            return Ok(0);
        }
        if let Some(r) = self.keys.replication() {
            // One proposal: the floor (when emptying, see below) with the truncation, under the
            // key's lock from the read of its handle until applied, so that no write of the key
            // (a SET replacing the stream) lands in between and is overwritten.
            let last = match before >= next {
                true => Some(self.last_id(h).await?),
                false => None,
            };
            crate::replication::blocking(|| -> Result<()> {
                let _g = self.keys.lock(key);
                let mut b = WriteBatch::new();
                if let Some(last) = last {
                    self.floor_into(&mut b, key, h, last)?;
                }
                let mut p = crate::replication::proposal_of(&b);
                p.truncate_stream(stream_name(h.uid), before);
                r.commit_proposal(p)?;
                Ok(())
            })?;
            return Ok(before - first);
        }
        if before >= next {
            // Emptying the stream: remember its last id first, so ids keep growing.
            let last = self.last_id(h).await?;
            self.set_floor(key, h, last).await?;
        }
        self.streams.truncate(&stream_name(h.uid), before).await?;
        Ok(before - first)
    }

    async fn set_floor(&self, key: &[u8], h: &Handle, floor: StreamId) -> Result<()> {
        let _g = self.keys.lock(key);
        let mut b = WriteBatch::new();
        self.floor_into(&mut b, key, h, floor)?;
        if !b.is_empty() {
            self.keys
                .db()
                .write_with(b, timber_kv::Durability::Synced)
                .map_err(keyspace::Error::from)?;
        }
        Ok(())
    }

    /// Adds to `b` the write of `floor` into the handle of `key`, if it still names `h`'s
    /// stream.
    fn floor_into(
        &self,
        b: &mut WriteBatch,
        key: &[u8],
        h: &Handle,
        floor: StreamId,
    ) -> Result<()> {
        let Some(mut v) = self.keys.get(key)? else { return Ok(()) };
        if v.kind != Kind::Stream || Handle::decode(key, &v.data)?.uid != h.uid {
            return Ok(());
        }
        v.data = Handle { uid: h.uid, floor }.encode();
        Keyspace::put_into(b, key, &v);
        Ok(())
    }

    /// Entries after `after`, at most `count`, for XREAD.
    pub(crate) async fn read_after(
        &self,
        h: &Handle,
        after: StreamId,
        count: usize,
    ) -> Result<Vec<Entry>> {
        match after.next() {
            Some(start) => self.range(h, start, StreamId::MAX, count, false).await,
            None => Ok(Vec::new()),
        }
    }

    /// The id `$` stands for: the largest id added so far (`0-0` for a missing key).
    pub(crate) async fn dollar(&self, h: Option<&Handle>) -> Result<StreamId> {
        match h {
            Some(h) => self.last_id(h).await,
            None => Ok(StreamId::MIN),
        }
    }

    /// The last entry (XREAD's `+`).
    pub(crate) async fn last_entry(&self, h: &Handle) -> Result<Option<Entry>> {
        Ok(self.range(h, StreamId::MIN, StreamId::MAX, 1, true).await?.pop())
    }

    /// Waits until an entry with an id above `after` may exist in one of `waits` (a missing
    /// stream waits for any stream creation), `timeout` passes (`None`: forever) or `stop`
    /// fires. `creations` must have been taken before the caller last looked. Returns whether
    /// something changed.
    pub(crate) async fn wait(
        &self,
        waits: &[(Option<Handle>, StreamId)],
        mut creations: watch::Receiver<u64>,
        timeout: Option<Duration>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let mut futs: Vec<BoxFuture<'static, ()>> = Vec::new();
        for (h, after) in waits {
            match h {
                Some(h) if self.streams.info(&stream_name(h.uid)).is_ok() => {
                    let Some(start) = after.next() else { continue };
                    let pos = self.lower_bound(h.uid, start).await?;
                    let mut r = self.reader(h.uid, pos)?;
                    futs.push(async move { drop(r.next().await) }.boxed());
                }
                _ => {}
            }
        }
        futs.push(async move { drop(creations.changed().await) }.boxed());
        let any = futures::future::select_all(futs);
        let deadline = async {
            match timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = any => Ok(true),
            () = deadline => Ok(false),
            () = crate::shutdown::stopped(stop) => Ok(false),
        }
    }

    /// XGROUP CREATE. `id` `None` means `$`.
    pub(crate) async fn group_create(
        &self,
        key: &[u8],
        group: &[u8],
        id: Option<StreamId>,
        mkstream: bool,
        entries_read: Option<u64>,
    ) -> Result<()> {
        if group.len() > group::MAX_GROUP_NAME {
            return Err(reject("ERR consumer group name too long"));
        }
        let h = match self.handle(key)? {
            Some(h) => h,
            None if mkstream => self.create(key).await?,
            None => return Err(reject(NO_KEY)),
        };
        let st = self.state(h.uid);
        let _g = st.groups.lock().await;
        let db = self.keys.db();
        if group::get(db, h.uid, group)?.is_some() {
            return Err(reject("BUSYGROUP Consumer Group name already exists"));
        }
        let last = match id {
            Some(id) => id,
            None => self.last_id(&h).await?,
        };
        let mut b = WriteBatch::new();
        group::put(&mut b, h.uid, group, &Group { last, entries_read: entries_read.unwrap_or(0) });
        self.write(b).await
    }

    /// XGROUP SETID.
    pub(crate) async fn group_set_id(
        &self,
        key: &[u8],
        group: &[u8],
        id: Option<StreamId>,
    ) -> Result<()> {
        let h = self.existing(key)?;
        let st = self.state(h.uid);
        let _g = st.groups.lock().await;
        let Some(mut g) = group::get(self.keys.db(), h.uid, group)? else {
            return Err(no_group(key, group, "XGROUP"));
        };
        g.last = match id {
            Some(id) => id,
            None => self.last_id(&h).await?,
        };
        let mut b = WriteBatch::new();
        group::put(&mut b, h.uid, group, &g);
        self.write(b).await
    }

    /// XGROUP DESTROY: whether the group existed.
    pub(crate) async fn group_destroy(&self, key: &[u8], group: &[u8]) -> Result<bool> {
        let h = self.existing(key)?;
        let st = self.state(h.uid);
        let _g = st.groups.lock().await;
        let db = self.keys.db();
        if group::get(db, h.uid, group)?.is_none() {
            return Ok(false);
        }
        let mut b = WriteBatch::new();
        group::destroy(db, &mut b, h.uid, group)?;
        self.write(b).await?;
        Ok(true)
    }

    /// XGROUP DELCONSUMER: drops the consumer's pending entries; returns how many.
    pub(crate) async fn group_delete_consumer(
        &self,
        key: &[u8],
        group: &[u8],
        consumer: &[u8],
    ) -> Result<u64> {
        let h = self.existing(key)?;
        let st = self.state(h.uid);
        let _g = st.groups.lock().await;
        let db = self.keys.db();
        if group::get(db, h.uid, group)?.is_none() {
            return Err(no_group(key, group, "XGROUP"));
        }
        let pel = group::pending(
            db,
            h.uid,
            group,
            StreamId::MIN,
            StreamId::MAX,
            usize::MAX,
            Some(consumer),
        )?;
        let mut b = WriteBatch::new();
        for p in &pel {
            group::delete_pending(&mut b, h.uid, group, p.id);
        }
        self.write(b).await?;
        Ok(pel.len() as u64)
    }

    fn existing(&self, key: &[u8]) -> Result<Handle> {
        self.handle(key)?.ok_or_else(|| reject(NO_KEY))
    }

    /// XREADGROUP for one stream. `after` `None` is `>`: entries never delivered to the group,
    /// which become pending for `consumer` (unless `noack`). `Some(id)`: the consumer's own
    /// pending entries after `id`, delivered again. `Ok(None)`: the group does not exist.
    pub(crate) async fn read_group(
        &self,
        h: &Handle,
        group: &[u8],
        consumer: &[u8],
        after: Option<StreamId>,
        count: usize,
        noack: bool,
    ) -> Result<Option<Delivery>> {
        let st = self.state(h.uid);
        let _g = st.groups.lock().await;
        let db = self.keys.db();
        let Some(mut g) = group::get(db, h.uid, group)? else { return Ok(None) };
        let now = now_ms();
        let mut b = WriteBatch::new();
        let mut out = Vec::new();
        match after {
            None => {
                let entries = self.read_after(h, g.last, count).await?;
                for e in entries {
                    g.last = e.id;
                    g.entries_read += 1;
                    if !noack {
                        let p = Pending {
                            id: e.id,
                            consumer: Bytes::copy_from_slice(consumer),
                            delivered_ms: now,
                            deliveries: 1,
                        };
                        group::put_pending(&mut b, h.uid, group, &p);
                    }
                    out.push((e.id, Some(e.fields)));
                }
                if out.is_empty() {
                    return Ok(Some(out));
                }
                group::put(&mut b, h.uid, group, &g);
            }
            Some(after) => {
                let Some(from) = after.next() else { return Ok(Some(out)) };
                let pel =
                    group::pending(db, h.uid, group, from, StreamId::MAX, count, Some(consumer))?;
                for mut p in pel {
                    let found = self.range(h, p.id, p.id, 1, false).await?.pop();
                    p.deliveries += 1;
                    p.delivered_ms = now;
                    group::put_pending(&mut b, h.uid, group, &p);
                    out.push((p.id, found.map(|e| e.fields)));
                }
            }
        }
        self.write(b).await?;
        Ok(Some(out))
    }

    /// XACK: how many of `ids` were pending.
    pub(crate) async fn ack(&self, key: &[u8], group: &[u8], ids: &[StreamId]) -> Result<u64> {
        let Some(h) = self.handle(key)? else { return Ok(0) };
        let st = self.state(h.uid);
        let _g = st.groups.lock().await;
        let db = self.keys.db();
        let mut b = WriteBatch::new();
        let mut n = 0;
        for id in ids {
            if group::get_pending(db, h.uid, group, *id)?.is_some() {
                group::delete_pending(&mut b, h.uid, group, *id);
                n += 1;
            }
        }
        self.write(b).await?;
        Ok(n)
    }

    /// XPENDING: the group's pending entries with `start <= id <= end`, at most `count`, of one
    /// consumer if given. `Ok(None)`: no such group.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pending(
        &self,
        key: &[u8],
        group: &[u8],
        start: StreamId,
        end: StreamId,
        count: usize,
        consumer: Option<&[u8]>,
    ) -> Result<Option<Vec<Pending>>> {
        let Some(h) = self.handle(key)? else { return Ok(None) };
        let db = self.keys.db();
        if group::get(db, h.uid, group)?.is_none() {
            return Ok(None);
        }
        Ok(Some(group::pending(db, h.uid, group, start, end, count, consumer)?))
    }

    /// Every group of a stream with its pending entries (for XINFO).
    pub(crate) fn groups(&self, h: &Handle) -> Result<Vec<(Bytes, Group, Vec<Pending>)>> {
        let db = self.keys.db();
        let mut out = Vec::new();
        for (name, g) in group::list(db, h.uid)? {
            let pel =
                group::pending(db, h.uid, &name, StreamId::MIN, StreamId::MAX, usize::MAX, None)?;
            out.push((name, g, pel));
        }
        Ok(out)
    }

    /// The last delivered id of a group.
    pub(crate) fn group_last(&self, h: &Handle, group: &[u8]) -> Result<Option<StreamId>> {
        Ok(group::get(self.keys.db(), h.uid, group)?.map(|g| g.last))
    }

    async fn write(&self, b: WriteBatch) -> Result<()> {
        if b.is_empty() {
            return Ok(());
        }
        if let Some(r) = self.keys.replication() {
            return Ok(r.propose(crate::replication::proposal_of(&b)).await?);
        }
        self.keys.db().write_with(b, self.keys.durability()).map_err(keyspace::Error::from)?;
        Ok(self.keys.durable().await?)
    }

    /// Deletes the timber streams and consumer groups of stream keys that are gone (deleted,
    /// overwritten, expired, flushed). Returns how many streams it deleted.
    pub(crate) async fn collect_garbage(&self) -> Result<u64> {
        // In a cluster the leader collects, as proposals every member applies.
        if let Some(r) = self.keys.replication() {
            if !r.is_leader() {
                return Ok(0);
            }
            r.fresh().await?;
        }
        let db = self.keys.db();
        let mut gone = Vec::new();
        for kv in db.prefix(b"r") {
            let (k, key) = kv.map_err(keyspace::Error::from)?;
            let uid = crate::codec::u64_be(&k, 1)
                .filter(|_| k.len() == 9)
                .ok_or_else(|| keyspace::Error::Corrupt(k.clone()))?;
            // Gone: the key is missing, holds another stream, or holds a string. A failed read
            // proves nothing: stop rather than delete a live stream.
            let gone_now = match self.handle(&key) {
                Ok(Some(h)) => h.uid != uid,
                Ok(None) | Err(Error::Keys(keyspace::Error::WrongType)) => true,
                Err(e) => return Err(e),
            };
            if gone_now {
                gone.push(uid);
            }
        }
        for uid in &gone {
            let st = self.open.lock().remove(uid);
            if let Some(st) = st {
                if let Some(w) = st.tail.lock().await.writer.take() {
                    let _ = w.close().await;
                }
            }
            let mut b = WriteBatch::new();
            group::destroy_all(db, &mut b, *uid)?;
            b.delete(reverse_key(*uid));
            if let Some(r) = self.keys.replication() {
                let mut p = crate::replication::proposal_of(&b);
                p.delete_stream(stream_name(*uid));
                r.propose(p).await?;
                continue;
            }
            match self.streams.delete(&stream_name(*uid)).await {
                Ok(()) | Err(timber_stream::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            db.write_with(b, self.keys.durability()).map_err(keyspace::Error::from)?;
        }
        Ok(gone.len() as u64)
    }

    /// Closes the writers not used for `idle` (each holds a task and a segment); the next XADD
    /// opens a new one. Returns how many it closed.
    pub(crate) async fn close_idle(&self, idle: Duration) -> u64 {
        let open: Vec<Arc<Open>> = self.open.lock().values().cloned().collect();
        let mut closed = 0;
        for o in open {
            // A tail in use is not idle.
            let Ok(mut tail) = o.tail.try_lock() else { continue };
            if tail.writer.is_some() && tail.used.is_none_or(|t| t.elapsed() >= idle) {
                if let Some(w) = tail.writer.take() {
                    if let Err(e) = w.close().await {
                        tracing::warn!(error = %e, "closing an idle stream writer failed");
                    }
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Flushes and closes every writer, then the stream store.
    pub(crate) async fn close(&self) -> Result<()> {
        let open: Vec<Arc<Open>> = self.open.lock().drain().map(|(_, o)| o).collect();
        for o in open {
            if let Some(w) = o.tail.lock().await.writer.take() {
                crate::logs::close_writer(w).await;
            }
        }
        self.streams.clone().close().await?;
        Ok(())
    }
}

/// Redis's reply when XGROUP names a key that does not exist.
const NO_KEY: &str = "ERR The XGROUP subcommand requires the key to exist. Note that for CREATE you may want to use the MKSTREAM option to create an empty stream automatically.";

/// Redis's reply when a group does not exist.
pub(crate) fn no_group(key: &[u8], group: &[u8], cmd: &str) -> Error {
    reject(format!(
        "NOGROUP No such key '{}' or consumer group '{}' in {cmd}",
        String::from_utf8_lossy(key),
        String::from_utf8_lossy(group)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn idle_writers_close_and_reopen_without_losing_order() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(
            Keyspace::open(
                &dir.path().join("kv"),
                crate::Sync::Manual,
                None,
                &crate::IdleWork::new(),
            )
            .unwrap(),
        );
        let opts = options(
            Sync::Always,
            &crate::config::StreamStore::Local,
            (Duration::from_secs(30), 1 << 30),
            None,
        );
        let space =
            StreamSpace::open(keys.clone(), &dir.path().join("streams"), opts).await.unwrap();
        let logs = crate::logs::Logs::new(space.store().clone(), keys.clone());
        let f = [Bytes::from("f"), Bytes::from("v")];
        logs.append("plain", vec![Bytes::from("x")]).await.unwrap_err();
        logs.create("plain", StreamConfig::default()).await.unwrap();
        let mut ids = Vec::new();
        for round in 0..3 {
            for _ in 0..5 {
                let (id, ack) = space.add(b"s", NewId::Auto, &f, false).await.unwrap().unwrap();
                ack.durable().await.unwrap();
                ids.push(id);
            }
            let first = logs.append("plain", vec![Bytes::from(format!("r{round}"))]).await.unwrap();
            assert_eq!(first, Some(round));
            assert_eq!(space.close_idle(Duration::ZERO).await, 1, "round {round}");
            assert_eq!(logs.close_idle(Duration::ZERO).await, 1, "round {round}");
        }
        let h = space.handle(b"s").unwrap().unwrap();
        let got: Vec<StreamId> = space
            .range(&h, StreamId::MIN, StreamId::MAX, usize::MAX, false)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(got, ids, "every entry, in order, across writer reopenings");
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(space.close_idle(Duration::ZERO).await, 0, "nothing open");
        space.close().await.unwrap();
    }

    #[test]
    fn entries_round_trip_and_bad_bytes_are_refused() {
        let id = StreamId { ms: 7, seq: 2 };
        let fields = vec![Bytes::from("f"), Bytes::from(""), Bytes::from("value")];
        let enc = encode_entry(id, &fields);
        assert_eq!(decode_entry(&enc), Some(Entry { id, fields }));
        for cut in 0..enc.len() {
            assert_eq!(decode_entry(&enc.slice(..cut)), None, "cut at {cut}");
        }
        let mut long = enc.to_vec();
        long.push(0);
        assert_eq!(decode_entry(&Bytes::from(long)), None);
    }
}
