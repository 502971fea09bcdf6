//! Calls of a follower's gRPC and HTTP endpoints that the leader runs for it beyond single-key
//! Redis commands (those go as SET and DEL, `Replication::on_leader`): a key's value and
//! version, a page of a linearizable scan, a batch write, a conditional transaction, the calls
//! of interactive transactions, the writes of log streams, and the leader's read index.
//! They travel through the cluster's forward service under their own protocol number, as the
//! operation's name and its request in protobuf; the reply is `+` and the protobuf response,
//! or `-` and an error line (for keys, retryable when it starts with `READONLY` or
//! `CLUSTERDOWN`; for log streams, a [`crate::logs::Code`] word first).

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use timber_proto::v1 as pb;

use timber_stream::{StreamConfig, StreamInfo};

use crate::keyspace::Error;
use crate::logs::Error as LogError;
use crate::replication::Replication;
use crate::Engines;

/// The forward service's protocol number of these calls (Redis-protocol commands use 2 and 3).
pub(crate) const PROTOCOL: u8 = 0;

const GET: &[u8] = b"get";
const SCAN: &[u8] = b"scan";
const BATCH_WRITE: &[u8] = b"batch-write";
const READ_INDEX: &[u8] = b"read-index";
const TXN: &[u8] = b"txn";
const TXN_CALL: &[u8] = b"txn-call";
/// How the leader's error line of a conflict begins (`keyspace::Error::Kv` of
/// `timber_kv::Error::Conflict`); the rest is what changed.
const CONFLICT: &str = "storage: transaction conflict: ";
const LOG_CREATE: &[u8] = b"log-create";
const LOG_APPEND: &[u8] = b"log-append";
const LOG_TRUNCATE: &[u8] = b"log-truncate";
const LOG_DELETE: &[u8] = b"log-delete";
/// Pairs per forwarded scan page.
const PAGE: usize = 1024;

/// On a member that does not lead: one page (up to `limit` pairs) of the linearizable scan of
/// `[start, end)` under `prefix`, read by the leader. `None` on the leader.
async fn scan_page(
    r: &Replication,
    prefix: &Bytes,
    start: &[u8],
    end: &Bytes,
    limit: usize,
) -> Option<Result<Vec<(Bytes, Bytes)>, Error>> {
    let req = pb::ScanRequest {
        prefix: prefix.clone(),
        start: Bytes::copy_from_slice(start),
        end: end.clone(),
        limit: limit as u64,
        stale: false,
    };
    let page: pb::ScanPage = match call(r, SCAN, &req).await? {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    Some(Ok(page.items.into_iter().map(|kv| (kv.key, kv.value)).collect()))
}

/// A key's value and version (`GetResponse`), linearizable: in a cluster the leader reads it
/// (a member that does not lead passes the read there), with its clock deciding expiry.
/// [`Error::WrongType`] for a key holding a Redis stream.
pub(crate) async fn get(engines: &Arc<Engines>, key: Bytes) -> Result<pb::GetResponse, Error> {
    if let Some(r) = engines.keys.replication() {
        let req = pb::GetRequest { key: key.clone(), stale: false };
        match call(r, GET, &req).await {
            None => {}
            Some(Err(Error::Leader(line))) if line.starts_with("WRONGTYPE") => {
                return Err(Error::WrongType)
            }
            Some(done) => return done,
        }
    }
    engines.keys.linearizable_async().await?;
    get_here(&engines.keys, &key)
}

/// A key's value and version as this member has it; [`Error::WrongType`] for a key holding a
/// Redis stream.
pub(crate) fn get_here(
    keys: &crate::keyspace::Keyspace,
    key: &[u8],
) -> Result<pb::GetResponse, Error> {
    Ok(match keys.get_string(key)? {
        Some(v) => pb::GetResponse { value: Some(v.data), version: v.revision },
        None => pb::GetResponse { value: None, version: 0 },
    })
}

/// On a member that does not lead: `req` applied by the leader. `None` on the leader.
pub(crate) async fn batch_write(
    r: &Replication,
    req: &pb::BatchWriteRequest,
) -> Option<Result<(), Error>> {
    Some(call::<_, pb::BatchWriteResponse>(r, BATCH_WRITE, req).await?.map(|_| ()))
}

async fn call<Req: Message, Resp: Message + Default>(
    r: &Replication,
    op: &'static [u8],
    req: &Req,
) -> Option<Result<Resp, Error>> {
    Some(match exchange(r, op, req).await? {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(line)) if line.starts_with("READONLY") || line.starts_with("CLUSTERDOWN") => {
            Err(Error::ClusterDown(line))
        }
        // A guarded write the members refused (`Keyspace::commit_guarded`): retryable.
        Ok(Err(line)) if line.starts_with(CONFLICT) => Err(Error::Kv(timber_kv::Error::Conflict {
            what: line.strip_prefix(CONFLICT).unwrap_or_default().to_string(),
        })),
        Ok(Err(line)) => Err(Error::Leader(line)),
        Err(e) => Err(e),
    })
}

