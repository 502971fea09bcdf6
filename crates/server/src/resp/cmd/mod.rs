//! The handlers of the Redis-protocol commands, one module per group: connection and server
//! commands (`server`), keyspace commands (`keys`), the batched forms of pipelined SET/INCR and
//! GET runs (`batch`), and stream commands (`streams`). Each command is declared once, with its
//! arity and flags, in [`super::table`]; handlers get their arguments as [`super::args::Args`]
//! and reply with Redis's error texts.

pub(crate) mod batch;
pub(crate) mod keys;
pub(crate) mod server;
pub(crate) mod streams;

use super::reply::Reply;

/// A handler's outcome: the reply, or the error reply (`?` on argument accessors).
pub(crate) type R<T = Reply> = Result<T, Reply>;

/// A Redis integer argument (no sign prefix `+`, no leading zeros).
pub(crate) fn int(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty()
        || s.starts_with('+')
        || (s.len() > 1 && s.starts_with('0'))
        || s.starts_with("-0")
    {
        return None;
    }
    s.parse().ok()
}

/// An argument in upper case, for option names.
pub(crate) fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

pub(crate) fn not_int() -> Reply {
    Reply::err("value is not an integer or out of range")
}

pub(crate) fn syntax() -> Reply {
    Reply::err("syntax error")
}

/// The reply to a failed keyspace operation (WRONGTYPE as Redis sends it; the rest logged).
pub(crate) fn storage(e: crate::keyspace::Error) -> Reply {
    use crate::keyspace::Error;
    if let Error::WrongType | Error::NotLeader { .. } | Error::ClusterDown(_) = e {
        return Reply::Error(e.to_string());
    }
    if let Error::TooLarge(m) = e {
        return Reply::err(m);
    }
    tracing::error!(error = %e, "storage error");
    Reply::err(format!("storage error: {e}"))
}

pub(crate) fn too_big(len: usize, max: usize) -> Reply {
    Reply::err(format!("value of {len} bytes exceeds the limit of {max} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_parsed_as_redis_does() {
        assert_eq!(int(b"42"), Some(42));
        assert_eq!(int(b"-7"), Some(-7));
        assert_eq!(int(b"0"), Some(0));
        for bad in [&b""[..], b"+1", b"01", b"-0", b"1.5", b"x", b"99999999999999999999"] {
            assert_eq!(int(bad), None, "{bad:?}");
        }
    }
}
