//! Keyspace commands: strings (GET, SET, GETDEL, MGET, MSET, INCR and its family, APPEND,
//! STRLEN), keys of any kind (DEL, EXISTS, TYPE, KEYS, SCAN, FLUSHDB/FLUSHALL) and expiry
//! (EXPIRE, PEXPIRE, TTL, PTTL, PERSIST). Read-modify-write commands hold the key's stripe lock
//! from their read to their write.

use bytes::Bytes;

use super::{int, not_int, storage, syntax, too_big, upper, R};
use crate::keyspace::{now_ms, Kind, Value};
use crate::resp::args::Args;
use crate::resp::glob;
use crate::resp::reply::Reply;
use crate::resp::session::{Context, Session};

pub(crate) fn get(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    match ctx.keys.get_string(a.arg(0)?).map_err(storage)? {
        Some(v) => Ok(Reply::Bulk(v.data)),
        None => Ok(Reply::Nil),
    }
}

pub(crate) fn getdel(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let key = a.arg(0)?;
    let _g = ctx.keys.lock(key);
    match ctx.keys.get_string(key).map_err(storage)? {
        Some(v) => {
            ctx.keys.delete(&[key]).map_err(storage)?;
            Ok(Reply::Bulk(v.data))
        }
        None => Ok(Reply::Nil),
    }
}

pub(crate) fn del(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let keys: Vec<&[u8]> = a.all().iter().map(|k| &k[..]).collect();
    // Under the keys' locks: a read-modify-write of one of them (INCR) never straddles it.
    let _g = ctx.keys.lock_many(&keys);
    Ok(Reply::Int(ctx.keys.delete(&keys).map_err(storage)? as i64))
}

pub(crate) fn exists(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let mut n = 0;
    for k in a.all() {
        if ctx.keys.get(k).map_err(storage)?.is_some() {
            n += 1;
        }
    }
    Ok(Reply::Int(n))
}

pub(crate) fn mget(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let mut out = Vec::with_capacity(a.len());
    for k in a.all() {
        match ctx.keys.get(k).map_err(storage)? {
            Some(v) if v.kind == Kind::String => out.push(Reply::Bulk(v.data)),
            _ => out.push(Reply::Nil),
        }
    }
    Ok(Reply::Array(out))
}

pub(crate) fn mset(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let pairs = a.all();
    if !pairs.len().is_multiple_of(2) {
        return Err(a.arity_error());
    }
    let items: Vec<(&[u8], Value)> = pairs
        .chunks_exact(2)
        .filter_map(|kv| match kv {
            [k, v] => Some((&k[..], Value::string(v.clone()))),
            _ => None,
        })
        .collect();
    if let Some((_, v)) = items.iter().find(|(_, v)| v.data.len() > ctx.max_value) {
        return Err(too_big(v.data.len(), ctx.max_value));
    }
    let keys: Vec<&[u8]> = items.iter().map(|(k, _)| *k).collect();
    let _g = ctx.keys.lock_many(&keys);
    ctx.keys.set_many(&items).map_err(storage)?;
    Ok(Reply::Ok)
}

pub(crate) fn incr(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    incr_by(ctx, a.arg(0)?, 1)
}

pub(crate) fn decr(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    incr_by(ctx, a.arg(0)?, -1)
}

pub(crate) fn incrby(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let key = a.arg(0)?;
    incr_by(ctx, key, int(a.arg(1)?).ok_or_else(not_int)?)
}

pub(crate) fn decrby(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let key = a.arg(0)?;
    incr_by(ctx, key, int(a.arg(1)?).and_then(|d| d.checked_neg()).ok_or_else(not_int)?)
}

