//! Fault injection through the failpoints of timber-kv and of its WAL (feature `failpoints`;
//! see docs/ARCHITECTURE.md, "Fault injection"). Each test makes writes, some acknowledged,
//! makes a write, fsync, rename or read fail at one place, and checks what the engine promises:
//! the call fails with an error naming the file and the operation; after a failed WAL write or
//! sync, or a failed flush or compaction (whose error surfaces as `Poisoned` on the next write
//! or `flush`), every write is refused until reopen while reads go on; a failed read poisons
//! nothing; and after a reopen every acknowledged write is there and the database takes writes
//! again.
//!
//! The failpoint registry is global to the process: every test holds a `FailScenario`, which
//! serializes them and clears every failpoint when it ends.
#![cfg(feature = "failpoints")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fail::FailScenario;
use timber_kv::{Db, Durability, Error, Options, WriteBatch};

/// Small memtables and tables; no background work the test does not ask for (no WAL interval
/// sync, no idle compaction, no compaction before 100 L0 tables).
fn opts() -> Options {
    Options::default()
        .memtable_size(32 << 10)
        .block_size(512)
        .target_file_size(16 << 10)
        .wal_segment_size(64 << 10)
        .wal_sync_interval(None)
        .idle_compaction_after(None)
        .l0_compaction_trigger(100)
        .l0_stall_triggers(200, 300)
}

fn key(i: u64) -> Vec<u8> {
    format!("key{i:06}").into_bytes()
}

fn val(i: u64, round: u64) -> Vec<u8> {
    format!("v{i}-{round}-{}", "x".repeat((i % 40) as usize)).into_bytes()
}

/// What the test knows: each key's last acknowledged value (`None`: deleted), and the values of
/// writes that failed, which may or may not have reached the disk.
#[derive(Debug, Default)]
struct Model {
    acked: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    unknown: BTreeMap<Vec<u8>, BTreeSet<Option<Vec<u8>>>>,
}

impl Model {
    fn put(&mut self, db: &Db, k: Vec<u8>, v: Vec<u8>) {
        db.put(&k, &v).unwrap();
        self.acked.insert(k, Some(v));
    }

    /// Puts keys `range` at `round`, each acknowledged.
    fn fill(&mut self, db: &Db, range: std::ops::Range<u64>, round: u64) {
        for i in range {
            self.put(db, key(i), val(i, round));
        }
    }

    fn failed(&mut self, k: Vec<u8>, v: Option<Vec<u8>>) {
        self.unknown.entry(k).or_default().insert(v);
    }

    /// Checks a reopened database: each key holds its acknowledged value or the value of a
    /// failed write after it; no other key exists.
    fn check(&self, db: &Db) {
        for (k, v) in &self.acked {
            let got = db.get(k).unwrap().map(|b| b.to_vec());
            let maybe = self.unknown.get(k).is_some_and(|s| s.contains(&got));
            assert!(got == *v || maybe, "{}: {got:?}, acknowledged {v:?}", show(k));
        }
        for r in db.iter() {
            let (k, v) = r.unwrap();
            let known = self.acked.get(&k[..]) == Some(&Some(v.to_vec()))
                || self.unknown.get(&k[..]).is_some_and(|s| s.contains(&Some(v.to_vec())));
            assert!(known, "{} holds a value never written: {v:?}", show(&k));
        }
    }

    /// Writes, flushes and reads back on a reopened database: it takes writes again.
    fn write_again(&mut self, db: &Db) {
        self.put(db, b"after reopen".to_vec(), b"yes".to_vec());
        db.flush().unwrap();
        assert_eq!(db.get(b"after reopen").unwrap().as_deref(), Some(&b"yes"[..]));
    }
}

fn show(k: &[u8]) -> String {
    String::from_utf8_lossy(k).into_owned()
}

