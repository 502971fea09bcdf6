//! Conditional transactions ([`Client::txn`]): comparisons of keys, then the success
//! operations if every comparison holds and the failure operations otherwise, atomically, in
//! one call (as etcd's `Txn`).
//!
//! ```no_run
//! # async fn demo(client: timber_client::Client) -> Result<(), timber_client::Error> {
//! use timber_client::{Cmp, Txn};
//! // Compare-and-swap: "v2" only if the key still holds "v1".
//! let t = Txn::new().when_value("k", Cmp::Equal, "v1").then_put("k", "v2").else_get("k");
//! let done = client.txn(t).await?;
//! if !done.succeeded {
//!     println!("lost the race: now {:?}", done.results);
//! }
//! # Ok(()) }
//! ```

use std::time::Duration;

use bytes::Bytes;
use timber_proto::v1 as pb;

use crate::{Client, Result};

/// How a comparison compares a key's value with the one given (byte-wise order), or its
/// version with a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// A conditional transaction, built by its `when_*`, `then_*` and `else_*` methods.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    req: pb::TxnRequest,
}

/// The result of one operation of a transaction, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResult {
    Put,
    Delete {
        /// Whether the key existed.
        existed: bool,
    },
    /// The key's value (`None`: no value).
    Get(Option<Bytes>),
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Every comparison held: the success (`then_*`) operations ran, else the failure ones.
    pub succeeded: bool,
    pub results: Vec<TxnOpResult>,
}

fn put(key: Bytes, value: Bytes, ttl: Option<Duration>) -> pb::TxnOp {
    let ttl_ms = ttl.map(crate::ttl_ms);
    pb::TxnOp { op: Some(pb::txn_op::Op::Put(pb::PutRequest { key, value, ttl_ms })) }
}

fn delete(key: Bytes) -> pb::TxnOp {
    pb::TxnOp { op: Some(pb::txn_op::Op::Delete(pb::DeleteRequest { key })) }
}

fn get(key: Bytes) -> pb::TxnOp {
    pb::TxnOp { op: Some(pb::txn_op::Op::Get(pb::GetRequest { key, stale: false })) }
}

impl Txn {
    /// A transaction without comparisons (its success operations run) or operations.
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Holds if the key's value compares with `value` as `cmp` says (a key without a value
    /// fails every value comparison).
    pub fn when_value(self, key: impl Into<Bytes>, cmp: Cmp, value: impl Into<Bytes>) -> Txn {
        self.when(key.into(), cmp, pb::compare::Target::Value(value.into()))
    }

    /// Holds if the key's version ([`Client::get_versioned`]) compares with `version` as `cmp`
    /// says; a key that does not exist has version 0. Compare-and-swap without comparing
    /// values: `when_version(k, Cmp::Equal, v)` holds only if nobody wrote `k` since it was
    /// read at version `v` (even with the same value).
    pub fn when_version(self, key: impl Into<Bytes>, cmp: Cmp, version: u64) -> Txn {
        self.when(key.into(), cmp, pb::compare::Target::Version(version))
    }

    fn when(mut self, key: Bytes, cmp: Cmp, target: pb::compare::Target) -> Txn {
        use pb::compare::Op;
        let op = match cmp {
            Cmp::Equal => Op::Equal,
            Cmp::NotEqual => Op::NotEqual,
            Cmp::Less => Op::Less,
            Cmp::Greater => Op::Greater,
        };
        self.req.compare.push(pb::Compare { key, op: op as i32, target: Some(target) });
        self
    }

    /// Holds if the key exists (`true`) or does not (`false`).
    pub fn when_exists(mut self, key: impl Into<Bytes>, exists: bool) -> Txn {
        self.req.compare.push(pb::Compare {
            key: key.into(),
            op: pb::compare::Op::Equal as i32,
            target: Some(pb::compare::Target::Exists(exists)),
        });
        self
    }

    /// On success, stores a value.
    pub fn then_put(mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Txn {
        self.req.success.push(put(key.into(), value.into(), None));
        self
    }

    /// On success, stores a value that expires after `ttl`.
    pub fn then_put_with_ttl(
        mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Txn {
        self.req.success.push(put(key.into(), value.into(), Some(ttl)));
        self
    }

    /// On success, deletes a key.
    pub fn then_delete(mut self, key: impl Into<Bytes>) -> Txn {
        self.req.success.push(delete(key.into()));
        self
    }

    /// On success, reads a key (seeing the writes before it).
    pub fn then_get(mut self, key: impl Into<Bytes>) -> Txn {
        self.req.success.push(get(key.into()));
        self
    }

    /// On failure, stores a value.
    pub fn else_put(mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Txn {
        self.req.failure.push(put(key.into(), value.into(), None));
        self
    }

    /// On failure, deletes a key.
    pub fn else_delete(mut self, key: impl Into<Bytes>) -> Txn {
        self.req.failure.push(delete(key.into()));
        self
    }

    /// On failure, reads a key.
    pub fn else_get(mut self, key: impl Into<Bytes>) -> Txn {
        self.req.failure.push(get(key.into()));
        self
    }
}

impl Client {
    /// Runs a conditional transaction. Not retried when the server is unavailable: one that
    /// timed out may have run (a retry of a compare-and-swap that ran would then fail its
    /// comparison).
    pub async fn txn(&self, t: Txn) -> Result<TxnResult> {
        let (mut c, r) = (self.kv(), self.request(t.req));
        let resp = self.once("txn", async move { c.txn(r).await }).await?;
        use pb::txn_op_result::Result as R;
        let results = resp
            .results
            .into_iter()
            .map(|r| match r.result {
                Some(R::Delete(d)) => TxnOpResult::Delete { existed: d.existed },
                Some(R::Get(g)) => TxnOpResult::Get(g.value),
                Some(R::Put(_)) | None => TxnOpResult::Put,
            })
            .collect();
        Ok(TxnResult { succeeded: resp.succeeded, results })
    }

    /// Stores `new` under `key` if the key holds `old` (`None`: if it does not exist);
    /// whether it did.
    pub async fn compare_and_swap(
        &self,
        key: impl Into<Bytes>,
        old: Option<Bytes>,
        new: impl Into<Bytes>,
    ) -> Result<bool> {
        let key = key.into();
        let t = match old {
            Some(old) => Txn::new().when_value(key.clone(), Cmp::Equal, old),
            None => Txn::new().when_exists(key.clone(), false),
        };
        Ok(self.txn(t.then_put(key, new)).await?.succeeded)
    }
}
