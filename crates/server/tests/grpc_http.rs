//! End-to-end tests of the gRPC endpoint (through timber-client), the HTTP endpoint (through
//! reqwest), WebSocket push (through tokio-tungstenite), metrics and health, on the real
//! `timberd` binary; one engine behind every endpoint; restarts; bad input on every port.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use common::Timberd;
use futures::StreamExt as _;
use redis::cmd;
use timber_client::{Client, Code, Mutation, Scan, Start};

fn http(t: &Timberd, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", t.http_port)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_kv_and_one_keyspace_behind_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &["--max-request-bytes", "65536"]);
    let c = t.grpc().await;
    c.put("a", "1").await.unwrap();
    assert_eq!(c.get("a").await.unwrap(), Some(Bytes::from("1")));
    assert_eq!(c.get("missing").await.unwrap(), None);
    c.write_batch(vec![
        Mutation::Put("b".into(), "2".into()),
        Mutation::Put("c".into(), "3".into()),
        Mutation::Delete("a".into()),
    ])
    .await
    .unwrap();
    assert_eq!(c.get("a").await.unwrap(), None);
    let all = c.scan(Scan::default()).await.unwrap();
    assert_eq!(all, [(Bytes::from("b"), Bytes::from("2")), (Bytes::from("c"), Bytes::from("3"))]);
    let some = c.scan(Scan { start: "c".into(), ..Scan::default() }).await.unwrap();
    assert_eq!(some.len(), 1);
    for i in 0..3000 {
        c.put(format!("many/{i:05}"), format!("{i}")).await.unwrap();
    }
    let many = c.scan(Scan { prefix: "many/".into(), ..Scan::default() }).await.unwrap();
    assert_eq!(many.len(), 3000, "scans page through more than one batch");
    let few = c.scan(Scan { prefix: "many/".into(), limit: 7, ..Scan::default() }).await.unwrap();
    assert_eq!(few.len(), 7);
    assert!(c.delete("b").await.unwrap());
    assert!(!c.delete("b").await.unwrap());
    c.put_with_ttl("short", "x", Duration::from_millis(50)).await.unwrap();

    // The same keys over RESP and HTTP.
    let mut r = t.client();
    assert_eq!(cmd("GET").arg("c").query::<String>(&mut r).unwrap(), "3");
    let _: () = cmd("SET").arg("from-redis").arg("r").query(&mut r).unwrap();
    assert_eq!(c.get("from-redis").await.unwrap(), Some(Bytes::from("r")));
    let body = reqwest::get(http(&t, "/v1/kv/from-redis")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "r");
    // A deadline passes and the key is gone everywhere.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.get("short").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "expired key still readable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Values over --max-request-bytes (64 KiB here) are refused; the stored value stays.
    let e = c.put("c", vec![0u8; 70_000]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    c.create_stream("big", None, None).await.unwrap();
    let e = c.append("big", vec![Bytes::from(vec![0u8; 70_000])]).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert_eq!(c.stream_info("big").await.unwrap().next_id, 0, "nothing of it was stored");
    assert_eq!(c.get("c").await.unwrap(), Some(Bytes::from("3")));

    let st = c.status().await.unwrap();
    assert!(st.keys >= 3000 && !st.version.is_empty(), "{st:?}");
    assert_eq!(st.sync, "interval:1000");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_streams_append_read_follow_truncate() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let c = t.grpc().await;
    c.create_stream("events", None, None).await.unwrap();
    let e = c.create_stream("events", None, None).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::AlreadyExists));
    let e = c.create_stream("redis.x", None, None).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert_eq!(c.stream_info("nope").await.unwrap_err().code(), Some(Code::NotFound));

    // Pipelined appends: many batches in flight on one stream, acks in order, ids dense.
    let w = c.writer("events").await.unwrap();
    let mut acks = Vec::new();
    for b in 0..50 {
        let batch: Vec<Bytes> = (0..10).map(|i| Bytes::from(format!("{b}/{i}"))).collect();
        acks.push(w.send(batch).await.unwrap());
    }
    for (b, a) in acks.into_iter().enumerate() {
        assert_eq!(a.await.unwrap(), b as u64 * 10);
    }
    assert_eq!(c.append("events", vec!["last".into()]).await.unwrap(), 500);

    let mut r = c.reader("events", Start::Earliest, false).await.unwrap();
    let mut n = 0;
    while let Some(e) = r.next().await.unwrap() {
        assert_eq!(e.id, n);
        n += 1;
    }
    assert_eq!(n, 501);

    // A following reader gets entries appended after it started.
    let mut f = c.reader("events", Start::Latest, true).await.unwrap();
    let c2 = c.clone();
    let appender = tokio::spawn(async move { c2.append("events", vec!["new".into()]).await });
    let e =
        tokio::time::timeout(Duration::from_secs(30), f.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((e.id, e.data), (501, Bytes::from("new")));
    appender.await.unwrap().unwrap();

    let info = c.truncate("events", 100).await.unwrap();
    assert_eq!(info.first_id, 100);
    let mut r = c.reader("events", Start::At(5), false).await.unwrap();
    assert_eq!(r.next().await.unwrap_err().code(), Some(Code::OutOfRange));
    let names: Vec<String> = c.list_streams().await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["events"]);
    c.delete_stream("events").await.unwrap();
    assert_eq!(c.stream_info("events").await.unwrap_err().code(), Some(Code::NotFound));
}

