//! `SyncRounds`: makes the keyspace's writes durable for every connection that waits on it, so
//! that under `--sync always` a connection awaits its fsync instead of blocking a runtime
//! worker, and the writes of all connections waiting at once share one fsync.
//!
//! When a round starts: on a runtime whose [`IdleWork`] is installed (timberd's), once a worker
//! is about to park, as Redis syncs before its event loop sleeps: every connection whose request
//! was ready by then has written and waits, and one fsync covers them all. Otherwise the first
//! waiter starts a round, and the connections still running join the next. A round that waits
//! for a parking worker waits at most [`MAX_DELAY`] after its first waiter, in case no worker
//! runs out of tasks.
//!
//! On such a runtime a round also gathers: it waits until as many connections wait as the last
//! round answered plus those that were already queued when it ended (every connection of the
//! last cycle, back with its next write), for at most as long as the last sync took (never more
//! than `MAX_DELAY`). Without this, the first connection to come back finds the worker idle and
//! starts a round of its own while the others are still on their way, and each fsync covers
//! fewer writes than Redis's does (Redis's event loop, blocked in its fsync, gathers every
//! client by itself). A lone connection never waits.
//!
//! Who syncs: the parking worker itself, in the park hook, as Redis syncs in its event loop, so
//! that no other thread wakes or is woken; it then pokes the reactor ([`Poke`]) so that it wakes
//! at once for the connections the round answered. A round of pipelined writes (more than two
//! per waiter) goes to the sync thread instead: while it syncs, the worker parses and runs the
//! next requests the clients have already sent, which an inline round would leave waiting. The
//! thread also takes the rounds no parking worker takes within `MAX_DELAY`.
//!
//! Invariant: a waiter registered after its writes were appended is answered only by a sync
//! that started after it registered, which covers those writes; a failed sync fails every
//! waiter of its round (and the engine refuses writes from then on).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use timber_kv::Db;
use tokio::sync::oneshot;

use super::{IdleWork, OnPark, Poke, Registration, MAX_DELAY};

/// Rounds run by the parking worker itself (see the module documentation).
struct Inline {
    db: Arc<Db>,
    /// Poked after each inline round.
    poke: Poke,
}

type Waiter = oneshot::Sender<Result<(), Arc<timber_kv::Error>>>;

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiter>,
    /// When the first of `waiting` came.
    since: Option<Instant>,
    /// Writes the waiters wait for (as they count them).
    writes: usize,
    /// A worker went idle with waiters queued: start the round.
    kicked: bool,
    stop: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// `queue.waiting` is not empty (read by the idle hook without the lock).
    waiting: AtomicBool,
    /// Rounds wait for a worker to go idle.
    on_idle: bool,
    /// Rounds (syncs) so far, and how many of them ran inline.
    rounds: AtomicU64,
    inline_rounds: AtomicU64,
    /// Set if idle workers run the rounds.
    inline: Option<Inline>,
    /// Times a round waited to gather more waiters.
    gathers: std::sync::atomic::AtomicU64,
    /// How long a round gathers at most, if not as long as the last sync took, and how long a
    /// round waits for an idle worker at most (`MAX_DELAY`; both longer in tests).
    gather_for: Option<Duration>,
    max_delay: Duration,
}

impl Shared {
    fn new(on_idle: bool) -> Shared {
        Shared {
            queue: Mutex::default(),
            wake: Condvar::new(),
            waiting: AtomicBool::new(false),
            on_idle,
            rounds: Default::default(),
            inline_rounds: Default::default(),
            inline: None,
            gathers: Default::default(),
            gather_for: None,
            max_delay: MAX_DELAY,
        }
    }

    /// A worker went idle: the round may start.
    fn kick(&self) {
        self.queue.lock().kicked = true;
        self.wake.notify_one();
    }

