//! `ReadIndex`: the leader's linearizable-read barrier, shared by the reads that wait at the
//! same moment.
//!
//! openraft's `ensure_linearizable` confirms leadership with a round of heartbeats to a quorum
//! and then waits until the state machine applied the commit index it read at the call. Every
//! call costs its own round; under many concurrent readers the rounds, not the reads, become
//! the work. Here at most one round runs at a time; callers that arrive while it runs wait for
//! the next one, which serves all of them.
//!
//! Invariant: a caller is answered only by a round that started after it arrived (a round
//! takes its waiters before it calls openraft), so the commit index that round read is at
//! least every index committed before the caller's call: what it then reads is linearizable.

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::Raft;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::handover::Gate;
use crate::types::TypeConfig;

type Waiter = oneshot::Sender<Result<()>>;

/// The barrier of one member.
pub(crate) struct ReadIndex {
    raft: Raft<TypeConfig>,
    /// Closed while this member hands its leadership over: rounds wait.
    gate: Gate,
    state: std::sync::Arc<parking_lot::Mutex<Rounds>>,
}

#[derive(Default)]
struct Rounds {
    /// Whether a round runs (its task then serves `waiting` too, once it ends).
    running: bool,
    waiting: Vec<Waiter>,
}

impl ReadIndex {
    pub(crate) fn new(raft: Raft<TypeConfig>, gate: Gate) -> ReadIndex {
        ReadIndex { raft, gate, state: Default::default() }
    }

    /// Returns once this member, as leader, has confirmed its leadership with a quorum and
    /// applied everything committed before the call.
    pub(crate) async fn wait(&self, timeout: Duration) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock();
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            let (raft, gate) = (self.raft.clone(), self.gate.clone());
            tokio::spawn(rounds(raft, gate, self.state.clone(), timeout));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Raft("the read barrier stopped".into())),
            Err(_) => Err(unconfirmed(timeout)),
        }
    }
}

/// Runs rounds until no caller waits.
async fn rounds(
    raft: Raft<TypeConfig>,
    gate: Gate,
    state: std::sync::Arc<parking_lot::Mutex<Rounds>>,
    timeout: Duration,
) {
    loop {
        let waiting = {
            let mut st = state.lock();
            if st.waiting.is_empty() {
                st.running = false;
                return;
            }
            std::mem::take(&mut st.waiting)
        };
        let r = round(&raft, &gate, timeout).await;
        for w in waiting {
            let _ = w.send(r.as_ref().map(|_| ()).map_err(Error::for_each_caller));
        }
    }
}

/// One barrier. A confirmation that heard too few members (their heartbeat answers came after
/// its deadline, one heartbeat interval, as under load) is tried again: without a quorum the
/// caller's timeout ends the tries.
async fn round(raft: &Raft<TypeConfig>, gate: &Gate, timeout: Duration) -> Result<()> {
    let call = async {
        gate.pass().await;
        loop {
            match raft.ensure_linearizable().await {
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                r => return r,
            }
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Err(f.into()),
        Ok(Err(e)) => Err(Error::Raft(e.to_string())),
        Err(_) => Err(unconfirmed(timeout)),
    }
}

/// The pause before a confirmation that heard too few members is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(10);

fn unconfirmed(timeout: Duration) -> Error {
    Error::Unavailable(format!("no quorum confirmed the leader within {} ms", timeout.as_millis()))
}
