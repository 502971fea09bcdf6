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
//! In a runtime with the hook, the sync thread started inside it hands its rounds to the worker
//! that goes idle: the worker syncs in the hook itself, as Redis syncs in its event loop before
//! it sleeps, and no other thread wakes or is woken (under `redis-benchmark -P 1 -c 50 --sync
//! always`, timberd made 0.42 context switches per request against Redis's 0.12). The hook then
//! sends a byte to a socket that the runtime's reactor watches, so that the worker, which parks
//! next, wakes at once and runs the connections the round answered: a task woken from the hook
//! goes to the runtime's shared queue, which a worker about to park looks at again only if it
//! was searching for work (tokio 1.54, `Core::transition_to_parked`; with one worker it always
//! was, with more it may not be).
//!
//! A round of pipelined writes (more than two per waiter) still goes to the thread: while it
//! syncs, the worker parses and runs the next requests the clients have already sent, which an
//! inline round would leave waiting (pipelines of 16 ran 15% slower inline, pipelines of one
//! 24-40% faster). The thread also takes the rounds no idle worker takes within `MAX_DELAY`.
//!
//! Invariant: a waiter registered after its writes were appended is answered only by a sync
//! that started after it registered, which covers those writes; a failed sync fails every
//! waiter of its round (and the engine refuses writes from then on).

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use timber_kv::Db;
use tokio::sync::oneshot;

/// The longest a round waits for a runtime worker to go idle.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(1);

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

/// A worker is about to park: every sync thread with waiters has its round run here, or starts
/// it.
fn runtime_idle() {
    // Out of the lock: an inline round syncs.
    let due: Vec<Arc<Shared>> =
        RUNNING.lock().iter().filter(|s| s.waiting.load(Ordering::Acquire)).cloned().collect();
    for s in due {
        match &s.inline {
            Some(inline) => s.round_inline(inline),
            None => s.kick(),
        }
    }
    crate::journal_sync::run_queued();
}

/// Whether a runtime built with [`install_idle_hook`] is around (rounds then wait for it).
pub(crate) fn hooked() -> bool {
    HOOKED.load(Ordering::Acquire)
}

/// Rounds run by the idle worker itself (see the module documentation).
struct Inline {
    db: Arc<Db>,
    /// Its peer is watched by the runtime's reactor; a byte goes to it after each inline round.
    poke: UnixDatagram,
}

impl Inline {
    /// Inline rounds for `db` in the runtime `rt`: the socket pair, and the task that drains
    /// the watched end.
    fn start(
        db: Arc<Db>,
        rt: &tokio::runtime::Handle,
    ) -> std::io::Result<(Inline, tokio::task::AbortHandle)> {
        let (poke, task) = poke_pair(rt)?;
        Ok((Inline { db, poke }, task))
    }
}

/// A socket to poke the reactor of `rt` with (one byte wakes a parked worker), and the task
/// that drains the watched end.
pub(crate) fn poke_pair(
    rt: &tokio::runtime::Handle,
) -> std::io::Result<(UnixDatagram, tokio::task::AbortHandle)> {
    {
        let (poke, watched) = UnixDatagram::pair()?;
        poke.set_nonblocking(true)?;
        watched.set_nonblocking(true)?;
        let _in = rt.enter();
        let watched = tokio::net::UnixDatagram::from_std(watched)?;
        let task = rt.spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                if watched.readable().await.is_err() {
                    return;
                }
                // Only the wake-up matters: drop the bytes.
                while watched.try_recv(&mut buf).is_ok() {}
            }
        });
        Ok((poke, task.abort_handle()))
    }
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

    /// A worker went idle: it runs the round (if the thread has not taken it, and the waiters
    /// did not pipeline), then pokes its reactor so that it runs the tasks the round woke before
    /// it sleeps.
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
        // A full socket (`WouldBlock`) already holds bytes that will wake the runtime.
        let _ = inline.poke.send(&[1]);
    }
}

