//! The background threads of a log: the `Interval` syncer, which syncs every interval or when
//! appends passed `bytes_per_sync`, and the preparer of the zero-filled spare segment
//! (`spare::run_preparer`). Each runs until its sender is dropped, which `Wal::close` does
//! before it joins them.

use std::sync::{mpsc, Arc};
use std::thread;

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

/// Starts the `Interval` sync thread, which syncs every `every`.
pub(super) fn spawn_ticker(inner: Arc<Inner>, every: std::time::Duration) -> Result<Worker> {
    let dir = inner.dir.clone();
    let (stop, rx) = mpsc::channel::<()>();
    *inner.kick.lock() = Some(stop.clone());
    let handle = thread::Builder::new()
        .name("timber-wal-sync".into())
        .spawn(move || {
            // Wakes every `every`, or early when appends passed `bytes_per_sync`; stops when every
            // sender is gone.
            while !matches!(rx.recv_timeout(every), Err(mpsc::RecvTimeoutError::Disconnected)) {
                if let Err(e) = inner.sync() {
                    if !matches!(e, Error::Closed | Error::Poisoned { .. }) {
                        tracing::error!(error = %e, "background WAL sync failed");
                    }
                }
            }
        })
        .map_err(|e| Error::io("spawn sync thread for", dir, e))?;
    Ok(Worker { tx: stop, handle })
}
