//! Functional tests of the public API.

use std::sync::Arc;

use bytes::Bytes;
use timber_kv::{Compression, Db, Durability, Error, Options, WriteBatch, MAX_KEY_LEN};

fn small() -> Options {
    Options::default()
        .memtable_size(16 << 10)
        .block_size(512)
        .l1_target_bytes(64 << 10)
        .target_file_size(32 << 10)
        .wal_segment_size(64 << 10)
}

fn key(i: u32) -> Vec<u8> {
    format!("key{i:08}").into_bytes()
}

fn val(i: u32, round: u32) -> Vec<u8> {
    format!("value-{i}-{round}-{}", "x".repeat((i % 50) as usize)).into_bytes()
}

fn all(db: &Db) -> Vec<(Bytes, Bytes)> {
    db.iter().map(|r| r.unwrap()).collect()
}

#[test]
fn put_get_delete_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path(), small()).unwrap();
        db.put(b"a", b"1").unwrap();
        db.put(b"b", b"2").unwrap();
        db.delete(b"a").unwrap();
        assert_eq!(db.get(b"a").unwrap(), None);
        assert_eq!(db.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(db.get(b"c").unwrap(), None);
    }
    let db = Db::open(dir.path(), small()).unwrap();
    assert_eq!(db.get(b"a").unwrap(), None);
    assert_eq!(db.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(db.last_seq(), 3);
}

#[test]
fn many_keys_through_flushes_and_compactions() {
    let dir = tempfile::tempdir().unwrap();
    let n = 20_000;
    {
        let db = Db::open(dir.path(), small().compression(Compression::Lz4)).unwrap();
        for round in 0..2 {
            for i in 0..n {
                db.put(key(i), val(i, round)).unwrap();
            }
        }
        for i in (0..n).step_by(3) {
            db.delete(key(i)).unwrap();
        }
        db.flush().unwrap();
        let s = db.stats();
        assert!(s.flushes > 0, "{s:?}");
        assert!(s.levels.iter().skip(1).any(|l| l.files > 0), "compaction moved data down: {s:?}");
        for i in 0..n {
            let want = (i % 3 != 0).then(|| val(i, 1));
            assert_eq!(db.get(key(i)).unwrap().map(|b| b.to_vec()), want, "key {i}");
        }
    }
    let db = Db::open(dir.path(), small()).unwrap();
    let got = all(&db);
    let want: Vec<_> = (0..n).filter(|i| i % 3 != 0).collect();
    assert_eq!(got.len(), want.len());
    for ((k, v), i) in got.iter().zip(&want) {
        assert_eq!(&k[..], &key(*i)[..]);
        assert_eq!(&v[..], &val(*i, 1)[..]);
    }
    let rev: Vec<_> = db.iter().rev().map(|r| r.unwrap().0).collect();
    assert_eq!(rev.len(), want.len());
    assert_eq!(&rev[0][..], &key(*want.last().unwrap())[..]);
}

#[test]
fn scans_bounds_prefix_and_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small()).unwrap();
    for k in ["a", "ab", "abc", "b", "ba", "c"] {
        db.put(k, k.to_uppercase()).unwrap();
    }
    fn keys(it: impl Iterator<Item = timber_kv::Result<(Bytes, Bytes)>>) -> Vec<String> {
        it.map(|r| String::from_utf8(r.unwrap().0.to_vec()).unwrap()).collect()
    }
    assert_eq!(keys(db.scan("ab".."b")), ["ab", "abc"]);
    assert_eq!(keys(db.scan("ab"..="b")), ["ab", "abc", "b"]);
    assert_eq!(keys(db.scan("ab"..="b").rev()), ["b", "abc", "ab"]);
    assert_eq!(keys(db.scan(.."b")), ["a", "ab", "abc"]);
    assert_eq!(keys(db.scan("b"..)), ["b", "ba", "c"]);
    assert_eq!(keys(db.prefix("ab")), ["ab", "abc"]);
    assert_eq!(keys(db.prefix("ab").rev()), ["abc", "ab"]);
    assert_eq!(keys(db.prefix("z")), Vec::<String>::new());
    let mut it = db.iter();
    assert_eq!(&it.next().unwrap().unwrap().0[..], b"a");
    assert_eq!(&it.next_back().unwrap().unwrap().0[..], b"c");
    assert_eq!(&it.next_back().unwrap().unwrap().0[..], b"ba");
    assert_eq!(&it.next().unwrap().unwrap().0[..], b"ab");
    assert_eq!(&it.next().unwrap().unwrap().0[..], b"abc");
    assert_eq!(&it.next().unwrap().unwrap().0[..], b"b");
    assert!(it.next().is_none());
    assert!(it.next_back().is_none());
}

