//! `timber-bench cluster`: a three-member timberd cluster beside a three-member etcd cluster
//! (Debian's `etcd-server`, driven through the `etcd-client` crate; built with the `etcd`
//! feature), on loopback, both with durable writes (`--sync always`; etcd fsyncs by default).
//!
//! Every client talks to the leader over gRPC on its own connection: 16 B keys from a space of
//! 10,000 and 100 B values. Workloads, each system in turn and alternating which goes first:
//! - `put 1 client`, `put 32 clients`: acknowledged puts per second and their latency;
//! - `get 32 clients`: linearizable reads (timber's default, etcd's default);
//! - `rmw 32 clients`: read-modify-write transactions of one key, retried until committed:
//!   timber's interactive transactions (begin, get, put, commit; optimistic, `Snapshot`),
//!   etcd's get then a `Txn` that puts only if the key's mod revision is the one read;
//! - `append 1 client`, `append 16 clients` (timber only: etcd has no log streams): appends of
//!   one 100 B entry each to one log stream;
//! - `lag 32 clients`: during a 32-client put load, a probe puts a counter on the leader and
//!   times until a follower's local (stale / serializable) read shows it, every 5 ms; p50/p99;
//! - `failover`: under a 4-client put load the leader is SIGKILLed; time until a survivor
//!   acknowledges a put, as `p50_us` (median over `--kills` kills; `p99_us` is the longest).
//!   The killed member restarts and catches up before the next kill. The probe's puts give
//!   up after 50 ms each and are sent again at once, to each survivor in turn.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;

use crate::report::{print_table, write_json, Common, Row, Sample};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// The timberd binary [default: beside this executable].
    #[arg(long)]
    timberd: Option<PathBuf>,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Systems to run, comma-separated (timber, etcd).
    #[arg(long, default_value = "timber,etcd")]
    systems: String,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Leader kills of the failover row.
    #[arg(long, default_value_t = 5)]
    kills: usize,
}

const KEYS: u64 = 10_000;
const VALUE: usize = 100;
const MEMBERS: usize = 3;
/// Time limit of one put of the failover probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Timber,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Timber => "timber",
            System::Etcd => "etcd",
        }
    }
}

fn key(n: u64) -> Vec<u8> {
    format!("k{n:015}").into_bytes()
}

