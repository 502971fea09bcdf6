//! The stream commands of the Redis-protocol endpoint (XADD, XLEN, XRANGE, XREVRANGE, XREAD,
//! XTRIM, XDEL, XGROUP, XREADGROUP, XACK, XPENDING, XINFO): argument parsing with Redis's error
//! replies, and their effect on the [`StreamSpace`].
//!
//! XADD replies once the entry is durable; its reply is a future so that pipelined XADDs share
//! one flush of the stream. Blocking reads wait on the streams' tails, a deadline and the
//! server's stop signal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt as _;
use tokio::sync::watch;

use super::{int, syntax, upper, R};
use crate::keyspace;
use crate::resp::args::Args;
use crate::resp::reply::Reply;
use crate::streams::{Entry, Error, Handle, NewId, StreamId, StreamSpace, Trim};

/// A command's reply: ready now, or once an entry is durable.
pub(crate) enum Outcome {
    /// The reply.
    Now(Reply),
    /// A reply that resolves later (XADD).
    Later(BoxFuture<'static, Reply>),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Now(r) => f.debug_tuple("Now").field(r).finish(),
            Outcome::Later(_) => f.write_str("Later"),
        }
    }
}

fn error(e: Error) -> Reply {
    match e {
        Error::Reject(m) => Reply::Error(m),
        Error::Keys(keyspace::Error::WrongType) => {
            Reply::Error(keyspace::Error::WrongType.to_string())
        }
        Error::Keys(keyspace::Error::TooLarge(m)) => Reply::err(m),
        // Retryable: the client may send it again once the store is back.
        Error::Stream(e @ timber_stream::Error::StoreUnavailable { .. }) => {
            Reply::Error(format!("TRYAGAIN {e}"))
        }
        e => {
            tracing::error!(error = %e, "stream command failed");
            Reply::err(format!("storage error: {e}"))
        }
    }
}

fn bad_id() -> Reply {
    Reply::err(crate::streams::id::INVALID)
}

fn entry_reply(id: StreamId, fields: Option<Vec<Bytes>>) -> Reply {
    Reply::Array(vec![
        Reply::Bulk(id.to_bytes()),
        match fields {
            Some(f) => Reply::Array(f.into_iter().map(Reply::Bulk).collect()),
            None => Reply::NilArray,
        },
    ])
}

fn entries_reply(es: Vec<Entry>) -> Reply {
    Reply::Array(es.into_iter().map(|e| entry_reply(e.id, Some(e.fields))).collect())
}

fn count_arg(b: &[u8]) -> Result<usize, Reply> {
    match int(b) {
        Some(n) if n < 0 => Ok(0),
        Some(n) => Ok(n as usize),
        None => Err(Reply::err("value is not an integer or out of range")),
    }
}

/// What a stream command needs besides its arguments: the connection's stop signal lets
/// blocking reads end at shutdown.
#[derive(Debug)]
pub(crate) struct StreamContext<'a> {
    /// The streams.
    pub(crate) space: &'a Arc<StreamSpace>,
    /// Protocol version of the connection.
    pub(crate) proto: u8,
    /// The largest value accepted.
    pub(crate) max_value: usize,
    /// Fires when the server stops.
    pub(crate) stop: watch::Receiver<bool>,
    /// Whether XREAD and XREADGROUP may wait (`BLOCK`); inside `EXEC` they do not, as in
    /// Redis.
    pub(crate) blocking: bool,
}

async fn xdel(_: &mut StreamContext<'_>, _: Args<'_>) -> R {
    Err(Reply::err(
        "XDEL is not supported: timber streams are append-only; use XTRIM to drop the oldest entries",
    ))
}

/// The stream commands; the command table names one per entry, and [`run`] runs it. (An enum
/// rather than a function pointer per command: a pointer would return a boxed future, and
/// moving a command's future into its box costs more than the command's own work.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamCommand {
    Add,
    Len,
    Range,
    RevRange,
    Read,
    Trim,
    Del,
    Group,
    ReadGroup,
    Ack,
    Pending,
    Info,
}

