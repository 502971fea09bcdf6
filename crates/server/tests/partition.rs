//! Three real `timberd` processes whose Raft links pass through TCP proxies (`common::net`):
//! while clients on every member SET, GET, INCR and SET NX, the leader is cut off from the
//! others and healed, then stopped past the election timeout (SIGSTOP) and resumed, then
//! killed (SIGKILL) and restarted, and every operation goes into a history that must be
//! linearizable (`common::history`). The checker itself is tested first, on histories with a
//! known answer.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::history::{History, STEP};
use common::net::{member_ip, Links};
use common::Timberd;

const WAIT: Duration = Duration::from_secs(30);
const KEYS: [&str; 4] = ["a", "b", "c", "d"];

#[test]
fn the_checker_accepts_linearizable_histories_and_rejects_a_stale_read() {
    let ok = History::default();
    ok.write("k", 1000, 0, Some(10));
    ok.write("k", 2000, 5, Some(20)); // concurrent with the first: either order
    ok.read("k", Some(1000), 12, 15); // so 2000 then 1000 ...
    ok.read("k", Some(1000), 30, 40); // ... and 1000 stays
    ok.read("j", None, 0, 1);
    ok.write("j", 3000, 2, None); // unknown outcome, read back later: it took effect
    ok.read("j", Some(3000), 50, 60);
    ok.write("j", 4000, 70, None); // unknown outcome, never read: maybe never applied
    ok.read("j", Some(3000), 80, 90);
    assert_eq!(ok.check(), Ok(()));

    let stale = History::default();
    stale.write("k", 1000, 0, Some(10));
    stale.write("k", 2000, 20, Some(30));
    stale.read("k", Some(1000), 40, 50); // 2000 was acknowledged before this read began
    assert!(stale.check().is_err());

    let lost = History::default();
    lost.write("k", 1000, 0, Some(10));
    lost.read("k", None, 20, 30); // an acknowledged write vanished
    assert!(lost.check().is_err());

    let back_in_time = History::default();
    back_in_time.write("k", 1000, 0, Some(10));
    back_in_time.write("k", 2000, 0, Some(10));
    back_in_time.read("k", Some(2000), 20, 30);
    back_in_time.read("k", Some(1000), 40, 50); // seen 2000, then 1000 again
    assert!(back_in_time.check().is_err());

    // Increments and SET NX: concurrent increments in either order, unknown ones that took
    // effect or not, a SET NX on an absent key only.
    let ok = History::default();
    ok.incr("n", Some((1, 10)), 0);
    ok.incr("n", Some((3, 40)), 20);
    ok.incr("n", None, 5); // unknown outcome: it took effect (3 needs it)
    ok.incr("n", None, 45); // unknown outcome: never seen
    ok.read("n", Some(3), 50, 60);
    ok.set_nx("n", 7000, Some((false, 70)), 65);
    ok.set_nx("m", 7000, Some((true, 10)), 0);
    ok.set_nx("m", 8000, Some((false, 30)), 20);
    ok.incr("m", Some((7001, 50)), 40);
    ok.write("m", 9000, 60, None); // unknown: its value incremented later, so it took effect
    ok.incr("m", Some((9001, 90)), 80);
    assert_eq!(ok.check(), Ok(()));

    let lost_incr = History::default();
    lost_incr.incr("n", Some((1, 10)), 0);
    lost_incr.incr("n", Some((1, 30)), 20); // the first increment vanished
    assert!(lost_incr.check().is_err());

    let stale_incr = History::default();
    stale_incr.write("n", 1000, 0, Some(10));
    stale_incr.incr("n", Some((1001, 30)), 20);
    stale_incr.read("n", Some(1000), 40, 50); // the increment was acknowledged before
    assert!(stale_incr.check().is_err());

    let twice_set = History::default();
    twice_set.set_nx("m", 1000, Some((true, 10)), 0);
    twice_set.set_nx("m", 2000, Some((true, 30)), 20); // the key existed already
    assert!(twice_set.check().is_err());
}