/// Asserts `e` names operation `op` on a file whose path contains `file`: an `Io` error of the
/// engine, of its WAL, or a `Poisoned` whose cause is one.
#[track_caller]
fn assert_names(e: &Error, op: &str, file: &str) {
    let ok = match e {
        Error::Io { path, op: got, .. } => *got == op && path.to_string_lossy().contains(file),
        Error::Wal(timber_wal::Error::Io { path, op: got, .. }) => {
            *got == op && path.to_string_lossy().contains(file)
        }
        Error::Poisoned { cause } => cause.contains(op) && cause.contains(file),
        _ => false,
    };
    assert!(ok, "expected an error of {op} on {file}, got {e:?}");
    assert!(e.to_string().contains("injected"), "{e}");
}

/// Asserts every write is refused with `Poisoned`, and `k` still reads `want`.
#[track_caller]
fn assert_poisoned(db: &Db, k: &[u8], want: &[u8]) {
    let mut b = WriteBatch::new();
    b.put(b"b", b"1");
    for e in [
        db.put(b"p", b"1").unwrap_err(),
        db.delete(b"p").unwrap_err(),
        db.write(b).unwrap_err(),
        db.sync().unwrap_err(),
        db.flush().unwrap_err(),
        db.compact_range::<&[u8]>(..).unwrap_err(),
    ] {
        assert!(matches!(e, Error::Poisoned { .. }), "{e:?}");
    }
    assert_eq!(db.get(k).unwrap().as_deref(), Some(want), "reads go on");
}

/// Drops the database, reopens it and checks it against the model; then it takes writes, and
/// they survive another reopen.
fn reopen_and_check(dir: &Path, m: &mut Model) {
    {
        let db = Db::open(dir, opts()).unwrap();
        m.check(&db);
        m.write_again(&db);
    }
    m.check(&Db::open(dir, opts()).unwrap());
}

/// A failed WAL write or sync under each durability: the write fails with the WAL's error
/// naming its segment, the database refuses writes from then on, reads go on, and a reopen
/// finds every acknowledged write.
#[test]
fn a_failed_wal_write_or_sync_poisons_the_database() {
    let cases = [
        // (durability, failpoint, operation)
        (Durability::Buffered, "wal::active::write", "write"),
        (Durability::Synced, "wal::active::write", "write"),
        (Durability::Synced, "wal::write::fsync", "fdatasync"),
        (Durability::Deferred, "wal::write::fsync", "fdatasync"),
    ];
    for (durability, fp, op) in cases {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        {
            let db = Db::open(dir.path(), opts().durability(durability)).unwrap();
            m.fill(&db, 0..300, 0);
            db.sync().unwrap(); // acknowledges the deferred writes
            db.flush().unwrap();
            m.fill(&db, 200..400, 1);
            db.sync().unwrap();
            fail::cfg(fp, "return").unwrap();
            let e = match durability {
                Durability::Deferred => {
                    // Deferred writes are acknowledged by the sync after them, which fails.
                    for i in 400..410 {
                        db.put(key(i), val(i, 2)).unwrap();
                        m.failed(key(i), Some(val(i, 2)));
                    }
                    db.sync().unwrap_err()
                }
                _ => {
                    m.failed(key(5), Some(val(5, 2)));
                    db.put(key(5), val(5, 2)).unwrap_err()
                }
            };
            assert_names(&e, op, "wal_");
            fail::remove(fp);
            assert_poisoned(&db, &key(250), &val(250, 1));
        }
        reopen_and_check(dir.path(), &mut m);
    }
}

/// The WAL cannot roll to a new segment under a write (the full segment's seal, the new
/// segment's creation fail): the write fails naming the segment, and from then on the database
/// refuses writes; a reopen finds every acknowledged write.
#[test]
fn a_failed_wal_roll_under_a_write_poisons_the_database() {
    for (fp, file) in [("wal::write::seal", ".log"), ("wal::segment::create", ".tmp")] {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        {
            let db = Db::open(dir.path(), opts()).unwrap();
            m.fill(&db, 0..100, 0);
            fail::cfg(fp, "return").unwrap();
            let mut i = 100;
            let e = loop {
                match db.put(key(i), val(i, 0)) {
                    Ok(()) => m.acked.insert(key(i), Some(val(i, 0))),
                    Err(e) => break e,
                };
                i += 1;
                assert!(i < 10_000, "{fp}: the WAL rolls within a segment of writes");
            };
            m.failed(key(i), Some(val(i, 0)));
            assert_names(&e, "write", file);
            fail::remove(fp);
            assert_poisoned(&db, &key(50), &val(50, 0));
        }
        reopen_and_check(dir.path(), &mut m);
    }
}

