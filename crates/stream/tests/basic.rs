//! Behaviour of streams on both backends: the local file system and a real S3 server.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Backend, Place, BACKENDS};
use timber_stream::{Error, Start, StreamConfig, Streams, WriterOptions};

fn entry(i: u64) -> Bytes {
    Bytes::from(format!("entry-{i}-{}", "x".repeat((i % 97) as usize)))
}

fn each_backend<F, Fut>(test: F)
where
    F: Fn(Place) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for b in BACKENDS {
        common::runtime().block_on(test(Place::new(b)));
    }
}

#[test]
fn append_read_and_tail() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("log", StreamConfig::default()).await.unwrap();
        let w = s.writer("log").await.unwrap();
        let mut acks = Vec::new();
        for i in 0..1000 {
            acks.push(w.send(entry(i)).await.unwrap());
        }
        for (i, a) in acks.into_iter().enumerate() {
            assert_eq!(a.await.unwrap(), i as u64, "acks resolve to dense ids in order");
        }
        assert_eq!(s.info("log").unwrap().next_id, 1000);

        let mut r = s.reader("log", Start::Earliest).unwrap();
        for i in 0..1000 {
            let e = r.next().await.unwrap();
            assert_eq!((e.id, e.data), (i, entry(i)));
        }
        assert!(!r.has_next());

        // A tailing reader wakes up for new entries.
        let mut tail = s.reader("log", Start::Latest).unwrap();
        let task = tokio::spawn(async move { tail.next_batch(10).await.unwrap() });
        tokio::task::yield_now().await;
        assert_eq!(w.append(entry(1000)).await.unwrap(), 1000);
        let got = task.await.unwrap();
        assert_eq!(got[0].id, 1000);
        assert_eq!(got[0].data, entry(1000));

        r.seek(500);
        let batch = r.next_batch(7).await.unwrap();
        assert_eq!(batch.iter().map(|e| e.id).collect::<Vec<_>>(), (500..507).collect::<Vec<_>>());
        w.close().await.unwrap();
        let segs = s.segments("log").unwrap();
        assert!(segs.iter().all(|g| g.sealed), "close seals the segment: {segs:?}");
        assert_eq!(segs.iter().map(|g| g.end_id - g.first_id).sum::<u64>(), 1001);
    });
}

#[test]
fn reopen_keeps_everything_and_a_new_writer_continues() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("a", StreamConfig::default()).await.unwrap();
        let w = s.writer("a").await.unwrap();
        for i in 0..50 {
            w.append(entry(i)).await.unwrap();
        }
        drop(w);
        s.close().await.unwrap();

        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        let w = s.writer("a").await.unwrap();
        assert_eq!(w.epoch(), 2);
        assert_eq!(w.append(entry(50)).await.unwrap(), 50);
        let mut r = s.reader("a", Start::At(0)).unwrap();
        for i in 0..=50 {
            assert_eq!(r.next().await.unwrap().data, entry(i));
        }
        assert!(s.segments("a").unwrap().len() >= 2, "a new writer opens a new segment");
    });
}

#[test]
fn a_new_writer_fences_the_old_one() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("f", StreamConfig::default()).await.unwrap();
        let old = s.writer("f").await.unwrap();
        for i in 0..10 {
            old.append(entry(i)).await.unwrap();
        }
        let new = s.writer("f").await.unwrap();
        assert!(new.epoch() > old.epoch());
        let e = old.append(entry(999)).await.unwrap_err();
        assert!(matches!(e, Error::Fenced { .. }), "{e}");
        let e = old.send(entry(999)).await.unwrap_err();
        assert!(matches!(e, Error::Fenced { .. }), "stays fenced: {e}");
        assert_eq!(new.append(entry(10)).await.unwrap(), 10);
        let mut r = s.reader("f", Start::Earliest).unwrap();
        for i in 0..=10 {
            assert_eq!(r.next().await.unwrap().data, entry(i));
        }
        assert_eq!(s.info("f").unwrap().next_id, 11);
        // The fenced writer's fragment was written but never recorded: collected as garbage
        // once the new writer is gone too.
        new.close().await.unwrap();
        s.maintain().await.unwrap();
        assert_eq!(p.fragment_files().len() as u64, total_fragments(&s, "f"));
    });
}

