//! Fault injection through the failpoints of timber-stream and of the KV engine and WAL under
//! it (feature `failpoints`; see docs/ARCHITECTURE.md, "Fault injection"). Object puts, gets and
//! deletes, metadata commits and journal writes and syncs fail; each test checks what the store
//! promises then: a failed call that the store retries (object store requests) is retried and
//! nothing is lost or duplicated; a writer whose put or commit fails for good fails that entry
//! and every later one, records none of them, and a new writer continues after the last
//! acknowledged entry; a failed read is an error and harms no writer; a failed metadata or
//! journal sync leaves the metadata or journal refusing writes until the store is reopened;
//! and after a reopen every acknowledged entry is there, once, with its id.
//!
//! The failpoint registry is global to the process: every test holds a `FailScenario`, which
//! serializes them and clears every failpoint when it ends.
#![cfg(feature = "failpoints")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use common::{Backend, Place, BACKENDS};
use fail::FailScenario;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use timber_stream::{Error, Journal, Start, StreamConfig, StreamWriter, Streams, WriterOptions};

/// What the test knows of a stream: the entries whose ack was Ok, by id, and the payloads of
/// entries whose send or ack failed, which may or may not be in the stream. Payloads are
/// unique, so a duplicate shows.
#[derive(Debug, Default)]
struct Model {
    acked: BTreeMap<u64, Bytes>,
    failed: BTreeSet<Bytes>,
    sent: u64,
}

impl Model {
    fn payload(&mut self) -> Bytes {
        self.sent += 1;
        Bytes::from(format!("entry {} {}", self.sent, "p".repeat((self.sent % 60) as usize)))
    }

    /// Sends `n` entries, then waits for their acks, all Ok.
    async fn send_acked(&mut self, w: &StreamWriter, n: u64) {
        let mut acks = Vec::new();
        for _ in 0..n {
            let d = self.payload();
            acks.push((w.send(d.clone()).await.unwrap(), d));
        }
        for (a, d) in acks {
            let id = a.await.unwrap();
            assert!(self.acked.insert(id, d).is_none(), "id {id} acknowledged twice");
        }
    }

    /// Sends `n` entries and waits for their acks; returns the errors, in order.
    async fn send_failing(&mut self, w: &StreamWriter, n: u64) -> Vec<Error> {
        let mut acks = Vec::new();
        let mut errors = Vec::new();
        for _ in 0..n {
            let d = self.payload();
            match w.send(d.clone()).await {
                Ok(a) => acks.push((a, d)),
                Err(e) => {
                    self.failed.insert(d);
                    errors.push(e);
                }
            }
        }
        for (a, d) in acks {
            match a.await {
                Ok(id) => {
                    self.acked.insert(id, d);
                }
                Err(e) => {
                    self.failed.insert(d);
                    errors.push(e);
                }
            }
        }
        errors
    }

    /// Reads the whole stream: ids are dense, every acknowledged entry is there with its id,
    /// anything else is an entry whose ack failed, and no entry appears twice. Returns the
    /// stream's end.
    async fn check(&self, s: &Streams, name: &str) -> u64 {
        let first = s.info(name).unwrap().first_id;
        let mut r = s.reader(name, Start::Earliest).unwrap();
        let (mut next, mut seen) = (first, BTreeSet::new());
        while r.has_next() {
            let e = r.next().await.unwrap();
            assert_eq!(e.id, next, "ids are dense");
            next += 1;
            assert!(seen.insert(e.data.clone()), "entry {} is a duplicate", e.id);
            match self.acked.get(&e.id) {
                Some(d) => assert_eq!(d, &e.data, "entry {}", e.id),
                None => assert!(self.failed.contains(&e.data), "entry {} was never sent", e.id),
            }
        }
        for id in self.acked.range(first..).map(|(id, _)| *id) {
            assert!(id < next, "acknowledged entry {id} is lost (the stream ends at {next})");
        }
        next
    }
}

/// The metrics of this test process (the store counts its retries).
fn metrics() -> &'static Snapshotter {
    static S: OnceLock<Snapshotter> = OnceLock::new();
    S.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let s = recorder.snapshotter();
        recorder.install().unwrap();
        s
    })
}

