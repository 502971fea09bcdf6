//! The journal: entries acknowledged from the journal are readable before any fragment holds
//! them, are cut into fragments later (or when the writer closes), survive the process going
//! away (replayed into fragments at open, also by a store opened without a journal), keep their
//! ids across a new writer, and truncations above the recorded fragments are journaled too.
//! A damaged journal record is reported, not skipped. Most of this holds for a synced journal
//! (acks wait for its sync) and an unsynced one alike: the tests run both ways.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Backend, Place};
use timber_stream::{Error, Journal, Start, StreamConfig, Streams, WriterOptions};

/// A synced journal and an unsynced one: the two ways entries get journaled.
const BOTH: [Journal; 2] = [Journal::Always, Journal::Manual];

fn entry(i: u64) -> Bytes {
    Bytes::from(format!("entry-{i}-{}", "j".repeat((i % 50) as usize)))
}

/// Writers that cut fragments only when closing or when 1000 entries are journaled.
fn slow_cut() -> WriterOptions {
    WriterOptions {
        max_interval: Duration::from_secs(600),
        max_entries: 1000,
        ..common::fast_writer()
    }
}

fn recorded(s: &Streams, name: &str) -> u64 {
    s.segments(name).unwrap().iter().map(|g| g.end_id - g.first_id).sum()
}

