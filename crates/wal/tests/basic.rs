//! Behaviour of the public API: reads, rolls, truncation, limits, locking, permissions, modes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use common::{collect, payload, segments, small};
use timber_wal::{Error, Options, SyncMode, Wal};

#[test]
fn append_read_iter_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(1 << 20)).unwrap();
    assert!(wal.is_empty());
    assert_eq!((wal.first_seq(), wal.last_seq(), wal.next_seq()), (0, None, 0));
    assert_eq!(wal.append(b"a").unwrap(), 0);
    assert_eq!(wal.append_batch(&[b"b".as_slice(), b"", b"d"]).unwrap(), 1..4);
    assert_eq!(wal.append_batch::<&[u8]>(&[]).unwrap(), 4..4);
    assert_eq!((wal.len(), wal.last_seq()), (4, Some(3)));
    assert_eq!(&wal.read(2).unwrap()[..], b"");
    assert!(matches!(wal.read(4), Err(Error::NotFound { seq: 4, first: 0, next: 4 })));
    let all = collect(&wal, 0..100);
    assert_eq!(all, vec![(0, b"a".to_vec()), (1, b"b".to_vec()), (2, vec![]), (3, b"d".to_vec())]);
    assert_eq!(collect(&wal, 1..3).len(), 2);
    assert_eq!(wal.iter(2..=3).count(), 2);
    assert_eq!(wal.iter(10..).count(), 0);
}

#[test]
fn records_roll_over_segments_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let n = 500u64;
    {
        let wal = Wal::open(dir.path(), small(8192)).unwrap();
        for i in 0..n {
            assert_eq!(wal.append(&payload(i, (i % 300) as usize)).unwrap(), i);
        }
        assert!(segments(dir.path()).len() > 5);
        for i in (0..n).step_by(7) {
            assert_eq!(wal.read(i).unwrap().to_vec(), payload(i, (i % 300) as usize));
        }
    }
    assert!(!dir.path().join("wal_spare.tmp").exists(), "close removes the spare segment");
    let wal = Wal::open(dir.path(), small(8192)).unwrap();
    assert_eq!(wal.next_seq(), n);
    let all = collect(&wal, 0..n);
    assert_eq!(all.len() as u64, n);
    for (s, b) in all {
        assert_eq!(b, payload(s, (s % 300) as usize));
    }
}

#[test]
fn oversized_records_get_a_segment_of_their_own_when_allowed() {
    // `Manual` with a flush after each append writes through the map of the preallocated
    // segment, which an oversized record outgrows (the rest goes by `pwrite`).
    for mode in [SyncMode::Always, SyncMode::Manual] {
        let dir = tempfile::tempdir().unwrap();
        let opts = || small(4096).oversized_records(true).sync(mode);
        let wal = Wal::open(dir.path(), opts()).unwrap();
        let flush = |wal: &Wal| wal.flush().unwrap();
        wal.append(b"before").unwrap();
        flush(&wal);
        let big = payload(1, 20_000);
        assert_eq!(wal.append(&big).unwrap(), 1);
        flush(&wal);
        let batch: Vec<Vec<u8>> = (2..6).map(|s| payload(s, 3000)).collect();
        assert_eq!(wal.append_batch(&batch).unwrap(), 2..6);
        flush(&wal);
        wal.append(b"after").unwrap();
        flush(&wal);
        // A segment takes its name once its roll is finished, which a sync makes sure of.
        wal.sync().unwrap();
        assert!(segments(dir.path()).len() >= 4, "each oversized write starts its own segment");
        let check = |wal: &Wal| {
            assert_eq!(&wal.read(0).unwrap()[..], b"before");
            assert_eq!(wal.read(1).unwrap(), big);
            for s in 2..6 {
                assert_eq!(wal.read(s).unwrap(), payload(s, 3000));
            }
            assert_eq!(&wal.read(6).unwrap()[..], b"after");
        };
        check(&wal);
        drop(wal);
        check(&Wal::open(dir.path(), opts()).unwrap());
    }
}

#[test]
fn flush_hands_records_to_the_os() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(1 << 20).sync(SyncMode::Manual)).unwrap();
    wal.append(b"flushed").unwrap();
    wal.flush().unwrap();
    // A second handle on the segment file sees the record without any sync.
    let bytes = std::fs::read(&segments(dir.path())[0]).unwrap();
    assert!(bytes.windows(7).any(|w| w == b"flushed"));
}

