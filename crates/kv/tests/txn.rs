//! Transactions: each classic anomaly at every isolation level (prevented where the level
//! promises it, allowed where it says so), savepoints, limits, and a model-based test of
//! interleaved transactions against serial execution on a `BTreeMap`.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use timber_kv::{Db, Error, Isolation, Mode, Options, TxnOptions};

const LEVELS: [Isolation; 3] =
    [Isolation::ReadCommitted, Isolation::Snapshot, Isolation::Serializable];

fn db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Options::default().memtable_size(64 << 10)).unwrap();
    (dir, db)
}

fn num(v: Option<Bytes>) -> i64 {
    v.map_or(0, |b| std::str::from_utf8(&b).unwrap().parse().unwrap())
}

fn is_conflict<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    match r {
        Err(Error::Conflict { .. }) => true,
        Ok(_) => false,
        Err(e) => panic!("expected a conflict or success, got {e}"),
    }
}

#[test]
fn own_writes_commit_rollback_drop_and_savepoints() {
    let (_d, db) = db();
    db.put("a", "0").unwrap();
    let mut t = db.transaction(TxnOptions::default());
    t.put("a", "1").unwrap();
    t.put("b", "2").unwrap();
    t.delete("c").unwrap();
    assert_eq!(t.get("a").unwrap().unwrap(), "1");
    // Invisible to others until committed (no dirty read).
    assert_eq!(db.get("a").unwrap().unwrap(), "0");
    t.savepoint();
    t.put("a", "3").unwrap();
    t.delete("b").unwrap();
    assert_eq!(t.scan::<&str>(..).unwrap(), [(Bytes::from("a"), Bytes::from("3"))]);
    t.rollback_to_savepoint().unwrap();
    assert!(matches!(t.rollback_to_savepoint(), Err(Error::InvalidParam(_))));
    let rev: Vec<_> = t.scan_rev::<&str>(..).unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(rev, ["b", "a"]);
    t.commit().unwrap();
    assert_eq!(db.get("a").unwrap().unwrap(), "1");
    assert_eq!(db.get("b").unwrap().unwrap(), "2");

    let mut t = db.transaction(TxnOptions::default());
    t.put("a", "9").unwrap();
    t.rollback();
    let mut t = db.transaction(TxnOptions::default());
    t.put("a", "9").unwrap();
    drop(t);
    assert_eq!(db.get("a").unwrap().unwrap(), "1");
}

#[test]
fn lost_update_is_prevented_from_snapshot_up() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("x", "0").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        let (a, b) = (num(t1.get("x").unwrap()), num(t2.get("x").unwrap()));
        t1.put("x", (a + 1).to_string()).unwrap();
        t2.put("x", (b + 1).to_string()).unwrap();
        t1.commit().unwrap();
        let lost = !is_conflict(t2.commit());
        // ReadCommitted documents lost updates.
        assert_eq!(lost, level == Isolation::ReadCommitted, "{level:?}");
        assert_eq!(num(db.get("x").unwrap()), 1);
    }
}

#[test]
fn a_write_outside_any_transaction_conflicts_too() {
    let (_d, db) = db();
    let mut t = db.transaction(TxnOptions::isolation(Isolation::Snapshot));
    t.put("x", "t").unwrap();
    db.put("x", "plain").unwrap();
    assert!(is_conflict(t.commit()));
    assert_eq!(db.get("x").unwrap().unwrap(), "plain");
}

/// G0: two transactions write the same two keys, interleaved; the result is all of one of
/// them, never a mix (writes are buffered until commit, and a commit is one batch), and from
/// `Snapshot` up the later committer fails. Pessimistic, the second writer waits for the
/// first's lock instead (here: times out at once).
#[test]
fn dirty_write_never_happens() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("x", "10").unwrap();
        db.put("y", "20").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        t1.put("x", "11").unwrap();
        t2.put("x", "12").unwrap();
        t1.put("y", "21").unwrap();
        t2.put("y", "22").unwrap();
        t1.commit().unwrap();
        let t2_committed = !is_conflict(t2.commit());
        assert_eq!(t2_committed, level == Isolation::ReadCommitted, "{level:?}");
        let both = (db.get("x").unwrap().unwrap(), db.get("y").unwrap().unwrap());
        let want = if t2_committed { ("12", "22") } else { ("11", "21") };
        assert_eq!((&both.0[..], &both.1[..]), (want.0.as_bytes(), want.1.as_bytes()), "{level:?}");

        let (_d2, db) = self::db();
        let opts = TxnOptions { lock_timeout: Duration::ZERO, ..TxnOptions::pessimistic(level) };
        let mut t1 = db.transaction(opts.clone());
        let mut t2 = db.transaction(opts);
        t1.put("x", "11").unwrap();
        assert!(matches!(t2.put("x", "12"), Err(Error::LockTimeout { .. })), "{level:?}");
        t1.put("y", "21").unwrap();
        t1.commit().unwrap();
        t2.put("x", "12").unwrap();
        t2.put("y", "22").unwrap();
        t2.commit().unwrap();
        assert_eq!(db.get("x").unwrap().unwrap(), "12");
        assert_eq!(db.get("y").unwrap().unwrap(), "22");
    }
}

