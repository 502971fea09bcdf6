//! Fault injection: a wrapper object store that fails calls, fails them after doing them (the
//! client cannot tell whether the put happened), delays them and hangs past the request timeout.
//! Writers must retry, keep order, never report an unwritten entry as written, and never lose an
//! acknowledged one.

mod common;

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::{Backend, Place, BACKENDS};
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use timber_stream::{Error, Options, Start, Storage, StreamConfig, Streams, WriterOptions};

/// Per-call fault probabilities, in percent.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    fail: u32,
    fail_after: u32,
    hang: u32,
    max_delay_ms: u64,
}

#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn ObjectStore>,
    /// Puts wait while this is false.
    open: tokio::sync::watch::Sender<bool>,
    faults: Mutex<Faults>,
    rng: Mutex<rand::rngs::StdRng>,
    injected: AtomicU64,
}

enum Fault {
    None,
    Fail,
    FailAfter,
    Hang,
}

impl Faulty {
    fn new(inner: Arc<dyn ObjectStore>, seed: u64) -> Faulty {
        Faulty {
            inner,
            open: tokio::sync::watch::Sender::new(true),
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            injected: AtomicU64::new(0),
        }
    }

    async fn pick(&self) -> Fault {
        let f = *self.faults.lock();
        let (roll, delay) = {
            let mut r = self.rng.lock();
            (r.random_range(0..100u32), r.random_range(0..=f.max_delay_ms))
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let fault = if roll < f.fail {
            Fault::Fail
        } else if roll < f.fail + f.fail_after {
            Fault::FailAfter
        } else if roll < f.fail + f.fail_after + f.hang {
            Fault::Hang
        } else {
            return Fault::None;
        };
        self.injected.fetch_add(1, Ordering::Relaxed);
        fault
    }
}

fn injected() -> object_store::Error {
    object_store::Error::Generic { store: "faulty", source: "injected fault".into() }
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
        match self.pick().await {
            Fault::Fail => Err(injected()),
            Fault::FailAfter => {
                self.inner.put_opts(location, payload, opts).await?;
                Err(injected())
            }
            Fault::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(injected())
            }
            Fault::None => self.inner.put_opts(location, payload, opts).await,
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        match self.pick().await {
            Fault::None | Fault::FailAfter => self.inner.get_opts(location, options).await,
            Fault::Fail => Err(injected()),
            Fault::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(injected())
            }
        }
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

fn inner_store(p: &Place) -> Arc<dyn ObjectStore> {
    match p.backend {
        Backend::Local => {
            let root = p.dir.path().join("faulty-objects");
            std::fs::create_dir_all(&root).unwrap();
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(root)
                    .unwrap()
                    .with_fsync(true),
            )
        }
        Backend::S3 => {
            let o = p.s3.clone().unwrap();
            Arc::new(
                object_store::aws::AmazonS3Builder::new()
                    .with_endpoint(o.endpoint.unwrap())
                    .with_bucket_name(o.bucket)
                    .with_region(o.region)
                    .with_access_key_id(o.access_key_id)
                    .with_secret_access_key(o.secret_access_key)
                    .with_allow_http(true)
                    .build()
                    .unwrap(),
            )
        }
    }
}

/// A store over a fault-injecting object store (no faults set) holding one empty stream.
async fn faulty_stream(p: &Place, seed: u64, name: &str) -> (Arc<Faulty>, Streams) {
    let faulty = Arc::new(Faulty::new(inner_store(p), seed));
    let opts =
        Options::default().storage(Storage::Custom(faulty.clone())).maintenance_interval(None);
    let s = Streams::open(p.dir.path(), opts).await.unwrap();
    s.create(name, StreamConfig::default()).await.unwrap();
    (faulty, s)
}

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("{i}:{}", "z".repeat((i * 13 % 300) as usize)))
}

