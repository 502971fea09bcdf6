//! The state machine's streams: stream writes of entries reach the stream store, a replay of
//! entries already applied (a restart that lost the applied id) changes nothing, an append that
//! would leave a hole is refused, snapshots carry every stream (its first id and entries) and an
//! install replaces the member's streams; members on loopback replicate streams and one behind
//! the purged log receives them in a snapshot.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};
use timber_cluster::{KvMachine, Member, MemberConfig, Proposal, Retention, TypeConfig};
use timber_kv::Db;
use timber_stream::{Start, Streams};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

struct Place {
    dir: tempfile::TempDir,
}

impl Place {
    fn new() -> Place {
        Place { dir: tempfile::tempdir().unwrap() }
    }

    async fn machine(&self) -> (KvMachine, Streams) {
        let p = self.dir.path();
        let db = Arc::new(Db::open(p.join("db"), timber_kv::Options::default()).unwrap());
        let streams = Streams::open(p.join("streams"), Default::default()).await.unwrap();
        (KvMachine::open(db, Some(streams.clone()), p.join("machine")).unwrap(), streams)
    }
}

fn entry(index: u64, p: Proposal) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(p),
    }
}

fn records(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range.map(|i| format!("r{i}").into_bytes()).collect()
}

/// The entries of a stream: (first id, records).
async fn contents(streams: &Streams, name: &str) -> (u64, Vec<Vec<u8>>) {
    let info = streams.info(name).unwrap();
    let mut r = streams.reader(name, Start::At(info.first_id)).unwrap();
    let mut out = Vec::new();
    while r.position() < info.next_id {
        out.push(r.next().await.unwrap().data.to_vec());
    }
    (info.first_id, out)
}