/// `close` of a database that refuses writes still closes it: the directory can be opened
/// again at once, before the handle is dropped, and holds every acknowledged write.
#[test]
fn a_poisoned_database_closes_and_reopens() {
    for fp in ["kv::table::write", "wal::active::write"] {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        let db = Arc::new(Db::open(dir.path(), opts()).unwrap());
        m.fill(&db, 0..100, 0);
        fail::cfg(fp, "return").unwrap();
        if fp.starts_with("kv") {
            let flushing = db.clone();
            assert!(within(Duration::from_secs(20), move || flushing.flush()).is_err());
        } else {
            m.failed(key(1), Some(val(1, 1)));
            assert!(db.put(key(1), val(1, 1)).is_err());
        }
        fail::remove(fp);
        db.close().unwrap();
        assert!(matches!(db.put(b"k", b"v"), Err(Error::Poisoned { .. } | Error::Closed)));
        {
            let again = Db::open(dir.path(), opts()).unwrap();
            m.check(&again);
            m.write_again(&again);
        }
        drop(db);
        m.check(&Db::open(dir.path(), opts()).unwrap());
    }
}

/// A flush fails at each of its places (table write and fsync, directory fsync, manifest edit
/// and its fsync, and the WAL truncation after the edit): `flush` returns `Poisoned` with the
/// cause naming the file and operation, writes are refused, reads (of the memtable not
/// flushed) go on, and the failed flush is not retried. A reopen replays the WAL: every
/// acknowledged write is there.
#[test]
fn a_failed_flush_poisons_the_database_and_the_wal_keeps_the_writes() {
    let places = [
        ("kv::table::write", "write", ".sst"),
        ("kv::table::fsync", "fsync", ".sst"),
        ("kv::manifest::sync_dir", "fsync", ""),
        ("kv::manifest::append", "write", "MANIFEST-"),
        ("kv::manifest::fsync", "fdatasync", "MANIFEST-"),
        // The edit is durable; dropping the flushed WAL records fails.
        ("wal::meta::write", "write", "wal.meta.tmp"),
    ];
    for (fp, op, file) in places {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        {
            let db = Db::open(dir.path(), opts()).unwrap();
            m.fill(&db, 0..300, 0);
            db.flush().unwrap();
            m.fill(&db, 100..400, 1);
            db.flush().unwrap();
            // Less than a memtable: no flush starts before the one that fails.
            m.fill(&db, 350..400, 2);
            db.delete(key(7)).unwrap();
            m.acked.insert(key(7), None);
            let flushes = db.stats().flushes;
            fail::cfg(fp, "return").unwrap();
            // Bounded: a flush retried after each failure would never return.
            let db = Arc::new(db);
            let flushing = db.clone();
            let e = within(Duration::from_secs(20), move || flushing.flush()).unwrap_err();
            let file = if file.is_empty() { dir.path().to_str().unwrap() } else { file };
            assert_names(&e, op, file);
            fail::remove(fp);
            assert_poisoned(&db, &key(350), &val(350, 2));
            assert_eq!(db.get(key(7)).unwrap(), None);
            assert_eq!(db.stats().flushes, flushes, "{fp}: the failed flush is not retried");
        }
        reopen_and_check(dir.path(), &mut m);
    }
}

