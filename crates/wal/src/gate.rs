//! The group-commit gate: which threads sync the log and which wait for them.
//!
//! At most `Options::syncs_in_flight` threads sync at a time, each in a slot of its own, or one
//! thread truncates, holding every slot; the others park with the sequence number they wait for.
//! A leader that made records durable unparks the waiters it covered and one other, who may lead
//! next (`Leader::finish`).
//!
//! Invariant: the durable point never passes a record whose sync failed. Syncs that overlap
//! publish in the order they took their flush point (`tickets`, `wait_turn`, `end_turn`): a sync
//! that ends first waits for the earlier ones, and publishes nothing if one of them failed (the
//! log is poisoned then).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::thread;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

/// The longest a group-commit leader waits for released appenders to come back (`Gate::gather`).
const MAX_GATHER_NS: u64 = 500_000;

/// `Gate::slots` when a truncation holds the gate: every slot, and more.
const EXCLUSIVE: u32 = u32::MAX;

/// Leadership for group commit: at most `Options::syncs_in_flight` threads at a time sync, each
/// in a slot of its own, or one thread truncates, holding every slot. The others park with the
/// sequence number they wait for. A leader that made records durable unparks, without a lock
/// handoff, the waiters it covered and one other (who may lead next); the rest stay parked, so a
/// sync does not wake every appender that arrived during it only to park it again. A leader that
/// ends otherwise (a truncation, an error) unparks everyone. A woken thread re-checks whether it
/// still needs to lead.
///
/// Syncs that overlap publish in the order they took their flush point (`ticket`): a sync that
/// ends first waits for the earlier ones, and publishes nothing if one of them failed (the log
/// is poisoned then), so the durable point never passes a record whose sync failed.
pub(crate) struct Gate {
    /// Bit `i` set: slot `i` syncs. `EXCLUSIVE`: a truncation holds the gate.
    slots: AtomicU32,
    /// Number of sync slots.
    width: u32,
    /// Calls of `wait_durable` so far.
    pub(crate) arrivals: AtomicU64,
    /// `arrivals` when the last leader finished, and how many threads it released then (those
    /// whose records it made durable, and itself).
    pub(crate) released_at: AtomicU64,
    released: AtomicU64,
    /// How long the last fsync took, in nanoseconds.
    pub(crate) last_fsync_ns: AtomicU64,
    /// Tickets handed out to leaders (under the state lock, with their flush), and the first
    /// ticket whose sync has not ended in order.
    pub(crate) tickets: AtomicU64,
    published: Mutex<u64>,
    published_cv: Condvar,
    /// Parked threads and what they wait for (`u64::MAX`: leadership itself). A thread may
    /// appear twice after a spurious wakeup; that costs an extra unpark, nothing else.
    waiters: Mutex<Vec<(u64, thread::Thread)>>,
}

/// Leadership of the gate: one sync slot (`slot`), or all of them (`None`, a truncation).
pub(crate) struct Leader<'a> {
    gate: &'a Gate,
    pub(crate) slot: Option<u32>,
}

impl Gate {
    pub(crate) fn new(width: u32) -> Gate {
        assert!((1..32).contains(&width), "validated by Options");
        Gate {
            slots: AtomicU32::new(0),
            width,
            arrivals: AtomicU64::new(0),
            released_at: AtomicU64::new(0),
            released: AtomicU64::new(0),
            last_fsync_ns: AtomicU64::new(0),
            tickets: AtomicU64::new(0),
            published: Mutex::new(0),
            published_cv: Condvar::new(),
            waiters: Mutex::new(Vec::new()),
        }
    }

    /// Takes a free sync slot, or with `exclusive` every slot once none is taken.
    fn try_take(&self, exclusive: bool) -> Option<Option<u32>> {
        let mut cur = self.slots.load(Ordering::Acquire);
        loop {
            let (slot, want) = if exclusive {
                if cur != 0 {
                    return None;
                }
                (None, EXCLUSIVE)
            } else {
                let free = (!cur).trailing_zeros();
                if cur == EXCLUSIVE || free >= self.width {
                    return None;
                }
                (Some(free), cur | 1 << free)
            };
            match self.slots.compare_exchange_weak(cur, want, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(slot),
                Err(now) => cur = now,
            }
        }
    }

    fn can_take(&self, exclusive: bool) -> bool {
        let cur = self.slots.load(Ordering::Acquire);
        if exclusive {
            cur == 0
        } else {
            cur != EXCLUSIVE && (!cur).trailing_zeros() < self.width
        }
    }

