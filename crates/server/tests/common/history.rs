//! `History`: what concurrent clients did to a set of integer registers (call time, return
//! time, result of SET, GET, INCR and SET NX), and a check that it is linearizable: Wing &
//! Gong's search for an order of the operations that respects real time and each operation's
//! semantics, with visited states memoised (as Porcupine does), one key at a time (keys are
//! independent registers).
//!
//! An operation whose outcome the client does not know (an error or a timeout: it may still
//! have been applied) has no return time and no result: it may take effect at any point after
//! its call, or never. Workload convention, which keeps the search small: written values are
//! unique multiples of [`STEP`], and a key sees fewer than `STEP` increments between two
//! writes, so every value read names the write it came from. A write of unknown outcome whose
//! value nobody observed (read, or incremented) is then never needed to explain the history
//! and is left out; increments of unknown outcome are interchangeable, and only the earliest
//! pending one is tried at each step. Leaving an operation out can only remove orders, never
//! add one: a workload that broke the convention could see a linearizable history refused,
//! never a wrong one accepted.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Written values are multiples of this; a key takes fewer increments between two writes.
pub const STEP: i64 = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// SET: the register holds the value.
    Write(i64),
    /// GET: what it returned.
    Read(Option<i64>),
    /// INCR: the value it returned (`None`: unknown outcome).
    Incr(Option<i64>),
    /// SET NX of the value: whether it set it (`None`: unknown outcome).
    SetNx(i64, Option<bool>),
}

#[derive(Debug, Clone)]
struct Op {
    call: u64,
    /// `u64::MAX`: unknown outcome (not reads).
    ret: u64,
    kind: Kind,
}

/// A shared, append-only record of operations.
#[derive(Clone)]
pub struct History {
    epoch: Instant,
    ops: Arc<Mutex<BTreeMap<String, Vec<Op>>>>,
}

impl Default for History {
    fn default() -> Self {
        History { epoch: Instant::now(), ops: Default::default() }
    }
}

impl History {
    /// Nanoseconds since the history began: take it before a call and after its return.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn push(&self, key: &str, call: u64, ret: Option<u64>, kind: Kind) {
        let op = Op { call, ret: ret.unwrap_or(u64::MAX), kind };
        self.ops.lock().unwrap().entry(key.into()).or_default().push(op);
    }

    /// A SET of `value` (a multiple of [`STEP`]): acknowledged at `ret`, or with an unknown
    /// outcome (`None`).
    pub fn write(&self, key: &str, value: i64, call: u64, ret: Option<u64>) {
        assert_eq!(value % STEP, 0, "written values are multiples of STEP");
        self.push(key, call, ret, Kind::Write(value));
    }

    /// A GET that returned `value` (reads that failed are not recorded).
    pub fn read(&self, key: &str, value: Option<i64>, call: u64, ret: u64) {
        self.push(key, call, Some(ret), Kind::Read(value));
    }

    /// An INCR that returned `result` at `ret`, or with an unknown outcome (`None`).
    pub fn incr(&self, key: &str, result: Option<(i64, u64)>, call: u64) {
        self.push(key, call, result.map(|r| r.1), Kind::Incr(result.map(|r| r.0)));
    }

    /// A SET NX of `value` (a multiple of [`STEP`]) that set it or not at `ret`, or with an
    /// unknown outcome (`None`).
    pub fn set_nx(&self, key: &str, value: i64, result: Option<(bool, u64)>, call: u64) {
        assert_eq!(value % STEP, 0, "written values are multiples of STEP");
        self.push(key, call, result.map(|r| r.1), Kind::SetNx(value, result.map(|r| r.0)));
    }

    /// (acknowledged writes of any kind, operations of unknown outcome, reads).
    pub fn counts(&self) -> (usize, usize, usize) {
        let ops = self.ops.lock().unwrap();
        let all = ops.values().flatten();
        all.fold((0, 0, 0), |(w, u, r), op| match (&op.kind, op.ret) {
            (Kind::Read(_), _) => (w, u, r + 1),
            (_, u64::MAX) => (w, u + 1, r),
            _ => (w + 1, u, r),
        })
    }

    /// Increments recorded on `key` (the workload keeps them below [`STEP`] between writes).
    pub fn incrs(&self, key: &str) -> usize {
        let ops = self.ops.lock().unwrap();
        ops.get(key).map_or(0, |o| o.iter().filter(|o| matches!(o.kind, Kind::Incr(_))).count())
    }

    /// Ok if every key's operations are linearizable; else which key is not.
    pub fn check(&self) -> Result<(), String> {
        for (key, ops) in self.ops.lock().unwrap().iter() {
            if !linearizable(ops) {
                return Err(format!("the operations on {key:?} are not linearizable: {ops:?}"));
            }
        }
        Ok(())
    }
}

