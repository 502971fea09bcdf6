//! timber-cluster: replication of timber's engines with Raft (openraft). This crate holds what
//! openraft asks of an application; openraft itself does the consensus.
//!
//! - [`LogStore`]: the Raft log on a timber WAL, with the vote and the purged and committed log
//!   ids in a small file beside it (`docs/format/raft.md`).
//! - [`Network`] and [`RaftService`]: openraft's RPCs between members on gRPC (tonic).

mod error;
mod hard_state;
mod log_store;
mod network;

pub use crate::error::{Error, Result};
pub use crate::log_store::LogStore;
pub use crate::network::{Connection, Network, RaftService};
