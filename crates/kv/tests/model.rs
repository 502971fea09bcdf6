//! Model-based test: random operations against the engine and a `BTreeMap`, including snapshots
//! (each with a frozen copy of the model), flushes, compactions and reopens, checked after every
//! step that reads.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use proptest::prelude::*;
use timber_kv::{Compression, Db, Durability, Options, WriteBatch};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u16),
    Delete(u8),
    Batch(Vec<(u8, Option<u16>)>),
    Get(u8),
    /// Several keys, perhaps repeated, in one `get_many`.
    GetMany(Vec<u8>),
    /// Bounds, inclusive end, reverse, and whether entries are lent (`next_ref`).
    Scan(Option<u8>, Option<u8>, bool, bool, bool),
    Prefix(u8, bool),
    /// Both ends of one iterator: `% 4` is 0 `next`, 1 `next_back`, 2 `next_ref`,
    /// 3 `next_back_ref`.
    Zigzag(Vec<u8>),
    Snapshot,
    SnapGet(usize, u8),
    SnapScan(usize, bool),
    DropSnapshot(usize),
    Flush,
    Compact(Option<u8>, Option<u8>),
    Reopen,
}

/// Keys of varied length that share prefixes: "k1", "k12", "k123"...
fn key(k: u8) -> Vec<u8> {
    let mut v = format!("k{}", k % 40).into_bytes();
    if k >= 40 {
        v.extend_from_slice(&[b'/', k]);
    }
    v
}

fn value(k: u8, n: u16) -> Vec<u8> {
    let len = if n.is_multiple_of(17) { 700 + n as usize % 900 } else { n as usize % 40 };
    let mut v = format!("{k}:{n}:").into_bytes();
    v.resize(v.len() + len, b'a' + (n % 26) as u8);
    v
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0u8..80;
    prop_oneof![
        30 => (k.clone(), any::<u16>()).prop_map(|(k, n)| Op::Put(k, n)),
        8 => k.clone().prop_map(Op::Delete),
        6 => proptest::collection::vec((k.clone(), proptest::option::of(any::<u16>())), 1..8).prop_map(Op::Batch),
        10 => k.clone().prop_map(Op::Get),
        4 => proptest::collection::vec(k.clone(), 0..20).prop_map(Op::GetMany),
        5 => (proptest::option::of(k.clone()), proptest::option::of(k.clone()), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(a, b, inc, rev, lend)| Op::Scan(a, b, inc, rev, lend)),
        2 => (0u8..45, any::<bool>()).prop_map(|(p, rev)| Op::Prefix(p, rev)),
        2 => proptest::collection::vec(any::<u8>(), 1..40).prop_map(Op::Zigzag),
        2 => Just(Op::Snapshot),
        3 => (any::<usize>(), k.clone()).prop_map(|(i, k)| Op::SnapGet(i, k)),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(i, r)| Op::SnapScan(i, r)),
        1 => any::<usize>().prop_map(Op::DropSnapshot),
        2 => Just(Op::Flush),
        1 => (proptest::option::of(k.clone()), proptest::option::of(k)).prop_map(|(a, b)| Op::Compact(a, b)),
        1 => Just(Op::Reopen),
    ]
}

/// How a run keeps the tables' index and filter blocks.
#[derive(Debug, Clone, Copy)]
enum Meta {
    Pinned,
    /// In a block cache of 4 KiB: evicted all the time, loaded again by later reads.
    Cached,
}

