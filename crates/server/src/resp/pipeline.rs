//! How a connection runs one batch of pipelined requests (every complete request in its input
//! buffer), and when it sends their replies.
//!
//! - Requests are resolved against the command table once each, then run in order.
//! - A run of keyspace commands (up to the next stream command) executes in place; consecutive
//!   SET/INCR-family commands go to the engine as one write batch and consecutive GETs as one
//!   read (`cmd::batch`), with the replies the commands would give one by one (the property
//!   test below checks this). Under `--sync always`, one sync covers every write of the run
//!   (and the runs of every other connection waiting at that moment), before any of its
//!   replies.
//! - Stream appends (XADD) reply with futures: consecutive appends are all sent before the
//!   first is awaited, so a pipeline of them shares one flush of the stream; any other command
//!   first waits for the appends before it, so that it sees their entries. A connection with
//!   [`PIPELINED_APPENDS`] appends in flight tells the idle machinery ([`Activity`]), which then
//!   syncs the journal off the worker while the worker runs the next requests.
//! - Replies are held ([`hold_replies`]) on a busy worker.
//!
//! Invariant: replies are encoded in request order, one per request (a failed sync replaces
//! the replies of its run with errors, since none of its writes can be acknowledged).
//!
//! [`Activity`]: crate::idle::Activity

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::args::Args;
use super::cmd::batch::{execute_gets, execute_run, get_of, RunOp};
use super::cmd::streams::{self, Outcome, StreamContext};
use super::reply::Reply;
use super::session::{Context, Session};
use super::table::{self, Command, Handler, APPEND, READONLY, WRITE};
use super::Endpoint;
use crate::keyspace::Value;
use crate::view::KeyView;

/// Appends in flight on one connection from which its appends count as pipelined.
const PIPELINED_APPENDS: usize = 3;

/// Whether a connection about to run a batch should hold its replies until the other ready
/// connections have run, as Redis writes replies at the end of an event-loop turn: then the
/// replies of one turn of the worker leave back to back, and a client that waits for several
/// of its connections is woken once for them, not once each. Only on a busy worker (on an idle
/// one the wait would only add latency), and not under `--sync always`, where replies already
/// leave together after their sync round. Tells the idle machinery of the batch either way.
pub(crate) fn hold_replies(ep: &Endpoint) -> bool {
    let busy = ep.activity.batch();
    busy && !ep.keys.synced()
}

/// One request and the command it names, if it resolved (kept small: a batch's items live
/// on the stack; the error reply of one that did not resolve is made again when it is due).
struct Item<'a> {
    request: &'a [Bytes],
    command: Option<(usize, &'static Command)>,
}

impl<'a> Item<'a> {
    fn new(request: &'a [Bytes]) -> Item<'a> {
        Item { request, command: table::resolve(request).ok() }
    }

    fn is_stream(&self) -> bool {
        self.command.is_some_and(|(_, c)| c.is_stream())
    }

    fn is_txn(&self) -> bool {
        self.command.is_some_and(|(_, c)| c.is_txn())
    }

    fn is_write(&self) -> bool {
        self.command.is_some_and(|(_, c)| c.is(WRITE))
    }

    /// The command, if the session may run it; the error reply otherwise.
    fn authorized(&self, s: &Session) -> Result<(usize, &'static Command), Reply> {
        let (index, c) = match self.command {
            Some(found) => found,
            None => table::resolve(self.request)?,
        };
        table::authorize(s, c)?;
        Ok((index, c))
    }

    fn name(&self) -> Option<&'static str> {
        self.command.map(|(_, c)| c.name)
    }

    fn op(&self, max: usize) -> Option<RunOp<'a>> {
        RunOp::of(self.name()?, self.request, max)
    }

    fn get(&self) -> Option<&'a [u8]> {
        get_of(self.name()?, self.request)
    }
}