#[test]
fn writers_retry_through_faults_and_fail_cleanly_when_storage_is_gone() {
    for backend in BACKENDS {
        let p = Place::new(backend);
        common::runtime().block_on(async {
            let faulty = Arc::new(Faulty::new(inner_store(&p), 7));
            *faulty.faults.lock() = Faults { fail: 15, fail_after: 10, hang: 3, max_delay_ms: 3 };
            let opts = Options::default()
                .storage(Storage::Custom(faulty.clone()))
                .maintenance_interval(None)
                .retries(10, Duration::from_millis(1))
                .request_timeout(Duration::from_millis(200));
            let s = Streams::open(p.dir.path(), opts.clone()).await.unwrap();
            s.create("x", StreamConfig::default()).await.unwrap();
            let wo = WriterOptions { max_entries: 20, ..common::fast_writer() };
            let w = s.writer_with("x", wo.clone()).await.unwrap();
            let mut acks = Vec::new();
            for i in 0..1000 {
                acks.push(w.send(payload(i)).await.unwrap());
            }
            for (i, a) in acks.into_iter().enumerate() {
                assert_eq!(a.await.unwrap(), i as u64, "{backend:?}: acks in order");
            }
            assert!(faulty.injected.load(Ordering::Relaxed) > 10, "faults were injected");

            // Readers retry too.
            let mut r = s.reader("x", Start::Earliest).unwrap();
            for i in 0..1000 {
                let e = r.next().await.unwrap();
                assert_eq!((e.id, e.data), (i, payload(i)));
            }

            // Storage goes away for good: the in-flight entries and every later one fail with
            // the error; none of them is recorded.
            *faulty.faults.lock() = Faults { fail: 100, ..Faults::default() };
            let mut acks = Vec::new();
            for i in 1000..1100 {
                acks.push(w.send(payload(i)).await.unwrap());
            }
            for a in acks {
                let e = a.await.unwrap_err();
                assert!(matches!(e, Error::Store { .. } | Error::WriteFailed(_)), "{e}");
            }
            assert!(w.send(payload(0)).await.is_err(), "a failed writer stays failed");
            assert_eq!(s.info("x").unwrap().next_id, 1000, "nothing unacknowledged is recorded");

            // Storage comes back: a new writer continues after the last acknowledged entry.
            *faulty.faults.lock() = Faults::default();
            drop(w);
            let w = s.writer_with("x", wo).await.unwrap();
            assert_eq!(w.append(payload(1000)).await.unwrap(), 1000);
            drop(w);
            s.close().await.unwrap();
            let s = Streams::open(p.dir.path(), opts).await.unwrap();
            let mut r = s.reader("x", Start::Earliest).unwrap();
            for i in 0..=1000 {
                assert_eq!(r.next().await.unwrap().data, payload(i), "{backend:?}");
            }
            assert!(!r.has_next());
        });
    }
}

#[test]
fn a_writer_waits_instead_of_buffering_without_bound() {
    let p = Place::new(Backend::Local);
    common::runtime().block_on(async {
        let (faulty, s) = faulty_stream(&p, 1, "b").await;
        let limit = 64 << 10;
        let wo = WriterOptions {
            max_buffered_bytes: limit,
            max_entry_bytes: 8 << 10,
            ..common::fast_writer()
        };
        let w = s.writer_with("b", wo).await.unwrap();
        faulty.open.send_replace(false); // storage stalls: nothing becomes durable
        let entry = Bytes::from(vec![3u8; 8 << 10]);
        let mut acks = Vec::new();
        let mut accepted = 0;
        // Until send waits for room (the timeout fires).
        while let Ok(ack) =
            tokio::time::timeout(Duration::from_millis(200), w.send(entry.clone())).await
        {
            acks.push(ack.unwrap());
            accepted += entry.len();
            assert!(accepted <= limit, "accepted {accepted} bytes with a {limit}-byte budget");
        }
        assert_eq!(accepted, limit, "the budget is used up before send waits");
        let blocked = tokio::spawn({
            let entry = entry.clone();
            async move { (w.send(entry).await.unwrap().await.unwrap(), w) }
        });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        faulty.open.send_replace(true);
        for (i, a) in acks.into_iter().enumerate() {
            assert_eq!(a.await.unwrap(), i as u64);
        }
        let (id, _w) = blocked.await.unwrap();
        assert_eq!(id, (limit / entry.len()) as u64);
    });
}

#[test]
fn senders_outrunning_storage_never_make_a_fragment_beyond_its_limits() {
    let p = Place::new(Backend::Local);
    common::runtime().block_on(async {
        let (faulty, s) = faulty_stream(&p, 2, "f").await;
        let wo = WriterOptions {
            max_entries: 8,
            max_interval: Duration::from_secs(3600),
            max_flush_inflight: 1,
            flush_when_idle: false,
            ..WriterOptions::local()
        };
        let w = s.writer_with("f", wo).await.unwrap();
        faulty.open.send_replace(false); // the first fragment hangs: the rest pile up
        let mut acks = Vec::new();
        for i in 0..50 {
            acks.push(w.send(payload(i)).await.unwrap());
        }
        faulty.open.send_replace(true);
        w.flush().await.unwrap();
        for (i, a) in acks.into_iter().enumerate() {
            assert_eq!(a.await.unwrap(), i as u64);
        }
        let frags: u64 = s.segments("f").unwrap().iter().map(|g| g.fragments).sum();
        assert_eq!(frags, 7, "six full fragments of 8 entries and one of 2");
        let mut r = s.reader("f", Start::Earliest).unwrap();
        for i in 0..50 {
            let e = r.next().await.unwrap();
            assert_eq!((e.id, e.data), (i, payload(i)));
        }
        w.close().await.unwrap();
    });
}

#[test]
fn an_ack_whose_writer_and_runtime_are_gone_fails_instead_of_hanging() {
    let p = Place::new(Backend::Local);
    let rt = common::runtime();
    let (ack, w, s, faulty) = rt.block_on(async {
        let (faulty, s) = faulty_stream(&p, 3, "g").await;
        let w = s.writer("g").await.unwrap();
        faulty.open.send_replace(false); // never durable while the runtime lives
        let ack = w.send(payload(0)).await.unwrap();
        (ack, w, s, faulty)
    });
    drop(rt); // the flusher task is dropped with its runtime
    drop(w);
    let got = common::runtime().block_on(async {
        tokio::time::timeout(Duration::from_secs(10), ack).await.expect("the ack resolves")
    });
    assert!(matches!(got, Err(Error::Closed)), "{got:?}");
    drop((s, faulty));
}