/// G1a: a write of a transaction that rolls back is never read, before or after.
#[test]
fn aborted_read_never_happens() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("x", "0").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        t1.put("x", "aborted").unwrap();
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        assert_eq!(t2.get("x").unwrap().unwrap(), "0", "{level:?}");
        t1.rollback();
        assert_eq!(t2.get("x").unwrap().unwrap(), "0", "{level:?}");
        t2.commit().unwrap();
        assert_eq!(db.get("x").unwrap().unwrap(), "0");
    }
}

/// A write not yet committed is never read; once committed, `ReadCommitted` reads it, the
/// snapshot levels keep reading their snapshot.
#[test]
fn dirty_read_never_happens() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("x", "0").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        t1.put("x", "uncommitted").unwrap();
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        assert_eq!(t2.get("x").unwrap().unwrap(), "0", "{level:?}");
        assert_eq!(t2.scan::<&str>(..).unwrap()[0].1, "0", "{level:?}");
        t1.commit().unwrap();
        let after = t2.get("x").unwrap().unwrap();
        let want = if level == Isolation::ReadCommitted { "uncommitted" } else { "0" };
        assert_eq!(after, want, "{level:?}");
    }
}

#[test]
fn read_skew_is_prevented_from_snapshot_up() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("x", "50").unwrap();
        db.put("y", "50").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let x = num(t1.get("x").unwrap());
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        t2.put("x", "0").unwrap();
        t2.put("y", "100").unwrap();
        t2.commit().unwrap();
        let y = num(t1.get("y").unwrap());
        // The sum is 100 in every committed state; ReadCommitted may see two of them.
        assert_eq!(x + y == 100, level != Isolation::ReadCommitted, "{level:?}");
        let committed = !is_conflict(t1.commit());
        // A serializable reader of a value written since cannot commit.
        assert_eq!(committed, level != Isolation::Serializable, "{level:?}");
    }
}

/// An optimistic transaction about to read for update a key written since its start, that
/// could commit now, moves its snapshot to now instead of failing at commit.
#[test]
fn an_optimistic_read_moves_the_snapshot_past_a_write_it_would_fail_on() {
    for level in [Isolation::Snapshot, Isolation::Serializable] {
        let (_d, db) = db();
        db.put("a", "1").unwrap();
        db.put("b", "1").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        assert_eq!(num(t1.get_for_update("a").unwrap()), 1);
        let start = t1.start_seq();
        db.put("b", "2").unwrap();
        assert_eq!(num(t1.get_for_update("b").unwrap()), 2, "{level:?}");
        assert!(t1.start_seq() > start);
        t1.put("a", "10").unwrap();
        t1.put("b", "20").unwrap();
        t1.commit().unwrap();
        assert_eq!(num(db.get("b").unwrap()), 20);
    }
}

/// It does not move when a key it read changed (it could not commit), nor under `Snapshot`
/// once it read from its snapshot without tracking the read (moving would mix two states).
#[test]
fn the_snapshot_stays_when_a_read_changed_or_was_untracked() {
    for (level, for_update) in [
        (Isolation::Snapshot, true),
        (Isolation::Serializable, false),
        (Isolation::Snapshot, false),
    ] {
        let (_d, db) = db();
        for key in ["a", "b", "c"] {
            db.put(key, "1").unwrap();
        }
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let a = if for_update { t1.get_for_update("a") } else { t1.get("a") };
        assert_eq!(num(a.unwrap()), 1);
        let start = t1.start_seq();
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        t2.put("a", "2").unwrap();
        t2.put("b", "2").unwrap();
        t2.commit().unwrap();
        assert_eq!(num(t1.get_for_update("b").unwrap()), 1, "{level:?} {for_update}");
        assert_eq!(t1.start_seq(), start);
        t1.put("b", "3").unwrap();
        assert!(is_conflict(t1.commit()), "{level:?} {for_update}");
    }
    // Under `Snapshot`, a plain read after which only an unrelated key changed still fixes the
    // snapshot: the transaction keeps reading the state it started on.
    let (_d, db) = db();
    db.put("a", "1").unwrap();
    db.put("b", "1").unwrap();
    let mut t1 = db.transaction(TxnOptions::isolation(Isolation::Snapshot));
    assert_eq!(num(t1.get("a").unwrap()), 1);
    db.put("a", "2").unwrap();
    db.put("b", "2").unwrap();
    assert_eq!(num(t1.get_for_update("b").unwrap()), 1);
    assert_eq!(num(t1.get("a").unwrap()), 1, "read skew");
}

