//! Requests off a connection's input buffer: RESP arrays of bulk strings (what every Redis client
//! sends) and inline commands (what a person types into telnet).
//!
//! An array is parsed in one pass over the buffered bytes, and its arguments are slices of one
//! frozen buffer, so no argument is copied. Declared sizes are checked against the request limit
//! as soon as their headers arrive, before the bytes they announce.
//!
//! Invariant: `parse` consumes bytes only when it returns a whole request, or blank lines (which
//! it skips); on `Incomplete` and `Bad` the buffer is otherwise left as it was.

use bytes::{Bytes, BytesMut};

/// What the front of a connection's input buffer holds.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// One whole request, taken off the buffer.
    Request(Vec<Bytes>),
    /// Not yet a whole request.
    Incomplete,
    /// Not a valid request: the reply is this error and the connection ends.
    Bad(String),
}

/// Why an array cannot be taken off the buffer (yet).
enum Stop {
    Incomplete,
    Bad(String),
}

/// Takes one request off the front of `buf`. `max` bounds a request's declared size in bytes.
pub(crate) fn parse(buf: &mut BytesMut, max: usize) -> Parsed {
    loop {
        if buf.is_empty() {
            return Parsed::Incomplete;
        }
        if buf.first() == Some(&b'*') {
            return match array(buf, max) {
                Ok((end, ranges)) => {
                    let frame = buf.split_to(end).freeze();
                    Parsed::Request(ranges.into_iter().map(|(s, e)| frame.slice(s..e)).collect())
                }
                Err(Stop::Incomplete) => Parsed::Incomplete,
                Err(Stop::Bad(e)) => Parsed::Bad(e),
            };
        }
        let Some(end) = buf.iter().position(|&c| c == b'\n') else { return Parsed::Incomplete };
        let line = buf.split_to(end + 1);
        let text = line.strip_suffix(b"\r\n").or_else(|| line.strip_suffix(b"\n")).unwrap_or(&line);
        let args: Vec<Bytes> = text
            .split(|c| *c == b' ' || *c == b'\t')
            .filter(|a| !a.is_empty())
            .map(Bytes::copy_from_slice)
            .collect();
        if !args.is_empty() {
            return Parsed::Request(args);
        }
        // An empty line: skip it, as Redis does.
    }
}

/// The end of the array at the front of `buf` and the byte ranges of its arguments.
fn array(buf: &[u8], max: usize) -> Result<(usize, Vec<(usize, usize)>), Stop> {
    let too_big = || Stop::Bad(format!("Protocol error: request larger than {max} bytes"));
    let (n, mut at) = header(buf, 0, "multibulk")?;
    if n > (max / 4) as i64 {
        return Err(too_big());
    }
    if n < 0 {
        return Err(Stop::Bad("Protocol error: invalid multibulk length".into()));
    }
    // Room for the arguments the buffer can hold (each takes at least `$0\r\n\r\n`), not for
    // the count a header declares.
    let mut ranges = Vec::with_capacity((n as usize).min((buf.len() - at) / 6));
    for _ in 0..n {
        match buf.get(at) {
            None => return Err(Stop::Incomplete),
            Some(b'$') => {}
            Some(&c) => {
                return Err(Stop::Bad(format!(
                    "Protocol error: expected '$', got '{}'",
                    char::from(c).escape_default()
                )))
            }
        }
        let (len, start) = header(buf, at, "bulk")?;
        if len > max as i64 {
            return Err(too_big());
        }
        if len < 0 {
            return Err(Stop::Bad("Protocol error: invalid bulk length".into()));
        }
        let end = start + len as usize;
        match buf.get(end..end + 2) {
            None => return Err(Stop::Incomplete),
            Some(b"\r\n") => {}
            Some(_) => {
                return Err(Stop::Bad("Protocol error: bulk string not ended by CRLF".into()))
            }
        }
        ranges.push((start, end));
        at = end + 2;
    }
    Ok((at, ranges))
}

