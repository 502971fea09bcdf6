//! Conditional transactions: the single call, in the style of etcd's `Txn`, that the gRPC and
//! HTTP endpoints serve. Comparisons of keys (value, existence, version), then the success operations if
//! every comparison holds and the failure operations otherwise (puts, deletes, gets, each
//! seeing the writes before it).
//!
//! Invariant: a transaction is evaluated under the stripe locks of every key it names, from its
//! first comparison to its commit, and its writes are committed as one batch (in a cluster, one
//! Raft entry, evaluated on the leader): no other write of those keys lands in between, and
//! no reader sees part of it.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::keyspace::{data_key, now_ms, Error, Keyspace, Kind, Value};
use crate::view::{KeyView, Pending};
use crate::Engines;

/// The most comparisons plus operations of one transaction.
pub(crate) const MAX_PARTS: usize = 10_000;

/// How a comparison compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// What a comparison compares a key's state with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// The key's string value (a key without one fails every value comparison).
    Value(Bytes),
    /// Whether the key exists.
    Exists(bool),
    /// The key's version: its revision (0 for a key without a value).
    Version(u64),
}

/// One comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Compare {
    pub(crate) key: Bytes,
    pub(crate) op: CmpOp,
    pub(crate) target: Target,
}

/// One operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Put { key: Bytes, value: Bytes, ttl_ms: Option<u64> },
    Delete { key: Bytes },
    Get { key: Bytes },
}

impl Op {
    fn key(&self) -> &Bytes {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => key,
        }
    }
}

/// The result of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpResult {
    Put,
    Delete { existed: bool },
    Get { value: Option<Bytes>, version: u64 },
}

/// A conditional transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Txn {
    pub(crate) compare: Vec<Compare>,
    pub(crate) success: Vec<Op>,
    pub(crate) failure: Vec<Op>,
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Every comparison held: the success operations ran.
    pub(crate) succeeded: bool,
    pub(crate) results: Vec<OpResult>,
}

impl Txn {
    /// Why the transaction cannot run, if it cannot: too many parts, a value over `max_value`,
    /// a key the engine refuses, an existence compared by order.
    pub(crate) fn check(&self, max_value: usize) -> Result<(), String> {
        let parts = self.compare.len() + self.success.len() + self.failure.len();
        if parts > MAX_PARTS {
            return Err(format!(
                "{parts} comparisons and operations exceed the limit of {MAX_PARTS}"
            ));
        }
        let keys = self.compare.iter().map(|c| &c.key).chain(self.ops().map(Op::key));
        for k in keys {
            if k.len() >= timber_kv::MAX_KEY_LEN {
                return Err(format!("a key of {} bytes exceeds the key size limit", k.len()));
            }
        }
        for op in self.ops() {
            if let Op::Put { value, .. } = op {
                if value.len() > max_value {
                    return Err(format!(
                        "value of {} bytes exceeds the limit of {max_value} bytes",
                        value.len()
                    ));
                }
            }
        }
        if let Some(c) = self.compare.iter().find(|c| {
            matches!(c.target, Target::Exists(_)) && matches!(c.op, CmpOp::Less | CmpOp::Greater)
        }) {
            return Err(format!(
                "existence of {:?} is compared with EQUAL or NOT_EQUAL only",
                String::from_utf8_lossy(&c.key)
            ));
        }
        Ok(())
    }

    fn ops(&self) -> impl Iterator<Item = &Op> {
        self.success.iter().chain(&self.failure)
    }

    /// Whether it may write (a put or delete in either branch).
    fn writes(&self) -> bool {
        self.ops().any(|op| !matches!(op, Op::Get { .. }))
    }