/// Runs one stream command.
pub(crate) async fn run(
    command: StreamCommand,
    cx: &mut StreamContext<'_>,
    a: Args<'_>,
) -> Outcome {
    use StreamCommand as C;
    let r = match command {
        C::Add => return xadd(cx, a).await.unwrap_or_else(Outcome::Now),
        C::Len => xlen(cx, a).await,
        C::Range => xrange(cx, a).await,
        C::RevRange => xrevrange(cx, a).await,
        C::Read => xread(cx, a).await,
        C::Trim => xtrim(cx, a).await,
        C::Del => xdel(cx, a).await,
        C::Group => xgroup(cx, a).await,
        C::ReadGroup => xreadgroup(cx, a).await,
        C::Ack => xack(cx, a).await,
        C::Pending => xpending(cx, a).await,
        C::Info => xinfo(cx, a).await,
    };
    Outcome::Now(r.unwrap_or_else(|e| e))
}

/// `[=|~] threshold [LIMIT n]` after MAXLEN or MINID; returns the trim and the next index.
fn parse_trim(a: &[Bytes], mut i: usize) -> R<(Trim, usize)> {
    let kind = a.get(i).map(|k| upper(k)).unwrap_or_default();
    i += 1;
    let mut approx = false;
    match a.get(i).map(|b| &b[..]) {
        Some(b"~") => {
            approx = true;
            i += 1;
        }
        Some(b"=") => i += 1,
        _ => {}
    }
    let Some(t) = a.get(i) else { return Err(syntax()) };
    let trim = if kind == "MAXLEN" {
        match int(t) {
            Some(n) if n >= 0 => Trim::MaxLen(n as u64),
            Some(_) => return Err(Reply::err("The MAXLEN argument must be >= 0.")),
            None => return Err(Reply::err("value is not an integer or out of range")),
        }
    } else {
        Trim::MinId(StreamId::parse(t, 0).ok_or_else(bad_id)?)
    };
    i += 1;
    if a.get(i).is_some_and(|b| upper(b) == "LIMIT") {
        if !approx {
            return Err(Reply::err(
                "syntax error, LIMIT cannot be used without the special ~ option",
            ));
        }
        let Some(n) = a.get(i + 1).and_then(|b| int(b)) else {
            return Err(Reply::err("value is not an integer or out of range"));
        };
        if n < 0 {
            return Err(Reply::err("The LIMIT argument must be >= 0."));
        }
        i += 2;
    }
    Ok((trim, i))
}

async fn xadd(cx: &mut StreamContext<'_>, a: Args<'_>) -> R<Outcome> {
    let key = a.arg(0)?.clone();
    let mut i = 1;
    let mut must_exist = false;
    let mut trim = None;
    while let Some(opt) = a.get(i) {
        match upper(opt).as_str() {
            "NOMKSTREAM" => {
                must_exist = true;
                i += 1;
            }
            "MAXLEN" | "MINID" => {
                let (t, next) = parse_trim(a.all(), i)?;
                trim = Some(t);
                i = next;
            }
            _ => break,
        }
    }
    let Some(id) = a.get(i) else { return Err(syntax()) };
    let fields = a.from(i + 1);
    if fields.is_empty() || !fields.len().is_multiple_of(2) {
        return Err(a.arity_error());
    }
    let size: usize = fields.iter().map(|f| f.len() + 4).sum();
    if size > cx.max_value {
        return Err(Reply::err(format!(
            "entry of {size} bytes exceeds the limit of {} bytes",
            cx.max_value
        )));
    }
    let new = if &id[..] == b"*" {
        NewId::Auto
    } else if let Some(ms) = id.strip_suffix(b"-*") {
        NewId::AutoSeq(
            StreamId::parse(ms, 0).filter(|_| !ms.contains(&b'-')).ok_or_else(bad_id)?.ms,
        )
    } else {
        NewId::Exact(StreamId::parse(id, 0).ok_or_else(bad_id)?)
    };
    let (id, ack) = match cx.space.add(&key, new, fields, must_exist).await {
        Ok(Some(x)) => x,
        Ok(None) => return Ok(Outcome::Now(Reply::Nil)),
        Err(e) => return Err(error(e)),
    };
    let reply = Reply::Bulk(id.to_bytes());
    let Some(t) = trim else {
        // The common case, kept small: this future is boxed for every XADD.
        return Ok(Outcome::Later(
            async move {
                match ack.durable().await {
                    Ok(()) => reply,
                    Err(e) => error(e),
                }
            }
            .boxed(),
        ));
    };
    let space = cx.space.clone();
    Ok(Outcome::Later(
        async move {
            if let Err(e) = ack.durable().await {
                return error(e);
            }
            match space.handle(&key) {
                Ok(Some(h)) => {
                    if let Err(e) = space.trim(&key, &h, t).await {
                        return error(e);
                    }
                }
                Ok(None) => {}
                Err(e) => return error(e),
            }
            reply
        }
        .boxed(),
    ))
}

