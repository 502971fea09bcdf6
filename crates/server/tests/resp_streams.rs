//! End-to-end tests of Redis streams on the real `timberd` binary through the `redis` crate:
//! ids and their ordering rules, ranges, trimming, blocking reads woken from another
//! connection, consumer groups with acknowledgement and redelivery, RESP3, pipelining, and
//! persistence across graceful restarts and SIGKILL.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::Timberd;
use redis::{cmd, RedisResult, Value};

fn err_text<T: std::fmt::Debug>(r: RedisResult<T>) -> String {
    let e = r.unwrap_err();
    format!("{} {}", e.code().unwrap_or(""), e.detail().unwrap_or(""))
}

type Entries = Vec<(String, Vec<String>)>;

fn xadd(c: &mut redis::Connection, key: &str, id: &str, fields: &[&str]) -> RedisResult<String> {
    cmd("XADD").arg(key).arg(id).arg(fields).query(c)
}

/// The entries of `key` in an XREAD reply.
fn take(reply: Vec<(String, Entries)>, key: &str) -> Entries {
    reply.into_iter().find(|(k, _)| k == key).map(|(_, e)| e).unwrap()
}

fn parse_id(s: &str) -> (u64, u64) {
    let (a, b) = s.split_once('-').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

fn range(c: &mut redis::Connection, key: &str, lo: &str, hi: &str) -> Vec<String> {
    let es: Entries = cmd("XRANGE").arg(key).arg(lo).arg(hi).query(c).unwrap();
    es.into_iter().map(|(id, _)| id).collect()
}

#[test]
fn ids_ranges_and_trimming() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let mut c = t.client();

    // Explicit, partial and automatic ids, and Redis's ordering rules.
    assert_eq!(xadd(&mut c, "s", "1-1", &["f", "v1"]).unwrap(), "1-1");
    assert_eq!(xadd(&mut c, "s", "1-*", &["f", "v2"]).unwrap(), "1-2");
    assert_eq!(xadd(&mut c, "s", "5", &["f", "v3"]).unwrap(), "5-0");
    assert!(err_text(xadd(&mut c, "s", "5-0", &["f", "x"])).contains("equal or smaller"));
    assert!(err_text(xadd(&mut c, "s", "4-*", &["f", "x"])).contains("equal or smaller"));
    assert!(err_text(xadd(&mut c, "s2", "0-0", &["f", "x"])).contains("greater than 0-0"));
    assert!(err_text(xadd(&mut c, "s", "abc", &["f", "x"])).contains("Invalid stream ID"));
    assert!(err_text(cmd("XADD").arg("s").arg("*").arg("lonely").query::<String>(&mut c))
        .contains("wrong number of arguments"));
    let auto = xadd(&mut c, "s", "*", &["f", "v4", "g", "w4"]).unwrap();
    let (ms, seq) = auto.split_once('-').unwrap();
    assert!(ms.parse::<u64>().unwrap() > 5 && seq == "0", "{auto}");
    assert_eq!(cmd("XLEN").arg("s").query::<i64>(&mut c).unwrap(), 4);
    assert_eq!(cmd("XLEN").arg("missing").query::<i64>(&mut c).unwrap(), 0);

    // Ranges: inclusive, exclusive, partial ids, COUNT, reverse.
    assert_eq!(range(&mut c, "s", "-", "+"), ["1-1", "1-2", "5-0", auto.as_str()]);
    assert_eq!(range(&mut c, "s", "1", "1"), ["1-1", "1-2"]);
    assert_eq!(range(&mut c, "s", "(1-1", "5"), ["1-2", "5-0"]);
    assert_eq!(range(&mut c, "s", "2", "4"), Vec::<String>::new());
    assert_eq!(range(&mut c, "missing", "-", "+"), Vec::<String>::new());
    let es: Entries =
        cmd("XRANGE").arg("s").arg("-").arg("+").arg("COUNT").arg(2).query(&mut c).unwrap();
    assert_eq!(
        es,
        [
            ("1-1".into(), vec!["f".into(), "v1".into()]),
            ("1-2".into(), vec!["f".into(), "v2".into()])
        ]
    );
    let es: Entries =
        cmd("XREVRANGE").arg("s").arg("+").arg("-").arg("COUNT").arg(2).query(&mut c).unwrap();
    assert_eq!(es[0], (auto.clone(), vec!["f".into(), "v4".into(), "g".into(), "w4".into()]));
    assert_eq!(es[1].0, "5-0");
    let es: Entries = cmd("XREVRANGE").arg("s").arg("5").arg("(1-1").query(&mut c).unwrap();
    assert_eq!(es.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["5-0", "1-2"]);

    // Types: strings and streams keep to their own commands.
    let _: () = cmd("SET").arg("str").arg("v").query(&mut c).unwrap();
    assert!(err_text(xadd(&mut c, "str", "*", &["f", "v"])).contains("WRONGTYPE"));
    assert!(err_text(cmd("XRANGE").arg("str").arg("-").arg("+").query::<Value>(&mut c))
        .contains("WRONGTYPE"));
    assert!(err_text(cmd("GET").arg("s").query::<Value>(&mut c)).contains("WRONGTYPE"));
    assert!(err_text(cmd("INCR").arg("s").query::<Value>(&mut c)).contains("WRONGTYPE"));
    assert_eq!(cmd("TYPE").arg("s").query::<String>(&mut c).unwrap(), "stream");
    assert_eq!(cmd("EXISTS").arg("s").query::<i64>(&mut c).unwrap(), 1);

    // XDEL is refused; stored entries are untouched.
    assert!(err_text(cmd("XDEL").arg("s").arg("1-1").query::<i64>(&mut c)).contains("append-only"));
    assert_eq!(cmd("XLEN").arg("s").query::<i64>(&mut c).unwrap(), 4);

    // Trimming, and ids keep growing after the stream was emptied.
    assert_eq!(cmd("XTRIM").arg("s").arg("MINID").arg("1-2").query::<i64>(&mut c).unwrap(), 1);
    assert_eq!(range(&mut c, "s", "-", "+")[0], "1-2");
    assert_eq!(
        cmd("XTRIM").arg("s").arg("MAXLEN").arg("~").arg(2).query::<i64>(&mut c).unwrap(),
        1
    );
    assert_eq!(cmd("XLEN").arg("s").query::<i64>(&mut c).unwrap(), 2);
    assert_eq!(cmd("XTRIM").arg("s").arg("MAXLEN").arg(0).query::<i64>(&mut c).unwrap(), 2);
    assert_eq!(cmd("XLEN").arg("s").query::<i64>(&mut c).unwrap(), 0);
    assert!(err_text(xadd(&mut c, "s", "5-1", &["f", "x"])).contains("equal or smaller"));
    assert!(
        err_text(cmd("XTRIM").arg("s").arg("MAXLEN").arg(-1).query::<i64>(&mut c)).contains(">= 0")
    );

    // XADD with NOMKSTREAM and MAXLEN.
    let none: Option<String> = cmd("XADD")
        .arg("nokey")
        .arg("NOMKSTREAM")
        .arg("*")
        .arg("f")
        .arg("v")
        .query(&mut c)
        .unwrap();
    assert_eq!(none, None);
    assert_eq!(cmd("EXISTS").arg("nokey").query::<i64>(&mut c).unwrap(), 0);
    for i in 0..10 {
        let _: String = cmd("XADD")
            .arg("capped")
            .arg("MAXLEN")
            .arg(3)
            .arg("*")
            .arg("i")
            .arg(i)
            .query(&mut c)
            .unwrap();
    }
    assert_eq!(cmd("XLEN").arg("capped").query::<i64>(&mut c).unwrap(), 3);

    // DEL removes the stream; a new stream under the same key starts afresh.
    assert_eq!(cmd("DEL").arg("capped").query::<i64>(&mut c).unwrap(), 1);
    assert_eq!(cmd("XLEN").arg("capped").query::<i64>(&mut c).unwrap(), 0);
    assert_eq!(xadd(&mut c, "capped", "1-1", &["f", "v"]).unwrap(), "1-1");
    assert_eq!(range(&mut c, "capped", "-", "+"), ["1-1"]);
    assert_eq!(t.stop(), 0);
}