    /// Evaluates the transaction on `ks` (on the leader, in a cluster, once it is fresh) and
    /// commits its writes.
    pub(crate) fn apply(&self, ks: &Keyspace) -> Result<Outcome, Error> {
        let keys: Vec<&[u8]> = self
            .compare
            .iter()
            .map(|c| &c.key[..])
            .chain(self.ops().map(|op| &op.key()[..]))
            .collect();
        let _locks = ks.lock_many(&keys);
        let mut succeeded = true;
        for c in &self.compare {
            if !holds(c, ks.get(&c.key)?.as_ref()) {
                succeeded = false;
                break;
            }
        }
        let pending = Mutex::new(Pending::default());
        let view = KeyView::pending(ks, &pending);
        let branch = if succeeded { &self.success } else { &self.failure };
        let mut results = Vec::with_capacity(branch.len());
        for op in branch {
            results.push(match op {
                Op::Put { key, value, ttl_ms } => {
                    let expire_at = ttl_ms.filter(|t| *t > 0).map(|t| now_ms().saturating_add(t));
                    view.set(key, &Value { expire_at, ..Value::string(value.clone()) })?;
                    OpResult::Put
                }
                Op::Delete { key } => OpResult::Delete { existed: view.delete(&[key])? > 0 },
                Op::Get { key } => match view.get(key)?.filter(|v| v.kind == Kind::String) {
                    Some(v) => OpResult::Get { value: Some(v.data), version: v.revision },
                    None => OpResult::Get { value: None, version: 0 },
                },
            });
        }
        // In a cluster, each member checks on apply that no key it named changed since.
        let depends: Vec<Vec<u8>> = keys.iter().map(|k| data_key(k)).collect();
        ks.commit_guarded(pending.into_inner().into_batch(ks)?, &depends, &[], None)?;
        Ok(Outcome { succeeded, results })
    }
}

/// Whether comparison `c` holds for the key's live value `v`.
fn holds(c: &Compare, v: Option<&Value>) -> bool {
    use std::cmp::Ordering;
    let ord = match &c.target {
        Target::Exists(want) => {
            let same = v.is_some() == *want;
            return match c.op {
                CmpOp::Equal => same,
                CmpOp::NotEqual => !same,
                CmpOp::Less | CmpOp::Greater => false,
            };
        }
        Target::Value(want) => match v {
            Some(v) if v.kind == Kind::String => v.data[..].cmp(&want[..]),
            _ => return false,
        },
        Target::Version(want) => match v {
            None => 0.cmp(want),
            Some(v) if v.kind == Kind::String => v.revision.cmp(want),
            Some(_) => return false,
        },
    };
    match c.op {
        CmpOp::Equal => ord == Ordering::Equal,
        CmpOp::NotEqual => ord != Ordering::Equal,
        CmpOp::Less => ord == Ordering::Less,
        CmpOp::Greater => ord == Ordering::Greater,
    }
}

/// Runs `txn` (checked): here, or in a cluster on the leader (a member that does not lead
/// passes it there).
pub(crate) async fn run(engines: &Arc<Engines>, txn: Txn) -> Result<Outcome, Error> {
    if let Some(r) = engines.keys.replication() {
        if let Some(done) = crate::forwarded::txn(r, &txn).await {
            return done;
        }
    }
    run_here(engines, txn).await
}

