//! Members on loopback with their own engines: proposals reach every engine, followers name
//! the leader, the leader's loss elects another, a lone leader refuses writes within a bounded
//! time, restarted members catch up, and one behind the purged log catches up from a snapshot.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use timber_cluster::{Error, Member, MemberConfig, Proposal};
use timber_kv::Db;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);
const PROPOSE: Duration = Duration::from_secs(5);

struct Node {
    _dir: tempfile::TempDir,
    db: Arc<Db>,
    addr: String,
    config: MemberConfig,
}

async fn nodes(n: u64, tune: impl Fn(&mut MemberConfig)) -> (Vec<Node>, Vec<TcpListener>) {
    let mut listeners = Vec::new();
    let mut cluster = BTreeMap::new();
    for id in 1..=n {
        let l = common::listener().await;
        cluster.insert(id, l.local_addr().unwrap().to_string());
        listeners.push(l);
    }
    let mut out = Vec::new();
    for id in 1..=n {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path().join("db"), timber_kv::Options::default()).unwrap());
        let addr = cluster[&id].clone();
        let mut config = MemberConfig::new(id, addr.parse().unwrap(), dir.path().join("raft"));
        config.initial_cluster = cluster.clone();
        tune(&mut config);
        out.push(Node { _dir: dir, db, addr, config });
    }
    (out, listeners)
}

async fn start(node: &Node, listener: Option<TcpListener>) -> Member {
    let l = match listener {
        Some(l) => l,
        None => TcpListener::bind(&node.addr).await.unwrap(),
    };
    Member::start_on(l, node.config.clone(), node.db.clone()).await.unwrap()
}

/// Every node started on its listener, by id.
async fn start_all(nodes: &[Node], listeners: Vec<TcpListener>) -> BTreeMap<u64, Member> {
    let mut members = BTreeMap::new();
    for (node, l) in nodes.iter().zip(listeners) {
        members.insert(node.config.id, start(node, Some(l)).await);
    }
    members
}

/// The member all the given ones follow in one term, which says it leads.
async fn leader(members: &BTreeMap<u64, Member>) -> u64 {
    common::agreed_leader(members.values().map(|m| m.raft()), WAIT).await
}

fn put(i: u32) -> Proposal {
    let mut p = Proposal::default();
    p.put(format!("k{i:04}"), format!("v{i}"));
    p
}

async fn write(m: &Member, range: std::ops::Range<u32>) {
    for i in range {
        m.propose(put(i), PROPOSE).await.unwrap();
    }
}