    /// Takes the queued waiters as a round (the queue lock held).
    fn take_round(&self, q: &mut Queue) -> Vec<Waiter> {
        q.kicked = false;
        q.since = None;
        q.writes = 0;
        self.waiting.store(false, Ordering::Release);
        std::mem::take(&mut q.waiting)
    }

    /// Answers a round's waiters with the outcome of its sync.
    fn answer(&self, round: Vec<Waiter>, r: Result<(), Arc<timber_kv::Error>>) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        for w in round {
            let _ = w.send(r.clone());
        }
    }

    /// A worker is about to park: it runs the round (if the thread has not taken it, and the
    /// waiters did not pipeline), then pokes its reactor so that it runs the tasks the round
    /// woke before it sleeps.
    fn round_inline(&self, inline: &Inline) {
        let round = {
            let mut q = self.queue.lock();
            if q.waiting.is_empty() || q.stop {
                return;
            }
            if q.writes > 2 * q.waiting.len() {
                q.kicked = true;
                drop(q);
                self.wake.notify_one();
                return;
            }
            self.take_round(&mut q)
        };
        self.answer(round, inline.db.sync().map_err(Arc::new));
        self.inline_rounds.fetch_add(1, Ordering::Relaxed);
        inline.poke.poke();
    }
}

impl OnPark for Shared {
    fn due(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    fn on_park(&self) {
        match &self.inline {
            Some(inline) => self.round_inline(inline),
            None => self.kick(),
        }
    }
}

/// The sync rounds of one database: see the module documentation.
pub(crate) struct SyncRounds {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// With an installed [`IdleWork`]: parking workers start or run the rounds until this drops.
    registration: Mutex<Option<Registration>>,
}

impl SyncRounds {
    /// Starts the rounds of `db`. Inside a runtime that runs `idle`'s work when it parks, the
    /// parking workers run them; otherwise the sync thread does, as waiters come.
    pub(crate) fn start(db: Arc<Db>, idle: &IdleWork) -> std::io::Result<SyncRounds> {
        if !idle.hooked() {
            return SyncRounds::start_shared(db, Shared::new(false), None);
        }
        let shared = match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let inline = Inline { db: db.clone(), poke: Poke::new(&rt)? };
                Shared { inline: Some(inline), ..Shared::new(true) }
            }
            Err(_) => Shared::new(true),
        };
        SyncRounds::start_shared(db, shared, Some(idle))
    }

    fn start_shared(
        db: Arc<Db>,
        shared: Shared,
        idle: Option<&IdleWork>,
    ) -> std::io::Result<SyncRounds> {
        let shared = Arc::new(shared);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("timber-keyspace-sync".into())
            .spawn(move || run(&db, &s))?;
        let registration = idle.map(|i| i.register(shared.clone()));
        Ok(SyncRounds {
            shared,
            thread: Mutex::new(Some(thread)),
            registration: Mutex::new(registration),
        })
    }

    /// Resolves once every write appended before this call is durable; the caller waits for
    /// `writes` of them (pipelined callers wait for many). After [`stop`], it fails with the
    /// engine's `Closed` error.
    ///
    /// [`stop`]: SyncRounds::stop
    pub(crate) fn durable(
        &self,
        writes: usize,
    ) -> impl std::future::Future<Output = Result<(), Arc<timber_kv::Error>>> + use<> {
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut q = self.shared.queue.lock();
            if !q.stop {
                if q.waiting.is_empty() {
                    q.since = Some(Instant::now());
                    self.shared.waiting.store(true, Ordering::Release);
                }
                q.waiting.push(tx);
                q.writes += writes;
            }
            // When parking workers start rounds, only the first waiter wakes the thread (which
            // then waits for a park, or `MAX_DELAY`).
            !q.stop && (!self.shared.on_idle || q.waiting.len() == 1)
        };
        if wake {
            self.shared.wake.notify_one();
        }
        // A dropped sender (stopped, or the thread died) reads as a closed engine.
        async move { rx.await.unwrap_or_else(|_| Err(Arc::new(timber_kv::Error::Closed))) }
    }

    /// Answers the waiters still queued, then stops the thread and waits for it.
    pub(crate) fn stop(&self) {
        self.registration.lock().take();
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for SyncRounds {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for SyncRounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncRounds").finish_non_exhaustive()
    }
}