#[test]
fn xread_blocks_until_another_connection_adds() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let mut c = t.client();
    xadd(&mut c, "s", "1-1", &["f", "old"]).unwrap();

    // Non-blocking: from an id, with COUNT; nothing new gives nil.
    let v: Value =
        cmd("XREAD").arg("COUNT").arg(10).arg("STREAMS").arg("s").arg("0").query(&mut c).unwrap();
    assert!(matches!(&v, Value::Array(a) if a.len() == 1), "{v:?}");
    let v: Value = cmd("XREAD").arg("STREAMS").arg("s").arg("$").query(&mut c).unwrap();
    assert_eq!(v, Value::Nil);
    let start = Instant::now();
    let v: Value =
        cmd("XREAD").arg("BLOCK").arg(150).arg("STREAMS").arg("s").arg("$").query(&mut c).unwrap();
    assert_eq!(v, Value::Nil);
    assert!(start.elapsed() >= Duration::from_millis(150));

    // Blocking readers on an existing stream and on a key that does not exist yet. They wait
    // from explicit ids, so they get the entries whether they block before or after the XADD.
    let port = t.port;
    let reader = |key: &'static str, after: &'static str| {
        std::thread::spawn(move || {
            let url = format!("redis://127.0.0.1:{port}/");
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let start = Instant::now();
            let v: Vec<(String, Entries)> = cmd("XREAD")
                .arg("BLOCK")
                .arg(60_000)
                .arg("STREAMS")
                .arg(key)
                .arg(after)
                .query(&mut c)
                .unwrap();
            (v, start.elapsed())
        })
    };
    let r1 = reader("s", "1-1");
    let r2 = reader("fresh", "0");
    std::thread::sleep(Duration::from_millis(200)); // Usually blocked by now; not required.
    xadd(&mut c, "s", "2-1", &["f", "new"]).unwrap();
    xadd(&mut c, "fresh", "3-1", &["g", "first"]).unwrap();
    let (v, waited) = r1.join().unwrap();
    assert_eq!(take(v, "s"), [("2-1".to_string(), vec!["f".to_string(), "new".to_string()])]);
    assert!(waited < Duration::from_secs(30), "woken by the XADD, not by the timeout");
    let (v, _) = r2.join().unwrap();
    assert_eq!(take(v, "fresh")[0].0, "3-1");

    // RESP3: XREAD replies with a map of key to entries.
    let url = format!("redis://127.0.0.1:{port}/?protocol=resp3");
    let mut c3 = redis::Client::open(url).unwrap().get_connection().unwrap();
    let v: Value = cmd("XREAD").arg("STREAMS").arg("s").arg("0").query(&mut c3).unwrap();
    assert!(matches!(&v, Value::Map(m) if m.len() == 1), "{v:?}");
    assert_eq!(t.stop(), 0, "a graceful stop does not wait for idle connections");
}

