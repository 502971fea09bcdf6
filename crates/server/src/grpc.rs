//! The gRPC endpoint (tonic, `proto/timber.proto`): the Kv, Streams and Admin services over the
//! same keyspace and log streams as the other endpoints.
//!
//! Invariants: a call is answered only after its writes are durable as the server's sync mode
//! promises (under `always`, puts are synced before the reply; appends always are); errors map
//! to gRPC codes (NotFound, AlreadyExists, InvalidArgument, OutOfRange for truncated reads,
//! Unauthenticated, Internal for storage failures) with the engine's message.

use std::pin::Pin;
use std::sync::Arc;

use futures::{FutureExt as _, Stream};
use timber_proto::v1 as pb;
use timber_proto::v1::admin_server::{Admin, AdminServer};
use timber_proto::v1::kv_server::{Kv, KvServer};
use timber_proto::v1::streams_server::{Streams, StreamsServer};
use timber_proto::v1::transactions_server::{Transactions, TransactionsServer};
use timber_stream::{Start, StreamConfig};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::replication::Answer;
use tonic::{Request, Response, Status, Streaming};

use crate::keyspace::{now_ms, Value};
use crate::txn::{CmpOp, Compare, Op, OpResult, Outcome, Target, Txn};
use crate::Engines;

type Reply<T> = Result<Response<T>, Status>;
type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC status for a stream error.
pub(crate) fn stream_status(e: impl Into<crate::logs::Error>) -> Status {
    use crate::logs::Code;
    let e = e.into();
    let msg = e.to_string();
    match e.code() {
        Code::NotFound => Status::not_found(msg),
        Code::AlreadyExists => Status::already_exists(msg),
        Code::Invalid => Status::invalid_argument(msg),
        Code::OutOfRange => Status::out_of_range(msg),
        Code::Fenced => Status::aborted(msg),
        Code::Unavailable => Status::unavailable(msg),
        Code::Internal => {
            tracing::error!(error = %msg, "stream storage error");
            Status::internal(msg)
        }
    }
}

fn key_status(e: crate::keyspace::Error) -> Status {
    use crate::keyspace::Error;
    match e {
        // Retryable: on the leader, or once a quorum is back.
        Error::NotLeader { .. } | Error::ClusterDown(_) => Status::unavailable(e.to_string()),
        Error::TooLarge(m) => Status::invalid_argument(m),
        Error::Refused(_) => Status::failed_precondition(e.to_string()),
        // Retryable: the whole transaction.
        Error::Kv(timber_kv::Error::Conflict { .. }) => Status::aborted(e.to_string()),
        e => {
            tracing::error!(error = %e, "keyspace error");
            Status::internal(e.to_string())
        }
    }
}

/// A reply of the leader that a forwarded call cannot have.
fn unexpected(a: Answer) -> Status {
    Status::internal(format!("unexpected reply from the leader: {a:?}"))
}

impl Service {
    /// On a cluster member that does not lead: the reply of the Redis-protocol command `args`
    /// run on the leader. `None` on a single node and on the leader.
    async fn on_leader(&self, args: &[&[u8]]) -> Result<Option<Answer>, Status> {
        let Some(r) = self.engines.keys.replication() else { return Ok(None) };
        let args = args.iter().map(|a| bytes::Bytes::copy_from_slice(a)).collect();
        r.on_leader(args).await.transpose().map_err(key_status)
    }
}

/// The outcome of a keyspace write task (`None`: the task died).
fn settled<T>(r: Option<Result<T, crate::keyspace::Error>>) -> Result<T, Status> {
    match r {
        Some(r) => r.map_err(key_status),
        None => Err(Status::internal("write task failed")),
    }
}

/// The services, sharing the server's engines.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    engines: Arc<Engines>,
    stop: watch::Receiver<bool>,
}

