//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong in the replication layer's storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Raft log (a timber WAL) failed.
    #[error("raft log: {0}")]
    Wal(#[from] timber_wal::Error),

    /// The state machine's engine failed.
    #[error("state machine: {0}")]
    Kv(#[from] timber_kv::Error),

    /// The state machine's stream store failed.
    #[error("state machine streams: {0}")]
    Stream(#[from] timber_stream::Error),

    /// A proposal writes under the keys the state machine keeps for itself.
    #[error("key {:?} is reserved for the cluster's own state", String::from_utf8_lossy(.0))]
    Reserved(Vec<u8>),

    /// A proposal's revision would not fit in its value.
    #[error("a revision at byte {at} does not fit in a value of {len} bytes")]
    Revision {
        /// Where the revision was to go.
        at: u32,
        /// The value's length.
        len: usize,
    },

    /// This member is not the leader; writes and linearizable reads go to `leader`.
    #[error("not the leader; the leader is {}", match (.leader_id, .leader_addr) {
        (Some(id), Some(addr)) => format!("member {id} at {addr}"),
        _ => "not known yet".to_string(),
    })]
    NotLeader {
        /// The leader's id, if known.
        leader_id: Option<u64>,
        /// The address of the leader's Raft endpoint, if known.
        leader_addr: Option<String>,
    },

    /// No quorum answered in time: retry later. Nothing is known of whether a write was
    /// applied (it may still commit).
    #[error("cluster unavailable: {0}")]
    Unavailable(String),

    /// A proposal larger than one log entry may be ([`crate::MAX_PROPOSAL_BYTES`]): refused
    /// before it reaches the log, where no follower could receive it.
    #[error("a write of {bytes} bytes exceeds the cluster's limit of {max} bytes per entry")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },

    /// A guarded write was not applied: a key or range it depended on changed after it was
    /// read.
    #[error("conflict: a key or range the write read was written before it was applied; retry")]
    Conflict,

    /// Raft itself failed (a storage error stopped it, or it was shut down).
    #[error("raft: {0}")]
    Raft(String),

    /// The configuration is invalid.
    #[error("invalid cluster configuration: {0}")]
    Config(String),

    /// The address answered, but is not a member's Raft endpoint (another gRPC service).
    #[error("{0} is not a Raft endpoint")]
    NotRaft(String),

    /// A file system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The call.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },

    /// Stored data failed verification; nothing was modified.
    #[error("corrupt {}: {reason}", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A log entry could not be encoded or decoded.
    #[error("raft log entry {index}: {reason}")]
    Entry {
        /// The entry's index (its sequence number in the log).
        index: u64,
        /// What failed.
        reason: String,
    },

    /// The log was asked for something that would leave a hole in it.
    #[error("raft log: {0}")]
    Hole(String),
}

impl From<openraft::error::ForwardToLeader<u64, openraft::BasicNode>> for Error {
    /// openraft's refusal on a member that does not lead, naming the leader it knows.
    fn from(f: openraft::error::ForwardToLeader<u64, openraft::BasicNode>) -> Error {
        Error::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.map(|n| n.addr) }
    }
}

impl Error {
    /// The error of a call that served several callers, for each of them: leader and
    /// availability errors as they are (callers retry on them), the others as their message.
    pub(crate) fn for_each_caller(&self) -> Error {
        match self {
            Error::NotLeader { leader_id, leader_addr } => {
                Error::NotLeader { leader_id: *leader_id, leader_addr: leader_addr.clone() }
            }
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            other => Error::Raft(other.to_string()),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { op, path: path.into(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