fn options(lz4: bool, synced: bool, hash_index: bool, meta: Meta) -> Options {
    // With LZ4 runs, L0 is also merged whenever the compaction thread finds nothing else to do
    // (an idle threshold of zero), so that idle compactions race the operations.
    let idle = lz4.then_some(std::time::Duration::ZERO);
    Options::default()
        .idle_compaction_after(idle)
        .memtable_size(4096)
        .block_size(256)
        .l0_compaction_trigger(2)
        .l1_target_bytes(8 << 10)
        .level_multiplier(3)
        .target_file_size(4096)
        .wal_segment_size(16 << 10)
        .compression(if lz4 { Compression::Lz4 } else { Compression::None })
        .durability(if synced { Durability::Synced } else { Durability::Buffered })
        .memtable_hash_index(hash_index)
        .cache_index_and_filter_blocks(matches!(meta, Meta::Cached))
        .block_cache_bytes(match meta {
            Meta::Pinned => 64 << 20,
            Meta::Cached => 4096,
        })
}

fn range_of(
    m: &Model,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
    rev: bool,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    if let (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) =
        (&lo, &hi)
    {
        if a > b
            || (a == b && !(matches!(lo, Bound::Included(_)) && matches!(hi, Bound::Included(_))))
        {
            return vec![];
        }
    }
    let it = m.range((lo, hi)).map(|(k, v)| (k.clone(), v.clone()));
    if rev {
        it.rev().collect()
    } else {
        it.collect()
    }
}

fn collect(it: impl Iterator<Item = timber_kv::Result<(Bytes, Bytes)>>) -> Vec<(Vec<u8>, Vec<u8>)> {
    it.map(|r| {
        let (k, v) = r.unwrap();
        (k.to_vec(), v.to_vec())
    })
    .collect()
}

/// Every entry through `next_ref` (or `next_back_ref`), copied out.
fn collect_lent(mut it: timber_kv::Iter, rev: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let item = if rev { it.next_back_ref() } else { it.next_ref() };
        let Some(r) = item else { return out };
        let (k, v) = r.unwrap();
        out.push((k.to_vec(), v.to_vec()));
    }
}

fn bounds(a: Option<u8>, b: Option<u8>, inclusive: bool) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let lo = a.map_or(Bound::Unbounded, |a| Bound::Included(key(a)));
    let hi = b.map_or(Bound::Unbounded, |b| {
        if inclusive {
            Bound::Included(key(b))
        } else {
            Bound::Excluded(key(b))
        }
    });
    (lo, hi)
}

