//! `SyncThread`: one thread that makes the keyspace's writes durable for every connection that
//! waits on it, so that under `--sync always` a connection awaits its fsync instead of blocking a
//! runtime worker, and the writes of all connections waiting at once share one fsync.
//!
//! Invariant: a waiter registered after its writes were appended is answered only by a sync
//! that started after it registered, which covers those writes; a failed sync fails every
//! waiter of its round (and the engine refuses writes from then on).

use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use timber_kv::Db;
use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), Arc<timber_kv::Error>>>;

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiter>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The sync thread of one database.
pub(crate) struct SyncThread {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SyncThread {
    /// Starts the thread for `db`.
    pub(crate) fn start(db: Arc<Db>) -> std::io::Result<SyncThread> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("timber-keyspace-sync".into())
            .spawn(move || run(&db, &s))?;
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
        let queued = {
            let mut q = self.shared.queue.lock();
            if !q.stop {
                q.waiting.push(tx);
            }
            !q.stop
        };
        if queued {
            self.shared.wake.notify_one();
        }
        // A dropped sender (stopped, or the thread died) reads as a closed engine.
        async move { rx.await.unwrap_or_else(|_| Err(Arc::new(timber_kv::Error::Closed))) }
    }

    /// Answers the waiters still queued, then stops the thread and waits for it.
    pub(crate) fn stop(&self) {
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
    loop {
        let round = {
            let mut q = shared.queue.lock();
            while q.waiting.is_empty() && !q.stop {
                shared.wake.wait(&mut q);
            }
            if q.waiting.is_empty() {
                return;
            }
            std::mem::take(&mut q.waiting)
        };
        let r = db.sync().map_err(Arc::new);
        for w in round {
            let _ = w.send(r.clone());
        }
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
}