#[test]
fn consumer_groups_ack_and_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &["--sync", "always"]);
    let mut c = t.client();
    assert!(err_text(cmd("XGROUP").arg("CREATE").arg("q").arg("g").arg("$").query::<()>(&mut c))
        .contains("MKSTREAM"));
    let _: () = cmd("XGROUP")
        .arg("CREATE")
        .arg("q")
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query(&mut c)
        .unwrap();
    assert!(err_text(cmd("XGROUP").arg("CREATE").arg("q").arg("g").arg("0").query::<()>(&mut c))
        .contains("BUSYGROUP"));
    for i in 1..=5 {
        xadd(&mut c, "q", &format!("{i}-0"), &["job", &i.to_string()]).unwrap();
    }
    let read = |c: &mut redis::Connection, who: &str, count: usize, id: &str| -> Entries {
        let v: Option<Vec<(String, Entries)>> = cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(who)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg("q")
            .arg(id)
            .query(c)
            .unwrap();
        v.map(|m| take(m, "q")).unwrap_or_default()
    };
    let ids = |es: &Entries| es.iter().map(|e| e.0.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&read(&mut c, "alice", 2, ">")), ["1-0", "2-0"]);
    assert_eq!(ids(&read(&mut c, "bob", 2, ">")), ["3-0", "4-0"]);

    // XPENDING: summary and details.
    let v: (i64, String, String, Vec<(String, String)>) =
        cmd("XPENDING").arg("q").arg("g").query(&mut c).unwrap();
    assert_eq!(v.0, 4);
    assert_eq!((v.1.as_str(), v.2.as_str()), ("1-0", "4-0"));
    assert_eq!(v.3, [("alice".into(), "2".into()), ("bob".into(), "2".into())]);
    let rows: Vec<(String, String, i64, i64)> = cmd("XPENDING")
        .arg("q")
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(10)
        .arg("bob")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        rows.iter().map(|r| (r.0.as_str(), r.1.as_str(), r.3)).collect::<Vec<_>>(),
        [("3-0", "bob", 1), ("4-0", "bob", 1)]
    );

    // Ack one; the unacknowledged one is delivered again from history, with its count raised.
    assert_eq!(
        cmd("XACK").arg("q").arg("g").arg("1-0").arg("9-9").query::<i64>(&mut c).unwrap(),
        1
    );
    let again = read(&mut c, "alice", 10, "0");
    assert_eq!(again, [("2-0".to_string(), vec!["job".to_string(), "2".to_string()])]);
    let rows: Vec<(String, String, i64, i64)> = cmd("XPENDING")
        .arg("q")
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(10)
        .arg("alice")
        .query(&mut c)
        .unwrap();
    assert_eq!(rows[0].3, 2, "delivered twice");
    // A consumer with nothing pending gets its stream with no entries.
    let v: Value = cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("carol")
        .arg("STREAMS")
        .arg("q")
        .arg("0")
        .query(&mut c)
        .unwrap();
    assert!(matches!(&v, Value::Array(a) if a.len() == 1), "{v:?}");

    // Errors: unknown group, bad ids.
    assert!(err_text(
        cmd("XREADGROUP")
            .arg("GROUP")
            .arg("nope")
            .arg("c")
            .arg("STREAMS")
            .arg("q")
            .arg(">")
            .query::<Value>(&mut c)
    )
    .contains("NOGROUP"));
    assert!(
        err_text(cmd("XPENDING").arg("q").arg("nope").query::<Value>(&mut c)).contains("NOGROUP")
    );
    assert!(err_text(cmd("XACK").arg("q").arg("g").arg("x").query::<i64>(&mut c))
        .contains("Invalid stream ID"));

    // Blocking XREADGROUP woken by an XADD from another connection.
    let port = t.port;
    let waiter = std::thread::spawn(move || {
        let url = format!("redis://127.0.0.1:{port}/");
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        // Drain what is left, then block for the next entry.
        let mut got = Vec::new();
        while got.len() < 2 {
            let v: Option<Vec<(String, Entries)>> = cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("dave")
                .arg("BLOCK")
                .arg(60_000)
                .arg("STREAMS")
                .arg("q")
                .arg(">")
                .query(&mut c)
                .unwrap();
            got.extend(take(v.unwrap(), "q").into_iter().map(|e| e.0));
        }
        got
    });
    std::thread::sleep(Duration::from_millis(200));
    xadd(&mut c, "q", "6-0", &["job", "6"]).unwrap();
    assert_eq!(waiter.join().unwrap(), ["5-0", "6-0"]);

    // XINFO sees the stream, its group and the consumers with pending entries.
    let info: HashMap<String, Value> = cmd("XINFO").arg("STREAM").arg("q").query(&mut c).unwrap();
    assert_eq!(info["length"], Value::Int(6));
    assert_eq!(info["groups"], Value::Int(1));
    assert_eq!(redis::from_redis_value::<String>(&info["last-generated-id"]).unwrap(), "6-0");
    let groups: Vec<HashMap<String, Value>> =
        cmd("XINFO").arg("GROUPS").arg("q").query(&mut c).unwrap();
    assert_eq!(groups[0]["pending"], Value::Int(5));
    assert_eq!(redis::from_redis_value::<String>(&groups[0]["last-delivered-id"]).unwrap(), "6-0");
    let consumers: Vec<HashMap<String, Value>> =
        cmd("XINFO").arg("CONSUMERS").arg("q").arg("g").query(&mut c).unwrap();
    let names: Vec<String> =
        consumers.iter().map(|m| redis::from_redis_value(&m["name"]).unwrap()).collect();
    assert_eq!(names, ["alice", "bob", "dave"]);
    assert!(err_text(cmd("XINFO").arg("STREAM").arg("nokey").query::<Value>(&mut c))
        .contains("no such key"));

    // Groups and their pending entries survive SIGKILL (synced writes).
    t.signal(rustix::process::Signal::KILL);
    drop(t);
    let t = Timberd::start(dir.path(), &[]);
    let mut c = t.client();
    let v: (i64, String, String, Vec<(String, String)>) =
        cmd("XPENDING").arg("q").arg("g").query(&mut c).unwrap();
    assert_eq!(v.0, 5, "2, 3, 4, 5, 6 are pending");
    assert_eq!(ids(&read(&mut c, "alice", 10, ">")), Vec::<String>::new());
    assert_eq!(cmd("XGROUP").arg("DESTROY").arg("q").arg("g").query::<i64>(&mut c).unwrap(), 1);
    assert_eq!(cmd("XGROUP").arg("DESTROY").arg("q").arg("g").query::<i64>(&mut c).unwrap(), 0);
    assert!(err_text(cmd("XPENDING").arg("q").arg("g").query::<Value>(&mut c)).contains("NOGROUP"));
}

