//! Redis transactions: `MULTI` queues a connection's commands until `EXEC` runs them as one
//! (or `DISCARD` drops them); `WATCH` makes `EXEC` do nothing (a nil reply) if a watched key was
//! written, flushed or expired since.
//!
//! - Queuing: a command that does not resolve (unknown, wrong arity) or may not run (NOAUTH)
//!   gets its error and marks the transaction, whose `EXEC` then fails with `EXECABORT`; the
//!   others reply `QUEUED`. `MULTI` and `WATCH` inside `MULTI` get an error and change nothing.
//! - `EXEC` runs the queue in segments: a run of keyspace commands runs against a [`KeyView`]
//!   over [`Pending`] writes, under the stripe locks of every key it names (all of them for
//!   commands without keys, such as `FLUSHALL` or `KEYS`), and is committed as one write batch
//!   (in a cluster, one Raft entry); the watched keys are checked under their locks with the
//!   first segment. A stream command runs between segments, on its own. Errors of a command
//!   are its reply in the array and undo nothing, as in Redis.
//! - In a cluster `EXEC` runs on the leader: a member that does not lead passes the whole
//!   queue, with its watches, to the leader; `WATCH` on such a member asks the leader for the
//!   keys' versions. Versions compare only within one term of one leader ([`crate::versions`]):
//!   a leader change between `WATCH` and `EXEC` aborts the transaction (nil), which the client
//!   retries as for any other watched change.
//!
//! Invariants: no client sees part of a segment's writes, and none writes a key of a segment
//! between its reads and its commit; a transaction with a stream command is atomic per segment
//! only (the commands before a stream command are committed before it runs).

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::args::Args;
use super::cmd::streams::{self, Outcome, StreamContext};
use super::reply::Reply;
use super::session::{Context, Session};
use super::table::{self, Command, Handler, READONLY, WRITE};
use super::Endpoint;
use crate::keyspace::data_key;
use crate::versions::Watches;
use crate::view::{KeyView, Pending};

/// The most commands one transaction queues.
const MAX_QUEUED: usize = 100_000;
/// The most bytes of arguments one transaction queues.
const MAX_QUEUED_BYTES: usize = 256 << 20;

/// The first argument of a transaction a member passes to the leader (no command has it).
const EXEC_BLOCK: &[u8] = b"\0exec";
/// The first argument of a member's WATCH passed to the leader.
const WATCH_KEYS: &[u8] = b"\0watch";

/// The transaction commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxnCommand {
    Multi,
    Exec,
    Discard,
    Watch,
    Unwatch,
}

/// A connection's transaction between `MULTI` and `EXEC`.
#[derive(Debug, Default)]
pub(crate) struct Multi {
    queue: Vec<Vec<Bytes>>,
    bytes: usize,
    /// A command was refused while queuing: `EXEC` fails.
    aborted: bool,
}

/// Runs a request of a connection in `MULTI`, or a transaction command, and encodes its reply.
pub(crate) async fn step(
    ep: &std::sync::Arc<Endpoint>,
    s: &mut Session,
    request: &[Bytes],
    out: &mut BytesMut,
    stop: &watch::Receiver<bool>,
) {
    let resolved = table::resolve(request).and_then(|(i, c)| {
        table::authorize(s, c)?;
        Ok((i, c))
    });
    let (index, command) = match resolved {
        Ok(found) => found,
        Err(e) => {
            if let Some(m) = &mut s.multi {
                m.aborted = true;
            }
            return e.encode(s.proto, out);
        }
    };
    let t = ep.sample(s);
    let txn = match command.handler {
        Handler::Txn(t) => Some(t),
        _ => None,
    };
    let reply = match (s.multi.is_some(), txn) {
        (true, Some(TxnCommand::Exec)) => exec(ep, s, stop).await,
        (true, Some(TxnCommand::Discard)) => {
            s.multi = None;
            s.watches = Watches::default();
            Reply::Ok
        }
        (true, Some(TxnCommand::Multi)) => Reply::err("MULTI calls can not be nested"),
        (true, Some(TxnCommand::Watch)) => Reply::err("WATCH inside MULTI is not allowed"),
        (true, _) if command.name == "quit" => {
            s.quit = true;
            Reply::Ok
        }
        (true, _) => {
            let m = s.multi.get_or_insert_with(Multi::default);
            let size: usize = request.iter().map(Bytes::len).sum();
            if m.queue.len() >= MAX_QUEUED || m.bytes + size > MAX_QUEUED_BYTES {
                m.aborted = true;
                Reply::err(format!(
                    "transaction too large: at most {MAX_QUEUED} commands and {MAX_QUEUED_BYTES} bytes"
                ))
            } else {
                m.bytes += size;
                m.queue.push(request.to_vec());
                Reply::Status("QUEUED")
            }
        }
        (false, Some(TxnCommand::Multi)) => {
            s.multi = Some(Multi::default());
            Reply::Ok
        }
        (false, Some(TxnCommand::Exec)) => Reply::err("EXEC without MULTI"),
        (false, Some(TxnCommand::Discard)) => Reply::err("DISCARD without MULTI"),
        (false, Some(TxnCommand::Watch)) => {
            watch(ep, s, request.get(1..).unwrap_or_default()).await
        }
        (false, Some(TxnCommand::Unwatch)) => {
            s.watches = Watches::default();
            Reply::Ok
        }
        // Only transaction commands come here outside MULTI.
        (false, None) => Reply::err(format!("'{}' cannot run here", command.name)),
    };
    reply.encode(s.proto, out);
    ep.record(index, t);
}

