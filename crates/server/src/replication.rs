//! `Replication`: timberd as a member of a Raft cluster (`--node-id`, `--raft-addr`,
//! `--initial-cluster`). Every keyspace write becomes a proposal of the leader
//! ([`timber_cluster::Member`]); the members apply committed proposals to their engines.
//!
//! Raft runs on a runtime of its own, so that a connection task waiting for a proposal (the
//! keyspace's write path is synchronous, and a read-modify-write holds its keys' locks until
//! its write is applied) never keeps Raft from running; a write waits at most the configured
//! timeout for a quorum.

use std::sync::Arc;
use std::time::Duration;

use timber_cluster::{Member, MemberConfig, Proposal};
use timber_kv::{Db, WriteBatch};
use timber_wal::SyncMode;

use crate::config::{Cluster, Sync};
use crate::keyspace::Error;

/// The proposal of a batch's writes: strings are stamped with their revision on apply.
pub(crate) fn proposal_of(batch: &WriteBatch) -> Proposal {
    let mut p = Proposal::default();
    for (key, value) in batch.iter() {
        match value {
            Some(v) => match crate::keyspace::revision_slot(key, v) {
                // A value's length is bounded far below 4 GiB, and so is the slot.
                Some(at) => p.put_revised(key, v, at as u32),
                None => p.put(key, v),
            },
            None => p.delete(key),
        };
    }
    p
}

/// Runs `f`, which blocks: on a worker of a multi-thread runtime, after handing the worker's
/// other tasks to another thread (a server in a cluster always runs on one, see
/// [`crate::runtime`]); elsewhere (a blocking thread, a test's runtime) in place.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// In the data directory while a restored keyspace is not yet in the cluster's snapshot.
pub(crate) const SEED_MARKER: &str = "restored-not-replicated";

/// Engine keys of the members' RESP addresses (`host:port`), each followed by the member's id
/// (`u64` BE): written through the log by the member itself when it leads, so that every
/// member can name the leader's RESP address (`INFO`'s `master_host` and `master_port`). Not
/// part of a backup (a restored cluster's members announce themselves again).
pub(crate) const RESP_ADDR_PREFIX: &[u8] = b"\x00member/resp/";

/// The key of member `id`'s RESP address.
pub(crate) fn resp_addr_key(id: u64) -> Vec<u8> {
    [RESP_ADDR_PREFIX, &id.to_be_bytes()].concat()
}

/// A running member and the runtime it runs on.
pub(crate) struct Replication {
    /// Taken by `shutdown` (a runtime may not be dropped on an async task). Callers that poll
    /// a proposal on their own thread hold it shared meanwhile ([`Replication::wait`]): the
    /// runtime's timers must outlive them.
    runtime: parking_lot::RwLock<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    member: Arc<Member>,
    /// The engine the member applies to.
    db: Arc<Db>,
    timeout: Duration,
    /// Changes of leader this member has seen (elections that ended with a leader).
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
    /// Terms this member entered (each began with an election).
    elections: Arc<std::sync::atomic::AtomicU64>,
    /// The term and log index a write evaluated here must see applied (in that term): the end
    /// of the log when a proposal failed (it may still commit, and its caller no longer holds
    /// its keys). In a later term, an applied entry of that term settles it.
    unsettled: Arc<parking_lot::Mutex<(u64, u64)>>,
    /// Barriers under way after failed proposals (see [`Replication::proposal`]): writes are
    /// evaluated only once there are none.
    settling: Arc<tokio::sync::watch::Sender<u64>>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication").field("member", &self.member).finish_non_exhaustive()
    }
}

/// The reply of a single-key command run on the leader ([`Replication::on_leader`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Ok,
    Nil,
    Bulk(bytes::Bytes),
    Int(i64),
    /// An error reply other than the leader's refusals (e.g. `WRONGTYPE ...`).
    Error(String),
}