fn total_fragments(s: &Streams, name: &str) -> u64 {
    s.segments(name).unwrap().iter().map(|g| g.fragments).sum()
}

#[test]
fn truncate_drops_whole_fragments_and_reports_truncated() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("t", StreamConfig::default()).await.unwrap();
        let w = s.writer("t").await.unwrap();
        for i in 0..100 {
            w.append(entry(i)).await.unwrap(); // one fragment each (append waits for the ack)
        }
        let before = p.fragment_files().len();
        let info = s.truncate("t", 60).await.unwrap();
        assert_eq!((info.first_id, info.next_id), (60, 100));
        assert_eq!(p.fragment_files().len(), before - 60);
        let mut r = s.reader("t", Start::At(10)).unwrap();
        match r.next().await {
            Err(Error::Truncated { first_available }) => assert_eq!(first_available, 60),
            other => panic!("expected Truncated, got {other:?}"),
        }
        let mut r = s.reader("t", Start::Earliest).unwrap();
        assert_eq!(r.next().await.unwrap().id, 60);
        // A reader already past the point keeps going; one behind it is told.
        let mut behind = s.reader("t", Start::At(70)).unwrap();
        s.truncate("t", 80).await.unwrap();
        assert!(matches!(behind.next().await, Err(Error::Truncated { first_available: 80 })));
        // Truncating beyond the end clamps to the end.
        assert_eq!(s.truncate("t", 1_000).await.unwrap().first_id, 100);
        assert_eq!(w.append(entry(100)).await.unwrap(), 100);
    });
}

#[test]
fn a_stream_created_at_an_id_starts_there_and_keeps_it_across_a_reopen() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        let info = s.create_at("late", StreamConfig::default(), 1_000).await.unwrap();
        assert_eq!((info.first_id, info.next_id), (1_000, 1_000));
        let w = s.writer("late").await.unwrap();
        assert_eq!(w.next_id(), 1_000);
        for i in 0..3 {
            assert_eq!(w.append(entry(i)).await.unwrap(), 1_000 + i);
        }
        w.close().await.unwrap();
        s.close().await.unwrap();
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        let info = s.info("late").unwrap();
        assert_eq!((info.first_id, info.next_id), (1_000, 1_003));
        let mut r = s.reader("late", Start::Earliest).unwrap();
        assert_eq!(r.next().await.unwrap().data, entry(0));
        let mut r = s.reader("late", Start::At(10)).unwrap();
        assert!(matches!(r.next().await, Err(Error::Truncated { first_available: 1_000 })));
        assert_eq!(s.writer("late").await.unwrap().append(entry(3)).await.unwrap(), 1_003);
    });
}

#[test]
fn admin_list_delete_and_bad_input() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("one", StreamConfig::default()).await.unwrap();
        s.create("two", StreamConfig::default()).await.unwrap();
        assert!(matches!(
            s.create("one", StreamConfig::default()).await,
            Err(Error::AlreadyExists { .. })
        ));
        assert!(matches!(s.create("", StreamConfig::default()).await, Err(Error::InvalidParam(_))));
        assert!(matches!(s.writer("nope").await, Err(Error::NotFound { .. })));
        assert!(matches!(s.reader("nope", Start::Earliest), Err(Error::NotFound { .. })));
        let names: Vec<String> = s.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["one", "two"]);

        let w = s
            .writer_with("one", WriterOptions { max_entry_bytes: 100, ..common::fast_writer() })
            .await
            .unwrap();
        assert!(matches!(w.append(vec![0u8; 101]).await, Err(Error::InvalidParam(_))));
        w.append(vec![1u8; 100]).await.unwrap();

        let mut tail = s.reader("one", Start::Latest).unwrap();
        let waiting = tokio::spawn(async move { tail.next().await });
        tokio::task::yield_now().await;
        s.delete("one").await.unwrap();
        assert!(matches!(waiting.await.unwrap(), Err(Error::NotFound { .. })));
        assert!(p.fragment_files().is_empty(), "{:?}", p.fragment_files());
        // The writer of the deleted stream fails; the object it wrote first is garbage.
        assert!(matches!(w.append(vec![2u8; 10]).await, Err(Error::NotFound { .. })));
        s.maintain().await.unwrap();
        assert!(p.fragment_files().is_empty(), "{:?}", p.fragment_files());
        assert_eq!(s.list().unwrap().len(), 1);
        // The name can be used again, for a new stream.
        s.create("one", StreamConfig::default()).await.unwrap();
        assert_eq!(s.info("one").unwrap().next_id, 0);
    });
}