fn handle(cx: &StreamContext<'_>, key: &[u8]) -> R<Option<Handle>> {
    cx.space.handle(key).map_err(error)
}

async fn xlen(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    match handle(cx, a.arg(0)?)? {
        Some(h) => Ok(Reply::Int(cx.space.len(&h).map_err(error)? as i64)),
        None => Ok(Reply::Int(0)),
    }
}

async fn xrange(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    xrange_in(cx, a, false).await
}

async fn xrevrange(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    xrange_in(cx, a, true).await
}

async fn xrange_in(cx: &mut StreamContext<'_>, a: Args<'_>, rev: bool) -> R {
    let (lo, hi) = if rev { (a.arg(2)?, a.arg(1)?) } else { (a.arg(1)?, a.arg(2)?) };
    let start = StreamId::parse_start(lo).map_err(Reply::err)?;
    let end = StreamId::parse_end(hi).map_err(Reply::err)?;
    let mut count = usize::MAX;
    match a.from(3) {
        [] => {}
        [c, n] if upper(c) == "COUNT" => count = count_arg(n)?,
        _ => return Err(syntax()),
    }
    let (Some(start), Some(end)) = (start, end) else { return Ok(Reply::Array(vec![])) };
    let Some(h) = handle(cx, a.arg(0)?)? else { return Ok(Reply::Array(vec![])) };
    let es = cx.space.range(&h, start, end, count, rev).await.map_err(error)?;
    Ok(entries_reply(es))
}

async fn xtrim(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    let (key, kind) = (a.arg(0)?, upper(a.arg(1)?));
    if kind != "MAXLEN" && kind != "MINID" {
        return Err(syntax());
    }
    let (trim, next) = parse_trim(a.all(), 1)?;
    if next != a.len() {
        return Err(syntax());
    }
    let Some(h) = handle(cx, key)? else { return Ok(Reply::Int(0)) };
    Ok(Reply::Int(cx.space.trim(key, &h, trim).await.map_err(error)? as i64))
}

/// COUNT, BLOCK, NOACK (for groups), STREAMS keys... ids...
struct ReadArgs<'a> {
    count: usize,
    block: Option<Duration>,
    noack: bool,
    keys: &'a [Bytes],
    ids: &'a [Bytes],
}

/// The `BLOCK` of an XREAD or XREADGROUP request (name first), as the command reads it: `None`
/// without one or for a request it refuses, `Some(None)` for `BLOCK 0` (no limit),
/// `Some(Some(d))` otherwise.
pub(crate) fn block_of(request: &[Bytes]) -> Option<Option<Duration>> {
    let (args, group) = match upper(request.first()?).as_str() {
        "XREAD" => (request.get(1..)?, false),
        // After GROUP <group> <consumer>.
        "XREADGROUP" => (request.get(4..)?, true),
        _ => return None,
    };
    let block = parse_read(args, group).ok()?.block?;
    Some((!block.is_zero()).then_some(block))
}

