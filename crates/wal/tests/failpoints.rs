//! Fault injection through the crate's failpoints (feature `failpoints`; see
//! docs/ARCHITECTURE.md, "Fault injection"): writes, fsyncs, renames and reads fail at each
//! place, and each test checks what the log promises then: the call fails with an `Io` error
//! naming the file and the operation, a failed write or fsync poisons the log (every later write
//! is `Poisoned` until reopen), a failed read poisons nothing, and after a reopen every
//! acknowledged record is there, intact, and the log takes writes again.
//!
//! The failpoint registry is global to the process: every test holds a `FailScenario`, which
//! serializes them and clears every failpoint when it ends.
#![cfg(feature = "failpoints")]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;

use common::payload;
use fail::FailScenario;
use timber_wal::{Error, Options, SyncMode, Wal};

/// What the test knows of the log: the records whose append (and, outside `Always`, whose
/// flush or sync) returned Ok, and the records of calls that failed, which may or may not have
/// reached the disk.
#[derive(Debug, Default)]
struct Model {
    acked: BTreeMap<u64, Vec<u8>>,
    unknown: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    /// Checks the reopened log: every acknowledged record at or after `first` is there, intact;
    /// anything else it holds is a record of a failed call, never garbage; the records are dense.
    fn check(&self, wal: &Wal) {
        let first = wal.first_seq();
        let mut next = first;
        for r in wal.iter(..) {
            let (seq, data) = r.unwrap();
            assert_eq!(seq, next, "records are dense");
            next += 1;
            let want = self.acked.get(&seq).or_else(|| self.unknown.get(&seq));
            assert_eq!(want.map(Vec::as_slice), Some(&data[..]), "record {seq} is one written");
        }
        for (&seq, data) in self.acked.range(first..) {
            assert!(seq < next, "acknowledged record {seq} is lost (the log ends at {next})");
            assert_eq!(&wal.read(seq).unwrap()[..], &data[..], "record {seq}");
        }
    }

    /// Appends a record to a reopened log and reads it back: the log takes writes again.
    fn write_again(&mut self, wal: &Wal) {
        let data = b"after reopen".to_vec();
        let seq = wal.append(&data).unwrap();
        wal.sync().unwrap();
        assert_eq!(&wal.read(seq).unwrap()[..], &data[..]);
        self.acked.insert(seq, data);
    }
}

fn record(i: u64) -> Vec<u8> {
    payload(i, 40 + (i % 200) as usize)
}

fn always(capacity: u64) -> Options {
    Options::default().sync(SyncMode::Always).segment_capacity(capacity)
}

/// Asserts `e` is the injected `Io` error of operation `op` on a file whose name contains
/// `file`.
#[track_caller]
fn assert_io(e: &Error, op: &str, file: &str) {
    match e {
        Error::Io { path, op: got, source } => {
            assert_eq!(*got, op, "{e}");
            let name = path.file_name().unwrap().to_string_lossy();
            assert!(name.contains(file), "{e}: expected a file named like {file:?}");
            assert!(source.to_string().contains("injected"), "{e}");
        }
        e => panic!("expected an I/O error of {op} on {file}, got {e:?}"),
    }
}

/// Asserts every write is refused with `Poisoned` naming `cause`, and reads still work.
#[track_caller]
fn assert_poisoned(wal: &Wal, cause: &str, readable: Option<u64>) {
    let refused = [
        wal.append(b"x").unwrap_err(),
        wal.append_batch(&[b"y", b"z"]).unwrap_err(),
        wal.flush().unwrap_err(),
        wal.sync().unwrap_err(),
        wal.truncate_front(wal.first_seq() + 1).unwrap_err(),
        wal.truncate_back(wal.first_seq()).unwrap_err(),
    ];
    for e in refused {
        assert!(matches!(&e, Error::Poisoned { cause: c } if c.contains(cause)), "{e}");
    }
    if let Some(seq) = readable {
        wal.read(seq).unwrap();
    }
}