/// `WATCH key...`: records the keys' versions (on the leader, in a cluster).
async fn watch(ep: &std::sync::Arc<Endpoint>, s: &mut Session, keys: &[Bytes]) -> Reply {
    if let Some(r) = ep.keys.replication() {
        if !r.is_leader() && !s.forwarded {
            let mut args = vec![Bytes::from_static(WATCH_KEYS)];
            args.extend_from_slice(keys);
            let got = match r.forward(2, args).await {
                Ok(reply) => bulk_of(&reply),
                Err(e) => Err(Reply::Error(e.to_string())),
            };
            return match got.and_then(|b| {
                Watches::decode(&b).ok_or_else(|| Reply::err("undecodable watch from the leader"))
            }) {
                Ok(w) => {
                    if let Some(epoch) = w.epoch {
                        s.watches.add(epoch, w.keys);
                    }
                    Reply::Ok
                }
                Err(e) => e,
            };
        }
    }
    match watched_here(ep, keys).await {
        Ok(w) => {
            if let Some(epoch) = w.epoch {
                s.watches.add(epoch, w.keys);
            }
            Reply::Ok
        }
        Err(e) => e,
    }
}

/// `keys` watched on this member (the leader, in a cluster).
async fn watched_here(ep: &std::sync::Arc<Endpoint>, keys: &[Bytes]) -> Result<Watches, Reply> {
    // In a cluster: this member leads, applied everything committed before (so the deadlines
    // read are current), and, after a failed proposal, applied the barrier behind it (a failed
    // write applied later would not bump the version recorded here).
    if let Some(r) = ep.keys.replication() {
        r.fresh().await.map_err(|e| Reply::Error(e.to_string()))?;
    }
    ep.keys.linearizable_async().await.map_err(|e| Reply::Error(e.to_string()))?;
    let epoch = ep
        .keys
        .epoch()
        .ok_or_else(|| Reply::Error("CLUSTERDOWN leadership changed; retry".into()))?;
    let keys = ep.keys.watch(keys).map_err(super::cmd::storage)?;
    let mut w = Watches::default();
    w.add(epoch, keys);
    Ok(w)
}

/// The bulk string of an encoded reply, or the reply itself if it is an error.
fn bulk_of(reply: &[u8]) -> Result<Bytes, Reply> {
    let bad = || Reply::err("unexpected reply from the leader");
    match reply.split_first() {
        Some((b'$', rest)) => {
            let at = rest.iter().position(|&c| c == b'\r').ok_or_else(bad)?;
            let len: usize = std::str::from_utf8(rest.get(..at).ok_or_else(bad)?)
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(bad)?;
            let body = rest.get(at + 2..at + 2 + len).ok_or_else(bad)?;
            Ok(Bytes::copy_from_slice(body))
        }
        Some((b'-', rest)) => {
            Err(Reply::Error(String::from_utf8_lossy(rest).trim_end().to_string()))
        }
        _ => Err(bad()),
    }
}