/// Object store calls of operation `op` retried since the last call (a snapshot of the
/// debugging recorder resets its counters).
fn retries(op: &str) -> u64 {
    metrics()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| {
            k.key().name() == "timber_stream_store_retries_total"
                && k.key().labels().any(|l| l.key() == "op" && l.value() == op)
        })
        .map(|(_, _, _, v)| match v {
            DebugValue::Counter(c) => c,
            _ => 0,
        })
        .sum()
}

/// Asserts `e` is the failure of object store call `op` (directly, or as the earlier failure
/// that failed this entry).
#[track_caller]
fn assert_store(e: &Error, op: &str) {
    let e = match e {
        Error::WriteFailed(inner) => &**inner,
        e => e,
    };
    match e {
        Error::Store { op: got, key, source } => {
            assert_eq!(*got, op, "{e}");
            assert!(key.ends_with(".frag"), "{e}: the error names the object");
            assert!(source.to_string().contains("injected"), "{e}");
        }
        e => panic!("expected a failed {op}, got {e:?}"),
    }
}

/// The fragments recorded for `name` and the fragment objects stored: equal once garbage is
/// collected, so no object is duplicated or left behind.
fn assert_no_stray_objects(p: &Place, s: &Streams, name: &str) {
    let recorded: u64 = s.segments(name).unwrap().iter().map(|g| g.fragments).sum();
    assert_eq!(p.fragment_files().len() as u64, recorded, "one object per recorded fragment");
}

/// Puts fail for good: the writer fails the entry whose fragment could not be stored and every
/// later one, records none of them, and stays failed; a new writer continues after the last
/// acknowledged entry, and a reopened store holds every acknowledged entry.
#[test]
fn a_put_that_fails_for_good_fails_the_writer_and_records_nothing() {
    for backend in BACKENDS {
        let _s = FailScenario::setup();
        let p = Place::new(backend);
        common::runtime().block_on(async {
            let mut m = Model::default();
            let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
            s.create("x", StreamConfig::default()).await.unwrap();
            let w = s.writer("x").await.unwrap();
            m.send_acked(&w, 100).await;
            fail::cfg("stream::store::put", "return").unwrap();
            let errors = m.send_failing(&w, 20).await;
            assert_eq!(errors.len(), 20, "{backend:?}: no entry is acknowledged");
            for e in &errors {
                assert_store(e, "put");
            }
            assert!(w.send(m.payload()).await.is_err(), "a failed writer stays failed");
            assert_eq!(s.info("x").unwrap().next_id, 100, "nothing unacknowledged is recorded");
            fail::remove("stream::store::put");
            drop(w);
            let w = s.writer("x").await.unwrap();
            m.send_acked(&w, 10).await;
            assert_eq!(m.acked.keys().last(), Some(&109), "the new writer continues at 100");
            w.close().await.unwrap();
            assert_eq!(m.check(&s, "x").await, 110);
            s.close().await.unwrap();

            let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
            assert_eq!(m.check(&s, "x").await, 110);
            assert_no_stray_objects(&p, &s, "x");
            let w = s.writer("x").await.unwrap();
            m.send_acked(&w, 5).await;
            w.close().await.unwrap();
            m.check(&s, "x").await;
        });
    }
}

/// A put fails once before it is made, or after it is made with its reply lost (the client
/// cannot tell): the store retries it, finds its own identical object in the second case, and
/// every entry is acknowledged once, recorded once, stored in one object.
#[test]
fn a_put_that_fails_once_is_retried_and_nothing_is_lost_or_duplicated() {
    for fp in ["stream::store::put", "stream::store::put_reply"] {
        for backend in BACKENDS {
            let _s = FailScenario::setup();
            let p = Place::new(backend);
            common::runtime().block_on(async {
                let mut m = Model::default();
                let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
                s.create("x", StreamConfig::default()).await.unwrap();
                let w = s.writer("x").await.unwrap();
                m.send_acked(&w, 50).await;
                retries("put");
                fail::cfg(fp, "1*return->off").unwrap();
                m.send_acked(&w, 100).await;
                assert_eq!(retries("put"), 1, "{fp}, {backend:?}: the put was retried");
                w.close().await.unwrap();
                assert_eq!(m.check(&s, "x").await, 150);
                s.close().await.unwrap();
                let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
                assert_eq!(m.check(&s, "x").await, 150);
                assert_no_stray_objects(&p, &s, "x");
            });
        }
    }
}

