//! Redis glob patterns for `KEYS` and `SCAN MATCH`: `*`, `?`, `[abc]`, `[^a-z]`, `\x`.

/// Whether `s` matches `pattern`.
pub(crate) fn matches(pattern: &[u8], s: &[u8]) -> bool {
    let (mut pat, mut rest) = (pattern, s);
    // Where to resume after the last `*`: the pattern after it, and the string from where its
    // match ends so far.
    let mut star: Option<(&[u8], &[u8])> = None;
    while let Some((&c, tail)) = rest.split_first() {
        // The pattern after matching `c`, if its front matches `c`.
        let step = match pat {
            [b'*', after @ ..] => {
                star = Some((after, rest));
                pat = after;
                continue;
            }
            [b'?', after @ ..] => Some(after),
            [b'[', after @ ..] => match class(after, c) {
                Some((hit, after_class)) => hit.then_some(after_class),
                // Not closed: a literal `[`.
                None => (c == b'[').then_some(after),
            },
            [b'\\', escaped, after @ ..] => (*escaped == c).then_some(after),
            [x, after @ ..] => (*x == c).then_some(after),
            [] => None,
        };
        match (step, star) {
            (Some(after), _) => {
                pat = after;
                rest = tail;
            }
            (None, Some((after_star, covered))) => {
                // Let the star cover one more byte.
                let covered = covered.get(1..).unwrap_or_default();
                star = Some((after_star, covered));
                pat = after_star;
                rest = covered;
            }
            (None, None) => return false,
        }
    }
    pat.iter().all(|&c| c == b'*')
}

/// Matches `c` against the class whose body (after `[`) starts `body`: (matched, the pattern
/// after its `]`), or `None` if the class is not closed.
fn class(body: &[u8], c: u8) -> Option<(bool, &[u8])> {
    let (negate, mut rest) = match body {
        [b'^', after @ ..] => (true, after),
        _ => (false, body),
    };
    let mut hit = false;
    let mut first = true;
    loop {
        match rest {
            [b']', after @ ..] if !first => return Some((hit != negate, after)),
            [b'\\', escaped, after @ ..] => {
                hit |= *escaped == c;
                rest = after;
            }
            [a, b'-', z, after @ ..] if *z != b']' => {
                hit |= (*a.min(z)..=*a.max(z)).contains(&c);
                rest = after;
            }
            [x, after @ ..] => {
                hit |= *x == c;
                rest = after;
            }
            [] => return None,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::{class, matches};
    use proptest::prelude::*;

    /// Exhaustive backtracking: every way a star can split the string.
    fn reference(p: &[u8], s: &[u8]) -> bool {
        let Some((&c, tail)) = s.split_first() else { return p.iter().all(|&x| x == b'*') };
        match p {
            [b'*', after @ ..] => (0..=s.len()).any(|i| reference(after, &s[i..])),
            [b'?', after @ ..] => reference(after, tail),
            [b'[', body @ ..] => match class(body, c) {
                Some((hit, after)) => hit && reference(after, tail),
                None => c == b'[' && reference(body, tail),
            },
            [b'\\', e, after @ ..] => *e == c && reference(after, tail),
            [x, after @ ..] => *x == c && reference(after, tail),
            [] => false,
        }
    }

    proptest! {
        #[test]
        fn agrees_with_exhaustive_backtracking(
            p in prop::collection::vec(prop::sample::select(b"ab*?[]^-\\".to_vec()), 0..10),
            s in prop::collection::vec(prop::sample::select(b"ab[]-*".to_vec()), 0..10),
        ) {
            prop_assert_eq!(matches(&p, &s), reference(&p, &s));
        }
    }

    #[test]
    fn redis_globs() {
        let m = |p: &str, s: &str| matches(p.as_bytes(), s.as_bytes());
        assert!(m("*", "anything") && m("*", ""));
        assert!(m("h?llo", "hello") && !m("h?llo", "hllo"));
        assert!(m("h*llo", "heeeello") && m("h*llo", "hllo"));
        assert!(m("h[ae]llo", "hallo") && !m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo") && !m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo") && !m("h[a-b]llo", "hcllo"));
        assert!(m("user:*:name", "user:42:name") && !m("user:*:name", "user:42:age"));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "axb"));
        assert!(m("*a*b*", "xxaxxbxx") && !m("*a*b*", "xxbxxaxx"));
    }
}
