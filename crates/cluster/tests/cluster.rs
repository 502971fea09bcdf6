//! Three members on loopback gRPC, each with its log on disk: a leader is elected, writes reach
//! every state machine, a follower refuses writes with the leader's address, the leader's loss
//! elects another that goes on, and the old leader restarted from its directory catches up.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Config, Set, Sm};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft};
use timber_cluster::{LogStore, Network, RaftService};
use timber_wal::SyncMode;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Bound on every wait: elections take 150–300 ms, so this is generous, not a sleep.
const WAIT: Duration = Duration::from_secs(10);

struct Member {
    raft: Raft<Config>,
    sm: Sm,
    server: JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(id: u64, dir: &std::path::Path, listener: TcpListener) -> Member {
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Default::default()
    };
    let log = LogStore::<Config>::open(dir, SyncMode::Always).unwrap();
    let sm = Sm::default();
    let network = Network::new(Duration::from_millis(500));
    let raft = Raft::new(id, Arc::new(config.validate().unwrap()), network, log, sm.clone())
        .await
        .unwrap();
    let svc = RaftService::server(raft.clone());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    Member { raft, sm, server, stop }
}

async fn stop(m: Member) {
    m.raft.shutdown().await.unwrap();
    let _ = m.stop.send(());
    m.server.await.unwrap();
}

async fn leader_among(members: &BTreeMap<u64, Member>) -> u64 {
    common::agreed_leader(members.values().map(|m| &m.raft), WAIT).await
}

async fn write(raft: &Raft<Config>, from: u32, to: u32) {
    for i in from..to {
        raft.client_write(Set { key: format!("k{i:03}"), value: format!("v{i}") }).await.unwrap();
    }
}

async fn converged(members: &BTreeMap<u64, Member>, keys: usize) {
    let leader = &members[&leader_among(members).await].raft;
    let last = leader.metrics().borrow().last_log_index;
    for m in members.values() {
        m.raft.wait(Some(WAIT)).applied_index_at_least(last, "caught up").await.unwrap();
        let data = m.sm.0.lock().await.data.kv.clone();
        assert_eq!(data.len(), keys);
        for (k, v) in data {
            assert_eq!(format!("v{}", k[1..].parse::<u32>().unwrap()), v);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_elect_replicate_fail_over_and_catch_up() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut listeners = Vec::new();
    let mut addrs: BTreeMap<u64, SocketAddr> = BTreeMap::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(id, l.local_addr().unwrap());
        listeners.push(l);
    }
    let mut members = BTreeMap::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        members.insert(id, start(id, dirs[i].path(), l).await);
    }
    let nodes: BTreeMap<u64, BasicNode> =
        addrs.iter().map(|(id, a)| (*id, BasicNode::new(a.to_string()))).collect();
    members[&1].raft.initialize(nodes).await.unwrap();

    let leader = leader_among(&members).await;
    write(&members[&leader].raft, 0, 50).await;
    converged(&members, 50).await;

    // A follower does not write; it names the leader.
    let follower = members.keys().copied().find(|&id| id != leader).unwrap();
    let err = members[&follower]
        .raft
        .client_write(Set { key: "x".into(), value: "y".into() })
        .await
        .unwrap_err();
    match err {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            assert_eq!(f.leader_id, Some(leader));
            assert_eq!(f.leader_node.unwrap().addr, addrs[&leader].to_string());
        }
        other => panic!("expected ForwardToLeader, got {other}"),
    }

    // The leader goes; the two others elect one of them and go on.
    stop(members.remove(&leader).unwrap()).await;
    let second = leader_among(&members).await;
    assert_ne!(second, leader);
    write(&members[&second].raft, 50, 100).await;
    converged(&members, 100).await;

    // The old leader comes back from its directory (an empty state machine: it replays its log
    // and learns the rest from the new leader).
    let l = TcpListener::bind(addrs[&leader]).await.unwrap();
    let idx = (leader - 1) as usize;
    members.insert(leader, start(leader, dirs[idx].path(), l).await);
    converged(&members, 100).await;

    for (_, m) in members {
        stop(m).await;
    }
}
