//! The log streams the gRPC and HTTP endpoints serve: timber streams by user-chosen name, with
//! one writer per stream shared by every client of this server.
//!
//! In a cluster the state machine is the only writer of the stream store: each write here is a
//! proposal of the leader ([`crate::replication`]), and a member that does not lead passes it
//! to the leader ([`crate::forwarded`]). Reads are linearizable unless asked stale: the leader
//! confirms its leadership first, another member asks the leader how far it applied and waits
//! until it applied as much, then reads its own copy.
//!
//! Invariants: the entries of one `send` call get consecutive ids (the stream's writer is held
//! for the whole call); names starting with `redis.` are refused (they hold Redis streams, see
//! [`crate::streams`]) and never listed; a writer that failed is replaced on the next call. In
//! a cluster the leader evaluates one write of a stream at a time, from the proposal's
//! evaluation to its apply (the stream's slot is held), so an append proposes the id the
//! stream ends at (and after a proposal whose outcome is unknown, the next evaluation waits
//! until it is applied or gone: `Replication::fresh`). Appends that arrive while a write of
//! their stream is in flight wait together and go as one proposal, each call's entries
//! consecutive and in arrival order, so that a stream takes many appends per Raft round.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use timber_cluster::{Proposal, Retention};
use timber_stream::{Ack, Start, StreamConfig, StreamInfo, StreamReader, StreamWriter, Streams};

use crate::keyspace::Keyspace;
use crate::replication::Replication;

const RESERVED: &str = "redis.";

/// What a failed log-stream call says to its client, on every endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    /// No such stream.
    NotFound,
    /// The stream exists.
    AlreadyExists,
    /// Another writer took the stream over.
    Fenced,
    /// The request is invalid.
    Invalid,
    /// The entries asked for were truncated.
    OutOfRange,
    /// Retryable: the object store, or the cluster's quorum or leader, is out.
    Unavailable,
    /// Storage failed.
    Internal,
}

impl Code {
    /// The word a leader puts in front of a forwarded call's error line.
    fn word(self) -> &'static str {
        match self {
            Code::NotFound => "NOTFOUND",
            Code::AlreadyExists => "EXISTS",
            Code::Fenced => "FENCED",
            Code::Invalid => "INVALID",
            Code::OutOfRange => "RANGE",
            Code::Unavailable => "UNAVAILABLE",
            Code::Internal => "INTERNAL",
        }
    }

    fn of_word(w: &str) -> Option<Code> {
        [
            Code::NotFound,
            Code::AlreadyExists,
            Code::Fenced,
            Code::Invalid,
            Code::OutOfRange,
            Code::Unavailable,
            Code::Internal,
        ]
        .into_iter()
        .find(|c| c.word() == w)
    }
}