/// A call of a log stream's write: the leader's error line says what its client is told.
async fn log_call<Req: Message, Resp: Message + Default>(
    r: &Replication,
    op: &'static [u8],
    req: &Req,
) -> Option<Result<Resp, LogError>> {
    Some(match exchange(r, op, req).await? {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(line)) => Err(LogError::of_line(&line)),
        Err(e) => Err(e.into()),
    })
}

/// Passes `req` to the leader: its response, or its error line (inner `Err`), or why the
/// call did not reach it (outer `Err`). `None` on the leader.
async fn exchange<Req: Message, Resp: Message + Default>(
    r: &Replication,
    op: &'static [u8],
    req: &Req,
) -> Option<Result<Result<Resp, String>, Error>> {
    if r.is_leader() {
        return None;
    }
    let args = vec![Bytes::from_static(op), Bytes::from(req.encode_to_vec())];
    let reply = match r.forward(PROTOCOL, args).await {
        Ok(reply) => reply,
        Err(e) => return Some(Err(e)),
    };
    Some(match reply.split_first() {
        Some((b'+', body)) => {
            Resp::decode(body).map(Ok).map_err(|e| Error::Leader(format!("undecodable reply: {e}")))
        }
        Some((b'-', line)) => Ok(Err(String::from_utf8_lossy(line).into_owned())),
        _ => Err(Error::Leader("empty reply".into())),
    })
}

/// On a member that does not lead: the conditional transaction `t` run by the leader. `None`
/// on the leader.
pub(crate) async fn txn(
    r: &Replication,
    t: &crate::txn::Txn,
) -> Option<Result<crate::txn::Outcome, Error>> {
    let req = crate::grpc::txn_request(t);
    Some(call::<_, pb::TxnResponse>(r, TXN, &req).await?.map(crate::grpc::txn_outcome))
}

/// On a member that does not lead: a call of an interactive transaction run by the leader (the
/// leader's error line keeps its code). `None` on the leader.
pub(crate) async fn txn_call(
    r: &Replication,
    call: pb::txn_call::Call,
) -> Option<Result<pb::txn_reply::Reply, crate::open_txns::Error>> {
    use crate::open_txns::Error as E;
    let req = pb::TxnCall { call: Some(call) };
    Some(match exchange::<_, pb::TxnReply>(r, TXN_CALL, &req).await? {
        Ok(Ok(pb::TxnReply { reply: Some(reply) })) => Ok(reply),
        Ok(Ok(_)) => Err(E::Internal("an empty reply from the leader".into())),
        Ok(Err(line)) => Err(E::of_line(&line)),
        Err(e) => Err(e.into()),
    })
}

/// Returns once a read of this member's engines is linearizable: on the leader, once it
/// confirmed its leadership and applied what was committed; on another member, once it
/// applied as far as the leader had then (the leader's read index).
pub(crate) async fn caught_up(r: &Replication) -> Result<(), Error> {
    match call::<_, u64>(r, READ_INDEX, &()).await {
        None => r.read_barrier_async().await,
        Some(index) => r.applied_up_to(index?).await,
    }
}

/// On a member that does not lead: the stream `name` created by the leader.
pub(crate) async fn log_create(
    r: &Replication,
    name: &str,
    config: StreamConfig,
) -> Option<Result<StreamInfo, LogError>> {
    let req = pb::CreateStreamRequest {
        name: name.to_string(),
        retention_ms: config.retention_age.map(|d| d.as_millis() as u64),
        retention_bytes: config.retention_bytes,
    };
    Some(log_call(r, LOG_CREATE, &req).await?.map(stream_info))
}

/// On a member that does not lead: `entries` appended by the leader; the first one's id.
pub(crate) async fn log_append(
    r: &Replication,
    name: &str,
    entries: &[Bytes],
) -> Option<Result<Option<u64>, LogError>> {
    let req = pb::AppendRequest { stream: name.to_string(), entries: entries.to_vec() };
    let resp: Result<pb::AppendResponse, _> = log_call(r, LOG_APPEND, &req).await?;
    Some(resp.map(|a| (a.count > 0).then_some(a.first_id)))
}

/// On a member that does not lead: the stream `name` truncated below `before` by the leader.
pub(crate) async fn log_truncate(
    r: &Replication,
    name: &str,
    before: u64,
) -> Option<Result<StreamInfo, LogError>> {
    let req = pb::TruncateRequest { name: name.to_string(), before };
    Some(log_call(r, LOG_TRUNCATE, &req).await?.map(stream_info))
}

