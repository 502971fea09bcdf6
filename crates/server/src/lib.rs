//! timberd, the timber server: one process that keeps its data in one directory (the keyspace in
//! `kv/`, streams in `streams/`) and serves it over the Redis protocol (RESP2/RESP3). Library form so that tests and embedders can start it
//! in process; the `timberd` binary wraps it with flags, logs and signal handling.

pub mod config;
pub mod keyspace;
pub mod resp;
pub mod streams;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

pub use config::{Config, Flags, LogFormat, Sync};
use keyspace::Keyspace;
use streams::StreamSpace;

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// Where the Redis-protocol endpoint listens.
    pub resp_addr: SocketAddr,
    keys: Arc<Keyspace>,
    streams: Arc<StreamSpace>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Opens the data directory and starts listening. Fails if another server holds the data
    /// directory or an address cannot be bound.
    pub async fn start(cfg: Config) -> anyhow::Result<Server> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
        let kv_dir = cfg.data_dir.join("kv");
        let keys = match Keyspace::open(&kv_dir, cfg.sync) {
            Ok(k) => Arc::new(k),
            Err(keyspace::Error::Kv(timber_kv::Error::Locked { .. })) => anyhow::bail!(
                "data directory {} is in use by another timberd (or another process holding its lock)",
                cfg.data_dir.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", kv_dir.display())),
        };
        let streams_dir = cfg.data_dir.join("streams");
        let streams = Arc::new(
            StreamSpace::open(keys.clone(), &streams_dir)
                .await
                .with_context(|| format!("cannot open {}", streams_dir.display()))?,
        );
        let listener = tokio::net::TcpListener::bind(cfg.resp_addr)
            .await
            .with_context(|| format!("cannot listen on {} (resp-addr)", cfg.resp_addr))?;
        let resp_addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let endpoint = Arc::new(resp::Endpoint::new(keys.clone(), streams.clone(), &cfg));
        let mut tasks = vec![tokio::spawn(resp::serve(endpoint, listener, stop_rx.clone()))];
        tasks.push(tokio::spawn(sweep(keys.clone(), streams.clone(), stop_rx)));
        tracing::info!(%resp_addr, data_dir = %cfg.data_dir.display(), sync = ?cfg.sync, "timberd listening");
        Ok(Server { resp_addr, keys, streams, stop, tasks })
    }

    /// Graceful shutdown: stop accepting, let connections finish the requests they have read,
    /// then sync and close the engines.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.streams.close().await?;
        let keys = self.keys.clone();
        tokio::task::spawn_blocking(move || keys.close()).await??;
        tracing::info!("timberd stopped; data synced");
        Ok(())
    }
}

/// Every 100 ms, deletes expired keys; every second, collects the streams of deleted keys.
async fn sweep(keys: Arc<Keyspace>, streams: Arc<StreamSpace>, mut stop: watch::Receiver<bool>) {
    let mut round = 0u64;
    loop {
        round += 1;
        if round.is_multiple_of(10) {
            match streams.collect_garbage().await {
                Ok(n) if n > 0 => tracing::debug!(streams = n, "collected streams of deleted keys"),
                Err(e) => tracing::warn!(error = %e, "stream collection failed"),
                _ => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = resp::stopped(&mut stop) => return,
        }
        let k = keys.clone();
        match tokio::task::spawn_blocking(move || k.sweep()).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(expired = n, "swept expired keys"),
            Ok(Err(e)) => tracing::warn!(error = %e, "expiry sweep failed"),
            _ => {}
        }
    }
}