/// `EXEC` of the connection's transaction.
async fn exec(
    ep: &std::sync::Arc<Endpoint>,
    s: &mut Session,
    stop: &watch::Receiver<bool>,
) -> Reply {
    let m = s.multi.take().unwrap_or_default();
    let watches = std::mem::take(&mut s.watches);
    if m.aborted {
        return Reply::Error("EXECABORT Transaction discarded because of previous errors.".into());
    }
    if let Some(r) = ep.keys.replication() {
        if !r.is_leader() && !s.forwarded {
            // The leader runs the queue on a session of its own: a command that changes the
            // connection (its protocol, its name, its authentication) would change that one.
            if let Some(name) = m.queue.iter().find_map(|c| session_command(c)) {
                return Reply::err(format!(
                    "'{name}' cannot run inside a transaction on a member that does not lead: \
                     send it outside the transaction (the transaction did not run)"
                ));
            }
            let mut args = vec![Bytes::from_static(EXEC_BLOCK), watches.encode()];
            for c in &m.queue {
                args.push(Bytes::from(c.len().to_string()));
                args.extend_from_slice(c);
            }
            return match r.forward(s.proto, args).await {
                Ok(reply) => Reply::Raw(reply.into()),
                Err(e) => Reply::Error(e.to_string()),
            };
        }
    }
    run_block(ep, s, &watches, m.queue, stop).await
}

/// Runs a transaction another member passed here (its `EXEC`) or a `WATCH` of its client's;
/// `None` if `args` is neither.
pub(crate) async fn forwarded(
    ep: &std::sync::Arc<Endpoint>,
    s: &mut Session,
    args: &[Bytes],
    stop: &watch::Receiver<bool>,
) -> Option<Reply> {
    let (first, rest) = args.split_first()?;
    if first == WATCH_KEYS {
        return Some(match watched_here(ep, rest).await {
            Ok(w) => Reply::Bulk(w.encode()),
            Err(e) => e,
        });
    }
    if first != EXEC_BLOCK {
        return None;
    }
    let bad = || Reply::err("malformed transaction from a member");
    let Some((w, mut rest)) = rest.split_first() else { return Some(bad()) };
    let Some(watches) = Watches::decode(w) else { return Some(bad()) };
    let mut queue = Vec::new();
    while let Some((n, tail)) = rest.split_first() {
        let n: Option<usize> = std::str::from_utf8(n).ok().and_then(|n| n.parse().ok());
        let Some(command) = n.and_then(|n| tail.get(..n)) else { return Some(bad()) };
        queue.push(command.to_vec());
        rest = tail.get(command.len()..).unwrap_or_default();
    }
    Some(run_block(ep, s, &watches, queue, stop).await)
}

