//! timber-client: an async Rust client of `timberd` over gRPC.
//!
//! One [`Client`] holds one HTTP/2 connection (tonic `Channel`), shared by every call and cheap
//! to clone. Every call has a timeout; calls that are safe to repeat (reads, puts, deletes,
//! truncation, listing) are retried with exponential backoff when the server is unavailable.
//! Appends are not retried: an append that timed out may have landed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), timber_client::Error> {
//! let client = timber_client::Client::connect("http://127.0.0.1:50051").await?;
//! client.put("greeting", "hello").await?;
//! let w = client.writer("events").await?;
//! let id = w.send(vec!["e1".into(), "e2".into()]).await?.await?;
//! let mut r = client.reader("events", timber_client::Start::Earliest, false).await?;
//! while let Some(e) = r.next().await? {
//!     println!("{} {:?}", e.id, e.data);
//! }
//! # let _ = id; Ok(()) }
//! ```

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

mod transaction;
mod txn;

pub use transaction::{Isolation, Transaction, TxnOptions};
pub use txn::{Cmp, Txn, TxnOpResult, TxnResult};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::FutureExt as _;
use timber_proto::v1 as pb;
use timber_proto::v1::admin_client::AdminClient;
use timber_proto::v1::kv_client::KvClient;
use timber_proto::v1::streams_client::StreamsClient;
use tokio::sync::{mpsc, oneshot, Mutex};
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

/// What kind of failure a server error is (the gRPC status code, without tonic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// The call was cancelled.
    Cancelled,
    /// An error the server did not classify.
    Unknown,
    /// The request is malformed or too large (an empty stream name, a value over the limit).
    InvalidArgument,
    /// The server's deadline passed.
    DeadlineExceeded,
    /// The stream does not exist.
    NotFound,
    /// The stream already exists.
    AlreadyExists,
    /// The token does not allow the call.
    PermissionDenied,
    /// A limit of the server was reached (connections, memory).
    ResourceExhausted,
    /// The server is not in a state to run the call.
    FailedPrecondition,
    /// The call was aborted by a conflict.
    Aborted,
    /// A read starts outside the stream (truncated or beyond its end).
    OutOfRange,
    /// The server does not implement the call.
    Unimplemented,
    /// The server failed (an I/O error, a bug).
    Internal,
    /// The server is unavailable (shutting down, unreachable); idempotent calls are retried.
    Unavailable,
    /// Data was lost or corrupted.
    DataLoss,
    /// No token, or a wrong one.
    Unauthenticated,
    /// A code this client does not know.
    Other,
}

/// The server's status.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The server's version.
    pub version: String,
    /// Time since the server started.
    pub uptime: Duration,
    /// Live keys of the keyspace.
    pub keys: u64,
    /// Streams of the server.
    pub streams: u64,
    /// The server's data directory.
    pub data_dir: String,
    /// The durability mode, e.g. `interval:1000` or `always`.
    pub sync: String,
    /// Where stream fragments are kept: `local`, or `s3://<bucket>/<prefix> at <endpoint>`.
    pub stream_store: String,
    /// How long the object store has been failing (`None`: it answers).
    pub store_unavailable: Option<Duration>,
    /// The object store's last error while it fails.
    pub store_last_error: Option<String>,
    /// Bytes of acknowledged entries waiting in the journal for the object store.
    pub journal_backlog_bytes: u64,
    /// The cluster as this server sees it, if it is a member of one.
    pub cluster: Option<ClusterStatus>,
}

/// A cluster member's view of its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStatus {
    /// The member's id.
    pub node_id: u64,
    /// `leader`, `follower`, `candidate` or `learner`.
    pub role: String,
    /// The current term.
    pub term: u64,
    /// The leader it knows, if any.
    pub leader_id: Option<u64>,
    /// Index of the last entry in its log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry it knows committed (stored by a majority).
    pub commit_index: Option<u64>,
    /// Index of the last entry it applied.
    pub applied_index: Option<u64>,
    /// Every member: id, Raft address, whether it votes, and (known on the leader) the last
    /// entry it holds and the entries it lacks.
    pub members: Vec<ClusterMember>,
}

