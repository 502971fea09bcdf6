//! Three real `timberd` processes forming a Raft cluster on loopback: writes go through the
//! leader and survive its SIGKILL, a follower refuses writes and linearizable reads, the new
//! leader serves everything acknowledged before, and the killed member rejoins.

mod common;

use std::time::{Duration, Instant};

use common::Timberd;

const WAIT: Duration = Duration::from_secs(20);

/// A port for a member's Raft endpoint on 127.0.0.1 (see `common::free_port`).
fn free_port() -> u16 {
    common::free_port(std::net::Ipv4Addr::LOCALHOST.into())
}

struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    raft_ports: Vec<u16>,
    nodes: Vec<Option<Timberd>>,
    /// A member stopped with SIGSTOP: clients do not go there.
    paused: Option<usize>,
    /// Flags every member gets besides the usual ones.
    extra: Vec<String>,
}

impl Cluster {
    /// Three members, each in its own temporary directory, started.
    fn three_started() -> Cluster {
        Cluster::three_started_with(&[])
    }

    /// [`Cluster::three_started`] with `extra` flags for every member.
    fn three_started_with(extra: &[&str]) -> Cluster {
        let mut c = Cluster {
            dirs: (0..3).map(|_| tempfile::tempdir().unwrap()).collect(),
            raft_ports: (0..3).map(|_| free_port()).collect(),
            nodes: vec![None, None, None],
            paused: None,
            extra: extra.iter().map(|f| f.to_string()).collect(),
        };
        for i in 0..3 {
            c.start(i);
        }
        c
    }

    fn flags(&self, i: usize) -> Vec<String> {
        let initial: Vec<String> = self
            .raft_ports
            .iter()
            .enumerate()
            .map(|(j, p)| format!("{}=127.0.0.1:{p}", j + 1))
            .collect();
        vec![
            "--node-id".into(),
            (i + 1).to_string(),
            "--raft-addr".into(),
            format!("127.0.0.1:{}", self.raft_ports[i]),
            "--initial-cluster".into(),
            initial.join(","),
            "--sync".into(),
            "always".into(),
            // Elections after 300-600 ms of silence: fewer spurious ones on a loaded machine.
            "--raft-heartbeat-ms".into(),
            "100".into(),
        ]
        .into_iter()
        .chain(self.extra.iter().cloned())
        .collect()
    }

    fn start(&mut self, i: usize) {
        let flags = self.flags(i);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.nodes[i] = Some(Timberd::start(self.dirs[i].path(), &flags));
    }

    fn node(&self, i: usize) -> &Timberd {
        self.nodes[i].as_ref().unwrap()
    }

    /// Waits until one of the running members logs that it leads, and returns it. Reads each
    /// member's log as it comes (lines logged before it listened included).
    fn leader(&mut self) -> usize {
        let deadline = Instant::now() + WAIT;
        let leads = |line: &str| line.contains("raft: this member leads");
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if let Some(n) = n {
                if n.early.drain(..).any(|l| leads(&l)) {
                    return i;
                }
            }
        }
        while Instant::now() < deadline {
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(n) = n else { continue };
                if let Ok(line) = n.stderr.recv_timeout(Duration::from_millis(20)) {
                    if leads(&line) {
                        return i;
                    }
                }
            }
        }
        panic!("no member took the lead within {WAIT:?}");
    }
}

