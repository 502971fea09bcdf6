//! Test support: a real S3 server (s3s + s3s-fs) on 127.0.0.1, and the two backends every suite
//! runs against.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use timber_stream::{Options, S3Options, Storage, WriterOptions};

pub const ACCESS_KEY: &str = "timber-test";
pub const SECRET_KEY: &str = "timber-test-secret";

/// A real S3 server over HTTP on 127.0.0.1, backed by a temporary directory.
#[derive(Debug)]
pub struct S3Server {
    pub addr: SocketAddr,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server on `rt` with one bucket per name in `buckets`.
    pub fn start(rt: &tokio::runtime::Runtime) -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let fs = s3s_fs::FileSystem::new(&root).unwrap();
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                // Without it, small responses wait for the peer's delayed ACK (40 ms).
                let _ = socket.set_nodelay(true);
                let conn =
                    http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3Server { addr, root, _dir: dir }
    }

    /// A new, empty bucket.
    pub fn bucket(&self, name: &str) -> S3Options {
        std::fs::create_dir_all(self.root.join(name)).unwrap();
        S3Options {
            endpoint: Some(format!("http://{}", self.addr)),
            bucket: name.to_string(),
            region: "us-east-1".into(),
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            allow_http: true,
            path_style: true,
        }
    }

    /// Files the server stores for objects under `bucket` (its own metadata files excluded).
    pub fn objects(&self, bucket: &str) -> Vec<String> {
        files_under(&self.root.join(bucket))
    }
}

/// One S3 server for the whole test binary, on its own runtime.
pub fn shared_s3() -> &'static S3Server {
    static SERVER: OnceLock<(tokio::runtime::Runtime, S3Server)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let s = S3Server::start(&rt);
            (rt, s)
        })
        .1
}

/// Where a suite keeps its fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    S3,
}

pub const BACKENDS: [Backend; 2] = [Backend::Local, Backend::S3];

static BUCKETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A fresh place for a stream store: a directory for metadata (and local fragments), and for S3
/// a fresh bucket on the shared server.
#[derive(Debug)]
pub struct Place {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    pub bucket: Option<String>,
    pub s3: Option<S3Options>,
}

impl Place {
    pub fn new(backend: Backend) -> Place {
        let dir = tempfile::tempdir().unwrap();
        let (bucket, s3) = match backend {
            Backend::Local => (None, None),
            Backend::S3 => {
                let n = BUCKETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let name = format!("b{}-{n}", std::process::id());
                let o = shared_s3().bucket(&name);
                (Some(name), Some(o))
            }
        };
        Place { dir, backend, bucket, s3 }
    }

    /// Options with fast writers and no background maintenance (tests call `maintain`).
    pub fn options(&self) -> Options {
        let storage = match &self.s3 {
            None => Storage::Local,
            Some(o) => Storage::S3(o.clone()),
        };
        Options::default()
            .storage(storage)
            .maintenance_interval(None)
            .retries(3, Duration::from_millis(5))
            .writer(fast_writer())
    }

    /// Names of the fragment objects stored now.
    pub fn fragment_files(&self) -> Vec<String> {
        let all = match &self.bucket {
            None => files_under(&self.dir.path().join("objects")),
            Some(b) => shared_s3().objects(b),
        };
        all.into_iter().filter(|f| f.ends_with(".frag")).collect()
    }
}

pub fn fast_writer() -> WriterOptions {
    WriterOptions { max_interval: Duration::from_millis(1), ..WriterOptions::local() }
}

pub fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}