/// One member of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterMember {
    /// Its id.
    pub id: u64,
    /// The address of its Raft endpoint.
    pub raft_addr: String,
    /// Whether it only receives the log, without a vote.
    pub learner: bool,
    /// The last entry it holds, as the leader knows (`None` when the server asked does not
    /// lead).
    pub matched_index: Option<u64>,
    /// Entries it lacks, as the leader knows (`None` when the server asked does not lead).
    pub lag: Option<u64>,
}

/// A stream's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamInfo {
    /// The stream's name.
    pub name: String,
    /// The first readable id.
    pub first_id: u64,
    /// One past the last durable id.
    pub next_id: u64,
    /// Bytes the stream holds.
    pub bytes: u64,
    /// When the stream was created.
    pub created: SystemTime,
}

/// Errors of client calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address is malformed or the connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server answered with an error.
    #[error("{op}: {code:?}: {message}")]
    Server {
        /// The call.
        op: &'static str,
        /// What kind of error (NotFound, AlreadyExists, InvalidArgument, OutOfRange...).
        code: Code,
        /// The server's message.
        message: String,
    },
    /// The call did not finish within the timeout.
    #[error("{op}: timed out after {after:?}")]
    Timeout {
        /// The call.
        op: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The writer or reader's stream ended (the server went away or an earlier append failed).
    #[error("the stream of {op} ended")]
    Closed {
        /// The call.
        op: &'static str,
    },
    /// A local file operation failed (writing a backup).
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was done.
        op: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

impl Error {
    /// The code, for server errors.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn connect(addr: String, source: tonic::transport::Error) -> Error {
        Error::Connect { addr, source: Box::new(source) }
    }

    fn server(op: &'static str, s: tonic::Status) -> Error {
        Error::Server { op, code: s.code().into(), message: s.message().to_string() }
    }

    fn retryable(&self) -> bool {
        matches!(self, Error::Server { code: Code::Unavailable | Code::Unknown, .. })
            || matches!(self, Error::Timeout { .. })
    }
}

/// Conversions from the wire types, which stay private to this crate.
mod pb_impl {
    use std::time::{Duration, SystemTime};

    use timber_proto::v1 as pb;

    use super::{ClusterMember, ClusterStatus, Code, Status, StreamInfo};

    impl From<tonic::Code> for Code {
        fn from(c: tonic::Code) -> Code {
            use tonic::Code as C;
            match c {
                C::Cancelled => Code::Cancelled,
                C::Unknown => Code::Unknown,
                C::InvalidArgument => Code::InvalidArgument,
                C::DeadlineExceeded => Code::DeadlineExceeded,
                C::NotFound => Code::NotFound,
                C::AlreadyExists => Code::AlreadyExists,
                C::PermissionDenied => Code::PermissionDenied,
                C::ResourceExhausted => Code::ResourceExhausted,
                C::FailedPrecondition => Code::FailedPrecondition,
                C::Aborted => Code::Aborted,
                C::OutOfRange => Code::OutOfRange,
                C::Unimplemented => Code::Unimplemented,
                C::Internal => Code::Internal,
                C::Unavailable => Code::Unavailable,
                C::DataLoss => Code::DataLoss,
                C::Unauthenticated => Code::Unauthenticated,
                // An error status with code Ok is not one the server sends.
                C::Ok => Code::Other,
            }
        }
    }

