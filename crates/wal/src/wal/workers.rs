//! The background threads of a log: the `Interval` syncer, which syncs every interval, or in
//! `Manual` mode the writeback starter, either of which starts the writeback of every
//! `bytes_per_sync` appended (so that the next sync or the fsync of a roll finds little left to
//! write); the roll finisher, which makes each roll durable after it; and the preparer of the
//! zero-filled spare segment (`spare::run_preparer`). Each runs until its sender is dropped,
//! which `Wal::close` does before it joins them.

use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::spare;

use super::inner::Inner;

/// A background thread that runs until its sender is dropped.
pub(super) struct Worker {
    tx: mpsc::Sender<()>,
    handle: thread::JoinHandle<()>,
}

impl Worker {
    pub(super) fn stop(self) {
        drop(self.tx);
        let _ = self.handle.join();
    }
}

/// Starts the thread that keeps a zero-filled spare segment ready, so that a roll need not write
/// a whole segment of zeros while appenders wait.
pub(super) fn spawn_preparer(inner: Arc<Inner>) -> Result<Worker> {
    let dir = inner.dir.clone();
    let (tx, rx) = mpsc::channel::<()>();
    *inner.want_spare.lock() = Some(tx.clone());
    let handle = thread::Builder::new()
        .name("timber-wal-spare".into())
        .spawn(move || {
            spare::run_preparer(
                &rx,
                &inner.dir,
                &inner.opts,
                &inner.spare,
                &inner.spare_filled,
                &inner.closed,
            )
        })
        .map_err(|e| Error::io("spawn spare preparer for", &dir, e))?;
    Ok(Worker { tx, handle })
}

/// Starts the `Interval` sync thread, which syncs every `every` and, with `bytes_per_sync`,
/// starts the writeback of what was appended each time appends passed it.
pub(super) fn spawn_ticker(inner: Arc<Inner>, every: Duration) -> Result<Worker> {
    let dir = inner.dir.clone();
    let (stop, rx) = mpsc::channel::<()>();
    *inner.kick.lock() = Some(stop.clone());
    let handle = thread::Builder::new()
        .name("timber-wal-sync".into())
        .spawn(move || {
            // Syncs every `every`, however often kicks come in between (one is queued at a
            // time, but a log appending fast enough could always have one); stops when every
            // sender is gone. `None`: an interval too long to add to the clock, never reached.
            let deadline = || Instant::now().checked_add(every);
            let mut next = deadline();
            loop {
                let kicked = match next {
                    Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match kicked {
                    Ok(()) => inner.start_writeback(),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                if next.is_some_and(|at| Instant::now() >= at) {
                    next = deadline();
                    if let Err(e) = inner.sync() {
                        if !matches!(e, Error::Closed | Error::Poisoned { .. }) {
                            tracing::error!(error = %e, "background WAL sync failed");
                        }
                    }
                }
            }
        })
        .map_err(|e| Error::io("spawn sync thread for", dir, e))?;
    Ok(Worker { tx: stop, handle })
}

/// Starts the thread that, in `Manual` mode with `bytes_per_sync`, starts the writeback of the
/// active segment's new bytes each time appends passed that many (`Inner::start_writeback`).
pub(super) fn spawn_writeback(inner: Arc<Inner>) -> Result<Worker> {
    let dir = inner.dir.clone();
    let (stop, rx) = mpsc::channel::<()>();
    *inner.kick.lock() = Some(stop.clone());
    let handle = thread::Builder::new()
        .name("timber-wal-writeback".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                inner.start_writeback();
            }
        })
        .map_err(|e| Error::io("spawn writeback thread for", dir, e))?;
    Ok(Worker { tx: stop, handle })
}

/// Starts the thread that finishes each roll (`Inner::finish_roll`): the fsyncs of a roll then
/// happen beside the appends instead of in the append that rolled.
pub(super) fn spawn_finisher(inner: Arc<Inner>) -> Result<Worker> {
    let dir = inner.dir.clone();
    let (stop, rx) = mpsc::channel::<()>();
    *inner.roll_done.lock() = Some(stop.clone());
    let handle = thread::Builder::new()
        .name("timber-wal-roll".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                if let Err(e) = inner.finish_roll() {
                    if !matches!(e, Error::Closed | Error::Poisoned { .. }) {
                        tracing::error!(error = %e, "finishing a WAL segment roll failed");
                    }
                }
            }
        })
        .map_err(|e| Error::io("spawn roll thread for", dir, e))?;
    Ok(Worker { tx: stop, handle })
}
