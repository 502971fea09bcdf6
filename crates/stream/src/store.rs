//! The object store under the fragments: the local file system or an S3-compatible store through
//! `object_store`, with per-call timeouts, retries with exponential backoff, create-only puts and
//! latency metrics.
//!
//! Object keys: `<prefix>/<stream:016x>/<segment:016x>/<first:020>-<end:020>-<epoch:x>.frag`,
//! where `[first, end)` is the range of entry ids the fragment holds and `epoch` that of the
//! writer that wrote it (0 for merged fragments), so a fenced writer's keys never collide with
//! its successor's. A key is never written twice with
//! different contents: every put is create-only (`PutMode::Create`), and a put that finds its key
//! taken succeeds only if the stored object is byte-identical (a retry of a put that had in fact
//! succeeded); otherwise another writer owns the key and the put fails.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Error, Result};
use crate::options::{Options, Storage};

/// Outcome of a create-only put whose key already held an object.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Put {
    /// The object is stored (now or by an earlier attempt with the same bytes).
    Stored,
    /// The key holds different bytes: someone else wrote it.
    Taken,
}

#[derive(Debug, Clone)]
pub(crate) struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    retries: u32,
    backoff: Duration,
    timeout: Duration,
    /// What the store is, for messages: backend, endpoint, bucket, prefix (never a secret).
    describe: Arc<str>,
    /// Not the local file system: checked at open, and subject to outages.
    remote: bool,
    health: Arc<Health>,
}

/// Whether the store answers: since when it has been failing, and the last error. Set by the
/// uploads that retry until the store is back (`put_until_stored`); any success clears it.
#[derive(Debug, Default)]
pub(crate) struct Health {
    failing: parking_lot::Mutex<Option<(Instant, String)>>,
    /// `failing` is set (read on every journaled append without the lock).
    down: std::sync::atomic::AtomicBool,
}

impl Health {
    fn failed(&self, e: &Error) {
        self.down.store(true, std::sync::atomic::Ordering::Release);
        let mut f = self.failing.lock();
        match &mut *f {
            Some((_, last)) => *last = e.to_string(),
            None => {
                tracing::warn!(error = %e, "object store unavailable; acknowledged entries wait in the journal");
                *f = Some((Instant::now(), e.to_string()));
            }
        }
    }

    fn succeeded(&self) {
        if !self.is_down() {
            return;
        }
        self.down.store(false, std::sync::atomic::Ordering::Release);
        if self.failing.lock().take().is_some() {
            tracing::info!("object store available again");
        }
    }

    /// Whether the store is failing now (one atomic load).
    #[inline]
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Since when, and with what last error, the store has been failing.
    pub(crate) fn failing(&self) -> Option<(Instant, String)> {
        self.failing.lock().clone()
    }
}

/// Where one fragment lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ObjectId {
    pub(crate) stream: u64,
    pub(crate) segment: u64,
    pub(crate) first_id: u64,
    pub(crate) end_id: u64,
    /// Epoch of the writer that wrote it; 0 for fragments made by merging.
    pub(crate) epoch: u64,
}

fn retryable(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::NotModified { .. }
    )
}

