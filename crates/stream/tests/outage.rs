//! The object store going away and coming back, with a journal: appends are acknowledged from
//! the journal through a short outage, refused (retryably) past the outage limit, and uploaded
//! once the store is back; a writer closed during an outage leaves its entries in the journal;
//! opening checks the store and says what is wrong with it.

mod common;

use std::time::{Duration, Instant};

use timber_s3_server::S3Server;
use timber_stream::{
    Error, Journal, Options, S3Options, Start, Storage, StreamConfig, Streams, WriterOptions,
};

fn options(s3: S3Options) -> Options {
    Options::default()
        .storage(Storage::S3(s3))
        .maintenance_interval(None)
        .retries(1, Duration::from_millis(5))
        .request_timeout(Duration::from_secs(2))
        .journal(Journal::Always)
        .writer(WriterOptions {
            max_entries: 4,
            max_interval: Duration::from_millis(5),
            ..WriterOptions::object_storage()
        })
        .outage_limits(Duration::from_millis(300), 1 << 30)
}

fn entry(i: u64) -> Vec<u8> {
    format!("entry {i}").into_bytes()
}

/// Reads every entry of `name` from the start.
async fn read_all(s: &Streams, name: &str, n: usize) -> Vec<(u64, Vec<u8>)> {
    let mut r = s.reader(name, Start::Earliest).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let e = tokio::time::timeout(Duration::from_secs(30), r.next()).await.unwrap().unwrap();
        out.push((e.id, e.data.to_vec()));
    }
    out
}

/// Polls `f` until it holds (bounded).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn appends_are_acknowledged_through_an_outage_then_refused_then_uploaded() {
    common::runtime().block_on(async {
        let mut server = S3Server::start().await.unwrap();
        let s3 = common::bucket(&server, "outage");
        let dir = tempfile::tempdir().unwrap();
        let s = Streams::open(dir.path(), options(s3)).await.unwrap();
        s.create("s", StreamConfig::default()).await.unwrap();
        // A reader at the tail all along: the fragments recorded while it reads go to the cache.
        let _tail_reader = s.reader("s", Start::Latest).unwrap();
        let w = s.writer("s").await.unwrap();
        let mut acked = Vec::new();
        for i in 0..10 {
            acked.push((w.append(entry(i)).await.unwrap(), entry(i)));
        }
        assert_eq!(read_all(&s, "s", 10).await, acked);
        server.stop();
        // Acknowledged from the journal until the store has been out for the outage limit.
        let deadline = Instant::now() + Duration::from_secs(60);
        let refused = loop {
            assert!(Instant::now() < deadline, "appends were never refused");
            let i = acked.len() as u64;
            match w.append(entry(i)).await {
                Ok(id) => acked.push((id, entry(i))),
                Err(e @ Error::StoreUnavailable { .. }) => break e,
                Err(e) => panic!("unexpected {e}"),
            }
        };
        assert!(acked.len() > 10, "no append was acknowledged during the outage");
        let msg = refused.to_string();
        assert!(msg.contains("unavailable") && msg.contains("outage"), "{msg}");
        assert!(!msg.contains(common::SECRET_KEY), "{msg}");
        let status = s.store_status();
        assert_eq!(status.backend, "s3");
        assert!(status.unavailable_for.is_some() && status.journal_backlog_bytes > 0, "{status:?}");
        // Reads of what is acknowledged keep working meanwhile: from the cache, then the
        // journal's tail.
        assert_eq!(read_all(&s, "s", acked.len()).await, acked);

        server.restart().await.unwrap();
        until("the store is seen back", || s.store_status().unavailable_for.is_none()).await;
        for _ in 0..5 {
            let i = acked.len() as u64;
            acked.push((w.append(entry(i)).await.unwrap(), entry(i)));
        }
        w.close().await.unwrap();
        assert_eq!(s.store_status().journal_backlog_bytes, 0);
        assert_eq!(read_all(&s, "s", acked.len()).await, acked);
        let frags = server.objects("outage").into_iter().filter(|o| o.ends_with(".frag")).count();
        assert!(frags > 0);
        s.close().await.unwrap();
        // And after a reopen, from the fragments alone.
        let s =
            Streams::open(dir.path(), options(common::bucket(&server, "outage"))).await.unwrap();
        assert_eq!(read_all(&s, "s", acked.len()).await, acked);
    });
}

#[test]
fn a_writer_closed_during_an_outage_leaves_its_entries_in_the_journal() {
    common::runtime().block_on(async {
        let mut server = S3Server::start().await.unwrap();
        let s3 = common::bucket(&server, "closing");
        let dir = tempfile::tempdir().unwrap();
        let s = Streams::open(dir.path(), options(s3.clone())).await.unwrap();
        s.create("s", StreamConfig::default()).await.unwrap();
        let w = s.writer("s").await.unwrap();
        let mut acked = Vec::new();
        for i in 0..5 {
            acked.push((w.append(entry(i)).await.unwrap(), entry(i)));
        }
        server.stop();
        for i in 5..10 {
            acked.push((w.append(entry(i)).await.unwrap(), entry(i)));
        }
        // The close does not wait for the store.
        let closed = tokio::time::timeout(Duration::from_secs(30), w.close()).await;
        let e = closed.expect("close waited for the store").unwrap_err();
        assert!(e.to_string().contains("unavailable"), "{e}");
        s.close().await.unwrap();
        server.restart().await.unwrap();
        let s = Streams::open(dir.path(), options(s3)).await.unwrap();
        assert_eq!(read_all(&s, "s", acked.len()).await, acked);
        let w = s.writer("s").await.unwrap();
        assert_eq!(w.append(entry(10)).await.unwrap(), 10);
    });
}

#[test]
fn open_says_what_is_wrong_with_the_store() {
    common::runtime().block_on(async {
        let server = S3Server::start().await.unwrap();
        let good = common::bucket(&server, "present");
        let dir = tempfile::tempdir().unwrap();
        let open = |s3: S3Options| {
            let dir = dir.path().join(format!("{}", rand::random::<u64>()));
            async move { Streams::open(dir, options(s3)).await }
        };
        let unusable = |r: timber_stream::Result<Streams>| match r {
            Err(e @ Error::StoreUnusable { .. }) => e.to_string(),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened"),
        };
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let m = unusable(
            open(S3Options { endpoint: Some(format!("http://{closed}")), ..good.clone() }).await,
        );
        assert!(m.contains("cannot be reached") && m.contains(&closed.to_string()), "{m}");
        let m = unusable(open(S3Options { bucket: "missing".into(), ..good.clone() }).await);
        assert!(m.contains("bucket does not exist") && m.contains("missing"), "{m}");
        let wrong = "not-the-secret-123";
        let m = unusable(open(S3Options { secret_access_key: wrong.into(), ..good.clone() }).await);
        assert!(m.contains("credentials were refused"), "{m}");
        assert!(!m.contains(wrong) && !m.contains(common::SECRET_KEY), "{m}");
        // The right settings open, and the probe leaves nothing behind.
        open(good).await.unwrap();
        assert!(server.objects("present").is_empty(), "{:?}", server.objects("present"));
    });
}
