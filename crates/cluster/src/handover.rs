//! Leadership transfer: the leader hands its leadership to another voter (`timber cluster
//! transfer-leader`), for a rolling restart or to move the load off a machine.
//!
//! openraft 0.9 has no transfer of its own, and its voters refuse to vote for anyone while the
//! leader they follow holds its lease (heard from within `election_timeout_max`); they call an
//! election of their own only after the lease and a randomized election timeout more. The
//! leader therefore: pauses its writes and linearizable reads (each would reach the followers
//! and renew the lease; they wait at the [`Gate`]); waits until the target's log holds all of
//! its own; stops its heartbeats and its own campaigns; lets the lease run out; and then asks
//! the target to call an election at once. The target's log is as long as any, so it wins
//! before any other follower's timer fires. Whatever the outcome, the leader then resumes
//! heartbeats and campaigns and opens the gate; the calls that waited there find it no longer
//! leads (a retryable error, as after any election) or, if the transfer failed, go on.
//!
//! Safety does not rest on any of this: an election is an election, and Raft's vote rules keep
//! every committed entry whoever wins. The steps only make the target the likely winner.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::membership::{self, addr_of, Control};

/// Where writes and linearizable reads wait while this member hands its leadership over.
#[derive(Clone)]
pub(crate) struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Gate {
        Gate(Arc::new(watch::Sender::new(false)))
    }
}

impl Gate {
    /// Returns at once unless a transfer runs; else once it ended.
    pub(crate) async fn pass(&self) {
        if !*self.0.borrow() {
            return;
        }
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: `wait_for` ends only when the gate opens.
        let _ = rx.wait_for(|closed| !closed).await;
    }

    /// Closes the gate until the returned guard drops; `None` if a transfer runs already.
    fn close(&self) -> Option<Closed> {
        (!self.0.send_replace(true)).then(|| Closed(self.clone()))
    }
}

/// The gate closed by one transfer.
struct Closed(Gate);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0 .0.send_replace(false);
    }
}

/// Heartbeats and campaigns of this member switched off until the guard drops.
struct Quiet<'a>(&'a Control);

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        self.0.raft.runtime_config().heartbeat(true);
        self.0.raft.runtime_config().elect(true);
    }
}

/// Hands this member's leadership to the voter `target`, within `timeout`. This member must
/// lead (the caller checked).
pub(crate) async fn transfer(control: &Control, target: u64, timeout: Duration) -> Result<()> {
    if target == control.id {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let m = control.raft.metrics().borrow().clone();
    if !m.membership_config.membership().voter_ids().any(|v| v == target) {
        return Err(Error::Config(format!("member {target} is not a voter of this cluster")));
    }
    let Some(addr) = addr_of(&m, target) else {
        return Err(Error::Config(format!("member {target} has no address")));
    };
    let Some(_closed) = control.gate.close() else {
        return Err(Error::Unavailable("a leadership transfer is running already".into()));
    };
    caught_up(control, target, left()).await?;
    let raft = &control.raft;
    raft.runtime_config().heartbeat(false);
    raft.runtime_config().elect(false);
    let _quiet = Quiet(control);
    // The followers' lease on this leader runs from the last message they had from it: at
    // the latest, the replication `caught_up` waited for.
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    tokio::time::sleep((lease + lease / 10).min(left())).await;
    let channel = control.network.channel(&addr).map_err(Error::Unavailable)?;
    membership::elect(channel, &addr, target, left()).await?;
    let led = raft
        .wait(Some(left()))
        .metrics(|m| m.current_leader.is_some_and(|l| l != control.id), "a new leader")
        .await
        .map_err(|_| {
            Error::Unavailable(format!(
                "member {target} did not take the leadership within {} ms",
                timeout.as_millis()
            ))
        })?;
    match led.current_leader {
        Some(l) if l == target => Ok(()),
        other => Err(Error::Unavailable(format!(
            "member {} won the election instead of member {target}",
            other.map_or("?".into(), |l| l.to_string())
        ))),
    }
}

/// Waits until `target` holds every entry of this member's log, which grows no more (the gate
/// is closed; an entry handed to Raft just before may still land, hence the loop).
async fn caught_up(control: &Control, target: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = control.raft.metrics().borrow().last_log_index;
        let left = deadline.saturating_duration_since(Instant::now());
        control
            .raft
            .wait(Some(left))
            .metrics(
                |m| {
                    let matched = m.replication.as_ref().and_then(|r| r.get(&target).cloned());
                    matched.flatten().map(|l| l.index) >= last
                },
                "the target caught up",
            )
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "member {target} did not catch up with the leader's log within {} ms",
                    timeout.as_millis()
                ))
            })?;
        if control.raft.metrics().borrow().last_log_index == last {
            return Ok(());
        }
    }
}