fn parse_read<'a>(a: &'a [Bytes], group: bool) -> R<ReadArgs<'a>> {
    let mut r = ReadArgs { count: usize::MAX, block: None, noack: false, keys: &[], ids: &[] };
    let mut i = 0;
    while let Some(opt) = a.get(i) {
        match upper(opt).as_str() {
            "COUNT" => {
                r.count = count_arg(a.get(i + 1).ok_or_else(syntax)?)?;
                if r.count == 0 {
                    r.count = usize::MAX;
                }
                i += 2;
            }
            "BLOCK" => {
                let ms = int(a.get(i + 1).ok_or_else(syntax)?)
                    .ok_or_else(|| Reply::err("timeout is not an integer or out of range"))?;
                if ms < 0 {
                    return Err(Reply::err("timeout is negative"));
                }
                r.block = Some(Duration::from_millis(ms as u64));
                i += 2;
            }
            "NOACK" if group => {
                r.noack = true;
                i += 1;
            }
            "STREAMS" => {
                let rest = a.get(i + 1..).unwrap_or(&[]);
                if rest.is_empty() || !rest.len().is_multiple_of(2) {
                    return Err(Reply::err("Unbalanced 'xread' list of streams: for each stream key an ID or '$' must be specified."));
                }
                (r.keys, r.ids) = rest.split_at(rest.len() / 2);
                return Ok(r);
            }
            _ => return Err(syntax()),
        }
    }
    Err(syntax())
}

fn read_reply(proto: u8, per_key: Vec<(Bytes, Reply)>) -> Reply {
    if per_key.is_empty() {
        return Reply::NilArray;
    }
    if proto >= 3 {
        Reply::Map(per_key.into_iter().map(|(k, v)| (Reply::Bulk(k), v)).collect())
    } else {
        Reply::Array(
            per_key.into_iter().map(|(k, v)| Reply::Array(vec![Reply::Bulk(k), v])).collect(),
        )
    }
}

async fn xread(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    let mut r = parse_read(a.all(), false)?;
    r.block = r.block.filter(|_| cx.blocking);
    // Resolve `$` and `+` once, before any wait.
    let mut from = Vec::with_capacity(r.keys.len());
    for (k, id) in r.keys.iter().zip(r.ids) {
        let h = handle(cx, k)?;
        let after = match &id[..] {
            b"$" => cx.space.dollar(h.as_ref()).await.map_err(error)?,
            b"+" => match &h {
                Some(h) => match cx.space.last_entry(h).await.map_err(error)? {
                    Some(e) => e.id.prev().unwrap_or(StreamId::MIN),
                    None => cx.space.dollar(Some(h)).await.map_err(error)?,
                },
                None => StreamId::MIN,
            },
            _ => StreamId::parse(id, 0).ok_or_else(bad_id)?,
        };
        from.push(after);
    }
    let deadline = r.block.filter(|d| !d.is_zero()).map(|d| Instant::now() + d);
    loop {
        let creations = cx.space.creations();
        let mut out = Vec::new();
        let mut waits = Vec::new();
        for (k, after) in r.keys.iter().zip(&from) {
            let h = handle(cx, k)?;
            if let Some(h) = &h {
                let es = cx.space.read_after(h, *after, r.count).await.map_err(error)?;
                if !es.is_empty() {
                    out.push((k.clone(), entries_reply(es)));
                }
            }
            waits.push((h, *after));
        }
        if !out.is_empty() || r.block.is_none() {
            return Ok(read_reply(cx.proto, out));
        }
        if !wait(cx, &waits, creations, deadline).await? {
            return Ok(Reply::NilArray);
        }
    }
}

