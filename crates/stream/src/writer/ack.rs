//! Acks: an [`Ack`] per entry sent, resolved through the [`Slot`] it shares with every other
//! entry of its fragment (or journal record), so that nothing is allocated per entry.
//!
//! Invariant: every slot is resolved exactly once (the first outcome wins); a [`Pending`] slot
//! that is dropped unresolved (the flusher or the writer went away) resolves with
//! [`Error::Closed`], so no ack waits forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// The outcome of one fragment, shared by the acks of its entries.
#[derive(Debug, Default)]
pub(super) struct Slot {
    pub(super) outcome: OnceLock<std::result::Result<(), Arc<Error>>>,
    pub(super) wakers: Mutex<Vec<Waker>>,
}

impl Slot {
    /// Sets the outcome (the first one wins) and wakes every waiting ack.
    pub(super) fn resolve(&self, r: std::result::Result<(), Arc<Error>>) {
        if self.outcome.set(r).is_ok() {
            let wakers = std::mem::take(&mut *self.wakers.lock());
            for w in wakers {
                w.wake();
            }
        }
    }
}

/// A slot the writer still owes an outcome: dropping it unresolved (the flusher or the writer
/// went away) resolves it with [`Error::Closed`].
#[derive(Debug)]
pub(super) struct Pending(pub(super) Arc<Slot>);

impl Pending {
    pub(super) fn new() -> Pending {
        Pending(Arc::default())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.resolve(Err(Arc::new(Error::Closed)));
    }
}

/// Resolves to the id of an entry once it is durable, or to the error that kept it from being.
#[derive(Debug)]
#[must_use = "an Ack tells whether the entry became durable"]
pub struct Ack {
    pub(super) id: u64,
    pub(super) slot: Arc<Slot>,
    /// Where this ack's waker sits in the slot's list, once registered.
    pub(super) waker_at: Option<usize>,
}

impl Ack {
    fn outcome(&self) -> Option<Result<u64>> {
        self.slot.outcome.get().map(|r| match r {
            Ok(()) => Ok(self.id),
            Err(e) => Err(Error::for_pending(e)),
        })
    }
}

impl Future for Ack {
    type Output = Result<u64>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<u64>> {
        if let Some(r) = self.outcome() {
            return Poll::Ready(r);
        }
        let slot = self.slot.clone();
        let mut wakers = slot.wakers.lock();
        // Checked again under the lock that `resolve` takes after setting the outcome.
        if let Some(r) = self.outcome() {
            return Poll::Ready(r);
        }
        match self.waker_at.and_then(|i| wakers.get_mut(i)) {
            Some(waker) => {
                if !waker.will_wake(cx.waker()) {
                    *waker = cx.waker().clone();
                }
            }
            _ => {
                self.waker_at = Some(wakers.len());
                wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}