#[test]
fn write_skew_on_items_is_prevented_only_by_serializable() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("alice", "on").unwrap();
        db.put("bob", "on").unwrap();
        // Each goes off call if the other is on: at least one must stay on.
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        assert!(t1.get("bob").unwrap().is_some_and(|v| v == "on"));
        assert!(t2.get("alice").unwrap().is_some_and(|v| v == "on"));
        t1.put("alice", "off").unwrap();
        t2.put("bob", "off").unwrap();
        t1.commit().unwrap();
        let skewed = !is_conflict(t2.commit());
        assert_eq!(skewed, level != Isolation::Serializable, "{level:?}");
    }
}

#[test]
fn write_skew_through_a_predicate_is_prevented_only_by_serializable() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("oncall/alice", "").unwrap();
        db.put("oncall/bob", "").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        assert_eq!(t1.prefix("oncall/").unwrap().len(), 2);
        assert_eq!(t2.prefix("oncall/").unwrap().len(), 2);
        t1.delete("oncall/alice").unwrap();
        t2.delete("oncall/bob").unwrap();
        t1.commit().unwrap();
        let skewed = !is_conflict(t2.commit());
        assert_eq!(skewed, level != Isolation::Serializable, "{level:?}");
    }
}

#[test]
fn a_write_into_a_scanned_range_conflicts_and_one_outside_does_not() {
    let (_d, db) = db();
    let ser = || TxnOptions::isolation(Isolation::Serializable);
    let mut t = db.transaction(ser());
    assert!(t.scan("b".."d").unwrap().is_empty());
    t.put("z", "1").unwrap();
    db.put("d", "outside").unwrap();
    db.put("a", "outside").unwrap();
    t.commit().unwrap();

    // A phantom: an insert into the range scanned.
    let mut t = db.transaction(ser());
    assert!(t.scan("b".."d").unwrap().is_empty());
    t.put("z", "2").unwrap();
    let mut other = db.transaction(ser());
    other.put("c", "phantom").unwrap();
    other.commit().unwrap();
    assert!(is_conflict(t.commit()));
    assert_eq!(db.get("z").unwrap().unwrap(), "1");

    // Inverted or empty ranges read nothing and conflict with nothing.
    let mut t = db.transaction(ser());
    assert!(t.scan("d".."b").unwrap().is_empty());
    assert!(t.scan("c".."c").unwrap().is_empty());
    db.put("c", "x").unwrap();
    t.commit().unwrap();
}

/// OTV: T3 reads x written by T1; T2, which overwrote both of T1's keys, must not then show
/// T3 its write of y, as if T1 had vanished. `ReadCommitted` allows it (its reads are each of
/// the latest state, and nothing is checked); from `Snapshot` up, T2 fails and T3 reads T1's y.
#[test]
fn observed_transaction_vanishes_only_under_read_committed() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("x", "10").unwrap();
        db.put("y", "20").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        t1.put("x", "11").unwrap();
        t1.put("y", "19").unwrap();
        t2.put("x", "12").unwrap();
        t2.put("y", "18").unwrap();
        t1.commit().unwrap();
        let mut t3 = db.transaction(TxnOptions::isolation(level));
        assert_eq!(t3.get("x").unwrap().unwrap(), "11", "{level:?}");
        let t2_committed = !is_conflict(t2.commit());
        assert_eq!(t2_committed, level == Isolation::ReadCommitted, "{level:?}");
        let y = t3.get("y").unwrap().unwrap();
        let vanished = y == "18";
        assert_eq!(vanished, level == Isolation::ReadCommitted, "{level:?}: y {y:?}");
        t3.commit().unwrap();
    }
}

