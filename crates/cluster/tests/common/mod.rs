//! A small in-memory state machine for the tests: a map of strings, snapshotted as JSON.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Set {
    pub key: String,
    pub value: String,
}

openraft::declare_raft_types!(
    pub Config:
        D = Set,
        R = (),
        SnapshotData = Cursor<Vec<u8>>,
);

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Data {
    pub applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, openraft::BasicNode>,
    pub kv: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
pub struct Machine {
    pub data: Data,
    snapshot: Option<(SnapshotMeta<u64, openraft::BasicNode>, Vec<u8>)>,
    built: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Sm(pub Arc<Mutex<Machine>>);

impl RaftSnapshotBuilder<Config> for Sm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<Config>, StorageError<u64>> {
        let mut m = self.0.lock().await;
        m.built += 1;
        let bytes = serde_json::to_vec(&m.data).unwrap();
        let meta = SnapshotMeta {
            last_log_id: m.data.applied,
            last_membership: m.data.membership.clone(),
            snapshot_id: format!("{:?}-{}", m.data.applied, m.built),
        };
        m.snapshot = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<Config> for Sm {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, openraft::BasicNode>), StorageError<u64>>
    {
        let m = self.0.lock().await;
        Ok((m.data.applied, m.data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<Config>> + Send,
        I::IntoIter: Send,
    {
        let mut m = self.0.lock().await;
        let mut out = Vec::new();
        for e in entries {
            m.data.applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(set) => {
                    m.data.kv.insert(set.key, set.value);
                }
                EntryPayload::Membership(mem) => {
                    m.data.membership = StoredMembership::new(Some(e.log_id), mem)
                }
            }
            out.push(());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let mut m = self.0.lock().await;
        m.data = serde_json::from_slice(&bytes).unwrap();
        m.data.applied = meta.last_log_id;
        m.data.membership = meta.last_membership.clone();
        m.snapshot = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<Config>>, StorageError<u64>> {
        let m = self.0.lock().await;
        Ok(m.snapshot
            .clone()
            .map(|(meta, bytes)| Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}

/// The member every given member follows, in one term, and which says it leads: waits for the
/// members' metrics to change until they agree, at most `wait`.
pub async fn agreed_leader<'a, C>(
    rafts: impl Iterator<Item = &'a openraft::Raft<C>>,
    wait: std::time::Duration,
) -> u64
where
    C: openraft::RaftTypeConfig<NodeId = u64>,
{
    let rafts: Vec<_> = rafts.collect();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut rxs: Vec<_> = rafts.iter().map(|r| r.metrics()).collect();
        let views: Vec<_> = rxs.iter_mut().map(|rx| rx.borrow_and_update().clone()).collect();
        if let Some(l) = views.iter().find(|m| m.state == openraft::ServerState::Leader) {
            if views
                .iter()
                .all(|m| m.current_leader == Some(l.id) && m.current_term == l.current_term)
            {
                return l.id;
            }
        }
        let mut changes = tokio::task::JoinSet::new();
        for mut rx in rxs {
            changes.spawn(async move {
                let _ = rx.changed().await;
            });
        }
        if tokio::time::timeout_at(deadline, changes.join_next()).await.is_err() {
            let seen: Vec<_> =
                views.iter().map(|m| (m.id, m.state, m.current_term, m.current_leader)).collect();
            panic!("the members agree on no leader: {seen:?}");
        }
    }
}

/// Entry `index` of term 1 carrying `p`.
pub fn entry(index: u64, p: timber_cluster::Proposal) -> Entry<timber_cluster::TypeConfig> {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(p),
    }
}

/// A state machine over a new engine in `dir`, and the engine.
pub fn open_machine(dir: &std::path::Path) -> (timber_cluster::KvMachine, Arc<timber_kv::Db>) {
    let db = Arc::new(timber_kv::Db::open(dir.join("db"), timber_kv::Options::default()).unwrap());
    (timber_cluster::KvMachine::open(db.clone(), None, dir.join("machine")).unwrap(), db)
}

/// A listener on 127.0.0.1 at a port below the kernel's ephemeral range (32768 and up), from
/// a range that differs per test process: a member restarted on its port binds it again, and
/// a port from the ephemeral range may meanwhile be taken by another test's outgoing
/// connection.
pub async fn listener() -> tokio::net::TcpListener {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id() % 6000;
    for _ in 0..6000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + ((base + n) % 6000) as u16;
        if let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            return l;
        }
    }
    panic!("no free port in 10000..16000");
}
