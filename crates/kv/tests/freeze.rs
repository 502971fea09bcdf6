//! `Db::freeze`: a change to a range made in many write batches is seen whole or not at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use timber_kv::{Db, Isolation, Mode, Options, TxnOptions, WriteBatch};

fn small() -> Options {
    Options::default()
        .memtable_size(32 << 10)
        .block_size(512)
        .l1_target_bytes(64 << 10)
        .target_file_size(32 << 10)
        .wal_segment_size(64 << 10)
}

fn key(prefix: &str, i: u32) -> Vec<u8> {
    format!("{prefix}{i:06}").into_bytes()
}

/// Deletes every key of `[b, c)`, ten keys a batch.
fn delete_range_in_batches(db: &Db) {
    let keys: Vec<Vec<u8>> = db.scan(&b"b"[..]..&b"c"[..]).map(|r| r.unwrap().0.to_vec()).collect();
    for chunk in keys.chunks(10) {
        let mut b = WriteBatch::new();
        for k in chunk {
            b.delete(k);
        }
        db.write(b).unwrap();
    }
}

#[test]
fn reads_of_a_frozen_range_see_none_of_a_change_until_the_freeze_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small()).unwrap();
    for i in 0..500 {
        db.put(key("b", i), b"old").unwrap();
        db.put(key("d", i), b"old").unwrap();
    }
    let freeze = db.freeze(&[(&b"b"[..], &b"c"[..])]);
    delete_range_in_batches(&db);
    // Outside the range, writes are seen at once.
    db.put(key("d", 7), b"new").unwrap();
    // Flushed and compacted meanwhile: the versions the freeze reads are kept.
    db.flush().unwrap();
    db.compact_range::<&[u8]>(..).unwrap();

    assert_eq!(db.get(key("b", 3)).unwrap().as_deref(), Some(&b"old"[..]));
    assert_eq!(db.get(key("d", 7)).unwrap().as_deref(), Some(&b"new"[..]));
    let many = db.get_many(&[key("b", 0), key("b", 499)]).unwrap();
    assert!(many.iter().all(|v| v.as_deref() == Some(&b"old"[..])));
    assert_eq!(db.scan(&b"b"[..]..&b"c"[..]).count(), 500);
    assert_eq!(db.prefix(b"b").count(), 500);
    assert_eq!(db.iter().filter(|r| r.as_ref().unwrap().0.starts_with(b"b")).count(), 500);
    assert_eq!(db.snapshot().get(key("b", 42)).unwrap().as_deref(), Some(&b"old"[..]));
    let rc = TxnOptions { isolation: Isolation::ReadCommitted, ..TxnOptions::default() };
    let mut t = db.transaction(rc);
    assert_eq!(t.get(key("b", 42)).unwrap().as_deref(), Some(&b"old"[..]));
    drop(t);

    drop(freeze);
    assert_eq!(db.get(key("b", 3)).unwrap(), None);
    assert_eq!(db.scan(&b"b"[..]..&b"c"[..]).count(), 0);
    assert_eq!(db.get(key("d", 7)).unwrap().as_deref(), Some(&b"new"[..]));
    assert_eq!(db.prefix(b"d").count(), 500);
}

/// A pessimistic transaction that read a frozen key as it was fails to commit a write of it
/// over the change made under the freeze.
#[test]
fn a_transaction_over_a_frozen_key_conflicts_with_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small()).unwrap();
    db.put(key("b", 1), b"old").unwrap();
    let freeze = db.freeze(&[(&b"b"[..], &b"c"[..])]);
    let opts = TxnOptions {
        mode: Mode::Pessimistic,
        isolation: Isolation::ReadCommitted,
        ..TxnOptions::default()
    };
    let mut t = db.transaction(opts);
    db.delete(key("b", 1)).unwrap();
    assert_eq!(t.get_for_update(key("b", 1)).unwrap().as_deref(), Some(&b"old"[..]));
    t.put(key("b", 1), b"old+1").unwrap();
    drop(freeze);
    assert!(t.commit().is_err(), "a write over a change it did not see");
    assert_eq!(db.get(key("b", 1)).unwrap(), None);
}

