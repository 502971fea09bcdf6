//! timberd with its stream fragments in an S3-compatible store: the real binary against a real
//! S3 server on 127.0.0.1 (timber-s3-server: s3s + s3s-fs, run by the test). Appends through
//! every endpoint land in the bucket and come back; acknowledged entries still only in the
//! journal survive SIGKILL and graceful restarts; the store stopped mid-load and started again;
//! wrong settings at startup stop timberd with a clear message; secrets never show.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Timberd;
use timber_s3_server::{S3Server, ACCESS_KEY, SECRET_KEY};

const BUCKET: &str = "timber";

/// The S3 server, on a runtime of its own (the test's code is blocking).
struct Store {
    rt: tokio::runtime::Runtime,
    server: S3Server,
}

impl Store {
    fn start() -> Store {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(S3Server::start()).unwrap();
        server.create_bucket(BUCKET).unwrap();
        Store { rt, server }
    }

    fn stop(&mut self) {
        self.server.stop();
    }

    fn restart(&mut self) {
        let _in = self.rt.enter();
        self.rt.block_on(self.server.restart()).unwrap();
    }

    /// The fragment objects under `prefix` in the bucket.
    fn fragments(&self, prefix: &str) -> Vec<String> {
        self.server
            .objects(BUCKET)
            .into_iter()
            .filter(|o| o.starts_with(prefix) && o.ends_with(".frag"))
            .collect()
    }

    /// timberd's flags for this store, under `prefix`.
    fn flags(&self, prefix: &str) -> Vec<String> {
        vec![
            "--stream-store".into(),
            format!("s3://{BUCKET}/{prefix}"),
            "--s3-endpoint".into(),
            self.server.endpoint(),
        ]
    }
}

const CREDENTIALS: [(&str, &str); 2] =
    [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY)];

fn start(dir: &Path, store: &Store, prefix: &str, extra: &[&str]) -> Timberd {
    let mut flags = store.flags(prefix);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Timberd::start_env(dir, &flags, &CREDENTIALS)
}

/// Polls `f` until it holds (bounded).
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn xrange_ids(c: &mut redis::Connection, key: &str) -> Vec<String> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query(c).unwrap();
    entries.into_iter().map(|(id, _)| id).collect()
}

fn xadd(c: &mut redis::Connection, key: &str, n: usize) -> redis::RedisResult<String> {
    redis::cmd("XADD").arg(key).arg("*").arg("n").arg(n).query(c)
}

fn http(t: &Timberd, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", t.http_port)
}

#[test]
fn appends_of_every_endpoint_land_in_the_bucket_and_come_back() {
    let store = Store::start();
    let dir = tempfile::tempdir().unwrap();
    let t = start(dir.path(), &store, "node1", &[]);
    let mut c = t.client();
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = xadd(&mut c, "events", i).unwrap();
        ids.push(id);
    }
    let rt = runtime();
    rt.block_on(async {
        let g = t.grpc().await;
        g.create_stream("log", None, None).await.unwrap();
        let first = g.append("log", (0..10).map(|i| Bytes::from(format!("g{i}"))).collect()).await;
        assert_eq!(first.unwrap(), 0);
        let h = reqwest::Client::new();
        let r = h.post(http(&t, "/v1/streams/log/entries")).body("from-http").send().await.unwrap();
        assert!(r.status().is_success(), "{r:?}");
        // Read back through gRPC and HTTP.
        let mut reader = g.reader("log", timber_client::Start::Earliest, false).await.unwrap();
        let mut got = Vec::new();
        while let Some(e) = reader.next().await.unwrap() {
            got.push(e.data);
        }
        assert_eq!(got.len(), 11);
        assert_eq!(got[10], Bytes::from("from-http"));
        let body: serde_json::Value = h
            .get(http(&t, "/v1/streams/log/entries?from=0"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["entries"].as_array().unwrap().len(), 11);
    });
    assert_eq!(xrange_ids(&mut c, "events"), ids);
    // The fragments are cut from the journal within a second or so, into the bucket under the
    // server's prefix.
    until("fragments of both streams are in the bucket", || {
        rt.block_on(async { t.grpc().await.status().await.unwrap().journal_backlog_bytes == 0 })
            && store.fragments("node1/streams/").len() >= 2
    });
    let status = rt.block_on(async { t.grpc().await.status().await.unwrap() });
    assert_eq!(status.stream_store, format!("s3://{BUCKET}/node1 at {}", store.server.endpoint()));
    assert_eq!((status.store_unavailable, status.store_last_error), (None, None));
    let metrics =
        rt.block_on(async { reqwest::get(http(&t, "/metrics")).await.unwrap().text().await });
    let metrics = metrics.unwrap();
    assert!(metrics.contains("timber_stream_store_info{backend=\"s3\"} 1"), "{metrics}");
    assert!(metrics.contains("timber_stream_journal_backlog_bytes 0"), "{metrics}");
    assert!(metrics.contains("timber_stream_store_seconds"), "{metrics}");
    let info: String = redis::cmd("INFO").query(&mut c).unwrap();
    assert!(info.contains("stream_store:s3"), "{info}");

    // After a restart, everything is read back from the bucket.
    assert_eq!(t.stop(), 0);
    let t = start(dir.path(), &store, "node1", &[]);
    let mut c = t.client();
    assert_eq!(xrange_ids(&mut c, "events"), ids);
    let logged: String = t.logged().join("\n");
    assert!(!logged.contains(SECRET_KEY) && !metrics.contains(SECRET_KEY), "a secret was shown");
    assert!(!info.contains(SECRET_KEY), "{info}");
}