impl Service {
    async fn synced<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::keyspace::Keyspace) -> Result<T, crate::keyspace::Error> + Send + 'static,
    ) -> Result<T, Status> {
        settled(self.engines.keys.write_durably(f).await)
    }

    /// [`crate::keyspace::Keyspace::write_values`].
    async fn written(&self, items: Vec<(bytes::Bytes, Option<Value>)>) -> Result<(), Status> {
        settled(self.engines.keys.write_values(items).await)
    }

    fn check_size(&self, n: usize) -> Result<(), Status> {
        if n > self.engines.max_value {
            return Err(Status::invalid_argument(format!(
                "value of {n} bytes exceeds the limit of {} bytes",
                self.engines.max_value
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Kv for Service {
    async fn get(&self, req: Request<pb::GetRequest>) -> Reply<pb::GetResponse> {
        let r = req.into_inner();
        let got = match r.stale {
            true => crate::forwarded::get_here(&self.engines.keys, &r.key),
            false => crate::forwarded::get(&self.engines, r.key).await,
        };
        match got {
            Ok(r) => Ok(Response::new(r)),
            // Not a string (a Redis stream): no value.
            Err(crate::keyspace::Error::WrongType) => {
                Ok(Response::new(pb::GetResponse { value: None, version: 0 }))
            }
            Err(e) => Err(key_status(e)),
        }
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Reply<pb::PutResponse> {
        let r = req.into_inner();
        self.check_size(r.value.len())?;
        let ttl = r.ttl_ms.filter(|t| *t > 0);
        let px = ttl.map(|t| t.to_string());
        let mut args: Vec<&[u8]> = vec![b"SET", &r.key, &r.value];
        if let Some(px) = &px {
            args.extend([&b"PX"[..], px.as_bytes()]);
        }
        if let Some(a) = self.on_leader(&args).await? {
            return match a {
                Answer::Ok => Ok(Response::new(pb::PutResponse {})),
                other => Err(unexpected(other)),
            };
        }
        let expire_at = ttl.map(|t| now_ms().saturating_add(t));
        let v = Value { expire_at, ..Value::string(r.value) };
        let key = r.key;
        self.written(vec![(key, Some(v))]).await?;
        Ok(Response::new(pb::PutResponse {}))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Reply<pb::DeleteResponse> {
        let key = req.into_inner().key;
        if let Some(a) = self.on_leader(&[b"DEL", &key]).await? {
            return match a {
                Answer::Int(n) => Ok(Response::new(pb::DeleteResponse { existed: n > 0 })),
                other => Err(unexpected(other)),
            };
        }
        let n = self
            .synced(move |k| {
                let _g = k.lock(&key);
                k.delete(&[&key[..]])
            })
            .await?;
        Ok(Response::new(pb::DeleteResponse { existed: n > 0 }))
    }

    async fn batch_write(
        &self,
        req: Request<pb::BatchWriteRequest>,
    ) -> Reply<pb::BatchWriteResponse> {
        let req = req.into_inner();
        for m in &req.mutations {
            self.check_size(m.value.as_ref().map_or(0, |v| v.len()))?;
        }
        if let Some(r) = self.engines.keys.replication() {
            if let Some(done) = crate::forwarded::batch_write(r, &req).await {
                done.map_err(key_status)?;
                return Ok(Response::new(pb::BatchWriteResponse {}));
            }
        }
        self.written(crate::forwarded::values_of(req.mutations)).await?;
        Ok(Response::new(pb::BatchWriteResponse {}))
    }

    type ScanStream = Out<pb::KeyValue>;

    async fn scan(&self, req: Request<pb::ScanRequest>) -> Reply<Self::ScanStream> {
        let r = req.into_inner();
        let follower = self.engines.keys.replication().filter(|r| !r.is_leader()).cloned();
        if let Some(rep) = follower.filter(|_| !r.stale) {
            // The leader reads each page (linearizable); they stream from here.
            let limit = if r.limit == 0 { usize::MAX } else { r.limit as usize };
            let (tx, rx) = mpsc::channel(64);
            let mut pages = crate::forwarded::Pages::new(r.prefix, &r.start, r.end, limit);
            tokio::spawn(async move {
                loop {
                    let page = match pages.next(&rep).await {
                        Some(Ok(p)) if p.is_empty() => return,
                        Some(Ok(p)) => p,
                        Some(Err(e)) => {
                            let _ = tx.send(Err(key_status(e))).await;
                            return;
                        }
                        None => {
                            let msg = "this member took the lead during the scan: retry";
                            let _ = tx.send(Err(Status::unavailable(msg))).await;
                            return;
                        }
                    };
                    for (key, value) in page {
                        if tx.send(Ok(pb::KeyValue { key, value })).await.is_err() {
                            return;
                        }
                    }
                }
            });
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        if !r.stale {
            self.engines.keys.linearizable_async().await.map_err(key_status)?;
        }
        let limit = if r.limit == 0 { usize::MAX } else { r.limit as usize };
        let (tx, rx) = mpsc::channel(64);
        let keys = self.engines.keys.clone();
        tokio::task::spawn_blocking(move || {
            let mut start = r.start.to_vec();
            let mut sent = 0usize;
            loop {
                let page = match keys.range(&r.prefix, &start, &r.end, 1024.min(limit - sent)) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(key_status(e)));
                        return;
                    }
                };
                let n = page.len();
                for (key, value) in page {
                    start = key.to_vec();
                    start.push(0);
                    if tx.blocking_send(Ok(pb::KeyValue { key, value })).is_err() {
                        return;
                    }
                }
                sent += n;
                if n < 1024 || sent >= limit {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Reply<pb::TxnResponse> {
        let t = txn_of(req.into_inner()).map_err(Status::invalid_argument)?;
        t.check(self.engines.max_value).map_err(Status::invalid_argument)?;
        let outcome = crate::txn::run(&self.engines, t).await.map_err(key_status)?;
        Ok(Response::new(txn_response(outcome)))
    }
}

/// The status of a failed call of an interactive transaction.
fn txn_status(e: crate::open_txns::Error) -> Status {
    use crate::open_txns::Error as E;
    match e {
        E::Aborted(m) => Status::aborted(m),
        E::Invalid(m) => Status::invalid_argument(m),
        E::Unavailable(m) => Status::unavailable(m),
        E::Internal(m) => Status::internal(m),
    }
}

impl Service {
    /// Runs a call of an interactive transaction.
    async fn txn_call(&self, call: pb::txn_call::Call) -> Result<pb::txn_reply::Reply, Status> {
        crate::open_txns::call(&self.engines, call).await.map_err(txn_status)
    }
}

/// A reply of another kind than the call's (from a leader of another version).
fn mismatched() -> Status {
    Status::internal("a transaction reply of the wrong kind")
}

#[tonic::async_trait]
impl Transactions for Service {
    async fn begin(&self, req: Request<pb::BeginRequest>) -> Reply<pb::BeginResponse> {
        match self.txn_call(pb::txn_call::Call::Begin(req.into_inner())).await? {
            pb::txn_reply::Reply::Begin(r) => Ok(Response::new(r)),
            _ => Err(mismatched()),
        }
    }

    async fn get(&self, req: Request<pb::TxnGetRequest>) -> Reply<pb::GetResponse> {
        match self.txn_call(pb::txn_call::Call::Get(req.into_inner())).await? {
            pb::txn_reply::Reply::Get(r) => Ok(Response::new(r)),
            _ => Err(mismatched()),
        }
    }

    async fn put(&self, req: Request<pb::TxnPutRequest>) -> Reply<pb::PutResponse> {
        let r = req.into_inner();
        self.check_size(r.value.len())?;
        match self.txn_call(pb::txn_call::Call::Put(r)).await? {
            pb::txn_reply::Reply::Put(r) => Ok(Response::new(r)),
            _ => Err(mismatched()),
        }
    }

    async fn delete(&self, req: Request<pb::TxnDeleteRequest>) -> Reply<pb::DeleteResponse> {
        match self.txn_call(pb::txn_call::Call::Delete(req.into_inner())).await? {
            pb::txn_reply::Reply::Delete(r) => Ok(Response::new(r)),
            _ => Err(mismatched()),
        }
    }

    async fn scan(&self, req: Request<pb::TxnScanRequest>) -> Reply<pb::ScanPage> {
        match self.txn_call(pb::txn_call::Call::Scan(req.into_inner())).await? {
            pb::txn_reply::Reply::Scan(r) => Ok(Response::new(r)),
            _ => Err(mismatched()),
        }
    }

    async fn commit(&self, req: Request<pb::TxnRef>) -> Reply<pb::CommitResponse> {
        match self.txn_call(pb::txn_call::Call::Commit(req.into_inner())).await? {
            pb::txn_reply::Reply::Commit(r) => Ok(Response::new(r)),
            _ => Err(mismatched()),
        }
    }

    async fn rollback(&self, req: Request<pb::TxnRef>) -> Reply<pb::RollbackResponse> {
        match self.txn_call(pb::txn_call::Call::Rollback(req.into_inner())).await? {
            pb::txn_reply::Reply::Rollback(r) => Ok(Response::new(r)),
            _ => Err(mismatched()),
        }
    }
}

/// A transaction from its protobuf form; why not, if a part is empty.
pub(crate) fn txn_of(r: pb::TxnRequest) -> Result<Txn, String> {
    use pb::compare::{Op as P, Target as T};
    let compare = r
        .compare
        .into_iter()
        .map(|c| {
            let op = match P::try_from(c.op) {
                Ok(P::Equal) => CmpOp::Equal,
                Ok(P::NotEqual) => CmpOp::NotEqual,
                Ok(P::Less) => CmpOp::Less,
                Ok(P::Greater) => CmpOp::Greater,
                Err(_) => return Err(format!("unknown comparison operator {}", c.op)),
            };
            let target = match c.target {
                Some(T::Value(v)) => Target::Value(v),
                Some(T::Exists(e)) => Target::Exists(e),
                Some(T::Version(v)) => Target::Version(v),
                None => {
                    return Err("a comparison without a target (value, exists or version)".into())
                }
            };
            Ok(Compare { key: c.key, op, target })
        })
        .collect::<Result<_, _>>()?;
    let ops = |ops: Vec<pb::TxnOp>| -> Result<Vec<Op>, String> {
        ops.into_iter()
            .map(|o| match o.op {
                Some(pb::txn_op::Op::Put(p)) => {
                    Ok(Op::Put { key: p.key, value: p.value, ttl_ms: p.ttl_ms })
                }
                Some(pb::txn_op::Op::Delete(d)) => Ok(Op::Delete { key: d.key }),
                Some(pb::txn_op::Op::Get(g)) => Ok(Op::Get { key: g.key }),
                None => Err("an operation without a kind (put, delete or get)".into()),
            })
            .collect()
    };
    Ok(Txn { compare, success: ops(r.success)?, failure: ops(r.failure)? })
}

/// The protobuf form of a transaction (as a member passes it to the leader).
pub(crate) fn txn_request(t: &Txn) -> pb::TxnRequest {
    use pb::compare::{Op as P, Target as T};
    let op = |o: &Op| pb::TxnOp {
        op: Some(match o {
            Op::Put { key, value, ttl_ms } => pb::txn_op::Op::Put(pb::PutRequest {
                key: key.clone(),
                value: value.clone(),
                ttl_ms: *ttl_ms,
            }),
            Op::Delete { key } => pb::txn_op::Op::Delete(pb::DeleteRequest { key: key.clone() }),
            Op::Get { key } => {
                pb::txn_op::Op::Get(pb::GetRequest { key: key.clone(), stale: false })
            }
        }),
    };
    pb::TxnRequest {
        compare: t
            .compare
            .iter()
            .map(|c| pb::Compare {
                key: c.key.clone(),
                op: match c.op {
                    CmpOp::Equal => P::Equal,
                    CmpOp::NotEqual => P::NotEqual,
                    CmpOp::Less => P::Less,
                    CmpOp::Greater => P::Greater,
                } as i32,
                target: Some(match &c.target {
                    Target::Value(v) => T::Value(v.clone()),
                    Target::Exists(e) => T::Exists(*e),
                    Target::Version(v) => T::Version(*v),
                }),
            })
            .collect(),
        success: t.success.iter().map(op).collect(),
        failure: t.failure.iter().map(op).collect(),
    }
}

/// The protobuf form of a transaction's outcome.
pub(crate) fn txn_response(o: Outcome) -> pb::TxnResponse {
    use pb::txn_op_result::Result as R;
    pb::TxnResponse {
        succeeded: o.succeeded,
        results: o
            .results
            .into_iter()
            .map(|r| pb::TxnOpResult {
                result: Some(match r {
                    OpResult::Put => R::Put(pb::PutResponse {}),
                    OpResult::Delete { existed } => R::Delete(pb::DeleteResponse { existed }),
                    OpResult::Get { value, version } => R::Get(pb::GetResponse { value, version }),
                }),
            })
            .collect(),
    }
}

/// A transaction's outcome from its protobuf form (the leader's answer to a member).
pub(crate) fn txn_outcome(r: pb::TxnResponse) -> Outcome {
    use pb::txn_op_result::Result as R;
    Outcome {
        succeeded: r.succeeded,
        results: r
            .results
            .into_iter()
            .map(|r| match r.result {
                Some(R::Put(_)) | None => OpResult::Put,
                Some(R::Delete(d)) => OpResult::Delete { existed: d.existed },
                Some(R::Get(g)) => OpResult::Get { value: g.value, version: g.version },
            })
            .collect(),
    }
}

pub(crate) fn info(s: timber_stream::StreamInfo) -> pb::StreamInfo {
    pb::StreamInfo {
        name: s.name,
        first_id: s.first_id,
        next_id: s.next_id,
        bytes: s.bytes,
        created_ms: s.created_ms,
    }
}

#[tonic::async_trait]
impl Streams for Service {
    async fn create(&self, req: Request<pb::CreateStreamRequest>) -> Reply<pb::StreamInfo> {
        let r = req.into_inner();
        let cfg = StreamConfig {
            retention_age: r.retention_ms.map(std::time::Duration::from_millis),
            retention_bytes: r.retention_bytes,
        };
        let s = self.engines.logs.create(&r.name, cfg).await.map_err(stream_status)?;
        Ok(Response::new(info(s)))
    }

    async fn info(&self, req: Request<pb::StreamRequest>) -> Reply<pb::StreamInfo> {
        let s =
            self.engines.logs.info(&req.into_inner().name, false).await.map_err(stream_status)?;
        Ok(Response::new(info(s)))
    }

    async fn list(&self, _: Request<pb::ListStreamsRequest>) -> Reply<pb::ListStreamsResponse> {
        let all = self.engines.logs.list(false).await.map_err(stream_status)?;
        Ok(Response::new(pb::ListStreamsResponse { streams: all.into_iter().map(info).collect() }))
    }

    type AppendStream = Out<pb::AppendResponse>;

    async fn append(
        &self,
        req: Request<Streaming<pb::AppendRequest>>,
    ) -> Reply<Self::AppendStream> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let (acks_tx, mut acks_rx) = mpsc::channel::<
            futures::future::BoxFuture<'static, Result<pb::AppendResponse, Status>>,
        >(1024);
        // Responses in request order, each once its entries are durable.
        tokio::spawn(async move {
            while let Some(f) = acks_rx.recv().await {
                let r = f.await;
                let failed = r.is_err();
                if tx.send(r).await.is_err() || failed {
                    return;
                }
            }
        });
        let logs = self.engines.logs.clone();
        let max = self.engines.max_value;
        tokio::spawn(async move {
            let mut name = String::new();
            loop {
                let req = match inbound.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = acks_tx.send(futures::future::ready(Err(e)).boxed()).await;
                        return;
                    }
                };
                if !req.stream.is_empty() {
                    name = req.stream;
                }
                let fut = if name.is_empty() {
                    futures::future::ready(Err(Status::invalid_argument(
                        "the first append request must name the stream",
                    )))
                    .boxed()
                } else if let Some(e) = req.entries.iter().find(|e| e.len() > max) {
                    futures::future::ready(Err(Status::invalid_argument(format!(
                        "entry of {} bytes exceeds the limit of {max} bytes",
                        e.len()
                    ))))
                    .boxed()
                } else {
                    let count = req.entries.len() as u32;
                    match logs.send(&name, req.entries).await {
                        Ok(crate::logs::Sent::Acks(acks)) => async move {
                            let mut first = None;
                            for a in acks {
                                let id = a.await.map_err(stream_status)?;
                                first.get_or_insert(id);
                            }
                            Ok(pb::AppendResponse { first_id: first.unwrap_or(0), count })
                        }
                        .boxed(),
                        Ok(crate::logs::Sent::Applied(first)) => {
                            futures::future::ready(Ok(pb::AppendResponse {
                                first_id: first.unwrap_or(0),
                                count,
                            }))
                            .boxed()
                        }
                        Err(e) => futures::future::ready(Err(stream_status(e))).boxed(),
                    }
                };
                if acks_tx.send(fut).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReadStream = Out<pb::Entry>;

    async fn read(&self, req: Request<pb::ReadRequest>) -> Reply<Self::ReadStream> {
        let r = req.into_inner();
        let start = match pb::StartAt::try_from(r.start) {
            Ok(pb::StartAt::Earliest) => Start::Earliest,
            Ok(pb::StartAt::Latest) => Start::Latest,
            Ok(pb::StartAt::Id) => Start::At(r.id),
            Err(_) => return Err(Status::invalid_argument(format!("unknown start {}", r.start))),
        };
        let mut reader =
            self.engines.logs.reader(&r.stream, start, r.stale).await.map_err(stream_status)?;
        let limit = if r.limit == 0 { u64::MAX } else { r.limit };
        let (tx, rx) = mpsc::channel(256);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while sent < limit {
                if !r.follow && !reader.has_next() {
                    return;
                }
                let e = tokio::select! {
                    e = reader.next() => e,
                    () = tx.closed() => return,
                    () = crate::shutdown::stopped(&mut stop) => return,
                };
                let item = e.map(|e| pb::Entry { id: e.id, data: e.data }).map_err(stream_status);
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
                sent += 1;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn truncate(&self, req: Request<pb::TruncateRequest>) -> Reply<pb::StreamInfo> {
        let r = req.into_inner();
        let s = self.engines.logs.truncate(&r.name, r.before).await.map_err(stream_status)?;
        Ok(Response::new(info(s)))
    }

    async fn delete(&self, req: Request<pb::StreamRequest>) -> Reply<pb::DeleteStreamResponse> {
        self.engines.logs.delete(&req.into_inner().name).await.map_err(stream_status)?;
        Ok(Response::new(pb::DeleteStreamResponse {}))
    }
}

/// Adds the entries of stream `info` from its first id to its end to backup `w`, sending the
/// chunks it fills; `false` once the receiver is gone. A stream deleted or truncated since
/// its figures were taken fails the backup (retryable: `ABORTED`).
async fn backup_stream(
    store: &timber_stream::Streams,
    info: &timber_stream::StreamInfo,
    w: &mut crate::backup::Writer,
    tx: &mpsc::Sender<Result<pb::BackupChunk, Status>>,
    chunk: &(impl Fn(Vec<u8>) -> Result<pb::BackupChunk, Status> + Sync),
) -> Result<bool, Status> {
    let changed = |e: timber_stream::Error| {
        Status::aborted(format!("stream {:?} changed during the backup ({e}); retry", info.name))
    };
    let header = crate::backup::StreamHeader {
        name: info.name.clone(),
        config: info.config,
        first: info.first_id,
        entries: info.next_id - info.first_id,
    };
    let mut filled: Vec<Vec<u8>> = w.stream(&header).into_iter().collect();
    let mut r = store.reader(&info.name, Start::At(info.first_id)).map_err(changed)?;
    loop {
        for c in filled.drain(..) {
            if tx.send(chunk(c)).await.is_err() {
                return Ok(false);
            }
        }
        if r.position() >= info.next_id {
            return Ok(true);
        }
        let max = (info.next_id - r.position()).min(1024) as usize;
        let batch = r.next_batch(max).await.map_err(changed)?;
        filled.extend(batch.iter().filter_map(|e| w.entry(&e.data)));
    }
}

#[tonic::async_trait]
impl Admin for Service {
    async fn change_membership(
        &self,
        req: Request<pb::MembershipChange>,
    ) -> Reply<pb::MembershipChangeResponse> {
        use crate::replication::MembershipChange as C;
        use pb::membership_change::Change;
        let Some(r) = self.engines.keys.replication() else {
            return Err(Status::failed_precondition(
                "this server is a single node, not a cluster member",
            ));
        };
        let change = match req.into_inner().change {
            Some(Change::AddLearner(a)) if a.id > 0 && !a.raft_addr.is_empty() => {
                C::AddLearner { id: a.id, raft_addr: a.raft_addr }
            }
            Some(Change::Promote(id)) if id > 0 => C::Promote(id),
            Some(Change::Remove(id)) if id > 0 => C::Remove(id),
            Some(Change::TransferLeader(id)) if id > 0 => C::TransferLeader(id),
            _ => {
                return Err(Status::invalid_argument(
                    "a change names a member id (1 or more) and, to add one, its raft address",
                ))
            }
        };
        r.change_membership(change).await.map_err(key_status)?;
        Ok(Response::new(pb::MembershipChangeResponse {}))
    }

    type BackupStream = Out<pb::BackupChunk>;

    async fn backup(&self, _: Request<pb::BackupRequest>) -> Reply<Self::BackupStream> {
        let e = &self.engines;
        let db = e.keys.db().clone();
        let store = e.redis_streams.store().clone();
        // The backup's point: writes after it are not in it.
        let (snap, streams) = match e.keys.replication() {
            None => {
                let snap = db.snapshot();
                (snap, store.list().map_err(stream_status)?)
            }
            Some(r) => r.view().await.map_err(key_status)?,
        };
        let position = match e.keys.replication() {
            None => format!("seq:{}", snap.seq()),
            Some(_) => match timber_cluster::applied_in(&snap) {
                Ok(Some(id)) => {
                    format!("raft:{}-{}-{}", id.leader_id.term, id.leader_id.node_id, id.index)
                }
                Ok(None) => "raft:none".into(),
                Err(err) => return Err(Status::internal(err.to_string())),
            },
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let first = std::sync::Arc::new(parking_lot::Mutex::new(Some(position.clone())));
            let chunk = {
                let first = first.clone();
                move |data: Vec<u8>| {
                    Ok(pb::BackupChunk {
                        data: data.into(),
                        position: first.lock().take().unwrap_or_default(),
                    })
                }
            };
            // The engine's pairs, but the cluster's own keys (`\0raft/`) and its members' RESP
            // addresses: a restore starts a new single node or cluster.
            let pairs = {
                let (tx, chunk) = (tx.clone(), chunk.clone());
                tokio::task::spawn_blocking(move || {
                    let mut w = crate::backup::Writer::new(&position);
                    for r in snap.iter() {
                        let (k, v) = r.map_err(|err| Status::internal(err.to_string()))?;
                        if k.starts_with(timber_cluster::RESERVED_PREFIX)
                            || k.starts_with(crate::replication::RESP_ADDR_PREFIX)
                        {
                            continue;
                        }
                        if let Some(c) = w.pair(&k, &v) {
                            if tx.blocking_send(chunk(c)).is_err() {
                                return Ok(None);
                            }
                        }
                    }
                    Ok(Some(w))
                })
            };
            let mut w = match pairs.await {
                Ok(Ok(Some(w))) => w,
                Ok(Ok(None)) => return,
                Ok(Err(status)) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                Err(err) => {
                    let _ = tx.send(Err(Status::internal(err.to_string()))).await;
                    return;
                }
            };
            for info in streams {
                match backup_stream(&store, &info, &mut w, &tx, &chunk).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
            let _ = tx.send(chunk(w.finish())).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Reply<pb::StatusResponse> {
        let e = &self.engines;
        let store = e.redis_streams.store().store_status();
        Ok(Response::new(pb::StatusResponse {
            stream_store: e.stream_store.to_string(),
            store_unavailable_ms: store.unavailable_for.map_or(0, |d| d.as_millis() as u64),
            store_last_error: store.last_error.unwrap_or_default(),
            journal_backlog_bytes: store.journal_backlog_bytes,
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: e.started.elapsed().as_millis() as u64,
            keys: e.keys.len().map_err(key_status)?,
            streams: e.logs.list(true).await.map_err(stream_status)?.len() as u64,
            data_dir: e.data_dir.display().to_string(),
            sync: e.sync.to_string(),
            cluster: e.keys.replication().map(|r| {
                let st = r.status();
                let idx = |i: Option<u64>| i.map_or(-1, |i| i as i64);
                pb::ClusterStatus {
                    node_id: st.id,
                    role: st.role.into(),
                    term: st.term,
                    leader_id: st.leader_id.unwrap_or(0),
                    last_log_index: idx(st.last_log_index),
                    applied_index: idx(st.applied_index),
                    commit_index: idx(st.committed_index),
                    members: st
                        .members
                        .iter()
                        .map(|(id, addr)| {
                            let lag = match st.lag.iter().find(|(m, _)| m == id) {
                                Some((_, n)) => Some(*n),
                                None if st.leader && *id == st.id => Some(0),
                                None => None,
                            };
                            let last = st.last_log_index.unwrap_or(0);
                            pb::ClusterMember {
                                id: *id,
                                raft_addr: addr.clone(),
                                lag: lag.map_or(-1, |n| n as i64),
                                learner: st.learners.contains(id),
                                matched_index: lag.map_or(-1, |n| last.saturating_sub(n) as i64),
                            }
                        })
                        .collect(),
                }
            }),
        }))
    }
}

/// Serves the gRPC services on `listener` until `stop` fires.
pub(crate) async fn serve(
    engines: Arc<Engines>,
    listener: tokio::net::TcpListener,
    stop: watch::Receiver<bool>,
) {
    let svc = Service { engines: engines.clone(), stop: stop.clone() };
    let secret = engines.secret.clone().map(|s| format!("Bearer {s}"));
    let auth = move |req: Request<()>| -> Result<Request<()>, Status> {
        match &secret {
            None => Ok(req),
            Some(want) => match req.metadata().get("authorization") {
                Some(got) if got.as_bytes() == want.as_bytes() => Ok(req),
                _ => Err(Status::unauthenticated("missing or wrong bearer token")),
            },
        }
    };
    let max = engines.max_value.saturating_add(64 << 10);
    let kv =
        KvServer::new(svc.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
    let streams = StreamsServer::new(svc.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let txns = TransactionsServer::new(svc.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let admin = AdminServer::new(svc);
    let mut stopping = stop.clone();
    let incoming =
        crate::limit::Limited::new(listener, engines.connections.clone(), b"", engines.idle)
            .into_stream();
    let r = tonic::transport::Server::builder()
        // Peers that stop answering pings are dropped.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .layer(tower::layer::layer_fn(|inner| Measured { inner }))
        .add_service(tonic::service::interceptor::InterceptedService::new(kv, auth.clone()))
        .add_service(tonic::service::interceptor::InterceptedService::new(streams, auth.clone()))
        .add_service(tonic::service::interceptor::InterceptedService::new(txns, auth.clone()))
        .add_service(tonic::service::interceptor::InterceptedService::new(admin, auth))
        .serve_with_incoming_shutdown(incoming, async move {
            crate::shutdown::stopped(&mut stopping).await;
        })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "gRPC endpoint failed");
    }
}

/// Counts gRPC calls and records their latency (to the response headers) per method.
#[derive(Debug, Clone)]
struct Measured<S> {
    inner: S,
}

impl<S, B> tower::Service<axum::http::Request<B>> for Measured<S>
where
    S: tower::Service<axum::http::Request<B>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let start = std::time::Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            metrics::counter!("timber_grpc_requests_total", "method" => method.clone())
                .increment(1);
            metrics::histogram!("timber_grpc_request_seconds", "method" => method)
                .record(start.elapsed().as_secs_f64());
            r
        })
    }
}