    impl From<pb::StatusResponse> for Status {
        fn from(s: pb::StatusResponse) -> Status {
            Status {
                version: s.version,
                uptime: Duration::from_millis(s.uptime_ms),
                keys: s.keys,
                streams: s.streams,
                data_dir: s.data_dir,
                sync: s.sync,
                stream_store: s.stream_store,
                store_unavailable: (s.store_unavailable_ms > 0)
                    .then(|| Duration::from_millis(s.store_unavailable_ms)),
                store_last_error: (!s.store_last_error.is_empty()).then_some(s.store_last_error),
                journal_backlog_bytes: s.journal_backlog_bytes,
                cluster: s.cluster.map(|c| {
                    let idx = |i: i64| u64::try_from(i).ok();
                    ClusterStatus {
                        node_id: c.node_id,
                        role: c.role,
                        term: c.term,
                        leader_id: (c.leader_id > 0).then_some(c.leader_id),
                        last_log_index: idx(c.last_log_index),
                        commit_index: idx(c.commit_index),
                        applied_index: idx(c.applied_index),
                        members: c
                            .members
                            .into_iter()
                            .map(|m| ClusterMember {
                                id: m.id,
                                raft_addr: m.raft_addr,
                                learner: m.learner,
                                matched_index: idx(m.matched_index),
                                lag: idx(m.lag),
                            })
                            .collect(),
                    }
                }),
            }
        }
    }

    impl From<pb::StreamInfo> for StreamInfo {
        fn from(s: pb::StreamInfo) -> StreamInfo {
            StreamInfo {
                name: s.name,
                first_id: s.first_id,
                next_id: s.next_id,
                bytes: s.bytes,
                created: SystemTime::UNIX_EPOCH + Duration::from_millis(s.created_ms),
            }
        }
    }
}

/// Result of client calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Options of a [`Client`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Time limit of one call (not of a reader or writer's whole life). Default 10 s.
    pub timeout: Duration,
    /// Connection timeout. Default 5 s.
    pub connect_timeout: Duration,
    /// Retries of idempotent calls. Default 3.
    pub retries: u32,
    /// First backoff between retries, doubled each time. Default 50 ms.
    pub backoff: Duration,
    /// The server's shared secret, sent as a bearer token.
    pub token: Option<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            retries: 3,
            backoff: Duration::from_millis(50),
            token: None,
        }
    }
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the first entry not truncated.
    Earliest,
    /// After the last entry: only new entries.
    Latest,
    /// At this id.
    At(u64),
}

/// One put or delete of [`Client::write_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Store the value.
    Put(Bytes, Bytes),
    /// Delete the key.
    Delete(Bytes),
}

/// Which keys [`Client::scan`] returns.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Keys starting with this.
    pub prefix: Bytes,
    /// Keys at or after this.
    pub start: Bytes,
    /// Keys before this (empty: no bound).
    pub end: Bytes,
    /// Most pairs (0: all).
    pub limit: u64,
    /// In a cluster: read the server's own state even if it does not lead (may lag the
    /// leader); otherwise the scan is linearizable.
    pub stale: bool,
}

/// A stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Dense id from 0.
    pub id: u64,
    /// The payload.
    pub data: Bytes,
}

/// A time to live as the server takes it: whole milliseconds, at least one (0 means none).
pub(crate) fn ttl_ms(ttl: Duration) -> u64 {
    ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

/// A connection to one timberd.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    opts: Options,
}

impl Client {
    /// Connects with default options. `addr` is a URL such as `http://127.0.0.1:50051`.
    pub async fn connect(addr: impl Into<String>) -> Result<Client> {
        Client::connect_with(addr, Options::default()).await
    }