#[test]
fn oversized_record_is_invalid_and_log_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    wal.append(b"before").unwrap();
    let big = vec![7u8; 4096];
    assert!(matches!(wal.append(&big), Err(Error::InvalidParam(m)) if m.contains("does not fit")));
    let batch = vec![vec![1u8; 1000]; 4];
    assert!(matches!(wal.append_batch(&batch), Err(Error::InvalidParam(_))));
    let max = 4096 - timber_wal::segment_overhead() - timber_wal::record_overhead();
    assert_eq!(wal.append(&vec![1u8; max as usize]).unwrap(), 1);
    assert_eq!(wal.append(b"after").unwrap(), 2);
    assert_eq!(&wal.read(0).unwrap()[..], b"before");
}

#[test]
fn invalid_options_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [
        Options::default().segment_capacity(100),
        Options::default().segment_capacity(1 << 33),
        Options::default().reader_cache(0),
        Options::default().max_size(Some(10)),
        Options::default().sync(SyncMode::Interval(Duration::ZERO)),
        Options::default().syncs_in_flight(0),
        Options::default().syncs_in_flight(9),
        Options::default().file_mode(0o1_000_000),
    ] {
        assert!(matches!(Wal::open(dir.path(), opts), Err(Error::InvalidParam(_))));
    }
}

#[test]
fn full_log_refuses_appends_until_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096).max_size(Some(20_000))).unwrap();
    let rec = vec![3u8; 500];
    let mut appended = 0;
    let err = loop {
        match wal.append(&rec) {
            Ok(_) => appended += 1,
            Err(e) => break e,
        }
        assert!(appended < 1000, "never became full");
    };
    assert!(matches!(err, Error::Full { limit: 20_000, .. }), "{err}");
    assert!(wal.size_on_disk() <= 20_000);
    assert_eq!(wal.len(), appended);
    // Still usable: reads work, and truncating the front frees room.
    assert_eq!(wal.read(0).unwrap().len(), 500);
    wal.truncate_front(appended / 2).unwrap();
    wal.append(&rec).unwrap();
    assert_eq!(wal.last_seq(), Some(appended));
}

#[test]
fn second_open_is_locked_until_close() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    let err = Wal::open(dir.path(), small(4096)).unwrap_err();
    assert!(matches!(&err, Error::Locked { dir: d } if d == dir.path()), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    wal.append(b"x").unwrap();
    wal.close().unwrap();
    assert!(matches!(wal.append(b"y"), Err(Error::Closed)));
    assert!(matches!(wal.read(0), Err(Error::Closed)));
    let again = Wal::open(dir.path(), small(4096)).unwrap();
    assert_eq!(&again.read(0).unwrap()[..], b"x");
}

#[test]
fn directory_and_files_get_configured_permissions() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("a/b/log");
    let wal = Wal::open(&dir, small(4096).dir_mode(0o700).file_mode(0o600)).unwrap();
    wal.append(b"x").unwrap();
    wal.truncate_front(1).unwrap(); // writes the meta file
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
}

#[test]
fn truncate_front_deletes_whole_segments_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    for i in 0..200 {
        wal.append(&payload(i, 100)).unwrap();
    }
    let before = segments(dir.path()).len();
    wal.truncate_front(150).unwrap();
    assert!(segments(dir.path()).len() < before);
    assert_eq!((wal.first_seq(), wal.len()), (150, 50));
    assert!(matches!(wal.read(149), Err(Error::NotFound { first: 150, .. })));
    assert_eq!(wal.iter(..).next().unwrap().unwrap().0, 150);
    wal.truncate_front(10).unwrap(); // going backwards is a no-op
    drop(wal);
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    assert_eq!((wal.first_seq(), wal.next_seq()), (150, 200));
    assert_eq!(wal.read(150).unwrap().to_vec(), payload(150, 100));
}

#[test]
fn truncate_front_past_the_end_restarts_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    for i in 0..100 {
        wal.append(&payload(i, 100)).unwrap();
    }
    wal.truncate_front(1000).unwrap();
    assert_eq!((wal.first_seq(), wal.next_seq(), wal.len()), (1000, 1000, 0));
    assert_eq!(segments(dir.path()).len(), 1);
    assert_eq!(wal.append(b"x").unwrap(), 1000);
    drop(wal);
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    assert_eq!((wal.first_seq(), wal.next_seq()), (1000, 1001));
}