/// Opening fails while it writes its new manifest or switches `CURRENT` to it (or fsyncs the
/// directory after): the error names the file, and the next open finds everything.
#[test]
fn a_failed_manifest_switch_at_open_fails_the_open() {
    let places = [
        ("kv::manifest::create", "write", "MANIFEST-"),
        ("kv::manifest::current", "rename", "CURRENT.tmp"),
        ("kv::manifest::sync_dir", "fsync", ""),
    ];
    for (fp, op, file) in places {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        {
            let db = Db::open(dir.path(), opts()).unwrap();
            m.fill(&db, 0..300, 0);
            db.flush().unwrap();
            m.fill(&db, 250..350, 1);
        }
        fail::cfg(fp, "return").unwrap();
        let e = Db::open(dir.path(), opts()).unwrap_err();
        let file = if file.is_empty() { dir.path().to_str().unwrap() } else { file };
        assert_names(&e, op, file);
        fail::remove(fp);
        reopen_and_check(dir.path(), &mut m);
    }
}

/// A failed read of a table block (point read, scan; data, or a cached index or filter read
/// again) is an error naming the table, and poisons nothing: writes go on, and the same reads
/// succeed once the disk works again.
#[test]
fn a_failed_table_read_is_an_error_and_poisons_nothing() {
    // Cached in a cache that holds nothing, a table's index and filter are read again by every
    // lookup: their reads fail too.
    for cached in [false, true] {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        {
            let o = opts().block_cache_bytes(0).cache_index_and_filter_blocks(cached);
            let db = Db::open(dir.path(), o).unwrap();
            m.fill(&db, 0..300, 0);
            db.flush().unwrap();
            fail::cfg("kv::table::read", "return").unwrap();
            assert_names(&db.get(key(10)).unwrap_err(), "read", ".sst");
            assert_names(&db.get_many(&[key(11), key(12)]).unwrap_err(), "read", ".sst");
            let mut it = db.iter();
            assert_names(&it.next().unwrap().unwrap_err(), "read", ".sst");
            let mut it = db.snapshot().iter();
            assert_names(&it.next().unwrap().unwrap_err(), "read", ".sst");
            // Writes go on.
            m.fill(&db, 300..320, 0);
            db.sync().unwrap();
            fail::remove("kv::table::read");
            m.check(&db);
            db.flush().unwrap();
        }
        reopen_and_check(dir.path(), &mut m);
    }
}

/// A compaction fails reading its input, writing or fsyncing its output, or recording its
/// result: `compact_range` returns the error (naming file and operation), the database refuses
/// writes, and a reopen finds every acknowledged write (the half-written outputs are removed);
/// the compaction then succeeds.
#[test]
fn a_failed_compaction_poisons_the_database_and_loses_nothing() {
    let places = [
        ("kv::table::read", "read", ".sst"),
        ("kv::table::write", "write", ".sst"),
        ("kv::table::fsync", "fsync", ".sst"),
        ("kv::manifest::append", "write", "MANIFEST-"),
    ];
    for (fp, op, file) in places {
        let _s = FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::default();
        {
            let db = Db::open(dir.path(), opts()).unwrap();
            for round in 0..3 {
                m.fill(&db, round * 50..round * 50 + 300, round);
                db.flush().unwrap();
            }
            let before = tables(dir.path());
            fail::cfg(fp, "return").unwrap();
            assert_names(&db.compact_range::<&[u8]>(..).unwrap_err(), op, file);
            fail::remove(fp);
            assert_poisoned(&db, &key(5), &val(5, 0));
            drop(db);
            let db = Db::open(dir.path(), opts()).unwrap();
            assert_eq!(tables(dir.path()), before, "{fp}: the failed outputs are removed");
            m.check(&db);
            db.compact_range::<&[u8]>(..).unwrap();
            assert!(db.stats().levels[0].files == 0, "{fp}: compacted after reopen");
            m.check(&db);
        }
        reopen_and_check(dir.path(), &mut m);
    }
}