/// Runs a transaction's commands (on the leader, in a cluster): the array of their replies, or
/// the null array if a watched key changed.
async fn run_block(
    ep: &std::sync::Arc<Endpoint>,
    s: &mut Session,
    watches: &Watches,
    queue: Vec<Vec<Bytes>>,
    stop: &watch::Receiver<bool>,
) -> Reply {
    let commands: Vec<(&'static Command, &[Bytes])> =
        queue.iter().filter_map(|r| table::resolve(r).ok().map(|(_, c)| (c, &r[..]))).collect();
    if commands.len() != queue.len() {
        // Only commands that resolved were queued.
        return Reply::Error("EXECABORT Transaction discarded because of previous errors.".into());
    }
    if !watches.keys.is_empty() && commands.iter().any(|(c, _)| c.is_stream()) {
        // A stream command splits the transaction in segments committed one after the other,
        // and a watched key could change between them: refused rather than half-checked.
        return Reply::err(
            "WATCH with a stream command in the same transaction is not supported: the transaction did not run",
        );
    }
    let writes = commands.iter().any(|(c, _)| c.is(WRITE));
    if let Some(r) = ep.keys.replication() {
        // As for any write and linearizable read on the leader.
        let ready = match writes {
            true => r.fresh().await,
            false => Ok(()),
        };
        let ready = match ready {
            Ok(()) if commands.iter().any(|(c, _)| c.is(READONLY)) => r.read_barrier_async().await,
            other => other,
        };
        if let Err(e) = ready {
            return Reply::Error(e.to_string());
        }
    }
    if watches.broken || (watches.epoch.is_some() && watches.epoch != ep.keys.epoch()) {
        return Reply::NilArray;
    }
    let mut replies = Vec::with_capacity(commands.len());
    let mut check = Some(&watches.keys[..]);
    let mut rest = &commands[..];
    while !rest.is_empty() || check.is_some() {
        let n = rest.iter().position(|(c, _)| c.is_stream()).unwrap_or(rest.len());
        let (segment, after) = rest.split_at(n);
        if !segment.is_empty() || check.is_some() {
            match run_segment(ep, s, check.take().unwrap_or_default(), segment) {
                Ok(Some(r)) => replies.extend(r),
                Ok(None) => return Reply::NilArray,
                Err(e) => return e,
            }
        }
        rest = after;
        if let Some(((c, request), tail)) = rest.split_first() {
            replies.push(run_stream(ep, s.proto, c, request, stop).await);
            rest = tail;
        }
    }
    if writes {
        if let Err(e) = ep.keys.durable().await {
            return Reply::err(format!("storage error: {e}"));
        }
    }
    Reply::Array(replies)
}

/// Runs a run of keyspace commands as one write, under their keys' locks (and those of the
/// watched keys, checked first): their replies, or `None` if a watched key changed.
fn run_segment(
    ep: &Endpoint,
    s: &mut Session,
    watched: &[crate::versions::Watched],
    segment: &[(&'static Command, &[Bytes])],
) -> Result<Option<Vec<Reply>>, Reply> {
    let ks = &ep.keys;
    let all = segment.iter().any(|(c, r)| keys_of(c, r).is_none());
    let _locks = if all {
        ks.lock_all()
    } else {
        let mut keys: Vec<&[u8]> = watched.iter().map(|w| &w.key[..]).collect();
        for (c, r) in segment {
            keys.extend(keys_of(c, r).unwrap_or_default());
        }
        ks.lock_many(&keys)
    };
    if !ks.unchanged(watched) {
        return Ok(None);
    }
    let pending = Mutex::new(Pending::default());
    let ctx = Context {
        keys: KeyView::pending(ks, &pending),
        secret: ep.secret.as_deref(),
        max_value: ep.max_request,
        clients: ep.connections.open(),
        stream_store: ep.stream_store,
    };
    let replies: Vec<Reply> = segment
        .iter()
        .map(|(c, request)| {
            let args = Args::new(c.name, request);
            match c.handler {
                Handler::Keys(h) => h(&ctx, s, args).unwrap_or_else(|e| e),
                Handler::Describe => table::describe(args),
                // Queued UNWATCH: the watches were checked already; as in Redis, OK.
                Handler::Txn(TxnCommand::Unwatch) => Reply::Ok,
                Handler::Streams(_) | Handler::Txn(_) => {
                    Reply::err(format!("'{}' cannot run here", c.name))
                }
            }
        })
        .collect();
    let batch = pending.into_inner().into_batch(ks).map_err(super::cmd::storage)?;
    // In a cluster the members check the watched keys again where they apply the write.
    let depends: Vec<Vec<u8>> = watched.iter().map(|w| data_key(&w.key)).collect();
    match ks.commit_guarded(batch, &depends, &[], None) {
        Err(crate::keyspace::Error::Kv(timber_kv::Error::Conflict { .. })) => Ok(None),
        r => r.map(|()| Some(replies)).map_err(super::cmd::storage),
    }
}

/// Runs a stream command of a transaction: without blocking (`BLOCK` is ignored, as Redis
/// does inside `MULTI`), its writes recorded for WATCH.
async fn run_stream(
    ep: &std::sync::Arc<Endpoint>,
    proto: u8,
    c: &'static Command,
    request: &[Bytes],
    stop: &watch::Receiver<bool>,
) -> Reply {
    let Handler::Streams(handler) = c.handler else {
        return Reply::err(format!("'{}' cannot run here", c.name));
    };
    let touched = stream_keys(c, request);
    ep.keys.touch(&touched);
    let mut cx = StreamContext {
        space: &ep.streams,
        proto,
        max_value: ep.max_request,
        stop: stop.clone(),
        blocking: false,
    };
    let reply = match streams::run(handler, &mut cx, Args::new(c.name, request)).await {
        Outcome::Now(r) => r,
        Outcome::Later(f) => f.await,
    };
    ep.keys.touch(&touched);
    reply
}

/// The name of a command that changes the connection it runs on, if `request` is one.
fn session_command(request: &[Bytes]) -> Option<&'static str> {
    let (_, c) = table::resolve(request).ok()?;
    matches!(c.name, "hello" | "auth" | "select" | "client" | "readonly" | "readwrite")
        .then_some(c.name)
}

/// The keys a keyspace command names (by the command table's key positions); `None` for a
/// command that reads or writes keys it does not name (`FLUSHALL`, `KEYS`, `SCAN`, `DBSIZE`).
fn keys_of<'r>(c: &Command, request: &'r [Bytes]) -> Option<Vec<&'r [u8]>> {
    let (first, last, step) = c.keys;
    if first <= 0 {
        return match c.is(READONLY) || c.is(WRITE) {
            true => None,
            false => Some(Vec::new()),
        };
    }
    let len = request.len() as i64;
    let last = if last < 0 { len + i64::from(last) } else { i64::from(last) };
    let step = i64::from(step.max(1));
    let mut keys = Vec::new();
    let mut i = i64::from(first);
    while i <= last {
        if let Some(k) = request.get(i as usize) {
            keys.push(&k[..]);
        }
        i += step;
    }
    Some(keys)
}