/// The integer of the header line starting at `at` (`*<n>\r\n` or `$<n>\r\n`) and the offset
/// after it.
fn header(buf: &[u8], at: usize, what: &str) -> Result<(i64, usize), Stop> {
    let bad = || Stop::Bad(format!("Protocol error: invalid {what} length"));
    let rest = buf.get(at + 1..).unwrap_or_default();
    let Some(nl) = rest.iter().position(|&c| c == b'\n') else {
        // A header is at most a sign and 19 digits: anything longer is not one.
        return Err(if rest.len() > 21 { bad() } else { Stop::Incomplete });
    };
    let digits = rest.split_at(nl).0.strip_suffix(b"\r").ok_or_else(bad)?;
    let (neg, digits) = match digits.split_first() {
        Some((b'-', d)) => (true, d),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let n = digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Ok((if neg { -n } else { n }, at + 1 + nl + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(args: &[Vec<u8>]) -> Vec<u8> {
        let mut b = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            b.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            b.extend_from_slice(a);
            b.extend_from_slice(b"\r\n");
        }
        b
    }

    #[test]
    fn parses_pipelined_arrays_and_inline_commands() {
        let mut b =
            BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n\r\n*1\r\n$4\r\nPI"[..]);
        assert!(
            matches!(parse(&mut b, 1024), Parsed::Request(a) if a == [Bytes::from("GET"), Bytes::from("k")])
        );
        assert!(matches!(parse(&mut b, 1024), Parsed::Request(a) if a == [Bytes::from("PING")]));
        assert!(matches!(parse(&mut b, 1024), Parsed::Incomplete));
        assert_eq!(&b[..], b"*1\r\n$4\r\nPI", "an incomplete request stays buffered");
        let mut b = BytesMut::from(&b"*0\r\n"[..]);
        assert!(matches!(parse(&mut b, 1024), Parsed::Request(a) if a.is_empty()));
        assert!(b.is_empty());
    }

    #[test]
    fn malformed_arrays_are_refused_with_the_reason() {
        for (input, why) in [
            (&b"*1\r\n:5\r\n"[..], "expected '$', got ':'"),
            (b"*x\r\n", "invalid multibulk length"),
            (b"*-1\r\n", "invalid multibulk length"),
            (b"*1\r\n$-1\r\n", "invalid bulk length"),
            (b"*1\r\n$2\nab\r\n", "invalid bulk length"),
            (b"*1\r\n$2\r\nabc\r\n", "not ended by CRLF"),
            (b"*1\r\n$99999999999999999999\r\n", "invalid bulk length"),
            (b"*123456789012345678901234", "invalid multibulk length"),
        ] {
            let mut b = BytesMut::from(input);
            match parse(&mut b, 1024) {
                Parsed::Bad(e) => assert!(e.contains(why), "{input:?}: {e}"),
                other => panic!("{input:?}: {other:?}"),
            }
            assert_eq!(&b[..], input, "a bad request leaves the buffer as it was");
        }
    }

    /// A declared size over the limit is refused before the bytes arrive.
    #[test]
    fn declared_sizes_over_the_limit_are_refused_early() {
        let mut b = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$2000\r\nab"[..]);
        assert!(matches!(parse(&mut b, 1024), Parsed::Bad(e) if e.contains("larger than 1024")));
        let mut b = BytesMut::from(&b"*300\r\n"[..]);
        assert!(matches!(parse(&mut b, 1024), Parsed::Bad(e) if e.contains("larger than 1024")));
    }

    /// Found by the fuzzer: the argument count a header declares was allocated for before any
    /// argument arrived (`*22220220\r\n` took 355 MB; with a limit near `usize::MAX`, a count
    /// of 18 digits overflowed the allocation).
    #[test]
    fn a_declared_count_is_not_allocated_up_front() {
        let mut b = BytesMut::from(&b"*22220220\r\n"[..]);
        assert!(matches!(parse(&mut b, 512 << 20), Parsed::Incomplete));
        let mut b = BytesMut::from(&b"*999999999999999999\r\n"[..]);
        assert!(matches!(parse(&mut b, usize::MAX), Parsed::Incomplete));
    }

    proptest! {
        /// Any array of byte strings, cut anywhere, is `Incomplete` until its last byte arrives
        /// and then exactly its arguments; the bytes after it stay buffered.
        #[test]
        fn arrays_roundtrip_at_any_cut(
            args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let whole = request(&args);
            let k = cut.index(whole.len());
            let mut b = BytesMut::from(&whole[..k]);
            prop_assert!(matches!(parse(&mut b, 1 << 20), Parsed::Incomplete));
            prop_assert_eq!(b.len(), k);
            b.extend_from_slice(&whole[k..]);
            b.extend_from_slice(b"*1\r\n");
            match parse(&mut b, 1 << 20) {
                Parsed::Request(got) => {
                    let got: Vec<Vec<u8>> = got.iter().map(|a| a.to_vec()).collect();
                    prop_assert_eq!(got, args);
                }
                other => prop_assert!(false, "{:?}", other),
            }
            prop_assert_eq!(&b[..], b"*1\r\n");
        }

        /// Random bytes never panic, and whatever they are taken for consumes only whole
        /// requests.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = BytesMut::from(&bytes[..]);
            let mut rounds = 0;
            while let Parsed::Request(_) = parse(&mut b, 1024) {
                rounds += 1;
                prop_assert!(rounds <= bytes.len());
            }
        }

        /// What the parser takes an array of bulk strings for agrees with a general RESP2
        /// decoder (`redis-protocol`), on intact and on damaged requests.
        #[test]
        fn agrees_with_a_general_decoder(
            args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..5),
            flip in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
        ) {
            use redis_protocol::resp2::{decode::decode_bytes_mut, types::BytesFrame};
            let mut bytes = request(&args);
            if let Some((i, v)) = flip {
                let i = i.index(bytes.len());
                bytes[i] = v;
            }
            let reference = match decode_bytes_mut(&mut BytesMut::from(&bytes[..])) {
                Ok(Some((BytesFrame::Array(items), _, _))) => items
                    .into_iter()
                    .map(|f| match f {
                        BytesFrame::BulkString(b) => Some(b.to_vec()),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>(),
                _ => None,
            };
            let ours = match parse(&mut BytesMut::from(&bytes[..]), 1 << 20) {
                Parsed::Request(a) if bytes[0] == b'*' => Some(a.iter().map(|a| a.to_vec()).collect()),
                _ => None,
            };
            // Whatever this parser accepts, the general decoder reads the same way. The decoder
            // is more lenient (it skips the byte after a header's `\r` unseen, as Redis does),
            // so a damaged request it accepts may be refused here; an intact one never is.
            if ours.is_some() || flip.is_none() {
                prop_assert_eq!(ours, reference);
            }
        }
    }
}