#[test]
fn snapshots_see_a_point_in_time_across_flush_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small()).unwrap();
    for i in 0..2000 {
        db.put(key(i), val(i, 0)).unwrap();
    }
    let snap = db.snapshot();
    for i in 0..2000 {
        if i % 2 == 0 {
            db.delete(key(i)).unwrap();
        } else {
            db.put(key(i), val(i, 1)).unwrap();
        }
    }
    db.flush().unwrap();
    db.compact_range::<&[u8]>(..).unwrap();
    for i in (0..2000).step_by(7) {
        assert_eq!(snap.get(key(i)).unwrap().unwrap(), val(i, 0));
        let now = db.get(key(i)).unwrap().map(|b| b.to_vec());
        assert_eq!(now, (i % 2 == 1).then(|| val(i, 1)));
    }
    assert_eq!(snap.iter().count(), 2000);
    assert_eq!(db.iter().count(), 1000);
    drop(snap);
    db.compact_range::<&[u8]>(..).unwrap();
    assert_eq!(db.iter().count(), 1000);
}

#[test]
fn limits_are_invalid_param_and_leave_data_intact() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small()).unwrap();
    db.put(b"k", b"v").unwrap();
    assert!(matches!(db.put(b"", b"v"), Err(Error::InvalidParam(_))));
    assert!(matches!(db.get(b""), Err(Error::InvalidParam(_))));
    assert!(matches!(db.put(vec![1u8; MAX_KEY_LEN + 1], b"v"), Err(Error::InvalidParam(_))));
    db.put(vec![1u8; MAX_KEY_LEN], b"max").unwrap();
    let mut b = WriteBatch::new();
    b.put(b"x", b"1").put(b"", b"2");
    assert!(matches!(db.write(b), Err(Error::InvalidParam(_))));
    assert_eq!(db.get(b"x").unwrap(), None, "an invalid batch writes nothing");
    assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    assert!(matches!(Db::open(dir.path(), small().memtable_size(1)), Err(Error::InvalidParam(_))));
}

#[test]
fn large_values_larger_than_a_wal_segment() {
    let dir = tempfile::tempdir().unwrap();
    let big = vec![9u8; 300 << 10];
    {
        let db = Db::open(dir.path(), small()).unwrap();
        db.put(b"big", &big).unwrap();
        db.put(b"after", b"1").unwrap();
    }
    let db = Db::open(dir.path(), small()).unwrap();
    assert_eq!(db.get(b"big").unwrap().unwrap().len(), big.len());
    db.flush().unwrap();
    assert_eq!(db.get(b"big").unwrap().unwrap(), big);
}

#[test]
fn second_open_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small()).unwrap();
    match Db::open(dir.path(), small()) {
        Err(Error::Locked { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(db);
    Db::open(dir.path(), small()).unwrap();
}

#[test]
fn synced_writes_from_many_threads() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path(), small().durability(Durability::Synced)).unwrap());
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let db = db.clone();
            s.spawn(move || {
                for i in 0..200 {
                    db.put(key(t * 1000 + i), val(i, t)).unwrap();
                }
            });
        }
    });
    assert_eq!(db.iter().count(), 1600);
    drop(db);
    let db = Db::open(dir.path(), small()).unwrap();
    assert_eq!(db.iter().count(), 1600);
}

#[test]
fn checkpoint_opens_as_the_snapshot_it_was_taken_at() {
    let dir = tempfile::tempdir().unwrap();
    let cp = dir.path().join("cp");
    let db = Db::open(dir.path().join("db"), small()).unwrap();
    for i in 0..5000 {
        db.put(key(i), val(i, 0)).unwrap();
    }
    let snap = db.snapshot();
    db.checkpoint(&cp).unwrap();
    for i in 0..5000 {
        db.put(key(i), val(i, 1)).unwrap();
    }
    assert!(matches!(db.checkpoint(&cp), Err(Error::InvalidParam(_))));
    let want: Vec<_> = snap.iter().map(|r| r.unwrap()).collect();
    let copy = Db::open(&cp, small()).unwrap();
    assert_eq!(all(&copy), want);
}