fn incr_by(ctx: &Context<'_>, key: &Bytes, delta: i64) -> R {
    let _g = ctx.keys.lock(key);
    let (cur, expire_at) = match ctx.keys.get_string(key).map_err(storage)? {
        None => (0, None),
        Some(v) => (int(&v.data).ok_or_else(not_int)?, v.expire_at),
    };
    let Some(n) = cur.checked_add(delta) else {
        return Err(Reply::err("increment or decrement would overflow"));
    };
    ctx.keys.set(key, &Value { expire_at, ..Value::string(n.to_string()) }).map_err(storage)?;
    Ok(Reply::Int(n))
}

pub(crate) fn append(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let (key, tail) = (a.arg(0)?, a.arg(1)?);
    let _g = ctx.keys.lock(key);
    let cur = ctx.keys.get_string(key).map_err(storage)?;
    let (mut data, expire_at) = cur.map_or((Vec::new(), None), |v| (v.data.to_vec(), v.expire_at));
    if data.len() + tail.len() > ctx.max_value {
        return Err(too_big(data.len() + tail.len(), ctx.max_value));
    }
    data.extend_from_slice(tail);
    let n = data.len();
    ctx.keys.set(key, &Value { expire_at, ..Value::string(data) }).map_err(storage)?;
    Ok(Reply::Int(n as i64))
}

pub(crate) fn strlen(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let v = ctx.keys.get_string(a.arg(0)?).map_err(storage)?;
    Ok(Reply::Int(v.map_or(0, |v| v.data.len() as i64)))
}

/// EXPIRE and PEXPIRE (by the command's name).
pub(crate) fn expire(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let key = a.arg(0)?;
    let n = int(a.arg(1)?).ok_or_else(not_int)?;
    let ms = if a.name() == "expire" { n.checked_mul(1000) } else { Some(n) };
    let Some(at) = ms.and_then(|ms| (now_ms() as i64).checked_add(ms)) else {
        return Err(Reply::err(format!("invalid expire time in '{}' command", a.name())));
    };
    let _g = ctx.keys.lock(key);
    match ctx.keys.get(key).map_err(storage)? {
        Some(_) if at <= now_ms() as i64 => {
            ctx.keys.delete(&[key]).map_err(storage)?;
            Ok(Reply::Int(1))
        }
        Some(v) => {
            ctx.keys.set(key, &Value { expire_at: Some(at as u64), ..v }).map_err(storage)?;
            Ok(Reply::Int(1))
        }
        None => Ok(Reply::Int(0)),
    }
}

/// TTL and PTTL (by the command's name).
pub(crate) fn ttl(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    Ok(match ctx.keys.get(a.arg(0)?).map_err(storage)? {
        None => Reply::Int(-2),
        Some(Value { expire_at: None, .. }) => Reply::Int(-1),
        Some(Value { expire_at: Some(at), .. }) => {
            let ms = at.saturating_sub(now_ms()) as i64;
            Reply::Int(if a.name() == "ttl" { (ms + 500) / 1000 } else { ms })
        }
    })
}

pub(crate) fn persist(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let key = a.arg(0)?;
    let _g = ctx.keys.lock(key);
    match ctx.keys.get(key).map_err(storage)? {
        Some(v) if v.expire_at.is_some() => {
            ctx.keys.set(key, &Value { expire_at: None, ..v }).map_err(storage)?;
            Ok(Reply::Int(1))
        }
        _ => Ok(Reply::Int(0)),
    }
}

pub(crate) fn keys(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let pattern = a.arg(0)?;
    let mut out = Vec::new();
    ctx.keys
        .each_key(|k| {
            if glob::matches(pattern, &k) {
                out.push(Reply::Bulk(k));
            }
        })
        .map_err(storage)?;
    Ok(Reply::Array(out))
}

pub(crate) fn type_of(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    Ok(match ctx.keys.get(a.arg(0)?).map_err(storage)? {
        Some(v) => Reply::Status(v.kind.name()),
        None => Reply::Status("none"),
    })
}

/// FLUSHDB and FLUSHALL, with or without SYNC / ASYNC.
pub(crate) fn flush(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    match a.all() {
        [] => {}
        [m] if matches!(upper(m).as_str(), "SYNC" | "ASYNC") => {}
        _ => return Err(syntax()),
    }
    ctx.keys.clear().map_err(storage)?;
    Ok(Reply::Ok)
}