#[test]
fn truncate_back_across_segments_and_reuse_of_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    for i in 0..300 {
        wal.append(&payload(i, 100)).unwrap();
    }
    wal.truncate_front(20).unwrap();
    wal.truncate_back(40).unwrap();
    assert_eq!((wal.first_seq(), wal.next_seq()), (20, 40));
    assert!(matches!(wal.truncate_back(10), Err(Error::InvalidParam(_))));
    assert_eq!(wal.append(b"new 40").unwrap(), 40);
    for i in 41..250 {
        wal.append(&payload(i + 1000, 100)).unwrap();
    }
    drop(wal);
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    assert_eq!((wal.first_seq(), wal.next_seq()), (20, 250));
    assert_eq!(wal.read(39).unwrap().to_vec(), payload(39, 100));
    assert_eq!(&wal.read(40).unwrap()[..], b"new 40");
    assert_eq!(wal.read(200).unwrap().to_vec(), payload(1200, 100));
    wal.truncate_back(20).unwrap();
    assert!(wal.is_empty());
    assert_eq!(wal.append(b"again").unwrap(), 20);
}

/// Many waiters at once, segments sealed under them, and `sync` callers, with one group commit
/// at a time and with several overlapping: no waiter is left parked (a hang fails the test after a generous deadline rather than blocking it).
#[test]
fn group_commit_leaves_no_waiter_behind() {
    for (mode, syncs) in [(SyncMode::Always, 1), (SyncMode::Always, 3), (SyncMode::Manual, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let opts = small(8 << 10).sync(mode).syncs_in_flight(syncs);
        let wal = Arc::new(Wal::open(dir.path(), opts).unwrap());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for t in 0..24u64 {
            let (wal, done_tx) = (wal.clone(), done_tx.clone());
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    wal.append(&payload(t * 1000 + i, 40 + (i as usize % 7) * 60)).unwrap();
                    if mode == SyncMode::Manual || t % 8 == 0 {
                        wal.sync().unwrap();
                    }
                }
                done_tx.send(()).unwrap();
            });
        }
        drop(done_tx);
        for _ in 0..24 {
            done_rx
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("{mode:?}: an appender never returned"));
        }
        assert_eq!(wal.len(), 24 * 300);
    }
}