/// Every member applied what the leader has, and every engine holds the keys `0..n`, plus
/// those of `maybe` on all members or on none.
async fn converged(members: &BTreeMap<u64, Member>, n: u32, maybe: &[u32]) {
    let l = leader(members).await;
    let last = members[&l].metrics().last_log_index;
    let mut seen = None;
    for m in members.values() {
        m.raft().wait(Some(WAIT)).applied_index_at_least(last, "caught up").await.unwrap();
        let keys: Vec<u32> = m
            .machine()
            .db()
            .prefix(b"k")
            .map(|r| {
                let (k, v) = r.unwrap();
                let i: u32 = std::str::from_utf8(&k[1..]).unwrap().parse().unwrap();
                assert_eq!(&v[..], format!("v{i}").as_bytes());
                i
            })
            .collect();
        let extra: Vec<u32> = keys.iter().copied().filter(|i| *i >= n).collect();
        assert_eq!(keys.len() - extra.len(), n as usize, "member {}", m.id());
        assert!(extra.iter().all(|i| maybe.contains(i)), "member {}: {extra:?}", m.id());
        assert_eq!(*seen.get_or_insert(keys.clone()), keys, "member {}", m.id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_replicate_fail_over_and_stop_without_quorum() {
    let (nodes, listeners) = nodes(3, |_| {}).await;
    let mut members = start_all(&nodes, listeners).await;
    let first = leader(&members).await;
    write(&members[&first], 0..40).await;
    converged(&members, 40, &[]).await;

    // A follower refuses, naming the leader; a reserved key is refused everywhere.
    let follower = *members.keys().find(|&&id| id != first).unwrap();
    match members[&follower].propose(put(999), PROPOSE).await {
        Err(Error::NotLeader { leader_id, leader_addr }) => {
            assert_eq!(leader_id, Some(first));
            assert_eq!(leader_addr.as_deref(), Some(nodes[first as usize - 1].addr.as_str()));
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    let mut bad = Proposal::default();
    bad.put(timber_cluster::RESERVED_PREFIX.to_vec(), b"x".to_vec());
    assert!(matches!(members[&first].propose(bad, PROPOSE).await, Err(Error::Reserved(_))));
    members[&first].read_barrier(PROPOSE).await.unwrap();

    // The leader goes: the others elect one of them and go on.
    members.remove(&first).unwrap().shutdown().await;
    let second = leader(&members).await;
    assert_ne!(second, first);
    write(&members[&second], 40..70).await;
    converged(&members, 70, &[]).await;

    // Alone, the leader refuses within the deadline and applies nothing.
    let other = *members.keys().find(|&&id| id != second).unwrap();
    members.remove(&other).unwrap().shutdown().await;
    let short = Duration::from_millis(700);
    let t = tokio::time::Instant::now();
    let r = members[&second].propose(put(500), short).await;
    assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < short + Duration::from_secs(1));
    let r = members[&second].read_barrier(short).await;
    assert!(matches!(r, Err(Error::Unavailable(_)) | Err(Error::NotLeader { .. })), "{r:?}");
    let r = members[&second].barrier(short).await;
    assert!(matches!(r, Err(Error::Unavailable(_)) | Err(Error::NotLeader { .. })), "{r:?}");

    // Both come back from their directories and engines. The write that timed out is in the
    // lone leader's log only: it commits if that member leads again, and is dropped if the
    // two others elect one of them; either way all members agree.
    for id in [first, other] {
        members.insert(id, start(&nodes[id as usize - 1], None).await);
    }
    // A barrier on the leader: once it returns, every proposal handed to Raft before it is
    // applied there (the timed-out write too, if its member leads again) or never will be.
    let (l, id) = loop {
        let l = leader(&members).await;
        match members[&l].barrier(PROPOSE).await {
            Ok(id) => break (l, id),
            // An election under way: the leader again.
            Err(Error::NotLeader { .. } | Error::Unavailable(_)) => continue,
            Err(e) => panic!("barrier on the leader: {e}"),
        }
    };
    // What the state machine stored with its data (openraft's metrics may publish the apply
    // after the barrier's reply).
    let snap = members[&l].machine().db().snapshot();
    let applied = timber_cluster::applied_in(&snap).unwrap();
    assert!(applied.is_some_and(|a| a.index >= id.index), "{applied:?} below {id}");
    if l == second {
        assert!(members[&l].machine().db().get(b"k0500").unwrap().is_some());
    }
    write(&members[&l], 70..80).await;
    converged(&members, 80, &[500]).await;
    for (_, m) in members {
        m.shutdown().await;
    }
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_the_purged_log_catches_up_from_a_snapshot() {
    let (nodes, listeners) = nodes(3, |c| {
        c.snapshot_every = 10;
        c.keep_after_snapshot = 0;
    })
    .await;
    let mut members = start_all(&nodes, listeners).await;
    let l = leader(&members).await;
    write(&members[&l], 0..5).await;
    converged(&members, 5, &[]).await;
    let behind = *members.keys().find(|&&id| id != l).unwrap();
    members.remove(&behind).unwrap().shutdown().await;

    // Overwrites and deletes too: the snapshot must carry the state, not a history.
    write(&members[&l], 5..60).await;
    let mut del = Proposal::default();
    del.delete(b"k0000".to_vec()).put(b"k0001".to_vec(), b"v1".to_vec());
    members[&l].propose(del, PROPOSE).await.unwrap();
    let m = members[&l]
        .raft()
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index > 10), "leader purged its log")
        .await
        .unwrap();
    assert!(m.snapshot.is_some());

    members.insert(behind, start(&nodes[behind as usize - 1], None).await);
    let last = members[&l].metrics().last_log_index;
    members[&behind]
        .raft()
        .wait(Some(WAIT))
        .applied_index_at_least(last, "caught up")
        .await
        .unwrap();
    assert!(members[&behind].metrics().snapshot.is_some(), "caught up through a snapshot");
    let installed = members[&behind].machine().snapshot_stats();
    assert_eq!(installed.installed, 1, "{installed:?}");
    assert!(installed.last_installed_bytes > 0, "{installed:?}");
    let built = members[&l].machine().snapshot_stats();
    assert!(built.built >= 1 && built.last_built_bytes > 0, "{built:?}");
    let db = members[&behind].machine().db();
    assert!(db.get(b"k0000").unwrap().is_none());
    let keys = db.prefix(b"k").count();
    assert_eq!(keys, 59);
    assert_eq!(&db.get(b"k0059").unwrap().unwrap()[..], b"v59");
    for (_, m) in members {
        m.shutdown().await;
    }
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_as_a_learner_is_promoted_and_another_is_removed() {
    let (mut nodes, listeners) = nodes(4, |_| {}).await;
    // Member 4 is not in the initial membership: it starts empty and waits to be added.
    let fourth = listeners.into_iter().collect::<Vec<_>>();
    let mut members = BTreeMap::new();
    let mut fourth = fourth.into_iter();
    for node in nodes.iter_mut().take(3) {
        node.config.initial_cluster.remove(&4);
        members.insert(node.config.id, start(node, fourth.next()).await);
    }
    nodes[3].config.initial_cluster.clear();
    let joining = start(&nodes[3], fourth.next()).await;
    let l = leader(&members).await;
    write(&members[&l], 0..20).await;

    // Only the leader changes the membership; a follower names it.
    let f = *members.keys().find(|&&id| id != l).unwrap();
    let r = members[&f].add_learner(4, nodes[3].addr.clone(), PROPOSE).await;
    assert!(matches!(r, Err(Error::NotLeader { leader_id: Some(x), .. }) if x == l), "{r:?}");
    members[&l].add_learner(4, nodes[3].addr.clone(), PROPOSE).await.unwrap();
    members.insert(4, joining);
    converged(&members, 20, &[]).await;
    let m = members[&l].metrics();
    assert!(m.membership_config.membership().learner_ids().any(|id| id == 4));

    // Promoted, it votes; then another member is removed and stopped: the three voters left
    // (the new one among them) go on.
    members[&l].promote(4, PROPOSE).await.unwrap();
    let gone = *members.keys().find(|&&id| id != l && id != 4).unwrap();
    members[&l].remove(gone, PROPOSE).await.unwrap();
    let voters: Vec<u64> =
        members[&l].metrics().membership_config.membership().voter_ids().collect();
    assert_eq!(voters.len(), 3, "{voters:?}");
    assert!(voters.contains(&4) && !voters.contains(&gone));
    members.remove(&gone).unwrap().shutdown().await;
    write(&members[&l], 20..30).await;
    converged(&members, 30, &[]).await;
    for (_, m) in members {
        m.shutdown().await;
    }
    drop(nodes);
}

/// A transfer moves the leadership to the voter asked, asked through any member, while a
/// writer keeps proposing through whoever leads: every write acknowledged is on every member
/// after three transfers. Asking for a member that is not a voter is refused; asking for the
/// leader itself changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leadership_moves_to_the_voter_asked_under_writes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use timber_cluster::Change;

    let (nodes, listeners) = nodes(3, |_| {}).await;
    let members = start_all(&nodes, listeners).await;
    let members = Arc::new(members);
    let first = leader(&members).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (count, counted) = tokio::sync::watch::channel(0usize);
    let writer = tokio::spawn({
        let (members, stop, count) = (members.clone(), stop.clone(), count.clone());
        async move {
            let (mut acked, mut maybe) = (Vec::new(), Vec::new());
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let Some(l) = members[&1].metrics().current_leader else {
                    tokio::task::yield_now().await;
                    continue;
                };
                match members[&l].propose(put(i), PROPOSE).await {
                    Ok(_) => {
                        acked.push(i);
                        count.send_replace(acked.len());
                    }
                    Err(_) => maybe.push(i),
                }
                i += 1;
            }
            (acked, maybe)
        }
    });
    let e = members[&first].change_membership(Change::TransferLeader(9), WAIT).await.unwrap_err();
    assert!(e.to_string().contains("not a voter"), "{e}");
    members[&first].change_membership(Change::TransferLeader(first), WAIT).await.unwrap();
    assert_eq!(leader(&members).await, first);
    // Waits until the writer had 20 more writes acknowledged.
    let progress = || {
        let mut counted = counted.clone();
        async move {
            let from = *counted.borrow();
            let more = counted.wait_for(|n| *n >= from + 20);
            tokio::time::timeout(WAIT, more).await.expect("the writer stalled").unwrap();
        }
    };
    let mut l = first;
    for _ in 0..3 {
        progress().await;
        let target = l % 3 + 1;
        // Asked of the member that is neither the leader nor the target when there is one.
        let via = (1..=3).find(|&id| id != l && id != target).unwrap();
        members[&via].change_membership(Change::TransferLeader(target), WAIT).await.unwrap();
        l = leader(&members).await;
        assert_eq!(l, target);
    }
    progress().await;
    stop.store(true, Ordering::Relaxed);
    let (acked, maybe) = writer.await.unwrap();
    let last = members[&l].metrics().last_log_index;
    let mut seen = None;
    for m in members.values() {
        m.raft().wait(Some(WAIT)).applied_index_at_least(last, "caught up").await.unwrap();
        let keys: std::collections::BTreeSet<u32> = m
            .machine()
            .db()
            .prefix(b"k")
            .map(|r| std::str::from_utf8(&r.unwrap().0[1..]).unwrap().parse().unwrap())
            .collect();
        assert!(acked.iter().all(|i| keys.contains(i)), "member {} lost a write", m.id());
        assert!(keys.iter().all(|i| acked.contains(i) || maybe.contains(i)));
        assert_eq!(*seen.get_or_insert(keys.clone()), keys, "member {}", m.id());
    }
    let Ok(members) = Arc::try_unwrap(members) else { panic!("the writer still holds them") };
    for (_, m) in members {
        m.shutdown().await;
    }
    drop(nodes);
}

/// Members started at once form their cluster in its first term, under one leader: they do
/// not all stand for election at once (openraft ranks two candidates of one term by id, so a
/// later candidate would unseat the leader just elected and force a second election). Long
/// election timeouts, so that a slow vote on a loaded machine does not start a second term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_started_together_form_the_cluster_in_one_term() {
    let slow = |c: &mut MemberConfig| {
        c.election_timeout = (Duration::from_millis(1500), Duration::from_millis(3000));
    };
    for round in 0..6 {
        let (nodes, mut listeners) = nodes(3, slow).await;
        let (l3, l2, l1) = (listeners.pop(), listeners.pop(), listeners.pop());
        let (a, b, c) =
            tokio::join!(start(&nodes[0], l1), start(&nodes[1], l2), start(&nodes[2], l3));
        let members: BTreeMap<u64, Member> = [(1, a), (2, b), (3, c)].into_iter().collect();
        let l = leader(&members).await;
        members[&l].propose(put(0), PROPOSE).await.unwrap();
        converged(&members, 1, &[]).await;
        for m in members.values() {
            let term = m.metrics().current_term;
            assert_eq!(term, 1, "round {round}: member {} is in term {term}", m.id());
        }
        for m in members.into_values() {
            m.shutdown().await;
        }
    }
}

/// A read barrier whose heartbeats are answered after their deadline (one heartbeat interval,
/// here 1 ms, shorter than a round trip of this debug build under load) tries again instead of
/// failing: with every member up, barriers succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_barriers_outlast_late_heartbeat_answers() {
    let (nodes, listeners) = nodes(3, |c| {
        c.heartbeat = Duration::from_millis(1);
        // Long, so that late heartbeats do not also end the leadership.
        c.election_timeout = (Duration::from_millis(1500), Duration::from_millis(3000));
    })
    .await;
    let members = start_all(&nodes, listeners).await;
    let l = leader(&members).await;
    write(&members[&l], 0..10).await;
    let mut barriers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let raft_leader = members[&l].raft().clone();
        // Load: leadership checks of openraft's own, each a round of heartbeats.
        barriers.spawn(async move {
            for _ in 0..25 {
                let _ = raft_leader.get_read_log_id().await;
            }
        });
    }
    for _ in 0..50 {
        members[&l].read_barrier(WAIT).await.unwrap();
    }
    while barriers.join_next().await.is_some() {}
    for m in members.into_values() {
        m.shutdown().await;
    }
}

/// A range removal proposed while other proposals wait in the leader's queue goes in an entry
/// of its own (an entry that mixed it with other writes would fail every member's apply):
/// every proposal is acknowledged, and the member goes on applying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_removal_among_queued_proposals_is_an_entry_of_its_own() {
    let (nodes, mut listeners) = nodes(1, |_| {}).await;
    let m = Arc::new(start(&nodes[0], listeners.pop()).await);
    common::agreed_leader([m.raft()].into_iter(), WAIT).await;
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..5u32 {
        for i in 0..60u32 {
            let m = m.clone();
            let p = if i == 30 {
                let mut p = Proposal::default();
                p.delete_range(b"x".to_vec(), b"y".to_vec());
                p
            } else {
                put(round * 100 + i)
            };
            tasks.spawn(async move { m.propose(p, PROPOSE).await });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    write(&m, 1000..1001).await;
    assert!(m.machine().db().get(b"k1000").unwrap().is_some());
}