impl Cluster {
    /// Waits until member `i`'s `INFO replication` names member `leader`'s RESP address as
    /// its master's (the leader announces it through the log when it takes the lead).
    fn wait_for_master(&self, i: usize, leader: usize) {
        let want = format!("master_host:127.0.0.1\r\nmaster_port:{}\r\n", self.node(leader).port);
        let mut con = self.node(i).client();
        let deadline = Instant::now() + WAIT;
        loop {
            let info: String = redis::cmd("INFO").arg("replication").query(&mut con).unwrap();
            if info.contains(&want) {
                return;
            }
            assert!(Instant::now() < deadline, "member {} says {info}", i + 1);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until member `i` logs the leader it follows, and returns that leader.
    fn following(&mut self, i: usize) -> usize {
        let parse = |line: &str| -> Option<usize> {
            if !line.contains("raft: following") {
                return None;
            }
            let id: usize = line.split("leader=Some(").nth(1)?.split(')').next()?.parse().ok()?;
            Some(id - 1)
        };
        let n = self.nodes[i].as_mut().unwrap();
        if let Some(l) = n.early.drain(..).find_map(|l| parse(&l)) {
            return l;
        }
        let deadline = Instant::now() + WAIT;
        while let Ok(line) =
            n.stderr.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Some(l) = parse(&line) {
                return l;
            }
        }
        panic!("member {} followed no leader within {WAIT:?}", i + 1);
    }
}

fn err_of(r: redis::RedisResult<redis::Value>) -> String {
    match r {
        Err(e) => format!("{} {}", e.code().unwrap_or(""), e.detail().unwrap_or("")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// Runs `op` against the leader, finding it again after a refusal (READONLY, CLUSTERDOWN)
/// until `op` succeeds: an election may come at any time on a loaded machine (a follower whose
/// fsync outlasts its election timeout starts one). Only for operations that may be repeated.
fn on_leader<T>(
    c: &Cluster,
    mut op: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(i) = c.leader_now() {
            match op(&mut c.node(i).client()) {
                Ok(v) => return v,
                Err(e) => eprintln!("member {} refused: {e}", i + 1),
            }
        }
        assert!(Instant::now() < deadline, "no leader served the request within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    /// The running member whose `INFO replication` says it leads, if any.
    fn leader_now(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i].is_some() && {
                let mut con = self.node(i).client();
                let info: String =
                    redis::cmd("INFO").arg("replication").query(&mut con).unwrap_or_default();
                info.contains("role:master")
            }
        })
    }
}

#[test]
fn three_timberds_replicate_fail_over_and_rejoin() {
    let mut c = Cluster::three_started();
    c.leader();
    for i in 0..50 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        on_leader(&c, |con| redis::cmd("SET").arg(&k).arg(&v).query::<()>(con));
    }
    // An INCR whose reply was an error may or may not have been applied (a leader that lost
    // its lead while the write was pending says READONLY too).
    let (mut incrs, mut unknown) = (0i64, 0i64);
    let deadline = Instant::now() + WAIT;
    while incrs + unknown < 20 {
        assert!(Instant::now() < deadline, "INCRs not served within {WAIT:?}");
        let r = on_leader(&c, |con| Ok(redis::cmd("INCR").arg("counter").query::<i64>(con)));
        match r {
            Ok(_) => incrs += 1,
            Err(e) => {
                eprintln!("INCR failed: {e}");
                unknown += 1;
            }
        }
    }
    let n: i64 = on_leader(&c, |con| redis::cmd("DBSIZE").query(con));
    assert_eq!(n, 51);

    // A follower refuses writes and linearizable reads, and says so; a leader says it leads,
    // in INFO and in /metrics, and is ready.
    let first = c.leader_now().unwrap_or_else(|| c.leader());
    let http = |i: usize, path: &str| -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", c.node(i).http_port);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let r = reqwest::get(url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    let (code, metrics) = http(first, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("timber_raft_is_leader 1"), "{metrics}");
    assert!(metrics.contains("timber_raft_follower_lag_entries{member="), "{metrics}");
    // No snapshot was needed yet.
    assert!(metrics.contains("timber_raft_snapshots_installed 0"), "{metrics}");
    assert!(metrics.contains("timber_raft_snapshot_build_seconds "), "{metrics}");
    assert_eq!(http(first, "/readyz").0, 200);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let st = rt.block_on(async { c.node(first).grpc().await.status().await.unwrap() });
    let cl = st.cluster.expect("a member reports its cluster");
    assert_eq!((cl.node_id, cl.role.as_str()), (first as u64 + 1, "leader"));
    assert_eq!(cl.members.len(), 3);
    assert!(cl.members.iter().all(|m| m.lag.is_some()), "{cl:?}");
    // A client of a follower never needs to know the leader: writes and linearizable reads are
    // forwarded to it (read-your-writes through any member), RESP3 replies included.
    let f = (first + 1) % 3;
    let mut fcon = c.node(f).client();
    let info: String = redis::cmd("INFO").arg("replication").query(&mut fcon).unwrap();
    assert!(info.contains("role:slave"), "{info}");
    c.wait_for_master(f, first);
    let () = redis::cmd("SET").arg("via-follower").arg("yes").query(&mut fcon).unwrap();
    let v: String = redis::cmd("GET").arg("via-follower").query(&mut fcon).unwrap();
    assert_eq!(v, "yes");
    let n: i64 = redis::cmd("INCRBY").arg("via-follower-n").arg(5).query(&mut fcon).unwrap();
    assert_eq!(n, 5);
    let e = err_of(redis::cmd("INCR").arg("via-follower").query(&mut fcon));
    assert!(e.contains("not an integer"), "{e}");
    let _: redis::Value = redis::cmd("HELLO").arg(3).query(&mut fcon).unwrap();
    let v: redis::Value =
        redis::cmd("MGET").arg("via-follower").arg("missing").query(&mut fcon).unwrap();
    assert_eq!(
        v,
        redis::Value::Array(vec![redis::Value::BulkString(b"yes".to_vec()), redis::Value::Nil])
    );
    let n: i64 = on_leader(&c, |con| redis::cmd("DBSIZE").query(con));
    assert_eq!(n, 53);
    // gRPC and HTTP on a follower: reads and writes run on the leader (linearizable,
    // read-your-writes through the follower); stale reads read the follower's own state.
    let grpc = rt.block_on(c.node(f).grpc());
    assert_eq!(rt.block_on(grpc.get("k1")).unwrap().as_deref(), Some(&b"v1"[..]));
    rt.block_on(grpc.put("via-grpc", "g")).unwrap();
    assert_eq!(rt.block_on(grpc.get("via-grpc")).unwrap().as_deref(), Some(&b"g"[..]));
    rt.block_on(grpc.put_with_ttl("via-grpc-ttl", "t", Duration::from_secs(100))).unwrap();
    let ttl: i64 = on_leader(&c, |con| redis::cmd("TTL").arg("via-grpc-ttl").query(con));
    assert!((90..=100).contains(&ttl), "ttl {ttl}");
    assert!(rt.block_on(grpc.delete("via-grpc")).unwrap());
    assert!(!rt.block_on(grpc.delete("via-grpc")).unwrap());
    assert_eq!(rt.block_on(grpc.get("via-grpc")).unwrap(), None);
    // A batch write and a linearizable scan through the follower run on the leader, the scan
    // page by page (more pairs than one page).
    use timber_client::Mutation;
    let mut batch: Vec<Mutation> = (0..1500)
        .map(|i| Mutation::Put(format!("b{i:04}").into(), format!("{i}").into()))
        .collect();
    batch.push(Mutation::Delete("b0000".into()));
    rt.block_on(grpc.write_batch(batch)).unwrap();
    let scan = |limit| timber_client::Scan { prefix: "b".into(), limit, ..Default::default() };
    let got = rt.block_on(grpc.scan(scan(0))).unwrap();
    assert_eq!(got.len(), 1499);
    assert_eq!((&got[0].0[..], &got[0].1[..]), (&b"b0001"[..], &b"1"[..]));
    assert_eq!(&got[1498].0[..], b"b1499");
    assert_eq!(rt.block_on(grpc.scan(scan(1100))).unwrap().len(), 1100);
    let (code, body) = http(f, "/v1/kv?prefix=b&limit=2");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("b0001") && body.contains("b0002") && !body.contains("b0003"), "{body}");
    assert_eq!(http(f, "/v1/kv/k1"), (200, "v1".to_string()));
    let url = format!("http://127.0.0.1:{}/v1/kv/via-http", c.node(f).http_port);
    let put = rt.block_on(async { reqwest::Client::new().put(&url).body("h").send().await });
    assert_eq!(put.unwrap().status().as_u16(), 204);
    assert_eq!(http(f, "/v1/kv/via-http"), (200, "h".to_string()));
    let del = rt.block_on(async {
        reqwest::Client::new().delete(&url).send().await.unwrap().text().await.unwrap()
    });
    assert_eq!(del, r#"{"existed":true}"#);
    assert_eq!(http(f, "/v1/kv/via-http").0, 404);
    let deadline = Instant::now() + WAIT;
    loop {
        // Stale: the follower's own state, which catches up within a heartbeat or so.
        let v = rt.block_on(grpc.get_stale("k1")).unwrap();
        if v.as_deref() == Some(&b"v1"[..]) {
            break;
        }
        assert!(Instant::now() < deadline, "the follower never applied k1");
    }
    assert_eq!(http(f, "/v1/kv/k1?stale=true"), (200, "v1".to_string()));

    // The leader dies without warning: another takes over with every acknowledged write.
    c.nodes[first].as_mut().unwrap().child.kill().unwrap();
    c.nodes[first].take();
    for i in 0..50 {
        let v: String = on_leader(&c, |con| redis::cmd("GET").arg(format!("k{i}")).query(con));
        assert_eq!(v, format!("v{i}"));
    }
    let n: i64 = on_leader(&c, |con| redis::cmd("GET").arg("counter").query(con));
    assert!(
        (incrs..=incrs + unknown).contains(&n),
        "counter {n}: {incrs} acknowledged, {unknown} unknown"
    );
    on_leader(&c, |con| redis::cmd("SET").arg("after").arg("failover").query::<()>(con));
    // The survivors saw the election that replaced it.
    let survivor = c.leader_now().unwrap();
    let url = format!("http://127.0.0.1:{}/metrics", c.node(survivor).http_port);
    let metrics = rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() });
    let elections: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("timber_raft_elections "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no election count: {metrics}"));
    assert!(elections >= 1, "{metrics}");

    // The killed member comes back from its directory and follows; then the member that is
    // neither it nor the leader goes, and the cluster still commits: the member that came back
    // is part of the quorum again.
    c.start(first);
    let leader = c.following(first);
    c.wait_for_master(first, leader);
    let victim = (0..3).find(|&i| i != first && i != leader).unwrap();
    c.nodes[victim].as_mut().unwrap().child.kill().unwrap();
    c.nodes[victim].take();
    on_leader(&c, |con| redis::cmd("SET").arg("quorum").arg("again").query::<()>(con));
    let v: String = on_leader(&c, |con| redis::cmd("GET").arg("after").query(con));
    assert_eq!(v, "failover");
}

#[test]
fn a_data_directory_with_single_node_data_cannot_become_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let t = Timberd::start(dir.path(), &[]);
    let () = redis::cmd("SET").arg("mine").arg("alone").query(&mut t.client()).unwrap();
    assert_eq!(t.stop(), 0);
    let raft = format!("127.0.0.1:{}", free_port());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_timberd"))
        .args(["--data-dir", dir.path().to_str().unwrap(), "--resp-addr", "127.0.0.1:0"])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--node-id", "1", "--raft-addr", &raft, "--initial-cluster", &format!("1={raft}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds data written outside the cluster"), "{err}");
    // The data is untouched: the single node still serves it.
    let t = Timberd::start(dir.path(), &[]);
    let v: String = redis::cmd("GET").arg("mine").query(&mut t.client()).unwrap();
    assert_eq!(v, "alone");
}