/// The register after `kind` applied to `state`, if `kind`'s result allows that state.
fn step(state: Option<i64>, kind: &Kind) -> Option<Option<i64>> {
    match *kind {
        Kind::Write(v) => Some(Some(v)),
        Kind::Read(v) => (v == state).then_some(state),
        Kind::Incr(r) => {
            let n = state.unwrap_or(0) + 1;
            r.is_none_or(|r| r == n).then_some(Some(n))
        }
        Kind::SetNx(v, set) => match state {
            None => (set != Some(false)).then_some(Some(v)),
            Some(_) => (set != Some(true)).then_some(state),
        },
    }
}

/// Whether one register's operations, starting from an absent key, are linearizable.
fn linearizable(ops: &[Op]) -> bool {
    // The writes whose values someone observed: read back, or incremented.
    let base = |v: i64| v - v.rem_euclid(STEP);
    let observed: HashSet<i64> = ops
        .iter()
        .filter_map(|o| match o.kind {
            Kind::Read(Some(v)) => Some(base(v)),
            Kind::Incr(Some(r)) => Some(base(r - 1)),
            _ => None,
        })
        .collect();
    let mut ops: Vec<&Op> = ops
        .iter()
        .filter(|o| match o.kind {
            Kind::Write(v) | Kind::SetNx(v, _) => o.ret != u64::MAX || observed.contains(&v),
            Kind::Read(_) | Kind::Incr(_) => true,
        })
        .collect();
    ops.sort_by_key(|o| o.call);
    let mut done = vec![0u64; ops.len().div_ceil(64)];
    let mut seen = HashSet::new();
    search(&ops, &mut done, None, &mut seen)
}

/// Depth-first: linearize next any pending operation called before every pending one
/// returned, from register value `state`.
fn search(
    ops: &[&Op],
    done: &mut Vec<u64>,
    state: Option<i64>,
    seen: &mut HashSet<(Vec<u64>, Option<i64>)>,
) -> bool {
    let pending = || (0..ops.len()).filter(|&i| done[i / 64] & (1 << (i % 64)) == 0);
    let Some(first_ret) = pending().map(|i| ops[i].ret).min() else { return true };
    if first_ret == u64::MAX {
        // Only operations of unknown outcome are left: they may never have taken effect.
        return true;
    }
    let mut unknown_incr_tried = false;
    let candidates: Vec<usize> = pending().filter(|&i| ops[i].call < first_ret).collect();
    for i in candidates {
        if ops[i].kind == Kind::Incr(None) {
            // Interchangeable once callable (see the module doc): the first one stands for all.
            if unknown_incr_tried {
                continue;
            }
            unknown_incr_tried = true;
        }
        let Some(next) = step(state, &ops[i].kind) else { continue };
        done[i / 64] |= 1 << (i % 64);
        if seen.insert((done.clone(), next)) && search(ops, done, next, seen) {
            return true;
        }
        done[i / 64] &= !(1 << (i % 64));
    }
    false
}