#[test]
fn segments_roll_by_size_and_small_fragments_merge() {
    each_backend(|p| async move {
        let opts = p.options().merge(4096, 64 << 10);
        let s = Streams::open(p.dir.path(), opts).await.unwrap();
        s.create("m", StreamConfig::default()).await.unwrap();
        let wo = WriterOptions { max_segment_bytes: 8 << 10, lz4: true, ..common::fast_writer() };
        let w = s.writer_with("m", wo).await.unwrap();
        for i in 0..300 {
            w.append(entry(i)).await.unwrap();
        }
        w.close().await.unwrap();
        let segs = s.segments("m").unwrap();
        assert!(segs.len() > 3, "rolled by size: {segs:?}");
        let before = total_fragments(&s, "m");
        assert_eq!(before, 300);
        let mut r = s.reader("m", Start::Earliest).unwrap();
        assert_eq!(r.next().await.unwrap().data, entry(0));

        s.maintain().await.unwrap();
        let after = total_fragments(&s, "m");
        assert!(after * 10 < before, "merged {before} fragments into {after}");
        assert_eq!(p.fragment_files().len() as u64, after, "old fragments deleted");
        // The reader that was mid-stream and a new one see the same entries.
        for i in 1..300 {
            assert_eq!(r.next().await.unwrap().data, entry(i));
        }
        let mut r = s.reader("m", Start::At(123)).unwrap();
        assert_eq!(r.next().await.unwrap().data, entry(123));
        assert_eq!(s.segments("m").unwrap(), {
            let mut g = s.segments("m").unwrap();
            g.sort_by_key(|g| g.id);
            g
        });
    });
}

#[test]
fn retention_by_size_and_age() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options().merge(0, 0)).await.unwrap();
        let cfg = StreamConfig { retention_bytes: Some(2000), ..Default::default() };
        s.create("size", cfg).await.unwrap();
        let cfg =
            StreamConfig { retention_age: Some(Duration::from_millis(1)), ..Default::default() };
        s.create("age", cfg).await.unwrap();
        let w = s.writer("size").await.unwrap();
        for i in 0..100 {
            w.append(entry(i)).await.unwrap();
        }
        let w2 = s.writer("age").await.unwrap();
        for i in 0..10 {
            w2.append(entry(i)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.maintain().await.unwrap();
        let info = s.info("size").unwrap();
        assert!(info.bytes >= 2000 && info.bytes < 3000, "{info:?}");
        assert!(info.first_id > 0);
        assert_eq!(s.info("age").unwrap().first_id, 10, "every fragment is older than 1 ms");
    });
}

#[test]
fn orphaned_fragments_are_collected() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options().merge(0, 0)).await.unwrap();
        s.create("g", StreamConfig::default()).await.unwrap();
        let w = s.writer("g").await.unwrap();
        for i in 0..5 {
            w.append(entry(i)).await.unwrap();
        }
        w.close().await.unwrap();
        let good = p.fragment_files();
        // Plant a fragment that no metadata records, with a valid name, as a crash would leave.
        let orphan = good[0].replace("00000000000000000000-", "00000000000000000099-");
        assert_ne!(orphan, good[0]);
        match p.backend {
            Backend::Local => {
                let path = p.dir.path().join("objects").join(&orphan);
                std::fs::write(path, b"junk").unwrap();
            }
            Backend::S3 => {
                let root = common::shared_s3().bucket_dir(p.bucket.as_ref().unwrap());
                std::fs::write(root.join(&orphan), b"junk").unwrap();
            }
        }
        assert_eq!(p.fragment_files().len(), good.len() + 1);
        s.maintain().await.unwrap();
        assert_eq!(p.fragment_files(), good);
    });
}

