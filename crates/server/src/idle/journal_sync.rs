//! `JournalSyncs`: runs the stream journal's syncs (timber-stream's [`SyncRunner`], used under
//! `--sync always`) on a runtime worker that is about to park, as `keyspace_sync` runs the
//! keyspace's unpipelined rounds, instead of on tokio's blocking pool.
//!
//! Why: on the blocking pool each journal sync wakes a pool thread, which syncs, wakes the
//! worker back and sleeps again: two context switches and a reactor wake-up per sync, where
//! Redis fsyncs in its event loop and switches to no other thread.
//!
//! How: `run` queues the sync; the park hook ([`IdleWork`]) takes every queued sync when a
//! worker is about to park, runs them there, answers them, and pokes the reactor so that the
//! worker wakes for the tasks it answered. A sync that no parking worker took within
//! [`MAX_DELAY`] (a worker that never runs out of work) is taken back and run on the blocking
//! pool. For a while after a connection pipelined appends ([`JournalSyncs::pipelined`]), syncs
//! skip the queue and go to the blocking pool, one in flight a writer, so that the worker runs
//! the requests the pipelining connections have on their way while the pool syncs.
//!
//! Invariants: each queued sync runs exactly once (taking it, by the hook or the fallback, is
//! under the queue's lock) and its caller gets its outcome; a sync runs only after it was
//! queued, so it covers every journal append made before `run` was called.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use timber_stream::{BlockingSync, SyncRunner};
use tokio::sync::oneshot;

use super::{IdleWork, OnPark, Poke, Registration, MAX_DELAY};

type Outcome = timber_stream::Result<()>;

/// Syncs one writer may have queued at once when appends are not pipelined. With more than
/// one, appends journaled while a round is queued wait for a later sync of the same round, and
/// the round's first sync covers every append made before it runs: fewer fsyncs per append
/// than with one (docs/PERFORMANCE.md, "Tuning").
const QUEUED_SYNCS: usize = 4;

/// After appends were pipelined, how many syncs keep one in flight a writer: with
/// `QUEUED_SYNCS` in flight on the blocking pool, each would cover fewer appends.
const PIPELINED_SYNCS: u32 = 64;

struct Queue {
    syncs: Mutex<Vec<(u64, BlockingSync, oneshot::Sender<Outcome>)>>,
    /// `syncs` is not empty (read by the idle hook without the lock).
    queued: AtomicBool,
    next_id: AtomicU64,
    /// Poked after the hook answered syncs.
    poke: Poke,
    /// Syncs still to be queued with one in flight per writer since appends were pipelined
    /// (`PIPELINED_SYNCS` when they are; see `queued_syncs`).
    pipelining: AtomicU32,
    /// Syncs run by an idle worker, and by the blocking pool (pipelined, or after `MAX_DELAY`).
    inline: AtomicU64,
    fallback: AtomicU64,
}

impl Queue {
    fn new(poke: Poke) -> Queue {
        Queue {
            syncs: Mutex::new(Vec::new()),
            queued: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            poke,
            pipelining: AtomicU32::new(0),
            inline: AtomicU64::new(0),
            fallback: AtomicU64::new(0),
        }
    }

    /// Takes the sync `id` back if no idle worker took it.
    fn take(&self, id: u64) -> Option<(BlockingSync, oneshot::Sender<Outcome>)> {
        let mut q = self.syncs.lock();
        let i = q.iter().position(|(i, _, _)| *i == id)?;
        let (_, sync, tx) = q.remove(i);
        self.queued.store(!q.is_empty(), Ordering::Release);
        Some((sync, tx))
    }

    /// Runs every queued sync on this thread.
    fn run_all(&self) {
        let syncs = {
            let mut q = self.syncs.lock();
            self.queued.store(false, Ordering::Release);
            std::mem::take(&mut *q)
        };
        if syncs.is_empty() {
            return;
        }
        for (_, sync, tx) in syncs {
            let _ = tx.send(sync());
            self.inline.fetch_add(1, Ordering::Relaxed);
        }
        self.poke.poke();
    }
}

impl OnPark for Queue {
    fn due(&self) -> bool {
        self.queued.load(Ordering::Acquire)
    }

    fn on_park(&self) {
        self.run_all();
    }
}

/// See the module documentation. Dropping it stops parking workers from serving it.
pub(crate) struct JournalSyncs {
    queue: Arc<Queue>,
    registration: Option<Registration>,
}

impl JournalSyncs {
    /// A runner whose syncs the parking workers of the current runtime run, if that runtime
    /// runs `idle`'s work (`None` otherwise: the default runner serves).
    pub(crate) fn start(idle: &IdleWork) -> std::io::Result<Option<Arc<JournalSyncs>>> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return Ok(None) };
        if !idle.hooked() {
            return Ok(None);
        }
        let queue = Arc::new(Queue::new(Poke::new(&rt)?));
        let registration = Some(idle.register(queue.clone()));
        Ok(Some(Arc::new(JournalSyncs { queue, registration })))
    }

    /// A connection sent appends in a pipeline: the next `PIPELINED_SYNCS` syncs go straight
    /// to the blocking pool, one in flight a writer, while the worker runs the requests that
    /// the pipelining connections have on their way.
    pub(crate) fn pipelined(&self) {
        if self.queue.pipelining.load(Ordering::Relaxed) < PIPELINED_SYNCS / 2 {
            self.queue.pipelining.store(PIPELINED_SYNCS, Ordering::Relaxed);
        }
    }
}

impl SyncRunner for JournalSyncs {
    /// The syncs of a round run one after the other; whatever a writer journaled before the
    /// round runs, the round's first sync covers. Unpipelined, `QUEUED_SYNCS` a writer; while
    /// appends are pipelined (their syncs go to the blocking pool), one.
    fn queued_syncs(&self) -> usize {
        if self.queue.pipelining.load(Ordering::Relaxed) > 0 {
            1
        } else {
            QUEUED_SYNCS
        }
    }

