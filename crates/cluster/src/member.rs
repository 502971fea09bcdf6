//! `Member`: one running member of a timber cluster — its Raft (log on disk, [`KvMachine`] on
//! the engine it is given), the gRPC endpoint the other members call, and what the server asks
//! of it: propose a write, wait for a linearizable read, say who leads.
//!
//! A cluster is formed as etcd forms one: every member starts with the same initial membership;
//! on a first start (an empty log) the member of the lowest id asks openraft to initialize with
//! it (which stands for election), the others only later, one after the other, in case it is
//! not up (a member that received the membership from a leader meanwhile does nothing); later
//! starts ignore it. Every call that needs a quorum is bounded by a deadline and fails with
//! [`Error::Unavailable`] when none answers in time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, LogId, Raft, RaftMetrics, SnapshotPolicy};
use timber_kv::Db;
use timber_wal::SyncMode;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::forward::{self, Executor};
use crate::log_store::LogStore;
use crate::machine::KvMachine;
use crate::membership::{self, Change, Control, Route};
use crate::network::{Network, RaftService};
use crate::proposals::Proposals;
use crate::read_index::ReadIndex;
use crate::types::{Proposal, TypeConfig};

/// How a member is started.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    /// This member's id (not 0), unique in the cluster.
    pub id: u64,
    /// Where the Raft endpoint listens.
    pub listen: SocketAddr,
    /// The initial membership, id → Raft address, used only on the first start (empty log).
    /// Empty: the member waits to be added by a running cluster.
    pub initial_cluster: BTreeMap<u64, String>,
    /// Directory of the Raft log, its state and the current snapshot.
    pub dir: PathBuf,
    /// `Always`: an entry counts as stored on this member once fsynced; `Interval`: once it is
    /// in the OS (a power loss of a majority may then lose acknowledged writes).
    pub sync: SyncMode,
    /// Heartbeat period (also the deadline of one replication call).
    pub heartbeat: Duration,
    /// Election timeouts are drawn from this range.
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot after this many applied entries, and purge the log before it.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for followers slightly behind.
    pub keep_after_snapshot: u64,
    /// The stream store the stream writes of proposals go to; `None`: they are refused (a
    /// member that replicates keys only).
    pub streams: Option<timber_stream::Streams>,
}

impl MemberConfig {
    /// Defaults: heartbeat 50 ms, elections 150–300 ms, fsync per entry, snapshots every
    /// 10,000 entries keeping 1,000.
    pub fn new(id: u64, listen: SocketAddr, dir: impl Into<PathBuf>) -> MemberConfig {
        MemberConfig {
            id,
            listen,
            initial_cluster: BTreeMap::new(),
            dir: dir.into(),
            sync: SyncMode::Always,
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(150), Duration::from_millis(300)),
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            streams: None,
        }
    }

    fn raft_config(&self) -> Result<openraft::Config> {
        let ms = |d: Duration| d.as_millis() as u64;
        openraft::Config {
            cluster_name: "timber".into(),
            heartbeat_interval: ms(self.heartbeat),
            election_timeout_min: ms(self.election_timeout.0),
            election_timeout_max: ms(self.election_timeout.1),
            install_snapshot_timeout: ms(self.heartbeat).max(1000),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            // Entries carry up to a MiB of merged writes (`crate::proposals`): an AppendEntries
            // to a member catching up stays within a few tens of MiB.
            max_payload_entries: 16,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Config(e.to_string()))
    }
}

/// Forms the cluster of `nodes` from this member: nothing if its log is not empty (a later
/// start, or the membership received from a leader).
async fn initialize(
    raft: &Raft<TypeConfig>,
    nodes: BTreeMap<u64, BasicNode>,
) -> std::result::Result<(), RaftError<u64, InitializeError<u64, BasicNode>>> {
    match raft.initialize(nodes).await {
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        r => r,
    }
}

/// A running member. Dropping it without [`Member::shutdown`] leaves its tasks running until the
/// runtime stops.
pub struct Member {
    id: u64,
    raft: Raft<TypeConfig>,
    machine: KvMachine,
    server: parking_lot::Mutex<Option<(JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>>,
    addr: SocketAddr,
    executor: forward::Slot,
    control: Control,
    read_index: ReadIndex,
    proposals: Proposals,
    /// The Raft address the others reach this member at.
    advertised: String,
    /// This member's log (shared with Raft): for the commit index.
    log: LogStore<TypeConfig>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("id", &self.id).field("addr", &self.addr).finish()
    }
}

impl Member {
    /// Starts the member on `db`: opens its log, binds its Raft endpoint, and on a first start
    /// with an initial membership forms the cluster.
    pub async fn start(config: MemberConfig, db: Arc<Db>) -> Result<Member> {
        if config.id == 0 {
            return Err(Error::Config("member ids start at 1".into()));
        }
        if !config.initial_cluster.is_empty() && !config.initial_cluster.contains_key(&config.id) {
            return Err(Error::Config(format!(
                "member {} is not in the initial cluster {:?}",
                config.id, config.initial_cluster
            )));
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::io("bind raft endpoint", config.listen.to_string(), e))?;
        Member::start_on(listener, config, db).await
    }

