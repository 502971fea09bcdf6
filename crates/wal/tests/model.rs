//! Model-based test: random sequences of operations applied both to a `Wal` and to a `VecDeque`
//! model, with reopens among them; every observation must agree.

mod common;

use std::collections::VecDeque;

use proptest::prelude::*;
use timber_wal::{Error, Options, SyncMode, Wal};

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u8>),
    Batch(Vec<Vec<u8>>),
    /// Reads at `first + offset - 2`, so that misses on both sides are tried.
    Read(u64),
    Iter(u64, u64),
    /// Truncates the front at `first + offset` (possibly past the end).
    TruncateFront(u64),
    /// Truncates the back at `first + offset`, clamped to `next`.
    TruncateBack(u64),
    Sync,
    Reopen,
}

fn record() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => proptest::collection::vec(any::<u8>(), 64..700),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => record().prop_map(Op::Append),
        8 => proptest::collection::vec(record(), 1..6).prop_map(Op::Batch),
        10 => (0u64..60).prop_map(Op::Read),
        4 => (0u64..60, 0u64..60).prop_map(|(a, b)| Op::Iter(a, b)),
        3 => (0u64..50).prop_map(Op::TruncateFront),
        3 => (0u64..50).prop_map(Op::TruncateBack),
        2 => Just(Op::Sync),
        3 => Just(Op::Reopen),
    ]
}

struct Model {
    first: u64,
    records: VecDeque<Vec<u8>>,
}

impl Model {
    fn next(&self) -> u64 {
        self.first + self.records.len() as u64
    }
}

fn options(sync: SyncMode, write_buffer: usize, preallocate: bool) -> Options {
    Options::default()
        .segment_capacity(4096)
        .sync(sync)
        .write_buffer(write_buffer)
        .preallocate(preallocate)
        .recycle_segments(true)
        .reader_cache(2)
}

fn check(wal: &Wal, m: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(wal.first_seq(), m.first);
    prop_assert_eq!(wal.next_seq(), m.next());
    prop_assert_eq!(wal.len(), m.records.len() as u64);
    prop_assert_eq!(wal.last_seq(), (!m.records.is_empty()).then(|| m.next() - 1));
    Ok(())
}

fn run(
    ops: Vec<Op>,
    sync: SyncMode,
    write_buffer: usize,
    preallocate: bool,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(sync, write_buffer, preallocate);
    let mut wal = Wal::open(dir.path(), opts.clone()).unwrap();
    let mut m = Model { first: 0, records: VecDeque::new() };
    for op in ops {
        match op {
            Op::Append(r) => {
                prop_assert_eq!(wal.append(&r).unwrap(), m.next());
                m.records.push_back(r);
            }
            Op::Batch(rs) => {
                let next = m.next();
                prop_assert_eq!(wal.append_batch(&rs).unwrap(), next..next + rs.len() as u64);
                m.records.extend(rs);
            }
            Op::Read(off) => {
                let seq = (m.first + off).saturating_sub(2);
                match wal.read(seq) {
                    Ok(b) => {
                        prop_assert!(seq >= m.first && seq < m.next());
                        prop_assert_eq!(&b[..], &m.records[(seq - m.first) as usize][..]);
                    }
                    Err(Error::NotFound { seq: s, first, next }) => {
                        prop_assert!(seq < m.first || seq >= m.next());
                        prop_assert_eq!((s, first, next), (seq, m.first, m.next()));
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Iter(a, b) => {
                let (lo, hi) = ((m.first + a).saturating_sub(3), m.first + b);
                let got: Vec<(u64, Vec<u8>)> =
                    wal.iter(lo..hi).map(|r| r.map(|(s, b)| (s, b.to_vec())).unwrap()).collect();
                let want: Vec<(u64, Vec<u8>)> = (lo.max(m.first)..hi.min(m.next()))
                    .map(|s| (s, m.records[(s - m.first) as usize].clone()))
                    .collect();
                prop_assert_eq!(got, want);
            }
            Op::TruncateFront(off) => {
                let seq = m.first + off;
                wal.truncate_front(seq).unwrap();
                if seq > m.next() {
                    m.records.clear();
                } else {
                    m.records.drain(..(seq - m.first) as usize);
                }
                m.first = seq;
            }
            Op::TruncateBack(off) => {
                let seq = (m.first + off).min(m.next());
                wal.truncate_back(seq).unwrap();
                m.records.truncate((seq - m.first) as usize);
            }
            Op::Sync => wal.sync().unwrap(),
            Op::Reopen => {
                drop(wal);
                wal = Wal::open(dir.path(), opts.clone()).unwrap();
            }
        }
        check(&wal, &m)?;
    }
    drop(wal);
    let wal = Wal::open(dir.path(), opts).unwrap();
    check(&wal, &m)?;
    let all: Vec<Vec<u8>> = wal.iter(..).map(|r| r.unwrap().1.to_vec()).collect();
    prop_assert_eq!(all, Vec::from(m.records));
    Ok(())
}

fn sync_mode() -> impl Strategy<Value = SyncMode> {
    prop_oneof![
        3 => Just(SyncMode::Manual),
        1 => Just(SyncMode::Always),
        1 => Just(SyncMode::Interval(std::time::Duration::from_millis(3))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn wal_matches_vecdeque_model(
        ops in proptest::collection::vec(op(), 1..150),
        sync in sync_mode(),
        write_buffer in prop_oneof![Just(0usize), Just(300), Just(64 << 10)],
        preallocate in any::<bool>(),
    ) {
        run(ops, sync, write_buffer, preallocate)?;
    }
}
