//! Guarded writes: an `Op::Guarded` applies its writes only if every expected key holds the
//! bytes its proposer read, judged by each member on the state it applies to (the writes of
//! earlier entries, written or still in the apply call's batch, and of earlier ops of the same
//! entry), so that members applying the same log in different batches decide alike; the
//! entry's `Applied` says which guarded ops ran, and a proposer whose guard failed hears
//! `Error::Conflict`.

mod common;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use openraft::Entry;
use timber_cluster::{
    range_digest, Applied, Error, Expect, ExpectRange, Member, MemberConfig, Proposal, TypeConfig,
};
use timber_kv::Db;
use tokio::net::TcpListener;

use common::{entry, open_machine as open};

fn expect(key: &str, stored: Option<&str>) -> Expect {
    Expect { key: key.as_bytes().to_vec(), stored: stored.map(|s| s.as_bytes().to_vec()) }
}

fn puts(pairs: &[(&str, &str)]) -> Proposal {
    let mut p = Proposal::default();
    for (k, v) in pairs {
        p.put(k.as_bytes().to_vec(), v.as_bytes().to_vec());
    }
    p
}

fn guarded(expects: Vec<Expect>, writes: Proposal) -> Proposal {
    let mut p = Proposal::default();
    p.guarded(expects, vec![], writes);
    p
}

/// A log that exercises every source a guard reads: the engine, the apply call's batch, and
/// earlier ops of the same entry.
fn log() -> Vec<Entry<TypeConfig>> {
    let mut both = guarded(vec![expect("x", None)], puts(&[("x", "1")]));
    // The second guard of the entry sees the first one's write: x is no longer absent.
    both.guarded(vec![expect("x", None)], vec![], puts(&[("x", "2")]));
    both.put(b"after".to_vec(), b"a".to_vec());
    let mut refused_then_plain = guarded(vec![expect("a", Some("0"))], puts(&[("c", "no")]));
    refused_then_plain.put(b"plain".to_vec(), b"p".to_vec());
    let mut revised = Proposal::default();
    revised.put_revised(b"r".to_vec(), b"v\0\0\0\0\0\0\0\0".to_vec(), 1);
    vec![
        entry(1, puts(&[("a", "1")])),
        entry(2, guarded(vec![expect("a", Some("1")), expect("b", None)], puts(&[("b", "1")]))),
        entry(3, puts(&[("a", "2")])),
        // a changed in entry 3: refused, whether entry 3 is written yet or still batched.
        entry(4, guarded(vec![expect("a", Some("1"))], puts(&[("b", "2")]))),
        entry(5, both),
        entry(6, refused_then_plain),
        entry(7, revised),
        // The stamped bytes are what a reader of r would have read.
        entry(
            8,
            guarded(
                vec![Expect {
                    key: b"r".to_vec(),
                    stored: Some([&b"v"[..], &2u64.to_le_bytes()].concat()),
                }],
                puts(&[("d", "1")]),
            ),
        ),
        entry(
            9,
            guarded(vec![expect("b", Some("1")), expect("a", Some("2"))], Proposal::default()),
        ),
    ]
}

fn outcomes() -> Vec<Vec<bool>> {
    vec![
        vec![],
        vec![true],
        vec![],
        vec![false],
        vec![true, false],
        vec![false],
        vec![],
        vec![true],
        vec![true],
    ]
}

