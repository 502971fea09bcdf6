//! Work that a runtime worker does when it runs out of ready tasks, and what keeps it from
//! running out too early: one mechanism, modelled on Redis's event loop, which fsyncs before it
//! sleeps and writes a turn's replies at the end of the turn.
//!
//! - [`IdleWork`] is the registry of one runtime: installed on a tokio runtime builder, its
//!   park hook runs every registered [`OnPark`] whose work is due when a worker is about to
//!   park. It is owned by whoever builds the runtime (timberd's `main`, a test) and handed to
//!   [`crate::Server::start_on`]; nothing here is process-global, so two servers on two
//!   runtimes in one process never run each other's work.
//! - [`keyspace_sync::SyncRounds`]: the keyspace's fsync rounds under `--sync always`, run by
//!   the parking worker (unpipelined writers) or by a sync thread (pipelined ones).
//! - [`journal_sync::JournalSyncs`]: the stream journal's fsyncs under `--sync always`, run by
//!   the parking worker, or by the blocking pool while appends are pipelined.
//! - [`spin::Spinner`]: keeps a worker polling for requests for a short window after the last
//!   one instead of parking, except when work above is due (it runs only on park). It also
//!   tells a connection whether the worker is busy, which decides whether the connection holds
//!   its replies (`resp::pipeline`).
//! - [`Activity`]: the two calls the request loop makes into all of this.
//!
//! A task woken from the park hook is not always run before the worker parks (its wake goes to
//! the runtime's shared queue, which a parking worker does not look at again in every case), so
//! the hook pokes the reactor through a socket pair ([`Poke`]) after it answered waiters: the
//! worker then wakes at once. The unit tests `an_idle_worker_runs_the_round_and_the_tasks_it_answered`
//! and `idle_workers_run_the_syncs_and_the_tasks_they_answered` fail if that wake is lost.

pub(crate) mod journal_sync;
pub(crate) mod keyspace_sync;
pub(crate) mod spin;

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

/// The longest work that waits for a parking worker waits before another thread runs it (a
/// worker that never runs out of tasks never parks).
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(1);

/// Work a parking worker runs.
pub(crate) trait OnPark: Send + Sync {
    /// Whether work waits for a worker to park (read without locks, at every park and at every
    /// turn of the spinner).
    fn due(&self) -> bool;
    /// Runs the work (or hands it on) on the worker that is about to park.
    fn on_park(&self);
}

/// The registry of one runtime's idle work; see the module documentation. Cloning shares it.
#[derive(Clone, Default)]
pub struct IdleWork {
    inner: Arc<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Whether a runtime builder got the park hook.
    hooked: AtomicBool,
    work: ArcSwap<Vec<Arc<dyn OnPark>>>,
}

impl std::fmt::Debug for IdleWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleWork")
            .field("hooked", &self.hooked())
            .field("registered", &self.inner.work.load().len())
            .finish()
    }
}

impl IdleWork {
    /// An empty registry, not yet installed on any runtime.
    pub fn new() -> IdleWork {
        IdleWork::default()
    }

    /// Makes the runtime that `builder` builds run this registry's work when a worker is about
    /// to park. Servers started on that runtime with this registry then sync on idle workers.
    pub fn install(&self, builder: &mut tokio::runtime::Builder) {
        self.inner.hooked.store(true, Ordering::Release);
        let inner = self.inner.clone();
        builder.on_thread_park(move || inner.on_park());
    }

    /// Whether a runtime runs this registry's work when it parks.
    pub(crate) fn hooked(&self) -> bool {
        self.inner.hooked.load(Ordering::Acquire)
    }

    /// Whether any registered work waits for a worker to park.
    pub(crate) fn due(&self) -> bool {
        self.inner.work.load().iter().any(|w| w.due())
    }

    /// Runs `work` at every park from now until the returned registration drops.
    pub(crate) fn register(&self, work: Arc<dyn OnPark>) -> Registration {
        self.inner.work.rcu(|list| {
            let mut list = Vec::clone(list);
            list.push(work.clone());
            list
        });
        Registration { registry: self.inner.clone(), work }
    }
}

impl Registry {
    /// A worker is about to park: every due work runs here (out of any lock: it may fsync).
    fn on_park(&self) {
        for w in self.work.load().iter() {
            if w.due() {
                w.on_park();
            }
        }
    }
}

