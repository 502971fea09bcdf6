//! Readers stay consistent while writers, flushes and compactions run: writers move units
//! between accounts in atomic batches, so every consistent view sums to the same total; readers
//! check that through iterators (both directions), snapshots and point reads, and that plain point
//! reads (one key or many) never lose a key.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use timber_kv::{Db, Options, WriteBatch};

const ACCOUNTS: u64 = 200;
const START: u64 = 1000;

fn opts() -> Options {
    Options::default()
        .memtable_size(16 << 10)
        .block_size(512)
        .l0_compaction_trigger(2)
        .l1_target_bytes(32 << 10)
        .level_multiplier(4)
        .target_file_size(16 << 10)
        .wal_segment_size(64 << 10)
        .memtable_hash_index(true)
}

fn account(i: u64) -> String {
    format!("acct/{i:05}")
}

fn parse(v: &[u8]) -> u64 {
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

#[test]
fn readers_see_consistent_states_during_writes_flushes_and_compactions() {
    readers_see_consistent_states(opts());
}

/// The same without the memtable's hash index: point reads search the skiplist while the
/// writer links new keys.
#[test]
fn readers_see_consistent_states_without_a_memtable_hash_index() {
    readers_see_consistent_states(opts().memtable_hash_index(false));
}

fn readers_see_consistent_states(opts: Options) {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path(), opts).unwrap());
    let mut b = WriteBatch::new();
    for i in 0..ACCOUNTS {
        b.put(account(i), START.to_string());
    }
    db.write(b).unwrap();
    let total = ACCOUNTS * START;
    let done = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for w in 0..2u64 {
            let (db, done) = (db.clone(), done.clone());
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                for n in 0..6000 {
                    let (a, b) = (rng.random_range(0..ACCOUNTS), rng.random_range(0..ACCOUNTS));
                    if a == b {
                        continue;
                    }
                    // Read-modify-write through a snapshot; a lost race would break the sum, so
                    // the writers own disjoint halves of the pairs they touch.
                    let (a, b) = (a - a % 2 + w, b - b % 2 + w);
                    if a == b {
                        continue;
                    }
                    let snap = db.snapshot();
                    let va = parse(&snap.get(account(a)).unwrap().unwrap());
                    let vb = parse(&snap.get(account(b)).unwrap().unwrap());
                    let amount = rng.random_range(0..=va.min(5));
                    let mut batch = WriteBatch::new();
                    batch.put(account(a), (va - amount).to_string());
                    batch.put(account(b), (vb + amount).to_string());
                    // Padding makes the memtable fill, so flushes and compactions keep running.
                    batch.put(format!("pad/{w}/{}", n % 500), vec![b'p'; 100]);
                    db.write(batch).unwrap();
                    if n % 1500 == 0 {
                        db.flush().unwrap();
                    }
                }
                done.store(true, Ordering::Release);
            });
        }
        for r in 0..2u64 {
            let (db, done, checks) = (db.clone(), done.clone(), checks.clone());
            s.spawn(move || {
                let mut round = 0u64;
                while !done.load(Ordering::Acquire) || round < 20 {
                    round += 1;
                    let rev = (round + r).is_multiple_of(2);
                    let items: Vec<_> = if rev {
                        db.prefix("acct/").rev().map(|x| x.unwrap()).collect()
                    } else {
                        db.prefix("acct/").map(|x| x.unwrap()).collect()
                    };
                    assert_eq!(items.len() as u64, ACCOUNTS, "iterator saw a partial state");
                    let sum: u64 = items.iter().map(|(_, v)| parse(v)).sum();
                    assert_eq!(sum, total, "iterator saw a torn batch");
                    // Plain point reads (no snapshot) never lose a key that always exists.
                    for i in (r..ACCOUNTS).step_by(5) {
                        assert!(db.get(account(i)).unwrap().is_some(), "point read lost {i}");
                    }
                    // So do reads of many keys (which lock several index shards at once, as
                    // the writers' batches do: this would deadlock if their orders differed).
                    let keys: Vec<String> =
                        (0..ACCOUNTS).map(|i| account((i * 37 + round) % ACCOUNTS)).collect();
                    for (k, v) in keys.iter().zip(db.get_many(&keys).unwrap()) {
                        assert!(v.is_some(), "get_many lost {k}");
                    }
                    let snap = db.snapshot();
                    let sum: u64 =
                        (0..ACCOUNTS).map(|i| parse(&snap.get(account(i)).unwrap().unwrap())).sum();
                    assert_eq!(sum, total, "snapshot point reads saw a torn batch");
                    let iter_sum: u64 = snap.prefix("acct/").map(|x| parse(&x.unwrap().1)).sum();
                    assert_eq!(iter_sum, total);
                    checks.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let s = db.stats();
    assert!(s.flushes >= 4 && s.compactions >= 1, "background work did not run: {s:?}");
    assert!(checks.load(Ordering::Relaxed) >= 40);
    let sum: u64 = db.prefix("acct/").map(|x| parse(&x.unwrap().1)).sum();
    assert_eq!(sum, total);
}

/// New keys reach a memtable's hash index at once and its skiplist only when a reader orders
/// it: an iterator created after a write returned sees that write's key, and every key before
/// it, while a writer keeps adding new ones (and flushes move them into tables).
#[test]
fn iterators_see_every_new_key_written_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path(), opts()).unwrap());
    let acked = Arc::new(AtomicU64::new(0));
    const KEYS: u64 = 4000;
    std::thread::scope(|s| {
        {
            let (db, acked) = (db.clone(), acked.clone());
            s.spawn(move || {
                for i in 0..KEYS {
                    // Keys spread over the key space, so that each lands between older ones.
                    let k = format!("new/{:08}", (i * 7919) % KEYS);
                    db.put(k, i.to_string()).unwrap();
                    acked.store(i + 1, Ordering::Release);
                }
            });
        }
        for r in 0..2u64 {
            let (db, acked) = (db.clone(), acked.clone());
            s.spawn(move || {
                let mut seen_all = false;
                let mut rounds = 0u64;
                while !seen_all {
                    rounds += 1;
                    let n = acked.load(Ordering::Acquire);
                    let items: Vec<_> = if (rounds + r).is_multiple_of(2) {
                        db.prefix("new/").rev().map(|x| x.unwrap()).collect()
                    } else {
                        db.prefix("new/").map(|x| x.unwrap()).collect()
                    };
                    let keys: std::collections::HashSet<Vec<u8>> =
                        items.iter().map(|(k, _)| k.to_vec()).collect();
                    for i in 0..n {
                        let k = format!("new/{:08}", (i * 7919) % KEYS);
                        assert!(keys.contains(k.as_bytes()), "{k} (write {i} of {n}) is missing");
                    }
                    seen_all = n == KEYS;
                }
                assert!(rounds > 1);
            });
        }
    });
    assert!(db.stats().flushes >= 1, "no flush ran");
}

