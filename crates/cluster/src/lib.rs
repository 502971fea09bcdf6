//! timber-cluster: replication of timber's engines with Raft (openraft). This crate holds what
//! openraft asks of an application; openraft itself does the consensus.
//!
//! - [`LogStore`]: the Raft log on a timber WAL, with the vote and the purged and committed log
//!   ids in a small file beside it (`docs/format/raft.md`).
//! - [`Network`] and [`RaftService`]: openraft's RPCs between members on gRPC (tonic).
//! - [`KvMachine`]: the state machine, a timber-kv engine that applies committed
//!   [`Proposal`]s (the writes a request produced on the leader) with the applied log id in
//!   the same batch, and snapshots it.
//! - [`Member`]: a running member: log, machine, endpoint, `propose` / `read_barrier`, and
//!   `forward` of a client's command to the leader (run there by the server's [`Executor`]).

mod error;
mod forward;
mod guard;
mod handover;
mod hard_state;
mod log_store;
mod machine;
mod member;
mod membership;
mod network;
mod proposals;
mod read_index;
mod types;

pub use crate::error::{Error, Result};

/// The largest proposal a member takes (keys, values and stream records): Raft sends up to 16
/// entries in one message of at most 256 MiB, so an entry must fit in a sixteenth of it.
pub const MAX_PROPOSAL_BYTES: usize = 15 << 20;
pub use crate::forward::{Executor, Reply};
pub use crate::guard::{range_digest, Expect, ExpectRange};
pub use crate::log_store::LogStore;
pub use crate::machine::{
    applied_in, revision_counter, stamp_revision, KvMachine, SnapshotStats, FIRST_REVISION,
    RESERVED_PREFIX, REVISION_KEY,
};
pub use crate::member::{Member, MemberConfig};
pub use crate::membership::Change;
pub use crate::network::{Connection, Network, RaftService};
pub use crate::types::{Applied, Op, Proposal, Retention, TypeConfig};

/// openraft, as this crate uses it (its metrics and handle types appear in the API).
pub use openraft;