/// Member `i` (1-based) listens for Raft on 127.0.0.i; the cluster reaches it through a proxy.
struct Members {
    dirs: Vec<tempfile::TempDir>,
    raft: Vec<SocketAddr>,
    proxies: Vec<SocketAddr>,
    nodes: Vec<Option<Timberd>>,
}

impl Members {
    fn start(links: &Links) -> Members {
        let raft: Vec<SocketAddr> = (1..=3)
            .map(|i| SocketAddr::new(member_ip(i), common::free_port(member_ip(i))))
            .collect();
        let proxies = raft.iter().enumerate().map(|(i, a)| links.proxy(i + 1, *a)).collect();
        let mut m = Members {
            dirs: (0..3).map(|_| tempfile::tempdir().unwrap()).collect(),
            raft,
            proxies,
            nodes: vec![None, None, None],
        };
        for i in 0..3 {
            m.run(i);
        }
        m
    }

    fn run(&mut self, i: usize) {
        let initial: Vec<String> =
            self.proxies.iter().enumerate().map(|(j, p)| format!("{}={p}", j + 1)).collect();
        let flags = [
            "--node-id".to_string(),
            (i + 1).to_string(),
            "--raft-addr".into(),
            self.raft[i].to_string(),
            "--initial-cluster".into(),
            initial.join(","),
            "--sync".into(),
            "always".into(),
            "--raft-heartbeat-ms".into(),
            "100".into(),
        ];
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.nodes[i] = Some(Timberd::start(self.dirs[i].path(), &flags));
    }

    fn node(&self, i: usize) -> &Timberd {
        self.nodes[i].as_ref().unwrap()
    }

