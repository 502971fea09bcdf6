//! The memory budget: memtables, the tables' index and filter blocks and the block cache held
//! under one limit while data far larger than it is written and read.

use timber_kv::{Db, Error, Options};

const BUDGET: usize = 8 << 20;

fn key(i: u64) -> [u8; 16] {
    // Spread over the key space: every table overlaps the others.
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) as u128).to_be_bytes()
}

#[test]
fn memtables_tables_and_cache_stay_within_the_budget() {
    within_the_budget(false);
}

#[test]
fn memtables_and_a_cache_holding_indexes_and_filters_stay_within_the_budget() {
    within_the_budget(true);
}

/// Writes five budgets of data and reads some back; `cached` keeps index and filter blocks in
/// the cache (the default under a budget), otherwise they are pinned.
fn within_the_budget(cached: bool) {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default()
        .memory_budget(Some(BUDGET))
        .block_cache_bytes(1 << 30)
        .cache_index_and_filter_blocks(cached);
    let db = Db::open(dir.path(), opts).unwrap();
    let value = [7u8; 100];
    // About 40 MiB of memtable bytes: five times the budget.
    let n = 100_000u64;
    let mut max_memtables = 0;
    for i in 0..n {
        db.put(key(i), value).unwrap();
        if i % 97 == 0 {
            // Reads fill the cache from the tables.
            let _ = db.get(key(i / 2)).unwrap();
        }
        if i % 1000 == 0 {
            let s = db.stats();
            let memtables = s.memtable_bytes + s.immutable_memtable_bytes;
            max_memtables = max_memtables.max(memtables);
            // A memtable switches after the write that fills it: one write of slack each.
            assert!(memtables <= (BUDGET as u64) / 2 + 3 * 1024, "memtables at {memtables}");
            assert!(s.cache_limit < BUDGET as u64, "cache limit {}", s.cache_limit);
            // A limit lowered by an install may race with an insert: one block of slack.
            assert!(
                s.cache_bytes <= s.cache_limit + 8192,
                "cache {} > {}",
                s.cache_bytes,
                s.cache_limit
            );
        }
    }
    assert!(max_memtables > (BUDGET as u64) / 8, "memtables never grew: {max_memtables}");
    db.flush().unwrap();
    db.compact_range::<&[u8]>(..).unwrap();
    for i in (0..n).step_by(7) {
        assert_eq!(&db.get(key(i)).unwrap().unwrap()[..], &value[..]);
    }
    let s = db.stats();
    assert_eq!(s.memory_budget, Some(BUDGET as u64));
    if cached {
        assert_eq!(s.table_pinned_bytes, 0);
        assert!(s.cache_index_filter_bytes > 0, "{s:?}");
    } else {
        assert!(s.table_pinned_bytes > 0);
        assert_eq!(s.cache_index_filter_bytes, 0);
    }
    // Quiet: the cache has what the memtables (the active one at its full size, and the
    // memory kept from flushed ones for the next) and the tables leave, and holds no more.
    let memtable_size = (BUDGET / 2 / 3) as u64;
    let want = (BUDGET as u64)
        .saturating_sub(memtable_size + s.immutable_memtable_bytes + s.table_pinned_bytes);
    // A background thread dropping the last flushed memtable adds its memory to the spares
    // just before it lowers the limit: the limit may not count them yet.
    let spares = want.saturating_sub(s.spare_memtable_bytes);
    // (Rounded down to a multiple of the cache's 16 shards.)
    assert!(
        [spares, want].iter().any(|&w| s.cache_limit <= w && w - s.cache_limit < 16),
        "{} for {spares} with {} of spares",
        s.cache_limit,
        s.spare_memtable_bytes
    );
    assert!(s.cache_bytes <= s.cache_limit);
    assert!(s.cache_bytes > 0, "the reads used the cache");
}