/// A transaction begun under a freeze starts as of it: a write of a key the holder changed
/// before the transaction began (while no transaction was open) conflicts at commit, in every
/// isolation and mode, instead of bringing the key back.
#[test]
fn a_transaction_begun_under_a_freeze_conflicts_with_the_change_made_before_it() {
    for (isolation, mode) in [
        (Isolation::Snapshot, Mode::Optimistic),
        (Isolation::Serializable, Mode::Optimistic),
        (Isolation::Snapshot, Mode::Pessimistic),
        (Isolation::ReadCommitted, Mode::Pessimistic),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), small()).unwrap();
        db.put(key("b", 1), b"5").unwrap();
        let freeze = db.freeze(&[(&b"b"[..], &b"c"[..])]);
        db.delete(key("b", 1)).unwrap();
        let mut t = db.transaction(TxnOptions { isolation, mode, ..TxnOptions::default() });
        assert_eq!(t.get_for_update(key("b", 1)).unwrap().as_deref(), Some(&b"5"[..]));
        t.put(key("b", 1), b"6").unwrap();
        drop(freeze);
        assert!(t.commit().is_err(), "{isolation:?} {mode:?}: committed over the change");
        assert_eq!(db.get(key("b", 1)).unwrap(), None, "{isolation:?} {mode:?}");
    }
}

/// A freeze made while another lives holds its own ranges at its own moment, not at the
/// older freeze's; and without a freeze a read-committed pessimistic transaction checks
/// nothing (a plain write after its lock is overwritten, as before freezes existed).
#[test]
fn a_second_freeze_holds_its_own_moment_and_read_committed_stays_unchecked() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small()).unwrap();
    let first = db.freeze(&[(&b"b"[..], &b"c"[..])]);
    db.put(key("d", 1), b"after the first").unwrap();
    let second = db.freeze(&[(&b"d"[..], &b"e"[..])]);
    assert!(second.seq() > first.seq());
    assert_eq!(db.get(key("d", 1)).unwrap().as_deref(), Some(&b"after the first"[..]));
    assert_eq!(db.scan(&b"d"[..]..&b"e"[..]).count(), 1);
    drop((first, second));

    let opts = TxnOptions {
        mode: Mode::Pessimistic,
        isolation: Isolation::ReadCommitted,
        ..TxnOptions::default()
    };
    let mut t = db.transaction(opts);
    assert_eq!(t.get_for_update(key("d", 1)).unwrap().as_deref(), Some(&b"after the first"[..]));
    t.put(key("d", 1), b"mine").unwrap();
    db.put(key("d", 1), b"plain").unwrap();
    t.commit().unwrap();
    assert_eq!(db.get(key("d", 1)).unwrap().as_deref(), Some(&b"mine"[..]));
}

/// Readers racing a change made under a freeze, batch after batch, see every key of the range
/// or none of them.
#[test]
fn readers_see_a_change_under_a_freeze_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    // Memtables of 4 KiB: several switches within each change, so that a reader's view can
    // lack a change's last batches.
    let db = Arc::new(Db::open(dir.path(), small().memtable_size(4 << 10)).unwrap());
    const N: u32 = 300;
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (db, done) = (db.clone(), done.clone());
            std::thread::spawn(move || {
                let mut partial = 0u32;
                while !done.load(Ordering::Acquire) {
                    let n = if r == 0 {
                        db.scan(&b"b"[..]..&b"c"[..]).count() as u32
                    } else {
                        let got = db.get_many(&[key("b", 0), key("b", N / 2), key("b", N - 1)]);
                        got.unwrap().iter().filter(|v| v.is_some()).count() as u32 * N / 3
                    };
                    if n != 0 && n != N {
                        partial += 1;
                    }
                }
                partial
            })
        })
        .collect();
    for _round in 0..40 {
        let mut b = WriteBatch::new();
        for i in 0..N {
            b.put(key("b", i), b"v");
        }
        db.write(b).unwrap();
        let freeze = db.freeze(&[(&b"b"[..], &b"c"[..])]);
        delete_range_in_batches(&db);
        drop(freeze);
    }
    done.store(true, Ordering::Release);
    for r in readers {
        assert_eq!(r.join().unwrap(), 0, "a reader saw the range half changed");
    }
}