/// Reads of fragments fail: for good, `next` is an error naming the object, the writer goes on,
/// and the same reader reads on once the store works again; once, the read is retried and
/// succeeds.
#[test]
fn a_failed_read_is_an_error_and_harms_no_writer() {
    let _s = FailScenario::setup();
    let p = Place::new(Backend::Local);
    common::runtime().block_on(async {
        let mut m = Model::default();
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("x", StreamConfig::default()).await.unwrap();
        let w = s.writer("x").await.unwrap();
        // No reader yet: the fragments are not in the cache.
        m.send_acked(&w, 100).await;
        fail::cfg("stream::store::get", "return").unwrap();
        let mut r = s.reader("x", Start::Earliest).unwrap();
        assert_store(&r.next().await.unwrap_err(), "get");
        m.send_acked(&w, 10).await;
        fail::cfg("stream::store::get", "1*return->off").unwrap();
        retries("get");
        assert_eq!(r.next().await.unwrap().id, 0, "the reader reads on");
        assert_eq!(retries("get"), 1, "the read was retried");
        w.close().await.unwrap();
        m.check(&s, "x").await;
    });
}

/// Deletes of truncated fragments fail: the truncation stands (metadata first), the objects
/// are left as orphans, and garbage collection removes them once deletes work again. Deleting a
/// stream whose objects cannot be deleted fails with the error, the stream is gone, and
/// garbage collection removes its objects. Garbage collection whose deletes fail returns the
/// error, from `maintain` and from `open` (which then fails).
#[test]
fn a_failed_delete_leaves_orphans_that_garbage_collection_removes() {
    let _s = FailScenario::setup();
    let p = Place::new(Backend::Local);
    common::runtime().block_on(async {
        let mut m = Model::default();
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("x", StreamConfig::default()).await.unwrap();
        s.create("gone", StreamConfig::default()).await.unwrap();
        let wo = WriterOptions { max_entries: 10, ..common::fast_writer() };
        let w = s.writer_with("x", wo.clone()).await.unwrap();
        m.send_acked(&w, 100).await;
        w.close().await.unwrap();
        let g = s.writer_with("gone", wo).await.unwrap();
        Model::default().send_acked(&g, 30).await;
        g.close().await.unwrap();
        let objects = p.fragment_files().len();

        fail::cfg("stream::store::delete", "return").unwrap();
        assert_eq!(s.truncate("x", 50).await.unwrap().first_id, 50);
        assert_store(&s.delete("gone").await.unwrap_err(), "delete");
        assert!(matches!(s.info("gone"), Err(Error::NotFound { .. })), "the stream is gone");
        assert_eq!(p.fragment_files().len(), objects, "no object was deleted");
        m.acked.retain(|&id, _| id >= 50);
        assert_eq!(m.check(&s, "x").await, 100);
        // Garbage collection reports the failure, in a maintenance round and at open.
        assert_store(&s.maintain().await.unwrap_err(), "delete");
        s.close().await.unwrap();
        assert_store(&Streams::open(p.dir.path(), p.options()).await.unwrap_err(), "delete");

        fail::remove("stream::store::delete");
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        assert_no_stray_objects(&p, &s, "x");
        assert_eq!(m.check(&s, "x").await, 100);
    });
}