/// On a member that does not lead: the stream `name` deleted by the leader.
pub(crate) async fn log_delete(r: &Replication, name: &str) -> Option<Result<(), LogError>> {
    let req = pb::StreamRequest { name: name.to_string() };
    let resp: Result<pb::DeleteStreamResponse, _> = log_call(r, LOG_DELETE, &req).await?;
    Some(resp.map(|_| ()))
}

/// A stream's figures as the leader sent them (the writer epoch and retention stay the
/// leader's: they are not sent).
fn stream_info(s: pb::StreamInfo) -> StreamInfo {
    StreamInfo {
        name: s.name,
        first_id: s.first_id,
        next_id: s.next_id,
        bytes: s.bytes,
        epoch: 0,
        created_ms: s.created_ms,
        config: StreamConfig::default(),
    }
}

/// On the leader: runs a call a member passed here and encodes its reply.
pub(crate) async fn run(engines: Arc<Engines>, args: Vec<Bytes>) -> Vec<u8> {
    let (op, body) = match (args.first(), args.get(1)) {
        (Some(op), Some(body)) => (&op[..], body),
        _ => return b"-unknown forwarded call".to_vec(),
    };
    let result = match op {
        GET => run_get(&engines, body).await.map_err(|e| e.to_string()),
        SCAN => run_scan(&engines, body).await.map_err(|e| e.to_string()),
        BATCH_WRITE => run_batch(&engines, body).await.map_err(|e| e.to_string()),
        READ_INDEX => run_read_index(&engines).await.map_err(|e| e.to_string()),
        TXN => run_txn(&engines, body).await.map_err(|e| e.to_string()),
        TXN_CALL => run_txn_call(&engines, body).await.map_err(|e| e.to_string()),
        LOG_CREATE | LOG_APPEND | LOG_TRUNCATE | LOG_DELETE => {
            run_log(&engines, op, body).await.map_err(|e| e.to_line())
        }
        _ => Err("unknown forwarded call".to_string()),
    };
    match result {
        Ok(body) => {
            let mut out = Vec::with_capacity(body.len() + 1);
            out.push(b'+');
            out.extend_from_slice(&body);
            out
        }
        Err(line) => format!("-{line}").into_bytes(),
    }
}

fn leading(engines: &Engines) -> Result<&Arc<Replication>, Error> {
    engines.keys.replication().ok_or_else(|| Error::Leader("not a cluster member".into()))
}

async fn run_read_index(engines: &Arc<Engines>) -> Result<Vec<u8>, Error> {
    let r = leading(engines)?;
    r.read_barrier_async().await?;
    Ok(r.applied_index().encode_to_vec())
}

async fn run_log(engines: &Arc<Engines>, op: &[u8], body: &Bytes) -> Result<Vec<u8>, LogError> {
    let r = leading(engines)?;
    let bad = |e: prost::DecodeError| {
        LogError::Stream(timber_stream::Error::InvalidParam(format!("undecodable request: {e}")))
    };
    let logs = &engines.logs;
    Ok(match op {
        LOG_CREATE => {
            let q = pb::CreateStreamRequest::decode(&body[..]).map_err(bad)?;
            let config = StreamConfig {
                retention_age: q.retention_ms.map(std::time::Duration::from_millis),
                retention_bytes: q.retention_bytes,
            };
            crate::grpc::info(logs.lead_create(r, &q.name, config).await?).encode_to_vec()
        }
        LOG_APPEND => {
            let q = pb::AppendRequest::decode(&body[..]).map_err(bad)?;
            let count = q.entries.len() as u32;
            let first = logs.lead_append(r, &q.stream, q.entries).await?;
            pb::AppendResponse { first_id: first.unwrap_or(0), count }.encode_to_vec()
        }
        LOG_TRUNCATE => {
            let q = pb::TruncateRequest::decode(&body[..]).map_err(bad)?;
            crate::grpc::info(logs.lead_truncate(r, &q.name, q.before).await?).encode_to_vec()
        }
        _ => {
            let q = pb::StreamRequest::decode(&body[..]).map_err(bad)?;
            logs.lead_delete(r, &q.name).await?;
            pb::DeleteStreamResponse {}.encode_to_vec()
        }
    })
}

async fn run_get(engines: &Arc<Engines>, body: &Bytes) -> Result<Vec<u8>, Error> {
    let r = pb::GetRequest::decode(&body[..]).map_err(|e| Error::Leader(e.to_string()))?;
    engines.keys.linearizable_async().await?;
    Ok(get_here(&engines.keys, &r.key)?.encode_to_vec())
}