fn run(db: &Db, shared: &Shared) {
    // Waiters the next round gathers, and until when (see the module documentation).
    let mut expected = 0usize;
    let mut gather_until = Instant::now();
    loop {
        let round = {
            let mut q = shared.queue.lock();
            loop {
                if q.stop {
                    break;
                }
                let Some(since) = q.since.filter(|_| !q.waiting.is_empty()) else {
                    shared.wake.wait(&mut q);
                    continue;
                };
                if !shared.on_idle {
                    break;
                }
                let now = Instant::now();
                let late = since + shared.max_delay;
                let gathered = q.waiting.len() >= expected || now >= gather_until;
                if (gathered && q.kicked) || now >= late {
                    break;
                }
                // Wait for the idle worker, whose every park wakes this thread again.
                let due = if gathered {
                    late
                } else {
                    shared.gathers.fetch_add(1, Ordering::Relaxed);
                    gather_until.min(late)
                };
                shared.wake.wait_until(&mut q, due);
            }
            if q.waiting.is_empty() {
                return;
            }
            shared.take_round(&mut q)
        };
        let start = Instant::now();
        let r = db.sync().map_err(Arc::new);
        let took = start.elapsed();
        let answered = round.len();
        shared.answer(round, r);
        expected = answered + shared.queue.lock().waiting.len();
        gather_until = Instant::now() + shared.gather_for.unwrap_or(took.min(shared.max_delay));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_are_answered_and_stop_drains_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), timber_kv::Options::default()).unwrap());
        let t = SyncRounds::start(db.clone(), &IdleWork::new()).unwrap();
        db.put(b"a", b"1").unwrap();
        let waits: Vec<_> = (0..10).map(|_| t.durable(1)).collect();
        for w in waits {
            w.await.unwrap();
        }
        t.stop();
        let closed = t.durable(1).await.unwrap_err();
        assert!(matches!(*closed, timber_kv::Error::Closed), "{closed}");
    }

    /// A runtime of one worker that runs `idle`'s work when it parks.
    fn hooked_runtime(idle: &IdleWork) -> tokio::runtime::Runtime {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.worker_threads(1).enable_all();
        idle.install(&mut rt);
        rt.build().unwrap()
    }

    /// Tasks that each write one of `keys` and wait for it to be durable.
    fn writers(
        db: &Arc<Db>,
        t: &Arc<SyncRounds>,
        keys: impl Iterator<Item = String>,
    ) -> Vec<tokio::task::JoinHandle<Result<(), Arc<timber_kv::Error>>>> {
        keys.map(|k| {
            let (db, t) = (db.clone(), t.clone());
            tokio::spawn(async move {
                db.put(k.as_bytes(), b"v").unwrap();
                t.durable(1).await
            })
        })
        .collect()
    }

    /// On a runtime that runs its idle work, a round starts when a worker parks: the writes of
    /// every task that ran before share it. (Started outside the runtime: the thread syncs.)
    #[test]
    fn an_idle_worker_starts_the_round_for_all_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), timber_kv::Options::default()).unwrap());
        let idle = IdleWork::new();
        let rt = hooked_runtime(&idle);
        let t = Arc::new(SyncRounds::start(db.clone(), &idle).unwrap());
        assert!(t.shared.inline.is_none());
        rt.block_on(async {
            for task in writers(&db, &t, (0..20u32).map(|i| format!("k{i}"))) {
                task.await.unwrap().unwrap();
            }
        });
        let rounds = t.shared.rounds.load(Ordering::Relaxed);
        assert!((1..20).contains(&rounds), "{rounds} syncs for 20 waiters");
        t.stop();
    }

    /// Started inside a runtime with the hook, the worker that goes idle runs the rounds of
    /// unpipelined waiters itself, and the tasks a round answered run (the only other event
    /// here is the test's timeout); pipelined waiters are left to the thread.
    #[test]
    fn an_idle_worker_runs_the_round_and_the_tasks_it_answered() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), timber_kv::Options::default()).unwrap());
        let idle = IdleWork::new();
        let rt = hooked_runtime(&idle);
        let t = Arc::new(rt.block_on(async { SyncRounds::start(db.clone(), &idle) }).unwrap());
        assert!(t.shared.inline.is_some());
        for round in 0..20u32 {
            let all = rt.block_on(async {
                let tasks = writers(&db, &t, (0..10u32).map(|i| format!("k{round}.{i}")));
                tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(tasks))
                    .await
            });
            let all = all.expect("answered tasks did not run");
            assert!(all.into_iter().all(|r| r.unwrap().is_ok()));
        }
        assert!(t.shared.inline_rounds.load(Ordering::Relaxed) >= 1);
        // Pipelined waiters go to the thread.
        let inline = t.shared.inline_rounds.load(Ordering::Relaxed);
        let rounds = t.shared.rounds.load(Ordering::Relaxed);
        rt.block_on(async {
            db.put(b"p", b"v").unwrap();
            t.durable(16).await.unwrap();
        });
        assert_eq!(t.shared.inline_rounds.load(Ordering::Relaxed), inline);
        assert!(t.shared.rounds.load(Ordering::Relaxed) > rounds);
        t.stop();
    }

    /// A round that waits for a parking worker that never comes still starts, after `MAX_DELAY`.
    #[test]
    fn without_an_idle_worker_a_round_starts_after_the_delay() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), timber_kv::Options::default()).unwrap());
        // Installed on a runtime that is never built: no worker ever parks.
        let idle = IdleWork::new();
        idle.install(&mut tokio::runtime::Builder::new_current_thread());
        let t = SyncRounds::start(db.clone(), &idle).unwrap();
        assert!(t.shared.on_idle);
        db.put(b"a", b"1").unwrap();
        let start = Instant::now();
        futures::executor::block_on(t.durable(1)).unwrap();
        assert!(start.elapsed() >= MAX_DELAY);
        t.stop();
    }

    /// A round gathers as many waiters as the last cycle had: the first connection back waits
    /// for the others instead of syncing alone.
    #[test]
    fn a_round_gathers_the_waiters_of_the_last_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), timber_kv::Options::default()).unwrap());
        let long = Duration::from_secs(60);
        let shared = Shared { gather_for: Some(long), max_delay: long, ..Shared::new(true) };
        // Registered nowhere: kicked by hand, as a parking worker would.
        let t = SyncRounds::start_shared(db.clone(), shared, None).unwrap();
        let rounds = || t.shared.rounds.load(Ordering::Relaxed);
        db.put(b"a", b"1").unwrap();
        let first: Vec<_> = (0..3).map(|_| t.durable(1)).collect();
        t.shared.kick();
        for w in first {
            futures::executor::block_on(w).unwrap();
        }
        assert_eq!(rounds(), 1);
        // One comes back: the round waits for the other two.
        db.put(b"b", b"2").unwrap();
        let mut second = vec![t.durable(1)];
        t.shared.kick();
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.shared.gathers.load(Ordering::Relaxed) == 0 && rounds() == 1 {
            assert!(Instant::now() < deadline, "the sync thread neither gathered nor synced");
            std::thread::yield_now();
        }
        assert_eq!(rounds(), 1, "a lone waiter was synced on its own");
        // The others come back, and one more: the first one back may have queued before the
        // thread counted the last cycle (then it counted four).
        second.extend((0..3).map(|_| t.durable(1)));
        t.shared.kick();
        for w in second {
            futures::executor::block_on(w).unwrap();
        }
        assert_eq!(rounds(), 2);
        t.stop();
    }
}