#[test]
fn pipelined_xadds_survive_restart_and_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let mut c = t.client();
    let mut p = redis::pipe();
    for i in 0..500 {
        p.cmd("XADD").arg("log").arg("*").arg("i").arg(i);
    }
    p.cmd("XLEN").arg("log");
    let mut got: Vec<Value> = p.query(&mut c).unwrap();
    assert_eq!(got.pop(), Some(Value::Int(500)), "XLEN after the pipelined XADDs sees them all");
    let ids: Vec<String> = got.into_iter().map(|v| redis::from_redis_value(&v).unwrap()).collect();
    assert!(ids.windows(2).all(|w| parse_id(&w[0]) < parse_id(&w[1])));
    assert_eq!(t.stop(), 0);

    let t = Timberd::start(dir.path(), &[]);
    let mut c = t.client();
    assert_eq!(range(&mut c, "log", "-", "+"), ids);
    // Every acknowledged XADD survives the process being killed without warning (at the default
    // interval sync it is in the stream journal, handed to the operating system).
    let mut acked = Vec::new();
    for i in 0..100 {
        acked.push(xadd(&mut c, "log", "*", &["after", &i.to_string()]).unwrap());
    }
    t.signal(rustix::process::Signal::KILL);
    drop(t);
    let t = Timberd::start(dir.path(), &[]);
    let mut c = t.client();
    let all = range(&mut c, "log", "-", "+");
    assert_eq!(all.len(), 600);
    assert_eq!(&all[500..], &acked[..]);
    // New ids continue after the last one from before the crash.
    let next = xadd(&mut c, "log", "*", &["f", "v"]).unwrap();
    assert!(parse_id(&next) > parse_id(&acked[99]));
}

