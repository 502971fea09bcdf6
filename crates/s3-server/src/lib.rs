//! A real S3 server (s3s with the s3s-fs backend) on 127.0.0.1, over a local directory: what
//! timber's object-storage tests and benchmarks run against. It can be stopped and started again
//! on the same address, to test a store that goes away and comes back.
//!
//! Buckets are directories under the root; the server checks every request's signature against
//! one access key and secret, and, as S3 does, answers `NoSuchBucket` for a bucket that does
//! not exist (s3s-fs alone would create it on the first put).

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;

/// The access key id the servers accept unless told otherwise.
pub const ACCESS_KEY: &str = "timber-test";
/// Its secret.
pub const SECRET_KEY: &str = "timber-test-secret";

/// A running (or stopped) server.
#[derive(Debug)]
pub struct S3Server {
    addr: SocketAddr,
    root: PathBuf,
    keys: (String, String),
    /// The accept loop and every connection; aborted by [`S3Server::stop`].
    tasks: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl S3Server {
    /// Starts a server over a new temporary directory, on a free port of 127.0.0.1, on the
    /// current tokio runtime, with the default keys.
    pub async fn start() -> std::io::Result<S3Server> {
        let dir = tempfile::tempdir()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut s = S3Server::start_at(dir.path(), addr, ACCESS_KEY, SECRET_KEY).await?;
        s._dir = Some(dir);
        Ok(s)
    }

    /// Starts a server over `root` (created if missing) on `addr` (port 0: a free one).
    pub async fn start_at(
        root: &Path,
        addr: SocketAddr,
        access_key: &str,
        secret_key: &str,
    ) -> std::io::Result<S3Server> {
        std::fs::create_dir_all(root)?;
        let mut s = S3Server {
            addr,
            root: root.to_path_buf(),
            keys: (access_key.to_string(), secret_key.to_string()),
            tasks: None,
            _dir: None,
        };
        s.serve().await?;
        Ok(s)
    }

    async fn serve(&mut self) -> std::io::Result<()> {
        let fs = s3s_fs::FileSystem::new(&self.root)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(self.keys.0.as_str(), self.keys.1.as_str()));
        b.set_access(Access { root: self.root.clone() });
        let service = b.build();
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        self.tasks = Some(tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else { continue };
                        // Without it, small responses wait for the peer's delayed ACK.
                        let _ = socket.set_nodelay(true);
                        let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                        conns.spawn(async move {
                            let _ = conn.await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }));
        Ok(())
    }

    /// Stops serving: the listener closes and every open connection drops.
    pub fn stop(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
        }
    }

    /// Serves again on the same address and directory.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.serve().await
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a bucket (if missing).
    pub fn create_bucket(&self, name: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.root.join(name))
    }

    /// The directory holding `bucket`'s objects (one file per object, named by its key).
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    /// The keys of the objects under `bucket`, sorted (the backend's own metadata excluded).
    pub fn objects(&self, bucket: &str) -> Vec<String> {
        let root = self.root.join(bucket);
        let mut out = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(d) = dirs.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root) {
                    let rel = rel.to_string_lossy().into_owned();
                    if !rel.starts_with(".s3s") && !rel.contains("/.s3s") {
                        out.push(rel);
                    }
                }
            }
        }
        out.sort();
        out
    }
}

/// Who may do what: signed requests only, to buckets that exist.
struct Access {
    root: PathBuf,
}

#[async_trait::async_trait]
impl s3s::access::S3Access for Access {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> s3s::S3Result<()> {
        if cx.credentials().is_none() {
            return Err(s3s::s3_error!(AccessDenied, "Signature required"));
        }
        let bucket = match cx.s3_path() {
            s3s::path::S3Path::Bucket { bucket } | s3s::path::S3Path::Object { bucket, .. } => {
                bucket
            }
            s3s::path::S3Path::Root => return Ok(()),
        };
        if cx.s3_op().name() != "CreateBucket" && !self.root.join(&**bucket).is_dir() {
            return Err(s3s::s3_error!(NoSuchBucket));
        }
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