/// The metadata commit of a writer's fragments fails: the writer fails those entries and every
/// later one and records none of them; their objects are garbage; a new writer continues after
/// the last acknowledged entry. The commit is not retried: a failed writer stays failed.
#[test]
fn a_failed_metadata_commit_fails_the_writer_and_records_nothing() {
    let _s = FailScenario::setup();
    let p = Place::new(Backend::Local);
    common::runtime().block_on(async {
        let mut m = Model::default();
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("x", StreamConfig::default()).await.unwrap();
        let w = s.writer("x").await.unwrap();
        m.send_acked(&w, 100).await;
        fail::cfg("stream::meta::commit", "1*return->off").unwrap();
        let errors = m.send_failing(&w, 20).await;
        assert_eq!(errors.len(), 20, "no entry is acknowledged");
        for e in &errors {
            let e = if let Error::WriteFailed(inner) = e { &**inner } else { e };
            assert!(matches!(e, Error::Kv(timber_kv::Error::Io { op: "write", .. })), "{e:?}");
        }
        assert!(w.send(m.payload()).await.is_err(), "a failed writer stays failed");
        assert_eq!(s.info("x").unwrap().next_id, 100, "nothing unacknowledged is recorded");
        drop(w);
        let w = s.writer("x").await.unwrap();
        m.send_acked(&w, 10).await;
        w.close().await.unwrap();
        s.maintain().await.unwrap();
        assert_no_stray_objects(&p, &s, "x");
        assert_eq!(m.check(&s, "x").await, 110);
        s.close().await.unwrap();
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        assert_eq!(m.check(&s, "x").await, 110);
    });
}

/// The metadata engine's WAL cannot be written or synced under a commit: the writer fails, and
/// the metadata refuses writes (a new writer, a new stream) until the store is reopened, while
/// reads go on. After a reopen every acknowledged entry is there (the failed commit's entries
/// may be too: their fate is unknown), and writers write again.
#[test]
fn a_failed_metadata_sync_stops_metadata_writes_until_reopen() {
    for fp in ["wal::write::fsync", "wal::active::write"] {
        let _s = FailScenario::setup();
        let p = Place::new(Backend::Local);
        common::runtime().block_on(async {
            let mut m = Model::default();
            let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
            s.create("x", StreamConfig::default()).await.unwrap();
            let w = s.writer("x").await.unwrap();
            m.send_acked(&w, 100).await;
            // The store has no journal: the metadata's WAL is the only one.
            fail::cfg(fp, "return").unwrap();
            let errors = m.send_failing(&w, 20).await;
            assert_eq!(errors.len(), 20, "{fp}: no entry is acknowledged");
            let e = if let Error::WriteFailed(inner) = &errors[0] { &**inner } else { &errors[0] };
            assert!(
                matches!(e, Error::Kv(timber_kv::Error::Wal(timber_wal::Error::Io { .. }))),
                "{fp}: {e:?}"
            );
            fail::remove(fp);
            drop(w);
            for e in [
                s.writer("x").await.unwrap_err(),
                s.create("y", StreamConfig::default()).await.unwrap_err(),
            ] {
                assert!(matches!(e, Error::Kv(timber_kv::Error::Poisoned { .. })), "{fp}: {e:?}");
            }
            let mut r = s.reader("x", Start::Earliest).unwrap();
            for id in 0..100 {
                assert_eq!(r.next().await.unwrap().data, m.acked[&id], "reads go on");
            }
            s.close().await.unwrap();

            let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
            let end = m.check(&s, "x").await;
            assert!(end >= 100);
            assert_no_stray_objects(&p, &s, "x");
            let w = s.writer("x").await.unwrap();
            m.send_acked(&w, 10).await;
            w.close().await.unwrap();
            s.create("y", StreamConfig::default()).await.unwrap();
            assert_eq!(m.check(&s, "x").await, end + 10);
        });
    }
}

/// Writers that cut fragments only when closing: everything in between is in the journal.
fn journaled() -> WriterOptions {
    WriterOptions {
        max_interval: Duration::from_secs(600),
        max_entries: 1000,
        ..common::fast_writer()
    }
}

