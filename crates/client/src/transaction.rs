//! Interactive transactions ([`Client::begin`], [`Client::transact`]): reads and writes under
//! one transaction on the server, then commit or rollback. A commit that finds a conflict (or
//! a deadlock, a lock timeout, a transaction the server no longer holds) fails with
//! [`Code::Aborted`]; [`Client::transact`] then runs the whole transaction again.
//!
//! ```no_run
//! # async fn demo(client: timber_client::Client) -> Result<(), timber_client::Error> {
//! use timber_client::{Isolation, TxnOptions};
//! // Moves 10 from a to b; retried on a conflict.
//! client
//!     .transact(TxnOptions::new(Isolation::Serializable), |t| async move {
//!         let num = |v: Option<bytes::Bytes>| -> i64 {
//!             v.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok()).unwrap_or(0)
//!         };
//!         let (a, b) = (num(t.get_for_update("a").await?), num(t.get_for_update("b").await?));
//!         t.put("a", (a - 10).to_string()).await?;
//!         t.put("b", (b + 10).to_string()).await?;
//!         Ok(())
//!     })
//!     .await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use timber_proto::v1 as pb;
use timber_proto::v1::transactions_client::TransactionsClient;
use tonic::transport::Channel;

use crate::{Client, Code, Error, Result, Scan};

/// What a transaction's reads see and what its commit checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Each read sees the latest committed writes; nothing is checked at commit.
    ReadCommitted,
    /// Reads see the snapshot at begin; a key it writes that another wrote since conflicts.
    Snapshot,
    /// As `Snapshot`, and every key read and range scanned must be unwritten since.
    Serializable,
}

/// How [`Client::begin`] starts a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOptions {
    pub isolation: Isolation,
    /// Lock keys as they are written or read for update (conflicts wait), instead of finding
    /// conflicts at commit.
    pub pessimistic: bool,
    /// How long a pessimistic lock is waited for (the server's default, 1 s, if `None`).
    pub lock_timeout: Option<Duration>,
}

impl TxnOptions {
    /// Optimistic at `isolation`.
    pub fn new(isolation: Isolation) -> TxnOptions {
        TxnOptions { isolation, pessimistic: false, lock_timeout: None }
    }

    /// Pessimistic at `isolation`.
    pub fn pessimistic(isolation: Isolation) -> TxnOptions {
        TxnOptions { pessimistic: true, ..TxnOptions::new(isolation) }
    }
}

impl Default for TxnOptions {
    fn default() -> TxnOptions {
        TxnOptions::new(Isolation::Snapshot)
    }
}

/// An open transaction on the server (a handle: cheap to clone, every clone the same
/// transaction). Rolled back by [`Transaction::rollback`], or by the server once idle.
#[derive(Debug, Clone)]
pub struct Transaction {
    client: Client,
    id: u64,
}