/// Appends `n` records from `i` in batches of up to 10, acknowledged (synced in `Always` mode,
/// else synced here).
fn append_acked(wal: &Wal, m: &mut Model, from: u64, n: u64) {
    let end = from + n;
    for first in (from..end).step_by(10) {
        let batch: Vec<Vec<u8>> = (first..end.min(first + 10)).map(record).collect();
        let seqs = wal.append_batch(&batch).unwrap();
        m.acked.extend(seqs.zip(batch));
    }
    wal.sync().unwrap();
}

/// A failed write of records, by `pwrite` before an fsync (`Always`) and by the copy through
/// the segment's map (`Manual`, flushed at once), fails the call and poisons the log.
#[test]
fn a_failed_write_poisons_the_log_and_loses_nothing_acknowledged() {
    let modes = [
        ("pwrite", Options::default().sync(SyncMode::Always)),
        ("map", Options::default().sync(SyncMode::Manual).write_buffer(0)),
    ];
    for (path, opts) in modes {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        {
            let wal = Wal::open(dir.path(), opts.clone()).unwrap();
            append_acked(&wal, &mut m, 0, 50);
            fail::cfg("wal::active::write", "return").unwrap();
            let data = record(50);
            let e = wal.append(&data).unwrap_err();
            assert_io(&e, "write", ".log");
            m.unknown.insert(50, data);
            // Poisoned even once the disk works again: only a reopen tells what is there.
            fail::remove("wal::active::write");
            assert_poisoned(&wal, "injected", Some(3));
        }
        let wal = Wal::open(dir.path(), opts).unwrap();
        m.check(&wal);
        assert_eq!(wal.next_seq(), 50, "{path}: the failed write never reached the file");
        m.write_again(&wal);
        drop(wal);
        m.check(&Wal::open(dir.path(), Options::default()).unwrap());
    }
}

/// A failed fsync poisons the log: the call fails, every later write is refused, and a retried
/// sync cannot report lost data as durable. The record whose sync failed may survive or not.
#[test]
fn a_failed_fsync_poisons_the_log_and_loses_nothing_acknowledged() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let mut m = Model::default();
    {
        let wal = Wal::open(dir.path(), always(64 << 10)).unwrap();
        append_acked(&wal, &mut m, 0, 300);
        fail::cfg("wal::write::fsync", "1*return->off").unwrap();
        let data = record(300);
        let e = wal.append(&data).unwrap_err();
        assert_io(&e, "fdatasync", ".log");
        m.unknown.insert(300, data);
        assert_poisoned(&wal, "fdatasync", Some(299));
    }
    let wal = Wal::open(dir.path(), always(64 << 10)).unwrap();
    m.check(&wal);
    m.write_again(&wal);
}

/// Under group commit (several appenders, one or two fsyncs in flight), an fsync fails in the
/// middle: no appender whose record that fsync (or a later one) was to cover gets Ok, and
/// every record acknowledged before is there after a reopen.
#[test]
fn a_failed_group_commit_acknowledges_nothing_it_covered() {
    for syncs in [1, 2] {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let opts = always(256 << 10).syncs_in_flight(syncs);
        let wal = Arc::new(Wal::open(dir.path(), opts.clone()).unwrap());
        // The 40th fsync fails (the first ones run while the threads start).
        fail::cfg("wal::write::fsync", "39*off->1*return->off").unwrap();
        let threads = 4;
        let start = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                let (wal, start) = (wal.clone(), start.clone());
                thread::spawn(move || {
                    start.wait();
                    let mut acked = Vec::new();
                    let mut failed = Vec::new();
                    for i in 0..200 {
                        let data = record(t * 1000 + i);
                        match wal.append(&data) {
                            Ok(seq) => acked.push((seq, data)),
                            Err(e) => {
                                assert!(
                                    matches!(
                                        e,
                                        Error::Poisoned { .. } | Error::Io { op: "fdatasync", .. }
                                    ),
                                    "{e}"
                                );
                                failed.push(data);
                                break;
                            }
                        }
                    }
                    (acked, failed)
                })
            })
            .collect();
        let mut m = Model::default();
        let mut failed = Vec::new();
        for h in handles {
            let (acked, f) = h.join().unwrap();
            m.acked.extend(acked);
            failed.extend(f);
        }
        assert_eq!(failed.len(), threads, "every appender saw the failure");
        assert_poisoned(&wal, "fdatasync", None);
        drop(wal);
        let wal = Wal::open(dir.path(), opts).unwrap();
        // The failed appends' records have sequence numbers the test never learned: whatever
        // the log holds past the acknowledged ones must be among them.
        let next = wal.next_seq();
        for seq in 0..next {
            if !m.acked.contains_key(&seq) {
                let data = wal.read(seq).unwrap().to_vec();
                assert!(failed.contains(&data), "syncs={syncs}: record {seq} is one never written");
                m.unknown.insert(seq, data);
            }
        }
        m.check(&wal);
        m.write_again(&wal);
    }
}

