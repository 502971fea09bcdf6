//! Range removals (`Op::DeleteRange`, what `FLUSHALL` proposes): the entry empties its range
//! as the entries before it left the engine, whether they were written or still in the apply
//! call's batch; applied again over a half-applied state (a member that stopped in the middle
//! and replays it) it ends the same; and a proposal that mixes it with other writes, or whose
//! range covers the state machine's own keys or the revision counter, is refused.

mod common;

use std::collections::BTreeMap;

use openraft::storage::RaftStateMachine;
use timber_cluster::{Error, Proposal};
use timber_kv::Db;

use common::{entry, open_machine as open};

/// 10,000 keys under `k` (several batches of a range removal) and two outside it.
fn load() -> Proposal {
    let mut p = Proposal::default();
    for i in 0..10_000 {
        p.put(format!("k{i:05}").into_bytes(), b"v".to_vec());
    }
    p.put(b"e1".to_vec(), b"x".to_vec());
    p.put(b"l".to_vec(), b"past the range".to_vec());
    p
}

fn remove(start: &str, end: &str) -> Proposal {
    let mut p = Proposal::default();
    p.delete_range(start.as_bytes().to_vec(), end.as_bytes().to_vec());
    p
}

fn after() -> Proposal {
    let mut p = Proposal::default();
    p.put(b"k-after".to_vec(), b"a".to_vec());
    p
}

fn data(db: &Db) -> BTreeMap<String, String> {
    db.iter()
        .map(|kv| kv.unwrap())
        .filter(|(k, _)| !k.starts_with(b"\0"))
        .map(|(k, v)| {
            (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned())
        })
        .collect()
}

fn want() -> BTreeMap<String, String> {
    [("e1", "x"), ("l", "past the range"), ("k-after", "a")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_removal_empties_its_range_in_one_call_or_entry_by_entry() {
    // One call: the keys it removes are still in the call's batch when it comes.
    let dir = tempfile::tempdir().unwrap();
    let (mut m, db) = open(dir.path());
    m.apply(vec![entry(1, load()), entry(2, remove("k", "l")), entry(3, after())]).await.unwrap();
    assert_eq!(data(&db), want());
    let (applied, _) = m.applied_state().await.unwrap();
    assert_eq!(applied.map(|id| id.index), Some(3));

    // One call per entry.
    let dir = tempfile::tempdir().unwrap();
    let (mut m, db) = open(dir.path());
    for (i, p) in [load(), remove("k", "l"), after()].into_iter().enumerate() {
        m.apply(vec![entry(i as u64 + 1, p)]).await.unwrap();
    }
    assert_eq!(data(&db), want());
}

/// Readers of the member's engine while it applies a range removal see every key of the range
/// or none (the removal takes several batches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_a_range_removal_whole_or_not_at_all() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (mut m, db) = open(dir.path());
    let db = Arc::new(db);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (db, done) = (db.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut half, mut reads) = (0, 0u64);
            while !done.load(Ordering::Acquire) {
                let got = db.get_many(&[&b"k00000"[..], b"k05000", b"k09999"]).unwrap();
                let n = got.iter().filter(|v| v.is_some()).count();
                half += usize::from(n != 0 && n != 3);
                reads += 1;
            }
            (half, reads)
        })
    };
    for round in 0..5u64 {
        m.apply(vec![entry(2 * round + 1, load()), entry(2 * round + 2, remove("k", "l"))])
            .await
            .unwrap();
    }
    done.store(true, Ordering::Release);
    let (half, reads) = reader.join().unwrap();
    assert!(reads > 0);
    assert_eq!(half, 0, "{half} of {reads} reads saw the range half removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_removal_applied_again_over_a_half_applied_state_ends_the_same() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut m, db) = open(dir.path());
        m.apply(vec![entry(1, load())]).await.unwrap();
        // What a member that stopped after some of the removal's batches left: part of the
        // range gone, the applied id still that of entry 1.
        let mut b = timber_kv::WriteBatch::new();
        for i in 0..5_000 {
            b.delete(format!("k{i:05}"));
        }
        db.write(b).unwrap();
        db.close().unwrap();
    }
    let (mut m, db) = open(dir.path());
    let (applied, _) = m.applied_state().await.unwrap();
    assert_eq!(applied.map(|id| id.index), Some(1));
    m.apply(vec![entry(2, remove("k", "l")), entry(3, after())]).await.unwrap();
    assert_eq!(data(&db), want());
}

#[test]
fn a_range_removal_is_proposed_alone_and_never_over_reserved_keys() {
    let mut mixed = remove("k", "l");
    mixed.put(b"a".to_vec(), b"1".to_vec());
    assert!(matches!(mixed.check(), Err(Error::Config(_))), "{:?}", mixed.check());
    let mut two = remove("k", "l");
    two.delete_range(b"e".to_vec(), b"f".to_vec());
    assert!(two.check().is_ok());
    // The state machine's keys (`\0raft/...`) and the revision counter `v`.
    for (start, end) in [("\0", "\u{1}"), ("\0raft/a", "\0raft/b"), ("a", "z"), ("v", "w")] {
        let p = remove(start, end);
        assert!(matches!(p.check(), Err(Error::Reserved(_))), "{start:?}..{end:?}");
    }
    assert!(remove("\0member/", "\0member0").check().is_ok());
    // Not inside a guarded write.
    let mut g = Proposal::default();
    g.guarded(vec![], vec![], remove("k", "l"));
    assert!(g.check().is_err());
}