#[tokio::test(flavor = "multi_thread")]
async fn http_rest_websocket_metrics_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &["--max-request-bytes", "65536"]);
    let h = reqwest::Client::new();
    assert_eq!(h.get(http(&t, "/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(h.get(http(&t, "/readyz")).send().await.unwrap().status(), 200);

    // KV.
    let r = h.put(http(&t, "/v1/kv/k1")).body("v1").send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = h.put(http(&t, "/v1/kv/k2")).body(vec![0xff, 0xfe]).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(h.get(http(&t, "/v1/kv/k1")).send().await.unwrap().text().await.unwrap(), "v1");
    assert_eq!(h.get(http(&t, "/v1/kv/none")).send().await.unwrap().status(), 404);
    let list: serde_json::Value =
        h.get(http(&t, "/v1/kv?prefix=k&limit=1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["items"][0]["value"], "v1");
    assert_eq!(list["more"], true);
    let list: serde_json::Value =
        h.get(http(&t, "/v1/kv?start=k2")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["items"][0]["value_base64"], "//4=");
    let del: serde_json::Value =
        h.delete(http(&t, "/v1/kv/k1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(del["existed"], true);
    // Oversized values are refused and stored data is intact.
    let r = h.put(http(&t, "/v1/kv/k2")).body(vec![0u8; 100_000]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        h.get(http(&t, "/v1/kv/k2")).send().await.unwrap().bytes().await.unwrap(),
        [0xff, 0xfe][..]
    );

    // Streams.
    let r = h
        .post(http(&t, "/v1/streams"))
        .json(&serde_json::json!({"name": "log"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = h
        .post(http(&t, "/v1/streams"))
        .json(&serde_json::json!({"name": "log"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = h
        .post(http(&t, "/v1/streams"))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());

    // A WebSocket from the start of the stream sees entries appended after it connected.
    let url = format!("ws://127.0.0.1:{}/v1/streams/log/ws?from=0", t.http_port);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let r: serde_json::Value = h
        .post(http(&t, "/v1/streams/log/entries"))
        .body("one")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["first_id"], 0);
    let r: serde_json::Value = h
        .post(http(&t, "/v1/streams/log/entries"))
        .json(&serde_json::json!({"entries": ["two", "three"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((r["first_id"].as_u64(), r["count"].as_u64()), (Some(1), Some(2)));
    for (id, data) in [(0, "one"), (1, "two"), (2, "three")] {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        assert_eq!((v["id"].as_u64(), v["data"].as_str()), (Some(id), Some(data)));
    }
    let got: serde_json::Value = h
        .get(http(&t, "/v1/streams/log/entries?from=1&limit=5"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["entries"][0]["data"], "two");
    assert_eq!(got["next"], 3);
    let r = h.post(http(&t, "/v1/streams/log/truncate?before=2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        h.get(http(&t, "/v1/streams/log/entries?from=0")).send().await.unwrap().status(),
        416
    );
    assert_eq!(h.get(http(&t, "/v1/streams/nope/entries")).send().await.unwrap().status(), 404);
    assert_eq!(
        h.get(http(&t, "/v1/streams/log/entries?from=x")).send().await.unwrap().status(),
        400
    );
    let list: serde_json::Value =
        h.get(http(&t, "/v1/streams")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["streams"][0]["name"], "log");

    // Metrics name every endpoint's traffic.
    let mut r = t.client();
    let _: () = cmd("SET").arg("m").arg("1").query(&mut r).unwrap();
    let _ = t.grpc().await.get("m").await.unwrap();
    let text = h.get(http(&t, "/metrics")).send().await.unwrap().text().await.unwrap();
    for want in [
        "timber_resp_commands_total{command=\"set\"}",
        "timber_grpc_requests_total{method=\"/timber.v1.Kv/Get\"}",
        "timber_http_requests_total",
        "timber_stream_append_seconds",
        "timber_kv_writes_total{db=",
        "timber_uptime_seconds",
    ] {
        assert!(text.contains(want), "/metrics lacks {want}");
    }
    assert_eq!(h.delete(http(&t, "/v1/streams/log")).send().await.unwrap().status(), 204);
    assert_eq!(t.stop(), 0, "graceful stop with an open WebSocket");
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_on_grpc_and_http() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &["--auth-secret", "s3cret"]);
    let c = t.grpc().await;
    assert_eq!(c.get("k").await.unwrap_err().code(), Some(Code::Unauthenticated));
    let opts = timber_client::Options { token: Some("s3cret".into()), ..Default::default() };
    let c = Client::connect_with(format!("http://127.0.0.1:{}", t.grpc_port), opts).await.unwrap();
    c.put("k", "v").await.unwrap();
    let h = reqwest::Client::new();
    assert_eq!(h.get(http(&t, "/v1/kv/k")).send().await.unwrap().status(), 401);
    let r = h.get(http(&t, "/v1/kv/k")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "v");
    assert_eq!(h.get(http(&t, "/healthz")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_through_grpc_and_http_survive_restart_and_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let c = t.grpc().await;
    c.put("graceful", "g").await.unwrap();
    c.create_stream("s", None, None).await.unwrap();
    c.append("s", vec!["e0".into()]).await.unwrap();
    assert_eq!(t.stop(), 0);

    let t = Timberd::start(dir.path(), &["--sync", "always"]);
    let c = t.grpc().await;
    let h = reqwest::Client::new();
    assert_eq!(c.get("graceful").await.unwrap(), Some(Bytes::from("g")));
    for i in 0..50 {
        c.put(format!("g{i}"), "x").await.unwrap();
        let r = h.put(http(&t, &format!("/v1/kv/h{i}"))).body("y").send().await.unwrap();
        assert_eq!(r.status(), 204);
        c.append("s", vec![format!("e{}", 1 + i).into()]).await.unwrap();
        let r = h.post(http(&t, "/v1/streams/s/entries")).body("http").send().await.unwrap();
        assert_eq!(r.status(), 201);
    }
    t.signal(rustix::process::Signal::KILL);
    drop(t);

    let t = Timberd::start(dir.path(), &[]);
    let c = t.grpc().await;
    for i in 0..50 {
        assert_eq!(c.get(format!("g{i}")).await.unwrap(), Some(Bytes::from("x")));
        assert_eq!(c.get(format!("h{i}")).await.unwrap(), Some(Bytes::from("y")));
    }
    assert_eq!(c.stream_info("s").await.unwrap().next_id, 101);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_every_port_leaves_the_server_and_data_intact() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let c = t.grpc().await;
    c.put("keep", "me").await.unwrap();
    let mut seed = 0x9e3779b97f4a7c15u64;
    for port in [t.port, t.grpc_port, t.http_port] {
        for round in 0..20 {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let junk: Vec<u8> = (0..64 + round * 37)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = s.write_all(&junk);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    }
    // Malformed HTTP/2 preface then garbage, and a half HTTP/1 request.
    for bytes in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\xff\xff\xff"[..],
        b"GET /v1/kv/keep HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    ] {
        for port in [t.grpc_port, t.http_port] {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = s.read_to_end(&mut Vec::new());
        }
    }
    assert_eq!(c.get("keep").await.unwrap(), Some(Bytes::from("me")));
    let mut r = t.client();
    assert_eq!(cmd("GET").arg("keep").query::<String>(&mut r).unwrap(), "me");
    let body = reqwest::get(http(&t, "/v1/kv/keep")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "me");
    assert_eq!(t.stop(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_connection_limit_for_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &["--max-connections", "2"]);
    let mut a = t.client();
    let mut b = t.client();
    let _: () = cmd("SET").arg("k").arg("v").query(&mut a).unwrap();
    let _: () = cmd("PING").query(&mut b).unwrap();
    // Both slots are taken: HTTP gets a 503 with a reason, RESP an error, gRPC no connection.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", t.http_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.1 503") && reply.contains("max number of connections"),
        "{reply}"
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("max number of clients reached"), "{reply}");
    let opts = timber_client::Options {
        timeout: Duration::from_secs(2),
        retries: 0,
        ..Default::default()
    };
    let refused =
        match Client::connect_with(format!("http://127.0.0.1:{}", t.grpc_port), opts).await {
            Err(_) => true,
            Ok(c) => c.get("k").await.is_err(),
        };
    assert!(refused, "gRPC beyond the limit is refused");
    // A slot freed is a slot for any endpoint.
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match reqwest::get(http(&t, "/v1/kv/k")).await {
            Ok(r) if r.status() == 200 => {
                assert_eq!(r.text().await.unwrap(), "v");
                break;
            }
            _ => {
                assert!(std::time::Instant::now() < deadline, "the freed slot never came back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let _: () = cmd("PING").query(&mut a).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_on_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &["--idle-timeout-secs", "1"]);
    let start = std::time::Instant::now();
    let mut socks: Vec<std::net::TcpStream> = [t.port, t.grpc_port, t.http_port]
        .into_iter()
        .map(|p| {
            let s = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s
        })
        .collect();
    for s in &mut socks {
        let mut sink = Vec::new();
        // The server closes the connection: the read ends (EOF or reset), not the 30 s timeout.
        let r = s.read_to_end(&mut sink);
        assert!(!matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "{r:?}");
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(25), "{took:?}");
    // Active connections are not affected.
    let c = t.grpc().await;
    c.put("k", "v").await.unwrap();
    assert_eq!(c.get("k").await.unwrap(), Some(Bytes::from("v")));
}

/// Conditional transactions through gRPC (timber-client) and HTTP: compare-and-swap,
/// create-if-absent, operations seeing earlier writes, bad requests refused with nothing
/// written, and concurrent compare-and-swap increments losing nothing.
#[tokio::test(flavor = "multi_thread")]
async fn conditional_transactions_through_grpc_and_http() {
    use timber_client::{Cmp, Txn, TxnOpResult};
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &["--max-request-bytes", "65536"]);
    let c = t.grpc().await;
    c.put("k", "v1").await.unwrap();
    let cas = |old: &str, new: &str| {
        Txn::new()
            .when_value("k", Cmp::Equal, old.to_string())
            .then_put("k", new.to_string())
            .then_get("k")
            .else_get("k")
    };
    let done = c.txn(cas("v1", "v2")).await.unwrap();
    assert!(done.succeeded);
    assert_eq!(done.results, [TxnOpResult::Put, TxnOpResult::Get(Some("v2".into()))]);
    let done = c.txn(cas("v1", "v3")).await.unwrap();
    assert!(!done.succeeded);
    assert_eq!(done.results, [TxnOpResult::Get(Some("v2".into()))]);
    assert!(c.compare_and_swap("lock", None, "me").await.unwrap());
    assert!(!c.compare_and_swap("lock", None, "you").await.unwrap());
    assert!(c.compare_and_swap("lock", Some("me".into()), "you").await.unwrap());
    // The same key from RESP.
    assert_eq!(cmd("GET").arg("lock").query::<String>(&mut t.client()).unwrap(), "you");
    let done = c
        .txn(
            Txn::new()
                .when_exists("lock", true)
                .when_value("k", Cmp::Greater, "v1")
                .then_delete("lock")
                .then_get("lock"),
        )
        .await
        .unwrap();
    assert!(done.succeeded);
    assert_eq!(done.results, [TxnOpResult::Delete { existed: true }, TxnOpResult::Get(None)]);

    // Bad requests: refused, nothing written.
    let e = c.txn(Txn::new().then_put("k", vec![0u8; 70_000])).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert_eq!(c.get("k").await.unwrap(), Some(Bytes::from("v2")));

    // HTTP: the same transaction as JSON.
    let http_client = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let req = http_client.post(http(&t, "/v1/txn")).json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = post(serde_json::json!({
        "compare": [{"key": "k", "op": "equal", "value": "v2"}, {"key": "nope", "exists": false}],
        "success": [{"put": {"key": "k", "value_base64": "/w=="}}, {"get": {"key": "k"}}, {"delete": {"key": "nope"}}],
        "failure": [{"get": {"key": "k"}}],
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["succeeded"], true);
    assert_eq!(body["results"][1]["get"]["value_base64"], "/w==");
    assert_eq!(body["results"][2]["delete"]["existed"], false);
    assert_eq!(c.get("k").await.unwrap(), Some(Bytes::from_static(&[0xff])));
    let (status, body) = post(serde_json::json!({
        "compare": [{"key": "k", "op": "equal", "value": "v2"}],
        "failure": [{"get": {"key": "missing"}}],
    }))
    .await;
    assert_eq!((status, &body["succeeded"]), (200, &serde_json::json!(false)));
    assert_eq!(body["results"][0]["get"]["value"], serde_json::Value::Null);
    for bad in [
        serde_json::json!({"compare": [{"key": "k", "op": "sideways", "value": "x"}]}),
        serde_json::json!({"compare": [{"key": "k"}]}),
        serde_json::json!({"compare": [{"key": "k", "op": "less", "exists": true}]}),
        serde_json::json!({"success": [{"put": {"key": "k"}}]}),
        serde_json::json!({"success": [{"frobnicate": {"key": "k"}}]}),
        serde_json::json!({"success": "put"}),
    ] {
        let (status, body) = post(bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    assert_eq!(c.get("k").await.unwrap(), Some(Bytes::from_static(&[0xff])));

    // Compare-and-swap increments from many tasks at once: each retried until it lands.
    c.put("n", "0").await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                for _ in 0..25 {
                    loop {
                        let cur = c.get("n").await.unwrap().unwrap();
                        let next = (std::str::from_utf8(&cur).unwrap().parse::<u64>().unwrap() + 1)
                            .to_string();
                        if c.compare_and_swap("n", Some(cur), next).await.unwrap() {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(c.get("n").await.unwrap(), Some(Bytes::from("200")));
}

/// Versions through gRPC, HTTP and RESP writes: every write of a key, even of the same value
/// and from a Redis client, gives it a greater version; a transaction conditioned on a version
/// runs only if nobody wrote the key since; a missing key is version 0; versions go on growing
/// after a SIGKILL and restart.
#[tokio::test(flavor = "multi_thread")]
async fn versions_change_with_every_write_and_guard_transactions() {
    use timber_client::{Cmp, Txn};
    let dir = tempfile::tempdir().unwrap();
    let last = {
        let t = Timberd::start(dir.path(), &["--sync", "always"]);
        let c = t.grpc().await;
        assert_eq!(c.get_versioned("k").await.unwrap(), None);
        let create = Txn::new().when_version("k", Cmp::Equal, 0).then_put("k", "a");
        assert!(c.txn(create.clone()).await.unwrap().succeeded);
        assert!(!c.txn(create).await.unwrap().succeeded, "exists now");
        let (v, v1) = c.get_versioned("k").await.unwrap().unwrap();
        assert_eq!(v, Bytes::from("a"));
        // The same value again, through RESP: a new version.
        let _: () = cmd("SET").arg("k").arg("a").query(&mut t.client()).unwrap();
        let (_, v2) = c.get_versioned("k").await.unwrap().unwrap();
        assert!(v2 > v1, "{v2} after {v1}");
        let swap = |v: u64| Txn::new().when_version("k", Cmp::Equal, v).then_put("k", "b");
        assert!(!c.txn(swap(v1)).await.unwrap().succeeded, "written since v1");
        assert_eq!(c.get("k").await.unwrap(), Some(Bytes::from("a")));
        assert!(c.txn(swap(v2)).await.unwrap().succeeded);
        let (_, v3) = c.get_versioned("k").await.unwrap().unwrap();
        assert!(v3 > v2);

        // HTTP: the version in a header and in a transaction's reads; compared in JSON.
        let http_client = reqwest::Client::new();
        let r = http_client.get(http(&t, "/v1/kv/k")).send().await.unwrap();
        assert_eq!(r.headers()["x-timber-version"].to_str().unwrap(), v3.to_string());
        let body = serde_json::json!({
            "compare": [{"key": "k", "op": "equal", "version": v3}],
            "success": [{"put": {"key": "k", "value": "c"}}],
            "failure": [{"get": {"key": "k"}}],
        });
        let post = || http_client.post(http(&t, "/v1/txn")).json(&body).send();
        let r: serde_json::Value = post().await.unwrap().json().await.unwrap();
        assert_eq!(r["succeeded"], true, "{r}");
        let r: serde_json::Value = post().await.unwrap().json().await.unwrap();
        assert_eq!(r["succeeded"], false, "{r}");
        let (_, v4) = c.get_versioned("k").await.unwrap().unwrap();
        assert_eq!(r["results"][0]["get"]["version"], v4, "{r}");
        assert!(v4 > v3);
        let bad = serde_json::json!({"compare": [{"key": "k", "version": -1}]});
        let r = http_client.post(http(&t, "/v1/txn")).json(&bad).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
        // A key holding a Redis stream fails every version comparison.
        let _: String =
            cmd("XADD").arg("s").arg("*").arg("f").arg("v").query(&mut t.client()).unwrap();
        for op in [Cmp::Equal, Cmp::NotEqual, Cmp::Less, Cmp::Greater] {
            let t = Txn::new().when_version("s", op, 0);
            assert!(!c.txn(t).await.unwrap().succeeded, "{op:?}");
        }
        drop(t); // SIGKILL
        v4
    };
    let t = Timberd::start(dir.path(), &[]);
    let c = t.grpc().await;
    assert_eq!(c.get_versioned("k").await.unwrap(), Some((Bytes::from("c"), last)));
    c.put("k", "c").await.unwrap();
    let (_, after) = c.get_versioned("k").await.unwrap().unwrap();
    assert!(after > last, "{after} after {last} across a restart");
}

/// Interactive transactions through gRPC (timber-client): own writes, commit and rollback,
/// conflicts with other transactions and with plain writes (RESP) as aborts, pessimistic lock
/// waits, WATCH seeing their commits, and concurrent transfers through `transact` keeping
/// the total.
#[tokio::test(flavor = "multi_thread")]
async fn interactive_transactions_through_grpc() {
    use timber_client::{Isolation, TxnOptions};
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let c = t.grpc().await;
    let ser = TxnOptions::new(Isolation::Serializable);
    c.put("a", "1").await.unwrap();

    let tx = c.begin(ser).await.unwrap();
    assert_eq!(tx.get("a").await.unwrap(), Some(Bytes::from("1")));
    tx.put("b", "2").await.unwrap();
    assert!(tx.delete("a").await.unwrap());
    assert_eq!(tx.get("a").await.unwrap(), None);
    let seen = tx.scan(Scan::default()).await.unwrap();
    assert_eq!(seen, [(Bytes::from("b"), Bytes::from("2"))]);
    assert_eq!(c.get("b").await.unwrap(), None, "nothing visible before commit");
    tx.commit().await.unwrap();
    assert_eq!(c.get("a").await.unwrap(), None);
    assert_eq!(cmd("GET").arg("b").query::<String>(&mut t.client()).unwrap(), "2");
    // Over: any further call is an abort.
    assert_eq!(tx.get("b").await.unwrap_err().code(), Some(Code::Aborted));

    let tx = c.begin(ser).await.unwrap();
    tx.put("b", "lost").await.unwrap();
    assert!(tx.rollback().await.unwrap());
    assert_eq!(c.get("b").await.unwrap(), Some(Bytes::from("2")));

    // Write skew between two serializable transactions: one of them aborts.
    c.put("x", "1").await.unwrap();
    c.put("y", "1").await.unwrap();
    let (t1, t2) = (c.begin(ser).await.unwrap(), c.begin(ser).await.unwrap());
    for (tx, write) in [(&t1, "x"), (&t2, "y")] {
        assert_eq!(tx.get("x").await.unwrap(), Some(Bytes::from("1")));
        assert_eq!(tx.get("y").await.unwrap(), Some(Bytes::from("1")));
        tx.put(write, "0").await.unwrap();
    }
    t1.commit().await.unwrap();
    assert!(t2.commit().await.unwrap_err().is_conflict());

    // A plain write (RESP INCR) of a key it read aborts it too, and WATCH sees its commit.
    let tx = c.begin(ser).await.unwrap();
    tx.get("n").await.unwrap();
    tx.put("m", "1").await.unwrap();
    let mut r = t.client();
    let _: i64 = cmd("INCR").arg("n").query(&mut r).unwrap();
    assert!(tx.commit().await.unwrap_err().is_conflict());
    assert_eq!(c.get("m").await.unwrap(), None);
    let _: () = cmd("WATCH").arg("m").query(&mut r).unwrap();
    let tx = c.begin(ser).await.unwrap();
    tx.put("m", "2").await.unwrap();
    tx.commit().await.unwrap();
    let exec: Option<(String,)> =
        redis::pipe().atomic().cmd("SET").arg("m").arg("3").query(&mut r).unwrap();
    assert_eq!(exec, None, "EXEC must see the transaction's write of a watched key");

    // Pessimistic: a key locked by one waits the other out, which then aborts.
    let opts = TxnOptions {
        lock_timeout: Some(Duration::from_millis(100)),
        ..TxnOptions::pessimistic(Isolation::Snapshot)
    };
    let (p1, p2) = (c.begin(opts).await.unwrap(), c.begin(opts).await.unwrap());
    p1.get_for_update("lockme").await.unwrap();
    assert_eq!(p2.put("lockme", "2").await.unwrap_err().code(), Some(Code::Aborted));
    // The aborted one is over (its locks released at once): run it again from the start.
    assert_eq!(p2.get("lockme").await.unwrap_err().code(), Some(Code::Aborted));
    p1.put("lockme", "1").await.unwrap();
    p1.commit().await.unwrap();
    // A limited scan returns that many.
    let tx = c.begin(ser).await.unwrap();
    assert_eq!(tx.scan(Scan { limit: 1, ..Scan::default() }).await.unwrap().len(), 1);
    tx.rollback().await.unwrap();

    // Transfers between accounts from many tasks at once, retried on conflicts: the total
    // stays, and every transfer lands once.
    for i in 0..5 {
        c.put(format!("acct/{i}"), "100").await.unwrap();
    }
    let tasks: Vec<_> = (0..6u64)
        .map(|n| {
            let c = c.clone();
            tokio::spawn(async move {
                for k in 0..10u64 {
                    let (from, to) =
                        (format!("acct/{}", (n + k) % 5), format!("acct/{}", (n + k + 1) % 5));
                    c.transact(TxnOptions::new(Isolation::Snapshot), |t| {
                        let (from, to) = (from.clone(), to.clone());
                        async move {
                            let num = |v: Option<Bytes>| -> i64 {
                                std::str::from_utf8(&v.unwrap()).unwrap().parse().unwrap()
                            };
                            let a = num(t.get_for_update(from.clone()).await?);
                            let b = num(t.get_for_update(to.clone()).await?);
                            t.put(from, (a - 1).to_string()).await?;
                            t.put(to, (b + 1).to_string()).await?;
                            let done = t.get("transfers").await?.map_or(0, |v| num(Some(v)));
                            t.put("transfers", (done + 1).to_string()).await
                        }
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let all = c.scan(Scan { prefix: "acct/".into(), ..Scan::default() }).await.unwrap();
    let total: i64 =
        all.iter().map(|(_, v)| std::str::from_utf8(v).unwrap().parse::<i64>().unwrap()).sum();
    assert_eq!(total, 500);
    assert_eq!(c.get("transfers").await.unwrap(), Some(Bytes::from("60")));
}

/// Interactive transactions through HTTP: begin, reads of its own writes, scan, commit, a
/// conflict as 409, rollback, bad input as 400.
#[tokio::test(flavor = "multi_thread")]
async fn interactive_transactions_through_http() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &["--max-request-bytes", "65536"]);
    let h = reqwest::Client::new();
    let url = |p: &str| http(&t, p);
    let begin = |isolation: &str| {
        let req = h.post(url("/v1/txns")).json(&serde_json::json!({ "isolation": isolation }));
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["id"].as_u64().unwrap()
        }
    };
    h.put(url("/v1/kv/a")).body("1").send().await.unwrap();
    let id = begin("serializable").await;
    let r = h.get(url(&format!("/v1/txns/{id}/kv/a"))).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "1");
    let r = h.put(url(&format!("/v1/txns/{id}/kv/b?ttl_ms=60000"))).body("2").send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = h.get(url(&format!("/v1/txns/{id}/kv?prefix="))).send().await.unwrap();
    let items = r.json::<serde_json::Value>().await.unwrap()["items"].clone();
    assert_eq!(items, serde_json::json!([{"key": "a", "value": "1"}, {"key": "b", "value": "2"}]));
    assert_eq!(h.get(url("/v1/kv/b")).send().await.unwrap().status(), 404);
    let r = h.post(url(&format!("/v1/txns/{id}/commit"))).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(h.get(url("/v1/kv/b")).send().await.unwrap().text().await.unwrap(), "2");

    // A key it read, written meanwhile: 409 at commit; nothing written.
    let id = begin("serializable").await;
    h.get(url(&format!("/v1/txns/{id}/kv/a"))).send().await.unwrap();
    h.put(url(&format!("/v1/txns/{id}/kv/c"))).body("3").send().await.unwrap();
    h.put(url("/v1/kv/a")).body("9").send().await.unwrap();
    let r = h.post(url(&format!("/v1/txns/{id}/commit"))).send().await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(h.get(url("/v1/kv/c")).send().await.unwrap().status(), 404);

    // Rollback; then the id is unknown (409: begin again).
    let id = begin("snapshot").await;
    h.put(url(&format!("/v1/txns/{id}/kv/c"))).body("4").send().await.unwrap();
    let r = h.delete(url(&format!("/v1/txns/{id}"))).send().await.unwrap();
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["existed"], true);
    assert_eq!(h.post(url(&format!("/v1/txns/{id}/commit"))).send().await.unwrap().status(), 409);
    assert_eq!(h.get(url("/v1/kv/c")).send().await.unwrap().status(), 404);

    // Bad input.
    let r = h
        .post(url("/v1/txns"))
        .json(&serde_json::json!({"isolation": "chaos"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let id = begin("snapshot").await;
    let r =
        h.put(url(&format!("/v1/txns/{id}/kv/big"))).body(vec![0u8; 70_000]).send().await.unwrap();
    assert!(r.status() == 400 || r.status() == 413, "{}", r.status());
    let r = h.get(url("/v1/txns/notanumber/kv/a")).send().await.unwrap();
    assert_eq!(r.status(), 400);
}