/// The journal cannot be written (`Manual`: each append goes to the OS at once) or synced
/// (`Always`): the entries of the failed record and every later one fail, the journal refuses
/// writes until the store is reopened, and the reopened store replays every acknowledged entry
/// from the journal.
#[test]
fn a_failed_journal_write_or_sync_fails_the_writer_and_the_journal_keeps_what_it_acked() {
    let cases = [
        (Journal::Manual, "wal::active::write", "write"),
        (Journal::Always, "wal::active::write", "write"),
        (Journal::Always, "wal::write::fsync", "fdatasync"),
    ];
    for (journal, fp, op) in cases {
        let _s = FailScenario::setup();
        let p = Place::new(Backend::Local);
        let opts = || p.options().journal(journal);
        common::runtime().block_on(async {
            let mut m = Model::default();
            let s = Streams::open(p.dir.path(), opts()).await.unwrap();
            s.create("x", StreamConfig::default()).await.unwrap();
            let w = s.writer_with("x", journaled()).await.unwrap();
            m.send_acked(&w, 100).await;
            // Nothing is cut or committed meanwhile: the journal's WAL is the only one written.
            fail::cfg(fp, "return").unwrap();
            let errors = m.send_failing(&w, 20).await;
            assert_eq!(errors.len(), 20, "{journal:?} {fp}: no entry is acknowledged");
            let e = if let Error::WriteFailed(inner) = &errors[0] { &**inner } else { &errors[0] };
            match e {
                Error::Journal(timber_wal::Error::Io { op: got, path, .. }) => {
                    assert_eq!(*got, op, "{e}");
                    assert!(path.to_string_lossy().contains("journal"), "{e}");
                }
                e => panic!("{journal:?} {fp}: {e:?}"),
            }
            fail::remove(fp);
            drop(w);
            // The journal refuses writes until reopen; the metadata does not.
            let w = s.writer_with("x", journaled()).await.unwrap();
            let e = w.append(m.payload()).await.unwrap_err();
            let e = if let Error::WriteFailed(inner) = &e { &**inner } else { &e };
            assert!(matches!(e, Error::Journal(timber_wal::Error::Poisoned { .. })), "{e:?}");
            drop(w);
            s.close().await.unwrap();

            let s = Streams::open(p.dir.path(), opts()).await.unwrap();
            let end = m.check(&s, "x").await;
            assert!(end >= 100, "{journal:?} {fp}: the acknowledged entries were replayed");
            let w = s.writer_with("x", journaled()).await.unwrap();
            m.send_acked(&w, 10).await;
            w.close().await.unwrap();
            assert_eq!(m.check(&s, "x").await, end + 10);
            s.close().await.unwrap();
            let s = Streams::open(p.dir.path(), opts()).await.unwrap();
            assert_eq!(m.check(&s, "x").await, end + 10);
            assert_no_stray_objects(&p, &s, "x");
        });
    }
}

/// Opening a store replays journaled entries into fragments; their puts fail for good: the open
/// fails with the error and leaves the journal as it was, and the next open replays every
/// acknowledged entry.
#[test]
fn a_failed_put_during_journal_replay_fails_the_open_and_loses_nothing() {
    let _s = FailScenario::setup();
    let p = Place::new(Backend::Local);
    let opts = || p.options().journal(Journal::Always);
    let mut m = Model::default();
    // A runtime with one thread, dropped at once: the writer never cuts a fragment, and the
    // entries are left in the journal alone.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let s = Streams::open(p.dir.path(), opts()).await.unwrap();
        s.create("x", StreamConfig::default()).await.unwrap();
        let w = s.writer_with("x", journaled()).await.unwrap();
        m.send_acked(&w, 100).await;
        assert_eq!(s.segments("x").unwrap().iter().map(|g| g.fragments).sum::<u64>(), 0);
        drop(w);
        drop(s);
    });
    rt.shutdown_background();
    common::runtime().block_on(async {
        fail::cfg("stream::store::put", "return").unwrap();
        let e = Streams::open(p.dir.path(), opts()).await.unwrap_err();
        assert_store(&e, "put");
        fail::remove("stream::store::put");
        let s = Streams::open(p.dir.path(), opts()).await.unwrap();
        assert_eq!(m.check(&s, "x").await, 100);
        s.close().await.unwrap();
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        assert_eq!(m.check(&s, "x").await, 100);
        assert_no_stray_objects(&p, &s, "x");
    });
}