fn run(ops: Vec<Op>, lz4: bool, synced: bool, hash_index: bool, meta: Meta) {
    let dir = tempfile::tempdir().unwrap();
    let opts = || options(lz4, synced, hash_index, meta);
    let mut db = Some(Db::open(dir.path(), opts()).unwrap());
    let mut model = Model::new();
    let mut snaps: Vec<(timber_kv::Snapshot, Model)> = Vec::new();
    for op in ops {
        let d = db.as_ref().unwrap();
        match op {
            Op::Put(k, n) => {
                d.put(key(k), value(k, n)).unwrap();
                model.insert(key(k), value(k, n));
            }
            Op::Delete(k) => {
                d.delete(key(k)).unwrap();
                model.remove(&key(k));
            }
            Op::Batch(ops) => {
                let mut b = WriteBatch::new();
                for (k, v) in ops {
                    match v {
                        Some(n) => {
                            b.put(key(k), value(k, n));
                            model.insert(key(k), value(k, n));
                        }
                        None => {
                            b.delete(key(k));
                            model.remove(&key(k));
                        }
                    }
                }
                d.write(b).unwrap();
            }
            Op::Get(k) => {
                assert_eq!(d.get(key(k)).unwrap().map(|b| b.to_vec()), model.get(&key(k)).cloned());
            }
            Op::GetMany(ks) => {
                let keys: Vec<Vec<u8>> = ks.iter().map(|&k| key(k)).collect();
                let got: Vec<_> =
                    d.get_many(&keys).unwrap().into_iter().map(|v| v.map(|b| b.to_vec())).collect();
                let want: Vec<_> = keys.iter().map(|k| model.get(k).cloned()).collect();
                assert_eq!(got, want);
            }
            Op::Scan(a, b, inc, rev, lend) => {
                let (lo, hi) = bounds(a, b, inc);
                let it = d.scan::<Vec<u8>>((lo.clone(), hi.clone()));
                let got = match (rev, lend) {
                    (false, false) => collect(it),
                    (true, false) => collect(it.rev()),
                    (_, true) => collect_lent(it, rev),
                };
                assert_eq!(got, range_of(&model, lo, hi, rev));
            }
            Op::Prefix(p, rev) => {
                let p = format!("k{p}").into_bytes();
                let want: Vec<_> = model
                    .iter()
                    .filter(|(k, _)| k.starts_with(&p))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let got = if rev { collect(d.prefix(&p).rev()) } else { collect(d.prefix(&p)) };
                let want: Vec<_> = if rev { want.into_iter().rev().collect() } else { want };
                assert_eq!(got, want);
            }
            Op::Zigzag(pattern) => {
                let mut want: std::collections::VecDeque<_> =
                    range_of(&model, Bound::Unbounded, Bound::Unbounded, false).into();
                let mut it = d.iter();
                for step in pattern.iter().cycle().take(want.len() + 2) {
                    let owned = |r: Option<timber_kv::Result<(Bytes, Bytes)>>| {
                        r.map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
                    };
                    let lent = |r: Option<timber_kv::Result<(&[u8], &[u8])>>| {
                        r.map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
                    };
                    let got = match step % 4 {
                        0 => owned(it.next()),
                        1 => owned(it.next_back()),
                        2 => lent(it.next_ref()),
                        _ => lent(it.next_back_ref()),
                    };
                    let exp = if step % 2 == 0 { want.pop_front() } else { want.pop_back() };
                    assert_eq!(got, exp);
                }
            }
            Op::Snapshot => {
                if snaps.len() < 4 {
                    snaps.push((d.snapshot(), model.clone()));
                }
            }
            Op::SnapGet(i, k) => {
                if !snaps.is_empty() {
                    let (s, m) = &snaps[i % snaps.len()];
                    assert_eq!(s.get(key(k)).unwrap().map(|b| b.to_vec()), m.get(&key(k)).cloned());
                }
            }
            Op::SnapScan(i, rev) => {
                if !snaps.is_empty() {
                    let (s, m) = &snaps[i % snaps.len()];
                    let got = if rev { collect(s.iter().rev()) } else { collect(s.iter()) };
                    assert_eq!(got, range_of(m, Bound::Unbounded, Bound::Unbounded, rev));
                }
            }
            Op::DropSnapshot(i) => {
                if !snaps.is_empty() {
                    let n = snaps.len();
                    snaps.remove(i % n);
                }
            }
            Op::Flush => d.flush().unwrap(),
            Op::Compact(a, b) => {
                let (lo, hi) = bounds(a, b, true);
                d.compact_range::<Vec<u8>>((lo, hi)).unwrap();
            }
            Op::Reopen => {
                snaps.clear();
                drop(db.take());
                db = Some(Db::open(dir.path(), opts()).unwrap());
            }
        }
    }
    let d = db.as_ref().unwrap();
    assert_eq!(collect(d.iter()), range_of(&model, Bound::Unbounded, Bound::Unbounded, false));
    for (s, m) in &snaps {
        assert_eq!(collect(s.iter()), range_of(m, Bound::Unbounded, Bound::Unbounded, false));
    }
    snaps.clear();
    drop(db.take());
    let d = Db::open(dir.path(), opts()).unwrap();
    assert_eq!(collect(d.iter().rev()), range_of(&model, Bound::Unbounded, Bound::Unbounded, true));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_a_btreemap(ops in proptest::collection::vec(op(), 1..400), lz4: bool, synced in proptest::bool::weighted(0.1), hash_index: bool, cached: bool) {
        let meta = if cached { Meta::Cached } else { Meta::Pinned };
        run(ops, lz4, synced, hash_index, meta);
    }
}
