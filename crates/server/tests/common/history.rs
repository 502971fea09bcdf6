//! `History`: what concurrent clients did to a set of registers (call time, return time,
//! result), and a check that it is linearizable: Wing & Gong's search for an order of the
//! operations that respects real time and register semantics, with visited states memoised
//! (as Porcupine does), one key at a time (keys are independent registers).
//!
//! A write whose outcome the client does not know (an error or a timeout: it may still have
//! been applied) has no return time: it may take effect at any point after its call, or never.
//! Values are unique per write, so a write nobody read back is never needed to explain a read
//! and is left out of the search.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Write(String),
    Read(Option<String>),
}

#[derive(Debug, Clone)]
struct Op {
    call: u64,
    /// `u64::MAX`: unknown outcome (writes only).
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

    /// A write of `value` to `key`: acknowledged at `ret`, or with an unknown outcome (`None`).
    pub fn write(&self, key: &str, value: &str, call: u64, ret: Option<u64>) {
        let op = Op { call, ret: ret.unwrap_or(u64::MAX), kind: Kind::Write(value.into()) };
        self.ops.lock().unwrap().entry(key.into()).or_default().push(op);
    }

    /// A read of `key` that returned `value` (reads that failed are not recorded).
    pub fn read(&self, key: &str, value: Option<&str>, call: u64, ret: u64) {
        let op = Op { call, ret, kind: Kind::Read(value.map(String::from)) };
        self.ops.lock().unwrap().entry(key.into()).or_default().push(op);
    }

    /// (acknowledged writes, writes of unknown outcome, reads).
    pub fn counts(&self) -> (usize, usize, usize) {
        let ops = self.ops.lock().unwrap();
        let all = ops.values().flatten();
        all.fold((0, 0, 0), |(w, u, r), op| match (&op.kind, op.ret) {
            (Kind::Write(_), u64::MAX) => (w, u + 1, r),
            (Kind::Write(_), _) => (w + 1, u, r),
            (Kind::Read(_), _) => (w, u, r + 1),
        })
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

/// Whether one register's operations, starting from an absent key, are linearizable.
fn linearizable(ops: &[Op]) -> bool {
    let read: HashSet<&str> = ops
        .iter()
        .filter_map(|o| match &o.kind {
            Kind::Read(Some(v)) => Some(v.as_str()),
            _ => None,
        })
        .collect();
    let mut ops: Vec<&Op> = ops
        .iter()
        .filter(|o| match &o.kind {
            Kind::Write(v) => o.ret != u64::MAX || read.contains(v.as_str()),
            Kind::Read(_) => true,
        })
        .collect();
    ops.sort_by_key(|o| o.call);
    let mut done = vec![0u64; ops.len().div_ceil(64)];
    let mut seen = HashSet::new();
    search(&ops, &mut done, None, &mut seen)
}

/// Depth-first: linearize next any pending operation called before every pending one
/// returned; `state` is the index of the write whose value the register holds.
fn search(
    ops: &[&Op],
    done: &mut Vec<u64>,
    state: Option<usize>,
    seen: &mut HashSet<(Vec<u64>, Option<usize>)>,
) -> bool {
    let pending = || (0..ops.len()).filter(|&i| done[i / 64] & (1 << (i % 64)) == 0);
    let Some(first_ret) = pending().map(|i| ops[i].ret).min() else { return true };
    if first_ret == u64::MAX {
        // Only writes of unknown outcome are left: they may never have taken effect.
        return true;
    }
    let value = |s: Option<usize>| match s.map(|i| &ops[i].kind) {
        Some(Kind::Write(v)) => Some(v.as_str()),
        _ => None,
    };
    let candidates: Vec<usize> = pending().filter(|&i| ops[i].call < first_ret).collect();
    for i in candidates {
        let next = match &ops[i].kind {
            Kind::Write(_) => Some(i),
            Kind::Read(v) if v.as_deref() == value(state) => state,
            Kind::Read(_) => continue,
        };
        done[i / 64] |= 1 << (i % 64);
        if seen.insert((done.clone(), next)) && search(ops, done, next, seen) {
            return true;
        }
        done[i / 64] &= !(1 << (i % 64));
    }
    false
}