impl Answer {
    /// Decodes a RESP2 reply of one of the kinds above. `READONLY` and `CLUSTERDOWN` replies
    /// (the leader stopped leading, or lost its quorum) become the retryable errors.
    fn decode(reply: &[u8]) -> Result<Answer, Error> {
        let bad = || Error::ClusterDown(format!("unexpected reply from the leader: {reply:?}"));
        let (kind, rest) = reply.split_first().ok_or_else(bad)?;
        let line = rest.strip_suffix(b"\r\n").ok_or_else(bad)?;
        let text = || String::from_utf8_lossy(line).into_owned();
        match kind {
            b'+' => Ok(Answer::Ok),
            b'-' if line.starts_with(b"READONLY") || line.starts_with(b"CLUSTERDOWN") => {
                Err(Error::ClusterDown(text()))
            }
            b'-' => Ok(Answer::Error(text())),
            b':' => text().parse().map(Answer::Int).map_err(|_| bad()),
            b'$' if line == b"-1" => Ok(Answer::Nil),
            b'$' => {
                let at = line.iter().position(|&c| c == b'\r').ok_or_else(bad)?;
                let len: usize = std::str::from_utf8(line.get(..at).ok_or_else(bad)?)
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(bad)?;
                let data = line.get(at + 2..).filter(|d| d.len() == len).ok_or_else(bad)?;
                Ok(Answer::Bulk(bytes::Bytes::copy_from_slice(data)))
            }
            _ => Err(bad()),
        }
    }
}

/// A change of the cluster's membership.
#[derive(Debug, Clone)]
pub(crate) enum MembershipChange {
    AddLearner { id: u64, raft_addr: String },
    Promote(u64),
    Remove(u64),
    TransferLeader(u64),
}

/// A member's role and progress, as `INFO replication` and `/metrics` report them.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub(crate) id: u64,
    pub(crate) leader: bool,
    /// "leader", "follower", "candidate" or "learner".
    pub(crate) role: &'static str,
    pub(crate) leader_id: Option<u64>,
    pub(crate) leader_addr: Option<String>,
    pub(crate) term: u64,
    pub(crate) last_log_index: Option<u64>,
    /// Index of the last entry this member knows committed.
    pub(crate) committed_index: Option<u64>,
    pub(crate) applied_index: Option<u64>,
    /// The voters and learners, id → Raft address.
    pub(crate) members: Vec<(u64, String)>,
    /// Of `members`, those that do not vote.
    pub(crate) learners: Vec<u64>,
    /// Index of the last snapshot, and of the last purged entry.
    pub(crate) snapshot_index: Option<u64>,
    pub(crate) purged_index: Option<u64>,
    /// On the leader: each other member's entries behind the leader's last one.
    pub(crate) lag: Vec<(u64, u64)>,
    /// Changes of leader seen since start.
    pub(crate) leader_changes: u64,
    /// Elections this member saw start (terms it entered) since it started.
    pub(crate) elections: u64,
    /// Snapshots built and installed here.
    pub(crate) snapshots: timber_cluster::SnapshotStats,
}

impl Status {
    /// Ready to serve: a leader is known, and this member has applied all but a few of the
    /// entries it holds.
    pub(crate) fn ready(&self) -> Result<(), String> {
        if self.leader_id.is_none() {
            return Err("no leader known".into());
        }
        let behind =
            self.last_log_index.unwrap_or(0).saturating_sub(self.applied_index.unwrap_or(0));
        if behind > READY_LAG {
            return Err(format!("{behind} entries not applied yet"));
        }
        Ok(())
    }
}

/// `/readyz` fails while more entries than this wait to be applied.
const READY_LAG: u64 = 1000;

