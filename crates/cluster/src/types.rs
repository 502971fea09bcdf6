//! What the cluster replicates: a [`Proposal`] is the writes one client request produced on the
//! leader, applied to every member's engines ([`crate::KvMachine`]): its key writes as one KV
//! batch, its stream writes to the member's stream store.
//!
//! The leader evaluates a request (reads, checks, ids and deadlines decided there) and proposes
//! only its effect, so that members apply identical bytes without clocks or randomness; a
//! read-modify-write holds its keys' locks on the leader until its proposal is applied, so two
//! of them on one key never evaluate against the same state.

use std::ops::Bound;

use serde::{Deserialize, Serialize};

use crate::guard::{Expect, ExpectRange};

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
    /// Create the stream `name`, empty (nothing if it exists).
    StreamCreate {
        /// The stream's name.
        name: String,
    },
    /// Append `records` to the stream `name`, the first one at id `at`: the leader's end of
    /// the stream when it proposed them. A member whose stream already holds some of them (a
    /// replay after a restart) appends only the rest.
    StreamAppend {
        /// The stream's name.
        name: String,
        /// The id of the first record.
        at: u64,
        /// The records, in order.
        records: Vec<Vec<u8>>,
    },
    /// Drop the entries of stream `name` below `before`.
    StreamTruncate {
        /// The stream's name.
        name: String,
        /// The first id kept.
        before: u64,
    },
    /// Delete the stream `name` and its entries (nothing if it does not exist).
    StreamDelete {
        /// The stream's name.
        name: String,
    },
    /// Create the stream `name`, empty, with `retention` (nothing if it exists).
    StreamCreateWith {
        /// The stream's name.
        name: String,
        /// What each member's store drops by age and size.
        retention: Retention,
    },
    /// Store `value` under `key` with the next revision written into it (`u64` LE at byte
    /// `at`): each member counts these puts from the counter under [`crate::REVISION_KEY`],
    /// so every member stamps the same revision, a number no earlier write used.
    PutRevised {
        /// The engine key.
        key: Vec<u8>,
        /// The value; bytes `at..at + 8` are overwritten.
        value: Vec<u8>,
        /// Where the revision goes.
        at: u32,
    },
    /// Apply `ops` (puts and deletes) only if every key of `expect` still holds, and every
    /// range of `ranges` still has, what its proposer read: the decision of an optimistic
    /// transaction, taken by each member on the state it applies to (the writes of earlier
    /// entries and earlier ops of this one), so every member takes the same one. The entry's
    /// [`Applied`] says which guarded ops ran.
    Guarded {
        /// What the proposer read, key by key.
        expect: Vec<Expect>,
        /// What the proposer scanned, range by range.
        ranges: Vec<ExpectRange>,
        /// The writes, applied all together or not at all.
        ops: Vec<Op>,
    },
    /// Remove every key of `[start, end)` from the member's engine, as the entries before it
    /// left it. A proposal that holds one holds nothing but such ranges: its apply may take
    /// several engine batches, and a member that stops in the middle applies the whole entry
    /// again when it restarts (the applied id is stored with the last batch), which removing
    /// keys allows: every member ends with the range empty.
    DeleteRange {
        /// The first engine key removed.
        start: Vec<u8>,
        /// The engine key past the range.
        end: Vec<u8>,
    },
}

/// What applying an entry decided: per [`Op::Guarded`] of the entry, in order, whether its
/// expectations held and its writes were applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// One per guarded op.
    pub guards: Vec<bool>,
}

/// A stream's retention, as its creator asked for it. Members' stores do not apply it
/// themselves: the leader decides the cuts and proposes them as [`Op::StreamTruncate`], so
/// every copy starts at the same id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Entries older than this many milliseconds are dropped.
    pub age_ms: Option<u64>,
    /// The oldest entries are dropped while what stays holds at least this many bytes.
    pub bytes: Option<u64>,
}

impl Retention {
    /// The store's configuration of a stream with this retention.
    pub fn config(self) -> timber_stream::StreamConfig {
        timber_stream::StreamConfig {
            retention_age: self.age_ms.map(std::time::Duration::from_millis),
            retention_bytes: self.bytes,
        }
    }

    /// The retention of a stream configured with `c` (ages rounded down to milliseconds).
    pub fn of(c: timber_stream::StreamConfig) -> Retention {
        Retention {
            age_ms: c.retention_age.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            bytes: c.retention_bytes,
        }
    }
}

/// The writes of one client request, applied atomically on every member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// In order; a later op on a key wins.
    pub ops: Vec<Op>,
}

impl Proposal {
    /// What [`Proposal::size`] counts for each op and record beyond its bytes.
    pub const OVERHEAD: usize = 16;

