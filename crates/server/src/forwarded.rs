//! Calls of a follower's gRPC and HTTP endpoints that the leader runs for it beyond single-key
//! Redis commands (those go as GET, SET and DEL, `Replication::on_leader`): a page of a
//! linearizable scan and a batch write. They travel through the cluster's forward service
//! under their own protocol number, as the operation's name and its request in protobuf; the
//! reply is `+` and the protobuf response, or `-` and an error line (`READONLY` or
//! `CLUSTERDOWN` when retryable).

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use timber_proto::v1 as pb;

use crate::keyspace::Error;
use crate::replication::Replication;
use crate::Engines;

/// The forward service's protocol number of these calls (Redis-protocol commands use 2 and 3).
pub(crate) const PROTOCOL: u8 = 0;

const SCAN: &[u8] = b"scan";
const BATCH_WRITE: &[u8] = b"batch-write";
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
            Resp::decode(body).map_err(|e| Error::Leader(format!("undecodable reply: {e}")))
        }
        Some((b'-', line)) => {
            let line = String::from_utf8_lossy(line).into_owned();
            match line.starts_with("READONLY") || line.starts_with("CLUSTERDOWN") {
                true => Err(Error::ClusterDown(line)),
                false => Err(Error::Leader(line)),
            }
        }
        _ => Err(Error::Leader("empty reply".into())),
    })
}

/// On the leader: runs a call a member passed here and encodes its reply.
pub(crate) async fn run(engines: Arc<Engines>, args: Vec<Bytes>) -> Vec<u8> {
    let result = match (args.first().map(|a| &a[..]), args.get(1)) {
        (Some(SCAN), Some(body)) => run_scan(&engines, body).await,
        (Some(BATCH_WRITE), Some(body)) => run_batch(&engines, body).await,
        _ => Err(Error::Leader("unknown forwarded call".into())),
    };
    match result {
        Ok(body) => {
            let mut out = Vec::with_capacity(body.len() + 1);
            out.push(b'+');
            out.extend_from_slice(&body);
            out
        }
        Err(e) => format!("-{e}").into_bytes(),
    }
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

async fn run_batch(engines: &Arc<Engines>, body: &Bytes) -> Result<Vec<u8>, Error> {
    let r = pb::BatchWriteRequest::decode(&body[..]).map_err(|e| Error::Leader(e.to_string()))?;
    let written = engines
        .keys
        .write_durably(move |k| {
            let items: Vec<_> = r.mutations.iter().map(|m| (&m.key[..], m.value.clone())).collect();
            k.write_mixed(&items)
        })
        .await
        .unwrap_or_else(|| Err(Error::Leader("write task failed".into())));
    written.map(|()| pb::BatchWriteResponse {}.encode_to_vec())
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
