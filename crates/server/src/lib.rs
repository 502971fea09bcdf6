//! timberd, the timber server: one process that keeps its data in one directory (the keyspace in
//! `kv/`, streams in `streams/`) and serves it over the Redis protocol (RESP2/RESP3), gRPC and
//! HTTP. Library form so that tests and embedders can start it in process; the `timberd` binary
//! wraps it with flags, logs and signal handling.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

mod backup;
mod codec;
mod config;
mod forwarded;
mod grpc;
mod http;
mod idle;
mod keyspace;
mod limit;
mod logs;
mod open_txns;
mod replication;
mod resp;
mod revisions;
mod shutdown;
mod streams;
mod txn;
mod versions;
mod view;

/// Entry points of the fuzz targets in `fuzz/`, behind the `fuzzing` feature: not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz {
    use bytes::BytesMut;

    use crate::resp::request::{parse, Parsed};

    /// Takes requests off `data` as a connection's input buffer, until one is incomplete or bad,
    /// with a small request limit and with the default one (512 MiB). Never panics.
    pub fn resp_request(data: &[u8]) {
        for max in [1024, 512 << 20] {
            let mut buf = BytesMut::from(data);
            loop {
                let before = buf.clone();
                match parse(&mut buf, max) {
                    Parsed::Request(_) => {
                        assert!(buf.len() < before.len(), "a request took no bytes")
                    }
                    Parsed::Incomplete | Parsed::Bad(_) => {
                        let taken = &before[..before.len() - buf.len()];
                        assert!(
                            taken.iter().all(|c| b" \t\r\n".contains(c)),
                            "a failed parse took more than blank lines: {taken:?}"
                        );
                        break;
                    }
                }
            }
        }
    }
}

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{Cluster, Config, Flags, LogFormat, S3Store, Secret, StreamStore, Sync};
pub use idle::IdleWork;
use keyspace::Keyspace;
use logs::Logs;
use streams::StreamSpace;