/// T1 writes x and y; T2 reads x before T1 commits (the old value) and writes y: committing
/// both would put T2 before T1 (it missed x) and after it (y).
#[test]
fn a_transaction_that_missed_a_write_cannot_overwrite_its_other_keys() {
    for level in [Isolation::Snapshot, Isolation::Serializable] {
        let (_d, db) = db();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        t1.put("x", "1").unwrap();
        t1.put("y", "1").unwrap();
        assert_eq!(t2.get("x").unwrap(), None);
        t2.put("y", "2").unwrap();
        t1.commit().unwrap();
        assert!(is_conflict(t2.commit()), "{level:?}");
    }
}

/// A pessimistic transaction's locks go when it ends, by commit, rollback or drop: another
/// transaction that cannot wait at all gets them at once.
#[test]
fn locks_are_released_at_commit_rollback_and_drop() {
    let (_d, db) = db();
    let opts = TxnOptions {
        lock_timeout: Duration::ZERO,
        ..TxnOptions::pessimistic(Isolation::Serializable)
    };
    for end in ["commit", "rollback", "drop"] {
        let mut t1 = db.transaction(opts.clone());
        t1.put("w", end).unwrap();
        t1.get_for_update("u").unwrap();
        t1.get("s").unwrap();
        let mut t2 = db.transaction(opts.clone());
        assert!(matches!(t2.put("w", "t2"), Err(Error::LockTimeout { .. })), "{end}");
        assert!(matches!(t2.put("s", "t2"), Err(Error::LockTimeout { .. })), "{end}");
        match end {
            "commit" => drop(t1.commit().unwrap()),
            "rollback" => t1.rollback(),
            _ => drop(t1),
        }
        for key in ["w", "u", "s"] {
            t2.put(key, "t2").unwrap();
        }
        t2.commit().unwrap();
    }
}

#[test]
fn limits_give_clear_errors_and_write_nothing() {
    let (_d, db) = db();
    let mut t = db.transaction(TxnOptions { max_bytes: 100, ..TxnOptions::default() });
    t.put("k", vec![0u8; 90]).unwrap();
    assert!(matches!(t.put("j", vec![0u8; 20]), Err(Error::TxnTooLarge { max: 100, .. })));
    // Overwriting a key counts its new size, not both.
    t.put("k", vec![1u8; 95]).unwrap();
    t.commit().unwrap();
    let mut t =
        db.transaction(TxnOptions { max_age: std::time::Duration::ZERO, ..TxnOptions::default() });
    assert!(matches!(t.put("late", "1"), Err(Error::TxnExpired { .. })));
    assert!(matches!(t.commit(), Err(Error::TxnExpired { .. })));
    assert_eq!(db.get("late").unwrap(), None);
    let mut t = db.transaction(TxnOptions::default());
    assert!(matches!(t.put("", "empty key"), Err(Error::InvalidParam(_))));
}

#[test]
fn a_deadlock_fails_one_transaction_at_once_and_the_other_commits() {
    let (_d, db) = db();
    let db = Arc::new(db);
    let both_locked = Arc::new(Barrier::new(2));
    let opts = || TxnOptions {
        lock_timeout: Duration::from_secs(30),
        ..TxnOptions::pessimistic(Isolation::Snapshot)
    };
    let run = |first: &'static str, second: &'static str| {
        let (db, both_locked) = (db.clone(), both_locked.clone());
        std::thread::spawn(move || {
            let mut t = db.transaction(opts());
            t.put(first, "1").unwrap();
            both_locked.wait();
            let started = std::time::Instant::now();
            match t.get_for_update(second) {
                Ok(_) => {
                    t.put(second, first).unwrap();
                    t.commit().unwrap();
                    None
                }
                Err(e) => Some((e, started.elapsed())),
            }
        })
    };
    let (a, b) = (run("a", "b"), run("b", "a"));
    let outcomes = [a.join().unwrap(), b.join().unwrap()];
    let failed: Vec<_> = outcomes.iter().flatten().collect();
    assert_eq!(failed.len(), 1, "exactly one victim: {outcomes:?}");
    let (e, waited) = failed[0];
    assert!(matches!(e, Error::Deadlock { .. }), "{e}");
    // Found as the cycle formed, not by the 30 s timeout.
    assert!(*waited < Duration::from_secs(10), "{waited:?}");
    let winner = if outcomes[0].is_none() { "a" } else { "b" };
    let other = if winner == "a" { "b" } else { "a" };
    assert_eq!(db.get(other).unwrap().unwrap(), winner);
}