/// Every place of a roll fails in turn: the seal of the full segment (index and trailer), the
/// header of the next one, its rename into place, the directory fsync. The append that rolled
/// fails, the log is poisoned, and a reopen finds every acknowledged record and rolls on.
#[test]
fn a_failed_roll_poisons_the_log_and_the_reopened_log_rolls_on() {
    let places = [
        ("wal::write::seal", "write", ".log"),
        ("wal::segment::create", "write", ".tmp"),
        ("wal::segment::rename", "rename", ".tmp"),
        ("wal::segment::sync_dir", "fsync directory", ""),
    ];
    for (fp, op, file) in places {
        for recycle in [false, true] {
            let _s = FailScenario::setup();
            let dir = tempfile::tempdir().unwrap();
            let opts = always(8 << 10).recycle_segments(recycle);
            let mut m = Model::default();
            {
                let wal = Wal::open(dir.path(), opts.clone()).unwrap();
                append_acked(&wal, &mut m, 0, 100);
                if recycle {
                    // Keep a dropped segment for reuse: the next roll takes it.
                    wal.truncate_front(60).unwrap();
                }
                fail::cfg(fp, "return").unwrap();
                let mut i = 100;
                let e = loop {
                    let data = record(i);
                    match wal.append(&data) {
                        Ok(seq) => {
                            m.acked.insert(seq, data);
                        }
                        Err(e) => {
                            m.unknown.insert(i, data);
                            break e;
                        }
                    }
                    i += 1;
                    assert!(i < 200, "{fp}: a roll comes within a segment of records");
                };
                let dir_name = dir.path().file_name().unwrap().to_string_lossy().to_string();
                assert_io(&e, op, if file.is_empty() { &dir_name } else { file });
                fail::remove(fp);
                assert_poisoned(&wal, "injected", Some(70));
            }
            let wal = Wal::open(dir.path(), opts.clone()).unwrap();
            m.check(&wal);
            let n = wal.next_seq();
            append_acked(&wal, &mut m, n, 200);
            drop(wal);
            let wal = Wal::open(dir.path(), opts).unwrap();
            m.check(&wal);
            m.write_again(&wal);
        }
    }
}

/// The spare segment cannot be prepared: the preparer gives up with a warning, the roll creates
/// the next segment itself, and no write fails.
#[test]
fn a_failed_spare_preparation_fails_no_write() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let opts = always(8 << 10);
    fail::cfg("wal::segment::prepare_spare", "return").unwrap();
    let mut m = Model::default();
    {
        let wal = Wal::open(dir.path(), opts.clone()).unwrap();
        append_acked(&wal, &mut m, 0, 400);
        assert!(common::segments(dir.path()).len() > 5, "the log rolled");
    }
    fail::remove("wal::segment::prepare_spare");
    let wal = Wal::open(dir.path(), opts).unwrap();
    m.check(&wal);
    m.write_again(&wal);
}