#[test]
fn checkpoint_under_load_equals_a_prefix_of_the_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path().join("db"), opts()).unwrap());
    let value = |i: u64| format!("v{i}-{}", "x".repeat((i % 70) as usize));
    let stop = Arc::new(AtomicBool::new(false));
    let cps: Vec<(std::path::PathBuf, u64)> = std::thread::scope(|s| {
        let (wdb, wstop) = (db.clone(), stop.clone());
        s.spawn(move || {
            let mut i = 0u64;
            while !wstop.load(Ordering::Acquire) || i < 3000 {
                let mut b = WriteBatch::new();
                b.put(format!("k{:04}", i % 700), value(i));
                b.put("next", (i + 1).to_string());
                wdb.write(b).unwrap();
                i += 1;
            }
        });
        let mut cps = Vec::new();
        for c in 0..5 {
            std::thread::sleep(std::time::Duration::from_millis(30));
            let path = dir.path().join(format!("cp{c}"));
            let seq = db.checkpoint(&path).unwrap();
            cps.push((path, seq));
        }
        stop.store(true, Ordering::Release);
        cps
    });
    for (path, seq) in cps {
        let copy = Db::open(&path, opts()).unwrap();
        assert_eq!(copy.last_seq(), seq);
        let next = copy.get("next").unwrap().map_or(0, |v| parse(&v));
        let mut model = std::collections::BTreeMap::new();
        for i in 0..next {
            model.insert(format!("k{:04}", i % 700), value(i));
        }
        let got: Vec<(String, String)> = copy
            .prefix("k")
            .map(|x| {
                let (k, v) = x.unwrap();
                (String::from_utf8(k.to_vec()).unwrap(), String::from_utf8(v.to_vec()).unwrap())
            })
            .collect();
        assert_eq!(got, model.into_iter().collect::<Vec<_>>(), "checkpoint at {seq} (next {next})");
        // The copy is a database of its own: writable, and the original is unaffected.
        copy.put("only-in-copy", "1").unwrap();
    }
    assert_eq!(db.get("only-in-copy").unwrap(), None);
}
