//! Test support: a real S3 server (timber-s3-server: s3s + s3s-fs on 127.0.0.1), and the two
//! backends every suite runs against.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

pub use timber_s3_server::{S3Server, ACCESS_KEY, SECRET_KEY};
use timber_stream::{Options, S3Options, Storage, WriterOptions};

/// Options for a bucket of `server` (created if missing).
pub fn bucket(server: &S3Server, name: &str) -> S3Options {
    server.create_bucket(name).unwrap();
    S3Options {
        endpoint: Some(server.endpoint()),
        bucket: name.to_string(),
        region: "us-east-1".into(),
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
        allow_http: true,
        path_style: true,
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
            let s = rt.block_on(S3Server::start()).unwrap();
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
                let o = bucket(shared_s3(), &name);
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
