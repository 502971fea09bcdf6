//! The batched forms of pipelined runs: consecutive SETs and INCR-family commands as one write
//! batch ([`execute_run`]), consecutive GETs as one read ([`execute_gets`]). Each gives the
//! replies, and leaves the keyspace, as the same commands run one by one would (the property
//! test in `resp::pipeline` checks this against the one-by-one handlers).

use bytes::Bytes;

use super::{int, not_int, storage};
use crate::keyspace::{Keyspace, Value};
use crate::resp::reply::Reply;

/// A command a pipelined write run can batch: a plain SET or an INCR-family command.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RunOp<'a> {
    /// `SET key value`.
    Set(&'a Bytes, &'a Bytes),
    /// `INCR`, `DECR`, `INCRBY`, `DECRBY` (the delta; `None` if the argument is not a valid
    /// integer, which replies with the error and writes nothing).
    Add(&'a Bytes, Option<i64>),
}

impl<'a> RunOp<'a> {
    /// The op a request of the command `name` (lower case) is, if it is one, with a value
    /// within `max`.
    pub(crate) fn of(name: &str, r: &'a [Bytes], max: usize) -> Option<RunOp<'a>> {
        match (name, r) {
            ("set", [_, k, v]) if v.len() <= max => Some(RunOp::Set(k, v)),
            ("incr", [_, k]) => Some(RunOp::Add(k, Some(1))),
            ("decr", [_, k]) => Some(RunOp::Add(k, Some(-1))),
            ("incrby", [_, k, d]) => Some(RunOp::Add(k, int(d))),
            ("decrby", [_, k, d]) => Some(RunOp::Add(k, int(d).and_then(|d| d.checked_neg()))),
            _ => None,
        }
    }

    fn key(&self) -> &'a [u8] {
        match self {
            RunOp::Set(k, _) | RunOp::Add(k, _) => k,
        }
    }
}

/// The key of a request of the command `name` that is a plain `GET key`.
pub(crate) fn get_of<'a>(name: &str, r: &'a [Bytes]) -> Option<&'a [u8]> {
    match (name, r) {
        ("get", [_, key]) => Some(key),
        _ => None,
    }
}

/// Runs consecutive pipelined GETs as one read of all their keys, whose cache misses overlap
/// (see `Keyspace::get_strings`). The replies are those the GETs would give one by one.
pub(crate) fn execute_gets(keys: &Keyspace, gets: &[&[u8]]) -> Vec<Reply> {
    match keys.get_strings(gets) {
        Ok(values) => values
            .into_iter()
            .map(|v| match v {
                Ok(Some(v)) => Reply::Bulk(v.data),
                Ok(None) => Reply::Nil,
                Err(e) => storage(e),
            })
            .collect(),
        Err(e) => {
            let r = storage(e);
            gets.iter().map(|_| r.clone()).collect()
        }
    }
}

/// Runs consecutive pipelined writes as one: under the stripe locks of all their keys, each
/// sees the ones before it, and their final values go to the engine in one write batch. The
/// replies are those the commands would give one by one.
pub(crate) fn execute_run(keys: &Keyspace, ops: &[RunOp<'_>]) -> Vec<Reply> {
    let all: Vec<&[u8]> = ops.iter().map(RunOp::key).collect();
    let _guards = keys.lock_many(&all);
    // foldhash (seeded per process), not SipHash, and sized up front: a run holds at most one
    // pipeline of keys, and hashing them is on the path of every pipelined write.
    let mut overlay: hashbrown::HashMap<&[u8], Value> =
        hashbrown::HashMap::with_capacity(ops.len());
    // The stored values the additions start from, read together (their cache misses overlap);
    // a key written earlier in the run starts from the overlay instead.
    let added: Vec<&[u8]> = ops
        .iter()
        .filter_map(|op| match *op {
            RunOp::Add(k, Some(_)) => Some(&k[..]),
            _ => None,
        })
        .collect();
    let stored = match keys.get_strings(&added) {
        Ok(v) => v,
        Err(e) => {
            let r = storage(e);
            return ops.iter().map(|_| r.clone()).collect();
        }
    };
    let mut stored = stored.into_iter();
    let mut replies = Vec::with_capacity(ops.len());
    for op in ops {
        let reply = match *op {
            RunOp::Set(k, v) => {
                overlay.insert(&k[..], Value::string(v.clone()));
                Reply::Ok
            }
            RunOp::Add(_, None) => not_int(),
            RunOp::Add(k, Some(delta)) => {
                let read = stored.next().expect("one stored value per addition");
                let cur = match overlay.get(&k[..]) {
                    Some(v) => Ok(Some(v.clone())),
                    None => read,
                };
                match cur {
                    Err(e) => storage(e),
                    Ok(cur) => {
                        let (n, expire_at) = match &cur {
                            None => (Some(0), None),
                            Some(v) => (int(&v.data), v.expire_at),
                        };
                        match n.map(|n| n.checked_add(delta)) {
                            None => not_int(),
                            Some(None) => Reply::err("increment or decrement would overflow"),
                            Some(Some(n)) => {
                                let v = Value { expire_at, ..Value::string(n.to_string()) };
                                overlay.insert(&k[..], v);
                                Reply::Int(n)
                            }
                        }
                    }
                }
            }
        };
        replies.push(reply);
    }
    let items: Vec<(&[u8], Value)> = overlay.into_iter().collect();
    if let Err(e) = keys.set_many(&items) {
        let r = storage(e);
        return ops.iter().map(|_| r.clone()).collect();
    }
    replies
}
