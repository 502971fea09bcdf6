//! `Spinner`: keeps a runtime worker polling for Redis-protocol requests for a short window after
//! the last one, instead of letting it go to sleep between requests (`--idle-spin-us`).
//!
//! Why: under steady request-response load the worker runs out of work between requests and
//! sleeps in `epoll_wait`; the client's next send must then wake it, and the wake-up (in the
//! client's own `sendto`) is paid by the client. When client and server share the machine's
//! cores, that is throughput lost.
//!
//! How: a task that yields in a loop. tokio runs a task that yielded only after the worker has
//! polled its reactor without blocking and run the tasks that poll woke, so each turn of the loop
//! is one non-blocking poll: a request is picked up as it arrives, and the worker never parks
//! (the test `a_yielding_task_keeps_the_worker_polling_without_parking` pins this for both
//! runtime flavours). The loop ends once `window` has passed without a request; the task then
//! waits for the next one.
//!
//! Invariants: an idle server does not spin (at most `window` after its last request); the spinner
//! never spins while work that runs on park is due ([`IdleWork::due`]: keyspace sync rounds and
//! journal syncs under `--sync always`), since a spinning worker would not park.
//! `Spinner::request` costs a relaxed load and store when the spinner is already spinning.
//!
//! It also tells connections whether the worker is busy: the spinner turns once each time the
//! worker polls for I/O, so a batch of requests that finds another batch ran since the last turn
//! is one of several ready at once, and the connection holds its replies until the others have
//! run (`resp::pipeline`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::IdleWork;

/// See the module documentation.
pub(crate) struct Spinner {
    /// How long the spinner keeps polling after the last request.
    window: Duration,
    /// Batches of requests run since the spinner's last turn (counted by connections, cleared by
    /// the spinner).
    batches: AtomicU32,
    /// The spinner waits on `wake` for the next request.
    asleep: AtomicBool,
    wake: Notify,
    /// Work that a worker runs when it parks: while it is due, the spinner stops.
    idle: IdleWork,
}

impl std::fmt::Debug for Spinner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spinner").field("window", &self.window).finish_non_exhaustive()
    }
}

impl Spinner {
    /// A spinner that polls for `window` after each request, and stops early whenever work of
    /// `idle` is due; start it with [`Spinner::run`].
    pub(crate) fn new(window: Duration, idle: IdleWork) -> Arc<Spinner> {
        Arc::new(Spinner {
            window,
            batches: AtomicU32::new(0),
            asleep: AtomicBool::new(false),
            wake: Notify::new(),
            idle,
        })
    }