impl Replication {
    /// Starts the member on `db`, with its Raft state under `dir`.
    /// `seeded`: the engine holds a restored backup the cluster has not taken in yet (this
    /// member forms a cluster of its own, and a snapshot will hand the data to the members
    /// that join); the marker file is removed once the snapshot holds it.
    pub(crate) async fn start(
        cluster: &Cluster,
        sync: Sync,
        db: Arc<Db>,
        streams: timber_stream::Streams,
        dir: std::path::PathBuf,
        seeded: Option<std::path::PathBuf>,
        secret: Option<String>,
    ) -> anyhow::Result<Replication> {
        // A member's engine holds only what the cluster applied: data written before it joined
        // would exist on this member alone.
        let streams_held = streams.list().map(|l| !l.is_empty()).unwrap_or(true);
        if seeded.is_none() && !dir.exists() && (db.iter().next().is_some() || streams_held) {
            anyhow::bail!(
                "{} holds data written outside the cluster: a new member starts from an empty \
                 data directory",
                db.path().display()
            );
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("timber-raft")
            .enable_all()
            .build()?;
        let mut config = MemberConfig::new(cluster.node_id, cluster.raft_addr, dir);
        config.initial_cluster = cluster.initial.clone();
        config.sync = match sync {
            Sync::Always => SyncMode::Always,
            Sync::Interval(d) => SyncMode::Interval(d),
            Sync::Manual => SyncMode::Manual,
        };
        config.heartbeat = cluster.heartbeat;
        config.streams = Some(streams);
        config.election_timeout = cluster.election;
        config.snapshot_every = cluster.snapshot_entries;
        config.keep_after_snapshot = (cluster.snapshot_entries / 10).min(1000);
        // A runtime may not be dropped on an async task: on failure it is shut down in the
        // background.
        let member = match runtime.spawn(Member::start(config, db.clone())).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                runtime.shutdown_background();
                return Err(e.into());
            }
            Err(e) => {
                runtime.shutdown_background();
                return Err(e.into());
            }
        };
        let member = Arc::new(member);
        if let Some(via) = cluster.join.clone() {
            runtime.spawn(join(member.clone(), via, cluster.timeout, secret));
        }
        if let Some(marker) = seeded {
            member.close_membership(true);
            runtime.spawn(take_in(member.clone(), cluster.timeout, marker));
        }
        let leader_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let elections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        runtime.spawn(log_leadership(member.clone(), leader_changes.clone(), elections.clone()));
        let handle = runtime.handle().clone();
        let runtime = parking_lot::RwLock::new(Some(runtime));
        Ok(Replication {
            runtime,
            handle,
            member,
            db,
            timeout: cluster.timeout,
            leader_changes,
            elections,
            unsettled: Default::default(),
            settling: Arc::new(tokio::sync::watch::channel(0).0),
        })
    }

    /// Runs `f` in the Raft runtime's context and waits for it, blocking the calling thread
    /// (a worker of the server's runtime hands its other connections to another thread
    /// meanwhile, so that many connections can wait for proposals at once, and openraft
    /// batches them). Off any runtime, or in a worker handed over, the calling thread polls
    /// `f` itself: a proposal's reply then wakes it directly, without a hop through a task of
    /// the Raft runtime. On a current-thread runtime (tests), which may not block on another
    /// runtime, `f` runs as a task of the Raft runtime.
    fn wait<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = timber_cluster::Result<T>> + Send + 'static,
    ) -> Result<T, Error> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let in_place = match Handle::try_current() {
            Err(_) => true,
            Ok(h) => h.runtime_flavor() == RuntimeFlavor::MultiThread,
        };
        if in_place {
            // A runtime shut down would fail the proposal's timers: held until done.
            let Some(_running) = self.runtime.try_read().filter(|rt| rt.is_some()) else {
                return Err(Error::ClusterDown("the member stopped".into()));
            };
            let handle = &self.handle;
            return blocking(|| handle.block_on(f)).map_err(cluster_error);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        match rx.recv() {
            Ok(r) => r.map_err(cluster_error),
            Err(_) => Err(Error::ClusterDown("the member stopped".into())),
        }
    }

    /// Replicates the writes of `batch` and returns once they are committed and applied here.
    pub(crate) fn commit(&self, batch: &WriteBatch) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        self.commit_proposal(proposal_of(batch))
    }

    /// [`Replication::commit`] of writes that apply only if every key of `expect` still holds
    /// the bytes it holds here now, and every range of `ranges` the pairs it has (see
    /// [`timber_cluster::Op::Guarded`]); a change fails it with a conflict.
    pub(crate) fn commit_guarded(
        &self,
        batch: &WriteBatch,
        expect: Vec<timber_cluster::Expect>,
        ranges: Vec<timber_cluster::ExpectRange>,
    ) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut p = Proposal::default();
        p.guarded(expect, ranges, proposal_of(batch));
        self.commit_proposal(p)
    }

    /// Replicates `p` (key and stream writes) and returns once it is committed and applied
    /// here, blocking the calling thread.
    pub(crate) fn commit_proposal(&self, p: Proposal) -> Result<(), Error> {
        self.wait(self.proposal(p))
    }

    /// [`Replication::commit_proposal`] for async callers.
    pub(crate) async fn propose(&self, p: Proposal) -> Result<(), Error> {
        if p.is_empty() {
            return Ok(());
        }
        self.on_raft(self.proposal(p)).await
    }

    /// Runs `f` as a task of Raft's runtime (whose workers never block on a key's lock).
    pub(crate) fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }

    /// [`Replication::propose`] polled by the caller's task, which must run on Raft's runtime
    /// ([`Replication::spawn`]): the write queue's tasks start where it is polled.
    pub(crate) async fn propose_here(&self, p: Proposal) -> Result<(), Error> {
        if p.is_empty() {
            return Ok(());
        }
        self.proposal(p).await.map_err(cluster_error)
    }

    /// Proposes `p` and waits until it is applied here, as a future for the Raft runtime.
    ///
    /// A failed proposal may still commit, and its caller no longer holds its keys: an
    /// evaluation that did not see it could propose a stale write (an append at an id it took,
    /// a second SET NX). So a failure (recorded on the Raft runtime, even if the caller stopped
    /// waiting) starts a barrier: an empty entry appended behind every proposal handed to Raft
    /// so far; until it is applied, and then until this member applied up to it, writes
    /// evaluated here wait ([`Replication::fresh`]). A barrier that fails too leaves the end
    /// of the log as the Raft metrics show it.
    fn proposal(
        &self,
        p: Proposal,
    ) -> impl std::future::Future<Output = timber_cluster::Result<()>> + Send + 'static {
        let (member, timeout) = (self.member.clone(), self.timeout);
        let (unsettled, settling) = (self.unsettled.clone(), self.settling.clone());
        async move {
            let r = member.propose(p, timeout).await.map(|_| ());
            // A refused guard was applied (as nothing): its outcome is settled already.
            if r.as_ref().is_err_and(|e| !matches!(e, timber_cluster::Error::Conflict)) {
                settling.send_modify(|n| *n += 1);
                tokio::spawn(async move {
                    let at = match member.barrier(timeout).await {
                        Ok(id) => (id.leader_id.term, id.index),
                        Err(_) => {
                            let m = member.raft().metrics();
                            let m = m.borrow();
                            (m.current_term, m.last_log_index.unwrap_or(0))
                        }
                    };
                    {
                        let mut u = unsettled.lock();
                        *u = (*u).max(at);
                    }
                    settling.send_modify(|n| *n -= 1);
                });
            }
            r
        }
    }

    /// Runs `f` on the Raft runtime and awaits it (without holding a thread of the caller's).
    async fn on_raft<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = timber_cluster::Result<T>> + Send + 'static,
    ) -> Result<T, Error> {
        match self.handle.spawn(f).await {
            Ok(r) => r.map_err(cluster_error),
            Err(_) => Err(Error::ClusterDown("the member stopped".into())),
        }
    }

    /// Returns once this member may evaluate a write against its engine: it leads, it
    /// applied an entry of its own term, so that every entry committed by an earlier leader
    /// is applied here (a new leader's engine may lag its log), and, after a proposal of its
    /// failed, the barrier behind it is applied ([`Replication::proposal`]). A member that
    /// does not lead returns at once: its proposal will be refused.
    pub(crate) async fn fresh(&self) -> Result<(), Error> {
        if *self.settling.borrow() > 0 {
            let mut settled = self.settling.subscribe();
            let waited = tokio::time::timeout(self.timeout, settled.wait_for(|n| *n == 0)).await;
            if !matches!(waited, Ok(Ok(_))) {
                return Err(Error::ClusterDown("earlier proposals are not settled yet".into()));
            }
        }
        let (term, index) = *self.unsettled.lock();
        self.until("the leader is catching up", move |m| {
            m.current_leader != Some(m.id)
                || m.last_applied.is_some_and(|l| {
                    l.leader_id.term == m.current_term
                        && (term < m.current_term || l.index >= index)
                })
        })
        .await
    }

    /// The index of the last entry this member applied (0 before any).
    pub(crate) fn applied_index(&self) -> u64 {
        self.member.raft().metrics().borrow().last_applied.map_or(0, |l| l.index)
    }

    /// Returns once this member applied the entry at `index`.
    pub(crate) async fn applied_up_to(&self, index: u64) -> Result<(), Error> {
        self.until("this member is behind the leader", move |m| {
            m.last_applied.is_some_and(|l| l.index >= index)
        })
        .await
    }

    /// Returns once the member's metrics satisfy `ready`, or fails as retryable after the
    /// cluster timeout, saying `what` was awaited.
    async fn until(
        &self,
        what: &'static str,
        ready: impl Fn(
                &timber_cluster::openraft::RaftMetrics<u64, timber_cluster::openraft::BasicNode>,
            ) -> bool
            + Send
            + 'static,
    ) -> Result<(), Error> {
        if ready(&self.member.raft().metrics().borrow()) {
            return Ok(());
        }
        let (member, timeout) = (self.member.clone(), self.timeout);
        let waited = self
            .handle
            .spawn(async move { member.raft().wait(Some(timeout)).metrics(ready, what).await });
        match waited.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::ClusterDown(format!("{what}: {e}"))),
            Err(_) => Err(Error::ClusterDown("the member stopped".into())),
        }
    }

    /// Returns once a read of the local engine is linearizable (this member leads, a quorum
    /// confirmed it, and it applied everything committed before the call).
    pub(crate) fn read_barrier(&self) -> Result<(), Error> {
        let (member, timeout) = (self.member.clone(), self.timeout);
        self.wait(async move { member.read_barrier(timeout).await })
    }

    /// [`Replication::read_barrier`] for async callers.
    pub(crate) async fn read_barrier_async(&self) -> Result<(), Error> {
        let (member, timeout) = (self.member.clone(), self.timeout);
        self.on_raft(async move { member.read_barrier(timeout).await }).await
    }

    /// Passes a client's command to the leader; its reply, encoded for `protocol`.
    pub(crate) async fn forward(
        &self,
        protocol: u8,
        args: Vec<bytes::Bytes>,
    ) -> Result<Vec<u8>, Error> {
        self.forward_blocking(protocol, args, None).await
    }

    /// [`Replication::forward`] of a command that may block on the leader for `block` (`Some(None)`:
    /// without limit) beyond the usual timeout.
    pub(crate) async fn forward_blocking(
        &self,
        protocol: u8,
        args: Vec<bytes::Bytes>,
        block: Option<Option<Duration>>,
    ) -> Result<Vec<u8>, Error> {
        // A day stands for "no limit": the call ends sooner if the leader goes.
        let block = match block {
            None => Duration::ZERO,
            Some(b) => b.unwrap_or(Duration::from_secs(86_400)),
        };
        let (member, timeout) = (self.member.clone(), self.timeout + block);
        self.on_raft(async move { member.forward(u32::from(protocol), args, timeout).await }).await
    }

    /// On a member that does not lead, runs the Redis-protocol command `args` on the leader
    /// (as a follower's Redis clients' commands are) and decodes its reply: how the gRPC and
    /// HTTP endpoints of a follower serve single-key reads and writes. `None` on the leader
    /// (or while this member believes it leads), where the caller runs it itself.
    pub(crate) async fn on_leader(&self, args: Vec<bytes::Bytes>) -> Option<Result<Answer, Error>> {
        if self.is_leader() {
            return None;
        }
        Some(self.forward(2, args).await.and_then(|reply| Answer::decode(&reply)))
    }

    /// Runs the commands the other members forward here with `run`, on the runtime of the
    /// caller (the server's, never Raft's: a command may wait for a proposal).
    pub(crate) fn serve_forwarded(
        &self,
        run: impl Fn(u8, Vec<bytes::Bytes>) -> timber_cluster::Reply
            + Send
            + std::marker::Sync
            + 'static,
    ) {
        let server = tokio::runtime::Handle::current();
        let run = Arc::new(run);
        self.member.set_executor(Arc::new(move |protocol, args| {
            let run = run.clone();
            let proto = u8::try_from(protocol).unwrap_or(2);
            let task = server.spawn(async move { run(proto, args).await });
            Box::pin(async move { task.await.unwrap_or_default() })
        }));
    }

    /// Applies a membership change (through the leader).
    pub(crate) async fn change_membership(&self, change: MembershipChange) -> Result<(), Error> {
        let (member, timeout) = (self.member.clone(), self.timeout);
        use timber_cluster::Change;
        let change = match change {
            MembershipChange::AddLearner { id, raft_addr } => Change::AddLearner { id, raft_addr },
            MembershipChange::Promote(id) => Change::Promote(id),
            MembershipChange::Remove(id) => Change::Remove(id),
            MembershipChange::TransferLeader(id) => Change::TransferLeader(id),
        };
        // Any member takes the request; one that does not lead passes it to the leader.
        let call =
            self.handle.spawn(async move { member.change_membership(change, timeout).await });
        match call.await {
            Ok(r) => r.map_err(|e| match e {
                timber_cluster::Error::Config(m) => Error::Refused(m),
                e => cluster_error(e),
            }),
            Err(_) => Err(Error::ClusterDown("the member stopped".into())),
        }
    }

    /// A snapshot of the engine and the figures of every stream at one point between two
    /// applies (see `KvMachine::view`).
    pub(crate) async fn view(
        &self,
    ) -> Result<(timber_kv::Snapshot, Vec<timber_stream::StreamInfo>), Error> {
        let member = self.member.clone();
        self.on_raft(async move { member.machine().view().await }).await
    }

    /// Closes the state machine's stream writers no apply used for `idle`; returns how many.
    pub(crate) async fn close_idle_writers(&self, idle: Duration) -> u64 {
        let member = self.member.clone();
        let closed =
            self.handle.spawn(async move { member.machine().close_idle_writers(idle).await });
        closed.await.unwrap_or(0)
    }

    /// Whether this member leads now (it may learn otherwise at once).
    /// The term this member leads in, if it leads.
    pub(crate) fn leader_term(&self) -> Option<u64> {
        let m = self.member.raft().metrics();
        let m = m.borrow();
        (m.current_leader == Some(m.id)).then_some(m.current_term)
    }

    /// The RESP address member `id` announced, as this member's copy holds it.
    pub(crate) fn resp_addr_of(&self, id: u64) -> Option<String> {
        let v = self.db.get(resp_addr_key(id)).ok().flatten()?;
        String::from_utf8(v.to_vec()).ok()
    }

    /// Keeps `addr`, this member's RESP address as clients reach it, in the cluster's data
    /// (see [`RESP_ADDR_PREFIX`]): in each term it leads, it proposes the address unless its
    /// copy already holds it.
    pub(crate) fn announce_resp_addr(self: &Arc<Self>, addr: String) {
        let (me, member, db) = (Arc::downgrade(self), self.member.clone(), self.db.clone());
        self.handle.spawn(async move {
            let mut rx = member.raft().metrics();
            let key = resp_addr_key(member.id());
            let mut done_in = None;
            loop {
                let term = {
                    let m = rx.borrow_and_update();
                    let leads = m.current_leader == Some(m.id) && m.last_applied.is_some();
                    leads.then_some(m.current_term)
                };
                if term.is_some() && term != done_in {
                    let Some(r) = me.upgrade() else { return };
                    let held = db.get(&key).ok().flatten();
                    if held.as_deref() == Some(addr.as_bytes()) {
                        done_in = term;
                    } else {
                        let mut p = Proposal::default();
                        p.put(key.clone(), addr.clone().into_bytes());
                        match r.propose_here(p).await {
                            Ok(()) => done_in = term,
                            Err(e) => {
                                tracing::debug!(error = %e, "announcing the RESP address failed");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                        }
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    pub(crate) fn is_leader(&self) -> bool {
        let m = self.member.raft().metrics();
        let m = m.borrow();
        m.current_leader == Some(m.id)
    }

    pub(crate) fn status(&self) -> Status {
        let m = self.member.metrics();
        let membership = m.membership_config.membership();
        let members: Vec<(u64, String)> =
            membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        let learners = membership.learner_ids().collect();
        let leader_addr = m
            .current_leader
            .and_then(|l| members.iter().find(|(id, _)| *id == l).map(|(_, a)| a.clone()));
        let last = m.last_log_index.unwrap_or(0);
        let lag = m
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, matched)| (*id, last.saturating_sub(matched.map_or(0, |l| l.index))))
            .collect();
        use timber_cluster::openraft::ServerState;
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        Status {
            role,
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            lag,
            leader_changes: self.leader_changes.load(std::sync::atomic::Ordering::Relaxed),
            elections: self.elections.load(std::sync::atomic::Ordering::Relaxed),
            snapshots: self.member.machine().snapshot_stats(),
            id: m.id,
            leader: m.current_leader == Some(m.id),
            leader_id: m.current_leader,
            leader_addr,
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed_index: self.member.committed_index(),
            applied_index: m.last_applied.map(|l| l.index),
            members,
            learners,
        }
    }

    /// Stops the member, then its runtime; writes fail with CLUSTERDOWN from then on.
    pub(crate) async fn shutdown(&self) {
        let member = self.member.clone();
        let _ = self.handle.spawn(async move { member.shutdown().await }).await;
        // Readers poll proposals until they end (bounded by the timeout): waited for off the
        // worker.
        if let Some(rt) = blocking(|| self.runtime.write().take()) {
            rt.shutdown_background();
        }
    }
}

/// Asks to be added to the cluster through `via` until it works (the member there may not be
/// up yet, or between leaders): retried every timeout, stopped once this member is known.
async fn join(member: Arc<Member>, via: String, timeout: Duration, secret: Option<String>) {
    loop {
        if member.metrics().membership_config.membership().get_node(&member.id()).is_some() {
            return;
        }
        let joined = match member.join(&via, timeout).await {
            // A member's gRPC address: its Admin service adds the learner.
            Err(timber_cluster::Error::NotRaft(_)) => {
                join_through_admin(&member, &via, timeout, secret.as_deref())
                    .await
                    .map_err(|e| format!("through the Admin service at {via}: {e}"))
            }
            r => r.map_err(|e| e.to_string()),
        };
        match joined {
            Ok(()) => {
                tracing::info!(node_id = member.id(), via = %via, "raft: joined as a learner");
                return;
            }
            Err(e) => {
                tracing::warn!(via = %via, error = %e, "raft: join failed; retrying");
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

/// Asks the Admin service at `via` (a member's gRPC address, `--grpc-addr`) to add this member
/// as a learner; it answers once the learner caught up.
async fn join_through_admin(
    member: &Member,
    via: &str,
    timeout: Duration,
    secret: Option<&str>,
) -> Result<(), tonic::Status> {
    use timber_proto::v1::{admin_client::AdminClient, membership_change, AddLearner};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{via}"))
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let change = membership_change::Change::AddLearner(AddLearner {
        id: member.id(),
        raft_addr: member.advertised_addr().to_string(),
    });
    let mut req = tonic::Request::new(timber_proto::v1::MembershipChange { change: Some(change) });
    if let Some(s) = secret {
        let token = format!("Bearer {s}").parse().map_err(|_| {
            tonic::Status::invalid_argument("the auth secret is not a valid header")
        })?;
        req.metadata_mut().insert("authorization", token);
    }
    AdminClient::new(channel).change_membership(req).await.map(|_| ())
}

/// Once the new cluster's only member leads, snapshots the restored data (and the membership)
/// and purges the log, so that members that join receive the data as a snapshot.
async fn take_in(member: Arc<Member>, timeout: Duration, marker: std::path::PathBuf) {
    let id = member.id();
    let led = member
        .raft()
        .wait(None)
        .metrics(|m| m.current_leader == Some(id) && m.last_applied.is_some(), "leads")
        .await;
    if led.is_err() {
        return;
    }
    match member.compact(timeout.max(Duration::from_secs(30))).await {
        Ok(()) => match std::fs::remove_file(&marker) {
            Ok(()) => {
                member.close_membership(false);
                tracing::info!("the restored keyspace is in the cluster's first snapshot")
            }
            Err(e) => tracing::error!(error = %e, marker = %marker.display(), "cannot remove"),
        },
        Err(e) => tracing::error!(
            error = %e,
            "could not snapshot the restored keyspace: members that join will not receive it"
        ),
    }
}

/// Logs each change of leader this member sees (the end-to-end tests wait for these lines).
async fn log_leadership(
    member: Arc<Member>,
    changes: Arc<std::sync::atomic::AtomicU64>,
    elections: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut rx = member.raft().metrics();
    let mut seen = None;
    let mut term = None;
    loop {
        let m = rx.borrow_and_update().clone();
        // The term a member starts in is not an election it saw; every later one is.
        if term.is_some_and(|t| m.current_term > t) {
            elections.fetch_add(
                m.current_term - term.unwrap_or(0),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        term = Some(m.current_term);
        // An election in between (no leader) counts as a change, so that a member that leads
        // again in a later term says so again.
        if m.current_leader != seen {
            seen = m.current_leader;
            if seen.is_some() {
                changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            match seen {
                Some(l) if l == m.id => {
                    tracing::info!(node_id = m.id, term = m.current_term, "raft: this member leads")
                }
                Some(_) => {
                    tracing::info!(node_id = m.id, leader = ?seen, term = m.current_term, "raft: following")
                }
                None => {}
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn cluster_error(e: timber_cluster::Error) -> Error {
    match e {
        timber_cluster::Error::NotLeader { leader_id, leader_addr } => Error::NotLeader {
            leader: match (leader_id, leader_addr) {
                (Some(id), Some(a)) => format!("member {id} (raft {a})"),
                _ => "not known yet".into(),
            },
        },
        timber_cluster::Error::Unavailable(m) => Error::ClusterDown(m),
        e @ timber_cluster::Error::TooLarge { .. } => Error::TooLarge(e.to_string()),
        e @ timber_cluster::Error::Conflict => {
            Error::Kv(timber_kv::Error::Conflict { what: e.to_string() })
        }
        other => Error::ClusterDown(other.to_string()),
    }
}

impl Status {
    /// The Prometheus text of the Raft figures.
    pub(crate) fn prometheus(&self) -> String {
        let idx = |i: Option<u64>| i.map_or(-1, |i| i as i64);
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{value}"));
        };
        gauge(
            "timber_raft_node_id",
            "This member's id.",
            format!("timber_raft_node_id {}\n", self.id),
        );
        gauge("timber_raft_term", "The current term.", format!("timber_raft_term {}\n", self.term));
        gauge(
            "timber_raft_is_leader",
            "1 on the leader, 0 elsewhere.",
            format!("timber_raft_is_leader {}\n", u8::from(self.leader)),
        );
        gauge(
            "timber_raft_leader_id",
            "The leader this member knows (0: none).",
            format!("timber_raft_leader_id {}\n", self.leader_id.unwrap_or(0)),
        );
        gauge(
            "timber_raft_last_log_index",
            "Index of the last entry in this member's log (-1: none).",
            format!("timber_raft_last_log_index {}\n", idx(self.last_log_index)),
        );
        gauge(
            "timber_raft_commit_index",
            "Index of the last entry this member knows committed (-1: none).",
            format!("timber_raft_commit_index {}\n", idx(self.committed_index)),
        );
        gauge(
            "timber_raft_applied_index",
            "Index of the last entry applied to this member's engine (-1: none).",
            format!("timber_raft_applied_index {}\n", idx(self.applied_index)),
        );
        gauge(
            "timber_raft_snapshot_index",
            "Last index in this member's current snapshot (-1: none).",
            format!("timber_raft_snapshot_index {}\n", idx(self.snapshot_index)),
        );
        gauge(
            "timber_raft_purged_index",
            "Last entry purged from this member's log (-1: none).",
            format!("timber_raft_purged_index {}\n", idx(self.purged_index)),
        );
        gauge(
            "timber_raft_members",
            "Members in the configuration.",
            format!("timber_raft_members {}\n", self.members.len()),
        );
        gauge(
            "timber_raft_leader_changes",
            "Changes of leader this member has seen since it started.",
            format!("timber_raft_leader_changes {}\n", self.leader_changes),
        );
        gauge(
            "timber_raft_elections",
            "Count of terms this member's term advanced by since it started (one per election).",
            format!("timber_raft_elections {}\n", self.elections),
        );
        let sn = &self.snapshots;
        gauge(
            "timber_raft_snapshots_built",
            "Snapshots built on this member since it started.",
            format!("timber_raft_snapshots_built {}\n", sn.built),
        );
        gauge(
            "timber_raft_snapshot_built_bytes",
            "Size of the last snapshot built here.",
            format!("timber_raft_snapshot_built_bytes {}\n", sn.last_built_bytes),
        );
        gauge(
            "timber_raft_snapshot_build_seconds",
            "How long the last snapshot build took.",
            format!("timber_raft_snapshot_build_seconds {}\n", sn.last_build.as_secs_f64()),
        );
        gauge(
            "timber_raft_snapshots_installed",
            "Snapshots received from a leader and installed here since it started.",
            format!("timber_raft_snapshots_installed {}\n", sn.installed),
        );
        gauge(
            "timber_raft_snapshot_installed_bytes",
            "Size of the last snapshot installed here.",
            format!("timber_raft_snapshot_installed_bytes {}\n", sn.last_installed_bytes),
        );
        gauge(
            "timber_raft_snapshot_install_seconds",
            "How long the last snapshot install took.",
            format!("timber_raft_snapshot_install_seconds {}\n", sn.last_install.as_secs_f64()),
        );
        let lag: String = self
            .lag
            .iter()
            .map(|(id, n)| format!("timber_raft_follower_lag_entries{{member=\"{id}\"}} {n}\n"))
            .collect();
        gauge(
            "timber_raft_follower_lag_entries",
            "On the leader: entries each other member lacks.",
            lag,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn leader_replies_decode_and_refusals_are_retryable() {
        assert_eq!(Answer::decode(b"+OK\r\n").unwrap(), Answer::Ok);
        assert_eq!(Answer::decode(b":3\r\n").unwrap(), Answer::Int(3));
        assert_eq!(Answer::decode(b"$-1\r\n").unwrap(), Answer::Nil);
        let bulk = Answer::decode(b"$4\r\na\r\nb\r\n").unwrap();
        assert_eq!(bulk, Answer::Bulk(bytes::Bytes::from_static(b"a\r\nb")));
        let e = Answer::decode(b"-WRONGTYPE Operation against a key\r\n").unwrap();
        assert!(matches!(e, Answer::Error(m) if m.starts_with("WRONGTYPE")));
        for refusal in [&b"-READONLY no\r\n"[..], b"-CLUSTERDOWN no quorum\r\n"] {
            assert!(matches!(Answer::decode(refusal), Err(Error::ClusterDown(_))));
        }
        for bad in [&b""[..], b"+OK", b"$5\r\nab\r\n", b"*1\r\n:1\r\n", b":x\r\n"] {
            assert!(Answer::decode(bad).is_err(), "{bad:?}");
        }
    }
}