impl Client {
    fn txns(&self) -> TransactionsClient<Channel> {
        TransactionsClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    /// Begins a transaction.
    pub async fn begin(&self, opts: TxnOptions) -> Result<Transaction> {
        let isolation = match opts.isolation {
            Isolation::ReadCommitted => pb::Isolation::ReadCommitted,
            Isolation::Snapshot => pb::Isolation::Snapshot,
            Isolation::Serializable => pb::Isolation::Serializable,
        };
        let req = pb::BeginRequest {
            isolation: isolation as i32,
            pessimistic: opts.pessimistic,
            lock_timeout_ms: opts.lock_timeout.map(|t| t.as_millis() as u64),
        };
        // Retried: a transaction begun twice leaves one idle, which the server rolls back.
        let r = self
            .idempotent("begin", || {
                let (mut c, r) = (self.txns(), self.request(req));
                async move { c.begin(r).await }
            })
            .await?;
        Ok(Transaction { client: self.clone(), id: r.id })
    }

    /// Runs `f` in a new transaction and commits it; when `f` or the commit fails with
    /// [`Code::Aborted`] (a conflict), rolls back and runs it all again, up to 10 times. Other
    /// errors roll back and return.
    pub async fn transact<T, F, Fut>(&self, opts: TxnOptions, mut f: F) -> Result<T>
    where
        F: FnMut(Transaction) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        let mut backoff = Duration::from_millis(2);
        loop {
            let t = self.begin(opts).await?;
            let r = match f(t.clone()).await {
                Ok(v) => t.commit().await.map(|()| v),
                Err(e) => {
                    let _ = t.rollback().await;
                    Err(e)
                }
            };
            match r {
                Err(e) if e.code() == Some(Code::Aborted) && attempt < 10 => {
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }
}

impl Transaction {
    /// Its id on the server.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The value of `key` as the transaction sees it (its own writes first).
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>> {
        self.get_with(key.into(), false).await
    }

    /// [`Transaction::get`] of a key it means to write: pessimistic, it is locked; optimistic,
    /// a write of it by another since the transaction began is a conflict at commit.
    pub async fn get_for_update(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>> {
        self.get_with(key.into(), true).await
    }

    async fn get_with(&self, key: Bytes, for_update: bool) -> Result<Option<Bytes>> {
        let req = pb::TxnGetRequest { id: self.id, key, for_update };
        let (mut c, r) = (self.client.txns(), self.client.request(req));
        Ok(self.client.once("txn get", async move { c.get(r).await }).await?.value)
    }

    /// Stores a value when the transaction commits.
    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<()> {
        self.put_with(key.into(), value.into(), None).await
    }

    /// Stores a value that expires `ttl` after this call.
    pub async fn put_with_ttl(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        ttl: Duration,
    ) -> Result<()> {
        self.put_with(key.into(), value.into(), Some(crate::ttl_ms(ttl))).await
    }

    async fn put_with(&self, key: Bytes, value: Bytes, ttl_ms: Option<u64>) -> Result<()> {
        let req = pb::TxnPutRequest { id: self.id, key, value, ttl_ms };
        let (mut c, r) = (self.client.txns(), self.client.request(req));
        self.client.once("txn put", async move { c.put(r).await }).await?;
        Ok(())
    }

    /// Deletes a key when the transaction commits; whether it exists as the transaction sees it.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool> {
        let req = pb::TxnDeleteRequest { id: self.id, key: key.into() };
        let (mut c, r) = (self.client.txns(), self.client.request(req));
        Ok(self.client.once("txn delete", async move { c.delete(r).await }).await?.existed)
    }

    /// Keys and values in key order as the transaction sees them (`stale` is ignored).
    pub async fn scan(&self, scan: Scan) -> Result<Vec<(Bytes, Bytes)>> {
        let req = pb::TxnScanRequest {
            id: self.id,
            prefix: scan.prefix,
            start: scan.start,
            end: scan.end,
            limit: scan.limit,
        };
        let (mut c, r) = (self.client.txns(), self.client.request(req));
        let page = self.client.once("txn scan", async move { c.scan(r).await }).await?;
        Ok(page.items.into_iter().map(|kv| (kv.key, kv.value)).collect())
    }

    /// Commits: [`Code::Aborted`] on a conflict (nothing was written; run it again). Not
    /// retried: a commit that timed out may have landed.
    pub async fn commit(&self) -> Result<()> {
        let (mut c, r) = (self.client.txns(), self.client.request(pb::TxnRef { id: self.id }));
        self.client.once("commit", async move { c.commit(r).await }).await?;
        Ok(())
    }

    /// Rolls back: its writes are dropped; whether it was still open.
    pub async fn rollback(&self) -> Result<bool> {
        let (mut c, r) = (self.client.txns(), self.client.request(pb::TxnRef { id: self.id }));
        Ok(self.client.once("rollback", async move { c.rollback(r).await }).await?.existed)
    }
}

impl Error {
    /// Whether it is an abort of a transaction (a conflict): run the transaction again.
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(Code::Aborted)
    }
}