fn data(db: &Db) -> BTreeMap<String, String> {
    ["a", "b", "c", "x", "after", "plain", "d"]
        .into_iter()
        .filter_map(|k| {
            db.get(k).unwrap().map(|v| (k.to_string(), String::from_utf8_lossy(&v).into_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_decide_alike_whether_entries_come_in_one_batch_or_one_by_one() {
    let want: BTreeMap<String, String> =
        [("a", "2"), ("b", "1"), ("x", "1"), ("after", "a"), ("plain", "p"), ("d", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();

    // One apply call: every guard reads the call's batch (entry 2's builds the map of it).
    let dir = tempfile::tempdir().unwrap();
    let (mut m, db) = open(dir.path());
    let applied = m.apply(log()).await.unwrap();
    let guards: Vec<Vec<bool>> = applied.into_iter().map(|a: Applied| a.guards).collect();
    assert_eq!(guards, outcomes());
    assert_eq!(data(&db), want);

    // One call per entry: guards read the engine (and the ops before them in their entry).
    let dir = tempfile::tempdir().unwrap();
    let (mut m, db) = open(dir.path());
    let mut guards = Vec::new();
    for e in log() {
        guards.extend(m.apply(vec![e]).await.unwrap().into_iter().map(|a| a.guards));
    }
    assert_eq!(guards, outcomes());
    assert_eq!(data(&db), want);
}

#[test]
fn a_guarded_op_may_only_put_and_delete_unreserved_keys() {
    let mut inner = Proposal::default();
    inner.create_stream("s");
    assert!(guarded(vec![], inner).check().is_err());
    let nested = guarded(vec![], guarded(vec![], puts(&[("k", "v")])));
    assert!(nested.check().is_err());
    let mut reserved = Proposal::default();
    reserved.put(timber_cluster::REVISION_KEY.to_vec(), vec![0; 8]);
    assert!(matches!(guarded(vec![], reserved).check(), Err(Error::Reserved(_))));
    // Nor expect the counter (written only as a batch ends) or a key the engine refuses.
    let counter = Expect { key: timber_cluster::REVISION_KEY.to_vec(), stored: None };
    assert!(matches!(guarded(vec![counter], puts(&[("k", "v")])).check(), Err(Error::Reserved(_))));
    assert!(guarded(vec![expect("", None)], puts(&[("k", "v")])).check().is_err());
    let mut fine = puts(&[("k", "v")]);
    fine.delete(b"j".to_vec());
    assert!(guarded(vec![expect("k", None)], fine).check().is_ok());
}

/// Through a member: a proposer whose guard holds hears success; one whose guard found the key
/// changed hears `Conflict`, and its writes are nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposer_hears_whether_its_guard_held() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path().join("db"), timber_kv::Options::default()).unwrap());
    let mut config = MemberConfig::new(1, addr, dir.path().join("raft"));
    config.initial_cluster = BTreeMap::from([(1, addr.to_string())]);
    let member = Member::start_on(l, config, db.clone()).await.unwrap();
    let t = Duration::from_secs(5);
    common::agreed_leader([member.raft()].into_iter(), Duration::from_secs(10)).await;
    member.propose(puts(&[("k", "1")]), t).await.unwrap();
    let ok = guarded(vec![expect("k", Some("1"))], puts(&[("k", "2")]));
    member.propose(ok, t).await.unwrap();
    let stale = guarded(vec![expect("k", Some("1"))], puts(&[("k", "3"), ("j", "3")]));
    assert!(matches!(member.propose(stale, t).await, Err(Error::Conflict)));
    assert_eq!(db.get(b"k").unwrap().unwrap().as_ref(), b"2");
    assert_eq!(db.get(b"j").unwrap(), None);

    // Concurrent proposers share entries (two in flight, the rest queued and merged): each
    // hears the outcome of its own guards, with proposals of none, one and two guards, holding
    // and failing, interleaved. An unguarded write beside them applies either way.
    let member = Arc::new(member);
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let member = member.clone();
            tokio::spawn(async move {
                let w = |s: &str| puts(&[(&format!("w{i}{s}"), "x")]);
                let mut p = match i % 4 {
                    0 => Proposal::default(),
                    1 => guarded(vec![expect("k", Some("2"))], w("a")),
                    2 => guarded(vec![expect("k", Some("1"))], w("a")),
                    _ => {
                        let mut p = guarded(vec![expect("k", Some("2"))], w("a"));
                        p.guarded(vec![expect("k", None)], vec![], w("b"));
                        p
                    }
                };
                p.put(format!("u{i}").into_bytes(), b"y".to_vec());
                (i, member.propose(p, t).await)
            })
        })
        .collect();
    let mut entries = BTreeMap::<u64, usize>::new();
    for c in calls {
        let (i, r) = c.await.unwrap();
        let has = |s: &str| db.get(format!("w{i}{s}")).unwrap().is_some();
        match (i % 4, r) {
            (0 | 1, Ok(id)) => *entries.entry(id.index).or_default() += 1,
            (2 | 3, Err(Error::Conflict)) => {}
            (_, r) => panic!("call {i}: {r:?}"),
        }
        assert_eq!((has("a"), has("b")), (i % 4 == 1 || i % 4 == 3, false), "call {i}");
        assert!(db.get(format!("u{i}")).unwrap().is_some());
    }
    assert!(entries.values().any(|&n| n > 1), "no entry carried two proposals: {entries:?}");
    member.shutdown().await;
}

/// A range guard expecting the pairs of `model` within `lo..hi` (as a proposer reading its own
/// engine computes it).
fn range(model: &BTreeMap<&str, &str>, lo: &str, hi: Option<&str>) -> ExpectRange {
    let hi = hi.map_or(Bound::Unbounded, |h| Bound::Excluded(h.as_bytes().to_vec()));
    let r = ExpectRange { lo: Bound::Included(lo.as_bytes().to_vec()), hi, digest: 0 };
    let pairs = model
        .iter()
        .filter(|(k, _)| r.contains(k.as_bytes()))
        .map(|(k, v)| Ok::<_, ()>((k.as_bytes(), v.as_bytes())));
    ExpectRange { digest: range_digest(pairs).unwrap(), ..r }
}

fn range_log() -> Vec<Entry<TypeConfig>> {
    let before = BTreeMap::from([("k1", "a"), ("k3", "c"), ("z", "z")]);
    let guard = |ranges: Vec<ExpectRange>, w: &str| {
        let mut p = Proposal::default();
        p.guarded(vec![], ranges, puts(&[(w, "x")]));
        p
    };
    let mut revised = Proposal::default();
    revised.put_revised(b"r".to_vec(), b"v\0\0\0\0\0\0\0\0".to_vec(), 1);
    vec![
        entry(1, puts(&[("k1", "a"), ("k3", "c"), ("z", "z")])),
        entry(2, guard(vec![range(&before, "k0", Some("k9"))], "w1")),
        // A write outside the range changes nothing for it.
        entry(3, puts(&[("z", "z2")])),
        entry(4, guard(vec![range(&before, "k0", Some("k9"))], "w2")),
        // One inside does, a new key as well as a changed one.
        entry(5, puts(&[("k2", "b")])),
        entry(6, guard(vec![range(&before, "k0", Some("k9"))], "w3")),
        // Its deletion restores the pairs the proposer read.
        entry(7, {
            let mut p = Proposal::default();
            p.delete(b"k2".to_vec());
            p
        }),
        entry(8, guard(vec![range(&before, "k0", Some("k9"))], "w4")),
        // The whole keyspace: the counter a revised put raises (written as the batch ends)
        // and the machine's own keys are not data a digest covers.
        entry(9, revised),
        entry(10, {
            let mut all = BTreeMap::from([("k1", "a"), ("k3", "c"), ("z", "z2")]);
            all.extend([("w1", "x"), ("w2", "x"), ("w4", "x")]);
            let mut p = Proposal::default();
            // Stamped with the first revision.
            all.insert("r", "v\u{2}\0\0\0\0\0\0\0");
            p.guarded(vec![], vec![range(&all, "", None)], puts(&[("w5", "x")]));
            p
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_guards_see_every_write_into_their_range_and_none_outside() {
    let want = vec![
        vec![],
        vec![true],
        vec![],
        vec![true],
        vec![],
        vec![false],
        vec![],
        vec![true],
        vec![],
        vec![true],
    ];
    let written = |db: &Db| ["w1", "w2", "w3", "w4", "w5"].map(|k| db.get(k).unwrap().is_some());
    let dir = tempfile::tempdir().unwrap();
    let (mut m, db) = open(dir.path());
    let applied = m.apply(range_log()).await.unwrap();
    assert_eq!(applied.into_iter().map(|a| a.guards).collect::<Vec<_>>(), want);
    assert_eq!(written(&db), [true, true, false, true, true]);

    let dir = tempfile::tempdir().unwrap();
    let (mut m, db) = open(dir.path());
    let mut guards = Vec::new();
    for e in range_log() {
        guards.extend(m.apply(vec![e]).await.unwrap().into_iter().map(|a| a.guards));
    }
    assert_eq!(guards, want);
    assert_eq!(written(&db), [true, true, false, true, true]);
}