    fn run(
        &self,
        sync: BlockingSync,
    ) -> Pin<Box<dyn std::future::Future<Output = Outcome> + Send>> {
        let p = self.queue.pipelining.load(Ordering::Relaxed);
        if p > 0 {
            // Pipelined: the worker has requests to run while the blocking pool syncs.
            self.queue.pipelining.store(p - 1, Ordering::Relaxed);
            self.queue.fallback.fetch_add(1, Ordering::Relaxed);
            return Box::pin(on_pool(sync));
        }
        let (tx, rx) = oneshot::channel();
        let id = self.queue.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut q = self.queue.syncs.lock();
            q.push((id, sync, tx));
            self.queue.queued.store(true, Ordering::Release);
        }
        let queue = self.queue.clone();
        Box::pin(async move {
            let lost = || timber_stream::Error::InvalidParam("journal sync was dropped".into());
            let mut rx = rx;
            tokio::select! {
                r = &mut rx => return r.unwrap_or_else(|_| Err(lost())),
                () = tokio::time::sleep(MAX_DELAY) => {}
            }
            // No idle worker took it in time: run it on the blocking pool (or, if the hook took
            // it meanwhile, wait for its answer).
            match queue.take(id) {
                Some((sync, tx)) => {
                    drop(tx);
                    queue.fallback.fetch_add(1, Ordering::Relaxed);
                    on_pool(sync).await
                }
                None => rx.await.unwrap_or_else(|_| Err(lost())),
            }
        })
    }
}

/// Runs `sync` on the blocking pool.
async fn on_pool(sync: BlockingSync) -> Outcome {
    tokio::task::spawn_blocking(sync).await.unwrap_or_else(|e| {
        Err(timber_stream::Error::InvalidParam(format!("journal sync failed: {e}")))
    })
}

impl Drop for JournalSyncs {
    fn drop(&mut self) {
        self.registration.take();
        // Syncs still queued run here rather than never.
        self.queue.run_all();
    }
}

impl std::fmt::Debug for JournalSyncs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalSyncs").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A sync that counts its runs.
    fn counting(n: &Arc<AtomicUsize>) -> BlockingSync {
        let n = n.clone();
        Box::new(move || {
            n.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    #[test]
    fn idle_workers_run_the_syncs_and_the_tasks_they_answered() {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.worker_threads(1).enable_all();
        let idle = IdleWork::new();
        idle.install(&mut rt);
        let rt = rt.build().unwrap();
        let runner = rt.block_on(async { JournalSyncs::start(&idle) }).unwrap().expect("hooked");
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..20 {
            let waits: Vec<_> = (0..10)
                .map(|_| {
                    let f = runner.run(counting(&ran));
                    rt.spawn(f)
                })
                .collect();
            rt.block_on(async {
                for w in waits {
                    tokio::time::timeout(Duration::from_secs(20), w)
                        .await
                        .expect("answered tasks did not run")
                        .unwrap()
                        .unwrap();
                }
            });
        }
        assert_eq!(ran.load(Ordering::SeqCst), 200, "every sync ran exactly once");
        let q = &runner.queue;
        assert_eq!(q.inline.load(Ordering::Relaxed) + q.fallback.load(Ordering::Relaxed), 200);
        assert!(q.inline.load(Ordering::Relaxed) >= 1, "no sync ran on an idle worker");
        assert_eq!(runner.queued_syncs(), QUEUED_SYNCS);
        // After pipelined appends, the blocking pool runs the next syncs, one at a time.
        let (inline, fallback) =
            (q.inline.load(Ordering::Relaxed), q.fallback.load(Ordering::Relaxed));
        runner.pipelined();
        for _ in 0..PIPELINED_SYNCS {
            assert_eq!(runner.queued_syncs(), 1);
            let w = rt.spawn(runner.run(counting(&ran)));
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), w).await })
                .expect("pipelined sync did not run")
                .unwrap()
                .unwrap();
        }
        assert_eq!(q.inline.load(Ordering::Relaxed), inline);
        assert_eq!(q.fallback.load(Ordering::Relaxed), fallback + u64::from(PIPELINED_SYNCS));
        assert_eq!(ran.load(Ordering::SeqCst), 200 + PIPELINED_SYNCS as usize);
        // Then the idle workers again.
        assert_eq!(runner.queued_syncs(), QUEUED_SYNCS);
        let w = rt.spawn(runner.run(counting(&ran)));
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), w).await })
            .expect("sync did not run")
            .unwrap()
            .unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 201 + PIPELINED_SYNCS as usize);
    }

    /// A sync no parking worker takes still runs, on the blocking pool, after `MAX_DELAY`.
    #[tokio::test]
    async fn without_an_idle_worker_a_sync_runs_after_the_delay() {
        // Registered nowhere: no worker ever takes its syncs.
        let queue = Arc::new(Queue::new(Poke::new(&tokio::runtime::Handle::current()).unwrap()));
        let runner = JournalSyncs { queue, registration: None };
        let ran = Arc::new(AtomicUsize::new(0));
        let start = std::time::Instant::now();
        runner.run(counting(&ran)).await.unwrap();
        assert!(start.elapsed() >= MAX_DELAY);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert_eq!(runner.queue.fallback.load(Ordering::Relaxed), 1);
        let failing: BlockingSync = Box::new(|| Err(timber_stream::Error::Closed));
        let e = runner.run(failing).await.unwrap_err();
        assert!(matches!(e, timber_stream::Error::Closed), "{e}");
    }
}