/// Waits for `waits` until `deadline` (`None`: forever); whether to look again.
async fn wait(
    cx: &mut StreamContext<'_>,
    waits: &[(Option<Handle>, StreamId)],
    creations: watch::Receiver<u64>,
    deadline: Option<Instant>,
) -> R<bool> {
    let left = match deadline {
        Some(d) => match d.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Some(left),
            _ => return Ok(false),
        },
        None => None,
    };
    cx.space.wait(waits, creations, left, &mut cx.stop).await.map_err(error)
}

async fn xreadgroup(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    if upper(a.arg(0)?) != "GROUP" {
        return Err(syntax());
    }
    let (group, consumer) = (a.arg(1)?, a.arg(2)?);
    let mut r = parse_read(a.from(3), true)?;
    r.block = r.block.filter(|_| cx.blocking);
    let mut targets = Vec::with_capacity(r.keys.len());
    for (k, id) in r.keys.iter().zip(r.ids) {
        let h = handle(cx, k)?;
        let Some(h) = h.filter(|h| matches!(cx.space.group_last(h, group), Ok(Some(_)))) else {
            return Err(error(crate::streams::no_group(k, group, "XREADGROUP with GROUP option")));
        };
        let after = match &id[..] {
            b">" => None,
            _ => Some(StreamId::parse(id, 0).ok_or_else(bad_id)?),
        };
        targets.push((k, h, after));
    }
    let deadline = r.block.filter(|d| !d.is_zero()).map(|d| Instant::now() + d);
    loop {
        let creations = cx.space.creations();
        let mut out = Vec::new();
        let mut waits = Vec::new();
        for (k, h, after) in &targets {
            let got = cx
                .space
                .read_group(h, group, consumer, *after, r.count, r.noack)
                .await
                .map_err(error)?
                .ok_or_else(|| {
                    error(crate::streams::no_group(k, group, "XREADGROUP with GROUP option"))
                })?;
            // History reads always name their stream; `>` reads only those with entries.
            if after.is_some() || !got.is_empty() {
                let es = got.into_iter().map(|(id, f)| entry_reply(id, f)).collect();
                out.push(((*k).clone(), Reply::Array(es)));
            }
            if after.is_none() {
                let last = cx.space.group_last(h, group).map_err(error)?.unwrap_or_default();
                waits.push((Some(*h), last));
            }
        }
        if !out.is_empty() || r.block.is_none() || waits.is_empty() {
            return Ok(read_reply(cx.proto, out));
        }
        if !wait(cx, &waits, creations, deadline).await? {
            return Ok(Reply::NilArray);
        }
    }
}

async fn xgroup(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    let sub = upper(a.arg(0)?);
    let id_arg = |b: &Bytes| -> R<Option<StreamId>> {
        match &b[..] {
            b"$" => Ok(None),
            _ => StreamId::parse(b, 0).map(Some).ok_or_else(bad_id),
        }
    };
    match (sub.as_str(), a.from(1)) {
        ("CREATE", [key, group, id, opts @ ..]) => {
            let mut mkstream = false;
            let mut entries_read = None;
            let mut i = 0;
            while let Some(opt) = opts.get(i) {
                match upper(opt).as_str() {
                    "MKSTREAM" => i += 1,
                    "ENTRIESREAD" => {
                        let n = opts.get(i + 1).and_then(|b| int(b)).ok_or_else(syntax)?;
                        entries_read = Some(n.max(0) as u64);
                        i += 2;
                        continue;
                    }
                    _ => return Err(syntax()),
                }
                mkstream = true;
            }
            cx.space
                .group_create(key, group, id_arg(id)?, mkstream, entries_read)
                .await
                .map_err(error)?;
            Ok(Reply::Ok)
        }
        ("SETID", [key, group, id, rest @ ..]) => {
            match rest {
                [] => {}
                [opt, _] if upper(opt) == "ENTRIESREAD" => {}
                _ => return Err(syntax()),
            }
            cx.space.group_set_id(key, group, id_arg(id)?).await.map_err(error)?;
            Ok(Reply::Ok)
        }
        ("DESTROY", [key, group]) => {
            let gone = cx.space.group_destroy(key, group).await.map_err(error)?;
            Ok(Reply::Int(gone as i64))
        }
        ("DELCONSUMER", [key, group, consumer]) => {
            let n = cx.space.group_delete_consumer(key, group, consumer).await.map_err(error)?;
            Ok(Reply::Int(n as i64))
        }
        ("HELP", []) => Ok(Reply::Array(
            [
                "XGROUP CREATE <key> <group> <id|$> [MKSTREAM] [ENTRIESREAD <n>]",
                "XGROUP SETID <key> <group> <id|$>",
                "XGROUP DESTROY <key> <group>",
                "XGROUP DELCONSUMER <key> <group> <consumer>",
            ]
            .into_iter()
            .map(Reply::text)
            .collect(),
        )),
        _ => Err(Reply::err(format!(
            "unknown subcommand or wrong number of arguments for '{}'. Try XGROUP HELP.",
            String::from_utf8_lossy(a.arg(0)?)
        ))),
    }
}

