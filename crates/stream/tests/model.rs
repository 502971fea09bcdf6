//! Model-based property test: random sequences of appends, reads, tail reads, truncations,
//! writer changes (fencing), maintenance (garbage collection, merging) and reopens, checked
//! against a `Vec` of every entry ever appended plus the truncation point. Runs against the local
//! file system and a real S3 server, without and with a journal (whose entries are read from
//! memory until fragments are cut, and replayed at reopen).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Backend, Place};
use proptest::prelude::*;
use timber_stream::{Error, Journal, Start, StreamConfig, StreamWriter, Streams, WriterOptions};

#[derive(Debug, Clone)]
enum Op {
    /// Append entries of these sizes, pipelined.
    Append(Vec<usize>),
    /// Read `n` entries from a fraction of the way through the stream.
    Read {
        at: f64,
        n: usize,
    },
    /// A reader at the tail gets the next appended entry.
    Tail,
    Truncate(f64),
    NewWriter,
    Maintain,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec(prop_oneof![0usize..40, 100usize..3000], 1..30).prop_map(Op::Append),
        3 => (0.0..1.2f64, 1usize..80).prop_map(|(at, n)| Op::Read { at, n }),
        1 => Just(Op::Tail),
        1 => (0.0..1.0f64).prop_map(Op::Truncate),
        1 => Just(Op::NewWriter),
        1 => Just(Op::Maintain),
        1 => Just(Op::Reopen),
    ]
}

fn payload(id: u64, size: usize) -> Bytes {
    let mut v = id.to_le_bytes().to_vec();
    v.resize(size.max(8), (id % 251) as u8);
    Bytes::from(v)
}

struct Model {
    entries: Vec<Bytes>,
    first: u64,
}

async fn run(p: &Place, ops: &[Op], wo: WriterOptions, merge: bool, journal: Journal) {
    let opts = || {
        let o = p.options().journal(journal);
        if merge {
            o.merge(2048, 16 << 10)
        } else {
            o.merge(0, 0)
        }
    };
    let mut s = Streams::open(p.dir.path(), opts()).await.unwrap();
    s.create("m", StreamConfig::default()).await.unwrap();
    let mut w: StreamWriter = s.writer_with("m", wo.clone()).await.unwrap();
    let mut m = Model { entries: Vec::new(), first: 0 };
    for op in ops {
        match op {
            Op::Append(sizes) => {
                let base = m.entries.len() as u64;
                let mut acks = Vec::new();
                for (k, &size) in sizes.iter().enumerate() {
                    acks.push(w.send(payload(base + k as u64, size)).await.unwrap());
                }
                for (k, a) in acks.into_iter().enumerate() {
                    let id = base + k as u64;
                    assert_eq!(a.await.unwrap(), id);
                    m.entries.push(payload(id, sizes[k]));
                }
            }
            Op::Read { at, n } => {
                let len = m.entries.len() as u64;
                let from = (len as f64 * at) as u64;
                let mut r = s.reader("m", Start::At(from)).unwrap();
                if from < m.first {
                    match r.next().await {
                        Err(Error::Truncated { first_available }) => {
                            assert_eq!(first_available, m.first)
                        }
                        other => panic!("read at {from} below {}: {other:?}", m.first),
                    }
                    continue;
                }
                let want = (*n as u64).min(len.saturating_sub(from));
                for id in from..from + want {
                    let e = r.next().await.unwrap();
                    assert_eq!(e.id, id);
                    assert_eq!(e.data, m.entries[id as usize], "entry {id}");
                }
                assert_eq!(r.has_next(), from + want < len);
            }
            Op::Tail => {
                let mut r = s.reader("m", Start::Latest).unwrap();
                let id = m.entries.len() as u64;
                let data = payload(id, 77);
                let reading = tokio::spawn(async move { r.next().await });
                assert_eq!(w.append(data.clone()).await.unwrap(), id);
                let e = tokio::time::timeout(Duration::from_secs(10), reading)
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                assert_eq!((e.id, e.data), (id, data.clone()));
                m.entries.push(data);
            }
            Op::Truncate(f) => {
                let before = (m.entries.len() as f64 * f) as u64;
                let info = s.truncate("m", before).await.unwrap();
                m.first = m.first.max(before);
                assert_eq!(info.first_id, m.first);
            }
            Op::NewWriter => {
                let old = std::mem::replace(&mut w, s.writer_with("m", wo.clone()).await.unwrap());
                match old.append(payload(0, 1)).await {
                    Err(Error::Fenced { .. }) => {}
                    other => panic!("the old writer must be fenced, got {other:?}"),
                }
            }
            Op::Maintain => s.maintain().await.unwrap(),
            Op::Reopen => {
                drop(w);
                s.close().await.unwrap();
                s = Streams::open(p.dir.path(), opts()).await.unwrap();
                w = s.writer_with("m", wo.clone()).await.unwrap();
            }
        }
        let info = s.info("m").unwrap();
        assert_eq!(
            (info.first_id, info.next_id),
            (m.first, m.entries.len() as u64),
            "after {op:?}"
        );
    }
    // Every entry not truncated, in one pass from the start.
    let mut r = s.reader("m", Start::Earliest).unwrap();
    assert_eq!(r.position(), m.first);
    for id in m.first..m.entries.len() as u64 {
        assert_eq!(r.next().await.unwrap().data, m.entries[id as usize]);
    }
    // Garbage collection leaves exactly the recorded fragments.
    drop(w);
    s.close().await.unwrap();
    let s = Streams::open(p.dir.path(), opts()).await.unwrap();
    let recorded: u64 = s.segments("m").unwrap().iter().map(|g| g.fragments).sum();
    assert_eq!(p.fragment_files().len() as u64, recorded);
}

fn writer_options() -> impl Strategy<Value = (WriterOptions, bool, Journal)> {
    let journal = prop_oneof![
        2 => Just(Journal::Off),
        1 => Just(Journal::Always),
        1 => Just(Journal::Interval(Duration::from_millis(5))),
        1 => Just(Journal::Manual),
    ];
    // With a journal, a long interval keeps entries in the tail (read from memory, replayed at
    // reopen) until the writer closes or its fragment fills.
    let interval = prop_oneof![Just(Duration::from_millis(1)), Just(Duration::from_secs(30))];
    (
        1usize..12,
        any::<bool>(),
        prop_oneof![Just(4u64 << 10), Just(1u64 << 30)],
        any::<bool>(),
        journal,
        interval,
    )
        .prop_map(|(max_entries, lz4, seg, merge, journal, interval)| {
            let wo = WriterOptions {
                max_entries,
                lz4,
                max_segment_bytes: seg,
                max_flush_inflight: 1 + max_entries % 4,
                max_interval: if journal == Journal::Off {
                    Duration::from_millis(1)
                } else {
                    interval
                },
                ..common::fast_writer()
            };
            (wo, merge, journal)
        })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn local_matches_model(ops in prop::collection::vec(op(), 1..40), (wo, merge, journal) in writer_options()) {
        let p = Place::new(Backend::Local);
        common::runtime().block_on(run(&p, &ops, wo, merge, journal));
    }

    #[test]
    fn s3_matches_model(ops in prop::collection::vec(op(), 1..40), (wo, merge, journal) in writer_options()) {
        let p = Place::new(Backend::S3);
        common::runtime().block_on(run(&p, &ops, wo, merge, journal));
    }
}