/// The stream keys a stream command may write (for WATCH): its named key, the key of an
/// `XGROUP` subcommand, the streams of an `XREADGROUP`.
pub(crate) fn stream_keys<'r>(c: &Command, request: &'r [Bytes]) -> Vec<&'r [u8]> {
    if !c.is(WRITE) {
        return Vec::new();
    }
    match c.name {
        "xgroup" => request.get(2).map(|k| vec![&k[..]]).unwrap_or_default(),
        "xreadgroup" => {
            let at = request.iter().position(|a| a.eq_ignore_ascii_case(b"STREAMS"));
            let rest = at.and_then(|at| request.get(at + 1..)).unwrap_or_default();
            rest.get(..rest.len() / 2).unwrap_or_default().iter().map(|k| &k[..]).collect()
        }
        _ => keys_of(c, request).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(parts: &[&str]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::copy_from_slice(p.as_bytes())).collect()
    }

    fn keys(parts: &[&str]) -> Option<Vec<Vec<u8>>> {
        let r = req(parts);
        let (_, c) = table::resolve(&r).unwrap();
        keys_of(c, &r).map(|k| k.iter().map(|k| k.to_vec()).collect())
    }

    #[test]
    fn key_positions_follow_the_command_table() {
        assert_eq!(keys(&["SET", "a", "1", "EX", "5"]), Some(vec![b"a".to_vec()]));
        assert_eq!(keys(&["MSET", "a", "1", "b", "2"]), Some(vec![b"a".to_vec(), b"b".to_vec()]));
        assert_eq!(keys(&["DEL", "a", "b"]), Some(vec![b"a".to_vec(), b"b".to_vec()]));
        assert_eq!(keys(&["PING"]), Some(vec![]));
        assert_eq!(keys(&["FLUSHALL"]), None);
        assert_eq!(keys(&["KEYS", "*"]), None);
        let r = req(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s1", "s2", ">", ">"]);
        let (_, c) = table::resolve(&r).unwrap();
        assert_eq!(stream_keys(c, &r), vec![&b"s1"[..], b"s2"]);
        let r = req(&["XGROUP", "CREATE", "s", "g", "$"]);
        let (_, c) = table::resolve(&r).unwrap();
        assert_eq!(stream_keys(c, &r), vec![&b"s"[..]]);
    }

    #[test]
    fn session_commands_are_recognised() {
        assert_eq!(session_command(&req(&["HELLO", "3"])), Some("hello"));
        assert_eq!(session_command(&req(&["client", "setname", "x"])), Some("client"));
        assert_eq!(session_command(&req(&["SET", "a", "1"])), None);
        assert_eq!(session_command(&req(&["NOSUCH"])), None);
    }

    #[test]
    fn block_is_read_as_the_command_reads_it() {
        let block = |parts: &[&str]| streams::block_of(&req(parts));
        let five = Some(Some(std::time::Duration::from_millis(5)));
        assert_eq!(block(&["XREAD", "COUNT", "1", "BLOCK", "0", "STREAMS", "s", "$"]), Some(None));
        // A stream (or group) named "block" is no option.
        assert_eq!(block(&["XREAD", "STREAMS", "block", "0"]), None);
        assert_eq!(block(&["XREADGROUP", "GROUP", "block", "c", "STREAMS", "s", ">"]), None);
        assert_eq!(
            block(&["XREADGROUP", "GROUP", "block", "c", "BLOCK", "5", "STREAMS", "s", ">"]),
            five
        );
        assert_eq!(block(&["XREAD", "BLOCK", "x", "STREAMS", "s", "$"]), None);
    }

    #[test]
    fn a_leaders_bulk_reply_is_read_back() {
        assert_eq!(bulk_of(b"$3\r\nabc\r\n").unwrap(), Bytes::from("abc"));
        assert_eq!(bulk_of(b"$0\r\n\r\n").unwrap(), Bytes::new());
        assert_eq!(
            bulk_of(b"-CLUSTERDOWN no\r\n").unwrap_err(),
            Reply::Error("CLUSTERDOWN no".into())
        );
        assert!(bulk_of(b"$5\r\nab\r\n").is_err());
        assert!(bulk_of(b"").is_err());
    }
}