#[test]
fn stats_report_levels_amplification_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), small()).unwrap();
    for i in 0..5000 {
        db.put(key(i), val(i, 0)).unwrap();
    }
    db.flush().unwrap();
    for i in 0..5000 {
        db.get(key(i)).unwrap();
    }
    let s = db.stats();
    assert!(s.table_bytes() > 0);
    // Every table pins its index and a filter of about 10 bits per key.
    assert!(s.table_pinned_bytes >= 5000 * 10 / 8, "{s:?}");
    assert!(s.write_amplification >= 1.0 && s.write_amplification < 20.0, "{s:?}");
    assert!(s.cache_hits + s.cache_misses > 0);
    assert!(s.cache_hit_rate > 0.5, "{s:?}");
    assert_eq!(s.last_seq, 5000);
}

#[test]
fn an_idle_database_merges_l0_into_l1() {
    let dir = tempfile::tempdir().unwrap();
    let opts = small().idle_compaction_after(Some(std::time::Duration::from_millis(50)));
    let db = Db::open(dir.path(), opts).unwrap();
    for round in 0..2 {
        for i in 0..300 {
            db.put(key(i), val(i, round)).unwrap();
        }
        db.flush().unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db.stats().levels[0].files > 0 {
        assert!(std::time::Instant::now() < deadline, "L0 still holds tables: {:?}", db.stats());
        std::thread::yield_now();
    }
    let s = db.stats();
    assert!(s.levels[1].files > 0, "{s:?}");
    for i in 0..300 {
        assert_eq!(db.get(key(i)).unwrap().unwrap(), val(i, 1));
    }
    assert_eq!(db.iter().count(), 300);
}

/// Whether some WAL segment file of the database in `dir` holds `needle` (read as another
/// process would: through the OS, whatever this process still buffers).
fn wal_holds(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir.join("wal")).unwrap().map(|e| e.unwrap().path()).any(|p| {
        p.extension().is_some_and(|x| x == "log")
            && std::fs::read(&p).unwrap().windows(needle.len()).any(|w| w == needle)
    })
}

#[test]
fn buffered_writes_reach_the_os_and_deferred_ones_wait_for_sync() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path(), small()).unwrap();
        let mut b = WriteBatch::new();
        b.put(b"buffered", b"buffered-value-marker");
        db.write_with(b, Durability::Buffered).unwrap();
        assert!(wal_holds(dir.path(), b"buffered-value-marker"), "a buffered write is in the OS");

        for i in 0..20u32 {
            let mut b = WriteBatch::new();
            b.put(key(i), format!("deferred-value-marker-{i:02}"));
            db.write_with(b, Durability::Deferred).unwrap();
        }
        let got = db.get(key(7)).unwrap();
        assert_eq!(got.as_deref(), Some(&b"deferred-value-marker-07"[..]), "visible at once");
        assert!(!wal_holds(dir.path(), b"deferred-value-marker"), "deferred: not in the OS yet");
        db.sync().unwrap();
        assert!(wal_holds(dir.path(), b"deferred-value-marker-19"), "sync wrote deferred writes");
    }
    let db = Db::open(dir.path(), small()).unwrap();
    for i in 0..20u32 {
        let want = format!("deferred-value-marker-{i:02}");
        assert_eq!(db.get(key(i)).unwrap().as_deref(), Some(want.as_bytes()));
    }
    assert_eq!(db.get(b"buffered").unwrap().as_deref(), Some(&b"buffered-value-marker"[..]));
}

/// An open iterator and a snapshot, each alone, still see their point in time after many
/// overwrites of the keys they read; plain reads always see the newest value.
#[test]
fn open_readers_keep_the_versions_they_read_through_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Options::default().memtable_hash_index(true)).unwrap();
    let overwrite = |round: u32| {
        for i in 0..10 {
            db.put(key(i), val(i, round)).unwrap();
            assert_eq!(db.get(key(i)).unwrap().unwrap(), val(i, round));
        }
    };
    overwrite(0);
    // An iterator alone.
    let mut it = db.iter();
    let first = it.next().unwrap().unwrap();
    (1..30).for_each(overwrite);
    assert_eq!(first, (Bytes::from(key(0)), Bytes::from(val(0, 0))));
    let rest: Vec<_> = it.map(|r| r.unwrap()).collect();
    let want: Vec<_> = (1..10).map(|i| (Bytes::from(key(i)), Bytes::from(val(i, 0)))).collect();
    assert_eq!(rest, want);
    // A snapshot alone.
    let snap = db.snapshot();
    (30..50).for_each(overwrite);
    for i in 0..10 {
        assert_eq!(snap.get(key(i)).unwrap().unwrap(), val(i, 29));
    }
    drop(snap);
    (50..200).for_each(overwrite);
    let want: Vec<_> = (0..10).map(|i| (Bytes::from(key(i)), Bytes::from(val(i, 199)))).collect();
    assert_eq!(all(&db), want);
}