    /// Adds a put.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Put { key: key.into(), value: value.into() });
        self
    }

    /// Adds a put whose value gets the next revision at byte `at` (see [`Op::PutRevised`]).
    pub fn put_revised(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        at: u32,
    ) -> &mut Self {
        self.ops.push(Op::PutRevised { key: key.into(), value: value.into(), at });
        self
    }

    /// Adds writes (the puts and deletes of `ops`) that apply only if every key of `expect`
    /// and every range of `ranges` still hold what was read (see [`Op::Guarded`]).
    pub fn guarded(
        &mut self,
        expect: Vec<Expect>,
        ranges: Vec<ExpectRange>,
        ops: Proposal,
    ) -> &mut Self {
        self.ops.push(Op::Guarded { expect, ranges, ops: ops.ops });
        self
    }

    /// Whether it removes ranges of keys ([`Op::DeleteRange`]): such a proposal holds nothing
    /// else and is an entry of its own.
    pub(crate) fn removes_ranges(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::DeleteRange { .. }))
    }

    /// How many [`Op::Guarded`] it holds.
    pub fn guards(&self) -> usize {
        self.ops.iter().filter(|op| matches!(op, Op::Guarded { .. })).count()
    }

    /// Adds a delete.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// Adds the removal of every key of `[start, end)` (see [`Op::DeleteRange`]: a proposal
    /// that holds one may hold nothing else).
    pub fn delete_range(
        &mut self,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(Op::DeleteRange { start: start.into(), end: end.into() });
        self
    }

    /// Adds the creation of a stream.
    pub fn create_stream(&mut self, name: impl Into<String>) -> &mut Self {
        self.ops.push(Op::StreamCreate { name: name.into() });
        self
    }

    /// Adds the creation of a stream with a retention.
    pub fn create_stream_with(
        &mut self,
        name: impl Into<String>,
        retention: Retention,
    ) -> &mut Self {
        self.ops.push(Op::StreamCreateWith { name: name.into(), retention });
        self
    }

    /// Adds an append of `records` to a stream whose end is at id `at` on the leader.
    pub fn append(&mut self, name: impl Into<String>, at: u64, records: Vec<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::StreamAppend { name: name.into(), at, records });
        self
    }

    /// Adds a truncation of a stream below `before`.
    pub fn truncate_stream(&mut self, name: impl Into<String>, before: u64) -> &mut Self {
        self.ops.push(Op::StreamTruncate { name: name.into(), before });
        self
    }

    /// Adds the deletion of a stream.
    pub fn delete_stream(&mut self, name: impl Into<String>) -> &mut Self {
        self.ops.push(Op::StreamDelete { name: name.into() });
        self
    }

    /// Whether it holds no write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes of keys, values, stream names and records, each op and record counted with
    /// [`Proposal::OVERHEAD`] more (a proposal of many empty ones is not small).
    pub fn size(&self) -> usize {
        Self::size_of(&self.ops)
    }

    fn size_of(ops: &[Op]) -> usize {
        ops.iter()
            .map(|op| {
                Self::OVERHEAD
                    + match op {
                        Op::Put { key, value } | Op::PutRevised { key, value, .. } => {
                            key.len() + value.len()
                        }
                        Op::Delete { key } => key.len(),
                        Op::DeleteRange { start, end } => start.len() + end.len(),
                        Op::StreamAppend { name, records, .. } => {
                            name.len()
                                + records.iter().map(|r| r.len() + Self::OVERHEAD).sum::<usize>()
                        }
                        Op::StreamCreate { name }
                        | Op::StreamCreateWith { name, .. }
                        | Op::StreamTruncate { name, .. }
                        | Op::StreamDelete { name } => name.len(),
                        Op::Guarded { expect, ranges, ops } => {
                            expect
                                .iter()
                                .map(|e| {
                                    Self::OVERHEAD
                                        + e.key.len()
                                        + e.stored.as_ref().map_or(0, Vec::len)
                                })
                                .sum::<usize>()
                                + ranges
                                    .iter()
                                    .map(|r| {
                                        let len = |b: &Bound<Vec<u8>>| match b {
                                            Bound::Included(k) | Bound::Excluded(k) => k.len(),
                                            Bound::Unbounded => 0,
                                        };
                                        Self::OVERHEAD + len(&r.lo) + len(&r.hi)
                                    })
                                    .sum::<usize>()
                                + Self::size_of(ops)
                        }
                    }
            })
            .sum()
    }
}

openraft::declare_raft_types!(
    /// The Raft types of a timber cluster: node ids are `u64`, nodes are known by the address
    /// of their Raft endpoint, entries carry [`Proposal`]s, snapshots are byte buffers.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);