/// The segment cannot be mapped: writes go by `pwrite` instead, and none fails.
#[test]
fn a_segment_that_cannot_be_mapped_is_written_with_pwrite() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default().sync(SyncMode::Manual).write_buffer(0).segment_capacity(64 << 10);
    let mut m = Model::default();
    {
        let wal = Wal::open(dir.path(), opts.clone()).unwrap();
        fail::cfg("wal::mapped::map", "return").unwrap();
        for i in 0..600 {
            let data = record(i);
            let seq = wal.append(&data).unwrap();
            m.acked.insert(seq, data);
            assert_eq!(wal.read(seq).unwrap().to_vec(), record(i));
        }
        wal.sync().unwrap();
        fail::remove("wal::mapped::map");
    }
    let wal = Wal::open(dir.path(), opts).unwrap();
    m.check(&wal);
    m.write_again(&wal);
}

/// The commit point of a truncation (the meta file: written, fsynced, renamed, directory
/// fsynced) fails at each step: the call fails and poisons the log; after a reopen the
/// truncation is wholly done or wholly undone, and every acknowledged record it did not drop is
/// there.
#[test]
fn a_failed_truncation_commit_is_all_or_nothing() {
    let places = [
        // (failpoint, actions, op, file, the commit happened)
        ("wal::meta::write", "return", "write", "wal.meta.tmp", false),
        ("wal::meta::rename", "return", "rename", "wal.meta.tmp", false),
        // The meta file is in place, its directory entry not yet fsynced.
        ("wal::segment::sync_dir", "return", "fsync directory", "", true),
    ];
    for (fp, actions, op, file, committed) in places {
        for back in [false, true] {
            let _s = FailScenario::setup();
            let dir = tempfile::tempdir().unwrap();
            let opts = always(8 << 10);
            let mut m = Model::default();
            let (cut, old_next) = {
                let wal = Wal::open(dir.path(), opts.clone()).unwrap();
                append_acked(&wal, &mut m, 0, 300);
                fail::cfg(fp, actions).unwrap();
                let e = if back { wal.truncate_back(150) } else { wal.truncate_front(150) };
                let e = e.unwrap_err();
                let dir_name = dir.path().file_name().unwrap().to_string_lossy().to_string();
                assert_io(&e, op, if file.is_empty() { &dir_name } else { file });
                fail::remove(fp);
                assert_poisoned(&wal, "injected", Some(200));
                (150, wal.next_seq())
            };
            let wal = Wal::open(dir.path(), opts).unwrap();
            let what = format!("{fp}, truncate_{}", if back { "back" } else { "front" });
            if back {
                let want = if committed { cut } else { old_next };
                assert_eq!(wal.next_seq(), want, "{what}");
                m.acked.retain(|&s, _| s < wal.next_seq());
            } else {
                let want = if committed { cut } else { 0 };
                assert_eq!(wal.first_seq(), want, "{what}");
            }
            m.check(&wal);
            m.write_again(&wal);
        }
    }
}

/// `truncate_back` fails after its commit point (its second meta write, which clears the
/// pending cut, fails): a reopen finishes the cut.
#[test]
fn a_truncate_back_that_fails_after_its_commit_point_is_finished_by_reopen() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let opts = always(8 << 10);
    let mut m = Model::default();
    {
        let wal = Wal::open(dir.path(), opts.clone()).unwrap();
        append_acked(&wal, &mut m, 0, 300);
        fail::cfg("wal::meta::write", "1*off->return").unwrap();
        assert_io(&wal.truncate_back(120).unwrap_err(), "write", "wal.meta.tmp");
        fail::remove("wal::meta::write");
        assert_poisoned(&wal, "injected", Some(100));
    }
    let wal = Wal::open(dir.path(), opts).unwrap();
    assert_eq!(wal.next_seq(), 120);
    m.acked.retain(|&s, _| s < 120);
    m.check(&wal);
    m.write_again(&wal);
}

