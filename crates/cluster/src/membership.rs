//! Membership changes asked of any member: the `Membership` service on the Raft endpoint runs
//! one on the leader, or passes it there from a member that does not lead, so that a joining
//! member (or an operator) needs the address of one member only.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, RaftMetrics};

use timber_proto::raft::membership_client::MembershipClient;
use timber_proto::raft::membership_server::{Membership, MembershipServer};
use timber_proto::raft::{MembershipReply, MembershipRequest};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::network::Network;
use crate::types::TypeConfig;

/// A membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Adds a member that receives the log but does not vote.
    AddLearner {
        /// Its id.
        id: u64,
        /// The address of its Raft endpoint.
        raft_addr: String,
    },
    /// Makes a learner a voter.
    Promote(u64),
    /// Removes a member.
    Remove(u64),
    /// Hands the leadership to a voter (see `crate::handover`).
    TransferLeader(u64),
}

/// The request kind that asks a member to call an election at once (the last step of a
/// transfer); never passed on to the leader.
const ELECT: u32 = 5;

impl Change {
    fn to_request(&self) -> MembershipRequest {
        match self {
            Change::AddLearner { id, raft_addr } => {
                MembershipRequest { kind: 1, id: *id, raft_addr: raft_addr.clone() }
            }
            Change::Promote(id) => MembershipRequest { kind: 2, id: *id, raft_addr: String::new() },
            Change::Remove(id) => MembershipRequest { kind: 3, id: *id, raft_addr: String::new() },
            Change::TransferLeader(id) => {
                MembershipRequest { kind: 4, id: *id, raft_addr: String::new() }
            }
        }
    }

    fn from_request(r: MembershipRequest) -> Option<Change> {
        match (r.kind, r.id) {
            (_, 0) => None,
            (1, id) if !r.raft_addr.is_empty() => {
                Some(Change::AddLearner { id, raft_addr: r.raft_addr })
            }
            (2, id) => Some(Change::Promote(id)),
            (3, id) => Some(Change::Remove(id)),
            (4, id) => Some(Change::TransferLeader(id)),
            _ => None,
        }
    }
}

/// What a member needs to run or pass on membership changes.
#[derive(Clone)]
pub(crate) struct Control {
    pub(crate) id: u64,
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) network: Network<TypeConfig>,
    /// While set, no member is added: this member's engine holds data its log does not (a
    /// restored backup) until a snapshot takes it in.
    pub(crate) closed: Arc<std::sync::atomic::AtomicBool>,
    /// Where writes and linearizable reads wait while this member hands its leadership over.
    pub(crate) gate: crate::handover::Gate,
}

/// Where a request for the leader goes from this member.
pub(crate) enum Route {
    /// This member leads.
    Here,
    /// To the leader's Raft endpoint at `addr`.
    Leader { addr: String, channel: tonic::transport::Channel },
}

/// The Raft address of the member `id`, as the membership in `m` knows it.
pub(crate) fn addr_of(m: &RaftMetrics<u64, BasicNode>, id: u64) -> Option<String> {
    m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())
}

impl Control {
    /// Where the leader is, waiting up to `timeout` for one to be known.
    pub(crate) async fn route(&self, timeout: Duration) -> Result<Route> {
        let m = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a known leader")
            .await
            .map_err(|_| {
                Error::Unavailable(format!("no leader known within {} ms", timeout.as_millis()))
            })?;
        let leader = m.current_leader.unwrap_or(self.id);
        if leader == self.id {
            return Ok(Route::Here);
        }
        let Some(addr) = addr_of(&m, leader) else {
            return Err(Error::NotLeader { leader_id: Some(leader), leader_addr: None });
        };
        let channel = self.network.channel(&addr).map_err(Error::Unavailable)?;
        Ok(Route::Leader { addr, channel })
    }

    /// Runs `change` if this member leads, else passes it to the leader (waiting up to
    /// `timeout` for one to be known).
    pub(crate) async fn change(&self, change: Change, timeout: Duration) -> Result<()> {
        match self.route(timeout).await? {
            Route::Here => self.run(change, timeout).await,
            Route::Leader { addr, channel } => ask(channel, &addr, &change, timeout).await,
        }
    }

