//! Redis transactions end to end: the real `timberd`, a real Redis client (the `redis` crate),
//! redis-cli and raw pipelined bytes. MULTI/EXEC/DISCARD replies and errors as Redis gives
//! them, WATCH aborting on any write (even of the same value), expiry or flush of a watched
//! key, and transactions from many connections atomic with respect to each other.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::Timberd;
use redis::{cmd, Value};

fn err_text(r: redis::RedisResult<Value>) -> String {
    match r {
        Err(e) => format!("{} {}", e.code().unwrap_or(""), e.detail().unwrap_or("")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// Sends raw bytes and reads until the reply holds `expect_lines` CRLF-terminated lines.
fn raw(port: u16, send: &[u8], expect_lines: usize) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(send).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(2).filter(|w| w == b"\r\n").count() < expect_lines {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

#[test]
fn multi_exec_and_discard_reply_as_redis_does() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let mut c = t.client();

    // Queued commands run in order at EXEC; a runtime error is its command's reply only
    // (raw: the client turns an error inside an array into an error of the whole reply).
    let _: () = cmd("SET").arg("s").arg("text").query(&mut c).unwrap();
    let queued = "+OK\r\n".to_string() + &"+QUEUED\r\n".repeat(7);
    let exec = "*7\r\n+OK\r\n:2\r\n-ERR value is not an integer or out of range\r\n$1\r\n2\r\n$3\r\n1-1\r\n:1\r\n:1\r\n";
    let want = queued + exec;
    let got = raw(
        t.port,
        b"MULTI\r\nSET a 1\r\nINCR a\r\nINCR s\r\nGET a\r\nXADD st 1-1 f v\r\nXLEN st\r\nDEL s\r\nEXEC\r\n",
        want.matches("\r\n").count(),
    );
    assert_eq!(got, want);
    assert_eq!(cmd("GET").arg("a").query::<i64>(&mut c).unwrap(), 2);
    assert_eq!(cmd("EXISTS").arg("s").query::<i64>(&mut c).unwrap(), 0);

    // An error while queuing (unknown command, wrong arity) fails EXEC as a whole.
    assert_eq!(cmd("MULTI").query::<String>(&mut c).unwrap(), "OK");
    assert_eq!(cmd("SET").arg("a").arg(100).query::<String>(&mut c).unwrap(), "QUEUED");
    assert!(err_text(cmd("NOSUCH").arg("x").query(&mut c)).contains("unknown command"));
    assert!(err_text(cmd("GET").query(&mut c)).contains("wrong number of arguments"));
    assert!(err_text(cmd("EXEC").query(&mut c)).starts_with("EXECABORT"));
    assert_eq!(cmd("GET").arg("a").query::<i64>(&mut c).unwrap(), 2);

    // MULTI and WATCH inside MULTI are refused without aborting it; DISCARD drops the queue.
    assert_eq!(cmd("MULTI").query::<String>(&mut c).unwrap(), "OK");
    assert!(err_text(cmd("MULTI").query(&mut c)).contains("can not be nested"));
    assert!(err_text(cmd("WATCH").arg("a").query(&mut c)).contains("inside MULTI is not allowed"));
    assert_eq!(cmd("INCR").arg("a").query::<String>(&mut c).unwrap(), "QUEUED");
    assert_eq!(cmd("DISCARD").query::<String>(&mut c).unwrap(), "OK");
    assert_eq!(cmd("GET").arg("a").query::<i64>(&mut c).unwrap(), 2);
    assert!(err_text(cmd("EXEC").query(&mut c)).contains("EXEC without MULTI"));
    assert!(err_text(cmd("DISCARD").query(&mut c)).contains("DISCARD without MULTI"));

    // The client's own transaction helper (MULTI ... EXEC in one pipeline).
    let (x, y): (i64, i64) = redis::pipe()
        .atomic()
        .cmd("INCRBY")
        .arg("x")
        .arg(5)
        .cmd("INCRBY")
        .arg("x")
        .arg(2)
        .query(&mut c)
        .unwrap();
    assert_eq!((x, y), (5, 7));

    // A flush and keys inside a transaction see its own writes.
    let got: Vec<Value> = redis::pipe()
        .atomic()
        .cmd("FLUSHALL")
        .cmd("SET")
        .arg("only")
        .arg("1")
        .cmd("DBSIZE")
        .cmd("KEYS")
        .arg("*")
        .query(&mut c)
        .unwrap();
    assert_eq!(got[2], Value::Int(1));
    assert_eq!(got[3], Value::Array(vec![Value::BulkString(b"only".to_vec())]));
    assert_eq!(cmd("DBSIZE").query::<i64>(&mut c).unwrap(), 1);

    // Raw RESP: the queued replies, then EXEC's array.
    let got = raw(t.port, b"MULTI\r\nSET r 1\r\nINCR r\r\nEXEC\r\n", 6);
    assert_eq!(got, "+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:2\r\n");
    // BLOCK is ignored inside EXEC (as in Redis): nothing to read gives nil at once.
    let got = raw(t.port, b"MULTI\r\nXREAD BLOCK 0 STREAMS nothing $\r\nEXEC\r\n", 4);
    assert_eq!(got, "+OK\r\n+QUEUED\r\n*1\r\n*-1\r\n");
    assert_eq!(t.stop(), 0);
}

#[test]
fn watch_aborts_exec_on_any_write_flush_or_expiry_of_a_watched_key() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let (mut c, mut other) = (t.client(), t.client());
    let exec_ping = |c: &mut redis::Connection| -> Value {
        assert_eq!(cmd("MULTI").query::<String>(c).unwrap(), "OK");
        assert_eq!(cmd("PING").query::<String>(c).unwrap(), "QUEUED");
        cmd("EXEC").query(c).unwrap()
    };
    let pong = Value::Array(vec![Value::SimpleString("PONG".into())]);

    // Untouched: EXEC runs. Written by another client, even with the same value: nil.
    let _: () = cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    let _: () = cmd("WATCH").arg("k").query(&mut c).unwrap();
    assert_eq!(exec_ping(&mut c), pong);
    let _: () = cmd("WATCH").arg("k").query(&mut c).unwrap();
    let _: () = cmd("SET").arg("k").arg("v").query(&mut other).unwrap();
    assert_eq!(exec_ping(&mut c), Value::Nil);
    // EXEC unwatches, whatever it returned.
    let _: () = cmd("SET").arg("k").arg("w").query(&mut other).unwrap();
    assert_eq!(exec_ping(&mut c), pong);

    // UNWATCH and DISCARD forget the watched keys.
    let _: () = cmd("WATCH").arg("k").query(&mut c).unwrap();
    let _: () = cmd("UNWATCH").query(&mut c).unwrap();
    let _: () = cmd("SET").arg("k").arg("x").query(&mut other).unwrap();
    assert_eq!(exec_ping(&mut c), pong);
    let _: () = cmd("WATCH").arg("k").query(&mut c).unwrap();
    let _: () = cmd("SET").arg("k").arg("y").query(&mut other).unwrap();
    let _: () = cmd("MULTI").query(&mut c).unwrap();
    let _: () = cmd("DISCARD").query(&mut c).unwrap();
    assert_eq!(exec_ping(&mut c), pong);

    // Every kind of write counts: DEL, INCR, EXPIRE, APPEND, MSET, a stream append.
    let _: () = cmd("SET").arg("n").arg(1).query(&mut c).unwrap();
    let _: String = cmd("XADD").arg("st").arg("*").arg("f").arg("v").query(&mut c).unwrap();
    for (key, write) in [
        ("k", vec!["DEL", "k"]),
        ("n", vec!["INCR", "n"]),
        ("n", vec!["EXPIRE", "n", "100"]),
        ("n", vec!["APPEND", "n", "0"]),
        ("n", vec!["MSET", "a", "1", "n", "2"]),
        ("st", vec!["XADD", "st", "*", "f", "v"]),
        ("st", vec!["XTRIM", "st", "MAXLEN", "0"]),
    ] {
        let _: () = cmd("WATCH").arg(key).query(&mut c).unwrap();
        let _: Value = redis::Cmd::new().arg(&write).query(&mut other).unwrap();
        assert_eq!(exec_ping(&mut c), Value::Nil, "{write:?}");
    }

    // A DEL or a flush of a key that does not exist does not touch it, as in Redis.
    let _: () = cmd("WATCH").arg("missing").query(&mut c).unwrap();
    let _: i64 = cmd("DEL").arg("missing").query(&mut other).unwrap();
    assert_eq!(exec_ping(&mut c), pong);
    let _: () = cmd("FLUSHALL").query(&mut other).unwrap();
    let _: () = cmd("WATCH").arg("missing").query(&mut c).unwrap();
    let _: () = cmd("FLUSHALL").query(&mut other).unwrap();
    assert_eq!(exec_ping(&mut c), pong);
    // A flush of a watched key that exists does.
    let _: () = cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    let _: () = cmd("WATCH").arg("k").query(&mut c).unwrap();
    let _: () = cmd("FLUSHDB").query(&mut other).unwrap();
    assert_eq!(exec_ping(&mut c), Value::Nil);

    // A watched key that expires before EXEC counts as changed (nothing else wrote it).
    let _: () = cmd("SET").arg("e").arg("v").arg("PX").arg(200).query(&mut c).unwrap();
    let _: () = cmd("WATCH").arg("e").query(&mut c).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cmd("EXISTS").arg("e").query::<i64>(&mut other).unwrap() == 1 {
        assert!(Instant::now() < deadline, "the key never expired");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(exec_ping(&mut c), Value::Nil);

    // A watched key that had expired but was not yet swept: its removal (the sweep, a DEL) is
    // no change while it stays without a value, as in Redis.
    let _: () = cmd("SET").arg("s").arg("v").arg("PX").arg(1).query(&mut c).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cmd("EXISTS").arg("s").query::<i64>(&mut other).unwrap() == 1 {
        assert!(Instant::now() < deadline, "the key never expired");
        std::thread::sleep(Duration::from_millis(1));
    }
    let _: () = cmd("WATCH").arg("s").query(&mut c).unwrap();
    let _: i64 = cmd("DEL").arg("s").query(&mut other).unwrap();
    assert_eq!(exec_ping(&mut c), pong);

    // UNWATCH queued inside MULTI replies OK in EXEC's array.
    let _: () = cmd("MULTI").query(&mut c).unwrap();
    let _: String = cmd("UNWATCH").query(&mut c).unwrap();
    assert_eq!(cmd("EXEC").query::<Value>(&mut c).unwrap(), Value::Array(vec![Value::Okay]));

    // WATCH with a stream command in the transaction is refused whole (its segments commit
    // one by one, so the watch could not cover them all).
    let _: () = cmd("WATCH").arg("k").query(&mut c).unwrap();
    let _: () = cmd("MULTI").query(&mut c).unwrap();
    let _: String = cmd("SET").arg("k").arg("never").query(&mut c).unwrap();
    let _: String = cmd("XADD").arg("st").arg("*").arg("f").arg("v").query(&mut c).unwrap();
    let e = err_text(cmd("EXEC").query(&mut c));
    assert!(e.contains("not supported"), "{e}");
    assert_ne!(
        cmd("GET").arg("k").query::<Option<String>>(&mut c).unwrap().as_deref(),
        Some("never")
    );

    // The transaction's own writes after WATCH do not abort it; the queued commands do not run
    // when it aborts.
    let _: () = cmd("SET").arg("k").arg("1").query(&mut c).unwrap();
    let _: () = cmd("WATCH").arg("k").query(&mut c).unwrap();
    let _: () = cmd("SET").arg("k").arg("2").query(&mut other).unwrap();
    let _: () = cmd("MULTI").query(&mut c).unwrap();
    let _: () = cmd("SET").arg("k").arg("mine").query(&mut c).unwrap();
    assert_eq!(cmd("EXEC").query::<Value>(&mut c).unwrap(), Value::Nil);
    assert_eq!(cmd("GET").arg("k").query::<String>(&mut c).unwrap(), "2");
    assert_eq!(t.stop(), 0);
}

#[test]
fn transactions_from_many_connections_are_atomic_and_watched_increments_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    const THREADS: usize = 6;
    const ROUNDS: usize = 150;
    let _: () =
        cmd("MSET").arg("x").arg(0).arg("y").arg(0).arg("c").arg(0).query(&mut t.client()).unwrap();
    let writers_done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        // Readers of both keys in one transaction: never a half-done move.
        for _ in 0..2 {
            let mut con = t.client();
            let writers_done = &writers_done;
            scope.spawn(move || {
                while writers_done.load(std::sync::atomic::Ordering::Acquire) < THREADS {
                    let (x, y): (i64, i64) = redis::pipe()
                        .atomic()
                        .cmd("GET")
                        .arg("x")
                        .cmd("GET")
                        .arg("y")
                        .query(&mut con)
                        .unwrap();
                    assert_eq!(x + y, 0, "a transaction was seen half done");
                }
            });
        }
        for i in 0..THREADS {
            let mut con = t.client();
            let writers_done = &writers_done;
            scope.spawn(move || {
                for _ in 0..ROUNDS {
                    if i % 2 == 0 {
                        // Moves two units from y to x: x + y stays 0 for any reader of both.
                        let _: (i64, i64, i64, i64) = redis::pipe()
                            .atomic()
                            .cmd("INCR")
                            .arg("x")
                            .cmd("DECR")
                            .arg("y")
                            .cmd("INCR")
                            .arg("x")
                            .cmd("DECR")
                            .arg("y")
                            .query(&mut con)
                            .unwrap();
                    }
                    // Check-and-set with WATCH: retried until it commits; none may be lost.
                    loop {
                        let _: () = cmd("WATCH").arg("c").query(&mut con).unwrap();
                        let v: i64 = cmd("GET").arg("c").query(&mut con).unwrap();
                        let r: Option<(String,)> = redis::pipe()
                            .atomic()
                            .cmd("SET")
                            .arg("c")
                            .arg(v + 1)
                            .query(&mut con)
                            .unwrap();
                        if r.is_some() {
                            break;
                        }
                    }
                }
                writers_done.fetch_add(1, std::sync::atomic::Ordering::Release);
            });
        }
    });
    let mut c = t.client();
    assert_eq!(cmd("GET").arg("c").query::<i64>(&mut c).unwrap(), (THREADS * ROUNDS) as i64);
    let x: i64 = cmd("GET").arg("x").query(&mut c).unwrap();
    assert_eq!(x, (2 * THREADS.div_ceil(2) * ROUNDS) as i64);
    assert_eq!(cmd("GET").arg("y").query::<i64>(&mut c).unwrap(), -x);

    // Pipelined MULTI blocks from many raw connections at once: every block applies whole.
    let blocks = b"MULTI\r\nINCR p\r\nINCR q\r\nEXEC\r\n".repeat(20);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let got = raw(t.port, &blocks, 20 * 6);
                assert_eq!(got.matches("+QUEUED\r\n").count(), 40);
                assert_eq!(got.matches("*2\r\n").count(), 20);
            });
        }
    });
    let (p, q): (i64, i64) =
        (cmd("GET").arg("p").query(&mut c).unwrap(), cmd("GET").arg("q").query(&mut c).unwrap());
    assert_eq!((p, q), (80, 80));
    assert_eq!(t.stop(), 0);
}

#[test]
fn redis_cli_runs_transactions() {
    // .ci/run installs Debian's redis-tools; a machine without redis-cli fails here, visibly.
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let mut child = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &t.port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli (Debian package redis-tools) must be installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"MULTI\nSET a 1\nINCR a\nNOSUCH\nEXEC\nMULTI\nSET a 1\nINCR a\nEXEC\nGET a\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines[..5], ["OK", "QUEUED", "QUEUED", lines[3], lines[4]]);
    assert!(lines[3].contains("unknown command"), "{out}");
    assert!(lines[4].starts_with("EXECABORT"), "{out}");
    assert_eq!(lines[5..], ["OK", "QUEUED", "QUEUED", "OK", "2", "2"], "{out}");
    assert_eq!(t.stop(), 0);
}