/// The engines every endpoint serves, and what they report about the server.
#[derive(Debug)]
pub(crate) struct Engines {
    /// Keys and values (strings, and the handles of Redis streams).
    pub keys: Arc<Keyspace>,
    /// Redis streams.
    pub redis_streams: Arc<StreamSpace>,
    /// Named log streams (gRPC and HTTP).
    pub logs: Arc<Logs>,
    /// Largest value or entry accepted.
    pub max_value: usize,
    /// The shared secret, if any.
    pub secret: Option<String>,
    /// When the server started.
    pub started: Instant,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The sync mode.
    pub sync: Sync,
    /// Where stream fragments are kept.
    pub stream_store: config::StreamStore,
    /// Open connections of every endpoint, and their limit.
    pub connections: Arc<limit::Connections>,
    /// Idle connections are closed after this long.
    pub idle: Option<Duration>,
    /// Interactive transactions of the gRPC and HTTP endpoints.
    pub txns: open_txns::OpenTxns,
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// Where the Redis-protocol endpoint listens.
    pub resp_addr: SocketAddr,
    /// Where the gRPC endpoint listens.
    pub grpc_addr: SocketAddr,
    /// Where the HTTP endpoint listens.
    pub http_addr: SocketAddr,
    engines: Arc<Engines>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Marks a data directory whose restore has not finished: its streams may be partly written.
const RESTORING: &str = "restore-in-progress";

/// With `--restore-from`, loads the backup into the new data directory: verifies it whole,
/// then writes the streams, then the keyspace, which is renamed into place last; a marker file
/// says a restore is under way until then, so a restore that stopped half way is started over
/// (its streams deleted) by the next `--restore-from`, and a start without it is refused.
async fn restore(
    cfg: &Config,
    kv_dir: &std::path::Path,
    streams_dir: &std::path::Path,
    opts: &timber_stream::Options,
) -> anyhow::Result<()> {
    let marker = cfg.data_dir.join(RESTORING);
    let sync_dir = || std::fs::File::open(&cfg.data_dir)?.sync_all();
    if marker.exists() && kv_dir.exists() {
        // The keyspace's rename is a restore's last step: this one finished, but its marker
        // stayed.
        std::fs::remove_file(&marker)
            .and_then(|()| sync_dir())
            .with_context(|| format!("cannot remove {}", marker.display()))?;
    }
    let interrupted = marker.exists();
    let Some(from) = cfg.restore_from.clone() else {
        if interrupted {
            anyhow::bail!(
                "{} holds a restore that did not finish: start again with --restore-from",
                cfg.data_dir.display()
            );
        }
        return Ok(());
    };
    let b = tokio::task::spawn_blocking(move || backup::Backup::read(&from)).await??;
    if kv_dir.exists() {
        return Err(backup::Error::Exists { path: kv_dir.to_path_buf() }.into());
    }
    let store = timber_stream::Streams::open(streams_dir, opts.clone())
        .await
        .with_context(|| format!("cannot open the stream store ({})", cfg.stream_store))?;
    let held = store.list()?;
    // Streams found here are refused before anything is written, unless an interrupted restore
    // of this directory wrote them.
    if !held.is_empty() && !interrupted {
        anyhow::bail!(
            "the stream store ({}) holds streams: restore into a new data directory",
            cfg.stream_store
        );
    }
    std::fs::write(&marker, b"")
        .and_then(|()| sync_dir())
        .with_context(|| format!("cannot write {}", marker.display()))?;
    for s in held {
        store.delete(&s.name).await?;
    }
    b.restore_streams(&store).await?;
    store.close().await?;
    let into = kv_dir.to_path_buf();
    let b = tokio::task::spawn_blocking(move || b.restore(&into).map(|()| b)).await??;
    std::fs::remove_file(&marker)
        .and_then(|()| sync_dir())
        .with_context(|| format!("cannot remove {}", marker.display()))?;
    tracing::info!(
        from = %cfg.restore_from.as_deref().unwrap_or(std::path::Path::new("")).display(),
        position = %b.position,
        keys = b.count,
        streams = b.stream_count(),
        "restored a backup"
    );
    Ok(())
}

impl Server {
    /// Opens the data directory and starts listening. Fails if another server holds the data
    /// directory or an address cannot be bound. Fsyncs under `--sync always` run on threads of
    /// their own; [`Server::start_on`] runs them on runtime workers about to park.
    pub async fn start(cfg: Config) -> anyhow::Result<Server> {
        Server::start_on(cfg, &IdleWork::new()).await
    }