    /// Connects with `opts`.
    pub async fn connect_with(addr: impl Into<String>, opts: Options) -> Result<Client> {
        let addr = addr.into();
        let endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|source| Error::connect(addr.clone(), source))?
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        let channel = endpoint.connect().await.map_err(|source| Error::connect(addr, source))?;
        Ok(Client { channel, opts })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.opts.token {
            if let Ok(v) = format!("Bearer {t}").parse() {
                r.metadata_mut().insert("authorization", v);
            }
        }
        r
    }

    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    fn streams(&self) -> StreamsClient<Channel> {
        StreamsClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    async fn once<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.opts.timeout, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(Error::server(op, s)),
            Err(_) => Err(Error::Timeout { op, after: self.opts.timeout }),
        }
    }

    /// Runs an idempotent call, retrying while the server is unavailable.
    async fn idempotent<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut backoff = self.opts.backoff;
        let mut attempt = 0;
        loop {
            match self.once(op, f()).await {
                Err(e) if e.retryable() && attempt < self.opts.retries => {
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                r => return r,
            }
        }
    }

    /// The value of a key (`None` if it does not exist).
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>> {
        self.get_with(key.into(), false).await
    }

    /// The value of a key as the server has it, even when it is a cluster member that does not
    /// lead (it may lag the leader); `get` is linearizable.
    pub async fn get_stale(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>> {
        self.get_with(key.into(), true).await
    }

    /// The value of a key and its version (`None` if it does not exist): a number that
    /// changes with every write of the key, even of the same value, and only grows, for
    /// [`Txn::when_version`].
    pub async fn get_versioned(&self, key: impl Into<Bytes>) -> Result<Option<(Bytes, u64)>> {
        let r = self.get_response(key.into(), false).await?;
        Ok(r.value.map(|v| (v, r.version)))
    }

    async fn get_with(&self, key: Bytes, stale: bool) -> Result<Option<Bytes>> {
        Ok(self.get_response(key, stale).await?.value)
    }

    async fn get_response(&self, key: Bytes, stale: bool) -> Result<pb::GetResponse> {
        self.idempotent("get", || {
            let req = pb::GetRequest { key: key.clone(), stale };
            let (mut c, r) = (self.kv(), self.request(req));
            async move { c.get(r).await }
        })
        .await
    }

    /// Stores a value.
    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<()> {
        self.put_inner(key.into(), value.into(), None).await
    }

    /// Stores a value that expires after `ttl`.
    pub async fn put_with_ttl(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Result<()> {
        self.put_inner(key.into(), value.into(), Some(ttl_ms(ttl))).await
    }

    async fn put_inner(&self, key: Bytes, value: Bytes, ttl_ms: Option<u64>) -> Result<()> {
        self.idempotent("put", || {
            let m = pb::PutRequest { key: key.clone(), value: value.clone(), ttl_ms };
            {
                let (mut c, r) = (self.kv(), self.request(m));
                async move { c.put(r).await }
            }
        })
        .await?;
        Ok(())
    }

    /// Deletes a key; whether it existed.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool> {
        let key = key.into();
        let r = self
            .idempotent("delete", || {
                let (mut c, r) = (self.kv(), self.request(pb::DeleteRequest { key: key.clone() }));
                async move { c.delete(r).await }
            })
            .await?;
        Ok(r.existed)
    }

    /// Applies puts and deletes atomically.
    pub async fn write_batch(&self, batch: Vec<Mutation>) -> Result<()> {
        let mutations: Vec<pb::Mutation> = batch
            .into_iter()
            .map(|m| match m {
                Mutation::Put(key, v) => pb::Mutation { key, value: Some(v) },
                Mutation::Delete(key) => pb::Mutation { key, value: None },
            })
            .collect();
        self.idempotent("batch_write", || {
            let m = pb::BatchWriteRequest { mutations: mutations.clone() };
            {
                let (mut c, r) = (self.kv(), self.request(m));
                async move { c.batch_write(r).await }
            }
        })
        .await?;
        Ok(())
    }

    /// Keys and values in key order.
    pub async fn scan(&self, scan: Scan) -> Result<Vec<(Bytes, Bytes)>> {
        let req = pb::ScanRequest {
            prefix: scan.prefix,
            start: scan.start,
            end: scan.end,
            limit: scan.limit,
            stale: scan.stale,
        };
        let mut stream = self
            .idempotent("scan", || {
                let (mut c, r) = (self.kv(), self.request(req.clone()));
                async move { c.scan(r).await }
            })
            .await?;
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(self.opts.timeout, stream.message()).await {
                Ok(Ok(Some(kv))) => out.push((kv.key, kv.value)),
                Ok(Ok(None)) => return Ok(out),
                Ok(Err(s)) => return Err(Error::server("scan", s)),
                Err(_) => return Err(Error::Timeout { op: "scan", after: self.opts.timeout }),
            }
        }
    }

    /// Creates a stream; `retention` drops entries older than it, `retention_bytes` the
    /// oldest while the stream holds more.
    pub async fn create_stream(
        &self,
        name: &str,
        retention: Option<Duration>,
        retention_bytes: Option<u64>,
    ) -> Result<StreamInfo> {
        let m = pb::CreateStreamRequest {
            name: name.into(),
            retention_ms: retention.map(|d| d.as_millis() as u64),
            retention_bytes,
        };
        let s = self.once("create_stream", self.streams().create(self.request(m))).await?;
        Ok(s.into())
    }

    /// A stream's figures.
    pub async fn stream_info(&self, name: &str) -> Result<StreamInfo> {
        let s = self
            .idempotent("stream_info", || {
                let (mut c, r) =
                    (self.streams(), self.request(pb::StreamRequest { name: name.into() }));
                async move { c.info(r).await }
            })
            .await?;
        Ok(s.into())
    }

    /// Every stream.
    pub async fn list_streams(&self) -> Result<Vec<StreamInfo>> {
        let r = self
            .idempotent("list_streams", || {
                let (mut c, r) = (self.streams(), self.request(pb::ListStreamsRequest {}));
                async move { c.list(r).await }
            })
            .await?;
        Ok(r.streams.into_iter().map(StreamInfo::from).collect())
    }

    /// Drops every entry below `before`.
    pub async fn truncate(&self, name: &str, before: u64) -> Result<StreamInfo> {
        let s = self
            .idempotent("truncate", || {
                let m = pb::TruncateRequest { name: name.into(), before };
                {
                    let (mut c, r) = (self.streams(), self.request(m));
                    async move { c.truncate(r).await }
                }
            })
            .await?;
        Ok(s.into())
    }

    /// Deletes a stream.
    pub async fn delete_stream(&self, name: &str) -> Result<()> {
        self.once(
            "delete_stream",
            self.streams().delete(self.request(pb::StreamRequest { name: name.into() })),
        )
        .await?;
        Ok(())
    }

    /// Appends entries with consecutive ids and waits until they are durable; returns the
    /// first id.
    pub async fn append(&self, name: &str, entries: Vec<Bytes>) -> Result<u64> {
        let w = self.writer(name).await?;
        let ack = w.send(entries).await?;
        tokio::time::timeout(self.opts.timeout, ack)
            .await
            .map_err(|_| Error::Timeout { op: "append", after: self.opts.timeout })?
    }

    /// Opens a writer: a pipelined append stream to the server.
    pub async fn writer(&self, name: &str) -> Result<StreamWriter> {
        let (tx, rx) = mpsc::channel::<pb::AppendRequest>(1024);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut inbound =
            self.once("append", self.streams().append(self.request(outbound))).await?;
        let (pending_tx, mut pending_rx) =
            mpsc::unbounded_channel::<oneshot::Sender<Result<u64>>>();
        tokio::spawn(async move {
            while let Some(waiter) = pending_rx.recv().await {
                match inbound.message().await {
                    Ok(Some(r)) => {
                        let _ = waiter.send(Ok(r.first_id));
                    }
                    Ok(None) => {
                        let _ = waiter.send(Err(Error::Closed { op: "append" }));
                        break;
                    }
                    Err(s) => {
                        let _ = waiter.send(Err(Error::server("append", s)));
                        break;
                    }
                }
            }
            // Whatever is still waiting fails: the stream is over.
            pending_rx.close();
            while let Ok(w) = pending_rx.try_recv() {
                let _ = w.send(Err(Error::Closed { op: "append" }));
            }
        });
        Ok(StreamWriter {
            name: name.to_string(),
            state: Mutex::new(WriterState { tx, pending: pending_tx, named: false }),
        })
    }

    /// Opens a reader from `start`; with `follow`, it waits at the tail for new entries. In a
    /// cluster it sees every entry committed before the call, through any member.
    pub async fn reader(&self, name: &str, start: Start, follow: bool) -> Result<StreamReader> {
        self.reader_with(name, start, follow, false).await
    }

    /// [`Client::reader`] of the server's own copy of the stream: in a cluster, a member that
    /// does not lead may lag the leader's.
    pub async fn reader_stale(
        &self,
        name: &str,
        start: Start,
        follow: bool,
    ) -> Result<StreamReader> {
        self.reader_with(name, start, follow, true).await
    }

    async fn reader_with(
        &self,
        name: &str,
        start: Start,
        follow: bool,
        stale: bool,
    ) -> Result<StreamReader> {
        let (start, id) = match start {
            Start::Earliest => (pb::StartAt::Earliest, 0),
            Start::Latest => (pb::StartAt::Latest, 0),
            Start::At(id) => (pb::StartAt::Id, id),
        };
        let m = pb::ReadRequest {
            stream: name.into(),
            start: start as i32,
            id,
            follow,
            limit: 0,
            stale,
        };
        let inner = self.once("read", self.streams().read(self.request(m))).await?;
        Ok(StreamReader { inner })
    }

    /// Adds a member to the server's cluster as a learner (it receives the log but does not
    /// vote); returns once it caught up. The server must lead.
    pub async fn add_learner(&self, id: u64, raft_addr: &str) -> Result<()> {
        use pb::membership_change::Change;
        let add = pb::AddLearner { id, raft_addr: raft_addr.into() };
        self.change_membership("add_learner", Change::AddLearner(add)).await
    }

    /// Makes a learner of the server's cluster a voter. The server must lead.
    pub async fn promote(&self, id: u64) -> Result<()> {
        self.change_membership("promote", pb::membership_change::Change::Promote(id)).await
    }

    /// Removes a member from the server's cluster. The server must lead.
    pub async fn remove_member(&self, id: u64) -> Result<()> {
        self.change_membership("remove_member", pb::membership_change::Change::Remove(id)).await
    }

    /// Hands the leadership of the server's cluster to the voter `id`; returns once it leads.
    /// Writes and linearizable reads pause on the leader meanwhile (a few hundred
    /// milliseconds), and those that waited fail as after any election.
    pub async fn transfer_leader(&self, id: u64) -> Result<()> {
        use pb::membership_change::Change;
        self.change_membership("transfer_leader", Change::TransferLeader(id)).await
    }

    async fn change_membership(
        &self,
        op: &'static str,
        change: pb::membership_change::Change,
    ) -> Result<()> {
        let mut c = AdminClient::new(self.channel.clone());
        let r = self.request(pb::MembershipChange { change: Some(change) });
        self.once(op, c.change_membership(r)).await?;
        Ok(())
    }

    /// Takes a consistent backup of the server's keyspace into the directory `dir` (created;
    /// it must not exist or be empty), while the server goes on serving. Returns the position
    /// the backup stands at (`seq:<n>` or `raft:<term>-<node>-<index>`) and its size in bytes.
    /// The file is synced and renamed into place only once complete.
    pub async fn backup(&self, dir: &std::path::Path) -> Result<(String, u64)> {
        let io = |op: &'static str, path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { op, path, source }
        };
        if dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
            return Err(Error::Io {
                op: "back up into",
                path: dir.to_path_buf(),
                source: std::io::Error::other("the directory is not empty"),
            });
        }
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let (tmp, done) = (dir.join("keyspace.backup.tmp"), dir.join("keyspace.backup"));
        let written = self.backup_into(&tmp).await;
        let (position, bytes) = match written {
            Ok(w) => w,
            Err(e) => {
                // Nothing half-written stays behind (a retry into the directory then works).
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, &done).map_err(io("rename", &tmp))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync", dir))?;
        Ok((position, bytes))
    }

    /// Streams a backup into the file `tmp`, synced.
    async fn backup_into(&self, tmp: &std::path::Path) -> Result<(String, u64)> {
        use std::io::Write;
        let io = |op: &'static str, path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { op, path, source }
        };
        let mut c = AdminClient::new(self.channel.clone());
        let r = self.request(pb::BackupRequest {});
        let mut stream = self.once("backup", c.backup(r)).await?;
        let mut file = std::fs::File::create(tmp).map_err(io("create", tmp))?;
        let (mut position, mut bytes) = (String::new(), 0u64);
        loop {
            match tokio::time::timeout(self.opts.timeout, stream.message()).await {
                Ok(Ok(Some(chunk))) => {
                    if position.is_empty() {
                        position = chunk.position;
                    }
                    bytes += chunk.data.len() as u64;
                    file.write_all(&chunk.data).map_err(io("write", tmp))?;
                }
                Ok(Ok(None)) => break,
                Ok(Err(s)) => return Err(Error::server("backup", s)),
                Err(_) => return Err(Error::Timeout { op: "backup", after: self.opts.timeout }),
            }
        }
        file.sync_all().map_err(io("sync", tmp))?;
        Ok((position, bytes))
    }

    /// The server's status.
    pub async fn status(&self) -> Result<Status> {
        let s = self
            .idempotent("status", || {
                let (mut c, r) =
                    (AdminClient::new(self.channel.clone()), self.request(pb::StatusRequest {}));
                async move { c.status(r).await }
            })
            .await?;
        Ok(s.into())
    }
}