/// Runs a batch of pipelined requests in order and encodes their replies into `out`.
pub(crate) async fn run(
    ep: &Arc<Endpoint>,
    s: &mut Session,
    requests: &[Vec<Bytes>],
    out: &mut BytesMut,
    stop: &watch::Receiver<bool>,
) {
    // On the stack for small batches: one request at a time allocates nothing here.
    let items: smallvec::SmallVec<[Item<'_>; 8]> = requests.iter().map(|r| Item::new(r)).collect();
    let mut later: Vec<BoxFuture<'static, Reply>> = Vec::new();
    let mut rest = &items[..];
    while let Some((first, tail)) = rest.split_first() {
        if s.quit {
            break;
        }
        if s.multi.is_some() || first.is_txn() {
            // Queued, or a transaction command: one at a time.
            settle(&mut later, s.proto, out).await;
            super::multi::step(ep, s, first.request, out, stop).await;
            rest = tail;
            continue;
        }
        if first.is_stream() {
            run_stream(ep, s, first, &mut later, out, stop).await;
            rest = tail;
            continue;
        }
        settle(&mut later, s.proto, out).await;
        let n = 1 + tail.iter().position(|it| it.is_stream() || it.is_txn()).unwrap_or(tail.len());
        let (keys, after) = rest.split_at(n);
        run_keys(ep, s, keys, out).await;
        rest = after;
    }
    settle(&mut later, s.proto, out).await;
}

/// Runs one stream command; an append's reply joins `later`.
async fn run_stream(
    ep: &Arc<Endpoint>,
    s: &mut Session,
    item: &Item<'_>,
    later: &mut Vec<BoxFuture<'static, Reply>>,
    out: &mut BytesMut,
    stop: &watch::Receiver<bool>,
) {
    let (index, command) = match item.authorized(s) {
        Ok(c) => c,
        Err(e) => {
            settle(later, s.proto, out).await;
            e.encode(s.proto, out);
            return;
        }
    };
    let Handler::Streams(handler) = command.handler else { return };
    if let Some(r) = ep.keys.replication() {
        // As for keys: a member that does not lead passes writes and linearizable reads to the
        // leader (a blocking read waits there); the leader evaluates writes once it applied
        // what earlier leaders committed, and reads after a read barrier.
        let leader_only = command.is(WRITE) || (command.is(READONLY) && !s.stale_reads);
        let barrier = if s.forwarded || r.is_leader() {
            match (command.is(WRITE), leader_only) {
                (true, _) => Some(r.fresh().await),
                (false, true) => Some(r.read_barrier_async().await),
                _ => None,
            }
        } else if leader_only {
            settle(later, s.proto, out).await;
            let block = streams::block_of(item.request);
            match r.forward_blocking(s.proto, item.request.to_vec(), block).await {
                Ok(reply) => out.extend_from_slice(&reply),
                Err(e) => Reply::Error(e.to_string()).encode(s.proto, out),
            }
            return;
        } else {
            None
        };
        if let Some(Err(e)) = barrier {
            settle(later, s.proto, out).await;
            Reply::Error(e.to_string()).encode(s.proto, out);
            return;
        }
    }
    if !command.is(APPEND) {
        settle(later, s.proto, out).await;
    }
    let mut cx = StreamContext {
        space: &ep.streams,
        proto: s.proto,
        max_value: ep.max_request,
        stop: stop.clone(),
        blocking: true,
    };
    // A stream write changes its key for WATCH: recorded before and after (it holds no
    // stripe lock, see `crate::versions`).
    let touched = super::multi::stream_keys(command, item.request);
    ep.keys.touch(&touched);
    let t = ep.sample(s);
    let outcome = streams::run(handler, &mut cx, Args::new(command.name, item.request)).await;
    ep.record(index, t);
    ep.keys.touch(&touched);
    match outcome {
        Outcome::Later(f) => {
            // An append's trim (MAXLEN, MINID) runs in its future: recorded again after it.
            let f = match touched.is_empty() {
                true => f,
                false => {
                    let keys = ep.keys.clone();
                    let touched: Vec<Bytes> =
                        touched.iter().map(|k| Bytes::copy_from_slice(k)).collect();
                    Box::pin(async move {
                        let reply = f.await;
                        keys.touch(&touched);
                        reply
                    })
                }
            };
            later.push(f);
            if later.len() == PIPELINED_APPENDS {
                ep.activity.appends_pipelined();
            }
        }
        Outcome::Now(r) => {
            settle(later, s.proto, out).await;
            r.encode(s.proto, out);
        }
    }
}

/// Runs a run of keyspace (and connection) commands; under `--sync always`, one sync covers
/// its writes before any of its replies.
async fn run_keys(ep: &Arc<Endpoint>, s: &mut Session, run: &[Item<'_>], out: &mut BytesMut) {
    let writes = if ep.keys.synced() { run.iter().filter(|it| it.is_write()).count() } else { 0 };
    let start = out.len();
    let ctx = Context {
        keys: KeyView::direct(&ep.keys),
        secret: ep.secret.as_deref(),
        max_value: ep.max_request,
        clients: ep.connections.open(),
        stream_store: ep.stream_store,
    };
    let max = ep.max_request;
    // In a cluster, reads are linearizable unless the connection asked for stale ones: on the
    // leader one barrier (leadership confirmed by a quorum, everything committed applied)
    // serves the reads of the run, which all arrived before it; a member that does not lead
    // passes writes and such reads to the leader.
    let replication = ep.keys.replication();
    let follower = replication.is_some_and(|r| !r.is_leader()) && !s.forwarded;
    if let Some(r) = replication.filter(|_| !follower) {
        // A new leader evaluates writes (INCR, SET NX...) once it applied what earlier
        // leaders committed.
        let writes = run.iter().any(|it| it.command.is_some_and(|(_, c)| c.is(WRITE)));
        let fresh = if writes { r.fresh().await } else { Ok(()) };
        let reads = run.iter().any(|it| it.command.is_some_and(|(_, c)| c.is(READONLY)));
        let barrier = match fresh {
            Ok(()) if reads && !s.stale_reads => r.read_barrier(),
            other => other,
        };
        if let Err(e) = barrier {
            let reply = Reply::Error(e.to_string());
            for _ in run {
                reply.encode(s.proto, out);
            }
            return;
        }
    }
    let mut left = run;
    while !left.is_empty() && !s.quit {
        // On the leader, plain SETs read nothing: they go in as one write that awaits its
        // proposal on this task (`Keyspace::write_values`) rather than on a blocking thread.
        let sets: Vec<(Bytes, Option<Value>)> = match replication {
            Some(_) if s.authed && !follower => left
                .iter()
                .map_while(|it| match it.op(max) {
                    Some(RunOp::Set(k, v)) => Some((k.clone(), Some(Value::string(v.clone())))),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        if !sets.is_empty() {
            let (n, t) = (sets.len(), Instant::now());
            let reply = match ep.keys.write_values(sets).await {
                Some(Ok(())) => Reply::Ok,
                Some(Err(e)) => super::cmd::storage(e),
                None => Reply::err("write task failed"),
            };
            answer(ep, s, left, std::iter::repeat_n(reply, n), t, out);
            left = left.get(n..).unwrap_or(&[]);
            continue;
        }
        // Consecutive SETs and INCRs (a pipeline of writes) go in as one write batch, and
        // consecutive GETs (a pipeline of reads) as one read.
        let two_ops = left.get(..2).is_some_and(|two| two.iter().all(|it| it.op(max).is_some()));
        let ops: Vec<RunOp<'_>> =
            if two_ops { left.iter().map_while(|it| it.op(max)).collect() } else { Vec::new() };
        let gets: Vec<&[u8]> = if ops.is_empty() && left.len() >= 2 {
            left.iter().map_while(Item::get).collect()
        } else {
            Vec::new()
        };
        if s.authed && !follower && (ops.len() >= 2 || gets.len() >= 2) {
            let t = Instant::now();
            let (n, replies) = match ops.len() {
                0 => (gets.len(), execute_gets(&ep.keys, &gets)),
                n => (n, execute_run(&ep.keys, &ops)),
            };
            answer(ep, s, left, replies, t, out);
            left = left.get(n..).unwrap_or(&[]);
            continue;
        }
        let Some((it, tail)) = left.split_first() else { break };
        left = tail;
        match it.authorized(s) {
            Ok((index, command)) => {
                let leader_only = command.is(WRITE) || (command.is(READONLY) && !s.stale_reads);
                if follower && leader_only {
                    if let Some(r) = replication {
                        match r.forward(s.proto, it.request.to_vec()).await {
                            Ok(reply) => out.extend_from_slice(&reply),
                            Err(e) => Reply::Error(e.to_string()).encode(s.proto, out),
                        }
                    }
                    continue;
                }
                let t = ep.sample(s);
                let args = Args::new(command.name, it.request);
                let reply = match command.handler {
                    Handler::Keys(h) => h(&ctx, s, args).unwrap_or_else(|e| e),
                    Handler::Describe => table::describe(args),
                    // Runs end before stream and transaction commands.
                    Handler::Streams(_) | Handler::Txn(_) => {
                        Reply::err(format!("'{}' cannot run here", command.name))
                    }
                };
                reply.encode(s.proto, out);
                ep.record(index, t);
            }
            Err(e) => e.encode(s.proto, out),
        }
    }
    if writes > 0 {
        if let Err(e) = ep.keys.durable_for(writes).await {
            tracing::error!(error = %e, "sync failed");
            out.truncate(start);
            for _ in run {
                Reply::err(format!("storage error: {e}")).encode(s.proto, out);
            }
        }
    }
}

/// Encodes the replies of a run's first items, answered together since `t`, and records
/// their commands' figures.
fn answer(
    ep: &Endpoint,
    s: &mut Session,
    items: &[Item<'_>],
    replies: impl IntoIterator<Item = Reply>,
    t: Instant,
    out: &mut BytesMut,
) {
    for (it, reply) in items.iter().zip(replies) {
        reply.encode(s.proto, out);
        let timed = ep.sample(s).map(|_| t);
        if let Some((index, _)) = it.command {
            ep.record(index, timed);
        }
    }
}

/// Awaits the pending append replies, in order, and encodes them.
async fn settle(later: &mut Vec<BoxFuture<'static, Reply>>, proto: u8, out: &mut BytesMut) {
    for f in later.drain(..) {
        f.await.encode(proto, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::idle::{Activity, IdleWork};
    use crate::keyspace::Keyspace;
    use crate::streams::StreamSpace;
    use crate::Sync;
    use proptest::prelude::*;

    /// The largest request the endpoints accept (small, so that some SETs are refused).
    const MAX: usize = 64;

    async fn endpoint(dir: &std::path::Path) -> Arc<Endpoint> {
        let keys = Arc::new(
            Keyspace::open(&dir.join("kv"), Sync::Manual, None, &IdleWork::new()).unwrap(),
        );
        let opts = crate::streams::options(
            Sync::Manual,
            &crate::config::StreamStore::Local,
            (std::time::Duration::from_secs(30), 1 << 30),
            None,
        );
        let streams =
            Arc::new(StreamSpace::open(keys.clone(), &dir.join("streams"), opts).await.unwrap());
        let mut cfg = Config::for_dir(dir);
        cfg.max_request_bytes = MAX;
        let connections = crate::limit::Connections::new(100);
        Arc::new(Endpoint::new(keys, streams, connections, Activity::default(), &cfg))
    }

    /// A request, as the client sends it.
    fn request() -> impl Strategy<Value = Vec<String>> {
        let key = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
        let value = prop_oneof![
            (-3i64..12).prop_map(|n| n.to_string()),
            Just("x".to_string()),
            Just(i64::MAX.to_string()),
            Just(i64::MIN.to_string()),
            Just("v".repeat(MAX + 1)),
        ];
        let name = prop::sample::select(vec![
            "SET", "set", "GET", "INCR", "DECR", "INCRBY", "DECRBY", "APPEND", "DEL", "EXISTS",
            "STRLEN", "MGET", "GET", "INCR", "SET",
        ]);
        prop_oneof![
            8 => (name, key.clone(), value).prop_map(|(n, k, v)| match n {
                "GET" | "INCR" | "DECR" | "DEL" | "EXISTS" | "STRLEN" => vec![n.into(), k],
                "MGET" => vec![n.into(), k, "c".into()],
                _ => vec![n.into(), k, v],
            }),
            1 => key.clone().prop_map(|k| vec!["XLEN".into(), k]),
            1 => key.clone().prop_map(|k| vec!["XRANGE".into(), k, "-".into(), "+".into()]),
            1 => key.clone().prop_map(|k| vec!["XADD".into(), k, "+".into(), "f".into(), "v".into()]),
            1 => Just(vec!["GET".to_string()]),
            1 => Just(vec!["NOSUCH".to_string(), "a".to_string()]),
            1 => (key.clone(), 1i64..1000).prop_map(|(k, s)| vec!["SET".into(), k, "1".into(), "EX".into(), s.to_string()]),
            // Transactions: queued replies, EXEC's array, aborts, WATCH.
            1 => Just(vec!["MULTI".to_string()]),
            1 => Just(vec!["EXEC".to_string()]),
            1 => Just(vec!["DISCARD".to_string()]),
            1 => key.prop_map(|k| vec!["WATCH".into(), k]),
        ]
    }

    /// Gives every `XADD` an explicit id, growing along the sequence, so that both runs add the
    /// same entries.
    fn with_ids(requests: Vec<Vec<String>>) -> Vec<Vec<Bytes>> {
        requests
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                if r.first().is_some_and(|n| n == "XADD") {
                    r[2] = format!("{}-1", i + 1);
                }
                r.into_iter().map(Bytes::from).collect()
            })
            .collect()
    }

    /// The replies to `batches`, run one batch at a time on one connection.
    async fn replies(ep: &Arc<Endpoint>, batches: &[&[Vec<Bytes>]]) -> Vec<u8> {
        let (_stop, rx) = watch::channel(false);
        let mut s = Session::new(1, false);
        let mut out = BytesMut::new();
        for b in batches {
            run(ep, &mut s, b, &mut out, &rx).await;
        }
        out.to_vec()
    }

    /// Every key with its value, and every stream's entries.
    async fn contents(ep: &Arc<Endpoint>) -> Vec<u8> {
        let mut all = Vec::new();
        KeyView::direct(&ep.keys).each_key(|k| all.push(k)).unwrap();
        let mut dump: Vec<Vec<Bytes>> = Vec::new();
        for k in &all {
            dump.push(vec!["TYPE".into(), k.clone()]);
            dump.push(vec!["GET".into(), k.clone()]);
            dump.push(vec!["XRANGE".into(), k.clone(), "-".into(), "+".into()]);
        }
        let mut out = format!("{all:?}").into_bytes();
        for r in &dump {
            out.extend(replies(ep, &[std::slice::from_ref(r)]).await);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A pipeline gives the replies, and leaves the keyspace and streams, that the same
        /// requests sent one at a time do: the batched runs of SETs, INCRs and GETs, the runs
        /// cut at stream and transaction commands, queued commands and the appends' deferred
        /// replies change nothing observable.
        #[test]
        fn a_pipeline_is_the_same_as_one_request_at_a_time(requests in prop::collection::vec(request(), 1..40)) {
            let requests = with_ids(requests);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
                let (piped, single) = (endpoint(d1.path()).await, endpoint(d2.path()).await);
                let one_by_one: Vec<&[Vec<Bytes>]> = requests.chunks(1).collect();
                let a = replies(&piped, &[&requests]).await;
                let b = replies(&single, &one_by_one).await;
                prop_assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
                let (ca, cb) = (contents(&piped).await, contents(&single).await);
                prop_assert_eq!(String::from_utf8_lossy(&ca), String::from_utf8_lossy(&cb));
                Ok(())
            })?;
        }
    }
}