#[test]
fn a_lock_wait_times_out_as_configured() {
    let (_d, db) = db();
    let mut holder = db.transaction(TxnOptions::pessimistic(Isolation::Snapshot));
    holder.put("k", "held").unwrap();
    let timeout = Duration::from_millis(100);
    let mut t = db.transaction(TxnOptions {
        lock_timeout: timeout,
        ..TxnOptions::pessimistic(Isolation::Snapshot)
    });
    let started = std::time::Instant::now();
    match t.get_for_update("k") {
        Err(Error::LockTimeout { after, .. }) => assert_eq!(after, timeout),
        r => panic!("{r:?}"),
    }
    assert!(started.elapsed() >= timeout);
    holder.commit().unwrap();
    // Released at commit: the lock is free now, and the latest value is read under it.
    assert_eq!(t.get_for_update("k").unwrap().unwrap(), "held");
}

#[test]
fn pessimistic_read_modify_writes_wait_instead_of_failing() {
    let (_d, db) = db();
    let db = Arc::new(db);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    let mut t = db.transaction(TxnOptions {
                        lock_timeout: Duration::from_secs(30),
                        ..TxnOptions::pessimistic(Isolation::Snapshot)
                    });
                    let n = num(t.get_for_update("counter").unwrap());
                    t.put("counter", (n + 1).to_string()).unwrap();
                    t.commit().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(num(db.get("counter").unwrap()), 400);
}