    /// [`Server::start`] on a runtime built with `idle` installed ([`IdleWork::install`]), whose
    /// workers run the server's fsyncs when they run out of tasks, as Redis fsyncs before its
    /// event loop sleeps ([`runtime`] builds one).
    pub async fn start_on(cfg: Config, idle: &IdleWork) -> anyhow::Result<Server> {
        // One process-wide recorder; a second server in the same process goes without. Installed
        // before the engines open: they take their metric handles when they open, and a handle
        // taken before the recorder is installed records nothing.
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .map_err(|e| tracing::debug!(error = %e, "metrics recorder not installed"))
            .ok();
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
        let kv_dir = cfg.data_dir.join("kv");
        let streams_dir = cfg.data_dir.join("streams");
        // Under `--sync always` on a runtime that runs `idle`, journal syncs run on parking
        // workers; otherwise (or without a socket pair to poke them) on the blocking pool. Also
        // in a cluster: there the state machine appends on Raft's runtime, whose syncs would
        // wait for a worker of this one to park (none does while all are parked already) until
        // the runner's fallback delay.
        let journal_syncs = match cfg.sync {
            Sync::Always if cfg.cluster.is_none() => idle::journal_sync::JournalSyncs::start(idle)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "journal syncs run on the blocking pool");
                    None
                }),
            _ => None,
        };
        let runner = journal_syncs.clone().map(|j| j as Arc<dyn timber_stream::SyncRunner>);
        // A cluster member's copy is cut where the leader's retention says (see `sweep`).
        let opts = streams::options(
            cfg.sync,
            &cfg.stream_store,
            (cfg.store_outage, cfg.store_backlog_bytes),
            runner,
        )
        .maintenance_interval(Some(cfg.stream_maintenance))
        .apply_retention(cfg.cluster.is_none());
        restore(&cfg, &kv_dir, &streams_dir, &opts).await?;
        let keys = match Keyspace::open(&kv_dir, cfg.sync, cfg.memory_budget, idle) {
            Ok(k) => Arc::new(k),
            Err(keyspace::Error::Kv(timber_kv::Error::Locked { .. })) => anyhow::bail!(
                "data directory {} is in use by another timberd (or another process holding its lock)",
                cfg.data_dir.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", kv_dir.display())),
        };
        let redis_streams = Arc::new(
            StreamSpace::open(keys.clone(), &streams_dir, opts)
                .await
                .with_context(|| format!("cannot open the stream store ({})", cfg.stream_store))?,
        );
        if let Some(c) = &cfg.cluster {
            let dir = cfg.data_dir.join("raft");
            // Restored data stays marked until the cluster's first snapshot holds it (a crash in
            // between must not let members join without it).
            let seed = cfg.data_dir.join(replication::SEED_MARKER);
            if cfg.restore_from.is_some() {
                std::fs::write(&seed, b"")
                    .and_then(|()| std::fs::File::open(&cfg.data_dir)?.sync_all())
                    .with_context(|| format!("cannot write {}", seed.display()))?;
            }
            let seeded = seed.exists().then_some(seed);
            let r = replication::Replication::start(
                c,
                cfg.sync,
                keys.db().clone(),
                redis_streams.store().clone(),
                dir,
                seeded,
                cfg.auth_secret.as_ref().map(|s| s.expose().to_string()),
            )
            .await
            .with_context(|| format!("cannot start the cluster member {}", c.node_id))?;
            tracing::info!(node_id = c.node_id, raft_addr = %c.raft_addr, "raft member started");
            keys.replicate_through(Arc::new(r));
        }
        let logs = Arc::new(Logs::new(redis_streams.store().clone(), keys.clone()));
        let engines = Arc::new(Engines {
            keys: keys.clone(),
            redis_streams: redis_streams.clone(),
            logs,
            max_value: cfg.max_request_bytes,
            secret: cfg.auth_secret.as_ref().map(|s| s.expose().to_string()),
            started: Instant::now(),
            data_dir: cfg.data_dir.clone(),
            sync: cfg.sync,
            stream_store: cfg.stream_store.clone(),
            connections: limit::Connections::new(cfg.max_connections),
            idle: cfg.idle_timeout,
            txns: open_txns::OpenTxns::new(open_txns::IDLE),
        });
        let resp_listener = bind(cfg.resp_addr, "resp-addr").await?;
        let grpc_listener = bind(cfg.grpc_addr, "grpc-addr").await?;
        let http_listener = bind(cfg.http_addr, "http-addr").await?;
        let resp_addr = resp_listener.local_addr()?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        if let (Some(r), Some(c)) = (keys.replication(), &cfg.cluster) {
            // Listening on every interface: the others reach it at its Raft address's host.
            let ip = match resp_addr.ip().is_unspecified() {
                true => c.raft_addr.ip(),
                false => resp_addr.ip(),
            };
            let addr = SocketAddr::new(ip, resp_addr.port()).to_string();
            r.announce_resp_addr(addr);
        }
        let (stop, stop_rx) = watch::channel(false);
        let spinner = (!cfg.idle_spin.is_zero())
            .then(|| idle::spin::Spinner::new(cfg.idle_spin, idle.clone()));
        let endpoint = Arc::new(resp::Endpoint::new(
            keys.clone(),
            redis_streams.clone(),
            engines.connections.clone(),
            idle::Activity::new(spinner.clone(), journal_syncs),
            &cfg,
        ));
        if let Some(r) = keys.replication() {
            let (ep, stop, eng) = (endpoint.clone(), stop_rx.clone(), engines.clone());
            r.serve_forwarded(move |proto, args| match proto {
                forwarded::PROTOCOL => Box::pin(forwarded::run(eng.clone(), args)),
                _ => Box::pin(resp::execute_forwarded(ep.clone(), proto, args, stop.clone())),
            });
        }
        let mut tasks = vec![
            tokio::spawn(resp::serve(
                endpoint,
                limit::Limited::new(
                    resp_listener,
                    engines.connections.clone(),
                    resp::REFUSAL,
                    engines.idle,
                ),
                stop_rx.clone(),
            )),
            tokio::spawn(grpc::serve(engines.clone(), grpc_listener, stop_rx.clone())),
            tokio::spawn(http::serve(engines.clone(), prometheus, http_listener, stop_rx.clone())),
            tokio::spawn(sweep(engines.clone(), cfg.stream_maintenance, stop_rx.clone())),
        ];
        if let Some(s) = spinner {
            tasks.push(tokio::spawn(s.run(stop_rx)));
        }
        tracing::info!(
            %resp_addr, %grpc_addr, %http_addr, data_dir = %cfg.data_dir.display(), sync = %cfg.sync,
            stream_store = %cfg.stream_store,
            "timberd listening"
        );
        Ok(Server { resp_addr, grpc_addr, http_addr, engines, stop, tasks })
    }

    /// Graceful shutdown: stop accepting, let connections finish the requests they have read,
    /// then flush the stream writers, sync and close the engines.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let e = &self.engines;
        // A member's state machine writes the streams: it stops before the stream store closes.
        if let Some(r) = e.keys.replication() {
            r.shutdown().await;
        }
        e.logs.close().await?;
        e.redis_streams.close().await?;
        let keys = e.keys.clone();
        tokio::task::spawn_blocking(move || keys.close()).await??;
        tracing::info!("timberd stopped; data synced");
        Ok(())
    }
}

