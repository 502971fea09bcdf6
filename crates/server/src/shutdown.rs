//! The server's stop signal: a `watch` channel that turns `true` once, when shutdown begins.
//! Every endpoint, blocking read and background task selects on [`stopped`] to end its wait.

use tokio::sync::watch;

/// Resolves once the server is stopping (or its stop sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
