//! `Spinner`: keeps a runtime worker polling for Redis-protocol requests for a short window after
//! the last one, instead of letting it go to sleep between requests (`--idle-spin-us`).
//!
//! Why: under steady request-response load (`redis-benchmark -P 1 -c 50`) the worker runs out of
//! work between requests and sleeps in `epoll_wait`; the client's next send must then wake it, and
//! the wake-up (in the client's own `sendto`) is paid by the client. timberd's worker slept 0.13
//! times per request where Redis slept 0.04, and redis-benchmark spent 5% more CPU per request
//! against timberd (`sock_def_readable` 5.3% of its samples against 3.0%). On 2 cores the client
//! and the server share the machine, so that was 5% of throughput.
//!
//! How: a task that yields in a loop. tokio runs a task that yielded only after the worker has
//! polled its reactor without blocking and run the tasks that poll woke, so each turn of the loop
//! is one non-blocking poll: a request is picked up as it arrives, and the worker never parks. The
//! loop ends once `window` has passed without a request; the task then waits for the next one.
//!
//! Invariants: an idle server does not spin (at most `window` after its last request); the spinner
//! never spins while a keyspace sync round is due, since under `--sync always` those run when a
//! worker parks (`sync_thread`) and a spinning worker would not park. `Spinner::request` costs a
//! relaxed load when the spinner is already spinning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

/// See the module documentation.
pub(crate) struct Spinner {
    /// How long the spinner keeps polling after the last request.
    window: Duration,
    /// A request came since the spinner last looked (set by connections, cleared by the spinner).
    seen: AtomicBool,
    /// The spinner waits on `wake` for the next request.
    asleep: AtomicBool,
    wake: Notify,
    /// Whether work that a worker runs when it parks is due: then the spinner stops.
    park_due: Box<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for Spinner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spinner").field("window", &self.window).finish_non_exhaustive()
    }
}

impl Spinner {
    /// A spinner that polls for `window` after each request, and stops early whenever
    /// `park_due` says a worker should park; start it with [`Spinner::run`].
    pub(crate) fn new(
        window: Duration,
        park_due: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Arc<Spinner> {
        Arc::new(Spinner {
            window,
            seen: AtomicBool::new(false),
            asleep: AtomicBool::new(false),
            wake: Notify::new(),
            park_due: Box::new(park_due),
        })
    }

    /// A connection got a request: keep spinning, or start again.
    #[inline]
    pub(crate) fn request(&self) {
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Relaxed);
        }
        // A request that slips in between the spinner's last look and its `asleep` store finds
        // it not yet asleep and does not wake it: the next request does.
        if self.asleep.load(Ordering::Relaxed) && self.asleep.swap(false, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// Whether the spinner is waiting for a request (not spinning).
    #[cfg(test)]
    fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::Relaxed)
    }

    /// Spins after each request until `stop` turns true.
    pub(crate) async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            // When the run of turns without a request began: the clock is read only on turns
            // without one, so that a busy spinner costs no clock reads (they were 1% of a
            // one-request-at-a-time XADD's profile).
            let mut idle_since: Option<Instant> = None;
            loop {
                tokio::task::yield_now().await;
                if (self.park_due)() {
                    break;
                }
                if self.seen.swap(false, Ordering::Relaxed) {
                    idle_since = None;
                } else {
                    match idle_since {
                        None => idle_since = Some(Instant::now()),
                        Some(t) if t.elapsed() >= self.window => break,
                        Some(_) => {}
                    }
                }
            }
            self.asleep.store(true, Ordering::Relaxed);
            tokio::select! {
                () = self.wake.notified() => {}
                () = crate::resp::stopped(&mut stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until `f` holds, yielding to the spinner in between.
    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn spins_after_each_request_then_sleeps_and_stops() {
        let due = Arc::new(AtomicBool::new(false));
        let d = due.clone();
        let s = Spinner::new(Duration::from_millis(20), move || d.load(Ordering::Relaxed));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(s.clone().run(rx));
        until("the spinner sleeps with no requests", || s.is_asleep()).await;
        s.request();
        assert!(!s.is_asleep(), "a request wakes the spinner");
        // While requests keep coming (more often than the window), it keeps spinning.
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(60) {
            s.request();
            assert!(!s.is_asleep(), "the spinner slept while requests kept coming");
            tokio::task::yield_now().await;
        }
        until("the spinner sleeps a window after the last request", || s.is_asleep()).await;
        // Work due at park stops it, though requests keep coming (which, as above, would keep
        // it spinning).
        due.store(true, Ordering::Relaxed);
        let mut parked = false;
        for _ in 0..1000 {
            s.request();
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            if s.is_asleep() {
                parked = true;
                break;
            }
        }
        assert!(parked, "the spinner kept spinning while a sync round was due");
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the spinner stops when told")
            .unwrap();
    }
}
