//! What the cluster replicates: a [`Proposal`] is the writes one client request produced on the
//! leader, applied to every member's KV engine as one batch ([`crate::KvMachine`]).
//!
//! The leader evaluates a request (reads, checks, ids and deadlines decided there) and proposes
//! only its effect, so that members apply identical bytes without clocks or randomness; a
//! read-modify-write holds its keys' locks on the leader until its proposal is applied, so two
//! of them on one key never evaluate against the same state.

use serde::{Deserialize, Serialize};

/// One write of a proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Store `value` under `key`.
    Put {
        /// The engine key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// The engine key.
        key: Vec<u8>,
    },
}

/// The writes of one client request, applied atomically on every member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// In order; a later op on a key wins.
    pub ops: Vec<Op>,
}

impl Proposal {
    /// Adds a put.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Put { key: key.into(), value: value.into() });
        self
    }

    /// Adds a delete.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// Bytes of keys and values.
    pub fn size(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => key.len() + value.len(),
                Op::Delete { key } => key.len(),
            })
            .sum()
    }
}

openraft::declare_raft_types!(
    /// The Raft types of a timber cluster: node ids are `u64`, nodes are known by the address
    /// of their Raft endpoint, entries carry [`Proposal`]s, snapshots are byte buffers.
    pub TypeConfig:
        D = Proposal,
        R = (),
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);