/// The sync thread of one database.
pub(crate) struct SyncThread {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// With inline rounds: the task that drains their pokes.
    poker: Option<tokio::task::AbortHandle>,
}

impl SyncThread {
    /// Starts the thread for `db`; inside a runtime with the idle hook, its idle workers run
    /// the rounds.
    pub(crate) fn start(db: Arc<Db>) -> std::io::Result<SyncThread> {
        let hooked = HOOKED.load(Ordering::Acquire);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if hooked => SyncThread::start_inline(db, &rt),
            _ => SyncThread::start_with(db, hooked),
        }
    }

    /// Starts the thread for `db`, its rounds waiting for an idle worker if `on_idle`.
    fn start_with(db: Arc<Db>, on_idle: bool) -> std::io::Result<SyncThread> {
        SyncThread::start_shared(db, Shared::new(on_idle), None)
    }

    /// Starts the thread for `db`, whose rounds the idle workers of `rt` run.
    fn start_inline(db: Arc<Db>, rt: &tokio::runtime::Handle) -> std::io::Result<SyncThread> {
        let (inline, poker) = Inline::start(db.clone(), rt)?;
        let shared = Shared { inline: Some(inline), ..Shared::new(true) };
        SyncThread::start_shared(db, shared, Some(poker))
    }

    fn start_shared(
        db: Arc<Db>,
        shared: Shared,
        poker: Option<tokio::task::AbortHandle>,
    ) -> std::io::Result<SyncThread> {
        let on_idle = shared.on_idle;
        let shared = Arc::new(shared);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("timber-keyspace-sync".into())
            .spawn(move || run(&db, &s))?;
        if on_idle {
            RUNNING.lock().push(shared.clone());
        }
        Ok(SyncThread { shared, thread: Mutex::new(Some(thread)), poker })
    }

    /// Resolves once every write appended before this call is durable; the caller waits for
    /// `writes` of them (pipelined callers wait for many). After [`stop`], it fails with the
    /// engine's `Closed` error.
    ///
    /// [`stop`]: SyncThread::stop
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

    /// Whether connections wait for a round (which, with the idle hook, a worker runs or starts
    /// when it parks).
    pub(crate) fn round_due(&self) -> bool {
        self.shared.waiting.load(Ordering::Acquire)
    }

    /// Answers the waiters still queued, then stops the thread and waits for it.
    pub(crate) fn stop(&self) {
        RUNNING.lock().retain(|s| !Arc::ptr_eq(s, &self.shared));
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        if let Some(p) = &self.poker {
            p.abort();
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
        let t = SyncThread::start(db.clone()).unwrap();
        db.put(b"a", b"1").unwrap();
        let waits: Vec<_> = (0..10).map(|_| t.durable(1)).collect();
        for w in waits {
            w.await.unwrap();
        }
        t.stop();
        let closed = t.durable(1).await.unwrap_err();
        assert!(matches!(*closed, timber_kv::Error::Closed), "{closed}");
    }

    /// A runtime of one worker, with the idle hook.
    fn hooked_runtime() -> tokio::runtime::Runtime {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.worker_threads(1).enable_all();
        install_idle_hook(&mut rt);
        rt.build().unwrap()
    }

    /// Tasks that each write one of `keys` and wait for it to be durable.
    fn writers(
        db: &Arc<Db>,
        t: &Arc<SyncThread>,
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

    /// With the idle hook, a round starts when a worker goes idle: the writes of every task
    /// that ran before share it.
    #[test]
    fn an_idle_worker_starts_the_round_for_all_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path(), timber_kv::Options::default()).unwrap());
        let rt = hooked_runtime();
        let t = Arc::new(SyncThread::start_with(db.clone(), true).unwrap());
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
        let rt = hooked_runtime();
        let t = Arc::new(rt.block_on(async { SyncThread::start(db.clone()) }).unwrap());
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
        let t = SyncThread::start_shared(db.clone(), shared, None).unwrap();
        // Kicked by hand here, out of reach of the runtimes of other tests.
        RUNNING.lock().retain(|s| !Arc::ptr_eq(s, &t.shared));
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
