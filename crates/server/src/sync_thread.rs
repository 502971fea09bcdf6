//! `SyncThread`: one thread that makes the keyspace's writes durable for every connection that
//! waits on it, so that under `--sync always` a connection awaits its fsync instead of blocking a
//! runtime worker, and the writes of all connections waiting at once share one fsync.
//!
//! When a round starts: in a runtime built with [`install_idle_hook`] (timberd's), once a worker
//! has run out of ready tasks, as Redis syncs before its event loop sleeps: every connection
//! whose request was ready by then has written and waits, and one fsync covers them all. Without
//! the hook the first waiter starts a round, and the connections still running join the next.
//! A round that waits for the hook waits at most `MAX_DELAY` after its first waiter, in case no
//! worker goes idle.
//!
//! With the hook, a round also gathers: it waits until as many connections wait as the last
//! round answered plus those that were already queued when it ended (every connection of the
//! last cycle, back with its next write), for at most as long as the last sync took (never more
//! than `MAX_DELAY`). Without this, the first connection to come back found the worker idle and
//! started a round of its own while the others were still on their way: under `redis-benchmark
//! -P 1 -c 50 --sync always`, 16 writes per fdatasync against Redis's 28, since Redis's event
//! loop, blocked in its fsync, gathers every client by itself. A lone connection never waits.
//!
//! Invariant: a waiter registered after its writes were appended is answered only by a sync
//! that started after it registered, which covers those writes; a failed sync fails every
//! waiter of its round (and the engine refuses writes from then on).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use timber_kv::Db;
use tokio::sync::oneshot;

/// The longest a round waits for a runtime worker to go idle.
const MAX_DELAY: Duration = Duration::from_millis(1);

/// Whether a runtime calls [`runtime_idle`] when its workers go idle.
static HOOKED: AtomicBool = AtomicBool::new(false);
/// The sync threads that [`runtime_idle`] starts rounds of.
static RUNNING: Mutex<Vec<Arc<Shared>>> = Mutex::new(Vec::new());

/// Makes the runtime `builder` builds start sync rounds when a worker goes idle (see the
/// module documentation).
pub fn install_idle_hook(builder: &mut tokio::runtime::Builder) {
    HOOKED.store(true, Ordering::Release);
    builder.on_thread_park(runtime_idle);
}

/// A worker is about to park: every sync thread with waiters starts its round.
fn runtime_idle() {
    for s in RUNNING.lock().iter() {
        if s.waiting.load(Ordering::Acquire) {
            s.kick();
        }
    }
}

type Waiter = oneshot::Sender<Result<(), Arc<timber_kv::Error>>>;

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiter>,
    /// When the first of `waiting` came.
    since: Option<Instant>,
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
    /// Rounds (syncs) so far.
    rounds: std::sync::atomic::AtomicU64,
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
}

/// The sync thread of one database.
pub(crate) struct SyncThread {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SyncThread {
    /// Starts the thread for `db`.
    pub(crate) fn start(db: Arc<Db>) -> std::io::Result<SyncThread> {
        SyncThread::start_with(db, HOOKED.load(Ordering::Acquire))
    }

    /// Starts the thread for `db`, its rounds waiting for an idle worker if `on_idle`.
    fn start_with(db: Arc<Db>, on_idle: bool) -> std::io::Result<SyncThread> {
        SyncThread::start_shared(db, Shared::new(on_idle))
    }

    fn start_shared(db: Arc<Db>, shared: Shared) -> std::io::Result<SyncThread> {
        let on_idle = shared.on_idle;
        let shared = Arc::new(shared);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("timber-keyspace-sync".into())
            .spawn(move || run(&db, &s))?;
        if on_idle {
            RUNNING.lock().push(shared.clone());
        }
        Ok(SyncThread { shared, thread: Mutex::new(Some(thread)) })
    }