    /// Waits until member `i` says it follows (`what` it is, for the failure message).
    fn wait_following(&self, i: usize, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.role(i) != "slave" {
            assert!(Instant::now() < deadline, "{what} did not step down");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn role(&self, i: usize) -> String {
        let Ok(mut con) = self.node(i).try_client() else { return String::new() };
        let info: String =
            redis::cmd("INFO").arg("replication").query(&mut con).unwrap_or_default();
        info.lines().find_map(|l| l.strip_prefix("role:")).unwrap_or("").trim().to_string()
    }

    /// Waits until one of `among` says it leads and takes a write; returns it.
    fn leader_among(&self, among: &[usize]) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            for &i in among {
                if self.role(i) == "master" {
                    let r: redis::RedisResult<()> =
                        redis::cmd("SET").arg("probe").arg(i).query(&mut self.node(i).client());
                    if r.is_ok() {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader among {among:?} within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What member `i` holds for `keys`, read from its own replica.
    fn local(&self, i: usize, keys: &[&str]) -> Vec<Option<String>> {
        let mut con = self.node(i).client();
        let _: () = redis::cmd("READONLY").query(&mut con).unwrap();
        keys.iter().map(|k| redis::cmd("GET").arg(k).query(&mut con).unwrap()).collect()
    }
}

/// The members other than `i`.
fn all_but(i: usize) -> Vec<usize> {
    (0..3).filter(|&j| j != i).collect()
}

/// One client of member `member` (its Redis port in `ports`, which changes when the member
/// restarts): SETs unique values, GETs, INCRs and SET NXs on [`KEYS`], recording each
/// operation, until `stop`; counts its failed operations in `failed`.
fn client(
    ports: Arc<[AtomicU16; 3]>,
    member: usize,
    id: usize,
    history: History,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
) {
    let connect = || {
        let port = ports[member].load(Ordering::SeqCst);
        let c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let con = c.get_connection_with_timeout(Duration::from_secs(5)).ok()?;
        con.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        Some(con)
    };
    let mut con = connect();
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = con.as_mut() else {
            std::thread::sleep(Duration::from_millis(20));
            con = connect();
            continue;
        };
        n += 1;
        let key = KEYS[(n as usize * 7 + id) % KEYS.len()];
        // Unique among all clients, a multiple of STEP.
        let value = ((id as i64 + 1) * 1_000_000_000 + n) * STEP;
        let call = history.now();
        let failure = match n % 4 {
            0 => {
                let r: redis::RedisResult<()> = redis::cmd("SET").arg(key).arg(value).query(c);
                // Refused or timed out: it may still be applied.
                let ret = r.as_ref().ok().map(|()| history.now());
                history.write(key, value, call, ret);
                r.err()
            }
            1 => {
                let r: redis::RedisResult<Option<i64>> = redis::cmd("GET").arg(key).query(c);
                if let Ok(v) = &r {
                    history.read(key, *v, call, history.now());
                }
                r.err()
            }
            2 => {
                let r: redis::RedisResult<i64> = redis::cmd("INCR").arg(key).query(c);
                history.incr(key, r.as_ref().ok().map(|v| (*v, history.now())), call);
                r.err()
            }
            _ => {
                let r: redis::RedisResult<Option<String>> =
                    redis::cmd("SET").arg(key).arg(value).arg("NX").query(c);
                let done = r.as_ref().ok().map(|set| (set.is_some(), history.now()));
                history.set_nx(key, value, done, call);
                r.err()
            }
        };
        if let Some(e) = failure {
            failed.fetch_add(1, Ordering::Relaxed);
            if e.is_io_error() || e.is_timeout() {
                con = None;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_partitioned_stopped_and_killed_leader_serves_no_stale_reads_and_the_history_stays_linearizable(
) {
    let links = Links::default();
    let mut m = Members::start(&links);
    let old = m.leader_among(&[0, 1, 2]);
    let others = all_but(old);

    // Every key exists from the start (so SET NX never sets: see `common::history`).
    let history = History::default();
    for key in KEYS {
        let call = history.now();
        let () = redis::cmd("SET").arg(key).arg(0).query(&mut m.node(old).client()).unwrap();
        history.write(key, 0, call, Some(history.now()));
    }
    let ports = Arc::new([0, 1, 2].map(|i| AtomicU16::new(m.node(i).port)));
    let stop = Arc::new(AtomicBool::new(false));
    let failed_on_old = Arc::new(AtomicUsize::new(0));
    let failed_elsewhere = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..6)
        .map(|id| {
            let member = id % 3;
            let failed =
                if member == old { failed_on_old.clone() } else { failed_elsewhere.clone() };
            let (h, s, p) = (history.clone(), stop.clone(), ports.clone());
            std::thread::spawn(move || client(p, member, id, h, s, failed))
        })
        .collect();
    let progress = |h: &History| h.counts().0;
    let before = progress(&history);
    let wait_for_writes = |n: usize| {
        let deadline = Instant::now() + WAIT;
        let from = progress(&history);
        while progress(&history) < from + n {
            assert!(Instant::now() < deadline, "clients made no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for_writes(50);
    assert!(progress(&history) > before);

    // The leader is cut off from both others (Raft traffic only: its clients still reach it).
    links.isolate(old + 1, &others.iter().map(|i| i + 1).collect::<Vec<_>>());
    let new = m.leader_among(&others);
    assert_ne!(new, old);
    // The majority serves; the old leader refuses rather than answering from its replica.
    let mut con = m.node(new).client();
    let _: () = redis::cmd("SET").arg("during").arg("majority").query(&mut con).unwrap();
    let mut con = m.node(old).client();
    let r: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("during").query(&mut con);
    assert!(r.is_err(), "the cut-off leader answered a linearizable read: {r:?}");
    let r: redis::RedisResult<()> = redis::cmd("SET").arg("during").arg("minority").query(&mut con);
    assert!(r.is_err(), "the cut-off leader acknowledged a write: {r:?}");
    wait_for_writes(50);

    // Healed: the old leader steps down and follows, and the clients go on.
    links.heal();
    m.wait_following(old, "the old leader");
    wait_for_writes(50);

    // The leader stops past the election timeout: the others elect one of them; resumed, it
    // follows.
    let stopped = m.leader_among(&[0, 1, 2]);
    m.node(stopped).signal(rustix::process::Signal::STOP);
    m.leader_among(&all_but(stopped));
    wait_for_writes(30);
    m.node(stopped).signal(rustix::process::Signal::CONT);
    m.wait_following(stopped, "the resumed leader");
    wait_for_writes(30);

    // The leader is killed, the others go on, and it comes back as a follower.
    let killed = m.leader_among(&[0, 1, 2]);
    m.nodes[killed] = None;
    m.leader_among(&all_but(killed));
    wait_for_writes(30);
    m.run(killed);
    ports[killed].store(m.node(killed).port, Ordering::SeqCst);
    wait_for_writes(30);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }

    // Every member converges to the same data, the majority's.
    let mut keys = KEYS.to_vec();
    keys.push("during");
    let leader = m.leader_among(&[0, 1, 2]);
    let mut con = m.node(leader).client();
    let _: () = redis::cmd("SET").arg("last").arg("1").query(&mut con).unwrap();
    keys.push("last");
    let want = m.local(leader, &keys);
    assert_eq!(want[4].as_deref(), Some("majority"));
    for i in 0..3 {
        let deadline = Instant::now() + WAIT;
        while m.local(i, &keys) != want {
            assert!(Instant::now() < deadline, "member {} did not converge", i + 1);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let (acked, unknown, reads) = history.counts();
    eprintln!("history: {acked} acknowledged writes, {unknown} unknown, {reads} reads");
    assert!(acked >= 250 && reads >= 100, "too little happened to check");
    for key in KEYS {
        assert!(history.incrs(key) > 0, "no increment of {key}");
    }
    assert!(failed_on_old.load(Ordering::Relaxed) > 0, "the partition never touched a client");
    history.check().unwrap();
}

/// The log stream `events` through member `i`: linearizable, or with `stale` its own copy.
async fn events(m: &Members, i: usize, stale: bool) -> timber_client::Result<Vec<String>> {
    use timber_client::Start;
    let c = m.node(i).grpc().await;
    let mut r = match stale {
        true => c.reader_stale("events", Start::Earliest, false).await?,
        false => c.reader("events", Start::Earliest, false).await?,
    };
    let mut out = Vec::new();
    while let Some(e) = r.next().await? {
        out.push(String::from_utf8(e.data.to_vec()).unwrap());
    }
    Ok(out)
}

#[test]
fn a_follower_the_leader_cannot_reach_serves_no_stale_log_stream_read() {
    let links = Links::default();
    let m = Members::start(&links);
    let leader = m.leader_among(&[0, 1, 2]);
    let f = (leader + 1) % 3;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // Retries while an election is under way (and a retried append that had committed shows as
    // a repeat, dropped before comparing).
    let again = |op: &'static str| {
        let client = m.node(leader).grpc();
        async move {
            let client = client.await;
            let deadline = Instant::now() + WAIT;
            loop {
                let r = match op {
                    "create" => client.create_stream("events", None, None).await.map(|_| ()),
                    data => {
                        client.append("events", vec![bytes::Bytes::from(data)]).await.map(|_| ())
                    }
                };
                match r {
                    Err(e)
                        if e.code() == Some(timber_client::Code::Unavailable)
                            && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e)
                        if op == "create"
                            && e.code() == Some(timber_client::Code::AlreadyExists) =>
                    {
                        return
                    }
                    r => return r.unwrap(),
                }
            }
        }
    };
    let unrepeated = |mut v: Vec<String>| {
        v.dedup();
        v
    };
    rt.block_on(async {
        again("create").await;
        again("before").await;
        let deadline = Instant::now() + WAIT;
        while events(&m, f, true).await.ok().map(unrepeated) != Some(vec!["before".to_string()]) {
            assert!(Instant::now() < deadline, "member {} never received the append", f + 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The leader's entries no longer reach the follower; the follower still reaches the
        // leader. An append commits with the third member.
        links.cut(&[(leader + 1, f + 1)]);
        again("after").await;
        // A read through the follower sees the append, or fails (retryable): it never answers
        // from the follower's copy without it.
        match events(&m, f, false).await {
            Ok(seen) => assert_eq!(unrepeated(seen), ["before", "after"], "a stale read"),
            Err(e) => assert_eq!(e.code(), Some(timber_client::Code::Unavailable), "{e}"),
        }
        links.heal();
        let deadline = Instant::now() + WAIT;
        loop {
            match events(&m, f, false).await {
                Ok(seen) => {
                    assert_eq!(unrepeated(seen), ["before", "after"]);
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "no read after the heal: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