#[test]
fn concurrent_appenders_get_dense_unique_sequence_numbers() {
    for mode in [SyncMode::Always, SyncMode::Manual, SyncMode::Interval(Duration::from_millis(5))] {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(dir.path(), small(64 << 10).sync(mode)).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let wal = wal.clone();
                std::thread::spawn(move || {
                    (0..200u64)
                        .map(|i| {
                            let body = payload(t * 1000 + i, 50);
                            if i % 10 == 0 {
                                let r = wal.append_batch(&[body.clone(), body.clone()]).unwrap();
                                (r.start, body)
                            } else {
                                (wal.append(&body).unwrap(), body)
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut acked: Vec<(u64, Vec<u8>)> =
            threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        acked.sort();
        assert_eq!(wal.len(), 8 * 200 + 8 * 20);
        for (seq, body) in &acked {
            assert_eq!(&wal.read(*seq).unwrap()[..], &body[..]);
        }
        let wal = Arc::try_unwrap(wal).unwrap();
        drop(wal);
        let wal = Wal::open(dir.path(), small(64 << 10)).unwrap();
        assert_eq!(wal.len(), 8 * 200 + 8 * 20, "{mode:?}");
        for (seq, body) in &acked {
            assert_eq!(&wal.read(*seq).unwrap()[..], &body[..]);
        }
    }
}

#[test]
fn interval_mode_syncs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let wal =
        Wal::open(dir.path(), small(1 << 20).sync(SyncMode::Interval(Duration::from_millis(10))))
            .unwrap();
    let marker = b"record synced by the background thread";
    wal.append(marker).unwrap();
    // The background thread hands the record to the OS within a few intervals; poll the file
    // size rather than sleeping a fixed time.
    let seg = segments(dir.path()).pop().unwrap();
    let written =
        |p: &std::path::Path| std::fs::read(p).unwrap().windows(marker.len()).any(|w| w == marker);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !written(&seg) {
        assert!(std::time::Instant::now() < deadline, "background sync never wrote the record");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Rolls every few records while the spare preparer works beside them. (A race between the two,
/// where a new spare was created under the name of one being renamed, showed up once in CI as a
/// failed rename; it is now excluded by a lock. This test exercises the interleaving but does not
/// reproduce the old race reliably.)
#[test]
fn fast_rolls_racing_the_spare_preparer_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), small(4096)).unwrap();
        for i in 0..5000u64 {
            wal.append(&payload(i, 100 + (i % 200) as usize)).unwrap();
        }
    }
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    assert_eq!(wal.next_seq(), 5000);
    for (s, b) in collect(&wal, 0..5000) {
        assert_eq!(b, payload(s, 100 + (s % 200) as usize), "record {s}");
    }
}

#[test]
fn unfinished_roll_is_adopted_on_reopen() {
    // A roll publishes the next segment (rename from `wal_N.log.tmp`) after the writer has moved
    // on; a crash in between leaves flushed records under the temporary name. Closing and
    // renaming the last segment back recreates that state.
    let dir = tempfile::tempdir().unwrap();
    let n = 300u64;
    {
        let wal = Wal::open(dir.path(), small(8192)).unwrap();
        for i in 0..n {
            wal.append(&payload(i, 100)).unwrap();
        }
        wal.close().unwrap();
    }
    let segs = segments(dir.path());
    assert!(segs.len() > 2);
    let last = segs.last().unwrap().clone();
    let tmp = last.with_extension("log.tmp");
    std::fs::rename(&last, &tmp).unwrap();
    // A temporary segment that continues nothing is not part of the log.
    let stray = dir.path().join("wal_00000000000099999999.log.tmp");
    std::fs::write(&stray, b"not a segment").unwrap();

    let wal = Wal::open(dir.path(), small(8192)).unwrap();
    assert_eq!(wal.next_seq(), n);
    let all = collect(&wal, 0..n);
    assert_eq!(all.len() as u64, n);
    for (s, b) in all {
        assert_eq!(b, payload(s, 100));
    }
    assert!(last.exists() && !tmp.exists() && !stray.exists());
    assert_eq!(wal.append(b"next").unwrap(), n);
}

#[test]
fn a_torn_unfinished_roll_is_reported_when_its_records_were_durable() {
    // The log was closed (every record durable), then the last segment lost all but 7 bytes of
    // its header under the temporary name: records that were durable are gone, which recovery
    // must report rather than silently continue without them.
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), small(8192)).unwrap();
        let mut i = 0u64;
        while segments(dir.path()).len() < 3 {
            wal.append(&payload(i, 100)).unwrap();
            i += 1;
        }
        wal.close().unwrap();
    }
    let segs = segments(dir.path());
    let last = segs.last().unwrap();
    let tmp = last.with_extension("log.tmp");
    std::fs::rename(last, &tmp).unwrap();
    std::fs::OpenOptions::new().write(true).open(&tmp).unwrap().set_len(7).unwrap();
    match Wal::open(dir.path(), small(8192)) {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("missing"), "{reason}"),
        other => panic!("expected a corruption report, got {:?}", other.map(|_| ())),
    }
    // The sealed segments are untouched.
    assert_eq!(segments(dir.path()), segs[..segs.len() - 1].to_vec());
}

#[test]
fn truncate_front_racing_appends_and_rolls_loses_nothing_kept() {
    // truncate_front stores its meta and deletes segments without the state lock, while the
    // writer rolls: every record at or above the last truncation point must survive reopen.
    let dir = tempfile::tempdir().unwrap();
    let n = 20_000u64;
    let wal = Arc::new(Wal::open(dir.path(), small(16 << 10)).unwrap());
    let writer = {
        let wal = wal.clone();
        std::thread::spawn(move || {
            for i in 0..n {
                assert_eq!(wal.append(&payload(i, 64)).unwrap(), i);
                if i % 64 == 0 {
                    wal.flush().unwrap();
                }
            }
            wal.sync().unwrap();
        })
    };
    let mut cut = 0u64;
    while !writer.is_finished() {
        let next = wal.next_seq();
        if next > cut + 500 {
            cut = next - 200;
            wal.truncate_front(cut).unwrap();
            assert_eq!(wal.first_seq(), cut);
        }
        std::thread::yield_now();
    }
    writer.join().unwrap();
    assert!(cut > 0, "the truncations ran while the writer appended");
    let wal = Arc::try_unwrap(wal).ok().unwrap();
    wal.close().unwrap();
    drop(wal);
    let wal = Wal::open(dir.path(), small(16 << 10)).unwrap();
    assert_eq!((wal.first_seq(), wal.next_seq()), (cut, n));
    let all = collect(&wal, cut..n);
    assert_eq!(all.len() as u64, n - cut);
    for (s, b) in all {
        assert_eq!(b, payload(s, 64));
    }
}