#[derive(Debug)]
struct WriterState {
    tx: mpsc::Sender<pb::AppendRequest>,
    pending: mpsc::UnboundedSender<oneshot::Sender<Result<u64>>>,
    named: bool,
}

/// A pipelined writer of one stream: `send` many batches, await their acks later.
#[derive(Debug)]
pub struct StreamWriter {
    name: String,
    state: Mutex<WriterState>,
}

/// Resolves to the first id of a sent batch once it is durable.
#[derive(Debug)]
#[must_use = "an Ack tells whether the entries became durable"]
pub struct StreamAck {
    rx: oneshot::Receiver<Result<u64>>,
}

impl Future for StreamAck {
    type Output = Result<u64>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<u64>> {
        self.rx.poll_unpin(cx).map(|r| r.unwrap_or(Err(Error::Closed { op: "append" })))
    }
}

impl StreamWriter {
    /// Sends a batch of entries; they get consecutive ids. Acks resolve in send order.
    pub async fn send(&self, entries: Vec<Bytes>) -> Result<StreamAck> {
        let mut st = self.state.lock().await;
        let (tx, rx) = oneshot::channel();
        st.pending.send(tx).map_err(|_| Error::Closed { op: "append" })?;
        let stream = if st.named { String::new() } else { self.name.clone() };
        st.tx
            .send(pb::AppendRequest { stream, entries })
            .await
            .map_err(|_| Error::Closed { op: "append" })?;
        st.named = true;
        Ok(StreamAck { rx })
    }