#[test]
fn a_corrupt_fragment_is_an_error_not_data() {
    common::runtime().block_on(async {
        let p = Place::new(Backend::Local);
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("c", StreamConfig::default()).await.unwrap();
        let w = s.writer("c").await.unwrap();
        w.append(&b"hello world"[..]).await.unwrap();
        w.close().await.unwrap();
        let f = p.dir.path().join("objects").join(&p.fragment_files()[0]);
        let mut data = std::fs::read(&f).unwrap();
        data[50] ^= 1;
        std::fs::write(&f, data).unwrap();
        let mut r = s.reader("c", Start::Earliest).unwrap();
        match r.next().await {
            Err(Error::Corrupt { object, reason }) => {
                assert!(object.ends_with(".frag"), "{object}");
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    });
}

#[test]
fn cache_stays_within_its_limit_with_many_readers() {
    each_backend(|p| async move {
        let limit = 64 << 10;
        let s = Streams::open(p.dir.path(), p.options().cache_bytes(limit)).await.unwrap();
        s.create("c", StreamConfig::default()).await.unwrap();
        let wo = WriterOptions {
            max_entries: 16,
            max_interval: Duration::from_secs(1),
            ..common::fast_writer()
        };
        let w = s.writer_with("c", wo).await.unwrap();
        let data = Bytes::from(vec![5u8; 1000]);
        let mut acks = Vec::new();
        for _ in 0..1024 {
            acks.push(w.send(data.clone()).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
        // About 1 MiB in 64 fragments of ~16 KiB; the cache holds 64 KiB.
        let mut tasks = Vec::new();
        for k in 0..8u64 {
            let mut r = s.reader("c", Start::At(k * 100)).unwrap();
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while r.has_next() {
                    let e = r.next().await.unwrap();
                    assert_eq!(e.data.len(), 1000);
                    n += 1;
                }
                n
            }));
        }
        for (k, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), 1024 - k as u64 * 100);
        }
        let st = s.cache_stats();
        let one_fragment = 16 * 1004 + 16 * 8 + 512;
        assert!(st.peak_memory <= (limit + one_fragment) as u64, "{st:?}");
        assert!(st.memory <= limit as u64, "{st:?}");
        assert!(st.evictions > 0 && st.hits > 0, "{st:?}");
    });
}

#[test]
fn segments_roll_by_age() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options()).await.unwrap();
        s.create("age", StreamConfig::default()).await.unwrap();
        let wo =
            WriterOptions { max_segment_age: Duration::from_millis(1), ..common::fast_writer() };
        let w = s.writer_with("age", wo).await.unwrap();
        w.append(entry(0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        w.append(entry(1)).await.unwrap();
        let segs = s.segments("age").unwrap();
        assert_eq!(segs.len(), 2, "{segs:?}");
        assert!(segs[0].sealed && !segs[1].sealed);
        assert_eq!((segs[1].first_id, segs[1].end_id), (1, 2));
    });
}

/// A fragment larger than the stream's `retention_bytes` stays while it holds the newest
/// entries: retention by size drops a fragment only if what stays still holds that much.
#[test]
fn retention_by_size_never_drops_the_newest_fragment_for_being_large() {
    each_backend(|p| async move {
        let s = Streams::open(p.dir.path(), p.options().merge(0, 0)).await.unwrap();
        let cfg = StreamConfig { retention_bytes: Some(4000), ..Default::default() };
        s.create("size", cfg).await.unwrap();
        let w = s.writer("size").await.unwrap();
        let data = Bytes::from(vec![b'x'; 1000]);
        let fragment = || async {
            for _ in 0..20 {
                drop(w.send(data.clone()).await.unwrap());
            }
            w.flush().await.unwrap();
        };
        // The 20 entries are one fragment or a few (a writer may cut one as it goes).
        fragment().await;
        s.maintain().await.unwrap();
        let info = s.info("size").unwrap();
        assert_eq!(info.next_id, 20);
        assert!(info.bytes >= 4000, "{info:?}");
        // More fragments: the first batch goes, and the stream still holds 4000 bytes.
        fragment().await;
        s.maintain().await.unwrap();
        let info = s.info("size").unwrap();
        assert!(info.first_id >= 20 && info.next_id == 40, "{info:?}");
        assert!(info.bytes >= 4000, "{info:?}");
    });
}