#[test]
fn concurrent_transfers_keep_the_total_in_both_modes() {
    for mode in [Mode::Optimistic, Mode::Pessimistic] {
        let (_d, db) = db();
        let db = Arc::new(db);
        let accounts = 8u64;
        for a in 0..accounts {
            db.put(format!("acct/{a}"), "100").unwrap();
        }
        let threads: Vec<_> = (0..4u64)
            .map(|seed| {
                let db = db.clone();
                std::thread::spawn(move || {
                    let mut x = seed * 7 + 1;
                    let mut done = 0;
                    while done < 100 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let (from, to) = ((x >> 33) % accounts, (x >> 17) % accounts);
                        if from == to {
                            continue;
                        }
                        let opts = TxnOptions {
                            mode,
                            lock_timeout: Duration::from_secs(30),
                            ..TxnOptions::isolation(Isolation::Serializable)
                        };
                        let mut t = db.transaction(opts);
                        let r = (|| {
                            let a = num(t.get_for_update(format!("acct/{from}"))?);
                            let b = num(t.get_for_update(format!("acct/{to}"))?);
                            t.put(format!("acct/{from}"), (a - 3).to_string())?;
                            t.put(format!("acct/{to}"), (b + 3).to_string())
                        })();
                        match r.and_then(|()| t.commit()) {
                            Ok(_) => done += 1,
                            Err(Error::Conflict { .. } | Error::Deadlock { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: i64 = db.prefix("acct/").map(|r| num(Some(r.unwrap().1))).sum();
        assert_eq!(total, 800, "{mode:?}");
    }
}

// ---- Model: interleaved transactions against serial execution ----

#[derive(Debug, Clone)]
enum Step {
    Get(u8),
    GetForUpdate(u8),
    Put(u8, u8),
    Delete(u8),
    Scan(u8, u8),
    Plain(u8, u8),
    Commit,
    Rollback,
}

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

fn k(i: u8) -> Vec<u8> {
    vec![b'k', b'0' + i % 6]
}

/// What a transaction saw, to check against a serial execution.
enum Seen {
    Get(Vec<u8>, Option<Vec<u8>>),
    Scan(Vec<u8>, Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>),
    Put(Vec<u8>, Option<Vec<u8>>),
}

fn run_on(
    model: &Model,
    writes: &Model,
    deleted: &std::collections::BTreeSet<Vec<u8>>,
    s: &Seen,
) -> bool {
    let get = |key: &Vec<u8>| {
        if deleted.contains(key) {
            None
        } else {
            writes.get(key).or_else(|| model.get(key)).cloned()
        }
    };
    match s {
        Seen::Get(key, v) => get(key) == *v,
        Seen::Scan(lo, hi, got) if lo >= hi => got.is_empty(),
        Seen::Scan(lo, hi, got) => {
            let mut all: Model =
                model.range(lo.clone()..hi.clone()).map(|(a, b)| (a.clone(), b.clone())).collect();
            for (kk, v) in writes.range(lo.clone()..hi.clone()) {
                all.insert(kk.clone(), v.clone());
            }
            for d in deleted.range(lo.clone()..hi.clone()) {
                all.remove(d);
            }
            all.into_iter().collect::<Vec<_>>() == *got
        }
        Seen::Put(..) => true,
    }
}

/// Whether a pessimistic step gave up on a lock (the transaction is then rolled back).
fn gave_up<T>(r: Result<T, Error>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(Error::LockTimeout { .. } | Error::Deadlock { .. }) => None,
        Err(e) => panic!("{e}"),
    }
}

fn check_schedule(level: Isolation, mode: Mode, schedule: Vec<(usize, Step)>) {
    let (_d, db) = db();
    let mut model = Model::new();
    // Pessimistic steps run on one thread: a lock held by another transaction times out at
    // once, and the step's transaction rolls back.
    let opts = TxnOptions { mode, lock_timeout: Duration::ZERO, ..TxnOptions::isolation(level) };
    let mut txns: Vec<Option<(timber_kv::Transaction, Model, Vec<Seen>)>> = Vec::new();
    for _ in 0..4 {
        txns.push(Some((db.transaction(opts.clone()), model.clone(), Vec::new())));
    }
    for (who, step) in schedule {
        let slot = &mut txns[who % 4];
        if slot.is_none() {
            *slot = Some((db.transaction(opts.clone()), model.clone(), Vec::new()));
        }
        let (t, _, seen) = slot.as_mut().unwrap();
        match step {
            Step::Get(i) => {
                let Some(v) = gave_up(t.get(k(i))) else {
                    slot.take();
                    continue;
                };
                seen.push(Seen::Get(k(i), v.map(|b| b.to_vec())));
            }
            Step::GetForUpdate(i) => {
                let (t, start, seen) = slot.as_mut().unwrap();
                let before = t.start_seq();
                let Some(v) = gave_up(t.get_for_update(k(i))) else {
                    slot.take();
                    continue;
                };
                // A snapshot moved to now: every read so far must hold in the state of now.
                if t.start_seq() != before {
                    *start = model.clone();
                }
                seen.push(Seen::Get(k(i), v.map(|b| b.to_vec())));
            }
            Step::Put(i, v) => {
                if gave_up(t.put(k(i), [v])).is_none() {
                    slot.take();
                    continue;
                }
                seen.push(Seen::Put(k(i), Some(vec![v])));
            }
            Step::Delete(i) => {
                if gave_up(t.delete(k(i))).is_none() {
                    slot.take();
                    continue;
                }
                seen.push(Seen::Put(k(i), None));
            }
            Step::Scan(a, b) => {
                // Either order: an inverted range is empty, not an error.
                let (lo, hi) = (k(a), k(b));
                let got = t.scan(lo.clone()..hi.clone()).unwrap();
                let got = got.into_iter().map(|(a, b)| (a.to_vec(), b.to_vec())).collect();
                seen.push(Seen::Scan(lo, hi, got));
            }
            Step::Plain(i, v) => {
                db.put(k(i), [v]).unwrap();
                model.insert(k(i), vec![v]);
            }
            Step::Rollback => {
                let (t, _, _) = slot.take().unwrap();
                t.rollback();
            }
            Step::Commit => {
                let (t, start, seen) = slot.take().unwrap();
                let committed = match t.commit() {
                    Ok(_) => true,
                    Err(Error::Conflict { .. }) => false,
                    Err(e) => panic!("{e}"),
                };
                // Replay on the model: Snapshot reads must match the start state,
                // Serializable ones the state at the commit point (the serial order).
                let base = match level {
                    Isolation::Serializable => model.clone(),
                    _ => start.clone(),
                };
                let mut writes = Model::new();
                let mut deleted = std::collections::BTreeSet::new();
                for s in &seen {
                    if level != Isolation::ReadCommitted
                        && (committed || level == Isolation::Snapshot)
                    {
                        assert!(
                            run_on(&base, &writes, &deleted, s),
                            "{level:?}: a read differs from the {} state",
                            if level == Isolation::Serializable { "serial" } else { "snapshot" }
                        );
                    }
                    if let Seen::Put(key, v) = s {
                        match v {
                            Some(v) => {
                                deleted.remove(key);
                                writes.insert(key.clone(), v.clone());
                            }
                            None => {
                                writes.remove(key);
                                deleted.insert(key.clone());
                            }
                        }
                    }
                }
                if committed {
                    for (kk, v) in writes {
                        model.insert(kk, v);
                    }
                    for d in deleted {
                        model.remove(&d);
                    }
                }
            }
        }
    }
    drop(txns);
    let all: Model = db.iter().map(|r| r.map(|(a, b)| (a.to_vec(), b.to_vec())).unwrap()).collect();
    assert_eq!(all, model, "{level:?}: the database differs from the model");
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<u8>().prop_map(Step::Get),
        3 => any::<u8>().prop_map(Step::GetForUpdate),
        4 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Step::Put(a, b)),
        1 => any::<u8>().prop_map(Step::Delete),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Step::Scan(a, b)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Step::Plain(a, b)),
        3 => Just(Step::Commit),
        1 => Just(Step::Rollback),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn interleaved_transactions_match_their_isolation_level(
        schedule in proptest::collection::vec((0usize..4, step()), 1..60),
        level in prop_oneof![Just(Isolation::Snapshot), Just(Isolation::Serializable), Just(Isolation::ReadCommitted)],
    ) {
        check_schedule(level, Mode::Optimistic, schedule);
    }

    #[test]
    fn interleaved_pessimistic_serializable_transactions_match_serial_execution(
        schedule in proptest::collection::vec((0usize..4, step()), 1..60),
    ) {
        check_schedule(Isolation::Serializable, Mode::Pessimistic, schedule);
    }
}

/// G1b: only a transaction's final write of a key is ever read.
#[test]
fn intermediate_read_never_happens() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("x", "10").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        t1.put("x", "11").unwrap();
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        assert_eq!(t2.get("x").unwrap().unwrap(), "10", "{level:?}");
        t1.put("x", "12").unwrap();
        t1.commit().unwrap();
        let seen = t2.get("x").unwrap().unwrap();
        assert_ne!(seen, "11", "{level:?}: an intermediate write was read");
        assert_eq!(db.get("x").unwrap().unwrap(), "12");
    }
}

/// G1c: two transactions that each read what the other writes see no uncommitted write, so
/// neither depends on the other both ways; `Serializable` also refuses the second commit,
/// whose read the first's write made stale.
#[test]
fn circular_information_flow_never_happens() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("x", "10").unwrap();
        db.put("y", "20").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        t1.put("x", "11").unwrap();
        t2.put("y", "21").unwrap();
        assert_eq!(t1.get("y").unwrap().unwrap(), "20", "{level:?}");
        assert_eq!(t2.get("x").unwrap().unwrap(), "10", "{level:?}");
        t1.commit().unwrap();
        assert_eq!(!is_conflict(t2.commit()), level != Isolation::Serializable, "{level:?}");
    }
}