    /// Waits until this thread may lead a sync, or until `unneeded()` holds (then `None`).
    /// `target` is the durable point that makes it unneeded.
    pub(crate) fn lead_unless(
        &self,
        target: u64,
        unneeded: impl Fn() -> bool,
    ) -> Option<Leader<'_>> {
        self.take(target, false, unneeded)
    }

    /// Takes the whole gate, once no sync is under way.
    pub(crate) fn lead(&self) -> Leader<'_> {
        self.take(u64::MAX, true, || false).expect("leadership is always needed")
    }

    fn take(
        &self,
        target: u64,
        exclusive: bool,
        unneeded: impl Fn() -> bool,
    ) -> Option<Leader<'_>> {
        loop {
            if unneeded() {
                return None;
            }
            if let Some(slot) = self.try_take(exclusive) {
                return Some(Leader { gate: self, slot });
            }
            self.waiters.lock().push((target, thread::current()));
            // A leader may have finished between the attempt and the registration; an entry
            // left behind only causes a spurious wakeup later, which the loop absorbs.
            if unneeded() || self.can_take(exclusive) {
                continue;
            }
            thread::park();
        }
    }

    /// Before a leader syncs, gives the threads the previous leader released time to append
    /// again, so that one sync covers them all: without this, the first of them to come back led
    /// a sync of little more than its own record while the rest were still waking, and syncs
    /// alternated between small and large groups. Waits until as many appenders arrived as were
    /// released, counted from the later of the last release and the last leader's flush point
    /// (so that a leader starting while another syncs gathers those who arrived after that one's
    /// group), for at most half the last fsync's duration (and never more than `MAX_GATHER_NS`),
    /// yielding the CPU meanwhile.
    /// A lone appender, or one whose records another sync covered, never waits.
    pub(crate) fn gather(&self) {
        let expected = self.released.load(Ordering::Acquire);
        if expected <= 1 {
            return;
        }
        let mark = self.released_at.load(Ordering::Acquire);
        let bound = (self.last_fsync_ns.load(Ordering::Relaxed) / 2).min(MAX_GATHER_NS);
        let start = Instant::now();
        while self.arrivals.load(Ordering::Acquire).saturating_sub(mark) < expected
            && (start.elapsed().as_nanos() as u64) < bound
        {
            thread::yield_now();
        }
    }

    /// Waits until every sync with a smaller ticket has ended.
    pub(crate) fn wait_turn(&self, ticket: u64) {
        let mut published = self.published.lock();
        while *published < ticket {
            self.published_cv.wait(&mut published);
        }
    }

    /// Ends the sync with `ticket` (whose turn it is), letting the next one publish.
    pub(crate) fn end_turn(&self, ticket: u64) {
        let mut published = self.published.lock();
        debug_assert_eq!(*published, ticket);
        *published = ticket + 1;
        self.published_cv.notify_all();
    }

    /// Unparks the waiters whose records became durable other than by a leader (a sealed
    /// segment). Everything appended before the seal is covered, so no waiter that a leader
    /// left parked is stranded when the one it woke to lead next finds nothing left to do.
    pub(crate) fn wake_covered(&self, durable: u64) {
        let mut woken = Vec::new();
        self.waiters.lock().retain(|(target, t)| {
            let covered = *target <= durable;
            if covered {
                woken.push(t.clone());
            }
            !covered
        });
        for t in woken {
            t.unpark();
        }
    }
}

impl Leader<'_> {
    fn release(&self) {
        match self.slot {
            Some(slot) => self.gate.slots.fetch_and(!(1 << slot), Ordering::AcqRel),
            None => self.gate.slots.swap(0, Ordering::AcqRel),
        };
    }

    /// Ends a leadership that made everything below `durable` durable: unparks the waiters that
    /// covers and the first of the others, who leads next (or finds its records covered by a
    /// leader that came first, which then wakes the next one the same way).
    pub(crate) fn finish(self, durable: u64) {
        let gate = self.gate;
        self.release();
        std::mem::forget(self);
        let woken = {
            let mut waiters = gate.waiters.lock();
            let all = std::mem::take(&mut *waiters);
            let mut woken = Vec::with_capacity(all.len());
            let mut next_leader = false;
            for (target, t) in all {
                if target <= durable {
                    woken.push(t);
                } else if !next_leader {
                    next_leader = true;
                    woken.push(t);
                } else {
                    waiters.push((target, t));
                }
            }
            // Those it covered, and itself; counted before any of them is unparked.
            let covered = woken.len() - usize::from(next_leader);
            gate.released_at.store(gate.arrivals.load(Ordering::Acquire), Ordering::Release);
            gate.released.store(covered as u64 + 1, Ordering::Release);
            woken
        };
        for t in woken {
            t.unpark();
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.release();
        let waiters = std::mem::take(&mut *self.gate.waiters.lock());
        for (_, t) in waiters {
            t.unpark();
        }
    }
}