/// Entries 1..=4: create "s" with a key beside it, append r0..r3, append r4..r5, drop below 2.
fn history() -> Vec<Entry<TypeConfig>> {
    let mut create = Proposal::default();
    create.put(b"k".to_vec(), b"v".to_vec()).create_stream("s");
    let mut a = Proposal::default();
    a.append("s", 0, records(0..4));
    let mut b = Proposal::default();
    b.append("s", 4, records(4..6));
    let mut t = Proposal::default();
    t.truncate_stream("s", 2);
    vec![entry(1, create), entry(2, a), entry(3, b), entry(4, t)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_writes_apply_and_a_replay_changes_nothing() {
    let place = Place::new();
    let (mut m, streams) = place.machine().await;
    m.apply(history()).await.unwrap();
    let want = (2, records(2..6));
    assert_eq!(contents(&streams, "s").await, want);
    assert_eq!(&m.db().get(b"k").unwrap().unwrap()[..], b"v");

    // A restart that lost the applied id replays entries the streams already hold.
    m.apply(history()).await.unwrap();
    assert_eq!(contents(&streams, "s").await, want);
    // Overlapping the end: only the records past it are appended.
    let mut p = Proposal::default();
    p.append("s", 5, records(5..8));
    m.apply(vec![entry(5, p)]).await.unwrap();
    assert_eq!(contents(&streams, "s").await, (2, records(2..8)));

    // An append past the end would leave a hole: refused, nothing written.
    let mut p = Proposal::default();
    p.append("s", 10, records(10..11));
    assert!(m.apply(vec![entry(6, p)]).await.is_err());
    assert_eq!(contents(&streams, "s").await, (2, records(2..8)));

    // Deleting twice, or a missing stream, is no error.
    let mut p = Proposal::default();
    p.delete_stream("s").delete_stream("never");
    m.apply(vec![entry(7, p.clone()), entry(8, p)]).await.unwrap();
    assert!(streams.list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_carry_streams_and_an_install_replaces_them() {
    let (from, to) = (Place::new(), Place::new());
    let (mut a, _) = from.machine().await;
    a.apply(history()).await.unwrap();
    let snap = a.build_snapshot().await.unwrap();

    let (mut b, streams) = to.machine().await;
    // A stream the snapshot does not hold, and one it holds with other entries.
    let mut p = Proposal::default();
    p.create_stream("gone").append("gone", 0, records(0..3)).create_stream("s");
    p.append("s", 0, records(100..103));
    b.apply(vec![entry(1, p)]).await.unwrap();

    b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    let names: Vec<String> = streams.list().unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["s"]);
    assert_eq!(contents(&streams, "s").await, (2, records(2..6)));
    assert_eq!(&b.db().get(b"k").unwrap().unwrap()[..], b"v");
    // Appends continue after the installed end.
    let mut p = Proposal::default();
    p.append("s", 6, records(6..7));
    b.apply(vec![entry(5, p)]).await.unwrap();
    assert_eq!(contents(&streams, "s").await, (2, records(2..7)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_keeps_its_retention_when_applied_and_in_a_snapshot() {
    let (from, to) = (Place::new(), Place::new());
    let (mut a, streams) = from.machine().await;
    let retention = Retention { age_ms: Some(60_000), bytes: Some(1 << 20) };
    let mut p = Proposal::default();
    p.create_stream_with("kept", retention).append("kept", 0, records(0..2));
    // A replay of the creation changes nothing, not even a retention asked for anew.
    let mut again = Proposal::default();
    again.create_stream_with("kept", Retention::default());
    a.apply(vec![entry(1, p), entry(2, again)]).await.unwrap();
    assert_eq!(Retention::of(streams.info("kept").unwrap().config), retention);

    let snap = a.build_snapshot().await.unwrap();
    let (mut b, streams) = to.machine().await;
    b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    let info = streams.info("kept").unwrap();
    assert_eq!(Retention::of(info.config), retention);
    assert_eq!(contents(&streams, "kept").await, (0, records(0..2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_writers_close_and_appends_reopen_them() {
    let place = Place::new();
    let (mut m, streams) = place.machine().await;
    let mut p = Proposal::default();
    p.create_stream("a").create_stream("b").append("a", 0, records(0..2)).append(
        "b",
        0,
        records(0..1),
    );
    m.apply(vec![entry(1, p)]).await.unwrap();
    assert_eq!(m.close_idle_writers(Duration::from_secs(3600)).await, 0, "both were just used");
    assert_eq!(m.close_idle_writers(Duration::ZERO).await, 2);
    assert_eq!(m.close_idle_writers(Duration::ZERO).await, 0);
    let mut p = Proposal::default();
    p.append("a", 2, records(2..4));
    m.apply(vec![entry(2, p)]).await.unwrap();
    assert_eq!(contents(&streams, "a").await, (0, records(0..4)));
    assert_eq!(contents(&streams, "b").await, (0, records(0..1)));
    assert_eq!(m.close_idle_writers(Duration::ZERO).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_a_stream_store_refuses_stream_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(dir.path().join("db"), timber_kv::Options::default()).unwrap());
    let mut m = KvMachine::open(db, None, dir.path().join("machine")).unwrap();
    let mut p = Proposal::default();
    p.create_stream("s");
    assert!(m.apply(vec![entry(1, p)]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_replicate_streams_and_a_member_behind_gets_them_in_a_snapshot() {
    let mut listeners = Vec::new();
    let mut cluster = BTreeMap::new();
    for id in 1..=3u64 {
        let l = common::listener().await;
        cluster.insert(id, l.local_addr().unwrap().to_string());
        listeners.push(l);
    }
    let places: Vec<Place> = (0..3).map(|_| Place::new()).collect();
    let config = |id: u64, streams: Streams| {
        let dir = places[id as usize - 1].dir.path().join("raft");
        let mut c = MemberConfig::new(id, cluster[&id].parse().unwrap(), dir);
        c.initial_cluster = cluster.clone();
        c.snapshot_every = 10;
        c.keep_after_snapshot = 0;
        c.streams = Some(streams);
        c
    };
    let places = &places;
    let open = |id: u64| async move {
        let p = places[id as usize - 1].dir.path();
        let db = Arc::new(Db::open(p.join("db"), timber_kv::Options::default()).unwrap());
        let streams = Streams::open(p.join("streams"), Default::default()).await.unwrap();
        (db, streams)
    };
    let mut members = BTreeMap::new();
    let mut stores = BTreeMap::new();
    for (id, l) in (1..=3u64).zip(listeners) {
        let (db, streams) = open(id).await;
        stores.insert(id, streams.clone());
        members.insert(id, Member::start_on(l, config(id, streams), db).await.unwrap());
    }
    let l = common::agreed_leader(members.values().map(|m| m.raft()), WAIT).await;
    let mut p = Proposal::default();
    p.create_stream("s");
    members[&l].propose(p, WAIT).await.unwrap();
    let behind = *members.keys().find(|&&id| id != l).unwrap();
    for i in 0..5u32 {
        let mut p = Proposal::default();
        p.append("s", u64::from(i), records(i..i + 1));
        members[&l].propose(p, WAIT).await.unwrap();
    }
    let last = members[&l].metrics().last_log_index;
    for m in members.values() {
        m.raft().wait(Some(WAIT)).applied_index_at_least(last, "applied").await.unwrap();
    }
    for s in stores.values() {
        assert_eq!(contents(s, "s").await, (0, records(0..5)));
    }

    members.remove(&behind).unwrap().shutdown().await;
    drop(stores.remove(&behind));
    for i in 5..40u32 {
        let mut p = Proposal::default();
        p.append("s", u64::from(i), records(i..i + 1));
        members[&l].propose(p, WAIT).await.unwrap();
    }
    let mut p = Proposal::default();
    p.truncate_stream("s", 30).create_stream("t").append("t", 0, records(0..2));
    members[&l].propose(p, WAIT).await.unwrap();
    members[&l]
        .raft()
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index > 10), "leader purged its log")
        .await
        .unwrap();

    let (db, streams) = open(behind).await;
    let l2 = TcpListener::bind(&cluster[&behind]).await.unwrap();
    members
        .insert(behind, Member::start_on(l2, config(behind, streams.clone()), db).await.unwrap());
    let last = members[&l].metrics().last_log_index;
    members[&behind]
        .raft()
        .wait(Some(WAIT))
        .applied_index_at_least(last, "caught up")
        .await
        .unwrap();
    assert_eq!(members[&behind].machine().snapshot_stats().installed, 1);
    assert_eq!(contents(&streams, "s").await, (30, records(30..40)));
    assert_eq!(contents(&streams, "t").await, (0, records(0..2)));
    for (_, m) in members {
        m.shutdown().await;
    }
}