#[test]
fn a_predicate_read_twice_sees_the_same_keys_from_snapshot_up() {
    for level in LEVELS {
        let (_d, db) = db();
        db.put("task/1", "done").unwrap();
        let mut t1 = db.transaction(TxnOptions::isolation(level));
        let first = t1.prefix("task/").unwrap();
        let mut t2 = db.transaction(TxnOptions::isolation(level));
        t2.put("task/2", "new").unwrap();
        t2.commit().unwrap();
        let second = t1.prefix("task/").unwrap();
        // Predicate-many-preceders: ReadCommitted documents seeing the insert.
        assert_eq!(first == second, level != Isolation::ReadCommitted, "{level:?}");
        t1.put("summary", second.len().to_string()).unwrap();
        // Serializable: the insert into the scanned range since t1 began conflicts.
        assert_eq!(!is_conflict(t1.commit()), level != Isolation::Serializable, "{level:?}");
    }
}

#[test]
fn pessimistic_locks_prevent_lost_updates_and_serializable_write_skew() {
    let now = |level| TxnOptions { lock_timeout: Duration::ZERO, ..TxnOptions::pessimistic(level) };
    let locked = |r: Result<Option<Bytes>, Error>| matches!(r, Err(Error::LockTimeout { .. }));
    for level in LEVELS {
        // Lost update: the second read for update waits (here: gives up at once).
        let (_d, db) = db();
        db.put("x", "0").unwrap();
        let mut t1 = db.transaction(now(level));
        let mut t2 = db.transaction(now(level));
        let a = num(t1.get_for_update("x").unwrap());
        assert!(locked(t2.get_for_update("x")), "{level:?}");
        t1.put("x", (a + 1).to_string()).unwrap();
        t1.commit().unwrap();
        assert_eq!(
            num(t2.get_for_update("x").unwrap()),
            1,
            "{level:?}: reads the latest under its lock"
        );

        // Write skew on items: Serializable reads take shared locks the other's write needs.
        let (_d2, db) = self::db();
        db.put("alice", "on").unwrap();
        db.put("bob", "on").unwrap();
        let mut t1 = db.transaction(now(level));
        let mut t2 = db.transaction(now(level));
        t1.get("bob").unwrap();
        t2.get("alice").unwrap();
        // Serializable: each write needs the lock the other holds shared (waiting, this is a
        // deadlock: one of them fails). Weaker levels take no read locks: the skew happens.
        let blocked = |r: Result<(), Error>| matches!(r, Err(Error::LockTimeout { .. }));
        let (b1, b2) = (blocked(t1.put("alice", "off")), blocked(t2.put("bob", "off")));
        assert_eq!(
            (b1, b2),
            (level == Isolation::Serializable, level == Isolation::Serializable),
            "{level:?}"
        );
        if !b1 {
            t1.commit().unwrap();
            t2.commit().unwrap();
        }
    }
}