pub(crate) fn set(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let (key, data) = (a.arg(0)?, a.arg(1)?);
    if data.len() > ctx.max_value {
        return Err(too_big(data.len(), ctx.max_value));
    }
    let (mut nx, mut xx, mut get, mut keepttl) = (false, false, false, false);
    let mut expire_at: Option<u64> = None;
    let mut opts = a.from(2).iter();
    while let Some(opt) = opts.next() {
        let opt = upper(opt);
        match opt.as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GET" => get = true,
            "KEEPTTL" => keepttl = true,
            "EX" | "PX" | "EXAT" | "PXAT" => {
                let Some(n) = opts.next().filter(|_| expire_at.is_none()) else {
                    return Err(syntax());
                };
                let n = int(n).ok_or_else(not_int)?;
                let at = match opt.as_str() {
                    "EX" => n.checked_mul(1000).and_then(|ms| ms.checked_add(now_ms() as i64)),
                    "PX" => n.checked_add(now_ms() as i64),
                    "EXAT" => n.checked_mul(1000),
                    _ => Some(n),
                };
                match at {
                    Some(at) if n > 0 => expire_at = Some(at as u64),
                    _ => return Err(Reply::err("invalid expire time in 'set' command")),
                }
            }
            _ => return Err(syntax()),
        }
    }
    if (nx && xx) || (keepttl && expire_at.is_some()) {
        return Err(syntax());
    }
    let _g = ctx.keys.lock(key);
    let old = if nx || xx || get || keepttl {
        // SET overwrites a key of any kind, but SET ... GET needs the old value to be a string.
        if get { ctx.keys.get_string(key) } else { ctx.keys.get(key) }.map_err(storage)?
    } else {
        None
    };
    let old_reply = || old.as_ref().map_or(Reply::Nil, |v| Reply::Bulk(v.data.clone()));
    if (nx && old.is_some()) || (xx && old.is_none()) {
        return Ok(if get { old_reply() } else { Reply::Nil });
    }
    if keepttl {
        expire_at = old.as_ref().and_then(|v| v.expire_at);
    }
    ctx.keys.set(key, &Value { expire_at, ..Value::string(data.clone()) }).map_err(storage)?;
    Ok(if get { old_reply() } else { Reply::Ok })
}

pub(crate) fn scan(ctx: &Context<'_>, _: &mut Session, a: Args<'_>) -> R {
    let cursor = std::str::from_utf8(a.arg(0)?).ok().and_then(|s| s.parse::<u64>().ok());
    let Some(cursor) = cursor else { return Err(Reply::err("invalid cursor")) };
    let mut pattern: Option<&Bytes> = None;
    let mut count = 10usize;
    let mut opts = a.from(1).iter();
    while let Some(opt) = opts.next() {
        match (upper(opt).as_str(), opts.next()) {
            ("MATCH", Some(p)) => pattern = Some(p),
            ("COUNT", Some(c)) => match int(c) {
                Some(c) if c > 0 => count = c as usize,
                Some(_) => return Err(syntax()),
                None => return Err(not_int()),
            },
            ("TYPE", Some(_)) => {}
            _ => return Err(syntax()),
        }
    }
    let after = match cursor {
        0 => None,
        c => Some(ctx.keys.cursor(c).ok_or_else(|| Reply::err("invalid cursor"))?),
    };
    let (keys, next) = ctx.keys.keys(after.as_deref(), count).map_err(storage)?;
    let next = next.map_or(0, |k| ctx.keys.cursor_for(k));
    let keys = keys
        .into_iter()
        .filter(|k| pattern.is_none_or(|p| glob::matches(p, k)))
        .map(Reply::Bulk)
        .collect();
    Ok(Reply::Array(vec![Reply::text(next.to_string()), Reply::Array(keys)]))
}
