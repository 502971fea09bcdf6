//! `Proposals`: the leader's write queue. Proposals that wait at the same moment go into one
//! Raft entry.
//!
//! openraft 0.9 appends, replicates and applies each `client_write` as its own entry, one after
//! the other in its core task, with a log append per entry: under many concurrent writers the
//! per-entry work, not the disk or the network, sets the pace. Here at most [`ROUNDS`] entries
//! are in flight; proposals that arrive while they are wait in the queue, and the next free
//! round takes all of them (up to [`MAX_ENTRY_BYTES`]) as one entry. A lone writer pays no
//! wait: with a round free, its proposal leaves at once.
//!
//! Invariants: proposals merged into an entry keep their order (a later write to a key wins,
//! as if each had been its own entry, one after the other) and are applied atomically
//! together, which keeps each proposal atomic; every caller hears the outcome of the entry
//! that carries its proposal, and only of that one.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{LogId, Raft};
use tokio::sync::{oneshot, Semaphore};

use crate::error::{Error, Result};
use crate::handover::Gate;
use crate::types::{Proposal, TypeConfig};

/// Entries in flight at once (proposed, not yet applied). openraft works through entries one
/// by one: fewer, larger entries commit more writes per second than many small ones.
const ROUNDS: usize = 2;
/// A round stops taking proposals once its entry holds this many bytes of keys and values
/// (a single larger proposal still goes alone).
const MAX_ENTRY_BYTES: usize = 1 << 20;

struct Waiting {
    proposal: Proposal,
    timeout: Duration,
    reply: oneshot::Sender<Result<Written>>,
}

/// A proposal's fate: the entry that carried it, and per guarded op of the proposal whether
/// it was applied.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    pub(crate) log_id: LogId<u64>,
    pub(crate) guards: Vec<bool>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    /// Whether a task hands the queue to rounds (it ends when the queue is empty).
    draining: bool,
}

/// The write queue of one member.
pub(crate) struct Proposals {
    raft: Raft<TypeConfig>,
    /// Closed while this member hands its leadership over: entries wait to be proposed.
    gate: Gate,
    queue: Arc<parking_lot::Mutex<Queue>>,
    rounds: Arc<Semaphore>,
}

impl Proposals {
    pub(crate) fn new(raft: Raft<TypeConfig>, gate: Gate) -> Proposals {
        let rounds = Arc::new(Semaphore::new(ROUNDS));
        Proposals { raft, gate, queue: Default::default(), rounds }
    }