#[test]
fn a_pessimistic_snapshot_write_after_a_scan_is_checked_from_the_scan() {
    let (_d, db) = db();
    db.put("item/x", "0").unwrap();
    let mut t1 = db.transaction(TxnOptions::pessimistic(Isolation::Snapshot));
    assert_eq!(t1.prefix("item/").unwrap().len(), 1);
    let mut t2 = db.transaction(TxnOptions::pessimistic(Isolation::Snapshot));
    t2.put("item/x", "5").unwrap();
    t2.commit().unwrap();
    // t1 decided on the 0 it scanned: its write must not silently undo t2's.
    t1.put("item/x", "1").unwrap();
    assert!(is_conflict(t1.commit()));
    assert_eq!(db.get("item/x").unwrap().unwrap(), "5");
}

/// `commit_with` validates as `commit` does, then hands the writes to the caller (who writes
/// them itself, as a replicated log does), and ends the transaction either way.
#[test]
fn commit_with_validates_then_hands_over_the_writes() {
    let (_d, db) = db();
    db.put("a", "0").unwrap();
    let mut t = db.transaction(TxnOptions::isolation(Isolation::Serializable));
    assert_eq!(num(t.get("a").unwrap()), 0);
    t.put("b", "1").unwrap();
    t.delete("c").unwrap();
    assert_eq!(t.written_keys().collect::<Vec<_>>(), [&Bytes::from("b"), &Bytes::from("c")]);
    assert_eq!(t.read_keys().collect::<Vec<_>>(), [&Bytes::from("a")]);
    let r = t.commit_with(|batch, seen| {
        let ops: Vec<_> = batch.iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect();
        assert_eq!(ops, [(b"b".to_vec(), Some(b"1".to_vec())), (b"c".to_vec(), None)]);
        // The snapshot is the state the check passed on: later writes are not in it.
        db.put("a", "7").unwrap();
        assert_eq!(num(seen.get("a").unwrap()), 0);
        db.write(batch).map_err(|e| e.to_string())
    });
    assert_eq!(r.unwrap(), Ok(()));
    assert_eq!(num(db.get("b").unwrap()), 1);

    // A key it read, written since: a conflict, and `write` is not called.
    let mut t = db.transaction(TxnOptions::isolation(Isolation::Serializable));
    t.get("a").unwrap();
    t.put("b", "2").unwrap();
    db.put("a", "9").unwrap();
    assert!(is_conflict(t.commit_with(|_, _| -> Result<(), ()> { panic!("must not write") })));
    assert_eq!(num(db.get("b").unwrap()), 1);
}

/// A limited scan reads, and under `Serializable` records, only up to the last key it returned:
/// a write beyond it is no conflict, one within it is; its own writes merge in order.
#[test]
fn a_limited_scan_conflicts_only_with_what_it_returned() {
    let (_d, db) = db();
    for k in ["a", "b", "c", "d"] {
        db.put(k, "0").unwrap();
    }
    let scan2 = |db: &Db| {
        let mut t = db.transaction(TxnOptions::isolation(Isolation::Serializable));
        t.put("ab", "own").unwrap();
        t.delete("a").unwrap();
        let got = t.scan_limit::<&str>(.., 2).unwrap();
        let keys: Vec<_> = got.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(keys, [Bytes::from("ab"), Bytes::from("b")]);
        t.put("z", "1").unwrap();
        t
    };
    let t = scan2(&db);
    db.put("d", "1").unwrap();
    t.commit().unwrap();
    let t = scan2(&db);
    db.put("b", "1").unwrap();
    assert!(is_conflict(t.commit()));
    // Unlimited, the same scan sees every key.
    let mut t = db.transaction(TxnOptions::isolation(Isolation::Serializable));
    assert_eq!(t.scan_limit::<&str>(.., usize::MAX).unwrap().len(), 5);
    assert_eq!(t.scan::<&str>(..).unwrap().len(), 5);
}