/// XINFO STREAM / GROUPS / CONSUMERS.
async fn xinfo(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    let sub = upper(a.arg(0)?);
    let Some(key) = a.get(1) else {
        return Err(Reply::err(format!(
            "unknown subcommand or wrong number of arguments for '{sub}'"
        )));
    };
    let Some(h) = handle(cx, key)? else { return Err(Reply::err("no such key")) };
    let groups = cx.space.groups(&h).map_err(error)?;
    let now = crate::keyspace::now_ms();
    match (sub.as_str(), a.from(2)) {
        ("STREAM", []) => {
            let first =
                cx.space.range(&h, StreamId::MIN, StreamId::MAX, 1, false).await.map_err(error)?;
            let last = cx.space.last_entry(&h).await.map_err(error)?;
            let entry =
                |e: Option<Entry>| e.map_or(Reply::Nil, |e| entry_reply(e.id, Some(e.fields)));
            Ok(Reply::Map(vec![
                (Reply::text("length"), Reply::Int(cx.space.len(&h).map_err(error)? as i64)),
                (
                    Reply::text("last-generated-id"),
                    Reply::text(cx.space.last_id(&h).await.map_err(error)?.to_string()),
                ),
                (Reply::text("groups"), Reply::Int(groups.len() as i64)),
                (Reply::text("first-entry"), entry(first.into_iter().next())),
                (Reply::text("last-entry"), entry(last)),
            ]))
        }
        ("GROUPS", []) => Ok(Reply::Array(
            groups
                .into_iter()
                .map(|(name, g, pel)| {
                    let consumers: std::collections::BTreeSet<&Bytes> =
                        pel.iter().map(|p| &p.consumer).collect();
                    Reply::Map(vec![
                        (Reply::text("name"), Reply::Bulk(name.clone())),
                        (Reply::text("consumers"), Reply::Int(consumers.len() as i64)),
                        (Reply::text("pending"), Reply::Int(pel.len() as i64)),
                        (Reply::text("last-delivered-id"), Reply::text(g.last.to_string())),
                        (Reply::text("entries-read"), Reply::Int(g.entries_read as i64)),
                    ])
                })
                .collect(),
        )),
        ("CONSUMERS", [group]) => {
            let Some((_, _, pel)) = groups.into_iter().find(|(n, _, _)| n == group) else {
                return Err(error(crate::streams::no_group(key, group, "XINFO")));
            };
            let mut per: std::collections::BTreeMap<Bytes, (i64, u64)> = Default::default();
            for p in pel {
                let e = per.entry(p.consumer).or_insert((0, 0));
                e.0 += 1;
                e.1 = e.1.max(p.delivered_ms);
            }
            Ok(Reply::Array(
                per.into_iter()
                    .map(|(name, (pending, seen))| {
                        Reply::Map(vec![
                            (Reply::text("name"), Reply::Bulk(name)),
                            (Reply::text("pending"), Reply::Int(pending)),
                            (Reply::text("idle"), Reply::Int(now.saturating_sub(seen) as i64)),
                        ])
                    })
                    .collect(),
            ))
        }
        _ => Err(Reply::err(format!(
            "unknown subcommand or wrong number of arguments for '{}'",
            String::from_utf8_lossy(a.arg(0)?)
        ))),
    }
}