    /// Replicates `proposal`; returns the id of the entry that carried it once a majority
    /// stored it and this member applied it, with the outcome of its guarded ops.
    pub(crate) async fn propose(&self, proposal: Proposal, timeout: Duration) -> Result<Written> {
        // Nobody waits and a round is free: this proposal is the entry, proposed from the
        // caller's task (a lone writer pays no hop to the queue's tasks).
        let alone = {
            let q = self.queue.lock();
            match q.waiting.is_empty() && !q.draining {
                true => self.rounds.clone().try_acquire_owned().ok(),
                false => None,
            }
        };
        if let Some(permit) = alone {
            let r = write(&self.raft, &self.gate, proposal, timeout).await;
            drop(permit);
            return r;
        }
        let (reply, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock();
            q.waiting.push_back(Waiting { proposal, timeout, reply });
            !std::mem::replace(&mut q.draining, true)
        };
        if start {
            let (raft, gate) = (self.raft.clone(), self.gate.clone());
            tokio::spawn(drain(raft, gate, self.queue.clone(), self.rounds.clone()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Raft("the write queue stopped".into())),
            Err(_) => Err(uncommitted(timeout)),
        }
    }
}

impl Proposals {
    /// Returns once every proposal handed to Raft before the call is in the log or never
    /// will be: takes every round, so those in flight first hand their entries to Raft (and
    /// finish or time out), then appends an empty entry behind them (Raft takes entries in the
    /// order they are handed over) and waits until it is applied here. Its log id.
    pub(crate) async fn barrier(&self, timeout: Duration) -> Result<LogId<u64>> {
        let rounds = self.rounds.clone().acquire_many_owned(ROUNDS as u32);
        let Ok(Ok(all)) = tokio::time::timeout(timeout, rounds).await else {
            return Err(uncommitted(timeout));
        };
        let r = write(&self.raft, &self.gate, Proposal::default(), timeout).await;
        drop(all);
        r.map(|w| w.log_id)
    }
}

/// Hands the queue to rounds as they free up, until it is empty.
async fn drain(
    raft: Raft<TypeConfig>,
    gate: Gate,
    queue: Arc<parking_lot::Mutex<Queue>>,
    rounds: Arc<Semaphore>,
) {
    loop {
        let Ok(permit) = rounds.clone().acquire_owned().await else { return };
        let taken = {
            let mut q = queue.lock();
            let mut taken = Vec::new();
            let mut bytes = 0;
            while let Some(w) = q.waiting.front() {
                if w.reply.is_closed() {
                    // Its caller gave up (timed out, and was told the write may still commit):
                    // proposing it now would apply an evaluation older than later writes.
                    q.waiting.pop_front();
                    continue;
                }
                let size = w.proposal.size();
                // A range removal is an entry of its own (its apply may take several batches
                // and is replayed whole, which only removals allow).
                let alone = w.proposal.removes_ranges();
                if !taken.is_empty() && (bytes + size > MAX_ENTRY_BYTES || alone) {
                    break;
                }
                bytes += size;
                taken.extend(q.waiting.pop_front());
                if alone {
                    break;
                }
            }
            if taken.is_empty() {
                q.draining = false;
                return;
            }
            taken
        };
        let (raft, gate) = (raft.clone(), gate.clone());
        tokio::spawn(async move {
            round(&raft, &gate, taken).await;
            drop(permit);
        });
    }
}

/// Proposes the waiting proposals as one entry and tells each caller the outcome.
async fn round(raft: &Raft<TypeConfig>, gate: &Gate, taken: Vec<Waiting>) {
    let timeout = taken.iter().map(|w| w.timeout).max().unwrap_or_default();
    // Each caller's reply, with how many guarded ops its proposal brought.
    let (entry, replies) = match <[Waiting; 1]>::try_from(taken) {
        Ok([one]) => {
            let guards = one.proposal.guards();
            (one.proposal, vec![(one.reply, guards)])
        }
        Err(taken) => {
            let mut entry = Proposal::default();
            entry.ops.reserve(taken.iter().map(|w| w.proposal.ops.len()).sum());
            let mut replies = Vec::with_capacity(taken.len());
            for w in taken {
                replies.push((w.reply, w.proposal.guards()));
                entry.ops.extend(w.proposal.ops);
            }
            (entry, replies)
        }
    };
    let r = write(raft, gate, entry, timeout).await;
    // The entry's guard outcomes are in the order of its guarded ops: each caller's run of them.
    let mut from = 0;
    for (reply, guards) in replies {
        let mine = r.as_ref().map_err(Error::for_each_caller).and_then(|w| {
            let mine = w.guards.get(from..from + guards).ok_or_else(|| {
                Error::Raft(format!(
                    "an entry of {} guards answered {}",
                    from + guards,
                    w.guards.len()
                ))
            })?;
            Ok(Written { log_id: w.log_id, guards: mine.to_vec() })
        });
        from += guards;
        let _ = reply.send(mine);
    }
}

/// Proposes one entry (once the gate is open) and waits until it is applied here.
async fn write(
    raft: &Raft<TypeConfig>,
    gate: &Gate,
    entry: Proposal,
    timeout: Duration,
) -> Result<Written> {
    let call = async {
        gate.pass().await;
        raft.client_write(entry).await
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(resp)) => Ok(Written { log_id: resp.log_id, guards: resp.data.guards }),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(f.into()),
        Ok(Err(e)) => Err(Error::Raft(e.to_string())),
        Err(_) => Err(uncommitted(timeout)),
    }
}

fn uncommitted(timeout: Duration) -> Error {
    Error::Unavailable(format!("no quorum committed the write within {} ms", timeout.as_millis()))
}