/// A background compaction (started by L0's trigger) fails recording its result: the error
/// surfaces as `Poisoned` on the next write or sync, and a reopen finds every acknowledged write.
#[test]
fn a_failed_background_compaction_surfaces_on_the_next_write() {
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let o = || opts().l0_compaction_trigger(2);
    let mut m = Model::default();
    {
        let db = Db::open(dir.path(), o()).unwrap();
        m.fill(&db, 0..200, 0);
        db.flush().unwrap();
        m.fill(&db, 100..300, 1);
        // The second flush records its table (the first manifest edit from now on) and starts
        // the compaction of the two L0 tables, whose edit fails.
        fail::cfg("kv::manifest::append", "1*off->return").unwrap();
        if let Err(e) = db.flush() {
            // The compaction failed before `flush` saw its table installed.
            assert_names(&e, "write", "MANIFEST-");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let e = loop {
            match db.sync() {
                Ok(()) => assert!(Instant::now() < deadline, "the compaction's failure surfaces"),
                Err(e) => break e,
            }
            std::thread::yield_now();
        };
        assert_names(&e, "write", "MANIFEST-");
        fail::remove("kv::manifest::append");
        assert_poisoned(&db, &key(150), &val(150, 1));
    }
    let reopened = || Db::open(dir.path(), o()).unwrap();
    let mut db = reopened();
    m.check(&db);
    m.write_again(&db);
    drop(db);
    db = reopened();
    m.check(&db);
}

/// A write visible to reads but not yet recorded for commit checks (held there by a
/// failpoint) is still a conflict for `commit_with`, which checks under the writer lock: a
/// cluster's leader reads its guard from the snapshot handed over, so a check that missed
/// the write would let the guard expect the new value and lose the update.
#[test]
fn commit_with_checks_a_write_visible_but_not_yet_recorded() {
    use timber_kv::{Isolation, TxnOptions};
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path(), opts()).unwrap());
    db.put(b"k", b"0").unwrap();
    let mut t = db.transaction(TxnOptions::isolation(Isolation::Snapshot));
    assert_eq!(t.get(b"k").unwrap().as_deref(), Some(&b"0"[..]));
    t.put(b"k", b"t").unwrap();
    let writer = held_at_visible(&db, b"k", b"1");
    let (handed, over) = std::sync::mpsc::channel();
    let committer = std::thread::spawn(move || {
        t.commit_with(|_, _| {
            let _ = handed.send(());
            Ok::<(), ()>(())
        })
    });
    // The commit cannot get past the paused writer: nothing is handed over meanwhile,
    // however long this waits.
    assert!(over.recv_timeout(Duration::from_millis(300)).is_err(), "checked before the write");
    fail::cfg("kv::write::visible", "off").unwrap();
    writer.join().unwrap();
    let r = committer.join().unwrap();
    assert!(matches!(r, Err(Error::Conflict { .. })), "{r:?}");
    assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"1"[..]));
}

/// An optimistic transaction that begins while a write holds the writer lock (held up at a
/// failpoint) waits for that write only briefly, not for as long as it is held up.
#[test]
fn a_transaction_begins_while_a_write_is_held_up() {
    use timber_kv::{Isolation, TxnOptions};
    let _s = FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path(), opts()).unwrap());
    db.put(b"k", b"0").unwrap();
    let writer = held_at_visible(&db, b"k", b"1");
    for isolation in [Isolation::Snapshot, Isolation::Serializable] {
        let db = db.clone();
        let seen = within(Duration::from_secs(10), move || {
            db.transaction(TxnOptions::isolation(isolation)).get(b"k").unwrap()
        });
        assert_eq!(seen.as_deref(), Some(&b"1"[..]), "{isolation:?}");
    }
    fail::cfg("kv::write::visible", "off").unwrap();
    writer.join().unwrap();
}

/// Starts a put of `value` to `key` on a thread of its own and returns once it is visible to
/// reads, held there (writer lock and all) by the `kv::write::visible` failpoint until the
/// caller turns it off.
fn held_at_visible(
    db: &Arc<Db>,
    key: &'static [u8],
    value: &'static [u8],
) -> std::thread::JoinHandle<()> {
    fail::cfg("kv::write::visible", "pause").unwrap();
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || db.put(key, value).unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.get(key).unwrap().as_deref() != Some(value) {
        assert!(Instant::now() < deadline, "the write becomes visible");
        std::thread::yield_now();
    }
    writer
}

/// Runs `f` on a thread of its own and returns what it returns, failing the test if that takes
/// longer than `limit` (the thread is left behind).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()));
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("did not return within {limit:?}"),
    }
}

fn tables(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sst"))
        .collect()
}