    /// Sends a batch and waits until it is durable; returns its first id.
    pub async fn append(&self, entries: Vec<Bytes>) -> Result<u64> {
        self.send(entries).await?.await
    }
}

/// A reader of one stream.
#[derive(Debug)]
pub struct StreamReader {
    inner: tonic::Streaming<pb::Entry>,
}

impl StreamReader {
    /// The next entry; `None` at the end (without `follow`). With `follow`, waits for the next
    /// entry.
    pub async fn next(&mut self) -> Result<Option<Entry>> {
        match self.inner.message().await {
            Ok(Some(e)) => Ok(Some(Entry { id: e.id, data: e.data })),
            Ok(None) => Ok(None),
            Err(s) => Err(Error::server("read", s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_map_to_the_client_codes_of_the_same_name() {
        assert_eq!(Code::from(tonic::Code::NotFound), Code::NotFound);
        assert_eq!(Code::from(tonic::Code::Unauthenticated), Code::Unauthenticated);
        assert_eq!(Code::from(tonic::Code::Ok), Code::Other);
        let e = Error::server("get", tonic::Status::already_exists("stream s exists"));
        assert_eq!(e.code(), Some(Code::AlreadyExists));
        assert_eq!(e.to_string(), "get: AlreadyExists: stream s exists");
    }

    #[test]
    fn only_unavailable_unknown_and_timeouts_are_retried() {
        let retryable = |s: tonic::Status| Error::server("get", s).retryable();
        assert!(retryable(tonic::Status::unavailable("down")));
        assert!(retryable(tonic::Status::unknown("?")));
        assert!(!retryable(tonic::Status::not_found("k")));
        assert!(!retryable(tonic::Status::invalid_argument("k")));
        assert!(Error::Timeout { op: "get", after: Duration::from_secs(1) }.retryable());
        assert!(!Error::Closed { op: "append" }.retryable());
    }

    #[test]
    fn wire_messages_convert_to_domain_types() {
        let s = Status::from(pb::StatusResponse {
            version: "0.1.0".into(),
            uptime_ms: 2500,
            keys: 3,
            streams: 1,
            data_dir: "/d".into(),
            sync: "always".into(),
            stream_store: "s3://b/p at http://h".into(),
            store_unavailable_ms: 0,
            store_last_error: String::new(),
            journal_backlog_bytes: 7,
            cluster: Some(pb::ClusterStatus {
                node_id: 2,
                role: "follower".into(),
                term: 4,
                leader_id: 0,
                last_log_index: 9,
                applied_index: -1,
                commit_index: 8,
                members: vec![
                    pb::ClusterMember {
                        id: 1,
                        raft_addr: "h:1".into(),
                        lag: -1,
                        learner: false,
                        matched_index: -1,
                    },
                    pb::ClusterMember {
                        id: 3,
                        raft_addr: "h:3".into(),
                        lag: 2,
                        learner: true,
                        matched_index: 7,
                    },
                ],
            }),
        });
        let c = s.cluster.clone().unwrap();
        assert_eq!((c.node_id, c.role.as_str(), c.term, c.leader_id), (2, "follower", 4, None));
        assert_eq!((c.last_log_index, c.applied_index), (Some(9), None));
        assert_eq!((c.members[0].id, c.members[0].lag), (1, None));
        assert_eq!(c.commit_index, Some(8));
        let m = &c.members[1];
        assert_eq!((m.learner, m.matched_index, m.lag), (true, Some(7), Some(2)));
        assert_eq!((s.store_unavailable, s.store_last_error.as_deref()), (None, None));
        assert_eq!((s.stream_store.as_str(), s.journal_backlog_bytes), ("s3://b/p at http://h", 7));
        assert_eq!(s.uptime, Duration::from_millis(2500));
        assert_eq!((s.keys, s.streams, s.sync.as_str()), (3, 1, "always"));
        let i = StreamInfo::from(pb::StreamInfo {
            name: "ev".into(),
            first_id: 2,
            next_id: 5,
            bytes: 10,
            created_ms: 1_700_000_000_123,
        });
        let ms = i.created.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(
            (i.name.as_str(), i.first_id, i.next_id, i.bytes, ms),
            ("ev", 2, 5, 10, 1_700_000_000_123)
        );
    }
}