/// Under `--sync always`, journal syncs run on idle runtime workers, or on the blocking pool
/// while appends are pipelined: clients of both kinds at once, then SIGKILL, and every
/// acknowledged entry is there, in the order its connection saw.
#[test]
fn xadds_from_many_clients_under_sync_always_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &["--sync", "always", "--workers", "1"]);
    let acked: Vec<Vec<String>> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..6)
            .map(|k| {
                let mut c = t.client();
                s.spawn(move || {
                    let mut ids = Vec::new();
                    for round in 0..20 {
                        if k % 2 == 0 {
                            let mut p = redis::pipe();
                            for i in 0..16 {
                                p.cmd("XADD").arg("log").arg("*").arg(k).arg(round * 16 + i);
                            }
                            let got: Vec<String> = p.query(&mut c).unwrap();
                            ids.extend(got);
                        } else {
                            let v = (round as usize).to_string();
                            ids.push(xadd(&mut c, "log", "*", &[&k.to_string(), &v]).unwrap());
                        }
                    }
                    ids
                })
            })
            .collect();
        clients.into_iter().map(|h| h.join().unwrap()).collect()
    });
    t.signal(rustix::process::Signal::KILL);
    drop(t);
    let t = Timberd::start(dir.path(), &[]);
    let mut c = t.client();
    let all = range(&mut c, "log", "-", "+");
    assert_eq!(all.len(), 3 * 20 * 16 + 3 * 20, "every acknowledged XADD is there");
    let position: HashMap<&str, usize> =
        all.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
    for ids in &acked {
        let at: Vec<usize> = ids.iter().map(|id| position[id.as_str()]).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "a connection's entries keep their order");
    }
}
