//! The Redis-protocol endpoint (RESP2 and RESP3): the listener ([`serve`]), one task per
//! connection (`connection`), pipelined batches (`pipeline`), the command table (`table`) and
//! the commands' handlers (`cmd`), requests off the wire (`request`), replies onto it
//! (`reply`), and per-command metrics.
//!
//! Invariants: a malformed frame or an oversized request gets one error reply and closes only
//! that connection; nothing a bad request sends reaches the keyspace; connections over the limit
//! get an error and are closed before any command runs.

mod args;
mod cmd;
mod connection;
mod glob;
mod multi;
mod pipeline;
mod reply;
pub(crate) mod request;
mod session;
mod table;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::idle::Activity;
use crate::keyspace::Keyspace;
use crate::limit::Limited;
use crate::streams::StreamSpace;

/// Shared by all connections of the endpoint.
#[derive(Debug)]
pub(crate) struct Endpoint {
    keys: Arc<Keyspace>,
    streams: Arc<StreamSpace>,
    /// The shared secret.
    secret: Option<String>,
    /// Largest request.
    max_request: usize,
    /// The stream store's backend, for INFO.
    stream_store: &'static str,
    connections: Arc<crate::limit::Connections>,
    /// What the request loop tells the idle machinery.
    activity: Activity,
    next_id: AtomicU64,
    /// Per command (by its index in the command table): calls and latency.
    metrics: Vec<(metrics::Counter, metrics::Histogram)>,
}

impl Endpoint {
    /// A new endpoint over `keys` and `streams`.
    pub(crate) fn new(
        keys: Arc<Keyspace>,
        streams: Arc<StreamSpace>,
        connections: Arc<crate::limit::Connections>,
        activity: Activity,
        cfg: &crate::config::Config,
    ) -> Endpoint {
        Endpoint {
            keys,
            streams,
            secret: cfg.auth_secret.as_ref().map(|s| s.expose().to_string()),
            max_request: cfg.max_request_bytes,
            stream_store: cfg.stream_store.backend(),
            connections,
            activity,
            next_id: AtomicU64::new(1),
            metrics: table::COMMANDS
                .iter()
                .map(|c| {
                    (
                        metrics::counter!("timber_resp_commands_total", "command" => c.name),
                        metrics::histogram!("timber_resp_command_seconds", "command" => c.name),
                    )
                })
                .collect(),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether this connection's next command is timed: its start, if so.
    fn sample(&self, s: &mut session::Session) -> Option<Instant> {
        s.commands += 1;
        (s.commands % LATENCY_SAMPLE == 1).then(Instant::now)
    }

    /// Counts a command and, if it was sampled, records how long it ran (for XADD: until it was
    /// sent, not until it was durable).
    fn record(&self, index: usize, start: Option<Instant>) {
        if let Some((calls, latency)) = self.metrics.get(index) {
            calls.increment(1);
            if let Some(t) = start {
                latency.record(t.elapsed().as_secs_f64());
            }
        }
    }
}

/// Latency is recorded for one command in this many: a clock read and a histogram update per
/// command would cost a visible share of a pipelined GET.
const LATENCY_SAMPLE: u64 = 8;

/// What a connection over `--max-connections` gets before it is closed.
pub(crate) const REFUSAL: &[u8] = b"-ERR max number of clients reached\r\n";

/// Accepts connections (admitted, and closed when idle, by [`Limited`]) until `stop` turns true,
/// then waits for the connections to finish the requests they have read.
pub(crate) async fn serve(ep: Arc<Endpoint>, mut listener: Limited, stop: watch::Receiver<bool>) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut stopping = stop.clone();
    loop {
        tokio::select! {
            (sock, peer) = axum::serve::Listener::accept(&mut listener) => {
                let (ep, stop) = (ep.clone(), stop.clone());
                tasks.spawn(async move {
                    if let Err(e) = connection::serve(ep, sock, stop).await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                });
            },
            () = crate::shutdown::stopped(&mut stopping) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

/// Runs a command another cluster member forwarded (its client is there) and returns the
/// reply encoded for `proto`: as if the client had sent it here, authenticated (the member that
/// forwarded it checked), and never forwarded again.
pub(crate) async fn execute_forwarded(
    ep: Arc<Endpoint>,
    proto: u8,
    args: Vec<bytes::Bytes>,
    stop: watch::Receiver<bool>,
) -> Vec<u8> {
    let mut s = session::Session::new(0, false);
    s.proto = if proto == 3 { 3 } else { 2 };
    s.forwarded = true;
    let mut out = bytes::BytesMut::new();
    // A transaction or a WATCH of a member's client.
    if let Some(reply) = multi::forwarded(&ep, &mut s, &args, &stop).await {
        reply.encode(s.proto, &mut out);
        return out.to_vec();
    }
    pipeline::run(&ep, &mut s, &[args], &mut out, &stop).await;
    out.to_vec()
}