/// Why a log-stream call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The stream store refused or failed.
    #[error(transparent)]
    Stream(#[from] timber_stream::Error),
    /// The cluster refused or failed (no leader, no quorum, a proposal failed).
    #[error(transparent)]
    Cluster(#[from] crate::keyspace::Error),
    /// The leader this member passed the call to refused it, or the proposal a call went in
    /// with others failed (each caller gets the failure's code and message).
    #[error("{message}")]
    Leader {
        /// What the leader said it was.
        code: Code,
        /// The leader's message.
        message: String,
    },
}

impl Error {
    /// What the client is told.
    pub(crate) fn code(&self) -> Code {
        use timber_stream::Error as E;
        match self {
            Error::Stream(e) => match e {
                E::NotFound { .. } => Code::NotFound,
                E::AlreadyExists { .. } => Code::AlreadyExists,
                E::Fenced { .. } => Code::Fenced,
                E::InvalidParam(_) => Code::Invalid,
                E::Truncated { .. } => Code::OutOfRange,
                E::Closed | E::StoreUnavailable { .. } => Code::Unavailable,
                _ => Code::Internal,
            },
            Error::Cluster(e) => match e {
                crate::keyspace::Error::NotLeader { .. }
                | crate::keyspace::Error::ClusterDown(_) => Code::Unavailable,
                crate::keyspace::Error::TooLarge(_) => Code::Invalid,
                _ => Code::Internal,
            },
            Error::Leader { code, .. } => *code,
        }
    }

    /// The error line a leader returns for a forwarded call: its code's word, a space, the
    /// message.
    pub(crate) fn to_line(&self) -> String {
        format!("{} {self}", self.code().word())
    }

    /// The error an error line of the leader stands for.
    pub(crate) fn of_line(line: &str) -> Error {
        match line.split_once(' ').and_then(|(w, m)| Some((Code::of_word(w)?, m))) {
            Some((code, m)) => Error::Leader { code, message: m.to_string() },
            None => Error::Leader { code: Code::Internal, message: line.to_string() },
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// What [`Logs::send`] did with the entries.
pub(crate) enum Sent {
    /// On a single node: buffered for appending, each ack resolving once its entry is durable.
    Acks(Vec<Ack>),
    /// In a cluster: committed and applied, the first at this id (`None` for no entries).
    Applied(Option<u64>),
}

/// The served log streams.
#[derive(Debug)]
pub(crate) struct Logs {
    streams: Streams,
    /// Whose replication, in a cluster, carries the writes.
    keys: Arc<Keyspace>,
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    /// In a cluster, on the leader: the appends of each stream waiting for its slot.
    appends: Arc<Mutex<HashMap<String, Vec<Waiting>>>>,
}

/// An append waiting for its stream's slot, and where its first id goes.
#[derive(Debug)]
struct Waiting {
    entries: Vec<Bytes>,
    done: tokio::sync::oneshot::Sender<Result<Option<u64>>>,
}

/// The most bytes of entries (each counted with [`ENTRY_OVERHEAD`]) one proposal of grouped
/// appends takes; a larger call goes alone.
const GROUP_BYTES: usize = 4 << 20;
/// What an entry costs beyond its bytes, in a proposal and in memory: so that calls of many
/// empty or tiny entries do not make a group of unbounded length.
const ENTRY_OVERHEAD: usize = 32;

/// One stream's writer (on a single node, opened on first use) or, in a cluster, the right
/// to evaluate its next write.
#[derive(Debug, Default)]
struct Slot {
    writer: Option<StreamWriter>,
    used: Option<std::time::Instant>,
}

fn check(name: &str) -> Result<()> {
    if name.starts_with(RESERVED) {
        return Err(timber_stream::Error::InvalidParam(format!(
            "stream names starting with {RESERVED:?} are reserved for Redis streams"
        ))
        .into());
    }
    Ok(())
}

/// The figures of `name`, `None` if it does not exist.
fn find(streams: &Streams, name: &str) -> Result<Option<StreamInfo>> {
    match streams.info(name) {
        Ok(i) => Ok(Some(i)),
        Err(timber_stream::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The appends waiting for stream `name`, in arrival order: all of them, or as many as fit in
/// [`GROUP_BYTES`], at least one (the rest wait for the next holder of the slot).
fn take_group(appends: &Mutex<HashMap<String, Vec<Waiting>>>, name: &str) -> Vec<Waiting> {
    let mut all = appends.lock();
    let Some(waiting) = all.get_mut(name) else { return Vec::new() };
    let mut bytes = 0;
    let n = waiting
        .iter()
        .position(|w| {
            bytes += w.entries.iter().map(|e| e.len() + ENTRY_OVERHEAD).sum::<usize>();
            bytes > GROUP_BYTES
        })
        .map_or(waiting.len(), |i| i.max(1));
    let group: Vec<Waiting> = waiting.drain(..n).collect();
    if waiting.is_empty() {
        all.remove(name);
    }
    group
}

/// Proposes the entries of `group`, in order, as one append to stream `name` once this leader
/// is fresh; the id of the first, once applied here.
async fn append_group(
    r: &Replication,
    streams: &Streams,
    name: &str,
    group: &[Waiting],
) -> Result<u64> {
    r.fresh().await?;
    let info = find(streams, name)?.ok_or_else(|| not_found(name))?;
    let records: Vec<Vec<u8>> =
        group.iter().flat_map(|w| w.entries.iter().map(|e| e.to_vec())).collect();
    if !records.is_empty() {
        let mut p = Proposal::default();
        p.append(name, info.next_id, records);
        r.propose(p).await?;
    }
    Ok(info.next_id)
}

fn not_found(name: &str) -> Error {
    timber_stream::Error::NotFound { stream: name.to_string() }.into()
}

impl Logs {
    /// Serves the streams of `streams`; in a cluster, `keys`' replication carries the writes.
    pub(crate) fn new(streams: Streams, keys: Arc<Keyspace>) -> Logs {
        Logs { streams, keys, slots: Mutex::default(), appends: Arc::default() }
    }

    fn replication(&self) -> Option<&Arc<Replication>> {
        self.keys.replication()
    }

    fn slot(&self, name: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        self.slots.lock().entry(name.to_string()).or_default().clone()
    }

    /// Creates a stream.
    pub(crate) async fn create(&self, name: &str, config: StreamConfig) -> Result<StreamInfo> {
        check(name)?;
        let Some(r) = self.replication() else {
            return Ok(self.streams.create(name, config).await?);
        };
        match crate::forwarded::log_create(r, name, config).await {
            Some(created) => created,
            None => self.lead_create(r, name, config).await,
        }
    }

    /// On the leader: [`Logs::create`].
    pub(crate) async fn lead_create(
        &self,
        r: &Arc<Replication>,
        name: &str,
        config: StreamConfig,
    ) -> Result<StreamInfo> {
        check(name)?;
        let stream = name.to_string();
        self.propose(r, name, move |info| match info {
            Some(_) => Err(timber_stream::Error::AlreadyExists { stream }.into()),
            None => {
                let mut p = Proposal::default();
                p.create_stream_with(stream, Retention::of(config));
                Ok((Some(p), ()))
            }
        })
        .await?;
        Ok(self.streams.info(name)?)
    }

    /// Returns once a read of this member's streams is linearizable (at once on a single
    /// node).
    async fn linearizable(&self, stale: bool) -> Result<()> {
        match self.replication() {
            Some(r) if !stale => Ok(crate::forwarded::caught_up(r).await?),
            _ => Ok(()),
        }
    }

    /// A stream's figures; with `stale`, as this member holds them.
    pub(crate) async fn info(&self, name: &str, stale: bool) -> Result<StreamInfo> {
        check(name)?;
        self.linearizable(stale).await?;
        Ok(self.streams.info(name)?)
    }

    /// Every stream; with `stale`, as this member holds them.
    pub(crate) async fn list(&self, stale: bool) -> Result<Vec<StreamInfo>> {
        self.linearizable(stale).await?;
        Ok(self.streams.list()?.into_iter().filter(|s| !s.name.starts_with(RESERVED)).collect())
    }

    /// The entries with consecutive ids: on a single node buffered for appending (the acks
    /// resolve once each is durable), in a cluster committed and applied.
    pub(crate) async fn send(&self, name: &str, entries: Vec<Bytes>) -> Result<Sent> {
        check(name)?;
        let Some(r) = self.replication() else { return self.send_here(name, entries).await };
        let first = match crate::forwarded::log_append(r, name, &entries).await {
            Some(appended) => appended?,
            None => self.lead_append(r, name, entries).await?,
        };
        Ok(Sent::Applied(first))
    }

    async fn send_here(&self, name: &str, entries: Vec<Bytes>) -> Result<Sent> {
        let slot = self.slot(name);
        let mut slot = slot.lock().await;
        slot.used = Some(std::time::Instant::now());
        let w = &mut slot.writer;
        let mut acks = Vec::with_capacity(entries.len());
        let mut retried = false;
        let mut pending = entries.into_iter().peekable();
        while let Some(entry) = pending.peek() {
            let writer = match w {
                Some(w) => w,
                None => w.insert(self.streams.writer(name).await?),
            };
            match writer.send(entry.clone()).await {
                Ok(a) => {
                    acks.push(a);
                    pending.next();
                }
                // Refused while the object store is out: the writer is fine.
                Err(e @ timber_stream::Error::StoreUnavailable { .. }) => return Err(e.into()),
                // A writer that failed refuses everything: replace it once, before any entry
                // of this call went to it.
                Err(e) => {
                    *w = None;
                    if retried || !acks.is_empty() {
                        return Err(e.into());
                    }
                    retried = true;
                }
            }
        }
        Ok(Sent::Acks(acks))
    }

    /// On the leader: appends `entries`, returns the id of the first once they are applied.
    pub(crate) async fn lead_append(
        &self,
        r: &Arc<Replication>,
        name: &str,
        entries: Vec<Bytes>,
    ) -> Result<Option<u64>> {
        check(name)?;
        let max = timber_stream::WriterOptions::local().max_entry_bytes;
        if let Some(e) = entries.iter().find(|e| e.len() > max) {
            return Err(timber_stream::Error::InvalidParam(format!(
                "entry of {} bytes exceeds {max} bytes",
                e.len()
            ))
            .into());
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        self.appends.lock().entry(name.to_string()).or_default().push(Waiting { entries, done });
        // The task that next holds the slot proposes every append waiting by then (this one's,
        // unless an earlier task took it); a caller that stops waiting does not stop it.
        let slot = self.slot(name);
        let (r, streams, appends) = (r.clone(), self.streams.clone(), self.appends.clone());
        let name = name.to_string();
        tokio::spawn(async move {
            let mut slot = slot.lock_owned().await;
            let group = take_group(&appends, &name);
            if group.is_empty() {
                return;
            }
            slot.used = Some(std::time::Instant::now());
            match append_group(&r, &streams, &name, &group).await {
                Ok(first) => {
                    let mut at = first;
                    for w in group {
                        let n = w.entries.len() as u64;
                        let _ = w.done.send(Ok((n > 0).then_some(at)));
                        at += n;
                    }
                }
                Err(e) => {
                    let (code, message) = (e.code(), e.to_string());
                    for w in group {
                        let message = message.clone();
                        let _ = w.done.send(Err(Error::Leader { code, message }));
                    }
                }
            }
        });
        rx.await.unwrap_or_else(|_| {
            Err(crate::keyspace::Error::ClusterDown("the append task failed".into()).into())
        })
    }

    /// On the leader: evaluates a write of stream `name` against what this member applied
    /// (`eval` gets the stream's figures, `None` if it does not exist), proposes the write it
    /// returns (with what to answer), and returns once the write is applied here.
    ///
    /// In a task of its own that owns the stream's slot: a caller that stops waiting (its
    /// client went away) neither frees the slot while the proposal is unresolved nor cuts the
    /// evaluation short.
    async fn propose<T: Send + 'static>(
        &self,
        r: &Arc<Replication>,
        name: &str,
        eval: impl FnOnce(Option<StreamInfo>) -> Result<(Option<Proposal>, T)> + Send + 'static,
    ) -> Result<T> {
        let slot = self.slot(name);
        let (r, streams, name) = (r.clone(), self.streams.clone(), name.to_string());
        let task = tokio::spawn(async move {
            let mut slot = slot.lock_owned().await;
            slot.used = Some(std::time::Instant::now());
            r.fresh().await?;
            let (p, out) = eval(find(&streams, &name)?)?;
            if let Some(p) = p {
                r.propose(p).await?;
            }
            Ok(out)
        });
        match task.await {
            Ok(r) => r,
            Err(e) => {
                Err(crate::keyspace::Error::ClusterDown(format!("the write task failed: {e}"))
                    .into())
            }
        }
    }

    /// Appends `entries` and waits until they are durable (in a cluster: applied); returns the
    /// first id.
    pub(crate) async fn append(&self, name: &str, entries: Vec<Bytes>) -> Result<Option<u64>> {
        match self.send(name, entries).await? {
            Sent::Applied(first) => Ok(first),
            Sent::Acks(acks) => {
                let mut first = None;
                for a in acks {
                    let id = a.await?;
                    first.get_or_insert(id);
                }
                Ok(first)
            }
        }
    }

    /// A reader of a stream; with `stale`, of what this member holds (else a read of it up
    /// to its current end is linearizable).
    pub(crate) async fn reader(
        &self,
        name: &str,
        start: Start,
        stale: bool,
    ) -> Result<StreamReader> {
        check(name)?;
        self.linearizable(stale).await?;
        Ok(self.streams.reader(name, start)?)
    }

    /// Drops every entry below `before`.
    pub(crate) async fn truncate(&self, name: &str, before: u64) -> Result<StreamInfo> {
        check(name)?;
        let Some(r) = self.replication() else {
            return Ok(self.streams.truncate(name, before).await?);
        };
        match crate::forwarded::log_truncate(r, name, before).await {
            Some(truncated) => truncated,
            None => self.lead_truncate(r, name, before).await,
        }
    }

    /// On a cluster's leader: truncates every stream where its retention cuts the leader's
    /// copy, through the log, so that every member drops the same entries. A stream cut since
    /// (by a client or an earlier round) is left as it is; failures are logged and the next
    /// round tries again.
    pub(crate) async fn apply_retention(&self, r: &Arc<Replication>) {
        let cuts = match self.streams.retention_cuts() {
            Ok(c) => c,
            Err(e) => return tracing::warn!(error = %e, "reading the retention cuts failed"),
        };
        for (name, before) in cuts {
            if name.starts_with(RESERVED) {
                continue;
            }
            match self.lead_truncate(r, &name, before).await {
                Ok(_) => tracing::debug!(stream = %name, before, "retention truncated a stream"),
                Err(e) => tracing::warn!(stream = %name, error = %e, "retention truncation failed"),
            }
        }
    }

    /// On the leader: [`Logs::truncate`].
    pub(crate) async fn lead_truncate(
        &self,
        r: &Arc<Replication>,
        name: &str,
        before: u64,
    ) -> Result<StreamInfo> {
        check(name)?;
        let stream = name.to_string();
        self.propose(r, name, move |info| {
            let info = info.ok_or_else(|| not_found(&stream))?;
            if before.min(info.next_id) <= info.first_id {
                return Ok((None, ()));
            }
            let mut p = Proposal::default();
            p.truncate_stream(stream, before.min(info.next_id));
            Ok((Some(p), ()))
        })
        .await?;
        Ok(self.streams.info(name)?)
    }

    /// Deletes a stream.
    pub(crate) async fn delete(&self, name: &str) -> Result<()> {
        check(name)?;
        let Some(r) = self.replication() else {
            let slot = self.slots.lock().remove(name);
            if let Some(slot) = slot {
                slot.lock().await.writer.take();
            }
            return Ok(self.streams.delete(name).await?);
        };
        match crate::forwarded::log_delete(r, name).await {
            Some(deleted) => deleted,
            None => self.lead_delete(r, name).await,
        }
    }

    /// On the leader: [`Logs::delete`].
    pub(crate) async fn lead_delete(&self, r: &Arc<Replication>, name: &str) -> Result<()> {
        check(name)?;
        let stream = name.to_string();
        self.propose(r, name, move |info| {
            info.ok_or_else(|| not_found(&stream))?;
            let mut p = Proposal::default();
            p.delete_stream(stream);
            Ok((Some(p), ()))
        })
        .await
    }

    /// Closes the writers not used for `idle` (and forgets idle slots); returns how many
    /// writers it closed.
    pub(crate) async fn close_idle(&self, idle: std::time::Duration) -> u64 {
        let mut idle_slots = Vec::new();
        // A slot another caller holds a handle of (about to lock it) stays: two slots of one
        // stream would let two of its writes be evaluated at once.
        self.slots.lock().retain(|_, s| match s.try_lock() {
            Ok(g) if Arc::strong_count(s) == 1 && g.used.is_none_or(|t| t.elapsed() >= idle) => {
                idle_slots.push(s.clone());
                false
            }
            _ => true,
        });
        let mut closed = 0;
        for s in idle_slots {
            if let Some(w) = s.lock().await.writer.take() {
                if let Err(e) = w.close().await {
                    tracing::warn!(error = %e, "closing an idle stream writer failed");
                }
                closed += 1;
            }
        }
        closed
    }

    /// Flushes and closes every writer.
    pub(crate) async fn close(&self) -> Result<()> {
        let slots: Vec<_> = self.slots.lock().drain().map(|(_, s)| s).collect();
        for s in slots {
            if let Some(w) = s.lock().await.writer.take() {
                close_writer(w).await;
            }
        }
        Ok(())
    }
}

/// Closes a writer at shutdown. A failure is logged, not returned: the entries the writer
/// acknowledged are in the journal (with the object store out, for instance), and the next
/// open records them; the server goes on closing the rest.
pub(crate) async fn close_writer(w: timber_stream::StreamWriter) {
    let stream = w.stream().to_string();
    if let Err(e) = w.close().await {
        tracing::warn!(%stream, error = %e, "closing a stream writer failed; its acknowledged entries stay in the journal");
    }
}