async fn run_scan(engines: &Arc<Engines>, body: &Bytes) -> Result<Vec<u8>, Error> {
    let r = pb::ScanRequest::decode(&body[..]).map_err(|e| Error::Leader(e.to_string()))?;
    engines.keys.linearizable_async().await?;
    let limit = (r.limit as usize).clamp(1, PAGE);
    let keys = engines.keys.clone();
    let items = tokio::task::spawn_blocking(move || keys.range(&r.prefix, &r.start, &r.end, limit))
        .await
        .map_err(|e| Error::Leader(format!("scan task failed: {e}")))??;
    let items = items.into_iter().map(|(key, value)| pb::KeyValue { key, value }).collect();
    Ok(pb::ScanPage { items }.encode_to_vec())
}

async fn run_txn(engines: &Arc<Engines>, body: &Bytes) -> Result<Vec<u8>, Error> {
    let bad = |e: String| Error::Leader(format!("bad transaction: {e}"));
    let r = pb::TxnRequest::decode(&body[..]).map_err(|e| bad(e.to_string()))?;
    let t = crate::grpc::txn_of(r).map_err(bad)?;
    t.check(engines.max_value).map_err(bad)?;
    let outcome = crate::txn::run_here(engines, t).await?;
    Ok(crate::grpc::txn_response(outcome).encode_to_vec())
}

async fn run_txn_call(
    engines: &Arc<Engines>,
    body: &Bytes,
) -> Result<Vec<u8>, crate::open_txns::Error> {
    use crate::open_txns::Error as E;
    let r = pb::TxnCall::decode(&body[..]).map_err(|e| E::Invalid(e.to_string()))?;
    let call = r.call.ok_or_else(|| E::Invalid("an empty transaction call".into()))?;
    let reply = crate::open_txns::call_here(engines, call).await?;
    Ok(pb::TxnReply { reply: Some(reply) }.encode_to_vec())
}

async fn run_batch(engines: &Arc<Engines>, body: &Bytes) -> Result<Vec<u8>, Error> {
    let r = pb::BatchWriteRequest::decode(&body[..]).map_err(|e| Error::Leader(e.to_string()))?;
    let written = engines
        .keys
        .write_values(values_of(r.mutations))
        .await
        .unwrap_or_else(|| Err(Error::Leader("write task failed".into())));
    written.map(|()| pb::BatchWriteResponse {}.encode_to_vec())
}

/// A batch write's mutations as keyspace writes: strings to store, or keys to delete.
pub(crate) fn values_of(
    mutations: Vec<pb::Mutation>,
) -> Vec<(Bytes, Option<crate::keyspace::Value>)> {
    mutations.into_iter().map(|m| (m.key, m.value.map(crate::keyspace::Value::string))).collect()
}

/// A linearizable scan a member that does not lead reads from the leader, a page at a time.
pub(crate) struct Pages {
    prefix: Bytes,
    end: Bytes,
    /// Where the next page starts (just after the last key returned).
    from: Vec<u8>,
    /// Pairs still wanted (0: done).
    left: usize,
}

impl Pages {
    /// Up to `limit` pairs of `[start, end)` under `prefix`.
    pub(crate) fn new(prefix: Bytes, start: &[u8], end: Bytes, limit: usize) -> Pages {
        Pages { prefix, end, from: start.to_vec(), left: limit }
    }

    /// The next page, empty once the scan is over. `None` once this member leads.
    pub(crate) async fn next(
        &mut self,
        r: &Replication,
    ) -> Option<Result<Vec<(Bytes, Bytes)>, Error>> {
        if self.left == 0 {
            return Some(Ok(Vec::new()));
        }
        let want = PAGE.min(self.left);
        let page = scan_page(r, &self.prefix, &self.from, &self.end, want).await?;
        if let Ok(p) = &page {
            // A short page is the end of the range.
            self.left = if p.len() < want { 0 } else { self.left - p.len() };
            if let Some((last, _)) = p.last() {
                self.from = last.to_vec();
                self.from.push(0);
            }
        }
        Some(page)
    }
}

/// Every page of a scan ([`Pages`]), gathered.
pub(crate) async fn scan(
    r: &Replication,
    prefix: &Bytes,
    start: &[u8],
    end: &Bytes,
    limit: usize,
) -> Option<Result<Vec<(Bytes, Bytes)>, Error>> {
    let mut pages = Pages::new(prefix.clone(), start, end.clone(), limit);
    let mut out = Vec::new();
    loop {
        match pages.next(r).await? {
            Ok(p) if p.is_empty() => return Some(Ok(out)),
            Ok(p) => out.extend(p),
            Err(e) => return Some(Err(e)),
        }
    }
}
