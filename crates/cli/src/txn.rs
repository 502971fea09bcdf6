//! `timber txn`: a conditional transaction from the command line. Comparisons are `--if`
//! arguments, `KEY = VALUE`, `KEY != VALUE`, `KEY < VALUE`, `KEY > VALUE`, `KEY exists`, `KEY
//! missing` or `KEY version = N` (or `!=`, `<`, `>`; `timber kv get --json` prints versions);
//! operations are `--then` (when every comparison holds) and `--else` arguments, `put KEY
//! VALUE`, `del KEY` or `get KEY`. A key is one word; a value is the rest of the argument
//! (possibly empty).

use timber_client::{Cmp, Txn};

/// A comparison added to `t`, parsed from `s`.
pub(crate) fn compare(t: Txn, s: &str) -> Result<Txn, String> {
    let (key, rest) = split(s).ok_or_else(|| format!("empty comparison {s:?}"))?;
    if rest == "exists" {
        return Ok(t.when_exists(key.to_string(), true));
    }
    if rest == "missing" {
        return Ok(t.when_exists(key.to_string(), false));
    }
    let (first, tail) = split(rest).ok_or_else(|| bad_compare(s))?;
    let (op, value, version) = match first {
        "version" => {
            let (op, n) = split(tail).ok_or_else(|| bad_compare(s))?;
            let n = n.parse::<u64>().map_err(|_| bad_compare(s))?;
            (op, "", Some(n))
        }
        op => (op, tail, None),
    };
    let cmp = match op {
        "=" | "==" => Cmp::Equal,
        "!=" => Cmp::NotEqual,
        "<" => Cmp::Less,
        ">" => Cmp::Greater,
        _ => return Err(bad_compare(s)),
    };
    Ok(match version {
        Some(n) => t.when_version(key.to_string(), cmp, n),
        None => t.when_value(key.to_string(), cmp, value.to_string()),
    })
}

fn bad_compare(s: &str) -> String {
    format!(
        "bad comparison {s:?}: expected KEY = VALUE (or != < >), KEY exists, KEY missing or \
         KEY version = N"
    )
}

/// An operation added to `t` (to its success operations if `then`, else to its failure
/// ones), parsed from `s`.
pub(crate) fn operation(t: Txn, s: &str, then: bool) -> Result<Txn, String> {
    let bad = || format!("bad operation {s:?}: expected put KEY VALUE, del KEY or get KEY");
    let (verb, rest) = split(s).ok_or_else(bad)?;
    let one_key = |rest: &str| match split(rest) {
        Some((k, "")) => Ok(k.to_string()),
        _ => Err(bad()),
    };
    Ok(match (verb, then) {
        ("put", _) => {
            let (key, value) = split(rest).ok_or_else(bad)?;
            let (key, value) = (key.to_string(), value.to_string());
            if then {
                t.then_put(key, value)
            } else {
                t.else_put(key, value)
            }
        }
        ("del", true) => t.then_delete(one_key(rest)?),
        ("del", false) => t.else_delete(one_key(rest)?),
        ("get", true) => t.then_get(one_key(rest)?),
        ("get", false) => t.else_get(one_key(rest)?),
        _ => return Err(bad()),
    })
}

/// The first word of `s` and the rest (trimmed at the start); `None` if `s` is blank.
fn split(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    Some(match s.find(char::is_whitespace) {
        Some(at) => (&s[..at], s[at..].trim_start()),
        None => (s, ""),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_into_comparisons_and_operations() {
        let t = compare(Txn::new(), "k = hello world").unwrap();
        let t = compare(t, "n exists").unwrap();
        let t = compare(t, "m missing").unwrap();
        let t = compare(t, "a < b").unwrap();
        let t = compare(t, "k version = 7").unwrap();
        let t = compare(t, "k version > 3").unwrap();
        let t = operation(t, "put k v with spaces", true).unwrap();
        let t = operation(t, "del n", true).unwrap();
        let t = operation(t, "get k", false).unwrap();
        let want = Txn::new()
            .when_value("k", Cmp::Equal, "hello world")
            .when_exists("n", true)
            .when_exists("m", false)
            .when_value("a", Cmp::Less, "b")
            .when_version("k", Cmp::Equal, 7)
            .when_version("k", Cmp::Greater, 3)
            .then_put("k", "v with spaces")
            .then_delete("n")
            .else_get("k");
        assert_eq!(format!("{t:?}"), format!("{want:?}"));
        for bad in ["", "k", "k ~ v", "k exists now", "k version", "k version = x", "k version ="] {
            assert!(compare(Txn::new(), bad).is_err(), "{bad:?}");
        }
        for bad in ["", "put", "del", "del a b", "get", "set k v"] {
            assert!(operation(Txn::new(), bad, true).is_err(), "{bad:?}");
        }
    }
}