/// A port free at the time of the call.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One member: its process (while it runs) and how to start it again.
struct Node {
    command: Vec<String>,
    log: PathBuf,
    client_addr: String,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(&self.log)?;
        let (program, args) = self.command.split_first().expect("a command");
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {program}: {e}"))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running three-member cluster of one system.
struct Cluster {
    system: System,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(args: &Args, system: System) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir_in(&args.common.dir)?;
        let peer: Vec<u16> = (0..MEMBERS).map(|_| free_port()).collect::<Result<_, _>>()?;
        let client: Vec<u16> = (0..MEMBERS).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut nodes = Vec::new();
        for (i, &port) in client.iter().enumerate() {
            let data = dir.path().join(format!("member{}", i + 1));
            let command = match system {
                System::Timber => timberd_command(args, i, &data, &peer, port)?,
                System::Etcd => etcd_command(args, i, &data, &peer, port),
            };
            nodes.push(Node {
                command,
                log: dir.path().join(format!("member{}.log", i + 1)),
                client_addr: format!("127.0.0.1:{port}"),
                child: None,
            });
        }
        for n in &mut nodes {
            n.start()?;
        }
        Ok(Cluster { system, nodes, _dir: dir })
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| std::fs::read_to_string(&n.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The index of the member that leads, once one does (and answers clients).
    async fn leader(&self, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            for (i, n) in self.nodes.iter().enumerate() {
                if n.child.is_none() {
                    continue;
                }
                match Conn::connect(self.system, &n.client_addr).await {
                    Ok(mut c) => match c.leads().await {
                        Ok(true) => match c.put(b"probe", b"x").await {
                            Ok(()) => return Ok(i),
                            Err(e) => last = format!("{e:#}"),
                        },
                        Ok(false) => {}
                        Err(e) => last = format!("{e:#}"),
                    },
                    Err(e) => last = format!("{e:#}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!(
            "no {} leader within {within:?} ({last}):\n{}",
            self.system.name(),
            self.logs()
        )
    }
}

fn timberd_command(
    args: &Args,
    i: usize,
    data: &Path,
    peer: &[u16],
    client: u16,
) -> anyhow::Result<Vec<String>> {
    let bin = match &args.timberd {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("timberd"),
    };
    let initial: Vec<String> =
        peer.iter().enumerate().map(|(j, p)| format!("{}=127.0.0.1:{p}", j + 1)).collect();
    Ok(vec![
        bin.display().to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--sync".into(),
        "always".into(),
        "--resp-addr".into(),
        "127.0.0.1:0".into(),
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--grpc-addr".into(),
        format!("127.0.0.1:{client}"),
        "--node-id".into(),
        (i + 1).to_string(),
        "--raft-addr".into(),
        format!("127.0.0.1:{}", peer[i]),
        "--initial-cluster".into(),
        initial.join(","),
    ])
}

fn etcd_command(args: &Args, i: usize, data: &Path, peer: &[u16], client: u16) -> Vec<String> {
    let initial: Vec<String> =
        peer.iter().enumerate().map(|(j, p)| format!("n{}=http://127.0.0.1:{p}", j + 1)).collect();
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    vec![
        args.etcd.display().to_string(),
        "--name".into(),
        format!("n{}", i + 1),
        "--data-dir".into(),
        data.display().to_string(),
        "--listen-client-urls".into(),
        url(client),
        "--advertise-client-urls".into(),
        url(client),
        "--listen-peer-urls".into(),
        url(peer[i]),
        "--initial-advertise-peer-urls".into(),
        url(peer[i]),
        "--initial-cluster".into(),
        initial.join(","),
        "--initial-cluster-state".into(),
        "new".into(),
        "--initial-cluster-token".into(),
        "timber-bench".into(),
        "--logger".into(),
        "zap".into(),
        "--log-level".into(),
        "error".into(),
    ]
}

/// A client connection to one member.
enum Conn {
    Timber(timber_client::Client),
    #[cfg(feature = "etcd")]
    Etcd(Box<etcd_client::Client>),
}

impl Conn {
    async fn connect(system: System, addr: &str) -> anyhow::Result<Conn> {
        Conn::connect_with(system, addr, Duration::from_secs(2)).await
    }

    /// A connection whose calls give up after `timeout`.
    async fn connect_with(system: System, addr: &str, timeout: Duration) -> anyhow::Result<Conn> {
        match system {
            System::Timber => {
                let o = timber_client::Options {
                    timeout,
                    connect_timeout: Duration::from_millis(500),
                    retries: 0,
                    ..Default::default()
                };
                Ok(Conn::Timber(
                    timber_client::Client::connect_with(format!("http://{addr}"), o).await?,
                ))
            }
            #[cfg(feature = "etcd")]
            System::Etcd => {
                let o = etcd_client::ConnectOptions::new()
                    .with_timeout(timeout)
                    .with_connect_timeout(Duration::from_millis(500));
                Ok(Conn::Etcd(Box::new(etcd_client::Client::connect([addr], Some(o)).await?)))
            }
            #[cfg(not(feature = "etcd"))]
            System::Etcd => anyhow::bail!("etcd needs timber-bench built with --features etcd"),
        }
    }

    async fn put(&mut self, k: &[u8], v: &[u8]) -> anyhow::Result<()> {
        match self {
            Conn::Timber(c) => Ok(c.put(k.to_vec(), v.to_vec()).await?),
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => Ok(c.put(k, v, None).await.map(|_| ())?),
        }
    }

    /// An append of one entry to [`STREAM`] (timber only).
    async fn append(&mut self, v: &[u8]) -> anyhow::Result<()> {
        match self {
            Conn::Timber(c) => Ok(c.append(STREAM, vec![v.to_vec().into()]).await.map(|_| ())?),
            #[cfg(feature = "etcd")]
            Conn::Etcd(_) => anyhow::bail!("etcd has no log streams"),
        }
    }

    /// A linearizable read.
    async fn get(&mut self, k: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        match self {
            Conn::Timber(c) => Ok(c.get(k.to_vec()).await?.map(|v| v.to_vec())),
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => Ok(c.get(k, None).await?.kvs().first().map(|kv| kv.value().to_vec())),
        }
    }

    /// A read-modify-write transaction of `k`, retried until it commits.
    async fn rmw(&mut self, k: &[u8], v: &[u8]) -> anyhow::Result<()> {
        match self {
            Conn::Timber(c) => loop {
                let t = c.begin(timber_client::TxnOptions::default()).await?;
                let _old = t.get(k.to_vec()).await?;
                t.put(k.to_vec(), v.to_vec()).await?;
                match t.commit().await {
                    Ok(()) => return Ok(()),
                    Err(e) if e.code() == Some(timber_client::Code::Aborted) => {}
                    Err(e) => return Err(e.into()),
                }
            },
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => loop {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let read = c.get(k, None).await?;
                let rev = read.kvs().first().map_or(0, |kv| kv.mod_revision());
                let txn = Txn::new()
                    .when([Compare::mod_revision(k, CompareOp::Equal, rev)])
                    .and_then([TxnOp::put(k, v, None)]);
                if c.txn(txn).await?.succeeded() {
                    return Ok(());
                }
            },
        }
    }

    /// A read of the member's own replica.
    async fn get_local(&mut self, k: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        match self {
            Conn::Timber(c) => Ok(c.get_stale(k.to_vec()).await?.map(|v| v.to_vec())),
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => {
                let o = etcd_client::GetOptions::new().with_serializable();
                Ok(c.get(k, Some(o)).await?.kvs().first().map(|kv| kv.value().to_vec()))
            }
        }
    }

    /// Whether the member leads.
    async fn leads(&mut self) -> anyhow::Result<bool> {
        match self {
            Conn::Timber(c) => {
                Ok(c.status().await?.cluster.is_some_and(|cl| cl.leader_id == Some(cl.node_id)))
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => {
                let s = c.status().await?;
                Ok(s.header().is_some_and(|h| h.member_id() == s.leader()))
            }
        }
    }
}

/// What a client of [`load`] does in a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
    /// A read-modify-write transaction.
    Rmw,
    /// An append to the log stream [`STREAM`].
    Append,
}

/// The log stream of the append workloads.
const STREAM: &str = "bench";

/// Runs `clients` connections to `addr` for `secs`, each doing `op` in a loop.
async fn load(
    system: System,
    addr: &str,
    clients: usize,
    secs: u64,
    op: Op,
) -> anyhow::Result<Sample> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Conn::connect(system, addr).await?);
    }
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut hist = Sample::new_histogram();
                let value = vec![b'v'; VALUE];
                let mut n = 0u64;
                while Instant::now() < until {
                    let k = key(rand::rng().random_range(0..KEYS));
                    let t = Instant::now();
                    match op {
                        Op::Put => c.put(&k, &value).await?,
                        Op::Get => drop(c.get(&k).await?),
                        Op::Rmw => c.rmw(&k, &value).await?,
                        Op::Append => c.append(&value).await?,
                    }
                    hist.record(t.elapsed().as_nanos() as u64).ok();
                    n += 1;
                }
                anyhow::Ok((n, hist))
            })
        })
        .collect();
    let mut ops = 0;
    let mut latency_ns = Sample::new_histogram();
    for t in tasks {
        let (n, h) = t.await??;
        ops += n;
        latency_ns.add(&h).ok();
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = ops
        * match op {
            Op::Put => 16 + VALUE as u64,
            Op::Get => 16,
            Op::Rmw => 16 + VALUE as u64,
            Op::Append => VALUE as u64,
        };
    Ok(Sample { ops, bytes, secs, latency_ns })
}