/// `close` cannot store the durable point in the meta file: it returns the error, and the log
/// reopens with every record (the meta file only lets recovery tell more damage from a torn
/// write).
#[test]
fn a_failed_close_loses_nothing() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default().sync(SyncMode::Manual);
    let mut m = Model::default();
    let wal = Wal::open(dir.path(), opts.clone()).unwrap();
    append_acked(&wal, &mut m, 0, 100);
    for i in 100..110 {
        m.unknown.insert(wal.append(&record(i)).unwrap(), record(i));
    }
    fail::cfg("wal::meta::write", "return").unwrap();
    assert_io(&wal.close().unwrap_err(), "write", "wal.meta.tmp");
    fail::remove("wal::meta::write");
    assert!(matches!(wal.append(b"x"), Err(Error::Closed | Error::Poisoned { .. })));
    drop(wal);
    let wal = Wal::open(dir.path(), opts).unwrap();
    assert_eq!(wal.next_seq(), 110, "close synced every record before it failed");
    m.check(&wal);
    m.write_again(&wal);
}

/// A failed read of records (sealed segment, active segment, iterator) is an error naming the
/// segment, poisons nothing, and the same read succeeds once the disk works again.
#[test]
fn a_failed_read_is_an_error_and_poisons_nothing() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), always(8 << 10)).unwrap();
    let mut m = Model::default();
    append_acked(&wal, &mut m, 0, 300);
    fail::cfg("wal::segment::read", "return").unwrap();
    for seq in [0, 150, 299] {
        assert_io(&wal.read(seq).unwrap_err(), "read", ".log");
    }
    let mut it = wal.iter(..);
    assert_io(&it.next().unwrap().unwrap_err(), "read", ".log");
    assert!(it.next().is_none(), "an iterator ends after an error");
    // Writes go on: reads poison nothing.
    append_acked(&wal, &mut m, 300, 10);
    fail::remove("wal::segment::read");
    m.check(&wal);
    m.write_again(&wal);
}

/// Reads at open fail (the headers and trailers of segments, the scan of the last one): open
/// fails with the error, modifies no file, and the next open finds everything.
#[test]
fn a_failed_read_at_open_fails_the_open_and_changes_nothing() {
    for fp in ["wal::recovery::scan", "wal::segment::read"] {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let opts = always(8 << 10);
        let mut m = Model::default();
        {
            let wal = Wal::open(dir.path(), opts.clone()).unwrap();
            append_acked(&wal, &mut m, 0, 300);
        }
        let before = files(dir.path());
        fail::cfg(fp, "return").unwrap();
        assert_io(&Wal::open(dir.path(), opts.clone()).unwrap_err(), "read", ".log");
        assert_eq!(files(dir.path()), before, "{fp}: a failed open changes no file");
        fail::remove(fp);
        let wal = Wal::open(dir.path(), opts).unwrap();
        m.check(&wal);
        m.write_again(&wal);
    }
}

/// Every file of a directory with its bytes.
/// The interval's sync comes however often appends kick the sync thread to start writeback:
/// with each start slowed down at its end (after it let appends kick again) and a kick after
/// every append, one is always waiting when the interval ends, and the sync must not wait for a
/// moment without one.
#[test]
fn the_interval_sync_comes_while_kicks_are_always_waiting() {
    let scenario = FailScenario::setup();
    let (synced, syncs) = std::sync::mpsc::sync_channel::<()>(1);
    fail::cfg_callback("wal::write::fsync", move || {
        let _ = synced.try_send(());
    })
    .unwrap();
    fail::cfg("wal::write::start_writeback", "sleep(5)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default()
        .sync(SyncMode::Interval(std::time::Duration::from_millis(20)))
        .bytes_per_sync(Some(1))
        // No roll (whose fsync counts too) within the test's time.
        .segment_capacity(1 << 31)
        .preallocate(false);
    let wal = Arc::new(Wal::open(dir.path(), opts).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let appender = {
        let (wal, stop) = (wal.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                wal.append(b"kick").unwrap();
            }
        })
    };
    let seen = syncs.recv_timeout(std::time::Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    appender.join().unwrap();
    drop(wal);
    scenario.teardown();
    assert!(seen.is_ok(), "no interval sync within 5 s while appends kept kicking");
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "LOCK")
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}
