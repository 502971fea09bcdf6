//! Consumer groups of Redis streams, kept in the keyspace's KV engine beside the keys.
//!
//! Layout: `g<uid u64 BE><group>` → `[last delivered ms u64 LE][seq u64 LE][entries read u64 LE]`;
//! `p<uid u64 BE><group length u16 BE><group><id ms BE><id seq BE>` →
//! `[delivered at ms u64 LE][deliveries u64 LE][consumer]`, the pending entries list (PEL) of
//! a group in id order. `uid` is the stream's handle id, so a deleted and re-created key never
//! sees the groups of its predecessor.
//!
//! Invariants: callers serialize changes to one stream's groups (the stream's group lock);
//! every change of a group (its last id and its PEL) is one write batch.

use bytes::Bytes;
use timber_kv::{Db, WriteBatch};

use super::id::StreamId;
use crate::keyspace::Error;

/// Longest group name (its length is stored in two bytes).
pub(crate) const MAX_GROUP_NAME: usize = u16::MAX as usize;

/// A consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Group {
    /// The last entry delivered to the group with `>`.
    pub(crate) last: StreamId,
    /// Entries delivered with `>` so far.
    pub(crate) entries_read: u64,
}

/// An entry delivered to a consumer and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending {
    /// The entry.
    pub(crate) id: StreamId,
    /// The consumer it was delivered to last.
    pub(crate) consumer: Bytes,
    /// When it was delivered last, ms since the Unix epoch.
    pub(crate) delivered_ms: u64,
    /// How many times it was delivered.
    pub(crate) deliveries: u64,
}

fn group_key(uid: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + name.len());
    k.push(b'g');
    k.extend_from_slice(&uid.to_be_bytes());
    k.extend_from_slice(name);
    k
}

fn pel_prefix(uid: u64, group: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(11 + group.len() + 16);
    k.push(b'p');
    k.extend_from_slice(&uid.to_be_bytes());
    k.extend_from_slice(&(group.len() as u16).to_be_bytes());
    k.extend_from_slice(group);
    k
}

fn pel_key(uid: u64, group: &[u8], id: StreamId) -> Vec<u8> {
    let mut k = pel_prefix(uid, group);
    k.extend_from_slice(&id.to_be());
    k
}

fn corrupt(key: &[u8]) -> Error {
    Error::Corrupt(Bytes::copy_from_slice(key))
}

/// A group's state.
pub(crate) fn get(db: &Db, uid: u64, name: &[u8]) -> Result<Option<Group>, Error> {
    let key = group_key(uid, name);
    let Some(v) = db.get(&key)? else { return Ok(None) };
    if v.len() != 24 {
        return Err(corrupt(&key));
    }
    let n = |i: usize| crate::codec::u64_le(&v, i).unwrap_or_default();
    Ok(Some(Group { last: StreamId { ms: n(0), seq: n(8) }, entries_read: n(16) }))
}

/// Every group of a stream, by name.
pub(crate) fn list(db: &Db, uid: u64) -> Result<Vec<(Bytes, Group)>, Error> {
    let prefix = group_key(uid, b"");
    let mut out = Vec::new();
    for kv in db.prefix(&prefix) {
        let (k, _) = kv?;
        let name = k.slice(prefix.len()..);
        if let Some(g) = get(db, uid, &name)? {
            out.push((name, g));
        }
    }
    Ok(out)
}

/// Stores a group's state.
pub(crate) fn put(b: &mut WriteBatch, uid: u64, name: &[u8], g: &Group) {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&g.last.ms.to_le_bytes());
    v.extend_from_slice(&g.last.seq.to_le_bytes());
    v.extend_from_slice(&g.entries_read.to_le_bytes());
    b.put(group_key(uid, name), v);
}

/// Deletes a group and its PEL.
pub(crate) fn destroy(db: &Db, b: &mut WriteBatch, uid: u64, name: &[u8]) -> Result<(), Error> {
    b.delete(group_key(uid, name));
    for kv in db.prefix(pel_prefix(uid, name)) {
        b.delete(kv?.0);
    }
    Ok(())
}

/// Deletes every group of a stream and their PELs.
pub(crate) fn destroy_all(db: &Db, b: &mut WriteBatch, uid: u64) -> Result<(), Error> {
    for tag in [b'g', b'p'] {
        let mut prefix = vec![tag];
        prefix.extend_from_slice(&uid.to_be_bytes());
        for kv in db.prefix(prefix) {
            b.delete(kv?.0);
        }
    }
    Ok(())
}

fn decode_pending(key: &[u8], id: StreamId, v: &Bytes) -> Result<Pending, Error> {
    if v.len() < 16 {
        return Err(corrupt(key));
    }
    Ok(Pending {
        id,
        delivered_ms: crate::codec::u64_le(v, 0).unwrap_or_default(),
        deliveries: crate::codec::u64_le(v, 8).unwrap_or_default(),
        consumer: v.slice(16..),
    })
}

/// The PEL entries of a group with `from <= id <= to`, in id order, at most `limit`, only those
/// of `consumer` if given.
pub(crate) fn pending(
    db: &Db,
    uid: u64,
    group: &[u8],
    from: StreamId,
    to: StreamId,
    limit: usize,
    consumer: Option<&[u8]>,
) -> Result<Vec<Pending>, Error> {
    let prefix = pel_prefix(uid, group);
    let lo = pel_key(uid, group, from);
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    for kv in db.scan(lo..) {
        let (k, v) = kv?;
        let Some(rest) = k.strip_prefix(&prefix[..]) else { break };
        let id = StreamId::from_be(rest).ok_or_else(|| corrupt(&k))?;
        if id > to {
            break;
        }
        let p = decode_pending(&k, id, &v)?;
        if consumer.is_none_or(|c| c == &p.consumer[..]) {
            out.push(p);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// One PEL entry.
pub(crate) fn get_pending(
    db: &Db,
    uid: u64,
    group: &[u8],
    id: StreamId,
) -> Result<Option<Pending>, Error> {
    let key = pel_key(uid, group, id);
    match db.get(&key)? {
        Some(v) => Ok(Some(decode_pending(&key, id, &v)?)),
        None => Ok(None),
    }
}

/// Adds or replaces a PEL entry.
pub(crate) fn put_pending(b: &mut WriteBatch, uid: u64, group: &[u8], p: &Pending) {
    let mut v = Vec::with_capacity(16 + p.consumer.len());
    v.extend_from_slice(&p.delivered_ms.to_le_bytes());
    v.extend_from_slice(&p.deliveries.to_le_bytes());
    v.extend_from_slice(&p.consumer);
    b.put(pel_key(uid, group, p.id), v);
}

/// Removes a PEL entry.
pub(crate) fn delete_pending(b: &mut WriteBatch, uid: u64, group: &[u8], id: StreamId) {
    b.delete(pel_key(uid, group, id));
}