/// Waits (at most 20 s) until fragments record `n` entries of `name`.
async fn wait_recorded(s: &Streams, name: &str, n: u64, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while recorded(s, name) < n {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn read_all(s: &Streams, name: &str, from: u64, to: u64) {
    let mut r = s.reader(name, Start::At(from)).unwrap();
    for i in from..to {
        let e = r.next().await.unwrap();
        assert_eq!((e.id, e.data), (i, entry(i)));
    }
    assert!(!r.has_next());
}

/// A single-threaded runtime: a task runs only while `block_on` waits, so dropping a writer at
/// the end of `block_on` and then the runtime stops its flusher before it cuts anything.
fn vanishing_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Opens the store in its own runtime, appends `n` entries, and drops the runtime without
/// closing anything: the writer never cuts a fragment.
fn append_and_vanish(p: &Place, journal: Journal, name: &str, n: u64) {
    let rt = vanishing_runtime();
    rt.block_on(async {
        let s = Streams::open(p.dir.path(), p.options().journal(journal)).await.unwrap();
        if s.info(name).is_err() {
            s.create(name, StreamConfig::default()).await.unwrap();
        }
        let start = s.info(name).unwrap().next_id;
        let w = s.writer_with(name, slow_cut()).await.unwrap();
        for i in start..start + n {
            assert_eq!(w.append(entry(i)).await.unwrap(), i);
        }
        assert_eq!(recorded(&s, name), start, "nothing was cut yet");
        drop(w);
        drop(s);
    });
    rt.shutdown_background();
}

#[test]
fn journaled_entries_are_readable_at_once_and_cut_into_fragments_later() {
    for journal in BOTH {
        journaled_entries_are_readable_then_cut(journal);
    }
}

fn journaled_entries_are_readable_then_cut(journal: Journal) {
    let p = Place::new(Backend::Local);
    common::runtime().block_on(async {
        let s = Streams::open(p.dir.path(), p.options().journal(journal)).await.unwrap();
        s.create("j", StreamConfig::default()).await.unwrap();
        let w = s.writer_with("j", slow_cut()).await.unwrap();
        let mut tail = s.reader("j", Start::Latest).unwrap();
        let mut acks = Vec::new();
        for i in 0..300 {
            acks.push(w.send(entry(i)).await.unwrap());
        }
        for (i, a) in acks.into_iter().enumerate() {
            assert_eq!(a.await.unwrap(), i as u64);
        }
        assert_eq!(s.info("j").unwrap().next_id, 300);
        assert_eq!(recorded(&s, "j"), 0);
        assert!(p.fragment_files().is_empty(), "no fragment before the cut");
        read_all(&s, "j", 0, 300).await;
        read_all(&s, "j", 123, 300).await;
        assert_eq!(tail.next().await.unwrap().id, 0, "a tail reader sees journaled entries");
        // Filling a fragment cuts it while the writer is open.
        for i in 300..1100 {
            drop(w.send(entry(i)).await.unwrap());
        }
        w.flush().await.unwrap();
        wait_recorded(&s, "j", 1000, "no fragment cut at max_entries").await;
        read_all(&s, "j", 0, 1100).await;
        w.close().await.unwrap();
        assert_eq!(recorded(&s, "j"), 1100, "closing cuts and records the rest");
        read_all(&s, "j", 0, 1100).await;
        s.close().await.unwrap();
    });
}

#[test]
fn a_vanished_process_is_replayed_into_fragments_at_open() {
    for journal in [Journal::Always, Journal::Interval(Duration::from_secs(60)), Journal::Manual] {
        let p = Place::new(Backend::Local);
        append_and_vanish(&p, journal, "v", 40);
        append_and_vanish(&p, journal, "v", 25);
        common::runtime().block_on(async {
            let s = Streams::open(p.dir.path(), p.options().journal(journal)).await.unwrap();
            assert_eq!(s.info("v").unwrap().next_id, 65, "{journal:?}");
            assert_eq!(recorded(&s, "v"), 65, "{journal:?}: replayed into fragments");
            read_all(&s, "v", 0, 65).await;
            let w = s.writer("v").await.unwrap();
            assert_eq!(w.append(entry(65)).await.unwrap(), 65);
            w.close().await.unwrap();
            s.close().await.unwrap();
        });
    }
}

#[test]
fn a_store_without_a_journal_replays_the_one_left_behind() {
    let p = Place::new(Backend::S3);
    append_and_vanish(&p, Journal::Always, "o", 30);
    common::runtime().block_on(async {
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        assert_eq!(recorded(&s, "o"), 30);
        read_all(&s, "o", 0, 30).await;
        let w = s.writer("o").await.unwrap();
        assert_eq!(w.append(entry(30)).await.unwrap(), 30);
        w.close().await.unwrap();
        read_all(&s, "o", 0, 31).await;
        s.close().await.unwrap();
    });
}

#[test]
fn a_new_writer_takes_over_journaled_entries_and_fences_the_old_one() {
    for journal in BOTH {
        a_new_writer_fences_the_old_one(journal);
    }
}

fn a_new_writer_fences_the_old_one(journal: Journal) {
    let p = Place::new(Backend::Local);
    common::runtime().block_on(async {
        let s = Streams::open(p.dir.path(), p.options().journal(journal)).await.unwrap();
        s.create("f", StreamConfig::default()).await.unwrap();
        let old = s.writer_with("f", slow_cut()).await.unwrap();
        for i in 0..20 {
            old.append(entry(i)).await.unwrap();
        }
        let new = s.writer_with("f", slow_cut()).await.unwrap();
        let e = old.append(entry(999)).await.unwrap_err();
        assert!(matches!(e, Error::Fenced { .. }), "{e}");
        let e = old.append(entry(999)).await.unwrap_err();
        assert!(matches!(e, Error::Fenced { .. }), "a fenced writer stays fenced: {e}");
        assert_eq!(new.append(entry(20)).await.unwrap(), 20);
        read_all(&s, "f", 0, 21).await;
        new.close().await.unwrap();
        assert_eq!(recorded(&s, "f"), 21, "the new writer recorded the old one's entries");
        drop(old);
        s.close().await.unwrap();
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        read_all(&s, "f", 0, 21).await;
    });
}

#[test]
fn truncation_above_the_recorded_entries_is_journaled() {
    for journal in BOTH {
        truncation_is_journaled(journal);
    }
}

fn truncation_is_journaled(journal: Journal) {
    let p = Place::new(Backend::Local);
    append_and_vanish(&p, journal, "t", 10);
    let rt = vanishing_runtime();
    rt.block_on(async {
        let s = Streams::open(p.dir.path(), p.options().journal(journal)).await.unwrap();
        let w = s.writer_with("t", slow_cut()).await.unwrap();
        for i in 10..30 {
            w.append(entry(i)).await.unwrap();
        }
        assert_eq!(recorded(&s, "t"), 10);
        let info = s.truncate("t", 25).await.unwrap();
        assert_eq!((info.first_id, info.next_id), (25, 30));
        let mut r = s.reader("t", Start::At(12)).unwrap();
        assert!(matches!(r.next().await, Err(Error::Truncated { first_available: 25 })));
        read_all(&s, "t", 25, 30).await;
        drop(w);
        drop(s);
    });
    rt.shutdown_background();
    // The process goes away before the truncation is recorded: the journal has it.
    common::runtime().block_on(async {
        let s = Streams::open(p.dir.path(), p.options().journal(journal)).await.unwrap();
        let info = s.info("t").unwrap();
        assert_eq!((info.first_id, info.next_id), (25, 30));
        read_all(&s, "t", 25, 30).await;
    });
}

#[test]
fn a_damaged_journal_record_is_reported() {
    let p = Place::new(Backend::Local);
    append_and_vanish(&p, Journal::Always, "d", 30);
    // Flip a byte in the first record (the last one might pass for a torn tail).
    let mut segs: Vec<_> = std::fs::read_dir(p.dir.path().join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| f.to_string_lossy().ends_with(".log"))
        .collect();
    segs.sort();
    let seg = segs.first().expect("a journal segment").clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.windows(7).position(|w| w == b"entry-0").expect("first entry in the segment");
    bytes[at + 3] ^= 0x40;
    std::fs::write(&seg, bytes).unwrap();
    common::runtime().block_on(async {
        let e =
            Streams::open(p.dir.path(), p.options().journal(Journal::Always)).await.unwrap_err();
        assert!(matches!(e, Error::Journal(_) | Error::Corrupt { .. }), "{e}");
    });
}

#[test]
fn a_journaled_truncation_is_recorded_once_the_entries_are() {
    for journal in BOTH {
        a_journaled_truncation_is_recorded(journal);
    }
}

fn a_journaled_truncation_is_recorded(journal: Journal) {
    let p = Place::new(Backend::Local);
    common::runtime().block_on(async {
        let s = Streams::open(p.dir.path(), p.options().journal(journal)).await.unwrap();
        s.create("r", StreamConfig::default()).await.unwrap();
        let w = s.writer_with("r", slow_cut()).await.unwrap();
        for i in 0..30 {
            w.append(entry(i)).await.unwrap();
        }
        assert_eq!(s.truncate("r", 25).await.unwrap().first_id, 25);
        // Truncating again below it changes nothing.
        assert_eq!(s.truncate("r", 10).await.unwrap().first_id, 25);
        w.close().await.unwrap();
        s.close().await.unwrap();
        // Recorded in metadata: a store without a journal (and an empty one) agrees.
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        let info = s.info("r").unwrap();
        assert_eq!((info.first_id, info.next_id), (25, 30));
        read_all(&s, "r", 25, 30).await;
    });
}

#[test]
fn entries_of_an_unsynced_journal_are_cut_at_max_interval() {
    let p = Place::new(Backend::Local);
    common::runtime().block_on(async {
        let s = Streams::open(p.dir.path(), p.options().journal(Journal::Manual)).await.unwrap();
        s.create("i", StreamConfig::default()).await.unwrap();
        let opts = WriterOptions { max_interval: Duration::from_millis(20), ..slow_cut() };
        let w = s.writer_with("i", opts).await.unwrap();
        // Two rounds: the first arms the cut deadline, the second must arm it again.
        for round in 0..2u64 {
            for i in round * 10..round * 10 + 10 {
                assert_eq!(w.append(entry(i)).await.unwrap(), i);
            }
            wait_recorded(&s, "i", round * 10 + 10, &format!("round {round}: nothing cut")).await;
        }
        read_all(&s, "i", 0, 20).await;
        w.close().await.unwrap();
        s.close().await.unwrap();
    });
}

#[test]
fn a_writer_of_a_deleted_stream_fails_and_stays_failed() {
    for journal in BOTH {
        let p = Place::new(Backend::Local);
        common::runtime().block_on(async {
            let s = Streams::open(p.dir.path(), p.options().journal(journal)).await.unwrap();
            s.create("x", StreamConfig::default()).await.unwrap();
            let w = s.writer_with("x", slow_cut()).await.unwrap();
            for i in 0..5 {
                w.append(entry(i)).await.unwrap();
            }
            s.delete("x").await.unwrap();
            for _ in 0..2 {
                let e = w.append(entry(9)).await.unwrap_err();
                assert!(matches!(e, Error::NotFound { .. }), "{journal:?}: {e}");
            }
            drop(w);
            assert!(matches!(s.info("x"), Err(Error::NotFound { .. })));
            s.close().await.unwrap();
        });
    }
}