/// Runs `txn` on this member: in a cluster, once it leads, applied what earlier leaders
/// committed, and confirmed its leadership (its comparisons are linearizable reads).
pub(crate) async fn run_here(engines: &Arc<Engines>, txn: Txn) -> Result<Outcome, Error> {
    if let Some(r) = engines.keys.replication() {
        if txn.writes() {
            r.fresh().await?;
        }
        r.read_barrier_async().await?;
    }
    engines
        .keys
        .write_durably(move |k| txn.apply(k))
        .await
        .unwrap_or_else(|| Err(Error::Leader("transaction task failed".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sync;
    use crate::idle::IdleWork;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn cmp(key: &str, op: CmpOp, target: Target) -> Compare {
        Compare { key: b(key), op, target }
    }

    #[test]
    fn comparisons_choose_the_branch_and_operations_see_earlier_writes() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
        ks.set(b"a", &Value::string("5")).unwrap();
        let cas = |old: &str, new: &str| Txn {
            compare: vec![cmp("a", CmpOp::Equal, Target::Value(b(old)))],
            success: vec![
                Op::Put { key: b("a"), value: b(new), ttl_ms: None },
                Op::Get { key: b("a") },
            ],
            failure: vec![Op::Get { key: b("a") }],
        };
        let o = cas("5", "6").apply(&ks).unwrap();
        assert!(o.succeeded);
        // Written in this transaction: its revision is stamped on commit.
        assert_eq!(
            o.results,
            vec![OpResult::Put, OpResult::Get { value: Some(b("6")), version: 0 }]
        );
        let o = cas("5", "7").apply(&ks).unwrap();
        assert!(!o.succeeded);
        let version = ks.get(b"a").unwrap().unwrap().revision;
        assert_eq!(o.results, vec![OpResult::Get { value: Some(b("6")), version }]);

        // Create if absent; a missing key fails value comparisons, whatever the operator.
        let create = Txn {
            compare: vec![cmp("new", CmpOp::Equal, Target::Exists(false))],
            success: vec![Op::Put { key: b("new"), value: b("x"), ttl_ms: Some(60_000) }],
            failure: vec![],
        };
        assert!(create.apply(&ks).unwrap().succeeded);
        assert!(!create.apply(&ks).unwrap().succeeded);
        assert!(ks.get(b"new").unwrap().unwrap().expire_at.is_some());
        for op in [CmpOp::Equal, CmpOp::NotEqual, CmpOp::Less, CmpOp::Greater] {
            let t = Txn { compare: vec![cmp("none", op, Target::Value(b("")))], ..Txn::default() };
            assert!(!t.apply(&ks).unwrap().succeeded, "{op:?}");
        }
        // Byte order; several comparisons must all hold; a delete in the branch.
        let t = Txn {
            compare: vec![
                cmp("a", CmpOp::Greater, Target::Value(b("5"))),
                cmp("a", CmpOp::Less, Target::Value(b("7"))),
                cmp("a", CmpOp::NotEqual, Target::Value(b("x"))),
                cmp("new", CmpOp::NotEqual, Target::Exists(false)),
            ],
            success: vec![Op::Delete { key: b("new") }, Op::Get { key: b("new") }],
            failure: vec![],
        };
        let o = t.apply(&ks).unwrap();
        assert!(o.succeeded);
        assert_eq!(
            o.results,
            vec![OpResult::Delete { existed: true }, OpResult::Get { value: None, version: 0 }]
        );
        assert_eq!(ks.get(b"new").unwrap(), None);
    }

    #[test]
    fn versions_change_with_every_write_and_compare_as_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let version = |ks: &Keyspace, k: &[u8]| ks.get(k).unwrap().map_or(0, |v| v.revision);
        let get = |k: &str| Txn { success: vec![Op::Get { key: b(k) }], ..Txn::default() };
        let cas = |key: &str, v: u64, new: &str| Txn {
            compare: vec![cmp(key, CmpOp::Equal, Target::Version(v))],
            success: vec![Op::Put { key: b(key), value: b(new), ttl_ms: None }],
            failure: vec![Op::Get { key: b(key) }],
        };
        let last = {
            let ks = Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
            // Version 0: absent; create only if absent.
            assert!(cas("a", 0, "1").apply(&ks).unwrap().succeeded);
            assert!(!cas("a", 0, "2").apply(&ks).unwrap().succeeded);
            let v1 = version(&ks, b"a");
            assert!(v1 > 0);
            // The same value written again is a new version.
            ks.set(b"a", &Value::string("1")).unwrap();
            let v2 = version(&ks, b"a");
            assert!(v2 > v1, "{v2} after {v1}");
            // A compare-and-swap on an old version fails and reads the current one.
            let o = cas("a", v1, "3").apply(&ks).unwrap();
            assert!(!o.succeeded);
            assert_eq!(o.results, vec![OpResult::Get { value: Some(b("1")), version: v2 }]);
            assert!(cas("a", v2, "3").apply(&ks).unwrap().succeeded);
            let v3 = version(&ks, b"a");
            assert_eq!(
                get("a").apply(&ks).unwrap().results,
                vec![OpResult::Get { value: Some(b("3")), version: v3 }]
            );
            // As numbers; a missing key is version 0.
            for (op, want) in
                [(CmpOp::Greater, true), (CmpOp::Less, false), (CmpOp::NotEqual, true)]
            {
                let t = Txn { compare: vec![cmp("a", op, Target::Version(v2))], ..Txn::default() };
                assert_eq!(t.apply(&ks).unwrap().succeeded, want, "{op:?}");
            }
            let t = Txn {
                compare: vec![cmp("none", CmpOp::Less, Target::Version(1))],
                ..Txn::default()
            };
            assert!(t.apply(&ks).unwrap().succeeded);
            // Deleted and written again: a version above every earlier one.
            ks.delete(&[b"a"]).unwrap();
            assert_eq!(version(&ks, b"a"), 0);
            ks.set(b"a", &Value::string("4")).unwrap();
            assert!(version(&ks, b"a") > v3);
            version(&ks, b"a")
        };
        // After a restart, versions go on growing.
        let ks = Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
        assert_eq!(version(&ks, b"a"), last);
        ks.set(b"a", &Value::string("5")).unwrap();
        assert!(version(&ks, b"a") > last);
    }

    /// One step of the model-based test of versions.
    #[derive(Debug, Clone)]
    enum Step {
        Set(u8),
        Delete(u8),
        /// A compare-and-swap on the key's current version (`true`) or on one it had before.
        Swap(u8, bool),
        Reopen,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u8..3).prop_map(Step::Set),
            1 => (0u8..3).prop_map(Step::Delete),
            3 => (0u8..3, any::<bool>()).prop_map(|(k, current)| Step::Swap(k, current)),
            1 => Just(Step::Reopen),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Against a model of each key's versions: every write gives the key a version above
        /// all it had (across restarts too), a delete makes it 0, and a swap on a version runs
        /// only if it is the current one.
        #[test]
        fn versions_follow_a_model_of_every_write(steps in proptest::collection::vec(step(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let open = || Keyspace::open(dir.path(), Sync::Manual, None, &IdleWork::new()).unwrap();
            let mut ks = open();
            // Per key: its value and version now (None: absent), and every version it had.
            let mut now: [Option<(String, u64)>; 3] = Default::default();
            let mut had: [Vec<u64>; 3] = Default::default();
            let name = |k: u8| format!("k{k}");
            for (i, s) in steps.iter().enumerate() {
                let value = format!("v{i}");
                let written = match s {
                    Step::Set(k) => {
                        ks.set(name(*k).as_bytes(), &Value::string(value.clone())).unwrap();
                        Some(*k)
                    }
                    Step::Delete(k) => {
                        ks.delete(&[name(*k).as_bytes()]).unwrap();
                        now[*k as usize] = None;
                        None
                    }
                    Step::Swap(k, current) => {
                        let v = match (current, had[*k as usize].first()) {
                            (true, _) => now[*k as usize].as_ref().map_or(0, |n| n.1),
                            (false, Some(old)) => *old,
                            (false, None) => continue,
                        };
                        let holds = now[*k as usize].as_ref().map_or(0, |n| n.1) == v;
                        let t = Txn {
                            compare: vec![cmp(&name(*k), CmpOp::Equal, Target::Version(v))],
                            success: vec![Op::Put { key: b(&name(*k)), value: b(&value), ttl_ms: None }],
                            failure: vec![],
                        };
                        proptest::prop_assert_eq!(t.apply(&ks).unwrap().succeeded, holds, "{:?}", s);
                        holds.then_some(*k)
                    }
                    Step::Reopen => {
                        drop(ks);
                        ks = open();
                        None
                    }
                };
                if let Some(k) = written {
                    let got = ks.get(name(k).as_bytes()).unwrap().unwrap();
                    let before = had[k as usize].iter().max().copied().unwrap_or(0);
                    proptest::prop_assert!(got.revision > before, "{} after {}", got.revision, before);
                    had[k as usize].push(got.revision);
                    now[k as usize] = Some((value.clone(), got.revision));
                }
                for k in 0..3u8 {
                    let got = ks.get(name(k).as_bytes()).unwrap().map(|v| {
                        (String::from_utf8(v.data.to_vec()).unwrap(), v.revision)
                    });
                    proptest::prop_assert_eq!(&got, &now[k as usize], "key {}", k);
                }
            }
        }
    }

    #[test]
    fn bad_transactions_are_refused_with_a_reason() {
        let big = Txn {
            success: vec![Op::Put { key: b("k"), value: Bytes::from(vec![0; 11]), ttl_ms: None }],
            ..Txn::default()
        };
        assert!(big.check(10).unwrap_err().contains("exceeds the limit"));
        assert!(big.check(11).is_ok());
        let order =
            Txn { compare: vec![cmp("k", CmpOp::Less, Target::Exists(true))], ..Txn::default() };
        assert!(order.check(10).unwrap_err().contains("EQUAL or NOT_EQUAL"));
        let many = Txn { success: vec![Op::Get { key: b("k") }; MAX_PARTS + 1], ..Txn::default() };
        assert!(many.check(10).unwrap_err().contains("limit"));
        let long = Txn {
            success: vec![Op::Get { key: Bytes::from(vec![b'k'; 1 << 20]) }],
            ..Txn::default()
        };
        assert!(long.check(10).unwrap_err().contains("key size"));
    }
}
