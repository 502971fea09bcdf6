//! Starts the real `timberd` binary on a free port with a temporary data directory.
#![allow(dead_code)]

pub mod history;
pub mod net;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct Timberd {
    pub child: Child,
    /// The Redis-protocol port.
    pub port: u16,
    pub grpc_port: u16,
    pub http_port: u16,
    pub stderr: mpsc::Receiver<String>,
    /// The lines logged before it listened.
    pub early: Vec<String>,
}

/// A port free now on `ip`, for a member to bind later: taken from a range that differs per
/// test process (the end-to-end tests run in parallel) and below the kernel's ephemeral range
/// (32768 and up), where another test's outgoing connection could take it before the member
/// binds it.
pub fn free_port(ip: std::net::IpAddr) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id() % 8000;
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((base + n) % 12_000) as u16;
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// A gRPC client of the timberd whose gRPC endpoint is at `port` on 127.0.0.1 (for tasks that
/// cannot borrow its [`Timberd`]).
pub async fn grpc_at(port: u16) -> timber_client::Client {
    timber_client::Client::connect(format!("http://127.0.0.1:{port}")).await.unwrap()
}

impl Timberd {
    /// Starts timberd on `dir` with extra flags and waits until it listens.
    ///
    /// `TIMBER_TEST_WORKERS=n` in the environment runs it with `--workers n` unless `extra`
    /// names `--workers` (`.ci/run` runs the end-to-end suites again with one worker, where
    /// timberd runs on a current-thread runtime).
    pub fn start(dir: &Path, extra: &[&str]) -> Timberd {
        Timberd::start_env(dir, extra, &[])
    }

    /// [`Timberd::start`] with extra environment variables.
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Timberd {
        let mut workers = Vec::new();
        if let Ok(n) = std::env::var("TIMBER_TEST_WORKERS") {
            if !extra.contains(&"--workers") {
                workers = vec!["--workers".to_string(), n];
            }
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_timberd"))
            .args(["--data-dir", dir.to_str().unwrap(), "--resp-addr", "127.0.0.1:0"])
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(&workers)
            .args(extra)
            .env("TIMBER_LOG", "info,openraft=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let port_of = |line: &str, field: &str| -> Option<u16> {
            let rest = line.split(&format!("{field}=")).nth(1)?;
            let addr = rest.split_whitespace().next()?;
            addr.rsplit(':').next()?.parse().ok()
        };
        // Built first so that its Drop kills the child if the start fails.
        let mut t =
            Timberd { child, port: 0, grpc_port: 0, http_port: 0, stderr: rx, early: Vec::new() };
        while t.port == 0 {
            let line = match t.stderr.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => line,
                Err(e) => panic!(
                    "timberd did not report its addresses ({e}); it wrote:\n{}",
                    t.early.join("\n")
                ),
            };
            if let (Some(port), Some(grpc_port), Some(http_port)) = (
                port_of(&line, "resp_addr"),
                port_of(&line, "grpc_addr"),
                port_of(&line, "http_addr"),
            ) {
                (t.port, t.grpc_port, t.http_port) = (port, grpc_port, http_port);
            }
            t.early.push(line);
        }
        t
    }

    /// Runs timberd on `dir` with extra flags, expecting it to refuse to start: its exit code
    /// must be 1; returns what it wrote to stderr.
    pub fn fails(dir: &Path, extra: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_timberd"))
            .args(["--data-dir", dir.to_str().unwrap(), "--resp-addr", "127.0.0.1:0"])
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{err}");
        err
    }

    /// Lines timberd has logged so far (waits for none).
    pub fn logged(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    pub fn client(&self) -> redis::Connection {
        let c = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).unwrap();
        let con = c.get_connection_with_timeout(Duration::from_secs(10)).unwrap();
        con.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        con
    }

    /// A connection, or the error (a member being stopped may not answer).
    pub fn try_client(&self) -> redis::RedisResult<redis::Connection> {
        let c = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        let con = c.get_connection_with_timeout(Duration::from_secs(5))?;
        con.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(con)
    }

    /// A gRPC client.
    pub async fn grpc(&self) -> timber_client::Client {
        grpc_at(self.grpc_port).await
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> i32 {
        self.signal(rustix::process::Signal::TERM);
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Timberd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