/// Work registered with an [`IdleWork`]; dropping it unregisters the work.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    work: Arc<dyn OnPark>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.work.rcu(|list| {
            list.iter().filter(|w| !Arc::ptr_eq(w, &self.work)).cloned().collect::<Vec<_>>()
        });
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").finish_non_exhaustive()
    }
}

/// A socket whose peer the reactor of a runtime watches: a byte sent to it wakes a parked
/// worker of that runtime (see the module documentation). Dropping it stops the task that
/// drains the peer.
pub(crate) struct Poke {
    socket: UnixDatagram,
    drain: tokio::task::AbortHandle,
}

impl Poke {
    /// A poke for the runtime `rt`.
    pub(crate) fn new(rt: &tokio::runtime::Handle) -> std::io::Result<Poke> {
        let (socket, watched) = UnixDatagram::pair()?;
        socket.set_nonblocking(true)?;
        watched.set_nonblocking(true)?;
        let _in = rt.enter();
        let watched = tokio::net::UnixDatagram::from_std(watched)?;
        let drain = rt.spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                if watched.readable().await.is_err() {
                    return;
                }
                // Only the wake-up matters: drop the bytes.
                while watched.try_recv(&mut buf).is_ok() {}
            }
        });
        Ok(Poke { socket, drain: drain.abort_handle() })
    }

    /// Wakes the runtime's reactor.
    pub(crate) fn poke(&self) {
        // A full socket (`WouldBlock`) already holds bytes that will wake the runtime.
        let _ = self.socket.send(&[1]);
    }
}

impl Drop for Poke {
    fn drop(&mut self) {
        self.drain.abort();
    }
}

/// What the Redis-protocol request loop tells the idle machinery, and what it learns from it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Activity {
    /// Told of every batch of requests, if the server spins (`--idle-spin-us`).
    spinner: Option<Arc<spin::Spinner>>,
    /// The stream journal's syncs, under `--sync always` on a hooked runtime.
    journal: Option<Arc<journal_sync::JournalSyncs>>,
}

impl Activity {
    pub(crate) fn new(
        spinner: Option<Arc<spin::Spinner>>,
        journal: Option<Arc<journal_sync::JournalSyncs>>,
    ) -> Activity {
        Activity { spinner, journal }
    }

    /// A connection is about to run a batch of requests. Returns whether the worker is busy
    /// (other connections are ready too), as far as the spinner can tell.
    #[inline]
    pub(crate) fn batch(&self) -> bool {
        self.spinner.as_ref().is_some_and(|s| s.request())
    }

    /// A connection has several appends in flight at once (a pipeline of them).
    pub(crate) fn appends_pipelined(&self) {
        if let Some(j) = &self.journal {
            j.pipelined();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Work that counts the parks it ran at.
    #[derive(Default)]
    struct Counting {
        due: AtomicBool,
        ran: AtomicUsize,
    }

    impl OnPark for Counting {
        fn due(&self) -> bool {
            self.due.load(Ordering::Acquire)
        }
        fn on_park(&self) {
            self.due.store(false, Ordering::Release);
            self.ran.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn runtime(idle: &IdleWork) -> tokio::runtime::Runtime {
        let mut rt = tokio::runtime::Builder::new_current_thread();
        rt.enable_all();
        idle.install(&mut rt);
        rt.build().unwrap()
    }

    /// Two registries on two runtimes in one process (two servers): parking one runtime runs
    /// only its own work.
    #[test]
    fn a_runtime_parks_only_its_own_registry() {
        let (a, b) = (IdleWork::new(), IdleWork::new());
        let (wa, wb) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
        let _ra = a.register(wa.clone());
        let _rb = b.register(wb.clone());
        wa.due.store(true, Ordering::Release);
        wb.due.store(true, Ordering::Release);
        assert!(a.due() && b.due());
        let rt = runtime(&a);
        // A sleep parks the worker.
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(5)).await });
        assert_eq!(wa.ran.load(Ordering::SeqCst), 1, "its own work ran once");
        assert_eq!(wb.ran.load(Ordering::SeqCst), 0, "the other registry's work ran");
        assert!(!a.due() && b.due());
        assert!(a.hooked() && !b.hooked());
    }

    /// Dropping a registration stops its work from running.
    #[test]
    fn dropped_work_no_longer_runs() {
        let idle = IdleWork::new();
        let w = Arc::new(Counting::default());
        let r = idle.register(w.clone());
        let rt = runtime(&idle);
        drop(r);
        w.due.store(true, Ordering::Release);
        assert!(!idle.due());
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(5)).await });
        assert_eq!(w.ran.load(Ordering::SeqCst), 0);
    }
}