    /// Resolves once every write appended before this call is durable. After [`stop`], it fails
    /// with the engine's `Closed` error.
    ///
    /// [`stop`]: SyncThread::stop
    pub(crate) fn durable(
        &self,
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
            }
            // With the idle hook, only the first waiter wakes the thread (which then waits for
            // the hook, or `MAX_DELAY`).
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
        RUNNING.lock().retain(|s| !Arc::ptr_eq(s, &self.shared));
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for SyncThread {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for SyncThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncThread").finish_non_exhaustive()
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
            q.kicked = false;
            q.since = None;
            shared.waiting.store(false, Ordering::Release);
            std::mem::take(&mut q.waiting)
        };
        let start = Instant::now();
        let r = db.sync().map_err(Arc::new);
        let took = start.elapsed();
        shared.rounds.fetch_add(1, Ordering::Relaxed);
        let answered = round.len();
        for w in round {
            let _ = w.send(r.clone());
        }
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
        let t = SyncThread::start(db.clone()).unwrap();
        db.put(b"a", b"1").unwrap();
        let waits: Vec<_> = (0..10).map(|_| t.durable()).collect();
        for w in waits {
            w.await.unwrap();
        }
        t.stop();
        let closed = t.durable().await.unwrap_err();
        assert!(matches!(*closed, timber_kv::Error::Closed), "{closed}");
    }

    /// With the idle hook, a round starts when a worker goes idle: the writes of every task
    /// that ran before share it.
    #[test]
    fn an_idle_worker_starts_the_round_for_all_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), timber_kv::Options::default()).unwrap());
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.worker_threads(1).enable_all();
        install_idle_hook(&mut rt);
        let rt = rt.build().unwrap();
        let t = Arc::new(SyncThread::start_with(db.clone(), true).unwrap());
        rt.block_on(async {
            let tasks: Vec<_> = (0..20u32)
                .map(|i| {
                    let (db, t) = (db.clone(), t.clone());
                    tokio::spawn(async move {
                        db.put(format!("k{i}").as_bytes(), b"v").unwrap();
                        t.durable().await
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap().unwrap();
            }
        });
        let rounds = t.shared.rounds.load(Ordering::Relaxed);
        assert!((1..20).contains(&rounds), "{rounds} syncs for 20 waiters");
        t.stop();
    }

    /// A round that waits for an idle worker that never comes still starts, after `MAX_DELAY`.
    #[test]
    fn without_an_idle_worker_a_round_starts_after_the_delay() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), timber_kv::Options::default()).unwrap());
        let t = SyncThread::start_with(db.clone(), true).unwrap();
        // Out of reach of the runtimes of other tests, whose idle workers would start its round.
        RUNNING.lock().retain(|s| !Arc::ptr_eq(s, &t.shared));
        db.put(b"a", b"1").unwrap();
        let start = Instant::now();
        futures::executor::block_on(t.durable()).unwrap();
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
        let t = SyncThread::start_shared(db.clone(), shared).unwrap();
        // Kicked by hand here, out of reach of the runtimes of other tests.
        RUNNING.lock().retain(|s| !Arc::ptr_eq(s, &t.shared));
        let rounds = || t.shared.rounds.load(Ordering::Relaxed);
        db.put(b"a", b"1").unwrap();
        let first: Vec<_> = (0..3).map(|_| t.durable()).collect();
        t.shared.kick();
        for w in first {
            futures::executor::block_on(w).unwrap();
        }
        assert_eq!(rounds(), 1);
        // One comes back: the round waits for the other two.
        db.put(b"b", b"2").unwrap();
        let mut second = vec![t.durable()];
        t.shared.kick();
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.shared.gathers.load(Ordering::Relaxed) == 0 && rounds() == 1 {
            assert!(Instant::now() < deadline, "the sync thread neither gathered nor synced");
            std::thread::yield_now();
        }
        assert_eq!(rounds(), 1, "a lone waiter was synced on its own");
        second.extend((0..2).map(|_| t.durable()));
        t.shared.kick();
        for w in second {
            futures::executor::block_on(w).unwrap();
        }
        assert_eq!(rounds(), 2);
        t.stop();
    }
}