    /// As [`Member::start`], on a listener bound already (`config.listen` is not used).
    pub async fn start_on(
        listener: TcpListener,
        config: MemberConfig,
        db: Arc<Db>,
    ) -> Result<Member> {
        if config.id == 0 {
            return Err(Error::Config("member ids start at 1".into()));
        }
        let raft_config = Arc::new(config.raft_config()?);
        let log = LogStore::<TypeConfig>::open(&config.dir, config.sync)?;
        let machine = KvMachine::open(db, config.streams.clone(), config.dir.join("machine"))?;
        let addr = listener.local_addr().map_err(|e| Error::io("local address", "", e))?;
        // Connections to the others leave from the address this member listens on, when it
        // listens on one address (not on all of them).
        let source = Some(addr.ip()).filter(|ip| !ip.is_unspecified());
        let network =
            Network::new(config.heartbeat.max(Duration::from_millis(100)) * 4).from_address(source);
        let raft = Raft::new(config.id, raft_config, network.clone(), log.clone(), machine.clone())
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        let svc = RaftService::server(raft.clone());
        let executor: forward::Slot = Default::default();
        let forward_svc = forward::server(executor.clone());
        let control = Control {
            id: config.id,
            raft: raft.clone(),
            network,
            closed: Default::default(),
            gate: Default::default(),
        };
        let membership_svc = membership::server(control.clone(), config.heartbeat * 40);
        // Replies are small frames written one after another: without TCP_NODELAY a frame
        // waits for the ACK of the one before it (Nagle's algorithm against delayed ACKs).
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |conn| {
                conn.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            },
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            // A graceful stop closes the connections too: a peer's channel must not stay on a
            // connection whose Raft is gone, or it never reconnects to this member's next life.
            let served = tonic::transport::Server::builder()
                .add_service(svc)
                .add_service(forward_svc)
                .add_service(membership_svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                });
            if let Err(e) = served.await {
                tracing::error!("raft endpoint stopped: {e}");
            }
        });
        let server = parking_lot::Mutex::new(Some((server, stop)));
        let advertised = if config.listen.port() == 0 { addr } else { config.listen }.to_string();
        let read_index = ReadIndex::new(raft.clone(), control.gate.clone());
        let proposals = Proposals::new(raft.clone(), control.gate.clone());
        let member = Member {
            id: config.id,
            raft,
            machine,
            server,
            addr,
            executor,
            control,
            read_index,
            proposals,
            advertised,
            log,
        };
        if !config.initial_cluster.is_empty() {
            let nodes: BTreeMap<u64, BasicNode> = config
                .initial_cluster
                .iter()
                .map(|(id, a)| (*id, BasicNode::new(a.clone())))
                .collect();
            // openraft's initialize stands for election at once. Members started together
            // would all stand in the first term, and openraft ranks two candidates of one term
            // by id: a later one unseats a leader already elected and forces another election
            // (a leader lost for an election timeout just after the cluster formed). So the
            // first member initializes now and each other one only `rank` double election
            // timeouts later, which finds its log holding the membership the leader sent when
            // the members before it are up.
            let rank = config.initial_cluster.range(..config.id).count() as u32;
            if rank == 0 {
                if let Err(e) = initialize(&member.raft, nodes).await {
                    member.shutdown().await;
                    return Err(Error::Raft(e.to_string()));
                }
            } else {
                let raft = member.raft.clone();
                let delay = config.election_timeout.1 * 2 * rank;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    match initialize(&raft, nodes).await {
                        // Shut down meanwhile.
                        Ok(()) | Err(RaftError::Fatal(_)) => {}
                        Err(e) => tracing::warn!(error = %e, "forming the cluster failed"),
                    }
                });
            }
        }
        Ok(member)
    }

    /// This member's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The address the Raft endpoint listens on.
    pub fn raft_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Raft address the others reach this member at (what it joins a cluster with).
    pub fn advertised_addr(&self) -> &str {
        &self.advertised
    }

    /// The state machine (and through it the engine every member applies to).
    pub fn machine(&self) -> &KvMachine {
        &self.machine
    }

    /// Raft's view of this member: role, term, leader, log and applied indexes, replication.
    pub fn metrics(&self) -> RaftMetrics<u64, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// Index of the last entry this member knows committed (a majority stored it).
    pub fn committed_index(&self) -> Option<u64> {
        self.log.committed().map(|l| l.index)
    }

    /// The openraft handle, for membership changes and what this API does not cover.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Replicates `proposal` and returns once a majority stored it and this member applied it.
    /// Fails with [`Error::NotLeader`] on a member that does not lead, and with
    /// [`Error::Unavailable`] when no quorum commits it within `timeout` (it may still commit),
    /// and with [`Error::Conflict`] when a guarded op of it found a key changed (its writes
    /// were not applied; the proposal's other ops were).
    pub async fn propose(&self, proposal: Proposal, timeout: Duration) -> Result<LogId<u64>> {
        proposal.check()?;
        proposal.check_size()?;
        let written = self.proposals.propose(proposal, timeout).await?;
        if written.guards.contains(&false) {
            return Err(Error::Conflict);
        }
        Ok(written.log_id)
    }

    /// Returns once every proposal this member handed to Raft before the call is in its log
    /// and applied here, or never will be (an empty entry appended behind them, and applied).
    /// Its log id.
    pub async fn barrier(&self, timeout: Duration) -> Result<LogId<u64>> {
        self.proposals.barrier(timeout).await
    }

    /// Returns once this member, as leader, has confirmed its leadership with a quorum and
    /// applied everything committed before the call: a read of the engine after it is
    /// linearizable.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<()> {
        self.read_index.wait(timeout).await
    }

    /// Adds a member as a learner: it receives the log (or a snapshot) but does not vote.
    /// Returns once it caught up with the leader's log at the call. Leader only.
    pub async fn add_learner(&self, id: u64, raft_addr: String, timeout: Duration) -> Result<()> {
        self.control.run(Change::AddLearner { id, raft_addr }, timeout).await
    }

    /// Makes a learner a voter (joint consensus: two entries). Leader only.
    pub async fn promote(&self, id: u64, timeout: Duration) -> Result<()> {
        self.control.run(Change::Promote(id), timeout).await
    }

    /// Removes a member from the cluster: no longer a voter nor a learner. Leader only.
    pub async fn remove(&self, id: u64, timeout: Duration) -> Result<()> {
        self.control.run(Change::Remove(id), timeout).await
    }

    /// Runs a membership change on the leader, wherever this member stands: passed to the
    /// leader (waiting up to `timeout` for one) when this member does not lead.
    pub async fn change_membership(&self, change: Change, timeout: Duration) -> Result<()> {
        self.control.change(change, timeout).await
    }

    /// Asks the member whose Raft endpoint is at `via` to add this one as a learner (it passes
    /// the request to the leader). For a member started without an initial membership.
    pub async fn join(&self, via: &str, timeout: Duration) -> Result<()> {
        let change = Change::AddLearner { id: self.id, raft_addr: self.advertised.clone() };
        let channel = self.control.network.channel(via).map_err(Error::Unavailable)?;
        membership::ask(channel, via, &change, timeout).await
    }

    /// Sets how this member runs commands the others forward to it (once; later calls are
    /// ignored). Until then forwarded commands are refused as unavailable.
    pub fn set_executor(&self, executor: Executor) {
        let _ = self.executor.set(executor);
    }

    /// Passes a client's command to the leader and returns its encoded reply. While no leader
    /// is known (an election, or a member that just started), waits for one up to `timeout`,
    /// then fails with `Unavailable`; if this member turns out to lead, runs the command here.
    pub async fn forward(
        &self,
        protocol: u32,
        args: Vec<bytes::Bytes>,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        match self.control.route(timeout).await? {
            Route::Here => match self.executor.get() {
                Some(run) => Ok(run(protocol, args).await),
                None => Err(Error::Unavailable("this member does not run commands yet".into())),
            },
            Route::Leader { addr, channel } => {
                forward::send(channel, &addr, protocol, args, timeout).await
            }
        }
    }

    /// While `closed`, this member (as leader) adds no member: its engine holds data its log
    /// does not, until [`Member::compact`] puts it in a snapshot.
    pub fn close_membership(&self, closed: bool) {
        self.control.closed.store(closed, std::sync::atomic::Ordering::Release);
    }

    /// Builds a snapshot of everything applied and purges the log up to it: from then on a
    /// member that joins catches up from the snapshot. How a cluster seeded with data outside
    /// its log (a restored backup) hands that data to the members that join it.
    pub async fn compact(&self, timeout: Duration) -> Result<()> {
        let applied = self.metrics().last_applied;
        let Some(applied) = applied else { return Ok(()) };
        let fatal = |e: openraft::error::Fatal<u64>| Error::Raft(e.to_string());
        self.raft.trigger().snapshot().await.map_err(fatal)?;
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= applied.index), "a snapshot")
            .await
            .map_err(|e| Error::Unavailable(format!("no snapshot within the timeout: {e}")))?;
        self.raft.trigger().purge_log(applied.index).await.map_err(fatal)?;
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= applied.index), "a purge")
            .await
            .map_err(|e| Error::Unavailable(format!("no purge within the timeout: {e}")))?;
        Ok(())
    }

    /// Stops Raft and the endpoint (the second call does nothing).
    pub async fn shutdown(&self) {
        let Some((mut server, stop)) = self.server.lock().take() else { return };
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        // No apply runs any more: seal the streams' open segments.
        self.machine.close_writers().await;
        let _ = stop.send(());
        if tokio::time::timeout(Duration::from_secs(2), &mut server).await.is_err() {
            server.abort();
        }
    }
}