    /// A connection got a batch of requests: keep spinning, or start again. Returns whether the
    /// worker is busy: the spinner is spinning and another batch ran since its last turn (the
    /// spinner turns once each time the worker polls for I/O, so other connections are likely
    /// still ready).
    #[inline]
    pub(crate) fn request(&self) -> bool {
        let before = self.batches.load(Ordering::Relaxed);
        self.batches.store(before.saturating_add(1), Ordering::Relaxed);
        // A request that slips in between the spinner's last look and its `asleep` store finds
        // it not yet asleep and does not wake it: the next request does.
        if self.asleep.load(Ordering::Relaxed) {
            if self.asleep.swap(false, Ordering::Relaxed) {
                self.wake.notify_one();
            }
            return false;
        }
        before > 0
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
            // without one, so that a busy spinner costs no clock reads.
            let mut idle_since: Option<Instant> = None;
            loop {
                tokio::task::yield_now().await;
                if self.idle.due() {
                    break;
                }
                if self.batches.swap(0, Ordering::Relaxed) > 0 {
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
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idle::OnPark;
    use std::sync::atomic::AtomicU64;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Work that is due when told.
    #[derive(Default)]
    struct Due(AtomicBool);

    impl OnPark for Due {
        fn due(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
        fn on_park(&self) {}
    }

    /// Counts the parks of a runtime's workers (always due, so the hook calls it at each).
    #[derive(Default)]
    struct Parks(AtomicU64);

    impl OnPark for Parks {
        fn due(&self) -> bool {
            true
        }
        fn on_park(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// What the spinner relies on from tokio: a task that yields in a loop lets the worker
    /// poll its reactor (a socket read completes) and keeps it from parking meanwhile.
    #[test]
    fn a_yielding_task_keeps_the_worker_polling_without_parking() {
        let flavours: [fn() -> tokio::runtime::Builder; 2] =
            [tokio::runtime::Builder::new_current_thread, || {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(1);
                b
            }];
        for flavour in flavours {
            let idle = IdleWork::new();
            let parks = Arc::new(Parks::default());
            let _registered = idle.register(parks.clone());
            let mut rt = flavour();
            rt.enable_all();
            idle.install(&mut rt);
            let rt = rt.build().unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            server.set_nonblocking(true).unwrap();
            let (go, went) = std::sync::mpsc::channel::<()>();
            let writer = std::thread::spawn(move || {
                went.recv().unwrap();
                std::io::Write::write_all(&mut client, b"x").unwrap();
                client
            });
            let parks_while_spinning = rt.block_on(async move {
                let mut server = tokio::net::TcpStream::from_std(server).unwrap();
                let spinning = Arc::new(AtomicBool::new(true));
                let parks_then = Arc::new(AtomicU64::new(u64::MAX));
                let spin = tokio::spawn({
                    let (spinning, parks, parks_then) =
                        (spinning.clone(), parks.clone(), parks_then.clone());
                    async move {
                        let mut turns = 0u64;
                        let start = parks.0.load(Ordering::SeqCst);
                        go.send(()).unwrap();
                        while spinning.load(Ordering::SeqCst) {
                            tokio::task::yield_now().await;
                            turns += 1;
                            assert!(turns < 100_000_000, "the read never completed");
                        }
                        parks_then.store(parks.0.load(Ordering::SeqCst) - start, Ordering::SeqCst);
                    }
                });
                let read = tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    server.read_exact(&mut b).await.unwrap();
                    spinning.store(false, Ordering::SeqCst);
                    server.write_all(b"y").await.unwrap();
                });
                read.await.unwrap();
                spin.await.unwrap();
                parks_then.load(Ordering::SeqCst)
            });
            writer.join().unwrap();
            assert_eq!(parks_while_spinning, 0, "the worker parked while a task spun");
        }
    }

    /// Waits (bounded) until `f` holds, yielding to the spinner in between.
    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Yields until the spinner has taken a turn since the last batch (bounded).
    async fn until_turn(s: &Spinner) {
        for _ in 0..1000 {
            if s.batches.load(Ordering::Relaxed) == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the spinner took no turn in 1000 yields");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_worker_is_busy_when_a_second_batch_runs_before_the_spinner_turns() {
        // Each assertion below holds whether or not the spinner fell asleep between them.
        let s = Spinner::new(Duration::from_millis(20), IdleWork::new());
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(s.clone().run(rx));
        until("the spinner sleeps with no requests", || s.is_asleep()).await;
        assert!(!s.request(), "a batch that wakes a sleeping spinner finds the worker idle");
        until_turn(&s).await;
        assert!(!s.request(), "the first batch since the spinner's turn finds the worker idle");
        assert!(s.request(), "a second batch before the spinner's turn finds the worker busy");
        assert!(s.request(), "and so does a third");
        until_turn(&s).await;
        assert!(!s.request(), "after the spinner's turn the worker is idle again");
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the spinner stops when told")
            .unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn spins_after_each_request_then_sleeps_and_stops() {
        let idle = IdleWork::new();
        let due = Arc::new(Due::default());
        let _registered = idle.register(due.clone());
        let s = Spinner::new(Duration::from_millis(20), idle);
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
        due.0.store(true, Ordering::Relaxed);
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