/// Under a 32-client put load on the leader, the time from a put's acknowledgement to its
/// value on a follower's own replica.
async fn lag(system: System, leader: &str, follower: &str, secs: u64) -> anyhow::Result<Sample> {
    let load = {
        let (system, addr) = (system, leader.to_string());
        tokio::spawn(async move { load(system, &addr, 32, secs, Op::Put).await })
    };
    let mut w = Conn::connect(system, leader).await?;
    let mut r = Conn::connect(system, follower).await?;
    let mut hist = Sample::new_histogram();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        n += 1;
        let value = n.to_string().into_bytes();
        w.put(b"lag-probe", &value).await?;
        let acked = Instant::now();
        loop {
            if r.get_local(b"lag-probe").await?.as_deref() == Some(&value[..]) {
                break;
            }
            if acked.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("a follower did not apply a write within 10 s");
            }
        }
        hist.record(acked.elapsed().as_nanos() as u64).ok();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    load.await??;
    Ok(Sample { ops: n, bytes: 0, secs: start.elapsed().as_secs_f64(), latency_ns: hist })
}

/// SIGKILLs the leader under load `kills` times; each time, how long until a survivor
/// acknowledged a put.
async fn failover(cluster: &mut Cluster, kills: usize) -> anyhow::Result<Sample> {
    let mut hist = Sample::new_histogram();
    let system = cluster.system;
    for _ in 0..kills {
        let leader = cluster.leader(Duration::from_secs(30)).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for _ in 0..4 {
            let (addr, stop) = (cluster.nodes[leader].client_addr.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let Ok(mut c) = Conn::connect(system, &addr).await else { return };
                while !stop.load(Ordering::Relaxed) {
                    let k = key(rand::rng().random_range(0..KEYS));
                    if c.put(&k, &[b'v'; VALUE]).await.is_err() {
                        return;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.nodes[leader].kill();
        let killed = Instant::now();
        let survivors: Vec<String> = cluster
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leader)
            .map(|(_, n)| n.client_addr.clone())
            .collect();
        // Short calls: a put to a member that waits for an election would otherwise hide
        // when the election ended (the figure's resolution is this timeout).
        let mut conns = Vec::new();
        for a in &survivors {
            conns.push(Conn::connect_with(system, a, PROBE_TIMEOUT).await?);
        }
        'found: loop {
            for c in &mut conns {
                if c.put(b"failover", b"x").await.is_ok() {
                    break 'found;
                }
            }
            if killed.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("no survivor took a write within 30 s:\n{}", cluster.logs());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        hist.record(killed.elapsed().as_nanos() as u64).ok();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            let _ = w.await;
        }
        cluster.nodes[leader].start()?;
        // Back to three: the restarted member answers and has caught up with a write made now.
        let now = cluster.leader(Duration::from_secs(30)).await?;
        let mut w = Conn::connect(system, &cluster.nodes[now].client_addr).await?;
        let mark = format!("{:?}", Instant::now()).into_bytes();
        let t = Instant::now();
        w.put(b"rejoin", &mark).await?;
        loop {
            let seen = match Conn::connect(system, &cluster.nodes[leader].client_addr).await {
                Ok(mut c) => c.get_local(b"rejoin").await.ok().flatten(),
                Err(_) => None,
            };
            if seen.as_deref() == Some(&mark[..]) {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(60),
                "the killed member did not rejoin"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(Sample { ops: kills as u64, bytes: 0, secs: 1.0, latency_ns: hist })
}

/// The workloads of one round on one system.
async fn round(args: &Args, system: System) -> anyhow::Result<Vec<(String, Sample)>> {
    let mut out = Vec::new();
    let mut cluster = Cluster::start(args, system)?;
    let leader = cluster.leader(Duration::from_secs(30)).await?;
    let addr = cluster.nodes[leader].client_addr.clone();
    let follower = cluster.nodes[(leader + 1) % MEMBERS].client_addr.clone();
    let secs = args.secs;
    for (name, clients, op) in [
        ("put 1 client", 1, Op::Put),
        ("put 32 clients", 32, Op::Put),
        ("get 32 clients", 32, Op::Get),
        ("rmw 32 clients", 32, Op::Rmw),
    ] {
        if args.common.wanted(name) {
            out.push((name.to_string(), load(system, &addr, clients, secs, op).await?));
        }
    }
    let appends = [("append 1 client", 1), ("append 16 clients", 16)];
    if system == System::Timber && appends.iter().any(|(name, _)| args.common.wanted(name)) {
        let c = timber_client::Client::connect(format!("http://{addr}")).await?;
        c.create_stream(STREAM, None, None).await?;
        for (name, clients) in appends {
            if args.common.wanted(name) {
                out.push((name.to_string(), load(system, &addr, clients, secs, Op::Append).await?));
            }
        }
    }
    if args.common.wanted("lag 32 clients") {
        out.push(("lag 32 clients".into(), lag(system, &addr, &follower, secs).await?));
    }
    if args.common.wanted("failover") && args.kills > 0 {
        out.push(("failover".into(), failover(&mut cluster, args.kills).await?));
    }
    Ok(out)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut systems = Vec::new();
    for s in args.systems.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        systems.push(match s {
            "timber" => System::Timber,
            "etcd" => System::Etcd,
            other => anyhow::bail!("unknown system {other:?}: timber or etcd"),
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut samples: Vec<(String, System, Sample)> = Vec::new();
    for r in 0..args.common.repeat {
        let mut order = systems.clone();
        if r % 2 == 1 {
            order.reverse();
        }
        for &system in &order {
            eprintln!("round {} of {}: {}", r + 1, args.common.repeat, system.name());
            for (w, s) in rt.block_on(round(&args, system))? {
                samples.push((w, system, s));
            }
        }
    }
    let mut rows = Vec::new();
    let mut workloads: Vec<&str> = Vec::new();
    for (w, _, _) in &samples {
        if !workloads.contains(&w.as_str()) {
            workloads.push(w);
        }
    }
    for w in workloads {
        for &system in &systems {
            let of: Vec<Sample> = samples
                .iter()
                .filter(|(sw, ss, _)| sw == w && *ss == system)
                .map(|(_, _, s)| s.clone())
                .collect();
            if of.is_empty() {
                continue;
            }
            let mut row = Row::from_samples(w, system.name(), &of);
            if w == "failover" {
                // One figure per kill: the median over every kill of every round, and the worst.
                let mut all: Histogram<u64> = Sample::new_histogram();
                for s in &of {
                    all.add(&s.latency_ns).ok();
                }
                row.ops_per_sec = 0.0;
                row.p50_us = all.value_at_quantile(0.5) as f64 / 1e3;
                row.p99_us = all.max() as f64 / 1e3;
                row.p999_us = row.p99_us;
            }
            rows.push(row);
        }
    }
    print_table("cluster: three members on loopback, durable writes", &rows);
    let path = write_json("cluster", &rows)?;
    println!("\nwrote {}", path.display());
    Ok(())
}