    /// Runs `change` here, as the leader.
    pub(crate) async fn run(&self, change: Change, timeout: Duration) -> Result<()> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.id) {
            // openraft checks the change before the leadership: a follower would report the
            // membership it knows as the problem.
            let leader_addr = m.current_leader.and_then(|l| addr_of(&m, l));
            return Err(Error::NotLeader { leader_id: m.current_leader, leader_addr });
        }
        match change {
            Change::AddLearner { .. } if self.closed.load(std::sync::atomic::Ordering::Acquire) => {
                Err(Error::Unavailable(
                    "this member is taking in a restored keyspace: members can join once it is \
                     in a snapshot"
                        .into(),
                ))
            }
            Change::AddLearner { id, raft_addr } => {
                let call = self.raft.add_learner(id, BasicNode::new(raft_addr), true);
                bounded(call, timeout).await
            }
            Change::Promote(id) => {
                let change = ChangeMembers::AddVoterIds([id].into_iter().collect());
                bounded(self.raft.change_membership(change, false), timeout).await
            }
            Change::Remove(id) => {
                if m.membership_config.membership().voter_ids().any(|v| v == id) {
                    let change = ChangeMembers::RemoveVoters([id].into_iter().collect());
                    bounded(self.raft.change_membership(change, false), timeout).await?;
                }
                let change = ChangeMembers::RemoveNodes([id].into_iter().collect());
                bounded(self.raft.change_membership(change, false), timeout).await
            }
            Change::TransferLeader(id) => crate::handover::transfer(self, id, timeout).await,
        }
    }
}

async fn bounded<T>(
    call: impl std::future::Future<
        Output = std::result::Result<T, RaftError<u64, ClientWriteError<u64, BasicNode>>>,
    >,
    timeout: Duration,
) -> Result<()> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(f.into()),
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
            Err(Error::Config(e.to_string()))
        }
        Ok(Err(e)) => Err(Error::Raft(e.to_string())),
        Err(_) => Err(Error::Unavailable(format!(
            "the membership change did not complete within {} ms",
            timeout.as_millis()
        ))),
    }
}

pub(crate) struct Service {
    control: Control,
    timeout: Duration,
}

pub(crate) fn server(control: Control, timeout: Duration) -> MembershipServer<Service> {
    MembershipServer::new(Service { control, timeout })
}

#[tonic::async_trait]
impl Membership for Service {
    async fn change(
        &self,
        req: Request<MembershipRequest>,
    ) -> std::result::Result<Response<MembershipReply>, Status> {
        let req = req.into_inner();
        if req.kind == ELECT {
            if req.id != self.control.id {
                return Err(Status::invalid_argument(format!(
                    "asked member {} to call an election, but this is member {}",
                    req.id, self.control.id
                )));
            }
            tracing::info!(node_id = req.id, "raft: calling an election, as the leader asked");
            self.control
                .raft
                .trigger()
                .elect()
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            return Ok(Response::new(MembershipReply { error: String::new(), retryable: false }));
        }
        let Some(change) = Change::from_request(req) else {
            return Err(Status::invalid_argument("not a membership change"));
        };
        let reply = match self.control.change(change, self.timeout).await {
            Ok(()) => MembershipReply { error: String::new(), retryable: false },
            Err(e @ (Error::Unavailable(_) | Error::NotLeader { .. })) => {
                MembershipReply { error: e.to_string(), retryable: true }
            }
            Err(e) => MembershipReply { error: e.to_string(), retryable: false },
        };
        Ok(Response::new(reply))
    }
}

/// Asks the member `id` at `addr` to call an election at once.
pub(crate) async fn elect(
    channel: tonic::transport::Channel,
    addr: &str,
    id: u64,
    timeout: Duration,
) -> Result<()> {
    let mut req = Request::new(MembershipRequest { kind: ELECT, id, raft_addr: String::new() });
    req.set_timeout(timeout);
    MembershipClient::new(channel)
        .change(req)
        .await
        .map_err(|s| Error::Unavailable(format!("member at {addr}: {}", s.message())))?;
    Ok(())
}

/// Asks the member at `addr` for `change`.
pub(crate) async fn ask(
    channel: tonic::transport::Channel,
    addr: &str,
    change: &Change,
    timeout: Duration,
) -> Result<()> {
    let mut req = Request::new(change.to_request());
    req.set_timeout(timeout);
    let reply = MembershipClient::new(channel)
        .change(req)
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unimplemented => Error::NotRaft(addr.to_string()),
            _ => Error::Unavailable(format!("member at {addr}: {}", s.message())),
        })?
        .into_inner();
    match (reply.error.is_empty(), reply.retryable) {
        (true, _) => Ok(()),
        (false, true) => Err(Error::Unavailable(reply.error)),
        (false, false) => Err(Error::Config(reply.error)),
    }
}
