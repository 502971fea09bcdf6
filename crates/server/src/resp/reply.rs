//! Replies of the Redis protocol, encoded as RESP2 or RESP3 per connection.

use bytes::{BufMut, Bytes, BytesMut};

/// One reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// `+OK`.
    Ok,
    /// A status line.
    Status(&'static str),
    /// An error line; the text starts with the error code (`ERR`, `WRONGTYPE`, `NOAUTH`...).
    Error(String),
    /// An integer.
    Int(i64),
    /// A bulk string.
    Bulk(Bytes),
    /// The null reply.
    Nil,
    /// The null array (`*-1` in RESP2), as XREAD sends when nothing arrived.
    NilArray,
    /// An array.
    Array(Vec<Reply>),
    /// A map (RESP3), a flat array of key, value, ... in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// A reply already encoded for the connection's protocol (by the leader, in a cluster).
    Raw(Bytes),
}

impl Reply {
    /// A bulk string of text.
    pub(crate) fn text(s: impl Into<String>) -> Reply {
        Reply::Bulk(Bytes::from(s.into()))
    }

    /// An `ERR` error.
    pub(crate) fn err(msg: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {msg}"))
    }

    /// Appends the encoding for protocol version `proto` (2 or 3).
    pub(crate) fn encode(&self, proto: u8, out: &mut BytesMut) {
        match self {
            Reply::Ok => out.put_slice(b"+OK\r\n"),
            Reply::Status(s) => line(out, b'+', s.as_bytes()),
            Reply::Error(e) => {
                // An error line cannot hold a line break.
                let clean: String =
                    e.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
                line(out, b'-', clean.as_bytes());
            }
            Reply::Int(i) => number(out, b':', *i),
            Reply::Raw(b) => out.put_slice(b),
            Reply::Bulk(b) => {
                number(out, b'$', b.len());
                out.put_slice(b);
                out.put_slice(b"\r\n");
            }
            Reply::Nil if proto >= 3 => out.put_slice(b"_\r\n"),
            Reply::Nil => out.put_slice(b"$-1\r\n"),
            Reply::NilArray if proto >= 3 => out.put_slice(b"_\r\n"),
            Reply::NilArray => out.put_slice(b"*-1\r\n"),
            Reply::Array(items) => {
                number(out, b'*', items.len());
                for i in items {
                    i.encode(proto, out);
                }
            }
            Reply::Map(pairs) => {
                if proto >= 3 {
                    number(out, b'%', pairs.len());
                } else {
                    number(out, b'*', pairs.len() * 2);
                }
                for (k, v) in pairs {
                    k.encode(proto, out);
                    v.encode(proto, out);
                }
            }
        }
    }
}

fn line(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_slice(body);
    out.put_slice(b"\r\n");
}

/// A line holding a number (an integer reply, or a length), formatted without allocating: every
/// bulk reply has one.
fn number(out: &mut BytesMut, tag: u8, n: impl itoa::Integer) {
    line(out, tag, itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(r: &Reply, proto: u8) -> Vec<u8> {
        let mut b = BytesMut::new();
        r.encode(proto, &mut b);
        b.to_vec()
    }

    #[test]
    fn resp2_and_resp3() {
        assert_eq!(enc(&Reply::Nil, 2), b"$-1\r\n");
        assert_eq!(enc(&Reply::Nil, 3), b"_\r\n");
        let m = Reply::Map(vec![(Reply::text("a"), Reply::Int(1))]);
        assert_eq!(enc(&m, 2), b"*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(&m, 3), b"%1\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(&Reply::Error("ERR a\r\nb".into()), 2), b"-ERR a  b\r\n");
        assert_eq!(enc(&Reply::Int(i64::MIN), 2), b":-9223372036854775808\r\n");
        assert_eq!(enc(&Reply::Int(0), 3), b":0\r\n");
        let long = Reply::Bulk(Bytes::from(vec![b'x'; 12345]));
        assert!(enc(&long, 2).starts_with(b"$12345\r\nxxx"));
        assert_eq!(enc(&Reply::Array(vec![Reply::Int(7), Reply::Nil]), 2), b"*2\r\n:7\r\n$-1\r\n");
    }
}