/// Stream writers unused for this long are closed (the next append opens a new one).
const WRITER_IDLE: Duration = Duration::from_secs(60);

/// Every 100 ms, deletes expired keys; every second, collects the streams of deleted keys;
/// every 10 seconds, closes idle stream writers; on a cluster's leader, every `maintenance`,
/// truncates the log streams its retention lets go (the members apply the truncations, so
/// every copy of a stream starts at the same id).
async fn sweep(engines: Arc<Engines>, maintenance: Duration, mut stop: watch::Receiver<bool>) {
    let (keys, streams) = (engines.keys.clone(), engines.redis_streams.clone());
    let mut round = 0u64;
    let every = (maintenance.as_millis() / 100).max(1) as u64;
    loop {
        round += 1;
        if round.is_multiple_of(every) {
            if let Some(r) = keys.replication().filter(|r| r.is_leader()) {
                engines.logs.apply_retention(r).await;
            }
        }
        if round.is_multiple_of(10) {
            match streams.collect_garbage().await {
                Ok(n) if n > 0 => tracing::debug!(streams = n, "collected streams of deleted keys"),
                Err(e) => tracing::warn!(error = %e, "stream collection failed"),
                _ => {}
            }
        }
        if round.is_multiple_of(100) {
            let mut n =
                streams.close_idle(WRITER_IDLE).await + engines.logs.close_idle(WRITER_IDLE).await;
            if let Some(r) = engines.keys.replication() {
                n += r.close_idle_writers(WRITER_IDLE).await;
            }
            if n > 0 {
                tracing::debug!(writers = n, "closed idle stream writers");
            }
        }
        let n = engines.txns.reap(engines.keys.epoch());
        if n > 0 {
            tracing::debug!(transactions = n, "rolled back idle transactions and a past leader's");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = shutdown::stopped(&mut stop) => return,
        }
        let k = keys.clone();
        match tokio::task::spawn_blocking(move || k.sweep()).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(expired = n, "swept expired keys"),
            Ok(Err(e)) => tracing::warn!(error = %e, "expiry sweep failed"),
            _ => {}
        }
    }
}

/// A tokio runtime for a server, with `idle` installed on it: `workers` workers, or with one, a
/// current-thread runtime on the calling thread (which does what a multi-thread runtime of one
/// worker does, without the bookkeeping for stealing work between workers). A cluster member
/// always gets a multi-thread runtime: its connections wait for proposals with the worker
/// handed over (`block_in_place`), which a current-thread runtime cannot do.
pub fn runtime(
    workers: usize,
    cfg: &Config,
    idle: &IdleWork,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut rt = if workers <= 1 && cfg.cluster.is_none() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.worker_threads(workers.max(1));
        rt
    };
    idle.install(&mut rt);
    rt.enable_all().build()
}