impl Cluster {
    /// SETs `key` through member `via` (any member: a follower forwards), again after every
    /// refusal, until it is acknowledged.
    fn set_via(&self, via: usize, key: &str, value: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut targets: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].is_some() && self.paused != Some(i))
                .collect();
            let shift = via % targets.len();
            targets.rotate_left(shift);
            let r: redis::RedisResult<()> =
                redis::cmd("SET").arg(key).arg(value).query(&mut self.node(targets[0]).client());
            match r {
                Ok(()) => return,
                Err(e) => {
                    assert!(Instant::now() < deadline, "SET {key} not acknowledged: {e}");
                    eprintln!("SET {key} via member {}: {e}", targets[0] + 1);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Every acknowledged key, read linearizably through each running member.
    fn check(&self, acked: &[(String, String)]) {
        for i in (0..self.nodes.len()).filter(|&i| self.nodes[i].is_some()) {
            let mut con = self.node(i).client();
            for (k, v) in acked {
                let got: Option<String> = loop {
                    match redis::cmd("GET").arg(k).query(&mut con) {
                        Ok(v) => break v,
                        Err(e) => {
                            eprintln!("GET {k} via member {}: {e}", i + 1);
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                };
                assert_eq!(got.as_deref(), Some(v.as_str()), "{k} via member {}", i + 1);
            }
        }
    }

    /// Every acknowledged key in each running member's own copy (`READONLY` reads), once it
    /// applied them: a member that was down catches up.
    fn check_local(&self, acked: &[(String, String)]) {
        let deadline = Instant::now() + WAIT;
        let keys: Vec<&str> = acked.iter().map(|(k, _)| k.as_str()).collect();
        let want: Vec<Option<String>> = acked.iter().map(|(_, v)| Some(v.clone())).collect();
        for i in (0..self.nodes.len()).filter(|&i| self.nodes[i].is_some()) {
            let mut con = self.node(i).client();
            let () = redis::cmd("READONLY").query(&mut con).unwrap();
            loop {
                let got: Vec<Option<String>> =
                    redis::cmd("MGET").arg(&keys).query(&mut con).unwrap();
                if got == want {
                    break;
                }
                assert!(Instant::now() < deadline, "member {}'s copy misses writes", i + 1);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn kill(&mut self, i: usize) {
        self.nodes[i].as_mut().unwrap().child.kill().unwrap();
        self.nodes[i].take().unwrap().child.wait().unwrap();
    }
}

#[test]
fn acknowledged_writes_survive_repeated_kills_a_stopped_leader_and_a_whole_cluster_restart() {
    let mut c = Cluster::three_started();
    c.leader();
    let mut acked = Vec::new();
    let write = |c: &Cluster, acked: &mut Vec<(String, String)>, round: &str, n: usize| {
        for j in 0..n {
            let (k, v) = (format!("{round}-{j}"), format!("{round}:{j}"));
            c.set_via(j, &k, &v);
            acked.push((k, v));
        }
    };

    // The leader is killed three times, each time coming back before the next kill.
    for round in 0..3 {
        write(&c, &mut acked, &format!("kill{round}"), 20);
        let leader = c.leader_now().unwrap_or_else(|| c.leader());
        c.kill(leader);
        write(&c, &mut acked, &format!("after-kill{round}"), 10);
        c.start(leader);
        c.following(leader);
    }

    // The leader stops (SIGSTOP) past the election timeout: the others elect one of them and go
    // on; when it resumes it follows, and no write is lost on either side.
    let leader = c.leader_now().unwrap_or_else(|| c.leader());
    c.node(leader).signal(rustix::process::Signal::STOP);
    c.paused = Some(leader);
    write(&c, &mut acked, "stopped", 10);
    c.node(leader).signal(rustix::process::Signal::CONT);
    c.paused = None;
    write(&c, &mut acked, "resumed", 10);
    c.check(&acked);
    c.check_local(&acked);

    // Every member killed at once, then all restarted: nothing acknowledged is missing.
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.start(i);
    }
    c.leader();
    c.check(&acked);
    write(&c, &mut acked, "restarted", 5);
    c.check(&acked);
    c.check_local(&acked);
}

/// A follower down while the others snapshot and purge their logs past what it holds comes back
/// through a snapshot, with every write in its own copy.
#[test]
fn a_follower_behind_the_purged_log_catches_up_from_a_snapshot() {
    let mut c = Cluster::three_started_with(&["--raft-snapshot-entries", "20"]);
    let leader = c.leader();
    let f = c.follower(leader);
    c.kill(f);
    let acked: Vec<(String, String)> =
        (0..200).map(|j| (format!("s{j}"), format!("v{j}"))).collect();
    for (j, (k, v)) in acked.iter().enumerate() {
        c.set_via(j, k, v);
    }
    c.start(f);
    c.check_local(&acked);
    let url = format!("http://127.0.0.1:{}/metrics", c.node(f).http_port);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let metrics = rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() });
    let installed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("timber_raft_snapshots_installed "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(installed.is_some_and(|n| n >= 1), "{metrics}");

    // FLUSHALL through that member: one entry of range removals that every member applies.
    // A member that holds the write after it applied it, and must hold nothing else.
    let () = redis::cmd("FLUSHALL").query(&mut c.node(f).client()).unwrap();
    c.set_via(f, "after", "1");
    c.check_local(&[("after".to_string(), "1".to_string())]);
    for i in 0..3 {
        let mut con = c.node(i).client();
        let () = redis::cmd("READONLY").query(&mut con).unwrap();
        assert_eq!(redis::cmd("DBSIZE").query::<u64>(&mut con).unwrap(), 1, "member {}", i + 1);
    }
}

/// A member that cannot reach a quorum is not ready, and refuses writes and linearizable reads
/// with a retryable error (RESP CLUSTERDOWN, HTTP 503) within its Raft timeout.
#[test]
fn a_member_without_a_quorum_is_not_ready_and_fails_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let raft = free_port();
    let initial =
        format!("1=127.0.0.1:{raft},2=127.0.0.1:{},3=127.0.0.1:{}", free_port(), free_port());
    let raft = format!("127.0.0.1:{raft}");
    let flags = ["--node-id", "1", "--raft-addr", &raft, "--initial-cluster", &initial];
    let n = Timberd::start(dir.path(), &[&flags[..], &["--raft-timeout-ms", "1000"]].concat());
    let mut con = n.client();
    for cmd in [redis::cmd("SET").arg("k").arg("v").clone(), redis::cmd("GET").arg("k").clone()] {
        let t = Instant::now();
        let e = cmd.query::<Option<String>>(&mut con).unwrap_err();
        assert_eq!(e.code(), Some("CLUSTERDOWN"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "refused after {:?}", t.elapsed());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = format!("http://127.0.0.1:{}", n.http_port);
    rt.block_on(async {
        let ready = reqwest::get(format!("{http}/readyz")).await.unwrap();
        assert_eq!(ready.status().as_u16(), 503);
        assert!(ready.text().await.unwrap().contains("no leader"));
        let t = Instant::now();
        let put = reqwest::Client::new().put(format!("{http}/v1/kv/k")).body("v").send().await;
        assert_eq!(put.unwrap().status().as_u16(), 503);
        assert!(t.elapsed() < Duration::from_secs(5), "refused after {:?}", t.elapsed());
    });
}

#[test]
fn a_raft_address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let raft = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_timberd"))
        .args(["--data-dir", dir.path().to_str().unwrap(), "--resp-addr", "127.0.0.1:0"])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--node-id", "1", "--raft-addr", &raft, "--initial-cluster", &format!("1={raft}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bind raft endpoint") && !err.contains("panicked"), "{err}");
}

#[test]
fn a_fourth_timberd_joins_is_promoted_and_another_is_removed() {
    let mut c = Cluster {
        dirs: (0..4).map(|_| tempfile::tempdir().unwrap()).collect(),
        raft_ports: (0..4).map(|_| free_port()).collect(),
        nodes: vec![None, None, None, None],
        paused: None,
        extra: Vec::new(),
    };
    // Three form the cluster; the fourth starts with no initial membership and waits.
    c.raft_ports.truncate(3);
    for i in 0..3 {
        c.start(i);
    }
    let fourth_raft = format!("127.0.0.1:{}", free_port());
    c.nodes[3] = Some(Timberd::start(
        c.dirs[3].path(),
        &["--node-id", "4", "--raft-addr", &fourth_raft, "--sync", "always"],
    ));
    c.leader();
    for i in 0..20 {
        let (k, v) = (format!("j{i}"), format!("v{i}"));
        on_leader(&c, |con| redis::cmd("SET").arg(&k).arg(&v).query::<()>(con));
    }
    let l = c.leader_now().unwrap_or_else(|| c.leader());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let admin = rt.block_on(c.node(l).grpc());
    // Any member takes a change: a follower passes it to the leader. A learner cannot be
    // promoted before it was added.
    let f = (l + 1) % 3;
    let follower = rt.block_on(c.node(f).grpc());
    let e = rt.block_on(follower.promote(4)).unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    rt.block_on(follower.add_learner(4, &fourth_raft)).unwrap();
    // The leader's status: member 4 a learner that holds the log, the commit index at or
    // past what the leader applied.
    let st = rt.block_on(admin.status()).unwrap().cluster.unwrap();
    let learner = |st: &timber_client::ClusterStatus| {
        st.members.iter().filter(|m| m.learner).map(|m| m.id).collect::<Vec<_>>()
    };
    assert_eq!(learner(&st), [4], "{st:?}");
    assert!(st.commit_index >= st.applied_index && st.applied_index.is_some(), "{st:?}");
    let fourth = st.members.iter().find(|m| m.id == 4).unwrap();
    assert!(fourth.matched_index.is_some() && fourth.lag.is_some(), "{st:?}");
    rt.block_on(admin.promote(4)).unwrap();
    let st = rt.block_on(admin.status()).unwrap().cluster.unwrap();
    assert_eq!(st.members.len(), 4);
    assert!(learner(&st).is_empty(), "{st:?}");
    rt.block_on(admin.remove_member(f as u64 + 1)).unwrap();
    let st = rt.block_on(admin.status()).unwrap().cluster.unwrap();
    assert!(st.members.iter().all(|m| m.id != f as u64 + 1), "{st:?}");
    c.kill(f);

    // The new member serves every write, its own clients' included (forwarded to the leader).
    let mut con = c.node(3).client();
    let () = redis::cmd("SET").arg("from-4").arg("yes").query(&mut con).unwrap();
    for i in 0..20 {
        let v: String = redis::cmd("GET").arg(format!("j{i}")).query(&mut con).unwrap();
        assert_eq!(v, format!("v{i}"));
    }
    let v: String = on_leader(&c, |con| redis::cmd("GET").arg("from-4").query(con));
    assert_eq!(v, "yes");
}

#[test]
fn a_timberd_started_with_join_is_added_and_serves() {
    let mut c = Cluster {
        dirs: (0..5).map(|_| tempfile::tempdir().unwrap()).collect(),
        raft_ports: (0..3).map(|_| free_port()).collect(),
        nodes: vec![None, None, None, None, None],
        paused: None,
        extra: Vec::new(),
    };
    for i in 0..3 {
        c.start(i);
    }
    let l = c.leader();
    on_leader(&c, |con| redis::cmd("SET").arg("before").arg("join").query::<()>(con));
    // Member 4 through a follower's Raft address (it passes the request to the leader),
    // member 5 through a follower's gRPC address (its Admin service).
    let f = (l + 1) % 3;
    let joins =
        [format!("127.0.0.1:{}", c.raft_ports[f]), format!("127.0.0.1:{}", c.node(f).grpc_port)];
    for (i, via) in [3, 4].into_iter().zip(joins) {
        let raft = format!("127.0.0.1:{}", free_port());
        let id = (i + 1).to_string();
        c.nodes[i] = Some(Timberd::start(
            c.dirs[i].path(),
            &["--node-id", &id, "--raft-addr", &raft, "--join", &via, "--sync", "always"],
        ));
        let deadline = Instant::now() + WAIT;
        let joined = |l: &str| l.contains("raft: joined as a learner");
        let n = c.nodes[i].as_mut().unwrap();
        let mut ok = n.early.drain(..).any(|l| joined(&l));
        while !ok {
            let line = n
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("member {id} did not join through {via}"));
            ok = joined(&line);
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { c.node(3).grpc().await.promote(4).await }).unwrap();
    let mut con = c.node(3).client();
    let v: String = redis::cmd("GET").arg("before").query(&mut con).unwrap();
    assert_eq!(v, "join");
    let () = redis::cmd("SET").arg("after").arg("join").query(&mut con).unwrap();
    let st = rt.block_on(async { c.node(3).grpc().await.status().await }).unwrap();
    let cl = st.cluster.unwrap();
    assert_eq!((cl.node_id, cl.members.len()), (4, 5));
    let learners: Vec<u64> = cl.members.iter().filter(|m| m.learner).map(|m| m.id).collect();
    assert_eq!(learners, [5], "{cl:?}");
    // The learner that joined through gRPC holds the data in its own copy.
    let mut con = c.node(4).client();
    let () = redis::cmd("READONLY").query(&mut con).unwrap();
    let deadline = Instant::now() + WAIT;
    while redis::cmd("GET").arg("after").query::<Option<String>>(&mut con).unwrap().is_none() {
        assert!(Instant::now() < deadline, "member 5 never received the write");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    /// A running member other than the leader.
    fn follower(&self, leader: usize) -> usize {
        (0..self.nodes.len()).find(|&i| i != leader && self.nodes[i].is_some()).unwrap()
    }

    /// Adds entry `1-<n>` (field `n`) to stream `s` through the `via`th running member or, after a refusal,
    /// through the leader. An exact id makes a retry safe: a retry of an entry that was added
    /// is refused as not above the top item.
    fn xadd(&self, via: usize, n: usize) {
        let add = |con: &mut redis::Connection| {
            let r: redis::RedisResult<String> =
                redis::cmd("XADD").arg("s").arg(format!("1-{n}")).arg("n").arg(n).query(con);
            match r {
                Err(e) if e.to_string().contains("equal or smaller") => Ok(format!("1-{n}")),
                r => r,
            }
        };
        let running: Vec<usize> =
            (0..self.nodes.len()).filter(|&i| self.nodes[i].is_some()).collect();
        let via = running[via % running.len()];
        let id = match add(&mut self.node(via).client()) {
            Ok(id) => id,
            Err(_) => on_leader(self, add),
        };
        assert_eq!(id, format!("1-{n}"));
    }
}

/// The ids of stream `s` as member `i` holds it (READONLY: its own state, no leader involved).
fn local_ids(c: &Cluster, i: usize) -> Vec<String> {
    let mut con = c.node(i).client();
    redis::cmd("READONLY").query::<()>(&mut con).unwrap();
    let entries: Vec<(String, Vec<String>)> =
        redis::cmd("XRANGE").arg("s").arg("-").arg("+").query(&mut con).unwrap_or_default();
    entries.into_iter().map(|(id, _)| id).collect()
}

#[test]
fn redis_streams_and_their_groups_replicate_through_any_member_and_a_failover() {
    let mut c = Cluster::three_started();
    let leader = c.leader();
    // Appends through every member: a follower passes them to the leader.
    for n in 1..=30 {
        c.xadd(n % 3, n);
    }
    let f = c.follower(leader);
    let mut fcon = c.node(f).client();
    let r: String =
        redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").query(&mut fcon).unwrap();
    assert_eq!(r, "OK");
    type Read = Vec<(String, Vec<(String, Vec<String>)>)>;
    let read: Read = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("alice")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg("s")
        .arg(">")
        .query(&mut fcon)
        .unwrap();
    let delivered: Vec<&str> = read[0].1.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(delivered, (1..=10).map(|n| format!("1-{n}")).collect::<Vec<_>>());
    let acked: i64 = redis::cmd("XACK")
        .arg("s")
        .arg("g")
        .arg("1-1")
        .arg("1-2")
        .arg("1-3")
        .query(&mut c.node(leader).client())
        .unwrap();
    assert_eq!(acked, 3);
    let trimmed: i64 = redis::cmd("XTRIM").arg("s").arg("MAXLEN").arg(25).query(&mut fcon).unwrap();
    assert_eq!(trimmed, 5);

    // A blocking read through a follower waits on the leader and sees a later append.
    let blocked = {
        let mut con = c.node(f).client();
        std::thread::spawn(move || {
            let r: Read = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(WAIT.as_millis() as u64)
                .arg("STREAMS")
                .arg("s")
                .arg("1-30")
                .query(&mut con)
                .unwrap();
            r[0].1.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>()
        })
    };
    c.xadd(leader, 31);
    assert_eq!(blocked.join().unwrap(), ["1-31"]);

    // The leader dies: the survivors hold the stream, its trim and its group.
    c.kill(leader);
    for n in 32..=40 {
        c.xadd(n % 3, n);
    }
    let want: Vec<String> = (6..=40).map(|n| format!("1-{n}")).collect();
    let ids: Vec<(String, Vec<String>)> =
        on_leader(&c, |con| redis::cmd("XRANGE").arg("s").arg("-").arg("+").query(con));
    assert_eq!(ids.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), want);
    let pending: (i64, String, String, Vec<(String, String)>) =
        on_leader(&c, |con| redis::cmd("XPENDING").arg("s").arg("g").query(con));
    assert_eq!((pending.0, pending.1.as_str(), pending.2.as_str()), (7, "1-4", "1-10"));
    let len: i64 = on_leader(&c, |con| redis::cmd("XLEN").arg("s").query(con));
    assert_eq!(len, 35);

    // The killed member comes back and catches up with the stream in its own store.
    c.start(leader);
    c.following(leader);
    let deadline = Instant::now() + WAIT;
    while local_ids(&c, leader) != want {
        assert!(Instant::now() < deadline, "member {} never caught up", leader + 1);
    }
    for i in 0..3 {
        assert_eq!(local_ids(&c, i), want, "member {}", i + 1);
    }

    // A deleted stream key starts over with a new stream.
    on_leader(&c, |con| redis::cmd("DEL").arg("s").query::<i64>(con));
    c.xadd(0, 1);
    let len: i64 = on_leader(&c, |con| redis::cmd("XLEN").arg("s").query(con));
    assert_eq!(len, 1);
}

/// Every entry of log stream `name` through member `i`: `stale` reads its own copy, else the
/// read sees every entry committed before it. `None` if the stream does not exist.
async fn log_entries(c: &Cluster, i: usize, name: &str, stale: bool) -> Option<Vec<(u64, String)>> {
    use timber_client::{Code, Start};
    let deadline = Instant::now() + WAIT;
    // Again while the cluster refuses (an election under way, the leader not known yet).
    let retry = |e: timber_client::Error| {
        assert!(
            e.code() == Some(Code::Unavailable) && Instant::now() < deadline,
            "read of {name} through member {}: {e}",
            i + 1
        );
    };
    'read: loop {
        let client = c.node(i).grpc().await;
        let r = match stale {
            true => client.reader_stale(name, Start::Earliest, false).await,
            false => client.reader(name, Start::Earliest, false).await,
        };
        let mut r = match r {
            Ok(r) => r,
            Err(e) if e.code() == Some(Code::NotFound) => return None,
            Err(e) => {
                retry(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(Some(e)) => out.push((e.id, String::from_utf8(e.data.to_vec()).unwrap())),
                Ok(None) => return Some(out),
                Err(e) if e.code() == Some(Code::NotFound) => return None,
                Err(e) => {
                    retry(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'read;
                }
            }
        }
    }
}

/// Appends `data` to log stream `events` through member `via`, or, while the cluster refuses
/// (an election under way), through any running member until one takes it. Returns the id.
/// A refused append that committed anyway shows up as a repeated entry right after itself.
async fn log_append(c: &Cluster, via: usize, data: &str) -> u64 {
    let deadline = Instant::now() + WAIT;
    let running: Vec<usize> = (0..c.nodes.len()).filter(|&i| c.nodes[i].is_some()).collect();
    let mut via = running[via % running.len()];
    loop {
        let client = c.node(via).grpc().await;
        match client.append("events", vec![bytes::Bytes::from(data.to_string())]).await {
            Ok(id) => return id,
            Err(e) => {
                assert!(Instant::now() < deadline, "no member took the append: {e}");
                eprintln!("member {} refused the append: {e}", via + 1);
                via = running[(via + 1) % running.len()];
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `op`, again while the cluster answers Unavailable (an election under way), for up to
/// [`WAIT`].
async fn again<T, F>(mut op: impl FnMut() -> F) -> timber_client::Result<T>
where
    F: std::future::Future<Output = timber_client::Result<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match op().await {
            Err(e)
                if e.code() == Some(timber_client::Code::Unavailable)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

/// `entries` without repeats of the entry just before (a retried append that had committed).
fn unrepeated(entries: &[(u64, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, d) in entries {
        if out.last() != Some(d) {
            out.push(d.clone());
        }
    }
    out
}

#[test]
fn grpc_and_http_log_streams_replicate_through_any_member_and_a_failover() {
    use timber_client::Code;
    let mut c = Cluster::three_started();
    let leader = c.leader();
    let f = c.follower(leader);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let h = reqwest::Client::new();
    let http = |i: usize, path: &str| format!("http://127.0.0.1:{}{path}", c.node(i).http_port);
    let mut want: Vec<String> = Vec::new();
    rt.block_on(async {
        // Created through a follower; refusals keep their meaning on the way back.
        let fc = c.node(f).grpc().await;
        match again(|| fc.create_stream("events", None, Some(1 << 30))).await {
            Ok(info) => assert_eq!((info.first_id, info.next_id), (0, 0)),
            // A retry of a creation that had committed.
            Err(e) => assert_eq!(e.code(), Some(Code::AlreadyExists), "{e}"),
        }
        let info = again(|| fc.stream_info("events")).await.unwrap();
        assert_eq!((info.name.as_str(), info.first_id, info.next_id), ("events", 0, 0));
        let e = again(|| fc.create_stream("events", None, None)).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::AlreadyExists), "{e}");
        let e = again(|| fc.append("missing", vec![bytes::Bytes::from("x")])).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::NotFound), "{e}");
        let e = fc.create_stream("redis.x", None, None).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");

        // Appends through every member; a read through another member right after sees each.
        let mut last = None;
        for n in 0..24 {
            let data = format!("e{n}");
            let id = log_append(&c, n, &data).await;
            assert!(last < Some(id), "ids grow: {id} after {last:?}");
            last = Some(id);
            want.push(data.clone());
            if n % 4 == 0 {
                let seen = log_entries(&c, (n + 1) % 3, "events", false).await.unwrap();
                assert_eq!(
                    seen.last().map(|e| &e.1),
                    Some(&data),
                    "read through {}",
                    (n + 1) % 3 + 1
                );
            }
        }

        // HTTP through a follower: append (JSON, then a raw body), read.
        let post = |body: reqwest::RequestBuilder| async move {
            let deadline = Instant::now() + WAIT;
            loop {
                let r = body.try_clone().unwrap().send().await.unwrap();
                if r.status() != 503 || Instant::now() > deadline {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let entries = http(f, "/v1/streams/events/entries");
        let r = post(h.post(&entries).json(&serde_json::json!({"entries": ["h0"]}))).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let r = post(h.post(&entries).body("h1")).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        want.extend(["h0".to_string(), "h1".to_string()]);
        let other = 3 - leader - f;
        let read =
            post(h.get(http(other, "/v1/streams/events/entries?from=earliest&limit=1000"))).await;
        let read: serde_json::Value = read.json().await.unwrap();
        let data: Vec<&str> = read["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["data"].as_str().unwrap())
            .collect();
        assert_eq!(unrepeated_strs(&data), want);
        let r = post(h.post(http(f, "/v1/streams/nope/entries")).body("x")).await;
        assert_eq!(r.status(), 404);

        // Truncated through a follower, seen by the leader.
        let info = again(|| fc.truncate("events", 5)).await.unwrap();
        assert_eq!(info.first_id, 5);
        let lc = c.node(leader).grpc().await;
        assert_eq!(again(|| lc.stream_info("events")).await.unwrap().first_id, 5);
    });

    // The leader dies: the survivors keep the stream and take more.
    c.kill(leader);
    rt.block_on(async {
        for n in 24..32 {
            let data = format!("e{n}");
            log_append(&c, n, &data).await;
            want.push(data);
        }
    });
    let want: Vec<String> = want.split_off(5);
    rt.block_on(async {
        let seen = log_entries(&c, f, "events", false).await.unwrap();
        assert_eq!(seen[0].0, 5);
        assert_eq!(unrepeated(&seen), want);
    });

    // The killed member comes back and catches up in its own store.
    c.start(leader);
    c.following(leader);
    let deadline = Instant::now() + WAIT;
    rt.block_on(async {
        loop {
            let own = log_entries(&c, leader, "events", true).await;
            if own.as_deref().map(unrepeated) == Some(want.clone()) {
                break;
            }
            assert!(Instant::now() < deadline, "member {} never caught up: {own:?}", leader + 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every member's own copy holds the same ids and entries.
        let all = log_entries(&c, 0, "events", false).await;
        for i in 0..3 {
            while log_entries(&c, i, "events", true).await != all {
                assert!(Instant::now() < deadline, "member {} differs", i + 1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        // Deleted through a follower: gone everywhere.
        let f = c.follower(c.leader_now().unwrap_or(0));
        let fc = c.node(f).grpc().await;
        match again(|| fc.delete_stream("events")).await {
            Ok(()) => {}
            // A retry of a deletion that had committed.
            Err(e) => assert_eq!(e.code(), Some(Code::NotFound), "{e}"),
        }
        for i in 0..3 {
            let client = c.node(i).grpc().await;
            let e = again(|| client.stream_info("events")).await.unwrap_err();
            assert_eq!(e.code(), Some(Code::NotFound), "member {}", i + 1);
        }
    });
}

/// Concurrent appends to one log stream through every member: each call's entries get
/// consecutive ids of their own, in order, none lost; and they share Raft entries (appends
/// waiting for the stream's slot go as one proposal), so the log grows by far fewer entries
/// than there were calls. (A call refused during an election is retried, and may then be
/// found twice.)
#[test]
fn retention_cuts_every_members_copy_of_a_log_stream_at_the_same_id() {
    // Each member cuts its copy into fragments at ids of its own: a follower that was down
    // while the stream grew applies its entries in a burst, into other fragments than the
    // leader's. Were each member to apply the retention to its own fragments, the copies
    // would start at different ids.
    let mut c = Cluster::three_started_with(&["--stream-maintenance-ms", "200"]);
    let leader = c.leader();
    let f = c.follower(leader);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let lc = c.node(leader).grpc().await;
        again(|| lc.create_stream("events", None, Some(64 << 10))).await.unwrap();
        c.kill(f);
        let entry = "x".repeat(1000);
        let start = Instant::now();
        let mut appended = 0;
        while start.elapsed() < Duration::from_secs(2) || appended < 300 {
            log_append(&c, leader, &entry).await;
            appended += 1;
        }
        c.start(f);
        // Every member's own copy starts where the leader's last round cut it.
        let deadline = Instant::now() + WAIT;
        loop {
            let mut firsts = Vec::new();
            for i in 0..3 {
                let entries = log_entries(&c, i, "events", true).await.unwrap_or_default();
                firsts.push(entries.first().map_or(u64::MAX, |e| e.0));
            }
            if firsts[0] > 0 && firsts.iter().all(|&f| f == firsts[0]) {
                // The retention kept about what it was asked to, not everything or nothing.
                let kept = log_entries(&c, leader, "events", false).await.unwrap().len();
                assert!((20..appended).contains(&kept), "{kept} of {appended} entries kept");
                break;
            }
            assert!(Instant::now() < deadline, "the members' copies start at {firsts:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn concurrent_appends_to_one_stream_share_raft_entries_and_keep_their_order() {
    let mut c = Cluster::three_started();
    let leader = c.leader();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let lc = c.node(leader).grpc().await;
        again(|| lc.create_stream("many", None, None)).await.unwrap();
        let applied = |s: timber_client::Status| s.cluster.unwrap().applied_index.unwrap_or(0);
        let before = applied(again(|| lc.status()).await.unwrap());
        const TASKS: usize = 16;
        const CALLS: usize = 20;
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let port = c.node(t % 3).grpc_port;
                tokio::spawn(async move {
                    let client = common::grpc_at(port).await;
                    let mut calls = Vec::new();
                    for i in 0..CALLS {
                        // One to three entries per call.
                        let data: Vec<String> =
                            (0..1 + (t + i) % 3).map(|k| format!("t{t}-c{i}-{k}")).collect();
                        let entries: Vec<bytes::Bytes> =
                            data.iter().map(|d| bytes::Bytes::from(d.clone())).collect();
                        let first = again(|| client.append("many", entries.clone())).await;
                        calls.push((first.unwrap(), data));
                    }
                    calls
                })
            })
            .collect();
        let mut calls = Vec::new();
        for t in tasks {
            calls.extend(t.await.unwrap());
        }
        let after = applied(again(|| lc.status()).await.unwrap());
        let total: usize = calls.iter().map(|(_, d)| d.len()).sum();
        let seen = log_entries(&c, leader, "many", false).await.unwrap();
        assert!(seen.len() >= total, "{} entries of {total}", seen.len());
        let by_id: std::collections::HashMap<u64, String> = seen.into_iter().collect();
        for (first, data) in &calls {
            for (k, d) in data.iter().enumerate() {
                assert_eq!(by_id.get(&(first + k as u64)), Some(d), "call at {first}");
            }
        }
        let entries = after - before;
        assert!(
            entries < (TASKS * CALLS / 2) as u64,
            "{} appends took {entries} Raft entries",
            TASKS * CALLS
        );
    });
}

fn unrepeated_strs(data: &[&str]) -> Vec<String> {
    let pairs: Vec<(u64, String)> = data.iter().map(|d| (0, d.to_string())).collect();
    unrepeated(&pairs)
}

/// One check-and-set through the member at `port`: WATCH c, read it, then `MULTI SET c <c+1>
/// INCR n EXEC`. `Ok(true)` if EXEC ran, `Ok(false)` if it was aborted (a watched change or a
/// leader change), `Err` if a member refused (an election).
fn check_and_set(port: u16) -> redis::RedisResult<bool> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    con.set_read_timeout(Some(Duration::from_secs(10)))?;
    redis::cmd("WATCH").arg("c").query::<()>(&mut con)?;
    let v: i64 = redis::cmd("GET").arg("c").query::<Option<i64>>(&mut con)?.unwrap_or(0);
    let r: Option<(i64,)> = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("c")
        .arg(v + 1)
        .ignore()
        .cmd("INCR")
        .arg("n")
        .query(&mut con)?;
    Ok(r.is_some())
}

/// What member `i` holds under `key` (READONLY: its own state).
fn local_get(c: &Cluster, i: usize, key: &str) -> Option<i64> {
    let mut con = c.node(i).client();
    redis::cmd("READONLY").query::<()>(&mut con).unwrap();
    redis::cmd("GET").arg(key).query(&mut con).unwrap()
}

#[test]
fn every_kind_of_transaction_runs_on_the_leader_through_any_member() {
    let mut c = Cluster::three_started();
    let leader = c.leader();

    // Check-and-set increments through every member at once, each retried until its EXEC runs:
    // EXEC sets c and increments n in one entry, so c == n unless a watched change was missed
    // (two transactions both writing c + 1 from the same c).
    let deadline = Instant::now() + WAIT;
    std::thread::scope(|scope| {
        for via in 0..3 {
            let port = c.node(via).port;
            scope.spawn(move || {
                for _ in 0..10 {
                    loop {
                        assert!(Instant::now() < deadline, "check-and-set not done in {WAIT:?}");
                        match check_and_set(port) {
                            Ok(true) => break,
                            Ok(false) => {}
                            Err(e) => eprintln!("member {} refused: {e}", via + 1),
                        }
                    }
                }
            });
        }
    });
    let both = |con: &mut redis::Connection| {
        let r: (Option<i64>, Option<i64>) =
            redis::pipe().atomic().cmd("GET").arg("c").cmd("GET").arg("n").query(con)?;
        Ok(r)
    };
    let (cv, nv) = on_leader(&c, both);
    assert_eq!(cv, nv, "a watched change was missed");
    assert!(cv >= Some(30), "{cv:?}");

    // Conditional transactions (gRPC) through a follower run on the leader. Each is written so
    // that a retry after an election (of one that had committed) reaches the same state.
    let f = c.follower(leader);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        use timber_client::{Cmp, Txn, TxnOpResult};
        let fc = c.node(f).grpc().await;
        let step = |old: Option<&'static str>, new: &'static str| {
            let t = match old {
                Some(old) => Txn::new().when_value("g", Cmp::Equal, old),
                None => Txn::new().when_exists("g", false),
            };
            t.then_put("g", new).else_get("g")
        };
        for (old, new) in [(None, "1"), (Some("1"), "2")] {
            let done = again(|| fc.txn(step(old, new))).await.unwrap();
            if !done.succeeded {
                assert_eq!(done.results, [TxnOpResult::Get(Some(new.into()))], "a retry");
            }
        }
        let done = again(|| fc.txn(step(Some("1"), "3"))).await.unwrap();
        assert!(!done.succeeded);
        assert_eq!(done.results, [TxnOpResult::Get(Some("2".into()))]);

        // Versions: every member stamped the same one (each answers from its own copy once
        // caught up), and a compare-and-swap on it through the follower runs once.
        let mut seen = Vec::new();
        for i in 0..3 {
            let ci = c.node(i).grpc().await;
            seen.push(again(|| ci.get_versioned("g")).await.unwrap().unwrap());
        }
        let (_, v) = seen[0].clone();
        assert!(seen.iter().all(|s| *s == (bytes::Bytes::from("2"), v)), "{seen:?}");
        let swap = Txn::new().when_version("g", Cmp::Equal, v).then_put("g", "2").else_get("g");
        let done = again(|| fc.txn(swap.clone())).await.unwrap();
        let (_, after) = again(|| fc.get_versioned("g")).await.unwrap().unwrap();
        assert!(after > v, "the same value written again: {after} after {v}");
        if !done.succeeded {
            assert_eq!(done.results, [TxnOpResult::Get(Some("2".into()))], "a retry");
        }
        assert!(!again(|| fc.txn(swap.clone())).await.unwrap().succeeded, "v is gone");

        // An interactive transaction through the follower, retried on an abort or refusal; its
        // scan's range is checked again by every member applying the commit (a digest of the
        // pairs the leader read), which must find it unchanged.
        use timber_client::{Isolation, TxnOptions};
        let moved = fc
            .transact(TxnOptions::new(Isolation::Serializable), |t| async move {
                let g = t.get_for_update("g").await?.unwrap_or_default();
                let scan = timber_client::Scan { prefix: "g".into(), ..Default::default() };
                assert_eq!(t.scan(scan).await?, [("g".into(), "2".into())]);
                t.put("h", g).await?;
                t.delete("g").await?;
                Ok(())
            })
            .await;
        match moved {
            Ok(()) => {}
            Err(e) => assert_eq!(e.code(), Some(timber_client::Code::Unavailable), "{e}"),
        }
    });
    drop(rt);

    // A WATCH through a follower, a write through the leader: EXEC through the follower is nil.
    let mut fcon = c.node(f).client();
    let _: () = redis::cmd("WATCH").arg("c").query(&mut fcon).unwrap();
    let _: () = on_leader(&c, |con| redis::cmd("SET").arg("c").arg(-1).query(con));
    let r: Option<(String,)> =
        redis::pipe().atomic().cmd("SET").arg("c").arg(0).query(&mut fcon).unwrap();
    assert_eq!(r, None);

    // A command that changes the connection cannot go to the leader inside a transaction.
    redis::cmd("MULTI").query::<()>(&mut fcon).unwrap();
    let queued: String = redis::cmd("CLIENT").arg("SETNAME").arg("x").query(&mut fcon).unwrap();
    assert_eq!(queued, "QUEUED");
    let r: redis::RedisResult<redis::Value> = redis::cmd("EXEC").query(&mut fcon);
    match r {
        Err(e) => assert!(e.to_string().contains("cannot run inside a transaction"), "{e}"),
        Ok(_) => assert_eq!(c.leader_now(), Some(f), "ran although the member did not lead"),
    }

    // A leader change between WATCH and EXEC aborts: versions do not carry across leaders.
    // (The new leader never wrote `w` itself: its own version of `w` would say unchanged.)
    let _: () = redis::cmd("WATCH").arg("w").query(&mut fcon).unwrap();
    let _: () = on_leader(&c, |con| redis::cmd("SET").arg("w").arg(1).query(con));
    let old = c.leader_now().unwrap();
    let rt2 =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let pending = rt2.block_on(async {
        let fc = c.node(f).grpc().await;
        let t = fc.begin(timber_client::TxnOptions::default()).await.unwrap();
        t.put("w", "from-txn").await.unwrap();
        t
    });
    if old == f {
        // The follower took the lead meanwhile: nothing left to show here.
        return;
    }
    c.kill(old);
    c.leader();
    let r: redis::RedisResult<Option<(String,)>> =
        redis::pipe().atomic().cmd("SET").arg("w").arg(0).query(&mut fcon);
    match r {
        Ok(r) => assert_eq!(r, None),
        Err(e) => assert!(
            e.to_string().contains("CLUSTERDOWN") || e.to_string().contains("READONLY"),
            "{e}"
        ),
    }
    assert_eq!(on_leader(&c, |con| redis::cmd("GET").arg("w").query::<i64>(con)), 1);
    // An interactive transaction begun under the killed leader is gone with it.
    rt2.block_on(async {
        let r = pending.commit().await;
        let code = r.unwrap_err().code();
        assert!(
            matches!(code, Some(timber_client::Code::Aborted | timber_client::Code::Unavailable)),
            "{code:?}"
        );
    });

    // A write larger than one Raft entry may be is refused, and the cluster goes on.
    let big = vec![b'x'; timber_cluster::MAX_PROPOSAL_BYTES + 1];
    let e = on_leader(&c, |con| Ok(redis::cmd("SET").arg("big").arg(&big[..]).query::<()>(con)));
    let e = e.unwrap_err().to_string();
    assert!(e.contains("exceeds the cluster's limit"), "{e}");
    let _: () = on_leader(&c, |con| redis::cmd("SET").arg("after-big").arg(1).query(con));

    // The killed member comes back; every member holds the same c and n.
    c.start(old);
    let want = on_leader(&c, both);
    let deadline = Instant::now() + WAIT;
    for i in 0..3 {
        while (local_get(&c, i, "c"), local_get(&c, i, "n")) != want {
            assert!(Instant::now() < deadline, "member {} did not converge", i + 1);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `transfer-leader`, asked through any member's Admin API, moves the leadership to the member
/// named while Redis clients increment a counter through every member: each transfer ends
/// with that member leading, and the counter holds every acknowledged increment.
#[test]
fn the_leadership_moves_to_the_member_asked_while_clients_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let mut c = Cluster::three_started();
    let first = c.leader();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|i| {
            let (mut con, stop) = (c.node(i).client(), stop.clone());
            std::thread::spawn(move || {
                let (mut acked, mut failed) = (0i64, 0i64);
                while !stop.load(Ordering::Relaxed) {
                    match redis::cmd("INCR").arg("n").query::<i64>(&mut con) {
                        Ok(_) => acked += 1,
                        Err(_) => failed += 1,
                    }
                }
                (acked, failed)
            })
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let admin = rt.block_on(c.node(first).grpc());
    let e = rt.block_on(admin.transfer_leader(9)).unwrap_err();
    assert!(e.to_string().contains("not a voter"), "{e}");
    // A pessimistic transaction on the first leader holds the lock of `p` there.
    use timber_client::{Code, Isolation, TxnOptions};
    let locked = rt.block_on(async {
        let t = admin.begin(TxnOptions::pessimistic(Isolation::Snapshot)).await.unwrap();
        t.put("p", "first").await.unwrap();
        t
    });
    let mut now = first;
    for _ in 0..3 {
        let target = (now + 1) % 3;
        let via = (target + 1) % 3;
        let admin = rt.block_on(c.node(via).grpc());
        rt.block_on(admin.transfer_leader(target as u64 + 1)).unwrap();
        assert_eq!(c.leader_now(), Some(target), "member {} was asked to lead", target + 1);
        now = target;
    }
    stop.store(true, Ordering::Relaxed);
    // Leading again, the first member no longer holds the transaction begun under its earlier
    // term, nor its lock: another pessimistic transaction gets `p` within its lock timeout.
    assert_eq!(now, first);
    rt.block_on(async {
        let r = locked.put("q", "first").await;
        assert_eq!(r.unwrap_err().code(), Some(Code::Aborted));
        let opts = TxnOptions {
            lock_timeout: Some(Duration::from_secs(5)),
            ..TxnOptions::pessimistic(Isolation::Snapshot)
        };
        let t = admin.begin(opts).await.unwrap();
        t.put("p", "second").await.unwrap();
        t.commit().await.unwrap();
        assert_eq!(admin.get("p").await.unwrap().as_deref(), Some(&b"second"[..]));
    });
    let (acked, failed) = writers
        .into_iter()
        .map(|w| w.join().unwrap())
        .fold((0, 0), |(a, f), (a2, f2)| (a + a2, f + f2));
    assert!(acked > 0, "no increment was acknowledged");
    let n: i64 = on_leader(&c, |con| redis::cmd("GET").arg("n").query(con));
    // An increment that failed may still have committed; none acknowledged is missing.
    assert!(
        n >= acked && n <= acked + failed,
        "counter {n}, {acked} acknowledged, {failed} failed"
    );
}

/// Blind writes on the leader (gRPC puts and plain Redis SETs, which propose from the
/// connection's task, not a thread) hold their key until applied, as read-modify-writes do: an
/// INCR never lands between a put and its application. A putter sets `k` to successive epochs
/// (1e9 × i), through gRPC and Redis in turn, while incrementers add to it; an INCR called
/// after put i was acknowledged must return a value of epoch i or later (an INCR that read
/// before the put and wrote after it would take the key back).
#[test]
fn a_put_and_an_increment_of_one_key_never_interleave() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    const EPOCH: i64 = 1_000_000_000;
    let mut c = Cluster::three_started();
    let leader = c.leader();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let putter = rt.block_on(c.node(leader).grpc());
    let setter = std::cell::RefCell::new(c.node(leader).client());
    // The highest epoch acknowledged so far.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let incrementers: Vec<_> = (0..2)
        .map(|_| {
            let (mut con, acked, stop) = (c.node(leader).client(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut done = 0;
                while !stop.load(Ordering::SeqCst) {
                    let before = acked.load(Ordering::SeqCst) as i64;
                    // A refusal (an election on a loaded machine) proves nothing either way.
                    let Ok(got) = redis::cmd("INCR").arg("k").query::<i64>(&mut con) else {
                        continue;
                    };
                    assert!(
                        got / EPOCH >= before,
                        "INCR called after put {before} was acknowledged returned {got}"
                    );
                    done += 1;
                }
                done
            })
        })
        .collect();
    for i in 1..=300u64 {
        let v = (i as i64 * EPOCH).to_string();
        // Repeated after a refusal (an election): the same value again is the same put.
        let deadline = Instant::now() + WAIT;
        let put = || match i % 2 {
            0 => rt
                .block_on(putter.put(b"k".to_vec(), v.clone().into_bytes()))
                .map_err(|e| e.to_string()),
            _ => redis::cmd("SET")
                .arg("k")
                .arg(&v)
                .query::<()>(&mut setter.borrow_mut())
                .map_err(|e| e.to_string()),
        };
        while let Err(e) = put() {
            assert!(Instant::now() < deadline, "put {i} failed: {e}");
        }
        acked.store(i, Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    let increments: u64 = incrementers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(increments > 0, "no increment ran");
    let last: i64 = on_leader(&c, |con| redis::cmd("GET").arg("k").query(con));
    assert_eq!(last / EPOCH, 300, "the last put was taken back: {last}");
}

/// Serializable interactive transactions committing at once through every member, each
/// taking one key off a duty roster only if its scan of the roster finds another on it (write
/// skew through a predicate if two commits both saw the other): the leader no longer runs
/// such commits one at a time, so what keeps one on duty is the range each commit scanned,
/// checked by every member on apply against the pairs the leader's check saw.
#[test]
fn concurrent_serializable_commits_through_every_member_keep_a_scanned_range_whole() {
    use timber_client::{Code, Isolation, Scan, TxnOptions};
    const ROSTER: usize = 8;
    let mut c = Cluster::three_started();
    c.leader();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let clients = [c.node(0).grpc().await, c.node(1).grpc().await, c.node(2).grpc().await];
        let deadline = Instant::now() + WAIT * 3;
        for round in 0..4 {
            let prefix = format!("duty{round}/");
            for i in 0..ROSTER {
                again(|| clients[0].put(format!("{prefix}{i}"), "on")).await.unwrap();
            }
            let mut tasks = Vec::new();
            for i in 0..ROSTER {
                let (client, prefix) = (clients[i % 3].clone(), prefix.clone());
                tasks.push(tokio::spawn(async move {
                    let mine = format!("{prefix}{i}");
                    loop {
                        assert!(Instant::now() < deadline, "{mine} not settled");
                        let t = match client.begin(TxnOptions::new(Isolation::Serializable)).await {
                            Ok(t) => t,
                            Err(e) if e.code() == Some(Code::Unavailable) => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            Err(e) => panic!("begin: {e}"),
                        };
                        let r = async {
                            let on = t
                                .scan(Scan { prefix: prefix.clone().into(), ..Default::default() });
                            let on = on.await?;
                            let left =
                                on.len() >= 2 && on.iter().any(|(k, _)| k[..] == *mine.as_bytes());
                            if left {
                                t.delete(mine.clone()).await?;
                            }
                            t.commit().await.map(|()| left)
                        };
                        match r.await {
                            Ok(left) => return left,
                            Err(e)
                                if matches!(e.code(), Some(Code::Aborted | Code::Unavailable)) => {}
                            Err(e) => panic!("{mine}: {e}"),
                        }
                    }
                }));
            }
            // (A commit answered Unavailable may have applied: its retry finds its key gone
            // and counts as staying, so only the roster itself is checked.)
            let mut left = 0;
            for t in tasks {
                left += usize::from(t.await.unwrap());
            }
            let scan = Scan { prefix: prefix.clone().into(), ..Default::default() };
            let on = again(|| clients[0].scan(scan.clone())).await.unwrap();
            assert_eq!(on.len(), 1, "round {round}: {on:?} on duty after {left} left");
        }
    });
}

/// Pessimistic transactions begun through different members take their locks on the leader:
/// read-modify-writes of one key through every member lose no increment and never abort, a
/// lock is waited for until its holder commits, and two transactions that lock two keys in
/// opposite orders through two followers deadlock, one of them failing at once.
#[test]
fn pessimistic_locks_through_every_member_live_on_the_leader() {
    use timber_client::{Code, Isolation, TxnOptions};
    let mut c = Cluster::three_started();
    let leader = c.leader();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let opts = TxnOptions {
        lock_timeout: Some(Duration::from_secs(10)),
        ..TxnOptions::pessimistic(Isolation::ReadCommitted)
    };
    let num = |v: Option<bytes::Bytes>| -> u64 {
        v.map_or(0, |b| std::str::from_utf8(&b).unwrap().parse().unwrap())
    };
    rt.block_on(async {
        // Increments through every member: each waits for the lock of `n`, none aborts.
        const TASKS: usize = 6;
        const EACH: u64 = 10;
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let port = c.node(t % 3).grpc_port;
                tokio::spawn(async move {
                    let client = common::grpc_at(port).await;
                    for _ in 0..EACH {
                        let txn = again(|| client.begin(opts)).await.unwrap();
                        let n = num(txn.get_for_update("n").await.unwrap());
                        txn.put("n", (n + 1).to_string()).await.unwrap();
                        txn.commit().await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let lc = c.node(leader).grpc().await;
        assert_eq!(num(lc.get("n").await.unwrap()), TASKS as u64 * EACH);

        // A lock held through one follower makes a transaction through the other wait.
        let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);
        let (a, b) = (c.node(f1).grpc().await, c.node(f2).grpc().await);
        let ta = a.begin(opts).await.unwrap();
        ta.put("x", "a").await.unwrap();
        let tb = b.begin(opts).await.unwrap();
        let waiting = {
            let tb = tb.clone();
            tokio::spawn(async move { tb.get_for_update("x").await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the lock of x was not waited for");
        ta.commit().await.unwrap();
        assert_eq!(waiting.await.unwrap().unwrap().as_deref(), Some(&b"a"[..]));
        tb.commit().await.unwrap();

        // Opposite orders: one of the two fails with a deadlock, long before the lock timeout.
        let (ta, tb) = (a.begin(opts).await.unwrap(), b.begin(opts).await.unwrap());
        ta.put("y", "a").await.unwrap();
        tb.put("z", "b").await.unwrap();
        let start = Instant::now();
        let first = {
            let ta = ta.clone();
            tokio::spawn(async move { ta.put("z", "a").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = tb.put("y", "b").await;
        let failed = match second {
            Err(e) => {
                assert_eq!(e.code(), Some(Code::Aborted), "{e}");
                tb.rollback().await.unwrap();
                first.await.unwrap().unwrap();
                ta.commit().await.unwrap();
                "b"
            }
            Ok(()) => {
                let e = first.await.unwrap().unwrap_err();
                assert_eq!(e.code(), Some(Code::Aborted), "{e}");
                ta.rollback().await.unwrap();
                tb.commit().await.unwrap();
                "a"
            }
        };
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the deadlock took {:?}",
            start.elapsed()
        );
        let winner = if failed == "a" { "b" } else { "a" };
        for k in ["y", "z"] {
            assert_eq!(lc.get(k).await.unwrap().as_deref(), Some(winner.as_bytes()), "{k}");
        }
    });
}