#[test]
fn entries_acknowledged_only_in_the_journal_survive_sigkill_and_graceful_stops() {
    let mut store = Store::start();
    let dir = tempfile::tempdir().unwrap();
    let t = start(dir.path(), &store, "n", &[]);
    let mut c = t.client();
    let mut ids: Vec<String> = (0..5).map(|i| xadd(&mut c, "s", i).unwrap()).collect();
    // With the store out, appends are acknowledged from the journal.
    store.stop();
    ids.extend((5..15).map(|i| xadd(&mut c, "s", i).unwrap()));
    t.signal(rustix::process::Signal::KILL);
    drop(t);
    store.restart();
    let t = start(dir.path(), &store, "n", &[]);
    let mut c = t.client();
    assert_eq!(xrange_ids(&mut c, "s"), ids, "after SIGKILL");
    let rt = runtime();
    until("the replayed entries are in the bucket", || {
        rt.block_on(async { t.grpc().await.status().await.unwrap().journal_backlog_bytes == 0 })
            && !store.fragments("n/streams/").is_empty()
    });

    // Closes the gRPC clients' connections (a runtime that is not running cannot).
    drop(rt);
    // A graceful stop while the store is out does not wait for it, and loses nothing.
    store.stop();
    ids.extend((15..25).map(|i| xadd(&mut c, "s", i).unwrap()));
    let stopping = Instant::now();
    let mut t = t;
    t.signal(rustix::process::Signal::TERM);
    let code = t.child.wait().unwrap().code();
    let took = stopping.elapsed();
    assert_eq!(code, Some(0), "{:#?}", t.logged());
    assert!(took < Duration::from_secs(30), "SIGTERM waited {took:?}: {:#?}", t.logged());
    drop(t);
    store.restart();
    let t = start(dir.path(), &store, "n", &[]);
    assert_eq!(xrange_ids(&mut t.client(), "s"), ids, "after SIGTERM during the outage");
}

#[test]
fn the_store_stopped_mid_load_and_started_again() {
    let mut store = Store::start();
    let dir = tempfile::tempdir().unwrap();
    let t = start(dir.path(), &store, "n", &["--store-outage-secs", "1"]);
    let mut c = t.client();
    let mut ids: Vec<String> = Vec::new();
    for i in 0..10 {
        ids.push(xadd(&mut c, "s", i).unwrap());
    }
    store.stop();
    // Acknowledged until the store has been out for a second, then refused, retryably.
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        assert!(Instant::now() < deadline, "XADD was never refused");
        match xadd(&mut c, "s", ids.len()) {
            Ok(id) => ids.push(id),
            Err(e) => break e,
        }
    };
    assert_eq!(refused.code(), Some("TRYAGAIN"), "{refused}");
    assert!(refused.to_string().contains("unavailable"), "{refused}");
    let rt = runtime();
    rt.block_on(async {
        let g = t.grpc().await;
        let e =
            g.create_stream("log", None, None).await.and(g.append("log", vec!["x".into()]).await);
        assert_eq!(e.unwrap_err().code(), Some(timber_client::Code::Unavailable));
        let r = reqwest::Client::new()
            .post(http(&t, "/v1/streams/log/entries"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let s = g.status().await.unwrap();
        assert!(s.store_unavailable.is_some() && s.journal_backlog_bytes > 0, "{s:?}");
        assert!(s.store_last_error.is_some(), "{s:?}");
    });
    // Reads keep working meanwhile.
    assert_eq!(xrange_ids(&mut c, "s"), ids);
    store.restart();
    // timberd recovers by itself.
    until("XADD is accepted again", || match xadd(&mut c, "s", 0) {
        Ok(id) => {
            ids.push(id);
            true
        }
        Err(e) if e.code() == Some("TRYAGAIN") => false,
        Err(e) => panic!("{e}"),
    });
    assert_eq!(xrange_ids(&mut c, "s"), ids);
    until("the backlog is uploaded", || {
        rt.block_on(async { t.grpc().await.status().await.unwrap().journal_backlog_bytes == 0 })
    });
    assert_eq!(t.stop(), 0);
}

/// Runs timberd until it exits (it should not start): its exit code and what it printed.
fn fails_to_start(dir: &Path, flags: &[String], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_timberd"))
        .args(["--data-dir", dir.to_str().unwrap(), "--resp-addr", "127.0.0.1:0"])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(flags)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn wrong_store_settings_stop_timberd_with_one_clear_message() {
    let store = Store::start();
    let dir = tempfile::tempdir().unwrap();
    let wrong = "wrong-secret-xyz";
    let (code, err) = fails_to_start(
        dir.path(),
        &store.flags("n"),
        &[("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", wrong)],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("credentials were refused"), "{err}");
    assert!(!err.contains(wrong) && !err.contains(SECRET_KEY), "{err}");

    let mut flags = store.flags("n");
    flags[1] = "s3://no-such-bucket/n".into();
    let (code, err) = fails_to_start(dir.path(), &flags, &CREDENTIALS);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("bucket does not exist") && err.contains("no-such-bucket"), "{err}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut flags = store.flags("n");
    flags[3] = format!("http://{closed}");
    let (code, err) = fails_to_start(dir.path(), &flags, &CREDENTIALS);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot be reached") && err.contains(&closed.to_string()), "{err}");

    let (code, err) = fails_to_start(dir.path(), &store.flags("n"), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");

    // `--help` shows no credential.
    let help = Command::new(env!("CARGO_BIN_EXE_timberd"))
        .arg("--help")
        .envs(CREDENTIALS.iter().copied())
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--stream-store") && !help.contains(SECRET_KEY), "{help}");
}
