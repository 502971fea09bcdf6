//! End-to-end tests of the `timber` binary against a real server (timberd's library, started in
//! this process on free ports): every subcommand, human and JSON output, exit codes.

use std::process::{Command, Output};

struct Harness {
    addr: String,
    rt: tokio::runtime::Runtime,
    server: Option<timber_server::Server>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn start() -> Harness {
        Harness::start_with(|_| {})
    }

    fn start_with(set: impl FnOnce(&mut timber_server::Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut cfg = timber_server::Config::for_dir(dir.path());
        set(&mut cfg);
        let server = rt.block_on(timber_server::Server::start(cfg)).unwrap();
        let addr = format!("http://{}", server.grpc_addr);
        Harness { addr, rt, server: Some(server), _dir: dir }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_timber"))
            .args(["--addr", &self.addr])
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(self.ok(&a).trim()).unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = self.rt.block_on(s.shutdown());
        }
    }
}

#[test]
fn kv_stream_status_and_exit_codes() {
    let h = Harness::start();
    assert_eq!(h.ok(&["kv", "put", "a", "1"]).trim(), "OK");
    h.ok(&["kv", "put", "b", "2", "--ttl", "1h"]);
    assert_eq!(h.ok(&["kv", "get", "a"]).trim(), "1");
    assert_eq!(h.json(&["kv", "get", "b"])["value"], "2");
    assert_eq!(h.ok(&["kv", "scan", "--prefix", ""]), "a\t1\nb\t2\n");
    assert_eq!(h.json(&["kv", "scan", "--start", "b"])["items"][0]["key"], "b");
    assert_eq!(h.ok(&["kv", "del", "a"]).trim(), "deleted");
    let missing = h.run(&["kv", "get", "a"]);
    assert_eq!(missing.status.code(), Some(3), "a missing key exits 3");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));

    h.ok(&["stream", "create", "ev"]);
    assert_eq!(h.run(&["stream", "create", "ev"]).status.code(), Some(1));
    assert_eq!(h.json(&["stream", "append", "ev", "x", "y", "z"])["first_id"], 0);
    assert_eq!(h.ok(&["stream", "read", "ev"]), "0\tx\n1\ty\n2\tz\n");
    assert_eq!(h.ok(&["stream", "read", "ev", "--from", "1", "--limit", "1"]), "1\ty\n");
    assert!(h.ok(&["stream", "ls"]).contains("ev"));
    assert_eq!(h.json(&["stream", "truncate", "ev", "2"])["first_id"], 2);
    assert_eq!(h.run(&["stream", "read", "nope"]).status.code(), Some(3));

    // tail -f prints entries appended after it started, until it is stopped.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_timber"))
        .args(["--addr", &h.addr, "stream", "tail", "-f", "ev", "--from", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    h.ok(&["stream", "append", "ev", "late"]);
    let mut out = tail.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("3\tlate") {
        use std::io::Read as _;
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "tail ended early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("2\tz\n"));
    tail.kill().unwrap();
    let _ = tail.wait();

    h.ok(&["stream", "delete", "ev"]);
    let st = h.json(&["status"]);
    assert_eq!(st["streams"], 0);
    assert!(st["keys"].as_u64().unwrap() >= 1);
    assert!(h.ok(&["status"]).contains("sync      interval:1000"));

    // A single node has no cluster to change: a clear error, exit 1.
    let o = h.run(&["cluster", "transfer-leader", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("single node"), "{o:?}");

    // Bad usage and an unreachable server.
    assert_eq!(h.run(&["kv"]).status.code(), Some(2));
    let o = Command::new(env!("CARGO_BIN_EXE_timber"))
        .args(["--addr", "http://127.0.0.1:1", "--timeout", "2s", "status"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach timberd"));
}

#[test]
fn bench_reports_throughput_and_latency() {
    let h = Harness::start();
    for workload in ["put", "get", "append"] {
        let v = h.json(&[
            "bench",
            "--workload",
            workload,
            "--concurrency",
            "4",
            "--duration",
            "300ms",
            "--keys",
            "100",
        ]);
        assert!(v["ops"].as_u64().unwrap() > 0, "{workload}: {v}");
        assert_eq!(v["errors"], 0, "{workload}: {v}");
        assert!(v["p99_us"].as_u64().unwrap() >= v["p50_us"].as_u64().unwrap());
    }
    let text = h.ok(&["bench", "--workload", "put", "--duration", "200ms"]);
    assert!(text.contains("ops/s") && text.contains("p99"), "{text}");
}

#[test]
fn txn_runs_one_branch_and_exits_4_when_comparisons_fail() {
    let h = Harness::start();
    let take =
        ["txn", "--if", "lock missing", "--then", "put lock me and mine", "--else", "get lock"];
    assert_eq!(h.ok(&take), "SUCCESS\nOK\n");
    let o = h.run(&take);
    assert_eq!(o.status.code(), Some(4), "the comparison failed");
    assert_eq!(String::from_utf8(o.stdout).unwrap(), "FAILURE\nme and mine\n");
    let v =
        h.json(&["txn", "--if", "lock = me and mine", "--then", "del lock", "--then", "get lock"]);
    assert_eq!(v["succeeded"], true);
    assert_eq!(v["results"][0]["delete"]["existed"], true);
    assert_eq!(v["results"][1]["get"]["value"], serde_json::Value::Null);
    // Bad arguments: an error, exit 1, nothing sent.
    let o = h.run(&["txn", "--if", "lock ~ x", "--then", "put lock x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad comparison"));
    assert_eq!(h.run(&["kv", "get", "lock"]).status.code(), Some(3));
}

/// `timber cluster` against a cluster of one member: its status in both forms, and a change
/// the leader refuses, with its reason.
#[test]
fn cluster_status_and_changes_against_a_cluster_member() {
    use std::time::Duration;
    // Below the kernel's ephemeral range (32768 and up), where another test's outgoing
    // connection could take the port before the member binds it; apart from the range the
    // server's end-to-end tests take theirs from (20000 and up).
    let base = std::process::id() % 4000;
    let port = (0..4000)
        .map(|n| 16_000 + ((base + n) % 4000) as u16)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port in 16000..20000");
    let raft: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let h = Harness::start_with(|cfg| {
        cfg.cluster = Some(timber_server::Cluster {
            node_id: 1,
            raft_addr: raft,
            initial: [(1, raft.to_string())].into(),
            heartbeat: Duration::from_millis(50),
            election: (Duration::from_millis(150), Duration::from_millis(300)),
            snapshot_entries: 10_000,
            timeout: Duration::from_secs(2),
            join: None,
        });
    });
    // The member leads once it elected itself; a write through it then commits.
    h.ok(&["kv", "put", "a", "1"]);
    let st = h.json(&["cluster", "status"]);
    assert_eq!((st["node_id"].as_u64(), st["role"].as_str()), (Some(1), Some("leader")), "{st}");
    let commit = st["commit_index"].as_u64().unwrap();
    assert!(commit >= 1 && commit <= st["last_log_index"].as_u64().unwrap(), "{st}");
    let members = st["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["role"], "leader");
    assert_eq!(members[0]["raft_addr"], raft.to_string());
    assert_eq!(members[0]["lag"], 0);
    let text = h.ok(&["cluster", "status"]);
    assert!(text.starts_with("member 1 (leader), term "), "{text}");
    assert!(text.contains(", committed ") && text.contains(", applied "), "{text}");
    assert!(text.lines().nth(2).unwrap().contains("leader"), "{text}");
    // No member 2 to promote: refused, exit 1, with the reason.
    let o = h.run(&["cluster", "promote", "2"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("FailedPrecondition") && e.contains("2 not found"), "{e}");
}