impl Store {
    pub(crate) fn open(dir: &FsPath, opts: &Options) -> Result<Store> {
        let inner: Arc<dyn ObjectStore> = match &opts.storage {
            Storage::Local => {
                let root = dir.join("objects");
                std::fs::create_dir_all(&root).map_err(|e| Error::Store {
                    op: "create directory",
                    key: root.display().to_string(),
                    source: object_store::Error::Generic { store: "local", source: Box::new(e) },
                })?;
                remove_staging_files(&root);
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&root)
                    .map_err(|e| Error::Store {
                        op: "open",
                        key: root.display().to_string(),
                        source: e,
                    })?
                    .with_fsync(true)
                    .with_automatic_cleanup(true);
                Arc::new(fs)
            }
            Storage::S3(s3) => {
                let b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_access_key_id(&s3.access_key_id)
                    .with_secret_access_key(&s3.secret_access_key)
                    .with_allow_http(s3.allow_http)
                    .with_virtual_hosted_style_request(!s3.path_style)
                    .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
                    .with_retry(object_store::RetryConfig {
                        max_retries: 0,
                        retry_timeout: opts.request_timeout,
                        ..Default::default()
                    });
                let b = match &s3.endpoint {
                    Some(ep) => b.with_endpoint(ep),
                    None => b,
                };
                Arc::new(b.build().map_err(|e| Error::Store {
                    op: "configure S3",
                    key: s3.bucket.clone(),
                    source: e,
                })?)
            }
            Storage::Custom(s) => s.clone(),
        };
        let prefix = opts.prefix.trim_matches('/').to_string();
        let describe = match &opts.storage {
            Storage::Local => format!("{}/{prefix}", dir.join("objects").display()),
            Storage::S3(s3) => format!(
                "s3://{}/{prefix} at {}",
                s3.bucket,
                s3.endpoint.as_deref().unwrap_or("AWS")
            ),
            Storage::Custom(s) => format!("{s}/{prefix}"),
        };
        Ok(Store {
            inner,
            prefix,
            retries: opts.max_retries,
            backoff: opts.retry_backoff,
            timeout: opts.request_timeout,
            describe: describe.into(),
            remote: !matches!(opts.storage, Storage::Local),
            health: Arc::default(),
        })
    }

    /// What the store is: backend, endpoint, bucket and prefix (never a credential).
    pub(crate) fn describe(&self) -> &str {
        &self.describe
    }

    /// Whether the store is not the local file system.
    pub(crate) fn is_remote(&self) -> bool {
        self.remote
    }

    pub(crate) fn health(&self) -> &Health {
        &self.health
    }

    /// Checks that the store can be written: a create-only put of a probe object under the
    /// prefix, then its removal. A failure names what failed (the endpoint cannot be reached,
    /// the bucket does not exist, the credentials are refused) without any secret.
    pub(crate) async fn probe(&self) -> Result<()> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = Path::from(format!("{}/.probe-{}-{nanos:x}", self.prefix, std::process::id()));
        let unusable = |source: object_store::Error| {
            let problem = problem(&source);
            Error::StoreUnusable { store: self.describe.to_string(), problem, source }
        };
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        match tokio::time::timeout(
            self.timeout,
            self.inner.put_opts(&p, PutPayload::from_static(b"timber"), create),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(unusable(e)),
            Err(_) => {
                return Err(unusable(object_store::Error::Generic {
                    store: "timber",
                    source: format!("no answer within {:?}", self.timeout).into(),
                }))
            }
        }
        self.inner.delete(&p).await.map_err(unusable)
    }

    /// [`Store::put`] that goes on retrying (with backoff, up to 5 s apart) while the store
    /// fails in a way that may pass (unreachable, timing out, server errors), recording the
    /// outage in [`Health`]; `stop` ends it early with the last error.
    pub(crate) async fn put_until_stored(
        &self,
        p: &Path,
        data: Bytes,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Put> {
        let mut backoff = self.backoff.max(Duration::from_millis(50));
        loop {
            match self.put(p, data.clone()).await {
                Err(e) if transient(&e) && !stop.load(std::sync::atomic::Ordering::Acquire) => {
                    self.health.failed(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                r => {
                    if r.is_ok() {
                        self.health.succeeded();
                    }
                    return r;
                }
            }
        }
    }

    pub(crate) fn path(&self, o: &ObjectId) -> Path {
        Path::from(format!(
            "{}/{:016x}/{:016x}/{:020}-{:020}-{:x}.frag",
            self.prefix, o.stream, o.segment, o.first_id, o.end_id, o.epoch
        ))
    }

    fn stream_prefix(&self, stream: Option<u64>) -> Path {
        match stream {
            Some(s) => Path::from(format!("{}/{s:016x}", self.prefix)),
            None => Path::from(self.prefix.as_str()),
        }
    }

    /// Parses a fragment key; `None` for anything this crate did not write.
    pub(crate) fn parse(&self, p: &Path) -> Option<ObjectId> {
        let rest = p.as_ref().strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let stream = u64::from_str_radix(parts.next()?, 16).ok()?;
        let segment = u64::from_str_radix(parts.next()?, 16).ok()?;
        let file = parts.next()?.strip_suffix(".frag")?;
        if parts.next().is_some() {
            return None;
        }
        let mut nums = file.split('-');
        let first_id = nums.next()?.parse().ok()?;
        let end_id = nums.next()?.parse().ok()?;
        let epoch = u64::from_str_radix(nums.next()?, 16).ok()?;
        let o = ObjectId { stream, segment, first_id, end_id, epoch };
        (self.path(&o) == *p).then_some(o)
    }

    /// Runs `call` with a timeout, retrying retryable failures with exponential backoff.
    async fn retry<T, F, Fut>(&self, op: &'static str, key: &Path, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let mut backoff = self.backoff;
        let mut attempt = 0;
        loop {
            let start = Instant::now();
            let r = match tokio::time::timeout(self.timeout, call()).await {
                Ok(r) => r,
                Err(_) => Err(object_store::Error::Generic {
                    store: "timber",
                    source: format!("{op} timed out after {:?}", self.timeout).into(),
                }),
            };
            metrics::histogram!("timber_stream_store_seconds", "op" => op)
                .record(start.elapsed().as_secs_f64());
            match r {
                Ok(v) => return Ok(v),
                Err(e) if retryable(&e) && attempt < self.retries => {
                    attempt += 1;
                    metrics::counter!("timber_stream_store_retries_total", "op" => op).increment(1);
                    tracing::debug!(op, key = %key, attempt, error = %e, "object store call failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(Error::Store { op, key: key.to_string(), source: e }),
            }
        }
    }

    /// Create-only put of a whole object, durable when it returns.
    pub(crate) async fn put(&self, p: &Path, data: Bytes) -> Result<Put> {
        let opts = || PutOptions { mode: PutMode::Create, ..Default::default() };
        let r = self
            .retry("put", p, || async {
                fail::fail_point!("stream::store::put", |_| Err(injected()));
                let r = self.inner.put_opts(p, PutPayload::from_bytes(data.clone()), opts()).await;
                // The object is stored, but its caller is told the put failed.
                fail::fail_point!("stream::store::put_reply", r.is_ok(), |_| Err(injected()));
                r
            })
            .await;
        match r {
            Ok(_) => Ok(Put::Stored),
            Err(Error::Store { source: object_store::Error::AlreadyExists { .. }, .. })
            | Err(Error::Store { source: object_store::Error::Precondition { .. }, .. }) => {
                match self.get(p).await {
                    Ok(existing) if existing == data => Ok(Put::Stored),
                    Ok(_) => Ok(Put::Taken),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The whole object.
    pub(crate) async fn get(&self, p: &Path) -> Result<Bytes> {
        self.retry("get", p, || async {
            fail::fail_point!("stream::store::get", |_| Err(injected()));
            self.inner.get(p).await?.bytes().await
        })
        .await
    }

    /// Deletes an object; a missing one is not an error.
    pub(crate) async fn delete(&self, p: &Path) -> Result<()> {
        let delete = || async {
            fail::fail_point!("stream::store::delete", |_| Err(injected()));
            self.inner.delete(p).await
        };
        match self.retry("delete", p, delete).await {
            Err(Error::Store { source: object_store::Error::NotFound { .. }, .. }) => Ok(()),
            r => r,
        }
    }

    /// Every object under one stream's prefix, or under the store's prefix.
    pub(crate) async fn list(&self, stream: Option<u64>) -> Result<Vec<ObjectMeta>> {
        let p = self.stream_prefix(stream);
        self.retry("list", &p, || self.inner.list(Some(&p)).try_collect()).await
    }
}

/// Removes the staging files (`<key>#<n>`) a crash in the middle of a local put leaves behind.
/// They are never visible as objects; this only reclaims their space.
fn remove_staging_files(root: &FsPath) {
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(p);
            } else if e.file_name().to_string_lossy().contains(".frag#") {
                if let Err(err) = std::fs::remove_file(&p) {
                    tracing::warn!(path = %p.display(), error = %err, "removing a staging file failed");
                }
            }
        }
    }
}

/// Whether a failed store call may succeed later without anyone changing anything (an outage,
/// not a refusal).
pub(crate) fn transient(e: &Error) -> bool {
    match e {
        Error::Store { source, .. } => retryable(source),
        _ => false,
    }
}

/// What a failed probe means, in words.
fn problem(e: &object_store::Error) -> String {
    use object_store::Error as E;
    let text = e.to_string();
    // The words that tell the cases apart are often deep in the source chain (the HTTP
    // client's connect error, the server's error code).
    let mut all = text.to_ascii_lowercase();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        all.push(' ');
        all.push_str(&s.to_string().to_ascii_lowercase());
        source = s.source();
    }
    if matches!(e, E::Unauthenticated { .. } | E::PermissionDenied { .. })
        // Not the bare status code: "403" also turns up in a request's timing ("237.403µs").
        || ["forbidden", "accessdenied", "signaturedoesnotmatch", "invalidaccesskeyid"]
            .iter()
            .any(|w| all.contains(w))
    {
        format!("the credentials were refused (check the access key id and secret): {text}")
    } else if ["nosuchbucket", "bucket does not exist", "no such bucket"]
        .iter()
        .any(|w| all.contains(w))
        || matches!(e, E::NotFound { .. })
    {
        format!("the bucket does not exist: {text}")
    } else if ["connect", "dns", "resolve", "no answer", "timed out", "connection refused"]
        .iter()
        .any(|w| all.contains(w))
    {
        format!("the endpoint cannot be reached: {text}")
    } else {
        format!("a test write failed: {text}")
    }
}

/// The error a failpoint injects in place of the object store's (feature `failpoints`): one the
/// store retries, as it does a failed request.
#[cfg(feature = "failpoints")]
fn injected() -> object_store::Error {
    object_store::Error::Generic { store: "failpoint", source: "injected by a failpoint".into() }
}

pub(crate) fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Store { source: object_store::Error::NotFound { .. }, .. })
}

#[cfg(test)]
mod tests {
    use super::problem;

    fn generic(text: &str) -> object_store::Error {
        object_store::Error::Generic { store: "S3", source: text.to_string().into() }
    }

    #[test]
    fn a_failed_probe_is_told_by_its_cause_not_by_digits_in_its_timing() {
        let refused = generic(
            "Error performing PUT http://127.0.0.1:9/b/.probe in 237.403µs - HTTP error: error \
             sending request: tcp connect error: Connection refused (os error 111)",
        );
        assert!(problem(&refused).starts_with("the endpoint cannot be reached"));
        let forbidden =
            generic("Client error with status 403 Forbidden: <Code>AccessDenied</Code>");
        assert!(problem(&forbidden).starts_with("the credentials were refused"));
        let bucket = generic("<Code>NoSuchBucket</Code>");
        assert!(problem(&bucket).starts_with("the bucket does not exist"));
    }
}