/// Tables whose indexes and filters alone pass the budget (256-byte blocks, 32 filter bits a
/// key; tables of 128 KiB, whose index fits a cache shard's share): cached, everything the
/// engine holds stays within it while they are written and read back; pinned, they are kept
/// whatever the budget.
#[test]
fn indexes_and_filters_larger_than_the_budget_are_held_under_it_when_cached() {
    const BUDGET: usize = 1 << 20;
    let n = 200_000u64;
    let run = |cached: bool| {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options::default()
            .memory_budget(Some(BUDGET))
            .block_size(256)
            .bloom_bits_per_key(32)
            .target_file_size(128 << 10)
            .cache_index_and_filter_blocks(cached);
        let db = Db::open(dir.path(), opts).unwrap();
        let held = |db: &Db| db.stats().memory_bytes();
        let mut most = 0;
        for i in 0..n {
            db.put(key(i), i.to_le_bytes()).unwrap();
            if i % 500 == 0 {
                most = most.max(held(&db));
            }
        }
        db.flush().unwrap();
        for i in (0..n).step_by(13) {
            assert_eq!(db.get(key(i)).unwrap().as_deref(), Some(&i.to_le_bytes()[..]));
            assert!(db.get(key(n + i)).unwrap().is_none());
        }
        assert_eq!(db.iter().count() as u64, n);
        let s = db.stats();
        assert!(s.levels.iter().map(|l| l.files).sum::<usize>() > 1, "{s:?}");
        most.max(held(&db))
    };
    let pinned = run(false);
    assert!(pinned > BUDGET as u64, "pinned indexes and filters held {pinned}, under the budget");
    // Slack: the write that fills a memtable, and an index or filter above a shard's limit
    // kept as that shard's only entry.
    let cached = run(true);
    assert!(cached <= BUDGET as u64 + (64 << 10), "held {cached} under a budget of {BUDGET}");
}

/// An iterator made while data five budgets large is written keeps the memtables of its view
/// after they are flushed: the budget charges them, and the block cache gives way; once the
/// iterator is dropped, the cache gets its room back.
#[test]
fn memtables_held_by_an_iterator_are_charged_against_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Options::default().memory_budget(Some(BUDGET))).unwrap();
    let memtable_size = (BUDGET / 2 / 3) as u64;
    let value = [7u8; 100];
    let n = 100_000u64;
    let mut iter = None;
    let mut most_held_for_readers = 0;
    for i in 0..n {
        db.put(key(i), value).unwrap();
        if i % 10 == 0 {
            // Reads fill the cache from the tables.
            let _ = db.get(key(i / 2)).unwrap();
        }
        // One iterator over a well-filled memtable, made once the first tables exist.
        if iter.is_none() && i >= 10_000 && db.stats().memtable_bytes > memtable_size * 3 / 4 {
            iter = Some((i + 1, db.iter()));
        }
        if i % 1000 == 0 {
            let s = db.stats();
            most_held_for_readers = most_held_for_readers.max(s.reader_memtable_bytes);
            // Slack: the write that fills a memtable, a block inserted as the limit drops.
            let held = s.memory_bytes();
            assert!(held <= BUDGET as u64 + (64 << 10), "held {held}: {s:?}");
        }
    }
    assert!(most_held_for_readers > memtable_size / 2, "{most_held_for_readers}");
    let (at, iter) = iter.unwrap();
    assert_eq!(iter.count() as u64, at, "the iterator sees what was written before it");
    // The view goes at the flush thread's next round (at least every 200 ms).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = db.stats();
        if s.reader_memtable_bytes == 0 && s.cache_limit >= (BUDGET / 3) as u64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still charged: {s:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_budget_below_one_mebibyte_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = Db::open(dir.path(), Options::default().memory_budget(Some(1000))).unwrap_err();
    assert!(matches!(e, Error::InvalidParam(_)), "{e}");
}

#[test]
fn compactions_leave_the_block_cache_to_readers() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default().memtable_size(256 << 10).l0_compaction_trigger(2);
    let db = Db::open(dir.path(), opts).unwrap();
    for i in 0..40_000u64 {
        db.put(key(i), [1u8; 100]).unwrap();
    }
    db.flush().unwrap();
    db.compact_range::<&[u8]>(..).unwrap();
    let s = db.stats();
    assert!(s.compactions > 0 && s.compaction_bytes_read > 0, "{s:?}");
    assert_eq!(s.cache_bytes, 0, "compaction reads went into the cache");
    assert!(db.get(key(7)).unwrap().is_some());
    assert!(db.stats().cache_bytes > 0, "a read fills the cache");
}