async fn xack(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    let (key, group) = (a.arg(0)?, a.arg(1)?);
    let ids = a
        .from(2)
        .iter()
        .map(|b| StreamId::parse(b, 0).ok_or_else(bad_id))
        .collect::<R<Vec<_>>>()?;
    Ok(Reply::Int(cx.space.ack(key, group, &ids).await.map_err(error)? as i64))
}

async fn xpending(cx: &mut StreamContext<'_>, a: Args<'_>) -> R {
    let (key, group) = (a.arg(0)?, a.arg(1)?);
    let no_group = || error(crate::streams::no_group(key, group, "XPENDING"));
    if a.len() == 2 {
        let all = cx
            .space
            .pending(key, group, StreamId::MIN, StreamId::MAX, usize::MAX, None)
            .map_err(error)?
            .ok_or_else(no_group)?;
        let (Some(first), Some(last)) = (all.first(), all.last()) else {
            return Ok(Reply::Array(vec![Reply::Int(0), Reply::Nil, Reply::Nil, Reply::NilArray]));
        };
        let mut per: std::collections::BTreeMap<Bytes, i64> = Default::default();
        for p in &all {
            *per.entry(p.consumer.clone()).or_default() += 1;
        }
        return Ok(Reply::Array(vec![
            Reply::Int(all.len() as i64),
            Reply::text(first.id.to_string()),
            Reply::text(last.id.to_string()),
            Reply::Array(
                per.into_iter()
                    .map(|(c, n)| Reply::Array(vec![Reply::Bulk(c), Reply::text(n.to_string())]))
                    .collect(),
            ),
        ]));
    }
    let mut rest = a.from(2);
    let mut min_idle = None;
    if let [idle, ms, tail @ ..] = rest {
        if upper(idle) == "IDLE" {
            min_idle = Some(int(ms).ok_or_else(syntax)?.max(0) as u64);
            rest = tail;
        }
    } else if rest.first().is_some_and(|b| upper(b) == "IDLE") {
        return Err(syntax());
    }
    let (start, end, count, consumer) = match rest {
        [s, e, c] => (s, e, c, None),
        [s, e, c, who] => (s, e, c, Some(&who[..])),
        _ => return Err(syntax()),
    };
    let start = StreamId::parse_start(start).map_err(Reply::err)?;
    let end = StreamId::parse_end(end).map_err(Reply::err)?;
    let count = count_arg(count)?;
    let (Some(start), Some(end)) = (start, end) else { return Ok(Reply::Array(vec![])) };
    let now = crate::keyspace::now_ms();
    let list = cx
        .space
        .pending(
            key,
            group,
            start,
            end,
            if min_idle.is_some() { usize::MAX } else { count },
            consumer,
        )
        .map_err(error)?
        .ok_or_else(no_group)?;
    let rows = list
        .into_iter()
        .filter(|p| min_idle.is_none_or(|m| now.saturating_sub(p.delivered_ms) >= m))
        .take(count)
        .map(|p| {
            Reply::Array(vec![
                Reply::text(p.id.to_string()),
                Reply::Bulk(p.consumer),
                Reply::Int(now.saturating_sub(p.delivered_ms) as i64),
                Reply::Int(p.deliveries as i64),
            ])
        })
        .collect();
    Ok(Reply::Array(rows))
}
